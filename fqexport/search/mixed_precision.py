"""Fairness-aware mixed-precision search: sensitivity → allocation → verification → export.

``search_mixed_precision``:

1. cut the calibration data into ``verify_folds`` group-stratified folds (cross-fitting;
   ``verify_folds=1``: one held-in / held-out split of ``holdout_fraction``);
2. measure Δ_g(l, b) on the calibration data (the held-in part with a single split;
   :mod:`fqexport.search.sensitivity`, cached);
3. list candidate allocations within the budget (:mod:`fqexport.search.allocation`), plus the uniform
   allocation at the widest width that fits (``verify_uniform``) and, for the worst-group and
   weighted objectives, the mean-objective optimum (``verify_mean``);
4. verify the best ``num_candidates`` and those: quantize each with the real pipeline (solver,
   bias correction, activation calibration) on all folds but one and measure per-group
   accuracy and loss on the fold left out, once per fold, so every calibration sample is
   held out once (the smallest group's few dozen samples would otherwise decide the winner
   alone); the best measured objective wins (worst-group: the lowest
   measured ``J = max_g ΔL_g + λ · mean_g ΔL_g``, ΔL_g the held-out loss increase over the
   float model, then worst-group accuracy — kept only if it beats the predicted-best
   allocation by more than 2 standard errors, else the predicted best stays; mean: highest
   accuracy; weighted: highest weighted accuracy);
5. quantize the winner again on all the calibration data (``refit``; the selection only needed
   the split) and return that CompressedModel, ready to ``.export()``, with the allocation
   table in ``metadata.allocation`` (it goes into the ONNX metadata).

:func:`fqexport.search.pareto.pareto_sweep` repeats the search over budgets (the sensitivity table is measured once) and
writes (budget, avg bits, bytes, worst-group accuracy, mean accuracy) as JSON, CSV and PNG.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.calibration.sampling import split_holdout, stratified_folds
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.engine import make_engine
from fqexport.engine.base import Engine, Task, run_task
from fqexport.graph.prepare import count_macs, prepare_model
from fqexport.metrics.group_metrics import GroupMetrics, cross_entropy, group_metrics
from fqexport.pipeline.compress import compress
from fqexport.search.allocation import (
    Allocation,
    Budget,
    LayerCost,
    candidate_allocations,
    rescore,
    search_pins,
    uniform_allocation,
)
from fqexport.search.sensitivity import SensitivityTable, measure_sensitivity

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# layer costs
# ---------------------------------------------------------------------------------------------


def layer_costs(model: nn.Module, example: torch.Tensor, skip_unsupported: bool = False) -> list[LayerCost]:
    """Params, MACs per sample and output channels of each quantizable layer (BN folded;
    ``skip_unsupported`` as in ``QuantConfig``)."""
    prepared = prepare_model(model, skip_unsupported)
    macs = count_macs(prepared.folded, example, prepared.names)
    modules = dict(prepared.folded.named_modules())
    return [LayerCost(i.name, i.params, macs.get(i.name, 0), int(modules[i.name].weight.shape[0]))
            for i in prepared.layers]


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


def _metrics_summary(m: GroupMetrics) -> dict[str, Any]:
    worst, worst_acc = m.group_min("accuracy")
    return {
        "accuracy": {g: float(r["accuracy"]) for g, r in m.by_group.items()},
        "loss": {g: float(r["loss"]) for g, r in m.by_group.items()},
        "worst_group": worst,
        "worst_group_acc": float(worst_acc),
        "mean_acc": float(m.overall["accuracy"]),
    }


@dataclass
class Candidate:
    """One allocation: predicted per-group loss increase vs what verification measured.

    ``measured_loss_increase`` is the held-out per-group loss of the quantized model minus the
    float model's; ``metrics`` the quantized model's held-out per-group metrics.
    """

    allocation: Allocation
    metrics: GroupMetrics | None = None
    measured_loss_increase: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    sample_loss: np.ndarray | None = field(default=None, repr=False)  # held-out, per sample

    @property
    def worst_group_acc(self) -> float:
        return float(self.metrics.group_min("accuracy")[1]) if self.metrics else float("nan")

    @property
    def mean_acc(self) -> float:
        return float(self.metrics.overall["accuracy"]) if self.metrics else float("nan")

    @property
    def measured_worst(self) -> float:
        """The largest measured held-out loss increase over the groups."""
        return max(self.measured_loss_increase.values()) if self.measured_loss_increase else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = {
            "bits": dict(self.allocation.bits),
            "avg_bits": self.allocation.avg_bits,
            "used": self.allocation.used,
            "predicted_score": self.allocation.score,
            "predicted_loss_increase": dict(self.allocation.predicted),
            "measured_loss_increase": dict(self.measured_loss_increase),
            "verify_seconds": self.seconds,
        }
        if self.metrics is not None:
            d["measured"] = _metrics_summary(self.metrics)
        return d


@dataclass
class MixedPrecisionResult:
    """The outcome of :func:`search_mixed_precision`.

    Attributes:
        config: the MixedPrecisionConfig.
        allocation: the chosen allocation.
        candidates: every verified candidate (predicted vs measured): the best ``num_candidates``
            in predicted order, then the uniform allocation (``verify_uniform``), then the
            mean-objective allocation (``verify_mean``), each once.
        compressed: the winner's CompressedModel (``.export(path)`` writes the ONNX file):
            quantized on all the calibration data with ``refit``, else the verified held-in fit.
        sensitivity: the Δ_g(l, b) table.
        layers: the layer costs (params, MACs, channels).
        float_metrics: the float model's metrics on the held-out samples (with folds: every
            calibration sample but a one-sample group's).
        seconds: wall time of sensitivity, allocation, verification and refit.
    """

    config: MixedPrecisionConfig
    allocation: Allocation
    candidates: list[Candidate]
    compressed: Any  # pipeline.CompressedModel
    sensitivity: SensitivityTable
    layers: list[LayerCost]
    float_metrics: GroupMetrics
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.allocation is self.allocation)

    def table(self) -> list[dict[str, Any]]:
        """One row per layer: name, params, bits, sensitivity (max over groups of Δ_g at the
        chosen width) and the group it hurts most."""
        rows = []
        for info in self.layers:
            if info.name not in self.allocation.bits:
                continue
            b = self.allocation.bits[info.name]
            if b in self.sensitivity.bits:
                d = self.sensitivity.at(info.name, b)
                k = int(np.argmax(d))
                sens, worst = float(d[k]), self.sensitivity.groups[k]
            else:
                sens, worst = float("nan"), ""
            rows.append({"name": info.name, "params": info.params, "bits": b,
                         "sensitivity": sens, "most_sensitive_group": worst})
        return rows

    def allocation_info(self) -> dict[str, Any]:
        """What goes into the ONNX metadata under ``fqexport.search.allocation``."""
        c = self.chosen
        return {
            "objective": self.config.objective,
            "budget": {"kind": self.config.budget_kind, "value": self.config.budget_value},
            "avg_bits": round(self.allocation.avg_bits, 4),
            "used": self.allocation.used,
            "sensitivity_method": self.sensitivity.method,
            "table": [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in self.table()],
            "predicted_loss_increase": dict(self.allocation.predicted),
            "measured_holdout": _metrics_summary(c.metrics) if c.metrics else None,
            "refit": self.config.refit,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocation": self.allocation_info(),
            "candidates": [c.to_dict() for c in self.candidates],
            "float_holdout": _metrics_summary(self.float_metrics),
            "sensitivity": self.sensitivity.to_dict(),
            "seconds": dict(self.seconds),
        }


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------


def _budget(mp: MixedPrecisionConfig) -> Budget:
    return Budget(mp.budget_kind, mp.budget_value)


def _measured_j(c: Candidate, groups: Sequence[str], mean_weight: float) -> float:
    """The worst-group objective measured on held-out data: ``max_g ΔL_g + λ · mean_g ΔL_g``."""
    inc = np.array([c.measured_loss_increase[g] for g in groups], dtype=np.float64)
    return float(np.nanmax(inc) + mean_weight * np.nanmean(inc))


def _selection_key(c: Candidate, objective: str, weights: np.ndarray | None, groups: Sequence[str],
                   mean_weight: float = 0.1):
    """Larger is better: the measured counterpart of the objective (ties: predicted score).

    Worst-group: the objective the allocation minimises, ``J = max_g ΔL_g + λ · mean_g ΔL_g``,
    measured (held-out loss increase over the float model), then worst-group accuracy. The
    loss, unlike the accuracy, changes with every sample's confidence, so it separates
    candidates that differ by less than one held-out sample of the smallest group (often only
    a few dozen samples). Measured on the benchmark models (demo CNN and tabular MLP, 3 to 10
    hold-out splits × 4 budgets, 12000 evaluation samples): for pairs of verified candidates
    whose evaluation worst-group accuracies differ by >= 0.25 pt, the held-out J ordered them
    like the evaluation in 68 % of pairs (57-83 % per model and solver version), the held-out
    worst-group accuracy in 57 % (39-67 %, ties counted as half).
    """
    m = c.metrics
    acc = np.array([m.by_group[g]["accuracy"] for g in groups], dtype=np.float64)
    loss = np.array([m.by_group[g]["loss"] for g in groups], dtype=np.float64)
    if objective == "worst-group":
        return (-_measured_j(c, groups, mean_weight), float(np.nanmin(acc)), float(np.nanmean(acc)),
                -c.allocation.score)
    if objective == "mean":
        return (float(m.overall["accuracy"]), -float(m.overall["loss"]), -c.allocation.score)
    return (float(np.nansum(acc * weights)), -float(np.nansum(loss * weights)), -c.allocation.score)


def _significantly_better(
    candidates: Sequence[Candidate], measured_best: Candidate, group: np.ndarray,
    groups: Sequence[str], mean_weight: float, z: float = 2.0,
) -> Candidate:
    """The predicted-best candidate (lowest knapsack score) unless the measured best beats it
    by more than ``z`` standard errors on the held-out samples.

    The difference ``J_pred − J_best`` of the measured objective is driven by the predicted
    candidate's worst group g*; its standard error is that of the paired per-sample loss
    difference on g*, ``std(ℓ_pred − ℓ_best)/√n_g*``. With a few dozen held-out samples in the
    smallest group, most measured differences between allocations are within that error, and
    the prediction (a per-group sensitivity table over all layers) is then the better guide.
    """
    predicted = min(candidates, key=lambda c: c.allocation.score)
    if predicted is measured_best or predicted.sample_loss is None or measured_best.sample_loss is None:
        return measured_best
    gap = _measured_j(predicted, groups, mean_weight) - _measured_j(measured_best, groups, mean_weight)
    worst = int(np.argmax([predicted.measured_loss_increase[g] for g in groups]))
    mask = group == worst
    d = predicted.sample_loss[mask] - measured_best.sample_loss[mask]
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("inf")
    if gap > z * se:
        return measured_best
    log.info("measured best candidate beats the predicted best by %.4f (< %g standard errors of %.4f): "
             "keeping the predicted best", gap, z, se)
    return predicted


def _group_weights(mp: MixedPrecisionConfig, data: GroupData) -> dict[str, float] | None:
    """Group weights of the inner problem: the user's for 'weighted'; population shares for
    'mean' (the calibration data's group proportions, as HAWQ weights samples); None otherwise."""
    if mp.group_weights:
        return {str(k): float(v) for k, v in mp.group_weights.items()}
    if mp.objective == "mean":
        return _population_weights(data)
    return None


def _population_weights(data: GroupData) -> dict[str, float]:
    """The calibration data's group proportions."""
    counts = data.group_counts().astype(np.float64)
    return {g: float(c / counts.sum()) for g, c in zip(data.group_names, counts)}


def _verification_splits(data: GroupData, mp: MixedPrecisionConfig) -> tuple[GroupData, list[tuple[GroupData, np.ndarray]]]:
    """The held-out set and, per verification fit, (held-in part, positions of its held-out
    samples in the held-out set): one stratified hold-out split, or ``verify_folds``
    cross-fitting folds whose held-out parts together are every sample (in data order)."""
    if mp.verify_folds == 1:
        held_in, held_out = split_holdout(data, mp.holdout_fraction, seed=mp.seed)
        return held_out, [(held_in, np.arange(len(held_out)))]
    folds = stratified_folds(data, mp.verify_folds, seed=mp.seed)
    out_index = np.sort(np.concatenate(folds))  # all samples but a one-sample group's
    everything = np.arange(len(data))
    return data.subset(out_index), [
        (data.subset(np.setdiff1d(everything, f)), np.searchsorted(out_index, f)) for f in folds
    ]


@dataclass
class _VerifyContext:
    """What every verification fit needs (shipped to each worker once)."""

    model: nn.Module
    held_out: GroupData
    splits: list[tuple[GroupData, np.ndarray]]
    base: QuantConfig


def _fit_one(ctx: _VerifyContext, task: Task) -> tuple[np.ndarray, float, np.ndarray | None]:
    """One (candidate, fold) fit: quantize on the fold's held-in part, predict its held-out
    samples. Returns the logits, the seconds and the float logits of every held-out sample (the
    first task only: the float model is the same in every fit)."""
    bits, fold, first = task.payload
    held_in, where = ctx.splits[fold]
    t0 = time.perf_counter()
    cm = compress(ctx.model, held_in, replace(ctx.base, layer_bits=dict(bits)), progress=False)
    out = cm.predict(ctx.held_out.x[where])
    float_logits = cm.predict(ctx.held_out.x, quantized=False) if first else None
    return out, time.perf_counter() - t0, float_logits


def _fit_model(ctx: _VerifyContext, task: Task) -> Any:
    """The CompressedModel of a verification task (rebuilt where it is needed: a fitted fx
    graph does not pickle back from a worker)."""
    bits, fold, _ = task.payload
    return compress(ctx.model, ctx.splits[fold][0], replace(ctx.base, layer_bits=dict(bits)), progress=False)


def verification_tasks(allocations: Sequence[Allocation], folds: int) -> list[Task]:
    """One task per (candidate, fold), candidates in order, folds inside."""
    return [
        Task(("fit", k, f), f"verification fit of candidate {k} ({a.avg_bits:.3f} avg bits), fold {f + 1}/{folds}",
             (dict(a.bits), f, k == 0 and f == 0))
        for k, a in enumerate(allocations) for f in range(folds)
    ]


def _verify(
    model: nn.Module, held_out: GroupData, splits, allocations: Sequence[Allocation], base: QuantConfig,
    *, progress: bool, engine: Engine,
) -> tuple[list[Candidate], GroupMetrics, _VerifyContext, list[Task]]:
    """Quantize every allocation on each split's held-in part and measure it on that split's
    held-out samples; with folds, the out-of-fold logits of all fits make up ``held_out``
    (every calibration sample once). Each (candidate, fold) fit is one task of ``engine``.
    Returns the candidates, the float model's held-out metrics, and the context and tasks
    (to rebuild a fit with :func:`_fit_model`)."""
    groups = tuple(held_out.group_names)
    ctx = _VerifyContext(model, held_out, list(splits), base)
    tasks = verification_tasks(allocations, len(splits))
    outs = engine.map(_fit_one, tasks, ctx, "verify candidates", progress=progress)
    float_metrics = group_metrics(outs[0][2], held_out.y, held_out.group, groups)
    candidates = []
    for k, alloc in enumerate(allocations):
        mine = outs[k * len(splits):(k + 1) * len(splits)]
        logits = np.empty((len(held_out), mine[0][0].shape[1]), dtype=np.float32)
        for (_, where), (out, _, _) in zip(splits, mine):
            logits[where] = out
        m = group_metrics(logits, held_out.y, held_out.group, groups)
        inc = {g: float(m.by_group[g]["loss"] - float_metrics.by_group[g]["loss"]) for g in groups}
        candidates.append(Candidate(alloc, m, inc, float(sum(o[1] for o in mine)), cross_entropy(logits, held_out.y)))
        log.info("candidate %d: avg %.3f bits, predicted worst Δ %.4f, held-out worst-group acc %.4f",
                 k, alloc.avg_bits, alloc.predicted_worst, candidates[-1].worst_group_acc)
    return candidates, float_metrics, ctx, tasks


def search_mixed_precision(
    model: nn.Module,
    calib: GroupData | str | Path | Any,
    mp_config: MixedPrecisionConfig,
    base_config: QuantConfig | None = None,
    *,
    progress: bool = True,
    sensitivity: SensitivityTable | None = None,
    engine: Engine | None = None,
) -> MixedPrecisionResult:
    """Search a per-layer bit allocation under the budget of ``mp_config``; see the module docstring.

    Args:
        model: the float classifier (not modified).
        calib: group-labeled calibration data (GroupData or a path); split into held-in
            (sensitivity, quantization) and held-out (verification).
        mp_config: budget, objective, widths, pins, verification options.
        base_config: the QuantConfig every candidate is quantized with (``layer_bits`` is set
            by the search; default: the solver with its defaults).
        progress: tqdm bars.
        sensitivity: a precomputed table (skips the measurement).
        engine: runs the sensitivity and verification tasks (default: one made from
            ``mp_config.engine`` for this search, closed at the end); results do not depend on it.
    """
    if engine is None:
        with make_engine(mp_config.engine, preload=[__name__]) as own:
            return search_mixed_precision(model, calib, mp_config, base_config, progress=progress,
                                          sensitivity=sensitivity, engine=own)

    base = base_config or QuantConfig()
    data = load_data(calib)
    held_out, splits = _verification_splits(data, mp_config)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    # with a single split the table sees only the held-in part; with folds, every sample is
    # held out once anyway, so the table uses them all (it only ranks candidates: the
    # verification below still measures every fit on samples it was not fitted on)
    table = sensitivity or measure_sensitivity(
        model, splits[0][0] if len(splits) == 1 else data,
        bit_choices=mp_config.bit_choices, method=mp_config.sensitivity,
        num_samples=mp_config.sensitivity_samples, weight_range=base.weight_range,
        # the proxy is RTN, which wants its clipping search unless the user turned it off
        clip_search=True if base.clip_search is None else bool(base.clip_search),
        seed=mp_config.seed, cache_path=mp_config.cache_path,
        skip_unsupported=base.skip_unsupported, progress=progress, engine=engine,
    )
    seconds["sensitivity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    example = torch.from_numpy(np.ascontiguousarray(data.x[:1]))
    layers = layer_costs(model, example, base.skip_unsupported)
    pins = search_pins(mp_config.pins, table.layers, mp_config.pin_first_last)
    storage = base.storage
    common = dict(group_weights=_group_weights(mp_config, data), mean_weight=mp_config.mean_weight,
                  storage=storage)
    ranked = candidate_allocations(
        table, layers, _budget(mp_config), mp_config.objective, pins,
        steps=mp_config.mw_steps, eta=mp_config.mw_eta, **common,
    )[: mp_config.num_candidates]
    extra = []
    if mp_config.verify_uniform:
        extra.append(uniform_allocation(table, layers, _budget(mp_config), mp_config.objective, pins,
                                        **common))
    if mp_config.verify_mean and mp_config.objective != "mean":
        best_mean = candidate_allocations(table, layers, _budget(mp_config), "mean", pins,
                                          group_weights=_population_weights(data), storage=storage)[0]
        extra.append(rescore(best_mean, mp_config.objective, group_weights=common["group_weights"],
                             mean_weight=mp_config.mean_weight))
    for alloc in extra:
        if alloc is not None and all(alloc.bits != a.bits for a in ranked):
            ranked.append(alloc)
    seconds["allocation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    groups = tuple(data.group_names)
    candidates, float_metrics, verify_ctx, verify_tasks = _verify(
        model, held_out, splits, ranked, base, progress=progress, engine=engine)
    seconds["verification"] = time.perf_counter() - t0

    w = None
    if mp_config.objective == "weighted":
        gw = _group_weights(mp_config, data) or {}
        w = np.array([gw.get(g, 0.0) for g in groups])
        w = w / w.sum()
    best = max(candidates, key=lambda c: _selection_key(c, mp_config.objective, w, groups, mp_config.mean_weight))
    if mp_config.objective == "worst-group":
        best = _significantly_better(candidates, best, held_out.group, groups, mp_config.mean_weight)
    if mp_config.refit:
        t0 = time.perf_counter()
        chosen = compress(model, data, replace(base, layer_bits=dict(best.allocation.bits)), progress=False)
        seconds["refit"] = time.perf_counter() - t0
    else:  # the verified held-in fit itself, rebuilt here exactly as its task ran
        k = next(i for i, c in enumerate(candidates) if c is best)
        chosen = run_task(_fit_model, verify_ctx, verify_tasks[k])
    result = MixedPrecisionResult(
        mp_config, best.allocation, candidates, chosen, table, layers, float_metrics, seconds,
    )
    result.compressed.metadata = replace(result.compressed.metadata, allocation=result.allocation_info())
    return result
