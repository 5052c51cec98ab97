"""QC pictures in the style of VerSe's ``_seg-vert_snp.png``.

Four panels: a sagittal and a coronal mid-slice through the spine, and a sagittal
and a coronal maximum-intensity projection (MIP), all in a bone window, with the
vertebra mask overlaid in :data:`~verse_cli.core.labels.VERSE_COLOURS` and the
centroids marked with their names.

Every image is first resampled onto a *world-aligned*, isotropic display grid
(RAS+ axes, one spacing), so any voxel orientation, anisotropic spacing or gantry
tilt is drawn the way the anatomy lies in the scanner: superior up, anterior to the
left in sagittal views, the patient's right on the viewer's left in coronal views
(radiological convention).

Examples
--------
>>> from verse_cli.snapshot import snapshot_figure, write_snapshot
>>> fig = snapshot_figure(ct_img, mask_img, ctd)      # doctest: +SKIP
>>> write_snapshot("sub-X_ct.nii.gz", "sub-X_seg-vert_msk.nii.gz", None, "qc.png")  # doctest: +SKIP
"""

from __future__ import annotations

import io as _io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .core import geometry
from .core import labels as L
from .core.centroids import Centroids, read_centroids
from .core.errors import UsageError

#: Bone window (HU) of the grey-scale panels.
BONE_WINDOW = (-300.0, 1300.0)
#: Largest display grid, in voxels; coarser spacing beyond it keeps memory and time bounded.
MAX_DISPLAY_VOXELS = 24_000_000
#: Finest display spacing in mm.
MIN_DISPLAY_SPACING = 0.5
#: Extra thickness (mm) around the spine of the slab a MIP projects through.
SLAB_MARGIN_MM = 8.0
#: Room (mm) left beside the spine when a panel's width is cropped to it.
CROP_MARGIN_MM = 70.0
AIR_HU = -1024.0
#: Widest figure, in inches at 100 dpi.
MAX_WIDTH_IN = 20.0
OVERLAY_ALPHA = 0.45


@dataclass
class DisplayGrid:
    """A world-aligned RAS+ grid: ``volume[x, y, z]`` with isotropic ``spacing``."""

    origin: np.ndarray  # world mm of voxel (0, 0, 0)
    spacing: float
    shape: tuple[int, int, int]

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([self.spacing, self.spacing, self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous grid indices of world points ``(N, 3)``."""
        return (np.asarray(xyz, dtype=np.float64).reshape(-1, 3) - self.origin) / self.spacing


def display_grid(shape, affine, max_voxels: int = MAX_DISPLAY_VOXELS) -> DisplayGrid:
    """The world-aligned isotropic grid that covers the whole image ``(shape, affine)``.

    Its spacing is the image's finest voxel size (not below :data:`MIN_DISPLAY_SPACING`),
    made coarser only when the grid would exceed ``max_voxels``.
    """
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = geometry.vox2world(affine, corners)
    low, high = world.min(axis=0), world.max(axis=0)
    extent = high - low
    step = max(float(geometry.spacing(affine).min()), MIN_DISPLAY_SPACING)
    step = max(step, float(np.cbrt(np.prod(extent) / max_voxels)))
    dims = tuple(int(max(1, np.ceil(e / step))) for e in extent)
    return DisplayGrid(origin=low + step / 2, spacing=step, shape=dims)  # type: ignore[arg-type]


def _to_display(data: np.ndarray, affine: np.ndarray, grid: DisplayGrid, is_mask: bool) -> np.ndarray:
    return geometry.resample_to_grid(data, affine, grid.shape, grid.affine, order=0 if is_mask else 1,
                                     cval=0 if is_mask else AIR_HU, is_mask=is_mask)


def centroids_world(ctd: Centroids, shape, affine) -> np.ndarray:
    """World mm of centroids given in voxel coordinates of the image, in any orientation of it.

    VerSe files often store centroids for a reoriented copy of the image (``direction``
    differs from the image's axis codes); the points are then mapped through that
    reorientation, which is exact.
    """
    import nibabel.orientations as nio

    if tuple(ctd.axcodes) == geometry.axcodes(affine):
        return geometry.vox2world(affine, ctd.coords)
    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(ctd.axcodes)))
    reoriented_affine = np.asarray(affine) @ nio.inv_ornt_aff(ornt, tuple(shape[:3]))
    return geometry.vox2world(reoriented_affine, ctd.coords)


# --------------------------------------------------------------------------- views
@dataclass
class View:
    """One panel: a grey image, an optional label image, and 2D marker positions."""

    title: str
    grey: np.ndarray  # (rows, cols) HU, row 0 superior
    labels: np.ndarray | None
    points: np.ndarray  # (N, 2) as (col, row)


def _panel(plane: np.ndarray) -> np.ndarray:
    """(a, z) plane -> (rows, cols) with superior at row 0 and ``a`` reversed along columns.

    Reversing ``a`` puts anterior (sagittal, a = y) and the patient's right (coronal,
    a = x) on the viewer's left.
    """
    return plane[::-1, ::-1].T


def _first_label(mask: np.ndarray, axis: int, from_high: bool = False) -> np.ndarray:
    """The label seen first along ``axis`` (a surface view of the mask), 0 where none.

    ``from_high`` looks from the high-index end (e.g. from anterior along y).
    """
    if from_high:
        mask = np.flip(mask, axis=axis)
    hit = mask > 0
    first = np.argmax(hit, axis=axis)
    seen = np.take_along_axis(mask, np.expand_dims(first, axis), axis=axis).squeeze(axis)
    return np.where(hit.any(axis=axis), seen, 0)


def _spine_centre(grid: DisplayGrid, mask: np.ndarray | None, pts: np.ndarray) -> np.ndarray:
    """Grid index the mid-slices pass through.

    Body centroids put the coronal slice through the vertebral bodies; without them
    the mask's median is used, else the middle of the image.
    """
    if len(pts):
        return np.median(pts, axis=0)
    if mask is not None and mask.any():
        return np.array([np.median(ix) for ix in np.nonzero(mask)])
    return (np.asarray(grid.shape) - 1) / 2


def _slab(axis: int, grid: DisplayGrid, mask: np.ndarray | None, pts: np.ndarray) -> slice:
    """Index range along ``axis`` a MIP projects through: the spine plus a margin."""
    margin = SLAB_MARGIN_MM / grid.spacing
    if mask is not None and mask.any():
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = occupied[0] - margin, occupied[-1] + margin
    elif len(pts):
        lo, hi = pts[:, axis].min() - 30 / grid.spacing, pts[:, axis].max() + 30 / grid.spacing
    else:
        return slice(None)
    return slice(int(max(0, np.floor(lo))), int(min(grid.shape[axis], np.ceil(hi) + 1)))


def _width_range(axis: int, grid: DisplayGrid, mask: np.ndarray | None, pts: np.ndarray) -> slice:
    """Index range along a panel's horizontal ``axis``: the spine plus :data:`CROP_MARGIN_MM`.

    Only the width is cropped; the full head-foot extent stays, so vertebrae the mask
    or the centroids miss above or below remain in view.
    """
    lows, highs = [], []
    if mask is not None and mask.any():
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lows.append(occupied[0])
        highs.append(occupied[-1])
    if len(pts):
        lows.append(pts[:, axis].min())
        highs.append(pts[:, axis].max())
    if not lows:
        return slice(0, grid.shape[axis])
    margin = CROP_MARGIN_MM / grid.spacing
    lo = int(max(0, np.floor(min(lows) - margin)))
    hi = int(min(grid.shape[axis], np.ceil(max(highs) + margin) + 1))
    return slice(lo, hi)


def build_views(ct: np.ndarray, mask: np.ndarray | None, pts: np.ndarray, grid: DisplayGrid) -> list[View]:
    """Sagittal and coronal mid-slices and MIPs on the display grid."""
    centre = np.clip(np.round(_spine_centre(grid, mask, pts)).astype(int), 0, np.asarray(grid.shape) - 1)
    views = []
    for axis, plane_name in ((0, "sagittal"), (1, "coronal")):
        other = 1 - axis  # the in-plane horizontal axis (y for sagittal, x for coronal)
        width = _width_range(other, grid, mask, pts)
        n_other = width.stop - width.start
        # marker positions: (col, row) after _panel's flips
        cols = (n_other - 1) - (pts[:, other] - width.start) if len(pts) else np.zeros(0)
        rows = (grid.shape[2] - 1) - pts[:, 2] if len(pts) else np.zeros(0)
        markers = np.stack([cols, rows], axis=1) if len(pts) else np.zeros((0, 2))

        index = [slice(None)] * 3
        index[axis] = centre[axis]
        index[other] = width
        grey = ct[tuple(index)]
        lab = mask[tuple(index)] if mask is not None else None
        views.append(View(f"{plane_name} slice", _panel(grey), None if lab is None else _panel(lab), markers))

        slab = [slice(None)] * 3
        slab[axis] = _slab(axis, grid, mask, pts)
        slab[other] = width
        mip = ct[tuple(slab)].max(axis=axis)
        # seen from the patient's left (sagittal) and from the front (coronal)
        lab = _first_label(mask[tuple(slab)], axis, from_high=axis == 1) if mask is not None else None
        views.append(View(f"{plane_name} MIP", _panel(mip), None if lab is None else _panel(lab), markers))
    return [views[0], views[1], views[2], views[3]]


# --------------------------------------------------------------------------- drawing
def _overlay_rgba(lab: np.ndarray) -> np.ndarray:
    lut = np.zeros((max(int(lab.max()), max(L.VERSE_COLOURS)) + 1, 4), dtype=np.float32)
    for label, (r, g, b) in L.VERSE_COLOURS.items():
        lut[label] = (r / 255, g / 255, b / 255, OVERLAY_ALPHA)
    return lut[lab]


def snapshot_figure(ct_img, mask_img=None, ctd: Centroids | None = None, title: str | None = None,
                    height_in: float = 6.0):
    """A matplotlib Figure with the four QC panels.

    Parameters
    ----------
    ct_img : nibabel image
        CT in HU (any orientation, spacing, tilt).
    mask_img : nibabel image, optional
        Vertebra mask with VerSe ids; resampled by its own affine, so it may sit on another grid.
    ctd : Centroids, optional
        Centroids in voxel coordinates of ``ct_img`` (or of a reorientation of it).
    title : str, optional
        Figure title (e.g. the subject).
    height_in : float
        Figure height in inches (at 100 dpi).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import patheffects
    from matplotlib.figure import Figure

    ct = np.asarray(ct_img.dataobj, dtype=np.float32)
    grid = display_grid(ct.shape, ct_img.affine)
    vol = _to_display(ct, ct_img.affine, grid, is_mask=False)
    lab = None
    if mask_img is not None:
        lab = _to_display(np.asarray(mask_img.dataobj), mask_img.affine, grid, is_mask=True)
    pts = np.zeros((0, 3))
    names: list[str] = []
    colours: list[tuple[float, float, float]] = []
    if ctd is not None and len(ctd):
        pts = grid.to_index(centroids_world(ctd, ct.shape, ct_img.affine))
        names = [L.name(x) for x in ctd.labels]
        colours = [tuple(c / 255 for c in L.VERSE_COLOURS[x]) for x in ctd.labels]

    views = build_views(vol, lab, pts, grid)
    widths = [v.grey.shape[1] for v in views]
    rows = views[0].grey.shape[0]
    # panels keep their aspect; a wide, short field of view gets a lower figure, not a wider one
    panel_h = min(height_in, MAX_WIDTH_IN * rows / sum(widths))
    fig_w = max(panel_h * sum(widths) / rows * 1.03, 4.0)
    fig = Figure(figsize=(fig_w, panel_h + (0.5 if title else 0.3)), dpi=100)
    fig.patch.set_facecolor("black")
    top = 1 - (0.5 if title else 0.3) / (panel_h + (0.5 if title else 0.3))
    gs = fig.add_gridspec(1, 4, width_ratios=widths, left=0.005, right=0.995, bottom=0.005, top=top, wspace=0.02)
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for i, view in enumerate(views):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(view.grey, cmap="gray", vmin=BONE_WINDOW[0], vmax=BONE_WINDOW[1], interpolation="bilinear")
        if view.labels is not None and view.labels.any():
            ax.imshow(_overlay_rgba(view.labels), interpolation="nearest")
        for (x, y), text, colour in zip(view.points, names, colours):
            ax.plot(x, y, "o", ms=5, mfc=colour, mec="white", mew=0.8)
            ax.text(x + 6, y, text, color=colour, fontsize=8, va="center", path_effects=outline)
        ax.set_title(view.title, color="white", fontsize=9, pad=2)
        ax.set_xlim(-0.5, view.grey.shape[1] - 0.5)
        ax.set_ylim(view.grey.shape[0] - 0.5, -0.5)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, color="white", fontsize=10, y=1 - 0.08 / (panel_h + 0.5))
    return fig


def figure_png(fig) -> bytes:
    """PNG bytes of a figure, with no time stamp or version in the metadata (reproducible)."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor(), metadata={"Software": None})
    return buf.getvalue()


def _subject_title(ct_path: Path) -> str:
    """``sub-X`` for VerSe/BIDS names (``sub-X_desc-defaced_ct.nii.gz``), else the file's stem."""
    import re

    name = ct_path.name
    match = re.match(r"(sub-[A-Za-z0-9]+)_", name)
    if match:
        return match.group(1)
    for suffix in (".nii.gz", ".nii"):
        name = name.removesuffix(suffix)
    return name


def write_snapshot(ct: str | os.PathLike, mask: str | os.PathLike | None, ctd: str | os.PathLike | None,
                   output: str | os.PathLike, title: str | None = None) -> Path:
    """Read the files, draw the QC picture and write it atomically as PNG; returns ``output``."""
    from .core.io import load_ct, load_mask, write_bytes_atomic

    output = Path(output)
    if output.suffix.lower() != ".png":
        raise UsageError(f"output must end in .png: {output}")
    ct_img = load_ct(ct)
    mask_img = load_mask(mask, allowed_labels=set(L.VERSE_IDS)) if mask is not None else None
    centroids = read_centroids(ctd, ref_affine=ct_img.affine) if ctd is not None else None
    fig = snapshot_figure(ct_img, mask_img, centroids, title=title or _subject_title(Path(ct)))
    write_bytes_atomic(output, figure_png(fig))
    return output
