"""A small, deterministic training loop for the demo models (per-group accuracy and loss:
:func:`fqexport.metrics.group_metrics.group_metrics`).

SGD with Nesterov momentum, a one-cycle schedule (linear warm-up, cosine decay to 0) driven by
the training *progress* p ∈ [0, 1]:

    p = max(step / total_steps, elapsed / max_seconds)     (the second term only with a budget)
    lr(p) = lr · p / p_w                                   for p < p_w  (warm-up)
    lr(p) = lr · ½ (1 + cos(π (p - p_w) / (1 - p_w)))      otherwise

so a time budget shortens the run but still ends it annealed. With ``max_seconds=None`` the run
depends only on ``seed`` (bit-identical on the same machine and thread count).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from fqexport.progress import tqdm

from fqexport.calibration.group_data import GroupData
from fqexport.demo.task import DemoTaskSizes
from fqexport.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

WARMUP_FRACTION = 0.15

MSG_EMPTY = "training data {source!r} holds no samples: give at least one labeled sample"
MSG_LABELS = (
    "training data {source!r}: field 'y' holds labels in [{lo}, {hi}] but the model has "
    "{k} outputs; labels must be in [0, {k})"
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        epochs: passes over the training data.
        batch_size: samples per step (the last, smaller batch of an epoch is dropped when there
            is more than one batch, so BatchNorm never sees a tiny batch).
        lr: peak learning rate of the one-cycle schedule (SGD, Nesterov momentum 0.9).
        weight_decay: L2 weight decay on conv/linear weights (not on biases and BN parameters).
        seed: seeds the shuffling and augmentation (``torch.manual_seed`` and a private
            generator); the model's initial weights come from whatever seed was set before it
            was built.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        max_seconds: optional wall-clock budget; the schedule is compressed to fit it.
        hflip: randomly mirror 4-D image inputs horizontally (augmentation).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    label_smoothing: float = 0.0
    max_seconds: float | None = None
    hflip: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name}={value!r} must be a positive integer")
        if not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise ConfigError(f"TrainConfig.lr={self.lr!r} must be a finite number > 0")
        if not (0.0 <= float(self.weight_decay) < 1.0):
            raise ConfigError(f"TrainConfig.weight_decay={self.weight_decay!r} must be in [0, 1)")
        if not (0.0 <= float(self.label_smoothing) < 1.0):
            raise ConfigError(
                f"TrainConfig.label_smoothing={self.label_smoothing!r} must be in [0, 1)"
            )
        if self.max_seconds is not None and not (float(self.max_seconds) > 0):
            raise ConfigError(
                f"TrainConfig.max_seconds={self.max_seconds!r} must be > 0 or None (no budget)"
            )


# The embedded demo: make_image_task(**vars(DEMO_TASK_SIZES)) + SmallResNet() + DEMO_TRAIN.
# A fixed number of steps (10 epochs of 62), no time budget: the trained model depends on the
# seed, not on how loaded the machine is (a budget once stopped it at step 387 of 620 and cost the
# minority 29 points of float accuracy). The demo caches the checkpoint between runs.
DEMO_TASK_SIZES = DemoTaskSizes(n_train=8000, n_test=3000, size=32, minority_fraction=0.1)
DEMO_TRAIN = TrainConfig(epochs=10, batch_size=128, lr=0.1, weight_decay=5e-4, seed=0, hflip=True)


def lr_at(progress: float, peak: float, warmup: float = WARMUP_FRACTION) -> float:
    """One-cycle learning rate at training progress ``p`` (module docstring)."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return peak * max(p / warmup, 0.02)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (p - warmup) / (1.0 - warmup)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _output_count(model: nn.Module, x: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        k = int(model(x[:1]).shape[-1])
    model.train(was_training)
    return k


def train_classifier(
    model: nn.Module, data: GroupData, config: TrainConfig, progress: bool = True
) -> nn.Module:
    """Train ``model`` on ``data`` with cross-entropy; return it (the same object) in eval mode.

    Raises:
        DataError: ``data`` is empty or its labels do not fit the model's outputs.
    """
    n = len(data)
    if n == 0:
        raise DataError(MSG_EMPTY.format(source=data.source))
    x_all = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(data.y, dtype=np.int64))
    k = _output_count(model, x_all)
    lo, hi = int(y_all.min()), int(y_all.max())
    if lo < 0 or hi >= k:
        raise DataError(MSG_LABELS.format(source=data.source, lo=lo, hi=hi, k=k))

    gen = torch.Generator().manual_seed(int(config.seed))
    torch.manual_seed(int(config.seed))
    bs = min(int(config.batch_size), n)
    steps_per_epoch = n // bs if n > bs else 1  # drop the last partial batch
    total = steps_per_epoch * int(config.epochs)
    opt = torch.optim.SGD(_param_groups(model, float(config.weight_decay)), lr=float(config.lr),
                          momentum=0.9, nesterov=True)
    budget = None if config.max_seconds is None else float(config.max_seconds)
    image = x_all.dim() == 4
    hflip = image and config.hflip
    if image:  # channels_last convolutions train ~1.5x faster on CPU; undone before returning
        model.to(memory_format=torch.channels_last)

    model.train()
    start = time.perf_counter()
    step = 0
    done = False
    bar = tqdm(total=total, desc="train", unit="step", disable=None if progress else True,
               leave=False)
    try:
        for epoch in range(int(config.epochs)):
            perm = torch.randperm(n, generator=gen)
            running, seen = 0.0, 0
            for b in range(steps_per_epoch):
                p = step / total
                if budget is not None:
                    p = max(p, (time.perf_counter() - start) / budget)
                if p >= 1.0:
                    done = True
                    break
                for group in opt.param_groups:
                    group["lr"] = lr_at(p, float(config.lr))
                idx = perm[b * bs:(b + 1) * bs]
                xb, yb = x_all[idx], y_all[idx]
                if hflip:
                    flip = torch.rand(xb.shape[0], generator=gen) < 0.5
                    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                if image:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(xb), yb, label_smoothing=float(config.label_smoothing))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                running += float(loss.detach()) * xb.shape[0]
                seen += xb.shape[0]
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.3f}")
            if seen:
                logger.info("epoch %d/%d: loss %.4f (%d steps, %.1f s)", epoch + 1,
                            config.epochs, running / seen, step, time.perf_counter() - start)
            if done:
                logger.warning(
                    "training stopped at step %d of %d: max_seconds=%.1f reached "
                    "(the schedule was compressed to fit)", step, total, budget)
                break
    finally:
        bar.close()
        if image:
            model.to(memory_format=torch.contiguous_format)
    model.eval()
    return model
