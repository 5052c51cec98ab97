"""``verse synth --from-masks DIR``: new CT images rendered from existing vertebra masks,
in the spirit of SynthSeg (Billot et al., Medical Image Analysis 2023): real shapes,
random deformation, random intensities, random noise and blur, so that real anatomy
feeds training without real images.

Per output case: a mask from DIR (cycled), a random smooth elastic deformation plus a
small rotation/scaling, then a CT built from the labels: a cortical shell and a
textured trabecular core per vertebra (random HU per vertebra), a joint space with a
cortex on both sides wherever two labels touch (the facet joints), discs filled between
neighbouring bodies, the spinal canal left soft, and a random soft-tissue background
(muscle/fat mixture, air outside a random body outline). The CT then passes through
the same kernel/noise model as generated cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core import io
from ..core.centroids import body_centroids, write_centroids
from ..core.errors import DataError, UsageError
from ..core.labels import VERSE_IDS


def find_masks(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--from-masks needs a folder of vertebra masks: {folder}")
    found = sorted(p for p in folder.rglob("*.nii*") if "msk" in p.name and "face" not in p.name)
    if not found:
        raise DataError("no vertebra masks (*msk*.nii[.gz]) found", folder)
    return found


def deform(mask: np.ndarray, affine: np.ndarray, rng: np.random.Generator, amp_mm: float = 3.0):
    """Nearest-neighbour warp of a label map by a smooth random field and a small affine."""
    from scipy import ndimage

    sp = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = np.array(mask.shape)
    coarse = np.maximum((shape * sp / 40.0).astype(int), 2)
    field = []
    for k in range(3):
        f = rng.normal(0, amp_mm / sp[k], tuple(coarse))
        field.append(ndimage.zoom(f, shape / coarse, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]])
    ang = np.radians(rng.normal(0, 4, 3))
    Rz = np.array([[np.cos(ang[0]), -np.sin(ang[0]), 0], [np.sin(ang[0]), np.cos(ang[0]), 0], [0, 0, 1]])
    Ry = np.array([[np.cos(ang[1]), 0, np.sin(ang[1])], [0, 1, 0], [-np.sin(ang[1]), 0, np.cos(ang[1])]])
    M = Rz @ Ry * rng.uniform(0.92, 1.08)
    c = (shape - 1) / 2
    idx = np.indices(mask.shape, dtype=np.float32).reshape(3, -1)
    src = (M @ (idx - c[:, None])) + c[:, None]
    src = src + np.stack([f.ravel() for f in field])
    out = ndimage.map_coordinates(mask, src, order=0, mode="constant", cval=0).reshape(mask.shape)
    return out.astype(mask.dtype)


def render_ct(mask: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random CT (float HU) whose bones are the labels of ``mask``."""
    from scipy import ndimage

    sp = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = mask.shape
    bone = mask > 0
    # background: muscle/fat mixture, air outside a random outline around the spine
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 8.0 / sp)
    fat_frac = rng.uniform(0.2, 0.6)
    thr = np.quantile(noise, fat_frac)
    img = np.where(noise < thr, rng.uniform(-120, -70), rng.uniform(30, 65)).astype(np.float32)
    dist = ndimage.distance_transform_edt(~bone, sampling=sp) if bone.any() else np.full(shape, 1e3, np.float32)
    if rng.random() < 0.6:
        img[dist > rng.uniform(90, 250)] = -1000.0
    # discs: soft gaps between bodies (closing of the bone union)
    closed = ndimage.binary_closing(bone, structure=np.ones((3, 3, 3)), iterations=int(rng.integers(2, 4)))
    img[closed & ~bone] = rng.uniform(60, 110)
    # bones: shell and textured core with random HU per vertebra. Where two vertebrae touch
    # (the facet joints, in VerSe masks) each gets its own cortex with a joint space between
    # them, as on real CT; a shell around the union of the bones would hide the boundary.
    joint = label_interface(mask)
    inside = ndimage.distance_transform_edt(bone & ~joint, sampling=sp)
    tex = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.8 / sp)
    tex /= max(float(tex.std()), 1e-6)
    shell_mm = max(rng.uniform(0.5, 1.5), float(sp.min()))  # at least the outer voxel layer
    trab_case = rng.uniform(55, 340)  # osteoporotic to dense, per case; a little per vertebra
    for lab in [int(v) for v in np.unique(mask) if v]:
        m = mask == lab
        trab = max(trab_case + rng.normal(0, 20), 40.0)
        cort = rng.uniform(450, 1100)
        core = trab + rng.uniform(20, 80) * tex
        img[m] = np.where(inside[m] <= shell_mm, cort, core[m])
    # the joint space: cartilage and fluid, partly volumed with the sclerotic cortex beside it
    img[joint] = rng.uniform(60, 350)
    return img


def label_interface(mask: np.ndarray) -> np.ndarray:
    """Voxels of one label that face a different non-zero label across a voxel face."""
    mask = np.asarray(mask)
    out = np.zeros(mask.shape, bool)
    for axis in range(mask.ndim):
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        a, b = mask[tuple(lo)], mask[tuple(hi)]
        touch = (a > 0) & (b > 0) & (a != b)
        # one voxel thick: mark the side with the higher label, so the seam is not doubled
        out[tuple(lo)] |= touch & (a > b)
        out[tuple(hi)] |= touch & (b > a)
    return out


def render_from_masks(mask_dir, outdir, n: int = 1, seed: int = 0, jobs: int = 1, qc: bool = True) -> list[str]:
    """Render ``n`` cases (subjects ``sub-synmNNNN``) from the masks in ``mask_dir``."""
    from ..core.progress import track
    from . import acquisition as acq

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    masks = find_masks(mask_dir)
    out = Path(outdir)
    done = []
    for i in track(range(n), description="synth from masks", total=n):
        s = seed + i
        src = masks[i % len(masks)]
        img = io.load_mask(src, allowed_labels=set(VERSE_IDS))
        affine = img.affine
        rng = np.random.default_rng(np.random.SeedSequence([s, 0xF00D]))
        lab = deform(np.asarray(img.dataobj).astype(np.uint8), affine, rng)
        hu = render_ct(lab, affine, rng)
        sp = np.sqrt((affine[:3, :3] ** 2).sum(0))
        codes = "".join(io_codes(affine))
        thick = int(np.argmax(sp))
        plane = {"S": "axial", "I": "axial", "R": "sagittal", "L": "sagittal"}.get(codes[thick], "coronal")
        grid = acq.Grid(tuple(lab.shape), affine, codes, plane, thick, 0.0)
        scanner = acq.sample_scanner(rng)
        scanner.pad_circle = False
        ct = acq.form_image(hu, grid, scanner, rng)
        subject = f"synm{s:04d}"
        paths = {"ct": out / f"sub-{subject}_ct.nii.gz", "mask": out / f"sub-{subject}_seg-vert_msk.nii.gz",
                 "ctd": out / f"sub-{subject}_seg-subreg_ctd.json"}
        out.mkdir(parents=True, exist_ok=True)
        io.save_ct(ct, affine, paths["ct"])
        io.save_mask(lab, affine, paths["mask"])
        write_centroids(body_centroids(lab, affine), paths["ctd"])
        if qc:
            from .qc import qc_png

            qc_png(ct, lab, affine, out / f"sub-{subject}_qc.png", title=f"sub-{subject} ({src.name})")
        done.append(f"sub-{subject}")
    return done


def io_codes(affine):
    from ..core.geometry import axcodes

    return axcodes(affine)
