"""Benchmark ``verse label`` on a 512 x 512 x 400 thoracolumbar CT (CPU).

A synthetic thoracolumbar case is rendered, resampled onto a 512 x 512 x 400 grid
(about 0.8 x 0.8 x 1.2 mm, the size of a clinical scan) and written to a temporary
NIfTI. The timed run is what a user waits for: read the CT, crop, project, run the net,
label, refine and write the JSON. The baseline, timed in the same process, is reading
the same NIfTI alone (``core.io.load_ct``, which also converts all of it to float32;
``verse label`` converts only the part under the spine grid). Target: <= 10 s on CPU.

Usage: ``python bench/bench_label.py [--seed 7] [--repeat 2] [--model models/label.pt]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def make_scan(seed: int, folder: Path) -> tuple[Path, Path]:
    from verse_cli import label as LB
    from verse_cli.core import geometry
    from verse_cli.core.io import save_ct
    from verse_cli.synth import generate_case

    case = generate_case(seed, region="thoracolumbar", scale=0.5)
    shape = (512, 512, 400)
    old = np.asarray(case.ct.shape) * geometry.spacing(case.affine)
    # keep the orientation, put 512 x 512 x 400 voxels over the same field of view
    target = np.array(shape)
    new_sp = old / target
    affine = case.affine.copy()
    affine[:3, :3] = case.affine[:3, :3] / geometry.spacing(case.affine) * new_sp
    corner = geometry.vox2world(case.affine, -0.5 * np.ones(3))
    affine[:3, 3] = corner + affine[:3, :3] @ (0.5 * np.ones(3))
    ct = geometry.resample_to_grid(case.ct.astype(np.float32), case.affine, tuple(target), affine, order=1,
                                   cval=-1024.0)
    ct_path = folder / "sub-bench_ct.nii.gz"
    save_ct(ct, affine, ct_path)
    lo, hi = LB.box_of_mask(case.mask, case.affine)
    bbox = folder / "sub-bench_bbox.json"
    bbox.write_text(json.dumps({"world_min": (lo - 10).tolist(), "world_max": (hi + 10).tolist()}))
    return ct_path, bbox


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workdir", default=None, help="Keep the rendered scan here and reuse it.")
    args = ap.parse_args()

    import torch

    from verse_cli import label as LB
    from verse_cli.core.io import load_ct

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if (folder / "sub-bench_ct.nii.gz").exists() and (folder / "sub-bench_bbox.json").exists():
            ct_path, bbox = folder / "sub-bench_ct.nii.gz", folder / "sub-bench_bbox.json"
        else:
            ct_path, bbox = make_scan(args.seed, folder)
        print(f"scan rendered in {time.perf_counter() - t0:.1f} s: {ct_path.name}")
        base, runs = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            img = load_ct(ct_path)
            base.append(time.perf_counter() - t)
            print(f"  shape {img.shape}")
            t = time.perf_counter()
            ctd = LB.run(ct_path, bbox, folder / "ctd.json", model=args.model, device="cpu")
            runs.append(time.perf_counter() - t)
        import subprocess
        import sys

        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "verse_cli.cli", "label", str(ct_path), "--bbox", str(bbox), "-o",
                        str(folder / "ctd_cli.json"), "--device", "cpu"], check=True)
        cli = time.perf_counter() - t
        best, best_base = min(runs), min(base)
        print(f"verse label (read + label + write): best {best:.2f} s of {args.repeat} "
              f"({', '.join(f'{r:.2f}' for r in runs)}); {len(ctd)} vertebrae: "
              f"{' '.join(str(x) for x in ctd.labels)}")
        print(f"baseline load_ct alone: best {best_base:.2f} s")
        print(f"ratio label / load: {best / best_base:.2f}   target <= 10 s: {'PASS' if best <= 10 else 'FAIL'}")
        print(f"whole CLI call in a fresh process (Python start and imports included; no torch on a CPU): {cli:.2f} s")


if __name__ == "__main__":
    main()
