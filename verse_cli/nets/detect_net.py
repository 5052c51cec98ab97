"""The spine detector of ``verse detect``: a small 3D U-Net on an 8 mm world-aligned grid.

Why 3D at 8 mm and not 2D projections
-------------------------------------
A whole CT (up to ~450 mm per side) on an 8 mm grid is at most ~56^3 voxels: small
enough for a 3D network to run in about a second of CPU time, so the usual reason for
2D projections (speed) does not apply at inference. In 3D the box in all three
directions comes from one volume, and ribs, pelvis or the table -- which overlap the
spine in every projection -- stay apart from it. The full-resolution level has few
channels and the decoder joins skips by addition rather than concatenation, to keep
the forward pass cheap. The price is training cost on a CPU: a 3D step is ~10x a 2D
step (see ``models/detect.md`` for measured accuracy and time).

Training data
-------------
Each case (CT + vertebra mask, from disk or from :func:`verse_cli.synth.generate_case`)
is block-averaged once to ~5 mm in its own voxel grid and kept in memory as int16 HU,
uint8 mask occupancy and a uint8 "ignore" map (bone near the scan's edges that the
mask does not label: vertebrae cut by the field of view, unlabelled in VerSe-style
masks). Every training sample is then drawn on the fly: a cubic crop of a randomly
rotated (+/-20 deg about L-R, +/-10 deg otherwise), rescaled (x0.8-1.25) grid; half of
the crops first cut the case the way a shorter acquisition would (:func:`random_fov`:
20-60 mm slabs along the slice axis like a 20-slice series, narrow in-plane FOVs, thick
slices), in the case's own voxel grid so that the scan's edges look as they do at
inference; then bone-density, contrast, offset, noise and blur changes of the HU values.
The target is the mask's coarse footprint (coarse voxels touched by bone of a labelled
vertebra), lightly smoothed. Validation scores every case whole and as a 40 mm axial
slab through its spine (:func:`validation_slab`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core.errors import DataError, UsageError
from ..core.geometry import vox2world
from ..core.progress import info, track, warn
from ..detect import HU_AIR, block_mean, heatmap_box, pool_factors, resample_linear, world_bounds
from .train import load_bundle, model_hash, worker_rng

ARCH = "SpineNet3D"
HU_LOW, HU_HIGH, HU_SCALE = -1024.0, 2048.0, 1000.0


def normalise_hu(hu):
    """Network input: HU clipped to [-1024, 2048] and divided by 1000 (numpy or torch)."""
    if isinstance(hu, torch.Tensor):
        return hu.clamp(HU_LOW, HU_HIGH) / HU_SCALE
    return (np.clip(hu, HU_LOW, HU_HIGH) / HU_SCALE).astype(np.float32)


# --------------------------------------------------------------------------- the network
def _conv(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(i, o, 3, padding=1, bias=False), nn.BatchNorm3d(o), nn.LeakyReLU(0.1, inplace=True))


class SpineNet3D(nn.Module):
    """A light 3D U-Net: spine logits per voxel of a coarse HU volume.

    Parameters
    ----------
    channels
        Feature channels per level (full resolution first); ``len(channels) - 1``
        poolings, so inputs are padded (with air) to a multiple of ``2**(levels-1)``.
    spacing_mm
        The coarse voxel size the network was trained at (used by ``verse detect``).
    """

    arch = ARCH

    def __init__(self, channels=(8, 16, 32, 64), spacing_mm: float = 8.0):
        super().__init__()
        channels = [int(c) for c in channels]
        self.config = {"channels": channels, "spacing_mm": float(spacing_mm)}
        self.stem = nn.Sequential(_conv(1, channels[0]), _conv(channels[0], channels[0]))
        self.down = nn.ModuleList(
            nn.Sequential(_conv(channels[i], channels[i + 1]), _conv(channels[i + 1], channels[i + 1]))
            for i in range(len(channels) - 1)
        )
        self.lateral = nn.ModuleList(nn.Conv3d(channels[i + 1], channels[i], 1) for i in range(len(channels) - 1))
        self.up = nn.ModuleList(_conv(channels[i], channels[i]) for i in range(len(channels) - 1))
        self.head = nn.Conv3d(channels[0], 1, 1)
        nn.init.constant_(self.head.bias, -3.0)  # start at the prior (~5 % spine), not at 0.5 everywhere

    @property
    def multiple(self) -> int:
        return 2 ** len(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[2:]
        pad = [(-s) % self.multiple for s in shape]
        if any(pad):
            air = float(normalise_hu(torch.tensor(HU_AIR)))
            x = F.pad(x, [p for q in reversed(pad) for p in (0, q)], value=air)
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool3d(skips[-1], 2)))
        y = skips.pop()
        for level in reversed(range(len(self.down))):
            y = F.interpolate(self.lateral[level](y), scale_factor=2, mode="trilinear", align_corners=False)
            y = self.up[level](y + skips[level])
        logits = self.head(y)
        return logits[:, :, : shape[0], : shape[1], : shape[2]]


def build(arch: str, config: dict) -> nn.Module:
    if arch != ARCH:
        raise DataError(f"model architecture {arch!r} is not a spine detector ({ARCH})")
    return SpineNet3D(**config)


def load_model(path, device="cpu") -> tuple[nn.Module, dict]:
    """The network of a bundle, in eval mode on ``device``, and ``{name, hash, meta}``."""
    path = Path(path)
    arch, config, state, meta = load_bundle(path, map_location="cpu")
    try:
        net = build(arch, config)
        net.load_state_dict(state)
    except (TypeError, RuntimeError, KeyError) as exc:
        raise DataError(f"weights do not fit {arch} ({str(exc).splitlines()[0][:120]})", path) from None
    except DataError as exc:
        raise DataError(str(exc), path) from None
    net.to(device).to(memory_format=torch.channels_last_3d).eval()
    return net, {"name": path.stem, "hash": model_hash(path), "meta": meta}


@torch.no_grad()
def predict_heatmap(net: nn.Module, coarse_hu: np.ndarray, device="cpu") -> np.ndarray:
    """Spine probability (float32, same shape) of a coarse HU volume."""
    x = torch.from_numpy(normalise_hu(coarse_hu))[None, None].to(device)
    net.eval()
    return torch.sigmoid(net(x))[0, 0].float().cpu().numpy()


# --------------------------------------------------------------------------- cached training cases
POOL_MM = 5.0  # cache resolution; samples are drawn from it at ~8 mm


@dataclass
class CoarseCase:
    """A training case pooled to ~4 mm in its own voxel grid (see module docstring)."""

    subject: str
    ct: np.ndarray  # int16 HU
    occ: np.ndarray  # uint8, 255 * fraction of the block inside a labelled vertebra
    ignore: np.ndarray  # uint8, 1 where the loss is ignored
    affine: np.ndarray
    spine_points: np.ndarray  # (N, 3) world points on the spine, for crop centres
    fov: tuple[np.ndarray, np.ndarray]  # world bounds of the original scan

    gt_min: np.ndarray  # world extent of the labelled vertebrae (pooled blocks they touch)
    gt_max: np.ndarray


def prepare_case(ct: np.ndarray, mask: np.ndarray, affine: np.ndarray, subject: str,
                 pool_mm: float = POOL_MM, edge_mm: float = 40.0) -> CoarseCase:
    """Pool one case for training (the expensive part, done once per case)."""
    from scipy import ndimage

    factors = pool_factors(affine, pool_mm)
    ct_p, aff_p = block_mean(ct, affine, factors)
    occ_p, _ = block_mean((mask > 0).astype(np.float32), affine, factors)
    occ = np.clip(np.rint(occ_p * 255), 0, 255).astype(np.uint8)
    if not occ.any():
        raise DataError("the vertebra mask is empty", subject)
    # Bone near the scan's edges that no label covers: vertebrae cut by the field of view.
    sp = np.sqrt((aff_p[:3, :3] ** 2).sum(axis=0))
    idx = np.indices(ct_p.shape, dtype=np.float32)
    edge_dist = np.min([np.minimum(idx[a], ct_p.shape[a] - 1 - idx[a]) * sp[a] for a in range(3)], axis=0)
    near_label = ndimage.binary_dilation(occ > 0, iterations=2)
    ignore = (edge_dist < edge_mm) & (ct_p > 150) & ~near_label
    labelled = vox2world(aff_p, np.argwhere(occ > 0))
    half = np.abs(aff_p[:3, :3]) @ np.full(3, 0.5)
    points = np.argwhere(occ > 64)
    if len(points) > 2000:
        points = points[np.random.default_rng(0).choice(len(points), 2000, replace=False)]
    return CoarseCase(
        subject=subject,
        ct=np.clip(np.rint(ct_p), -32768, 32767).astype(np.int16),
        occ=occ,
        ignore=ignore.astype(np.uint8),
        affine=aff_p,
        spine_points=vox2world(aff_p, points if len(points) else np.argwhere(occ > 0)[:1]).astype(np.float32),
        fov=world_bounds(ct.shape, affine),
        gt_min=labelled.min(axis=0) - half,
        gt_max=labelled.max(axis=0) + half,
    )


def load_case_files(case) -> CoarseCase:
    """Load and pool a :class:`~verse_cli.nets.train.CaseFiles` (CT + vertebra mask)."""
    from ..core.io import load_ct, load_mask

    if case.mask is None:
        raise DataError("no vertebra mask (sub-X_seg-vert_msk.nii.gz) for this CT", case.ct)
    ct = load_ct(case.ct)
    mask = load_mask(case.mask)
    if ct.shape != mask.shape or not np.allclose(ct.affine, mask.affine, atol=1e-3):
        raise DataError("mask grid differs from the CT grid", case.mask)
    return prepare_case(np.asarray(ct.dataobj), np.asarray(mask.dataobj), ct.affine, case.subject)


def synth_case(seed: int, spacing_mm: float = 4.0) -> CoarseCase:
    """Generate a synthetic case (``verse_cli.synth``) at coarse spacing and pool it."""
    from ..synth import generate_case

    case = generate_case(int(seed), spacing=(spacing_mm,) * 3)
    return prepare_case(case.ct, case.mask, case.affine, f"syn{seed:04d}")


def _default_signals() -> None:
    """Pool workers die quietly on SIGTERM (the CLI's own handler is for the main process)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _safe(fn, item):
    try:
        return fn(item)
    except DataError as exc:
        return exc


def prepare_cases(items, fn, workers: int = 0, description: str = "preparing cases") -> list[CoarseCase]:
    """Map ``fn`` over ``items`` (in a process pool when ``workers > 1``); skip bad cases with a warning."""
    from functools import partial

    items = list(items)
    job = partial(_safe, fn)
    if workers > 1 and len(items) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(workers, len(items)), initializer=_default_signals) as pool:
            results = list(track(pool.imap(job, items), description, total=len(items)))
    else:
        results = [job(item) for item in track(items, description, total=len(items))]
    cases = []
    for item, res in zip(items, results):
        if isinstance(res, DataError):
            warn(f"skipping {getattr(item, 'subject', item)}: {res}")
        else:
            cases.append(res)
    return cases


# --------------------------------------------------------------------------- sampling and augmentation
def _rotation(rng: np.random.Generator, max_deg=(20.0, 10.0, 10.0)) -> np.ndarray:
    """A random rotation: about R (sagittal tilt), A and S, in that order of freedom."""
    ax, ay, az = (np.radians(rng.uniform(-m, m)) for m in max_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _augment_hu(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    bone = hu > 100
    hu = np.where(bone, 100 + (hu - 100) * rng.uniform(0.6, 1.3), hu)
    hu = hu * rng.uniform(0.95, 1.05) + rng.uniform(-40, 40)
    if rng.random() < 0.3:
        hu = ndimage.gaussian_filter(hu, rng.uniform(0.3, 0.8))
    hu = hu + rng.normal(0, rng.uniform(0, 25), hu.shape)
    return hu.astype(np.float32)


def crop_case(case: CoarseCase, lo, hi, pool: tuple[int, int, int] = (1, 1, 1),
              blur: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> CoarseCase:
    """``case`` as a scan that only covered pooled voxels ``lo:hi`` (a shorter series, a narrower FOV).

    The arrays are sliced in the case's own voxel grid, so at the new edges the scan ends
    the way a real one does at inference (air beyond, partial volume from the linear
    resampling). ``pool`` block-averages the cut further per axis (thick or widely
    spaced slices: e.g. 2 on a 5 mm cache = 10 mm slices); ``blur`` (Gaussian sigma in
    cached voxels per axis) widens the slice profile. Labels outside the new field of
    view are gone from the target, as they would be from the mask of that scan.
    """
    from scipy import ndimage

    lo = np.clip(np.asarray(lo, int), 0, np.asarray(case.ct.shape) - 1)
    hi = np.clip(np.asarray(hi, int), lo + 1, np.asarray(case.ct.shape))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    affine = case.affine @ shift
    ct, occ, ignore = case.ct[sl].astype(np.float32), case.occ[sl].astype(np.float32), case.ignore[sl].astype(np.float32)
    if any(b > 0 for b in blur):
        ct = ndimage.gaussian_filter(ct, sigma=blur, mode="nearest")
    if any(f > 1 for f in pool):
        pool = tuple(int(min(f, s)) for f, s in zip(pool, ct.shape))
        ct, paff = block_mean(ct, affine, pool)
        occ, _ = block_mean(occ, affine, pool)
        ignore, _ = block_mean(ignore, affine, pool)
        affine = paff
    fov = world_bounds(ct.shape, affine)
    labelled = np.argwhere(occ > 0)
    if len(labelled):
        half = np.abs(affine[:3, :3]) @ np.full(3, 0.5)
        xyz = vox2world(affine, labelled)
        gt_min, gt_max = xyz.min(axis=0) - half, xyz.max(axis=0) + half
    else:
        gt_min, gt_max = fov[0].copy(), fov[0].copy()
    inside = np.all((case.spine_points >= fov[0]) & (case.spine_points <= fov[1]), axis=1)
    points = case.spine_points[inside] if inside.any() else ((fov[0] + fov[1]) / 2)[None].astype(np.float32)
    return CoarseCase(case.subject, np.rint(ct).astype(np.int16), np.clip(np.rint(occ), 0, 255).astype(np.uint8),
                      (ignore >= 0.5).astype(np.uint8), affine, points, fov, gt_min, gt_max)


def slice_axis(affine: np.ndarray, rng: np.random.Generator | None = None) -> int:
    """The voxel axis of a cut series: the one nearest world S-I (axial series) or, at random, another one."""
    direction = np.abs(np.asarray(affine)[:3, :3]) / np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    order = [int(np.argmax(direction[row])) for row in (2, 0, 1)]  # nearest S, then R, then A
    if rng is None:
        return order[0]
    pick = rng.choice(3, p=(0.65, 0.25, 0.1))  # axial slabs, else sagittal or coronal ones
    return order[pick]


def random_fov(case: CoarseCase, rng: np.random.Generator, centre_world: np.ndarray):
    """A random acquisition of ``case`` around ``centre_world``: ``(crop_case, kind)`` or ``(case, None)``.

    Half of the crops are cut, as real series often are:

    * ``slab`` (60 % of cuts): a short series, 20-60 mm along the slice axis (1 in 4 up to
      150 mm), like a 20-slice DICOM series, often with a narrow in-plane FOV too;
    * ``fov`` (40 %): a cropped field of view, 80-250 mm wide on one or two axes, like a
      narrow sagittal reconstruction around the spine.

    Each cut may also have thick slices (block averaging x2-3 along the slice axis, 25 %)
    or a wider slice profile (Gaussian, 25 %), and its edges fall anywhere in the cached
    voxel grid (variable spacing and partial volume come from the resampling).
    """
    if rng.random() < 0.5:
        return case, None
    spacing = np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0))
    centre = np.linalg.solve(case.affine[:3, :3], centre_world - case.affine[:3, 3])
    shape = np.asarray(case.ct.shape)
    lo, hi = np.zeros(3, int), shape.copy()
    axis = slice_axis(case.affine, rng)

    def cut(a: int, width_mm: float, jitter: float = 0.5) -> None:
        width = max(1.0, width_mm / spacing[a])
        c = centre[a] + rng.uniform(-jitter, jitter) * width
        lo[a] = int(np.clip(np.floor(c - width / 2), 0, shape[a] - 1))
        hi[a] = int(np.clip(lo[a] + max(1, round(width)), lo[a] + 1, shape[a]))

    pool, blur = [1, 1, 1], [0.0, 0.0, 0.0]
    if rng.random() < 0.6:
        kind = "slab"
        cut(axis, rng.uniform(20, 60) if rng.random() < 0.75 else rng.uniform(60, 150))
        for a in (a for a in range(3) if a != axis):
            if rng.random() < 0.35:
                cut(a, rng.uniform(120, 300), jitter=0.3)
    else:
        kind = "fov"
        others = [a for a in range(3) if a != axis]
        for a in others if rng.random() < 0.5 else [others[rng.integers(2)]]:
            cut(a, rng.uniform(80, 250), jitter=0.3)
    if rng.random() < 0.25:
        pool[axis] = int(rng.integers(2, 4))
    elif rng.random() < 0.33:
        blur[axis] = float(rng.uniform(0.4, 1.2))
    return crop_case(case, lo, hi, tuple(pool), tuple(blur)), kind


def validation_slab(case: CoarseCase, width_mm: float = 40.0) -> CoarseCase:
    """A fixed thin axial slab (``width_mm``) through the middle of the labelled spine, for validation."""
    axis = slice_axis(case.affine)
    spacing = float(np.sqrt((case.affine[:3, axis] ** 2).sum()))
    centre = np.linalg.solve(case.affine[:3, :3], (case.gt_min + case.gt_max) / 2 - case.affine[:3, 3])
    lo, hi = np.zeros(3, int), np.asarray(case.ct.shape)
    width = max(1, round(width_mm / spacing))
    lo[axis] = int(np.clip(round(centre[axis] - width / 2), 0, case.ct.shape[axis] - 1))
    hi[axis] = lo[axis] + width
    return crop_case(case, lo, hi)


def sample_grid(case: CoarseCase, rng: np.random.Generator, spacing_mm: float, size: int,
                augment: bool = True) -> np.ndarray:
    """The affine of a ``size^3`` sampling grid for one training crop."""
    if augment:
        rot = _rotation(rng) * spacing_mm * rng.uniform(0.8, 1.25)
        if rng.random() < 0.8:
            centre = case.spine_points[rng.integers(len(case.spine_points))] + rng.normal(0, 30, 3)
        else:
            centre = rng.uniform(case.fov[0], case.fov[1])
    else:
        rot = np.eye(3) * spacing_mm
        centre = case.spine_points.mean(axis=0)
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre - rot @ np.full(3, (size - 1) / 2)
    return affine


def render(case: CoarseCase, shape, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU, target and loss weight of ``case`` on the grid ``(shape, affine)``."""
    from scipy import ndimage

    hu = resample_linear(case.ct, case.affine, shape, affine, cval=HU_AIR)
    occ = resample_linear(case.occ, case.affine, shape, affine, cval=0.0)
    ignore = resample_linear(case.ignore, case.affine, shape, affine, cval=0.0)
    footprint = (occ > 0.1 * 255).astype(np.float32)
    target = np.clip(ndimage.gaussian_filter(footprint, 0.6) * 1.25, 0, 1).astype(np.float32)
    target = np.maximum(target, footprint * 0.9)
    weight = (ignore < 0.25).astype(np.float32)
    return hu, target, weight


class DetectSamples(torch.utils.data.Dataset):
    """Augmented crops (training) or whole cases (validation) from cached cases.

    Items are dicts of tensors: ``x`` (1, D, H, W) normalised HU, ``y`` target,
    ``w`` loss weight; validation items also carry the grid ``affine`` and the world
    bounds ``gt_min/gt_max`` of the labelled vertebrae and ``fov_min/fov_max``.
    """

    def __init__(self, cases: list[CoarseCase], spacing_mm: float = 8.0, size: int = 40, train: bool = True,
                 samples_per_case: int = 4, seed: int = 0, max_size: int = 96, val_slabs: bool = True):
        self.cases, self.spacing_mm, self.size, self.train = cases, spacing_mm, size, train
        self.val_slabs = int(bool(val_slabs))
        self.samples_per_case, self.seed, self.max_size, self.epoch = samples_per_case, seed, max_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases) * (self.samples_per_case if self.train else 1 + self.val_slabs)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index % len(self.cases)]
        rng = worker_rng(self.seed, self.epoch if self.train else 0, index)
        if self.train:
            shape = (self.size,) * 3
            affine = sample_grid(case, rng, self.spacing_mm, self.size)
            centre = vox2world(affine, np.full(3, (self.size - 1) / 2))
            if rng.random() < 0.8:  # cut around the spine in the crop, not somewhere off it
                dist = np.linalg.norm(case.spine_points - centre, axis=1)
                centre = case.spine_points[int(np.argmin(dist))] + rng.normal(0, 8, 3)
            case, _ = random_fov(case, rng, centre)
            hu, target, weight = render(case, shape, affine)
            hu = _augment_hu(hu, rng)
            item = {}
        else:
            if index >= len(self.cases):  # the second half of validation: thin slabs
                case = validation_slab(case)
            shape, affine = coarse_grid_for_case(case, self.spacing_mm, self.max_size)
            hu, target, weight = render(case, shape, affine)
            item = {"affine": affine, "gt_min": case.gt_min, "gt_max": case.gt_max, "fov_min": case.fov[0], "fov_max": case.fov[1]}
        item.update(x=torch.from_numpy(normalise_hu(hu))[None], y=torch.from_numpy(target)[None],
                    w=torch.from_numpy(weight)[None])
        return item


def coarse_grid_for_case(case: CoarseCase, spacing_mm: float, max_size: int):
    """The inference grid of a cached case (as ``verse detect`` builds it), capped at ``max_size``."""
    lo, hi = case.fov
    n = np.maximum(1, np.ceil((hi - lo) / spacing_mm - 1e-6)).astype(int)
    centre = (lo + hi) / 2
    if np.any(n > max_size):
        centre = np.where(n > max_size, (case.gt_min + case.gt_max) / 2, centre)
        n = np.minimum(n, max_size)
    affine = np.eye(4)
    affine[:3, :3] *= spacing_mm
    affine[:3, 3] = centre - spacing_mm * (n - 1) / 2
    return tuple(int(v) for v in n), affine


# --------------------------------------------------------------------------- loss and validation
def spine_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted BCE + soft Dice (the spine is ~2 % of the volume)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum().clamp(min=1)
    prob = torch.sigmoid(logits) * weight
    t = target * weight
    dice = 1 - (2 * (prob * t).sum() + 1) / (prob.sum() + t.sum() + 1)
    return bce + dice


def train_step(model, batch, device) -> torch.Tensor:
    x, y, w = (batch[k].to(device, non_blocking=True) for k in ("x", "y", "w"))
    return spine_loss(model(x), y, w)


def box_errors(heat: np.ndarray, affine: np.ndarray, gt_min, gt_max, fov, margin_mm: float = 10.0,
               threshold: float = 0.5) -> dict[str, float]:
    """Per-side miss (GT outside the box) and excess (box beyond GT) in mm, averaged over sides."""
    box = heatmap_box(heat, affine, threshold=threshold, margin_mm=margin_mm, clip_to=fov)
    if box is None:
        return {"empty": 1.0, "miss_mm": 50.0, "excess_mm": 50.0}
    miss = np.concatenate([np.maximum(0, box.ras_min - gt_min), np.maximum(0, gt_max - box.ras_max)])
    excess = np.concatenate([np.maximum(0, gt_min - box.ras_min), np.maximum(0, box.ras_max - gt_max)])
    return {"empty": 0.0, "miss_mm": float(miss.mean()), "excess_mm": float(excess.mean()),
            "miss_max_mm": float(miss.max())}


def val_step(model, batch, device) -> dict[str, float]:
    x, y, w = (batch[k].to(device) for k in ("x", "y", "w"))
    logits = model(x)
    heat = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
    errors = box_errors(heat, batch["affine"][0].numpy(), batch["gt_min"][0].numpy(), batch["gt_max"][0].numpy(),
                        (batch["fov_min"][0].numpy(), batch["fov_max"][0].numpy()))
    loss = float(spine_loss(logits, y, w))
    # what decides the best model: tight boxes that miss nothing
    errors["score"] = errors["excess_mm"] + 5 * errors["miss_mm"] + 100 * errors["empty"]
    return {"loss": loss, **errors}


# --------------------------------------------------------------------------- the trainer
def train_detect(data_dir=None, out="models/detect.pt", minutes: float | None = 10.0, epochs: int | None = None,
                 device="auto", seed: int = 0, resume: bool = False, workers: int = 2, synth: int = 0,
                 synth_seed: int = 10000, batch: int = 2, lr: float = 2e-3, val_fraction: float = 0.15,
                 spacing_mm: float = 8.0, crop: int = 40, channels=(8, 16, 32, 64), samples_per_case: int = 1,
                 max_val: int = 8) -> dict:
    """``verse train detect``: cache the cases, then :func:`~verse_cli.nets.train.fit` the detector.

    Cases come from ``data_dir`` (a folder or a list of folders, read with
    :func:`~verse_cli.nets.train.discover_cases`; cases with a vertebra mask) and/or
    ``synth`` synthetic cases generated on the fly with seeds ``synth_seed ...`` at 4 mm.
    At most ``max_val`` cases are held out for validation, which runs after every epoch
    (an epoch is ``samples_per_case`` random crops per training case). The best weights (lowest validation box score)
    go to ``out``; log and checkpoint beside it.
    """
    import time

    from .train import discover_cases, fit, make_loader, pick_device, seed_everything, split_cases

    if data_dir is None and not synth:
        raise UsageError("give a DATA_DIR or --synth N (or both)")
    if synth and synth_seed + synth > 90000:
        raise UsageError("synthetic training seeds must stay below 90000 (held out for evaluation)")
    dev = pick_device(device)
    seed_everything(seed)
    started = time.monotonic()
    cases: list[CoarseCase] = []
    sources = []
    for folder in [] if data_dir is None else data_dir if isinstance(data_dir, (list, tuple)) else [data_dir]:
        found = [c for c in discover_cases(folder) if c.mask is not None]
        if not found:
            raise DataError("no case has a vertebra mask (sub-X_seg-vert_msk.nii.gz)", folder)
        cases += prepare_cases(found, load_case_files, workers, "loading cases")
        sources.append(f"{len(found)} cases from {folder}")
    if synth:
        cases += prepare_cases(range(synth_seed, synth_seed + synth), synth_case, workers, "generating synth cases")
        sources.append(f"{synth} synth cases, seeds {synth_seed}-{synth_seed + synth - 1}, 4 mm")
    if len(cases) < 2:
        raise DataError(f"need at least 2 usable cases to train and validate, got {len(cases)}", data_dir)
    prep_s = time.monotonic() - started
    train_cases, val_cases = split_cases(cases, val_fraction, seed)
    train_cases += val_cases[max_val:]  # validation runs every epoch: a few cases suffice
    val_cases = val_cases[:max_val]
    info(f"{len(train_cases)} training and {len(val_cases)} validation cases ready in {prep_s:.0f} s; "
         f"training on {dev}")
    train_ds = DetectSamples(train_cases, spacing_mm, crop, train=True, samples_per_case=samples_per_case, seed=seed)
    val_ds = DetectSamples(val_cases, spacing_mm, train=False, seed=seed)
    train_loader = make_loader(train_ds, batch_size=batch, shuffle=True, workers=workers, seed=seed, device=dev,
                               drop_last=len(train_ds) > batch)
    val_loader = make_loader(val_ds, batch_size=1, shuffle=False, workers=min(workers, 2), seed=seed, device=dev)
    model = SpineNet3D(channels, spacing_mm).to(memory_format=torch.channels_last_3d)
    meta = {"data": sources, "train_cases": len(train_cases), "val_cases": len(val_cases),
            "val_subjects": [c.subject for c in val_cases], "prepare_seconds": round(prep_s, 1),
            "batch": batch, "lr": lr, "crop": crop, "samples_per_case": samples_per_case}
    if minutes is not None:
        # the budget covers the whole command, but training always gets at least half of it
        minutes = max(minutes / 2, minutes - prep_s / 60)
    return fit(model, train_loader, val_loader, train_step, val_step, out=out, epochs=epochs, minutes=minutes,
               lr=lr, seed=seed, resume=resume, device=dev, meta=meta, monitor="score", warmup_steps=30)
