"""Time ``verse evaluate`` on a 25-label pair of 512x512x400 masks, against MedPy.

Builds a synthetic spine (C1-L6, 25 labels; body, arch and spinous process per
vertebra) on a 0.8 x 0.8 x 1.5 mm grid, perturbs it into a "prediction" (shifts,
erosions, dilations), and times:

* :func:`verse_cli.evaluate.evaluate_arrays` on the whole pair (all per-vertebra
  metrics plus body centroids of both masks and the identification rate), in wall
  and CPU time: on a shared, overloaded machine the CPU time is what an idle one
  would take as wall time (the work is single-threaded);
* MedPy's ``hd95`` on the same per-label crops that verse uses, checking that the
  values agree;
* with ``--full``, MedPy's ``hd95`` for one label on the full volumes (as it is
  usually called), extrapolated to 25 labels (takes minutes).

Run: ``.venv/bin/python bench/bench_evaluate.py [--full]``
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

SHAPE = (512, 512, 400)
SPACING = (0.8, 0.8, 1.5)


def synthetic_spine(shape=SHAPE, spacing=SPACING) -> tuple[np.ndarray, np.ndarray]:
    """A 25-vertebra label mask stacked along the third axis, and its affine."""
    sx, sy, sz = spacing
    x = (np.arange(shape[0]) - shape[0] / 2) * sx
    y = (np.arange(shape[1]) - shape[1] / 2) * sy
    xx, yy = np.meshgrid(x, y, indexing="ij")
    mask = np.zeros(shape, dtype=np.uint8)
    n = 25
    pitch = shape[2] * sz / n
    for k in range(n):
        scale = 0.6 + 0.5 * k / n  # cervical small, lumbar large
        cx = 15 * np.sin(k / 6)  # a gentle lateral curve
        rx, ry = 20 * scale, 16 * scale
        body = ((xx - cx) / rx) ** 2 + ((yy + 10) / ry) ** 2 <= 1
        ring_r = np.hypot(xx - cx, (yy - 18 * scale) / 1.1)
        arch = (ring_r >= 9 * scale) & (ring_r <= 15 * scale) & (yy > 5 * scale - 10)
        spinous = (np.abs(xx - cx) <= 3.5) & (yy > 18 * scale) & (yy < 18 * scale + 30 * scale)
        z0 = int(k * pitch / sz) + 1
        z1 = int((k + 1) * pitch / sz) - 2
        zb = slice(z0, z1)
        za = slice(z0 + (z1 - z0) // 4, z1 - (z1 - z0) // 4)
        mask[:, :, zb][body] = k + 1
        mask[:, :, za][arch | spinous] = k + 1
    affine = np.diag([*spacing, 1.0])
    return mask, affine


def perturb(mask: np.ndarray) -> np.ndarray:
    """A plausible prediction: some labels shifted, some eroded, some dilated."""
    from scipy import ndimage

    pred = np.zeros_like(mask)
    boxes = ndimage.find_objects(mask)
    for lab, box in enumerate(boxes, start=1):
        grown = tuple(slice(max(s.start - 3, 0), min(s.stop + 3, n)) for s, n in zip(box, mask.shape))
        part = mask[grown] == lab
        if lab % 3 == 0:
            part = np.roll(part, 2, axis=0)
        elif lab % 3 == 1:
            part = ndimage.binary_erosion(part)
        else:
            part = ndimage.binary_dilation(part)
        view = pred[grown]
        view[part & (view == 0)] = lab
    return pred


def main() -> None:
    from medpy.metric.binary import hd95
    from scipy import ndimage

    from verse_cli.evaluate import _union_box, evaluate_arrays, surface_distances

    t0 = time.perf_counter()
    gt, affine = synthetic_spine()
    pred = perturb(gt)
    print(f"pair: {gt.shape} voxels, spacing {SPACING} mm, {len(np.unique(gt)) - 1} labels "
          f"(built in {time.perf_counter() - t0:.1f} s)")

    evaluate_arrays(pred[:, :, :40], gt[:, :, :40], affine)  # warm up imports
    t0, c0 = time.perf_counter(), time.process_time()
    report = evaluate_arrays(pred, gt, affine)
    t_verse, c_verse = time.perf_counter() - t0, time.process_time() - c0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"verse evaluate_arrays (all metrics, body centroids, id rate): {t_verse:.2f} s wall, "
          f"{c_verse:.2f} s CPU (single thread; load average {load:.1f} on {os.cpu_count()} cores) "
          f"[target <= 5 s] mean Dice {report['mean_dice']:.3f}, id.rate {report['id_rate']:.2f}")

    gt_boxes, pred_boxes = ndimage.find_objects(gt), ndimage.find_objects(pred)
    t_crop, t_ours, worst = 0.0, 0.0, 0.0
    for lab in range(1, 26):
        box = _union_box([gt_boxes[lab - 1], pred_boxes[lab - 1]], gt.shape)
        a, b = pred[box] == lab, gt[box] == lab
        t0 = time.process_time()
        ref = hd95(a, b, voxelspacing=SPACING)
        t_crop += time.process_time() - t0
        t0 = time.process_time()
        d_ab, d_ba = surface_distances(a, b, SPACING)
        ours = float(np.percentile(np.concatenate([d_ab, d_ba]), 95))
        t_ours += time.process_time() - t0
        worst = max(worst, abs(ours - ref))
    print(f"hd95 of 25 labels on the same crops (CPU time): MedPy {t_crop:.2f} s, verse {t_ours:.2f} s "
          f"(ratio {t_crop / t_ours:.2f}x); largest |hd95 difference| {worst:.2e} mm")
    print(f"ratio MedPy hd95 on crops / whole verse evaluation (CPU): {t_crop / c_verse:.2f}x "
          "(verse also computes Dice, HD, ASSD, volumes, body centroids and the id rate)")

    if "--full" in sys.argv:  # MedPy as usually called: whole volumes, label by label (minutes)
        t0 = time.process_time()
        full = hd95(pred == 13, gt == 13, voxelspacing=SPACING)
        t_one = time.process_time() - t0
        print(f"MedPy hd95, label 13 on full volumes: {t_one:.2f} s CPU ({full:.4f} mm) -> 25 labels ~ "
              f"{25 * t_one:.0f} s (extrapolated); ratio MedPy/verse = {25 * t_one / c_verse:.0f}x")
    else:
        print("(--full also times MedPy hd95 on the full volumes, as it is usually called: minutes)")


if __name__ == "__main__":
    main()
