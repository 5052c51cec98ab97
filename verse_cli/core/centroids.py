"""Vertebra centroids: the VerSe JSON formats, world coordinates, markers, and
centroids computed from a mask.

The VerSe 2020 centroid file is a JSON list whose first element is
``{"direction": [axis codes]}``; each following element is
``{"label": id, "X": x, "Y": y, "Z": z}`` in *voxel* coordinates of the image the
codes describe. VerSe 2019 files have no direction element and give millimetres
(voxel index times spacing) along the image's own axes; reading them needs the image.

VerSe centroids are vertebral-**body** centroids. :func:`body_centroids` computes them
from a vertebra mask (method in its docstring); :func:`mass_centroids` gives the
whole vertebra's centre of mass, 10-15 mm posterior of the body centroid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from . import geometry, labels as L
from .errors import DataError


@dataclass
class Centroids:
    """Labelled points in voxel coordinates of one image.

    ``coords[i]`` is the (continuous) voxel position of ``labels[i]`` along the axes
    described by ``axcodes``. ``extras[label]`` holds additional per-vertebra keys
    (e.g. ``confidence``) that are written next to X/Y/Z.
    """

    labels: list[int]
    coords: np.ndarray
    axcodes: tuple[str, str, str]
    extras: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        self.labels = [int(x) for x in self.labels]
        self.coords = np.asarray(self.coords, dtype=np.float64).reshape(-1, 3)
        self.axcodes = tuple(str(c).upper() for c in self.axcodes)  # type: ignore[assignment]
        if len(self.labels) != len(self.coords):
            raise ValueError("labels and coords differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def as_dict(self) -> dict[int, np.ndarray]:
        return {lab: self.coords[i] for i, lab in enumerate(self.labels)}

    def sorted(self) -> "Centroids":
        """Head-to-foot order."""
        order = sorted(range(len(self.labels)), key=lambda i: L.rank(self.labels[i]))
        return Centroids([self.labels[i] for i in order], self.coords[order], self.axcodes,
                         {k: v for k, v in self.extras.items()})

    def subset(self, keep: Iterable[int]) -> "Centroids":
        keep = set(int(k) for k in keep)
        idx = [i for i, lab in enumerate(self.labels) if lab in keep]
        return Centroids([self.labels[i] for i in idx], self.coords[idx], self.axcodes,
                         {k: v for k, v in self.extras.items() if k in keep})

    def to_world(self, affine: np.ndarray) -> np.ndarray:
        """World RAS+ mm of every centroid, for an image whose axes match ``axcodes``."""
        self.check_matches(affine)
        return geometry.vox2world(affine, self.coords)

    @classmethod
    def from_world(cls, labels, xyz, affine, extras=None) -> "Centroids":
        """Centroids on the voxel grid of ``affine`` from world RAS+ mm."""
        return cls(list(labels), geometry.world2vox(affine, np.asarray(xyz).reshape(-1, 3)),
                   geometry.axcodes(affine), dict(extras or {}))

    def check_matches(self, affine: np.ndarray, source: str | None = None) -> None:
        """Refuse to use centroids with an image of other orientation."""
        codes = geometry.axcodes(affine)
        if codes != self.axcodes:
            raise DataError(
                f"centroid direction {''.join(self.axcodes)} does not match the image orientation "
                f"{''.join(codes)}", source)

    def reoriented(self, shape, affine, target) -> "Centroids":
        """The same points after :func:`geometry.reorient` of their image to ``target``."""
        self.check_matches(affine)
        new = geometry.reorient_points(self.coords, shape, affine, target)
        return Centroids(self.labels, new, tuple(c.upper() for c in target), dict(self.extras))

    def to_json(self, decimals: int = 2) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"direction": list(self.axcodes)}]
        for lab, (x, y, z) in sorted(zip(self.labels, self.coords.tolist()), key=lambda t: L.rank(t[0])):
            entry: dict[str, Any] = {"label": lab, "X": round(x, decimals), "Y": round(y, decimals),
                                     "Z": round(z, decimals)}
            entry.update(self.extras.get(lab, {}))
            out.append(entry)
        return out


# --------------------------------------------------------------------------- JSON
def parse_centroids(obj: Any, source: str | None = None, ref_affine: np.ndarray | None = None) -> Centroids:
    """Centroids from parsed VerSe JSON (2020 with direction, or 2019 in mm).

    VerSe 2019 files need ``ref_affine`` (the image they belong to): their mm values
    are divided by its spacing.
    """
    if isinstance(obj, dict) and "centroids" in obj:  # some tools wrap the list
        obj = obj["centroids"]
    if not isinstance(obj, list) or not obj:
        raise DataError("centroid JSON must be a non-empty list", source)
    direction = None
    entries = []
    for item in obj:
        if not isinstance(item, dict):
            raise DataError("centroid JSON entries must be objects", source)
        if "direction" in item:
            direction = item["direction"]
            continue
        if "label" not in item or not all(k in item for k in "XYZ"):
            raise DataError(f"centroid entry without label/X/Y/Z: {item}", source)
        entries.append(item)
    try:
        labs = [int(e["label"]) for e in entries]
        coords = np.array([[float(e["X"]), float(e["Y"]), float(e["Z"])] for e in entries]).reshape(-1, 3)
    except (TypeError, ValueError):
        raise DataError("centroid labels and X/Y/Z must be numbers", source) from None
    bad = sorted(set(labs) - set(L.VERSE_IDS))
    if bad:
        raise DataError(f"labels outside the VerSe table: {bad}", source)
    if len(set(labs)) != len(labs):
        raise DataError("duplicate labels in centroid JSON", source)
    extras = {lab: {k: v for k, v in e.items() if k not in ("label", "X", "Y", "Z")} for lab, e in zip(labs, entries)}
    extras = {k: v for k, v in extras.items() if v}
    if direction is not None:
        if (not isinstance(direction, (list, tuple)) or len(direction) != 3
                or sorted(str(c).upper() for c in direction) not in _VALID_CODE_SETS):
            raise DataError(f"invalid direction {direction!r}", source)
        return Centroids(labs, coords, tuple(direction), extras)
    if ref_affine is None:
        raise DataError("centroid JSON has no direction element (VerSe 2019 format); "
                        "pass the image it belongs to", source)
    return Centroids(labs, coords / geometry.spacing(ref_affine), geometry.axcodes(ref_affine), extras)


_VALID_CODE_SETS = [sorted([a, b, c]) for a in "LR" for b in "AP" for c in "IS"]


def read_centroids(path, ref_affine: np.ndarray | None = None) -> Centroids:
    """Read a VerSe centroid JSON file (``-`` for stdin)."""
    from .io import read_json

    return parse_centroids(read_json(path), source=str(path), ref_affine=ref_affine)


def write_centroids(ctd: Centroids, path) -> None:
    """Write VerSe 2020 centroid JSON atomically (``-`` for stdout)."""
    from .io import write_json

    write_json(ctd.to_json(), path)


# --------------------------------------------------------------------------- from masks
def _label_boxes(mask: np.ndarray):
    from scipy import ndimage

    present = [int(v) for v in np.unique(mask) if v != 0]
    slices = ndimage.find_objects(mask.astype(np.int32, copy=False), max_label=max(present, default=0))
    return {lab: slices[lab - 1] for lab in present if slices[lab - 1] is not None}


def mass_centroids(mask: np.ndarray, affine: np.ndarray) -> Centroids:
    """Whole-vertebra centres of mass, in voxel coordinates."""
    from scipy import ndimage

    present = [int(v) for v in np.unique(mask) if v != 0]
    coms = ndimage.center_of_mass(np.ones(mask.shape, dtype=np.uint8), mask, present) if present else []
    return Centroids(present, np.array(coms).reshape(-1, 3), geometry.axcodes(affine))


def body_centroids(mask: np.ndarray, affine: np.ndarray, labels: Iterable[int] | None = None) -> Centroids:
    """Vertebral-body centroids (the VerSe convention), in voxel coordinates.

    Method, per vertebra, in a crop around its label and in millimetres:

    1. A morphological opening with a ball removes the thin posterior elements
       (pedicles, laminae, processes: 5-10 mm thick) and keeps the thick body
       (15-50 mm in every direction). The ball radius adapts to the vertebra: a fixed
       fraction of its largest inscribed radius, so small cervical bodies survive.
       The opening is computed with two Euclidean distance transforms on the
       anisotropic grid, so it is the same in every orientation and tilt.
    2. The opened part is split into components; the body is the component whose
       centre lies farthest *anterior along the vertebra's own frame*: the frame's
       anterior axis points from the vertebra's centre of mass away from the spinal
       canal, found as the direction of the larger mass of the opened part
       relative to the centre of mass. In practice the body is also the largest part.
    3. The centroid is the centre of mass of that component.

    For C1 (no body) the centre of its anterior arch region is returned the same way.
    """
    from scipy import ndimage

    sp = geometry.spacing(affine)
    boxes = _label_boxes(mask)
    wanted = set(boxes) if labels is None else set(int(x) for x in labels) & set(boxes)
    out_labels, out_coords = [], []
    for lab in L.sort_anatomical(wanted):
        sl = boxes[lab]
        pad = [slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(sl, mask.shape)]
        crop = mask[tuple(pad)] == lab
        offset = np.array([p.start for p in pad], dtype=np.float64)
        centre = _body_centre(crop, sp, ndimage)
        out_labels.append(lab)
        out_coords.append(centre + offset)
    return Centroids(out_labels, np.array(out_coords).reshape(-1, 3), geometry.axcodes(affine))


def _body_centre(crop: np.ndarray, sp: np.ndarray, ndimage) -> np.ndarray:
    com = np.array(ndimage.center_of_mass(crop))
    inside = ndimage.distance_transform_edt(crop, sampling=sp)
    r_max = float(inside.max())
    if r_max <= 2 * sp.min():
        return com
    radius = 0.6 * r_max
    core = inside >= radius
    opened = crop & (ndimage.distance_transform_edt(~core, sampling=sp) <= radius)
    comps, n = ndimage.label(opened)
    if n == 0:
        return com
    sizes = np.bincount(comps.ravel())[1:]
    best = int(np.argmax(sizes)) + 1
    return np.array(ndimage.center_of_mass(comps == best))


def centroids_from_mask(mask: np.ndarray, affine: np.ndarray, whole: bool = False) -> Centroids:
    """Body centroids, or whole-vertebra centres of mass with ``whole=True``."""
    return mass_centroids(mask, affine) if whole else body_centroids(mask, affine)


# --------------------------------------------------------------------------- markers
def marker_mask(ctd: Centroids, shape, affine, radius_mm: float = 3.0) -> np.ndarray:
    """A label image with a small ball of each centroid's label, for ITK-SNAP editing."""
    ctd.check_matches(affine)
    sp = geometry.spacing(affine)
    out = np.zeros(tuple(shape[:3]), dtype=np.uint8)
    half = np.ceil(radius_mm / sp).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    for lab, c in zip(ctd.labels, ctd.coords):
        centre = np.rint(c).astype(int)
        pts = [g + ci for g, ci in zip(grids, centre)]
        d2 = sum(((p - ci) * s) ** 2 for p, ci, s in zip(pts, c, sp))
        keep = d2 <= radius_mm ** 2
        for p, n in zip(pts, shape):
            keep &= (p >= 0) & (p < n)
        if not keep.any():  # centroid outside the image: mark the nearest voxel
            idx = tuple(np.clip(centre, 0, np.asarray(shape[:3]) - 1))
            out[idx] = lab
            continue
        out[tuple(p[keep] for p in pts)] = lab
    return out


def centroids_from_markers(markers: np.ndarray, affine: np.ndarray) -> Centroids:
    """Read centroids back from a marker mask: each label's centre of mass."""
    return mass_centroids(markers, affine)
