"""Slices per second of ``verse anonymize`` on a 300-slice series, beside dcm2niix.

Builds a 300-slice JPEG 2000 series in a temporary folder by replicating the 20 real
slices of ``../shared/data/real/ct-dicom-siemens`` at shifted positions (2 mm apart;
each copy gets its own SOPInstanceUID; file names are shuffled), then times:

* :func:`verse_cli.anonymize.anonymize` in this process (scan, sort, geometry checks,
  decode, HU, de-identified NIfTI and sidecar write; ``.nii.gz``);
* the same through the CLI (``verse anonymize`` in a subprocess, start-up included);
* ``dcm2niix -z y`` (the Debian package) on the same folder, when installed,
  and checks that both give the same voxels.

Run: ``.venv/bin/python bench/bench_anonymize.py [--slices 300]``
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("VERSE_SHARED", ROOT.parent / "shared")) / "data" / "real" / "ct-dicom-siemens"


def build_series(dst: Path, n_slices: int) -> None:
    """``n_slices`` slices 2 mm apart, cycling through the fixture's pixel data."""
    import pydicom

    sources = sorted(FIXTURE.iterdir())
    datasets = [pydicom.dcmread(p) for p in sources]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    z0 = float(datasets[0].ImagePositionPatient[2])
    order = np.random.default_rng(0).permutation(n_slices)
    for k in range(n_slices):
        ds = datasets[k % len(datasets)]
        x, y, _ = map(float, ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z0 + 2.0 * k]
        ds.SliceLocation = z0 + 2.0 * k
        ds.InstanceNumber = k + 1  # consistent, so dcm2niix (which sorts by it) converts it whole
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.543.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.543.0"
        ds.save_as(dst / f"IM{order[k]:05d}.dcm")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_ours(src: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) of the in-process conversion."""
    from verse_cli.anonymize import anonymize
    from verse_cli.core.progress import set_verbosity

    set_verbosity(quiet=True)
    start, cpu = time.perf_counter(), time.process_time()
    anonymize(src, out / "ours.nii.gz", sidecar=out / "ours.json", subject="bench")
    return time.perf_counter() - start, time.process_time() - cpu


def _time_child(cmd: list[str]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu


def time_cli(src: Path, out: Path) -> tuple[float, float]:
    return _time_child([sys.executable, "-m", "verse_cli.cli", "anonymize", str(src), str(out / "cli.nii.gz"), "-q"])


def time_dcm2niix(src: Path, out: Path) -> tuple[float, float] | None:
    exe = shutil.which("dcm2niix")
    if exe is None:
        return None
    return _time_child([exe, "-z", "y", "-b", "n", "-f", "d2n", "-o", str(out), str(src)])


def same_voxels(out: Path) -> str:
    import nibabel as nib

    ours = nib.load(out / "ours.nii.gz")
    theirs = list(out.glob("d2n*.nii.gz"))
    if not theirs:
        return "dcm2niix wrote no NIfTI"
    other = nib.load(theirs[0])
    if ours.shape != other.shape:
        return f"shapes differ: {ours.shape} vs {other.shape}"
    equal = np.array_equal(np.asarray(ours.dataobj), np.rint(other.get_fdata()).astype(np.int16))
    affine = np.abs(ours.affine - other.affine).max()
    return f"voxels identical: {equal}; max affine difference {affine:.2g} mm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    if not FIXTURE.is_dir():
        sys.exit(f"fixture not found: {FIXTURE}")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "series", Path(tmp) / "out"
        src.mkdir()
        out.mkdir()
        build_series(src, args.slices)
        n = args.slices
        ours = time_ours(src, out)
        cli = time_cli(src, out)
        theirs = time_dcm2niix(src, out)
        print(f"series: {n} slices of 512x512, JPEG 2000 lossless, {os.cpu_count()} CPU cores "
              f"(load average {os.getloadavg()[0]:.1f}: wall times suffer on a shared machine, CPU times less)")
        for name, (wall, cpu) in (("verse anonymize (in process)", ours), ("verse anonymize (CLI)       ", cli)):
            print(f"{name}: wall {wall:7.2f} s = {n / wall:6.1f} slices/s; CPU {cpu:7.2f} s = {n / cpu:6.1f} slices/CPU-s")
        if theirs is None:
            print("dcm2niix: not installed (apt-get install dcm2niix); no baseline ratio")
            return
        wall, cpu = theirs
        print(f"dcm2niix -z y               : wall {wall:7.2f} s = {n / wall:6.1f} slices/s; CPU {cpu:7.2f} s = "
              f"{n / cpu:6.1f} slices/CPU-s")
        print(f"ratio verse/dcm2niix slices per second (in process): wall {wall / ours[0]:.2f}, CPU {cpu / ours[1]:.2f}")
        print(same_voxels(out))


if __name__ == "__main__":
    main()
