"""Typed, frozen configuration objects, checked once in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, get_args

from fqexport.errors import ConfigError

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
Method = Literal["solver", "rtn"]
Order = Literal["sensitivity", "hessian-diag", "natural"]
SolverTarget = Literal["float-output", "layer"]
Calibration = Literal["minmax", "percentile", "mse"]
WeightRange = Literal["x86-safe", "full"]
Storage = Literal["auto", "int8", "packed"]
Device = Literal["auto", "cpu", "cuda"]


def _check_bits(bits: object, where: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_WEIGHT_BITS:
        raise ConfigError(
            f"{where}={bits!r} is not supported: weight bits must be an integer from 2 to 8"
        )


def _check_choice(value: object, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    Attributes:
        weight_bits: default weight width for every Conv/Linear layer (2..8).
        layer_bits: per-layer widths by module name (``{"fc": 8}``); overrides ``weight_bits``.
        method: ``"solver"`` (sensitivity-guided, shared inverse Hessian) or ``"rtn"``
            (round to nearest on a clipping-searched grid).
        order: column order of the solver: ``"sensitivity"`` (Σ_i w_ij² H_jj, default),
            ``"hessian-diag"`` (H_jj) or ``"natural"``.
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
        batch_size: batch size of calibration passes.
        weight_range: ``"x86-safe"`` keeps 8-bit weights in |q| <= 63 so the u8 x s8 kernels
            of AVX2 CPUs without VNNI cannot saturate; ``"full"`` uses |q| <= 127 (VNNI, GPU).
        storage: ``"auto"`` stores <=4-bit layers as packed INT4 and others in int8;
            ``"int8"`` stores every layer in an int8 container (fused integer kernels, fastest);
            ``"packed"`` is ``"auto"`` with INT2 for 2-bit layers (opset 25).
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
        skip_unsupported: leave layers fqexport cannot quantize in float (warn) instead of failing.
        device: where Hessian collection, the float-output retarget and the solver run:
            ``"auto"`` (CUDA when ``torch.cuda.is_available()``, else CPU), ``"cpu"`` or ``"cuda"``.
            Results are written back to CPU tensors either way.
        seed: seed of the calibration subset draw.
    """

    weight_bits: int = 8
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    method: Method = "solver"
    order: Order = "sensitivity"
    damp: float = 0.01
    solver_target: SolverTarget = "float-output"
    block_size: int = 128
    group_weights: Mapping[str, float] | Literal["samples"] | None = None
    calibration: Calibration = "minmax"
    percentile: float = 99.99
    num_calib: int = 512
    batch_size: int = 64
    weight_range: WeightRange = "x86-safe"
    storage: Storage = "auto"
    clip_search: bool | None = None
    bias_correction: bool = True
    bn_reestimate: bool = True
    skip_unsupported: bool = False
    device: Device = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits(self.weight_bits, "weight_bits")
        for name, bits in dict(self.layer_bits).items():
            _check_bits(bits, f"layer_bits[{name!r}]")
        _check_choice(self.method, get_args(Method), "method")
        _check_choice(self.order, get_args(Order), "order")
        _check_choice(self.solver_target, get_args(SolverTarget), "solver_target")
        _check_choice(self.calibration, get_args(Calibration), "calibration")
        _check_choice(self.weight_range, get_args(WeightRange), "weight_range")
        _check_choice(self.storage, get_args(Storage), "storage")
        _check_choice(self.device, get_args(Device), "device")
        if not (0.0 <= float(self.damp) < 10.0):
            raise ConfigError(f"damp={self.damp!r} must be in [0, 10)")
        if int(self.block_size) < 1:
            raise ConfigError(f"block_size={self.block_size!r} must be >= 1")
        if not (50.0 < float(self.percentile) <= 100.0):
            raise ConfigError(f"percentile={self.percentile!r} must be in (50, 100]")
        if int(self.num_calib) < 1:
            raise ConfigError(f"num_calib={self.num_calib!r} must be >= 1")
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be >= 1")
        gw = self.group_weights
        if gw is not None and gw != "samples":
            if not isinstance(gw, Mapping) or not gw:
                raise ConfigError(
                    "group_weights must be None (equal per group), 'samples', "
                    "or a non-empty mapping of group name/id to weight"
                )
            for g, w in gw.items():
                if not (float(w) >= 0.0):
                    raise ConfigError(f"group_weights[{g!r}]={w!r} must be >= 0")
            if sum(float(w) for w in gw.values()) <= 0:
                raise ConfigError("group_weights must not all be zero")

    def use_clip_search(self, bits: int) -> bool:
        """``clip_search`` resolved for a ``bits``-wide layer (see the class docstring)."""
        if self.clip_search is not None:
            return bool(self.clip_search)
        return self.method == "rtn" or bits <= 2

    def bits_for(self, layer: str) -> int:
        """Weight width of ``layer`` (its ``layer_bits`` entry, else ``weight_bits``)."""
        return int(self.layer_bits.get(layer, self.weight_bits))


MixedObjective = Literal["worst-group", "mean", "weighted"]
SensitivityMethod = Literal["measured", "fisher"]
DEFAULT_BIT_CHOICES = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """A fairness-aware mixed-precision search (see fqexport.search.mixed_precision).

    Exactly one budget is set:
        budget_bits: parameter-weighted average weight bits (e.g. 4.0).
        budget_bytes: weight bytes: packed codes of the export's storage mode + 5 bytes per
            output channel (scale, zero point).
        budget_bops: Σ w_bits · 8 · MACs per sample.

    Attributes:
        objective: ``"worst-group"`` (minimise the largest group loss increase + ``mean_weight``
            × the mean), ``"mean"`` (HAWQ-like, population-weighted) or ``"weighted"``
            (``group_weights``).
        bit_choices: candidate widths per layer (2..8).
        pins: layer-name patterns (fnmatch) -> fixed width, e.g. ``{"stem.0": 8, "fc": 8}``.
        sensitivity: ``"measured"`` (quantize one layer, measure group losses) or ``"fisher"``.
        group_weights: per-group weights for ``"weighted"`` (group name -> weight).
        mean_weight: λ of the mean term in the worst-group objective.
        num_candidates: allocations actually quantized and measured on the held-out split.
        verify_uniform: also verify the uniform allocation (every free layer at the widest
            width of ``bit_choices`` within the budget), so the search never returns something
            that measured worse than plain uniform quantization on the held-out split.
        verify_mean: for the ``"worst-group"`` and ``"weighted"`` objectives, also verify the
            mean-objective (population-weighted) optimum, so the search never returns something
            that measured worse than the HAWQ-like allocation on the held-out split.
        refit: quantize the chosen allocation again on all the calibration data (held-in and
            held-out), as ``compress`` would, and return that model (like scikit-learn's
            ``GridSearchCV(refit=True)``); the held-out figures of the result describe the
            held-in fits that were verified. ``False`` (only with ``verify_folds=1``): return
            the verified held-in fit itself.
        verify_folds: cross-fitting of the verification. ``k >= 2`` (default 3): the
            calibration data is cut into k group-stratified folds; each candidate is quantized
            k times, each time on all folds but one, and measured on the one left out, so every
            calibration sample is held out exactly once (k× the verification time, and k× the
            held-out samples of the smallest group, whose few dozen samples otherwise decide the
            winner). ``1``: a single hold-out split of ``holdout_fraction``.
        holdout_fraction: share of each group held out for verification when ``verify_folds=1``.
        sensitivity_samples: group-balanced samples used to measure sensitivity.
        mw_steps: multiplicative-weights steps of the worst-group search.
        mw_eta: step size of the multiplicative-weights update.
        cache_path: optional JSON file caching the sensitivity table across runs.
        seed: seed of the hold-out split and the sample draws.
    """

    budget_bits: float | None = None
    budget_bytes: float | None = None
    budget_bops: float | None = None
    objective: MixedObjective = "worst-group"
    bit_choices: tuple[int, ...] = DEFAULT_BIT_CHOICES
    pins: Mapping[str, int] = field(default_factory=dict)
    sensitivity: SensitivityMethod = "measured"
    group_weights: Mapping[str, float] | None = None
    mean_weight: float = 0.1
    num_candidates: int = 3
    verify_uniform: bool = True
    verify_mean: bool = True
    refit: bool = True
    verify_folds: int = 3
    holdout_fraction: float = 0.3
    sensitivity_samples: int = 512
    mw_steps: int = 60
    mw_eta: float = 0.5
    cache_path: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        budgets = {k: getattr(self, k) for k in ("budget_bits", "budget_bytes", "budget_bops")}
        given = {k: v for k, v in budgets.items() if v is not None}
        if len(given) != 1:
            raise ConfigError(
                "set exactly one of budget_bits, budget_bytes, budget_bops "
                f"(got {', '.join(given) or 'none'}); CLI: --budget-bits 4.0"
            )
        (name, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (float(value) > 0) \
                or value != value or value == float("inf"):
            raise ConfigError(f"{name}={value!r} must be a finite number > 0")
        if name == "budget_bits" and not (2.0 <= float(value) <= 8.0):
            raise ConfigError(f"budget_bits={value!r} must be in [2, 8] (average weight bits)")
        _check_choice(self.objective, get_args(MixedObjective), "objective")
        _check_choice(self.sensitivity, get_args(SensitivityMethod), "sensitivity")
        choices = tuple(self.bit_choices)
        if not choices:
            raise ConfigError("bit_choices must name at least one width from 2 to 8")
        for b in choices:
            _check_bits(b, "bit_choices")
        for pattern, bits in dict(self.pins).items():
            _check_bits(bits, f"pins[{pattern!r}]")
        if self.objective == "weighted" and not self.group_weights:
            raise ConfigError("objective='weighted' needs group_weights (group name -> weight)")
        if not (float(self.mean_weight) >= 0.0):
            raise ConfigError(f"mean_weight={self.mean_weight!r} must be >= 0")
        if int(self.num_candidates) < 1:
            raise ConfigError(f"num_candidates={self.num_candidates!r} must be >= 1")
        if isinstance(self.verify_folds, bool) or not isinstance(self.verify_folds, int) or self.verify_folds < 1:
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
        if int(self.mw_steps) < 0 or not (float(self.mw_eta) > 0):
            raise ConfigError(
                f"mw_steps={self.mw_steps!r} must be >= 0 and mw_eta={self.mw_eta!r} > 0"
            )

    @property
    def budget_kind(self) -> str:
        """``"bits"``, ``"bytes"`` or ``"bops"``: the budget that is set."""
        if self.budget_bits is not None:
            return "bits"
        return "bytes" if self.budget_bytes is not None else "bops"

    @property
    def budget_value(self) -> float:
        """The value of the budget that is set."""
        return float(next(v for v in (self.budget_bits, self.budget_bytes, self.budget_bops) if v is not None))
