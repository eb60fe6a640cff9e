"""The Pareto sweep: the mixed-precision search at several average-bits budgets (one shared
sensitivity table), written as JSON, CSV and — with matplotlib — a PNG.

A budget below the smallest allocation's stored bits (every free layer at its smallest width,
pinned layers at theirs: :class:`BudgetFloor`) cannot be met: the sweep skips it (no search) and
reports it as an ``"infeasible"`` point with that minimum; only when no budget can be met does it
raise, naming the minimum."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from fqexport.atomic import atomic_write
from fqexport.calibration.checks import require_labels
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import read_data
from fqexport.calibration.stream import DataStream, map_x
from fqexport.config import MixedPrecisionConfig, QuantConfig, check_budget
from fqexport.engine import make_engine
from fqexport.engine.base import Engine
from fqexport.errors import ConfigError
from fqexport.global_state import one_at_a_time
from fqexport.graph.prepare import copy_model, unwrap_model
from fqexport.metadata import FLOAT_BITS
from fqexport.pipeline.compress import check_model_on_data, example_batch, model_task
from fqexport.search.allocation import (
    HINT_INT8,
    Budget,
    LayerCost,
    budget_capacity,
    check_group_weights,
    layer_options,
    resolve_pins,
    search_pins,
)
from fqexport.search.costs import model_costs
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.search.selection import guard_value, weight_vector
from fqexport.tasks.base import Task

log = logging.getLogger(__name__)

MSG_NO_BUDGETS = "pareto_sweep: budgets must be a non-empty list of stored bits per weight (e.g. [2.5, 3, 4])"
MSG_NONE_FEASIBLE = (
    "pareto_sweep: no budget of {budgets} can be met: the smallest allocation (every free layer at {bmin} bits, "
    "pinned layers at their widths) stores {need} bits per weight, the minimum feasible budget; {fix}"
)
FIX_RAISE = "give budgets of at least {need}, add a smaller width to bit_choices or unpin layers"
MSG_SKIPPED = (
    "budget {budget:g} skipped: below the minimum feasible budget {need} stored bits per weight (every free "
    "layer at {bmin} bits, pinned layers at their widths)"
)
MSG_TEST_ABSENT = (
    "test data %s: no samples of group(s) %s of the calibration data %s: the worst-group figures of the sweep "
    "leave them out; add their test samples"
)
MSG_UNMEASURED = (
    "group(s) %s have no %s in the sweep's data (e.g. no ground-truth box): the worst-group column leaves them "
    "out, and validate fails every per-group limit for them; give them annotated samples"
)
UNLABELLED = " against the float model's outputs (the data has no labels)"
MSG_BUDGETS_KIND = "budgets={budgets!r} must be a sequence of numbers, e.g. [3.0, 4.5] (CLI: --budgets 3,4.5)"
MSG_TEMPLATE_KIND = (
    "pareto_sweep sweeps stored bits per weight, but mp_config's budget is budget_{kind}={value:g}: its budgets "
    "would be read as bits; give the template as MixedPrecisionConfig(budget_bits=...) (each budget replaces it)"
)
INFEASIBLE = "infeasible"
PARETO_FIELDS = ("budget", "avg_bits", "stored_bits", "weight_bytes", "worst_group", "worst_group_acc", "mean_acc",
                 "float_worst_group_acc", "float_mean_acc", "heldout_worst_loss_increase", "reused_from", "status",
                 "min_feasible_budget", "metric")


@dataclass(frozen=True)
class ParetoPoint:
    """One budget of a sweep: resources and measured accuracies of the chosen allocation.

    ``status``: ``"ok"``, or ``"infeasible"`` for a budget below ``min_feasible_budget`` (the
    smallest allocation's stored bits per weight; no search ran: its figures are NaN, ``None`` in
    the JSON, empty in the CSV)."""

    budget: float
    avg_bits: float
    weight_bytes: float  # every weight the file stores, float layers at 4 bytes (Allocation.file_weight_bytes)
    worst_group: str
    worst_group_acc: float
    mean_acc: float
    float_worst_group_acc: float
    float_mean_acc: float
    bits: dict[str, int]
    stored_bits: float = float("nan")
    heldout_worst_loss_increase: float = float("nan")
    reused_from: float | None = None  # a smaller budget whose result this point reuses
    status: str = "ok"
    min_feasible_budget: float | None = None
    metric: str = "accuracy"  # what the *_acc figures measure: the task's search metric (map50, miou), + UNLABELLED

    @property
    def feasible(self) -> bool:
        return self.status != INFEASIBLE

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (NaN as ``None``) and the allocation."""
        return {k: _json_value(getattr(self, k)) for k in PARETO_FIELDS} | {"bits": dict(self.bits)}


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


@dataclass(frozen=True)
class BudgetFloor:
    """The smallest allocation of a search, in stored bits: every free layer at its smallest
    width of ``bit_choices``, pinned layers at theirs, counted as the allocator counts them
    (:func:`~fqexport.search.allocation.layer_resource`, ``float_params`` at 32 bits), so that
    :meth:`feasible` says exactly whether the allocator can meet a budget."""

    mins: tuple[float, ...]  # per layer: the smallest stored bit·params of its options
    layers: tuple[LayerCost, ...]
    float_params: int
    bmin: int

    @classmethod
    def of(cls, model: nn.Module, data: GroupData | DataStream, mp: MixedPrecisionConfig,
           base: QuantConfig) -> BudgetFloor:
        """The floor of searching ``model`` with ``mp``'s widths and pins and ``base``'s storage and target."""
        layers, floats = model_costs(model, example_batch(data), base.weights)
        float_params = sum(f.params for f in floats)
        pinned = resolve_pins(search_pins(mp.pins, [l.name for l in layers], mp.pin_first_last),
                              [l.name for l in layers], floats)
        _, resources = layer_options(layers, mp.bit_choices, pinned, "bits", base.storage, base.target)
        mins = tuple(min(r) for r in resources)
        return cls(mins, tuple(layers), int(float_params), min(mp.bit_choices))

    def feasible(self, budget: float) -> bool:
        """Whether the allocator can meet ``budget`` stored bits per weight (its capacity holds
        the smallest allocation)."""
        return budget_capacity(self.layers, Budget("bits", float(budget), self.float_params)) - sum(self.mins) >= 0

    @property
    def value(self) -> float:
        """The minimum feasible budget in stored bits per weight, rounded up to 4 decimals (that
        budget is feasible)."""
        params = sum(l.params for l in self.layers) + self.float_params
        exact = (sum(self.mins) + FLOAT_BITS * self.float_params) / max(params, 1)
        return math.ceil(exact * 1e4 * (1 + 1e-12)) / 1e4


@one_at_a_time
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

    A budget below the minimum feasible one (:class:`BudgetFloor`) is not searched: its point has
    ``status="infeasible"`` and the ``min_feasible_budget`` (every point carries it); ConfigError,
    naming the minimum, when no budget is feasible.
    """
    if isinstance(budgets, (str, bytes)):  # "3,4" would be read digit by digit
        raise ConfigError(MSG_BUDGETS_KIND.format(budgets=budgets))
    if mp_config is not None and mp_config.budget_kind != "bits":
        raise ConfigError(MSG_TEMPLATE_KIND.format(kind=mp_config.budget_kind, value=mp_config.budget_value))
    budgets = [check_budget("bits", b) for b in budgets]  # every budget checked before the first search
    if not budgets:
        raise ConfigError(MSG_NO_BUDGETS)
    template = mp_config or MixedPrecisionConfig(budget_bits=float(budgets[0]))
    data = read_data(calib)
    check_group_weights(template.group_weights, data.group_names)
    task = model_task(model, data, task)[0]
    if test is not None:  # checked like the calibration data, before the first search
        test = read_data(test)
        if task.needs_annotations(test):
            require_labels(test, "pareto_sweep's test accuracy")
        # on a copy in eval mode: the user's model left in train mode would move its BatchNorm statistics
        task.check_annotations(test, check_model_on_data(copy_model(unwrap_model(model)).eval(), test, task))
        present = {g for g, k in zip(test.group_names, test.group_counts()) if k > 0}
        absent = [g for g in data.group_names if g not in present]
        if absent and present & set(data.group_names):
            log.warning(MSG_TEST_ABSENT, test.source, ", ".join(map(repr, absent)), data.source)
    with make_engine(template.engine, preload=[search_mixed_precision.__module__], sent=(model, calib)) as engine:
        return _sweep(model, data, budgets, template, base_config, test, progress, engine, task)


def _sweep(model, data, budgets, template, base_config, test, progress, engine: Engine, task: Task) -> list[ParetoPoint]:
    """Budgets in increasing order; one below the minimum feasible budget is skipped and reported
    (ConfigError when all are); a budget whose result measured worse by the objective than a
    smaller budget's (same held-out samples: same data and seed; worst-group: a larger held-out
    worst-group loss increase; mean / weighted: a lower (weighted) accuracy) reuses that result,
    so more budget never returns a worse measured result (the ``--test`` figures are measured
    afterwards and may still dip)."""
    floor = BudgetFloor.of(model, data, template, base_config or QuantConfig())
    need = f"{floor.value:g}"
    said: tuple[str, ...] = ()
    metric = task.search_metric
    if test is None and data.y is None and getattr(data, "annotations", None) is None:
        metric += UNLABELLED  # the search distils: its figures compare with the float model's outputs
    if not any(floor.feasible(b) for b in budgets):
        storage = (base_config or QuantConfig()).storage
        fix = FIX_RAISE.format(need=need)
        raise ConfigError(MSG_NONE_FEASIBLE.format(budgets=", ".join(f"{b:g}" for b in sorted(budgets)),
                                                   bmin=floor.bmin, need=need, fix=fix)
                          + (HINT_INT8 if storage == "int8" else ""))
    points: list[ParetoPoint] = []
    table = None
    kept = None  # (budget, result) that measured best by the objective so far
    groups = tuple(data.group_names)
    w = weight_vector(template.objective, template.group_weights, groups)

    def measured(r) -> tuple:
        """Smaller is better: the held-out worst-group loss increase (worst-group), else the
        objective's negated measured key (the selection's own order, :func:`guard_value`)."""
        return guard_value(r.chosen, template.objective, w, groups, template.mean_weight)

    for b in sorted(budgets):
        if not floor.feasible(b):
            log.info(MSG_SKIPPED.format(budget=b, need=need, bmin=floor.bmin))
            nan = float("nan")
            points.append(ParetoPoint(float(b), nan, nan, "", nan, nan, nan, nan, {}, status=INFEASIBLE,
                                      min_feasible_budget=floor.value, metric=metric))
            continue
        mp = replace(template, budget_bits=float(b), budget_bytes=None, budget_bops=None)
        res = search_mixed_precision(model, data, mp, base_config, progress=progress, sensitivity=table,
                                     engine=engine, task=task)
        table = res.sensitivity
        reused = None
        if kept is not None and measured(kept[1]) < measured(res):
            reused, res = kept
            log.info("budget %g: the result of budget %g measured better by the %s objective on the held-out "
                     "samples; reusing it", b, reused, template.objective)
        else:
            kept = (float(b), res)
        if test is not None:
            cm = res.compressed
            reference = map_x(lambda x: cm.predict(x, quantized=False), test)
            m = replace(task.evaluate(map_x(cm.predict, test), test, reference), primary=task.search_metric)
            f = replace(task.evaluate(reference, test, reference), primary=task.search_metric)
        else:
            m, f = res.chosen.metrics, res.float_metrics
        unmeasured = tuple(g for g, r in m.by_group.items() if r["count"] and math.isnan(float(r[m.primary])))
        if unmeasured and unmeasured != said:  # e.g. a group with no ground-truth box: no mAP
            said = unmeasured
            log.warning(MSG_UNMEASURED, ", ".join(map(repr, unmeasured)), task.search_metric)
        worst, worst_acc = m.group_min()
        points.append(ParetoPoint(
            float(b), res.allocation.avg_bits, res.allocation.file_weight_bytes,
            worst, float(worst_acc), float(m.overall[m.primary]),
            float(f.group_min()[1]), float(f.overall[f.primary]), dict(res.allocation.bits),
            res.allocation.stored_bits, res.chosen.measured_worst, reused, min_feasible_budget=floor.value,
            metric=metric,
        ))
    return points


def skipped_budgets(points: Sequence[ParetoPoint]) -> str | None:
    """The infeasible points of a sweep in words (``None`` when every budget ran)."""
    skipped = [p for p in points if not p.feasible]
    if not skipped:
        return None
    need = f"{skipped[0].min_feasible_budget:g}"
    return (f"budget{'s' if len(skipped) > 1 else ''} {', '.join(f'{p.budget:g}' for p in skipped)} skipped: below "
            f"the minimum feasible budget {need} stored bits per weight (the smallest allocation: every free layer "
            f"at its smallest width, pinned layers at theirs)")


def write_pareto_json(points: Sequence[ParetoPoint], path: str | Path) -> Path:
    """The points as a JSON list (atomic write; NaN as ``null``)."""
    text = json.dumps([p.to_dict() for p in points], indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_pareto_csv(points: Sequence[ParetoPoint], path: str | Path) -> Path:
    """One CSV row per point with :data:`PARETO_FIELDS` and the allocation as ``name=bits;…``
    (NaN and ``None`` as empty cells)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*PARETO_FIELDS, "bits"])
            for p in points:  # NaN (an infeasible budget's figures) and None as empty cells
                w.writerow([_json_value(getattr(p, k)) for k in PARETO_FIELDS]
                           + [";".join(f"{k}={v}" for k, v in p.bits.items())])

    return atomic_write(path, write)


def plot_pareto(points: Sequence[ParetoPoint], path: str | Path) -> Path | None:
    """Worst-group and mean accuracy against average bits as a PNG (infeasible budgets left out);
    ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no Pareto plot")
        return None
    pts = sorted((p for p in points if p.feasible), key=lambda p: p.avg_bits)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([p.avg_bits for p in pts], [100 * p.worst_group_acc for p in pts], "o-", label="worst group")
    ax.plot([p.avg_bits for p in pts], [100 * p.mean_acc for p in pts], "s--", label="overall (all samples)")
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
