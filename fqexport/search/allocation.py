"""Fairness-aware bit allocation under a budget, from a per-group sensitivity table.

With Δ_g(l, b) from :mod:`fqexport.search.sensitivity` and the additive model
``D_g(a) = Σ_l Δ_g(l, a_l)`` (predicted loss increase of group g under allocation a):

* ``"worst-group"`` (default): minimise ``J(a) = max_g D_g(a) + λ · mean_g D_g(a)`` under the
  budget. ``max_g D_g = max_{w ∈ simplex} Σ_g w_g D_g``, so groups are re-weighted toward the
  worst by multiplicative weights: ``w_g ← w_g · exp(η · D_g(a_t) / max_h |D_h(a_t)|)``, and each
  step solves the inner problem ``min_a Σ_l [Σ_g w_g Δ_g(l, a_l) + λ · mean_g Δ_g(l, a_l)]`` exactly
  (multiple-choice knapsack). Every distinct allocation met is a candidate; candidates are
  ranked by J.
* ``"mean"`` (HAWQ-like): minimise ``Σ_g π_g D_g(a)``, π = the population's group shares
  (``group_weights``; uniform if not given).
* ``"weighted"``: minimise ``Σ_g w_g D_g(a)`` with the user's group weights.

Budgets (``Budget.kind``) count what the written file stores:

* ``"bits"``: stored bits per weight, scales included: ``Σ_l 8·S_l(b_l) <= B · Σ_l p_l``, with
  ``S_l(b)`` the bytes the exporter writes for layer l at width b (:func:`stored_bytes`): the
  codes in their container (int8; packed INT4 or INT2; MatMulNBits' blocked INT4 for Linear; the
  GPU target's blocked INT4 DequantizeLinear for Linear) plus the per-channel fp32 scales (and an
  int8 Linear's zero points; per-block scales for MatMulNBits and blocked INT4). A
  3-bit layer costs what its INT4 container holds, a 5-7-bit layer an int8 one.
* ``"bytes"``: ``Σ_l S_l(b_l) + overhead <= B``, ``overhead`` the rest of the file (graph,
  biases, activation scales, metadata): passed in by the search, which checks the written size.
* ``"bops"``: ``Σ_l b_l · a · MACs_l`` with the activation width a
  (:data:`fqexport.metadata.ACTIVATION_BITS`, 8).

The container of a width follows :func:`fqexport.quant.layout.layer_container` for the
storage mode (``"auto"``, ``"int8"``, ``"packed"``; by default ``QuantConfig``'s,
:data:`fqexport.config.DEFAULT_STORAGE`) and the export target (``"gpu"`` has its own
containers; every CPU target the same); ``"ideal"`` counts b bits per weight and no scales
(nominal bits; the budgets of papers, not of files).

Pinned layers (name patterns, ``fnmatch``) have a single option.

The functions take their options as arguments, for use on their own; a search fixes them once in
an :class:`AllocationOptions` and asks it for candidates.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence, get_args

import numpy as np

from fqexport.calibration.group_data import GroupWeights
from fqexport.config import (
    DEFAULT_STORAGE,
    MSG_BUDGET_KIND,
    SUPPORTED_WEIGHT_BITS,
    BudgetKind,
    BudgetStorage,
    ExportTarget,
    MixedObjective,
    check_budget,
    check_choice,
)
from fqexport.errors import ConfigError
from fqexport.metadata import ACTIVATION_BITS, FLOAT_BITS
from fqexport.quant.knapsack import solve_real
from fqexport.quant.layout import layer_container as model_layer_container
from fqexport.quant.layout import container_bytes, nbits_block_size, stored_code_bits, token_linear
from fqexport.search.sensitivity import SensitivityTable

log = logging.getLogger(__name__)

BYTES_PER_CHANNEL = 5  # fp32 scale + int8 zero point per output channel
# DP cells per knapsack solve: weights are rounded up to span/(cells/L) units, so at most
# L²/cells of the budget's span is left unused — negligible for CNN-sized layer counts.
ALLOC_MAX_CELLS = 1_000_000

MSG_WEIGHTED = (
    "objective='weighted' needs group_weights (group name -> weight >= 0, not all zero); "
    "groups: {groups}"
)
MSG_GROUP = ("group_weights (the weighted objective's; CLI --objective-weights) names {name!r}, which is not a group "
             "of the calibration data (groups: {groups})")
MSG_OBJECTIVE_UNNAMED = (
    "the weighted objective's group_weights (CLI --objective-weights) {weights} do not name group(s) {groups}: "
    "they weigh 0 in the objective, so the search does not look at their accuracy; name every group to "
    "count it (e.g. {example})"
)
MSG_PIN_NONE = "pin {pattern!r} matches no layer (layers: {layers})"
MSG_PIN_FLOAT = ("pin {pattern!r} matches {floats}, which stay(s) float: no width to search; drop the pin "
                 "(quantizable layers: {layers})")
MSG_PIN_CONFLICT = ("pins[{p!r}]={a} and pins[{q!r}]={b} both match layer {layer!r}: it is pinned twice with "
                    "different widths; give it one")
MSG_PIN_FIRST_LAST = ("pin_first_last={bits} pins layer {layer!r} (the {which} quantizable layer), which pins[{p!r}] "
                      "pins to {other}: it is pinned twice with different widths; drop one of the two")
MSG_PIN_BITS = "pin {pattern!r}={bits!r}: pinned widths must be integers from 2 to 8"
MSG_LAYER_INFO = "layer_info has no entry for layer {layer!r} of the sensitivity table"
MSG_INFEASIBLE = (
    "budget_{kind}={value:g} cannot be met: the smallest allocation (every free layer at "
    "{bmin} bits, pinned layers at their widths) needs {at_least}{need:g}. Raise the budget{smaller} or "
    "unpin layers"
)
SMALLER_WIDTH = ", add a smaller width to bit_choices"
HINT_FLOAT = (" (with the {n:,} weights of the layers that stay float, counted at 32 bits: keep fewer "
              "layers float to go lower)")
HINT_INT8 = (
    " (storage='int8' stores every width in an 8-bit container: a bits budget below ~8 stored bits "
    "needs storage='auto' or 'packed')"
)


@dataclass(frozen=True)
class LayerCost:
    """What a layer costs: weight elements, multiply-accumulates per sample, output channels,
    and its kind (``"conv"`` or ``"linear"``: a Linear's <=4-bit codes go to MatMulNBits)."""

    name: str
    params: int
    macs: int = 0
    channels: int = 0
    kind: str = "conv"


@dataclass(frozen=True)
class Budget:
    """A resource limit: ``kind`` ``"bits"`` (average weight bits), ``"bytes"`` or ``"bops"``.

    ``float_params``: weights that stay in float (unsupported layers, ``keep_float``); a bits
    budget averages over them too, at 32 bits each."""

    kind: BudgetKind
    value: float
    float_params: int = 0

    def __post_init__(self) -> None:
        check_budget(self.kind, self.value)

    def with_floats(self, avg_bits: float, params: int) -> float:
        """An average over ``params`` quantized weights as one over every weight, the float ones
        at 32 bits: ``(avg·P + 32·F) / (P + F)``."""
        floats = int(self.float_params)
        return (avg_bits * params + FLOAT_BITS * floats) / max(params + floats, 1)


def layer_container(info: LayerCost, bits: int, storage: str, target: ExportTarget = "portable") -> str:
    """The container the exporter writes ``info`` in at ``bits`` under ``storage`` for ``target``:
    ``int8``, ``int4``, ``int2``, ``nbits``, ``int4-blocked``
    (:func:`fqexport.quant.layout.layer_container`) or ``ideal``."""
    check_choice(storage, get_args(BudgetStorage), "storage")
    if storage == "ideal":
        return "ideal"
    tokens = token_linear(info.kind, info.macs, info.params)
    return model_layer_container(info.kind, int(bits), storage, tokens, target)


def container_bits(bits: int, storage: str, kind: str = "conv", target: ExportTarget = "portable") -> int:
    """Bits per weight code on disk under a storage mode (see the module docstring)."""
    c = layer_container(LayerCost("", 0, kind=kind), bits, storage, target)
    return stored_code_bits(c, bits)


def stored_bytes(info: LayerCost, bits: int, storage: str, target: ExportTarget = "portable") -> int:
    """Bytes the exporter writes for the layer's weight at ``bits`` for ``target``: codes + scales.

    int8: one byte per code and an fp32 scale per channel (a Linear also an int8 zero point per
    channel: ORT fuses QGemm only with it); int4 / int2: two / four codes per byte behind a Cast
    to int8 (:mod:`fqexport.exporters.weight_packed`), the same scales and zero points
    (a conv's zero point 0 is left out); nbits (MatMulNBits): rows padded to whole blocks of
    ``nbits_block_size(K)``, two codes per byte, one fp32 scale per block; int4-blocked (the GPU,
    :mod:`fqexport.exporters.weight_blocked`): the INT4 codes two per byte, unpadded, one fp32
    scale per (block of ``nbits_block_size(K)``, channel), no zero point; ``ideal``: ``b`` bits
    per weight and :data:`BYTES_PER_CHANNEL` per channel.
    """
    c = layer_container(info, bits, storage, target)
    n, p = max(int(info.channels), 1), int(info.params)
    if c == "ideal":
        return math.ceil(int(bits) * p / 8) + BYTES_PER_CHANNEL * n
    return container_bytes(c, p, n, info.kind, nbits_block_size(p // n))


def stored_bits(info: LayerCost, bits: int, storage: str, target: ExportTarget = "portable") -> float:
    """Stored bits per weight of the layer at ``bits``, scales included (``ideal``: ``bits``)."""
    if storage == "ideal":
        return float(bits)
    return 8.0 * stored_bytes(info, bits, storage, target) / max(int(info.params), 1)


def layer_resource(info: LayerCost, bits: int, kind: str, storage: BudgetStorage = DEFAULT_STORAGE,
                   target: ExportTarget = "portable") -> float:
    """The budget resource one layer uses at ``bits``: stored bit·params (``ideal``: nominal),
    stored bytes or BOPs."""
    if kind == "bits":
        return stored_bits(info, bits, storage, target) * info.params
    if kind == "bytes":
        return float(stored_bytes(info, bits, storage, target))
    if kind == "bops":
        return float(bits * ACTIVATION_BITS * info.macs)
    raise ConfigError(MSG_BUDGET_KIND.format(kind=kind))


def layer_options(infos: Sequence[LayerCost], widths: Sequence[int], pinned: Mapping[str, int], kind: str,
                  storage: BudgetStorage = DEFAULT_STORAGE, target: ExportTarget = "portable",
                  ) -> tuple[list[tuple[int, ...]], list[tuple[float, ...]]]:
    """Per layer, the widths the allocator may give it (its pin, else ``widths``) and the
    resource of each (:func:`layer_resource`)."""
    options = [(pinned[i.name],) if i.name in pinned else tuple(widths) for i in infos]
    return options, [tuple(layer_resource(i, b, kind, storage, target) for b in opts) for i, opts in zip(infos, options)]


def budget_capacity(infos: Sequence[LayerCost], budget: Budget, overhead: float = 0.0) -> float:
    """The capacity in resource units: ``B · (Σ p + F) − 32 · F`` for bits (``F`` float weights
    counted at 32 bits), ``B − overhead`` for bytes (the file's bytes outside the layers'
    weights), the value itself for BOPs."""
    if budget.kind == "bits":
        floats = int(budget.float_params)
        return float(budget.value) * (sum(i.params for i in infos) + floats) - FLOAT_BITS * floats
    if budget.kind == "bytes":
        return float(budget.value) - float(overhead)
    return float(budget.value)


def resource_used(bits: Mapping[str, int], infos: Sequence[LayerCost], kind: str, storage: BudgetStorage = DEFAULT_STORAGE,
                  target: ExportTarget = "portable") -> float:
    """Resource of a whole allocation, in the budget's unit (average stored bits for ``"bits"``;
    with ``storage="ideal"`` the nominal average width)."""
    total = sum(layer_resource(i, bits[i.name], kind, storage, target) for i in infos)
    if kind == "bits":
        return total / max(sum(i.params for i in infos), 1)
    return total


def resolve_pins(pins: Mapping[str, int] | None, layers: Sequence[str], floats: Sequence[Any] = ()) -> dict[str, int]:
    """Layer name -> pinned width from name patterns (``fnmatch``; ``"fc"``, ``"layer3.*"``).
    ``floats``: the model's weight layers left float (``FloatLayer``: name, kind, reason), which a
    pattern matching no quantizable layer is told to match (:data:`MSG_PIN_FLOAT`)."""
    out: dict[str, int] = {}
    by: dict[str, str] = {}  # layer -> the pattern that pinned it
    for pattern, bits in dict(pins or {}).items():
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_WEIGHT_BITS:
            raise ConfigError(MSG_PIN_BITS.format(pattern=pattern, bits=bits))
        hits = [l for l in layers if fnmatch.fnmatchcase(l, pattern)]
        if not hits:
            kept = [f"'{f.name}' ({f.kind}; {f.reason})" for f in floats if fnmatch.fnmatchcase(f.name, pattern)]
            raise ConfigError(MSG_PIN_FLOAT.format(pattern=pattern, floats=", ".join(kept), layers=", ".join(layers))
                              if kept else MSG_PIN_NONE.format(pattern=pattern, layers=", ".join(layers)))
        for l in hits:
            if l in out and out[l] != int(bits):
                raise ConfigError(MSG_PIN_CONFLICT.format(layer=l, p=by[l], a=out[l], q=pattern, b=int(bits)))
            out[l], by[l] = int(bits), by.get(l, pattern)
    return out


def first_last_pins(layers: Sequence[str], bits: int | None) -> dict[str, int]:
    """Pins for the first and the last layer (``MixedPrecisionConfig.pin_first_last``), as exact
    names usable as patterns; none when ``bits`` is ``None``."""
    return {layers[0]: int(bits), layers[-1]: int(bits)} if layers and bits is not None else {}


def search_pins(pins: Mapping[str, int] | None, layers: Sequence[str], first_last: int | None = None) -> dict[str, int]:
    """The patterns of ``pins`` plus the first/last-layer pins; a layer pinned by both to
    different widths is an error (:func:`resolve_pins`)."""
    merged = dict(pins or {})
    for name, bits in first_last_pins(layers, first_last).items():
        for pattern, other in merged.items():  # a user's pattern that also matches the layer
            if fnmatch.fnmatchcase(name, pattern) and int(other) != bits:
                raise ConfigError(MSG_PIN_FIRST_LAST.format(bits=bits, layer=name, p=pattern, other=other,
                                                            which="first" if name == layers[0] else "last"))
        merged.setdefault(name, bits)
    return merged


def check_group_weights(weights: Mapping[str, float] | None, groups: Sequence[str]) -> None:
    """ConfigError when the weighted objective's ``weights`` name a group ``groups`` lacks, or are
    negative or all zero: checked on the data before the sensitivity is measured (the search's
    first minutes), as the allocation checks them again on the table."""
    _group_vector(weights, groups)


def _group_vector(weights: Mapping[str, float] | None, groups: Sequence[str]) -> np.ndarray:
    if weights is not None and (any(float(w) < 0 for w in weights.values()) or not sum(map(float, weights.values())) > 0):
        raise ConfigError(MSG_WEIGHTED.format(groups=", ".join(groups)))
    return GroupWeights(weights).vector(groups, unknown=MSG_GROUP, unnamed=MSG_OBJECTIVE_UNNAMED)


@dataclass(frozen=True)
class Allocation:
    """A bit width per layer with its predicted per-group loss increase and cost.

    Attributes:
        bits: layer name -> width.
        predicted: group name -> predicted loss increase ``D_g = Σ_l Δ_g(l, b_l)``.
        objective: the objective it was chosen for.
        score: the objective's value (J for worst-group, the weighted mean otherwise).
        budget: the budget it satisfies.
        used: resource used, in the budget's unit (average stored bits, bytes or BOPs); an
            average counts the budget's float weights at 32 bits, as the budget does.
        avg_bits: parameter-weighted average nominal width (float weights at 32 bits).
        group_weights: the group weights of the inner problem that produced it.
        stored_bits: parameter-weighted stored bits per weight, scales included, in ``storage``
            (float weights at 32 bits).
        weight_bytes: bytes of the searched layers' codes, scales (and written zero points) in
            ``storage``; the float weights are not in it (:attr:`file_weight_bytes` adds them).
        storage: the storage mode the sizes are counted in.
    """

    bits: dict[str, int]
    predicted: dict[str, float]
    objective: str
    score: float
    budget: Budget
    used: float
    avg_bits: float
    group_weights: dict[str, float] = field(default_factory=dict)
    stored_bits: float = float("nan")
    weight_bytes: int = 0
    storage: str = ""

    @property
    def uniform_width(self) -> int | None:
        """The width when every layer has the same one, else None."""
        widths = set(self.bits.values())
        return next(iter(widths)) if len(widths) == 1 else None

    @property
    def file_weight_bytes(self) -> int:
        """Every weight the file stores, as :attr:`stored_bits` counts them: :attr:`weight_bytes`
        plus the budget's float weights at 4 bytes each."""
        return int(self.weight_bytes + FLOAT_BITS // 8 * int(self.budget.float_params))

    @property
    def predicted_worst(self) -> float:
        return max(self.predicted.values()) if self.predicted else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": dict(self.bits),
            "predicted_loss_increase": dict(self.predicted),
            "objective": self.objective,
            "score": self.score,
            "budget": {"kind": self.budget.kind, "value": self.budget.value},
            "used": self.used,
            "avg_bits": self.avg_bits,
            "stored_bits": self.stored_bits,
            "weight_bytes": self.weight_bytes,
            "file_weight_bytes": self.file_weight_bytes,
            "storage": self.storage,
            "group_weights": dict(self.group_weights),
        }


@dataclass(frozen=True)
class _Problem:
    layers: tuple[str, ...]
    options: tuple[tuple[int, ...], ...]  # widths per layer
    delta: tuple[np.ndarray, ...]  # per layer [options, groups]
    resources: tuple[tuple[float, ...], ...]
    capacity: float
    groups: tuple[str, ...]
    overhead: float = 0.0
    storage: str = DEFAULT_STORAGE
    target: str = "portable"


def _delta_for(table: SensitivityTable, layer: str, bits: int) -> np.ndarray:
    """Δ_g(l, b) as the allocator uses it: ``max(0, max_{b' ≥ b} Δ_g(l, b'))`` over the measured
    widths (for a width above every measured one, the widest).

    Fewer bits are never predicted to hurt a group less than more bits, and quantization never
    to help: a measured Δ below zero or below a wider width's is sampling noise of a one-layer
    measurement on a few hundred samples per group. Without this envelope the knapsack "buys"
    such loss decreases with fewer bits (tabular MLP at a 4-bit budget: 2.1 bits chosen).
    """
    widths = [b for b in table.bits if b >= bits] or [max(table.bits)]
    envelope = np.max(np.stack([table.at(layer, b) for b in widths]), axis=0)
    return np.maximum(envelope, 0.0)


def _problem(table, infos, budget, pins, storage, overhead: float = 0.0, target: str = "portable") -> _Problem:
    by_name = {i.name: i for i in infos}
    for l in table.layers:
        if l not in by_name:
            raise ConfigError(MSG_LAYER_INFO.format(layer=l))
    layer_infos = [by_name[l] for l in table.layers]
    for i, layer in enumerate(table.layers):  # not a budget question: said as what it is
        d = table.delta[i]  # [bits, groups]
        bad = np.isnan(d) | np.isposinf(d).all(axis=0, keepdims=True)
        if bad.any():
            k, g = np.argwhere(bad)[0]
            raise ConfigError(MSG_NONFINITE_SENSITIVITY.format(layer=layer, bits=table.bits[k], group=table.groups[g],
                                                               value=d[k, g]))
    options, res = layer_options(layer_infos, table.bits, resolve_pins(pins, table.layers), budget.kind, storage, target)
    delta = [np.stack([_delta_for(table, l, b) for b in opts]) for l, opts in zip(table.layers, options)]
    return _Problem(tuple(table.layers), tuple(options), tuple(delta), tuple(res),
                    budget_capacity(layer_infos, budget, overhead), tuple(table.groups), float(overhead),
                    storage, target)


MSG_NONFINITE_SENSITIVITY = (
    "the sensitivity of layer '{layer}' at {bits} bits for group '{group}' is {value} (and no width of it is "
    "finite where that is inf): the model's loss is not finite there; check the model and the calibration data"
)


def _solve_weighted(p: _Problem, w: np.ndarray, mean_weight: float, max_cells: int, budget: Budget, bmin: int) -> tuple[int, ...]:
    """Exact knapsack on cost_lb = Σ_g w_g Δ_g(l,b) + λ·mean_g Δ_g(l,b)."""
    costs = [d @ w + mean_weight * d.mean(axis=1) for d in p.delta]
    try:
        return solve_real(costs, p.resources, p.capacity, max_cells).choice
    except ConfigError as err:
        need = sum(min(r) for r in p.resources)
        if budget.kind == "bits":
            # average stored bits over every weight, float ones at 32: capacity = B·(P + F) − 32·F
            floats = FLOAT_BITS * float(budget.float_params)
            need = (need + floats) / max((p.capacity + floats) / budget.value, 1)
        if budget.kind == "bytes":
            need += p.overhead
        hint = HINT_INT8 if p.storage == "int8" and budget.kind != "bops" else ""
        if budget.kind == "bits" and budget.float_params:
            hint += HINT_FLOAT.format(n=int(budget.float_params))
        # a file's bytes outside the weights are a floor here (measured once a file is written)
        at_least = "at least " if budget.kind == "bytes" else ""
        smaller = SMALLER_WIDTH if bmin > min(SUPPORTED_WEIGHT_BITS) else ""  # 2 bits is the floor already
        raise ConfigError(MSG_INFEASIBLE.format(kind=budget.kind, value=budget.value, bmin=bmin, need=need,
                                                at_least=at_least, smaller=smaller) + hint) from err


def _make(p: _Problem, choice, objective, score_fn, budget, infos, storage, w) -> Allocation:
    bits = {l: p.options[i][k] for i, (l, k) in enumerate(zip(p.layers, choice))}
    d = sum(p.delta[i][k] for i, k in enumerate(choice))
    params = sum(i.params for i in infos)
    used = resource_used(bits, infos, budget.kind, storage, p.target)
    if budget.kind == "bytes":
        used += p.overhead
    elif budget.kind == "bits":  # what the budget averages: float weights too, at 32 bits
        used = budget.with_floats(used, params)
    avg = budget.with_floats(resource_used(bits, infos, "bits", "ideal"), params)
    real = DEFAULT_STORAGE if storage == "ideal" else storage  # the bytes of the file the export writes
    return Allocation(
        bits, {g: float(v) for g, v in zip(p.groups, d)}, objective, float(score_fn(d)), budget,
        float(used), float(avg), {g: float(v) for g, v in zip(p.groups, w)},
        float(budget.with_floats(resource_used(bits, infos, "bits", storage, p.target), params)),
        int(resource_used(bits, infos, "bytes", real, p.target)), storage,
    )


def _score_fn(objective: str, mean_weight: float, w: np.ndarray | None):
    """Predicted objective of per-group loss increases D: J = max_g D_g + λ·mean_g D_g for
    ``"worst-group"``, else the weighted sum D·w."""
    if objective == "worst-group":
        lam = float(mean_weight)
        return lambda d: float(d.max() + lam * d.mean())
    return lambda d: float(d @ w)


def candidate_allocations(
    table: SensitivityTable,
    layer_info: Sequence[LayerCost],
    budget: Budget,
    objective: MixedObjective = "worst-group",
    pins: Mapping[str, int] | None = None,
    *,
    group_weights: Mapping[str, float] | None = None,
    mean_weight: float = 0.1,
    steps: int = 60,
    eta: float = 0.5,
    storage: BudgetStorage = DEFAULT_STORAGE,
    max_cells: int = ALLOC_MAX_CELLS,
    overhead: float = 0.0,
    target: ExportTarget = "portable",
) -> list[Allocation]:
    """Distinct allocations within the budget, best predicted objective first.

    ``"mean"`` and ``"weighted"`` give one allocation (the knapsack optimum). ``"worst-group"``
    gives every distinct iterate of the multiplicative-weights loop (plus the uniform-weight and
    the single-group optima), ranked by ``J = max_g D_g + λ · mean_g D_g``. ``overhead``: the
    file's bytes outside the layers' weights (``"bytes"`` budgets); ``target``: the export target
    whose containers the sizes count.
    """
    check_choice(objective, get_args(MixedObjective), "objective")
    if objective == "weighted" and not group_weights:
        raise ConfigError(MSG_WEIGHTED.format(groups=", ".join(table.groups)))
    layer_info = [i for i in layer_info if i.name in table.layers]
    p = _problem(table, layer_info, budget, pins, storage, overhead, target)
    bmin = min(table.bits)
    G = len(p.groups)
    if objective in ("mean", "weighted"):
        w = _group_vector(group_weights, p.groups)
        choice = _solve_weighted(p, w, 0.0, max_cells, budget, bmin)
        return [_make(p, choice, objective, _score_fn(objective, mean_weight, w), budget, layer_info, storage, w)]

    lam = float(mean_weight)
    score = _score_fn(objective, lam, None)
    seen: dict[tuple[int, ...], Allocation] = {}

    def visit(w: np.ndarray) -> np.ndarray:
        choice = _solve_weighted(p, w, lam, max_cells, budget, bmin)
        if choice not in seen:
            seen[choice] = _make(p, choice, objective, score, budget, layer_info, storage, w)
        return np.array([seen[choice].predicted[g] for g in p.groups])

    for g in range(G):  # each group alone
        visit(np.eye(G)[g])
    w = np.full(G, 1.0 / G)
    for _ in range(int(steps)):
        d = visit(w)
        scale = max(float(np.abs(d).max()), 1e-12)
        # w ← w · exp(η d / max|d|), normalised: toward the groups that lose most (in logs, shifted
        # by their maximum: a large η overflowed exp to inf, the weights became NaN, and the
        # knapsack then called a budget it can meet infeasible)
        logits = np.log(np.maximum(w, 1e-300)) + float(eta) * d / scale
        w = np.exp(logits - logits.max())
        w = w / w.sum()
    ranked = sorted(seen.values(), key=lambda a: (a.score, -a.used))
    log.info("worst-group allocation: %d distinct candidates, best J=%.4g", len(ranked), ranked[0].score)
    return ranked


def rescore(
    alloc: Allocation,
    objective: MixedObjective,
    *,
    group_weights: Mapping[str, float] | None = None,
    mean_weight: float = 0.1,
) -> Allocation:
    """``alloc`` scored like ``objective`` (e.g. the mean-objective optimum among worst-group
    candidates), so that the scores of a candidate pool are comparable. ``group_weights`` keeps
    the inner problem's weights that produced the allocation."""
    groups = tuple(alloc.predicted)
    w = None if objective == "worst-group" else _group_vector(group_weights, groups)
    d = np.array([alloc.predicted[g] for g in groups], dtype=np.float64)
    return replace(alloc, objective=objective, score=float(_score_fn(objective, mean_weight, w)(d)))


def uniform_allocations(
    table: SensitivityTable,
    layer_info: Sequence[LayerCost],
    budget: Budget,
    objective: MixedObjective = "worst-group",
    pins: Mapping[str, int] | None = None,
    *,
    group_weights: Mapping[str, float] | None = None,
    mean_weight: float = 0.1,
    storage: BudgetStorage = DEFAULT_STORAGE,
    overhead: float = 0.0,
    target: ExportTarget = "portable",
) -> list[Allocation]:
    """Every free layer at one measured width (pins kept), for every width that fits the
    budget, widest first, scored like the objective; empty when none fits."""
    layer_info = [i for i in layer_info if i.name in table.layers]
    p = _problem(table, layer_info, budget, pins, storage, overhead, target)
    pinned = resolve_pins(pins, table.layers)
    if objective == "worst-group":
        w = np.full(len(p.groups), 1.0 / len(p.groups))
    else:
        w = _group_vector(group_weights, p.groups)
    score = _score_fn(objective, mean_weight, w)
    out = []
    for width in sorted(table.bits, reverse=True):
        choice = tuple(0 if l in pinned else p.options[i].index(width) for i, l in enumerate(p.layers))
        if sum(p.resources[i][k] for i, k in enumerate(choice)) <= p.capacity:
            out.append(_make(p, choice, objective, score, budget, layer_info, storage, w))
    return out



@dataclass(frozen=True)
class AllocationOptions:
    """The allocator's options besides the table and the layer costs, fixed once per search
    (:func:`fqexport.search.candidate_pool.allocation_options` builds them from the configs).

    Attributes:
        budget: the resource limit.
        objective: ``"worst-group"``, ``"mean"`` or ``"weighted"``.
        pins: layer-name patterns -> width (the first/last-layer pins merged in).
        group_weights: the inner problem's group weights (``None``: equal).
        mean_weight: λ of the mean term of the worst-group objective.
        steps: multiplicative-weights steps of the worst-group search.
        eta: step size of the multiplicative-weights update.
        storage: the storage mode the sizes are counted in.
        overhead: the file's bytes outside the layers' weights (``"bytes"`` budgets).
        target: the export target whose containers the sizes count (``"gpu"`` has its own).
    """

    budget: Budget
    objective: MixedObjective = "worst-group"
    pins: Mapping[str, int] = field(default_factory=dict)
    group_weights: Mapping[str, float] | None = None
    mean_weight: float = 0.1
    steps: int = 60
    eta: float = 0.5
    storage: BudgetStorage = DEFAULT_STORAGE
    overhead: float = 0.0
    target: ExportTarget = "portable"

    def candidates(self, table: SensitivityTable, layer_info: Sequence[LayerCost]) -> list[Allocation]:
        """:func:`candidate_allocations` under these options."""
        return candidate_allocations(
            table, layer_info, self.budget, self.objective, self.pins, group_weights=self.group_weights,
            mean_weight=self.mean_weight, steps=self.steps, eta=self.eta, storage=self.storage,
            overhead=self.overhead, target=self.target,
        )

    def uniforms(self, table: SensitivityTable, layer_info: Sequence[LayerCost]) -> list[Allocation]:
        """:func:`uniform_allocations` under these options."""
        return uniform_allocations(
            table, layer_info, self.budget, self.objective, self.pins, group_weights=self.group_weights,
            mean_weight=self.mean_weight, storage=self.storage, overhead=self.overhead, target=self.target,
        )

    def rescore(self, alloc: Allocation) -> Allocation:
        """``alloc`` scored like these options' objective (:func:`rescore`)."""
        return rescore(alloc, self.objective, group_weights=self.group_weights, mean_weight=self.mean_weight)
