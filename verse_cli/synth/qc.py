"""QC picture of a case: mid-sagittal and coronal views through the spine, with the
vertebra labels overlaid, at true aspect ratio."""

from __future__ import annotations

import numpy as np

from ..core import geometry
from ..core.labels import VERSE_COLOURS


def views(ct: np.ndarray, mask: np.ndarray, affine: np.ndarray):
    """Mid-sagittal and coronal slices (display orientation) and their pixel aspects."""
    ct_r, aff = geometry.reorient(ct, affine, ("I", "P", "L"))
    m_r, _ = geometry.reorient(mask, affine, ("I", "P", "L"))
    sp = geometry.spacing(aff)
    if m_r.any():
        idx = np.argwhere(m_r > 0)
        _, cp, cl = np.median(idx, axis=0).astype(int)
    else:
        hot = np.argwhere(ct_r > 300)
        _ci, cp, cl = (np.median(hot, axis=0).astype(int) if len(hot) else np.array(ct_r.shape) // 2)
    sag = (ct_r[:, :, cl], m_r[:, :, cl], sp[0] / sp[1])
    cor = (ct_r[:, cp, :], m_r[:, cp, :], sp[0] / sp[2])
    return sag, cor


def overlay(img: np.ndarray, lab: np.ndarray, window=(-400, 1200), alpha=0.35) -> np.ndarray:
    g = np.clip((img.astype(np.float32) - window[0]) / (window[1] - window[0]), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=2)
    if lab is not None and lab.any():
        lut = np.zeros((256, 3), np.float32)
        for k, c in VERSE_COLOURS.items():
            if k < 256:
                lut[k] = np.asarray(c[:3], np.float32) / (255.0 if max(c[:3]) > 1 else 1.0)
        col = lut[lab.astype(np.uint8)]
        on = (lab > 0)[..., None]
        rgb = np.where(on, (1 - alpha) * rgb + alpha * col, rgb)
    return rgb


def qc_png(ct, mask, affine, path, title: str = "", labels: bool = True, dpi: int = 80) -> None:
    """Write the two views side by side as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.io import atomic_path

    sag, cor = views(ct, mask, affine)
    fig, axes = plt.subplots(1, 2, figsize=(8, 6), dpi=dpi)
    for ax, (img, lab, aspect), name in zip(axes, (sag, cor), ("sagittal", "coronal")):
        ax.imshow(overlay(img, lab if labels else None), aspect=aspect, interpolation="antialiased")
        ax.set_title(f"{title} {name}".strip(), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
