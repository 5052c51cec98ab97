"""Rib segmentation from a CT and rib length along the centreline.

All arrays here are on one grid whose voxel axes point to R, A and S (the caller
reorients exactly with :func:`verse_cli.core.geometry.reorient`), so a voxel index
times the spacing is a physical position in mm along (R, A, S). Nothing assumes
isotropic voxels.

Method
------
1. Bone is the CT above a threshold adapted to the scan (:func:`bone_threshold`).
2. Bone within ``gap_mm`` of any vertebra label is removed, which cuts each rib off
   its costovertebral and costotransverse joints; bone of the spine that carries no
   label (vertebrae cut by the field of view, an unlabelled transitional vertebra)
   is passed in as an extra "unlabelled" label and removed the same way.
3. The remaining bone is split into connected components. A component is a rib
   of vertebra V, side S when its voxels in the *contact shell* (``gap_mm`` to
   ``gap_mm + contact_mm`` from the labels) have V as nearest label, lie lateral of
   V's mid-sagittal plane on side S and not anterior of V's body (the costal joints
   sit on the posterolateral body and the transverse process). A component that
   touches several (vertebra, side) pairs - ribs joined by a calcified cartilage or
   the sternum - is split geodesically from its contacts.
4. Length: the component is skeletonised (scikit-image), the skeleton becomes a
   graph with edges weighted by the physical distance between voxel centres, and
   the longest geodesic path from the skeleton node nearest the vertebra, moved onto
   the centres of the rib's cross-sections, is the centreline. Its length, plus the
   gap from its start to the vertebra surface (less the head radius) and the bone
   beyond its end up to the osseous tip (the edge against soft tissue or the costal
   cartilage), is the rib length from the joint to the osseous tip.
5. A rib with a voxel on the border of the image is *cut*: its length is only a
   lower bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .core import labels as L

#: label used for bone of the spine that carries no vertebra label
UNLABELLED = 255
#: contacts within this distance lateral of the vertebral body are rib heads (mm)
HEAD_REACH_MM = 12.0
#: Gaussian width (mm) that smooths a rib's skeleton path into the guide of its centreline
RIB_SMOOTH_MM = 4.0
#: Gaussian width (mm) that smooths the centres of a rib's cross-sections into its centreline
SECTION_SMOOTH_MM = 3.0
#: ... and in voxels (of the median axis), whichever is wider: on coarse grids the section
#: centres wander by a good part of a voxel, which lengthened a whole rib by 5-8 mm
SECTION_SMOOTH_VOXELS = 3.5
#: a skeleton end this close to a vertebra lies back at the spine (mm), and bone this far from
#: every vertebra lies clearly away from it: a rib's tip does
BACK_AT_SPINE_MM = 20.0
AWAY_FROM_SPINE_MM = 30.0
SUNK_TIP = 0.6  # a rib whose last 10 mm sit at less than this fraction of its own level over soft tissue ran past its tip
SHORT_RIB_MM = 40.0  # ... a rib whose centreline is shorter than this (a stump rib, with some margin)

SIDES = ("left", "right")
MIN_PIECE_MM3 = 60.0  # a rib piece smaller than this is a speck of noise, not a rib head


@dataclass
class Frame:
    """A vertebra's own axes (unit vectors in physical RAS mm) and reference points."""

    label: int
    centre: np.ndarray  # centre of mass, mm
    body: np.ndarray  # body centroid, mm
    right: np.ndarray
    anterior: np.ndarray
    superior: np.ndarray
    voxels: int
    half_width: float = 15.0  # the vertebral body's half width, mm


@dataclass
class Rib:
    """One measured rib: length and the evidence behind it."""

    vertebra: int
    side: str
    length_mm: float
    voxels: int
    cut: bool
    centreline_mm: float
    joint_gap_mm: float
    tip_extension_mm: float
    joint_mm: list[float] = field(default_factory=list)
    tip_mm: list[float] = field(default_factory=list)
    other_components: int = 0
    tip_gap_mm: float = float("inf")  # distance of the tip from the nearest vertebra label
    radius_mm: float = 0.0  # mean radius, from the volume over the centreline length
    bridges: int = 0  # hidden stretches (costotransverse region) bridged by a curve
    line: np.ndarray | None = field(default=None, repr=False)  # the centreline, mm (not in the evidence)
    beside_process_mm: float = 0.0  # a cervical rib's start hidden beside the labelled transverse process

    def evidence(self) -> dict:
        return {
            "length_mm": round(self.length_mm, 1),
            "voxels": int(self.voxels),
            "cut_by_field_of_view": bool(self.cut),
            "centreline_mm": round(self.centreline_mm, 1),
            "joint_gap_mm": round(self.joint_gap_mm, 1),
            "tip_extension_mm": round(self.tip_extension_mm, 1),
            "joint_ras_mm": [round(v, 1) for v in self.joint_mm],
            "tip_ras_mm": [round(v, 1) for v in self.tip_mm],
            "other_components": int(self.other_components),
            "tip_to_vertebra_mm": round(self.tip_gap_mm, 1) if np.isfinite(self.tip_gap_mm) else None,
            "radius_mm": round(self.radius_mm, 2),
            "bridges": int(self.bridges),
            "beside_process_mm": round(self.beside_process_mm, 1),
        }


# --------------------------------------------------------------------------- threshold
def tissue_levels(ct: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Median HU of soft tissue (CT values -200..150) and inside the vertebra masks."""
    step = tuple(max(1, n // 64) for n in ct.shape)
    sample = ct[tuple(slice(None, None, k) for k in step)]
    soft = sample[(sample > -200) & (sample < 150)]
    soft_level = float(np.median(soft)) if soft.size else 40.0
    inside = ct[mask > 0]
    bone_level = float(np.median(inside[:: max(1, inside.size // 200000)])) if inside.size else 400.0
    return soft_level, bone_level


def bone_threshold(ct: np.ndarray, mask: np.ndarray, lo: float = 175.0, hi: float = 260.0) -> float:
    """HU threshold between soft tissue and bone on the smoothed CT, adapted to the scan.

    The midpoint between the median HU of soft tissue (CT values -200..150) and the
    median inside the vertebra masks, clipped to ``[lo, hi]``. Applied to the CT
    smoothed over ~2 mm (:func:`smooth_ct`), where a rib's thin bright cortex and its
    darker marrow average to one solid tube; costal cartilage (80-160 HU, no cortex)
    stays below ``lo``.
    """
    soft_level, bone_level = tissue_levels(ct, mask)
    return float(np.clip(0.5 * (soft_level + bone_level), lo, hi))


def outside_scan(ct: np.ndarray, padding_hu: float = -1500.0) -> Callable:
    """``f(points_idx) -> bool``: points beyond the array or in the scanner's padding.

    Reconstructions fill the corners outside the scanned circle with a constant far
    below air (-2048, -3024); nothing in a body is below ``padding_hu``.
    """
    shape = np.asarray(ct.shape)

    def outside(points_idx: np.ndarray) -> np.ndarray:
        p = np.rint(np.atleast_2d(points_idx)).astype(int)
        beyond = np.any((p < 0) | (p >= shape), axis=1)
        q = np.clip(p, 0, shape - 1)
        return beyond | (ct[tuple(q.T)] <= padding_hu)

    return outside


def smooth_ct(ct: np.ndarray, sp: np.ndarray, width_mm: float = 2.0) -> np.ndarray:
    """A box average about ``width_mm`` wide along every axis (odd sizes, at least 1)."""
    size = [max(1, round(float(width_mm / s)) | 1) for s in sp]
    if max(size) == 1:
        return ct
    return ndimage.uniform_filter(ct, size=size, mode="nearest")


# --------------------------------------------------------------------------- segmentation
def _spine_box(present: np.ndarray, pad) -> tuple[slice, ...]:
    """Bounding box of the labelled voxels, padded by ``pad`` voxels per axis."""
    axes = []
    for ax in range(3):
        other = tuple(i for i in range(3) if i != ax)
        hit = np.flatnonzero(present.any(axis=other))
        lo = max(int(hit[0]) - int(pad[ax]), 0)
        hi = min(int(hit[-1]) + int(pad[ax]) + 1, present.shape[ax])
        axes.append(slice(lo, hi))
    return tuple(axes)


def _box(points_idx: np.ndarray, shape, pad_vox) -> tuple[slice, ...]:
    lo = np.maximum(points_idx.min(axis=0) - pad_vox, 0)
    hi = np.minimum(points_idx.max(axis=0) + pad_vox + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def segment_ribs(
    bone: np.ndarray,
    labels: np.ndarray,
    sp: np.ndarray,
    frames: dict[int, Frame],
    wanted: list[int],
    gap_mm: float = 2.0,
    contact_mm: float = 4.0,
    min_voxels: int = 8,
) -> tuple[dict[tuple[int, str], list[np.ndarray]], dict, Callable]:
    """Rib components per (vertebra, side).

    Parameters
    ----------
    bone : bool array, the thresholded CT.
    labels : int array, vertebra labels plus :data:`UNLABELLED` for unlabelled spine bone.
    sp : voxel spacing (mm) along R, A, S.
    frames : per-label :class:`Frame`.
    wanted : labels whose ribs are wanted (e.g. C7, T1-T13, L1, L2).

    Returns
    -------
    ribs : ``{(label, side): [flat voxel indices of each component, largest first]}``
    info : evidence (threshold region, component counts).
    joint_distance : ``f(points_idx) -> mm`` distance of voxels to the nearest label
        (infinite away from the spine).
    """
    from scipy.spatial import cKDTree

    present = labels > 0
    # the gap must cut at least every voxel that touches a label, whatever the spacing
    gap_mm = max(gap_mm, 1.8 * float(sp.max()))
    contact_mm = max(contact_mm, 2.0 * float(sp.max()))
    reach = gap_mm + contact_mm
    pad = np.ceil((reach + 2.0) / sp).astype(int)
    box = _spine_box(present, pad)
    offset = np.array([s.start for s in box])
    pres_box = present[box]
    lab_box = labels[box]
    # distances to the labels only matter within a few mm of them, so a KD-tree of
    # the labels' surface voxels, queried at the bone voxels around them, replaces a
    # distance transform of the whole spine's box
    surface = np.argwhere(pres_box & ~ndimage.binary_erosion(pres_box))
    surface_label = lab_box[tuple(surface.T)]
    tree = cKDTree(surface * sp)

    def joint_distance(pts: np.ndarray) -> np.ndarray:
        return tree.query((np.atleast_2d(pts) - offset) * sp, k=1)[0]

    near_idx = np.argwhere(bone[box] & ~pres_box)
    dist, nearest = tree.query(near_idx * sp, k=1, distance_upper_bound=reach + 1e-6, workers=-1)
    close = np.isfinite(dist)
    near_idx, dist, near_label = near_idx[close], dist[close], surface_label[nearest[close]]
    removed_idx = near_idx[dist <= gap_mm] + offset
    candidate = bone & ~present
    candidate[tuple(removed_idx.T)] = False
    # face connectivity: diagonal contacts between neighbouring ribs or between a rib
    # and other bone are too common on coarse grids
    comps, n = ndimage.label(candidate)
    info = {"components": int(n), "gap_mm": gap_mm, "contact_mm": contact_mm,
            "removed": np.ravel_multi_index(tuple(removed_idx.T), bone.shape)}
    if n == 0:
        return {}, info, joint_distance

    in_shell = dist > gap_mm
    shell_idx = near_idx[in_shell]
    shell_lab = near_label[in_shell]
    shell_comp = comps[tuple((shell_idx + offset).T)]
    keep = shell_comp > 0
    shell_idx, shell_lab, shell_comp = shell_idx[keep], shell_lab[keep], shell_comp[keep]
    offset = np.array([s.start for s in box])
    shell_mm = (shell_idx + offset) * sp
    # keep contacts that sit where costal joints are: lateral of the vertebra's
    # mid-sagittal plane and not in front of its body
    side_code = np.zeros(len(shell_comp), dtype=np.int8)  # 0 none, 1 left, 2 right
    at_body = np.zeros(len(shell_comp), dtype=bool)  # contact at the body: a rib head
    wanted_set = {int(w) for w in wanted}
    for lab in np.unique(shell_lab):
        lab = int(lab)
        sel = shell_lab == lab
        if lab not in frames or lab not in wanted_set:
            continue
        fr = frames[lab]
        rel = shell_mm[sel] - fr.centre
        lateral = rel @ fr.right
        ant = (shell_mm[sel] - fr.body) @ fr.anterior
        # a cervical rib leaves C7 at the anterior tubercle of its transverse process,
        # in front of the body's centre; thoracic rib heads sit on the posterolateral body
        # (bone touching a thoracic body further forward is vessel calcium or contrast)
        ok = (np.abs(lateral) >= 8.0) & (ant <= (15.0 if L.region(lab) == "C" else 5.0))
        side_code[np.flatnonzero(sel)[ok]] = np.where(lateral[ok] > 0, 2, 1)
        at_body[np.flatnonzero(sel)] = np.abs(lateral) <= fr.half_width + HEAD_REACH_MM
    # unlabelled spine bone competes for contacts, so that the ribs of a vertebra
    # cut by the field of view are not given to its labelled neighbour
    side_code[shell_lab == UNLABELLED] = 3
    keys = shell_lab.astype(np.int64) * 4 + side_code
    valid = side_code > 0
    ribs: dict[tuple[int, str], list[np.ndarray]] = {}
    comp_slices = ndimage.find_objects(comps)
    order = np.argsort(shell_comp[valid], kind="stable")
    comp_sorted = shell_comp[valid][order]
    key_sorted = keys[valid][order]
    body_sorted = at_body[valid][order]
    mm_sorted = shell_mm[valid][order]
    bounds = np.flatnonzero(np.diff(comp_sorted)) + 1
    starts = np.r_[0, bounds]
    ends = np.r_[bounds, len(comp_sorted)]
    n_split = 0
    first_trimmed: dict[str, list[np.ndarray]] = {}
    for a, b in zip(starts, ends):
        if b <= a:
            continue
        comp_id = int(comp_sorted[a])
        big = _owners(key_sorted[a:b], body_sorted[a:b], mm_sorted[a:b])
        sl = comp_slices[comp_id - 1]
        local = comps[sl] == comp_id
        base = np.array([s.start for s in sl])
        if len(big) == 1:
            parts = {int(big[0]): local}
        else:
            n_split += 1
            parts = _split_geodesic(local, base, box, comp_id, side_code, shell_lab, shell_idx, shell_comp, big)
        for key, part in parts.items():
            lab, code = divmod(int(key), 4)
            if lab == UNLABELLED or code not in (1, 2) or part.sum() < min_voxels:
                continue
            trimmed = part
            if L.region(lab) == "C" or lab == 8:
                # a cervical rib ends where it meets other bone (the first rib, to which a
                # complete one is joined, or the clavicle and scapula around it); so may
                # the first rib, under the clavicle and the scapula (see below)
                trimmed = _trim_at_widening(part, _contacts_in(part, base, box, comp_id, shell_lab, shell_idx,
                                                               shell_comp, side_code, int(key)), sp)
                if L.region(lab) == "C":
                    part = trimmed
            flat = np.ravel_multi_index(tuple((np.argwhere(part) + base).T), labels.shape)
            ribs.setdefault((lab, SIDES[code - 1]), []).append(flat)
            if lab == 8:
                short = flat if trimmed is part else np.ravel_multi_index(tuple((np.argwhere(trimmed) + base).T),
                                                                          labels.shape)
                first_trimmed.setdefault(SIDES[code - 1], []).append(short)
    for pieces in [*ribs.values(), *first_trimmed.values()]:
        pieces.sort(key=len, reverse=True)
    # the first rib ended where it meets other bone: a second reading, used only where
    # the whole bone is no rib (a cervical rib joining the first rib also widens it, and
    # the first rib itself would be cut there)
    info["first_rib_trimmed"] = {side: pieces for side, pieces in first_trimmed.items()
                                 if sum(map(len, pieces)) < sum(map(len, ribs[(8, side)]))}
    info["split_components"] = n_split
    return ribs, info, joint_distance


def _one_head(keys: np.ndarray, head: np.ndarray, points_mm: np.ndarray | None, ks: np.ndarray,
              same_head_mm: float = 6.0) -> np.ndarray:
    """Merge head owners of adjacent vertebrae whose contacts form one rib head.

    The heads of ribs 2-9 articulate with their own vertebra and the one above (the
    demifacets at the disc); a rib belongs to the lower one. Two keys of adjacent
    vertebrae on one side whose head contacts lie within ``same_head_mm`` of each other
    are one head: the upper key is dropped.
    """
    if points_mm is None or len(ks) < 2:
        return ks
    from scipy.spatial import cKDTree

    keep = {int(k) for k in ks}
    for k1 in ks:
        for k2 in ks:
            l1, c1 = divmod(int(k1), 4)
            l2, c2 = divmod(int(k2), 4)
            if c1 != c2 or int(k1) not in keep or int(k2) not in keep or not 1 <= L.rank(l2) - L.rank(l1) <= 2:
                continue
            p1 = points_mm[head & (keys == k1)]
            p2 = points_mm[head & (keys == k2)]
            if len(p1) and len(p2) and float(cKDTree(p1).query(p2, k=1)[0].min()) <= same_head_mm:
                keep.discard(int(k1))  # k1 is the upper vertebra
    return np.array(sorted(keep))


def _owners(keys: np.ndarray, at_body: np.ndarray, points_mm: np.ndarray | None = None) -> np.ndarray:
    """The (vertebra, side) keys that own one component, from its contacts.

    A rib touches its own vertebra at the body (the head) and at the transverse
    process (the tubercle); a lower rib descending past the next vertebra touches only
    that vertebra's process. So contacts at a body decide; without any, the highest
    vertebra on each side wins. Only contacts comparable to the largest one (a quarter
    of it) mean a component made of several ribs (joined by cartilage or sternum).
    Unlabelled spine bone (a vertebra cut by the field of view) owns a component only
    when it has most of the contacts.
    """
    unlabelled = keys // 4 == UNLABELLED
    n_unl = int(unlabelled.sum())
    head = at_body & ~unlabelled
    if head.sum() >= 3:
        if n_unl > 3 * int(head.sum()):
            return np.array([UNLABELLED * 4 + 3])
        ks, counts = np.unique(keys[head], return_counts=True)
        return _one_head(keys, head, points_mm, ks[(counts >= 3) & (counts >= 0.25 * counts.max())])
    labelled = keys[~unlabelled]
    if len(labelled) == 0 or n_unl > 3 * len(labelled):
        return np.array([UNLABELLED * 4 + 3])
    ks, counts = np.unique(labelled, return_counts=True)
    big = ks[(counts >= 3) & (counts >= 0.25 * counts.max())]
    if len(big) == 0:
        big = ks[[int(np.argmax(counts))]]
    best: dict[int, int] = {}
    for key in big:
        lab, code = divmod(int(key), 4)
        other = best.get(code)
        if other is None or L.rank(lab) < L.rank(other // 4):
            best[code] = int(key)
    return np.array(sorted(best.values()))


def _contacts_in(part, base, box, comp_id, shell_lab, shell_idx, shell_comp, side_code, key) -> np.ndarray:
    """Voxel indices (local to ``part``) of one (vertebra, side) key's contacts in a component."""
    box_off = np.array([s.start for s in box])
    sel = (shell_comp == comp_id) & (shell_lab.astype(np.int64) * 4 + side_code == key)
    pts = shell_idx[sel] + box_off - base
    inside = np.all((pts >= 0) & (pts < np.asarray(part.shape)), axis=1)
    pts = pts[inside]
    return pts[part[tuple(pts.T)]] if len(pts) else pts


def _trim_at_widening(part: np.ndarray, seeds: np.ndarray, sp: np.ndarray, bin_mm: float = 2.0,
                      start_mm: float = 15.0, factor: float = 2.5, rise: float = 1.5) -> np.ndarray:
    """Cut a rib where the bone, followed from its joint, suddenly widens into another bone.

    A rib is a tube of nearly constant section. The bone reached at geodesic distance
    d (mm, through bone) from the costovertebral contacts ``seeds`` has, along a rib,
    the rib's cross-section: the voxel count of each ``bin_mm`` shell of d. Where the
    rib meets a plate or another bone (scapula, clavicle, the first rib) the front
    spreads into it and the shell grows. The bone beyond the first of two consecutive
    shells wider than ``factor`` times the median shell near the joint (d of about
    4-24 mm), from ``start_mm`` on, is cut off, from where the growth began (the last
    shell within ``rise`` times that median). Used for cervical ribs, which end where
    they meet other bone; a long rib may only touch another bone along its course and
    go on beyond it.
    """
    from skimage.graph import MCP_Geometric

    if len(seeds) == 0 or part.sum() < 50:
        return part
    cost = np.where(part, 1.0, np.inf)
    dist, _ = MCP_Geometric(cost, sampling=tuple(float(v) for v in sp)).find_costs([tuple(p) for p in seeds])
    d = dist[part]
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return part
    nb = int(np.ceil(d.max() / bin_mm)) + 1
    area = np.bincount((d // bin_mm).astype(int), minlength=nb).astype(float)
    first = int(start_mm // bin_mm)
    if nb <= first + 2:
        return part
    base = float(np.median(area[first // 3:first + 5]))
    wide = area > factor * max(base, 1.0)
    wide[:first] = False
    hits = np.flatnonzero(wide[:-1] & wide[1:])
    if len(hits) == 0:
        return part
    # the front enters the other bone where its growth starts, a shell or two before it
    # is that wide: back up to the last shell still near the rib's own section
    narrow = np.flatnonzero(area[:hits[0]] <= rise * base)
    cut = int(narrow[-1]) + 1 if len(narrow) else hits[0]
    return part & (dist < cut * bin_mm)


def _split_geodesic(local, base, box, comp_id, side_code, shell_lab, shell_idx, shell_comp, keys) -> dict[int, np.ndarray]:
    """Split one component among several contacts by geodesic flooding from each."""
    from skimage.segmentation import watershed

    markers = np.zeros(local.shape, dtype=np.int32)
    box_off = np.array([s.start for s in box])
    sel = shell_comp == comp_id
    pts = shell_idx[sel] + box_off - base
    codes = shell_lab[sel].astype(np.int64) * 4 + side_code[sel]
    for i, key in enumerate(keys, start=1):
        p = pts[codes == key]
        inside = np.all((p >= 0) & (p < np.asarray(local.shape)), axis=1)
        p = p[inside]
        markers[tuple(p.T)] = i
    flooded = watershed(np.zeros(local.shape, dtype=np.uint8), markers, mask=local)
    return {int(key): flooded == i for i, key in enumerate(keys, start=1)}


# --------------------------------------------------------------------------- length
_OFFSETS = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                     if (i, j, k) > (0, 0, 0)])


def skeleton_graph(skel: np.ndarray, sp: np.ndarray):
    """Sparse graph of a 3D skeleton: nodes are voxels, 26-neighbour edges weighted in mm."""
    from scipy.sparse import coo_matrix

    pts = np.argwhere(skel)
    n = len(pts)
    index = np.full(skel.shape, -1, dtype=np.int64)
    index[tuple(pts.T)] = np.arange(n)
    padded = np.pad(index, 1, constant_values=-1)
    rows, cols, weights = [], [], []
    for off in _OFFSETS:
        nb = padded[tuple((pts + 1 + off).T)]
        ok = nb >= 0
        rows.append(np.flatnonzero(ok))
        cols.append(nb[ok])
        weights.append(np.full(int(ok.sum()), float(np.sqrt(((off * sp) ** 2).sum()))))
    r = np.concatenate(rows) if rows else np.zeros(0, int)
    c = np.concatenate(cols) if cols else np.zeros(0, int)
    w = np.concatenate(weights) if weights else np.zeros(0)
    graph = coo_matrix((np.r_[w, w], (np.r_[r, c], np.r_[c, r])), shape=(n, n)).tocsr()
    return pts, graph


def _radius_at(local: np.ndarray, point: np.ndarray, sp: np.ndarray, reach_mm: float = 15.0) -> float:
    """Distance (mm) from ``point`` to the nearest voxel outside ``local``."""
    half = np.ceil(reach_mm / sp).astype(int)
    lo = np.maximum(point - half, 0)
    hi = np.minimum(point + half + 1, local.shape)
    crop = np.pad(local[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)
    return float(ndimage.distance_transform_edt(crop, sampling=sp)[tuple(point - lo + 1)])


def _path(pred: np.ndarray, start: int, end: int) -> np.ndarray:
    out = [end]
    while out[-1] != start and pred[out[-1]] >= 0:
        out.append(int(pred[out[-1]]))
    return np.array(out[::-1])


def smooth_path(points_mm: np.ndarray, sigma_mm: float = 2.0, step_mm: float = 0.5) -> np.ndarray:
    """A voxel path resampled every ``step_mm`` and smoothed along its length.

    A 26-connected path over-estimates an oblique line by up to ~8 %; a Gaussian of
    ``sigma_mm`` along the path recovers the smooth centreline. The path is extended
    by point reflection at both ends, which keeps its ends in place and straight
    stretches straight.
    """
    if len(points_mm) < 2:
        return np.asarray(points_mm, dtype=float)
    steps = np.linalg.norm(np.diff(points_mm, axis=0), axis=1)
    arc = np.r_[0.0, np.cumsum(steps)]
    if arc[-1] <= 0:
        return np.asarray(points_mm[:1], dtype=float)
    n = max(int(np.ceil(arc[-1] / step_mm)), 2)
    even = np.linspace(0.0, arc[-1], n + 1)
    res = np.stack([np.interp(even, arc, points_mm[:, i]) for i in range(3)], axis=1)
    sigma = sigma_mm / (arc[-1] / n)
    k = min(int(np.ceil(3 * sigma)), len(res) - 1)
    if k < 1:
        return res
    padded = np.vstack([2 * res[0] - res[k:0:-1], res, 2 * res[-1] - res[-2:-k - 2:-1]])
    out = ndimage.gaussian_filter1d(padded, sigma, axis=0, mode="nearest")[k:k + len(res)]
    out[0], out[-1] = res[0], res[-1]
    return out


def arc_length(line: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(line, axis=0), axis=1).sum()) if len(line) > 1 else 0.0


def polyline_length(points_mm: np.ndarray, sigma_mm: float = 2.0) -> float:
    """Length of a voxel path after smoothing away its lattice zig-zag (:func:`smooth_path`)."""
    return arc_length(smooth_path(np.asarray(points_mm, dtype=float), sigma_mm))


def measure_rib(pieces: list[np.ndarray], shape, sp: np.ndarray, joint_distance, frame: Frame,
                side: str = "left", bridge_mm: float = 25.0, min_piece_mm3: float = MIN_PIECE_MM3,
                ct: np.ndarray | None = None, thr: float = 175.0, smooth: np.ndarray | None = None,
                soft_hu: float = 40.0, outside: Callable | None = None, zone: np.ndarray | None = None,
                zone_reach_mm: float = 5.0, first_rib: bool = False) -> Rib:
    """Length of one rib from its costovertebral joint to its osseous tip.

    ``pieces`` are the flat voxel indices of the rib's components, largest first. The
    vertebra's transverse process often splits a rib into its head and neck (at the
    body) and its shaft (beyond the tubercle); pieces within ``bridge_mm`` of the
    shaft are joined to it by a straight edge through the process. The centreline
    is the longest geodesic path of the joined skeleton graph; its end nearer the
    vertebral body is the joint, the other the tip.

    The voxel path becomes the centreline through the centres of the rib's cross-sections
    (:func:`rib_centreline`: no lattice zig-zag, which lengthens a voxel path by up to
    ~8 %, and no bend cut short) before its length is taken. Its two ends are then placed
    with sub-voxel precision:

    * tip: the centreline is extended along its end direction until the smoothed CT
      falls half-way from the rib's own HU near the tip to what follows it, soft tissue
      or costal cartilage (the osseous end, wherever the skeleton stopped);
    * joint: the centre of the rib head, one head radius from the vertebra's surface.
      The bone next to the vertebra was cut off to separate the rib, so the distance
      from the centreline's inner end to the vertebra, less the head radius (1.25 times
      the rib's mean radius, from its volume over its length), is added.

    ``joint_distance(points_idx) -> mm`` gives the distance of voxels to the nearest
    vertebra label; ``outside(points_idx) -> bool`` whether points lie outside the
    scanned volume (beyond the array or in the scanner's padding), for FOV cuts.
    ``first_rib``: the piece is T1's, which a cervical rib may join end to end (see
    :func:`_tip_away_from_the_spine`).
    """
    from scipy.sparse.csgraph import dijkstra
    from scipy.spatial import cKDTree
    from skimage.morphology import skeletonize

    main = np.array(np.unravel_index(pieces[0], shape)).T
    tree = cKDTree(main * sp)
    used = [main]
    main_to_body = float(np.min(np.linalg.norm(main * sp - frame.body, axis=1)))
    vox_mm3 = float(np.prod(sp))
    for flat in pieces[1:]:
        if len(flat) * vox_mm3 < min_piece_mm3:  # specks of noise, not a rib head
            continue
        pts = np.array(np.unravel_index(flat, shape)).T
        d, _ = tree.query(pts * sp, k=1, distance_upper_bound=bridge_mm)
        # the head and neck lie between the shaft and the vertebral body
        nearer_body = float(np.min(np.linalg.norm(pts * sp - frame.body, axis=1))) < main_to_body
        if np.isfinite(d).any() and nearer_body:
            used.append(pts)
    pts = np.vstack(used)
    cut = bool(np.any(main == 0) or np.any(main == np.asarray(shape) - 1))
    pad = np.ceil(zone_reach_mm / sp).astype(int) + 1 if zone is not None else np.ones(3, dtype=int)
    box = _box(pts, shape, pad)
    base = np.array([s.start for s in box])
    local = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    local[tuple((pts - base).T)] = True
    if zone is not None and len(used) > 1:
        # a rib in several pieces: give back the bone that was cut off next to the
        # vertebra to separate the ribs, where it lies within ``zone_reach_mm`` of this
        # rib; it joins the head and neck to the shaft around the transverse process
        # along the bone, not by a chord
        near = ndimage.distance_transform_edt(~local, sampling=sp) <= zone_reach_mm
        extra = near & zone[box] & ~local
        if extra.any():
            grown = local | extra
            lab_g, _ = ndimage.label(grown, structure=np.ones((3, 3, 3), bool))
            keep = np.unique(lab_g[local])
            extra &= np.isin(lab_g, keep[keep > 0])
            local |= extra
    skel = skeletonize(local)
    if not skel.any():
        skel = local.copy()
    nodes, graph = skeleton_graph(skel, sp)
    graph = _bridge_pieces(nodes, graph, sp, main - base, bridge_mm)
    # the centreline: the skeleton's diameter, by a double sweep from the shaft
    main_node = int(cKDTree(nodes).query(main[0] - base)[1])
    first = dijkstra(graph, indices=main_node, directed=False)
    first[~np.isfinite(first)] = -1
    a = int(np.argmax(first))
    dist, pred = dijkstra(graph, indices=a, directed=False, return_predecessors=True)
    dist[~np.isfinite(dist)] = -1
    b = int(np.argmax(dist))
    ends_mm = (nodes[[a, b]] + base) * sp
    to_body = np.linalg.norm(ends_mm - frame.body, axis=1)
    joint = a if to_body[0] <= to_body[1] else b
    path = _path(pred, a, b)
    if path[0] != joint:
        path = path[::-1]
    if first_rib:
        path = _tip_away_from_the_spine(path, graph, nodes, base, joint_distance)
    path = _trim_head_spur(path, nodes, base, sp, frame.body)
    trimmed = False
    if ct is not None:
        # on the smoothed CT: a thin, dark rib's own noise and partial volume on thick
        # slices dip the raw HU below the floor for a few millimetres along the bone
        path, trimmed = _trim_at_osseous_tip(path, nodes, base, sp, smooth if smooth is not None else ct, thr,
                                             run_mm=max(4.0, 2.0 * float(sp.max())))
    raw, n_bridges = bridge_curves((nodes[path] + base) * sp, nodes[path], sp)
    stub = _stub_axis(pts * sp, frame.body, arc_length(raw))
    if stub is None:
        line = rib_centreline(raw, (np.argwhere(local) + base) * sp, sp)
        joint_idx = nodes[[joint]] + base
        centreline = arc_length(line)
        # the rib's mean radius from its volume and length; the head is wider than the shaft
        radius = tube_radius(len(pts) * vox_mm3, centreline)
        head_radius = 1.25 * radius
    else:
        # a stub's axis starts at its inner face, not inside its head
        line, radius = stub
        n_bridges, joint_idx, centreline, head_radius = 0, line[:1] / sp, arc_length(line), 0.0
    # distance to the vertebra's surface: to the centres of its outer voxels, less half a voxel
    gap = float(joint_distance(joint_idx)[0]) - 0.5 * float(np.mean(sp))
    joint_gap = gap - head_radius if np.isfinite(gap) else 0.0
    joint_gap = float(np.clip(joint_gap, -head_radius, 25.0))
    tip_ext, tip_cut = 0.0, False
    field = smooth if smooth is not None else ct
    if field is not None:
        tip_ext, tip_cut = _tip_extension(line, field, sp, soft_hu, radius, outside, thr)
    cut = (cut and not trimmed) or tip_cut
    tip_point = line[-1] + _end_direction(line) * tip_ext
    tip_gap = float(joint_distance(np.atleast_2d(tip_point / sp))[0])
    length = centreline + joint_gap + tip_ext
    n_pts = sum(len(u) for u in used)
    return Rib(frame.label, side, length, n_pts, cut, centreline, joint_gap, tip_ext,
               line[0].tolist(), tip_point.tolist(), len(used) - 1, tip_gap, radius, n_bridges, line)


def _stub_axis(points_mm: np.ndarray, body: np.ndarray, skeleton_mm: float, step_mm: float = 0.5,
               longest_mm: float = 60.0) -> tuple[np.ndarray, float] | None:
    """The axis and cross-section radius of a short, thick piece whose skeleton is far
    shorter than the piece, or None.

    The skeleton of a stump rib about as thick as it is long, on coarse or anisotropic
    voxels, shrinks to a few voxels (synth 85036: 3.5 mm of skeleton in a stump of
    18 mm, 10 mm thick), and the stump was measured as a speck. Such a piece is straight
    over its short length: its centreline is its principal axis through its centroid,
    from its inner face (where it was parted from the vertebra) to one cross-section
    radius short of its outer end, where a skeleton would end and the tip is looked for.
    Pieces longer than ``longest_mm`` keep their skeleton.
    """
    if skeleton_mm >= 0.5 * longest_mm:  # no piece short enough to qualify has so long a skeleton
        return None
    centre = points_mm.mean(axis=0)
    rel = points_mm - centre
    values, vectors = np.linalg.eigh(rel.T @ rel)
    axis = vectors[:, -1]
    t = rel @ axis
    extent = float(t.max() - t.min())
    # a solid cylinder's radius is twice the spread of its points across its axis
    radius = 2.0 * float(np.sqrt(max(values[:2].mean(), 0.0) / len(points_mm)))
    usable = extent - 2.0 * radius
    if extent > longest_mm or usable <= 0 or skeleton_mm >= 0.5 * usable:
        return None
    if (body - centre) @ axis > 0:
        axis, t = -axis, -t
    ts = np.arange(t.min(), t.max() - radius + 1e-9, step_mm)
    return centre + np.outer(ts, axis), radius


def _tip_away_from_the_spine(path: np.ndarray, graph, nodes: np.ndarray, base: np.ndarray,
                             joint_distance) -> np.ndarray:
    """The path from the joint to the farthest bone away from the spine, where the skeleton's
    diameter ends back at the spine.

    A first rib joined at its front to a cervical rib that leaves C7 is one piece whose
    diameter runs from the first rib's head out along it and back along the cervical rib to
    C7; measured so, it ended on the spine and the first rib was not measured at all. A rib's
    osseous tip lies away from the spine, and where the piece turns back, the turn is the
    bone farthest from it: the tip becomes the node farthest from every vertebra, if that is
    ``AWAY_FROM_SPINE_MM`` or more. A piece with no such node (a stump, bone along the
    vertebrae) keeps its diameter. Only for the first rib: lower down, a piece that turns
    back to the spine holds two ribs joined in front, and measured to its farthest bone it
    was 25 mm short to 98 mm long (synth H: T6-T10), where it had been undeterminable.
    """
    from scipy.sparse.csgraph import dijkstra

    if float(joint_distance(nodes[[path[-1]]] + base)[0]) > BACK_AT_SPINE_MM:
        return path
    dist, pred = dijkstra(graph, indices=int(path[0]), directed=False, return_predecessors=True)
    from_spine = np.where(np.isfinite(dist), joint_distance(nodes + base), -1.0)
    tip = int(np.argmax(from_spine))
    if from_spine[tip] < AWAY_FROM_SPINE_MM:
        return path
    return _path(pred, int(path[0]), tip)


def tube_radius(volume_mm3: float, length_mm: float) -> float:
    """Mean radius (mm) of a tube of this volume and length (a length under 1 mm counts as 1)."""
    return float(np.sqrt(volume_mm3 / (np.pi * max(length_mm, 1.0))))


def rib_centreline(path_mm: np.ndarray, bone_mm: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """The centreline of a rib from its skeleton path (mm) and its bone voxels (mm).

    The skeleton of a noisy tube wanders across its section. A Gaussian about a rib's
    radius wide along the path removes that but also cuts the rib's bends (at the
    tubercle, where the neck turns into the shaft, by ~2 mm); that smooth path is only
    the guide along which the centres of the rib's cross-sections are taken
    (:func:`section_centres`), and those need a lighter smoothing.
    """
    radius = tube_radius(len(bone_mm) * float(np.prod(sp)), arc_length(path_mm))
    guide = smooth_path(path_mm, sigma_mm=max(RIB_SMOOTH_MM, 1.5 * float(sp.max())))
    centres = section_centres(guide, bone_mm, reach_mm=1.5 * radius + float(sp.max()), step_mm=float(sp.max()))
    sigma = max(SECTION_SMOOTH_MM, float(sp.max()), SECTION_SMOOTH_VOXELS * float(np.median(sp)))
    return smooth_path(centres, sigma_mm=sigma)


def section_centres(guide_mm: np.ndarray, bone_mm: np.ndarray, reach_mm: float, step_mm: float = 1.0,
                    min_voxels: int = 4) -> np.ndarray:
    """A smooth guide path, resampled every ``step_mm``, moved to the centres of the rib's sections.

    Every bone voxel within ``reach_mm`` of the guide goes to its nearest guide point,
    which cuts the rib into slices across it; each point moves, across the guide only,
    to the centroid of its slice (kept where the slice has under ``min_voxels``: a
    bridge over hidden bone). A guide smoothed widely enough to lose the skeleton's
    wander cuts the rib's bends (at the tubercle by ~2 mm); the slices bring it back
    onto the bone's own middle there.
    """
    from scipy.spatial import cKDTree

    even = smooth_path(np.asarray(guide_mm, dtype=float), sigma_mm=0.0, step_mm=step_mm)
    if len(even) < 3 or len(bone_mm) == 0:
        return even
    dist, near = cKDTree(even).query(bone_mm, k=1, distance_upper_bound=reach_mm)
    ok = np.isfinite(dist)
    near, pts = near[ok], bone_mm[ok]
    count = np.bincount(near, minlength=len(even))
    sums = np.stack([np.bincount(near, weights=pts[:, i], minlength=len(even)) for i in range(3)], axis=1)
    full = count >= min_voxels
    shift = np.zeros_like(even)
    shift[full] = sums[full] / count[full, None] - even[full]
    # only across the guide: along it a thin slice's centroid jumps with the voxel grid
    tangent = np.gradient(even, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    shift -= (shift * tangent).sum(axis=1, keepdims=True) * tangent
    return even + shift


def _trim_head_spur(path, nodes, base, sp, body, reach_mm: float = 40.0):
    """Start the centreline at the rib head: its point nearest the vertebral body.

    A rib runs away from its vertebra from the head on. The skeleton of the bone
    around the head (with the shell given back next to the vertebra) often has a
    spur along the vertebra's surface or the transverse process, and the longest
    path may begin at its end and hook back to the head, which adds its length
    twice. Within the first ``reach_mm`` (or half the path) the path is cut at the
    point nearest the body's centroid, where it turns there by more than 60 degrees
    (a hook; bone that runs on along the spine past that point is not one).
    """
    if len(path) < 3:
        return path
    pts = (nodes[path] + base) * sp
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
    head = np.flatnonzero(arc <= min(reach_mm, 0.5 * arc[-1]))
    k = int(head[np.argmin(np.linalg.norm(pts[head] - body, axis=1))])
    if k == 0:
        return path
    ahead = pts[min(int(np.searchsorted(arc, arc[k] + 10.0)), len(pts) - 1)] - pts[k]
    behind = pts[k] - pts[0]
    norms = float(np.linalg.norm(ahead) * np.linalg.norm(behind))
    if norms <= 0 or float(ahead @ behind) / norms >= 0.5:
        return path
    return path[k:]


def bridge_curves(points_mm: np.ndarray, idx: np.ndarray, sp: np.ndarray, span_mm: float = 6.0):
    """Replace each jump of a voxel path (a bridge between rib pieces) by a smooth curve.

    Where the rib is hidden (the costotransverse region, labelled as vertebra, or bone
    cut off next to it) its pieces are joined by a straight edge, which cuts the bend
    of the rib at the tubercle. A cubic Hermite curve leaving the first piece along
    its end direction and entering the next along its start direction (each over
    ``span_mm``) follows the bend instead. Returns the new points and the number of
    bridges.
    """
    jumps = np.flatnonzero(np.abs(np.diff(idx, axis=0)).max(axis=1) > 1)
    if len(jumps) == 0:
        return points_mm, 0
    steps = np.linalg.norm(np.diff(points_mm, axis=0), axis=1)
    arc = np.r_[0.0, np.cumsum(steps)]
    out, start = [], 0
    for j in jumps:
        p0, p1 = points_mm[j], points_mm[j + 1]
        chord = float(np.linalg.norm(p1 - p0))
        i0 = int(np.searchsorted(arc, arc[j] - span_mm))
        i1 = int(np.searchsorted(arc, arc[j + 1] + span_mm))
        i1 = min(i1, len(points_mm) - 1)
        d0 = p0 - points_mm[min(i0, j)]
        d1 = points_mm[max(i1, j + 1)] - p1
        d0 = d0 / np.linalg.norm(d0) if np.linalg.norm(d0) > 0.5 else (p1 - p0) / max(chord, 1e-6)
        d1 = d1 / np.linalg.norm(d1) if np.linalg.norm(d1) > 0.5 else (p1 - p0) / max(chord, 1e-6)
        t = np.linspace(0.0, 1.0, max(int(np.ceil(chord / 0.5)), 2) + 1)[1:-1, None]
        h00, h10 = 2 * t ** 3 - 3 * t ** 2 + 1, t ** 3 - 2 * t ** 2 + t
        h01, h11 = -2 * t ** 3 + 3 * t ** 2, t ** 3 - t ** 2
        curve = h00 * p0 + h10 * chord * d0 + h01 * p1 + h11 * chord * d1
        out += [points_mm[start:j + 1], curve]
        start = j + 1
    out.append(points_mm[start:])
    return np.vstack(out), len(jumps)


def _end_direction(line: np.ndarray, span_mm: float = 8.0) -> np.ndarray:
    """Unit direction in which the polyline ``line`` (mm) leaves its last point."""
    steps = np.linalg.norm(np.diff(line, axis=0), axis=1)
    back = np.cumsum(steps[::-1])
    k = int(np.searchsorted(back, min(span_mm, 0.5 * float(back[-1])))) if len(back) else 0
    d = line[-1] - line[max(len(line) - 2 - k, 0)]
    n = float(np.linalg.norm(d))
    return d / n if n > 0 else np.zeros(3)


def _tip_extension(line, field, sp, soft_hu, radius, outside, thr: float = np.inf, step_mm: float = 0.25):
    """How far (mm) the bone reaches beyond the centreline's end, and whether it is cut.

    Samples the smoothed CT along the end direction, from two voxels inside the
    centreline's end, and finds where it falls half-way from the rib's HU near its tip
    to what lies beyond the tip (:func:`_beyond_tip_level`). A rib whose bone still
    continues where the scanned volume ends (the array border or the scanner's
    padding) is cut.
    """
    d = _end_direction(line)
    if not d.any():
        return 0.0, False
    # the rib's own level: the centreline's last ~10 mm
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(line, axis=0), axis=1))]
    near_tip = line[arc >= arc[-1] - 10.0]
    own = float(np.median(ndimage.map_coordinates(field, (near_tip / sp).T, order=1, mode="nearest")))
    back = 2.0 * float(sp.max())
    body = line[arc < arc[-1] - 10.0]
    # only a short rib is as thick at its tip as at its head: a long rib's tip thins, and
    # partial volume dims its last 10 mm well below its body's level
    if len(body) and arc[-1] < SHORT_RIB_MM:
        own_body = float(np.median(ndimage.map_coordinates(field, (body / sp).T, order=1, mode="nearest")))
        if own - soft_hu < SUNK_TIP * (own_body - soft_hu):
            # the centreline ran on past the osseous tip into an enhancing organ that the
            # bone threshold joined to the rib (synth 82028: an L1 stump of 20 mm whose
            # last 10 mm of centreline lay in a kidney at 150-280 HU): the tip is the fall
            # from the bone's level, looked for back along the centreline's last 10 mm
            own, back = own_body, max(back, min(10.0, 0.5 * float(arc[-1])))
    reach = back + 2.0 * radius + 2.0 * float(sp.max())
    # sampled a little further than the tip is looked for, to see what lies beyond it
    beyond_mm = max(radius, 2.0 * float(sp.max())) + 8.0
    s = np.arange(0.0, reach + beyond_mm + step_mm, step_mm)
    pos = line[-1] + np.outer(s - back, d)
    vox = (pos / sp).T
    hu = ndimage.map_coordinates(field, vox, order=1, mode="nearest")
    end = _half_way_fall(hu, s, 0.5 * (own + soft_hu), reach, step_mm)
    after = _beyond_tip_level(hu, s, end, radius, sp)
    # only tissue below the bone threshold continues a rib (cartilage); bone beyond the
    # fall is another bone, and the rib's edge against it is not its osseous tip
    if soft_hu < after < min(own, thr):
        end = _half_way_fall(hu, s, 0.5 * (own + after), reach, step_mm)
    ext = end - back
    cut = False
    if outside is not None:
        probe = line[-1] + np.outer(np.arange(0.0, 2.0 * float(sp.max()) + step_mm, step_mm) + max(ext, 0.0), d)
        cut = bool(np.any(outside(probe / sp)))
    return float(max(ext, -back)), cut


def _half_way_fall(hu: np.ndarray, s: np.ndarray, level: float, reach: float, step_mm: float) -> float:
    """Distance along the samples where ``hu`` first falls below ``level`` (within ``reach``)."""
    below = np.flatnonzero((hu < level) & (s <= reach))
    if len(below) == 0:
        return reach
    i = int(below[0])
    if i == 0:
        return 0.0
    h0, h1 = float(hu[i - 1]), float(hu[i])  # linear interpolation between the samples
    return float(s[i - 1] + step_mm * (h0 - level) / max(h0 - h1, 1e-6))


def _beyond_tip_level(hu: np.ndarray, s: np.ndarray, end: float, radius: float, sp: np.ndarray,
                      span_mm: float = 3.0) -> float:
    """The HU of what continues the rib past its osseous tip.

    The osseous tip is the edge between bone and whatever follows it: soft tissue at a
    floating rib, but costal cartilage (80-200 HU) at ribs 1-10. The edge of a blurred
    image lies half-way between the two levels it separates, so against cartilage the
    half-way level to soft tissue lies inside the cartilage and the tip is placed
    millimetres too far. The level beyond is the median over ``span_mm`` starting half
    a rib radius (at least a voxel: past the blur of the edge) beyond the first fall;
    further out the cartilage, which curves with the chest wall, has left the straight
    line along which the profile is sampled.
    """
    start = end + 0.5 * max(radius, 2.0 * float(sp.max()))
    sel = (s >= start) & (s <= start + span_mm)
    return float(np.median(hu[sel])) if sel.any() else -np.inf


def _trim_at_osseous_tip(path, nodes, base, sp, ct, thr, run_mm: float = 4.0):
    """Cut the centreline where the bone ends: the first sustained fall in HU.

    Beyond a rib's osseous tip the skeleton may run on through costal cartilage
    (80-160 HU, partly above a noisy threshold) into the sternum and the next rib.
    The path is cut at the first stretch of ``run_mm`` whose HU stays below both the
    bone threshold and 60 % of the rib's own median HU (its first half).
    """
    pts = nodes[path] + base
    hu = ndimage.map_coordinates(ct, pts.T.astype(np.float64), order=1, mode="nearest")
    hu = ndimage.median_filter(hu, size=3, mode="nearest")
    steps = np.r_[0.0, np.linalg.norm(np.diff(pts * sp, axis=0), axis=1)]
    arc = np.cumsum(steps)
    first_half = hu[arc <= max(arc[-1] / 2, 10.0)]
    floor = min(thr, 0.6 * float(np.median(first_half)))
    low = hu < floor
    start = np.searchsorted(arc, 8.0)
    i = start
    while i < len(path):
        if low[i]:
            j = i
            while j < len(path) and low[j]:
                j += 1
            if arc[min(j, len(path) - 1)] - arc[i] >= run_mm or j == len(path):
                if i <= 1:
                    return path, False
                return path[:i], True
            i = j
        else:
            i += 1
    return path, False


def _bridge_pieces(nodes: np.ndarray, graph, sp: np.ndarray, main_idx: np.ndarray, bridge_mm: float):
    """Join skeleton pieces to the main one by their closest node pair (within ``bridge_mm``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n_comp, comp = connected_components(graph, directed=False)
    if n_comp == 1:
        return graph
    sizes = np.bincount(comp)
    order = np.argsort(-sizes)
    joined = [int(order[0])]
    rows, cols, w = [], [], []
    for c in order[1:]:
        inside = np.flatnonzero(np.isin(comp, joined))
        other = np.flatnonzero(comp == c)
        d, k = cKDTree(nodes[inside] * sp).query(nodes[other] * sp, k=1)
        j = int(np.argmin(d))
        if d[j] <= bridge_mm:
            rows.append(int(other[j]))
            cols.append(int(inside[k[j]]))
            w.append(float(d[j]))
            joined.append(int(c))
    if not rows:
        return graph
    n = graph.shape[0]
    extra = coo_matrix((np.r_[w, w], (np.r_[rows, cols], np.r_[cols, rows])), shape=(n, n))
    return (graph + extra).tocsr()
