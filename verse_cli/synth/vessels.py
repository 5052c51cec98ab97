"""Branching vessel trees inside organs (pulmonary vessels, hepatic and portal veins) and
the lung parenchyma, drawn into the rendered HU volume after painting.

A tree has thousands of segments: as paint shapes (one SDF each) they would cost far more
than the whole case. Instead each segment is rasterised only around its own voxels: its
centreline is sampled, every sample carries a small stencil of voxel offsets, and the
exact distance to the segment gives the partial-volume occupancy (the renderer's ramp).
Work scales with the vessel volume, not with the grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..core.geometry import unit

F32 = np.float32


@dataclass
class Tree:
    """Segments ``a`` -> ``b`` (world mm, ``(n, 3)``) with radii ``r`` (mm)."""

    a: np.ndarray
    b: np.ndarray
    r: np.ndarray


def _perpendicular(rng, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to each row of ``d``."""
    u = np.cross(d, rng.standard_normal(d.shape))
    return unit(u)


def grow_tree(rng: np.random.Generator, roots: np.ndarray, dirs: np.ndarray, radii: np.ndarray,
              inside: Callable[[np.ndarray], np.ndarray], hub: np.ndarray, min_r: float = 0.6,
              step_mm: tuple[float, float] = (5.0, 10.0), max_gen: int = 40) -> Tree:
    """Grow vessel trees from ``roots``, one generation of all tips at a time.

    Monopodial branching, as in the lung and liver: at every node (5-10 mm plus two radii
    apart) a trunk goes on, a little thinner (86-95 %) and bent 5-25 degrees, and gives off
    one side branch (45-75 % of its radius, at 35-70 degrees). Trunks reach the periphery
    while side branches fill the space between them, and calibres taper from the hub (the
    hilum) outward. Segments keep their radius plus 1 mm inside ``inside`` (an SDF): a tip
    with no room ahead makes no segment but still splits, and branches end below ``min_r``.
    """
    segs = []
    p = np.asarray(roots, float)
    d = unit(np.asarray(dirs, float))
    r = np.asarray(radii, float)
    for _ in range(max_gen):
        if len(p) == 0:
            break
        want = rng.uniform(*step_mm, len(r)) + 2.0 * r
        length = np.minimum(want, _free_length(inside, p, d, r + 1.0))
        length[length < np.maximum(r, 1.5)] = 0.0
        q = p + d * length[:, None]
        ok = length > 0
        segs.append((p[ok], q[ok], r[ok]))
        n = len(p)
        ratio = np.stack([rng.uniform(0.86, 0.95, n), rng.uniform(0.45, 0.75, n)])
        kids = _children(rng, inside, q, d, unit(q - hub), 10.0 + 2.0 * r)
        p = np.concatenate([q, q])
        d = np.concatenate(kids)
        r = np.concatenate([r * ratio[0], r * ratio[1]])
        keep = r >= min_r
        p, d, r = p[keep], d[keep], r[keep]
    if not segs:
        z = np.zeros((0, 3))
        return Tree(z, z, np.zeros(0))
    return Tree(*(np.concatenate([s[k] for s in segs]) for k in range(3)))


def _free_length(inside, p: np.ndarray, d: np.ndarray, margin: np.ndarray, steps: int = 5) -> np.ndarray:
    """How far each ray ``p + t d`` stays ``margin`` inside the organ (sphere tracing: the
    SDF's depth is a safe step)."""
    t = np.zeros(len(p))
    for _ in range(steps):
        depth = -inside((p + t[:, None] * d).astype(F32)) - margin
        t = t + np.maximum(depth, 0)
    return t


def _children(rng, inside, q: np.ndarray, d: np.ndarray, out_dir: np.ndarray, reach: np.ndarray,
              tries: int = 3) -> list[np.ndarray]:
    """Directions of the trunk (5-25 degrees off the parent) and of the side branch
    (35-70 degrees, the other side), both leaning a little away from the hub; of ``tries``
    such pairs the one whose ends lie deepest in the organ (up to 25 mm: deeper is not
    better), so that branches spread into free space instead of crowding the walls."""
    n = len(q)
    best = [np.zeros((n, 3)), np.zeros((n, 3))]
    score = np.full(n, -np.inf)
    for _ in range(tries):  # a few candidate pairs, each for all tips at once
        u = _perpendicular(rng, d)
        ang = np.radians(np.stack([rng.uniform(5, 25, n), rng.uniform(35, 70, n)]))
        pair = [unit(np.cos(ang[k])[:, None] * d + sgn * np.sin(ang[k])[:, None] * u + 0.15 * out_dir)
                for k, sgn in enumerate((1.0, -1.0))]
        depth = [np.minimum(-inside((q + c * reach[:, None]).astype(F32)), 25.0) for c in pair]
        sc = np.minimum(depth[0], depth[1]) + rng.uniform(0, 1, n)
        better = sc > score
        score = np.where(better, sc, score)
        for k in range(2):
            best[k][better] = pair[k][better]
    return best


def rasterise(tree: Tree, shape, affine: np.ndarray, ramp: float, chunk: int = 1 << 21):
    """Voxel indices (flat, may repeat) and partial-volume occupancies (0..1] of the tree's
    tubes in the grid ``shape`` / ``affine`` (voxel -> world), ramp as the renderer's."""
    if len(tree.r) == 0:
        return np.zeros(0, np.int64), np.zeros(0, F32)
    M = affine[:3, :3]
    t0 = affine[:3, 3]
    inv = np.linalg.inv(M)
    sp = np.sqrt((M ** 2).sum(0))
    a, b, r = tree.a, tree.b, tree.r
    # centreline samples a voxel or 0.7 radius apart (denser samples cost more stencil
    # overlap than the smaller stencils save)
    step = np.maximum(0.7 * r, sp.min())
    n = np.ceil(np.linalg.norm(b - a, axis=1) / step).astype(int) + 1
    seg = np.repeat(np.arange(len(r)), n)
    t = (np.arange(len(seg)) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(np.maximum(n - 1, 1), n)
    pts = a[seg] + t[:, None] * (b - a)[seg]
    centre = np.rint((pts - t0) @ inv.T).astype(np.int32)
    cw = (centre @ M.T + t0).astype(F32)  # the centre voxels in world mm
    # occupancy is zero beyond r + ramp / 2 of the axis; the centre voxel lies within half a
    # voxel diagonal of the sample, and samples are ``step`` apart
    reach = r[seg] + 0.5 * step[seg] + 0.5 * ramp + 0.5 * float(np.sqrt((sp ** 2).sum()))
    unit = 0.25 * float(sp.min())
    hw = np.ceil(reach / unit).astype(int)  # stencil radius in quarter voxels
    dims = np.array(shape, np.int32)
    af, bf, rf = a.astype(F32), b.astype(F32), r.astype(F32)
    idx_all, occ_all = [], []
    for h in np.unique(hw):  # a few stencil sizes, not voxels
        sel = np.flatnonzero(hw == h)
        ball = h * unit
        rng_h = [np.arange(-int(np.ceil(ball / s)), int(np.ceil(ball / s)) + 1) for s in sp]
        off = np.stack(np.meshgrid(*rng_h, indexing="ij"), -1).reshape(-1, 3).astype(np.int32)
        offw = (off @ M.T).astype(F32)
        keep = np.sqrt((offw ** 2).sum(1)) <= ball  # a ball, not a cube
        off, offw = off[keep], offw[keep]
        per = max(1, chunk // len(off))
        for i in range(0, len(sel), per):
            s = sel[i:i + per]
            sg = seg[s]
            x = cw[s, None, :] + offw[None]  # (P, K, 3)
            a_, ab = af[sg, None, :], (bf[sg] - af[sg])[:, None, :]
            tt = np.clip(((x - a_) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), F32(1e-9)), 0, 1)
            e = x - a_ - tt[..., None] * ab
            dist = np.sqrt((e * e).sum(-1)) - rf[sg, None]
            occ = np.clip(F32(0.5) - dist / F32(ramp), 0, 1)
            vox = centre[s, None, :] + off[None]
            ok = (occ > 0) & np.all((vox >= 0) & (vox < dims), axis=-1)
            v = vox[ok].astype(np.int64)
            idx_all.append((v[:, 0] * shape[1] + v[:, 1]) * shape[2] + v[:, 2])
            occ_all.append(occ[ok])
    return np.concatenate(idx_all), np.concatenate(occ_all).astype(F32)


def _organ_box(lab: np.ndarray, code: int):
    """Slices of the smallest box holding the organ ``code`` of the label map (None when absent)."""
    from scipy import ndimage

    boxes = ndimage.find_objects(lab, max_label=code)
    return boxes[code - 1] if len(boxes) >= code else None


def _noise(sr: np.random.Generator, shape, sp, lo_mm: float, hi_mm: float) -> np.ndarray:
    """Band-limited unit noise (``lo_mm``-``hi_mm`` blobs) over ``shape``: drawn on a grid
    of ``lo_mm`` cells (or the voxel, if coarser) and interpolated (cheap for large boxes)."""
    from .acquisition import band_pass, upsample

    cell = max(lo_mm, float(np.min(sp)))
    cshape = tuple(int(max(np.ceil(n * s / cell), 4)) for n, s in zip(shape, sp))
    csp = np.array(sp) * np.array(shape) / np.array(cshape)
    w = sr.standard_normal(cshape).astype(F32)
    b = band_pass(w, np.maximum(lo_mm / csp, 0.5), hi_mm / csp)
    b /= max(float(b.std()), 1e-6)
    return upsample(b, shape)


def _world_axis(affine: np.ndarray, box, axis: int) -> np.ndarray:
    """World coordinate ``axis`` of every voxel of ``box`` (a broadcast sum, no index grid)."""
    out = np.float32(affine[axis, 3])
    for k, sl in enumerate(box):
        v = (np.arange(sl.start, sl.stop, dtype=F32) * F32(affine[axis, k]))
        out = out + v.reshape([-1 if j == k else 1 for j in range(3)])
    return out


def lung_detail(img: np.ndarray, lab: np.ndarray, code: int, affine: np.ndarray, info: dict,
                sr: np.random.Generator) -> None:
    """Lung parenchyma in place: a gravity-dependent density gradient (supine: the dorsal
    lung is 20-60 HU denser), a fine mottle (sub-resolution vessels and interstitium, blobs
    of 1.5-5 mm) and a slow drift. Real parenchyma reads about -850 to -900 HU, not -1000."""
    box = _organ_box(lab, code)
    if box is None:
        return
    sp = np.sqrt((affine[:3, :3] ** 2).sum(0))
    sub = img[box]
    lung_hu = F32(info["hu"])
    w = np.clip(sub / lung_hu, 0, 1) * (lab[box] == code)  # 1 in pure lung, 0 in soft tissue
    y = _world_axis(affine, box, 1)
    y0, depth = F32(info["y_back"]), F32(max(info["y_front"] - info["y_back"], 1.0))
    dep = np.clip(1 - (y - y0) / depth, 0, 1) ** 2 * F32(sr.uniform(20, 60))
    shape = sub.shape
    fine = _noise(sr, shape, sp, 1.5, 5.0) * F32(sr.uniform(10, 22))
    fine += _noise(sr, shape, sp, 6.0, 25.0) * F32(sr.uniform(5, 12))
    sub += w * (dep + fine)
    img[box] = sub


def organ_texture(img: np.ndarray, lab: np.ndarray, code: int, affine: np.ndarray, host_hu: float,
                  tol: float, amp: float, sr: np.random.Generator) -> None:
    """Slow parenchymal heterogeneity (3-15 mm, ``amp`` HU) in place, where the organ label is
    ``code`` and the voxel is still the organ's own tissue (within ``tol`` HU of ``host_hu``)."""
    box = _organ_box(lab, code)
    if box is None:
        return
    sp = np.sqrt((affine[:3, :3] ** 2).sum(0))
    sub = img[box]
    w = np.clip(1 - np.abs(sub - F32(host_hu)) / F32(tol), 0, 1) * (lab[box] == code)
    sub += w * _noise(sr, sub.shape, sp, 3.0, 15.0) * F32(amp)
    img[box] = sub


def draw_tree(img: np.ndarray, lab: np.ndarray, code: int, tree: Tree, affine: np.ndarray, ramp: float,
              value: float, host_hu: float, host_tol: float | None = None) -> None:
    """Composite the tree's tubes into ``img`` where the organ label is ``code``, weighted by
    how much of the voxel is the host tissue: lungness (HU between the parenchyma and water)
    in the lungs, closeness to ``host_hu`` within ``host_tol`` elsewhere, so that vessels
    stop at the organ's edge and never overwrite bone or other organs painted over it."""
    idx, occ = rasterise(tree, img.shape, affine, ramp)
    if len(idx) == 0:
        return
    # overlapping tubes: the largest occupancy per voxel (a lazily zeroed buffer: only the
    # pages the tree touches are ever written); repeated indices then write the same value
    best = np.zeros(img.size, F32)
    np.maximum.at(best, idx, occ)
    occ = best[idx]
    flat = img.reshape(-1)
    v = flat[idx]
    if host_tol is None:
        host = np.clip(v / F32(host_hu), 0, 1)
    else:
        host = np.clip(1 - np.abs(v - F32(host_hu)) / F32(host_tol), 0, 1)
    host *= lab.reshape(-1)[idx] == code
    flat[idx] = v + occ * host * (F32(value) - v)
