"""Where a layer's integer codes go in the file: pure rules, applied once.

``compress`` (and fine-tuning, when it re-quantizes at another width) calls :func:`layer_layout`
for every layer and stores the answer on the :class:`~fqexport.model.QuantizedLayer`; the
allocator prices a candidate width with the same rules; the exporter writes what the layer
holds and never decides again.

Containers (ORT-NOTES.md, docs/ort-kernels.md):

- ``"int8"``: int8 codes + ``DequantizeLinear`` — ORT fuses QLinearConv / QGemm /
  MatMulIntegerToFloat;
- ``"int4"`` / ``"int2"``: packed INT4 / INT2 codes behind a ``Cast`` to int8 that ORT folds at
  load, so the same fused int8 kernel runs from a 2-4x smaller file;
- ``"nbits"``: ORT's ``com.microsoft.MatMulNBits`` (4-bit codes in blocks of ``block_size``
  along K, one scale per block) for a Linear that maps one vector per sample;
- ``"int4-blocked"`` (the ``gpu`` target): INT4 codes ``[K, N]`` + a blocked ``DequantizeLinear``
  (opset 21 ``block_size`` along K, one scale per block) → ``MatMul``, the weight-only pattern
  ORT's CUDA EP fuses into MatMulNBits and TensorRT imports as INT4 weights. TensorRT takes INT4
  only there, and neither it nor the CUDA EP runs packed codes behind a ``Cast``: on the GPU
  every other layer is ``"int8"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fqexport.config import ExportSpec
from fqexport.errors import ConfigError

Container = Literal["int8", "int4", "int2", "nbits", "int4-blocked"]
CONTAINERS: tuple[str, ...] = get_args(Container)
# Containers with one scale per block of K (``LayerLayout.block_size``) when a row spans blocks.
BLOCKED_CONTAINERS = ("nbits", "int4-blocked")
# Containers whose layer runs weight-only (float activations in and out, no Q/DQ pairs of its own).
WEIGHT_ONLY_CONTAINERS = ("int4-blocked",)

# Bits per weight code on disk in each container (MatMulNBits is written at 4 bits).
CONTAINER_CODE_BITS = {"int8": 8, "int4": 4, "int2": 2, "nbits": 4, "int4-blocked": 4}


def stored_code_bits(container: str | None, bits: int) -> int:
    """Bits one ``bits``-wide code takes in ``container`` (``bits`` itself when it is not one)."""
    return CONTAINER_CODE_BITS.get(container or "", int(bits))


SCALE_BYTES = 4  # one fp32 scale (per channel; per block for MatMulNBits)
# Layer kinds whose int8-container weight keeps its zero point in the file (a Gemm/MatMul's and a
# ConvTranspose's: exporters/compact.py drops it only before a Conv, a Mul and a Gather; packed
# INT4/INT2 codes carry one for a Linear only)
ZERO_POINT_KINDS = ("linear", "conv_transpose")


def container_bytes(container: str, params: int, channels: int, kind: str, block_size: int) -> int:
    """Bytes the exporter writes for a weight of ``params`` codes in ``container``, scales and zero
    points included: int8 one byte per code; int4 / int2 two / four codes per byte behind a Cast;
    both with an fp32 scale per channel and, for a Linear, an int8 zero point per channel (ORT
    fuses QGemm only with it), for an int8 ConvTranspose too (:data:`ZERO_POINT_KINDS`; the zero
    point 0 of a conv's and an Embedding table's is left out); nbits (MatMulNBits) rows padded to whole
    blocks of ``block_size`` along K, two codes per byte, one fp32 scale per block; int4-blocked
    (the GPU) the codes two per byte, unpadded, one fp32 scale per (block, channel), no zero point."""
    n, p = max(int(channels), 1), int(params)
    if container == "int8":
        return p + (SCALE_BYTES + (kind in ZERO_POINT_KINDS)) * n
    if container in ("int4", "int2"):  # packed behind a Cast: a zero point for a Linear only
        return -(-p * CONTAINER_CODE_BITS[container] // 8) + (SCALE_BYTES + (kind == "linear")) * n
    blocks = -(-(p // n) // int(block_size))
    if container == "int4-blocked":
        return -(-p // 2) + SCALE_BYTES * n * blocks
    return n * blocks * (int(block_size) // 2 + SCALE_BYTES)


# MatMulNBits: blocks of a power of 2 >= 16 along K.
NBITS_BLOCKS = (16, 32, 64, 128, 256)
# Narrowest width given per-block scales. Measured with benchmarks/nbits_bench.py: per-block
# scales raised the 4-bit DeiT-tiny-shaped model's top-1 agreement with float from 92.19% to
# 94.14% (the demo MLP: 85.80% vs 85.70%, within noise) but lost at 2 bits (DeiT 89.84% ->
# 88.28%; MLP worst group 69.67% -> 67.33%).
MIN_BLOCK_SCALE_BITS = 3

MSG_CONTAINER = "layer '{name}': container={container!r} is not one of " + ", ".join(CONTAINERS)
MSG_BLOCKS = ("layer '{name}': per-block scales (block_size={block}) need the 'nbits' or 'int4-blocked' "
              "container, not {container!r}")


def token_linear(kind: str, macs: int, params: int) -> bool:
    """Whether a layer is a Linear applied to several vectors per sample (``[B, T, K]``: tokens,
    positions): it does more multiply-accumulates per sample than it has weights."""
    return kind == "linear" and int(macs) > int(params)


def nbits_block_size(k: int) -> int:
    """The MatMulNBits block that stores a K-long row in the fewest bytes: 4-bit codes padded
    to whole blocks + one float32 scale per block, ``ceil(K/bs) · (bs/2 + 4)``."""
    return min(NBITS_BLOCKS, key=lambda bs: (-(-k // bs)) * (bs // 2 + 4))


def layer_container(kind: str, bits: int, storage: str, tokens: bool = False, target: str = "portable") -> str:
    """Container of a ``kind`` layer's ``bits``-wide codes under ``storage`` for ``target``.

    ``"int8"`` storage: every layer in int8. ``"auto"`` / ``"packed"``: the narrowest — 2-bit
    codes INT2, 3-4-bit codes INT4 (both behind a Cast, int8 kernel), 3-4-bit Linears
    MatMulNBits; ``"auto"`` keeps a Linear over tokens (``tokens``, :func:`token_linear`) out of
    MatMulNBits (fp32 speed there, the int8 kernel 3-8x faster) and stores it INT4.
    The ``"gpu"`` target: 2-4-bit Linears ``"int4-blocked"`` (tokens or not: the GPU's
    weight-only kernel serves both), every other layer ``"int8"``.
    """
    if storage == "int8" or bits > 4:
        return "int8"
    if target == "gpu":
        return "int4-blocked" if kind == "linear" else "int8"
    if bits <= 2:
        return "int2"
    return "nbits" if kind == "linear" and not (tokens and storage == "auto") else "int4"


def scale_block_size(container: str, bits: int, cols: int) -> int | None:
    """Columns per weight scale: the MatMulNBits block when the codes go to MatMulNBits (or the
    GPU's blocked INT4 ``DequantizeLinear``) at 3-4 bits and a row spans more than one block
    (one scale per block is stored anyway, so the solver may choose each — GPTQ's groupsize — at
    no cost in bytes); ``None`` (one scale per row) otherwise."""
    if container not in BLOCKED_CONTAINERS or bits < MIN_BLOCK_SCALE_BITS:
        return None
    block = nbits_block_size(cols)
    return block if -(-cols // block) > 1 else None


@dataclass(frozen=True)
class LayerLayout:
    """A layer's container and weight-scale blocking, decided once (:func:`layer_layout`)."""

    container: str
    block_size: int | None = None  # columns per scale; None: one scale per output channel

    @property
    def weight_only(self) -> bool:
        """Whether the layer runs weight-only: float activations, no Q/DQ pairs of its own."""
        return self.container in WEIGHT_ONLY_CONTAINERS

    def check(self, name: str) -> None:
        """ConfigError naming ``name`` when the container is unknown or blocks lack a blocked container."""
        if self.container not in CONTAINERS:
            raise ConfigError(MSG_CONTAINER.format(name=name, container=self.container))
        if self.block_size is not None and self.container not in BLOCKED_CONTAINERS:
            raise ConfigError(MSG_BLOCKS.format(name=name, block=self.block_size, container=self.container))


def layer_layout(kind: str, bits: int, export: ExportSpec, cols: int, macs: int, params: int) -> LayerLayout:
    """The layout of a ``kind`` layer with ``cols`` inputs per output channel, ``macs``
    multiply-accumulates per sample and ``params`` weights, at ``bits`` for ``export`` (its
    storage and target)."""
    container = layer_container(kind, bits, export.storage, token_linear(kind, macs, params), export.target)
    return LayerLayout(container, scale_block_size(container, bits, cols))
