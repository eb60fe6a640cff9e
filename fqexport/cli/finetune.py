"""The fine-tuning options of ``fqexport compress`` (``--finetune --train train.npz ...``): flags
built from ``FinetuneConfig``'s defaults, the early input checks (before any compute), the run
and the per-group table before/after."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from fqexport.calibration.checks import require_labels
from fqexport.calibration.readers import open_stream
from fqexport.calibration.stream import DataStream
from fqexport.cli.common import parse_assignments, print_table
from fqexport.config import SUPPORTED_WEIGHT_BITS
from fqexport.errors import ConfigError, DataError
from fqexport.finetune.config import (
    CoresetScore,
    FinetuneConfig,
    GroupLoss,
    Rounding,
    Sampler,
)
from fqexport.finetune.api import finetune, finetune_widths
from fqexport.finetune.start import MSG_GROUPS
from fqexport.model import CompressedModel

_F = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}

MSG_NO_TRAIN = "--finetune needs training data: give --train train.npz (arrays x, y, group) or a CSV manifest"
MSG_LEARN_BITS_WITHOUT = "--learn-bits is a fine-tuning option: add --finetune --train train.npz"
MSG_LEARN_BITS_BUDGET = "--learn-bits needs --budget-bits (average weight bits, e.g. 2.5)"
MSG_TRAIN_WITHOUT = "--train is only used with --finetune: add --finetune, or drop --train"
MSG_EXPORT_BITS_WITHOUT = "--export-bits exports several widths of one fine-tuning run: add --finetune --train train.npz"
MSG_EXPORT_BITS = (
    "--export-bits {value!r}: give comma-separated distinct widths from 2 to 8, e.g. --export-bits 3,4,8 "
    "(writes OUT.w3.onnx, OUT.w4.onnx, OUT.w8.onnx next to --out)"
)
MSG_EXPORT_BITS_LEARN = (
    "--export-bits re-quantizes every layer at each width, which would discard the widths --learn-bits "
    "learns: use one of them"
)


@dataclass(frozen=True)
class FinetunePlan:
    """What ``--finetune`` will do: the config and the already-checked training data (labels and
    groups read; x streamed batch by batch during training)."""

    config: FinetuneConfig
    train: DataStream
    export_bits: tuple[int, ...] = ()  # --export-bits: one file per width instead of --out


def add_finetune_options(p: argparse.ArgumentParser) -> None:
    """``--finetune`` and its options (a group of ``compress``)."""
    ft = p.add_argument_group("fairness-aware fine-tuning after PTQ (--finetune)")
    ft.add_argument("--finetune", action="store_true", help="fine-tune the compressed model on --train data")
    ft.add_argument("--train", help="training data: .npz (x, y, group[, group_names]) or CSV manifest, "
                    "same groups as --calib")
    ft.add_argument("--epochs", type=int, default=_F["epochs"], help=f"fine-tuning epochs (default {_F['epochs']})")
    ft.add_argument("--sampler", choices=get_args(Sampler), default=_F["sampler"],
                    help="natural, group-balanced (equal mass per group in each batch) or core-set "
                    "(per epoch the hardest samples of each group)")
    ft.add_argument("--loss", choices=get_args(GroupLoss), default=_F["loss"],
                    help="ce (plain mean), group-weighted (--group-loss-weights) or worst-group (group DRO)")
    ft.add_argument("--group-loss-weights", metavar="NAME=W,...", help="group weights of --loss group-weighted")
    ft.add_argument("--dro-eta", type=float, default=_F["dro_eta"], help="step size of the worst-group weights")
    ft.add_argument("--lr", type=float, default=_F["lr"], help=f"Adam step size (default {_F['lr']:g})")
    ft.add_argument("--ft-batch-size", type=int, default=_F["batch_size"], help="fine-tuning batch size")
    ft.add_argument("--temperature", type=float, default=_F["temperature"], help="distillation temperature")
    ft.add_argument("--coreset-fraction", type=float, default=_F["coreset_fraction"],
                    help="share of each group the core-set keeps per epoch")
    ft.add_argument("--coreset-score", choices=get_args(CoresetScore), default=_F["coreset_score"],
                    help="what the core-set ranks by: loss (distillation + label cross-entropy) or disagreement "
                    "(the distillation term alone: where quantization moved the model)")
    ft.add_argument("--oscillation", type=float, default=_F["oscillation"], metavar="LAMBDA",
                    help="oscillation (dampening) regulariser weight, e.g. 0.1 (default 0: off)")
    ft.add_argument("--learn-bits", action="store_true",
                    help="BAQ: learn a width per layer under --budget-bits (instead of the mixed-precision "
                    "search), project onto the budget, then fine-tune at the fixed widths")
    ft.add_argument("--bit-epochs", type=int, default=_F["bit_epochs"], help="epochs of the width-learning phase")
    ft.add_argument("--lambda-fair", type=float, default=_F["lambda_fair"],
                    help="BAQ fairness penalty on max_g L_g - mean_g L_g (default 0)")
    ft.add_argument("--rounding", choices=get_args(Rounding), default=_F["rounding"],
                    help="solver (start from the solver's codes) or adaptive (group-weighted AdaRound per "
                    "layer first, keeping the solver's codes where they reconstruct better)")
    ft.add_argument("--export-bits", metavar="B,B,...",
                    help="export the fine-tuned model at each of these widths (re-quantized, no further "
                    "training; pair with --oscillation): --out m.onnx writes m.w3.onnx, m.w4.onnx, ... "
                    "instead of m.onnx")
    ft.add_argument("--max-minutes", type=float, default=None,
                    help="stop at the end of a step after this many minutes, keeping the best checkpoint")


def parse_export_bits(text: str | None) -> tuple[int, ...]:
    """The widths of ``--export-bits`` (``()`` when not given); ConfigError (exit 2) when malformed."""
    if text is None:
        return ()
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise ConfigError(MSG_EXPORT_BITS.format(value=text)) from err
    if not widths or len(set(widths)) != len(widths) or any(b not in SUPPORTED_WEIGHT_BITS for b in widths):
        raise ConfigError(MSG_EXPORT_BITS.format(value=text))
    return widths


def width_paths(out: str | Path, widths: tuple[int, ...]) -> dict[int, Path]:
    """``--out m.onnx`` with ``--export-bits 3,8`` -> ``{3: m.w3.onnx, 8: m.w8.onnx}``."""
    out = Path(out)
    return {b: out.with_name(f"{out.stem}.w{b}{out.suffix or '.onnx'}") for b in widths}


def finetune_plan(args: argparse.Namespace, calib_groups: tuple[str, ...] | None = None) -> FinetunePlan | None:
    """Check the fine-tuning flags and load the training data before any compute.

    ``calib_groups`` (the calibration data's group names) is compared with the training data's.
    Returns None without ``--finetune``. Raises ConfigError / DataError (exit 2).
    """
    export_bits = parse_export_bits(args.export_bits)
    if not args.finetune:
        if args.train is not None:
            raise ConfigError(MSG_TRAIN_WITHOUT)
        if args.learn_bits:
            raise ConfigError(MSG_LEARN_BITS_WITHOUT)
        if export_bits:
            raise ConfigError(MSG_EXPORT_BITS_WITHOUT)
        return None
    if export_bits and args.learn_bits:
        raise ConfigError(MSG_EXPORT_BITS_LEARN)
    if args.learn_bits and args.budget_bits is None:
        raise ConfigError(MSG_LEARN_BITS_BUDGET)
    if args.train is None:
        raise ConfigError(MSG_NO_TRAIN)
    weights = None
    if args.group_loss_weights:
        weights = parse_assignments(args.group_loss_weights.split(","), "--group-loss-weights", "W", float,
                                     "minority=3,majority=1")
    config = FinetuneConfig(
        epochs=args.epochs, batch_size=args.ft_batch_size, lr=args.lr, temperature=args.temperature,
        sampler=args.sampler, loss=args.loss, group_weights=weights, dro_eta=args.dro_eta,
        coreset_fraction=args.coreset_fraction, coreset_score=args.coreset_score, oscillation=args.oscillation,
        learn_bits=args.learn_bits, rounding=args.rounding,
        budget_bits=args.budget_bits if args.learn_bits else None, bit_epochs=args.bit_epochs,
        lambda_fair=args.lambda_fair, max_minutes=args.max_minutes, device=args.device, seed=args.seed,
        # --workers (shared with the search's engine): the DataLoader workers that read a CSV
        # manifest's images batch by batch; not given: in this process (an .npz is memory-mapped)
        num_workers=_F["num_workers"] if args.workers is None else args.workers,
    )
    train = open_stream(args.train, num_workers=config.num_workers)
    require_labels(train, "finetune")
    if calib_groups is not None and tuple(train.group_names) != tuple(calib_groups):
        raise DataError(MSG_GROUPS.format(source=train.source, train=", ".join(train.group_names),
                                          calib=", ".join(calib_groups)))
    return FinetunePlan(config, train, export_bits)


def run_finetune(plan: FinetunePlan, cm: CompressedModel, quiet: bool = False) -> CompressedModel:
    """Fine-tune ``cm`` and print the hold-out per-group table before/after."""
    out = finetune(cm, plan.train, plan.config, progress=not quiet)
    _print_summary(plan, out)
    return out


def run_finetune_widths(plan: FinetunePlan, cm: CompressedModel, quiet: bool = False) -> dict[int, CompressedModel]:
    """Fine-tune ``cm`` once and return it re-quantized at each of ``plan.export_bits``
    (``finetune_widths``); prints the same table as :func:`run_finetune`."""
    models = finetune_widths(cm, plan.train, plan.config, plan.export_bits, progress=not quiet)
    _print_summary(plan, next(iter(models.values())))
    return models


def _print_summary(plan: FinetunePlan, out: CompressedModel) -> None:
    rec = out.metadata.finetune
    rows = []
    for g in out.group_names:
        b, a = rec["holdout_before"][g], rec["holdout_after"][g]
        rows.append({"group": g, "n": b["count"],
                     "acc before %": f"{100 * b['accuracy']:.2f}", "acc after %": f"{100 * a['accuracy']:.2f}",
                     "loss before": f"{b['loss']:.4f}", "loss after": f"{a['loss']:.4f}"})
    cfg = plan.config
    print(f"fine-tuning ({cfg.loss}, {cfg.sampler} sampling): {rec['epochs_run']} epoch(s), {rec['steps']} steps, "
          f"{rec['seconds']:.1f} s, stopped: {rec['stopped']}, kept epoch {rec['best_epoch']}; "
          f"hold-out slice of --train ({rec['num_holdout']} samples):")
    print_table(rows, list(rows[0].keys()))
    if rec.get("baq"):
        baq = rec["baq"]
        print(f"\nlearned widths (BAQ, budget {baq['budget_bits']:g} bits, exported avg {baq['avg_bits']:.3f}):")
        print_table([{"layer": n, "learned": f"{b:.2f}", "bits": baq["bits"][n]} for n, b in baq["learned_bits"].items()],
                    ["layer", "learned", "bits"])
    print()
