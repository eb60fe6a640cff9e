"""Tests of QuantConfig.keep_float / --keep-float: layers kept in float by name, regex or type,
listed with their reason, counted at 32 bits (also in a mixed-precision bits budget)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fqexport.cli import main
from fqexport.config import MixedPrecisionConfig, QuantConfig, WeightSpec
from fqexport.errors import ConfigError, UnsupportedLayerError
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.ort_session import fused_kernels, kernel_summary, optimized_graph
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.graph.prepare import MSG_ALL_KEPT_FLOAT, keep_float_match, prepare_model
from fqexport.pipeline.compress import compress
from fqexport.search.allocation import Budget, LayerCost, budget_capacity
from fqexport.search.mixed_precision import search_mixed_precision


@pytest.mark.parametrize("patterns, name, module, hit", [
    (("fc",), "fc", nn.Linear(2, 2), "fc"),
    (("fc",), "fc2", nn.Linear(2, 2), None),  # a name matches whole, not as a prefix
    ((r"conv_.*",), "conv_a", nn.Conv2d(1, 1, 1), r"conv_.*"),
    (("type:Conv2d",), "stem", nn.Conv2d(1, 1, 1), "type:Conv2d"),
    (("type:_ConvNd",), "stem", nn.Conv2d(1, 1, 1), "type:_ConvNd"),  # a base class by name
    ((nn.Linear,), "head", nn.Linear(2, 2), "type:Linear"),
    ((nn.Linear,), "stem", nn.Conv2d(1, 1, 1), None),
])
def test_patterns_match_names_regexes_and_types(patterns, name, module, hit):
    spec = WeightSpec(keep_float=patterns)
    assert keep_float_match(name, module, spec.keep_float) == hit


@pytest.mark.parametrize("value, message", [
    ((3,), "keep_float[0]=3 must be a module name or regex (a str), 'type:ClassName', or an nn.Module subclass"),
    (("fc", ""), "keep_float[1]='' must be a module name or regex"),
    (("layer[",), "keep_float[0]='layer[' is not a valid regular expression"),
])
def test_bad_patterns_are_config_errors_naming_the_entry(value, message):
    with pytest.raises(ConfigError) as err:
        QuantConfig(keep_float=value)
    assert str(err.value).startswith(message)
    assert QuantConfig(keep_float="fc").keep_float == ("fc",)  # one pattern given as a string


def test_kept_layers_stay_float_listed_with_their_reason_and_count_32_bits(cnn_model, cnn_data, tmp_path):
    cm = compress(cnn_model, cnn_data, QuantConfig(num_calib=128, keep_float=("fc", r"conv_[ab]")), progress=False)
    assert sorted(cm.layers) == ["dw", "pw", "stem"]
    floats = {f.name: f for f in cm.metadata.float_layers}
    assert floats["fc"].reason == "keep_float: fc" and floats["conv_a"].reason == "keep_float: conv_[ab]"
    assert floats["fc"].bits == 32 and floats["fc"].storage == "float32"
    q = sum(l.params for l in cm.layers.values())
    f = sum(x.params for x in floats.values())
    assert cm.avg_weight_bits == pytest.approx((8 * q + 32 * f) / (q + f))
    assert {r["name"]: r["reason"] for r in cm.layer_table()}["conv_b"] == "keep_float: conv_[ab]"
    res = export_qdq(cm, tmp_path / "kept.onnx")  # the export check still holds
    assert res.storage == {"stem": "int8", "dw": "int8", "pw": "int8"}
    inits = {i.name for i in onnx.load(str(res.path)).graph.initializer}
    assert "fc.weight" in inits and "fc.weight_quantized" not in inits  # the weight stays a float initializer
    assert [r.reason for r in read_metadata(res.path).float_layers if r.name == "fc"] == ["keep_float: fc"]
    # conv_a and conv_b read float tensors: ORT's WeightBiasQuantization, which quantizes a float
    # Conv's weights itself (per tensor) when its input comes from a DequantizeLinear, leaves them
    # float; the stem's output, read by conv_a too, runs as a float Conv over its int8 weights
    assert fused_kernels(res.path)["QLinearConv"] == 2  # dw, pw
    # validate's float line names those layers, not ORT's renamed nodes (FusedConv:n2, t9_nchwc)
    floats = kernel_summary(res.path)[1]
    assert sorted(f.split(" (")[0] for f in floats) == ["conv_a", "conv_b", "fc", "stem"], floats
    ort_made = [t.name for t in optimized_graph(res.path, "cpu", weights=False).graph.initializer
                if t.name.endswith("_weight_q")]
    assert ort_made == []


def test_keeping_every_layer_float_is_refused(cnn_model, cnn_data):
    with pytest.raises(UnsupportedLayerError) as err:
        compress(cnn_model, cnn_data, QuantConfig(num_calib=64, keep_float=("type:Conv2d", "type:Linear")),
                 progress=False)
    assert str(err.value) == MSG_ALL_KEPT_FLOAT.format(patterns=["type:Conv2d", "type:Linear"],
                                                       layers="stem, conv_a, conv_b, dw, pw, fc")


def test_a_bits_budget_counts_float_weights_at_32_bits():
    infos = [LayerCost("a", 1000, 0, 10), LayerCost("b", 3000, 0, 10)]
    assert budget_capacity(infos, Budget("bits", 4.0)) == 4.0 * 4000
    # 1000 float weights at 32 bits leave B·(4000 + 1000) − 32·1000 for the quantized ones
    assert budget_capacity(infos, Budget("bits", 8.0, float_params=1000)) == 8.0 * 5000 - 32 * 1000


def test_the_search_leaves_kept_layers_out_and_pays_for_them(mlp_model, mlp_data):
    base = QuantConfig(num_calib=128, batch_size=128, keep_float=("fc3",))
    mp = MixedPrecisionConfig(budget_bits=4.0, sensitivity_samples=128, mw_steps=10, num_candidates=1,
                              verify_mean=False)
    res = search_mixed_precision(mlp_model, mlp_data, mp, base, progress=False)
    assert set(res.allocation.bits) == {"fc1", "fc2"} and "fc3" not in res.compressed.layers
    fc3 = mlp_model.fc3.weight.numel()
    q = {n: l for n, l in res.compressed.layers.items()}
    # the quantized layers' stored bits plus fc3 at 32 bits stay within 4 bits per weight overall,
    # and the report says so: its figures average over every weight, as the budget does
    params = sum(l.params for l in q.values())
    assert res.allocation.stored_bits <= 4.0 + 1e-9 and res.allocation.used == res.allocation.stored_bits
    quantized_only = (res.allocation.stored_bits * (params + fc3) - 32 * fc3) / params
    assert 0 < quantized_only < res.allocation.stored_bits  # fc3's 32 bits are in the average
    assert res.allocation.avg_bits == pytest.approx(
        (sum(res.allocation.bits[n] * q[n].params for n in q) + 32 * fc3) / (params + fc3))


def test_cli_keep_float_is_repeatable_and_reported(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)  # 'fixtures_models:tiny_mlp' resolves from the working directory
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compress", "--model", "fixtures_models:tiny_mlp", "--weights", str(mlp_files / "mlp.pt"),
                     "--calib", str(mlp_files / "calib.npz"), "--num-calib", "128", "--keep-float", "fc1",
                     "--keep-float", "fc[1]", "--out", str(tmp_path / "m.onnx"),
                     "--report", str(tmp_path / "r.json")])
    assert code == 0, err.getvalue()
    assert "1 weight layer(s) stay in float by --keep-float (reason above)" in out.getvalue()
    layers = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert {r["name"]: r["reason"] for r in layers} == {"fc2": "", "fc3": "", "fc1": "keep_float: fc1"}


class _SharedHidden(nn.Module):
    """A layer called twice (weight sharing, as a DFL conv applied per scale): quantizable only when kept float."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(features, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, x):
        return self.out(self.shared(torch.relu(self.shared(torch.relu(self.inp(x))))))


class _SharedFunctional(nn.Module):
    """One Parameter read by F.linear at two sites (and a Linear module once)."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.inp = nn.Linear(features, 16)
        self.w = nn.Parameter(torch.randn(16, 16) * 0.2)
        self.out = nn.Linear(16, classes)

    def forward(self, x):
        h = torch.relu(torch.nn.functional.linear(torch.relu(self.inp(x)), self.w))
        return self.out(torch.relu(torch.nn.functional.linear(h, self.w)))


def test_a_functional_weight_called_twice_is_listed_as_called_twice(mlp_data):
    """survey 73: listed as a bare "F.linear", reason unsupported, as if F.linear were unsupported
    (the same F.linear at one site is quantized)."""
    model = _SharedFunctional(mlp_data.x.shape[1], int(mlp_data.y.max()) + 1).eval()
    cm = compress(model, mlp_data, QuantConfig(num_calib=64), progress=False)
    assert sorted(cm.layers) == ["inp", "out"]
    assert [(f.name, f.kind, f.params) for f in cm.metadata.float_layers] == [
        ("w", "F.linear called 2 times in forward()", 256)]


def test_a_layer_called_twice_stays_float_like_a_tied_weight(mlp_data):
    """One module at two call sites (timm CoaT's shared conv position encoding) stays float with a
    warning, as layers fqexport cannot quantize do; compress refused the whole model before."""
    import torch

    model = _SharedHidden(mlp_data.x.shape[1], int(mlp_data.y.max()) + 1).eval()
    cm = compress(model, mlp_data, QuantConfig(num_calib=64), progress=False)
    assert sorted(cm.layers) == ["inp", "out"]
    assert [(f.name, f.kind, f.reason) for f in cm.metadata.float_layers] == [
        ("shared", "Linear called 2 times in forward()", "unsupported")]
    with torch.no_grad():  # the float model still calls the one layer twice
        torch.testing.assert_close(cm.float_model(torch.from_numpy(mlp_data.x[:8])),
                                   model(torch.from_numpy(mlp_data.x[:8])), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedLayerError, match=r"'shared' \(Linear called 2 times in forward\(\), 256 params\)"):
        compress(model, mlp_data, QuantConfig(num_calib=64, strict=True), progress=False)
    # naming it in keep_float too (what the old error advised) keeps the same model, the layer counted once
    cm = compress(model, mlp_data, QuantConfig(num_calib=64, keep_float=("shared",)), progress=False)
    assert sorted(cm.layers) == ["inp", "out"]
    assert [f.name for f in cm.metadata.float_layers] == ["shared"]


def test_a_pattern_that_matches_no_layer_is_refused_naming_the_layers(mlp_model, mlp_data, mlp_files, tests_dir,
                                                                       tmp_path, monkeypatch):
    """A typo in --keep-float quantized the layer the user meant to keep float, with only a
    warning (pins that match nothing were refused already): refused, naming every unmatched
    pattern and the layers, from the API and the CLI (exit 2, nothing written)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).eval()
    assert prepare_model(model, keep_float=("2",)).skipped == frozenset({"2"})
    with pytest.raises(ConfigError) as err:
        prepare_model(model, keep_float=("2", "fcc", nn.LSTM))
    assert str(err.value).startswith("keep_float 'fcc', 'type:LSTM' match no quantizable layer of the model, so "
                                     "the layer meant to stay float would be quantized (layers: 0, 2)")
    with pytest.raises(ConfigError, match=r"^keep_float 'fcc' matches no quantizable layer"):
        prepare_model(model, keep_float=("fcc",))
    with pytest.raises(ConfigError, match="keep_float 'fc9' matches no"):
        compress(mlp_model, mlp_data, QuantConfig(num_calib=64, keep_float=("fc9",)), progress=False)
    monkeypatch.chdir(tests_dir)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compress", "--model", "fixtures_models:tiny_mlp", "--weights", str(mlp_files / "mlp.pt"),
                     "--calib", str(mlp_files / "calib.npz"), "--keep-float", "fc9", "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "keep_float 'fc9' matches no quantizable layer" in err.getvalue()
    assert not (tmp_path / "m.onnx").exists()


def test_probabilities_are_warned_about_for_each_model(caplog):
    """The warning was keyed on 'the model' once per process: a second model returning
    probabilities was never warned (survey 42)."""
    from fqexport.tasks.classification import warn_if_probabilities

    rows = np.array([[0.2, 0.8], [0.6, 0.4]])
    with caplog.at_level("WARNING"):
        warn_if_probabilities(rows, "the model")
        warn_if_probabilities(rows, "the model")  # the same outputs read again: once
        warn_if_probabilities(rows[::-1], "the model")  # another model's
    assert caplog.text.count("the model returns probabilities") == 2


class _PaddedCNN(nn.Module):
    """Two circular-padded convs (left float: unsupported) and a plain one, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, padding_mode="circular")
        self.c3 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))).mean((2, 3)))


def test_a_layer_both_unsupported_and_kept_float_is_counted_once():
    """The survey: float_layers listed c1 and c2 twice (unsupported, then keep_float), and the
    quantized fraction and average bits counted their parameters twice."""
    from fqexport.calibration.group_data import GroupData

    torch.manual_seed(0)
    net = _PaddedCNN().eval()
    x = torch.randn(32, 2, 8, 8)
    data = GroupData(x.numpy(), net(x).argmax(1).numpy(), (torch.arange(32) % 2).numpy(), ("a", "b"), "mem")
    cm = compress(net, data, QuantConfig(weight_bits=8, num_calib=32, keep_float=("type:Conv2d",)), progress=False)
    meta = cm.metadata
    assert [f.name for f in meta.float_layers] == ["c1", "c2", "c3"]
    conv = sum(m.weight.numel() for m in (net.c1, net.c2, net.c3))
    fc = net.fc.weight.numel()
    assert meta.quantized_fraction == pytest.approx(fc / (fc + conv), abs=1e-6)
    assert meta.avg_weight_bits == pytest.approx((8 * fc + 32 * conv) / (fc + conv), abs=1e-4)


def test_a_conv_transpose_costs_one_scale_per_output_channel():
    """The search priced a ConvTranspose2d's scales per input channel (its weight's axis 0);
    the exporter writes one per output channel (axis 1)."""
    from fqexport.search.costs import layer_costs

    net = nn.Sequential(nn.Conv2d(2, 16, 3), nn.ConvTranspose2d(16, 4, 2, stride=2), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(1, 2, 6, 6))
    costs = {c.name: c for c in layer_costs(net.eval(), torch.randn(1, 2, 6, 6))}
    assert (costs["0"].channels, costs["1"].channels, costs["3"].channels) == (16, 4, 3)


class _Siamese(nn.Module):
    """Two convs sharing one weight Parameter (``b.weight = a.weight``), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(3, 8, 3)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x).mean((2, 3)), self.b(x.flip(-1)).mean((2, 3))], 1))


def test_layers_sharing_one_weight_stay_float_and_export(tmp_path):
    """The survey: tied modules were quantized twice (the second grid overwrote the first in the
    one tensor the reference holds) and export then failed. One tensor cannot hold two grids:
    both stay float, the tensor counted once."""
    from fqexport.calibration.group_data import GroupData

    torch.manual_seed(0)
    net = _Siamese().eval()
    x = torch.randn(32, 3, 8, 8)
    data = GroupData(x.numpy(), net(x).argmax(1).numpy(), (torch.arange(32) % 2).numpy(), ("a", "b"), "mem")
    cm = compress(net, data, QuantConfig(weight_bits=8, num_calib=32), progress=False)
    assert list(cm.layers) == ["fc"]
    floats = {f.name: (f.params, f.reason) for f in cm.metadata.float_layers}
    assert floats == {"a": (216, "unsupported"), "b": (0, "unsupported")}
    assert cm.metadata.avg_weight_bits == pytest.approx((8 * 48 + 32 * 216) / 264, abs=1e-4)
    export_qdq(cm, tmp_path / "m.onnx")
    assert read_metadata(tmp_path / "m.onnx").float_layers[0].kind == "Conv2d with its weight tied to 'b'"


def test_a_width_for_a_layer_kept_float_names_the_clash(mlp_model, mlp_data):
    """It said the layer was "not a quantizable layer of the model" (survey 44)."""
    with pytest.raises(ConfigError, match=r"layer_bits gives a width to 'fc3', which stays float \(keep_float: fc3\): "
                                          r"drop it from layer_bits or from keep_float"):
        compress(mlp_model, mlp_data, QuantConfig(num_calib=64, keep_float=("fc3",), layer_bits={"fc3": 4}),
                 progress=False)


class _GRUHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h, _ = self.gru(self.inp(x.reshape(x.shape[0], 4, 4)))
        return self.out(h[:, -1])


def test_strict_accepts_an_unsupported_layer_that_keep_float_names(caplog):
    """--strict --keep-float gru was refused ("refuses float layers: 'gru'"): no way to accept one
    GRU and stay strict about the rest (survey 44). It is recorded as kept by the pattern."""
    from fqexport.calibration.checks import validate_group_data

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    data = validate_group_data(x, np.arange(64) % 2, np.arange(64) % 2, ["a", "b"], "g.npz")
    with pytest.raises(UnsupportedLayerError, match="'gru'"):
        compress(_GRUHead().eval(), data, QuantConfig(num_calib=64, strict=True), progress=False)
    with caplog.at_level("WARNING"):
        cm = compress(_GRUHead().eval(), data, QuantConfig(num_calib=64, strict=True, keep_float=("gru",)),
                      progress=False)
    assert [(f.name, f.reason) for f in cm.metadata.float_layers] == [("gru", "keep_float: gru")]
    assert sorted(cm.layers) == ["inp", "out"]
    assert "matches no quantizable layer" not in caplog.text and "stay in float" not in caplog.text
