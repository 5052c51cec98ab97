"""Anatomical variants (enriched well above clinical prevalence) and their ground truth.

* Numbering: 11 or 13 thoracic, 4 or 6 lumbar vertebrae.
* Cervical ribs (C7), on one side or both.
* Stump ribs (< 38 mm) at the last thoracic vertebra or at L1. As in the paper, a
  vertebra whose ribs are both shorter than 38 mm counts as lumbar (a transitional
  thoracolumbar vertebra): a double stump at the last thoracic vertebra moves the
  enumeration to one thoracic vertebra fewer and one lumbar more, although the mask
  keeps the generator's level names.
* Lumbosacral transitional vertebrae graded after Castellvi 1984, per side:
  0 none, 1 transverse process >= 19 mm craniocaudal, 2 pseudarthrosis with the
  sacral ala (gap <= 2 mm), 3 bony fusion. In grades 3 and 4 the fused vertebra is
  not labelled, as in VerSe.

:func:`sample_spec` draws the variants of one case; :func:`variants_json` writes the
``sub-X_variants.json`` ground truth once the case is rendered.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import UsageError

VARIANTS = ("none", "T11", "T13", "L4", "L6", "cervical_rib", "stump_rib", "castellvi",
            "castellvi_1", "castellvi_2a", "castellvi_2b", "castellvi_3a", "castellvi_3b", "castellvi_4")

_GRADE_SIDES = {"0/1": None, "1": (1, 0), "2a": (2, 0), "2b": (2, 2), "3a": (3, 0), "3b": (3, 3), "4": (3, 2)}

STUMP_MAX_MM = 38.0


def castellvi_grade(left: int, right: int) -> str:
    """Combined Castellvi grade from the per-side grades (contract in the brief)."""
    hi = max(left, right)
    if hi <= 1:
        return "0/1"
    if {left, right} == {2, 3}:
        return "4"
    if hi == 2:
        return "2b" if left == right == 2 else "2a"
    return "3b" if left == right == 3 else "3a"


def check_variant(variant: str | None) -> str | None:
    if variant is None:
        return None
    v = str(variant).strip()
    canon = {x.lower(): x for x in VARIANTS}
    if v.lower() not in canon:
        raise UsageError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return canon[v.lower()]


def sample_spec(rng: np.random.Generator, variant: str | None = None) -> dict:
    """Counts and variant features of one anatomy."""
    variant = check_variant(variant)
    forced = variant is not None
    p = rng.random(8)
    n_t = 12
    n_l = 5
    if variant in ("T11", "T13"):
        n_t = int(variant[1:])
    elif not forced:
        n_t = 11 if p[0] < 0.08 else (13 if p[0] > 0.90 else 12)
    if variant in ("L4", "L6"):
        n_l = int(variant[1:])
    elif not forced:
        n_l = 4 if p[1] < 0.08 else (6 if p[1] > 0.88 else 5)
    spec = {"counts": {"cervical": 7, "thoracic": n_t, "lumbar": n_l},
            "cervical_ribs": {}, "stumps": [], "castellvi": {"left": 0, "right": 0}}
    if variant == "cervical_rib" or (not forced and p[2] < 0.08):
        sides = [("left", "right"), ("left",), ("right",)][int(rng.integers(0, 3))]
        # mm the rib runs free past C7's transverse process (anatomy.cervical_rib_length)
        spec["cervical_ribs"] = {s: float(rng.uniform(5, 40)) for s in sides}
    if variant == "stump_rib" or (not forced and p[3] < 0.15):
        where = rng.choice(["last_thoracic", "L1"], p=[0.65, 0.35])
        sides = [("left", "right"), ("left",), ("right",)][int(rng.integers(0, 3))]
        for s in sides:
            spec["stumps"].append({"where": str(where), "side": s, "length_mm": float(rng.uniform(12, 36))})
    if variant is not None and variant.startswith("castellvi"):
        if variant == "castellvi":
            grade = str(rng.choice(["1", "2a", "2b", "3a", "3b", "4"]))
        else:
            grade = variant.split("_")[1]
        spec["castellvi"] = _castellvi_sides(rng, grade)
    elif not forced and p[4] < 0.25:
        grade = str(rng.choice(["1", "2a", "2b", "3a", "3b", "4"], p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.1]))
        spec["castellvi"] = _castellvi_sides(rng, grade)
    return spec


def _castellvi_sides(rng, grade: str) -> dict:
    pair = _GRADE_SIDES[grade]
    if pair is None:
        return {"left": 0, "right": 0}
    a, b = pair
    if rng.random() < 0.5:
        a, b = b, a
    # a grade-1 enlargement sometimes accompanies the other side
    if grade in ("2a", "3a") and rng.random() < 0.4:
        b = 1 if b == 0 else b
        if a == 0:
            a = 1
    return {"left": int(a), "right": int(b)}


def level_names(counts: dict) -> list[tuple[str, int, str]]:
    """(name, VerSe id, region) head to sacrum, for the given counts."""
    from ..core import labels as L

    out = [(f"C{i}", i, "C") for i in range(1, 8)]
    for i in range(1, counts["thoracic"] + 1):
        out.append((f"T{i}", L.label_id(f"T{i}"), "T"))
    for i in range(1, counts["lumbar"] + 1):
        out.append((f"L{i}", L.label_id(f"L{i}"), "L"))
    out.append(("S1", 26, "S"))
    return out


def rib_centred_regions(order: list[str], ribs: dict, stump_mm: float = STUMP_MAX_MM) -> dict[str, str]:
    """Region letter per vertebra name under the paper's rib-centred nomenclature.

    The last thoracic vertebrae whose ribs are both shorter than ``stump_mm`` (or
    absent) are lumbar: transitional thoracolumbar vertebrae (VerSe 2020 data paper,
    "Anatomical variants"). Every other vertebra keeps the region of its name.
    """
    region = {n: n[0] for n in order}
    for name in reversed([n for n in order if n.startswith("T")]):
        sides = ribs.get(name, {})
        lengths = [(sides.get(s) or (None, "absent"))[0] for s in ("left", "right")]
        if all(x is None or x < stump_mm for x in lengths):
            region[name] = "L"
        else:
            break
    return region


def variants_json(spec: dict, order: list[str], in_fov: dict, ribs: dict, fused: str | None) -> dict:
    """The ground-truth JSON (schema in the brief).

    ``order``: vertebra names head to sacrum; ``in_fov``: name -> "visible" | "cut"
    (absent when out of view); ``ribs``: name -> side -> (length or None, status),
    status "present", "cut" (partly outside the image) or "not_in_view" (wholly outside).

    ``counts`` are the generated levels (named as in the mask); the enumeration follows
    the paper: a last thoracic vertebra with both ribs < 38 mm is counted as lumbar.
    """
    c = spec["counts"]
    seen = [n for n in order if n in in_fov]
    visible = [n for n in seen if in_fov[n] == "visible"]
    cut = [n for n in seen if in_fov[n] == "cut"]

    def determinable(names_region, before, after):
        need = list(names_region) + [n for n in (before, after) if n]
        return all(n in in_fov for n in need)

    region = rib_centred_regions(order, ribs)
    cerv = [n for n in order if region[n] == "C"]
    thor = [n for n in order if region[n] == "T"]
    lumb = [n for n in order if region[n] == "L"]
    # the thoracolumbar boundary is placed by ribs (paper): the last thoracic vertebra
    # tells it only when one of its ribs is in view, not by a sliver of its arch
    boundary_seen = not thor or any((ribs.get(thor[-1], {}).get(s) or (None, "absent"))[1] in ("present", "cut")
                                    for s in ("left", "right"))
    enum_c = len(cerv) if determinable(cerv, None, thor[0] if thor else None) else None
    enum_t = len(thor) if determinable(thor, cerv[-1], lumb[0] if lumb else "S1") and boundary_seen else None
    enum_l = len(lumb) if determinable(lumb, thor[-1] if thor else None, "S1") and boundary_seen else None
    flags = []
    if enum_t is not None and enum_t != 12:
        flags.append(f"T{enum_t}")
    if enum_l is not None and enum_l != 5:
        flags.append(f"L{enum_l}")
    cr = spec["cervical_ribs"]
    stumps = []
    for st in spec["stumps"]:
        stumps.append({"vertebra": st["vertebra"], "side": st["side"], "length_mm": round(st["length_mm"], 1)})
    cv = spec["castellvi"]
    last_lumbar = lumb[-1] if lumb else None
    transitional = [n for n in order if n.startswith("T") and region[n] == "L"]
    return {
        "counts": dict(c),
        "rib_centred_counts": {"cervical": len(cerv), "thoracic": len(thor), "lumbar": len(lumb)},
        "transitional_thoracolumbar": transitional,
        "enumeration": {"cervical": enum_c, "thoracic": enum_t, "lumbar": enum_l,
                        "complete": None not in (enum_c, enum_t, enum_l), "flags": flags},
        "field_of_view": {"first": seen[0] if seen else None, "last": seen[-1] if seen else None,
                          "visible": visible, "cut": cut},
        "ribs": {name: {"left_mm": _r(ribs[name].get("left")), "right_mm": _r(ribs[name].get("right")),
                        "left_status": _status(ribs[name].get("left")),
                        "right_status": _status(ribs[name].get("right"))}
                 for name in order if name in ribs},
        "cervical_ribs": {"left": "left" in cr, "right": "right" in cr, "count": len(cr)},
        "stump_ribs": stumps,
        "castellvi": {"vertebra": last_lumbar, "left": int(cv["left"]), "right": int(cv["right"]),
                      "grade": castellvi_grade(int(cv["left"]), int(cv["right"]))},
    }


def _r(entry):
    if entry is None or entry[0] is None:
        return None
    return round(float(entry[0]), 1)


def _status(entry):
    return "absent" if entry is None else entry[1]
