"""Make a ``torch.export`` program's module look like an eager model to the pipeline.

``torch.export.load(...).module()`` calls ``aten.conv1d``/``aten.conv2d``/``aten.conv_transpose2d``/
``aten.linear``/``aten.embedding``/``aten.batch_norm`` on parameters fetched with ``get_attr``. This
pass turns those calls back into ``nn.Conv1d``/``nn.Conv2d``/``nn.ConvTranspose2d``/``nn.Linear``/
``nn.Embedding``/``nn.BatchNorm{1,2,3}d`` modules (the layer kinds of ``graph/prepare.py``) named after
their parameters, so BN folding, layer naming (``layer1.0.conv1``) and quantization work the same for
both inputs. A BatchNorm's class follows the rank of its input (``[N, C]``/``[N, C, L]``: 1d,
``[N, C, H, W]``: 2d, ``[N, C, D, H, W]``: 3d). A call stays an aten op (a float layer, as its
functional form is on the factory path) when its weight is computed rather than a parameter, when the
parameter has another use (a tied weight, an ``embedding_renorm_`` of ``max_norm``), or when a
BatchNorm uses batch statistics or its input rank is unknown.

:func:`pt2_unsafe_reason` inspects an archive before torch touches it: whether loading it
would unpickle anything, load compiled code or evaluate a non-arithmetic expression.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from fqexport.errors import ModelLoadError

aten = torch.ops.aten
_JSON_LIMIT = 256 * 2**20  # bytes of one JSON entry read while inspecting an archive


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
    setattr(parent, parts[-1], module)
    return name


def _args(node: torch.fx.Node) -> list:
    """Every argument of an aten call, positional, from its schema (kwargs and defaults filled in)."""
    out = []
    for i, arg in enumerate(node.target._schema.arguments):
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


def _param_targets(node: torch.fx.Node, indices: tuple[int, ...]) -> tuple[str | None, ...]:
    """The ``get_attr`` targets of the arguments a lifted module takes over (None: absent)."""
    args = _args(node)
    return tuple(str(args[i].target) if isinstance(args[i], torch.fx.Node) else None for i in indices)


def _lift_name(gm: torch.fx.GraphModule, graph: torch.fx.Graph, nodes: list, targets: set[str], taken: set[str]) -> str:
    """The module's name: the parameters' owner (``layer1.0.conv1``) when the program reads nothing
    else of it, else a fresh one after the first call (``linear_1``)."""
    first = next(t for t in _param_targets(nodes[0], _LIFT[nodes[0].target][2]) if t is not None)
    owner = _owner(first)
    if "." in first and owner not in taken:
        group = set(nodes)
        others = {str(n.target) for n in graph.nodes
                  if (n.op == "get_attr" and any(u not in group for u in n.users)) or n.op == "call_module"}
        if not any(t == owner or t.startswith(owner + ".") for t in others - targets):
            return owner
    base = re.sub(r"\W", "_", nodes[0].name)
    name, i = base, 0
    while hasattr(gm, name) or name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def lift_exported_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite aten conv/linear/embedding/batch_norm calls into module calls; return a plain GraphModule.

    Calls sharing their parameters become calls of one module when they are the same layer (a conv
    called twice), and stay aten calls otherwise (a weight tied between an Embedding and a Linear);
    a parameter read by anything else keeps its calls as they are too.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            graph.erase_node(node)
    # Build every candidate's module first, against the untouched program.
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
    for n in graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(str(n.target), set()).update(n.users)
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for node, (_, key) in built.items():
        groups.setdefault(key, []).append(node)
    taken: set[str] = set()
    for key, nodes in groups.items():
        targets = {t for t in key[2] if t is not None}
        if not targets or any(readers.get(t, set()) - set(nodes) for t in targets):
            continue
        name = _lift_name(gm, graph, nodes, targets, taken)
        taken.add(name)
        _set_module(gm, name, built[nodes[0]][0])
        for node in nodes:
            with graph.inserting_before(node):
                new = graph.call_module(name, (_args(node)[_LIFT[node.target][1]],))
            new.meta.update(node.meta)  # the recorded output (meta["val"]) for later passes
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


# --------------------------------------------------------------------------- archive inspection
# torch.export.load unpickles (runs code from the file) when an archive holds: a weight or
# constant marked ``use_pickle``, a custom/opaque object constant, a legacy ``<model>.pt``
# weights/constants file, sample inputs that torch.load(weights_only=True) rejects (it then
# retries with weights_only=False), or the pre-2.8 zip layout. It loads compiled code from
# ``data/aotinductor/`` and evaluates every symbolic-shape ``expr_str`` with sympy.sympify
# (Python eval). Nothing of it may run unless the user trusts the file.

MSG_PT2_UNSAFE = (
    "{path}: refusing to load this .pt2 without --trust-pickle: {reason}, which runs code from the "
    "file when torch.export.load reads it; pass --trust-pickle (API: trust_pickle=True) only for a "
    "file you trust, or re-save the program with torch.export.save from plain tensor weights"
)
MSG_PT2_NOT_ZIP = "{path}: not a torch.export .pt2 archive ({detail}); write it with torch.export.save"

_ASSUMPTIONS = frozenset({
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero",
    "nonzero", "even", "odd", "rational", "commutative", "extended_real", "infinite",
})
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Mul", "Add", "Pow", "Mod", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "floor", "ceiling", "sqrt", "oo",
    "True", "False", "None", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "OpaqueUnaryFn_sqrt", "Identity",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor", "Piecewise",
})
_SYMBOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SAFE_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Compare,
    ast.BoolOp, ast.keyword, ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.Tuple,
)


def _safe_sym_expr(text: str) -> bool:
    """True when ``text`` is a plain symbolic-shape expression sympify cannot turn into code."""
    if len(text) > 2000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_NODES):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES):
            return False
        if isinstance(node, ast.Name) and node.id not in _SYMPY_NAMES and not re.fullmatch(r"[a-z]+[0-9]+", node.id):
            return False
        if isinstance(node, ast.keyword) and node.arg not in _ASSUMPTIONS:
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _SYMBOL_NAME.match(node.value):
            return False
        if isinstance(node, ast.Constant) and not isinstance(node.value, (str, int, float, bool, type(None))):
            return False
    return True


def _unsafe_exprs(obj: Any) -> Iterator[str]:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "expr_str" and not (isinstance(v, str) and _safe_sym_expr(v)):
                    yield str(v)[:60]
                else:
                    stack.append(v)
        elif isinstance(o, list):
            stack.extend(o)


def _sample_inputs_load_safely(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # anything weights_only refuses, torch would unpickle
        return False
    return True


def pt2_unsafe_reason(path: str | Path) -> str | None:
    """Why ``torch.export.load(path)`` would run code from the file, or None when it would not.

    Reads only the zip directory, the JSON configs and the sample inputs (with
    ``weights_only=True``); raises :class:`ModelLoadError` when ``path`` is not a zip archive.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelLoadError(MSG_PT2_NOT_ZIP.format(path=path, detail=err)) from err
    with zf:
        entries = {}
        for info in zf.infolist():
            _, _, rel = info.filename.partition("/")
            entries[rel or info.filename] = info
        if entries.get("archive_format") is None or zf.read(entries["archive_format"]).strip() != b"pt2":
            return "it is not in the current pt2 archive layout (the legacy layout is read with pickle)"
        for rel in entries:
            if rel.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
                return f"it holds compiled code ({rel})"
            if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".pt"):
                return f"it holds a pickled legacy weights/constants file ({rel})"
        try:
            for rel, info in entries.items():
                if rel.endswith(("_weights_config.json", "_constants_config.json")):
                    if info.file_size > _JSON_LIMIT:
                        return f"its config {rel} is larger than {_JSON_LIMIT} bytes"
                    config = json.loads(zf.read(info)).get("config", {})
                    for name, meta in config.items():
                        if meta.get("use_pickle"):
                            return f"{'weight' if 'weights' in rel else 'constant'} {name!r} is pickled (use_pickle in {rel})"
                        if str(meta.get("path_name", "")).startswith(("custom_obj_", "opaque_obj_")):
                            return f"constant {name!r} is a pickled object ({meta.get('path_name')})"
                elif rel.startswith("models/") and rel.endswith(".json"):
                    if info.file_size > _JSON_LIMIT:
                        return f"its program {rel} is larger than {_JSON_LIMIT} bytes"
                    bad = next(_unsafe_exprs(json.loads(zf.read(info))), None)
                    if bad is not None:
                        return f"its program {rel} holds a symbolic expression that is not plain arithmetic ({bad!r})"
                elif rel.startswith("data/sample_inputs/") and not _sample_inputs_load_safely(zf.read(info)):
                    return f"its sample inputs {rel} are not plain tensors (torch would unpickle them)"
        except (ValueError, AttributeError, zipfile.BadZipFile, OSError, RecursionError) as err:
            raise ModelLoadError(MSG_PT2_NOT_ZIP.format(path=path, detail=f"unreadable entry: {err}")) from err
    return None
