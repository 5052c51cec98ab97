"""The 2.5D per-vertebra U-Net used by ``verse segment``.

The network looks at a *slab* of ``n_in`` adjacent sagittal slices of a 1 mm patch that
is centred on one vertebra's body centroid, plus two guidance channels, and predicts
the ``n_out`` centre slices of that slab: the probability that a voxel belongs to *this*
vertebra (neighbours count as background).

Why 2.5D and not 3D
-------------------
A 3D U-Net at 1 mm over a 112 x 128 x 128 mm patch costs tens of GMAC per vertebra
even with 16 base channels; on two CPU cores that is minutes for a whole spine. A 2D
``segmentation_models_pytorch.Unet`` with the light ``tu-regnetx_002`` (timm RegNetX-200MF) encoder
and a slim decoder (64-32-24-16-16 channels; 2.7 M parameters, 11 MB) runs at roughly
1-1.5 Mpixel/s on two cores, and because each pass predicts ``n_out`` = 7 slices from
``n_in`` = 11, a vertebra takes 16 passes. Against the first design (5 of 9 slices,
decoder 128-64-32-16-16) that is 2.1x less CPU per vertebra for the same encoder. Adjacent slices as channels give the net the through-plane context
it needs for thin laminae and processes. Sagittal slices are used because the
discs and endplates, which separate a vertebra from its neighbours, lie across them.

Guidance channels (after Payer et al. 2020)
-------------------------------------------
* ``heatmap``: a 2D Gaussian (sigma 8 mm) at the centroid's in-plane position. The
  patch is always centred on the given centroid, so this is the same image in every
  slab; it marks *which* vertebra to segment and gives the translation-invariant
  CNN the absolute position it otherwise lacks.
* ``lateral``: the slab's signed left-right distance from the centroid / 56 mm, so
  the net knows whether it looks at the body or at a transverse process.

HU are clipped to [-1000, 2000] and divided by 1000.
"""

from __future__ import annotations

import numpy as np

ARCH = "segment-unet25d/1"

#: Default geometry and network settings; stored in every bundle's config.
DEFAULT_CONFIG: dict = {
    "encoder": "tu-regnetx_002",
    "encoder_depth": 5,
    "decoder_channels": [64, 32, 24, 16, 16],
    "n_in": 11,
    "n_out": 7,
    # patch in mm (= voxels at 1 mm) along (left->right, posterior->anterior, inferior->superior)
    "patch_shape": [112, 128, 128],
    # continuous voxel index of the centroid inside the patch
    "centre_index": [55.5, 91.5, 79.5],
    "heatmap_sigma": 8.0,
    "hu_range": [-1000.0, 2000.0],
}


def build_model(config: dict | None = None):
    """An ``smp.Unet`` for ``config`` (missing keys take :data:`DEFAULT_CONFIG` values).

    The returned module carries ``arch`` and ``config`` attributes, which
    :func:`verse_cli.nets.train.fit` stores in the bundle.
    """
    import segmentation_models_pytorch as smp
    import torch

    class SegmentUNet(torch.nn.Module):
        """``smp.Unet`` plus the ``arch``/``config`` attributes the bundle needs."""

        def __init__(self, cfg: dict):
            super().__init__()
            self.arch = ARCH
            self.config = cfg
            self.net = smp.Unet(
                cfg["encoder"],
                encoder_weights=None,
                encoder_depth=int(cfg["encoder_depth"]),
                decoder_channels=tuple(int(c) for c in cfg["decoder_channels"]),
                in_channels=int(cfg["n_in"]) + 2,
                classes=int(cfg["n_out"]),
            )

        def forward(self, x):
            return self.net(x)

    return SegmentUNet(dict(DEFAULT_CONFIG, **(config or {})))


def guidance(cfg: dict, offsets: np.ndarray) -> np.ndarray:
    """The two guidance channels for slabs centred ``offsets`` mm lateral of the centroid.

    Returns ``(len(offsets), 2, H, W)`` float32: the in-plane Gaussian heatmap and the
    constant lateral-position channel.
    """
    _, h, w = cfg["patch_shape"]
    _, ch, cw = cfg["centre_index"]
    yy = (np.arange(h, dtype=np.float32) - ch)[:, None]
    xx = (np.arange(w, dtype=np.float32) - cw)[None, :]
    heat = np.exp(-(yy**2 + xx**2) / (2.0 * float(cfg["heatmap_sigma"]) ** 2)).astype(np.float32)
    offsets = np.asarray(offsets, dtype=np.float32).reshape(-1)
    out = np.empty((len(offsets), 2, h, w), dtype=np.float32)
    out[:, 0] = heat
    out[:, 1] = (offsets / (cfg["patch_shape"][0] / 2.0))[:, None, None]
    return out


def normalise_hu(slabs: np.ndarray, cfg: dict) -> np.ndarray:
    """HU -> network range (clip to ``hu_range``, divide by 1000), float32."""
    lo, hi = cfg["hu_range"]
    return (np.clip(slabs, lo, hi) / 1000.0).astype(np.float32, copy=False)


def network_input(slabs_hu: np.ndarray, offsets: np.ndarray, cfg: dict) -> np.ndarray:
    """Stack ``(N, n_in, H, W)`` HU slabs with their guidance channels -> ``(N, n_in + 2, H, W)``."""
    return np.concatenate([normalise_hu(slabs_hu, cfg), guidance(cfg, offsets)], axis=1)


def load_model(path, device="cpu"):
    """Rebuild a segmentation U-Net from a bundle; returns ``(model, config, meta)`` in eval mode."""
    import torch

    from ..core.errors import DataError
    from .train import load_bundle

    arch, config, state, meta = load_bundle(path, map_location="cpu")
    if arch != ARCH:
        raise DataError(f"not a segmentation model (arch {arch!r}, expected {ARCH!r})", path)
    model = build_model(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"weights do not fit the model ({str(exc).splitlines()[0][:120]})", path) from None
    # channels-last runs the convolutions ~25 % faster on CPU (oneDNN) and is harmless on CUDA
    model.to(device=device, memory_format=torch.channels_last).eval()
    return model, model.config, meta
