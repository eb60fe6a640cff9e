"""Group-weighted layer Hessians accumulated from a layer's inputs, streamed over batches (the
pipeline's hooks feed :meth:`HessianAccumulator.add`; no hooks here).

For one Conv1d/Conv2d/Linear layer with input rows ``x`` (Linear: one row per sample and leading
position; Conv2d: one row per unfolded patch; Conv1d: one row per window of ``k`` positions, taken
as a Conv2d with kernel ``(1, k)`` on a ``[B, C, 1, L]`` view), data group ``g`` contributes

    H_g = 2 · Σ_{x ∈ g} x xᵀ / N_g          (N_g = rows of group g)

and the layer Hessian is ``H = Σ_g α_g H_g`` with ``Σ α_g = 1`` over the groups present;
by default ``α_g = 1 / G_present``, so a 10 % minority counts as much as the majority.
Only the running sums ``Σ x xᵀ`` and counts are kept, never the activations.

With ``cross=True`` the accumulator also takes the *float* model's input ``x_f`` of the same
layer for each row ``x`` of the quantized prefix and keeps ``C = Σ_g α_g 2 Σ x_f xᵀ / N_g``:
the cross moment behind the asymmetric target ``min_Q ||W X_f − Q X||²`` (see
:func:`fqexport.quant.solver.compensate_input_error`).

Accumulation dtype: each batch's ``Xᵀ X`` is a float32 matmul (fast, and its rounding error
is relative to one batch), added into float64 running sums: over 10⁵–10⁶ patch rows a
float32 running sum would lose about log10(#batches) digits of the small entries, while
float64 costs only the memory of the sums (``num_groups · cols²`` · 8 bytes per layer).
Pass ``accum_dtype=torch.float32`` to halve that memory for very wide layers.

ConvTranspose2d ``(x; W[C_in, C_out/G, kh, kw], stride s, padding p, output_padding op,
dilation d)`` is the Conv2d with stride 1 and dilation d of the *zero-inserted* input (s−1 zeros
between input pixels), padded by ``d·(k−1)−p`` on top/left and ``d·(k−1)−p+op`` on bottom/right
(negative: cropped), with the kernel flipped and its channel axes swapped,
``W'[co, ci, i, j] = W[ci, co, k−1−i, k−1−j]`` (:func:`conv_transpose_rows`). Its rows are that
conv's unfolded patches, its columns W''s ``[C_in/G, kh, kw]`` order; the solver quantizes W' row
by row (one row per output channel) and :func:`conv_transpose_weight` maps codes back.

Grouped convs (``groups = G > 1``, depthwise included) get one Hessian per conv group:
``[G, cols, cols]`` with ``cols = in_channels/G · kh · kw``; solve them with
:func:`fqexport.quant.solver.solve_conv_groups`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from fqexport.errors import ConfigError, DataError, UnsupportedLayerError
from fqexport.quant.per_group import per_sample, row_groups

log = logging.getLogger(__name__)

# Unfold at most this many elements at once (splits a conv batch into chunks of samples).
_UNFOLD_CHUNK_ELEMS = 1 << 25

_MSG_LAYER = (
    "hessian: layer {name!r} is a {kind}; only torch.nn.Linear, torch.nn.Conv1d, "
    "torch.nn.Conv2d and torch.nn.ConvTranspose2d layers get a Hessian (leave it in float with skip_unsupported=True)"
)
_MSG_INPUT = (
    "hessian: layer {name!r} ({kind}) got an input of shape {shape}; expected {expected}"
)
_MSG_GROUP = (
    "hessian: layer {name!r}: group labels must be an integer tensor of shape [{b}] with "
    "values in [0, {g}); got shape {shape}, range {lo}..{hi}"
)
_MSG_EMPTY = (
    "hessian: layer {name!r} saw no calibration inputs{extra}; check that the calibration "
    "batches reach this layer and that group weights are not all zero on the groups present"
)
_MSG_FLOAT_INPUT = (
    "hessian: layer {name!r} collects the float model's inputs too (cross=True): each batch "
    "needs float_inputs of the input's shape {shape}; got {got}"
)
_MSG_WEIGHTS = (
    "hessian: group_weights must be {g} finite values >= 0 (one per group id); got {got}"
)


def _conv2d_view(module: nn.Conv1d | nn.Conv2d) -> nn.Conv2d:
    """The Conv2d that computes ``module`` on a ``[B, C, 1, L]`` view (Conv1d: kernel ``(1, k)``,
    same stride/padding/dilation along the width); a Conv2d is returned as is. Only its geometry
    is read (no weight is copied)."""
    if isinstance(module, nn.Conv2d):
        return module
    pad = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
    return nn.Conv2d(
        module.in_channels, module.out_channels, (1, module.kernel_size[0]), stride=(1, module.stride[0]),
        padding=pad, dilation=(1, module.dilation[0]), groups=module.groups, bias=False,
        padding_mode=module.padding_mode, device="meta",
    )


def conv_transpose_rows(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A ConvTranspose2d weight ``W[C_in, C_out/G, kh, kw]`` as the rows of its equivalent conv:
    ``W'[co, ci, i, j] = W[ci, co, kh−1−i, kw−1−j]`` per conv group, flattened to
    ``[C_out, C_in/G · kh · kw]`` (one row per output channel; the columns follow the rows of
    :class:`HessianAccumulator` for the layer)."""
    cin, cout_g, kh, kw = weight.shape
    w = weight.reshape(groups, cin // groups, cout_g, kh, kw).transpose(1, 2).flip(-2, -1)
    return w.reshape(groups * cout_g, -1)


def conv_transpose_weight(rows: torch.Tensor, shape: tuple[int, ...] | torch.Size, groups: int = 1) -> torch.Tensor:
    """Inverse of :func:`conv_transpose_rows`: rows ``[C_out, C_in/G · kh · kw]`` (weights or
    codes) back to the ConvTranspose2d layout ``shape = [C_in, C_out/G, kh, kw]``."""
    cin, cout_g, kh, kw = shape
    w = rows.reshape(groups, cout_g, cin // groups, kh, kw).flip(-2, -1).transpose(1, 2)
    return w.reshape(cin, cout_g, kh, kw)


def conv_transpose_input(x: torch.Tensor, module: nn.ConvTranspose2d) -> torch.Tensor:
    """The input of the stride-1 Conv2d equivalent to ``module`` on ``x`` ``[B, C, H, W]``:
    ``stride − 1`` zeros inserted between pixels, then padded by ``d·(k−1)−p`` (top/left) and
    ``d·(k−1)−p+op`` (bottom/right); a negative pad crops. ``F.conv2d(conv_transpose_input(x,
    m), W', dilation=m.dilation, groups=m.groups)`` equals ``m(x)`` with ``W'`` from
    :func:`conv_transpose_rows`."""
    (sh, sw), (kh, kw) = module.stride, module.kernel_size
    (dh, dw), (ph, pw) = module.dilation, module.padding
    oph, opw = module.output_padding
    B, C, H, W = x.shape
    if sh > 1 or sw > 1:
        z = x.new_zeros(B, C, (H - 1) * sh + 1, (W - 1) * sw + 1)
        z[:, :, ::sh, ::sw] = x
        x = z
    top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    return F.pad(x, (left, left + opw, top, top + oph))


def _conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` zero/mode padding of a Conv2d, ``"same"``/``"valid"``
    resolved the way ``nn.Conv2d`` does (odd total padding: the extra goes right/bottom)."""
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    pad = module.padding
    if pad == "valid":
        return 0, 0, 0, 0
    if pad == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = pad  # type: ignore[misc]
    return pw, pw, ph, ph


def _conv_transpose_view(module: nn.ConvTranspose2d) -> nn.Conv2d:
    """The stride-1 Conv2d (kernel, dilation, groups of ``module``; no padding) that computes
    ``module`` on :func:`conv_transpose_input`. Only its geometry is read."""
    return nn.Conv2d(
        module.in_channels, module.out_channels, module.kernel_size, dilation=module.dilation,
        groups=module.groups, bias=False, device="meta",
    )


class HessianAccumulator:
    """Running per-group sums ``Σ x xᵀ`` and row counts of one Linear/Conv2d layer's inputs."""

    def __init__(
        self,
        module: nn.Module,
        num_groups: int,
        *,
        name: str = "<layer>",
        accum_dtype: torch.dtype = torch.float64,
        cross: bool = False,
    ) -> None:
        if isinstance(module, nn.Linear):
            self.kind = "Linear"
            self.conv_groups = 1
            self.cols = module.in_features
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            # Conv1d: rows from its Conv2d twin on a [B, C, 1, L] view (kernel (1, k)), so the
            # columns keep the weight's [C/G, k] order.
            self.kind = "Conv1d" if isinstance(module, nn.Conv1d) else "Conv2d"
            self.conv_groups = int(module.groups)
            self.cols = module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.ConvTranspose2d):
            # rows of the equivalent stride-1 conv on the zero-inserted, padded input
            self.kind = "ConvTranspose2d"
            self.conv_groups = int(module.groups)
            self.cols = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            raise UnsupportedLayerError(_MSG_LAYER.format(name=name, kind=type(module).__name__))
        if int(num_groups) < 1:
            raise ConfigError(f"hessian: num_groups={num_groups!r} must be >= 1")
        self.module = module
        self._conv = (None if self.kind == "Linear" else _conv_transpose_view(module)
                      if self.kind == "ConvTranspose2d" else _conv2d_view(module))
        self.name = name
        self.num_groups = int(num_groups)
        self.accum_dtype = accum_dtype
        self._sums: torch.Tensor | None = None  # [num_groups, conv_groups, cols, cols]
        self._started = [False] * self.num_groups  # group g's sums hold data (else unset memory)
        self.cross = bool(cross)
        self._cross_sums: torch.Tensor | None = None  # Σ x_f xᵀ, same shape
        self.counts = torch.zeros(self.num_groups, dtype=torch.int64)   # rows per group
        self.samples = torch.zeros(self.num_groups, dtype=torch.int64)  # batch items per group

    # ------------------------------------------------------------------ inputs → rows
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Input batch → ``[B, conv_groups, rows_per_item, cols]`` float32."""
        m = self.module
        if self.kind == "Linear":
            if x.dim() < 2 or x.shape[-1] != self.cols:
                raise DataError(_MSG_INPUT.format(
                    name=self.name, kind=self.kind, shape=tuple(x.shape),
                    expected=f"[B, ..., {self.cols}]"))
            return x.float().reshape(x.shape[0], 1, -1, self.cols)
        conv1d = self.kind == "Conv1d"
        if x.dim() != (3 if conv1d else 4) or x.shape[1] != m.in_channels:
            raise DataError(_MSG_INPUT.format(
                name=self.name, kind=self.kind, shape=tuple(x.shape),
                expected=f"[B, {m.in_channels}, L]" if conv1d else f"[B, {m.in_channels}, H, W]"))
        x = x.float().unsqueeze(2) if conv1d else x.float()
        if self.kind == "ConvTranspose2d":
            x = conv_transpose_input(x, m)
        m = self._conv
        left, right, top, bottom = _conv_padding(m)
        if m.dilation == (1, 1):
            # Strided windows, one copy straight into the [B, G, L, cols] row layout (the
            # weight's (channel, kh, kw) column order): 2-4x faster than im2col + transposes.
            if left or right or top or bottom:
                mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                x = F.pad(x, (left, right, top, bottom), mode=mode)
            (kh, kw), (sh, sw) = m.kernel_size, m.stride
            win = x.unfold(2, kh, sh).unfold(3, kw, sw)           # [B, C, oh, ow, kh, kw]
            B, C, oh, ow = win.shape[:4]
            win = win.reshape(B, self.conv_groups, C // self.conv_groups, oh, ow, kh, kw)
            return win.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, self.conv_groups, oh * ow, self.cols)
        if m.padding_mode != "zeros" or left != right or top != bottom:
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, (left, right, top, bottom), mode=mode)
            padding: tuple[int, int] = (0, 0)
        else:
            padding = (top, left)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        # unfold rows are (channel, kh, kw) channel-major = the weight's [C/G, kh, kw] layout.
        B, _, L = cols.shape
        return cols.reshape(B, self.conv_groups, self.cols, L).transpose(2, 3)

    def _chunk(self, x: torch.Tensor) -> int:
        """Batch items per unfold chunk (bounds the memory of unfolded conv inputs)."""
        if self.kind == "Linear" or x.dim() not in (3, 4):
            return max(1, x.shape[0])
        m = self._conv
        kh, kw = m.kernel_size
        spatial = math.prod(x.shape[2:])
        if self.kind == "ConvTranspose2d":  # rows of the zero-inserted input: stride² more
            spatial *= math.prod(self.module.stride)
        per_item = m.in_channels * kh * kw * spatial // (m.stride[0] * m.stride[1])
        return max(1, _UNFOLD_CHUNK_ELEMS // max(1, per_item))

    def add(self, inputs: torch.Tensor, group: torch.Tensor, float_inputs: torch.Tensor | None = None) -> None:
        """Add one batch: ``inputs`` is the layer's input, ``group[b]`` the data group of item b.

        ``float_inputs``: the float model's input of the same layer for the same batch
        (required when the accumulator was made with ``cross=True``).
        """
        group = torch.as_tensor(group).reshape(-1)
        inputs = per_sample(inputs.detach(), group.numel())  # a batch-independent input: every sample's
        if float_inputs is not None:
            float_inputs = per_sample(float_inputs, group.numel())
        B = inputs.shape[0] if inputs.dim() > 0 else 0
        group = row_groups(group, B)  # k rows per sample folded in the batch
        lo = int(group.min()) if group.numel() else 0
        hi = int(group.max()) if group.numel() else 0
        if (group.numel() != B or group.dtype.is_floating_point or group.dtype == torch.bool
                or lo < 0 or hi >= self.num_groups):
            raise DataError(_MSG_GROUP.format(
                name=self.name, b=B, g=self.num_groups, shape=tuple(group.shape), lo=lo, hi=hi))
        if self.cross and (float_inputs is None or tuple(float_inputs.shape) != tuple(inputs.shape)):
            got = None if float_inputs is None else tuple(float_inputs.shape)
            raise DataError(_MSG_FLOAT_INPUT.format(name=self.name, shape=tuple(inputs.shape), got=got))
        group = group.to(torch.int64)
        device = inputs.device
        if self._sums is None:
            shape = (self.num_groups, self.conv_groups, self.cols, self.cols)
            # no zero fill: a group's first product is copied in (_add_product)
            self._sums = torch.empty(shape, dtype=self.accum_dtype, device=device)
            if self.cross:
                self._cross_sums = torch.empty(shape, dtype=self.accum_dtype, device=device)
        step = self._chunk(inputs)
        for s in range(0, B, step):
            g_chunk = group[s:s + step]
            x_chunk = inputs[s:s + step]
            xf_chunk = float_inputs[s:s + step].detach() if self.cross else None
            if bool((g_chunk[1:] < g_chunk[:-1]).any()):
                # items of one group next to each other: each group's rows are then a slice
                # (same rows in the same order as a mask would pick, without the copy)
                order = torch.argsort(g_chunk, stable=True)
                g_chunk = g_chunk[order]
                x_chunk = x_chunk[order.to(device)]
                xf_chunk = xf_chunk[order.to(device)] if xf_chunk is not None else None
            rows = self._rows(x_chunk)                               # [b, G, L, cols]
            rows_f = self._rows(xf_chunk) if xf_chunk is not None else None
            groups, counts = torch.unique_consecutive(g_chunk, return_counts=True)
            start = 0
            for g, n in zip(groups.tolist(), counts.tolist()):
                Xg = self._group_rows(rows[start:start + n])
                # Σ x xᵀ for this group's rows, per conv group: [G, cols, cols]
                first = not self._started[g]
                self._add_product(self._sums[g], Xg.transpose(1, 2) @ Xg, first)
                if rows_f is not None:
                    # Σ x_f xᵀ: float-model rows against quantized-prefix rows
                    Xf = self._group_rows(rows_f[start:start + n])
                    self._add_product(self._cross_sums[g], Xf.transpose(1, 2) @ Xg, first)
                self._started[g] = True
                self.counts[g] += Xg.shape[1]
                self.samples[g] += n
                start += n

    @staticmethod
    def _add_product(sums: torch.Tensor, product: torch.Tensor, first: bool) -> None:
        """``sums += product`` in the accumulation dtype; the first product is copied in
        (``0 + x = x``: the same sums without a zero fill and an add)."""
        if first:
            sums.copy_(product)
        else:
            sums += product.to(sums.dtype)

    def _sums_of(self, sums: torch.Tensor) -> torch.Tensor:
        """``sums`` with the groups that never got a row set to 0 (their memory is unset)."""
        for g, started in enumerate(self._started):
            if not started:
                sums[g] = 0
        return sums

    def _group_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``[b, G, L, cols]`` rows of one group's items → ``[G, rows, cols]`` (contiguous)."""
        return rows.transpose(0, 1).reshape(self.conv_groups, -1, self.cols).contiguous()

    # ------------------------------------------------------------------ Hessians
    def _finish(self, H: torch.Tensor) -> torch.Tensor:
        H = H.float()
        return H[0] if self.conv_groups == 1 else H

    def group_hessian(self, g: int) -> torch.Tensor:
        """``H_g = 2 Σ_{x∈g} x xᵀ / N_g`` (``[cols, cols]``, or ``[G, cols, cols]`` for grouped convs)."""
        if self._sums is None or int(self.counts[g]) == 0:
            raise DataError(_MSG_EMPTY.format(name=self.name, extra=f" from group {g}"))
        return self._finish(2.0 * self._sums[g] / int(self.counts[g]))

    def _coefficients(self, group_weights: torch.Tensor | None) -> torch.Tensor:
        """Per-group ``2 α_g / N_g`` (0 for absent groups), α normalised over groups present."""
        present = self.counts > 0
        if group_weights is None:
            alpha = present.double()
        else:
            alpha = torch.as_tensor(group_weights, dtype=torch.float64).reshape(-1).cpu()
            if (alpha.numel() != self.num_groups or not bool(torch.isfinite(alpha).all())
                    or bool((alpha < 0).any())):
                raise ConfigError(_MSG_WEIGHTS.format(g=self.num_groups, got=alpha.tolist()))
            alpha = alpha * present.double()
        if self._sums is None or float(alpha.sum()) <= 0:
            raise DataError(_MSG_EMPTY.format(name=self.name, extra=""))
        alpha = alpha / alpha.sum()
        coef = torch.where(present, 2.0 * alpha / self.counts.clamp_min(1).double(),
                           torch.zeros_like(alpha))
        return coef.to(device=self._sums.device, dtype=self._sums.dtype)

    def hessian(self, group_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``H = Σ_g α_g · 2 X_g X_gᵀ / N_g``, α normalised to sum 1 over the groups present.

        ``group_weights`` (``[num_groups]``, >= 0): α before normalisation; default equal for
        every group present. Groups with ``N_g = 0`` are skipped and α renormalised without them.
        """
        coef = self._coefficients(group_weights)
        return self._finish(torch.einsum("g,gkij->kij", coef, self._sums_of(self._sums)))

    def cross_moment(self, group_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``C = Σ_g α_g · 2 X_{f,g} X_gᵀ / N_g`` (float-model rows × quantized-prefix rows),
        weighted exactly like :meth:`hessian`; needs ``cross=True``."""
        if not self.cross:
            raise ConfigError(f"hessian: layer {self.name!r}: cross_moment needs an accumulator made with cross=True")
        coef = self._coefficients(group_weights)
        return self._finish(torch.einsum("g,gkij->kij", coef, self._sums_of(self._cross_sums)))

    def hessian_sample_weighted(self) -> torch.Tensor:
        """Plain GPTQ Hessian ``2 X Xᵀ / N`` over all rows (a majority group dominates)."""
        n = int(self.counts.sum())
        if self._sums is None or n == 0:
            raise DataError(_MSG_EMPTY.format(name=self.name, extra=""))
        return self._finish(2.0 * self._sums_of(self._sums).sum(dim=0) / n)
