"""verse report: one offline HTML page per dataset, checked in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from verse_cli.core.io import write_json

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")


def _chromium() -> str:
    """The Debian chromium binary; CI (.ci/run) installs it and sets VERSE_REQUIRE_CHROMIUM=1."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("VERSE_REQUIRE_CHROMIUM"):
        pytest.fail("chromium is required (VERSE_REQUIRE_CHROMIUM=1) but not on PATH")
    pytest.skip("chromium not installed (apt-get install -y chromium); .ci/run installs it")


def _png(path: Path, colour) -> None:
    from matplotlib.image import imsave

    img = np.zeros((60, 160, 3), dtype=np.float32)
    img[10:50, 20:140] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, img)


def _evaluation(subject: str, dice: float) -> dict:
    rows = [{"label": 20, "name": "L1", "region": "L", "in_gt": True, "in_pred": True, "dice": dice,
             "hd_mm": 3.0, "hd95_mm": 2.0, "assd_mm": 0.5, "vol_diff_pct": 1.0, "loc_mm": 1.2, "hit": True},
            {"label": 21, "name": "L2", "region": "L", "in_gt": True, "in_pred": True, "dice": dice,
             "hd_mm": 4.0, "hd95_mm": 2.5, "assd_mm": 0.6, "vol_diff_pct": -1.0, "loc_mm": 25.0, "hit": False}]
    case = {"subject": subject, "mean_dice": dice, "binary_dice": dice, "id_rate": 0.5, "hits": 1, "n_gt": 2,
            "n_pred": 2, "loc_mm": 13.1, "mean_hd_mm": 3.5, "missed": [], "extra": [], "mislabelled": ["L2"],
            "vertebrae": rows}
    return {"mode": "case", "pred": "p.nii.gz", "gt": "g.nii.gz", "case": case}


VARIANTS = {
    "counts": {"cervical": 7, "thoracic": 13, "lumbar": 5},
    "enumeration": {"cervical": None, "thoracic": 13, "lumbar": 5, "complete": False, "flags": ["T13", "<b>x</b>"]},
    "field_of_view": {"first": "T3", "last": "S1", "visible": ["T3", "T4", "T5"], "cut": ["T2"]},
    "ribs": {"T3": {"left_mm": 210.5, "right_mm": None, "left_status": "present", "right_status": "cut"}},
    "cervical_ribs": {"left": False, "right": False, "count": 0},
    "stump_ribs": [{"vertebra": "T13", "side": "left", "length_mm": 25.0}],
    "castellvi": {"vertebra": "L5", "left": 2, "right": 0, "grade": "2a"},
}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """derivatives/ with three subjects: two evaluated (Dice 0.70 and 0.90), one with ratings only."""
    deriv = tmp_path / "ds" / "derivatives"
    for subject, dice, colour in (("sub-a01", 0.70, (1, 0, 0)), ("sub-b02", 0.90, (0, 1, 0)),
                                  ("sub-c03", None, (0, 0, 1))):
        folder = deriv / subject
        _png(folder / f"{subject}_seg-vert_snp.png", colour)
        write_json(VARIANTS, folder / f"{subject}_variants.json")
        if dice is not None:
            write_json(_evaluation(subject, dice), folder / f"{subject}_eval.json")
    # patch folders hold per-vertebra files named like subjects: they must not become subjects
    (deriv / "sub-a01" / "sub-a01_patches").mkdir()
    (deriv / "sub-a01" / "sub-a01_patches" / "sub-zz_L1.nii.gz").write_bytes(b"")
    return deriv


def _report(verse, deriv: Path, out: Path, *extra) -> str:
    proc = verse("report", deriv, "-o", out, *extra)
    assert proc.returncode == 0, proc.stderr
    return out.read_text(encoding="utf-8")


def test_page_is_offline_and_links_every_snapshot(dataset, tmp_path, verse):
    out = tmp_path / "site" / "report.html"
    page = _report(verse, dataset, out)
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must not load anything from the network"
    sources = re.findall(r'<img class="snap" src="([^"]+)"', page)
    assert len(sources) == 3
    for src in sources:
        assert not os.path.isabs(src) and (out.parent / src).is_file()
    assert page.count('<tr data-subject=') == 3 and "sub-zz" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert _report(verse, dataset, out) == page, "reruns must be identical"


def test_embedded_page_is_self_contained(dataset, tmp_path, verse):
    out = tmp_path / "one.html"
    page = _report(verse, dataset, out, "--embed")
    assert page.count('src="data:image/png;base64,') == 3


def test_chromium_renders_sorts_and_screenshots(dataset, tmp_path, verse):
    browser = _chromium()
    out = tmp_path / "site" / "report.html"
    _report(verse, dataset, out)
    url = out.resolve().as_uri() + "#sort=-mean_dice"
    base = [browser, *CHROMIUM_FLAGS, "--virtual-time-budget=3000", "--window-size=1280,2400"]

    dom = subprocess.run([*base, f"--user-data-dir={tmp_path / 'profile1'}", "--enable-logging=stderr",
                          "--dump-dom", url], check=False, capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout, "the page script did not run to its end"
    assert 'data-broken-images="0"' in dom.stdout, "an image did not load"
    assert "Uncaught" not in dom.stderr
    order = re.findall(r'<tr data-subject="([^"]+)"', dom.stdout)
    assert order == ["sub-b02", "sub-a01", "sub-c03"], "descending Dice, unevaluated last"

    shot = tmp_path / "shot.png"
    proc = subprocess.run([*base, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", url],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[:2] == (2400, 1280)
    # the green snapshot of sub-b02 is on screen
    assert np.all(np.abs(img - [0, 1, 0]) < 0.05, axis=-1).sum() > 1000


def test_missing_folder_is_one_line_error(tmp_path, verse):
    out = tmp_path / "r.html"
    proc = verse("report", tmp_path / "nope", "-o", out)
    assert proc.returncode == 1 and "nope" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not out.exists()


def test_folder_without_subjects_is_refused(tmp_path, verse):
    (tmp_path / "empty").mkdir()
    proc = verse("report", tmp_path / "empty", "-o", tmp_path / "r.html")
    assert proc.returncode == 1 and "no sub-*" in proc.stderr
    assert not (tmp_path / "r.html").exists()


def test_corrupt_json_names_the_file(dataset, tmp_path, verse):
    bad = dataset / "sub-b02" / "sub-b02_variants.json"
    bad.write_text("{not json")
    proc = verse("report", dataset, "-o", tmp_path / "r.html")
    assert proc.returncode == 1 and "sub-b02_variants.json" in proc.stderr
    assert not (tmp_path / "r.html").exists()


def test_wrong_output_suffix_is_a_usage_error(dataset, tmp_path, verse):
    proc = verse("report", dataset, "-o", tmp_path / "r.txt")
    assert proc.returncode == 2 and ".html" in proc.stderr
    assert not (tmp_path / "r.txt").exists()
