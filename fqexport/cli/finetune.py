"""``compress --finetune``, run after its flags passed (``fqexport.cli.flags.finetune``): open the
training data, fine-tune, print the per-group table before/after."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from fqexport.calibration.checks import require_labels
from fqexport.calibration.readers import open_stream
from fqexport.calibration.stream import DataStream
from fqexport.cli.common import print_table
from fqexport.cli.flags.finetune import finetune_config, parse_export_bits
from fqexport.errors import DataError
from fqexport.validation.reports import METRIC_LABELS
from fqexport.finetune.api import finetune, finetune_widths
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.start import MSG_SHAPE, group_mismatch
from fqexport.model import CompressedModel


@dataclass(frozen=True)
class FinetunePlan:
    """What ``--finetune`` will do: the config and the already-checked training data (labels and
    groups read; x streamed batch by batch during training)."""

    config: FinetuneConfig
    train: DataStream
    export_bits: tuple[int, ...] = ()  # --export-bits: one file per width instead of --out


def finetune_plan(args: argparse.Namespace, calib: Any = None) -> FinetunePlan | None:
    """The checked FinetuneConfig and the opened training data; None without ``--finetune``.

    ``calib`` (the calibration data, loaded) gives the group names and the sample shape the
    training data must have: checked here, before the compress (a mismatch was an exit 2 after
    the whole PTQ had run). Raises ConfigError / DataError (exit 2).
    """
    config = finetune_config(args)
    if config is None:
        return None
    train = open_stream(args.train, num_workers=config.num_workers)
    # a classifier needs labels (fail before any compress); a detector or segmenter distils its
    # float model and needs none. Without --task the task is inferred from the model's output
    # during compress: fqexport.finetune checks then (a label-free segmenter's data is valid)
    if getattr(args, "task", None) == "classification" and getattr(train, "annotations", None) is None:
        require_labels(train, "finetune")
    if calib is not None and sorted(train.group_names) != sorted(calib.group_names):  # any order: renumbered
        raise DataError(group_mismatch(train.source, train.group_names, calib.group_names))
    if calib is not None and tuple(train.sample_shape) != tuple(calib.sample_shape):
        raise DataError(MSG_SHAPE.format(source=train.source, got=tuple(train.sample_shape),
                                         want=tuple(calib.sample_shape)))
    return FinetunePlan(config, train, parse_export_bits(args.export_bits))


def run_finetune(plan: FinetunePlan, cm: CompressedModel, quiet: bool = False) -> CompressedModel:
    """Fine-tune ``cm`` and print the hold-out per-group table before/after."""
    t0 = time.perf_counter()
    out = finetune(cm, plan.train, plan.config, progress=not quiet)
    _print_summary(plan, out, time.perf_counter() - t0)
    return out


def run_finetune_widths(plan: FinetunePlan, cm: CompressedModel, quiet: bool = False) -> dict[int, CompressedModel]:
    """Fine-tune ``cm`` once and return it re-quantized at each of ``plan.export_bits``
    (``finetune_widths``); prints the same table as :func:`run_finetune`."""
    t0 = time.perf_counter()
    models = finetune_widths(cm, plan.train, plan.config, plan.export_bits, progress=not quiet)
    given = [b for b, m in models.items() if m.metadata.finetune.get("kept") == "ptq"]
    _print_summary(plan, next(iter(models.values())), time.perf_counter() - t0, given)
    return models


def _print_summary(plan: FinetunePlan, out: CompressedModel, seconds: float, given_at: list[int] | None = None) -> None:
    """The fine-tuning table; ``given_at``: the widths whose file is the model given (the trained
    one measured worse there), with ``--export-bits``."""
    rec = out.metadata.finetune
    key = out.task.primary  # accuracy, mAP@[.5:.95] or mIoU: the task's metric
    head = "acc" if key == "accuracy" else METRIC_LABELS.get(key, key)
    # with BAQ or AdaRound the training starts from another model than the one given: its epoch-0
    # figures are the checkpoint the result never measures worse than
    regridded = bool(rec.get("baq") or rec.get("adaptive_rounding"))
    rows = []
    for g in out.group_names:
        # the trained model's figures: with --export-bits, holdout_after is the first width's re-quantization
        after = rec.get("holdout_after_training") or rec["holdout_after"]
        b, a = rec["holdout_before"][g], after[g]
        s = rec["history"][0]["holdout"][g] if regridded else b  # a start other than the model given
        row = {"group": g, "n": b["count"], f"{head} before %": f"{100 * b[key]:.2f}"}
        row.update({f"{head} start %": f"{100 * s[key]:.2f}"} if regridded else {})
        row.update({f"{head} after %": f"{100 * a[key]:.2f}", "loss before": f"{b['loss']:.4f}"})
        row.update({"loss start": f"{s['loss']:.4f}"} if regridded else {})
        row["loss after"] = f"{a['loss']:.4f}"
        rows.append(row)
    cfg = plan.config
    print(f"fine-tuning ({cfg.loss}, {cfg.sampler} sampling): {rec['epochs_run']} epoch(s), {rec['steps']} steps, "
          f"{seconds:.1f} s, stopped: {rec['stopped']}, kept epoch {rec['best_epoch']}; "
          f"loss: {rec['loss_terms']}; hold-out slice of --train ({rec['num_holdout']} samples):")
    print_table(rows, list(rows[0].keys()))
    if regridded:
        step = "the widths learned (BAQ)" if rec.get("baq") else "adaptive rounding"
        print(f"before: the model given to fine-tuning; start: after {step}, epoch 0 (the kept epoch measured no "
              "worse than it on the worst group)")
    if given_at:
        print(f"kept at {'/'.join(map(str, given_at))} bits: the model given to fine-tuning, which measured a lower "
              "held-out worst-group loss than the trained one (the 'after' columns); the other widths hold the "
              "trained model re-quantized")
    elif rec.get("kept") == "ptq":
        print("kept: the model given to fine-tuning, which measured a lower held-out worst-group loss than the "
              "trained one")
    if rec.get("baq"):
        baq = rec["baq"]
        print(f"\nlearned widths (BAQ, budget {baq['budget_bits']:g} bits, exported avg {baq['avg_bits']:.3f}; nominal "
              "bits: the parameter-weighted average code width, containers and scales not counted):")
        print_table([{"layer": n, "learned": f"{b:.2f}", "bits": baq["bits"][n]} for n, b in baq["learned_bits"].items()],
                    ["layer", "learned", "bits"])
    print()
