"""Training learnable bit widths (BAQ) before fine-tuning; the math is ``fqexport.finetune.baq``.

1. A student whose every layer holds a continuous width b_l (starting at its PTQ width) and
   interpolates between the neighbouring candidate grids (``LearnableWeight.learn_bits``).
2. ``bit_epochs`` epochs on the fit split: the group objective (``fqexport.finetune.objective``)
   plus λ_bits · budget penalty and λ_fair · fairness penalty; widths clamped to the candidates'
   range after every step.
3. The learned widths projected onto the budget (knapsack) and every layer re-quantized at its
   chosen width, learned biases and activation steps kept.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from typing import Any, Mapping

import numpy as np
import torch
from fqexport.progress import tqdm

from fqexport.calibration.stream import DataStream
from fqexport.errors import ConfigError
from fqexport.finetune.baq import (
    average_bits,
    budget_penalty,
    fairness_penalty,
    project_to_budget,
)
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.fit_data import FitData, epoch_batches, split_fit_holdout
from fqexport.finetune.objective import GroupObjective, optimizer
from fqexport.finetune.qat import LearnableActQuant, LearnableWeight, build_student, write_back
from fqexport.metadata import layer_records
from fqexport.model import CompressedModel

log = logging.getLogger(__name__)

MSG_NAN_BITS = (
    "learning bit widths diverged: the loss became {value} at epoch {epoch}; nothing was written. Lower "
    "FinetuneConfig.lr (now {lr:g}) or bits_lr (now {bits_lr:g})"
)


MSG_FLOAT_BUDGET = (
    "FinetuneConfig.budget_bits={budget:g} cannot be met: the weight layers kept float ({floats} params at 32 "
    "bits, counted in the budget as compress counts them) leave {left:.3f} bits per quantized weight, below the "
    "narrowest width {low}; raise budget_bits or quantize those layers"
)


def quantized_budget(cm: CompressedModel, budget: float, low: int) -> float:
    """The average bits the quantized layers may take so that every weight, the float layers' at
    32 bits included, averages ``budget``: (B·(N_q + N_f) − 32·N_f) / N_q; ConfigError when that is
    below ``low`` (the narrowest width)."""
    n_q = sum(l.params for l in cm.layers.values())
    n_f = sum(f.params for f in cm.metadata.float_layers)
    left = (float(budget) * (n_q + n_f) - 32.0 * n_f) / max(n_q, 1)
    if left < low:
        raise ConfigError(MSG_FLOAT_BUDGET.format(budget=float(budget), floats=n_f, left=left, low=low))
    return left


def learn_bits(cm: CompressedModel, data: DataStream, config: FinetuneConfig, device: torch.device,
               fixed_weights: torch.Tensor | None, progress: bool) -> tuple[CompressedModel, dict[str, Any]]:
    """Steps 1-3 of the module docstring. Returns the fixed-width CompressedModel and the record
    of the learned and chosen widths; raises ConfigError (``err.last_good = cm``) when the loss
    becomes NaN/Inf. The budget counts the float layers at 32 bits (:func:`quantized_budget`)."""
    budget = quantized_budget(cm, config.budget_bits, min(config.bit_choices))
    num_groups = len(cm.group_names)
    fit_stream, _ = split_fit_holdout(data, config)
    teacher = copy.deepcopy(cm.float_model).to(device).eval()
    fit = FitData(fit_stream, teacher, device, config.num_workers, cm.task)
    objective = GroupObjective(config, num_groups, fit.teacher_ce(num_groups), fixed_weights, device, cm.task)
    student, weights, acts = build_student(cm.reference, cm.layers, config.learn_act_scales)
    student = student.to(device).eval()
    bits = {n: m.learn_bits(tuple(config.bit_choices), cm.config.weight_range) for n, m in weights.items()}
    params = torch.tensor([float(cm.layers[n].params) for n in weights], device=device)
    opt = optimizer(weights, acts, config, bits=bits.values())
    rng = np.random.default_rng(config.seed + 1)
    for epoch in range(1, config.bit_epochs + 1):
        batches = epoch_batches(student, fit, config, rng, num_groups)
        bar = tqdm(total=len(batches), desc=f"learn bits {epoch}/{config.bit_epochs}", unit="step",
                   disable=not progress)
        stream = fit.steps(batches)
        for idx_t, xb, tb in stream:
            bar.update(1)
            loss, bvec = _objective(student(xb), tb, fit.targets(idx_t), fit.g[idx_t], objective, bits, params, config,
                                    budget)
            value = float(loss.detach())
            if not math.isfinite(value):
                bar.close()
                stream.close()
                err = ConfigError(MSG_NAN_BITS.format(value=value, epoch=epoch, lr=config.lr, bits_lr=config.bits_lr))
                err.last_good = cm
                raise err
            _step(opt, loss, bits, config)
            if progress:
                bar.set_postfix({"avg bits": f"{float(average_bits(bvec.detach(), params)):.3f}"})
        stream.close()
        bar.close()
    return _fix_widths(cm, weights, acts, bits, config, budget)


def _objective(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None, group: torch.Tensor,
               objective: GroupObjective, bits: Mapping[str, torch.Tensor], params: torch.Tensor,
               config: FinetuneConfig, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(the batch's objective with the width penalties, the widths b [layers])``; ``budget``: the
    quantized layers' average bits (:func:`quantized_budget`)."""
    value, lg, counts = objective(student, teacher, y, group)
    bvec = torch.stack(list(bits.values()))
    value = value + config.lambda_bits * budget_penalty(bvec, params, budget)
    if config.lambda_fair:
        value = value + config.lambda_fair * fairness_penalty(lg, counts > 0)
    return value, bvec


def _step(opt: torch.optim.Optimizer, objective: torch.Tensor, bits: Mapping[str, torch.Tensor],
          config: FinetuneConfig) -> None:
    """One Adam step, then every width clamped into the candidates' range."""
    lo, hi = min(config.bit_choices), max(config.bit_choices)
    opt.zero_grad(set_to_none=True)
    objective.backward()
    opt.step()
    with torch.no_grad():
        for b in bits.values():
            b.clamp_(lo, hi)


def _fix_widths(cm: CompressedModel, weights: Mapping[str, LearnableWeight], acts: Mapping[str, LearnableActQuant],
                bits: Mapping[str, torch.Tensor], config: FinetuneConfig,
                budget: float) -> tuple[CompressedModel, dict[str, Any]]:
    """Step 3: project the learned widths onto the budget (``budget``: the quantized layers'
    average, :func:`quantized_budget`) and re-quantize each layer at its width."""
    learned = {n: float(b.detach()) for n, b in bits.items()}
    chosen = project_to_budget(learned, {n: cm.layers[n].params for n in weights}, config.bit_choices, budget)
    for m in weights.values():
        m.bit = None
    # a layer whose width changes is re-quantized from its float weight: the latent weights of the
    # width-learning epoch sit between the codes of fractional widths, and rounded onto another grid
    # they lost most of the accuracy (survey 38: a W2 MLP at chance after a 3-bit projection)
    floats = {n: w for n in weights if isinstance(w := getattr(_submodule(cm.float_model, n), "weight", None), torch.Tensor)}
    reference, layers = write_back(cm.reference, cm.layers, weights, acts, bits=chosen,
                                   weight_range=cm.config.weight_range, export=cm.config.export, sources=floats)
    total = sum(l.params for l in layers.values())
    avg = sum(l.bits * l.params for l in layers.values()) / max(total, 1)
    log.info("BAQ: learned widths %s -> %s (avg %.3f bits of the quantized layers, budget %g)", learned, chosen, avg,
             config.budget_bits)
    fixed_cm = replace(cm, reference=reference, layers=layers, metadata=replace(cm.metadata, layers=layer_records(layers)))
    record = {"budget_bits": float(config.budget_bits), "learned_bits": {n: round(v, 4) for n, v in learned.items()},
              "bits": dict(chosen), "avg_bits": round(avg, 4),  # of the quantized layers
              "quantized_budget_bits": round(budget, 4)}  # what the float layers at 32 bits leave them
    return fixed_cm, record


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
