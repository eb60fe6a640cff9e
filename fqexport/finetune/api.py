"""``finetune``: fairness-aware fine-tuning after PTQ, returning a CompressedModel like any other.

1. Start: a CompressedModel (its solver codes, steps and calibrated activation ranges) or a
   float model, which is first compressed at ``weight_bits`` on a group-balanced subset of the
   training data (or ``calib``).
2. Hold out ``holdout_fraction`` of each group of the training data (at most ``holdout_max``
   samples, read into memory); the rest is streamed batch by batch (``fqexport.calibration.stream``:
   a Dataset or CSV manifest through a DataLoader with ``num_workers``, an ``.npz`` memory-mapped).
   The float model (BN folded) is the teacher: its logits are computed once for in-memory data,
   else per batch; the core-set's per-sample scores come from one streaming pass per epoch.
3. Train the student (``fqexport.finetune.qat``: learned codes within each layer's grid,
   per-channel steps, biases, activation steps) with Adam and a cosine schedule on
   ``fqexport.finetune.losses`` under the chosen sampler and group objective.
4. After every epoch (and at the start) measure each group's cross-entropy on the hold-out;
   keep the state with the lowest worst-group loss. ``max_minutes`` stops at the end of a step.
5. Write the kept state back as integer codes, steps, biases and activation qparams into a new
   reference and layer table, so ``export`` and ``validate`` run unchanged; the metadata records
   the settings, the training data's group counts and the hold-out figures before/after.

The loop is ``fqexport.finetune.loop``; learnable widths (BAQ) ``fqexport.finetune.learn_bits``.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import replace
from typing import Any

from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.config import SUPPORTED_WEIGHT_BITS, QuantConfig, check_argument
from fqexport.errors import ConfigError
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.holdout import per_group
from fqexport.finetune.loop import Trained, train_student
from fqexport.finetune.qat import write_back
from fqexport.global_state import one_at_a_time
from fqexport.metadata import layer_records
from fqexport.model import CompressedModel

log = logging.getLogger(__name__)

MSG_WIDTH = "finetune_widths: width {value!r} is not supported: give integers from 2 to 8, e.g. (3, 4, 8)"


@one_at_a_time
def finetune(
    model_or_cm: CompressedModel | nn.Module,
    train: GroupData | Any,
    config: FinetuneConfig | None = None,
    *,
    calib: Any = None,
    quant_config: QuantConfig | None = None,
    progress: bool = True,
) -> CompressedModel:
    """Fine-tune a compressed model (or compress a float model and fine-tune it) on ``train``.

    Args:
        model_or_cm: a CompressedModel (not modified) or a float classifier.
        train: group-labeled training data with labels: what ``fqexport.load_data`` accepts or
            returns (a GroupData, an ``.npz``/``.csv`` path, a Dataset, DataLoader or iterable
            yielding ``(x, y)`` or ``(x, y, group)``, a DataStream); its groups must be the
            calibration data's.
        config: a FinetuneConfig (default: 2 epochs, worst-group loss, group-balanced sampling).
        calib: calibration data for the PTQ start of a float model (default: a group-balanced
            subset of ``train``); ignored for a CompressedModel.
        quant_config: QuantConfig of that PTQ start (default ``QuantConfig(weight_bits=config.weight_bits)``).
        progress: a tqdm bar per epoch with the running per-group loss.

    Returns:
        A new CompressedModel holding the best checkpoint (lowest hold-out worst-group loss).

    Raises:
        DataError: the training data's groups, shape or labels do not fit the model.
        ConfigError: a bad option, or the loss became NaN/Inf (``err.last_good`` holds the
            CompressedModel of the last good checkpoint; nothing is written).
    """
    check_argument(config, FinetuneConfig, "finetune: config", "; e.g. FinetuneConfig(epochs=2)")
    check_argument(quant_config, QuantConfig, "finetune: quant_config")
    return train_student(model_or_cm, train, config, calib, quant_config, progress).result


# A width re-quantized from the trained weights whose held-out worst group measures this many points
# below the trained model's is warned about (a W3-trained model at W2: 24 % against 80 %)
WORSE_WIDTH_POINTS = 5.0
MSG_WORSE_WIDTH = (
    "W{bits}, re-quantized from the trained weights (no training at {bits} bits), measures its held-out "
    "worst-group {metric} at {mine:.2f} % against {trained:.2f} % for the trained model: fine-tune at {bits} bits "
    "(CLI: --weight-bits {bits} --finetune) rather than ship this file"
)


@one_at_a_time
def finetune_widths(
    model_or_cm: CompressedModel | nn.Module,
    train: GroupData | Any,
    config: FinetuneConfig | None = None,
    widths: tuple[int, ...] = (3, 4, 5, 6, 8),
    *,
    calib: Any = None,
    quant_config: QuantConfig | None = None,
    progress: bool = True,
) -> dict[int, CompressedModel]:
    """Fine-tune once (as :func:`finetune`), then return the model at each width in ``widths``.

    A layer whose trained width is the requested one keeps its trained codes; every other layer's
    trained weights (its dequantized codes, what training computed with) are re-quantized at that
    width (fresh per-channel grid, no further training), with the learned biases and activation
    steps. Each model's metadata records ``finetune["requantized_to"]`` and that width's own
    held-out figures.
    """
    widths = tuple(widths)
    for b in widths:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or int(b) not in SUPPORTED_WEIGHT_BITS:
            raise ConfigError(MSG_WIDTH.format(value=b))
    widths = tuple(int(b) for b in widths)
    if not widths:
        raise ConfigError(MSG_WIDTH.format(value="()"))
    trained = train_student(model_or_cm, train, config, calib, quant_config, progress)
    return {b: _at_width(trained, b) for b in widths}


def _at_width(trained: Trained, bits: int) -> CompressedModel:
    """The trained model with every layer's latent weights re-quantized at ``bits``; where the run
    returned the PTQ model (``kept``: the trained one measured worse) and ``bits`` is its width, that
    model."""
    cm, result = trained.start, trained.result
    kept = result.metadata.finetune.get("kept")
    if kept == "ptq" and all(l.bits == bits for l in result.layers.values()):
        record = {k: v for k, v in result.metadata.finetune.items() if k != "holdout_trained"}
        record.update(requantized_to=bits, holdout_after_training=result.metadata.finetune["holdout_trained"])
        return replace(result, metadata=replace(result.metadata, finetune=record))
    reference, layers = write_back(cm.reference, cm.layers, trained.weights, trained.acts, bits=bits,
                                   weight_range=cm.config.weight_range, export=cm.config.export)
    total = sum(l.params for l in layers.values())
    # built from the trained latent weights, whichever model the run returned ("kept"): the
    # trained model's own figures, not the returned PTQ model's
    record = {k: v for k, v in result.metadata.finetune.items() if k not in ("kept", "holdout_trained")}
    if kept == "ptq":
        record["holdout_after"] = result.metadata.finetune["holdout_trained"]
    record["requantized_to"] = bits
    meta = replace(result.metadata, layers=layer_records(layers),
                   avg_weight_bits=round(sum(l.bits * l.params for l in layers.values()) / max(total, 1), 4))
    out = replace(result, reference=reference, layers=layers, metadata=meta)
    if trained.holdout is not None:  # this width's own held-out figures; the trained model's kept beside them
        record["holdout_after_training"] = record.get("holdout_after")
        record["holdout_after"] = per_group(trained.holdout.metrics_of(out))
        _warn_worse_width(bits, record, out.task.search_metric)
    out.metadata = replace(meta, finetune=record)
    return out


def worst_of(by_group: dict[str, dict[str, float]] | None, metric: str) -> float | None:
    """The lowest ``metric`` over the groups with samples of a record's per-group figures."""
    values = [r[metric] for r in (by_group or {}).values() if r.get("count", 0) > 0 and metric in r]
    return min(values) if values else None


def _warn_worse_width(bits: int, record: dict[str, Any], metric: str) -> None:
    """Say when ``bits``' re-quantized model measures its held-out worst group more than
    :data:`WORSE_WIDTH_POINTS` below the trained model (:data:`MSG_WORSE_WIDTH`): re-quantizing
    trained weights to a narrower grid (no training there) can collapse a model."""
    mine, trained = worst_of(record.get("holdout_after"), metric), worst_of(record.get("holdout_after_training"), metric)
    if mine is not None and trained is not None and 100 * (trained - mine) > WORSE_WIDTH_POINTS:
        log.warning(MSG_WORSE_WIDTH.format(bits=bits, metric=metric, mine=100 * mine, trained=100 * trained))
