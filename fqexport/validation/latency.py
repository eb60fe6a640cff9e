"""Latency of an ONNX Runtime session: warm-up, then timed repeats of one fixed batch."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fqexport.errors import ConfigError, DataError
from fqexport.exporters.ort_session import input_dtype, fixed_batch, session_threads

log = logging.getLogger(__name__)


# Whether the sessions fqexport times let ORT's intra-op threads spin-wait after a run (ORT's
# default). Off: a session timed beside another (the model and its reference, run for run) fought
# the other's spinning threads; measured on 2 cores (AMD EPYC, x86-avx512-vnni), a W8 CNN against its
# float model read 1.12x at batch 1 and 3.0x at batch 32 with spinning, 1.81x and 1.63x without,
# where each alone reads 1.8x and 2.1x. Without spinning a lone session is up to ~25 % slower at
# batch 1 than with it: the figures err on the slow side.
TIMED_SPINNING = False


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock latency of ``session.run`` on one batch (milliseconds per batch).

    ``throughput_per_s`` = batch_size / mean latency (samples per second); ``threads`` is the
    session's intra-op thread count; ``warmup`` runs are discarded, ``repeats`` are timed.
    ``speedup``: timed in pairs with a reference (:func:`measure_latency_pair`), the median over
    the pairs of runs of the reference's time over this one's (> 1: faster); else None.
    """

    p50_ms: float
    p95_ms: float
    mean_ms: float
    throughput_per_s: float
    batch_size: int
    threads: int
    warmup: int
    repeats: int
    speedup: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_batch(sample: np.ndarray, batch_size: int) -> np.ndarray:
    """``batch_size`` rows from ``sample`` ``[N, ...]``, cycling through it when N < batch_size."""
    if sample.shape[0] == 0:
        raise DataError("measure_latency: the sample holds no rows")
    idx = np.arange(batch_size) % sample.shape[0]
    return np.ascontiguousarray(sample[idx])


def measure_latency(
    session: Any,
    sample: np.ndarray,
    batch_size: int,
    warmup: int = 5,
    repeats: int = 30,
) -> LatencyResult:
    """Time ``repeats`` runs of a ``batch_size`` batch after ``warmup`` untimed runs.

    p50/p95 are percentiles (linear interpolation) of the per-run latencies.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"latency batch_size={batch_size!r} must be >= 1")
    if int(warmup) < 0 or int(repeats) < 1:
        raise ConfigError(f"latency warmup={warmup!r} must be >= 0 and repeats={repeats!r} >= 1")
    fixed = fixed_batch(session)
    if fixed is not None and fixed != batch_size:
        log.info("model input has a fixed batch of %d; timing batch %d instead of %d", fixed, fixed, batch_size)
        batch_size = fixed
    feed = _feed(session, sample, batch_size)
    _runs(session, feed, int(warmup))
    return _result(session, _runs(session, feed, int(repeats)), batch_size, warmup, repeats)


def _feed(session: Any, sample: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    batch = make_batch(np.asarray(sample), int(batch_size)).astype(input_dtype(session), copy=False)
    return {session.get_inputs()[0].name: batch}


def _runs(session: Any, feed: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Milliseconds of ``n`` timed runs."""
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        session.run(None, feed)
        times[i] = (time.perf_counter() - t0) * 1e3
    return times


def _result(session: Any, times: np.ndarray, batch_size: int, warmup: int, repeats: int) -> LatencyResult:
    mean = float(times.mean())
    return LatencyResult(
        p50_ms=float(np.percentile(times, 50)),
        p95_ms=float(np.percentile(times, 95)),
        mean_ms=mean,
        throughput_per_s=float(batch_size / (mean / 1e3)) if mean > 0 else float("inf"),
        batch_size=int(batch_size),
        threads=session_threads(session),
        warmup=int(warmup),
        repeats=int(repeats),
    )


def timed_batches(session: Any, reference: Any | None, batch_size: int) -> tuple[int, int | None]:
    """``(model's batch, reference's batch)`` timed for a requested ``batch_size``: a file's fixed
    batch when it has one (torch.onnx.export's default), else ``batch_size`` for the model and the
    model's batch for the reference; the reference's is None without a reference. The two differ
    only where the reference is fixed to another batch: its speed is not compared there."""
    mine = fixed_batch(session) or int(batch_size)
    if mine != int(batch_size):
        log.info("the model input has a fixed batch of %d; timing batch %d instead of %d", mine, mine, batch_size)
    return mine, None if reference is None else (fixed_batch(reference) or mine)


def paired_batch(session: Any, reference: Any | None, batch_size: int) -> int | None:
    """The batch both sessions are timed at for a requested ``batch_size`` (:func:`timed_batches`);
    None when they run different batches (the reference is fixed to another one)."""
    mine, theirs = timed_batches(session, reference, batch_size)
    return mine if theirs is None or theirs == mine else None


def measure_latency_pair(session: Any, reference: Any, sample: np.ndarray, batch_size: int, warmup: int = 5,
                         repeats: int = 30) -> tuple[LatencyResult, LatencyResult]:
    """Latency of ``session`` and of ``reference`` on the same batch, run alternately (after
    ``warmup`` untimed runs each): ``repeats`` pairs of one run each, which of the two goes first
    swapping from pair to pair, so that load which comes and goes on a shared machine hits both
    runs of a pair alike. The session's ``speedup`` is the median of the pairs' time ratios (the
    same file against itself measured 0.99-1.00 this way under load where rounds of six runs
    each measured 0.80-1.27)."""
    if int(batch_size) < 1 or int(warmup) < 0 or int(repeats) < 1:
        raise ConfigError(f"latency batch_size={batch_size!r}, warmup={warmup!r}, repeats={repeats!r}: need "
                          ">= 1, >= 0, >= 1")
    batch = paired_batch(session, reference, batch_size)
    if batch is None:  # the reference is fixed to another batch: each at its own (speedups does not pair them)
        return (measure_latency(session, sample, batch_size, warmup, repeats),
                measure_latency(reference, sample, batch_size, warmup, repeats))
    batch_size = batch
    pair = (session, reference)
    feeds = [_feed(s, sample, batch_size) for s in pair]
    for s, f in zip(pair, feeds):
        _runs(s, f, int(warmup))
    times = np.empty((2, int(repeats)))
    for r in range(int(repeats)):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i, r] = _runs(pair[i], feeds[i], 1)[0]
    mine = _result(session, times[0], batch_size, warmup, repeats)
    speedup = float(np.median(times[1] / np.maximum(times[0], 1e-9)))
    return replace(mine, speedup=speedup), _result(reference, times[1], batch_size, warmup, repeats)
