"""Typed, frozen configuration objects, checked once in ``__post_init__``."""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Mapping, Sequence, get_args

import numpy as np

from fqexport.errors import ConfigError
from fqexport.exporters.cpu_isa import usable_cpus

# Every set of choices is defined once, here, as a Literal; tuples come from ``get_args``.
WeightBits = Literal[2, 3, 4, 5, 6, 7, 8]
SUPPORTED_WEIGHT_BITS: tuple[int, ...] = get_args(WeightBits)
Method = Literal["solver", "rtn"]
# Column orders of the solver (fqexport.quant.solver); all but "natural" rank by a score.
Order = Literal["sensitivity", "hessian-diag", "natural", "obs"]
SolverTarget = Literal["float-output", "layer"]
Calibration = Literal["minmax", "percentile", "mse"]
WeightRange = Literal["x86-safe", "full"]
# The CPU/GPU family an export is for (docs/kernel-targets.md). ``portable``: safe on all of them,
# checked like the most restrictive one (x86-avx2). The export check emulates the target's int8
# kernels (exporters/kernel_emulation.py); ``gpu`` has no emulated CPU kernels.
ExportTarget = Literal["portable", "x86-avx2", "x86-vnni", "arm64", "gpu"]
# The int8 kernel families validate gates (exporters/kernel_emulation.py): "native" (this CPU) and
# the emulated ones.
KernelTarget = Literal["native", "x86-avx2", "x86-vnni", "arm64"]
Storage = Literal["auto", "int8", "packed"]
# The storage of QuantConfig and of the allocator when none is given: one default, so what the
# allocator counts by default is what compress stores by default.
DEFAULT_STORAGE: Storage = "auto"
# Storage modes a bytes budget can be counted in: the export's, or "ideal" (b bits per weight).
BudgetStorage = Literal[Storage, "ideal"]
Device = Literal["auto", "cpu", "cuda"]
MixedObjective = Literal["worst-group", "mean", "weighted"]
SensitivityMethod = Literal["measured", "fisher", "output-fisher"]
BudgetKind = Literal["bits", "bytes", "bops"]
DEFAULT_BIT_CHOICES = (2, 3, 4, 5, 6, 8)
# Widths of the mixed-precision search by default: the containers ONNX Runtime loads (INT2, INT4,
# int8); 3 and 5-7 bits only when asked, stored (and counted) in the next container up.
SEARCH_BIT_CHOICES = (2, 4, 8)
# ONNX Runtime's intra-op threads at most (it takes an int32; more than this is a typo, not a machine)
MAX_THREADS = 4096
# Executors of the search's independent tasks (fqexport.engine); "auto": local with more than one core.
EngineKind = Literal["auto", "serial", "local", "ray"]
StartMethod = Literal["forkserver", "spawn"]

MSG_BITS = "{where}={bits!r} is not supported: weight bits must be an integer from 2 to 8"
MSG_CHOICE = "{where}={value!r} is not one of {choices}"
MSG_BIT_CHOICES = "bit_choices={bits!r} must be a non-empty set of integers from 2 to 8"
MSG_BUDGET_KIND = "budget kind={kind!r} is not one of " + ", ".join(get_args(BudgetKind))
MSG_BUDGET_VALUE = "budget_{kind}={value!r} must be a finite number > 0"
MSG_BUDGET_BITS = ("budget_bits={value!r} must be in [2, 32] (stored bits per weight, scales included: a uniform "
                   "8-bit file stores a little over 8)")



MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take it


def check_seed(seed: object, name: str = "seed") -> None:
    """ConfigError unless ``seed`` is an integer in [0, 2**32 - 1] (a negative one failed deep in numpy)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) <= MAX_SEED:
        raise ConfigError(f"{name}={seed!r} must be an integer in [0, {MAX_SEED}]")

def check_bits(bits: object, where: str) -> int:
    """``bits`` as an int if it is a supported weight width (an integer from 2 to 8, numpy's
    too), else ConfigError."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in SUPPORTED_WEIGHT_BITS:
        raise ConfigError(MSG_BITS.format(where=where, bits=bits))
    return int(bits)


MSG_TYPE = "{where}={value!r} must be {kind}"


def as_int(value: object, where: str) -> int:
    """``value`` as a Python int (numpy integers too), else ConfigError naming ``where`` (a bool,
    a float, a string or None is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(MSG_TYPE.format(where=where, value=value, kind="an integer"))
    return int(value)


def as_real(value: object, where: str) -> float:
    """``value`` as a Python float (ints and numpy numbers too), else ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(MSG_TYPE.format(where=where, value=value, kind="a number"))
    return float(value)


def as_bool(value: object, where: str, optional: bool = False) -> bool | None:
    """``value`` as a bool (numpy's too; ``None`` when ``optional``), else ConfigError: the string
    "False" would count as true."""
    if optional and value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        kind = "True, False or None" if optional else "True or False"
        raise ConfigError(MSG_TYPE.format(where=where, value=value, kind=kind))
    return bool(value)


MSG_ARGUMENT = "{where} must be {kind}, not {got}{hint}"


def check_argument(value: object, kind: type | tuple[type, ...], where: str, hint: str = "") -> None:
    """ConfigError naming the argument ``where`` unless ``value`` is a ``kind`` (``None`` passes:
    a default), so that a dict where a config goes is said at the call, not an AttributeError
    deep inside."""
    if value is not None and not isinstance(value, kind):
        names = " or ".join(("torch.nn." if k.__module__.startswith("torch.nn") else "") + k.__name__
                            for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(MSG_ARGUMENT.format(where=where, kind=f"a {names}", got=type(value).__name__, hint=hint))


def _frozen(value: object) -> object:
    """``value`` with its dicts and lists as tuples, for a hash."""
    if isinstance(value, Mapping):
        return tuple(sorted(((str(k), _frozen(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def hash_fields(self: object) -> int:
    """A frozen config's hash over its fields, its dicts (layer_bits, pins, group weights) included:
    the generated one raised "unhashable type: 'dict'"."""
    return hash((type(self).__name__, *(_frozen(getattr(self, f.name)) for f in fields(self))))


class FrozenDict(dict):
    """A dict a frozen config holds (``layer_bits``, ``pins``, ``group_weights``): reading is a
    dict's, writing raises, so that a stored config keeps its checked values and its hash
    (``q.layer_bits["fc"] = 99`` changed both after the checks). Pickles, copies and serialises
    to JSON as a dict does."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a config's mapping is frozen: make a new config with dataclasses.replace(config, field={...})")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self):  # pickle / deepcopy rebuild it whole (not item by item through __setitem__)
        return FrozenDict, (dict(self),)


def _set(spec: object, **values: object) -> None:
    """Store normalised values on a frozen spec (plain Python numbers: the metadata is JSON)."""
    for name, value in values.items():
        object.__setattr__(spec, name, value)


def check_group_weight_values(weights: Mapping[Any, Any], where: str) -> dict[Any, float]:
    """``weights`` (group -> weight) as plain floats, each finite and >= 0, not all zero; ConfigError
    naming ``where`` and the group otherwise."""
    out = {g: as_real(w, f"{where}[{g!r}]") for g, w in weights.items()}
    for g, w in out.items():
        if not (0.0 <= w < math.inf):
            raise ConfigError(f"{where}[{g!r}]={w!r} must be a finite number >= 0")
    if sum(out.values()) <= 0:
        raise ConfigError(f"{where} must not all be zero")
    return out


def check_choice(value: object, choices: tuple[str, ...], where: str) -> None:
    """ConfigError naming ``where`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(MSG_CHOICE.format(where=where, value=value, choices=", ".join(choices)))


def check_bit_choices(bits: object) -> tuple[int, ...]:
    """Candidate widths as a sorted tuple without duplicates, each an int from 2 to 8."""
    try:
        values = list(bits)  # type: ignore[call-overload]
    except TypeError as err:
        raise ConfigError(MSG_BIT_CHOICES.format(bits=bits)) from err
    if not values or any(
        isinstance(b, bool) or not isinstance(b, (int, np.integer)) or int(b) not in SUPPORTED_WEIGHT_BITS
        for b in values
    ):
        raise ConfigError(MSG_BIT_CHOICES.format(bits=bits))
    return tuple(sorted({int(b) for b in values}))


def plain_number(value: object) -> object:
    """A numpy scalar as the Python number it prints as (``np.float32(3.3)`` is 3.3, not
    3.2999999523: the metadata records what was typed), an int as an int; anything else as it is."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(str(value))
    return value


def check_budget(kind: object, value: object) -> float:
    """The one check of a budget (config, allocation, sweep): ``kind`` one of
    :data:`BudgetKind`, ``value`` a finite number > 0, and in [2, 32] for stored bits per weight."""
    if kind not in get_args(BudgetKind):
        raise ConfigError(MSG_BUDGET_KIND.format(kind=kind))
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or not float(value) > 0:
        raise ConfigError(MSG_BUDGET_VALUE.format(kind=kind, value=value))
    if kind == "bits" and not 2.0 <= float(value) <= 32.0:
        raise ConfigError(MSG_BUDGET_BITS.format(value=value))
    return float(value)


MSG_KEEP_FLOAT = (
    "keep_float[{i}]={value!r} must be a module name or regex (a str), 'type:ClassName', or an "
    "nn.Module subclass, e.g. keep_float=('fc', r'layer4\\..*', 'type:Conv1d'); CLI: --keep-float fc"
)
MSG_KEEP_FLOAT_REGEX = "keep_float[{i}]={value!r} is not a valid regular expression: {err}"
MSG_UNKNOWN_OPTION = "QuantConfig got an unexpected keyword argument {name!r} (options: {options})"


def _check_keep_float(patterns: object) -> tuple:
    """``keep_float`` as a tuple of str patterns and module types, each checked."""
    if isinstance(patterns, (str, type)):
        patterns = (patterns,)
    if not isinstance(patterns, (list, tuple, set, frozenset)):
        raise ConfigError(MSG_TYPE.format(where="keep_float", value=patterns, kind="a pattern or a tuple of them"))
    out = []
    for i, value in enumerate(patterns):  # type: ignore[union-attr]
        if isinstance(value, type):
            out.append(value)
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(MSG_KEEP_FLOAT.format(i=i, value=value))
        if not value.startswith("type:"):
            try:
                re.compile(value)
            except re.error as err:
                raise ConfigError(MSG_KEEP_FLOAT_REGEX.format(i=i, value=value, err=err)) from err
        out.append(value)
    return tuple(out)


# the options only method='solver' reads
SOLVER_OPTIONS = ("order", "damp", "solver_target", "block_size")
MSG_QUANT_ONLY_WITH = (
    "QuantConfig.{field}={value!r} is only used with {key}={wanted!r} (got {key}={got!r}), so it would be "
    "ignored: set {key}={wanted!r}, or leave {field} at its default ({default!r})"
)


def _refuse_ignored(spec: Any, fields: Sequence[str], key: str, wanted: str) -> None:
    """A ConfigError (:data:`MSG_QUANT_ONLY_WITH`) for the first of ``fields`` that ``spec`` sets away
    from its default while ``spec.key`` is not ``wanted``: the CLI refuses such a flag, and the
    file's ``settings`` would record an option that decided nothing."""
    for name in fields:
        default = spec.__dataclass_fields__[name].default
        if getattr(spec, name) != default:
            raise ConfigError(MSG_QUANT_ONLY_WITH.format(field=name, value=getattr(spec, name), key=key, wanted=wanted,
                                                         got=getattr(spec, key), default=default))


@dataclass(frozen=True)
class WeightSpec:
    """How the weights are quantized, and which weight layers are: see :class:`QuantConfig`."""

    __hash__ = hash_fields

    weight_bits: int = 8
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    method: Method = "solver"
    order: Order = "sensitivity"
    damp: float = 0.01
    solver_target: SolverTarget = "float-output"
    block_size: int = 128
    weight_range: WeightRange = "x86-safe"
    clip_search: bool | None = None
    bias_correction: bool = True
    bn_reestimate: bool = True
    keep_float: tuple = ()
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.layer_bits, Mapping):
            raise ConfigError(MSG_TYPE.format(where="layer_bits", value=self.layer_bits,
                                              kind="a mapping of layer name to width, e.g. {'fc': 8}"))
        _set(self, weight_bits=check_bits(self.weight_bits, "weight_bits"),
             layer_bits=FrozenDict({name: check_bits(bits, f"layer_bits[{name!r}]")
                                    for name, bits in self.layer_bits.items()}))
        check_choice(self.method, get_args(Method), "method")
        check_choice(self.order, get_args(Order), "order")
        check_choice(self.solver_target, get_args(SolverTarget), "solver_target")
        check_choice(self.weight_range, get_args(WeightRange), "weight_range")
        _set(self, damp=as_real(self.damp, "damp"), block_size=as_int(self.block_size, "block_size"),
             clip_search=as_bool(self.clip_search, "clip_search", optional=True),
             bias_correction=as_bool(self.bias_correction, "bias_correction"),
             bn_reestimate=as_bool(self.bn_reestimate, "bn_reestimate"), strict=as_bool(self.strict, "strict"))
        if not (0.0 <= self.damp < 10.0):
            raise ConfigError(f"damp={self.damp!r} must be in [0, 10)")
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size!r} must be >= 1")
        if self.keep_float is None:
            raise ConfigError(MSG_TYPE.format(where="keep_float", value=None, kind="a pattern or a tuple of them"))
        object.__setattr__(self, "keep_float", _check_keep_float(self.keep_float))
        if self.method == "rtn":  # the solver's options, set away from their defaults, would be ignored
            _refuse_ignored(self, SOLVER_OPTIONS, "method", "solver")

    @property
    def skip_unsupported(self) -> bool:
        """Leave layers fqexport cannot quantize in float (with a warning) unless ``strict``."""
        return not self.strict

    def use_clip_search(self, bits: int) -> bool:
        """``clip_search`` resolved for a ``bits``-wide layer (see :class:`QuantConfig`)."""
        if self.clip_search is not None:
            return bool(self.clip_search)
        return self.method == "rtn" or bits <= 2

    def bits_for(self, layer: str) -> int:
        """Weight width of ``layer`` (its ``layer_bits`` entry, else ``weight_bits``)."""
        return int(self.layer_bits.get(layer, self.weight_bits))


# what ``method="rtn"`` leaves the solver's options at (a config made for the solver, reused for RTN)
SOLVER_DEFAULTS = {name: WeightSpec.__dataclass_fields__[name].default for name in SOLVER_OPTIONS}


@dataclass(frozen=True)
class ActivationSpec:
    """The calibration data and the activation ranges observed on it: see :class:`QuantConfig`."""

    __hash__ = hash_fields

    calibration: Calibration = "minmax"
    percentile: float = 99.99
    num_calib: int = 512
    batch_size: int = 64
    group_weights: Mapping[str, float] | Literal["samples"] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.calibration, get_args(Calibration), "calibration")
        _set(self, percentile=as_real(self.percentile, "percentile"), num_calib=as_int(self.num_calib, "num_calib"),
             batch_size=as_int(self.batch_size, "batch_size"))
        if not (50.0 < self.percentile <= 100.0):
            raise ConfigError(f"percentile={self.percentile!r} must be in (50, 100]")
        if self.num_calib < 1:
            raise ConfigError(f"num_calib={self.num_calib!r} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be >= 1")
        check_seed(self.seed)
        _set(self, seed=int(self.seed))
        if self.calibration != "percentile":
            _refuse_ignored(self, ("percentile",), "calibration", "percentile")
        gw = self.group_weights
        if gw is not None and gw != "samples":
            if not isinstance(gw, Mapping) or not gw:
                raise ConfigError(
                    "group_weights must be None (equal per group), 'samples', "
                    "or a non-empty mapping of group name/id to weight"
                )
            _set(self, group_weights=FrozenDict(check_group_weight_values(gw, "group_weights")))


@dataclass(frozen=True)
class ExportSpec:
    """What the file is for and how it stores codes: see :class:`QuantConfig`."""

    target: ExportTarget = "portable"
    storage: Storage = DEFAULT_STORAGE

    def __post_init__(self) -> None:
        check_choice(self.target, get_args(ExportTarget), "target")
        check_choice(self.storage, get_args(Storage), "storage")

    @property
    def symmetric_activations(self) -> bool:
        """int8 activations with zero point 0 (S8S8: what TensorRT's importer and ORT's CUDA EP
        accept) for the ``gpu`` target; uint8 asymmetric (what ORT's CPU kernels fuse) otherwise."""
        return self.target == "gpu"


@dataclass(frozen=True)
class RuntimeSpec:
    """Where compress runs and how much memory it may hold: see :class:`QuantConfig`."""

    device: Device = "auto"
    max_activation_memory_mb: float = 6144.0

    def __post_init__(self) -> None:
        check_choice(self.device, get_args(Device), "device")
        if not (as_real(self.max_activation_memory_mb, "max_activation_memory_mb") >= 0.0):
            raise ConfigError(
                f"max_activation_memory_mb={self.max_activation_memory_mb!r} must be >= 0 "
                "(0 spills every cached activation to disk, inf keeps every one in memory)"
            )
        _set(self, max_activation_memory_mb=float(self.max_activation_memory_mb))


# QuantConfig's concerns: its attribute -> the spec class holding those options.
_SPECS: dict[str, type] = {"weights": WeightSpec, "activations": ActivationSpec, "export": ExportSpec,
                           "runtime": RuntimeSpec}
# Every flat option name -> the concern that holds it (``QuantConfig(weight_bits=4)``).
_OPTION_SPEC: dict[str, str] = {f.name: attr for attr, spec in _SPECS.items() for f in fields(spec)}


@dataclass(frozen=True, init=False)
class QuantConfig:
    """How to quantize a model: four concerns, each a frozen spec passed whole to the stage
    that uses it — ``weights`` (:class:`WeightSpec`: widths, method, solver, range, corrections,
    which layers stay float), ``activations`` (:class:`ActivationSpec`: observers, calibration
    subset, group weights), ``export`` (:class:`ExportSpec`: target, storage) and ``runtime``
    (:class:`RuntimeSpec`: device, memory). Options are given flat, ``QuantConfig(weight_bits=4,
    target="x86-vnni")``, or by concern, ``QuantConfig(weights=WeightSpec(weight_bits=4))``, and
    read flat (``config.weight_bits``) or by concern (``config.weights``); each is checked once,
    when its spec is built.

    Attributes:
        weight_bits: default weight width for every Conv/Linear layer (2..8).
        layer_bits: per-layer widths by module name (``{"fc": 8}``); overrides ``weight_bits``.
        method: ``"solver"`` (sensitivity-guided, shared inverse Hessian) or ``"rtn"``
            (round to nearest on a clipping-searched grid).
        order: column order of the solver: ``"sensitivity"`` (Σ_i w_ij² H_jj, default),
            ``"hessian-diag"`` (H_jj), ``"obs"`` (Σ_i (w_ij − q(w_ij))² / [H⁻¹]_jj, the OBS cost of
            rounding column j alone) or ``"natural"``. ``"sensitivity"`` scores the layer's weight
            before the float-output retarget, so that one Cholesky of H serves the retarget and
            the solve; ``"obs"`` needs the grid of the retargeted weight and factors H twice.
        damp: Hessian dampening relative to mean(diag H).
        solver_target: what the solver fits each layer to. ``"float-output"`` (default): the
            float model's layer output, ``min_Q ||W X_f − Q X||²`` with ``X`` the inputs from
            the already-quantized prefix and ``X_f`` the float model's (GPTAQ's asymmetric
            target), so every layer also corrects the error its inputs carry. ``"layer"``:
            ``min_Q ||(W − Q) X||²`` (plain GPTQ). Demo CNN, minority over 1500 test images,
            float 91.40%: W4A8 91.20 vs 90.53, W3A8 90.60 vs 89.47.
        block_size: columns per lazy block update in the solver.
        group_weights: weight α_g of each group in the Hessian, by group name or id.
            ``None`` gives every group equal weight whatever its sample count;
            ``"samples"`` weights by sample count (plain GPTQ).
        calibration: activation observer: ``"minmax"`` (default), ``"percentile"`` (each
            group's percentile, the widest group's range) or ``"mse"``. Min-max never clips a
            tail, and a minority's activations are often the tail: demo CNN, minority over 1500
            test images, W4A8 −0.07 pt with min-max vs −0.47 with the 99.99th percentile (a
            second trained model −0.40 vs −0.87; W8A8 0.00 vs −0.40). Choose ``"percentile"`` or
            ``"mse"`` for models with rare huge activations that would waste the uint8 range.
        percentile: upper percentile used by the percentile observer.
        num_calib: calibration samples drawn group-balanced from the calibration data.
        batch_size: batch size of calibration passes (fewer samples where a batch's largest
            activation would pass 256 MB: megapixel images; ``fqexport.pipeline.batch_memory``).
        weight_range: ``"x86-safe"`` keeps 8-bit weights in |q| <= 63 so the u8 x s8 kernels
            of AVX2 CPUs without VNNI cannot saturate; ``"full"`` uses |q| <= 127 (VNNI, GPU).
            Never resolved from ``target``: choosing a target does not change the weights.
        target: where the export will run (CLI ``--target``): ``"portable"`` (default: any CPU;
            its uint8 pairs run as float on ORT's CUDA EP), ``"x86-avx2"`` (AVX2 without VNNI), ``"x86-vnni"``, ``"arm64"`` or ``"gpu"``.
            The export check also runs the QDQ file under the emulated int8 kernels of the
            target (``portable`` and ``x86-avx2``: the saturating AVX2 kernels; ``gpu``: no
            emulation) and refuses a file whose emulated logits disagree with the reference.
            ``weight_range="full"`` is accepted for every target, but on ``portable`` /
            ``x86-avx2`` such an export is refused when the AVX2 kernels saturate on the
            calibration data; ``weight_range="full"`` needs ``x86-vnni``, ``arm64`` or ``gpu``.
            ``"gpu"`` also changes the file: S8S8 activations (int8, zero point 0, scale
            max|x|/127: what TensorRT's importer and ORT's CUDA EP accept; the CPU targets keep
            uint8 asymmetric pairs), 2-4-bit Linears as blocked INT4 weight-only MatMuls, every
            other layer in int8, and the export checks the graph against TensorRT's rules
            (docs/kernel-targets.md).
        storage: ``"auto"`` stores 2-bit codes as INT2 (opset 25) and 3-4-bit codes as INT4,
            both behind a ``Cast`` to int8 that ONNX Runtime folds at load (so the fused int8
            kernels run, bit-identical to an int8 container), 3-4-bit vector Linears as
            MatMulNBits, wider layers in int8; ``"packed"`` also stores Linears over tokens as
            MatMulNBits; ``"int8"`` stores every layer in an int8 container.
        clip_search: search per-channel clipping (MSE over shrink factors) for weight scales.
            ``None`` (default) searches for ``rtn`` and for 2-bit layers, not for the solver at
            3+ bits: the solver carries each column's rounding error onto the next columns, and
            a grid shrunk to trade clipping for rounding error took away range it needed (demo
            CNN at W3A8: minority 89.3% with the search, 90.7% without; tabular MLP 66.0% vs
            68.7%), while with only 4 levels clipping is essential (demo, uniform 2 bits:
            minority 73.8% with, 55.8% without).
        bias_correction: correct each layer's bias for the mean output shift on calibration data.
        bn_reestimate: for convs that absorbed a BatchNorm, also re-estimate the BN statistics
            after quantization (a per-channel rescale of the weight scales; codes stay).
        keep_float: weight layers to leave in float (NNCF's ``ignored_scope``, ORT's
            ``nodes_to_exclude``): module names or regular expressions matched against the full
            module name (``"fc"``, ``"layer4\\..*"``), ``"type:ClassName"`` or an ``nn.Module``
            subclass (every such layer). They are listed in the metadata (``float_layers``, with
            the pattern that matched) and the report, and count at 32 bits in the average weight
            bits and in a mixed-precision budget. A pattern that selects no layer is a
            ConfigError (a typo would quantize the layer meant to stay float). CLI:
            ``--keep-float PATTERN`` (repeatable).
        strict: refuse any weight layer fqexport cannot quantize (UnsupportedLayerError naming
            all of them); by default (``skip_unsupported``) such layers (LSTM, GRU, grouped
            ConvTranspose2d) stay float with one warning listing them all, recorded in the
            metadata and counted at 32 bits. Normalisation layers are float ops by design, not
            listed. CLI: ``--strict``.
        device: where Hessian collection, the float-output retarget and the solver run:
            ``"auto"`` (CUDA when ``torch.cuda.is_available()``, else CPU), ``"cpu"`` or ``"cuda"``.
            Results are written back to CPU tensors either way.
        max_activation_memory_mb: cap on the calibration activations the layer loop keeps
            cached (on ``device``); beyond it batches are spilled to a temporary directory.
            The default (6144 MB) leaves room for the models and Hessians on a 24 GiB machine.
        seed: seed of the calibration subset draw.
    """

    __hash__ = hash_fields

    weights: WeightSpec
    activations: ActivationSpec
    export: ExportSpec
    runtime: RuntimeSpec

    def __init__(self, *, weights: WeightSpec | None = None, activations: ActivationSpec | None = None,
                 export: ExportSpec | None = None, runtime: RuntimeSpec | None = None, **options: Any) -> None:
        given = {"weights": weights, "activations": activations, "export": export, "runtime": runtime}
        flat: dict[str, dict[str, Any]] = {attr: {} for attr in _SPECS}
        for name, value in options.items():
            if name not in _OPTION_SPEC:
                raise TypeError(MSG_UNKNOWN_OPTION.format(name=name, options=", ".join(_OPTION_SPEC)))
            flat[_OPTION_SPEC[name]][name] = value
        for attr, spec in _SPECS.items():
            base = given[attr]
            if base is not None and not isinstance(base, spec):
                raise ConfigError(f"{attr}={base!r} must be a {spec.__name__}")
            # flat options override the spec given for the same concern (dataclasses.replace passes both)
            value = replace(base, **flat[attr]) if base is not None else spec(**flat[attr])
            object.__setattr__(self, attr, value)

    def __getattr__(self, name: str) -> Any:
        # flat reads: config.weight_bits is config.weights.weight_bits
        concern = _OPTION_SPEC.get(name)
        if concern is None:
            raise AttributeError(f"'QuantConfig' object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, concern), name)

    @property
    def skip_unsupported(self) -> bool:
        return self.weights.skip_unsupported

    def use_clip_search(self, bits: int) -> bool:
        """``clip_search`` resolved for a ``bits``-wide layer (see above)."""
        return self.weights.use_clip_search(bits)

    def bits_for(self, layer: str) -> int:
        """Weight width of ``layer`` (its ``layer_bits`` entry, else ``weight_bits``)."""
        return self.weights.bits_for(layer)

    def to_dict(self) -> dict[str, Any]:
        """The options that decide the file (every one but the runtime's device and memory cap),
        flat and JSON-ready: ``QuantConfig(**config.to_dict())`` rebuilds them; the export
        metadata records them (``settings``). A module type in ``keep_float`` becomes
        ``"type:ClassName"``."""
        out: dict[str, Any] = {}
        for attr in ("weights", "activations", "export"):
            spec = getattr(self, attr)
            for f in fields(spec):
                out[f.name] = getattr(spec, f.name)
        out["layer_bits"] = {str(k): int(v) for k, v in dict(out["layer_bits"]).items()}
        out["keep_float"] = [f"type:{v.__name__}" if isinstance(v, type) else v for v in out["keep_float"]]
        gw = out["group_weights"]
        out["group_weights"] = {str(k): float(v) for k, v in gw.items()} if isinstance(gw, Mapping) else gw
        return out


MSG_ENGINE_WORKERS = "workers={value!r} must be an integer >= 1 (default: the machine's cores); CLI: --workers 4"
MSG_ENGINE_RESOURCES = ("{field}={value!r} must be a finite number {rule} with at most 4 decimals (the Ray "
                        "{what} of one task, e.g. {example})")
MSG_ENGINE_RAY_WORKERS = (
    "workers={value!r} would be ignored with ray_address={address!r}: the cluster there has its own CPUs (workers "
    "are the CPUs of the local cluster started without an address); drop workers, or ray_address"
)
MSG_ENGINE_RETRIES = "retries={value!r} must be an integer >= 0 (tries of a task whose worker died, after the first)"
MSG_ENGINE_RAY_ONLY = "{field}={value!r} is only used by engine='ray' (got engine={engine!r}); CLI: --engine ray"
MSG_ENGINE_SERIAL_WORKERS = (
    "workers={value!r} would be ignored by engine='serial' (one task after another in this process); use "
    "engine='local' (or 'auto') for a pool of {value} processes, or drop workers; CLI: --engine local --workers {value}"
)
# The fields only the Ray engine reads; set away from their default with another engine, they are refused.
RAY_ONLY_FIELDS = ("ray_address", "task_cpus", "task_gpus")


@dataclass(frozen=True)
class EngineConfig:
    """Where the search's independent tasks run (sensitivity per layer (all its widths), verification
    fits per candidate × fold, sweep points); see :mod:`fqexport.engine`. Every engine gives
    identical results: each task is seeded from its key and runs on one intra-op thread.

    Attributes:
        engine: ``"serial"`` (in this process, one task after another), ``"local"`` (a process
            pool on this machine), ``"ray"`` (Ray tasks; ``pip install 'fqexport[ray]'``) or
            ``"auto"`` (default: local when ``workers`` > 1, else serial).
        workers: processes of the local pool (default: the CPUs this process may run on); with Ray, the CPUs of
            the local cluster started when ``ray_address`` is None; more than 1 with ``"serial"``
            is refused (it would be ignored).
        ray_address: ``"auto"``, ``"ray://host:10001"`` or ``"host:6379"`` of a running cluster;
            ``None`` starts a local one.
        task_cpus: Ray CPUs per task.
        task_gpus: Ray GPUs per task (a fraction shares a GPU). ``ray_address``, ``task_cpus`` and
            ``task_gpus`` are read by the Ray engine alone: away from their default with another
            engine they are refused.
        retries: tries of a task after its worker died, before the search stops.
        start_method: how the local pool starts its workers; not ``fork`` (a forked copy of a
            process with torch threads can deadlock).
    """

    engine: EngineKind = "auto"
    workers: int | None = None
    ray_address: str | None = None
    task_cpus: float = 1.0
    task_gpus: float = 0.0
    retries: int = 1
    start_method: StartMethod = "forkserver"

    def __post_init__(self) -> None:
        check_choice(self.engine, get_args(EngineKind), "engine")
        if self.ray_address is not None and not isinstance(self.ray_address, str):
            raise ConfigError(MSG_TYPE.format(where="ray_address", value=self.ray_address,
                                              kind="an address string ('auto', 'ray://host:10001') or None"))
        check_choice(self.start_method, get_args(StartMethod), "start_method")
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1):
            raise ConfigError(MSG_ENGINE_WORKERS.format(value=w))
        if w is not None:
            _set(self, workers=int(w))
        if self.engine == "serial" and w is not None and w > 1:
            raise ConfigError(MSG_ENGINE_SERIAL_WORKERS.format(value=w))
        for name, rule, what, example in (("task_cpus", "> 0", "CPUs", "1 or 0.5"), ("task_gpus", ">= 0", "GPUs", "0.25")):
            v = getattr(self, name)
            # Ray refuses more than 4 decimals; inf overflowed its integer resource units (exit 3)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) \
                    or not (float(v) > 0 if name == "task_cpus" else float(v) >= 0) or round(float(v), 4) != float(v):
                raise ConfigError(MSG_ENGINE_RESOURCES.format(field=name, value=v, rule=rule, what=what, example=example))
        if self.engine == "ray" and self.ray_address is not None and w is not None:
            raise ConfigError(MSG_ENGINE_RAY_WORKERS.format(value=w, address=self.ray_address))
        r = self.retries
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
            raise ConfigError(MSG_ENGINE_RETRIES.format(value=r))
        _set(self, retries=int(r))
        defaults = {f.name: f.default for f in fields(self)}
        for name in RAY_ONLY_FIELDS:
            value = getattr(self, name)
            if value != defaults[name] and self.engine != "ray":
                raise ConfigError(MSG_ENGINE_RAY_ONLY.format(field=name, value=value, engine=self.engine))

    @property
    def num_workers(self) -> int:
        """``workers``, else the CPUs this process may run on (a container's cpuset, ``taskset``)."""
        return int(self.workers or usable_cpus())

    @property
    def kind(self) -> str:
        """The engine that runs: ``"auto"`` resolved (local with more than one worker)."""
        if self.engine != "auto":
            return self.engine
        return "local" if self.num_workers > 1 else "serial"


MSG_MP_GROUP_WEIGHTS = (
    "group_weights={value!r} is only used by objective='weighted' (got objective={objective!r}); "
    "CLI: --objective weighted --objective-weights NAME=W,..."
)


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """A fairness-aware mixed-precision search (see fqexport.search.mixed_precision).

    Exactly one budget is set:
        budget_bits: stored bits per weight, scales included (e.g. 3.0): the codes in the
            containers the export writes (INT2, INT4, MatMulNBits, int8) plus per-channel
            scales and zero points (per-block scales for MatMulNBits), over the weights.
        budget_bytes: the written ONNX file's size (weights + scales + graph + metadata): the
            search checks the written size and, when it is exceeded, refits the next smaller
            allocation (fqexport.search.mixed_precision).
        budget_bops: Σ w_bits · a · MACs per sample, a the activation width
            (``fqexport.metadata.ACTIVATION_BITS``, 8).

    Attributes:
        objective: ``"worst-group"`` (minimise the largest group loss increase + ``mean_weight``
            × the mean), ``"mean"`` (HAWQ-like, population-weighted) or ``"weighted"``
            (``group_weights``).
        bit_choices: candidate widths per layer (2..8). Default (2, 4, 8): the containers ORT
            loads; 3 and 5-7 bits only when listed, counted at their container (INT4, int8).
        pins: layer-name patterns (fnmatch) -> fixed width, e.g. ``{"stem.0": 8, "fc": 8}``.
        pin_first_last: pin the first and the last quantizable layer (execution order) to this
            width; ``None`` (default) leaves them free. ``pins`` naming the same layer with
            another width is an error.
        sensitivity: ``"measured"`` (quantize one layer, measure group losses), ``"fisher"``
            (the weight's Fisher diagonal) or ``"output-fisher"`` (the output's Fisher diagonal
            times the output error of the solver's codes: one float pass, one backward pass,
            one factorisation per layer; :mod:`fqexport.search.output_fisher`).
        group_weights: per-group weights for ``"weighted"`` (group name -> weight); refused with
            the other objectives, which would ignore them.
        mean_weight: λ of the mean term in the worst-group objective.
        num_candidates: allocations actually quantized and measured on the held-out split.
        verify_uniform: also verify the uniform allocation at every width of ``bit_choices``
            that fits the budget; the search returns a uniform one (and says why in
            ``MixedPrecisionResult.fallback``) when the selected allocation measured a larger
            held-out worst-group loss increase (worst-group objective: by more than 2 standard
            errors of the paired per-sample differences; within them ``selection_note`` says so).
        verify_mean: for the ``"worst-group"`` and ``"weighted"`` objectives, also verify the
            mean-objective (population-weighted) optimum, so the search never returns something
            that measured worse than the HAWQ-like allocation on the held-out split.
        refit: quantize the chosen allocation again on all the calibration data (held-in and
            held-out), as ``compress`` would, and return that model (like scikit-learn's
            ``GridSearchCV(refit=True)``); the held-out figures of the result describe the
            held-in fits that were verified. ``False`` (only with ``verify_folds=1``): return
            the verified held-in fit itself.
        verify_folds: cross-fitting of the verification. ``k >= 2``: the
            calibration data is cut into k group-stratified folds; each candidate is quantized
            k times, each time on all folds but one, and measured on the one left out, so every
            calibration sample is held out exactly once (k× the verification time, and k× the
            held-out samples of the smallest group, whose few dozen samples otherwise decide the
            winner). ``1`` (default): when the data has more samples than ``num_calib`` (at
            least 50 of each group left over), the fits use exactly the samples ``compress``
            draws and are measured on the rest, so the winner's fit is the refit (no extra fit);
            else a single hold-out split of ``holdout_fraction``.
        holdout_fraction: share of each group held out for verification when ``verify_folds=1``.
        sensitivity_samples: group-balanced samples used to measure sensitivity.
        mw_steps: multiplicative-weights steps of the worst-group search.
        mw_eta: step size of the multiplicative-weights update.
        cache_path: optional JSON file caching the sensitivity table across runs.
        seed: seed of the hold-out split and the sample draws.
        engine: where the independent tasks run (:class:`EngineConfig`, or its kind alone:
            ``"serial"``; results do not depend on it).
    """

    __hash__ = hash_fields

    budget_bits: float | None = None
    budget_bytes: float | None = None
    budget_bops: float | None = None
    objective: MixedObjective = "worst-group"
    bit_choices: tuple[int, ...] = SEARCH_BIT_CHOICES
    pins: Mapping[str, int] = field(default_factory=dict)
    pin_first_last: int | None = None
    sensitivity: SensitivityMethod = "measured"
    group_weights: Mapping[str, float] | None = None
    mean_weight: float = 0.1
    num_candidates: int = 2
    verify_uniform: bool = True
    verify_mean: bool = True
    refit: bool = True
    verify_folds: int = 1
    holdout_fraction: float = 0.3
    sensitivity_samples: int = 512
    mw_steps: int = 60
    mw_eta: float = 0.5
    cache_path: str | None = None
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if isinstance(self.engine, str):  # a kind alone: engine="serial" is EngineConfig(engine="serial")
            object.__setattr__(self, "engine", EngineConfig(engine=self.engine))
        if not isinstance(self.engine, EngineConfig):
            raise ConfigError(f"engine={self.engine!r} must be an EngineConfig, e.g. EngineConfig(engine='local', workers=4), "
                              "or an engine kind ('auto', 'serial', 'local', 'ray')")
        budgets = {f"budget_{k}": getattr(self, f"budget_{k}") for k in get_args(BudgetKind)}
        given = {k: v for k, v in budgets.items() if v is not None}
        if len(given) != 1:
            raise ConfigError(
                "set exactly one of budget_bits, budget_bytes, budget_bops "
                f"(got {', '.join(given) or 'none'}); CLI: --budget-bits 4.0"
            )
        (name, value), = given.items()
        check_budget(name.removeprefix("budget_"), value)
        _set(self, **{name: plain_number(value)})
        check_choice(self.objective, get_args(MixedObjective), "objective")
        check_choice(self.sensitivity, get_args(SensitivityMethod), "sensitivity")
        _set(self, bit_choices=check_bit_choices(self.bit_choices))  # sorted: (8, 4, 2) == (2, 4, 8)
        if not isinstance(self.pins, Mapping):
            raise ConfigError(MSG_TYPE.format(where="pins", value=self.pins,
                                              kind="a mapping of layer pattern to width, e.g. {'fc': 8}"))
        _set(self, pins=FrozenDict({pattern: check_bits(bits, f"pins[{pattern!r}]") for pattern, bits in self.pins.items()}))
        if self.pin_first_last is not None:
            _set(self, pin_first_last=check_bits(self.pin_first_last, "pin_first_last"))
        _set(self, mean_weight=as_real(self.mean_weight, "mean_weight"),
             num_candidates=as_int(self.num_candidates, "num_candidates"),
             verify_folds=as_int(self.verify_folds, "verify_folds"), refit=as_bool(self.refit, "refit"),
             verify_uniform=as_bool(self.verify_uniform, "verify_uniform"),
             verify_mean=as_bool(self.verify_mean, "verify_mean"),
             holdout_fraction=as_real(self.holdout_fraction, "holdout_fraction"),
             sensitivity_samples=as_int(self.sensitivity_samples, "sensitivity_samples"),
             mw_steps=as_int(self.mw_steps, "mw_steps"), mw_eta=as_real(self.mw_eta, "mw_eta"))
        if self.cache_path is not None and not isinstance(self.cache_path, (str, os.PathLike)):
            raise ConfigError(MSG_TYPE.format(where="cache_path", value=self.cache_path, kind="a file path or None"))
        if self.cache_path is not None:  # Path("x") and "x" are one config
            _set(self, cache_path=os.fspath(self.cache_path))
        if self.group_weights is not None:
            if not isinstance(self.group_weights, Mapping):
                raise ConfigError(MSG_TYPE.format(where="MixedPrecisionConfig.group_weights", value=self.group_weights,
                                                  kind="a mapping of group name to weight, e.g. {'minority': 2.0}"))
            # named with its class: QuantConfig.group_weights is another field (the CLI: --group-weights)
            _set(self, group_weights=FrozenDict(check_group_weight_values(self.group_weights,
                                                                          "MixedPrecisionConfig.group_weights")))
        if self.objective == "weighted" and not self.group_weights:
            raise ConfigError("objective='weighted' needs group_weights (group name -> weight)")
        if self.group_weights is not None and self.objective != "weighted":
            raise ConfigError(MSG_MP_GROUP_WEIGHTS.format(value=self.group_weights, objective=self.objective))
        if not (0.0 <= float(self.mean_weight) < math.inf):
            raise ConfigError(f"mean_weight={self.mean_weight!r} must be a finite number >= 0")
        if int(self.num_candidates) < 1:
            raise ConfigError(f"num_candidates={self.num_candidates!r} must be >= 1")
        check_seed(self.seed)
        _set(self, seed=int(self.seed))
        if self.verify_folds < 1:
            raise ConfigError(f"verify_folds={self.verify_folds!r} must be an integer >= 1 (1: a single hold-out split)")
        if not self.refit and self.verify_folds != 1:
            raise ConfigError(
                f"refit=False needs verify_folds=1 (got {self.verify_folds}): with k folds every candidate "
                "is fitted k times, so there is no single verified fit to return"
            )
        if not (0.0 < float(self.holdout_fraction) < 1.0):
            raise ConfigError(f"holdout_fraction={self.holdout_fraction!r} must be in (0, 1)")
        if int(self.sensitivity_samples) < 1:
            raise ConfigError(f"sensitivity_samples={self.sensitivity_samples!r} must be >= 1")
        if int(self.mw_steps) < 0 or not (0 < float(self.mw_eta) < math.inf):
            raise ConfigError(
                f"mw_steps={self.mw_steps!r} must be >= 0 and mw_eta={self.mw_eta!r} a finite number > 0"
            )

    def to_dict(self) -> dict[str, Any]:
        """The options that decide a search's result, for the file's metadata
        (``allocation.settings``): every field but ``engine`` and ``cache_path``, which do not
        change it; ``MixedPrecisionConfig(**d)`` rebuilds the config."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("engine", "cache_path")}
        d.update(bit_choices=list(self.bit_choices), pins=dict(self.pins),
                 group_weights=None if self.group_weights is None else {str(k): v for k, v in self.group_weights.items()})
        return d

    @property
    def budget_kind(self) -> BudgetKind:
        """``"bits"``, ``"bytes"`` or ``"bops"``: the budget that is set."""
        return next(k for k in get_args(BudgetKind) if getattr(self, f"budget_{k}") is not None)

    @property
    def budget_value(self) -> float:
        """The value of the budget that is set."""
        return float(getattr(self, f"budget_{self.budget_kind}"))
