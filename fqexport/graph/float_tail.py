"""The float tail of a model: the ops after its last weight layers.

A detector's box decode (Sigmoid, the grid offset, the anchor/stride Mul, the Concat of the
scales, a DFL softmax) and a segmenter's upsampling of its logits come after the last Conv of
every path to the output. Quantizing them costs the results (ONNX Runtime's own quantize_static
on a YOLOv5s gives every box zero confidence unless the final Mul/Concat are excluded by hand), so
they stay float: a node is in the tail when it depends on the input, is not a weight layer and
no weight layer is reachable from it. :func:`tail_ops` names the tail's ops for the report.

The head convs' own outputs, read only by the tail, stay float too (like a classifier's logits).
Measured on the demo's YOLOv5-style detector (scene task, 400 test images, per-group COCO
mAP@[.5:.95] daylight / low-light, float 39.14 / 18.13; ORT on an AVX2 CPU without VNNI):
outputs float W8A8 38.81 / 17.59, W4A8 37.19 / 16.33; with a uint8 pair on them W8A8 37.95 /
18.31, W4A8 35.82 / 15.78 — a mean over the four of 27.48 vs 26.97 points.
"""

from __future__ import annotations

import torch.fx
from torch import nn

from fqexport.graph.act_quant import INTEGER_KERNEL_LAYERS


def _is_weight_layer(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), INTEGER_KERNEL_LAYERS)


def float_tail(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The input-dependent nodes of ``gm`` that are not weight layers and reach no weight layer
    (the output node included)."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    dependent: set[torch.fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    reaches: set[torch.fx.Node] = set()
    for node in reversed(nodes):
        if any(_is_weight_layer(u, modules) or u in reaches for u in node.users):
            reaches.add(node)
    return {n for n in nodes if n in dependent and n.op != "placeholder" and n not in reaches
            and not _is_weight_layer(n, modules)}


def _op_name(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def tail_ops(gm: torch.fx.GraphModule, tail: set[torch.fx.Node]) -> tuple[str, ...]:
    """``"name (op)"`` of each op of ``tail`` in graph order (the output node left out)."""
    modules = dict(gm.named_modules())
    return tuple(f"{n.name} ({_op_name(n, modules)})" for n in gm.graph.nodes if n in tail and n.op != "output")


# A classifier head that normalises its logits inside the model (probabilities, log-probabilities)
_NORMALISERS = {"softmax", "log_softmax", "sigmoid"}
_NORMALISER_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)


def normalised_output_tail(gm: torch.fx.GraphModule) -> set[torch.fx.Node] | None:
    """The float tail (:func:`float_tail`) when it holds a softmax, log_softmax or sigmoid (a
    classifier that returns probabilities): its logits then stay float before it, as a plain
    classifier's do; else None (the output alone stays float)."""
    tail = float_tail(gm)
    modules = dict(gm.named_modules())

    def normalises(n: torch.fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(modules.get(str(n.target)), _NORMALISER_MODULES)
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        return n.op in ("call_method", "call_function") and name in _NORMALISERS

    return tail if any(normalises(n) for n in tail) else None
