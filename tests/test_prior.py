"""The anatomical sequence prior, without any network: chains of points with evidence."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verse_cli import prior as P
from verse_cli.core import labels as L

K = len(P.PRIOR_LABELS)
NORMAL = [lab for lab in P.PRIOR_LABELS if lab not in (25, 28)]  # C1..L5, S1


def spine(labels, scale=1.0, jitter=0.0, seed=0, curve=True):
    """Points along a gently curved spine with the level distances of ``labels``."""
    rng = np.random.default_rng(seed)
    steps = [P.LEVEL_MM[a] * scale * (1 + jitter * rng.standard_normal()) for a in labels[:-1]]
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    angle = 0.004 * arc if curve else 0 * arc
    return np.stack([np.zeros_like(arc), 20 * np.sin(angle), -arc], axis=1) + [10.0, -30.0, 200.0]


def flat(n):
    return np.zeros((n, K))


def net_says(labels, strength=2.0, shift=0):
    """Emissions from a 'network' that favours each true label moved by ``shift`` levels."""
    e = flat(len(labels))
    for i, lab in enumerate(labels):
        k = min(max(P._INDEX[lab] + shift, 0), K - 1)
        e[i, k] = strength
    return e


def ribs(labels):
    return np.array([0.95 if lab in P.THORACIC else 0.05 for lab in labels])


def sacrum(labels):
    return np.array([0.95 if lab == 26 else 0.05 for lab in labels])


def run(labels, **kw):
    pos = kw.pop("pos", None)
    if pos is None:
        pos = spine(labels)
    e = kw.pop("emis", None)
    if e is None:
        e = flat(len(labels))
    kw.setdefault("sacrum_prob", sacrum(labels))
    return P.label_chain(pos, e, **kw)


# --------------------------------------------------------------------------- anchors
def test_ribs_and_sacrum_label_a_thoracolumbar_chain():
    labs = [16, 17, 18, 19, 20, 21, 22, 23, 24, 26]
    res = run(labs, rib_prob=ribs(labs))
    assert res.labels == labs
    assert res.variants == [] and res.missing == []
    assert res.confidence.min() > 0.7


def test_sacrum_alone_numbers_a_lumbar_scan_from_below():
    labs = [20, 21, 22, 23, 24, 26]
    res = run(labs)
    assert res.labels == labs


def test_prior_corrects_a_network_shifted_by_one_level():
    labs = [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 26]
    e = net_says(labs, strength=1.0, shift=1)
    res = run(labs, emis=e, rib_prob=ribs(labs))
    assert res.labels == labs


def test_without_anchors_the_network_decides_but_confidence_is_lower():
    labs = [12, 13, 14, 15, 16]
    res_weak = run(labs, emis=net_says(labs, strength=0.3))
    assert res_weak.labels == labs
    res_strong = run(labs, emis=net_says(labs, strength=4.0))
    assert res_strong.confidence.mean() > res_weak.confidence.mean()


def test_global_optimum_beats_greedy_picking():
    # Greedy argmax would give two candidates the same label; the chain cannot.
    labs = [20, 21, 22, 23, 24, 26]
    e = net_says(labs, strength=2.0)
    e[2] = 0.0
    e[2, P._INDEX[21]] = 2.5  # the network wrongly prefers L2 for the L3 candidate
    res = run(labs, emis=e)
    assert res.labels == labs
    assert len(set(res.labels)) == len(res.labels)


# --------------------------------------------------------------------------- variants
def test_six_lumbar_vertebrae_between_the_last_rib_and_the_sacrum_is_l6():
    labs = [17, 18, 19, 20, 21, 22, 23, 24, 25, 26]
    pos = spine([17, 18, 19, 20, 21, 22, 23, 24, 24, 24])
    res = run(labs, pos=pos, rib_prob=ribs(labs))
    assert res.labels == labs
    assert res.variants == ["L6"]


def test_four_lumbar_vertebrae_is_l4():
    labs = [17, 18, 19, 20, 21, 22, 23, 26]
    res = run(labs, rib_prob=ribs(labs))
    assert res.labels == labs
    assert res.variants == ["L4"]


def test_thirteen_rib_bearing_vertebrae_below_c7_is_t13():
    labs = [5, 6, 7] + list(range(8, 20)) + [28, 20, 21, 22, 23, 24, 26]
    pos = spine([5, 6, 7] + list(range(8, 20)) + [19, 20, 21, 22, 23, 24, 26])
    e = flat(len(labs))
    e[0, P._INDEX[5]] = 3.0  # the neck is recognisable
    res = run(labs, pos=pos, emis=e, rib_prob=ribs(labs))
    assert res.labels == labs
    assert res.variants == ["T13"]


def test_eleven_rib_bearing_vertebrae_below_c7_is_t11():
    labs = [5, 6, 7] + list(range(8, 19)) + [20, 21, 22, 23, 24, 26]
    e = flat(len(labs))
    e[0, P._INDEX[5]] = 3.0
    res = run(labs, emis=e, rib_prob=ribs(labs))
    assert res.labels == labs
    assert res.variants == ["T11"]


def test_without_the_top_of_the_thoracic_spine_twelve_thoracic_are_assumed():
    # The VerSe rule: T1 out of view -> the last rib-bearing vertebra is T12.
    labs = [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 26]
    res = run(labs, rib_prob=ribs(labs))
    assert 28 not in res.labels and "T11" not in res.variants


# --------------------------------------------------------------------------- gaps and errors
def test_a_missing_level_is_bridged_by_the_distance_model():
    full = [19, 20, 21, 22, 23, 24, 26]
    pos = spine(full)
    keep = [0, 1, 2, 4, 5, 6]  # L3 not detected
    labs = [full[i] for i in keep]
    res = run(labs, pos=pos[keep], rib_prob=ribs(labs))
    assert res.labels == labs
    assert res.missing == [22]


def test_a_false_candidate_is_dropped():
    labs = [19, 20, 21, 22, 23, 24, 26]
    pos = spine(labs)
    extra = (pos[2] + pos[3]) / 2 + [0, 3, 0]
    pos2 = np.vstack([pos[:3], extra, pos[3:]])
    labs2 = labs[:3] + [None] + labs[3:]
    exist = np.log(np.array([0.95] * 3 + [0.3] + [0.95] * 4))
    rib = np.array([0.95, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])
    sac = np.array([0.05] * 7 + [0.95])
    res = P.label_chain(pos2, flat(8), exist_logp=exist, rib_prob=rib, sacrum_prob=sac)
    assert res.labels == labs2


def test_a_small_patient_is_handled_by_the_scale_factor():
    labs = [18, 19, 20, 21, 22, 23, 24, 26]
    res = run(labs, pos=spine(labs, scale=0.75), rib_prob=ribs(labs))
    assert res.labels == labs
    assert res.scale < 0.9


def test_input_order_is_kept():
    labs = [20, 21, 22, 23, 24, 26]
    pos = spine(labs)
    perm = np.array([3, 0, 5, 1, 4, 2])
    e = flat(6)
    res = P.label_chain(pos[perm], e, sacrum_prob=sacrum(labs)[perm])
    assert res.labels == [labs[i] for i in perm]


def test_empty_chain():
    res = P.label_chain(np.zeros((0, 3)), np.zeros((0, K)))
    assert res.labels == []


# --------------------------------------------------------------------------- user fixes
def test_fixing_one_label_relabels_the_whole_chain():
    # A deliberately mislabelled mid-thoracic scan: the network is off by two levels
    # and nothing else anchors the numbering; the user fixes a single vertebra.
    labs = list(range(10, 18))
    e = net_says(labs, strength=2.0, shift=2)
    wrong = P.label_chain(spine(labs), e, rib_prob=ribs(labs))
    assert wrong.labels != labs
    fixed = P.label_chain(spine(labs), e, rib_prob=ribs(labs), fixed={4: labs[4]})
    assert fixed.labels == labs
    assert fixed.confidence[4] == pytest.approx(1.0)


def test_a_fix_can_impose_a_variant():
    labs = [17, 18, 19, 20, 21, 22, 23, 24, 26]
    res = run(labs, rib_prob=ribs(labs), fixed={2: 28})
    assert res.labels[2] == 28
    assert "T13" in res.variants
    assert res.labels[3:] == [20, 21, 22, 23, 24, 26]


def test_fixes_that_contradict_each_other_fail():
    labs = [20, 21, 22]
    with pytest.raises(ValueError):
        run(labs, fixed={0: 22, 2: 20})


def test_an_unknown_fixed_label_fails():
    with pytest.raises(ValueError):
        run([20, 21], fixed={0: 27})


# --------------------------------------------------------------------------- property
@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 18), length=st.integers(4, 10), scale=st.floats(0.8, 1.2),
       seed=st.integers(0, 1000))
def test_any_window_of_a_normal_spine_with_fair_evidence_is_labelled_exactly(start, length, scale, seed):
    labs = NORMAL[start:start + length]
    if len(labs) < 3:
        return
    e = net_says(labs, strength=1.5)
    pos = spine(labs, scale=scale, jitter=0.05, seed=seed)
    res = P.label_chain(pos, e, rib_prob=ribs(labs), sacrum_prob=sacrum(labs))
    assert res.labels == labs


def test_labels_are_in_anatomical_order():
    labs = [7, 8, 9, 10]
    res = run(labs, emis=net_says(labs), rib_prob=ribs(labs))
    ranks = [L.rank(x) for x in res.labels]
    assert ranks == sorted(ranks)


# --------------------------------------------------------------------------- ribs seen on the CT
def test_last_rib_evidence_keeps_the_end_of_the_rib_cage():
    pos = spine(list(range(8, 20)) + [20, 21, 22, 23, 24])  # T1..T12, L1..L5
    found = np.array([0.92] * 12 + [0.08, 0.08, 0.92, 0.92, 0.08])  # long L3/L4 processes look like ribs
    found[9] = 0.08  # a rib missed inside the cage
    out = P.last_rib_evidence(pos, found)
    assert np.all(out[:7] == 0.5)  # the upper cage is left to the network
    assert out[9] == 0.5 and np.all(out[[7, 8, 10, 11]] == 0.85)
    assert np.all(out[[12, 13, 16]] == 0.15) and np.all(out[[14, 15]] == 0.5)
    # order of the input does not matter
    perm = np.random.default_rng(0).permutation(len(pos))
    assert np.allclose(P.last_rib_evidence(pos[perm], found[perm]), out[perm])


def test_last_rib_evidence_without_ribs_or_view():
    pos = spine([20, 21, 22, 23, 24])
    assert np.all(P.last_rib_evidence(pos, np.full(5, 0.08)) == 0.15)
    assert np.all(P.last_rib_evidence(pos, np.full(5, 0.5)) == 0.5)
    lone = np.array([0.92, 0.08, 0.08, 0.08, 0.08])  # one rib alone is no cage
    assert np.all(P.last_rib_evidence(pos, lone)[1:] == 0.15) and P.last_rib_evidence(pos, lone)[0] == 0.5


def test_a_network_that_says_t13_is_not_enough():
    """verse014-like: four lumbar vertebrae, the network's label channels one level off
    (it calls the first one T13) and no rib in view: the normal count wins."""
    labs = [20, 21, 22, 23]
    e = net_says(labs, strength=2.0, shift=-1)  # T13, L1, L2, L3
    res = run(labs, emis=e, rib_prob=np.full(4, 0.3), sacrum_prob=np.full(4, 0.05))
    assert 28 not in res.labels and res.variants == []
    # a whole spine with a 13th rib-bearing vertebra: counted from C1 and anchored by ribs, T13 is found
    labs2 = list(range(1, 20)) + [28, 20, 21, 22, 23, 24, 26]
    res2 = run(labs2, emis=net_says(labs2, strength=1.0), rib_prob=ribs(labs2))
    assert res2.labels == labs2 and res2.variants == ["T13"]


def test_l6_needs_the_sacrum_below_it():
    labs = [19, 20, 21, 22, 23, 24, 25]  # the chain ends at the sixth lumbar vertebra, no sacrum in view
    e = net_says(labs, strength=1.5)
    res = run(labs, emis=e, rib_prob=ribs(labs), sacrum_prob=np.full(len(labs), 0.05))
    assert 25 not in res.labels
    labs2 = labs + [26]
    res2 = run(labs2, emis=net_says(labs2, strength=1.5), rib_prob=ribs(labs2))
    assert res2.labels == labs2 and res2.variants == ["L6"]


def test_a_peak_off_the_spine_is_no_next_vertebra():
    """Two peaks per level (the body and, 30 mm behind it, the posterior elements): the
    chain follows the bodies and never zig-zags between the two lines."""
    labs = [20, 21, 22, 23, 24, 26]
    pos = spine(labs)
    behind = pos + [0.0, -30.0, 0.0]
    both = np.vstack([pos, behind])
    e = np.vstack([net_says(labs), flat(len(labs))])
    res = P.label_chain(both, e, exist_logp=np.log(np.full(len(both), 0.85)),
                        sacrum_prob=np.concatenate([sacrum(labs), np.full(len(labs), 0.05)]))
    assert res.labels[:len(labs)] == labs
    assert all(lab is None for lab in res.labels[len(labs):])


# --------------------------------------------------------------------------- the sacrum's level
def test_a_sacrum_level_below_the_chain_makes_its_last_vertebra_l5():
    labs = [20, 21, 22, 23, 24]
    pos = spine(labs + [26])
    s1 = pos[-1]
    pos = pos[:-1]
    e = net_says(labs, strength=1.0, shift=-1)  # a network shifted up by one level (T12..L4)
    no_level = run(labs, pos=pos, emis=e, sacrum_prob=np.full(5, 0.05))
    assert no_level.labels == [19, 20, 21, 22, 23]
    # the sacrum's top seen 10-20 mm below the last body centroid (a tilted sacrum on a real scan)
    for gap in (10.0, 15.0, 22.0):
        res = run(labs, pos=pos, emis=e, sacrum_prob=np.full(5, 0.05), sacrum_level=pos[-1, 2] - gap)
        assert res.labels == labs, gap
    assert s1[2] < pos[-1, 2]


def test_a_vertebra_sized_gap_above_the_sacrum_level_is_a_missed_l5():
    full = [19, 20, 21, 22, 23, 24, 26]
    pos = spine(full)
    keep = [0, 1, 2, 3, 4]  # T12..L4 detected, L5 missed, the sacrum seen as a level only
    e = net_says([full[i] for i in keep], strength=0.3)
    level = pos[5, 2] - 15.0
    res = run([full[i] for i in keep], pos=pos[keep], emis=e, sacrum_prob=np.full(5, 0.05),
              rib_prob=ribs([full[i] for i in keep]), sacrum_level=level)
    assert res.labels == [19, 20, 21, 22, 23]


def test_without_a_sacrum_level_the_end_of_the_chain_is_free():
    labs = [14, 15, 16, 17, 18]
    base = run(labs, emis=net_says(labs, strength=1.0))
    assert base.labels == labs


def test_an_s1_point_on_the_tilted_sacrum_still_follows_l5():
    # on a real scan the S1 point marks the top of the sacrum: 10-15 mm under L5 and 30 mm in front
    labs = [20, 21, 22, 23, 24]
    pos = spine(labs + [26])
    pos[-1] = pos[-2] + [0.0, 30.0, -12.0]
    e = np.vstack([net_says(labs, strength=2.0, shift=-1), flat(1)])
    res = run(labs + [26], pos=pos, emis=e)
    assert res.labels == labs + [26]
