"""verse merge: hand-made probability patches of a toy spine with touching (fused) bodies."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from verse_cli.core.io import fresh_image, save_ct, save_nifti
from verse_cli.merge import merge, read_patch
from verse_cli.nets.unet import DEFAULT_CONFIG
from verse_cli.segment import patch_affine, sample_patch, to_uint8, write_patches

LABELS = (20, 21, 22)  # L1-L3


def toy_spine():
    """A PIR CT grid (1.2 x 1 x 1.5 mm, slightly oblique) with three stacked vertebrae.

    L1 and L2 are separated by a 3 mm 'disc'; L2 and L3 touch (a fused disc), so only the
    probabilities, not the image, separate them.
    """
    shape = (70, 110, 48)
    aff = np.array([[0.0, 0.0, 1.5, -30.0], [-1.2, 0.0, 0.0, 40.0], [0.0, -1.0, 0.0, 60.0], [0, 0, 0, 1.0]])
    tilt = np.radians(4.0)
    rot = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    aff[:3, :3] = rot @ aff[:3, :3]
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    world = np.stack([i, j, k], -1) @ aff[:3, :3].T + aff[:3, 3]
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    mask = np.zeros(shape, np.uint8)
    # centres along S (z, world): 30 mm tall bodies, disc only between L1 and L2
    centres = {20: 35.0, 21: 3.0, 22: -27.0}
    bounds = {20: (20.0, 50.0), 21: (-12.0, 17.0), 22: (-42.0, -12.0)}
    for lab in LABELS:
        lo, hi = bounds[lab]
        body = ((x - 6) ** 2 + (y - 0) ** 2 < 16**2) & (z > lo) & (z <= hi)
        arch = (np.abs(x - 6) < 4) & (y < -14) & (y > -40) & (z > lo + 5) & (z <= hi - 5)
        mask[body | arch] = lab
    ct = np.where(mask > 0, 400.0, 0.0).astype(np.float32)
    cents = {lab: np.array([6.0, 0.0, centres[lab]]) for lab in LABELS}
    return ct, mask, aff, cents


def write_toy_patches(tmp_path, mask, aff, cents, island: bool = False, shrink: int = 0):
    """Blurred per-vertebra probabilities; ``shrink`` erodes each vertebra first (a net that stops short)."""
    cfg = DEFAULT_CONFIG
    results = []
    for lab in LABELS:
        own = ndimage.binary_erosion(mask == lab, iterations=shrink) if shrink else mask == lab
        prob = ndimage.gaussian_filter(own.astype(np.float32), 1.0)
        paff = patch_affine(aff, cents[lab], cfg)
        patch = sample_patch(prob, aff, cfg["patch_shape"], paff, order=1, cval=0.0)
        if island and lab == 20:
            patch[5:10, 5:10, 5:10] = 1.0  # a stray blob far from L1: must be dropped
        results.append({"label": lab, "name": f"L{lab - 19}", "file": f"L{lab - 19}_prob.nii.gz",
                        "affine": paff, "prob": to_uint8(patch), "bbox_vox": None, "bbox_world": None})
    write_patches(tmp_path / "patches", results, mask.shape, aff)
    return tmp_path / "patches"


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_merge_separates_touching_vertebrae(tmp_path):
    ct, mask, aff, cents = toy_spine()
    pdir = write_toy_patches(tmp_path, mask, aff, cents, island=True)
    out = merge(nib.Nifti1Image(ct, aff), pdir)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    assert set(np.unique(out)) == {0, *LABELS}
    for lab in LABELS:
        assert dice(out == lab, mask == lab) > 0.95, lab
        _, n = ndimage.label(out == lab, structure=np.ones((3, 3, 3)))
        assert n == 1, f"label {lab} has {n} components"
    # no bleeding: away from the fused L2/L3 contact, no voxel carries the neighbour's label
    core = ndimage.binary_erosion(mask == 21, iterations=2)
    assert not np.isin(out[core], [20, 22]).any()
    core = ndimage.binary_erosion(mask == 22, iterations=2)
    assert not np.isin(out[core], [20, 21]).any()


def test_refine_grows_to_the_bone_edge_but_not_beyond(tmp_path):
    """Probabilities one voxel short of the bone: the merge moves the boundary onto the CT's edge,
    without taking dark voxels or a bright bone that no patch wins (a sacrum without centroid, 2 mm of
    disc below L3)."""
    ct, mask, aff, cents = toy_spine()
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij"), -1).astype(float)
    x, y, z = np.moveaxis(ijk @ aff[:3, :3].T + aff[:3, 3], -1, 0)
    sacrum = ((x - 6) ** 2 + y**2 < 16**2) & (z <= -44.0) & (mask == 0)
    assert sacrum.sum() > 1000
    ct = np.where(sacrum, 400.0, ct).astype(np.float32)
    pdir = write_toy_patches(tmp_path, mask, aff, cents, shrink=1)
    plain = merge(nib.Nifti1Image(ct, aff), pdir, refine=False)
    refined = merge(nib.Nifti1Image(ct, aff), pdir)
    for lab in LABELS:
        before, after = dice(plain == lab, mask == lab), dice(refined == lab, mask == lab)
        assert after > before + 0.03 and after > 0.95, (lab, before, after)
    assert not refined[ct < 200].any()  # nothing dark is taken
    assert (refined[sacrum] > 0).sum() < 0.05 * sacrum.sum()  # the unclaimed bone stays unlabelled
    # touching bodies stay apart
    core = ndimage.binary_erosion(mask == 22, iterations=2)
    assert not np.isin(refined[core], [20, 21]).any()


def test_edited_binary_patch_replaces_probabilities(tmp_path):
    ct, mask, aff, cents = toy_spine()
    pdir = write_toy_patches(tmp_path, mask, aff, cents)
    # the user paints L2 in ITK-SNAP as label 1 (int16, no scaling), shrunk to its upper half
    prob, paff = read_patch(pdir / "L2_prob.nii.gz")
    edited = (prob > 127).astype(np.int16)
    edited[:, :, :80] = 0
    save_nifti(nib.Nifti1Image(edited, paff), pdir / "L2_prob.nii.gz")
    out = merge(nib.Nifti1Image(ct, aff), pdir)
    l2 = out == 21
    # the painted boundary is the user's: the bone-edge refinement leaves it alone
    assert l2.sum() == (merge(nib.Nifti1Image(ct, aff), pdir, refine=False) == 21).sum()
    assert l2.sum() > 0.2 * (mask == 21).sum()
    assert l2.sum() < 0.8 * (mask == 21).sum()
    assert dice(out == 20, mask == 20) > 0.95


def test_read_patch_kinds(tmp_path):
    aff = np.eye(4)
    float_prob = np.linspace(0, 1, 27, dtype=np.float32).reshape(3, 3, 3)
    save_nifti(fresh_image(float_prob, aff), tmp_path / "f.nii.gz")
    values, _ = read_patch(tmp_path / "f.nii.gz")
    assert values.max() == 255 and values.min() == 0
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[1, 1, 1] = 22
    save_nifti(fresh_image(labels, aff), tmp_path / "b.nii.gz")
    values, _ = read_patch(tmp_path / "b.nii.gz")
    assert values[1, 1, 1] == 255 and values.sum() == 255


def test_merge_cli_writes_mask_and_labels(tmp_path, verse):
    ct, mask, aff, cents = toy_spine()
    pdir = write_toy_patches(tmp_path, mask, aff, cents)
    save_ct(ct, aff, tmp_path / "ct.nii.gz")
    out = tmp_path / "sub-x_seg-vert_msk.nii.gz"
    proc = verse("merge", tmp_path / "ct.nii.gz", pdir, "-o", out, "--itksnap-labels", tmp_path / "l.txt")
    assert proc.returncode == 0, proc.stderr
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, nib.load(tmp_path / "ct.nii.gz").affine, atol=1e-4)
    assert set(np.unique(np.asarray(img.dataobj))) == {0, *LABELS}
    text = (tmp_path / "l.txt").read_text()
    assert '"L1"' in text and '"L3"' in text
    # reruns are byte-identical
    first = out.read_bytes()
    assert verse("merge", tmp_path / "ct.nii.gz", pdir, "-o", out).returncode == 0
    assert out.read_bytes() == first


@pytest.mark.parametrize("damage", ["no_index", "missing_patch", "bad_json"])
def test_merge_bad_input(tmp_path, verse, damage):
    ct, mask, aff, cents = toy_spine()
    pdir = write_toy_patches(tmp_path, mask, aff, cents)
    save_ct(ct, aff, tmp_path / "ct.nii.gz")
    if damage == "no_index":
        (pdir / "patches.json").unlink()
    elif damage == "missing_patch":
        (pdir / "L2_prob.nii.gz").unlink()
    else:
        (pdir / "patches.json").write_text(json.dumps({"patches": [{"label": 99, "file": "x"}]}))
    out = tmp_path / "out.nii.gz"
    proc = verse("merge", tmp_path / "ct.nii.gz", pdir, "-o", out)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("verse: error:")
    assert not out.exists()


def test_merge_rejects_non_nifti_output(tmp_path, verse):
    ct, mask, aff, cents = toy_spine()
    pdir = write_toy_patches(tmp_path, mask, aff, cents)
    save_ct(ct, aff, tmp_path / "ct.nii.gz")
    proc = verse("merge", tmp_path / "ct.nii.gz", pdir, "-o", tmp_path / "out.txt")
    assert proc.returncode == 2
    assert not (tmp_path / "out.txt").exists()
