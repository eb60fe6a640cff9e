"""Writing an ONNX proto to disk atomically, its weights beside it when one file cannot hold them.

Protobuf serializes at most 2 GB in one message. A model whose tensors pass
:data:`INLINE_LIMIT_BYTES` (a ViT-H-sized float reference) is written as ``<name>.onnx`` plus
``<name>.onnx.data`` (ONNX external data: every tensor of 1 KB or more, at offsets of that one
file, subgraphs' tensors included), which ``onnx.load`` and ONNX Runtime read from the model's
folder; the two files move together (:func:`fqexport.atomic.atomic_write_together`: both written
to temporary files, then renamed, the data file first, with SIGINT/SIGTERM held back between the
two renames), so no reader sees a graph without its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import onnx
from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

from fqexport.atomic import atomic_write, atomic_write_together, temp_path
from fqexport.errors import ExportError
from fqexport.exporters.external_data import external_data_locations

# Tensor bytes above which a model's weights go to an external-data file: protobuf's 2 GB for one
# message, less a margin for the graph itself (nodes, names, metadata)
INLINE_LIMIT_BYTES = 2**31 - 2**27
# What a tensor must hold to be stored externally (smaller ones stay in the graph, as onnx does)
_EXTERNAL_MIN_BYTES = 1024

MSG_CHECKER = "{path}: onnx.checker rejected the exported model: {err}"


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor ``graph`` holds: initializers and node attributes' (Constant values), those of
    its subgraphs (If / Loop / Scan branches) included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                yield from a.tensors
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _tensors(g)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors ``model`` holds in its proto (subgraphs' included)."""
    return sum(len(t.raw_data) for t in _tensors(model.graph))


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s tensors need an external-data file (:data:`INLINE_LIMIT_BYTES`)."""
    return tensor_bytes(model) > INLINE_LIMIT_BYTES


def check_onnx(model: onnx.ModelProto, path: Path) -> None:
    """``onnx.checker`` on ``model`` (to be written at ``path``); ExportError naming the file. A
    large model (:func:`is_large`) is checked by :func:`save_onnx` from its written files, as the
    checker takes it only from a path."""
    if not is_large(model):
        _check(model, path)


def _check(model: onnx.ModelProto | str, path: Path) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise ExportError(MSG_CHECKER.format(path=path, err=err)) from err


def save_onnx(model: onnx.ModelProto, path: Path) -> int:
    """Write ``model`` to ``path`` atomically (module docstring); return the bytes written (the
    graph file plus its external-data file, if any). A large model is checked
    (:func:`check_onnx`) before either file takes its place, and changed in place: its tensors
    then name the data file instead of holding their bytes. A small model written over a large
    one removes the data file the old graph named (``<name>.data``)."""
    data = path.with_name(path.name + ".data")
    if not is_large(model):
        stale = data.name in external_data_locations(path)  # an earlier large export's weights
        atomic_write(path, lambda tmp: onnx.save_model(model, str(tmp), save_as_external_data=False))
        if stale:
            data.unlink(missing_ok=True)
        return path.stat().st_size
    # the tensors go to the data file's temporary name, the graph naming it is checked from its own
    # temporary file, then renamed to name the data file's final name; both move into place together
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=temp_path(data).name,
                                   size_threshold=_EXTERNAL_MIN_BYTES, convert_attribute=True)

    def write_graph(graph_tmp: Path) -> None:
        onnx.save_model(model, str(graph_tmp), save_as_external_data=False)
        _check(str(graph_tmp), path)
        for t in _tensors(model.graph):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data.name
        onnx.save_model(model, str(graph_tmp), save_as_external_data=False)

    atomic_write_together([(data, lambda tmp: write_external_data_tensors(model, str(tmp.parent))),
                           (path, write_graph)])
    return path.stat().st_size + data.stat().st_size
