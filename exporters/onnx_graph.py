"""Small queries and edits of an ONNX graph that several export passes share: a node's
attributes, who produces and who reads each value, and dropping initializers nothing reads."""

from __future__ import annotations

from typing import Any

import onnx
from onnx import NodeProto, helper


def attributes(node: NodeProto) -> dict[str, Any]:
    """``node``'s attributes by name."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def producers(graph: onnx.GraphProto) -> dict[str, NodeProto]:
    """Value name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[NodeProto]]:
    """Value name -> the nodes that read it."""
    out: dict[str, list[NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            out.setdefault(name, []).append(n)
    return out


def read_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of ``graph`` reads, in its subgraphs (If/Loop/Scan bodies, which read
    outer values by name) too, and the graph's outputs."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                used |= read_names(sub)
    return used


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop the initializers no node reads, in a subgraph neither, and no graph output names (in place)."""
    used = read_names(graph)
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
