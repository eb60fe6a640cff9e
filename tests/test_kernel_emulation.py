"""Tests of exporters/kernel_emulation.py: the int8 kernels' arithmetic per CPU target."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.errors import ConfigError
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.kernel_emulation import (
    ConvGeometry,
    EmulatedSession,
    accumulate,
    check_target,
    conv_accumulate,
    exact_runs,
    qlinear_conv,
    requantize,
    requantize_sums,
)
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.exporters.pair_saturation import pair_saturation_correction
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.pipeline.compress import compress

# what these tests expect depends on the int8 kernels: CI also runs them as if on each CPU family
# (FQEXPORT_HOST_KERNELS=x86-avx2|x86-vnni|arm64 pytest -m isa)
pytestmark = pytest.mark.isa

SX = 1.0 / 255.0  # input quantized on [0, 1] with zero point 0: x = 1.0 -> 255
SY = 10.0 / 255.0  # output on [0, 10]
SW = 1.0 / 127.0


def _qdq_model(path, w_q: np.ndarray, conv: bool) -> None:
    """x -> Q/DQ (u8) -> Gemm or 1x1 Conv with DQ(int8 W) -> Q/DQ (u8) -> y."""
    m, k = w_q.shape
    w = w_q.reshape(m, k, 1, 1) if conv else w_q
    inits = [
        numpy_helper.from_array(np.array(SX, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(np.array(SY, np.float32), "sy"),
        numpy_helper.from_array(np.array(0, np.uint8), "zy"),
        numpy_helper.from_array(w.astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(m, SW, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(m, np.int8), "zw"),
        numpy_helper.from_array(np.zeros(m, np.float32), "b"),
    ]
    op = helper.make_node("Conv", ["xd", "wd", "b"], ["h"]) if conv else helper.make_node(
        "Gemm", ["xd", "wd", "b"], ["h"], transB=1)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
        op,
        helper.make_node("QuantizeLinear", ["h", "sy", "zy"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "sy", "zy"], ["y"]),
    ]
    shape = ["N", k, 1, 1] if conv else ["N", k]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape[:1] + [None] * (len(shape) - 1))], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _expected_q(x_q: np.ndarray, w_q: np.ndarray, saturate: bool) -> np.ndarray:
    """Independent loop: pairs (k, k+1) of u8·s8 products, int16-saturated when asked."""
    out = np.zeros((x_q.shape[0], w_q.shape[0]), dtype=np.int64)
    for r in range(x_q.shape[0]):
        for m in range(w_q.shape[0]):
            acc = 0
            for k in range(0, w_q.shape[1], 2):
                p = int(x_q[r, k]) * int(w_q[m, k]) + int(x_q[r, k + 1]) * int(w_q[m, k + 1])
                acc += min(max(p, -32768), 32767) if saturate else p
            out[r, m] = min(255, max(0, round(acc * SX * SW / SY)))
    return out


# Row 0: all +127 (pairs of one sign: 2·255·127 = 64770 leaves int16); row 1: alternating
# signs (a pair is at most 255·127 = 32385: never saturates); row 2: |q| <= 63.
W_FULL = np.array([[127] * 8, [127, -127] * 4, [63, 60, -63, -50, 63, 63, 10, 0]], dtype=np.int8)


@pytest.mark.parametrize("conv", [False, True], ids=["gemm", "conv1x1"])
def test_full_range_weights_saturate_on_avx2_only(tmp_path, conv):
    path = tmp_path / "m.onnx"
    _qdq_model(path, W_FULL, conv)
    x = np.array([[1.0] * 8, [0.98] * 8, np.linspace(0, 1, 8)], dtype=np.float32)
    x_q = np.clip(np.rint(x / SX), 0, 255).astype(np.uint8)
    feed = x.reshape(3, 8, 1, 1) if conv else x
    ys = {}
    for target in ("x86-vnni", "x86-avx2", "arm64"):
        s = EmulatedSession(path, target)
        assert s.emulated_nodes and s.emulated_nodes[0].startswith("QLinearConv" if conv else "QGemm")
        ys[target] = np.rint(s.run(None, {"x": feed})[0].reshape(3, 3) / SY).astype(np.int64)
    np.testing.assert_array_equal(ys["x86-vnni"], _expected_q(x_q, W_FULL, saturate=False))
    np.testing.assert_array_equal(ys["x86-avx2"], _expected_q(x_q, W_FULL, saturate=True))
    np.testing.assert_array_equal(ys["arm64"], ys["x86-vnni"])
    # all-255 activations against +127 weights: exact 8·255·127 = 259080 -> 204; saturated
    # 4·32767 = 131068 -> 103 (output step 10/255)
    assert ys["x86-vnni"][0, 0] == 204 and ys["x86-avx2"][0, 0] == 103
    assert (ys["x86-avx2"][:, 1:] == ys["x86-vnni"][:, 1:]).all()  # mixed signs / |q| <= 63: no saturation


def test_pair_correction_is_zero_for_7bit_weights():
    rng = np.random.default_rng(0)
    a = rng.integers(200, 256, size=(50, 33)).astype(np.uint8)  # odd K: padded like MLAS
    w = rng.integers(-64, 65, size=(6, 33)).astype(np.int8)
    assert not pair_saturation_correction(a, w).any()
    w[0, :2] = 127
    corr = pair_saturation_correction(a, w)
    p = a[:, 0].astype(np.int64) * 127 + a[:, 1].astype(np.int64) * 127
    np.testing.assert_array_equal(corr[:, 0], 32767 - p)
    assert not corr[:, 1:].any()


def test_pair_correction_over_every_activation_pair():
    """Every (a_e, a_o) in [0, 255]² against one-signed pairs up to −128: each pair saturates
    exactly where its sum leaves [−32768, 32767] (the boundaries 32767 / −32768 stay)."""
    a_e, a_o = np.divmod(np.arange(256 * 256), 256)
    a = np.stack([a_e, a_o], axis=1).astype(np.uint8)
    w = np.array([[127, 127], [-128, -128], [127, 2], [-128, -1], [100, 29], [-3, -126], [64, 65], [64, 64]], np.int8)
    p = a_e[:, None] * w[:, 0].astype(np.int64) + a_o[:, None] * w[:, 1].astype(np.int64)
    np.testing.assert_array_equal(pair_saturation_correction(a, w), np.clip(p, -32768, 32767) - p)
    assert (p == 32767).any() and (p == -32768).any() and (p == -32769).any()


def test_accumulate_subtracts_zero_point_exactly():
    a = np.array([[10, 20, 30]], dtype=np.uint8)
    w = np.array([[1, -2, 3]], dtype=np.int8)
    assert accumulate(a, w, 5, "x86-vnni")[0, 0] == (5 * 1 - 15 * 2 + 25 * 3)


def test_requantize_rounds_half_to_even_and_clips():
    acc = np.array([[1, 3, 5, 1000, -1000]], dtype=np.int64)
    y = requantize(acc, np.full(5, 0.5, np.float32), 10, np.dtype(np.uint8))
    np.testing.assert_array_equal(y, [[10, 12, 12, 255, 0]])  # 0.5->0, 1.5->2, 2.5->2


def test_requantize_of_float_sums_is_the_integer_requantize():
    """Exact sums in float32 or float64 (up to 2^24, where float32(acc + bias) rounds) plus int32
    biases — small, beyond 2^24 (inexact in float32), and ones whose int32 sum wraps — requantize
    like the int64 route (MLAS's int32 accumulator)."""
    rng = np.random.default_rng(4)
    acc = rng.integers(-(1 << 24) + 1, 1 << 24, size=(2, 3, 5, 5))
    scale = np.array([1e-5, 3e-7, 0.01], np.float32)[:, None, None]
    for bias in (rng.integers(-1000, 1000, 3), rng.integers(1 << 24, 1 << 30, 3) | 1, np.array([2**31 - 10, -2**31 + 5, 7])):
        bias = bias.astype(np.int32)
        for zy, dtype in ((3, np.uint8), (-2, np.int8)):
            want = requantize(acc + bias.astype(np.int64)[:, None, None], scale, zy, np.dtype(dtype))
            for float_type in (np.float32, np.float64):
                got = requantize_sums(acc.astype(float_type), bias[:, None, None], scale, zy, np.dtype(dtype))
                np.testing.assert_array_equal(got, want)
    assert (requantize(acc, scale, 3, np.dtype(np.uint8)) == requantize_sums(acc.astype(np.float32), None, scale, 3,
                                                                            np.dtype(np.uint8))).all()


def test_unknown_target_is_a_config_error():
    with pytest.raises(ConfigError, match="target 'x86-sse' is not one of native, x86-avx2, x86-vnni, arm64"):
        check_target("x86-sse")


# ----------------------------------------------------------------- real fqexport exports


@pytest.fixture(scope="module")
def exports(tmp_path_factory, cnn_model, cnn_data, mlp_model, mlp_data, cnn_cm8):
    d = tmp_path_factory.mktemp("emu")
    out = {"cnn_safe": (export_qdq(cnn_cm8, d / "cnn_safe.onnx").path, cnn_data)}
    for name, model, data in (("cnn_full", cnn_model, cnn_data), ("mlp_full", mlp_model, mlp_data)):
        cm = compress(model, data, QuantConfig(num_calib=128, weight_range="full", target="x86-vnni"), progress=False)
        out[name] = (export_qdq(cm, d / f"{name}.onnx").path, data)
    return out


@pytest.mark.parametrize("name", ["cnn_full", "mlp_full", "cnn_safe"])
def test_emulation_of_this_machines_family_matches_native(exports, name):
    family = kernel_family(cpu_isa())
    if family == "unknown":
        pytest.skip(f"CPU instruction set {cpu_isa()!r} has no emulated kernel family")
    path, data = exports[name]
    native = run_batches(make_session(path, threads=1), data.x, 128)
    emu = run_batches(EmulatedSession(path, family, threads=1), data.x, 128)
    same = (np.abs(native - emu).max(axis=1) == 0).mean()
    assert same >= 0.999, f"{family} emulation matches native on {same:.2%} of samples"


def test_default_export_is_identical_under_avx2_and_vnni(exports):
    path, data = exports["cnn_safe"]
    a = run_batches(EmulatedSession(path, "x86-avx2"), data.x, 128)
    b = run_batches(EmulatedSession(path, "x86-vnni"), data.x, 128)
    np.testing.assert_array_equal(a, b)


def test_asymmetric_weights_are_refused_naming_the_node(tmp_path):
    path = tmp_path / "m.onnx"
    _qdq_model(path, W_FULL[:, :8], conv=False)
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name == "zw":
            t.CopyFrom(numpy_helper.from_array(np.array([1, 0, 0], np.int8), "zw"))
    onnx.save(model, str(path))
    s = EmulatedSession(path, "x86-avx2")
    if not s.emulated_nodes:
        pytest.skip("this onnxruntime does not fuse an asymmetric-weight Gemm")
    with pytest.raises(ConfigError, match=r"does not cover node .* \(QGemm\) of .*m\.onnx: a non-zero weight zero "
                                          r"point \(symmetric weights only\)\. It covers 1-D and 2-D"):
        s.run(None, {"x": np.ones((2, 8), np.float32)})


def test_conv_pairs_follow_mlas_nhwc_order_across_taps():
    """C=3 (no ConvSym kernel: MLAS's im2col GEMM): K runs tap by tap, channels inside a tap,
    and pairs (k, k+1) straddle taps; padding holds the input zero point."""
    rng = np.random.default_rng(3)
    x = rng.integers(180, 256, size=(2, 3, 4, 4)).astype(np.uint8)
    w = rng.integers(60, 128, size=(2, 3, 3, 3)).astype(np.int8)
    w[1] *= -1
    zx, scale = 7, np.float32(1e-4)
    args = [x, np.float32(1.0), np.array(zx, np.uint8), w, np.ones(2, np.float32), np.zeros(2, np.int8),
            np.float32(1.0 / float(scale)), np.array(0, np.uint8)]
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zx)
    for target, saturate in (("x86-vnni", False), ("x86-avx2", True)):
        got = qlinear_conv(args, {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}, target)
        for n in range(2):
            for m in range(2):
                for i in range(4):
                    for j in range(4):
                        a = [xp[n, c, i + di, j + dj] for di in range(3) for dj in range(3) for c in range(3)] + [0]
                        b = [int(w[m, c, di, dj]) for di in range(3) for dj in range(3) for c in range(3)] + [0]
                        acc = 0
                        for k in range(0, 28, 2):
                            p = a[k] * b[k] + a[k + 1] * b[k + 1]
                            acc += min(max(p, -32768), 32767) if saturate else p
                        acc -= zx * sum(b)
                        want = min(255, max(0, int(np.rint(np.float32(acc) * scale))))
                        assert got[n, m, i, j] == want, (target, n, m, i, j)


def test_native_is_not_an_emulated_target(tmp_path):
    path = tmp_path / "m.onnx"
    _qdq_model(path, W_FULL, conv=False)
    with pytest.raises(ConfigError, match=r"target 'native' runs ONNX Runtime's own session"):
        EmulatedSession(path, "native")
    assert EmulatedSession(path, "x86-avx2").native_nodes == []


def test_a_product_of_two_uint8_activations_is_exact_not_a_native_warning(tmp_path, caplog):
    """Attention's Q·Kᵀ of a BERT-style model (q @ kᵀ / √d after quantized Linears) fuses into a
    u8×u8 MatMulIntegerToFloat: it was warned about as "results are native, not x86-avx2" while
    the target line said no node depends on the kernels (survey 67). u8×u8 sums are exact on every
    family: it counts among the exact nodes, with no warning, and the outputs equal native."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4, 8])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 8, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", [v, "s", "z"], [f"q{v}"]) for v in "ab"]
    nodes += [helper.make_node("DequantizeLinear", [f"q{v}", "s", "z"], [f"d{v}"]) for v in "ab"]
    nodes.append(helper.make_node("MatMul", ["da", "db"], ["y"]))
    path = tmp_path / "qk.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [a, b], [y], inits),
                                opset_imports=[helper.make_opsetid("", 21)]), str(path))
    with caplog.at_level("INFO", logger="fqexport.exporters.kernel_emulation"):
        session = EmulatedSession(path, "x86-avx2")
    assert session.native_nodes == [] and session.emulated_nodes == []
    assert [n.split(":")[0] for n in session.exact_nodes] == ["MatMulIntegerToFloat"]
    assert "own kernels" not in caplog.text
    rng = np.random.default_rng(0)
    feeds = {"a": rng.uniform(-6, 6, (2, 4, 8)).astype(np.float32), "b": rng.uniform(-6, 6, (2, 8, 4)).astype(np.float32)}
    native = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # two inputs: not make_session's
    np.testing.assert_array_equal(session.run(None, feeds)[0], native.run(None, feeds)[0])


# ----------------------------------------------------------------- the fast paths stay exact


def _conv_reference(x, w, zx, group, stride, dil, pad, saturate):
    """Independent int64 loop: per output, K in NHWC order (tap, channel), pairs (k, k+1)."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    mg = m // group
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=zx)
    oh = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, m, oh, ow), np.int64)
    for b in range(n):
        for o in range(m):
            g = o // mg
            wk = w[o].transpose(1, 2, 0).reshape(-1).astype(np.int64)  # (kh, kw, c)
            for i in range(oh):
                for j in range(ow):
                    patch = xp[b, g * cg : (g + 1) * cg, i * stride : i * stride + dil * (kh - 1) + 1 : dil,
                               j * stride : j * stride + dil * (kw - 1) + 1 : dil]
                    a = list(patch.transpose(1, 2, 0).reshape(-1)) + [0]
                    wl = list(wk) + [0]
                    acc = 0
                    for k in range(0, len(wk), 2):
                        p = a[k] * wl[k] + a[k + 1] * wl[k + 1]
                        acc += min(max(p, -32768), 32767) if saturate else p
                    out[b, o, i, j] = acc - zx * int(wk.sum())
    return out


@pytest.mark.parametrize("cg,group,stride,dil,large,zx", [(4, 1, 1, 1, 0.04, 5), (3, 1, 2, 1, 0.04, 5),
                                                        (4, 2, 1, 2, 0.04, 5), (5, 1, 1, 1, 0.04, 5),
                                                        (4, 1, 1, 1, 0.9, 5), (6, 1, 2, 1, 0.2, 5),
                                                        (4, 1, 1, 1, 0.04, 250)],
                         ids=["even-c", "odd-c-stride2", "groups-dilation", "odd-c", "mostly-large", "even-c-stride2",
                              "even-c-hot-padding"])
def test_conv_accumulation_matches_an_int64_loop(cg, group, stride, dil, large, zx):
    """Few large activations (found from the input) or mostly large ones (every im2col pair
    bounded): each pair that leaves int16 saturates, across taps, groups, strides, dilations, odd
    channel counts and a padding that holds the zero point (one that saturates too: 250)."""
    rng = np.random.default_rng(cg * 10 + group)
    x = rng.integers(0, 60, size=(2, cg * group, 7, 7)).astype(np.uint8)
    x[rng.random(x.shape) < large] = 255
    w = rng.integers(-127, 128, size=(3 * group, cg, 3, 3)).astype(np.int8)
    geometry = ConvGeometry((3, 3), (stride, stride), (dil, dil), (1, 1, 1, 1))
    for target, saturate in (("x86-avx2", True), ("x86-vnni", False)):
        want = _conv_reference(x, w, zx, group, stride, dil, 1, saturate)
        np.testing.assert_array_equal(conv_accumulate(x, w, zx, group, geometry, target), want)
    assert (_conv_reference(x, w, zx, group, stride, dil, 1, True) != _conv_reference(x, w, zx, group, stride, dil, 1,
                                                                                       False)).any()


def test_conv_over_many_channels_is_split_into_exact_runs():
    """1024 channels of ±127 weights: Σ a·w leaves float32's exact range, so the conv runs over
    channel runs added in float64 — still the int64 result."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 1024, 3, 3)).astype(np.uint8)
    w = np.where(rng.random((2, 1024, 3, 3)) < 0.5, -127, 127).astype(np.int8)
    per_channel = np.abs(w.astype(np.int64)).sum(axis=(2, 3))
    runs = exact_runs(per_channel)
    assert len(runs) > 1 and all(255 * per_channel[:, a:b].sum(axis=1).max() < 2**24 for a, b in runs)
    want = np.einsum("nchw,mchw->nm", x.astype(np.int64) - 3, w.astype(np.int64))
    got = conv_accumulate(x, w, 3, 1, ConvGeometry((3, 3), (1, 1), (1, 1), (0, 0, 0, 0)), "x86-vnni")
    np.testing.assert_array_equal(got[:, :, 0, 0], want)


@pytest.mark.parametrize("zx", [0, 255])
def test_conv_runs_reach_their_bound_and_stay_exact(zx):
    """One-signed weights of |q| >= 120 and every activation within 5 of the end of [−z, 255 − z]
    that the bound allows for: each run's sum comes near 2^24 (where float32 starts rounding:
    runs twice as long give wrong sums), runs come in whole NCHWc blocks, and the float64 sum of
    the runs is exact."""
    rng = np.random.default_rng(0)
    x = (rng.integers(250, 256, (2, 1024, 3, 3)) if zx == 0 else rng.integers(0, 6, (2, 1024, 3, 3))).astype(np.uint8)
    w = rng.integers(120, 128, (2, 1024, 3, 3)).astype(np.int8)
    w[1] *= -1
    runs = exact_runs(w.reshape(2, 1024, 9), zx)
    assert len(runs) > 1 and all((b - a) % 16 == 0 for a, b in runs[:-1])
    assert 255 * np.abs(w[0, : runs[0][1]].astype(np.int64)).sum() > 2**24 - 255 * 127 * 9 * 16
    want = np.einsum("nchw,mchw->nm", x.astype(np.int64) - zx, w.astype(np.int64))
    got = conv_accumulate(x, w, zx, 1, ConvGeometry((3, 3), (1, 1), (1, 1), (0, 0, 0, 0)), "x86-vnni")
    np.testing.assert_array_equal(got[:, :, 0, 0], want)


def test_nodes_that_cannot_saturate_run_with_ort_and_the_rest_are_emulated(exports):
    safe = EmulatedSession(exports["cnn_safe"][0], "x86-avx2")
    assert safe.emulated_nodes == [] and safe.exact_nodes
    full = EmulatedSession(exports["cnn_full"][0], "x86-avx2")
    assert full.emulated_nodes and all(n.startswith(("QLinearConv", "QGemm")) for n in full.emulated_nodes)


def test_a_batch_split_over_threads_gives_the_single_thread_result(exports):
    path, data = exports["cnn_full"]
    one = EmulatedSession(path, "x86-avx2", threads=1).run(None, {"input": data.x[:37]})
    two = EmulatedSession(path, "x86-avx2", threads=2).run(None, {"input": data.x[:37]})
    np.testing.assert_array_equal(one[0], two[0])


def test_a_model_with_external_data_emulates_like_the_same_model_inline(exports, tmp_path):
    """ORT's optimized dump of a model whose weights are in <name>.onnx.data writes its own data file
    (the model's relative location does not resolve in the dump's folder)."""
    path, data = exports["cnn_full"]
    onnx.save(onnx.load(str(path)), str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=256)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 1024  # the weights (ORT wants shapes inline)
    for target in ("x86-avx2", "x86-vnni", "arm64"):
        inline = EmulatedSession(path, target, threads=1)
        external = EmulatedSession(tmp_path / "ext.onnx", target, threads=1)
        assert external.emulated_nodes == inline.emulated_nodes
        np.testing.assert_array_equal(external.run(None, {"input": data.x[:16]})[0],
                                      inline.run(None, {"input": data.x[:16]})[0])


def _dynamic_mlp(tmp_path, rng, weight_type=QuantType.QInt8) -> str:
    """ORT quantize_dynamic of a float MLP (full-range int8 weights): DynamicQuantizeMatMul after fusion."""
    w1, w2 = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((10, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "float.onnx"))
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "dynamic.onnx"), weight_type=weight_type)
    return str(tmp_path / "dynamic.onnx")


def _per_target(path, x, batch: int, threads: int = 1) -> dict[str, tuple[EmulatedSession, np.ndarray]]:
    """Each emulated target's session and outputs on ``x``."""
    out = {}
    for target in ("x86-avx2", "x86-vnni", "arm64"):
        session = EmulatedSession(path, target, threads=threads)
        out[target] = (session, run_batches(session, x, batch))
    return out


def _assert_host_family_is_native(path, x, outs, batch: int) -> None:
    """The exact-sum targets agree; this CPU's family is what its own session computes."""
    np.testing.assert_array_equal(outs["x86-vnni"][1], outs["arm64"][1])
    family = kernel_family(cpu_isa())
    if family != "unknown":
        np.testing.assert_array_equal(outs[family][1], run_batches(make_session(path, threads=1), x, batch))


def test_a_quantize_dynamic_file_is_emulated_under_every_target(tmp_path):
    """quantize_dynamic's DynamicQuantizeMatMul is a u8×s8 GEMM like any other: emulated (the survey:
    it ran natively under x86-avx2, reported as emulated). DynamicQuantizeLinear takes its range over
    the whole batch: a batch split over threads would change it, so the batch runs whole."""
    rng = np.random.default_rng(0)
    path = _dynamic_mlp(tmp_path, rng)
    x = rng.uniform(0, 1, (128, 32)).astype(np.float32)  # non-negative: stored near 255, pairs leave int16
    x[::64] *= 3.0  # one wide sample per batch of 64: it sets the range of the half it falls in only
    outs = _per_target(path, x, 64, threads=2)
    for session, _ in outs.values():
        assert session.batch_coupled_nodes and session.native_nodes == []
        assert [n.split(":")[0] for n in session.emulated_nodes] == ["DynamicQuantizeMatMul"] * 2
    _assert_host_family_is_native(path, x, outs, 64)
    assert not np.array_equal(outs["x86-avx2"][1], outs["x86-vnni"][1])  # full-range pairs saturate


TOKEN_ZX = 7  # the token Linear's activation zero point


def _token_scales(n: int) -> np.ndarray:
    return (SW * np.linspace(0.5, 2.0, n)).astype(np.float32)  # one per output column


def _token_matmul(path, w_q: np.ndarray) -> None:
    """A QDQ token Linear, x [N, T, K] uint8-quantized (zero point :data:`TOKEN_ZX`), W int8 with a
    scale per column, float output: ORT fuses it into MatMulIntegerToFloat."""
    k, n = w_q.shape
    inits = [numpy_helper.from_array(np.array(SX, np.float32), "sx"),
             numpy_helper.from_array(np.array(TOKEN_ZX, np.uint8), "zx"),
             numpy_helper.from_array(w_q, "wq"), numpy_helper.from_array(_token_scales(n), "sw"),
             numpy_helper.from_array(np.zeros(n, np.int8), "zw"),
             numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    graph = helper.make_graph(nodes, "token_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_token_linear_fused_into_matmul_integer_to_float_is_emulated(tmp_path):
    """The survey: fqexport's token Linears (MatMulIntegerToFloat) ran with this CPU's exact sums
    under x86-avx2; full-range weights with large activations saturate there."""
    rng = np.random.default_rng(1)
    w_q = rng.integers(-127, 128, size=(16, 6)).astype(np.int8)
    _token_matmul(tmp_path / "t.onnx", w_q)
    x = rng.uniform(0, 1, (32, 5, 16)).astype(np.float32)
    outs = _per_target(tmp_path / "t.onnx", x, 32)
    assert all([n.split(":")[0] for n in s.emulated_nodes] == ["MatMulIntegerToFloat"] for s, _ in outs.values())
    _assert_host_family_is_native(tmp_path / "t.onnx", x, outs, 32)
    # x86-avx2: the stored activations' pairs added in int16 with saturation, then float(acc)·s_x·s_w + b
    # MLAS: the stored uint8 a (zero point inside) times w, pairs saturated, then −z_x·Σ_k w exactly
    x_q = np.clip(np.rint(x / np.float32(SX)) + TOKEN_ZX, 0, 255).astype(np.int64).reshape(-1, 16)
    products = x_q[:, :, None] * w_q.astype(np.int64)[None]  # [rows, K, N]
    acc = np.clip(products[:, 0::2] + products[:, 1::2], -32768, 32767).sum(1) - TOKEN_ZX * w_q.astype(np.int64).sum(0)
    want = (acc.astype(np.int32).astype(np.float32) * (np.float32(SX) * _token_scales(6))
            + np.linspace(-1, 1, 6).astype(np.float32)).reshape(32, 5, 6)
    np.testing.assert_array_equal(outs["x86-avx2"][1], want)
    assert not np.array_equal(outs["x86-avx2"][1], outs["x86-vnni"][1])


def test_conv_integer_runs_natively_on_every_target(tmp_path):
    """quantize_dynamic's convs (ConvInteger) are an S8U8 GEMM in ORT (the weights as A), whose x86
    kernel without AVX-VNNI-INT8 is MLAS's portable, exact one (ORT's source): not emulated, not
    refused, every target's result is the native one."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "float.onnx"))
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "conv.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["Conv"])
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    native = run_batches(make_session(tmp_path / "conv.onnx", threads=1), x, 16)
    for target in ("x86-avx2", "x86-vnni", "arm64"):
        session = EmulatedSession(tmp_path / "conv.onnx", target, threads=1)
        assert session.emulated_nodes == []
        np.testing.assert_array_equal(run_batches(session, x, 16), native)


def test_a_3d_conv_is_refused_naming_the_node(tmp_path):
    """The survey: a Conv3d's QLinearConv crashed the risk check (a 5-D weight) with ValueError."""
    w_q = np.random.default_rng(3).integers(-127, 128, size=(4, 2, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(SX, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             numpy_helper.from_array(w_q, "wq"), numpy_helper.from_array(np.full(4, SW, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(4, np.int8), "zw"),
             numpy_helper.from_array(np.array(SY, np.float32), "sy"), numpy_helper.from_array(np.array(0, np.uint8), "zy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv3d"),
             helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "c3d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 2, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "c3d.onnx"))
    x = np.random.default_rng(4).uniform(0, 1, (2, 2, 4, 4, 4)).astype(np.float32)
    for target in ("x86-avx2", "x86-vnni", "arm64"):
        session = EmulatedSession(tmp_path / "c3d.onnx", target, threads=1)
        with pytest.raises(ConfigError, match=r"does not cover node .*\(QLinearConv\) .* a 3-D convolution \(1-D and 2-D only\)"):
            session.run(None, {"x": x})


def test_fqexport_exports_have_no_batch_coupled_node(exports):
    """Their batches are split over the threads (the emulation's speed)."""
    for name in ("cnn_full", "mlp_full", "cnn_safe"):
        assert EmulatedSession(exports[name][0], "x86-avx2").batch_coupled_nodes == [], name


def test_gemm_accumulation_over_long_k_is_exact():
    """K = 2048 of ±127 weights (Σ a·w beyond float32's exact range: runs of K added in float64),
    a few large activations: exact on x86-vnni, pairwise-saturated on x86-avx2."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 100, size=(6, 2048)).astype(np.uint8)
    a[rng.random(a.shape) < 0.05] = 255
    w = np.where(rng.random((5, 2048)) < 0.5, -127, 127).astype(np.int8)
    pairs = a[:, None, 0::2].astype(np.int64) * w[None, :, 0::2] + a[:, None, 1::2].astype(np.int64) * w[None, :, 1::2]
    offset = 7 * w.sum(axis=1, dtype=np.int64)
    np.testing.assert_array_equal(accumulate(a, w, 7, "x86-vnni"), pairs.sum(axis=2) - offset)
    np.testing.assert_array_equal(accumulate(a, w, 7, "x86-avx2"), np.clip(pairs, -32768, 32767).sum(axis=2) - offset)
    assert (np.clip(pairs, -32768, 32767) != pairs).any()


def test_avx2_accumulation_without_large_activations_is_the_exact_sum():
    """Activations <= 128 against +127 weights: no pair reaches 2·128·127 = 32512 > 32767, so
    nothing saturates (and finding no candidate is not an error)."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 129, size=(4, 16)).astype(np.uint8)
    w = np.full((3, 16), 127, np.int8)
    np.testing.assert_array_equal(accumulate(a, w, 0, "x86-avx2"), a.astype(np.int64) @ w.T.astype(np.int64))


class _SquareAndGroupNorm(nn.Module):
    """``h * h`` (a Mul reading one tensor twice) and GroupNorm (exported as a function whose
    inlined body reads its input twice): one-node graphs must declare such an input once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        h = h.mean(dim=(2, 3))
        return self.fc(h * h)


def test_nodes_reading_one_input_twice_export_and_emulate_on_every_family(tmp_path):
    torch.manual_seed(0)
    model = _SquareAndGroupNorm().eval()
    x = np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = GroupData(x, y, np.arange(64) % 2, ("a", "b"), "square")
    cm = compress(model, data, QuantConfig(weight_bits=8, num_calib=64), progress=False)
    path = export_qdq(cm, tmp_path / "m.onnx").path  # the default target's check emulates x86-vnni and arm64
    native = run_batches(make_session(path, threads=1), x, 64)
    for family in ("x86-avx2", "x86-vnni", "arm64"):
        emu = run_batches(EmulatedSession(path, family, threads=1), x, 64)
        assert emu.shape == native.shape == (64, 3)
        if family == kernel_family(cpu_isa()):
            np.testing.assert_array_equal(emu, native)


def test_matmul_integer_to_float_with_its_scales_swapped_is_read_like_onnxruntime(tmp_path):
    """ORT's fusion may put the per-column scale at input 2 and A's at input 3; its kernel swaps
    them back (review: the emulation scaled every column by the first one)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(16, 6)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(_token_scales(6), "s_col"),
             numpy_helper.from_array(np.array(SX, np.float32), "s_a"), numpy_helper.from_array(np.array(3, np.uint8), "za")]
    node = helper.make_node("MatMulIntegerToFloat", ["x", "w", "s_col", "s_a", "za"], ["y"], domain="com.microsoft",
                            name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = rng.integers(0, 256, size=(8, 16)).astype(np.uint8)  # the node's uint8 input, fed as it is
    outs = {}
    for target in ("x86-vnni", "arm64", "x86-avx2"):
        session = EmulatedSession(tmp_path / "m.onnx", target, threads=1)
        assert session.emulated_nodes == ["MatMulIntegerToFloat:mm"]
        outs[target] = session.run(None, {"x": x})[0]
    exact = (x.astype(np.int64) - 3) @ w.astype(np.int64)
    want = exact.astype(np.int32).astype(np.float32) * (np.float32(SX) * _token_scales(6))
    np.testing.assert_array_equal(outs["x86-vnni"], want)
    np.testing.assert_array_equal(outs["arm64"], want)
    family = kernel_family(cpu_isa())
    if family != "unknown":
        np.testing.assert_array_equal(outs[family], make_session(tmp_path / "m.onnx", threads=1).run(None, {"x": x})[0])


def test_a_graph_with_control_flow_is_refused_by_the_emulation_by_name(tmp_path):
    """A Loop's body reads outer values and sequences, which one-node sessions cannot feed: it failed with
    "'list' object has no attribute 'dtype'" (survey 35)."""
    from onnx import TensorProto, helper

    from fqexport.exporters.kernel_emulation import ControlFlowUnsupported, EmulatedSession

    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    trip, cond = helper.make_tensor("trip", TensorProto.INT64, [], [2]), helper.make_tensor("c", TensorProto.BOOL, [], [1])
    graph = helper.make_graph([helper.make_node("Loop", ["trip", "c", "x"], ["y"], name="loop", body=body)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [trip, cond])
    path = tmp_path / "loop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    with pytest.raises(ControlFlowUnsupported, match=r"does not run control flow: node loop \(Loop\)"):
        EmulatedSession(path, "x86-avx2")


def test_uint8_weights_against_uint8_activations_are_exact_not_a_native_warning(tmp_path, caplog):
    """Survey 92: ORT's U8U8 files (QuantType.QUInt8 weights) were warned about as "not emulated: the
    x86-avx2 figures hold this CPU's sums", on 26 of 80 files; MLAS widens u8×u8 to 16 bits on AVX2
    (vpmaddwd), exact on every family, so native is every target's result."""
    rng = np.random.default_rng(0)
    w_u8 = rng.integers(0, 256, (6, 28)).astype(np.uint8)  # full-range uint8 codes: no pair sum saturates
    inits = [numpy_helper.from_array(np.array(SX, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             numpy_helper.from_array(w_u8, "wq"), numpy_helper.from_array(np.array(SW, np.float32), "sw"),
             numpy_helper.from_array(np.array(128, np.uint8), "zw"), numpy_helper.from_array(np.zeros(6, np.float32), "b"),
             numpy_helper.from_array(np.array(SY, np.float32), "sy"), numpy_helper.from_array(np.array(0, np.uint8), "zy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wdt"], ["h"]),
             helper.make_node("QuantizeLinear", ["h", "sy", "zy"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "sy", "zy"], ["y"])]
    nodes.insert(3, helper.make_node("Transpose", ["wd"], ["wdt"]))
    g = helper.make_graph(nodes, "u8u8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 28])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], initializer=inits)
    path = tmp_path / "u8u8.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    with caplog.at_level("INFO", logger="fqexport.exporters.kernel_emulation"):
        session = EmulatedSession(path, "x86-avx2")
    assert session.native_nodes == [] and session.emulated_nodes == [] and session.exact_nodes
    assert "own kernels" not in caplog.text
    x = rng.uniform(0, 255 * SX, (4, 28)).astype(np.float32)
    native = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], native.run(None, {"x": x})[0])


def test_a_dynamic_quantized_file_with_uint8_weights_is_exact_not_a_native_warning(tmp_path, caplog):
    """Survey 94: DynamicQuantizeMatMul quantizes its input to uint8 itself; with QUInt8 weights its
    sums are exact on every family, and it was warned about as left on this CPU's kernels."""
    rng = np.random.default_rng(0)
    path = _dynamic_mlp(tmp_path, rng, weight_type=QuantType.QUInt8)
    with caplog.at_level("INFO", logger="fqexport.exporters.kernel_emulation"):
        session = EmulatedSession(path, "x86-avx2")
    assert session.native_nodes == [] and session.emulated_nodes == []
    assert [n.split(":")[0] for n in session.exact_nodes] == ["DynamicQuantizeMatMul"] * 2
    assert "own kernels" not in caplog.text
    x = rng.standard_normal((8, 32)).astype(np.float32)
    native = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], native.run(None, {"x": x})[0])
