"""Which training samples each step sees: natural, group-balanced, core-set (pure index math).

Each sampler returns the epoch's batches as index arrays into the training data; they are
deterministic for a ``numpy.random.Generator`` state.
"""

from __future__ import annotations

import numpy as np


def natural_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled pass over ``range(n)`` in batches of ``batch_size`` (the last may be smaller)."""
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def group_balanced_batches(group: np.ndarray, num_groups: int, batch_size: int,
                           rng: np.random.Generator) -> list[np.ndarray]:
    """``ceil(N / batch_size)`` batches, each with (as nearly as possible) the same number of
    samples from every present group: a group's share is drawn from its own shuffled stream,
    which restarts (reshuffled) when exhausted, so a small group is revisited more often. The
    ``batch_size % G`` samples left over go to other groups batch after batch: a fixed share gave
    them to the same groups every batch, and a batch smaller than the group count never drew
    the lowest group ids at all (batch 2, 3 groups: [0, 1, 1] every batch).
    """
    group = np.asarray(group)
    members = [np.flatnonzero(group == g) for g in range(num_groups)]
    present = [m for m in members if len(m)]
    steps = max(1, -(-len(group) // batch_size))
    streams = [rng.permutation(m) for m in present]
    pos = [0] * len(present)
    base, extra = divmod(int(batch_size), len(present))
    batches = []
    for step in range(steps):
        share = np.full(len(present), base)
        share[(step * extra + np.arange(extra)) % len(present)] += 1  # the leftover, rotating
        parts = []
        for k, m in enumerate(present):
            need = int(share[k])
            got = []
            while need > 0:
                if pos[k] >= len(streams[k]):
                    streams[k], pos[k] = rng.permutation(m), 0
                take = streams[k][pos[k]:pos[k] + need]
                pos[k] += len(take)
                need -= len(take)
                got.append(take)
            parts.extend(got)
        batches.append(rng.permutation(np.concatenate(parts)))
    return batches


def coreset_indices(losses: np.ndarray, group: np.ndarray, num_groups: int, fraction: float,
                    min_per_group: int) -> np.ndarray:
    """The adaptive core-set: per group, the ``ceil(fraction · N_g)`` samples with the highest
    current loss, but at least ``min(min_per_group, N_g)``. Returns sorted indices."""
    keep = []
    for g in range(num_groups):
        members = np.flatnonzero(group == g)
        if not len(members):
            continue
        k = min(len(members), max(int(np.ceil(fraction * len(members))), int(min_per_group)))
        hardest = members[np.argsort(-losses[members], kind="stable")[:k]]
        keep.append(hardest)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
