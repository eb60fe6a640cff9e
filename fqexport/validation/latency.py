"""Latency of an ONNX Runtime session: warm-up, then timed repeats of one fixed batch."""

from __future__ import annotations

import logging
import math
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

# The speed-up band: a file is faster when its speed-up reads >= FASTER, slower when <= SLOWER.
FASTER, SLOWER = 1.10, 0.90
# Confidence of the interval around a pair-timed speed-up (:func:`median_interval`).
CONFIDENCE = 0.95


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock latency of ``session.run`` on one batch (milliseconds per batch).

    ``throughput_per_s`` = batch_size / mean latency (samples per second); ``threads`` is the
    session's intra-op thread count; ``warmup`` runs are discarded, ``repeats`` are timed.
    ``speedup``: timed in pairs with a reference (:func:`measure_latency_pair`), the median over
    the pairs of runs of the reference's time over this one's (> 1: faster); else None.
    ``speedup_low`` / ``speedup_high``: the 95 % interval of that median (:func:`median_interval`),
    under :data:`MIN_INTERVAL_PAIRS` pairs their whole range (which holds it less often).
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
    speedup_low: float | None = None
    speedup_high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Fewest pairs whose whole range holds the median with CONFIDENCE (1 − 2⁻⁽ⁿ⁻¹⁾ >= 0.95).
MIN_INTERVAL_PAIRS = 6


def median_interval(ratios: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """A distribution-free interval for the median of ``ratios`` (n pairs): the order statistics
    r_(k) and r_(n+1-k), with k the largest such that P(Binomial(n, ½) < k) <= (1 − confidence)/2,
    so the interval holds the true median with at least ``confidence`` whatever the noise's shape;
    None for fewer than :data:`MIN_INTERVAL_PAIRS` pairs, whose whole range holds it less often."""
    r = np.sort(np.asarray(ratios, dtype=np.float64))
    n = r.size
    tail, k, below = (1.0 - confidence) / 2, 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2.0**n <= tail:  # below = P(B < k + 1) after the step
        below += math.comb(n, k) / 2.0**n
        k += 1
    if k == 0:
        return None
    return float(r[k - 1]), float(r[n - k])


def speed_word(speedup: float, low: float | None = None, high: float | None = None) -> str:
    """``"faster"``, ``"slower"``, ``"same speed"`` or ``"within the timing noise"`` for a speed-up
    over the reference, as it is shown (two decimals: a measured 0.9047 reads 0.90x, and so is
    slower). With its interval (``low``, ``high``: :func:`median_interval`), a side is taken only
    when the interval lies on it: faster needs the interval above 1, slower below 1, the same
    speed inside the band; else the timing could not tell."""
    shown = round(float(speedup), 2)
    if low is None or high is None:
        return "faster" if shown >= FASTER else "slower" if shown <= SLOWER else "same speed"
    lo, hi = round(float(low), 2), round(float(high), 2)
    if shown >= FASTER and lo > 1.0:
        return "faster"
    if shown <= SLOWER and hi < 1.0:
        return "slower"
    if SLOWER < lo and hi < FASTER:
        return "same speed"
    return "within the timing noise"




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
                         repeats: int = 30, max_repeats: int | None = None, max_seconds: float = 0.0,
                         ) -> tuple[LatencyResult, LatencyResult]:
    """Latency of ``session`` and of ``reference`` on the same batch, run alternately (after
    ``warmup`` untimed runs each): ``repeats`` pairs of one run each, which of the two goes first
    swapping from pair to pair, so that load which comes and goes on a shared machine hits both
    runs of a pair alike. The session's ``speedup`` is the median of the pairs' time ratios (the
    same file against itself measured 0.99-1.00 this way under load where rounds of six runs
    each measured 0.80-1.27), with its 95 % interval (``speedup_low``/``speedup_high``; None
    under :data:`MIN_INTERVAL_PAIRS` pairs: their whole range, labelled as such). ``max_repeats``:
    after the first ``repeats`` pairs, more up to ``max_repeats`` in all; with ``max_seconds`` (> 0,
    finite) only as many as fit in it at the pace of the first ones, and none after it has passed
    (default: ``repeats`` pairs). The count follows the time the
    runs take, never the ratios they give: stopping once an interval looks settled would take a
    side more often than 5 % of the time for two files of equal speed (10 % measured)."""
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
    start, first = time.perf_counter(), int(repeats)
    times = _pairs(pair, feeds, first)
    more = max(int(max_repeats or 0) - first, 0)
    timed = max_seconds > 0 and math.isfinite(max_seconds)
    if more and timed:  # as many as fit at the pace of the first pairs, and a deadline for load that arrives
        pace = (time.perf_counter() - start) / first
        more = int(min(more, max(0.0, max_seconds / max(pace, 1e-9) - first)))
    if more:
        times = np.concatenate([times, _pairs(pair, feeds, more, start=first,
                                              deadline=start + max_seconds if timed else None)], axis=1)
    n = times.shape[1]
    ratios = times[1] / np.maximum(times[0], 1e-9)
    # under MIN_INTERVAL_PAIRS the whole range decides (it holds the median less than 95 % of the time)
    low, high = median_interval(ratios) or (float(ratios.min()), float(ratios.max()))
    mine = replace(_result(session, times[0], batch_size, warmup, n), speedup=float(np.median(ratios)),
                   speedup_low=low, speedup_high=high)
    return mine, _result(reference, times[1], batch_size, warmup, n)


def _pairs(pair: tuple[Any, Any], feeds: list[dict[str, np.ndarray]], n: int, start: int = 0,
           deadline: float | None = None) -> np.ndarray:
    """Milliseconds ``[2, m]`` of ``m <= n`` pairs of one run each, which goes first swapping from
    pair to pair (pair ``start + r`` of the whole series); fewer than ``n`` when the
    ``time.perf_counter()`` ``deadline`` passes (a stop that does not look at the ratios)."""
    times = np.empty((2, n))
    for r in range(n):
        if deadline is not None and time.perf_counter() > deadline:
            return times[:, :r]
        for i in ((0, 1) if (start + r) % 2 == 0 else (1, 0)):
            times[i, r] = _runs(pair[i], feeds[i], 1)[0]
    return times
