"""Run a QDQ ONNX model with the integer arithmetic of another CPU's int8 kernels.

What deploys is ONNX Runtime's fused integer kernels, and how they add u8×s8 products depends
on the CPU (ORT-NOTES.md, :mod:`fqexport.exporters.cpu_isa`). :class:`EmulatedSession` lets a CI
machine of one kind measure what a machine of another kind would compute:

1. ORT optimizes the model at ``ORT_ENABLE_EXTENDED`` (the QDQ fusions, no hardware layout
   transforms) and the optimized graph is dumped: QLinearConv, QGemm, QLinearMatMul, QLinearAdd,
   … with ORT's own int32 biases, scales and zero points.
2. The graph is evaluated node by node. The integer GEMMs and convs with uint8 activations and
   int8 weights (QLinearConv, QGemm, QLinearMatMul; MatMulIntegerToFloat, a token Linear's fused
   QDQ MatMul; quantize_dynamic's MatMulInteger, DynamicQuantizeMatMul and ConvInteger) are
   computed here, in numpy, with the target's accumulation (:func:`accumulate`) and MLAS's
   requantization (:func:`requantize`) or float scaling. Every other node runs in ONNX Runtime
   on its own (a one-node session), so it matches the native kernels exactly.

Accumulation per target (``K`` ordered like the packed weights MLAS uses on x86: for a conv,
kernel tap by tap and input channels inside a tap, i.e. NHWC im2col order):

- ``x86-vnni`` / ``arm64``: Σ_k (x_k − z_x)·w_k exactly in int32;
- ``x86-avx2``: MLAS's ``vpmaddubsw`` adds each pair of products (k, k+1), k even, of the
  *stored* uint8 activation and the int8 weight into an int16 with saturation to
  [−32768, 32767]; the pairs are then added exactly and the zero point is corrected exactly
  (−z_x·Σ_k w_k); the saturation is :mod:`fqexport.exporters.pair_saturation`'s. Depthwise
  convs use MLAS's exact depthwise kernel.

Requantization like MLAS: ``float32(acc + bias) · float32(s_x·s_w[c]/s_y)``, clipped to the
output range, rounded half to even, plus the output zero point.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, get_args

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fqexport.config import KernelTarget
from fqexport.errors import ConfigError, ModelLoadError
from fqexport.exporters.batch_coupling import batch_coupled_nodes
from fqexport.exporters.cpu_isa import usable_cpus
from fqexport.exporters.onnx_graph import attributes
from fqexport.exporters.ort_session import build_session
from fqexport.exporters.pair_saturation import (
    INT16_MAX,
    RiskyPairs,
    hot_entries,
    pair_corrections,
    risky_mask,
    risky_pairs,
    saturation,
)

log = logging.getLogger(__name__)

TARGETS: tuple[str, ...] = get_args(KernelTarget)
EMULATED_TARGETS = TARGETS[1:]

MSG_TARGET = "target {target!r} is not one of {choices} (--target)"
MSG_NOT_EMULATED = "target 'native' runs ONNX Runtime's own session (make_session), not an emulation"
MSG_UNREADABLE = "cannot optimize ONNX model {path} for kernel emulation: {err}"
MSG_NATIVE = (
    "kernel emulation ({target}) of {path}: {nodes} run with this CPU's own kernels (only integer GEMMs and "
    "convs of uint8 activations and constant int8 weights are emulated); their results are native, not {target}"
)
# Integer kernels ORT may fuse that the emulation does not model: they run natively, which
# x86-vnni and arm64 compute alike (exact sums); for x86-avx2 a file holding them is refused.
# (ConvInteger, quantize_dynamic's conv, is an S8U8 GEMM in ORT — the weights as A — whose x86
# kernel without AVX-VNNI-INT8 is MLAS's portable one, exact: native is every target's result.)
_OTHER_INTEGER_OPS = ("QAttention", "DynamicQuantizeLSTM")
MSG_UNMODELLED = (
    "kernel emulation (x86-avx2) does not model node(s) {nodes} of {path}: how an AVX2 CPU adds the u8 x s8 "
    "products of ONNX Runtime's {ops}; validate this model with --target native, x86-vnni or arm64 (exact sums)"
)
MSG_NODE = "kernel emulation ({target}) failed at node {node} ({op}) of {path}: {err}"
MSG_UNSUPPORTED = (
    "kernel emulation ({target}) does not cover node {node} ({op}) of {path}: {what}. It covers 1-D and 2-D "
    "QLinearConv, QGemm, QLinearMatMul, MatMulInteger, MatMulIntegerToFloat and DynamicQuantizeMatMul with "
    "uint8 activations and symmetric int8 constant weights (what fqexport, quantize_static and quantize_dynamic "
    "export); validate this model with --target native only"
)
MSG_CONTROL_FLOW = (
    "kernel emulation ({target}) does not run control flow: node {node} ({op}) of {path} holds a subgraph (an "
    "nn.EmbeddingBag or a data-dependent loop exports as a Loop); validate this model with --target native, or "
    "on a CPU of that family"
)


class ControlFlowUnsupported(ConfigError):
    """The graph holds an If/Loop/Scan, which the emulation's node-by-node evaluation cannot run."""


_CONV_RANK = "a {rank}-D convolution (1-D and 2-D only)"
_WEIGHT_ZP = "a non-zero weight zero point (symmetric weights only)"
_MATMUL_B = "B is not a 2-D symmetric int8 constant"
_A_SCALE = "a per-row scale of A (a scalar only)"

# Integers add exactly in float32 while every partial sum stays below 2^24 (its mantissa).
_F32_EXACT = 1 << 24
_CHUNK = 1 << 22  # elements per temporary (activation rows)
_RUN_ALIGN = 16  # channels per block of MLAS's NCHWc layout (8 on AVX2, 16 on AVX-512)


def check_target(target: str) -> str:
    """``target`` if it is one of :data:`TARGETS`, else ConfigError."""
    if target not in TARGETS:
        raise ConfigError(MSG_TARGET.format(target=target, choices=", ".join(TARGETS)))
    return target


# ------------------------------------------------------------------------------ integer math


@dataclass(frozen=True)
class PackedWeights:
    """int8 weights ``w`` ``[M, K]`` (K in MLAS's packed order) prepared once for :func:`accumulate`.

    ``products``: an ONNX Runtime session computing Σ_k a·w of float32 ``a`` ``[rows, K]`` exactly
    (:func:`_products_session`); ``row_sums``: Σ_k w per row (int64, for the zero point);
    ``pairs``: the pairs that can saturate (x86-avx2 only, else None).
    """

    products: Any
    row_sums: np.ndarray
    pairs: RiskyPairs | None


def exact_runs(w: np.ndarray, zero_point: int = 0) -> tuple[tuple[int, int], ...]:
    """Runs ``(start, stop)`` covering axis 1 of int ``w`` ``[M, K]`` (or ``[M, K, T]``: a conv's
    input channels and their taps), each as long as it can be while every partial sum of
    Σ (a − z)·w over the run stays an integer float32 holds exactly, whatever order a GEMM or a conv
    adds the products in (uint8 ``a``, ``z`` = ``zero_point``; a single column always fits:
    255·127·T < 2^24 for any kernel of fewer than 518 taps T).

    Any partial sum adds a subset of the products, and (a − z)·w lies in [−z·w, (255 − z)·w] for
    w > 0, in [(255 − z)·w, −z·w] for w < 0. So with P = Σ w⁺ and N = Σ w⁻ over a row's run, every
    partial sum lies in [−(z·P + (255 − z)·N), (255 − z)·P + z·N], and both bounds are kept
    below 2^24 for every row (for z = 0: 255·max(P, N), about half of 255·Σ|w|). A run longer
    than :data:`_RUN_ALIGN` columns is cut to a multiple of it: ORT's float Conv takes its fast
    blocked (NCHWc) path only for channel counts in whole blocks, and runs 2.5x slower otherwise.
    """
    w = w.astype(np.int64).reshape(w.shape[0], w.shape[1], -1)
    pos, neg = np.maximum(w, 0).sum(axis=2), np.maximum(-w, 0).sum(axis=2)
    hi, lo = 255 - int(zero_point), int(zero_point)
    reach = np.concatenate([hi * pos + lo * neg, lo * pos + hi * neg])  # per row: the largest partial sum, −the least
    cum = np.concatenate([np.zeros((reach.shape[0], 1), np.int64), np.cumsum(reach, axis=1)], axis=1)
    runs, start, k = [], 0, w.shape[1]
    while start < k:
        most = (cum[:, start + 1 :] - cum[:, start : start + 1]).max(axis=0)  # nondecreasing in stop
        fits = max(1, int(np.searchsorted(most, _F32_EXACT - 1, side="right")))
        stop = start + (fits if fits == k - start or fits < _RUN_ALIGN else fits - fits % _RUN_ALIGN)
        runs.append((start, stop))
        start = stop
    return tuple(runs)


def _products_session(w: np.ndarray, threads: int | None) -> Any:
    """An ORT session ``a [rows, K] float32 → Σ_k a·w [rows, M]``, exact: one float32 MatMul
    (MLAS's SGEMM: multiply-adds only) per run of :func:`exact_runs`, the runs added in float64
    (exact below 2^53). ORT's SGEMM is the fastest exact integer GEMM at hand, and keeps its
    speed on a loaded machine."""
    runs = exact_runs(w)
    k, m = w.shape[1], w.shape[0]
    wt = np.ascontiguousarray(w.T, dtype=np.float32)
    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [None, k])
    if len(runs) == 1:
        nodes = [helper.make_node("MatMul", ["a", "w"], ["y"])]
        inits = [numpy_helper.from_array(wt, "w")]
        out_type = onnx.TensorProto.FLOAT
    else:
        nodes, inits = [], []
        for i, (start, stop) in enumerate(runs):
            inits += [numpy_helper.from_array(wt[start:stop], f"w{i}"),
                      numpy_helper.from_array(np.array([start], np.int64), f"s{i}"),
                      numpy_helper.from_array(np.array([stop], np.int64), f"e{i}")]
            nodes += [helper.make_node("Slice", ["a", f"s{i}", f"e{i}", "axis1"], [f"a{i}"]),
                      helper.make_node("MatMul", [f"a{i}", f"w{i}"], [f"p{i}"]),
                      helper.make_node("Cast", [f"p{i}"], [f"d{i}"], to=onnx.TensorProto.DOUBLE)]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
        nodes.append(helper.make_node("Sum", [f"d{i}" for i in range(len(runs))], ["y"]))
        out_type = onnx.TensorProto.DOUBLE
    graph = helper.make_graph(nodes, "exact_products", [a], [helper.make_tensor_value_info("y", out_type, [None, m])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return build_session(model.SerializeToString(), level="ORT_DISABLE_ALL", threads=threads,
                         label="the emulation's exact GEMM")


def pack_weights(w: np.ndarray, target: str, threads: int | None = None) -> PackedWeights:
    """:class:`PackedWeights` of int8 ``w`` ``[M, K]`` for ``target``'s accumulation."""
    return PackedWeights(products=_products_session(w, threads), row_sums=w.sum(axis=1, dtype=np.int64),
                         pairs=risky_pairs(w) if target == "x86-avx2" else None)


def _exact_products(a: np.ndarray, packed: PackedWeights) -> np.ndarray:
    """Σ_k a·w ``[rows, M]`` int64, exactly (``a`` float32 holding integers in [0, 255])."""
    return packed.products.run(None, {"a": a})[0].astype(np.int64)


class WeightCache:
    """What one node prepares from its constant weights, built on first use and kept: a
    :class:`PackedWeights` or a :class:`ConvKernel`. ``threads``: their sessions' threads."""

    def __init__(self, target: str, threads: int | None = None) -> None:
        self.target, self.threads = target, threads
        self._items: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        """The item of ``key``, built by ``build()`` the first time (once, whatever the threads)."""
        if key not in self._items:
            with self._lock:
                if key not in self._items:
                    self._items[key] = build()
        return self._items[key]


def accumulate(a: np.ndarray, w: np.ndarray | PackedWeights, za: int, target: str) -> np.ndarray:
    """int64 ``[rows, M]``: Σ_k (a − za)·w with ``target``'s accumulation (no bias).

    ``a`` ``[rows, K]``: the stored uint8 activations (as uint8, or float32 holding them);
    ``w``: int8 ``[M, K]`` or its :func:`pack_weights`; K in packed order.
    Σ (a − za)·w = Σ a·w − za·Σ_k w; x86-avx2 adds each saturating pair's correction.
    """
    packed = w if isinstance(w, PackedWeights) else pack_weights(w, target)
    a = np.asarray(a, dtype=np.float32)
    acc = np.empty((a.shape[0], packed.row_sums.size), dtype=np.int64)
    step = max(1, _CHUNK // max(1, a.shape[1]))
    for s in range(0, a.shape[0], step):  # row chunks bound the temporaries
        part = a[s : s + step]
        acc[s : s + step] = _exact_products(part, packed)
        if packed.pairs is not None:
            acc[s : s + step] += saturation(part, packed.pairs, acc.shape[1])
    acc -= int(za) * packed.row_sums
    return acc


def requantize(acc: np.ndarray, scale: np.ndarray, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """MLAS requantization of int32 ``acc`` (bias included), ``scale`` broadcast against it (per
    output channel: the last axis of ``[rows, M]``, or ``[M, 1, 1]`` for NCHW)."""
    info = np.iinfo(dtype)
    y = acc.astype(np.int32).astype(np.float32) * scale.astype(np.float32)
    y = np.clip(y, np.float32(info.min - zero_point), np.float32(info.max - zero_point))
    return (np.rint(y).astype(np.int32) + int(zero_point)).astype(dtype)


def _output_scale(s_x: np.ndarray, s_w: np.ndarray, s_y: np.ndarray) -> np.ndarray:
    return (np.float32(s_x) * s_w.astype(np.float32).reshape(-1)) / np.float32(s_y)


def _scalar(v: np.ndarray) -> Any:
    return np.asarray(v).reshape(-1)[0]


# --------------------------------------------------------------------------------- kernels


class _Unsupported(Exception):
    """A fused node outside what the emulation covers (re-raised as ConfigError naming the node)."""


def _patches(xp: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
             out: Sequence[int]) -> np.ndarray:
    """``[N·OH·OW, kh·kw·C]`` im2col rows of padded NHWC ``xp``, K in MLAS's order (a copy)."""
    sn, sh, sw, sc = xp.strides
    patches = np.lib.stride_tricks.as_strided(
        xp, shape=(xp.shape[0], out[0], out[1], kernel[0], kernel[1], xp.shape[3]),
        strides=(sn, sh * strides[0], sw * strides[1], sh * dilations[0], sw * dilations[1], sc), writeable=False)
    return patches.reshape(-1, kernel[0] * kernel[1] * xp.shape[3])


def conv_weight_rows(w: np.ndarray, group: int) -> list[np.ndarray]:
    """Per group, the conv weights ``[M/group, K]`` with K in MLAS's NHWC order (kernel row,
    kernel column, input channel); a 1-D conv's ``[M, C, k]`` as ``[M, C, 1, k]``."""
    w = w[:, :, None, :] if w.ndim == 3 else w
    mg = w.shape[0] // group
    return [w[g * mg : (g + 1) * mg].transpose(0, 2, 3, 1).reshape(mg, -1) for g in range(group)]


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D conv's kernel, strides, dilations and ``[top, left, bottom, right]`` pads."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]


@dataclass(frozen=True)
class ConvKernel:
    """A QLinearConv's weights prepared once for :func:`qlinear_conv`.

    ``session``: ONNX Runtime float Conv(s) taking ``x − z_x`` (NCHW float32: its zero padding is
    the zero point's) and returning Σ (a − z_x)·w exactly: one output ``[N, M, OH, OW]`` when every
    group's channels fit one run of :func:`exact_runs`, else one output per (group, channel run),
    ``parts`` giving each one's group. ``pairs``: per group, the weight pairs that can saturate
    (x86-avx2, in MLAS's order), else None.
    """

    session: Any
    parts: tuple[int, ...] | None
    pairs: tuple[RiskyPairs, ...] | None


def conv_kernel(w: np.ndarray, group: int, geometry: ConvGeometry, za: int, target: str,
                threads: int | None) -> ConvKernel:
    """:class:`ConvKernel` of int8 weights ``w`` ``[M, C/group, kh, kw]`` for inputs of zero point ``za``.

    ORT's float Conv (MLAS's NCHWc convolution: multiply-adds only) sums integers exactly while
    every partial sum stays below 2^24: a group's input channels are split into the runs of
    :func:`exact_runs` (over its channels' taps), and the runs are added in float64.
    """
    m, cg = w.shape[:2]
    mg = m // group
    taps = w.reshape(m, cg, -1)  # [M, C/group, kh·kw]
    runs = [exact_runs(taps[g * mg : (g + 1) * mg], za) for g in range(group)]
    attrs = {"kernel_shape": list(geometry.kernel), "strides": list(geometry.strides),
             "dilations": list(geometry.dilations), "pads": list(geometry.pads)}
    wf = w.astype(np.float32)
    if all(len(r) == 1 for r in runs):
        nodes = [helper.make_node("Conv", ["x", "w"], ["y0"], group=group, **attrs)]
        inits, parts = [numpy_helper.from_array(wf, "w")], None
    else:
        nodes, inits, owner = [], [numpy_helper.from_array(np.array([1], np.int64), "axis1")], []
        for g, group_runs in enumerate(runs):
            for start, stop in group_runs:
                i = len(owner)
                inits += [numpy_helper.from_array(wf[g * mg : (g + 1) * mg, start:stop], f"w{i}"),
                          numpy_helper.from_array(np.array([g * cg + start], np.int64), f"s{i}"),
                          numpy_helper.from_array(np.array([g * cg + stop], np.int64), f"e{i}")]
                nodes += [helper.make_node("Slice", ["x", f"s{i}", f"e{i}", "axis1"], [f"x{i}"]),
                          helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"y{i}"], **attrs)]
                owner.append(g)
        parts = tuple(owner)
    outputs = [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None) for i in range(len(parts or [0]))]
    graph = helper.make_graph(nodes, "exact_conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = build_session(model.SerializeToString(), threads=threads, label="the emulation's exact conv")
    pairs = None
    if target == "x86-avx2" and not (cg == 1 and group > 1):  # (MLAS's depthwise kernel adds exactly)
        found = tuple(risky_pairs(r) for r in conv_weight_rows(w, group))
        pairs = found if any(p.m.size for p in found) else None
    return ConvKernel(session, parts, pairs)


def _padded(x: np.ndarray, pads: Sequence[int], pad_value: int) -> np.ndarray:
    """uint8 NCHW ``x`` with its padding holding ``pad_value`` (MLAS pads with the input zero point)."""
    n, c, h, w = x.shape
    xp = np.full((n, c, h + pads[0] + pads[2], w + pads[1] + pads[3]), pad_value, dtype=x.dtype)
    xp[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + w] = x
    return xp


def _channel_pair_hot_entries(xp: np.ndarray, pairs: RiskyPairs, geometry: ConvGeometry, out: Sequence[int],
                              offset: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, columns, a_even, a_odd)`` of the im2col activation pairs (row n·OH·OW + oh·OW + ow,
    pair column j along MLAS's K) that may saturate, for an even channel count, from the uint8
    input ``xp`` ``[N, C, H, W]`` without building the im2col matrix. ``xp`` is the padded input
    (``offset`` (0, 0)), or the input itself when no pair of the padding can saturate (``offset``:
    the top and left pads, where its pixels sit in the padded input).

    With C even, K = (tap, channel) pairs never straddle taps: pair column j = t·C/2 + c/2 holds
    channels (c, c+1) of the one input pixel that tap t reads, and a pixel's pair meets every tap.
    |p| <= a_c·max_even[j] + a_{c+1}·max_odd[j] <= a_c·max_t max_even + a_{c+1}·max_t max_odd: the
    (pixel, channel pair)s whose tap-wide bound leaves int16 are found first (a few % after a
    ReLU), then each is followed to the (output, tap)s that read it and bounded per tap. Each
    (output, tap, channel pair) reads one pixel, so no entry is listed twice.
    """
    (kh, kw), (s0, s1), (d0, d1) = geometry.kernel, geometry.strides, geometry.dilations
    taps, half = kh * kw, xp.shape[1] // 2
    max_even, max_odd = pairs.max_even.reshape(taps, half), pairs.max_odd.reshape(taps, half)
    a_even, a_odd = xp[:, 0::2], xp[:, 1::2]
    bound = a_even * max_even.max(axis=0)[:, None, None]
    bound += a_odd * max_odd.max(axis=0)[:, None, None]
    n, c2, ih, iw = np.unravel_index(np.flatnonzero(bound > INT16_MAX), bound.shape)
    ae = a_even[n, c2, ih, iw].astype(np.float32)
    ao = a_odd[n, c2, ih, iw].astype(np.float32)
    ti, tj = np.divmod(np.arange(taps), kw)
    oh, off_h = np.divmod(ih[:, None] + (offset[0] - ti * d0), s0)  # [candidates, taps]: the output that tap reads it for
    ow, off_w = np.divmod(iw[:, None] + (offset[1] - tj * d1), s1)
    hot = (off_h == 0) & (off_w == 0) & (oh >= 0) & (oh < out[0]) & (ow >= 0) & (ow < out[1])
    hot &= ae[:, None] * max_even[:, c2].T + ao[:, None] * max_odd[:, c2].T > INT16_MAX
    i, t = np.nonzero(hot)
    return (n[i] * out[0] + oh[i, t]) * out[1] + ow[i, t], t * half + c2[i], ae[i], ao[i]


def _conv_saturation(acc: np.ndarray, x: np.ndarray, za: int, kernel: ConvKernel, geometry: ConvGeometry) -> None:
    """Add each saturating pair's sat16(p) − p to ``acc`` ``[N, M, OH, OW]`` (in place).

    An even channel count per group is searched from the input (:func:`_channel_pair_hot_entries`;
    unpadded when a pair of the padding, za·max_even + za·max_odd, cannot leave int16); an odd one
    (an image stem: pairs straddle taps) bounds every pair of the im2col rows."""
    out = acc.shape[2:]
    cg, mg = x.shape[1] // len(kernel.pairs), acc.shape[1] // len(kernel.pairs)
    xp = None
    for g, pairs in enumerate(kernel.pairs):
        if pairs.m.size == 0:
            continue
        cold_pads = za * (float(pairs.max_even.max()) + float(pairs.max_odd.max())) <= INT16_MAX
        if xp is None and (cg % 2 or not cold_pads):
            xp = _padded(x, geometry.pads, za)
        if cg % 2 == 0:
            src, offset = (x, geometry.pads[:2]) if cold_pads else (xp, (0, 0))
            found = _channel_pair_hot_entries(src[:, g * cg : (g + 1) * cg], pairs, geometry, out, offset)
        else:
            a = _patches(np.ascontiguousarray(xp[:, g * cg : (g + 1) * cg].transpose(0, 2, 3, 1)), geometry.kernel,
                         geometry.strides, geometry.dilations, out)
            rows, columns = hot_entries(a, pairs)
            found = rows, columns, a[rows, 2 * columns], a[rows, 2 * columns + 1]
        r, m, corr = pair_corrections(*found, pairs)
        n, rest = np.divmod(r, out[0] * out[1])
        oh, ow = np.divmod(rest, out[1])
        np.add.at(acc, (n, g * mg + m, oh, ow), corr)


def conv_sums(x: np.ndarray, w: np.ndarray, za: int, group: int, geometry: ConvGeometry, target: str,
              cache: WeightCache | None = None) -> np.ndarray:
    """Σ (a − za)·w ``[N, M, OH, OW]`` of a 2-D conv with ``target``'s accumulation (no bias), as
    exact integers in float32 (the conv ran in one run per group: every value below 2^24) or
    float64 (runs added). ``x`` uint8 NCHW, ``w`` int8 ``[M, C/group, kh, kw]``.

    Σ (a − za)·w is ORT's float Conv on ``x − za`` (exact, :func:`conv_kernel`); on x86-avx2 each
    pair of products that leaves int16 then adds its sat16(p) − p. Those additions stay exact in
    float32: each partial result is a sum of the run's products with some pairs shrunk toward
    zero, inside the same bound as the products' own partial sums.
    """
    cache = cache or WeightCache(target)
    kernel = cache.get((geometry, za), lambda: conv_kernel(w, group, geometry, za, target, cache.threads))
    outs = kernel.session.run(None, {"x": np.subtract(x, np.float32(za), dtype=np.float32)})
    if kernel.parts is None:
        acc = outs[0]
    else:
        m, mg = w.shape[0], w.shape[0] // group
        acc = np.zeros((x.shape[0], m, *outs[0].shape[2:]), dtype=np.float64)  # exact below 2^53
        for g, y in zip(kernel.parts, outs):
            acc[:, g * mg : (g + 1) * mg] += y
    if kernel.pairs is not None:
        _conv_saturation(acc, x, za, kernel, geometry)
    return acc


def conv_accumulate(x: np.ndarray, w: np.ndarray, za: int, group: int, geometry: ConvGeometry, target: str,
                    cache: WeightCache | None = None) -> np.ndarray:
    """int64 ``[N, M, OH, OW]``: Σ (a − za)·w of a 2-D conv with ``target``'s accumulation (no
    bias): :func:`conv_sums` as integers."""
    return conv_sums(x, w, za, group, geometry, target, cache).astype(np.int64)


def requantize_sums(acc: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, zero_point: int,
                    dtype: np.dtype) -> np.ndarray:
    """:func:`requantize` of ``acc`` + ``bias`` for exact integer sums in float (:func:`conv_sums`)
    and int32 ``bias`` broadcast against them, without an integer copy where floats give MLAS's
    result: float32(acc + bias) is then one correctly rounded addition (float32 ``acc`` below 2^24
    and |bias| <= 2^24, both exact in float32; or the float64 sum converted once), and no int32
    sum wraps (|acc + bias| < 2^31). Else through int64 like MLAS's int32."""
    b = np.zeros(1, np.int64) if bias is None else np.asarray(bias).astype(np.int64)
    if acc.dtype == np.float32 and np.abs(b).max() <= 1 << 24:
        y = acc + b.astype(np.float32)
    else:
        y = acc.astype(np.float64) + b
        if np.abs(y).max(initial=0) >= 1 << 31:
            return requantize(acc.astype(np.int64) + b, scale, zero_point, dtype)
        y = y.astype(np.float32)
    info = np.iinfo(dtype)
    y *= scale.astype(np.float32)
    np.clip(y, np.float32(info.min - zero_point), np.float32(info.max - zero_point), out=y)
    np.rint(y, out=y)
    y += np.float32(zero_point)
    return y.astype(dtype)


def _conv_1d_as_2d(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A 1-D conv's attributes for the 2-D conv ORT runs it as: ``[N, C, 1, L]``, kernel (1, k)."""
    a1 = dict(attrs)
    for key, pre in (("strides", [1]), ("dilations", [1])):
        if key in a1:
            a1[key] = pre + list(a1[key])
    if "pads" in a1:
        p0, p1 = list(a1["pads"])
        a1["pads"] = [0, p0, 0, p1]
    if "kernel_shape" in a1:
        a1["kernel_shape"] = [1] + list(a1["kernel_shape"])
    return a1


def _conv_node_sums(x: np.ndarray, zx: Any, w: np.ndarray, zw: Any, attrs: Mapping[str, Any], target: str,
                    cache: WeightCache | None) -> np.ndarray:
    """:func:`conv_sums` of a conv node (QLinearConv, ConvInteger) on uint8 ``x`` NCHW (or a 1-D
    conv's ``[N, C, L]``, run as ``[N, C, 1, L]``: its sums come back ``[N, M, L']``)."""
    if x.ndim == 3 and np.ndim(w) == 3:  # 1-D conv (Conv1d)
        return _conv_node_sums(x[:, :, None, :], zx, np.asarray(w)[:, :, None, :], zw, _conv_1d_as_2d(attrs), target,
                               cache)[:, :, 0, :]
    if x.ndim != 4 or np.ndim(w) != 4:
        raise _Unsupported(_CONV_RANK.format(rank=x.ndim - 2))
    if zw is not None and np.any(np.asarray(zw) != 0):
        raise _Unsupported(_WEIGHT_ZP)
    kh, kw = w.shape[2:]
    group = int(attrs.get("group", 1))
    strides = tuple(int(v) for v in attrs.get("strides", [1, 1]))
    dil = tuple(int(v) for v in attrs.get("dilations", [1, 1]))
    geometry = ConvGeometry((kh, kw), strides, dil, tuple(_conv_pads(attrs, x.shape[2:], (kh, kw), strides, dil)))
    return conv_sums(x, w, 0 if zx is None else int(_scalar(zx)), group, geometry, target, cache)


def qlinear_conv(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str,
                 cache: WeightCache | None = None) -> np.ndarray:
    """ONNX QLinearConv (2-D or 1-D, NCHW) with ``target``'s accumulation (:func:`conv_sums`), the
    int32 bias and MLAS's requantization; ``cache`` keeps the node's prepared weights."""
    x, sx, zx, w, sw, zw, sy, zy = inputs[:8]
    bias = inputs[8] if len(inputs) > 8 else None
    acc = _conv_node_sums(x, zx, w, zw, attrs, target, cache)
    shape = (-1,) + (1,) * (acc.ndim - 2)  # per output channel
    scale = _output_scale(_scalar(sx), np.asarray(sw), _scalar(sy)).reshape(shape)
    return requantize_sums(acc, None if bias is None else bias.reshape(shape), scale, int(_scalar(zy)), zy.dtype)


def _conv_pads(attrs: Mapping[str, Any], size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dil: Sequence[int]) -> list[int]:
    """``[top, left, bottom, right]`` padding of a 2-D conv (``pads``, or from ``auto_pad``)."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", "VALID"):
        return list(attrs.get("pads", [0, 0, 0, 0]))
    pads = []
    for length, k, s, d in zip(size, kernel, strides, dil):
        out = -(-length // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - length)
        pads.append((total // 2, total - total // 2) if auto_pad == "SAME_UPPER" else (total - total // 2, total // 2))
    return [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]


def _matmul_2d(a: np.ndarray, b_kn: np.ndarray, za: int, target: str, cache: WeightCache | None) -> np.ndarray:
    cache = cache or WeightCache(target)
    packed = cache.get("gemm", lambda: pack_weights(b_kn.T, target, cache.threads))
    lead = a.shape[:-1]
    acc = accumulate(a.reshape(-1, a.shape[-1]), packed, za, target)
    return acc.reshape(*lead, b_kn.shape[1])


def qgemm(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str,
          cache: WeightCache | None = None) -> np.ndarray:
    """com.microsoft QGemm (A uint8, B int8) with ``target``'s accumulation (``cache``: as
    :func:`qlinear_conv`'s)."""
    a, sa, za, b, sb, zb = inputs[:6]
    c, sy, zy = _optional(inputs, 6), _optional(inputs, 7), _optional(inputs, 8)
    if np.any(np.asarray(zb) != 0):
        raise _Unsupported(_WEIGHT_ZP)
    if int(attrs.get("transA", 0)):
        a = a.T
    b_kn = b.T if int(attrs.get("transB", 0)) else b
    alpha = np.float32(attrs.get("alpha", 1.0))
    acc = _matmul_2d(a, b_kn, int(_scalar(za)), target, cache)
    if c is not None and c.dtype == np.int32:
        acc = acc + c.astype(np.int64)
    if sy is None:  # float output
        return _scaled_float(acc, sa, sb, c if c is not None and c.dtype != np.int32 else None, alpha)
    scale = np.float32(_scalar(sa)) * np.asarray(sb, np.float32).reshape(-1) * alpha
    zy_v = zy if zy is not None else np.zeros((), np.uint8)
    return requantize(acc, scale / np.float32(_scalar(sy)), int(_scalar(zy_v)), zy_v.dtype)


def qlinear_matmul(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str,
                   cache: WeightCache | None = None) -> np.ndarray:
    """ONNX QLinearMatMul (A uint8, B int8 [K, N] constant) with ``target``'s accumulation."""
    a, sa, za, b, sb, zb, sy, zy = inputs[:8]
    acc = _matmul_2d(a, _symmetric_b(b, zb), int(_scalar(za)), target, cache)
    scale = _output_scale(_scalar(sa), np.asarray(sb), _scalar(sy))
    return requantize(acc, scale, int(_scalar(zy)), zy.dtype)


def _optional(inputs: Sequence[np.ndarray | None], i: int) -> np.ndarray | None:
    """Input ``i`` of a node, None when it is absent."""
    return inputs[i] if len(inputs) > i else None


def _scaled_float(acc: np.ndarray, a_scale: Any, b_scale: Any, bias: np.ndarray | None,
                  alpha: float = 1.0) -> np.ndarray:
    """MLAS's float output of an integer GEMM: float32(acc) · (s_a · s_b[n] · α) + bias[n] (a
    product, then a sum, each rounded to float32)."""
    scale = np.float32(_scalar(a_scale)) * np.asarray(b_scale, np.float32).reshape(-1) * np.float32(alpha)
    y = acc.astype(np.int32).astype(np.float32) * scale
    return y if bias is None else y + np.asarray(bias, np.float32)


def _symmetric_b(b: np.ndarray, zb: Any) -> np.ndarray:
    """``b`` ``[K, N]`` when it is a 2-D int8 constant with zero points 0, else _Unsupported."""
    if b is None or b.ndim != 2 or b.dtype != np.int8 or (zb is not None and np.any(np.asarray(zb) != 0)):
        raise _Unsupported(_MATMUL_B)
    return b


def matmul_integer_to_float(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str,
                            cache: WeightCache | None = None) -> np.ndarray:
    """com.microsoft MatMulIntegerToFloat (A uint8 ``[..., K]``, B int8 ``[K, N]`` constant,
    symmetric): (Σ (a − z_a)·b) · s_a·s_b + bias with ``target``'s accumulation (the fused kernel
    of a token Linear's QDQ MatMul, and of quantize_dynamic's)."""
    a, b, sa, sb = inputs[:4]
    za, zb, bias = (_optional(inputs, i) for i in (4, 5, 6))
    if np.size(sa) != 1:  # ORT's fusion may hand the scales over swapped; its kernel swaps them back
        sa, sb = sb, sa
    if np.size(sa) != 1:
        raise _Unsupported(_A_SCALE)
    acc = _matmul_2d(a, _symmetric_b(b, zb), 0 if za is None else int(_scalar(za)), target, cache)
    return _scaled_float(acc, sa, sb, bias)


def matmul_integer(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str,
                   cache: WeightCache | None = None) -> np.ndarray:
    """ONNX MatMulInteger (A uint8, B int8 ``[K, N]`` constant, symmetric): int32 Σ (a − z_a)·b."""
    a, b = inputs[:2]
    za, zb = _optional(inputs, 2), _optional(inputs, 3)
    return _matmul_2d(a, _symmetric_b(b, zb), 0 if za is None else int(_scalar(za)), target, cache).astype(np.int32)


def dynamic_quantize_matmul(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str,
                            cache: WeightCache | None = None) -> np.ndarray:
    """com.microsoft DynamicQuantizeMatMul (A float, B int8 ``[K, N]`` constant, symmetric): A
    quantized to uint8 over the whole tensor as ONNX Runtime's DynamicQuantizeLinear does (run
    by it), then :func:`matmul_integer_to_float`'s arithmetic."""
    a, b, sb = inputs[:3]
    zb, bias = _optional(inputs, 3), _optional(inputs, 4)
    cache = cache or WeightCache(target)
    quantize = cache.get("dynamic-quantize", _dynamic_quantize_session)
    aq, sa, za = quantize.run(None, {"a": np.ascontiguousarray(a, dtype=np.float32)})
    acc = _matmul_2d(aq, _symmetric_b(b, zb), int(_scalar(za)), target, cache)
    return _scaled_float(acc, sa, sb, bias)


def _dynamic_quantize_session() -> Any:
    """A one-node ONNX Runtime session of DynamicQuantizeLinear (a float tensor of any shape)."""
    node = helper.make_node("DynamicQuantizeLinear", ["a"], ["q", "s", "z"])
    graph = helper.make_graph([node], "dynamic_quantize", [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None)],
                              [helper.make_empty_tensor_value_info(o) for o in ("q", "s", "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return build_session(model.SerializeToString(), level="ORT_DISABLE_ALL", threads=1, label="DynamicQuantizeLinear")


@dataclass(frozen=True)
class _Kernel:
    """An integer node the emulation computes: its function and where its inputs are: the
    constant int8 weight, the weight's zero point and the activation's zero point (None: a
    float activation the node quantizes itself)."""

    fn: Callable[..., np.ndarray]
    weight: int
    weight_zp: int
    act_zp: int | None
    conv: bool = False


_KERNELS = {
    ("", "QLinearConv"): _Kernel(qlinear_conv, 3, 5, 2, conv=True),
    ("com.microsoft", "QGemm"): _Kernel(qgemm, 3, 5, 2),
    ("", "QLinearMatMul"): _Kernel(qlinear_matmul, 3, 5, 2),
    ("com.microsoft", "MatMulIntegerToFloat"): _Kernel(matmul_integer_to_float, 1, 5, 4),
    ("", "MatMulInteger"): _Kernel(matmul_integer, 1, 3, 2),
    ("com.microsoft", "DynamicQuantizeMatMul"): _Kernel(dynamic_quantize_matmul, 1, 3, None),
}


def _kernel(node: onnx.NodeProto) -> _Kernel | None:
    return _KERNELS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))


def _input(node: onnx.NodeProto, index: int | None) -> str | None:
    """The name of ``node``'s input ``index`` (None: absent or not given)."""
    return node.input[index] if index is not None and index < len(node.input) and node.input[index] else None


def _dynamic_inputs(node: onnx.NodeProto, initializers: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The names of ``node``'s inputs that are not initializers, each once (``Mul(x, x)`` reads
    ``x`` twice; a one-node graph declares an input once)."""
    return tuple(dict.fromkeys(i for i in node.input if i and i not in initializers))


def _emulable(node: onnx.NodeProto, values: Mapping[str, np.ndarray]) -> bool:
    """Whether ``node``'s inputs are what its kernel computes on: uint8 activations (float for a
    node that quantizes them itself) and int8 weights."""
    kernel = _kernel(node)
    if kernel is None:
        return False
    x = values.get(node.input[0])
    wt = values.get(_input(node, kernel.weight) or "")
    want = np.uint8 if kernel.act_zp is not None else np.float32
    return x is not None and wt is not None and x.dtype == want and wt.dtype == np.int8


def kernel_dependent(node: onnx.NodeProto, initializers: Mapping[str, np.ndarray]) -> bool:
    """Whether a fused u8×s8 node (QLinearConv, QGemm, QLinearMatMul) may compute differently on
    different kernel families: its weights are not a constant symmetric int8 tensor, or two of
    them form a pair that can leave int16 (:func:`risky_pairs`, in MLAS's order). Otherwise every
    family accumulates exactly (a depthwise conv always does: MLAS's depthwise kernel does not
    pair products) and ORT's own kernel computes what any target would."""
    kernel = _kernel(node)
    if kernel is None:
        return True
    w, zw = initializers.get(_input(node, kernel.weight) or ""), initializers.get(_input(node, kernel.weight_zp) or "")
    if w is None or (zw is not None and np.any(zw != 0)):
        return True
    attrs = attributes(node)
    if kernel.conv:
        if w.ndim not in (3, 4):  # a 3-D conv: not modelled (emulating it is refused)
            return True
        group = int(attrs.get("group", 1))
        if w.shape[1] == 1 and group > 1:
            return False
        rows = conv_weight_rows(w, group)
    elif w.ndim != 2:
        return True
    else:  # QGemm B [K, N] (or [N, K] with transB), the MatMuls' B [K, N]
        rows = [w if int(attrs.get("transB", 0)) else w.T]
    return any(risky_mask(r)[2].any() for r in rows)


def stored_integer_kernels(path: str | Path) -> set[str]:
    """Names of the fused integer nodes (QLinearConv, QGemm, …) ``path`` holds as written — a
    QOperator file's, not the ones ORT's optimizer fuses from Q/DQ pairs: an unoptimized session
    runs these with this CPU's own kernels, so it is not the graph's exact arithmetic there."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise ModelLoadError(MSG_UNREADABLE.format(path=path, err=str(err).strip())) from err
    return {n.name for n in model.graph.node if _kernel(n) is not None}


# ------------------------------------------------------------------------------ the session


class _Input:
    def __init__(self, name: str, shape: Sequence[Any], type_: str) -> None:
        self.name, self.shape, self.type = name, list(shape), type_


class EmulatedSession:
    """Evaluates a QDQ model like ``target``'s int8 kernels would; ``run`` mimics an ORT session.

    Args:
        path: the QDQ ONNX file.
        target: one of :data:`EMULATED_TARGETS`.
        threads: how many parts of a batch run at once (default: one per CPU), each through
            single-threaded ORT sessions: many small sessions with their own spinning thread
            pools fight over the cores, and numpy's share of the work runs in one thread. A graph
            with a node that mixes the samples of a batch (:mod:`~fqexport.exporters.batch_coupling`:
            quantize_dynamic's DynamicQuantizeLinear) runs whole batches.
        label: how log lines name the model (default: its path).
        native_log_level: level of the line listing the fused nodes that run natively (the
            export check, which cannot act on it, logs it at INFO; ``validate`` warns).
    """

    def __init__(self, path: str | Path, target: str, threads: int | None = None, label: str | None = None,
                 native_log_level: int = logging.WARNING) -> None:
        check_target(target)
        if target == "native":
            raise ConfigError(MSG_NOT_EMULATED)
        self.path = Path(path)
        self.target = target
        self._workers = max(1, int(threads) if threads else usable_cpus())
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.model = self._optimized(self.path)
        g = self.model.graph
        nested = next((n for n in g.node if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                for a in n.attribute)), None)
        if nested is not None:  # its body reads outer values and sequences: not one-node sessions
            raise ControlFlowUnsupported(MSG_CONTROL_FLOW.format(target=target, node=nested.name, op=nested.op_type,
                                                                 path=self.path))
        self.initializers = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        # nodes that mix the samples of a batch (DynamicQuantizeLinear's one range): whole batches only
        self.batch_coupled_nodes = [f"{n.op_type}:{n.name}" for n in batch_coupled_nodes(g, self.initializers)]
        self._split = not self.batch_coupled_nodes  # whether a batch may be split along axis 0 (outputs batch-first)
        self._init_protos = {t.name: t for t in g.initializer}
        self._types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)
                       if v.type.tensor_type.elem_type}
        self._inputs = [i for i in g.input if i.name not in self.initializers]
        self.output_names = [o.name for o in g.output]
        self._sessions: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._weights: dict[int, WeightCache] = {}  # per emulated node
        fused = {i: n for i, n in enumerate(g.node) if _kernel(n) is not None}  # by position in the graph
        # fused nodes whose weights compute alike on every family run with ORT's own kernel: only
        # the others are emulated (for fqexport's x86-safe weights: none)
        u8s8 = {i: n for i, n in fused.items() if self._u8s8(n)}
        self._emulated = {i for i, n in u8s8.items() if kernel_dependent(n, self.initializers)}
        self.emulated_nodes = [f"{n.op_type}:{n.name}" for i, n in u8s8.items() if i in self._emulated]
        self.exact_nodes = [f"{n.op_type}:{n.name}" for i, n in u8s8.items() if i not in self._emulated]
        # a product of two uint8 activations (attention's Q·Kᵀ fused as MatMulIntegerToFloat) runs
        # natively and adds exactly on every family: native is every target's result
        u8u8 = {i for i, n in fused.items() if i not in u8s8 and self._u8u8(n)}
        self.exact_nodes += [f"{fused[i].op_type}:{fused[i].name}" for i in sorted(u8u8)]
        # ConvInteger: MLAS's portable S8U8 GEMM on every x86 without AVX-VNNI-INT8 (above): listed as exact
        self.exact_nodes += [f"{n.op_type}:{n.name}" for n in g.node if n.op_type == "ConvInteger"]
        self.native_nodes = [f"{n.op_type}:{n.name}" for i, n in enumerate(g.node)
                             if (i in fused and i not in u8s8 and i not in u8u8) or n.op_type in _OTHER_INTEGER_OPS]
        unmodelled = [n for n in g.node if n.op_type in _OTHER_INTEGER_OPS]
        if target == "x86-avx2" and unmodelled:
            raise ConfigError(MSG_UNMODELLED.format(nodes=", ".join(f"{n.op_type}:{n.name}" for n in unmodelled),
                                                    path=label or self.path,
                                                    ops=", ".join(sorted({n.op_type for n in unmodelled}))))
        if self.native_nodes:
            log.log(native_log_level, MSG_NATIVE.format(target=target, path=label or self.path,
                                                         nodes=", ".join(self.native_nodes)))

    def _u8s8(self, node: onnx.NodeProto) -> bool:
        """Whether a fused node has uint8 activations and constant int8 weights (by its zero
        points and weights; a node without an activation zero point: uint8, or a float input it
        quantizes to uint8 itself). A product of two activations (attention's QLinearMatMul)
        is not: it runs natively (u8×u8 adds exactly on every family)."""
        kernel = _kernel(node)
        za = self.initializers.get(_input(node, kernel.act_zp) or "")
        w = self.initializers.get(_input(node, kernel.weight) or "")
        if za is None and kernel.act_zp is not None:  # no zero point: the activation's declared type
            za = np.zeros((), helper.tensor_dtype_to_np_dtype(self._types.get(node.input[0], onnx.TensorProto.UINT8)))
        return (za is None or za.dtype == np.uint8) and w is not None and w.dtype == np.int8

    def _u8u8(self, node: onnx.NodeProto) -> bool:
        """Whether a fused node multiplies uint8 by uint8: two activations (its "weight" input
        computed, with a uint8 zero point), or uint8 activations by constant uint8 weights (ORT's
        U8U8 files: MLAS widens both to 16 bits on AVX2). u8×u8 products and their sums fit int32
        on every kernel family, so its result is the same on each."""
        kernel = _kernel(node)
        if kernel is None:
            return False
        weight = _input(node, kernel.weight) or ""
        w = self.initializers.get(weight)
        if kernel.act_zp is None:  # a float input the node quantizes to uint8 itself (DynamicQuantizeMatMul)
            return w is not None and w.dtype == np.uint8
        zps = [self.initializers.get(_input(node, i) or "") for i in (kernel.act_zp, kernel.weight_zp)]
        types = [self._types.get(node.input[0]),
                 self._types.get(weight) if w is None else helper.np_dtype_to_tensor_dtype(w.dtype)]
        return all((z is not None and z.dtype == np.uint8) or (z is None and t == onnx.TensorProto.UINT8)
                   for z, t in zip(zps, types)) and (w is None or w.dtype == np.uint8)

    @staticmethod
    def _optimized(path: Path) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory(prefix="fqexport-emu-") as tmp:
            dump = Path(tmp) / "extended.onnx"
            try:
                # the dump's own data file: the model's external data stays beside the model
                build_session(path, level="ORT_ENABLE_EXTENDED", dump_path=dump, dump_data_file=f"{dump.name}.data")
                return onnx.load(str(dump), load_external_data=True)
            except MemoryError:  # out of memory, not a file ORT cannot read
                raise
            except Exception as err:
                raise ModelLoadError(MSG_UNREADABLE.format(path=path, err=str(err).strip())) from err

    def get_inputs(self) -> list[_Input]:
        out = []
        for i in self._inputs:
            t = i.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            np_t = helper.tensor_dtype_to_np_dtype(t.elem_type)
            name = {np.float32: "float", np.float16: "float16", np.float64: "double",
                    np.int64: "int64", np.int32: "int32"}.get(np_t.type, "float")
            out.append(_Input(i.name, dims, f"tensor({name})"))
        return out

    def _node_session(self, idx: int, node: onnx.NodeProto, values: Mapping[str, np.ndarray]) -> Any:
        dyn = _dynamic_inputs(node, self.initializers)
        key = (idx, tuple(str(values[i].dtype) for i in dyn))
        sess = self._sessions.get(key)
        if sess is not None:
            return sess
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = self._build_node_session(idx, node, values, dyn)
        return self._sessions[key]

    def _build_node_session(self, idx: int, node: onnx.NodeProto, values: Mapping[str, np.ndarray],
                            dyn: Sequence[str]) -> Any:
        inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), None) for i in dyn]
        outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        inits = [self._init_protos[i] for i in dict.fromkeys(node.input) if i in self._init_protos]
        graph = helper.make_graph([node], f"node{idx}", inputs, outputs, initializer=inits)
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        return build_session(model.SerializeToString(), level="ORT_DISABLE_ALL", threads=1,
                             label=f"node {node.name} of {self.path}")

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``output_names`` (default: all) on ``feeds``; a batch is split along axis 0
        into ``threads`` parts run at once (when every output is batch-first and no node mixes the
        samples of a batch, :attr:`batch_coupled_nodes`; else run whole)."""
        names = list(output_names) if output_names else self.output_names
        sizes = {int(v.shape[0]) if np.ndim(v) else -1 for v in feeds.values()}
        n = sizes.pop() if len(sizes) == 1 else -1
        parts = min(self._workers, n)
        if not self._split or parts < 2:
            return self._run_graph(names, feeds)
        bounds = np.linspace(0, n, parts + 1).astype(int)
        chunks = [{k: v[a:b] for k, v in feeds.items()} for a, b in zip(bounds[:-1], bounds[1:])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="fqexport-emu")
        results = list(self._pool.map(lambda f: self._run_graph(names, f), chunks))
        if not all(np.ndim(y) and y.shape[0] == b - a for r, a, b in zip(results, bounds[:-1], bounds[1:]) for y in r):
            self._split = False  # an output that is not batch-first: run whole batches from now on
            return self._run_graph(names, feeds)
        return [np.concatenate([r[i] for r in results]) for i in range(len(names))]

    def _run_graph(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values: dict[str, np.ndarray] = dict(self.initializers)
        values.update(feeds)
        for idx, node in enumerate(self.model.graph.node):
            try:
                if idx in self._emulated and _emulable(node, values):
                    args = [values[i] if i else None for i in node.input]
                    with self._lock:
                        cache = self._weights.setdefault(idx, WeightCache(self.target, threads=1))
                    values[node.output[0]] = _kernel(node).fn(args, attributes(node), self.target, cache)
                else:
                    sess = self._node_session(idx, node, values)
                    outs = sess.run(None, {i: values[i] for i in _dynamic_inputs(node, self.initializers)})
                    for name, v in zip([o for o in node.output if o], outs):
                        values[name] = v
            except _Unsupported as err:
                raise ConfigError(MSG_UNSUPPORTED.format(target=self.target, node=node.name, op=node.op_type,
                                                         path=self.path, what=err)) from err
            except MemoryError:
                raise
            except Exception as err:
                raise ModelLoadError(MSG_NODE.format(target=self.target, node=node.name, op=node.op_type,
                                                     path=self.path, err=str(err).strip())) from err
        return [values[n] for n in names]
