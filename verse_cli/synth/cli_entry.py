"""Argument checking and dispatch for ``verse synth`` (kept out of ``cli.py``)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UsageError
from ..core.progress import info


def parse_spacing(text: str | None):
    if text is None:
        return None
    try:
        vals = [float(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"invalid --spacing {text!r}: give 'S' or 'SX,SY,SZ' in mm") from None
    if len(vals) not in (1, 3):
        raise UsageError(f"invalid --spacing {text!r}: give 'S' or 'SX,SY,SZ' in mm")
    return tuple(vals * 3) if len(vals) == 1 else tuple(vals)


def run_synth(outdir: Path, n: int = 1, seed: int = 0, region: str = "random", variant: str | None = None,
              spacing: str | None = None, orientation: str | None = None, scale: float = 1.0,
              size: float | None = None, from_masks: Path | None = None, dicom: bool = False,
              qc: bool = True, ribs: bool = False, jobs: int = 1) -> list[str]:
    """Validate the options, then generate (or render from masks) and report."""
    if size is not None and not (0.01 <= size <= 2000):
        raise UsageError(f"--size must lie between 0.01 and 2000 megavoxels, got {size}")
    if not (0.05 <= scale <= 4):
        raise UsageError(f"--scale must lie between 0.05 and 4, got {scale}")
    max_voxels = int(size * 1e6) if size is not None else None
    if from_masks is not None:
        from .from_masks import render_from_masks

        done = render_from_masks(from_masks, outdir, n=n, seed=seed, jobs=jobs, qc=qc)
    else:
        from .writer import generate_many

        done = generate_many(outdir, n=n, seed=seed, jobs=jobs, region=region, variant=variant,
                             spacing=parse_spacing(spacing), orientation=orientation, scale=scale,
                             max_voxels=max_voxels, qc=qc, dicom=dicom, ribs=ribs)
    info(f"wrote {len(done)} case(s) to {outdir}")
    return done
