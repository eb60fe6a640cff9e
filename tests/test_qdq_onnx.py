"""Tests of exporters/qdq_onnx.py: the QDQ file, its integer weights, metadata, ORT numerics,
size, fused kernels, and that a failed export leaves no file behind."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import fqexport
from conftest import MIXED_BITS
from fqexport.config import QuantConfig
from fqexport.errors import ExportError
from fqexport.exporters import qdq_onnx
from fqexport.exporters.ort_session import fused_kernels, make_session, run_batches
from fqexport.exporters import export_check
from fqexport.exporters.qdq_onnx import export_float, export_qdq
from fqexport.pipeline.compress import compress

# what these tests expect depends on the int8 kernels: CI also runs them as if on each CPU family
# (FQEXPORT_HOST_KERNELS=x86-avx2|x86-vnni|arm64 pytest -m isa)
pytestmark = pytest.mark.isa

ALL_LAYERS = ["stem", "conv_a", "conv_b", "dw", "pw", "fc"]


def _weights(path):
    """{layer: (quantized initializer, its DequantizeLinear node)} of an exported file; packed
    INT4/INT2 codes reach their DequantizeLinear through a Cast to int8."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    cast_from = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    out = {}
    for node in model.graph.node:
        src = cast_from.get(node.input[0], node.input[0]) if node.op_type == "DequantizeLinear" else ""
        if src.endswith(".weight_quantized"):
            out[src[: -len(".weight_quantized")]] = (inits[src], node)
    return model, inits, out


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _unpack_nbits(packed: np.ndarray, k: int) -> np.ndarray:
    """Signed codes [N, K] of a MatMulNBits B [N, blocks, block/2] (low nibble first, zero point 8)."""
    n = packed.shape[0]
    flat = packed.reshape(n, -1)
    u = np.empty((n, flat.shape[1] * 2), np.int16)
    u[:, 0::2], u[:, 1::2] = flat & 0x0F, flat >> 4
    return (u[:, :k] - 8).astype(np.int8)


def test_auto_storage_packs_4bit_convs_behind_a_cast_and_4bit_linear_as_matmulnbits(cnn_exports, cnn_cm_mixed):
    res = cnn_exports["auto"]
    onnx.checker.check_model(str(res.path))
    assert res.path.stat().st_size == res.size_bytes and res.opset == 21
    model, inits, weights = _weights(res.path)
    # the dynamic batch dimension is called "batch" in the file, not torch.export's symbol (s77)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[0]) == ["batch", 3, 16, 16] and dims(model.graph.output[0])[0] == "batch"
    assert all(not re.search(r"\bs\d+\b", d.dim_param) for v in model.graph.value_info
               for d in v.type.tensor_type.shape.dim)
    convs = [n for n in ALL_LAYERS if n != "fc"]
    assert sorted(weights) == sorted(convs)
    casts = {n.input[0]: n for n in model.graph.node if n.op_type == "Cast"}
    for name, (init, _) in weights.items():
        packed = MIXED_BITS.get(name, 8) <= 4  # conv_a: 4-bit codes in INT4, Cast to int8
        assert init.data_type == (TensorProto.INT4 if packed else TensorProto.INT8), name
        assert (init.name in casts) == packed, name
        if packed:
            assert onnx.helper.get_attribute_value(casts[init.name].attribute[0]) == TensorProto.INT8
        codes = numpy_helper.to_array(init).astype(np.int8)
        assert np.array_equal(codes, cnn_cm_mixed.layers[name].codes.numpy()), name
    assert res.storage == {**{n: "int8" for n in convs}, "conv_a": "int4", "fc": "nbits"}
    # fc (4 bits, K=16): one com.microsoft.MatMulNBits holding the codes in 16-wide blocks
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and attrs["K"] == 16 and attrs["N"] == 4 and attrs["bits"] == 4
    assert attrs["block_size"] == 16 and node.input[5] == "fc.bias"
    fc = cnn_cm_mixed.layers["fc"]
    codes, scale = fc.codes.numpy(), fc.scale.numpy()
    sign = np.where(scale < 0, -1, 1)[:, None]
    np.testing.assert_array_equal(_unpack_nbits(numpy_helper.to_array(inits[node.input[1]]), 16), codes * sign)
    np.testing.assert_array_equal(numpy_helper.to_array(inits[node.input[2]]), np.abs(scale))
    # no float copy of a quantized weight is left in the file
    assert not any(f"{n}.weight" in inits for n in ALL_LAYERS)


def test_int8_storage_stores_every_layer_in_int8(cnn_exports):
    res = cnn_exports["int8"]
    _, _, weights = _weights(res.path)
    assert {n: i.data_type for n, (i, _) in weights.items()} == {n: TensorProto.INT8 for n in ALL_LAYERS}
    assert set(res.storage.values()) == {"int8"}
    assert res.path.stat().st_size > cnn_exports["auto"].path.stat().st_size


def test_dequantize_is_per_channel_axis_0(cnn_exports, cnn_cm_mixed):
    _, inits, weights = _weights(cnn_exports["auto"].path)
    for name, (init, node) in weights.items():
        assert _axis(node) == 0, name
        scale = numpy_helper.to_array(inits[node.input[1]])
        assert scale.shape == (init.dims[0],) and scale.dtype == np.float32
        np.testing.assert_array_equal(scale, cnn_cm_mixed.layers[name].scale.numpy())
        assert len(node.input) == 2, name  # symmetric: the zero point is 0, DequantizeLinear's default


def test_activation_pairs_are_uint8(cnn_exports):
    model = onnx.load(str(cnn_exports["int8"].path))
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    # TinyCNN's quantization points (see test_fake_quant placement); the logits stay float
    assert len(q) == 8
    # QuantizeLinear's output has its zero point's type, whether that is an initializer or a Constant
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    assert [types.get(node.output[0]) for node in q] == [TensorProto.UINT8] * len(q)


def test_metadata_lists_layers_with_bits(cnn_exports, cnn_cm_mixed):
    model = onnx.load(str(cnn_exports["auto"].path))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["fqexport"])
    assert (model.producer_name, model.producer_version) == ("fqexport", fqexport.__version__)  # not torch's version
    assert {r["name"]: r["bits"] for r in meta["layers"]} == {n: MIXED_BITS.get(n, 8) for n in ALL_LAYERS}
    storage = {r["name"]: r["storage"] for r in meta["layers"]}
    assert storage["conv_a"] == "int4" and storage["fc"] == "nbits" and storage["dw"] == "int8"
    assert meta["float_layers"] == [] and meta["quantized_fraction"] == 1.0
    assert meta["storage"] == "auto" and meta["opset"] == 21
    assert meta["input_shape"] == [3, 16, 16] and meta["num_classes"] == 4
    assert meta["avg_weight_bits"] == pytest.approx(cnn_cm_mixed.avg_weight_bits, abs=1e-4)
    assert meta["group_names"] == ["majority", "minority"] and meta["activation_bits"] == 8


@pytest.mark.parametrize("which", ["auto", "int8"])
def test_ort_optimized_session_matches_pytorch_reference(cnn_exports, cnn_cm_mixed, cnn_cm_mixed_int8, cnn_data, which):
    res = cnn_exports[which]
    cm = {"auto": cnn_cm_mixed, "int8": cnn_cm_mixed_int8}[which]
    got = run_batches(make_session(res.path, optimized=True), cnn_data.x, 100)
    want = cm.predict(cnn_data.x)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
    assert res.agreement >= 0.99
    # the export's own check, recomputed: max |logit diff| on the calibration data under every
    # judge of the target (this CPU's session for its family, the emulation for the others)
    assert [v.judge for v in res.checks] == list(export_check.kernel_judges(cm.config.target))
    diffs = []
    for v in res.checks:
        # an emulated family with no kernel-dependent node takes this CPU's verdict, on every sample
        idx = np.arange(len(cm.calib)) if v.samples == len(cm.calib) else export_check.check_subset(
            cm.calib.group, export_check.MAX_EMULATED_SAMPLES)
        got_v = export_check._judge_logits(v.judge, res.path, cm.calib.x[idx])
        diffs.append(np.abs(got_v - cm.predict(cm.calib.x[idx])).max())
        assert v.max_abs_diff == pytest.approx(diffs[-1], rel=1e-3, abs=1e-4)
    assert res.max_abs_diff == pytest.approx(max(diffs), rel=1e-3, abs=1e-4)
    assert np.abs(got - want).max() < 0.5 * (np.abs(want).max() + 1)


def test_int8_storage_fuses_integer_kernels(cnn_exports):
    k = fused_kernels(cnn_exports["int8"].path)
    assert k["QLinearConv"] == 5, k  # stem, conv_a, conv_b, dw, pw
    assert k["Conv"] == 0 and k["FusedConv"] == 0


def test_auto_storage_runs_every_conv_fused_and_fc_as_matmulnbits(cnn_exports):
    k = fused_kernels(cnn_exports["auto"].path)
    assert k["QLinearConv"] == 5 and k["Conv"] + k["FusedConv"] == 0, k
    assert k["MatMulNBits"] == 1, k


def test_packed_int4_conv_runs_the_int8_kernel_bit_identical_to_an_int8_container(cnn_model, cnn_exports,
                                                                                  cnn_data, tmp_path):
    packed_cm = compress(cnn_model, cnn_data, QuantConfig(num_calib=256, layer_bits=MIXED_BITS, storage="packed"),
                         progress=False)
    res = export_qdq(packed_cm, tmp_path / "packed.onnx")
    assert res.storage["conv_a"] == "int4" and res.storage["fc"] == "nbits"
    k = fused_kernels(res.path)
    # the Cast of the INT4 initializer is folded at load: conv_a runs QLinearConv like the rest
    assert k["QLinearConv"] == 5 and k["Conv"] + k["FusedConv"] == 0, k
    assert res.size_bytes < cnn_exports["int8"].size_bytes
    int8_conv_a = run_batches(make_session(cnn_exports["int8"].path), cnn_data.x, 100)
    packed = run_batches(make_session(res.path), cnn_data.x, 100)
    # same fused kernels on the same int8 codes; only fc differs (MatMulNBits vs QGemm)
    assert np.mean(packed.argmax(1) == int8_conv_a.argmax(1)) >= 0.99


@pytest.fixture(scope="module")
def mlp_exports(tmp_path_factory, mlp_model, mlp_data):
    d = tmp_path_factory.mktemp("mlp_export")
    cm = compress(mlp_model, mlp_data, QuantConfig(storage="int8", num_calib=256), progress=False)
    q = export_qdq(cm, d / "int8.onnx")
    f = export_float(cm.float_model, torch.from_numpy(mlp_data.x[:2]), d / "float.onnx")
    return cm, q, f


def test_int8_file_is_at_least_3x_smaller_than_fp32(mlp_exports, mlp_data):
    cm, q, f = mlp_exports
    assert f.size_bytes / q.size_bytes >= 3.0, (f.size_bytes, q.size_bytes)
    k = fused_kernels(q.path)
    # all three fuse: fc3 (the logits) too, as a QGemm with a float output once its bias is int32
    # (exporters/ort_fusions.py); no float Gemm dequantizes its weight at run time
    assert k["QGemm"] + k["QLinearMatMul"] + k["MatMulInteger"] == 3, k
    assert k["Gemm"] + k["FusedGemm"] == 0, k
    # the float export is the float model
    got = run_batches(make_session(f.path), mlp_data.x, 100)
    np.testing.assert_allclose(got, cm.predict(mlp_data.x, quantized=False), atol=1e-4)


def test_validate_reads_resources_from_the_graph_when_the_file_was_edited_after_export(mlp_exports, mlp_data,
                                                                                       tmp_path, caplog):
    """A tool that folds the weights' DequantizeLinear into float initializers keeps metadata_props: the
    report said 8.00 bits from the stale metadata (survey 27)."""
    from fqexport.validation.gate import validate

    _, q, _ = mlp_exports
    assert validate(q.path, mlp_data, measure_latency=False, kernel_check=False).resource_source == "metadata"
    model = onnx.load(str(q.path))
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]:
        codes, scale = (numpy_helper.to_array(inits[i]).astype(np.float32) for i in node.input[:2])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [-1 if d == axis else 1 for d in range(codes.ndim)]
        model.graph.initializer.append(numpy_helper.from_array(codes * scale.reshape(shape), node.output[0]))
        model.graph.node.remove(node)
    edited = tmp_path / "folded.onnx"
    onnx.save(model, str(edited))
    with caplog.at_level("WARNING"):
        report = validate(edited, mlp_data, measure_latency=False, kernel_check=False)
    assert report.resource_source == "graph" and report.avg_weight_bits == 32.0
    assert "the file was edited after export" in caplog.text


def test_packed_storage_writes_int2_at_opset_25(tmp_path, mlp_model, mlp_data):
    cm = compress(mlp_model, mlp_data, QuantConfig(layer_bits={"fc2": 2, "fc3": 4}, storage="packed",
                                                   num_calib=64, method="rtn", bias_correction=False), progress=False)
    res = export_qdq(cm, tmp_path / "packed.onnx")
    assert res.opset == 25 and res.storage == {"fc1": "int8", "fc2": "int2", "fc3": "nbits"}
    model = onnx.load(str(res.path))
    assert model.ir_version == 13  # INT2 came in IR 13 (onnx.proto IR_VERSION_2025_11_06): survey 80
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["fc2.weight_quantized"] == TensorProto.INT2
    assert [n.op_type for n in model.graph.node if n.name.startswith("fc3")] == ["MatMulNBits"]
    assert res.agreement >= 0.99
    # The INT2 codes reach QGemm through a Cast to int8 that ORT folds at load: both hidden
    # layers run the fused kernel; fc3 (MatMulNBits) produces the float logits.
    cast = [n for n in model.graph.node if n.op_type == "Cast"]
    assert [n.input[0] for n in cast] == ["fc2.weight_quantized"]
    k = fused_kernels(res.path)
    assert k["QGemm"] + k["MatMulIntegerToFloat"] == 2 and k["Gemm"] + k["FusedGemm"] == 0, k


def _reuse_proto(monkeypatch, cnn_exports):
    import copy

    monkeypatch.setattr(qdq_onnx, "torch_to_onnx", lambda *a, **k: copy.deepcopy(cnn_exports["proto"]))


def test_reused_proto_exports_the_same_file(monkeypatch, cnn_exports, cnn_cm_mixed, tmp_path):
    # guards the shortcut the failure tests below take
    _reuse_proto(monkeypatch, cnn_exports)
    res = export_qdq(cnn_cm_mixed, tmp_path / "again.onnx", check=False)
    assert res.path.read_bytes() == cnn_exports["auto"].path.read_bytes()
    assert res.agreement is None


def test_checker_failure_leaves_no_file(monkeypatch, cnn_exports, cnn_cm_mixed, tmp_path):
    _reuse_proto(monkeypatch, cnn_exports)

    def reject(model):
        raise onnx.checker.ValidationError("broken on purpose")

    monkeypatch.setattr(qdq_onnx.onnx.checker, "check_model", reject)
    target = tmp_path / "out.onnx"
    with pytest.raises(ExportError, match="onnx.checker rejected the exported model: broken on purpose"):
        export_qdq(cnn_cm_mixed, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_agreement_failure_leaves_no_file(monkeypatch, cnn_exports, cnn_cm_mixed, tmp_path):
    _reuse_proto(monkeypatch, cnn_exports)
    monkeypatch.setattr(export_check, "_judge_logits", lambda judge, file, x, session=None: -cnn_cm_mixed.predict(x))
    target = tmp_path / "out.onnx"
    with pytest.raises(ExportError, match=r"agrees with the PyTorch fake-quant reference on only .*the file was not written") as info:
        export_qdq(cnn_cm_mixed, target)
    assert list(tmp_path.iterdir()) == []
    # x86-safe weights (the default) cannot saturate: the hint names the remaining causes, not
    # weight_range='x86-safe'
    judge = export_check.kernel_judges(cnn_cm_mixed.config.target)[0]
    assert f"run with {judge.describe()} agrees" in str(info.value)
    assert str(info.value).endswith(export_check.CAUSE_KERNELS.format(family=judge.family))
    assert "weight_range" not in str(info.value)


def test_agreement_failure_with_full_range_weights_names_saturation(monkeypatch, cnn_exports, cnn_cm_mixed, tmp_path):
    _reuse_proto(monkeypatch, cnn_exports)
    monkeypatch.setattr(export_check, "_judge_logits", lambda judge, file, x, session=None: -cnn_cm_mixed.predict(x))
    full = dataclasses.replace(cnn_cm_mixed, config=dataclasses.replace(cnn_cm_mixed.config, weight_range="full"))
    with pytest.raises(ExportError) as info:
        export_qdq(full, tmp_path / "out.onnx")
    # the first judge to fail names the saturation when it covers x86-avx2 (portable covers it)
    judge = export_check.kernel_judges("portable")[0]
    cause = (export_check.CAUSE_FULL_RANGE.format(target="portable") if "x86-avx2" in judge.families
             else export_check.CAUSE_KERNELS.format(family=judge.family))
    assert str(info.value).endswith(cause)


def test_failed_write_leaves_no_partial_file(monkeypatch, cnn_exports, cnn_cm_mixed, tmp_path):
    _reuse_proto(monkeypatch, cnn_exports)
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous version")

    def partial_save(model, path, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(qdq_onnx.onnx, "save_model", partial_save)
    with pytest.raises(Exception, match="disk full"):
        export_qdq(cnn_cm_mixed, target, check=False)
    assert target.read_bytes() == b"previous version"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]  # no temp file left




def test_a_batch_1_example_is_not_what_torch_export_traces(monkeypatch, tmp_path):
    """torch.export specialises a size-1 dimension: exported from a batch-1 example (README's
    ``x[:1]``), a model such as timm's pvt_v2 bakes batch 1 into a Reshape behind a dynamic
    input. The exporter traces two copies of such an example; the file runs at any batch."""
    import onnxruntime as ort

    import fqexport
    from fqexport.exporters import torch_export

    seen = []
    real = torch_export.torch.onnx.export
    monkeypatch.setattr(torch_export.torch.onnx, "export",
                        lambda model, args, **kw: seen.append(args[0].shape[0]) or real(model, args, **kw))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    fqexport.export_float(model, torch.randn(1, 3, 8, 8), tmp_path / "f.onnx")
    assert seen == [2]
    sess = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0],
                               model(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_export_float_leaves_the_callers_model_in_its_own_modes(tmp_path):
    import fqexport

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3))
    model.train()
    model[1].eval()  # a frozen BN inside a training model, as fine-tuning recipes do
    before = [m.training for m in model.modules()]
    fqexport.export_float(model, torch.randn(4, 4), tmp_path / "f.onnx")
    assert [m.training for m in model.modules()] == before == [True, True, False, True, True]


def test_a_model_on_the_meta_device_is_refused_by_name(tmp_path):
    import fqexport
    from fqexport.calibration.group_data import GroupData

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = GroupData(np.zeros((8, 4), np.float32), np.zeros(8, np.int64), np.arange(8) % 2, ("a", "b"), "m")
    msg = r"^the model's parameter '0.weight' is on the 'meta' device \(a shape without data\): load the weights first"
    with pytest.raises(fqexport.ModelLoadError, match=msg):
        fqexport.compress(model, data, progress=False)
    with pytest.raises(fqexport.ModelLoadError, match=msg):
        fqexport.export_float(model, torch.zeros(2, 4), tmp_path / "f.onnx")
    assert not (tmp_path / "f.onnx").exists()


class _PositionTable(torch.nn.Module):
    """Token embedding plus a learned position table read at ``arange(L)`` (BERT-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.word = torch.nn.Embedding(30, 16)
        self.pos = torch.nn.Embedding(32, 16)
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, ids):
        h = self.word(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.fc(h.mean(1))


def test_export_float_refuses_a_dict_output_as_compress_does(tmp_path):
    """A forward returning {"aux": ..., "logits": ...} was written with the aux head named "logits"
    (survey 73); which value is the output is the user's to say, as compress's error asks."""
    from fqexport.errors import ModelLoadError

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.aux, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 2), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = self.body(x)
            return {"aux": self.aux(h), "logits": self.head(h)}

    with pytest.raises(ModelLoadError, match=r"the model returns a dict \(keys 'aux', 'logits'\), not a tensor: .*"
                                             r"a module whose forward returns model\(x\)\['aux'\]"):
        export_float(TwoHeads(), torch.zeros(2, 6), tmp_path / "f.onnx")
    assert not (tmp_path / "f.onnx").exists()


def test_a_position_table_read_at_constant_indices_stays_float_and_exports(tmp_path):
    """``pos(arange(L))`` depends on the input's shape only: the ONNX exporter folds it into a
    constant, so it stays float with its reason; it was quantized, then export failed with 'weight
    not found' (survey 20). The token table, read at the input's values, is quantized."""
    import onnxruntime as ort

    import fqexport

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 30, (96, 8)).astype(np.int64)
    data = fqexport.load_data(torch.utils.data.TensorDataset(torch.from_numpy(ids)),
                              groups=np.arange(96) % 2)
    model = _PositionTable().eval()
    cm = fqexport.compress(model, data, fqexport.QuantConfig(num_calib=64), progress=False)
    assert set(cm.layers) == {"word", "fc"}
    assert [(f.name, f.kind, f.reason) for f in cm.metadata.float_layers] == [
        ("pos", "Embedding(constant indices)", "unsupported")]
    path = fqexport.export(cm, tmp_path / "m.onnx").path
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids[:16]})[0]
    np.testing.assert_allclose(got, np.asarray(cm.predict(ids[:16])), atol=1e-4)


def test_the_export_leaves_torchs_logger_levels_as_the_caller_set_them():
    """torch_to_onnx quieted torch.onnx's registration logger to ERROR for good (survey 53)."""
    import logging

    from fqexport.exporters.torch_export import torch_to_onnx

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.setLevel(logging.DEBUG)
    try:
        torch_to_onnx(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval(), torch.zeros(2, 4))
        assert registration.level == logging.DEBUG
    finally:
        registration.setLevel(logging.NOTSET)


def test_export_refuses_a_folder_and_the_calibration_file_it_came_from(cnn_cm8, tmp_path, monkeypatch):
    """export(cm, "calib.npz") replaced the data cm was compressed from with ONNX bytes; export(cm, ".")
    raised a raw IsADirectoryError naming an internal temporary folder (survey 60)."""
    from fqexport.errors import OutputPathError
    from fqexport.exporters.qdq_onnx import export_float_reference

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=cnn_cm8.calib.x[:4])
    before = calib.read_bytes()
    cm = dataclasses.replace(cnn_cm8, calib=dataclasses.replace(cnn_cm8.calib, source=str(calib)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match=r"export: path calib.npz is the calibration data .*calib.npz the model "
                                              r"was compressed from; it would overwrite it"):
        fqexport.export(cm, "calib.npz")
    assert calib.read_bytes() == before
    for path in (".", "", tmp_path):
        with pytest.raises(OutputPathError, match="names a folder, not a file; give a file name, e.g. model.onnx"):
            fqexport.export(cm, path)
    with pytest.raises(OutputPathError, match="export_float_reference: path '.' names a folder"):
        export_float_reference(cm, ".")


def test_api_arguments_of_the_wrong_kind_are_named(cnn_cm8, cnn_data, tmp_path):
    """validate(cm, data) raised a TypeError from os.fspath, export_float(model, np_array, path) an
    AttributeError from torch's exporter (survey 60): a ConfigError naming the argument, or the
    calibration rows taken as they are."""
    from fqexport.errors import ConfigError

    with pytest.raises(ConfigError, match=r"validate: model must be a str or PathLike, not CompressedModel; "
                                          r"write it first with fqexport.export\(cm, 'model.onnx'\)"):
        fqexport.validate(cnn_cm8, cnn_data)
    result = fqexport.export_float(cnn_cm8.float_model, cnn_cm8.calib.x[:2], tmp_path / "f.onnx")
    assert result.path.is_file()
    with pytest.raises(ConfigError, match="export_float: example must be a Tensor, not list"):
        fqexport.export_float(cnn_cm8.float_model, [1, 2], tmp_path / "g.onnx")


def test_weights_past_protobufs_2gb_go_beside_the_graph(tmp_path, monkeypatch, mlp_model, mlp_data):
    """Survey 80: export_float of a 2.16 GB model died in onnx.checker with protobuf's bare
    EncodeError. The limit is lowered here so that the tiny MLP takes the same path: the weights
    go to <name>.data, checked from the written files, read by ORT and counted by validate."""
    from fqexport.exporters import onnx_file
    from fqexport.validation.gate import validate

    monkeypatch.setattr(onnx_file, "INLINE_LIMIT_BYTES", 1000)
    x = torch.from_numpy(mlp_data.x[:2])
    res = export_float(mlp_model, x, tmp_path / "big.onnx")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["big.onnx", "big.onnx.data"]
    assert res.size_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert (tmp_path / "big.onnx").stat().st_size < (tmp_path / "big.onnx.data").stat().st_size / 4  # the graph alone
    onnx.checker.check_model(str(tmp_path / "big.onnx"), full_check=True)
    got = run_batches(make_session(tmp_path / "big.onnx"), mlp_data.x[:16], 8)
    np.testing.assert_allclose(got, mlp_model(torch.from_numpy(mlp_data.x[:16])).detach().numpy(), atol=1e-5)
    assert validate(tmp_path / "big.onnx", mlp_data, measure_latency=False, kernel_check=False).size_bytes == res.size_bytes
    # a graph the checker rejects leaves neither file
    bad = onnx.load(str(tmp_path / "big.onnx"))
    bad.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ExportError, match=r"other\.onnx: onnx\.checker rejected the exported model"):
        onnx_file.save_onnx(bad, tmp_path / "other.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    # a quantized model past the limit is refused by name (the export check runs it in memory)
    cm = compress(mlp_model, mlp_data, QuantConfig(num_calib=32, method="rtn"), progress=False)
    with pytest.raises(ExportError, match=r"q\.onnx: the quantized model holds 0\.00 GB of tensors, more than the 2 GB"):
        export_qdq(cm, tmp_path / "q.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == files


def test_a_signal_between_the_two_renames_of_a_large_export_waits_for_the_pair(tmp_path, monkeypatch):
    """Review of survey 80's fix: a Ctrl-C landing after <name>.onnx.data moved into place and before
    the graph did left the earlier graph naming the new data (a pair that did not load). Signals are
    held back between the renames: the interrupt comes after both, and the pair is the new one."""
    import os
    import signal

    import onnxruntime as ort

    from fqexport import atomic
    from fqexport.exporters import onnx_file

    monkeypatch.setattr(onnx_file, "INLINE_LIMIT_BYTES", 1000)
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    old = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
    new = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Linear(48, 4)).eval()
    out = tmp_path / "float.onnx"
    export_float(old, x, out)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith(".onnx.data"):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the data file moved

    monkeypatch.setattr(atomic.os, "replace", replace)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            export_float(new, x, out)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(atomic.os, "replace", real)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, new(x).detach().numpy(), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "float.onnx.data"]
    # a small export over the large pair takes its data file away with it
    monkeypatch.setattr(onnx_file, "INLINE_LIMIT_BYTES", 2**31 - 2**27)
    export_float(new, x, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx"]


def test_a_large_models_branch_tensors_name_the_written_data_file(tmp_path, monkeypatch):
    """Review: an If branch's Constant of 1 KB or more kept the data file's temporary name, and the
    written pair did not load (the checker ran while that temporary file still existed)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from fqexport.exporters import onnx_file

    monkeypatch.setattr(onnx_file, "INLINE_LIMIT_BYTES", 1000)
    values = np.arange(400, dtype=np.float32)
    branch = lambda name, v: helper.make_graph(  # noqa: E731
        [helper.make_node("Constant", [], [f"{name}_c"], value=numpy_helper.from_array(v, f"{name}_t")),
         helper.make_node("Add", ["x", f"{name}_c"], [f"{name}_y"])], name, [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [400])])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["cond"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", values), else_branch=branch("else", -values))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [400])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [400])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_file.tensor_bytes(model) == 2 * values.nbytes + 4  # the branches' tensors count
    onnx_file.save_onnx(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": np.ones(400, np.float32)})[0], values + 1)
