"""The QDQ ONNX export of a :class:`~fqexport.model.CompressedModel`, as small passes:

1. :mod:`.torch_export` — ``torch.onnx.export`` of the fake-quant reference (opset 21): every
   activation quantization point becomes a ``QuantizeLinear → DequantizeLinear`` pair (uint8;
   int8 with zero point 0 for the ``gpu`` target);
2. :mod:`.weight_pass` — each layer's float weight → the container the layer holds (decided
   once in compress): :mod:`.weight_int8`, :mod:`.weight_packed` (INT4/INT2 + Cast),
   :mod:`.weight_nbits` (MatMulNBits), :mod:`.weight_blocked` (the GPU's blocked INT4); the
   metadata is written;
3. :mod:`.ort_fusions` (CPU targets) — rewrites after which ORT fuses more integer kernels
   (a global average pool, the float-output Gemm's int32 bias), the graph's math unchanged;
4. :mod:`.compact` — the file's fixed bytes shrink, numerics untouched;
5. ``onnx.checker``; for the ``gpu`` target :mod:`.gpu_rules` (what TensorRT and ORT's CUDA EP
   take); then :mod:`.export_check` — the file must match the reference under the kernels of
   ``config.target``. Only then is it written, atomically (:mod:`.onnx_file`; a quantized model
   past protobuf's 2 GB is refused, a float reference past it keeps its weights in ``<name>.data``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from fqexport.config import check_argument
from fqexport.errors import ConfigError, ExportError, OutputPathError
from fqexport.exporters.compact import compact_graph
from fqexport.exporters.export_check import TIE_JITTER_STEPS, Verdict, check_export
from fqexport.exporters.gpu_rules import check_gpu_qdq
from fqexport.exporters.metadata import environment, write_metadata
from fqexport.exporters.onnx_file import check_onnx, is_large, save_onnx, tensor_bytes
from fqexport.exporters.ort_fusions import fuse_for_ort
from fqexport.exporters.ort_session import QDQ_PROPAGATION, refused_by_cpu_optimizers
from fqexport.exporters.torch_export import OPSET, OPSET_INT2, set_opset, torch_to_onnx
from fqexport.exporters.weight_pass import quantize_weight_initializers
from fqexport.global_state import one_at_a_time
from fqexport.graph.decompose import decompose_attention
from fqexport.graph.prepare import (
    check_materialized,
    copy_model,
    decompose_attention_needed,
    first_output,
    first_output_warning,
    refuse_mapping_output,
    unwrap_model,
)
from fqexport.metadata import layer_records
from fqexport.model import CompressedModel

log = logging.getLogger(__name__)

MSG_QDQ_LARGE = (
    "{path}: the quantized model holds {gb:.2f} GB of tensors, more than the 2 GB protobuf serializes in one "
    "message; the export check runs the file in memory, so fqexport writes quantized models up to 2 GB "
    "(a float reference of any size: export_float writes its weights beside it)"
)
MSG_GPU_RULES = (
    "{path}: the export for target='gpu' breaks {n} rule(s) of what TensorRT's ONNX importer and ONNX "
    "Runtime's CUDA EP take (exporters/gpu_rules.py); the file was not written:\n  {violations}"
)

MSG_GPU_ON_CPU = (
    "%s: ONNX Runtime's CPU provider refuses this target='gpu' file at its default optimization level (%s): "
    "an ORT bug (issue 25526) where an int8 activation pair meets a Reshape or Transpose (attention's head split, "
    "MaxPool -> Reshape); the file is for TensorRT and ORT's CUDA EP. To run it on ORT's CPU provider, as "
    "fqexport validate does, pass disabled_optimizers=['" + QDQ_PROPAGATION + "'] to onnxruntime.InferenceSession"
)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well it matches the PyTorch reference.

    ``agreement`` / ``max_abs_diff``: the lowest agreement (top-1 for a classifier, matched boxes
    for a detector, pixels for a segmenter) and the largest output difference over the judges in
    ``checks`` (``None`` with ``check=False``).
    """

    path: Path
    size_bytes: int
    opset: int
    agreement: float | None
    max_abs_diff: float | None
    storage: dict[str, str]  # layer name -> int8 | int4 | int2 | nbits | int4-blocked
    checks: tuple[Verdict, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "size_bytes": self.size_bytes, "opset": self.opset,
            "agreement": self.agreement, "max_abs_diff": self.max_abs_diff, "storage": self.storage,
            "checks": [v.to_dict() for v in self.checks],
        }


def qdq_model(cm: "CompressedModel") -> onnx.ModelProto:
    """Passes 1-4: the QDQ ONNX proto of ``cm`` with its metadata, compacted (not checked)."""
    example = torch.from_numpy(np.ascontiguousarray(cm.calib.x[:2]))
    model = torch_to_onnx(cm.reference, example, what="quantized", output_name=cm.task.output_name)
    used = quantize_weight_initializers(model, cm.layers)
    opset = OPSET_INT2 if "int2" in used.values() else OPSET
    set_opset(model, opset)
    if cm.config.target != "gpu":  # (TensorRT's importer takes the graph as torch wrote it)
        fuse_for_ort(model)
    write_metadata(model, replace(cm.metadata, storage=cm.config.storage, opset=opset,
                                  layers=layer_records(cm.layers, used), target=cm.config.target,
                                  environment=environment()))
    # names of every weight layer are kept (quantized or float): readers look layers up by them
    compact_graph(model, [*cm.layers, *(f.name for f in cm.metadata.float_layers)])
    return model


MSG_NOT_COMPRESSED = (
    "export: cm must be a CompressedModel (from fqexport.compress), not a {got}; a float model is written with "
    "fqexport.exporters.qdq_onnx.export_float"
)


MSG_EXPORT_FOLDER = "{what}: path {path!r} names a folder, not a file; give a file name, e.g. model.onnx"
MSG_EXPORT_INPUT = "{what}: path {path} is the calibration data {source} the model was compressed from; it would overwrite it"


def check_export_path(path: str | Path, what: str, calib_source: str | None = None) -> Path:
    """``path`` as a Path, or OutputPathError when it names a folder (``"."``, ``""``, an existing
    directory: the write went to a temporary folder's name and failed there) or the calibration
    file ``calib_source`` (``export(cm, "calib.npz")`` replaced the data with ONNX bytes; the CLI
    refuses it as an input collision)."""
    given = Path(path)
    if given.name in ("", "..") or given.is_dir():  # Path("") and Path(".") have no name
        raise OutputPathError(MSG_EXPORT_FOLDER.format(what=what, path=str(path)))
    if calib_source and Path(calib_source).is_file() and given.exists() and given.resolve() == Path(calib_source).resolve():
        raise OutputPathError(MSG_EXPORT_INPUT.format(what=what, path=path, source=calib_source))
    return given


@one_at_a_time
def export_qdq(cm: "CompressedModel", path: str | Path, *, check: bool = True) -> ExportResult:
    """Write the QDQ ONNX model of ``cm`` to ``path``; see the module docstring.

    With ``check`` (default) the file is judged against the PyTorch reference under the kernels
    of ``cm.config.target`` (:func:`~fqexport.exporters.export_check.check_export`) and written
    only if every judge passes; ExportError otherwise, nothing written. A ``gpu`` target's graph
    must also follow TensorRT's and the CUDA EP's rules (:func:`~fqexport.exporters.gpu_rules.
    check_gpu_qdq`, with or without ``check``): ExportError naming every violation otherwise.
    """
    if not isinstance(cm, CompressedModel):  # an nn.Module: compress it first
        raise ConfigError(MSG_NOT_COMPRESSED.format(got=type(cm).__name__))
    path = check_export_path(path, "export", getattr(cm.calib, "source", None))
    model = qdq_model(cm)
    if is_large(model):
        raise ExportError(MSG_QDQ_LARGE.format(path=path, gb=tensor_bytes(model) / 1e9))
    check_onnx(model, path)
    if cm.config.target == "gpu":
        violations = check_gpu_qdq(model)
        if violations:
            raise ExportError(MSG_GPU_RULES.format(path=path, n=len(violations),
                                                   violations="\n  ".join(map(str, violations))))
    verdicts: tuple[Verdict, ...] = ()
    if check:
        verdicts = check_export(model, cm.predict(cm.calib.x), cm.calib.x, np.asarray(cm.calib.group),
                                target=cm.config.target, full_range=cm.config.weight_range == "full", path=path,
                                task=cm.task, shaken=cm.predict(cm.calib.x, jitter=TIE_JITTER_STEPS),
                                group_names=cm.calib.group_names)
    if cm.config.target == "gpu":  # said when the file is written, not first by a later validate
        refused = refused_by_cpu_optimizers(model.SerializeToString())
        if refused is not None:
            log.warning(MSG_GPU_ON_CPU, path, refused)
    size = save_onnx(model, path)
    agreement = min(v.agreement for v in verdicts) if verdicts else None
    max_diff = max(v.max_abs_diff for v in verdicts) if verdicts else None
    log.info("wrote %s (%d bytes, agreement %s)", path, size, agreement)
    return ExportResult(path, size, _opset(model), agreement, max_diff,
                        {n: l.container for n, l in cm.layers.items()}, verdicts)


def _opset(model: onnx.ModelProto) -> int:
    return next(imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx"))


class _FirstOutput(torch.nn.Module):
    """``model`` returning only the first of its outputs (:func:`~fqexport.graph.prepare.first_output`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_output(self.model(x))


@one_at_a_time
def export_float_reference(cm: "CompressedModel", path: str | Path) -> ExportResult:
    """``cm``'s float model (BatchNorm folded, the same output as the QDQ file) as ONNX: the
    ``--reference`` of ``fqexport validate``."""
    path = check_export_path(path, "export_float_reference", getattr(cm.calib, "source", None))
    example = torch.from_numpy(np.ascontiguousarray(cm.calib.x[:2]))
    return _write_float(cm.float_model, example, path, cm.task.output_name)


@one_at_a_time
def export_float(model: torch.nn.Module, example: torch.Tensor, path: str | Path,
                 output_name: str = "logits") -> ExportResult:
    """Write the float model (e.g. the BN-folded one) as ONNX, for reference validation; its
    output named ``output_name`` (a task's ``output_name``: ``output0`` for a detector). A model
    returning a tuple (a namedtuple, a list) is written with its first output, the one ``compress``
    measures and exports."""
    path = check_export_path(path, "export_float")
    check_argument(model, torch.nn.Module, "export_float: model")
    if isinstance(example, np.ndarray):  # the calibration data's own rows
        example = torch.from_numpy(np.ascontiguousarray(example))
    check_argument(example, torch.Tensor, "export_float: example", "; e.g. torch.from_numpy(data.x[:2])")
    return _write_float(model, example, path, output_name)


def _write_float(model: torch.nn.Module, example: torch.Tensor, path: Path, output_name: str) -> ExportResult:
    """:func:`export_float`'s writing, on a checked path and arguments."""
    check_materialized(model)
    model = unwrap_model(model)  # torch.compile / DataParallel: the module inside (torch.onnx fails on the wrapper)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in (*model.parameters(), *model.buffers())):
        # a float16/bfloat16 model: its float32 copy, as compress quantizes (the reference is float32)
        model = copy_model(model).float()
    example = example.float() if example.is_floating_point() else example
    if any(decompose_attention_needed(m) for m in model.modules()):
        # torch's own encoder checks its mask's values, which torch.onnx cannot trace: the exact
        # stand-ins compress quantizes (and --float-out writes), on a copy
        model = decompose_attention(copy.deepcopy(model))[0]
    modes = {m: m.training for m in model.modules()}  # the caller's model comes back in its own modes
    try:
        model.eval()
        try:
            with torch.no_grad():
                out = model(example)
        except Exception:  # torch.onnx.export runs it again and says why it fails
            out = None
        if out is not None and refuse_mapping_output(first_output(out)) is not out:
            log.warning(first_output_warning(type(out), len(out)))
            model = _FirstOutput(model)
        proto = torch_to_onnx(model, example, what="float", output_name=output_name)
    finally:
        for m, training in modes.items():
            m.training = training
    check_onnx(proto, path)
    size = save_onnx(proto, path)  # over 2 GB of weights: beside it, in <name>.data
    return ExportResult(path, size, OPSET, None, None, {})
