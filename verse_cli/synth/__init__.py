"""``verse synth``: a synthetic spine-CT engine with full ground truth.

>>> from verse_cli.synth import generate_case, write_case
>>> case = generate_case(7, region="lumbar", scale=0.5)      # doctest: +SKIP
>>> write_case(case, "out", subject="syn0007")                # doctest: +SKIP

Modules: :mod:`.morphometry` (published dimensions), :mod:`.anatomy` (bone shape
models), :mod:`.body` (soft tissue), :mod:`.acquisition` (grid, kernel, noise, metal),
:mod:`.variants` (variants and their JSON), :mod:`.engine` (block-sparse SDF
renderer), :mod:`.case` (one case), :mod:`.writer` (files, batches),
:mod:`.dicom_export`, :mod:`.from_masks`, :mod:`.qc`.
"""

from .case import Case, generate_case
from .writer import generate_many, write_case

__all__ = ["Case", "generate_case", "generate_many", "write_case"]
