"""The torch device a ``device`` option names: ``QuantConfig.device`` and ``FinetuneConfig.device``
(CLI ``--device``) are resolved here, with one error when CUDA is asked for but absent."""

from __future__ import annotations

import torch

from fqexport.errors import ConfigError

MSG_NO_CUDA = (
    "{field}='cuda' (CLI: --device cuda) but torch.cuda.is_available() is False: this torch build "
    "or machine has no usable CUDA GPU; use {field}='auto' or 'cpu'"
)


def resolve_device(device: str, field: str) -> torch.device:
    """``device`` (``"auto"``, ``"cpu"`` or ``"cuda"``) as a torch device: ``auto`` → CUDA when
    available, else CPU. ``field`` names the option in the error, e.g. ``"QuantConfig.device"``."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(MSG_NO_CUDA.format(field=field))
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
