"""Accuracy of segment + merge with ground-truth centroids (issue 7 acceptance).

For every case of a VerSe-layout folder (e.g. ``verse synth work/eval --n 50 --seed 90000``):
segment with the case's own centroid JSON, merge, and score with
:func:`verse_cli.evaluate.evaluate_arrays` against the case's mask. Prints per-case
mean Dice and HD95 and the means over all vertebrae; the real fixtures
(verse014 with its centroids, the tptbox L3 crop) are scored too when present.
Baseline for the ratio: a "centroid sphere" segmentation (a 12 mm ball at each
centroid), which shows how much of the score the network adds.

Usage::

    .venv/bin/python bench/eval_segment.py [DATA_DIR] [--model models/segment.pt] [--max 50] [--jsonl rows.jsonl]

``--jsonl`` writes one line per scored vertebra (case, label, Dice, HD95), and the script
prints the mean Dice per level, which shows where the synthetic score is lost.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


def run_case(ct_path: Path, ctd, gt: np.ndarray, model: Path, score_only=None) -> dict:
    from verse_cli.evaluate import evaluate_arrays
    from verse_cli.merge import merge
    from verse_cli.segment import segment

    img = nib.load(str(ct_path))
    with tempfile.TemporaryDirectory() as tmp:
        segment(ct_path, ctd, model=model, device="cpu", out_dir=Path(tmp) / "p")
        pred = merge(img, Path(tmp) / "p")
    if score_only is not None:  # all vertebrae compete in the merge; only these are scored
        pred = np.where(np.isin(pred, score_only), pred, 0)
        gt = np.where(np.isin(gt, score_only), gt, 0)
    return evaluate_arrays(pred.astype(np.uint8), gt.astype(np.uint8), img.affine)


def vertebra_rows(report: dict) -> list[dict]:
    return [r for r in report["vertebrae"] if r["in_gt"]]


def print_levels(rows: list[dict]) -> None:
    """Mean Dice per vertebra level, and what each level costs the overall mean."""
    if not rows:
        return
    overall = np.mean([r["dice"] for r in rows])
    for label in sorted({r["label"] for r in rows}):
        d = [r["dice"] for r in rows if r["label"] == label]
        name = next(r["name"] for r in rows if r["label"] == label)
        cost = (overall * len(d) - np.sum(d)) / len(rows)  # what the overall mean would gain were this level average
        print(f"  {name:>4}: n {len(d):3d}, Dice {np.mean(d):.3f} (min {np.min(d):.3f}), "
              f"the mean would gain at the average level {cost:+.4f}")


def main() -> None:
    from verse_cli.core.centroids import body_centroids, read_centroids
    from verse_cli.nets.train import discover_cases

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "segment.pt")
    parser.add_argument("--max", type=int, default=50)
    parser.add_argument("--jsonl", type=Path, help="write one line per scored vertebra here")
    args = parser.parse_args()
    dices, hd95s, case_means, all_rows = [], [], [], []
    start = time.perf_counter()
    if args.data is not None:
        for case in discover_cases(args.data)[: args.max]:
            gt = np.asarray(nib.load(str(case.mask)).dataobj)
            present = sorted(set(np.unique(gt).tolist()) - {0})
            ctd = read_centroids(case.ctd).subset(present)
            rep = run_case(case.ct, ctd, gt, args.model)
            rows = vertebra_rows(rep)
            all_rows += [{"case": case.subject, "label": r["label"], "name": r["name"], "dice": r["dice"],
                          "hd95_mm": r["hd95_mm"]} for r in rows]
            d = [r["dice"] for r in rows]
            h = [r["hd95_mm"] for r in rows if r["hd95_mm"] is not None]
            dices += d
            hd95s += h
            case_means.append(np.mean(d))
            print(f"{case.subject}: {len(d)} vertebrae, mean Dice {np.mean(d):.3f}, mean HD95 {np.mean(h):.2f} mm",
                  flush=True)
        print_levels(all_rows)
        if args.jsonl is not None:
            args.jsonl.write_text("".join(json.dumps(r) + "\n" for r in all_rows))
        print(f"synthetic: {len(case_means)} cases, {len(dices)} vertebrae: mean Dice {np.mean(dices):.4f}, "
              f"mean HD95 {np.mean(hd95s):.2f} mm ({time.perf_counter() - start:.0f} s)")
    if (REAL / "verse014").is_dir():
        c = REAL / "verse014"
        gt = np.asarray(nib.load(str(c / "sub-verse014_seg-vert_msk.nii.gz")).dataobj)
        rep = run_case(c / "sub-verse014_ct.nii.gz", c / "sub-verse014_seg-vb_ctd.json", gt, args.model)
        rows = vertebra_rows(rep)
        print("verse014: " + ", ".join(f"{r['name']} {r['dice']:.3f}" for r in rows)
              + f"; mean Dice {np.mean([r['dice'] for r in rows]):.4f}, "
              f"mean HD95 {np.mean([r['hd95_mm'] for r in rows]):.2f} mm")
    if (REAL / "tptbox-l3-crop").is_dir():
        c = REAL / "tptbox-l3-crop"
        img = nib.load(str(c / "sub-ct_label-22_ct.nii.gz"))
        gt = np.asarray(nib.load(str(c / "sub-ct_seg-vert_label-22_msk.nii.gz")).dataobj)
        ctd = body_centroids(gt, img.affine)
        rep = run_case(c / "sub-ct_label-22_ct.nii.gz", ctd, gt, args.model, score_only=[22])
        rows = vertebra_rows(rep)
        print(f"tptbox L3: Dice {rows[0]['dice']:.4f}, HD95 {rows[0]['hd95_mm']:.2f} mm" if rows else rep)


if __name__ == "__main__":
    main()
