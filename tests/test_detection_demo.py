"""Tests of fqexport/demo/detection_run.py (``fqexport demo --task detection``), shrunk: the rows,
per-group mAP from ONNX Runtime, and ORT's quantize_static with the decode excluded."""

from __future__ import annotations

import onnx
import pytest

from fqexport.demo.detection_run import decode_nodes, run_detection_demo
from fqexport.demo.detection_training import DetTrainConfig
from fqexport.demo.scene_models import SceneSizes

pytest.importorskip("pycocotools")


@pytest.mark.slow
def test_detection_demo_rows_per_group(tmp_path):
    steps = []
    result = run_detection_demo(tmp_path, sizes=SceneSizes(n_train=48, n_test=24, minority_fraction=0.25, width=4),
                                train_config=DetTrainConfig(epochs=1), num_calib=24, with_search=False, repeats=2,
                                progress=False, on_step=steps.append)
    labels = [r[0] for r in result.rows]
    assert labels == ["float", "ORT quantize_static W8A8", "ORT quantize_static W8A8, decode excluded",
                      "fqexport W8A8", "fqexport W4A8"]
    assert list(result.table[0]) == ["model", "daylight mAP", "daylight mAP50", "low-light mAP", "low-light mAP50",
                                     "worst drop pt", "size KB", "p50 ms b1", "p50 ms b8"]
    assert all(r[2].metrics.primary == "map" for r in result.rows)
    assert steps[0].startswith("[1/4] scenes: 48 train / 24 test images")
    float_decode = decode_nodes(tmp_path / "float.onnx")
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "float.onnx")).graph.node}
    assert {ops[n] for n in float_decode} >= {"Sigmoid", "Concat"} and "Conv" not in {ops[n] for n in float_decode}
    excluded = onnx.load(str(tmp_path / "ort_quantize_static_w8a8_decode_float.onnx")).graph
    naive = onnx.load(str(tmp_path / "ort_quantize_static_w8a8.onnx")).graph
    # the naive file quantizes the decode's output (a QuantizeLinear feeds the graph output); excluded, it is float
    producers = {o: n.op_type for g in (naive,) for n in g.node for o in n.output}
    assert producers[naive.output[0].name] == "DequantizeLinear"
    assert {o: n.op_type for n in excluded.node for o in n.output}[excluded.output[0].name] == "Concat"
    assert (tmp_path / "demo_report.md").exists() and (tmp_path / "yolov5.pt").exists()
