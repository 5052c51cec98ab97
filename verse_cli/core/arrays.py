"""Small array helpers shared by the stages."""

from __future__ import annotations

import numpy as np


def true_runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of every run of True in a 1D array, half-open like a slice.

    >>> true_runs(np.array([0, 1, 1, 0, 1], bool))
    [(1, 3), (4, 5)]
    """
    padded = np.r_[False, np.asarray(flags, bool), False].astype(np.int8)
    edges = np.diff(padded)
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
