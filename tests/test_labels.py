"""core.labels: the VerSe table, regions, anatomical order, ITK-SNAP file, TotalSegmentator import."""

from __future__ import annotations

import numpy as np
import pytest

from verse_cli.core import labels as L


def test_verse_table():
    assert [L.name(i) for i in (1, 7, 8, 19, 20, 24, 25, 26, 27, 28)] == [
        "C1", "C7", "T1", "T12", "L1", "L5", "L6", "S1", "Cocc", "T13"]
    assert len(L.VERSE_IDS) == 28
    assert L.label_id("l3") == 22 and L.label_id("T13") == 28 and L.label_id("sacrum") == 26
    assert L.label_id("20") == 20 and L.label_id(np.int64(5)) == 5
    for bad in ("X1", 0, 29):
        with pytest.raises(ValueError):
            L.label_id(bad)


def test_regions():
    assert {L.region(i) for i in range(1, 8)} == {"C"}
    assert {L.region(i) for i in [*range(8, 20), 28]} == {"T"}
    assert {L.region(i) for i in range(20, 26)} == {"L"}
    assert L.region(26) == L.region(27) == "S"
    with pytest.raises(ValueError):
        L.region(40)


def test_anatomical_order_puts_t13_after_t12_and_l6_after_l5():
    order = [L.name(i) for i in L.sort_anatomical([28, 25, 20, 19, 24, 1, 26])]
    assert order == ["C1", "T12", "T13", "L1", "L5", "L6", "S1"]
    assert list(L.ANATOMICAL_ORDER) == L.sort_anatomical(L.VERSE_IDS)
    assert L.neighbours(20, [19, 28, 21]) == (28, 21)


def test_itksnap_label_file_has_names_and_distinct_colours(tmp_path):
    L.write_itksnap_labels(tmp_path / "labels.txt")
    lines = [ln for ln in (tmp_path / "labels.txt").read_text().splitlines() if not ln.startswith("#")]
    assert lines[0].split()[0] == "0" and len(lines) == 29
    rows = {int(ln.split()[0]): ln for ln in lines[1:]}
    assert rows[28].endswith('"T13"') and rows[26].endswith('"S1"')
    colours = {tuple(int(v) for v in ln.split()[1:4]) for ln in lines[1:]}
    assert len(colours) == 28


def test_totalsegmentator_v2_import():
    ts = np.array([0, 26, 27, 31, 32, 43, 44, 50, 51, 12], dtype=np.uint8)
    assert L.from_totalsegmentator(ts).tolist() == [0, 26, 24, 20, 19, 8, 7, 1, 0, 0]
    assert L.name(L.TOTALSEG_V2_TO_VERSE[32]) == "T12"  # 32 = T12 in the real fixture's README
