"""core.geometry: property tests for orientations, voxel<->world, resampling, oblique grids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verse_cli.core import geometry

AXCODES = [tuple(p[i] for p, i in zip(perm, flips))
           for perm in itertools.permutations([("L", "R"), ("P", "A"), ("I", "S")])
           for flips in itertools.product([0, 1], repeat=3)]  # all 48 orientations

codes = st.sampled_from(AXCODES)
shapes = st.tuples(*[st.integers(2, 9)] * 3)
spacings = st.tuples(*[st.floats(0.3, 3.0)] * 3)
angles = st.tuples(*[st.floats(-40, 40)] * 3)


def _affine(orient, spacing, angles_deg=(0.0, 0.0, 0.0), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """A grid whose axes point along ``orient``, tilted by ``angles_deg`` (degrees)."""
    import nibabel.orientations as nio
    from scipy.spatial.transform import Rotation

    ornt = nio.axcodes2ornt(orient)
    base = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt.astype(int)):
        base[world_axis, voxel_axis] = flip
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() @ base @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@settings(max_examples=60, deadline=None)
@given(start=codes, target=codes, shape=shapes, spacing=spacings)
def test_reorientation_round_trip_is_exact(start, target, shape, spacing):
    affine = _affine(start, spacing)
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    out, out_affine = geometry.reorient(data, affine, target)
    assert geometry.axcodes(out_affine) == target
    back, back_affine = geometry.reorient(out, out_affine, start)
    assert np.array_equal(back, data) and np.allclose(back_affine, affine, atol=1e-12)
    # every voxel stays at the same world position
    ijk = np.argwhere(np.ones(shape, bool))
    moved = geometry.reorient_points(ijk, shape, affine, target)
    assert np.allclose(geometry.vox2world(affine, ijk), geometry.vox2world(out_affine, moved))
    assert np.array_equal(out[tuple(np.rint(moved).astype(int).T)], data[tuple(ijk.T)])


@settings(max_examples=60, deadline=None)
@given(orient=codes, spacing=spacings, tilt=angles,
       pts=st.lists(st.tuples(*[st.floats(-50, 50)] * 3), min_size=1, max_size=5))
def test_vox_world_round_trip_on_oblique_grids(orient, spacing, tilt, pts):
    affine = _affine(orient, spacing, tilt)
    ijk = np.array(pts)
    assert np.allclose(geometry.world2vox(affine, geometry.vox2world(affine, ijk)), ijk, atol=1e-8)
    assert np.allclose(geometry.spacing(affine), spacing)


@settings(max_examples=40, deadline=None)
@given(orient=codes, spacing=spacings, tilt=angles, shape=shapes, seed=st.integers(0, 2 ** 16))
def test_resampling_onto_its_own_grid_is_the_identity(orient, spacing, tilt, shape, seed):
    affine = _affine(orient, spacing, tilt)
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 29, shape).astype(np.uint8)
    assert np.array_equal(geometry.resample_to_grid(mask, affine, shape, affine, is_mask=True), mask)
    image = rng.normal(size=shape).astype(np.float32)
    for order in (1, 3):
        out = geometry.resample_to_grid(image, affine, shape, affine, order=order)
        assert np.allclose(out, image, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(orient=codes, tilt=angles)
def test_axcodes_and_obliquity_of_tilted_grids(orient, tilt):
    affine = _affine(orient, (1.0, 1.0, 2.0), tilt)
    assert geometry.obliquity_deg(_affine(orient, (1.0, 1.0, 2.0))) == pytest.approx(0.0, abs=1e-6)
    if max(abs(a) for a in tilt) < 20:
        assert geometry.axcodes(affine) == orient  # a small tilt keeps the nearest axes
    assert 0.0 <= geometry.obliquity_deg(affine) <= 60.0


def test_mask_resampling_never_invents_labels():
    rng = np.random.default_rng(1)
    mask = rng.choice(np.array([0, 20, 21, 28], np.uint8), size=(12, 14, 9))
    affine = _affine(("P", "I", "R"), (1.0, 1.0, 2.0), (10, 5, 0))
    out, new_affine = geometry.resample_to_spacing(mask, affine, 0.7, is_mask=True)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 20, 21, 28}
    assert np.allclose(geometry.spacing(new_affine), 0.7)


def test_grid_for_spacing_spans_the_same_field_of_view():
    affine = _affine(("R", "A", "S"), (0.8, 0.8, 2.5), (3, -4, 12))
    shape = (50, 40, 20)
    new_shape, new_affine = geometry.grid_for_spacing(shape, affine, (1.6, 1.6, 1.25))
    assert new_shape == (25, 20, 40)
    corner = geometry.vox2world(affine, [-0.5, -0.5, -0.5])
    assert np.allclose(geometry.vox2world(new_affine, [-0.5, -0.5, -0.5]), corner)
    far = geometry.vox2world(affine, np.array(shape) - 0.5)
    assert np.allclose(geometry.vox2world(new_affine, np.array(new_shape) - 0.5), far)


def test_upsampled_image_matches_a_linear_ramp():
    affine = _affine(("L", "P", "S"), (2.0, 2.0, 2.0), (0, 0, 15))
    ijk = np.indices((10, 10, 10)).transpose(1, 2, 3, 0)
    ramp = (geometry.vox2world(affine, ijk.reshape(-1, 3)) @ [1.0, 2.0, -0.5]).reshape(10, 10, 10)
    out, new_affine = geometry.resample_to_spacing(ramp.astype(np.float32), affine, 1.0, order=1)
    inner = np.argwhere(np.ones(out.shape, bool))
    world = geometry.vox2world(new_affine, inner)
    src = geometry.world2vox(affine, world)
    ok = np.all((src >= 0) & (src <= 9), axis=1)
    assert np.allclose(out[tuple(inner[ok].T)], world[ok] @ [1.0, 2.0, -0.5], atol=1e-3)


def test_same_grid_and_describe_grid():
    a = _affine(("P", "I", "R"), (1.0, 1.0, 2.0))
    assert geometry.same_grid((4, 5, 6), a, (4, 5, 6), a.copy())
    assert not geometry.same_grid((4, 5, 6), a, (4, 5, 7), a)
    assert geometry.describe_grid((4, 5, 6), a) == "4x5x6 voxels, 1x1x2 mm, PIR"


directions = st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda v: np.linalg.norm(v) > 0.1)


@settings(max_examples=80, deadline=None)
@given(u=directions, v=directions)
def test_rotation_between_turns_one_direction_onto_the_other(u, v):
    R = geometry.rotation_between(u, v)
    u, v = np.asarray(u) / np.linalg.norm(u), np.asarray(v) / np.linalg.norm(v)
    assert np.allclose(R @ u, v, atol=1e-9)
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(R) == pytest.approx(1.0)
    # the smallest such rotation: its angle is the angle between the two directions
    angle = np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))
    assert angle == pytest.approx(np.arccos(np.clip(u @ v, -1, 1)), abs=1e-6)


def test_rotation_between_opposite_directions_is_a_half_turn():
    R = geometry.rotation_between([0, 0, 1], [0, 0, -1])
    assert np.allclose(R @ [0, 0, 1], [0, 0, -1])
    assert np.linalg.det(R) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(u=directions, v=directions, centre=st.tuples(*[st.floats(-500, 500)] * 3))
def test_rotation_about_a_point_keeps_that_point_and_distances(u, v, centre):
    H = geometry.rotation_about(geometry.rotation_between(u, v), centre)
    assert np.allclose(H[:3, :3] @ centre + H[:3, 3], centre, atol=1e-6)
    p = np.array([[1.0, 2.0, 3.0], [-40.0, 7.0, 12.0]])
    q = p @ H[:3, :3].T + H[:3, 3]
    assert np.linalg.norm(q[0] - q[1]) == pytest.approx(np.linalg.norm(p[0] - p[1]))
    assert np.linalg.norm(q[0] - centre) == pytest.approx(np.linalg.norm(p[0] - np.asarray(centre)))
