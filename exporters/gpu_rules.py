"""What TensorRT's ONNX importer and ONNX Runtime's CUDA EP take from a QDQ file, checked on the
graph alone (runs on any machine, no GPU): :func:`check_gpu_qdq` lists every violation, each
naming the node and the rule.

TensorRT imports int8 Q/DQ only (zero points 0, per-channel scales on weights only) and ORT's
CUDA EP runs quantized ops only as S8S8 (its docs: "quantization on GPU supports S8S8 only"); a
uint8 pair there runs as float. The rules (:data:`RULES`):

- ``int8-activations``: every QuantizeLinear / DequantizeLinear of an activation has an int8
  zero point equal to 0 (given explicitly: QuantizeLinear's default type is uint8);
- ``per-tensor-activations``: its scale is a scalar (per-channel scales are for weights only);
- ``weight-per-channel``: a DequantizeLinear of a weight initializer is per channel on its op's
  output axis — Conv axis 0, ConvTranspose axis 1, Gemm axis 0 with transB=1 (1 without), MatMul
  ``[K, N]`` axis 1, Gather (an embedding table) axis 0 — with int8 codes and zero point 0, or
  INT4 blocked along K (``axis=0``, ``block_size``) read by a MatMul;
- ``weight-only-int4``: a MatMul over blocked INT4 weights reads a float activation and feeds no
  QuantizeLinear — the weight-only pattern the CUDA EP fuses into MatMulNBits (it takes a MatMul
  whose only DequantizeLinear input is the weight and whose output is not quantized);
- ``add-inputs-quantized``: an Add with one input from an activation DequantizeLinear has its other
  computed input quantized too (an Add of a constant — a bias, a position embedding — is exempt);
- ``no-qdq-between-pad-and-conv``: no QuantizeLinear → DequantizeLinear pair between a Pad and
  the Conv it feeds (the pair goes before the Pad);
- ``no-uint8``: no uint8 tensor anywhere (initializers, constants, casts, graph inputs/outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, numpy_helper

from fqexport.exporters.onnx_graph import attributes, producers

RULE_INT8 = "int8-activations"
RULE_PER_TENSOR = "per-tensor-activations"
RULE_WEIGHT = "weight-per-channel"
RULE_WEIGHT_ONLY = "weight-only-int4"
RULE_ADD = "add-inputs-quantized"
RULE_PAD = "no-qdq-between-pad-and-conv"
RULE_UINT8 = "no-uint8"
RULES = (RULE_INT8, RULE_PER_TENSOR, RULE_WEIGHT, RULE_WEIGHT_ONLY, RULE_ADD, RULE_PAD, RULE_UINT8)

# Messages of the violations, one per way a rule is broken ({...} filled per node).
MSG_ZERO_POINT_MISSING = "activation {op} has no zero point (QuantizeLinear's default is uint8): give an int8 zero point 0"
MSG_ZERO_POINT_TYPE = "activation {op} has a {dtype} zero point: TensorRT and the CUDA EP take int8 only"
MSG_ZERO_POINT_VALUE = "activation {op} has zero point {value}, not 0: TensorRT takes symmetric int8 only"
MSG_ZERO_POINT_DYNAMIC = "activation {op} has a computed zero point: it must be a constant int8 0"
MSG_ACT_SCALE = "activation {op} has a scale of shape {shape}: activations take one scale per tensor"
MSG_WEIGHT_CONSUMER = "weight DequantizeLinear of '{weight}' feeds {ops}: not the weight input of a Conv, ConvTranspose, Gemm, MatMul or Gather"
MSG_WEIGHT_AXIS = "weight DequantizeLinear of '{weight}' ({op} weight) is per-channel on axis {axis}: the output axis is {want}"
MSG_WEIGHT_SCALE = "weight DequantizeLinear of '{weight}' has a scale of shape {shape}: one scale per output channel ({channels}) on axis {axis}"
MSG_WEIGHT_TYPE = "weight DequantizeLinear of '{weight}' has {dtype} codes: TensorRT takes int8 per channel, INT4 only blocked (for a MatMul)"
MSG_WEIGHT_ZERO_POINT = "weight DequantizeLinear of '{weight}' has a non-zero zero point: weights are symmetric"
MSG_BLOCKED = "blocked DequantizeLinear of '{weight}' feeds {op} with axis={axis}: blocks run along K (axis 0) of a MatMul's [K, N] weight"
MSG_WEIGHT_ONLY_INPUT = "MatMul over blocked INT4 weights '{weight}' reads a quantized activation: the CUDA EP fuses weight-only MatMulNBits only on a float input"
MSG_WEIGHT_ONLY_OUTPUT = "MatMul over blocked INT4 weights '{weight}' feeds a QuantizeLinear: the CUDA EP fuses weight-only MatMulNBits only with a float output"
MSG_ADD = "Add reads a quantized activation ('{quantized}') and a float one ('{other}'): quantize both inputs of a residual add"
MSG_PAD = "Conv reads Pad '{pad}' through a QuantizeLinear → DequantizeLinear pair: put the pair before the Pad"
MSG_UINT8 = "{what} is uint8: TensorRT and the CUDA EP take int8 only"

_QDQ = ("QuantizeLinear", "DequantizeLinear")
# op -> the output axis of its weight (input 1; Gather: its table, input 0)
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "Gather": 0}
_NAMES = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8", TensorProto.INT4: "INT4", TensorProto.UINT4: "UINT4",
          TensorProto.INT2: "INT2", TensorProto.UINT2: "UINT2", TensorProto.INT32: "int32", TensorProto.INT16: "int16",
          TensorProto.UINT16: "uint16"}


@dataclass(frozen=True)
class Violation:
    """One broken rule: the rule (:data:`RULES`), the node (its name, else its first output) and
    its op type, and what is wrong."""

    rule: str
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.op} '{self.node}': {self.message}"


def _dtype(t: int) -> str:
    return _NAMES.get(t, TensorProto.DataType.Name(t).lower())


def _node_name(node: NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _violation(rule: str, node: NodeProto, message: str) -> Violation:
    return Violation(rule, _node_name(node), node.op_type, message)


class _Graph:
    """The main graph's producers, consumers and constant values (initializers, Constant nodes,
    Casts of constants)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = producers(graph)
        self.users: dict[str, list[NodeProto]] = {}
        for n in graph.node:
            for name in n.input:
                if name:
                    self.users.setdefault(name, []).append(n)

    def constant(self, name: str) -> tuple[np.ndarray, int] | None:
        """``(value, ONNX data type)`` of a constant value, else None."""
        if name in self.inits:
            t = self.inits[name]
            return numpy_helper.to_array(t), t.data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = attributes(node).get("value")
            return (numpy_helper.to_array(value), value.data_type) if isinstance(value, TensorProto) else None
        if node is not None and node.op_type == "Cast":
            src = self.constant(node.input[0])
            return (src[0], int(attributes(node)["to"])) if src is not None else None
        return None

    def is_constant(self, name: str) -> bool:
        return self.constant(name) is not None

    def made_by(self, name: str, op: str) -> NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def is_weight_dq(self, node: NodeProto) -> bool:
        """A DequantizeLinear of an initializer (a weight), possibly through a Cast of it."""
        return node.op_type == "DequantizeLinear" and self.is_constant(node.input[0])

    def activation_dq(self, name: str) -> NodeProto | None:
        """The activation DequantizeLinear producing ``name``, if any."""
        node = self.made_by(name, "DequantizeLinear")
        return node if node is not None and not self.is_weight_dq(node) else None


def _activation_violations(g: _Graph, node: NodeProto) -> list[Violation]:
    out = []
    op = node.op_type
    if len(node.input) < 3 or not node.input[2]:
        out.append(_violation(RULE_INT8, node, MSG_ZERO_POINT_MISSING.format(op=op)))
    else:
        zp = g.constant(node.input[2])
        if zp is None:
            out.append(_violation(RULE_INT8, node, MSG_ZERO_POINT_DYNAMIC.format(op=op)))
        elif zp[1] != TensorProto.INT8:
            out.append(_violation(RULE_INT8, node, MSG_ZERO_POINT_TYPE.format(op=op, dtype=_dtype(zp[1]))))
        elif np.any(zp[0].astype(np.int64) != 0):
            value = zp[0].astype(np.int64).tolist()
            out.append(_violation(RULE_INT8, node, MSG_ZERO_POINT_VALUE.format(op=op, value=value)))
    scale = g.constant(node.input[1])
    if scale is not None and scale[0].size != 1:
        out.append(_violation(RULE_PER_TENSOR, node, MSG_ACT_SCALE.format(op=op, shape=list(scale[0].shape))))
    return out


def _weight_axis(user: NodeProto, position: int) -> int | None:
    """The output axis of the weight read at input ``position`` of ``user``; None: not a weight input."""
    if user.op_type in _WEIGHT_AXIS:
        return _WEIGHT_AXIS[user.op_type] if position == (0 if user.op_type == "Gather" else 1) else None
    if user.op_type == "Gemm" and position == 1:
        return 0 if attributes(user).get("transB", 0) == 1 else 1
    if user.op_type == "MatMul" and position == 1:
        return 1
    return None


def _weight_violations(g: _Graph, dq: NodeProto) -> list[Violation]:
    codes = g.constant(dq.input[0])
    src = g.producer.get(dq.input[0])
    weight = src.input[0] if src is not None and src.op_type == "Cast" else dq.input[0]
    users = g.users.get(dq.output[0], [])
    if len(users) != 1 or _weight_axis(users[0], list(users[0].input).index(dq.output[0])) is None:
        return [_violation(RULE_WEIGHT, dq, MSG_WEIGHT_CONSUMER.format(weight=weight, ops=", ".join(u.op_type for u in users) or "nothing"))]
    user = users[0]
    a = attributes(dq)
    axis, block = int(a.get("axis", 1)), int(a.get("block_size", 0))
    out = []
    if block:
        if user.op_type != "MatMul" or axis != 0:
            out.append(_violation(RULE_WEIGHT, dq, MSG_BLOCKED.format(weight=weight, op=user.op_type, axis=axis)))
        if codes[1] != TensorProto.INT4:
            out.append(_violation(RULE_WEIGHT, dq, MSG_WEIGHT_TYPE.format(weight=weight, dtype=_dtype(codes[1]))))
        if user.op_type == "MatMul":
            out += _weight_only_violations(g, user, weight)
    else:
        want = _weight_axis(user, list(user.input).index(dq.output[0]))
        scale = g.constant(dq.input[1])
        channels = codes[0].shape[want] if codes[0].ndim > want else None
        if axis % max(codes[0].ndim, 1) != want:
            out.append(_violation(RULE_WEIGHT, dq, MSG_WEIGHT_AXIS.format(weight=weight, op=user.op_type, axis=axis, want=want)))
        elif scale is None or scale[0].shape != (channels,):
            shape = list(scale[0].shape) if scale is not None else "?"
            out.append(_violation(RULE_WEIGHT, dq, MSG_WEIGHT_SCALE.format(weight=weight, shape=shape, channels=channels, axis=want)))
        if codes[1] != TensorProto.INT8:
            out.append(_violation(RULE_WEIGHT, dq, MSG_WEIGHT_TYPE.format(weight=weight, dtype=_dtype(codes[1]))))
    if len(dq.input) > 2 and dq.input[2]:
        zp = g.constant(dq.input[2])
        if zp is None or np.any(zp[0].astype(np.int64) != 0):
            out.append(_violation(RULE_WEIGHT, dq, MSG_WEIGHT_ZERO_POINT.format(weight=weight)))
    return out


def _weight_only_violations(g: _Graph, matmul: NodeProto, weight: str) -> list[Violation]:
    out = []
    if g.activation_dq(matmul.input[0]) is not None:
        out.append(_violation(RULE_WEIGHT_ONLY, matmul, MSG_WEIGHT_ONLY_INPUT.format(weight=weight)))
    if any(u.op_type == "QuantizeLinear" for u in g.users.get(matmul.output[0], [])):
        out.append(_violation(RULE_WEIGHT_ONLY, matmul, MSG_WEIGHT_ONLY_OUTPUT.format(weight=weight)))
    return out


def _add_violations(g: _Graph, add: NodeProto) -> list[Violation]:
    quantized = [x for x in add.input if g.activation_dq(x) is not None]
    computed = [x for x in add.input if x and x not in quantized and not g.is_constant(x)]
    if quantized and computed:
        return [_violation(RULE_ADD, add, MSG_ADD.format(quantized=quantized[0], other=computed[0]))]
    return []


def _pad_violations(g: _Graph, conv: NodeProto) -> list[Violation]:
    dq = g.made_by(conv.input[0], "DequantizeLinear")
    q = g.made_by(dq.input[0], "QuantizeLinear") if dq is not None else None
    pad = g.made_by(q.input[0], "Pad") if q is not None else None
    if pad is None:
        return []
    return [_violation(RULE_PAD, conv, MSG_PAD.format(pad=_node_name(pad)))]


def _uint8_violations(model: onnx.ModelProto, g: _Graph) -> list[Violation]:
    out = []
    graph = model.graph
    for t in graph.initializer:
        if t.data_type == TensorProto.UINT8:
            out.append(Violation(RULE_UINT8, t.name, "initializer", MSG_UINT8.format(what=f"initializer '{t.name}'")))
    for vi in (*graph.input, *graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.UINT8:
            out.append(Violation(RULE_UINT8, vi.name, "graph input/output", MSG_UINT8.format(what=f"'{vi.name}'")))
    for node in graph.node:
        a = attributes(node)
        value = a.get("value")
        if node.op_type == "Constant" and isinstance(value, TensorProto) and value.data_type == TensorProto.UINT8:
            out.append(_violation(RULE_UINT8, node, MSG_UINT8.format(what="its value")))
        elif node.op_type == "Cast" and a.get("to") == TensorProto.UINT8:
            out.append(_violation(RULE_UINT8, node, MSG_UINT8.format(what="its output")))
        elif node.op_type == "QuantizeLinear" and a.get("output_dtype") == TensorProto.UINT8:
            out.append(_violation(RULE_UINT8, node, MSG_UINT8.format(what="its output_dtype")))
    return out


def check_gpu_qdq(model: onnx.ModelProto) -> list[Violation]:
    """Every violation of :data:`RULES` in ``model``'s main graph, in node order (``[]``: the file is
    what TensorRT's importer and ORT's CUDA EP take)."""
    g = _Graph(model)
    out: list[Violation] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _QDQ and not (node.op_type == "DequantizeLinear" and g.is_weight_dq(node)):
            out += _activation_violations(g, node)
        elif node.op_type == "DequantizeLinear":
            out += _weight_violations(g, node)
        elif node.op_type == "Add":
            out += _add_violations(g, node)
        elif node.op_type == "Conv":
            out += _pad_violations(g, node)
    return out + _uint8_violations(model, g)
