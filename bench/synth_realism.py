"""Realism check of ``verse synth``: intensity statistics of real CT beside synthetic cases.

For each case (the real fixtures in ``../shared/data/real`` and a few synthetic lumbar
cases), everything is first resampled to the same isotropic grid (1.5 mm by default,
Gaussian anti-aliasing before down-sampling), so real 1x1x2 mm and synthetic 0.3-3 mm
voxels are compared at the same scale. Then, per case:

* ``trab``: HU p5/p50/p95 in the vertebral body eroded by 3 mm (trabecular bone); the
  body is the TPTBox body subregion when there is one, else the vertebra within 12 mm
  of its body centroid;
* ``cort``: HU p50/p95 in the outer voxel of the body (the cortical shell, 1.5 mm);
* ``post``: HU p50 in the posterior elements (TPTBox subregions 41-48, else vertebra
  voxels more than 28 mm from the body centroid);
* ``musc``/``fat``: HU p50 of soft tissue 6-40 mm from the spine whose 3 mm-smoothed HU
  lies in 10..100 (muscle) or -160..-50 (fat); ``musc`` also takes enhanced organs
  (kidney, vena cava) of contrast cases, so
* ``para``: HU p50 of that muscle-range tissue dorsal to the spine only (more than 30 mm
  behind the body centroid of the nearest vertebra, in world y): the paraspinal muscles;
* ``noise``: median local standard deviation (3x3x3 voxels) in that muscle, and in fat;
* ``tex``: standard deviation of the high-pass HU (HU minus its 1.5 mm Gaussian) in
  trabecular bone, a simple texture measure.

The synthetic rows end with the spread across cases (min / median / max), which is what
domain randomisation should widen.

Run: ``.venv/bin/python bench/synth_realism.py [--seeds 6] [--max-voxels 4000000] [--mm 1.5]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"
COLS = ["trab5", "trab50", "trab95", "cort50", "cort95", "post50", "musc50", "para50", "fat50", "noiseM", "noiseF", "tex"]


def resample(ct, mask, sub, affine, mm):
    from scipy import ndimage

    sp = np.sqrt((affine[:3, :3] ** 2).sum(0))
    f = sp / mm
    sig = np.where(f < 1, 0.5 * np.sqrt(np.maximum(1 / f ** 2 - 1, 0)), 0)
    ct = ndimage.gaussian_filter(ct.astype(np.float32), sig) if sig.max() > 0 else ct.astype(np.float32)
    ct = ndimage.zoom(ct, f, order=1)
    mask = ndimage.zoom(mask, f, order=0)
    sub = ndimage.zoom(sub, f, order=0) if sub is not None else None
    A = affine.copy()
    A[:3, :3] = affine[:3, :3] / sp * mm
    return ct, mask, sub, A


def stats(ct, mask, sub, affine, mm=1.5) -> dict:
    from scipy import ndimage

    from verse_cli.core.centroids import body_centroids

    ct, mask, sub, A = resample(ct, mask, sub, affine, mm)
    ctd = body_centroids(mask, A).as_dict()
    idx = np.indices(mask.shape, dtype=np.float32)
    body = np.zeros(mask.shape, bool)
    post = np.zeros(mask.shape, bool)
    for lab, c in ctd.items():
        m = mask == lab
        d = np.sqrt(sum((idx[k] - c[k]) ** 2 for k in range(3))) * mm
        if sub is not None and (sub == 50).any():  # TPTBox: 49 corpus border, 50 corpus
            body |= m & ((sub == 49) | (sub == 50))
            post |= m & (sub >= 41) & (sub <= 48)
        else:
            body |= m & (d < 12)
            post |= m & (d > 28)
    trab = ndimage.binary_erosion(body, iterations=2)
    cort = body & ~ndimage.binary_erosion(body) & ndimage.binary_dilation(trab, iterations=4)
    spine = mask > 0
    dist, near_idx = ndimage.distance_transform_edt(~spine, return_indices=True)
    dist *= mm
    near = (dist > 6) & (dist < 40)
    smooth = ndimage.gaussian_filter(ct, 2.0 / mm)
    musc = near & (smooth > 10) & (smooth < 100)
    # dorsal: world y (anterior) more than 30 mm behind the nearest vertebra's body centroid
    para = np.zeros_like(musc)
    if musc.any() and ctd:
        vox = np.argwhere(musc)
        lab = mask[tuple(near_idx[:, musc])]
        cy = np.full(int(mask.max()) + 1, np.nan)
        for k, c in ctd.items():
            cy[k] = (A[:3, :3] @ np.asarray(c, float) + A[:3, 3])[1]
        wy = vox @ A[1, :3] + A[1, 3]
        keep = wy - cy[lab] < -30
        para[tuple(vox[keep].T)] = True
    del near_idx
    fat = near & (smooth > -160) & (smooth < -50)
    m1 = ndimage.uniform_filter(ct, 3)
    m2 = ndimage.uniform_filter(ct * ct, 3)
    lstd = np.sqrt(np.maximum(m2 - m1 * m1, 0))
    hp = ct - ndimage.gaussian_filter(ct, 1.5 / mm)

    def q(region, p):
        return float(np.percentile(ct[region], p)) if region.sum() > 20 else float("nan")

    def med(arr, region):
        return float(np.median(arr[region])) if region.sum() > 20 else float("nan")

    return {"trab5": q(trab, 5), "trab50": q(trab, 50), "trab95": q(trab, 95), "cort50": q(cort, 50),
            "cort95": q(cort, 95), "post50": q(post, 50), "musc50": q(musc, 50),
            "para50": q(para, 50), "fat50": q(fat, 50),
            "noiseM": med(lstd, musc), "noiseF": med(lstd, fat),
            "tex": float(hp[trab].std()) if trab.sum() > 20 else float("nan")}


def real_cases():
    import nibabel as nib

    out = []
    v = REAL / "verse014"
    if v.is_dir():
        ct = nib.load(v / "sub-verse014_ct.nii.gz")
        m = nib.load(v / "sub-verse014_seg-vert_msk.nii.gz")
        out.append(("real verse014", np.asarray(ct.dataobj), np.asarray(m.dataobj).astype(np.uint8), None, ct.affine))
    t = REAL / "tptbox-l3-crop"
    if t.is_dir():
        ct = nib.load(t / "sub-ct_label-22_ct.nii.gz")
        m = nib.load(t / "sub-ct_seg-vert_label-22_msk.nii.gz")
        s = nib.load(t / "sub-ct_seg-subreg_label-22_msk.nii.gz")
        out.append(("real tptbox-L3", np.asarray(ct.dataobj), np.asarray(m.dataobj).astype(np.uint8),
                    np.asarray(s.dataobj).astype(np.uint8), ct.affine))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=300)
    ap.add_argument("--max-voxels", type=int, default=4_000_000)
    ap.add_argument("--mm", type=float, default=1.5)
    args = ap.parse_args()
    from verse_cli.synth import generate_case

    print(f"{'case':<22}" + "".join(f"{c:>8}" for c in COLS))
    for name, ct, m, s, aff in real_cases():
        st = stats(ct, m, s, aff, args.mm)
        print(f"{name:<22}" + "".join(f"{st[c]:>8.0f}" for c in COLS))
    rows = []
    t_total = 0.0
    for i in range(args.seeds):
        seed = args.first_seed + i
        t0 = time.perf_counter()
        case = generate_case(seed, region="lumbar", max_voxels=args.max_voxels)
        t_total += time.perf_counter() - t0
        st = stats(case.ct, case.mask, None, case.affine, args.mm)
        rows.append(st)
        tag = f"syn {seed} {case.meta.get('kernel', '')[:4]}"
        print(f"{tag:<22}" + "".join(f"{st[c]:>8.0f}" for c in COLS))
    if rows:
        arr = np.array([[r[c] for c in COLS] for r in rows])
        for lab, fn in (("synth min", np.nanmin), ("synth median", np.nanmedian), ("synth max", np.nanmax)):
            print(f"{lab:<22}" + "".join(f"{v:>8.0f}" for v in fn(arr, 0)))
        print(f"generation: {t_total / len(rows):.1f} s per case (max_voxels {args.max_voxels:,})")


if __name__ == "__main__":
    main()
