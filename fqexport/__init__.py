"""fqexport: fairness-aware post-training quantization to QDQ ONNX, validated per group."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import QuantConfig
from .errors import (
    ConfigError,
    DataError,
    ExportError,
    FqexportError,
    ModelLoadError,
    UnsupportedLayerError,
    ValidationFailed,
)

__all__ = [
    "__version__",
    "QuantConfig",
    "FqexportError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "UnsupportedLayerError",
    "ExportError",
    "ValidationFailed",
]
