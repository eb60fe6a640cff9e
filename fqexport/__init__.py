"""fqexport: fairness-aware post-training quantization to QDQ ONNX, validated per group.

    import fqexport
    cm = fqexport.compress(model, "calib.npz", fqexport.QuantConfig(weight_bits=4))
    fqexport.export(cm, "model.onnx")
    report = fqexport.validate("model.onnx", "test.npz")

Your own data: ``fqexport.load_data(dataset_or_loader, groups=..., transform=...)`` (docs/your-own-model.md).
"""

from __future__ import annotations

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.groups import GroupsFromCSV
from fqexport.calibration.npz import save_npz
from fqexport.calibration.readers import load_data
from fqexport.calibration.stream import DataStream
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
from fqexport.exporters.qdq_onnx import export_qdq as export
from fqexport.finetune import FinetuneConfig, finetune
from fqexport.graph.loading import load_model
from fqexport.metadata import ExportMetadata
from fqexport.metrics.group_metrics import GroupMetrics, group_metrics
from fqexport.model import CompressedModel, QuantizedLayer
from fqexport.pipeline.compress import compress
from fqexport.search.candidates import MixedPrecisionResult
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.search.pareto import pareto_sweep
from fqexport.validation.gate import validate
from fqexport.validation.thresholds import Thresholds
from fqexport.validation.validation_report import ValidationReport
from fqexport.version import __version__


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
    "save_npz",
    "GroupsFromCSV",
    "DataStream",
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
