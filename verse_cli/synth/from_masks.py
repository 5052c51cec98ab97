"""``verse synth --from-masks``: new CT images from existing vertebra masks (placeholder
until the SynthSeg-style renderer lands)."""

from __future__ import annotations

from ..core.errors import NotImplementedYet


def render_from_masks(mask_dir, outdir, n: int = 1, seed: int = 0, jobs: int = 1, qc: bool = True):
    raise NotImplementedYet("synth --from-masks")
