"""Refresh the README walk-through pictures from a finished `make demo` (demo-out/).

    .venv/bin/python docs/make_pictures.py [demo-out]

Writes docs/walkthrough-<subject>.png (the pipeline's QC pictures, smaller and with a
reduced palette, so the repository stays light) and docs/walkthrough-report.png (the
report in headless Chromium).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from verse_cli.core.centroids import read_centroids
from verse_cli.core.io import load_ct, load_mask
from verse_cli.snapshot import figure_png, snapshot_figure

DOCS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")


def small_png(png: bytes, colours: int = 128) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    img.save(out, "PNG", optimize=True)
    return out.getvalue()


def subject_picture(demo: Path, subject: str) -> Path:
    raw, der = demo / "rawdata" / subject, demo / "derivatives" / subject
    ct = load_ct(raw / f"{subject}_desc-defaced_ct.nii.gz")
    mask = load_mask(der / f"{subject}_seg-vert_msk.nii.gz")
    ctd = read_centroids(der / f"{subject}_seg-subreg_ctd.json", ref_affine=ct.affine)
    fig = snapshot_figure(ct, mask, ctd, title=f"{subject}: verse pipeline output", height_in=4.0)
    out = DOCS / f"walkthrough-{subject}.png"
    out.write_bytes(small_png(figure_png(fig)))
    return out


def report_picture(demo: Path) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("chromium not found (apt-get install -y chromium)")
    out = DOCS / "walkthrough-report.png"
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        url = (demo / "derivatives" / "report.html").resolve().as_uri()
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,900",
                        "--virtual-time-budget=10000", f"--screenshot={shot}", url], check=True,
                       capture_output=True)
        out.write_bytes(small_png(shot.read_bytes(), colours=160))
    return out


def main(argv: list[str]) -> None:
    demo = Path(argv[0] if argv else "demo-out")
    subjects = sorted(p.name for p in (demo / "derivatives").glob("sub-*") if p.is_dir())
    for subject in subjects:
        print(subject_picture(demo, subject))
    print(report_picture(demo))


if __name__ == "__main__":
    main(sys.argv[1:])
