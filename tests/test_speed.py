"""Tests of fqexport/validation/speed.py: a compressed file timed against its own float model."""

from __future__ import annotations

import pytest

from fqexport.exporters.cpu_isa import cpu_isa
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.validation.speed import speed_vs_float
from fqexport.validation.validation_report import speedups


def test_the_file_is_timed_against_its_float_model_at_each_batch(cnn_cm8, tmp_path):
    path = export_qdq(cnn_cm8, tmp_path / "w8.onnx").path
    latency, float_latency, verdict = speed_vs_float(cnn_cm8, path, batch_sizes=(1, 4), warmup=1, repeats=4)
    assert [l.batch_size for l in latency] == [1, 4] == [l.batch_size for l in float_latency]
    assert all(l.repeats == 4 and l.p50_ms > 0 for l in (*latency, *float_latency))
    ratio = speedups(latency, float_latency)
    assert ratio == pytest.approx({l.batch_size: f.p50_ms / l.p50_ms for l, f in zip(latency, float_latency)})
    assert verdict.startswith(f"on this CPU ({cpu_isa()}) the file buys ")
    assert f"batch 4: {ratio[4]:.2f}x the float model's speed" in verdict
    assert list(tmp_path.iterdir()) == [path]  # the float model went to a temporary folder
