"""``verse label``: vertebral-body centroids with anatomical labels.

Pipeline
--------
1. **Crop** the CT to the spine box from ``verse detect`` and resample it onto a
   world-aligned grid of :data:`SPACING` mm whose axes point to R, A and I
   (:func:`spine_grid`), so any orientation or oblique affine gives the same picture.
2. **Project**: a sagittal MIP (over a left-right slab around the spine) and a coronal
   MIP (over an anterior-posterior slab), each with a mean projection as a second
   channel (:func:`projections`).
3. **Heatmaps** from the Btrfly Net (:mod:`verse_cli.nets.btrfly`): "any vertebra",
   "rib-bearing", and one channel per label, in both views.
4. **Candidates**: peaks of the sagittal "any" heatmap, paired with the coronal one
   on the same rows, give 3D points with sub-pixel accuracy; at each point the label
   channels, the rib channel and the sacrum channel give evidence (:func:`candidates`).
5. **Labels**: the anatomical prior (:mod:`verse_cli.prior`) picks the globally best
   chain; user corrections (``fix``) are hard constraints there. Ribs found on the CT
   (:func:`ct_rib_evidence`) and, where the sacrum is too faint to be a candidate, its
   level from the S1 channel (:func:`label_with_sacrum_peak`) anchor the numbering. The
   discs on the CT decide where the net calls a mobile vertebra the sacrum (a body with a
   disc above and below it is not the sacrum: :func:`ct_sacrum_disc`).
6. **Refine** each centroid on the CT: the centre of the dense bone around it
   (:func:`refine_on_ct`), and write VerSe 2020 JSON on the input voxel grid with a
   ``confidence`` per vertebra.
7. **Upright**: the net was trained on scans tilted by up to 15 degrees. Where the
   labelled spine leans more (a flexed neck, a steep cervicothoracic junction), steps
   1-6 run again on a world frame turned so that the spine stands upright
   (:func:`upright_turn`); the centroids come back on the input voxel grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel import affines as nib_affines

from . import prior as P
from .core import geometry
from .core.centroids import Centroids
from .core.errors import DataError
from .core.progress import debug, info

SPACING = 1.5  # mm, the grid of the projections
WIDTH = 128  # pixels across (left-right and anterior-posterior): 192 mm
MARGIN_MM = 15.0  # added above and below the box
MIN_HALF_SLAB_MM = 30.0
SLAB_MARGIN_MM = 10.0
HU_LOW, HU_HIGH = -200.0, 1300.0
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "label.pt"


# --------------------------------------------------------------------------- the box
def parse_bbox(obj: Any, source=None) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) min and max corners from a ``verse detect`` bounding-box JSON.

    Accepts ``{"world_min": [...], "world_max": [...]}`` (also ``ras_``/``_mm``
    spellings), ``{"world": {"min": ..., "max": ...}}`` and a list of corner points
    under ``"corners"``/``"world_corners"``/``"corners_ras"``.
    """
    if not isinstance(obj, dict):
        raise DataError("bounding-box JSON must be an object", source)
    pts = None
    for lo, hi in (("world_min", "world_max"), ("ras_min", "ras_max"), ("min_mm", "max_mm"),
                   ("min_ras", "max_ras"), ("world_min_mm", "world_max_mm"), ("ras_min_mm", "ras_max_mm")):
        if lo in obj and hi in obj:
            pts = [obj[lo], obj[hi]]
            break
    if pts is None:
        for key in ("world", "ras", "world_mm", "box_world", "bbox_world"):
            val = obj.get(key)
            if isinstance(val, dict) and "min" in val and "max" in val:
                pts = [val["min"], val["max"]]
                break
            if isinstance(val, list) and len(val) >= 2:
                pts = val
                break
    if pts is None:
        for key in ("corners", "world_corners", "corners_ras", "corners_world", "ras_corners", "corners_ras_mm"):
            if isinstance(obj.get(key), list):
                pts = obj[key]
                break
    if pts is None:
        raise DataError("no world (RAS mm) corners in the bounding-box JSON", source)
    try:
        arr = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError):
        raise DataError("bounding-box corners must be lists of three numbers", source) from None
    if len(arr) < 2 or not np.all(np.isfinite(arr)):
        raise DataError("bounding-box corners must be finite 3D points", source)
    lo, hi = arr.min(axis=0), arr.max(axis=0)
    if np.any(hi - lo < 1.0):
        raise DataError("the bounding box is empty", source)
    return lo, hi


def box_spine_axis(obj: dict, source=None) -> np.ndarray | None:
    """The spine's direction that ``verse detect`` writes with its box (``spine_axis_ras``),
    or None where the box has none (an older or hand-made box)."""
    val = obj.get("spine_axis_ras")
    if val is None:
        return None
    try:
        axis = np.asarray(val, dtype=np.float64).reshape(3)
    except (TypeError, ValueError):
        raise DataError("spine_axis_ras must be three numbers", source) from None
    norm = float(np.linalg.norm(axis))
    if not np.isfinite(norm) or norm < 1e-6:
        raise DataError("spine_axis_ras must be a finite, non-zero direction", source)
    return axis / norm


def read_bbox(path, ct_shape, ct_affine, with_axis: bool = False):
    """Read a box and check that it overlaps the CT (a box for another image does not).

    Returns ``(lo, hi)``, and with ``with_axis`` also :func:`box_spine_axis`.
    """
    from .core.io import read_json

    obj = read_json(path)
    lo, hi = parse_bbox(obj, source=path)
    axis = box_spine_axis(obj, source=path)
    clo, chi = ct_world_box(ct_shape, ct_affine)
    overlap = np.minimum(hi, chi) - np.maximum(lo, clo)
    if np.any(overlap <= 0):
        raise DataError(
            f"the box ({_fmt(lo)} .. {_fmt(hi)} mm) lies outside the CT ({_fmt(clo)} .. {_fmt(chi)} mm): "
            "is it for another image?", path)
    return (lo, hi, axis) if with_axis else (lo, hi)


def _fmt(v) -> str:
    return "[" + ", ".join(f"{x:.0f}" for x in v) + "]"


def ct_world_box(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    xyz = geometry.vox2world(affine, corners)
    return xyz.min(axis=0), xyz.max(axis=0)


def box_of_mask(mask: np.ndarray, affine) -> tuple[np.ndarray, np.ndarray]:
    """World box of the non-zero voxels (what a perfect detector would return)."""
    idx = np.argwhere(mask > 0)
    lo, hi = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    xyz = geometry.vox2world(affine, corners)
    return xyz.min(axis=0), xyz.max(axis=0)


# --------------------------------------------------------------------------- grid and projections
@dataclass
class SpineView:
    """The two projections of one spine box and the grid they come from.

    ``sag`` and ``cor`` are ``(C, H, W)`` float32 images (MIP and mean projection,
    scaled to about [0, 1], and with :data:`PREPROC` 2 the scanned fraction of each
    ray); rows run head to foot. ``affine`` maps grid voxels
    ``(r, a, i)`` to world mm; sagittal pixel ``(row, col)`` is grid ``(*, col, row)``
    and coronal pixel ``(row, col)`` is grid ``(col, *, row)``.
    """

    sag: np.ndarray
    cor: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int, int]


def spine_grid(lo, hi, multiple: int = 32, spacing: float = SPACING, width: int = WIDTH
               ) -> tuple[tuple[int, int, int], np.ndarray]:
    """A world-aligned grid (axes R, A, I) of ``spacing`` mm around a box.

    Left-right and anterior-posterior: ``width`` pixels centred on the box;
    superior-inferior: the box plus :data:`MARGIN_MM`, rounded up to ``multiple``.
    """
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    centre = (lo + hi) / 2
    height = (hi[2] - lo[2]) + 2 * MARGIN_MM
    n_i = int(np.ceil(height / spacing / multiple) * multiple)
    affine = np.diag([spacing, spacing, -spacing, 1.0])
    affine[0, 3] = centre[0] - spacing * (width - 1) / 2
    affine[1, 3] = centre[1] - spacing * (width - 1) / 2
    affine[2, 3] = centre[2] + spacing * (n_i - 1) / 2
    return (width, width, n_i), affine


def slab_masks(lo, hi, affine, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Which grid columns the sagittal (R) and coronal (A) projections take, from the box."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    centre = (lo + hi) / 2
    half = np.maximum((hi - lo) / 2 + SLAB_MARGIN_MM, MIN_HALF_SLAB_MM)
    r = affine[0, 3] + affine[0, 0] * np.arange(width)
    a = affine[1, 3] + affine[1, 1] * np.arange(width)
    return np.abs(r - centre[0]) <= half[0], np.abs(a - centre[1]) <= half[1]


#: Input preprocessing versions. 1: two channels (MIP, mean) with voxels outside the scan
#: counted as air (the first bundles). 2: outside-scan voxels are *unknown*: MIP and mean
#: over the scanned voxels of each ray only, a third channel with the scanned fraction of
#: the ray, a light 3D smoothing against noise and HU that survive a missing rescale offset.
PREPROC = 2
FILL = (0.0 - HU_LOW) / (HU_HIGH - HU_LOW)  # water: what a ray with no scanned voxel shows
INVALID_HU = -1200.0  # below air: padding outside the reconstruction circle, or outside the array
SMOOTH_SIGMA_PX = 0.7  # 3D Gaussian before projecting (grid pixels): a MIP picks the noise maxima


def in_channels(preproc: int) -> int:
    return 2 if preproc == 1 else 3


def fix_hu_offset(vol: np.ndarray, valid: np.ndarray | None = None) -> float:
    """The shift to add to ``vol`` so that it is in HU.

    A CT stored without its rescale intercept (0 = -1024 HU) has a median near
    1000 around the spine; a real CT crop around the spine (soft tissue, fat, bone
    and some air) never has a median above 500 HU.
    """
    sample = vol[valid] if valid is not None else vol.ravel()
    sample = sample[:: max(1, sample.size // 200_000)]
    if sample.size and float(np.median(sample)) > 500.0:
        return -1024.0
    return 0.0


@dataclass
class GridVolume:
    """The spine box resampled onto the spine grid (axes R, A, I): HU after the offset
    fix and smoothing (water where not scanned), and which voxels were scanned."""

    hu: np.ndarray
    valid: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int, int]


def grid_volume(ct: np.ndarray, ct_affine: np.ndarray, lo, hi, spacing: float = SPACING,
                width: int = WIDTH) -> GridVolume:
    """Resample the box onto the spine grid, with outside-scan voxels marked (preproc 2)."""
    return finish_grid_volume(*resample_box(ct, ct_affine, lo, hi, spacing, width))


def resample_box(ct: np.ndarray, ct_affine: np.ndarray, lo, hi, spacing: float = SPACING, width: int = WIDTH):
    """``(volume, shape, affine)``: the box on the spine grid in HU, NaN outside the scan.

    The one resampling every input version starts from.
    """
    shape, affine = spine_grid(lo, hi, spacing=spacing, width=width)
    return geometry.resample_to_grid(ct, ct_affine, shape, affine, order=1, cval=np.nan), shape, affine


def finish_grid_volume(vol: np.ndarray, shape, affine: np.ndarray) -> GridVolume:
    """:class:`GridVolume` from :func:`resample_box` output (modifies ``vol`` in place)."""
    from scipy import ndimage

    valid = np.isfinite(vol)
    vol += fix_hu_offset(vol, valid)
    valid &= vol > INVALID_HU  # NaN compares False
    vol[~valid] = 0.0  # water while smoothing, so the edge of the scan is no bright or dark rim
    if SMOOTH_SIGMA_PX > 0:
        ndimage.gaussian_filter(vol, SMOOTH_SIGMA_PX, output=vol, truncate=2.0)
    return GridVolume(vol, valid, affine, shape)


def project(gv: GridVolume, lo, hi) -> SpineView:
    """The preproc-2 projections of a :class:`GridVolume` (MIP, mean, scanned fraction)."""
    keep_r, keep_a = slab_masks(lo, hi, gv.affine, gv.shape[0])
    vol = np.clip(gv.hu, HU_LOW, HU_HIGH)
    vol -= HU_LOW
    vol /= HU_HIGH - HU_LOW
    valid = gv.valid
    low = np.float32(-1.0)
    out = []
    for axis, keep in ((0, keep_r), (1, keep_a)):
        v = np.compress(keep, vol, axis=axis)
        m = np.compress(keep, valid, axis=axis)
        n = m.sum(axis=axis)
        mip = np.where(m, v, low).max(axis=axis)
        mean = np.where(m, v, 0.0).sum(axis=axis) / np.maximum(n, 1)
        seen = n > 0
        mip = np.where(seen, mip, FILL)
        mean = np.where(seen, mean, FILL)
        frac = n / max(int(keep.sum()), 1)
        out.append(np.stack([mip, mean, frac]).transpose(0, 2, 1).astype(np.float32))  # (3, I, A|R)
    return SpineView(np.ascontiguousarray(out[0]), np.ascontiguousarray(out[1]), gv.affine, gv.shape)


def projections(ct: np.ndarray, ct_affine: np.ndarray, lo, hi, spacing: float = SPACING,
                width: int = WIDTH, preproc: int = PREPROC) -> SpineView:
    """Resample the box onto the spine grid and project it both ways (see :data:`PREPROC`)."""
    if preproc != 1:
        return project(grid_volume(ct, ct_affine, lo, hi, spacing, width), lo, hi)
    return project_v1(*resample_box(ct, ct_affine, lo, hi, spacing, width), lo, hi)


def project_v1(resampled: np.ndarray, shape, affine: np.ndarray, lo, hi) -> SpineView:
    """The preproc-1 projections (MIP, mean; outside the scan = air) of :func:`resample_box` output."""
    keep_r, keep_a = slab_masks(lo, hi, affine, shape[0])
    vol = np.where(np.isnan(resampled), np.float32(-1024.0), resampled)
    np.clip(vol, HU_LOW, HU_HIGH, out=vol)
    vol -= HU_LOW
    vol /= HU_HIGH - HU_LOW
    sag_slab, cor_slab = vol[keep_r], vol[:, keep_a]
    sag = np.stack([sag_slab.max(axis=0), sag_slab.mean(axis=0)]).transpose(0, 2, 1)  # (2, I, A)
    cor = np.stack([cor_slab.max(axis=1), cor_slab.mean(axis=1)]).transpose(0, 2, 1)  # (2, I, R)
    return SpineView(np.ascontiguousarray(sag, np.float32), np.ascontiguousarray(cor, np.float32), affine, shape)


def crop_to_grid(ct: np.ndarray, affine: np.ndarray, lo, hi, spacing: float = SPACING, width: int = WIDTH,
                 margin_mm: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """The part of the CT under the spine grid (plus ``margin_mm``) as float32, and its affine.

    A 512 x 512 x 400 scan is mostly outside the spine box: converting and checking only
    this part keeps the stage fast. Raises DataError on non-finite values in it.
    """
    shape, grid_affine = spine_grid(lo, hi, spacing=spacing, width=width)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    vox = geometry.world2vox(affine, geometry.vox2world(grid_affine, corners))
    pad = margin_mm / geometry.spacing(affine)
    start = np.clip(np.floor(vox.min(axis=0) - pad), 0, np.asarray(ct.shape) - 1).astype(int)
    stop = np.clip(np.ceil(vox.max(axis=0) + pad) + 1, start + 1, np.asarray(ct.shape)).astype(int)
    sub = np.asarray(ct[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]], dtype=np.float32)
    if not np.all(np.isfinite(sub)):
        raise DataError("the CT contains NaN or infinite values")
    new_affine = np.array(affine, dtype=np.float64)
    new_affine[:3, 3] = geometry.vox2world(affine, start.astype(float))
    return sub, new_affine


# --------------------------------------------------------------------------- the network
# On a CPU the net runs in numpy (:class:`NumpyBtrfly`): importing torch takes longer than the
# whole labelling of a 512 x 512 x 400 scan. torch is used on a GPU (``device="cuda"``) and
# to train.
_TORCH_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                 "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                 "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def read_bundle_numpy(path) -> tuple[str, dict, dict, dict]:
    """Read a model bundle (a ``torch.save`` zip) without torch: tensors become numpy arrays.

    Only plain containers, numbers, strings and tensors are accepted (what
    :func:`verse_cli.nets.train.save_bundle` writes); anything else is refused, like
    ``torch.load(weights_only=True)`` does.
    """
    import collections
    import pickle
    import zipfile

    from .nets.train import BUNDLE_FORMAT

    path = Path(path)
    if not path.is_file():
        raise DataError("no such model file", path)
    try:
        zf = zipfile.ZipFile(path)
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
    except (zipfile.BadZipFile, StopIteration, OSError):
        raise DataError("not a readable model bundle (not a torch zip file)", path) from None
    prefix = pkl[: -len("data.pkl")]
    if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() != b"little":
        raise DataError("model bundle written on a big-endian machine", path)

    def rebuild(storage, offset, size, stride, *_args):
        arr = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                              strides=tuple(st * storage.itemsize for st in stride))
        return np.array(arr)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return rebuild
            if module == "torch" and name in _TORCH_DTYPES:
                return name
            if module == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model bundle")

        def persistent_load(self, pid):
            _, storage_type, key, _location, numel = pid
            return np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=_TORCH_DTYPES[storage_type], count=numel)

    try:
        import io

        payload = Unpickler(io.BytesIO(zf.read(pkl))).load()
    except Exception as exc:  # noqa: BLE001 - a foreign or truncated file
        raise DataError(f"not a readable model bundle ({str(exc).splitlines()[0][:120]})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise DataError(f"not a verse-cli model bundle (expected format {BUNDLE_FORMAT})", path)
    return payload["arch"], payload["config"], payload["state_dict"], payload["meta"]


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, relu: bool = True) -> np.ndarray:
    """3x3 (padding 1) or 1x1 convolution of ``x`` (C, H, W) by ``w`` (O, C, k, k), plus bias."""
    O, C, k, _ = w.shape
    if k == 1:
        out = (w.reshape(O, C) @ x.reshape(C, -1)).reshape(O, x.shape[1], x.shape[2])
    else:
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        H = (x.shape[1] - 1) // stride + 1
        W = (x.shape[2] - 1) // stride + 1
        s0, s1, s2 = xp.strides
        cols = np.lib.stride_tricks.as_strided(xp, shape=(C, 3, 3, H, W),
                                               strides=(s0, s1, s2, s1 * stride, s2 * stride))
        out = (w.reshape(O, C * 9) @ cols.reshape(C * 9, H * W)).reshape(O, H, W)
    out += b[:, None, None]
    if relu:
        np.maximum(out, 0, out=out)
    return out


def _nearest(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """``F.interpolate(mode="nearest")`` to (h, w)."""
    ri = np.minimum(np.floor(np.arange(h) * (x.shape[1] / h)).astype(int), x.shape[1] - 1)
    ci = np.minimum(np.floor(np.arange(w) * (x.shape[2] / w)).astype(int), x.shape[2] - 1)
    return x[:, ri][:, :, ci]


class NumpyBtrfly:
    """The Btrfly Net's forward pass (eval mode) in numpy, batch norm folded into the convolutions."""

    def __init__(self, config: dict, state: dict):
        cfg = btrfly_config(config)
        self.config = cfg
        self.spacing, self.width, self.preproc = float(cfg["spacing"]), int(cfg["width"]), int(cfg["preproc"])
        self.n_stages, self.n_blocks = len(cfg["widths"]), len(cfg["decoder"])
        st = {k: np.asarray(v, dtype=np.float32) if v.dtype.kind == "f" else v for k, v in state.items()}
        self.p: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key in {k.rsplit(".", 2)[0] for k in st if k.endswith(".1.running_var")}:
            w = st[f"{key}.0.weight"]
            scale = st[f"{key}.1.weight"] / np.sqrt(st[f"{key}.1.running_var"] + 1e-5)
            self.p[key] = (np.ascontiguousarray(w * scale[:, None, None, None]),
                           (st[f"{key}.1.bias"] - st[f"{key}.1.running_mean"] * scale).astype(np.float32))
        for head in ("sag_head", "cor_head"):
            self.p[head] = (st[f"{head}.weight"], st[f"{head}.bias"])
        expected = 2 * self.n_stages * 2 + 2 + 2 * self.n_blocks * 2 + 2
        if len(self.p) != expected or st["sag_arm.stages.0.0.0.weight"].shape[1] != cfg["in_channels"]:
            raise ValueError("the weights do not fit the Btrfly Net")

    def _arm(self, name, x):
        feats = []
        for i in range(self.n_stages):
            x = _conv(x, *self.p[f"{name}.stages.{i}.0"], stride=2)
            x = _conv(x, *self.p[f"{name}.stages.{i}.1"])
            feats.append(x)
        return feats

    def _decoder(self, name, feats, fused):
        x = fused
        skips = feats[:-1][::-1]  # strides 16, 8, 4, (2: only its size)
        sizes = [f.shape[1:] for f in feats[:-1]][::-1]
        for i in range(self.n_blocks):
            h, w = sizes[i]
            x = _nearest(x, h, w)
            if i < len(skips) - 1:
                x = np.concatenate([x, skips[i]], axis=0)
            x = _conv(x, *self.p[f"{name}.blocks.{i}.conv1"])
            x = _conv(x, *self.p[f"{name}.blocks.{i}.conv2"])
        return x

    def __call__(self, sag: np.ndarray, cor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(C, H/2, W/2)`` of one sagittal and one coronal input ``(in_channels, H, W)``."""
        fs = self._arm("sag_arm", np.asarray(sag, np.float32))
        fc = self._arm("cor_arm", np.asarray(cor, np.float32))
        fused = np.concatenate([fs[-1], fc[-1]], axis=0)
        fused = _conv(_conv(fused, *self.p["fuse.0"]), *self.p["fuse.1"])
        ys = self._decoder("sag_decoder", fs, fused)
        yc = self._decoder("cor_decoder", fc, fused)
        return _conv(ys, *self.p["sag_head"], relu=False), _conv(yc, *self.p["cor_head"], relu=False)


N_FIXED = 2  # heatmap channels before the per-label ones: "any", "rib" (= nets.btrfly.N_FIXED)


def btrfly_config(config: dict) -> dict:
    """A bundle's config with every default filled in (bundles without ``preproc`` read
    version-1 inputs)."""
    cfg = {"out_channels": N_FIXED + len(P.PRIOR_LABELS), "widths": [16, 32, 64, 96, 128],
           "decoder": [96, 64, 32, 24], "spacing": SPACING, "width": WIDTH}
    cfg.update(config)
    cfg.setdefault("preproc", 1)
    cfg.setdefault("in_channels", in_channels(cfg["preproc"]))
    return cfg


def load_model(path=None, device: str = "auto"):
    """The Btrfly Net from a bundle (default: the bundled ``models/label.pt``), and its device.

    ``cpu`` and ``auto`` give a :class:`NumpyBtrfly` (no torch import); ``cuda`` the torch net.
    """
    path = Path(path) if path is not None else DEFAULT_MODEL
    if device in ("auto", "cpu"):
        arch, config, state, _meta = read_bundle_numpy(path)
        _check_arch(arch, path)
        try:
            return NumpyBtrfly(config, state), "numpy"
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"weights do not fit the net ({exc})", path) from None
    import torch

    from .nets import btrfly
    from .nets.train import load_bundle, pick_device

    dev = pick_device(device)
    arch, config, state, _meta = load_bundle(path, map_location="cpu")
    _check_arch(arch, path)
    net = btrfly.build(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"weights do not fit the net ({str(exc).splitlines()[0][:120]})", path) from None
    net.eval().to(dev)
    if dev.type == "cpu":
        # two small 2D passes: thread start-up and contention cost more than they save
        torch.set_num_threads(1)
    return net, dev


def _check_arch(arch, path) -> None:
    if arch != "btrfly":
        raise DataError(f"model is a {arch!r} bundle, not a labelling net", path)


def heatmaps(net, view: SpineView, device) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid heatmaps ``(C, H/2, W/2)`` for the sagittal and coronal projections."""
    if isinstance(net, NumpyBtrfly):
        ls, lc = net(view.sag, view.cor)
        return _sigmoid(ls), _sigmoid(lc)
    import torch

    with torch.no_grad():
        sag = torch.from_numpy(view.sag[None]).to(device)
        cor = torch.from_numpy(view.cor[None]).to(device)
        hs, hc = net(sag, cor)
        return torch.sigmoid(hs[0]).float().cpu().numpy(), torch.sigmoid(hc[0]).float().cpu().numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


# --------------------------------------------------------------------------- candidates
@dataclass
class Candidates:
    """Candidate body centroids (world mm) and the evidence the prior needs."""

    world: np.ndarray  # (N, 3)
    label_logp: np.ndarray  # (N, K)
    exist: np.ndarray  # (N,) probability of a real vertebra or sacrum
    rib: np.ndarray  # (N,)
    sacrum: np.ndarray  # (N,)
    s1_peak: int = -1  # index of the candidate taken from the sacrum channel alone (-1: none)

    def without(self, i: int) -> Candidates:
        keep = np.arange(len(self.world)) != i
        return Candidates(self.world[keep], self.label_logp[keep], self.exist[keep], self.rib[keep],
                          self.sacrum[keep])


STRIDE = 2


def _subpixel(img: np.ndarray, r: int, c: int, radius: int = 2) -> tuple[float, float]:
    """Weighted centre of the values above half the peak around ``(r, c)``."""
    r0, r1 = max(r - radius, 0), min(r + radius + 1, img.shape[0])
    c0, c1 = max(c - radius, 0), min(c + radius + 1, img.shape[1])
    win = img[r0:r1, c0:c1]
    w = np.clip(win - 0.5 * img[r, c], 0, None)
    if w.sum() <= 0:
        return float(r), float(c)
    rr, cc = np.mgrid[r0:r1, c0:c1]
    return float((w * rr).sum() / w.sum()), float((w * cc).sum() / w.sum())


def _peak_value(img: np.ndarray, r: float, c: float, radius: int = 1) -> np.ndarray:
    """Max of each channel of ``img`` (C, H, W) in a small window around ``(r, c)``."""
    ri, ci = round(r), round(c)
    r0, r1 = max(ri - radius, 0), min(ri + radius + 1, img.shape[1])
    c0, c1 = max(ci - radius, 0), min(ci + radius + 1, img.shape[2])
    return img[:, r0:r1, c0:c1].reshape(img.shape[0], -1).max(axis=1)


def local_maxima(img: np.ndarray, threshold: float, size: int = 5) -> np.ndarray:
    """``(N, 2)`` row/column indices of the local maxima above ``threshold`` (plateaus: one point)."""
    from scipy import ndimage

    peak = (img == ndimage.maximum_filter(img, size=size, mode="nearest")) & (img >= threshold)
    labels, n = ndimage.label(peak)
    if n == 0:
        return np.zeros((0, 2), dtype=int)
    centres = ndimage.center_of_mass(peak, labels, range(1, n + 1))
    return np.rint(np.array(centres)).astype(int).reshape(-1, 2)


PEAK_THRESHOLD = 0.1  # sagittal "any" peaks kept as candidates (weak ones get a low existence)
STRONG_PEAK = 0.2  # above this a peak is probably a vertebra
NMS_MM = 8.0  # two vertebral bodies are never this close along the superior axis


def _existence(v: float) -> float:
    """Prior probability that a peak of height ``v`` (geometric mean of the two views) is real.

    Peak heights are not calibrated: a strong peak is probably real (0.71-0.97); a weak
    one (0.1-0.2) is an even bet, so the prior uses it only where the chain needs it
    (a level that would otherwise be missing, such as a faint L5 or S1 on a real scan).
    """
    if v >= STRONG_PEAK:
        return float(np.clip(0.55 + 0.8 * v, 0.6, 0.97))
    t = np.clip((v - 0.05) / (STRONG_PEAK - 0.05), 0.0, 1.0)
    return float(0.35 + t * (0.55 + 0.8 * STRONG_PEAK - 0.35))


COR_OFF_MM = 10.0  # a coronal column this far off the spine line of the reliable peaks is re-picked
RELIABLE_PEAK = 0.3  # sagittal "any" peaks whose coronal column draws the spine line
S1_PEAK = 0.05  # the sagittal S1 channel's maximum below the chain becomes the sacrum candidate


def _spine_line(rows: np.ndarray, cols: np.ndarray, reliable: np.ndarray, tol: float) -> np.ndarray | None:
    """Expected coronal column per row from the reliable peaks (a column off the line of its
    neighbours by more than ``tol`` pixels does not count); None with fewer than two."""
    r, c = rows[reliable], cols[reliable]
    if len(r) < 2:
        return None
    o = np.argsort(r)
    r, c = r[o], c[o]
    # each reliable column against the median of its neighbours: a lone outlier is dropped
    med = np.array([np.median(c[max(0, i - 2):i + 3]) for i in range(len(c))])
    ok = np.abs(c - med) <= tol
    if ok.sum() < 2:
        return None
    return np.interp(rows, r[ok], c[ok])


def candidates(hs: np.ndarray, hc: np.ndarray, view: SpineView, threshold: float = PEAK_THRESHOLD,
               nms_mm: float = NMS_MM, sacrum_peak: bool = True) -> Candidates:
    """3D candidates from the two views' heatmaps (see the module docstring).

    A weak peak within ``nms_mm`` (along the superior axis) of a stronger one is dropped:
    weak peaks only fill levels that have no strong one. Strong peaks all stay (a second
    peak on the posterior elements of a level): the prior's chain must be smooth
    (:func:`verse_cli.prior._jump_logp`), which decides between them.

    The coronal column of a peak is the strongest one on its rows, unless it lies more
    than :data:`COR_OFF_MM` off the line the reliable peaks draw (a narrow or tilted
    field of view leaves bright edges in the coronal view): then the strongest column
    near that line. With ``sacrum_peak``, the maximum of the sagittal S1 channel, where
    it lies below every candidate's level, becomes one more candidate (the sacrum is
    often too faint in the "any" channel of a real scan, and it anchors the lumbar count).
    """
    any_s, any_c = hs[0], hc[0]
    pixel_mm = abs(view.affine[0, 0]) * STRIDE
    peaks = local_maxima(any_s, threshold, size=2 * int(7.5 // pixel_mm) + 1)  # 15 mm: the closest levels
    k_s1 = N_FIXED + P.PRIOR_LABELS.index(P.SACRUM)
    rows, cols_a, cols_r, strong = [], [], [], []
    for r, c in peaks:
        row, col_a = _subpixel(any_s, int(r), int(c))
        ri = round(row)
        band = any_c[max(ri - 1, 0):ri + 2].max(axis=0)
        rows.append(row)
        cols_a.append(col_a)
        cols_r.append(int(np.argmax(band)))
        strong.append(any_s[int(r), int(c)] >= RELIABLE_PEAK)
    rows_arr, cols_arr = np.array(rows, float), np.array(cols_r, float)
    tol = COR_OFF_MM / pixel_mm
    line = _spine_line(rows_arr, cols_arr, np.array(strong, bool), tol) if len(rows) else None
    s1_idx = -1
    if sacrum_peak and len(rows):
        s1 = hs[k_s1]
        r1, c1 = np.unravel_index(int(np.argmax(s1)), s1.shape)
        # the lowest reliable peak that is not the sacrum itself (a strong S1 "any" peak still
        # gives the level: the chain may not reach it)
        lowest = max((r for r, ok in zip(rows, strong) if ok and (r1 - r) * pixel_mm > nms_mm),
                     default=min(rows))
        if s1[r1, c1] >= S1_PEAK and (r1 - lowest) * pixel_mm > nms_mm:
            # the centre of the sacrum blob (the maximum is its upper, anterior end: the promontory)
            from scipy import ndimage

            blob, _ = ndimage.label(s1 >= 0.5 * s1[r1, c1])
            sel = blob == blob[r1, c1]
            w = s1 * sel
            rr, cc = np.nonzero(sel)
            row = float((w[rr, cc] * rr).sum() / w[rr, cc].sum())
            col_a = float((w[rr, cc] * cc).sum() / w[rr, cc].sum())
            ri = round(row)
            band = np.maximum(any_c, hc[k_s1])[max(ri - 1, 0):ri + 2].max(axis=0)
            rows.append(row)
            cols_a.append(col_a)
            cols_r.append(int(np.argmax(band)))
            s1_idx = len(rows) - 1
            debug(f"sacrum peak {s1[r1, c1]:.2f}: candidate at row {row:.1f}, below the lowest reliable "
                  f"row {lowest:.1f}")
    pts, logp, exist, rib, sac, height = [], [], [], [], [], []
    for n, (row, col_a, col_r_int) in enumerate(zip(rows, cols_a, cols_r)):
        ri = round(row)
        is_s1 = n == s1_idx
        src = np.maximum(any_c, hc[k_s1]) if is_s1 else any_c
        band = src[max(ri - 1, 0):ri + 2].max(axis=0)
        if line is not None:
            exp = float(np.interp(row, rows_arr, line))
            if abs(col_r_int - exp) > tol:
                lo_c, hi_c = max(int(np.floor(exp - tol)), 0), min(int(np.ceil(exp + tol)) + 1, band.size)
                if hi_c > lo_c:
                    col_r_int = lo_c + int(np.argmax(band[lo_c:hi_c]))
        row_c, col_r = _subpixel(any_c if not is_s1 else src, ri, col_r_int)
        vs = _peak_value(hs, row, col_a)
        vc = _peak_value(hc, row_c, col_r)
        v = np.sqrt(np.clip(vs * vc, 0, None))
        lab = v[N_FIXED:] + 1e-3
        logp.append(np.log(lab / lab.sum()))
        if is_s1:
            h1 = float(vs[k_s1])
            height.append(max(float(np.sqrt(vs[0] * max(vc[0], 0.05))), h1))
            exist.append(_existence(max(h1, 0.15)))
            sac.append(float(np.clip(0.5 + h1 / (2 * max(vs[0], h1, 1e-3)), 0.5, 0.9)))
        else:
            height.append(float(np.sqrt(vs[0] * max(vc[0], 0.05))))
            exist.append(_existence(height[-1]))
            sac.append(float(np.clip(v[k_s1] / max(v[0], 1e-3), 0.0, 1.0)))
        rib.append(float(np.clip(v[1] / max(v[0], 1e-3), 0.0, 1.0)))
        # heatmap pixel k covers input pixels 2k and 2k + 1
        grid_vox = [STRIDE * col_r + 0.5, STRIDE * col_a + 0.5, STRIDE * (row + row_c) / 2 + 0.5]
        pts.append(geometry.vox2world(view.affine, np.array(grid_vox)))
    n = len(pts)
    world = np.array(pts).reshape(n, 3)
    strength = np.array(height)
    keep = np.zeros(n, dtype=bool)
    free = np.ones(n, dtype=bool)
    for i in np.argsort(-strength, kind="stable"):  # one candidate per level, strongest levels first
        if not free[i]:
            continue
        level = free & (np.abs(world[:, 2] - world[i, 2]) < nms_mm)  # along the body axis (world S)
        level &= strength < STRONG_PEAK  # strong peaks all stay: the prior picks the smooth chain
        if 0 <= s1_idx < n:  # the sacrum candidate stays, and suppresses nothing
            level[s1_idx] = i == s1_idx
            if i == s1_idx:
                level[:] = False
        level[i] = True
        keep[i] = True
        free[level] = False
    idx = np.nonzero(keep)[0]
    return Candidates(world[idx], np.array(logp).reshape(n, len(P.PRIOR_LABELS))[idx],
                      np.array(exist)[idx], np.array(rib)[idx], np.array(sac)[idx],
                      int(np.nonzero(idx == s1_idx)[0][0]) if s1_idx in idx else -1)


def _chain(cands: Candidates, fixed: dict[int, int], sacrum_level: float | None = None) -> P.ChainLabels:
    return P.label_chain(cands.world, cands.label_logp, exist_logp=np.log(cands.exist),
                         rib_prob=cands.rib, sacrum_prob=cands.sacrum, fixed=fixed, sacrum_level=sacrum_level)


SACRUM_MAX_GAP_MM = 110.0  # farther below the chain's end (3 lumbar levels) the peak is no anchor
SACRUM_ABOVE = frozenset((17, 18, 19, 28, 20, 21, 22, 23, 24, 25))  # T10-T13, L1-L6: may end above the sacrum


def label_with_sacrum_peak(cands: Candidates, fixed: dict[int, int]
                           ) -> tuple[Candidates, P.ChainLabels, dict[int, int]]:
    """The prior's chain, anchored by the sacrum peak where the chain stops above it.

    The candidate taken from the sacrum channel alone (:attr:`Candidates.s1_peak`) is
    not a body centroid: on a real scan the S1 channel marks the top of the tilted
    sacrum, often in front of or behind the body line. It gives the sacrum's *level*.
    The chain is labelled without it; if it then ends at a low thoracic or lumbar
    vertebra with no sacrum candidate, above the peak, the prior runs again with the
    peak's S coordinate as ``sacrum_level`` (:func:`verse_cli.prior._end_logp`; at most
    :data:`SACRUM_MAX_GAP_MM` below the chain's end, more than the prior can bridge): the
    last mobile vertebra above the sacrum is L5 unless the gap holds a missed level or
    the chain has evidence for a variant. Returns the candidates the chain refers to,
    the chain, and the fixes re-indexed to those candidates.
    """
    i = cands.s1_peak
    if i < 0 or i in fixed:  # none, or a user fix took it over: a candidate like any other
        return cands, _chain(cands, fixed), fixed
    base = cands.without(i)
    fixed_b = {k - (k > i): v for k, v in fixed.items()}
    chain = _chain(base, fixed_b)
    used = [k for k, lab in enumerate(chain.labels) if lab is not None]
    if not used:
        return base, chain, fixed_b
    last = min(used, key=lambda k: base.world[k, 2])
    lab = chain.labels[last]
    level = float(cands.world[i, 2])
    gap = base.world[last, 2] - level
    if lab not in SACRUM_ABOVE or P.SACRUM in chain.labels or not 0 < gap <= SACRUM_MAX_GAP_MM:
        return base, chain, fixed_b
    debug(f"sacrum level {base.world[last, 2] - level:.0f} mm below the chain's last vertebra ({lab}): "
          "the chain is numbered from it")
    return base, _chain(base, fixed_b, sacrum_level=level), fixed_b


# --------------------------------------------------------------------------- evidence on the CT
RIB_HU = 200.0  # bone in the smoothed grid volume
CORE_MM = 24.0  # half-width of the vertebral core (body, arch, articular pillars) taken out first
CONTACT_MM = 36.0  # a rib's medial part (neck, tubercle) lies within this of the midline
RIB_REACH_MM = 58.0  # a rib of >= 38 mm from its joint reaches this far from the midline
RIB_MAX_SECTION = 110  # voxels per grid step of lateral distance: a rib, not a pelvic or scapular plate
RIB_MAX_HEIGHT_MM = 32.0  # cranio-caudal span at one lateral distance: a rib (10-20 mm, sloping), not the ilium


def _median_height(comp: np.ndarray, col: np.ndarray, row: np.ndarray, n: int, sp: float) -> np.ndarray:
    """Per piece, the median over its columns (lateral positions) of its cranio-caudal span in mm.

    A rib crossed at one lateral distance is a bar 10-20 mm tall, a little more where it
    slopes down; the iliac wing and the scapula are plates several centimetres tall there,
    however thin their cortex makes their section.
    """
    from scipy import ndimage

    key = (comp.astype(np.int64) - 1) * (int(col.max()) + 1) + col
    keys, inv = np.unique(key, return_inverse=True)
    span = (ndimage.maximum(row, inv, np.arange(len(keys))) - ndimage.minimum(row, inv, np.arange(len(keys)))
            + 1) * sp
    owner = keys // (int(col.max()) + 1)
    return np.asarray(ndimage.median(span, owner, np.arange(n)), dtype=np.float64)


def ct_rib_evidence(gv: GridVolume, grid_pts: np.ndarray) -> np.ndarray:
    """Probability that each candidate bears a rib, from the CT itself; 0.5 where no rib could be seen.

    The bone of the grid volume, without the vertebral core (the midline +-
    :data:`CORE_MM`, following the candidates) and without anything more than 15 mm in
    front of the bodies (the sternum would join left and right ribs), is split into
    connected pieces. A piece is a rib when it reaches :data:`RIB_REACH_MM` from the
    midline, stays thin (in section, and :data:`RIB_MAX_HEIGHT_MM` cranio-caudally at one
    lateral distance, which the iliac wing is not), and starts within :data:`CONTACT_MM` of it; it belongs to the
    candidate nearest to the level of its medial end (ribs run down as they go out, so
    their medial end is their highest part and the closest to their own vertebra). A candidate with no rib
    counts as rib-free only where the scan shows the lateral region on some side (a
    field of view that cuts it gives no evidence either way).
    """
    from scipy import ndimage

    pts = np.asarray(grid_pts, dtype=np.float64).reshape(-1, 3)
    out = np.full(len(pts), 0.5)
    if not len(pts):
        return out
    sp = abs(float(gv.affine[0, 0]))
    W, A, H = gv.shape
    order = np.argsort(pts[:, 2])
    rows = np.arange(H)
    mid_r = np.interp(rows, pts[order, 2], pts[order, 0])  # the spine's midline per row
    mid_a = np.interp(rows, pts[order, 2], pts[order, 1])
    d = (np.arange(W)[:, None] - mid_r[None, :]) * sp  # (W, H) signed lateral mm
    ap = (np.arange(A)[:, None] - mid_a[None, :]) * sp  # (A, H) mm in front of the bodies
    keep = (np.abs(d) > CORE_MM)[:, None, :] & ((ap >= -70) & (ap <= 15))[None, :, :]
    bone = (gv.hu > RIB_HU) & gv.valid & keep
    lab, nlab = ndimage.label(bone)
    has_rib = np.zeros(len(pts), dtype=bool)
    if nlab:
        idx = np.nonzero(lab)
        comp = lab[idx]
        dist = np.abs(d[idx[0], idx[2]])
        reach = ndimage.maximum(dist, comp, np.arange(1, nlab + 1))
        inner = ndimage.minimum(dist, comp, np.arange(1, nlab + 1))
        size = np.bincount(comp, minlength=nlab + 1)[1:]
        section = size / ((np.asarray(reach) - np.maximum(inner, CORE_MM)) / sp + 1)
        ok = ((np.asarray(reach) >= RIB_REACH_MM) & (section <= RIB_MAX_SECTION)
              & (_median_height(comp, idx[0], idx[2], nlab, sp) <= RIB_MAX_HEIGHT_MM))
        for k in np.nonzero(ok)[0] + 1:
            if inner[k - 1] > CONTACT_MM:
                continue  # a piece of rib whose medial part is not next to the spine
            sel = (comp == k) & (dist <= inner[k - 1] + 4.0)  # the medial end: the rib's highest part
            row = float(idx[2][sel].mean())
            near = int(np.argmin(np.abs(pts[:, 2] - row)))
            has_rib[near] = True
            debug(f"rib piece {k}: reach {reach[k - 1]:.0f} mm, section {section[k - 1]:.0f}, "
                  f"medial row {row:.0f} -> candidate {near}")
    # where could a rib be seen: the contact and reach regions of at least one side are scanned
    for n, (_r, _a, i) in enumerate(pts):
        if has_rib[n]:
            out[n] = 0.92
            continue
        i0, i1 = max(round(i - 12 / sp), 0), min(round(i + 22 / sp) + 1, H)
        if i1 <= i0:
            continue
        a0, a1 = max(round(_a - 50 / sp), 0), min(round(_a + 10 / sp) + 1, A)
        v = gv.valid[:, a0:a1, i0:i1].mean(axis=1)  # (W, rows) scanned fraction
        dd = d[:, i0:i1]
        for side in (-1.0, 1.0):
            reach_z = (side * dd >= RIB_REACH_MM - 5) & (side * dd <= RIB_REACH_MM + 5)
            contact_z = (side * dd >= CORE_MM) & (side * dd <= CONTACT_MM)
            if reach_z.any() and contact_z.any() and v[reach_z].mean() > 0.6 and v[contact_z].mean() > 0.6:
                out[n] = 0.08
                break
    return out


# --------------------------------------------------------------------------- discs on the CT
DISC_SECTION_MM = (3.0, 6.0)  # rings of the cross-section averaged along a profile (+ its centre line)
DISC_STEP_MM = 0.5
DISC_FLANK_MM = 8.0  # an endplate lies within this of the disc's centre, on each side
DISC_MIN_DZ_MM, DISC_MAX_DZ_MM = 10.0, 48.0  # two candidates this far apart along S may be neighbouring levels


def ct_profile(ct: np.ndarray, affine: np.ndarray, a, b, step: float = DISC_STEP_MM,
               rings=DISC_SECTION_MM, n_angles: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """HU along the segment from world point ``a`` to ``b``: ``(t mm, mean HU of the cross-section)``.

    The cross-section is a disc of rings perpendicular to the segment, sampled in world mm
    and mapped through ``affine`` (any orientation, any voxel size; linear interpolation).
    Points outside the array or in padding (below -1100 HU) do not count; a section with
    no scanned point is NaN.
    """
    from scipy import ndimage

    a, b = np.asarray(a, float), np.asarray(b, float)
    length = float(np.linalg.norm(b - a))
    if length < 1e-6:
        return np.zeros(1), np.full(1, np.nan)
    u = (b - a) / length
    h = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(u, h)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(u, e1)
    ang = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    offs = [np.zeros(3)] + [r * (np.cos(x) * e1 + np.sin(x) * e2) for r in rings for x in ang]
    t = np.arange(0.0, length + 1e-6, step)
    pts = a[None, None] + t[:, None, None] * u[None, None] + np.asarray(offs)[None]
    vox = geometry.world2vox(affine, pts.reshape(-1, 3)).T
    v = ndimage.map_coordinates(np.asarray(ct, np.float32), vox, order=1, cval=np.nan).reshape(len(t), -1)
    v[~(v > INVALID_HU + 100)] = np.nan
    seen = np.isfinite(v).sum(axis=1)
    with np.errstate(invalid="ignore"):
        mean = np.where(seen >= max(3, v.shape[1] // 2), np.nansum(np.nan_to_num(v), axis=1) / np.maximum(seen, 1),
                        np.nan)
    return t, mean


def disc_depth(t: np.ndarray, p: np.ndarray, margin_mm: float = 3.0, flank_mm: float = DISC_FLANK_MM,
               within_mm: float | None = None) -> tuple[float, float, float]:
    """The deepest disc-like valley of a profile: ``(depth HU, position mm, valley HU)``.

    A disc between two bodies is a low band between two endplates: a minimum whose
    profile rises on *both* sides within ``flank_mm``. Depth = the lower of the two
    flanking maxima minus the minimum (0 where none; NaN where the profile is not seen).
    Valleys are looked for from ``margin_mm`` to ``margin_mm`` before the end, or to
    ``within_mm`` where given.
    """
    from scipy import ndimage

    if len(p) < 5 or not np.all(np.isfinite(p)):
        return float("nan"), float("nan"), float("nan")
    step = float(t[1] - t[0])
    q = ndimage.gaussian_filter1d(p, 0.75 / step, mode="nearest")
    n = round(flank_mm / step)
    best = (0.0, float("nan"), float("nan"))
    lo, hi = round(margin_mm / step), len(q) - round(margin_mm / step)
    if within_mm is not None:
        hi = min(hi, round(within_mm / step) + 1)
    for k in range(max(lo, 1), min(hi, len(q) - 1)):
        if not (q[k] <= q[k - 1] and q[k] <= q[k + 1]):
            continue
        left = q[max(0, k - n):k].max()
        right = q[k + 1:k + 1 + n].max()
        depth = float(min(left, right) - q[k])
        if depth > best[0]:
            best = (depth, float(t[k]), float(q[k]))
    return best


SACRUM_CLAIM = 0.5  # the net's sacrum probability at which a candidate counts as claimed to be the sacrum
DISC_HU = 90.0  # depth (HU) of a clear disc valley between two endplates (:func:`disc_depth`)
#: A disc is fibrocartilage (70-120 HU, more with the endplates in the section): a valley lower
#: than this is fat or fluid between two separate bones (a sacrum's segments, on some scans).
#: Asked of the disc below a sacrum claim, the one that decides; a vacuum disc (gas) gives no evidence.
DISC_TISSUE_HU = 80.0
BONY_HU = 80.0  # mean HU of the cross-section at a body centroid (osteoporotic cancellous bone and more)
SACRUM_DISC_MIN_DZ_MM = 13.0  # a disc between two sacrum claims: the lower one at least this far down
MOBILE_EXIST = 0.99  # a body between two discs is a vertebra
MOBILE_SACRUM = 0.05  # ... and a mobile one, not the sacrum


def disc_between(ct: np.ndarray, affine: np.ndarray, a, b) -> tuple[float, float, bool]:
    """``(depth HU, valley HU, ok)``: the disc valley on the CT between two candidates
    (:func:`disc_depth`), and whether it can be one: both ends on bone (:data:`BONY_HU`; a
    point on soft tissue is no body centroid) and the segment running along the spine
    more than across it (one that runs across, from a body to the posterior elements or
    from S1 to the curved-back S2, crosses bone walls, not a disc between stacked bodies)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    t, p = ct_profile(ct, affine, a, b)
    depth, _pos, valley = disc_depth(t, p)
    end = max(1, round(3.0 / DISC_STEP_MM))
    with np.errstate(invalid="ignore"):
        bony = bool(np.nanmean(p[:end + 1]) >= BONY_HU and np.nanmean(p[-end - 1:]) >= BONY_HU)
    along = float(np.hypot(*(b - a)[:2])) <= abs(float(b[2] - a[2]))
    return (0.0 if not np.isfinite(depth) else depth), valley, bony and along


PROBE_MM = 32.0  # how far below a body centroid the disc below it is looked for
PROBE_START_MM = 6.0  # ... and no nearer than this (a centroid is never on an endplate)
PROBE_DISC_MM = 24.0  # a body's lower endplate lies within this of its centroid (half a body and some)
PROBE_ANGLES_DEG = (-30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0)  # the lumbosacral disc is tilted
#: A disc looked for (several directions, nothing to aim at) must be clearer than one between two
#: candidates: inside verse014's sacrum such a probe finds valleys 120-150 HU deep (the S1-S2
#: junction), below its L5 200-290 HU.
PROBE_DISC_HU = 200.0


def disc_below(ct: np.ndarray, affine: np.ndarray, above, centre) -> tuple[float, np.ndarray | None]:
    """The clearest disc just below a body centroid, with no candidate below it to aim at.

    Profiles run from ``centre`` down for :data:`PROBE_MM`, along the direction from the
    candidate ``above`` to it and turned by :data:`PROBE_ANGLES_DEG` towards the front
    or the back (the lumbosacral disc is tilted, the sacrum lies behind the last lumbar
    body's axis). A disc counts from :data:`PROBE_START_MM` to :data:`PROBE_DISC_MM`, of disc
    tissue (:data:`DISC_TISSUE_HU`), with bone at the start and bone again past it
    (:data:`BONY_HU`). Returns ``(depth HU, a world point in the bone
    below the disc)``, ``(0, None)`` where none is seen.
    """
    centre = np.asarray(centre, float)
    u = centre - np.asarray(above, float)
    if np.linalg.norm(u) < 1e-6:
        return 0.0, None
    u /= np.linalg.norm(u)
    ant = np.array([0.0, 1.0, 0.0]) - u * u[1]  # world anterior, across the spine's direction
    if np.linalg.norm(ant) < 0.2:
        return 0.0, None
    ant /= np.linalg.norm(ant)
    best: tuple[float, np.ndarray | None] = (0.0, None)
    for deg in PROBE_ANGLES_DEG:
        d = np.cos(np.radians(deg)) * u + np.sin(np.radians(deg)) * ant
        t, p = ct_profile(ct, affine, centre, centre + PROBE_MM * d)
        depth, pos, valley = disc_depth(t, p, margin_mm=PROBE_START_MM, within_mm=PROBE_DISC_MM)
        if not np.isfinite(depth) or depth <= best[0] or not valley >= DISC_TISSUE_HU:
            continue
        with np.errstate(invalid="ignore"):
            start = float(np.nanmean(p[t <= 3.0]))
            past = p[(t >= pos + 4.0) & (t <= pos + 12.0)]
            after = float(np.nanmean(past)) if past.size else float("nan")
        if start >= BONY_HU and after >= BONY_HU:
            best = (depth, centre + (pos + 8.0) * d)
    return best


def _clear_disc(depth: float, valley: float, ok: bool) -> bool:
    return ok and depth >= DISC_HU and valley >= DISC_TISSUE_HU


def ct_sacrum_disc(ct: np.ndarray, affine: np.ndarray, cands: Candidates) -> Candidates:
    """Correct the net's sacrum where the CT shows a disc below a candidate it calls the sacrum.

    The net's sacrum channel can fire on L5 as well as on the sacrum below it (the
    network's label channels are then one level off at the junction). The CT decides,
    as a radiologist counts: the sacrum's top (S1) has a disc above it and bone
    continuing down the sacrum below (the fused S1-S2 junction is at most a faint
    remnant), while a mobile vertebra is a body with a disc above *and* below.

    A candidate claimed as the sacrum (``sacrum`` >= :data:`SACRUM_CLAIM`) with a clear
    disc (:func:`disc_between`: depth >= :data:`DISC_HU`, both ends on bone, the segment
    along the spine) from a candidate above it is a mobile vertebra when also, below it,

    * a clear disc of disc tissue (valley >= :data:`DISC_TISSUE_HU`) separates it from a
      lower candidate (at least :data:`SACRUM_DISC_MIN_DZ_MM` down) that the net claims as
      the sacrum too: two claims one level apart cannot both be the sacrum's top; the
      claim passes to the lower one, which is not looked at again; or else
    * a clearer disc (:data:`PROBE_DISC_HU`, of disc tissue) lies just below it
      (:func:`disc_below`, no candidate to aim at):
      the sacrum's level (:attr:`Candidates.s1_peak`, which numbers the chain from
      below in :func:`label_with_sacrum_peak`) moves below that disc where it was above.

    A mobile vertebra must be in the chain (:data:`MOBILE_EXIST`) and is not the sacrum
    (:data:`MOBILE_SACRUM`). Without such evidence (a faint or no disc, a point off the
    bone, nothing above to measure from) the net's evidence stands. Candidate positions
    are in the world mm of ``affine``; ``ct`` in HU.
    """
    n = len(cands.world)
    if n < 2:
        return cands
    world = cands.world.copy()
    claimed = [k for k in range(n) if cands.sacrum[k] >= SACRUM_CLAIM and k != cands.s1_peak]
    exist, sac = cands.exist.copy(), cands.sacrum.copy()
    s1_peak, logp, rib = cands.s1_peak, cands.label_logp, cands.rib
    below_disc: set[int] = set()  # claims the CT put below the disc of a mobile vertebra: the sacrum
    for k in sorted(claimed, key=lambda k: -world[k, 2]):
        if k in below_disc:
            continue
        above = [i for i in range(n) if i != cands.s1_peak
                 and DISC_MIN_DZ_MM <= world[i, 2] - world[k, 2] <= DISC_MAX_DZ_MM]
        disc_above = [(i, *disc_between(ct, affine, world[i], world[k])) for i in above]
        disc_above = [(depth, i) for i, depth, _valley, ok in disc_above if depth >= DISC_HU and ok]
        if not disc_above:
            continue
        below = [j for j in claimed if SACRUM_DISC_MIN_DZ_MM <= world[k, 2] - world[j, 2] <= DISC_MAX_DZ_MM]
        lower = [j for j in below if _clear_disc(*disc_between(ct, affine, world[k], world[j]))]
        level = None
        if not lower:
            # aim along the spine from each candidate above across a disc (one may lie off the body line)
            depth, level = max((disc_below(ct, affine, world[i], world[k]) for _, i in disc_above),
                               key=lambda r: r[0])
            if level is None or depth < PROBE_DISC_HU:
                continue
        debug(f"candidate at S {world[k, 2]:.0f} mm: a disc above and below it on the CT, a mobile vertebra "
              f"(sacrum {cands.sacrum[k]:.2f} -> {MOBILE_SACRUM})")
        exist[k] = max(exist[k], MOBILE_EXIST)
        sac[k] = min(sac[k], MOBILE_SACRUM)
        for j in lower:
            sac[j] = max(sac[j], cands.sacrum[k])
            below_disc.add(j)
        if level is not None:
            if s1_peak < 0:
                world = np.vstack([world, level[None]])
                logp = np.vstack([logp, np.zeros((1, logp.shape[1]))])
                exist, rib = np.append(exist, 0.5), np.append(rib, 0.5)
                sac = np.append(sac, cands.sacrum[k])
                s1_peak = len(world) - 1
            elif world[s1_peak, 2] > level[2]:
                world[s1_peak] = level
            debug(f"sacrum level below that disc: S {world[s1_peak, 2]:.0f} mm")
    return Candidates(world, logp, exist, rib, sac, s1_peak)


# --------------------------------------------------------------------------- fixes
def apply_fixes(cands: Candidates, fixes_world: dict[int, np.ndarray], radius_mm: float = 12.0):
    """Put user-corrected centroids into the candidate list as hard constraints.

    Each fixed point takes over the nearest candidate within ``radius_mm`` (its position
    replaced); a fixed point with no candidate nearby becomes a new candidate.
    Returns the new candidates and ``{index: label}``.
    """
    world = cands.world.copy()
    extra = []
    fixed: dict[int, int] = {}
    taken: set[int] = set()
    # closest pairs first, so two fixes never fight over one candidate
    pairs = []
    for lab, xyz in fixes_world.items():
        d = np.linalg.norm(world - xyz, axis=1) if len(world) else np.zeros(0)
        for i in np.argsort(d):
            if d[i] > radius_mm:
                break
            pairs.append((float(d[i]), int(lab), int(i)))
    pairs.sort()
    placed: set[int] = set()
    for _, lab, i in pairs:
        if lab in placed or i in taken:
            continue
        world[i] = fixes_world[lab]
        fixed[i] = lab
        taken.add(i)
        placed.add(lab)
    for lab, xyz in fixes_world.items():
        if lab not in placed:
            extra.append((lab, xyz))
    n, K = len(world), len(P.PRIOR_LABELS)
    new = Candidates(
        np.vstack([world] + [x[None] for _, x in extra]) if extra else world,
        np.vstack([cands.label_logp, np.zeros((len(extra), K))]),
        np.concatenate([cands.exist, np.full(len(extra), 0.98)]),
        np.concatenate([cands.rib, np.full(len(extra), 0.5)]),
        np.concatenate([cands.sacrum, np.full(len(extra), 0.5)]),
        cands.s1_peak,
    )
    for j, (lab, _) in enumerate(extra):
        fixed[n + j] = lab
    return new, fixed


def read_fixes(fix, fix_markers, ct_affine) -> dict[int, np.ndarray]:
    """User corrections (JSON or marker NIfTI) as ``{label: world xyz}``."""
    from .core.centroids import centroids_from_markers, read_centroids
    from .core.io import load_mask

    out: dict[int, np.ndarray] = {}
    if fix is not None:
        ctd = read_centroids(fix, ref_affine=ct_affine)
        ctd.check_matches(ct_affine, source=str(fix))
        out.update({lab: xyz for lab, xyz in zip(ctd.labels, ctd.to_world(ct_affine))})
    if fix_markers is not None:
        img = load_mask(fix_markers)
        ctd = centroids_from_markers(np.asarray(img.dataobj), img.affine)
        out.update({lab: xyz for lab, xyz in zip(ctd.labels, geometry.vox2world(img.affine, ctd.coords))})
    bad = sorted(lab for lab in out if lab not in P.PRIOR_LABELS)
    if bad:
        raise DataError(f"fixed labels {bad} cannot be placed in the vertebral chain (coccyx?)",
                        fix or fix_markers)
    return out


# --------------------------------------------------------------------------- refinement
def refine_on_ct(ct: np.ndarray, ct_affine: np.ndarray, world: np.ndarray, radius_mm: float = 9.0,
                 max_shift_mm: float = 4.0, bone_hu: float = 120.0) -> np.ndarray:
    """Move each point towards the centre of the bone around it (one mean-shift step).

    Inside a ball of ``radius_mm`` (smaller than a vertebral body) the bone voxels
    (above ``bone_hu``) are averaged with equal weights, so a point near the edge of
    a body moves inwards while one well inside stays put; bright cortex does not
    pull harder than cancellous bone. The shift is capped at ``max_shift_mm`` so a
    point never jumps to a neighbouring structure.
    """
    sp = geometry.spacing(ct_affine)
    out = world.copy()
    half = np.ceil(radius_mm / sp).astype(int)
    for n, xyz in enumerate(world):
        c = geometry.world2vox(ct_affine, xyz)
        ci = np.rint(c).astype(int)
        lo = np.maximum(ci - half, 0)
        hi = np.minimum(ci + half + 1, ct.shape)
        if np.any(hi <= lo):
            continue
        block = ct[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        d2 = sum(((g - cc) * s) ** 2 for g, cc, s in zip(grids, c, sp))
        sel = (d2 <= radius_mm ** 2) & (block >= bone_hu)
        if sel.sum() < 8:
            continue
        pos = np.stack([g[sel] for g in grids], axis=1).mean(axis=0)
        shift = geometry.vox2world(ct_affine, pos) - xyz
        norm = np.linalg.norm(shift)
        if norm > max_shift_mm:
            shift *= max_shift_mm / norm
        out[n] = xyz + shift
    return out


# --------------------------------------------------------------------------- the stage
@dataclass
class LabelResult:
    centroids: Centroids
    variants: list[str]
    missing: list[int]


def missed_levels(labels: list[int], world: np.ndarray, missing: list[int]) -> tuple[list[int], np.ndarray]:
    """Positions of the levels the chain skipped between two labelled vertebrae.

    The prior bridges a level it found no candidate for (``ChainLabels.missing``); that
    vertebra is in the scan all the same. Its centroid is placed on the straight line
    between its labelled neighbours, evenly spaced (levels a few apart have similar
    heights), so the output has no hole in the chain.
    """
    order = {lab: k for k, lab in enumerate(P.PRIOR_LABELS)}
    miss = sorted((m for m in set(missing) if m in order and m not in labels), key=order.get)
    pairs = sorted(zip(labels, map(tuple, world)), key=lambda t: order.get(t[0], -1))
    out_l, out_w = [], []
    for (la, wa), (lb, wb) in itertools.pairwise(pairs):
        inner = [m for m in miss if order[la] < order[m] < order[lb]]
        for k, m in enumerate(inner, start=1):
            t = k / (len(inner) + 1)
            out_l.append(int(m))
            out_w.append((1 - t) * np.asarray(wa) + t * np.asarray(wb))
    return out_l, np.array(out_w).reshape(-1, 3)


def label(ct_img, bbox, model=None, fix=None, device: str = "auto", *, fix_markers=None,
          refine: bool = True, keep_sacrum: bool = True, details: bool = False, ct_ribs: bool = True,
          interpolate_missing: bool = True, upright: bool = True, ct_discs: bool = True):
    """Labelled vertebral-body centroids of a CT.

    Parameters
    ----------
    ct_img : nibabel image
        The CT (HU), any orientation.
    bbox : path, dict or (lo, hi)
        The spine box: a ``verse detect`` JSON file, its parsed content, or world corners.
    model : path or (net, device), optional
        Weights bundle (default: ``models/label.pt``) or an already loaded net.
    fix : path or dict, optional
        User-corrected centroids: a VerSe centroid JSON on the CT's grid, or
        ``{label: world xyz}``. They are hard constraints.
    fix_markers : path, optional
        The same as an edited marker NIfTI.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    interpolate_missing : bool
        Place the levels the prior bridged (no candidate) between their neighbours
        (:func:`missed_levels`), with confidence 0 and ``"interpolated": true``.
    upright : bool
        Where the labelled spine leans more than :data:`MAX_LEAN_DEG` from the
        superior axis, label it again on a grid turned so that it stands upright
        (:func:`upright_turn`).
    ct_discs : bool
        Where the net calls two levels the sacrum, let the discs on the CT decide which
        is the sacrum and which a mobile vertebra (:func:`ct_sacrum_disc`).

    Returns
    -------
    Centroids
        On the CT's voxel grid, with ``extras[label]["confidence"]`` (posterior
        probability of the label). With ``details=True`` a :class:`LabelResult`.
    """
    ct = np.asanyarray(ct_img.dataobj) if not isinstance(ct_img, tuple) else ct_img[0]
    affine = ct_img.affine if not isinstance(ct_img, tuple) else ct_img[1]
    axis_hint = None
    if isinstance(bbox, (str, Path)):
        lo, hi, axis_hint = read_bbox(bbox, ct.shape, affine, with_axis=True)
    elif isinstance(bbox, dict):
        lo, hi = parse_bbox(bbox)
        axis_hint = box_spine_axis(bbox)
    else:
        lo, hi = (np.asarray(b, float) for b in bbox)

    if isinstance(model, tuple):
        net, dev = model
    else:
        net, dev = load_model(model, device)
    fixes: dict[int, np.ndarray] = {}
    if isinstance(fix, dict):
        fixes = {int(k): np.asarray(v, float) for k, v in fix.items()}
    elif fix is not None or fix_markers is not None:
        fixes = read_fixes(fix, fix_markers, affine)
    options = {"refine": refine, "keep_sacrum": keep_sacrum, "ct_ribs": ct_ribs, "ct_discs": ct_discs,
               "interpolate_missing": interpolate_missing, "fix_source": fix or fix_markers}
    turn = None
    if upright and axis_hint is not None:
        turn = turn_upright(axis_hint, (lo + hi) / 2, min_lean_deg=MAX_LEAN_DEG_BOX)
    if turn is None:
        found = _label_in_frame(ct, affine, lo, hi, net, dev, fixes, **options)
        turn = upright_turn(found) if upright else None
        if turn is None and upright and axis_hint is not None and _too_few_for_an_axis(found):
            # a spine leaning beyond the training tilts can lose most levels in the
            # first pass (2 of 10 at 35 degrees): the detector's axis is all there is
            turn = turn_upright(axis_hint, (lo + hi) / 2)
    if turn is not None:
        debug(f"the spine leans {turn.lean_deg:.0f} degrees: labelled again upright")
        found = _label_turned(ct, affine, lo, hi, net, dev, fixes, turn, options)
        # the detector's axis comes from an 8 mm heatmap, which a skull base or a
        # pelvis can bend: where the centroids found upright still lean beyond the
        # training tilts, they give a better axis, and the scan is turned once more
        still = upright_turn(_Found(found.labels, turn.apply(found.world), found.extras, [], []))
        if still is not None:
            debug(f"still leaning {still.lean_deg:.0f} degrees upright: turned again by the centroids")
            turn = UprightTurn(still.matrix @ turn.matrix, turn.lean_deg)
            found = _label_turned(ct, affine, lo, hi, net, dev, fixes, turn, options)
    ctd = Centroids.from_world(found.labels, found.world, affine, found.extras).sorted()
    if found.variants:
        info(f"numbering variants: {', '.join(found.variants)}")
    if details:
        return LabelResult(ctd, found.variants, found.missing)
    return ctd


def _label_turned(ct, affine, lo, hi, net, dev, fixes, turn: UprightTurn, options) -> _Found:
    """Steps 1-6 on the world frame ``turn`` makes, the centroids brought back."""
    moved = {lab: turn.apply(xyz) for lab, xyz in fixes.items()}
    lo_t, hi_t = turn.box(lo, hi)
    found = _label_in_frame(ct, turn.matrix @ affine, lo_t, hi_t, net, dev, moved, **options)
    found.world = turn.undo(found.world)
    return found


@dataclass
class _Found:
    """One labelling in one world frame: labels, world mm, extras, variants, bridged levels."""

    labels: list[int]
    world: np.ndarray
    extras: dict
    variants: list[str]
    missing: list[int]


def _label_in_frame(ct, affine, lo, hi, net, dev, fixes: dict[int, np.ndarray], *, refine: bool,
                    keep_sacrum: bool, ct_ribs: bool, interpolate_missing: bool, ct_discs: bool = True,
                    fix_source=None) -> _Found:
    """Steps 1-6 of the pipeline on the world frame that ``affine`` and the box are given in.

    ``fix_source`` names the corrections' file in the error raised when they contradict each other.
    """
    spacing, width = getattr(net, "spacing", SPACING), getattr(net, "width", WIDTH)
    preproc = getattr(net, "preproc", 1)
    ct, affine = crop_to_grid(ct, affine, lo, hi, spacing, width)  # only the part the stage reads
    resampled = resample_box(ct, affine, lo, hi, spacing, width)  # once, for the net's view and the rib evidence
    view = project_v1(*resampled, lo, hi) if preproc == 1 else None  # before finish_grid_volume edits it
    gv = finish_grid_volume(*resampled)
    if view is None:
        view = project(gv, lo, hi)
    hs, hc = heatmaps(net, view, dev)
    cands = candidates(hs, hc, view)
    debug(f"{len(cands.world)} candidates")
    if ct_ribs and len(cands.world):
        # ribs seen on the CT mark the last thoracic vertebra; elsewhere the network's rib channel
        found = ct_rib_evidence(gv, geometry.world2vox(gv.affine, cands.world))
        kept = P.last_rib_evidence(cands.world, found)
        debug("CT ribs: " + " ".join(f"{f:.2f}/{k:.2f}" for f, k in zip(found, kept)))
        cands.rib = np.where(kept != 0.5, kept, cands.rib)
    if ct_discs and np.any(cands.sacrum >= SACRUM_CLAIM):
        # the discs on the CT decide where the net calls a mobile vertebra the sacrum
        offset = fix_hu_offset(ct)
        cands = ct_sacrum_disc(ct if offset == 0 else ct + offset, affine, cands)

    fixed_idx: dict[int, int] = {}
    if fixes:
        cands, fixed_idx = apply_fixes(cands, fixes)
    try:
        cands, chain, fixed_idx = label_with_sacrum_peak(cands, fixed_idx)
    except ValueError as exc:
        raise DataError(f"the corrections cannot be satisfied together: {exc}", fix_source) from None
    keep = [i for i, lab in enumerate(chain.labels)
            if lab is not None and (keep_sacrum or lab != P.SACRUM)]
    world = cands.world[keep]
    if refine and len(keep):
        moved = refine_on_ct(ct, affine, world)
        is_fixed = np.array([i in fixed_idx for i in keep])
        world = np.where(is_fixed[:, None], world, moved)
    labels = [int(chain.labels[i]) for i in keep]
    extras = {lab: {"confidence": round(float(chain.confidence[i]), 3)} for lab, i in zip(labels, keep)}
    if interpolate_missing and chain.missing:
        add_l, add_w = missed_levels(labels, world, chain.missing)
        if len(add_l):
            if refine:
                add_w = refine_on_ct(ct, affine, add_w)
            for lab in add_l:
                extras[lab] = {"confidence": 0.0, "interpolated": True}
            labels = labels + add_l
            world = np.vstack([world, add_w])
    return _Found(labels, np.asarray(world, float).reshape(-1, 3), extras, list(chain.variants),
                  list(chain.missing))


# --------------------------------------------------------------------------- a leaning spine
#: The net was trained on scans tilted by up to 15 degrees (``nets.btrfly._tilt``); a spine
#: that leans more than this (a flexed neck, a steep cervicothoracic junction, a patient
#: lying askew) is labelled again on a grid turned upright. Measured on the 50 held-out
#: cases, turning spines that lean less than this changed no result for the better, while
#: turning all of them cost two cases: the net's answer on a small view depends on the grid.
MAX_LEAN_DEG = 15.0
MIN_POINTS_FOR_AXIS = 4  # fewer vertebrae give no reliable direction
#: The spine axis ``verse detect`` writes with its box comes from an 8 mm heatmap (within
#: about 6 degrees of the centroids' axis on tilted synthetic scans). It is used first,
#: without a first pass, only where it leans clearly beyond the training tilts: there the
#: net's first-pass centroids can line up along the grid instead of the spine (a scan
#: tilted 35 degrees gave 12 labels on a near-vertical line).
MAX_LEAN_DEG_BOX = 25.0


@dataclass
class UprightTurn:
    """A rotation of world space about the spine's centre that makes its axis superior."""

    matrix: np.ndarray  # 4 x 4, world -> turned world
    lean_deg: float

    def apply(self, xyz: np.ndarray) -> np.ndarray:
        return nib_affines.apply_affine(self.matrix, xyz)

    def undo(self, xyz: np.ndarray) -> np.ndarray:
        return nib_affines.apply_affine(np.linalg.inv(self.matrix), xyz)

    def box(self, lo, hi) -> tuple[np.ndarray, np.ndarray]:
        """The world box around the turned corners of a box: what a detector's box of the
        turned scan would be (its spine box, like the training boxes, is axis-aligned)."""
        corners = np.array(list(itertools.product(*zip(lo, hi))), dtype=float)
        turned = self.apply(corners)
        return turned.min(axis=0), turned.max(axis=0)


def upright_turn(found: _Found) -> UprightTurn | None:
    """The turn that stands the labelled spine upright, or None when it leans little.

    The spine's axis is the principal direction of the vertebral-body centroids the net
    found (not the interpolated ones, not the sacrum, whose point lies off the column).
    """
    reliable = [i for i, lab in enumerate(found.labels)
                if lab != P.SACRUM and not found.extras.get(lab, {}).get("interpolated")]
    if len(reliable) < MIN_POINTS_FOR_AXIS:
        return None
    pts = found.world[reliable]
    centre = pts.mean(axis=0)
    return turn_upright(np.linalg.svd(pts - centre, full_matrices=False)[2][0], centre)


def _too_few_for_an_axis(found: _Found) -> bool:
    return sum(1 for lab in found.labels if lab != P.SACRUM
               and not found.extras.get(lab, {}).get("interpolated")) < MIN_POINTS_FOR_AXIS


def turn_upright(axis: np.ndarray, centre: np.ndarray, min_lean_deg: float = MAX_LEAN_DEG) -> UprightTurn | None:
    """The rotation about ``centre`` that makes ``axis`` superior, or None when it leans
    no more than ``min_lean_deg``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    axis = axis if axis[2] >= 0 else -axis
    lean = float(np.degrees(np.arccos(np.clip(axis[2], -1.0, 1.0))))
    if lean <= min_lean_deg:
        return None
    rot = geometry.rotation_between(axis, np.array([0.0, 0.0, 1.0]))
    return UprightTurn(geometry.rotation_about(rot, centre), lean)


def from_markers(markers_path) -> Centroids:
    """Centroids from an edited marker NIfTI (each label's centre of mass)."""
    from .core.centroids import centroids_from_markers
    from .core.io import load_mask
    from .core.labels import VERSE_IDS

    img = load_mask(markers_path, allowed_labels=set(VERSE_IDS))
    data = np.asarray(img.dataobj)
    if not data.any():
        raise DataError("the marker image has no labelled voxels", markers_path)
    return centroids_from_markers(data, img.affine)


def run(ct=None, bbox=None, output="-", model=None, markers=None, fix=None, fix_markers=None,
        from_markers_path=None, device: str = "auto", upright: bool = True) -> Centroids:
    """The ``verse label`` command: read, label, write (atomically)."""
    from .core.centroids import marker_mask, write_centroids
    from .core.errors import UsageError
    from .core.io import load_nifti, save_mask

    if from_markers_path is not None:
        if ct is not None or bbox is not None:
            raise UsageError("--from-markers converts a marker image; give no CT or --bbox with it")
        ctd = from_markers(from_markers_path)
        write_centroids(ctd, output)
        return ctd
    if ct is None or bbox is None:
        raise UsageError("give a CT and --bbox (or --from-markers M.nii.gz)")
    img = load_nifti(ct)  # HU after the header scaling; converted to float only where the stage looks
    try:
        ctd = label(img, bbox, model=model, fix=fix, fix_markers=fix_markers, device=device, upright=upright)
    except DataError as exc:
        if exc.path is None:
            raise DataError(str(exc), ct) from None
        raise
    if not len(ctd):
        raise DataError("no vertebra found in the box", ct)
    if markers is not None:
        mm = marker_mask(ctd, img.shape, img.affine)
        save_mask(mm, img.affine, markers)
    write_centroids(ctd, output)
    return ctd
