"""Acceptance check of ``verse deface --auto`` (issue 4).

Synthetic heads from :func:`verse_cli.synth.generate_case` (cervical region) record the
face they drew. For every head it runs :func:`verse_cli.deface.auto_face_mask` (margin
5 mm, as the CLI default) and reports

* ``face``: the share of face-mask voxels that are air (<= -1000 HU) after defacing;
* ``vert``: vertebra-mask voxels removed (must be 0);
* a case passes with ``face >= 0.95`` and ``vert == 0``.

Heads are rendered at ``--scale`` 0.4 of the generator's resolution (1 renders full-resolution
heads, several times slower) on four grids, so that the voxel order and the anisotropy come from
the affine: ``default`` (the generator's own grid, seeds 0-79), ``lps`` (1.2 x 1.2 x 3
mm, LPS, seeds 80-89), ``pir`` (2 x 2 x 1 mm, PIR, seeds 90-99) and ``ras`` (0.5 x 0.5 x
2.5 mm, RAS, seeds 100-109). The no-face check runs the same function on scans without a
face, which must come back untouched: synthetic thoracic and lumbar scans (seeds 0-11 on
the default grid, 0-3 on the other three) and the real scans under ``--real``
(verse014, the tptbox crop, and the DICOM fixture converted by ``verse anonymize``).

Per grid it prints the pass count, min and median face share, total vertebra voxels
removed and seconds per case; ``--jsonl`` writes one line per case. A full run takes
about 25 minutes on two loaded cores (the 0.5 mm grid and the no-face scans dominate).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_deface.py --jsonl work/deface.jsonl
    .venv/bin/python bench/eval_deface.py --grids pir --seeds 91,99 --no-noface
    .venv/bin/python bench/eval_deface.py --grids default --seeds 20,21,28 --scale 1 --no-noface
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRIDS = {  # name: (spacing, orientation, seeds)
    "default": (None, None, range(80)),
    "lps": ((1.2, 1.2, 3.0), "LPS", range(80, 90)),
    "pir": ((2.0, 2.0, 1.0), "PIR", range(90, 100)),
    "ras": ((0.5, 0.5, 2.5), "RAS", range(100, 110)),
}
NOFACE_SEEDS = {"default": range(12), "lps": range(4), "pir": range(4), "ras": range(4)}
MARGIN_MM = 5.0
PASS_FACE = 0.95


def deface_case(ct: np.ndarray, affine: np.ndarray):
    from verse_cli.deface import auto_face_mask

    return auto_face_mask(ct.astype(np.float32), affine, margin_mm=MARGIN_MM)


def head_row(seed: int, grid: str, scale: float = 0.4) -> dict:
    """Render one synthetic head and score ``deface --auto`` on it."""
    from verse_cli.synth import generate_case

    spacing, orientation, _ = GRIDS[grid]
    t0 = time.perf_counter()
    case = generate_case(seed, region="cervical", scale=scale, spacing=spacing, orientation=orientation)
    if case.face_mask is None or not case.face_mask.any():
        return {"grid": grid, "seed": seed, "has_face": False}
    t1 = time.perf_counter()
    removed, report = deface_case(case.ct, case.affine)
    seconds = time.perf_counter() - t1
    face = case.face_mask > 0
    air_after = np.where(removed, -1024, case.ct) <= -1000
    row = {"grid": grid, "seed": seed, "has_face": True,
           "face": round(float(air_after[face].mean()), 4),
           "vert": int(removed[case.mask > 0].sum()),
           "found": report.face_found, "reason": report.reason,
           "s_deface": round(seconds, 2), "s_render": round(t1 - t0, 2)}
    row["pass"] = row["face"] >= PASS_FACE and row["vert"] == 0
    return row


def real_scans(real: Path, tmp: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, HU, affine) of the real scans that are present (none of them shows a face)."""
    import nibabel as nib

    from verse_cli.anonymize import anonymize

    scans = []
    for name in ("verse014/sub-verse014_ct.nii.gz", "tptbox-l3-crop/sub-ct_label-22_ct.nii.gz"):
        if (real / name).exists():
            img = nib.load(str(real / name))
            scans.append((name.split("/")[0], np.asarray(img.dataobj), img.affine))
    dicom = real / "ct-dicom-siemens"
    if dicom.is_dir():
        out = tmp / "dicom_ct.nii.gz"
        anonymize(dicom, out, subject="bench")
        img = nib.load(str(out))
        scans.append(("ct-dicom-siemens", np.asarray(img.dataobj), img.affine))
    return scans


def noface_rows(real: Path, scale: float = 0.4) -> list[dict]:
    """``deface --auto`` on scans without a face: each must remove nothing."""
    from verse_cli.synth import generate_case

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, hu, affine in real_scans(real, Path(tmp)):
            t0 = time.perf_counter()
            removed, report = deface_case(hu, affine)
            rows.append({"noface": name, "removed": int(removed.sum()), "reason": report.reason,
                         "s_deface": round(time.perf_counter() - t0, 2)})
            print(json.dumps(rows[-1]), flush=True)
    for grid, seeds in NOFACE_SEEDS.items():
        spacing, orientation, _ = GRIDS[grid]
        for seed in seeds:
            for region in ("thoracic", "lumbar"):
                case = generate_case(seed, region=region, scale=scale, spacing=spacing, orientation=orientation)
                t0 = time.perf_counter()
                removed, report = deface_case(case.ct, case.affine)
                rows.append({"noface": f"synth-{region}-{grid}-{seed}", "removed": int(removed.sum()),
                             "reason": report.reason, "s_deface": round(time.perf_counter() - t0, 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def grid_summary(rows: list[dict]) -> dict:
    faces = [r for r in rows if r["has_face"]]
    share = np.array([r["face"] for r in faces]) if faces else np.array([np.nan])
    return {"cases": len(faces), "passed": sum(r["pass"] for r in faces),
            "face_min": round(float(share.min()), 4), "face_median": round(float(np.median(share)), 4),
            "vert_removed": sum(r["vert"] for r in faces),
            "s_per_case": round(float(np.mean([r["s_deface"] for r in faces])), 2) if faces else None,
            "failed": [(r["seed"], r["face"], r["vert"]) for r in faces if not r["pass"]],
            "without_face": [r["seed"] for r in rows if not r["has_face"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", default=",".join(GRIDS), help="comma-separated subset of " + ", ".join(GRIDS))
    ap.add_argument("--seeds", help="comma-separated seeds instead of each grid's own range")
    ap.add_argument("--no-noface", action="store_true", help="skip the no-face check")
    ap.add_argument("--real", type=Path, default=Path("../shared/data/real"), help="folder of the real scans")
    ap.add_argument("--jsonl", type=Path, help="write one JSON line per case here")
    ap.add_argument("--scale", type=float, default=0.4,
                    help="generator scale (1 = its full resolution, several times slower)")
    args = ap.parse_args(argv)
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    unknown = [g for g in grids if g not in GRIDS]
    if unknown:
        ap.error(f"unknown grid(s) {unknown}; choose from {list(GRIDS)}")
    sink = args.jsonl.open("w") if args.jsonl else None
    summaries = {}
    for grid in grids:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else GRIDS[grid][2]
        rows = []
        for seed in seeds:
            rows.append(head_row(seed, grid, args.scale))
            print(json.dumps(rows[-1]), flush=True)
            if sink:
                sink.write(json.dumps(rows[-1]) + "\n")
                sink.flush()
        summaries[grid] = grid_summary(rows)
    ok = all(s["passed"] == s["cases"] for s in summaries.values())
    if not args.no_noface:
        nf = noface_rows(args.real, args.scale)
        if sink:
            sink.writelines(json.dumps(r) + "\n" for r in nf)
        changed = [r["noface"] for r in nf if r["removed"]]
        summaries["noface"] = {"scans": len(nf), "changed": changed,
                               "s_per_case": round(float(np.mean([r["s_deface"] for r in nf])), 2) if nf else None}
        ok = ok and not changed
    if sink:
        sink.close()
    print("\nsummary")
    for grid, s in summaries.items():
        print(f"  {grid:8s} " + json.dumps(s))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
