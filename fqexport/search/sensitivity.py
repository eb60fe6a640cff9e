"""Per-group sensitivity of each layer to each weight width: Δ_g(l, b).

Δ_g(l, b) is the increase of group g's mean cross-entropy when only layer l's weight is put on
a b-bit grid (per output channel, clipping-searched round to nearest: ``rtn_layer`` on
``choose_solver_grid`` of :mod:`fqexport.quant.solver`, the RTN that ``compress`` runs):

* ``"measured"``: quantize layer l alone, run the calibration samples, and take
  ``Δ_g(l, b) = (1/N_g) Σ_{i∈g} [ℓ_i(W with W_l ← Q_b(W_l)) − ℓ_i(W)]``. One task per layer:
  the float graph up to layer l runs once per batch (its live activations cached), then only
  the rest of the graph from layer l once per width, on a copy of those activations.
* ``"fisher"``: the second-order proxy with the per-group empirical Fisher diagonal
  ``F_g = (1/N_g) Σ_{i∈g} (∂ℓ_i/∂W_l)²`` (per-sample gradients):
  ``Δ_g(l, b) ≈ ½ Σ_j F_g,j (W_l,j − Q_b(W_l)_j)²``.
* ``"output-fisher"``: the same second order in the layer's *output*, for the solver's codes
  rather than RTN's: ``Δ_g(l, b) ≈ ½ (1/N_g) Σ_{i∈g} Σ_c mean_p(∂ℓ_i/∂y_icp)² Σ_p δy_icp²`` with
  δy the layer's output error; one float pass, one backward pass and one factorisation per
  layer for every width (:mod:`~fqexport.search.output_fisher`; an Embedding is measured).

The two Fisher methods read the loss's gradient at the float model, so they need a loss that
has one there: a classifier's cross-entropy (against its labels or the float top-1). A
detector's or segmenter's distillation loss is minimal at the float model; they are refused
for those tasks with a ConfigError that names ``"measured"``.

All three run on the BN-folded model (the weights the pipeline quantizes) and on a group-balanced
subset of the calibration data, so a minority group weighs as much as the majority. ℓ_i is the
task's per-sample loss (:meth:`fqexport.tasks.base.Task.sample_loss`): a classifier's
cross-entropy against its label, or, for data without labels, against the float model's top-1
prediction (the label of :func:`float_labels`); a detector's or segmenter's distillation loss
to the float model's outputs. Δ_g then measures how far quantizing moves group g away from the
float model.
Results are cached in memory by a fingerprint of the folded weights, the data and the options,
and optionally in a JSON file, so a budget sweep measures once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, get_args

import numpy as np
import torch
from torch import nn
from fqexport.progress import tqdm

from fqexport.atomic import atomic_write
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.sampling import group_balanced_indices
from fqexport.calibration.stream import DataStream
from fqexport.config import (
    DEFAULT_BIT_CHOICES,
    MixedPrecisionConfig,
    QuantConfig,
    SensitivityMethod,
    check_bit_choices,
    check_choice,
)
from fqexport.engine.base import Engine, SerialEngine, Task
from fqexport.errors import ConfigError, DataError, OutputPathError
from fqexport.graph.prepare import prepare_model
from fqexport.model import rows_to_weight, weight_rows
from fqexport.pipeline.activations import GraphStream
from fqexport.pipeline.compress import check_token_ids, example_batch, model_output
from fqexport.quant.per_group import group_means
from fqexport.quant.solver import choose_solver_grid, rtn_layer
from fqexport.search.output_fisher import output_fisher_sensitivity
from fqexport.tasks.base import Task as ModelTask
from fqexport.tasks.classification import Classification
from fqexport.tasks.resolve import resolve_task

log = logging.getLogger(__name__)

MSG_LAYERS = "sensitivity: {names} not a quantizable layer of the model (layers: {known})"
MSG_SHAPE = "SensitivityTable: delta has shape {shape}, expected [layers={l}, bits={b}, groups={g}]"
MSG_LOOKUP = "SensitivityTable has no entry for layer {layer!r} at {bits} bits (layers: {layers}; bits: {allbits})"
MSG_EMPTY = "{source}: no calibration samples to measure sensitivity on"
MSG_NO_FISHER = (
    "sensitivity {method!r} needs a loss whose gradient at the float model says how much it rises: "
    "a classifier's cross-entropy; the {task} task's loss is a distillation to the float model's "
    "own outputs (minimal there, gradient 0); use sensitivity 'measured'"
)
MSG_CACHE_FILE = "sensitivity cache file {path}: cannot read it ({err}); delete it or pass another path"


@dataclass(frozen=True)
class SensitivityTable:
    """Δ_g(l, b): loss increase of group g when layer l alone is quantized to b bits.

    Attributes:
        layers: layer names (execution order).
        bits: the widths measured, ascending.
        groups: group names.
        delta: float64 ``[layers, bits, groups]``.
        method: ``"measured"`` or ``"fisher"``.
        float_loss: per-group mean cross-entropy of the float model on the samples, ``[groups]``.
        num_samples: per-group sample counts used, ``[groups]``.
        key: the cache fingerprint (model weights, data, options).
    """

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    groups: tuple[str, ...]
    delta: np.ndarray
    method: str
    float_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    num_samples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    key: str = ""

    def __post_init__(self) -> None:
        shape = (len(self.layers), len(self.bits), len(self.groups))
        if tuple(np.shape(self.delta)) != shape:
            raise ConfigError(MSG_SHAPE.format(shape=np.shape(self.delta), l=shape[0], b=shape[1], g=shape[2]))

    def at(self, layer: str, bits: int) -> np.ndarray:
        """Δ_g for every group of ``layer`` at ``bits``, ``[groups]``."""
        try:
            return self.delta[self.layers.index(layer), self.bits.index(int(bits))]
        except ValueError as err:
            raise ConfigError(
                MSG_LOOKUP.format(layer=layer, bits=bits, layers=", ".join(self.layers), allbits=self.bits)
            ) from err

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``delta[layer][bits][group]`` nested dicts plus the metadata."""
        return {
            "method": self.method,
            "layers": list(self.layers),
            "bits": list(self.bits),
            "groups": list(self.groups),
            "delta": {
                l: {str(b): {g: float(self.delta[i, j, k]) for k, g in enumerate(self.groups)}
                    for j, b in enumerate(self.bits)}
                for i, l in enumerate(self.layers)
            },
            "float_loss": {g: float(v) for g, v in zip(self.groups, self.float_loss)},
            "num_samples": {g: int(v) for g, v in zip(self.groups, self.num_samples)},
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityTable":
        """Inverse of :meth:`to_dict`."""
        layers, bits, groups = tuple(d["layers"]), tuple(int(b) for b in d["bits"]), tuple(d["groups"])
        delta = np.array(
            [[[float(d["delta"][l][str(b)][g]) for g in groups] for b in bits] for l in layers],
            dtype=np.float64,
        ).reshape(len(layers), len(bits), len(groups))
        return cls(
            layers, bits, groups, delta, d["method"],
            np.array([float(d["float_loss"][g]) for g in groups]) if d.get("float_loss") else np.zeros(len(groups)),
            np.array([int(d["num_samples"][g]) for g in groups]) if d.get("num_samples") else np.zeros(len(groups), np.int64),
            d.get("key", ""),
        )


# ---------------------------------------------------------------------------------------------
# pure math
# ---------------------------------------------------------------------------------------------


def rtn_weight(weight: torch.Tensor, bits: int, weight_range: str = "x86-safe", clip_search: bool = True,
               kind: str = "linear") -> torch.Tensor:
    """Layer weight on the b-bit per-output-channel grid the export uses:
    :func:`~fqexport.quant.solver.rtn_layer` on :func:`~fqexport.quant.solver.choose_solver_grid`
    without a Hessian, dequantized. ``kind`` (``QuantizedLayer.kind``, :func:`layer_kind`): a
    ``"conv_transpose"`` weight's rows are its output channels (axis 1,
    :func:`fqexport.model.weight_rows`)."""
    rows = weight_rows(kind, weight.detach()).float()
    grid = choose_solver_grid(rows, None, bits, weight_range=weight_range, clip_search=clip_search)
    return rows_to_weight(kind, rtn_layer(rows, grid).qweight, weight.shape).to(weight.dtype)


def layer_kind(module: nn.Module) -> str:
    """The ``QuantizedLayer.kind`` whose weight rows differ from ``weight.reshape(out, -1)``
    (``"conv_transpose"``), else ``"linear"`` (rows on axis 0)."""
    return "conv_transpose" if isinstance(module, nn.ConvTranspose2d) else "linear"


def fisher_delta(fisher: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``½ Σ_j F_g,j (w_j − q_j)²`` for each group: ``fisher [G, *w.shape]`` → ``[G]``."""
    err2 = (weight.double() - quantized.double()).pow(2).reshape(1, -1)
    return 0.5 * (fisher.double().reshape(fisher.shape[0], -1) * err2).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# caching
# ---------------------------------------------------------------------------------------------


def _fingerprint(model: nn.Module, data: GroupData, options: dict[str, Any]) -> str:
    """sha1 over the model's graph and modules (``str`` of the traced GraphModule: its modules with
    their settings, and its code: a class edited and reloaded with the same weights is another
    model), its parameters and buffers, the data arrays, the group names and the options (a table
    holds its groups by name: the same ids named otherwise are another table)."""
    h = hashlib.sha1()
    h.update(str(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for arr in (data.x, data.y, data.group):
        h.update(b"no labels" if arr is None else np.ascontiguousarray(arr).tobytes())
    h.update(json.dumps([list(map(str, data.group_names)), options], sort_keys=True, default=str).encode())
    return h.hexdigest()


class SensitivityCache:
    """In-memory cache of SensitivityTables by fingerprint (most recent ``max_entries``)."""

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = int(max_entries)
        self._tables: dict[str, SensitivityTable] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> SensitivityTable | None:
        table = self._tables.get(key)
        if table is None:
            self.misses += 1
        else:
            self.hits += 1
        return table

    def put(self, table: SensitivityTable) -> None:
        self._tables.pop(table.key, None)
        self._tables[table.key] = table
        while len(self._tables) > self.max_entries:
            self._tables.pop(next(iter(self._tables)))

    def clear(self) -> None:
        self._tables.clear()


DEFAULT_CACHE = SensitivityCache()


MSG_CACHE_STALE = ("sensitivity cache file %s was written for another model, data or options (or by another "
                   "fqexport version): recomputing the table and overwriting the file")


MSG_CACHE_EDITED = ("sensitivity cache file %s has this run's fingerprint but not its table (%s): edited or "
                    "written by hand; recomputing the table and overwriting the file")
MSG_CACHE_NOT_SAVED = "sensitivity cache file %s not saved (%s); the run goes on with the table it measured"


def _read_cache_file(path: Path, key: str, layers: Sequence[str], bits: Sequence[int],
                     groups: Sequence[str]) -> SensitivityTable | None:
    """The table in ``path`` when it is this run's (its fingerprint ``key``, and the ``layers``,
    ``bits`` and ``groups`` the run measures: the fingerprint covers the options, not the
    file's own lists), else None (said)."""
    if not path.exists():
        return None
    try:
        table = SensitivityTable.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise DataError(MSG_CACHE_FILE.format(path=path, err=f"{type(err).__name__}: {err}")) from err
    if table.key != key:
        log.warning(MSG_CACHE_STALE, path)
        return None
    wrong = [f"{what} {list(got)} instead of {list(want)}" for what, got, want in (
        ("layers", table.layers, layers), ("widths", table.bits, bits), ("groups", sorted(table.groups), sorted(groups)))
        if list(got) != list(want)]
    if wrong:
        log.warning(MSG_CACHE_EDITED, path, "; ".join(wrong))
        return None
    return table


def _write_cache_file(path: Path, table: SensitivityTable) -> None:
    """Save ``table`` to ``path``; a file that cannot be written (disk full) is said, not fatal:
    the cache is an option of a run whose own outputs come next."""
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(table.to_dict(), indent=1)))
    except OutputPathError as err:
        log.warning(MSG_CACHE_NOT_SAVED, path, err)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def float_labels(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The top-1 class of ``model`` per sample: the labels of data that has none (distillation)."""
    return float_outputs(model, x, batch_size).argmax(1)


def float_outputs(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model``'s outputs on ``x``, batch by batch without gradients."""
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            out.append(model(x[s:s + batch_size]))
    return torch.cat(out) if out else torch.zeros(0)


def _per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, task: ModelTask) -> torch.Tensor:
    return _loss_of(float_outputs(model, x, batch_size), y, batch_size, task)


def _loss_of(outputs: torch.Tensor, y: torch.Tensor, batch_size: int, task: ModelTask) -> torch.Tensor:
    """The task's per-sample loss of ``outputs`` (a batch's model outputs, in order) against ``y``."""
    with torch.no_grad():
        return torch.cat([task.sample_loss(outputs[s:s + batch_size], y[s:s + batch_size])
                          for s in range(0, outputs.shape[0], batch_size)]).double()


class _MeasuredContext:
    """What every measured-sensitivity task needs (shipped to each worker once): the user's
    model and the balanced samples. Each process prepares (traces, BN-folds) the model and
    computes the float per-sample loss once, on first use, by the same code in every engine
    (the folded fx graph itself does not pickle)."""

    def __init__(self, model: nn.Module, folded: nn.Module, skip_unsupported: bool, x: torch.Tensor,
                 y: torch.Tensor, g: torch.Tensor, num_groups: int, batch_size: int, weight_range: str,
                 clip_search: bool, task: ModelTask, base: torch.Tensor | None = None) -> None:
        self.model, self.skip_unsupported, self.task = model, skip_unsupported, task
        self.x, self.y, self.g, self.num_groups = x, y, g, num_groups
        self.batch_size, self.weight_range, self.clip_search = batch_size, weight_range, clip_search
        self._folded: nn.Module | None = folded
        self._stream: GraphStream | None = None
        self._base: torch.Tensor | None = base  # the float per-sample loss, when the caller has it

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_folded": None, "_stream": None, "_base": None}

    def folded(self) -> nn.Module:
        if self._folded is None:
            self._folded = prepare_model(self.model, self.skip_unsupported, example=self.x[:2]).folded
        return self._folded

    def stream(self) -> GraphStream:
        """The folded graph, run node range by node range."""
        if self._stream is None:
            self._stream = GraphStream(self.folded())
        return self._stream

    def base_loss(self) -> torch.Tensor:
        if self._base is None:
            self._base = _per_sample_loss(self.folded(), self.x, self.y, self.batch_size, self.task)
        return self._base


def _copy_values(value: Any) -> Any:
    """A copy of a cached activation (tensors cloned, containers rebuilt): the rest of the graph
    may write into its inputs in place, and the cache serves every width."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy_values(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy_values(v) for k, v in value.items()}
    return value


def _measure_layer(ctx: _MeasuredContext, task: Task) -> np.ndarray:
    """One layer's task: Δ_g at every width with only that layer on the b-bit grid,
    ``[widths, groups]``. Per batch the float graph runs up to the layer once; from the layer on
    it runs once per width on a copy of the cached values (the same numbers as a full forward)."""
    name, widths = task.payload
    base = ctx.base_loss()
    stream = ctx.stream()
    module = dict(ctx.folded().named_modules())[name]
    k, end = stream.module_node(name), len(stream.nodes)
    weight = module.weight
    original = weight.detach().clone()
    kind = layer_kind(module)
    quantized = [rtn_weight(original, b, ctx.weight_range, ctx.clip_search, kind) for b in widths]
    losses: list[list[torch.Tensor]] = [[] for _ in widths]
    try:
        with torch.no_grad():
            for s in range(0, ctx.x.shape[0], ctx.batch_size):
                env = stream.start(ctx.x[s:s + ctx.batch_size])
                stream.run(env, 0, k)  # the float prefix: once for every width
                for i, q in enumerate(quantized):
                    weight.copy_(q)
                    rest = {n: _copy_values(v) for n, v in env.items()}
                    stream.run(rest, k, end)
                    losses[i].append(ctx.task.sample_loss(stream.output(rest), ctx.y[s:s + ctx.batch_size]))
    finally:
        with torch.no_grad():
            weight.copy_(original)
    return np.stack([group_means(torch.cat(l).double() - base, ctx.g, ctx.num_groups)[0].numpy()
                     for l in losses])


def sensitivity_tasks(names: Sequence[str], bits: Sequence[int]) -> list[Task]:
    """One task per layer, for all its widths (the layer's float prefix runs once), in table order."""
    widths = tuple(int(b) for b in bits)
    text = ", ".join(str(b) for b in widths)
    return [Task(("sensitivity", n), f"sensitivity of layer {n!r} at {text} bits", (n, widths)) for n in names]


def _measured(model, names, bits, x, y, g, G, batch_size, weight_range, clip_search, progress,
              engine: Engine, source: nn.Module, skip_unsupported: bool, task: ModelTask,
              base: torch.Tensor | None = None) -> np.ndarray:
    ctx = _MeasuredContext(source, model, skip_unsupported, x, y, g, G, batch_size, weight_range, clip_search, task,
                           base)
    rows = engine.map(_measure_layer, sensitivity_tasks(names, bits), ctx, "sensitivity (measured)",
                      progress=progress)
    return np.stack(rows).reshape(len(names), len(bits), G).astype(np.float64)


def _fisher(model, names, bits, x, y, g, G, batch_size, weight_range, clip_search, progress,
            engine: Engine, source: nn.Module, skip_unsupported: bool, task: ModelTask) -> np.ndarray:
    """Per-group empirical Fisher diagonals by per-sample gradients (torch.func.vmap): one
    pass over the samples for all layers at once, run here whatever the engine."""
    from torch.func import functional_call, grad, vmap

    modules = dict(model.named_modules())
    weights = {f"{n}.weight": modules[n].weight.detach() for n in names}
    others = {k: v.detach() for k, v in model.named_parameters() if k not in weights}
    buffers = dict(model.named_buffers())

    def sample_loss(w, xi, yi):
        out = functional_call(model, {**others, **w, **buffers}, (xi.unsqueeze(0),))
        return task.sample_loss(out, yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros((G, *w.shape), dtype=torch.float64) for k, w in weights.items()}
    counts = torch.bincount(g, minlength=G).double().clamp_min(1.0)
    starts = range(0, x.shape[0], batch_size)
    for s in tqdm(starts, desc="sensitivity (fisher)", unit="batch", disable=not progress):
        grads = per_sample(weights, x[s:s + batch_size], y[s:s + batch_size])
        gb = g[s:s + batch_size]
        for k, gr in grads.items():
            fisher[k].index_add_(0, gb, gr.double().pow(2))
    delta = np.zeros((len(names), len(bits), G))
    for i, name in enumerate(names):
        w = weights[f"{name}.weight"]
        f = fisher[f"{name}.weight"] / counts.reshape(-1, *([1] * w.dim()))
        for j, b in enumerate(bits):
            delta[i, j] = fisher_delta(f, w, rtn_weight(w, b, weight_range, clip_search,
                                                         layer_kind(modules[name]))).numpy()
    return delta


def _output_fisher(model, names, kinds, bits, x, y, g, G, batch_size, weight_range, clip_search, progress,
                   engine: Engine, source: nn.Module, skip_unsupported: bool, task: ModelTask, base: torch.Tensor,
                   solver: QuantConfig, batch_dims: dict[str, int]) -> np.ndarray:
    """``"output-fisher"`` for the layers with a Hessian (the solver's codes of ``solver``); an
    Embedding (a lookup, no Hessian) is measured."""
    delta = np.zeros((len(names), len(bits), G))
    lookups = [i for i, n in enumerate(names) if kinds[n] == "embedding"]
    rest = [i for i in range(len(names)) if i not in lookups]
    if rest:
        delta[rest] = output_fisher_sensitivity(
            model, {names[i]: kinds[names[i]] for i in rest}, bits, x, y, g, G, batch_size, task,
            weight_range=weight_range, clip_search=solver.use_clip_search, solve=solver.method == "solver",
            order=solver.order, damp=solver.damp, block_size=solver.block_size, hessian_samples=solver.num_calib,
            progress=progress, batch_dims=batch_dims)
    if lookups:
        delta[lookups] = _measured(model, [names[i] for i in lookups], bits, x, y, g, G, batch_size, weight_range,
                                   clip_search, progress, engine, source, skip_unsupported, task, base)
    return delta


def measure_sensitivity(
    model: nn.Module,
    calib: GroupData | DataStream,
    layers: Sequence[str] | None = None,
    bit_choices: Iterable[int] = DEFAULT_BIT_CHOICES,
    method: SensitivityMethod = "measured",
    *,
    num_samples: int = 512,
    batch_size: int = 128,
    weight_range: str = "x86-safe",
    clip_search: bool = True,
    seed: int = 0,
    cache: SensitivityCache | bool = True,
    cache_path: str | Path | None = None,
    skip_unsupported: bool = False,
    progress: bool = False,
    engine: Engine | None = None,
    task: str | ModelTask | None = None,
    solver: QuantConfig | None = None,
) -> SensitivityTable:
    """Δ_g(l, b) for the quantizable layers of ``model`` (see the module docstring).

    Args:
        model: the float model (not modified; BN is folded in a copy).
        calib: group-labeled calibration data (a GroupData or a DataStream); a group-balanced
            subset of ``num_samples`` is used (of a stream, only it is read). Without labels the
            float model's top-1 is the label (module docstring).
        layers: layer names to measure (default: every quantizable Conv2d/Linear).
        bit_choices: widths to measure (2..8).
        method: ``"measured"`` (one layer quantized at a time, loss measured), ``"fisher"`` or
            ``"output-fisher"`` (:mod:`fqexport.search.output_fisher`).
        cache: ``True`` for the process-wide in-memory cache, a SensitivityCache, or ``False``.
        cache_path: optional JSON file read if its fingerprint matches, else (re)written.
        skip_unsupported: leave unsupported layers in float (as ``QuantConfig.skip_unsupported``)
            instead of raising UnsupportedLayerError.
        engine: runs the ``"measured"`` tasks, one per layer (all widths) (default: serial);
            the table does not depend on it.
        task: the model's task (:mod:`fqexport.tasks`; None: inferred as ``compress`` does),
            whose per-sample loss Δ_g measures.
        solver: for ``"output-fisher"``, the QuantConfig whose codes are priced (its ``method``,
            ``order``, ``damp``, ``block_size``, clip search per width in place of
            ``clip_search``, and ``num_calib``: the samples of the solver's Hessian; default
            ``QuantConfig()``: the solver).
    """
    check_choice(method, get_args(SensitivityMethod), "method")
    bits = check_bit_choices(bit_choices)
    if len(calib) == 0:
        raise DataError(MSG_EMPTY.format(source=calib.source))
    prepared = prepare_model(model, skip_unsupported, example=example_batch(calib))
    folded = prepared.folded
    known = prepared.names
    names = known if layers is None else list(layers)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(MSG_LAYERS.format(names=", ".join(repr(u) for u in unknown), known=", ".join(known)))
    drawn = group_balanced_indices(calib, num_samples, seed=seed)
    sub = calib.take(drawn)
    check_token_ids(folded, sub, sub, drawn, batch_size)
    task, _ = resolve_task(task, calib, model_output(folded, sub))
    options = {"method": method, "bits": bits, "layers": names, "weight_range": weight_range,
               "clip_search": bool(clip_search), "num_samples": int(num_samples), "seed": int(seed),
               "task": task.to_dict()}
    solver = solver or QuantConfig()
    if method == "output-fisher":  # the codes it prices
        options["solver"] = {"method": solver.method, "order": solver.order, "damp": solver.damp,
                             "block_size": solver.block_size, "num_calib": solver.num_calib,
                             "clip_search": [solver.use_clip_search(b) for b in bits]}
    key = _fingerprint(folded, sub, options)

    store = DEFAULT_CACHE if cache is True else (cache or None)
    if store is not None and (table := store.get(key)) is not None:
        log.info("sensitivity: cached table %s…", key[:10])
        return table
    path = Path(cache_path) if cache_path is not None else None
    if path is not None and (table := _read_cache_file(path, key, names, bits, sub.group_names)) is not None:
        log.info("sensitivity: read %s", path)
        if store is not None:
            store.put(table)
        return table

    if method != "measured" and not isinstance(task, Classification):
        raise ConfigError(MSG_NO_FISHER.format(method=method, task=task.name))
    x = torch.from_numpy(np.ascontiguousarray(sub.x))
    labels = torch.from_numpy(np.ascontiguousarray(sub.y)).long() if sub.y is not None else None
    outputs = float_outputs(folded, x, batch_size)
    y = task.loss_targets(outputs, labels)
    g = torch.from_numpy(np.ascontiguousarray(sub.group)).long()
    G = sub.num_groups
    base = _loss_of(outputs, y, batch_size, task)  # the float loss: Δ's baseline and the table's
    if method == "measured":
        delta = _measured(folded, names, bits, x, y, g, G, batch_size, weight_range, clip_search, progress,
                          engine or SerialEngine(), model, skip_unsupported, task, base)
    elif method == "output-fisher":
        kinds = {l.name: l.kind for l in prepared.layers}
        delta = _output_fisher(folded, names, kinds, bits, x, y, g, G, batch_size, weight_range, clip_search,
                               progress, engine or SerialEngine(), model, skip_unsupported, task, base, solver,
                               {l.name: l.batch_dim for l in prepared.layers})
    else:
        delta = _fisher(folded, names, bits, x, y, g, G, min(batch_size, 32), weight_range, clip_search, progress,
                        engine or SerialEngine(), model, skip_unsupported, task)
    float_loss = group_means(base, g, G)[0].numpy()
    table = SensitivityTable(
        tuple(names), bits, tuple(sub.group_names), delta, method, float_loss,
        np.bincount(sub.group, minlength=G).astype(np.int64), key,
    )
    if store is not None:
        store.put(table)
    if path is not None:
        _write_cache_file(path, table)
    return table


def search_sensitivity(model: nn.Module, calib: GroupData | DataStream, mp: MixedPrecisionConfig, base: QuantConfig, *,
                       progress: bool = False, engine: Engine | None = None,
                       layers: Sequence[str] | None = None, task: str | ModelTask | None = None) -> SensitivityTable:
    """Δ_g(l, b) as the mixed-precision search measures it (:func:`measure_sensitivity`) on
    ``layers`` (default: every quantizable layer): ``mp``'s widths, method, sample count, seed
    and cache file; ``base``'s weight range, clipping search (on unless ``base`` turns it off: the
    proxy is RTN, which wants it) and ``skip_unsupported``."""
    return measure_sensitivity(
        model, calib, layers=layers, bit_choices=mp.bit_choices, method=mp.sensitivity, num_samples=mp.sensitivity_samples,
        weight_range=base.weight_range, clip_search=True if base.clip_search is None else bool(base.clip_search),
        seed=mp.seed, cache_path=mp.cache_path, skip_unsupported=base.skip_unsupported, progress=progress,
        engine=engine, task=task, solver=base,
    )
