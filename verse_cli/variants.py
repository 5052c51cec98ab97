"""Anatomical variant rating as in the VerSe 2020 data paper (Löffler et al., 2020).

:func:`rate_variants` takes a CT (optional) and a vertebra mask on the same grid and
returns the variants JSON: vertebra counts and whether they can be determined,
the field of view, every rib's length, cervical ribs, stump ribs, the Castellvi
grade of the lumbosacral transitional vertebra, consistency warnings, and the
evidence behind every number (lengths in mm, voxel counts, gaps).

Rules (paper, section "Anatomical variants")
--------------------------------------------
* A vertebra with at least one rib of ``stump_mm`` (38 mm) or more, measured from
  the costovertebral joint to the osseous tip, is thoracic; one whose ribs are both
  shorter (or absent) is lumbar (a transitional thoracolumbar vertebra). A rib cut
  by the field of view is *undeterminable*, unless its visible part already
  reaches ``stump_mm``.
* Stump ribs (shorter than ``stump_mm``) are reported wherever they are, in practice at
  the last thoracic vertebra (T11, T12, T13) and at L1.
* Cervical ribs are ribs of C7, on one side or both.
* Counts are determinable only when the field of view shows the region's ends:
  thoracic from T1 (with C7 above) to the first lumbar vertebra; lumbar from the
  last thoracic vertebra to the sacrum; cervical from C1 to T1. 11/13 thoracic and
  4/6 lumbar vertebrae are flagged only when determinable.
* Castellvi per side for the lowest lumbar vertebra against the sacrum: I a
  transverse process >= 19 mm high (craniocaudal), II a pseudarthrosis (a cleft of
  at most 2 mm between distinct cortices), III bony fusion; combined 0/1, 2a/2b,
  3a/3b, 4. In grades III/IV VerSe leaves the fused vertebra unlabelled, so
  unlabelled bone between the last lumbar label and the sacrum is looked for.

All geometry is done on the mask's grid reoriented exactly (permutations and flips)
to R, A, S voxel axes with the physical spacing, and every direction that matters
(left/right, anterior, superior) comes from each vertebra's own frame, built from
its neighbours' centres and its body centroid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .core import geometry
from .core import labels as L
from .core.arrays import true_runs
from .core.errors import DataError
from .ribs import (
    HEAD_REACH_MM,
    MIN_PIECE_MM3,
    SIDES,
    UNLABELLED,
    Frame,
    bone_threshold,
    measure_rib,
    outside_scan,
    segment_ribs,
    smooth_ct,
    tissue_levels,
)

RAS = ("R", "A", "S")
STUMP_MM = 38.0
TP_HEIGHT_MM = 19.0  # Castellvi I
PSEUDARTHROSIS_MM = 2.0  # Castellvi II
# ... which the HU profile across it shows this wide below the bone threshold: over 147 synth cases with
# a labelled II or I side, pseudarthroses (~1 mm clefts) read up to 3.2 mm there and 24 of 146 were
# graded I at 2.0 mm; clear processes (>= 4 mm) read 3.5 mm or more
CLEFT_ON_PROFILE_MM = 2.5
FUSED_TP_MIN_MM = 14.0  # a process fused into the ala measures at least this much above the parting plane
FUSED_LINES_MIN = 4  # ... with bone running on into the ala on this many raw-CT lines
BRIDGE_FUSED = 0.85  # beside a fused vertebra: a process joined to its ala through bone this bright (of its own)
BRIDGE_CLEFT = 0.45  # ... or only through bone between this and BRIDGE_FUSED: a pseudarthrosis
# ... and one whose bone stays farther than this from the ala's at half its HU is clear of it: over
# four synth sets (T, U, Vg, W: 50 fused vertebrae), fused and pseudarthrotic sides read 0.4-1.5 mm there
# (a voxel or so; one II side drawn at the process's root before bf52720 read 3.55 mm), 12 of 15 clear ones
# 3.4-12.9 mm (3 read 0.65-1.26 mm and keep their grade)
CLEAR_OF_ALA_MM = PSEUDARTHROSIS_MM + 0.5
MAX_DISC_MM = 20.0  # an intervertebral disc is at most this high (adult lumbar discs: 8-15 mm)
MIN_BODY_MM = 15.0  # a vertebral body is at least this high (adult lumbar bodies: 25-30 mm)
# the tallest lumbar body (adult L1-L5 25-30 mm; met by the walk 20-30 mm): a longer run of bone is no
# vertebra's (S1 over a residual S1/S2 line runs 38-42 mm)
TALL_BODY_MM = 35.0
ALA_BEYOND_MM = 15.0  # the sacral alae run on 25-35 mm beyond the S1 body's sides (S1 100-120 mm wide)
HALO_MM = 2.5  # unlabelled bone this close to a label is that vertebra's rim
# next_body_probe: the S1 body's alae reach 25-35 mm beyond its sides; a lumbar body's bone ends
# at its side (fused transitional vertebrae of F, G, H: 0-12 mm beyond at 0.75 step, S1 16-45 mm)
ALA_MARGIN_MM = 12.0
ONE_ALA_MARGIN_MM = 18.0  # one side alone (the other side's ala cut by a slab through the body's edge)
ALA_BODY_FILL = 0.9  # the slab lies in a body when bone fills this fraction of its half width each side
MIN_RIB_MM = 8.0  # shorter bone next to a vertebra is an osteophyte or noise, not a rib
# a rib is a flattened tube of about 13 x 6 mm (mean radius 4-5 mm, its head included; 6.3 mm at
# most for ribs measured whole on synthetic CT at 0.5-3 mm spacing, 1.8-2.8 mm for the T11/T12 rib
# pieces of the real Siemens series, whose bone threshold leaves out the marrow): a piece longer
# than a stump rib and thicker on average is a rib joined to other bone (the ilium, the scapula),
# whose length cannot be told
MAX_RIB_RADIUS_MM = 7.0
MIN_STUMP_MM3 = 250.0  # a short rib has at least this volume (a 9 mm rib of 3 mm radius)
TP_LATERAL = 0.6  # ... or lateral of this fraction of its reach, whichever is nearer the body
TRUNCATED_TIP_MM = 6.0  # a short rib whose tip is this close to a vertebra was cut off
FIRST_RIB_MIN_MM = 60.0  # a shorter first rib was not measured whole: no cervical rib is split off it
MIN_CERVICAL_MM3 = 30.0  # a cervical rib shows at least a 2 mm ball of bone beyond C7's process
MIN_CERVICAL_VOXELS = 16  # ... in at least this many voxels: fewer are a speck of noise, whatever their size
HEAD_SIDE_MM = 3.5  # a cervical rib's head is centred this near the side of C7's body
CERVICAL_TIP_AWAY_MM = 10.0  # a cervical rib joined to the first rib ends this far from the spine at least
CERVICAL_JOIN_MM = 20.0  # ... and its tip within this of the first rib's centreline
FAR_FROM_JOINT_MM = 20.0  # a rib head articulates with its vertebra: bone starting farther away has no head
TIP_AWAY = 0.5  # a rib's tip lies at least this fraction of its length away from the spine
# ... a stump rib's (T10-L1) at least this fraction: it hangs down beside the vertebra below, its tip 0.6-0.8
# of its length from the spine (0.4-0.5 where its length was overmeasured, synth 85013, 85051), where
# a rib's head and neck cut off at the transverse process reach 0.25 at most (synth J-L)
TIP_AWAY_STUMP = 0.35
RIB_BEARING = [7, *range(8, 20), 28, 20]  # C7, T1-T12, T13, L1
THORACOLUMBAR = {17, 18, 19, 28, 20}  # T10-T13, L1: where the rib rule moves the boundary
LOWEST_RIB_BEARING = {19, 28, 20}  # T12, T13, L1
# ... whose ribs run down from their heads: over synth X, Y and Z (291 pieces read present or cut there) a
# rib's far end lay at most 24 mm above its joint (most under 13 mm); two pieces rising 81-82 mm were
# longer bone of the cage above joined to them
MAX_LOW_RIB_RISE_MM = 40.0


@dataclass
class Grid:
    """The reoriented working grid."""

    mask: np.ndarray
    ct: np.ndarray | None
    affine: np.ndarray
    sp: np.ndarray
    present: list[int]
    boxes: dict | None = None
    smooth: np.ndarray | None = None  # the CT smoothed over ~2 mm (ribs.smooth_ct)
    soft_hu: float = 40.0  # median HU of soft tissue
    bone_hu: float = 400.0  # median HU inside the vertebra masks

    def points(self, lab: int) -> np.ndarray:
        """Voxel indices of one label (found in its bounding box, not the whole volume)."""
        if self.boxes is None:
            found = ndimage.find_objects(self.mask.astype(np.int32, copy=False))
            self.boxes = {i + 1: sl for i, sl in enumerate(found) if sl is not None}
        sl = self.boxes.get(int(lab))
        if sl is None:
            return np.zeros((0, 3), dtype=np.int64)
        return np.argwhere(self.mask[sl] == lab) + np.array([x.start for x in sl])


# --------------------------------------------------------------------------- public API
def rate_variants(ct_img, mask_img, centroids=None, stump_mm: float = STUMP_MM,
                  ct_source: str | None = None, mask_source: str | None = None) -> dict:
    """Rate the anatomical variants of one scan.

    Parameters
    ----------
    ct_img : nibabel image in HU, or ``None`` (ribs and Castellvi are then undeterminable).
    mask_img : nibabel image of VerSe vertebra labels on the CT's grid.
    centroids : optional :class:`~verse_cli.core.centroids.Centroids` (body centroids)
        of the mask's image; computed from the mask when absent.
    stump_mm : rib length below which a rib is a stump rib.
    ct_source, mask_source : names used in error messages.

    Returns
    -------
    dict following the variants JSON contract, plus ``evidence``, ``warnings`` and ``notes``.
    """
    grid = _prepare(ct_img, mask_img, centroids, ct_source, mask_source)
    present = _vertebrae_present(grid)
    frames = vertebra_frames(grid, present, centroids, mask_img)
    notes: list[str] = []
    evidence: dict = {"stump_mm": stump_mm, "vertebra_voxels": {L.name(k): int(f.voxels) for k, f in frames.items()}}
    bone, thr, unlabelled, spine_info = None, None, None, {}
    if grid.ct is not None:
        thr = bone_threshold(grid.ct, grid.mask)
        grid.soft_hu, grid.bone_hu = tissue_levels(grid.ct, grid.mask)
        grid.smooth = smooth_ct(grid.ct, grid.sp)
        bone = grid.smooth >= thr
        unlabelled, spine_info = unlabelled_spine(bone, grid, frames, present)
        evidence["bone_threshold_hu"] = round(thr, 1)
    else:
        notes.append("no CT: ribs, cervical ribs, stump ribs and the Castellvi grade are undeterminable; "
                     "enumeration is taken from the labels alone")
    ribs, rib_evidence = rate_ribs(grid, bone, thr, unlabelled, frames, present, stump_mm)
    evidence["ribs"] = rib_evidence
    effective = effective_regions(present, ribs, stump_mm)
    castellvi, cast_ev = rate_castellvi(grid, bone, thr, frames, present, spine_info)
    evidence["castellvi"] = cast_ev
    # a grade given without the sacrum in view (normal processes) does not place it
    sacrum_found = castellvi is not None and not cast_ev.get("graded_without_sacrum")
    items, seq_notes = spine_sequence(grid, present, effective, frames, spine_info, castellvi, sacrum_found)
    notes += seq_notes
    fov = field_of_view(grid, items)
    enumeration, counts = enumerate_spine(items)
    evidence["enumeration"] = {"sequence": items, "unlabelled_spine_bone": spine_info,
                               "effective_regions": {L.name(k): v for k, v in effective.items() if L.is_vertebra(k)}}
    out = {
        "counts": counts,
        "enumeration": enumeration,
        "field_of_view": fov,
        "ribs": {L.name(k): v for k, v in sorted(ribs.items(), key=lambda kv: L.rank(kv[0]))},
        "cervical_ribs": cervical_ribs(ribs, grid.ct is not None and 7 in present),
        "stump_ribs": stump_ribs(ribs, stump_mm),
        "castellvi": castellvi,
        "warnings": consistency_warnings(present, ribs, effective, stump_mm, grid.ct is not None, items),
        "notes": notes,
        "evidence": evidence,
    }
    return out


# --------------------------------------------------------------------------- inputs
def _prepare(ct_img, mask_img, centroids, ct_source, mask_source) -> Grid:
    mask = np.asarray(mask_img.dataobj)
    if not np.issubdtype(mask.dtype, np.integer):
        mask = np.rint(np.asarray(mask_img.get_fdata())).astype(np.int32)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise DataError(f"labels outside the VerSe table: {int(mask.min())}..{int(mask.max())}", mask_source)
    mask = mask.astype(np.uint8, copy=False)
    labels = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=1)).tolist()) - {0}
    if not any(L.is_vertebra(v) for v in labels if v in L.VERSE_IDS):
        raise DataError("mask has no vertebra labels (C1-L6 or T13, ids 1-25 and 28)", mask_source)
    unknown = sorted(v for v in labels if v not in L.VERSE_IDS)
    if unknown:
        raise DataError(f"labels outside the VerSe table: {unknown}", mask_source)
    ct = None
    if ct_img is not None:
        if not geometry.same_grid(ct_img.shape, ct_img.affine, mask_img.shape, mask_img.affine):
            raise DataError(
                f"mask grid ({geometry.describe_grid(mask_img.shape, mask_img.affine)}) differs from the CT grid "
                f"({geometry.describe_grid(ct_img.shape, ct_img.affine)})", mask_source)
        ct = np.asarray(ct_img.get_fdata(dtype=np.float32))
        _check_hounsfield(ct, mask, ct_source)
    mask_r, affine = _reorient_view(mask, mask_img.affine)
    ct_r = _reorient_view(ct, mask_img.affine)[0] if ct is not None else None
    return Grid(np.ascontiguousarray(mask_r), ct_r, affine, geometry.spacing(affine), present=sorted(labels))


def _reorient_view(data: np.ndarray, affine: np.ndarray):
    """``data`` with R, A, S voxel axes, as a view (flips and transposes, no copy)."""
    import nibabel.orientations as nio

    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(RAS))
    out = nio.apply_orientation(data, ornt)
    return out, np.asarray(affine) @ nio.inv_ornt_aff(ornt, data.shape[:3])


def _check_hounsfield(ct: np.ndarray, mask: np.ndarray, source) -> None:
    """Refuse CTs that are not in Hounsfield units (raw detector values, normalised data)."""
    sample = ct[::2, ::2, ::2]
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99.9]))
    bone = ct[mask > 0]
    bone_median = float(np.median(bone)) if bone.size else 0.0
    if p99 - p1 < 300 or p1 > -150 or p1 < -3100 or p99 > 5000 or not (60 <= bone_median <= 1900):
        raise DataError(
            f"CT does not look like Hounsfield units (1st/99.9th percentile {p1:.0f}/{p99:.0f}, "
            f"median inside the vertebrae {bone_median:.0f}); expected air near -1000 and bone 100-1500", source)


def _vertebrae_present(grid: Grid) -> list[int]:
    return L.sort_anatomical(grid.present)


# --------------------------------------------------------------------------- frames
def vertebra_frames(grid: Grid, present: list[int], centroids, mask_img) -> dict[int, Frame]:
    """Each vertebra's centre, body centroid and own R/A/S axes in physical mm."""
    sp = grid.sp
    nz = np.nonzero(grid.mask)
    values = grid.mask[nz]
    counts = np.bincount(values, minlength=max(present) + 1)
    sums = [np.bincount(values, weights=axis_idx, minlength=len(counts)) for axis_idx in nz]
    centres = {lab: np.array([s[lab] for s in sums]) / counts[lab] * sp for lab in present}
    bodies: dict[int, np.ndarray] = {}
    if centroids is not None:
        try:
            ctd = centroids.reoriented(mask_img.shape, mask_img.affine, RAS)
            bodies = {lab: np.asarray(c) * sp for lab, c in zip(ctd.labels, ctd.coords)}
        except DataError:
            bodies = {}
    world_front = np.array([0.0, 1.0, 0.0])
    for lab in present:
        if lab in (26, 27):
            continue
        # a body centroid behind the vertebra's centre of mass is not a body (a centroid
        # on a long spinous process, as C7's); the mask's own estimate replaces it
        if lab not in bodies or float((bodies[lab] - centres[lab]) @ world_front) < 0.0:
            bodies[lab] = _body_estimate(_points_mm(grid, lab), centres[lab])
    spine = [lab for lab in present if L.is_vertebra(lab)]
    frames = {}
    world_a, world_s = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
    for i, lab in enumerate(present):
        c = centres[lab]
        if lab in spine:
            j = spine.index(lab)
            above = centres[spine[j - 1]] if j > 0 else c
            below = centres[spine[j + 1]] if j + 1 < len(spine) else c
            sup = above - below
        else:
            sup = np.zeros(3)
        sup = geometry.unit(sup) if np.linalg.norm(sup) > 5 and geometry.unit(sup) @ world_s > 0.3 else world_s
        body = bodies.get(lab, c)
        ant = body - c
        ant = ant - (ant @ sup) * sup
        if np.linalg.norm(ant) < 1.0 or geometry.unit(ant) @ world_a < 0.3:
            ant = world_a - (world_a @ sup) * sup
        ant = geometry.unit(ant)
        right = np.cross(ant, sup)
        frames[lab] = Frame(lab, c, body, right, ant, sup, int(counts[lab]),
                            _body_half_width(_points_mm(grid, lab), body, ant, right))
    return frames


def _body_half_width(pts_mm: np.ndarray, body: np.ndarray, ant: np.ndarray, right: np.ndarray) -> float:
    """Half width of the vertebral body: lateral reach of the vertebra in front of its body centre."""
    rel = pts_mm - body
    front = rel[rel @ ant > 0]
    if len(front) < 10:
        return 15.0
    return float(np.percentile(np.abs(front @ right), 98))


def _body_estimate(pts_mm: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """A quick vertebral-body centre: the mass in front of the centre, refined once.

    The body is the bulk of the vertebra in front of its centre of mass, so the centre of
    the voxels anterior of it (first along the world A axis, then along the direction
    found) follows an axially rotated vertebra. Good enough for a frame; pass real body
    centroids (``--ctd``) when available.
    """
    rel = pts_mm - centre
    front = rel[rel[:, 1] > 0]
    if len(front) < 10:
        return centre
    direction = geometry.unit(front.mean(axis=0))
    front = rel[rel @ direction > 0]
    return centre + front.mean(axis=0) if len(front) >= 10 else centre


def _points_mm(grid: Grid, lab: int) -> np.ndarray:
    return grid.points(lab) * grid.sp


# --------------------------------------------------------------------------- unlabelled spine bone
def unlabelled_spine(bone: np.ndarray, grid: Grid, frames: dict[int, Frame], present: list[int]):
    """Bone of the spine that carries no label, above the first and below the last label.

    Looks along the end vertebra's own superior axis, within its lateral reach, up to
    1.2 vertebra heights beyond it. Returns a boolean map and per-end evidence
    (``{"top": {...}, "bottom": {...}}`` with voxel counts and the vertebra fraction).
    """
    out = np.zeros(bone.shape, dtype=bool)
    info: dict = {}
    spine = [lab for lab in present if L.is_vertebra(lab)]
    if not spine:
        return out, info
    vox_ml = float(np.prod(grid.sp)) / 1000.0
    ends = {"top": (spine[0], 1.0)}
    if 26 not in present:
        ends["bottom"] = (spine[-1], -1.0)
    for end, (lab, sign) in ends.items():
        fr = frames[lab]
        d = fr.superior * sign
        pts = _points_mm(grid, lab) - fr.centre
        t = pts @ d
        radial = np.linalg.norm(pts - np.outer(t, d), axis=1)
        reach, height = float(t.max()), float(t.max() - t.min())
        r_tube = float(np.percentile(radial, 98))
        spine_pos = spine.index(lab)
        nb = spine[spine_pos + 1] if end == "top" and len(spine) > 1 else (
            spine[spine_pos - 1] if len(spine) > 1 else None)
        level = float(np.linalg.norm(frames[nb].centre - fr.centre)) if nb is not None else 0.8 * height
        length = reach + 2.0 * level
        region, box = _tube(grid, fr.centre, d, reach + 1.0, length, r_tube)
        sel = bone[box] & region & (grid.mask[box] == 0)
        # bone just outside the end vertebra's own label is that vertebra, not a neighbour
        near = ndimage.distance_transform_edt(grid.mask[box] == 0, sampling=grid.sp) <= 2.5
        found = sel & ~near
        # split what was found into the next level and the one beyond it
        idx = np.argwhere(found)
        t_found = (idx * grid.sp + np.array([sl.start for sl in box]) * grid.sp - fr.centre) @ d
        first = int((t_found <= reach + level).sum())
        second = int((t_found > reach + level).sum())
        fraction = first / max(fr.voxels, 1)
        out[box] |= sel
        info[end] = {"next_to": L.name(lab), "voxels": int(found.sum()), "ml": round(found.sum() * vox_ml, 1),
                     "fraction_of_neighbour": round(fraction, 2), "present": fraction >= 0.15,
                     "second_level_fraction": round(second / max(fr.voxels, 1), 2),
                     "second_present": fraction >= 0.15 and second / max(fr.voxels, 1) >= 0.15,
                     "touches_field_of_view_edge": bool(_touches_edge(found, box, bone.shape))}
    return out, info


def _tube(grid: Grid, origin: np.ndarray, d: np.ndarray, t0: float, t1: float, radius: float):
    """Voxels whose position p satisfies t0 < (p-o).d <= t1 and radial distance <= radius."""
    sp = grid.sp
    corners = np.array([origin + d * t + s * radius for t in (t0, t1) for s in (-1, 1)])
    lo = np.floor((np.minimum(corners.min(axis=0), origin - radius) - radius) / sp).astype(int)
    hi = np.ceil((np.maximum(corners.max(axis=0), origin + radius) + radius) / sp).astype(int) + 1
    return _cylinder_in_box(grid, lo, hi, origin, d, t0, t1, radius)


def _cylinder_in_box(grid: Grid, lo, hi, origin: np.ndarray, d: np.ndarray, t0: float, t1: float, radius: float):
    """The voxels of the box ``lo:hi`` (clipped to the grid) with t0 < (p-o).d <= t1 and radial
    distance <= radius, and the box."""
    lo = np.clip(lo, 0, grid.mask.shape)
    hi = np.clip(hi, 0, grid.mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    axes = [(np.arange(a, b) * s - o) for a, b, s, o in zip(lo, hi, grid.sp, origin)]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij", sparse=True)
    t = gx * d[0] + gy * d[1] + gz * d[2]
    r2 = gx ** 2 + gy ** 2 + gz ** 2 - t ** 2
    return (t > t0) & (t <= t1) & (r2 <= radius ** 2), box


def _touches_edge(found: np.ndarray, box, shape) -> bool:
    if not found.any():
        return False
    idx = np.argwhere(found) + np.array([s.start for s in box])
    return bool(np.any(idx == 0) or np.any(idx == np.asarray(shape) - 1))


# --------------------------------------------------------------------------- ribs
def rate_ribs(grid: Grid, bone, thr, unlabelled, frames, present, stump_mm):
    """Per rib-bearing vertebra: length and status of the left and right rib."""
    wanted = [lab for lab in RIB_BEARING if lab in present]
    out: dict[int, dict] = {}
    evidence: dict = {}
    if bone is None or not wanted:
        for lab in wanted:
            out[lab] = {"left_mm": None, "right_mm": None, "left_status": "undeterminable",
                        "right_status": "undeterminable"}
        return out, evidence
    labels = grid.mask.astype(np.uint16 if grid.mask.dtype != np.uint16 else grid.mask.dtype)
    labels = np.where(unlabelled & (labels == 0), UNLABELLED, labels).astype(np.uint16)
    components, info, joint_distance = segment_ribs(bone, labels, grid.sp, frames, wanted)
    outside = outside_scan(grid.ct)
    zone = np.zeros(grid.mask.shape, dtype=bool)
    zone.flat[info.pop("removed")] = True
    first_trimmed = info.pop("first_rib_trimmed", {})
    evidence["segmentation"] = info
    measured: dict = {}
    for lab in wanted:
        entry: dict = {}
        for side in SIDES:
            comps = components.get((lab, side), [])
            if not comps:
                entry[f"{side}_mm"], entry[f"{side}_status"] = None, "absent"
                continue
            rib = measure_rib(comps, grid.mask.shape, grid.sp, joint_distance, frames[lab], side=side,
                              ct=grid.ct, thr=thr, smooth=grid.smooth, soft_hu=grid.soft_hu, outside=outside,
                              zone=zone, first_rib=lab == 8)
            if L.region(lab) == "C":
                rib = _from_the_body(rib, frames[lab], side, _cervical_body_half_width(frames, lab))
            trimmed = False
            if lab == 8 and side in first_trimmed:
                rib, comps, trimmed = _first_rib_without_girdle(grid, rib, comps, first_trimmed[side], joint_distance,
                                                                frames, side, thr, outside, zone, stump_mm)
                components[(lab, side)] = comps
            if lab in THORACOLUMBAR and rib.radius_mm > MAX_RIB_RADIUS_MM and rib.length_mm >= stump_mm:
                rib = _stump_without_soft_organ(grid, comps, thr, rib, joint_distance, frames[lab], side,
                                                outside, zone, stump_mm)
            evidence.setdefault(L.name(lab), {})[side] = {**rib.evidence(), **({"ends_at_other_bone": True}
                                                                                if trimmed else {})}
            measured[(lab, side)] = rib
            _set_rib(entry, side, rib, _rib_status(rib, lab, frames[lab], stump_mm, float(np.prod(grid.sp))))
        out[lab] = entry
    beside = _cervical_ribs_beside_process(grid, out, components, frames)
    first_of_unlabelled_t1 = _first_rib_of_unlabelled_t1(out, evidence, components)
    from_c7 = _first_rib_from_c7(out, evidence, components, measured)
    for side in from_c7:
        if _first_rib_by_the_spine(grid, out, evidence, components, measured, frames, side, joint_distance, thr,
                                   outside, zone, stump_mm):
            # the piece beside the largest was the first rib: look again among the others
            beside.pop(side, None)
            found = _piece_beside_process(grid, components.get((7, side), []), frames, side)
            if found is not None:
                beside[side] = found
    for side in from_c7 + list(first_of_unlabelled_t1):
        if components.get((7, side)):
            _cervical_rib_left_at_c7(grid, out, evidence, components[(7, side)], frames, side, joint_distance, thr,
                                     outside, zone, stump_mm)
    _last_rib_from_below(out, evidence)
    _short_rib_above_a_long_one(out, evidence, stump_mm)
    for side, found in beside.items():
        ok = out[7][f"{side}_status"] == "absent"
        evidence.setdefault("C7", {})[f"{side}_beside_process"] = {**found, "accepted": ok}
        if ok:
            out[7][f"{side}_mm"], out[7][f"{side}_status"] = found["length_mm"], "present"
    if 7 in out:
        for side in SIDES:
            first = _first_rib_bone(measured, components, first_of_unlabelled_t1, side)
            if out[7][f"{side}_status"] == "absent" and first is not None:
                _cervical_rib_on_first_rib(grid, out, evidence, *first, frames, side, joint_distance, thr, outside,
                                           zone)
            if out[7][f"{side}_status"] in ("absent", "undeterminable") and 7 in frames:
                head = _cervical_rib_head(grid, components.get((7, side), []), frames, side)
                if head is not None:
                    evidence.setdefault("C7", {})[f"{side}_head_beside_body"] = head
                    out[7].pop(f"{side}_visible_mm", None)
                    out[7][f"{side}_mm"], out[7][f"{side}_status"] = None, "present"
    return out, evidence


def _cervical_rib_head(grid: Grid, pieces: list, frames: dict, side: str) -> dict | None:
    """A cervical rib's head, a piece of its own at the side of C7's body, or None.

    A cervical rib's head articulates with the side of C7's body behind its centre, where a
    thoracic rib's head would; its shaft then passes the transverse process. The mask labels
    the process as C7 and the cut around the labels parts the head from the shaft, which
    may go on into the first rib's bone (synth 83014, 85044, 93035: rudimentary ones of
    15-16 mm; 96029, 96035: 51-64 mm ones joined to a first rib joined to the shoulder
    girdle). Nothing else is bone there: the first rib's head sits lower, on T1. The head
    is bone (``MIN_CERVICAL_MM3`` in ``MIN_CERVICAL_VOXELS``) centred within
    ``HEAD_SIDE_MM`` of the body's side, 2-12 mm behind its centre and nearer C7's centre
    than T1's. The rib is there, but how long it is cannot be told from its head: its
    length is left out.
    """
    def at_the_side_of_the_body(pts, rel, outward, body_half_width, level):
        beside = abs(float(rel @ outward) - body_half_width) <= HEAD_SIDE_MM
        within = float(((pts - frames[7].body) @ outward).max()) <= body_half_width + 2 * HEAD_SIDE_MM
        behind = -12.0 <= float(rel @ frames[7].anterior) <= -2.0
        return beside and within and behind and (level is None or -0.5 <= level <= 0.25)

    best = _largest_c7_piece(grid, pieces, frames, side, at_the_side_of_the_body)
    if best is None:
        return None
    sp = grid.sp
    return {"voxels": len(best), "volume_mm3": round(len(best) * float(np.prod(sp)), 1),
            "centre_ras_mm": [round(float(v), 1) for v in best.mean(axis=0)], "length_mm": None}


def _first_rib_bone(measured: dict, components: dict, of_unlabelled_t1: dict, side: str):
    """The first rib's pieces and its measured rib on ``side``, where a cervical rib joined to it may be.

    The first rib need not be measured whole: joined to the clavicle or the scapula, or
    cut by the field of view, its bone by the spine still holds any cervical rib joined
    to it (synth 85020, 84035, 82020, 82035: 'first ribs' of 120-310 mm in view, cut or
    undeterminable, each with a cervical rib of 43-64 mm). Where the mask leaves out T1,
    the first rib is the piece set aside from C7 (see :func:`_first_rib_of_unlabelled_t1`).
    ``None`` where there is no first rib of ``FIRST_RIB_MIN_MM`` in view (adult first ribs
    run 100-150 mm) starting at its joint: the length and joint-gap tests that make T1's
    rib ``absent`` (a speck, bone far from T1) leave it out whatever its status.
    """
    if side in of_unlabelled_t1:
        pieces, rib = [of_unlabelled_t1[side]], measured.get((7, side))
    elif (8, side) in measured and components.get((8, side)):
        # the piece its centreline runs through: T1's other pieces may be a whole rib of
        # their own (a second rib whose head touched T1, the first rib beside it)
        pieces, rib = components[(8, side)][:1], measured[(8, side)]
    else:
        return None
    if rib is None or rib.length_mm < FIRST_RIB_MIN_MM or rib.joint_gap_mm >= FAR_FROM_JOINT_MM:
        return None
    return pieces, rib


def _first_rib_without_girdle(grid: Grid, rib, comps: list, trimmed: list, joint_distance, frames: dict, side: str,
                              thr: float, outside, zone, stump_mm: float):
    """The first rib measured up to where it meets other bone, where the whole bone is no rib.

    At the thoracic inlet the clavicle and the scapula lie on the first rib, and on coarse
    or smooth scans they make one bone with it, whose skeleton runs through them (synth
    82059, 83035: 'first ribs' of 280-390 mm, rated undeterminable, and a cervical rib
    joined to them lost). Followed from its head through bone, the rib ends where the
    front widens into the other bone (``trimmed``, from :func:`segment_ribs`). That reading
    stands only where the whole bone gave no rib and it gives a first rib's length
    (``FIRST_RIB_MIN_MM``): a cervical rib joined to the first rib widens the front too,
    and a first rib read so would end there. Returns the rib, its pieces and whether the
    trimmed reading was used.
    """
    voxel_mm3 = float(np.prod(grid.sp))
    if _rib_status(rib, 8, frames[8], stump_mm, voxel_mm3) == "present":
        return rib, comps, False
    again = measure_rib(trimmed, grid.mask.shape, grid.sp, joint_distance, frames[8], side=side, ct=grid.ct, thr=thr,
                        smooth=grid.smooth, soft_hu=grid.soft_hu, outside=outside, zone=zone, first_rib=True)
    ok = _rib_status(again, 8, frames[8], stump_mm, voxel_mm3) == "present" and again.length_mm >= FIRST_RIB_MIN_MM
    return (again, trimmed, True) if ok else (rib, comps, False)


def _stump_without_soft_organ(grid: Grid, comps: list, thr: float, rib, joint_distance, frame: Frame,
                              side: str, outside, zone, stump_mm: float):
    """A stump rib inside a piece thicker than a rib, measured without the soft organ it touches.

    On contrast CT the renal cortex and the aorta enhance to 150-300 HU, above a bone
    threshold set low enough for thin, osteoporotic ribs, and a stump rib touching a
    kidney became one piece with it (synth 82036: L1 'ribs' of 190 mm, radius 15 mm).
    The organ makes up most of the piece, so the piece's median HU is the organ's level;
    the rib's cortex lies far above it. The piece is cut at half-way from that level to
    the organ's height over soft tissue beyond it, and its parts that start within
    FAR_FROM_JOINT_MM of the vertebra are measured. The new measure stands only for a
    stump (shorter than ``stump_mm``, not cut, as thin as a rib): at T1 and C7 the same cut
    made 'stumps' and cervical ribs of pieces of the shoulder girdle, and at L1 a cut rib
    of a piece of the iliac crest (synth 82014, 82016, 93034). Only T10-L1 are tried, where
    the kidneys lie and stump ribs are rated; otherwise the first measure is returned.
    """
    flat = np.concatenate(comps)
    hu = grid.smooth.flat[flat]
    level = float(np.median(hu))
    strict = level + 0.5 * (level - grid.soft_hu)
    if strict <= thr:
        return rib
    kept = flat[hu >= strict]
    if len(kept) == 0:
        return rib
    idx = np.array(np.unravel_index(kept, grid.mask.shape)).T
    lo = idx.min(axis=0)
    sub = np.zeros(tuple(idx.max(axis=0) - lo + 1), dtype=bool)
    sub[tuple((idx - lo).T)] = True
    lab, _ = ndimage.label(sub, structure=np.ones((3, 3, 3), bool))
    ids = lab[tuple((idx - lo).T)]
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    # specks of the organ's noise above the cut are no rib head
    pieces = [kept[part] for part in np.split(order, bounds) if len(part) * float(np.prod(grid.sp)) >= MIN_PIECE_MM3]
    near = [p for p in pieces
            if float(np.min(joint_distance(np.array(np.unravel_index(p, grid.mask.shape)).T))) <= FAR_FROM_JOINT_MM]
    if not near:
        return rib
    near.sort(key=len, reverse=True)
    again = measure_rib(near, grid.mask.shape, grid.sp, joint_distance, frame, side=side, ct=grid.ct, thr=strict,
                        smooth=grid.smooth, soft_hu=grid.soft_hu, outside=outside, zone=zone)
    is_stump = again.length_mm < stump_mm and not again.cut and again.radius_mm <= MAX_RIB_RADIUS_MM
    return again if is_stump else rib


def _set_rib(entry: dict, side: str, rib, status: str) -> None:
    """Write a measured rib into a vertebra's entry: its length where ``present``, the length in
    view where ``cut`` or ``undeterminable``."""
    entry.pop(f"{side}_visible_mm", None)
    entry[f"{side}_mm"] = round(rib.length_mm, 1) if status == "present" else None
    entry[f"{side}_status"] = status
    if status in ("cut", "undeterminable"):
        entry[f"{side}_visible_mm"] = round(rib.length_mm, 1)


def _rib_status(rib, lab: int, frame: Frame, stump_mm: float, voxel_mm3: float) -> str:
    """'present', 'cut', 'absent' or 'undeterminable' for a rib piece measured at vertebra ``lab``."""
    if lab == 8 and rib.joint_gap_mm >= FAR_FROM_JOINT_MM:
        # at the thoracic inlet the clavicle, the scapula and the humerus lie beside the
        # first rib; bone that starts this far from T1 is one of them, and the first
        # rib is elsewhere (its head may touch only C7: see _first_rib_from_c7)
        return "absent"
    if rib.radius_mm > MAX_RIB_RADIUS_MM and rib.length_mm >= stump_mm:
        # measured as one piece, the iliac crest or the scapula beside a rib gave L1 a
        # 'rib' of 250-500 mm (counted thoracic) and T3/T4 ribs of 330-550 mm. A stump
        # rib is spared: over 10-20 mm its head weighs on the mean radius
        return "undeterminable"
    if lab in LOWEST_RIB_BEARING and _rise_mm(rib, frame) > MAX_LOW_RIB_RISE_MM:
        # the lowest ribs run down and out from their heads; a piece whose far end lies high
        # above its joint is the cage above joined to it (synth 89118: an 'L1 rib' rising
        # 81 mm, read as thoracic), whatever its length
        return "undeterminable"
    if rib.cut:
        if lab != 7 and rib.length_mm >= stump_mm and not _tip_carried_away(rib, TIP_AWAY):
            # what the field of view leaves of a rib still runs away from the spine: over 392
            # pieces read as cut ribs of 38 mm or more (synth X, Y), 386 had their tip 0.6-2.8
            # times their first 60 mm from a vertebra. The other six (0.03-0.18: tips 2-11 mm
            # from a vertebra after 100-470 mm) ran along the column to the scan's edge, rib
            # heads and necks joined up and down it (89002, 88928: an 'L1 rib' of 277 and
            # 104 mm in view, read as thoracic); they tell no rib's length
            return "undeterminable"
        return "cut"
    if rib.joint_gap_mm >= FAR_FROM_JOINT_MM:
        # a piece that starts this far from its vertebra lost its head and neck, or is
        # the shaft of a neighbouring rib passing the transverse process; the joint gap
        # added to it is a guess (synth 93001: T10 measured 260 mm, truly 163 mm)
        return "undeterminable"
    if rib.length_mm < MIN_RIB_MM:
        return "absent"
    if rib.length_mm < stump_mm and rib.voxels * voxel_mm3 < MIN_STUMP_MM3:
        # a speck of bone by the spine (noise, a calcification), far thinner than a
        # rib: its length is mostly the joint gap and the tip extension. At T1 this
        # leaves the first rib to be found where its head touched only C7; at C7 a
        # speck by the transverse process is no cervical rib
        return "absent"
    if not _on_its_side(rib, frame):
        # bone that crosses in front of the spine (the hyoid, the manubrium, a vessel's
        # calcium) touched the vertebra on one side and reached over to the other: a rib
        # runs from its joint outward on its own side (synth 96031: a 'C7 rib' of 80 mm)
        return "undeterminable"
    if L.region(lab) != "T" and not _joint_at_body(rib, frame):
        # a rib of C7 or L1 must start at the body: a lower rib running past
        # the transverse process is not one
        return "undeterminable"
    away = TIP_AWAY_STUMP if lab in THORACOLUMBAR and rib.length_mm < stump_mm else TIP_AWAY
    if lab != 7 and not _tip_carried_away(rib, away, TRUNCATED_TIP_MM):
        # a piece whose tip is not carried away from the spine is a rib head and
        # neck whose shaft was lost (it ends at the transverse process), or bone
        # running along the vertebrae, not a rib: a rib points away from the spine.
        # C7 is spared: a rudimentary cervical rib hugs its long transverse process
        return "undeterminable"
    return "present"


def _cervical_ribs_beside_process(grid: Grid, ribs: dict, components: dict, frames: dict) -> dict:
    """Per side, a short cervical rib that shows only as a small piece beside C7's process.

    A cervical rib is C7's costal element grown out: it leaves the anterior root of the
    transverse process, beside the body, and runs forward and outward. Where the mask
    labels the process as C7, a short one shows only as the bit that sticks out of the
    label beyond the cut next to it: a piece too small to measure as a rib (it failed
    ``MIN_RIB_MM`` or the speck volume) yet clearly bone. Looked for among C7's pieces
    on a side that came out without a rib, and otherwise among the pieces beside its
    largest one (which may be the first rib, whose head touched only C7, and moves to T1).
    """
    if 7 not in ribs or 7 not in frames:
        return {}
    out = {}
    for side in SIDES:
        pieces = components.get((7, side), [])
        candidates = pieces if ribs[7][f"{side}_status"] == "absent" else pieces[1:]
        found = _piece_beside_process(grid, candidates, frames, side)
        if found is not None:
            out[side] = found
    return out


def _largest_c7_piece(grid: Grid, pieces: list, frames: dict, side: str, where) -> np.ndarray | None:
    """The points (mm) of the largest of C7's ``pieces`` that is bone, not a speck of noise
    (``MIN_CERVICAL_MM3`` in at least ``MIN_CERVICAL_VOXELS``), and lies ``where`` a cervical
    rib shows, or None.

    ``where(points_mm, centre_from_body, outward, body_half_width, level)`` is told the
    piece's centre from C7's body centroid, the outward axis of ``side``, the cervical body's
    half width, and its level: 0 at C7's body and 1 at T1's, along the line between them
    (``None`` without T1).
    """
    fr = frames[7]
    sp = grid.sp
    outward = fr.right if side == "right" else -fr.right
    body_half_width = _cervical_body_half_width(frames, 7)
    below = frames.get(8)
    down = below.body - fr.body if below is not None else None
    best = None
    for flat in pieces:
        if len(flat) < MIN_CERVICAL_VOXELS or len(flat) * float(np.prod(sp)) < MIN_CERVICAL_MM3:
            continue
        pts = np.array(np.unravel_index(flat, grid.mask.shape)).T * sp
        rel = pts.mean(axis=0) - fr.body
        level = float(rel @ down) / float(down @ down) if down is not None else None
        if where(pts, rel, outward, body_half_width, level) and (best is None or len(pts) > len(best)):
            best = pts
    return best


def _piece_beside_process(grid: Grid, pieces: list, frames: dict, side: str) -> dict | None:
    """The largest piece that is a cervical rib beside C7's process, with its length, or None.

    The piece must be bone, not a speck of noise (``MIN_CERVICAL_MM3`` in at least
    ``MIN_CERVICAL_VOXELS``), and lie where a cervical rib leaves C7: lateral of the body,
    in front of the body's centre (the costal element is the process's anterior root; the
    posterior tubercle and the first rib's neck lie behind), and at C7's level, nearer
    C7's body than T1's (the first rib's head sits on T1). Its length runs from the side
    of the body, where its joint is, to its farthest point, as a rib's is measured from
    the joint: the stretch along the process is under the label.
    """
    def in_front_beside_the_process(pts, rel, outward, body_half_width, level):
        return rel @ outward > body_half_width and rel @ frames[7].anterior >= 0.0 and (level is None or level < 0.5)

    best = _largest_c7_piece(grid, pieces, frames, side, in_front_beside_the_process)
    if best is None:
        return None
    fr, sp = frames[7], grid.sp
    outward = fr.right if side == "right" else -fr.right
    body_half_width = _cervical_body_half_width(frames, 7)
    joint = fr.body + outward * body_half_width
    length = float(np.linalg.norm(best - joint, axis=1).max()) + 0.5 * float(np.mean(sp))
    return {"length_mm": round(length, 1), "voxels": len(best), "volume_mm3": round(len(best) * float(np.prod(sp)), 1),
            "joint_ras_mm": [round(float(v), 1) for v in joint]}


def _cervical_rib_on_first_rib(grid: Grid, ribs, evidence, pieces, first, frames, side, joint_distance, thr,
                               outside, zone, reach_mm: float = 6.0) -> None:
    """A cervical rib joined to the first rib (by a joint or a bony bridge, as is common).

    The joined bone went whole to T1. Its part farther than 1.8 rib radii (and a voxel)
    from the first rib's centreline is not the first rib; a piece of it that starts
    within ``reach_mm`` of C7's label, beside its body, and is a rib of its own
    (``MIN_RIB_MM`` long, not cut) is a cervical rib. A first rib whose head merely
    touches C7 leaves only specks there.
    """
    from scipy.spatial import cKDTree

    if first.line is None or len(first.line) < 2:
        return
    sp = grid.sp
    idx = np.array(np.unravel_index(np.concatenate(pieces), grid.mask.shape)).T
    along_first = cKDTree(first.line)
    d, _ = along_first.query(idx * sp, k=1)
    rest = idx[d > 1.8 * first.radius_mm + float(sp.max())]
    c7 = grid.points(7)
    if len(rest) == 0 or len(c7) == 0:
        return
    lo = rest.min(axis=0)
    local = np.zeros(tuple(rest.max(axis=0) - lo + 1), dtype=bool)
    local[tuple((rest - lo).T)] = True
    comps, n = ndimage.label(local, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return
    near = cKDTree(c7 * sp).query(rest * sp, k=1)[0] <= reach_mm + float(sp.max())
    ids = np.unique(comps[tuple((rest[near] - lo).T)])
    ids = ids[ids > 0]
    if len(ids) == 0:
        return
    sizes = ndimage.sum(np.ones_like(comps), comps, ids)
    best = int(ids[int(np.argmax(sizes))])
    part = np.argwhere(comps == best) + lo
    flat = np.ravel_multi_index(tuple(part.T), grid.mask.shape)
    rib = _c7_rib(grid, [flat], frames, side, joint_distance, thr, outside, zone)
    speck = rib.length_mm < STUMP_MM and rib.voxels * float(np.prod(sp)) < MIN_STUMP_MM3
    # it runs out to the first rib, away from the spine: bone that ends by the spine is the
    # first rib's head and neck beside C7, or a cut T1's process (synth 93020, 81005, 86031);
    # bone that ends far from the first rib is not joined to it (the clavicle, synth 96029)
    away = rib.tip_gap_mm >= CERVICAL_TIP_AWAY_MM
    joined = float(along_first.query(np.asarray(rib.tip_mm), k=1)[0]) <= CERVICAL_JOIN_MM
    ok = (not rib.cut and rib.length_mm >= MIN_RIB_MM and not speck and away and joined
          and _joint_at_body(rib, frames[7]))
    evidence.setdefault("C7", {})[f"{side}_joined_to_first_rib"] = {**rib.evidence(), "accepted": bool(ok)}
    if ok:
        ribs[7][f"{side}_mm"], ribs[7][f"{side}_status"] = round(rib.length_mm, 1), "present"


def _first_rib_from_c7(ribs: dict, evidence: dict, components: dict | None = None,
                       measured: dict | None = None) -> list[str]:
    """A 'C7 rib' on a side where T1 has none is the first rib.

    The first thoracic rib is always there; its head sits high on T1, next to the
    C7/T1 disc, and may touch only C7's label. A cervical rib comes on top of a first
    rib, never instead of it, so a C7 rib beside an absent T1 rib is moved to T1. So
    is a C7 rib as long as a first rib (``FIRST_RIB_MIN_MM``, in view where the field of
    view cuts it) beside a T1 'rib' that is only a short piece by the spine (shorter than
    a stump rib): the first rib's head went to C7 and a piece of it to T1 (synth 84035: a
    cut first rib of 114 mm in view was a cervical rib). ``measured`` (per (label, side)) moves with it,
    and so does the largest of ``components``, the first rib's bone, so that a cervical
    rib joined to it can still be split off it; C7 keeps its other pieces, where a
    cervical rib apart from the first rib is (see :func:`_cervical_rib_left_at_c7`).
    Returns the sides moved.
    """
    moved: list[str] = []
    if 7 not in ribs or 8 not in ribs:
        return moved
    c7, t1 = ribs[7], ribs[8]
    for side in SIDES:
        t1_mm = t1.get(f"{side}_mm") or t1.get(f"{side}_visible_mm") or 0.0
        c7_mm = c7.get(f"{side}_mm") or c7.get(f"{side}_visible_mm") or 0.0
        speck = (t1.get(f"{side}_status") in ("present", "undeterminable") and t1_mm < STUMP_MM
                 and c7.get(f"{side}_status") in ("present", "cut") and c7_mm >= FIRST_RIB_MIN_MM)
        # a whole C7 rib shorter than any first rib is a cervical rib whose first rib was
        # lost to T1 (joined to other bone away from T1's joint: synth 88114, 41 mm)
        too_short = c7.get(f"{side}_status") == "present" and c7_mm < FIRST_RIB_MIN_MM
        if speck or (c7.get(f"{side}_status") in ("present", "cut", "undeterminable")
                     and t1.get(f"{side}_status") == "absent" and not too_short):
            if measured is not None and (7, side) in measured:
                measured[(8, side)] = measured.pop((7, side))
            if components is not None and (7, side) in components:
                components[(8, side)] = [_take_largest_c7_piece(components, side)]
            _move_rib_side(ribs, evidence, 7, 8, side, "C7 (T1 had no whole rib on this side)")
            moved.append(side)
    return moved


def _first_rib_of_unlabelled_t1(ribs: dict, evidence: dict, components: dict) -> dict[str, np.ndarray]:
    """Sides where C7's rib is the first rib of a T1 that the mask leaves out.

    Where the field of view cuts T1, the mask labels C7 as the last vertebra and the first
    rib's head, on T1 and by the C7/T1 disc, gives the first rib to C7: a long rib that the
    field of view cuts too (synth 81035, 93020, 93050: 'cervical ribs' of 100-180 mm on
    both sides, where at most one was there). A C7 rib cut by the field of view or
    undeterminable, with ``FIRST_RIB_MIN_MM`` of it in view, is taken for the first rib;
    its largest piece is set aside and C7 keeps the others. Returns that piece per side.
    """
    sides: dict[str, np.ndarray] = {}
    if 7 not in ribs or 8 in ribs:
        return sides
    c7 = ribs[7]
    for side in SIDES:
        seen = c7.get(f"{side}_visible_mm") or 0.0
        if c7.get(f"{side}_status") in ("cut", "undeterminable") and seen >= FIRST_RIB_MIN_MM:
            c7.pop(f"{side}_visible_mm", None)
            c7[f"{side}_mm"], c7[f"{side}_status"] = None, "absent"
            ev = evidence.get("C7", {}).pop(side, None)
            evidence.setdefault("C7", {})[f"{side}_first_rib_of_unlabelled_T1"] = ev
            sides[side] = _take_largest_c7_piece(components, side)
    return sides


def _take_largest_c7_piece(components: dict, side: str) -> np.ndarray:
    """Remove and return C7's largest piece on ``side``, the first rib's bone; the others
    stay C7's, where a cervical rib apart from the first rib is."""
    first, *rest = components.pop((7, side))
    if rest:
        components[(7, side)] = rest
    return first


def _first_rib_by_the_spine(grid: Grid, ribs, evidence, components, measured, frames, side, joint_distance, thr,
                            outside, zone, stump_mm: float) -> bool:
    """Where the rib moved from C7 to T1 starts far from the spine, the first rib is the
    longest of C7's other pieces that starts by it, and the far piece is set aside.
    Returns whether it did so.

    A rib's head articulates with the spine. At the thoracic inlet C7's largest piece can be
    the shoulder girdle, clavicle and scapula made one bone on coarse voxels, whose path
    starts ``FAR_FROM_JOINT_MM`` or more from the spine: at T1 such bone is no first rib
    (:func:`_rib_status`). Moved there whole, it left the first rib at C7, read as a
    cervical rib (synth 89331: a 321 mm piece starting 25 mm off, and a 106 mm first rib).
    """
    moved = measured.get((8, side))
    rest = components.get((7, side), [])
    if moved is None or moved.joint_gap_mm < FAR_FROM_JOINT_MM or not rest:
        return False
    voxel_mm3 = float(np.prod(grid.sp))
    best = None
    for piece in rest:
        rib = _c7_rib(grid, [piece], frames, side, joint_distance, thr, outside, zone)
        status = _rib_status(rib, 8, frames[8], stump_mm, voxel_mm3)
        if status in ("present", "cut") and rib.length_mm >= FIRST_RIB_MIN_MM and (
                best is None or rib.length_mm > best[1].length_mm):
            best = (piece, rib, status)
    if best is None:
        return False
    piece, rib, status = best
    left = [p for p in rest if p is not piece]
    if left:
        components[(7, side)] = left
    else:
        components.pop((7, side))
    far = components.get((8, side), [])
    components[(8, side)] = [piece]
    measured[(8, side)] = rib
    _set_rib(ribs[8], side, rib, status)
    evidence.setdefault("T1", {})[side] = {
        **rib.evidence(), "moved_from": "C7 (T1 had no whole rib; C7's piece starting by the spine)",
        "set_aside": {"length_mm": round(moved.length_mm, 1), "joint_gap_mm": round(moved.joint_gap_mm, 1),
                      "voxels": int(sum(len(p) for p in far))}}
    return True


def _cervical_rib_left_at_c7(grid: Grid, ribs, evidence, pieces, frames, side, joint_distance, thr, outside, zone,
                             stump_mm: float) -> None:
    """A cervical rib among C7's pieces once its largest, the first rib, went to T1.

    Where the first rib's head touched only C7, C7's pieces on that side hold the first
    rib and, apart from it, any cervical rib leaving the transverse process (synth 83029:
    a 64 mm cervical rib, a piece of its own, moved to T1 with the first rib and lost).
    What is left is measured as a C7 rib, from the body, by the rules of any rib.
    """
    rib = _c7_rib(grid, pieces, frames, side, joint_distance, thr, outside, zone)
    status = _rib_status(rib, 7, frames[7], stump_mm, float(np.prod(grid.sp)))
    evidence.setdefault("C7", {})[f"{side}_beside_first_rib"] = {**rib.evidence(), "status": status}
    if status == "present":
        ribs[7][f"{side}_mm"], ribs[7][f"{side}_status"] = round(rib.length_mm, 1), "present"


def _c7_rib(grid: Grid, pieces: list, frames: dict, side: str, joint_distance, thr: float, outside, zone):
    """C7's pieces measured as a rib from its joint at the body (see :func:`_from_the_body`)."""
    rib = measure_rib(pieces, grid.mask.shape, grid.sp, joint_distance, frames[7], side=side, ct=grid.ct, thr=thr,
                      smooth=grid.smooth, soft_hu=grid.soft_hu, outside=outside, zone=zone)
    return _from_the_body(rib, frames[7], side, _cervical_body_half_width(frames, 7))


def _move_rib_side(ribs: dict, evidence: dict, src: int, dst: int, side: str, why: str) -> None:
    """Give ``src``'s rib on ``side`` (its entry and evidence) to ``dst``; ``src`` is left without one."""
    for key in (f"{side}_mm", f"{side}_status", f"{side}_visible_mm"):
        if key in ribs[src]:
            ribs[dst][key] = ribs[src].pop(key)
        else:
            ribs[dst].pop(key, None)
    ribs[src][f"{side}_mm"], ribs[src][f"{side}_status"] = None, "absent"
    ev = evidence.get(L.name(src), {}).pop(side, None)
    if ev is not None:
        evidence.setdefault(L.name(dst), {})[side] = {**ev, "moved_from": why}


def _last_rib_from_below(ribs: dict, evidence: dict) -> None:
    """A rib at the vertebra below the last thoracic one, on a side where that vertebra has
    none, is the last thoracic vertebra's own rib.

    A lumbar rib (a rib at L1, or at T13 below T12) comes below a rib of the vertebra above
    it, never instead of it, just as a cervical rib comes on top of a first rib. The head of
    the lowest rib sits low on its vertebra, by the disc below, where its bone can touch only
    the next label; read as that vertebra's, it moved the thoracolumbar boundary one level
    down and gave a lumbar count one short."""
    order = [lab for lab in (19, 28, 20) if lab in ribs]  # T12, T13, L1
    for upper, lower in itertools.pairwise(order):
        above, below = ribs[upper], ribs[lower]
        for side in SIDES:
            if above.get(f"{side}_status") == "absent" and below.get(f"{side}_status") not in (None, "absent"):
                _move_rib_side(ribs, evidence, lower, upper, side,
                               f"{L.name(lower)} ({L.name(upper)} had no rib on this side)")


def _short_rib_above_a_long_one(ribs: dict, evidence: dict, stump_mm: float) -> None:
    """A short rib above a vertebra with a long rib is a rib whose shaft was lost: undeterminable.

    Ribs shorten down the thoracic cage to the last rib-bearing vertebra; a stump rib is the
    last one, never above a vertebra whose rib is long. A short piece there is the head and
    neck of a long rib whose shaft went to the next vertebra's piece (synth 87003: T10's
    rib in T11's cut 423 mm piece left a 35 mm 'stump'; 87002: a 12 mm remnant at T11 above
    a 148 mm T12 rib)."""
    order = [lab for lab in L.sort_anatomical(list(ribs)) if L.region(lab) in ("T", "L")]
    for upper, lower in itertools.pairwise(order):
        below = ribs[lower]
        if not any(rib_class(below, side, stump_mm) == "long" for side in SIDES):
            continue
        for side in SIDES:
            mm = ribs[upper].get(f"{side}_mm")
            if ribs[upper].get(f"{side}_status") == "present" and mm is not None and mm < stump_mm:
                ribs[upper][f"{side}_mm"], ribs[upper][f"{side}_status"] = None, "undeterminable"
                ribs[upper][f"{side}_visible_mm"] = mm
                evidence.setdefault(L.name(upper), {}).setdefault(side, {})["short_above_a_long_rib"] = L.name(lower)


def _cervical_body_half_width(frames: dict, lab: int) -> float:
    """Half width of a cervical body: its frame's estimate takes in the transverse processes,
    whose anterior tubercles reach in front of the body's centre; the next (thoracic) body
    below, about as wide, bounds it."""
    below = frames.get(lab + 1)
    own = frames[lab].half_width
    return min(own, below.half_width) if below is not None else own


def _from_the_body(rib, frame: Frame, side: str, body_half_width: float, span_mm: float = 8.0,
                   max_mm: float = 30.0):
    """A cervical rib measured from its joint at the vertebral body, like any rib.

    A cervical rib runs from the body along the C7 transverse process, which the mask
    labels as C7, so the bone seen starts at the process's tip. The stretch hidden beside
    the process is the rib's own start followed back, along its first ``span_mm``, to
    where a rib head's centre sits (a head radius off the body's side); it replaces the
    joint gap measured to the process; at most ``max_mm``, a transverse process's length.
    """
    from dataclasses import replace

    if rib.line is None or len(rib.line) < 2:
        return rib
    outward = frame.right if side == "right" else -frame.right
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(rib.line, axis=0), axis=1))]
    heading = geometry.unit(rib.line[min(int(np.searchsorted(arc, span_mm)), len(arc) - 1)] - rib.line[0])
    beyond = float((rib.line[0] - frame.body) @ outward) - (body_half_width + 1.25 * rib.radius_mm)
    lateral_rate = float(heading @ outward)
    if beyond <= 0 or lateral_rate <= 0.3:
        return rib
    hidden = min(beyond / lateral_rate, max_mm)
    if hidden <= rib.joint_gap_mm:
        return rib
    return replace(rib, length_mm=rib.length_mm - rib.joint_gap_mm + hidden, beside_process_mm=hidden)


def _tip_carried_away(rib, away: float, at_least_mm: float = 0.0) -> bool:
    """True when the rib's tip lies farther from the spine than ``away`` times its first
    60 mm (and than ``at_least_mm``): a rib points away from the spine, whole or cut."""
    return rib.tip_gap_mm > max(at_least_mm, away * min(rib.length_mm, 60.0))


def _rise_mm(rib, frame: Frame) -> float:
    """How far the rib's far end lies above its joint along the vertebra's superior axis (mm)."""
    if len(rib.joint_mm) != 3 or len(rib.tip_mm) != 3:
        return 0.0
    return float((np.asarray(rib.tip_mm, float) - np.asarray(rib.joint_mm, float)) @ frame.superior)


def _on_its_side(rib, frame: Frame) -> bool:
    """True when the rib's joint and tip both lie on its own side of the vertebra's
    mid-sagittal plane."""
    if len(rib.joint_mm) != 3 or len(rib.tip_mm) != 3:
        return True
    outward = frame.right if rib.side == "right" else -frame.right
    ends = np.array([rib.joint_mm, rib.tip_mm], dtype=float) - frame.centre
    return bool(np.all(ends @ outward > 0))


def _joint_at_body(rib, frame: Frame) -> bool:
    """True when the rib's joint end lies beside the vertebral body (a rib head)."""
    lateral = abs(float((np.asarray(rib.joint_mm) - frame.centre) @ frame.right))
    return lateral <= frame.half_width + HEAD_REACH_MM + 5.0


def rib_class(entry: dict, side: str, stump_mm: float) -> str:
    """'long', 'short' (stump or absent), or 'unknown' (cut short of stump_mm, no CT)."""
    status = entry.get(f"{side}_status")
    if status == "present" and entry.get(f"{side}_mm") is not None:
        return "long" if entry[f"{side}_mm"] >= stump_mm else "short"
    if status == "absent":
        return "short"
    if status == "cut" and entry.get(f"{side}_visible_mm", 0) >= stump_mm:
        return "long"
    return "unknown"


def effective_regions(present, ribs, stump_mm) -> dict[int, str]:
    """'C', 'T' or 'L' per vertebra after the rib rule at the thoracolumbar junction."""
    out = {}
    for lab in present:
        reg = L.region(lab)
        if lab in THORACOLUMBAR and lab in ribs:
            classes = {rib_class(ribs[lab], s, stump_mm) for s in SIDES}
            if "long" in classes:
                reg = "T"
            elif classes == {"short"}:
                reg = "L"
        out[lab] = reg
    # ribs run on down to the last rib-bearing vertebra without a gap: a vertebra read lumbar
    # above one read thoracic lost its ribs to its neighbour's piece (synth 85025: T11's ribs
    # were one undeterminable piece with T12's), it is no lumbar vertebra
    below_thoracic = False
    for lab in reversed(present):
        if out[lab] == "T":
            below_thoracic = True
        elif out[lab] == "L" and below_thoracic and lab in THORACOLUMBAR:
            out[lab] = "T"
    return out


def cervical_ribs(ribs, determinable: bool) -> dict:
    entry = ribs.get(7)
    if not determinable or entry is None:
        return {"left": None, "right": None, "count": None}
    sides = {s: entry.get(f"{s}_status") in ("present", "cut") for s in SIDES}
    return {"left": sides["left"], "right": sides["right"], "count": int(sum(sides.values()))}


def stump_ribs(ribs, stump_mm) -> list[dict]:
    out = []
    for lab, entry in sorted(ribs.items(), key=lambda kv: L.rank(kv[0])):
        if L.region(lab) not in ("T", "L"):
            continue
        for side in SIDES:
            mm = entry.get(f"{side}_mm")
            if entry.get(f"{side}_status") == "present" and mm is not None and mm < stump_mm:
                out.append({"vertebra": L.name(lab), "side": side, "length_mm": mm})
    return out


# --------------------------------------------------------------------------- field of view
def field_of_view(grid: Grid, items: list[dict]) -> dict:
    """First and last vertebra in view, those fully visible, and those cut by the field of view.

    Labelled vertebrae that touch the craniocaudal ends of the image are cut too (a
    narrow lateral field of view clips processes, not vertebrae).
    """
    m = grid.mask
    on_edge = set(np.unique(np.concatenate([m[:, :, 0].ravel(), m[:, :, -1].ravel()])).tolist()) - {0}
    edge_names = {L.name(x) for x in on_edge}
    named = [it for it in items if it["status"] not in ("gap", "inferred")]
    visible = [it["name"] for it in named
               if it["status"] in ("visible", "unlabelled", "fused") and it["name"] not in edge_names]
    cut = [it["name"] for it in named if it["status"] == "cut" or it["name"] in edge_names]
    return {"first": named[0]["name"] if named else None, "last": named[-1]["name"] if named else None,
            "visible": visible, "cut": cut}


def _neighbour_name(lab: int, step: int) -> str | None:
    """Usual anatomical neighbour's name (T13 and L6 are never assumed)."""
    chain = [*range(1, 20), *range(20, 25), 26]
    if lab == 28:
        return "T12" if step < 0 else "L1"
    if lab == 25:
        return "L5" if step < 0 else "S1"
    i = chain.index(lab) if lab in chain else None
    if i is None or not 0 <= i + step < len(chain):
        return None
    return L.name(chain[i + step])


# --------------------------------------------------------------------------- enumeration
_CHAIN = [*range(1, 20), 28, *range(20, 26)]  # C1..T12, T13, L1..L6
_OPTIONAL = {28, 25}  # T13 and L6 are variants, never missing vertebrae
_VARIANT_SKIPS = {(18, 20), (23, 26), (18, 28)}  # T11->L1 (11 thoracic), L4->S1 (4 lumbar)


def spine_sequence(grid: Grid, present, effective, frames, spine_info, castellvi,
                   sacrum_found: bool = False) -> tuple[list[dict], list[str]]:
    """Vertebrae in the field of view, head to foot: labelled, cut or unlabelled.

    ``sacrum_found``: the unlabelled sacrum was found below the last lumbar label (by the
    Castellvi rating), so the vertebra after a last label cut by the scan is S1.

    Each item is ``{"name", "region", "status"}`` with status ``visible`` (labelled),
    ``cut`` (unlabelled at an end of the field of view), ``unlabelled`` (bone where a
    label is missing, or the fused transitional vertebra) or ``gap`` (a vertebra
    is missing from the labels and cannot be placed).
    """
    spine = [lab for lab in present if L.is_vertebra(lab)]
    notes: list[str] = []
    items: list[dict] = []
    top = spine_info.get("top")
    if spine and top and top["present"]:
        prev = _neighbour_name(spine[0], -1)
        if prev and top.get("second_present"):
            before = _neighbour_name(L.label_id(prev), -1)
            if before:
                items.append({"name": before, "region": before[0], "status": "cut"})
        if prev:
            items.append({"name": prev, "region": prev[0], "status": "cut"})
    dists = [float(np.linalg.norm(frames[a].centre - frames[b].centre)) for a, b in itertools.pairwise(spine)]
    for i, lab in enumerate(spine):
        items.append({"name": L.name(lab), "region": effective[lab], "status": "visible"})
        if i + 1 == len(spine):
            break
        nxt = spine[i + 1]
        skipped = _skipped(lab, nxt)
        if not skipped:
            continue
        ratio = _spacing_ratio(dists, i)
        if (lab, nxt) in _VARIANT_SKIPS and ratio < 1.5:
            continue  # a numeric variant, not a missing vertebra
        if len(skipped) == 1 and 1.5 <= ratio < 2.5:
            name = L.name(skipped[0])
            items.append({"name": name, "region": L.region(skipped[0]), "status": "unlabelled"})
            notes.append(f"{name} is not labelled but there is room for one vertebra between "
                         f"{L.name(lab)} and {L.name(nxt)}")
        else:
            items.append({"name": "?", "region": "?", "status": "gap"})
            notes.append(f"labels jump from {L.name(lab)} to {L.name(nxt)} "
                         f"({dists[i]:.0f} mm apart, {ratio:.1f} times the neighbouring spacing)")
    if castellvi and castellvi.get("unlabelled_vertebra"):
        items.append({"name": castellvi["vertebra"], "region": "L", "status": "fused"})
    if 26 in present:
        items.append({"name": "S1", "region": "S", "status": "visible"})
    elif grid.ct is None:
        # a mask alone (VerSe 2019 masks leave the sacrum out): trust the rater's names,
        # who called the last lumbar vertebra L5 or L6 because the sacrum came next
        if spine and spine[-1] in (24, 25) and not _touches_end(grid, spine[-1]):
            items.append({"name": "S1", "region": "S", "status": "inferred"})
            notes.append(f"sacrum not labelled and no CT: the lumbar count is closed at {L.name(spine[-1])} "
                         "by its name")
    else:
        bottom = spine_info.get("bottom")
        if spine and bottom and bottom["present"]:
            nxt = "S1" if sacrum_found else _neighbour_name(spine[-1], +1)
            if nxt:
                items.append({"name": nxt, "region": "S" if nxt == "S1" else nxt[0], "status": "cut"})
    return items, notes


def _touches_end(grid: Grid, lab: int) -> bool:
    """True when a label reaches the craniocaudal end of the image."""
    m = grid.mask
    return bool((m[:, :, 0] == lab).any() or (m[:, :, -1] == lab).any())


def _skipped(a: int, b: int) -> list[int]:
    """Required chain members strictly between labels ``a`` and ``b`` (sacrum: 26)."""
    if a not in _CHAIN or b not in _CHAIN:
        return []
    i, j = _CHAIN.index(a), _CHAIN.index(b)
    return [x for x in _CHAIN[i + 1:j] if x not in _OPTIONAL]


def _spacing_ratio(dists: list[float], i: int) -> float:
    """Distance between vertebrae i and i+1 over the spacing of the neighbouring pairs."""
    ref = [dists[k] for k in (i - 1, i + 1) if 0 <= k < len(dists)]
    return dists[i] / float(np.median(ref)) if ref else 1.0


def enumerate_spine(items: list[dict]) -> tuple[dict, dict]:
    """Determinable counts, completeness and T11/T13/L4/L6 flags from the sequence.

    A region's count is determinable when the field of view shows all of it and the
    vertebra on each side of it (the paper: labelled from C1 or T1 down to the sacrum).
    """
    regions = [it["region"] for it in items]
    counts = {key: regions.count(r) for key, r in (("cervical", "C"), ("thoracic", "T"), ("lumbar", "L"))}

    def determinable(region: str, before: set, after: set, first_ok: bool = False) -> int | None:
        idx = [i for i, r in enumerate(regions) if r == region]
        if not idx or idx != list(range(idx[0], idx[-1] + 1)):
            return None
        lo, hi = idx[0], idx[-1]
        head_ok = (first_ok and lo == 0 and items[0]["name"] == "C1") or (lo > 0 and regions[lo - 1] in before)
        tail_ok = hi + 1 < len(items) and regions[hi + 1] in after
        return len(idx) if head_ok and tail_ok else None

    enum = {
        "cervical": determinable("C", set(), {"T"}, first_ok=True),
        "thoracic": determinable("T", {"C"}, {"L", "S"}),
        "lumbar": determinable("L", {"T"}, {"S"}),
    }
    enum["complete"] = None not in enum.values()
    flags = []
    if enum["thoracic"] is not None and enum["thoracic"] != 12:
        flags.append(f"T{enum['thoracic']}")
    if enum["lumbar"] is not None and enum["lumbar"] != 5:
        flags.append(f"L{enum['lumbar']}")
    enum["flags"] = flags
    return enum, counts


# --------------------------------------------------------------------------- Castellvi
def rate_castellvi(grid: Grid, bone, thr, frames, present, spine_info):
    """Castellvi grade of the lowest lumbar vertebra against the sacrum."""
    lumbar = [lab for lab in present if L.region(lab) == "L"]
    evidence: dict = {}
    if bone is None:
        return None, {"note": "no CT"}
    if not lumbar:
        return None, {"note": "no lumbar vertebra in the mask"}
    last = lumbar[-1]
    fr = frames[last]
    sp = grid.sp
    if 26 in present:
        sacrum_pts = grid.points(26)
        mask_all = grid.mask
    else:
        # the sacrum cut by the field of view carries no label: find it below the last
        # lumbar vertebra, and label it here (evidence says so)
        sacrum_pts, found_ev = find_unlabelled_sacrum(grid, bone, frames, lumbar)
        evidence["unlabelled_sacrum"] = found_ev
        if sacrum_pts is None:
            evidence["note"] = "sacrum neither labelled nor found below the last lumbar vertebra"
            return _graded_without_sacrum(grid, frames, lumbar, evidence)
        mask_all = grid.mask.copy()
        mask_all[tuple(sacrum_pts.T)] = 26
    # region of interest: the last lumbar vertebra, the sacrum's top and everything between
    last_pts = grid.points(last)
    pad = np.ceil(25.0 / sp).astype(int)
    sac_mm = sacrum_pts * sp
    t_sac = (sac_mm - fr.centre) @ fr.superior
    sac_top = sacrum_pts[t_sac >= t_sac.max() - 60.0]
    both = np.vstack([last_pts, sac_top])
    lo = np.maximum(both.min(axis=0) - pad, 0)
    hi = np.minimum(both.max(axis=0) + pad + 1, grid.mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    m = mask_all[box]
    b = bone[box]
    ct = grid.ct[box]
    base_mm = lo * sp
    coords = _box_coords(m.shape, sp, base_mm)
    rel = coords - fr.centre
    t = rel @ fr.superior
    lat = rel @ fr.right
    ap = rel @ fr.anterior
    disc = evidence.get("unlabelled_sacrum", {})
    if disc.get("transitional_vertebra") and "disc_point_mm" in disc:
        m = _split_at_disc(m, b, coords, disc)
    # unlabelled bone between the last lumbar label and the sacrum: a fused vertebra?
    in_last = m == last
    in_sac = m == 26
    axis_r = np.sqrt(np.maximum((rel ** 2).sum(-1) - t ** 2, 0))
    t_last_bottom = float(t[in_last & (axis_r < 20)].min()) if (in_last & (axis_r < 20)).any() else float(t[in_last].min())
    near_axis_sac = in_sac & (axis_r < 25)
    t_sac_top = float(t[near_axis_sac].max()) if near_axis_sac.any() else float(t[in_sac].max())
    between = b & (m == 0) & (t < t_last_bottom) & (t > t_sac_top - 5) & (axis_r < 30)
    between_ml = float(between.sum() * np.prod(sp) / 1000)
    body_ml = float((in_last & (axis_r < 20)).sum() * np.prod(sp) / 1000)
    evidence.update({"last_lumbar_label": L.name(last), "axial_gap_mm": round(t_last_bottom - t_sac_top, 1),
                     "unlabelled_bone_between_ml": round(between_ml, 1), "last_body_core_ml": round(body_ml, 1)})
    if "unlabelled_sacrum" in evidence:
        # the walk down the spine already told a transitional body from the sacrum
        fused_vertebra = bool(evidence["unlabelled_sacrum"].get("transitional_vertebra"))
    else:
        fused_vertebra = between_ml >= max(0.35 * body_ml, 3.0)
    if fused_vertebra:
        comps, _ = ndimage.label(b & (m == 0) & (t > t_sac_top - 40), structure=np.ones((3, 3, 3), bool))
        ids = np.unique(comps[between])
        ids = ids[ids > 0]
        # its voxels: unlabelled bone joined to the bone between, on the raw CT so
        # that a narrow cleft to the sacrum is not bridged by the smoothing
        reach = float(np.abs(lat[in_last]).max())
        vert = (np.isin(comps, ids) & (np.abs(lat) < 1.2 * reach) & (ap < 40) & (ct >= thr)
                & (t <= t_last_bottom + 5) & (t >= t_sac_top - 15))
        name = _neighbour_name(last, +1) if last != 24 else "L6"
        if last == 25:
            name = "L7?"
        rated_frame_centre = coords[vert].mean(axis=0) if vert.any() else fr.centre
    else:
        vert = in_last
        name = L.name(last)
        rated_frame_centre = fr.centre
    rel_v = coords - rated_frame_centre
    lat_v = rel_v @ fr.right
    t_v = rel_v @ fr.superior
    half_width = _lumbar_half_width(frames, lumbar)
    if fused_vertebra and "disc_point_mm" in disc:  # mm beyond the disc below it, towards the sacrum
        along_disc = (coords - np.asarray(disc["disc_point_mm"], dtype=np.float32)) @ geometry.unit(
            np.asarray(disc["disc_normal"], dtype=float)).astype(np.float32)
    elif fused_vertebra:  # the disc's plane square to the lumbar axis, just above the sacrum's top
        along_disc = (t_sac_top + 5.0) - t
    ap_v = rel_v @ fr.anterior if fused_vertebra else None
    # the sacral ala: the labelled sacrum lateral of the S1 facets
    sides = {}
    for side, sign in (("left", -1.0), ("right", 1.0)):
        lat_s = lat_v * sign
        reach = float(lat_s[vert].max()) if (vert & (lat_s > 0)).any() else 0.0
        ala = in_sac & (lat_s >= 0.45 * reach)
        if not fused_vertebra and _touches_edge(vert & (lat_s > half_width), box, grid.mask.shape):
            # a process cut by the scan's edge may reach on to its ala or be taller than measured
            # (an unlabelled fused vertebra's bone is joined to the ala, which may run on to the edge)
            sides[side] = {"grade": None, "note": "the transverse process is cut by the field of view"}
            continue
        if not ala.any():
            if _touches_edge(in_sac & (lat_s > 0), box, grid.mask.shape):  # the ala lies beyond the scan's edge
                sides[side] = {"grade": None, "note": "the sacral ala is outside the field of view"}
            else:
                sides[side] = {"grade": 0, "note": "no sacral ala on this side"}
            continue
        sides[side] = _castellvi_side(vert, lat_s, t_v, ala, ct, thr, sp, coords, half_width, grid.soft_hu)
        if fused_vertebra:
            t_sacrum = t_sac_top - float((rated_frame_centre - fr.centre) @ fr.superior)
            args = (ct, base_mm, sp, rated_frame_centre, fr, sign, half_width, vert, lat_s, ap_v, t_v, t_sacrum, thr)
            # the fused vertebra sits in the lumbosacral bend, tilted back from the labelled
            # vertebra above (the L5-S1 angle is 20-40 degrees beyond the lumbar axis): a line
            # held to that axis can pass beside its contact with the ala, so a side is clear
            # only when the lines turned back with the bend are clear too
            bent = [g for tilt in (15.0, 30.0) for g in _lines_to_the_ala(*args, tilt_deg=tilt)]
            sides[side] = _regraded_by_lines(sides[side], _lines_to_the_ala(*args), bent_gaps=bent)
            bridge = _bridge_to_ala(ct, sp, vert, b, lat_s, along_disc, ap_v, half_width, grid.soft_hu)
            sides[side] = _regraded_by_bridge({**sides[side], **bridge})
    grades = {s: sides[s]["grade"] for s in sides}
    combined = _combine(grades["left"], grades["right"])
    evidence.update({"sides": sides, "unlabelled_vertebra_voxels": int(vert.sum()) if fused_vertebra else 0})
    result = {"vertebra": name, "left": grades["left"], "right": grades["right"], "grade": combined,
              "unlabelled_vertebra": bool(fused_vertebra)}
    return result, evidence


def _lumbar_half_width(frames: dict, lumbar: list[int]) -> float:
    """The lowest lumbar body's half width (mm): the median over the last three lumbar
    vertebrae. A last label cut by the scan's edge or with one enlarged, asymmetric process
    can widen or tilt its own estimate by a third (real verse014's L5: 31 mm, L3-L4 21-23)."""
    return float(np.median([frames[lab].half_width for lab in lumbar[-3:]]))


def _graded_without_sacrum(grid: Grid, frames: dict, lumbar: list[int], evidence: dict):
    """Castellvi 0/1 for an L5 or L6 whose transverse processes are both in view and under
    ``TP_HEIGHT_MM``, where the sacrum below is not found (mostly cut by the field of view).

    Types II-IV are all contacts of an enlarged (dysplastic) process with the sacrum, and
    type I is the enlargement itself, so two normal processes are type 0 whatever lies
    below. Only the vertebra named L5 or L6 is graded: below an L4 may lie an L5 the
    scan cuts. Returns ``(None, evidence)`` where a process is enlarged, missing or cut
    by the scan's edge: the sacrum is then needed to grade it.
    """
    last = lumbar[-1]
    if L.name(last) not in ("L5", "L6"):
        return None, evidence
    fr = frames[last]
    pts = grid.points(last)
    rel = pts * grid.sp - fr.centre
    lat, t = rel @ fr.right, rel @ fr.superior
    half_width = _lumbar_half_width(frames, lumbar)
    on_edge = np.any((pts == 0) | (pts == np.asarray(grid.mask.shape) - 1), axis=1)
    heights = {}
    for side, sign in (("left", -1.0), ("right", 1.0)):
        lat_s = lat * sign
        beside = lat_s > 0
        if not beside.any() or on_edge[lat_s > half_width].any():
            return None, evidence
        tp = _transverse_process(beside, lat_s, half_width)
        if not tp.any():
            return None, evidence
        heights[side] = round(_tp_height(tp, lat_s, t, grid.sp), 1)
    if max(heights.values()) >= TP_HEIGHT_MM:
        return None, evidence
    evidence.update({"graded_without_sacrum": True, "last_lumbar_label": L.name(last),
                     "sides": {side: {"grade": 0, "transverse_process_height_mm": h} for side, h in heights.items()},
                     "note": f"sacrum not found below {L.name(last)}; both its transverse processes are under "
                             f"{TP_HEIGHT_MM:g} mm, and types II-IV need an enlarged one: type 0"})
    return {"vertebra": L.name(last), "left": 0, "right": 0, "grade": "0/1", "unlabelled_vertebra": False}, evidence


def _split_at_disc(m: np.ndarray, b: np.ndarray, coords: np.ndarray, disc: dict) -> np.ndarray:
    """The unlabelled sacrum (26 in ``m``) re-drawn at the disc below an unlabelled
    transitional vertebra: the bone beyond the disc's plane joined to the sacrum found.

    The sacrum found by the walk was cut square to the lumbar axis, which leaves the
    top of a tilted sacrum's alae to the vertebra above it and gives a process clear of
    the ala a fusion. Bone beyond the plane that is not joined to the sacrum (a process
    of the vertebra reaching past the disc's level) stays the vertebra's."""
    p0, n = np.asarray(disc["disc_point_mm"]), geometry.unit(np.asarray(disc["disc_normal"], dtype=float))
    beyond = (coords - p0.astype(np.float32)) @ n.astype(np.float32) > 0
    out = m.copy()
    sacrum = out == 26
    out[sacrum] = 0
    comps, _ = ndimage.label(b & (out == 0) & beyond)
    ids = np.unique(comps[sacrum & beyond])
    out[np.isin(comps, ids[ids > 0])] = 26
    return out


def find_unlabelled_sacrum(grid: Grid, bone: np.ndarray, frames: dict, lumbar: list[int], step_mm: float = 2.0):
    """Voxels of an unlabelled sacrum below the last lumbar vertebra, or ``None``.

    A 15 mm disc of the spine's cross-section walks down from the last lumbar body in
    ``step_mm`` steps, re-centred on the unlabelled bone it meets so that it follows
    the lordosis into the tilted sacrum. Vertebral bodies fill the disc, discs leave
    it empty. After the last label: a body, a disc and another body mean an
    unlabelled transitional vertebra (Castellvi III/IV, unlabelled as in VerSe) above
    the sacrum; a single body is the sacrum. The sacrum is the unlabelled bone
    connected to the column at its level, below its top. Bone that the scan's edge cuts
    before it ran on longer than a body is the sacrum only when its alae are in view
    (:func:`_reach_beside_body`); otherwise it may be the next vertebra, and none is named.
    """
    fr = frames[lumbar[-1]]
    sp = grid.sp
    free = bone & (grid.mask == 0)
    # bone within a few mm of the last label is that vertebra's own rim (the label is
    # drawn a little inside the bone), not sacrum: without it the sacrum found below
    # does not reach up over the facet joints and transverse processes
    last_pts = grid.points(lumbar[-1])
    pad = np.ceil(HALO_MM / sp).astype(int) + 1
    lo = np.maximum(last_pts.min(axis=0) - pad, 0)
    hi = np.minimum(last_pts.max(axis=0) + pad + 1, grid.mask.shape)
    lbox = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    halo = ndimage.distance_transform_edt(grid.mask[lbox] != lumbar[-1], sampling=sp) <= HALO_MM
    free[lbox] &= ~halo
    down = -fr.superior
    # start at the body's lower endplate: the posterior elements hang lower (the inferior
    # articular and spinous processes reach the next vertebra), and starting from them
    # would step over the disc below the body
    last_pts = grid.points(lumbar[-1]) * sp
    start = fr.body + down * _endplate_depth(last_pts - fr.body, down, fr.half_width)
    walk_len = 120.0
    # the column below bends back with the lordosis (the lumbosacral angle is 20-40
    # degrees, the sacrum runs down and back), so a walk held to the lumbar axis can
    # leave a tilted L5 through its front and miss the sacrum: the walk headed 0-30
    # degrees back that stays in bone the most is the column's
    walks = []
    for heading in _sagittal_tilts(down, fr.right, (0, -10, -20, -30)):
        _drop_specks(free, grid, start, heading, walk_len)
        walks.append(_walk(grid, free, start, heading, fr.right, step_mm, walk_len))
    profile, centres, clipped, heading = max(walks, key=lambda w: w[4])[:4]
    runs = _body_runs(np.array(profile), step_mm)
    if runs and runs[0][0] == 0 and len(runs) > 1:
        runs = runs[1:]  # bone right at the start is the last labelled vertebra's own
    evidence = {"bodies_below_mm": [[a * step_mm, b * step_mm] for a, b in runs],
                "profile": [round(f, 2) for f in profile]}
    if not runs:
        return _sacrum_by_its_shell(grid, free, start, down, fr.half_width, evidence)
    # a transitional vertebra starts one disc below the last label (a body first met
    # farther down is bone beside the column the walk strayed into) and is followed by
    # the sacrum one disc lower
    lstv = (len(runs) > 1 and runs[0][0] * step_mm <= MAX_DISC_MM
            and MIN_BODY_MM <= (runs[0][1] - runs[0][0]) * step_mm <= TALL_BODY_MM
            and (runs[1][0] - runs[0][1]) * step_mm <= MAX_DISC_MM)
    # the walk's discs are one witness; the bone beside the next body is another, which
    # a thin tilted disc or a transitional body of low density cannot hide
    probe = next_body_probe(grid, free, frames, lumbar)
    evidence["next_body"] = probe
    sacrum = runs[1] if lstv else runs[0]
    forced_disc = None
    if lstv and probe["nature"] == "sacrum":
        lstv, sacrum = False, runs[0]
    elif not lstv and probe["nature"] == "vertebra":
        found = None
        if 0 < runs[0][0] * step_mm <= MAX_DISC_MM and _bone_along_one_level(runs, probe, step_mm) >= MIN_BODY_MM:
            found = _sacrum_below_the_probed_vertebra(runs, centres, heading, probe, step_mm)
        elif runs[0][0] * step_mm > MAX_DISC_MM:
            found = _sacrum_below_an_empty_vertebra(runs, centres, heading, probe, step_mm)
        if found is not None:
            lstv, (sacrum, forced_disc) = True, found
    evidence["transitional_vertebra"] = bool(lstv)
    pts = None
    if any(clipped[sacrum[1]:sacrum[1] + 2]) and (sacrum[1] - sacrum[0]) * step_mm < (
            MIN_BODY_MM if lstv else TALL_BODY_MM):
        # bone cut by the scan's edge before it ran on longer than a vertebral body (below
        # a transitional vertebra, whose processes reach into the ala: shorter than a
        # body): a cut vertebra as much as the sacrum's top, so neither is named
        evidence["cut_by_field_of_view"] = True
        if not lstv and sacrum[0] * step_mm > MAX_DISC_MM:
            # ... unless that bone lies farther below than a disc's height: the walk met no
            # body under the last label at all
            return _sacrum_by_its_shell(grid, free, start, down, fr.half_width, evidence)
        # ... unless the alae are in view: bone beside the middle of the body, where a
        # lumbar vertebra has none (its transverse processes arise behind the body)
        pts = _bone_joined_at(grid, free, centres, sacrum[0], down)
        # the walk's axis just under the body's top, before the walk can drift
        centre = centres[min(sacrum[0] + round(4.0 / step_mm), sacrum[1] - 1)]
        half_depth = _body_half_depth(last_pts - fr.body, fr.anterior, fr.right, fr.half_width)
        reach = _reach_beside_body(grid, pts, centre, heading, fr.right, fr.half_width, half_depth)
        evidence["reach_beside_body_mm"] = [round(r, 1) for r in reach]
        if min(reach) < fr.half_width + ALA_BEYOND_MM:
            return None, evidence
        evidence["told_by_its_alae"] = True
    if forced_disc is not None:
        evidence["disc_point_mm"] = [round(float(v), 2) for v in forced_disc[0]]
        evidence["disc_normal"] = [round(float(v), 4) for v in forced_disc[1]]
    elif lstv:
        # the disc below the transitional body: halfway between the two runs, facing from
        # the body's middle towards the sacrum's top
        body_mid = centres[(runs[0][0] + runs[0][1] - 1) // 2]
        sac_top = centres[min(runs[1][0] + 2, len(centres) - 1)]
        evidence["disc_point_mm"] = [round(float(v), 2) for v in centres[(runs[0][1] + runs[1][0]) // 2]]
        evidence["disc_normal"] = [round(float(v), 4) for v in _sagittal_disc_normal(body_mid, sac_top, fr.right)]
    if pts is None:
        # a sacrum met farther below than a disc's height (a shell of osteoporotic bone, or
        # a steep sacrum the walk enters low) reaches up to the last label all the same: its
        # top and alae lie between, where a transverse process meets them
        deep = not lstv and sacrum[0] * step_mm > MAX_DISC_MM
        pts = _bone_joined_at(grid, free, centres, sacrum[0], down, top=0 if deep else None)
    if len(pts) == 0:
        return None, evidence
    evidence["voxels"] = len(pts)
    return pts, evidence


def _sagittal_disc_normal(body_mid: np.ndarray, sacrum_top: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The normal of the disc under a transitional body: from the body's middle towards the
    sacrum's top, in the sagittal plane (square to ``right``).

    The lumbosacral disc tilts forwards with the lordosis, not sideways. The walk's centres
    are pulled across the column towards the bone they meet, most beside a process fused
    on one side, and a disc tilted sideways with them (20-35 degrees, synth 88742, 88757)
    gives that side's process and its bridge to the sacrum, and the other side's process
    to the vertebra: a grade 4 read as 2a or 0/1."""
    normal = np.asarray(sacrum_top, float) - np.asarray(body_mid, float)
    return geometry.unit(normal - (normal @ right) * right)


def next_body_probe(grid: Grid, free: np.ndarray, frames: dict, lumbar: list[int]) -> dict:
    """Is the body next below the last lumbar label the sacrum or a vertebra?

    The sacral alae join the S1 body along its sides, so at the body's mid-depth bone runs
    on far beyond it; a lumbar vertebra's transverse processes arise from its arch behind
    the body, so there its bone ends at the body's side. A fused transitional vertebra's
    process is enlarged, but it too arises behind the body. The next body is placed by
    extrapolating the last lumbar body centroids (bent as the last two steps bend), 0.75 and
    1 step below the last one, and looked at in an 8 mm slab square to that step.

    ``nature``: ``sacrum`` when the bone runs on at least ALA_MARGIN_MM beyond the body's
    half width on both sides at either point, or ONE_ALA_MARGIN_MM on one side at the first
    while the second shows no vertebral body;
    ``vertebra`` when at the first point bone fills the body to ALA_BODY_FILL of its half
    width on both sides and ends within ALA_MARGIN_MM of it; otherwise ``None``, and the
    walk's discs decide alone.
    """
    fr = frames[lumbar[-1]]
    hw = _lumbar_half_width(frames, lumbar)
    out: dict = {"nature": None, "half_width_mm": round(hw, 1)}
    bodies = [frames[lab].body for lab in lumbar[-3:]]
    if len(bodies) < 2:
        return out
    _, step = _extrapolate(bodies)
    direction = geometry.unit(step)
    out["step_mm"] = round(float(np.linalg.norm(step)), 1)
    last_pts = grid.points(lumbar[-1]) * grid.sp
    half_depth = _body_half_depth(last_pts - fr.body, fr.anterior, fr.right, hw)
    reaches = []
    for fraction in (0.75, 1.0):
        centre = bodies[-1] + step * fraction
        pts = _bone_in_slab_at(grid, free, centre, direction, 4.0, 70.0, 8.0)
        reaches.append(_reach_beside_body(grid, pts, centre, direction, fr.right, hw, half_depth))
    out["reach_mm"] = [[round(r, 1) for r in pair] for pair in reaches]

    def body(pair) -> bool:
        return min(pair) >= ALA_BODY_FILL * hw and max(pair) < hw + ALA_MARGIN_MM

    # one side alone is an ala only where the body a little lower is no vertebra's: a fused
    # transitional vertebra's process, joined to the ala, can run on as far on its side
    # (synth 93056, a 3b: 50 mm on one side at 0.75 step, a body's 31 and 27 mm at 1 step)
    one_ala = max(reaches[0]) >= hw + ONE_ALA_MARGIN_MM and not body(reaches[1])
    if any(min(pair) >= hw + ALA_MARGIN_MM for pair in reaches) or one_ala:
        out["nature"] = "sacrum"
    elif body(reaches[0]):
        out["nature"] = "vertebra"
    return out


def _bone_in_slab_at(grid: Grid, free: np.ndarray, centre: np.ndarray, normal: np.ndarray, half_mm: float,
                     radius: float, seed_mm: float) -> np.ndarray:
    """Voxel indices of the bone in a slab (``half_mm`` either side of ``centre`` across
    ``normal``, out to ``radius``) joined within the slab to the bone within ``seed_mm`` of
    ``centre``."""
    lo = np.floor((centre - radius) / grid.sp).astype(int)
    hi = np.ceil((centre + radius) / grid.sp).astype(int) + 1
    region, box = _cylinder_in_box(grid, lo, hi, centre, normal, -half_mm, half_mm, radius)
    return _bone_joined_near(grid, free, region, box, centre, seed_mm)


def _bone_along_one_level(runs, probe: dict, step_mm: float) -> float:
    """How much of one level's spacing below the first body's top the walk spent in bodies
    (mm): a body's height when a vertebra is there, whatever thin line of low density
    split it; a plate of bone lower than a body leaves it short."""
    lo = runs[0][0] * step_mm
    hi = lo + probe["step_mm"] - 5.0
    return float(sum(max(0.0, min(b * step_mm, hi) - max(a * step_mm, lo)) for a, b in runs))


def _sacrum_below_the_probed_vertebra(runs, centres, heading, probe, step_mm):
    """The walk met no disc under a body that :func:`next_body_probe` calls a vertebra and
    that fills a body's height: a thin disc tilted beyond the slabs, or a transitional body
    of low density split by an emptier line. The sacrum is the first run that starts a
    body's height (MIN_BODY_MM) below the first, under the disc between it and the run
    before; or else the first run itself, cut at a disc placed one level's spacing (the
    probe's step) below the top of the vertebra, less half a thin disc; either faces along
    the walk's heading. Returns (sacrum run, (disc point, disc normal))."""
    later = [i for i, r in enumerate(runs) if i and (r[0] - runs[0][0]) * step_mm >= MIN_BODY_MM]
    disc_t = runs[0][0] * step_mm + probe["step_mm"] - 5.0
    k_disc = int(np.clip(round(disc_t / step_mm), 0, len(centres) - 1))
    if later:
        sacrum = runs[later[0]]
        k_disc = int(np.clip((runs[later[0] - 1][1] + sacrum[0]) // 2, 0, len(centres) - 1))
    else:
        sacrum = (min(k_disc + 1, runs[0][1] - 1), runs[0][1])
    # the disc faces along the walk's heading: the walk's centres, pulled across the column
    # towards the bone they meet, turn too sharply there to give its tilt
    return sacrum, (centres[k_disc], heading)


def _sacrum_below_an_empty_vertebra(runs, centres, heading, probe, step_mm):
    """The walk met no body within a disc's height under the last label, where
    :func:`next_body_probe` found a vertebra's body: a fused transitional vertebra of low
    density, whose cancellous bone lies below the threshold and whose shell the slabs miss
    (synth 96055, 93010, 93041). The sacrum is then the first run that starts 0.8-1.6 of a
    level's spacing below the last label's endplate, under a disc just above it; without
    one, ``None``. Returns (sacrum run, (disc point, disc normal))."""
    level = probe["step_mm"]
    for run in runs:
        if 0.8 * level <= run[0] * step_mm <= 1.6 * level:
            k_disc = int(np.clip(run[0] - 2, 0, len(centres) - 1))
            return run, (centres[k_disc], heading)
    return None


def _bone_joined_at(grid: Grid, free: np.ndarray, centres: list, k: int, down: np.ndarray,
                    top: int | None = None) -> np.ndarray:
    """Voxel indices of the unlabelled bone below the walk's step ``k`` (or ``top``) joined
    to the bone a few steps below ``k`` (the body the walk met there); empty when none."""
    top_point = centres[max(k - 1, 0) if top is None else top]
    seed_point = centres[min(k + 3, len(centres) - 1)]
    region, box = _tube(grid, top_point, down, -3.0, 200.0, 80.0)
    return _bone_joined_near(grid, free, region, box, seed_point, 6.0)


def _bone_joined_near(grid: Grid, free: np.ndarray, region: np.ndarray, box, point: np.ndarray,
                      seed_mm: float) -> np.ndarray:
    """Voxel indices of the bone in ``region`` (a mask over ``box``) joined within it to the
    bone within ``seed_mm`` of ``point`` (mm); empty when none."""
    comps, n = ndimage.label(free[box] & region)
    origin = np.array([sl.start for sl in box])
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    seed = np.rint(point / grid.sp).astype(int) - origin
    r = np.ceil(seed_mm / grid.sp).astype(int)
    lo, hi = np.maximum(seed - r, 0), np.minimum(seed + r + 1, comps.shape)
    ids = np.unique(comps[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))])
    ids = ids[ids > 0]
    return np.argwhere(np.isin(comps, ids)) + origin


def _body_half_depth(rel_mm: np.ndarray, anterior: np.ndarray, right: np.ndarray, half_width: float) -> float:
    """How far in front of its body centroid a vertebra's body reaches (``rel_mm``: its voxels
    in mm from the centroid), near its midline."""
    near = np.abs(rel_mm @ right) <= 0.5 * half_width
    ahead = (rel_mm @ anterior)[near]
    ahead = ahead[ahead > 0]
    return float(np.percentile(ahead, 98)) if len(ahead) else half_width


def _reach_beside_body(grid: Grid, pts: np.ndarray, centre: np.ndarray, heading: np.ndarray, right: np.ndarray,
                       half_width: float, half_depth: float, band_mm: float = 4.0) -> tuple[float, float]:
    """How far the bone ``pts`` runs on without a break from the walk's axis (through
    ``centre``) to the left and to the right (mm), seen along the walk's ``heading``, in the
    band through the middle of the body: within ``band_mm`` of ``half_depth`` behind the
    body's front, the front-most bone near the axis.

    The sacrum's alae are joined to the S1 body along its sides, so bone runs on there far
    beyond the body; a lumbar vertebra's transverse processes arise from its arch behind the
    body, so in that band its bone ends at the body's side. The band is placed from the
    body's front, not from the walk's centre: at the scan's edge the walk can drift back
    towards the arch. Looking along the walk fills the cancellous bone a threshold misses
    with the endplates and cortices above and below it."""
    if len(pts) == 0:
        return 0.0, 0.0
    rel = pts * grid.sp - centre
    front = geometry.unit(np.cross(right, heading))
    lat, ahead = rel @ right, rel @ front
    near_axis = np.abs(lat) <= 0.5 * half_width
    if not near_axis.any():
        return 0.0, 0.0
    middle = float(np.percentile(ahead[near_axis], 98)) - half_depth
    lat = lat[np.abs(ahead - middle) <= band_mm]
    bin_mm = float(grid.sp.max())
    reach = []
    for sign in (-1.0, 1.0):
        bins = np.rint(lat * sign / bin_mm).astype(int)
        occupied = np.bincount(bins[bins >= 0], minlength=1) > 0
        # two empty bins in a row end the bone (one may fall between the voxels' centres)
        gap = np.flatnonzero(~occupied[:-1] & ~occupied[1:]) if len(occupied) > 1 else np.array([], int)
        if not occupied[0]:
            reach.append(0.0)
        else:
            reach.append((gap[0] if len(gap) else len(occupied)) * bin_mm)
    return reach[0], reach[1]


def _sacrum_by_its_shell(grid: Grid, free: np.ndarray, start: np.ndarray, down: np.ndarray, half_width: float,
                         evidence: dict):
    """The sacrum as the unlabelled bone right under the last lumbar body, where the walk met
    no body below it: with osteoporotic cancellous bone below the bone threshold a body is
    only its cortical shell, which a slab inside the body never meets. The sacrum is the
    bone joined to what lies within the body's half width of the axis, starting within a
    disc's height (MAX_DISC_MM) under the body, and running on at least a body's height;
    the transitional vertebra cannot be told from it here, and none is named."""
    evidence = {**evidence, "found_by_shell": True}
    region, box = _tube(grid, start, down, -3.0, 200.0, 80.0)
    comps, n = ndimage.label(free[box] & region)
    if n == 0:
        return None, evidence
    under, ubox = _tube(grid, start, down, 0.0, MAX_DISC_MM, half_width)
    sub = tuple(slice(u.start - b.start, u.stop - b.start) for u, b in zip(ubox, box))
    counts = np.bincount(comps[sub][under], minlength=n + 1)
    counts[0] = 0
    if counts.max() == 0:
        return None, evidence
    found = comps == int(np.argmax(counts))
    pts = np.argwhere(found) + np.array([sl.start for sl in box])
    depth = (pts * grid.sp - start) @ down
    evidence["shell_extent_mm"] = round(float(depth.max() - depth.min()), 1)
    if depth.max() - depth.min() < MIN_BODY_MM:
        return None, evidence
    if _touches_edge(found, box, grid.mask.shape) and depth.max() - depth.min() < TALL_BODY_MM:
        evidence["cut_by_field_of_view"] = True
        return None, evidence
    evidence["voxels"] = len(pts)
    return pts, evidence


def _walk(grid: Grid, free: np.ndarray, start: np.ndarray, down: np.ndarray, right: np.ndarray, step_mm: float,
          length: float):
    """One walk down the column from ``start``: the least bone fraction per step over
    tilted slabs (the disc profile), the step centres, per step whether the scan's edge
    clips the slab, its heading, and the bone it met (the sum of the square slabs'
    fractions)."""
    profile, centres, clipped, bone_met = [], [], [], 0.0
    slabs = _sagittal_tilts(down, right)
    centre = start
    for _ in range(int(length / step_mm)):
        centre = centre + down * step_mm
        frac, n, square = _least_bone_slab(grid, free, centre, slabs, step_mm, 15.0)
        profile.append(frac)
        centres.append(centre.copy())
        clipped.append(_slab_clipped(grid, centre, down, step_mm, 15.0))
        bone_met += square
        if n == 0:
            break
        centre = _recentre(grid, free, centre, down)
    return profile, centres, clipped, down, bone_met


def _slab_clipped(grid: Grid, centre: np.ndarray, normal: np.ndarray, thick_mm: float, radius: float) -> bool:
    """True when the scan's edge cuts the slab (the disc of ``radius`` and ``thick_mm``)."""
    reach = radius * np.sqrt(np.clip(1.0 - normal ** 2, 0.0, 1.0)) + thick_mm / 2 * np.abs(normal)
    top = (np.asarray(grid.mask.shape) - 1) * grid.sp
    return bool(np.any(centre - reach < 0.0) or np.any(centre + reach > top))


def _sagittal_tilts(down: np.ndarray, right: np.ndarray, degrees=(0, -10, 10, -20, 20, -30, 30)) -> list:
    """``down`` turned about ``right`` by each angle: the normals of the slabs that look for
    a disc. The lumbosacral disc is wedge-shaped and tilted against the lumbar axis by the
    lordosis (sacral slope 30-50 degrees against L3-L4's 0-15), so a slab square to that
    axis cuts through both endplates at once and never finds the disc empty."""
    out = []
    for a in np.radians(degrees):
        turned = down * np.cos(a) + np.cross(right, down) * np.sin(a) + right * (right @ down) * (1 - np.cos(a))
        out.append(geometry.unit(turned))
    return out


def _least_bone_slab(grid: Grid, free: np.ndarray, centre: np.ndarray, normals: list, thick_mm: float,
                     radius: float) -> tuple[float, int, float]:
    """The least fraction of bone over slabs through ``centre`` with the given normals, the
    voxel count of the first slab (0: the walk left the scan) and its bone fraction."""
    fracs, first_n = [], None
    for d in normals:
        region, box = _slab(grid, centre, d, thick_mm, radius)
        n = int(region.sum())
        first_n = n if first_n is None else first_n
        if n:
            fracs.append(float((free[box] & region).sum()) / n)
    first = fracs[0] if fracs and first_n else 0.0
    return (min(fracs) if fracs else 0.0), int(first_n or 0), first


def _slab(grid: Grid, centre: np.ndarray, normal: np.ndarray, thick_mm: float, radius: float):
    """Voxels of the disc of ``radius`` and ``thick_mm`` around ``centre`` facing ``normal``,
    in a box fitted to the disc (``_tube``'s box is a cube around it, tens of times larger)."""
    sp = grid.sp
    reach = radius * np.sqrt(np.clip(1.0 - normal ** 2, 0.0, 1.0)) + thick_mm / 2 * np.abs(normal)
    lo = np.floor((centre - reach) / sp).astype(int)
    hi = np.ceil((centre + reach) / sp).astype(int) + 1
    return _cylinder_in_box(grid, lo, hi, centre, normal, -thick_mm / 2, thick_mm / 2, radius)


def _body_runs(profile: np.ndarray, step_mm: float, empty: float = 0.08) -> list[tuple[int, int]]:
    """(start, stop) steps of the bodies along the walk: runs between disc slabs, at least 8 mm
    long. A gap under 4 mm is a hole in a body's cancellous bone and is closed, unless a
    slab in it is empty (under ``empty``) whatever its tilt: a thin disc."""
    runs: list[tuple[int, int]] = []
    for a, b in true_runs(~_disc_slabs(profile, step_mm, empty=empty)):
        if runs and (a - runs[-1][1]) * step_mm < 4.0 and profile[runs[-1][1]:a].min() >= empty:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return [(a, b) for a, b in runs if (b - a) * step_mm >= 8.0]


def _disc_slabs(profile: np.ndarray, step_mm: float, window_mm: float = 20.0, empty: float = 0.08,
                relative: float = 0.35) -> np.ndarray:
    """Slabs of the walk that lie in a disc. Cancellous bone is partly below the threshold,
    so a body fills 10-100 % of a slab (its density varies with age and the scanner) while a
    disc leaves it empty, or, where a thin disc is blurred by the voxels, much emptier than
    the bodies on both sides of it (``relative`` of the fuller within ``window_mm``
    above and below, the less full of the two)."""
    k = max(round(window_mm / step_mm), 1)
    padded = np.pad(profile, k)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1)
    beside = np.minimum(windows[:, :k].max(axis=1), windows[:, k + 1:].max(axis=1))
    return (profile < empty) | (profile < relative * beside)


def _recentre(grid: Grid, free: np.ndarray, centre: np.ndarray, down: np.ndarray, radius: float = 15.0,
              half_mm: float = 3.0, gain: float = 0.7) -> np.ndarray:
    """The walk moved most of the way across the column towards the bone of a 6 mm slab
    around it (a thicker slab than the profile's, so that a body's cortical ring, not a
    single noisy plane, centres it), to follow the lordosis into the tilted sacrum."""
    region, box = _slab(grid, centre, down, 2 * half_mm, radius)
    hit = free[box] & region
    n = int(region.sum())
    if n == 0 or hit.sum() <= 0.1 * n:
        return centre
    shift = (np.argwhere(hit) + np.array([sl.start for sl in box])).mean(axis=0) * grid.sp - centre
    return centre + gain * (shift - (shift @ down) * down)


def _drop_specks(free: np.ndarray, grid: Grid, start: np.ndarray, down: np.ndarray, length: float,
                 min_mm3: float = 30.0) -> None:
    """Clear, in place, bone specks smaller than ``min_mm3`` around the walk below ``start``:
    noise of a thin-slice or sharp-kernel CT above the bone threshold, which would fill the
    empty slabs of a disc. Bone of the spine is never that small and alone."""
    sp = grid.sp
    ends = np.array([start, start + down * length])
    lo = np.maximum(np.floor((ends.min(axis=0) - 45.0) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((ends.max(axis=0) + 45.0) / sp).astype(int) + 1, grid.mask.shape)
    if np.any(hi <= lo):
        return
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    comps, n = ndimage.label(free[box])
    if n == 0:
        return
    sizes = np.bincount(comps.ravel(), minlength=n + 1) * float(np.prod(sp))
    small = sizes < min_mm3
    small[0] = False
    free[box] &= ~small[comps]


def _endplate_depth(rel_mm: np.ndarray, down: np.ndarray, half_width: float) -> float:
    """How far below the body centre the body ends: the lowest label voxel near the
    column's axis (within half the body's width), not the lowest of the whole vertebra."""
    t = rel_mm @ down
    radial = np.linalg.norm(rel_mm - np.outer(t, down), axis=1)
    core = t[radial <= 0.5 * half_width]
    return float(core.max()) if len(core) else float(t.max())


def _extrapolate(cs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Next centre after ``cs`` (head to foot): the last step, bent as the one before."""
    step = cs[-1] - cs[-2]
    if len(cs) >= 3:
        prev = cs[-2] - cs[-3]
        a, b = geometry.unit(prev), geometry.unit(step)
        axis = np.cross(a, b)
        sin, cos = float(np.linalg.norm(axis)), float(a @ b)
        if sin > 1e-6:
            k = axis / sin
            step = step * cos + np.cross(k, step) * sin + k * (k @ step) * (1 - cos)
    return cs[-1] + step, step


def _column_fraction(grid: Grid, free: np.ndarray, centre: np.ndarray, axis: np.ndarray, half: float) -> float:
    """Fraction of unlabelled bone in a 12 mm column around ``centre`` along ``axis``."""
    region, box = _tube(grid, centre, axis, -half, half, 12.0)
    n = int(region.sum())
    return float((free[box] & region).sum()) / n if n else 0.0


def _box_coords(shape, sp, base_mm) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float32).transpose(1, 2, 3, 0)
    return idx * sp.astype(np.float32) + base_mm.astype(np.float32)


def _tp_height(tp: np.ndarray, lat: np.ndarray, t: np.ndarray, sp: np.ndarray, slab_mm: float = 3.0) -> float:
    """Craniocaudal height of a transverse process: the median height of its lateral
    slabs. A whole-process extent would add the tilt of a long process to its height,
    and the innermost slabs may still hold the tall articular processes."""
    if not tp.any():
        return 0.0
    la, ta = lat[tp], t[tp]
    bins = np.floor((la - la.min()) / slab_mm).astype(int)
    heights = []
    pad = float(np.mean(sp))  # voxel centres to outer surfaces
    for k in np.unique(bins):
        sel = ta[bins == k]
        if len(sel) >= 3:
            heights.append(float(sel.max() - sel.min()) + pad)
    return float(np.median(heights)) if heights else 0.0


def _transverse_process(beside: np.ndarray, lat: np.ndarray, half_width: float) -> np.ndarray:
    """The transverse process among a vertebra's voxels on one side (``beside``, ``lat``: mm
    out from the midline): lateral of its body, beyond the facet joints (which articulate
    with the sacrum in every spine and must not count)."""
    return beside & (lat >= min(half_width + 3.0, TP_LATERAL * float(lat[beside].max())))


def _castellvi_side(vert, lat, t, ala, ct, thr, sp, coords, half_width: float, soft_hu: float = 40.0) -> dict:
    """Grade one side: transverse process height, gap to the sacrum, fusion."""
    side = vert & (lat > 0)
    if not side.any():
        return {"grade": 0, "note": "no bone on this side"}
    tp = _transverse_process(side, lat, half_width)
    tp_height = _tp_height(tp, lat, t, sp)
    from scipy.spatial import cKDTree

    if not tp.any():
        return {"grade": 0, "note": "no transverse process found"}
    # the contact that grades is the process's with the ala, lateral of the facet joints
    # (the superior articular processes of S1 reach up beside the body in every spine)
    beyond_facets = lat >= half_width + 6.0
    cand = np.argwhere(tp & beyond_facets) if (tp & beyond_facets).any() else np.argwhere(tp)
    ala_pts = np.argwhere(ala & beyond_facets) if (ala & beyond_facets).any() else np.argwhere(ala)
    d, nearest = cKDTree(ala_pts * sp).query(cand * sp, k=1)
    k = int(np.argmin(d))
    p = cand[k]
    q = ala_pts[nearest[k]]
    centre_gap = float(d[k])
    direction = geometry.unit((q - p) * sp)
    vox_extent = float(np.linalg.norm(direction * sp)) if centre_gap > 0 else 0.0
    # gap between the surfaces ~ centre distance minus one voxel along the line
    gap = max(0.0, centre_gap - float(np.abs(direction * sp).max()))
    # the HU profile along the line, reaching 3 voxels into the process and the ala:
    # a pseudarthrosis shows two cortices with a valley between them, even where the
    # cleft is thinner than a voxel; fused bone runs on without a valley
    u = (q - p) / max(float(np.linalg.norm(q - p)), 1e-6)
    a_pt, b_pt = p - 3 * u, q + 3 * u
    n = max(int(np.ceil(np.linalg.norm((b_pt - a_pt) * sp) / 0.25)), 8)
    frac = np.linspace(0, 1, n)
    line = a_pt[None, :] + frac[:, None] * (b_pt - a_pt)[None, :]
    hu = ndimage.map_coordinates(ct, line.T, order=1, mode="nearest")
    span = float(np.linalg.norm((b_pt - a_pt) * sp))
    pos = frac * span
    p_at, q_at = 3 * float(np.linalg.norm(u * sp)), span - 3 * float(np.linalg.norm(u * sp))
    mid = (pos >= p_at - 1e-6) & (pos <= q_at + 1e-6)
    peak = min(float(hu[pos <= p_at + 1e-6].max()), float(hu[pos >= q_at - 1e-6].max()))
    valley = float(hu[mid].min()) if mid.any() else peak
    cleft_mm = float(((hu < min(thr, 0.75 * peak)) & mid).mean() * span)
    # a cleft of soft tissue a few mm wide darkens the profile to below half way between
    # soft tissue and cortex on any CT grid; one that stays brighter is narrower than the
    # voxels, however far apart the thresholded voxels are: a pseudarthrosis
    narrow_cleft = valley >= 0.5 * (peak + soft_hu)
    # the gap between the labels overstates the cleft: the label is drawn inside the bone,
    # and an unlabelled sacrum is found without the bone within HALO_MM of the label above
    # it, which shaves the ala's top under the process. The non-bone on the raw CT between
    # the two is the cleft a reader measures (Castellvi II: at most 2 mm), widened on the
    # profile by the scanner's blur, which darkens the cortices either side of a cleft
    thin_cleft = cleft_mm <= CLEFT_ON_PROFILE_MM
    # Castellvi II and III concern an enlarged (dysplastic) transverse process
    enlarged = tp_height >= TP_HEIGHT_MM
    fused = gap <= 0.5 and valley >= 0.75 * peak
    if fused and enlarged:
        grade = 3
    elif enlarged and (gap <= PSEUDARTHROSIS_MM + 0.5 or narrow_cleft or thin_cleft):
        grade = 2
    elif tp_height >= TP_HEIGHT_MM:
        grade = 1
    else:
        grade = 0
    return {"grade": grade, "transverse_process_height_mm": round(tp_height, 1),
            "transverse_process_voxels": int(tp.sum()), "gap_to_sacrum_mm": round(gap, 1),
            "cleft_mm": round(cleft_mm, 1), "valley_hu": round(valley, 0), "cortex_peak_hu": round(peak, 0),
            "closest_point_ras_mm": [round(float(v), 1) for v in coords[tuple(p)]],
            "sacrum_point_ras_mm": [round(float(v), 1) for v in coords[tuple(q)]],
            "voxel_extent_mm": round(vox_extent, 2), "fused_at_closest": bool(fused)}


def _bridge_to_ala(ct, sp, vert, bone, lat, along, ap, half_width: float, soft_hu: float,
                   core_mm: float = 8.0) -> dict:
    """How bright the bone joining a process to its ala stays: the highest HU at which the
    lightly smoothed raw CT still joins the process's bone (``core_mm`` or more above the
    disc's plane, ``along`` < 0) to the bone as far below it, lateral of the facet joints
    and within the process's reach. A fusion joins them through bone; a pseudarthrosis
    only through its cleft, darker than the bone either side; a clear process not at all.

    ``bridge_ratio`` puts that HU between soft tissue (0) and the process's median (1).
    The articular processes, whose joint with S1 the blur bridges as brightly as bone,
    lie within 10 mm of the body's side and behind the transverse process: the bridge is
    looked for beyond them, from 8 mm behind the process's middle forwards. The bone
    below is taken from the CT, not from the sacrum found, which can miss an ala's shell."""
    side = vert & (lat > 0)
    if not side.any():
        return {}
    lateral = (lat >= half_width + 10.0) & (lat <= float(lat[side].max()) + 3.0)
    tp_core = vert & lateral & (along < -core_mm)
    ala_core = bone & ~vert & lateral & (along > core_mm)
    if not tp_core.any() or not ala_core.any():
        return {}
    a0 = float(np.median(ap[tp_core]))
    # the cleft is looked for farther back than the bridge: a pseudarthrosis can sit at the
    # process's root, 10-15 mm behind its middle, beside the articular processes
    near = lateral & (np.abs(along) < 40.0) & (ap > a0 - 15.0) & (ap < a0 + 20.0)
    region = near & (ap > a0 - 8.0)
    # the search stays in the band: smooth and label only its box (the smoothing's reach,
    # 4 sigma, stays within the 4 voxels of padding, so the HU inside are the same)
    idx = np.argwhere(near | tp_core)
    lo_i, hi_i = np.maximum(idx.min(axis=0) - 4, 0), np.minimum(idx.max(axis=0) + 5, region.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i))
    region, near, tp_core, ala_core = region[box], near[box], tp_core[box], ala_core[box]
    # 0.7 mm of smoothing: noise alone (25-50 HU) would otherwise break a bridge
    sm = ndimage.gaussian_filter(ct[box].astype(np.float32), sigma=0.7 / np.asarray(sp, float))
    level = float(np.median(sm[tp_core]))
    clear = _process_clear_of_ala(sm, sp, near, tp_core, ala_core, 0.5 * (soft_hu + level))
    lo, hi = soft_hu, float(max(sm[tp_core].max(), level))
    tp_in, ala_in = tp_core & region, ala_core & region

    def joined(h):
        comps, _ = ndimage.label(region & (sm >= h))
        a = np.unique(comps[tp_in])
        return bool(np.intersect1d(a[a > 0], comps[ala_in]).size)

    if not joined(lo):
        return {"bridge_hu": None, "bridge_ratio": 0.0, "process_hu": round(level, 0), **clear}
    for _ in range(9):  # to within ~2 HU of a 1000 HU range
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if joined(mid) else (lo, mid)
    return {"bridge_hu": round(lo, 0), "process_hu": round(level, 0),
            "bridge_ratio": round((lo - soft_hu) / max(level - soft_hu, 1.0), 2), **clear}


def _process_clear_of_ala(sm, sp, region, tp_core, ala_core, half_hu: float) -> dict:
    """How far the process's bone stays from the ala's, both taken at ``half_hu`` (half way
    from soft tissue to the process's median) on the smoothed CT ``sm``.

    The plane that parts a fused vertebra from the sacrum leaves the ala's top above it,
    in the vertebra's voxels, so the labels touch on every side. The raw CT is parted here
    instead along its darkest surface: a watershed of the HU floods the band from the
    process's core and from the ala's, and their bone meets where the cleft between them
    is darkest. A pseudarthrosis's cleft of 1-2 mm stays brighter than ``half_hu`` in the
    scanner's blur (the two bones then lie a voxel apart); a wider cleft reads about its
    width, and the trabecular mottle inside a process cannot open a cleft within one
    basin."""
    from skimage.segmentation import watershed

    markers = np.zeros(sm.shape, np.int32)
    markers[tp_core & region & (sm >= half_hu)] = 1
    markers[ala_core & region & (sm >= half_hu)] = 2
    if not (markers == 1).any() or not (markers == 2).any():
        return {}
    basins = watershed(-sm, markers, mask=region)
    process_bone = (basins == 1) & (sm >= half_hu)
    to_ala = ndimage.distance_transform_edt(~((basins == 2) & (sm >= half_hu)), sampling=sp)
    return {"process_to_ala_mm": round(float(to_ala[process_bone].min()), 1), "at_hu": round(half_hu, 0)}


def _lines_to_the_ala(ct, base_mm, sp, centre, fr, sign, half_width, vert, lat, ap, t, t_sacrum, thr,
                      step_mm: float = 0.5, tilt_deg: float = 0.0) -> list[float]:
    """Beside an unlabelled fused vertebra, the cleft between its transverse process and the
    ala on raw-CT lines down from the process (lateral of the facet joints, a few mm apart
    across it) into the sacrum: per line, the mm of non-bone between the process's bone and
    the ala's (0: the bone runs on, a bony fusion). Lines without process bone above the
    sacrum's top or without ala below it are left out. The lines run along the last
    labelled vertebra's axis, turned back from it by ``tilt_deg``."""
    lateral = vert & (lat >= half_width + 6.0)
    if not lateral.any():
        return []
    a0 = float(np.median(ap[lateral]))
    ts = np.arange(float(t[lateral].max()), t_sacrum - 25.0, -step_mm)
    back = (ts[0] - ts) * np.tan(np.radians(tilt_deg))  # how far behind the start each sample lies
    per_sample_mm = step_mm / np.cos(np.radians(tilt_deg))
    grid_l, grid_a = np.meshgrid(np.arange(half_width + 6.0, float(lat[lateral].max()) + step_mm, 3.0),
                                 a0 + np.arange(-6.0, 6.5, 3.0), indexing="ij")
    gaps = []
    for l, a in zip(grid_l.ravel(), grid_a.ravel()):
        pts = centre + sign * l * fr.right + np.outer(a - back, fr.anterior) + np.outer(ts, fr.superior)
        hu = ndimage.map_coordinates(ct, ((pts - base_mm) / sp).T, order=1, mode="nearest")
        runs = true_runs(hu >= thr)
        if not runs or ts[runs[0][0]] < t_sacrum or ts[runs[-1][1] - 1] > t_sacrum - 8.0:
            continue
        # the cleft is the first one below the process: farther down the line may leave the
        # ala and meet other bone (a lower sacral segment, the ilium), whose distance from
        # the process is no cleft. A process whose bone runs on past the ala's top is fused
        ran_on = ts[runs[0][1] - 1] <= t_sacrum - 8.0
        gaps.append(0.0 if len(runs) == 1 or ran_on else float((runs[1][0] - runs[0][1]) * per_sample_mm))
    return gaps


def _regraded_by_lines(side: dict, gaps: list[float], clear_mm: float = 10.0,
                       bent_gaps: list[float] | None = None) -> dict:
    """A side of an unlabelled fused vertebra, graded again from the raw-CT lines to the
    ala. The vertebra and the sacrum were parted by a plane, which leaves sacral bone
    above it touching the sacrum along the cut (every side then reads as fused), and can
    leave a process fused below it as the sacrum's. Bone running on from the process into
    the ala on a line along the axis is a fusion (III); a process that stays more than
    ``clear_mm`` above the ala on every line (several times a pseudarthrosis's 2 mm, for
    lines that pass beside an oblique contact), along the axis and along ``bent_gaps``'
    lines turned back with the lumbosacral angle, touches nothing: grade I if enlarged,
    else none."""
    if not gaps or "grade" not in side or "transverse_process_height_mm" not in side:
        return side
    enlarged = side["transverse_process_height_mm"] >= TP_HEIGHT_MM
    out = {**side, "lines_to_ala": len(gaps), "fused_lines": int(sum(g == 0 for g in gaps)),
           "narrowest_line_gap_mm": round(min(gaps), 1)}
    if bent_gaps:
        out["narrowest_bent_line_gap_mm"] = round(min(bent_gaps), 1)
    if min(gaps) == 0 and (enlarged or _fused_short_process(out)):
        out["grade"] = 3
    elif min(gaps + list(bent_gaps or [])) > clear_mm:
        out["grade"] = 1 if enlarged else 0
    return out


def _regraded_by_bridge(side: dict) -> dict:
    """A side of an unlabelled fused vertebra, graded again from how bright the bone that
    joins its process to the ala stays (:func:`_bridge_to_ala`, ``bridge_ratio``: 1 as
    bright as the process, 0 soft tissue).

    Beside a vertebra fused on one side, the other side's pseudarthrosis read as fused on
    the closest voxels and the lines (the plane that parts the vertebra from the sacrum
    leaves their bone touching): over 187 synth cases with a fused side, 53 of 66
    pseudarthroses and 36 of 69 clear processes were graded III. A process joined only
    through bone darker than itself (``BRIDGE_CLEFT`` to ``BRIDGE_FUSED``: a cleft's
    partial volume) is a pseudarthrosis, and one graded II but joined through bone as
    bright as itself is fused. Below ``BRIDGE_CLEFT`` the bridge is left out: fusions that
    the band it looks in misses read there as often as clear processes do.

    Nor does the bridge tell a clear process from a pseudarthrosis: a wide cleft's soft
    tissue joins them at 0.2-0.3 of the process's HU, as a narrow one's often does. A side
    graded II or III whose bone stays more than ``CLEAR_OF_ALA_MM`` from the ala's
    (:func:`_process_clear_of_ala`) touches nothing: grade I if enlarged, else none. Before
    this rule every grade I side beside a fused vertebra in four synth sets (8 of 8) was
    graded II or III.
    Conversely a side graded 0 or I that touches the ala and is bridged to it as brightly
    as bone is fused, whatever its height above the parting plane (which cuts off the part
    merged into the ala: X 88956, 13 mm each side). Of the 15 clear sides with a bridge
    beside a fused vertebra in those four sets, 14 were bridged at 0.59 or less."""
    ratio, grade = side.get("bridge_ratio"), side.get("grade")
    if ratio is None or grade is None:
        return side
    if grade >= 2 and ratio < BRIDGE_FUSED and side.get("process_to_ala_mm", 0.0) > CLEAR_OF_ALA_MM:
        enlarged = side.get("transverse_process_height_mm", 0.0) >= TP_HEIGHT_MM
        return {**side, "grade": 1 if enlarged else 0, "regraded_by": "the process's bone stays clear of the ala's"}
    if grade <= 1 and ratio >= BRIDGE_FUSED and side.get("process_to_ala_mm", np.inf) <= CLEAR_OF_ALA_MM:
        return {**side, "grade": 3, "regraded_by": "bridge as bright as the process: bone, however short"}
    if grade == 3 and BRIDGE_CLEFT <= ratio < BRIDGE_FUSED:
        return {**side, "grade": 2, "regraded_by": "bridge darker than the process: a cleft"}
    if grade == 2 and ratio >= BRIDGE_FUSED:
        return {**side, "grade": 3, "regraded_by": "bridge as bright as the process: bone"}
    return side


def _fused_short_process(side: dict) -> bool:
    """A process under ``TP_HEIGHT_MM`` that is one bone with the ala: III all the same.

    Beside an unlabelled fused vertebra the process's height is taken above the plane
    that parted the vertebra from the sacrum, and a process merged into the ala loses
    there the part it merged with: fused processes measured 14-18.5 mm, graded 0 beside
    a fused other side or none (synth 96056, 93025, 84010, 83025). Bone running on into
    the ala at the closest point (no gap, no valley in the HU) and on ``FUSED_LINES_MIN``
    raw-CT lines or more, from a process of ``FUSED_TP_MIN_MM`` or more, is a fusion;
    the sides that read so over six synth sets but were not fused measured 9.8-12.4 mm."""
    return (side.get("fused_at_closest", False) and side.get("fused_lines", 0) >= FUSED_LINES_MIN
            and side["transverse_process_height_mm"] >= FUSED_TP_MIN_MM)


def _combine(left: int | None, right: int | None) -> str | None:
    if left is None or right is None:  # a side that cannot be seen may hold any grade
        return None
    g = {left, right}
    if 2 in g and 3 in g:
        return "4"
    if 3 in g:
        return "3b" if left == right else "3a"
    if 2 in g:
        return "2b" if left == right else "2a"
    return "0/1"


# --------------------------------------------------------------------------- warnings
def consistency_warnings(present, ribs, effective, stump_mm, have_ct, items) -> list[str]:
    out = []
    spine = [lab for lab in present if L.is_vertebra(lab)]
    if any(it["status"] in ("gap", "unlabelled") for it in items):
        out.append("labels are not contiguous: " + ", ".join(L.name(x) for x in spine))
    if have_ct:
        for lab in spine:
            if lab not in ribs:
                continue
            reg, label_reg = effective[lab], L.region(lab)
            if label_reg == "T" and reg == "L":
                out.append(f"{L.name(lab)} is labelled thoracic but has no rib of {stump_mm:g} mm or more "
                           f"(counts as lumbar)")
            elif label_reg == "L" and reg == "T":
                out.append(f"{L.name(lab)} is labelled lumbar but has a rib of {stump_mm:g} mm or more "
                           f"(counts as thoracic)")
            elif label_reg == "T":
                classes = {rib_class(ribs[lab], s, stump_mm) for s in SIDES}
                if classes == {"short"}:
                    out.append(f"{L.name(lab)} is thoracic but no rib was found on either side")
    return out


# --------------------------------------------------------------------------- files and CLI
def rate_files(ct_path, mask_path, ctd_path=None, stump_mm: float = STUMP_MM) -> dict:
    """:func:`rate_variants` on files; ``ct_path`` may be ``None`` (mask alone)."""
    from .core.centroids import read_centroids
    from .core.io import load_ct, load_nifti

    mask_img = load_nifti(mask_path)
    ct_img = load_ct(ct_path) if ct_path is not None else None
    ctd = read_centroids(ctd_path, ref_affine=mask_img.affine) if ctd_path is not None else None
    if ctd is not None:
        ctd.check_matches(mask_img.affine, str(ctd_path))
    result = rate_variants(ct_img, mask_img, ctd, stump_mm=stump_mm,
                           ct_source=None if ct_path is None else str(ct_path), mask_source=str(mask_path))
    result["inputs"] = {"ct": None if ct_path is None else str(ct_path), "mask": str(mask_path),
                        "ctd": None if ctd_path is None else str(ctd_path)}
    return result


def run_command(ct, mask, ctd, output, stump_mm: float = STUMP_MM, no_ct: bool = False, out_dir=None) -> None:
    """Body of ``verse rate-variants``: one case, or a dataset folder."""
    from pathlib import Path

    from .core.errors import UsageError
    from .core.io import write_json
    from .core.progress import info, warn

    if stump_mm <= 0:
        raise UsageError("--stump-mm must be positive")
    if Path(ct).is_dir():
        if mask is not None or no_ct:
            raise UsageError("dataset mode takes one folder and no mask")
        results = rate_dataset(Path(ct), stump_mm=stump_mm, out_dir=out_dir)
        rows = summary_rows(results)
        write_summary_csv(rows, output)
        print_summary(rows, len(results), to_stdout=str(output) != "-")
        return
    if no_ct:
        if mask is not None:
            raise UsageError("--no-ct takes the mask as the only positional argument")
        ct, mask = None, ct
    elif mask is None:
        raise UsageError("give a CT and a mask (or --no-ct MASK, or a dataset folder)")
    result = rate_files(ct, mask, ctd, stump_mm=stump_mm)
    for w in result["warnings"]:
        warn(w)
    for n in result["notes"]:
        info(f"note: {n}")
    write_json(result, output)


# --------------------------------------------------------------------------- dataset mode
def find_cases(folder) -> list[dict]:
    """Cases of a VerSe-layout (rawdata/derivatives) or flat folder, by their vertebra masks."""
    from pathlib import Path

    folder = Path(folder)
    masks = sorted(folder.rglob("*_seg-vert_msk.nii.gz")) + sorted(folder.rglob("*_seg-vert_msk.nii"))
    cts: dict[str, Path] = {}
    for p in sorted(folder.rglob("*_ct.nii*")):
        sub = p.name.split("_ct.nii")[0]
        cts.setdefault(sub, p)
    cases = []
    for m in masks:
        sub = m.name.split("_seg-vert_msk")[0]
        ctd = next((c for c in (m.parent / f"{sub}_seg-subreg_ctd.json", m.parent / f"{sub}_seg-vb_ctd.json")
                    if c.exists()), None)
        cases.append({"subject": sub, "ct": cts.get(sub), "mask": m, "ctd": ctd})
    return cases


def rate_dataset(folder, stump_mm: float = STUMP_MM, out_dir=None) -> list[dict]:
    """Rate every case of a folder; a case that fails is reported and skipped."""
    from pathlib import Path

    from .core.errors import VerseError
    from .core.io import write_json
    from .core.progress import track, warn

    cases = find_cases(folder)
    if not cases:
        raise DataError("no *_seg-vert_msk.nii.gz found", folder)
    results = []
    for case in track(cases, "rating variants"):
        try:
            res = rate_files(case["ct"], case["mask"], case["ctd"], stump_mm=stump_mm)
        except VerseError as exc:
            warn(f"{case['subject']}: skipped ({exc})")
            continue
        res["subject"] = case["subject"]
        results.append(res)
        if out_dir is not None:
            write_json(res, Path(out_dir) / f"{case['subject']}_variants.json")
    return results


def summary_rows(results: list[dict]) -> list[dict]:
    """Counts per variant laid out like Table 2 of the paper (n of the scans where determinable)."""
    rows: list[dict] = []

    def add(section, variant, n, of):
        pct = round(100.0 * n / of, 1) if of else None
        rows.append({"section": section, "variant": variant, "n": n, "of": of, "percent": pct})

    cerv = [r["cervical_ribs"] for r in results if r["cervical_ribs"].get("count") is not None]
    add("Cervical ribs", "Image series with cervical ribs", sum(c["count"] > 0 for c in cerv), len(cerv))
    add("Cervical ribs", "1 cervical rib", sum(c["count"] == 1 for c in cerv), len(cerv))
    add("Cervical ribs", "2 cervical ribs", sum(c["count"] == 2 for c in cerv), len(cerv))
    tho = [r["enumeration"]["thoracic"] for r in results if r["enumeration"]["thoracic"] is not None]
    for k in (12, 11, 13):
        add("Thoracolumbar variants", f"{k} thoracic vertebrae", tho.count(k), len(tho))
    lum = [r["enumeration"]["lumbar"] for r in results if r["enumeration"]["lumbar"] is not None]
    for k in (5, 4, 6):
        add("Lumbosacral variants", f"{k} lumbar vertebrae", lum.count(k), len(lum))
    with_ribs = [r for r in results if any(v.get("left_status") != "undeterminable" for v in r["ribs"].values())]
    add("Stump ribs", "Image series with stump rib", sum(bool(r["stump_ribs"]) for r in with_ribs), len(with_ribs))
    for level in ("T12", "T13", "L1"):
        n = sum(any(s["vertebra"] == level for s in r["stump_ribs"]) for r in with_ribs)
        add("Stump ribs", f"stump rib {level}", n, len(with_ribs))
    cast = [r["castellvi"]["grade"] for r in results if (r.get("castellvi") or {}).get("grade")]
    for g in ("0/1", "2a", "2b", "3a", "3b", "4"):
        add("Grading of the lumbosacral region", f"Castellvi {g}", cast.count(g), len(cast))
    return rows


def write_summary_csv(rows: list[dict], path) -> None:
    import csv
    import io as _io

    from .core.io import is_stdio, write_text_atomic

    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["section", "variant", "n", "of", "percent"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if is_stdio(path):
        import sys

        sys.stdout.write(buf.getvalue())
    else:
        write_text_atomic(path, buf.getvalue())


def print_summary(rows: list[dict], n_cases: int, to_stdout: bool) -> None:
    """The summary as a rich table (stdout when the CSV went to a file, else stderr)."""
    from rich.console import Console
    from rich.table import Table

    from .core.progress import verbosity

    if verbosity() == 0:
        return
    table = Table(title=f"Anatomical variants ({n_cases} image series)")
    for col, justify in (("variant", "left"), ("n", "right"), ("of", "right"), ("%", "right")):
        table.add_column(col, justify=justify)
    section = None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            table.add_row(f"[bold]{section}[/bold]", "", "", "")
        pct = "" if row["percent"] is None else f"{row['percent']:.1f}"
        table.add_row(f"   {row['variant']}", str(row["n"]), str(row["of"]), pct)
    Console(stderr=not to_stdout, highlight=False).print(table)
