"""Benchmark ``verse segment`` + ``verse merge`` on a 17-vertebra synthetic CT.

Target (issue 7): segment + merge <= 30 s for 17 vertebrae on a 2-core CPU with peak
memory <= 4 GB. Both commands run as the user runs them, in subprocesses, with
torch limited to two threads; the peak resident memory of each comes from
``getrusage``. Baseline, in this process: the naive merge that resamples every patch
onto the whole CT grid (what the bounding-box merge avoids); the ratio shows what
the sub-box resampling saves.

Usage::

    .venv/bin/python bench/bench_segment.py [--seed 90017] [--model models/segment.pt]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_case(seed: int, folder: Path) -> tuple[Path, Path, int]:
    """A synthetic thoracolumbar CT with 17 centroids (T1-L5 when in view), cached in ``folder``."""
    from verse_cli.core.centroids import write_centroids
    from verse_cli.core.io import save_ct, save_mask
    from verse_cli.synth import generate_case

    ct_path, ctd_path = folder / f"bench{seed}_ct.nii.gz", folder / f"bench{seed}_ctd.json"
    if not ct_path.exists():
        case = generate_case(seed, region="whole", variant="none")
        ctd = case.centroids
        keep = [lab for lab in ctd.labels if 8 <= lab <= 24][:17]
        save_ct(case.ct, case.affine, ct_path)
        save_mask(case.mask, case.affine, folder / f"bench{seed}_msk.nii.gz")
        write_centroids(ctd.subset(keep), ctd_path)
    import json

    n = len(json.loads(ctd_path.read_text())) - 1
    return ct_path, ctd_path, n


def run_timed(args: list[str]) -> tuple[float, float]:
    """Run ``verse ARGS``; returns (seconds, peak RSS in GB of that child)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "verse_cli.cli", *args, "--quiet"], check=False, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"verse {' '.join(args)} failed:\n{proc.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024**2


def naive_merge(ct_path: Path, patch_dir: Path) -> float:
    """Baseline: every patch resampled onto the full CT grid, then argmax. Returns seconds."""
    import nibabel as nib

    from verse_cli.core.geometry import resample_to_grid
    from verse_cli.merge import read_index, read_patch

    img = nib.load(str(ct_path))
    start = time.perf_counter()
    best = np.zeros(img.shape, np.float32)
    labels = np.zeros(img.shape, np.uint8)
    for e in read_index(patch_dir):
        prob, paff = read_patch(patch_dir / e["file"])
        full = resample_to_grid(prob.astype(np.float32), paff, img.shape, img.affine, order=1)
        wins = full > best
        best[wins] = full[wins]
        labels[wins] = e["label"]
    labels[best <= 127] = 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=90017)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "segment.pt")
    parser.add_argument("--cache", type=Path, default=ROOT / "work" / "bench")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    ct, ctd, n = make_case(args.seed, args.cache)
    import nibabel as nib

    img = nib.load(str(ct))
    print(f"case: {ct.name}, {n} vertebrae, CT {img.shape} voxels, "
          f"{np.round(img.header.get_zooms(), 2).tolist()} mm; cores available: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seg_s, seg_gb = run_timed(["segment", str(ct), "--ctd", str(ctd), "-o", str(tmp / "p"),
                                   "--model", str(args.model), "--device", "cpu"])
        merge_s, merge_gb = run_timed(["merge", str(ct), str(tmp / "p"), "-o", str(tmp / "seg.nii.gz")])
        total = seg_s + merge_s
        print(f"segment: {seg_s:6.1f} s  peak {seg_gb:.2f} GB")
        print(f"merge:   {merge_s:6.1f} s  peak {merge_gb:.2f} GB")
        print(f"total:   {total:6.1f} s  ({total / n:.2f} s per vertebra; target <= 30 s, <= 4 GB) "
              f"{'PASS' if total <= 30 and max(seg_gb, merge_gb) <= 4 else 'FAIL'}")
        gt = ct.with_name(ct.name.replace("_ct.nii.gz", "_msk.nii.gz"))
        if gt.exists():
            from verse_cli.evaluate import evaluate_arrays

            pred = np.asarray(nib.load(str(tmp / "seg.nii.gz")).dataobj)
            ref = np.asarray(nib.load(str(gt)).dataobj).copy()
            import json

            keep = [e["label"] for e in json.loads(ctd.read_text())[1:]]
            ref[~np.isin(ref, keep)] = 0
            rep = evaluate_arrays(pred, ref, img.affine)
            print(f"accuracy on this case: mean Dice {rep.get('mean_dice')}")
        if not args.no_baseline:
            start = time.perf_counter()
            from verse_cli.merge import merge

            merge(ct, tmp / "p")
            ours = time.perf_counter() - start
            naive = naive_merge(ct, tmp / "p")
            print(f"merge in-process: bbox {ours:.1f} s vs naive full-grid {naive:.1f} s "
                  f"(ratio {naive / ours:.1f}x)")


if __name__ == "__main__":
    main()
