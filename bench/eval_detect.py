"""Acceptance check of ``verse detect``: does the box hold every labelled voxel, and how loosely?

For every case with a CT and a vertebra mask under the given folders (VerSe layout or
flat, see ``discover_cases``) it runs :func:`verse_cli.detect.detect` and reports

* ``contained``: every labelled voxel lies inside the box's voxel ranges;
* ``excess``: how far the box reaches past the labelled extent, per side in mm (world
  RAS axes; the labelled extent is the world box of the mask voxels' corners), averaged
  over the six sides, and the largest single side;
* ``miss``: the largest distance a labelled voxel lies outside the box (0 if contained).

With ``--dicom-nifti CT --dicom-ref SEG`` it also reports the share of the reference
segmentation's T11/T12 voxels (TotalSegmentator ids 32, 33) inside the box.

Run: ``.venv/bin/python bench/eval_detect.py work/detect_eval ../shared/data/real/verse014``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def labelled_extent(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS) box of the corners of all labelled voxels."""
    from verse_cli.core.geometry import vox2world

    ijk = np.argwhere(mask > 0)
    xyz = vox2world(affine, ijk)
    half = np.abs(np.asarray(affine)[:3, :3]) @ np.full(3, 0.5)
    return xyz.min(axis=0) - half, xyz.max(axis=0) + half


LOW = 0.25  # hysteresis level (--low; "none" for no growing)
MIDLINE = True  # rank components by heat near the body's midline (--no-midline: by heat alone)


def evaluate_case(ct_path: Path, mask_path: Path, model, margins=(10.0,), thresholds=(0.5,)) -> list[dict]:
    """One result per (threshold, margin); the heatmap is computed once, the box as ``detect`` makes it."""
    from verse_cli.core.io import load_ct, load_mask
    from verse_cli.detect import (
        body_midline,
        box_voxel_ranges,
        check_ct_intensities,
        heatmap_box,
        to_coarse,
        world_bounds,
    )
    from verse_cli.nets.detect_net import predict_heatmap

    img = load_ct(ct_path)
    mask = np.asarray(load_mask(mask_path).dataobj)
    t = time.perf_counter()
    data = np.asarray(img.dataobj)
    check_ct_intensities(data, ct_path)
    net = model[0]
    coarse, grid_affine = to_coarse(data, img.affine, float(net.config["spacing_mm"]))
    heat = predict_heatmap(net, coarse, "cpu")
    midline = body_midline(coarse, grid_affine) if MIDLINE else None
    seconds = time.perf_counter() - t
    fov = world_bounds(img.shape, img.affine)
    gt_lo, gt_hi = labelled_extent(mask, img.affine)
    results = []
    for threshold in thresholds:
        box = heatmap_box(heat, grid_affine, threshold=threshold, margin_mm=0.0, clip_to=fov, low=LOW,
                          midline_r=midline)
        for margin in margins:
            row = {"case": ct_path.name, "margin_mm": margin, "threshold": threshold}
            if box is None:
                results.append({**row, "error": "empty heatmap"})
                continue
            lo = np.maximum(box.ras_min - margin, fov[0])
            hi = np.minimum(box.ras_max + margin, fov[1])
            sl = tuple(slice(a, b) for a, b in box_voxel_ranges(lo, hi, img.shape, img.affine))
            contained = int((mask[sl] > 0).sum()) == int((mask > 0).sum())
            excess = np.concatenate([gt_lo - lo, hi - gt_hi])
            results.append({**row, "contained": contained,
                            "excess_mean_mm": float(np.maximum(excess, 0).mean()),
                            "excess_sides_mm": np.round(np.maximum(excess, 0), 1).tolist(),
                            "excess_max_mm": float(excess.max()), "miss_mm": float(max(0.0, -excess.min())),
                            "score": round(box.score, 4), "seconds": round(seconds, 2)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--dicom-nifti", type=Path, default=None)
    parser.add_argument("--dicom-ref", type=Path, default=None)
    parser.add_argument("--margins", default="10", help="comma-separated box margins in mm to compare")
    parser.add_argument("--thresholds", default="0.5", help="comma-separated heatmap thresholds to compare")
    parser.add_argument("--low", default="0.25", help="hysteresis level of the box region, or 'none'")
    parser.add_argument("--no-midline", action="store_true", help="rank heat components by heat alone")
    parser.add_argument("--json", type=Path, default=None, help="write the per-case results here")
    args = parser.parse_args()
    global LOW, MIDLINE
    LOW = None if args.low.lower() == "none" else float(args.low)
    MIDLINE = not args.no_midline

    from verse_cli.detect import DEFAULT_MODEL
    from verse_cli.nets.detect_net import load_model
    from verse_cli.nets.train import discover_cases

    model = load_model(args.model or DEFAULT_MODEL, "cpu")
    print(f"model {model[1]['name']} {model[1]['hash']}")
    margins = [float(m) for m in args.margins.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    results = []
    for folder in args.folders:
        for case in discover_cases(folder):
            if case.mask is None:
                continue
            for r in evaluate_case(case.ct, case.mask, model, margins, thresholds):
                results.append(r)
                print(json.dumps(r))
    for threshold, margin in [(t, m) for t in thresholds for m in margins]:
        rows = [r for r in results if r["margin_mm"] == margin and r["threshold"] == threshold]
        ok = [r for r in rows if "error" not in r]
        if ok:
            print(f"threshold {threshold:g}, margin {margin:g} mm: cases {len(rows)}, errors {len(rows) - len(ok)}, "
                  f"contained {sum(r['contained'] for r in ok)}/{len(ok)}, "
                  f"mean excess per side {np.mean([r['excess_mean_mm'] for r in ok]):.1f} mm "
                  f"(L,P,I,R,A,S: {' '.join(f'{v:.1f}' for v in np.mean([r['excess_sides_mm'] for r in ok], axis=0))}) "
                  f"(worst case {max(r['excess_mean_mm'] for r in ok):.1f}), "
                  f"max miss {max(r['miss_mm'] for r in ok):.1f} mm")
    if args.dicom_nifti and args.dicom_ref:
        from verse_cli.core.io import load_ct, load_mask
        from verse_cli.detect import detect

        img = load_ct(args.dicom_nifti)
        ref = np.asarray(load_mask(args.dicom_ref).dataobj)
        _, box = detect(img, model=model, device="cpu", source=args.dicom_nifti, margin_mm=margins[-1],
                        threshold=thresholds[-1], low=LOW, midline=MIDLINE)
        sl = tuple(slice(a, b) for a, b in box["voxel_ranges"])
        for lab, name in ((33, "T11"), (32, "T12")):
            total = int((ref == lab).sum())
            inside = int((ref[sl] == lab).sum())
            print(f"DICOM fixture (threshold {thresholds[-1]:g}, margin {margins[-1]:g} mm) {name}: {inside}/{total} voxels inside the box "
                  f"({100 * inside / max(total, 1):.1f} %); box ranges {box['voxel_ranges']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
