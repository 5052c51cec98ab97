"""verse snapshot: orientation-independent QC pictures with mask and centroids."""

from __future__ import annotations

import numpy as np
import pytest

from verse_cli import snapshot as snp
from verse_cli.core import geometry
from verse_cli.core.centroids import Centroids
from verse_cli.core.io import save_ct, save_mask, write_json


def _phantom(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """A bright 'vertebra' ball at world (0, 20, 30) (anterior, superior) and a dim one at (0, -20, -30)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = geometry.vox2world(affine, ijk).reshape(*shape, 3)
    ct = np.full(shape, -1000.0, dtype=np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    upper = np.linalg.norm(xyz - [0, 20, 30], axis=-1) < 10
    lower = np.linalg.norm(xyz - [0, -20, -30], axis=-1) < 10
    ct[upper], mask[upper] = 1200, 20
    ct[lower], mask[lower] = 400, 21
    return ct, mask


def _ras_affine(sp=(1.0, 1.0, 2.0), shape=(60, 70, 50)) -> np.ndarray:
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(sp)
    return aff


def _views(ct, mask, affine, pts_world=None):
    grid = snp.display_grid(ct.shape, affine)
    vol = snp._to_display(ct, affine, grid, is_mask=False)
    lab = snp._to_display(mask, affine, grid, is_mask=True)
    pts = grid.to_index(pts_world) if pts_world is not None else np.zeros((0, 3))
    return grid, snp.build_views(vol, lab, pts, grid)


def test_sagittal_slice_puts_superior_up_and_anterior_left():
    affine, shape = _ras_affine(), (60, 70, 50)
    ct, mask = _phantom(affine, shape)
    grid, views = _views(ct, mask, affine)
    sag = views[0]
    rows, cols = np.nonzero(sag.labels == 20)
    assert rows.mean() < sag.grey.shape[0] / 2, "superior ball must be in the upper half"
    assert cols.mean() < sag.grey.shape[1] / 2, "anterior ball must be in the left half"
    # 10 mm ball radius -> diameter about 20 mm in display pixels
    assert abs((cols.max() - cols.min() + 1) * grid.spacing - 20) <= 3


@pytest.mark.parametrize("codes", [("P", "I", "R"), ("L", "P", "S"), ("S", "R", "A")])
def test_views_do_not_depend_on_voxel_orientation(codes):
    affine, shape = _ras_affine(), (60, 70, 50)
    ct, mask = _phantom(affine, shape)
    _, ref = _views(ct, mask, affine)
    ct2, aff2 = geometry.reorient(ct, affine, codes)
    mask2, _ = geometry.reorient(mask, affine, codes)
    _, got = _views(ct2, mask2, aff2)
    for a, b in zip(ref, got):
        assert a.grey.shape == b.grey.shape
        np.testing.assert_allclose(a.grey, b.grey, atol=1e-2)
        assert (a.labels == b.labels).mean() > 0.999


def test_tilted_anisotropic_grid_keeps_anatomy_where_it_is():
    # 15 degree gantry tilt about the left-right axis and 2.5 mm slices
    theta = np.radians(15)
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    shape = (60, 70, 36)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 1.0, 2.5])
    affine[:3, 3] = -rot @ ((np.asarray(shape) - 1) / 2 * [1.0, 1.0, 2.5])
    ct, mask = _phantom(affine, shape)
    grid, views = _views(ct, mask, affine)
    assert grid.spacing == pytest.approx(1.0)
    sag = views[0]
    rows, cols = np.nonzero(sag.labels == 20)
    # world (y=20, z=30) -> panel column (n_y-1-iy), row (n_z-1-iz)
    iy, iz = grid.to_index([[0, 20, 30]])[0, 1:]
    assert cols.mean() == pytest.approx(grid.shape[1] - 1 - iy, abs=1.5)
    assert rows.mean() == pytest.approx(grid.shape[2] - 1 - iz, abs=1.5)


def test_centroids_in_a_reoriented_frame_land_on_the_same_world_point():
    affine, shape = _ras_affine(), (60, 70, 50)
    world = np.array([[0.0, 20.0, 30.0], [0.0, -20.0, -30.0]])
    ctd = Centroids.from_world([20, 21], world, affine)
    pir = ctd.reoriented(shape, affine, ("P", "I", "R"))
    np.testing.assert_allclose(snp.centroids_world(pir, shape, affine), world, atol=1e-6)


def test_cli_writes_a_deterministic_png(tmp_path, verse):
    affine, shape = _ras_affine(), (60, 70, 50)
    ct, mask = _phantom(affine, shape)
    save_ct(ct, affine, tmp_path / "sub-a_ct.nii.gz")
    save_mask(mask, affine, tmp_path / "sub-a_seg-vert_msk.nii.gz")
    ctd = Centroids.from_world([20, 21], [[0, 20, 30], [0, -20, -30]], affine)
    write_json(ctd.to_json(), tmp_path / "ctd.json")
    outs = []
    for name in ("a.png", "b.png"):
        proc = verse("snapshot", tmp_path / "sub-a_ct.nii.gz", tmp_path / "sub-a_seg-vert_msk.nii.gz",
                     "--ctd", tmp_path / "ctd.json", "-o", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert outs[0] == outs[1]


def test_real_verse014_overlay_and_markers(tmp_path, real_data, verse):
    from matplotlib.image import imread

    from verse_cli.core.labels import VERSE_COLOURS

    d = real_data / "verse014"
    out = tmp_path / "qc.png"
    proc = verse("snapshot", d / "sub-verse014_ct.nii.gz", d / "sub-verse014_seg-vert_msk.nii.gz",
                 "--ctd", d / "sub-verse014_seg-vb_ctd.json", "-o", out)
    assert proc.returncode == 0, proc.stderr
    img = imread(out)[..., :3]
    assert img.shape[0] >= 400 and img.shape[1] > img.shape[0]
    # every vertebra L1-L5 is drawn: its marker colour appears (marker faces are pure label colour)
    for label in range(20, 25):
        colour = np.asarray(VERSE_COLOURS[label]) / 255
        hits = np.all(np.abs(img - colour) < 0.02, axis=-1).sum()
        assert hits > 20, f"no pixels in the colour of label {label}"


def test_missing_ct_is_one_line_error_and_no_output(tmp_path, verse):
    out = tmp_path / "qc.png"
    proc = verse("snapshot", tmp_path / "nope.nii.gz", "-o", out)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "nope.nii.gz" in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_mask_labels_refused(tmp_path, verse):
    affine, shape = _ras_affine(shape=(20, 20, 10)), (20, 20, 10)
    save_ct(np.zeros(shape), affine, tmp_path / "ct.nii.gz")
    bad = np.zeros(shape, dtype=np.uint8)
    bad[5:8, 5:8, 3:5] = 99
    save_mask(bad, affine, tmp_path / "msk.nii.gz")
    proc = verse("snapshot", tmp_path / "ct.nii.gz", tmp_path / "msk.nii.gz", "-o", tmp_path / "qc.png")
    assert proc.returncode == 1 and "99" in proc.stderr
    assert not (tmp_path / "qc.png").exists()


def test_non_png_output_is_a_usage_error(tmp_path, verse):
    affine, shape = _ras_affine(shape=(20, 20, 10)), (20, 20, 10)
    save_ct(np.zeros(shape), affine, tmp_path / "ct.nii.gz")
    proc = verse("snapshot", tmp_path / "ct.nii.gz", "-o", tmp_path / "qc.jpg")
    assert proc.returncode == 2 and ".png" in proc.stderr
    assert not (tmp_path / "qc.jpg").exists()


def test_wide_field_of_view_is_cropped_to_the_spine_but_keeps_its_height():
    shape = (300, 60, 50)  # 300 mm left-right: the coronal panels are cropped around the spine
    affine = _ras_affine(sp=(1.0, 1.0, 2.0), shape=shape)
    ct, mask = _phantom(affine, shape)
    grid, views = _views(ct, mask, affine)
    coronal = views[2]
    assert coronal.grey.shape[0] == grid.shape[2], "the head-foot extent is never cropped"
    expected = (20 + 2 * snp.CROP_MARGIN_MM) / grid.spacing  # ball diameter plus both margins
    assert abs(coronal.grey.shape[1] - expected) <= 3
    _, cols = np.nonzero(views[3].labels == 20)
    assert abs(cols.mean() - (coronal.grey.shape[1] - 1) / 2) <= 1.5, "the spine is centred"
