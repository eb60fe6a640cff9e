"""The fine-tuning loop behind :func:`fqexport.finetune.api.finetune`.

1. Start from a CompressedModel, or compress a float model (``start``); check the training data.
2. Fix the grids when asked: adaptive rounding (``adaround``), learned widths (``learn_bits``).
3. Split off the hold-out; the float model (BN folded) is the teacher, the student learns codes
   within each layer's grid, steps, biases and activation steps (``qat``).
4. Per epoch: the sampler's batches; per step the group objective (``objective``, plus the
   oscillation regulariser) and an Adam step under a cosine schedule; ``max_minutes`` and
   ``max_steps`` stop at the end of a step.
5. After every epoch (and at the start) the hold-out's worst-group loss (``holdout``); the state
   with the lowest one is kept, written back and recorded in the metadata.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import numpy as np
import torch
from fqexport.progress import tqdm

from fqexport.calibration.checks import require_labels
from fqexport.calibration.readers import open_stream
from fqexport.calibration.sampling import group_balanced_indices
from fqexport.calibration.stream import DataStream
from fqexport.config import QuantConfig
from fqexport.device import resolve_device
from fqexport.errors import ConfigError
from fqexport.finetune.adaround import adaptive_rounding
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.fit_data import FitData, epoch_batches, split_fit_holdout, steps_per_epoch
from fqexport.finetune.holdout import Holdout, history_record, per_group, worst_loss
from fqexport.finetune.learn_bits import learn_bits
from fqexport.finetune.objective import GroupObjective, fixed_group_weights, optimizer
from fqexport.finetune.qat import LearnableActQuant, LearnableWeight, build_student, write_back
from fqexport.finetune.start import check_train_data, start_model, start_width
from fqexport.global_state import with_gradients
from fqexport.metadata import layer_records
from fqexport.model import CompressedModel
from fqexport.pipeline.compress import model_task

log = logging.getLogger(__name__)

MSG_NOTHING_TO_LEARN = (
    "FinetuneConfig.kd_weight=0 leaves the {task} model nothing to learn from: {source} has no {fields} for its "
    "own training loss; set kd_weight > 0 (distillation to the float model) or give data with them"
)
MSG_NAN = (
    "fine-tuning diverged: the loss became {value} at epoch {epoch}, step {step}; the last good "
    "state (hold-out worst-group loss {best:.4f}, epoch {best_epoch}) is kept on this error's "
    "'last_good' attribute and nothing was written. Lower FinetuneConfig.lr (now {lr:g}; CLI --lr)"
)


@dataclass(frozen=True)
class Trained:
    """What :func:`train_student` leaves: the model the student started from (after AdaRound /
    BAQ), the result (the kept checkpoint written back, its metadata recording the run) and the
    learned modules holding that checkpoint."""

    start: CompressedModel
    result: CompressedModel
    weights: dict[str, LearnableWeight]
    acts: dict[str, LearnableActQuant]
    holdout: Holdout | None = None  # the run's held-out samples (a model re-quantized at another width is measured on them)


@with_gradients
def train_student(model_or_cm: Any, train_data: Any, config: FinetuneConfig | None, calib: Any,
                  quant_config: QuantConfig | None, progress: bool) -> Trained:
    """Steps 1-5 of the module docstring (the arguments are :func:`~fqexport.finetune.api.finetune`'s)."""
    config = config or FinetuneConfig()
    data = open_stream(train_data, num_workers=config.num_workers)
    task = model_or_cm.task if isinstance(model_or_cm, CompressedModel) else (
        model_task(model_or_cm, data, None)[0] if isinstance(model_or_cm, torch.nn.Module) else None)
    if task is None or not task.distills_in_finetune:  # a detector or segmenter distils: no labels needed
        require_labels(data, "finetune")  # cross-entropy and the hold-out's accuracy; before any compress
    elif not config.kd_weight and task.needs_annotations(data):
        raise ConfigError(MSG_NOTHING_TO_LEARN.format(task=task.name, source=data.source,
                                                      fields=task.annotation_fields))
    ptq = start_model(model_or_cm, data, config, calib, quant_config, progress, task)
    data = check_train_data(data, ptq)
    fixed_weights = fixed_group_weights(config, tuple(ptq.group_names))
    device = resolve_device(config.device, "FinetuneConfig.device")
    # seeded on a fork of torch's generators: the caller's random stream is left as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(config.seed)
        cm, rounding, baq = _fix_grids(ptq, data, config, device, fixed_weights, progress)
        run = _Run(cm, data, config, device, fixed_weights, progress)
        run.epochs()
        result = run.result()
        record = run.record(data, ptq, result, baq=baq, rounding=rounding)
    # the run started from AdaRound's or BAQ's model, not the PTQ model given: never return worse
    # than that one (BAQ: when it meets the budget itself)
    kept_ptq = ((rounding is not None or baq is not None)
                and (baq is None or ptq.metadata.avg_weight_bits <= config.budget_bits + 1e-9)
                and worst_loss(run.holdout.metrics_of(ptq)) < worst_loss(run.holdout.metrics_of(result)))
    if kept_ptq:
        record = {**record, "kept": "ptq", "holdout_after": record["holdout_before"],
                  "holdout_trained": record["holdout_after"]}  # the trained model's, returned at other widths
        log.info("fine-tuning from %s measured a larger held-out worst-group loss than the PTQ model: returning the "
                 "PTQ model", "learned bit widths" if baq is not None else "adaptive rounding")
        result = ptq
    allocation = _before_finetune(result.metadata.allocation)
    if baq is not None and allocation and not kept_ptq:  # learned widths replaced the search's record
        record, allocation = {**record, "allocation_before_learn_bits": allocation}, None
    meta = replace(result.metadata, finetune=record, allocation=allocation)
    return Trained(cm, replace(result, metadata=meta), run.weights, run.acts, run.holdout)


def _before_finetune(allocation: dict | None) -> dict | None:
    """A search's allocation record carried into a fine-tuned model: its held-out figures were
    measured on the search's fit, not on the fine-tuned model the file holds, and say so
    (``measured_holdout_before_finetune``; the fine-tuned figures are the finetune record's)."""
    if not allocation or "measured_holdout" not in allocation:
        return allocation
    out = {k: v for k, v in allocation.items() if k != "measured_holdout"}
    out["measured_holdout_before_finetune"] = allocation["measured_holdout"]
    return out


def _fix_grids(cm: CompressedModel, data: DataStream, config: FinetuneConfig, device: torch.device,
               fixed_weights: torch.Tensor | None, progress: bool) -> tuple[CompressedModel, dict | None, dict | None]:
    """Step 2: ``(cm, adaptive rounding record, BAQ record)``, each record None when not asked for."""
    rounding = baq = None
    if config.rounding == "adaptive":
        # in memory: all of it (as before streaming); streamed: the group-balanced 256 it would draw
        sub = data.take(None if data.in_memory else group_balanced_indices(data, min(256, len(data)), config.seed),
                        config.num_workers)
        cm, rounding = adaptive_rounding(cm, sub, iters=config.adaround_iters, seed=config.seed)
    if config.learn_bits:
        cm, baq = learn_bits(cm, data, config, device, fixed_weights, progress)
    return cm, rounding, baq


# groups whose running loss the progress bar shows: all up to this many, else the highest ones
_POSTFIX_GROUPS = 4


def _loss_postfix(names: tuple[str, ...], running: torch.Tensor) -> dict[str, str]:
    """The progress bar's running loss per group; with many groups the :data:`_POSTFIX_GROUPS`
    highest and how many are left out (40 groups made a terminal line of 40 entries per step)."""
    values = [float(v) for v in running.cpu()]
    order = range(len(names)) if len(names) <= _POSTFIX_GROUPS else sorted(
        range(len(names)), key=lambda i: -values[i] if math.isfinite(values[i]) else math.inf)[:_POSTFIX_GROUPS]
    shown = {names[i]: f"{values[i]:.3f}" for i in order}
    if len(names) > _POSTFIX_GROUPS:
        shown[f"+{len(names) - _POSTFIX_GROUPS} groups"] = "lower"
    return shown


def _running_loss(running: torch.Tensor, lg: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The progress bar's per-group loss: an exponential moving average (0.9) over the steps where
    the group is present, starting at its first value (NaN before)."""
    fresh = present & torch.isnan(running)
    return torch.where(fresh, lg, torch.where(present, 0.9 * running + 0.1 * lg, running))


class _Run:
    """Steps 3-5: the student, its optimiser and schedule, the step count and the hold-out."""

    def __init__(self, cm: CompressedModel, data: DataStream, config: FinetuneConfig, device: torch.device,
                 fixed_weights: torch.Tensor | None, progress: bool) -> None:
        self.cm, self.config, self.device, self.progress = cm, config, device, progress
        self.names = tuple(cm.group_names)
        self.rng = np.random.default_rng(config.seed)
        fit_stream, hold = split_fit_holdout(data, config)
        teacher = copy.deepcopy(cm.float_model).to(device).eval()
        student, self.weights, self.acts = build_student(cm.reference, cm.layers, config.learn_act_scales)
        self.student = student.to(device).eval()  # eval: BN is folded; nothing should switch modes
        self.t0 = time.monotonic()
        self.fit = FitData(fit_stream, teacher, device, config.num_workers, cm.task)
        # the float model's cross-entropy per group on the fit data: the baseline of the DRO excess
        teacher_ce = self.fit.teacher_ce(len(self.names))
        self.objective = GroupObjective(config, len(self.names), teacher_ce, fixed_weights, device, cm.task)
        self.opt = optimizer(self.weights, self.acts, config)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.total_steps = max(1, steps_per_epoch(fit_stream.group, config) * config.epochs)
        self.holdout = Holdout(hold, self.names, device, cm.task, teacher)
        self.holdout.start(self.student, self.result())
        self.num_steps, self.used, self.stopped = 0, 0, "completed"
        self.deadline = None if config.max_minutes is None else self.t0 + 60.0 * float(config.max_minutes)

    def epochs(self) -> None:
        """Steps 4-5: epoch after epoch until ``config.epochs`` or a limit; the best checkpoint is
        loaded into the student at the end. Raises ConfigError (MSG_NAN) on a NaN/Inf loss."""
        for epoch in range(1, self.config.epochs + 1):
            bad = self._epoch(epoch)
            if bad is not None:
                self._fail(bad, epoch)
            metrics, worst = self.holdout.measure(self.result())
            if not math.isfinite(worst):
                self._fail(worst, epoch)
            self.holdout.keep(epoch, self.student, metrics, worst)
            if self.stopped != "completed":
                log.info("finetune: %s reached after %d steps; keeping epoch %d", self.stopped, self.num_steps,
                         self.holdout.best_epoch)
                break
        self.holdout.restore_best(self.student)

    def _epoch(self, epoch: int) -> float | None:
        """One epoch's steps; returns the non-finite loss that stopped it (no step taken), else None."""
        batches = epoch_batches(self.student, self.fit, self.config, self.rng, len(self.names))
        bar = tqdm(total=len(batches), desc=f"finetune epoch {epoch}/{self.config.epochs}", unit="step",
                   disable=not self.progress, leave=True)
        running = torch.full((len(self.names),), float("nan"), device=self.device)
        stream = self.fit.steps(batches)
        bad = None
        for idx_t, xb, tb in stream:
            bar.update(1)
            self.used += len(idx_t)
            value, lg, present = self._step(idx_t, xb, tb)
            if not math.isfinite(value):
                bad = value
                break
            running = _running_loss(running, lg.detach(), present)
            if self.progress:
                bar.set_postfix(_loss_postfix(self.names, running))
            if self._limit_reached():
                break
        stream.close()
        bar.close()
        return bad

    def _step(self, idx_t: torch.Tensor, xb: torch.Tensor, tb: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One batch: ``(objective value, L [G], groups present)``, and an Adam step at the cosine
        schedule's learning rate unless the value is NaN/Inf."""
        objective, lg, counts = self.objective(self.student(xb), tb, self.fit.targets(idx_t), self.fit.g[idx_t])
        if self.config.oscillation:
            objective = objective + self.config.oscillation * sum(m.dampening() for m in self.weights.values())
        value = float(objective.detach())
        if math.isfinite(value):
            self.opt.zero_grad(set_to_none=True)
            objective.backward()
            factor = 0.5 * (1.0 + math.cos(math.pi * self.num_steps / self.total_steps))
            for group, lr in zip(self.opt.param_groups, self.base_lrs):
                group["lr"] = lr * factor
            self.opt.step()
            self.num_steps += 1
        return value, lg, counts > 0

    def _limit_reached(self) -> bool:
        """Whether ``max_minutes`` or ``max_steps`` is reached (``self.stopped`` names which)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stopped = "max_minutes"
        elif self.config.max_steps is not None and self.num_steps >= self.config.max_steps:
            self.stopped = "max_steps"
        return self.stopped != "completed"

    def _fail(self, value: float, epoch: int) -> NoReturn:
        """Raise MSG_NAN with the best checkpoint's CompressedModel on ``err.last_good``."""
        self.holdout.restore_best(self.student)
        last = self.result()
        err = ConfigError(MSG_NAN.format(value=value, epoch=epoch, step=self.num_steps, best=self.holdout.best_loss,
                                         best_epoch=self.holdout.best_epoch, lr=self.config.lr))
        err.last_good = last
        raise err

    def result(self) -> CompressedModel:
        """``cm`` with the student's codes, steps, biases and activation steps written back."""
        reference, layers = write_back(self.cm.reference, self.cm.layers, self.weights, self.acts)
        metadata = replace(self.cm.metadata, layers=layer_records(layers))
        return replace(self.cm, reference=reference, layers=layers, metadata=metadata)

    def record(self, data: DataStream, ptq: CompressedModel, result: CompressedModel, *, baq: Any,
               rounding: Any) -> dict[str, Any]:
        """The metadata's ``finetune`` record: settings, data, the run's figures, the hold-out
        before (``ptq``) and after (``result``), and step 2's BAQ and AdaRound records."""
        after, before = self.holdout.metrics_of(result), self.holdout.metrics_of(ptq)
        names, weights, config = self.names, self.weights.values(), self.config
        return {
            # the width is the PTQ start's (FinetuneConfig.weight_bits compresses a float model only)
            "settings": {**config.to_dict(), "weight_bits": start_width(ptq)},
            "train_source": data.source,
            "train_group_counts": {n: int(c) for n, c in zip(names, data.group_counts())},
            "num_fit": len(self.fit), "num_holdout": len(self.holdout),
            "steps": self.num_steps, "samples_seen": int(self.used), "epochs_run": len(self.holdout.history) - 1,
            "stopped": self.stopped, "best_epoch": self.holdout.best_epoch,
            "loss_terms": self.fit.loss_words(config),
            "holdout_before": per_group(before), "holdout_after": per_group(after),
            "history": history_record(self.holdout.history, regridded=bool(baq or rounding)),
            # mean over the latent weights of (v - round(v))^2, v = clamp(w / s): how far they sit
            # off their grid points in steps (what the oscillation regulariser shrinks; 0 at the start)
            "latent_offgrid": round(sum(float(m.dampening().detach()) for m in weights)
                                    / sum(m.latent.numel() for m in weights), 6),
            "baq": baq,
            "adaptive_rounding": rounding,
            "final_group_weights": ({n: round(float(v), 6) for n, v in zip(names, self.objective.q.cpu())}
                                    if config.loss == "worst-group" else None),
        }
