"""Benchmark ``verse detect`` on a 512x512x400 CT: seconds and peak memory.

Prints, for a synthetic body-like CT (0.78 x 0.78 x 1 mm, int16 HU in an uncompressed
NIfTI, loaded as float32 the way the CLI loads it):

* ``load``: reading the file (not part of the 3 s budget, shown for context);
* ``detect``: :func:`verse_cli.detect.detect` -- coarse resampling + CNN + box;
* ``resample``: the coarse resampling alone, and the baseline it replaces, scipy's
  order-1 ``affine_transform`` straight from the full grid (``core.geometry``), with the
  ratio baseline / ours;
* peak resident memory of the process (``ru_maxrss``), which includes the CT itself.

Run: ``.venv/bin/python bench/bench_detect.py [--model models/detect.pt]``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, *args, **kwargs):
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t, time.process_time() - c


def make_ct(path: Path, shape=(512, 512, 400)) -> None:
    """A crude torso: soft-tissue ellipse, fat rim, a bright spine column, air around."""
    import nibabel as nib

    i = np.arange(shape[0], dtype=np.float32)[:, None] - shape[0] / 2
    j = np.arange(shape[1], dtype=np.float32)[None, :] - shape[1] / 2
    body = (i / 210) ** 2 + (j / 160) ** 2 < 1
    fat = ((i / 210) ** 2 + (j / 160) ** 2 < 1) & ~((i / 195) ** 2 + (j / 145) ** 2 < 1)
    spine = (i / 25) ** 2 + ((j + 90) / 25) ** 2 < 1
    plane = np.where(spine, 500, np.where(fat, -100, np.where(body, 40, -1000))).astype(np.int16)
    data = np.broadcast_to(plane[:, :, None], shape).copy()
    data[:, :, ::37] += 30  # a little structure along z
    affine = np.diag([-0.78, -0.78, 1.0, 1.0])
    affine[:3, 3] = [200, 200, -200]
    nib.save(nib.Nifti1Image(data, affine), str(path))


def measure(ct_path: Path, model_path: Path) -> None:
    """The timed part, in a fresh process so that peak RSS is the detector's own."""
    from scipy import ndimage

    from verse_cli.core.errors import DataError
    from verse_cli.core.geometry import resample_to_spacing
    from verse_cli.core.io import load_ct
    from verse_cli.detect import detect, to_coarse
    from verse_cli.nets.detect_net import load_model

    base_rss = _peak_mb()
    model = load_model(model_path, "cpu")
    spacing = float(model[0].config["spacing_mm"])
    img, t_load, _ = _timed(load_ct, ct_path)
    data = np.asarray(img.dataobj)
    from verse_cli.nets.train import cpu_threads

    print(f"model {model[1]['name']} {model[1]['hash']} channels {model[0].config['channels']}")
    print(f"CT {data.shape} {data.dtype}, {data.nbytes / 2**20:.0f} MiB in memory; torch threads "
          f"{cpu_threads()} (1 when the machine is loaded); coarse grid {spacing:g} mm")
    print(f"load        {t_load:6.2f} s (not in the budget)")
    runs = []
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        try:
            _, box = detect(img, model=model, device="cpu")
            note = f"score {box['score']}"
        except DataError as exc:  # random weights find nothing; the time still counts
            note = str(exc)
        runs.append((time.perf_counter() - t, time.process_time() - c))
    t_det, c_det = min(runs)
    print(f"detect      {t_det:6.2f} s wall, {c_det:5.2f} s CPU (best of 3; {note})")
    print(f"peak RSS    {_peak_mb():6.0f} MiB (whole process; {base_rss:.0f} MiB at start)")
    (_, t_ours, c_ours) = _timed(to_coarse, data, img.affine, spacing)
    (_, t_naive, c_naive) = _timed(resample_to_spacing, data, img.affine, spacing, order=1)
    sigma = spacing / 2.355 / np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    smooth = lambda: resample_to_spacing(ndimage.gaussian_filter(data, sigma), img.affine, spacing, order=1)
    (_, t_aa, c_aa) = _timed(smooth)
    print(f"resample    ours (block mean + linear)           {t_ours:6.2f} s wall {c_ours:5.2f} s CPU")
    print(f"  baseline  scipy order-1, full grid, aliased     {t_naive:6.2f} s wall {c_naive:5.2f} s CPU"
          f"  ratio {c_naive / c_ours:5.2f}x")
    print(f"  baseline  Gaussian anti-alias + scipy order-1   {t_aa:6.2f} s wall {c_aa:5.2f} s CPU"
          f"  ratio {c_aa / c_ours:5.2f}x")
    ok = c_det <= 3.0 and _peak_mb() <= 2048
    print("within budget (<= 3 s CPU, <= 2 GiB):", "yes" if ok else "NO",
          "(wall time counts waits for the shared cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="weights (default: bundled, else random)")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.model)
        return
    if args.make:
        make_ct(args.make)
        return

    from verse_cli.detect import DEFAULT_MODEL
    from verse_cli.nets.detect_net import SpineNet3D
    from verse_cli.nets.train import save_bundle

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or DEFAULT_MODEL
        if not model_path.is_file():
            model_path = Path(tmp) / "random.pt"
            net = SpineNet3D()
            save_bundle(model_path, net.arch, net.config, net.state_dict(), {"note": "random weights"})
            print("(no trained model: timing random weights)")
        ct_path = Path(tmp) / "ct.nii"
        # each step in its own process: the peak RSS of a child counts from its parent's
        subprocess.run([sys.executable, __file__, "--make", str(ct_path)], check=True)
        subprocess.run([sys.executable, __file__, "--measure", str(ct_path), "--model", str(model_path)],
                       check=True)


if __name__ == "__main__":
    main()
