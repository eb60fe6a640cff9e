"""The ``gpu`` target end to end: compress writes S8S8 (symmetric int8 activations, zero point 0)
and blocked INT4 weight-only Linears, the file computes what the fake-quant reference computes,
the allocator counts its bytes, ``validate`` reports the TensorRT / CUDA EP rules — and the CPU
targets' uint8 files are unchanged."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fixtures_models as fm
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.npz import save_npz
from fqexport.cli import main
from fqexport.config import QuantConfig
from fqexport.exporters.export_check import GRAPH
from fqexport.tasks.classification import top1_agreement
from fqexport.exporters.gpu_rules import MSG_PAD, check_gpu_qdq
from fqexport.exporters.metadata import metadata_of, read_metadata, write_metadata
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.graph.act_quant import ActQuantizer
from fqexport.pipeline.compress import compress
from fqexport.search.allocation import layer_container, stored_bytes
from fqexport.search.costs import layer_costs
from fqexport.validation.gate import validate
from fqexport.validation.reports import to_markdown

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _pairs(model: onnx.ModelProto) -> list[tuple[float, int, int]]:
    """(scale, zero point, zero point's ONNX type) of every activation QuantizeLinear."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = inits[n.input[2]]
            out.append((float(numpy_helper.to_array(inits[n.input[1]])), int(numpy_helper.to_array(zp)), zp.data_type))
    return out


def _quantizers(cm) -> list[ActQuantizer]:
    return [m for m in cm.reference.modules() if isinstance(m, ActQuantizer)]


def test_gpu_export_writes_s8s8_that_computes_what_the_reference_computes(gpu_cms, gpu_exports, cnn_data):
    cm, res = gpu_cms["cnn8"], gpu_exports["cnn8"]
    assert all(q.symmetric and q.zero_point == 0 for q in _quantizers(cm))
    model = onnx.load(str(res.path))
    pairs = _pairs(model)
    assert pairs and {(zp, t) for _, zp, t in pairs} == {(0, TensorProto.INT8)}
    assert sorted(np.float32(s) for s, _, _ in pairs) == sorted(np.float32(q.scale) for q in _quantizers(cm))
    assert read_metadata(res.path).target == "gpu" and check_gpu_qdq(model) == []
    assert [v.judge.family for v in res.checks] == [GRAPH] and res.agreement == 1.0
    # the graph's own math (what a GPU runs: no CPU kernel) equals the reference, up to float
    # rounding: ORT's float Conv and torch's may round one accumulation to opposite sides of an
    # activation code's boundary, and that one code apart moves a sample's logits by ~0.05 (one
    # sample of 400 on an Intel AVX-512 CPU; none on AMD)
    graph = run_batches(make_session(res.path, optimized=False, threads=1), cnn_data.x, 64)
    ref = cm.predict(cnn_data.x)
    same = np.abs(graph - ref).max(1) < 1e-4
    assert same.mean() >= 0.99, f"{np.sum(~same)} of {len(same)} samples differ"
    assert np.abs(graph - ref).max() < 0.5  # a code apart, not a different computation
    assert np.mean(graph.argmax(1) == ref.argmax(1)) >= 0.99


def test_int8_activation_codes_span_minus_127_to_127_over_the_calibration_range(gpu_cms):
    cm = gpu_cms["mlp8"]
    # the input's pair: the largest |x| of the calibration data maps to 127
    (node,) = [n for n in cm.reference.graph.nodes if n.op == "call_module" and n.args and n.args[0].op == "placeholder"]
    first = cm.reference.get_submodule(str(node.target))
    top = float(np.abs(cm.calib.x).max())
    assert first.scale == pytest.approx(top / 127, rel=1e-6)


def test_gpu_int4_linears_are_blocked_and_weight_only(gpu_cms, gpu_exports, tmp_path):
    cm = gpu_cms["cnn_mixed"]
    assert {n: l.container for n, l in cm.layers.items()} == {
        "stem": "int8", "conv_a": "int8", "conv_b": "int8", "dw": "int8", "pw": "int8", "fc": "int4-blocked"}
    assert cm.layers["conv_a"].bits == 4 and np.abs(cm.layers["conv_a"].codes.numpy()).max() <= 7  # 4-bit codes, int8 container
    mlp = gpu_cms["mlp4"]
    assert {l.container for l in mlp.layers.values()} == {"int4-blocked"}
    assert all(l.block_size is None for l in mlp.layers.values())  # K = 64 and 256: one block per row
    tokens = _tokens_cm()
    assert {n: (l.container, l.block_size) for n, l in tokens.layers.items()} == {
        "fc1": ("int4-blocked", None), "fc2": ("int4-blocked", 64), "head": ("int4-blocked", None)}
    tokens_path = export_qdq(tokens, tmp_path / "tokens.onnx").path
    for path in (gpu_exports["cnn_mixed"].path, gpu_exports["mlp4"].path, tokens_path):
        model = onnx.load(str(path))
        producer = {o: n for n in model.graph.node for o in n.output}
        for mm in (n for n in model.graph.node if n.op_type == "MatMul"):
            dq = producer[mm.input[1]]
            attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
            assert dq.op_type == "DequantizeLinear" and attrs["axis"] == 0 and attrs["block_size"] >= 16
            assert producer.get(mm.input[0]) is None or producer[mm.input[0]].op_type != "DequantizeLinear"
    # every Linear of the 4-bit MLP runs weight-only: no activation pair at all
    assert not [n for n in onnx.load(str(gpu_exports["mlp4"].path)).graph.node if n.op_type == "QuantizeLinear"]


def test_gpu_blocked_layers_fuse_into_matmulnbits_and_match_the_reference(gpu_cms, gpu_exports, mlp_data, tmp_path):
    # ORT's CPU session fuses the pattern into MatMulNBits (the CUDA EP's selector is the same);
    # on the CPU its MatMulAddFusion + GemmActivationFusion first turn MatMul + bias + ReLU into
    # FusedGemm (fc1, fc2: measured with ORT 1.32), so it is switched off here
    path = gpu_exports["mlp4"].path
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # fp32 compute, as on the GPU
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=["MatMulAddFusion"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node].count("MatMulNBits") == 3
    got = sess.run(None, {sess.get_inputs()[0].name: mlp_data.x})[0]
    np.testing.assert_allclose(got, gpu_cms["mlp4"].predict(mlp_data.x), rtol=1e-4, atol=1e-4)


def _tokens_model() -> nn.Module:
    torch.manual_seed(0)
    return fm.TokenMLP().eval()


def _tokens_cm():
    model = _tokens_model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 192)).astype(np.float32)
    group = (np.arange(128) % 4 == 0).astype(np.int64)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = GroupData(x, y, group, ("a", "b"), "tokens")
    return compress(model, data, QuantConfig(weight_bits=4, num_calib=64, method="rtn", target="gpu"), progress=False)


@pytest.mark.parametrize("name", ["cnn_mixed", "mlp4", "tokens"])
def test_allocator_predicts_the_gpu_containers_and_their_written_bytes(gpu_cms, gpu_exports, name, request, tmp_path):
    if name == "tokens":
        cm, model = _tokens_cm(), _tokens_model()
        res = export_qdq(cm, tmp_path / "tokens.onnx")
    else:
        cm, res = gpu_cms[name], gpu_exports[name]
        model = request.getfixturevalue("cnn_model" if name.startswith("cnn") else "mlp_model")
    costs = {c.name: c for c in layer_costs(model, torch.from_numpy(cm.calib.x[:1]))}
    predicted = {n: layer_container(costs[n], l.bits, "auto", target="gpu") for n, l in cm.layers.items()}
    assert predicted == res.storage
    written: dict[str, int] = {}  # codes, scales and zero points of each layer's weight, as written
    for t in onnx.load(str(res.path)).graph.initializer:
        layer, _, _ = t.name.partition(".weight")
        if layer in costs and t.name != f"{layer}.bias":
            written[layer] = written.get(layer, 0) + len(t.raw_data)
    assert written == {n: stored_bytes(costs[n], l.bits, "auto", target="gpu") for n, l in cm.layers.items()}


def _structure(model: onnx.ModelProto) -> str:
    """The graph without tensor values or value names: ops in order, each input as the node (and
    output slot) producing it, an initializer's type and shape, or a graph input; attributes
    (a tensor as type and shape); the weight initializers' names, types and shapes."""
    producers = {o: (i, k) for i, n in enumerate(model.graph.node) for k, o in enumerate(n.output)}
    inits = {t.name: t for t in model.graph.initializer}
    graph_inputs = {v.name for v in model.graph.input}

    def ref(name: str) -> str:
        if name in producers:
            return f"node{producers[name]}"
        if name in inits:
            return f"init({inits[name].data_type},{list(inits[name].dims)})"
        return f"input({name})" if name in graph_inputs else ("none" if not name else "?")

    def attr(a) -> str:
        v = helper.get_attribute_value(a)
        return f"tensor({v.data_type},{list(v.dims)})" if isinstance(v, onnx.TensorProto) else repr(v)

    lines = [f"ir{model.ir_version} " + " ".join(sorted(f"{o.domain}:{o.version}" for o in model.opset_import))]
    for n in model.graph.node:
        attrs = ",".join(f"{a.name}={attr(a)}" for a in sorted(n.attribute, key=lambda a: a.name))
        lines.append(f"{n.domain}:{n.op_type}({','.join(ref(x) for x in n.input)})[{attrs}]")
    lines.append("weights " + " ".join(sorted(f"{t.name}:{t.data_type}:{list(t.dims)}"
                                              for t in model.graph.initializer if "weight" in t.name)))
    return "\n".join(lines)


# sha256 of _structure() of the tiny CNN fixture's CPU exports. Pinned when the gpu target was added
# (commit 02ffca1: the CPU files unchanged by it) and again when exporters/ort_fusions.py deliberately
# changed them (GlobalAveragePool, the logits Gemm's int32 bias): a change here must be intended.
CPU_STRUCTURE = {
    "cnn8": "d0a520edb2316ad49b4e9e7f20082ecf81845b638493dab76c9d8173242a2a19",
    "cnn_mixed": "4bea77584c5e06ce6a93468c54073ac733f459383cc47c4ce3f9a048098368a7",
}


def test_cpu_targets_write_the_unchanged_uint8_file(cnn_cm8, cnn_exports, tmp_path):
    files = {"cnn8": export_qdq(cnn_cm8, tmp_path / "cnn8.onnx").path, "cnn_mixed": cnn_exports["auto"].path}
    for name, path in files.items():
        model = onnx.load(str(path))
        assert hashlib.sha256(_structure(model).encode()).hexdigest() == CPU_STRUCTURE[name], name
    cm = cnn_cm8
    assert all(not q.symmetric for q in _quantizers(cm))
    pairs = _pairs(onnx.load(str(files["cnn8"])))
    assert {t for _, _, t in pairs} == {TensorProto.UINT8}
    assert sorted((np.float32(s), zp) for s, zp, _ in pairs) == sorted((np.float32(q.scale), q.zero_point)
                                                                        for q in _quantizers(cm))
    assert any(zp != 0 for _, zp, _ in pairs)  # asymmetric: the input's range is not centred on 0


class _Padded(nn.Module):
    """conv → explicit zero pad → conv → reflection pad → conv → pool → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.pad = nn.ZeroPad2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(self.pad(y)))
        y = self.c3(nn.functional.pad(y, (1, 1, 1, 1), mode="reflect"))
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def padded():
    torch.manual_seed(0)
    model = _Padded().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    group = (np.arange(64) % 4 == 0).astype(np.int64)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    return model, GroupData(x, y, group, ("a", "b"), "padded-task")


def test_gpu_export_puts_no_pair_between_pad_and_conv(padded, tmp_path):
    model, data = padded
    config = QuantConfig(num_calib=64, method="rtn", target="gpu")
    res = export_qdq(compress(model, data, config, progress=False), tmp_path / "gpu.onnx")
    proto = onnx.load(str(res.path))
    # the zero pad, now right before its conv, is folded into the conv's pads by torch's exporter
    assert [n.op_type for n in proto.graph.node].count("Pad") == 1 and check_gpu_qdq(proto) == []
    # the CPU placement (pairs between Pad and Conv, where ORT fuses them) is unchanged
    cpu = export_qdq(compress(model, data, dataclasses.replace(config, export=dataclasses.replace(
        config.export, target="portable")), progress=False), tmp_path / "cpu.onnx")
    cpu_model = onnx.load(str(cpu.path))
    pads = [n.name for n in cpu_model.graph.node if n.op_type == "Pad"]
    pad_rule = [v.message for v in check_gpu_qdq(cpu_model) if v.rule == "no-qdq-between-pad-and-conv"]
    assert len(pads) == 2 and sorted(pad_rule) == sorted(MSG_PAD.format(pad=p) for p in pads)


def test_validate_reports_the_gpu_rules_of_gpu_files_only(gpu_exports, cnn_exports, cnn_data, tmp_path):
    gpu = validate(gpu_exports["cnn8"].path, cnn_data, measure_latency=False, kernel_check=False)
    assert gpu.gpu_rule_violations == () and gpu.passed
    (check,) = [c for c in gpu.checks if c.name == "gpu_rules"]
    assert check.passed and check.value == 0.0
    assert check.message == "what TensorRT and ORT's CUDA EP take (target gpu): 0 violation(s)"
    assert gpu.to_dict()["gpu_rules"] == {"passed": True, "violations": []}
    assert "## GPU rules (TensorRT importer, ONNX Runtime CUDA EP)" in to_markdown(gpu)
    cpu = validate(cnn_exports["auto"].path, cnn_data, measure_latency=False, kernel_check=False)
    assert cpu.gpu_rule_violations is None and "gpu_rules" not in cpu.to_dict()
    assert not [c for c in cpu.checks if c.name == "gpu_rules"] and "GPU rules" not in to_markdown(cpu)
    # a uint8 file whose metadata claims the gpu target fails the gate, naming what breaks
    model = onnx.load(str(cnn_exports["auto"].path))
    write_metadata(model, dataclasses.replace(metadata_of(model), target="gpu"))
    onnx.save(model, str(tmp_path / "claims_gpu.onnx"))
    bad = validate(tmp_path / "claims_gpu.onnx", cnn_data, measure_latency=False, kernel_check=False)
    assert not bad.passed and [c.name for c in bad.failures()] == ["gpu_rules"]
    assert bad.failures()[0].value == len(bad.gpu_rule_violations) > 0
    assert any(v.startswith("[no-uint8] initializer 'fc.weight_nbits'") for v in bad.gpu_rule_violations)
    assert any(v.startswith("[int8-activations] QuantizeLinear") for v in bad.gpu_rule_violations)


@pytest.mark.parametrize("name", ["gpu:cnn_mixed", "gpu:mlp4", "cpu:auto", "cpu:int8"])
def test_resources_from_the_metadata_are_what_the_graph_stores_and_computes(gpu_exports, cnn_exports, name):
    """A gpu file stores 4-bit conv codes in int8: its average weight bits and BOPs count 8, as
    the graph read without the metadata does (survey 72: 4.00 bits and PePR 0.868 from the
    metadata, 7.78 bits from the same graph); a weight-only Linear computes on float inputs."""
    from fqexport.validation.resources import from_graph, from_metadata

    kind, key = name.split(":")
    path = (gpu_exports if kind == "gpu" else cnn_exports)[key].path
    meta = read_metadata(path)
    got, want = from_metadata(meta), from_graph(onnx.load(str(path)))
    assert got.avg_weight_bits == pytest.approx(want.avg_weight_bits)
    assert got.params == want.params and got.macs == want.macs
    assert got.bops == pytest.approx(want.bops)
    if name == "gpu:cnn_mixed":  # its 4-bit conv_a is stored in int8: the codes are narrower than the file
        assert got.avg_weight_bits > meta.avg_weight_bits


def test_cli_validate_gates_a_gpu_file_on_the_rules(gpu_exports, cnn_exports, cnn_data, tmp_path, capsys):
    save_npz(cnn_data, tmp_path / "test.npz")
    args = ["--data", str(tmp_path / "test.npz"), "--no-latency", "--no-kernel-check"]
    assert main(["validate", str(gpu_exports["cnn8"].path), *args]) == 0
    assert "PASS gpu_rules: what TensorRT and ORT's CUDA EP take (target gpu): 0 violation(s)" in capsys.readouterr().out
    model = onnx.load(str(cnn_exports["auto"].path))
    write_metadata(model, dataclasses.replace(metadata_of(model), target="gpu"))
    onnx.save(model, str(tmp_path / "claims_gpu.onnx"))
    assert main(["validate", str(tmp_path / "claims_gpu.onnx"), *args]) == 1
    out = capsys.readouterr().out
    assert "FAIL gpu_rules: what TensorRT and ORT's CUDA EP take (target gpu): " in out
    assert "[no-uint8] initializer 'fc.weight_nbits'" in out


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider not available: the S8S8 file runs on CUDA only "
                                         "where onnxruntime-gpu and a CUDA GPU are present")
def test_s8s8_file_runs_on_cuda_like_the_reference(gpu_cms, gpu_exports, cnn_data):
    cm, res = gpu_cms["cnn8"], gpu_exports["cnn8"]
    cuda = run_batches(make_session(res.path, provider="cuda"), cnn_data.x, 64)
    ref = cm.predict(cnn_data.x)
    spread = float(np.median(ref.max(1) - ref.min(1)))
    assert top1_agreement(cuda, ref, 0.02 * spread)[1] >= 0.99


class _TinyEncoder(nn.Module):
    """A Linear front end, one TransformerEncoderLayer (attention's head split: Reshape → Transpose
    after the q/k/v projections' int8 pairs), a Linear head over the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.proj(x)).mean(1))


def test_a_gpu_file_ort_s_cpu_optimizers_refuse_is_said_when_it_is_written(tmp_path, caplog):
    """Survey 80: a W8 --target gpu transformer file did not load in a default ORT CPU session
    (issue 25526's error), and compress wrote it silently: only a later validate said so."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = GroupData(rng.standard_normal((48, 8, 16)).astype(np.float32), rng.integers(0, 5, 48),
                     np.repeat([0, 1], 24), ("a", "b"))
    cm = compress(_TinyEncoder().eval(), data, QuantConfig(weight_bits=8, target="gpu", num_calib=32), progress=False)
    with caplog.at_level("WARNING", logger="fqexport.exporters.qdq_onnx"):
        res = export_qdq(cm, tmp_path / "enc.onnx")
    with pytest.raises(Exception, match="does not match y_zero_point type"):  # what ORT 1.32 itself does
        ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    assert caplog.text.count("ONNX Runtime's CPU provider refuses this target='gpu' file") == 1
    assert f"{res.path}: ONNX Runtime's CPU provider refuses" in caplog.text
    assert "disabled_optimizers=['QDQPropagationTransformer']" in caplog.text
    ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"],  # the advice works
                         disabled_optimizers=["QDQPropagationTransformer"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="fqexport.exporters.qdq_onnx"):  # a file ORT loads: nothing said
        export_qdq(compress(_TinyEncoder().eval(), data, QuantConfig(weight_bits=8, num_calib=32), progress=False),
                   tmp_path / "cpu.onnx")
    assert "refuses" not in caplog.text
