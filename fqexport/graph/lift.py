"""Turn functional weight calls on parameters into the modules fqexport quantizes.

A graph may call a layer's op on its parameters instead of the layer: ``torch.export`` programs
call ``aten.conv2d``/``aten.linear``/... on ``get_attr`` parameters, and fx traces into a module
whose forward is its own (a ``F.linear(x, self.weight)`` projection, timm's weight-standardised
``StdConv2d``). :func:`fold_computed_weights` evaluates a weight computed from parameters alone
(standardisation, a scale, a reshape) once into a constant, as inference sees it, and
:func:`lift_weight_calls` turns a call on a parameter or such a constant into an ``nn.Conv1d``/
``nn.Conv2d``/``nn.ConvTranspose2d``/``nn.Linear``/``nn.Embedding``/``nn.BatchNorm{1,2,3}d``
module named after its parameters (``layer1.0.conv1``), so BN folding, naming and quantization work
as for the module. A call stays as it is (a float layer, named by ``float_layers``) when its
weight depends on the input, when the parameter has another use (a tied weight, an
``embedding_renorm_`` of ``max_norm``), or when a BatchNorm uses batch statistics or its input
rank is unknown.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten
log = logging.getLogger(__name__)

class _Keep(Exception):
    """This call is left as it is (an aten op): no module reproduces it exactly."""


def _attr(gm: torch.fx.GraphModule, node, required: bool = False) -> torch.Tensor | None:
    """The parameter or buffer a ``get_attr`` node fetches (None for an absent optional one)."""
    if node is None and not required:
        return None
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise _Keep  # a computed weight (weight standardisation, a parametrization...)
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, torch.Tensor):
        raise _Keep
    return obj


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else target


def _set_module(gm: torch.fx.GraphModule, name: str, module: nn.Module) -> str:
    parent = gm
    parts = name.split(".")
    for part in parts[:-1]:
        parent = getattr(parent, part)
    if isinstance(getattr(parent, parts[-1], None), torch.Tensor):  # the parameter the module takes over
        delattr(parent, parts[-1])
    setattr(parent, parts[-1], module)
    return name


# A traced torch-level call takes the arguments of an aten op, by the same names and in the same order.
_TORCH_SCHEMA = {F.conv1d: aten.conv1d.default, F.conv2d: aten.conv2d.default,
                 F.conv_transpose2d: aten.conv_transpose2d.input, F.linear: aten.linear.default}


def _args(node: torch.fx.Node) -> list:
    """Every argument of an aten (or torch-level) call, positional, from its schema (kwargs and
    defaults filled in)."""
    out = []
    op = _TORCH_SCHEMA.get(node.target, node.target)
    for i, arg in enumerate(op._schema.arguments):
        if i < len(node.args):
            out.append(node.args[i])
        elif arg.name in node.kwargs:
            out.append(node.kwargs[arg.name])
        elif arg.has_default_value():
            out.append(arg.default_value)
        else:
            raise _Keep
    return out


def _ints(v, n: int, default: int) -> tuple[int, ...]:
    """An ``int[n]`` argument (a scalar or a 1-list is broadcast, as aten does) as an n-tuple."""
    if v is None:
        return (default,) * n
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(v) == 1:
        v = v * n
    if len(v) != n or not all(isinstance(i, int) for i in v):
        raise _Keep
    return tuple(int(i) for i in v)


def _with_params(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    module.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone())
    return module


def _conv(cls: type[nn.Module], ndim: int) -> Callable:
    """``aten.conv{ndim}d`` (``.default``, or ``.padding`` with "same"/"valid") → ``cls``."""

    def build(gm, node) -> nn.Module:
        _, w, b, stride, padding, dilation, groups = _args(node)
        weight, bias = _attr(gm, w, required=True), _attr(gm, b)
        if weight.dim() != ndim + 2:
            raise _Keep
        groups = int(groups)
        try:
            conv = cls(
                weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=_ints(stride, ndim, 1),
                padding=padding if isinstance(padding, str) else _ints(padding, ndim, 0),
                dilation=_ints(dilation, ndim, 1), groups=groups, bias=bias is not None,
            )
        except ValueError as err:  # e.g. padding="same" with a stride: aten refuses it too
            raise _Keep from err
        return _with_params(conv, weight, bias)

    return build


def _conv_transpose2d(gm, node) -> nn.Module:
    _, w, b, stride, padding, output_padding, groups, dilation = _args(node)
    weight, bias = _attr(gm, w, required=True), _attr(gm, b)
    if weight.dim() != 4:
        raise _Keep
    groups = int(groups)
    try:
        conv = nn.ConvTranspose2d(
            weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]), stride=_ints(stride, 2, 1),
            padding=_ints(padding, 2, 0), output_padding=_ints(output_padding, 2, 0), groups=groups,
            bias=bias is not None, dilation=_ints(dilation, 2, 1),
        )
    except ValueError as err:
        raise _Keep from err
    return _with_params(conv, weight, bias)


def _linear(gm, node) -> nn.Module:
    _, w, b = _args(node)
    weight, bias = _attr(gm, w, required=True), _attr(gm, b)
    if weight.dim() != 2:
        raise _Keep
    return _with_params(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), weight, bias)


def _embedding(gm, node) -> nn.Module:
    w, _, padding_idx, scale_grad_by_freq, sparse = _args(node)
    weight = _attr(gm, w, required=True)
    if weight.dim() != 2:
        raise _Keep
    # F.embedding hands aten a non-negative padding_idx, or -1 for none; it only masks gradients
    padding_idx = int(padding_idx) if padding_idx is not None and int(padding_idx) >= 0 else None
    return nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx,
                        scale_grad_by_freq=bool(scale_grad_by_freq), sparse=bool(sparse),
                        _weight=weight.detach().clone())


def _rank(node) -> int | None:
    """The rank of the tensor ``node`` computes, from the metadata torch.export records."""
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return len(shape) if shape is not None else None


_BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _batchnorm(gm, node) -> nn.Module:
    x, w, b, mean, var, training, _momentum, eps, _cudnn = _args(node)
    if training:  # batch statistics (train mode, or track_running_stats=False): not a fixed affine map
        raise _Keep
    mean, var = _attr(gm, mean, required=True), _attr(gm, var, required=True)
    weight, bias = _attr(gm, w), _attr(gm, b)
    cls = _BN_BY_RANK.get(_rank(x))
    if cls is None or mean.dim() != 1:
        raise _Keep
    affine = weight is not None or bias is not None
    bn = cls(mean.shape[0], eps=float(eps), affine=affine)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if affine:
            bn.weight.copy_(weight if weight is not None else torch.ones_like(mean))
            bn.bias.copy_(bias if bias is not None else torch.zeros_like(mean))
    return bn.eval()


# aten op → (module builder, the argument the module is called on, the arguments it takes over)
_LIFT: dict[Any, tuple[Callable, int, tuple[int, ...]]] = {
    aten.conv1d.default: (_conv(nn.Conv1d, 1), 0, (1, 2)),
    aten.conv1d.padding: (_conv(nn.Conv1d, 1), 0, (1, 2)),
    aten.conv2d.default: (_conv(nn.Conv2d, 2), 0, (1, 2)),
    aten.conv2d.padding: (_conv(nn.Conv2d, 2), 0, (1, 2)),
    aten.conv_transpose2d.input: (_conv_transpose2d, 0, (1, 2)),
    aten.linear.default: (_linear, 0, (1, 2)),
    aten.embedding.default: (_embedding, 1, (0,)),
    aten.batch_norm.default: (_batchnorm, 0, (1, 2, 3, 4)),
}
_LIFT.update({fn: _LIFT[op] for fn, op in _TORCH_SCHEMA.items()})


def _param_targets(node: torch.fx.Node, indices: tuple[int, ...]) -> tuple[str | None, ...]:
    """The ``get_attr`` targets of the arguments a lifted module takes over (None: absent)."""
    args = _args(node)
    return tuple(str(args[i].target) if isinstance(args[i], torch.fx.Node) else None for i in indices)


def _lift_name(gm: torch.fx.GraphModule, graph: torch.fx.Graph, nodes: list, targets: set[str], taken: set[str]) -> str:
    """The module's name: the layer its parameters belong to (``layer1.0.conv1``, :func:`layer_owner`)
    when the graph reads nothing else of it, else the weight parameter's own path
    (``blocks.0.attn.w_q``: one of several functional projections of a module), else a fresh one
    after the first of those (``w_1``) or after the call (``linear_1``). A folded weight asks for
    the name of the layer it was computed from."""
    first = next(t for t in _param_targets(nodes[0], _LIFT[nodes[0].target][2]) if t is not None)
    hint = getattr(gm, _HINTS, {}).get(first)
    names = [hint] if hint is not None else ([layer_owner(first)] if "." in first else []) + [first]
    group = set(nodes)
    others = {str(n.target) for n in graph.nodes
              if (n.op == "get_attr" and any(u not in group for u in n.users)) or n.op == "call_module"} - targets

    def free(name: str) -> bool:
        return name not in taken and not any(t == name or t.startswith(name + ".") for t in others)

    for name in names:
        if free(name):
            return name
    base = re.sub(r"\W", "_", names[0] if hint is not None else nodes[0].name)
    name, i = base, 0
    while hasattr(gm, name) or name in taken or not free(name):
        i += 1
        name = f"{base}_{i}"
    return name


def _parameter_args(node: torch.fx.Node) -> list[tuple[int, str, Any]]:
    """``(position, name, value)`` of the parameter arguments (weight, bias) of a liftable conv/
    linear/embedding call; empty for anything else (a BatchNorm's statistics are not folded)."""
    if node.op != "call_function" or node.target not in _LIFT or node.target is aten.batch_norm.default:
        return []
    schema = _TORCH_SCHEMA.get(node.target, node.target)._schema.arguments
    out = []
    for i in _LIFT[node.target][2]:
        name = schema[i].name
        out.append((i, name, node.args[i] if i < len(node.args) else node.kwargs.get(name)))
    return out


def _parameter_ancestry(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes ``node`` is computed from, when they start at parameters or buffers only (no
    graph input): those that compute a weight (standardisation, a scale, a reshape) rather than
    an activation. None when the input reaches it or no parameter does."""
    seen: dict[torch.fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op in ("placeholder", "output"):
            return None
        seen[n] = None
        stack.extend(n.all_input_nodes)
    if not any(n.op == "get_attr" for n in seen):
        return None
    return list(seen)


def parameter_weight_leaves(node: torch.fx.Node) -> list[str]:
    """The ``get_attr`` targets a weight argument is fetched or computed from (empty: it is no
    parameter's, e.g. an activation multiplied by another)."""
    if not isinstance(node, torch.fx.Node):
        return []
    if node.op == "get_attr":
        return [str(node.target)]
    nodes = _parameter_ancestry(node)
    return [] if nodes is None else [str(n.target) for n in nodes if n.op == "get_attr"]


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


FOLDED_PREFIX = "_fqexport_folded_"  # the top-level buffers a folded weight or bias is kept in
_HINTS = "_fqexport_layer_names"  # GraphModule attribute: folded buffer -> the layer name it asks for


def layer_owner(target: str) -> str:
    """The layer a parameter belongs to: its owner (``blocks.0.proj`` of ``blocks.0.proj.weight``),
    above a parametrization's container (``c1`` of ``c1.parametrizations.weight.original0``); the
    parameter itself at the top level."""
    return target.split(".parametrizations.")[0] if ".parametrizations." in target else _owner(target)


def fold_computed_weights(gm: torch.fx.GraphModule) -> list[str]:
    """Replace each weight or bias computed from parameters alone (``F.conv2d(x, standardise(self.weight))``)
    by a constant holding its value, fetched with ``get_attr``; return the layers' names.

    The constants are top-level buffers (the user's modules, which fx shares, are not written to),
    each with the layer name :func:`lift_weight_calls` should give its call: the owner of the
    weight's parameter (``layer1.0.conv1``; ``c1`` above a parametrization)."""
    graph = gm.graph
    interp = torch.fx.Interpreter(gm)
    order = {n: i for i, n in enumerate(graph.nodes)}
    hints: dict[str, str] = getattr(gm, _HINTS, {})
    folded: list[str] = []
    for node in list(graph.nodes):
        args = _parameter_args(node)
        if not args or not isinstance(args[0][2], torch.fx.Node):
            continue
        weight_leaves = parameter_weight_leaves(args[0][2])
        if not weight_leaves:  # the weight depends on the input (a dynamic conv): the model's op
            continue
        leaf = next((t for t in weight_leaves if t.rsplit(".", 1)[-1] == "weight"), weight_leaves[0])
        layer = layer_owner(leaf)
        for _, name, arg in args:  # the weight, then the bias (BEiT's cat(q_bias, 0, v_bias))
            if not isinstance(arg, torch.fx.Node) or arg.op == "get_attr":
                continue
            value = _evaluate(interp, arg, order)
            if value is None:
                continue
            target = _free_name(gm, f"{FOLDED_PREFIX}{len(hints)}")
            gm.register_buffer(target, value)
            hints[target] = layer
            with graph.inserting_before(node):
                fetched = graph.get_attr(target)
            node.replace_input_with(arg, fetched)
            folded.append(f"{layer}.{name}")
    if folded:
        setattr(gm, _HINTS, hints)
        graph.eliminate_dead_code()
    return folded


def _evaluate(interp: torch.fx.Interpreter, node: torch.fx.Node, order: dict) -> torch.Tensor | None:
    """The value of ``node`` when it is computed from parameters alone; None otherwise."""
    nodes = _parameter_ancestry(node)
    if nodes is None:
        return None
    try:
        with torch.no_grad():
            for n in sorted(nodes, key=order.__getitem__):
                if n not in interp.env:
                    interp.env[n] = interp.run_node(n)
    except Exception as err:  # noqa: BLE001 (not computable on its own: the call stays, a float layer)
        log.debug("%s not folded: %s", node.name, err)
        return None
    value = interp.env[node]
    return value.detach().clone() if isinstance(value, torch.Tensor) else None


def lift_weight_calls(gm: torch.fx.GraphModule) -> list[str]:
    """Rewrite conv/linear/embedding/batch_norm calls on parameters into module calls (in place);
    return the modules' names.

    Calls sharing their parameters become calls of one module when they are the same layer (a conv
    called twice), and stay calls otherwise (a weight tied between an Embedding and a Linear);
    a parameter read by anything else keeps its calls as they are too.
    """
    graph = gm.graph
    # Build every candidate's module first, against the untouched graph.
    built: dict[torch.fx.Node, tuple[nn.Module, tuple]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _LIFT:
            continue
        build, _, params = _LIFT[node.target]
        try:
            module = build(gm, node)
        except _Keep:
            continue
        built[node] = (module, (type(module), repr(module), _param_targets(node, params)))
    # Group calls by (module, parameters); a group is lifted only when it is every reader of them.
    readers: dict[str, set[torch.fx.Node]] = {}
    fetches: dict[str, list[torch.fx.Node]] = {}
    called: list[torch.fx.Node] = []
    for n in graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(str(n.target), set()).update(n.users)
            fetches.setdefault(str(n.target), []).append(n)
        elif n.op == "call_module":
            called.append(n)
    for target, users in readers.items():  # a called layer reads its own parameters (an Embedding tied to a head)
        users.update(c for c in called if target.startswith(str(c.target) + "."))
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for node, (_, key) in built.items():
        groups.setdefault(key, []).append(node)
    taken: set[str] = set()
    for key, nodes in groups.items():
        targets = {t for t in key[2] if t is not None}
        if not targets or any(readers.get(t, set()) - set(nodes) for t in targets):
            continue
        if len(nodes) > 1 and nodes[0].target in _TORCH_SCHEMA:
            continue  # one functional weight called twice: a float layer (a module called twice is refused)
        name = _lift_name(gm, graph, nodes, targets, taken)
        taken.add(name)
        _set_module(gm, name, built[nodes[0]][0])
        for node in nodes:
            with graph.inserting_before(node):
                new = graph.call_module(name, (_args(node)[_LIFT[node.target][1]],))
            new.meta.update(node.meta)  # the recorded output (meta["val"]) for later passes
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        for n in (n for t in targets for n in fetches.get(t, ())):  # the module may have replaced their owner
            if not n.users:
                graph.erase_node(n)
    if taken:
        graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
    return sorted(taken)


def dynamic_weight_params(node: Any) -> list[str]:
    """The parameters an input-dependent weight argument is built from by arithmetic (CondConv's
    ``Σ_k a_k(x)·W_k``): the ``get_attr`` targets reached back from ``node`` without passing
    through a layer (a module call, a weight op), which stay float inside the model's op."""
    if not isinstance(node, torch.fx.Node):
        return []
    found: list[str] = []
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            found.append(str(n.target))
        elif n.op in ("call_function", "call_method") and n.target not in _LIFT:
            stack.extend(n.all_input_nodes)
    return found
