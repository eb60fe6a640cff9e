"""fqexport: fairness-aware post-training quantization to QDQ ONNX, validated per group.

    import fqexport
    cm = fqexport.compress(model, "calib.npz", fqexport.QuantConfig(weight_bits=4))
    cm.export("model.onnx")
    report = fqexport.validate("model.onnx", "test.npz")
"""

from __future__ import annotations

from pathlib import Path

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.errors import (
    ConfigError,
    DataError,
    ExportError,
    FqexportError,
    ModelLoadError,
    UnsupportedLayerError,
    ValidationFailed,
)
from fqexport.exporters.qdq_onnx import ExportResult, export_float
from fqexport.finetune import FinetuneConfig, finetune
from fqexport.graph.loading import load_model
from fqexport.metadata import ExportMetadata
from fqexport.metrics.group_metrics import GroupMetrics, group_metrics
from fqexport.model import CompressedModel, QuantizedLayer
from fqexport.pipeline.compress import compress
from fqexport.search.candidates import MixedPrecisionResult
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.search.pareto import pareto_sweep
from fqexport.validation.gate import Thresholds, ValidationReport, validate
from fqexport.version import __version__


def export(cm: CompressedModel, path: str | Path, *, storage: str | None = None, check: bool = True) -> ExportResult:
    """Write ``cm`` as a QDQ ONNX file (same as ``cm.export``); returns an ExportResult."""
    return cm.export(path, storage=storage, check=check)


__all__ = [
    "__version__",
    "compress",
    "finetune",
    "export",
    "export_float",
    "validate",
    "search_mixed_precision",
    "pareto_sweep",
    "load_model",
    "load_data",
    "group_metrics",
    "CompressedModel",
    "QuantizedLayer",
    "ExportMetadata",
    "ExportResult",
    "MixedPrecisionResult",
    "GroupData",
    "GroupMetrics",
    "QuantConfig",
    "MixedPrecisionConfig",
    "FinetuneConfig",
    "Thresholds",
    "ValidationReport",
    "FqexportError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "UnsupportedLayerError",
    "ExportError",
    "ValidationFailed",
]
