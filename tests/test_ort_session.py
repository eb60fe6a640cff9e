"""Tests of exporters/ort_session.py and fqexport/validation/latency.py on real exported tiny models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
import torch
from fixtures_models import saturating_qdq_gemm
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.kernel_emulation import EmulatedSession
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.ort_session import (
    IN_MEMORY,
    MSG_INPUTS,
    MSG_IS_DIR,
    MSG_LEVEL,
    OPT_LEVELS,
    build_session,
    fused_kernels,
    input_shape,
    kernel_summary,
    make_session,
    model_files_size,
    optimized_graph,
    run_batches,
    session_threads,
)
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from fqexport.errors import ConfigError, ModelLoadError
from fqexport.validation.latency import measure_latency

# what these tests expect depends on the int8 kernels: CI also runs them as if on each CPU family
# (FQEXPORT_HOST_KERNELS=x86-avx2|x86-vnni|arm64 pytest -m isa)
pytestmark = pytest.mark.isa

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
KERNELS = kernel_family(cpu_isa())  # which fused u8xs8 kernels ORT runs here (exporters/cpu_isa.py)


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _export(model, path, example):
    torch.onnx.export(
        model, (example,), str(path), dynamo=True, opset_version=21,
        dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
    )


def _quantize(src, dst, x):
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"x": x[i : i + 16]} for i in range(0, len(x), 16))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ort")
    net = MLP().eval()
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    _export(net, d / "float.onnx", torch.from_numpy(x[:2]))
    _quantize(d / "float.onnx", d / "qdq.onnx", x)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    return d, x, ref


def test_run_batches_matches_torch_for_any_batch_size(models):
    d, x, ref = models
    s = make_session(d / "float.onnx", threads=1)
    for bs in (1, 7, 64, 100):
        out = run_batches(s, x, bs)
        assert out.shape == (64, 3)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert input_shape(s)[1:] == (16,)
    assert not isinstance(input_shape(s)[0], int)  # dynamic batch


def test_fused_kernels_qdq_has_qgemm_and_float_has_gemm(models):
    d, _, _ = models
    q = fused_kernels(d / "qdq.onnx")
    assert q["QGemm"] == 2 and q["Gemm"] == 0 and q["QLinearConv"] == 0
    counts, floats = kernel_summary(d / "float.onnx")
    assert counts["QGemm"] == 0
    assert counts["Gemm"] + counts["FusedGemm"] + counts["MatMul"] >= 2
    assert len(floats) == counts["Gemm"] + counts["FusedGemm"] + counts["MatMul"] + counts["FusedMatMul"]


def test_optimized_and_unoptimized_qdq_sessions_both_track_float(models):
    d, x, ref = models
    opt = run_batches(make_session(d / "qdq.onnx", optimized=True), x, 32)
    raw = run_batches(make_session(d / "qdq.onnx", optimized=False), x, 32)
    scale = np.abs(ref).max()
    assert np.abs(raw - ref).mean() < 0.1 * scale
    assert np.abs(opt - ref).mean() < 0.1 * scale
    # quantize_static's full-range weights: what the fused kernels compute depends on the CPU.
    # The optimized session computes what the emulation of this CPU's family computes ...
    if KERNELS != "unknown":
        emulated = run_batches(EmulatedSession(d / "qdq.onnx", KERNELS), x, 32)
        np.testing.assert_allclose(opt, emulated, rtol=0, atol=1e-6 * scale)
    # ... and exact int32 sums (VNNI, arm64) agree closely with the graph's float math on any
    # CPU; AVX2's saturating pair sums may not (max diff 0.24 of 0.84 measured on an AVX2 CPU)
    exact = run_batches(EmulatedSession(d / "qdq.onnx", "x86-vnni"), x, 32)
    assert np.abs(exact - raw).max() < 0.1 * scale
    assert np.mean(exact.argmax(1) == raw.argmax(1)) >= 0.95



def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_build_session_takes_bytes_a_level_and_a_dump_path(models, tmp_path):
    d, x, ref = models
    qdq = onnx.load(str(d / "qdq.onnx")).SerializeToString()
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        build_session(qdq, level=level, dump_path=tmp_path / f"{level}.onnx", threads=1)
    # nothing fused unoptimized; EXTENDED and ALL fuse each QDQ Gemm into one QGemm
    assert "QGemm" not in _ops(tmp_path / "ORT_DISABLE_ALL.onnx")
    assert _ops(tmp_path / "ORT_DISABLE_ALL.onnx").count("DequantizeLinear") >= 4
    assert _ops(tmp_path / "ORT_ENABLE_EXTENDED.onnx").count("QGemm") == 2
    assert _ops(tmp_path / "ORT_ENABLE_ALL.onnx").count("QGemm") == 2
    # the same bytes and the same file give the same session: what make_session(optimized=False) runs
    from_bytes = build_session(onnx.load(str(d / "float.onnx")).SerializeToString(), level="ORT_DISABLE_ALL")
    from_file = make_session(d / "float.onnx", optimized=False)
    np.testing.assert_array_equal(run_batches(from_bytes, x, 16), run_batches(from_file, x, 16))
    np.testing.assert_allclose(run_batches(from_bytes, x, 16), ref, rtol=1e-4, atol=1e-5)
    # the onnxruntime enum value is accepted as well as its name
    build_session(d / "float.onnx", level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)


def test_build_session_allows_several_inputs_make_session_does_not(tmp_path):
    a, b = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in "ab")
    out = onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["a", "b"], ["s"])], "add", [a, b], [out])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    s = build_session(model.SerializeToString(), level="ORT_DISABLE_ALL")
    feeds = {"a": np.array([1, 2], np.float32), "b": np.array([10, 20], np.float32)}
    np.testing.assert_array_equal(s.run(None, feeds)[0], [11, 22])
    onnx.save(model, str(tmp_path / "add.onnx"))
    with pytest.raises(ModelLoadError) as err:
        make_session(tmp_path / "add.onnx")
    assert str(err.value) == MSG_INPUTS.format(path=tmp_path / "add.onnx", n=2, names="a, b")


def test_build_session_errors_name_the_level_and_the_model(models, tmp_path):
    with pytest.raises(ConfigError) as err:
        build_session(models[0] / "float.onnx", level="ORT_ENABLE_MOST")
    assert str(err.value) == MSG_LEVEL.format(level="ORT_ENABLE_MOST", choices=", ".join(OPT_LEVELS))
    assert str(err.value).startswith("level='ORT_ENABLE_MOST' is not one of ORT_DISABLE_ALL, ORT_ENABLE_BASIC, ")
    with pytest.raises(ModelLoadError, match=f"cannot load ONNX model {IN_MEMORY}: "):
        build_session(b"not a protobuf")
    with pytest.raises(ModelLoadError, match="cannot load ONNX model emulated node 3: "):
        build_session(b"not a protobuf", label="emulated node 3")
    with pytest.raises(ModelLoadError, match=r"nope\.onnx does not exist"):
        build_session(tmp_path / "nope.onnx")
    with pytest.raises(ConfigError, match=r"threads=-1 must be from 0 \(ORT's default\) to 4096"):
        build_session(models[0] / "float.onnx", threads=-1)
    # ORT's int32 overflowed into a TypeError: exit 3 "internal error" (survey 76)
    with pytest.raises(ConfigError, match=r"threads=2147483648 must be from 0"):
        build_session(models[0] / "float.onnx", threads=2**31)


def test_a_directory_is_not_an_onnx_file(tmp_path):
    (tmp_path / "dirmodel.onnx").mkdir()
    for load in (make_session, build_session, read_metadata, model_files_size):
        with pytest.raises(ModelLoadError) as err:
            load(tmp_path / "dirmodel.onnx")
        assert str(err.value) == MSG_IS_DIR.format(path=tmp_path / "dirmodel.onnx")
    assert str(err.value) == (f"ONNX model {tmp_path / 'dirmodel.onnx'} is a directory, not an .onnx file: give the "
                              "model's .onnx file")


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match=r"cannot load ONNX model .*broken\.onnx"):
        make_session(bad)
    with pytest.raises(ModelLoadError, match=r"nope\.onnx does not exist"):
        make_session(tmp_path / "nope.onnx")


def test_unknown_provider_is_config_error(models):
    with pytest.raises(ConfigError, match="provider='tpu' is not one of cpu, cuda"):
        make_session(models[0] / "float.onnx", provider="tpu")


@pytest.mark.skipif(HAS_CUDA, reason="CUDAExecutionProvider present: the missing-CUDA message cannot be tested")
def test_cuda_absent_names_the_package(models):
    with pytest.raises(ConfigError, match="pip install onnxruntime-gpu"):
        make_session(models[0] / "float.onnx", provider="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider not available (install onnxruntime-gpu on a GPU machine)")
def test_cuda_session_runs(models):
    d, x, ref = models
    s = make_session(d / "float.onnx", provider="cuda")
    np.testing.assert_allclose(run_batches(s, x, 16), ref, rtol=1e-3, atol=1e-3)



def test_model_files_size_counts_external_data(models, tmp_path):
    d, _, _ = models
    m = onnx.load(str(d / "float.onnx"))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    main = (tmp_path / "ext.onnx").stat().st_size
    data = (tmp_path / "ext.onnx.data").stat().st_size
    assert data > 16 * 32 * 4  # fc1 weight alone
    assert model_files_size(tmp_path / "ext.onnx") == main + data
    assert model_files_size(d / "float.onnx") == (d / "float.onnx").stat().st_size
    # one file its tensors name two ways counts once (it was counted twice: survey 54)
    from onnx.external_data_helper import uses_external_data

    m = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    for t in [t for t in m.graph.initializer if uses_external_data(t)][::2]:
        next(e for e in t.external_data if e.key == "location").value = "./ext.onnx.data"
    onnx.save(m, str(tmp_path / "ext.onnx"))
    assert model_files_size(tmp_path / "ext.onnx") == (tmp_path / "ext.onnx").stat().st_size + data


def test_model_files_size_counts_the_external_data_of_constant_nodes(tmp_path):
    """survey 77: weights moved into Constant nodes and saved as external data (convert_attribute)
    were not counted: a 37.9 MB model passed --max-size-mb 1."""
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "c.onnx"),
                    save_as_external_data=True, convert_attribute=True, location="c.data", size_threshold=0)
    data = (tmp_path / "c.data").stat().st_size
    assert data == 4096 * 4
    assert model_files_size(tmp_path / "c.onnx") == (tmp_path / "c.onnx").stat().st_size + data


def test_kernel_summary_and_optimized_graph_of_a_model_with_external_data(models, tmp_path):
    """torch.onnx.export(dynamo=True) keeps weights in <name>.onnx.data: ORT's dump of the optimized
    graph writes its own data file beside it (the model's relative location does not resolve there)."""
    d, _, _ = models
    for name in ("float", "qdq"):
        onnx.save(onnx.load(str(d / f"{name}.onnx")), str(tmp_path / f"{name}.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=f"{name}.onnx.data", size_threshold=0)
        assert kernel_summary(tmp_path / f"{name}.onnx") == kernel_summary(d / f"{name}.onnx")
    with_data = optimized_graph(tmp_path / "float.onnx")
    inline = optimized_graph(d / "float.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in with_data.graph.initializer}
    assert weights and weights.keys() == {t.name for t in inline.graph.initializer}
    for t in inline.graph.initializer:
        np.testing.assert_array_equal(weights[t.name], numpy_helper.to_array(t))


def test_measure_latency_reports_settings(models):
    d, x, _ = models
    s = make_session(d / "qdq.onnx", threads=1)
    lat = measure_latency(s, x[:3], batch_size=8, warmup=2, repeats=10)
    assert lat.batch_size == 8 and lat.threads == 1 and lat.warmup == 2 and lat.repeats == 10
    assert 0 < lat.p50_ms <= lat.p95_ms
    assert lat.throughput_per_s == pytest.approx(8 / (lat.mean_ms / 1e3))
    with pytest.raises(ConfigError, match="repeats=0"):
        measure_latency(s, x, 1, repeats=0)


# Full-range 8-bit weights (|q| = 127) against uint8 inputs near 255: the one case where the fused
# kernels' numerics depend on the instruction set (/work/shared/ORT-NOTES.md). The expectation of
# this CPU's session comes from the emulation of its family, so the test holds on every family.


def _minority_accuracy(session, data):
    pred = run_batches(session, data.x, 64).argmax(1)
    m = data.group == data.group_names.index("minority")
    return float((pred[m] == data.y[m]).mean()), float((pred[~m] == data.y[~m]).mean())


def test_this_cpus_kernels_saturate_full_range_weights_exactly_when_its_family_does(tmp_path):
    data = saturating_qdq_gemm(tmp_path / "sat.onnx")
    path = tmp_path / "sat.onnx"
    assert _minority_accuracy(make_session(path, optimized=False), data) == (1.0, 1.0)  # the graph's math
    expected = {"x86-avx2": (0.0, 1.0), "x86-vnni": (1.0, 1.0), "arm64": (1.0, 1.0)}  # saturated pairs vs exact sums
    for family, accuracy in expected.items():
        assert _minority_accuracy(EmulatedSession(path, family), data) == accuracy, family
    if KERNELS == "unknown":
        pytest.skip(f"CPU instruction set {cpu_isa()!r} has no known int8 kernel family")
    assert _minority_accuracy(make_session(path, optimized=True), data) == expected[KERNELS]


def test_an_unnamed_float_node_is_listed_as_unnamed(tmp_path):
    """Unnamed nodes printed as "Gemm:, Gemm:" (survey 22)."""
    import onnx
    from onnx import TensorProto, helper

    from fqexport.exporters.ort_session import float_fallbacks

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32))
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "g.onnx")
    assert float_fallbacks(tmp_path / "g.onnx") in (["Gemm:(unnamed)"], ["MatMul:(unnamed)"])


def test_float_nodes_are_named_by_their_layer_where_the_file_names_the_weight(tmp_path):
    """validate's float line printed ORT's node names (``FusedConv:n2``, ``Conv:t9_nchwc``), which
    name no layer; a weight ``<layer>.weight`` names it, through ORT's renames (the NCHWc conv's
    weight becomes ``reorder``, the node is named after the fused Relu's output)."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 12 * 12, 4)).eval()
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), tmp_path / "c.onnx", dynamo=True)
    counts, floats = kernel_summary(tmp_path / "c.onnx")
    assert sorted(f.split(" (")[0] for f in floats) == ["0", "2", "5"], floats
    ops = [f.split(" (")[1].rstrip(")") for f in floats]
    assert sum(counts[op] for op in set(ops)) == len(floats)


def _int8_pair_before_maxpool(path):
    """Relu -> Q/DQ (int8, zero point 0, opset 21: the gpu target's S8S8) -> MaxPool -> Reshape -> MatMul
    in float: the pattern ORT's CPU optimizers break (QDQ propagation + the S8->U8 conversion)."""
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.array([-1, 4], np.int64), "shape"),
             numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "w")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
    g = helper.make_graph(nodes, "s8_maxpool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_a_file_ort_s_own_qdq_propagation_breaks_loads_without_it_and_says_so(tmp_path, caplog):
    """validate could not load any --target gpu file with a weight-only Linear after a MaxPool: ORT's QDQ
    propagation and its S8->U8 conversion left an int8 output_dtype beside a uint8 zero point, and the error
    called the file incomplete (survey 57)."""
    path = tmp_path / "s8.onnx"
    _int8_pair_before_maxpool(path)
    with pytest.raises(Exception, match="does not match y_zero_point type"):  # what ORT itself does today
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 1, 4, 4)).astype(np.float32)
    with caplog.at_level("WARNING", logger="fqexport.exporters.ort_session"):
        got = run_batches(make_session(path), x, 8)
        make_session(path)  # said once per file
    assert caplog.text.count("ONNX Runtime's optimizers cannot load") == 1
    assert "runs without QDQPropagationTransformer" in caplog.text
    np.testing.assert_allclose(got, run_batches(make_session(path, optimized=False), x, 8), atol=1e-6)


def test_the_default_thread_count_is_one_per_physical_core(tmp_path):
    """ORT's default pool has a thread per physical core; the report said os.cpu_count(), SMT
    siblings included (survey 77: "16 threads" for a run on 8)."""
    from fqexport.exporters.ort_session import physical_cores

    for cpu, (package, core) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 0)]):  # 2-way SMT
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    assert physical_cores(range(6), tmp_path) == 3
    assert physical_cores([0, 2], tmp_path) == 1  # two siblings of one core
    assert physical_cores([0, 7], tmp_path) == 2  # no topology for cpu7: the CPUs counted
    import os

    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "r.onnx"))
    assert session_threads(make_session(tmp_path / "r.onnx")) == physical_cores() <= (os.cpu_count() or 1)
    assert session_threads(make_session(tmp_path / "r.onnx", threads=1)) == 1


def test_float_nodes_of_a_classic_torch_export_are_named_as_the_file_names_them(tmp_path):
    """torch's classic exporter folds BatchNorm into ``onnx::Conv_NN`` weights: validate listed the
    conv as ``Conv:/stem/stem.2/Relu_output_0_nchwc``, a name in neither the file nor the model
    (survey 80); it is the file's own node name now."""
    import warnings

    from fqexport.exporters.ort_session import float_fallbacks

    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(tmp_path / "c.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "N"}})
    names = {n.name for n in onnx.load(str(tmp_path / "c.onnx")).graph.node}
    listed = float_fallbacks(tmp_path / "c.onnx")
    assert sorted(listed) == ["/0/Conv (Conv)", "4 (Gemm)"], listed
    assert "/0/Conv" in names
