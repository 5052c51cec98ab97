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
   the longest geodesic path from the skeleton node nearest the vertebra is the
   centreline. Its length, plus the gap from that node to the vertebra surface and
   the local radius at the tip (a skeleton stops one radius short of the end of a
   tube), is the rib length from the joint to the osseous tip.
5. A rib with a voxel on the border of the image is *cut*: its length is only a
   lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: label used for bone of the spine that carries no vertebra label
UNLABELLED = 255

SIDES = ("left", "right")


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
    tip_radius_mm: float
    joint_mm: list[float] = field(default_factory=list)
    tip_mm: list[float] = field(default_factory=list)
    other_components: int = 0

    def evidence(self) -> dict:
        return {
            "length_mm": round(self.length_mm, 1),
            "voxels": int(self.voxels),
            "cut_by_field_of_view": bool(self.cut),
            "centreline_mm": round(self.centreline_mm, 1),
            "joint_gap_mm": round(self.joint_gap_mm, 1),
            "tip_radius_mm": round(self.tip_radius_mm, 1),
            "joint_ras_mm": [round(v, 1) for v in self.joint_mm],
            "tip_ras_mm": [round(v, 1) for v in self.tip_mm],
            "other_components": int(self.other_components),
        }


# --------------------------------------------------------------------------- threshold
def bone_threshold(ct: np.ndarray, mask: np.ndarray, lo: float = 120.0, hi: float = 300.0) -> float:
    """HU threshold between soft tissue and bone, adapted to the scan.

    The midpoint between the median HU of soft tissue (CT values -200..150, where
    muscle and organs sit) and the 75th percentile inside the vertebra masks (the
    cortical and dense cancellous bone), clipped to ``[lo, hi]``: enough for noisy
    or osteoporotic scans, never so low that contrast-filled vessels join the ribs.
    """
    sample = ct[::2, ::2, ::2]
    soft = sample[(sample > -200) & (sample < 150)]
    soft_level = float(np.median(soft)) if soft.size else 40.0
    inside = ct[mask > 0]
    bone_level = float(np.percentile(inside, 75)) if inside.size else 400.0
    return float(np.clip(0.5 * (soft_level + bone_level), lo, hi))


# --------------------------------------------------------------------------- segmentation
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
) -> tuple[dict[tuple[int, str], list[np.ndarray]], dict, "callable"]:
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
    present = labels > 0
    idx = np.argwhere(present)
    pad = np.ceil((gap_mm + contact_mm + 2.0) / sp).astype(int)
    box = _box(idx, labels.shape, pad)
    lab_box = labels[box]
    # distance to (and label of) the nearest labelled voxel, only around the spine
    dist, nearest = ndimage.distance_transform_edt(lab_box == 0, sampling=sp, return_indices=True)
    near_label = lab_box[tuple(nearest)]
    del nearest
    box_lo = np.array([s.start for s in box])
    box_hi = np.array([s.stop for s in box])

    def joint_distance(pts: np.ndarray) -> np.ndarray:
        pts = np.atleast_2d(pts)
        inside = np.all((pts >= box_lo) & (pts < box_hi), axis=1)
        out = np.full(len(pts), np.inf)
        out[inside] = dist[tuple((pts[inside] - box_lo).T)]
        return out

    removed = np.zeros(labels.shape, dtype=bool)
    removed[box] = dist <= gap_mm
    candidate = bone & ~removed & ~present
    comps, n = ndimage.label(candidate, structure=np.ones((3, 3, 3), dtype=bool))
    info = {"components": int(n), "gap_mm": gap_mm, "contact_mm": contact_mm}
    if n == 0:
        return {}, info, joint_distance

    shell = (dist > gap_mm) & (dist <= gap_mm + contact_mm)
    comp_box = comps[box]
    in_shell = shell & (comp_box > 0)
    shell_idx = np.argwhere(in_shell)
    shell_comp = comp_box[in_shell]
    shell_lab = near_label[in_shell]
    offset = np.array([s.start for s in box])
    shell_mm = (shell_idx + offset) * sp
    # keep contacts that sit where costal joints are: lateral of the vertebra's
    # mid-sagittal plane and not in front of its body
    side_code = np.zeros(len(shell_comp), dtype=np.int8)  # 0 none, 1 left, 2 right
    wanted_set = set(int(w) for w in wanted)
    for lab in np.unique(shell_lab):
        lab = int(lab)
        sel = shell_lab == lab
        if lab not in frames or lab not in wanted_set:
            continue
        fr = frames[lab]
        rel = shell_mm[sel] - fr.centre
        lateral = rel @ fr.right
        ant = (shell_mm[sel] - fr.body) @ fr.anterior
        ok = (np.abs(lateral) >= 8.0) & (ant <= 5.0)
        side_code[np.flatnonzero(sel)[ok]] = np.where(lateral[ok] > 0, 2, 1)
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
    bounds = np.flatnonzero(np.diff(comp_sorted)) + 1
    starts = np.r_[0, bounds]
    ends = np.r_[bounds, len(comp_sorted)]
    n_split = 0
    for a, b in zip(starts, ends):
        if b <= a:
            continue
        comp_id = int(comp_sorted[a])
        ks, counts = np.unique(key_sorted[a:b], return_counts=True)
        # a rib head also touches the vertebra above: only contacts comparable
        # to the largest one mean a component made of several ribs
        big = ks[(counts >= 3) & (counts >= 0.25 * counts.max())]
        if len(big) == 0:
            big = ks[[int(np.argmax(counts))]]
        sl = comp_slices[comp_id - 1]
        local = comps[sl] == comp_id
        base = np.array([s.start for s in sl])
        if len(big) == 1:
            parts = {int(big[0]): local}
        else:
            n_split += 1
            parts = _split_geodesic(local, base, box, in_shell, comp_box, comp_id, near_label, side_code,
                                    shell_lab, shell_idx, shell_comp, big)
        for key, part in parts.items():
            lab, code = divmod(int(key), 4)
            if lab == UNLABELLED or code not in (1, 2) or part.sum() < min_voxels:
                continue
            flat = np.ravel_multi_index(tuple((np.argwhere(part) + base).T), labels.shape)
            ribs.setdefault((lab, SIDES[code - 1]), []).append(flat)
    for key in ribs:
        ribs[key].sort(key=len, reverse=True)
    info["split_components"] = n_split
    return ribs, info, joint_distance


def _split_geodesic(local, base, box, in_shell, comp_box, comp_id, near_label, side_code,
                    shell_lab, shell_idx, shell_comp, keys) -> dict[int, np.ndarray]:
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


def _path(pred: np.ndarray, start: int, end: int) -> np.ndarray:
    out = [end]
    while out[-1] != start and pred[out[-1]] >= 0:
        out.append(int(pred[out[-1]]))
    return np.array(out[::-1])


def polyline_length(points_mm: np.ndarray, sigma_mm: float = 2.0) -> float:
    """Length of a voxel path after smoothing away its lattice zig-zag.

    A 26-connected path over-estimates an oblique line by up to ~8 %; a Gaussian
    along the path (ends held fixed) recovers the smooth centreline.
    """
    if len(points_mm) < 2:
        return 0.0
    steps = np.linalg.norm(np.diff(points_mm, axis=0), axis=1)
    arc = np.r_[0.0, np.cumsum(steps)]
    if arc[-1] <= 0:
        return 0.0
    n = max(int(np.ceil(arc[-1] / 0.5)), 2)
    even = np.linspace(0.0, arc[-1], n + 1)
    resampled = np.stack([np.interp(even, arc, points_mm[:, i]) for i in range(3)], axis=1)
    sigma = sigma_mm / (arc[-1] / n)
    smooth = ndimage.gaussian_filter1d(resampled, sigma, axis=0, mode="nearest")
    smooth[0], smooth[-1] = resampled[0], resampled[-1]
    return float(np.linalg.norm(np.diff(smooth, axis=0), axis=1).sum())


def measure_rib(flat: np.ndarray, shape, sp: np.ndarray, joint_distance, frame: Frame,
                others: int = 0, side: str = "left") -> Rib:
    """Length of one rib component from its joint to its osseous tip.

    ``joint_distance(points_idx) -> mm`` gives the distance of voxels to the
    vertebra's surface; the skeleton node with the smallest distance is the joint end.
    """
    from scipy.sparse.csgraph import dijkstra
    from skimage.morphology import skeletonize

    pts = np.array(np.unravel_index(flat, shape)).T
    cut = bool(np.any(pts == 0) or np.any(pts == np.asarray(shape) - 1))
    box = _box(pts, shape, np.ones(3, dtype=int))
    base = np.array([s.start for s in box])
    local = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    local[tuple((pts - base).T)] = True
    local = ndimage.binary_fill_holes(local)
    skel = skeletonize(local)
    if not skel.any():
        skel = local.copy()
    nodes, graph = skeleton_graph(skel, sp)
    gaps = joint_distance(nodes + base)
    start = int(np.argmin(gaps))
    dist, pred = dijkstra(graph, indices=start, directed=False, return_predecessors=True)
    dist[~np.isfinite(dist)] = -1
    tip = int(np.argmax(dist))
    path = _path(pred, start, tip)
    centreline = polyline_length(nodes[path] * sp)
    radius = ndimage.distance_transform_edt(np.pad(local, 1), sampling=sp)[tuple((nodes[tip] + 1).T)]
    # the skeleton starts inside the component, ``gaps`` from the vertebra's voxel
    # centres; the joint surface lies half a voxel outside those centres
    joint_gap = max(float(gaps[start]) - 0.5 * float(sp.min()), 0.0)
    tip_radius = float(radius) if not cut else 0.0
    length = centreline + joint_gap + tip_radius
    return Rib(frame.label, side, length, len(flat), cut, centreline, joint_gap, tip_radius,
               ((nodes[start] + base) * sp).tolist(), ((nodes[tip] + base) * sp).tolist(), others)
