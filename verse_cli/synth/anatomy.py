"""Shape models of the bones: vertebrae C1-L6, sacrum, coccyx, pelvis, ribs, sternum,
clavicles, scapulae and the skull base.

Every vertebra lives in its own frame (origin at the body centre; x to the patient's
right, y anterior, z along the spine). Its SDF is a smooth union of primitives whose
sizes follow :mod:`.morphometry`, plus a random smooth deformation. The spine is built
by stacking bodies and discs from the sacrum upward and bending at each disc
(lordosis, kyphosis, scoliosis, axial rotation).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from . import morphometry as M
from .engine import Shape, capsule, ellipse2d, ellipsoid, extrude, plate, polyline, side_rng, smax, smin

F32 = np.float32
#: trabecular texture tile: voxels (x, y, z) and their size in mm (z cranio-caudal in a vertebra's
#: frame); 51 mm periods, more than a lumbar body's depth, so no body shows a repeat
TEX_SHAPE = (128, 128, 64)
TEX_VOX = (0.4, 0.4, 0.8)


# --------------------------------------------------------------------------- frames
def rot(axis: str, deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


@dataclass
class Level:
    """One vertebra (or the sacrum) of the anatomy."""

    name: str
    vid: int
    region: str
    dims: dict
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    R: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: local x, y, z in patient frame
    labelled: bool = True
    extra: dict = field(default_factory=dict)

    def to_world(self, q) -> np.ndarray:
        return np.asarray(q, dtype=float) @ self.R.T + self.centre

    def local(self, p: np.ndarray) -> np.ndarray:
        return (p - self.centre.astype(F32)) @ self.R.astype(F32)

    @property
    def top(self) -> np.ndarray:
        return self.to_world([0, 0, self.dims["H"] / 2])

    @property
    def bottom(self) -> np.ndarray:
        return self.to_world([0, 0, -self.dims["H"] / 2])


# --------------------------------------------------------------------------- stacking
def build_spine(levels: list[Level], rng: np.random.Generator, shape: dict) -> None:
    """Place ``levels`` (head to sacrum, sacrum last) by stacking from the sacrum up.

    ``shape`` holds the sagittal and coronal parameters: sacral slope ``ss``, lumbar
    lordosis ``ll``, thoracic kyphosis ``tk``, cervical lordosis ``cl`` (degrees),
    scoliosis ``cobb`` with ``scol_centre`` and ``scol_width``, axial rotation gain.
    """
    sac = levels[-1]
    sac.R = rot("x", -shape["ss"])  # S1 endplate normal tilted anteriorly by the sacral slope
    sac.centre = np.zeros(3)  # the sacrum's origin is the S1 top endplate centre
    # angular increments per disc, from bottom to top
    movers = levels[:-1][::-1]  # lowest lumbar first
    n = len(movers)
    reg = [lv.region for lv in movers]
    sag = np.zeros(n)
    lum = [i for i, r in enumerate(reg) if r == "L"]
    th = [i for i, r in enumerate(reg) if r == "T"]
    ce = [i for i, r in enumerate(reg) if r == "C"]
    if lum:
        w = np.linspace(2.0, 0.6, len(lum))  # most lordosis at L4-S1
        sag[lum] = -shape["ll"] * w / w.sum()
    if th:
        x = np.linspace(0, 1, len(th))
        w = 0.4 + np.sin(np.pi * x)  # kyphosis peaks mid-thorax
        sag[th] = shape["tk"] * w / w.sum()
    if ce:
        w = np.ones(len(ce))
        w[-1] = 0.3  # C1-C2
        sag[ce] = -shape["cl"] * w / w.sum()
    # scoliosis: a smooth coronal curve (one or two arcs) and matching axial rotation
    t = np.linspace(0, 1, n)
    cor = np.zeros(n)
    for cobb, centre, width in shape.get("scoliosis", []):
        g = np.exp(-0.5 * ((t - centre) / width) ** 2) * (t - centre)
        g = np.gradient(np.gradient(g))
        cor += cobb * g / max(np.abs(g).sum() / 2, 1e-6) * 0.5
    jitter = rng.normal(0, 1.0, (n, 3)) * np.array([1.0, 0.6, 0.6])
    R = sac.R.copy()
    top = np.zeros(3)
    prev_axial = 0.0
    for i, lv in enumerate(movers):
        below = levels[-1] if i == 0 else movers[i - 1]
        disc = lv.dims["disc"]
        half_turn = rot("x", -(sag[i] + jitter[i, 0]) / 2) @ rot("y", (cor[i] + jitter[i, 1]) / 2)
        mid_R = R @ half_turn
        mid = top + mid_R[:, 2] * disc / 2
        R = mid_R @ half_turn
        target_axial = shape.get("rot_gain", 0.0) * float(np.sum(cor[: i + 1])) + jitter[i, 2]
        R = R @ rot("z", target_axial - prev_axial)
        prev_axial = target_axial
        lv.extra["disc_below"] = {"mid": mid, "R": mid_R, "height": disc, "lower": below, "upper": lv}
        start = mid + R[:, 2] * disc / 2
        lv.R = R.copy()
        lv.centre = start + R[:, 2] * lv.dims["H"] / 2
        top = lv.centre + R[:, 2] * lv.dims["H"] / 2
        wedge = lv.dims.get("wedge", 0.0)
        if wedge:  # the anterior collapse tilts everything above forward (local kyphosis)
            R = R @ rot("x", -np.degrees(np.arctan2(wedge * lv.dims["H"], lv.dims["D"])))
            top = top - R[:, 2] * wedge * lv.dims["H"] / 4


def align_upright(levels: list[Level], tilt_deg=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Rotate the whole spine so that sacrum-to-top runs along +z, then tilt it.

    Returns the 3x3 rotation applied (about the sacral endplate centre).
    """
    top = levels[0].centre
    base = levels[-1].centre
    v = top - base
    v /= np.linalg.norm(v)
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(v, z)
    s = np.linalg.norm(axis)
    if s < 1e-9:
        Rw = np.eye(3)
    else:
        axis /= s
        ang = np.arctan2(s, v @ z)
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        Rw = np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K
    Rw = rot("x", tilt_deg[0]) @ rot("y", tilt_deg[1]) @ rot("z", tilt_deg[2]) @ Rw
    for lv in levels:
        lv.centre = Rw @ (lv.centre - base)
        lv.R = Rw @ lv.R
        db = lv.extra.get("disc_below")
        if db:
            db["mid"] = Rw @ (db["mid"] - base)
            db["R"] = Rw @ db["R"]
    return Rw


# --------------------------------------------------------------------------- materials
@dataclass
class BoneHU:
    """Per-case bone intensities and the trabecular texture.

    ``tile`` is a periodic (128, 128, 64) field of HU deviations around ``trabecular``, on
    ``TEX_VOX`` mm per tile voxel, drawn by :func:`trabecular_texture`: a mottle of 1.5-4 mm
    trabecular clusters, longer along the tile's third axis (vertical striation). Vertebrae
    look it up in their own frame (third axis cranio-caudal); other bones through ``rot``.
    ``fit_to_grid`` blurs the unit field ``tex`` by the voxel and the PSF and scales it to
    ``texture_sd`` HU.
    """

    cortex: float
    trabecular: float
    cortex_mm: float
    texture_sd: float  # HU, of the texture at fine resolution (before the voxel and PSF blur)
    tile: np.ndarray  # TEX_SHAPE HU deviations of the trabecular texture (zero mean)
    tex: np.ndarray | None = None  # the same, unit standard deviation, before the blur
    rot: np.ndarray | None = None  # tile axes: breaks the tile's periodicity along the grid axes
    endplate_hu: float = 0.0  # sclerotic (denser) endplates, per case
    endplate_mm: float = 2.0
    # marrow heterogeneity (see ``marrow_tile``): HU deviations on a periodic tile, offset per vertebra
    hetero: np.ndarray | None = None
    hetero_mm: float = 1.0
    focal: np.ndarray | None = None  # the fatty foci and bone islands of ``hetero``, apart
    seed: int = 0
    level_sd: float = 0.0  # spread of the mean trabecular HU between vertebrae
    vein_hu: float | None = None  # basivertebral vein (a dark channel behind the body centre)
    vein_r: float = 3.0
    vein_len: float = 0.35
    centre_drop: float = 0.0  # the body centre is less dense than its periphery
    # compact bone beyond the body (see ``bone_hu``): extra shell (mm) and cancellous HU of the
    # vertebral arch, the ribs' shell and cancellous HU, the ilium's extra cancellous HU
    arch_cortex_mm: float = 0.0
    arch_trab: float = 0.0
    rib_cortex_mm: float = 1.0
    rib_trab: float = 40.0
    ilium_trab: float = 0.0
    arch_core: float = 0.0  # 0..1: how much of the arch's extra density is gone deeper than ~2 mm
    arch_post: float = 1.0  # the arch's extra shell behind the pedicle bases, fraction of it
    arch_rim: float = 0.0  # HU added to the shell behind the pedicle bases

    def fit_to_grid(self, spacing_mm, psf_mm: float = 0.0) -> None:
        """Blur the unit texture by the voxel size and PSF (voxels sample it at their centres),
        then scale it to HU."""
        from scipy import ndimage

        if self.tex is None:
            return
        sp = float(np.mean(spacing_mm))
        sig = np.sqrt((0.35 * sp) ** 2 + (0.3 * psf_mm) ** 2) / np.asarray(TEX_VOX)
        f = ndimage.gaussian_filter(self.tex, np.where(sig > 0.3, sig, 0), mode="wrap")
        self.tile = (f * F32(self.texture_sd)).astype(F32)

    def material(self, cortex_mm: float | None = None, trab: float | None = None, cortex=None, key: int = 0):
        """HU inside a bone at points ``p`` with SDF ``d``: cortical shell, compact bone just under
        it, trabecular core with the striated texture and the marrow heterogeneity. ``key``
        (e.g. the vertebra id) shifts the heterogeneity tile and the mean HU per bone."""
        t = F32(cortex_mm if cortex_mm is not None else self.cortex_mm)
        tr = F32(trab if trab is not None else self.trabecular)
        co0 = F32(cortex if cortex is not None else self.cortex)
        tile = self.tile.astype(F32).ravel()
        rot = self.rot if self.rot is not None else np.eye(3)
        Rt = (rot / np.asarray(TEX_VOX)).astype(F32)
        Rq = np.diag(1 / np.asarray(TEX_VOX)).astype(F32)
        Rh = None
        shift = np.zeros(3, F32)
        hshift = np.zeros(3, F32)
        het = None
        fl = F32(0.6) * tr  # floor of the slow marrow variation: the bone's mean before its level shift
        if self.hetero is not None:
            kr = np.random.default_rng([self.seed, int(key) & 0xFFFF])
            het = self.hetero.astype(F32).ravel()
            foc = (self.focal if self.focal is not None else np.zeros_like(self.hetero)).astype(F32).ravel()
            Rh = (rot[:, ::-1] / self.hetero_mm).astype(F32)
            hshift[:] = kr.uniform(0, 64, 3)
            tr = tr + F32(kr.normal(0, self.level_sd) if key else 0.0)
            tr = F32(max(float(tr), 5.0))
            shift[:] = kr.uniform(0, 1, 3) * np.asarray(TEX_SHAPE)  # each bone its own stretch of the tile
        m0, m1, m2 = (v - 1 for v in TEX_SHAPE)
        s1, s0 = int(np.log2(TEX_SHAPE[2])), int(np.log2(TEX_SHAPE[1] * TEX_SHAPE[2]))

        def mat(p, d, t_add=None, tr_add=None, q=None, core_w=None, dense_mm=2.5, co_add=None):
            """``t_add``/``tr_add`` (per point, optional): a thicker shell and denser cancellous
            bone where a bone is more compact (posterior arch of a vertebra). ``q``: the points in
            the bone's own frame (third axis cranio-caudal) for the striated texture. ``core_w``
            (0..1 per point): how far the compact layer under the shell gives way to cancellous
            bone deeper in (thick parts of the arch); ``dense_mm`` (per point): how deep the
            compact layer under the shell reaches; ``co_add`` (per point): a denser shell."""
            depth = -d - t if t_add is None else -d - t - t_add
            co = co0 if co_add is None else co0 + co_add
            trp = tr if tr_add is None else tr + tr_add
            inner = np.clip(depth / F32(0.7) + F32(0.5), 0, 1)  # 0 in the shell, 1 in the core
            # thin parts (processes, laminae) are mostly compact bone: brighter just under the shell
            dense = np.clip(F32(1) - depth / np.asarray(dense_mm, F32), 0, 1) * F32(0.3) * (co - trp)
            if core_w is not None:
                trp = trp - core_w * np.clip((depth - F32(0.8)) / F32(1.2), 0, 1) * (trp - tr)
            u = (q if q is not None else p) @ (Rq if q is not None else Rt) + shift
            i = np.floor(u).astype(np.int32)
            tex = tile[((i[:, 0] & m0) << s0) | ((i[:, 1] & m1) << s1) | (i[:, 2] & m2)]
            if het is not None:  # marrow heterogeneity fades in below the compact layer
                j = np.floor(p @ Rh + hshift).astype(np.int32) & 63
                jj = (j[:, 0] << 12) | (j[:, 1] << 6) | j[:, 2]
                fade = np.clip(depth / F32(2.0), 0, 1)
                # the slow variation (per-bone level, coarse marrow density) has a soft floor at
                # 0.6 x the mean: coarse lows, a low level and the less dense centre together took
                # whole low-density bodies to water. Fatty foci and islands are focal, and added after.
                slow = trp + (het[jj] - foc[jj]) * fade
                if fl > 0:  # (fatty marrow of long bones is drawn below zero on purpose)
                    slow = fl + F32(15) * np.logaddexp(F32(0), (slow - fl) / F32(15))
                return co + (slow + foc[jj] * fade + dense + tex - co) * inner
            return co + (trp + dense + tex - co) * inner

        return mat


def _skip_plate_rod_draws(rng: np.random.Generator, rodness: float) -> None:
    """Consume the main-stream draws of the former plate/rod tile (one or two 64^3 noise
    volumes), so that every anatomy draw after it, and so the masks, stay as they were."""
    rng.uniform(0.55, 0.8)
    rng.standard_normal((64, 64, 64))
    if rodness >= 0.15:
        rng.standard_normal((64, 64, 64))


def trabecular_texture(rng: np.random.Generator, rodness: float) -> tuple[np.ndarray, dict]:
    """Unit-variance periodic texture of cancellous bone as CT sees it, on ``TEX_SHAPE``.

    Single trabeculae (0.1-0.3 mm thick, 0.5-1.5 mm apart) are below CT resolution; what a
    0.5-1 mm scan shows is their local density: a coarse mottle of clusters 1.5-4 mm across,
    drawn out along the vertebra's axis, because the load-bearing vertical trabeculae are
    thicker and longer than the horizontal struts and outlast them in ageing and osteoporosis
    (Mosekilde L, Bone 1988;9:247-250; Thomsen JS et al., Bone 2002;31:136-142), which gives
    the vertical striation of osteoporotic bodies. Spectrum: two Gaussian band-passes (the
    cluster scale and half of it), stretched along z by 1.3-4x, more with ``rodness`` (age).
    A mild exponential skew makes dense clusters brighter than marrow gaps are dark, as in
    real bodies (verse014: p95 - median 209 HU, median - p5 178 HU)."""
    n, vox = TEX_SHAPE, TEX_VOX
    f = [np.fft.fftfreq(n[0], d=vox[0]), np.fft.fftfreq(n[1], d=vox[1]), np.fft.rfftfreq(n[2], d=vox[2])]
    kxy = (f[0][:, None, None] ** 2 + f[1][None, :, None] ** 2).astype(F32)
    kz = (f[2][None, None, :] ** 2).astype(F32)
    p = {"s": float(rng.uniform(0.55, 1.0)), "aniso": float(np.clip(1.3 + 2.0 * rodness + rng.uniform(-0.3, 0.7), 1.2, 4.0)),
         "fine": float(rng.uniform(0.25, 0.6)), "skew": float(rng.uniform(0.15, 0.45))}

    def g(s):  # Gaussian of sigma s mm in-plane, s * aniso along z
        return np.exp(F32(-2 * np.pi ** 2 * s * s) * (kxy + F32(p["aniso"] ** 2) * kz))

    s0 = p["s"]
    spec = (g(s0) - g(2.2 * s0)) + F32(p["fine"]) * (g(0.5 * s0) - g(1.1 * s0))
    w = np.fft.rfftn(rng.standard_normal(n).astype(F32))
    x = np.fft.irfftn(w * spec, s=n, axes=(0, 1, 2)).astype(F32)
    x /= max(float(x.std()), 1e-6)
    x = np.exp(F32(p["skew"]) * x)
    x -= F32(x.mean())
    x /= max(float(x.std()), 1e-6)
    return x.astype(F32), p


def marrow_tile(rng: np.random.Generator, trab: float, n: int = 64, mm: float = 1.0) -> tuple[np.ndarray, dict]:
    """Periodic (n^3, ``mm`` per voxel) HU deviations of the marrow around its mean, drawn per case.

    Real vertebral bodies are far from even (real CT at 1.5 mm: p5-p95 of about 300 HU inside
    the body, against ~60 HU of noise): coarse density variation (4-10 mm), mottling at
    1-3 mm (trabecular clusters seen at CT resolution), focal fatty marrow (down to fat HU
    in older patients) and, rarely, small dense bone islands. All amplitudes are random
    per case, from an almost even body to a very heterogeneous one. The spectrum is shaped
    in the Fourier domain (fast for a periodic tile)."""
    f = [np.fft.fftfreq(n, d=mm)] * 2 + [np.fft.rfftfreq(n, d=mm)]
    k2 = (f[0][:, None, None] ** 2 + f[1][None, :, None] ** 2 + f[2][None, None, :] ** 2).astype(F32)
    g = lambda s: np.exp(F32(-2 * np.pi ** 2 * s * s) * k2)  # Gaussian of sigma s mm

    def field(spec):
        w = np.fft.rfftn(rng.standard_normal((n, n, n)).astype(F32))
        out = np.fft.irfftn(w * spec, s=(n, n, n), axes=(0, 1, 2)).astype(F32)
        return out / max(float(out.std()), 1e-6)

    s_mid = float(rng.uniform(0.8, 1.4))
    # the coarse variation is capped by the density (0.3 x + 15 HU) and fatty foci cover at most
    # 10 % of the tile: with 85 HU of coarse SD (blobs the size of a body core) and 20 % fat,
    # bodies of 60-100 HU had whole cores at fat HU and read as hollow. The 1-3 mm mottle is
    # mostly :func:`trabecular_texture`'s now, hence the smaller "mid".
    p = {"mid": float(rng.uniform(5, 30)), "coarse": float(min(rng.uniform(15, 85), 0.3 * trab + 15)),
         "coarse_mm": float(rng.uniform(3.5, 9.0)), "fat_frac": float(rng.choice([0.0, rng.uniform(0.02, 0.1)],
                                                                                 p=[0.45, 0.55])),
         "fat_hu": float(rng.uniform(-80, 40)), "islands": float(rng.choice([0.0, rng.uniform(150, 500)],
                                                                             p=[0.8, 0.2]))}
    h = p["mid"] * field(g(s_mid) - g(2.6 * s_mid)) + p["coarse"] * field(g(p["coarse_mm"]))
    focal = np.zeros_like(h)
    if p["fat_frac"] > 0:  # fatty foci: soft-edged blobs of 3-12 mm
        fz = field(g(float(rng.uniform(1.2, 3.0))))
        t = np.quantile(fz, 1 - p["fat_frac"])
        w = np.clip((fz - t) / F32(0.9), 0, 1)
        focal += w * F32(min(p["fat_hu"] - trab, 0.0))
    if p["islands"] > 0:  # enostoses: a few dense foci of 2-6 mm
        bz = field(g(float(rng.uniform(0.8, 1.6))))
        t = np.quantile(bz, 0.997)
        focal += np.clip((bz - t) / F32(0.4), 0, 1) * F32(p["islands"])
    h += focal
    shift = F32(h.mean())
    h -= shift
    p["focal"] = (focal - shift).astype(F32)  # the focal part alone (``h`` less the slow part)
    return h.astype(F32), p


def bone_hu(rng: np.random.Generator, age_factor: float) -> BoneHU:
    """Random bone HU, domain-randomised per case: trabecular 70 (osteoporotic, fatty marrow)
    to ~300 HU (dense), cortex 450-1100 HU and 0.5-1.5 mm, a striated trabecular texture
    (:func:`trabecular_texture`), marrow heterogeneity (:func:`marrow_tile`), a basivertebral vein, a less dense body
    centre, and sclerotic endplates of random strength. Reference ranges: trabecular L1
    HU ~200-250 in young adults, ~100-150 in the elderly, < 100 in osteoporosis
    (Pickhardt et al., Ann Intern Med 2013); the real fixtures: verse014 p50 ~120 HU,
    the TPTBox crop ~50 HU."""
    # Mean L1 trabecular HU falls ~2.5 HU/year, from 226 +- 44 HU under 30 years to 89 +- 38 HU at
    # 90 and over (Jang S et al., Radiology 2019;291:360-367; 20 374 adults, 120 kV). The raw
    # draw reaches -60 HU for the oldest draws; a hard floor at 50 HU held ~10 % of cases, whose
    # cores (with the marrow texture) then read at water or fat: hollow bodies. Below 120 HU the
    # draw is compressed into 70-120 HU: a continuous low tail, no body core below soft tissue.
    raw = float(rng.uniform(75, 310) - 135 * age_factor ** 1.5)
    trab = raw if raw >= 120 else 70 + (raw + 60) * 50 / 180
    rng.normal(0, 0.02)  # the former bone volume fraction's spread
    rodness = float(np.clip(age_factor + rng.normal(0, 0.2), 0, 1))
    _skip_plate_rod_draws(rng, rodness)
    ax = rng.normal(size=3)
    ax /= np.linalg.norm(ax)
    a = rng.uniform(0, np.pi)
    K = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    rot = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
    # texture SD at fine resolution grows with the density but stays well below it (0.2-0.46 x
    # + 20 HU), so marrow gaps stay above fat: verse014's bodies (median 84-257 HU) have ~80 HU
    # of SD from all marrow structure (116 HU in all, less its 77 HU noise)
    cortex, cortex_mm = float(rng.uniform(450, 1100)), float(rng.uniform(0.5, 1.4))
    amp = float(rng.uniform(0.6, 1.4))
    rng.uniform(0.28, 0.55)  # the former plate/rod tile's scale: drawn, so the main stream stays
    b = BoneHU(cortex=cortex, trabecular=trab, cortex_mm=cortex_mm, texture_sd=0.33 * amp * trab + 20,
               tile=np.zeros(TEX_SHAPE, F32), rot=rot)
    b.endplate_hu = float(rng.choice([0.0, rng.uniform(40, 260)], p=[0.3, 0.7]))
    b.endplate_mm = float(rng.uniform(1.0, 3.0))
    # intensity-only draws: a side stream, so that the anatomy drawn after this stays the same
    sr = side_rng(rng, 0xB0E)
    b.hetero, mp = marrow_tile(sr, trab)
    b.focal = mp.pop("focal", None)
    b.seed = int(sr.integers(0, 2 ** 31))
    b.level_sd = float(sr.uniform(0, 25))
    # basivertebral vein: blood (~40 HU unenhanced) in a channel with fat around it
    b.vein_hu = float(sr.uniform(0, 90)) if sr.random() < 0.85 else None
    b.vein_r = float(sr.uniform(1.5, 4.0))
    b.vein_len = float(sr.uniform(0.2, 0.5))
    # the centre is less dense than the rim, by at most a quarter of the mean (with up to 70 HU
    # regardless of the mean, 60-100 HU bodies had cores near water)
    b.centre_drop = float(sr.uniform(0, 0.25) * trab)
    _compact_bone(sr, b)
    b.tex, _ = trabecular_texture(sr, rodness)
    b.fit_to_grid([0.8, 0.8, 0.8], 0.4)
    return b


def _compact_bone(sr: np.random.Generator, b: BoneHU) -> None:
    """Per-case density of the bones that are mostly compact: the vertebral arch, the ribs, the ilium.

    * Arch: pedicles, laminae and processes are mostly compact bone (the pedicle's medial wall
      is the thickest; Kothe R et al., Spine 1996;21:264-270) around dense cancellous bone.
      Real verse014 (1 x 1 x 2 mm), HU by depth below the mask surface: arch 700 HU at
      1-3 mm and ~300 HU at 4-6 mm, against 430 / 140 HU for the bodies; before this the
      synthetic arch fell to the body's core value within 2 mm and looked hollow.
    * Ribs: mid-rib cortex 0.9-2.6 mm on the pleural aspect (mean maximum 1.4 mm), thinner
      on the cutaneous aspect (Holcombe SA et al., J Anat 2019;235:883-891); with a 1 mm
      shell and the body's cancellous HU a 9 mm rib read near costal-cartilage HU.
    * Ilium: cancellous bone somewhat denser than the lumbar bodies'.
    * Thick parts of the arch have a cortical rim around a less dense core. verse014, median
      HU by depth below the mask surface (its mask runs ~1 mm outside the bone): laminae and
      spinous processes (> 30 mm behind the body centroid) 671 / 695 / 359 HU at 1-2 / 2-3 /
      3-5 mm, their mid-sagittal section 436 HU (p10 175, p90 993); transverse processes
      (> 30 mm lateral) 280 / 91 / 45 HU; bodies' cores ~110 HU. ``arch_core`` of the arch's
      extra density is gone beyond ~2 mm below its shell; behind the pedicle bases and
      lateral of the body the extra shell keeps ``arch_post`` of its thickness and is
      ``arch_rim`` HU denser (capped at 1250 HU), for a crisp rim.
    Drawn from the side stream, so the anatomy and its ground truth do not change.
    """
    b.arch_cortex_mm = float(sr.uniform(0.6, 1.3))
    b.arch_trab = float(sr.uniform(0.5, 1.0) * b.trabecular + sr.uniform(40, 110))
    b.rib_cortex_mm = float(sr.uniform(0.9, 1.6))
    b.rib_trab = float(sr.uniform(0.2, 0.5) * b.trabecular + sr.uniform(30, 90))
    b.ilium_trab = float(sr.uniform(0.1, 0.4) * b.trabecular + sr.uniform(10, 60))
    b.arch_core = float(sr.uniform(0.5, 0.9))
    b.arch_post = float(sr.uniform(0.2, 0.5))
    b.arch_rim = float(min(sr.uniform(100, 350), max(1250 - b.cortex, 0)))


# --------------------------------------------------------------------------- vertebrae
def _deformer(rng: np.random.Generator, amp: float):
    k = rng.normal(size=(3, 3))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    k *= (2 * np.pi / rng.uniform(35, 80, 3))[:, None]
    ph = rng.uniform(0, 2 * np.pi, 3)
    a = rng.normal(0, amp, 3)
    K = k.astype(F32)
    P = ph.astype(F32)
    A = a.astype(F32)

    def warp(q):
        s = np.sin(q @ K.T + P)  # (N, 3)
        return q + s * A

    return warp


def body_sdf(q: np.ndarray, W, D, H, waist=0.06, post=0.88, conc=1.2, rr=1.5, wedge=0.0):
    """A vertebral body: elliptic cylinder, flat posterior wall, waist, concave endplates."""
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    hz = np.clip(2 * z / H, -1, 1)
    wz = 1.0 - waist * (1.0 - hz * hz)
    a = F32(W / 2) * wz
    b = np.where(y >= 0, F32(D / 2), F32(D / 2 * 0.95)) * wz
    d2 = ellipse2d(x, y, a, b)
    d2 = np.maximum(d2, -y - F32(post * D / 2))
    r2 = np.clip((x / F32(W / 2)) ** 2 + (y / F32(D / 2)) ** 2, 0, 1)
    # wedge: fraction of height lost at the anterior wall (compression fracture), none posteriorly
    half = F32(H / 2) * (F32(1) - F32(wedge) * np.clip(y / F32(D) + F32(0.5), 0, 1)) - F32(conc) * (1 - r2)
    dz = np.abs(z) - half
    return extrude(d2 + rr, dz + rr) - rr


def _mirror(q):
    m = q.copy()
    m[:, 0] = np.abs(m[:, 0])
    return m


#: Spinous processes against the table (whose height is the base's, at the lamina): height,
#: length, angle and width. At the table's height with a knob 1.1 x as tall, neighbouring
#: lumbar processes touched in lordosis and the long, steep thoracic ones cut into the next
#: one's base (the facet-joint carving then left a thin cleft), where real spines keep a
#: ligament-filled interspinous space of several mm (on 1 mm renders, the least gap between
#: neighbours' midline bone behind the canal was 0.4-3 mm before these factors, mostly 0.4 mm;
#: with them 0.7-12 mm, the median per case 2.2-5.6 mm).
#: Real processes are also wider than plates (5-10 mm, the tip the widest).
#: Their section is no slab either: the lower border is the thick one, the upper border thin
#: (verse014's lumbar processes, 1 mm mask: 2-4 mm wide at the top, 7-14 mm at the bottom).
#: A slab of even width showed as a bright even sheet wherever a sagittal cut grazed its flat
#: side; a taper (``_SPINOUS_TAPER``: 1.2 x the mean width at the lower border, 0.45 x at the
#: upper one) turns that into a narrow band.
_SPINOUS_H = {"T": 0.95, "L": 0.85}
_SPINOUS_L = {"T": 0.9}
_SPINOUS_FLATTER = {"T": 6.0}  # degrees
_KNOB_H = {"T": 0.5, "L": 0.4}
_SPINOUS_T = {"T": 6.0, "L": 8.0}
_SPINOUS_TAPER = (1.2, 0.45)  # width at the lower, upper border (x the mean process width)


def posterior_sdf(q: np.ndarray, g: dict, region: str, sides: dict) -> np.ndarray:
    """Pedicles, laminae, spinous and transverse processes, articular processes."""
    _W, D, H = g["W"], g["D"], g["H"]
    pw, ph, pl, cw, cd = g["pw"], g["ph"], g["pl"], g["cw"], g["cd"]
    m = _mirror(q)
    conv = np.tan(np.radians(g["conv"]))
    zp = 0.12 * H
    y0 = -0.35 * D
    y1 = -D / 2 - pl
    px0 = cw / 2 + pw / 2 * 0.85
    px1 = px0 + (y0 - y1) * conv * 0.5
    ped = capsule(m, (px0, y0, zp), (px1, y1, zp), pw / 2, scale=(1, 1, pw / ph))
    lam_t = g.get("lam_t", 5.0)
    lam_h = 0.9 * H if region != "C" else 0.8 * H
    y_lm = -D / 2 - cd - lam_t / 2
    lam = plate(m, (px1, y1, zp - 0.55 * lam_h), (-px1, y_lm - y1, -1.0), (0, 0.25 * lam_h, lam_h), lam_t, 0.3)
    d = smin(ped, lam, 2.5)
    # spinous process
    sa = np.radians(g["sa"] - _SPINOUS_FLATTER.get(region, 0.0))
    sl, sh = g["sl"] * _SPINOUS_L.get(region, 1.0), g["sh"] * _SPINOUS_H.get(region, 1.0)
    u = np.array([0, -np.cos(sa), -np.sin(sa)]) * sl
    vh = np.array([0, -np.sin(sa), np.cos(sa)])
    v = vh * sh
    o = np.array([0, y_lm + 2.0, zp - 0.45 * lam_h]) - 0.2 * v
    sp_t = g.get("sp_t", _SPINOUS_T.get(region, 6.5))
    tip = o + u + 0.5 * v
    # ``plate`` inflates the patch by half its thickness on every side, its edges too: the
    # patch is shortened by that much so that the process is ``sh`` tall, however wide
    tapered = region in _SPINOUS_H
    grow = min(sp_t / 2 + 0.5, 0.4 * sh) if tapered else 0.0
    lower, upper = (_SPINOUS_TAPER[0] * sp_t, _SPINOUS_TAPER[1] * sp_t) if tapered else (sp_t, None)
    spin = plate(q, o + grow * vh, u, v - 2 * grow * vh, lower, 0.5, thickness_at_v=upper)
    if region == "C" and g.get("bifid", False):
        knob = ellipsoid(m, (4.0, tip[1], tip[2]), (3.5, 4.0, max(sh * 0.45, 3.0)))
    else:
        knob = ellipsoid(q, tip, (sp_t * 0.75, 4.5, max(sh * _KNOB_H.get(region, 0.55), 3.0)))
    d = smin(d, smin(spin, knob, 2.0), 2.0)
    # articular processes
    if region == "C":
        pil = ellipsoid(m, (px1 + 2.5, y1 - 1.0, 0.0), (6.0, 7.0, H / 2 + 3.0))
        d = smin(d, pil, 2.0)
    elif region == "T":
        sup = ellipsoid(m, (px1 - 1.0, y1 - 1.0, H / 2 + 1.5), (6.0, 3.5, 6.5))
        inf = ellipsoid(m, (px1 - 3.0, y1 - 6.0, -H / 2 + 1.0), (6.0, 3.5, 6.5))
        d = smin(d, smin(sup, inf, 1.0), 2.0)
    else:
        sup = ellipsoid(m, (px1 + 2.5, y1 - 3.0, H / 2 + 2.0), (4.0, 7.5, 8.0))
        inf = ellipsoid(m, (px1 - 3.0, y1 - 10.0, -H / 2 + 0.5), (4.0, 7.0, 8.0))
        d = smin(d, smin(sup, inf, 1.0), 2.0)
    # transverse processes, one side at a time (Castellvi and ribs are asymmetric)
    for s, tp in ((1.0, sides.get("right", {})), (-1.0, sides.get("left", {}))):
        d = smin(d, _transverse(q, g, region, s, tp, px1, y1, zp), 2.5)
    return d


def cervical_process_axis(g: dict, s: float, span: float) -> tuple:
    """A cervical transverse process as a capsule in the level frame: root, tip, radius."""
    return (s * (g["W"] / 2 - 1.0), -2.0, 0.0), (s * span, -4.0, -1.5), 4.2


def _transverse(q, g, region, s, tp, px1, y1, zp):
    W, _D, _H = g["W"], g["D"], g["H"]
    span = g["tp"] * tp.get("scale", 1.0)
    if region == "C":
        a, b, r = cervical_process_axis(g, s, span)
        d = capsule(q, a, b, r, scale=(1, 1, 0.9))
        foramen = np.sqrt((q[:, 0] - s * (W / 2 + 5.5)) ** 2 + (q[:, 1] + 3.0) ** 2) - 2.8
        return smax(d, -foramen, 0.6)
    if region == "T":
        a = (s * (px1 - 1.0), y1 + 2.0, zp)
        b = (s * span, y1 - 10.0, zp + 4.0)
        return capsule(q, a, b, 4.5 * tp.get("thick", 1.0))
    # lumbar: thin antero-posteriorly, taller craniocaudally; Castellvi enlarges it
    height = tp.get("height", 9.0)
    a = (s * (px1 - 1.0), y1 + 3.0, zp)
    b = (s * span, y1 + 2.0 + tp.get("forward", 0.0), zp - tp.get("drop", 2.0))
    return capsule(q, a, b, 3.0 * tp.get("thick", 1.0), scale=(1.0, 1.0, 6.0 / height))


def vertebra_sdf_factory(lv: Level, rng: np.random.Generator, deform_mm: float):
    g = lv.dims
    warp = _deformer(rng, deform_mm)
    sides = lv.extra.get("tp_sides", {})
    region = lv.region
    osteo = lv.extra.get("osteophytes", [])

    def local_sdf(q):
        q = warp(q)
        if lv.name == "C1":
            return atlas_sdf(q, g)
        body = body_sdf(q, g["W"], g["D"], g["H"], waist=g.get("waist", 0.06), conc=g.get("conc", 1.2),
                        wedge=g.get("wedge", 0.0))
        # basivertebral foramen: the notch in the middle of the posterior wall
        notch = capsule(q, (0, -g["D"] / 2 - 2, 0), (0, -g["D"] / 2 + 5, 0), 1.6, scale=(0.6, 1, 1))
        body = smax(body, -notch, 0.8)
        d = smin(body, posterior_sdf(q, g, "C" if lv.name == "C2" else region, sides), 2.5)
        if region == "C":
            unc = ellipsoid(_mirror(q), (g["W"] / 2 - 1.5, 0.0, g["H"] / 2), (2.2, 5.0, 3.0))
            d = smin(d, unc, 1.0)
        if lv.name == "C2":
            dens = capsule(q, (0, 1.0, g["H"] / 2 - 2), (0, 1.5, g["H"] / 2 + g["dens_len"]), g["dens_r"])
            facets = ellipsoid(_mirror(q), (g["W"] / 2 + 3.5, -2.0, g["H"] / 2 - 2.0), (7.0, 8.0, 4.0))
            d = smin(d, smin(dens, facets, 2.0), 2.5)
        for (cx, cy, cz, r) in osteo:
            d = smin(d, ellipsoid(q, (cx, cy, cz), (r * 1.4, r, r * 0.8)), 2.0)
        return d

    def sdf(p):
        return local_sdf(lv.local(p))

    return sdf, local_sdf


def atlas_sdf(q: np.ndarray, g: dict) -> np.ndarray:
    """C1: anterior and posterior arches, lateral masses, transverse processes."""
    a, b, tube = g["a"], g["b"], g["tube"]
    yc = -12.0
    x, y, z = q[:, 0], q[:, 1] - F32(yc), q[:, 2]
    de = ellipse2d(x, y, F32(a), F32(b))
    ring = np.sqrt(de * de + (z * F32(0.8)) ** 2) - F32(tube)
    mr = g["mass"]
    mass = ellipsoid(_mirror(q), (a - 3.0, yc + 4.0, 0.0), mr)
    d = smin(ring, mass, 3.0)
    tp = capsule(_mirror(q), (a + 2.0, yc + 4.0, 0.0), (g["tp"], yc + 2.0, 0.0), 4.0)
    foramen = np.sqrt((np.abs(q[:, 0]) - (a + 7.0)) ** 2 + (q[:, 1] - (yc + 4.0)) ** 2) - 2.8
    d = smin(d, smax(tp, -foramen, 0.5), 2.0)
    tub = ellipsoid(q, (0, yc - b, 0.0), (5.0, 4.0, 6.0))
    return smin(d, tub, 2.0)


def local_box(lv: Level) -> tuple[np.ndarray, np.ndarray]:
    g = lv.dims
    if lv.name == "C1":
        return np.array([-g["tp"] - 8, -50, -16]), np.array([g["tp"] + 8, 20, 16])
    ext_y = g["D"] / 2 + g["pl"] + g["cd"] + g["sl"] + 14
    ext_x = max(g["tp"] * 1.35, g["W"] / 2 + 12) + 10
    ext_z = g["H"] / 2 + max(g["sl"] * np.sin(np.radians(g["sa"])) + g["sh"], 12) + 8
    top = g["H"] / 2 + g.get("dens_len", 0) + 12
    return np.array([-ext_x, -ext_y, -ext_z]), np.array([ext_x, g["D"] / 2 + 12, max(top, ext_z)])


def world_box(lv: Level, lo, hi, margin=0.0) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    w = lv.to_world(corners)
    return w.min(0) - margin, w.max(0) + margin


def _arch_weight(lv: Level):
    """Weight (0..1) of the compact-bone model at local points: 0 in the body, 1 in the
    posterior arch (pedicles, laminae, processes), with a 4 mm ramp centred 1 mm behind the
    body's posterior wall (so the pedicles are compact from their base). C1 has no body: its
    ring is all arch."""
    if lv.name == "C1":
        return lambda q: np.ones(len(q), F32)
    wall = F32(-0.88 * lv.dims["D"] / 2)

    def weight(q):
        return np.clip((wall + F32(1.0) - q[:, 1]) / F32(4.0), 0, 1)

    return weight


def vertebra_shape(lv: Level, bone: BoneHU, rng: np.random.Generator, deform_mm: float) -> Shape:
    sdf, _ = vertebra_sdf_factory(lv, rng, deform_mm)
    lo, hi = world_box(lv, *local_box(lv), margin=4.0)
    mat = bone.material(trab=bone.trabecular + lv.extra.get("trab_shift", 0.0), key=lv.vid)
    scl = lv.extra.get("sclerosis")
    amp, width = (350.0, scl) if scl else (bone.endplate_hu, bone.endplate_mm)
    if not (scl or (amp > 0 and lv.region != "C")):
        amp = 0.0
    vein = bone.vein_hu is not None and lv.name not in ("C1", "C2")
    base = mat
    g = lv.dims
    Hh = F32(g["H"] / 2)
    back = F32(-g["D"] / 2)
    amp, width = F32(amp), F32(width)
    inv_ax = (F32(2 / g["W"]), F32(2 / g["D"]), F32(1 / Hh))
    drop = F32(bone.centre_drop * min(1.0, g["D"] / 30.0))
    y0 = -0.88 * g["D"] / 2 - 1.0
    va, vb = (0.0, y0, 0.0), (0.0, y0 + bone.vein_len * g["D"], 0.0)
    vr = F32(min(bone.vein_r, g["H"] / 6))
    vhu = F32(bone.vein_hu if vein else 0.0)
    arch_w = _arch_weight(lv)
    arch_t, arch_tr = F32(bone.arch_cortex_mm), F32(bone.arch_trab)
    arch_core, arch_post, arch_rim = F32(bone.arch_core), F32(bone.arch_post), F32(bone.arch_rim)
    # behind the pedicle bases (laminae, processes) and lateral of the body (transverse
    # processes) the extra shell tapers to ``arch_post`` of itself, but denser (``arch_rim``),
    # and the compact layer under it thins from 2.5 to 1 mm over 6 mm: a crisp rim around a
    # less dense core where the bone is thick
    ped = F32(-0.88 * g["D"] / 2 - min(6.0, 0.5 * g.get("pl", 8.0)))
    side = F32(g["W"] / 2)
    # transverse processes (beyond the articular pillars) hold fatty cancellous bone: verse014
    # reads 45 HU at their core, under the body's ~110 HU, where the arch's dense core model
    # gave ~380 HU; out there the core falls to (1 - 0.6 arch_core) of the body's cancellous HU,
    # without the arch's extra shell and compact layer
    tp_x = F32(g["W"] / 2 + 6.0 if lv.region in ("T", "L") else 1e6)  # thoracic and lumbar only
    tp_drop = F32(0.6 * bone.arch_core * (bone.trabecular + lv.extra.get("trab_shift", 0.0)))
    tp_thin = F32(0.3 * bone.cortex)  # and a thinner, less dense cortex (verse014: 242 HU at 1-2 mm)

    def mat(p, d, base=base, amp=amp, width=width):
        q_all = lv.local(p)
        w = arch_w(q_all)  # 0 in the body, 1 in the posterior arch
        behind = np.clip(np.maximum(ped - q_all[:, 1], np.abs(q_all[:, 0]) - side) / F32(6.0), 0, 1) * (w > 0)
        t_arch = w * arch_t * (F32(1) - behind * (F32(1) - arch_post))
        lat = np.clip((np.abs(q_all[:, 0]) - tp_x) / F32(6.0), 0, 1) * w
        keep = F32(1) - lat
        out = base(p, d, t_add=t_arch * keep, tr_add=w * arch_tr * keep - lat * tp_drop, q=q_all,
                   core_w=w * arch_core * keep, dense_mm=(F32(2.5) - F32(1.5) * behind) * (F32(1) - F32(0.8) * lat),
                   co_add=behind * arch_rim * keep - lat * tp_thin)
        # only the body's inside needs the rest (the box also holds the arch and soft tissue)
        if not (amp > 0 or vein or drop > 0):
            return out
        sel = np.flatnonzero(d < 0)
        q = q_all[sel]
        az = np.abs(q[:, 2])
        sel_body = (q[:, 1] > back - F32(3)) & (az < Hh + F32(3))
        sel, q, az = sel[sel_body], q[sel_body], az[sel_body]
        o = out[sel]
        if amp > 0:
            band = np.clip(1 - (Hh - az) / width, 0, 1) * (q[:, 1] > back)
            o += band * amp
        if drop > 0:  # the centre of the body is less dense than its rim
            r2 = (q[:, 0] * inv_ax[0]) ** 2 + (q[:, 1] * inv_ax[1]) ** 2 + (q[:, 2] * inv_ax[2]) ** 2
            o -= drop * np.clip(1 - r2, 0, 1)
        if vein:  # the basivertebral vein runs from the posterior foramen toward the centre
            dv = capsule(q, va, vb, 0.0, scale=(1.0, 1.0, 1.4))
            wv = np.clip(F32(1.3) - dv / vr, 0, 1) * (o < F32(400))
            o += wv * (vhu - o)
        out[sel] = o
        return out
    return Shape(sdf=sdf, lo=lo, hi=hi, material=mat, core_depth=None,
                 label=lv.vid if lv.labelled else 0, channel="vert" if lv.labelled else "")


# --------------------------------------------------------------------------- discs, canal
def disc_shape(db: dict, hu: float, bulge: float = 1.5) -> Shape:
    lower: Level = db["lower"]
    upper: Level = db["upper"]
    mid = db["mid"].astype(F32)
    R = db["R"].astype(F32)
    W = (lower.dims["W"] + upper.dims["W"]) / 2 + 2 * bulge
    D = (lower.dims["D"] + upper.dims["D"]) / 2 + 2 * bulge
    top_low = lower.top.astype(F32)
    n_low = lower.R[:, 2].astype(F32)
    bot_up = upper.bottom.astype(F32)
    n_up = upper.R[:, 2].astype(F32)
    if lower.name == "S1":
        top_low = lower.centre.astype(F32)
    yoff = F32(0.0)

    def sdf(p):
        q = (p - mid) @ R
        d2 = ellipse2d(q[:, 0], q[:, 1] - yoff, F32(W / 2), F32(D / 2))
        d2 = np.maximum(d2, -q[:, 1] - F32(0.45 * D))
        slab = np.maximum(-((p - top_low) @ n_low) - F32(1.5), (p - bot_up) @ n_up - F32(1.5))
        return extrude(d2 + 1.0, slab + 1.0) - 1.0

    r = max(W, D) / 2 + db["height"] + 6
    return Shape(sdf=sdf, lo=db["mid"] - r, hi=db["mid"] + r, value=hu, core_depth=0.0)


def tube_through(points: np.ndarray, radius, value: float, channel="", label=0, material=None,
                 cell=8.0, flat_end=False) -> Shape:
    """A tube of (per-point) radius along a polyline, with a candidate-segment lookup."""
    pts = np.asarray(points, dtype=np.float64)
    rad = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(pts),)).astype(F32)
    seg_r = np.maximum(rad[:-1], rad[1:])
    lo = pts.min(0) - rad.max() - 3
    hi = pts.max(0) + rad.max() + 3
    lookup = _segment_lookup(pts, lo, hi, cell)
    ab = pts[1:] - pts[:-1]
    seglen = np.sqrt((ab ** 2).sum(1))
    cum = np.concatenate([[0.0], np.cumsum(seglen)])
    total = F32(cum[-1])
    tang_end = (ab[-1] / seglen[-1]).astype(F32)
    tip = pts[-1].astype(F32)
    cumf = cum.astype(F32)
    _ = seg_r

    def sdf(p):
        cand = lookup(p)
        dist, t, _seg, _ = polyline(p, pts, cand)
        r = np.interp(t, cumf, rad).astype(F32)
        d = dist - r
        if flat_end:
            d = np.where(t >= total - 1e-3, np.maximum(d, (p - tip) @ tang_end), d)
        return d

    return Shape(sdf=sdf, lo=lo, hi=hi, value=value, material=material, channel=channel, label=label,
                 core_depth=0.0 if material is None else None)


def _segment_lookup(pts: np.ndarray, lo, hi, cell: float, k: int = 5):
    """Map points to the ``k`` segments nearest to their lookup cell (a coarse grid)."""
    nseg = len(pts) - 1
    lo = np.asarray(lo, dtype=np.float64)
    shape = np.maximum(np.ceil((np.asarray(hi) - lo) / cell).astype(int), 1)
    if nseg <= k:
        allc = np.arange(nseg)

        def lookup_all(p):
            return np.broadcast_to(allc, (len(p), nseg))
        return lookup_all
    centres = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * cell for n in shape], indexing="ij"), -1)
    centres = centres.reshape(-1, 3) + lo
    a = pts[:-1]
    ab = pts[1:] - pts[:-1]
    pa = centres[:, None, :] - a[None]
    h = np.clip((pa * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0, 1)
    d = pa - h[..., None] * ab
    d2 = (d * d).sum(-1)
    nearest = np.argpartition(d2, k - 1, axis=1)[:, :k].astype(np.int32)
    lo32 = lo.astype(F32)
    sh = shape

    def lookup(p):
        idx = np.floor((p - lo32) / F32(cell)).astype(np.int64)
        idx = np.clip(idx, 0, sh - 1)
        flat = (idx[:, 0] * sh[1] + idx[:, 1]) * sh[2] + idx[:, 2]
        return nearest[flat]

    return lookup


# --------------------------------------------------------------------------- sacrum / pelvis
#: S2-S5 below the S1 body: centre (x, y, z) and half sizes, sacral frame (mm)
_SACRAL_SEGMENTS = ((0, -6, -42, 40, 12, 14), (0, -15, -62, 30, 10, 12),
                    (0, -25, -80, 20, 8, 10), (0, -35, -94, 13, 7, 8))


def _sacral_fusion(q: np.ndarray, W: float, D: float, H: float) -> np.ndarray:
    """Bony bridges between the sacral segments. In an adult the five sacral vertebrae are
    one bone: their discs ossify from the rim (at most a thin residual S1/S2 line stays
    inside), so on CT no segment is parted from the next by a disc-high gap, which only
    the lumbosacral disc above S1 shows. Each segment is joined to the next by a bar as
    deep as the smaller of the two and 0.85 of its width (the sacral foramina notch the
    sides)."""
    segs = [(0.0, 0.0, -H / 2, W / 2, D / 2, H / 2), *_SACRAL_SEGMENTS]
    d = None
    for a, b in itertools.pairwise(segs):
        rx, ry = min(a[3], b[3]), min(a[4], b[4])
        bar = capsule(q, a[:3], b[:3], ry, scale=(ry / (0.85 * rx), 1.0, 1.0))
        d = bar if d is None else np.minimum(d, bar)
    return d


def sacrum_sdf_factory(lv: Level, rng, fused: dict):
    g = lv.dims
    W, D, H = g["W"], g["D"], g["H"]
    warp = _deformer(rng, 0.8)

    def local_sdf(q):
        q = warp(q)
        m = _mirror(q)
        body = body_sdf(q - np.array([0, 0, -H / 2], F32), W, D, H, waist=0.03, conc=0.8)
        ala = ellipsoid(m, (W / 2 + 4, -9.0, -H / 2 + 2), (g["ala"] - W / 2 - 2, 18.0, 14.0))
        d = smin(body, ala, 6.0)
        for (cx, cy, cz, rx, ry, rz) in _SACRAL_SEGMENTS:
            d = smin(d, ellipsoid(q, (cx, cy, cz), (rx, ry, rz)), 8.0)
        d = smin(d, _sacral_fusion(q, W, D, H), 4.0)
        sup = ellipsoid(m, (W / 2 - 6, -D / 2 - 12, 2.0), (6.0, 7.0, 9.0))
        crest = capsule(q, (0, -D / 2 - 14, -12), (0, -42, -70), 4.0)
        lam = plate(m, (W / 2 - 4, -D / 2 - 8, -20), (-(W / 2 - 4), -8, -2), (0, 4, 20), 5.0)
        d = smin(d, smin(sup, smin(crest, lam, 3.0), 3.0), 3.0)
        canal = capsule(q, (0, -D / 2 - 6, 5), (0, -30, -60), 6.0)
        d = smax(d, -canal, 1.5)
        for side, grade in (("right", fused.get("right", 0)), ("left", fused.get("left", 0))):
            if grade >= 3:  # bony bridge from the ala up to the fused transverse process
                s = 1.0 if side == "right" else -1.0
                d = smin(d, capsule(q, (s * (W / 2 + 12), -8, 0), (s * (W / 2 + 14), -8, 14), 7.0), 4.0)
        return d

    return (lambda p: local_sdf(lv.local(p))), local_sdf


def sacrum_shape(lv: Level, bone: BoneHU, rng, fused: dict) -> Shape:
    sdf, _ = sacrum_sdf_factory(lv, rng, fused)
    lo, hi = world_box(lv, np.array([-70, -60, -110]), np.array([70, 30, 30]), margin=4)
    return Shape(sdf=sdf, lo=lo, hi=hi, material=bone.material(), core_depth=None,
                 label=lv.vid if lv.labelled else 0, channel="vert" if lv.labelled else "")


def coccyx_shape(lv: Level, bone: BoneHU) -> Shape:
    pts = [(0, -38, -102, 8, 5, 4.5), (0, -40, -111, 6, 4, 3.5), (0, -39, -118, 4.5, 3.5, 3)]

    def sdf(p):
        q = lv.local(p)
        d = None
        for (cx, cy, cz, rx, ry, rz) in pts:
            e = ellipsoid(q, (cx, cy, cz), (rx, ry, rz))
            d = e if d is None else smin(d, e, 1.5)
        return d

    lo, hi = world_box(lv, np.array([-15, -50, -130]), np.array([15, -25, -90]), margin=3)
    return Shape(sdf=sdf, lo=lo, hi=hi, material=bone.material(), core_depth=None)


#: The iliac crest is highest laterally (about the L4 level, Tuffier's line) and runs down
#: medially and backwards to the posterior superior iliac spine at S1-S2 (Standring, Gray's
#: Anatomy, 41st ed., pelvic girdle): its top falls this many mm per mm nearer the midline
#: than ``CREST_PEAK_MM``, so that it passes 10-25 mm below and lateral of the L5 transverse
#: process, which the iliolumbar ligament, not bone, joins to it.
CREST_MEDIAL_SLOPE = 1.5
CREST_PEAK_MM = 80.0
#: Width of the sacroiliac joint space between the auricular surfaces (2-4 mm on CT in
#: adults: Vogler et al., Radiology 1984;151:433-437).
SI_JOINT_MM = 2.5


def pelvis_shape(lv: Level, bone: BoneHU, rng, p: dict, sacrum_sdf=None) -> Shape:
    """Iliac wings, acetabula, pubic and ischial rami, femoral heads and necks, in the
    sacral frame; the hip axis follows the pelvic incidence (Roussouly 2005).

    ``sacrum_sdf`` (world points -> mm): the ilium keeps :data:`SI_JOINT_MM` clear of
    the sacrum, the joint space of the sacroiliac joints (otherwise the two bones merge).
    """
    pi = np.radians(p["pi"])
    L = p["hip_dist"]
    hx = p["hip_half"]
    hy = L * np.sin(pi)
    hz = -L * np.cos(pi)
    rh = p["head_r"]
    W = lv.dims["W"]

    def side(q, s):
        m = q * np.array([s, 1, 1], F32)
        # ilium: shell of a big ellipsoid, clipped to the wing; its thickness varies as in
        # real hip bones: < 5 mm between the cortices in the middle of the wing (Wang M et al.,
        # iliac wing osseous fixation pathways, 200 CT hemipelves, 2020), thicker in a band
        # below the crest and thickest posteriorly toward the PSIS (Hwang K et al.,
        # J Craniofac Surg 1997;8:274-278: iliac thickness map of 58 hip bones)
        c = np.array([30.0, 22.0, hz + 45.0])
        top = crest_top(m, p["crest"])
        shell = np.abs(ellipsoid(m, c, (95.0, 70.0, 85.0))) - _ilium_half_thickness(m, top)
        # the distance to the sloping top, not its height difference: the SDF stays 1-Lipschitz
        below_top = (m[:, 2] - top) / F32(np.sqrt(1.0 + CREST_MEDIAL_SLOPE ** 2))
        clip = np.maximum.reduce([W / 2 + 4 - m[:, 0], below_top, (hz + 10) - m[:, 2],
                                  -40.0 - m[:, 1], m[:, 1] - (hy + 25)])
        wing = smax(shell, clip, 6.0)  # a fillet about the crest's half thickness: a rounded rim, not a cut
        si = capsule(m, (W / 2 + 6, -12, -14), (W / 2 + 22, -4, -40), 9.0)
        body = capsule(m, (W / 2 + 20, -6, -40), (hx - 8, hy - 8, hz + 18), 12.0)
        acet = smax(np.abs(np.sqrt(((m - (hx, hy, hz)) ** 2).sum(1)) - (rh + 5)) - 3.5,
                    (m[:, 0] - hx) - 4.0, 2.0)
        pubis = capsule(m, (hx - 10, hy + 12, hz - 10), (4.0, hy + 45, hz - 25), 8.0)
        isch = capsule(m, (hx - 6, hy - 20, hz - 10), (hx - 30, hy - 28, hz - 55), 10.0)
        ramus = capsule(m, (hx - 30, hy - 22, hz - 58), (8.0, hy + 40, hz - 40), 6.0)
        head = np.sqrt(((m - (hx, hy, hz)) ** 2).sum(1)) - rh
        neck = capsule(m, (hx, hy, hz), (hx + 42, hy - 8, hz - 22), rh * 0.62)
        troch = ellipsoid(m, (hx + 48, hy - 12, hz - 25), (14.0, 16.0, 18.0))
        shaft = capsule(m, (hx + 44, hy - 8, hz - 30), (hx + 52, hy - 2, hz - 220), 14.0)
        d = smin(wing, si, 5.0)
        d = smin(d, body, 8.0)
        d = smin(d, acet, 3.0)
        d = smin(d, smin(pubis, smin(isch, ramus, 5.0), 5.0), 4.0)
        fem = smin(head, smin(neck, smin(troch, shaft, 6.0), 6.0), 5.0)
        return np.minimum(d, fem)

    def sdf(pw):
        d = side(_mirror(lv.local(pw)), 1.0)
        if sacrum_sdf is None:
            return d
        # the joint only moves the surface: points already this far outside the pelvis stay
        # outside, and the lower bound d keeps the renderer's block skipping safe
        near = d < F32(SI_JOINT_MM + 2.0)
        d[near] = np.maximum(d[near], F32(SI_JOINT_MM) - sacrum_sdf(pw[near]))
        return d

    lo, hi = world_box(lv, np.array([-(hx + 80), -70, hz - 230]), np.array([hx + 80, hy + 70, p["crest"] + 10]), 4)
    return Shape(sdf=sdf, lo=lo, hi=hi, material=bone.material(cortex_mm=1.8, trab=bone.trabecular + bone.ilium_trab),
                 core_depth=None)


def crest_top(m: np.ndarray, crest: float) -> np.ndarray:
    """Height (mm, sacral frame) of the iliac crest above points ``m`` (mirrored to +x):
    ``crest`` laterally, falling by :data:`CREST_MEDIAL_SLOPE` per mm medial of
    :data:`CREST_PEAK_MM`."""
    medial = np.clip(F32(CREST_PEAK_MM) - m[:, 0], 0, None)
    return F32(crest) - F32(CREST_MEDIAL_SLOPE) * medial


def _ilium_half_thickness(m: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Half thickness (mm) of the iliac wing at points ``m`` (sacral frame, mirrored to +x)
    under the crest's local height ``top``: 2.4 mm in the thin middle of the wing, +4.5 mm
    over the 18 mm below the crest (crest ~14 mm thick), +8 mm toward the posterior ilium
    (~20 mm near the PSIS). The slopes stay below 0.3, so the SDF keeps a Lipschitz
    constant within the renderer's margin."""
    crest_band = np.clip(F32(1) - (top - m[:, 2]) / F32(18.0), 0, 1)
    posterior = np.clip((F32(-5.0) - m[:, 1]) / F32(30.0), 0, 1)
    return F32(2.4) + F32(4.5) * crest_band + F32(8.0) * posterior


# --------------------------------------------------------------------------- ribs
@dataclass
class Rib:
    vid: int
    side: str  # "left" / "right"
    points: np.ndarray  # centreline (patient frame), from the costovertebral joint
    length: float  # osseous length, mm (arc length of ``points``)
    cartilage: np.ndarray | None = None
    radius: float = 4.5


def cage_at(z_index: int, size: float) -> tuple[float, float]:
    a, b = M.CAGE[int(np.clip(z_index, 1, 12))]
    return a * size, b * size


def make_rib(lv: Level, side: str, rib_no: float, length: float | None, size: float, rng,
             drop_scale: float = 1.0, cartilage: bool = False, cage=None) -> Rib:
    """Centreline of one rib: a neck from the costovertebral joint to the tubercle, then an
    arc of the cage ellipse descending anteriorly. ``length`` None: use the usual fraction."""
    s = 1.0 if side == "right" else -1.0
    g = lv.dims
    A, B = cage if cage is not None else cage_at(round(rib_no), size)
    # joint at the posterolateral body, tubercle at the transverse-process tip
    joint = np.array([s * (g["W"] / 2 + 3.5), -g["D"] * 0.32, 0.25 * g["H"]])
    tub = np.array([s * (g["tp"] * 0.92), -g["D"] / 2 - g["pl"] - 6.0, 0.25 * g["H"] + 3.0])
    # cage ellipse whose posterior point lies just behind the tubercle
    yc = tub[1] - 6.0 + B
    th0 = np.arcsin(np.clip(abs(tub[0]) / A, 0, 0.99))
    th = np.linspace(th0, np.pi * 0.98, 160)
    drop = (18 + 5.5 * min(rib_no, 10)) * drop_scale
    x = s * A * np.sin(th)
    y = yc - B * np.cos(th)
    z = tub[2] + 4 * np.sin(th) - drop * ((th - th0) / (np.pi - th0)) ** 1.4
    arc = np.stack([x, y, z], 1)
    neck = np.linspace(joint, tub, 6)[:-1]
    local = np.concatenate([neck, arc])
    world = lv.to_world(local)
    seg = np.sqrt((np.diff(world, axis=0) ** 2).sum(1))
    cum = np.concatenate([[0], np.cumsum(seg)])
    if length is None:
        frac = M.RIB_FRACTION.get(round(rib_no), 0.3) * rng.uniform(0.93, 1.05)
        length = float(cum[-1] * frac)
    length = float(min(length, cum[-1] - 1))
    pts = _cut_polyline(world, cum, length)
    cart = None
    if cartilage:
        rest = world[cum > length]
        cart = np.concatenate([pts[-1:], rest[::4]]) if len(rest) > 4 else None
    r = 4.5 if rib_no >= 2 else 5.5
    return Rib(vid=lv.vid, side=side, points=pts, length=polyline_length(pts), cartilage=cart,
               radius=r * size ** 0.5)


#: radius of a stump or cervical rib's tube (mm)
STUB_RADIUS_MM = 3.8


def _stub_start_and_direction(lv: Level, side: str, direction: str) -> tuple[np.ndarray, np.ndarray]:
    s = 1.0 if side == "right" else -1.0
    g = lv.dims
    start = np.array([s * (g["W"] / 2 + 3.0), -g["D"] * 0.3, 0.2 * g["H"]])
    if direction == "cervical":
        dirv = np.array([s * 0.8, 0.35, -0.45])
    else:
        dirv = np.array([s * 0.85, -0.35, -0.25])
    return start, dirv / np.linalg.norm(dirv)


def cervical_rib_length(lv: Level, side: str, beyond_mm: float) -> float:
    """The length (mm, from its head) of a cervical rib whose free part runs ``beyond_mm``
    past C7's transverse process.

    A cervical rib is C7's costal element grown out; even the smallest reaches past the
    tip of the transverse process (Gruber's type I, the grading of 1869 still in use);
    short of that it is an ordinary process on CT. The rib's head lies at the side of the
    body and its first 15-30 mm run along the process, inside C7's label, so its length
    is where it clears the process plus the free part.
    """
    start, dirv = _stub_start_and_direction(lv, side, "cervical")
    g = lv.dims
    s = 1.0 if side == "right" else -1.0
    span = g["tp"] * lv.extra.get("tp_sides", {}).get(side, {}).get("scale", 1.0)
    a, b, r = cervical_process_axis(g, s, span)
    # the stub's forward bend is left out: it only carries the rib off the process sooner
    step = 0.25
    along = np.arange(0.0, 80.0, step, dtype=np.float32)
    touching = capsule((start + along[:, None] * dirv).astype(np.float32), a, b, r, scale=(1, 1, 0.9)) <= STUB_RADIUS_MM
    hits = np.flatnonzero(touching)
    exit_mm = float(along[hits[-1]]) + step if len(hits) else 0.0
    return exit_mm + float(beyond_mm)


def make_stub(lv: Level, side: str, length: float, direction: str = "lateral") -> Rib:
    """A short rib (stump rib or cervical rib) pointing laterally from the transverse process."""
    start, dirv = _stub_start_and_direction(lv, side, direction)
    # slight curve: bend anteriorly along the way
    t = np.linspace(0, 1, 12)[:, None]
    bend = np.array([0, 1.0, 0]) * (t ** 2) * length * 0.25
    local = start + dirv * t * length + bend
    world = lv.to_world(local)
    seg = np.sqrt((np.diff(world, axis=0) ** 2).sum(1))
    cum = np.concatenate([[0], np.cumsum(seg)])
    pts = _cut_polyline(world, cum, length)
    return Rib(vid=lv.vid, side=side, points=pts, length=polyline_length(pts), radius=STUB_RADIUS_MM)


def _cut_polyline(pts: np.ndarray, cum: np.ndarray, length: float, step: float = 5.0) -> np.ndarray:
    """The first ``length`` mm of a polyline, resampled every ~``step`` mm."""
    n = max(2, int(np.ceil(length / step)) + 1)
    t = np.linspace(0.0, length, n)
    return np.stack([np.interp(t, cum, pts[:, k]) for k in range(3)], 1)


def polyline_length(pts: np.ndarray) -> float:
    return float(np.sqrt((np.diff(pts, axis=0) ** 2).sum(1)).sum())


def rib_shape(rib: Rib, bone: BoneHU) -> Shape:
    r = np.full(len(rib.points), rib.radius)
    r[0] = rib.radius * 1.25  # rib head
    taper = np.linspace(1.0, 0.85, len(r))
    return tube_through(rib.points, r * taper, 0.0, channel="rib", label=rib.vid,
                        material=bone.material(cortex_mm=bone.rib_cortex_mm, trab=bone.trabecular + bone.rib_trab),
                        flat_end=True)


def cartilage_shape(rib: Rib, hu: float) -> Shape | None:
    if rib.cartilage is None or len(rib.cartilage) < 2:
        return None
    return tube_through(rib.cartilage, rib.radius * 0.85, hu)


# --------------------------------------------------------------------------- joints between vertebrae
#: Lipschitz bound of the bone SDFs assumed when sampling them coarsely (the engine's margin)
_JOINT_LIPSCHITZ = 1.5


def joint_contacts(sdf_a, sdf_b, lo, hi, gap: float, reach: float, steps=(8.0, 4.0, 2.0)) -> list:
    """World boxes ``(lo, hi)`` around the places where bones ``a`` and ``b`` (raw SDFs) overlap
    or come within ``gap`` of each other, inside the world box ``lo``-``hi``.

    The carving of :func:`carve_joints` is active where ``d_a + d_b < gap`` and matters where
    a bone is within ``reach`` of its surface. Both are tested on grids of cells (coarse to
    fine: a kept cell is split into the next step's cells) with the SDFs relaxed by their
    Lipschitz bound over a cell, so every such point lies in a kept cell of the finest grid.
    Each connected group of those cells gives one box (left and right facets come as two
    small boxes, not one spanning the canal); the coarse steps keep the cost to about 20 k
    SDF evaluations per pair of vertebrae (about 10 ms), whatever the voxel size.
    """
    from scipy import ndimage

    lo = np.asarray(lo, float)
    hi = np.asarray(hi, float)
    if np.any(hi <= lo):
        return []
    s = float(steps[0])
    n = np.maximum(np.ceil((hi - lo) / s).astype(int), 1)
    pts = (lo + (np.indices(n).reshape(3, -1).T + 0.5) * s).astype(F32)  # cell centres
    for k, s in enumerate(steps):
        if k:  # split each kept cell of the previous step into cells of this step
            m = round(steps[k - 1] / s)
            sub = ((np.indices((m, m, m)).reshape(3, -1).T + 0.5) * s - steps[k - 1] / 2).astype(F32)
            pts = (pts[:, None, :] + sub[None]).reshape(-1, 3)
        slack = F32(_JOINT_LIPSCHITZ * s * np.sqrt(3.0) / 2)
        da = sdf_a(pts)
        near = np.flatnonzero(da < reach + slack)
        db = sdf_b(pts[near])
        keep = (db < reach + slack) & (da[near] + db < gap + 2 * slack)
        pts = pts[near[keep]]
        if not len(pts):
            return []
    n = np.maximum(np.ceil((hi - lo) / s).astype(int), 1)
    idx = np.clip(np.floor((pts - lo) / s).astype(int), 0, n - 1)
    grid = np.zeros(n, bool)
    grid[tuple(idx.T)] = True
    comps, _ = ndimage.label(grid, structure=np.ones((3, 3, 3)))
    boxes = []
    for sl in ndimage.find_objects(comps):  # one slice triple per component (a handful)
        c0 = np.array([x.start for x in sl])
        c1 = np.array([x.stop for x in sl])
        boxes.append((lo + c0 * s, lo + c1 * s))
    return boxes


def carve_joints(shape: Shape, contacts: list, gap: float, reach: float) -> None:
    """Part ``shape`` from the bones it touches, in place: a joint space ``gap`` mm wide.

    ``contacts``: ``(sdf_other, boxes)`` per neighbour, ``sdf_other`` its raw SDF. Inside the
    boxes the bone becomes ``max(d, (d - d_other) / 2 + gap / 2)``: the half-difference of two
    distance fields is a distance to their bisector (the mid-surface of an overlap, where two
    facets meet face to face), so the neighbour, carved the same way with the roles swapped,
    keeps a cleft of at least ``gap`` mm from this bone (the difference is 2-Lipschitz). The
    shape's material sees the carved distance, so each bone gets its own cortex along the
    joint, and its label stops at its own joint surface. Only points within ``reach`` mm of
    the bone need the neighbour: farther out the carved distance is larger than the raw one
    (which the engine then takes as a lower bound) and paints nothing.
    """
    raw = shape.sdf
    half = F32(gap / 2)
    boxes = [(sdf_o, np.asarray(b0, F32), np.asarray(b1, F32)) for sdf_o, bx in contacts for b0, b1 in bx]
    if not boxes:
        return

    def sdf(p, raw=raw, boxes=boxes):
        d = raw(p)
        cand = np.flatnonzero(d < F32(reach))
        if not len(cand):
            return d
        pc = p[cand]
        base = d[cand]
        out = base.copy()
        for sdf_o, b0, b1 in boxes:
            inb = np.flatnonzero(np.all((pc >= b0) & (pc <= b1), axis=1))
            if len(inb):
                cut = F32(0.5) * (base[inb] - sdf_o(pc[inb])) + half
                out[inb] = np.maximum(out[inb], cut)
        d[cand] = out
        return d

    shape.sdf = sdf


def joint_shape(sdf_a, sdf_b, box, gap: float, hu: float) -> Shape:
    """The cleft between two carved bones, to paint before them: cartilage and synovial
    fluid wherever both raw bones are within ``gap / 2`` mm (the bones, painted after it,
    keep their part; what stays is the joint space, up to where the facets part)."""
    half = F32(gap / 2)
    b0, b1 = (np.asarray(b, F32) for b in box)

    def sdf(p):
        d = np.maximum(sdf_a(p), sdf_b(p)) - half
        outside = np.maximum(b0 - p, p - b1).max(1)  # stay inside the contact box
        return np.maximum(d, outside)

    return Shape(sdf=sdf, lo=np.asarray(box[0], float), hi=np.asarray(box[1], float), value=float(hu),
                 core_depth=0.0)
