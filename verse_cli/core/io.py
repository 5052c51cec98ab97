"""Reading and writing NIfTI and JSON the way every stage needs it.

* Writes are atomic: data go to a temporary file in the target folder, which is then
  renamed, so a killed process never leaves a partial output.
* Writes are deterministic: ``.nii.gz`` is compressed with a fixed gzip header (no
  time stamp, no file name), so the same array gives the same bytes.
* Outputs get a fresh header: nothing (free text, scaling, dtype, extensions) is
  copied from an input. qform and sform are both set to the same affine.
* Every failure to read is a :class:`~verse_cli.core.errors.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, UsageError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GZIP_LEVEL = 6


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith((".nii", ".nii.gz"))


def is_stdio(path: str | os.PathLike | None) -> bool:
    """``-`` stands for stdout in every JSON output."""
    return path is not None and str(path) == "-"


# --------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- JSON
def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically, or to stdout when ``path`` is ``-``."""
    text = dumps_json(obj)
    if is_stdio(path):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomic(path, text)


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON from a file (or stdin for ``-``) with a clear error on bad content."""
    try:
        text = sys.stdin.read() if is_stdio(path) else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("no such file", path) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a JSON file", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read JSON ({exc})", path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON (line {exc.lineno}: {exc.msg})", path) from None


# --------------------------------------------------------------------------- NIfTI reading
def load_nifti(path: str | os.PathLike):
    """Load a NIfTI image and check that it is readable and three-dimensional.

    A trailing singleton fourth axis (common in exported masks) is dropped. The voxel
    data are read eagerly so that a truncated file fails here, with the file named.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise DataError("no such file", path)
    if path.is_dir():
        raise DataError("is a directory, expected a NIfTI file", path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for non-NIfTI content
        raise DataError(f"not a readable NIfTI image ({_short(exc)})", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"not a NIfTI image ({type(img).__name__})", path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"expected a 3D image, got shape {tuple(img.shape)}", path)
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise DataError(f"truncated or corrupt image data ({_short(exc)})", path) from None
    data = data.reshape(shape)
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError("the affine is singular or not finite", path)
    return nib.Nifti1Image(data, affine, header=img.header)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_ct(path: str | os.PathLike):
    """Load a CT in Hounsfield units as float32 data in a fresh image (header scaling applied)."""
    import nibabel as nib

    img = load_nifti(path)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if not np.all(np.isfinite(data)):
        raise DataError("the CT contains NaN or infinite values", path)
    return nib.Nifti1Image(data, img.affine)


def load_mask(path: str | os.PathLike, allowed_labels: set[int] | None = None):
    """Load a label mask as an integer array.

    Float masks are accepted only if every value is a whole number. With
    ``allowed_labels``, any other non-zero value is an error naming the offending labels.
    """
    import nibabel as nib

    img = load_nifti(path)
    raw = np.asanyarray(img.dataobj)
    if np.issubdtype(raw.dtype, np.floating) or img.header.get_slope_inter()[0] not in (None, 1.0):
        data = np.asarray(img.get_fdata(dtype=np.float64))
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise DataError("mask has non-integer values; expected integer labels", path)
        data = data.astype(np.int64)
    else:
        data = np.asarray(raw)
    if data.size and data.min() < 0:
        raise DataError("mask has negative labels", path)
    data = data.astype(np.uint16 if data.size and data.max() > 255 else np.uint8, copy=False)
    if allowed_labels is not None:
        present = {int(v) for v in np.unique(data)} - {0}
        bad = sorted(present - set(allowed_labels))
        if bad:
            raise DataError(f"labels outside the VerSe table: {bad}", path)
    return nib.Nifti1Image(data, img.affine)


# --------------------------------------------------------------------------- NIfTI writing
def fresh_image(data: np.ndarray, affine: np.ndarray, dtype=None):
    """A NIfTI-1 image with a brand-new header: qform = sform = affine, mm units, no text."""
    import nibabel as nib

    data = np.asarray(data if dtype is None else data.astype(dtype, copy=False))
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    return img


def save_nifti(img, path: str | os.PathLike) -> None:
    """Write an image atomically and deterministically (``.nii`` or ``.nii.gz``)."""
    if not is_nifti_path(path):
        raise UsageError(f"output must end in .nii or .nii.gz: {path}")
    raw = img.to_bytes()
    if str(path).lower().endswith(".gz"):
        raw = gzip_deterministic(raw)
    write_bytes_atomic(path, raw)


_GZIP_MEMBER = 1 << 24  # 16 MiB of input per gzip member


def gzip_deterministic(raw: bytes) -> bytes:
    """gzip without time stamp or file name; large inputs are compressed in parallel.

    Inputs above 16 MiB are split at fixed offsets into independent gzip members,
    compressed in threads (zlib releases the GIL) and concatenated. The split does not
    depend on the machine, so the bytes stay deterministic, and every gzip reader
    (Python's gzip, zlib's gzread, nibabel, ITK) reads concatenated members.
    """
    if len(raw) <= _GZIP_MEMBER:
        return gzip.compress(raw, compresslevel=_GZIP_LEVEL, mtime=0)
    from concurrent.futures import ThreadPoolExecutor

    view = memoryview(raw)
    parts = [view[i:i + _GZIP_MEMBER] for i in range(0, len(raw), _GZIP_MEMBER)]
    with ThreadPoolExecutor(max_workers=min(len(parts), os.cpu_count() or 1)) as pool:
        return b"".join(pool.map(lambda part: gzip.compress(part, compresslevel=_GZIP_LEVEL, mtime=0), parts))


def save_ct(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write HU values as int16 (rounded and clipped) with a fresh header."""
    hu = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    save_nifti(fresh_image(hu, affine), path)


def save_mask(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write integer labels as uint8 (uint16 if any label exceeds 255) with a fresh header."""
    data = np.asarray(data)
    if data.size and (data.min() < 0 or data.max() > 65535):
        raise ValueError("mask labels must lie in 0..65535")
    dtype = np.uint16 if data.size and data.max() > 255 else np.uint8
    save_nifti(fresh_image(data.astype(dtype), affine), path)


def save_float(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=np.float32) -> None:
    """Write a probability map or heatmap as float32/float16 with a fresh header."""
    save_nifti(fresh_image(np.asarray(data, dtype=dtype), affine), path)
