"""Make a ``torch.export`` program's module look like an eager model to the pipeline.

``torch.export.load(...).module()`` calls ``aten.conv1d``/``aten.conv2d``/``aten.conv_transpose2d``/
``aten.linear``/``aten.embedding``/``aten.batch_norm`` on parameters fetched with ``get_attr``.
:func:`lift_exported_modules` turns those calls back into the modules of ``graph/prepare.py``
(graph/lift.py, the pass an eager model's trace goes through too), so BN folding, layer naming
(``layer1.0.conv1``) and quantization work the same for both inputs, and returns a plain
GraphModule.

:func:`pt2_unsafe_reason` inspects an archive before torch touches it: whether loading it
would unpickle anything, load compiled code or evaluate a non-arithmetic expression.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx

from fqexport.errors import ModelLoadError
from fqexport.graph.lift import fold_computed_weights, lift_weight_calls

_JSON_LIMIT = 256 * 2**20  # bytes of one JSON entry read while inspecting an archive


def lift_exported_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite aten conv/linear/embedding/batch_norm calls into module calls (graph/lift.py: a
    weight computed from parameters alone is folded first); return a plain GraphModule."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            graph.erase_node(node)
    fold_computed_weights(gm)
    lift_weight_calls(gm)
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
        # by lower-case name: torch's zip reader finds an entry whatever its case
        # (data/Sample_Inputs/model.pt is read as the sample inputs: survey 79)
        entries = {}
        for info in zf.infolist():
            _, _, rel = info.filename.partition("/")
            key = (rel or info.filename).lower()
            if key in entries:
                return f"it holds two entries named {key!r} (up to letter case)"
            entries[key] = info
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
                elif rel.startswith("models/"):  # every entry there is a program to torch, whatever its suffix
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
