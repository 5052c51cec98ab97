"""``verse detect`` and ``verse train detect``: geometry, box logic, bad inputs, real CT, training."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from verse_cli.core.errors import DataError
from verse_cli.core.geometry import reorient, vox2world
from verse_cli.core.io import load_mask, save_ct, save_mask
from verse_cli.detect import (
    DEFAULT_MODEL,
    block_mean,
    box_voxel_ranges,
    check_ct_intensities,
    coarse_grid,
    detect,
    heatmap_box,
    spine_axis,
    world_bounds,
)
from verse_cli.nets.detect_net import SpineNet3D, load_model, prepare_case, train_detect
from verse_cli.nets.train import load_bundle, log_path, model_hash, save_bundle

VERSE014 = ("verse014", "sub-verse014_ct.nii.gz", "sub-verse014_seg-vert_msk.nii.gz")


def _oblique_affine(deg=20.0, spacing=(0.8, 1.2, 2.0)):
    a = np.radians(deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [10, -20, 30]
    return affine


# --------------------------------------------------------------------------- geometry
def test_coarse_grid_is_ras_aligned_and_covers_an_oblique_scan():
    affine = _oblique_affine()
    shape = (50, 40, 30)
    lo, hi = world_bounds(shape, affine)
    gshape, gaff = coarse_grid(shape, affine, 8.0)
    assert np.allclose(gaff[:3, :3], np.eye(3) * 8.0)
    g_lo, g_hi = world_bounds(gshape, gaff)
    assert np.all(g_lo <= lo + 1e-6) and np.all(g_hi >= hi - 1e-6)
    assert np.all(g_hi - g_lo < hi - lo + 8.0 + 1e-6)


@pytest.mark.parametrize("order", ["C", "F"])
def test_block_mean_values_and_affine(order):
    rng = np.random.default_rng(0)
    data = np.asarray(rng.normal(size=(9, 8, 7)).astype(np.float32), order=order)
    affine = _oblique_affine()
    pooled, paff = block_mean(data, affine, (3, 2, 1))
    assert pooled.shape == (3, 4, 7)
    assert np.isclose(pooled[1, 2, 5], data[3:6, 4:6, 5].mean(), atol=1e-6)
    # a pooled voxel sits at the centre of the voxels it averages
    members = np.argwhere(np.ones((3, 2, 1))) + [3, 4, 5]
    assert np.allclose(vox2world(paff, [1, 2, 5]), vox2world(affine, members).mean(axis=0))


# --------------------------------------------------------------------------- heatmap -> box
def _heat_grid(shape=(30, 30, 40)):
    affine = np.eye(4) * 8.0
    affine[3, 3] = 1
    affine[:3, 3] = [-100, -100, -150]
    return np.zeros(shape, np.float32), affine


def test_heatmap_box_keeps_the_spine_and_drops_spurious_blobs():
    heat, affine = _heat_grid()
    heat[10:14, 12:15, 5:30] = 0.9  # spine
    heat[11:13, 12:15, 31:35] = 0.8  # spine continued past a weak disc (gap of one voxel)
    heat[25:27, 2:4, 2:4] = 0.7  # far away, small: spurious
    box = heatmap_box(heat, affine, threshold=0.5, margin_mm=10.0)
    assert box.components_kept == 2 and box.components_dropped == 1
    assert np.allclose(box.ras_min, vox2world(affine, [10, 12, 5]) - 4 - 10)
    assert np.allclose(box.ras_max, vox2world(affine, [13, 14, 34]) + 4 + 10)
    assert 0.5 < box.score <= 1
    clipped = heatmap_box(heat, affine, clip_to=(np.full(3, -1e9), np.full(3, 0.0)))
    assert np.all(clipped.ras_max <= 0)
    assert heatmap_box(np.zeros_like(heat), affine) is None
    heat[10:14, 8:12, 10:20] = 0.3  # weak posterior elements attached to the spine
    heat[0:2, 0:2, 20:24] = 0.3  # weak and detached
    grown = heatmap_box(heat, affine, threshold=0.5, margin_mm=0.0, low=0.25)
    assert np.allclose(grown.ras_min, vox2world(affine, [10, 8, 5]) - 4)
    assert np.isclose(grown.score, heatmap_box(heat, affine, threshold=0.5).score)


def test_heatmap_box_prefers_the_midline_and_follows_a_weak_peak():
    heat, affine = _heat_grid()
    heat[23:26, 12:15, 18:22] = 0.8  # a thin slab's spine, at the body's midline
    heat[1:5, 12:16, 16:24] = 1.0  # a humerus 17 cm out: more heat, but lateral
    midline = float(vox2world(affine, [24, 0, 0])[0])
    box = heatmap_box(heat, affine, threshold=0.5, margin_mm=0.0, midline_r=midline)
    assert np.allclose(box.ras_min, vox2world(affine, [23, 12, 18]) - 4)
    assert box.components_dropped == 1
    blind = heatmap_box(heat, affine, threshold=0.5, margin_mm=0.0)  # without the midline: the bigger blob
    assert np.allclose(blind.ras_min, vox2world(affine, [1, 12, 16]) - 4)
    # a weak heatmap (peak 0.4) still gives its whole spine; one that never reaches min_peak gives none
    weak, _ = _heat_grid()
    weak[10:14, 12:15, 5:30] = 0.4
    weak[10:14, 12:15, 30:33] = 0.25
    box = heatmap_box(weak, affine, threshold=0.5, margin_mm=0.0)
    assert np.allclose(box.ras_max, vox2world(affine, [13, 14, 32]) + 4)
    assert heatmap_box(weak * 0.5, affine, threshold=0.5) is None


def test_body_midline_ignores_symmetric_arms():
    from verse_cli.detect import body_midline

    coarse = np.full((40, 30, 10), -1000.0)
    coarse[12:28, 5:25] = 40  # trunk centred on index 19.5
    coarse[3:6, 10:15] = 40  # arms on both sides
    coarse[34:37, 10:15] = 40
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[0, 3] = -100
    assert np.isclose(body_midline(coarse, affine), -100 + 8 * 19.5)
    assert body_midline(np.full((4, 4, 4), -1000.0), affine) is None


def test_box_voxel_ranges_follow_the_affine():
    affine = np.diag([-1.0, 2.0, 0.5, 1.0])
    shape = (100, 50, 80)
    lo, hi = np.array([-30.0, 10.0, 5.0]), np.array([-10.0, 40.0, 20.0])
    (i0, i1), (j0, j1), (k0, k1) = box_voxel_ranges(lo, hi, shape, affine)
    assert (i0, i1) == (10, 31) and (j0, j1) == (5, 21) and (k0, k1) == (10, 41)
    assert box_voxel_ranges(np.full(3, -1e4), np.full(3, 1e4), shape, affine) == [[0, 100], [0, 50], [0, 80]]


@pytest.mark.parametrize("lean_deg", [0.0, 20.0, 40.0])
def test_spine_axis_follows_a_leaning_column_of_heat(lean_deg):
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-200.0, -200.0, -300.0]
    ijk = np.indices((50, 50, 80)).reshape(3, -1).T
    xyz = vox2world(affine, ijk)
    centre = np.array([0.0, -20.0, 20.0])
    t = np.radians(lean_deg)
    direction = np.array([np.sin(t) * np.cos(0.5), np.sin(t) * np.sin(0.5), np.cos(t)])
    along = (xyz - centre) @ direction
    across = np.linalg.norm(xyz - centre - along[:, None] * direction, axis=1)
    heat = (np.exp(-(across / 15.0) ** 2) * (np.abs(along) < 200)).reshape(50, 50, 80)
    kept = heat > 0.3
    got = spine_axis(heat, kept, affine)
    assert got is not None
    assert got[1][2] > 0  # points superior
    assert np.degrees(np.arccos(min(1.0, got[1] @ direction))) < 1.0
    assert np.allclose(got[0], centre, atol=4.0)


def test_spine_axis_of_a_round_blob_is_none():
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    ijk = np.indices((30, 30, 30)).reshape(3, -1).T
    r = np.linalg.norm(vox2world(affine, ijk) - 120.0, axis=1)
    heat = np.exp(-(r / 30.0) ** 2).reshape(30, 30, 30)
    assert spine_axis(heat, heat > 0.3, affine) is None


# --------------------------------------------------------------------------- intensity checks
def test_intensity_checks(capsys):
    with pytest.raises(DataError, match="empty"):
        check_ct_intensities(np.full((10, 10, 10), -1024.0), "x.nii.gz")
    mask = np.zeros((20, 20, 20))
    mask[5:10, 5:10, 5:10] = 22
    with pytest.raises(DataError, match="label mask"):
        check_ct_intensities(mask, "m.nii.gz")
    mr = np.random.default_rng(0).uniform(0, 800, (20, 20, 20))
    check_ct_intensities(mr, "mr.nii.gz")
    assert "do not look like CT" in capsys.readouterr().err
    ct = np.random.default_rng(0).uniform(-1000, 1200, (20, 20, 20))
    check_ct_intensities(ct, "ct.nii.gz")
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- bad inputs (CLI)
@pytest.fixture
def blind_model(tmp_path):
    """A detector that never sees a spine (head bias -20): exercises the empty-heatmap path."""
    net = SpineNet3D()
    with torch.no_grad():
        net.head.bias.fill_(-20.0)
    path = tmp_path / "blind.pt"
    save_bundle(path, net.arch, net.config, net.state_dict(), {})
    return path


def _toy_ct(tmp_path, name="ct.nii.gz", value=None):
    rng = np.random.default_rng(1)
    data = rng.normal(40, 20, (40, 40, 30)) if value is None else np.full((40, 40, 30), value)
    if value is None:
        data[:5] = -1000
        data[15:22, 20:27, :] = 500
    path = tmp_path / name
    save_ct(data, np.diag([4.0, 4.0, 4.0, 1.0]), path)
    return path


def _assert_failed(proc, tmp_path, *outputs, code=1):
    assert proc.returncode == code, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for out in outputs:
        assert not (tmp_path / out).exists()
    assert not list(tmp_path.glob("*.part"))


def test_detect_empty_heatmap_exits_1_and_writes_nothing(verse, tmp_path, blind_model):
    ct = _toy_ct(tmp_path)
    proc = verse("detect", ct, "--heatmap", tmp_path / "h.nii.gz", "--bbox", tmp_path / "b.json",
                 "--model", blind_model, "--device", "cpu")
    _assert_failed(proc, tmp_path, "h.nii.gz", "b.json")
    assert "no spine found" in proc.stderr


@pytest.mark.parametrize("kind", ["empty", "mask", "missing", "bad_model"])
def test_detect_bad_inputs(verse, tmp_path, kind):
    model = []
    if kind == "empty":
        ct = _toy_ct(tmp_path, value=-1024)
    elif kind == "mask":
        ct = tmp_path / "msk.nii.gz"
        m = np.zeros((30, 30, 30), np.uint8)
        m[10:20, 10:20, 10:20] = 20
        save_mask(m, np.eye(4), ct)
    elif kind == "missing":
        ct = tmp_path / "absent.nii.gz"
    else:
        ct = _toy_ct(tmp_path)
        (tmp_path / "junk.pt").write_bytes(b"junk")
        model = ["--model", tmp_path / "junk.pt"]
    proc = verse("detect", ct, "--heatmap", tmp_path / "h.nii.gz", "--bbox", tmp_path / "b.json", *model)
    _assert_failed(proc, tmp_path, "h.nii.gz", "b.json")
    assert str(ct.name if kind != "bad_model" else "junk.pt") in proc.stderr


def test_detect_warns_on_mr_like_input(tmp_path, blind_model, capsys):
    data = np.random.default_rng(0).uniform(0, 900, (30, 30, 30)).astype(np.float32)
    with pytest.raises(DataError):
        detect(nib.Nifti1Image(data, np.eye(4) * 3), model=blind_model, device="cpu", source="mr.nii.gz")
    assert "do not look like CT" in capsys.readouterr().err


# --------------------------------------------------------------------------- the bundled model on real CT
needs_model = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="models/detect.pt not trained yet")


@needs_model
def test_detect_verse014_cli(verse, tmp_path, real_data):
    ct = real_data.joinpath(*VERSE014[:2])
    proc = verse("detect", ct, "--heatmap", tmp_path / "h.nii.gz", "--bbox", tmp_path / "b.json",
                 "--device", "cpu", check=True)
    assert proc.returncode == 0
    box = json.loads((tmp_path / "b.json").read_text())
    mask = np.asarray(load_mask(real_data.joinpath(VERSE014[0], VERSE014[2])).dataobj)
    sl = tuple(slice(a, b) for a, b in box["voxel_ranges"])
    assert mask[sl].astype(bool).sum() == mask.astype(bool).sum(), "the box must contain every labelled voxel"
    assert box["model"] == {"name": "detect", "hash": model_hash(DEFAULT_MODEL)}
    assert len(box["corners_ras_mm"]) == 8 and 0 < box["score"] <= 1 and box["margin_mm"] > 0
    heat = nib.load(tmp_path / "h.nii.gz")
    assert heat.get_data_dtype() == np.float32
    assert np.allclose(heat.affine[:3, :3], np.eye(3) * box["heatmap_spacing_mm"])
    # rerun: byte-identical outputs
    verse("detect", ct, "--heatmap", tmp_path / "h2.nii.gz", "--bbox", tmp_path / "b2.json", "--device", "cpu",
          check=True)
    assert (tmp_path / "h.nii.gz").read_bytes() == (tmp_path / "h2.nii.gz").read_bytes()
    assert (tmp_path / "b.json").read_text() == (tmp_path / "b2.json").read_text()


@needs_model
def test_detect_covers_t11_t12_of_the_dicom_fixture(verse, tmp_path, real_data):
    verse("anonymize", real_data / "ct-dicom-siemens", tmp_path / "ct.nii.gz", "--subject", "dcm", check=True)
    verse("detect", tmp_path / "ct.nii.gz", "--heatmap", tmp_path / "h.nii.gz", "--bbox", tmp_path / "b.json",
          "--device", "cpu", check=True)
    box = json.loads((tmp_path / "b.json").read_text())
    ref = np.asarray(load_mask(real_data / "ct-dicom-siemens_reference-seg.nii.gz").dataobj)
    assert ref.shape == tuple(box["image_shape"])
    sl = tuple(slice(a, b) for a, b in box["voxel_ranges"])
    for label in (32, 33):  # TotalSegmentator T12, T11
        assert (ref[sl] == label).sum() == (ref == label).sum()


@needs_model
def test_detect_does_not_depend_on_array_orientation(real_data):
    img = nib.load(real_data.joinpath(*VERSE014[:2]))
    data = np.asarray(img.dataobj, dtype=np.float32)
    model = load_model(DEFAULT_MODEL)
    heat_pir, box_pir = detect(nib.Nifti1Image(data, img.affine), model=model, device="cpu")
    for codes in ("RAS", "LPI", "SAR"):  # every axis flipped at least once, permutations, both memory orders
        other, other_affine = reorient(data, img.affine, codes)
        if codes == "LPI":
            other = np.asfortranarray(other)
        heat, box = detect(nib.Nifti1Image(other, other_affine), model=model, device="cpu")
        # same blocks pooled whatever the array order, so the same heatmap, not just a similar box
        assert np.array_equal(np.asarray(heat.dataobj), np.asarray(heat_pir.dataobj)), codes
        assert np.allclose(box_pir["ras_min_mm"], box["ras_min_mm"], atol=1e-3), codes
        assert np.allclose(box_pir["ras_max_mm"], box["ras_max_mm"], atol=1e-3), codes
        assert box["image_axcodes"] == list(codes)


# --------------------------------------------------------------------------- training
def _write_toy_dataset(root, n=3):
    """Tiny VerSe-layout cases: a bright column (the 'spine', labelled L1-L3) in soft tissue."""
    rng = np.random.default_rng(5)
    for s in range(n):
        shape = (36, 36, 60)
        ct = rng.normal(30, 15, shape)
        ct[:4], ct[-4:] = -1000, -1000
        mask = np.zeros(shape, np.uint8)
        x0 = 14 + s
        for label, z in zip((20, 21, 22), (8, 24, 40)):
            mask[x0:x0 + 6, 20:27, z:z + 14] = label
        ct[mask > 0] = 450
        affine = np.diag([4.0, 4.0, 4.0, 1.0])
        sub = f"toy{s}"
        save_ct(ct, affine, root / "rawdata" / f"sub-{sub}" / f"sub-{sub}_ct.nii.gz")
        save_mask(mask, affine, root / "derivatives" / f"sub-{sub}" / f"sub-{sub}_seg-vert_msk.nii.gz")


def test_prepare_case_ignores_unlabelled_bone_at_the_edges():
    shape = (30, 30, 60)
    ct = np.full(shape, 30.0)
    mask = np.zeros(shape, np.uint8)
    mask[10:20, 10:20, 15:45] = 20
    ct[10:20, 10:20, :] = 400  # the column continues to the scan's edges, unlabelled there
    case = prepare_case(ct, mask, np.diag([2.0, 2.0, 2.0, 1.0]), "t")
    assert case.ignore[:, :, 0].any() and case.ignore[:, :, -1].any()
    assert not case.ignore[:, :, case.ct.shape[2] // 2].any()
    assert case.occ.max() == 255 and np.all(case.gt_min < case.gt_max)


def test_train_detect_cli_writes_bundle_and_log(verse, tmp_path):
    _write_toy_dataset(tmp_path / "data")
    out = tmp_path / "m" / "detect.pt"
    # a tiny time budget: one step, one validation pass
    verse("train", "detect", tmp_path / "data", "--out", out, "--minutes", "0.001", "--batch", "1",
          "--workers", "0", "--device", "cpu", "--seed", "3", check=True)
    arch, config, _, meta = load_bundle(out)
    assert arch == "SpineNet3D" and config["spacing_mm"] == 8.0
    assert meta["train_cases"] == 2 and meta["val_cases"] == 1 and meta["epoch"] == 1 and meta["steps"] == 1
    (record,) = [json.loads(line) for line in log_path(out).read_text().splitlines()]
    assert record["epoch"] == 1 and "val_miss_mm" in record


def test_train_detect_resumes(tmp_path, capsys):
    _write_toy_dataset(tmp_path / "data", n=3)
    kw = {"device": "cpu", "workers": 0, "seed": 1, "channels": (4, 8), "crop": 16, "samples_per_case": 1,
          "minutes": None}
    out = tmp_path / "r.pt"
    train_detect(tmp_path / "data", out, epochs=1, **kw)
    train_detect(tmp_path / "data", out, epochs=2, resume=True, **kw)
    assert "resuming" in capsys.readouterr().err
    records = [json.loads(line) for line in log_path(out).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_train_detect_bad_inputs(verse, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = verse("train", "detect", tmp_path / "empty", "--out", tmp_path / "x.pt", "--epochs", "1")
    _assert_failed(proc, tmp_path, "x.pt")
    assert "no CT found" in proc.stderr
    proc = verse("train", "detect", "--out", tmp_path / "x.pt", "--epochs", "1")
    _assert_failed(proc, tmp_path, "x.pt", code=2)


def test_train_detect_api_is_seeded(tmp_path):
    _write_toy_dataset(tmp_path / "data", n=2)
    kw = {"epochs": 1, "device": "cpu", "workers": 0, "seed": 1, "channels": (4, 8), "crop": 16,
          "samples_per_case": 1}
    train_detect(tmp_path / "data", tmp_path / "a.pt", minutes=None, **kw)
    train_detect(tmp_path / "data", tmp_path / "b.pt", minutes=None, **kw)
    a, b = load_bundle(tmp_path / "a.pt")[2], load_bundle(tmp_path / "b.pt")[2]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_crops_include_thin_slabs_and_narrow_fovs():
    """The sampler cuts cases the way short series are acquired: 20-60 mm slabs, cropped FOVs, thick slices."""
    from verse_cli.nets.detect_net import crop_case, random_fov, validation_slab

    shape = (60, 60, 100)
    ct = np.full(shape, 30.0)
    mask = np.zeros(shape, np.uint8)
    mask[25:35, 25:35, 10:90] = 20
    ct[mask > 0] = 400
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # cached at 4 mm: 30 x 30 x 50 voxels, S along the third axis
    case = prepare_case(ct, mask, affine, "t")
    rng = np.random.default_rng(0)
    widths, kinds, thick = [], set(), 0
    for _ in range(300):
        cut, kind = random_fov(case, rng, case.spine_points[rng.integers(len(case.spine_points))])
        kinds.add(kind)
        if kind is None:
            assert cut is case
            continue
        lo, hi = cut.fov
        assert np.all(lo >= case.fov[0] - 1e-6) and np.all(hi <= case.fov[1] + 1e-6)
        assert np.all(cut.gt_min >= lo - 1e-6) and np.all(cut.gt_max <= hi + 1e-6)
        if kind == "slab" and hi[2] - lo[2] < case.fov[1][2] - case.fov[0][2]:
            widths.append(hi[2] - lo[2])
        thick += cut.affine[2, 2] > case.affine[2, 2] + 1e-6
    assert kinds == {None, "slab", "fov"}
    assert min(widths) <= 24 and np.median(widths) <= 60 and thick > 0
    # a cut keeps only the labels inside it, on the right world grid
    cut = crop_case(case, (0, 0, 20), (30, 30, 25))
    assert cut.ct.shape == (30, 30, 5)
    assert np.allclose(vox2world(cut.affine, [0, 0, 0]), vox2world(case.affine, [0, 0, 20]))
    assert np.isclose(cut.gt_max[2] - cut.gt_min[2], 20.0)
    slab = validation_slab(case)
    assert np.isclose(slab.fov[1][2] - slab.fov[0][2], 40.0)
