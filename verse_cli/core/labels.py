"""The VerSe label table, anatomical order, ITK-SNAP label files and id imports.

VerSe ids: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum, 27 coccyx, 28 T13.
T13 sits between T12 and L1 and L6 after L5 in anatomical (head to foot) order.
"""

from __future__ import annotations

import numpy as np

VERSE_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{7 + i: f"T{i}" for i in range(1, 13)},
    **{19 + i: f"L{i}" for i in range(1, 7)},
    26: "S1",
    27: "Cocc",
    28: "T13",
}
NAME_TO_ID: dict[str, int] = {v.upper(): k for k, v in VERSE_NAMES.items()}
NAME_TO_ID.update({"SACRUM": 26, "COCCYX": 27, "CO": 27})

VERSE_IDS = frozenset(VERSE_NAMES)

#: Head-to-foot order of every VerSe id.
ANATOMICAL_ORDER: tuple[int, ...] = tuple(list(range(1, 20)) + [28] + list(range(20, 26)) + [26, 27])
_RANK = {label: rank for rank, label in enumerate(ANATOMICAL_ORDER)}

REGIONS = ("C", "T", "L", "S")


def name(label: int) -> str:
    """VerSe name of an id, e.g. ``name(20) == 'L1'``."""
    try:
        return VERSE_NAMES[int(label)]
    except KeyError:
        raise ValueError(f"label {label} is not in the VerSe table") from None


def label_id(text: str | int) -> int:
    """Id from a name (``'L3'``, ``'t13'``, ``'sacrum'``) or from a numeric string."""
    if isinstance(text, (int, np.integer)):
        if int(text) not in VERSE_NAMES:
            raise ValueError(f"label {text} is not in the VerSe table")
        return int(text)
    key = str(text).strip().upper()
    if key.isdigit():
        return label_id(int(key))
    if key not in NAME_TO_ID:
        raise ValueError(f"unknown vertebra name {text!r}")
    return NAME_TO_ID[key]


def region(label: int) -> str:
    """'C', 'T', 'L' or 'S' (sacrum and coccyx)."""
    label = int(label)
    if 1 <= label <= 7:
        return "C"
    if 8 <= label <= 19 or label == 28:
        return "T"
    if 20 <= label <= 25:
        return "L"
    if label in (26, 27):
        return "S"
    raise ValueError(f"label {label} is not in the VerSe table")


def rank(label: int) -> int:
    """Position in head-to-foot order (T13 after T12, L6 after L5)."""
    return _RANK[int(label)]


def sort_anatomical(labels) -> list[int]:
    """Labels sorted head to foot."""
    return sorted((int(x) for x in labels), key=rank)


def is_vertebra(label: int) -> bool:
    """True for C1..L6 and T13 (not sacrum or coccyx)."""
    return int(label) in VERSE_NAMES and int(label) not in (26, 27)


def neighbours(label: int, present) -> tuple[int | None, int | None]:
    """The nearest present labels above and below ``label`` in anatomical order."""
    ordered = sort_anatomical(set(present) | {int(label)})
    i = ordered.index(int(label))
    above = ordered[i - 1] if i > 0 else None
    below = ordered[i + 1] if i + 1 < len(ordered) else None
    return above, below


# --------------------------------------------------------------------------- colours
def _palette() -> dict[int, tuple[int, int, int]]:
    """Distinct colours per id, cycling hues within each region like VerSe's snapshots."""
    import colorsys

    colours = {}
    for label in VERSE_NAMES:
        r = rank(label)
        hue = (r * 0.618033988749895) % 1.0
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
        colours[label] = (int(red * 255), int(green * 255), int(blue * 255))
    return colours


VERSE_COLOURS: dict[int, tuple[int, int, int]] = _palette()


def itksnap_label_text(labels=None) -> str:
    """An ITK-SNAP label description file with VerSe names and colours."""
    labels = sort_anatomical(VERSE_NAMES if labels is None else labels)
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File (verse-cli)",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "################################################",
        '    0     0    0    0        0  0  0    "Clear Label"',
    ]
    for label in labels:
        r, g, b = VERSE_COLOURS[label]
        lines.append(f'{label:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{VERSE_NAMES[label]}"')
    return "\n".join(lines) + "\n"


def write_itksnap_labels(path, labels=None) -> None:
    from .io import write_text_atomic

    write_text_atomic(path, itksnap_label_text(labels))


# --------------------------------------------------------------------------- imports
#: TotalSegmentator v2 ("total" task) vertebra class ids -> VerSe ids.
#: TS v2: 26 vertebrae_S1, 27 L5, ..., 31 L1, 32 T12, ..., 43 T1, 44 C7, ..., 50 C1.
TOTALSEG_V2_TO_VERSE: dict[int, int] = {26: 26, **{ts: 51 - ts for ts in range(27, 51)}}


def from_totalsegmentator(mask: np.ndarray) -> np.ndarray:
    """Convert a TotalSegmentator v2 mask to VerSe ids; non-vertebra classes become 0."""
    lut = np.zeros(max(256, int(mask.max()) + 1), dtype=np.uint8)
    for ts, verse in TOTALSEG_V2_TO_VERSE.items():
        lut[ts] = verse
    return lut[mask]
