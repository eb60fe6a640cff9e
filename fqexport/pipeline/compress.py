"""The compress workflow: load & check → fold BN → quantize weights layer by layer (solver or
RTN, on inputs from the already-quantized prefix) → bias correction / BN re-estimation →
group-aware activation calibration → a fake-quant PyTorch reference ready for export.

The layer loop runs in linear passes: an :class:`~fqexport.pipeline.activations.ActivationCache`
runs the traced graph (and, for the float-output target, its float copy) once per calibration
batch in topological order, keeping only the activations still needed, and hands each layer its
quantized-prefix inputs X and float inputs X_f. Per layer: Hessian H (and cross moment C) from
the cached inputs → float-output retarget → solve → dequantized weight → bias correction / BN
re-estimation (statistics of the quantized layer's output on the same cached inputs) → the cache
advances through the layer with its final weights. Cached activations beyond
``QuantConfig.max_activation_memory_mb`` are spilled to a temporary directory (see
``activations.py``). ``QuantConfig.device`` places the models, the cache, the Hessians, the
retarget and the solver; codes and scales end up on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from fqexport.progress import tqdm

from fqexport.calibration.checks import MSG_COMPUTED_IDS, check_vocabulary, data_error
from fqexport.calibration.group_data import GroupData, GroupWeights
from fqexport.calibration.observers import make_observer
from fqexport.calibration.readers import read_data
from fqexport.calibration.sampling import group_balanced_indices
from fqexport.calibration.stream import DataStream, shape_origin_note
from fqexport.config import QuantConfig, check_argument
from fqexport.device import resolve_device
from fqexport.engine.base import in_worker
from fqexport.errors import ConfigError, DataError, ModelLoadError
from fqexport.global_state import one_at_a_time
from fqexport.graph.act_quant import insert_act_quantizers
from fqexport.graph.decode import MSG_HEAD_MAPS, DecodedModel, is_head_maps, leaves
from fqexport.graph.float_tail import tail_ops
from fqexport.graph.loading import STATIC_BATCH_KEY, check_pt2_sample_shape
from fqexport.graph.prepare import (
    LayerInfo,
    copy_model,
    count_macs,
    first_output,
    prepare_model,
    refuse_mapping_output,
    run_model,
    unwrap_model,
)
from fqexport.heap import reuse_freed_memory
from fqexport.metadata import ExportMetadata, layer_records
from fqexport.model import CompressedModel, QuantizedLayer, rows_to_weight, weight_rows
from fqexport.pipeline.activations import ActivationCache, GraphStream
from fqexport.pipeline.batch_memory import calibration_batch_size
from fqexport.quant.channel_stats import ChannelStats
from fqexport.quant.grid import WeightGrid, layer_weight_range
from fqexport.quant.hessian import HessianAccumulator
from fqexport.quant.layout import LayerLayout, layer_layout
from fqexport.quant.solver import (
    LayerFactor,
    choose_solver_grid,
    compensate_input_error,
    factor_conv_groups,
    factor_flops,
    quiet_damping_retries,
    retarget_flops,
    rtn_layer,
    solve_conv_groups,
    solve_flops,
)
from fqexport.tasks.base import Task
from fqexport.tasks.classification import Classification
from fqexport.tasks.resolve import resolve_task
from fqexport.version import __version__

log = logging.getLogger(__name__)


# Limits of the per-channel rescale applied by BN re-estimation (σ_float / σ_quant).
_RESCALE_MIN, _RESCALE_MAX = 0.5, 2.0


def _batches(data: GroupData, batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x on device, group on CPU)`` calibration batches, in order."""
    return [(torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(g))
            for x, _, g in data.batches(batch_size)]


def example_batch(data: GroupData | DataStream, n: int = 2) -> torch.Tensor:
    """The first ``n`` samples of ``data`` (fewer when it has fewer) as one input batch: what a
    shape check or shape propagation runs (of a stream, only these are read)."""
    return torch.from_numpy(np.ascontiguousarray(data.take(np.arange(min(n, len(data)))).x))


def _channel_dim(kind: str) -> int:
    return 1 if kind in ("conv", "conv_transpose") else -1


def _float_targets(
    model: nn.Module, layers: list[LayerInfo], data: GroupData, batch_size: int, device
) -> dict[str, ChannelStats]:
    """Per-group output statistics of every layer of the float model, in one pass."""
    modules = dict(model.named_modules())
    stats = {l.name: ChannelStats(data.num_groups, _channel_dim(l.kind)) for l in layers}
    current: dict[str, torch.Tensor] = {}
    handles = []
    for l in layers:
        def hook(mod, inputs, output, name=l.name, batch_dim=l.batch_dim):
            stats[name].add(output.movedim(batch_dim, 0), current["group"])

        handles.append(modules[l.name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for x, g in _batches(data, batch_size, device):
                current["group"] = g
                model(x)
    finally:
        for h in handles:
            h.remove()
    return stats


def _layer_moments(
    module: nn.Module, info: LayerInfo, cache: ActivationCache, index: int, num_groups: int,
    alpha: torch.Tensor, cross: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Group-weighted Hessian H = Σ_g α_g 2 X_g X_gᵀ / N_g of ``module``'s inputs from the
    quantized prefix (the cache's first stream), and with ``cross`` also the cross moment
    C = Σ_g α_g 2 X_{f,g} X_gᵀ / N_g against the float model's inputs (its second stream)."""
    acc = HessianAccumulator(module, num_groups, name=info.name, cross=cross)
    d = info.batch_dim  # samples first: each row's group is its sample's
    for inputs, g in cache.layer_inputs(index):
        acc.add(inputs[0].movedim(d, 0), g, inputs[1].movedim(d, 0) if cross else None)
    c = acc.cross_moment(alpha.float()) if cross else None
    return acc.hessian(alpha.float()), c


def _conv_groups(hessian: torch.Tensor) -> int:
    """Conv groups of a layer's Hessian (``[G, cols, cols]``; 1 for ``[cols, cols]``)."""
    return hessian.shape[0] if hessian.dim() == 3 else 1


def _log_work(layer: str, step: str, hessian: torch.Tensor, flops_per_group: float, seconds: float) -> None:
    """A debug line with the arithmetic of one solver step (``step``: ``"solve"`` or
    ``"retarget"``); the record carries it as ``record.solver_work`` (a dict) for a profiler."""
    flops = flops_per_group * _conv_groups(hessian)
    work = {"layer": layer, "step": step, "cols": int(hessian.shape[-1]), "flops": flops, "seconds": seconds}
    log.debug("layer '%s': %s %.3g GFLOP in %.3f s (%.1f GFLOP/s)", layer, step, flops / 1e9, seconds,
              flops / 1e9 / max(seconds, 1e-9), extra={"solver_work": work})


def _factor_weight(module: nn.Module, info: LayerInfo, config: QuantConfig,
                   hessian: torch.Tensor) -> list[LayerFactor] | None:
    """The solver's one factorisation of ``hessian`` per conv group (column order scored on the
    layer's weight as it is now), shared by the float-output retarget and the solve; ``None``
    for the ``"obs"`` order, whose score needs the grid of the retargeted weight (the solve then
    factors after the retarget)."""
    if config.order == "obs":
        return None
    rows = weight_rows(info.kind, module.weight.detach()).float()
    t0 = time.perf_counter()
    with quiet_damping_retries():
        factors = factor_conv_groups(rows, hessian, order=config.order, damp=config.damp)
    _log_work(info.name, "factor", hessian, factor_flops(rows.shape[1], config.order), time.perf_counter() - t0)
    _say_damping(info.name, config.damp, max(f.damp for f in factors) if any(f.retries for f in factors) else None)
    return factors


def _say_damping(layer: str, damp: float, raised: float | None) -> None:
    """One log line when the damping had to be raised (to ``raised``), in place of the solver's
    :class:`DampingIncreasedWarning` warnings (quieted by :func:`quiet_damping_retries`)."""
    if raised is not None:
        log.warning("layer '%s': Hessian not positive definite at damp=%g; solved with damp=%g "
                    "(consider more calibration samples)", layer, damp, raised)


def _quantize_weight(
    module: nn.Module, info: LayerInfo, bits: int, config: QuantConfig, hessian: torch.Tensor | None,
    layout: LayerLayout, factors: list[LayerFactor] | None = None,
) -> tuple[torch.Tensor, WeightGrid]:
    """Integer codes (weight shape) and the grid (per-channel scales; per-block scales of
    ``layout.block_size`` columns for a Linear stored as MatMulNBits) of one layer's weight.

    ``hessian`` is ``[cols, cols]`` (or ``[conv groups, cols, cols]`` for grouped convs);
    ``None`` means round to nearest. ``factors``: the solver's factor of each conv group
    (:func:`_factor_weight`), made here when not given.
    """
    rows = weight_rows(info.kind, module.weight.detach()).float()
    grid = choose_solver_grid(
        rows, hessian, bits, weight_range=layer_weight_range(info.kind, config.weight_range), clip_search=config.use_clip_search(bits),
        block=layout.block_size,
    )
    if hessian is None:
        return rows_to_weight(info.kind, rtn_layer(rows, grid).codes, module.weight.shape), grid
    # the solver's loss tr((W-Q)H(W-Q)ᵀ) is not read here: skip its out·cols² GEMM
    options = dict(order=config.order, damp=config.damp, block_size=config.block_size, compute_loss=False)
    t0 = time.perf_counter()
    with quiet_damping_retries():
        result = solve_conv_groups(rows, hessian, grid, factors=factors, **options)
    out_per_group = rows.shape[0] // _conv_groups(hessian)
    _log_work(info.name, "solve", hessian,
              solve_flops(out_per_group, rows.shape[1], config.order, False, factored=factors is not None),
              time.perf_counter() - t0)
    _say_damping(info.name, config.damp, result.damp_used if result.retries and factors is None else None)
    return rows_to_weight(info.kind, result.codes, module.weight.shape), grid


def _retarget_to_float_output(
    module: nn.Module, info: LayerInfo, hessian: torch.Tensor, cross: torch.Tensor, damp: float,
    factors: list[LayerFactor] | None,
) -> None:
    """Replace ``module``'s weight by W* = W C H⁻¹ (ridge toward W): solving W* with H then
    fits the float model's output rather than W's output on the already-quantized inputs.
    ``factors``: the solver's factor of each conv group (no Cholesky of its own)."""
    w = module.weight.detach()
    rows = weight_rows(info.kind, module.weight.detach()).float()
    t0 = time.perf_counter()
    with quiet_damping_retries():
        target = compensate_input_error(rows, hessian, cross, damp=damp, factors=factors)
    _log_work(info.name, "retarget", hessian,
              retarget_flops(rows.shape[0] // _conv_groups(hessian), rows.shape[1], factored=factors is not None),
              time.perf_counter() - t0)
    change = float((target - rows).norm() / rows.norm().clamp_min(1e-12))
    log.debug("layer '%s': float-output target moves the weight by %.3g (relative)", info.name, change)
    with torch.no_grad():
        module.weight.copy_(rows_to_weight(info.kind, target, module.weight.shape).to(w.dtype))


def _correct_layer(
    module: nn.Module, info: LayerInfo, layer: QuantizedLayer, target: ChannelStats,
    cache: ActivationCache, index: int, num_groups: int, alpha: torch.Tensor, rescale: bool,
    correct_bias: bool = True,
) -> None:
    """Bias correction, plus the per-channel rescale of BN re-estimation for conv+BN layers.

    With the quantized layer's output z_q (group-weighted mean m_q, variance v_q) on the cached
    quantized-prefix inputs and the float layer's (m_f, v_f): f = sqrt(v_f / v_q) (1 without BN
    re-estimation), weight scale s ← f·s (codes unchanged), bias b ← m_f − f·(m_q − b), so the
    output has the float mean and variance; without ``correct_bias`` (the rescale alone),
    b ← m_q − f·(m_q − b): the variance rescaled, the layer's own mean kept.
    """
    stats = ChannelStats(num_groups, _channel_dim(info.kind))
    with torch.no_grad():
        for inputs, g in cache.layer_inputs(index):
            stats.add(module(inputs[0]).movedim(info.batch_dim, 0), g)
    m_q, v_q = stats.moments(alpha)
    m_f, v_f = target.moments(alpha)
    bias = module.bias.detach().float().cpu() if module.bias is not None else torch.zeros_like(m_q)
    f = torch.ones_like(m_q)
    if rescale:
        ok = (v_q > 1e-12) & (v_f > 1e-12)
        f = torch.where(ok, torch.sqrt(v_f / v_q.clamp_min(1e-12)), f).clamp(_RESCALE_MIN, _RESCALE_MAX)
    new_bias = (m_f if correct_bias else m_q) - f * (m_q - bias)
    f = f.to(layer.scale.device).reshape(-1, *([1] * (layer.scale.dim() - 1)))  # per row (and block)
    layer.scale = (layer.scale * f).float()
    with torch.no_grad():
        module.weight.copy_(layer.dequantized().to(module.weight.dtype))
        if module.bias is None:
            module.bias = nn.Parameter(new_bias.to(module.weight.device, module.weight.dtype))
        else:
            module.bias.copy_(new_bias.to(module.bias.dtype))


MSG_FLOAT_TOKENS = (
    "field 'x' holds {dtype} values, but the model input is read by the Embedding '{layer}' (token ids): "
    "store the ids as integers (e.g. x.astype(np.int64)){unsigned}"
)
# whole non-negative float x: unsigned ids, which fqexport reads as pixel values
MSG_UNSIGNED_TOKENS = (
    "; its values are whole numbers: unsigned integers (uint8, uint16) are read as pixel values and "
    "become float32, so store token ids as a signed integer type"
)
# Fewer calibration samples of a group than this: its activation ranges and statistics are guesses.
MIN_GROUP_SAMPLES = 8
MSG_ONE_GROUP = (
    "{source}: every sample is in one group ({group!r}): the group-weighted calibration and every "
    "per-group figure are then the overall ones; label each sample's group (the 'group' field) to see "
    "what compression does to each"
)
MSG_FEW_GROUP_SAMPLES = (
    "{source}: the {n} calibration samples drawn (num_calib={num_calib}) hold few of some groups ({few}; fewer "
    "than {min}): their activation ranges and statistics rest on those; give more samples of them or a larger num_calib"
)
_warned_few: set[tuple] = set()
_quiet_draws: list[bool] = []  # inside quiet_draw_warnings()


@contextmanager
def quiet_draw_warnings() -> Iterator[None]:
    """``compress`` calls inside the block do not warn about the groups their draw holds few of: fits
    on a part of the data (the search's hold-out split, its folds), whose refit on all the data warns
    about the draw the returned model holds (a sweep said two different counts for one draw)."""
    _quiet_draws.append(True)
    try:
        yield
    finally:
        _quiet_draws.pop()


MSG_WEIGHTS_UNDRAWN = (
    "group_weights weigh only groups that have no calibration sample: num_calib={n} draws fewer samples than "
    "the {k} groups, and none of {groups}; raise num_calib to at least {k}, or give weight to a drawn group"
)


MSG_IDENTICAL_SAMPLES = (
    "%s: the %d calibration samples drawn are all the same input (%s): every "
    "activation range is fitted to that one point, and the file will be wrong on real inputs; check the data "
    "(an unfilled buffer, a normalisation that zeroes it)"
)


def _warn_identical_samples(sub: GroupData) -> None:
    """Warn when every calibration sample drawn is the same input (never in an engine's worker)."""
    x = sub.x
    if len(x) > 1 and not in_worker() and bool((x == x[:1]).all()):
        value = "all zeros" if not np.any(x[:1]) else "one repeated input"
        log.warning(MSG_IDENTICAL_SAMPLES, sub.source, len(x), value)


# A calibration sample whose largest |x| is this many times the median sample's is named: min-max
# ranges follow it (one x1e4 sensor glitch in 192 samples left W8A8 32.8 % in agreement on clean data,
# and the export check, comparing with the fake-quant reference, passed)
OUTLIER_RATIO = 100.0
OUTLIER_SHARE = 0.05  # at most this share of the draw: more is a population of its own, not a few glitches
MSG_OUTLIER_SAMPLES = (
    "%s: calibration sample(s) %s reach |x| = %.4g, %.0fx the median sample's largest value (%.4g): min-max "
    "activation ranges follow them, leaving the other samples few levels (on clean inputs the file can lose most "
    "of its accuracy, and the export check, which compares it with the same ranges, cannot tell); check those "
    "samples, or calibrate with --calibration percentile (QuantConfig(calibration='percentile'))"
)


def _warn_outlier_samples(sub: GroupData, drawn: np.ndarray, calibration: str) -> None:
    """Warn (min-max calibration, float inputs, never in an engine's worker) when a drawn sample's
    largest |x| is :data:`OUTLIER_RATIO` times the median sample's, naming it by its index in the data."""
    x = sub.x
    if calibration != "minmax" or in_worker() or len(x) < 8 or not np.issubdtype(x.dtype, np.floating):
        return
    with np.errstate(over="ignore", invalid="ignore"):  # 64 samples at a time: no copy of the draw
        peak = np.concatenate([np.abs(chunk).reshape(len(chunk), -1).max(axis=1).astype(np.float64)
                               for chunk in (x[i:i + 64] for i in range(0, len(x), 64))])
    lit = peak[peak > 0]  # all-zero samples (padding, silence) say nothing of the scale
    median = float(np.median(lit)) if lit.size else 0.0
    far = np.flatnonzero(peak > OUTLIER_RATIO * median) if median > 0 else np.array([], dtype=np.int64)
    if far.size and far.size <= OUTLIER_SHARE * len(x):  # a larger share is a population (loud clips), not a glitch
        top = far[np.argsort(-peak[far])][:3]
        names = ", ".join(str(int(drawn[i])) for i in top) + (f" and {far.size - 3} more" if far.size > 3 else "")
        log.warning(MSG_OUTLIER_SAMPLES, sub.source, names, float(peak[top[0]]), float(peak[top[0]]) / median, median)


MSG_MODEL_NONFINITE = (
    "{source}: the float model computes NaN or Inf inside on {n} of the {total} calibration samples drawn (sample "
    "{first} of the data): a layer divides by zero or overflows on them (a norm of an all-zero input), and "
    "quantization cannot fit what they poison ({err}); fix the model, or drop those samples"
)


def _nonfinite_samples(model: nn.Module, sub: GroupData, batch_size: int) -> np.ndarray:
    """Positions in ``sub`` of the samples on which ``model`` (float) computes a NaN or Inf anywhere:
    in an intermediate activation (hooked on every leaf module) or its output."""
    bad: set[int] = set()
    batch = [0, 0]  # the batch's first position and its samples

    def mark(output: Any) -> None:  # (a module's output whose first dim is the batch's)
        for t in leaves(output):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[0] == batch[1]:
                finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
                bad.update(batch[0] + int(i) for i in torch.nonzero(~finite).flatten())

    # leaf modules, but those that may put time first ([T, B, ...] with T == B would name time steps)
    time_first = (nn.RNNBase, nn.MultiheadAttention)
    handles = [m.register_forward_hook(lambda m, i, o: mark(o)) for m in model.modules()
               if not list(m.children()) and not (isinstance(m, time_first) and not getattr(m, "batch_first", False))]
    try:
        with torch.no_grad():
            for start in range(0, len(sub), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(sub.x[start:start + batch_size]))
                batch[:] = [start, x.shape[0]]
                mark(model(x))
    except Exception:  # noqa: BLE001 - a diagnosis only: the caller raises the original error
        return np.array([], dtype=np.int64)
    finally:
        for h in handles:
            h.remove()
    return np.array(sorted(bad), dtype=np.int64)


def _warn_few_group_samples(sub: GroupData, num_calib: int) -> None:
    """Warn (once per data and draw in a process, never in an engine's worker) when a group has
    fewer than :data:`MIN_GROUP_SAMPLES` calibration samples, and when there is one group."""
    counts = sub.group_counts()
    few = [f"'{name}' {int(k)}" for name, k in zip(sub.group_names, counts) if k < MIN_GROUP_SAMPLES]
    key = (sub.source, num_calib, tuple(int(k) for k in counts))
    if key in _warned_few or in_worker() or _quiet_draws:
        return
    _warned_few.add(key)
    if few:
        log.warning(MSG_FEW_GROUP_SAMPLES.format(source=sub.source, n=len(sub), num_calib=num_calib,
                                                 few=", ".join(few), min=MIN_GROUP_SAMPLES))
    if len(sub.group_names) == 1:
        log.warning(MSG_ONE_GROUP.format(source=sub.source, group=sub.group_names[0]))


def check_token_ids(gm: torch.fx.GraphModule, data: GroupData, sub: GroupData, drawn: np.ndarray,
                     batch_size: int) -> None:
    """``x`` read by an Embedding straight from the model input: integer ids (not floats), every
    one in its vocabulary. An Embedding whose ids the model computes (``x[:, :2].long()``): every
    id it looks up on the calibration samples ``sub`` (the samples ``drawn`` of the data) is in
    its table (one forward pass)."""
    integer = np.issubdtype(data.x.dtype, np.integer)
    modules = dict(gm.named_modules())
    computed: list[str] = []
    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if node.args else None
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and isinstance(src, torch.fx.Node) and src.op == "placeholder":
            if not integer:
                x = data.x
                whole = x.size and float(x.min()) >= 0 and np.array_equal(x, np.round(x))
                raise data_error(data.source, MSG_FLOAT_TOKENS.format(dtype=x.dtype, layer=node.target,
                                                                      unsigned=MSG_UNSIGNED_TOKENS if whole else ""))
            check_vocabulary(data.x, data.source, int(mod.num_embeddings), str(node.target))
        elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            computed.append(str(node.target))
    if computed:
        _check_computed_ids(gm, computed, sub, drawn, batch_size)


def _check_computed_ids(gm: torch.fx.GraphModule, names: list[str], data: GroupData, drawn: np.ndarray,
                        batch_size: int) -> None:
    """Every id the Embeddings ``names`` look up on ``data`` (the samples ``drawn`` of the user's
    data) in ``[0, num_embeddings)``, else a DataError naming the layer, the id and the sample's
    index in the user's data (:data:`MSG_COMPUTED_IDS`)."""
    start = [0]

    def check(name: str, mod: nn.Embedding | nn.EmbeddingBag, args: tuple) -> None:
        ids = args[0]
        bad = (ids < 0) | (ids >= mod.num_embeddings)
        if bool(bad.any()):
            row = int(bad.reshape(ids.shape[0], -1).any(1).int().argmax()) if ids.dim() else 0
            raise data_error(data.source, MSG_COMPUTED_IDS.format(
                layer=name, vocab=mod.num_embeddings, value=int(ids[bad][0]), sample=int(drawn[start[0] + row])))

    hooks = [gm.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: check(n, mod, args)) for n in names]
    try:
        with torch.no_grad():
            for x, _ in _batches(data, batch_size, torch.device("cpu")):
                gm(x)
                start[0] += x.shape[0]
    finally:
        for h in hooks:
            h.remove()


MSG_ONE_TENSOR = (
    " If the model's forward takes a dict, several tensors or keyword inputs: fqexport feeds it one tensor, a "
    "batch of the data's 'x'; wrap it in a module whose forward(self, x) builds them from that tensor "
    "(docs/your-own-model.md, 'Several inputs')"
)


def model_output(model: nn.Module, data: GroupData | DataStream) -> Any:
    """The model's output on the first two samples (its first output: :func:`first_output`); a
    DataError when they do not fit it."""
    check_pt2_sample_shape(model, tuple(data.sample_shape), data.source)
    x = example_batch(data)
    static = getattr(model, "meta", {}).get(STATIC_BATCH_KEY) if isinstance(model, torch.fx.GraphModule) else None
    try:
        with torch.no_grad():
            out = run_model(model, x)
            if static is not None and x.shape[0] > 1:
                run_model(model, x[:1])  # a program fixed at batch 2 runs the two samples, then fails later
    except Exception as err:
        ids = (" x holds integers, which fqexport keeps as token ids (an Embedding's input): if they are "
               "pixels or features, save x as float32 (scaled as the model was trained)"
               if not x.is_floating_point() else "")
        if static is not None:
            raise ModelLoadError(f"{static} ({type(err).__name__}: {err})") from err
        # an indexing error (batch["image"], kwargs["meta"]): maybe not x's shape but the forward's inputs
        hint = MSG_ONE_TENSOR if isinstance(err, (KeyError, IndexError, TypeError)) else ""
        raise DataError(
            f"{data.source}: field 'x' with sample shape {data.sample_shape}{shape_origin_note(data)} does not fit "
            f"the model ({type(err).__name__}: {err}).{ids}{hint}"
        ) from err
    if is_head_maps(out, tuple(x.shape[2:])):
        maps = leaves(out)
        raise ModelLoadError(MSG_HEAD_MAPS.format(n=len(maps), shapes=", ".join(str(list(t.shape)) for t in maps)))
    return refuse_mapping_output(first_output(out))


def model_task(model: nn.Module, data: GroupData | DataStream, task: str | Task | None) -> tuple[Task, str]:
    """``task`` as a Task object and how it was chosen (``"given"`` or ``"inferred: …"``), inferred
    from ``data`` and ``model``'s output when None (as :func:`compress` does): how the search and
    the sweep learn the task before any fit (they hand the object to every fit, and put the
    reason back into the returned model's metadata). The model's output and the data's labels
    are checked for the task (a DataError, as :func:`compress` gives)."""
    # a copy: running the user's model would move the state its forward keeps (counters, caches)
    out = model_output(copy_model(unwrap_model(model)).eval(), data)
    chosen, why = (task, "given") if isinstance(task, Task) else resolve_task(task, data, out)
    # the output and the labels checked as compress checks them, before any loss is computed on them
    chosen.check_annotations(data, chosen.check_output(out, data))
    return chosen, why


def check_model_on_data(model: nn.Module, data: GroupData | DataStream, task: Task | None = None) -> int:
    """Run the first two samples; return the number of classes. Bad shapes (not ``task``'s
    output, default a classifier's logits) become a DataError. ``model`` runs as given: hand it a
    copy in eval mode of a user's model (a model in train mode moves its BatchNorm statistics)."""
    return (task or Classification()).check_output(model_output(model, data), data)


@dataclass
class _LayerPass:
    """What quantizing one layer needs from the linear pass: the models' modules, the activation
    cache, the float targets of bias correction, the group weights α and the MACs."""

    config: QuantConfig
    modules: dict[str, nn.Module]
    cache: ActivationCache | None
    index: dict[str, int]  # layer -> its node in the cache's graph order
    targets: dict[str, ChannelStats]
    alpha: torch.Tensor
    macs: dict[str, int]
    num_groups: int

    def quantize(self, info: LayerInfo) -> QuantizedLayer:
        """1. the layer's inputs from the final prefix; 2. H (and C) → float-output retarget;
        3. the layout, decided once; 4. solve (or round); 5. bias correction / BN re-estimation."""
        config, module, k = self.config, self.modules[info.name], self.index[info.name]
        bits = config.bits_for(info.name)
        if self.cache is not None:
            self.cache.advance(k)  # the layer's inputs: every earlier layer is final
        hessian, factors = None, None
        # Embedding rows are looked up, never mixed: per-row round to nearest is their
        # least-squares optimum (the Hessian of a one-hot input is diagonal), no solver.
        if config.method == "solver" and info.kind != "embedding":
            cross = config.solver_target == "float-output"
            hessian, c = _layer_moments(module, info, self.cache, k, self.num_groups, self.alpha, cross)
            factors = _factor_weight(module, info, config, hessian)  # one Cholesky per conv group
            if c is not None:
                _retarget_to_float_output(module, info, hessian, c, config.damp, factors)
        macs = self.macs.get(info.name, 0)
        cols = weight_rows(info.kind, module.weight.detach()).shape[1]
        layout = layer_layout(info.kind, bits, config.export, cols, macs, module.weight.numel())
        codes, grid = _quantize_weight(module, info, bits, config, hessian, layout, factors)
        layer = QuantizedLayer(info.name, info.kind, bits, grid.qmax, codes.to(torch.int8).cpu(),
                               grid.scale.float().cpu(), info.params, layout.container, macs, block_size=grid.block)
        with torch.no_grad():
            module.weight.copy_(layer.dequantized().to(module.weight.dtype))
        if info.name in self.targets:
            _correct_layer(module, info, layer, self.targets[info.name], self.cache, k, self.num_groups, self.alpha,
                           rescale=info.had_batchnorm and config.bn_reestimate, correct_bias=config.bias_correction)
        return layer


def _check_layer_bits(config: QuantConfig, names: list[str], floats: Sequence[Any] = ()) -> None:
    """ConfigError for a ``layer_bits`` name that is no quantized layer: one left float (by
    ``keep_float``, or unsupported) is named as such, not as no layer at all."""
    kept = {f.name: f for f in floats}
    clash = sorted(n for n in config.layer_bits if n in kept)
    if clash:
        raise ConfigError("layer_bits gives a width to " + ", ".join(
            f"{n!r}, which stays float ({kept[n].reason})" for n in clash)
            + ": drop it from layer_bits or from keep_float")
    unknown = sorted(set(config.layer_bits) - set(names))
    if unknown:
        raise ConfigError(
            f"layer_bits names {', '.join(repr(u) for u in unknown)}, not a quantizable layer of the "
            f"model (layers: {', '.join(names)})"
        )


def _quantize_layers(folded: torch.fx.GraphModule, float_model: torch.fx.GraphModule, layers: list[LayerInfo],
                     sub: GroupData, config: QuantConfig, alpha: torch.Tensor, device: torch.device,
                     progress: bool) -> dict[str, QuantizedLayer]:
    """Quantize every layer of ``folded`` in place, in one linear pass: the cache runs the
    quantized graph (and the float copy for the cross moment) node by node, each layer on the
    calibration inputs of the final prefix."""
    example = torch.from_numpy(np.ascontiguousarray(sub.x[:1]))
    macs = count_macs(folded, example, [l.name for l in layers])
    # BN re-estimation (conv+BN layers) and bias correction (the others) both match the float
    # layer's output statistics on the calibration data.
    # An Embedding (a row lookup, no bias) has neither: its rows are rounded to nearest.
    corrected = [l for l in layers if l.kind != "embedding"
                 and (config.bias_correction or (config.bn_reestimate and l.had_batchnorm))]
    folded.to(device)
    float_model.to(device)
    targets = _float_targets(float_model, corrected, sub, config.batch_size, device) if corrected else {}
    solver = config.method == "solver"
    cross = solver and config.solver_target == "float-output"
    streams = [GraphStream(folded)] + ([GraphStream(float_model)] if cross else [])
    cache = None
    if solver or targets:
        cache = ActivationCache(streams, _batches(sub, config.batch_size, torch.device("cpu")), device,
                                # no cap: inf, or more bytes than an int64 holds (1e303 MB overflowed int())
                                max_bytes=None if config.max_activation_memory_mb * 2**20 >= 2**63
                                else int(config.max_activation_memory_mb * 2**20))
    step = _LayerPass(config, dict(folded.named_modules()), cache,
                      {l.name: streams[0].module_node(l.name) for l in layers}, targets, alpha, macs, sub.num_groups)
    quantized: dict[str, QuantizedLayer] = {}
    bar = tqdm(layers, desc=f"quantize ({config.method})", unit="layer", disable=not progress)
    try:
        for info in bar:
            bar.set_postfix_str(info.name)
            quantized[info.name] = step.quantize(info)
    finally:
        if cache is not None:
            cache.close()
            log.info(
                "activation cache on %s: peak %.1f MB in memory, %.1f MB spilled (%d batches)",
                device, cache.peak_bytes / 2**20, cache.peak_spilled_bytes / 2**20, cache.spilled_batches,
            )
        folded.cpu()
        float_model.cpu()
    return quantized


def _calibrate_activations(folded: torch.fx.GraphModule, quantized: dict[str, QuantizedLayer], sub: GroupData,
                           config: QuantConfig, progress: bool, task: Task) -> torch.fx.GraphModule:
    """The fake-quant reference: a copy of ``folded`` with an activation quantizer at every point
    the export places a Q/DQ pair, ranges observed on the weight-quantized model so every group
    counts (``config.calibration``'s observer per group). The target picks the scheme (uint8, or
    int8 symmetric for the GPU); layers whose container runs weight-only read float inputs; the
    task's float tail (a detector's box decode) stays float."""
    reference = copy.deepcopy(folded)
    context, quantizers = insert_act_quantizers(
        reference,
        lambda: make_observer(config.calibration, sub.num_groups, percentile=config.percentile),
        set(quantized),
        symmetric=config.export.symmetric_activations,
        weight_only={n for n, l in quantized.items() if l.layout.weight_only},
        float_tail=task.float_tail(reference, set(quantized)),
    )
    batches = _batches(sub, config.batch_size, torch.device("cpu"))
    with torch.no_grad():
        for x, g in tqdm(batches, desc="calibrate activations", unit="batch", disable=not progress):
            context.group = g
            reference(x)
    for q in quantizers.values():
        q.freeze()
    context.group = None
    return reference.eval()


def _metadata(config: QuantConfig, sub: GroupData, data: GroupData | DataStream, alpha: torch.Tensor, skipped: set[str],
              quantized: dict[str, QuantizedLayer], num_classes: int, task: dict[str, Any] | None,
              float_ops: tuple[str, ...]) -> ExportMetadata:
    params = sum(l.params for l in quantized.values())
    avg_bits = sum(l.bits * l.params for l in quantized.values()) / max(params, 1)
    solver = config.method == "solver"
    return ExportMetadata(
        fqexport_version=__version__,
        method=config.method,
        order=config.order if solver else None,
        solver_target=config.solver_target if solver else None,
        calibration=config.calibration,
        weight_range=config.weight_range,
        target=config.target,
        num_calib=len(sub),
        group_names=tuple(sub.group_names),
        group_weights=tuple(round(float(a), 6) for a in alpha),
        skipped_layers=tuple(sorted(skipped)),
        layers=layer_records(quantized),
        input_shape=data.sample_shape,
        num_classes=num_classes,
        avg_weight_bits=round(avg_bits, 4),
        task=task,
        float_ops=float_ops,
        settings=config.to_dict(),
        calibration_data=calibration_record(sub, data),
    )


def calibration_record(sub: GroupData, data: GroupData | DataStream) -> dict[str, Any]:
    """``ExportMetadata.calibration_data``: where the data came from, how many samples it has and
    were drawn, and a sha256 of what was drawn (x, group, y: the file's inputs, in draw order)."""
    digest = hashlib.sha256()
    for part in (sub.x, sub.group, sub.y):
        if part is not None:
            digest.update(np.ascontiguousarray(part))  # the array's buffer: no copy of the draw
    return {"source": str(data.source), "samples": len(data), "drawn": len(sub), "sha256": digest.hexdigest()}


@one_at_a_time
def compress(
    model: nn.Module,
    calib: GroupData | str | Path | Any,
    config: QuantConfig | None = None,
    *,
    progress: bool = True,
    task: str | Task | None = None,
) -> CompressedModel:
    """Quantize ``model`` with group-labeled calibration data.

    Args:
        model: a float PyTorch model (not modified): a classifier returning logits ``[batch,
            classes]``, a detector (``task="detection"``: YOLOv5 ``[batch, anchors, 5 + classes]``
            or YOLOv8 ``[batch, 4 + classes, anchors]``) or a segmenter (logits ``[batch, classes, H, W]``).
        calib: what ``fqexport.load_data`` accepts or returns: a GroupData, an ``.npz``/``.csv``
            path, a torch Dataset, DataLoader or iterable yielding x, (x, y) or (x, y, group), a
            DataStream. Labels are optional (with them, each is checked against the model's
            classes); of streamed data only the calibration subset is read.
        config: a QuantConfig (default: 8-bit weights, solver, x86-safe range).
        progress: show tqdm progress bars.
        task: ``"classification"``, ``"detection"``, ``"segmentation"`` or a Task object
            (:mod:`fqexport.tasks`, e.g. ``Detection(layout="v8")``); None infers it from the data's
            fields and the model's output (:func:`~fqexport.tasks.resolve.infer_task`). A
            detector's box decode after its head convs stays float (``metadata.float_ops``).

    Returns:
        A CompressedModel; ``fqexport.export(cm, path)`` writes the QDQ ONNX file.
    """
    check_argument(model, nn.Module, "compress: model", "; load a checkpoint with fqexport.load_model('pkg.mod:factory', "
                   "weights=...)" if isinstance(model, (str, Path)) else "")
    check_argument(config, QuantConfig, "compress: config", "; e.g. QuantConfig(**options)")
    config = config or QuantConfig()
    # an .npz path: x memory-mapped, so that only the drawn samples are read into memory
    data = read_data(calib)
    device = resolve_device(config.device, "QuantConfig.device")
    # a copy without wrappers (DataParallel, torch.compile), in float32 (a float16/bfloat16 model too)
    source, model = model, copy_model(unwrap_model(model)).eval().cpu().float()
    # 1. load & check: trace, fold BN, find the layers; 2. a group-balanced calibration subset
    #    (of streamed data, only these samples are read); the data fits the model: every sample
    #    in memory, the subset of a stream
    drawn = group_balanced_indices(data, config.num_calib, seed=config.seed)
    sub = data.take(drawn)
    prepared = prepare_model(model, config.skip_unsupported, config.keep_float, example=example_batch(sub),
                             owner=source)
    _warn_few_group_samples(sub, config.num_calib)
    _warn_identical_samples(sub)
    _warn_outlier_samples(sub, drawn, config.calibration)
    checked = data if isinstance(data, GroupData) else sub
    check_token_ids(prepared.folded, checked, sub, drawn, config.batch_size)  # a clear error, not an IndexError
    out = model_output(model, checked)
    task, chosen = resolve_task(task, data, out)
    num_classes = task.check_output(out, checked)
    task.check_annotations(data, num_classes)
    log.info("task %s (%s)", task.name, chosen)
    _check_layer_bits(config, prepared.names, prepared.float_layers)
    float_model = copy.deepcopy(prepared.folded)
    # 'samples' weights groups by their share of the user's data, not of the balanced subset
    alpha = torch.from_numpy(GroupWeights(config.group_weights).vector(data.group_names, data.group_counts()))
    drawn_counts = torch.from_numpy(sub.group_counts())
    if (drawn_counts == 0).any() and (drawn_counts > 0).any():
        # a group without a calibration sample (num_calib below the number of groups) weighs
        # nothing in the Hessians and statistics: the recorded weights say what was used
        alpha = torch.where(drawn_counts > 0, alpha, torch.zeros_like(alpha))
        if float(alpha.sum()) <= 0:
            undrawn = [g for g, n in zip(data.group_names, drawn_counts.tolist()) if n == 0]
            raise ConfigError(MSG_WEIGHTS_UNDRAWN.format(n=config.num_calib, k=len(data.group_names),
                                                         groups=", ".join(map(repr, undrawn))))
        alpha = alpha / alpha.sum()
    # 3. weights, layer by layer on the quantized prefix; 4. activation ranges; in batches whose
    #    activations stay bounded (large images get fewer samples per batch than batch_size)
    passes = replace(config, batch_size=calibration_batch_size(prepared.folded, example_batch(sub, 1), config.batch_size))
    try:
        with reuse_freed_memory():  # the Hessian-sized tensors of one layer are reused by the next
            quantized = _quantize_layers(prepared.folded, float_model, list(prepared.layers), sub, passes, alpha,
                                         device, progress)
        reference = _calibrate_activations(prepared.folded, quantized, sub, passes, progress, task)
    except (ConfigError, DataError) as err:  # a NaN a layer computes: name the samples, not "this layer"
        if "NaN or Inf" not in str(err):
            raise
        bad = _nonfinite_samples(float_model, sub, passes.batch_size)
        if not bad.size:
            raise
        raise DataError(MSG_MODEL_NONFINITE.format(
            source=sub.source, n=bad.size, total=len(sub), first=", ".join(str(int(drawn[i])) for i in bad[:3]),
            err=err)) from err
    tail = task.float_tail(prepared.folded, set(quantized))
    float_ops = tail_ops(prepared.folded, tail) if tail is not None else ()
    record = {**task.to_dict(), "chosen": chosen}
    if isinstance(model, DecodedModel):  # the head maps' decode the user named (compiled into the graph)
        record["decode"] = model.decode_name
    return CompressedModel(
        reference=reference,
        float_model=float_model.eval(),
        layers=quantized,
        config=config,
        group_names=tuple(data.group_names),
        input_shape=data.sample_shape,
        num_classes=num_classes,
        calib=sub,
        metadata=_metadata(config, sub, data, alpha, prepared.skipped, quantized, num_classes, record, float_ops),
        task=task,
    )
