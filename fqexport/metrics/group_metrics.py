"""Per-group classification metrics: one object that a report, a gate and a test all read.

Modelled on fairlearn's ``MetricFrame``: ``overall``, ``by_group``, ``group_min()``,
``group_max()``, ``difference()``, ``to_dict()``. Accuracies are fractions in [0, 1] here;
reports and the CLI show percent.

Pure numpy: arrays in, numbers out (no I/O, no logging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from fqexport.errors import DataError

METRICS = ("accuracy", "loss")
MSG_NONFINITE = (
    "the logits hold NaN or Inf on {n} of the {total} samples: no accuracy or loss can be computed (argmax would "
    "count those samples as class 0); check the model"
)
MSG_LABEL_INTEGER = "group_metrics: y holds the non-integer label {value!r}; labels are class ids"
MSG_DUPLICATE_NAMES = "group_metrics: group_names {names} name a group twice; each id needs its own name"
MSG_SHAPES = (
    "group_metrics: logits must be [N, C] with C >= 1 and y, group must be [N]; "
    "got logits {logits}, y {y}, group {group}"
)
MSG_LABEL_RANGE = (
    "group_metrics: label {label} is outside the model's {num_classes} outputs "
    "(labels must be in 0..{last})"
)
MSG_GROUP_RANGE = (
    "group_metrics: group id {gid} has no name: {num_groups} group names given "
    "(ids must be in 0..{last})"
)
MSG_METRIC = "unknown metric {metric!r}: choose one of {choices}"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable ``log p_ic = l_ic - (m_i + log Σ_k exp(l_ik - m_i))`` with ``m_i = max_k l_ik``."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy ``-log p_{i, y_i}`` from raw logits, ``[N]`` float64."""
    lp = log_softmax(logits)
    return -lp[np.arange(lp.shape[0]), np.asarray(y, dtype=np.int64)]


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Top-1 agreement: fraction of samples where ``argmax a == argmax b``."""
    a = np.asarray(logits_a)
    b = np.asarray(logits_b)
    if a.shape[0] != b.shape[0] or a.ndim != 2 or b.ndim != 2:
        raise DataError(
            f"agreement: both logits must be [N, C] with the same N; got {a.shape} and {b.shape}"
        )
    if a.shape[0] == 0:
        return float("nan")
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def _rate(mask_num: np.ndarray, mask_den: np.ndarray) -> float:
    den = int(mask_den.sum())
    return float((mask_num & mask_den).sum()) / den if den else float("nan")


def _nan_range(values: list[float]) -> float | None:
    """max − min over the defined (non-NaN) values; ``None`` when fewer than one is defined."""
    v = [x for x in values if not math.isnan(x)]
    return (max(v) - min(v)) if v else None


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN and ±inf → None (JSON has neither), numpy scalars → Python."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# a group's TPR (FPR) from fewer positive (negative) samples than this is noted beside the
# equalized-odds difference: one prediction moves it by 1/n
FEW_RATE_SAMPLES = 10
# beside the equalized-odds difference, :meth:`GroupMetrics.odds_support` when it says something
MSG_ODDS_SUPPORT = " ({support}: its rate moves 1/n per prediction)"


@dataclass(frozen=True)
class GroupMetrics:
    """Metrics overall and per group: a classifier's accuracy and loss (:func:`group_metrics`),
    or another task's own (``metric_names``, e.g. mAP for a detector; ``fqexport.tasks``).

    Attributes:
        overall: ``{"count": int, "accuracy": float, "loss": float}``.
        by_group: group name -> the same keys (plus ``selection_rate``, ``tpr``, ``fpr`` for
            binary tasks). A group with no samples has count 0 and NaN metrics and is left out
            of ``group_min``/``group_max``/``difference``.
        num_classes: C, the number of model outputs.
        equalized_odds_difference: binary tasks (C == 2) only, else ``None``:
            ``max(max_g TPR_g − min_g TPR_g, max_g FPR_g − min_g FPR_g)`` with class 1 positive.
        demographic_parity_difference: binary tasks only: ``max_g P(ŷ=1|g) − min_g P(ŷ=1|g)``.
        metric_names: the metrics of each row besides ``count`` (``("accuracy", "loss")``).
        primary: the metric a worst group is judged by (``group_min()``'s default): accuracy.
    """

    overall: Mapping[str, float]
    by_group: Mapping[str, Mapping[str, float]]
    num_classes: int
    equalized_odds_difference: float | None = None
    demographic_parity_difference: float | None = None
    group_names: tuple[str, ...] = field(default=())
    metric_names: tuple[str, ...] = METRICS
    primary: str = "accuracy"

    def _check_metric(self, metric: str) -> None:
        if metric not in self.metric_names:
            raise KeyError(MSG_METRIC.format(metric=metric, choices=", ".join(self.metric_names)))

    def _defined(self, metric: str | None) -> list[tuple[str, float]]:
        metric = metric or self.primary
        self._check_metric(metric)
        return [
            (name, float(row[metric]))
            for name, row in self.by_group.items()
            if row["count"] > 0 and not math.isnan(float(row[metric]))
        ]

    def odds_support(self) -> str | None:
        """Where the equalized-odds difference rests on few samples: ``"group 'x' has 1 positive
        sample"`` for the group whose TPR or FPR comes from the fewest (under
        :data:`FEW_RATE_SAMPLES`), else None (also for a task without the two rates)."""
        if self.equalized_odds_difference is None:
            return None
        support = [(int(r[k]), g, "positive" if k == "positives" else "negative")
                   for g, r in self.by_group.items() for k in ("positives", "negatives") if int(r.get(k, 0)) > 0]
        if not support or min(support)[0] >= FEW_RATE_SAMPLES:
            return None
        n, g, kind = min(support)
        return f"group {g!r} has {n} {kind} sample{'s' if n != 1 else ''}"

    def group_min(self, metric: str | None = None) -> tuple[str, float]:
        """(group name, value) of the smallest ``metric`` (default: ``primary``) over non-empty groups."""
        rows = self._defined(metric)
        if not rows:
            return ("", float("nan"))
        return min(rows, key=lambda r: r[1])

    def tied_with_min(self, metric: str | None = None) -> tuple[str, ...]:
        """The other groups whose ``metric`` equals :meth:`group_min`'s (a tie names the first)."""
        worst, value = self.group_min(metric)
        return tuple(g for g, v in self._defined(metric) if g != worst and v == value)

    def group_max(self, metric: str | None = None) -> tuple[str, float]:
        """(group name, value) of the largest ``metric`` over non-empty groups."""
        rows = self._defined(metric)
        if not rows:
            return ("", float("nan"))
        return max(rows, key=lambda r: r[1])

    def difference(self, metric: str | None = None) -> float:
        """``max_g metric_g − min_g metric_g`` over non-empty groups (0 for a single group)."""
        rows = self._defined(metric)
        if not rows:
            return float("nan")
        values = [v for _, v in rows]
        return max(values) - min(values)

    def worst_group(self) -> tuple[str, float]:
        """The group with the lowest primary metric (accuracy: alias of ``group_min("accuracy")``)."""
        return self.group_min()

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-safe Python (NaN → None), accuracies as fractions; another task's
        metrics under their own names (``worst_group_map``, ``map_difference``, …)."""
        worst, worst_value = self.group_min()
        d: dict[str, Any] = {} if self.primary == "accuracy" else {"metric": self.primary}
        d.update({
            "num_classes": self.num_classes,
            "overall": dict(self.overall),
            "by_group": {k: dict(v) for k, v in self.by_group.items()},
            "worst_group": worst,
            "worst_group_tied_with": list(self.tied_with_min()),
            f"worst_group_{self.primary}": worst_value,
            **{f"{m}_difference": self.difference(m) for m in self.metric_names},
            "equalized_odds_difference": self.equalized_odds_difference,
            "demographic_parity_difference": self.demographic_parity_difference,
        })
        return json_safe(d)


def group_metrics(
    logits: np.ndarray,
    y: np.ndarray,
    group: np.ndarray,
    group_names: Sequence[str],
) -> GroupMetrics:
    """Count, accuracy and mean cross-entropy overall and per group from raw logits.

    accuracy_g = (1/N_g) Σ_{i∈g} [argmax_c l_ic = y_i];  loss_g = (1/N_g) Σ_{i∈g} −log softmax(l_i)_{y_i}.
    For C == 2 also the equalized-odds and demographic-parity differences (class 1 positive).
    """
    logits = np.asarray(logits)
    y = np.asarray(y)
    if y.size and np.issubdtype(y.dtype, np.floating) and not np.array_equal(y, np.round(y)):
        raise DataError(MSG_LABEL_INTEGER.format(value=y[y != np.round(y)].flat[0].item()))
    y = y.astype(np.int64, copy=False)
    group = np.asarray(group).astype(np.int64, copy=False)
    names = tuple(str(n) for n in group_names)
    if len(set(names)) != len(names):  # two ids under one name would be merged into one row
        raise DataError(MSG_DUPLICATE_NAMES.format(names=list(names)))
    if (
        logits.ndim != 2
        or logits.shape[1] < 1
        or y.shape != (logits.shape[0],)
        or group.shape != (logits.shape[0],)
    ):
        raise DataError(MSG_SHAPES.format(logits=logits.shape, y=y.shape, group=group.shape))
    n, num_classes = logits.shape
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():  # argmax would count a NaN row as class 0
        raise DataError(MSG_NONFINITE.format(n=int((~finite).sum()), total=n))
    if n and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise DataError(MSG_LABEL_RANGE.format(label=bad, num_classes=num_classes, last=num_classes - 1))
    if n and (group.min() < 0 or group.max() >= len(names)):
        bad = int(group[(group < 0) | (group >= len(names))][0])
        raise DataError(MSG_GROUP_RANGE.format(gid=bad, num_groups=len(names), last=len(names) - 1))

    pred = logits.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    correct = pred == y
    loss = cross_entropy(logits, y) if n else np.zeros(0)
    binary = num_classes == 2

    def row(mask: np.ndarray) -> dict[str, float]:
        count = int(mask.sum())
        r: dict[str, float] = {
            "count": count,
            "accuracy": float(correct[mask].mean()) if count else float("nan"),
            "loss": float(loss[mask].mean()) if count else float("nan"),
        }
        if binary:
            r["selection_rate"] = _rate(pred == 1, mask)
            r["tpr"] = _rate(pred == 1, mask & (y == 1))  # P(ŷ=1 | y=1, g)
            r["fpr"] = _rate(pred == 1, mask & (y == 0))  # P(ŷ=1 | y=0, g)
            r["positives"], r["negatives"] = int((mask & (y == 1)).sum()), int((mask & (y == 0)).sum())
        return r

    overall = row(np.ones(n, dtype=bool))
    by_group = {name: row(group == gid) for gid, name in enumerate(names)}

    eod = dpd = None
    if binary:
        rows = list(by_group.values())
        tpr_d = _nan_range([r["tpr"] for r in rows])
        fpr_d = _nan_range([r["fpr"] for r in rows])
        parts = [d for d in (tpr_d, fpr_d) if d is not None]
        eod = max(parts) if parts else None
        dpd = _nan_range([r["selection_rate"] for r in rows])
    return GroupMetrics(
        overall=overall,
        by_group=by_group,
        num_classes=int(num_classes),
        equalized_odds_difference=eod,
        demographic_parity_difference=dpd,
        group_names=names,
    )
