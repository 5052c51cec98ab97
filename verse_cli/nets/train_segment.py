"""``verse train segment``: training data and loop for the per-vertebra 2.5D U-Net.

Each dataset item is one case (CT + vertebra mask + body centroids). From it
``vertebrae`` random vertebrae are drawn and, for each, ``slabs`` random slabs of the
1 mm patch, sampled straight from the CT (no full patch is resampled). Augmentation,
chosen for generalisation from synthetic to real CT:

* geometry: centroid jitter (sd 2.5 mm, as from ``verse label``), rotation about the
  patch centre (+-20 degrees sagittal, +-10 degrees about the other axes; covers
  lordosis/kyphosis in the CT-aligned frame), isotropic scale 0.85-1.15;
* bone density: inside the vertebrae (away from their surface) the HU above soft
  tissue are scaled by 0.05-1, because real trabecular bone ranges from ~300 HU down to
  soft-tissue values in osteoporosis, where only the cortical shell stays bright;
* field of view: sometimes everything beyond a random plane 12-60 mm from the centroid
  is replaced by the resampling fill (air), as in cropped or small-FOV scans;
* intensity: a random monotone remapping of the HU axis (scanner and kernel
  differences), HU gain 0.9-1.1 and offset +-50, Gaussian blur (sd up to 1.2 mm, and
  sometimes up to 2 mm along one axis to mimic thick slices), Gaussian noise (sd up to
  60 HU) that is sometimes spatially correlated, occasional 12-bit clipping of bright values.

The target is the mask of *this* vertebra: its neighbours are background.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core import labels as L
from ..core.errors import DataError
from ..core.progress import info, warn

# --------------------------------------------------------------------------- case loading
CACHE_DIR = ".segment-cache"


def load_case(case, cache: bool = True):
    """``(ct, mask, affine, {label: world centroid})`` of a :class:`CaseFiles`.

    With ``cache`` the arrays are kept as uncompressed ``.npy`` files in a hidden
    ``.segment-cache`` folder beside the CT and memory-mapped on later calls: decoding a
    ``.nii.gz`` costs seconds, and every epoch samples every case again.
    """
    if not cache:
        return _read_case(case)
    folder = Path(case.ct).parent / CACHE_DIR
    stem = folder / case.subject
    meta_path = stem.with_suffix(".json")
    if not meta_path.exists():
        ct, mask, aff, world = _read_case(case)
        from ..core.io import atomic_path, write_json

        try:
            folder.mkdir(exist_ok=True)
            for suffix, arr in (("_ct.npy", np.clip(np.rint(ct), -32768, 32767).astype(np.int16)),
                                ("_msk.npy", mask)):
                with atomic_path(str(stem) + suffix) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, arr)
            write_json({"affine": aff.tolist(), "world": {str(k): v.tolist() for k, v in world.items()}},
                       meta_path)
        except OSError:  # a read-only dataset: train without the cache
            return ct, mask, aff, world
    from ..core.io import read_json

    meta = read_json(meta_path)
    ct = np.load(str(stem) + "_ct.npy", mmap_mode="r")
    mask = np.load(str(stem) + "_msk.npy", mmap_mode="r")
    world = {int(k): np.asarray(v) for k, v in meta["world"].items()}
    return ct, mask, np.asarray(meta["affine"]), world


def _read_case(case):
    from ..core.centroids import body_centroids, read_centroids
    from ..core.io import load_ct, load_mask

    if case.mask is None:
        raise DataError("case has no vertebra mask (sub-X_seg-vert_msk.nii.gz)", case.ct)
    ct_img = load_ct(case.ct)
    mask_img = load_mask(case.mask)
    ct = np.asarray(ct_img.dataobj, dtype=np.float32)
    mask = np.asarray(mask_img.dataobj)
    if ct.shape != mask.shape:
        raise DataError(f"mask shape {mask.shape} differs from the CT's {ct.shape}", case.mask)
    aff = np.asarray(ct_img.affine, dtype=np.float64)
    present = set(np.unique(mask).tolist()) - {0}
    ctd = None
    if case.ctd is not None:
        try:
            ctd = read_centroids(case.ctd, ref_affine=aff)
            ctd.check_matches(aff)
        except DataError:
            ctd = None
    if ctd is None:
        ctd = body_centroids(mask, aff)
    world = {lab: xyz for lab, xyz in zip(ctd.labels, ctd.to_world(aff)) if lab in present and L.is_vertebra(lab)}
    return ct, mask, aff, world


class SegmentSlabs:
    """Random training slabs (map-style dataset of cases; ``set_epoch`` reseeds).

    ``__getitem__`` returns ``(x, y)``: float32 ``(V * S, n_in + 2, H, W)`` inputs and
    uint8 ``(V * S, n_out, H, W)`` targets.
    """

    def __init__(self, cases, cfg: dict, vertebrae: int = 4, slabs: int = 4, seed: int = 0, augment: bool = True,
                 repeats: int = 1, crop: int | None = None):
        self.crop = crop
        self.cases = list(cases)
        self.cfg = cfg
        self.vertebrae = vertebrae
        self.slabs = slabs
        self.seed = seed
        self.augment = augment
        self.repeats = max(1, int(repeats))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases) * self.repeats

    def __getitem__(self, index: int):
        from .train import worker_rng

        rng = worker_rng(self.seed, self.epoch if self.augment else 0, index)
        case = self.cases[index % len(self.cases)]
        ct, mask, aff, world = load_case(case)
        if not world:
            return _empty(self.cfg)
        labels = sorted(world)
        chosen = rng.choice(labels, size=min(self.vertebrae, len(labels)), replace=False)
        xs, ys = [], []
        for lab in chosen:
            x, y = sample_slabs(ct, mask, aff, int(lab), world[int(lab)], self.cfg, rng, self.slabs, self.augment,
                                self.crop)
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)


def _empty(cfg):
    n_in, n_out = cfg["n_in"], cfg["n_out"]
    _, h, w = cfg["patch_shape"]
    return np.zeros((0, n_in + 2, h, w), np.float32), np.zeros((0, n_out, h, w), np.uint8)


def collate(items):
    """Concatenate the slabs of several cases into one batch of tensors."""
    import torch

    x = np.concatenate([i[0] for i in items])
    y = np.concatenate([i[1] for i in items])
    return torch.from_numpy(x), torch.from_numpy(y)


def _rotation(rng, max_deg) -> np.ndarray:
    """A rotation about the patch axes (angles uniform in +-max_deg per axis)."""
    ax, ay, az = np.radians(rng.uniform(-1, 1, 3) * np.asarray(max_deg))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def sample_slabs(ct, mask, aff, label, centroid_world, cfg, rng, n_slabs: int, augment: bool = True,
                 crop: int | None = None):
    """``n_slabs`` (input, target) slabs of one vertebra's (augmented) patch.

    With ``crop`` only a random ``crop x crop`` window of each slab is sampled (guidance
    channels cropped alike, so the net still sees where the centroid is); the window is
    drawn anywhere or around where a vertebra's middle lies. This makes a CPU step several
    times cheaper.
    """
    from ..segment import AIR_HU, patch_affine, patch_directions, sample_patch
    from .unet import guidance, normalise_hu

    n_in, n_out = int(cfg["n_in"]), int(cfg["n_out"])
    width, h, w = (int(v) for v in cfg["patch_shape"])
    margin = (n_in - n_out) // 2
    centre = np.asarray(centroid_world, dtype=np.float64)
    rot = None
    scale = 1.0
    if augment:
        centre = centre + np.clip(rng.normal(0, 2.5, 3), -6, 6)
        dirs = patch_directions(aff)
        # rotation about the patch's own axes (x = left-right: the sagittal tilt), expressed in world
        rot = dirs @ _rotation(rng, (20, 10, 10)) @ dirs.T
        scale = float(rng.uniform(0.85, 1.15))
    # slab positions: mostly near the midline, where most of the vertebra is; some anywhere
    central = np.rint(rng.normal(cfg["centre_index"][0] - (n_out - 1) / 2, 22, n_slabs))
    anywhere = rng.integers(0, width - n_out + 1, size=n_slabs)
    firsts = np.where(rng.random(n_slabs) < 0.75, central, anywhere).clip(0, width - n_out).astype(int)
    ch, cw = (h, w) if crop is None else (min(crop, h), min(crop, w))
    xs, ys, offsets, corners = [], [], [], []
    for first in firsts:
        r0, c0 = 0, 0
        if crop is not None and rng.random() < 0.5:  # anywhere
            r0, c0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        elif crop is not None:  # around the middle of a typical vertebra (20 mm behind, 5 mm below the centroid)
            r0 = int(np.clip(rng.normal(cfg["centre_index"][1] - 20 - ch / 2, 15), 0, h - ch))
            c0 = int(np.clip(rng.normal(cfg["centre_index"][2] - 5 - cw / 2, 15), 0, w - cw))
        paff = patch_affine(aff, centre, cfg, rotation=rot, first_slice=float(first - margin))
        paff[:3, :3] *= scale
        # keep the centroid fixed under scaling; start at the crop corner
        ci = np.asarray(cfg["centre_index"], dtype=np.float64) - np.array([first - margin, r0, c0])
        paff[:3, 3] = centre - paff[:3, :3] @ ci
        x = sample_patch(ct, aff, (n_in, ch, cw), paff, order=1, cval=AIR_HU)
        labels_in = sample_patch(mask, aff, (n_in, ch, cw), paff, order=0, cval=0)
        y = labels_in[margin:margin + n_out] == label
        if augment and rng.random() < 0.5:
            x = soften_bone(x, labels_in > 0, rng)
        xs.append(x)
        ys.append(y)
        offsets.append(first + (n_out - 1) / 2.0 - cfg["centre_index"][0])
        corners.append((r0, c0))
    x = np.stack(xs)
    y = np.stack(ys)
    if augment and rng.random() < 0.25:
        beyond = outside_field_of_view(x.shape, np.asarray(corners), cfg, firsts - margin, rng)
        x = np.where(beyond, np.float32(AIR_HU), x).astype(np.float32, copy=False)
        y = y & ~beyond[:, margin:margin + n_out]  # like VerSe: only what is in the scan is labelled
    if augment:
        x = augment_intensity(x, rng)
    guide = guidance(cfg, np.asarray(offsets))
    guide = np.stack([g[:, r0:r0 + ch, c0:c0 + cw] for g, (r0, c0) in zip(guide, corners)])
    return np.concatenate([normalise_hu(x, cfg), guide], axis=1), y.astype(np.uint8)


def soften_bone(x: np.ndarray, bone: np.ndarray, rng) -> np.ndarray:
    """Lower the density of the vertebrae's inside (osteoporosis), keeping their shell.

    ``bone`` marks any vertebra on the slab. Voxels more than 1-3 mm inside it have their
    HU above a soft-tissue level (0-60 HU) scaled by a factor 0.05-1, so the net learns
    the cortical outline rather than "bright means bone".
    """
    from scipy import ndimage

    depth = int(rng.integers(1, 4))
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # in-plane only: slices are 1 mm apart too
    inside = ndimage.binary_erosion(bone, structure=structure, iterations=depth)
    if not inside.any():
        return x
    soft = rng.uniform(0, 60)
    factor = rng.uniform(0.05, 1.0)
    out = x.copy()
    sel = inside & (x > soft)
    out[sel] = soft + (x[sel] - soft) * factor
    return out


def outside_field_of_view(shape, corners: np.ndarray, cfg: dict, first_slices: np.ndarray, rng) -> np.ndarray:
    """Where a random crop of the scan would end: voxels beyond one axis-aligned plane.

    The plane lies 12-60 mm from the centroid along a random patch axis and side; the
    slabs' own positions (``first_slices`` along left-right, ``corners`` in-plane) place
    it consistently in every slab of the vertebra.
    """
    _, n_in, h, w = shape
    axis = int(rng.integers(0, 3))
    side = 1 if rng.random() < 0.5 else -1
    cut = float(cfg["centre_index"][axis]) + side * rng.uniform(12, 60)
    if axis == 0:
        coord = (np.asarray(first_slices)[:, None] + np.arange(n_in)[None, :])[:, :, None, None]
    elif axis == 1:
        coord = (corners[:, 0][:, None] + np.arange(h)[None, :])[:, None, :, None]
    else:
        coord = (corners[:, 1][:, None] + np.arange(w)[None, :])[:, None, None, :]
    beyond = (coord > cut) if side > 0 else (coord < cut)
    return np.broadcast_to(beyond, shape)


def remap_hu(x: np.ndarray, rng) -> np.ndarray:
    """A random monotone piecewise-linear HU mapping (knots moved by up to +-25%)."""
    knots = np.array([-1024.0, -400.0, -100.0, 0.0, 100.0, 250.0, 500.0, 1000.0, 3072.0])
    gaps = np.diff(knots) * rng.uniform(0.75, 1.25, len(knots) - 1)
    moved = knots[0] + np.concatenate([[0.0], np.cumsum(gaps)])
    moved += knots[3] - moved[3]  # water stays near 0 HU
    return np.interp(x, knots, moved).astype(np.float32)


def augment_intensity(x: np.ndarray, rng) -> np.ndarray:
    """HU remapping, gain/offset, blur, noise and clipping on ``(N, n_in, H, W)`` HU slabs."""
    from scipy import ndimage

    if rng.random() < 0.5:
        x = remap_hu(x, rng)
    x = x * rng.uniform(0.9, 1.1) + rng.uniform(-50, 50)
    if rng.random() < 0.6:
        sigma = [0.0, *(rng.uniform(0.2, 1.2, 3))]
        if rng.random() < 0.3:
            sigma[1 + int(rng.integers(0, 3))] = rng.uniform(1.2, 2.0)
        x = ndimage.gaussian_filter(x, sigma=sigma, mode="nearest")
    if rng.random() < 0.7:
        noise = rng.normal(0, 1, x.shape).astype(np.float32)
        if rng.random() < 0.5:  # reconstructed CT noise is correlated over ~1 mm
            noise = ndimage.gaussian_filter(noise, sigma=[0, 0, 0.8, 0.8]) * 2.2
        x = x + noise * rng.uniform(5, 60)
    if rng.random() < 0.1:
        x = np.minimum(x, rng.uniform(1200, 3071))
    return x.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- loss and metrics
def _loss(logits, target):
    import torch.nn.functional as F

    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    prob = logits.float().sigmoid()
    inter = (prob * target).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def step_fn(model, batch, device):
    x, y = batch
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    return _loss(model(x), y)


def val_fn(model, batch, device):
    x, y = batch
    x = x.to(device)
    y = y.to(device).bool()
    logits = model(x)
    pred = logits > 0
    inter = (pred & y).sum().item()
    denom = pred.sum().item() + y.sum().item()
    return {"loss": float(_loss(logits, y)), "dice": 2 * inter / denom if denom else 1.0}


# --------------------------------------------------------------------------- entry point
DEFAULT_SET = Path("work") / "synth_segment"


def synth_default_set(n: int = 60, seed: int = 20000) -> Path:
    """Without a data folder: render ``n`` synthetic cases once into ``work/synth_segment``."""
    import os

    from ..synth import generate_many

    marker = DEFAULT_SET / ".complete"
    if not marker.exists():
        info(f"no training folder given: rendering {n} synthetic cases into {DEFAULT_SET}")
        generate_many(DEFAULT_SET, n=n, seed=seed, jobs=max(1, (os.cpu_count() or 2) - 1), region="random",
                      qc=False)
        marker.touch()
    return DEFAULT_SET


def train(data_dir, out="models/segment.pt", minutes: float | None = 15.0, epochs: int | None = None,
          device: str = "auto", seed: int = 0, resume: bool = False, workers: int = 2, batch: int = 2,
          lr: float = 2e-3, vertebrae: int = 4, slabs: int = 4, val_fraction: float = 0.1,
          config: dict | None = None, items_per_epoch: int = 64, crop: int | None = None, init=None) -> dict:
    """Train the segmentation U-Net on a VerSe-layout folder (e.g. ``verse synth`` output).

    ``batch`` cases per step, each giving ``vertebrae x slabs`` slabs (default 2 x 4 x 4
    = 32 slabs of 128 x 128). ``init`` fine-tunes a bundle (its configuration wins over
    ``config``, so the patch geometry ``verse segment`` uses for it is kept; lower ``lr``).
    """
    import torch

    from .train import discover_cases, fit, load_bundle, make_loader, pick_device, split_cases
    from .unet import build_model

    if data_dir is None:
        data_dir = synth_default_set()
    cases = [c for c in discover_cases(data_dir) if c.mask is not None]
    if not cases:
        raise DataError("no case with a vertebra mask", data_dir)
    train_cases, val_cases = split_cases(cases, val_fraction=val_fraction, seed=seed)
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if init is not None:
        _arch, config, init_state, _meta = load_bundle(init, map_location="cpu")
    model = build_model(config)
    if init is not None:
        model.load_state_dict(init_state)
    cfg = model.config
    repeats = max(1, items_per_epoch // max(1, len(train_cases)))
    train_ds = SegmentSlabs(train_cases, cfg, vertebrae, slabs, seed=seed, augment=True, repeats=repeats, crop=crop)
    val_ds = SegmentSlabs(val_cases[:24 if dev.type == "cuda" else 6], cfg, vertebrae, slabs, seed=seed + 1,
                          augment=False)
    train_dl = make_loader(train_ds, batch_size=batch, shuffle=True, workers=workers, seed=seed, device=dev,
                           collate_fn=collate, drop_last=len(train_ds) > batch)
    val_dl = make_loader(val_ds, batch_size=batch, shuffle=False, workers=workers, seed=seed, device=dev,
                         collate_fn=collate) if val_cases else None
    info(f"training segment on {len(train_cases)} cases (validation {len(val_cases)}), device {dev}")
    if len(train_cases) < 20:
        warn(f"only {len(train_cases)} training cases; expect a weak model")
    meta = {"data": str(Path(data_dir)), "n_train": len(train_cases), "n_val": len(val_cases), "crop": crop,
            "vertebrae_per_case": vertebrae, "slabs_per_vertebra": slabs, "batch_cases": batch,
            "init": str(init) if init is not None else None}
    return fit(model, train_dl, val_dl, step_fn, val_fn if val_cases else None, out=out, epochs=epochs,
               minutes=minutes, lr=lr, seed=seed, resume=resume, device=dev, meta=meta,
               monitor="dice" if val_cases else "loss", mode="max" if val_cases else "min", warmup_steps=30)
