"""Read one CT series from a folder of DICOM files into a volume and a RAS+ affine.

The steps mirror what a careful converter does:

1. Find files (recursively) and read their headers only.
2. Keep CT images; skip localizers/scouts, dose reports, secondary captures,
   structured reports and other non-image objects (each skip is counted).
3. Group by SeriesInstanceUID and refuse to guess between several series.
4. Sort slices by their position along the slice normal
   (``ImagePositionPatient . (row x column)``), never by InstanceNumber or file name.
5. Take the slice spacing from the positions (SliceThickness may differ), and check
   for duplicated positions, missing slices, uneven spacing and gantry tilt.
6. Decode the pixels through pydicom's decoder plugins (JPEG 2000, JPEG lossless,
   JPEG-LS, RLE), apply RescaleSlope/Intercept and return int16 HU.

The voxel layout follows dcm2niix (and so TotalSegmentator): axis 0 runs along the
image columns, axis 1 along the rows but flipped, axis 2 along the slice normal, so
an axial series comes out as LAS. The affine is built in DICOM's LPS space from
ImageOrientationPatient, PixelSpacing and the positions, then converted to RAS+.

Examples
--------
>>> vol = load_series("dicom_folder/")                     # doctest: +SKIP
>>> vol.hu.shape, vol.affine                               # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import DataError
from .core.progress import debug, warn

# SOP classes that hold a stack of single-frame cross-sectional images.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_SLICE_IMAGE_CLASSES = {CT_IMAGE_STORAGE}
_MULTIFRAME_CLASSES = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}  # enhanced / legacy CT
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_STRUCTURED_REPORT_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_DOSE_REPORT_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.88.68"}
_LOCALIZER_WORDS = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"}
_WARNINGS_LOCK = threading.Lock()  # see _decode_one
_DOSE_WORDS = {"DOSE", "DOSE_INFO", "SCREEN SAVE", "SCREENSAVE"}

# Geometry tolerances (mm and degrees): DICOM decimal strings carry ~1e-5 mm jitter.
DUPLICATE_TOL_MM = 0.01
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.005
TILT_TOL_DEG = 0.05
HU_FILL = -1024


@dataclass
class SliceHeader:
    """The header fields of one image file that the conversion needs."""

    path: Path
    series_uid: str
    series_number: str
    description: str
    rows: int
    columns: int
    orientation: np.ndarray  # (6,) row cosines then column cosines (LPS)
    position: np.ndarray  # (3,) ImagePositionPatient (LPS mm)
    pixel_spacing: np.ndarray  # (2,) between rows, between columns
    slope: float
    intercept: float
    dataset: Any = field(repr=False)  # pydicom Dataset without pixel data


@dataclass
class DicomVolume:
    """A converted series: int16 HU on a RAS+ grid plus what was done to get there."""

    hu: np.ndarray
    affine: np.ndarray
    header: Any  # pydicom Dataset of the first slice (no pixel data); never written out
    n_files: int
    spacing_mm: tuple[float, float, float]
    resampled_slices: bool = False
    tilt_corrected_deg: float = 0.0
    skipped: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- finding files
def find_files(source: Path) -> list[Path]:
    """All regular files under ``source`` (or ``source`` itself), in a stable order."""
    source = Path(source)
    if not source.exists():
        raise DataError("no such file or folder", source)
    if source.is_file():
        return [source]
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError("the folder contains no files", source)
    return files


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_header(path: Path):
    """The dataset of ``path`` without pixel data, or ``None`` when it is not DICOM at all.

    A file that announces itself as DICOM but cannot be parsed is an error (truncated or
    corrupt), not something to skip silently.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not _has_dicom_magic(path):
        return None
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        if any("end of file" in str(w.message).lower() for w in caught):
            raise EOFError("the file ends inside an element")
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"truncated or corrupt DICOM file ({_short(exc)})", path) from None
    return ds


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


# --------------------------------------------------------------------------- classification
def _sop_class(ds) -> str:
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return uid


def _image_type(ds) -> set[str]:
    value = ds.get("ImageType", None)
    if value in (None, ""):
        return set()
    values = [value] if isinstance(value, str) else list(value)
    return {str(v).strip().upper() for v in values}


def skip_reason(ds) -> str | None:
    """Why a file is not a slice of a CT volume (``None`` when it is one)."""
    sop = _sop_class(ds)
    image_type = _image_type(ds)
    if sop in _DOSE_REPORT_CLASSES or image_type & _DOSE_WORDS:
        return "dose report"
    if sop.startswith(_STRUCTURED_REPORT_PREFIX):
        return "structured report"
    if sop.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "secondary capture"
    if image_type & _LOCALIZER_WORDS:
        return "localizer"
    if sop in _MULTIFRAME_CLASSES or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame image (not supported)"
    if sop and sop not in _SLICE_IMAGE_CLASSES:
        return "non-CT object"
    modality = str(ds.get("Modality", "") or "").upper()
    if modality and modality != "CT":
        return f"{modality} image"
    required = ("Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
    if any(ds.get(k, None) in (None, "") for k in required):
        return "non-image DICOM"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "colour image"
    return None


def _floats(value, n: int, name: str, path: Path) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{name} is not numeric", path) from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise DataError(f"{name} must hold {n} finite numbers", path)
    return out


def slice_header(path: Path, ds) -> SliceHeader:
    """Parse the geometry and rescale fields of one image file."""
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    return SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        series_number=str(ds.get("SeriesNumber", "") or ""),
        description=str(ds.get("SeriesDescription", "") or ""),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path),
        position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", path),
        pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing", path),
        slope=1.0 if slope in (None, "") else float(slope),
        intercept=0.0 if intercept in (None, "") else float(intercept),
        dataset=ds,
    )


def scan(source: Path) -> tuple[dict[str, list[SliceHeader]], Counter]:
    """Read every header under ``source``; CT slices grouped by SeriesInstanceUID, plus skip counts."""
    groups: dict[str, list[SliceHeader]] = {}
    skipped: Counter = Counter()
    for path in find_files(source):
        ds = read_header(path)
        if ds is None:
            skipped["not DICOM"] += 1
            debug(f"skipped {path}: not DICOM")
            continue
        reason = skip_reason(ds)
        if reason:
            skipped[reason] += 1
            debug(f"skipped {path}: {reason}")
            continue
        header = slice_header(path, ds)
        groups.setdefault(header.series_uid, []).append(header)
    if not groups:
        summary = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "nothing readable"
        raise DataError(f"no CT image series found (skipped: {summary})", source)
    return groups, skipped


# --------------------------------------------------------------------------- series choice
def describe_series(groups: dict[str, list[SliceHeader]]) -> str:
    """One line per series, for error messages: number, slice count, UID, description."""
    parts = []
    for uid, slices in groups.items():
        first = slices[0]
        label = f"#{first.series_number or '?'} {len(slices)} slices uid={uid or '(empty)'}"
        if first.description:
            label += f" '{first.description[:40]}'"
        parts.append(label)
    return "; ".join(parts)


def select_series(groups: dict[str, list[SliceHeader]], wanted: str | None, source: Path) -> list[SliceHeader]:
    """The one series to convert: the only one, or the one ``wanted`` names (UID or SeriesNumber)."""
    if wanted is None:
        if len(groups) > 1:
            raise DataError(f"{len(groups)} CT series found; choose one with --series UID|NUMBER: "
                            f"{describe_series(groups)}", source)
        return next(iter(groups.values()))
    matches = [s for uid, s in groups.items() if uid == wanted]
    if not matches:
        matches = [s for s in groups.values() if s[0].series_number == wanted.strip()]
    if len(matches) != 1:
        why = "no series matches" if not matches else "several series match"
        raise DataError(f"{why} --series {wanted}: {describe_series(groups)}", source)
    return matches[0]


# --------------------------------------------------------------------------- geometry
@dataclass
class StackGeometry:
    """Slices in order along the normal, with the checks' results."""

    slices: list[SliceHeader]
    rowcos: np.ndarray
    colcos: np.ndarray
    normal: np.ndarray
    distances: np.ndarray  # position . normal, ascending
    spacing: float  # typical slice spacing from the positions (mm)
    uneven: str | None  # description of a gap or uneven spacing, or None
    tilt_deg: float


def _check_consistent(slices: list[SliceHeader], source: Path) -> None:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise DataError(f"slices differ in size ({first.rows}x{first.columns} in {first.path.name}, "
                            f"{s.rows}x{s.columns} in {s.path.name}); mixed series?", source)
    orient = np.stack([s.orientation for s in slices])
    if np.abs(orient - orient[0]).max() > 1e-4:
        raise DataError("slices differ in ImageOrientationPatient; mixed series?", source)
    spacing = np.stack([s.pixel_spacing for s in slices])
    if np.abs(spacing - spacing[0]).max() > 1e-4:
        raise DataError("slices differ in PixelSpacing; mixed series?", source)


def stack_geometry(slices: list[SliceHeader], source: Path) -> StackGeometry:
    """Sort along the slice normal and measure spacing, gaps and gantry tilt."""
    _check_consistent(slices, source)
    rowcos, colcos = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(rowcos, colcos)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(rowcos @ colcos) > 1e-3:
        raise DataError("ImageOrientationPatient is not two orthonormal vectors", slices[0].path)
    positions = np.stack([s.position for s in slices])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    slices = [slices[i] for i in order]
    distances, positions = distances[order], positions[order]
    if len(slices) < 2:
        thickness = float(slices[0].dataset.get("SliceThickness", 0) or 0)
        return StackGeometry(slices, rowcos, colcos, normal, distances, thickness or 1.0, None, 0.0)

    steps = np.diff(distances)
    dup = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if dup.size:
        i = int(dup[0])
        raise DataError(f"duplicated slice position {distances[i]:.2f} mm along the normal "
                        f"({slices[i].path.name} and {slices[i + 1].path.name}); several acquisitions "
                        "or a copied file in one series?", source)
    spacing = float(np.median(steps))
    uneven = None
    gaps = np.flatnonzero(steps > 1.5 * spacing)
    if gaps.size:
        i = int(gaps[0])
        uneven = (f"{gaps.size} gap(s) in the slice positions: {steps[i]:.3g} mm between "
                  f"{slices[i].path.name} and {slices[i + 1].path.name} where the spacing is {spacing:.3g} mm "
                  "(missing slice?)")
    elif np.abs(steps - spacing).max() > SPACING_REL_TOL * spacing + SPACING_ABS_TOL_MM:
        uneven = f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm)"

    # In-plane drift of the slice origin per mm along the normal: zero unless the gantry was tilted.
    lateral = (positions - positions[0]) - np.outer(distances - distances[0], normal)
    drift = np.linalg.lstsq((distances - distances[0])[:, None], lateral, rcond=None)[0][0]
    residual = lateral - np.outer(distances - distances[0], drift)
    if np.abs(residual).max() > 0.5:
        raise DataError("slice positions do not lie on a straight line; cannot build one volume", source)
    tilt_deg = float(np.degrees(np.arctan(np.linalg.norm(drift))))
    return StackGeometry(slices, rowcos, colcos, normal, distances, spacing, uneven, tilt_deg)


def lps_affine(geom: StackGeometry, positions: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Affine of the (column, row, slice) voxel grid in DICOM LPS mm."""
    first = geom.slices[0]
    row_spacing, col_spacing = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = geom.rowcos * col_spacing  # moving along a row = next column
    affine[:3, 1] = geom.colcos * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return affine


def to_ras_flipped_rows(data: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LPS -> RAS+ and flip the row axis (dcm2niix's layout) without moving any voxel in space."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    n_rows = data.shape[1]
    flip = np.eye(4)
    flip[1, 1] = -1
    flip[1, 3] = n_rows - 1
    return np.ascontiguousarray(data[:, ::-1, :]), affine @ flip


# --------------------------------------------------------------------------- pixels
def _decode_one(header: SliceHeader) -> np.ndarray:
    import pydicom

    path = header.path
    try:
        # catch_warnings swaps process-wide state: without the lock, slices read by other
        # threads can steal or print the "end of file" warning that marks a truncated file
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        raise DataError(f"truncated or corrupt DICOM file ({_short(exc)})", path) from None
    # pydicom only warns when the file ends inside an element; that is a truncated file.
    ended_early = [w for w in caught if "end of file" in str(w.message).lower()]
    if ended_early:
        raise DataError(f"truncated DICOM file ({_short(ended_early[0].message)})", path)
    if "PixelData" not in ds:
        raise DataError("CT image without pixel data", path)
    syntax = ds.file_meta.get("TransferSyntaxUID", None) if getattr(ds, "file_meta", None) else None
    try:
        pixels = ds.pixel_array
    except NotImplementedError as exc:
        name = getattr(syntax, "name", None) or str(syntax)
        raise DataError(f"no installed decoder for transfer syntax {name} ({_short(exc)})", path) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt streams
        raise DataError(f"cannot decode pixel data ({_short(exc)}); truncated or corrupt file?", path) from None
    if pixels.shape != (header.rows, header.columns):
        raise DataError(f"pixel data has shape {pixels.shape}, header says "
                        f"{header.rows}x{header.columns}", path)
    return pixels


def decode_stack(slices: list[SliceHeader]) -> np.ndarray:
    """Decoded stored values of all slices as an ``(N, rows, columns)`` array.

    The decoders (OpenJPEG, libjpeg, CharLS) release the GIL, so a thread pool decodes
    slices in parallel.
    """
    workers = max(1, min(8, os.cpu_count() or 1))
    if len(slices) < 4 or workers == 1:
        return np.stack([_decode_one(s) for s in slices])
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(_decode_one, slices)))


def to_hu(stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray, source: Path) -> np.ndarray:
    """Apply per-slice RescaleSlope/Intercept; exact integer arithmetic when they are whole numbers."""
    slopes = slopes[:, None, None]
    intercepts = intercepts[:, None, None]
    if np.all(slopes == 1) and np.all(intercepts == np.round(intercepts)):
        hu = np.add(stored, intercepts.astype(np.int32), dtype=np.int32)  # the usual case: one pass
    elif np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts)):
        hu = stored.astype(np.int64) * slopes.astype(np.int64) + intercepts.astype(np.int64)
    else:
        hu = np.rint(stored.astype(np.float64) * slopes + intercepts)
    lo, hi = hu.min(), hu.max()
    if lo < -32768 or hi > 32767:
        warn(f"{source}: HU range {lo}..{hi} exceeds int16; values clipped")
        hu = np.clip(hu, -32768, 32767)
    return hu.astype(np.int16)


# --------------------------------------------------------------------------- resampling
def resample_even(stack: np.ndarray, positions: np.ndarray, distances: np.ndarray,
                  spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of slices onto evenly spaced positions along the normal.

    Returns the new float32 stack and the (interpolated) positions of its slices.
    """
    count = int(np.floor((distances[-1] - distances[0]) / spacing + 1e-6)) + 1
    target = distances[0] + spacing * np.arange(count)
    upper = np.clip(np.searchsorted(distances, target, side="right"), 1, len(distances) - 1)
    lower = upper - 1
    weight = ((target - distances[lower]) / (distances[upper] - distances[lower])).clip(0, 1).astype(np.float32)
    w = weight[:, None, None]
    out = stack[lower].astype(np.float32) * (1 - w) + stack[upper].astype(np.float32) * w
    new_positions = np.stack([np.interp(target, distances, positions[:, i]) for i in range(3)], axis=1)
    return out, new_positions


# --------------------------------------------------------------------------- entry point
def load_series(source: str | os.PathLike, series: str | None = None, resample_uneven: bool = False,
                correct_tilt: bool = False) -> DicomVolume:
    """Convert one CT series under ``source`` to int16 HU on a RAS+ grid.

    Parameters
    ----------
    source : path
        A DICOM file or a folder searched recursively.
    series : str, optional
        SeriesInstanceUID or SeriesNumber; required when several CT series are present.
    resample_uneven : bool
        Interpolate missing slices / uneven spacing onto the typical spacing instead of failing.
    correct_tilt : bool
        Resample a gantry-tilted (sheared) stack onto an orthogonal grid instead of failing.

    Returns
    -------
    DicomVolume
        ``hu`` (int16, axes column/row(flipped)/slice) and ``affine`` (RAS+ mm).

    Raises
    ------
    DataError
        For anything that would make the volume wrong: mixed series, duplicated
        positions, gaps, tilt (without the options), undecodable or truncated files.
    """
    source = Path(source)
    groups, skipped = scan(source)
    geom = stack_geometry(select_series(groups, series, source), source)
    if geom.uneven and not resample_uneven:
        raise DataError(f"{geom.uneven}; use --resample-uneven to interpolate", source)
    if geom.tilt_deg > TILT_TOL_DEG and not correct_tilt:
        tag = geom.slices[0].dataset.get("GantryDetectorTilt", None)
        raise DataError(f"gantry tilt of {geom.tilt_deg:.2f} degrees (GantryDetectorTilt={tag}); "
                        "use --correct-tilt to resample onto an orthogonal grid", source)

    stored = decode_stack(geom.slices)
    slopes = np.array([s.slope for s in geom.slices])
    intercepts = np.array([s.intercept for s in geom.slices])
    hu = to_hu(stored, slopes, intercepts, source)
    del stored
    positions = np.stack([s.position for s in geom.slices])
    distances, step_mm = geom.distances, geom.spacing
    resampled = False
    if geom.uneven:
        hu_f, positions = resample_even(hu, positions, distances, step_mm)
        hu = np.rint(hu_f).astype(np.int16)
        resampled = True
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step = geom.normal * step_mm
    volume = hu.transpose(2, 1, 0)  # (N, rows, cols) -> (cols, rows, N)
    affine_lps = lps_affine(geom, positions, step)

    tilt = 0.0
    if geom.tilt_deg > TILT_TOL_DEG:
        from .core.geometry import resample_to_grid

        orth = affine_lps.copy()
        orth[:3, 2] = geom.normal * float(step @ geom.normal)
        volume = np.rint(resample_to_grid(volume, affine_lps, volume.shape, orth, order=1,
                                          cval=HU_FILL)).astype(np.int16)
        affine_lps, tilt = orth, geom.tilt_deg
    elif len(positions) > 1:
        # Straight stack: keep the exact normal direction, drop sub-micron position jitter.
        affine_lps[:3, 2] = geom.normal * float(step @ geom.normal)

    data, affine = to_ras_flipped_rows(np.ascontiguousarray(volume), affine_lps)
    from .core.geometry import spacing as voxel_spacing

    return DicomVolume(
        hu=data,
        affine=affine,
        header=geom.slices[0].dataset,
        n_files=len(geom.slices),
        spacing_mm=tuple(float(v) for v in voxel_spacing(affine)),
        resampled_slices=resampled,
        tilt_corrected_deg=tilt,
        skipped=dict(skipped),
    )
