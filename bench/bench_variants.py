"""Benchmark of ``verse rate-variants`` against the synthetic ground truth.

60 held-out synthetic cases (seeds 90000-90059, never used for development or
training), enriched with every variant, are generated once into a cache folder
(``--cache``, default ``$TMPDIR/verse-bench-variants``; scale 0.6 keeps generation affordable) and rated with
:func:`verse_cli.variants.rate_variants`. Printed scores:

* enumeration correct: cervical/thoracic/lumbar determinable counts, completeness
  and T11/T13/L4/L6 flags all equal to the ground truth;
* median absolute rib-length error over ribs that both sides call present (mm);
* stump-rib F1 over (vertebra, side) pairs, cervical-rib F1 over (case, side) pairs,
  counted where the vertebra is inside the field of view;
* Castellvi grade exact and within one grade (0/1 < 2a < 2b < 3a < 3b < 4), over cases
  whose last lumbar vertebra and sacrum are both in view;
* seconds per case, and the seconds of one whole-spine case at full resolution.

The baseline, rated in the same process, is a labels-only rater (``ct=None``): it
knows the enumeration from the labels but no ribs and no Castellvi grade.

Run: ``.venv/bin/python bench/bench_variants.py [--n 60] [--scale 0.6] [--jobs 1]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIRST_SEED = 90000
SCHEDULE = [  # (variant, region): enrich every variant, with the region that shows it
    (None, "random"), ("T11", "whole"), ("T13", "thoracolumbar"), ("L4", "lumbar"), ("L6", "lumbar"),
    ("cervical_rib", "cervical"), ("stump_rib", "thoracolumbar"), ("castellvi_1", "lumbar"),
    ("castellvi_2a", "lumbar"), ("castellvi_2b", "lumbar"), ("castellvi_3a", "lumbar"),
    ("castellvi_3b", "lumbar"), ("castellvi_4", "lumbar"), ("stump_rib", "lumbar"), ("cervical_rib", "whole"),
]
GRADES = ["0/1", "2a", "2b", "3a", "3b", "4"]


def case_spec(i: int, first_seed: int = FIRST_SEED) -> tuple[int, str | None, str]:
    variant, region = SCHEDULE[i % len(SCHEDULE)]
    return first_seed + i, variant, region


def _make_one(args):
    seed, variant, region, scale, cache = args
    from verse_cli.core.io import write_json
    from verse_cli.synth import generate_case, write_case
    from verse_cli.synth import variants as V

    sub = f"syn{seed}"
    if (Path(cache) / f"sub-{sub}_variants.json").exists():
        return sub
    # record the ground truth's inputs, so that a fix of the GT rules re-derives the GT
    # from the cache (load_case) without rendering the cases again
    recorded: dict = {}
    original = V.variants_json

    def record(spec, order, in_fov, ribs, fused):
        recorded.update(spec=spec, order=order, in_fov=in_fov,
                        ribs={n: {s: list(v) for s, v in sides.items()} for n, sides in ribs.items()}, fused=fused)
        return original(spec, order, in_fov, ribs, fused)

    V.variants_json = record
    try:
        case = generate_case(seed, region=region, variant=variant, scale=scale)
    finally:
        V.variants_json = original
    write_json(json.loads(json.dumps(recorded, default=float)), Path(cache) / f"sub-{sub}_gt-inputs.json")
    write_json(json.loads(json.dumps(case.meta, default=float)), Path(cache) / f"sub-{sub}_meta.json")
    write_case(case, cache, subject=sub, qc=False, ribs=True)
    return sub


def make_cases(n: int, scale: float, cache: Path, jobs: int = 1, first_seed: int = FIRST_SEED) -> list[str]:
    cache.mkdir(parents=True, exist_ok=True)
    todo = [(*case_spec(i, first_seed), scale, str(cache)) for i in range(n)]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(_make_one, todo))
    return [_make_one(t) for t in todo]


def load_case(cache: Path, sub: str):
    from verse_cli.core.centroids import read_centroids
    from verse_cli.core.io import load_ct, load_nifti

    ct = load_ct(cache / f"sub-{sub}_ct.nii.gz")
    mask = load_nifti(cache / f"sub-{sub}_seg-vert_msk.nii.gz")
    ctd = read_centroids(cache / f"sub-{sub}_seg-subreg_ctd.json", ref_affine=mask.affine)
    gt = json.loads((cache / f"sub-{sub}_variants.json").read_text())
    inputs = cache / f"sub-{sub}_gt-inputs.json"
    if inputs.exists():  # the GT under the current rules, from the generator's recorded inputs
        from verse_cli.synth.variants import variants_json

        rec = json.loads(inputs.read_text())
        ribs = {n: {s: tuple(v) for s, v in sides.items()} for n, sides in rec["ribs"].items()}
        gt = variants_json(rec["spec"], rec["order"], rec["in_fov"], ribs, rec["fused"])
    return ct, mask, ctd, gt


# --------------------------------------------------------------------------- scores
def enumeration_key(v: dict):
    e = v["enumeration"]
    return (e["cervical"], e["thoracic"], e["lumbar"], bool(e["complete"]), tuple(sorted(e["flags"])))


def f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0


def in_view(gt: dict, name: str) -> bool:
    fov = gt["field_of_view"]
    return name in fov["visible"] or name in fov["cut"]


def score(pairs: list[tuple[dict, dict]]) -> dict:
    enum_ok = [enumeration_key(r) == enumeration_key(g) for r, g in pairs]
    rib_err, st, cr = [], [0, 0, 0], [0, 0, 0]
    cast_exact, cast_near = [], []
    for r, g in pairs:
        for name, gr in g["ribs"].items():
            mine = r["ribs"].get(name, {})
            for side in ("left", "right"):
                # a rib seen only by its head is present without a length
                if (gr[f"{side}_status"] == "present" and mine.get(f"{side}_status") == "present"
                        and mine.get(f"{side}_mm") is not None):
                    rib_err.append(abs(mine[f"{side}_mm"] - gr[f"{side}_mm"]))
        truth = {(s["vertebra"], s["side"]) for s in g["stump_ribs"] if g["ribs"].get(s["vertebra"], {})
                 .get(f"{s['side']}_status") == "present" and in_view(g, s["vertebra"])}
        found = {(s["vertebra"], s["side"]) for s in r["stump_ribs"]}
        st[0] += len(truth & found)
        st[1] += len(found - truth)
        st[2] += len(truth - found)
        if in_view(g, "C7"):
            for side in ("left", "right"):
                t, f = bool(g["cervical_ribs"][side]), bool(r["cervical_ribs"].get(side))
                cr[0] += t and f
                cr[1] += f and not t
                cr[2] += t and not f
        last = g["castellvi"]["vertebra"]
        if last and in_view(g, last) and in_view(g, "S1"):
            got = (r.get("castellvi") or {}).get("grade")
            want = g["castellvi"]["grade"]
            cast_exact.append(got == want)
            cast_near.append(got in GRADES and abs(GRADES.index(got) - GRADES.index(want)) <= 1)
    return {
        "cases": len(pairs),
        "enumeration_correct": float(np.mean(enum_ok)) if enum_ok else float("nan"),
        "rib_length_median_error_mm": statistics.median(rib_err) if rib_err else float("nan"),
        "ribs_compared": len(rib_err),
        "stump_rib_f1": f1(*st), "stump_counts_tp_fp_fn": st,
        "cervical_rib_f1": f1(*cr), "cervical_counts_tp_fp_fn": cr,
        "castellvi_exact": float(np.mean(cast_exact)) if cast_exact else float("nan"),
        "castellvi_within_one": float(np.mean(cast_near)) if cast_near else float("nan"),
        "castellvi_cases": len(cast_exact),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--scale", type=float, default=0.6)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=FIRST_SEED,
                    help="seed of the first case: another set of held-out cases, to see that the scores hold beyond "
                    "the cases the rater was developed on (use another --cache)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "verse-bench-variants")
    ap.add_argument("--details", action="store_true", help="print every case that disagrees")
    ap.add_argument("--skip-timing", action="store_true", help="skip the full-resolution whole-spine timing")
    args = ap.parse_args(argv)

    from verse_cli.variants import rate_variants

    t0 = time.perf_counter()
    subs = make_cases(args.n, args.scale, args.cache, args.jobs, args.first_seed)
    print(f"cases ready in {time.perf_counter() - t0:.0f} s ({args.cache})")
    pairs, base_pairs, seconds = [], [], []
    for sub in subs:
        ct, mask, ctd, gt = load_case(args.cache, sub)
        t = time.perf_counter()
        r = rate_variants(ct, mask, ctd)
        seconds.append(time.perf_counter() - t)
        pairs.append((r, gt))
        base_pairs.append((rate_variants(None, mask, ctd), gt))
        if args.details:
            _print_details(sub, r, gt)
    ours, base = score(pairs), score(base_pairs)
    print(json.dumps({"rate_variants": ours, "labels_only_baseline": base}, indent=1))
    print(f"seconds per case: median {statistics.median(seconds):.1f}, max {max(seconds):.1f}")
    targets = [("enumeration_correct", 0.95, ">="), ("rib_length_median_error_mm", 3.0, "<="),
               ("stump_rib_f1", 0.9, ">="), ("cervical_rib_f1", 0.9, ">="), ("castellvi_exact", 0.8, ">="),
               ("castellvi_within_one", 0.95, ">=")]
    for key, goal, op in targets:
        val, ref = ours[key], base[key]
        ok = val >= goal if op == ">=" else val <= goal
        print(f"{key:30s} {val:7.3f} (target {op} {goal}; labels-only baseline {ref:.3f}) {'OK' if ok else 'MISS'}")
    if not args.skip_timing:
        _whole_spine_timing()
    return 0


def _print_details(sub, r, g):
    issues = []
    if enumeration_key(r) != enumeration_key(g):
        issues.append(f"enum {enumeration_key(r)} vs {enumeration_key(g)}")
    if {(s['vertebra'], s['side']) for s in r['stump_ribs']} != {(s['vertebra'], s['side']) for s in g['stump_ribs']}:
        issues.append(f"stumps {r['stump_ribs']} vs {g['stump_ribs']}")
    if (r.get("castellvi") or {}).get("grade") != g["castellvi"]["grade"]:
        issues.append(f"castellvi {r.get('castellvi')} vs {g['castellvi']}")
    if r["cervical_ribs"] != g["cervical_ribs"]:
        issues.append(f"cervical {r['cervical_ribs']} vs {g['cervical_ribs']}")
    if issues:
        print(sub, " | ".join(issues))


def _whole_spine_timing() -> None:
    import nibabel as nib

    from verse_cli.synth import generate_case
    from verse_cli.variants import rate_variants

    case = generate_case(FIRST_SEED + 999, region="whole", variant="none")
    ct = nib.Nifti1Image(case.ct.astype(np.float32), case.affine)
    mask = nib.Nifti1Image(case.mask, case.affine)
    t = time.perf_counter()
    rate_variants(ct, mask, case.centroids)
    print(f"whole spine at full resolution ({case.ct.size / 1e6:.0f} M voxels): "
          f"{time.perf_counter() - t:.1f} s (target <= 20 s)")


if __name__ == "__main__":
    sys.exit(main())
