"""The gate's test data: read it, and check that it fits the model before any number is trusted.

Each mismatch is a :class:`~fqexport.errors.DataError` naming the data source, the model and the
fix; what a session's outputs must look like is the task's
(:meth:`fqexport.tasks.base.Task.check_outputs`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from fqexport.calibration.checks import check_vocabulary
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.calibration.stream import DataStream
from fqexport.errors import DataError

log = logging.getLogger(__name__)

MSG_SHAPE = (
    "data {source}: x has shape {got} per sample but model {model} expects input {expected} "
    "(batch first); give data matching the model's input"
)
MSG_RANK = (
    "data {source}: x has {got} dims per sample but model {model} expects input {expected}"
)
MSG_EMPTY = "data {source} holds no samples"
MSG_INT_X_FLOAT_INPUT = (
    "{source}: field 'x' holds integers ({dtype}), which fqexport keeps as token ids, but {model} takes "
    "{input_type}: the values go in as floats unscaled; if they are pixels or features, save x as float32 "
    "(scaled as the model was trained)"
)
MSG_FRACTIONAL_IDS = (
    "{source}: field 'x' holds the non-integer value {value} ({dtype}), but {model} takes {input_type}: token "
    "ids, which ONNX Runtime would get truncated; store the ids as integers (e.g. x.astype(np.int64))"
)
MSG_EMPTY_GROUP = (
    "data {source}: group {name!r} (id {gid}) has no samples; every group must be present to "
    "validate per group (drop it from group_names or add samples)"
)

MSG_ABSENT_GROUPS = (
    "data {source}: no samples of group(s) {absent}, which {model} was calibrated on (its metadata's group_names: "
    "{calibrated}): no per-group figure covers them, and every per-group limit fails; add their test samples"
)
MSG_OTHER_GROUPS = (
    "data {source}: its groups ({test}) share no name with those {model} was calibrated on ({calibrated}); the "
    "per-group figures are the test data's groups (to compare with the calibration's, name them alike: group_names)"
)


def read_test_data(data: GroupData | DataStream | str | Path | Any) -> GroupData | DataStream:
    """What ``load_data`` reads from ``data``: a GroupData re-checked (NaN/inf, group names, labels)
    as ``compress`` checks it, a DataStream itself, or the file or source it names (a CSV
    manifest, a Dataset or a DataLoader stream batch by batch)."""
    if isinstance(data, DataStream):
        return data
    return load_data(str(data) if isinstance(data, Path) else data)


def absent_groups(data: GroupData | DataStream, calibrated: Sequence[str], model: str) -> tuple[str, ...]:
    """The groups ``model`` was calibrated on (``calibrated``: its metadata's group_names) that the
    test data lacks, each warned about; () when it lacks none, or when the two name their groups
    differently (another grouping, or ids without names: warned about too)."""
    if not calibrated:
        return ()
    test = [str(n) for n in data.group_names]
    names = lambda groups: ", ".join(repr(g) for g in groups)  # noqa: E731
    if not set(test) & set(calibrated):
        log.warning(MSG_OTHER_GROUPS.format(source=data.source, test=names(test), model=model,
                                            calibrated=names(calibrated)))
        return ()
    absent = tuple(g for g in calibrated if g not in test)
    if absent:
        log.warning(MSG_ABSENT_GROUPS.format(source=data.source, absent=names(absent), model=model,
                                             calibrated=names(calibrated)))
    return absent


def _shape_text(expected: Sequence[Any]) -> str:
    """``[batch, 1, 6, 6]``: a model input shape, symbolic dims by name (``?`` when unnamed)."""
    return "[" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in expected) + "]"


def check_data(data: GroupData | DataStream, model: str, expected: Sequence[Any], input_type: str | None = None) -> None:
    """DataError when ``data`` cannot be fed to a model with input shape ``expected``; a warning
    when integer x (read as token ids) goes to a float input (``input_type``, ORT's
    ``"tensor(float)"``): those are pixel values or features that were stored as integers."""
    if len(data) == 0:
        raise DataError(MSG_EMPTY.format(source=data.source))
    if input_type is not None and input_type.startswith(("tensor(float", "tensor(double")):
        first = data.take(np.arange(1)).x
        if np.issubdtype(first.dtype, np.signedinteger):
            log.warning(MSG_INT_X_FLOAT_INPUT.format(source=data.source, model=model, dtype=first.dtype,
                                                     input_type=input_type))
    elif input_type is not None and input_type.startswith("tensor(int"):
        # the values checked: all of them in memory, the first sample of a stream
        x = data.x if isinstance(data, GroupData) else data.take(np.arange(1)).x
        if np.issubdtype(x.dtype, np.floating) and x.size and not np.array_equal(x, np.round(x)):
            value = f"{x[x != np.round(x)].flat[0].item():.6g}"
            raise DataError(MSG_FRACTIONAL_IDS.format(source=data.source, value=value, dtype=x.dtype, model=model,
                                                      input_type=input_type))
    got = tuple(data.sample_shape)
    exp = tuple(expected[1:])
    if len(got) != len(exp):
        raise DataError(MSG_RANK.format(source=data.source, got=len(got), model=model, expected=_shape_text(expected)))
    for g, e in zip(got, exp):
        if isinstance(e, int) and e > 0 and g != e:
            raise DataError(MSG_SHAPE.format(source=data.source, got=list(got), model=model, expected=_shape_text(expected)))
    counts = data.group_counts()
    for gid, name in enumerate(data.group_names):
        if counts[gid] == 0:
            raise DataError(MSG_EMPTY_GROUP.format(source=data.source, name=name, gid=gid))
    if isinstance(data, GroupData) and Path(model).is_file() and (
            np.issubdtype(data.x.dtype, np.integer) or (input_type or "").startswith("tensor(int")):  # whole floats, checked above
        for node, vocab in embedding_vocabularies(model):
            check_vocabulary(data, vocab, node)


def embedding_vocabularies(path: str | Path) -> list[tuple[str, int]]:
    """(table, rows) of each Gather that looks the model input up in a table (``emb`` for the
    table ``emb.weight`` an exported Embedding keeps its layer's name in): its indices
    are the input (through Casts), its table an initializer, or the Cast / DequantizeLinear of
    one (an exported Embedding, int8 or INT4). ONNX Runtime rejects an index outside [-rows, rows) with a bare
    INVALID_ARGUMENT; checked first, the data error names the table and the bound."""
    graph = onnx.load(str(path), load_external_data=False).graph
    rows = {t.name: int(t.dims[0]) for t in graph.initializer if len(t.dims)}
    ids = {graph.input[0].name} if len(graph.input) else set()
    for node in graph.node:  # topological order: a table's Cast/DequantizeLinear come before its Gather
        if node.op_type in ("Cast", "Identity", "DequantizeLinear") and node.input[0] in rows:
            rows[node.output[0]] = rows[node.input[0]]
        if node.op_type in ("Cast", "Identity") and node.input[0] in ids:
            ids.add(node.output[0])
    axis = lambda n: next((a.i for a in n.attribute if a.name == "axis"), 0)  # noqa: E731
    return [(n.input[0].removesuffix(".weight"), rows[n.input[0]]) for n in graph.node
            if n.op_type == "Gather" and n.input[1] in ids and n.input[0] in rows and axis(n) == 0]
