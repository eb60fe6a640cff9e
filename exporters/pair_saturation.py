"""The saturation of x86-avx2's int8 kernels: which u8×s8 product pairs leave int16, and by how much.

MLAS's AVX2 kernel without VNNI (``vpmaddubsw``) adds each pair of products (k, k+1), k even, of
the stored uint8 activation and the int8 weight into an int16 with saturation to
[−32768, 32767] (ORT-NOTES.md). The emulation (:mod:`fqexport.exporters.kernel_emulation`)
adds the exact products and then Σ_pairs (sat16(p) − p) from here: only weight pairs that can
leave int16 (:class:`RiskyPairs`) are looked at, and only activation entries that a bound lets
through (:func:`hot_entries`) meet them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT16_MIN, INT16_MAX = -32768, 32767
# |x·w_a + x'·w_b| <= 255·(|w_a| + |w_b|) for uint8 x: a pair can leave int16 only when both
# weights have the same sign and |w_a| + |w_b| >= 129 (255·128 = 32640 <= 32767).
_SAFE_PAIR_SUM = 128
_CHUNK = 1 << 22  # products per temporary


@dataclass(frozen=True)
class RiskyPairs:
    """The weight pairs of ``w`` ``[M, K]`` that can leave int16 on x86-avx2: pair column j is
    weights (2j, 2j+1) of a row; a pair is risky when both have one sign and |w_a| + |w_b| >= 129.

    ``m``, ``w_even``, ``w_odd``: the risky pairs' row and weights, grouped by column (column j's
    are ``start[j]:start[j + 1]``); ``max_even`` / ``max_odd``: per column, the largest |w| of its
    risky pairs (0 where it has none) — what bounds |p| for any activation; ``first_hot``
    ``[columns, 256]``: per column and even activation a_e, the least odd activation a_o at which
    one of the column's risky pairs leaves int16 (256: none) — the exact test.
    """

    m: np.ndarray
    w_even: np.ndarray
    w_odd: np.ndarray
    start: np.ndarray
    max_even: np.ndarray
    max_odd: np.ndarray
    first_hot: np.ndarray


def risky_mask(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w_even, w_odd, risky)`` ``[M, K // 2]`` of int8 ``w`` ``[M, K]``: each pair's weights (int32)
    and whether it can leave int16 (one sign, |w_a| + |w_b| > 128)."""
    cols = w.shape[1] // 2
    we = w[:, 0 : 2 * cols : 2].astype(np.int32)
    wo = w[:, 1 : 2 * cols : 2].astype(np.int32)
    return we, wo, (np.sign(we) * np.sign(wo) > 0) & (np.abs(we) + np.abs(wo) > _SAFE_PAIR_SUM)


def risky_pairs(w: np.ndarray) -> RiskyPairs:
    """:class:`RiskyPairs` of int8 ``w`` ``[M, K]`` (K in MLAS's packed order; an odd last column
    pairs with MLAS's zero padding and cannot saturate: 255·128 < 2^15)."""
    we, wo, risky = risky_mask(w)
    cols = risky.shape[1]
    ji, mi = np.nonzero(risky.T)  # ordered by column
    we, wo = we[mi, ji], wo[mi, ji]
    max_even, max_odd = np.zeros(cols, np.float32), np.zeros(cols, np.float32)
    np.maximum.at(max_even, ji, np.abs(we).astype(np.float32))
    np.maximum.at(max_odd, ji, np.abs(wo).astype(np.float32))
    # a pair of one sign leaves int16 when a_e·|w_e| + a_o·|w_o| > L (L = 32767 above, 32768 below):
    # a_o >= floor((L − a_e·|w_e|) / |w_o|) + 1; a column's least over its pairs
    limit = np.where(we > 0, INT16_MAX, -INT16_MIN).astype(np.int32)[:, None]
    need = np.clip((limit - np.arange(256, dtype=np.int32) * np.abs(we)[:, None]) // np.abs(wo)[:, None] + 1, 0, 256)
    first_hot = np.full((cols, 256), 256, np.uint16)
    if ji.size:
        runs = np.flatnonzero(np.diff(ji, prepend=-1))  # where each column's pairs start
        first_hot[ji[runs]] = np.minimum.reduceat(need, runs, axis=0)
    return RiskyPairs(mi, we.astype(np.float32), wo.astype(np.float32), np.searchsorted(ji, np.arange(cols + 1)),
                      max_even, max_odd, first_hot)


def hot_entries(a: np.ndarray, pairs: RiskyPairs) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, columns)`` of the activation pairs that may saturate against some risky pair.

    |p| = a_e·|w_e| + a_o·|w_o| <= a_e·max_even[j] + a_o·max_odd[j]: only (row, column) entries
    where that bound leaves int16 can saturate. That needs a_e or a_o above 32767 / (2·max|w|)
    (>= 128): activations that large are rare (a few % after a ReLU), so they are found first
    and only their pairs are bounded; where they are common (an image stem) every pair is.
    """
    cols = pairs.max_even.size
    reach = max(float(pairs.max_even.max()), float(pairs.max_odd.max()))
    large = a > INT16_MAX / (2 * reach)
    if 8 * np.count_nonzero(large) >= a.size:
        bound = np.multiply(a[:, 0 : 2 * cols : 2], pairs.max_even)
        bound += np.multiply(a[:, 1 : 2 * cols : 2], pairs.max_odd)
        return np.divmod(np.flatnonzero(bound > INT16_MAX), cols)  # (flat: far faster than 2-D)
    rows, k = np.divmod(np.flatnonzero(large), a.shape[1])
    paired = k < 2 * cols  # (an odd K's last column pairs with MLAS's zero padding)
    keys = rows[paired] * cols + k[paired] // 2  # (row, pair column), ascending
    rows, columns = np.divmod(keys[np.diff(keys, prepend=-1) != 0], cols)
    bound = a[rows, 2 * columns] * pairs.max_even[columns] + a[rows, 2 * columns + 1] * pairs.max_odd[columns]
    hot = bound > INT16_MAX
    return rows[hot], columns[hot]


def pair_corrections(rows: np.ndarray, columns: np.ndarray, a_even: np.ndarray, a_odd: np.ndarray,
                      pairs: RiskyPairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, m, sat16(p) − p)`` of every risky pair of the activation pairs ``(rows, columns)``
    (values ``a_even``, ``a_odd``) whose sum p leaves int16; the same (row, m) may repeat. Entries
    where no risky pair of the column leaves int16 (``first_hot``) are dropped first."""
    hot = a_odd >= pairs.first_hot[columns, a_even.astype(np.intp)]
    rows, columns, a_even, a_odd = rows[hot], columns[hot], a_even[hot], a_odd[hot]
    out_r, out_m, out_c = [], [], []
    counts = pairs.start[columns + 1] - pairs.start[columns]
    ends = np.cumsum(counts)
    s = 0
    while s < rows.size:  # each entry meets its column's risky pairs, _CHUNK products at a time
        done = ends[s - 1] if s else 0
        e = max(s + 1, int(np.searchsorted(ends, done + _CHUNK, side="right")))
        c = counts[s:e]
        first = pairs.start[columns[s:e]] - (np.cumsum(c) - c)  # pair index = first + position in the run
        idx = np.repeat(first, c) + np.arange(int(c.sum()))
        entry = np.repeat(np.arange(s, e), c)
        p = a_even[entry] * pairs.w_even[idx] + a_odd[entry] * pairs.w_odd[idx]  # exact: |p| <= 65280
        corr = np.clip(p, INT16_MIN, INT16_MAX) - p
        nz = np.flatnonzero(corr)
        out_r.append(rows[entry[nz]])
        out_m.append(pairs.m[idx[nz]])
        out_c.append(corr[nz].astype(np.int64))
        s = e
    if not out_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_r), np.concatenate(out_m), np.concatenate(out_c)


def saturation(a: np.ndarray, pairs: RiskyPairs, m: int) -> np.ndarray:
    """Σ_pairs (sat16(p) − p) ``[rows, m]`` int64 over the risky ``pairs``; ``a`` ``[rows, K]``
    float32 holding the stored uint8 activations."""
    out = np.zeros((a.shape[0], m), dtype=np.int64)
    if pairs.m.size == 0:
        return out
    rows, columns = hot_entries(a, pairs)
    r, mm, corr = pair_corrections(rows, columns, a[rows, 2 * columns], a[rows, 2 * columns + 1], pairs)
    np.add.at(out, (r, mm), corr)
    return out


def pair_saturation_correction(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_pairs (sat16(p) − p) with p = a[:, 2j]·w[m, 2j] + a[:, 2j+1]·w[m, 2j+1]: ``[rows, M]`` int64.

    ``a`` ``[rows, K]`` stored uint8 activations, ``w`` ``[M, K]`` int8 weights, K in MLAS's
    packed order (an odd K is padded with zeros). Only weight pairs that can leave int16 are
    evaluated, so weights with |q| <= 64 cost nothing and give a zero correction.
    """
    return saturation(np.asarray(a, dtype=np.float32), risky_pairs(w), w.shape[0])
