"""Make the synth gallery: mid-sagittal and coronal views of 8 random synthetic cases,
each beside the real verse014 CT at the same window and the same millimetre scale.

Run from the project root: ``.venv/bin/python docs/gallery/make_gallery.py [--seeds 8] [--first 7000]``.
Writes ``docs/gallery/syn-SEED.png`` and ``docs/gallery/README.md``.

Every view is resampled to ``--mm`` per pixel (linear interpolation), so one pixel is the
same distance in every panel and in every case; synthetic views taller than ``--max-mm``
are cropped around the middle of the labelled spine. The synthetic cases are rendered
with the generator's own 40 M-voxel cap (``--mvox``), i.e. at the drawn acquisition
spacing (0.3-1 mm in-plane, 0.5-3 mm between slices), coarsened only for very large fields.
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
GAP_PX = 12
#: What still gives a synthetic case away next to verse014 (kept with the pictures).
KNOWN = [
    "Still synthetic on close inspection: cancellous bone is a random mottle of 1.5-4 mm clusters",
    "drawn out along the spine (vertical striation), not a trabecular network, and lacks anatomical",
    "patterns such as the dense columns under the pedicles; in a 1 x 1 x 2 mm lumbar grid its band",
    "power matches verse014 at 1-2.5 mm (32 vs 33 HU) but is lower at 2.5-6 mm (18 vs 26 HU).",
    "Bodies no longer look hollow: in the 34 metal-free cases of 40 lumbar seeds (1 x 1 x 2 mm; core",
    "= over 3 mm inside the mask, within 12 mm of the body centroid) 4 of 236 bodies have a core",
    "median below 50 HU (was 22), none below 0 HU (was 8), the lowest case median 54 HU (was -4 HU).",
    "The arch's thick parts have a rim and a less dense core (mid-sagittal laminae and spinous",
    "processes p10/p90 267/883 HU, was 346/784, verse014 175/993),",
    "and thoracic and lumbar transverse processes keep a fatty core under a thinner cortex, though,",
    "thin as they are, they stay denser than verse014's (lumbar, median HU at 1-2 / 2-3 / 3-5 mm",
    "below the mask surface 421 / 254 / 160, was 672 / 623 / 317; verse014 242 / 135 / 48).",
    "Neighbouring spinous processes now keep an interspinous space (least gap between neighbours'",
    "midline bone behind the canal, 1 mm renders of thoracolumbar seeds 1-3: medians 4.7 / 5.3 /",
    "2.2 mm, was 0.4 / 0.4 / 0.7 mm), though a pair here and there still comes within 1 mm.",
    "Spinous processes taper from a thick lower border to a thin upper one, so a cut that grazes",
    "one shows a narrow band where a slab of even width showed a bright even sheet; still, where",
    "the patient lies rotated (the generator turns patients about the long axis, 4 degrees SD)",
    "the array's mid-sagittal slice misses the processes' midline and shows them as odd",
    "triangles. Oblique grids now tilt toward the spine, as a gantry tilt or an aligned reformat",
    "does, so the spine no longer lies across the array; the table then runs obliquely.",
    "Metal streaks lie in the slices through each screw, no longer in a box over the whole",
    "instrumented segment. The head has a vault with diploe, a skull base (clivus, posterior",
    "fossa, petrous ridges), mastoid and sphenoid air cells, nasal cavity, maxillary sinuses and",
    "orbits, but all as simple solids: no gyri or sulci, no teeth, and a smooth vault.",
    "Lungs (-840..-920 HU, dorsal gradient, mottle) carry pulmonary vessel trees from",
    "the hila and the liver portal and hepatic veins, but the trees are random, not lobar anatomy;",
    "organs keep fat planes to the wall and around the kidneys, yet remain ellipsoids. The sacrum",
    "and ilia are unions of simple solids.",
]


def _views(ct, mask, affine, mm: float, max_mm: float):
    """Mid-sagittal and coronal slices resampled to ``mm`` per pixel (rows: inferior, columns:
    posterior / left), cropped to ``max_mm`` about the labelled spine, and their centres."""
    from scipy import ndimage

    from verse_cli.core import geometry
    from verse_cli.synth.qc import views

    (sag, m_sag, _), (cor, m_cor, _) = views(ct, mask, affine)
    sp = geometry.spacing(geometry.reorient(ct, affine, ("I", "P", "L"))[1])
    out = []
    for img, lab, (si, sj) in ((sag, m_sag, (sp[0], sp[1])), (cor, m_cor, (sp[0], sp[2]))):
        img = ndimage.zoom(img.astype(np.float32), (si / mm, sj / mm), order=1)
        lab = ndimage.zoom((lab > 0).astype(np.uint8), (si / mm, sj / mm), order=0)
        out.append(_crop(img, lab, round(max_mm / mm)))
    return out


def _crop(img: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` x ``n`` pixels, centred on the labelled voxels (or the image centre)."""
    c = np.argwhere(lab).mean(0).round().astype(int) if lab.any() else np.array(img.shape) // 2
    sl = []
    for k in range(2):
        lo = int(np.clip(c[k] - n // 2, 0, max(img.shape[k] - n, 0)))
        sl.append(slice(lo, lo + n))
    return img[sl[0], sl[1]]


def _grey(img: np.ndarray) -> np.ndarray:
    return np.clip((img - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)


def mosaic(panels: list[np.ndarray]) -> np.ndarray:
    """Panels side by side, top-aligned on a black background, ``GAP_PX`` apart."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + GAP_PX * (len(panels) - 1)
    out = np.zeros((h, w), np.float32)
    x = 0
    for p in panels:
        out[: p.shape[0], x: x + p.shape[1]] = _grey(p)
        x += p.shape[1] + GAP_PX
    return out


def save_figure(path: Path, panels: list[np.ndarray], titles: list[str], suptitle: str) -> None:
    """One pixel per resampled pixel (no rescaling), with a title strip."""
    import matplotlib.pyplot as plt

    img = mosaic(panels)
    dpi = 100
    top_px = 44
    h, w = img.shape
    fig = plt.figure(figsize=(w / dpi, (h + top_px) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h / (h + top_px)))
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    ax.axis("off")
    x = 0
    for p, t in zip(panels, titles):
        fig.text((x + p.shape[1] / 2) / w, (h + 4) / (h + top_px), t, ha="center", va="bottom", fontsize=9)
        x += p.shape[1] + GAP_PX
    fig.text(0.5, 1 - 4 / (h + top_px), suptitle, ha="center", va="top", fontsize=10)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import nibabel as nib

    from verse_cli.synth import generate_case

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--first", type=int, default=7000)
    ap.add_argument("--mvox", type=float, default=40.0, help="voxel cap per case, millions (the generator's)")
    ap.add_argument("--mm", type=float, default=1.0, help="mm per pixel of every panel")
    ap.add_argument("--max-mm", type=float, default=420.0, help="crop synthetic views to this size (mm)")
    args = ap.parse_args()
    out = ROOT / "docs" / "gallery"
    real_ct = nib.load(str(REAL / "sub-verse014_ct.nii.gz"))
    real_m = nib.load(str(REAL / "sub-verse014_seg-vert_msk.nii.gz"))
    real = _views(np.asarray(real_ct.dataobj), np.asarray(real_m.dataobj), real_ct.affine, args.mm, args.max_mm)
    lines = ["# verse synth gallery", "",
             f"Mid-sagittal and coronal views (window {WINDOW[0]}..{WINDOW[1]} HU) of random synthetic cases, each",
             "beside the real VerSe CT verse014 (right pair, a lumbar crop 186 x 186 x 80 mm at 1 x 1 x 2 mm).",
             f"Every panel is drawn at the same scale, {args.mm:g} mm per pixel, so sizes compare directly;",
             f"synthetic views are cropped to at most {args.max_mm:g} mm. Cases are rendered at their drawn acquisition spacing (generator cap",
             f"{args.mvox:g} M voxels). Made with `docs/gallery/make_gallery.py`.", ""] + KNOWN + [""]
    for seed in range(args.first, args.first + args.seeds):
        case = generate_case(seed, max_voxels=int(args.mvox * 1e6))
        syn = _views(case.ct, case.mask, case.affine, args.mm, args.max_mm)
        m = case.meta
        desc = f"seed {seed}: {m['region']}, {m['plane']} {m['orientation']}, {m['kernel']} kernel"
        path = out / f"syn-{seed}.png"
        save_figure(path, [syn[0], syn[1], real[0], real[1]],
                    [f"synthetic {seed} sagittal", f"synthetic {seed} coronal", "verse014 sagittal",
                     "verse014 coronal"], desc)
        v = case.variants
        flags = ", ".join(v["enumeration"]["flags"]) or "none"
        sp = ", ".join(f"{s:.2f}" for s in m["spacing"])
        lines.append(f"## seed {seed}")
        lines.append(f"{desc}; spacing {sp} mm ({case.ct.size / 1e6:.1f} M voxels); contrast {m['contrast']};"
                     f" metal {m.get('metal', 'none')}; numbering flags {flags}; Castellvi {v['castellvi']['grade']}.")
        lines.append("")
        lines.append(f"![seed {seed}](syn-{seed}.png)")
        lines.append("")
        print(path, path.stat().st_size // 1024, "KB", flush=True)
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
