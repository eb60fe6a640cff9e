"""Fairness-aware mixed-precision search: sensitivity → allocation → verification → export.

The budget counts what the written file holds (``docs/mixed-precision.md``): ``budget_bits`` is
stored bits per weight, scales included, in the containers the export writes; ``budget_bytes``
the written ONNX file's size. The search exports with the base config's storage (default
``"auto"``: INT2 for 2-bit layers, INT4 + Cast for 3-4-bit convs and Linears over tokens,
MatMulNBits for 3-4-bit vector Linears — the allocator counts exactly these containers), so what
the budget bought is on disk and runs the int8 kernels. Default widths (2, 4, 8): the containers ONNX Runtime loads.

``search_mixed_precision``:

1. choose the held-out samples (:func:`_verification_splits`). Default ``verify_folds=1``: when
   the data has at least :data:`MIN_UNUSED_PER_GROUP` samples of each group beyond the
   ``num_calib`` that ``compress`` draws, every verification fit *is* ``compress`` on all the
   data, measured on the samples it leaves unused — the winner's fit is returned, no refit.
   Else a stratified hold-out split of ``holdout_fraction``; ``verify_folds=k >= 2``:
   cross-fitting, every calibration sample held out once (k fits per candidate);
2. measure Δ_g(l, b) on the calibration data (:mod:`fqexport.search.sensitivity`, cached);
3. list the allocations to verify (:func:`_candidate_pool`): the best ``num_candidates`` (2)
   knapsack allocations within the budget (:mod:`fqexport.search.allocation`), the uniform
   allocation at *every* width that fits (``verify_uniform``) and, for the worst-group and
   weighted objectives, the mean-objective optimum (``verify_mean``);
4. quantize each with the real pipeline (solver, bias correction, activation calibration) and
   measure per-group accuracy and loss on its held-out samples; the best measured objective
   wins (worst-group: the lowest measured ``J = max_g ΔL_g + λ · mean_g ΔL_g``, ΔL_g the
   held-out loss increase over the float model, then worst-group accuracy — kept only if it
   beats the predicted-best allocation by more than 2 standard errors, else the predicted best
   stays; mean: highest accuracy; weighted: highest weighted accuracy);
5. never worse than uniform: if a verified uniform candidate measured a smaller held-out
   worst-group loss increase than the winner, return that uniform one and say so
   (``MixedPrecisionResult.fallback``);
6. the returned CompressedModel: the winner's verified fit (default), or the winner quantized
   again on all the calibration data (``refit`` after a split or folds); for a bytes budget, the
   file is written to a temporary path and, while it is larger than the budget, the next
   smaller allocation is refitted. The allocation table goes into ``metadata.allocation`` (the
   ONNX metadata); ``result.fits`` / ``result.fit_seconds`` count every ``compress`` fit.

:func:`fqexport.search.pareto.pareto_sweep` repeats the search over budgets (the sensitivity
table is measured once), keeps the best-so-far so that more budget never returns a worse
measured worst group (``reused_from``), and writes (budget, avg and stored bits, bytes,
worst-group accuracy, mean accuracy) as JSON, CSV and PNG.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.calibration.sampling import (
    group_balanced_indices,
    split_holdout,
    stratified_folds,
)
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.engine import make_engine
from fqexport.engine.base import Engine, Task, run_task
from fqexport.errors import ConfigError
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.graph.prepare import count_macs, prepare_model
from fqexport.metrics.group_metrics import GroupMetrics, cross_entropy, group_metrics
from fqexport.pipeline.compress import compress
from fqexport.search.allocation import (
    Allocation,
    Budget,
    LayerCost,
    candidate_allocations,
    layer_container,
    rescore,
    search_pins,
    stored_bits,
    uniform_allocations,
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
    return [LayerCost(i.name, i.params, macs.get(i.name, 0), int(modules[i.name].weight.shape[0]), i.kind)
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
    origin: str = "search"  # "search" (knapsack), "uniform" or "mean"
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
            "origin": self.origin,
            "avg_bits": self.allocation.avg_bits,
            "stored_bits": self.allocation.stored_bits,
            "weight_bytes": self.allocation.weight_bytes,
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
        compressed: the winner's CompressedModel (``fqexport.export(cm, path)`` writes the ONNX file):
            quantized on all the calibration data with ``refit``, else the verified held-in fit.
        sensitivity: the Δ_g(l, b) table.
        layers: the layer costs (params, MACs, channels).
        float_metrics: the float model's metrics on the held-out samples (with folds: every
            calibration sample but a one-sample group's).
        seconds: wall time of sensitivity, allocation, verification and refit.
        fallback: why the search returned a uniform allocation instead of the one it selected
            (the selected one measured a larger held-out worst-group loss increase than a uniform
            candidate within the budget); ``None`` when the selection stood.
        fits: ``compress`` fits the search ran (verification fits per candidate × fold, the
            refit, refits for a bytes budget); ``fit_seconds`` their summed time.
        storage: the storage mode the returned model exports with (the base config's).
        verification: how the candidates were measured, in words (the held-out samples).
    """

    config: MixedPrecisionConfig
    allocation: Allocation
    candidates: list[Candidate]
    compressed: Any  # pipeline.CompressedModel
    sensitivity: SensitivityTable
    layers: list[LayerCost]
    float_metrics: GroupMetrics
    seconds: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None
    fits: int = 0
    fit_seconds: float = 0.0
    storage: str = "auto"
    verification: str = ""

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
                         "stored_bits": round(stored_bits(info, b, self.storage), 3),
                         "container": layer_container(info, b, self.storage),
                         "sensitivity": sens, "most_sensitive_group": worst})
        return rows

    def allocation_info(self) -> dict[str, Any]:
        """What goes into the ONNX metadata under ``fqexport.search.allocation``."""
        c = self.chosen
        return {
            "objective": self.config.objective,
            "budget": {"kind": self.config.budget_kind, "value": self.config.budget_value},
            "avg_bits": round(self.allocation.avg_bits, 4),
            "stored_bits": round(self.allocation.stored_bits, 4),
            "weight_bytes": self.allocation.weight_bytes,
            "storage": self.storage,
            "used": self.allocation.used,
            "origin": c.origin,
            "fallback": self.fallback,
            "fits": self.fits,
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
            "fits": self.fits,
            "fit_seconds": self.fit_seconds,
            "verification": self.verification,
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


def _verification_splits(data: GroupData, mp: MixedPrecisionConfig, base: QuantConfig,
                         ) -> tuple[GroupData, list[tuple[GroupData, np.ndarray]], bool]:
    """The held-out set and, per verification fit, (held-in part, positions of its held-out
    samples in the held-out set), and whether the fits are the refit itself.

    ``verify_folds=1``: when the data has more samples than ``compress`` draws (``num_calib``)
    and at least :data:`MIN_UNUSED_PER_GROUP` of each group are left over, each fit is
    ``compress`` on all the data (which quantizes on the group-balanced subset it draws), and
    the held-out set is the samples it leaves unused: each verification fit is then also the refit (no extra
    fit). Else one stratified hold-out split of ``holdout_fraction``. ``k >= 2``: cross-fitting
    folds whose held-out parts together are every sample (in data order)."""
    if mp.verify_folds == 1:
        used = group_balanced_indices(data, base.num_calib, seed=base.seed)
        rest = np.setdiff1d(np.arange(len(data)), used)
        left = np.bincount(data.group[rest], minlength=len(data.group_names))
        if rest.size and left.min() >= MIN_UNUSED_PER_GROUP:
            # the fit gets all the data: compress draws exactly ``used`` from it (same order, same
            # group shares for 'samples' weights), so the fit *is* the refit, bit for bit
            held_out = data.subset(rest)
            return held_out, [(data, np.arange(len(held_out)))], True
        held_in, held_out = split_holdout(data, mp.holdout_fraction, seed=mp.seed)
        return held_out, [(held_in, np.arange(len(held_out)))], False
    folds = stratified_folds(data, mp.verify_folds, seed=mp.seed)
    out_index = np.sort(np.concatenate(folds))  # all samples but a one-sample group's
    everything = np.arange(len(data))
    return data.subset(out_index), [
        (data.subset(np.setdiff1d(everything, f)), np.searchsorted(out_index, f)) for f in folds
    ], False


def _verification_words(mp: MixedPrecisionConfig, held_out: GroupData, fits_are_refit: bool) -> str:
    """How :func:`_verification_splits` measured the candidates, for the console and reports."""
    if mp.verify_folds > 1:
        return f"{mp.verify_folds}-fold cross-fitted: every calibration sample held out once"
    if fits_are_refit:
        return (f"the {len(held_out)} calibration samples compress does not draw; each fit is the compress "
                "fit itself, no refit")
    return f"a {mp.holdout_fraction:.0%} hold-out split"


# Fits of the running search in this process by task key (serial engine: the returned model is
# not fitted twice); cleared when a search starts and ends.
_FITTED: dict[Any, Any] = {}
# Unused samples per group (beyond compress's num_calib) that make the hold-out without a split.
MIN_UNUSED_PER_GROUP = 50
MAX_FITTED = 16


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
    _FITTED[task.key] = cm  # found by _fit_model when it runs in this process (serial engine)
    while len(_FITTED) > MAX_FITTED:  # a pool worker's fits are never asked for: keep few
        _FITTED.pop(next(iter(_FITTED)))
    out = cm.predict(ctx.held_out.x[where])
    float_logits = cm.predict(ctx.held_out.x, quantized=False) if first else None
    return out, time.perf_counter() - t0, float_logits


def _fit_model(ctx: _VerifyContext, task: Task) -> Any:
    """The CompressedModel of a verification task (rebuilt where it is needed: a fitted fx
    graph does not pickle back from a worker)."""
    if task.key in _FITTED:  # fitted in this process: compress is deterministic, so the same model
        return _FITTED[task.key]
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
        candidates.append(Candidate(alloc, metrics=m, measured_loss_increase=inc, seconds=float(sum(o[1] for o in mine)),
                                    sample_loss=cross_entropy(logits, held_out.y)))
        log.info("candidate %d: avg %.3f bits, predicted worst Δ %.4f, held-out worst-group acc %.4f",
                 k, alloc.avg_bits, alloc.predicted_worst, candidates[-1].worst_group_acc)
    return candidates, float_metrics, ctx, tasks


# Bytes of an exported file outside the layers' weights (graph, fp32 biases, activation Q/DQ
# parameters, metadata): a first estimate for a bytes budget; the written size is then checked.
# After exporters/compact.py, the demo SmallResNet's search result (10 layers, 346 output
# channels) had 13.3-13.6 KB outside its weights: ~0.7 KB of nodes and activation Q/DQ parameters
# per layer, the fp32 biases, ~4-5 KB of metadata (with the allocation record), inputs and opsets.
OVERHEAD_BASE_BYTES = 5500
OVERHEAD_LAYER_BYTES = 700
MAX_BYTES_REFITS = 3
MSG_BYTES_BUDGET = (
    "budget_bytes={budget:g} cannot be met: the file written took {size} bytes (weights {weights} + graph "
    "and metadata {overhead}), and no allocation of bit_choices={choices} fits its weights in the "
    "{room} bytes left; raise --budget-bytes{hint}"
)
MSG_BYTES_REFITS = (
    "budget_bytes={budget:g}: after {refits} refits the file written still took {size} bytes (weights "
    "{weights} + graph and metadata {overhead}); raise --budget-bytes"
)


def file_overhead_estimate(layers: Sequence[LayerCost]) -> float:
    """A first estimate of an export's bytes outside the layers' weights: fp32 biases (4 bytes
    per channel) plus :data:`OVERHEAD_LAYER_BYTES` per layer and :data:`OVERHEAD_BASE_BYTES`."""
    return float(OVERHEAD_BASE_BYTES + sum(OVERHEAD_LAYER_BYTES + 4 * l.channels for l in layers))


def _candidate_pool(table, layers, mp: MixedPrecisionConfig, pins, common, data) -> list[tuple[Allocation, str]]:
    """The allocations to verify with their origin, each once: the best ``num_candidates``
    knapsack allocations ("search"), the uniform allocation at every width that fits the budget
    ("uniform", ``verify_uniform``) and the mean-objective optimum ("mean", ``verify_mean``)."""
    budget = _budget(mp)
    ranked = candidate_allocations(table, layers, budget, mp.objective, pins, steps=mp.mw_steps,
                                   eta=mp.mw_eta, **common)[: mp.num_candidates]
    pool = [(a, "search") for a in ranked]
    if mp.verify_uniform:
        pool += [(a, "uniform") for a in uniform_allocations(table, layers, budget, mp.objective, pins, **common)]
    if mp.verify_mean and mp.objective != "mean":
        best_mean = candidate_allocations(table, layers, budget, "mean", pins, group_weights=_population_weights(data),
                                          storage=common["storage"], overhead=common["overhead"])[0]
        pool.append((rescore(best_mean, mp.objective, group_weights=common["group_weights"],
                             mean_weight=mp.mean_weight), "mean"))
    out: list[tuple[Allocation, str]] = []
    for a, origin in pool:  # a candidate identical to an earlier one is fitted once
        if all(a.bits != b.bits for b, _ in out):
            out.append((a, origin))
    return out


def _guard_value(c: Candidate, objective: str, w, groups, mean_weight: float):
    """Smaller is better: the measured held-out worst-group loss increase for ``"worst-group"``,
    the negated selection key otherwise."""
    if objective == "worst-group":
        return (c.measured_worst,)
    return tuple(-v for v in _selection_key(c, objective, w, groups, mean_weight))


def _never_worse_than_uniform(best: Candidate, candidates: Sequence[Candidate], objective: str, w, groups,
                              mean_weight: float) -> tuple[Candidate, str | None]:
    """``best`` unless a verified uniform candidate (all fit the budget) measured a smaller
    worst-group loss increase on the held-out samples: then that uniform one, and why."""
    uniforms = [c for c in candidates if c.origin == "uniform"]
    if not uniforms or best.origin == "uniform":
        return best, None
    top = min(uniforms, key=lambda c: (_guard_value(c, objective, w, groups, mean_weight), c.allocation.weight_bytes))
    if _guard_value(top, objective, w, groups, mean_weight) < _guard_value(best, objective, w, groups, mean_weight):
        widths = list(top.allocation.bits.values())  # pinned layers aside, one width
        width = top.allocation.uniform_width or min(set(widths), key=lambda b: (-widths.count(b), b))
        return top, (
            f"returning uniform {width}-bit: it measured a held-out worst-group loss increase of "
            f"{top.measured_worst:.4f}, the selected mixed allocation {best.measured_worst:.4f}"
        )
    return best, None


def _written_size(cm: Any) -> int:
    """Bytes of ``cm``'s ONNX file as the export writes it (a temporary export, unchecked)."""
    with tempfile.TemporaryDirectory(prefix="fqexport-size-") as tmp:
        return int(export_qdq(cm, Path(tmp) / "size.onnx", check=False).size_bytes)


def _fit_file_budget(model, data, base, mp, best: Candidate, chosen, candidates, table, layers, pins, common,
                     measure, verify_one):
    """Check a bytes budget against the written file; while it is exceeded, take the next
    smaller allocation with the measured non-weight bytes — the knapsack's best for the bytes
    left (verified with ``verify_one`` when new) or a verified candidate that fits, whichever
    measured the smaller held-out worst-group loss increase — and refit it.
    ``measure(best, chosen, note, refits)`` is the size of the file as the result exports it
    (its allocation metadata included). Returns (candidate, model, refits, note)."""
    size = measure(best, chosen, None, 0)
    refits, note = 0, None
    while size > mp.budget_value:
        overhead = size - best.allocation.weight_bytes
        if refits >= MAX_BYTES_REFITS:
            raise ConfigError(MSG_BYTES_REFITS.format(budget=mp.budget_value, refits=refits, size=size,
                                                      weights=best.allocation.weight_bytes, overhead=overhead))
        room = mp.budget_value - overhead
        try:
            alloc = candidate_allocations(table, layers, _budget(mp), mp.objective, pins, steps=mp.mw_steps,
                                          eta=mp.mw_eta, **dict(common, overhead=overhead))[0]
        except ConfigError:
            alloc = None
        if alloc is not None and all(alloc.bits != c.allocation.bits for c in candidates):
            new = verify_one(alloc)
            new.origin = "bytes-refit"
            candidates.append(new)
        fitting = [c for c in candidates if c.allocation.weight_bytes <= room and c.metrics is not None]
        if not fitting:
            raise ConfigError(MSG_BYTES_BUDGET.format(
                budget=mp.budget_value, size=size, weights=best.allocation.weight_bytes, overhead=overhead,
                choices=",".join(map(str, mp.bit_choices)), room=math.floor(room),
                hint="" if 2 in mp.bit_choices else " or add 2 to bit_choices"))
        nxt = min(fitting, key=lambda c: (c.measured_worst, c.allocation.weight_bytes))
        note = (f"the written file took {size} bytes > budget_bytes={mp.budget_value:g}: refitted the next smaller "
                f"allocation ({nxt.allocation.weight_bytes} weight bytes + {overhead} bytes of graph and metadata)")
        log.info(note)
        best = nxt
        chosen = compress(model, data, replace(base, layer_bits=dict(best.allocation.bits)), progress=False)
        refits += 1
        size = measure(best, chosen, note, refits)
    return best, chosen, refits, note


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
    _FITTED.clear()
    held_out, splits, fits_are_refit = _verification_splits(data, mp_config, base)
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
    overhead = file_overhead_estimate(layers) if mp_config.budget_kind == "bytes" else 0.0
    common = dict(group_weights=_group_weights(mp_config, data), mean_weight=mp_config.mean_weight,
                  storage=storage, overhead=overhead)
    pool = _candidate_pool(table, layers, mp_config, pins, common, data)
    seconds["allocation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    groups = tuple(data.group_names)
    candidates, float_metrics, verify_ctx, verify_tasks = _verify(
        model, held_out, splits, [a for a, _ in pool], base, progress=progress, engine=engine)
    uniform_bits = [a.bits for a, o in pool if o == "uniform"]
    for c, (_, origin) in zip(candidates, pool):
        c.origin = "uniform" if c.allocation.bits in uniform_bits else origin
    seconds["verification"] = time.perf_counter() - t0
    fits, fit_seconds = len(verify_tasks), float(sum(c.seconds for c in candidates))

    w = None
    if mp_config.objective == "weighted":
        gw = _group_weights(mp_config, data) or {}
        w = np.array([gw.get(g, 0.0) for g in groups])
        w = w / w.sum()
    best = max(candidates, key=lambda c: _selection_key(c, mp_config.objective, w, groups, mp_config.mean_weight))
    if mp_config.objective == "worst-group":
        best = _significantly_better(candidates, best, held_out.group, groups, mp_config.mean_weight)
    best, fallback = _never_worse_than_uniform(best, candidates, mp_config.objective, w, groups, mp_config.mean_weight)
    if fallback:
        log.info(fallback)
    if fits_are_refit or not mp_config.refit:  # the verified fit itself, rebuilt where it ran elsewhere
        k = next(i for i, c in enumerate(candidates) if c is best)
        chosen = run_task(_fit_model, verify_ctx, verify_tasks[k])
    else:
        t0 = time.perf_counter()
        chosen = compress(model, data, replace(base, layer_bits=dict(best.allocation.bits)), progress=False)
        seconds["refit"] = time.perf_counter() - t0
        fits, fit_seconds = fits + 1, fit_seconds + seconds["refit"]
    _FITTED.clear()

    def finish(best: Candidate, chosen: Any, fallback: str | None, fits: int, fit_seconds: float):
        result = MixedPrecisionResult(
            mp_config, best.allocation, candidates, chosen, table, layers, float_metrics, seconds,
            fallback, fits, fit_seconds, storage, _verification_words(mp_config, held_out, fits_are_refit),
        )
        result.compressed.metadata = replace(result.compressed.metadata, allocation=result.allocation_info())
        return result

    if mp_config.budget_kind == "bytes":
        verified: list[Candidate] = []

        def verify_one(alloc: Allocation) -> Candidate:  # one more candidate, measured like the others
            verified.append(_verify(model, held_out, splits, [alloc], base, progress=False, engine=engine)[0][0])
            _FITTED.clear()
            return verified[-1]

        t0 = time.perf_counter()
        best, chosen, extra, note = _fit_file_budget(
            model, data, base, mp_config, best, chosen, candidates, table, layers, pins, common,
            lambda b, c, n, r: _written_size(finish(b, c, n or fallback, fits + len(verified) * len(splits) + r,
                                                    0.0).compressed),
            verify_one)
        seconds["bytes_check"] = time.perf_counter() - t0
        extra += len(verified) * len(splits)
        fits, fit_seconds = fits + extra, fit_seconds + (seconds["bytes_check"] if extra else 0.0)
        fallback = note or fallback
    return finish(best, chosen, fallback, fits, fit_seconds)
