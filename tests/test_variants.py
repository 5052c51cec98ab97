"""verse rate-variants: hand-built phantoms with known ribs and Castellvi grades, real masks,
orientation invariance, dataset mode and bad inputs."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from verse_cli.core import geometry
from verse_cli.core.io import save_ct, save_mask
from verse_cli.variants import rate_variants

# --------------------------------------------------------------------------- phantom
SPACING = (1.2, 1.2, 1.5)  # anisotropic on purpose; coarse enough to keep the tests fast


def _capsule(shape, sp, p0, p1, r):
    """Voxels within ``r`` mm of the segment p0-p1 (computed in its bounding box only)."""
    lo = np.maximum(np.floor((np.minimum(p0, p1) - r) / sp).astype(int) - 1, 0)
    hi = np.minimum(np.ceil((np.maximum(p0, p1) + r) / sp).astype(int) + 2, shape)
    g = np.indices(tuple(hi - lo)).transpose(1, 2, 3, 0) * sp + lo * sp
    d = p1 - p0
    t = np.clip(((g - p0) @ d) / (d @ d), 0, 1)
    out = np.zeros(shape, bool)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = ((g - (p0 + t[..., None] * d)) ** 2).sum(-1) <= r * r
    return out


def phantom(labels=(17, 18, 19, 20, 21), ribs=None, sacrum=True, sp=SPACING, width_mm=200,
            castellvi=("normal", "normal"), unlabel=(), seed=0):
    """A spine of box-and-cylinder vertebrae on an R, A, S grid (1 mm, 30 mm per level).

    ``ribs``: ``{label: (left_mm, right_mm)}``: straight capsule ribs of that centreline
    length (the rib length: joint to osseous tip along the centreline, as in the
    synthetic ground truth), starting beside the body (None: no rib).
    ``castellvi``: per side (left, right) for the last level above the sacrum:
    "normal", "tall" (22 mm transverse process), "pseudo" (1.5 mm from the sacrum)
    or "fused" (a bony bridge). ``unlabel``: labels drawn in the CT but not in the mask.
    """
    rng = np.random.default_rng(seed)
    sp = np.asarray(sp, float)
    order = list(labels) + ([26] if sacrum else [])
    zlen = 30 * len(order) + 20
    shape = tuple(round(float(v / s)) for v, s in zip((width_mm, 140, zlen), sp))
    g = np.indices(shape).transpose(1, 2, 3, 0) * sp
    ct = np.full(shape, -1000.0, np.float32)
    cx, cy = width_mm / 2, 70.0
    ct[((g[..., 0] - cx) / (width_mm / 2 - 5)) ** 2 + ((g[..., 1] - cy) / 65) ** 2 <= 1] = 40
    mask = np.zeros(shape, np.uint8)
    x, y, z = g[..., 0] - cx, g[..., 1] - cy, g[..., 2]
    for k, lab in enumerate(order):
        zc = zlen - 25 - 30 * k
        if lab == 26:
            v = ((x / 48) ** 2 + (y / 18) ** 2 <= 1) & (np.abs(z - zc) <= 10)
        else:
            body = (x ** 2 + (y - 10) ** 2 <= 15 ** 2) & (np.abs(z - zc) <= 10)
            arch = (np.abs(x) <= 12) & (y >= -25) & (y <= -3) & (np.abs(z - zc) <= 6)
            v = body | arch
            last = k == len(order) - 2 and sacrum
            for side, sgn in (("left", -1), ("right", 1)):
                kind = castellvi[0 if side == "left" else 1] if last else "normal"
                lat = (x * sgn >= 0) & (x * sgn <= 40)
                tp_lo, tp_hi = zc - 5, zc + 5
                if kind == "tall":
                    tp_lo, tp_hi = zc - 11, zc + 11
                elif kind == "pseudo":
                    tp_lo = zc - 30 + 10 + 2.5  # sacrum top at zc-20: a 1.5 mm cleft
                elif kind == "fused":
                    tp_lo = zc - 30 + 9
                elif kind == "near":  # a normal-sized (10 mm) process 1.5 mm above the sacrum
                    tp_lo, tp_hi = zc - 30 + 10 + 1.5, zc - 30 + 10 + 11.5
                v |= lat & (np.abs(y + 8) <= 4) & (z >= tp_lo) & (z <= tp_hi)
        ct[v] = 450
        if lab not in unlabel:
            mask[v & (mask == 0)] = lab
        for side, length in zip((-1, 1), (ribs or {}).get(lab, (None, None))):
            if not length:
                continue
            # the joint (rib head centre) 3 mm off the posterolateral body, as in the
            # synthetic ground truth; the rib runs laterally, forward and down
            p0 = np.array([cx + side * 17.0, cy + 4.0, zc + 3.0])
            d = np.array([side * 0.8, 0.55, -0.25])
            d /= np.linalg.norm(d)
            rib = _capsule(shape, sp, p0, p0 + d * length, 3.5) & ~v
            ct[rib] = 600
    ct += rng.normal(0, 20, shape).astype(np.float32)
    return ct, mask, np.diag([*sp, 1.0])


def _scan_from(ct, mask, aff, z_mm: float):
    """The phantom as a scan that starts ``z_mm`` above its foot end (the field of view cuts
    what lies below), with the affine moved to match."""
    keep = int(np.rint(z_mm / np.diag(aff)[2]))
    aff = aff.copy()
    aff[2, 3] = keep * aff[2, 2]
    return np.ascontiguousarray(ct[:, :, keep:]), np.ascontiguousarray(mask[:, :, keep:]), aff


def rate(ct, mask, affine, **kw):
    return rate_variants(nib.Nifti1Image(ct, affine), nib.Nifti1Image(mask, affine), **kw)


# --------------------------------------------------------------------------- ribs
@pytest.fixture(scope="module")
def rib_case():
    ribs = {17: (120, 130), 18: (50, 55), 19: (30, 45), 20: (20, None)}
    return phantom(ribs=ribs), ribs


def test_rib_lengths_sides_and_stumps(rib_case, rib_rating):
    _, ribs = rib_case
    r = rib_rating
    for lab, name in ((18, "T11"), (19, "T12"), (20, "L1")):
        for side, length in zip(("left", "right"), ribs[lab]):
            entry = r["ribs"][name]
            if length is None:
                assert entry[f"{side}_status"] == "absent"
            else:
                assert entry[f"{side}_status"] == "present", (name, side, entry)
                assert abs(entry[f"{side}_mm"] - length) <= 3.0, (name, side, entry)
    assert {(s["vertebra"], s["side"]) for s in r["stump_ribs"]} == {("T12", "left"), ("L1", "left")}
    evidence = r["evidence"]["ribs"]["T11"]["left"]
    assert evidence["voxels"] > 100 and evidence["centreline_mm"] > 40


def test_long_rib_cut_by_field_of_view_is_not_short(rib_rating):
    r = rib_rating
    t10 = r["ribs"]["T10"]
    assert t10["left_status"] == t10["right_status"] == "cut"
    assert t10["left_mm"] is None and t10["left_visible_mm"] >= 38


def test_cut_bone_running_along_the_spine_is_no_rib_in_view():
    """A rib cut by the field of view still runs away from the spine up to the cut; bone that
    runs along the column to the scan's edge (rib heads and necks joined up and down it,
    synth 89002: an 'L1 rib' of 277 mm ending 11 mm from a vertebra) tells no rib's length,
    and must not make L1 thoracic."""
    from verse_cli.ribs import Rib
    from verse_cli.variants import STUMP_MM, _rib_status

    _, frames = _c7_and_t1_frames()
    frame = frames[8]
    body = frame.body

    def cut_rib(length, tip_gap):
        return Rib(20, "left", length, 5000, True, length, -3.0, 2.0, joint_mm=list(body - [15.0, 0, 0]),
                   tip_mm=list(body - [40.0, 0, 0]), tip_gap_mm=tip_gap, radius_mm=5.0)

    assert _rib_status(cut_rib(277.0, 11.0), 20, frame, STUMP_MM, 1.0) == "undeterminable"
    assert _rib_status(cut_rib(90.0, 55.0), 20, frame, STUMP_MM, 1.0) == "cut"
    # what is left in view of a rib cut near its head is short and stays a cut rib
    assert _rib_status(cut_rib(25.0, 8.0), 20, frame, STUMP_MM, 1.0) == "cut"


def test_piece_rising_up_the_cage_from_the_lowest_vertebrae_is_no_rib_of_theirs():
    """T12, T13 and L1 ribs run down and out from their heads (synth X, Y and Z: far ends at
    most 24 mm above the joint); a piece at L1 whose end lies 81 mm higher is the cage above
    joined to it (synth 89118) and must not make L1 thoracic. Higher up, ribs may rise."""
    from verse_cli.ribs import Rib
    from verse_cli.variants import STUMP_MM, _rib_status

    _, frames = _c7_and_t1_frames()
    frame = frames[8]
    joint = frame.body - np.array([15.0, 0, 0])

    def rib(rise, cut=False):
        tip = joint + np.array([-60.0, 30.0, rise])
        return Rib(20, "left", 150.0, 5000, cut, 150.0, -3.0, 2.0, joint_mm=list(joint), tip_mm=list(tip),
                   tip_gap_mm=60.0, radius_mm=5.0)

    for lab in (19, 28, 20):  # T12, T13, L1
        assert _rib_status(rib(81.0, cut=True), lab, frame, STUMP_MM, 1.0) == "undeterminable"
        assert _rib_status(rib(81.0), lab, frame, STUMP_MM, 1.0) == "undeterminable"
        assert _rib_status(rib(-40.0, cut=True), lab, frame, STUMP_MM, 1.0) == "cut"
        assert _rib_status(rib(-40.0), lab, frame, STUMP_MM, 1.0) == "present"
    assert _rib_status(rib(30.0), 18, frame, STUMP_MM, 1.0) == "present"  # T11


def test_rib_rule_moves_t12_without_long_ribs_to_the_lumbar_count():
    ct, mask, aff = phantom(ribs={17: (70, 70), 18: (70, 70), 19: (20, 25)})
    r = rate(ct, mask, aff)
    assert r["counts"]["thoracic"] == 2 and r["counts"]["lumbar"] == 3
    assert any("T12" in w and "lumbar" in w for w in r["warnings"])
    assert {s["vertebra"] for s in r["stump_ribs"]} == {"T12"}


def test_a_thoracic_vertebra_without_ribs_above_one_with_ribs_is_not_lumbar():
    """The rib rule moves the last thoracic vertebrae to the lumbar count, never one above a
    vertebra with ribs: a T11 whose ribs were lost to T12's piece (synth 85025) stays
    thoracic, the lumbar count stays determinable, and a warning says no rib was found."""
    ct, mask, aff = phantom(labels=(17, 18, 19, 20, 21), ribs={17: (100, 100), 19: (90, 90)}, width_mm=240)
    r = rate(ct, mask, aff)
    assert r["ribs"]["T11"]["left_status"] == r["ribs"]["T11"]["right_status"] == "absent", r["ribs"]["T11"]
    assert r["evidence"]["enumeration"]["effective_regions"]["T11"] == "T"
    assert r["enumeration"]["lumbar"] == 2, r["enumeration"]
    assert any(w.startswith("T11") and "no rib" in w for w in r["warnings"]), r["warnings"]


def test_stump_threshold_is_configurable(rib_case):
    (ct, mask, aff), _ = rib_case
    r = rate(ct, mask, aff, stump_mm=25.0)
    assert {(s["vertebra"], s["side"]) for s in r["stump_ribs"]} == {("L1", "left")}


@pytest.fixture(scope="module")
def rib_rating(rib_case):
    (ct, mask, aff), _ = rib_case
    return rate(ct, mask, aff)


@pytest.mark.parametrize("codes", [("P", "I", "R"), ("S", "L", "A")])
def test_sides_and_lengths_do_not_depend_on_orientation(rib_case, rib_rating, codes):
    (ct, mask, aff), _ = rib_case
    ref = rib_rating
    ct2, aff2 = geometry.reorient(ct, aff, codes)
    mask2, _ = geometry.reorient(mask, aff, codes)
    r = rate(ct2, mask2, aff2)
    for name in ("T11", "T12", "L1"):
        for side in ("left", "right"):
            a, b = ref["ribs"][name][f"{side}_mm"], r["ribs"][name][f"{side}_mm"]
            assert (a is None) == (b is None)
            if a is not None:
                assert abs(a - b) < 1.0


# --------------------------------------------------------------------------- Castellvi
@pytest.mark.parametrize("sides, grades, combined", [
    (("normal", "normal"), (0, 0), "0/1"),
    (("tall", "normal"), (1, 0), "0/1"),
    (("pseudo", "normal"), (2, 0), "2a"),
    (("pseudo", "pseudo"), (2, 2), "2b"),
    (("fused", "normal"), (3, 0), "3a"),
    (("fused", "pseudo"), (3, 2), "4"),
])
def test_castellvi_labelled_vertebra(sides, grades, combined):
    ct, mask, aff = phantom(labels=(22, 23, 24), castellvi=sides)
    c = rate(ct, mask, aff)["castellvi"]
    assert (c["left"], c["right"], c["grade"]) == (*grades, combined)
    assert c["vertebra"] == "L5"


@pytest.mark.parametrize("sides, combined", [(("pseudo", "pseudo"), "2b"), (("tall", "pseudo"), "2a"),
                                             (("tall", "tall"), "0/1")])
def test_castellvi_pseudarthrosis_with_an_unlabelled_sacrum(sides, combined):
    """With the sacrum unlabelled, as in VerSe, the sacrum found below the last label lacks
    the bone within HALO_MM of it, so the labels' gap over a 1.5 mm cleft read several mm
    (synth 90054: 2b rated 0/1). The non-bone on the raw CT between process and ala is the
    cleft that grades; a tall process 9 mm clear of the ala stays grade I. The L5 label is
    drawn a voxel inside its bone, as segmentations are."""
    from scipy import ndimage

    ct, mask, aff = phantom(labels=(22, 23, 24), castellvi=sides, unlabel=(26,))
    mask[(mask == 24) & ~ndimage.binary_erosion(mask == 24)] = 0
    c = rate(ct, mask, aff)["castellvi"]
    assert c["vertebra"] == "L5" and c["grade"] == combined, c


def test_castellvi_side_cut_by_the_field_of_view_is_undeterminable():
    """A scan cropped close to the spine (verse014 is 80 mm wide) cuts the transverse process: what lies
    beyond the edge may be a taller process or a joint with the ala, so that side has no grade, and
    the combined grade none either; the side in view is still rated."""
    ct, mask, aff = phantom(labels=(22, 23, 24), castellvi=("pseudo", "pseudo"))
    xs = np.flatnonzero((mask == 24).any(axis=(1, 2)))
    keep = xs[0] + 4  # the first process's outer 4 voxels lie beyond the edge
    shifted = aff @ np.array([[1, 0, 0, keep], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    c = rate(np.ascontiguousarray(ct[keep:]), np.ascontiguousarray(mask[keep:]), shifted)["castellvi"]
    assert sorted([c["left"], c["right"]], key=str) == [2, None] and c["grade"] is None, c


@pytest.mark.parametrize("cut", [False, True])
def test_castellvi_without_ala_is_undeterminable_only_where_the_scan_cuts_the_sacrum(cut):
    """No ala beside the process: grade 0 where the sacrum is whole in the scan (a narrow sacrum), no grade
    where the scan ends in the sacrum's top (the ala may lie below the edge)."""
    ct, mask, aff = phantom(labels=(22, 23, 24))
    x = np.arange(ct.shape[0]) * SPACING[0] - 100.0
    lateral = (np.abs(x) > 15)[:, None, None] & (mask == 26)
    ct[lateral], mask[lateral] = 40.0, 0
    if cut:  # the scan starts 5 mm below the sacrum's top (at z = 35 mm)
        first = round(30.0 / SPACING[2])
        ct, mask = np.ascontiguousarray(ct[:, :, first:]), np.ascontiguousarray(mask[:, :, first:])
        aff = aff @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, first], [0, 0, 0, 1]], float)
    c = rate(ct, mask, aff)["castellvi"]
    assert (c["left"], c["right"], c["grade"]) == ((None, None, None) if cut else (0, 0, "0/1")), c


def test_castellvi_unlabelled_fused_vertebra():
    ct, mask, aff = phantom(labels=(22, 23, 24), castellvi=("fused", "fused"), unlabel=(24,))
    r = rate(ct, mask, aff)
    c = r["castellvi"]
    assert c["unlabelled_vertebra"] and c["vertebra"] == "L5"
    assert c["grade"] == "3b"
    assert r["counts"]["lumbar"] == 3


def test_castellvi_clear_side_beside_an_unlabelled_fused_vertebra():
    """Beside an unlabelled fused vertebra the vertebra and the sacrum are parted by a plane;
    sacral bone left above it touched the sacrum along the cut, so a clear side read as
    fused too (synth 90010, 90025: 3b instead of 3a). Raw-CT lines from the process down to
    the ala now tell a fusion from a process that stays clear; this phantom (a level cut)
    guards the fused and the clear side."""
    ct, mask, aff = phantom(labels=(22, 23, 24), castellvi=("fused", "normal"), unlabel=(24,))
    c = rate(ct, mask, aff)["castellvi"]
    assert c["unlabelled_vertebra"] and (c["left"], c["right"], c["grade"]) == (3, 0, "3a"), c


@pytest.mark.parametrize("gaps, grade", [([0.0, 4.0, 12.0], 3), ([11.0, 14.0, 30.0], 1), ([3.0, 14.0], 2)])
def test_castellvi_side_of_a_fused_vertebra_regraded_by_lines_to_the_ala(gaps, grade):
    """Bone running on into the ala on one line is a fusion; a process more than 10 mm
    above the ala on every line touches nothing (grade I when enlarged); in between, the
    grade from the closest contact stands."""
    from verse_cli.variants import _regraded_by_lines

    side = {"grade": 2, "transverse_process_height_mm": 25.0}
    assert _regraded_by_lines(side, gaps)["grade"] == grade


@pytest.mark.parametrize("height, fused_lines, grade", [(16.6, 5, 3), (12.4, 6, 0), (16.6, 1, 0)])
def test_a_short_process_fused_into_the_ala_on_several_lines_is_grade_3(height, fused_lines, grade):
    """Beside an unlabelled fused vertebra the process's height is taken above the plane
    that parted it from the sacrum, and a process merged into the ala measured 14-18.5 mm
    (synth 96056, 93025, 84010): under Castellvi I's 19 mm, so its fusion was graded 0.
    Bone running on into the ala at the closest point and on four lines or more, from a
    process of 14 mm or more, is III; a shorter process, or one line, stays as it was."""
    from verse_cli.variants import _regraded_by_lines

    side = {"grade": 0, "transverse_process_height_mm": height, "gap_to_sacrum_mm": 0.0, "valley_hu": 290.0,
            "cortex_peak_hu": 240.0, "fused_at_closest": True}
    gaps = [0.0] * fused_lines + [3.0] * 10
    assert _regraded_by_lines(side, gaps)["grade"] == grade
    # a gap at the closest point is no fusion there, however many lines run through bone
    assert _regraded_by_lines({**side, "gap_to_sacrum_mm": 2.0, "fused_at_closest": False}, gaps)["grade"] == 0


def _bridge_beside_a_process(bridge_hu: float | None):
    """A process (x 40-54 mm, z 52-70) above an ala (z 20-38) joined by ``bridge_hu`` bone
    between them (z 38-52; ``None``: soft tissue), with a bright pillar joining them medial
    of the band (x 14-18: the articular processes), measured with the disc's plane at z 45."""
    from verse_cli.variants import _box_coords, _bridge_to_ala

    sp, shape = np.ones(3), (70, 30, 80)
    coords = _box_coords(shape, sp, np.zeros(3))
    lat, ap, along = coords[..., 0], coords[..., 1] - 15.0, 45.0 - coords[..., 2]
    ct = np.full(shape, 40.0, np.float32)
    ct[40:55, 10:21, 52:70] = 450.0  # the process
    ct[40:55, 10:21, 20:38] = 450.0  # the ala
    if bridge_hu is not None:
        ct[40:55, 10:21, 38:52] = bridge_hu
    ct[14:19, 10:21, 20:70] = 900.0  # articular processes, bridged by the blur
    vert = np.zeros(shape, bool)
    vert[40:55, 10:21, 45:70] = True
    vert[14:19, 10:21, 45:70] = True
    return _bridge_to_ala(ct, sp, vert, ct >= 200.0, lat, along, ap, half_width=12.0, soft_hu=40.0)


@pytest.mark.parametrize("bridge_hu, low, high", [(450.0, 0.9, 1.1), (260.0, 0.45, 0.6), (None, -0.01, 0.01)])
def test_bridge_to_the_ala_is_as_bright_as_the_bone_that_joins_them(bridge_hu, low, high):
    """Fused bone joins process and ala as brightly as the process (ratio ~1), a cleft's
    partial volume only as brightly as itself (260 HU: ~0.54), soft tissue not at all; the
    articular processes medial of the band do not count, however bright."""
    out = _bridge_beside_a_process(bridge_hu)
    assert low <= out["bridge_ratio"] <= high, out


@pytest.mark.parametrize("grade, ratio, regraded", [(3, 0.6, 2), (3, 0.95, 3), (3, 0.2, 3), (2, 1.0, 3),
                                                    (2, 0.6, 2), (1, 1.0, 1)])
def test_side_of_a_fused_vertebra_regraded_by_the_bridge_to_the_ala(grade, ratio, regraded):
    """Beside a fused vertebra, a side read as fused but joined to its ala only through bone
    darker than itself is a pseudarthrosis (over 187 synth cases 53 of 66 pseudarthroses
    read III); one read II but joined as brightly as bone is fused; a faint or absent
    bridge, which the band can miss, changes nothing."""
    from verse_cli.variants import _regraded_by_bridge

    assert _regraded_by_bridge({"grade": grade, "bridge_ratio": ratio})["grade"] == regraded


def _process_above_an_ala(cleft_mm: int) -> dict:
    """A process (x 40-54 mm) ``cleft_mm`` of soft tissue above an ala whose top (z 47) rises
    2 mm above the plane that parts the vertebra from the sacrum (z 45): that top lies in the
    vertebra's voxels, as the plane leaves it. Bone has a 700 HU shell round a mottled core,
    blurred as a scanner does."""
    from scipy import ndimage

    from verse_cli.variants import _box_coords, _bridge_to_ala

    sp, shape = np.ones(3), (70, 30, 80)
    coords = _box_coords(shape, sp, np.zeros(3))
    lat, ap, along = coords[..., 0], coords[..., 1] - 15.0, 45.0 - coords[..., 2]
    bone = np.zeros(shape, bool)
    bone[40:55, 10:21, 47 + cleft_mm : 70] = True  # the process
    bone[40:55, 10:21, 20:47] = True  # the ala
    core = ndimage.binary_erosion(bone, iterations=2)
    mottle = np.random.default_rng(0).normal(200.0, 120.0, shape)
    ct = np.where(core, mottle, np.where(bone, 700.0, 40.0))
    ct = ndimage.gaussian_filter(ct, 0.8).astype(np.float32)
    vert = np.zeros(shape, bool)
    vert[40:55, 10:21, 45:70] = True
    return _bridge_to_ala(ct, sp, vert, ct >= 200.0, lat, along, ap, half_width=12.0, soft_hu=40.0)


@pytest.mark.parametrize("cleft_mm, clear", [(0, False), (1, False), (2, False), (4, True), (6, True)])
def test_process_clear_of_the_ala_is_told_from_a_pseudarthrosis_beside_a_fused_vertebra(cleft_mm, clear):
    """The plane that parts a fused vertebra from the sacrum leaves the ala's top in the
    vertebra, so the labels touch whatever the cleft; the raw CT, parted along its darkest
    surface, still shows a process 4 mm or more from its ala as clear of it, and one 1-2 mm
    from it (a pseudarthrosis) or fused as touching, however mottled its core."""
    from verse_cli.variants import CLEAR_OF_ALA_MM

    out = _process_above_an_ala(cleft_mm)
    assert (out["process_to_ala_mm"] > CLEAR_OF_ALA_MM) == clear, out


@pytest.mark.parametrize("grade, ratio, height, regraded", [(2, 0.3, 30.0, 1), (3, 0.2, 30.0, 1), (3, 0.2, 12.0, 0),
                                                            (3, 1.0, 30.0, 3)])
def test_side_clear_of_its_ala_beside_a_fused_vertebra_is_no_pseudarthrosis(grade, ratio, height, regraded):
    """A side read II or III whose bone stays 4 mm from the ala's touches nothing: grade I
    when its process is enlarged, else none; bone as bright as the process still fuses."""
    from verse_cli.variants import _regraded_by_bridge

    side = {"grade": grade, "bridge_ratio": ratio, "process_to_ala_mm": 4.0, "transverse_process_height_mm": height}
    assert _regraded_by_bridge(side)["grade"] == regraded


@pytest.mark.parametrize("grade, ratio, to_ala, regraded", [(0, 1.0, 0.7, 3), (1, 0.9, 1.0, 3), (0, 0.6, 0.7, 0),
                                                            (0, 1.0, 4.0, 0)])
def test_short_process_bridged_to_its_ala_as_brightly_as_bone_is_fused(grade, ratio, to_ala, regraded):
    """The plane that parts a fused vertebra from the sacrum cuts off the part of a process
    merged into the ala, so a fused process can measure under 19 mm: touching its ala and
    joined to it through bone as bright as its own, it is fused all the same."""
    from verse_cli.variants import _regraded_by_bridge

    side = {"grade": grade, "bridge_ratio": ratio, "process_to_ala_mm": to_ala, "transverse_process_height_mm": 13.0}
    assert _regraded_by_bridge(side)["grade"] == regraded


def _lines_beside_a_process(process_bottom_z: int):
    """Raw-CT lines down from a transverse process (x 56-69 mm, to ``process_bottom_z``) into
    an ala (z 30-45, the sacrum's top at z 45) with other bone below it (z 20-23, an ilium)."""
    from verse_cli.ribs import Frame
    from verse_cli.variants import _box_coords, _lines_to_the_ala

    sp, shape = np.ones(3), (80, 30, 80)
    ct = np.full(shape, 40.0, np.float32)
    ct[56:70, 10:21, process_bottom_z:66] = 1000.0  # the process
    ct[56:70, 10:21, 30:46] = 1000.0  # the ala
    ct[56:70, 10:21, 20:24] = 1000.0  # bone below the ala, parted from it by 6 mm
    centre = np.array([40.0, 15.0, 60.0])
    fr = Frame(label=24, centre=centre, body=centre, right=np.array([1.0, 0, 0]), anterior=np.array([0, 1.0, 0]),
               superior=np.array([0, 0, 1.0]), voxels=1, half_width=10.0)
    rel = _box_coords(shape, sp, np.zeros(3)) - centre
    lat, ap, t = rel @ fr.right, rel @ fr.anterior, rel @ fr.superior
    vert = np.zeros(shape, bool)
    vert[56:70, 10:21, 50:66] = True
    return _lines_to_the_ala(ct, np.zeros(3), sp, centre, fr, 1.0, 10.0, vert, lat, ap, t, -15.0, 200.0)


@pytest.mark.parametrize("process_bottom_z, narrowest", [(30, 0.0), (55, 9.0)])
def test_lines_to_the_ala_measure_the_cleft_under_the_process_not_bone_beyond_the_ala(process_bottom_z,
                                                                                        narrowest):
    """A line from a fused process runs through the ala and out of it, and may meet other bone
    farther down. The cleft is the first one under the process: measured to the last bone on
    the line, a fusion had a 6 mm 'gap' (synth 96011, 96040: fused sides read as clear)."""
    gaps = _lines_beside_a_process(process_bottom_z)
    assert gaps and min(gaps) == pytest.approx(narrowest, abs=1.0)


@pytest.mark.parametrize("bent, grade", [([0.0, 12.0], 2), ([4.0, 12.0], 2), ([11.0, 30.0], 1)])
def test_castellvi_side_clear_only_when_the_lines_bent_back_are_clear(bent, grade):
    """The fused vertebra sits in the lumbosacral bend, tilted back from the labelled one
    above: lines held to that vertebra's axis can pass beside the contact with the ala
    (synth 90011, 90057: fused and pseudarthrosis sides read clear). A side is clear only
    when the lines turned back with the bend are clear too; they never make a fusion."""
    from verse_cli.variants import _regraded_by_lines

    side = {"grade": 2, "transverse_process_height_mm": 25.0}
    assert _regraded_by_lines(side, [11.0, 14.0, 30.0], bent_gaps=bent)["grade"] == grade


def _shell_grid(top_mm: float, height_mm: float, start_z: float = 150.0):
    """A 1 mm grid with an unlabelled hollow body (a 2 mm cortical shell of 22 mm radius
    around the z axis, its cancellous bone below the threshold) whose top lies ``top_mm``
    under a start point at ``start_z``, looking down."""
    from verse_cli.variants import Grid

    shape = (80, 80, 160)
    x, y, z = np.indices(shape)
    r = np.hypot(x - 40.0, y - 40.0)
    top = start_z - top_mm
    inside = (r <= 22) & (z <= top) & (z >= top - height_mm)
    hollow = (r <= 20) & (z <= top - 2) & (z >= top - height_mm + 2)
    grid = Grid(mask=np.zeros(shape, np.uint8), ct=None, affine=np.eye(4), sp=np.ones(3), present=[])
    return grid, inside & ~hollow, np.array([40.0, 40.0, start_z]), np.array([0.0, 0.0, -1.0])


@pytest.mark.parametrize("top_mm, height_mm, start_z, found", [
    (8.0, 60.0, 150.0, True),   # a hollow sacrum under a normal disc
    (30.0, 60.0, 150.0, False),  # bone first met farther below than a disc's height: not the sacrum
    (8.0, 10.0, 150.0, False),  # shorter than a vertebral body
    (8.0, 60.0, 40.0, False),   # cut by the scan's edge 32 mm under its top: a cut vertebra as much
])
def test_sacrum_found_by_its_shell_under_the_last_body(top_mm, height_mm, start_z, found):
    """Where the walk meets no body under the last label (osteoporotic cancellous bone below
    the bone threshold: a body is only its cortical shell, synth 90024: 2b rated nothing),
    the sacrum is the unlabelled bone joined to what lies under the body within a disc's
    height, running on for at least a body's height and not cut by the scan's edge before
    it ran longer than a body."""
    from verse_cli.variants import _sacrum_by_its_shell

    grid, free, start, down = _shell_grid(top_mm, height_mm, start_z)
    pts, ev = _sacrum_by_its_shell(grid, free, start, down, 20.0, {})
    assert (pts is not None) == found, ev
    if found:
        assert len(pts) == int(free.sum())


# --------------------------------------------------------------------------- real masks
def test_real_verse004_mask_alone_reports_five_lumbar(real_data, verse, tmp_path):
    out = tmp_path / "v.json"
    proc = verse("rate-variants", "--no-ct", real_data / "verse004" / "sub-verse004_seg-vert_msk.nii.gz",
                 "--ctd", real_data / "verse004" / "sub-verse004_seg-subreg_ctd.json", "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["counts"]["lumbar"] == 5 and r["enumeration"]["lumbar"] == 5
    assert r["field_of_view"]["first"] == "T9" and r["castellvi"] is None
    assert any("no CT" in n for n in r["notes"])


def test_real_verse014_reports_five_lumbar(real_data, verse):
    d = real_data / "verse014"
    proc = verse("rate-variants", d / "sub-verse014_ct.nii.gz", d / "sub-verse014_seg-vert_msk.nii.gz",
                 "--ctd", d / "sub-verse014_seg-vb_ctd.json", "-q")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["counts"]["lumbar"] == 5 and r["enumeration"]["lumbar"] == 5
    assert r["enumeration"]["flags"] == []


# --------------------------------------------------------------------------- dataset mode
def test_dataset_mode_writes_table2_summary(tmp_path, verse):
    data = tmp_path / "data"
    cases = {"sub-a": ("pseudo", "pseudo"), "sub-b": ("normal", "normal")}
    for sub, sides in cases.items():
        ct, mask, aff = phantom(labels=(22, 23, 24), castellvi=sides, sp=(1.5, 1.5, 1.5))
        save_ct(ct, aff, data / sub / f"{sub}_ct.nii.gz")
        save_mask(mask, aff, data / sub / f"{sub}_seg-vert_msk.nii.gz")
    out, per_case = tmp_path / "summary.csv", tmp_path / "cases"
    proc = verse("rate-variants", data, "-o", out, "--out-dir", per_case)
    assert proc.returncode == 0, proc.stderr
    rows = {r["variant"]: r for r in csv.DictReader(out.open())}
    assert rows["Castellvi 2b"]["n"] == "1" and rows["Castellvi 0/1"]["n"] == "1"
    assert rows["Castellvi 2b"]["of"] == "2"
    assert "Castellvi 2b" in proc.stdout  # the rich table goes to stdout when the CSV is a file
    assert json.loads((per_case / "sub-a_variants.json").read_text())["castellvi"]["grade"] == "2b"


# --------------------------------------------------------------------------- bad inputs
def _small(tmp_path, shift=0.0, hu_offset=0.0, labels=True):
    ct = np.full((40, 40, 40), -1000.0, np.float32)
    ct[5:35, 5:35, 5:35] = 40
    mask = np.zeros(ct.shape, np.uint8)
    mask[15:25, 15:25, 15:25] = 20 if labels else 0
    ct[mask > 0] = 400
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    moved = aff.copy()
    moved[0, 3] = shift
    save_ct(ct + hu_offset, aff, tmp_path / "ct.nii.gz")
    save_mask(mask, moved, tmp_path / "msk.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "msk.nii.gz"


@pytest.mark.parametrize("kind, words", [
    ("grid", "differs from the CT grid"),
    ("empty", "no vertebra labels"),
    ("not_hu", "Hounsfield"),
])
def test_bad_inputs_exit_1_with_one_line_and_no_output(tmp_path, verse, kind, words):
    ct, msk = _small(tmp_path, shift=5.0 if kind == "grid" else 0.0,
                     hu_offset=1024.0 if kind == "not_hu" else 0.0, labels=kind != "empty")
    out = tmp_path / "out.json"
    proc = verse("rate-variants", ct, msk, "-o", out)
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- fixed bugs
def test_rib_length_on_a_coarse_anisotropic_grid():
    """A long oblique rib on 2 x 2 x 2.5 mm voxels: the voxel path's zig-zag and a radius
    added at a flat tip used to lengthen it by 5-15 mm."""
    ribs = {17: (100, 80), 18: (90, 60)}
    ct, mask, aff = phantom(ribs=ribs, sp=(2.0, 2.0, 2.5), width_mm=300)
    r = rate(ct, mask, aff)
    for lab, name in ((17, "T10"), (18, "T11")):
        for side, length in zip(("left", "right"), ribs[lab]):
            entry = r["ribs"][name]
            assert entry[f"{side}_status"] == "present", (name, side, entry)
            assert abs(entry[f"{side}_mm"] - length) <= 4.0, (name, side, entry)  # 2.5 mm voxels


def test_rib_tip_is_the_edge_of_bone_against_its_costal_cartilage():
    """Ribs 1-10 go on as costal cartilage (80-200 HU). A thin rib reads 250-350 HU on a
    blurred CT, so the half-way level between it and soft tissue lies within the
    cartilage, and the tip was placed where the search ran out (ribs 1-10 measured
    1-2 mm long, up to 15 mm on 3 mm voxels); the edge is half-way to the cartilage."""
    ribs = {17: (100, 100), 18: (90, 90)}
    ct, mask, aff = phantom(ribs=ribs, sp=(1.5, 1.5, 2.0), width_mm=300)
    sp = np.array([1.5, 1.5, 2.0])
    rib = ct >= 525  # the phantom's ribs are 600 HU, its vertebrae 450 HU
    ct[rib] = 320 + (ct[rib] - 600)
    zlen = 30 * 6 + 20
    d = np.array([0.8, 0.55, -0.25])
    d /= np.linalg.norm(d)
    for k, lab in enumerate((17, 18)):
        zc = zlen - 25 - 30 * k
        for side, length in zip((-1, 1), ribs[lab]):
            p0 = np.array([150.0 + side * 17.0, 70.0 + 4.0, zc + 3.0])
            dd = d * np.array([side, 1, 1])
            tip = p0 + dd * (length + 3.5)  # the capsule's round end
            cart = _capsule(ct.shape, sp, tip, tip + dd * 40.0, 3.0) & ~rib & (mask == 0)
            ct[cart] = 190 + (ct[cart] - 40)
    r = rate(ct, mask, aff)
    for lab, name in ((17, "T10"), (18, "T11")):
        for side, length in zip(("left", "right"), ribs[lab]):
            entry = r["ribs"][name]
            assert entry[f"{side}_status"] == "present", (name, side, entry)
            assert abs(entry[f"{side}_mm"] - (length + 3.5)) <= 3.0, (name, side, entry)


def test_centreline_keeps_the_bend_at_the_tubercle():
    """Where the neck turns into the shaft (60-90 degrees at the tubercle) a Gaussian
    about a rib's radius wide along the skeleton path cut the bend, 2.5 mm at a right
    angle on 1 mm voxels; the centres of the rib's cross-sections keep it."""
    from verse_cli.ribs import arc_length, rib_centreline

    sp = np.array([1.0, 1.0, 1.0])
    g = np.indices((150, 150, 120)).reshape(3, -1).T * sp
    p0, knee = np.array([30.0, 20.0, 60.0]), np.array([30.0, 48.0, 60.0])
    shaft = np.array([1.0, 0.0, 0.0])

    def to_segment(q0, q1):
        d = q1 - q0
        t = np.clip((g - q0) @ d / (d @ d), 0, 1)
        return np.linalg.norm(g - q0 - np.outer(t, d), axis=1)

    bone = g[np.minimum(to_segment(p0, knee), to_segment(knee, knee + 100 * shaft)) <= 4.5]
    true = np.vstack([p0 + np.outer(np.arange(0.0, 28.0, 0.5), [0.0, 1.0, 0.0]),
                      knee + np.outer(np.arange(0.0, 100.1, 0.5), shaft)])
    vox = np.rint(true / sp)
    path = vox[np.r_[True, np.any(np.diff(vox, axis=0) != 0, axis=1)]] * sp  # the skeleton's voxels
    assert abs(arc_length(rib_centreline(path, bone, sp)) - 128.0) <= 1.0


def test_head_and_neck_without_shaft_is_not_a_stump_rib():
    """A short piece of bone beside a vertebra that runs along the spine (a rib head and
    neck whose shaft was lost, its tip back at the spine) is not a stump rib."""
    ct, mask, aff = phantom(ribs={17: (120, 120), 18: (120, 120)}, sp=(1.2, 1.2, 1.5))
    sp = np.array([1.2, 1.2, 1.5])
    zlen = 30 * 6 + 20
    zc = zlen - 25 - 30 * 2  # T12, the third level
    cx, cy = 100.0, 70.0
    # down the side of T12 and L1, 4 mm off their bodies: its tip stays next to the spine
    piece = _capsule(ct.shape, sp, np.array([cx - 21.0, cy + 10.0, zc + 6.0]),
                     np.array([cx - 21.0, cy + 10.0, zc - 16.0]), 3.0) & (mask == 0)
    ct[piece] = 600
    r = rate(ct, mask, aff)
    assert ("T12", "left") not in {(s["vertebra"], s["side"]) for s in r["stump_ribs"]}


def test_thin_speck_of_bone_beside_l1_is_not_a_stump_rib():
    """A thin sliver of bone where a rib would leave L1 (a few voxels: noise, a
    calcification) is not a stump rib; a real short rib beside it still is."""
    ct, mask, aff = phantom(ribs={17: (120, 120), 18: (120, 120), 19: (120, 120), 20: (20, None)})
    sp = np.asarray(SPACING)
    zlen = 30 * 6 + 20
    zc = zlen - 25 - 30 * 3  # L1, the fourth level
    p0 = np.array([100.0 + 17.0, 70.0 + 4.0, zc + 3.0])
    d = np.array([0.8, 0.55, -0.25])
    speck = _capsule(ct.shape, sp, p0, p0 + d / np.linalg.norm(d) * 14.0, 1.2) & (mask == 0)
    ct[speck] = 600
    r = rate(ct, mask, aff)
    stumps = {(s["vertebra"], s["side"]) for s in r["stump_ribs"]}
    assert ("L1", "right") not in stumps
    assert ("L1", "left") in stumps


def _stump_at(level: int, length: float, direction, radius: float, sp=SPACING, flat_end: bool = False):
    """T10-L2 with long ribs above ``level`` (0: T10) and one right rib of ``length`` mm there,
    leaving the body in ``direction``; the CT, the mask and the affine."""
    labels = (17, 18, 19, 20, 21)
    ct, mask, aff = phantom(labels=labels, ribs={lab: (100, 100) for lab in labels[:level]}, sp=sp, width_mm=240)
    sp = np.asarray(sp, float)
    zc = 30 * (len(labels) + 1) + 20 - 25 - 30 * level
    p0 = np.array([120.0 + 17.0, 70.0 + 4.0, zc + 3.0])
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    p1 = p0 + d * length
    rib = _capsule(ct.shape, sp, p0, p1, radius)
    if flat_end:  # cut square at both ends, as the synthetic stump ribs are
        g = np.indices(ct.shape).transpose(1, 2, 3, 0) * sp
        t = (g - p0) @ d
        rib &= (t >= 0) & (t <= length)
    ct[rib & (mask == 0)] = 600
    return ct, mask, aff


def test_a_stump_rib_hanging_down_towards_the_next_vertebra_is_a_stump():
    """A stump rib that runs down and out towards the next vertebra's transverse process
    ends nearer the spine than half its length (synth 85013, 85051: 0.40-0.47 of it): it
    is a stump rib, not a rib's head and neck that lost its shaft (those end at 0.25 of
    their length at most, see the test above)."""
    ct, mask, aff = _stump_at(2, 26.0, (0.8, 0.0, -0.55), 3.5)
    r = rate(ct, mask, aff)
    assert r["ribs"]["T12"]["right_status"] == "present", r["ribs"]["T12"]
    ev = r["evidence"]["ribs"]["T12"]["right"]
    assert ev["tip_to_vertebra_mm"] < 0.5 * ev["length_mm"], ev
    assert abs(r["ribs"]["T12"]["right_mm"] - 26.0) <= 4, r["ribs"]["T12"]
    assert ("T12", "right") in {(s["vertebra"], s["side"]) for s in r["stump_ribs"]}


def test_a_stump_rib_as_thick_as_it_is_long_is_measured_along_its_axis():
    """The skeleton of a stump rib 18 mm long and 10 mm thick, square-ended, on 1.6 mm
    voxels shrinks to a few voxels (synth 85036: 3.5 mm), and the stump was read as a speck.
    Its centreline is its principal axis."""
    ct, mask, aff = _stump_at(3, 18.0, (1.0, 0.2, -0.1), 5.0, sp=(1.6, 1.1, 1.1), flat_end=True)
    r = rate(ct, mask, aff)
    assert r["ribs"]["L1"]["right_status"] == "present", r["ribs"]["L1"]
    assert abs(r["ribs"]["L1"]["right_mm"] - 18.0) <= 4, r["ribs"]["L1"]
    assert r["evidence"]["ribs"]["L1"]["right"]["radius_mm"] < 6.5


def test_a_stump_rib_running_on_into_an_enhancing_organ_ends_where_its_bone_does():
    """Where a stump rib's tip lies against an enhancing organ, the organ's noisy edge
    above the bone threshold carried the rib's piece on (synth 82028: an L1 stump of
    20 mm measured 40.7 mm, its last 10 mm of centreline in a kidney at 150-280 HU): the
    tip is where the bone's own level falls, not the organ's."""
    ct, mask, aff = _stump_at(3, 20.0, (0.8, 0.55, -0.25), 3.5)
    sp = np.asarray(SPACING)
    zc = 30 * 6 + 20 - 25 - 30 * 3
    d = np.array([0.8, 0.55, -0.25]) / np.linalg.norm([0.8, 0.55, -0.25])
    tip = np.array([120.0 + 17.0, 70.0 + 4.0, zc + 3.0]) + d * 20.0
    # the organ's edge: a tube of the rib's width at 280 HU, 12 mm on from its tip
    edge = _capsule(ct.shape, sp, tip + d * 2.0, tip + d * 12.0, 3.5) & (mask == 0) & (ct < 500)
    ct[edge] = 280 + np.random.default_rng(2).normal(0, 20, int(edge.sum()))
    r = rate(ct, mask, aff)
    assert r["evidence"]["bone_threshold_hu"] < 270, r["evidence"]["bone_threshold_hu"]
    assert r["ribs"]["L1"]["right_status"] == "present", r["ribs"]["L1"]
    # the capsule's round end puts its osseous tip 3.5 mm past the 20 mm of its axis
    assert abs(r["ribs"]["L1"]["right_mm"] - 23.5) <= 3, r["ribs"]["L1"]


def test_body_centroid_behind_the_vertebra_is_replaced():
    """A centroid JSON whose body centroid sits behind the vertebra's centre of mass (on
    the spinous process, as synthetic C1-C7 were) must not turn the vertebra's frame."""
    from verse_cli.core.centroids import Centroids
    from verse_cli.variants import _prepare, vertebra_frames

    _ct, mask, aff = phantom(labels=(17, 18, 19), sacrum=False)
    img = nib.Nifti1Image(mask, aff)
    coms = {lab: np.argwhere(mask == lab).mean(axis=0) for lab in (17, 18, 19)}
    wrong = [coms[lab] + np.array([0.0, -15.0 / SPACING[1], 0.0]) for lab in (17, 18, 19)]  # 15 mm posterior
    ctd = Centroids([17, 18, 19], np.array(wrong), geometry.axcodes(aff))
    grid = _prepare(None, img, ctd, None, None)
    frames = vertebra_frames(grid, [17, 18, 19], ctd, img)
    for lab in (17, 18, 19):
        fr = frames[lab]
        assert float((fr.body - fr.centre) @ fr.anterior) > 3.0


def _process_and_ala(cleft_hu: float, sp=(1.7, 1.7, 1.7)):
    """An enlarged (24 mm) transverse process above a sacral ala, two voxels of ``cleft_hu``
    between them, lateral of a 15 mm half-wide body: the arguments of one side's grading."""
    from verse_cli.variants import _box_coords

    sp = np.asarray(sp, float)
    shape = (30, 12, 40)
    coords = _box_coords(shape, sp, np.zeros(3))
    lat, t = coords[..., 0], coords[..., 2] - 30.0
    ct = np.full(shape, 40.0, np.float32)
    tp = (lat >= 20) & (t >= 0) & (t < 24)
    ala = (lat >= 10) & (t < -2 * sp[2])
    cleft = (lat >= 20) & (t < 0) & (t >= -2 * sp[2])
    ct[tp | ala] = 450.0
    ct[cleft] = cleft_hu
    return tp, lat, t, ala, ct, coords, sp


@pytest.mark.parametrize("cleft_hu, grade", [(300.0, 2), (40.0, 1)])
def test_castellvi_cleft_narrower_than_the_voxels_is_a_pseudarthrosis(cleft_hu, grade):
    """Two voxels between process and ala (3.4 mm between voxel surfaces on a 1.7 mm grid):
    still bright (partial volume of a cleft thinner than a voxel) they are a pseudarthrosis
    (II); dark as soft tissue they are a real gap and the enlarged process is grade I."""
    from verse_cli.variants import _castellvi_side

    tp, lat, t, ala, ct, coords, sp = _process_and_ala(cleft_hu)
    side = _castellvi_side(tp, lat, t, ala, ct, 175.0, sp, coords, half_width=15.0, soft_hu=40.0)
    assert side["gap_to_sacrum_mm"] > 2.5
    assert side["grade"] == grade, side


@pytest.mark.parametrize("dark_voxels, grade", [(2, 2), (3, 1)])
def test_castellvi_cleft_widened_by_the_blur_is_still_a_pseudarthrosis(dark_voxels, grade):
    """The labels lie 5 mm apart, but the CT's bone comes closer: two dark voxels and one of
    partial volume (170 HU) between process and ala read 2.2 mm below the bone threshold on
    the profile, a ~1 mm cleft widened by the blur: II (synth pseudarthroses read up to
    3.2 mm; at 2.0 mm 24 of 146 were graded I). Three dark voxels (3.2 mm) are a gap: I."""
    from verse_cli.variants import _box_coords, _castellvi_side

    sp = np.ones(3)
    shape = (30, 12, 50)
    coords = _box_coords(shape, sp, np.zeros(3))
    lat, t = coords[..., 0], coords[..., 2] - 30.0
    ct = np.full(shape, 450.0, np.float32)
    ct[(lat < 10) | (t >= 24)] = 40.0
    tp = (lat >= 20) & (t >= 0) & (t < 24)
    ala = (lat >= 10) & (t <= -6)
    for k in range(1, dark_voxels + 1):
        ct[(lat >= 10) & (t == -k)] = 40.0
    ct[(lat >= 10) & (t == -(dark_voxels + 1))] = 170.0
    side = _castellvi_side(tp, lat, t, ala, ct, 175.0, sp, coords, half_width=15.0, soft_hu=40.0)
    assert side["gap_to_sacrum_mm"] > 2.5 and side["valley_hu"] < 100
    assert side["grade"] == grade, side


def test_normal_transverse_process_near_the_sacrum_is_not_castellvi_2():
    """Castellvi II and III need an enlarged (>= 19 mm) transverse process: a normal 10 mm
    process 1.5 mm from the sacrum is grade 0."""
    ct, mask, aff = phantom(labels=(22, 23, 24), castellvi=("near", "normal"))
    c = rate(ct, mask, aff)["castellvi"]
    assert (c["left"], c["right"], c["grade"]) == (0, 0, "0/1"), c


def test_cervical_rib_at_c7():
    ct, mask, aff = phantom(labels=(6, 7, 8, 9), ribs={7: (30, None), 8: (90, 90), 9: (120, 120)}, sacrum=False,
                            width_mm=260)
    r = rate(ct, mask, aff)
    assert r["cervical_ribs"]["left"] is True and r["cervical_ribs"]["right"] is False, r["ribs"]


def test_cervical_rib_measured_from_the_body_where_the_mask_covers_its_start():
    """A cervical rib runs from the C7 body along the transverse process, which the mask
    labels as C7, so the bone seen starts at the process's tip: synth cervical ribs came
    out about 20 mm short. Its start is followed back to the body."""
    labels, width, length = (6, 7, 8, 9), 260, 40.0
    ct, mask, aff = phantom(labels=labels, ribs={7: (length, None), 8: (90, 90), 9: (120, 120)}, sacrum=False,
                            width_mm=width)
    sp = np.asarray(SPACING)
    z7 = 30 * len(labels) + 20 - 25 - 30
    start = np.array([width / 2 - 17.0, 70.0 + 4.0, z7 + 3.0])
    d = np.array([-0.8, 0.55, -0.25])
    covered = _capsule(ct.shape, sp, start, start + d / np.linalg.norm(d) * 15.0, 3.5) & (ct > 300)
    mask[covered] = 7
    r = rate(ct, mask, aff)
    assert r["ribs"]["C7"]["left_status"] == "present", r["ribs"]["C7"]
    assert abs(r["ribs"]["C7"]["left_mm"] - length) <= 6, r["ribs"]["C7"]


def _c7_with_short_rib(length, covered_mm, speck=False):
    """C7 with a rib starting beside its body whose first ``covered_mm`` the mask labels as
    C7 (the transverse process's front, as in synth cases); ``speck``: instead of the rest
    of the rib, a 2 mm speck of bone beyond the label."""
    labels, width = (6, 7, 8, 9), 260
    ct, mask, aff = phantom(labels=labels, ribs={7: (None if speck else length, None), 8: (90, 90), 9: (120, 120)},
                            sacrum=False, width_mm=width)
    sp = np.asarray(SPACING)
    z7 = 30 * len(labels) + 20 - 25 - 30
    start = np.array([width / 2 - 17.0, 70.0 + 4.0, z7 + 3.0])
    d = np.array([-0.8, 0.55, -0.25])
    d /= np.linalg.norm(d)
    covered = _capsule(ct.shape, sp, start - 2 * d, start + d * covered_mm, 3.5)
    ct[covered] = 600
    mask[covered & (mask == 0)] = 7
    if speck:
        ct[_capsule(ct.shape, sp, start + d * (length - 1.5), start + d * (length - 0.5), 1.6) & (mask == 0)] = 600
    return ct, mask, aff


def test_short_cervical_rib_showing_only_beyond_the_process():
    """A short cervical rib (synth 90044 right, 23 mm; 90029, 28-29 mm) lies mostly under
    C7's label along the process: beyond the cut next to the label only a piece of
    150-250 mm3 shows, too small to skeletonise (lengths of -3 to 7 mm) and under the
    speck volume, so it was called absent. A piece of bone that size in front of the
    process, beside the body at C7's level, is the rib; its length runs from the body."""
    ct, mask, aff = _c7_with_short_rib(24.0, 16.0)
    r = rate(ct, mask, aff)
    assert r["cervical_ribs"]["left"] is True and r["cervical_ribs"]["right"] is False, r["ribs"]["C7"]
    assert abs(r["ribs"]["C7"]["left_mm"] - 24.0) <= 4, r["ribs"]["C7"]
    # a speck of a few voxels there is noise, not a rib
    ct, mask, aff = _c7_with_short_rib(24.0, 16.0, speck=True)
    r = rate(ct, mask, aff)
    assert r["cervical_ribs"]["left"] is False, r["ribs"]["C7"]


def test_rudimentary_cervical_rib_showing_a_few_voxels_beyond_the_process():
    """A cervical rib of 14-20 mm (synth 81050, 81059, 96020) ends about where C7's process
    does: beyond the label it shows as 17-160 voxels, 38-120 mm3, under the 120 mm3 the rule
    asked for. A ball of bone of 2 mm radius or more there, in 16 voxels or more, is
    the rib; the noise specks seen near C7 are 8-15 voxels."""
    ct, mask, aff = _c7_with_short_rib(15.0, 11.0)
    r = rate(ct, mask, aff)
    assert r["cervical_ribs"]["left"] is True and r["cervical_ribs"]["right"] is False, r["ribs"]["C7"]
    assert abs(r["ribs"]["C7"]["left_mm"] - 15.0) <= 4, r["ribs"]["C7"]


_C7_GRID_SHAPE = (120, 120, 120)


def _c7_and_t1_frames():
    """An empty 1 mm grid and the frames of C7 (body centroid at 60, 60, 80) and T1 (25 mm
    lower): R, A, S axes, bodies 12 mm in half width, centres of mass 10 mm behind them."""
    from verse_cli.ribs import Frame
    from verse_cli.variants import Grid

    ex, ey, ez = np.eye(3)

    def frame(lab, z):
        c = np.array([60.0, 50.0, z])
        return Frame(lab, c, c + 10 * ey, ex, ey, ez, 1000, 12.0)

    grid = Grid(np.zeros(_C7_GRID_SHAPE, np.uint8), None, np.eye(4), np.ones(3), [7, 8])
    return grid, {7: frame(7, 80.0), 8: frame(8, 55.0)}


def _cube(corner, n: int) -> np.ndarray:
    """Flat indices of an n x n x n voxel cube of the C7 grid from ``corner``."""
    g = np.indices((n, n, n)).reshape(3, -1).T + np.asarray(corner)
    return np.ravel_multi_index(tuple(g.T), _C7_GRID_SHAPE)


def test_cervical_rib_piece_beside_a_first_rib_touching_c7_stays_at_c7():
    """Synth 90029: the first rib's head touched only C7, so C7 got the first rib and,
    as a second piece, the cervical rib's end beyond the process; both moved to T1. The
    piece in front of the process at C7's level is C7's; a piece behind the body's
    centre (the first rib's neck) or at T1's level is not."""
    from verse_cli.variants import _cervical_ribs_beside_process

    grid, frames = _c7_and_t1_frames()

    def block(x, y, z):  # a 6 x 6 x 6 mm piece of bone at that corner
        return _cube((x, y, z), 6)

    first_rib = block(60 - 30, 50, 60)
    in_front = block(60 - 28, 62, 78)  # left of the body, 12 mm in front of the centre, C7's level
    behind = block(60 + 26, 52, 78)  # right, 8 mm behind the body's centre
    low = block(60 + 26, 62, 60)  # right, at T1's level
    ribs = {7: {"left_status": "present", "right_status": "present"}}
    found = _cervical_ribs_beside_process(grid, ribs, {(7, "left"): [first_rib, in_front],
                                                       (7, "right"): [first_rib, behind, low]}, frames)
    assert set(found) == {"left"}, found
    assert found["left"]["voxels"] == 216 and 17 <= found["left"]["length_mm"] <= 20, found  # body side to far corner


def _rib_from_c7_onto_the_left_first_rib(along_mm: float):
    """C6-T2 with first ribs of 90 mm, rated after bone is drawn from beside C7's body to the
    left first rib, meeting it ``along_mm`` from its head."""
    labels, width = (6, 7, 8, 9), 260
    ct, mask, aff = phantom(labels=labels, ribs={8: (90, 90), 9: (120, 120)}, sacrum=False, width_mm=width)
    sp = np.asarray(SPACING)
    zlen = 30 * len(labels) + 20
    cx, cy = width / 2, 70.0
    z7, z8 = zlen - 25 - 30 * 1, zlen - 25 - 30 * 2
    d = np.array([-0.8, 0.55, -0.25])
    d /= np.linalg.norm(d)
    meet = np.array([cx - 17.0, cy + 4.0, z8 + 3.0]) + d * along_mm
    start = np.array([cx - 17.0, cy + 4.0, z7 + 3.0])
    ct[_capsule(ct.shape, sp, start, meet, 3.5) & (mask == 0)] = 600
    return rate(ct, mask, aff)


def test_cervical_rib_joined_to_the_first_rib():
    """A cervical rib that meets the first rib makes one bone with it. In synth cases
    90014, 90035, 90044 and 90059 (cervical-rib misses) the heads lay so close that the
    bone went whole to T1; now the part away from the first rib's centreline that starts
    at C7 is the cervical rib. (This phantom's heads are farther apart, so it guards the
    joined case and the first rib's length rather than reproducing the merge.)"""
    r = _rib_from_c7_onto_the_left_first_rib(along_mm=35.0)
    assert r["cervical_ribs"]["left"] is True and r["cervical_ribs"]["right"] is False, r["ribs"]
    assert r["ribs"]["T1"]["left_status"] == "present" and r["ribs"]["T1"]["left_mm"] > 80, r["ribs"]["T1"]


def test_first_rib_bone_where_a_cervical_rib_joined_to_it_is_looked_for():
    """A cervical rib joined to the first rib is looked for on first ribs cut by the field
    of view or joined to the shoulder girdle too (synth 85020, 84035, 82020, 82035: cervical
    ribs of 43-64 mm read absent), but only in the piece the first rib's centreline runs
    through: T1's other pieces may be a whole rib of their own (synth 83005, 96020: the
    first rib beside a second rib whose head touched T1, read as a 'cervical rib'
    of 104-107 mm)."""
    from verse_cli.ribs import Rib
    from verse_cli.variants import _first_rib_bone

    def rib(length, gap=0.0, cut=False, radius=4.0):
        return Rib(8, "left", length, 100, cut, length, gap, 0.0, radius_mm=radius)

    pieces = [np.arange(10), np.arange(10, 15)]
    # measured whole, cut by the field of view, joined to the girdle (thicker than a rib: undeterminable)
    for status, first in (("present", rib(150.0)), ("cut", rib(150.0, cut=True)), ("undeterminable", rib(150.0, radius=9.0))):
        found = _first_rib_bone({(8, "left"): first}, {(8, "left"): pieces}, {}, "left")
        assert found is not None and len(found[0]) == 1 and found[0][0] is pieces[0], status
    assert _first_rib_bone({(8, "left"): rib(40.0, cut=True)}, {(8, "left"): pieces}, {},
                           "left") is None  # too little of it in view
    assert _first_rib_bone({(8, "left"): rib(150.0, gap=25.0)},
                           {(8, "left"): pieces}, {}, "left") is None  # it does not start at T1
    c7 = Rib(7, "left", 120.0, 100, True, 120.0, 0.0, 0.0)
    found = _first_rib_bone({(7, "left"): c7}, {}, {"left": pieces[1]}, "left")
    assert found is not None and found[0][0] is pieces[1] and found[1] is c7  # T1 left out of the mask


def test_bone_by_the_spine_off_a_first_rib_is_not_a_cervical_rib():
    """Bone at C7 that leaves the first rib's course but ends by the spine (the first
    rib's head and neck beside C7, a cut T1's process: synth 93020, 81005, 86031) is no
    cervical rib: a cervical rib runs out to the first rib, away from the spine."""
    r = _rib_from_c7_onto_the_left_first_rib(along_mm=4.0)  # by the first rib's head
    assert r["cervical_ribs"]["left"] is False, (r["ribs"], r["evidence"]["ribs"].get("C7"))
    assert r["ribs"]["T1"]["left_status"] == "present", r["ribs"]["T1"]


def test_cervical_rib_head_at_the_side_of_c7s_body():
    """A cervical rib's head shows as a piece of its own at the side of C7's body, behind
    its centre, once the cut around the labelled process parts it from the shaft (synth
    83014, 85044, 93035: rudimentary cervical ribs; 96029, 96035: long ones whose shaft
    went on into the first rib's bone). Bone in front of the body, far out beside the
    process, or at T1's level is not a head."""
    from verse_cli.variants import _cervical_rib_head

    grid, frames = _c7_and_t1_frames()

    def block(x, y, z, n=4):  # an n x n x n mm piece of bone centred there
        return _cube((x - n // 2, y - n // 2, z - n // 2), n)

    head = block(60 - 12, 54, 82)  # left, at the body's side, 6 mm behind its centre, at C7's level
    assert _cervical_rib_head(grid, [head], frames, "left")["voxels"] == 64
    assert _cervical_rib_head(grid, [block(60 + 12, 54, 82)], frames, "left") is None  # the other side
    for elsewhere in (block(60 - 12, 66, 82),  # in front of the body's centre
                      block(60 - 24, 54, 82),  # out beside the process
                      block(60 - 12, 54, 62),  # at T1's level: the first rib's head
                      block(60 - 12, 54, 82, n=2)):  # a speck
        assert _cervical_rib_head(grid, [elsewhere], frames, "left") is None


def test_first_rib_touching_only_c7_is_not_a_cervical_rib():
    """A first rib whose head touches only C7's label was read as a cervical rib, with T1
    left without a rib (synth cases 90016, 90030, 90046). T1 always has a rib: a lone
    'C7 rib' beside an absent T1 rib is the first rib; a C7 rib above a T1 rib stays."""
    from verse_cli.variants import _first_rib_from_c7

    ribs = {7: {"left_mm": 85.5, "left_status": "present", "right_mm": 30.0, "right_status": "present"},
            8: {"left_mm": None, "left_status": "absent", "right_mm": 110.0, "right_status": "present"}}
    evidence = {"C7": {"left": {"length_mm": 85.5}, "right": {"length_mm": 30.0}}}
    _first_rib_from_c7(ribs, evidence)
    assert ribs[8]["left_status"] == "present" and ribs[8]["left_mm"] == 85.5
    assert ribs[7]["left_status"] == "absent" and ribs[7]["left_mm"] is None
    assert ribs[7]["right_status"] == "present" and ribs[8]["right_mm"] == 110.0
    assert evidence["T1"]["left"]["length_mm"] == 85.5 and "left" not in evidence["C7"]


def test_short_c7_rib_beside_an_absent_t1_rib_stays_a_cervical_rib():
    """A whole C7 rib shorter than any first rib (60 mm) beside a T1 without a rib is a
    cervical rib whose first rib went into bone that starts away from T1's joint (synth
    88114: a 41 mm cervical rib read as T1's rib on 1.8 mm voxels); a cut one, whose
    length is unknown, is still the first rib."""
    from verse_cli.variants import _first_rib_from_c7

    ribs = {7: {"left_mm": 39.4, "left_status": "present", "right_mm": None, "right_status": "cut",
                "right_visible_mm": 45.0},
            8: {"left_mm": None, "left_status": "absent", "right_mm": None, "right_status": "absent"}}
    assert _first_rib_from_c7(ribs, {}) == ["right"]
    assert ribs[7]["left_status"] == "present" and ribs[7]["left_mm"] == 39.4
    assert ribs[8]["left_status"] == "absent" and ribs[8]["right_status"] == "cut"



def test_a_short_rib_above_a_vertebra_with_a_long_rib_is_no_stump():
    """Ribs shorten down to the last rib-bearing vertebra: a short piece above a vertebra
    with a long rib is what is left of a long rib whose shaft went to its neighbour's piece
    (synth 87002, 87003: false stumps at T11 and T10). A short rib at the last one stays a stump."""
    from verse_cli.variants import _short_rib_above_a_long_one, stump_ribs

    ribs = {18: {"left_mm": 12.5, "left_status": "present", "right_mm": 150.0, "right_status": "present"},
            19: {"left_mm": None, "left_status": "undeterminable", "right_mm": 148.0, "right_status": "present"},
            20: {"left_mm": 20.0, "left_status": "present", "right_mm": None, "right_status": "absent"}}
    evidence: dict = {}
    _short_rib_above_a_long_one(ribs, evidence, 38.0)
    assert ribs[18]["left_status"] == "undeterminable" and ribs[18]["left_visible_mm"] == 12.5
    assert evidence["T11"]["left"]["short_above_a_long_rib"] == "T12"
    assert ribs[18]["right_mm"] == 150.0
    assert stump_ribs(ribs, 38.0) == [{"vertebra": "L1", "side": "left", "length_mm": 20.0}]


def test_rib_at_l1_beside_a_t12_without_one_is_the_twelfth_rib():
    """The twelfth rib's head sits low on T12, by the T12/L1 disc, and its bone may touch only
    L1's label (synth 96018: T12's right rib read as L1's, L1 counted thoracic and the lumbar
    count one short). A rib at L1 comes below a rib of T12, never instead of it."""
    from verse_cli.variants import _last_rib_from_below

    ribs = {19: {"left_mm": 90.0, "left_status": "present", "right_mm": None, "right_status": "absent"},
            20: {"left_mm": 25.0, "left_status": "present", "right_mm": None, "right_status": "cut",
                 "right_visible_mm": 60.0}}
    evidence = {"L1": {"left": {"length_mm": 25.0}, "right": {"length_mm": 60.0}}}
    _last_rib_from_below(ribs, evidence)
    assert ribs[19]["right_status"] == "cut" and ribs[19]["right_visible_mm"] == 60.0
    assert ribs[20]["right_status"] == "absent" and "right_visible_mm" not in ribs[20]
    assert evidence["T12"]["right"]["length_mm"] == 60.0 and "right" not in evidence["L1"]
    # an L1 stump rib below a twelfth rib stays at L1
    assert ribs[20]["left_status"] == "present" and ribs[19]["left_mm"] == 90.0


def test_bone_starting_far_from_t1_is_no_first_rib(monkeypatch):
    """At the thoracic inlet the clavicle, scapula and humerus lie beside the first rib; a
    shoulder bone given to T1 (synth 96046: a 405 mm 'first rib' of radius 8 mm whose end
    lay 25 mm from T1) made a false cervical rib of the real first rib. Bone starting
    20 mm or more from T1 is no first rib. At any other level such a piece has lost its head
    (or is a neighbour's shaft passing the transverse process: synth 93001's T10 'rib' of
    260 mm, truly 163 mm): its length is undeterminable, not measured from a guessed joint."""
    from dataclasses import replace

    import verse_cli.variants as V

    real = V.measure_rib

    def far_from_its_vertebra(*args, **kw):
        return replace(real(*args, **kw), joint_gap_mm=25.0)

    monkeypatch.setattr(V, "measure_rib", far_from_its_vertebra)
    ct, mask, aff = phantom(labels=(7, 8, 9), ribs={8: (110, 110), 9: (80, 80)}, width_mm=300)
    r = rate(ct, mask, aff)
    assert r["ribs"]["T1"]["left_status"] == r["ribs"]["T1"]["right_status"] == "absent"
    t2 = r["ribs"]["T2"]
    assert t2["left_status"] == t2["right_status"] == "undeterminable", t2
    assert t2["left_visible_mm"] > 60


def test_long_c7_rib_beside_a_t1_speck_is_the_first_rib():
    """A first rib whose head went to C7 while a speck of it went to T1 (synth case 90059:
    'C7 ribs' of 100 mm, T1 pieces of 8-14 mm) is the first rib, and its bone
    moves with it so that a cervical rib joined to it can still be split off."""
    from verse_cli.variants import _first_rib_from_c7

    ribs = {7: {"left_mm": 100.8, "left_status": "present", "right_mm": 30.0, "right_status": "present"},
            8: {"left_mm": 8.2, "left_status": "present",
                "right_mm": None, "right_status": "undeterminable", "right_visible_mm": 14.1}}
    components = {(7, "left"): ["first rib"], (8, "left"): ["speck"], (7, "right"): ["c7"], (8, "right"): ["t1"]}
    measured = {(7, "left"): "first rib", (8, "left"): "speck"}
    _first_rib_from_c7(ribs, {}, components, measured)
    assert ribs[8]["left_status"] == "present" and ribs[8]["left_mm"] == 100.8
    assert ribs[7]["left_status"] == "absent"
    assert components[(8, "left")] == ["first rib"] and (7, "left") not in components
    assert measured[(8, "left")] == "first rib"
    # a C7 rib too short to be a first rib stays a cervical rib
    assert ribs[7]["right_status"] == "present" and ribs[8]["right_status"] == "undeterminable"
    # so does the first rib cut by the field of view, measured by what is in view
    ribs = {7: {"left_mm": None, "left_status": "cut", "left_visible_mm": 113.6},
            8: {"left_mm": None, "left_status": "undeterminable", "left_visible_mm": 31.4}}
    assert _first_rib_from_c7(ribs, {}) == ["left"]
    assert ribs[7]["left_status"] == "absent" and ribs[8]["left_status"] == "cut"
    assert ribs[8]["left_visible_mm"] == 113.6


def test_centreline_starts_at_the_rib_head_not_on_a_spur():
    """The skeleton around a rib head (with the shell given back next to the vertebra)
    may have a spur along the vertebra; the longest path then began at the spur's end
    and hooked back to the head, lengthening the rib (synth T11/T12 ribs by 5-15 mm)."""
    from verse_cli.ribs import _trim_head_spur

    sp = np.array([1.0, 1.0, 1.0])
    body = np.array([0.0, 0.0, 0.0])
    spur = np.array([[16, 0, -12 + k] for k in range(12)])  # along the body's side, up to the head
    rib = np.array([[16 + k, 0, 0] for k in range(60)])  # the head, then away from the spine
    nodes = np.vstack([spur, rib])
    path = np.arange(len(nodes))
    kept = _trim_head_spur(path, nodes, np.zeros(3, int), sp, body)
    assert nodes[kept[0]].tolist() == [16, 0, 0] and kept[-1] == path[-1]


# --------------------------------------------------------------------------- synthetic ground truth (fixed bugs)
def _gt(counts, ribs, in_fov=None, stumps=()):
    from verse_cli.synth.variants import level_names, variants_json

    order = [n for n, _, _ in level_names(counts)]
    spec = {"counts": counts, "cervical_ribs": {}, "stumps": list(stumps), "castellvi": {"left": 0, "right": 0}}
    in_fov = in_fov or {n: "visible" for n in order}
    full = {n: {"left": (120.0, "present"), "right": (120.0, "present")} for n in order if n.startswith("T")}
    full.update(ribs)
    return variants_json(spec, order, in_fov, full, None)


def test_gt_double_stump_at_last_thoracic_counts_as_lumbar():
    """The paper: a vertebra whose ribs are both < 38 mm is lumbar (transitional). The GT
    used to count it thoracic."""
    counts = {"cervical": 7, "thoracic": 12, "lumbar": 5}
    stumps = [{"where": "last_thoracic", "side": s, "vertebra": "T12", "length_mm": 20.0} for s in ("left", "right")]
    gt = _gt(counts, {"T12": {"left": (20.0, "present"), "right": (25.0, "present")}}, stumps=stumps)
    assert gt["enumeration"]["thoracic"] == 11 and gt["enumeration"]["lumbar"] == 6
    assert set(gt["enumeration"]["flags"]) == {"T11", "L6"}
    assert gt["transitional_thoracolumbar"] == ["T12"]
    assert gt["counts"]["thoracic"] == 12  # the generated levels, named as in the mask
    one = _gt(counts, {"T12": {"left": (20.0, "present"), "right": (90.0, "present")}})
    assert one["enumeration"]["thoracic"] == 12 and one["enumeration"]["lumbar"] == 5


def test_gt_boundary_needs_a_rib_of_the_last_thoracic_in_view():
    """A sliver of T12 at the image edge with none of its ribs in view cannot place the
    thoracolumbar boundary: the lumbar count is undeterminable."""
    counts = {"cervical": 7, "thoracic": 12, "lumbar": 5}
    in_fov = {"T12": "cut", "L1": "cut", "L2": "visible", "L3": "visible", "L4": "visible", "L5": "visible",
              "S1": "cut"}
    away = {"T12": {"left": (90.0, "not_in_view"), "right": (90.0, "not_in_view")}}
    assert _gt(counts, away, in_fov)["enumeration"]["lumbar"] is None
    seen = {"T12": {"left": (90.0, "cut"), "right": (90.0, "not_in_view")}}
    assert _gt(counts, seen, in_fov)["enumeration"]["lumbar"] == 5


def test_gt_rib_wholly_outside_the_image_is_not_in_view():
    """A rib with no point inside the image was listed as "cut"."""
    from types import SimpleNamespace

    from verse_cli.synth.case import _rib_states

    grid = SimpleNamespace(affine=np.eye(4), shape=(50, 50, 50))

    def rib(points):
        return SimpleNamespace(points=np.array(points, float), radius=4.0, length=50.0, vid=19, side="left")

    states = _rib_states([rib([[10, 10, 10], [10, 30, 20]]), rib([[10, 10, 45], [10, 40, 60]]),
                          rib([[10, 10, 80], [10, 40, 90]])], [], grid)
    assert states["T12"]["left"][1] == "not_in_view"
    states = {r: _rib_states([rib(p)], [], grid)["T12"]["left"][1] for r, p in (
        ("in", [[10, 10, 10], [10, 30, 20]]), ("cut", [[10, 10, 45], [10, 40, 60]]))}
    assert states == {"in": "present", "cut": "cut"}


def test_synth_castellvi_grade_1_process_stays_clear_of_the_ala():
    """The generator's grade-1 (enlarged) transverse process touched or fused with the
    sacral ala, so the image showed grade II/III while the ground truth said I. It is
    now kept at least ~4 mm away (the sdf gap measured before the last correction)."""
    from verse_cli.synth import generate_case

    case = generate_case(90007, region="lumbar", variant="castellvi_1", scale=0.25)
    sides = case.variants["castellvi"]
    gaps = case.meta["castellvi_gap_mm"]
    graded = [s for s in ("left", "right") if sides[s] == 1]
    assert graded and all(gaps[s] >= 2.5 for s in graded), (sides, gaps)


def _hang_process(ct, mask, aff, lab, zc, drop_mm):
    """A posterior process of label ``lab`` (centre height ``zc``) reaching ``drop_mm``
    below the centre, behind the disc (as L4's inferior articular processes do)."""
    sp = np.diag(aff)[:3]
    g = np.indices(mask.shape).transpose(1, 2, 3, 0) * sp
    x, y, z = g[..., 0] - mask.shape[0] * sp[0] / 2, g[..., 1] - 70.0, g[..., 2]
    proc = (np.abs(x) <= 4) & (y >= -30) & (y <= -20) & (z >= zc - drop_mm) & (z <= zc - 6)
    ct[proc] = 450
    mask[proc & (mask == 0)] = lab


def test_unlabelled_vertebra_found_below_a_vertebra_whose_processes_hang_past_the_disc():
    """The walk down to an unlabelled sacrum starts at the last body's endplate: starting
    below the lowest voxel of the whole vertebra (a process hanging past the disc) steps
    over the disc, and the unlabelled (transitional) body is then taken for the sacrum."""
    ct, mask, aff = phantom(labels=(22, 23, 24), unlabel=(24, 26))  # L5 and the sacrum unlabelled
    zlen = 30 * 4 + 20
    _hang_process(ct, mask, aff, 23, zlen - 25 - 30, 22.0)
    r = rate(ct, mask, aff)
    found = r["evidence"]["castellvi"]["unlabelled_sacrum"]
    assert found["transitional_vertebra"], found["bodies_below_mm"]
    assert r["castellvi"]["unlabelled_vertebra"] and r["castellvi"]["vertebra"] == "L5"
    assert r["counts"]["lumbar"] == 3


def test_short_bone_below_the_last_label_is_no_transitional_body():
    """Bone lower than half a lumbar body between the last label and the sacrum, with a
    disc above and below it, is no transitional vertebra: L5 stays the last lumbar one."""
    ct, mask, aff = phantom(labels=(22, 23, 24, 25), unlabel=(25, 26))
    sp = np.diag(aff)[:3]
    g = np.indices(mask.shape).transpose(1, 2, 3, 0) * sp
    z = g[..., 2]
    zc = 30 * 5 + 20 - 25 - 30 * 3  # the unlabelled level's centre
    ct[(ct > 300) & (np.abs(z - zc) > 5) & (np.abs(z - zc) <= 12)] = 40.0  # a 10 mm plate of bone
    r = rate(ct, mask, aff)
    found = r["evidence"]["castellvi"]["unlabelled_sacrum"]
    assert not found["transitional_vertebra"], found["bodies_below_mm"]
    assert r["castellvi"]["vertebra"] == "L5" and not r["castellvi"]["unlabelled_vertebra"]


def _phantom_with_a_sacrum_drawn_anew(s1, below):
    """L1-L4 labelled; under L4's body (z < 75 mm) an unlabelled sacrum drawn anew as two
    segments, S1 over ``s1`` and S2 and below over ``below`` (z ranges in mm)."""
    ct, mask, aff = phantom(labels=(20, 21, 22, 23, 24), unlabel=(24, 26))
    g = np.indices(mask.shape).transpose(1, 2, 3, 0) * np.diag(aff)[:3]
    x, y, z = g[..., 0] - 100.0, g[..., 1] - 70.0, g[..., 2]
    ct[z < 75] = 40.0
    sacrum = (x / 48) ** 2 + (y / 18) ** 2 <= 1
    for lo, hi in (s1, below):
        ct[sacrum & (z >= lo) & (z < hi)] = 450.0
    return ct, mask, aff


def test_sacrum_with_a_residual_s1_s2_line_is_no_transitional_vertebra():
    """An S1 segment 40 mm long along the walk, over a thin residual S1/S2 line, read as a
    body, a disc and another body: an L6 or fused L5 graded III (held-out synth 93013, 93021;
    dev 96015). A lumbar body met by the walk is at most 35 mm long (adult 25-30 mm)."""
    ct, mask, aff = _phantom_with_a_sacrum_drawn_anew(s1=(35, 75), below=(5, 32))  # S1 40 mm, a 3 mm line
    r = rate(ct, mask, aff)
    found = r["evidence"]["castellvi"]["unlabelled_sacrum"]
    assert not found["transitional_vertebra"], found["bodies_below_mm"]
    assert r["castellvi"]["vertebra"] == "L4" and not r["castellvi"]["unlabelled_vertebra"]


def test_transitional_vertebra_over_a_bridged_disc_is_told_by_its_side_without_alae():
    """A fused, unlabelled L5 whose disc to the sacrum the walk never finds empty (a thin
    disc tilted beyond its slabs, or bridged by bone: held-out synth 81027, 81057) read as
    the sacrum's top, and L4 was graded. Bone beside the body below L4 ends at its side,
    where the sacrum's alae run on: a vertebra, so the sacrum lies below it."""
    ct, mask, aff = phantom(labels=(22, 23, 24), unlabel=(24, 26))
    sp = np.diag(aff)[:3]
    g = np.indices(mask.shape).transpose(1, 2, 3, 0) * sp
    x, y, z = g[..., 0] - 100.0, g[..., 1] - 70.0, g[..., 2]
    zlen = 30 * 4 + 20
    z5 = zlen - 25 - 30 * 2  # the unlabelled L5's centre; the sacrum's top is 20 mm below it
    ct[(x ** 2 + (y - 10) ** 2 <= 12 ** 2) & (z > z5 - 21) & (z < z5 - 9)] = 450.0  # a bony bridge
    r = rate(ct, mask, aff)
    found = r["evidence"]["castellvi"]["unlabelled_sacrum"]
    assert len(found["bodies_below_mm"]) == 1, found["bodies_below_mm"]  # the walk alone: no disc
    assert found["next_body"]["nature"] == "vertebra", found["next_body"]
    assert found["transitional_vertebra"]
    assert r["castellvi"]["unlabelled_vertebra"] and r["castellvi"]["vertebra"] == "L5", r["castellvi"]
    assert r["counts"]["lumbar"] == 3


def test_sacrum_a_level_below_a_vertebra_the_walk_found_empty():
    """A fused, unlabelled L5 of low density: the walk met no body within a disc's height
    under L4, and its first body, a level lower, was taken for the sacrum's top (synth
    96055: the walk's bodies at [[42, 120]] mm, a level of 35 mm). Where the probe found a
    vertebra's body, the sacrum is the first body 0.8-1.6 levels down, under a disc just
    above it; a first body farther down names none (82012: [[24, 34], [68, 120]], 34 mm)."""
    from verse_cli.variants import _sacrum_below_an_empty_vertebra

    step_mm = 2.0
    centres = [np.array([0.0, 0.0, -step_mm * (k + 1)]) for k in range(60)]
    heading = np.array([0.0, 0.0, -1.0])
    runs = [(21, 60)]  # steps: 42-120 mm
    sacrum, (point, normal) = _sacrum_below_an_empty_vertebra(runs, centres, heading, {"step_mm": 34.9}, step_mm)
    assert sacrum == (21, 60)
    assert -42.0 < point[2] < -34.0 and normal @ heading == 1.0  # the disc just above the sacrum
    runs = [(12, 17), (34, 60)]  # 24-34 and 68-120 mm
    assert _sacrum_below_an_empty_vertebra(runs, centres, heading, {"step_mm": 33.7}, step_mm) is None


def test_sacrum_whose_first_segment_looks_like_a_body_is_told_by_its_alae():
    """An S1 segment of a lumbar body's height over a residual S1/S2 disc reads on the walk
    as a body, a disc and another body: a transitional vertebra (held-out synth 93003, an
    L4 variant, graded as a fused L5). Beside its middle the alae run on far beyond the
    body's sides, where a vertebra's bone ends: it is the sacrum."""
    # S1 25 mm, 10 mm under L4's body, over a 3 mm line
    ct, mask, aff = _phantom_with_a_sacrum_drawn_anew(s1=(40, 65), below=(5, 37))
    r = rate(ct, mask, aff)
    found = r["evidence"]["castellvi"]["unlabelled_sacrum"]
    assert len(found["bodies_below_mm"]) == 2, found["bodies_below_mm"]  # the walk alone: body, disc, body
    assert found["next_body"]["nature"] == "sacrum", found["next_body"]
    assert not found["transitional_vertebra"]
    assert r["castellvi"]["vertebra"] == "L4" and not r["castellvi"]["unlabelled_vertebra"], r["castellvi"]


def test_a_fused_process_beside_a_transitional_body_is_no_ala():
    """A fused transitional vertebra's process, joined to the ala, can run on far beyond its
    body on one side at the body's mid-depth (synth 93056, a 3b read as 0/1 when one side
    alone vetoed the walk's transitional vertebra). One side is an ala only where the body
    a little lower is no vertebra's."""
    ct, mask, aff = phantom(labels=(22, 23, 24), unlabel=(24, 26))
    sp = np.diag(aff)[:3]
    g = np.indices(mask.shape).transpose(1, 2, 3, 0) * sp
    x, y, z = g[..., 0] - 100.0, g[..., 1] - 70.0, g[..., 2]
    z5 = 30 * 4 + 20 - 25 - 30 * 2  # the unlabelled L5's centre
    ct[(x >= 0) & (x <= 45) & (y >= 6) & (y <= 14) & (z >= z5 + 5) & (z <= z5 + 10)] = 450.0
    r = rate(ct, mask, aff)
    found = r["evidence"]["castellvi"]["unlabelled_sacrum"]
    assert found["next_body"]["nature"] != "sacrum", found["next_body"]
    assert found["transitional_vertebra"], found["bodies_below_mm"]
    assert r["castellvi"]["unlabelled_vertebra"] and r["castellvi"]["vertebra"] == "L5", r["castellvi"]


def test_noise_specks_around_the_walk_are_cleared_by_their_volume_in_mm3():
    """Specks of bone noise (under 30 mm3, whatever the voxel size) near the walk below the
    last label are cleared, so that they cannot fill a disc; bone of the spine stays."""
    from verse_cli.variants import Grid, _drop_specks

    sp = np.array([0.8, 0.8, 3.0])  # a 2 mm3 voxel: a 3-voxel speck is 5.8 mm3, a 20-voxel one 38 mm3
    free = np.zeros((80, 80, 30), bool)
    free[30:50, 30:50, 5:10] = True  # a body
    free[5, 5, 20] = free[5, 6, 20] = free[6, 5, 20] = True  # a speck
    free[60:65, 60:64, 20] = True  # 20 voxels: no speck
    grid = Grid(mask=np.zeros(free.shape, np.uint8), ct=None, affine=np.diag([*sp, 1.0]), sp=sp, present=[])
    _drop_specks(free, grid, np.array([32.0, 32.0, 80.0]), np.array([0.0, 0.0, -1.0]), 60.0)
    assert free[30:50, 30:50, 5:10].all() and free[60:65, 60:64, 20].all()
    assert not free[5:7, 5:7, 20].any()


def test_unlabelled_sacrum_is_redrawn_at_the_disc_below_a_transitional_vertebra():
    """Below an unlabelled transitional vertebra the sacrum is the bone beyond the disc's
    plane joined to the sacrum found (not the walk's square cut); bone on the vertebra's
    side, or beyond the plane but not joined to the sacrum (a process), is not sacrum."""
    from verse_cli.variants import _box_coords, _split_at_disc

    shape = (40, 40, 40)
    coords = _box_coords(shape, np.array([1.0, 1.0, 2.0]), np.zeros(3))  # z: 2 mm voxels
    b = np.zeros(shape, bool)
    m = np.zeros(shape, np.uint8)
    b[10:30, 10:30, 0:18] = True  # the sacrum up to z = 34 mm
    m[10:30, 10:30, 0:12] = 26  # found only up to a square cut at z = 22 mm
    b[0:4, 0:4, 25:28] = True
    m[0:4, 0:4, 25:28] = 26  # on the vertebra's side of the disc
    b[35:39, 35:39, 14:16] = True  # a process beyond the plane, clear of the sacrum
    disc = {"disc_point_mm": [20.0, 20.0, 40.0], "disc_normal": [0.0, 0.0, -1.0]}
    out = _split_at_disc(m, b, coords, disc)
    assert (out[10:30, 10:30, 0:18] == 26).all()
    assert not (out[0:4, 0:4, 25:28] == 26).any() and not (out[35:39, 35:39, 14:16] == 26).any()
    assert (m[10:30, 10:30, 12:18] == 0).all()  # the input is left as it was


def test_disc_below_a_transitional_vertebra_tilts_forwards_not_sideways():
    """The walk's centres drift towards a process fused on one side; the disc's normal keeps
    their forward tilt (the lordosis) but not their sideways one, which handed one side's
    process to the sacrum (synth 88742, 88757: grade 4 read as 2a and 0/1)."""
    from verse_cli.variants import _sagittal_disc_normal

    right = geometry.unit(np.array([1.0, 0.0, 0.1]))
    body_mid, sacrum_top = np.array([0.0, 0.0, 0.0]), np.array([12.0, -10.0, -20.0])  # 12 mm to the right
    n = _sagittal_disc_normal(body_mid, sacrum_top, right)
    assert abs(n @ right) < 1e-9 and np.isclose(np.linalg.norm(n), 1.0)
    assert n[1] < -0.4 and n[2] < -0.8  # down and back, as the walk went


def _plate_at_left_rib_tip(shape, labels, width, level, length, x_from, thick_mm, below_mm, above_mm):
    """A box of bone (the shoulder girdle) in front of the tip of the left rib that
    :func:`phantom` draws at ``labels[level]`` with that ``length``, from ``x_from`` (mm)
    out to the tip, ``thick_mm`` thick, and from ``below_mm`` under to ``above_mm`` over
    the level's centre."""
    sp = np.asarray(SPACING)
    zc = 30 * len(labels) + 20 - 25 - 30 * level
    d = np.array([-0.8, 0.55, -0.25])
    tip = np.array([width / 2 - 17.0, 70.0 + 4.0, zc + 3.0]) + d / np.linalg.norm(d) * length
    g = np.indices(shape).transpose(1, 2, 3, 0) * sp
    return ((g[..., 0] >= x_from) & (g[..., 0] <= tip[0] + 2) & (g[..., 1] >= tip[1] + 1)
            & (g[..., 1] <= tip[1] + 1 + thick_mm) & (g[..., 2] >= zc - below_mm) & (g[..., 2] <= zc + above_mm))


def test_cervical_rib_touching_the_shoulder_girdle_ends_where_it_meets_it():
    """A cervical rib whose tip touches a plate of bone (the scapula or clavicle) made one
    component with it, measured through the plate or given up (synth cases 90014, 90050:
    'C7 ribs' of 277-454 mm). The rib, followed from C7 through bone, ends where the
    front widens into the plate."""
    labels, width = (6, 7, 8, 9), 260
    ct, mask, aff = phantom(labels=labels, ribs={7: (30, None), 8: (90, 90), 9: (120, 120)}, sacrum=False,
                            width_mm=width)
    ct[_plate_at_left_rib_tip(ct.shape, labels, width, 1, 30.0, x_from=width / 2 - 95, thick_mm=5.0,
                              below_mm=18.0, above_mm=20.0)] = 600
    r = rate(ct, mask, aff)
    assert r["cervical_ribs"]["left"] is True and r["cervical_ribs"]["right"] is False, r["ribs"]
    assert r["ribs"]["C7"]["left_status"] == "present" and abs(r["ribs"]["C7"]["left_mm"] - 30) <= 8, r["ribs"]["C7"]


def test_bone_cut_by_the_scan_edge_below_the_last_label_is_not_named_the_sacrum():
    """Unlabelled bone below the last label that the scan's edge cuts before it runs on
    longer than a vertebral body may be the next vertebra as much as the sacrum: neither is
    named, so the lumbar count stays undeterminable (it was closed at the last label)."""
    ct, mask, aff = phantom(labels=(20, 21, 22, 23, 24), sacrum=False, unlabel=(24,))
    zc = 25.0  # the unlabelled L5's centre: its body spans z 15-35 mm
    ct, mask, aff = _scan_from(ct, mask, aff, zc - 3.0)  # the scan ends 13 mm below the body's top
    r = rate(ct, mask, aff)
    found = r["evidence"]["castellvi"].get("unlabelled_sacrum", {})
    assert found.get("cut_by_field_of_view"), found
    assert r["castellvi"] is None
    assert r["enumeration"]["lumbar"] is None and "L4" not in r["enumeration"]["flags"]


@pytest.mark.parametrize("alae", [True, False])
def test_sacrum_cut_by_the_scan_edge_is_named_by_its_alae(alae):
    """Where the scan ends 10 mm into the sacrum, the bone below the last label is cut before
    it runs on longer than a body, so it might be the next vertebra: the sacrum's alae tell
    it, bone running on far beyond the body's sides beside its middle, where a lumbar
    vertebra has none (its processes arise behind the body). Named, the sacrum is graded
    (synth 95052, 95033: no grade); without alae in view it stays unnamed."""
    ct, mask, aff = phantom(labels=(22, 23, 24), unlabel=(26,))
    sp = np.diag(aff)[:3]
    if not alae:  # only a body's breadth of the sacrum
        x = np.arange(ct.shape[0]) * sp[0] - 100.0
        z = np.arange(ct.shape[2]) * sp[2]
        sacrum = (np.abs(x) > 15)[:, None, None] & ((z >= 14) & (z <= 36))[None, None, :] & (ct > 200)
        ct[sacrum] = 40.0
    ct, mask, aff = _scan_from(ct, mask, aff, 25.0)  # the sacrum's top is at z = 35 mm
    r = rate(ct, mask, aff)
    found = r["evidence"]["castellvi"]["unlabelled_sacrum"]
    assert found.get("cut_by_field_of_view"), found
    if alae:
        assert found.get("told_by_its_alae") and min(found["reach_beside_body_mm"]) >= 40.0, found
        assert r["castellvi"]["vertebra"] == "L5" and r["castellvi"]["grade"] == "0/1", r["castellvi"]
        assert r["field_of_view"]["last"] == "S1"
    else:
        assert max(found["reach_beside_body_mm"]) < 25.0, found
        # unnamed, the sacrum is not graded against; L5's normal processes still grade it
        assert r["castellvi"]["grade"] == "0/1" and r["evidence"]["castellvi"]["graded_without_sacrum"]


@pytest.mark.parametrize("last, process, grade", [(24, "normal", "0/1"), (24, "tall", None), (23, "normal", None)])
def test_castellvi_without_the_sacrum_from_normal_processes(last, process, grade):
    """Where the scan ends above the sacrum, an L5 with two processes under 19 mm is type 0
    (types II-IV need an enlarged process, and type I is the enlargement); an enlarged one
    could touch a sacrum out of view, and below an L4 may lie an L5 the scan cuts: no grade
    (synth 85044, 88001: L5 over a cut sacrum, ungraded before)."""
    ct, mask, aff = phantom(labels=(last - 2, last - 1, last), castellvi=(process, "normal"))
    ct, mask, aff = _scan_from(ct, mask, aff, 39.0)  # 4 mm above the sacrum's top (z = 35 mm)
    r = rate(ct, mask, aff)
    assert (r["castellvi"] or {}).get("grade") == grade, r["evidence"]["castellvi"]
    assert r["enumeration"]["lumbar"] is None
    if grade:
        sides = r["evidence"]["castellvi"]["sides"]
        assert max(s["transverse_process_height_mm"] for s in sides.values()) < 19.0


def test_a_thin_disc_is_a_slab_much_emptier_than_the_bodies_beside_it():
    """A disc thinner than the blur of the voxels leaves some bone in its slab; a slab much
    emptier than the bodies above and below it is a disc all the same, while the varying
    fill of a body's cancellous bone is none."""
    from verse_cli.variants import _disc_slabs

    profile = np.array([0.0, 0.0, 0.6, 0.7, 0.5, 0.7, 0.45, 0.7, 0.7, 0.7, 0.7, 0.7, 0.2, 0.7, 0.8, 0.8,
                        0.8, 0.8, 0.8, 0.8])
    disc = _disc_slabs(profile, 2.0)
    assert disc[:2].all() and disc[12] and not disc[2:12].any() and not disc[13:].any()


def test_a_one_slab_disc_parts_two_bodies_but_a_cancellous_hole_does_not():
    """One empty slab (2 mm) between two bodies is a thin disc; a slab in a body that is
    only emptier than its neighbours (cancellous bone partly below the threshold) is closed."""
    from verse_cli.variants import _body_runs

    body = [0.4] * 12
    hole = _body_runs(np.array([0.0, *body[:6], 0.12, *body[6:], 0.0]), 2.0)
    disc = _body_runs(np.array([0.0, *body[:6], 0.02, *body[6:], 0.0]), 2.0)
    assert hole == [(1, 14)] and disc == [(1, 7), (8, 14)]


def _l1_stump_phantom():
    """T10-L2 with long T12 ribs and a 30 mm right stump at L1: the CT, the mask, the affine,
    the voxel grid in mm, and the stump's joint and direction."""
    labels = (17, 18, 19, 20, 21)
    ct, mask, aff = phantom(labels=labels, ribs={19: (90, 90), 20: (None, 30)}, width_mm=240)
    zlen = 30 * (len(labels) + 1) + 20
    cx, cy, zc = 120.0, 70.0, zlen - 25 - 30 * 3  # L1
    p0 = np.array([cx + 17.0, cy + 4.0, zc + 3.0])
    d = np.array([0.8, 0.55, -0.25]) / np.linalg.norm([0.8, 0.55, -0.25])
    g = np.indices(ct.shape).transpose(1, 2, 3, 0) * np.diag(aff)[:3]
    return ct, mask, aff, g, p0, d


def test_a_rib_joined_to_a_bone_mass_is_undeterminable_not_a_long_rib():
    """A stump rib at L1 whose tip touches the iliac crest was measured as one piece with it
    (synth 93019, 93045: L1 'ribs' of 270-320 mm, mean radius 9-12 mm) and L1 was counted
    thoracic. A piece much thicker than a rib is a rib joined to other bone: its length
    cannot be told, and the label's region stands."""
    ct, mask, aff, g, p0, d = _l1_stump_phantom()
    tip = p0 + d * 30
    # a wing of bone 16 mm thick and 70 x 60 mm wide whose edge the rib's tip touches
    wing = ((g[..., 0] >= tip[0]) & (g[..., 0] <= tip[0] + 16) & (np.abs(g[..., 1] - tip[1]) <= 35)
            & (g[..., 2] <= tip[2] + 3) & (g[..., 2] >= tip[2] - 57))
    ct[wing & (mask == 0)] = 600
    r = rate(ct, mask, aff)
    assert r["ribs"]["L1"]["right_status"] == "undeterminable", r["ribs"]["L1"]
    assert r["ribs"]["L1"]["right_visible_mm"] > 38
    assert not any("L1" in w and "thoracic" in w for w in r["warnings"]), r["warnings"]
    assert r["ribs"]["T12"]["left_status"] == r["ribs"]["T12"]["right_status"] == "present"


def test_a_stump_rib_touching_an_enhancing_kidney_is_measured_without_it():
    """On contrast CT the renal cortex enhances above the bone threshold, and an L1 stump rib
    whose tip touches a kidney was one piece with it (synth 82036: L1 'ribs' of 190 mm,
    radius 15 mm, undeterminable: both stumps missed). Cut at a level above the organ's, the
    piece is the rib again, measured as a stump."""
    ct, mask, aff, g, p0, d = _l1_stump_phantom()
    centre = p0 + d * (30 + 25)  # a kidney of 25 mm radius whose surface the rib's tip touches
    kidney = (np.linalg.norm(g - centre, axis=-1) <= 25) & (mask == 0) & (ct < 300)
    ct[kidney] = 290 + np.random.default_rng(1).normal(0, 20, int(kidney.sum()))  # above the threshold
    r = rate(ct, mask, aff)
    assert r["evidence"]["bone_threshold_hu"] < 260, r["evidence"]["bone_threshold_hu"]
    assert r["ribs"]["L1"]["right_status"] == "present", r["ribs"]["L1"]
    assert abs(r["ribs"]["L1"]["right_mm"] - 30) <= 6, r["ribs"]["L1"]
    assert {"vertebra": "L1", "side": "right"}.items() <= r["stump_ribs"][0].items(), r["stump_ribs"]


def test_a_first_rib_joined_at_its_front_to_a_cervical_rib_is_measured_to_its_tip():
    """A cervical rib joined end to end with the first rib makes one piece that leaves T1 and
    comes back to C7 (synth 81044). Its skeleton's diameter ran back to the spine, so the
    first rib was 'undeterminable' and the cervical rib was never looked for. The first rib
    is measured out to the bone farthest from the spine, and the cervical rib split off it."""
    labels = (6, 7, 8, 9)
    ct, mask, aff = phantom(labels=labels, ribs={8: (110, 110), 9: (150, 150)}, width_mm=300)
    sp = np.diag(aff)[:3]
    zlen = 30 * (len(labels) + 1) + 20
    cx, cy = 150.0, 70.0
    d = np.array([-0.8, 0.55, -0.25]) / np.linalg.norm([0.8, 0.55, -0.25])
    c7_head = np.array([cx - 17.0, cy + 4.0, zlen - 25 - 30 * 1 + 3.0])
    t1_tip = np.array([cx - 17.0, cy + 4.0, zlen - 25 - 30 * 2 + 3.0]) + d * 110
    # a 50 mm cervical rib whose head lies a few mm off C7 (so the piece goes whole to T1),
    # its tip joined to the first rib's
    rib = _capsule(ct.shape, sp, c7_head + d * 8, c7_head + d * 58, 3.5)
    rib |= _capsule(ct.shape, sp, c7_head + d * 58, t1_tip, 3.5)
    ct[rib & (mask == 0)] = 600
    r = rate(ct, mask, aff)
    t1 = r["ribs"]["T1"]
    assert t1["left_status"] == "present" and abs(t1["left_mm"] - 110) <= 8, t1
    assert r["cervical_ribs"]["left"] is True and r["cervical_ribs"]["right"] is False, r["ribs"]["C7"]


def test_a_first_rib_whose_head_touched_only_c7_is_not_left_beside_a_piece_of_the_girdle():
    """At the thoracic inlet C7's largest piece can be shoulder girdle that starts far from
    the spine (synth 89331: 321 mm, its path starting 25 mm off). Moved to T1 as the first
    rib, it left the true first rib at C7, read as a cervical rib. The first rib is the
    piece that starts by the spine; the far piece is no rib of either vertebra."""
    labels = (6, 7, 8, 9)
    ct, mask, aff = phantom(labels=labels, ribs={7: (95, None), 8: (None, 95), 9: (120, 120)}, sacrum=False,
                            width_mm=300)
    sp = np.diag(aff)[:3]
    cx, cy, zc7 = 150.0, 70.0, 30 * len(labels) + 20 - 25 - 30
    # a bar of bone 5 mm lateral of C7's left process, running front to back, above the first rib
    bar = _capsule(ct.shape, sp, np.array([cx - 51, cy - 58, zc7 + 4]), np.array([cx - 51, cy + 62, zc7 + 4]), 6.0)
    ct[bar & (mask == 0)] = 600
    r = rate(ct, mask, aff)
    t1 = r["ribs"]["T1"]
    assert t1["left_status"] == "present" and abs(t1["left_mm"] - 95) <= 5, t1
    assert r["cervical_ribs"]["left"] is False and r["cervical_ribs"]["right"] is False, r["ribs"]["C7"]
    assert r["evidence"]["ribs"]["T1"]["left"]["set_aside"]["joint_gap_mm"] >= 20


def test_a_first_rib_touching_the_shoulder_girdle_ends_where_it_meets_it():
    """At the thoracic inlet the clavicle and the scapula lie on the first rib, and on
    coarse or smooth scans they make one bone with it (synth 82059, 83035: first ribs of
    280-390 mm rated undeterminable, and the cervical rib beside them lost). The first rib,
    followed from its head through bone, ends where the front widens into the plate."""
    labels, width = (6, 7, 8, 9), 260
    ct, mask, aff = phantom(labels=labels, ribs={8: (90, 90), 9: (120, 120)}, sacrum=False, width_mm=width)
    # a block of bone as thick as the scapula's head and the clavicle's end together
    ct[_plate_at_left_rib_tip(ct.shape, labels, width, 2, 90.0, x_from=5.0, thick_mm=12.0,
                              below_mm=40.0, above_mm=20.0)] = 600
    r = rate(ct, mask, aff)
    assert r["ribs"]["T1"]["left_status"] == "present" and abs(r["ribs"]["T1"]["left_mm"] - 90) <= 10, r["ribs"]["T1"]
    assert r["ribs"]["T1"]["right_status"] == "present" and abs(r["ribs"]["T1"]["right_mm"] - 90) <= 5, r["ribs"]["T1"]
    assert r["cervical_ribs"]["left"] is False and r["cervical_ribs"]["right"] is False, r["ribs"]["C7"]


def test_a_cervical_rib_apart_from_a_first_rib_touching_only_c7_stays_at_c7():
    """Where the first rib's head touched only C7's label, C7's pieces on that side hold
    the first rib (the largest) and any cervical rib of its own; only the first rib goes
    to T1 (synth 83029: a 64 mm cervical rib went to T1 with the first rib and was lost)."""
    from verse_cli.variants import _first_rib_from_c7

    ribs = {7: {"left_mm": 110.0, "left_status": "present", "right_mm": None, "right_status": "absent"},
            8: {"left_mm": None, "left_status": "absent", "right_mm": 110.0, "right_status": "present"}}
    components = {(7, "left"): ["first rib", "cervical rib"], (8, "right"): ["t1"]}
    measured = {(7, "left"): "first rib"}
    moved = _first_rib_from_c7(ribs, {}, components, measured)
    assert moved == ["left"]
    assert components[(8, "left")] == ["first rib"] and components[(7, "left")] == ["cervical rib"]
    assert measured[(8, "left")] == "first rib" and ribs[8]["left_mm"] == 110.0


def test_a_long_cut_c7_rib_above_an_unlabelled_t1_is_the_first_rib():
    """Where the field of view cuts T1, the mask ends at C7 and the first rib's head gives
    the first rib to C7 (synth 81035, 93020, 93050: 'cervical ribs' of 100-180 mm cut by
    the field of view, on both sides). Such a rib is the first rib; C7 keeps its other
    pieces, where a cervical rib of its own may be."""
    from verse_cli.variants import _first_rib_of_unlabelled_t1

    ribs = {7: {"left_mm": None, "left_status": "cut", "left_visible_mm": 132.3,
                "right_mm": None, "right_status": "cut", "right_visible_mm": 40.0}}
    evidence = {"C7": {"left": {"length_mm": 132.3}, "right": {"length_mm": 40.0}}}
    components = {(7, "left"): ["first rib", "cervical rib"], (7, "right"): ["cut cervical rib"]}
    assert _first_rib_of_unlabelled_t1(ribs, evidence, components) == {"left": "first rib"}
    assert ribs[7]["left_status"] == "absent" and "left_visible_mm" not in ribs[7]
    assert components[(7, "left")] == ["cervical rib"]
    assert evidence["C7"]["left_first_rib_of_unlabelled_T1"] == {"length_mm": 132.3}
    # too short to be a first rib: a cervical rib cut by the field of view stays one
    assert ribs[7]["right_status"] == "cut" and components[(7, "right")] == ["cut cervical rib"]
    # with T1 in the mask, the first rib is T1's business (see _first_rib_from_c7)
    ribs = {7: {"left_mm": None, "left_status": "cut", "left_visible_mm": 132.3}, 8: {}}
    assert _first_rib_of_unlabelled_t1(ribs, {}, {(7, "left"): ["x"]}) == {}


def test_bone_crossing_in_front_of_c7_is_no_cervical_rib():
    """Bone that touches C7's body on one side and runs across in front of the spine to
    the other (synth 96031: an 80 mm 'C7 rib' whose tip lay on the other side) is no rib:
    a rib runs outward on its own side."""
    labels, width = (6, 7, 8, 9), 260
    ct, mask, aff = phantom(labels=labels, ribs={8: (90, 90), 9: (120, 120)}, sacrum=False, width_mm=width)
    sp = np.asarray(SPACING)
    z7 = 30 * len(labels) + 20 - 25 - 30
    cx, cy = width / 2, 70.0
    bend = np.array([cx + 5.0, cy + 45.0, z7 + 2.0])
    bar = (_capsule(ct.shape, sp, np.array([cx + 15.0, cy + 20.0, z7 + 3.0]), bend, 3.5)
           | _capsule(ct.shape, sp, bend, np.array([cx - 60.0, cy + 55.0, z7]), 3.5))
    ct[bar & (mask == 0)] = 600
    r = rate(ct, mask, aff)
    assert r["cervical_ribs"]["left"] is False and r["cervical_ribs"]["right"] is False, r["ribs"]["C7"]
