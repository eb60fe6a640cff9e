"""The Pareto sweep: the mixed-precision search at several average-bits budgets (one shared
sensitivity table), written as JSON, CSV and — with matplotlib — a PNG."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from fqexport.atomic import atomic_write
from fqexport.calibration.checks import require_labels
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.calibration.stream import DataStream, map_x
from fqexport.config import MixedPrecisionConfig, QuantConfig, check_budget
from fqexport.engine import make_engine
from fqexport.engine.base import Engine
from fqexport.errors import ConfigError
from fqexport.pipeline.compress import model_task
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.tasks.base import Task

log = logging.getLogger(__name__)

MSG_NO_BUDGETS = "pareto_sweep: budgets must be a non-empty list of stored bits per weight (e.g. [2.5, 3, 4])"
PARETO_FIELDS = ("budget", "avg_bits", "stored_bits", "weight_bytes", "worst_group", "worst_group_acc", "mean_acc",
                 "float_worst_group_acc", "float_mean_acc", "heldout_worst_loss_increase", "reused_from")


@dataclass(frozen=True)
class ParetoPoint:
    """One budget of a sweep: resources and measured accuracies of the chosen allocation."""

    budget: float
    avg_bits: float
    weight_bytes: float
    worst_group: str
    worst_group_acc: float
    mean_acc: float
    float_worst_group_acc: float
    float_mean_acc: float
    bits: dict[str, int]
    stored_bits: float = float("nan")
    heldout_worst_loss_increase: float = float("nan")
    reused_from: float | None = None  # a smaller budget whose result this point reuses

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PARETO_FIELDS} | {"bits": dict(self.bits)}


def pareto_sweep(
    model: nn.Module,
    calib: GroupData | str | Path | Any,
    budgets: Sequence[float],
    mp_config: MixedPrecisionConfig | None = None,
    base_config: QuantConfig | None = None,
    *,
    test: GroupData | DataStream | Any | None = None,
    progress: bool = True,
    task: str | Task | None = None,
) -> list[ParetoPoint]:
    """Search at each average-bits budget; accuracies on ``test`` (anything ``load_data`` takes,
    with labels; else on the held-out calibration samples, as measured for the verified held-in
    fits of the chosen allocation).

    ``mp_config`` is the template (its budget is replaced by each value of ``budgets``); the
    sensitivity table is measured once and shared, and one engine (``mp_config.engine``: its
    workers start once) runs every search's tasks. ``task``: the model's (:mod:`fqexport.tasks`;
    None: inferred as ``compress`` does); its metric is the one reported (accuracy, mAP@.5, mIoU).
    """
    if not budgets:
        raise ConfigError(MSG_NO_BUDGETS)
    for b in budgets:  # every budget checked before the first search
        check_budget("bits", b)
    template = mp_config or MixedPrecisionConfig(budget_bits=float(budgets[0]))
    data = load_data(calib)
    task = model_task(model, data, task)[0]
    if test is not None:
        test = load_data(test)
        if task.needs_annotations(test):
            require_labels(test, "pareto_sweep's test accuracy")
    with make_engine(template.engine, preload=[search_mixed_precision.__module__]) as engine:
        return _sweep(model, data, budgets, template, base_config, test, progress, engine, task)


def _sweep(model, data, budgets, template, base_config, test, progress, engine: Engine, task: Task) -> list[ParetoPoint]:
    """Budgets in increasing order; a budget whose result measured a larger held-out worst-group
    loss increase than a smaller budget's (same held-out samples: same data and seed) reuses
    that result, so more budget never returns a worse measured worst group."""
    points: list[ParetoPoint] = []
    table = None
    kept = None  # (budget, result) with the smallest held-out worst-group loss increase so far
    for b in sorted(budgets):
        mp = replace(template, budget_bits=float(b), budget_bytes=None, budget_bops=None)
        res = search_mixed_precision(model, data, mp, base_config, progress=progress, sensitivity=table,
                                     engine=engine, task=task)
        table = res.sensitivity
        reused = None
        if kept is not None and kept[1].chosen.measured_worst < res.chosen.measured_worst:
            reused, res = kept
            log.info("budget %g: the result of budget %g measured a smaller held-out worst-group loss increase; "
                     "reusing it", b, reused)
        else:
            kept = (float(b), res)
        if test is not None:
            cm = res.compressed
            reference = map_x(lambda x: cm.predict(x, quantized=False), test)
            m = replace(task.evaluate(map_x(cm.predict, test), test, reference), primary=task.search_metric)
            f = replace(task.evaluate(reference, test, reference), primary=task.search_metric)
        else:
            m, f = res.chosen.metrics, res.float_metrics
        worst, worst_acc = m.group_min()
        points.append(ParetoPoint(
            float(b), res.allocation.avg_bits, res.allocation.weight_bytes,
            worst, float(worst_acc), float(m.overall[m.primary]),
            float(f.group_min()[1]), float(f.overall[f.primary]), dict(res.allocation.bits),
            res.allocation.stored_bits, res.chosen.measured_worst, reused,
        ))
    return points


def write_pareto_json(points: Sequence[ParetoPoint], path: str | Path) -> Path:
    """The points as a JSON list (atomic write)."""
    text = json.dumps([p.to_dict() for p in points], indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_pareto_csv(points: Sequence[ParetoPoint], path: str | Path) -> Path:
    """One CSV row per point with :data:`PARETO_FIELDS` and the allocation as ``name=bits;…``."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*PARETO_FIELDS, "bits"])
            for p in points:
                w.writerow([getattr(p, k) for k in PARETO_FIELDS] + [";".join(f"{k}={v}" for k, v in p.bits.items())])

    return atomic_write(path, write)


def plot_pareto(points: Sequence[ParetoPoint], path: str | Path) -> Path | None:
    """Worst-group and mean accuracy against average bits as a PNG; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no Pareto plot")
        return None
    pts = sorted(points, key=lambda p: p.avg_bits)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([p.avg_bits for p in pts], [100 * p.worst_group_acc for p in pts], "o-", label="worst group")
    ax.plot([p.avg_bits for p in pts], [100 * p.mean_acc for p in pts], "s--", label="mean")
    if pts:
        ax.axhline(100 * pts[0].float_worst_group_acc, color="gray", lw=0.8, ls=":", label="float worst group")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("fairness-aware mixed precision: budget vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=120)

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)
