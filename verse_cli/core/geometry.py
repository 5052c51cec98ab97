"""Voxel grids, orientations and resampling, always driven by the affine.

Nothing here assumes an orientation or isotropic voxels. Axis codes follow nibabel:
the letter each voxel axis points *toward* in RAS+ world space (``("P", "I", "R")``
for VerSe's usual PIR layout). Reorientation is a pure permutation/flip of the
array and is exactly invertible; resampling goes through the full 4x4 affines,
so oblique and tilted grids are handled like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AxisCodes = tuple[str, str, str]


def axcodes(affine: np.ndarray) -> AxisCodes:
    """Axis codes (e.g. ``('P', 'I', 'R')``) of the voxel axes of ``affine``."""
    import nibabel as nib

    return tuple(nib.aff2axcodes(affine))  # type: ignore[return-value]


def spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each voxel axis (column norms of the affine)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle in degrees between a voxel axis and its nearest world axis."""
    a = np.asarray(affine)[:3, :3] / spacing(affine)
    cosines = np.abs(a).max(axis=0).clip(-1, 1)
    return float(np.degrees(np.arccos(cosines)).max())


def vox2world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map voxel coordinates ``(N, 3)`` (or ``(3,)``) to RAS+ world mm."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def world_bounds(shape, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RAS min and max (mm) of the outer voxel corners of a grid (its world bounding box)."""
    n = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in n], indexing="ij")).reshape(3, -1).T
    xyz = vox2world(affine, corners)
    return xyz.min(axis=0), xyz.max(axis=0)


def world2vox(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map RAS+ world mm ``(N, 3)`` (or ``(3,)``) to continuous voxel coordinates."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def _ornt_between(affine: np.ndarray, target: Sequence[str]):
    import nibabel.orientations as nio

    start = nio.io_orientation(affine)
    end = nio.axcodes2ornt(tuple(target))
    return nio.ornt_transform(start, end)


def reorient(data: np.ndarray, affine: np.ndarray, target: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip ``data`` so its axes point along ``target`` codes.

    Returns the new array and the affine that keeps every voxel at the same world
    position. Only whole-axis permutations and flips are used, so reorienting back
    gives the original array and affine exactly.
    """
    import nibabel.orientations as nio

    target = tuple(c.upper() for c in target)
    ornt = _ornt_between(affine, target)
    out = nio.apply_orientation(data, ornt)
    new_affine = np.asarray(affine) @ nio.inv_ornt_aff(ornt, data.shape[:3])
    return np.ascontiguousarray(out), new_affine


def reorient_points(ijk: np.ndarray, shape: Sequence[int], affine: np.ndarray, target: Sequence[str]) -> np.ndarray:
    """Voxel coordinates of points after :func:`reorient` to ``target`` (exact, no rounding)."""
    ornt = _ornt_between(affine, tuple(c.upper() for c in target))
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    out = np.empty_like(ijk)
    for src_axis, (dst_axis, flip) in enumerate(ornt.astype(int)):
        values = ijk[:, src_axis]
        out[:, dst_axis] = (shape[src_axis] - 1) - values if flip < 0 else values
    return out


def grid_for_spacing(shape: Sequence[int], affine: np.ndarray, new_spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid covering the same field of view with voxel size ``new_spacing`` (mm).

    Axis directions are kept; the first voxel's corner stays at the same world point,
    so that the new grid spans the old field of view.
    """
    old = spacing(affine)
    new = np.broadcast_to(np.asarray(new_spacing, dtype=np.float64), (3,))
    extent = np.asarray(shape[:3]) * old
    new_shape = tuple(int(max(1, round(e / s))) for e, s in zip(extent, new))
    directions = np.asarray(affine)[:3, :3] / old
    new_affine = np.eye(4)
    new_affine[:3, :3] = directions * new
    # voxel centres: old corner at -0.5 voxel; keep the corner fixed
    corner = vox2world(affine, -0.5 * np.ones(3))
    new_affine[:3, 3] = corner + directions @ (0.5 * new)
    return new_shape, new_affine  # type: ignore[return-value]


def resample_to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    target_affine: np.ndarray,
    order: int = 1,
    cval: float = 0.0,
    is_mask: bool = False,
    dtype=None,
) -> np.ndarray:
    """Resample ``data`` (on ``affine``) onto the grid ``(shape, target_affine)``.

    ``order`` 1 or 3 for images; masks use nearest neighbour, which never invents a
    label. Points outside the source get ``cval``.
    """
    from scipy import ndimage

    matrix = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    # round-off of the inverse would push the last voxel just outside the source grid
    near = np.abs(matrix - np.rint(matrix)) < 1e-6
    matrix[near] = np.rint(matrix[near])
    if is_mask:
        order = 0
    src = data
    if order > 1 and not is_mask:
        src = data.astype(np.float32, copy=False)
    out_dtype = dtype or (data.dtype if is_mask else np.float32)
    out = ndimage.affine_transform(
        src,
        matrix[:3, :3],
        offset=matrix[:3, 3],
        output_shape=tuple(int(s) for s in shape[:3]),
        order=order,
        # nearest neighbour: each voxel owns [i - 0.5, i + 0.5), also at the border
        mode="grid-constant" if order == 0 else "constant",
        cval=cval,
        prefilter=order > 1,
        output=np.dtype(out_dtype) if not is_mask else data.dtype,
    )
    return out


def resample_to_spacing(data: np.ndarray, affine: np.ndarray, new_spacing, order: int = 1, cval: float = 0.0,
                        is_mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Resample to a voxel size in mm; returns the new array and its affine."""
    shape, new_affine = grid_for_spacing(data.shape, affine, new_spacing)
    return resample_to_grid(data, affine, shape, new_affine, order=order, cval=cval, is_mask=is_mask), new_affine


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> bool:
    """True when two images share shape and affine (within ``atol`` mm)."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b, atol=atol)


def describe_grid(shape, affine) -> str:
    """A short human description of a grid, for error messages."""
    sp = "x".join(f"{s:.3g}" for s in spacing(affine))
    return f"{'x'.join(str(int(s)) for s in shape[:3])} voxels, {sp} mm, {''.join(axcodes(affine))}"


def direction_to_world(affine: np.ndarray) -> np.ndarray:
    """Unit world vectors of the three voxel axes, as columns."""
    return np.asarray(affine)[:3, :3] / spacing(affine)


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1 along its last axis (one vector or rows of them); zero stays zero."""
    v = np.asarray(v)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def rotation_between(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The smallest rotation (3 x 3) that turns direction ``u`` onto direction ``v``.

    Rodrigues' formula about ``u x v``; opposite directions turn by 180 degrees about
    an axis perpendicular to both.
    """
    u = np.asarray(u, dtype=np.float64) / np.linalg.norm(u)
    v = np.asarray(v, dtype=np.float64) / np.linalg.norm(v)
    axis = np.cross(u, v)
    sin, cos = float(np.linalg.norm(axis)), float(np.clip(u @ v, -1.0, 1.0))
    if sin < 1e-12:
        if cos > 0:
            return np.eye(3)
        helper = np.eye(3)[int(np.argmin(np.abs(u)))]
        axis = np.cross(u, helper)
        sin, cos = 0.0, -1.0
    k = axis / np.linalg.norm(axis)
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + sin * K + (1.0 - cos) * K @ K


def rotation_about(rotation: np.ndarray, centre) -> np.ndarray:
    """The 4 x 4 world transform that turns by ``rotation`` (3 x 3) about the point ``centre``."""
    centre = np.asarray(centre, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - np.asarray(rotation, dtype=np.float64) @ centre
    return out
