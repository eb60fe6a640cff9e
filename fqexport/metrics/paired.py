"""Paired per-group comparison of a model with its reference on the same samples.

A per-group drop acc_g(reference) − acc_g(model) is a difference of two proportions measured on
the *same* N_g samples; only the samples whose correctness changed carry information about it:

    worse_g  = #{i ∈ g : the reference is right, the model wrong}
    better_g = #{i ∈ g : the reference is wrong, the model right}
    drop_g   = (worse_g − better_g) / N_g

Under "no difference" each changed sample is equally likely to go either way, so worse_g ~
Binomial(worse_g + better_g, ½): McNemar's exact test, two-sided p = min(1, 2 · P[X ≤ min(worse_g,
better_g)]). With few samples per group, a drop the gate reads as real can be a couple of samples
(one sample moves acc_g by 100/N_g percent points): the p-value says how surprising it is.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mcnemar_exact(worse: int, better: int) -> float:
    """Two-sided exact McNemar p-value of ``worse`` against ``better`` changed samples (1.0 when none changed)."""
    n, k = int(worse) + int(better), min(int(worse), int(better))
    if n == 0:
        return 1.0
    # P[X <= k], X ~ Binomial(n, 1/2), summed in log space (n may be in the thousands)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
               for i in range(k + 1))
    return min(1.0, 2.0 * tail)


def paired_changes(model_right: np.ndarray, reference_right: np.ndarray, group: np.ndarray,
                   names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per group: ``worse``, ``better`` (the module docstring's counts), ``count`` and McNemar's ``p_value``."""
    model_right, reference_right = np.asarray(model_right, bool), np.asarray(reference_right, bool)
    group = np.asarray(group)
    out = {}
    for g, name in enumerate(names):
        at = group == g
        worse = int((reference_right & ~model_right & at).sum())
        better = int((~reference_right & model_right & at).sum())
        out[str(name)] = {"count": int(at.sum()), "worse": worse, "better": better,
                          "p_value": mcnemar_exact(worse, better)}
    return out
