"""The limits of the CI gate and the result of checking one.

Units: every threshold and every :class:`CheckResult` value is in the unit of its CLI flag:
accuracies, gaps, drops and kernel deviation in **percent points**, latency in ms, size in MB
(10⁶ bytes). The measurements behind them (:mod:`fqexport.validation.validation_report`) keep
accuracies as fractions; :func:`pct` converts.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from fqexport.errors import ConfigError

log = logging.getLogger(__name__)

MSG_THRESHOLD = "threshold {name}={value!r} must be a finite number {rule}"
MSG_NEEDS_REFERENCE_FOR = "{flag} ({name}) needs a reference model: pass --reference float.onnx"
MSG_NEEDS_KERNEL = "--max-kernel-deviation (max_kernel_deviation) needs the kernel check; do not disable it"
MSG_NEEDS_LATENCY = "--max-latency-ms (max_latency_ms) needs latency measurement; do not disable it"

PCT = 100.0  # percent points per fraction
MB = 1e6  # bytes per MB
# Limits read as percent points in [0, 100] (a drop may be negative: the model better than its reference).
PERCENT_LIMITS = ("min_acc", "min_worst_group_acc", "max_acc_gap", "max_group_drop", "max_kernel_deviation",
                  "min_worst_group_map", "max_group_map_drop", "min_worst_group_miou", "max_group_miou_drop",
                  "max_map_gap", "max_miou_gap")
DROP_LIMITS = ("max_group_drop", "max_group_map_drop", "max_group_miou_drop")
# The per-group metric (fqexport.tasks) each task-specific limit reads; the others read any task's
# primary metric (max_kernel_deviation) or none.
LIMIT_METRICS = {
    "min_acc": "accuracy", "min_worst_group_acc": "accuracy", "max_acc_gap": "accuracy", "max_group_drop": "accuracy",
    "min_worst_group_map": "map", "max_group_map_drop": "map", "min_worst_group_miou": "miou",
    "max_group_miou_drop": "miou", "max_map_gap": "map", "max_miou_gap": "miou",
}


def pct(fraction: float) -> float:
    """A fraction as percent points: 0.85 → 85.0."""
    return float(fraction) * PCT


def flag(name: str) -> str:
    """CLI flag of a threshold field: ``min_worst_group_acc`` → ``--min-worst-group-acc``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Thresholds:
    """Limits of the gate; ``None`` = not checked.

    Accuracies, gaps, drops and kernel deviation are in percent points (``min_worst_group_acc=85``
    means 85 %), like the CLI flags. ``max_latency_ms`` bounds the p95 latency per batch at every
    measured batch size; ``max_size_mb`` bounds the file size (plus external data) in MB (10⁶ B).
    """

    min_acc: float | None = None
    min_worst_group_acc: float | None = None
    max_acc_gap: float | None = None
    max_group_drop: float | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    max_kernel_deviation: float | None = None
    min_worst_group_map: float | None = None
    max_group_map_drop: float | None = None
    min_worst_group_miou: float | None = None
    max_group_miou_drop: float | None = None
    max_map_gap: float | None = None
    max_miou_gap: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            # any real number (numpy's too: np.int64(85) from a config file), never a bool
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise ConfigError(MSG_THRESHOLD.format(name=f.name, value=v, rule="(or None)"))
            if f.name in PERCENT_LIMITS:
                _check_percent(f.name, float(v), v)
            elif float(v) <= 0:
                raise ConfigError(MSG_THRESHOLD.format(name=f.name, value=v, rule="> 0"))
            # a plain Python number (np.float32(85) from a config file made to_dict() unserialisable)
            object.__setattr__(self, f.name, int(v) if isinstance(v, numbers.Integral) else float(v))

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def check_measurements(t: Thresholds, *, reference: object, kernel_check: bool, latency: bool) -> None:
    """ConfigError for a threshold whose measurement is switched off or missing its input (the
    reference model a drop limit needs): checked by the CLI before any stage is imported."""
    for name in DROP_LIMITS:
        if getattr(t, name) is not None and reference is None:
            raise ConfigError(MSG_NEEDS_REFERENCE_FOR.format(flag=flag(name), name=name))
    if t.max_kernel_deviation is not None and not kernel_check:
        raise ConfigError(MSG_NEEDS_KERNEL)
    if t.max_latency_ms is not None and not latency:
        raise ConfigError(MSG_NEEDS_LATENCY)


def _check_percent(name: str, value: float, given: Any) -> None:
    """A percent-point limit lies in [0, 100] ([-100, 100] for a drop); warn when it looks like a fraction."""
    lo = -100.0 if name in DROP_LIMITS else 0.0
    if not (lo <= value <= 100.0):
        raise ConfigError(
            MSG_THRESHOLD.format(name=name, value=given, rule=f"in [{lo:g}, 100] (percent points, e.g. 85 for 85 %)")
        )
    if name.startswith("min_") and 0 < value <= 1.0:
        log.warning("%s=%g is read as %g %% (percent points), not as a fraction", name, given, given)


@dataclass(frozen=True)
class CheckResult:
    """One threshold check. ``limit`` and ``value`` in the threshold's unit (see module doc)."""

    name: str
    limit: float
    value: float
    passed: bool
    group: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["value"], float) and math.isnan(d["value"]):
            d["value"] = None
        return d
