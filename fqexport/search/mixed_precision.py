"""Fairness-aware mixed-precision search: sensitivity → allocation → verification → export.

The budget counts what the written file holds (``docs/mixed-precision.md``): ``budget_bits`` is
stored bits per weight, scales included, in the containers the export writes; ``budget_bytes``
the written ONNX file's size. The search exports with the base config's storage (default
``"auto"``: INT2 for 2-bit layers, INT4 + Cast for 3-4-bit convs and Linears over tokens,
MatMulNBits for 3-4-bit vector Linears — the allocator counts exactly these containers), so what
the budget bought is on disk and runs the int8 kernels. Default widths (2, 4, 8): the containers ONNX Runtime loads.

``search_mixed_precision`` orchestrates; each step lives in its own module of this package:

1. choose the held-out samples (:func:`~fqexport.search.verification.verification_splits`).
   Default ``verify_folds=1``: when the data has at least
   :data:`~fqexport.search.verification.MIN_UNUSED_PER_GROUP` samples of each group beyond the
   ``num_calib`` that ``compress`` draws, every verification fit *is* ``compress`` on all the
   data, measured on the samples it leaves unused — the winner's fit is returned, no refit.
   Else a stratified hold-out split of ``holdout_fraction``; ``verify_folds=k >= 2``:
   cross-fitting, every calibration sample held out once (k fits per candidate);
2. measure Δ_g(l, b) on the calibration data (:mod:`~fqexport.search.sensitivity`, cached);
3. list the allocations to verify (:func:`~fqexport.search.candidate_pool.candidate_pool`): the
   best ``num_candidates`` (2) knapsack allocations within the budget
   (:mod:`~fqexport.search.allocation`), the uniform allocation at *every* width that fits
   (``verify_uniform``) and, for the worst-group and weighted objectives, the mean-objective
   optimum (``verify_mean``);
4. quantize each with the real pipeline (solver, bias correction, activation calibration) and
   measure per-group accuracy and loss on its held-out samples
   (:mod:`~fqexport.search.verification`); the best measured objective wins
   (:mod:`~fqexport.search.selection`; worst-group: the lowest measured
   ``J = max_g ΔL_g + λ · mean_g ΔL_g``, ΔL_g the held-out loss increase over the float model,
   then worst-group accuracy — kept only if it beats the predicted-best allocation by more than
   2 standard errors, else the predicted best stays; mean: highest accuracy; weighted: highest
   weighted accuracy);
5. never worse than uniform: if a verified uniform candidate measured a smaller held-out
   worst-group loss increase than the winner, return that uniform one and say so
   (``MixedPrecisionResult.fallback``);
6. the returned CompressedModel: the winner's verified fit (default), or the winner quantized
   again on all the calibration data (``refit`` after a split or folds). On an engine of several
   workers the search's own process works on the predicted-best allocation (the one selection
   keeps unless a measured one beats it) while the workers verify: it runs that candidate's fit
   itself (kept, so a winning one is not fitted again here), or, with a refit, refits it as soon
   as a worker has no fit left to take (used when the guess holds, else discarded and counted in
   ``fits``; ``result.refit_overlapped``); the same models either way. For a bytes budget, the
   file is written to a temporary path and, while it is larger than the budget, the next
   smaller allocation is refitted (:mod:`~fqexport.search.byte_budget`). The allocation table
   goes into ``metadata.allocation`` (the ONNX metadata); ``result.fits`` /
   ``result.fit_seconds`` count every ``compress`` fit, ``result.wall_seconds`` is the search's
   wall time and ``result.one_compress()`` one of its fits, to price the search against.

:func:`fqexport.search.pareto.pareto_sweep` repeats the search over budgets (the sensitivity
table is measured once), keeps the best-so-far so that more budget never returns a result that
measured worse by the objective (``reused_from``), and writes (budget, avg and stored bits, bytes,
worst-group accuracy, mean accuracy) as JSON, CSV and PNG.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import read_data
from fqexport.calibration.stream import DataStream
from fqexport.config import MixedPrecisionConfig, QuantConfig, check_argument
from fqexport.engine import make_engine
from fqexport.engine.base import Engine
from fqexport.global_state import one_at_a_time
from fqexport.graph.prepare import float32
from fqexport.pipeline.compress import compress, example_batch, model_task
from fqexport.search.allocation import (
    Allocation,
    AllocationOptions,
    check_group_weights,
    resolve_pins,
    search_pins,
)
from fqexport.search.byte_budget import (
    allocation_key,
    file_overhead_estimate,
    fit_file_budget,
    written_size,
)
from fqexport.search.candidate_pool import allocation_options, candidate_pool
from fqexport.search.candidates import Candidate, MixedPrecisionResult
from fqexport.search.costs import model_costs
from fqexport.search.selection import predicted_best, select
from fqexport.search.sensitivity import SensitivityTable, search_sensitivity
from fqexport.search.verification import (
    FitCache,
    VerifyContext,
    verification_splits,
    verification_words,
    verify,
)
from fqexport.tasks.base import Task

log = logging.getLogger(__name__)


@one_at_a_time
def search_mixed_precision(
    model: nn.Module,
    calib: GroupData | str | Path | Any,
    mp_config: MixedPrecisionConfig,
    base_config: QuantConfig | None = None,
    *,
    progress: bool = True,
    sensitivity: SensitivityTable | None = None,
    engine: Engine | None = None,
    task: str | Task | None = None,
) -> MixedPrecisionResult:
    """Search a per-layer bit allocation under the budget of ``mp_config``; see the module docstring.

    Args:
        model: the float classifier (not modified).
        calib: group-labeled calibration data (what ``fqexport.load_data`` accepts or returns);
            split into held-in (sensitivity, quantization) and held-out (verification). A stream
            is read batch by batch; without labels the search distils the float model: its top-1
            is the label of the sensitivity and of the verification.
        mp_config: budget, objective, widths, pins, verification options.
        base_config: the QuantConfig every candidate is quantized with (``layer_bits`` is set
            by the search; default: the solver with its defaults).
        progress: tqdm bars.
        sensitivity: a precomputed table (skips the measurement).
        engine: runs the sensitivity and verification tasks (default: one made from
            ``mp_config.engine`` for this search, closed at the end); results do not depend on it.
        task: the model's task (:mod:`fqexport.tasks`; None: inferred as ``compress`` does): its
            distillation loss gives the sensitivity, its metric (``search_metric``: accuracy,
            mAP@.5, mIoU) and loss the verification.
    """
    check_argument(mp_config, MixedPrecisionConfig, "search_mixed_precision: mp_config",
                   "; e.g. MixedPrecisionConfig(budget_bits=3.0)")
    check_argument(base_config, QuantConfig, "search_mixed_precision: base_config")
    if engine is None:
        with make_engine(mp_config.engine, preload=[__name__], sent=(model, calib)) as own:
            return search_mixed_precision(model, calib, mp_config, base_config, progress=progress,
                                          sensitivity=sensitivity, engine=own, task=task)

    start = time.perf_counter()
    model = float32(model)  # a float16/bfloat16 model as compress takes it (its checks blamed the data)
    if (sensitivity is None and mp_config.sensitivity == "measured") or _several_fits(mp_config):
        # a local engine's forkserver imports torch (seconds of one core) while the sensitivity
        # runs, instead of holding back the verification's first fits by as long; a search of
        # one fit (run here on all threads) never starts it
        engine.prepare()
    mp, base = mp_config, base_config or QuantConfig()
    data = read_data(calib)  # an .npz memory-mapped: the fits draw from it, the verification reads the held-out part
    check_group_weights(mp.group_weights, data.group_names)
    task, why = model_task(model, data, task)
    held_out, splits, fits_are_refit = verification_splits(data, mp, base)
    seconds: dict[str, float] = {}

    with _timed(seconds, "sensitivity"):
        # with a single split the table sees only the held-in part; with folds, every sample is
        # held out once anyway, so the table uses them all (it only ranks candidates: the
        # verification below still measures every fit on samples it was not fitted on)
        layers, floats = model_costs(model, example_batch(data), base.weights)
        float_params, names = sum(f.params for f in floats), [l.name for l in layers]
        resolve_pins(search_pins(mp.pins, names, mp.pin_first_last), names, floats)  # before any measurement
        table = sensitivity or search_sensitivity(model, splits[0][0] if len(splits) == 1 else data, mp, base,
                                                  progress=progress, engine=engine, layers=names,
                                                  task=task)

    with _timed(seconds, "allocation"):
        overhead = file_overhead_estimate(layers) if mp.budget_kind == "bytes" else 0.0
        options = allocation_options(mp, base, data, table.layers, overhead, float_params)
        pool = candidate_pool(table, layers, options, mp, data)

    # the search's own process works on the predicted-best allocation while workers verify:
    # its fit (without a refit) or its refit (module docstring, step 6)
    allocations, refits, overlapped = [a for a, _ in pool], mp.refit and not fits_are_refit, False
    guess = predicted_best(allocations) if engine.workers > 1 else None
    beside = _RefitBeside(lambda a: _timed_refit(model, data, base, a, task), guess if refits else None)
    with _timed(seconds, "verification"):
        # fits on parts of the data leave the draw's warning to the refit on all of it, when there is one
        context = VerifyContext(model, held_out, splits, base, FitCache(), task, parts=not fits_are_refit and mp.refit)
        mine = None if refits or guess is None else next(i for i, a in enumerate(allocations) if a is guess)
        found = verify(context, allocations, progress=progress, engine=engine, here=mine, on_idle=beside.on_idle)
        for c, (_, origin) in zip(found.candidates, pool):
            c.origin = origin
    fits, fit_seconds = found.fits, float(sum(c.seconds for c in found.candidates))

    selection = select(found.candidates, options, held_out)
    best, fallback = selection.chosen, selection.fallback
    if fallback:
        log.info(fallback)
    discarded = 0
    if not refits:  # the verified fit itself, rebuilt where it ran elsewhere
        chosen = found.fitted_model(best)
    else:
        chosen, refit_fits, refit_seconds, overlapped = beside.winner(best.allocation, seconds)
        fits, fit_seconds, discarded = fits + refit_fits, fit_seconds + refit_seconds, refit_fits - 1
    context.cache.clear()

    result = MixedPrecisionResult(
        config=mp, allocation=best.allocation, candidates=found.candidates, compressed=chosen, sensitivity=table,
        layers=layers, float_metrics=found.float_metrics, seconds=seconds, fallback=fallback, selection_note=selection.note, fits=fits,
        fit_seconds=fit_seconds, storage=base.storage, verification=verification_words(mp, held_out, fits_are_refit, task),
        target=base.target, discarded_fits=discarded,
    )
    if mp.budget_kind == "bytes":
        result = _meet_file_budget(result, data, context, options, engine, fits_are_refit)
    meta = result.compressed.metadata  # each fit was handed the Task object: say how it was chosen
    if meta.task:
        result.compressed.metadata = replace(meta, task={**meta.task, "chosen": why})
    result.wall_seconds = time.perf_counter() - start
    result.refit_overlapped = overlapped
    return result.record_allocation()


def _several_fits(mp: MixedPrecisionConfig) -> bool:
    """Whether the verification may hand out more than one fit (several candidates or folds),
    so that an engine of workers runs them: decided before the pool is known."""
    return (mp.num_candidates > 1 or mp.verify_uniform or mp.verify_folds > 1
            or (mp.verify_mean and mp.objective != "mean"))


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """``seconds[phase]``: the wall time of the block."""
    t0 = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - t0


def _refit(model: nn.Module, data: GroupData | DataStream, base: QuantConfig, alloc: Allocation,
           task: Task | None = None) -> Any:
    """``alloc`` quantized on all the calibration data, as ``compress`` would."""
    return compress(model, data, replace(base, layer_bits=dict(alloc.bits)), progress=False, task=task)


def _timed_refit(model: nn.Module, data: GroupData | DataStream, base: QuantConfig, alloc: Allocation,
                 task: Task | None = None) -> tuple[Any, float]:
    """:func:`_refit` and its wall time in seconds."""
    t0 = time.perf_counter()
    fitted = _refit(model, data, base, alloc, task)
    return fitted, time.perf_counter() - t0


class _RefitBeside:
    """The refit of ``guess`` (the predicted-best allocation; ``None``: no early refit), run by
    :attr:`on_idle` on this thread when the verification's engine has a worker left without a
    fit to take (the other workers finish theirs meanwhile); :meth:`winner` uses it when
    ``guess`` won, else refits."""

    def __init__(self, refit: Callable[[Allocation], tuple[Any, float]], guess: Allocation | None) -> None:
        self.refit, self.guess = refit, guess
        self._early: tuple[Any, float] | None = None

    @property
    def on_idle(self) -> Callable[[], None] | None:
        return None if self.guess is None else self._start

    def _start(self) -> None:
        self._early = self.refit(self.guess)

    def winner(self, alloc: Allocation, seconds: dict[str, float]) -> tuple[Any, int, float, bool]:
        """``alloc`` quantized on all the data: the early refit when ``alloc`` is the guess, else
        refitted now. Returns (model, fits, their seconds, whether the returned refit ran beside
        the verification); sets ``seconds["refit"]`` (and ``seconds["discarded_refit"]`` for a
        wrong guess)."""
        fits, spent = 0, 0.0
        if self._early is not None:
            fitted, s = self._early
            if self.guess.bits == alloc.bits:
                seconds["refit"] = s
                return fitted, 1, s, True
            seconds["discarded_refit"], fits, spent = s, 1, s
        fitted, s = self.refit(alloc)
        seconds["refit"] = s
        return fitted, fits + 1, spent + s, False


def _meet_file_budget(result: MixedPrecisionResult, data: GroupData | DataStream, context: VerifyContext,
                      options: AllocationOptions, engine: Engine, fits_are_refit: bool) -> MixedPrecisionResult:
    """``result`` with a written file within the bytes budget
    (:func:`fqexport.search.byte_budget.fit_file_budget`): new allocations are verified like the
    others, smaller ones refitted on all the data, and their fits counted. When the verification
    fits are ``compress`` on all the data (``fits_are_refit``), a new allocation's verified fit,
    made in this process, is its refit: not fitted a second time."""
    verified: list[Candidate] = []
    folds = len(context.splits)
    fitted: dict[tuple, Any] = {}  # allocation -> its verified fit, which is the refit
    reused = 0

    def verify_one(alloc: Allocation) -> Candidate:
        found = verify(context, [alloc], progress=False, engine=engine)
        verified.append(found.candidates[0])
        if fits_are_refit:  # one fit, run here on all threads (fit_threads): compress itself
            fitted[allocation_key(alloc)] = found.fitted_model(verified[-1])
        context.cache.clear()
        return verified[-1]

    def refit(alloc: Allocation) -> Any:
        nonlocal reused
        model = fitted.pop(allocation_key(alloc), None)
        if model is None:
            return _refit(context.model, data, context.base, alloc, context.task)
        reused += 1
        return model

    def measure(best: Candidate, model: Any, note: str | None, refits: int) -> int:
        trial = replace(result, allocation=best.allocation, compressed=model, fallback=note or result.fallback,
                        fits=result.fits + len(verified) * folds + refits)
        return written_size(trial.record_allocation().compressed)

    with _timed(result.seconds, "bytes_check"):
        fit = fit_file_budget(
            result.chosen, result.compressed, result.candidates, result.config,
            propose=lambda overhead: replace(options, overhead=overhead).candidates(result.sensitivity, result.layers)[0],
            verify=verify_one, refit=refit, measure=measure,
        )
    extra = fit.refits - reused + len(verified) * folds
    return replace(result, allocation=fit.candidate.allocation, compressed=fit.model,
                   fallback=fit.note or result.fallback, fits=result.fits + extra,
                   # the noise gate's note is about the selection; a bytes refit of another allocation replaced it
                   selection_note=result.selection_note if fit.candidate.allocation is result.allocation else None,
                   fit_seconds=result.fit_seconds + (result.seconds["bytes_check"] if extra else 0.0))
