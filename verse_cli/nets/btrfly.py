"""Btrfly Net (Sekuboyina et al. 2018): vertebra heatmaps from two orthogonal MIPs.

Two 2D encoder arms read the sagittal and the coronal maximum-intensity projection
of the spine crop (same height: the superior axis; same width: a fixed window).
Their deepest features are concatenated and fused, and two decoders (one per view,
each with its own arm's skip connections and the fused bottleneck) give one heatmap
per output channel in each view. The decoders are segmentation-models-pytorch's
``UnetDecoder`` and the encoder arms small conv stacks of its ``Conv2dReLU`` blocks (both
mirrored here with identical state-dict names, see below), so the net stays small and
runs on a CPU in a fraction of a second.

Output channels (:data:`CHANNELS`): 0 ``any`` (every body centroid, sacrum included),
1 ``rib`` (vertebrae bearing a rib of at least 38 mm), then one channel per label of
:data:`verse_cli.prior.PRIOR_LABELS` (C1..L6, T13, S1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..label import FILL, INVALID_HU, PREPROC
from ..prior import PRIOR_LABELS, SACRUM, THORACIC

CHANNELS: tuple[str, ...] = ("any", "rib") + tuple(f"label{lab}" for lab in PRIOR_LABELS)
N_FIXED = 2  # channels before the per-label ones
DOWNSAMPLE = 32  # input height and width must be multiples of this
OUTPUT_STRIDE = 2  # heatmaps have half the input resolution


# --------------------------------------------------------------------------- smp building blocks
# Conv2dReLU and UnetDecoder below are segmentation-models-pytorch's (0.6: ``base.modules.Conv2dReLU``,
# ``decoders.unet.decoder.UnetDecoder`` with batch norm, no attention, no centre block), written out
# with the same module names so the state dicts are interchangeable. Importing smp itself costs about
# 10 s (timm, huggingface_hub), which would break the 10 s budget of one ``verse label`` call.
class Conv2dReLU(nn.Sequential):
    """3x3 (or k x k) convolution without bias, batch norm, ReLU (smp's block)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, stride: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class UnetDecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate it, two Conv2dReLU (smp's block)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels, 3, padding=1)
        self.conv2 = Conv2dReLU(out_channels, out_channels, 3, padding=1)

    def forward(self, x, height: int, width: int, skip=None):
        x = F.interpolate(x, size=(height, width), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UnetDecoder(nn.Module):
    """smp's U-Net decoder: the first feature only gives the output size."""

    def __init__(self, encoder_channels, decoder_channels, n_blocks: int):
        super().__init__()
        enc = list(encoder_channels)[1:][::-1]
        ins = [enc[0]] + list(decoder_channels[:-1])
        skips = list(enc[1:]) + [0]
        self.center = nn.Identity()
        self.blocks = nn.ModuleList(UnetDecoderBlock(i, k, o) for i, k, o in zip(ins, skips, decoder_channels))

    def forward(self, features):
        shapes = [f.shape[2:] for f in features][::-1]
        feats = features[1:][::-1]
        x = self.center(feats[0])
        skips = feats[1:]
        for i, block in enumerate(self.blocks):
            h, w = shapes[i + 1]
            x = block(x, h, w, skips[i] if i < len(skips) else None)
        return x


class Arm(nn.Module):
    """One encoder arm: five stride-2 stages (strides 2 to 32)."""

    def __init__(self, in_channels: int, widths):
        super().__init__()
        stages = []
        prev = in_channels
        for i, w in enumerate(widths):
            stride = 2  # the stem works at half resolution: heatmaps come out at stride 2
            stages.append(nn.Sequential(
                Conv2dReLU(prev, w, 3, padding=1, stride=stride),
                Conv2dReLU(w, w, 3, padding=1),
            ))
            prev = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class BtrflyNet(nn.Module):
    """Two arms, a fused bottleneck, two U-Net decoders.

    ``forward(sag, cor)`` takes ``(B, in_channels, H, W)`` tensors with equal ``H`` and
    ``W`` (multiples of :data:`DOWNSAMPLE`) and returns ``(sag_heatmaps, cor_heatmaps)``,
    each ``(B, out_channels, H / 2, W / 2)`` logits.
    """

    arch = "btrfly"

    def __init__(self, in_channels: int | None = None, out_channels: int = len(CHANNELS),
                 widths=(16, 32, 64, 96, 128), decoder=(96, 64, 32, 24), spacing: float = 1.5, width: int = 128,
                 preproc: int = PREPROC):
        super().__init__()
        from ..label import in_channels as n_in

        if in_channels is None:
            in_channels = n_in(preproc)
        if in_channels != n_in(preproc):
            raise ValueError(f"input preprocessing {preproc} gives {n_in(preproc)} channels, not {in_channels}")
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "widths": list(widths),
                       "decoder": list(decoder), "spacing": spacing, "width": width, "preproc": int(preproc)}
        # the projection grid and the input preprocessing (verse_cli.label.PREPROC) this net reads
        self.spacing, self.width, self.preproc = float(spacing), int(width), int(preproc)
        self.sag_arm = Arm(in_channels, widths)
        self.cor_arm = Arm(in_channels, widths)
        deep = widths[-1]
        self.fuse = nn.Sequential(Conv2dReLU(2 * deep, deep, 3, padding=1), Conv2dReLU(deep, deep, 3, padding=1))
        self.sag_decoder = UnetDecoder(list(widths), list(decoder), n_blocks=len(decoder))
        self.cor_decoder = UnetDecoder(list(widths), list(decoder), n_blocks=len(decoder))
        self.sag_head = nn.Conv2d(decoder[-1], out_channels, 1)
        self.cor_head = nn.Conv2d(decoder[-1], out_channels, 1)
        for head in (self.sag_head, self.cor_head):  # heatmaps are almost all background at the start
            nn.init.constant_(head.bias, -4.0)

    def forward(self, sag, cor):
        fs = self.sag_arm(sag)
        fc = self.cor_arm(cor)
        fused = self.fuse(torch.cat([fs[-1], fc[-1]], dim=1))
        # the decoder uses its first feature only for its size: output at stride 2
        ys = self.sag_decoder([*fs[:-1], fused])
        yc = self.cor_decoder([*fc[:-1], fused])
        return self.sag_head(ys), self.cor_head(yc)


def build(config: dict) -> BtrflyNet:
    """Rebuild a net from a bundle's config."""
    from ..label import btrfly_config

    return BtrflyNet(**btrfly_config(config))


# --------------------------------------------------------------------------- training data
SIGMA_MM = 3.6  # Gaussian width of the targets
TRAIN_HEIGHT_MM = 384.0  # length of a training window along the spine


def prepare_case(case, seed: int = 0, augment3d: bool = False, preproc: int = PREPROC) -> dict:
    """Projections and target points of one training case on disk (a ``CaseFiles``) on the default grid."""
    import numpy as np

    from ..core.centroids import read_centroids
    from ..core.io import load_ct, load_mask, read_json

    img = load_ct(case.ct)
    if case.ctd is None:
        raise ValueError(f"{case.subject}: no centroid JSON")
    ctd = read_centroids(case.ctd, ref_affine=img.affine)
    mask = np.asarray(load_mask(case.mask).dataobj) if case.mask is not None else None
    variants = None
    if case.variants is not None:
        try:
            variants = read_json(case.variants)
        except Exception:  # noqa: BLE001 - an odd variants file only loses the sacrum target
            variants = None
    return prepare_arrays(np.asarray(img.dataobj, dtype=np.float32), img.affine, mask, ctd.labels,
                          ctd.to_world(img.affine), variants, case.subject, seed, augment3d=augment3d,
                          preproc=preproc)


def prepare_arrays(ct, affine, mask, labels, world, variants, subject: str, seed: int = 0,
                   spacing: float = 1.5, width: int = 128, augment3d: bool = False,
                   preproc: int = PREPROC) -> dict:
    """Projections and target points of one case from arrays.

    The box is the ground-truth mask's world box, enlarged at random by up to 15 mm
    per side, as a detector's would be. Points: ``(N, 5)`` rows of grid ``(i, a, r)``,
    the channel index of the label and a thoracic (rib-bearing) flag.

    ``augment3d`` makes the case look like a real acquisition before projecting
    (:func:`_augment_3d`): a tilted scan, a limited or cropped field of view, HU
    offsets and CT noise.
    """
    import zlib

    import numpy as np

    from .. import label as lab_mod
    from ..core import geometry

    rng = np.random.default_rng([seed, zlib.crc32(subject.encode()), int(augment3d)])
    labels = [int(x) for x in labels]
    world = np.asarray(world, dtype=np.float64).reshape(-1, 3)
    if SACRUM not in labels:
        s1 = _sacrum_point(mask, affine, labels, world, variants)
        if s1 is not None:
            labels.append(SACRUM)
            world = np.vstack([world, s1])
    if augment3d and rng.random() < 0.6:  # a tilted acquisition (or patient)
        affine, world = _tilt(affine, world, rng)
    if mask is not None and mask.any():
        lo, hi = lab_mod.box_of_mask(mask, affine)
    else:
        lo, hi = world.min(axis=0) - 20, world.max(axis=0) + 20
    lo = lo - rng.uniform(0, 15, 3)
    hi = hi + rng.uniform(0, 15, 3)
    if augment3d:
        ct, affine, lo, hi, keep = _augment_3d(ct, affine, world, lo, hi, rng, spacing, width)
        labels = [lab for lab, k in zip(labels, keep) if k]
        world = world[keep]
    view = lab_mod.projections(ct, affine, lo, hi, spacing=spacing, width=width, preproc=preproc)
    grid = geometry.world2vox(view.affine, world)
    rows = []
    for lab, (r, a, i) in zip(labels, grid):
        if lab not in PRIOR_LABELS:
            continue
        rows.append([i, a, r, N_FIXED + PRIOR_LABELS.index(lab), float(lab in THORACIC)])
    return {"sag": view.sag.astype(np.float16), "cor": view.cor.astype(np.float16),
            "points": np.array(rows, dtype=np.float32).reshape(-1, 5), "subject": subject}


def _rotation(rng, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def _tilt(affine, world, rng, max_deg: float = 15.0):
    """Rotate the whole scan (image and points) in world space about the points' centre."""
    from ..core import geometry

    R = _rotation(rng, max_deg)
    c = world.mean(axis=0)
    return geometry.rotation_about(R, c) @ np.asarray(affine, float), (world - c) @ R.T + c


def _augment_3d(ct, affine, world, lo, hi, rng, spacing: float, width: int):
    """A real-looking acquisition of a synthetic case: limited field of view, HU shifts, noise.

    * field of view: the CT array is cut along its own axes around the spine (a narrow
      sagittal slab, a cropped anterior-posterior extent, a cut at the top or bottom),
      so the spine grid reaches outside the scan there; or the cut-off part is kept as
      padding far below air, as scanners write outside the reconstruction circle;
    * HU: a scale and an offset (scanners and kernels differ);
    * noise: correlated Gaussian noise of up to about 100 HU (real scans are much
      noisier than phantoms, and a MIP picks the noise maxima).

    Returns the new CT (only the part under the spine grid), affine, box and which
    points are still in the scan.
    """
    from scipy import ndimage

    from .. import label as lab_mod
    from ..core import geometry

    ct = np.asarray(ct, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    keep = np.ones(len(world), dtype=bool)
    if rng.random() < 0.7:
        centre = geometry.world2vox(affine, world.mean(axis=0))
        sp = geometry.spacing(affine)
        # which voxel axis runs mostly along R, A and S
        dirs = np.abs(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
        start, stop = np.zeros(3, int), np.array(ct.shape)
        for world_axis, prob, reach in ((0, 0.45, (20.0, 70.0)), (1, 0.35, (45.0, 130.0))):
            ax = int(np.argmax(dirs[world_axis]))
            if rng.random() < prob:
                a, b = rng.uniform(*reach, size=2) / sp[ax]
                start[ax] = max(start[ax], int(np.floor(centre[ax] - a)))
                stop[ax] = min(stop[ax], int(np.ceil(centre[ax] + b)))
        ax = int(np.argmax(dirs[2]))
        if rng.random() < 0.3 and len(world) > 2:  # cut through the spine at one end
            vox = geometry.world2vox(affine, world)[:, ax]
            cut = rng.uniform(vox.min(), vox.max())
            if rng.random() < 0.5:
                start[ax] = max(start[ax], int(np.floor(cut)))
            else:
                stop[ax] = min(stop[ax], int(np.ceil(cut)))
        start = np.clip(start, 0, np.array(ct.shape) - 1)
        stop = np.maximum(stop, start + 1)
        if np.all(stop - start >= 8) and np.any((start > 0) | (stop < np.array(ct.shape))):
            vox = geometry.world2vox(affine, world)
            inside = np.all((vox >= start - 0.5) & (vox <= stop - 0.5), axis=1)
            if inside.sum() >= 2:
                keep = inside
                if rng.random() < 0.3:  # padding value in the array, not a smaller array
                    pad = np.full(ct.shape, True)
                    pad[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = False
                    ct = ct.copy()
                    ct[pad] = rng.choice([-1024.0, -2048.0, -3024.0, -2000.0])  # -1024: air-valued padding
                else:
                    ct = ct[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
                    affine = affine.copy()
                    affine[:3, 3] = geometry.vox2world(affine, start.astype(float))
                    clo, chi = lab_mod.ct_world_box(ct.shape, affine)
                    lo, hi = np.maximum(lo, clo), np.minimum(hi, chi)  # a detector's box stays in the scan
                    if np.any(hi - lo < 10):
                        lo, hi = np.minimum(lo, hi - 10), np.maximum(hi, lo + 10)
    ct, affine = lab_mod.crop_to_grid(ct, affine, lo, hi, spacing, width)
    ct = np.array(ct, dtype=np.float32)  # own copy
    scanned = ct > INVALID_HU
    ct[scanned] = ct[scanned] * rng.uniform(0.9, 1.1) + rng.uniform(-50, 50)
    if rng.random() < 0.8:
        sd = float(np.exp(rng.uniform(np.log(8.0), np.log(110.0))))
        noise = rng.standard_normal(ct.shape, dtype=np.float32)
        corr = rng.uniform(0.0, 1.0)
        if corr > 0.3:
            noise = ndimage.gaussian_filter(noise, corr, truncate=2.5)
            noise /= max(float(noise.std()), 1e-3)
        ct[scanned] += sd * noise[scanned]
    return ct, affine, lo, hi, keep


def _sacrum_point(mask, affine, labels, world, variants):
    """S1 body centre when the data give none: from a sacrum label, or one level below L5."""
    import numpy as np

    from ..core import geometry

    if mask is not None and (mask == SACRUM).any():
        w = geometry.vox2world(affine, np.argwhere(mask == SACRUM))
        upper = w[w[:, 2] >= np.percentile(w[:, 2], 70)]  # S1 is the top of the sacrum
        return upper.mean(axis=0)
    if not isinstance(variants, dict):
        return None
    fov = variants.get("field_of_view") or {}
    visible = {str(v).upper() for v in fov.get("visible", []) or []} | {str(fov.get("last", "")).upper()}
    if "S1" not in visible:
        return None
    lumbar = sorted((i for i, lab in enumerate(labels) if 20 <= lab <= 25), key=lambda i: labels[i])
    if len(lumbar) < 2:
        return None
    last, prev = world[lumbar[-1]], world[lumbar[-2]]
    return last + (last - prev)


class HeatmapDataset:
    """Random windows of prepared cases with Gaussian heatmap targets (torch Dataset)."""

    def __init__(self, prepared: list[dict], seed: int = 0, augment: bool = True, height: int | None = None,
                 repeats: int = 1, spacing: float = 1.5):
        self.cases = prepared
        self.seed = seed
        self.augment = augment
        self.height = height or int(round(TRAIN_HEIGHT_MM / spacing / DOWNSAMPLE) * DOWNSAMPLE)
        self.sigma_px = SIGMA_MM / (spacing * OUTPUT_STRIDE)
        self.repeats = repeats
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases) * self.repeats

    def __getitem__(self, index: int):
        import numpy as np

        from .train import worker_rng

        case = self.cases[index % len(self.cases)]
        rng = worker_rng(self.seed, self.epoch if self.augment else 0, index)
        sag = case["sag"].astype(np.float32)
        cor = case["cor"].astype(np.float32)
        pts = case["points"].copy()
        H, W = sag.shape[1], sag.shape[2]
        h = self.height
        if H > h:
            top = int(rng.integers(0, H - h + 1)) if self.augment else (H - h) // 2
            sag, cor = sag[:, top:top + h], cor[:, top:top + h]
            pts[:, 0] -= top
        elif H < h:
            sag, cor = _pad_rows(sag, h), _pad_rows(cor, h)
        if self.augment:
            sag, cor, pts = _augment(sag, cor, pts, rng)
        ts = _targets(pts[:, [0, 1]], pts[:, 3], pts[:, 4], h, W, self.sigma_px)
        tc = _targets(pts[:, [0, 2]], pts[:, 3], pts[:, 4], h, W, self.sigma_px)
        return (torch.from_numpy(np.ascontiguousarray(sag)), torch.from_numpy(np.ascontiguousarray(cor)),
                torch.from_numpy(ts), torch.from_numpy(tc))


def _unknown(img: np.ndarray) -> np.ndarray:
    """What a part of the picture outside the scan holds, per channel: version 1, air (0);
    version 2 (three channels), water in the image channels and 0 in the scanned fraction."""
    vals = np.zeros(img.shape[0], dtype=np.float32)
    if img.shape[0] == 3:
        vals[:2] = FILL
    return vals[:, None, None]


def _pad_rows(img: np.ndarray, h: int) -> np.ndarray:
    extra = np.broadcast_to(_unknown(img), (img.shape[0], h - img.shape[1], img.shape[2]))
    return np.concatenate([img, extra], axis=1)


def _augment(sag, cor, pts, rng):
    import numpy as np

    W = sag.shape[2]
    # shifts across (a detector's box is not centred exactly)
    for img, col in ((sag, 1), (cor, 2)):
        shift = int(rng.integers(-10, 11))
        fill = _unknown(img)
        img[:] = np.roll(img, shift, axis=2)
        if shift > 0:
            img[:, :, :shift] = fill
        elif shift < 0:
            img[:, :, shift:] = fill
        pts[:, col] += shift
    if rng.random() < 0.5:  # left-right mirror of the coronal view
        cor = cor[:, :, ::-1].copy()
        pts[:, 2] = W - 1 - pts[:, 2]
    for img in (sag, cor):  # contrast, brightness, noise: scanners and kernels differ
        pic = img[:2]  # not the scanned fraction
        pic *= rng.uniform(0.8, 1.2)
        pic += rng.uniform(-0.05, 0.05)
        pic += rng.normal(0, rng.uniform(0, 0.03), pic.shape).astype(np.float32)
        np.clip(pic, 0, 1.2, out=pic)
    return sag, cor, pts


def _targets(rc, channel, thoracic, h, w, sigma_px: float = 1.2):
    """(C, h/2, w/2) Gaussian targets for points at input pixel ``rc``."""
    import numpy as np

    H, Wd = h // OUTPUT_STRIDE, w // OUTPUT_STRIDE
    out = np.zeros((len(CHANNELS), H, Wd), dtype=np.float32)
    if len(rc) == 0:
        return out
    yy = np.arange(H, dtype=np.float32)[:, None]
    xx = np.arange(Wd, dtype=np.float32)[None, :]
    for (r, c), ch, th in zip(rc, channel, thoracic):
        y, x = (r - 0.5) / OUTPUT_STRIDE, (c - 0.5) / OUTPUT_STRIDE
        if not (-3 <= y <= H + 2 and -3 <= x <= Wd + 2):
            continue
        g = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma_px ** 2))
        targets = [0, int(ch)] + ([1] if th > 0.5 else [])
        for t in targets:
            np.maximum(out[t], g, out=out[t])
    return out


def heatmap_loss(logits, target):
    """Foreground-weighted squared error on sigmoid heatmaps, plus a label cross-entropy
    where a vertebra is (which makes neighbouring label channels compete)."""
    import torch.nn.functional as F

    prob = torch.sigmoid(logits)
    weight = 1.0 + 20.0 * target
    mse = (weight * (prob - target) ** 2).mean() * 10.0
    label_t = target[:, N_FIXED:]
    fg = label_t.amax(dim=1) > 0.5  # (B, H, W) near a centroid
    if fg.any():
        logit_l = logits[:, N_FIXED:].permute(0, 2, 3, 1)[fg]
        cls = label_t.permute(0, 2, 3, 1)[fg].argmax(dim=1)
        ce = F.cross_entropy(logit_l, cls)
    else:
        ce = logits.sum() * 0.0
    return mse + 0.5 * ce


def step_fn(model, batch, device):
    sag, cor, ts, tc = (x.to(device, non_blocking=True) for x in batch)
    ps, pc = model(sag, cor)
    return heatmap_loss(ps.float(), ts) + heatmap_loss(pc.float(), tc)


def val_fn(model, batch, device):
    loss = step_fn(model, batch, device)
    return {"loss": float(loss)}


# --------------------------------------------------------------------------- training
SYNTH_TRAIN_SEED = 1000  # on-the-fly training cases use seeds from here (held-out ones start at 90000)


def _prepare_one(args):
    kind, item, seed = args[:3]
    aug = bool(args[3]) if len(args) > 3 else False
    preproc = int(args[4]) if len(args) > 4 else PREPROC
    try:
        if kind == "synth":
            from ..synth import generate_case

            case = generate_case(int(item), region="random")
            ctd = case.centroids
            return prepare_arrays(np.asarray(case.ct, dtype=np.float32), case.affine, case.mask, ctd.labels,
                                  ctd.to_world(case.affine), case.variants, f"syn{int(item):05d}", seed,
                                  augment3d=aug, preproc=preproc)
        return prepare_case(item, seed, augment3d=aug, preproc=preproc)
    except Exception as exc:  # noqa: BLE001 - one unreadable case must not stop a training run
        name = item if kind == "synth" else item.subject
        return {"error": f"{name}: {type(exc).__name__}: {exc}"}


def prepare_all(jobs, workers: int = 0) -> list[dict]:
    """Prepare ``(kind, case or seed, seed[, augment3d[, preproc]])`` jobs, in parallel processes when ``workers > 1``."""
    from ..core.progress import track, warn

    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:
            out = list(track(pool.imap(_prepare_one, jobs, chunksize=2), "preparing", total=len(jobs)))
    else:
        out = [_prepare_one(j) for j in track(jobs, "preparing", total=len(jobs))]
    good = []
    for item in out:
        if "error" in item:
            warn(f"skipped {item['error']}")
        elif len(item["points"]):
            good.append(item)
    return good


def train(data_dir, out, *, minutes: float | None = 10.0, epochs: int | None = None, device: str = "auto",
          seed: int = 0, resume: bool = False, workers: int = 0, batch_size: int | None = None, lr: float = 2e-3,
          val_fraction: float = 0.1, n_synth: int = 200, warmup_steps: int = 20, real_views: int = 1,
          init=None) -> dict:
    """Train the Btrfly Net on a VerSe-layout dataset (e.g. ``verse synth`` output).

    Cases need a CT, a centroid JSON and (for the box) a vertebra mask; a variants
    JSON lets the sacrum be a target when the centroids leave it out. Without
    ``data_dir``, ``n_synth`` cases are generated on the fly (seeds from
    :data:`SYNTH_TRAIN_SEED`). Each case is projected as it is and ``real_views``
    more times through :func:`_augment_3d` (tilt, limited field of view, HU shifts,
    noise), so the net learns what real scans look like.

    ``init`` fine-tunes a bundle instead of starting from random weights: its
    architecture and input preprocessing are kept, so the result still reads the
    projections ``verse label`` makes for that bundle (use a lower ``lr``).
    """
    from ..core.errors import DataError
    from ..core.progress import info
    from .train import discover_cases, fit, load_bundle, make_loader, pick_device, split_cases

    dev = pick_device(device)
    if init is not None:
        _arch, init_config, init_state, _meta = load_bundle(init, map_location="cpu")
        model = build(init_config)
        model.load_state_dict(init_state)
    else:
        model = BtrflyNet()
    pp = model.preproc
    if dev.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if data_dir is None:
        seeds = [SYNTH_TRAIN_SEED + i for i in range(n_synth)]
        n_val = max(1, round(len(seeds) * val_fraction))
        train_jobs = [("synth", sd, seed + v, v > 0, pp) for sd in seeds[n_val:] for v in range(1 + real_views)]
        val_jobs = [("synth", sd, seed + 1 + v, v > 0, pp) for sd in seeds[:n_val] for v in range(1 + real_views)]
    else:
        cases = [c for c in discover_cases(data_dir) if c.ctd is not None]
        if len(cases) < 2:
            raise DataError("need at least two cases with centroid JSON to train", data_dir)
        train_cases, val_cases = split_cases(cases, val_fraction=val_fraction, seed=seed)
        train_jobs = [("files", c, seed + v, v > 0, pp) for c in train_cases for v in range(1 + real_views)]
        val_jobs = [("files", c, seed + 1 + v, v > 0, pp) for c in val_cases for v in range(1 + real_views)]
    info(f"preparing {len(train_jobs)} training and {len(val_jobs)} validation cases")
    prep_train = prepare_all(train_jobs, workers)
    prep_val = prepare_all(val_jobs, workers)
    if not prep_train:
        raise DataError("no usable training case", data_dir)
    if batch_size is None:
        batch_size = 32 if dev.type == "cuda" else 8
    repeats = max(1, 64 // max(1, len(prep_train)))  # short epochs on tiny sets still validate
    train_ds = HeatmapDataset(prep_train, seed=seed, augment=True, repeats=repeats)
    val_ds = HeatmapDataset(prep_val, seed=seed, augment=False)
    train_dl = make_loader(train_ds, batch_size=batch_size, shuffle=True, workers=workers, seed=seed,
                           device=dev, drop_last=len(train_ds) >= batch_size)
    val_dl = make_loader(val_ds, batch_size=batch_size, shuffle=False, workers=0, seed=seed, device=dev)
    meta = {"data": str(data_dir) if data_dir is not None else f"synth x{n_synth}", "n_train": len(prep_train), "n_val": len(prep_val),
            "spacing_mm": 1.5, "width_px": 128, "channels": list(CHANNELS), "preproc": model.preproc,
            "real_views": real_views, "init": str(init) if init is not None else None}
    return fit(model, train_dl, val_dl if len(prep_val) else None, step_fn, val_fn if len(prep_val) else None,
               out=out, epochs=epochs, minutes=minutes, lr=lr, seed=seed, resume=resume, device=dev,
               meta=meta, arch=BtrflyNet.arch, config=model.config, warmup_steps=warmup_steps)
