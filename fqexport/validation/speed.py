"""Does a compressed file buy speed on this CPU, or only size? The file against its own float
model, timed in alternating pairs of runs at a few batch sizes (what ``compress`` prints; ``validate``
does the same against ``--reference``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fqexport.atomic import scratch_writes
from fqexport.exporters.cpu_isa import cpu_isa
from fqexport.exporters.ort_session import make_session, model_files_size
from fqexport.exporters.qdq_onnx import export_float_reference
from fqexport.validation.latency import TIMED_SPINNING, LatencyResult, measure_latency_pair
from fqexport.validation.validation_report import speed_verdict

if TYPE_CHECKING:  # pragma: no cover
    from fqexport.model import CompressedModel

# What compress times: one sample and a batch of 32, as many pairs as fit in about MAX_SECONDS at
# the pace of the first ten, at most MAX_PAIRS (it is a summary, not a benchmark: ten pairs alone
# read a W8 CNN 1.02x once and 1.57x the next run).
SPEED_BATCHES = (1, 32)
MAX_PAIRS, MAX_SECONDS = 200, 3.0


def speed_vs_float(cm: "CompressedModel", path: str | Path, batch_sizes: Sequence[int] = SPEED_BATCHES,
                   warmup: int = 3, repeats: int = 10, threads: int | None = None, max_repeats: int = MAX_PAIRS,
                   max_seconds: float = MAX_SECONDS,
                   ) -> tuple[tuple[LatencyResult, ...], tuple[LatencyResult, ...], str | None]:
    """``(file's latency, float model's latency, verdict)`` on this CPU: ``cm.float_model`` is
    exported to a temporary file and both optimized sessions are timed in alternating pairs of runs on
    calibration samples (:func:`~fqexport.validation.latency.measure_latency_pair`): ``repeats``
    pairs, then as many more as fit in ``max_seconds`` at their pace (``max_repeats`` in all at
    most), per batch size."""
    x = np.ascontiguousarray(cm.calib.x)
    with tempfile.TemporaryDirectory(prefix="fqexport-speed-") as tmp:
        with scratch_writes():  # timed, then removed: not an output an interrupt message would name
            float_path = export_float_reference(cm, Path(tmp) / "float.onnx").path
        model = make_session(path, threads=threads, spinning=TIMED_SPINNING)
        reference = make_session(float_path, threads=threads, spinning=TIMED_SPINNING)
        pairs = [measure_latency_pair(model, reference, x, int(bs), warmup=warmup, repeats=repeats,
                                      max_repeats=max_repeats, max_seconds=max_seconds) for bs in batch_sizes]
        # a quantized file is not always the smaller (a tiny model's Q/DQ pairs, layers kept float)
        sizes = (model_files_size(path), model_files_size(float_path))
    latency, ref = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return latency, ref, speed_verdict(latency, ref, cpu_isa(), noun="the float model", sizes=sizes)
