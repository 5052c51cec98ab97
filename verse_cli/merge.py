"""``verse merge``: per-vertebra patches -> one label mask on the CT grid.

Every patch listed in ``patches.json`` is resampled (linear on the probability) onto
the part of the CT grid it covers - never onto the whole volume - and compared with
the best probability seen so far there. So memory stays at two bytes per CT voxel
(best probability and its label, both uint8) whatever the number of vertebrae, plus
the CT itself (float32) for the edge refinement, and no voxel can receive two labels.
Then:

1. a voxel keeps the most probable vertebra if that probability exceeds 0.5;
2. edge refinement on the CT (``refine=True``): each vertebra grows, by up to
   ``GROW_VOXELS`` voxels, into the neighbouring voxels that it wins (it is the most
   probable vertebra there, though below 0.5) and that are clearly bone by the CT:
   at least ``EDGE_FRACTION`` (3/4) of the way from the soft tissue around that
   vertebra (median of a shell 3-4 voxels outside it) to its own boundary layer
   (median of its outermost voxels). Both levels are measured per vertebra and per
   scan, so the rule adapts to osteoporotic bone, kernel, dose and to data not in HU;
   nothing is set in absolute HU. Why: on real CT the net puts the boundary about
   one voxel inside the cortex (verse014: 40 k voxels missed against 5 k extra, the
   missed ones with a median of 335 HU; expert masks take in the whole cortex).
   The half-way point (the half-maximum edge) gains more on real CT but costs our
   synthetic cases 1-2 % Dice (their masks stop inside the blurred edge); at 3/4 the
   synthetic score is unchanged (-0.002 on 8 cases) and verse014 still gains 0.05.
   The growth never takes a voxel another vertebra wins, nor crosses a dark disc to
   an unclaimed bone (a sacrum without centroid); a vertebra whose patch is an edited
   binary mask keeps the boundary the user painted;
3. each label keeps only its largest connected component (26-connectivity), which
   removes islands stolen from a neighbour;
4. holes of a label smaller than ``max_hole_mm3`` that no other label claims are filled.

Edited patches: a patch whose file holds plain integers with a single non-zero value
(e.g. 0/1 painted in ITK-SNAP) is read as a binary mask, i.e. probability 1 inside.
Otherwise uint8 values are probability x 255 and float values are probabilities.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .core import geometry
from .core import labels as L
from .core.errors import DataError, UsageError
from .core.progress import debug, info, track

THRESHOLD = 0.5
MAX_HOLE_MM3 = 500.0
EDGE_FRACTION = 0.75  # of the way from the soft tissue to the bone boundary layer: clearly bone
GROW_VOXELS = 4
GROW_MIN_PROB = 0.05  # a grown voxel must carry this much probability of the vertebra that wins it
MIN_EDGE_CONTRAST = 100.0  # HU between bone boundary and soft tissue, below which no refinement is tried


def read_index(patch_dir) -> list[dict]:
    """The patch entries of ``patch_dir/patches.json``, checked."""
    from .core.io import read_json
    from .segment import PATCHES_JSON

    patch_dir = Path(patch_dir)
    if not patch_dir.is_dir():
        raise DataError("no such patch folder", patch_dir)
    index_path = patch_dir / PATCHES_JSON
    if not index_path.is_file():
        raise DataError(f"no {PATCHES_JSON} (expected a folder written by 'verse segment')", patch_dir)
    index = read_json(index_path)
    entries = index.get("patches") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise DataError("no 'patches' list", index_path)
    for e in entries:
        if not isinstance(e, dict) or "label" not in e or "file" not in e:
            raise DataError(f"patch entry without label/file: {e}", index_path)
        try:
            L.name(int(e["label"]))
        except (TypeError, ValueError):
            raise DataError(f"patch label {e['label']!r} is not a VerSe id", index_path) from None
    labels = [int(e["label"]) for e in entries]
    if len(set(labels)) != len(labels):
        raise DataError("a label is listed twice", index_path)
    return entries


def read_patch(path) -> tuple[np.ndarray, np.ndarray]:
    """A patch as ``(uint8 probability x 255, affine)``; binary masks become 0/255."""
    from .core.io import load_nifti

    img = load_nifti(path)
    raw = np.asanyarray(img.dataobj)
    slope, inter = img.header.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    if np.issubdtype(raw.dtype, np.floating) or scaled:
        prob = np.asarray(img.get_fdata(dtype=np.float32))
        if not np.all(np.isfinite(prob)):
            raise DataError("patch has NaN or infinite values", path)
        if prob.min() < 0 or prob.max() > 1.0 + 1e-3:
            raise DataError("float patch values must be probabilities in [0, 1]", path)
        return np.rint(prob * 255).astype(np.uint8), img.affine
    values = np.unique(raw)
    if values.min() < 0:
        raise DataError("patch has negative values", path)
    nonzero = values[values != 0]
    if len(nonzero) <= 1 and (len(nonzero) == 0 or nonzero[0] != 255):
        return np.where(raw != 0, 255, 0).astype(np.uint8), img.affine  # an edited binary mask
    if values.max() > 255:
        raise DataError("integer patch values must be 0-255 (probability x 255) or a binary mask", path)
    return raw.astype(np.uint8), img.affine


def _ct_grid(ct_img) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the CT, reading only its header when given a path."""
    if isinstance(ct_img, (str, os.PathLike)):
        import nibabel as nib

        path = Path(ct_img)
        if not path.is_file():
            raise DataError("no such file", path)
        try:
            img = nib.load(str(path))
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for non-NIfTI content
            raise DataError(f"not a readable NIfTI image ({str(exc).splitlines()[0][:120]})", path) from None
        shape = tuple(int(s) for s in img.shape[:3])
        if len(img.shape) < 3 or (len(img.shape) == 4 and img.shape[3] != 1) or len(img.shape) > 4:
            raise DataError(f"expected a 3D image, got shape {img.shape}", path)
        return shape, np.asarray(img.affine, dtype=np.float64)
    return tuple(int(s) for s in ct_img.shape[:3]), np.asarray(ct_img.affine, dtype=np.float64)


def resample_into(prob: np.ndarray, patch_aff: np.ndarray, shape, affine: np.ndarray):
    """Linear resampling of a uint8 probability patch onto the CT sub-box it covers.

    Returns ``(slices, values)`` with ``values`` uint8 on ``CT[slices]``, or ``None``
    when the patch lies outside the CT.
    """
    from scipy import ndimage

    from .segment import bbox_on_grid

    box = bbox_on_grid(prob.shape, patch_aff, shape, affine)
    if box is None:
        return None
    lo, hi = box
    sub_aff = affine.copy()
    sub_aff[:3, 3] = geometry.vox2world(affine, lo)
    matrix = np.linalg.inv(patch_aff) @ sub_aff
    values = ndimage.affine_transform(prob.astype(np.float32), matrix[:3, :3], offset=matrix[:3, 3],
                                      output_shape=tuple(int(v) for v in hi - lo), order=1, mode="constant",
                                      cval=0.0, prefilter=False)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), np.rint(values).astype(np.uint8)


def merge(ct_img, patch_dir, threshold: float = THRESHOLD, max_hole_mm3: float = MAX_HOLE_MM3,
          refine: bool = True) -> np.ndarray:
    """Merge the patches of ``patch_dir`` into a uint8 VerSe-id mask on the CT grid.

    Parameters
    ----------
    ct_img : nibabel image or path
        The CT whose grid the mask takes (only its shape and affine are used).
    patch_dir : path
        A folder written by :func:`verse_cli.segment.segment` (``patches.json`` + patches).
    threshold : float
        A voxel is labelled only where its best probability exceeds this.
    max_hole_mm3 : float
        Enclosed holes up to this volume are filled.
    refine : bool
        Move each vertebra's boundary onto the CT's bone edge (step 2 above); reads the
        CT's voxels, not only its header.

    Returns
    -------
    numpy.ndarray
        uint8 labels, shape of the CT.
    """
    shape, affine = _ct_grid(ct_img)
    patch_dir = Path(patch_dir)
    entries = read_index(patch_dir)
    if not entries:
        raise DataError("patches.json lists no patch", patch_dir)
    best = np.zeros(shape, dtype=np.uint8)
    label_map = np.zeros(shape, dtype=np.uint8)
    boxes: dict[int, tuple[slice, ...]] = {}
    edited: set[int] = set()
    for e in track(entries, "merging", total=len(entries)):
        label = int(e["label"])
        prob, paff = read_patch(patch_dir / str(e["file"]))
        placed = resample_into(prob, paff, shape, affine)
        if placed is None:
            debug(f"{L.name(label)}: patch lies outside the CT")
            continue
        sl, values = placed
        wins = values > best[sl]
        best[sl][wins] = values[wins]
        label_map[sl][wins] = label
        boxes[label] = sl
        if not np.any((prob > 0) & (prob < 255)):
            edited.add(label)  # a painted mask: its boundary is the user's, not refined
    cut = int(np.floor(threshold * 255))
    if refine and boxes:
        weak = (best <= cut) & (best > int(np.floor(GROW_MIN_PROB * 255)))
        winner = np.where(weak, label_map, 0)  # who would take each weak voxel
        del weak
        label_map[best <= cut] = 0
        del best
        ct = _ct_values(ct_img)
        for label, box in boxes.items():
            if label not in edited:
                _grow_to_bone_edge(label_map, winner, ct, label, box)
        del ct, winner
    else:
        label_map[best <= cut] = 0
        del best
    voxel_mm3 = float(np.prod(geometry.spacing(affine)))
    for label, sl in boxes.items():
        _clean_label(label_map, label, sl, max(1, int(max_hole_mm3 / voxel_mm3)))
    found = sorted(set(np.unique(label_map).tolist()) - {0})
    info(f"merged {len(found)} vertebrae: {', '.join(L.name(x) for x in L.sort_anatomical(found))}")
    return label_map


def _ct_values(ct_img) -> np.ndarray:
    """The CT's voxel values (float32, header scaling applied)."""
    from .core.io import load_ct

    if isinstance(ct_img, (str, os.PathLike)):
        ct_img = load_ct(ct_img)
    return np.asarray(ct_img.get_fdata(dtype=np.float32) if hasattr(ct_img, "get_fdata") else ct_img,
                      dtype=np.float32)


def _grow_to_bone_edge(label_map: np.ndarray, winner: np.ndarray, ct: np.ndarray, label: int,
                       patch_box: tuple[slice, ...]) -> int:
    """Grow ``label`` into the weak voxels it wins that are clearly bone by the CT, in place.

    Works in the label's bounding box (found inside its patch's box) plus a margin.
    Returns the number of voxels added.
    """
    from scipy import ndimage

    where = np.nonzero(label_map[patch_box] == label)
    if len(where[0]) < 27:
        return 0
    pad = GROW_VOXELS + 1
    sl = tuple(slice(max(int(w.min()) + b.start - pad, 0), min(int(w.max()) + b.start + pad + 1, n))
               for w, b, n in zip(where, patch_box, label_map.shape))
    view, hu = label_map[sl], ct[sl]
    own = view == label
    six = ndimage.generate_binary_structure(3, 1)
    boundary = own & ~ndimage.binary_erosion(own, six)
    shell = ndimage.binary_dilation(own, six, iterations=4) & ~ndimage.binary_dilation(own, six, iterations=2)
    shell &= view == 0
    if not boundary.any() or not shell.any():
        return 0
    soft, bone = float(np.median(hu[shell])), float(np.median(hu[boundary]))
    if bone - soft < MIN_EDGE_CONTRAST:
        return 0
    edge = soft + EDGE_FRACTION * (bone - soft)
    cand = (winner[sl] == label) & (hu >= edge) & (view == 0)
    added = 0
    for _ in range(GROW_VOXELS):
        step = cand & ndimage.binary_dilation(own, six)
        n = int(step.sum())
        if not n:
            break
        own |= step
        cand &= ~step
        added += n
    view[own & (view == 0)] = label
    debug(f"{L.name(label)}: soft tissue {soft:.0f}, bone edge {bone:.0f}, threshold {edge:.0f}; grew {added} voxels")
    return added


def _clean_label(label_map: np.ndarray, label: int, sl: tuple[slice, ...], max_hole: int) -> None:
    """Keep ``label``'s largest 26-connected component and fill its small free holes, in place."""
    from scipy import ndimage

    view = label_map[sl]
    own = view == label
    if not own.any():
        return
    components, n = ndimage.label(own, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        own = components == int(np.argmax(sizes))
        view[(view == label) & ~own] = 0
    # holes: background components (6-connected) that do not reach the padded border
    padded = np.pad(~own, 1, constant_values=True)
    holes, n_holes = ndimage.label(padded)
    if n_holes <= 1:
        return
    sizes = np.bincount(holes.ravel())
    outside = holes[0, 0, 0]
    small = (sizes <= max_hole)
    small[0] = False
    small[outside] = False
    fill = small[holes][1:-1, 1:-1, 1:-1] & (view == 0)
    view[fill] = label


def write_outputs(mask: np.ndarray, affine, output, itksnap_labels=None) -> None:
    """Write the mask (fresh uint8 header) and optionally an ITK-SNAP label file."""
    from .core.io import is_nifti_path, save_mask

    if not is_nifti_path(output):
        raise UsageError(f"-o must end in .nii or .nii.gz: {output}")
    save_mask(mask, affine, output)
    if itksnap_labels is not None:
        present = sorted(set(np.unique(mask).tolist()) - {0})
        L.write_itksnap_labels(itksnap_labels, present or None)


def run(ct, patch_dir, output, itksnap_labels=None) -> np.ndarray:
    """CLI entry: merge and write."""
    from .core.io import is_nifti_path

    if not is_nifti_path(output):
        raise UsageError(f"-o must end in .nii or .nii.gz: {output}")
    _, affine = _ct_grid(ct)
    mask = merge(ct, patch_dir)
    write_outputs(mask, affine, output, itksnap_labels)
    return mask
