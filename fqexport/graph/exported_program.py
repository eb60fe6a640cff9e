"""Make a ``torch.export`` program's module look like an eager model to the pipeline.

``torch.export.load(...).module()`` calls ``aten.conv2d``/``aten.linear``/``aten.batch_norm``
on parameters fetched with ``get_attr``. This pass turns those calls back into
``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm2d`` modules named after their parameters, so BN
folding, layer naming (``layer1.0.conv1``) and quantization work the same for both inputs.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from fqexport.errors import ModelLoadError

aten = torch.ops.aten


def _attr(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise ModelLoadError(f"exported program: expected a parameter, got {node}")
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else target


def _set_module(gm: torch.fx.GraphModule, name: str, module: nn.Module) -> str:
    parent = gm
    parts = name.split(".")
    for part in parts[:-1]:
        parent = getattr(parent, part)
    setattr(parent, parts[-1], module)
    return name


def _pair(v, default) -> tuple[int, int]:
    if v is None:
        return default
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


def _conv(gm, node) -> nn.Module:
    x, w, b, *rest = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = rest[0], rest[1], rest[2], rest[3]
    weight, bias = _attr(gm, w), _attr(gm, b)
    if isinstance(padding, str):
        raise ModelLoadError(f"exported program: conv padding={padding!r} is not supported")
    groups = int(groups or 1)
    conv = nn.Conv2d(
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=_pair(stride, (1, 1)),
        padding=_pair(padding, (0, 0)), dilation=_pair(dilation, (1, 1)), groups=groups, bias=bias is not None,
    )
    conv.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone())
    return conv


def _linear(gm, node) -> nn.Module:
    weight, bias = _attr(gm, node.args[1]), _attr(gm, node.args[2] if len(node.args) > 2 else None)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone())
    return lin


def _batchnorm(gm, node) -> nn.Module:
    args = list(node.args)
    weight, bias, mean, var = (_attr(gm, a) for a in args[1:5])
    eps = float(args[7]) if len(args) > 7 else 1e-5
    bn = nn.BatchNorm2d(mean.shape[0], eps=eps, affine=weight is not None)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if weight is not None:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    return bn.eval()


_LIFT = {
    aten.conv2d.default: (_conv, 1),
    aten.linear.default: (_linear, 1),
    aten.batch_norm.default: (_batchnorm, 1),
}


def lift_exported_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite aten conv2d/linear/batch_norm calls into module calls; return a plain GraphModule."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            graph.erase_node(node)
            continue
        if node.op != "call_function" or node.target not in _LIFT:
            continue
        build, _ = _LIFT[node.target]
        weight_node = node.args[1]
        name = _owner(str(weight_node.target)) if isinstance(weight_node, torch.fx.Node) else node.name
        module = build(gm, node)
        _set_module(gm, name, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    # A single-output program returns a 1-tuple; make it return the tensor.
    out = next(n for n in graph.nodes if n.op == "output")
    if isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional inputs, no pytree specs
    graph.lint()
    # A plain GraphModule: the unlifted program's class forbids .eval()/.train().
    plain = torch.fx.GraphModule(gm, graph)
    plain.meta.update(getattr(gm, "meta", {}))
    return plain
