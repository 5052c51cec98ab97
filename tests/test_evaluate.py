"""``verse evaluate``: hand-built cases with known answers, MedPy agreement, files and CLI."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from verse_cli.core.centroids import Centroids, write_centroids
from verse_cli.core.errors import DataError
from verse_cli.core.io import save_mask
from verse_cli.evaluate import distance_metrics, evaluate_arrays, evaluate_dataset, get_hits

SPACING = (1.0, 1.0, 2.0)


def _affine(spacing=SPACING) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def _stack(labels=(20, 21, 22, 23), shape=(40, 40, 60), pitch=15, spacing=SPACING) -> np.ndarray:
    """Boxes of vertebra labels stacked along the third axis (``pitch`` voxels apart)."""
    mask = np.zeros(shape, dtype=np.uint8)
    for i, lab in enumerate(labels):
        z0 = 2 + i * pitch
        mask[10:30, 12:28, z0:z0 + pitch - 3] = lab
    return mask


def _ctd(points: dict[int, tuple[float, float, float]]) -> Centroids:
    """Centroids given in world mm on the diagonal test grid."""
    labs = list(points)
    vox = np.array([points[k] for k in labs]) / np.array(SPACING)
    return Centroids(labs, vox, ("R", "A", "S"))


# --------------------------------------------------------------------------- known answers
def test_identical_masks_give_dice_one_and_zero_distances():
    gt = _stack()
    case = evaluate_arrays(gt.copy(), gt, _affine())
    assert case["mean_dice"] == 1.0 and case["binary_dice"] == 1.0
    assert case["id_rate"] == 1.0 and case["loc_mm"] == 0.0
    for row in case["vertebrae"]:
        assert (row["dice"], row["hd_mm"], row["hd95_mm"], row["assd_mm"], row["vol_diff_ml"]) == (1.0, 0, 0, 0, 0)
    assert case["missed"] == case["extra"] == case["mislabelled"] == []


def test_one_level_label_shift_gives_id_rate_zero():
    gt = _stack(labels=(20, 21, 22, 23))
    pred = _stack(labels=(21, 22, 23, 24))  # every vertebra called one level lower
    case = evaluate_arrays(pred, gt, _affine())
    assert case["id_rate"] == 0.0 and case["hits"] == 0
    assert case["mislabelled"] == ["L2", "L3", "L4"]
    assert case["missed"] == ["L1"] and case["extra"] == ["L5"]
    assert case["binary_dice"] == 1.0  # the spine itself is perfect


def test_sixteen_mm_toward_a_neighbour_thirty_mm_away_loses_the_hit():
    gt = {20: (0.0, 0.0, 0.0), 21: (0.0, 0.0, 30.0), 22: (0.0, 0.0, 60.0)}
    pred = dict(gt)
    pred[21] = (0.0, 0.0, 46.0)  # 16 mm from its own centroid, 14 mm from L3's
    assert get_hits(gt, pred) == {20: True, 21: False, 22: True}
    pred[21] = (16.0, 0.0, 30.0)  # 16 mm sideways: still nearest to its own, and <= 20 mm
    assert get_hits(gt, pred) == {20: True, 21: True, 22: True}


def test_hit_threshold_is_twenty_mm_inclusive_and_missing_predictions_are_misses():
    gt = {20: (0.0, 0.0, 0.0), 21: (0.0, 0.0, 100.0)}
    assert get_hits(gt, {20: (20.0, 0.0, 0.0)}) == {20: True, 21: False}
    assert get_hits(gt, {20: (20.5, 0.0, 0.0)}) == {20: False, 21: False}
    assert get_hits(gt, {}) == {20: False, 21: False}


def test_nearest_true_centroid_is_searched_among_labels_present_in_both_only():
    # VerSe restricts the distance matrix to the intersection: a true L2 that was not
    # predicted cannot steal the predicted L1.
    gt = {20: (0.0, 0.0, 0.0), 21: (0.0, 0.0, 10.0)}
    pred = {20: (0.0, 0.0, 9.0)}
    assert get_hits(gt, pred) == {20: True, 21: False}


def test_case_report_uses_json_centroids_in_world_mm():
    gt = _stack(labels=(20, 21, 22))
    g = {20: (20.0, 20.0, 20.0), 21: (20.0, 20.0, 50.0), 22: (20.0, 20.0, 80.0)}
    p = dict(g)
    p[21] = (20.0, 20.0, 66.0)
    case = evaluate_arrays(gt, gt, _affine(), pred_ctd=_ctd(p), gt_ctd=_ctd(g))
    assert case["centroid_source"] == {"gt": "json", "pred": "json"}
    assert case["hits"] == 2 and case["id_rate"] == pytest.approx(2 / 3)
    assert case["mislabelled"] == ["L2"]
    assert case["loc_mm"] == pytest.approx(16 / 3)


def test_hausdorff_of_a_shifted_box_on_an_anisotropic_grid():
    gt = np.zeros((30, 30, 30), dtype=np.uint8)
    gt[5:15, 5:15, 5:15] = 20
    pred = np.roll(gt, 2, axis=2)  # two 2 mm slices
    case = evaluate_arrays(pred, gt, _affine())
    row = case["vertebrae"][0]
    assert row["hd_mm"] == pytest.approx(4.0)
    assert row["dice"] == pytest.approx(0.8)
    assert row["vol_diff_ml"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_match_medpy(seed):
    medpy = pytest.importorskip("medpy.metric.binary")
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    a = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((30, 34, 26)), 2) > 0.5)
    b = ndimage.binary_dilation(np.roll(a, rng.integers(-3, 4), axis=0), iterations=int(rng.integers(0, 3)))
    spacing = (0.7, 1.1, 2.5)
    ours = distance_metrics(a, b, spacing)
    assert ours["hd_mm"] == pytest.approx(medpy.hd(a, b, voxelspacing=spacing))
    assert ours["hd95_mm"] == pytest.approx(medpy.hd95(a, b, voxelspacing=spacing))
    assert ours["assd_mm"] == pytest.approx(medpy.assd(a, b, voxelspacing=spacing))


def test_crops_give_the_same_distances_as_whole_volumes():
    gt = _stack(labels=(20, 21))
    pred = gt.copy()
    pred[pred == 21] = 0
    pred[12:28, 12:28, 20:30] = 21  # a different, overlapping L2
    case = evaluate_arrays(pred, gt, _affine())
    row = case["vertebrae"][1]
    whole = distance_metrics(pred == 21, gt == 21, SPACING)
    assert row["hd_mm"] == pytest.approx(whole["hd_mm"]) and row["hd95_mm"] == pytest.approx(whole["hd95_mm"])


def test_missed_and_extra_vertebrae_are_named_and_count_zero_dice():
    gt = _stack(labels=(20, 21, 22))
    pred = gt.copy()
    pred[pred == 22] = 0
    pred[0:4, 0:4, 0:4] = 19  # a stray T12 far away
    case = evaluate_arrays(pred, gt, _affine())
    assert case["missed"] == ["L3"] and case["extra"] == ["T12"]
    assert case["mean_dice"] == pytest.approx(2 / 3)
    l3 = next(r for r in case["vertebrae"] if r["name"] == "L3")
    assert l3["dice"] == 0.0 and l3["hd_mm"] is None and l3["in_pred"] is False


# --------------------------------------------------------------------------- files, dataset, CLI
def _write_case(folder, subject, mask, affine=None, ctd=None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subject}_seg-vert_msk.nii.gz"
    save_mask(mask, _affine() if affine is None else affine, path)
    if ctd is not None:
        write_centroids(ctd, folder / f"{subject}_seg-subreg_ctd.json")
    return path


def test_dataset_mode_pairs_by_subject_and_pools_the_id_rate(tmp_path):
    gt_a, gt_b = _stack(labels=(20, 21, 22)), _stack(labels=(8, 9, 10, 11))
    _write_case(tmp_path / "gt" / "sub-a", "sub-a", gt_a)
    _write_case(tmp_path / "gt" / "sub-b", "sub-b", gt_b)
    _write_case(tmp_path / "gt" / "sub-c", "sub-c", gt_a)
    _write_case(tmp_path / "pred", "sub-a", gt_a)
    _write_case(tmp_path / "pred", "sub-b", _stack(labels=(9, 10, 11, 12)))
    report = evaluate_dataset(tmp_path / "pred", tmp_path / "gt")
    s = report["summary"]
    assert s["n_cases"] == 3 and report["missing_predictions"] == ["sub-c"]
    assert (s["hits"], s["n_gt"]) == (3, 10) and s["id_rate"] == pytest.approx(0.3)
    assert s["regions"]["L"]["id_rate"] == pytest.approx(0.5) and s["regions"]["T"]["id_rate"] == 0.0
    assert s["mean"]["mean_dice"] == pytest.approx(1 / 3) and s["median"]["mean_dice"] == 0.0


def test_cli_single_case_writes_json_and_csv(tmp_path, verse):
    gt = _stack()
    pred = gt.copy()
    pred[pred == 23] = 0
    p = _write_case(tmp_path / "p", "sub-x", pred)
    g = _write_case(tmp_path / "g", "sub-x", gt)
    proc = verse("evaluate", p, g, "-o", tmp_path / "r.json", "--csv", tmp_path / "v.csv")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["case"]["missed"] == ["L4"] and report["case"]["centroid_source"]["gt"].startswith("mask")
    rows = list(csv.DictReader((tmp_path / "v.csv").open()))
    assert [r["name"] for r in rows] == ["L1", "L2", "L3", "L4"] and rows[3]["in_pred"] == "0"
    assert "L4" in proc.stdout  # the table goes to the terminal (stdout when no output is '-')


def test_cli_json_to_stdout_keeps_stdout_clean(tmp_path, verse):
    g = _write_case(tmp_path, "sub-x", _stack())
    proc = verse("evaluate", g, g, "-o", "-")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["case"]["mean_dice"] == 1.0
    proc = verse("evaluate", g, g, "--csv", "-", "-q")
    assert len(list(csv.DictReader(io.StringIO(proc.stdout)))) == 4


def test_mismatched_grids_are_refused_naming_both_unless_resampled(tmp_path, verse):
    gt = _stack()
    fine = np.repeat(gt, 2, axis=2)  # the same anatomy on a 1 mm grid
    fine_affine = _affine((1.0, 1.0, 1.0))
    fine_affine[2, 3] = -0.5  # voxel centres of the 2 mm grid sit between two 1 mm voxels
    p = _write_case(tmp_path / "p", "sub-x", fine, fine_affine)
    g = _write_case(tmp_path / "g", "sub-x", gt)
    out = tmp_path / "r.json"
    proc = verse("evaluate", p, g, "-o", out)
    assert proc.returncode == 1 and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "40x40x120" in proc.stderr and "40x40x60" in proc.stderr and "--resample-pred" in proc.stderr
    proc = verse("evaluate", p, g, "-o", out, "--resample-pred", "-q")
    assert proc.returncode == 0, proc.stderr
    case = json.loads(out.read_text())["case"]
    assert case["mean_dice"] == pytest.approx(1.0) and case["notes"]


def test_centroid_json_in_another_orientation_is_converted_through_world_mm(tmp_path):
    from verse_cli.evaluate import _evaluate, load_case

    gt = _stack(labels=(20, 21, 22))
    g = _write_case(tmp_path, "sub-x", gt)
    ctd = _ctd({20: (20.0, 20.0, 20.0), 21: (20.0, 20.0, 50.0), 22: (20.0, 20.0, 80.0)})
    pir = ctd.reoriented(gt.shape, _affine(), ("P", "I", "R"))
    write_centroids(pir, tmp_path / "pir.json")
    write_centroids(ctd, tmp_path / "ras.json")
    a = _evaluate(load_case(g, g, tmp_path / "pir.json", tmp_path / "ras.json"))
    assert a["loc_mm"] == pytest.approx(0.0, abs=1e-9) and a["id_rate"] == 1.0


def test_json_without_direction_is_refused(tmp_path):
    from verse_cli.evaluate import load_case

    gt = _stack(labels=(20,))
    g = _write_case(tmp_path, "sub-x", gt)
    (tmp_path / "old.json").write_text(json.dumps([{"label": 20, "X": 20.0, "Y": 20.0, "Z": 20.0}]))
    with pytest.raises(DataError, match="no direction"):
        load_case(g, g, gt_ctd_path=tmp_path / "old.json")


def test_dataset_mode_without_ground_truth_is_a_data_error(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    with pytest.raises(DataError, match="no ground-truth masks"):
        evaluate_dataset(tmp_path / "pred", tmp_path / "gt")


def test_real_verse004_against_itself_and_a_relabelled_copy(tmp_path, real_data, verse):
    d = real_data / "verse004"
    mask, ctd = d / "sub-verse004_seg-vert_msk.nii.gz", d / "sub-verse004_seg-subreg_ctd.json"
    proc = verse("evaluate", mask, mask, "--gt-ctd", ctd, "-o", "-")
    case = json.loads(proc.stdout)["case"]
    assert case["id_rate"] == 1.0 and case["mean_dice"] == 1.0 and case["loc_mm"] < 3.0
    import nibabel as nib

    img = nib.load(str(mask))
    data = np.asarray(img.dataobj)
    shifted = np.where(data > 0, data + 1, 0).astype(np.uint8)  # T9..L5 called T10..L6
    p = tmp_path / "sub-verse004_seg-vert_msk.nii.gz"
    save_mask(shifted, img.affine, p)
    proc = verse("evaluate", p, mask, "--gt-ctd", ctd, "-o", "-")
    case = json.loads(proc.stdout)["case"]
    assert case["id_rate"] == 0.0 and case["binary_dice"] == 1.0 and case["extra"] == ["L6"]
