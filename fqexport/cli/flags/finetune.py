"""The fine-tuning flags of ``fqexport compress`` (``--finetune --train train.npz ...``): built
from ``FinetuneConfig``'s defaults and checked into a ``FinetuneConfig`` before any compute."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import get_args

from fqexport.cli.common import parse_group_assignments
from fqexport.cli.flags.shared import SEARCH_ONLY_FLAGS, OnlyWith, given_flags, parse_bit_choices, refuse_ignored
from fqexport.config import SUPPORTED_WEIGHT_BITS
from fqexport.errors import ConfigError
from fqexport.finetune.config import CoresetScore, FinetuneConfig, GroupLoss, Rounding, Sampler

_F = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}

MSG_NO_TRAIN = "--finetune needs training data: give --train train.npz (arrays x, y, group) or a CSV manifest"
MSG_LEARN_BITS_WITHOUT = "--learn-bits is a fine-tuning option: add --finetune --train train.npz"
MSG_LEARN_BITS_BUDGET = "--learn-bits needs --budget-bits (average weight bits, e.g. 2.5)"
MSG_LEARN_BITS_SEARCH = (
    "--learn-bits learns the widths by fine-tuning instead of running the mixed-precision search, so "
    "{flags} (options of the search) would be ignored: drop them, or drop --learn-bits to run the search"
)
MSG_FINETUNE_WITHOUT = (
    "{flags}: fine-tuning options, used only with --finetune, so they would be ignored: add --finetune "
    "--train train.npz, or drop them"
)
MSG_TRAIN_WITHOUT = "--train is only used with --finetune: add --finetune, or drop --train"
MSG_EXPORT_BITS_WITHOUT = "--export-bits exports several widths of one fine-tuning run: add --finetune --train train.npz"
MSG_EXPORT_BITS = (
    "--export-bits {value!r}: give comma-separated distinct widths from 2 to 8, e.g. --export-bits 3,4,8 "
    "(writes OUT.w3.onnx, OUT.w4.onnx, OUT.w8.onnx next to --out)"
)
MSG_EXPORT_BITS_BUDGET = (
    "--export-bits re-quantizes every layer at each width, which would discard the allocation the {flag} "
    "search finds (and exceed its budget): use one of them"
)
MSG_EXPORT_BITS_LAYER_BITS = (
    "--export-bits re-quantizes every layer at each width, which would discard the widths --layer-bits gives "
    "({layers}): use one of them"
)
MSG_EXPORT_BITS_LEARN = (
    "--export-bits re-quantizes every layer at each width, which would discard the widths --learn-bits "
    "learns: use one of them"
)


# The fine-tuning flags whose parse default is None (their FinetuneConfig field's default when not
# given), so that one given without --finetune is refused: dest -> FinetuneConfig field.
FINETUNE_FIELDS = {"epochs": "epochs", "sampler": "sampler", "loss": "loss", "dro_eta": "dro_eta", "lr": "lr",
                   "ft_batch_size": "batch_size", "temperature": "temperature",
                   "coreset_fraction": "coreset_fraction", "coreset_score": "coreset_score",
                   "oscillation": "oscillation", "bit_epochs": "bit_epochs", "lambda_fair": "lambda_fair",
                   "rounding": "rounding"}
FINETUNE_ONLY_FLAGS = {**{dest: "--" + dest.replace("_", "-") for dest in FINETUNE_FIELDS},
                       "group_loss_weights": "--group-loss-weights", "max_minutes": "--max-minutes"}

# The fine-tuning flags that count only with another fine-tuning option (shared.refuse_ignored),
# as fqexport.finetune reads them: FinetuneConfig refuses the same fields set away from their default.
FINETUNE_ONLY_WITH = (
    OnlyWith({"group_loss_weights": "--group-loss-weights"}, "--loss group-weighted",
             lambda a: _given_or_default(a.loss, "loss") == "group-weighted"),
    OnlyWith({"dro_eta": "--dro-eta"}, "--loss worst-group",
             lambda a: _given_or_default(a.loss, "loss") == "worst-group"),
    OnlyWith({"coreset_fraction": "--coreset-fraction", "coreset_score": "--coreset-score"}, "--sampler core-set",
             lambda a: _given_or_default(a.sampler, "sampler") == "core-set"),
    OnlyWith({"bit_epochs": "--bit-epochs", "lambda_fair": "--lambda-fair"}, "--learn-bits", lambda a: a.learn_bits),
)


def _given_or_default(value, key: str):
    """A fine-tuning flag's value, its FinetuneConfig default when not given."""
    return _F[key] if value is None else value


def _default(key: str) -> str:
    """`` (default: X)`` of a fine-tuning flag whose parse default is None (None: not given)."""
    return f" (default: {_F[key]})"


def add_finetune_options(p: argparse.ArgumentParser) -> None:
    """``--finetune`` and its options (a group of ``compress``)."""
    ft = p.add_argument_group("fairness-aware fine-tuning after PTQ (--finetune)")
    ft.add_argument("--finetune", action="store_true", help="fine-tune the compressed model on --train data")
    ft.add_argument("--train", help="training data: .npz (x, y, group[, group_names]) or CSV manifest, "
                    "same groups as --calib (in any order)")
    ft.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs" + _default("epochs"))
    ft.add_argument("--sampler", choices=get_args(Sampler), default=None,
                    help="group-balanced (equal mass per group in each batch), natural (shuffled) or core-set "
                    "(per epoch the hardest samples of each group); with --loss worst-group it beat plain "
                    "natural/ce on the worst group on 3 benchmark tasks, not on every model (docs/finetune.md)"
                    + _default("sampler"))
    ft.add_argument("--loss", choices=get_args(GroupLoss), default=None,
                    help="worst-group (group DRO), group-weighted (--group-loss-weights) or ce (plain mean: "
                    "plain QAT is --loss ce --sampler natural)" + _default("loss"))
    ft.add_argument("--group-loss-weights", metavar="NAME=W,...", help="group weights of --loss group-weighted (a group not named gets weight 0: name every group, e.g. minority=3,majority=1)")
    ft.add_argument("--dro-eta", type=float, default=None,
                    help="step size of the worst-group weights (--loss worst-group)" + _default("dro_eta"))
    ft.add_argument("--lr", type=float, default=None, help="Adam step size of the latent weights" + _default("lr"))
    ft.add_argument("--ft-batch-size", type=int, default=None, help="fine-tuning batch size" + _default("batch_size"))
    ft.add_argument("--temperature", type=float, default=None, help="distillation temperature" + _default("temperature"))
    ft.add_argument("--coreset-fraction", type=float, default=None,
                    help="share of each group the core-set keeps per epoch (--sampler core-set)" + _default("coreset_fraction"))
    ft.add_argument("--coreset-score", choices=get_args(CoresetScore), default=None,
                    help="what the core-set ranks by: loss (distillation + label cross-entropy) or disagreement "
                    "(the distillation term alone: where quantization moved the model)" + _default("coreset_score"))
    ft.add_argument("--oscillation", type=float, default=None, metavar="LAMBDA",
                    help="oscillation (dampening) regulariser weight, e.g. 0.1; 0: off" + _default("oscillation"))
    ft.add_argument("--learn-bits", action="store_true",
                    help="BAQ: learn a width per layer under --budget-bits instead of running the mixed-precision "
                    "search (so --objective, --pin and the other search options are refused; --bit-choices is "
                    "used), project onto the budget, then fine-tune at the fixed widths. The budget is then "
                    "nominal bits: the parameter-weighted average code width, containers and scales not counted")
    ft.add_argument("--bit-epochs", type=int, default=None, help="epochs of the width-learning phase" + _default("bit_epochs"))
    ft.add_argument("--lambda-fair", type=float, default=None,
                    help="BAQ fairness penalty on max_g L_g - mean_g L_g" + _default("lambda_fair"))
    ft.add_argument("--rounding", choices=get_args(Rounding), default=None,
                    help="solver (start from the solver's codes) or adaptive (group-weighted AdaRound per "
                    "layer first, keeping the solver's codes where they reconstruct better)" + _default("rounding"))
    ft.add_argument("--export-bits", metavar="B,B,...",
                    help="export the fine-tuned model at each of these widths (re-quantized, no further "
                    "training; pair with --oscillation): --out m.onnx writes m.w3.onnx, m.w4.onnx, ... "
                    "instead of m.onnx")
    ft.add_argument("--max-minutes", type=float, default=None,
                    help="stop at the end of a step after this many minutes, keeping the best checkpoint "
                    "(default: no limit)")


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


def finetune_config(args: argparse.Namespace) -> FinetuneConfig | None:
    """The FinetuneConfig of the parsed flags (None without ``--finetune``), every flag
    combination checked. Raises ConfigError (exit 2) naming the flags."""
    export_bits = parse_export_bits(args.export_bits)
    if not args.finetune:
        if args.train is not None:
            raise ConfigError(MSG_TRAIN_WITHOUT)
        ignored = given_flags(args, FINETUNE_ONLY_FLAGS)
        if ignored:
            raise ConfigError(MSG_FINETUNE_WITHOUT.format(flags=", ".join(ignored)))
        if args.learn_bits:
            raise ConfigError(MSG_LEARN_BITS_WITHOUT)
        if export_bits:
            raise ConfigError(MSG_EXPORT_BITS_WITHOUT)
        return None
    if export_bits and args.learn_bits:
        raise ConfigError(MSG_EXPORT_BITS_LEARN)
    budgets = [f"--budget-{k}" for k in ("bits", "bytes", "bops") if getattr(args, f"budget_{k}", None) is not None]
    if export_bits and budgets:
        raise ConfigError(MSG_EXPORT_BITS_BUDGET.format(flag=budgets[0]))
    if export_bits and getattr(args, "layer_bits", None):
        raise ConfigError(MSG_EXPORT_BITS_LAYER_BITS.format(layers=", ".join(args.layer_bits)))
    if args.learn_bits and args.budget_bits is None:
        raise ConfigError(MSG_LEARN_BITS_BUDGET)
    ignored = given_flags(args, SEARCH_ONLY_FLAGS) if args.learn_bits else []
    if ignored:
        raise ConfigError(MSG_LEARN_BITS_SEARCH.format(flags=", ".join(ignored)))
    if args.train is None:
        raise ConfigError(MSG_NO_TRAIN)
    refuse_ignored(args, FINETUNE_ONLY_WITH)
    weights = None
    if args.group_loss_weights:
        weights = parse_group_assignments(args.group_loss_weights, "--group-loss-weights", "minority=3,majority=1")
    given = {key: getattr(args, dest) for dest, key in FINETUNE_FIELDS.items() if getattr(args, dest) is not None}
    return FinetuneConfig(
        **given, group_weights=weights, learn_bits=args.learn_bits,
        budget_bits=args.budget_bits if args.learn_bits else None,
        bit_choices=parse_bit_choices(args.bit_choices, _F["bit_choices"]) if args.learn_bits else _F["bit_choices"],
        max_minutes=args.max_minutes,
        device=args.device, seed=args.seed,
        # --workers (shared with the search's engine): the DataLoader workers that read a CSV
        # manifest's images batch by batch; not given: in this process (an .npz is memory-mapped)
        num_workers=_F["num_workers"] if args.workers is None else args.workers,
    )
