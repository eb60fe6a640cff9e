"""``finetune``: fairness-aware fine-tuning after PTQ, returning a CompressedModel like any other.

1. Start: a CompressedModel (its solver codes, steps and calibrated activation ranges) or a
   float model, which is first compressed at ``weight_bits`` on a group-balanced subset of the
   training data (or ``calib``).
2. Hold out ``holdout_fraction`` of each group of the training data (at most ``holdout_max``
   samples, read into memory); the rest is streamed batch by batch (``fqexport.finetune.data``:
   a Dataset or CSV manifest through a DataLoader with ``num_workers``, an ``.npz`` memory-mapped).
   The float model (BN folded) is the teacher: its logits are computed once for in-memory data,
   else per batch; the core-set's per-sample scores come from one streaming pass per epoch.
3. Train the student (``fqexport.finetune.qat``: learned codes within each layer's grid,
   per-channel steps, biases, activation steps) with Adam and a cosine schedule on
   ``fqexport.finetune.losses`` under the chosen sampler and group objective.
4. After every epoch (and at the start) measure each group's cross-entropy on the hold-out;
   keep the state with the lowest worst-group loss. ``max_minutes`` stops at the end of a step.
5. Write the kept state back as integer codes, steps, biases and activation qparams into a new
   reference and layer table, so ``export`` and ``validate`` run unchanged; the metadata records
   the settings, the training data's group counts and the hold-out figures before/after.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fqexport.calibration.group_data import GroupData, group_weight_vector
from fqexport.calibration.readers import check_labels
from fqexport.calibration.sampling import (
    balanced_allocation,
    group_balanced_indices,
    split_holdout,
)
from fqexport.config import SUPPORTED_WEIGHT_BITS, QuantConfig
from fqexport.device import resolve_device
from fqexport.errors import ConfigError, DataError
from fqexport.finetune.adaround import adaptive_rounding
from fqexport.finetune.baq import (
    average_bits,
    budget_penalty,
    fairness_penalty,
    project_to_budget,
)
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.data import TrainStream, open_train
from fqexport.finetune.losses import (
    combine,
    exponentiated_gradient,
    per_sample_loss,
)
from fqexport.finetune.qat import build_student, write_back
from fqexport.finetune.samplers import (
    coreset_indices,
    group_balanced_batches,
    natural_batches,
)
from fqexport.metadata import layer_records
from fqexport.metrics.group_metrics import group_metrics
from fqexport.model import CompressedModel
from fqexport.pipeline.compress import compress
from fqexport.quant.per_group import group_means

log = logging.getLogger(__name__)

MSG_GROUPS = (
    "{source}: the training data's groups ({train}) do not match the calibration data's groups "
    "({calib}); give training data with the same group names in the same order"
)
MSG_SHAPE = (
    "{source}: field 'x' has sample shape {got}, but the model was compressed for {want}; "
    "give training data of the calibration data's shape"
)
MSG_NAN = (
    "fine-tuning diverged: the loss became {value} at epoch {epoch}, step {step}; the last good "
    "state (hold-out worst-group loss {best:.4f}, epoch {best_epoch}) is kept on this error's "
    "'last_good' attribute and nothing was written. Lower FinetuneConfig.lr (now {lr:g}; CLI --lr)"
)
MSG_START = (
    "finetune needs a CompressedModel (from fqexport.compress) or a float torch.nn.Module, "
    "not a {kind}"
)
MSG_GROUP_WEIGHT_UNKNOWN = (
    "FinetuneConfig.group_weights names group {name!r}, which is not in the training data "
    "(groups: {groups})"
)
MSG_WIDTH = "finetune_widths: width {value!r} is not supported: give integers from 2 to 8, e.g. (3, 4, 8)"
MSG_NAN_BITS = (
    "learning bit widths diverged: the loss became {value} at epoch {epoch}; nothing was written. Lower "
    "FinetuneConfig.lr (now {lr:g}) or bits_lr (now {bits_lr:g})"
)

# Steps, biases and activation steps learn at this fraction of ``lr`` (latent weights at ``lr``).
_AUX_LR = 0.1


def _start(model_or_cm: Any, data: TrainStream, config: FinetuneConfig, calib: Any,
           quant_config: QuantConfig | None, progress: bool) -> CompressedModel:
    if isinstance(model_or_cm, CompressedModel):
        return model_or_cm
    if not isinstance(model_or_cm, nn.Module):
        raise ConfigError(MSG_START.format(kind=type(model_or_cm).__name__))
    qc = quant_config or QuantConfig(weight_bits=config.weight_bits, seed=config.seed)
    calib_data = calib if calib is not None else data.take(group_balanced_indices(data, qc.num_calib, seed=config.seed),
                                                           config.num_workers)
    return compress(model_or_cm, calib_data, qc, progress=progress)


def check_train_data(data: GroupData | TrainStream, cm: CompressedModel) -> None:
    """Raise DataError unless ``data`` has the calibration's groups, sample shape and labels."""
    if tuple(data.group_names) != tuple(cm.group_names):
        raise DataError(MSG_GROUPS.format(source=data.source, train=", ".join(data.group_names),
                                          calib=", ".join(cm.group_names)))
    shape = tuple(data.sample_shape if isinstance(data, TrainStream) else data.x.shape[1:])
    if shape != tuple(cm.input_shape):
        raise DataError(MSG_SHAPE.format(source=data.source, got=shape, want=tuple(cm.input_shape)))
    check_labels(data, cm.num_classes)


def _split(data: TrainStream, config: FinetuneConfig) -> tuple[TrainStream, GroupData]:
    """``(fit stream, hold-out in memory)``: ``split_holdout``'s stratified split, the hold-out
    capped at ``config.holdout_max`` samples (as equal per group as possible; the rest is fitted)."""
    positions = GroupData(np.arange(len(data), dtype=np.int64)[:, None], data.y, data.group, data.group_names,
                          data.source)
    fit, hold = split_holdout(positions, config.holdout_fraction, seed=config.seed)
    fit_idx, hold_idx = fit.x[:, 0], hold.x[:, 0]
    if len(hold_idx) > config.holdout_max:
        rng = np.random.default_rng(config.seed)
        take = balanced_allocation(hold.group_counts(), config.holdout_max)
        keep = np.sort(np.concatenate([rng.choice(hold_idx[hold.group == g], size=int(k), replace=False)
                                       for g, k in enumerate(take) if k > 0]))
        fit_idx = np.sort(np.concatenate([fit_idx, np.setdiff1d(hold_idx, keep)]))
        log.info("%s: hold-out capped at %d samples (holdout_max; %d would be held out)", data.source,
                 len(keep), len(hold_idx))
        hold_idx = keep
    return data.subset(fit_idx), data.take(hold_idx, config.num_workers)


class _Fit:
    """The fitted slice: its stream, labels and groups on the device, and the teacher's logits —
    computed once when x is in memory (as before streaming), else per batch."""

    def __init__(self, stream: TrainStream, teacher: nn.Module, device: torch.device, num_workers: int) -> None:
        self.stream, self.teacher, self.device, self.num_workers = stream, teacher, device, num_workers
        self.y = torch.from_numpy(stream.y).to(device)
        self.g = torch.from_numpy(stream.group).to(device)
        self.x = stream.x_array()
        self.cache = None if self.x is None else _logits(teacher, self.x, device)

    def __len__(self) -> int:
        return len(self.stream)

    def steps(self, batches: list[np.ndarray]):
        """``(index tensor, x tensor, teacher logits)`` of each batch, x read batch by batch."""
        for idx, (x, _, _) in zip(batches, self.stream.batches(batches, self.num_workers)):
            idx_t = torch.from_numpy(idx).to(self.device)
            xb = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
            if self.cache is not None:
                tb = self.cache[idx_t]
            else:
                with torch.no_grad():
                    tb = self.teacher(xb).float()
            yield idx_t, xb, tb

    def _pass(self, student: nn.Module | None, batch_size: int = 256):
        """One in-order pass: ``(index tensor, student logits or None, teacher logits)`` per chunk."""
        n = len(self.stream)
        chunks = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        for idx_t, xb, t in self.steps(chunks):
            with torch.no_grad():
                logits = None if student is None else student(xb).float()
            yield idx_t, logits, t

    def teacher_ce(self, num_groups: int) -> torch.Tensor:
        """The float model's cross-entropy per group (the baseline of the DRO excess)."""
        if self.cache is not None:
            ce = nn.functional.cross_entropy(self.cache, self.y, reduction="none")
        else:
            ce = torch.cat([nn.functional.cross_entropy(t, self.y[i], reduction="none")
                            for i, _, t in self._pass(None)])
        return group_means(ce, self.g, num_groups)[0]

    def scores(self, student: nn.Module, config: FinetuneConfig) -> np.ndarray:
        """The core-set's per-sample score of every fitted sample (only the scores are kept)."""
        disagreement = config.coreset_score == "disagreement" and config.kd_weight > 0
        kw = dict(temperature=config.temperature, kd_weight=config.kd_weight,
                  ce_weight=0.0 if disagreement else config.ce_weight)
        if self.cache is not None:
            return per_sample_loss(_logits(student, self.x, self.device), self.cache, self.y, **kw).cpu().numpy()
        return torch.cat([per_sample_loss(s, t, self.y[i], **kw) for i, s, t in self._pass(student)]).cpu().numpy()


def _logits(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
            outs.append(model(xb).float())
    return torch.cat(outs) if outs else torch.zeros(0)


def _per_group(metrics) -> dict[str, dict[str, float]]:
    return {g: {"accuracy": round(r["accuracy"], 6), "loss": round(r["loss"], 6), "count": int(r["count"])}
            for g, r in metrics.by_group.items()}


def _worst_loss(metrics) -> float:
    losses = [r["loss"] for r in metrics.by_group.values() if r["count"]]
    return max(losses) if losses else float("inf")


def _snapshot(student: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def finetune(
    model_or_cm: CompressedModel | nn.Module,
    train: GroupData | Any,
    config: FinetuneConfig | None = None,
    *,
    calib: Any = None,
    quant_config: QuantConfig | None = None,
    progress: bool = True,
) -> CompressedModel:
    """Fine-tune a compressed model (or compress a float model and fine-tune it) on ``train``.

    Args:
        model_or_cm: a CompressedModel (not modified) or a float classifier.
        train: group-labeled training data: a GroupData, an ``.npz``/``.csv`` path or a Dataset
            yielding ``(x, y, group)``; its groups must be the calibration data's.
        config: a FinetuneConfig (default: 2 epochs, natural sampling, plain loss).
        calib: calibration data for the PTQ start of a float model (default: a group-balanced
            subset of ``train``); ignored for a CompressedModel.
        quant_config: QuantConfig of that PTQ start (default ``QuantConfig(weight_bits=config.weight_bits)``).
        progress: a tqdm bar per epoch with the running per-group loss.

    Returns:
        A new CompressedModel holding the best checkpoint (lowest hold-out worst-group loss).

    Raises:
        DataError: the training data's groups, shape or labels do not fit the model.
        ConfigError: a bad option, or the loss became NaN/Inf (``err.last_good`` holds the
            CompressedModel of the last good checkpoint; nothing is written).
    """
    return _train(model_or_cm, train, config, calib, quant_config, progress)[1]


def finetune_widths(
    model_or_cm: CompressedModel | nn.Module,
    train: GroupData | Any,
    config: FinetuneConfig | None = None,
    widths: tuple[int, ...] = (3, 4, 5, 6, 8),
    *,
    calib: Any = None,
    quant_config: QuantConfig | None = None,
    progress: bool = True,
) -> dict[int, CompressedModel]:
    """Fine-tune once (as :func:`finetune`), then return the model at each width in ``widths``.

    A layer whose trained width is the requested one keeps its trained codes; every other layer's
    latent weights are re-quantized at that width (fresh per-channel grid, no further training),
    with the learned biases and activation steps. Pair with ``FinetuneConfig(oscillation=λ)``
    so the latent weights sit on the trained grid. Each model's metadata records
    ``finetune["requantized_to"]``.
    """
    widths = tuple(widths)
    for b in widths:
        if isinstance(b, bool) or not isinstance(b, int) or b not in SUPPORTED_WEIGHT_BITS:
            raise ConfigError(MSG_WIDTH.format(value=b))
    if not widths:
        raise ConfigError(MSG_WIDTH.format(value="()"))
    cm, result, weights, acts = _train(model_or_cm, train, config, calib, quant_config, progress)
    out = {}
    for b in widths:
        reference, layers = write_back(cm.reference, cm.layers, weights, acts, bits=b,
                                       weight_range=cm.config.weight_range, storage=cm.config.storage)
        total = sum(l.params for l in layers.values())
        meta = replace(result.metadata, layers=layer_records(layers),
                       avg_weight_bits=round(sum(l.bits * l.params for l in layers.values()) / max(total, 1), 4),
                       finetune={**result.metadata.finetune, "requantized_to": b})
        out[b] = replace(result, reference=reference, layers=layers, metadata=meta)
    return out


def _train(model_or_cm, train, config: FinetuneConfig | None, calib, quant_config, progress):
    """The work of :func:`finetune`: ``(start cm, result cm, learned weights, learned acts)``,
    the learned modules holding the kept checkpoint."""
    config = config or FinetuneConfig()
    data = open_train(train, config.num_workers)
    cm = _start(model_or_cm, data, config, calib, quant_config, progress)
    check_train_data(data, cm)
    names = tuple(cm.group_names)
    num_groups = len(names)
    fixed_weights = None
    if config.loss == "group-weighted":
        vec = group_weight_vector(config.group_weights, names, MSG_GROUP_WEIGHT_UNKNOWN)
        fixed_weights = torch.as_tensor(vec / vec.sum(), dtype=torch.float32)
    device = resolve_device(config.device, "FinetuneConfig.device")
    torch.manual_seed(config.seed)
    ptq, baq, rounding = cm, None, None
    if config.rounding == "adaptive":
        # in memory: all of it (as before streaming); streamed: the group-balanced 256 it would draw
        sub = data.take(None if data.in_memory else group_balanced_indices(data, min(256, len(data)), config.seed),
                        config.num_workers)
        cm, rounding = adaptive_rounding(cm, sub, iters=config.adaround_iters, seed=config.seed)
    if config.learn_bits:
        cm, baq = _learn_bits(cm, data, config, device, fixed_weights, progress)
    rng = np.random.default_rng(config.seed)

    fit_stream, hold = _split(data, config)
    teacher = copy.deepcopy(cm.float_model).to(device).eval()
    student, weights, acts = build_student(cm.reference, cm.layers, config.learn_act_scales)
    student = student.to(device).eval()  # eval: BN is folded; nothing should switch modes
    t0 = time.monotonic()
    fit = _Fit(fit_stream, teacher, device, config.num_workers)
    # Float model's cross-entropy per group on the fit data: the baseline of the DRO excess.
    teacher_ce = fit.teacher_ce(num_groups)
    fixed_weights = None if fixed_weights is None else fixed_weights.to(device)
    q = torch.full((num_groups,), 1.0 / num_groups, device=device)

    latent = [m.latent for m in weights.values()]
    aux = [p for m in weights.values() for p in (m.ratio, m.bias) if p is not None]
    aux += [m.ratio for m in acts.values() if m.ratio.requires_grad]
    opt = torch.optim.Adam([{"params": latent, "lr": config.lr},
                            {"params": aux, "lr": config.lr * _AUX_LR}])
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = _steps_per_epoch(fit_stream.group, config)
    total_steps = max(1, steps_per_epoch * config.epochs)

    def hold_metrics():
        return group_metrics(_logits(student, hold.x, device).cpu().numpy(), hold.y, hold.group, names)

    start_metrics = hold_metrics()
    best = {"loss": _worst_loss(start_metrics), "state": _snapshot(student), "epoch": 0}
    history = [{"epoch": 0, "holdout_worst_group_loss": round(best["loss"], 6),
                "holdout": _per_group(start_metrics)}]
    step, stopped, used = 0, "completed", 0
    deadline = None if config.max_minutes is None else t0 + 60.0 * float(config.max_minutes)

    def fail(value: float, epoch: int) -> None:
        student.load_state_dict(best["state"])
        last = _result(cm, student, weights, acts)
        err = ConfigError(MSG_NAN.format(value=value, epoch=epoch, step=step, best=best["loss"],
                                         best_epoch=best["epoch"], lr=config.lr))
        err.last_good = last
        raise err

    for epoch in range(1, config.epochs + 1):
        batches = _epoch_batches(student, fit, config, rng, num_groups)
        bar = tqdm(total=len(batches), desc=f"finetune epoch {epoch}/{config.epochs}", unit="step",
                   disable=not progress, leave=True)
        running = torch.full((num_groups,), float("nan"), device=device)
        stream = fit.steps(batches)
        for idx_t, xb, tb in stream:
            bar.update(1)
            used += len(idx_t)
            yb, gb = fit.y[idx_t], fit.g[idx_t]
            losses = per_sample_loss(student(xb), tb, yb, temperature=config.temperature,
                                     kd_weight=config.kd_weight, ce_weight=config.ce_weight)
            lg, counts = group_means(losses, gb, num_groups)
            present = counts > 0
            if config.loss == "worst-group":
                excess = lg.detach() - config.ce_weight * teacher_ce
                q = exponentiated_gradient(q, excess, present, config.dro_eta)
                objective = combine(lg, counts, q)
            else:
                objective = combine(lg, counts, fixed_weights)
            if config.oscillation:
                objective = objective + config.oscillation * sum(m.dampening() for m in weights.values())
            value = float(objective.detach())
            if not math.isfinite(value):
                bar.close()
                stream.close()
                fail(value, epoch)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            factor = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * factor
            opt.step()
            step += 1
            fresh = present & torch.isnan(running)
            running = torch.where(fresh, lg.detach(), torch.where(present, 0.9 * running + 0.1 * lg.detach(), running))
            if progress:
                bar.set_postfix({n: f"{float(v):.3f}" for n, v in zip(names, running)})
            if deadline is not None and time.monotonic() > deadline:
                stopped = "max_minutes"
                break
            if config.max_steps is not None and step >= config.max_steps:
                stopped = "max_steps"
                break
        stream.close()
        bar.close()
        metrics = hold_metrics()
        worst = _worst_loss(metrics)
        if not math.isfinite(worst):
            fail(worst, epoch)
        history.append({"epoch": epoch, "holdout_worst_group_loss": round(worst, 6), "holdout": _per_group(metrics)})
        log.info("finetune epoch %d: hold-out per-group loss %s", epoch,
                 {g: r["loss"] for g, r in metrics.by_group.items()})
        if worst < best["loss"]:
            best = {"loss": worst, "state": _snapshot(student), "epoch": epoch}
        if stopped != "completed":
            log.info("finetune: %s reached after %d steps; keeping epoch %d", stopped, step, best["epoch"])
            break

    student.load_state_dict(best["state"])
    result = _result(cm, student, weights, acts)
    after = group_metrics(result.predict(hold.x), hold.y, hold.group, names)
    before = group_metrics(ptq.predict(hold.x), hold.y, hold.group, names)
    record = {
        "settings": config.to_dict(),
        "train_source": data.source,
        "train_group_counts": {n: int(c) for n, c in zip(names, data.group_counts())},
        "num_fit": len(fit), "num_holdout": len(hold),
        "steps": step, "samples_seen": int(used), "epochs_run": len(history) - 1,
        "stopped": stopped, "best_epoch": best["epoch"],
        "seconds": round(time.monotonic() - t0, 3),
        "holdout_before": _per_group(before), "holdout_after": _per_group(after),
        "history": history,
        # mean over the latent weights of (v - round(v))^2, v = clamp(w / s): how far they sit
        # off their grid points in steps (what the oscillation regulariser shrinks; 0 at the start)
        "latent_offgrid": round(sum(float(m.dampening().detach()) for m in weights.values())
                                / sum(m.latent.numel() for m in weights.values()), 6),
        "baq": baq,
        "adaptive_rounding": rounding,
        "final_group_weights": {n: round(float(v), 6) for n, v in zip(names, q.cpu())} if config.loss == "worst-group" else None,
    }
    return cm, replace(result, metadata=replace(result.metadata, finetune=record)), weights, acts


def _steps_per_epoch(group: np.ndarray, config: FinetuneConfig) -> int:
    n = len(group)
    if config.sampler == "core-set":
        sizes = np.bincount(np.asarray(group))
        n = int(sum(min(int(c), max(int(math.ceil(config.coreset_fraction * c)), config.coreset_min_per_group))
                    for c in sizes if c))
    return max(1, -(-n // config.batch_size))


def _epoch_batches(student, fit: _Fit, config: FinetuneConfig, rng: np.random.Generator,
                   num_groups: int) -> list[np.ndarray]:
    """The epoch's batches (index arrays into ``fit``) under ``config.sampler``; the samplers
    see only the groups (and, for the core-set, one streaming pass's per-sample scores)."""
    group = fit.stream.group
    if config.sampler == "natural":
        return natural_batches(len(fit), config.batch_size, rng)
    if config.sampler == "group-balanced":
        return group_balanced_batches(group, num_groups, config.batch_size, rng)
    # The core-set: per group, the hardest samples by the current student's score (forward only);
    # batches drawn group-balanced from them, so each step's group losses (and the worst-group
    # weights) see every group, however small its share of the core-set.
    scores = fit.scores(student, config)
    keep = coreset_indices(scores, group, num_groups, config.coreset_fraction, config.coreset_min_per_group)
    return [keep[b] for b in group_balanced_batches(group[keep], num_groups, config.batch_size, rng)]


def _result(cm: CompressedModel, student, weights, acts) -> CompressedModel:
    """``cm`` with the student's codes, steps, biases and activation steps written back."""
    reference, layers = write_back(cm.reference, cm.layers, weights, acts)
    metadata = replace(cm.metadata, layers=layer_records(layers))
    return replace(cm, reference=reference, layers=layers, metadata=metadata)


def _learn_bits(cm: CompressedModel, data: TrainStream, config: FinetuneConfig, device, fixed_weights,
                progress: bool) -> tuple[CompressedModel, dict[str, Any]]:
    """BAQ (fqexport.finetune.baq): learn a continuous width per layer for ``bit_epochs`` under
    the budget and fairness penalties, project onto the budget (knapsack) and re-quantize.
    Returns the fixed-width CompressedModel (learned biases and activation steps kept) and the
    record of the learned and chosen widths."""
    names = tuple(cm.group_names)
    num_groups = len(names)
    fit_stream, _ = _split(data, config)
    teacher = copy.deepcopy(cm.float_model).to(device).eval()
    fit = _Fit(fit_stream, teacher, device, config.num_workers)
    teacher_ce = fit.teacher_ce(num_groups)
    student, weights, acts = build_student(cm.reference, cm.layers, config.learn_act_scales)
    student = student.to(device).eval()
    bits = {n: m.learn_bits(tuple(config.bit_choices), cm.config.weight_range) for n, m in weights.items()}
    params = torch.tensor([float(cm.layers[n].params) for n in weights], device=device)
    aux = [p for m in weights.values() for p in (m.ratio, m.bias) if p is not None] + [m.ratio for m in acts.values() if m.ratio.requires_grad]
    opt = torch.optim.Adam([{"params": [m.latent for m in weights.values()], "lr": config.lr},
                            {"params": aux, "lr": config.lr * _AUX_LR},
                            {"params": list(bits.values()), "lr": config.bits_lr}])
    fixed = None if fixed_weights is None else fixed_weights.to(device)
    q = torch.full((num_groups,), 1.0 / num_groups, device=device)
    rng = np.random.default_rng(config.seed + 1)
    lo, hi = min(config.bit_choices), max(config.bit_choices)
    for epoch in range(1, config.bit_epochs + 1):
        batches = _epoch_batches(student, fit, config, rng, num_groups)
        bar = tqdm(total=len(batches), desc=f"learn bits {epoch}/{config.bit_epochs}", unit="step",
                   disable=not progress)
        stream = fit.steps(batches)
        for idx_t, xb, tb in stream:
            bar.update(1)
            losses = per_sample_loss(student(xb), tb, fit.y[idx_t], temperature=config.temperature,
                                     kd_weight=config.kd_weight, ce_weight=config.ce_weight)
            lg, counts = group_means(losses, fit.g[idx_t], num_groups)
            present = counts > 0
            if config.loss == "worst-group":
                q = exponentiated_gradient(q, lg.detach() - config.ce_weight * teacher_ce, present, config.dro_eta)
                objective = combine(lg, counts, q)
            else:
                objective = combine(lg, counts, fixed)
            bvec = torch.stack([bits[n] for n in weights])
            objective = objective + config.lambda_bits * budget_penalty(bvec, params, config.budget_bits)
            if config.lambda_fair:
                objective = objective + config.lambda_fair * fairness_penalty(lg, present)
            value = float(objective.detach())
            if not math.isfinite(value):
                bar.close()
                stream.close()
                err = ConfigError(MSG_NAN_BITS.format(value=value, epoch=epoch, lr=config.lr, bits_lr=config.bits_lr))
                err.last_good = cm
                raise err
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            with torch.no_grad():
                for b in bits.values():
                    b.clamp_(lo, hi)
            if progress:
                bar.set_postfix({"avg bits": f"{float(average_bits(bvec.detach(), params)):.3f}"})
        stream.close()
        bar.close()
    learned = {n: float(b.detach()) for n, b in bits.items()}
    chosen = project_to_budget(learned, {n: cm.layers[n].params for n in weights}, config.bit_choices,
                               float(config.budget_bits))
    for m in weights.values():
        m.bit = None
    reference, layers = write_back(cm.reference, cm.layers, weights, acts, bits=chosen,
                                   weight_range=cm.config.weight_range, storage=cm.config.storage)
    total = sum(l.params for l in layers.values())
    avg = sum(l.bits * l.params for l in layers.values()) / max(total, 1)
    log.info("BAQ: learned widths %s -> %s (avg %.3f bits, budget %g)", learned, chosen, avg, config.budget_bits)
    fixed_cm = replace(cm, reference=reference, layers=layers,
                       metadata=replace(cm.metadata, layers=layer_records(layers), avg_weight_bits=round(avg, 4)))
    record = {"budget_bits": float(config.budget_bits), "learned_bits": {n: round(v, 4) for n, v in learned.items()},
              "bits": dict(chosen), "avg_bits": round(avg, 4)}
    return fixed_cm, record
