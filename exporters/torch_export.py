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

import fqexport.graph.act_quant  # noqa: F401  (registers torch.ops.fqexport.act_qdq)
from fqexport.errors import ExportError
from fqexport.exporters.act_qdq import act_qdq_onnx

OPSET = 21
OPSET_INT2 = 25  # ORT runs DequantizeLinear on INT2 only from opset 25 (IR 11)

MSG_TORCH_EXPORT = "torch.onnx.export failed for the {what} model: {err}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FAILED_NODE = re.compile(r"Error when translating node (%\S+)")


def _root_cause(err: BaseException) -> str:
    """torch.onnx's error in one line: the innermost cause (e.g. ``AssertionError: only 4D
    query, key, and value are supported``) and the graph node it failed on, without the
    exporter's report-filing advice and colour codes."""
    chain, seen = [err], {id(err)}
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
        chain.append(nxt)
        seen.add(id(nxt))
    node = next((m.group(1) for e in chain if (m := _FAILED_NODE.search(str(e)))), None)
    inner = chain[-1]
    text = _ANSI.sub("", str(inner)).strip().splitlines()
    where = f" (at node {node})" if node else ""
    return f"{type(inner).__name__}: {text[0] if text else ''}{where}"


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, what: str = "float",
                  output_name: str = "logits") -> onnx.ModelProto:
    """Export ``model`` with a dynamic batch dimension at opset 21, weights inline, without
    per-node debug metadata; its one output is named ``output_name`` (a classifier's ``logits``,
    a detector's ``output0`` as YOLO exports name it)."""
    table = {torch.ops.fqexport.act_qdq.default: act_qdq_onnx}
    if example.dim() > 0 and example.shape[0] == 1:
        # torch.export specialises a dimension whose example size is 1: a batch-1 example would
        # bake batch 1 into reshapes while the input still declares a dynamic batch
        example = torch.cat([example, example])
    sink = io.StringIO()
    # torch.onnx warns once per process that torchvision ops are not registered: not ours.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=OPSET,
                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), input_names=["input"],
                output_names=[output_name], custom_translation_table=table, verbose=False,
            )
    except Exception as err:
        raise ExportError(MSG_TORCH_EXPORT.format(what=what, err=_root_cause(err))) from err
    proto = program.model_proto
    strip_debug_info(proto)
    return proto


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node debug metadata (stack traces, fx node names) that torch.onnx records.

    On the demo CNN it was a third of a W8A8 file (45 KB of 139 KB).
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.graph.doc_string = ""


def set_opset(model: onnx.ModelProto, opset: int) -> None:
    """Set the default-domain opset (IR >= 11 from opset 25) and import ``com.microsoft`` when a
    node uses it."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        imp.domain == "com.microsoft" for imp in model.opset_import
    ):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    if opset >= 25:
        model.ir_version = max(model.ir_version, 11)
