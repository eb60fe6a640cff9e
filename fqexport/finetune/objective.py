"""What a fine-tuning step minimises, and with what: the group objective of
``fqexport.finetune.losses`` (plain, group-weighted or worst-group, whose group weights q are
carried from step to step) and the Adam optimiser over the student's parameters.

Per batch: ℓ_i per sample (:func:`sample_losses`: a detector or segmenter distils the float model's
outputs, :meth:`fqexport.tasks.base.Task.sample_loss`, and adds its own training loss where the data
has boxes or masks), L_g and N_g per group (``group_means``), then

    ``ce``: Σ_g N_g L_g / N;   ``group-weighted``: Σ_g w_g L_g / Σ_g w_g;
    ``worst-group``: q ← EG(q, L − ce · CE(teacher)), then Σ_g q_g L_g / Σ_g q_g,

sums over the groups present. Latent weights learn at ``lr``, steps, biases and activation steps
at ``AUX_LR · lr``, learnable widths (BAQ) at ``bits_lr``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from fqexport.calibration.group_data import GroupWeights
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.losses import combine, exponentiated_gradient, per_sample_loss
from fqexport.finetune.qat import LearnableActQuant, LearnableWeight
from fqexport.quant.per_group import group_means
from fqexport.tasks.base import Task
from fqexport.tasks.classification import Classification

MSG_GROUP_WEIGHT_UNKNOWN = (
    "FinetuneConfig.group_weights names group {name!r}, which is not in the training data "
    "(groups: {groups})"
)

# Steps, biases and activation steps learn at this fraction of ``lr`` (latent weights at ``lr``).
AUX_LR = 0.1


def fixed_group_weights(config: FinetuneConfig, names: Sequence[str]) -> torch.Tensor | None:
    """The ``group-weighted`` loss's weights per group id, summing to 1 (None for other losses);
    raises ConfigError when ``config.group_weights`` names a group not in ``names``."""
    if config.loss != "group-weighted":
        return None
    return torch.as_tensor(GroupWeights(config.group_weights).vector(names, unknown=MSG_GROUP_WEIGHT_UNKNOWN),
                           dtype=torch.float32)


class GroupObjective:
    """The objective of the module docstring, batch by batch; ``q`` holds the worst-group
    weights after the last step (uniform at the start)."""

    def __init__(self, config: FinetuneConfig, num_groups: int, teacher_ce: torch.Tensor,
                 fixed_weights: torch.Tensor | None, device: torch.device, task: Task | None = None) -> None:
        self.config, self.num_groups, self.teacher_ce = config, num_groups, teacher_ce
        self.task = task or Classification()
        self.fixed = None if fixed_weights is None else fixed_weights.to(device)
        self.q = torch.full((num_groups,), 1.0 / num_groups, device=device)

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None,
                 group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(objective, L [G], N [G])`` of a batch from the student's and teacher's logits."""
        c = self.config
        losses = sample_losses(self.task, student, teacher, y, c)
        lg, counts = group_means(losses, group, self.num_groups)
        if c.loss != "worst-group":
            return combine(lg, counts, self.fixed), lg, counts
        excess = lg.detach() - c.ce_weight * self.teacher_ce
        self.q = exponentiated_gradient(self.q, excess, counts > 0, c.dro_eta)
        return combine(lg, counts, self.q), lg, counts


def sample_losses(task: Task, student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None,
                  config: FinetuneConfig) -> torch.Tensor:
    """ℓ_i of a batch: a classifier's distillation + cross-entropy on its labels (:func:`per_sample_loss`);
    another task's label-free distillation to the float model (``kd_weight`` × ``task.sample_loss``)
    plus, where the data has its ground truth (``y``: :meth:`~fqexport.tasks.base.Task.train_targets`),
    ``ce_weight`` × ``task.train_loss_scale`` × its own training loss (a detector's on its boxes, at
    0.3; a segmenter's on its masks)."""
    if not task.distills_in_finetune:
        return per_sample_loss(student, teacher, y, temperature=config.temperature, kd_weight=config.kd_weight,
                               ce_weight=config.ce_weight)
    loss = config.kd_weight * task.sample_loss(student, task.loss_targets(teacher, None))
    if y is not None and config.ce_weight:
        loss = loss + config.ce_weight * own_loss(task, student, y)
    return loss


def own_loss(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task's own loss per sample as the objective weighs it (before ``ce_weight``): a
    classifier's cross-entropy on its labels, another task's ``train_loss_scale`` × ``train_loss``."""
    if not task.distills_in_finetune:
        return F.cross_entropy(out, y, reduction="none")
    return task.train_loss_scale * task.train_loss(out, y)


def optimizer(weights: Mapping[str, LearnableWeight], acts: Mapping[str, LearnableActQuant],
              config: FinetuneConfig, bits: Iterable[torch.nn.Parameter] = ()) -> torch.optim.Adam:
    """Adam over the latent weights (``lr``), the steps, biases and learnable activation steps
    (``AUX_LR · lr``) and, when given, the learnable widths (``bits_lr``)."""
    aux = [p for m in weights.values() for p in (m.ratio, m.bias) if p is not None]
    aux += [m.ratio for m in acts.values() if m.ratio.requires_grad]
    groups = [{"params": [m.latent for m in weights.values()], "lr": config.lr},
              {"params": aux, "lr": config.lr * AUX_LR}]
    bits = list(bits)
    if bits:
        groups.append({"params": bits, "lr": config.bits_lr})
    return torch.optim.Adam(groups)
