"""Pass 1 of the export: ``torch.onnx.export`` of a PyTorch module to an ONNX proto.

The fake-quant reference's activation quantization points (``fqexport::act_qdq``) become uint8
``QuantizeLinear → DequantizeLinear`` pairs (:mod:`fqexport.exporters.act_qdq`); weights stay
float initializers named after their PyTorch parameters until the weight pass rewrites them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings

import onnx
import torch
import torch.fx
import torch.nn.functional as F

import fqexport.graph.act_quant  # noqa: F401  (registers torch.ops.fqexport.act_qdq)
from fqexport.errors import ExportError
from fqexport.exporters.act_qdq import act_qdq_onnx
from fqexport.global_state import GLOBAL_STATE_LOCK

OPSET = 21
OPSET_INT2 = 25  # ORT runs DequantizeLinear on INT2 only from opset 25 (IR 11)

MSG_TORCH_EXPORT = "torch.onnx.export failed for the {what} model: {err}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FAILED_NODE = re.compile(r"Error when translating node (%\S+)")


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes (``__cause__``, else ``__context__``), outermost first."""
    chain, seen = [err], {id(err)}
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
        chain.append(nxt)
        seen.add(id(nxt))
    return chain


def _reraise_interrupt(err: Exception) -> None:
    """Re-raise an interrupt (Ctrl-C's KeyboardInterrupt, the CLI's signal exception: not an
    Exception) that torch.onnx caught and wrapped in an error of its own: the run was stopped,
    the model is not at fault."""
    for cause in _chain(err):
        if not isinstance(cause, Exception):
            raise cause


def _root_cause(err: BaseException) -> str:
    """torch.onnx's error in one line: the innermost cause (e.g. ``AssertionError: only 4D
    query, key, and value are supported``) and the graph node it failed on, without the
    exporter's report-filing advice and colour codes."""
    chain = _chain(err)
    node = next((m.group(1) for e in chain if (m := _FAILED_NODE.search(str(e)))), None)
    inner = chain[-1]
    text = _ANSI.sub("", str(inner)).strip().splitlines()
    where = f" (at node {node})" if node else ""
    return f"{type(inner).__name__}: {text[0] if text else ''}{where}"


def attention_4d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` run as the 4-D call torch.onnx exports: inputs
    ``[*lead, L, E]`` of another rank are made 4-D, more leading dims flattened into the batch
    (windowed attention: Twins, NesT), fewer given leading 1s, and the output reshaped back; the
    mask is broadcast to the scores' shape first. Same values as the plain call."""
    if query.dim() == 4 or key.dim() != query.dim() or value.dim() != query.dim():
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    def as_4d(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t.reshape(*(1,) * (4 - t.dim()), *t.shape)

    mask = attn_mask
    if mask is not None:
        mask = as_4d(mask.expand(*query.shape[:-1], key.shape[-2]))
    out = F.scaled_dot_product_attention(as_4d(query), as_4d(key), as_4d(value), attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.reshape(*query.shape[:-1], out.shape[-1])


# an eager trace calls F's; a graph torch.export made (a .pt2, or the fallback of a forward fx cannot trace) the aten op
_ATTENTION = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


def _with_4d_attention(model: torch.nn.Module) -> torch.nn.Module:
    """A traced ``model`` whose attention calls go through :func:`attention_4d` (a copy; ``model``
    itself when it has none, or is not an fx graph)."""
    if not isinstance(model, torch.fx.GraphModule):
        return model
    calls = [n for n in model.graph.nodes if n.op == "call_function" and n.target in _ATTENTION]
    if not calls:
        return model
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(model.graph, {}))
    rewritten = torch.fx.GraphModule(model, graph)  # shares the modules and weights: no copy of them
    for node in rewritten.graph.nodes:
        if node.op == "call_function" and node.target in _ATTENTION:
            node.target = attention_4d
    rewritten.recompile()
    return rewritten.train(model.training)


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, what: str = "float",
                  output_name: str = "logits") -> onnx.ModelProto:
    """Export ``model`` with a dynamic batch dimension at opset 21, weights inline, without
    per-node debug metadata; its one output is named ``output_name`` (a classifier's ``logits``,
    a detector's ``output0`` as YOLO exports name it). Attention on more than 4 dims is exported
    as its 4-D equivalent (:func:`attention_4d`)."""
    model = _with_4d_attention(model)
    table = {torch.ops.fqexport.act_qdq.default: act_qdq_onnx}
    if example.dim() > 0 and example.shape[0] == 1:
        # torch.export specialises a dimension whose example size is 1: a batch-1 example would
        # bake batch 1 into reshapes while the input still declares a dynamic batch
        example = torch.cat([example, example])
    sink = io.StringIO()
    # torch.onnx warns once per process that torchvision ops are not registered: not ours (the
    # logger's own level is restored after: a caller's logging setup is theirs)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with GLOBAL_STATE_LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=OPSET,
                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), input_names=["input"],
                output_names=[output_name], custom_translation_table=table, verbose=False,
            )
    except Exception as err:
        _reraise_interrupt(err)
        raise ExportError(MSG_TORCH_EXPORT.format(what=what, err=_root_cause(err))) from err
    finally:
        registration.setLevel(level)
    proto = program.model_proto
    strip_debug_info(proto)
    name_batch_dim(proto)
    return proto


BATCH_DIM = "batch"


def name_batch_dim(model: onnx.ModelProto, name: str = BATCH_DIM) -> None:
    """Call the input's dynamic first dimension ``name`` wherever it appears (inputs, outputs,
    value_info; in expressions such as ``2*s77`` too) instead of torch.export's symbol
    (``s77``), which a user would see in the file, in Netron and in shape errors."""
    dims = model.graph.input[0].type.tensor_type.shape.dim if len(model.graph.input) else []
    symbol = dims[0].dim_param if len(dims) and dims[0].HasField("dim_param") else ""
    if not symbol or symbol == name:
        return
    word = re.compile(rf"\b{re.escape(symbol)}\b")
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for d in info.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and word.search(d.dim_param):
                d.dim_param = word.sub(name, d.dim_param)


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node debug metadata (stack traces, fx node names) that torch.onnx records.

    On the demo CNN it was a third of a W8A8 file (45 KB of 139 KB).
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.graph.doc_string = ""


def set_opset(model: onnx.ModelProto, opset: int) -> None:
    """Set the default-domain opset (and the IR version it needs: 13 from opset 25) and import ``com.microsoft`` when a
    node uses it."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        imp.domain == "com.microsoft" for imp in model.opset_import
    ):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    # the IR version of the first ONNX release with these opsets (opset 25, where INT2 came: IR 13)
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import),
                                                                                ignore_unknown=True))
