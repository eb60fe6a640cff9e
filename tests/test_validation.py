"""Tests of fqexport/validation/gate.py (and the measuring in measure.py) on a tiny exported CNN and its QDQ version."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

import fqexport
from fixtures_models import saturating_qdq_gemm
from fqexport.calibration.group_data import GroupData
from fqexport.errors import ConfigError, DataError
from fqexport.exporters.cpu_isa import cpu_isa, runs_natively
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.validation.gate import validate
from fqexport.validation.thresholds import Thresholds

# what these tests expect depends on the int8 kernels: CI also runs them as if on each CPU family
# (FQEXPORT_HOST_KERNELS=x86-avx2|x86-vnni|arm64 pytest -m isa)
pytestmark = pytest.mark.isa


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


# MACs per sample: c1 36·4·(1·9) + c2 36·4·(4·9) + fc 144·3
MACS = 36 * 4 * 9 + 36 * 4 * 36 + 144 * 3
PARAMS = 4 * 9 + 4 * 36 + 144 * 3  # weights only (biases are not weights)


def _quantize(src, dst, x, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
              weight_type=QuantType.QInt8):
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"x": x[i : i + 32]} for i in range(0, len(x), 32))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=quant_format, per_channel=True,
                    activation_type=activation_type, weight_type=weight_type)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("val")
    net = CNN().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 1, 6, 6)).astype(np.float32)
    x[::5] *= 3.0  # a "minority" with larger activations
    torch.onnx.export(net, (torch.from_numpy(x[:2]),), str(d / "float.onnx"), dynamo=True, opset_version=21,
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    _quantize(d / "float.onnx", d / "qdq.onnx", x)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)  # float model is 100 % right
    group = (np.arange(240) % 5 == 0).astype(np.int64)
    data = GroupData(x, y, group, ("majority", "minority"), "test-data")
    return d, data


def _independent(path, data, optimized=True):
    logits = run_batches(make_session(path, optimized=optimized), data.x, 50).astype(np.float64)
    pred = logits.argmax(1)
    z = logits - logits.max(1, keepdims=True)
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(pred)), data.y]
    out = {}
    for gid, name in enumerate(data.group_names):
        m = data.group == gid
        out[name] = (float((pred[m] == data.y[m]).mean()), float(ce[m].mean()))
    return out, logits


def test_report_numbers_match_independent_computation(setup):
    d, data = setup
    r = validate(d / "qdq.onnx", data, reference=d / "float.onnx", measure_latency=False)
    mine, logits = _independent(d / "qdq.onnx", data)
    raw, _ = _independent(d / "qdq.onnx", data, optimized=False)
    for name, (acc, loss) in mine.items():
        assert r.metrics.by_group[name]["accuracy"] == pytest.approx(acc)
        assert r.metrics.by_group[name]["loss"] == pytest.approx(loss, rel=1e-5)
        assert r.reference_metrics.by_group[name]["accuracy"] == 1.0
        assert r.group_drop[name] == pytest.approx(1.0 - acc)
        assert r.kernel_deviation_by_group[name] == pytest.approx(abs(acc - raw[name][0]))
    # labels are the float model's argmax: agreement with the reference == overall accuracy
    assert r.agreement == pytest.approx(r.metrics.overall["accuracy"])
    assert r.kernel_deviation == pytest.approx(max(r.kernel_deviation_by_group.values()))
    assert r.fused_kernels["QLinearConv"] == 2 and r.fused_kernels["QGemm"] == 1
    assert r.fused_kernels["Conv"] == 0 and r.float_fallbacks == ()
    assert r.size_bytes == (d / "qdq.onnx").stat().st_size
    assert r.avg_weight_bits == 8.0 and r.params == PARAMS and r.macs == MACS
    assert r.bops == 8 * 8 * MACS
    assert r.pepr == pytest.approx(r.metrics.overall["accuracy"] / (1 + 8 / 32))
    assert r.passed and r.checks == ()
    as_json = json.loads(json.dumps(r.to_dict(), allow_nan=False))  # JSON-safe: no NaN, no numpy types
    assert as_json["metrics"]["by_group"]["minority"]["accuracy"] == pytest.approx(mine["minority"][0])


def test_float_model_has_32_bits_and_float_bops(setup):
    d, data = setup
    r = validate(d / "float.onnx", data, measure_latency=False)
    assert r.metrics.overall["accuracy"] == 1.0
    assert r.avg_weight_bits == 32.0 and r.bops == 32 * 32 * MACS and r.resource_source == "graph"
    assert r.kernel_deviation < 1e-9
    assert r.fused_kernels["QLinearConv"] == 0 and len(r.float_fallbacks) == 3
    assert r.pepr == pytest.approx(0.5)  # 1 / (1 + 32/32)


def test_qoperator_and_dynamic_files_count_their_int8_weights(setup):
    """ORT's QOperator (QLinearConv/QGemm) and quantize_dynamic (ConvInteger/MatMulInteger) files: 8-bit
    weights and activations, not an fp32 model (they had 32 bits, 0 params and a float PePR)."""
    from onnxruntime.quantization import quantize_dynamic

    from fqexport.validation.resources import from_graph

    d, data = setup
    _quantize(d / "float.onnx", d / "qop.onnx", data.x, QuantFormat.QOperator)
    quantize_dynamic(str(d / "float.onnx"), str(d / "dyn.onnx"), weight_type=QuantType.QInt8)
    for name in ("qop", "dyn", "qdq"):
        res = from_graph(onnx.load(str(d / f"{name}.onnx")))
        assert (res.avg_weight_bits, res.params) == (8.0, PARAMS), name
        assert res.bops == 8 * 8 * MACS, name  # a QGemm: K·N per sample without shape inference (survey 33)
    dyn = from_graph(onnx.load(str(d / "dyn.onnx")))
    assert dyn.macs == MACS


def test_an_emulated_target_names_the_int8_activation_nodes_it_ran_natively(setup, tmp_path, capsys):
    """ORT's QOperator file of int8 activations (QLinearConv/QGemm S8S8) is not emulated: --target
    x86-avx2 runs those nodes with this CPU's kernels, which report.json, the notes (report.md,
    JUnit) and the console say (survey 72: only a log line did; the console said "emulated")."""
    from fqexport.calibration.npz import save_npz
    from fqexport.cli import main
    from fqexport.validation.reports import md_text, to_markdown, write_junit

    d, data = setup
    _quantize(d / "float.onnx", tmp_path / "s8s8.onnx", data.x, QuantFormat.QOperator, activation_type=QuantType.QInt8)
    report = validate(tmp_path / "s8s8.onnx", data, targets=("x86-avx2",), measure_latency=False, kernel_check=False)
    entry = report.to_dict()["targets"]["x86-avx2"]
    if runs_natively("x86-avx2"):  # this CPU is the target: nothing is emulated, nothing to note
        assert entry["emulated"] is False and entry["native_nodes"] == [] and report.notes == ()
        return
    nodes = entry["native_nodes"]
    assert entry["emulated"] is True and entry["emulated_nodes"] == []
    assert sorted(n.split(":")[0] for n in nodes) == ["QGemm", "QLinearConv", "QLinearConv"], nodes
    (note,) = report.notes
    assert note.startswith(f"target x86-avx2: 3 integer node(s) are not emulated ({nodes[0]}, ")
    assert f"this {report.cpu_isa} CPU's own kernels, so the x86-avx2 figures hold this CPU's sums" in note
    assert f"note: {md_text(note)}" in to_markdown(report)
    assert note in write_junit(report, tmp_path / "j.xml").read_text()
    save_npz(data, tmp_path / "test.npz")
    assert main(["validate", str(tmp_path / "s8s8.onnx"), "--data", str(tmp_path / "test.npz"),
                 "--target", "x86-avx2", "--no-latency", "--no-kernel-check"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("target x86-avx2 ("))
    assert "(emulated; 3 node(s) not emulated, on this CPU's own kernels)" in line, line


def test_16_bit_qdq_files_count_16_bit_weights_and_activations(setup):
    """A W16A16 file counted its int16 weights at 32 bits (float: a PePR of fp32) and a W8A16 file
    its activations at 8 (half its BOPs) (survey 54): each counts at its codes' width."""
    from fqexport.validation.resources import from_graph

    d, data = setup
    for name, a_type, w_type, bits in (("a16w16", QuantType.QUInt16, QuantType.QInt16, 16),
                                       ("a16w8", QuantType.QUInt16, QuantType.QInt8, 8)):
        _quantize(d / "float.onnx", d / f"{name}.onnx", data.x, activation_type=a_type, weight_type=w_type)
        res = from_graph(onnx.load(str(d / f"{name}.onnx")))
        assert (res.avg_weight_bits, res.params, res.float_params) == (bits, PARAMS, 0), name
        assert res.bops == bits * 16 * MACS, name


def test_a_weight_two_nodes_share_counts_once_in_params_and_twice_in_macs():
    """A layer called twice is one stored weight: counted twice, validate took an untouched file for
    one edited after export (survey 28)."""
    from onnx import TensorProto, helper, numpy_helper

    from fqexport.validation.resources import from_graph

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    res = from_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert (res.params, res.float_params, res.macs) == (16, 16, 32)


def test_a_dynamically_quantized_file_is_warned_to_depend_on_the_batch(setup, caplog):
    """quantize_dynamic's per-batch ranges made per-group accuracy change with --batch-size, unsaid (survey 33)."""
    from onnxruntime.quantization import quantize_dynamic

    d, data = setup
    quantize_dynamic(str(d / "float.onnx"), str(d / "dyn_b.onnx"), weight_type=QuantType.QInt8)
    with caplog.at_level("WARNING"):
        validate(d / "dyn_b.onnx", data, measure_latency=False, kernel_check=False, batch_size=32)
    assert "quantizes its activations with one range per batch (DynamicQuantizeLinear" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        validate(d / "dyn_b.onnx", data, measure_latency=False, kernel_check=False, batch_size=1)
    assert "one range per batch" not in caplog.text


def _graph_model(nodes, inits, x_shape, y_shape, opsets=(("", 21),)):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def test_graph_resources_of_float16_cast_weights_conv_transpose_and_qgemm():
    """float16 weights behind a Cast were 0 params at 32 bits; ConvTranspose MACs were Cout·s²/Cin off;
    a QGemm (no shape inference rule) made every MAC unknown (survey 33)."""
    from onnx import TensorProto, helper, numpy_helper

    from fqexport.validation.resources import from_graph

    w16 = numpy_helper.from_array(np.ones((4, 3), np.float16), "w16")
    cast = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT), helper.make_node("Gemm", ["x", "w"], ["y"])]
    res = from_graph(_graph_model(cast, [w16], [1, 4], [1, 3]))
    assert (res.params, res.avg_weight_bits, res.macs) == (12, 16.0, 12)
    wt = numpy_helper.from_array(np.ones((16, 8, 2, 2), np.float32), "wt")
    up = [helper.make_node("ConvTranspose", ["x", "wt"], ["y"], strides=[2, 2])]
    res = from_graph(_graph_model(up, [wt], [1, 16, 4, 4], [1, 8, 8, 8]))
    assert res.macs == 4 * 4 * 16 * 8 * 2 * 2  # each of the 16 input pixels meets the whole 16·8·2·2 kernel


def test_graph_macs_pass_through_ort_contrib_ops():
    """ONNX's shape inference knows no com.microsoft op: after a MatMulNBits every shape was
    unknown, and so were the MACs and BOPs of ORT's own 4-bit files (survey 40)."""
    from onnx import TensorProto, helper, numpy_helper

    from fqexport.validation.resources import from_graph

    # two MatMulNBits (K=16 -> N=8 -> N=4, 4 bits, block 16) behind each other, as ORT's quantizer writes them
    def nbits(name, k, n, inp, out):
        blob = numpy_helper.from_array(np.zeros((n, 1, 8), np.uint8), f"{name}.b")
        scales = numpy_helper.from_array(np.ones(n, np.float32), f"{name}.s")
        return helper.make_node("MatMulNBits", [inp, blob.name, scales.name], [out], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=16), [blob, scales]

    n1, i1 = nbits("a", 16, 8, "x", "h")
    n2, i2 = nbits("b", 8, 4, "r", "y")
    graph = helper.make_graph([n1, helper.make_node("Relu", ["h"], ["r"]), n2], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], i1 + i2)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    res = from_graph(model)
    assert (res.params, res.avg_weight_bits, res.macs) == (16 * 8 + 8 * 4, 4.0, 16 * 8 + 8 * 4)
    assert res.bops == 4 * 32 * (16 * 8 + 8 * 4)


def test_graph_macs_of_a_graph_whose_shapes_stay_partly_unknown_write_no_file(tmp_path, monkeypatch):
    """ORT's ``infer_shapes`` saved ``sym_shape_infer_temp.onnx`` into the current directory when some
    shape stayed unknown (a custom-domain op) and raised, so the MACs before that op were lost too."""
    from onnx import TensorProto, helper, numpy_helper

    from fqexport.validation.resources import from_graph

    monkeypatch.chdir(tmp_path)
    blob = numpy_helper.from_array(np.zeros((8, 1, 8), np.uint8), "a.b")
    scales = numpy_helper.from_array(np.ones(8, np.float32), "a.s")
    nbits = helper.make_node("MatMulNBits", ["x", "a.b", "a.s"], ["h"], domain="com.microsoft",
                             K=16, N=8, bits=4, block_size=16)
    graph = helper.make_graph([nbits, helper.make_node("Mystery", ["h"], ["y"], domain="my.ops")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [blob, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid("my.ops", 1)])
    res = from_graph(model)
    assert list(tmp_path.iterdir()) == []
    assert (res.params, res.macs, res.bops) == (16 * 8, 16 * 8, 4 * 32 * 16 * 8)


def test_graph_bops_count_a_float16_activation_at_16_bits():
    """A float16 model's BOPs counted its activations at 32 bits (16 · 32 · MACs): they are 16 wide."""
    from onnx import TensorProto, helper, numpy_helper

    from fqexport.validation.resources import from_graph

    w = numpy_helper.from_array(np.ones((4, 3), np.float16), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3])], [w])
    res = from_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert (res.avg_weight_bits, res.macs, res.bops) == (16.0, 12, 16 * 16 * 12)
    fp32 = from_graph(_graph_model([helper.make_node("Gemm", ["x", "w32"], ["y"])],
                                   [numpy_helper.from_array(np.ones((4, 3), np.float32), "w32")], [1, 4], [1, 3]))
    assert fp32.bops == 32 * 32 * 12


def test_thresholds_fail_and_name_group_value(setup):
    d, data = setup
    # The float model's labels with a quarter of the minority relabelled: no model can score 100 % on
    # both groups here, whatever its kernels do (on a VNNI CPU the QDQ model matches float exactly).
    y = data.y.copy()
    flipped = np.flatnonzero(data.group == 1)[:12]
    y[flipped] = (y[flipped] + 1) % 3
    noisy = GroupData(data.x, y, data.group, data.group_names, "noisy")
    r_free = validate(d / "qdq.onnx", noisy, reference=d / "float.onnx", measure_latency=False, kernel_check=False)
    worst, acc = r_free.metrics.group_min()
    assert worst == "minority" and acc <= 0.80
    limit = float(np.ceil(100 * acc + 1))  # just above what the model reaches
    t = Thresholds(min_acc=0.0, min_worst_group_acc=limit, max_group_drop=100.0, max_size_mb=1e-6,
                   max_latency_ms=1e4)
    r = validate(d / "qdq.onnx", noisy, reference=d / "float.onnx", thresholds=t, kernel_check=False,
                 latency_batch_sizes=(1, 4), repeats=3, warmup=1)
    by = {c.name: c for c in r.checks}
    assert set(by) == {"min_acc", "min_worst_group_acc", "max_group_drop", "max_size_mb",
                       "max_latency_ms[batch=1]", "max_latency_ms[batch=4]"}
    assert not r.passed
    assert [c.name for c in r.failures()] == ["min_worst_group_acc", "max_size_mb"]
    c = by["min_worst_group_acc"]
    assert c.group == worst and c.value == pytest.approx(100 * acc) and c.limit == limit
    assert c.message == f"worst-group accuracy (group 'minority') {100 * acc:.2f} % below --min-worst-group-acc {limit:g}"
    assert by["max_size_mb"].value == pytest.approx((d / "qdq.onnx").stat().st_size / 1e6)
    assert by["max_group_drop"].passed and by["min_acc"].passed


def test_fake_metadata_gives_avg_bits_and_bops(setup, tmp_path):
    d, data = setup
    m = onnx.load(str(d / "qdq.onnx"))
    layers = [
        {"name": "c1", "kind": "conv", "bits": 8, "params": 36, "macs": 1296, "storage": "int8"},
        {"name": "c2", "kind": "conv", "bits": 4, "params": 144, "macs": 5184, "storage": "int4"},
        {"name": "fc", "kind": "linear", "bits": 2, "params": 432, "macs": 432, "storage": "int2"},
    ]
    meta = {"fqexport_version": "0.1.0", "method": "solver", "activation_bits": 8, "layers": layers}
    onnx.helper.set_model_props(m, {"fqexport": json.dumps(meta)})
    onnx.save(m, str(tmp_path / "meta.onnx"))
    r = validate(tmp_path / "meta.onnx", data, measure_latency=False, kernel_check=False)
    assert r.avg_weight_bits == pytest.approx((8 * 36 + 4 * 144 + 2 * 432) / 612)
    assert r.bops == 8 * 8 * 1296 + 4 * 8 * 5184 + 2 * 8 * 432
    assert r.resource_source == "metadata" and r.metadata.method == "solver"


def test_bad_data_raises_specific_errors(setup):
    d, data = setup
    wrong = GroupData(np.zeros((4, 1, 5, 5), np.float32), data.y[:4], data.group[:4], data.group_names, "wrong.npz")
    with pytest.raises(DataError, match=r"data wrong\.npz: x has shape \[1, 5, 5\] .* expects input \[batch, 1, 6, 6\]"):
        validate(d / "qdq.onnx", wrong, measure_latency=False)
    labels = GroupData(data.x[:4], np.array([0, 1, 2, 7]), np.array([0, 1, 0, 1]), data.group_names, "lab.npz")
    with pytest.raises(DataError, match=r"data lab\.npz: sample 3: label 7 is out of range .* 3 outputs"):
        validate(d / "qdq.onnx", labels, measure_latency=False, kernel_check=False)
    empty = GroupData(data.x[:4], data.y[:4], np.zeros(4, np.int64), data.group_names, "e.npz")
    with pytest.raises(DataError, match=r"e\.npz: group 'minority' has no samples"):
        validate(d / "qdq.onnx", empty, measure_latency=False)


def test_options_needing_other_inputs_are_config_errors(setup):
    d, data = setup
    with pytest.raises(ConfigError, match="needs a reference model: pass --reference"):
        validate(d / "qdq.onnx", data, thresholds=Thresholds(max_group_drop=1.0))
    with pytest.raises(ConfigError, match="needs the kernel check"):
        validate(d / "qdq.onnx", data, thresholds=Thresholds(max_kernel_deviation=1.0), kernel_check=False)


def test_npz_path_is_read(setup, tmp_path):
    d, data = setup
    np.savez(tmp_path / "t.npz", x=data.x, y=data.y, group=data.group, group_names=np.array(data.group_names))
    r = validate(d / "float.onnx", tmp_path / "t.npz", measure_latency=False, kernel_check=False)
    assert r.data_source.endswith("t.npz") and r.metrics.overall["count"] == 240
    assert r.metrics.by_group["minority"]["count"] == 48


def test_a_streamed_dataloader_gives_the_group_datas_report(setup):
    d, data = setup
    ref = validate(d / "qdq.onnx", data, reference=d / "float.onnx", measure_latency=False)
    names = np.array(data.group_names)[data.group]
    loader = torch.utils.data.DataLoader(
        [(torch.from_numpy(x), int(y), g) for x, y, g in zip(data.x, data.y, names)], batch_size=32)
    r = validate(d / "qdq.onnx", loader, reference=d / "float.onnx", latency_batch_sizes=(4,), repeats=2, warmup=1)
    assert r.data_source == "<DataLoader of list>"
    assert r.metrics.to_dict() == ref.metrics.to_dict()
    assert r.kernel_deviation_by_group == ref.kernel_deviation_by_group and r.agreement == ref.agreement
    assert r.latency[0].batch_size == 4


def test_data_without_labels_is_named_before_any_session_runs(setup):
    d, data = setup
    x_alone = fqexport.load_data([torch.from_numpy(x) for x in data.x], groups=data.group)
    with pytest.raises(DataError) as info:
        validate(d / "qdq.onnx", x_alone)
    assert str(info.value) == ("validate needs labels: <list> yields no y; give (x, y) or (x, y, group) samples")


# ------------------------------------------------------------- kernel targets (issue 16)


def test_report_names_this_cpu_and_gates_every_target(tmp_path):
    data = saturating_qdq_gemm(tmp_path / "sat.onnx")
    r = validate(tmp_path / "sat.onnx", data, targets=("x86-avx2", "x86-vnni"), measure_latency=False,
                 thresholds=Thresholds(min_worst_group_acc=50, max_kernel_deviation=10))
    assert r.cpu_isa == cpu_isa() and r.targets == ("native", "x86-avx2", "x86-vnni")
    # exact int32 sums: every sample right; AVX2's saturated pairs: the whole minority flips
    assert r.target_metrics["x86-vnni"].by_group["minority"]["accuracy"] == 1.0
    assert r.target_metrics["x86-avx2"].by_group["minority"]["accuracy"] == 0.0
    assert r.target_metrics["x86-avx2"].by_group["majority"]["accuracy"] == 1.0
    native_pred = run_batches(make_session(tmp_path / "sat.onnx"), data.x, 64).argmax(1)
    assert r.target_agreement["x86-vnni"] == pytest.approx(float((native_pred == data.y).mean()))
    assert r.target_agreement["x86-avx2"] == pytest.approx(float((native_pred == 1).mean()))  # AVX2: all class 1
    # the graph's math (unoptimized) is exact, so AVX2's kernel deviation is the minority's 100 pp
    assert r.target_kernel_deviation_by_group["x86-avx2"]["minority"] == pytest.approx(1.0)
    checks = {c.name: c for c in r.checks}
    bad = checks["min_worst_group_acc[target=x86-avx2]"]
    assert not bad.passed and bad.group == "minority" and bad.value == 0.0
    assert bad.message.startswith("x86-avx2: worst-group accuracy (group 'minority') 0.00 % below")
    assert not checks["max_kernel_deviation[target=x86-avx2]"].passed
    assert checks["min_worst_group_acc[target=x86-vnni]"].passed
    assert checks["max_kernel_deviation[target=x86-vnni]"].passed
    assert not r.passed
    # a family this CPU belongs to is judged by its own session (the numbers above hold either way:
    # the emulation equals the native kernels), every other one by the emulation
    assert r.target_native == tuple(t for t in ("x86-avx2", "x86-vnni") if runs_natively(t))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["cpu_isa"] == cpu_isa() and d["targets"]["x86-avx2"]["emulated"] is not runs_natively("x86-avx2")
    assert d["targets"]["x86-avx2"]["metrics"]["by_group"]["minority"]["accuracy"] == 0.0
    # which nodes the emulation computed: the full-range Gemm, fused (survey 54: "emulated" alone said nothing)
    for t in ("x86-avx2", "x86-vnni"):
        nodes = d["targets"][t]["emulated_nodes"]
        assert nodes is None if runs_natively(t) else (len(nodes) == 1 and nodes[0].startswith("QGemm:"))


def test_unknown_target_is_rejected(setup):
    d, data = setup
    with pytest.raises(ConfigError, match="target 'avx2' is not one of native, x86-avx2, x86-vnni, arm64"):
        validate(d / "qdq.onnx", data, targets=("avx2",), measure_latency=False)


def test_native_only_report_has_no_target_checks(setup):
    d, data = setup
    r = validate(d / "qdq.onnx", data, measure_latency=False, kernel_check=False,
                 thresholds=Thresholds(min_worst_group_acc=1))
    assert r.targets == ("native",) and r.target_metrics is None
    assert [c.name for c in r.checks] == ["min_worst_group_acc"]


def test_a_fixed_batch_reference_leaves_every_latency_check_of_the_model(setup, tmp_path):
    """docs/validation.md: one --max-latency-ms check per --latency-batch-sizes entry, with or without
    a reference; a reference fixed to batch 1 is timed at batch 1 only (batch 8 is not compared)."""
    d, data = setup
    float_model = onnx.load(str(d / "float.onnx"))
    float_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(float_model, str(tmp_path / "float_b1.onnx"))
    r = validate(d / "qdq.onnx", data, reference=tmp_path / "float_b1.onnx", latency_batch_sizes=(1, 8), repeats=3,
                 warmup=1, kernel_check=False, thresholds=Thresholds(max_latency_ms=1e4))
    assert [l.batch_size for l in r.latency] == [1, 8] and [l.batch_size for l in r.reference_latency] == [1]
    assert [c.name for c in r.checks] == ["max_latency_ms[batch=1]", "max_latency_ms[batch=8]"]
    assert set(r.speedups()) == {1}
    assert r.speed_verdict().endswith("; batch 8: not compared (the reference runs batch 1 only: a fixed batch)")


def test_a_reference_of_another_input_is_named_before_any_measurement(setup, tmp_path, monkeypatch):
    """The data fits the model, so a reference of another input shape is the reference's fault: the
    error names --reference and both inputs (survey 72: it told the user to fix the data)."""
    import fqexport.validation.gate as gate

    d, data = setup
    other = onnx.load(str(d / "float.onnx"))
    other.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 8  # [batch, 1, 6, 8]
    onnx.save(other, str(tmp_path / "ref_other.onnx"))
    measured = []
    monkeypatch.setattr(gate, "measure_native", lambda *a, **k: measured.append(1))
    with pytest.raises(DataError) as err:
        validate(d / "qdq.onnx", data, reference=tmp_path / "ref_other.onnx", measure_latency=False)
    assert str(err.value).startswith(f"--reference {tmp_path / 'ref_other.onnx'} takes input [batch, 1, 6, 8], "
                                     f"model {d / 'qdq.onnx'} takes [batch, 1, 6, 6], which the data ")
    assert "(per sample [1, 6, 6]): the reference must take the model's input" in str(err.value)
    assert measured == []  # refused before the model's pass over the data


def test_a_label_past_the_outputs_is_refused_before_any_pass_naming_its_sample(setup, tmp_path, monkeypatch):
    """survey 75: the label was refused only after a pass over the whole data (a stream read it a
    second time), with no sample named."""
    import fqexport.validation.gate as gate

    d, data = setup
    y = data.y.copy()
    y[[100, 7]] = 9
    np.savez(tmp_path / "bad.npz", x=data.x, y=y, group=data.group)
    monkeypatch.setattr(gate, "measure_native", lambda *a, **k: pytest.fail("measured before the labels were checked"))
    with pytest.raises(DataError, match=r"bad\.npz: sample 7: label 9 is out of range for model .*qdq\.onnx, which has "
                                        r"\d+ outputs \(labels must be in 0\.\.\d+; 2 sample\(s\) outside\)"):
        validate(d / "qdq.onnx", str(tmp_path / "bad.npz"), measure_latency=False)


def test_with_a_reference_the_reference_is_timed_too_and_the_speed_is_reported(setup):
    d, data = setup
    r = validate(d / "qdq.onnx", data, reference=d / "float.onnx", latency_batch_sizes=(1, 8), repeats=5, warmup=1,
                 kernel_check=False)
    assert [l.batch_size for l in r.reference_latency] == [1, 8] and [l.repeats for l in r.reference_latency] == [5, 5]
    assert r.speedups() == {l.batch_size: l.speedup for l in r.latency}  # the median ratio of the paired runs
    assert all(l.speedup > 0 for l in r.latency) and all(f.speedup is None for f in r.reference_latency)
    assert r.speed_verdict().startswith(f"on this CPU ({cpu_isa()}) the file buys ")
    assert set(r.to_dict()["speedup_vs_reference"]) == {"1", "8"}
    # without a reference nothing is compared
    assert validate(d / "qdq.onnx", data, latency_batch_sizes=(1,), repeats=2, warmup=0,
                    kernel_check=False).speed_verdict() is None


def test_a_gap_limit_over_test_data_of_one_group_fails_naming_it(setup):
    """--max-acc-gap on test data holding one group printed 'PASS ... gap of group 'g' to the best
    group 'g' 0.00 pp', exit 0 (survey 49): a gap between groups needs two."""
    d, data = setup
    keep = np.flatnonzero(data.group == 0)
    one = GroupData(data.x[keep], data.y[keep], data.group[keep], data.group_names[:1], "one-group")
    r = validate(d / "float.onnx", one, thresholds=Thresholds(max_acc_gap=5, min_worst_group_acc=0),
                 measure_latency=False, kernel_check=False)
    gap = next(c for c in r.checks if c.name == "max_acc_gap")
    assert not r.passed and not gap.passed and gap.group == data.group_names[0]
    assert gap.message.startswith(f"accuracy gap: the test data holds one group with samples ({data.group_names[0]!r})")
    assert next(c for c in r.checks if c.name == "min_worst_group_acc").passed  # measurable on one group
    assert validate(d / "float.onnx", data, thresholds=Thresholds(max_acc_gap=100), measure_latency=False,
                    kernel_check=False).passed


def test_group_ids_named_two_ways_are_the_same_groups_to_the_absent_check(setup, tmp_path, caplog):
    """Calibrated on an .npz of string groups "0", "1", "2"; a CSV test column of integers names
    them group0, group1: no name was shared, so a missing group 2 passed the gate (survey 52)."""
    from fqexport.validation.data_checks import absent_groups

    d, data = setup
    test = GroupData(data.x, data.y, data.group, ("group0", "group1"), "test.csv")
    with caplog.at_level("WARNING"):
        assert absent_groups(test, ["0", "1", "2"], "m.onnx") == ("2",)
        assert absent_groups(test, ["0", "1"], "m.onnx") == ()
        assert absent_groups(GroupData(data.x, data.y, data.group, ("0", "1"), "t.npz"), ["group0", "group2"],
                             "m.onnx") == ("group2",)
    assert "no samples of group(s) '2'" in caplog.text
    # "01" names no id: another grouping, warned about, nothing failed
    assert absent_groups(GroupData(data.x, data.y, data.group, ("01", "1x"), "t.npz"), ["0", "1"], "m.onnx") == ()


def test_a_calibrated_group_missing_from_the_test_data_fails_every_per_group_limit(setup, tmp_path, caplog):
    """The file's metadata names the groups it was calibrated on; a test set without one of them
    cannot pass a per-group limit (the survey: exit 0, "worst group majority", the minority never
    measured). Test groups named otherwise are another grouping: a warning, no failure."""
    from fqexport.validation.reports import to_markdown

    d, data = setup
    m = onnx.load(str(d / "qdq.onnx"))
    meta = {"fqexport_version": "0.1.0", "method": "solver", "layers": [],
            "group_names": ["majority", "minority", "rare"]}
    onnx.helper.set_model_props(m, {"fqexport": json.dumps(meta)})
    onnx.save(m, str(tmp_path / "meta.onnx"))
    limits = Thresholds(min_acc=0, min_worst_group_acc=0, max_acc_gap=100)
    with caplog.at_level("WARNING"):
        r = validate(tmp_path / "meta.onnx", data, thresholds=limits, measure_latency=False, kernel_check=False)
    assert r.absent_groups == ("rare",) and "no samples of group(s) 'rare'" in caplog.text
    assert [(c.name, c.passed, c.group) for c in r.checks] == [
        ("min_acc", True, None), ("min_worst_group_acc", False, "rare"), ("max_acc_gap", False, "rare")]
    assert "the test data holds no samples of group(s) 'rare'" in r.checks[1].message
    assert r.to_dict()["absent_groups"] == ["rare"]
    assert "- not in the test data: group(s) 'rare', which the model was calibrated on" in to_markdown(r)
    # without per-group limits: said, not failed
    r = validate(tmp_path / "meta.onnx", data, measure_latency=False, kernel_check=False)
    assert r.passed and r.absent_groups == ("rare",)
    # another grouping (no name shared): a warning only
    other = GroupData(data.x, data.y, data.group, ("young", "old"), "ages")
    caplog.clear()
    with caplog.at_level("WARNING"):
        r = validate(tmp_path / "meta.onnx", other, thresholds=limits, measure_latency=False, kernel_check=False)
    assert r.passed and r.absent_groups == () and "share no name with those" in caplog.text


def test_a_progress_bar_per_pass_over_the_data_and_none_without_progress(setup, capsys):
    """validate read every sample 2-4 times with no feedback (45-68 s for 3000 images, survey 24)."""
    d, data = setup
    # a family this CPU does not run natively (the one it does is judged by the model's own pass)
    target = next(f for f in ("x86-avx2", "x86-vnni") if not runs_natively(f))
    a = validate(d / "qdq.onnx", data, reference=d / "float.onnx", measure_latency=False, targets=("native", target))
    err = capsys.readouterr().err
    for what in ("model", "unoptimized session", "reference", f"{target} (emulated)"):
        assert f"validate: {what}:" in err and f"/{len(data)} " in err, what
    b = validate(d / "qdq.onnx", data, reference=d / "float.onnx", measure_latency=False, targets=("native", target),
                 progress=False)
    assert "validate:" not in capsys.readouterr().err
    assert a.metrics.by_group == b.metrics.by_group  # the chunked passes measure the same


def test_mcnemar_exact_p_values():
    from fqexport.metrics.paired import mcnemar_exact, paired_changes

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # 2 · P[X <= 0], X ~ Bin(5, 1/2)
    assert mcnemar_exact(3, 1) == pytest.approx(2 * (1 + 4) / 16) == mcnemar_exact(1, 3)
    assert mcnemar_exact(50, 50) == 1.0 and mcnemar_exact(2000, 1900) < 0.2  # large n: no overflow
    model = np.array([1, 0, 0, 1, 1, 0], bool)
    ref = np.array([1, 1, 1, 0, 1, 0], bool)
    out = paired_changes(model, ref, np.array([0, 0, 0, 1, 1, 1]), ["a", "b"])
    assert out == {"a": {"count": 3, "worse": 2, "better": 0, "p_value": pytest.approx(0.5)},
                   "b": {"count": 3, "worse": 0, "better": 1, "p_value": 1.0}}


def test_the_paired_changes_explain_each_groups_drop_and_a_limit_finer_than_one_sample_is_warned(
        setup, tmp_path, caplog):
    """A per-group drop on few samples can be one or two predictions: the report carries the
    changed samples per group with McNemar's exact p, and a drop / gap / deviation limit finer
    than one sample of the smallest group (100 / N_g pp) is warned about."""
    d, data = setup
    y = data.y.copy()
    flipped = np.flatnonzero(data.group == 1)[:12]
    y[flipped] = (y[flipped] + 1) % 3
    noisy = GroupData(data.x, y, data.group, data.group_names, "noisy")
    t = Thresholds(max_group_drop=1.0, max_acc_gap=50.0)
    with caplog.at_level("WARNING"):
        r = validate(d / "qdq.onnx", noisy, reference=d / "float.onnx", thresholds=t, measure_latency=False,
                     kernel_check=False)
    for g, c in r.group_changes.items():
        assert c["count"] == r.metrics.by_group[g]["count"]
        assert (c["worse"] - c["better"]) / c["count"] == pytest.approx(r.group_drop[g])
        assert 0.0 <= c["p_value"] <= 1.0
    assert ("--max-group-drop 1 pp is finer than one sample of group 'minority': its 48 test samples make one "
            "prediction worth 2.08 pp of its accuracy") in caplog.text
    assert "--max-acc-gap" not in caplog.text  # 50 pp: many samples
    assert r.to_dict()["reference"]["group_changes"] == {g: dict(c) for g, c in r.group_changes.items()}
    from fqexport.validation.reports import changes_line

    assert changes_line(r).startswith("changed predictions vs reference per group (reference right and model "
                                      "wrong / the reverse; exact McNemar p): majority: ")
    assert validate(d / "qdq.onnx", noisy, measure_latency=False, kernel_check=False).group_changes is None


def test_a_file_holding_fused_integer_kernels_is_judged_against_their_exact_sums(tmp_path, monkeypatch):
    """A QOperator file (QGemm already in it) was judged against its unoptimized session, which runs the
    very same saturating kernels on an AVX2 CPU: k.dev 0.00 natively and on x86-avx2, so the gate passed
    on the CPU that saturates, and the exact x86-vnni target was blamed instead (survey 56)."""
    from fqexport.exporters.cpu_isa import EXACT_FAMILIES, kernel_family
    from fqexport.exporters.kernel_emulation import EmulatedSession
    from fqexport.exporters.ort_session import build_session
    from fqexport.validation import measure
    from fqexport.validation.validation_report import UNOPTIMIZED

    data = saturating_qdq_gemm(tmp_path / "qdq.onnx")
    build_session(tmp_path / "qdq.onnx", level="ORT_ENABLE_EXTENDED", dump_path=tmp_path / "qop.onnx")
    assert "QGemm" in [n.op_type for n in onnx.load(str(tmp_path / "qop.onnx")).graph.node]
    limits = Thresholds(max_kernel_deviation=1.0)
    r = validate(tmp_path / "qop.onnx", data, thresholds=limits, measure_latency=False, targets=("native", "x86-avx2"))
    exact_cpu = kernel_family(cpu_isa()) in EXACT_FAMILIES  # this CPU's own kernels, whatever stands in for them
    # the minority is right with exact sums and wrong under x86-avx2's (this CPU's own on an AVX2 CPU)
    assert r.unoptimized_metrics.by_group["minority"]["accuracy"] == 1.0
    assert r.target_kernel_deviation_by_group["x86-avx2"]["minority"] == 1.0
    assert r.metrics.by_group["minority"]["accuracy"] == (1.0 if exact_cpu else 0.0)
    assert not r.passed and any(c.name == "max_kernel_deviation[target=x86-avx2]" and not c.passed for c in r.checks)
    assert (r.kernel_reference == UNOPTIMIZED) == exact_cpu
    assert r.to_dict()["kernel"]["kernel_reference"] == r.kernel_reference
    # the AVX2 path on any CPU: the exact emulation for the stored QGemm; a QDQ file keeps the unoptimized session
    monkeypatch.setattr(measure, "cpu_isa", lambda: "x86-avx2")
    session, words = measure.graph_math_session(tmp_path / "qop.onnx", measure.Runner())
    assert isinstance(session, EmulatedSession) and words.startswith("the exact integer sums of the 1 fused integer node")
    session, words = measure.graph_math_session(tmp_path / "qdq.onnx", measure.Runner())
    assert words == UNOPTIMIZED and not isinstance(session, EmulatedSession)


def test_a_file_exported_for_another_cpu_family_is_named_with_the_target_to_judge_it_on(setup, tmp_path, caplog):
    """A file exported for x86-vnni with full-range weights, validated on an AVX2 CPU, lost 2.69 pt of its
    minority to saturation natively, and nothing said the file was meant for other kernels (survey 56)."""
    from fqexport.exporters.cpu_isa import host_family

    d, data = setup
    other = next(f for f in ("x86-vnni", "x86-avx2") if f != host_family())
    m = onnx.load(str(d / "qdq.onnx"))
    meta = {"fqexport_version": "0.1.0", "method": "solver", "layers": [], "target": other, "weight_range": "full"}
    onnx.helper.set_model_props(m, {"fqexport": json.dumps(meta)})
    onnx.save(m, str(tmp_path / "other.onnx"))
    with caplog.at_level("WARNING", logger="fqexport.validation.gate"):
        validate(tmp_path / "other.onnx", data, measure_latency=False, kernel_check=False)
    said = caplog.text
    assert (f"other.onnx was exported for --target {other} (the {other} int8 kernels); this CPU's are {host_family()}, "
            "so its native figures are this CPU's deployment, not the target's") in said
    assert f"not the target's{'; its full-range' if host_family() == 'x86-avx2' else ''}" in said
    assert f"add --target {other} to judge it on its target" in said
    assert ("saturate this CPU's 16-bit pair sums" in said) == (host_family() == "x86-avx2")
    caplog.clear()
    with caplog.at_level("WARNING", logger="fqexport.validation.gate"):
        validate(tmp_path / "other.onnx", data, measure_latency=False, kernel_check=False, targets=("native", other))
    assert "was exported for --target" in caplog.text and "to judge it on its target" not in caplog.text
    # a portable file, or one for this CPU's own family: nothing to say
    for target in ("portable", host_family()):
        said = _gate_warnings(m, {**meta, "target": target}, tmp_path / "mine.onnx", data, caplog)
        assert "was exported for --target" not in said


def _gate_warnings(m: onnx.ModelProto, meta: dict, path, data, caplog) -> str:
    """The gate's warnings when ``m`` with the fqexport metadata ``meta``, saved at ``path``, is validated."""
    onnx.helper.set_model_props(m, {"fqexport": json.dumps(meta)})
    onnx.save(m, str(path))
    caplog.clear()
    with caplog.at_level("WARNING", logger="fqexport.validation.gate"):
        validate(path, data, measure_latency=False, kernel_check=False)
    return caplog.text


def test_a_full_range_file_from_before_targets_is_warned_about_on_an_avx2_cpu(setup, tmp_path, caplog, monkeypatch):
    """Files written before the metadata's target field said nothing on an AVX2 CPU where their
    full-range weights saturate (survey 65: the minority moved by 1.23 pt under the AVX2 kernels)."""
    d, data = setup
    m = onnx.load(str(d / "qdq.onnx"))
    meta = {"fqexport_version": "0.1.0", "method": "solver", "layers": [], "weight_range": "full"}  # no target
    monkeypatch.setenv("FQEXPORT_HOST_KERNELS", "x86-avx2")
    assert ("old.onnx records no --target (written before files recorded one) and holds full-range 8-bit weights; "
            "this CPU's int8 kernels are x86-avx2: its full-range weights can saturate this CPU's 16-bit pair sums") \
        in _gate_warnings(m, meta, tmp_path / "old.onnx", data, caplog)
    for family, weights in (("x86-vnni", "full"), ("x86-avx2", "x86-safe")):  # exact sums, or weights that cannot saturate
        monkeypatch.setenv("FQEXPORT_HOST_KERNELS", family)
        assert "records no --target" not in _gate_warnings(m, {**meta, "weight_range": weights}, tmp_path / "old.onnx",
                                                           data, caplog)


def test_an_emulated_target_says_when_no_node_depends_on_the_kernels(cnn_cm8, cnn_data, tmp_path, capsys):
    """report.json said "emulated": true for fqexport's x86-safe file, whose every fused node sums alike on
    every family, so the 'emulated' figures are this CPU's own: only the console said so (survey 54)."""
    from fqexport.cli.validate import print_summary
    from fqexport.exporters.qdq_onnx import export_qdq

    path = export_qdq(cnn_cm8, tmp_path / "w8.onnx").path
    target = next(f for f in ("x86-avx2", "x86-vnni") if not runs_natively(f))
    r = validate(path, cnn_data, measure_latency=False, kernel_check=False, targets=("native", target))
    assert r.to_dict()["targets"][target]["emulated_nodes"] == [] and r.to_dict()["targets"]["native"]["emulated_nodes"] is None
    print_summary(r)
    line = f"target {target} (emulated: no fused node whose sums depend on the kernels, the same as this CPU's)"
    assert line in capsys.readouterr().out


def _with_group_names(src, dst, names):
    m = onnx.load(str(src))
    meta = {"fqexport_version": "0.2.0", "method": "solver", "layers": [], "group_names": list(names)}
    onnx.helper.set_model_props(m, {"fqexport": json.dumps(meta)})
    onnx.save(m, str(dst))
    return dst


def test_a_test_group_the_model_was_not_calibrated_on_is_named_in_every_report(setup, tmp_path, caplog):
    """Survey 68: an 'unseen group' became the worst group and nothing said the calibration never saw it."""
    import xml.etree.ElementTree as ET

    from fqexport.validation.reports import to_junit, to_markdown

    d, data = setup
    path = _with_group_names(d / "float.onnx", tmp_path / "m.onnx", ["majority"])
    with caplog.at_level("WARNING"):
        r = validate(path, data, measure_latency=False, kernel_check=False)
    assert r.passed and r.absent_groups == () and r.uncalibrated_groups == ("minority",)
    assert "group(s) 'minority' were not among the groups" in caplog.text
    assert r.to_dict()["uncalibrated_groups"] == ["minority"]
    assert "- not calibrated on: group(s) 'minority' of the test data" in to_markdown(r)
    assert "not calibrated on: group(s) 'minority'" in to_junit(r).find("system-out").text
    assert ET.tostring(to_junit(r))  # well formed


def test_group_names_in_another_unicode_form_are_the_same_groups(setup, tmp_path):
    """'é' as one code point (NFC, calibration) or as e + U+0301 (NFD, test data): survey 68's gate
    said 'no samples of group minorité' beside a table row of it."""
    d, data = setup
    path = _with_group_names(d / "float.onnx", tmp_path / "m.onnx", ["majority", "minorit\u00e9"])
    test = GroupData(data.x, data.y, data.group, ("majority", "minorite\u0301"), "nfd")
    r = validate(path, test, thresholds=Thresholds(min_worst_group_acc=50), measure_latency=False,
                 kernel_check=False)
    assert r.passed and r.absent_groups == () and r.uncalibrated_groups == ()


def test_a_limit_one_prediction_decides_is_noted_in_every_report(setup, caplog):
    """The small-group caveat reached stderr only, and the worst-group limit had none (survey 68)."""
    from fqexport.validation.reports import to_junit, to_markdown

    d, data = setup  # the minority: 48 test samples, one prediction 2.08 pp; the float model is 100 % right
    with caplog.at_level("WARNING"):
        r = validate(d / "float.onnx", data, thresholds=Thresholds(max_acc_gap=1, min_worst_group_acc=99),
                     measure_latency=False, kernel_check=False)
    assert r.passed and len(r.notes) == 2
    assert r.notes[0].startswith("--max-acc-gap 1 pp is finer than one sample of group 'minority'")
    assert r.notes[1] == ("--min-worst-group-acc 99 % is within one sample of group 'minority': its 48 test samples "
                          "make one prediction worth 2.08 pp, and it is at 100.00 %, so a single prediction decides "
                          "the check; give that group more test samples")
    assert all(n in caplog.text for n in r.notes) and r.to_dict()["notes"] == list(r.notes)
    assert all(f"- note: {n}" in to_markdown(r) for n in r.notes)
    assert all(n in to_junit(r).find("system-out").text for n in r.notes)
    # a limit more than one prediction away, or a difference limit coarser than one: nothing to note
    far = validate(d / "float.onnx", data, thresholds=Thresholds(max_acc_gap=3, min_worst_group_acc=97),
                   measure_latency=False, kernel_check=False)
    assert far.passed and far.notes == () and to_junit(far).find("system-out") is None


def test_an_npz_test_set_is_memory_mapped_and_measures_as_in_memory(setup, tmp_path):
    """validate read a whole .npz into memory (898 MB peak for a 514 MB test set; 355 MB mapped)."""
    from fqexport.calibration.stream import DataStream
    from fqexport.validation.data_checks import read_test_data

    d, data = setup
    np.savez(tmp_path / "t.npz", x=data.x, y=data.y, group=data.group, group_names=np.array(data.group_names))
    assert isinstance(read_test_data(tmp_path / "t.npz"), DataStream)
    mapped = validate(d / "qdq.onnx", tmp_path / "t.npz", measure_latency=False, kernel_check=False)
    held = validate(d / "qdq.onnx", data, measure_latency=False, kernel_check=False)
    assert mapped.metrics.to_dict()["by_group"] == held.metrics.to_dict()["by_group"]


class _KwsGru(torch.nn.Module):
    """Conv1d → GRU (left float by compress) → Linear over the mean step: a keyword spotter's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(8, 16, 3, padding=1)
        self.rnn = torch.nn.GRU(16, 32, batch_first=True)
        self.fc = torch.nn.Linear(32, 3)

    def forward(self, x):
        h, _ = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
        return self.fc(h.mean(1))


def test_recurrent_weights_and_embedding_tables_are_counted_from_the_graph_and_beside_the_metadata(tmp_path):
    """Survey 82: a graph's GRU/LSTM weights and Gather tables were left out of params, bits and MACs
    (ORT's quantize_dynamic file of a KWS model, its GRU float, read 8.00 bits), and fqexport's own
    file priced only its quantized layers' MACs (half of them: the float GRU's were missing)."""
    from onnx import TensorProto, helper, numpy_helper

    from fqexport.validation.resources import from_graph

    steps, W, R = 20, 3 * 32 * 16, 3 * 32 * 32  # GRU: 3 gates · H · (I, H)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 96, 16)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 96, 32)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.standard_normal((50, 16)).astype(np.float32), "table"),
             numpy_helper.from_array(np.array([0, 1], np.int64), "pick"),  # a constant index list: not a table
             # a fixed sinusoidal buffer read at positions the graph computes (fairseq's cumsum): not a weight
             numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "sinusoid"),
             numpy_helper.from_array(np.array(1, np.int64), "axis1"),
             numpy_helper.from_array(np.array(49, np.int64), "vocab_max")]
    nodes = [helper.make_node("Clip", ["ids", "", "vocab_max"], ["clipped"]),  # ids clamped to the vocabulary
             helper.make_node("Gather", ["table", "clipped"], ["e"]),  # [N, T, 16]
             helper.make_node("CumSum", ["ids", "axis1"], ["positions"]),
             helper.make_node("Gather", ["sinusoid", "positions"], ["pe"]),
             helper.make_node("Transpose", ["e"], ["t"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["t", "W", "R"], ["y", "h"], hidden_size=32),
             helper.make_node("Gather", ["pick", "k"], ["p"])]
    graph = helper.make_graph(nodes, "kws", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, steps]),
                                             helper.make_tensor_value_info("k", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("p", TensorProto.INT64, None),
                               helper.make_tensor_value_info("pe", TensorProto.FLOAT, None)], initializer=inits)
    res = from_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert (res.params, res.float_params, res.avg_weight_bits) == (W + R + 50 * 16, W + R + 50 * 16, 32.0)
    assert (res.macs, res.bops) == (steps * (W + R), 32 * 32 * steps * (W + R))

    torch.manual_seed(0)
    model = _KwsGru().eval()
    data = GroupData(rng.standard_normal((64, 8, steps)).astype(np.float32), rng.integers(0, 3, 64),
                     np.arange(64) % 2, ("a", "b"))
    cm = fqexport.compress(model, data, fqexport.QuantConfig(weight_bits=8, num_calib=32), progress=False)
    fqexport.export(cm, tmp_path / "w8.onnx")
    report = validate(tmp_path / "w8.onnx", data, measure_latency=False, kernel_check=False)
    quantized_macs = 16 * 8 * 3 * steps + 32 * 3
    assert report.resource_source == "metadata"
    assert report.macs == quantized_macs + steps * (W + R)  # the float GRU's MACs too
    assert report.bops == pytest.approx(8 * 8 * quantized_macs + 32 * 32 * steps * (W + R))


def test_a_uint8_table_gathered_then_dequantized_is_counted_as_8_bit_weights():
    """Survey 87: ORT's quantize_dynamic writes an Embedding as Gather(uint8 table) → DequantizeLinear;
    the table was missing from params and bits (only the Gather quantized: 32.0 bits, looked unquantized)."""
    from onnx import TensorProto, helper, numpy_helper

    from fqexport.validation.resources import from_graph

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (50, 32)).astype(np.uint8), "table_q"),
             numpy_helper.from_array(np.array(0.01, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["table_q", "ids"], ["rows_q"]),
             helper.make_node("DequantizeLinear", ["rows_q", "s", "z"], ["rows"]),
             helper.make_node("MatMul", ["rows", "w"], ["y"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    res = from_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert (res.params, res.float_params) == (50 * 32 + 32 * 4, 32 * 4)
    assert res.avg_weight_bits == pytest.approx((8 * 50 * 32 + 32 * 32 * 4) / (50 * 32 + 32 * 4))


@pytest.mark.parametrize("axes", [{"x": {0: "n"}, "y": {0: "n"}}, {"x": [0], "y": [0]}, None],
                         ids=["dynamic-batch", "list-form-axes", "fixed-batch-2"])
def test_macs_a_dynamic_batch_hides_are_counted_at_batch_1_with_every_token(tmp_path, axes):
    """Survey 87: a torch.onnx export of a transformer with a dynamic batch read MACs n/a (shape
    inference left every MatMul [unk, unk, C]); at batch 1 the sequence-first in_proj and the Gemm
    over token rows count every token, as the hand count does."""
    from fqexport.validation.resources import from_graph

    class Tx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 32)
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = torch.nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.enc(self.emb(x))[:, 0])

    torch.manual_seed(0)
    path = tmp_path / "tx.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a fixed batch of 2 (torch.onnx's default) read 43 % low: the sequence-first in_proj counted
        # B·3E per sample, the out_proj Gemm over [T·B, E] rows one row (survey 92)
        torch.onnx.export(Tx().eval(), (torch.randint(0, 50, (2, 16)),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes=axes, dynamo=False)  # list form: a name per tensor
    res = from_graph(onnx.load(str(path)))
    tokens = 16  # q/k/v in_proj, out_proj, the two feed-forward Linears over every token; the head on one
    assert res.macs == tokens * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32) + 32 * 3
    assert res.bops == pytest.approx(32 * 32 * res.macs)


@pytest.mark.parametrize("axes", [{"x": {0: "time"}}, {"x": [0], "y": [0]}], ids=["time-axis", "list-form-axes"])
def test_a_sequence_first_dynamic_time_axis_is_not_pinned_as_the_batch(tmp_path, axes):
    """Survey 91: pinning every input's first dim gave a sequence-first LSTM one time step's MACs
    (its steps are unknown: n/a is the honest figure)."""
    from fqexport.validation.resources import from_graph

    class SequenceFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = torch.nn.LSTM(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):  # [T, B, 8]
            return self.fc(self.rnn(x)[0][-1])

    torch.manual_seed(0)
    path = tmp_path / "lstm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SequenceFirst().eval(), (torch.randn(5, 1, 8),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes=axes, dynamo=False, opset_version=17)  # survey 96: list form
    res = from_graph(onnx.load(str(path)))
    assert res.macs is None and res.params == 4 * 16 * (8 + 16) + 16 * 4  # W, R and the head (weights only)
