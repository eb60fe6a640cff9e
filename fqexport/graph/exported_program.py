"""Make a ``torch.export`` program's module look like an eager model to the pipeline.

``torch.export.load(...).module()`` calls ``aten.conv2d``/``aten.linear``/``aten.batch_norm``
on parameters fetched with ``get_attr``. This pass turns those calls back into
``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm2d`` modules named after their parameters, so BN
folding, layer naming (``layer1.0.conv1``) and quantization work the same for both inputs.

:func:`pt2_unsafe_reason` inspects an archive before torch touches it: whether loading it
would unpickle anything, load compiled code or evaluate a non-arithmetic expression.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx
from torch import nn

from fqexport.errors import ModelLoadError

aten = torch.ops.aten
_JSON_LIMIT = 256 * 2**20  # bytes of one JSON entry read while inspecting an archive


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
