"""The command surface: start-up cost, --version, stubs, and bad inputs for centroids/evaluate."""

from __future__ import annotations

import gzip
import json
import resource
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from verse_cli import __version__
from verse_cli.core.io import save_mask

COMMANDS = ("anonymize", "deface", "detect", "label", "segment", "merge", "evaluate", "rate-variants", "centroids")


def test_help_lists_every_command(verse):
    proc = verse("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout


def test_help_is_fast_and_imports_no_heavy_module():
    # CPU time of the child, not wall time: the shared test machine is often loaded.
    best = float("inf")
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-m", "verse_cli.cli", "--help"], capture_output=True, text=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert proc.returncode == 0
        best = min(best, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    assert best < 0.5, f"verse --help used {best:.2f} s of CPU"
    probe = ("import sys\nfrom verse_cli import cli\ntry:\n    cli.app(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'numpy', 'scipy', 'nibabel') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_version(verse):
    proc = verse("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"verse {__version__}"


def test_a_command_that_is_not_implemented_exits_2_without_output(capsys):
    import typer

    from verse_cli import cli
    from verse_cli.core.errors import NotImplementedYet

    @cli.app.command("future-stage")
    def future_stage(output: str = typer.Option("out.json", "-o")) -> None:
        raise NotImplementedYet("future-stage")

    try:
        with pytest.raises(SystemExit) as exc:
            cli.main(["future-stage"])
    finally:
        cli.app.registered_commands.pop()
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert err.out == "" and err.err.strip() == "verse: error: 'verse future-stage' is not implemented yet"


# --------------------------------------------------------------------------- bad inputs
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _good_mask(path, shape=(20, 20, 12), affine=AFFINE):
    data = np.zeros(shape, dtype=np.uint8)
    data[4:16, 4:16, 2:6] = 20
    data[4:16, 4:16, 7:11] = 21
    save_mask(data, affine, path)
    return path


def _bad_input(kind: str, tmp_path):
    """A broken input file of each kind the issue lists."""
    path = tmp_path / f"bad-{kind}.nii.gz"
    if kind == "missing":
        return tmp_path / "nowhere_msk.nii.gz"
    if kind == "not-nifti":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        raw = gzip.compress(nib.Nifti1Image(np.ones((30, 30, 30), np.uint8) * 20, AFFINE).to_bytes())
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.uint8), AFFINE), str(path))
    elif kind == "float-mask":
        data = np.zeros((8, 8, 8), np.float32)
        data[2:5, 2:5, 2:5] = 20.5
        nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    elif kind == "outside-table":
        data = np.zeros((8, 8, 8), np.uint8)
        data[2:5, 2:5, 2:5] = 99
        save_mask(data, AFFINE, path)
    return path


KINDS = ["missing", "not-nifti", "truncated", "4d", "float-mask", "outside-table"]
MESSAGES = {"missing": "no such file", "not-nifti": "not a readable NIfTI", "truncated": "truncated",
            "4d": "3D", "float-mask": "non-integer", "outside-table": "outside the VerSe table"}


def run_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``cli.main`` in this process (much cheaper than a fresh interpreter on a loaded machine)."""
    from verse_cli import cli

    code = 0
    try:
        cli.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _assert_clean_failure(proc, out, expect: str):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("verse: error:") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("kind", KINDS)
def test_centroids_bad_input(kind, tmp_path, capsys):
    bad = _bad_input(kind, tmp_path)
    out = tmp_path / "out.json"
    proc = run_in_process(capsys, "centroids", bad, "-o", out, "--markers", tmp_path / "m.nii.gz")
    _assert_clean_failure(proc, out, MESSAGES[kind])
    assert not (tmp_path / "m.nii.gz").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_bad_input(kind, tmp_path, capsys):
    bad = _bad_input(kind, tmp_path)
    good = _good_mask(tmp_path / "good_msk.nii.gz")
    out = tmp_path / "report.json"
    proc = run_in_process(capsys, "evaluate", bad, good, "-o", out, "--csv", tmp_path / "rows.csv")
    _assert_clean_failure(proc, out, MESSAGES[kind])
    assert not (tmp_path / "rows.csv").exists()


def test_evaluate_refuses_mismatched_grids(tmp_path, verse):
    a = _good_mask(tmp_path / "a_msk.nii.gz")
    b = _good_mask(tmp_path / "b_msk.nii.gz", affine=np.diag([1.0, 1.0, 1.5, 1.0]))
    out = tmp_path / "report.json"
    _assert_clean_failure(verse("evaluate", a, b, "-o", out), out, "grids differ")


@pytest.mark.parametrize("content, expect", [
    ([{"label": 20, "X": 1, "Y": 2, "Z": 3}], "no direction"),
    ([{"direction": ["P", "I", "R"]}, {"label": 77, "X": 1, "Y": 2, "Z": 3}], "outside the VerSe table"),
    ("{not json", "not valid JSON"),
])
def test_evaluate_bad_centroid_json(content, expect, tmp_path, capsys):
    mask = _good_mask(tmp_path / "a_msk.nii.gz")
    ctd = tmp_path / "ctd.json"
    ctd.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "report.json"
    proc = run_in_process(capsys, "evaluate", mask, mask, "--gt-ctd", ctd, "-o", out)
    _assert_clean_failure(proc, out, expect)


def test_evaluate_usage_errors_exit_2(tmp_path, capsys):
    mask = _good_mask(tmp_path / "a_msk.nii.gz")
    assert run_in_process(capsys, "evaluate", mask).returncode == 2
    assert run_in_process(capsys, "evaluate", "--pred-dir", tmp_path).returncode == 2
    assert run_in_process(capsys, "evaluate", mask, mask, "-o", "-", "--csv", "-").returncode == 2


def test_centroids_json_to_stdout(tmp_path, verse):
    mask = _good_mask(tmp_path / "a_msk.nii.gz")
    proc = verse("centroids", mask, "-o", "-")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data[0] == {"direction": ["R", "A", "S"]} and [e["label"] for e in data[1:]] == [20, 21]
