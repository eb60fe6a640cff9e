"""Group-weighted adaptive rounding (AdaRound, Nagel et al. 2020), a PTQ refinement between the
solver and fine-tuning (``FinetuneConfig(rounding="adaptive")``, CLI ``--rounding adaptive``).

Per quantized layer, in execution order, on inputs X̃ from the already-rounded prefix of the
network (``N`` calibration samples, group g holding ``N_g`` of them):

1. Keep the layer's grid (per-channel step s, codes in [qmin, qmax]) and bias; the float
   (BN-folded) layer on the float model's own inputs X gives the target Y = f(X; W) (AdaRound's
   asymmetric reconstruction, the solver's float-output target): the rounding also corrects the
   error its quantized inputs X̃ carry. (Against f(X̃; W), the float layer on the quantized input,
   W2 round-to-nearest codes of a 4-layer CNN re-rounded with a lower error at every layer and
   lost 29 points of test accuracy: 78.5 → 49.9 %; now 80.2 %.)
2. Each weight rounds down or up: W̃ = s · clamp(⌊W/s⌋ + h(V), qmin, qmax) with the rectified
   sigmoid h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1), V started at the fractional part of W/s (the
   soft-rounded weight starts at the float weight, as in AdaRound).
3. Minimise the group-weighted reconstruction error plus AdaRound's rounding regulariser

       Σ_g α_g · mean_{i ∈ g} ‖f(x̃_i; W̃) − y_i‖² / ‖Y‖²_mean  +  λ · Σ (1 − |2h − 1|^β)

   with α_g equal across groups (every group counts equally, not every sample) and β annealed
   from 20 to 2, so every h ends at 0 or 1.
4. Round: codes = clamp(⌊W/s⌋ + 1[h ≥ ½], qmin, qmax). A layer keeps the solver's codes when
   they reconstruct better (the record says which layers changed and by how much).

The math (``rectified_sigmoid``, ``rounding_regulariser``, ``group_weighted_mse``) is pure;
``adaptive_rounding`` is the layer loop around it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.sampling import group_balanced_subset
from fqexport.finetune.qat import LearnableWeight, build_student, write_back
from fqexport.metadata import layer_records
from fqexport.model import CompressedModel
from fqexport.quant.per_group import group_means

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
_BETA_START, _BETA_END = 20.0, 2.0
_WARMUP = 0.2  # share of the iterations without the regulariser (AdaRound's warm start)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """A V with ``rectified_sigmoid(V) == h`` (h kept inside [eps, 1 − eps] so V is finite)."""
    h = h.clamp(eps, 1.0 - eps)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def rounding_regulariser(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h − 1|^β): zero when every h is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def group_weighted_mse(out: torch.Tensor, target: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Σ_g (1/G') · mean_{i∈g} ‖out_i − target_i‖², over the G' groups present (each group
    counts equally, however many samples it has)."""
    err = (out - target).pow(2).flatten(1).sum(1)
    means, counts = group_means(err, group, num_groups)
    return means[counts > 0].mean()


def _layer_out(module: LearnableWeight, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return module.op(x, w, module.bias if bias is None else bias)


@torch.no_grad()
def _inputs(student: nn.Module, module: nn.Module, x: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        for start in range(0, len(x), batch_size):
            student(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])))
    finally:
        handle.remove()
    return torch.cat(seen)


def round_layer(module: LearnableWeight, w_float: torch.Tensor, b_float: torch.Tensor | None, x: torch.Tensor,
                group: torch.Tensor, num_groups: int, iters: int, lr: float, reg: float, batch_size: int,
                generator: torch.Generator, x_float: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """AdaRound one layer (module docstring, steps 1–4) on its inputs ``x`` from the rounded prefix,
    to the target the float layer computes on ``x_float`` (the float model's inputs; default
    ``x``). Returns ``(codes, solver error, adaptive error)``: the adaptive integer codes (float
    tensor, weight shape) and both group-weighted reconstruction errors (relative to the
    target's mean squared norm)."""
    s = module.s0  # the step of every weight entry (signed at 2 bits), broadcastable to the weight
    base = torch.floor(w_float / s)
    with torch.no_grad():
        bias = b_float if b_float is not None or module.bias is None else torch.zeros_like(module.bias)
        target = _layer_out(module, x if x_float is None else x_float, w_float, bias)
        norm = float(target.pow(2).flatten(1).sum(1).mean()) or 1.0
    solver_codes = module.latent.detach().round()
    v = nn.Parameter(inverse_rectified_sigmoid(w_float / s - base))  # soft rounding = the float weight
    opt = torch.optim.Adam([v], lr=lr)
    warm = int(_WARMUP * iters)
    for it in range(iters):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=generator)
        h = rectified_sigmoid(v)
        w = s * torch.clamp(base + h, module.qmin, module.qmax)
        loss = group_weighted_mse(_layer_out(module, x[idx], w), target[idx], group[idx], num_groups) / norm
        if it >= warm:
            frac = (it - warm) / max(1, iters - warm)
            beta = _BETA_END + 0.5 * (_BETA_START - _BETA_END) * (1 + math.cos(math.pi * frac))
            loss = loss + reg * rounding_regulariser(h, beta) / h.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        adaptive = torch.clamp(base + (rectified_sigmoid(v) >= 0.5).to(base.dtype), module.qmin, module.qmax)

        def error(codes: torch.Tensor) -> float:
            return float(group_weighted_mse(_layer_out(module, x, s * codes), target, group, num_groups)) / norm

        return adaptive, error(solver_codes), error(adaptive)


def adaptive_rounding(cm: CompressedModel, data: GroupData, *, num_samples: int = 256, iters: int = 300,
                      lr: float = 1e-2, reg: float = 0.01, batch_size: int = 32,
                      seed: int = 0) -> tuple[CompressedModel, dict[str, Any]]:
    """Re-round every quantized layer of ``cm`` (its grids, biases and activation ranges kept) by
    group-weighted AdaRound on a group-balanced subset of ``data``. Returns the new
    CompressedModel and a record ``{"layers": {name: {solver, adaptive, changed}}, ...}``."""
    sub = group_balanced_subset(data, min(num_samples, len(data)), seed=seed)
    student, weights, acts = build_student(cm.reference, cm.layers, learn_act_scales=False)
    student = student.cpu().eval()
    group = torch.from_numpy(sub.group)
    gen = torch.Generator().manual_seed(seed)
    num_groups = len(cm.group_names)
    record: dict[str, Any] = {}
    for name, module in weights.items():
        float_module = cm.float_model.get_submodule(name)
        w_float = float_module.weight.detach().float().cpu()
        b_float = None if float_module.bias is None else float_module.bias.detach().float().cpu()
        x = _inputs(student, module, sub.x)
        x_float = _inputs(cm.float_model, float_module, sub.x)
        solver_codes = module.latent.detach().round()
        codes, solver_err, adaptive_err = round_layer(module, w_float, b_float, x, group, num_groups, iters, lr,
                                                      reg, batch_size, gen, x_float)
        keep_adaptive = adaptive_err < solver_err
        changed = float((codes != solver_codes).float().mean()) if keep_adaptive else 0.0
        if keep_adaptive:
            with torch.no_grad():
                module.latent.copy_(codes)
        record[name] = {"solver_error": round(solver_err, 6), "adaptive_error": round(adaptive_err, 6),
                        "kept": "adaptive" if keep_adaptive else "solver", "codes_changed": round(changed, 4)}
        log.info("adaptive rounding %s: group-weighted error %.4g (solver) -> %.4g (adaptive), kept %s",
                 name, solver_err, adaptive_err, record[name]["kept"])
    reference, layers = write_back(cm.reference, cm.layers, weights, acts)
    out = replace(cm, reference=reference, layers=layers, metadata=replace(cm.metadata, layers=layer_records(layers)))
    return out, {"num_samples": len(sub), "iters": iters, "layers": record}
