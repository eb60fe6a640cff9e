"""Verification: each candidate allocation quantized with the real pipeline (``compress``) and
measured on samples its fit did not see.

:func:`verification_splits` chooses the held-out samples (the module docstring of
:mod:`fqexport.search.mixed_precision` says when each kind is used); :func:`verify` runs one
(candidate, fold) fit per task of an engine and turns the held-out logits into
:class:`~fqexport.search.candidates.Candidate` objects. A search keeps one :class:`FitCache` in
its :class:`VerifyContext`: the serial engine fits in the search's own process, so the returned
model is taken from the cache instead of being fitted twice; on a process pool or Ray the search's
process runs one fit itself beside the workers (:func:`map_fits`, the predicted best), and any
other returned model is rebuilt there (a fitted fx graph does not pickle back from a worker).
Either way it is the same model: ``compress`` is deterministic and every engine seeds a task from
its key and runs it on one thread. A round of a single fit runs it in this process on all its
threads instead, whatever the engine (:func:`fit_threads`): ``compress`` itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.sampling import (
    group_balanced_indices,
    split_holdout,
    stratified_folds,
)
from fqexport.calibration.stream import DataStream, map_x
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.engine.base import Engine, Task, run_task, task_error
from fqexport.errors import ConfigError, DataError
from fqexport.metrics.group_metrics import GroupMetrics
from fqexport.pipeline.compress import compress, quiet_draw_warnings
from fqexport.search.allocation import Allocation
from fqexport.search.candidates import Candidate
from fqexport.tasks.base import Task as ModelTask
from fqexport.tasks.classification import Classification

log = logging.getLogger(__name__)

# Unused samples per group (beyond compress's num_calib) that make the hold-out without a split.
MIN_UNUSED_PER_GROUP = 50
# Fits a FitCache keeps (the oldest dropped first).
MAX_FITTED = 16

MSG_NO_HOLDOUT = (
    "{source}: the search has no sample to verify its candidates on: the hold-out split of {n} calibration "
    "samples is empty (a group needs at least 2 samples to give one to the hold-out; groups: {counts}); give "
    "more samples per group"
)
MSG_FOLDS = "verify_folds={k}: {k} folds need at least {k} calibration samples ({source} has {n})"
MSG_UNVERIFIED_GROUPS = (
    "{source}: group(s) {groups} have no held-out sample (a single calibration sample each): the search "
    "verifies its candidates, and the uniform guard compares them, on the other groups only"
)

Data = GroupData | DataStream  # of a stream, the parts are streams too: x is read when a fit or a prediction needs it
Split = tuple[Data, np.ndarray]  # (held-in part, positions of its held-out samples in the held-out set)
NO_LABELS = Classification.without_annotations


def _checked(data: Data, held_out: Data) -> Data:
    """``held_out``; a DataError when it is empty, a warning naming the groups it lacks."""
    counts = data.group_counts()
    if len(held_out) == 0:
        raise DataError(MSG_NO_HOLDOUT.format(source=data.source, n=len(data), counts=", ".join(
            f"{g!r} {int(n)}" for g, n in zip(data.group_names, counts))))
    held = np.bincount(held_out.group, minlength=len(data.group_names))
    missing = [repr(g) for g, n, h in zip(data.group_names, counts, held) if n > 0 and h == 0]
    if missing:
        log.warning(MSG_UNVERIFIED_GROUPS.format(source=data.source, groups=", ".join(missing)))
    return held_out


def verification_splits(data: Data, mp: MixedPrecisionConfig, base: QuantConfig,
                        ) -> tuple[Data, list[Split], bool]:
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
        return _checked(data, held_out), [(held_in, np.arange(len(held_out)))], False
    if mp.verify_folds > len(data):
        raise ConfigError(MSG_FOLDS.format(k=mp.verify_folds, source=data.source, n=len(data)))
    folds = stratified_folds(data, mp.verify_folds, seed=mp.seed)
    out_index = np.sort(np.concatenate(folds))  # all samples but a one-sample group's
    everything = np.arange(len(data))
    return _checked(data, data.subset(out_index)), [
        (data.subset(np.setdiff1d(everything, f)), np.searchsorted(out_index, f)) for f in folds
    ], False


def verification_words(mp: MixedPrecisionConfig, held_out: Data, fits_are_refit: bool,
                       task: ModelTask | None = None) -> str:
    """How :func:`verification_splits` measured the candidates, for the console and reports."""
    task = task or Classification()
    note = task.without_annotations if task.needs_annotations(held_out) else ""
    if mp.verify_folds > 1:
        return f"{mp.verify_folds}-fold cross-fitted: every calibration sample held out once" + note
    if fits_are_refit:
        return (f"the {len(held_out)} calibration samples compress does not draw; each fit is the compress "
                "fit itself, no refit" + note)
    return f"a {mp.holdout_fraction:.0%} hold-out split of {len(held_out)} samples" + note


class FitCache:
    """Verification fits (CompressedModels) of one search by task key, kept in the process that
    runs the search, at most ``limit`` of them (the oldest dropped first).

    A copy sent to a worker with the task context (pickled) is empty and keeps nothing: a
    worker's fits are never asked for, and a fitted fx graph does not pickle."""

    def __init__(self, limit: int = MAX_FITTED) -> None:
        self.limit = int(limit)
        self._fits: dict[tuple, Any] = {}
        self._keeps = True

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.limit = state["limit"]
        self._fits = {}
        self._keeps = False

    def __len__(self) -> int:
        return len(self._fits)

    def put(self, key: tuple, fitted: Any) -> None:
        if not self._keeps:
            return
        self._fits[key] = fitted
        while len(self._fits) > self.limit:
            self._fits.pop(next(iter(self._fits)))

    def get(self, key: tuple) -> Any | None:
        return self._fits.get(key)

    def clear(self) -> None:
        self._fits.clear()


@dataclass
class VerifyContext:
    """What every verification fit needs (shipped to each worker once per map)."""

    model: nn.Module
    held_out: Data
    splits: list[Split]
    base: QuantConfig
    cache: FitCache = field(default_factory=FitCache)
    task: ModelTask = field(default_factory=Classification)
    parts: bool = False  # the fits quantize on parts of the data (a split, folds): the refit warns about its draw


def verification_tasks(allocations: Sequence[Allocation], folds: int) -> list[Task]:
    """One task per (candidate, fold), candidates in order, folds inside."""
    return [
        Task(("fit", k, f), f"verification fit of candidate {k} ({a.avg_bits:.3f} avg bits), fold {f + 1}/{folds}",
             (dict(a.bits), f, k == 0 and f == 0))
        for k, a in enumerate(allocations) for f in range(folds)
    ]


def fit_candidate(ctx: VerifyContext, task: Task) -> tuple[np.ndarray, float, np.ndarray | None, float]:
    """One (candidate, fold) fit: quantize on the fold's held-in part, predict its held-out
    samples (streamed ones batch by batch). Returns the logits, the seconds of the ``compress``
    fit, the float logits of every held-out sample (the first task only: the float model is the
    same in every fit) and the seconds of those predictions (which grow with the held-out set,
    not with ``num_calib``)."""
    bits, fold, first = task.payload
    held_in, where = ctx.splits[fold]
    t0 = time.perf_counter()
    cm = _fit(ctx, held_in, bits)
    fitted = time.perf_counter()
    ctx.cache.put(task.key, cm)  # found by fitted_model when it runs in this process (serial engine)
    out = map_x(cm.predict, ctx.held_out.subset(where))
    float_logits = map_x(lambda x: cm.predict(x, quantized=False), ctx.held_out) if first else None
    return out, fitted - t0, float_logits, time.perf_counter() - fitted


def fitted_model(ctx: VerifyContext, task: Task) -> Any:
    """The CompressedModel of a verification task: the cached fit when it ran in this process,
    else fitted again (compress is deterministic: the same model)."""
    cached = ctx.cache.get(task.key)
    if cached is not None:
        return cached
    bits, fold, _ = task.payload
    return _fit(ctx, ctx.splits[fold][0], bits)


def _fit(ctx: VerifyContext, held_in: Data, bits: dict) -> Any:
    """``compress`` of ``bits`` on ``held_in``, its draw's warnings left to the refit when it is a part."""
    with quiet_draw_warnings() if ctx.parts else contextlib.nullcontext():
        return compress(ctx.model, held_in, replace(ctx.base, layer_bits=dict(bits)), progress=False, task=ctx.task)


@dataclass
class Verification:
    """One round of :func:`verify`: the measured candidates (in the order of the allocations),
    the float model's held-out metrics, and the context and tasks that rebuild a fit."""

    candidates: list[Candidate]
    float_metrics: GroupMetrics
    context: VerifyContext
    tasks: list[Task]

    @property
    def fits(self) -> int:
        """``compress`` fits the round ran: one per (candidate, fold)."""
        return len(self.tasks)

    def fitted_model(self, candidate: Candidate) -> Any:
        """The CompressedModel of ``candidate``'s fit on the first held-in part (the only one
        with ``verify_folds=1``), seeded like its task."""
        k = next(i for i, c in enumerate(self.candidates) if c is candidate)
        return run_task(fitted_model, self.context, self.tasks[k * len(self.context.splits)],
                        threads=fit_threads(self.tasks))


def fit_threads(tasks: Sequence[Task]) -> int | None:
    """Intra-op threads of a round's fits: one each, as every engine runs a task, so that no
    engine or worker count changes a result; a round of a single fit (one candidate, one fold:
    nothing to run beside it) runs in this process on all its threads, as ``compress`` does
    (``None``), whatever the engine (as the fit a pool's search runs itself, :func:`map_fits`)."""
    return None if len(tasks) == 1 else 1


def map_fits(engine: Engine, tasks: Sequence[Task], ctx: VerifyContext, progress: bool,
             here: int | None = None, on_idle: Callable[[], None] | None = None) -> list:
    """``fit_candidate`` of every task on ``engine``, results in task order (``on_idle``: as
    :meth:`~fqexport.engine.base.Engine.map` says). ``here``: on an engine of several workers,
    the index of a task that runs in this process instead (on this thread, through
    :func:`run_task` like any task, while the workers run the others: ``beside`` of
    :meth:`~fqexport.engine.base.Engine.map`), so its fit stays in ``ctx.cache``: the search's
    own process would otherwise wait idle, and then fit that model again when it is the one
    returned (:meth:`Verification.fitted_model`). A single task runs in this process on all its
    threads, whatever the engine (:func:`fit_threads`)."""
    def fit_here(i: int) -> Any:
        try:
            return run_task(fit_candidate, ctx, tasks[i], threads=fit_threads(tasks))
        except Exception as err:
            raise task_error(engine.name, tasks[i], err) from err

    if len(tasks) == 1:
        return [fit_here(0)]
    if here is None or engine.workers < 2:
        return engine.map(fit_candidate, tasks, ctx, "verify candidates", progress=progress, on_idle=on_idle)
    mine: list = []
    outs = engine.map(fit_candidate, [t for i, t in enumerate(tasks) if i != here], ctx, "verify candidates",
                      progress=progress, on_idle=on_idle, beside=lambda: mine.append(fit_here(here)))
    outs.insert(here, mine[0])
    return outs


def verify(ctx: VerifyContext, allocations: Sequence[Allocation], *, progress: bool, engine: Engine,
           here: int | None = None, on_idle: Callable[[], None] | None = None) -> Verification:
    """Quantize every allocation on each split's held-in part and measure it on that split's
    held-out samples; with folds, the out-of-fold logits of all fits make up ``held_out``
    (every calibration sample once). Each (candidate, fold) fit is one task of ``engine``; the
    first-fold fit of candidate ``here`` runs in this process (:func:`map_fits`; ``on_idle``:
    called when a worker is left without a fit to take).
    Task keys repeat from one round to the next, so the round starts with an empty cache.
    The metrics are the task's (``ctx.task.evaluate``), ranked by its ``search_metric``; without
    labels (boxes, masks) the float model's outputs stand in for them (:data:`NO_LABELS`)."""
    ctx.cache.clear()
    held_out, splits, task = ctx.held_out, ctx.splits, ctx.task
    groups = tuple(held_out.group_names)
    tasks = verification_tasks(allocations, len(splits))
    outs = map_fits(engine, tasks, ctx, progress, None if here is None else here * len(splits), on_idle)
    reference = outs[0][2]
    float_metrics = replace(task.evaluate(reference, held_out, reference), primary=task.search_metric)
    candidates = []
    for k, alloc in enumerate(allocations):
        mine = outs[k * len(splits):(k + 1) * len(splits)]
        logits = np.empty((len(held_out), *mine[0][0].shape[1:]), dtype=np.float32)
        for (_, where), (out, *_) in zip(splits, mine):
            logits[where] = out
        m = replace(task.evaluate(logits, held_out, reference), primary=task.search_metric)
        inc = {g: float(m.by_group[g]["loss"] - float_metrics.by_group[g]["loss"]) for g in groups}
        candidates.append(Candidate(alloc, metrics=m, measured_loss_increase=inc, seconds=float(sum(o[1] for o in mine)),
                                    predict_seconds=float(sum(o[3] for o in mine)),
                                    sample_loss=task.sample_losses(logits, held_out, reference)))
        log.info("candidate %d: avg %.3f bits, predicted worst Δ %.4f, held-out worst-group %s %.4f",
                 k, alloc.avg_bits, alloc.predicted_worst, task.search_metric, candidates[-1].worst_group_acc)
    return Verification(candidates, float_metrics, ctx, tasks)
