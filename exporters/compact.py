"""The last export pass: shrink a QDQ model's fixed bytes without changing what ORT runs.

On the demo CNN (SmallResNet, W4 packed) a third of the file was not weights: the graph's
``value_info`` (shapes torch.onnx recorded, 7 KB — ONNX Runtime infers them at load), long
node and value names (``node_QuantizeLinear_32``, ``act_qdq_6``; 8 KB of node protos), all-zero
per-channel weight zero points, and one scalar initializer per repeated constant. Passes:

1. ``value_info`` is dropped.
2. A ``DequantizeLinear`` of a weight initializer whose zero point is all zeros, feeding only
   Conv (or the INT2 path's scale Mul), loses that input: the zero point is optional and defaults
   to 0 of the codes' type (symmetric weights have zero point 0). ORT 1.32 still fuses QLinearConv
   without it, but not QGemm (measured: a Gemm weight without its zero point stays a float Gemm),
   so weights feeding Gemm/MatMul keep theirs.
3. Scalar initializers of equal type and value are merged into one.
4. Names: every value name that starts with a layer's name (``layer3.0.conv2.weight``,
   ``…weight_quantized``, ``…weight_scale``, ``fc.weight_nbits``) is kept — tests, reports and
   readers look layers up by them — and so are the graph's inputs and outputs; every other value,
   and every scalar constant (the INT2 layers' shared unit scale), gets a short numbered name
   (``t12``). A node that computes a layer (``fc_MatMulNBits``) keeps
   its name; every other node gets a number (``n12``).
5. Attributes equal to their schema's default (``Conv`` dilations 1, ``QuantizeLinear``
   saturate 1, …) are dropped, and so are torch's metadata on the graph inputs and outputs.

The numerics are untouched: ORT's optimized session has the same kernels and bit-identical
outputs (tests/test_compact.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from fqexport.exporters.onnx_graph import remove_unused_initializers

log = logging.getLogger(__name__)

# Initializers with at most this many elements are merged when their type and bytes are equal.
MAX_SHARED_ELEMENTS = 1


# Consumers of a weight DequantizeLinear for which its all-zero zero point is left out.
ZERO_POINT_FREE_CONSUMERS = ("Conv", "Mul", "Gather")  # Gather: an int8 Embedding table (its rows are looked up)
# Nodes the exporter adds next to a layer's op: renamed like torch's nodes.
HELPER_OPS = ("DequantizeLinear", "Mul")


@dataclass(frozen=True)
class CompactStats:
    """What :func:`compact_graph` removed: serialized bytes before and after, and counts."""

    bytes_before: int
    bytes_after: int
    value_info: int
    zero_points: int
    merged_constants: int
    renamed_values: int
    default_attributes: int


def _keeps(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") or name.startswith(p + "_") for p in prefixes)


def _drop_zero_points(graph: onnx.GraphProto) -> int:
    """Pass 2: remove the all-zero zero point of each weight DequantizeLinear feeding only
    :data:`ZERO_POINT_FREE_CONSUMERS`."""
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    dropped = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(op not in ZERO_POINT_FREE_CONSUMERS for op in users):
            continue
        codes, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if codes is None or zp is None or zp.data_type != codes.data_type:
            continue
        if np.any(numpy_helper.to_array(zp).astype(np.int64)):
            continue
        del node.input[2]
        dropped += 1
    remove_unused_initializers(graph)
    return dropped


def _merge_scalars(graph: onnx.GraphProto) -> int:
    """Pass 3: one initializer per (type, value) among scalar initializers; returns merges."""
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for t in graph.initializer:
        if int(np.prod(t.dims)) > MAX_SHARED_ELEMENTS or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        if key in first:
            alias[t.name] = first[key]
        else:
            first[key] = t.name
    if not alias:
        return 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    remove_unused_initializers(graph)
    return len(alias)


def _short_names(graph: onnx.GraphProto, prefixes: tuple[str, ...]) -> int:
    """Pass 4: numbered names for values and nodes that no layer name starts."""
    fixed = {v.name for v in (*graph.input, *graph.output)}
    # scalar constants (the INT2 layers' shared unit scale) belong to the graph, not to one layer
    scalars = {t.name for t in graph.initializer if int(np.prod(t.dims)) <= MAX_SHARED_ELEMENTS}
    names = [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output if o]
    taken = {n for n in names if n in fixed or (_keeps(n, prefixes) and n not in scalars)}
    rename: dict[str, str] = {}
    counter = 0
    for name in dict.fromkeys(names):
        if name in taken:
            continue
        while f"t{counter}" in taken:
            counter += 1
        rename[name] = f"t{counter}"
        counter += 1
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for node_index, node in enumerate(graph.node):
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
        for k, name in enumerate(node.output):
            node.output[k] = rename.get(name, name)
        if node.op_type in HELPER_OPS or not _keeps(node.name, prefixes):
            node.name = f"n{node_index}"
    return len(rename)


def _drop_default_attributes(graph: onnx.GraphProto, opsets: dict[str, int]) -> int:
    """Pass 5: attributes whose value is the op schema's default."""
    dropped = 0
    for node in graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
        except onnx.defs.SchemaError:
            continue
        for attr in list(node.attribute):
            spec = schema.attributes.get(attr.name)
            if spec is None or not spec.default_value.name:
                continue
            default = onnx.helper.get_attribute_value(spec.default_value)
            value = onnx.helper.get_attribute_value(attr)
            if attr.type == spec.default_value.type and value == default:
                node.attribute.remove(attr)
                dropped += 1
    return dropped


def compact_graph(model: onnx.ModelProto, layer_names: Iterable[str]) -> CompactStats:
    """Apply the module's passes to ``model`` in place; names starting with one of
    ``layer_names`` (and the graph's inputs and outputs) are kept."""
    before = model.ByteSize()
    graph = model.graph
    prefixes = tuple(layer_names)
    value_info = len(graph.value_info)
    del graph.value_info[:]
    # a subgraph (If/Loop body) may use outer values by name: keep every value then
    nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)
    zero_points = 0 if nested else _drop_zero_points(graph)
    merged = 0 if nested else _merge_scalars(graph)
    renamed = 0 if nested else _short_names(graph, prefixes)
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    defaults = _drop_default_attributes(graph, opsets)
    for v in (*graph.input, *graph.output):
        del v.metadata_props[:]
    stats = CompactStats(before, model.ByteSize(), value_info, zero_points, merged, renamed, defaults)
    log.info("compacted the graph: %d -> %d bytes (%d value_info, %d zero points, %d constants merged, "
             "%d values renamed, %d default attributes)", stats.bytes_before, stats.bytes_after, value_info,
             zero_points, merged, renamed, defaults)
    return stats
