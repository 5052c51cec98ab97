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
SPACING = (1.0, 1.0, 1.0)


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


def phantom(labels=(17, 18, 19, 20, 21), ribs=None, sacrum=True, sp=SPACING, width_mm=260,
            castellvi=("normal", "normal"), unlabel=(), seed=0):
    """A spine of box-and-cylinder vertebrae on an R, A, S grid (1 mm, 30 mm per level).

    ``ribs``: ``{label: (left_mm, right_mm)}``: straight capsule ribs of that centreline
    length, starting 0.5 mm outside the transverse process tip (None: no rib).
    ``castellvi``: per side (left, right) for the last level above the sacrum:
    "normal", "tall" (22 mm transverse process), "pseudo" (1.5 mm from the sacrum)
    or "fused" (a bony bridge). ``unlabel``: labels drawn in the CT but not in the mask.
    """
    rng = np.random.default_rng(seed)
    sp = np.asarray(sp, float)
    order = list(labels) + ([26] if sacrum else [])
    zlen = 30 * len(order) + 20
    shape = tuple(int(round(v / s)) for v, s in zip((width_mm, 140, zlen), sp))
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
                v |= lat & (np.abs(y + 8) <= 4) & (z >= tp_lo) & (z <= tp_hi)
        ct[v] = 450
        if lab not in unlabel:
            mask[v & (mask == 0)] = lab
        for side, length in zip((-1, 1), (ribs or {}).get(lab, (None, None))):
            if not length:
                continue
            p0 = np.array([cx + side * 40.5, cy - 8, zc])
            d = np.array([side * 0.9, 0.3, -0.3])
            d /= np.linalg.norm(d)
            rib = _capsule(shape, sp, p0, p0 + d * length, 3.5) & ~v
            ct[rib] = 600
    ct += rng.normal(0, 20, shape).astype(np.float32)
    return ct, mask, np.diag([*sp, 1.0])


def rate(ct, mask, affine, **kw):
    return rate_variants(nib.Nifti1Image(ct, affine), nib.Nifti1Image(mask, affine), **kw)


# --------------------------------------------------------------------------- ribs
@pytest.fixture(scope="module")
def rib_case():
    ribs = {17: (140, 150), 18: (60, 70), 19: (30, 45), 20: (20, None)}
    return phantom(ribs=ribs), ribs


def test_rib_lengths_sides_and_stumps(rib_case):
    (ct, mask, aff), ribs = rib_case
    r = rate(ct, mask, aff)
    for lab, name in ((18, "T11"), (19, "T12"), (20, "L1")):
        for side, length in zip(("left", "right"), ribs[lab]):
            entry = r["ribs"][name]
            if length is None:
                assert entry[f"{side}_status"] == "absent"
            else:
                assert entry[f"{side}_status"] == "present", (name, side, entry)
                assert abs(entry[f"{side}_mm"] - (length + 4.0)) <= 3.0, (name, side, entry)
    assert r["ribs"]["L2"]["left_status"] == r["ribs"]["L2"]["right_status"] == "absent"
    assert {(s["vertebra"], s["side"]) for s in r["stump_ribs"]} == {("T12", "left"), ("L1", "left")}
    evidence = r["evidence"]["ribs"]["T11"]["left"]
    assert evidence["voxels"] > 100 and evidence["centreline_mm"] > 40


def test_long_rib_cut_by_field_of_view_is_not_short(rib_case):
    (ct, mask, aff), _ = rib_case
    r = rate(ct, mask, aff)
    t10 = r["ribs"]["T10"]
    assert t10["left_status"] == t10["right_status"] == "cut"
    assert t10["left_mm"] is None and t10["left_visible_mm"] >= 38


def test_rib_rule_moves_t12_without_long_ribs_to_the_lumbar_count():
    ct, mask, aff = phantom(ribs={17: (70, 70), 18: (70, 70), 19: (20, 25)})
    r = rate(ct, mask, aff)
    assert r["counts"]["thoracic"] == 2 and r["counts"]["lumbar"] == 3
    assert any("T12" in w and "lumbar" in w for w in r["warnings"])
    assert {s["vertebra"] for s in r["stump_ribs"]} == {"T12"}


def test_stump_threshold_is_configurable(rib_case):
    (ct, mask, aff), _ = rib_case
    r = rate(ct, mask, aff, stump_mm=30.0)
    assert {(s["vertebra"], s["side"]) for s in r["stump_ribs"]} == {("L1", "left")}


@pytest.mark.parametrize("codes", [("P", "I", "R"), ("L", "P", "S"), ("S", "R", "A")])
def test_sides_and_lengths_do_not_depend_on_orientation(rib_case, codes):
    (ct, mask, aff), _ = rib_case
    ref = rate(ct, mask, aff)
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


def test_castellvi_unlabelled_fused_vertebra():
    ct, mask, aff = phantom(labels=(22, 23, 24), castellvi=("fused", "fused"), unlabel=(24,))
    r = rate(ct, mask, aff)
    c = r["castellvi"]
    assert c["unlabelled_vertebra"] and c["vertebra"] == "L5"
    assert c["grade"] == "3b"
    assert r["counts"]["lumbar"] == 3
