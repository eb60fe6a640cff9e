"""Traceable stand-ins for ``torch.nn`` attention modules whose Linear layers fx cannot see.

torch.fx treats every ``torch.nn`` module as a leaf: ``nn.MultiheadAttention`` (its q/k/v
projection is one ``in_proj_weight`` parameter, not a Linear), ``nn.TransformerEncoderLayer``
and ``nn.TransformerEncoder`` (no parameters of their own) would stay one opaque float call,
and tracing into them fails on their fast-path checks (``if src.dim() == 3 …``). Before
tracing, :func:`decompose_attention` swaps each for an equivalent module built from plain
``nn.Linear`` layers and ``F.scaled_dot_product_attention`` (same weights, same eval math), so
every projection and MLP Linear becomes a quantizable layer. Modules with features the stand-ins
do not model (``add_bias_kv``, ``add_zero_attn``, a non-default ``kdim``/``vdim`` without
separate weights) are left as they are and reported as float layers by the support check.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype):
    """``attn_mask`` [L, S] / [B·H, L, S] and ``key_padding_mask`` [B, S] (True/nonzero = ignore)
    as one additive float mask broadcastable to [B, H, L, S]; None when both are None.

    A leaf of the fx trace (``torch.fx.wrap`` below): it branches on the masks' dtype, which a
    traced mask (``ids == pad``, built in the forward) does not have yet."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    if key_padding_mask is not None:
        pad = key_padding_mask
        if pad.dtype == torch.bool:
            pad = torch.zeros_like(pad, dtype=dtype).masked_fill(pad, float("-inf"))
        pad = pad[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


torch.fx.wrap("_additive_mask")


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (eval) with separate ``q_proj``/``k_proj``/``v_proj`` Linears."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.batch_first = h, e // h, mha.batch_first
        bias = mha.in_proj_bias
        self.q_proj = nn.Linear(e, e, bias=bias is not None)
        self.k_proj = nn.Linear(mha.kdim, e, bias=bias is not None)
        self.v_proj = nn.Linear(mha.vdim, e, bias=bias is not None)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w, i in ((self.q_proj, wq, 0), (self.k_proj, wk, 1), (self.v_proj, wv, 2)):
                proj.weight.copy_(w)
                if bias is not None:
                    proj.bias.copy_(bias.detach()[i * e:(i + 1) * e])
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, E] -> [B, H, L, D]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        # decided on the masks given, not on ``mask``: traced, the leaf's output is a Proxy, never None
        masked = attn_mask is not None or key_padding_mask is not None
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype) if masked else None
        weights = None
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if masked:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(probs, v)
            weights = probs.mean(dim=1) if average_attn_weights else probs
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and not masked)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (eval): the same submodules, a traceable forward.

    A sequence-first layer (``batch_first=False``) transposes once at entry and exit, so every
    Linear inside sees ``[batch, tokens, features]`` (the batch first, as the Hessian and the
    group-aware observers need).
    """

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.batch_first = layer.self_attn.batch_first
        self.self_attn = SplitAttention(layer.self_attn)
        self.self_attn.batch_first = True
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.norm_first = layer.norm_first
        self.activation = layer.activation

    def _sa(self, x, mask, pad, is_causal):
        return self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False, attn_mask=mask,
                              is_causal=is_causal)[0]

    def _ff(self, x):
        return self.linear2(self.activation(self.linear1(x)))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src if self.batch_first else src.transpose(0, 1)
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff(self.norm2(x))
        else:
            x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff(x))
        return x if self.batch_first else x.transpose(0, 1)


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (eval) over :class:`EncoderLayer` stand-ins."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(l) if _encoder_layer_ok(l) else l for l in encoder.layers)
        self.norm = encoder.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return self.norm(x) if self.norm is not None else x


def _attention_ok(mha: nn.Module) -> bool:
    return (
        type(mha) is nn.MultiheadAttention and mha.bias_k is None and not mha.add_zero_attn
        and mha.embed_dim % mha.num_heads == 0
    )


def _encoder_layer_ok(layer: nn.Module) -> bool:
    return type(layer) is nn.TransformerEncoderLayer and _attention_ok(layer.self_attn)


def _stand_in(mod: nn.Module) -> nn.Module | None:
    if type(mod) is nn.TransformerEncoder and all(_encoder_layer_ok(l) for l in mod.layers):
        return Encoder(mod)
    if _encoder_layer_ok(mod):
        return EncoderLayer(mod)
    if _attention_ok(mod):
        return SplitAttention(mod)
    return None


def decompose_attention(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Swap attention modules of ``model`` (in place) for traceable stand-ins.

    Returns the model and the names of the swapped modules (the root itself is never swapped:
    it is the classifier whose forward takes the one input).
    """
    swapped = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if any(full.startswith(f"{done}.") for done in swapped):
                continue  # inside a module already replaced
            new = _stand_in(child)
            if new is not None:
                setattr(mod, child_name, new.eval())
                swapped.append(full)
    return model, swapped
