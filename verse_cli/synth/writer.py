"""Writing cases in the VerSe layout, and generating many in parallel."""

from __future__ import annotations

import os
from pathlib import Path

from ..core import io
from ..core.centroids import write_centroids
from ..core.errors import UsageError
from .case import Case, generate_case


def case_paths(outdir, subject: str) -> dict[str, Path]:
    out = Path(outdir)
    stem = f"sub-{subject}"
    return {"ct": out / f"{stem}_ct.nii.gz", "mask": out / f"{stem}_seg-vert_msk.nii.gz",
            "ctd": out / f"{stem}_seg-subreg_ctd.json", "variants": out / f"{stem}_variants.json",
            "face": out / f"{stem}_face_msk.nii.gz", "rib": out / f"{stem}_seg-rib_msk.nii.gz",
            "qc": out / f"{stem}_qc.png", "dicom": out / f"{stem}_dicom"}


def write_case(case: Case, outdir, subject: str = "syn0001", qc: bool = True, dicom: bool = False,
               ribs: bool = False) -> dict[str, Path]:
    """Write a case: CT, vertebra mask, body-centroid JSON, variants JSON, the face mask
    when the face is in view, and optionally a QC PNG, a rib mask and a DICOM series.

    Every file is written atomically; returns the paths written.
    """
    paths = case_paths(outdir, subject)
    Path(outdir).mkdir(parents=True, exist_ok=True)
    io.save_ct(case.ct, case.affine, paths["ct"])
    io.save_mask(case.mask, case.affine, paths["mask"])
    write_centroids(case.centroids, paths["ctd"])
    io.write_json(case.variants, paths["variants"])
    written = {k: paths[k] for k in ("ct", "mask", "ctd", "variants")}
    if case.face_mask is not None:
        io.save_mask(case.face_mask, case.affine, paths["face"])
        written["face"] = paths["face"]
    if ribs:
        io.save_mask(case.rib_mask, case.affine, paths["rib"])
        written["rib"] = paths["rib"]
    if qc:
        from .qc import qc_png

        qc_png(case.ct, case.mask, case.affine, paths["qc"], title=f"sub-{subject}")
        written["qc"] = paths["qc"]
    if dicom:
        from .dicom_export import write_dicom_series

        write_dicom_series(case.ct, case.affine, paths["dicom"], seed=int(case.meta.get("seed", 0)))
        written["dicom"] = paths["dicom"]
    return written


def _worker_init() -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _one(args) -> str:
    seed, outdir, kw, wkw = args
    case = generate_case(seed, **kw)
    write_case(case, outdir, subject=f"syn{seed:04d}", **wkw)
    return f"sub-syn{seed:04d}"


def generate_many(outdir, n: int = 1, seed: int = 0, jobs: int = 1, region: str = "random",
                  variant: str | None = None, spacing=None, orientation: str | None = None,
                  scale: float = 1.0, max_voxels: int | None = None, qc: bool = True, dicom: bool = False,
                  ribs: bool = False) -> list[str]:
    """Generate ``n`` cases with seeds ``seed .. seed+n-1`` (subject ``sub-synNNNN``).

    ``jobs`` > 1 renders cases in worker processes; a progress bar shows on a terminal.
    """
    from ..core.progress import task
    from . import acquisition as acq
    from . import variants as V

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output exists and is not a folder: {out}")
    kw = {"region": acq.check_region(region), "variant": V.check_variant(variant),
          "spacing": acq.check_spacing(spacing), "orientation": acq.check_orientation(orientation),
          "scale": scale, "max_voxels": max_voxels}
    wkw = {"qc": qc, "dicom": dicom, "ribs": ribs}
    items = [(s, str(out), kw, wkw) for s in range(seed, seed + n)]
    done: list[str] = []
    with task(f"synth {n} case(s)", total=n) as advance:
        if jobs == 1 or n == 1:
            for it in items:
                done.append(_one(it))
                advance(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
            pool = ctx.Pool(min(jobs, n), initializer=_worker_init)
            try:
                for name in pool.imap(_one, items):
                    done.append(name)
                    advance(1)
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
    return done
