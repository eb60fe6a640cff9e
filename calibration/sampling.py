"""Group-balanced sampling and stratified hold-out splits (deterministic for a seed).

Each function reads only ``group``, ``group_counts()``, ``group_names`` and ``source``, so it
works alike on a :class:`GroupData` and on a :class:`~.stream.DataStream` (whose ``subset`` reads
nothing)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fqexport.errors import ConfigError

from .group_data import GroupData

logger = logging.getLogger(__name__)


def balanced_allocation(counts: np.ndarray, n: int) -> np.ndarray:
    """How many samples each group gives to a draw of ``n``: as equal as possible.

    Water filling: groups in ascending size each take ``remaining // groups_left`` (capped at
    what they have), so a small group gives all it has and the rest is spread over the
    others. Returns int64 ``[G]`` with ``sum == min(n, counts.sum())``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    take = np.zeros_like(counts)
    remaining = int(min(n, counts.sum()))
    # stable: among equal sizes the lower id comes first (and gets the smaller share)
    order = np.argsort(counts, kind="stable")
    for k, g in enumerate(order):
        share = remaining // (len(order) - k)
        take[g] = min(int(counts[g]), share)
        remaining -= int(take[g])
    return take


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise ConfigError(f"n={n!r} must be an integer >= 1 (the number of samples to draw)")
    return int(n)


def group_balanced_subset(data: Any, n: int, seed: int = 0) -> GroupData:
    """The samples :func:`group_balanced_indices` picks, in its order, in memory (of a
    :class:`~.stream.DataStream`, only these samples are read)."""
    return data.take(group_balanced_indices(data, n, seed))


def group_balanced_indices(data: GroupData, n: int, seed: int = 0) -> np.ndarray:
    """Draw up to ``n`` samples without replacement so that groups are as equal as possible.

    Each group gives ``n // G`` samples; a group with fewer gives all it has and the shortfall
    is spread over the larger groups (:func:`balanced_allocation`). The result is shuffled;
    the same data, ``n`` and ``seed`` always give the same subset in the same order.
    """
    n = _check_n(n)
    rng = np.random.default_rng(seed)
    take = balanced_allocation(data.group_counts(), n)
    picked = [
        rng.choice(np.flatnonzero(data.group == g), size=int(k), replace=False)
        for g, k in enumerate(take)
        if k > 0
    ]
    index = rng.permutation(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    if len(index) < n:
        logger.info("%s: asked for %d samples, the data has %d", data.source, n, len(index))
    logger.debug(
        "%s: balanced subset per group %s",
        data.source,
        dict(zip(data.group_names, take.tolist())),
    )
    return index


def split_holdout(data: GroupData, fraction: float, seed: int = 0) -> tuple[GroupData, GroupData]:
    """Split into ``(kept, holdout)`` stratified by group, ``holdout`` ≈ ``fraction`` of each.

    Per group of size c: ``k = round(fraction · c)`` go to the hold-out, clamped to
    ``[1, c - 1]`` when c >= 2 so each such group appears on both sides; a group with a single
    sample stays in ``kept``. Both sides keep the original sample order.
    """
    if isinstance(fraction, bool) or not (0.0 < float(fraction) < 1.0):
        raise ConfigError(f"fraction={fraction!r} must be in (0, 1) (the hold-out share)")
    rng = np.random.default_rng(seed)
    holdout_parts = []
    for g, c in enumerate(data.group_counts()):
        if c == 0:
            continue
        members = np.flatnonzero(data.group == g)
        k = int(round(float(fraction) * c))
        k = min(max(k, 1), c - 1) if c >= 2 else 0
        if c < 2:
            logger.warning(
                "%s: group %r has one sample; it stays out of the hold-out",
                data.source,
                data.group_names[g],
            )
        holdout_parts.append(rng.choice(members, size=k, replace=False))
    mask = np.zeros(len(data), dtype=bool)
    if holdout_parts:
        mask[np.concatenate(holdout_parts)] = True
    return data.subset(np.flatnonzero(~mask)), data.subset(np.flatnonzero(mask))


def stratified_folds(data: GroupData, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint index arrays (ascending), each group spread as evenly as possible over
    them (cross-fitting, like scikit-learn's ``StratifiedKFold`` on the group label).

    Every sample is in one fold, except the sample of a group that has only one: like in
    :func:`split_holdout`, it stays out of every fold (held in for every fit), so no fit misses
    its group entirely. Group by group, the shuffled members are dealt round-robin; the dealer
    carries on where the previous group stopped, so small groups do not all land in the first
    folds and the fold sizes differ by at most one.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 2:
        raise ConfigError(f"k={k!r} must be an integer >= 2 (the number of folds)")
    k = int(k)
    if k > len(data):
        raise ConfigError(f"{data.source}: {k} folds need at least {k} samples (the data has {len(data)})")
    rng = np.random.default_rng(seed)
    fold_of = np.full(len(data), -1, dtype=np.int64)
    start = 0
    for g, c in enumerate(data.group_counts()):
        if c < 2:
            if c == 1:
                logger.warning("%s: group %r has one sample; it stays out of the folds", data.source,
                               data.group_names[g])
            continue
        members = rng.permutation(np.flatnonzero(data.group == g))
        fold_of[members] = (start + np.arange(c)) % k
        start = int((start + c) % k)
        if c < k:
            logger.warning("%s: group %r has %d samples for %d folds; %d folds hold none of it out",
                           data.source, data.group_names[g], c, k, k - c)
    return [np.flatnonzero(fold_of == f) for f in range(k)]
