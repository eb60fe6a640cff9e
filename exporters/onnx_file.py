"""Writing an ONNX proto to disk atomically, its weights beside it when one file cannot hold them.

Protobuf serializes at most 2 GB in one message. A model whose tensors pass
:data:`INLINE_LIMIT_BYTES` (a ViT-H-sized float reference) is written as ``<name>.onnx`` plus
``<name>.onnx.data`` (ONNX external data: every tensor of 1 KB or more, at offsets of that one
file), which ``onnx.load`` and ONNX Runtime read from the model's folder; the two files move
together. Each file is written atomically (:func:`fqexport.atomic.atomic_write`): the data file
first, then the graph that names it, so no reader sees a graph without its weights.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

from fqexport.atomic import atomic_write, temp_path
from fqexport.errors import ExportError

# Tensor bytes above which a model's weights go to an external-data file: protobuf's 2 GB for one
# message, less a margin for the graph itself (nodes, names, metadata)
INLINE_LIMIT_BYTES = 2**31 - 2**27
# What a tensor must hold to be stored externally (smaller ones stay in the graph, as onnx does)
_EXTERNAL_MIN_BYTES = 1024

MSG_CHECKER = "{path}: onnx.checker rejected the exported model: {err}"


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors ``model`` holds in its proto (initializers and Constant nodes' values)."""
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += len(a.t.raw_data)
    return total


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
    then name the data file instead of holding their bytes."""
    if not is_large(model):
        atomic_write(path, lambda tmp: onnx.save_model(model, str(tmp), save_as_external_data=False))
        return path.stat().st_size
    data = path.with_name(path.name + ".data")
    # the tensors go to the data file's temporary name, the graph naming it is checked from its own
    # temporary file, then renamed to name the data file's final name
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=temp_path(data).name,
                                   size_threshold=_EXTERNAL_MIN_BYTES, convert_attribute=True)

    def write_graph(graph_tmp: Path) -> None:
        def write_data(data_tmp: Path) -> None:
            write_external_data_tensors(model, str(data_tmp.parent))
            onnx.save_model(model, str(graph_tmp), save_as_external_data=False)
            _check(str(graph_tmp), path)
            for t in _external_tensors(model):
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data.name
            onnx.save_model(model, str(graph_tmp), save_as_external_data=False)

        atomic_write(data, write_data)

    atomic_write(path, write_graph)
    return path.stat().st_size + data.stat().st_size


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
