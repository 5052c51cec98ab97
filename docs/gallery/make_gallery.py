"""Make the synth gallery: mid-sagittal and coronal views of 8 random synthetic cases,
each beside the real verse014 CT at the same window and scale.

Run from the project root: ``.venv/bin/python docs/gallery/make_gallery.py [--seeds 8] [--first 7000]``.
Writes ``docs/gallery/syn-SEED.png`` and ``docs/gallery/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real" / "verse014"
WINDOW = (-400, 1200)


def _views(ct, mask, affine):
    from verse_cli.core import geometry
    from verse_cli.synth.qc import views

    (sag, _, a_sag), (cor, _, a_cor) = views(ct, mask, affine)
    sp = geometry.spacing(geometry.reorient(ct, affine, ("I", "P", "L"))[1])
    return (sag, a_sag, sp[0] * sag.shape[0], sp[1] * sag.shape[1]), (cor, a_cor, sp[0] * cor.shape[0],
                                                                       sp[2] * cor.shape[1])


def panel(ax, view, title):
    img, _aspect, h_mm, w_mm = view
    ax.imshow(np.clip(img, *WINDOW), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1],
              extent=(0, w_mm, h_mm, 0), interpolation="antialiased")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from verse_cli.synth import generate_case

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--first", type=int, default=7000)
    ap.add_argument("--mvox", type=float, default=6.0)
    args = ap.parse_args()
    out = ROOT / "docs" / "gallery"
    real_ct = nib.load(str(REAL / "sub-verse014_ct.nii.gz"))
    real_m = nib.load(str(REAL / "sub-verse014_seg-vert_msk.nii.gz"))
    real = _views(np.asarray(real_ct.dataobj), np.asarray(real_m.dataobj), real_ct.affine)
    lines = ["# verse synth gallery", "",
             "Mid-sagittal and coronal views (window -400..1200 HU) of random synthetic cases, each beside the",
             "real VerSe CT verse014 (right pair). Made with `docs/gallery/make_gallery.py`.", ""]
    for seed in range(args.first, args.first + args.seeds):
        case = generate_case(seed, max_voxels=int(args.mvox * 1e6))
        syn = _views(case.ct, case.mask, case.affine)
        fig, axes = plt.subplots(1, 4, figsize=(11, 4.6), dpi=72)
        m = case.meta
        desc = f"seed {seed}: {m['region']}, {m['plane']} {m['orientation']}, {m['kernel']} kernel"
        panel(axes[0], syn[0], f"synthetic {seed} sagittal")
        panel(axes[1], syn[1], f"synthetic {seed} coronal")
        panel(axes[2], real[0], "verse014 sagittal")
        panel(axes[3], real[1], "verse014 coronal")
        fig.suptitle(desc, fontsize=9)
        fig.tight_layout()
        path = out / f"syn-{seed}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        v = case.variants
        flags = ", ".join(v["enumeration"]["flags"]) or "none"
        lines.append(f"## seed {seed}")
        lines.append(f"{desc}; spacing {m['spacing']} mm; contrast {m['contrast']}; metal {m.get('metal', 'none')};"
                     f" numbering flags {flags}; Castellvi {v['castellvi']['grade']}.")
        lines.append("")
        lines.append(f"![seed {seed}](syn-{seed}.png)")
        lines.append("")
        print(path, path.stat().st_size // 1024, "KB")
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
