"""Resources of an ONNX model: average weight bits, parameters, MACs and BOPs per sample —
from the fqexport metadata when present, else from the graph: every weight op
(:data:`WEIGHT_OPS`: Conv/Gemm/MatMul with a constant weight, possibly behind DequantizeLinear;
ONNX Runtime's QOperator and dynamic-quantization kernels; MatMulNBits; the recurrent ops of
:data:`RECURRENT_OPS`; a Gather of an embedding table by the input's ids) at its weight's width."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from fqexport.metadata import ACTIVATION_BITS, ExportMetadata
from fqexport.quant.layout import WEIGHT_ONLY_CONTAINERS, stored_code_bits

log = logging.getLogger(__name__)


_BITS = {"FLOAT": 32, "FLOAT16": 16, "BFLOAT16": 16, "DOUBLE": 64, "INT16": 16, "UINT16": 16, "INT8": 8, "UINT8": 8,
         "INT4": 4, "UINT4": 4, "INT2": 2, "UINT2": 2}
_FLOAT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")



# op -> (activation input, weight input, MAC rule, whether the activation input is integer)
WEIGHT_OPS = {
    "Conv": (0, 1, "conv", False), "ConvTranspose": (0, 1, "conv_transpose", False), "Gemm": (0, 1, "gemm", False),
    "MatMul": (0, 1, "matmul", False),
    # QOperator format (quantize_static(..., QuantFormat.QOperator)); com.microsoft's QGemm
    "QLinearConv": (0, 3, "conv", True), "QLinearMatMul": (0, 3, "matmul", True), "QGemm": (0, 3, "gemm", True),
    # quantize_dynamic: integer kernels on activations quantized at run time
    "ConvInteger": (0, 1, "conv", True), "MatMulInteger": (0, 1, "matmul", True),
}
# recurrent ops -> whether the activations are integer: W (input 1) and R (input 2) are the weights,
# each step multiplies both once (ONNX's GRU/LSTM/RNN; quantize_dynamic's com.microsoft LSTM)
RECURRENT_OPS = {"GRU": False, "LSTM": False, "RNN": False, "DynamicQuantizeLSTM": True}


@dataclass(frozen=True)
class Resources:
    """Σ over weight layers; ``macs``/``bops`` per sample, ``None`` when unknown.

    avg_weight_bits = Σ bits·params / Σ params (each stored weight once);  BOPs = Σ bits_w · bits_a · MACs
    (per node: a layer called twice computes twice).
    """

    avg_weight_bits: float
    params: int
    macs: int | None
    bops: float | None
    source: str  # "metadata" | "graph"
    float_params: int = 0  # weight elements stored in float (the graph's count; the metadata's float layers)


def from_metadata(meta: ExportMetadata | None) -> Resources | None:
    """Resources from the fqexport metadata contract; ``None`` when it lists no layers."""
    if meta is None or not meta.layers:
        return None
    layers = meta.layers
    # what the graph computes and stores, as from_graph reads it: a layer's codes at their
    # container's width (4-bit codes a GPU file stores in int8 take 8 bits), and a weight-only
    # layer (a GPU file's blocked DequantizeLinear → MatMul) reads float activations
    width = {l.name: float(stored_code_bits(l.storage, l.bits)) for l in layers}
    a_bits = {l.name: 32.0 if l.storage in WEIGHT_ONLY_CONTAINERS else float(meta.activation_bits) for l in layers}
    # weight layers left in float count at their 32 bits (and params); MACs/BOPs: quantized layers
    params = sum(l.params for l in layers + meta.float_layers)
    bit_params = sum(width.get(l.name, float(l.bits)) * l.params for l in layers + meta.float_layers)
    macs_known = all(l.macs > 0 for l in layers if l.kind != "embedding")  # a row lookup: no MACs
    macs = sum(l.macs for l in layers) if macs_known else None
    bops = sum(width[l.name] * a_bits[l.name] * l.macs for l in layers) if macs_known else None
    return Resources(
        avg_weight_bits=bit_params / params if params else 32.0,
        params=int(params),
        macs=macs,
        bops=bops,
        source="metadata",
        float_params=int(sum(l.params for l in meta.float_layers)),
    )


def _shape_of(vi) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _ort_symbolic_shapes(model):
    """ORT's symbolic shape inference, run as ``SymbolicShapeInference.infer_shapes`` runs it but
    without its failure path: when some shape stays unknown, that one saves the model as
    ``sym_shape_infer_temp.onnx`` (plus external data) into the current directory and raises. Here
    an incomplete inference returns the shapes it found; nothing is written."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    inference._preprocess(model)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_


def _inferred_shapes(model):
    """``model`` with shape inference's value_info (best effort: ``model`` itself when it fails).
    ONNX's inference has no rule for ORT's contrib ops (MatMulNBits, QGemm, ...), so the shapes
    after them would stay unknown: a graph holding one goes through ORT's symbolic inference,
    which knows them, and ONNX's only when that fails."""
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        try:
            return _ort_symbolic_shapes(model)
        except Exception as err:
            log.info("symbolic shape inference failed (%s); MACs after ORT contrib ops may be unknown", err)
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as err:  # shape inference is best effort
        log.info("shape inference failed (%s); MACs unknown", err)
        return model


def _graph_batch(model) -> int | str | None:
    """The graph's batch: a fixed size every non-initializer input and output starts with
    (``torch.onnx``'s default export: 2), ``"batch"`` for a symbolic first dim of every input whose
    second is a fixed size above 1, or None (a sequence-first input's time axis, ``[T, B, F]``, is no
    batch: its second dim is symbolic or 1)."""
    inits = {t.name for t in model.graph.initializer}
    heads = [i.type.tensor_type.shape.dim for i in model.graph.input if i.name not in inits]
    if not heads or not all(heads):
        return None
    outputs = [o.type.tensor_type.shape.dim for o in model.graph.output]
    if all(outputs):  # a fixed batch: the one size every input and output starts with
        firsts = {d[0].dim_value if d[0].HasField("dim_value") else None for d in (*heads, *outputs)}
        if len(firsts) == 1 and isinstance(first := firsts.pop(), int) and first > 0:
            return first
    # a symbolic batch, named alike or per tensor (torch.onnx's list-form dynamic_axes), a time-major
    # output too ([B, T, E] -> [T, B, C], CTC): every input's first dim symbolic, its second a fixed
    # size above 1 (a sequence-first [T, B, F] input's second is symbolic or 1)
    batch_first = all(len(d) >= 2 and not d[0].HasField("dim_value") and d[1].HasField("dim_value")
                      and d[1].dim_value > 1 for d in heads)
    return "batch" if batch_first else None


def _batch_pinned(model):
    """A copy of ``model`` whose inputs' first dim (a symbolic batch, :func:`_graph_batch`) is 1:
    shape inference then resolves the reshapes a dynamic batch leaves unknown (a torch.onnx
    transformer's attention: every MatMul output ``[unk, unk, C]``), and MACs are per sample anyway."""
    inits = {t.name for t in model.graph.initializer}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i in copy.graph.input:
        if i.name not in inits:
            i.type.tensor_type.shape.dim[0].Clear()
            i.type.tensor_type.shape.dim[0].dim_value = 1
    del copy.graph.value_info[:]  # shapes inferred with the batch dynamic: inferred again
    return copy


def from_graph(model, *, macs: bool = True) -> Resources:
    """Estimate from a loaded ``onnx.ModelProto`` (shapes from ONNX shape inference; ``macs=False``:
    weights only, no inference, MACs and BOPs unknown). MACs that a dynamic batch leaves unknown are
    inferred again with the batch pinned to 1 (:func:`_batch_pinned`)."""
    batch = _graph_batch(model) if macs else None
    if isinstance(batch, int):  # a fixed batch: every op's whole output over it (a sequence-first MatMul inside)
        return _from_graph(model, _inferred_shapes(model), per_batch=batch)
    res = _from_graph(model, _inferred_shapes(model) if macs else None)
    if batch == "batch" and res.macs is None and res.params:  # a time axis is not pinned: MACs unknown, not one step's
        try:  # data propagation: a Reshape to a shape the graph computes (Shape → Gather → Concat) is resolved
            inferred = onnx.shape_inference.infer_shapes(_batch_pinned(model), data_prop=True)
        except Exception as err:  # best effort, as _inferred_shapes
            log.info("shape inference with the batch pinned to 1 failed (%s); MACs unknown", err)
            return res
        again = _from_graph(inferred, inferred, per_batch=1)
        if again.macs is not None:
            return again
    return res


def _from_graph(model, inferred=None, *, per_batch: int | None = None) -> Resources:
    """:func:`from_graph` of ``model`` on the shapes of ``inferred`` (None: weights only). With
    ``per_batch`` (the graph's batch: 1 when inferred pinned, or a fixed one) a weight op's MACs are
    its whole output's over it: a sequence-first ``[T, B, E]`` MatMul or a Gemm over ``[T·B, E]``
    token rows counts every token; without, an op's first dim is taken as the batch."""
    batch_one = per_batch is not None
    macs = inferred is not None
    g = (inferred or model).graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    dequantized_outputs = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input}
    shapes = {vi.name: _shape_of(vi) for vi in (*g.value_info, *g.output, *g.input)}
    elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.value_info, *g.output, *g.input)}
    graph_inputs = {i.name for i in g.input} - set(inits)

    def weight_of(name: str):
        """(initializer, came through DequantizeLinear) behind a node input — through up to three
        DequantizeLinear / Cast / Transpose / Identity / Reshape nodes (INT4 codes → Cast →
        DequantizeLinear; float16 weights → Cast) — else None."""
        dequantized = False
        for _ in range(4):
            if name in inits:
                return inits[name], dequantized
            p = producers.get(name)
            if p is None or p.op_type not in ("DequantizeLinear", "Cast", "Transpose", "Identity", "Reshape"):
                return None
            dequantized |= p.op_type == "DequantizeLinear"
            name = p.input[0]
        return None

    params = floats = 0
    counted: set[str] = set()
    bit_params = 0.0
    macs_total = 0
    bops = 0.0
    macs_known = macs
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":  # B packed [N, blocks, blob]: K·N weights of `bits` bits
            if not {"K", "N"} <= attrs.keys():
                continue
            n_params, bits, wshape, rule = int(attrs["K"]) * int(attrs["N"]), int(attrs.get("bits", 4)), \
                [int(attrs["K"]), int(attrs["N"])], "matmul"
            integer_input, stored, is_float = False, node.input[1], False
        elif node.op_type in RECURRENT_OPS or _is_table_lookup(node, weight_of, graph_inputs, producers,
                                                               dequantized_outputs):
            # their weights count like any other; a recurrent op's MACs are steps · (W + R) per
            # sample, a lookup's none (a row is read, not multiplied)
            recurrent = node.op_type in RECURRENT_OPS
            found = [weight_of(node.input[i]) for i in ((1, 2) if recurrent else (0,)) if len(node.input) > i]
            tensors = [w[0] for w in found if w is not None]
            step_macs = sum(int(np.prod(t.dims)) for t in tensors)
            for t in tensors:
                kind = onnx.TensorProto.DataType.Name(t.data_type)
                if t.name not in counted:
                    counted.add(t.name)
                    n = int(np.prod(t.dims)) if t.dims else 1
                    params += n
                    floats += n if kind in _FLOAT_TYPES else 0
                    bit_params += _BITS.get(kind, 32) * n
            if not recurrent or not tensors:
                continue
            x = shapes.get(node.input[0])
            steps = (x[1] if attrs.get("layout", 0) == 1 else x[0]) if x and len(x) == 3 else None
            if steps is None:
                macs_known = False
                continue
            w_bits = max(_BITS.get(onnx.TensorProto.DataType.Name(t.data_type), 32) for t in tensors)
            a_bits = ACTIVATION_BITS if RECURRENT_OPS[node.op_type] else \
                _BITS.get(onnx.TensorProto.DataType.Name(elem_types.get(node.input[0], 1)), 32)
            macs_total += steps * step_macs
            bops += w_bits * a_bits * steps * step_macs
            continue
        elif node.op_type in WEIGHT_OPS:
            x_at, w_at, rule, integer_input = WEIGHT_OPS[node.op_type]
            w = weight_of(node.input[w_at]) if len(node.input) > w_at else None
            if w is None:
                continue
            tensor, _ = w
            stored = tensor.name
            wshape = list(tensor.dims)
            n_params = int(np.prod(wshape)) if wshape else 1
            kind = onnx.TensorProto.DataType.Name(tensor.data_type)
            bits, is_float = _BITS.get(kind, 32), kind in _FLOAT_TYPES
        else:
            continue
        xprod = producers.get(node.input[0])
        dequantized = xprod is not None and xprod.op_type == "DequantizeLinear"
        if integer_input or dequantized:
            # the codes' width: the zero point's type (uint16 in an A16 file), else 8; the zero point is
            # input 2 of both DequantizeLinear(x, s, zp) and the integer ops (QLinearConv(x, s, zp, ...))
            quantized = xprod if dequantized else node
            zero = quantized.input[2] if len(quantized.input) > 2 else ""
            a_bits = _BITS.get(onnx.TensorProto.DataType.Name(inits[zero].data_type), ACTIVATION_BITS) \
                if zero in inits else ACTIVATION_BITS
        else:  # a float input at its element type's width (float16: 16); unknown: 32
            a_bits = _BITS.get(onnx.TensorProto.DataType.Name(elem_types.get(node.input[0], 1)), 32)
        if stored not in counted:  # a weight two nodes share (a layer called twice) is stored once
            counted.add(stored)
            params += n_params
            floats += n_params if is_float else 0
            bit_params += bits * n_params
        out = shapes.get(node.output[0])
        if rule == "gemm" and batch_one and out and len(out) == 2 and out[0] is not None:  # rows · K·N
            macs = int(out[0]) * int(np.prod(wshape)) // per_batch
        elif rule == "gemm":  # A is [batch, K] by the op's definition: K·N per sample, whatever shape inference knows
            macs = int(np.prod(wshape))
        elif rule == "conv_transpose":  # every input pixel meets the whole kernel: H_in·W_in · Cin · Cout/g · kh · kw
            inp = shapes.get(node.input[0])
            if not inp or len(inp) < 3 or any(d is None for d in inp[2:]):
                macs_known = False
                continue
            macs = int(np.prod(inp[2:])) * int(np.prod(wshape))
        else:
            if not out or any(d is None for d in out[0 if batch_one else 1:]):
                macs_known = False
                continue
            per_out = (int(np.prod(out)) // per_batch if batch_one else int(np.prod(out[1:]))) if len(out) > 1 else 1
            k = int(np.prod(wshape[1:])) if rule == "conv" else (wshape[-2] if len(wshape) >= 2 else wshape[0])
            macs = per_out * k  # conv: Cin/groups · kh · kw per output value
        macs_total += macs
        bops += bits * a_bits * macs
    return Resources(
        avg_weight_bits=bit_params / params if params else 32.0,
        params=int(params),
        macs=int(macs_total) if macs_known and params else None,
        bops=float(bops) if macs_known and params else None,
        source="graph",
        float_params=int(floats),
    )


# what token ids pass through between the input and their Gather (a cast, a reshape, a clamp to the
# vocabulary, a shifted slice, an offset); not CumSum / Range, which compute positions
_IDS_OPS = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Clip", "Slice", "Mod", "Add", "Sub",
            "Min", "Max")


def _is_table_lookup(node, weight_of, graph_inputs: set[str], producers: dict, dequantized_outputs: set[str]) -> bool:
    """An Embedding: a Gather of rows of a constant rank-2 table of weights (float, or integer codes
    behind a DequantizeLinear, or gathered first and then dequantized, as ORT's ``quantize_dynamic``
    writes it: ``dequantized_outputs``, the tensors a DequantizeLinear reads) by ids that are a
    graph input (through :data:`_IDS_OPS`).
    A table read at positions the graph computes (a sinusoidal buffer indexed by cumsum, a rotary
    cache) is a fixed buffer, not a weight a quantizer stores, and a constant shape list not a table."""
    if node.op_type != "Gather" or len(node.input) < 2:
        return False
    found = weight_of(node.input[0])
    if found is None:
        return False
    tensor, dequantized = found
    kind = onnx.TensorProto.DataType.Name(tensor.data_type)
    if len(tensor.dims) != 2 or not (kind in _FLOAT_TYPES or dequantized or node.output[0] in dequantized_outputs):
        return False
    ids = node.input[1]
    for _ in range(4):
        if ids in graph_inputs:
            return True
        p = producers.get(ids)
        if p is None or p.op_type not in _IDS_OPS:
            return False
        ids = p.input[0]
    return False


MSG_STALE_METADATA = (
    "%s: its fqexport metadata lists %d quantized weights, but the graph stores %d more weights in float "
    "than the metadata's float layers (the file was edited after export: e.g. a tool folded its "
    "DequantizeLinear nodes); resources are read from the graph"
)


def model_resources(path: str | Path, meta: ExportMetadata | None = None) -> Resources:
    """Resources of the ONNX file at ``path``: the metadata's numbers, else the graph's — also when
    the graph stores in float more than half of the weights the metadata lists as quantized (a
    file edited after export; warned). With float layers in the metadata, MACs and BOPs are the
    graph's when it reads more of them (the float layers' share, at 32 bits)."""
    model = onnx.load(str(path), load_external_data=False)
    res = from_metadata(meta)
    if res is None:
        return from_graph(model)
    quantized = res.params - res.float_params
    extra = from_graph(model, macs=False).float_params - res.float_params
    if extra > 0.5 * quantized:
        log.warning(MSG_STALE_METADATA, path, quantized, extra)
        return from_graph(model)
    if meta.float_layers:  # the metadata prices its quantized layers only: the graph's MACs and BOPs
        graph = from_graph(model)  # count the float ones too (a GRU left float is half of a KWS model's)
        if graph.macs is not None and graph.macs > (res.macs or 0):
            return replace(res, macs=graph.macs, bops=graph.bops)
    return res
