"""One synthetic case from a seed: anatomy, rendering, acquisition and ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core import labels as L
from ..core.centroids import Centroids, body_centroids
from ..core.geometry import world_bounds
from . import acquisition as acq
from . import anatomy as A
from . import body as B
from . import head as H
from . import morphometry as M
from . import variants as V
from . import vessels as VS
from .engine import Canvas, Shape, capsule, ellipsoid, side_rng

F32 = np.float32
_FUSED = 250  # temporary label of a Castellvi 3/4 vertebra (removed before output)
_SACRUM = 251  # temporary label of the sacrum: VerSe does not segment it (data paper, Limitations)


@dataclass
class Case:
    """A rendered case. ``ct`` int16 HU; ``mask`` uint8 VerSe ids of fully visible
    vertebrae; ``rib_mask`` uint8 (rib voxels carry the id of their vertebra);
    ``face_mask`` uint8 or None; ``centroids`` body centroids in voxel coordinates;
    ``variants`` the ground-truth dict; ``meta`` acquisition and anatomy details."""

    ct: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    centroids: Centroids
    variants: dict
    face_mask: np.ndarray | None
    rib_mask: np.ndarray
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- anatomy
def _habitus(rng, size):
    fat = float(rng.choice([rng.uniform(4, 15), rng.uniform(15, 45)], p=[0.5, 0.5]))
    return {
        "size": size, "fat_mm": fat, "muscle_mm": float(rng.uniform(8, 20)),
        "neck": float(rng.uniform(50, 65) * size), "shoulders": float(rng.uniform(0.3, 1.0)),
        "chest_a": float(rng.uniform(135, 165) * size), "chest_b": float(rng.uniform(95, 120) * size),
        "abd_a": float(rng.uniform(125, 165) * size + fat * 0.5), "abd_b": float(rng.uniform(90, 125) * size + fat * 0.6),
        "pelvis_a": float(rng.uniform(150, 185) * size), "pelvis_b": float(rng.uniform(100, 125) * size),
        "dome_shift": float(rng.uniform(-15, 20)), "right_dome": float(rng.uniform(5, 25)),
        "intercostal_mm": float(rng.uniform(6, 12)), "gas": float(rng.uniform(0.2, 0.8)),
        "muscle_bulk": float(rng.uniform(0.7, 1.2)), "table_gap": float(rng.uniform(0, 15)),
        "table_mm": float(rng.uniform(8, 40)),
    }


def _tissue_hu(rng) -> dict:
    phase = str(rng.choice(["none", "arterial", "venous"], p=[0.5, 0.2, 0.3]))
    muscle = float(rng.uniform(32, 60))
    hu = {
        "fat": float(rng.uniform(-120, -80)), "visceral_fat": float(rng.uniform(-110, -60)), "muscle": muscle,
        "lung": float(rng.uniform(-920, -840)), "heart": float(rng.uniform(30, 50)),
        "liver": float(rng.uniform(48, 66)), "spleen": float(rng.uniform(40, 55)),
        "kidney": float(rng.uniform(25, 40)), "bowel": float(rng.uniform(10, 40)),
        "bladder": float(rng.uniform(0, 15)), "aorta": float(rng.uniform(35, 50)), "ivc": float(rng.uniform(35, 50)),
        "brain": float(rng.uniform(28, 40)), "disc": float(rng.uniform(70, 100)), "csf": float(rng.uniform(5, 30)),
        "cartilage": float(rng.uniform(80, 160)), "table": float(rng.uniform(-400, 150)),
        "calc": float(rng.uniform(300, 900)) if rng.random() < 0.3 else 0.0, "blood": None, "phase": phase,
    }
    hu["kidney_medulla"] = hu["kidney"]
    if phase == "arterial":
        hu["aorta"] = float(rng.uniform(220, 420))
        hu["blood"] = hu["aorta"] * 0.9
        hu["kidney"] = float(rng.uniform(140, 220))
        hu["kidney_medulla"] = float(rng.uniform(40, 80))
        hu["spleen"] = float(rng.uniform(90, 140))
        hu["liver"] += 15
    elif phase == "venous":
        hu["aorta"] = float(rng.uniform(140, 220))
        hu["ivc"] = float(rng.uniform(110, 170))
        hu["blood"] = hu["aorta"]
        hu["liver"] = float(rng.uniform(90, 125))
        hu["kidney"] = float(rng.uniform(140, 210))
        hu["kidney_medulla"] = hu["kidney"] - 15
        hu["spleen"] = float(rng.uniform(100, 130))
    return hu


def _build_levels(rng, spec, size) -> list[A.Level]:
    levels = []
    counts = spec["counts"]
    disc_factor = rng.uniform(0.85, 1.15)
    for name, vid, region in V.level_names(counts):
        if region == "S":
            d = dict(M.dims_at(24))
            d.update({k: v * size for k, v in M.SACRUM.items()})
        elif name == "C1":
            d = dict(M.dims_at(3))
            d.update(M.C1)
            d.update({"W": 30.0, "D": 18.0, "H": 10.0, "disc": 3.0})
        else:
            idx = int(name[1:])
            d = dict(M.dims_at(M.position_of(region, idx, counts[{"C": "cervical", "T": "thoracic",
                                                                      "L": "lumbar"}[region]])))
            if name == "C2":
                d.update(M.C2)
                d.update({"sl": 30.0, "sh": 13.0, "sa": 20.0, "disc": 2.5})
        jit = {k: (v * size * rng.normal(1.0, 0.04) if k not in ("sa", "conv") else v + rng.normal(0, 4))
               for k, v in d.items() if isinstance(v, float)}
        d.update(jit)
        if "disc" in d:
            d["disc"] = d["disc"] * disc_factor / size
        if region == "C" and name not in ("C1", "C7"):
            d["bifid"] = True
        d["waist"] = float(rng.uniform(0.03, 0.1))
        d["conc"] = float(rng.uniform(0.5, 2.0))
        lv = A.Level(name=name, vid=vid, region=region, dims=d)
        if region == "T":
            lv.extra["t_index"] = idx
        levels.append(lv)
    return levels


def _degenerate(rng, levels, meta):
    """Low disc height, osteophytes, Schmorl nodes (dark endplate notches) and sclerosis."""
    if rng.random() > 0.35:
        return
    severity = rng.uniform(0.3, 1.0)
    lower = [lv for lv in levels if lv.region in ("L", "T") and lv.name not in ("T1", "T2")]
    for lv in lower:
        if rng.random() < 0.4 * severity:
            lv.dims["disc"] *= rng.uniform(0.3, 0.75)
        if rng.random() < 0.5 * severity and lv.region in ("L", "T"):
            g = lv.dims
            osts = []
            for _ in range(int(rng.integers(1, 4))):
                ang = rng.uniform(-2.2, 2.2)
                zz = g["H"] / 2 * rng.choice([-1, 1])
                osts.append((g["W"] / 2 * np.sin(ang), g["D"] / 2 * np.cos(ang), zz, rng.uniform(2.0, 4.5)))
            lv.extra["osteophytes"] = osts
        if rng.random() < 0.2 * severity:
            lv.extra["sclerosis"] = float(rng.uniform(2.0, 5.0))
        if rng.random() < 0.15 * severity:
            lv.extra["schmorl"] = (rng.uniform(-5, 5), rng.uniform(-5, 5), float(rng.choice([-1, 1])),
                                   rng.uniform(2.5, 5))
    meta["degeneration"] = round(float(severity), 2)


def _fractures(rng, levels, meta):
    """Osteoporotic compression fractures (wedge, biconcave, crush), frequent in VerSe."""
    if rng.random() > 0.22:
        return
    cand = [lv for lv in levels if lv.region in ("T", "L") and lv.extra.get("t_index", 5) >= 5]
    picked = rng.choice(len(cand), size=min(len(cand), int(rng.integers(1, 4))), replace=False)
    kinds = []
    for i in picked:
        lv = cand[int(i)]
        kind = str(rng.choice(["wedge", "biconcave", "crush"], p=[0.55, 0.25, 0.2]))
        g = lv.dims
        if kind == "wedge":
            g["wedge"] = float(rng.uniform(0.2, 0.55))
        elif kind == "biconcave":
            g["conc"] = float(g["H"] * rng.uniform(0.12, 0.25))
        else:
            g["H"] *= float(rng.uniform(0.55, 0.8))
            g["wedge"] = float(rng.uniform(0.0, 0.25))
        lv.extra["trab_shift"] = float(rng.uniform(20, 120))  # impacted, sclerotic trabeculae
        kinds.append(f"{lv.name}:{kind}")
    meta["fractures"] = kinds


def _spine_shape(rng) -> dict:
    ss = rng.uniform(28, 50)
    shape = {"ss": ss, "ll": ss + rng.uniform(5, 22), "tk": rng.uniform(18, 55), "cl": rng.uniform(0, 40),
             "rot_gain": rng.uniform(0.2, 0.6), "pt": rng.uniform(5, 25)}
    if rng.random() < 0.25:
        curves = [(rng.uniform(8, 45) * rng.choice([-1, 1]), rng.uniform(0.3, 0.75), rng.uniform(0.08, 0.2))]
        if rng.random() < 0.4:
            curves.append((-curves[0][0] * rng.uniform(0.5, 1.0), rng.uniform(0.1, 0.4), rng.uniform(0.08, 0.15)))
        shape["scoliosis"] = curves
    return shape


# --------------------------------------------------------------------------- ribs
def _ribs(rng, spec, levels, size, hab):
    ribs: list[A.Rib] = []
    th = [lv for lv in levels if lv.region == "T"]
    n_t = len(th)
    chest = hab["chest_a"] / (150 * size)
    depth = hab["chest_b"] / (108 * size)
    stumps = {(s["where"], s["side"]): s for s in spec["stumps"]}
    keys = sorted(M.CAGE)
    for i, lv in enumerate(th, start=1):
        rib_no = M.position_of("T", i, n_t) - 7
        Acage = float(np.interp(rib_no, keys, [M.CAGE[k][0] for k in keys])) * size * chest
        Bcage = float(np.interp(rib_no, keys, [M.CAGE[k][1] for k in keys])) * size * depth
        g = lv.dims
        tub_y = -g["D"] / 2 - g["pl"] - 6.0
        centre = lv.to_world([0, tub_y - 6 + Bcage, 0.25 * g["H"]])
        lv.extra["cage"] = (float(centre[2]), Acage, Bcage, float(centre[1]), float(centre[0]))
        for side in ("left", "right"):
            st = stumps.get(("last_thoracic", side)) if i == n_t else None
            if st is not None:
                rib = A.make_stub(lv, side, st["length_mm"])
                st["vertebra"] = lv.name
                st["length_mm"] = rib.length  # the rendered polyline is the ground truth
            else:
                rib = A.make_rib(lv, side, rib_no, None, size, rng, drop_scale=rng.uniform(0.8, 1.2),
                                 cartilage=rib_no <= 10.3, cage=(Acage, Bcage))
            ribs.append(rib)
    by = {lv.name: lv for lv in levels}
    for side, beyond in spec["cervical_ribs"].items():
        ribs.append(A.make_stub(by["C7"], side, A.cervical_rib_length(by["C7"], side, beyond), "cervical"))
    for (where, side), st in stumps.items():
        if where == "L1" and "L1" in by:
            rib = A.make_stub(by["L1"], side, st["length_mm"])
            ribs.append(rib)
            st["vertebra"] = "L1"
            st["length_mm"] = rib.length
    return ribs


# --------------------------------------------------------------------------- Castellvi
def _castellvi(levels, spec):
    cv = spec["castellvi"]
    lumb = [lv for lv in levels if lv.region == "L"]
    if not lumb or max(cv["left"], cv["right"]) == 0:
        return None
    last = lumb[-1]
    sac = levels[-1]
    sides = {}
    for side in ("left", "right"):
        grade = cv[side]
        s = 1.0 if side == "right" else -1.0
        if grade == 0:
            continue
        # the ala's upper surface just lateral of the S1 body, in the last lumbar frame
        ala_top = sac.to_world([s * (sac.dims["W"] / 2 + 14), -9.0, -sac.dims["H"] / 2 + 16.0])
        if grade == 1:
            # enlarged but clear of the ala (Castellvi I): a process that touched it would
            # show a grade II or III while the ground truth says I
            sides[side] = {"height": 21.0 + 3.0 * (len(levels) % 3), "thick": 1.3, "drop": 2.0,
                           "min_gap": 4.0, "contact": ala_top}
            continue
        g = last.dims
        q = (ala_top - last.centre) @ last.R
        height = 24.0
        zp = 0.12 * g["H"]
        gap = 1.2 if grade == 2 else -4.0
        # capsule half-height in z is thick * height / 2; bottom = zp - drop - that (refined later)
        drop = zp - 1.6 * height / 2 - (q[2] + gap)
        sides[side] = {"height": height, "thick": 1.6, "drop": float(drop), "scale": 1.0, "gap": gap, "forward": 12.0,
                       "contact": ala_top}
    last.extra["tp_sides"] = sides
    fused = max(cv["left"], cv["right"]) >= 3
    if fused:
        last.labelled = False
    return last.name if fused else None


# --------------------------------------------------------------------------- main entry
def generate_case(seed: int, region: str = "random", variant: str | None = None, spacing=None,
                  orientation: str | None = None, scale: float = 1.0, max_voxels: int | None = None) -> Case:
    """Render one synthetic spine CT with its ground truth, deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Same seed and options give the same arrays.
    region : {"random", "cervical", "thoracic", "lumbar", "thoracolumbar", "whole"}
    variant : str or None
        Force a variant (see :data:`verse_cli.synth.variants.VARIANTS`); None draws
        variants at enriched prevalence; "none" gives a normal anatomy.
    spacing : (sx, sy, sz) or None
        Voxel size in mm along the array axes; None draws 0.3-1 mm in-plane and
        0.5-3 mm between slices.
    orientation : str or None
        Axis codes of the array (e.g. "PIR", "RAS"); None draws one.
    scale : float
        Size factor for fast cases: the grid is capped at 40 M x scale^3 voxels.
    max_voxels : int or None
        Explicit cap on the grid size. When the field of view needs more voxels, the
        finest axes are coarsened first (an explicit ``spacing`` is always honoured).
    """
    region = acq.check_region(region)
    spacing = acq.check_spacing(spacing)
    orientation = acq.check_orientation(orientation)
    variant = V.check_variant(variant)
    if not (0.05 <= float(scale) <= 4):
        from ..core.errors import UsageError

        raise UsageError(f"scale must lie between 0.05 and 4, got {scale}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    meta: dict = {"seed": int(seed)}
    spec = V.sample_spec(rng, variant)
    size = float(rng.uniform(0.86, 1.14))
    levels = _build_levels(rng, spec, size)
    _degenerate(rng, levels, meta)
    _fractures(rng, levels, meta)
    shape_params = _spine_shape(rng)
    A.build_spine(levels, rng, shape_params)
    tilt = (rng.normal(0, 3), rng.normal(0, 3), rng.normal(0, 4))
    A.align_upright(levels, tilt)
    fused = _castellvi(levels, spec)  # needs the final frames: the process reaches for the ala
    hab = _habitus(rng, size)
    hu = _tissue_hu(rng)
    bone = A.bone_hu(rng, age_factor=float(rng.uniform(0, 1)))
    ribs = _ribs(rng, spec, levels, size, hab)

    names = [lv.name for lv in levels]
    region_used = acq.pick_region(rng, region)
    i0, i1 = acq.region_window(rng, names, region_used)
    top, bot = levels[i0], levels[i1]
    h_top = top.dims["H"] + 10
    h_bot = 100.0 if bot.region == "S" else bot.dims["H"] + 10
    z_top = top.centre[2] + (15 if top.name == "C1" else 0)
    z_bot = bot.centre[2] - (45 if bot.region == "S" else 0)
    zr = acq.z_window(z_bot, z_top, rng, rng.random() < 0.35, rng.random() < 0.35, h_bot, h_top)
    if top.name == "C1":
        zr = (zr[0], zr[1] + float(rng.uniform(0, 110)))
    win = levels[i0:i1 + 1]
    boxes = [A.world_box(lv, *A.local_box(lv)) for lv in win]
    vlo = np.min([b[0] for b in boxes], 0) - 8
    vhi = np.max([b[1] for b in boxes], 0) + 8
    prof = B.body_profile(levels, hab)
    zz = np.linspace(zr[0], zr[1], 20)
    cx, cy, a, b = prof.at(zz.astype(F32))
    blo = np.array([float((cx - a).min()), float((cy - b).min()) - hab["table_mm"] - hab["table_gap"], zr[0]])
    bhi = np.array([float((cx + a).max()), float((cy + b).max()), zr[1]])
    grid = acq.choose_grid(rng, zr, (vlo, vhi), (blo, bhi), spacing, orientation, scale, max_voxels,
                           spine_axis=top.centre - bot.centre)
    meta.update({"region": region_used, "plane": grid.plane, "orientation": grid.codes,
                 "oblique_deg": round(grid.oblique_deg, 2), "contrast": hu["phase"], "size": round(size, 3)})

    scanner = acq.sample_scanner(rng)
    bone.fit_to_grid(np.sqrt((grid.affine[:3, :3] ** 2).sum(0)), scanner.blur_mm)
    canvas = Canvas(grid.shape, grid.affine, background=-1000.0)
    organs: dict = {}
    shapes: list[Shape] = B.soft_tissue(levels, hab, hu, rng, zr, size, organs)
    shapes.append(B.canal_shape(levels, hu["csf"]))
    for lv in levels:
        db = lv.extra.get("disc_below")
        if db and lv.name not in ("C1", "C2"):
            shapes.append(A.disc_shape(db, hu["disc"] + rng.uniform(-8, 8)))
    sac = levels[-1]
    pelvis = {"pi": shape_params["ss"] + shape_params["pt"], "hip_dist": 105 * size * rng.uniform(0.92, 1.08),
              "hip_half": 88 * size * rng.uniform(0.92, 1.08), "head_r": 23 * size * rng.uniform(0.9, 1.1),
              "crest": float(rng.uniform(20, 45) * size)}
    fused_cv = {s: spec["castellvi"][s] for s in ("left", "right")}
    sac_shape = A.sacrum_shape(sac, bone, rng, fused_cv)
    sac_shape.channel, sac_shape.label = "vert", _SACRUM
    first_bone = len(shapes)  # the joint spaces go here, under the bones that part them
    shapes.append(A.pelvis_shape(sac, bone, rng, pelvis, sacrum_sdf=sac_shape.sdf))
    shapes.append(sac_shape)
    shapes.append(A.coccyx_shape(sac, bone))
    chain = []
    for lv in levels[:-1]:
        sh = A.vertebra_shape(lv, bone, rng, deform_mm=0.3 if lv.extra.get("tp_sides") else rng.uniform(0.4, 1.3))
        if not lv.labelled:
            sh.channel, sh.label = "vert", _FUSED
        shapes.append(sh)
        chain.append((lv, sh))
        if lv.extra.get("tp_sides"):
            meta["castellvi_gap_mm"] = _calibrate_castellvi(lv, sh, sac_shape, rng)
        if "schmorl" in lv.extra:
            shapes.append(_schmorl(lv, hu["disc"]))
    chain.append((sac, sac_shape))
    shapes[first_bone:first_bone] = _joints(chain, canvas, rng, meta)
    for lv, sh in chain:
        if lv.extra.get("tp_sides"):  # the contact as painted, after the joints were carved
            meta["castellvi_rendered_gap_mm"] = _contact_gaps(lv, sh, sac_shape)
    for rib in ribs:
        shapes.append(A.rib_shape(rib, bone))
        cart = A.cartilage_shape(rib, hu["cartilage"])
        if cart is not None:
            shapes.insert(len(shapes) - 1, cart)
    shapes += _chest_wall(levels, ribs, bone, size, rng)
    shapes += _arms(levels, hab, hu, bone, rng)
    shapes += _skull(levels, bone, hu, size)
    metal_pts, metal_shapes = _metal(rng, levels, meta)
    shapes += metal_shapes
    face = _face_label(levels, size)
    if face is not None:
        shapes.append(face)
    for sh in shapes:
        canvas.paint(sh)
    hu_img = canvas.to_array(canvas.hu)
    _organ_detail(hu_img, canvas, organs, hu, rng)
    hu_img = acq.tissue_texture(hu_img, grid, rng, hu["fat"], hu["muscle"])
    ct = acq.form_image(hu_img, grid, scanner, rng, metal_pts)
    meta.update({"kernel": scanner.kernel, "noise_hu": round(scanner.noise_hu, 1)})

    vert = canvas.to_array(canvas.labels["vert"])
    rib_mask = canvas.to_array(canvas.labels["rib"])
    face_mask = canvas.to_array(canvas.labels["face"])
    in_fov = _fov_states(vert, levels)
    vert[(vert == _FUSED) | (vert == _SACRUM)] = 0
    for lv in levels:
        if in_fov.get(lv.name) == "cut":
            vert[vert == lv.vid] = 0
    offset = np.eye(4)
    offset[:3, 3] = rng.uniform([-40, -260, -1400], [40, 40, 200])
    affine = offset @ grid.affine
    ctd = body_centroids(vert, affine)
    rib_info = _rib_states(ribs, levels, grid)
    gt = V.variants_json(spec, [lv.name for lv in levels], in_fov, rib_info, fused)
    meta["spacing"] = [round(float(s), 4) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))]
    meta["ribs"] = [{"vertebra": L.name(r.vid), "side": r.side, "length_mm": round(r.length, 2),
                     "points": (r.points @ offset[:3, :3].T + offset[:3, 3]).round(3).tolist()} for r in ribs]
    return Case(ct=ct, mask=vert.astype(np.uint8), affine=affine, centroids=ctd, variants=gt,
                face_mask=face_mask if face_mask.any() else None, rib_mask=rib_mask, meta=meta)


def _calibrate_castellvi(lv, vshape: Shape, sshape: Shape, rng) -> dict:
    """Move each enlarged transverse process until its measured gap to the sacral ala is
    the target: 1.2 mm (grade 2, pseudarthrosis <= 2 mm) or -4 mm (grade 3, fused); a grade-1
    process closer than ``min_gap`` (4 mm) is raised until it is that far from the ala.

    For distance fields the gap between two solids is twice the minimum over points of
    max(d1, d2) (reached midway between them; negative when they overlap); it is
    measured on a dense point cloud around the contact. A grade II or III contact is the
    process's own, lateral of its root (:func:`_process_part`).
    """
    out = {}
    for side, tp in lv.extra["tp_sides"].items():
        if "gap" not in tp and "min_gap" not in tp:
            continue
        # grade I draws its probe points from its own generator: the case's stream is unchanged
        pts = _contact_probes(lv, side, tp, rng if "gap" in tp else np.random.default_rng(0))
        sdf = _contact_sdf(vshape, lv, side, tp)
        gap = None
        for _ in range(6):
            gap = _solid_gap(pts, sdf, sshape.sdf)
            if "min_gap" in tp and gap >= tp["min_gap"]:
                break
            err = gap - tp.get("gap", tp.get("min_gap"))

            if abs(err) < 0.15:
                break
            tp["drop"] = float(tp["drop"] + err)
        out[side] = round(gap, 2) if gap is not None else None
    return out


def _contact_gaps(lv, vshape: Shape, sshape: Shape) -> dict:
    """Per side with a Castellvi contact, the gap between the process and the ala (mm,
    negative where they overlap), measured as :func:`_calibrate_castellvi` does, on probe
    points from a generator of its own: the case's stream is unchanged."""
    return {side: round(_solid_gap(_contact_probes(lv, side, tp, np.random.default_rng(0)),
                                   _contact_sdf(vshape, lv, side, tp), sshape.sdf), 2)
            for side, tp in lv.extra["tp_sides"].items()}


def _contact_sdf(vshape: Shape, lv, side: str, tp: dict):
    """What of the vertebra a side's contact with the ala is measured on: the process lateral
    of its root for grades II and III (a ``gap`` target), the whole vertebra for grade I,
    which must stay clear of the ala anywhere (a ``min_gap``)."""
    return _process_part(vshape.sdf, lv, side) if "gap" in tp else vshape.sdf


#: a grade II or III contact lies this far lateral of the last lumbar body's side at least (mm)
PROCESS_CONTACT_MM = 10.0


def _process_part(sdf, lv, side: str):
    """The vertebra's ``sdf`` cut off PROCESS_CONTACT_MM lateral of its body's side, on ``side``.

    A tall enlarged process is tall at its root too, and where the sacrum sits high its
    root met the ala first, just beside the body and behind it. The calibration, which moves
    only the process's tip, then measured that root contact, never reached its target and
    left the tip raised far from the ala (synth 88739, 88738: 14-17 mm up): a pseudarthrosis
    drawn where readers look for the facet joints, not between the process and the ala."""
    s = F32(1.0 if side == "right" else -1.0)
    edge = F32(lv.dims["W"] / 2 + PROCESS_CONTACT_MM)

    def process(p):
        return np.maximum(sdf(p), edge - s * lv.local(p)[:, 0])

    return process


def _contact_probes(lv, side: str, tp: dict, gen) -> np.ndarray:
    """Probe points (world mm) in an 18 mm box around a process's contact with the ala,
    lateral of the body and the facet joints."""
    s = 1.0 if side == "right" else -1.0
    pts = (np.asarray(tp["contact"], float) + gen.uniform(-18, 18, (40000, 3))).astype(F32)
    return pts[lv.local(pts)[:, 0] * s > lv.dims["W"] / 2 + 6]


def _solid_gap(pts: np.ndarray, sdf_a, sdf_b) -> float:
    """The gap between two solids near ``pts``: twice the least max(d1, d2) (reached midway
    between them; negative where they overlap)."""
    return 2.0 * float(np.maximum(sdf_a(pts), sdf_b(pts)).min())


def _joints(chain, canvas: Canvas, rng, meta) -> list[Shape]:
    """Joint spaces between neighbouring vertebrae (and L5/S1): facets, and in the neck the
    uncovertebral and atlanto-axial contacts. The bone SDFs of two neighbours overlap or
    abut there, which painted as one continuous bone with no cortex between them; each
    bone is now carved back to a cleft of ``gap`` mm (1-1.5 mm, as on CT) filled with
    cartilage and fluid, and gets its own cortex along it (see ``A.carve_joints``).

    The cleft is unlabelled in the vertebra mask, as in the VerSe expert masks, where the
    joint space between two articular processes is background: the mask keeps to what the
    CT shows as bone, and a net learns that a facet ends at its cortex.

    Gap and fill are drawn from a side stream: the main stream, and with it every other
    anatomy, acquisition and ground-truth draw, stays as it was. Returns the joint shapes,
    to paint before the bones. Must run after ``_calibrate_castellvi`` (it measures the
    raw transverse process against the ala).
    """
    sr = side_rng(rng, 0xFACE7)
    gap = float(sr.uniform(1.0, 1.5))
    # what fills the cleft before the ramp and PSF blur it with the cortex on both sides
    # (from_masks' 60-350 HU is that blurred mix in one voxel; here the blur adds it)
    fill = float(sr.uniform(60, 200))
    reach = max(gap, canvas.ramp)  # farther out a bone's occupancy is zero, carved or not
    glo, ghi = world_bounds(canvas.shape, canvas.affine)
    glo, ghi = glo - 2 * reach, ghi + 2 * reach
    raw = [sh.sdf for _, sh in chain]
    contacts: list[list] = [[] for _ in chain]
    joints: list[Shape] = []
    for i in range(len(chain) - 1):
        (la, sa), (lb, sb) = chain[i], chain[i + 1]
        lo = np.maximum.reduce([sa.lo, sb.lo, glo])
        hi = np.minimum.reduce([sa.hi, sb.hi, ghi])
        a, b = raw[i], raw[i + 1]
        if lb.region == "S":
            # lumbosacral facets only: a transverse process on the ala is a Castellvi grade
            # (II: its own calibrated gap, III/IV: fused bone), not a facet joint. Filtering
            # whole contact boxes is not enough: a fused process's contact joins the facet's
            # in one box, whose carving then gave the fusion a cleft (a grade II on CT)
            a, b = (_medial_part(sdf, la, la.dims["W"] / 2 + 6) for sdf in (a, b))
        # the boxes also hold the fill's soft edge (its ramp reaches past the cleft proper)
        boxes = A.joint_contacts(a, b, lo, hi, gap + canvas.ramp, reach)
        contacts[i].append((b, boxes))
        contacts[i + 1].append((a, boxes))
        joints += [A.joint_shape(a, b, box, gap, fill) for box in boxes]
    for (_, sh), con in zip(chain, contacts):
        A.carve_joints(sh, con, gap, reach)
    meta["joint_gap_mm"] = round(gap, 2)
    return joints


def _medial_part(sdf, lv, half_width: float):
    """``sdf`` cut off ``half_width`` mm either side of ``lv``'s midline. The cut-off is a
    plane pair's distance, so the result is still 1-Lipschitz, as the contact search needs."""
    def medial(p):
        return np.maximum(sdf(p), np.abs(lv.local(p)[:, 0]) - F32(half_width))

    return medial


def _first_inside(sdf, cands: np.ndarray, margin: float) -> np.ndarray | None:
    """The first of the candidate points at least ``margin`` mm inside ``sdf``, or None."""
    ok = np.flatnonzero(sdf(cands.astype(F32)) < -margin)
    return cands[ok[0]] if len(ok) else None


def _lung_trees(lung: dict, sr) -> list:
    """Pulmonary arteries and veins: per lung eleven lobar and segmental trunks (4-6.5 mm) leaving
    the hilum (at T5-T6, beside the mediastinum) up, down, forward and out, and three of them
    back into the dorsal lung, which in supine CT is the best perfused and holds the most."""
    mx, my = lung["mid"]
    trees = []
    for s in (1.0, -1.0):
        cands = np.array([[mx + s * dx, my + 40.0, lung["hilum_z"]] for dx in (40, 48, 56, 64, 75, 90, 105)])
        hub = _first_inside(lung["sdf"], cands, 14.0)
        if hub is None:
            continue
        dirs = np.array([[0.45 * s, 0.0, 1.0], [1.0 * s, 0.25, 0.15], [0.5 * s, -0.1, -1.0],
                         [0.45 * s, -0.7, -0.6], [0.6 * s, 0.7, -0.3], [0.7 * s, -0.5, 0.4],
                         [0.3 * s, 0.5, 0.8], [0.3 * s, -0.3, -1.0],
                         [0.3 * s, -1.0, -0.5], [0.5 * s, -1.0, 0.2], [0.2 * s, -0.8, -1.0]])
        dirs = dirs + sr.normal(0, 0.15, dirs.shape)
        roots = hub + 3.0 * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
        trees.append(VS.grow_tree(sr, roots, dirs, sr.uniform(4.0, 6.5, len(dirs)), lung["sdf"], hub))
    return trees


def _liver_trees(liver: dict, sr) -> list:
    """Portal veins from the porta hepatis (medial, low, posterior) and hepatic veins
    converging on the vena cava (medial, high, posterior); liver vessels under ~1 mm do
    not show on CT."""
    c, r = np.asarray(liver["centre"], float), np.asarray(liver["radii"], float)
    trees = []
    for off, dirs in (((-0.45, -0.15, -0.25), [[1, 0.2, 0.4], [1, -0.3, -0.2], [0.3, 0.6, 0.5], [0.4, -0.2, 0.9]]),
                      ((-0.35, -0.35, 0.55), [[0.9, 0.3, -0.4], [0.4, 0.6, -0.6], [0.1, 0.2, -1.0]])):
        cands = c + np.array([[off[0] * f, off[1] * f, off[2] * f] for f in (1.0, 0.8, 0.6, 0.4, 0.2)]) * r
        hub = _first_inside(liver["sdf"], cands, 7.0)
        if hub is None:
            continue
        dirs = np.array(dirs, float) + sr.normal(0, 0.15, (len(dirs), 3))
        roots = hub + 2.0 * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
        trees.append(VS.grow_tree(sr, roots, dirs, sr.uniform(3.5, 5.5, len(dirs)), liver["sdf"], hub, min_r=1.0))
    return trees


def _organ_detail(img: np.ndarray, canvas: Canvas, organs: dict, hu: dict, rng) -> None:
    """Lung parenchyma and vessel trees (lungs, liver), in place on the rendered HU.

    Drawn from a side stream: the main stream, and with it the anatomy, acquisition and
    ground truth of every seed, is unchanged."""
    if not organs:
        return
    sr = side_rng(rng, 0x1E55E1)
    lab = canvas.to_array(canvas.labels["organ"])
    if "lung" in organs:
        lung = organs["lung"]
        VS.lung_detail(img, lab, B.LUNG, canvas.affine, lung, sr)
        blood = hu["blood"] if hu.get("blood") is not None else hu["aorta"]
        for tree in _lung_trees(lung, sr):
            VS.draw_tree(img, lab, B.LUNG, tree, canvas.affine, canvas.ramp, blood, lung["hu"])
    if "liver" in organs:
        # unenhanced blood is 10-20 HU below liver; venous phase veins are brighter than liver
        if hu["phase"] == "venous":
            val = hu["ivc"]
        else:
            val = hu["liver"] - float(sr.uniform(10, 22))
        for tree in _liver_trees(organs["liver"], sr):
            VS.draw_tree(img, lab, B.LIVER, tree, canvas.affine, canvas.ramp, val, hu["liver"], 12.0)
        VS.organ_texture(img, lab, B.LIVER, canvas.affine, hu["liver"], 12.0, float(sr.uniform(3, 7)), sr)


def _fov_states(vert: np.ndarray, levels) -> dict:
    present = set(np.unique(vert).tolist()) - {0}
    faces = [vert[0], vert[-1], vert[:, 0], vert[:, -1], vert[:, :, 0], vert[:, :, -1]]
    edge = set()
    for f in faces:
        edge |= set(np.unique(f).tolist())
    out = {}
    for lv in levels:
        lab = _SACRUM if lv.region == "S" else (lv.vid if lv.labelled else _FUSED)
        if lab in present:
            out[lv.name] = "cut" if lab in edge else "visible"
    return out


def _rib_states(ribs, levels, grid) -> dict:
    inv = np.linalg.inv(grid.affine)
    shape = np.array(grid.shape)
    sp = np.sqrt((grid.affine[:3, :3] ** 2).sum(0))
    out: dict = {}
    for r in ribs:
        vox = r.points @ inv[:3, :3].T + inv[:3, 3]
        marg = (r.radius * 1.3) / sp
        inside = np.all((vox >= marg - 0.5) & (vox <= shape - 1 + 0.5 - marg))
        # a rib wholly outside the image is not in view, not "cut" (no point within its radius)
        seen = np.any(np.all((vox >= -marg - 0.5) & (vox <= shape - 0.5 + marg), axis=1))
        name = L.name(r.vid)
        out.setdefault(name, {})[r.side] = (r.length, "present" if inside else ("cut" if seen else "not_in_view"))
    return out


def _schmorl(lv, disc_hu) -> Shape:
    x, y, sgn, r = lv.extra["schmorl"]
    c = lv.to_world([x, y, sgn * (lv.dims["H"] / 2 - r * 0.5)])
    return Shape(sdf=lambda p: np.sqrt(((p - c.astype(F32)) ** 2).sum(1)) - F32(r), lo=c - r - 2, hi=c + r + 2,
                 value=disc_hu + 20)


def _texture(rng, img, grid) -> np.ndarray:
    """Low-amplitude smooth heterogeneity of soft tissue (organs are not flat)."""
    from scipy import ndimage

    small = rng.standard_normal(tuple(max(2, s // 8) for s in img.shape)).astype(F32)
    small = ndimage.gaussian_filter(small, 1.0)
    small *= F32(rng.uniform(3, 9) / max(float(small.std()), 1e-6))
    zoom = [s / m for s, m in zip(img.shape, small.shape)]
    field = ndimage.zoom(small, zoom, order=1, mode="nearest", grid_mode=False)[: img.shape[0], : img.shape[1],
                                                                                : img.shape[2]]
    soft = (img > -200) & (img < 150)
    return np.where(soft, field, F32(0)).astype(F32)


def _chest_wall(levels, ribs, bone, size, rng) -> list[Shape]:
    """Sternum (where the costal cartilages meet), clavicles and scapulae."""
    th = [lv for lv in levels if lv.region == "T"]
    if len(th) < 8:
        return []
    shapes: list[Shape] = []
    ends = {}
    for r in ribs:
        if r.cartilage is not None and len(r.cartilage) >= 2 and r.vid in [lv.vid for lv in th[:7]]:
            ends.setdefault(r.vid, []).append(r.cartilage[-1])
    mids = [np.mean(v, axis=0) for k, v in sorted(ends.items(), key=lambda kv: L.rank(kv[0])) if len(v) == 2]
    mat = bone.material(cortex_mm=1.2, trab=bone.trabecular - 20)
    if len(mids) >= 3:
        mids = np.array(mids)
        unit = lambda v: v / max(np.linalg.norm(v), 1e-6)
        top = mids[0] + unit(mids[0] - mids[1]) * 25 * size  # manubrium above the first cartilages
        bottom = mids[-1] + unit(mids[-1] - mids[-2]) * 40 * size  # xiphoid
        line = np.concatenate([top[None], mids, bottom[None]])
        lateral = np.array([1.0, 0.0, 0.0])
        for off in (-7.0, 7.0):
            shapes.append(A.tube_through(line + lateral * off * size, 6.5 * size, 0.0, material=mat))
        # clavicles from the manubrium to the acromion, above the first ribs
        t1 = th[0]
        for s in (1.0, -1.0):
            a = top + np.array([s * 14 * size, 0, 6])
            tip = t1.to_world([s * (95 + rng.uniform(-5, 15)) * size, -10, 28])
            mid1 = a + (tip - a) * 0.35 + np.array([0, 12, 8])
            mid2 = a + (tip - a) * 0.75 + np.array([0, -6, 6])
            shapes.append(A.tube_through(np.array([a, mid1, mid2, tip]), 7.0 * size, 0.0,
                                         material=bone.material(cortex_mm=2.0)))
    # scapulae on the posterior chest wall
    t2, t3, t7 = th[1], th[2], th[min(6, len(th) - 1)]
    for s in (1.0, -1.0):
        sup = t2.to_world([s * 50 * size, -45 * size, 10])
        inf = t7.to_world([s * 85 * size, -50 * size, 0])
        gle = t3.to_world([s * 125 * size, -15 * size, 15])
        n = np.cross(gle - sup, inf - sup)
        n /= np.linalg.norm(n)

        def tri(p, sup=sup, inf=inf, gle=gle, n=n):
            from .engine import plate

            d = plate(p, sup, gle - sup, inf - sup, 6.0)
            edge = np.cross(n, inf - gle)
            edge /= np.linalg.norm(edge)
            if edge @ (sup - gle) < 0:
                edge = -edge
            return np.maximum(d, -((p - gle.astype(F32)) @ edge.astype(F32)))

        lo = np.minimum.reduce([sup, inf, gle]) - 10
        hi = np.maximum.reduce([sup, inf, gle]) + 10
        shapes.append(Shape(sdf=tri, lo=lo, hi=hi, material=bone.material(cortex_mm=2.0), core_depth=None))
        head = gle + (gle - (sup + inf) / 2) / np.linalg.norm(gle - (sup + inf) / 2) * 22 * size
        r = 22 * size
        shapes.append(Shape(sdf=lambda p, c=head, r=r: np.sqrt(((p - c.astype(F32)) ** 2).sum(1)) - F32(r),
                            lo=head - r - 3, hi=head + r + 3, material=bone.material(cortex_mm=1.5), core_depth=None))
    return shapes


def _arms(levels, hab, hu, bone, rng) -> list[Shape]:
    """Arms at the sides (in about a third of the cases; otherwise raised out of view)."""
    th = [lv for lv in levels if lv.region == "T"]
    lum = [lv for lv in levels if lv.region == "L"]
    if len(th) < 6 or not lum or rng.random() > 0.35:
        return []
    prof = B.body_profile(levels, hab)
    shoulder = th[1].centre
    elbow = lum[min(1, len(lum) - 1)].centre
    wrist = levels[-1].to_world([0, 40, -120])
    shapes: list[Shape] = []
    r_arm = float(rng.uniform(38, 52) * hab["size"])
    fat = float(rng.uniform(4, 15))
    for s in (1.0, -1.0):
        pts = []
        for p in (shoulder, elbow, wrist):
            cx, cy, a, b = [float(v[0]) for v in prof.at(np.array([p[2]], F32))]
            pts.append([cx + s * (a + r_arm + rng.uniform(3, 25)), cy - 0.2 * b, p[2]])
        pts = np.array(pts)
        radii = np.array([r_arm, r_arm * 0.85, r_arm * 0.65])
        shapes.append(A.tube_through(pts, radii, hu["fat"]))
        shapes.append(A.tube_through(pts, radii - fat, hu["muscle"]))
        bone_r = np.array([11.0, 9.0, 8.0]) * hab["size"]
        shapes.append(A.tube_through(pts + np.array([0, 3.0, 0]), bone_r, 0.0,
                                     material=bone.material(cortex_mm=3.0, trab=bone.trabecular - 150)))
    return shapes


def _skull(levels, bone, hu, size) -> list[Shape]:
    c1 = next((lv for lv in levels if lv.name == "C1"), None)
    if c1 is None:
        return []
    c2 = next(lv for lv in levels if lv.name == "C2")
    pts = []
    for s in (-1, 1):
        pts.append([c2.to_world([s * 48 * size, 18, 30]), c2.to_world([s * 46 * size, 22, -15]),
                    c2.to_world([s * 30 * size, 55, -25]), c2.to_world([0, 72 * size, -22])])
    chain = np.array(pts[0] + pts[1][::-1][1:])
    mandible = A.tube_through(chain, 6.5 * size, 0.0, material=bone.material(cortex_mm=2.0))
    return H.skull_shapes(c1, size, bone, mandible)


def _face_label(levels, size) -> Shape | None:
    c1 = next((lv for lv in levels if lv.name == "C1"), None)
    if c1 is None:
        return None
    head = H.Head(c1, size)
    hc, hr = head.vault_centre, head.vault_radii + 5.0
    fc = np.array([0, 70, 25], F32) * F32(size)
    fr = (np.array([55, 40, 65]) * size).astype(F32)
    plane_pt = np.array([0, 38, 0], F32)
    chin = np.array([0, 0, -45], F32)

    def sdf(q):
        d = np.minimum(ellipsoid(q, hc, hr), ellipsoid(q, fc, fr))
        d = np.maximum(d, plane_pt[1] - q[:, 1])
        return np.maximum(d, chin[2] - q[:, 2])

    lo = np.minimum(hc - hr, fc - fr)
    hi = np.maximum(hc + hr, fc + fr)
    return head.shape(sdf, lo, hi, mode="label", channel="face", label=1)


def _metal(rng, levels, meta):
    """Pedicle screws with rods, or vertebroplasty cement, in a few cases."""
    shapes: list[Shape] = []
    pts = []
    cand = [lv for lv in levels if lv.region in ("L", "T") and lv.name not in ("T1", "T2", "T3")]
    u = rng.random()
    if u < 0.08 and len(cand) >= 3:
        k = int(rng.integers(2, 5))
        start = int(rng.integers(0, len(cand) - k + 1))
        sel = cand[start:start + k]
        heads = {1: [], -1: []}
        val = float(rng.uniform(2500, 3071))
        for lv in sel:
            g = lv.dims
            for s in (1, -1):
                a = lv.to_world([s * (g["cw"] / 2 + g["pw"] / 2 + 4), -g["D"] / 2 - g["pl"] - 6, 0.12 * g["H"]])
                b = lv.to_world([s * 4, g["D"] * 0.3, 0.12 * g["H"]])
                shapes.append(Shape(sdf=lambda p, a=a, b=b: capsule(p, a, b, 3.0), lo=np.minimum(a, b) - 5,
                                    hi=np.maximum(a, b) + 5, value=val))
                heads[s].append(a + (a - b) / np.linalg.norm(a - b) * 6)
                pts += [a, b]
        for s in (1, -1):
            hs = np.array(heads[s])
            shapes.append(A.tube_through(hs, 3.0, val))
        meta["metal"] = "screws"
    elif u < 0.13 and cand:
        for lv in rng.choice(cand, size=int(rng.integers(1, 3)), replace=False):
            g = lv.dims
            c = lv.centre
            r = np.array([g["W"] * 0.28, g["D"] * 0.28, g["H"] * 0.33])
            Rm = lv.R

            def sdf(p, c=c, r=r, Rm=Rm):
                return ellipsoid((p - c.astype(F32)) @ Rm.astype(F32), (0, 0, 0), r)

            shapes.append(Shape(sdf=sdf, lo=c - r.max() - 3, hi=c + r.max() + 3, value=float(rng.uniform(1500, 2800))))
            pts.append(c)
        meta["metal"] = "cement"
    return (np.array(pts) if pts else None), shapes
