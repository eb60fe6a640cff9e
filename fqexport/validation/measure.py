"""Run the gate's ONNX Runtime sessions on group data and measure each one per group.

The sessions: the optimized one (what deploys, ``native``), the same graph unoptimized (what it
means: the kernel check), a reference model, and each emulated kernel target. Every step returns
a small frozen result; :mod:`fqexport.validation.gate` puts them into the report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from fqexport.progress import tqdm

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.npz import available_memory_bytes
from fqexport.calibration.stream import DataStream, map_x
from fqexport.config import as_int
from fqexport.errors import ConfigError, DataError, ModelLoadError
from fqexport.exporters.cpu_isa import (
    EXACT_FAMILIES,
    cpu_isa,
    kernel_family,
    runs_natively,
)
from fqexport.exporters.kernel_emulation import EmulatedSession, stored_integer_kernels
from fqexport.exporters.ort_session import (
    MSG_BATCH,
    input_shape,
    kernel_summary,
    make_session,
    run_batches,
)
from fqexport.metrics.group_metrics import GroupMetrics
from fqexport.metrics.paired import paired_changes
from fqexport.tasks.base import Task
from fqexport.tasks.classification import Classification
from fqexport.validation.data_checks import check_data
from fqexport.validation.latency import (
    LatencyResult,
    measure_latency,
    measure_latency_pair,
    timed_batches,
)
from fqexport.validation.thresholds import pct
from fqexport.validation.validation_report import (
    UNOPTIMIZED,
    group_drop,
    kernel_deviation,
)

log = logging.getLogger(__name__)

# About the samples read from a stream per step of a session's pass (rounded to whole batches):
# 1024 held ~200 MB more at 3x64x64 than 256 for no speed.
_STREAM_SAMPLES = 256
# ... and at most about these bytes of x (a few large images: 256 of 3x7000x7000 are 150 GB)
_STREAM_BYTES = 256 * 2**20
MSG_BATCH_MEMORY = (
    "{source}: a batch of {batch} samples of {shape} float32 takes {need:.1f} GB (twice: read and fed), more than the "
    "{avail:.1f} GB available; lower --batch-size (API: batch_size=) or give smaller samples"
)
MSG_REF_CLASSES = "reference {ref} has {ref_c} outputs but model {model} has {c}: they must be the same task"
MSG_NONFINITE = (
    "model {model} returns NaN or Inf on {n} of {total} samples of {source} (by group: {groups}; the first is "
    "sample {first}): its outputs cannot be scored (argmax would count them as class 0); check the model"
)
LOG_REFERENCE_OTHER_BATCH = "latency batch {batch}: the reference runs batch {theirs} only (a fixed batch); speed not compared"


def on_data_error(model: str, source: str, err: DataError) -> DataError:
    """``err`` (raised while ``model`` ran on the data ``source``) naming both, the source once: a
    stream's read error starts with it already."""
    text = str(err)
    return DataError(f"model {model} on data {text}" if text.startswith(f"{source}: ")
                     else f"model {model} on data {source}: {text}")


@dataclass(frozen=True)
class Measured:
    """One session's outputs on the data (a classifier's logits ``[N, C]``) and their per-group
    metrics (the task's)."""

    logits: np.ndarray
    metrics: GroupMetrics


@dataclass(frozen=True)
class Runner:
    """How every session of one validation is opened and fed: provider, threads, batch size, and
    the task whose outputs, metrics and agreement it measures."""

    provider: str = "cpu"
    threads: int | None = None
    batch_size: int = 64
    task: Task = field(default_factory=Classification)
    progress: bool = False  # a bar per pass over the data

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_size", as_int(self.batch_size, "batch_size"))
        if self.batch_size < 1:
            raise ConfigError(MSG_BATCH.format(batch_size=self.batch_size))

    def open(self, model: str | Path, *, optimized: bool = True, spinning: bool = True) -> Any:
        """The ORT session of ``model``: optimized (what deploys) or not (what the graph means);
        ``spinning=False`` for a session that is timed (:data:`~fqexport.validation.latency.TIMED_SPINNING`)."""
        return make_session(model, provider=self.provider, optimized=optimized, threads=self.threads,
                            spinning=spinning)

    def measure(self, session: Any, data: GroupData | DataStream, model: str, what: str = "model") -> Measured:
        """Outputs of ``session`` on ``data`` (a stream read batch by batch) and their per-group
        metrics (``task.evaluate``); ``model`` names it in errors, ``what`` in the progress bar."""
        per_sample = 4 * math.prod(data.sample_shape)  # float32 (token ids: int64, small)
        need, avail = 2 * self.batch_size * per_sample, available_memory_bytes()
        if need > avail:
            raise DataError(MSG_BATCH_MEMORY.format(source=data.source, batch=self.batch_size, need=need / 1e9,
                                                    shape="x".join(map(str, data.sample_shape)), avail=avail / 1e9))
        samples = min(_STREAM_SAMPLES, max(1, _STREAM_BYTES // max(per_sample, 1)))
        chunk = self.batch_size * max(1, samples // self.batch_size)  # whole batches, as in memory
        bar = tqdm(total=len(data), desc=f"validate: {what}", unit="sample", disable=not self.progress, leave=False)

        def run(x: np.ndarray) -> np.ndarray:
            out = run_batches(session, x, self.batch_size)
            bar.update(len(x))
            return out

        try:
            with bar:
                if isinstance(data, GroupData):  # in chunks of whole batches too: the bar moves, the outputs are the same
                    parts = [run(data.x[i:i + chunk]) for i in range(0, len(data), chunk)]
                    logits = np.concatenate(parts) if parts else run(data.x[:0])
                else:
                    logits = map_x(run, data, chunk)
        except DataError as err:
            raise on_data_error(model, data.source, err) from err
        check_finite(logits, model, data)
        self.task.check_outputs(logits, model, data)
        return Measured(logits, self.task.evaluate(logits, data))


def check_finite(outputs: np.ndarray, model: str, data: GroupData | DataStream) -> None:
    """ModelLoadError naming the samples (by group) whose outputs hold NaN or Inf."""
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1) if len(outputs) else np.zeros(0, bool)
    if bad.any():
        counts = np.bincount(data.group[bad], minlength=len(data.group_names))
        groups = ", ".join(f"{g!r} {int(c)}" for g, c in zip(data.group_names, counts) if c)
        raise ModelLoadError(MSG_NONFINITE.format(model=model, n=int(bad.sum()), total=len(outputs),
                                                  source=data.source, groups=groups, first=int(np.flatnonzero(bad)[0])))


def measure_native(session: Any, data: GroupData | DataStream, model: str, runner: Runner) -> Measured:
    """The optimized session on ``data``, after checking that the data fits its input."""
    check_data(data, model, input_shape(session))
    native = runner.measure(session, data, model)
    m = native.metrics
    log.info("%s: overall %s %.2f %%", model, m.primary, pct(m.overall[m.primary]))
    return native


@dataclass(frozen=True)
class KernelCheck:
    """The optimized session against the same graph unoptimized, and the kernels ORT chose."""

    unoptimized: GroupMetrics
    deviation_by_group: Mapping[str, float]  # |acc_g(optimized) − acc_g(unoptimized)|, fraction (the primary metric)
    agreement: float  # top-1 agreement of the two sessions (the task's agreement)
    fused_kernels: Mapping[str, int]
    float_fallbacks: tuple[str, ...]
    reference: str = UNOPTIMIZED  # what "unoptimized" ran: the unoptimized session, or EXACT_SUMS


EXACT_SUMS = (
    "the exact integer sums of the {n} fused integer node(s) the file holds ({family} emulation): on this "
    "{isa} CPU the unoptimized session runs them with the same saturating kernels"
)


def graph_math_session(model: str | Path, runner: Runner) -> tuple[Any, str]:
    """The session that computes what ``model``'s graph means, and its words: ORT unoptimized —
    except for a file that already holds fused integer nodes (a QOperator file) whose sums this
    CPU's kernels may saturate (x86-avx2): unoptimized, they run on those very kernels, so their
    exact sums come from an exact family's emulation instead."""
    isa = cpu_isa()
    stored = (stored_integer_kernels(model) if runner.provider == "cpu" and kernel_family(isa) not in EXACT_FAMILIES
              else set())
    exact = (EmulatedSession(model, EXACT_FAMILIES[0], threads=runner.threads, native_log_level=logging.DEBUG)
             if stored else None)
    fused = [n for n in exact.emulated_nodes if n.split(":", 1)[1] in stored] if exact is not None else []
    if not fused:  # none stored, or their weights sum alike on every family: ORT's own kernels are exact
        return runner.open(model, optimized=False), UNOPTIMIZED
    words = EXACT_SUMS.format(n=len(fused), family=EXACT_FAMILIES[0], isa=isa)
    log.info("%s: the kernel deviation is measured against %s", model, words)
    return exact, words


def check_kernels(model: str | Path, data: GroupData | DataStream, native: Measured, runner: Runner) -> KernelCheck:
    """Run ``model`` unoptimized (:func:`graph_math_session`) and dump its optimized graph: what
    the kernels changed, per group."""
    session, reference = graph_math_session(model, runner)
    raw = runner.measure(session, data, str(model), "unoptimized session")
    counts, floats = kernel_summary(model, provider=runner.provider)
    return KernelCheck(
        unoptimized=raw.metrics,
        deviation_by_group=kernel_deviation(native.metrics, raw.metrics),
        agreement=runner.task.agreement(native.logits, raw.logits),
        fused_kernels=counts,
        float_fallbacks=tuple(floats),
        reference=reference,
    )


@dataclass(frozen=True)
class ReferenceComparison:
    """The model against a reference model (usually the float one) on the same data."""

    model: str
    metrics: GroupMetrics
    group_drop: Mapping[str, float]  # acc_g(reference) − acc_g(model), fraction
    agreement: float  # top-1 agreement with the model
    # per group: samples the reference got right and the model wrong ("worse"), the reverse
    # ("better"), McNemar's exact p (fqexport.metrics.paired); None where the task has no per-sample correctness
    group_changes: Mapping[str, Mapping[str, float]] | None = None


def compare_reference(reference: str | Path, session: Any, data: GroupData | DataStream, native: Measured,
                      model: str, runner: Runner) -> ReferenceComparison:
    """Run the reference's optimized ``session`` (opened once by the caller, who times it too and
    checked that it takes ``data``); DataError when it is not the same task (class count)."""
    ref_name = str(reference)
    ref = runner.measure(session, data, ref_name, "reference")
    ref_c, c = ref.metrics.num_classes, native.metrics.num_classes
    if ref_c != c:
        raise DataError(MSG_REF_CLASSES.format(ref=reference, ref_c=ref_c, model=model, c=c))
    right, ref_right = runner.task.sample_correct(native.logits, data), runner.task.sample_correct(ref.logits, data)
    changes = (paired_changes(right, ref_right, data.group, data.group_names)
               if right is not None and ref_right is not None else None)
    return ReferenceComparison(ref_name, ref.metrics, group_drop(ref.metrics, native.metrics),
                               runner.task.agreement(native.logits, ref.logits), changes)


@dataclass(frozen=True)
class TargetResult:
    """One kernel target (x86-avx2, x86-vnni, arm64) on the data."""

    metrics: GroupMetrics
    agreement: float  # top-1 agreement with the native session
    kernel_deviation_by_group: Mapping[str, float] | None  # vs unoptimized; None without the kernel check
    native: bool  # judged by this CPU's own session (this CPU is of the target's family), else emulated
    # the fused nodes whose sums the emulation computed (kernel-dependent); None when judged natively
    emulated_nodes: tuple[str, ...] | None = None
    # integer nodes the emulation does not model (int8 activations, ...): run by this CPU's kernels
    native_nodes: tuple[str, ...] | None = None


def measure_target(model: str | Path, target: str, data: GroupData | DataStream, native: Measured,
                   kernels: KernelCheck | None, runner: Runner) -> TargetResult:
    """``target``'s integer kernels on ``data``: this CPU's own optimized session when this CPU is
    of that family (:func:`~fqexport.exporters.cpu_isa.runs_natively`; the emulation was measured
    equal to it), else the bit-exact emulation (:mod:`fqexport.exporters.kernel_emulation`)."""
    own = runner.provider == "cpu" and runs_natively(target)
    # the nodes it runs natively are named in the report's notes (checks.native_node_notes), not logged twice
    session = None if own else EmulatedSession(model, target, threads=runner.threads, native_log_level=logging.DEBUG)
    measured = native if session is None else runner.measure(session, data, str(model), f"{target} (emulated)")
    result = TargetResult(
        metrics=measured.metrics,
        agreement=runner.task.agreement(measured.logits, native.logits),
        kernel_deviation_by_group=kernel_deviation(measured.metrics, kernels.unoptimized) if kernels else None,
        native=own,
        emulated_nodes=None if session is None else tuple(session.emulated_nodes),
        native_nodes=None if session is None else tuple(session.native_nodes),
    )
    m = result.metrics
    log.info("%s (%s): overall %s %.2f %%, agreement with native %.2f %%", target,
             "this CPU's own kernels" if own else "emulated", m.primary, pct(m.overall[m.primary]),
             pct(result.agreement))
    return result


def measure_latencies(session: Any, data: GroupData | DataStream, batch_sizes: Sequence[int], *, warmup: int,
                      repeats: int, reference: Any = None) -> tuple[tuple[LatencyResult, ...], tuple[LatencyResult, ...]]:
    """Latency of ``session`` at each batch size (once per batch it runs: a fixed batch is timed
    once), on the first samples of ``data``; with a ``reference`` session, its latency too: at the
    model's batch, the two timed in alternating pairs of runs
    (:func:`~fqexport.validation.latency.measure_latency_pair`), or alone at its own fixed batch
    where it has another one (the speeds are not compared there). Returns ``(model's, reference's)``."""
    plan = list(dict.fromkeys(timed_batches(session, reference, bs) for bs in batch_sizes))
    paired = {mine for mine, theirs in plan if theirs == mine}
    out, ref = [], []
    for mine, theirs in plan:
        sample = data.take(np.arange(min(mine, len(data)))).x
        if theirs == mine:
            lat, ref_lat = measure_latency_pair(session, reference, sample, mine, warmup=warmup, repeats=repeats)
            ref.append(ref_lat)
        else:
            lat = measure_latency(session, sample, mine, warmup=warmup, repeats=repeats)
            if theirs is not None:
                log.info(LOG_REFERENCE_OTHER_BATCH.format(batch=mine, theirs=theirs))
        log.info("latency batch %d: p50 %.3f ms, p95 %.3f ms", lat.batch_size, lat.p50_ms, lat.p95_ms)
        out.append(lat)
    own = dict.fromkeys(theirs for mine, theirs in plan if theirs is not None and theirs not in paired)
    for theirs in own:  # the reference's fixed batch, which the model does not run
        sample = data.take(np.arange(min(theirs, len(data)))).x
        ref.append(measure_latency(reference, sample, theirs, warmup=warmup, repeats=repeats))
    for r in ref:
        log.info("reference latency batch %d: p50 %.3f ms", r.batch_size, r.p50_ms)
    return tuple(out), tuple(ref)
