"""Small arrays and .npz files for the reader tests (test_npz.py, test_readers.py)."""

from __future__ import annotations

import numpy as np


def arrays(n: int = 6):
    """``(x [n, 2, 3] float64, y, group)`` with 3 classes and 2 alternating groups."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2, 3)).astype(np.float64)
    y = np.arange(n) % 3
    group = np.array([0, 1] * (n // 2))
    return x, y, group


def save(tmp_path, name="d.npz", **fields):
    """``np.savez`` of ``fields`` to ``tmp_path / name``; returns the path."""
    path = tmp_path / name
    np.savez(path, **fields)
    return path
