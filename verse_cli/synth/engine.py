"""Block-sparse implicit-surface renderer for the synthetic CT.

Every structure is a signed distance function (SDF, millimetres, negative inside)
evaluated in world coordinates. The target voxel grid is stored in *block layout*
(``(nbi, nbj, nbk, B, B, B)``) so that, for each shape, blocks are first classified
from the SDF at their centres:

* outside: skipped;
* deep inside: filled with the core value as a whole (no per-voxel work);
* boundary: every voxel is evaluated.

The SDFs used here are (close to) 1-Lipschitz, so a block whose centre lies farther
than its half-diagonal from the surface cannot contain surface voxels; a safety factor
covers the approximate SDFs. Partial volume comes from a linear occupancy ramp one
voxel wide across the surface, ``occ = clip(0.5 - d / w, 0, 1)``, and tissues are
composited like paint: ``hu = hu * (1 - occ) + occ * value``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BLOCK_MM = 6.0  # block edge in mm (fewer voxels per block along thick-slice axes)
_CHUNK_POINTS = 1 << 20
_LIPSCHITZ_MARGIN = 1.5


def side_rng(rng: np.random.Generator, *tags: int) -> np.random.Generator:
    """A generator seeded from ``rng``'s current state and ``tags``, without advancing ``rng``.

    Intensity-only randomness (texture, tissue HU spread) draws from it, so that adding or
    changing such draws never shifts the main stream, which decides the anatomy and its
    ground truth (masks, centroids, variants, affine).
    """
    st = rng.bit_generator.state.get("state", {})
    key = st.get("state", 0) if isinstance(st, dict) else 0
    words = [(int(key) >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
    return np.random.default_rng(np.random.SeedSequence(words + [int(t) & 0xFFFFFFFF for t in tags]))


# --------------------------------------------------------------------------- SDF primitives
def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (union with a fillet of about ``k`` mm)."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (intersection / subtraction with a fillet)."""
    return -smin(-a, -b, k)


def capsule(p: np.ndarray, a, b, r: float, scale=None) -> np.ndarray:
    """Distance to the segment ``a``-``b`` minus ``r``.

    ``scale`` (3,) squeezes local axes before measuring, which flattens the capsule
    into an elliptic cross-section (it only shrinks distances, so the result stays a
    lower bound of the true distance).
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    pa = p - a
    ba = b - a
    if scale is not None:
        s = np.asarray(scale, dtype=np.float32)
        pa = pa * s
        ba = ba * s
    h = np.clip((pa @ ba) / max(float(ba @ ba), 1e-9), 0.0, 1.0)
    d = pa - h[:, None] * ba
    return np.sqrt(np.einsum("ij,ij->i", d, d)) - r


def ellipsoid(p: np.ndarray, c, radii) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (Quilez's bound)."""
    r = np.asarray(radii, dtype=np.float32)
    q = p - np.asarray(c, dtype=np.float32)
    a = q / r
    k0 = np.sqrt(np.einsum("ij,ij->i", a, a))
    a /= r
    k1 = np.sqrt(np.einsum("ij,ij->i", a, a))
    return np.where(k1 > 1e-6, k0 * (k0 - 1.0) / np.maximum(k1, 1e-6), -float(r.min()))


def plate(p: np.ndarray, origin, u, v, thickness: float, round_r: float = 0.0,
          thickness_at_v: float | None = None) -> np.ndarray:
    """Distance to a parallelogram patch (origin + s*u + t*v, s,t in [0,1]) minus half its thickness.

    With ``thickness_at_v`` the thickness tapers linearly from ``thickness`` at the ``u`` edge
    to that at the far edge (a first-order distance, good for gentle tapers).
    """
    o = np.asarray(origin, dtype=np.float32)
    u = np.asarray(u, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    lu = float(np.linalg.norm(u))
    uh = u / lu
    v = v - (v @ uh) * uh
    lv = float(np.linalg.norm(v))
    vh = v / lv
    n = np.cross(uh, vh)
    q = p - o
    s = q @ uh
    t = q @ vh
    w = q @ n
    ds = np.maximum(np.maximum(-s, s - lu), 0.0)
    dt = np.maximum(np.maximum(-t, t - lv), 0.0)
    half = 0.5 * thickness
    if thickness_at_v is not None:
        half = half + np.float32(0.5 * (thickness_at_v - thickness) / lv) * np.clip(t, 0.0, lv)
    return np.sqrt(ds * ds + dt * dt + w * w) - half - round_r


def ellipse2d(x: np.ndarray, y: np.ndarray, a, b) -> np.ndarray:
    """First-order signed distance to the ellipse (x/a)^2 + (y/b)^2 = 1 (a, b may be arrays)."""
    qa = x / a
    qb = y / b
    q = np.sqrt(qa * qa + qb * qb) + 1e-6
    g = np.sqrt((qa / a) ** 2 + (qb / b) ** 2) / q + 1e-6
    return (q - 1.0) / g


def extrude(d2: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """Combine an in-plane SDF and an axial SDF into a 3-D SDF (an extrusion)."""
    ox = np.maximum(d2, 0.0)
    oz = np.maximum(dz, 0.0)
    return np.sqrt(ox * ox + oz * oz) + np.minimum(np.maximum(d2, dz), 0.0)


def polyline(p: np.ndarray, pts: np.ndarray, cand: np.ndarray | None = None):
    """Distance from ``p`` to a polyline, the arc length of the closest point, and its segment.

    ``cand`` (N, k) restricts the search to a few candidate segments per point.
    """
    a = pts[:-1].astype(np.float32)
    ab = (pts[1:] - pts[:-1]).astype(np.float32)
    seglen = np.sqrt((ab * ab).sum(1))
    cum = np.concatenate([[0.0], np.cumsum(seglen)]).astype(np.float32)
    if cand is None:
        cand = np.broadcast_to(np.arange(len(a)), (len(p), len(a)))
    A = a[cand]
    AB = ab[cand]
    pa = p[:, None, :] - A
    h = np.clip(np.einsum("nkj,nkj->nk", pa, AB) / np.maximum(np.einsum("nkj,nkj->nk", AB, AB), 1e-9), 0, 1)
    d = pa - h[..., None] * AB
    d2 = np.einsum("nkj,nkj->nk", d, d)
    best = np.argmin(d2, axis=1)
    rows = np.arange(len(p))
    seg = cand[rows, best]
    hb = h[rows, best]
    t = cum[seg] + hb * seglen[seg]
    return np.sqrt(d2[rows, best]), t, seg, d[rows, best]


# --------------------------------------------------------------------------- shapes
@dataclass
class Shape:
    """A structure to paint.

    ``sdf(points) -> d`` in mm (world points ``(N, 3)`` float32). ``material(points, d)``
    gives the HU inside (defaults to ``value``). ``core_depth``: below this depth the
    material is constant (``value``), so deep blocks need no per-voxel evaluation;
    ``None`` means always evaluate (textured shapes).
    """

    sdf: Callable[[np.ndarray], np.ndarray]
    lo: np.ndarray
    hi: np.ndarray
    value: float = 0.0
    material: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    core_depth: float | None = 0.0
    label: int = 0
    channel: str = ""  # "", "vert", "rib", "face", "organ": which label map receives ``label``
    mode: str = "paint"  # "paint" composites; "mult" scales existing HU toward ``value``; "label" only labels
    lipschitz: float = _LIPSCHITZ_MARGIN


class Canvas:
    """The target grid in block layout, with the CT and label channels."""

    #: Block-sparse evaluation; False evaluates every voxel of each shape's box (benchmark baseline).
    sparse = True

    def __init__(self, shape, affine: np.ndarray, background: float = -1000.0, ramp_mm: float | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        sp = np.sqrt((self.affine[:3, :3] ** 2).sum(0))
        self.B = tuple(int(np.clip(round(BLOCK_MM / s), 2, 8)) for s in sp)
        self.nb = tuple(-(-s // b) for s, b in zip(self.shape, self.B))
        full = self.nb + self.B
        self.hu = np.full(full, background, dtype=np.float32)
        self.labels = {"vert": np.zeros(full, np.uint8), "rib": np.zeros(full, np.uint8),
                       "face": np.zeros(full, np.uint8), "organ": np.zeros(full, np.uint8)}
        M = self.affine[:3, :3].astype(np.float32)
        self._M = M
        self._inv = np.linalg.inv(self.affine[:3, :3])
        off = np.stack(np.meshgrid(*[np.arange(b) for b in self.B], indexing="ij"), -1).reshape(-1, 3)
        self._offsets = (off.astype(np.float32) @ M.T)  # (B^3, 3) world offsets within a block
        bidx = np.stack(np.meshgrid(*[np.arange(n) for n in self.nb], indexing="ij"), -1).reshape(-1, 3)
        self._block_idx = bidx
        origin = (bidx * np.array(self.B)).astype(np.float32) @ M.T + self.affine[:3, 3].astype(np.float32)
        self._block_origin = origin
        half = (np.array(self.B, np.float32) - 1) / 2.0
        self._block_centre = origin + (half @ M.T)
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float32)
        self.block_radius = float(np.sqrt((((corners * half) @ M.T) ** 2).sum(1)).max())
        self.spacing = sp
        self.ramp = float(ramp_mm if ramp_mm is not None else np.sqrt((sp ** 2).mean()))

    # ------------------------------------------------------------------ helpers
    def _blocks_in_box(self, lo, hi) -> np.ndarray:
        """Flat indices of the blocks that may intersect the world box ``lo``-``hi``."""
        lo = np.asarray(lo, float)
        hi = np.asarray(hi, float)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        vox = (corners - self.affine[:3, 3]) @ self._inv.T
        B = np.array(self.B)
        b0 = np.maximum(np.floor(vox.min(0) / B).astype(int) - 1, 0)
        b1 = np.minimum(np.ceil(vox.max(0) / B).astype(int) + 1, np.array(self.nb))
        if np.any(b1 <= b0):
            return np.zeros(0, dtype=np.int64)
        ii, jj, kk = np.meshgrid(*[np.arange(a, b) for a, b in zip(b0, b1)], indexing="ij")
        return ((ii * self.nb[1] + jj) * self.nb[2] + kk).ravel()

    def occupancy(self, d: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - d / self.ramp, 0.0, 1.0)

    def block_points(self, blocks: np.ndarray) -> np.ndarray:
        """World coordinates of every voxel of ``blocks`` as ``(len(blocks) * B^3, 3)``."""
        pts = self._block_origin[blocks][:, None, :] + self._offsets[None]
        return pts.reshape(-1, 3)

    def _view(self, arr: np.ndarray, blocks: np.ndarray):
        b = self._block_idx[blocks]
        return arr[b[:, 0], b[:, 1], b[:, 2]]

    def _store(self, arr: np.ndarray, blocks: np.ndarray, values: np.ndarray) -> None:
        b = self._block_idx[blocks]
        arr[b[:, 0], b[:, 1], b[:, 2]] = values

    # ------------------------------------------------------------------ painting
    def paint(self, shape: Shape) -> None:
        """Composite ``shape`` into the canvas (HU and, if labelled, its label channel)."""
        blocks = self._blocks_in_box(shape.lo, shape.hi)
        if len(blocks) == 0:
            return
        if not self.sparse:  # reference mode for benchmarks: evaluate every voxel in the box
            step = max(1, _CHUNK_POINTS // int(np.prod(self.B)))
            for i in range(0, len(blocks), step):
                self._paint_edge(shape, blocks[i:i + step])
            return
        dc = shape.sdf(self._block_centre[blocks])
        reach = shape.lipschitz * self.block_radius + self.ramp
        outside = dc > reach
        if shape.core_depth is None:
            deep = np.zeros_like(outside)
        else:
            deep = dc < -(reach + shape.core_depth)
        edge = blocks[~outside & ~deep]
        full = blocks[deep]
        if len(full):
            self._fill(shape, full)
        step = max(1, _CHUNK_POINTS // int(np.prod(self.B)))
        for i in range(0, len(edge), step):
            self._paint_edge(shape, edge[i:i + step])

    def _fill(self, shape: Shape, blocks: np.ndarray) -> None:
        if shape.mode == "paint":
            self._store(self.hu, blocks, np.float32(shape.value))
        elif shape.mode == "mult":
            self._store(self.hu, blocks, self._view(self.hu, blocks) * np.float32(shape.value))
        if shape.channel:
            self._store(self.labels[shape.channel], blocks, np.uint8(shape.label))

    def _paint_edge(self, shape: Shape, blocks: np.ndarray) -> None:
        pts = self.block_points(blocks)
        d = shape.sdf(pts)
        occ = self.occupancy(d).reshape((len(blocks),) + self.B)
        if shape.mode != "label":
            cur = self._view(self.hu, blocks)
            if shape.mode == "mult":
                new = cur * (1.0 + occ * (np.float32(shape.value) - 1.0))
            else:
                val = (shape.material(pts, d).reshape(occ.shape) if shape.material is not None
                       else np.float32(shape.value))
                new = cur + occ * (val - cur)
            self._store(self.hu, blocks, new.astype(np.float32))
        if shape.channel:
            lab = self._view(self.labels[shape.channel], blocks)
            inside = (d <= 0).reshape(occ.shape)
            lab[inside] = shape.label
            self._store(self.labels[shape.channel], blocks, lab)

    # ------------------------------------------------------------------ output
    def to_array(self, arr: np.ndarray) -> np.ndarray:
        """Block layout back to a plain ``shape`` array."""
        nbi, nbj, nbk = self.nb
        bi, bj, bk = self.B
        out = arr.transpose(0, 3, 1, 4, 2, 5).reshape(nbi * bi, nbj * bj, nbk * bk)
        si, sj, sk = self.shape
        return np.ascontiguousarray(out[:si, :sj, :sk])

    def world_points(self) -> np.ndarray:
        """World coordinates of every voxel of the plain array, ``shape + (3,)`` (for slabs)."""
        idx = np.indices(self.shape, dtype=np.float32).reshape(3, -1).T
        return (idx @ self._M.T + self.affine[:3, 3].astype(np.float32)).reshape(self.shape + (3,))
