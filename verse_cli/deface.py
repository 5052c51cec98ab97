"""``verse deface``: remove the face from a CT, from a drawn mask or automatically.

With a mask (the VerSe way: a face mask drawn in ITK-SNAP) the voxels inside the
mask, dilated by ``margin_mm``, become ``fill`` (air).

Automatic defacing works on an axis-aligned RAS+ copy of the scan at 3 mm, so that
"anterior" and "superior" come from the affine, whatever the voxel order. A second copy
averages each 3 mm voxel over the scan: bone is a voxel over 200 HU whose 3 mm mean
passes 100 HU, and the skull is fitted and its brain judged on the mean alone, so that
per-voxel noise of a thin-slice or sharp-kernel scan is no bone:

1. **Is there a head?** The body (largest component above -400 HU once thin plates
   such as the table are opened away, and a table the head lies on is recognised as
   the wide band that is the same in most slices) is followed down from the top of the
   scan while its axial slices stay narrower than a head or neck (230 mm), and no
   further than a head and neck reach (330 mm: a slim trunk is as narrow as a neck).
   No such zone: no face.
2. **The cervical spine** is the bony column that spans most of the neck; its midline
   band is tracked upward to the skull base, recognised by the jump in midline bone
   (behind the column's front: a jaw touching the track in front does not count) where
   the skull meets C1, up to 30 mm above the thin run of C1's arches and dens; or, above
   that thin run, by a vertebra's worth of bone that spreads well in front of the column
   (dense arches make the column as wide in the midline band as the skull base). A jump
   above which the track's front falls back onto the column within 9 mm is a plate in
   front of it (a jaw in a flexed neck), not the floor of the skull: C1 lies above it, and
   the track is kept up to where it thins under the skull; unless the track's back reaches
   12 mm behind the column's there: the skull's floor spreads behind the foramen magnum, and
   the clivus rising from the basion above the dens is no further forward than the column.
   A thin floor (no jump) is the skull base too where the track reaches well in front of the
   column and, within 21 mm, well behind it: no vertebra is that long from front to back. Its
   anterior surface ``y_front`` is measured below that jump (below C1's thin run where the
   jump sits on it: flecks of C1 and the skull base's plate reaching down are no front of
   the column), may drift forward by at
   most 35 degrees (so bone touching the column cannot drag it), and takes the most
   anterior front within about a vertebra's height (a disc cannot pull it back, the
   lordosis may bring C1 back). For judging the chin the front never retreats going up;
   for protecting the spine it is the most anterior within a vertebra's height below (a
   sternum or clavicles touching the lowest slices must not hold it in front of C1); for
   both, above the measured slices it carries on with the column's own slope up to C1 (a
   flexed neck carries C1 forward).
3. **The head's axis** runs from the top of C1 to the centre of a sphere fitted to the
   skull vault (least squares, so a vault cut by the field of view still works; only bone
   within 20 mm of the skin, so the skull base deep inside does not pull it down). A skull
   holds a brain: a "skull" whose core holds bone above its centre (below it lie the petrous
   ridges, the clivus and the sphenoid), or is denser than brain (a pelvis or
   rib cage of a slim patient, narrow enough to pass for a head, around organs), means no
   head and no face. A scan that ends within 40 mm above C1 shows no vault: there a
   skull base on a neck (no deeper than 70 mm in front of the spine, unlike an abdomen)
   is the head on its own. A head flexed so far that its skull lies in front of the
   column's top shows no skull base in the midline band: there a sphere fitted to the
   bone above the track whose core holds brain (0-100 HU, no bone) and whose shell band
   is mostly bone (a skull, not ribs) is the head.
4. **The chin** is where the body reaches at least 25 mm further in front of the spine
   than at the shallowest neck level (slices whose front is cut by the edge of the
   scanned volume, as at the top of an oblique or short scan, are never the neck); with
   a skull found, also everything above a plane across the head's axis 55 mm below the
   top of C1 (tilted heads carry their chin with them), or 55 mm straight below it for a
   head cut at its skull base. None of these: no face.
5. **The cut** is ``y_front + 9 mm`` below the top of the spine track (C1) and, from
   15 mm above it (skull only), a line 10 mm behind C1's front; above C1 it runs
   parallel to the head's axis when a skull was fitted (vertical otherwise): the face's
   back plane runs through the skull base, behind the front of C1. Everything in front
   of the cut and above the chin goes (nose, lips, eyes, chin, jaw, and the front of the
   skull), except a 12 mm shell around the tracked spine, which is never touched. Less than 20 cm3 of tissue in front of the
   cut means the face lies outside the field of view: nothing changes.

The result is mapped back to the scan's own grid (nearest neighbour) and the voxel
data are otherwise copied unchanged, so a scan without a face is bit-identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .core.arrays import true_runs
from .core.errors import DataError, UsageError
from .core.io import fresh_image, load_mask, read_json, save_mask, save_nifti, write_json
from .core.progress import debug, info

COARSE_MM = 3.0
BODY_HU = -400.0
BONE_HU = 200.0
# A voxel over BONE_HU counts as bone only if its mean over COARSE_MM passes this too: one noisy
# voxel in a brain does not, while thin or low-density vertebrae (cortex over cancellous bone) do.
BONE_SOLID_HU = 100.0
HEAD_NECK_MAX_WIDTH_MM = 230.0
# Vertex to the shoulders is about 300 mm in adults: a slim patient's trunk, as narrow as a neck, must
# not stretch the zone over the whole spine (a thoracic "skull base" with the chest above it as skull).
HEAD_NECK_MAX_HEIGHT_MM = 330.0
MIN_ZONE_MM = 30.0
MIDLINE_HALF_WIDTH_MM = 25.0
CHIN_MIN_PROTRUSION_MM = 40.0
CHIN_EXTRA_OVER_NECK_MM = 25.0
CHIN_MIN_RUN_MM = 15.0
CHIN_EXTEND_MM = 12.0  # start the cut below the level where the chin is first detected
CLEARANCE_MM = 9.0  # cut this far in front of the spine's anterior surface (the shell guards it)
PROTECT_MM = 12.0  # shell around the tracked spine that is never removed
CHIN_BELOW_C1_MM = 55.0  # chin below the top of C1, along the head axis (or straight down)
MIN_FACE_CM3 = 20.0
FOV_EDGE_MM = 15.0
CLEARANCE_ABOVE_C1_MM = -10.0  # above the spine track the cut runs this far behind its front ...
SKULL_ONLY_ABOVE_C1_MM = 15.0  # ... from this far above its top (C1's arch or the dens may reach past it)
PROTECT_ABOVE_SKULL_BASE_MM = 6.0  # a body front this close to the scanned volume's front edge is cut by it
HEAD_RADIUS_MM = (50.0, 130.0)
HEAD_MAX_SLOPE = 1.0
# The vault lies under the scalp (5-8 mm, the temporal muscles 15 mm): the sphere is fitted to bone within
# this depth of the skin. The skull base (clivus, petrous ridges, sphenoid) lies 40 mm and more deep; fitted
# with the vault, it pulls the sphere down and shrinks it, so that its core holds the base's bone.
SKULL_VAULT_DEPTH_MM = 20.0
SKULL_CORE = 0.6  # the core of the fitted skull sphere, as a share of its radius ...
SKULL_CORE_MIN_CM3 = 50.0  # ... whose upper half is judged when at least this much of it was scanned ...
# ... and at least this share of it: a scan ending little above the sphere's centre holds, of the upper
# core, only its bottom, where the skull base's front (the orbital roofs, the anterior fossa) rises
# (full-scale synthetic head 72, its vault cut 20 mm above the centre: 57 % scanned, 10 % bone) ...
SKULL_UPPER_MIN_SHARE = 0.6
# ... holds brain, not bone, in its upper half (a pelvis fitted as a sphere: 19 % in all). The lower half
# of a real head's core holds the skull base, the petrous ridges, the clivus and the sphenoid reaching up
# to the sella (synthetic heads: up to 17 %); above the sphere's centre lies only brain (heads: under 2 %).
SKULL_CORE_MAX_BONE = 0.06
# Brain is 20-45 HU (60 with contrast): a core whose median is denser is a trunk (organs with bone and
# contrast; a child-sized lumbar scan's lower chest fitted as a sphere: 197 HU). Judged from a smaller
# scanned share of the core than the bone share, which a few slices of vertebra would swing.
BRAIN_MAX_HU = 100.0
BRAIN_CORE_MIN_CM3 = 20.0
# Without a skull base in the midline band (a head flexed so far that the skull lies in front of the
# column's top), a head is recognised by its skull alone: a core of brain (CSF 0-15 HU, brain 20-45)
# inside a shell band that is mostly bone. The skull's band is closed bone (synthetic head 28, cut by
# the field of view: 52 %); ribs around organs leave wide gaps, and lungs (-800 HU) are no brain.
BRAIN_MIN_HU = 0.0
SKULL_SHELL_BAND_MM = 6.0
SKULL_SHELL_MIN_BONE = 0.4


@dataclass
class FaceReport:
    """What automatic detection found, in words and numbers (for the log and the sidecar)."""

    face_found: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- coarse RAS grid
def coarse_ras(hu: np.ndarray, affine: np.ndarray, step: float = COARSE_MM,
               averaged: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The scan resampled onto an axis-aligned RAS+ grid of ``step`` mm covering it.

    ``averaged``: each coarse voxel is the mean over about ``step`` mm of the scan, not an
    interpolation between its nearest voxels. Linear interpolation keeps each fine voxel's
    noise (100-200 HU in a thin-slice or sharp-kernel scan), which speckles a brain with
    "bone"; the mean over a 3 mm box does not, while a skull keeps its bone. The scan is
    pooled in blocks of about ``step`` mm first and the block means are interpolated: a
    moving mean on the scan's own grid would hold a second full-size copy (600 MB for a
    512 x 512 x 600 scan), the pooled one one value per block.
    """
    from .core.geometry import resample_to_grid, spacing, vox2world

    shape = np.asarray(hu.shape[:3])
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)], dtype=np.float64)
    world = vox2world(affine, corners)
    # One voxel of padding all round, so that faces cut by the field of view map back to its edge.
    lo, hi = world.min(axis=0) - step, world.max(axis=0) + step
    out_shape = tuple(int(v) for v in np.floor((hi - lo) / step) + 1)
    grid = np.diag([step, step, step, 1.0])
    grid[:3, 3] = lo
    box = [max(1, round(step / float(sp))) for sp in spacing(affine)]
    if averaged and max(box) > 1:
        return pooled_to_grid(hu, affine, box, out_shape, grid), grid
    coarse = resample_to_grid(hu, affine, out_shape, grid, order=1, cval=-1024.0)
    return coarse, grid


def pooled_to_grid(hu: np.ndarray, affine: np.ndarray, box, out_shape, grid: np.ndarray) -> np.ndarray:
    """Block means of ``box`` voxels interpolated onto ``(out_shape, grid)``, air outside the scan.

    The block centres stop half a block short of the scan's edges (and a partial block at the
    far edge is dropped): the edge blocks are carried to the edge, so that a skull or face cut
    by the field of view keeps its bone up to it.
    """
    from scipy import ndimage

    from .detect import block_mean

    pooled, pooled_affine = block_mean(hu, affine, box)
    matrix = np.linalg.inv(pooled_affine) @ np.asarray(grid, dtype=np.float64)
    coarse = ndimage.affine_transform(pooled, matrix[:3, :3], offset=matrix[:3, 3], output_shape=tuple(out_shape),
                                      order=1, mode="nearest", prefilter=False, output=np.float32)
    coarse[~scan_coverage(hu.shape, affine, grid, out_shape)] = -1024.0
    return coarse


def scan_coverage(shape, affine: np.ndarray, grid: np.ndarray, grid_shape) -> np.ndarray:
    """Bool mask on the coarse grid of the voxels that lie inside the scanned volume."""
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(grid, dtype=np.float64)
    axes = [np.arange(n, dtype=np.float32) for n in grid_shape]
    inside = np.ones(tuple(grid_shape), bool)
    for a in range(3):  # voxel index of the scan along its axis a, one broadcast sum per axis
        ijk = (m[a, 0] * axes[0][:, None, None] + m[a, 1] * axes[1][None, :, None]
               + m[a, 2] * axes[2][None, None, :] + m[a, 3])
        inside &= (ijk >= -0.5) & (ijk <= shape[a] - 0.5)
    return inside


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def body_mask(tissue: np.ndarray) -> np.ndarray:
    """The patient: the largest component once thin plates (the table, blankets) are opened away."""
    from scipy import ndimage

    ball = ndimage.generate_binary_structure(3, 1)
    core = _largest_component(ndimage.binary_opening(tissue, structure=ball, iterations=2))
    if not core.any():
        return _largest_component(tissue)
    return tissue & ndimage.binary_dilation(core, structure=ball, iterations=3)


TABLE_MIN_WIDTH_MM = 150.0  # wider than any neck
TABLE_MAX_THICKNESS_MM = 60.0
# A table may end before the scan does (its head end, a head holder beyond it): full-scale synthetic
# head 39 (oblique) has its table in 108 of the 114 scanned slices of each column, 0.947.
TABLE_MIN_SHARE = 0.85
# Share of a table's columns that may hold some of the patient on its far side too (an arm hanging
# over its edge, a cable beneath it); a band inside the patient has the patient over all of it.
TABLE_MAX_BEYOND_SHARE = 0.2


def table_columns(tissue: np.ndarray, inside: np.ndarray | None, step: float) -> np.ndarray:
    """(x, y) bool: the patient table, where the body touches it.

    A table is the same in every axial slice: tissue in most scanned slices of an
    (x, y) column, in rows whose run along x is wider than any neck (``TABLE_MIN_WIDTH_MM``),
    forming a band no thicker than ``TABLE_MAX_THICKNESS_MM`` with the patient on one side
    only: beyond it lie air or other such bands (a table's lower layers). The patient
    changes from head to neck to shoulders, so little of it is invariant over such a width;
    where some is (a broad head above a broad neck in a short scan), it has the patient
    on both sides.
    """
    from scipy import ndimage

    nz = tissue.shape[2]
    if inside is None:
        seen = np.full(tissue.shape[:2], nz)
        hits = tissue.sum(axis=2)
    else:
        seen = inside.sum(axis=2)
        hits = (tissue & inside).sum(axis=2)
    inv = (seen >= 0.5 * nz) & (hits >= TABLE_MIN_SHARE * np.maximum(seen, 1))
    # longest run along x per row y: an opening with a line as long as the table is wide
    line = np.ones((max(1, round(TABLE_MIN_WIDTH_MM / step)), 1), bool)
    wide = ndimage.binary_opening(inv, structure=line)
    table = np.zeros(tissue.shape[:2], bool)
    elsewhere = tissue.any(axis=2) & ~wide  # (x, y): the patient, seen in any slice
    for lo, hi in true_runs(wide.any(axis=0)):
        if (hi - lo) * step > TABLE_MAX_THICKNESS_MM:
            continue
        band = wide[:, lo:hi].any(axis=1)
        behind = elsewhere[band, :lo].any(axis=1).mean()
        ahead = elsewhere[band, hi:].any(axis=1).mean()
        if min(behind, ahead) <= TABLE_MAX_BEYOND_SHARE:
            table[:, lo:hi] = wide[:, lo:hi]
    return table


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


# --------------------------------------------------------------------------- detection
SPINE_MAX_SLOPE = 0.7  # mm forward per mm up that the spine front may move (35 degrees)
SPINE_SHELL_LAG_MM = 15.0
# Bone further than this in front of the spine's local front (:func:`spine_front`'s ``y_reach``) is
# trimmed from the track before the shell is grown: vertebrae reach at most ~13 mm past that front
# (C1's arch in a 45-degree flexed neck), which the shell still covers, while the skull base's plate
# in front of C1 (no vertebra) gets no shell that would reach into the face, whose back lies 20-30 mm
# in front of C1.
SPINE_TRIM_MM = 8.0
SPINE_EXTEND_FIT_MM = 45.0
SPINE_FRONT_HALF_WINDOW_MM = 15.0


def spine_front(spine: np.ndarray, ys: np.ndarray, zs: np.ndarray,
                extend_to: float | None = None) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Anterior surface (y, mm) of the tracked spine for every axial slice, the top (z, mm)
    of the slices where it was measured on the column itself, the same surface made
    never to retreat going up (for judging what protrudes in front of the neck: a thoracic
    kyphosis bending back must not make the chest look like a chin), and the front the
    vertebrae reach, a flexed C1 included: the most anterior within a vertebra's height
    below (for trimming the track).

    Per slice the most anterior spine voxel, followed up from the lowest slices (their
    median) with the forward step limited to ``SPINE_MAX_SLOPE`` per mm: bone that
    touches the column (skull base, jaw) may not drag the front forward faster than the
    cervical lordosis does. A disc or a thin slice never pulls it back: each slice takes
    the most anterior front within ``SPINE_FRONT_HALF_WINDOW_MM`` (about a vertebra's
    height) either side, while the lordosis itself may still bring C1 back. Above the
    measured slices, up to ``extend_to`` (the top of C1, where the skull base hides the column's front), the front
    carries on with the column's slope over its last ``SPINE_EXTEND_FIT_MM``: a flexed neck
    carries C1 forward.
    """
    from scipy import ndimage

    _, y_max = _extent(spine.any(axis=0), ys)
    known = np.flatnonzero(~np.isnan(y_max))
    raw = y_max[known]
    limited = limit_forward_creep(raw, zs[known])
    y_front = np.interp(np.arange(len(zs)), known, limited)
    rise = np.zeros(len(zs))
    if extend_to is not None and extend_to > zs[known[-1]]:
        recent = known[zs[known] >= zs[known[-1]] - SPINE_EXTEND_FIT_MM]
        slope = 0.0
        if recent.size >= 3:
            from scipy.stats import theilslopes  # robust: a jaw touching the top slices cannot tip it

            slope = float(np.clip(theilslopes(limited[-recent.size:], zs[recent])[0], 0.0, SPINE_MAX_SLOPE))
        z_end = min(float(extend_to), float(zs[-1]))
        rise = slope * (np.clip(zs, zs[known[-1]], z_end) - zs[known[-1]])
    y_up = np.maximum.accumulate(y_front + rise)
    # A disc or a thin slice must not pull the front back: the front is the most anterior
    # within a vertebra's height either side (the lordosis itself may bring C1 back again).
    half = max(1, round(SPINE_FRONT_HALF_WINDOW_MM / float(zs[1] - zs[0])))
    # Like y_up, but forgetting what lies more than a vertebra's height below: bone in front of the
    # lowest slices (sternum, clavicles joined to the track) holds y_up 15-20 mm in front of C1, and
    # the skull base's plate kept that far forward shields the face.
    below = np.lib.stride_tricks.sliding_window_view(np.pad(y_front + rise, (half, 0), mode="edge"), half + 1)
    y_reach = below.max(axis=1)
    y_front = ndimage.maximum_filter1d(y_front, size=2 * half + 1, mode="nearest")
    z_last = zs[known[-1]]
    on_column = known[raw >= y_front[known] - SPINE_SHELL_LAG_MM]
    return y_front, float(zs[on_column[-1]] if on_column.size else z_last), y_up, y_reach


def tallest_column(bone: np.ndarray, lower: slice, step: float) -> np.ndarray | None:
    """The bone structure that spans the most axial slices within ``lower`` (the neck).

    Discs split the column into vertebrae, so gaps of up to ~12 mm along z are bridged
    before labelling. The bottom slices alone may hold clavicles or scapulae; the
    column is what runs the whole height.
    """
    from scipy import ndimage

    bridge = np.ones((1, 1, 2 * max(1, round(6.0 / step)) + 1), bool)
    labels, n = ndimage.label(ndimage.binary_closing(bone, structure=bridge) | bone)
    if n == 0:
        return None
    part = labels[:, :, lower]
    hits = np.zeros((n + 1, part.shape[2]), bool)
    slice_index = np.broadcast_to(np.arange(part.shape[2]), part.shape)
    hits[part.ravel(), slice_index.ravel()] = True
    height = hits[1:].sum(axis=1)
    if height.max() == 0:
        return None
    return labels == int(height.argmax()) + 1


# Cross-section jump where the skull base meets C1. Denser vertebral bodies (adult cancellous
# bone, synth 646bb6c) widen the column's own cross-section, so the relative jump is smaller:
# synthetic head 28 (scale 0.4) showed 204 against 1.35 x 152 = 205.
SKULL_BASE_SPIKE = 1.30
SKULL_BASE_LOOKBACK_MM = 9.0  # the column's front just below a slice ...
SKULL_BASE_AHEAD_MM = 10.0  # ... and how far in front of it a skull base's bone may reach
# The skull's floor and the occipital bone reach at least this far behind the column's back just below
# the skull base (synthetic heads 14 and 36: 27 and 30 mm within a slice; 87 on a 3 mm LPS grid, whose
# occipital bone comes down slowly: 12 mm within 21 mm); a jaw in front of the column, none.
SKULL_BASE_BEHIND_MM = 12.0
C1_GAP_MM = 30.0  # C1 (arches and dens) is thin in the midline band: a jump this far above a thin run counts
C1_SLICES_MM = 21.0  # keep this much of the track above the jump (all of C1 and the dens)


def cut_at_skull_base(spine: np.ndarray, zone_lo: int, step: float) -> tuple[np.ndarray, bool, int, int]:
    """Drop what the spine track picked up above C1; also say whether a skull base was seen,
    from which slice (the jump; without one, where the column ends), and below which slice the track is
    free of it (for measuring the spine's front: below C1's thin run when the skull base sits on it).

    Within the midline band the cervical column has a steady cross-section. Where the
    skull base sits on C1 the band suddenly holds much more bone (a jump above
    ``SKULL_BASE_SPIKE`` times a vertebra's cross-section below, counting only bone behind the
    column's front just below plus ``SKULL_BASE_AHEAD_MM``, so that a jaw touching the
    track in front does not count); above it lies only the skull shell. C1 itself (two
    arches and the dens) is thin in the band, so a jump up to ``C1_GAP_MM`` above a thin run is still the skull base;
    so is, there, bone as much as a vertebra's cross-section that reaches ``SKULL_BASE_AHEAD_MM`` further
    forward than the column below the thin run (no jump shows where dense arches make the column as wide
    as the skull base in the band; the next vertebra above a disc stays on the column's front).
    Without a jump, the column ends where two consecutive slices hold less than half the
    typical cross-section (the scan reaches above C1 without a skull base in the band),
    or at the top of the track.
    """
    counts = spine.sum(axis=(0, 1))
    present = np.flatnonzero(counts > 0)
    if present.size < 6:
        return spine, False, spine.shape[2], spine.shape[2]
    # The typical cross-section comes from the lower third of the track: a head tilted forward
    # or a long view of the skull can fill its upper half.
    lower = present[2: max(5, present.size // 3)]
    typical = float(np.median(counts[lower]))
    start = int(lower[-1]) + 1
    # Bone that joins the track well in front of the column just below (a jaw touching the skull)
    # is no skull base: count only what lies behind that front plus a margin.
    profile = spine.sum(axis=0)  # (y, z)
    has = profile > 0
    front = np.where(has.any(axis=0), spine.shape[1] - 1 - has[::-1].argmax(axis=0), -1)
    back = np.where(has.any(axis=0), has.argmax(axis=0), -1)
    look = max(1, round(SKULL_BASE_LOOKBACK_MM / step))
    prev = np.full_like(front, -1)
    for lag in range(1, look + 1):  # a handful of shifted copies of a 1D array
        prev[lag:] = np.maximum(prev[lag:], front[:-lag])
    limit = np.where(prev >= 0, prev + round(SKULL_BASE_AHEAD_MM / step), spine.shape[1] - 1)
    behind = np.cumsum(profile, axis=0)[np.clip(limit, 0, spine.shape[1] - 1), np.arange(spine.shape[2])]
    full = float(np.percentile(counts[lower], 75))  # a vertebra's cross-section, not a disc's
    spikes = np.flatnonzero(behind[start:] > SKULL_BASE_SPIKE * full) + start
    spread = spreads_both_ways(front, back, counts >= typical, present, start, step)
    if spread.size and (not spikes.size or spread[0] < spikes[0]):
        spikes = spread
    plate_top = plates_in_front(spikes, front, back, present, step)
    thin = counts < 0.5 * typical
    drops = np.flatnonzero(thin[start:-1] & thin[start + 1:]) + start
    if drops.size:
        # Above C1's thin run, a vertebra's cross-section of bone that also reaches well in front of
        # the column is the skull base, though no wider in the band than a vertebra: with dense arches
        # the column is as wide there as the skull base. (The next vertebra above a disc that thinned
        # the track lies right on the column's front.)
        gap = int(drops[0]) + np.arange(2, max(3, round(C1_GAP_MM / step) + 1))
        gap = gap[gap < len(behind)]
        below_c1 = prev[int(drops[0])]  # the column's front under the thin run
        spreads = front[gap] > below_c1 + round(SKULL_BASE_AHEAD_MM / step)
        regrown = gap[(behind[gap] >= full) & spreads] if below_c1 >= 0 else gap[:0]
        if regrown.size and (not spikes.size or regrown[0] < spikes[0]):
            spikes = regrown
    if spikes.size and (not drops.size or spikes[0] * step <= drops[0] * step + C1_GAP_MM):
        end, skull, clean = int(spikes[0]) + max(1, round(C1_SLICES_MM / step)), True, int(spikes[0])
        measure_to = clean
        if plate_top[spikes[0]] >= 0:
            # A plate in front of the column (a jaw) with the column going on above it: C1 lies above
            # the plate, not within C1_SLICES_MM of it; keep the track up to where it thins under the skull.
            above = drops[drops > plate_top[spikes[0]]]
            end = max(end, int(above[0])) if above.size else end
        elif drops.size and drops[0] < spikes[0]:
            # The skull base sits on C1's thin run: there the band holds a few flecks of C1 and the
            # skull base's plate reaching down in front of it, no front of the column to measure.
            measure_to = int(drops[0])
    elif drops.size:
        end, skull, clean = int(drops[0]), False, int(drops[0])
        measure_to = clean
    else:
        return spine, False, spine.shape[2], spine.shape[2]
    spine = spine.copy()
    spine[:, :, end:] = False
    return spine, skull, clean, measure_to


def spreads_both_ways(front: np.ndarray, back: np.ndarray, solid: np.ndarray, present: np.ndarray, start: int,
                      step: float) -> np.ndarray:
    """Slices from ``start`` up where the track reaches ``SKULL_BASE_AHEAD_MM`` in front of the
    column's front (followed up with at most ``SPINE_MAX_SLOPE`` of forward creep) and, within
    ``C1_SLICES_MM`` above, ``SKULL_BASE_BEHIND_MM`` behind the column's back over ``C1_SLICES_MM``
    below (its median: a tilted skull's occipital bone may come down behind C1 before its floor
    reaches forward): the first run of them that holds a slice of the column's typical cross-section (``solid``).

    The skull base is a floor spanning the band from the clivus in front to the occipital bone behind
    the foramen magnum. Where it is thin (a posterior fossa's floor is 1-4 mm) its cross-section in
    the band is no bigger than a vertebra's, but it is longer from front to back than any vertebra:
    a jaw in front of the column spreads forward only, a spinous process backward only.
    """
    out = np.zeros(0, int)
    if present.size < 3:
        return out
    ahead = (front >= 0) & (front > column_front(front, present) + SKULL_BASE_AHEAD_MM / step)
    ahead[:start] = False
    reach = max(1, round(C1_SLICES_MM / step))
    for lo, hi in true_runs(ahead):  # a few runs
        if solid[lo: hi].any() and reaches_behind(back[max(0, lo - reach): lo], back[lo: lo + reach],
                                                   SKULL_BASE_BEHIND_MM / step, np.median):
            return np.arange(lo, hi)
    return out


def plates_in_front(spikes: np.ndarray, front: np.ndarray, back: np.ndarray, present: np.ndarray,
                    step: float) -> np.ndarray:
    """Per slice, the top slice of the run of ``spikes`` it belongs to when that run is a plate in front
    of the column (else -1): a run above which the track's front falls back onto the column within a
    few slices, while its back never reaches behind the column's.

    The skull base is the floor of the skull: above it the track holds skull, or the scan ends. A jaw
    that joins the column in a flexed neck is a plate in front of C2-C3: it can fill the midline band
    like the skull base (creeping into the track from below, it carries the "column's front" of the
    jump test with it), but above it the track is the column again, its front back within
    ``SKULL_BASE_AHEAD_MM`` of the column's own front (followed up from below with at most
    ``SPINE_MAX_SLOPE`` of forward creep). The front alone does not tell them apart: the clivus rises
    from the basion right above the dens, no further forward than the column. The back does: the
    skull's floor spreads behind the foramen magnum and the occipital bone rises behind it, at least
    ``SKULL_BASE_BEHIND_MM`` behind the column's back (spinous processes) just below; a jaw in front
    leaves the back alone.
    """
    top = np.full(len(front), -1)
    if not spikes.size:
        return top
    back_on_column = (front >= 0) & (front <= column_front(front, present) + SKULL_BASE_AHEAD_MM / step)
    look = max(1, round(SKULL_BASE_LOOKBACK_MM / step))
    for run in np.split(np.arange(len(spikes)), np.flatnonzero(np.diff(spikes) > 1) + 1):  # a few runs
        start, end = int(spikes[run[0]]), int(spikes[run[-1]])
        spreads_back = reaches_behind(back[max(0, start - look): start], back[start: end + 1 + look],
                                      SKULL_BASE_BEHIND_MM / step, np.min)
        if back_on_column[end + 1: end + 1 + look].any() and not spreads_back:
            top[spikes[run]] = end
    return top


def column_front(front: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per slice, the column's front followed up the ``present`` slices with at most
    ``SPINE_MAX_SLOPE`` of forward creep (voxels; -1 where the track is empty)."""
    creep = np.full(len(front), -1.0)
    creep[present] = limit_forward_creep(front[present].astype(float), present.astype(float))
    return creep


def reaches_behind(below: np.ndarray, above: np.ndarray, behind: float, reference) -> bool:
    """Whether the track's back (per slice, voxels; -1 where empty) ``above`` reaches ``behind``
    further back than ``reference`` (``np.min`` or ``np.median``) of its back ``below``."""
    below, above = below[below >= 0], above[above >= 0]
    return bool(below.size and above.size and above.min() <= reference(below) - behind)


def limit_forward_creep(front: np.ndarray, z: np.ndarray, max_slope: float = SPINE_MAX_SLOPE) -> np.ndarray:
    """The spine's front followed up from its lowest slices (their median), moving forward by at
    most ``max_slope`` per unit of ``z``; it may move back freely. Bone that touches the column
    (a jaw, the skull base) cannot drag it faster than the cervical lordosis does."""
    start = np.array(front, dtype=float)
    start[0] = np.median(start[:5])
    # limited[i] = min(front[i], limited[i - 1] + rise): a running minimum in the frame that
    # moves forward at max_slope
    climb = max_slope * (np.asarray(z, dtype=float) - float(z[0]))
    return np.minimum.accumulate(start - climb) + climb


def column_midline(column: np.ndarray, xs: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """x (mm) of the column's middle for every slice: a Theil-Sen line through per-slice medians."""
    from scipy.stats import theilslopes

    counts = column.sum(axis=1)  # (x, z)
    has = counts.sum(axis=0) > 0
    cumulative = np.cumsum(counts, axis=0)
    median_index = (cumulative >= cumulative[-1] / 2).argmax(axis=0)
    x_med = xs[median_index][has]
    if has.sum() >= 3:
        slope, intercept, _, _ = theilslopes(x_med, zs[has])
        return intercept + slope * zs
    return np.full(len(zs), float(np.median(x_med)))


@dataclass
class SkullFit:
    """A sphere fitted to the bone above C1, and what its inner core holds."""

    centre: np.ndarray  # mm, on the coarse grid
    radius: float
    core_cm3: float = 0.0  # scanned volume of the core (``SKULL_CORE`` of the radius)
    upper_cm3: float = 0.0  # scanned volume of the core's upper half (above the centre) ...
    core_bone: float = 0.0  # ... and its share that is bone
    core_median_hu: float | None = None
    shell_bone: float = 0.0  # share of the scanned shell band (``SKULL_SHELL_BAND_MM``) that is bone

    @property
    def encloses_no_brain(self) -> bool:
        """A pelvis or rib cage fitted as a sphere: its core holds bone or organs denser than brain."""
        if self.core_median_hu is not None and self.core_cm3 >= BRAIN_CORE_MIN_CM3 \
                and self.core_median_hu > BRAIN_MAX_HU:
            return True
        upper_half = 2.0 / 3.0 * np.pi * (SKULL_CORE * self.radius) ** 3 / 1000.0  # cm3
        return (self.upper_cm3 >= max(SKULL_CORE_MIN_CM3, SKULL_UPPER_MIN_SHARE * upper_half)
                and self.core_bone > SKULL_CORE_MAX_BONE)

    @property
    def holds_brain(self) -> bool:
        """Positive evidence of a head: a closed bone shell around a core of brain density."""
        return (self.core_median_hu is not None and self.core_cm3 >= BRAIN_CORE_MIN_CM3
                and BRAIN_MIN_HU <= self.core_median_hu <= BRAIN_MAX_HU
                and self.core_bone <= SKULL_CORE_MAX_BONE and self.shell_bone >= SKULL_SHELL_MIN_BONE)


def fit_skull(bone: np.ndarray, body: np.ndarray, zs: np.ndarray, z_from: float, step: float,
              inside: np.ndarray | None = None, hu: np.ndarray | None = None) -> SkullFit | None:
    """Sphere through the vault's bone above ``z_from`` (mm), or None when implausible as a skull.

    Linear least squares copes with a vault cut by the field of view. Only bone within
    ``SKULL_VAULT_DEPTH_MM`` of the skin is fitted (:func:`outer_bone`): the skull base lies deep
    inside the head. The core and the shell band are judged only where the scan has data
    (``inside``); the core's bone share in its upper half only, above the skull base.
    """
    above = outer_bone(bone & body, body, inside, step) & (zs[None, None, :] > z_from)
    pts = np.argwhere(above)
    if len(pts) < 200:
        return None
    xyz = pts * step
    a = np.c_[2 * xyz, np.ones(len(xyz))]
    b = (xyz ** 2).sum(axis=1)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    centre = sol[:3]
    radius = float(np.sqrt(max(sol[3] + centre @ centre, 0.0)))
    if not HEAD_RADIUS_MM[0] <= radius <= HEAD_RADIUS_MM[1] or centre[2] <= z_from + 10.0:
        return None
    fit = SkullFit(centre, radius)
    reach = radius + SKULL_SHELL_BAND_MM
    lo = np.maximum(np.floor((centre - reach) / step).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / step).astype(int) + 1, bone.shape)
    if not np.all(hi > lo):
        return fit
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    grid = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    dist = np.sqrt(sum((g * step - c) ** 2 for g, c in zip(grid, centre)))
    scanned = np.ones(dist.shape, bool) if inside is None else inside[box]
    core = (dist <= SKULL_CORE * radius) & scanned
    band = (np.abs(dist - radius) < SKULL_SHELL_BAND_MM) & scanned
    fit.core_cm3 = float(core.sum()) * step ** 3 / 1000.0
    upper = core & (grid[2] * step >= centre[2])
    fit.upper_cm3 = float(upper.sum()) * step ** 3 / 1000.0
    if upper.any():
        fit.core_bone = float(bone[box][upper].mean())
    if core.any() and hu is not None:
        fit.core_median_hu = float(np.median(hu[box][core]))
    if band.any():
        fit.shell_bone = float(bone[box][band].mean())
    return fit


def outer_bone(bone: np.ndarray, body: np.ndarray, inside: np.ndarray | None, step: float) -> np.ndarray:
    """The bone within ``SKULL_VAULT_DEPTH_MM`` of the skin: the vault, not the skull base inside.

    Depth is the distance to the nearest voxel outside the body; the edge of the scanned volume
    is no skin (a vault cut by the field of view keeps its depth there).
    """
    from scipy import ndimage

    solid = body if inside is None else body | ~inside
    return bone & (ndimage.distance_transform_edt(solid, sampling=step) <= SKULL_VAULT_DEPTH_MM)


def head_axis(fit: SkullFit, z_c1: float, y_c1: float) -> float:
    """Forward tilt (dy/dz) of the line from the top of C1 to the skull's centre."""
    slope = (fit.centre[1] - y_c1) / (fit.centre[2] - z_c1)
    return float(np.clip(slope, -HEAD_MAX_SLOPE, HEAD_MAX_SLOPE))


VAULT_OUT_OF_VIEW_MM = 40.0  # a scan ending this close above C1 cannot show the skull vault (it rises ~100 mm higher)
NECK_MAX_DEPTH_MM = 70.0  # skin to the cervical spine's front at the larynx: 30-60 mm (an abdomen: over 80 mm)


def head_cut_at_skull_base(zs: np.ndarray, top: int, inside: np.ndarray | None, z_c1: float,
                           neck_depth: float) -> bool:
    """Whether a skull base without a fitted vault is a head cut by the top of the field of view.

    The scanned volume (not just the body: a body that ends in air this low is no head) must end
    within ``VAULT_OUT_OF_VIEW_MM`` above the top of C1, and the shallowest level in front of the
    spine must be as shallow as a neck (under ``NECK_MAX_DEPTH_MM``), not an abdomen.
    """
    scan_top = zs[top] if inside is None else zs[int(np.flatnonzero(inside.any(axis=(0, 1)))[-1])]
    return bool(max(zs[top], scan_top) - z_c1 <= VAULT_OUT_OF_VIEW_MM and neck_depth < NECK_MAX_DEPTH_MM)


# A level within this of the shallowest is as shallow (a neck's front is flat over 20-40 mm) ...
NECK_FLAT_MM = 3.0
NECK_ABOVE_BOTTOM_MM = 15.0  # ... and one this far above the bottom of the zone narrows above the trunk


def neck_above_bottom(smooth: np.ndarray, in_zone: np.ndarray, step: float) -> bool:
    """Whether the body narrows into a neck above the bottom of the zone (``in_zone``, the levels
    where the neck may lie): the shallowest level in front of the spine (``smooth``) lies above the
    zone's lowest level, or a level ``NECK_ABOVE_BOTTOM_MM`` or more above it is as shallow (within
    ``NECK_FLAT_MM``). A flat neck over the shoulders may be shallowest by a millimetre at its
    bottom; a chest whose front rises toward the top of the scan is shallowest there alone.
    """
    depth = smooth[in_zone]
    if int(in_zone[np.argmin(depth)]) != int(in_zone.min()):
        return True
    shallow = in_zone[depth <= depth.min() + NECK_FLAT_MM]
    return bool(((shallow - in_zone.min()) * step >= NECK_ABOVE_BOTTOM_MM).any())


def find_face(coarse: np.ndarray, step: float = COARSE_MM, margin_mm: float = 0.0,
              inside: np.ndarray | None = None,
              averaged: np.ndarray | None = None) -> tuple[np.ndarray | None, FaceReport]:
    """Face mask on the coarse RAS grid (or None) and a report of how it was found.

    Parameters
    ----------
    coarse : ndarray
        HU on an axis-aligned RAS+ grid (axis 0 = R, 1 = A, 2 = S) with ``step`` mm voxels.
    margin_mm : float
        Start the cut this much lower (below the chin); the spine side never moves.
    inside : ndarray, optional
        Bool, the coarse voxels inside the scanned volume (:func:`scan_coverage`). Slices
        whose front is cut by the field of view (an oblique or short scan) then never
        count as the neck, the shallowest level in front of the spine.
    averaged : ndarray, optional
        The same grid with each voxel the mean over ``step`` mm (``coarse_ras(...,
        averaged=True)``): the skull and the brain are judged on it, so that per-voxel noise
        is no bone in the brain. The spine is tracked on ``coarse`` where the mean passes
        ``BONE_SOLID_HU`` only (not ``BONE_HU``: thin, low-density vertebrae fall under it).
    """
    from scipy import ndimage

    nx, ny, nz = coarse.shape
    xs, ys, zs = (np.arange(n) * step for n in (nx, ny, nz))
    tissue = coarse > BODY_HU
    tissue &= ~table_columns(tissue, inside, step)[:, :, None]
    body = _fill_axial_holes(body_mask(tissue))
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
    lowest = max(0, top - round(HEAD_NECK_MAX_HEIGHT_MM / step) + 1)
    while zone_lo > lowest and narrow[zone_lo - 1]:
        zone_lo -= 1
    zone_mm = (top - zone_lo + 1) * step
    if zone_mm < MIN_ZONE_MM:
        return None, FaceReport(False, f"only {zone_mm:.0f} mm of neck at the top of the scan: no face",
                                {"zone_mm": zone_mm})

    # 2. the cervical spine: the bone column that spans most of the neck, then its midline band
    zone = np.zeros(nz, bool)
    zone[zone_lo:] = True  # up to the top edge: the head may be cut by the field of view
    bone = (coarse > BONE_HU) & body & zone[None, None, :]
    if averaged is not None:  # noise in the brain or the neck: bone only where its surroundings are dense too
        bone &= averaged > BONE_SOLID_HU
    lower = slice(zone_lo, zone_lo + max(2, int((top - zone_lo) * 0.6)) + 1)
    column = tallest_column(bone, lower, step)
    if column is None:
        return None, FaceReport(False, "no bone column (cervical spine) in the neck: no face", {"zone_mm": zone_mm})
    x_spine = column_midline(column, xs, zs)
    midline = np.abs(xs[:, None] - x_spine[None, :]) < MIDLINE_HALF_WIDTH_MM  # (x, z)
    spine = tallest_column(bone & midline[:, None, :], lower, step)
    if spine is None:
        return None, FaceReport(False, "cervical spine not found: no face", {"zone_mm": zone_mm})
    spine, skull_base, clean, measure_to = cut_at_skull_base(spine, zone_lo, step)
    has_spine = spine.any(axis=(0, 1))
    measured = spine.copy()
    measured[:, :, measure_to:] = False  # the skull base touching C1 would drag the front forward
    track_top = float(zs[np.flatnonzero(has_spine)[-1]])
    y_front, spine_top, y_front_up, y_reach = spine_front(measured if measured.any() else spine, ys, zs,
                                                          extend_to=track_top)
    spine_top = max(spine_top, track_top)
    # Bone that merely touches the column (jaw, skull base) is not spine: trim it before the shell
    # (a front lagging behind a steep lordosis leaves the vertebrae within the shell's reach).
    spine &= ys[None, :, None] <= (y_reach + SPINE_TRIM_MM)[None, None, :]

    # 3. the chin: the body reaches clearly further forward than the neck does
    _, y_mid_front = _extent((body & midline[:, None, :]).any(axis=0), ys)
    protrusion = np.nan_to_num(y_mid_front - y_front_up, nan=0.0)
    # The neck is where the body is shallowest in front of the spine (below it: chest; above: face).
    smooth = ndimage.uniform_filter1d(protrusion, size=3, mode="nearest")
    in_zone = np.flatnonzero(zone & has_spine & (zs <= spine_top))
    if inside is not None:
        # A slice whose body reaches the edge of the scanned volume in front is cut, not shallow.
        _, y_scan_front = _extent((inside & midline[:, None, :]).any(axis=0), ys)
        # (within FOV_EDGE_MM: the body mask's opening and the resampling keep it a little inside)
        cut_front = np.nan_to_num(y_mid_front, nan=-np.inf) >= y_scan_front - FOV_EDGE_MM
        whole = in_zone[~cut_front[in_zone]]
        in_zone = whole if whole.size else in_zone
    # The neck lies below the face: where the skull is tracked as spine (no skull base seen),
    # the top of the head is shallower still in front of the "spine" than the neck is.
    face_level = int(np.flatnonzero(zone)[np.argmax(np.where(zone, smooth, -np.inf)[zone])])
    below_face = in_zone[in_zone < face_level]
    if smooth[face_level] >= CHIN_MIN_PROTRUSION_MM and below_face.size:
        in_zone = below_face
    neck_level = int(in_zone[np.argmin(smooth[in_zone])])
    neck = float(smooth[neck_level])
    threshold = max(neck + CHIN_EXTRA_OVER_NECK_MM, CHIN_MIN_PROTRUSION_MM)
    above_neck = zone & (np.arange(nz) > neck_level)
    runs = [(a, b) for a, b in true_runs((protrusion > threshold) & above_neck) if (b - a) * step >= CHIN_MIN_RUN_MM]
    details = {"zone_mm": zone_mm, "neck_protrusion_mm": round(neck, 1), "neck_z_mm": float(zs[neck_level]),
               "threshold_mm": round(threshold, 1),
               "max_protrusion_mm": round(float(protrusion[zone].max()), 1),
               "spine_top_z_mm": round(float(spine_top), 1), "skull_base_seen": skull_base,
               "skull_base_z_mm": float(zs[min(clean, nz - 1)]) if skull_base else None}
    # A skull above C1 gives the head's orientation (the face turns with it).
    # the skull and the brain's core are judged on the averaged scan alone: brain noise is no bone there
    skull_hu = coarse if averaged is None else averaged
    skull = fit_skull(skull_hu > BONE_HU, body, zs, spine_top + 10.0, step, inside, hu=skull_hu)
    if skull is not None:
        details.update({"skull_radius_mm": round(skull.radius, 1), "skull_core_bone": round(skull.core_bone, 3)})
    if skull_base and skull is not None and skull.encloses_no_brain:
        details["skull_core_bony"] = True
        return None, FaceReport(False, "the bone shell above the spine encloses bone or organs, not a brain: no head, no face",
                                details)
    # A head flexed so far that its skull lies in front of the column's top shows no skull base in
    # the midline band; its skull, a bone shell around brain, shows the head all the same.
    brain = not skull_base and skull is not None and skull.holds_brain
    details["skull_holds_brain"] = brain
    if not skull_base and not brain and not neck_above_bottom(smooth, in_zone, step):
        # No skull base, and the body is shallowest at the bottom of the zone: nothing here narrows
        # into a neck below a head. A child's chest (narrower than the head-and-neck limit) whose
        # front rises toward the top of the scan looked like a chin to the rule below.
        return None, FaceReport(False, "no skull base and no neck below the part in front of the spine: no face",
                                details)
    axis = (head_axis(skull, spine_top, float(np.interp(spine_top, zs, y_front)))
            if skull is not None and (skull_base or brain) else None)
    # A scan that ends at the skull base shows no vault to fit a sphere to: the skull base on a
    # neck is the head, and the face hangs below and in front of it whether or not its chin shows.
    cut_at_base = skull_base and axis is None and head_cut_at_skull_base(zs, top, inside, spine_top, neck)
    details["head_cut_at_skull_base"] = cut_at_base
    if not runs and axis is None and not cut_at_base:
        return None, FaceReport(False, "nothing protrudes in front of the spine like a face: no face", details)
    z_c1 = spine_top
    y_c1 = float(np.interp(z_c1, zs, y_front))
    z_chin = (zs[runs[0][0]] if runs else z_c1 - CHIN_BELOW_C1_MM) - CHIN_EXTEND_MM - margin_mm

    # 4. the cut surface and the protected shell around the spine
    clearance = CLEARANCE_MM  # the margin grows the cut downward only: the spine side stays fixed
    y_cut = y_front + clearance
    above = zs > z_c1
    # Well above the top of the spine track (skull only) the cut runs behind the spine's front line.
    skull_only = zs > z_c1 + SKULL_ONLY_ABOVE_C1_MM
    y_cut[above] = y_c1 + np.where(skull_only[above], CLEARANCE_ABOVE_C1_MM, clearance)
    if axis is not None:  # above C1 the cut runs parallel to the head's axis
        y_cut[above] += axis * (zs[above] - z_c1)
    # Above the skull base the track also holds skull around the foramen magnum: a thinner shell
    # there (C1's arch and the dens are in the track itself) leaves no notch of face behind.
    shell = np.full(nz, PROTECT_MM)
    if skull_base:
        shell[clean + max(1, round(PROTECT_MM / step)):] = PROTECT_ABOVE_SKULL_BASE_MM
    protect = ndimage.distance_transform_edt(~spine, sampling=step) <= shell[None, None, :]
    above_chin = np.broadcast_to(zs[None, :] >= z_chin, (ny, nz))
    if axis is not None:  # a tilted head carries its chin with it: a chin plane across the head's axis
        u_y, u_z = np.array([axis, 1.0]) / np.hypot(axis, 1.0)
        along = (ys[:, None] - y_c1) * u_y + (zs[None, :] - z_c1) * u_z
        above_chin = above_chin | (along >= -(CHIN_BELOW_C1_MM + CHIN_EXTEND_MM + margin_mm))
    face = (ys[None, :, None] > y_cut[None, None, :]) & above_chin[None, :, :] & zone[None, None, :]
    face = np.broadcast_to(face, coarse.shape) & ~protect
    in_front = int((face & body).sum()) * step ** 3 / 1000.0  # cm3 of tissue in front of the cut
    details.update({"chin_z_mm": round(float(z_chin), 1), "cut_clearance_mm": clearance,
                    "head_axis_slope": None if axis is None else round(axis, 3),
                    "tissue_in_front_cm3": round(in_front, 1)})
    if in_front < MIN_FACE_CM3:
        return None, FaceReport(False, "no tissue in front of the spine above the chin: the face is outside "
                                "the field of view", details)
    return face, FaceReport(True, "face found", details)


def auto_face_mask(hu: np.ndarray, affine: np.ndarray, margin_mm: float = 0.0) -> tuple[np.ndarray, FaceReport]:
    """Face mask on the scan's own grid (all False when there is no face)."""
    from .core.geometry import resample_to_grid

    coarse, grid = coarse_ras(hu, affine)
    averaged, _ = coarse_ras(hu, affine, averaged=True)
    face, report = find_face(coarse, margin_mm=margin_mm, inside=scan_coverage(hu.shape, affine, grid, coarse.shape),
                             averaged=averaged)
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
