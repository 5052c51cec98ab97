"""``verse deface``: remove the face from a CT, from a drawn mask or automatically.

With a mask (the VerSe way: a face mask drawn in ITK-SNAP) the voxels inside the
mask, dilated by ``margin_mm``, become ``fill`` (air).

Automatic defacing works on an axis-aligned RAS+ copy of the scan at 3 mm, so that
"anterior" and "superior" come from the affine, whatever the voxel order:

1. **Is there a face?** The body (largest component above -400 HU) is followed down
   from the top of the scan while its axial slices stay narrower than a head or neck
   (230 mm). Without such a head-and-neck zone there is no face: nothing changes.
2. **The cervical spine** is the midline bone of the lowest zone slices, followed
   upward through 3D connectivity until the bone spreads out into the skull base.
   Its anterior surface gives, per slice, ``y_front``.
3. **The face** starts at the chin: the lowest slice from which the body reaches
   clearly further in front of the spine than the neck does (protrusion above
   ``max(neck + 25 mm, 65 mm)`` over at least 15 mm). No such slice: no face.
4. **The cut** is the surface ``y = y_front + 12 mm`` from below the chin up to the
   skull base, tilted forward by 35 degrees above it (through the orbits), so that the
   nose, lips, eyes, chin and jaw lie in front of it and the brain mostly behind.
   Everything in front of the cut and above the chin goes, except a 10 mm shell
   around the tracked spine, which is never touched.

The result is mapped back to the scan's own grid (nearest neighbour) and the voxel
data are otherwise copied unchanged, so a scan without a face is bit-identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import DataError, UsageError
from .core.io import fresh_image, load_mask, read_json, save_mask, save_nifti, write_json
from .core.progress import debug, info

COARSE_MM = 3.0
BODY_HU = -400.0
BONE_HU = 200.0
HEAD_NECK_MAX_WIDTH_MM = 230.0
MIN_ZONE_MM = 30.0
MIDLINE_HALF_WIDTH_MM = 25.0
CHIN_MIN_PROTRUSION_MM = 65.0
CHIN_EXTRA_OVER_NECK_MM = 25.0
CHIN_MIN_RUN_MM = 15.0
CHIN_EXTEND_MM = 12.0  # start the cut below the level where the chin is first detected
CLEARANCE_MM = 12.0  # cut this far in front of the spine's anterior surface
PROTECT_MM = 10.0  # shell around the tracked spine that is never removed
TILT_DEG = 35.0
TILT_START_MM = 15.0  # above the top of the tracked spine


@dataclass
class FaceReport:
    """What automatic detection found, in words and numbers (for the log and the sidecar)."""

    face_found: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- coarse RAS grid
def coarse_ras(hu: np.ndarray, affine: np.ndarray, step: float = COARSE_MM) -> tuple[np.ndarray, np.ndarray]:
    """The scan resampled onto an axis-aligned RAS+ grid of ``step`` mm covering it."""
    from .core.geometry import resample_to_grid, vox2world

    shape = np.asarray(hu.shape[:3])
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)], dtype=np.float64)
    world = vox2world(affine, corners)
    # One voxel of padding all round, so that faces cut by the field of view map back to its edge.
    lo, hi = world.min(axis=0) - step, world.max(axis=0) + step
    out_shape = tuple(int(v) for v in np.floor((hi - lo) / step) + 1)
    grid = np.diag([step, step, step, 1.0])
    grid[:3, 3] = lo
    coarse = resample_to_grid(hu, affine, out_shape, grid, order=1, cval=-1024.0)
    return coarse, grid


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _fill_axial_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(mask, structure=structure)


def _extent(mask2d: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column (last axis): min and max of ``coords`` (first axis) where ``mask2d`` holds (nan if none)."""
    hit = mask2d.any(axis=0)
    first = np.where(hit, coords[mask2d.argmax(axis=0)], np.nan)
    last = np.where(hit, coords[len(coords) - 1 - mask2d[::-1].argmax(axis=0)], np.nan)
    return first, last


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, stop) index pairs of the runs of True in a 1D array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


# --------------------------------------------------------------------------- detection
SPINE_JUMP_MM = 10.0  # a forward jump of the spine front between neighbouring slices: not spine
SPINE_EXTRAPOLATE_MM = 30.0


def spine_front(spine: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """Anterior surface (y, mm) of the tracked spine for every axial slice.

    Per slice, the most anterior spine voxel, followed up from the neck until it jumps
    forward by more than ``SPINE_JUMP_MM`` between neighbouring slices: there bone
    that touches the column (skull base, jaw) joins the track. Above that level the
    front is extrapolated along a robust (Theil-Sen) line through the slices below for
    ``SPINE_EXTRAPOLATE_MM``, then held. Going up, the front never retreats, so nothing
    behind the column (brainstem, occiput) is ever cut.
    """
    from scipy.stats import theilslopes

    _, y_max = _extent(spine.any(axis=0), ys)
    known = np.flatnonzero(~np.isnan(y_max))
    raw = y_max[known]
    jumps = np.flatnonzero(np.diff(raw) > SPINE_JUMP_MM)
    upto = int(jumps[0]) + 1 if jumps.size else len(raw)
    known, raw = known[:upto], raw[:upto]
    z_last = zs[known[-1]]
    if known.size >= 3:
        slope, intercept, _, _ = theilslopes(raw, zs[known])
    else:
        slope, intercept = 0.0, float(raw.max()) if raw.size else 0.0
    above = zs > z_last
    z_ext = np.minimum(zs, z_last + SPINE_EXTRAPOLATE_MM)
    y_front = np.interp(np.arange(len(zs)), known, raw)  # held constant below the first slice
    y_front[above] = np.maximum(raw[-1], intercept + slope * z_ext[above])
    return np.maximum.accumulate(y_front)


def find_face(coarse: np.ndarray, step: float = COARSE_MM, margin_mm: float = 0.0) -> tuple[np.ndarray | None, FaceReport]:
    """Face mask on the coarse RAS grid (or None) and a report of how it was found.

    Parameters
    ----------
    coarse : ndarray
        HU on an axis-aligned RAS+ grid (axis 0 = R, 1 = A, 2 = S) with ``step`` mm voxels.
    margin_mm : float
        Start the cut this much lower (below the chin); the spine side never moves.
    """
    from scipy import ndimage

    nx, ny, nz = coarse.shape
    xs, ys, zs = (np.arange(n) * step for n in (nx, ny, nz))
    body = _fill_axial_holes(_largest_component(coarse > BODY_HU))
    present = body.any(axis=(0, 1))
    if not present.any():
        return None, FaceReport(False, "no body in the scan")
    top = int(np.flatnonzero(present)[-1])

    # 1. head-and-neck zone: narrow slices from the top of the body down
    x_lo, x_hi = _extent(body.any(axis=1), xs)
    width = np.nan_to_num(x_hi - x_lo + step, nan=0.0)
    narrow = present & (width < HEAD_NECK_MAX_WIDTH_MM)
    if not narrow[top]:
        return None, FaceReport(False, f"the top of the scan is {width[top]:.0f} mm wide: no head or neck",
                                {"top_width_mm": float(width[top])})
    zone_lo = top
    while zone_lo > 0 and narrow[zone_lo - 1]:
        zone_lo -= 1
    zone_mm = (top - zone_lo + 1) * step
    if zone_mm < MIN_ZONE_MM:
        return None, FaceReport(False, f"only {zone_mm:.0f} mm of neck at the top of the scan: no face",
                                {"zone_mm": zone_mm})

    # 2. the cervical spine: midline bone seeded in the lowest zone slices, tracked upward
    counts = body.sum(axis=(0, 1)).clip(min=1)
    xc = (body.sum(axis=1) * xs[:, None]).sum(axis=0) / counts  # body centre x per slice
    y_back, y_body_front = _extent(body.any(axis=0), ys)
    midline = np.abs(xs[:, None] - xc[None, :]) < MIDLINE_HALF_WIDTH_MM  # (x, z)
    y_mid = (y_back + y_body_front) / 2
    posterior = ys[None, :, None] < (y_back + 0.67 * (y_body_front - y_back))[None, None, :]
    zone = np.zeros(nz, bool)
    zone[zone_lo:] = True  # up to the top edge: the head may be cut by the field of view
    candidate = (coarse > BONE_HU) & body & midline[:, None, :] & posterior & zone[None, None, :]
    # Discs break the column into separate vertebrae: bridge gaps of up to ~12 mm along z first.
    bridge = np.ones((1, 1, 2 * max(1, round(6.0 / step)) + 1), bool)
    labels, _ = ndimage.label(ndimage.binary_closing(candidate, structure=bridge) | candidate)
    seed_hi = min(top, zone_lo + max(1, round(12.0 / step)))
    seeds = np.unique(labels[:, :, zone_lo:seed_hi + 1])
    seeds = seeds[seeds > 0]
    if seeds.size == 0:
        return None, FaceReport(False, "no midline bone (cervical spine) at the bottom of the head-and-neck "
                                "zone: no face", {"zone_mm": zone_mm})
    spine = np.isin(labels, seeds)
    area = spine.sum(axis=(0, 1)) * step * step
    lower = area[zone_lo:top + 1]
    typical = float(np.median(lower[lower > 0])) if np.any(lower > 0) else 0.0
    spreads = np.flatnonzero((area > 2.5 * typical) & zone)
    spine_top = int(spreads[0]) - 1 if spreads.size else int(np.flatnonzero(area > 0)[-1])
    spine[:, :, spine_top + 1:] = False
    has_spine = spine.any(axis=(0, 1))
    if not has_spine.any():
        return None, FaceReport(False, "cervical spine not found: no face")
    y_front = spine_front(spine, ys, zs)
    # Bone that merely touches the column (jaw, skull base) is not spine: trim it before the shell.
    spine &= ys[None, :, None] <= (y_front + step)[None, None, :]

    # 3. the chin: the body reaches clearly further forward than the neck does
    _, y_mid_front = _extent((body & midline[:, None, :]).any(axis=0), ys)
    protrusion = np.nan_to_num(y_mid_front - y_front, nan=0.0)
    neck_hi = min(top, zone_lo + max(1, round(30.0 / step)))
    neck = float(np.median(protrusion[zone_lo:neck_hi + 1]))
    threshold = max(neck + CHIN_EXTRA_OVER_NECK_MM, CHIN_MIN_PROTRUSION_MM)
    runs = [(a, b) for a, b in _runs((protrusion > threshold) & zone) if (b - a + 1) * step >= CHIN_MIN_RUN_MM]
    details = {"zone_mm": zone_mm, "neck_protrusion_mm": round(neck, 1), "threshold_mm": round(threshold, 1),
               "max_protrusion_mm": round(float(protrusion[zone].max()), 1),
               "spine_top_z_mm": round(float(zs[spine_top]), 1)}
    if not runs:
        return None, FaceReport(False, "nothing protrudes in front of the spine like a face: no face", details)
    chin = runs[0][0]
    z_chin = zs[chin] - CHIN_EXTEND_MM - margin_mm

    # 4. the cut surface and the protected shell around the spine
    clearance = CLEARANCE_MM  # the margin grows the cut downward only: the spine side stays fixed
    z_tilt = zs[spine_top] + TILT_START_MM
    y_cut = y_front + clearance + np.tan(np.radians(TILT_DEG)) * np.clip(zs - z_tilt, 0, None)
    protect = ndimage.distance_transform_edt(~spine, sampling=step) <= PROTECT_MM
    face = (ys[None, :, None] > y_cut[None, None, :]) & (zs[None, None, :] >= z_chin) & zone[None, None, :]
    face = np.broadcast_to(face, coarse.shape) & ~protect
    details.update({"chin_z_mm": round(float(zs[chin]), 1), "cut_clearance_mm": clearance,
                    "y_mid_mm": float(np.nanmedian(y_mid[zone]))})
    return face, FaceReport(True, "face found", details)


def auto_face_mask(hu: np.ndarray, affine: np.ndarray, margin_mm: float = 0.0) -> tuple[np.ndarray, FaceReport]:
    """Face mask on the scan's own grid (all False when there is no face)."""
    from .core.geometry import resample_to_grid

    coarse, grid = coarse_ras(hu, affine)
    face, report = find_face(coarse, margin_mm=margin_mm)
    if face is None:
        return np.zeros(hu.shape, bool), report
    full = resample_to_grid(face.astype(np.uint8), grid, hu.shape, affine, is_mask=True)
    return full.astype(bool), report


# --------------------------------------------------------------------------- drawn mask
def dilate_mm(mask: np.ndarray, affine: np.ndarray, margin_mm: float) -> np.ndarray:
    """``mask`` grown by ``margin_mm`` (true distance with anisotropic voxels), computed in its bounding box."""
    from scipy import ndimage

    from .core.geometry import spacing

    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    sp = spacing(affine)
    pad = np.ceil(margin_mm / sp).astype(int) + 1
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, mask.shape))
    out = np.zeros_like(mask)
    out[box] = ndimage.distance_transform_edt(~mask[box], sampling=sp) <= margin_mm
    return out


def drawn_face_mask(path: Path, shape, affine: np.ndarray) -> np.ndarray:
    """A hand-drawn face mask on the CT grid (resampled by nearest neighbour when its grid differs)."""
    from .core.geometry import resample_to_grid, same_grid

    img = load_mask(path)
    data = np.asarray(img.dataobj) > 0
    if not same_grid(data.shape, img.affine, shape, affine):
        info(f"{path}: the face mask's grid differs from the CT's; resampling it (nearest neighbour)")
        data = resample_to_grid(data.astype(np.uint8), img.affine, shape, affine, is_mask=True) > 0
    if not data.any():
        raise DataError("the face mask is empty on the CT's grid (does it belong to this CT?)", path)
    return data


# --------------------------------------------------------------------------- entry point
def _fill_dtype(data: np.ndarray, fill: float) -> np.ndarray:
    """``data`` in a dtype that can hold ``fill`` (unchanged when it already can)."""
    if np.issubdtype(data.dtype, np.integer):
        info_ = np.iinfo(data.dtype)
        if fill != round(fill) or not info_.min <= fill <= info_.max:
            return data.astype(np.float32 if fill != round(fill) else np.int32)
    return data


def deface(ct: str | os.PathLike, out: str | os.PathLike, *, mask: str | os.PathLike | None = None,
           auto: bool = False, fill: float = -1024, margin_mm: float = 5.0,
           save_mask_path: str | os.PathLike | None = None,
           sidecar: str | os.PathLike | None = None) -> dict[str, Any]:
    """Replace the face of a CT by ``fill``; write the result (and optionally the mask used).

    Parameters
    ----------
    ct, out : path
        Input and output NIfTI. Voxels outside the face are copied bit for bit.
    mask : path, optional
        Hand-drawn face mask (non-zero = face); exclusive with ``auto``.
    auto : bool
        Find the face automatically; a scan without a face is written unchanged.
    fill : float
        Value (HU) written into the face.
    margin_mm : float
        Grow the face region by this many millimetres (never into the spine with ``auto``).
    save_mask_path : path, optional
        Write the mask that was applied (uint8).
    sidecar : path, optional
        JSON sidecar to record the defacing in (created, or updated in place).

    Returns
    -------
    dict
        ``{"method", "face_found", "voxels_removed", "reason", ...}``.
    """
    from .anonymize import record_method, scrub_nifti

    if (mask is None) == (not auto):
        raise UsageError("give exactly one of --mask FILE or --auto")
    if margin_mm < 0:
        raise UsageError("--margin-mm must not be negative")
    ct, out = Path(ct), Path(out)
    data, affine = scrub_nifti(ct)
    if mask is not None:
        face = dilate_mm(drawn_face_mask(Path(mask), data.shape, affine), affine, margin_mm)
        report = FaceReport(True, "hand-drawn mask")
    else:
        hu = data.astype(np.float32, copy=False)
        face, report = auto_face_mask(hu, affine, margin_mm=margin_mm)
    removed = int(face.sum())
    if removed:
        data = _fill_dtype(data, fill).copy()
        data[face] = fill
        info(f"{ct}: removed the face ({removed} voxels set to {fill:g})")
    else:
        info(f"{ct}: {report.reason}; nothing changed")
    debug(f"deface details: {report.details}")

    result = {"method": "mask" if mask is not None else "auto", "face_found": report.face_found,
              "voxels_removed": removed, "reason": report.reason, "fill": fill, "margin_mm": margin_mm}
    side = None
    if sidecar is not None:
        side = read_json(sidecar) if Path(sidecar).exists() else {}
        if not isinstance(side, dict):
            raise DataError("the sidecar is not a JSON object", sidecar)
        record_method(side, defaced=True)
        side["Defacing"] = {"Method": "hand-drawn mask" if mask is not None else "automatic",
                            "FaceInFieldOfView": report.face_found, "VoxelsRemoved": removed,
                            "FillHU": fill, "MarginMm": margin_mm}
    save_nifti(fresh_image(data, affine), out)
    if save_mask_path is not None:
        save_mask(face.astype(np.uint8), affine, save_mask_path)
    if side is not None:
        write_json(side, sidecar)
    return result
