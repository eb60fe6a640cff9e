"""fqexport: fairness-aware post-training quantization to QDQ ONNX, validated per group.

    import fqexport
    cm = fqexport.compress(model, "calib.npz", fqexport.QuantConfig(weight_bits=4))
    cm.export("model.onnx")
    report = fqexport.validate("model.onnx", "test.npz")
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path

from .calibration.group_data import GroupData
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
from .pipeline import CompressedModel, QuantizedLayer, compress


def export(cm: CompressedModel, path: str | Path, *, storage: str | None = None, check: bool = True):
    """Write ``cm`` as a QDQ ONNX file (same as ``cm.export``); returns an ExportResult."""
    return cm.export(path, storage=storage, check=check)


def validate(model: str | Path, data, **kwargs):
    """Run an ONNX model in ONNX Runtime on group-labeled data; see exporters.validation.validate."""
    from .exporters.validation import validate as _validate

    return _validate(model, data, **kwargs)


def load_model(spec, weights=None, **kwargs):
    """Load a float model; see model_loading.load_model."""
    from .model_loading import load_model as _load_model

    return _load_model(spec, weights, **kwargs)


def load_data(spec) -> GroupData:
    """Read group-labeled data (.npz, CSV manifest, torch Dataset); see calibration.readers."""
    from .calibration.readers import load_data as _load_data

    return _load_data(spec)


__all__ = [
    "__version__",
    "compress",
    "export",
    "validate",
    "load_model",
    "load_data",
    "CompressedModel",
    "QuantizedLayer",
    "GroupData",
    "QuantConfig",
    "FqexportError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "UnsupportedLayerError",
    "ExportError",
    "ValidationFailed",
]
