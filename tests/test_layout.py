"""Tests of fqexport/quant/layout.py: the container and scale blocking of a layer, decided once."""

from __future__ import annotations

import pytest

from fqexport.config import ExportSpec
from fqexport.errors import ConfigError
from fqexport.quant.layout import (
    LayerLayout,
    layer_container,
    layer_layout,
    nbits_block_size,
    scale_block_size,
    token_linear,
)

K, N = 192, 24  # a Linear(192, 24): 4608 weights


def _layout(kind: str, bits: int, storage: str, cols: int = K, tokens: int = 1, target: str = "portable") -> LayerLayout:
    params = cols * N
    return layer_layout(kind, bits, ExportSpec(target=target, storage=storage), cols, macs=tokens * params, params=params)


def test_nbits_block_size_minimises_bytes():
    # bytes per row: ceil(K/bs) * (bs/2 + 4)
    assert nbits_block_size(16) == 16  # 12 B
    assert nbits_block_size(192) == 64  # 3 x 36 = 108 B (128: 2 x 68 = 136; 256: 132)
    assert nbits_block_size(768) == 256  # 3 x 132 = 396 B (128: 6 x 68 = 408)


def test_token_linear_is_a_linear_with_more_macs_than_weights():
    assert token_linear("linear", 8 * 4608, 4608) and not token_linear("linear", 4608, 4608)
    assert not token_linear("conv", 100 * 4608, 4608)


@pytest.mark.parametrize("storage", ["auto", "packed", "int8"])
def test_containers_by_width_and_storage(storage):
    assert layer_container("conv", 8, storage) == "int8"
    assert layer_container("conv", 5, storage) == "int8"
    narrow = storage != "int8"
    assert layer_container("conv", 4, storage) == ("int4" if narrow else "int8")
    assert layer_container("conv", 2, storage) == ("int2" if narrow else "int8")
    assert layer_container("linear", 3, storage) == ("nbits" if narrow else "int8")
    assert layer_container("linear", 2, storage) == ("int2" if narrow else "int8")
    # a Linear over tokens: auto keeps it on the int8 kernel (INT4 + Cast), packed goes MatMulNBits
    assert layer_container("linear", 4, storage, tokens=True) == {"auto": "int4", "packed": "nbits", "int8": "int8"}[storage]


def test_block_size_only_for_multi_block_nbits_linears():
    assert _layout("linear", 4, "auto") == LayerLayout("nbits", 64)
    assert _layout("linear", 3, "auto", cols=768) == LayerLayout("nbits", 256)
    assert _layout("linear", 2, "auto", cols=768) == LayerLayout("int2")  # 2 bits: per-block scales lost accuracy
    assert _layout("linear", 4, "auto", cols=16) == LayerLayout("nbits")  # one block: a per-row scale
    assert _layout("linear", 4, "int8") == LayerLayout("int8")
    assert _layout("linear", 8, "auto") == LayerLayout("int8")
    assert _layout("conv", 4, "packed") == LayerLayout("int4")
    assert _layout("linear", 2, "packed") == LayerLayout("int2")  # INT2, per-row
    assert _layout("linear", 4, "packed", tokens=8) == LayerLayout("nbits", 64)
    assert _layout("linear", 4, "auto", tokens=8) == LayerLayout("int4")  # auto: token Linears on the int8 kernel
    assert scale_block_size("int4", 4, 768) is None and scale_block_size("nbits", 4, 768) == 256


def test_a_layout_that_cannot_be_written_is_refused_naming_the_layer():
    with pytest.raises(ConfigError, match=r"^layer 'fc': container='int3' is not one of int8, int4, int2, nbits, "
                                          r"int4-blocked$"):
        LayerLayout("int3").check("fc")
    with pytest.raises(ConfigError, match=r"^layer 'fc': per-block scales \(block_size=64\) need the 'nbits' or "
                                          r"'int4-blocked' container, not 'int8'$"):
        LayerLayout("int8", 64).check("fc")


@pytest.mark.parametrize("storage", ["auto", "packed"])
def test_gpu_target_stores_narrow_linears_blocked_int4_and_everything_else_int8(storage):
    # TensorRT takes INT4 only as blocked weights of a MatMul; neither it nor the CUDA EP runs a Cast of packed codes
    assert layer_container("linear", 4, storage, target="gpu") == "int4-blocked"
    assert layer_container("linear", 2, storage, target="gpu") == "int4-blocked"  # 2-bit codes in INT4
    assert layer_container("linear", 4, storage, tokens=True, target="gpu") == "int4-blocked"
    assert layer_container("linear", 8, storage, target="gpu") == "int8"
    for kind in ("conv", "conv_transpose", "embedding"):
        assert layer_container(kind, 4, storage, target="gpu") == "int8"
        assert layer_container(kind, 2, storage, target="gpu") == "int8"
    assert layer_container("linear", 4, "int8", target="gpu") == "int8"
    # per-block scales as for MatMulNBits (the kernel the CUDA EP fuses the pattern into)
    assert _layout("linear", 4, storage, target="gpu") == LayerLayout("int4-blocked", 64)
    assert _layout("linear", 4, storage, tokens=8, target="gpu") == LayerLayout("int4-blocked", 64)
    assert _layout("linear", 4, storage, cols=16, target="gpu") == LayerLayout("int4-blocked")  # one block
    assert _layout("linear", 2, storage, cols=768, target="gpu") == LayerLayout("int4-blocked")  # 2 bits: per row
    assert _layout("conv", 4, storage, target="gpu") == LayerLayout("int8")
    assert LayerLayout("int4-blocked").weight_only and not LayerLayout("nbits").weight_only
    LayerLayout("int4-blocked", 64).check("fc")  # blocks allowed


@pytest.mark.parametrize("target", ["portable", "x86-avx2", "x86-vnni", "arm64"])
def test_cpu_targets_keep_their_containers(target):
    for kind in ("conv", "linear"):
        for bits in (2, 3, 4, 8):
            for tokens in (False, True):
                for storage in ("auto", "packed", "int8"):
                    assert layer_container(kind, bits, storage, tokens, target=target) == \
                        layer_container(kind, bits, storage, tokens)
