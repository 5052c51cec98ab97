"""Benchmark of ``verse synth``: seconds per case and voxels per second.

Prints, for a few seeds:

* full-size cases (the default 40 M-voxel cap; target <= 20 s each on 2 cores);
* small training cases (``max_voxels`` 1 M; target ~1-3 s each);
* CPU seconds next to wall seconds (on a shared machine wall time also measures the
  neighbours; CPU time is what the case costs).

Baseline, in the same process: the same small cases rendered with block-sparse
evaluation switched off (``Canvas.sparse = False``: every voxel of each shape's box is
evaluated), which is what a straightforward implicit-surface renderer does. The
ratio is baseline / ours.

Run: ``.venv/bin/python bench/bench_synth.py [--seeds 3] [--full 1]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(seed: int, max_voxels: int, region: str = "random"):
    from verse_cli.synth import generate_case

    w0, c0 = time.perf_counter(), time.process_time()
    case = generate_case(seed, region=region, max_voxels=max_voxels)
    return case.ct.size, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="small cases per setting")
    ap.add_argument("--full", type=int, default=1, help="full-size (40 M voxel) cases")
    args = ap.parse_args()
    from verse_cli.synth.engine import Canvas

    run(0, 100_000)  # warm up imports
    print(f"{'setting':<28}{'voxels':>12}{'wall s':>9}{'cpu s':>8}{'Mvox/s (cpu)':>14}")
    for s in range(args.full):
        n, w, c = run(100 + s, 40_000_000, "whole" if s % 2 else "lumbar")
        print(f"{'full (40 M cap)':<28}{n:>12,}{w:>9.1f}{c:>8.1f}{n / c / 1e6:>14.2f}")
    totals = {}
    for sparse in (True, False):
        Canvas.sparse = sparse
        cpu = 0.0
        for s in range(args.seeds):
            n, w, c = run(200 + s, 1_000_000)
            cpu += c
            label = "small (1 M), " + ("block-sparse" if sparse else "dense baseline")
            print(f"{label:<28}{n:>12,}{w:>9.1f}{c:>8.1f}{n / c / 1e6:>14.2f}")
        totals[sparse] = cpu
    Canvas.sparse = True
    print(f"baseline / ours (cpu, small cases): {totals[False] / max(totals[True], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
