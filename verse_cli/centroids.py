"""``verse centroids``: a vertebra mask to VerSe centroid JSON.

Users of VerSe data often cannot reproduce the published centroids, which are
vertebral-body centroids, not centres of mass; this stage does.
"""

from __future__ import annotations

from pathlib import Path

from .core import geometry
from .core.centroids import Centroids, centroids_from_mask, marker_mask, write_centroids
from .core.io import load_mask, save_mask
from .core.labels import VERSE_IDS


def compute(mask_img, whole: bool = False) -> Centroids:
    """Centroids of every label of a mask image (body centroids unless ``whole``)."""
    import numpy as np

    return centroids_from_mask(np.asarray(mask_img.dataobj), mask_img.affine, whole=whole)


def run(mask_path: Path, output: Path, whole: bool = False, markers: Path | None = None) -> Centroids:
    """Read ``mask_path``, write the centroid JSON (and optionally a marker NIfTI)."""
    from .core.errors import DataError
    from .core.progress import info

    img = load_mask(mask_path, allowed_labels=set(VERSE_IDS))
    ctd = compute(img, whole=whole)
    if len(ctd) == 0:
        raise DataError("mask has no vertebra labels", mask_path)
    if markers is not None:
        save_mask(marker_mask(ctd, img.shape, img.affine), img.affine, markers)
    write_centroids(ctd, output)
    kind = "whole-vertebra centres of mass" if whole else "body centroids"
    info(f"{len(ctd)} {kind} ({''.join(geometry.axcodes(img.affine))}) -> {output}")
    return ctd
