"""A model that returns raw head maps, with the decode its user names composed after it.

:func:`with_decode` returns a module whose forward is ``decode(model(x))``. fqexport traces,
quantizes and exports it as one graph, so the ONNX file returns the decoded layout (what the
user's NMS reads) and the decode — the ops after the last weight layers — stays float like any
detector's (:mod:`fqexport.graph.float_tail`). :func:`strip_wrapper` gives the traced graph the
model's own layer names (no wrapper prefix), so ``keep_float`` patterns, layer widths and
reports name the user's layers.

``decode`` is a function of the model's output (a tensor, or a tuple/list of head maps) that
returns the decoded tensor, or an ``nn.Module`` that does (its buffers — anchors, grids — travel
with the graph). Either must be traceable by ``torch.fx`` (tensor ops, no data-dependent Python
control flow); shapes fixed at construction (a YOLO export fixes the input size too) export best.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from fqexport.errors import ModelLoadError
from fqexport.graph.targets import graph_module

MSG_DECODE_TYPE = "decode={decode!r} must be a function of the model's outputs or an nn.Module"
MSG_NAME_CLASH = (
    "the decode's attribute {name!r} has the name of the model's own {name!r}; rename it in the decode "
    "(it is composed into the model's graph under its own names)"
)
MSG_HEAD_MAPS = (
    "the model returns {n} feature maps ({shapes}), a detector's raw head outputs: name the decode that turns "
    "them into its output layout (YOLOv5 [N, K, 5 + C] or YOLOv8 [N, 4 + C, K], boxes in pixels) with --decode "
    "package.module:name (API: fqexport.with_decode(model, decode)); docs/tasks.md"
)
WRAPPED = "model"  # the wrapped model's attribute: its prefix in the traced graph


class DecodedModel(nn.Module):
    """``decode(model(x))`` (module docstring); ``decode_name`` names the decode in messages and
    the export's metadata."""

    def __init__(self, model: nn.Module, decode: Callable[[Any], torch.Tensor], decode_name: str) -> None:
        super().__init__()
        self.model = model
        if isinstance(decode, nn.Module):
            self.decode = decode
        else:
            self.decode_fn = decode
        self.decode_name = decode_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decode = self.decode if "decode" in self._modules else self.decode_fn
        return decode(self.model(x))


def with_decode(model: nn.Module, decode: Callable[[Any], torch.Tensor] | nn.Module,
                name: str | None = None) -> DecodedModel:
    """``model`` followed by ``decode`` (module docstring); ``name``: how reports name the decode
    (default: the function's or module class's qualified name)."""
    if not (isinstance(decode, nn.Module) or callable(decode)) or isinstance(decode, type):
        raise ModelLoadError(MSG_DECODE_TYPE.format(decode=decode))
    if name is None:
        kind = decode if not isinstance(decode, nn.Module) else type(decode)
        name = f"{getattr(kind, '__module__', '?')}:{getattr(kind, '__qualname__', type(kind).__name__)}"
    return DecodedModel(model, decode, name)


def leaves(out: Any) -> list[Any]:
    """The items of a (nested) tuple/list output, in order."""
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in leaves(item)]
    return [out]


def is_head_maps(out: Any, input_hw: tuple[int, ...]) -> bool:
    """Whether a model output is raw head maps: a (nested) tuple/list of two or more 4-D tensors,
    none at the input's height and width (a segmenter's logits are)."""
    items = leaves(out)
    return (isinstance(out, (tuple, list)) and len(items) >= 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 and tuple(t.shape[2:]) != tuple(input_hw)
                    for t in items))


def strip_wrapper(gm: torch.fx.GraphModule, class_name: str) -> torch.fx.GraphModule:
    """The traced :class:`DecodedModel` ``gm`` with the wrapped model's modules, parameters and
    buffers under their own names (``model.body.conv`` → ``body.conv``); the decode's keep theirs."""
    prefix = WRAPPED + "."
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.name.startswith(WRAPPED + "_"):
            node._rename(node.name[len(WRAPPED) + 1:])
    return graph_module(gm, gm.graph, class_name,
                        rename=lambda t: t[len(prefix):] if t.startswith(prefix) else t, clash=MSG_NAME_CLASH)
