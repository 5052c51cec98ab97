"""verse_cli.core.arrays: runs of True, half-open like slices."""

import numpy as np
import pytest

from verse_cli.core.arrays import true_runs


@pytest.mark.parametrize("flags, runs", [
    ([], []),
    ([0, 0], []),
    ([1, 1, 1], [(0, 3)]),
    ([0, 1, 1, 0, 1], [(1, 3), (4, 5)]),
    ([1, 0, 0, 1], [(0, 1), (3, 4)]),
])
def test_true_runs(flags, runs):
    assert true_runs(np.array(flags, bool)) == runs


def test_true_runs_slice_back_to_the_runs():
    rng = np.random.default_rng(0)
    flags = rng.random(200) < 0.4
    rebuilt = np.zeros_like(flags)
    for a, b in true_runs(flags):
        assert flags[a:b].all()
        rebuilt[a:b] = True
    assert np.array_equal(rebuilt, flags)
