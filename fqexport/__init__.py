"""fqexport: fairness-aware post-training quantization to QDQ ONNX, validated per group.

    import fqexport
    cm = fqexport.compress(model, "calib.npz", fqexport.QuantConfig(weight_bits=4))
    fqexport.export(cm, "model.onnx")
    report = fqexport.validate("model.onnx", "test.npz")

The public names are resolved on first use (``__getattr__`` below), so ``import fqexport`` and
the CLI's ``--help`` and argument errors do not wait for torch, onnx and onnxruntime to load.
``_PUBLIC`` is the one place where a project module is imported lazily (by name, through
:mod:`importlib`); ``tests/test_import_graph.py`` checks it is exactly that and nothing else,
and treats each entry as an import edge of this package.
Your own data: ``fqexport.load_data(dataset_or_loader, groups=..., transform=...)``
(docs/your-own-model.md).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from fqexport.version import __version__

# public name -> "defining module:attribute" (resolved on first use, then cached in globals())
_PUBLIC: dict[str, str] = {
    "compress": "fqexport.pipeline.compress:compress",
    "finetune": "fqexport.finetune.api:finetune",
    "finetune_widths": "fqexport.finetune.api:finetune_widths",
    "export": "fqexport.exporters.qdq_onnx:export_qdq",
    "export_float": "fqexport.exporters.qdq_onnx:export_float",
    "read_metadata": "fqexport.exporters.metadata:read_metadata",
    "validate": "fqexport.validation.gate:validate",
    "search_mixed_precision": "fqexport.search.mixed_precision:search_mixed_precision",
    "pareto_sweep": "fqexport.search.pareto:pareto_sweep",
    "load_model": "fqexport.graph.loading:load_model",
    "with_decode": "fqexport.graph.decode:with_decode",
    "load_data": "fqexport.calibration.readers:load_data",
    "save_npz": "fqexport.calibration.npz:save_npz",
    "GroupsFromCSV": "fqexport.calibration.groups:GroupsFromCSV",
    "DataStream": "fqexport.calibration.stream:DataStream",
    "group_metrics": "fqexport.metrics.group_metrics:group_metrics",
    "analyze": "fqexport.metrics.diagnostics:analyze",
    "AnalysisReport": "fqexport.metrics.diagnostics:AnalysisReport",
    "CompressedModel": "fqexport.model:CompressedModel",
    "QuantizedLayer": "fqexport.model:QuantizedLayer",
    "ExportMetadata": "fqexport.metadata:ExportMetadata",
    "ExportResult": "fqexport.exporters.qdq_onnx:ExportResult",
    "MixedPrecisionResult": "fqexport.search.candidates:MixedPrecisionResult",
    "GroupData": "fqexport.calibration.group_data:GroupData",
    "GroupMetrics": "fqexport.metrics.group_metrics:GroupMetrics",
    "Classification": "fqexport.tasks.classification:Classification",
    "Detection": "fqexport.tasks.detection:Detection",
    "Segmentation": "fqexport.tasks.segmentation:Segmentation",
    "QuantConfig": "fqexport.config:QuantConfig",
    "MixedPrecisionConfig": "fqexport.config:MixedPrecisionConfig",
    "EngineConfig": "fqexport.config:EngineConfig",
    "FinetuneConfig": "fqexport.finetune.config:FinetuneConfig",
    "Thresholds": "fqexport.validation.thresholds:Thresholds",
    "ValidationReport": "fqexport.validation.validation_report:ValidationReport",
    "FqexportError": "fqexport.errors:FqexportError",
    "ConfigError": "fqexport.errors:ConfigError",
    "DataError": "fqexport.errors:DataError",
    "ModelLoadError": "fqexport.errors:ModelLoadError",
    "UnsupportedLayerError": "fqexport.errors:UnsupportedLayerError",
    "ExportError": "fqexport.errors:ExportError",
    "OutputPathError": "fqexport.errors:OutputPathError",
    "EngineError": "fqexport.errors:EngineError",
    "ValidationFailed": "fqexport.errors:ValidationFailed",
}

__all__ = ["__version__", *_PUBLIC]


def _resolve(name: str) -> Any:
    """The object ``_PUBLIC[name]`` names, imported now and cached as a module global."""
    module, _, attr = _PUBLIC[name].partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return _resolve(name)
    raise AttributeError(f"module 'fqexport' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """``fqexport.finetune`` is the function, also after the subpackage of the same name has been
    imported (the import system then binds the subpackage on its parent; this keeps the public
    name, and the subpackage stays in ``sys.modules["fqexport.finetune"]``)."""

    @property
    def finetune(self):
        return _resolve("finetune")

    @finetune.setter
    def finetune(self, subpackage: types.ModuleType) -> None:
        pass


sys.modules[__name__].__class__ = _Package
