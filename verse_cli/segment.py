"""``verse segment``: one 1 mm probability patch per vertebra.

For every centroid a patch of ``112 x 128 x 128`` mm (left-right x posterior-anterior x
inferior-superior) is resampled from the CT at 1 mm, with the body centroid at a fixed
place (56 mm from either side, 92 mm from the posterior and 80 mm from the inferior
face, because the posterior elements reach further back and the thoracic spinous
processes further down than the body). A 2.5D U-Net
(:mod:`verse_cli.nets.unet`) gives the probability that each voxel belongs to that
vertebra, with its neighbours counted as background. :func:`verse_cli.merge.merge`
puts the patches back together on the CT grid.

Patch frame: the CT's axes, turned toward the spine where it tilts steeply
-------------------------------------------------------------------------
The patch axes start from the CT's own voxel axes, permuted and flipped to point
right, anterior and superior. Where the spine's local direction (the tangent at the
centroid of a quadratic through it and its neighbours in head-to-foot order, against
the chord length; a straight line at the ends) leans more than ``FREE_TILT_DEG``
(15 degrees) from the patch's superior axis, the patch is turned toward it by the
excess, the smallest rotation that leaves at most 15 degrees of tilt. So

* the net sees no vertebra tilted beyond what its training covered (+-20 degrees of
  sagittal rotation augmentation on top of the synthetic spines' own curvature). On
  the real verse014, a tilted sagittal acquisition with lumbar tilts of 6-43 degrees,
  this lifts L5 from 0.57 to 0.68 Dice before the merge's refinement;
* vertebrae within 15 degrees keep a patch grid parallel to the CT grid: sampling is
  a pure scaling (three 1D interpolations, no oblique blur of thin processes), and
  the patch overlays the CT in ITK-SNAP slice by slice. Turning every vertebra
  upright instead (no free tilt) gives the same on 10 synthetic cases, +0.01 on
  verse014 but -0.015 on the tptbox L3 crop, where the oblique patch reaches out of
  the cropped field of view;
* the frame needs only the centroid file: the tangent uses every centroid listed
  (not only those chosen by ``--only``), so ``--only L3`` reruns a vertebra exactly as
  the full run made it; with a single centroid the frame stays axis-aligned. The turn
  is capped at ``MAX_TILT_DEG`` so that a wrong centroid cannot lay a patch on its side.

``frame="axis"`` keeps every patch parallel to the CT grid.

Recentring on the body the net found
------------------------------------
The net trained with centroids jittered by a few millimetres, but centroids from
``verse label`` on real scans can be 5-10 mm off (verse014's L1 and L5 in the pipeline:
9.7 and 5.1 mm), and a vertebra's patch then segments part of its neighbour. After the
first pass, the body centroid of each patch's own mask (``p > 0.5``, found with
:func:`verse_cli.core.centroids.body_centroids` on the 1 mm patch grid) is compared with
the given centroid; a vertebra whose body lies ``RECENTRE_MIN_MM``-``RECENTRE_MAX_MM``
away is segmented once more around that body. On verse014 with the pipeline's centroids
the bodies found lie 0.4-1.4 mm from the expert centroids for L2-L5 (given: 2.1-5.1 mm).
The patch index records both points (``centroid_world`` the given one, ``centre_world``
the patch's centre). ``recentre=False`` turns this off.

Mirrored second pass
--------------------
Every patch also goes through the net flipped left-right, and the two probabilities
are averaged (``mirror=False`` turns this off). A vertebra is nearly symmetric, so the
mirror image is a second plausible view whose errors are partly independent of the
first; the slab tiling is symmetric about the centroid, so both passes see the same
slabs. It costs one more forward pass per patch: on the 17-vertebra bench segment
takes 23.3 s instead of 14.6 s on two cores.
On the 50 held-out synthetic cases with ground-truth centroids it lifts the mean
Dice over 483 vertebrae from 0.9178 to 0.9201, with gains at 25 of the 26 levels
(C1 0.742 -> 0.740); verse014 stays at 0.828.

Outputs in ``PATCH_DIR``: ``<name>_prob.nii.gz`` (uint8, probability x 255, 1 mm,
affine in the CT's world space) per vertebra, and ``patches.json``, which lists
each patch's label, file, centroid and bounding box on the CT grid and in world mm.
An edited patch (a binary mask painted in ITK-SNAP, saved under the same name) is
accepted by ``verse merge`` in place of the probabilities.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .core import geometry
from .core import labels as L
from .core.errors import DataError, UsageError
from .core.progress import debug, info, track

PATCHES_JSON = "patches.json"
PATCHES_FORMAT = "verse-patches/1"
PROB_SCALE = 255
AIR_HU = -1024.0
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "segment.pt"
FRAMES = ("spine", "axis")
FREE_TILT_DEG = 15.0  # tilt left to the net (it trained with +-20 degrees of sagittal rotation)
MAX_TILT_DEG = 60.0
TANGENT_HALF_WINDOW = 1
RECENTRE_MIN_MM = 3.0  # a given centroid this far from the body the net found is moved there, once ...
RECENTRE_MAX_MM = 15.0  # ... unless farther than this (more than half a lumbar body height: another body)
RECENTRE_ROUNDS = 2
MIRROR = True  # left-right mirrored second pass, averaged (see predict_patches)


# --------------------------------------------------------------------------- geometry
def patch_directions(ct_affine: np.ndarray) -> np.ndarray:
    """Unit world vectors (columns) of the patch axes: the CT's axes turned toward R, A, S.

    The CT's direction cosines are first made exactly orthonormal (nearest rotation),
    so a slightly sheared header does not shear the patch.
    """
    dirs = geometry.direction_to_world(ct_affine)
    u, _, vt = np.linalg.svd(dirs)
    dirs = u @ vt
    out = np.zeros((3, 3))
    for j in range(3):
        world_axis = int(np.argmax(np.abs(dirs[:, j])))
        out[:, world_axis] = dirs[:, j] * np.sign(dirs[world_axis, j])
    return out


def patch_affine(ct_affine: np.ndarray, centroid_world, cfg: dict, rotation: np.ndarray | None = None,
                 first_slice: float = 0.0) -> np.ndarray:
    """The 1 mm affine of a patch whose ``centre_index`` voxel lies at ``centroid_world``.

    ``rotation`` (3x3, world) turns the patch about the centroid (training augmentation);
    ``first_slice`` shifts the first left-right index (used for slab margins).
    """
    dirs = patch_directions(ct_affine)
    if rotation is not None:
        dirs = np.asarray(rotation) @ dirs
    aff = np.eye(4)
    aff[:3, :3] = dirs
    centre = np.asarray(cfg["centre_index"], dtype=np.float64) - np.array([first_slice, 0.0, 0.0])
    aff[:3, 3] = np.asarray(centroid_world, dtype=np.float64) - dirs @ centre
    return aff


def spine_tangents(world: dict) -> dict:
    """Unit world vectors (pointing head-ward) of the spine's direction at each centroid.

    ``world`` maps VerSe labels (vertebrae, sacrum, coccyx) to world positions. At each
    centroid a quadratic in the chord length is fitted through the centroids up to
    ``TANGENT_HALF_WINDOW`` levels above and below (a straight line through two);
    its derivative there is the tangent. ``None`` for every label when fewer than two
    centroids are given.
    """
    labels = L.sort_anatomical(world)
    if len(labels) < 2:
        return {lab: None for lab in labels}
    pts = np.array([np.asarray(world[lab], dtype=np.float64) for lab in labels])
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    out = {}
    for i, lab in enumerate(labels):
        lo, hi = max(0, i - TANGENT_HALF_WINDOW), min(len(labels), i + TANGENT_HALF_WINDOW + 1)
        t = s[lo:hi] - s[i]
        if hi - lo >= 3 and np.ptp(t) > 0:
            design = np.stack([np.ones_like(t), t, t**2], axis=1)
            coef, *_ = np.linalg.lstsq(design, pts[lo:hi], rcond=None)
            d = coef[1]
        else:
            d = pts[hi - 1] - pts[lo]
        norm = np.linalg.norm(d)
        out[lab] = None if norm < 1e-6 else -d / norm  # s grows toward the feet
    return out


def tilt_rotation(ct_affine: np.ndarray, tangent) -> np.ndarray | None:
    """The smallest world rotation taking the patch's superior axis onto ``tangent``.

    The angle is capped at ``MAX_TILT_DEG``; ``None`` for no tangent.
    """
    if tangent is None:
        return None
    up = patch_directions(ct_affine)[:, 2]
    t = np.asarray(tangent, dtype=np.float64)
    t = t / np.linalg.norm(t)
    if t @ up < 0:
        t = -t
    axis = np.cross(up, t)
    sin, cos = np.linalg.norm(axis), float(np.clip(up @ t, -1.0, 1.0))
    if sin < 1e-9:
        return None
    angle = min(np.arctan2(sin, cos), np.radians(MAX_TILT_DEG)) - np.radians(FREE_TILT_DEG)
    if angle <= 0:
        return None
    k = axis / sin
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle) * kx + (1.0 - np.cos(angle)) * (kx @ kx)


def sample_patch(volume: np.ndarray, vol_affine: np.ndarray, shape, affine: np.ndarray, order: int = 1,
                 cval: float = AIR_HU) -> np.ndarray:
    """Resample ``volume`` onto the patch grid ``(shape, affine)`` (float32; nearest for ``order=0``)."""
    from scipy import ndimage

    matrix = np.linalg.inv(vol_affine) @ affine
    if order == 1:
        axes = aligned_axes(matrix[:3, :3])
        if axes is not None:
            return _sample_separable(volume, matrix, axes, tuple(int(n) for n in shape), float(cval))
    out_dtype = volume.dtype if order == 0 else np.float32
    return ndimage.affine_transform(volume, matrix[:3, :3], offset=matrix[:3, 3], output_shape=tuple(shape),
                                    order=order, mode="constant", cval=cval, prefilter=False,
                                    output=out_dtype)


def aligned_axes(matrix: np.ndarray, tol: float = 1e-6):
    """For each patch axis, the volume axis it runs along, if the two grids are parallel.

    ``matrix`` maps patch voxel indices to volume voxel indices (3x3 part). Returns
    ``None`` unless every column has exactly one non-zero entry (a permutation with
    flips and scalings), which is the case for every patch at inference.
    """
    big = np.abs(matrix) > tol
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    return tuple(int(np.argmax(big[:, j])) for j in range(3))


def _sample_separable(volume: np.ndarray, matrix: np.ndarray, axes, shape, cval: float) -> np.ndarray:
    """Trilinear sampling on a parallel grid as three 1D linear interpolations.

    Gives what ``ndimage.affine_transform(order=1, mode="constant", prefilter=False)``
    gives (``cval`` outside the volume), at a fraction of the cost: only the covered sub-block of the volume is read, and each pass is two
    gathers and a weighted sum.
    """
    coords = [matrix[axes[j], j] * np.arange(shape[j]) + matrix[axes[j], 3] for j in range(3)]
    block = volume.transpose(axes)  # a view: its axis j is the volume axis under patch axis j
    lo = [int(np.clip(np.floor(c.min()), 0, n - 1)) for c, n in zip(coords, block.shape)]
    hi = [int(np.clip(np.floor(c.max()) + 2, lo_j + 1, n)) for c, lo_j, n in zip(coords, lo, block.shape)]
    if any(c.max() < 0 or c.min() > n - 1 for c, n in zip(coords, block.shape)):
        return np.full(shape, cval, dtype=np.float32)
    out = np.asarray(block[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    for j in range(3):
        out = _interp_axis(out, coords[j] - lo[j], j, cval)
    return out


def _interp_axis(data: np.ndarray, coord: np.ndarray, axis: int, cval: float) -> np.ndarray:
    """Linear interpolation of ``data`` along ``axis`` at ``coord``; ``cval`` outside ``[0, n - 1]``."""
    n = data.shape[axis]
    inside = (coord >= -1e-6) & (coord <= n - 1 + 1e-6)
    x = np.clip(coord, 0.0, n - 1.0)
    i0 = np.clip(np.floor(x).astype(np.intp), 0, max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    view = [None] * data.ndim
    view[axis] = slice(None)
    w = (x - i0).astype(np.float32)[tuple(view)]
    out = np.take(data, i0, axis=axis) * (1 - w) + np.take(data, i1, axis=axis) * w
    if not inside.all():
        out[tuple(slice(None) if k != axis else ~inside for k in range(data.ndim))] = cval
    return out


def bbox_on_grid(patch_shape, patch_aff: np.ndarray, grid_shape, grid_affine: np.ndarray):
    """The voxel box ``(lo, hi)`` (hi exclusive) of ``grid`` that a patch covers, clipped to the grid.

    Returns ``None`` when the patch lies wholly outside the grid.
    """
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in patch_shape], indexing="ij")).reshape(3, -1).T
    ijk = geometry.world2vox(grid_affine, geometry.vox2world(patch_aff, corners))
    lo = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, np.asarray(grid_shape[:3]))
    if np.any(hi <= lo):
        return None
    return lo, hi


def slab_layout(cfg: dict) -> tuple[int, int, int]:
    """``(n_slabs, margin, extended_width)`` of the left-right slab tiling of a patch."""
    width = int(cfg["patch_shape"][0])
    n_in, n_out = int(cfg["n_in"]), int(cfg["n_out"])
    n_slabs = -(-width // n_out)
    margin = (n_in - n_out) // 2
    return n_slabs, margin, n_slabs * n_out + (n_in - n_out)


def slabs_of(extended: np.ndarray, cfg: dict) -> np.ndarray:
    """``(n_slabs, n_in, H, W)`` strided view of the slabs of an extended patch."""
    n_in, n_out = int(cfg["n_in"]), int(cfg["n_out"])
    windows = np.lib.stride_tricks.sliding_window_view(extended, n_in, axis=0)[::n_out]
    return np.moveaxis(windows, -1, 1)


def slab_offsets(cfg: dict) -> np.ndarray:
    """Left-right distance (mm) of each slab's centre from the centroid."""
    n_slabs, _, _ = slab_layout(cfg)
    n_out = int(cfg["n_out"])
    centres = np.arange(n_slabs) * n_out + (n_out - 1) / 2.0
    return centres - float(cfg["centre_index"][0])


# --------------------------------------------------------------------------- inference
def extract_extended(ct: np.ndarray, ct_affine: np.ndarray, centroid_world, cfg: dict,
                     rotation: np.ndarray | None = None) -> np.ndarray:
    """The patch with slab margins left and right, in HU (float32)."""
    _, margin, ext = slab_layout(cfg)
    shape = (ext, *cfg["patch_shape"][1:])
    aff = patch_affine(ct_affine, centroid_world, cfg, rotation=rotation, first_slice=-margin)
    return sample_patch(ct, ct_affine, shape, aff)


def mirror_symmetric(cfg: dict) -> bool:
    """Whether the slab tiling of a patch is its own left-right mirror image (needed for ``mirror``)."""
    offsets = slab_offsets(cfg)
    width = int(cfg["patch_shape"][0])
    return width % int(cfg["n_out"]) == 0 and np.allclose(offsets, -offsets[::-1])


def predict_patches(model, extended: list[np.ndarray], cfg: dict, device="cpu",
                    mirror: bool = False) -> list[np.ndarray]:
    """Probabilities (float32, ``patch_shape``) for a list of extended HU patches, in one forward pass.

    With ``mirror`` each patch is also run flipped left-right and the two probabilities
    are averaged (test-time augmentation): a vertebra is close to symmetric, so the
    mirror image is a plausible second view whose errors are partly independent.
    """
    import torch

    from .nets.unet import network_input

    width = int(cfg["patch_shape"][0])
    offsets = slab_offsets(cfg)
    mirror = mirror and mirror_symmetric(cfg)
    views = [e[::-1] for e in extended] if mirror else []
    x = np.concatenate([network_input(slabs_of(e, cfg), offsets, cfg) for e in [*extended, *views]])
    with torch.inference_mode():
        logits = model(torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last))
        prob = torch.sigmoid(logits.float()).cpu().numpy()
    n_slabs = len(offsets)
    n_out = int(cfg["n_out"])

    def patch_of(i: int) -> np.ndarray:
        block = prob[i * n_slabs:(i + 1) * n_slabs]  # (n_slabs, n_out, H, W)
        return block.reshape(n_slabs * n_out, *block.shape[2:])[:width]

    out = [patch_of(i) for i in range(len(extended))]
    if mirror:
        out = [0.5 * (p + patch_of(len(extended) + i)[::-1]) for i, p in enumerate(out)]
    return out


def to_uint8(prob: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(prob, 0.0, 1.0) * PROB_SCALE).astype(np.uint8)


def patch_file_name(label: int) -> str:
    return f"{L.name(label)}_prob.nii.gz"


def parse_only(only: str | None, available: list[int]) -> list[int] | None:
    """``"L3,L4"`` -> ``[22, 23]``; every name must be among ``available`` centroids."""
    if only is None or not str(only).strip():
        return None
    chosen = []
    for item in str(only).split(","):
        if not item.strip():
            continue
        try:
            lab = L.label_id(item)
        except ValueError as exc:
            raise UsageError(f"--only: {exc}") from None
        if lab not in available:
            raise UsageError(f"--only: {L.name(lab)} is not in the centroid file "
                             f"(has {', '.join(L.name(a) for a in available)})")
        chosen.append(lab)
    return chosen


def _resolve_model(model):
    if model is None:
        model = BUNDLED_MODEL
    return Path(model)


def segment(ct_img, centroids, model=None, only=None, batch: int = 4, device: str = "auto",
            out_dir: str | os.PathLike | None = None, ct_name: str | None = None, frame: str = "spine",
            recentre: bool = True, mirror: bool = MIRROR) -> list[dict]:
    """Segment every vertebra of ``centroids`` in its own 1 mm patch.

    Parameters
    ----------
    ct_img : nibabel image or path
        The CT (HU).
    centroids : Centroids or path
        Body centroids in voxel coordinates of the CT (VerSe JSON when a path).
    model : path, optional
        A bundle from ``verse train segment``; default ``models/segment.pt``.
    only : str or list of int, optional
        Vertebrae to (re)run, e.g. ``"L3,L4"``; with ``out_dir`` the other entries of an
        existing ``patches.json`` are kept.
    batch : int
        Vertebrae per forward pass.
    device : {"auto", "cpu", "cuda"}
    frame : {"spine", "axis"}
        CT axes turned toward the spine where it tilts more than ``FREE_TILT_DEG``
        (default), or the CT's axes for every patch.
    recentre : bool
        Segment a vertebra again around the body its first patch found, when that body
        lies 3-15 mm from the given centroid (see the module notes).
    mirror : bool
        Also run every patch mirrored left-right and average the two (see the module notes).
    out_dir : path, optional
        Where to write ``<name>_prob.nii.gz`` and ``patches.json``.

    Returns
    -------
    list of dict
        One entry per segmented vertebra: ``label``, ``name``, ``file``, ``affine``
        (4x4, 1 mm patch grid), ``prob`` (uint8, probability x 255), ``bbox_vox``,
        ``bbox_world``, ``centroid_world``.
    """
    from .core.centroids import Centroids, read_centroids
    from .core.io import load_ct
    from .nets.train import model_hash, pick_device
    from .nets.unet import load_model

    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    if frame not in FRAMES:
        raise UsageError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UsageError(f"-o must be a folder, but {out_dir} is a file")
    if isinstance(ct_img, (str, os.PathLike)):
        ct_name = ct_name or Path(ct_img).name
        ct_img = load_ct(ct_img)
    if not isinstance(centroids, Centroids):
        source = str(centroids)
        centroids = read_centroids(centroids, ref_affine=ct_img.affine)
        centroids.check_matches(ct_img.affine, source)
    else:
        centroids.check_matches(ct_img.affine)
    labels = [lab for lab in centroids.labels if L.is_vertebra(lab)]
    if not labels:
        raise DataError("the centroid file lists no vertebra")
    chosen = parse_only(only, labels) if not isinstance(only, (list, tuple)) else [int(x) for x in only]
    if chosen is not None:
        labels = [lab for lab in labels if lab in chosen]
    model_path = _resolve_model(model)
    torch_device = pick_device(device)
    net, cfg, _ = load_model(model_path, device=torch_device)
    _limit_threads()

    ct = np.asarray(ct_img.dataobj, dtype=np.float32)
    aff = np.asarray(ct_img.affine, dtype=np.float64)
    world = dict(zip(centroids.labels, centroids.to_world(aff)))
    # the frame comes from every centroid in the file, so an --only rerun repeats the full run
    tangents = spine_tangents(world) if frame == "spine" else {}
    rotations = {lab: tilt_rotation(aff, tangents.get(lab)) for lab in labels}
    labels = L.sort_anatomical(labels)
    info(f"segmenting {len(labels)} vertebrae ({', '.join(L.name(x) for x in labels)})")
    centres = dict(world)
    results = _segment_at(net, ct, aff, labels, centres, world, rotations, cfg, torch_device, batch, mirror)
    todo = results
    for _ in range(RECENTRE_ROUNDS if recentre else 0):
        moved = recentred_centres(todo)
        if not moved:
            break
        info(f"recentring {len(moved)} vertebrae on the body their patch found "
             f"({', '.join(L.name(x) for x in moved)})")
        centres.update(moved)
        todo = _segment_at(net, ct, aff, list(moved), centres, world, rotations, cfg, torch_device, batch,
                           mirror)
        again = {r["label"]: r for r in todo}
        results = [again.get(r["label"], r) for r in results]
    if out_dir is not None:
        write_patches(out_dir, results, ct.shape, aff, ct_name=ct_name,
                      model={"file": model_path.name, "hash": model_hash(model_path)})
    return results


def _segment_at(net, ct, aff, labels, centres, given, rotations, cfg, device, batch, mirror) -> list[dict]:
    """One patch per label, centred at ``centres[label]`` (``given[label]`` is what the file said)."""
    results = []
    chunks = [labels[i:i + batch] for i in range(0, len(labels), batch)]
    for chunk in track(chunks, "segmenting", total=len(chunks)):
        ext = [extract_extended(ct, aff, centres[lab], cfg, rotations[lab]) for lab in chunk]
        probs = predict_patches(net, ext, cfg, device, mirror=mirror)
        for lab, prob in zip(chunk, probs):
            paff = patch_affine(aff, centres[lab], cfg, rotation=rotations[lab])
            box = bbox_on_grid(prob.shape, paff, ct.shape, aff)
            results.append(_entry(lab, paff, to_uint8(prob), box, aff, given[lab], centres[lab]))
            debug(f"{L.name(lab)}: {int((prob > 0.5).sum())} mm^3 above 0.5")
    return results


def patch_body_centre(entry: dict) -> np.ndarray | None:
    """World position of the body centroid of a patch's own mask (``p > 0.5``), or ``None``."""
    from .core.centroids import body_centroids

    mask = entry["prob"] > PROB_SCALE // 2
    if mask.sum() < 100:  # not a vertebra (an empty or stray patch): nothing to recentre on
        return None
    labelled = mask.astype(np.uint8) * np.uint8(entry["label"])
    found = body_centroids(labelled, entry["affine"])
    if not found.labels:
        return None
    return found.to_world(entry["affine"])[0]


def recentred_centres(results: list[dict]) -> dict:
    """``{label: world point}`` for the vertebrae whose body lies 3-15 mm from their patch centre."""
    moved = {}
    for entry in results:
        body = patch_body_centre(entry)
        if body is None:
            continue
        shift = float(np.linalg.norm(body - np.asarray(entry["centre_world"])))
        if RECENTRE_MIN_MM < shift <= RECENTRE_MAX_MM:
            moved[entry["label"]] = body
            debug(f"{L.name(entry['label'])}: body {shift:.1f} mm from the given centroid")
    return moved


def _limit_threads() -> None:
    """Use the machine's cores but no more (torch defaults can oversubscribe in containers)."""
    import torch

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))


def _entry(label, paff, prob_u8, box, ct_aff, centroid_world, centre_world) -> dict:
    entry = {"label": int(label), "name": L.name(label), "file": patch_file_name(label), "affine": paff,
             "prob": prob_u8, "centroid_world": [round(float(v), 2) for v in centroid_world],
             "centre_world": [round(float(v), 2) for v in centre_world]}
    if box is None:
        entry["bbox_vox"] = None
        entry["bbox_world"] = None
    else:
        lo, hi = box
        corners = np.array(np.meshgrid(*[[lo[k], hi[k] - 1] for k in range(3)], indexing="ij")).reshape(3, -1).T
        xyz = geometry.vox2world(ct_aff, corners)
        entry["bbox_vox"] = [lo.tolist(), hi.tolist()]
        entry["bbox_world"] = [np.round(xyz.min(axis=0), 2).tolist(), np.round(xyz.max(axis=0), 2).tolist()]
    return entry


def write_patches(out_dir, results: list[dict], ct_shape, ct_affine, ct_name=None, model=None) -> Path:
    """Write each patch NIfTI and (last) ``patches.json``, merging with an existing index.

    Entries of an existing ``patches.json`` whose label is not in ``results`` are kept,
    which is what makes ``--only`` reruns possible.
    """
    from .core.io import fresh_image, read_json, save_nifti, write_json

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o must be a folder, but {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / PATCHES_JSON
    old = []
    if index_path.exists():
        previous = read_json(index_path)
        if isinstance(previous, dict) and isinstance(previous.get("patches"), list):
            old = previous["patches"]
    for r in results:
        save_nifti(fresh_image(r["prob"], r["affine"]), out_dir / r["file"])
    new_labels = {r["label"] for r in results}
    entries = [e for e in old if isinstance(e, dict) and e.get("label") not in new_labels]
    entries += [{k: v for k, v in r.items() if k not in ("prob", "affine")} for r in results]
    entries.sort(key=lambda e: L.rank(int(e["label"])))
    index = {"format": PATCHES_FORMAT, "ct": {"file": ct_name, "shape": [int(s) for s in ct_shape[:3]],
                                               "affine": np.round(np.asarray(ct_affine), 6).tolist()},
             "model": model, "probability_scale": PROB_SCALE, "patches": entries}
    write_json(index, index_path)
    info(f"wrote {len(results)} patches and {PATCHES_JSON} to {out_dir}")
    return index_path
