"""The ``"output-fisher"`` sensitivity: Δ_g(l, b) of the codes ``compress`` writes, from the
activations of one float pass, one backward pass and one factorisation per layer reused across
widths.

Second order in layer l's output y (Gauss-Newton with the empirical Fisher diagonal of the
output, as the ``"fisher"`` method takes it of the weight): quantizing W to Q_b moves sample
i's output by δy_i = (Q_b − W) ∗ x_i (the layer run with the error as its weight, no bias), and

    Δ_g(l, b) ≈ ½ (1/N_g) Σ_{i∈g} Σ_{c,p} (∂ℓ_i/∂y_icp)² δy_icp²
             ≈ ½ (1/N_g) Σ_{i∈g} Σ_c Ḡ_ic Σ_p δy_icp²,     Ḡ_ic = mean_p (∂ℓ_i/∂y_icp)²

over output channels c and positions p (a conv's pixels, a Linear's tokens; the one
approximation beyond second order: a sample's gradient and error are independent across the
positions of a channel). The error is read through the inputs, not through a diagonal of the
weight: the solver's E cancels along correlated inputs, and δy sees that.

Q_b is what ``compress`` writes with the search's base config: the solver's codes at width b
(method ``"solver"``) on the float inputs' Hessian of as many samples as ``compress`` draws
(``num_calib``), one Cholesky per layer
(:func:`~fqexport.quant.solver.factor_conv_groups`, its column order from the float weight)
shared by every width, or round to nearest (``"rtn"``). The inputs come from an
:class:`~fqexport.pipeline.activations.ActivationCache` of the float graph (each node once per
batch; one layer's Hessian in memory at a time), Ḡ from one forward and backward pass of
Σ_i ℓ_i (y_i reaches ℓ_i only, so the batch gradient is each sample's own). An Embedding
(a row lookup, no Hessian) is not handled here: :mod:`fqexport.search.sensitivity` measures it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from fqexport.progress import tqdm

from fqexport.errors import ConfigError
from fqexport.heap import reuse_freed_memory
from fqexport.model import rows_to_weight, weight_rows
from fqexport.pipeline.activations import ActivationCache, GraphStream
from fqexport.quant.hessian import HessianAccumulator
from fqexport.quant.per_group import group_means
from fqexport.quant.solver import (
    choose_solver_grid,
    factor_conv_groups,
    quiet_damping_retries,
    rtn_layer,
    solve_conv_groups,
)
from fqexport.tasks.base import Task as ModelTask

MSG_NO_GRADIENT = (
    "sensitivity 'output-fisher': the {task} loss has no gradient at the float model on these "
    "samples (every layer's output gradient is 0: each prediction is certain and right); use "
    "sensitivity 'measured'"
)
MSG_ROWS = (
    "sensitivity 'output-fisher': layer {name!r} computes {rows} rows for a batch of {samples} samples "
    "(a tensor the batch shares), so its output has no per-sample gradient; use sensitivity 'measured'"
)
# activations the float pass keeps in memory before spilling to disk
_CACHE_BYTES = 2 * 2**30


def _position_sums(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``Σ_p t_icp²`` of a layer output ``t`` per sample and channel ``[B, channels]`` (float64;
    channels on axis 1 of a conv's output, last of a Linear's)."""
    if kind == "linear":
        return t.reshape(t.shape[0], -1, t.shape[-1]).pow(2).sum(dim=1).double()
    return t.reshape(t.shape[0], t.shape[1], -1).pow(2).sum(dim=2).double()


def _by_sample(sums: torch.Tensor, samples: int, name: str, reduce: str) -> torch.Tensor:
    """Per-row figures ``[rows, channels]`` of a layer output as per-sample ones ``[samples,
    channels]``: a model that folds k rows per sample into the batch (``[B·k, N, C]`` windows:
    Swin, MobileViT; sample-major like :func:`~fqexport.quant.per_group.row_groups`) has each
    sample's k rows summed (``"sum"``: Σ_p over all its positions) or averaged (``"mean"``)."""
    rows = sums.shape[0]
    if rows == samples:
        return sums
    if rows % samples:
        raise ConfigError(MSG_ROWS.format(name=name, rows=rows, samples=samples))
    folded = sums.reshape(samples, rows // samples, *sums.shape[1:])
    return folded.sum(1) if reduce == "sum" else folded.mean(1)


def _positions(t: torch.Tensor, kind: str) -> int:
    """Positions p per sample and channel of a layer output."""
    return t[0].numel() // t.shape[-1 if kind == "linear" else 1]


def output_gradient_energy(
    model: nn.Module, kinds: Mapping[str, str], x: torch.Tensor, y: torch.Tensor, batch_size: int, task: ModelTask,
    batch_dims: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """``Ḡ_ic = mean_p (∂ℓ_i/∂y_icp)²`` of each layer's output, ``[samples, channels]``
    (float64) of the layers ``kinds`` (name → ``LayerInfo.kind``): one forward and backward pass
    of Σ_i ℓ_i, batch by batch. ``batch_dims``: a layer's sample dim where it is not 0
    (``LayerInfo.batch_dim``). A ConfigError when the loss has no gradient at all
    (:data:`MSG_NO_GRADIENT`)."""
    modules = dict(model.named_modules())
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in kinds}
    batch = [0]  # samples in the batch being run

    def hook(name: str) -> Callable:
        kind, d = kinds[name], (batch_dims or {}).get(name, 0)

        def on_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            replaced = None
            if not output.requires_grad:  # the first layer: gradients start here (the weights are frozen)
                output = replaced = output.detach().requires_grad_().clone()
            samples = batch[0]

            def on_grad(grad: torch.Tensor) -> None:
                g = grad.detach().movedim(d, 0)  # samples first
                parts[name].append(_by_sample(_position_sums(g, kind) / _positions(g, kind), samples, name, "mean"))

            output.register_hook(on_grad)
            return replaced

        return on_output

    handles = [modules[n].register_forward_hook(hook(n)) for n in kinds]
    requires = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)  # the gradients of the outputs only
        for s in range(0, x.shape[0], batch_size):
            batch[0] = x[s:s + batch_size].shape[0]
            loss = task.sample_loss(model(x[s:s + batch_size]), y[s:s + batch_size]).sum()
            if loss.requires_grad:
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    energy = {n: torch.cat(p) if p else torch.zeros(x.shape[0], 1, dtype=torch.float64) for n, p in parts.items()}
    if all(float(e.sum()) == 0.0 for e in energy.values()):
        raise ConfigError(MSG_NO_GRADIENT.format(task=task.name))
    return energy


def output_error_energy(module: nn.Module, kind: str, errors: Sequence[torch.Tensor],
                        inputs: torch.Tensor, samples: int | None = None, name: str = "",
                        batch_dim: int = 0) -> torch.Tensor:
    """``Σ_p δy_icp²`` per error, sample and output channel ``[errors, B, channels]``: ``module``
    (a ``kind`` layer) run on ``inputs`` with each error (its weight's layout) as the weight and
    no bias. Without conv groups the errors run as one layer of stacked output channels.
    ``samples``: the batch's samples when ``inputs`` folds several rows per sample (default: its
    rows); ``batch_dim``: the dim of the samples (``LayerInfo.batch_dim``)."""
    dtype = inputs.dtype if inputs.is_floating_point() else errors[0].dtype
    axis = 1 if kind == "conv_transpose" else 0  # the weight's output channels
    stacked = getattr(module, "groups", 1) == 1
    runs = [torch.cat(list(errors), dim=axis)] if stacked else list(errors)
    out = []
    for weight in runs:
        params = {"weight": weight.to(dtype)}
        if getattr(module, "bias", None) is not None:
            params["bias"] = torch.zeros(weight.shape[axis], dtype=module.bias.dtype)
        dy = functional_call(module, params, (inputs,)).movedim(batch_dim, 0)
        out.append(_by_sample(_position_sums(dy, kind), samples or dy.shape[0], name, "sum"))
    energy = torch.cat(out, dim=1)                                        # [B, errors · channels]
    return energy.reshape(energy.shape[0], len(errors), -1).transpose(0, 1)


def _hessian(module: nn.Module, name: str, cache: ActivationCache, index: int, num_groups: int,
             samples: int, batch_dim: int = 0) -> torch.Tensor:
    """The solver's H of ``module`` on the float inputs of the cache's first ``samples`` samples
    (as many as ``compress`` calibrates on), groups weighted equally (the samples are
    group-balanced already)."""
    acc = HessianAccumulator(module, num_groups, name=name)
    taken = 0
    for inputs, gb in cache.layer_inputs(index):
        n = min(gb.numel(), samples - taken)
        if n <= 0:
            break
        rows = inputs[0].movedim(batch_dim, 0)
        per = max(rows.shape[0] // max(gb.numel(), 1), 1)  # rows per sample (k folded rows)
        acc.add(rows[:n * per], gb[:n])
        taken += n
    return acc.hessian()


def output_fisher_sensitivity(
    model: nn.Module, kinds: Mapping[str, str], bits: Sequence[int], x: torch.Tensor, y: torch.Tensor,
    g: torch.Tensor, num_groups: int, batch_size: int, task: ModelTask, *, weight_range: str,
    clip_search: Callable[[int], bool], solve: bool = True, order: str = "sensitivity", damp: float = 0.01,
    block_size: int = 128, hessian_samples: int | None = None, progress: bool = False,
    batch_dims: Mapping[str, int] | None = None,
) -> np.ndarray:
    """Δ_g(l, b) ``[layers, widths, groups]`` for the Hessian layers ``kinds`` (name →
    ``LayerInfo.kind``, in table order) of the traced, BN-folded ``model`` (module docstring).
    ``solve``: the solver's codes (``order``, ``damp``, ``block_size`` as in
    :class:`~fqexport.config.QuantConfig`; its Hessian on the first ``hessian_samples``, default
    all), else round to nearest; ``clip_search(bits)``: whether a width's grid is clip-searched
    (``QuantConfig.use_clip_search``); ``batch_dims``: a layer's sample dim where it is not 0."""
    names, batch_dims = list(kinds), batch_dims or {}
    energy = output_gradient_energy(model, kinds, x, y, batch_size, task, batch_dims)
    stream = GraphStream(model)
    index = {n: stream.module_node(n) for n in names}
    starts = range(0, x.shape[0], batch_size)
    batches = [(x[s:s + batch_size], g[s:s + batch_size]) for s in starts]
    modules = dict(model.named_modules())
    delta = np.zeros((len(names), len(bits), num_groups))
    cache = ActivationCache([stream], batches, torch.device("cpu"), max_bytes=_CACHE_BYTES)
    # a raised damping changes no table entry's meaning: the solver's warnings about it are quieted
    with cache, torch.no_grad(), quiet_damping_retries(), reuse_freed_memory():
        for row, name in tqdm(sorted(enumerate(names), key=lambda item: index[item[1]]),
                              desc="sensitivity (output-fisher)", unit="layer", disable=not progress):
            module, k, kind, d = modules[name], index[name], kinds[name], batch_dims.get(name, 0)
            cache.advance(k)
            rows = weight_rows(kind, module.weight.detach()).float()
            H = _hessian(module, name, cache, k, num_groups, hessian_samples or x.shape[0], d) if solve else None
            factors = factor_conv_groups(rows, H, order=order, damp=damp) if solve and order != "obs" else None
            errors = []
            for b in bits:
                grid = choose_solver_grid(rows, H, b, weight_range=weight_range, clip_search=clip_search(b))
                q = (solve_conv_groups(rows, H, grid, factors=factors, order=order, damp=damp, block_size=block_size,
                                       compute_loss=False) if solve else rtn_layer(rows, grid)).qweight
                errors.append(rows_to_weight(kind, q - rows, module.weight.shape))
            per_sample = torch.zeros(len(bits), x.shape[0], dtype=torch.float64)
            start = 0
            for inputs, gb in cache.layer_inputs(k):
                stop = start + gb.numel()
                # Σ_c Ḡ_ic Σ_p δy_icp², every width at once
                per_sample[:, start:stop] = (energy[name][start:stop] * output_error_energy(
                    module, kind, errors, inputs[0], gb.numel(), name, d)).sum(2)
                start = stop
            for j in range(len(bits)):  # Δ_g = ½ (1/N_g) Σ_{i∈g} per_sample_i
                delta[row, j] = 0.5 * group_means(per_sample[j], g, num_groups)[0].numpy()
    return delta
