"""Cached calibration activations of traced models, advanced one graph node at a time.

``compress`` quantizes the layers in graph order, and layer ``l`` needs its input on every
calibration batch: from the quantized prefix (layers before ``l`` already final) and, for the
float-output target, from the float model. Re-running the network from the input for every
layer costs O(layers²) forward work. An :class:`ActivationCache` instead runs each node of a
``torch.fx`` graph once per batch, in topological order, and keeps only the **frontier**: the
values some node not yet run still needs (liveness: a value is dropped right after its last
user runs). ``advance(k)`` runs nodes up to (not including) node ``k`` — the next layer — whose
input is then read with :meth:`ActivationCache.layer_inputs`; once the layer's weights are
final, the next ``advance`` runs it with them. Forward work: each node once per batch and
stream (plus the layer calls of the corrections), O(layers).

Several graphs of the same structure (the quantized model and its float copy) advance together
as *streams*: each batch holds one value table per stream.

Memory: the frontiers of all batches stay in memory up to ``max_bytes`` (on the compute
device). A batch whose frontier would take the total over the cap is **spilled** to a private
temporary directory (``torch.save``; read back with ``weights_only=True``) and loaded when the
cache next reads or advances it, so the cap holds whatever the calibration set's size, at the
price of disk traffic for the spilled batches (one write and up to three reads per layer).
Spilling was chosen over recomputing from a checkpointed frontier because it keeps the forward
work linear and the numbers identical: a reloaded tensor has the same bits. Peak memory (bytes
held in memory and spilled) is recorded in :attr:`ActivationCache.peak_bytes` and
:attr:`ActivationCache.peak_spilled_bytes`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.fx
from torch.fx.node import map_arg

from fqexport.errors import DISK_FULL_ERRNOS

log = logging.getLogger(__name__)

_MSG_ORDER = (
    "activation cache: cannot advance to node {stop} ({name!r}): the cache is already at node "
    "{position}; layers must be processed in graph order"
)
_MSG_NOT_LAYER = "activation cache: no call of module {name!r} in the traced graph"
_MSG_STREAMS = (
    "activation cache: the streams' graphs differ at node {index} ({a!r} vs {b!r}); the float "
    "copy must be a deepcopy of the quantized graph"
)


class GraphStream:
    """A traced graph run node range by node range on one batch's value table.

    ``env`` maps node → value; :meth:`run` runs nodes ``[start, stop)`` exactly as
    ``GraphModule.forward`` would (``torch.fx.Interpreter``'s node semantics) and deletes each
    value right after its last user ran.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: list[torch.fx.Node] = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        position = {n: i for i, n in enumerate(self.nodes)}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        # dies_after[i]: the values whose last user is node i (freed once node i ran)
        self.dies_after: list[list[torch.fx.Node]] = [[] for _ in self.nodes]
        for i, n in enumerate(self.nodes):
            # a value nobody uses is dropped right after it is computed
            self.dies_after[max((position[u] for u in n.users), default=i)].append(n)
        self._interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)

    def module_node(self, name: str) -> int:
        """Index of the (single) ``call_module`` node of module ``name``."""
        for i, n in enumerate(self.nodes):
            if n.op == "call_module" and n.target == name:
                return i
        raise KeyError(_MSG_NOT_LAYER.format(name=name))

    def start(self, x: torch.Tensor) -> dict[torch.fx.Node, Any]:
        """The value table of a batch before any node ran: the model's one input, and any further
        ``forward`` parameter at its default (traced as a constant: ``trace``'s concrete args)."""
        env: dict[torch.fx.Node, Any] = {self.placeholders[0]: x}
        for p in self.placeholders[1:]:
            env[p] = p.args[0] if p.args else None
        return env

    def output(self, env: dict[torch.fx.Node, Any]) -> Any:
        """The graph's output from a value table that ran every node (the output node's
        arguments are kept: :meth:`run` skips the output node, so nothing frees them)."""
        return map_arg(self.nodes[-1].args[0], env.__getitem__)

    def run(self, env: dict[torch.fx.Node, Any], start: int, stop: int) -> None:
        interp = self._interpreter
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op in ("placeholder", "output"):
                continue
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            env[node] = getattr(interp, node.op)(node.target, args, kwargs)
            for dead in self.dies_after[i]:
                env.pop(dead, None)


def _value_bytes(value: Any, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, (tuple, list)):
        return sum(_value_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_value_bytes(v, seen) for v in value.values())
    return 0


def frontier_bytes(envs: Sequence[dict[torch.fx.Node, Any]]) -> int:
    """Bytes of tensor storage held by value tables (shared storages counted once)."""
    seen: set[int] = set()
    return sum(_value_bytes(v, seen) for env in envs for v in env.values())


class ActivationCache:
    """The frontier of every calibration batch for one or more graph streams.

    Args:
        streams: graphs of the same structure (e.g. the quantized model and its float copy).
        batches: ``(x, group)`` calibration batches; ``x`` is moved to ``device``.
        device: where the activations are computed and held.
        max_bytes: cap on the frontier bytes held in memory; beyond it batches are spilled to
            disk (``None``: no cap).
    """

    def __init__(
        self,
        streams: Sequence[GraphStream],
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        max_bytes: int | None = None,
    ) -> None:
        self.streams = list(streams)
        first = [n.name for n in self.streams[0].nodes]
        for other in self.streams[1:]:
            for i, (a, b) in enumerate(zip_longest(first, [n.name for n in other.nodes])):
                if a != b:
                    raise ValueError(_MSG_STREAMS.format(index=i, a=a, b=b))
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.position = 0
        self.groups = [g for _, g in batches]
        self._held: list[list[dict] | None] = []   # per batch: value tables in memory, or None
        self._bytes: list[int] = []                 # per batch: bytes in memory or on disk
        self._spill_dir: Path | None = None
        self.peak_bytes = 0
        self.peak_spilled_bytes = 0
        self.spilled_batches = 0  # batches on disk at the peak of spilled bytes
        for b, (x, _) in enumerate(batches):
            x = x.to(self.device)
            # each stream gets its own copy: an in-place op in one must not reach the other
            envs = [s.start(x if i == 0 else x.clone()) for i, s in enumerate(self.streams)]
            self._held.append(None)
            self._bytes.append(0)
            self._store(b, envs)

    def __len__(self) -> int:
        return len(self.groups)

    # ------------------------------------------------------------------ storage
    def _spill_path(self, b: int) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="fqexport-activations-"))
        return self._spill_dir / f"batch{b:06d}.pt"

    def _in_memory(self) -> int:
        return sum(n for n, envs in zip(self._bytes, self._held) if envs is not None)

    def _store(self, b: int, envs: list[dict]) -> None:
        size = frontier_bytes(envs)
        others = self._in_memory() - (self._bytes[b] if self._held[b] is not None else 0)
        if self.max_bytes is None or others + size <= self.max_bytes:
            self._held[b] = envs
            if self._spill_dir is not None:
                self._spill_path(b).unlink(missing_ok=True)
        else:
            named = [{n.name: v for n, v in env.items()} for env in envs]
            _save_spill(named, self._spill_path(b))
            self._held[b] = None
        self._bytes[b] = size
        held = self._in_memory()
        spilled = sum(self._bytes) - held
        self.peak_bytes = max(self.peak_bytes, held)
        if spilled > self.peak_spilled_bytes:
            self.peak_spilled_bytes = spilled
            self.spilled_batches = sum(envs is None for envs in self._held)

    def _load(self, b: int) -> list[dict]:
        envs = self._held[b]
        if envs is not None:
            return envs
        named = torch.load(self._spill_path(b), map_location=self.device, weights_only=True)
        return [{s.by_name[k]: v for k, v in env.items()} for s, env in zip(self.streams, named)]

    def close(self) -> None:
        """Drop every cached value and delete the spill directory."""
        self._held = [None] * len(self._held)
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def __enter__(self) -> "ActivationCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ running
    def advance(self, stop: int) -> None:
        """Run every stream's nodes ``[position, stop)`` on every batch."""
        if stop < self.position:
            name = self.streams[0].nodes[stop].name
            raise ValueError(_MSG_ORDER.format(stop=stop, name=name, position=self.position))
        if stop == self.position:
            return
        with torch.no_grad():
            for b in range(len(self)):
                envs = self._load(b)
                for stream, env in zip(self.streams, envs):
                    stream.run(env, self.position, stop)
                self._store(b, envs)
        self.position = stop

    def layer_inputs(self, index: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Per batch: the first argument of node ``index`` in each stream, and the group labels.

        The cache must stand at ``index`` (:meth:`advance` to it first).
        """
        if index != self.position:
            raise ValueError(f"activation cache: at node {self.position}, not at node {index}")
        for b in range(len(self)):
            envs = self._load(b)
            yield [env[s.nodes[index].args[0]] for s, env in zip(self.streams, envs)], self.groups[b]


def _save_spill(obj: Any, path: Path) -> None:
    """``torch.save`` of a spilled batch into ``path``, through a file this function opens: torch
    reports a full disk or file-size limit as ``RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos``, the OSError only in its context; it is raised as that OSError, naming the file."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except (RuntimeError, OSError) as err:
        full = err if isinstance(err, OSError) else err.__context__
        if isinstance(full, OSError) and full.errno in DISK_FULL_ERRNOS:
            raise OSError(full.errno, full.strerror or str(full), str(path)) from err
        raise
