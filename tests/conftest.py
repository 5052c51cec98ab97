"""Shared fixtures: the real data folder (skipped cleanly when absent) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("VERSE_SHARED", ROOT.parent / "shared")) / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real``; tests that use it skip when the folder is absent."""
    if not REAL.is_dir():
        pytest.skip(f"real fixtures not found at {REAL}")
    return REAL


def run_verse(*args, check: bool = False, input: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the ``verse`` console entry point in a subprocess, as a user would."""
    cmd = [sys.executable, "-m", "verse_cli.cli", *[str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, cwd=cwd, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"verse {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture
def verse():
    """Call as ``verse('centroids', mask, '-o', out)``; returns the CompletedProcess."""
    return run_verse
