"""Typed, frozen configuration objects, checked once in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from .errors import ConfigError

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
Method = Literal["solver", "rtn"]
Order = Literal["sensitivity", "hessian-diag", "natural"]
Calibration = Literal["minmax", "percentile", "mse"]
WeightRange = Literal["x86-safe", "full"]
Storage = Literal["auto", "int8", "packed"]


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
        block_size: columns per lazy block update in the solver.
        group_weights: weight α_g of each group in the Hessian, by group name or id.
            ``None`` gives every group equal weight whatever its sample count;
            ``"samples"`` weights by sample count (plain GPTQ).
        calibration: activation observer: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        percentile: upper percentile used by the percentile observer.
        num_calib: calibration samples drawn group-balanced from the calibration data.
        batch_size: batch size of calibration passes.
        weight_range: ``"x86-safe"`` keeps 8-bit weights in |q| <= 63 so the u8 x s8 kernels
            of AVX2 CPUs without VNNI cannot saturate; ``"full"`` uses |q| <= 127 (VNNI, GPU).
        storage: ``"auto"`` stores <=4-bit layers as packed INT4 and others in int8;
            ``"int8"`` stores every layer in an int8 container (fused integer kernels, fastest);
            ``"packed"`` is ``"auto"`` with INT2 for 2-bit layers (opset 25).
        clip_search: search per-channel clipping (MSE over shrink factors) for weight scales.
        bias_correction: correct each layer's bias for the mean output shift on calibration data.
        bn_reestimate: for convs that absorbed a BatchNorm, also re-estimate the BN statistics
            after quantization (a per-channel rescale of the weight scales; codes stay).
        skip_unsupported: leave layers fqexport cannot quantize in float (warn) instead of failing.
        seed: seed of the calibration subset draw.
    """

    weight_bits: int = 8
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    method: Method = "solver"
    order: Order = "sensitivity"
    damp: float = 0.01
    block_size: int = 128
    group_weights: Mapping[str, float] | Literal["samples"] | None = None
    calibration: Calibration = "percentile"
    percentile: float = 99.99
    num_calib: int = 512
    batch_size: int = 64
    weight_range: WeightRange = "x86-safe"
    storage: Storage = "auto"
    clip_search: bool = True
    bias_correction: bool = True
    bn_reestimate: bool = True
    skip_unsupported: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits(self.weight_bits, "weight_bits")
        for name, bits in dict(self.layer_bits).items():
            _check_bits(bits, f"layer_bits[{name!r}]")
        _check_choice(self.method, ("solver", "rtn"), "method")
        _check_choice(self.order, ("sensitivity", "hessian-diag", "natural"), "order")
        _check_choice(self.calibration, ("minmax", "percentile", "mse"), "calibration")
        _check_choice(self.weight_range, ("x86-safe", "full"), "weight_range")
        _check_choice(self.storage, ("auto", "int8", "packed"), "storage")
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

    def bits_for(self, layer: str) -> int:
        """Weight width of ``layer`` (its ``layer_bits`` entry, else ``weight_bits``)."""
        return int(self.layer_bits.get(layer, self.weight_bits))
