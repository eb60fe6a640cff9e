"""Disparity diagnostics (seed 000): per group, how well and how *stably* a model fits it —
before and after quantization — so a user sees which groups are fragile and why.

For every group ``g`` with samples ``S_g`` (at most ``max_samples_per_group``, drawn with
``seed``) and the group's mean loss ``L_g(θ) = 1/|S_g| Σ_{i∈S_g} CE(f_θ(x_i), y_i)``:

* ``accuracy``: fraction of ``S_g`` whose arg-max logit is the label.
* ``loss``: ``L_g(θ)`` (mean cross-entropy, natural log).
* ``logit_variance``: ``1/|S_g| Σ_i Var_k(z_ik)``, the mean over samples of the (population)
  variance of the logit vector across classes — a measure of logit spread / confidence scale.
* ``grad_norm``: ``‖∇_θ L_g‖₂`` over all floating-point parameters θ of the model.
* ``top_hessian_eigenvalue``: the largest eigenvalue λ_max of ``H_g = ∇²_θ L_g`` by power iteration
  with Hessian-vector products (double backward, ``torch.autograd.grad(create_graph=True)``):
  ``v₀`` random unit, ``λ_k = v_kᵀ H_g v_k`` (Rayleigh quotient), ``v_{k+1} = H_g v_k / ‖H_g v_k‖``;
  stops after ``hessian_iters`` products or once ``|λ_k − λ_{k−1}| ≤ tol·|λ_k|``
  (``hessian_iterations`` and ``hessian_converged`` report which). Power iteration finds the
  eigenvalue of largest *magnitude*; near a trained minimum that is the top (positive) one,
  i.e. the sharpest direction: a large ``λ_max`` means weight noise (quantization error) costs
  the group more loss, ``ΔL ≈ ½ δᵀ H_g δ``. Away from a minimum it can be negative; then a
  second iteration on ``H_g − λ_d·I`` finds λ_max (:func:`top_eigenvalue`; the iterations count both).

Quantized variants are measured on the fake-quant PyTorch reference of
:func:`fqexport.pipeline.compress.compress` (weights on their grids, uint8 activation fake quantization)
— the forward pass (accuracy, loss, logit variance) is exactly the quantized model's. Gradients
and Hessian-vector products go *through* the activation fake quantization with a clipped
straight-through estimator (STE): ``∂ qdq(x) / ∂x = 1`` where ``x`` lies inside the uint8 range
``[s·(0−z), s·(255−z)]`` and 0 outside (the rounding's zero derivative is ignored); the STE is
piecewise constant, so its own second derivative is 0. Parameters are the dequantized weights,
so ``grad_norm`` and ``λ_max`` are those of the loss *at the quantized point*. The STE is the
autograd formula of the custom op ``fqexport::act_qdq``, registered where the op is defined
(:mod:`fqexport.graph.act_quant`).

``accuracy`` and ``loss`` are read from :func:`fqexport.metrics.group_metrics.group_metrics` on
the logits of the sampled samples, the same numbers a validation report shows.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from fqexport.progress import tqdm

from fqexport.calibration.checks import (
    check_labels,
    require_classification,
    require_labels,
)
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.calibration.stream import DataStream
from fqexport.config import SOLVER_DEFAULTS, QuantConfig, check_bits, check_seed
from fqexport.errors import ConfigError, UnsupportedLayerError
from fqexport.global_state import one_at_a_time, with_gradients
from fqexport.graph.prepare import float32, fold_batchnorm
from fqexport.metadata import ACTIVATION_BITS
from fqexport.metrics.group_metrics import group_metrics
from fqexport.pipeline.compress import (
    check_model_on_data,
    compress,
    example_batch,
    model_task,
)

log = logging.getLogger(__name__)

FLOAT_VARIANT = "float"
DEFAULT_TOL = 1e-3

MSG_POSITIVE = "{name}={value!r} must be an integer >= {low}"
_said: set[str] = set()  # the ops without a second derivative already named
MSG_NO_SECOND_DERIVATIVE = (
    "top Hessian eigenvalue skipped (n/a): the model has an op torch cannot differentiate twice ({err}); "
    "the other diagnostics are measured (--hessian-iters 0 skips it without this note)"
)
MSG_NO_PARAMS = "the model has no floating-point parameters: nothing to differentiate for diagnostics"

# Columns of AnalysisReport.rows(), in table order.
ROW_COLUMNS = ["group", "variant", "n", "acc %", "loss", "logit var", "grad norm", "λ_max", "iters"]


# --------------------------------------------------------------------------------------------
# per-group diagnostics
# --------------------------------------------------------------------------------------------


MSG_ONE_PREDICTION = ("; one prediction of a {n}-sample group ({step:.2f} pp): too few samples to single it out "
                      "(validate's per-group McNemar p tells)")
# a sharpest group of fewer samples than this is named with a caveat
FEW_SAMPLES_SHARP = 30
MSG_FEW_SAMPLES_SHARP = ("; measured on {n} samples: a few samples' curvature, which another draw of the group "
                         "can change (compare λ_max with --max-samples-per-group larger or another --seed)")
# a most-hurt group whose drop is this few predictions (and under 100 samples) is named with a caveat
FEW_PREDICTIONS = 3
MSG_FEW_PREDICTIONS = ("; {k} predictions of a {n}-sample group ({step:.2f} pp each): too few to single it out "
                       "beside the other groups (validate's per-group McNemar p tells)")


@dataclass(frozen=True)
class GroupDiagnostics:
    """Diagnostics of one group (definitions in the module docstring).

    ``count`` is the number of samples used (at most ``max_samples_per_group``), ``total`` the
    group's size in the data. Values are NaN for a group with no samples.
    """

    count: int
    total: int
    accuracy: float
    loss: float
    logit_variance: float
    grad_norm: float
    top_hessian_eigenvalue: float
    hessian_iterations: int
    hessian_converged: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def _check_positive(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise ConfigError(MSG_POSITIVE.format(name=name, value=value, low=low))
    return int(value)


def _sample_indices(data: GroupData | DataStream, max_per_group: int, seed: int) -> dict[int, np.ndarray]:
    """Sorted sample indices per group id, at most ``max_per_group`` each (seeded draw)."""
    rng = np.random.default_rng(seed)
    out = {}
    for g in range(data.num_groups):
        idx = np.flatnonzero(data.group == g)
        if idx.size > max_per_group:
            idx = np.sort(rng.choice(idx, max_per_group, replace=False))
        out[g] = idx
    return out


def _params(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise UnsupportedLayerError(MSG_NO_PARAMS)
    for p in params:
        p.requires_grad_(True)
    return params


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def _grads(loss: torch.Tensor, params: list[nn.Parameter], create_graph: bool = False) -> list[torch.Tensor]:
    """∂loss/∂θ with zeros for parameters the loss does not depend on."""
    gs = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def hessian_vector_product(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    v: list[torch.Tensor],
) -> list[torch.Tensor]:
    """``H v`` with ``H = ∇²_θ L``, ``L = 1/n Σ_i CE_i`` summed over ``batches``.

    Per batch: ``g = ∇_θ (Σ_b CE / n)`` with ``create_graph=True``, then ``∇_θ (gᵀv)``.
    Attention runs as its math formula (``SDPBackend.MATH``): the fused CPU kernels of
    ``scaled_dot_product_attention`` have no double backward.
    """
    out = [torch.zeros_like(p) for p in params]
    for xb, yb in batches:
        with sdpa_kernel(SDPBackend.MATH):
            loss = F.cross_entropy(model(xb), yb, reduction="sum") / n
            gs = _grads(loss, params, create_graph=True)
        gv = _dot(gs, v)
        if not gv.requires_grad:  # the gradient does not depend on θ: H = 0 on this batch
            continue
        for o, h in zip(out, _grads(gv, params)):
            o.add_(h)
    return out


def power_iteration(
    hvp, like: list[torch.Tensor], iters: int, tol: float = DEFAULT_TOL, seed: int = 0, offset: float = 0.0
) -> tuple[float, int, bool]:
    """Dominant eigenvalue of the symmetric operator ``hvp`` (``v ↦ H v``).

    ``λ_k = v_kᵀ H v_k`` with ``‖v_k‖ = 1``, ``v_{k+1} = H v_k / ‖H v_k‖``; stops after ``iters``
    products or when ``|λ_k − λ_{k−1}| ≤ tol·|λ_k + offset|`` (``offset``: the shift of a shifted
    operator ``H − offset·I``, so that convergence is judged on the eigenvalue of ``H`` the
    caller reports, not on the shifted one). Returns ``(λ, iterations, converged)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in like]
    norm = torch.sqrt(_dot(v, v))
    v = [t / norm for t in v]
    lam_prev: float | None = None
    lam = float("nan")
    for k in range(1, iters + 1):
        hv = hvp(v)
        lam = float(_dot(v, hv))
        hv_norm = float(torch.sqrt(_dot(hv, hv)))
        if hv_norm == 0.0:
            return 0.0, k, True
        if lam_prev is not None and abs(lam - lam_prev) <= tol * max(abs(lam + offset), 1e-12):
            return lam, k, True
        lam_prev = lam
        v = [t / hv_norm for t in hv]
    return lam, iters, False


def top_eigenvalue(
    hvp, like: list[torch.Tensor], iters: int, tol: float = DEFAULT_TOL, seed: int = 0
) -> tuple[float, int, bool]:
    """Largest (signed) eigenvalue λ_max of the symmetric operator ``hvp``.

    Power iteration finds the eigenvalue of largest magnitude λ_d. When λ_d < 0 (a saddle or a
    maximum along some direction), the shifted operator H − λ_d·I has eigenvalues λ_i − λ_d ≥ 0
    and its dominant one is λ_max − λ_d: a second iteration gives λ_max, with the products the
    first left of ``iters`` (NaN when it left none). Returns ``(λ_max, products used, converged)``."""
    lam, k, ok = power_iteration(hvp, like, iters, tol, seed)
    if not lam < 0:
        return lam, k, ok
    shifted = lambda v: [hv - lam * t for hv, t in zip(hvp(v), v)]  # noqa: E731
    # judged on μ + λ_d: relative to the shifted μ ≈ |λ_d| a slow iteration stopped at once (survey
    # 20: -0.03 reported "converged" for a λ_max of 110 beside λ_d = -538)
    if k >= iters:  # no product left for the shifted iteration: λ_max unknown (λ_d < 0 is not it)
        return float("nan"), k, False
    mu, k2, ok2 = power_iteration(shifted, like, iters - k, tol, seed + 1, offset=lam)  # iters products in all
    return mu + lam, k + k2, ok and ok2


@with_gradients
def group_diagnostics(
    model: nn.Module,
    data: GroupData | DataStream,
    *,
    batch_size: int = 128,
    hessian_iters: int = 20,
    max_samples_per_group: int = 512,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    progress: bool = False,
) -> dict[str, GroupDiagnostics]:
    """Per-group accuracy, loss, logit variance, gradient norm and top Hessian eigenvalue.

    Args:
        model: a classifier returning logits ``[batch, classes]`` (not modified: a copy in eval
            mode is differentiated). A fake-quant reference works too (STE, module docstring).
        data: group-labeled samples.
        batch_size: samples per forward/backward pass.
        hessian_iters: maximum Hessian-vector products of the power iteration (0: skip, NaN).
        max_samples_per_group: samples per group used (a seeded random subset when larger).
        seed: seed of the subset draw and of the power iteration's start vector.
        tol: relative convergence tolerance of the power iteration.
        progress: show a tqdm bar over groups.

    Returns:
        ``{group name: GroupDiagnostics}`` in group id order.
    """
    batch_size = _check_positive("batch_size", batch_size, 1)
    hessian_iters = _check_positive("hessian_iters", hessian_iters, 0)
    max_samples_per_group = _check_positive("max_samples_per_group", max_samples_per_group, 1)
    if not (math.isfinite(float(tol)) and float(tol) > 0):  # inf stopped the iteration after 2 products
        raise ConfigError(f"tol={tol!r} must be a finite number > 0")
    model = copy.deepcopy(model).eval()
    require_labels(data, "analyze")
    num_classes = check_model_on_data(model, data)
    check_labels(data, num_classes)
    params = _params(model)

    index = _sample_indices(data, max_samples_per_group, seed)
    totals = data.group_counts()
    nan = float("nan")
    # per group id: (logit variance, gradient norm, (λ_max, iterations, converged)), logits
    curvature: dict[int, tuple[float, float, tuple[float, int, bool]]] = {}
    no_second_derivative: str | None = None  # why λ_max cannot be computed for this model
    logits_of: dict[int, np.ndarray] = {}
    for g in tqdm(range(data.num_groups), desc="diagnostics", unit="group", disable=not progress):
        idx = index[g]
        n = int(idx.size)
        if n == 0:
            continue
        part = data.take(idx)  # of a stream, only the group's sampled samples are read
        # token ids (an Embedding's input) stay integers; anything else is float32
        x = torch.from_numpy(np.ascontiguousarray(
            part.x, dtype=np.int64 if np.issubdtype(part.x.dtype, np.integer) else np.float32))
        y = torch.from_numpy(np.ascontiguousarray(part.y, dtype=np.int64))
        batches = _batches(x, y, batch_size)
        # One pass: logits, logit variance, and ∇_θ L_g accumulated as Σ_b ∇(Σ CE_b / n).
        grad = [torch.zeros_like(p) for p in params]
        var_sum = 0.0
        chunks = []
        for xb, yb in batches:
            logits = model(xb)
            ce = F.cross_entropy(logits, yb, reduction="sum")
            for acc, gb in zip(grad, _grads(ce / n, params)):
                acc.add_(gb)
            with torch.no_grad():
                chunks.append(logits.detach().numpy())
                var_sum += float(logits.var(dim=1, unbiased=False).sum())
        logits_of[g] = np.concatenate(chunks)
        grad_norm = float(torch.sqrt(_dot(grad, grad)))
        eig = (nan, 0, False)
        if hessian_iters > 0 and no_second_derivative is None:
            try:
                eig = top_eigenvalue(
                    lambda v: hessian_vector_product(model, params, batches, n, v),
                    [p.detach() for p in params], hessian_iters, tol=tol, seed=seed,
                )
            except RuntimeError as err:  # an op torch cannot differentiate twice: no λ_max for any group
                if "not implemented" not in str(err):
                    raise
                no_second_derivative = str(err).strip().splitlines()[0]
                if no_second_derivative not in _said:  # once, not per variant of analyze
                    _said.add(no_second_derivative)
                    log.warning(MSG_NO_SECOND_DERIVATIVE.format(err=no_second_derivative))
        curvature[g] = (var_sum / n, grad_norm, eig)

    # accuracy and loss: the one per-group metrics object, on the sampled samples' logits
    used = sorted(logits_of)
    sampled = np.concatenate([index[g] for g in used]) if used else np.zeros(0, dtype=np.int64)
    logits_all = np.concatenate([logits_of[g] for g in used]) if used else np.zeros((0, 1), np.float32)
    metrics = group_metrics(logits_all, data.y[sampled], data.group[sampled], data.group_names)
    out: dict[str, GroupDiagnostics] = {}
    for g, name in enumerate(data.group_names):
        if g not in curvature:
            out[name] = GroupDiagnostics(0, int(totals[g]), nan, nan, nan, nan, nan, 0, False)
            continue
        row = metrics.by_group[name]
        variance, grad_norm, (lam, iters, converged) = curvature[g]
        out[name] = GroupDiagnostics(
            count=int(row["count"]), total=int(totals[g]), accuracy=float(row["accuracy"]),
            loss=float(row["loss"]), logit_variance=variance, grad_norm=grad_norm,
            top_hessian_eigenvalue=lam, hessian_iterations=iters, hessian_converged=converged,
        )
        log.info("diagnostics %s: n=%d acc=%.4f loss=%.4f |g|=%.4g λ=%.4g (%d it, %s)", name, row["count"],
                 row["accuracy"], row["loss"], grad_norm, lam, iters, "converged" if converged else "not converged")
    return out


# --------------------------------------------------------------------------------------------
# float vs quantized
# --------------------------------------------------------------------------------------------


def _few_predictions(right: int, n: int) -> str:
    """The caveat of a most-hurt group whose change is a few predictions of a small group."""
    if n >= 100 or not right or abs(right) > FEW_PREDICTIONS:
        return ""
    if abs(right) == 1:
        return MSG_ONE_PREDICTION.format(n=n, step=100.0 / n)
    return MSG_FEW_PREDICTIONS.format(k=abs(right), n=n, step=100.0 / n)


def variant_name(bits: int) -> str:
    """Table name of a weight width: ``W4A8`` (activations: ``ACTIVATION_BITS``)."""
    return f"W{int(bits)}A{ACTIVATION_BITS}"


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


@dataclass(frozen=True)
class AnalysisReport:
    """Diagnostics of the float model and of each quantized variant, per group.

    Attributes:
        group_names: groups, in id order.
        variants: ``"float"`` then ``variant_name(b)`` (``"W<b>A8"``) per weight width.
        diagnostics: ``{variant: {group: GroupDiagnostics}}``.
        settings: how it was measured (method, bits, hessian_iters, tol, samples, seed, data),
            and per variant the weight layers not at its width (``layers``: float ones with their
            reason, ``layer_bits`` ones with theirs), named in :meth:`summary` too.
    """

    group_names: tuple[str, ...]
    variants: tuple[str, ...]
    diagnostics: dict[str, dict[str, GroupDiagnostics]]
    settings: dict[str, Any] = field(default_factory=dict)

    def changes(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per quantized variant and group, the change from float.

        ``acc_drop_pp`` = 100·(acc_float − acc_q); ``loss_increase`` = loss_q − loss_float;
        ``grad_norm_ratio`` and ``hessian_ratio`` = quantized / float (NaN when float is 0).
        """
        base = self.diagnostics[FLOAT_VARIANT]
        out: dict[str, dict[str, dict[str, float]]] = {}
        for variant in self.variants:
            if variant == FLOAT_VARIANT:
                continue
            out[variant] = {}
            for group in self.group_names:
                f, q = base[group], self.diagnostics[variant][group]
                out[variant][group] = {
                    "acc_drop_pp": 100.0 * (f.accuracy - q.accuracy),
                    "loss_increase": q.loss - f.loss,
                    "grad_norm_ratio": q.grad_norm / f.grad_norm if f.grad_norm else float("nan"),
                    "hessian_ratio": (q.top_hessian_eigenvalue / f.top_hessian_eigenvalue
                                      if f.top_hessian_eigenvalue else float("nan")),
                }
        return out

    def summary(self) -> list[str]:
        """Plain-language lines: the sharpest group in float, the most hurt group per variant."""
        lines = []
        base = self.diagnostics[FLOAT_VARIANT]
        lam = {g: d.top_hessian_eigenvalue for g, d in base.items() if not math.isnan(d.top_hessian_eigenvalue)}
        if lam:
            sharp = max(lam, key=lam.get)
            n = base[sharp].count
            lines.append(
                f"float: group '{sharp}' has the sharpest loss (λ_max {lam[sharp]:.4g}); weight "
                "noise costs it the most loss (ΔL ≈ ½ δᵀHδ)"
                # a small group's λ_max is its few samples' curvature (survey 82: an 8-sample group)
                + (MSG_FEW_SAMPLES_SHARP.format(n=n) if n < FEW_SAMPLES_SHARP else "")
            )
        for variant, by_group in self.changes().items():
            valid = {g: c for g, c in by_group.items() if not math.isnan(c["loss_increase"])}
            if not valid:
                continue
            worst = max(valid, key=lambda g: (valid[g]["acc_drop_pp"], valid[g]["loss_increase"]))
            c = valid[worst]
            # "most hurt" only where a group lost accuracy or gained loss; else the least helped one
            hurt = c["acc_drop_pp"] > 0 or (c["acc_drop_pp"] == 0 and c["loss_increase"] > 0)
            n = self.diagnostics[variant][worst].count
            right = round(-c["acc_drop_pp"] * n / 100.0)  # net change in right predictions
            lines.append(
                f"{variant}: {'most hurt group' if hurt else 'no group hurt; the least helped'} '{worst}': "
                f"accuracy {0.0 - c['acc_drop_pp']:+.2f} pp ({right:+d} right of {n} samples), "  # 0.0 - x: never -0.00
                f"loss {c['loss_increase']:+.4f}, "
                # λ_max unknown (--hessian-iters 0, or no second derivative): left out, as the table says n/a
                + (f"λ_max ×{c['hessian_ratio']:.3g}, " if not math.isnan(c["hessian_ratio"]) else "")
                + f"grad norm ×{_fmt(c['grad_norm_ratio'], '.3g')}"
                + _few_predictions(right, n) + self._not_at_width(variant)
            )
        return lines

    def _not_at_width(self, variant: str) -> str:
        """``variant``'s weight layers that are not at its width (float, or a ``layer_bits``
        width), as a clause of its summary line (``settings["layers"]``)."""
        layers = self.settings.get("layers", {}).get(variant, {})
        floats, other = layers.get("float", {}), layers.get("other_widths", {})
        parts = ([f"{len(floats)} weight layer(s) float ({', '.join(f'{n!r} [{r}]' for n, r in floats.items())})"]
                 if floats else [])
        parts += [f"{', '.join(f'{n!r} at {b} bits' for n, b in other.items())}"] if other else []
        return f"; not at {variant}'s width: {'; '.join(parts)}" if parts else ""

    def rows(self) -> list[dict[str, str]]:
        """One row per (group, variant), formatted for a text table (columns: ROW_COLUMNS)."""
        rows = []
        for group in self.group_names:
            for variant in self.variants:
                d = self.diagnostics[variant][group]
                iters = f"{d.hessian_iterations}" + ("" if d.hessian_converged or d.hessian_iterations == 0 else "*")
                rows.append({
                    "group": group, "variant": variant, "n": str(d.count),
                    "acc %": _fmt(100.0 * d.accuracy, ".2f"), "loss": _fmt(d.loss, ".4f"),
                    "logit var": _fmt(d.logit_variance, ".4g"), "grad norm": _fmt(d.grad_norm, ".4g"),
                    "λ_max": _fmt(d.top_hessian_eigenvalue, ".4g"), "iters": iters,
                })
        return rows

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and math.isnan(v) else v

        return {
            "group_names": list(self.group_names),
            "variants": list(self.variants),
            "settings": dict(self.settings),
            "diagnostics": {v: {g: d.to_dict() for g, d in by.items()} for v, by in self.diagnostics.items()},
            "changes": {v: {g: {k: clean(x) for k, x in c.items()} for g, c in by.items()}
                        for v, by in self.changes().items()},
            "summary": self.summary(),
        }


@one_at_a_time
def analyze(
    model: nn.Module,
    data: GroupData | Any,
    bits: Sequence[int] = (8, 4),
    method: str = "rtn",
    calib: GroupData | Any | None = None,
    *,
    config: QuantConfig | None = None,
    batch_size: int = 128,
    hessian_iters: int = 20,
    max_samples_per_group: int = 512,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    progress: bool = False,
) -> AnalysisReport:
    """Diagnostics of the float model and of each ``bits`` variant, per group of ``data``.

    The float variant is the BN-folded float model (the same function as ``model``; folding
    changes the parameterisation, so gradients and λ_max are comparable with the quantized
    variants, which are BN-folded too). Each quantized variant is
    ``compress(model, calib, config with weight_bits=b, method=method).reference`` (module
    docstring: STE through activation fake quantization).

    Args:
        model: the float classifier.
        data: data to diagnose, with labels (what ``fqexport.load_data`` accepts or returns;
            of a stream only the sampled samples are read).
        bits: weight widths to compare (activations 8-bit); duplicates are dropped.
        method: ``"rtn"`` (fast) or ``"solver"``.
        calib: calibration data for compress (default: ``data``).
        config: base QuantConfig (``weight_bits`` and ``method`` are replaced).
        batch_size, hessian_iters, max_samples_per_group, seed, tol, progress: see
            :func:`group_diagnostics`.
    """

    data = load_data(data)
    model = float32(model)  # a float16/bfloat16 model as compress takes it (its checks blamed the data)
    require_classification(data)  # boxes or masks: the task's own figures are validate's
    if data.y is None:  # label-free data: a detector's or segmenter's? its output says (as compress infers it)
        require_classification(data, model_task(model, data, None)[0].name)
    require_labels(data, "analyze")  # accuracy, loss and gradients per group, before any compress
    calib_data = data if calib is None else load_data(calib)
    base = config or QuantConfig(method=method)
    check_seed(seed)  # before any pass (numpy's bare "expected non-negative integer" came after one)
    widths: list[int] = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise ConfigError(f"bits={list(bits)!r}: every width must be an integer from 2 to 8")
        b = check_bits(b, "bits")  # named as analyze's argument, not QuantConfig's weight_bits
        if b not in widths:
            widths.append(b)
    # round to nearest reads none of the solver's options: a config made for compress keeps them at
    # their defaults here (QuantConfig refuses them away from it with method='rtn')
    unread = {} if method == "solver" else SOLVER_DEFAULTS
    configs = [replace(base, weight_bits=b, method=method, **unread) for b in widths]  # checks bits/method
    kwargs = dict(batch_size=batch_size, hessian_iters=hessian_iters,
                  max_samples_per_group=max_samples_per_group, seed=seed, tol=tol, progress=progress)

    model = copy.deepcopy(model).eval().cpu()
    check_model_on_data(model, data)
    folded, _ = fold_batchnorm(model, example_batch(data))
    diagnostics = {FLOAT_VARIANT: group_diagnostics(folded, data, **kwargs)}
    layers: dict[str, dict[str, Any]] = {}  # per variant: its weight layers not at its width
    for cfg in configs:
        cm = compress(model, calib_data, cfg, progress=progress)
        name = variant_name(cfg.weight_bits)
        diagnostics[name] = group_diagnostics(cm.reference, data, **kwargs)
        layers[name] = {"float": {f.name: f.reason or "unsupported" for f in cm.metadata.float_layers},
                        "other_widths": {n: l.bits for n, l in cm.layers.items() if l.bits != cfg.weight_bits}}
    settings = {
        "data": data.source, "calib": calib_data.source, "method": method, "bits": widths,
        "activation_bits": ACTIVATION_BITS, "hessian_iters": hessian_iters, "tol": tol,
        "max_samples_per_group": max_samples_per_group, "seed": seed, "batch_size": batch_size,
        # per variant: the weight layers not at its width (float: unsupported or keep_float; layer_bits)
        "layers": layers, "keep_float": [str(p) for p in base.keep_float], "layer_bits": dict(base.layer_bits),
        "gradients": "quantized variants: clipped straight-through estimator through activation "
                     "fake quantization; parameters are the dequantized weights",
        "logit_variance": "mean over samples of the population variance of the logit vector across classes",
        "top_hessian_eigenvalue": "power iteration with Hessian-vector products (double backward) "
                                  "of the group's mean cross-entropy w.r.t. all parameters",
    }
    return AnalysisReport(tuple(data.group_names), tuple(diagnostics), diagnostics, settings)
