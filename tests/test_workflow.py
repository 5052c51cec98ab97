"""examples/Makefile and examples/Snakefile: dependency logic, reruns after corrections, kills.

The stage logic is tested elsewhere; here a fake ``verse`` (tests/data/fake_verse.py)
logs which stage ran for which subject and writes the outputs, so these tests check
only what the build files decide to run. One test kills the real CLI mid-write.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "examples" / "Makefile"
SNAKEFILE = ROOT / "examples" / "Snakefile"
FAKE = ROOT / "tests" / "data" / "fake_verse.py"
STAGES = ("anonymize", "deface", "detect", "label", "segment", "merge", "rate-variants", "snapshot")


def _source_tree(root: Path) -> None:
    """Two DICOM 'series' folders and one NIfTI; ground truth for sub-a01 only."""
    for name in ("a01", "b02"):
        (root / "src" / name / "series").mkdir(parents=True)
        (root / "src" / name / "series" / "1.dcm").write_text(f"dicom of {name}")
    (root / "src" / "c03.nii.gz").write_text("nifti of c03")
    (root / "gt" / "sub-a01").mkdir(parents=True)
    (root / "gt" / "sub-a01" / "sub-a01_seg-vert_msk.nii.gz").write_text("gt mask")
    (root / "gt" / "sub-a01" / "sub-a01_seg-vb_ctd.json").write_text("gt centroids")


def _make(root: Path, *args: str, env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAKE_VERSE_LOG": str(root / "log"), **(env_extra or {})}
    cmd = ["make", "--no-print-directory", "-f", str(MAKEFILE), f"VERSE={sys.executable} {FAKE}",
           "SRC=src", "OUT=ds", "GT=gt", *args]
    proc = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _ran(root: Path) -> list[str]:
    """The stages run since the last call (and forget them)."""
    log = root / "log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return sorted(lines)


def _age(root: Path, seconds: float = 30) -> None:
    """Push every file's and folder's mtime into the past, so a fresh touch is unambiguously newer."""
    past = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (past, past))


def _touch(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


@pytest.fixture(scope="module")
def _built_once(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("built")
    _source_tree(root)
    _make(root, "-j3")
    return root


@pytest.fixture
def built(_built_once, tmp_path) -> Path:
    """A fully built dataset (copied with its time stamps, so each test may change it)."""
    root = tmp_path / "copy"
    shutil.copytree(_built_once, root, symlinks=True)
    return root


def test_full_build_runs_each_stage_once_per_subject(built):
    ran = _ran(built)
    expected = sorted([f"{stage} sub-{s}" for stage in STAGES for s in ("a01", "b02", "c03")]
                      + ["evaluate sub-a01", "report -"])
    assert ran == expected
    d = built / "ds" / "derivatives"
    assert (d / "report.html").is_file() and (d / "sub-a01" / "sub-a01_eval.json").is_file()
    assert not (d / "sub-b02" / "sub-b02_eval.json").exists()
    assert (built / "ds" / "rawdata" / "sub-c03" / "sub-c03_desc-defaced_ct.nii.gz").is_file()


def test_second_make_runs_nothing(built):
    _ran(built)
    _make(built)
    assert _ran(built) == []
    assert _make(built, "-q", check=False).returncode == 0, "make -q must report everything up to date"


def test_corrected_centroids_rerun_only_downstream(built):
    _ran(built)
    _age(built)
    _touch(built / "ds" / "derivatives" / "sub-a01" / "sub-a01_seg-subreg_ctd.json")
    dry = _make(built, "-n").stdout
    assert " label " not in dry and " detect " not in dry and " segment " in dry
    assert _ran(built) == [], "make -n must not run anything"
    _make(built, "-j2")
    assert _ran(built) == ["evaluate sub-a01", "merge sub-a01", "rate-variants sub-a01", "report -",
                           "segment sub-a01", "snapshot sub-a01"]


def test_corrected_patch_reruns_merge_and_after(built):
    _ran(built)
    _age(built)
    _touch(built / "ds" / "derivatives" / "sub-b02" / "sub-b02_patches" / "sub-b02_L2_prob.nii.gz")
    _make(built)
    assert _ran(built) == ["merge sub-b02", "rate-variants sub-b02", "report -", "snapshot sub-b02"]


def test_corrected_mask_reruns_ratings_pictures_and_evaluation(built):
    _ran(built)
    _age(built)
    _touch(built / "ds" / "derivatives" / "sub-a01" / "sub-a01_seg-vert_msk.nii.gz")
    _make(built)
    assert _ran(built) == ["evaluate sub-a01", "rate-variants sub-a01", "report -", "snapshot sub-a01"]


def test_new_dicom_file_reanonymizes_that_subject(built):
    _ran(built)
    _age(built)
    (built / "src" / "b02" / "series" / "2.dcm").write_text("another slice")
    _make(built)
    assert [line for line in _ran(built) if "b02" not in line] == ["report -"]


def test_killed_stage_leaves_no_partial_output(tmp_path):
    """Kill ``label`` while it has half-written its output in place: make must delete it."""
    _source_tree(tmp_path)
    env = {**os.environ, "FAKE_VERSE_LOG": str(tmp_path / "log"), "FAKE_VERSE_HANG": "label"}
    target = tmp_path / "ds" / "derivatives" / "sub-a01" / "sub-a01_seg-subreg_ctd.json"
    proc = subprocess.Popen(["make", "-f", str(MAKEFILE), f"VERSE={sys.executable} {FAKE}", "SRC=src",
                             "OUT=ds", "GT=gt", str(target.relative_to(tmp_path))],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = Path(f"{target}.pid")
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), "the stage never started"
    time.sleep(0.2)
    assert 0 < target.stat().st_size, "the stage should be mid-write"
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not target.exists(), "make's .DELETE_ON_ERROR must remove the half-written file"
    assert "Deleting file" in err
    # upstream outputs are intact, and the next make resumes at the failed stage
    pid_file.unlink()
    _ran(tmp_path)
    _make(tmp_path, str(target.relative_to(tmp_path)))
    assert _ran(tmp_path) == ["label sub-a01"]
    assert target.read_text().startswith("fake label")


SLOW_WRITE = """
import sys, time
from verse_cli.core import io
def slow(path, data):
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2]); fh.flush()
            print("half", flush=True)
            time.sleep(60)
            fh.write(data[len(data) // 2:])
io.write_bytes_atomic = slow
from verse_cli.cli import main
main(sys.argv[1:])
"""


def test_killed_real_stage_leaves_no_partial_file(tmp_path):
    """The real CLI, killed (SIGTERM) while its output is half written: no file, no temp file."""
    import numpy as np

    from verse_cli.core.io import save_mask

    mask = np.zeros((20, 20, 10), dtype=np.uint8)
    mask[5:15, 5:15, 2:8] = 20
    save_mask(mask, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "msk.nii.gz")
    out = tmp_path / "out" / "ctd.json"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "centroids", str(tmp_path / "msk.nii.gz"), "-o",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "half"
    assert any(out.parent.iterdir()), "a temporary file should exist mid-write"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert list(out.parent.iterdir()) == [], "neither the output nor its temporary file may remain"


# --------------------------------------------------------------------------- Snakemake
PROFILES = ROOT / "examples" / "profiles"


def _snakemake() -> str:
    exe = Path(sys.executable).parent / "snakemake"
    found = str(exe) if exe.exists() else shutil.which("snakemake")
    assert found, "snakemake is a test dependency (pip install -e '.[test]')"
    return found


def _snake(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAKE_VERSE_LOG": str(root / "log")}
    # the target comes first: --quiet takes optional values and would swallow it
    cmd = [_snakemake(), "all", "-s", str(SNAKEFILE), "-d", str(root), *args, "--config",
           f"verse={sys.executable} {FAKE}", "src=src", "out=ds", "gt=gt"]
    proc = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_snakemake_dry_run_plans_every_stage(tmp_path):
    _source_tree(tmp_path)
    text = _snake(tmp_path, "-n").stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", text, flags=re.MULTILINE))
    assert counts == {"anonymize": "3", "deface": "3", "detect": "3", "label": "3", "segment": "3", "merge": "3",
                      "rate_variants": "3", "snapshot": "3", "evaluate": "1", "report": "1", "all": "1",
                      "total": "27"}
    assert _ran(tmp_path) == [] and not (tmp_path / "ds").exists()


def test_slurm_profile_sets_partitions_and_logs(tmp_path):
    """The SLURM profile, applied in a dry run (the slurm executor plugin is not needed for that)."""
    _source_tree(tmp_path)
    proc = _snake(tmp_path, "--profile", str(PROFILES / "slurm"), "--executor", "dryrun")
    text = proc.stdout + proc.stderr
    jobs = {m.group(1): m.group(0) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)+", text)}
    assert "slurm_partition=gpu" in jobs["segment"] and "gpu=1" in jobs["segment"]
    assert "slurm_partition=cpu" in jobs["snapshot"] and "mem_mb=16000" in jobs["rate_variants"]
    assert "log: ds/logs/label/sub-" in jobs["label"]


@pytest.mark.slow
def test_snakemake_builds_two_subjects_and_reruns_downstream(tmp_path):
    _source_tree(tmp_path)
    (tmp_path / "src" / "c03.nii.gz").unlink()  # two subjects
    profile = ("--profile", str(PROFILES / "local"), "--quiet")
    _snake(tmp_path, *profile)
    assert _ran(tmp_path) == sorted([f"{stage} sub-{s}" for stage in STAGES for s in ("a01", "b02")]
                                    + ["evaluate sub-a01", "report -"])
    assert (tmp_path / "ds" / "logs" / "label" / "sub-a01.log").is_file()
    _snake(tmp_path, *profile)
    assert _ran(tmp_path) == [], "a second run must do nothing"
    # Snakemake compares contents of small files, so a correction must change the file, not just touch it
    ctd = tmp_path / "ds" / "derivatives" / "sub-b02" / "sub-b02_seg-subreg_ctd.json"
    ctd.write_text(ctd.read_text() + "corrected\n")
    _snake(tmp_path, *profile)
    assert _ran(tmp_path) == ["merge sub-b02", "rate-variants sub-b02", "report -", "segment sub-b02",
                              "snapshot sub-b02"]
