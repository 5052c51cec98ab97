"""core.io: NIfTI and JSON reading/writing, atomic and deterministic outputs, clear errors."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from verse_cli.core.errors import DataError, UsageError
from verse_cli.core.io import (
    atomic_path,
    fresh_image,
    load_ct,
    load_mask,
    load_nifti,
    read_json,
    save_ct,
    save_float,
    save_mask,
    save_nifti,
    write_json,
)


def _oblique() -> np.ndarray:
    """A tilted PIR-like grid of 1 x 0.8 x 2 mm (rotation times spacing, as scanners write)."""
    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    pir = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    affine[:3, :3] = Rotation.from_euler("xyz", (8, -5, 3), degrees=True).as_matrix() @ pir @ np.diag([1, 0.8, 2])
    affine[:3, 3] = (40.0, 12.0, -300.0)
    return affine


OBLIQUE = _oblique()


def _singular(path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((3, 3, 3))
    hdr.set_data_dtype(np.uint8)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]
    nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), None, header=hdr).to_filename(str(path))


def _truncated(path) -> None:
    noise = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40)).astype(np.int16)
    raw = gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes())
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_ct_round_trip_as_int16_with_consistent_qform_and_sform(tmp_path, suffix):
    hu = np.random.default_rng(0).normal(0, 500, (12, 10, 8)).astype(np.float32)
    path = tmp_path / f"ct{suffix}"
    save_ct(hu, OBLIQUE, path)
    raw = nib.load(str(path))
    assert raw.get_data_dtype() == np.int16
    assert np.allclose(raw.get_qform(), raw.get_sform(), atol=1e-4) and np.allclose(raw.get_sform(), OBLIQUE)
    assert int(raw.header["qform_code"]) == int(raw.header["sform_code"]) == 1
    back = load_ct(path)
    assert back.get_data_dtype() == np.float32 or np.asarray(back.dataobj).dtype == np.float32
    assert np.array_equal(np.asarray(back.dataobj), np.rint(hu))


def test_masks_are_uint8_or_uint16_with_a_fresh_header(tmp_path):
    small = np.zeros((6, 6, 6), np.int64)
    small[1:3, 1:3, 1:3] = 28
    big = small.copy()
    big[4, 4, 4] = 300
    save_mask(small, np.eye(4), tmp_path / "a.nii.gz")
    save_mask(big, np.eye(4), tmp_path / "b.nii.gz")
    assert nib.load(str(tmp_path / "a.nii.gz")).get_data_dtype() == np.uint8
    assert nib.load(str(tmp_path / "b.nii.gz")).get_data_dtype() == np.uint16
    # nothing of an input header survives: a scaled, described source image
    src = nib.Nifti1Image(small.astype(np.float32), np.eye(4))
    src.header["descrip"] = b"PATIENT NAME"
    src.header.set_slope_inter(2.0, 1.0)
    save_mask(np.asarray(src.dataobj), src.affine, tmp_path / "c.nii.gz")
    hdr = nib.load(str(tmp_path / "c.nii.gz")).header
    assert hdr["descrip"].tobytes().strip(b"\0") == b"" and hdr.get_slope_inter() in ((None, None), (1.0, 0.0))
    assert np.array_equal(np.asarray(load_mask(tmp_path / "c.nii.gz").dataobj), small)


def test_writes_are_deterministic(tmp_path):
    data = np.arange(300, dtype=np.float32).reshape(10, 6, 5)
    save_float(data, OBLIQUE, tmp_path / "a.nii.gz")
    save_float(data, OBLIQUE, tmp_path / "b.nii.gz")
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.nii.gz").read_bytes())[:4] == (348).to_bytes(4, "little")


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_save_refuses_a_non_nifti_name(tmp_path):
    with pytest.raises(UsageError):
        save_nifti(fresh_image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "x.png")


def test_trailing_singleton_axis_is_dropped(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.uint8), np.eye(4)), str(tmp_path / "m.nii.gz"))
    assert load_mask(tmp_path / "m.nii.gz").shape == (4, 5, 6)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("hello"), "not a readable NIfTI"),
    (_truncated, "truncated"),
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.uint8), np.eye(4)), str(p)), "3D"),
    (_singular, "singular"),
])
def test_unreadable_images_are_data_errors_naming_the_file(tmp_path, make, message):
    path = tmp_path / "img.nii.gz"
    make(path)
    with pytest.raises(DataError, match=message) as exc:
        load_nifti(path)
    assert str(path) in str(exc.value)


def test_mask_value_checks(tmp_path):
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 20.0, np.float32), np.eye(4)), str(tmp_path / "whole.nii.gz"))
    assert np.asarray(load_mask(tmp_path / "whole.nii.gz").dataobj).dtype == np.uint8  # whole floats are fine
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 0.5, np.float32), np.eye(4)), str(tmp_path / "half.nii.gz"))
    with pytest.raises(DataError, match="non-integer"):
        load_mask(tmp_path / "half.nii.gz")
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), -1, np.int16), np.eye(4)), str(tmp_path / "neg.nii.gz"))
    with pytest.raises(DataError, match="negative"):
        load_mask(tmp_path / "neg.nii.gz")
    save_mask(np.full((3, 3, 3), 40), np.eye(4), tmp_path / "forty.nii.gz")
    with pytest.raises(DataError, match=r"outside the VerSe table: \[40\]"):
        load_mask(tmp_path / "forty.nii.gz", allowed_labels=set(range(1, 29)))


def test_ct_with_nan_is_refused(tmp_path):
    data = np.zeros((3, 3, 3), np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(DataError, match="NaN"):
        load_ct(tmp_path / "ct.nii.gz")


def test_json_round_trip_numpy_types_and_stdout(tmp_path, capsys):
    obj = {"a": np.float32(1.5), "b": np.arange(3), "c": np.int64(7)}
    write_json(obj, tmp_path / "x.json")
    assert read_json(tmp_path / "x.json") == {"a": 1.5, "b": [0, 1, 2], "c": 7}
    write_json(obj, "-")
    assert json.loads(capsys.readouterr().out)["c"] == 7


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("{oops", "not valid JSON")])
def test_bad_json_is_a_data_error(tmp_path, content, message):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_json(path)
