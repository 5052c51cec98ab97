"""Centroids: VerSe JSON formats, body centroids on the real fixtures, markers, ``verse centroids``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from verse_cli.core import geometry
from verse_cli.core.centroids import (
    Centroids,
    body_centroids,
    centroids_from_markers,
    label_stats,
    marker_mask,
    mass_centroids,
    parse_centroids,
    read_centroids,
    write_centroids,
)
from verse_cli.core.errors import DataError
from verse_cli.core.io import load_mask

CASES = {
    "verse004": ("sub-verse004_seg-vert_msk.nii.gz", "sub-verse004_seg-subreg_ctd.json"),
    "verse014": ("sub-verse014_seg-vert_msk.nii.gz", "sub-verse014_seg-vb_ctd.json"),
}


def _load(real_data, case):
    mask_name, ctd_name = CASES[case]
    img = load_mask(real_data / case / mask_name)
    return np.asarray(img.dataobj), img.affine, read_centroids(real_data / case / ctd_name)


def _errors_mm(ctd: Centroids, affine, ref: Centroids, ref_affine) -> dict[int, float]:
    ours = dict(zip(ctd.labels, ctd.to_world(affine)))
    theirs = dict(zip(ref.labels, ref.to_world(ref_affine)))
    assert set(ours) == set(theirs)
    return {k: float(np.linalg.norm(ours[k] - theirs[k])) for k in theirs}


# --------------------------------------------------------------------------- real fixtures
@pytest.mark.parametrize("case", sorted(CASES))
def test_real_json_and_mask_agree_on_labels_and_orientation(real_data, case):
    mask, affine, ref = _load(real_data, case)
    assert ref.axcodes == ("P", "I", "R") == geometry.axcodes(affine)
    assert set(ref.labels) == set(np.unique(mask)) - {0}
    # every published centroid lies inside its own vertebra's bounding box
    stats = label_stats(mask)
    for lab, c in ref.as_dict().items():
        box = stats[lab].box
        assert all(s.start - 1 <= v <= s.stop for s, v in zip(box, c)), (lab, c, box)


@pytest.mark.parametrize("case", sorted(CASES))
def test_body_centroids_reproduce_the_published_json_within_3mm(real_data, case):
    mask, affine, ref = _load(real_data, case)
    errors = _errors_mm(body_centroids(mask, affine), affine, ref, affine)
    assert max(errors.values()) <= 3.0, errors


def test_whole_vertebra_centres_of_mass_are_not_body_centroids(real_data):
    mask, affine, ref = _load(real_data, "verse004")
    errors = _errors_mm(mass_centroids(mask, affine), affine, ref, affine)
    assert min(errors.values()) > 6.0  # the posterior elements pull the centre of mass back


@pytest.mark.parametrize("angles", [(25, 0, 0), (0, -30, 0), (15, 20, -25)])
def test_body_centroids_follow_a_tilted_spine(real_data, angles):
    from scipy.spatial.transform import Rotation

    mask, affine, ref = _load(real_data, "verse014")
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    step = 1.3
    centre = geometry.vox2world(affine, (np.array(mask.shape) - 1) / 2)
    n = int(np.ceil(np.linalg.norm(np.array(mask.shape) * geometry.spacing(affine)) / step))
    tilted = np.eye(4)
    tilted[:3, :3] = rot * step
    tilted[:3, 3] = centre - rot @ np.full(3, (n - 1) / 2 * step)
    rotated = geometry.resample_to_grid(mask, affine, (n, n, n), tilted, is_mask=True)
    assert geometry.obliquity_deg(tilted) > 14
    errors = _errors_mm(body_centroids(rotated, tilted), tilted, ref, affine)
    assert max(errors.values()) <= 3.0, errors


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "I"), ("S", "R", "A")])
def test_orientation_round_trip_is_lossless_for_mask_and_centroids(real_data, codes):
    mask, affine, ref = _load(real_data, "verse004")
    data, new_affine = geometry.reorient(mask, affine, codes)
    moved = ref.reoriented(mask.shape, affine, codes)
    assert geometry.axcodes(new_affine) == codes and moved.axcodes == codes
    assert np.allclose(moved.to_world(new_affine), ref.to_world(affine))
    back, back_affine = geometry.reorient(data, new_affine, ref.axcodes)
    assert np.array_equal(back, mask) and np.allclose(back_affine, affine)
    again = moved.reoriented(data.shape, new_affine, ref.axcodes)
    assert np.allclose(again.coords, ref.coords, atol=1e-9)
    # the body centroids are the same anatomy whatever the voxel order
    errors = _errors_mm(body_centroids(data, new_affine), new_affine, body_centroids(mask, affine), affine)
    assert max(errors.values()) < 0.5


# --------------------------------------------------------------------------- a cervical phantom
def _cervical_phantom(euler, spacing, lordosis_deg=8.0):
    """C3-C7 in lordosis with small bodies (18 x 15 x 13 mm) and a thick arch (7 mm laminae,
    a 14 mm wide spinous process), like the synthetic cervical spines whose ground truth
    landed on the arch; on a rotated, anisotropic grid. Returns the mask, its affine and
    each vertebra's body centre and anterior direction (world mm)."""
    from scipy.spatial.transform import Rotation

    labs = [3, 4, 5, 6, 7]
    centres, frames, pos, tilt = [], [], np.zeros(3), 0.0
    for _ in labs:  # from C7 upwards, bending backwards at every disc
        frame = Rotation.from_euler("x", -tilt, degrees=True).as_matrix()  # columns: right, anterior, up
        frames.append(frame)
        centres.append(pos.copy())
        pos, tilt = pos + frame[:, 2] * 19.0, tilt + lordosis_deg
    centres, frames = centres[::-1], frames[::-1]
    rot = Rotation.from_euler("xyz", euler, degrees=True).as_matrix()
    corners = np.array(np.meshgrid(*zip(np.min(centres, 0) - 48, np.max(centres, 0) + 48), indexing="ij"))
    g = (corners.reshape(3, -1).T @ rot) / spacing
    shape = tuple(int(n) for n in np.ceil(g.max(0) - g.min(0)) + 1)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = rot @ (g.min(0) * np.asarray(spacing))
    world = geometry.vox2world(affine, np.indices(shape).reshape(3, -1).T)
    mask = np.zeros(len(world), np.uint8)
    for lab, c, f in zip(labs, centres, frames):
        x, y, z = ((world - c) @ f).T
        ax, az = np.abs(x), np.abs(z)
        a, b = np.array([12.0, -17.0]), np.array([0.0, -28.0])  # a lamina, pillar to midline
        p = np.stack([ax, y], -1)
        s = np.clip(((p - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
        inside = (((x / 9.0) ** 2 + (y / 7.5) ** 2 <= 1) & (az <= 6.5)  # body
                  | (ax >= 6) & (ax <= 10) & (y >= -12) & (y <= -3) & (az <= 3.5)  # pedicles
                  | (ax >= 9) & (ax <= 17) & (y >= -19) & (y <= -10) & (az <= 8)  # articular pillars
                  | (ax >= 8) & (ax <= 22) & (y >= -6) & (y <= 0) & (az <= 3)  # transverse processes
                  | (np.linalg.norm(p - (a + s[:, None] * (b - a)), axis=1) <= 3.5) & (az <= 7)  # laminae
                  | (ax <= 7) & (y >= -42) & (y <= -26) & (z >= -12) & (z <= 6))  # spinous process
        mask[inside & (mask == 0)] = lab
    return mask.reshape(shape), affine, dict(zip(labs, centres)), dict(zip(labs, (f[:, 1] for f in frames)))


@pytest.mark.parametrize("euler, spacing", [((0, 0, 0), (0.8, 1.0, 2.0)), ((20, -15, 30), (1.0, 0.7, 2.5)),
                                            ((90, 0, 180), (2.0, 0.9, 0.9))])
def test_small_cervical_bodies_behind_a_thick_arch_are_found(euler, spacing):
    # the arch is as thick as the body (an inscribed sphere of 7 mm in the spinous process,
    # 6.5 mm in the body): the body centroid once landed 32 mm back, on the spinous process
    mask, affine, centres, anterior = _cervical_phantom(euler, spacing)
    ctd = body_centroids(mask, affine)
    assert ctd.labels == [3, 4, 5, 6, 7]
    for lab, xyz in zip(ctd.labels, ctd.to_world(affine)):
        assert np.linalg.norm(xyz - centres[lab]) < 2.0, (lab, xyz - centres[lab])
        assert abs(float((xyz - centres[lab]) @ anterior[lab])) < 1.5


# --------------------------------------------------------------------------- formats
def test_verse2020_json_round_trip_keeps_direction_and_extras(tmp_path):
    ctd = Centroids([20, 8, 28], [[1.5, 2.25, 3], [4, 5, 6], [7, 8, 9]], ("P", "I", "R"),
                    {20: {"confidence": 0.9}})
    write_centroids(ctd, tmp_path / "c.json")
    raw = json.loads((tmp_path / "c.json").read_text())
    assert raw[0] == {"direction": ["P", "I", "R"]}
    assert [e["label"] for e in raw[1:]] == [8, 28, 20]  # head to foot: T1, T13, L1
    back = read_centroids(tmp_path / "c.json")
    assert back.as_dict().keys() == ctd.as_dict().keys() and back.extras == {20: {"confidence": 0.9}}
    assert np.allclose(back.as_dict()[20], [1.5, 2.25, 3])


def test_verse2019_millimetre_format_needs_the_image_and_divides_by_spacing(real_data):
    _, affine, ref = _load(real_data, "verse004")
    sp = geometry.spacing(affine)
    old = [{"label": k, "X": x * sp[0], "Y": y * sp[1], "Z": z * sp[2]} for k, (x, y, z) in ref.as_dict().items()]
    with pytest.raises(DataError, match="no direction"):
        parse_centroids(old)
    back = parse_centroids(old, ref_affine=affine)
    assert back.axcodes == ref.axcodes and np.allclose(back.coords, ref.coords)


@pytest.mark.parametrize("bad, message", [
    ([], "non-empty"),
    ([{"direction": ["P", "I", "X"]}, {"label": 20, "X": 1, "Y": 2, "Z": 3}], "invalid direction"),
    ([{"direction": ["P", "I", "R"]}, {"label": 99, "X": 1, "Y": 2, "Z": 3}], "outside the VerSe table"),
    ([{"direction": ["P", "I", "R"]}, {"label": 20, "X": 1, "Y": 2}], "without label"),
    ([{"direction": ["P", "I", "R"]}, {"label": 20, "X": "a", "Y": 2, "Z": 3}], "numbers"),
    ([{"direction": ["P", "I", "R"]}] + [{"label": 20, "X": 1, "Y": 2, "Z": 3}] * 2, "duplicate"),
])
def test_bad_centroid_json_is_a_data_error(bad, message):
    with pytest.raises(DataError, match=message):
        parse_centroids(bad, source="x.json")


def test_world_coordinates_round_trip_on_an_oblique_grid():
    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", (10, -7, 30), degrees=True).as_matrix() @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = (-100, 20, 35)
    ctd = Centroids([20, 21], [[10.2, 3.3, 7.7], [0, 0, 0]], geometry.axcodes(affine))
    back = Centroids.from_world(ctd.labels, ctd.to_world(affine), affine)
    assert np.allclose(back.coords, ctd.coords) and back.axcodes == ctd.axcodes


def test_markers_round_trip_on_an_anisotropic_grid(real_data):
    mask, affine, ref = _load(real_data, "verse004")
    markers = marker_mask(ref, mask.shape, affine, radius_mm=3.0)
    assert set(np.unique(markers)) - {0} == set(ref.labels)
    back = centroids_from_markers(markers, affine)
    errors = _errors_mm(back, affine, ref, affine)
    assert max(errors.values()) < 1.0  # a 3 mm ball on a 1x1x2 mm grid


def test_label_stats_match_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = (rng.random((20, 30, 25)) < 0.1) * rng.integers(1, 29, (20, 30, 25))
    mask = np.asfortranarray(mask.astype(np.uint8))
    stats = label_stats(mask)
    labels = sorted(stats)
    boxes = ndimage.find_objects(mask)
    coms = ndimage.center_of_mass(np.ones_like(mask), mask, labels)
    for lab, com in zip(labels, coms):
        assert stats[lab].box == boxes[lab - 1]
        assert np.allclose(stats[lab].com, com) and stats[lab].count == int((mask == lab).sum())
    assert label_stats(np.zeros((3, 3, 3), np.uint8)) == {}


# --------------------------------------------------------------------------- the command
def test_cli_centroids_on_verse014_with_markers(tmp_path, real_data, verse):
    mask = real_data / "verse014" / CASES["verse014"][0]
    out, markers = tmp_path / "ctd.json", tmp_path / "m.nii.gz"
    proc = verse("centroids", mask, "-o", out, "--markers", markers)
    assert proc.returncode == 0, proc.stderr
    ours = read_centroids(out)
    _, affine, ref = _load(real_data, "verse014")
    assert max(_errors_mm(ours, affine, ref, affine).values()) <= 3.0
    assert load_mask(markers).shape == load_mask(mask).shape
    proc = verse("centroids", mask, "--whole", "-o", "-")
    whole = parse_centroids(json.loads(proc.stdout))
    assert whole.labels == ours.labels
    assert min(_errors_mm(whole, affine, ref, affine).values()) > 6.0
