"""Tests of fqexport.metrics.group_metrics: numbers checked against hand counts and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fqexport.errors import DataError
from fqexport.metrics.group_metrics import agreement, cross_entropy, group_metrics


def _ce(logits, y):
    """Naive softmax cross-entropy (float64), for small logits only."""
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(y)), y])


def test_accuracy_loss_per_group_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((60, 4))
    y = rng.integers(0, 4, 60)
    group = rng.integers(0, 3, 60)
    gm = group_metrics(logits, y, group, ["a", "b", "c"])
    pred = logits.argmax(1)
    assert gm.overall["count"] == 60
    assert gm.overall["accuracy"] == pytest.approx(np.mean(pred == y))
    assert gm.overall["loss"] == pytest.approx(_ce(logits, y).mean(), rel=1e-12)
    for gid, name in enumerate("abc"):
        m = group == gid
        assert gm.by_group[name]["count"] == int(m.sum())
        assert gm.by_group[name]["accuracy"] == pytest.approx(np.mean(pred[m] == y[m]))
        assert gm.by_group[name]["loss"] == pytest.approx(_ce(logits[m], y[m]).mean(), rel=1e-12)
    accs = {n: gm.by_group[n]["accuracy"] for n in "abc"}
    worst = min(accs, key=accs.get)
    assert gm.group_min() == (worst, accs[worst])
    assert gm.group_max()[1] == max(accs.values())
    assert gm.difference() == pytest.approx(max(accs.values()) - min(accs.values()))
    assert gm.equalized_odds_difference is None and gm.demographic_parity_difference is None


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0], [500.0, 500.0]])
    ce = cross_entropy(logits, np.array([0, 0, 0]))
    assert ce[0] == pytest.approx(0.0, abs=1e-12)
    assert ce[1] == pytest.approx(1000.0)
    assert ce[2] == pytest.approx(math.log(2))
    assert np.isfinite(ce).all()


def test_binary_fairness_differences_by_hand():
    # group a: y=[1,1,0,0], pred=[1,0,0,0] -> TPR 0.5, FPR 0, selection 0.25
    # group b: y=[1,1,0,0], pred=[1,1,1,0] -> TPR 1.0, FPR 0.5, selection 0.75
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    pred = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    logits = np.stack([1 - pred, pred], axis=1).astype(float)
    group = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    gm = group_metrics(logits, y, group, ("a", "b"))
    assert gm.by_group["a"]["tpr"] == 0.5 and gm.by_group["b"]["fpr"] == 0.5
    assert gm.equalized_odds_difference == pytest.approx(0.5)  # max(|1-.5|, |.5-0|)
    assert gm.demographic_parity_difference == pytest.approx(0.5)  # .75 - .25
    d = gm.to_dict()
    assert d["worst_group"] == "a" and d["worst_group_accuracy"] == pytest.approx(0.75)
    assert d["by_group"]["b"]["accuracy"] == pytest.approx(0.75)
    # each rate's support: 2 positives and 2 negatives per group, fewer than FEW_RATE_SAMPLES (survey 68)
    assert (d["by_group"]["a"]["positives"], d["by_group"]["a"]["negatives"]) == (2, 2)
    assert gm.odds_support() == "group 'a' has 2 negative samples"
    many = group_metrics(np.tile(logits, (10, 1)), np.tile(y, 10), np.repeat(group, 10), ("a", "b"))
    assert many.odds_support() is None and many.by_group["b"]["positives"] == 20


def test_empty_group_is_nan_and_left_out_of_min_max():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    gm = group_metrics(logits, np.array([0, 0]), np.array([0, 0]), ("a", "empty"))
    assert gm.by_group["empty"]["count"] == 0 and math.isnan(gm.by_group["empty"]["accuracy"])
    assert gm.group_min() == ("a", 0.5)
    assert gm.difference() == 0.0
    assert gm.to_dict()["by_group"]["empty"]["accuracy"] is None


def test_agreement_counts_equal_argmax():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0], [0.0, 5.0]])
    assert agreement(a, b) == 0.75
    with pytest.raises(DataError, match="same N"):
        agreement(a, b[:3])


def test_label_and_group_out_of_range_raise():
    logits = np.zeros((2, 3))
    with pytest.raises(DataError, match="label 3 is outside the model's 3 outputs"):
        group_metrics(logits, np.array([0, 3]), np.array([0, 0]), ("a",))
    with pytest.raises(DataError, match="group id 1 has no name"):
        group_metrics(logits, np.array([0, 1]), np.array([0, 1]), ("a",))
    with pytest.raises(DataError, match="logits must be"):
        group_metrics(np.zeros(3), np.array([0, 1, 0]), np.array([0, 0, 0]), ("a",))


def test_unknown_metric_names_choices():
    gm = group_metrics(np.eye(2), np.array([0, 1]), np.array([0, 0]), ("a",))
    with pytest.raises(KeyError, match="choose one of accuracy, loss"):
        gm.difference("f1")


def test_duplicate_group_names_and_fractional_labels_are_refused():
    """["a", "a"] merged two groups into one row; y + 0.7 was truncated (survey 32)."""
    logits, y, g = np.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 2, 0]), np.array([0, 0, 1, 1])
    with pytest.raises(DataError, match=r"group_names \['a', 'a'\] name a group twice"):
        group_metrics(logits, y, g, ["a", "a"])
    with pytest.raises(DataError, match=r"y holds the non-integer label 0.7"):
        group_metrics(logits, y + 0.7, g, ["a", "b"])
    assert group_metrics(logits, y.astype(np.float32), g, ["a", "b"]).by_group["a"]["accuracy"] == 1.0


def test_a_tie_for_the_worst_group_names_every_group_in_it():
    """Two groups at the same lowest accuracy: the first was named alone, as if it were worse."""
    y = np.array([0, 1, 0, 1, 0, 1])
    logits = np.eye(2)[[0, 0, 0, 0, 0, 1]].astype(float)  # a: 1/2, b: 1/2, c: 2/2
    gm = group_metrics(logits, y, np.array([0, 0, 1, 1, 2, 2]), ("a", "b", "c"))
    assert gm.group_min() == ("a", 0.5) and gm.tied_with_min() == ("b",)
    assert gm.to_dict()["worst_group_tied_with"] == ["b"]
    assert group_metrics(logits[4:], y[4:], np.array([0, 0]), ("c",)).tied_with_min() == ()
