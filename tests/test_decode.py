"""Tests of fqexport/graph/decode.py: a detector that returns raw head maps, with the decode its
user names (``with_decode`` / ``--decode``) composed into one graph whose output is the layout NMS
reads, whose decode stays float and whose layers keep the model's own names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fixtures_models as fm
from conftest import run_main, scene_config
from fqexport.calibration.npz import save_npz
from fqexport.errors import ModelLoadError
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.graph.decode import MSG_HEAD_MAPS, with_decode
from fqexport.graph.loading import load_decode
from fqexport.graph.prepare import trace
from fqexport.pipeline.compress import compress
from fqexport.tasks import Detection

pytest.importorskip("pycocotools")


@pytest.mark.parametrize("raw, decode, plain", [(fm.yolov5_raw_test, fm.YoloV5Decode, fm.yolov5_test),
                                                (fm.yolov8_raw_test, lambda: fm.decode_yolov8_test, fm.yolov8_test)])
def test_the_traced_graph_is_the_decoded_model_under_the_models_own_layer_names(raw, decode, plain):
    x = torch.randn(2, 3, 64, 64)
    composed, whole = with_decode(raw(), decode()), plain()
    gm_composed, gm_whole = trace(composed), trace(whole)
    assert torch.equal(gm_composed(x), whole(x))
    layers = lambda gm: [n.target for n in gm.graph.nodes if n.op == "call_module"]  # noqa: E731
    assert sorted(layers(gm_composed)) == sorted(layers(gm_whole))  # body.stem.conv, head.0, …: no prefix
    assert {n for n, _ in gm_composed.named_parameters()} == {n for n, _ in raw().named_parameters()}


class _SplitRaw(torch.nn.Module):
    """Raw head maps behind Ultralytics C2f's ``list(x.split(...))``: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = torch.nn.Conv2d(3, 8, 8, 8), torch.nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return [self.head(torch.cat(list(self.stem(x).split((4, 4), 1)), 1))]


def _decode_split_raw(outs):
    r = outs[0].reshape(outs[0].shape[0], 6, -1)
    return torch.cat([r[:, :2], r[:, 2:4].exp(), r[:, 4:].sigmoid()], 1)  # v8 layout [N, 6, anchors]


def test_a_decoded_model_torch_export_traces_keeps_the_models_own_layer_names():
    """Survey 90: the torch.export fallback (fx fails on C2f's split) named every layer model.…, so
    --keep-float / --layer-bits written with the model's names matched nothing."""
    torch.manual_seed(0)
    composed = with_decode(_SplitRaw().eval(), _decode_split_raw)
    x = torch.randn(2, 3, 32, 32)
    gm = trace(composed, example=x)
    assert sorted(n.target for n in gm.graph.nodes if n.op == "call_module") == ["head", "stem"]
    torch.testing.assert_close(gm(x), composed(x))


def test_compress_of_a_raw_head_model_with_its_decode_exports_the_layout_like_the_whole_model(tmp_path, scenes):
    calib = scenes.train.detection("calib.npz")
    composed = with_decode(fm.yolov5_raw_test(), fm.YoloV5Decode(), name="fixtures_models:YoloV5Decode")
    cm = compress(composed, calib, scene_config(weight_bits=4), progress=False)
    whole = compress(fm.yolov5_test(), calib, scene_config(weight_bits=4), progress=False)
    assert cm.task == Detection(layout="v5") and cm.metadata.task["decode"] == "fixtures_models:YoloV5Decode"
    assert list(cm.layers) == list(whole.layers) and "head.0" in cm.layers  # every head conv is solved
    for name in cm.layers:
        assert torch.equal(cm.layers[name].codes, whole.layers[name].codes), name
    assert any("sigmoid" in op for op in cm.metadata.float_ops)  # the decode stays float
    export_qdq(cm, tmp_path / "c.onnx")
    export_qdq(whole, tmp_path / "w.onnx")
    got = run_batches(make_session(tmp_path / "c.onnx"), scenes.test.x, 8)
    want = run_batches(make_session(tmp_path / "w.onnx"), scenes.test.x, 8)
    assert got.shape == (24, 240, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert read_metadata(tmp_path / "c.onnx").task["decode"] == "fixtures_models:YoloV5Decode"


def test_raw_head_maps_without_a_decode_are_refused_naming_the_flag(scenes):
    with pytest.raises(ModelLoadError) as err:
        compress(fm.yolov5_raw_test(), scenes.train.detection("calib.npz"), scene_config(), progress=False)
    assert str(err.value) == MSG_HEAD_MAPS.format(n=2, shapes="[2, 24, 8, 8], [2, 24, 4, 4]")
    assert "--decode package.module:name" in str(err.value)


def test_load_decode_takes_a_function_a_module_or_its_class_and_names_what_is_wrong():
    assert load_decode("fixtures_models:decode_yolov8_test") is fm.decode_yolov8_test
    assert isinstance(load_decode("fixtures_models:YoloV5Decode"), fm.YoloV5Decode)
    with pytest.raises(ModelLoadError, match="decode spec 'fixtures_models:STRIDES' must be 'package.module:name' "
                                             "naming a function .*; it names a tuple"):
        load_decode("fixtures_models:STRIDES")
    with pytest.raises(ModelLoadError, match=r"module 'fixtures_models' has no attribute 'nope' \(decode spec"):
        load_decode("fixtures_models:nope")
    with pytest.raises(ModelLoadError, match="decode spec 'nocolon' must be"):
        load_decode("nocolon")
    with pytest.raises(ModelLoadError, match="failed to construct without arguments"):
        load_decode("torch.nn:Conv2d")  # a module class that needs arguments
    with pytest.raises(ModelLoadError, match="must be a function of the model's outputs or an nn.Module"):
        with_decode(fm.yolov5_raw_test(), 3)


def test_cli_compress_with_decode_writes_the_layout_and_names_the_decode(tmp_path, scenes, tests_dir, monkeypatch):
    torch.save(fm.yolov8_raw_test().state_dict(), tmp_path / "raw.pt")
    save_npz(scenes.train.detection("calib"), tmp_path / "calib.npz")
    monkeypatch.chdir(tests_dir)
    base = ["compress", "--model", "fixtures_models:yolov8_raw_test", "--weights", tmp_path / "raw.pt",
            "--calib", tmp_path / "calib.npz", "--num-calib", 32, "--target", "x86-avx2", "--no-speed-check"]
    code, out, err = run_main(base + ["--decode", "fixtures_models:decode_yolov8_test", "--out", tmp_path / "d.onnx"])
    assert code == 0, err
    assert "stay float (the box decode, fixtures_models:decode_yolov8_test):" in out
    assert run_batches(make_session(tmp_path / "d.onnx"), scenes.test.x[:2], 2).shape == (2, 7, 80)
    code, out, err = run_main(base + ["--out", tmp_path / "raw.onnx"])
    assert code == 2 and "a detector's raw head outputs: name the decode" in err
    code, out, err = run_main(base + ["--decode", "fixtures_models:no_such", "--out", tmp_path / "x.onnx"])
    assert code == 2 and "module 'fixtures_models' has no attribute 'no_such' (decode spec" in err
