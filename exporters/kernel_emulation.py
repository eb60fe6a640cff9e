"""Run a QDQ ONNX model with the integer arithmetic of another CPU's int8 kernels.

What deploys is ONNX Runtime's fused integer kernels, and how they add u8×s8 products depends
on the CPU (ORT-NOTES.md, :mod:`fqexport.exporters.cpu_isa`). :class:`EmulatedSession` lets a CI
machine of one kind measure what a machine of another kind would compute:

1. ORT optimizes the model at ``ORT_ENABLE_EXTENDED`` (the QDQ fusions, no hardware layout
   transforms) and the optimized graph is dumped: QLinearConv, QGemm, QLinearMatMul, QLinearAdd,
   … with ORT's own int32 biases, scales and zero points.
2. The graph is evaluated node by node. QLinearConv / QGemm / QLinearMatMul with uint8
   activations and int8 weights are computed here, in numpy, with the target's accumulation
   (:func:`accumulate`) and MLAS's requantization (:func:`requantize`). Every other node runs
   in ONNX Runtime on its own (a one-node session), so it matches the native kernels exactly.

Accumulation per target (``K`` ordered like the packed weights MLAS uses on x86: for a conv,
kernel tap by tap and input channels inside a tap, i.e. NHWC im2col order):

- ``x86-vnni`` / ``arm64``: Σ_k (x_k − z_x)·w_k exactly in int32;
- ``x86-avx2``: MLAS's ``vpmaddubsw`` adds each pair of products (k, k+1), k even, of the
  *stored* uint8 activation and the int8 weight into an int16 with saturation to
  [−32768, 32767]; the pairs are then added exactly and the zero point is corrected exactly
  (−z_x·Σ_k w_k). Depthwise convs use MLAS's exact depthwise kernel.

Requantization like MLAS: ``float32(acc + bias) · float32(s_x·s_w[c]/s_y)``, clipped to the
output range, rounded half to even, plus the output zero point.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence, get_args

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fqexport.config import KernelTarget
from fqexport.errors import ConfigError, ModelLoadError
from fqexport.exporters.ort_session import build_session

log = logging.getLogger(__name__)

TARGETS: tuple[str, ...] = get_args(KernelTarget)
EMULATED_TARGETS = TARGETS[1:]

MSG_TARGET = "target {target!r} is not one of {choices} (--target)"
MSG_NOT_EMULATED = "target 'native' runs ONNX Runtime's own session (make_session), not an emulation"
MSG_UNREADABLE = "cannot optimize ONNX model {path} for kernel emulation: {err}"
MSG_NATIVE = (
    "kernel emulation ({target}) of {path}: {nodes} run with this CPU's own kernels (only uint8 x "
    "int8 QLinearConv/QGemm/QLinearMatMul are emulated); their results are native, not {target}"
)
# Integer kernels ORT may fuse that the emulation does not model (they run natively).
_OTHER_INTEGER_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                      "QAttention", "DynamicQuantizeLSTM")
MSG_NODE = "kernel emulation ({target}) failed at node {node} ({op}) of {path}: {err}"
MSG_UNSUPPORTED = (
    "kernel emulation ({target}) does not cover node {node} ({op}) of {path}: {what}. It covers 2-D "
    "QLinearConv, QGemm and 2-D QLinearMatMul with uint8 activations and symmetric int8 weights "
    "(what fqexport and quantize_static export); validate this model with --target native only"
)
_CONV_RANK = "a {rank}-D input (2-D convs only)"
_WEIGHT_ZP = "a non-zero weight zero point (symmetric weights only)"
_MATMUL_B = "B is not a 2-D symmetric int8 constant"

INT16_MIN, INT16_MAX = -32768, 32767
# |x·w_a + x'·w_b| <= 255·(|w_a| + |w_b|) for uint8 x: a pair can leave int16 only when both
# weights have the same sign and |w_a| + |w_b| >= 129 (255·128 = 32640 <= 32767).
_SAFE_PAIR_SUM = 128
_CHUNK = 1 << 22  # elements per temporary in the saturation correction


def check_target(target: str) -> str:
    """``target`` if it is one of :data:`TARGETS`, else ConfigError."""
    if target not in TARGETS:
        raise ConfigError(MSG_TARGET.format(target=target, choices=", ".join(TARGETS)))
    return target


# ------------------------------------------------------------------------------ integer math


def _risky_pairs(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(m, j, w_even, w_odd)`` of the weight pairs (rows m, pair columns j) that can leave int16:
    both weights of one sign and |w_a| + |w_b| >= 129; ``m`` sorted. ``w`` ``[M, K]``, K even."""
    we = w[:, 0::2].astype(np.int32)
    wo = w[:, 1::2].astype(np.int32)
    risky = (np.sign(we) * np.sign(wo) > 0) & (np.abs(we) + np.abs(wo) > _SAFE_PAIR_SUM)
    mi, ji = np.nonzero(risky)
    return mi, ji, we[mi, ji], wo[mi, ji]


def _even(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``w`` padded with a zero column when K is odd (MLAS pads K to pairs)."""
    if a.shape[1] % 2:
        a = np.concatenate([a, np.zeros((a.shape[0], 1), a.dtype)], axis=1)
        w = np.concatenate([w, np.zeros((w.shape[0], 1), w.dtype)], axis=1)
    return a, w


def _saturation(a: np.ndarray, pairs: tuple[np.ndarray, ...], m: int) -> np.ndarray:
    """Σ_pairs (sat16(p) − p) ``[rows, m]`` over the risky ``pairs`` (:func:`_risky_pairs`)."""
    rows = a.shape[0]
    out = np.zeros((rows, m), dtype=np.int64)
    mi, ji, we, wo = pairs
    if mi.size == 0:
        return out
    # p = a_e·w_e + a_o·w_o with |w| <= 128 can leave int16 only where a_e + a_o >= 32768/128 = 256:
    # rows below that at every pair are skipped
    ae = a[:, 0::2].astype(np.int32)
    ao = a[:, 1::2].astype(np.int32)
    hot = np.flatnonzero(((ae + ao) >= 256).any(axis=1))
    if hot.size == 0:
        return out
    ae, ao = ae[hot], ao[hot]
    step = max(1, _CHUNK // hot.size)
    for s in range(0, mi.size, step):
        mm, jj = mi[s : s + step], ji[s : s + step]
        p = ae[:, jj] * we[s : s + step] + ao[:, jj] * wo[s : s + step]  # [hot rows, R], |p| <= 64770
        corr = np.clip(p, INT16_MIN, INT16_MAX) - p
        if not corr.any():
            continue
        starts = np.flatnonzero(np.r_[True, mm[1:] != mm[:-1]])  # each output channel's run
        out[np.ix_(hot, mm[starts])] += np.add.reduceat(corr, starts, axis=1, dtype=np.int64)
    return out


def pair_saturation_correction(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_pairs (sat16(p) − p) with p = a[:, 2j]·w[m, 2j] + a[:, 2j+1]·w[m, 2j+1]: ``[rows, M]`` int64.

    ``a`` ``[rows, K]`` stored uint8 activations, ``w`` ``[M, K]`` int8 weights, K in MLAS's
    packed order (padded with a zero column when odd). Only weight pairs that can leave int16
    are evaluated, so weights with |q| <= 64 cost nothing and give a zero correction.
    """
    a, w = _even(a, w)
    return _saturation(a, _risky_pairs(w), w.shape[0])


def accumulate(a: np.ndarray, w: np.ndarray, za: int, target: str) -> np.ndarray:
    """int64 ``[rows, M]``: Σ_k (a − za)·w with ``target``'s accumulation (no bias).

    ``a`` ``[rows, K]`` uint8 (stored values), ``w`` ``[M, K]`` int8, K in packed order.
    """
    rows, k = a.shape
    # Integers add exactly in floating point while every partial sum stays below 2^mantissa:
    # Σ a·w and za·Σ w are each at most K·255·max|w|, so float32 is exact below 2^24, float64
    # below 2^53. Σ (a − za)·w = Σ a·w − za·Σ_k w.
    bound = k * 255 * int(np.abs(w.astype(np.int32)).max(initial=0))
    ftype = np.float32 if bound < 2**24 else np.float64
    wf = w.astype(ftype).T
    offset = ftype(za) * wf.sum(axis=0, dtype=np.float64).astype(ftype)
    pairs = None
    if target == "x86-avx2":
        a_even, w_even = _even(a[:1], w)
        pairs = _risky_pairs(w_even)
    acc = np.empty((rows, w.shape[0]), dtype=np.int64)
    step = max(1, _CHUNK // max(1, k))
    for s in range(0, rows, step):  # row chunks bound the temporaries
        part = a[s : s + step]
        exact = part.astype(ftype) @ wf
        exact -= offset
        acc[s : s + step] = np.rint(exact).astype(np.int64)
        if pairs is not None:
            acc[s : s + step] += _saturation(_even(part, w)[0], pairs, w.shape[0])
    return acc


def requantize(acc: np.ndarray, scale: np.ndarray, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """MLAS requantization of int32 ``acc`` (bias included), ``scale`` broadcast on the last axis."""
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


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _im2col_nhwc(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                 dilations: Sequence[int], pad_value: int) -> tuple[np.ndarray, int, int]:
    """``[N, OH, OW, kh, kw, C]`` patches of NCHW ``x`` (padding holds ``pad_value``)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    xp = np.full((n, c, h + pads[0] + pads[2], w + pads[1] + pads[3]), pad_value, dtype=x.dtype)
    xp[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + w] = x
    xp = np.ascontiguousarray(xp.transpose(0, 2, 3, 1))  # NHWC
    oh = (xp.shape[1] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (xp.shape[2] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    sn, sh, sw, sc = xp.strides
    patches = np.lib.stride_tricks.as_strided(
        xp,
        shape=(n, oh, ow, kh, kw, c),
        strides=(sn, sh * strides[0], sw * strides[1], sh * dilations[0], sw * dilations[1], sc),
        writeable=False,
    )
    return patches, oh, ow


def qlinear_conv(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str) -> np.ndarray:
    """ONNX QLinearConv (2-D, NCHW) with ``target``'s accumulation."""
    x, sx, zx, w, sw, zw, sy, zy = inputs[:8]
    bias = inputs[8] if len(inputs) > 8 else None
    if x.ndim == 3 and np.ndim(w) == 3:
        # 1-D conv (Conv1d): ORT runs it as a 2-D conv over [N, C, 1, L] with kernel (1, k)
        a1 = dict(attrs)
        for key, pre in (("strides", [1]), ("dilations", [1])):
            if key in a1:
                a1[key] = pre + list(a1[key])
        if "pads" in a1:
            p0, p1 = list(a1["pads"])
            a1["pads"] = [0, p0, 0, p1]
        if "kernel_shape" in a1:
            a1["kernel_shape"] = [1] + list(a1["kernel_shape"])
        args = [x[:, :, None, :], sx, zx, np.asarray(w)[:, :, None, :], sw, zw, sy, zy]
        return qlinear_conv(args + ([bias] if bias is not None else []), a1, target)[:, :, 0, :]
    if x.ndim != 4:
        raise _Unsupported(_CONV_RANK.format(rank=x.ndim - 2))
    if np.any(np.asarray(zw) != 0):
        raise _Unsupported(_WEIGHT_ZP)
    m, cg, kh, kw = w.shape
    group = int(attrs.get("group", 1))
    strides = list(attrs.get("strides", [1, 1]))
    dil = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        h, wd = x.shape[2:]
        pads = []
        for size, k, s, d in ((h, kh, strides[0], dil[0]), (wd, kw, strides[1], dil[1])):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            pads.append((total // 2, total - total // 2) if auto_pad == "SAME_UPPER" else (total - total // 2, total // 2))
        pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
    zx_i = int(_scalar(zx))
    patches, oh, ow = _im2col_nhwc(x, (kh, kw), strides, pads, dil, zx_i)
    n = x.shape[0]
    mg = m // group
    depthwise = cg == 1 and group > 1
    acc = np.empty((n * oh * ow, m), dtype=np.int64)
    for g in range(group):
        a = patches[..., g * cg : (g + 1) * cg].reshape(n * oh * ow, kh * kw * cg)
        wg = w[g * mg : (g + 1) * mg].transpose(0, 2, 3, 1).reshape(mg, kh * kw * cg)  # (kh, kw, c)
        acc[:, g * mg : (g + 1) * mg] = accumulate(a, wg, zx_i, "x86-vnni" if depthwise else target)
    if bias is not None:
        acc += bias.astype(np.int64)
    y = requantize(acc, _output_scale(_scalar(sx), np.asarray(sw), _scalar(sy)), int(_scalar(zy)), zy.dtype)
    return y.reshape(n, oh, ow, m).transpose(0, 3, 1, 2).copy()


def _matmul_2d(a: np.ndarray, b_kn: np.ndarray, za: int, target: str) -> np.ndarray:
    lead = a.shape[:-1]
    acc = accumulate(a.reshape(-1, a.shape[-1]), b_kn.T, za, target)
    return acc.reshape(*lead, b_kn.shape[1])


def qgemm(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str) -> np.ndarray:
    """com.microsoft QGemm (A uint8, B int8) with ``target``'s accumulation."""
    a, sa, za, b, sb, zb = inputs[:6]
    c = inputs[6] if len(inputs) > 6 else None
    sy = inputs[7] if len(inputs) > 7 else None
    zy = inputs[8] if len(inputs) > 8 else None
    if np.any(np.asarray(zb) != 0):
        raise _Unsupported(_WEIGHT_ZP)
    if int(attrs.get("transA", 0)):
        a = a.T
    b_kn = b.T if int(attrs.get("transB", 0)) else b
    alpha = np.float32(attrs.get("alpha", 1.0))
    acc = _matmul_2d(a, b_kn, int(_scalar(za)), target)
    if c is not None and c.dtype == np.int32:
        acc = acc + c.astype(np.int64)
    scale = np.float32(_scalar(sa)) * np.asarray(sb, np.float32).reshape(-1) * alpha
    if sy is None:  # float output
        y = acc.astype(np.int32).astype(np.float32) * scale
        if c is not None and c.dtype != np.int32:
            y = y + c.astype(np.float32)
        return y
    zy_v = zy if zy is not None else np.zeros((), np.uint8)
    return requantize(acc, scale / np.float32(_scalar(sy)), int(_scalar(zy_v)), zy_v.dtype)


def qlinear_matmul(inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any], target: str) -> np.ndarray:
    """ONNX QLinearMatMul (A uint8, B int8 [K, N] constant) with ``target``'s accumulation."""
    a, sa, za, b, sb, zb, sy, zy = inputs[:8]
    if b.ndim != 2 or np.any(np.asarray(zb) != 0):
        raise _Unsupported(_MATMUL_B)
    acc = _matmul_2d(a, b, int(_scalar(za)), target)
    scale = _output_scale(_scalar(sa), np.asarray(sb), _scalar(sy))
    return requantize(acc, scale, int(_scalar(zy)), zy.dtype)


_KERNELS = {("", "QLinearConv"): qlinear_conv, ("com.microsoft", "QGemm"): qgemm,
            ("", "QLinearMatMul"): qlinear_matmul}


def _emulable(node: onnx.NodeProto, values: Mapping[str, np.ndarray]) -> bool:
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    if key not in _KERNELS:
        return False
    x = values.get(node.input[0])
    wt = values.get(node.input[3])
    return x is not None and wt is not None and x.dtype == np.uint8 and wt.dtype == np.int8


# ------------------------------------------------------------------------------ the session


class _Input:
    def __init__(self, name: str, shape: Sequence[Any], type_: str) -> None:
        self.name, self.shape, self.type = name, list(shape), type_


class EmulatedSession:
    """Evaluates a QDQ model like ``target``'s int8 kernels would; ``run`` mimics an ORT session.

    Args:
        path: the QDQ ONNX file.
        target: one of :data:`EMULATED_TARGETS`.
        threads: intra-op threads of the one-node ORT sessions.
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
        self._threads = threads
        self.model = self._optimized(self.path)
        g = self.model.graph
        self.initializers = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self._init_protos = {t.name: t for t in g.initializer}
        self._inputs = [i for i in g.input if i.name not in self.initializers]
        self.output_names = [o.name for o in g.output]
        self._sessions: dict[tuple[int, tuple[str, ...]], Any] = {}
        fused = [n for n in g.node if (n.domain if n.domain != "ai.onnx" else "", n.op_type) in _KERNELS]
        self.emulated_nodes = [f"{n.op_type}:{n.name}" for n in fused if self._u8s8(n)]
        self.native_nodes = [f"{n.op_type}:{n.name}" for n in g.node
                             if (n in fused and not self._u8s8(n)) or n.op_type in _OTHER_INTEGER_OPS]
        if self.native_nodes:
            log.log(native_log_level, MSG_NATIVE.format(target=target, path=label or self.path,
                                                         nodes=", ".join(self.native_nodes)))

    def _u8s8(self, node: onnx.NodeProto) -> bool:
        """Whether a fused node has uint8 activations and int8 weights (by its zero points / weights)."""
        za, w = self.initializers.get(node.input[2]), self.initializers.get(node.input[3])
        return za is not None and za.dtype == np.uint8 and (w is None or w.dtype == np.int8)

    @staticmethod
    def _optimized(path: Path) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory(prefix="fqexport-emu-") as tmp:
            dump = Path(tmp) / "extended.onnx"
            try:
                build_session(path, level="ORT_ENABLE_EXTENDED", dump_path=dump)
                return onnx.load(str(dump), load_external_data=True)
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
        dyn = tuple(i for i in node.input if i and i not in self.initializers)
        key = (idx, tuple(str(values[i].dtype) for i in dyn))
        sess = self._sessions.get(key)
        if sess is not None:
            return sess
        inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), None) for i in dyn]
        outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        inits = [self._init_protos[i] for i in dict.fromkeys(node.input) if i in self._init_protos]
        graph = helper.make_graph([node], f"node{idx}", inputs, outputs, initializer=inits)
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        sess = build_session(model.SerializeToString(), level="ORT_DISABLE_ALL", threads=self._threads,
                             label=f"node {node.name} of {self.path}")
        self._sessions[key] = sess
        return sess

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values: dict[str, np.ndarray] = dict(self.initializers)
        values.update(feeds)
        for idx, node in enumerate(self.model.graph.node):
            try:
                if _emulable(node, values):
                    fn = _KERNELS[(node.domain if node.domain != "ai.onnx" else "", node.op_type)]
                    args = [values[i] if i else None for i in node.input]
                    values[node.output[0]] = fn(args, _attrs(node), self.target)
                else:
                    sess = self._node_session(idx, node, values)
                    dyn = [i for i in node.input if i and i not in self.initializers]
                    outs = sess.run(None, {i: values[i] for i in dict.fromkeys(dyn)})
                    for name, v in zip([o for o in node.output if o], outs):
                        values[name] = v
            except _Unsupported as err:
                raise ConfigError(MSG_UNSUPPORTED.format(target=self.target, node=node.name, op=node.op_type,
                                                         path=self.path, what=err)) from err
            except Exception as err:
                raise ModelLoadError(MSG_NODE.format(target=self.target, node=node.name, op=node.op_type,
                                                     path=self.path, err=str(err).strip())) from err
        names = list(output_names) if output_names else self.output_names
        return [values[n] for n in names]
