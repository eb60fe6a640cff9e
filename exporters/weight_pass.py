"""Pass 2 of the export: every quantized layer's float weight initializer → its container.

For each :class:`~fqexport.model.QuantizedLayer` the pass finds the float initializer torch
exported for its weight (by name, else by value — torch may have transposed it), checks that it
holds the layer's dequantized weight, and applies the rule of the container the layer holds
(decided once in compress, :mod:`fqexport.quant.layout`): :mod:`.weight_int8`,
:mod:`.weight_packed`, :mod:`.weight_nbits` or :mod:`.weight_blocked` (the GPU's INT4). The new
``DequantizeLinear`` outputs the old initializer's name, so the layer's op is unchanged
(MatMulNBits replaces it; a Gemm over blocked INT4 becomes MatMul + Add).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from fqexport.errors import ExportError
from fqexport.exporters.weight_blocked import blocked_int4_weight
from fqexport.exporters.weight_int8 import int8_weight
from fqexport.exporters.weight_nbits import matmul_nbits
from fqexport.exporters.weight_packed import packed_weight

if TYPE_CHECKING:  # pragma: no cover
    from fqexport.model import QuantizedLayer

MSG_NO_WEIGHT = (
    "layer '{name}': its weight was not found in the exported ONNX graph (by name '{name}.weight' "
    "or by value); the exporter may have rewritten it"
)
MSG_WEIGHT_DIFFERS = "layer '{name}': the exported weight differs from the quantized weight (max diff {diff:.3g})"


def find_weight(inits: Mapping[str, TensorProto], layer: "QuantizedLayer",
                expected: np.ndarray) -> tuple[TensorProto, bool]:
    """The initializer holding ``layer``'s weight (dequantized: ``expected``) and whether torch
    stored it transposed (``[K, N]`` for a MatMul)."""
    init = inits.get(f"{layer.name}.weight")
    if init is not None:
        return init, False
    flat = expected.reshape(expected.shape[0], -1)
    for cand in inits.values():
        if cand.data_type != TensorProto.FLOAT or cand.dims == [] or np.prod(cand.dims) != expected.size:
            continue
        arr = numpy_helper.to_array(cand)
        if arr.shape == expected.shape and np.allclose(arr, expected, atol=1e-6):
            return cand, False
        if arr.ndim == 2 and arr.shape == flat.T.shape and np.allclose(arr, flat.T, atol=1e-6):
            return cand, True
    raise ExportError(MSG_NO_WEIGHT.format(name=layer.name))


def positive_scales(codes: np.ndarray, scale: np.ndarray, axis: int = 0,
                    block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scale)`` with channels (along ``axis``) of negative scale negated:
    ``s·q = |s|·(−q)`` per channel (per block with ``block``)."""
    if block is not None:  # per-block scales [N, blocks] of codes [N, K]: a sign per block
        sign = np.repeat(np.where(scale < 0, -1, 1), block, axis=1)[:, :codes.shape[1]].astype(codes.dtype)
        return codes * sign, np.abs(scale).astype(np.float32)
    shape = [1] * codes.ndim
    shape[axis] = -1
    sign = np.where(scale < 0, -1, 1).astype(codes.dtype)
    return codes * sign.reshape(shape), np.abs(scale).astype(np.float32)


def quantize_weight_initializers(model: onnx.ModelProto, layers: Mapping[str, "QuantizedLayer"]) -> dict[str, str]:
    """Rewrite every layer's float weight into its container (in place); returns the container
    written per layer (each layer's own ``container``)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, used = [], {}
    for layer in layers.values():
        dequantized = layer.dequantized().numpy()
        init, transposed = find_weight(inits, layer, dequantized)
        # a ConvTranspose weight [C_in, C_out, kh, kw] has its output channels on axis 1
        channel_axis = 1 if layer.kind == "conv_transpose" else 0
        codes, scale = layer.codes.numpy(), layer.scale.numpy().astype(np.float32)
        if layer.container != "int2":
            # 2-bit rows with a negative scale (levels mirrored): the same weight as codes −q,
            # scale |s|, so DequantizeLinear sees positive scales (codes −1..2 fit int8 / INT4).
            # INT2 keeps q in [−2, 1] and the signed scale (ORT's fused kernels take it as is).
            codes, scale = positive_scales(codes, scale, channel_axis, layer.block_size)
        graph.initializer.remove(init)
        del inits[init.name]
        used[layer.name] = layer.container
        if layer.container in ("nbits", "int4-blocked"):  # rules that replace the Linear's op
            rule = matmul_nbits if layer.container == "nbits" else blocked_int4_weight
            graph.initializer.extend(rule(graph, layer.name, init.name, codes.reshape(codes.shape[0], -1), scale))
            continue
        if transposed:  # MatMul(A, W[K, N]): codes [N, K] → [K, N], channels on axis 1
            codes, dq_axis = codes.reshape(codes.shape[0], -1).T, 1
        else:
            dq_axis = channel_axis
            actual = numpy_helper.to_array(init)
            if not np.allclose(actual, dequantized, atol=1e-5 * max(1.0, float(np.abs(dequantized).max()))):
                raise ExportError(MSG_WEIGHT_DIFFERS.format(name=layer.name, diff=float(np.abs(actual - dequantized).max())))
        base = f"{layer.name}.weight"  # new values named after the layer (torch may have named it ``val_12``)
        if layer.container == "int8":
            new_inits, nodes = int8_weight(base, init.name, codes, scale, dq_axis)
        else:
            new_inits, nodes = packed_weight(base, init.name, codes, scale, dq_axis, layer.container,
                                             zero_point=layer.kind == "linear")
        new_nodes.extend(nodes)
        graph.initializer.extend(new_inits)
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return used
