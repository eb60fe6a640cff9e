"""Where fine-tuning starts: the CompressedModel it is given, or the PTQ start of a float model
(compressed on a group-balanced subset of the training data, or ``calib``), and the checks that
the training data fits that model (groups, sample shape, labels)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Sequence

from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.sampling import group_balanced_indices
from fqexport.calibration.stream import DataStream
from fqexport.config import QuantConfig
from fqexport.errors import ConfigError, DataError
from fqexport.finetune.config import FinetuneConfig
from fqexport.model import CompressedModel
from fqexport.pipeline.compress import compress
from fqexport.tasks.base import Task

MSG_GROUPS = (
    "{source}: the training data's groups do not match the calibration data's ({diff}); give training data "
    "with the same group names"
)


def group_mismatch(source: str, train: Sequence[str], calib: Sequence[str]) -> str:
    """:data:`MSG_GROUPS` naming the groups each side lacks (not two lists to compare by eye)."""
    quoted = lambda names: ", ".join(repr(str(n)) for n in names)  # noqa: E731
    missing = [g for g in calib if g not in train]
    extra = [g for g in train if g not in calib]
    diff = "; ".join(part for part in (f"missing from the training data: {quoted(missing)}" if missing else "",
                                       f"not in the calibration data: {quoted(extra)}" if extra else "") if part)
    return MSG_GROUPS.format(source=source, diff=diff)
MSG_SHAPE = (
    "{source}: field 'x' has sample shape {got}, but the model was compressed for {want}; "
    "give training data of the calibration data's shape"
)
MSG_START = (
    "finetune needs a CompressedModel (from fqexport.compress) or a float torch.nn.Module, "
    "not a {kind}"
)


MSG_COMPRESSED_WIDTH = (
    "FinetuneConfig.weight_bits={ft} is the width a float model is compressed at before fine-tuning; this "
    "CompressedModel's layers are already at {widths} bits, which fine-tuning keeps: compress at {ft} bits first "
    "(QuantConfig(weight_bits={ft})), or leave FinetuneConfig.weight_bits out"
)
MSG_TWO_WIDTHS = (
    "FinetuneConfig.weight_bits={ft} and quant_config.weight_bits={qc} both give the PTQ start's width; the "
    "quant_config compresses the float model: set the width there (and leave FinetuneConfig.weight_bits out)"
)


def start_model(model_or_cm: Any, data: DataStream, config: FinetuneConfig, calib: Any,
                quant_config: QuantConfig | None, progress: bool, task: Task | None = None) -> CompressedModel:
    """``model_or_cm`` when it is a CompressedModel, else its compression by ``quant_config``
    (default ``QuantConfig(weight_bits=config.weight_bits)``) on ``calib`` or on a group-balanced
    subset of ``data``, as ``task`` (None: inferred)."""
    default = next(f.default for f in fields(FinetuneConfig) if f.name == "weight_bits")
    if isinstance(model_or_cm, CompressedModel):
        widths = sorted({layer.bits for layer in model_or_cm.layers.values()})
        if config.weight_bits != default and widths != [config.weight_bits]:
            raise ConfigError(MSG_COMPRESSED_WIDTH.format(ft=config.weight_bits, widths=widths))
        return model_or_cm
    if not isinstance(model_or_cm, nn.Module):
        raise ConfigError(MSG_START.format(kind=type(model_or_cm).__name__))
    if quant_config is not None and config.weight_bits not in (default, quant_config.weight_bits):
        raise ConfigError(MSG_TWO_WIDTHS.format(ft=config.weight_bits, qc=quant_config.weight_bits))
    qc = quant_config or QuantConfig(weight_bits=config.weight_bits, seed=config.seed)
    calib_data = calib if calib is not None else data.take(group_balanced_indices(data, qc.num_calib, seed=config.seed),
                                                           config.num_workers)
    return compress(model_or_cm, calib_data, qc, progress=progress, task=task)


def start_width(cm: CompressedModel) -> int | None:
    """The weight width of a PTQ start whose layers share one, else None (mixed widths: see its layers)."""
    widths = {layer.bits for layer in cm.layers.values()}
    return widths.pop() if len(widths) == 1 else None


def check_train_data(data: GroupData | DataStream, cm: CompressedModel) -> GroupData | DataStream:
    """``data`` with its group ids in the calibration's order (the same names in any order:
    string groups come sorted); a DataError unless it has the calibration's groups, sample shape
    and labels (boxes, masks) in the model's classes."""
    if sorted(data.group_names) != sorted(cm.group_names):
        raise DataError(group_mismatch(data.source, data.group_names, cm.group_names))
    data = data.in_group_order(cm.group_names)
    shape = tuple(data.sample_shape)
    if shape != tuple(cm.input_shape):
        raise DataError(MSG_SHAPE.format(source=data.source, got=shape, want=tuple(cm.input_shape)))
    cm.task.check_annotations(data, cm.num_classes)
    return data
