"""``verse evaluate``: VerSe metrics for one case or a whole dataset.

Per vertebra (every label in the ground truth or the prediction):

* ``dice``: 2|A∩B| / (|A| + |B|).
* ``hd_mm``: symmetric Hausdorff distance (the maximum) between the two surfaces.
* ``hd95_mm``: 95th percentile of the pooled surface distances of both directions
  (MedPy's ``hd95`` definition).
* ``assd_mm``: average symmetric surface distance, the mean of the pooled surface
  distances of both directions (MedPy's ``assd`` definition since 0.5).
* ``vol_gt_ml``, ``vol_pred_ml``, ``vol_diff_ml`` (prediction minus truth) and
  ``vol_diff_pct`` (relative to the truth).
* ``loc_mm``: distance between predicted and true centroid; ``hit``: identified or not.

Surfaces are the voxels removed by one 6-connected erosion; distances come from a
Euclidean distance transform with the true (anisotropic) voxel spacing, computed on
the union bounding box of the two labels only.

Per case: ``mean_dice`` over the ground-truth vertebrae (a missed vertebra counts
0), ``binary_dice`` of ``pred > 0`` against ``gt > 0`` (as the VerSe notebook
computes it), the identification rate exactly as VerSe's ``get_hits``, the mean
localisation distance over the labels present in both centroid sets, and the
missed, extra and mislabelled vertebrae by name.

Identification (VerSe ``utils/eval_utilities.get_hits``): for the labels present in
both the true and the predicted centroids, predicted centroid *k* is a hit when the
nearest true centroid (among those labels) is *k* and lies at most 20 mm away.
``id_rate = hits / number of true centroids``. Distances are world millimetres.

The dataset summary gives the mean and median over cases, a breakdown by region
(C/T/L/S) over vertebrae, and the pooled ``id_rate = total hits / total true
vertebrae``.
"""

from __future__ import annotations

import csv as _csv
import io as _io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core import geometry
from .core import labels as L
from .core.centroids import Centroids, LabelStats, body_centroids, label_stats, parse_centroids
from .core.errors import DataError, UsageError
from .core.io import is_stdio, load_mask, write_json, write_text_atomic
from .core.progress import info, track, verbosity, warn

HIT_DISTANCE_MM = 20.0

CSV_FIELDS = ("subject", "label", "name", "region", "in_gt", "in_pred", "dice", "hd_mm", "hd95_mm",
              "assd_mm", "vol_gt_ml", "vol_pred_ml", "vol_diff_ml", "vol_diff_pct", "loc_mm", "hit")


# --------------------------------------------------------------------------- surface distances
def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: from each surface voxel of ``a`` to the surface
    of ``b``, and from ``b`` to ``a``.

    ``a`` and ``b`` are boolean arrays of the same shape, both non-empty. The
    surface of a set is the set minus its 6-connected erosion (voxels on the array
    border are surface voxels).
    """
    from scipy import ndimage

    sp = np.asarray(spacing, dtype=np.float64)
    a_border = _border(a, ndimage)
    b_border = _border(b, ndimage)
    if np.array_equal(a_border, b_border):
        zeros = np.zeros(int(a_border.sum()))
        return zeros, zeros.copy()
    d_ab = ndimage.distance_transform_edt(~b_border, sampling=sp)[a_border]
    d_ba = ndimage.distance_transform_edt(~a_border, sampling=sp)[b_border]
    return d_ab, d_ba


def _border(x: np.ndarray, ndimage) -> np.ndarray:
    return x & ~ndimage.binary_erosion(x, structure=ndimage.generate_binary_structure(3, 1))


def distance_metrics(a: np.ndarray, b: np.ndarray, spacing) -> dict[str, float]:
    """``hd_mm``, ``hd95_mm`` and ``assd_mm`` between two non-empty boolean arrays."""
    d_ab, d_ba = surface_distances(a, b, spacing)
    pooled = np.concatenate([d_ab, d_ba])
    return {"hd_mm": float(pooled.max()), "hd95_mm": float(np.percentile(pooled, 95)),
            "assd_mm": float(pooled.mean())}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty, as in VerSe's ``compute_dice``)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


# --------------------------------------------------------------------------- identification
def get_hits(gt: dict[int, np.ndarray], pred: dict[int, np.ndarray],
             max_distance: float = HIT_DISTANCE_MM) -> dict[int, bool]:
    """VerSe ``get_hits`` on world-mm centroids: ``{label: hit}`` for every true label.

    A label present in both is a hit when, among the labels present in both, the
    true centroid nearest to the predicted one has the same label and is at most
    ``max_distance`` mm away. True labels without a prediction are misses.
    """
    hits = {lab: False for lab in gt}
    common = sorted(set(gt) & set(pred))
    if not common:
        return hits
    g = np.array([gt[k] for k in common], dtype=np.float64)
    p = np.array([pred[k] for k in common], dtype=np.float64)
    d = np.linalg.norm(p[:, None, :] - g[None, :, :], axis=2)  # rows: predicted, columns: true
    nearest = np.argmin(d, axis=1)
    for i, lab in enumerate(common):
        hits[lab] = bool(nearest[i] == i and d[i, i] <= max_distance)
    return hits


# --------------------------------------------------------------------------- one case
@dataclass
class CaseInput:
    """Arrays and centroids of one case, everything on the ground-truth grid."""

    subject: str
    pred: np.ndarray
    gt: np.ndarray
    affine: np.ndarray
    pred_world: dict[int, np.ndarray]
    gt_world: dict[int, np.ndarray]
    centroid_source: dict[str, str]
    notes: list[str]
    gt_stats: dict[int, LabelStats] | None = None
    pred_stats: dict[int, LabelStats] | None = None


def evaluate_arrays(pred: np.ndarray, gt: np.ndarray, affine: np.ndarray,
                    pred_ctd: Centroids | None = None, gt_ctd: Centroids | None = None,
                    subject: str = "case", pred_affine: np.ndarray | None = None) -> dict[str, Any]:
    """Evaluate a predicted mask against the ground truth (same grid, ``affine``).

    Centroids default to the body centroids of each mask; ``pred_ctd`` is in voxel
    coordinates of ``pred_affine`` (default ``affine``). Returns the case report dict.
    """
    if pred.shape != gt.shape:
        raise DataError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    source = {"gt": "json" if gt_ctd is not None else "mask (body centroids)",
              "pred": "json" if pred_ctd is not None else "mask (body centroids)"}
    gt_stats, pred_stats = label_stats(gt), label_stats(pred)
    if gt_ctd is not None:
        gt_world = _world(gt_ctd, gt.shape, affine)
    else:
        gt_world = _mask_centroids(gt, affine, gt_stats)
    if pred_ctd is not None:
        pred_world = _world(pred_ctd, pred.shape, affine if pred_affine is None else pred_affine)
    else:
        pred_world = _mask_centroids(pred, affine, pred_stats)
    case = CaseInput(subject, pred, gt, affine, pred_world, gt_world, source, [], gt_stats, pred_stats)
    return _evaluate(case)


def _mask_centroids(mask: np.ndarray, affine: np.ndarray, stats=None) -> dict[int, np.ndarray]:
    ctd = body_centroids(mask, affine, stats=stats)
    return dict(zip(ctd.labels, geometry.vox2world(affine, ctd.coords)))


def _world(ctd: Centroids, shape, affine) -> dict[int, np.ndarray]:
    """World mm of centroids, also when their direction differs from the image's."""
    import nibabel.orientations as nio

    if tuple(ctd.axcodes) != tuple(geometry.axcodes(affine)):
        ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(ctd.axcodes))
        affine = np.asarray(affine) @ nio.inv_ornt_aff(ornt, shape[:3])
    return dict(zip(ctd.labels, geometry.vox2world(affine, ctd.coords)))


def _evaluate(case: CaseInput) -> dict[str, Any]:
    sp = geometry.spacing(case.affine)
    voxel_ml = float(abs(np.linalg.det(np.asarray(case.affine)[:3, :3]))) / 1000.0
    gt_stats = label_stats(case.gt) if case.gt_stats is None else case.gt_stats
    pred_stats = label_stats(case.pred) if case.pred_stats is None else case.pred_stats
    gt_boxes = {k: v.box for k, v in gt_stats.items()}
    pred_boxes = {k: v.box for k, v in pred_stats.items()}
    hits = get_hits(case.gt_world, case.pred_world)

    rows = []
    for lab in L.sort_anatomical(set(gt_boxes) | set(pred_boxes)):
        rows.append(_vertebra_row(case, lab, gt_boxes.get(lab), pred_boxes.get(lab), sp, voxel_ml, hits))
    gt_labels = [r for r in rows if r["in_gt"]]
    common = sorted(set(case.gt_world) & set(case.pred_world), key=L.rank)
    loc = [float(np.linalg.norm(case.pred_world[k] - case.gt_world[k])) for k in common]
    n_hits = sum(hits.values())
    return {
        "subject": case.subject,
        "mean_dice": _mean([r["dice"] for r in gt_labels]),
        "binary_dice": _binary_dice(case.pred, case.gt, list(gt_boxes.values()) + list(pred_boxes.values())),
        "id_rate": n_hits / len(case.gt_world) if case.gt_world else None,
        "hits": n_hits,
        "n_gt": len(case.gt_world),
        "n_pred": len(case.pred_world),
        "loc_mm": _mean(loc),
        "mean_hd_mm": _mean([r["hd_mm"] for r in gt_labels]),
        "mean_hd95_mm": _mean([r["hd95_mm"] for r in gt_labels]),
        "mean_assd_mm": _mean([r["assd_mm"] for r in gt_labels]),
        "missed": _names(set(case.gt_world) - set(case.pred_world)),
        "extra": _names(set(case.pred_world) - set(case.gt_world)),
        "mislabelled": _names(k for k in common if not hits[k]),
        "centroid_source": case.centroid_source,
        "notes": case.notes,
        "vertebrae": rows,
    }


def _names(labels) -> list[str]:
    return [L.name(x) for x in L.sort_anatomical(labels)]


def _binary_dice(pred: np.ndarray, gt: np.ndarray, boxes) -> float:
    """Dice of ``pred > 0`` against ``gt > 0``, counted inside the foreground's bounding box."""
    if not boxes:
        return 1.0
    box = _union_box(boxes, gt.shape)
    return dice(pred[box] > 0, gt[box] > 0)


def _vertebra_row(case: CaseInput, lab: int, gt_box, pred_box, sp, voxel_ml, hits) -> dict[str, Any]:
    box = _union_box([b for b in (gt_box, pred_box) if b is not None], case.gt.shape)
    a = case.pred[box] == lab
    b = case.gt[box] == lab
    n_pred, n_gt = int(a.sum()), int(b.sum())
    row: dict[str, Any] = {"label": lab, "name": L.name(lab), "region": L.region(lab),
                           "in_gt": n_gt > 0, "in_pred": n_pred > 0, "dice": dice(a, b),
                           "hd_mm": None, "hd95_mm": None, "assd_mm": None}
    if n_pred and n_gt:
        row.update(distance_metrics(a, b, sp))
    row.update({
        "vol_gt_ml": n_gt * voxel_ml, "vol_pred_ml": n_pred * voxel_ml,
        "vol_diff_ml": (n_pred - n_gt) * voxel_ml,
        "vol_diff_pct": 100.0 * (n_pred - n_gt) / n_gt if n_gt else None,
        "loc_mm": (float(np.linalg.norm(case.pred_world[lab] - case.gt_world[lab]))
                   if lab in case.pred_world and lab in case.gt_world else None),
        "hit": hits.get(lab) if lab in case.gt_world else None,
    })
    return row


def _union_box(boxes, shape) -> tuple[slice, ...]:
    """Union of bounding boxes, grown by one voxel so that erosion sees the background."""
    out = []
    for axis in range(3):
        lo = min(b[axis].start for b in boxes)
        hi = max(b[axis].stop for b in boxes)
        out.append(slice(max(lo - 1, 0), min(hi + 1, shape[axis])))
    return tuple(out)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


# --------------------------------------------------------------------------- files
def load_case(pred_path: Path | None, gt_path: Path, pred_ctd_path: Path | None = None,
              gt_ctd_path: Path | None = None, resample_pred: bool = False,
              subject: str | None = None) -> CaseInput:
    """Read one case from disk; the prediction is checked (or resampled) onto the GT grid.

    ``pred_path`` None stands for a missing prediction (an empty mask).
    """
    allowed = set(L.VERSE_IDS)
    gt_img = load_mask(gt_path, allowed_labels=allowed)
    gt = np.asarray(gt_img.dataobj)
    affine = gt_img.affine
    notes: list[str] = []
    if pred_path is None:
        pred, pred_affine = np.zeros_like(gt), affine
        pred_shape = gt.shape
        notes.append("no prediction for this subject: every vertebra counts as missed")
    else:
        pred_img = load_mask(pred_path, allowed_labels=allowed)
        pred, pred_affine = np.asarray(pred_img.dataobj), pred_img.affine
        pred_shape = pred.shape  # the predicted JSON lives on this grid, also after resampling
        if not geometry.same_grid(pred.shape, pred_affine, gt.shape, affine):
            if not resample_pred:
                raise DataError(
                    f"grids differ: prediction {pred_path} is {geometry.describe_grid(pred.shape, pred_affine)}, "
                    f"ground truth {gt_path} is {geometry.describe_grid(gt.shape, affine)} "
                    "(pass --resample-pred to resample the prediction onto the ground-truth grid)")
            pred = geometry.resample_to_grid(pred, pred_affine, gt.shape, affine, is_mask=True)
            notes.append("prediction resampled (nearest neighbour) onto the ground-truth grid")
    gt_stats, pred_stats = label_stats(gt), label_stats(pred)
    gt_world, gt_source = _case_centroids(gt_ctd_path, (gt.shape, affine), gt, affine, gt_stats)
    pred_world, pred_source = _case_centroids(pred_ctd_path, (pred_shape, pred_affine), pred, affine, pred_stats)
    source = {"gt": gt_source, "pred": pred_source}
    name = subject or subject_of(gt_path) or Path(gt_path).name
    return CaseInput(name, pred, gt, affine, pred_world, gt_world, source, notes, gt_stats, pred_stats)


def _case_centroids(ctd_path, json_grid, mask, mask_affine, stats) -> tuple[dict[int, np.ndarray], str]:
    """World centroids from the JSON when given (on ``json_grid`` = (shape, affine)), else body centroids of
    the mask."""
    if ctd_path is not None:
        return _world(_read_ctd(ctd_path), *json_grid), "json"
    return _mask_centroids(mask, mask_affine, stats), "mask (body centroids)"


def _read_ctd(path: Path) -> Centroids:
    """VerSe 2020 centroids; a file without direction is refused, since its axes are a guess."""
    from .core.io import read_json

    obj = read_json(path)
    if isinstance(obj, list) and not any(isinstance(e, dict) and "direction" in e for e in obj):
        raise DataError("centroid JSON has no direction element (VerSe 2019 format?); convert it to VerSe 2020 "
                        "JSON with verse_cli.core.centroids.parse_centroids(obj, ref_affine=...)", path)
    return parse_centroids(obj, source=str(path))


_MASK_RE = re.compile(r"^(?P<subject>.+?)_seg-vert_msk\.nii(\.gz)?$")
_CTD_RE = re.compile(r"^(?P<subject>.+?)_seg-(vert|subreg|vb)_ctd\.json$")


def subject_of(path: Path | str) -> str | None:
    """The subject key of a VerSe-named mask (``sub-verse004`` for ``sub-verse004_seg-vert_msk.nii.gz``)."""
    m = _MASK_RE.match(Path(path).name)
    return m.group("subject") if m else None


def discover(folder: Path) -> dict[str, tuple[Path, Path | None]]:
    """``{subject: (mask, centroid JSON or None)}`` for the VerSe-named masks under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("no such folder", folder)
    masks: dict[str, Path] = {}
    ctds: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if (m := _MASK_RE.match(p.name)) and p.is_file():
            if m.group("subject") in masks:
                raise DataError(f"two masks for subject {m.group('subject')}: {masks[m.group('subject')]} and {p}")
            masks[m.group("subject")] = p
        elif (m := _CTD_RE.match(p.name)) and p.is_file():
            ctds.setdefault(m.group("subject"), p)
    return {s: (p, ctds.get(s)) for s, p in masks.items()}


# --------------------------------------------------------------------------- dataset
def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Dataset summary: mean/median over cases, region breakdown, pooled id rate."""
    keys = ("mean_dice", "binary_dice", "id_rate", "loc_mm", "mean_hd_mm", "mean_hd95_mm", "mean_assd_mm")
    total_hits = sum(c["hits"] for c in cases)
    total_gt = sum(c["n_gt"] for c in cases)
    regions = {}
    for reg in ("C", "T", "L", "S"):
        rows = [r for c in cases for r in c["vertebrae"] if r["region"] == reg and r["in_gt"]]
        if not rows:
            continue
        ided = [r for r in rows if r["hit"] is not None]
        regions[reg] = {
            "n_gt": len(rows),
            "mean_dice": _mean(r["dice"] for r in rows),
            "median_dice": _median(r["dice"] for r in rows),
            "mean_hd95_mm": _mean(r["hd95_mm"] for r in rows),
            "id_rate": sum(bool(r["hit"]) for r in ided) / len(ided) if ided else None,
        }
    return {
        "n_cases": len(cases),
        "mean": {k: _mean(c[k] for c in cases) for k in keys},
        "median": {k: _median(c[k] for c in cases) for k in keys},
        "id_rate": total_hits / total_gt if total_gt else None,
        "hits": total_hits,
        "n_gt": total_gt,
        "regions": regions,
    }


def evaluate_dataset(pred_dir: Path, gt_dir: Path, resample_pred: bool = False) -> dict[str, Any]:
    """Pair VerSe-named masks by subject and evaluate every ground-truth case.

    A subject with ground truth but no prediction counts as a case with every vertebra
    missed; predictions without ground truth are listed and ignored.
    """
    gt_cases = discover(gt_dir)
    pred_cases = discover(pred_dir)
    if not gt_cases:
        raise DataError("no ground-truth masks (*_seg-vert_msk.nii.gz) found", gt_dir)
    unmatched = sorted(set(pred_cases) - set(gt_cases))
    missing = sorted(set(gt_cases) - set(pred_cases))
    if missing:
        warn(f"{len(missing)} subject(s) without prediction count as fully missed: {', '.join(missing)}")
    if unmatched:
        warn(f"{len(unmatched)} prediction(s) without ground truth ignored: {', '.join(unmatched)}")
    reports = []
    for subject in track(sorted(gt_cases), description="evaluating"):
        gt_mask, gt_ctd = gt_cases[subject]
        pred_mask, pred_ctd = pred_cases.get(subject, (None, None))
        case = load_case(pred_mask, gt_mask, pred_ctd, gt_ctd, resample_pred=resample_pred, subject=subject)
        reports.append(_evaluate(case))
    return {"mode": "dataset", "pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "summary": summarise(reports),
            "missing_predictions": missing, "unmatched_predictions": unmatched, "cases": reports}


# --------------------------------------------------------------------------- CSV and table
def csv_text(cases: list[dict[str, Any]]) -> str:
    """One row per vertebra per case."""
    buf = _io.StringIO()
    writer = _csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for case in cases:
        for row in case["vertebrae"]:
            out = {k: _csv_value(row.get(k)) for k in CSV_FIELDS}
            out["subject"] = case["subject"]
            writer.writerow(out)
    return buf.getvalue()


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return v


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_table(report: dict[str, Any], to_stderr: bool) -> None:
    """Rich tables: per vertebra for one case, per case plus summary for a dataset."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=to_stderr, highlight=False, soft_wrap=True)
    if report["mode"] == "case":
        case = report["case"]
        table = Table(title=f"{case['subject']}: per vertebra")
        for col in ("vertebra", "Dice", "HD mm", "HD95 mm", "ASSD mm", "ΔV %", "loc mm", "hit"):
            table.add_column(col, justify="right")
        for r in case["vertebrae"]:
            hit = "-" if r["hit"] is None else ("yes" if r["hit"] else "NO")
            tag = "" if r["in_gt"] and r["in_pred"] else (" (missed)" if r["in_gt"] else " (extra)")
            table.add_row(r["name"] + tag, _fmt(r["dice"], 3), _fmt(r["hd_mm"], 1), _fmt(r["hd95_mm"], 1),
                          _fmt(r["assd_mm"], 2), _fmt(r["vol_diff_pct"], 1), _fmt(r["loc_mm"], 1), hit)
        console.print(table)
        console.print(_case_line(case))
        return
    summary = report["summary"]
    table = Table(title=f"{summary['n_cases']} case(s)")
    for col in ("subject", "mean Dice", "binary Dice", "id.rate", "loc mm", "HD95 mm", "missed", "extra",
                "mislabelled"):
        table.add_column(col, justify="right")
    for c in report["cases"]:
        table.add_row(c["subject"], _fmt(c["mean_dice"], 3), _fmt(c["binary_dice"], 3), _fmt(c["id_rate"], 3),
                      _fmt(c["loc_mm"], 1), _fmt(c["mean_hd95_mm"], 1), " ".join(c["missed"]),
                      " ".join(c["extra"]), " ".join(c["mislabelled"]))
    console.print(table)
    regions = Table(title="by region (over vertebrae)")
    for col in ("region", "vertebrae", "mean Dice", "median Dice", "HD95 mm", "id.rate"):
        regions.add_column(col, justify="right")
    for reg, s in summary["regions"].items():
        regions.add_row(reg, str(s["n_gt"]), _fmt(s["mean_dice"], 3), _fmt(s["median_dice"], 3),
                        _fmt(s["mean_hd95_mm"], 1), _fmt(s["id_rate"], 3))
    console.print(regions)
    m, med = summary["mean"], summary["median"]
    console.print(f"mean Dice {_fmt(m['mean_dice'], 3)} (median {_fmt(med['mean_dice'], 3)}), "
                  f"binary Dice {_fmt(m['binary_dice'], 3)}, id.rate {_fmt(summary['id_rate'], 3)} "
                  f"({summary['hits']}/{summary['n_gt']}), loc {_fmt(m['loc_mm'], 1)} mm")


def _case_line(case: dict[str, Any]) -> str:
    parts = [f"mean Dice {_fmt(case['mean_dice'], 3)}", f"binary Dice {_fmt(case['binary_dice'], 3)}",
             f"id.rate {_fmt(case['id_rate'], 3)} ({case['hits']}/{case['n_gt']})",
             f"loc {_fmt(case['loc_mm'], 1)} mm"]
    for key in ("missed", "extra", "mislabelled"):
        if case[key]:
            parts.append(f"{key}: {' '.join(case[key])}")
    src = case["centroid_source"]
    parts.append(f"centroids: gt {src['gt']}, pred {src['pred']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- entry point
def run(pred: Path | None = None, gt: Path | None = None, pred_ctd: Path | None = None,
        gt_ctd: Path | None = None, pred_dir: Path | None = None, gt_dir: Path | None = None,
        output: Path | None = None, csv: Path | None = None, resample_pred: bool = False) -> dict[str, Any]:
    """The ``verse evaluate`` command: evaluate, then write the JSON, CSV and table."""
    dataset = pred_dir is not None or gt_dir is not None
    if dataset:
        if pred_dir is None or gt_dir is None:
            raise UsageError("dataset mode needs both --pred-dir and --gt-dir")
        if pred is not None or gt is not None or pred_ctd is not None or gt_ctd is not None:
            raise UsageError("give either PRED GT (single case) or --pred-dir/--gt-dir (dataset), not both")
    elif pred is None or gt is None:
        raise UsageError("give PRED and GT masks, or --pred-dir and --gt-dir")
    if output is not None and csv is not None and is_stdio(output) and is_stdio(csv):
        raise UsageError("only one of --output and --csv can be '-'")
    _check_output(output, "--output", ".json")
    _check_output(csv, "--csv", ".csv")

    if dataset:
        report = evaluate_dataset(pred_dir, gt_dir, resample_pred=resample_pred)
        cases = report["cases"]
    else:
        case = _evaluate(load_case(pred, gt, pred_ctd, gt_ctd, resample_pred=resample_pred))
        report = {"mode": "case", "pred": str(pred), "gt": str(gt), "case": case}
        cases = [case]
    report["definitions"] = DEFINITIONS

    if csv is not None:
        text = csv_text(cases)
        if is_stdio(csv):
            sys.stdout.write(text)
        else:
            write_text_atomic(csv, text)
    if output is not None:
        write_json(report, output)
    if verbosity() >= 1:
        render_table(report, to_stderr=is_stdio(output) or is_stdio(csv))
    for path in (output, csv):
        if path is not None and not is_stdio(path):
            info(f"wrote {path}")
    return report


def _check_output(path: Path | None, option: str, suffix: str) -> None:
    if path is None or is_stdio(path):
        return
    if Path(path).is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name ending in {suffix}")


DEFINITIONS = {
    "dice": "2|A∩B|/(|A|+|B|) per label on the ground-truth grid",
    "hd_mm": "symmetric Hausdorff distance (maximum) between label surfaces, world mm",
    "hd95_mm": "95th percentile of the pooled surface distances of both directions (MedPy hd95)",
    "assd_mm": "average symmetric surface distance: mean of the pooled surface distances of both directions "
               "(MedPy assd)",
    "vol_diff_ml": "predicted minus true volume",
    "binary_dice": "Dice of pred>0 against gt>0 (VerSe notebook)",
    "id_rate": "VerSe get_hits: a label is a hit when the nearest true centroid (among labels in both) has "
               "its label and is <= 20 mm away; hits / true centroids",
    "loc_mm": "mean distance between predicted and true centroids over labels present in both",
}
