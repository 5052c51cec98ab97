"""Does ``verse detect`` + ``verse label`` survive a scan tilted beyond the label net's training?

Four synthetic cases (thoracolumbar, lumbar, cervical, whole spine; seeds outside the
training ranges) are tilted as a whole in world space by 0, 25, 35 and 45 degrees (the
voxels stay, the affine turns). Each is run through ``detect`` and then ``label`` twice in
the same process: with the upright turn (the default) and, as the baseline, without it
(``upright=False``). Printed: vertebrae identified (VerSe ``get_hits``, centroids compared
in the untilted world) per case and angle, and the totals with their ratio.

Usage::

    .venv/bin/python bench/robust_tilt.py [--angles 0 25 35 45]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ((91042, "thoracolumbar"), (4242, "lumbar"), (777, "cervical"), (5, "whole"))


def tilt_about(centre: np.ndarray, degrees: float) -> np.ndarray:
    """A world rotation by ``degrees`` away from superior (towards R and a little A) about ``centre``."""
    from verse_cli.core import geometry

    t = np.radians(degrees)
    R = geometry.rotation_between([0, 0, 1.0], [np.sin(t) * np.cos(0.3), np.sin(t) * np.sin(0.3), np.cos(t)])
    return geometry.rotation_about(R, centre)


def main() -> None:
    import nibabel as nib

    from verse_cli import label as LB
    from verse_cli.core import geometry
    from verse_cli.detect import detect
    from verse_cli.evaluate import get_hits
    from verse_cli.synth import generate_case

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--angles", type=float, nargs="+", default=[0.0, 25.0, 35.0, 45.0])
    args = parser.parse_args()
    net = LB.load_model(None, "cpu")
    totals = {True: 0, False: 0}
    seconds = {True: 0.0, False: 0.0}
    n = 0
    for seed, region in CASES:
        case = generate_case(seed, region=region, scale=0.5)
        ct, aff = np.asarray(case.ct), case.affine
        truth = dict(zip(case.centroids.labels, case.centroids.to_world(aff)))
        centre = np.mean(list(truth.values()), axis=0)
        for deg in args.angles:
            img = nib.Nifti1Image(ct, tilt_about(centre, deg) @ aff)
            _, box = detect(img, device="cpu")
            hits = {}
            for upright in (False, True):
                t = time.perf_counter()
                ctd = LB.label(img, box, model=net, upright=upright)
                seconds[upright] += time.perf_counter() - t
                found = dict(zip(ctd.labels, geometry.vox2world(aff, ctd.coords)))
                hits[upright] = sum(get_hits(truth, found).values())
                totals[upright] += hits[upright]
            n += len(truth)
            print(f"{region:13s} tilted {deg:4.0f} deg: identified {hits[True]:2d} of {len(truth):2d} "
                  f"(without the turn {hits[False]:2d})", flush=True)
    print(f"total: {totals[True]} of {n} identified ({totals[True] / n:.1%}); without the turn {totals[False]} "
          f"({totals[False] / n:.1%}); ratio {totals[True] / max(totals[False], 1):.2f}x; label time "
          f"{seconds[True]:.1f} s vs {seconds[False]:.1f} s ({seconds[True] / max(seconds[False], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
