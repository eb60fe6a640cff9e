"""QDQ ONNX writer.

1. ``torch.onnx.export`` (dynamo, opset 21) of the fake-quant reference: every activation
   quantization point becomes a QuantizeLinear→DequantizeLinear pair (uint8, per tensor).
2. A rewrite pass turns each quantized layer's float weight initializer into integer codes +
   ``DequantizeLinear`` (per output channel), stored in int8 or packed INT4/INT2 behind a
   ``Cast`` to int8 (folded at load: the fused int8 kernels run) or as MatMulNBits.
3. Checks: ``onnx.checker``, ONNX Runtime loads the optimized session, top-1 agreement with the
   PyTorch reference on the calibration data >= 99%. Only then is the file renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import fqexport.graph.act_quant  # noqa: F401  (registers torch.ops.fqexport.act_qdq)
from fqexport.atomic import atomic_write
from fqexport.config import Storage
from fqexport.errors import ExportError, FqexportError
from fqexport.exporters.act_qdq import act_qdq_onnx
from fqexport.exporters.compact import compact_graph
from fqexport.exporters.kernel_emulation import EmulatedSession
from fqexport.exporters.metadata import write_metadata
from fqexport.exporters.ort_session import run_batches
from fqexport.metadata import layer_records

if TYPE_CHECKING:  # pragma: no cover
    from fqexport.model import CompressedModel, QuantizedLayer

log = logging.getLogger(__name__)

OPSET = 21
OPSET_INT2 = 25  # ORT runs DequantizeLinear on INT2 only from opset 25 (IR 11)
# MatMulNBits compute: 0 = the kernel's default (fp32 on the dequantized weight). 4 (int8
# compute) quantizes A per block inside the kernel, a second rounding the reference does not
# model. Measured (ORT 1.32, AVX512-VNNI + AMX, 1 thread, one op, min of 40-300 runs;
# docs/model-support.md): level 4 is 2x faster only for one vector (M=1: 0.011 vs 0.022 ms,
# fp32 MatMul 0.013); over tokens it is no faster (M=65, K=192 -> 768: 0.27 vs 0.19 ms; M=2080:
# 30 vs 14 ms) and int8 QDQ (MatMulIntegerToFloat) beats both (0.057 / 2.7 ms). On the
# DeiT-tiny-shaped model (every Linear MatMulNBits) level 4 agreed with the graph's math on
# 94.4% of decided samples, level 0 on 98.8%. So 0.
NBITS_ACCURACY_LEVEL = 0
MIN_AGREEMENT = 0.99
# Samples whose reference top-2 logits are closer than this fraction of the typical logit
# spread (median over samples of max - min logit) are near-ties: ORT's kernels round
# intermediate activations slightly differently from PyTorch (a one-step flip of a uint8 code
# now and then), which can flip them. A broken export (wrong weights, saturating u8×s8
# kernels) moves logits by far more: on the demo CNN, full-range 8-bit weights on an AVX2 CPU
# gave max |logit diff| 10.9 and 95% agreement on decided samples.
TIE_FRACTION = 0.02

MSG_TORCH_EXPORT = "torch.onnx.export failed for the {what} model: {err}"
MSG_NO_WEIGHT = (
    "layer '{name}': its weight was not found in the exported ONNX graph (by name '{name}.weight' "
    "or by value); the exporter may have rewritten it"
)
MSG_AGREEMENT = (
    "{path}: the exported model agrees with the PyTorch fake-quant reference on only {agree:.2%} "
    "of the calibration samples whose top-2 logits are more than {tie:g}% of the logit spread apart "
    "(need >= {need:.0%}, or a single flipped sample; max |logit diff| {diff:.4g}); the file was not written. "
    "{cause}"
)
# The cause named by MSG_AGREEMENT. The reference already models ORT's int32 bias rounding
# (s_x·s_w[c] steps, WeightBiasQuantization) and its uint8 activations, so what is left is a
# saturating kernel or an op ORT computes differently.
CAUSE_FULL_RANGE = (
    "The model has full-range 8-bit weights (weight_range='full'): on an x86 CPU without VNNI, "
    "ONNX Runtime's u8*s8 kernels saturate their 16-bit sums; use weight_range='x86-safe' (the default)"
)
CAUSE_KERNELS = (
    "ONNX Runtime's optimized session computes some op differently from the reference (the "
    "reference models its int32 bias rounding and uint8 activation pairs): export with check=False "
    "and run `fqexport validate`, whose kernel-deviation figures (optimized vs unoptimized "
    "session, per group) and fused-kernel list show which op; storage='int8' rules out the "
    "4-bit kernels"
)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well it matches the PyTorch reference."""

    path: Path
    size_bytes: int
    opset: int
    agreement: float | None  # top-1 agreement with the fake-quant reference (calibration data)
    max_abs_diff: float | None  # max |logit difference| vs the reference
    storage: dict[str, str]  # layer name -> int8 | int4 | int2

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "size_bytes": self.size_bytes, "opset": self.opset,
            "agreement": self.agreement, "max_abs_diff": self.max_abs_diff, "storage": self.storage,
        }


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, what: str = "float") -> onnx.ModelProto:
    """Export ``model`` with a dynamic batch dimension at opset 21, weights inline."""
    table = {torch.ops.fqexport.act_qdq.default: act_qdq_onnx}
    sink = io.StringIO()
    # torch.onnx warns once per process that torchvision ops are not registered: not ours.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=OPSET,
                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), input_names=["input"],
                output_names=["logits"], custom_translation_table=table, verbose=False,
            )
    except Exception as err:
        raise ExportError(MSG_TORCH_EXPORT.format(what=what, err=f"{type(err).__name__}: {err}")) from err
    model = program.model_proto
    strip_debug_info(model)
    return model


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node debug metadata (stack traces, fx node names) that torch.onnx records.

    On the demo CNN it was a third of a W8A8 file (45 KB of 139 KB).
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.graph.doc_string = ""


def _pack(codes: np.ndarray, container: str) -> TensorProto:
    if container == "int8":
        return numpy_helper.from_array(codes.astype(np.int8))
    dtype = ml_dtypes.int4 if container == "int4" else ml_dtypes.int2
    return numpy_helper.from_array(codes.astype(dtype))


def _find_weight(inits: dict[str, TensorProto], layer: "QuantizedLayer", expected: np.ndarray) -> tuple[TensorProto, int]:
    """The initializer holding ``layer``'s weight (dequantized: ``expected``) and the
    DequantizeLinear axis of its channels."""
    init = inits.get(f"{layer.name}.weight")
    if init is not None:
        return init, 0
    flat = expected.reshape(expected.shape[0], -1)
    for cand in inits.values():
        if cand.data_type != TensorProto.FLOAT or cand.dims == [] or np.prod(cand.dims) != expected.size:
            continue
        arr = numpy_helper.to_array(cand)
        if arr.shape == expected.shape and np.allclose(arr, expected, atol=1e-6):
            return cand, 0
        if arr.ndim == 2 and arr.shape == flat.T.shape and np.allclose(arr, flat.T, atol=1e-6):
            return cand, 1
    raise ExportError(MSG_NO_WEIGHT.format(name=layer.name))


def _positive_scales(codes: np.ndarray, scale: np.ndarray, axis: int = 0,
                     block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scale)`` with channels (along ``axis``) of negative scale negated:
    ``s·q = |s|·(-q)`` per channel."""
    if block is not None:  # per-block scales [N, blocks] of codes [N, K]: a sign per block
        sign = np.repeat(np.where(scale < 0, -1, 1), block, axis=1)[:, :codes.shape[1]].astype(codes.dtype)
        return codes * sign, np.abs(scale).astype(np.float32)
    shape = [1] * codes.ndim
    shape[axis] = -1
    sign = np.where(scale < 0, -1, 1).astype(codes.dtype)
    return codes * sign.reshape(shape), np.abs(scale).astype(np.float32)


def _cast_weight(name: str, output: str, q: TensorProto, scale: np.ndarray, axis: int, zero_point: bool):
    """Packed INT4/INT2 codes as ``DequantizeLinear(Cast(q → int8), scale[, 0], axis)``.

    ONNX Runtime's QDQ fusion needs an int8 weight (its QLinearConv/QGemm reject INT4/INT2, and a
    ``DequantizeLinear`` of INT4/INT2 would run on every call with the layer in float, 5-40x
    slower at batch 1). The ``Cast`` of an initializer is constant-folded when the session loads,
    before the QDQ fusion, so the file stores 4 or 2 bits per code and the session runs the fused
    int8 kernel, bit-identical to an int8 container. ``zero_point``: a Gemm/MatMul weight needs
    its (zero) zero point for ORT to fuse QGemm / MatMulIntegerToFloat; a Conv does not.
    ``name`` prefixes the new values, ``output`` is the float weight the layer's op reads.
    """
    codes8 = f"{name}_codes"
    s = numpy_helper.from_array(scale, f"{name}_scale")
    inits, dq_in = [q, s], [codes8, s.name]
    if zero_point:
        zp = numpy_helper.from_array(np.zeros(scale.shape[0], dtype=np.int8), f"{name}_zero_point")
        inits.append(zp)
        dq_in.append(zp.name)
    nodes = [
        helper.make_node("Cast", [q.name], [codes8], name=f"{name}_Cast", to=TensorProto.INT8),
        helper.make_node("DequantizeLinear", dq_in, [output], name=f"{name}_DequantizeLinear", axis=axis),
    ]
    return inits, nodes


# MatMulNBits: 4-bit container (2-4-bit codes), blocks of a power of 2 >= 16 along K.
NBITS = 4
NBITS_BLOCKS = (16, 32, 64, 128, 256)
MSG_NBITS_CONSUMER = (
    "layer '{name}': its weight feeds {ops}, not one Gemm(transB=1) or MatMul: cannot store it "
    "as MatMulNBits; use storage='int8'"
)


MSG_NBITS_BLOCKS = (
    "per-block scales of shape {shape} do not fit a MatMulNBits weight of {n} rows and K={k} in "
    "blocks of {bs} (need [{n}, {nb}]): the layer was compressed for another block size"
)


# A blocked int8 DequantizeLinear (opset 21 block_size) would hold them, but ORT 1.32's QDQ
# fusion turns DQ + MatMul into MatMulIntegerToFloat with the [blocks, N] scale taken as
# per-channel and fails at run time ("Attempting to broadcast an axis by a dimension other than 1").
MSG_BLOCKED_INT8 = (
    "layer '{name}' has per-block weight scales [{n}, {nb}] (compressed for MatMulNBits) and cannot "
    "be stored in an int8 container under storage={storage!r}: export with the storage it was "
    "compressed with ('packed' or 'auto'), or compress with storage='int8' (QuantConfig.storage, --storage)"
)


def nbits_block_size(k: int) -> int:
    """The MatMulNBits block size that stores a K-long row in the fewest bytes (4-bit codes
    padded to whole blocks + one float32 scale per block)."""
    return min(NBITS_BLOCKS, key=lambda bs: (-(-k // bs)) * (bs // 2 + 4))


def pack_nbits(codes: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits ``B`` [N, blocks, block_size/2] (uint8, two 4-bit codes per byte, low nibble
    first, zero point 8) and ``scales`` [N·blocks] of signed codes [N, K] with per-row scales
    ``[N]`` (each row's scale repeated for its blocks) or per-block scales ``[N, blocks]``
    (the solver's, row-major); K padded with zero codes."""
    n, k = codes.shape
    blocks = -(-k // block_size)
    u = np.full((n, blocks * block_size), 8, dtype=np.uint8)
    u[:, :k] = (codes.astype(np.int16) + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, block_size // 2)
    if scale.ndim == 2:
        if scale.shape != (n, blocks):
            raise ExportError(MSG_NBITS_BLOCKS.format(shape=scale.shape, n=n, k=k, bs=block_size, nb=blocks))
        return packed, scale.astype(np.float32).reshape(-1)
    return packed, np.repeat(scale.astype(np.float32), blocks)


def _matmul_nbits(graph: onnx.GraphProto, layer: "QuantizedLayer", init: TensorProto, codes: np.ndarray,
                  scale: np.ndarray, consumers: dict[str, list[onnx.NodeProto]]) -> list[TensorProto]:
    """Rewrite pass: ``Gemm(A, W, C, transB=1)`` or ``MatMul(A, Wᵀ) [+ Add(C)]`` on ``init`` →
    ``com.microsoft.MatMulNBits(A, B, scales, bias=C)``, in place. Returns the new initializers.

    ORT fuses ``MatMul + blocked INT4 DequantizeLinear`` into MatMulNBits only when its
    MatMulAddFusion is disabled (ORT-NOTES); emitting the contrib op directly needs no session
    option and keeps the 4-bit weight on disk and in memory.
    """
    users = consumers.get(init.name, [])
    node = users[0] if len(users) == 1 else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} if node is not None else {}
    gemm = (
        node is not None and node.op_type == "Gemm" and list(node.input).index(init.name) == 1
        and attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1
        and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
    )
    matmul = node is not None and node.op_type == "MatMul" and list(node.input).index(init.name) == 1
    if not (gemm or matmul):
        raise ExportError(MSG_NBITS_CONSUMER.format(name=layer.name, ops=", ".join(u.op_type for u in users) or "nothing"))
    n, k = codes.shape
    bs = nbits_block_size(k)
    packed, scales = pack_nbits(codes, scale, bs)
    b = numpy_helper.from_array(packed, f"{layer.name}.weight_nbits")
    sc = numpy_helper.from_array(scales, f"{layer.name}.weight_nbits_scale")
    bias, output, remove = "", node.output[0], [node]
    if gemm and len(node.input) > 2:
        bias = node.input[2]
    elif matmul:
        add = consumers.get(node.output[0], [])
        inits = {i.name for i in graph.initializer}
        if len(add) == 1 and add[0].op_type == "Add":
            other = [x for x in add[0].input if x != node.output[0]]
            if len(other) == 1 and other[0] in inits:
                bias, output = other[0], add[0].output[0]
                remove.append(add[0])
    new = helper.make_node(
        "MatMulNBits", [node.input[0], b.name, sc.name, "", "", bias] if bias else [node.input[0], b.name, sc.name],
        [output], name=f"{layer.name}_MatMulNBits", domain="com.microsoft", K=k, N=n, bits=NBITS, block_size=bs,
        accuracy_level=NBITS_ACCURACY_LEVEL,
    )
    index = list(graph.node).index(node)
    for r in remove:
        graph.node.remove(r)
    graph.node.insert(index, new)
    return [b, sc]


def quantize_weight_initializers(
    model: onnx.ModelProto, layers: dict[str, "QuantizedLayer"], storage: str
) -> dict[str, str]:
    """Rewrite pass: float weight initializer → integer codes + DequantizeLinear (in place).

    The DequantizeLinear node outputs the old initializer's name, so consumers are unchanged.
    Returns the container used per layer.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, used = [], {}
    for layer in layers.values():
        dequantized = layer.dequantized().numpy()
        init, axis = _find_weight(inits, layer, dequantized)
        # the DequantizeLinear axis: a ConvTranspose weight [C_in, C_out, kh, kw] (same layout
        # as the codes, axis 0 above) has its output channels on axis 1
        dq_axis = 1 if layer.kind == "conv_transpose" else axis
        actual = numpy_helper.to_array(init)
        container = layer.storage(storage)
        if container in ("int2", "int4") and layer.block_size is not None:
            # per-block scales (compressed for MatMulNBits) fit only MatMulNBits: a layer compressed
            # under "packed" keeps it when exported under "auto"; 2-bit codes fit its 4-bit container
            container = "nbits"
        if container != "nbits" and layer.block_size is not None:
            raise ExportError(MSG_BLOCKED_INT8.format(
                name=layer.name, n=layer.scale.shape[0], nb=layer.scale.shape[1], storage=storage))
        codes = layer.codes.numpy()
        scale_np = layer.scale.numpy().astype(np.float32)
        if container != "int2":
            # 2-bit rows with a negative scale (levels mirrored): the same weight as codes -q,
            # scale |s|, so DequantizeLinear sees positive scales (codes -1..2 fit int8 / INT4).
            # INT2 keeps q in [-2, 1] and the signed scale (ORT's fused kernels take it as is).
            codes, scale_np = _positive_scales(codes, scale_np, 1 if layer.kind == "conv_transpose" else 0,
                                               layer.block_size)
        if container == "nbits":
            consumers: dict[str, list[onnx.NodeProto]] = {}
            for node in graph.node:
                for name in node.input:
                    consumers.setdefault(name, []).append(node)
            new_inits = _matmul_nbits(graph, layer, init, codes.reshape(codes.shape[0], -1), scale_np, consumers)
            graph.initializer.remove(init)
            del inits[init.name]
            graph.initializer.extend(new_inits)
            used[layer.name] = container
            continue
        if axis == 1:
            codes = codes.reshape(codes.shape[0], -1).T
        expected = dequantized.reshape(codes.shape) if axis == 0 else None
        if expected is not None and not np.allclose(actual, expected, atol=1e-5 * max(1.0, float(np.abs(expected).max()))):
            raise ExportError(
                f"layer '{layer.name}': the exported weight differs from the quantized weight "
                f"(max diff {float(np.abs(actual - expected).max()):.3g})"
            )
        q = _pack(codes, container)
        # new values named after the layer (torch may have named a transposed weight ``val_12``),
        # so readers and the compaction pass find them by the layer's name
        base = f"{layer.name}.weight"
        q.name = f"{base}_quantized"
        if container in ("int4", "int2"):
            new_inits, nodes_ = _cast_weight(base, init.name, q, scale_np, dq_axis, zero_point=layer.kind == "linear")
        else:
            scale = numpy_helper.from_array(scale_np, f"{base}_scale")
            zp = _pack(np.zeros(scale_np.shape[0], dtype=np.int8), container)
            zp.name = f"{base}_zero_point"
            new_inits = [q, scale, zp]
            nodes_ = [helper.make_node(
                "DequantizeLinear", [q.name, scale.name, zp.name], [init.name],
                name=f"{base}_DequantizeLinear", axis=dq_axis,
            )]
        new_nodes.extend(nodes_)
        graph.initializer.remove(init)
        del inits[init.name]
        graph.initializer.extend(new_inits)
        used[layer.name] = container
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return used


def _set_opset(model: onnx.ModelProto, opset: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        imp.domain == "com.microsoft" for imp in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if opset >= 25:
        model.ir_version = max(model.ir_version, 11)


def _ort_logits(model_bytes: bytes, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of the optimized ORT CPU session (what deploys) of an in-memory model."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return run_batches(sess, x, batch_size)


def _decided(want: np.ndarray, tie: float) -> np.ndarray:
    """Samples whose reference top-2 logits differ by more than ``tie`` (not near-ties)."""
    if want.shape[1] < 2:
        return np.ones(want.shape[0], dtype=bool)
    top2 = np.sort(want, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > tie


def top1_agreement(got: np.ndarray, want: np.ndarray, tie: float = 0.0) -> tuple[float, float]:
    """``(agreement, agreement on decided samples)`` of the argmax of ``got`` vs ``want``.

    A sample whose reference top-2 logits differ by <= ``tie`` is a near-tie at the export's
    resolution; kernel rounding may flip it either way.
    """
    same = got.argmax(1) == want.argmax(1)
    decided = _decided(want, tie)
    return float(same.mean()), float(same[decided].mean()) if decided.any() else 1.0


def agreement_failed(got: np.ndarray, want: np.ndarray, tie: float) -> bool:
    """The export check's verdict: top-1 agreement on decided samples below MIN_AGREEMENT,
    with more than one flipped sample (on fewer than 100 samples one flip is already > 1%)."""
    decided = _decided(want, tie)
    flips = int(((got.argmax(1) != want.argmax(1)) & decided).sum())
    return flips > 1 and flips > (1.0 - MIN_AGREEMENT) * int(decided.sum())


def write_atomic(model: onnx.ModelProto, path: Path) -> int:
    """Save ``model`` inline to ``path`` atomically; return its size in bytes."""
    atomic_write(path, lambda tmp: onnx.save_model(model, str(tmp), save_as_external_data=False))
    return path.stat().st_size


# QuantConfig.target -> the kernel family whose int8 arithmetic the export check emulates
# (docs/kernel-targets.md): ``portable`` is checked like the most restrictive CPU, AVX2 without
# VNNI (saturating int16 pairs); ``gpu`` has no CPU kernels to emulate.
TARGET_FAMILY: dict[str, str | None] = {
    "portable": "x86-avx2", "x86-avx2": "x86-avx2", "x86-vnni": "x86-vnni", "arm64": "arm64", "gpu": None,
}
# The emulated kernels are numpy (slower than ORT's): the check runs on at most this many
# calibration samples, an equal share per group.
MAX_EMULATED_SAMPLES = 256
MSG_TARGET_AGREEMENT = (
    "{path}: for target={target!r}, the exported model run with the emulated {family} int8 kernels "
    "agrees with the PyTorch fake-quant reference on only {agree:.2%} of {n} calibration samples "
    "whose top-2 logits are more than {tie:g}% of the logit spread apart (need >= {need:.0%}, or a "
    "single flipped sample; max |logit diff| {diff:.4g}); the file was not written. {cause}"
)
CAUSE_TARGET_FULL_RANGE = (
    "The model has full-range 8-bit weights (weight_range='full'), and target={target!r} covers x86 "
    "CPUs without VNNI, whose u8*s8 kernels (vpmaddubsw) saturate 16-bit sums of product pairs: "
    "use weight_range='x86-safe' (the default, --weight-range x86-safe), or target='x86-vnni', "
    "'arm64' or 'gpu' (--target) if the model never runs on such a CPU"
)
CAUSE_TARGET_KERNELS = (
    "The {family} kernels compute some op differently from the reference: export with check=False "
    "and run `fqexport validate --target {family}` to see which groups it costs"
)
MSG_TARGET_EMULATION = (
    "{path}: the export check for target={target!r} cannot run the model with the emulated {family} "
    "int8 kernels: {err}. Export with check=False and validate it with --target native"
)


def check_subset(group: np.ndarray, cap: int) -> np.ndarray:
    """Sorted indices of at most ``cap`` samples, taken round-robin over the groups (a group
    smaller than its share comes whole)."""
    n = len(group)
    if n <= cap:
        return np.arange(n)
    _, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.sort(np.lexsort((inverse, rank))[:cap])


def _target_check(model: onnx.ModelProto, cm: "CompressedModel", want: np.ndarray, tie: float, path: Path) -> None:
    """Refuse (ExportError) a model whose logits under the emulated kernels of ``cm.config.target``
    disagree with the reference ``want`` like the native check would."""
    target = cm.config.target
    family = TARGET_FAMILY[target]
    if family is None:
        return
    idx = check_subset(np.asarray(cm.calib.group), MAX_EMULATED_SAMPLES)
    with tempfile.TemporaryDirectory(prefix="fqexport-target-") as tmp:
        onnx_path = Path(tmp) / "check.onnx"
        onnx.save_model(model, str(onnx_path), save_as_external_data=False)
        try:
            session = EmulatedSession(onnx_path, family, threads=1, label=f"the export check of {path}",
                                      native_log_level=logging.INFO)
            got = run_batches(session, cm.calib.x[idx], 128)
        except FqexportError as err:
            raise ExportError(MSG_TARGET_EMULATION.format(path=path, target=target, family=family, err=err)) from err
    ref = want[idx]
    if agreement_failed(got, ref, tie):
        _, decided = top1_agreement(got, ref, tie)
        full = cm.config.weight_range == "full" and family == "x86-avx2"
        cause = (CAUSE_TARGET_FULL_RANGE if full else CAUSE_TARGET_KERNELS).format(target=target, family=family)
        raise ExportError(MSG_TARGET_AGREEMENT.format(
            path=path, target=target, family=family, agree=decided, n=len(idx), tie=100 * TIE_FRACTION,
            need=MIN_AGREEMENT, diff=float(np.abs(got - ref).max()), cause=cause))
    log.info("export check for target=%s (emulated %s kernels) passed on %d samples", target, family, len(idx))


def export_qdq(cm: "CompressedModel", path: str | Path, *, storage: str | None = None, check: bool = True) -> ExportResult:
    """Write the QDQ ONNX model of ``cm`` to ``path``; see the module docstring.

    With ``check``, the optimized ORT session of this machine and the emulated int8 kernels of
    ``cm.config.target`` (:data:`TARGET_FAMILY`) must both agree with the PyTorch reference.
    """
    path = Path(path)
    storage = storage or cm.config.storage
    if storage not in get_args(Storage):
        raise ExportError(f"storage={storage!r} is not one of {', '.join(get_args(Storage))}")
    example = torch.from_numpy(np.ascontiguousarray(cm.calib.x[:2]))
    model = torch_to_onnx(cm.reference, example, what="quantized")
    used = quantize_weight_initializers(model, cm.layers, storage)
    opset = OPSET_INT2 if "int2" in used.values() else OPSET
    _set_opset(model, opset)
    write_metadata(model, replace(cm.metadata, storage=storage, opset=opset, layers=layer_records(cm.layers, used),
                                  target=cm.config.target))
    compact_graph(model, cm.layers)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path}: onnx.checker rejected the exported model: {err}") from err

    agreement = max_diff = None
    if check:
        data = model.SerializeToString()
        try:
            got = _ort_logits(data, cm.calib.x)
        except Exception as err:
            raise ExportError(f"{path}: ONNX Runtime cannot run the exported model: {err}") from err
        want = cm.predict(cm.calib.x)
        spread = float(np.median(want.max(axis=1) - want.min(axis=1))) if want.size else 0.0
        agreement, decided = top1_agreement(got, want, tie=TIE_FRACTION * spread)
        max_diff = float(np.abs(got - want).max())
        if agreement_failed(got, want, TIE_FRACTION * spread):
            cause = CAUSE_FULL_RANGE if cm.config.weight_range == "full" else CAUSE_KERNELS
            raise ExportError(MSG_AGREEMENT.format(path=path, agree=decided, need=MIN_AGREEMENT, diff=max_diff,
                                                   tie=100 * TIE_FRACTION, cause=cause))
        _target_check(model, cm, want, TIE_FRACTION * spread, path)
    size = write_atomic(model, path)
    log.info("wrote %s (%d bytes, agreement %s)", path, size, agreement)
    return ExportResult(path, size, opset, agreement, max_diff, used)


def export_float(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> ExportResult:
    """Write the float model (e.g. the BN-folded one) as ONNX, for reference validation."""
    path = Path(path)
    proto = torch_to_onnx(model.eval(), example, what="float")
    onnx.checker.check_model(proto)
    size = write_atomic(proto, path)
    return ExportResult(path, size, OPSET, None, None, {})
