"""Does ``verse detect`` + ``verse label`` give the same answer on a real scan resampled to other grids?

The real verse014 (sagittal, PIR, 1 x 1 x 2 mm) is rewritten on other voxel grids: the
same voxels in another axis order, thicker slices, a finer in-plane grid. The anatomy
does not change, so a robust pipeline names the same vertebrae at the same places. For
each grid: the detect box, then the label centroids against the expert centroids
(VerSe identification rate, :func:`verse_cli.evaluate.get_hits`, and the mean distance
of the identified ones). The baseline, first row, is the native grid in the same process.
With ``--box-shifts`` each grid is labelled again with the detect box moved by at most
1.5 mm (:data:`BOX_SHIFTS`): a robust answer does not hinge on where the box falls.

Usage::

    .venv/bin/python bench/robust_real.py [--real ../shared/data/real] [--box-shifts]

Needs the real fixtures (exits with a message when they are absent).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, axis codes, zoom factors along those axes); zoom < 1 makes voxels larger
GRIDS = [
    ("native PIR 1x1x2", None, None),
    ("RAS, same voxels", ("R", "A", "S"), None),
    ("LPI, 2 mm axial", ("L", "P", "I"), (1.0, 1.0, 0.5)),
    ("ASR, 0.8 mm sagittal", ("A", "S", "R"), (1.25, 1.25, 1.0)),
    ("RAS, 1.5 mm", ("R", "A", "S"), (1.0, 0.667, 0.667)),
]


def regrid(ct: np.ndarray, affine: np.ndarray, codes, zoom) -> tuple[np.ndarray, np.ndarray]:
    """The CT in another axis order and, with ``zoom``, resampled (linear) to a new voxel size."""
    from scipy import ndimage

    from verse_cli.core import geometry

    if codes is None:
        return ct, affine
    data, aff = geometry.reorient(ct, affine, codes)
    if zoom is None:
        return data, aff
    zoom = np.asarray(zoom, float)
    # a scanner's larger voxel averages what it covers: smooth before sampling where voxels grow
    sigma = np.maximum(1.0 / zoom - 1.0, 0.0) / 2.0
    data = ndimage.gaussian_filter(data.astype(np.float32), sigma) if np.any(sigma > 0) else data
    out_shape = np.maximum(np.round(np.asarray(data.shape) * zoom).astype(int), 1)
    # voxel i of the new grid sits at old index i * step, so corners stay on the scanned extent
    step = (np.asarray(data.shape) - 1) / np.maximum(out_shape - 1, 1)
    new_aff = aff.copy()
    new_aff[:3, :3] = aff[:3, :3] * step
    new = geometry.resample_to_grid(data.astype(np.float32), aff, tuple(out_shape), new_aff, order=1)
    return np.round(new).astype(np.int16), new_aff


#: Shifts (world mm, R A S) of the detect box: a box a detector might as well have drawn
BOX_SHIFTS = [(0, 0, -1.5), (0, 0, -0.75), (0, 0, 0.75), (0, 0, 1.5), (0.75, 0.75, 0), (-0.75, -0.75, 0)]


def shifted(box: dict, shift) -> dict:
    """The detect box moved by ``shift`` mm."""
    out = dict(box)
    out["ras_min_mm"] = [float(v) for v in np.add(box["ras_min_mm"], shift)]
    out["ras_max_mm"] = [float(v) for v in np.add(box["ras_max_mm"], shift)]
    return out


def run_grid(ct: np.ndarray, affine: np.ndarray, truth: dict, box_shift=None) -> dict:
    import nibabel as nib

    from verse_cli.detect import detect
    from verse_cli.evaluate import get_hits
    from verse_cli.label import label

    img = nib.Nifti1Image(ct, affine)
    start = time.perf_counter()
    _, box = detect(img, device="cpu")
    if box_shift is not None:
        box = shifted(box, box_shift)
    ctd = label(img, box, device="cpu")
    seconds = time.perf_counter() - start
    pred = dict(zip(ctd.labels, ctd.to_world(affine)))
    hits = get_hits(truth, pred)
    found = [lab for lab, hit in hits.items() if hit]
    dist = [float(np.linalg.norm(truth[lab] - pred[lab])) for lab in found]
    return {"id_rate": len(found) / len(truth), "loc_mm": float(np.mean(dist)) if dist else float("nan"),
            "labels": ctd.labels, "seconds": seconds, "box_z": (box["ras_min_mm"][2], box["ras_max_mm"][2])}


def main() -> None:
    import nibabel as nib

    from verse_cli.core import labels as L
    from verse_cli.core.centroids import read_centroids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    parser.add_argument("--box-shifts", action="store_true",
                        help="also label each grid with the detect box shifted by up to 1.5 mm (BOX_SHIFTS)")
    args = parser.parse_args()
    case = args.real / "verse014"
    if not case.is_dir():
        sys.exit(f"{case}: real fixture not found")
    img = nib.load(str(case / "sub-verse014_ct.nii.gz"))
    ct = np.asarray(img.dataobj).astype(np.int16)
    gt = read_centroids(case / "sub-verse014_seg-vb_ctd.json")
    truth = dict(zip(gt.labels, gt.to_world(img.affine)))
    print(f"verse014: {img.shape} voxels, {np.round(img.header.get_zooms(), 2).tolist()} mm, "
          f"{''.join(nib.aff2axcodes(img.affine))}; truth {', '.join(L.name(x) for x in gt.labels)}")
    run_grid(ct, img.affine, truth)  # loads the nets, so that the timings compare
    base = None
    runs = runs_right = 0
    for name, codes, zoom in GRIDS:
        data, aff = regrid(ct, img.affine, codes, zoom)
        r = run_grid(data, aff, truth)
        base = base or r
        spacing = np.round(np.sqrt((aff[:3, :3] ** 2).sum(0)), 2).tolist()
        print(f"{name:22s} {''.join(nib.aff2axcodes(aff))} {spacing}: id rate {r['id_rate']:.2f} "
              f"(native {base['id_rate']:.2f}), loc {r['loc_mm']:.1f} mm, labels "
              f"{' '.join(L.name(x) for x in r['labels'])}; box z {r['box_z'][0]:.0f}..{r['box_z'][1]:.0f} mm; "
              f"{r['seconds']:.1f} s ({r['seconds'] / base['seconds']:.2f}x native)", flush=True)
        if args.box_shifts:
            right = [run_grid(data, aff, truth, s)["id_rate"] == 1.0 for s in BOX_SHIFTS]
            runs_right += int(r["id_rate"] == 1.0) + sum(right)
            runs += 1 + len(right)
            print(f"{'':22s} with the box shifted: {sum(right)} of {len(right)} fully identified", flush=True)
    if args.box_shifts:
        print(f"all grids and box shifts: {runs_right} of {runs} runs fully identified")


if __name__ == "__main__":
    main()
