"""The device resolver shared by QuantConfig.device and FinetuneConfig.device (fqexport.device)."""

from __future__ import annotations

import pytest
import torch

from fqexport.device import resolve_device
from fqexport.errors import ConfigError

CUDA = torch.cuda.is_available()


def test_cpu_is_the_cpu():
    assert resolve_device("cpu", "QuantConfig.device") == torch.device("cpu")


def test_auto_is_cuda_when_available_else_the_cpu():
    assert resolve_device("auto", "QuantConfig.device") == torch.device("cuda" if CUDA else "cpu")


@pytest.mark.skipif(CUDA, reason="checks the error raised on a machine without CUDA")
def test_cuda_without_a_gpu_names_the_field_and_the_fix():
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda", "FinetuneConfig.device")
    assert str(err.value) == (
        "FinetuneConfig.device='cuda' (CLI: --device cuda) but torch.cuda.is_available() is False: this "
        "torch build or machine has no usable CUDA GPU; use FinetuneConfig.device='auto' or 'cpu'")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_is_cuda_when_available():
    assert resolve_device("cuda", "QuantConfig.device") == torch.device("cuda")
