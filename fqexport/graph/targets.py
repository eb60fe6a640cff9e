"""A GraphModule from a traced graph: each module, parameter or buffer a node targets is taken
from the source model and held under a name a GraphModule can hold.

torch.fx's ``GraphModule`` keeps some top-level names for itself (``meta``, ``graph``, ``code``,
``recompile``, ``to_folder``, ...). A user's model whose metadata branch is ``self.meta`` (common in
medical models: image + patient metadata) made ``torch.fx.GraphModule(model, graph)`` raise
"cannot assign 'dict' as child module 'meta'". Such a name is held as ``meta_`` instead, and said:
it is the name the layer tables, ``layer_bits``, ``keep_float`` and pins then use.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from fqexport.errors import ModelLoadError

log = logging.getLogger(__name__)

MSG_NAME_CLASH = (
    "two different modules or tensors of the model end up under the name {name!r} in the traced graph; "
    "rename one of them"
)
MSG_RESERVED = (
    "the model's attributes {names} have names that torch.fx's GraphModule keeps for itself: traced as {new} "
    "(the names of the layer table, layer_bits, keep_float and pins; the model's own code is unchanged)"
)


@functools.cache
def _reserved() -> frozenset[str]:
    """Names a bare GraphModule already has (its attributes, properties and methods)."""
    probe = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    return frozenset(dir(probe)) | frozenset(probe.__dict__)


def reserved_names(targets: list[str]) -> list[str]:
    """The top-level names of dotted ``targets`` that a GraphModule keeps for itself, sorted."""
    return sorted({t.partition(".")[0] for t in targets} & _reserved())


def attribute(root: Any, target: str) -> Any:
    """``root.a.b.c`` for the dotted ``target`` ``"a.b.c"``."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _moved_names(tops: set[str]) -> dict[str, str]:
    """Each of the top-level names ``tops`` that a GraphModule keeps for itself -> the name it is
    held under (``meta`` → ``meta_``, ``_`` appended until neither reserved nor another of
    ``tops``), warned (:data:`MSG_RESERVED`); empty when none is."""
    kept = reserved_names(list(tops))
    moved: dict[str, str] = {}
    taken = set(tops) - set(kept)
    for top in kept:
        name = top + "_"
        while name in _reserved() or name in taken:
            name += "_"
        moved[top] = name
        taken.add(name)
    if moved:
        log.warning(MSG_RESERVED.format(names=", ".join(repr(t) for t in moved),
                                        new=", ".join(repr(n) for n in moved.values())))
    return moved


def _renamed(target: str, moved: dict[str, str]) -> str:
    """``target`` with its top-level name as :func:`_moved_names` moved it."""
    top, dot, rest = target.partition(".")
    return moved.get(top, top) + dot + rest


def graph_module(source: nn.Module, graph: torch.fx.Graph, class_name: str,
                 rename: Callable[[str], str] | None = None, clash: str = MSG_NAME_CLASH) -> torch.fx.GraphModule:
    """``torch.fx.GraphModule`` of ``graph`` (its nodes' targets are rewritten in place): the
    object of each ``call_module`` / ``get_attr`` target ``t`` of ``source`` held under
    ``rename(t)`` (default: ``t``), a top-level name a GraphModule keeps for itself moved to
    ``name_`` (warned, :data:`MSG_RESERVED`). A ModelLoadError when two objects end up under one
    name (``clash``, formatted with the ``name``)."""
    nodes = [n for n in graph.nodes if n.op in ("call_module", "get_attr")]
    wanted = {str(n.target): (rename or str)(str(n.target)) for n in nodes}
    moved = _moved_names({t.partition(".")[0] for t in wanted.values()})
    if not moved and rename is None:
        return torch.fx.GraphModule(source, graph, class_name)
    root: dict[str, Any] = {}
    for node in nodes:
        old = str(node.target)
        new = _renamed(wanted[old], moved)
        obj = attribute(source, old)
        if new in root and root[new] is not obj:
            raise ModelLoadError(clash.format(name=new))
        root[new] = obj
        node.target = new
    gm = torch.fx.GraphModule(root, graph, class_name)
    gm.training = source.training  # a dict root leaves a GraphModule in train mode
    return gm


def free_program_names(program: Any) -> dict[str, str]:
    """Rename, in place, the top-level names of a ``torch.export`` program's parameters, buffers and
    constants that a GraphModule keeps for itself (``meta`` → ``meta_``, warned as
    :func:`graph_module` does), so that ``program.module()`` can hold them; the renames made."""
    specs = [s for s in (*program.graph_signature.input_specs, *program.graph_signature.output_specs)
             if getattr(s, "target", None)]
    moved = _moved_names({str(s.target).partition(".")[0] for s in specs})
    if moved:
        for spec in specs:
            spec.target = _renamed(str(spec.target), moved)
        program._state_dict = {_renamed(k, moved): v for k, v in program.state_dict.items()}
        program._constants = {_renamed(k, moved): v for k, v in program.constants.items()}
    return moved
