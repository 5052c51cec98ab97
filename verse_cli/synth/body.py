"""Soft tissue around the spine: body outline with skin, fat and muscle, paraspinal
muscles and psoas, lungs, heart, liver, spleen, kidneys, stomach and bowel gas, the
aorta and vena cava (with or without contrast), the airway, the spinal canal content,
the head and face, and the patient table.

All shapes are defined in the patient frame (x to the right, y anterior, z superior)
from the placed spine, so organs move with scoliosis and tilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Level, tube_through
from .engine import Shape, capsule, ellipse2d, ellipsoid, side_rng
from .head import soft_shapes as head_soft_shapes

F32 = np.float32
_BACK = 0.92 * 0.9  # the flat back lies at cy - _BACK * b (see outline_sdf)


@dataclass
class Profile:
    """Body cross-section along z: centre (cx, cy) and half axes (a, b) in mm."""

    z: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    z_cap: float | None = None

    def at(self, z):
        if np.size(z) < 4096:  # layout queries (grid bounds, organ placement): exact
            return (np.interp(z, self.z, self.cx).astype(F32), np.interp(z, self.z, self.cy).astype(F32),
                    np.interp(z, self.z, self.a).astype(F32), np.interp(z, self.z, self.b).astype(F32))
        if not hasattr(self, "_tab"):  # rendering: a fine table
            self._tab = ZTable(self.z, [self.cx, self.cy, self.a, self.b])
        return self._tab(z)


class ZTable:
    """Piecewise-linear functions of z sampled on a fine uniform table (0.5 mm): one index and
    one gather per point for all of them (much cheaper than an ``np.interp`` each)."""

    def __init__(self, z, values, step: float = 0.5):
        z = np.asarray(z, float)
        order = np.argsort(z)
        z = z[order]
        self.z0 = float(z[0])
        n = max(int(np.ceil((z[-1] - z[0]) / step)) + 2, 2)
        zs = self.z0 + step * np.arange(n)
        self.inv = np.float32(1.0 / step)
        self.tab = np.stack([np.interp(zs, z, np.asarray(v, float)[order]) for v in values], 1).astype(F32)
        self.n = n

    def __call__(self, z):
        t = (np.asarray(z, F32) - np.float32(self.z0)) * self.inv
        np.clip(t, 0, self.n - 1.001, out=t)
        i = t.astype(np.int32)
        w = (t - i)[:, None]
        lo = self.tab[i]
        out = lo + (self.tab[i + 1] - lo) * w
        return tuple(out[:, k] for k in range(out.shape[1]))


def spine_track(levels: list[Level]):
    """Vertebral-body centres sorted by z (for interpolation along the body)."""
    pts = np.array([lv.centre for lv in levels])
    order = np.argsort(pts[:, 2])
    return pts[order], [levels[i] for i in order]


def body_profile(levels: list[Level], hab: dict) -> Profile:
    pts, lv_sorted = spine_track(levels)
    zs, cxs, cys, as_, bs = [], [], [], [], []
    fat = hab["fat_mm"]
    for p, lv in zip(pts, lv_sorted):
        r = lv.region
        if r == "C":
            a, b, back = hab["neck"], hab["neck"] * 0.95, 62.0 + 0.3 * fat
            if lv.name == "C7":
                a = hab["neck"] * 1.6
        elif r == "T":
            k = lv.extra.get("t_index", 6)
            a = hab["chest_a"] * (0.8 + 0.2 * min(k, 6) / 6) + (40 if k <= 2 else 0) * hab["shoulders"]
            b = hab["chest_b"] * (0.85 + 0.15 * min(k, 6) / 6)
            back = 78.0 + 0.9 * fat
            cage = lv.extra.get("cage")
            if cage is not None:  # the chest wall covers the ribs: >= 12 mm of soft tissue
                _, ca, cb, cyc, _ = cage
                a = max(a, ca + 12.0)  # the outline adds ``fat`` to ``a`` below
                b = max(b, (cyc + cb + 12.0 + fat - p[1] + back) / (1.0 + _BACK))
        elif r == "L":
            a, b, back = hab["abd_a"], hab["abd_b"], 88.0 + 0.9 * fat
        else:
            a, b, back = hab["pelvis_a"], hab["pelvis_b"], 70.0 + 0.9 * fat
        zs.append(p[2])
        cxs.append(p[0] * 0.5)
        cys.append(p[1] - back + _BACK * b)
        as_.append(a + fat)
        bs.append(b)
    zs = np.array(zs)
    # extend below the sacrum (pelvis, thighs) and above the top level
    z = np.concatenate([[zs[0] - 400], zs, [zs[-1] + 400]])
    ext = lambda v: np.concatenate([[v[0]], v, [v[-1]]])
    c1 = next((lv for lv in levels if lv.name == "C1"), None)
    cap = None if c1 is None else float(c1.centre[2] + 30.0)
    return Profile(z, ext(np.array(cxs)), ext(np.array(cys)), ext(np.array(as_)), ext(np.array(bs)), cap)


def outline_sdf(prof: Profile, shrink: float = 0.0):
    sh = F32(shrink)
    cap = None if prof.z_cap is None else F32(prof.z_cap)

    def sdf(p):
        cx, cy, a, b = prof.at(p[:, 2])
        x = p[:, 0] - cx
        y = p[:, 1] - cy
        bb = np.where(y > 0, b, b * F32(0.92))
        d = ellipse2d(x, y, np.maximum(a - sh, 5), np.maximum(bb - sh, 5))
        d = np.maximum(d, -(y + bb * F32(0.9)) + sh)
        if cap is not None:  # the neck ends where the head (its own shape) begins
            d = np.maximum(d, p[:, 2] - cap)
        return d

    return sdf


def _box(prof: Profile, zlo, zhi, margin=10.0):
    sel = (prof.z >= zlo - 50) & (prof.z <= zhi + 50)
    if not sel.any():
        sel = np.ones_like(prof.z, bool)
    a = prof.a[sel].max() + margin
    b = prof.b[sel].max() + margin
    lo = np.array([prof.cx[sel].min() - a, prof.cy[sel].min() - b, zlo])
    hi = np.array([prof.cx[sel].max() + a, prof.cy[sel].max() + b, zhi])
    return lo, hi


#: codes of the ``organ`` label channel: where the vessel trees and the parenchyma texture go
LUNG, LIVER = 1, 2


def soft_tissue(levels: list[Level], hab: dict, hu: dict, rng: np.random.Generator, zr, sk,
                organs: dict | None = None) -> list[Shape]:
    """Soft-tissue shapes in paint order (skin/fat first, organs last). ``organs``, when
    given, receives the geometry of the lungs and liver (for their vessel trees)."""
    organs = {} if organs is None else organs
    prof = body_profile(levels, hab)
    zlo, zhi = zr
    lo, hi = _box(prof, zlo, zhi, 12)
    # soft-tissue HU spread drawn on a side stream (the main stream decides the anatomy); fat
    # in real CT: about -70 to -130 HU, visceral fat a little denser than subcutaneous fat
    sr = side_rng(rng, 0xB0D1)
    fat = hu["fat"] + float(sr.uniform(-12, 8))
    vfat = fat + float(sr.uniform(-5, 20))
    shapes = [Shape(sdf=outline_sdf(prof), lo=lo, hi=hi, value=fat, core_depth=0.0)]
    shapes.append(Shape(sdf=outline_sdf(prof, hab["fat_mm"]), lo=lo, hi=hi, value=hu["muscle"], core_depth=0.0))
    # the visceral cavity in front of the spine (retroperitoneum and thorax contents)
    pts, lv_sorted = spine_track(levels)
    spine_y = pts[:, 1]
    spine_z = pts[:, 2]
    depth = np.array([lv.dims["D"] for lv in lv_sorted])
    wall = hab["fat_mm"] + hab["muscle_mm"]
    base_out = outline_sdf(prof, wall)
    sz = spine_z.astype(F32)
    front = (spine_y - depth * 0.2).astype(F32)

    def cavity(p):
        fy = np.interp(p[:, 2], sz, front).astype(F32)
        return np.maximum(base_out(p), fy - p[:, 1])

    shapes.append(Shape(sdf=cavity, lo=lo, hi=hi, value=vfat, core_depth=0.0))
    retro = _retroperitoneum(levels, prof, base_out)
    if retro is not None:  # below the ribs and above the pelvis the back of the trunk is fat and muscles
        shapes.append(Shape(sdf=retro[0], lo=retro[1], hi=retro[2], value=vfat, core_depth=0.0))
    by_name = {lv.name: lv for lv in levels}
    # fat planes (thicker in obese patients): between the trunk wall and the organs, and
    # around the kidneys; drawn on their own side stream, after every other draw's stream
    fr = side_rng(rng, 0xFA7)
    planes = {"wall": float(fr.uniform(1.5, 4.0) + 0.06 * hab["fat_mm"]),
              "renal": float(fr.uniform(3.0, 8.0) + 0.2 * hab["fat_mm"]), "fat": vfat}
    shapes += _abdomen(levels, by_name, prof, hab, hu, rng, cavity, organs, planes)
    shapes += _thorax(levels, by_name, prof, hab, hu, rng, cavity, organs)
    shapes += _vessels(levels, by_name, hu, rng)
    shapes += _muscles(levels, hab, hu, sr)
    shapes += _head(levels, by_name, hab, hu, rng)
    shapes.append(_table(prof, hab, hu, zr))
    return shapes


def _level_z(by_name, names, default):
    for n in names:
        if n in by_name:
            return by_name[n].centre
    return default


def _thorax(levels, by_name, prof, hab, hu, rng, cavity, organs):
    th = [lv for lv in levels if lv.region == "T"]
    if not th:
        return []
    top = th[0].centre
    bottom = th[-1].centre
    ribs_cage = [lv.extra["cage"] for lv in th if "cage" in lv.extra]
    if not ribs_cage:
        return []
    cz = np.array([c[0] for c in ribs_cage], F32)
    ca = np.array([c[1] for c in ribs_cage], F32)
    cb = np.array([c[2] for c in ribs_cage], F32)
    cyc = np.array([c[3] for c in ribs_cage], F32)
    ccx = np.array([c[4] for c in ribs_cage], F32)
    order = np.argsort(cz)
    cz, ca, cb, cyc, ccx = cz[order], ca[order], cb[order], cyc[order], ccx[order]
    n_t = len(th)
    dome_lv = th[min(n_t - 1, round(n_t * 0.7))]
    z_dome = F32(dome_lv.centre[2] + hab["dome_shift"])
    z_apex = F32(top[2] + 25)
    sp = np.array([lv.centre for lv in th])
    spo = np.argsort(sp[:, 2])
    sz, sx, sy = sp[spo, 2].astype(F32), sp[spo, 0].astype(F32), sp[spo, 1].astype(F32)
    inset = F32(hab["intercostal_mm"])

    def lungs(p):
        z = p[:, 2]
        a = np.interp(z, cz, ca).astype(F32) - inset
        b = np.interp(z, cz, cb).astype(F32) - inset
        yc = np.interp(z, cz, cyc).astype(F32)
        xc = np.interp(z, cz, ccx).astype(F32)
        x = p[:, 0] - xc
        y = p[:, 1] - yc
        d = ellipse2d(x, y, a, b)
        # apex: the cage narrows into a dome above the first rib
        d = np.maximum(d, z - z_apex - F32(15) * (1 - np.clip((x / a) ** 2, 0, 1)))
        # diaphragm: dome highest centrally (right higher), deep posterior recesses
        r2 = np.clip((x / a) ** 2 + ((y - b * F32(0.2)) / b) ** 2, 0, 1.5)
        zd = z_dome + F32(hab["right_dome"]) * (x > 0) - F32(55) * r2
        d = np.maximum(d, zd - z)
        # mediastinum and spine column
        mx = np.interp(z, sz, sx).astype(F32)
        my = np.interp(z, sz, sy).astype(F32)
        half = F32(18) + F32(28) * np.clip((p[:, 1] - my) / F32(60), 0, 1)
        d = np.maximum(d, half - np.abs(p[:, 0] - mx))
        return d

    lo = np.array([ccx.min() - ca.max() - 10, cyc.min() - cb.max() - 10, bottom[2] - 90])
    hi = np.array([ccx.max() + ca.max() + 10, cyc.max() + cb.max() + 10, top[2] + 60])
    shapes = [Shape(sdf=lungs, lo=lo, hi=hi, value=hu["lung"], core_depth=0.0, channel="organ", label=LUNG)]
    hz = th[min(n_t - 1, round(n_t * 0.45))].centre  # the hila, about T5-T6
    organs["lung"] = {"sdf": lungs, "hu": hu["lung"], "hilum_z": float(hz[2]), "mid": (float(hz[0]), float(hz[1])),
                      "y_back": float((cyc - cb).min()), "y_front": float((cyc + cb).max())}
    # heart: an ellipsoid resting on the diaphragm, to the left and anterior
    mid = th[min(n_t - 1, int(n_t * 0.6))].centre
    hc = np.array([mid[0] - 25, mid[1] + 70 * hab["size"], mid[2] - 5])
    hr = np.array([62, 50, 58]) * hab["size"]
    shapes.append(Shape(sdf=lambda p: ellipsoid(p, hc, hr), lo=hc - hr - 5, hi=hc + hr + 5, value=hu["heart"]))
    if hu.get("blood") is not None and hu["blood"] > hu["heart"] + 40:
        inner = hr * 0.6
        shapes.append(Shape(sdf=lambda p: ellipsoid(p, hc + (5, 5, 5), inner), lo=hc - hr, hi=hc + hr,
                            value=hu["blood"]))
    return shapes


def _abdomen(levels, by_name, prof, hab, hu, rng, cavity, organs, planes):
    shapes = []
    lum = [lv for lv in levels if lv.region == "L"]
    th = [lv for lv in levels if lv.region == "T"]
    if not lum and not th:
        return shapes
    ref = lum[0] if lum else th[-1]
    lz = ref.centre
    cx, cy, a, b = [float(v[0]) for v in prof.at(np.array([lz[2]], F32))]
    s = hab["size"]
    # liver: right upper quadrant below the right dome
    upper = th[-3].centre if len(th) >= 3 else lz + (0, 0, 60)
    lc = np.array([cx + a * 0.35, cy + b * 0.05, upper[2] - 10])
    lr = np.array([a * 0.55, b * 0.7, 85 * s])
    gap = planes["wall"]
    liver = _clipped(lambda p: ellipsoid(p, lc, lr), cavity, lc - lr, lc + lr, hu["liver"], gap)
    liver.channel, liver.label = "organ", LIVER
    shapes.append(liver)
    organs["liver"] = {"sdf": liver.sdf, "centre": lc, "radii": lr}
    sc = np.array([cx - a * 0.55, cy - b * 0.2, upper[2] - 5])
    sr = np.array([35, 55, 50]) * s
    shapes.append(_clipped(lambda p: ellipsoid(p, sc, sr), cavity, sc - sr, sc + sr, hu["spleen"], gap))
    # kidneys beside L1-L3, posterior
    kref = by_name.get("L2", ref)
    for side in (1, -1):
        kc = kref.centre + np.array([side * (kref.dims["W"] / 2 + 38 * s), -8, 8 * side])
        kr = np.array([27, 24, 55]) * s
        # perirenal fat: the kidney sits in its own fat capsule (Gerota's fascia)
        fr = kr + planes["renal"]
        shapes.append(Shape(sdf=lambda p, kc=kc, fr=fr: ellipsoid(p, kc, fr), lo=kc - fr, hi=kc + fr,
                            value=planes["fat"]))
        shapes.append(Shape(sdf=lambda p, kc=kc, kr=kr: ellipsoid(p, kc, kr), lo=kc - kr, hi=kc + kr,
                            value=hu["kidney"]))
        if hu["kidney_medulla"] != hu["kidney"]:
            shapes.append(Shape(sdf=lambda p, kc=kc, kr=kr: ellipsoid(p, kc, kr * 0.6), lo=kc - kr, hi=kc + kr,
                                value=hu["kidney_medulla"]))
    # stomach (fluid with an air cap) and bowel loops with gas
    gc = np.array([cx - a * 0.35, cy + b * 0.45, upper[2] - 25])
    gr = np.array([45, 35, 45]) * s
    shapes.append(_clipped(lambda p: ellipsoid(p, gc, gr), cavity, gc - gr, gc + gr, hu["bowel"], gap))
    if rng.random() < 0.7:
        ac = gc + np.array([0, gr[1] * 0.55, 0])
        ar = gr * np.array([0.7, 0.4, 0.7])
        shapes.append(_clipped(lambda p: ellipsoid(p, ac, ar), cavity, ac - ar, ac + ar, -1000.0, gap))
    sac = by_name.get("S1")
    z_lo = (sac.centre[2] - 60) if sac is not None else lz[2] - 150
    z_hi = upper[2] - 60
    nb = int(rng.integers(6, 26))
    for _ in range(nb):
        z = rng.uniform(z_lo, z_hi)
        cxz, cyz, az, bz = [float(v[0]) for v in prof.at(np.array([z], F32))]
        c = np.array([cxz + rng.uniform(-0.7, 0.7) * az, cyz + rng.uniform(-0.1, 0.8) * bz, z])
        r = rng.uniform(8, 28, 3) * s
        val = -1000.0 if rng.random() < hab["gas"] else hu["bowel"] + rng.uniform(-20, 25)
        shapes.append(_clipped(lambda p, c=c, r=r: ellipsoid(p, c, r), cavity, c - r, c + r, val, gap))
    if sac is not None:
        bc = sac.to_world([0, 90, -95])
        br = np.array([40, 35, 35]) * s
        shapes.append(_clipped(lambda p: ellipsoid(p, bc, br), cavity, bc - br, bc + br, hu["bladder"], gap))
    return shapes


def _clipped(sdf, cavity, lo, hi, value, gap: float = 0.0):
    """An organ inside the visceral cavity, ``gap`` mm clear of its wall (a fat plane)."""
    g = F32(gap)
    return Shape(sdf=lambda p: np.maximum(sdf(p), cavity(p) + g), lo=lo - 3, hi=hi + 3, value=value, core_depth=0.0)


def _vessels(levels, by_name, hu, rng):
    th = [lv for lv in levels if lv.region == "T"]
    lum = [lv for lv in levels if lv.region == "L"]
    pts = []
    for lv in th[3:] + lum[:-1]:
        pts.append(lv.to_world([-lv.dims["W"] * 0.35, lv.dims["D"] / 2 + 10, 0]))
    shapes = []
    if len(pts) >= 2:
        pts = np.array(pts)
        r = np.linspace(12, 9, len(pts))
        shapes.append(tube_through(pts, r, hu["aorta"]))
        if hu.get("calc", 0) > 0:
            k = rng.integers(2, 8)
            for i in rng.choice(len(pts), size=min(k, len(pts)), replace=True):
                c = pts[i] + rng.normal(0, 1, 3) * np.array([8, 8, 5])
                rr = rng.uniform(1.2, 2.5, 3)
                shapes.append(Shape(sdf=lambda p, c=c, rr=rr: ellipsoid(p, c, rr), lo=c - 4, hi=c + 4,
                                    value=hu["calc"]))
        ivc = np.array([lv.to_world([lv.dims["W"] * 0.45, lv.dims["D"] / 2 + 8, 0]) for lv in th[-2:] + lum[:-1]])
        if len(ivc) >= 2:
            shapes.append(tube_through(ivc, 10.0, hu["ivc"]))
    if lum and "S1" in by_name:
        last = lum[-1]
        bif = last.to_world([0, last.dims["D"] / 2 + 10, last.dims["H"]])
        for s in (1, -1):
            end = by_name["S1"].to_world([s * 60, 40, -70])
            shapes.append(tube_through(np.array([bif, end]), 6.5, hu["aorta"]))
    return shapes


def _retroperitoneum(levels, prof: Profile, base_out):
    """The inside of the trunk wall between the lowest ribs and the iliac crests (kidneys,
    psoas, quadratus lumborum and the paraspinal muscles lie in fat there), or None."""
    th = [lv for lv in levels if lv.region == "T"]
    lum = [lv for lv in levels if lv.region == "L"]
    if not lum:
        return None
    z_top = F32((th[-1].centre[2] - 10) if th else lum[0].centre[2] + 60)
    z_bot = F32(lum[-1].centre[2] - 5)
    cx = F32(np.mean([lv.centre[0] for lv in lum]))

    def sdf(p):
        r = ((p[:, 0] - cx) / F32(150)) ** 2
        top = p[:, 2] - (z_top - F32(35) * np.clip(r, 0, 1))  # the lowest ribs reach further down laterally
        bot = (z_bot + F32(25) * np.clip(r, 0, 1)) - p[:, 2]  # the iliac crests rise laterally
        return np.maximum(base_out(p), np.maximum(top, bot))

    lo, hi = _box(prof, float(z_bot) - 5, float(z_top) + 5, 5)
    return sdf, lo, hi


def _track(levels, local_pt, a_of, b_of):
    """Centres (world x, y) and half axes along z of a muscle following the spine: one
    ellipse per level at ``local_pt(lv)`` in the vertebra's frame, interpolated in z."""
    rows = []
    for lv in levels:
        c = lv.to_world(local_pt(lv))
        rows.append((c[2], c[0], c[1], a_of(lv), b_of(lv)))
    rows.sort()
    return np.array(rows, F32).T


def _ellipse_tube(track, z0, z1, taper: float = 8.0):
    z, x, y, a, b = track
    z0, z1, tp = F32(z0), F32(z1), F32(taper)
    tab = ZTable(z, [x, y, a, b])

    def sdf(p):
        pz = p[:, 2]
        cx, cy, aa, bb = tab(pz)
        # ends: the cross-section shrinks over ``taper`` mm beyond z0 / z1
        shrink = np.clip(np.maximum(z0 - pz, pz - z1) / tp, 0, 1)
        d = ellipse2d(p[:, 0] - cx, p[:, 1] - cy, np.maximum(aa * (1 - shrink), 2), np.maximum(bb * (1 - shrink), 2))
        return np.maximum(d, np.maximum(z0 - tp - pz, pz - z1 - tp))

    r = float(max(a.max(), b.max())) + 5
    lo = np.array([x.min() - r, y.min() - r, z0 - taper - 2])
    hi = np.array([x.max() + r, y.max() + r, z1 + taper + 2])
    return sdf, lo, hi


def _paraspinal(levels, hab, hu, sr) -> list[Shape]:
    """Multifidus and erector spinae on each side of the spinous processes, and the quadratus
    lumborum beside the lumbar transverse processes, each a tube of elliptic section that
    follows the spine. Their HU is the muscle HU less a random fatty infiltration (common
    in older patients: paraspinal muscle at 20-50 HU in real CT)."""
    spine = [lv for lv in levels if lv.region in ("C", "T", "L") and lv.name != "C1"]
    if len(spine) < 2:
        return []
    bulk = hab["muscle_bulk"]
    infil = float(sr.uniform(0, 22)) if sr.random() < 0.75 else 0.0
    shapes = []
    zs = [lv.centre[2] for lv in spine]
    zt, zb = max(zs), min(zs)
    if levels[-1].region == "S":
        zb = min(zb, levels[-1].centre[2] - 10)

    def y_lam(lv):
        g = lv.dims
        return -g["D"] / 2 - g["cd"] - g.get("lam_t", 5.0) / 2

    def width(lv):  # lateral extent of the whole complex on one side
        k = {"C": 0.6, "T": 0.75, "L": 0.9}.get(lv.region, 0.9)
        return k * lv.dims["tp"] * bulk

    def depth(lv):  # half of its antero-posterior depth
        g = lv.dims
        return (0.5 * g["sl"] * np.cos(np.radians(g["sa"])) + 7) * bulk

    def y_tp(lv):
        return -lv.dims["D"] / 2 - lv.dims["pl"]

    gap = float(sr.uniform(0.5, 2.0))
    for s in (1, -1):
        side_hu = hu["muscle"] - infil + float(sr.uniform(-4, 4))
        # multifidus: on the laminae, against the spinous processes
        mf = _track(spine, lambda lv, s=s: [s * (3 + 0.28 * width(lv)), y_lam(lv) - 0.75 * depth(lv), 0],
                    lambda lv: 0.28 * width(lv), lambda lv: depth(lv))
        # erector spinae (longissimus, iliocostalis): behind the transverse processes
        es = _track(spine, lambda lv, s=s: [s * (3 + 0.56 * width(lv) + gap + 0.42 * width(lv)),
                                            y_tp(lv) - 0.85 * depth(lv), 0],
                    lambda lv: 0.42 * width(lv), lambda lv: 0.9 * depth(lv))
        for tr, dv in ((mf, 0.0), (es, float(sr.uniform(-6, 6)))):
            sdf, lo, hi = _ellipse_tube(tr, zb, zt)
            shapes.append(Shape(sdf=sdf, lo=lo, hi=hi, value=side_hu + dv, core_depth=0.0))
    lum = [lv for lv in levels if lv.region == "L"]
    if len(lum) >= 2:
        for s in (1, -1):
            ql = _track(lum, lambda lv, s=s: [s * (lv.dims["tp"] + 4), -lv.dims["D"] / 2 - 4, 0],
                        lambda lv: 0.35 * lv.dims["tp"] * bulk, lambda lv: 9.0 * bulk)
            z0 = min(lum[0].centre[2], lum[-1].centre[2])
            z1 = max(lum[0].centre[2], lum[-1].centre[2]) + 20
            sdf, lo, hi = _ellipse_tube(ql, z0, z1, 25.0)
            shapes.append(Shape(sdf=sdf, lo=lo, hi=hi, value=hu["muscle"] - infil * 0.5, core_depth=0.0))
    return shapes


def _muscles(levels, hab, hu, sr):
    shapes = _paraspinal(levels, hab, hu, sr)
    psoas_hu = hu["muscle"] - float(sr.uniform(-4, 10))
    lum = [lv for lv in levels if lv.region == "L"]
    th = [lv for lv in levels if lv.region == "T"]
    if lum:
        top = th[-1] if th else lum[0]
        for s in (1, -1):
            a = top.to_world([s * top.dims["W"] * 0.45, -5, 0])
            b = lum[-1].to_world([s * (lum[-1].dims["W"] / 2 + 25), 5, -40])
            r0, r1 = 6.0, 22.0 * hab["muscle_bulk"]

            def psoas(p, a=a, b=b, r0=r0, r1=r1):
                ab = b - a
                t = np.clip(((p - a) @ ab) / (ab @ ab), 0, 1).astype(F32)
                return capsule(p, a, b, 0.0) - (F32(r0) + F32(r1 - r0) * np.sqrt(t))

            lo = np.minimum(a, b) - r1 - 5
            hi = np.maximum(a, b) + r1 + 5
            shapes.append(Shape(sdf=psoas, lo=lo, hi=hi, value=psoas_hu))
    return shapes


def _head(levels, by_name, hab, hu, rng):
    if "C1" not in by_name:
        return []
    return head_soft_shapes(by_name["C1"], hab["size"], hu)


def _table(prof: Profile, hab, hu, zr) -> Shape:
    back = float(np.min(prof.cy - prof.b * _BACK)) if len(prof.cy) else -200.0
    y0 = back - hab["table_gap"]
    t = hab["table_mm"]
    zlo, zhi = zr

    def sdf(p):
        y = p[:, 1]
        d = np.maximum(np.abs(y - F32(y0 - t / 2)) - F32(t / 2), np.abs(p[:, 0]) - F32(250))
        return d

    lo = np.array([-260, y0 - t - 5, zlo])
    hi = np.array([260, y0 + 5, zhi])
    return Shape(sdf=sdf, lo=lo, hi=hi, value=hu["table"], core_depth=0.0)


def canal_shape(levels: list[Level], hu: float) -> Shape:
    pts, rad = [], []
    for lv in levels:
        if lv.region == "S":
            continue
        g = lv.dims
        if lv.name == "C1":
            pts.append(lv.to_world([0, -22, 0]))
            rad.append(11.0)
            continue
        pts.append(lv.to_world([0, -g["D"] / 2 - g["cd"] / 2, 0]))
        rad.append(min(g["cw"], g["cd"]) / 2 - 0.5)
    sac = levels[-1]
    pts.append(sac.to_world([0, -sac.dims["D"] / 2 - 6, -10]))
    rad.append(7.0)
    return tube_through(np.array(pts), np.array(rad), hu)
