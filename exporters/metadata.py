"""Metadata I/O: ``ExportMetadata`` into and out of an ONNX file's ``metadata_props``."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import onnx

from fqexport.errors import ModelLoadError
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.ort_session import check_model_file
from fqexport.metadata import METADATA_KEY, ExportMetadata
from fqexport.version import __version__

MSG_UNREADABLE = "cannot load ONNX model {path}: {err}. Is it a complete, valid .onnx file?"


def environment() -> dict[str, str]:
    """What writes a file, for its metadata (``ExportMetadata.environment``): the versions of
    fqexport, Python, torch, onnx, onnxruntime and numpy, and this CPU's instruction set and int8
    kernel family (the export check ran its kernels)."""
    import numpy
    import onnxruntime
    import torch

    isa = cpu_isa()
    return {"fqexport": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "cpu_isa": isa, "kernel_family": kernel_family(isa)}


def write_metadata(model: onnx.ModelProto, meta: ExportMetadata) -> None:
    """Set ``metadata_props["fqexport"]`` of ``model`` (in place) to ``meta`` as compact JSON
    (no spaces after separators: every byte of a small model's file is budgeted)."""
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(json.loads(meta.to_json()), sort_keys=True, separators=(",", ":"))
    model.producer_name, model.producer_version = "fqexport", __version__


def metadata_of(model: onnx.ModelProto, source: str = "<model>") -> ExportMetadata | None:
    """The ``ExportMetadata`` of an in-memory model; ``None`` for models fqexport did not write."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return ExportMetadata.from_json(prop.value, source)
    return None


def read_metadata(path: str | Path) -> ExportMetadata | None:
    """The ``ExportMetadata`` of the ONNX file at ``path`` (``None`` without fqexport metadata).

    Raises ModelLoadError for a missing or unreadable file and for malformed or newer metadata.
    """
    path = Path(path)
    check_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise ModelLoadError(MSG_UNREADABLE.format(path=path, err=str(err).strip())) from err
    return metadata_of(model, str(path))
