"""Sensitivity-guided PTQ solver: pure math, tensors in, tensors out.

One layer ``W [out, cols]`` with its (group-weighted) Hessian ``H [cols, cols]`` of the layer
loss ``tr((W - Q) H (W - Q)ᵀ)``. Following the GPTQ construction:

1. dead columns (``H_jj == 0``): ``H_jj := 1``, ``W[:, j] := 0`` (no input ever reaches them);
2. dampen: ``A = H + λ · mean(diag H) · I``;
3. order the columns, most sensitive first (``sensitivity``: ``Σ_i w_ij² H_jj``), so their
   rounding error is absorbed by the less sensitive columns still unquantized;
4. ONE factorisation, of the permuted ``B = P A Pᵀ``, upside down (``J`` reverses the order):
   ``J B J = L Lᵀ`` (lower Cholesky), so ``B = R Rᵀ`` with ``R = J L J`` upper triangular.
   GPTQ's factor, the upper Cholesky ``U`` of ``B⁻¹`` (``B⁻¹ = Uᵀ U``), is ``U = R⁻¹``
   (``B⁻¹ = R⁻ᵀ R⁻¹``), so neither ``H⁻¹`` nor a second Cholesky is ever formed.
   :func:`factor_layer` makes steps 1-4 once per layer: the float-output target
   (:func:`compensate_input_error`, ``A⁻¹ = Pᵀ R⁻ᵀ R⁻¹ P``) and the solve share that factor;
5. column by column, all rows in parallel: ``q_j = round(w'_j / s)`` on the fixed per-row grid,
   ``e_j = w_j - s·q_j`` (the ORIGINAL column), ``w'_k = w_k + Σ_{j<k} e_j N_jk`` for the later
   columns, ``N = R D_R⁻¹ - I`` (``R``'s columns divided by its diagonal) — GPTQ's update
   ``w'_k -= r_j U_jk / U_jj`` with ``r_j = w'_j - s·q_j``, rewritten without ``R⁻¹``
   (:func:`solve_layer` derives it; QuIP's LDL form of GPTQ). Inside a block column by column, for the
   columns after the block lazily as one GEMM ``W'[:, after] += E @ N[block, after]``.

The per-row scales are fixed before the solve (:func:`choose_solver_grid` or any
:class:`~fqexport.quant.grid.WeightGrid`). Per-block scales (GPTQ's groupsize, for a layer
stored as ORT's MatMulNBits: ``grid.block`` columns per block, ``grid.scale [out, blocks]``)
are fixed up front too, each from its block of the un-updated weight: GPTQ's "static groups",
which keeps the blocks over the original column order whatever the solve order; the GPTQ
reference's alternative, re-choosing a block's scale from the already-updated weights when the
(natural-order) column loop reaches it, needs the natural order. :func:`rtn_layer` is round to
nearest on such a grid (the one RTN of fqexport: the ``rtn`` method, the sensitivity proxy, comparisons).
Device-agnostic: CPU or CUDA tensors.

Grouped / depthwise convolutions: rows ``k·out/G … (k+1)·out/G`` of the weight only see the
inputs of conv group ``k``; :func:`solve_conv_groups` solves each conv group with its own
Hessian (``H`` of shape ``[G, cols, cols]`` from :class:`fqexport.quant.hessian.HessianAccumulator`).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, get_args

import numpy as np
import torch

from fqexport.config import Order
from fqexport.errors import ConfigError
from fqexport.quant.grid import (
    WeightGrid,
    as_rows,
    choose_weight_grid,
    column_scales,
    dequantize,
    fake_quantize,
    num_blocks,
    quantize,
)

ORDERS: tuple[str, ...] = get_args(Order)
# the orders that rank columns by a score (all but "natural")
SENSITIVITY_KINDS = tuple(o for o in ORDERS if o != "natural")

_MSG_SHAPE = (
    "solver: weight has shape {w} and Hessian {h}; the Hessian must be [cols, cols] with "
    "cols = in_features (Linear) or in_channels/groups·kh·kw (Conv) of the weight"
)
_MSG_SCALE = "solver: grid.scale has {n} entries but the weight has {out} rows (one scale per row)"
_MSG_BLOCK_SCALE = (
    "solver: grid.scale has shape {shape} but a weight of {out} rows and {cols} columns in blocks of "
    "{block} needs [{out}, {nb}] (one scale per row and block)"
)
_MSG_ORDER = "solver: order={order!r} is not one of " + ", ".join(ORDERS)
_MSG_KIND = "column_sensitivity: kind={kind!r} is not one of " + ", ".join(SENSITIVITY_KINDS)
_MSG_NEEDS_GRID = "column_sensitivity: kind='obs' needs the weight grid (pass grid=...)"
_MSG_BLOCK = "solver: block_size={bs!r} must be >= 1"
_MSG_DAMP = "solver: damp={damp!r} must be >= 0 and max_retries={r!r} >= 0"
_MSG_NONFINITE = (
    "solver: the {what} holds NaN or Inf; check the calibration inputs of this layer "
    "(a NaN/Inf activation poisons the Hessian)"
)
_MSG_NOT_PD = (
    "solver: the Hessian is not positive definite even with damping {damp:g}·mean(diag H) "
    "after {tries} tries; raise damp (QuantConfig.damp) or use more calibration samples"
)
_MSG_RETRY = (
    "solver: Cholesky failed with damp={old:g}; retried with damp={new:g} "
    "(the Hessian is singular or indefinite — too few calibration samples?)"
)

# Damping tried first on retry when the caller asked for damp=0.
_FIRST_RETRY_DAMP = 1e-3


class HessianNotPositiveDefinite(ConfigError):
    """Cholesky of the dampened Hessian failed after every retry (raise ``damp``)."""


class DampingIncreasedWarning(UserWarning):
    """The solver had to raise the damping to factor the Hessian (result still valid)."""


@dataclass(frozen=True)
class SolverResult:
    """Result of quantizing one layer.

    Attributes:
        codes: integer codes as a float tensor ``[out, cols]`` in the ORIGINAL column order,
            each in ``[-qmax, qmax]``.
        qweight: dequantized weight ``s_c · codes`` ``[out, cols]`` (float32).
        damp_used: the relative damping λ that made the Cholesky succeed (0 for RTN).
        order: the column permutation used (``order[0]`` was quantized first).
        loss: ``tr((W - Q) H (W - Q)ᵀ)`` with the undampened input ``H`` (``Σ (W-Q)²`` for RTN
            without a Hessian; NaN when :func:`solve_layer` ran with ``compute_loss=False``).
        retries: how many times the damping was raised (the flag behind
            :class:`DampingIncreasedWarning`).
    """

    codes: torch.Tensor
    qweight: torch.Tensor
    damp_used: float
    order: torch.Tensor
    loss: float
    retries: int = 0


@dataclass(frozen=True)
class LayerFactor:
    """The one factorisation of a layer's damped Hessian in solve order (module docstring,
    steps 1-4), made once by :func:`factor_layer` and shared by :func:`compensate_input_error`
    (the float-output target) and :func:`solve_layer`.

    Attributes:
        perm: the column order ``[cols]`` (``perm[0]`` is quantized first).
        R: upper triangular ``[cols, cols]`` with ``P (H + λ·mean(diag H)·I) Pᵀ = R Rᵀ`` (``H``
            with its dead columns fixed).
        damp: the relative damping λ that made the Cholesky succeed.
        retries: how many times λ was raised.
    """

    perm: torch.Tensor
    R: torch.Tensor
    damp: float
    retries: int = 0


def _hessian_column_weight(rows: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``diag H`` as the clipping search's column weight: ``[cols]`` for ``H [cols, cols]``;
    ``[out, cols]`` for a grouped conv's ``H [G, cols, cols]`` (rows ``k·out/G … (k+1)·out/G``
    weighted by ``diag H[k]``)."""
    out, cols = rows.shape
    if H.dim() not in (2, 3) or tuple(H.shape[-2:]) != (cols, cols) or (H.dim() == 3 and out % H.shape[0]):
        raise ConfigError(_MSG_SHAPE.format(w=tuple(rows.shape), h=tuple(H.shape)))
    diag = torch.diagonal(H, dim1=-2, dim2=-1).clamp_min(0)
    if H.dim() == 2:
        return diag
    return diag.repeat_interleave(out // H.shape[0], dim=0)


def choose_solver_grid(
    weight: torch.Tensor,
    H: torch.Tensor | None,
    bits: int,
    *,
    weight_range: str = "x86-safe",
    clip_search: bool = True,
    hessian_aware: bool = True,
    block: int | None = None,
) -> WeightGrid:
    """Per-row scales fixed before the solve: the clipping search of ``choose_weight_grid``,
    weighting column ``j``'s error by ``H_jj`` when ``hessian_aware`` (``Σ_j H_jj (w - q)²``).
    With ``block``: one scale per row and block of ``block`` columns, each searched the same way.

    ``H``: ``[cols, cols]``, ``[G, cols, cols]`` for a grouped/depthwise conv (each row is
    weighted by its conv group's diagonal), or ``None`` (every column weighs 1).
    """
    column_weight = None
    if hessian_aware and H is not None and clip_search:
        column_weight = _hessian_column_weight(as_rows(weight), H)
    return choose_weight_grid(
        weight, bits, weight_range=weight_range, clip_search=clip_search,
        column_weight=column_weight, block=block,
    )


def layer_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Layer output error ``tr((W - Q) H (W - Q)ᵀ) = Σ_i δ_iᵀ H δ_i`` with ``δ = W - Q``."""
    d = (W.float() - Q.float()).to(H.dtype)
    return float(((d @ H) * d).sum())


def column_sensitivity(
    W: torch.Tensor,
    H: torch.Tensor,
    kind: str = "sensitivity",
    *,
    grid: WeightGrid | None = None,
    hinv_diag: torch.Tensor | None = None,
    damp: float = 0.01,
) -> torch.Tensor:
    """Score of each column ``[cols]``; the solver quantizes the highest score first.

    - ``"sensitivity"``: ``Σ_i w_ij² · H_jj`` (loss of zeroing column j, all rows);
    - ``"hessian-diag"``: ``H_jj``;
    - ``"obs"``: ``Σ_i (w_ij - q(w_ij))² / [H⁻¹]_jj`` (OBS cost of rounding column j alone);
      needs ``grid``; ``[H⁻¹]_jj`` is computed from ``H + damp·mean(diag H)·I`` unless
      ``hinv_diag`` is given.
    """
    if kind not in SENSITIVITY_KINDS:
        raise ConfigError(_MSG_KIND.format(kind=kind))
    hdiag = torch.diagonal(H).float()
    W = W.float()
    if kind == "hessian-diag":
        return hdiag.clone()
    if kind == "sensitivity":
        return W.pow(2).sum(dim=0) * hdiag
    if grid is None:
        raise ConfigError(_MSG_NEEDS_GRID)
    if hinv_diag is None:
        hinv_diag = _inverse_diagonal(torch.linalg.cholesky(_damped(H.float(), damp)))
    scale = grid.column_scales(W.shape[1]).to(W.device, torch.float32)
    err = W - fake_quantize(W, scale, grid.qmax, grid.qmin)
    return err.pow(2).sum(dim=0) / hinv_diag.float()


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A finite sum proves it (a NaN or an Inf reaches the sum) at a
    fraction of ``isfinite(t).all()``'s cost on a large Hessian; only a sum that overflows is
    checked entry by entry."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_inputs(W: torch.Tensor, H: torch.Tensor, grid: WeightGrid | None = None) -> None:
    """Shapes (and the grid's scales, when given) match, and W and H are finite."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ConfigError(_MSG_SHAPE.format(w=tuple(W.shape), h=tuple(H.shape)))
    if grid is not None:
        _check_scale(grid, W.shape[0], W.shape[1])
    if not _all_finite(W):
        raise ConfigError(_MSG_NONFINITE.format(what="weight"))
    if not _all_finite(H):
        raise ConfigError(_MSG_NONFINITE.format(what="Hessian"))


def _check_scale(grid: WeightGrid, out: int, cols: int) -> None:
    if grid.block is None:
        if grid.scale.numel() != out:
            raise ConfigError(_MSG_SCALE.format(n=grid.scale.numel(), out=out))
        return
    nb = num_blocks(cols, grid.block)
    if tuple(grid.scale.shape) != (out, nb):
        raise ConfigError(_MSG_BLOCK_SCALE.format(shape=tuple(grid.scale.shape), out=out, cols=cols,
                                                  block=grid.block, nb=nb))


# Set by a caller that reports the raised damping itself (compress: one log line per layer); a
# context variable, not a warnings filter: ``warnings.catch_warnings`` swaps the process's
# filters, which two threads solving at once left changed for good.
_QUIET_RETRIES: contextvars.ContextVar[bool] = contextvars.ContextVar("fqexport_quiet_damping", default=False)


@contextlib.contextmanager
def quiet_damping_retries() -> Iterator[None]:
    """No :class:`DampingIncreasedWarning` from the solver in this thread (or task) while the
    block runs; the caller reads the raised damping from the results (``retries``, ``damp``)."""
    token = _QUIET_RETRIES.set(True)
    try:
        yield
    finally:
        _QUIET_RETRIES.reset(token)


def _raised_damp(lam: float, stacklevel: int) -> float:
    """The next damping after a failed Cholesky (λ ×10, or a first λ when it was 0), announced
    by a :class:`DampingIncreasedWarning` at the caller's ``stacklevel`` (not under
    :func:`quiet_damping_retries`)."""
    new = lam * 10.0 if lam > 0 else _FIRST_RETRY_DAMP
    if not _QUIET_RETRIES.get():
        warnings.warn(_MSG_RETRY.format(old=lam, new=new), DampingIncreasedWarning, stacklevel=stacklevel + 1)
    return new


def _damped(H: torch.Tensor, lam: float) -> torch.Tensor:
    """``H + λ·mean(diag H)·I`` (a new tensor)."""
    A = H.clone()
    A.diagonal().add_(lam * torch.diagonal(H).mean())
    return A


# MKL's CPU Cholesky slows down when the leading dimension is a multiple of 512 (cache-set
# aliasing): n = 1024, 1536, 2048 took 1.92x, 1.35x, 1.48x as long as the same matrix padded with
# 16 rows and columns of the identity (best of 7, 2 quiet AVX2 cores); 3072 and 4096 took the same
# time either way, 2304 and 4608 are not padded.
_PAD_MULTIPLE, _PAD_FROM, _PAD = 512, 1024, 16


def _cholesky(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex(A)``; a CPU matrix of a size that is a multiple of 512 (from 1024)
    is factored inside ``[[A, 0], [0, I]]``, whose factor is ``[[L, 0], [0, I]]``."""
    n = A.shape[-1]
    if A.device.type != "cpu" or n < _PAD_FROM or n % _PAD_MULTIPLE:
        return torch.linalg.cholesky_ex(A)
    padded = A.new_zeros(n + _PAD, n + _PAD)
    padded[:n, :n] = A
    padded[n:, n:].diagonal().fill_(1.0)
    L, info = torch.linalg.cholesky_ex(padded)
    return L[:n, :n], info


def _damped_cholesky(
    H: torch.Tensor, damp: float, max_retries: int
) -> tuple[torch.Tensor, float, int]:
    """Lower Cholesky factor of ``H + λ·mean(diag H)·I``; λ ×10 on failure (at most
    max_retries, a :class:`DampingIncreasedWarning` each time). Returns (L, λ, retries)."""
    lam = float(damp)
    for attempt in range(max_retries + 1):
        L, info = _cholesky(_damped(H, lam))
        # H is finite (checked), so a successful factor is too: |L_ij| <= sqrt(A_ii)
        if int(info) == 0 and bool(torch.isfinite(torch.diagonal(L)).all()):
            return L, lam, attempt
        if attempt == max_retries:
            break
        lam = _raised_damp(lam, stacklevel=3)
    raise HessianNotPositiveDefinite(_MSG_NOT_PD.format(damp=lam, tries=max_retries + 1))


def _inverse_diagonal(L: torch.Tensor) -> torch.Tensor:
    """``diag(A⁻¹)`` from ``A = L Lᵀ``: ``A⁻¹ = L⁻ᵀ L⁻¹``, so ``[A⁻¹]_jj = Σ_i (L⁻¹)_ij²``, the
    squared norm of column ``j`` of ``L⁻¹`` (one triangular solve, no full inverse)."""
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).pow(2).sum(dim=0)


def _reversed_factor(
    H: torch.Tensor, perm: torch.Tensor, lam: float, mean_diag: torch.Tensor
) -> torch.Tensor | None:
    """``R`` upper triangular with ``B = R Rᵀ``, ``B = P (H + λ·mean(diag H)·I) Pᵀ`` the damped
    Hessian in solve order; ``None`` when the Cholesky fails.

    ``J`` reverses the order (``J = Jᵀ = J⁻¹``), so ``J B J`` is ``H`` gathered in the reversed
    solve order: ``J B J = L Lᵀ`` (lower Cholesky) ⇒ ``B = (J L J)(J L J)ᵀ``, ``R = J L J``.
    """
    rev = perm.flip(0)
    # rows, then columns within each row (gather's row-major walk: 1.3-1.8x faster than a
    # second index_select along dim 1, which strides across rows)
    JBJ = torch.gather(H.index_select(0, rev), 1, rev.expand(H.shape[0], -1))
    JBJ.diagonal().add_(lam * mean_diag)  # J P keeps the diagonal a diagonal: + λ·mean(diag H)·I
    L, info = _cholesky(JBJ)
    if int(info) != 0 or not bool(torch.isfinite(torch.diagonal(L)).all()):
        return None
    return L.flip(0, 1)


def _order_and_factor(
    W: torch.Tensor, H: torch.Tensor, order: str, grid: WeightGrid | None, damp: float, max_retries: int
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Steps 2-4 of the module docstring: the column order ``perm`` (most sensitive first) and
    ``R`` with ``P A Pᵀ = R Rᵀ``, ``A = H + λ·mean(diag H)·I``; λ ×10 while a Cholesky fails
    (at most ``max_retries`` times). Returns ``(perm, R, λ, retries)``."""
    mean_diag = torch.diagonal(H).mean()
    lam, retries = damp, 0
    while True:
        hinv_diag = None
        if order == "obs":  # [A⁻¹]_jj before the order exists: from the unpermuted factor
            L, lam, tries = _damped_cholesky(H, lam, max_retries - retries)
            retries += tries
            hinv_diag = _inverse_diagonal(L)
        if order == "natural":
            perm = torch.arange(H.shape[0], device=H.device)
        else:
            score = column_sensitivity(W, H, order, grid=grid, hinv_diag=hinv_diag)
            perm = torch.argsort(score, descending=True, stable=True)
        R = _reversed_factor(H, perm, lam, mean_diag)
        if R is not None:
            return perm, R, lam, retries
        if retries >= max_retries:
            raise HessianNotPositiveDefinite(_MSG_NOT_PD.format(damp=lam, tries=retries + 1))
        lam, retries = _raised_damp(lam, stacklevel=3), retries + 1


class _ColumnOps(NamedTuple):
    """The vector operations of :func:`_quantize_columns`'s sequential column loop: numpy's on
    CPU (on vectors of a few hundred rows a numpy call costs a third of a torch call, and the loop
    makes six per column), torch's on other devices."""

    matvec: Callable[..., Any]  # matvec(A [k, out], x [k], out) -> xᵀ A
    add: Callable[..., Any]
    sub: Callable[..., Any]
    mul: Callable[..., Any]
    div: Callable[..., Any]
    rint: Callable[..., Any]
    clip: Callable[..., Any]  # clip(x, lo, hi, out)


_NUMPY_OPS = _ColumnOps(
    lambda A, x, out: np.matmul(x, A, out=out), np.add, np.subtract, np.multiply, np.divide, np.rint,
    lambda x, lo, hi, out: np.minimum(np.maximum(x, lo, out=out), hi, out=out),
)
_TORCH_OPS = _ColumnOps(
    lambda A, x, out: torch.mv(A.t(), x, out=out), torch.add, torch.sub, torch.mul, torch.div, torch.round,
    lambda x, lo, hi, out: torch.clamp(x, lo, hi, out=out),
)


def _quantize_columns(
    Wt: torch.Tensor, N: torch.Tensor, St: torch.Tensor | None, qmin: int, qmax: int, block_size: int,
    ops: _ColumnOps | None = None,
) -> torch.Tensor:
    """Codes ``[cols, out]`` (solve order) of ``Wt = Wᵀ`` (column ``j`` of ``W`` is the
    contiguous row ``Wt[j]``; overwritten by ``W'ᵀ``), all rows at once, column by column:

        w'_j = w_j + Σ_{i<j} e_i N_ij,   q_j = clamp(round(w'_j / s_j)),   e_j = w_j - s_j·q_j.

    ``St [cols, out]``: the scale of each (column, row), for per-block grids; ``None``: ``Wt``
    is in units of a per-row scale already (``w / s``; the update is linear in the columns, so it
    commutes with scaling rows), ``s_j = 1``. Blocked: the terms from earlier blocks arrive as one
    GEMM after each block (``W'[:, after] += E[:, block] N[block, after]``), the terms inside the
    block as one vector-matrix product per column. ``ops``: :data:`_NUMPY_OPS` (CPU tensors
    only) or :data:`_TORCH_OPS`; by default numpy's on CPU.
    """
    W0t = Wt.clone()                                           # the original columns w_j
    Qt = torch.empty_like(Wt)                                  # codes q_j
    Et = torch.empty_like(Wt)                                  # errors e_j = w_j - s_j·q_j
    op = ops or (_NUMPY_OPS if Wt.device.type == "cpu" else _TORCH_OPS)
    cpu = op is _NUMPY_OPS
    w_, w0_, q_, e_ = (T.numpy() if cpu else T for T in (Wt, W0t, Qt, Et))
    s_ = None if St is None else (St.numpy() if cpu else St)
    tmp = w_[0].copy() if cpu else w_[0].clone()
    # numpy's maximum/minimum take a third of the time with array bounds than with Python numbers
    lo, hi = (np.full_like(tmp, qmin), np.full_like(tmp, qmax)) if cpu else (qmin, qmax)
    cols = Wt.shape[0]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        n_ = N[i1:i2, i1:i2].t().contiguous()                  # n_[j - i1] = N[i1:i2, j]
        n_ = n_.numpy() if cpu else n_
        e_block = e_[i1:i2]
        for j in range(i1, i2):
            w, q, k = w_[j], q_[j], j - i1
            if k:
                op.add(w, op.matvec(e_block[:k], n_[k, :k], tmp), out=w)  # w'_j += Σ_i e_i N_ij
            if s_ is None:
                op.rint(w, out=q)
            else:
                op.rint(op.div(w, s_[j], out=q), out=q)
            op.clip(q, lo, hi, q)                                           # q_j = clamp(round(w'_j/s_j))
            if s_ is None:
                op.sub(w0_[j], q, out=e_[j])                                # e_j = w_j - q_j
            else:
                op.sub(w0_[j], op.mul(q, s_[j], out=tmp), out=e_[j])        # e_j = w_j - s_j·q_j
        if i2 < cols:
            Wt[i2:].addmm_(N[i1:i2, i2:].t(), Et[i1:i2])                    # W'_after += E N
    return Qt


def _check_options(order: str, damp: float, max_retries: int) -> None:
    if order not in ORDERS:
        raise ConfigError(_MSG_ORDER.format(order=order))
    if not (float(damp) >= 0.0) or int(max_retries) < 0:
        raise ConfigError(_MSG_DAMP.format(damp=damp, r=max_retries))


def _without_dead_columns(
    W: torch.Tensor, H: torch.Tensor, fix_hessian: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: a dead column (``H_jj == 0``: no input reaches it) is free, GPTQ sets it to 0:
    ``W[:, j] := 0``, ``H_jj := 1`` (row and column ``j`` of ``H`` zero otherwise; not done
    without ``fix_hessian``). Copies only what changes, and only when a column is dead."""
    dead = torch.nonzero(torch.diagonal(H) == 0).flatten()
    if dead.numel() == 0:
        return W, H
    Wk = W.index_fill(1, dead, 0.0)
    if not fix_hessian:
        return Wk, H
    Hk = H.index_fill(0, dead, 0.0).index_fill_(1, dead, 0.0)
    Hk[dead, dead] = 1
    return Wk, Hk


def factor_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    order: str = "sensitivity",
    grid: WeightGrid | None = None,
    damp: float = 0.01,
    max_retries: int = 4,
) -> LayerFactor:
    """Steps 1-4 of the module docstring for ``W [out, cols]`` and ``H [cols, cols]``: the
    column order (scored on ``W``; ``"obs"`` needs ``grid``) and the one Cholesky of the damped
    Hessian in that order. Pass the result to :func:`compensate_input_error` and
    :func:`solve_layer` (``factor=``) so that a layer is factored once.
    """
    _check_options(order, damp, max_retries)
    _check_inputs(W, H)
    if order == "obs" and grid is None:
        raise ConfigError(_MSG_NEEDS_GRID)
    Wk, Hk = _without_dead_columns(W.detach().float(), H.detach().to(device=W.device, dtype=torch.float32))
    perm, R, lam, retries = _order_and_factor(Wk, Hk, order, grid, float(damp), int(max_retries))
    return LayerFactor(perm=perm, R=R, damp=lam, retries=retries)


def solve_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: WeightGrid,
    *,
    order: str = "sensitivity",
    damp: float = 0.01,
    block_size: int = 128,
    max_retries: int = 4,
    compute_loss: bool = True,
    factor: LayerFactor | None = None,
) -> SolverResult:
    """Quantize ``W [out, cols]`` onto ``grid`` minimising ``tr((W - Q) H (W - Q)ᵀ)``.

    ``order``: ``"sensitivity"`` (``Σ_i w_ij² H_jj``, default), ``"hessian-diag"`` (``H_jj``),
    ``"obs"`` (``Σ_i (w - q)² / [H⁻¹]_jj``) or ``"natural"``; most sensitive column first.
    If the Cholesky of the dampened H fails, ``damp`` is raised ×10 up to ``max_retries`` times
    (a :class:`DampingIncreasedWarning` each time), then :class:`HessianNotPositiveDefinite` is
    raised. ``factor``: the order and factor already made by :func:`factor_layer` (``order``,
    ``damp`` and ``max_retries`` are then not read). Computed in float32 on ``W``'s device, on
    all of torch's threads. ``compute_loss=False`` skips the result's ``loss`` (NaN; it costs
    ``2·out·cols²``, a third of the solve's arithmetic, and ``compress`` does not read it).

    The update without an inverse (module docstring, step 5). GPTQ, in solve order: with
    ``B⁻¹ = Uᵀ U`` and ``V = D_U⁻¹ U`` (rows of ``U`` over their diagonal, unit upper
    triangular), ``w'_k = w_k - Σ_{j<k} r_j V_jk`` with the residual ``r_j = w'_j - s·q_j``.
    Write ``e_j = w_j - s·q_j`` (the original column): then ``r (I + (V - I)) = e``, i.e. ``r = e V⁻¹``,
    and ``w' = w - r (V - I) = w - e (I - V⁻¹) = w + e (V⁻¹ - I)``. With ``U = R⁻¹`` (step 4),
    ``diag U = 1 / diag R`` and ``V⁻¹ = U⁻¹ D_U = R D_R⁻¹``, so
    ``w'_k = w_k + Σ_{j<k} e_j N_jk`` with ``N = R D_R⁻¹ - I``: the factor ``R`` itself, columns
    over their diagonal (``B = (I + N) D_R² (I + N)ᵀ``, the LDL form of QuIP, Chee et al. 2023).
    """
    _check_options(order, damp, max_retries)
    if int(block_size) < 1:
        raise ConfigError(_MSG_BLOCK.format(bs=block_size))
    _check_inputs(W, H, grid)
    device = W.device
    W0 = W.detach().float()
    H0 = H.detach().to(device=device, dtype=torch.float32)
    cols = W0.shape[1]
    block = grid.block
    scale = grid.scale.detach().to(device=device, dtype=torch.float32)
    scale = scale.reshape(-1) if block is None else scale
    qmax, qmin = int(grid.qmax), int(grid.qmin)

    Wk, Hk = _without_dead_columns(W0, H0, fix_hessian=factor is None)  # 1. (H only for a factor)
    if factor is None:  # 2.-4. order, then the one factor B = P A Pᵀ = R Rᵀ (more damping if needed)
        perm, R, lam, retries = _order_and_factor(Wk, Hk, order, WeightGrid(scale, qmax, grid.low, block),
                                                  float(damp), int(max_retries))
    elif tuple(factor.R.shape) != (cols, cols):
        raise ConfigError(f"solver: the factor is {tuple(factor.R.shape)} but the weight has {cols} columns")
    else:
        perm, R, lam, retries = factor.perm, factor.R, factor.damp, factor.retries

    # 5. N = R D_R⁻¹ - I (only its strict upper triangle is read); solve on Wᵀ, permuted.
    N = R / torch.diagonal(R).unsqueeze(0)
    Wt = Wk[:, perm].t().contiguous()                          # [cols, out]
    # Scale of each (column, row), permuted order: per row, the same [out] for every column;
    # per block, column j (original index perm[j]) uses its block's scales.
    St = None if block is None else column_scales(scale, cols, block)[:, perm].t().contiguous()
    if St is None:
        Wt /= scale                                            # per-row scale: solve in units of s
    codes_p = _quantize_columns(Wt, N, St, qmin, qmax, int(block_size)).t()

    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    qweight = dequantize(codes, scale, block)
    return SolverResult(
        codes=codes, qweight=qweight, damp_used=lam, order=perm,
        loss=layer_error(W0, qweight, H0) if compute_loss else float("nan"), retries=retries,
    )


def factor_flops(cols: int, order: str = "sensitivity") -> float:
    """Floating-point operations of :func:`factor_layer` (one damping try): the Cholesky
    (``cols³/3``); ``"obs"`` adds the unpermuted Cholesky and its triangular solve for
    ``diag(A⁻¹)`` (``cols³/3 + cols³``)."""
    return cols**3 / 3 + (4 * cols**3 / 3 if order == "obs" else 0.0)


def solve_flops(out: int, cols: int, order: str = "sensitivity", compute_loss: bool = True,
                factored: bool = False) -> float:
    """Floating-point operations of :func:`solve_layer` on ``W [out, cols]``: the factor
    (:func:`factor_flops`, unless ``factored``: given as ``factor=``), the column updates
    (``out·cols²``: a multiply-add per row and pair of columns) and the loss (``2·out·cols²``,
    with ``compute_loss``)."""
    flops = (3.0 if compute_loss else 1.0) * out * cols**2
    return flops if factored else flops + factor_flops(cols, order)


def retarget_flops(out: int, cols: int, factored: bool = False) -> float:
    """Floating-point operations of :func:`compensate_input_error` on ``W [out, cols]``:
    ``W (C − H)`` and the two triangular solves (``2·out·cols²`` each), plus the Cholesky
    (``cols³/3``) unless ``factored`` (the solver's factor given as ``factors=``)."""
    return 4.0 * out * cols**2 + (0.0 if factored else cols**3 / 3)


def rtn_layer(W: torch.Tensor, grid: WeightGrid, H: torch.Tensor | None = None) -> SolverResult:
    """Round to nearest on ``grid``: ``codes = clamp(round(w / s_c), qmin, qmax)``.

    ``loss`` uses ``H [cols, cols]`` when given, else ``Σ (W - Q)²``."""
    W0 = W.detach().float()
    _check_scale(grid, W0.shape[0], W0.shape[1])
    scale = grid.column_scales(W0.shape[1]).detach().to(device=W0.device, dtype=torch.float32)
    codes = quantize(W0, scale, int(grid.qmax), int(grid.qmin))
    qweight = dequantize(codes, scale)
    if H is None:
        loss = float((W0 - qweight).pow(2).sum())
    else:
        loss = layer_error(W0, qweight, H.detach().to(W0.device, torch.float32))
    return SolverResult(
        codes=codes, qweight=qweight, damp_used=0.0,
        order=torch.arange(W0.shape[1], device=W0.device), loss=loss,
    )


def compensate_input_error(
    W: torch.Tensor,
    H: torch.Tensor,
    C: torch.Tensor,
    *,
    damp: float = 0.01,
    max_retries: int = 4,
    factors: list[LayerFactor] | None = None,
) -> torch.Tensor:
    """The float target for a layer whose inputs already carry the prefix's quantization error.

    With ``X`` the layer's inputs from the quantized prefix and ``X_f`` the float model's,
    ``H = 2XXᵀ/N`` and ``C = 2X_fXᵀ/N`` (:meth:`HessianAccumulator.cross_moment`):

        ||W X_f − Q X||² = ||(W* − Q) X||² + const,   W* = W C H⁻¹,

    so solving toward ``W*`` with ``H`` minimises the error against the *float* output
    (the asymmetric target of GPTAQ). Written as a ridge step that shrinks toward ``W``:

        W* = W + W (C − H) A⁻¹,   A = H + λ·mean(diag H)·I

    (exactly ``W`` when ``X = X_f``). ``H``, ``C``: ``[cols, cols]``, or ``[G, cols, cols]``
    for grouped convs (rows ``k·out/G … (k+1)·out/G`` use conv group ``k``).

    ``factors``: the solver's :class:`LayerFactor` of each conv group (:func:`factor_layer`),
    so the solve that follows reuses the one Cholesky: ``P A Pᵀ = R Rᵀ`` gives
    ``A⁻¹ = Pᵀ R⁻ᵀ R⁻¹ P``, two triangular solves in solve order (``A`` is then the solver's
    Hessian: dead columns fixed, its damping). Without them, a Cholesky of ``A`` of its own.
    """
    H3 = H if H.dim() == 3 else H.unsqueeze(0)
    C3 = C if C.dim() == 3 else C.unsqueeze(0)
    if C3.shape != H3.shape or W.dim() != 2 or W.shape[0] % H3.shape[0] or W.shape[1] != H3.shape[-1]:
        raise ConfigError(
            f"compensate_input_error: weight {tuple(W.shape)}, Hessian {tuple(H.shape)} and cross "
            f"moment {tuple(C.shape)} do not match"
        )
    if factors is not None and len(factors) != H3.shape[0]:
        raise ConfigError(f"compensate_input_error: {len(factors)} factors for {H3.shape[0]} conv groups")
    W0 = W.detach().float()
    rows = W0.shape[0] // H3.shape[0]
    parts = []
    for k in range(H3.shape[0]):
        Hk = H3[k].to(device=W0.device, dtype=torch.float32)
        Ck = C3[k].to(device=W0.device, dtype=torch.float32)
        if not (_all_finite(Hk) and _all_finite(Ck)):
            raise ConfigError(_MSG_NONFINITE.format(what="Hessian or cross moment"))
        Wk = W0[k * rows:(k + 1) * rows]
        if torch.equal(Ck, Hk):  # inputs without upstream error (e.g. the first layer)
            parts.append(Wk.clone())
            continue
        M = Wk @ (Ck - Hk)                                      # W (C − H)
        if factors is None:
            L, _, _ = _damped_cholesky(Hk, damp, max_retries)
            delta_t = torch.cholesky_solve(M.t(), L)            # A Δᵀ = Mᵀ, A = L Lᵀ
        else:
            perm, R = factors[k].perm, factors[k].R
            # (R Rᵀ) Δ_Pᵀ = M_Pᵀ in solve order: R Y = M_Pᵀ, then Rᵀ Δ_Pᵀ = Y
            Y = torch.linalg.solve_triangular(R, M[:, perm].t(), upper=True)
            delta_t = torch.empty_like(Y)
            delta_t[perm] = torch.linalg.solve_triangular(R.t(), Y, upper=False)
        parts.append(Wk + delta_t.t())
    return torch.cat(parts)


def solve_conv_groups(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: WeightGrid,
    *,
    factors: list[LayerFactor] | None = None,
    **options: object,
) -> SolverResult:
    """Solve a grouped/depthwise conv: ``W [out, cols]``, ``H [G, cols, cols]`` (one per conv
    group); rows ``k·out/G … (k+1)·out/G`` use ``H[k]`` (and ``factors[k]``, from
    :func:`factor_conv_groups`, when given). ``options`` go to :func:`solve_layer`.

    ``order`` of the result is ``[G, cols]`` (one permutation per conv group), ``damp_used``
    the largest damping any group needed, ``loss`` the sum over groups.
    """
    if H.dim() == 2:
        H = H.unsqueeze(0)
    G = H.shape[0]
    out = W.shape[0]
    if H.dim() != 3 or out % G != 0:
        raise ConfigError(
            f"solve_conv_groups: weight {tuple(W.shape)} and Hessian {tuple(H.shape)} do not "
            "match: expected H of shape [G, cols, cols] with out_channels divisible by G"
        )
    rows = out // G
    parts = []
    for k in range(G):
        sl = slice(k * rows, (k + 1) * rows)
        rows_scale = grid.scale.reshape(-1)[sl] if grid.block is None else grid.scale[sl]
        sub = WeightGrid(scale=rows_scale, qmax=grid.qmax, low=grid.low, block=grid.block)
        factor = None if factors is None else factors[k]
        parts.append(solve_layer(W[sl], H[k], sub, factor=factor, **options))  # type: ignore[arg-type]
    return SolverResult(
        codes=torch.cat([p.codes for p in parts]),
        qweight=torch.cat([p.qweight for p in parts]),
        damp_used=max(p.damp_used for p in parts),
        order=torch.stack([p.order for p in parts]),
        loss=sum(p.loss for p in parts),
        retries=max(p.retries for p in parts),
    )


def factor_conv_groups(W: torch.Tensor, H: torch.Tensor, **options: object) -> list[LayerFactor]:
    """:func:`factor_layer` of each conv group: ``W [out, cols]``, ``H [cols, cols]`` or
    ``[G, cols, cols]`` (rows ``k·out/G … (k+1)·out/G`` use ``H[k]``)."""
    H3 = H if H.dim() == 3 else H.unsqueeze(0)
    if W.shape[0] % H3.shape[0]:
        raise ConfigError(_MSG_SHAPE.format(w=tuple(W.shape), h=tuple(H.shape)))
    rows = W.shape[0] // H3.shape[0]
    return [factor_layer(W[k * rows:(k + 1) * rows], H3[k], **options)  # type: ignore[arg-type]
            for k in range(H3.shape[0])]
