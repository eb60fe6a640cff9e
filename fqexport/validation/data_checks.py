"""The gate's test data: read it, and check that it fits the model before any number is trusted.

Each mismatch is a :class:`~fqexport.errors.DataError` naming the data source, the model and the
fix; what a session's outputs must look like is the task's
(:meth:`fqexport.tasks.base.Task.check_outputs`).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from fqexport.calibration.checks import MSG_COMPUTED_IDS, check_vocabulary, data_error
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import read_data
from fqexport.calibration.stream import DataStream, ordered_x, shape_origin_note
from fqexport.errors import DataError
from fqexport.exporters.ort_session import fixed_batch, input_dtype

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
    "{source}: field 'x' holds integers, which fqexport keeps as integer token ids, but {model} takes "
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
MSG_UNCALIBRATED_GROUPS = (
    "data {source}: group(s) {extra} were not among the groups {model} was calibrated on (its metadata's "
    "group_names: {calibrated}): their figures are of a group the calibration never saw"
)
MSG_OTHER_GROUPS = (
    "data {source}: its groups ({test}) share no name with those {model} was calibrated on ({calibrated}); the "
    "per-group figures are the test data's groups (to compare with the calibration's, name them alike: group_names)"
)


def read_test_data(data: GroupData | DataStream | str | Path | Any) -> GroupData | DataStream:
    """What ``load_data`` reads from ``data``: a GroupData re-checked (NaN/inf, group names, labels)
    as ``compress`` checks it, a DataStream itself, or the file or source it names (a CSV
    manifest, a Dataset or a DataLoader stream batch by batch)."""
    # an .npz memory-mapped: a test set larger than memory is read batch by batch
    return read_data(str(data) if isinstance(data, Path) else data)


def absent_groups(data: GroupData | DataStream, calibrated: Sequence[str], model: str) -> tuple[str, ...]:
    """The groups ``model`` was calibrated on (``calibrated``: its metadata's group_names) that the
    test data lacks, each warned about; () when it lacks none, or when the two name their groups
    differently (another grouping, or ids without names: warned about too)."""
    return compare_groups(data, calibrated, model)[0]


def _nfc(name: str) -> str:
    # "é" as one code point or as e + a combining accent: the same name on screen
    return unicodedata.normalize("NFC", name)


def compare_groups(data: GroupData | DataStream, calibrated: Sequence[str], model: str,
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibrated groups the test data lacks, test groups not calibrated on), names compared in
    one unicode form and the same ids named two ways ("2" in an .npz of strings, group2 in a CSV
    column of integers) taken as one; ((), ()) when the two share no group (warned: another
    grouping). Each non-empty part is warned about."""
    if not calibrated:
        return (), ()
    test = [str(n) for n in data.group_names]
    names = lambda groups: ", ".join(repr(g) for g in groups)  # noqa: E731
    by_form = {_nfc(c): c for c in calibrated}
    as_calibrated = {t: by_form.get(_nfc(t)) for t in test}
    if not any(as_calibrated.values()):
        ids = {_group_id(g) for g in test}, {_group_id(g) for g in calibrated}
        if None in ids[0] or None in ids[1] or not ids[0] & ids[1]:
            log.warning(MSG_OTHER_GROUPS.format(source=data.source, test=names(test), model=model,
                                                calibrated=names(calibrated)))
            return (), ()
        by_id = {_group_id(c): c for c in calibrated}
        as_calibrated = {t: by_id.get(_group_id(t)) for t in test}
    absent = tuple(g for g in calibrated if g not in as_calibrated.values())
    extra = tuple(t for t, c in as_calibrated.items() if c is None)
    if absent:
        log.warning(MSG_ABSENT_GROUPS.format(source=data.source, absent=names(absent), model=model,
                                             calibrated=names(calibrated)))
    if extra:
        log.warning(MSG_UNCALIBRATED_GROUPS.format(source=data.source, extra=names(extra), model=model,
                                                   calibrated=names(calibrated)))
    return absent, extra


def _group_id(name: str) -> int | None:
    """The integer id a group name stands for: ``"2"`` or ``"group2"`` (how a CSV column's or an
    .npz's unnamed integer ids are named) -> 2; None for another name (``"02"``, ``"A"``)."""
    found = re.fullmatch(r"(?:group)?(0|[1-9][0-9]*)", name)
    return int(found.group(1)) if found else None


def shape_text(expected: Sequence[Any]) -> str:
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
            log.warning(MSG_INT_X_FLOAT_INPUT.format(source=data.source, model=model,
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
        raise DataError(MSG_RANK.format(source=data.source, got=len(got), model=model, expected=shape_text(expected))
                        + shape_origin_note(data))
    for g, e in zip(got, exp):
        if isinstance(e, int) and e > 0 and g != e:
            raise DataError(MSG_SHAPE.format(source=data.source, got=list(got), model=model,
                                             expected=shape_text(expected)) + shape_origin_note(data))
    counts = data.group_counts()
    for gid, name in enumerate(data.group_names):
        if counts[gid] == 0:
            raise DataError(MSG_EMPTY_GROUP.format(source=data.source, name=name, gid=gid))
    if not Path(model).is_file():
        return
    dtype = data.x.dtype if isinstance(data, GroupData) else data.take(np.arange(1)).x.dtype
    vocabularies = (embedding_vocabularies(model) if np.issubdtype(dtype, np.integer)
                    or (input_type or "").startswith("tensor(int") else [])  # whole floats, checked above
    for _, x in _x_chunks(data) if vocabularies else ():  # every id, a stream's (an .npz path's) chunk by chunk
        for node, vocab in vocabularies:
            check_vocabulary(x, data.source, vocab, node)
    check_computed_ids(data, model)


# samples per chunk of a stream read for the id checks
_ID_CHUNK = 8192


def _x_chunks(data: GroupData | DataStream, size: int = _ID_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(first sample's position, x) of ``data`` in order: a GroupData whole, a stream ``size``
    samples at a time."""
    if isinstance(data, GroupData):
        yield 0, data.x
        return
    for start, x in zip(range(0, len(data), size), ordered_x(data, size)):
        yield start, x


def embedding_vocabularies(path: str | Path) -> list[tuple[str, int]]:
    """(table, rows) of each Gather that looks the model input up in a table (``emb`` for the
    table ``emb.weight`` an exported Embedding keeps its layer's name in): its indices
    are the input (through Casts), its table an initializer, or the Cast / DequantizeLinear of
    one (an exported Embedding, int8 or INT4). ONNX Runtime rejects an index outside [-rows, rows) with a bare
    INVALID_ARGUMENT; checked first, the data error names the table and the bound."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [(lookup.table, lookup.rows) for lookup in _table_lookups(graph) if lookup.direct]


@dataclass(frozen=True)
class _Lookup:
    """A Gather (axis 0) of rows of a weight table at indices that depend on the model input."""

    table: str  # the layer: the table's initializer name without ".weight"
    rows: int
    indices: str  # the tensor of ids
    direct: bool  # the ids are the model input itself (through Cast/Identity)


def _table_lookups(graph: onnx.GraphProto) -> list[_Lookup]:
    """Every Gather on axis 0 of an initializer table (or its Cast / DequantizeLinear) whose
    indices the model input determines: the input itself (token ids) or computed from it
    (``emb(x[:, 0].long())``); a computed lookup counts only for a ``*.weight`` table (an Embedding's)."""
    rows = {t.name: (t.name, int(t.dims[0])) for t in graph.initializer if len(t.dims)}  # tensor → (initializer, rows)
    ids = {graph.input[0].name} if len(graph.input) else set()
    dependent = set(ids)
    renormed: set[str] = set()  # tables an Embedding(max_norm=…) rewrote: an Embedding's, whatever its name
    for node in graph.node:  # topological order: a table's Cast/DequantizeLinear come before its Gather
        # ScatterND: Embedding(max_norm=…) renormalises the rows it looks up into a new table
        if node.op_type in ("Cast", "Identity", "DequantizeLinear", "ScatterND") and node.input[0] in rows:
            rows[node.output[0]] = rows[node.input[0]]
            if node.op_type == "ScatterND":
                renormed.add(node.output[0])
        if node.op_type in ("Cast", "Identity") and node.input[0] in ids:
            ids.add(node.output[0])
        if any(i in dependent for i in node.input):
            dependent.update(node.output)
    axis = lambda n: next((a.i for a in n.attribute if a.name == "axis"), 0)  # noqa: E731
    found = []
    for n in graph.node:
        if n.op_type != "Gather" or axis(n) != 0 or n.input[0] not in rows or n.input[1] not in dependent:
            continue
        root, count = rows[n.input[0]]  # an int8 table: "emb.weight_quantized" → DequantizeLinear → "emb.weight"
        direct = n.input[1] in ids
        if direct or n.input[0].endswith(".weight") or root.endswith(".weight"):
            found.append(_Lookup(n.input[0].removesuffix(".weight"), count, n.input[1], direct))
        elif n.input[0] in renormed:  # its initializer renamed by the export: the layer is unnamed here
            found.append(_Lookup(root.removesuffix(".weight") if root.endswith(".weight") else f"(max_norm, {count} rows)",
                                 count, n.input[1], direct))
    return found


def check_computed_ids(data: GroupData | DataStream, path: str | Path, batch_size: int = 256) -> None:
    """DataError (:data:`~fqexport.calibration.checks.MSG_COMPUTED_IDS`) when an Embedding of the
    file looks up, on a sample of ``data``, an id the graph computes from the input
    (``emb(x[:, 0].long())``) outside ``[0, rows)``: ONNX Runtime reads ``[-rows, 0)`` as rows
    from the end with no error (PyTorch raises). Runs only the nodes the ids depend on."""
    lookups = [lk for lk in _table_lookups(onnx.load(str(path), load_external_data=False).graph) if not lk.direct]
    sub = _ids_model(onnx.load(str(path)), [lk.indices for lk in lookups]) if lookups else None
    if sub is None:
        return
    import onnxruntime as ort

    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    name, dtype, fixed = session.get_inputs()[0].name, input_dtype(session), fixed_batch(session)
    bs = fixed or int(batch_size)
    for start, part in ((s + i, x[i:i + bs]) for s, x in _x_chunks(data) for i in range(0, len(x), bs)):
        chunk = np.ascontiguousarray(part, dtype=dtype)
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), dtype)])
        outs = dict(zip((o.name for o in session.get_outputs()), session.run(None, {name: chunk})))
        for lk in lookups:  # by name: two lookups of one id tensor share one output
            ids = np.asarray(outs[lk.indices])
            per_sample = ids.ndim >= 1 and ids.shape[0] == len(chunk)
            flat_bags = not per_sample and ids.ndim == 1 and ids.size and ids.size % len(chunk) == 0  # [N·L] of a bag
            ids = ids[:n] if per_sample else ids[:n * (ids.size // len(chunk))] if flat_bags else ids
            bad = (ids < 0) | (ids >= lk.rows)
            if bad.any():
                row = (int(np.argmax(bad.reshape(n, -1).any(1))) if per_sample or flat_bags else 0)
                raise data_error(data.source, MSG_COMPUTED_IDS.format(
                    layer=lk.table, vocab=lk.rows, value=int(ids[bad].flat[0]), sample=start + row))


def _ids_model(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto | None:
    """The part of ``model`` that computes ``tensors`` from its input, with them as its outputs;
    ``None`` when a node there holds a subgraph (If/Loop) or an output's type is unknown."""
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    keep: set[int] = set()
    stack = list(tensors)
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(graph.node[i].input)
    nodes = [graph.node[i] for i in sorted(keep)]
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return None
    types = {}
    for t in tensors:
        node = graph.node[producer[t]]
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        types[t] = to
    if None in types.values():
        inferred = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        types = {t: to or inferred.get(t) for t, to in types.items()}
        if not all(types.values()):
            return None
    needed = {i for n in nodes for i in n.input}
    g = onnx.helper.make_graph(nodes, "fqexport-lookup-ids", [graph.input[0]],
                               [onnx.helper.make_tensor_value_info(t, types[t], None) for t in dict.fromkeys(tensors)],
                               [t for t in graph.initializer if t.name in needed])
    return onnx.helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
