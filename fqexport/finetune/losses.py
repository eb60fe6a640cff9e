"""Fine-tuning losses: per-sample distillation + cross-entropy and the group weights of the three
objectives (pure tensor math; the per-group means L_g are ``fqexport.quant.per_group.group_means``).

Per sample i with student logits s_i, teacher logits t_i, label y_i, temperature T:

    ℓ_i = kd · T² · KL(softmax(t_i/T) ‖ softmax(s_i/T)) + ce · CE(s_i, y_i)

Per group g present in the batch, L_g = mean_{i∈g} ℓ_i. The objective is Σ_g q_g L_g with
``ce``: q_g = N_g / N (the plain sample mean); ``group-weighted``: the user's fixed weights
(renormalised over the groups present); ``worst-group``: group DRO's exponentiated-gradient
weights, q_g ← q_g · exp(η · e_g) / Z after every step, where e_g = L_g − ce · CE_g(teacher) is
how much worse the student does on g than the float model would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, *,
                    temperature: float, kd_weight: float, ce_weight: float) -> torch.Tensor:
    """``ℓ_i`` of the module docstring, ``[batch]``."""
    loss = ce_weight * F.cross_entropy(student, y, reduction="none") if ce_weight else 0.0
    if kd_weight:
        t = float(temperature)
        log_p = F.log_softmax(student / t, dim=1)
        log_q = F.log_softmax(teacher / t, dim=1)
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
        loss = loss + kd_weight * t * t * kl
    return loss


def exponentiated_gradient(q: torch.Tensor, excess: torch.Tensor, present: torch.Tensor, eta: float) -> torch.Tensor:
    """Group DRO's update q_g ← q_g·exp(η·e_g), renormalised; absent groups keep their weight."""
    step = torch.where(present, eta * excess, torch.zeros_like(excess))
    new = q * torch.exp(step - step.max())
    return new / new.sum()


def combine(losses: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Σ_g q_g L_g over the groups present; ``weights=None`` gives the sample mean."""
    present = counts > 0
    if weights is None:
        return (losses * counts).sum() / counts.sum()
    w = torch.where(present, weights, torch.zeros_like(weights))
    return (w * losses).sum() / w.sum().clamp_min(1e-12)
