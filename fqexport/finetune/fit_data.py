"""The training data as fine-tuning sees it: the stratified fit / hold-out split, the fitted slice
with the teacher's logits, and each epoch's batches under the chosen sampler.

The teacher's logits are computed once when the fitted x is in memory, else per batch; the
core-set's per-sample scores come from one streaming pass (forward only) per epoch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.sampling import balanced_allocation, split_holdout
from fqexport.calibration.stream import DataStream
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.objective import own_loss, sample_losses
from fqexport.finetune.samplers import (
    coreset_indices,
    group_balanced_batches,
    natural_batches,
)
from fqexport.quant.per_group import group_means
from fqexport.tasks.base import Task
from fqexport.tasks.classification import Classification

log = logging.getLogger(__name__)

# fewer held-out samples of a group than this and its figures (which choose the checkpoint) are noise
MIN_HOLDOUT_PER_GROUP = 10
MSG_THIN_HOLDOUT = (
    "{source}: the fine-tuning hold-out holds {counts} sample(s) of group(s) {groups} (fewer than {min}): the "
    "checkpoint kept by the worst group's held-out loss rests on so few (a group with none is not seen at all); "
    "give more training samples of them (API: or a larger FinetuneConfig.holdout_fraction)"
)


MSG_HOLDOUT_MAX = (
    "holdout_max={cap} is below the {groups} groups of the fine-tuning hold-out: it keeps one sample of each "
    "({groups}) so that no group goes unseen"
)


def split_fit_holdout(data: DataStream, config: FinetuneConfig) -> tuple[DataStream, GroupData]:
    """``(fit stream, hold-out in memory)``: ``split_holdout``'s stratified split, the hold-out
    capped at ``config.holdout_max`` samples (as equal per group as possible; the rest is fitted)."""
    positions = GroupData(np.arange(len(data), dtype=np.int64)[:, None], data.y, data.group, data.group_names,
                          data.source)
    fit, hold = split_holdout(positions, config.holdout_fraction, seed=config.seed)
    fit_idx, hold_idx = fit.x[:, 0], hold.x[:, 0]
    # never below one sample of each group held out: a smaller cap would leave a group unseen
    present = int((hold.group_counts() > 0).sum())
    if config.holdout_max < present < len(hold_idx):
        log.warning(MSG_HOLDOUT_MAX.format(cap=config.holdout_max, groups=present))
    cap = max(config.holdout_max, present)
    if len(hold_idx) > cap:
        rng = np.random.default_rng(config.seed)
        take = balanced_allocation(hold.group_counts(), cap)
        keep = np.sort(np.concatenate([rng.choice(hold_idx[hold.group == g], size=int(k), replace=False)
                                       for g, k in enumerate(take) if k > 0]))
        fit_idx = np.sort(np.concatenate([fit_idx, np.setdiff1d(hold_idx, keep)]))
        hold_idx = keep
    held = np.bincount(data.group[hold_idx], minlength=len(data.group_names))
    thin = [(name, int(k)) for name, k, c in zip(data.group_names, held, data.group_counts())
            if c > 0 and k < MIN_HOLDOUT_PER_GROUP]
    if thin:
        log.warning(MSG_THIN_HOLDOUT.format(source=data.source, counts=", ".join(str(k) for _, k in thin),
                                            groups=", ".join(repr(n) for n, _ in thin), min=MIN_HOLDOUT_PER_GROUP))
    return data.subset(fit_idx), data.take(hold_idx, config.num_workers)


def logits(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """``model``'s float logits of in-memory ``x``, batch by batch without gradients."""
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
            outs.append(model(xb).float())
    return torch.cat(outs) if outs else torch.zeros(0)


class FitData:
    """The fitted slice: its stream, targets and groups on the device, and the teacher's logits —
    computed once when x is in memory (as before streaming), else per batch.

    ``y``: a classifier's labels; another task's training targets from its boxes or masks
    (:meth:`~fqexport.tasks.base.Task.train_targets`, from one pass of the teacher), else None:
    fine-tuning then distils only."""

    def __init__(self, stream: DataStream, teacher: nn.Module, device: torch.device, num_workers: int,
                 task: Task | None = None) -> None:
        self.stream, self.teacher, self.device, self.num_workers = stream, teacher, device, num_workers
        self.task = task or Classification()
        self.g = torch.from_numpy(stream.group).to(device)
        self.x = stream.x_array()
        self.cache = None if self.x is None else logits(teacher, self.x, device)
        self.y: torch.Tensor | None = None
        if not self.task.distills_in_finetune:  # labels are required before (zeros keep a label-free caller going)
            y = stream.y if stream.y is not None else np.zeros(len(stream), np.int64)
            self.y = torch.from_numpy(y).to(device)
        elif not self.task.needs_annotations(stream):
            teacher_out = self.cache if self.cache is not None else torch.cat([t for _, _, t in self._pass(None)])
            targets = self.task.train_targets(stream, teacher_out)
            self.y = None if targets is None else targets.to(device)

    def loss_words(self, config: FinetuneConfig) -> str:
        """What the fine-tuning loss is made of, for the record and the console."""
        terms = [name for name, weight in (("distillation", config.kd_weight),
                                           (self.task.train_loss_words, config.ce_weight if self.y is not None else 0))
                 if weight]
        missing = "" if self.y is not None else f" (the data has no {self.task.annotation_fields})"
        return " + ".join(terms) + missing

    def targets(self, idx_t: torch.Tensor) -> torch.Tensor | None:
        """The training targets of the samples ``idx_t`` (None when the fit has none)."""
        return None if self.y is None else self.y[idx_t]

    def __len__(self) -> int:
        return len(self.stream)

    def steps(self, batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
                out = None if student is None else student(xb).float()
            yield idx_t, out, t

    def teacher_ce(self, num_groups: int) -> torch.Tensor:
        """The float model's own loss per group on the fit data, the baseline of the DRO excess: a
        classifier's cross-entropy, another task's training loss on its ground truth (0 without it:
        the float model is its own distillation target)."""
        if self.y is None:
            return torch.zeros(num_groups, device=self.device)
        if self.cache is not None:
            loss = own_loss(self.task, self.cache, self.y)
        else:
            loss = torch.cat([own_loss(self.task, t, self.y[i]) for i, _, t in self._pass(None)])
        return group_means(loss, self.g, num_groups)[0]

    def scores(self, student: nn.Module, config: FinetuneConfig) -> np.ndarray:
        """The core-set's per-sample score of every fitted sample (only the scores are kept)."""
        disagreement = config.coreset_score == "disagreement" and config.kd_weight > 0
        scoring = replace(config, ce_weight=0.0) if disagreement else config
        if self.cache is not None:
            return sample_losses(self.task, logits(student, self.x, self.device), self.cache, self.y,
                                 scoring).cpu().numpy()
        return torch.cat([sample_losses(self.task, s, t, self.targets(i), scoring)
                          for i, s, t in self._pass(student)]).cpu().numpy()


def steps_per_epoch(group: np.ndarray, config: FinetuneConfig) -> int:
    """How many batches an epoch of ``config.sampler`` has over samples of these groups."""
    n = len(group)
    if config.sampler == "core-set":
        sizes = np.bincount(np.asarray(group))
        n = int(sum(min(int(c), max(int(math.ceil(config.coreset_fraction * c)), config.coreset_min_per_group))
                    for c in sizes if c))
    return max(1, -(-n // config.batch_size))


def epoch_batches(student: nn.Module, fit: FitData, config: FinetuneConfig, rng: np.random.Generator,
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
