"""Acceptance check for ``verse label`` on held-out synthetic cases (seeds >= 90000).

Cases are rendered on the fly (``verse_cli.synth.generate_case``; seeds from 90000, never
used in training) across all regions; the first ``--variants`` cases force a numbering
variant (T13, L6, T11, L4 in turn) in a field of view where it is determinable (whole
spine for T11/T13, thoracolumbar for L4/L6). The box given to ``label`` is the
ground-truth mask's box enlarged by 10 mm (what ``verse detect`` should return).

Metrics (the VerSe definitions, :func:`verse_cli.evaluate.get_hits`):

* identification rate: hits / ground-truth vertebrae, over all cases;
* localisation distance: mean distance between predicted and true centroid of the
  identified vertebrae (and, for reference, of every label present in both);
* variant correct: in a variant case whose ground truth flags the variant as determinable
  (the random field of view can still cut the levels that show it; such cases are counted
  as ``variant_not_in_view``), the variant's defining labels are identified
  (T13: 28; L6: 25; T11: T11 and L1 with no T12 predicted; L4: L4 and S1 with no L5
  predicted).

With ``--real DIR`` (default ``../shared/data/real`` when present) the real cases there are
labelled too and reported apart: every folder with a ``*_ct.nii.gz`` and a vertebra mask;
ground truth from its centroid JSON, or the body centroids of the mask; box = mask box + 10 mm.

Usage: ``python bench/eval_label.py [--n 50] [--variants 12] [--jobs 1] [--scale 0.5] [--cache DIR]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

REGIONS = ("cervical", "thoracic", "lumbar", "thoracolumbar", "whole")
VARIANTS = ("T13", "L6", "T11", "L4")
VARIANT_REGION = {"T13": "whole", "T11": "whole", "L6": "thoracolumbar", "L4": "thoracolumbar"}


def plan(n: int, n_variants: int, seed0: int) -> list[tuple[int, str, str | None]]:
    jobs = []
    for i in range(n):
        if i < n_variants:
            v = VARIANTS[i % len(VARIANTS)]
            jobs.append((seed0 + i, VARIANT_REGION[v], v))
        else:
            jobs.append((seed0 + i, REGIONS[i % len(REGIONS)], "none"))
    return jobs


def render(job):
    """Render one case, or read it from the ``--cache`` folder (pickled ``Case``)."""
    import pickle
    from pathlib import Path

    from verse_cli.synth import generate_case

    seed, region, variant = job
    t = time.perf_counter()
    cached = Path(CACHE) / f"{seed}_{region}_{variant}_{SCALE}.pkl" if CACHE else None
    if cached is not None and cached.exists():
        case = pickle.loads(cached.read_bytes())
    else:
        case = generate_case(seed, region=region, variant=variant, scale=SCALE)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.with_suffix(".tmp").write_bytes(pickle.dumps(case))
            cached.with_suffix(".tmp").rename(cached)
    return job, case, time.perf_counter() - t


SCALE = 0.5
CACHE = None


def variant_ok(variant: str, hits: dict, pred: set) -> bool:
    if variant == "T13":
        return hits.get(28, False)
    if variant == "L6":
        return hits.get(25, False)
    if variant == "T11":
        return hits.get(18, False) and hits.get(20, False) and 19 not in pred
    if variant == "L4":
        return hits.get(23, False) and 24 not in pred and hits.get(26, True)
    return True


def real_cases(root):
    """(name, ct path, mask path, centroid JSON path or None) of the real fixtures under ``root``."""
    from pathlib import Path

    out = []
    for folder in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        cts = sorted(folder.glob("*_ct.nii.gz")) if folder.is_dir() else []
        masks = sorted(folder.glob("*seg-vert*_msk.nii.gz")) if folder.is_dir() else []
        if cts and masks:
            ctds = sorted(folder.glob("*_ctd.json"))
            out.append((folder.name, cts[0], masks[0], ctds[0] if ctds else None))
    return out


def eval_real(root, net, refine: bool = True) -> list[dict]:
    from verse_cli import label as LB
    from verse_cli.core.centroids import body_centroids, read_centroids
    from verse_cli.core.io import load_mask, load_nifti
    from verse_cli.evaluate import get_hits

    rows = []
    for name, ct_path, mask_path, ctd_path in real_cases(root):
        img = load_nifti(ct_path)
        mask = np.asarray(load_mask(mask_path).dataobj)
        if ctd_path is not None:
            ctd = read_centroids(ctd_path, ref_affine=img.affine)
        else:
            ctd = body_centroids(mask, img.affine)
        gt = dict(zip(ctd.labels, ctd.to_world(img.affine)))
        lo, hi = LB.box_of_mask(mask, img.affine)
        t = time.perf_counter()
        res = LB.label(img, (lo - 10, hi + 10), model=net, refine=refine)
        sec = time.perf_counter() - t
        pred = dict(zip(res.labels, res.to_world(img.affine)))
        hits = get_hits(gt, pred)
        rows.append({"case": name, "gt": sorted(gt), "pred": sorted(pred), "hits": int(sum(hits.values())),
                     "n_gt": len(gt), "seconds": round(sec, 2)})
        print(f"real {name}: hits {rows[-1]['hits']}/{len(gt)} gt {' '.join(map(str, sorted(gt)))} | "
              f"pred {' '.join(map(str, sorted(pred)))}", flush=True)
    return rows


def main() -> None:
    global SCALE, CACHE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--variants", type=int, default=12)
    ap.add_argument("--seed", type=int, default=90000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-refine", action="store_true")
    ap.add_argument("--no-ct-ribs", action="store_true", help="Rib evidence from the network only.")
    ap.add_argument("--json", default=None, help="Write per-case results here.")
    ap.add_argument("--cache", default=None, help="Keep rendered cases here (pickles) for reruns.")
    ap.add_argument("--render-only", action="store_true", help="Only render into --cache.")
    ap.add_argument("--real", default="../shared/data/real", help="Folder of real fixtures ('' for none).")
    args = ap.parse_args()
    SCALE, CACHE = args.scale, args.cache
    assert args.seed >= 90000, "held-out seeds start at 90000"

    from verse_cli import label as LB
    from verse_cli.evaluate import get_hits

    jobs = plan(args.n, args.variants, args.seed)
    if args.render_only:
        for job in jobs:
            _, _, t = render(job)
            print(job, f"{t:.0f} s", flush=True)
        return
    net = LB.load_model(args.model, "auto")
    if args.jobs > 1:
        from multiprocessing import get_context

        pool = get_context("fork").Pool(args.jobs)
        cases = pool.imap(render, jobs)
    else:
        cases = map(render, jobs)
    rows = []
    for (seed, region, variant), case, t_render in cases:
        gt = dict(zip(case.centroids.labels, case.centroids.to_world(case.affine)))
        lo, hi = LB.box_of_mask(case.mask, case.affine)
        t = time.perf_counter()
        res = LB.label((case.ct.astype(np.float32), case.affine), (lo - 10, hi + 10), model=net,
                       refine=not args.no_refine, details=True, ct_ribs=not args.no_ct_ribs)
        t_label = time.perf_counter() - t
        pred = dict(zip(res.centroids.labels, res.centroids.to_world(case.affine)))
        hits = get_hits(gt, pred)
        common = sorted(set(gt) & set(pred))
        dist = {lab: float(np.linalg.norm(gt[lab] - pred[lab])) for lab in common}
        flags = case.variants.get("enumeration", {}).get("flags", [])
        row = {"seed": seed, "region": region, "variant": variant if variant != "none" else None,
               "determinable": flags, "gt": sorted(gt), "pred": sorted(pred), "hits": int(sum(hits.values())),
               "n_gt": len(gt), "dist_hits": [dist[k] for k in common if hits[k]], "dist_common": list(dist.values()),
               "variants_found": res.variants, "seconds": round(t_label, 2), "render_s": round(t_render, 1)}
        if variant != "none" and variant in flags:
            row["variant_ok"] = bool(variant_ok(variant, hits, set(pred)))
        elif variant != "none":
            # the random field of view cut the levels that show the variant (the ground truth
            # flags it as not determinable): no labelling can be right or wrong about it
            row["variant_not_in_view"] = True
        rows.append(row)
        print(f"{seed} {region:13s} {variant or '':5s} hits {row['hits']}/{row['n_gt']} "
              f"d {np.mean(row['dist_hits']) if row['dist_hits'] else float('nan'):.2f} mm "
              f"found {res.variants} ok {row.get('variant_ok', '-')} "
              f"gt {' '.join(map(str, row['gt']))} | pred {' '.join(map(str, row['pred']))}", flush=True)
    n_hits = sum(r["hits"] for r in rows)
    n_gt = sum(r["n_gt"] for r in rows)
    d_hits = [d for r in rows for d in r["dist_hits"]]
    d_common = [d for r in rows for d in r["dist_common"]]
    var_rows = [r for r in rows if "variant_ok" in r]
    summary = {
        "cases": len(rows), "vertebrae": n_gt, "id_rate": n_hits / max(1, n_gt),
        "mean_dist_identified_mm": float(np.mean(d_hits)) if d_hits else None,
        "mean_dist_common_mm": float(np.mean(d_common)) if d_common else None,
        "variant_cases": len(var_rows), "variant_correct": sum(r["variant_ok"] for r in var_rows),
        "variant_not_in_view": sum(bool(r.get("variant_not_in_view")) for r in rows),
        "seconds_per_case": float(np.mean([r["seconds"] for r in rows])) if rows else None,
    }
    real = eval_real(args.real, net, refine=not args.no_refine) if args.real else []
    if real:
        summary["real"] = {r["case"]: f"{r['hits']}/{r['n_gt']}" for r in real}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "cases": rows, "real": real}, fh, indent=1)


if __name__ == "__main__":
    main()
