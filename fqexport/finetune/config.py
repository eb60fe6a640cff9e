"""``FinetuneConfig``: the options of fairness-aware fine-tuning after PTQ, checked once."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Iterable, Literal, Mapping, get_args

from fqexport.config import (
    DEFAULT_BIT_CHOICES,
    SUPPORTED_WEIGHT_BITS,
    Device,
    FrozenDict,
    as_bool,
    check_seed,
    hash_fields,
    plain_number,
)
from fqexport.errors import ConfigError

Sampler = Literal["natural", "group-balanced", "core-set"]
GroupLoss = Literal["ce", "group-weighted", "worst-group"]
CoresetScore = Literal["disagreement", "loss"]
Rounding = Literal["solver", "adaptive"]

MSG_CHOICE = "FinetuneConfig.{field}={value!r} is not one of {choices}"
MSG_POSITIVE_INT = "FinetuneConfig.{field}={value!r} must be an integer >= {low}"
MSG_RANGE = "FinetuneConfig.{field}={value!r} must be {rule}"
MSG_GROUP_WEIGHTS = (
    "FinetuneConfig.group_weights is required with loss='group-weighted': give a mapping of group "
    "name to weight, e.g. {'minority': 3, 'majority': 1} (CLI: --group-loss-weights minority=3,majority=1; a group not named gets weight 0)"
)
MSG_ONLY_WITH = (
    "FinetuneConfig.{field}={value!r} is only used with {key}={wanted!r} (got {key}={got!r}), so it would be "
    "ignored: set {key}={wanted!r}, or leave {field} at its default ({default!r})"
)
# The fields read only under another field's value (field -> (that field, the value that reads
# it)): set away from their default otherwise, they would be ignored, so they are refused.
ONLY_WITH = {
    "group_weights": ("loss", "group-weighted"),
    "dro_eta": ("loss", "worst-group"),
    "coreset_fraction": ("sampler", "core-set"),
    "coreset_min_per_group": ("sampler", "core-set"),
    "coreset_score": ("sampler", "core-set"),
    "budget_bits": ("learn_bits", True),
    "bit_epochs": ("learn_bits", True),
    "lambda_bits": ("learn_bits", True),
    "lambda_fair": ("learn_bits", True),
    "bits_lr": ("learn_bits", True),
}
MSG_BIT_CHOICES = "FinetuneConfig.bit_choices={value!r} must be a non-empty tuple of integers from 2 to 8"
MSG_BUDGET = (
    "FinetuneConfig.budget_bits={value!r} is outside the candidate widths [{lo}, {hi}]: a budget below "
    "the smallest width cannot be met; raise it or add a narrower width to bit_choices"
)
MSG_LEARN_BITS = "FinetuneConfig.learn_bits=True needs budget_bits (average weight bits), e.g. budget_bits=2.5"
MSG_BITS = (
    "FinetuneConfig.weight_bits={value!r} is not supported: an integer from 2 to 8 (the PTQ start "
    "when fine-tuning a float model)"
)


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))


def _integer(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune a compressed model (see ``fqexport.finetune.api.finetune``).

    The defaults are the fairness settings: ``loss="worst-group"`` with
    ``sampler="group-balanced"``, as the mixed-precision search defaults to its worst-group
    objective. They measured best on the worst group at W2 + 2 epochs, exported QDQ in ONNX
    Runtime (docs/finetune.md): demo CNN, 10 % inverted-contrast minority, 300 test images,
    90.67 % vs 89.33 % for plain ``ce`` / ``natural`` (mean 98.43 vs 98.30); two-minority
    task, 180 test images per minority, 76.11 % vs 71.11 % (mean 98.07 vs 97.93); a held-out
    3-group Fashion-MNIST ResNet (rotated minority 5 %, 10,000 test images, issue 23): 78.24 %
    vs 76.99 % at equal other groups. ``sampler="core-set"`` won on the demo (92.00 %) but kept
    the PTQ start on the two-minority task, so it is not the default. Plain QAT:
    ``FinetuneConfig(loss="ce", sampler="natural")``.

    A field read only under another field's value (:data:`ONLY_WITH`: ``group_weights`` with
    ``loss="group-weighted"``, ``dro_eta`` with ``"worst-group"``, the ``coreset_*`` fields with
    ``sampler="core-set"``, the BAQ fields with ``learn_bits=True``) is refused when set away from
    its default without it: it would be ignored.

    Attributes:
        epochs: passes over the (sampled) training data.
        batch_size: samples per step.
        lr: Adam step size. Latent weights are learned in units of each channel's initial step
            size, so ``lr=3e-2`` moves a weight by about 3% of a grid step per step at any width
            (3e-2 beat 1e-2 on the demo CNN's worst group: docs/finetune.md); scales and activation step sizes are learned as ratios to their PTQ values.
        temperature: distillation temperature T; the distillation term is T²·KL(teacher‖student).
        kd_weight: weight of the distillation term (the float model is the teacher).
        ce_weight: weight of the labels' cross-entropy (a detector's: of its own training loss on
            the data's boxes, at 0.3 × ce_weight, ``Detection.train_loss_scale``; a segmenter's: of
            the per-pixel cross-entropy on its masks; without them, a detector or segmenter distils only).
        sampler: ``"group-balanced"`` (default: each batch has the same number of samples from
            every group), ``"natural"`` (shuffled data) or ``"core-set"`` (each epoch keeps, per group,
            the ``coreset_fraction`` hardest samples by current loss, at least
            ``coreset_min_per_group``).
        loss: how group losses are combined: ``"worst-group"`` (default; weights
            q_g ← q_g·exp(η·excess_g), normalised, with excess_g the group's loss above the float
            model's and η = ``dro_eta``: group DRO's exponentiated-gradient step),
            ``"group-weighted"`` (fixed ``group_weights``) or ``"ce"`` (plain sample mean).
        group_weights: per-group weights for ``"group-weighted"`` (name or id → weight).
        dro_eta: step size of the worst-group weight update.
        coreset_fraction: share of each group kept per epoch by the core-set sampler.
        coreset_min_per_group: floor of samples kept per group by the core-set sampler.
        coreset_score: what "hardest" means for the core-set: ``"loss"`` (default: the full
            per-sample loss, distillation + label cross-entropy) or ``"disagreement"`` (the
            distillation term T²·KL(teacher‖student) alone: where quantization moved the model
            away from the float model). On the demo CNN at W2 ``"loss"`` did as well or better
            (docs/finetune.md).
        holdout_fraction: share of each group of the training data held out to pick the best
            checkpoint (lowest worst-group cross-entropy; the PTQ start counts as a checkpoint).
        holdout_max: most samples in the hold-out (default 2000): when ``holdout_fraction`` of
            the data is more, the hold-out keeps this many, as equal per group as possible
            (``balanced_allocation``; a smaller group gives all of its share), and the rest goes
            back to the fitted data; never fewer than one sample of each group (with a warning).
            The hold-out is read into memory; the fitted data is streamed.
        max_minutes: stop at the end of the first step after this wall time (None: no limit).
        max_steps: stop after this many optimizer steps (None: no limit); the epoch ends there
            and its checkpoint is measured like any other.
        num_workers: worker processes of the DataLoader that reads a Dataset or a CSV manifest
            batch by batch (0: in this process; CLI ``--workers``). Results do not depend on it.
            An in-memory GroupData and an ``.npz`` (memory-mapped) are sliced in this process.
        learn_act_scales: also learn the activation step sizes (zero points stay).
        oscillation: λ of the oscillation (dampening) regulariser λ·Σ (v − sg(round(v)))² over all
            quantized weights, v = clamp(w / s, qmin, qmax) (Nagel et al. 2022's dampening, in
            units of the step; e.g. 0.1): pulls each latent weight to its grid point at the trained width, so weight
            oscillation across rounding boundaries dies down and the same latent weights
            re-quantized at wider grids (``finetune_widths``) stay close to the trained model.
        learn_bits: learn a continuous width per layer first (BAQ; needs ``budget_bits``), for
            ``bit_epochs`` epochs under λ_bits·max(0, avg_bits − budget) and
            λ_fair·(max_g L_g − mean_g L_g), then project onto the budget exactly (knapsack),
            re-quantize each layer at its width and fine-tune ``epochs`` at the fixed widths.
        budget_bits: parameter-weighted average weight bits the BAQ result must meet.
        bit_choices: candidate widths of BAQ.
        bit_epochs: epochs of the width-learning phase.
        lambda_bits: λ_bits, weight of the budget penalty.
        lambda_fair: λ_fair, weight of the group-gap penalty.
        bits_lr: Adam step size of the continuous widths (bits per step).
        weight_bits: PTQ width used when ``finetune`` is given a float model.
        rounding: ``"solver"`` (start from the solver's codes) or ``"adaptive"`` (first re-round
            every layer by group-weighted AdaRound on a group-balanced subset of the training
            data, ``fqexport.finetune.adaround``; a layer keeps the solver's codes where they
            reconstruct better).
        adaround_iters: optimisation steps per layer of the adaptive rounding.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: seeds sampling, the hold-out split and the calibration subset.
    """

    epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-2
    temperature: float = 2.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    sampler: Sampler = "group-balanced"
    loss: GroupLoss = "worst-group"
    group_weights: Mapping[str, float] | None = None
    dro_eta: float = 0.5
    coreset_fraction: float = 0.5
    coreset_min_per_group: int = 64
    coreset_score: CoresetScore = "loss"
    holdout_fraction: float = 0.1
    holdout_max: int = 2000
    max_minutes: float | None = None
    max_steps: int | None = None
    num_workers: int = 0
    learn_act_scales: bool = True
    oscillation: float = 0.0
    learn_bits: bool = False
    budget_bits: float | None = None
    bit_choices: tuple[int, ...] = DEFAULT_BIT_CHOICES
    bit_epochs: int = 1
    lambda_bits: float = 1.0
    lambda_fair: float = 0.0
    bits_lr: float = 0.05
    weight_bits: int = 4
    rounding: Rounding = "solver"
    adaround_iters: int = 300
    device: Device = "auto"
    seed: int = 0

    __hash__ = hash_fields  # group_weights is a mapping

    def __post_init__(self) -> None:
        check_seed(self.seed)
        for name, low in (("epochs", 1), ("batch_size", 1), ("coreset_min_per_group", 1), ("seed", 0),
                          ("bit_epochs", 1), ("adaround_iters", 1),
                          ("holdout_max", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if not _integer(value) or value < low:
                raise ConfigError(MSG_POSITIVE_INT.format(field=name, value=value, low=low))
            object.__setattr__(self, name, int(value))  # numpy's as a Python int: the metadata is JSON
        for name, choices in (("sampler", get_args(Sampler)), ("loss", get_args(GroupLoss)),
                              ("coreset_score", get_args(CoresetScore)), ("rounding", get_args(Rounding)),
                              ("device", get_args(Device))):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(MSG_CHOICE.format(field=name, value=value, choices=", ".join(choices)))
        checks = (
            ("lr", lambda v: v > 0, "a finite number > 0, e.g. 3e-2"),
            ("temperature", lambda v: v > 0, "a finite number > 0"),
            ("kd_weight", lambda v: v >= 0, "a finite number >= 0"),
            ("ce_weight", lambda v: v >= 0, "a finite number >= 0"),
            ("dro_eta", lambda v: v >= 0, "a finite number >= 0"),
            ("oscillation", lambda v: v >= 0, "a finite number >= 0 (0: off)"),
            ("lambda_bits", lambda v: v >= 0, "a finite number >= 0"),
            ("lambda_fair", lambda v: v >= 0, "a finite number >= 0"),
            ("bits_lr", lambda v: v > 0, "a finite number > 0"),
            ("coreset_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("holdout_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
        )
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not _finite(value) or not ok(float(value)):
                raise ConfigError(MSG_RANGE.format(field=name, value=value, rule=rule))
            object.__setattr__(self, name, float(value))
        if float(self.kd_weight) + float(self.ce_weight) <= 0:
            raise ConfigError(MSG_RANGE.format(field="kd_weight", value=self.kd_weight,
                                               rule="> 0 when ce_weight is 0 (the loss would be zero)"))
        for name in ("learn_act_scales", "learn_bits"):  # the string "False" would count as true
            object.__setattr__(self, name, as_bool(getattr(self, name), f"FinetuneConfig.{name}"))
        if self.max_minutes is not None and (not _finite(self.max_minutes) or float(self.max_minutes) <= 0):
            raise ConfigError(MSG_RANGE.format(field="max_minutes", value=self.max_minutes,
                                               rule="a number of minutes > 0, or None (no limit)"))
        if self.max_minutes is not None:
            object.__setattr__(self, "max_minutes", float(plain_number(self.max_minutes)))
        steps = self.max_steps
        if steps is not None and (not _integer(steps) or steps < 1):
            raise ConfigError(MSG_RANGE.format(field="max_steps", value=steps,
                                               rule="an integer number of steps >= 1, or None (no limit)"))
        bits = self.weight_bits
        if not _integer(bits) or int(bits) not in SUPPORTED_WEIGHT_BITS:
            raise ConfigError(MSG_BITS.format(value=bits))
        choices = tuple(self.bit_choices) if isinstance(self.bit_choices, Iterable) else ()
        if not choices or any(not _integer(b) or int(b) not in SUPPORTED_WEIGHT_BITS for b in choices):
            raise ConfigError(MSG_BIT_CHOICES.format(value=self.bit_choices))
        choices = tuple(sorted({int(b) for b in choices}))  # as MixedPrecisionConfig: (8, 4, 2) == (2, 4, 8)
        object.__setattr__(self, "weight_bits", int(bits))
        object.__setattr__(self, "bit_choices", choices)
        if steps is not None:
            object.__setattr__(self, "max_steps", int(steps))
        if self.budget_bits is not None:
            if not _finite(self.budget_bits):
                raise ConfigError(MSG_RANGE.format(field="budget_bits", value=self.budget_bits,
                                                   rule="a finite number of average weight bits"))
            if not (min(choices) <= float(self.budget_bits) <= max(choices)):
                raise ConfigError(MSG_BUDGET.format(value=self.budget_bits, lo=min(choices), hi=max(choices)))
            object.__setattr__(self, "budget_bits", float(plain_number(self.budget_bits)))
        if self.learn_bits and self.budget_bits is None:
            raise ConfigError(MSG_LEARN_BITS)
        if self.loss == "group-weighted":
            gw = self.group_weights
            if not isinstance(gw, Mapping) or not gw:
                raise ConfigError(MSG_GROUP_WEIGHTS)
            for g, w in gw.items():
                if not _finite(w) or float(w) < 0:
                    raise ConfigError(MSG_RANGE.format(field=f"group_weights[{g!r}]", value=w, rule="a finite number >= 0"))
            if sum(float(w) for w in gw.values()) <= 0:
                raise ConfigError(MSG_RANGE.format(field="group_weights", value=dict(gw), rule="not all zero"))
        defaults = {f.name: f.default for f in fields(self)}
        for name, (key, wanted) in ONLY_WITH.items():
            value, got = getattr(self, name), getattr(self, key)
            if value != defaults[name] and got != wanted:
                raise ConfigError(MSG_ONLY_WITH.format(field=name, value=value, key=key, wanted=wanted, got=got,
                                                       default=defaults[name]))
        if isinstance(self.group_weights, Mapping):  # frozen, as QuantConfig's mappings: checked once, hashable
            object.__setattr__(self, "group_weights", FrozenDict({k: float(v) for k, v in self.group_weights.items()}))

    def to_dict(self) -> dict[str, object]:
        """The settings recorded in the export metadata."""
        return {
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
            "temperature": self.temperature, "kd_weight": self.kd_weight, "ce_weight": self.ce_weight,
            "sampler": self.sampler, "loss": self.loss,
            "group_weights": None if self.group_weights is None else {str(k): float(v) for k, v in self.group_weights.items()},
            "dro_eta": self.dro_eta, "coreset_fraction": self.coreset_fraction,
            "coreset_min_per_group": self.coreset_min_per_group, "coreset_score": self.coreset_score,
            "holdout_fraction": self.holdout_fraction, "holdout_max": self.holdout_max,
            "max_steps": self.max_steps,
            "max_minutes": self.max_minutes, "learn_act_scales": self.learn_act_scales, "oscillation": self.oscillation,
            "learn_bits": self.learn_bits, "budget_bits": self.budget_bits, "bit_choices": list(self.bit_choices),
            "bit_epochs": self.bit_epochs, "lambda_bits": self.lambda_bits, "lambda_fair": self.lambda_fair,
            "bits_lr": self.bits_lr, "rounding": self.rounding, "adaround_iters": self.adaround_iters,
            "seed": self.seed, "weight_bits": self.weight_bits, "device": self.device, "num_workers": self.num_workers,
        }
