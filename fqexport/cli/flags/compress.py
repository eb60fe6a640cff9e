"""The flags of ``fqexport compress`` and their checks before any compute: every output path,
the QuantConfig, the search's MixedPrecisionConfig and the FinetuneConfig."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fqexport.atomic import file_head
from fqexport.cli.common import HelpFormatter, common_options
from fqexport.cli.flags.finetune import (
    add_finetune_options,
    finetune_config,
    parse_export_bits,
    width_paths,
)
from fqexport.cli.flags.shared import (
    FIXED_WIDTH_FLAGS,
    MODEL_ONLY_WITH,
    MSG_WIDTHS_WITH_BUDGET,
    SEARCH_ONLY_FLAGS,
    OnlyWith,
    add_model_and_quant_options,
    add_search_options,
    engine_reads_workers,
    given_flags,
    quant_config,
    refuse_ignored,
    search_config,
    task_spec,
)
from fqexport.cli.paths import Output, check_paths
from fqexport.errors import ConfigError

log = logging.getLogger(__name__)

MSG_SEARCH_WITHOUT_BUDGET = (
    "{flags}: options of the mixed-precision search, which runs only with a budget, so they would be "
    "ignored; add --budget-bits, --budget-bytes or --budget-bops, or drop them"
)


def add_compress_parser(sub) -> None:
    """Register ``compress`` on an ``argparse`` subparsers object."""
    p = sub.add_parser("compress", parents=[common_options()], formatter_class=HelpFormatter,
                       help="quantize a float model and export QDQ ONNX",
                       description="Quantize a float PyTorch model with group-labeled calibration data "
                       "and write a QDQ ONNX file (checked against the PyTorch fake-quant reference).")
    add_model_and_quant_options(p)
    p.add_argument("--out", required=True, help="output ONNX file")
    p.add_argument("--float-out", metavar="FLOAT.onnx",
                   help="also write the float model (BatchNorm folded, the same output as --out) as ONNX here: "
                   "the --reference of fqexport validate (per-group drop, speed vs float)")
    p.add_argument("--report", help="write a JSON summary (layers, export checks, speed) to this file")
    p.add_argument("--no-speed-check", action="store_true",
                   help="skip timing the file against its float model on this CPU at batch 1 and 32 (default: "
                   "timed, and the summary says whether the file buys speed or only size here)")
    mp = p.add_argument_group("fairness-aware mixed precision (any budget turns the search on)")
    budget = mp.add_mutually_exclusive_group()
    budget.add_argument("--budget-bits", type=float,
                        help="stored bits per weight, e.g. 3.0: codes in the containers the file holds (INT2, INT4 / "
                             "MatMulNBits, int8) plus their scales and zero points, over all weights; 3 and 5-7 "
                             "bits (only with --bit-choices) count at their container's width. With --learn-bits: "
                             "nominal bits instead (the parameter-weighted average code width BAQ learns under)")
    budget.add_argument("--budget-bytes", type=float,
                        help="size of the written ONNX file in bytes (weights, scales, graph, metadata): checked "
                             "against a real export; an allocation that does not fit is replaced by the next "
                             "smaller one and refitted")
    budget.add_argument("--budget-bops", type=float, help="bit operations per sample: sum of w_bits * 8 * MACs")
    add_search_options(mp)
    add_finetune_options(p)
    p.set_defaults(check=check_compress)


def search_budget(args: argparse.Namespace) -> dict[str, float] | None:
    """The budget of the mixed-precision search (``budget_bits=3.0``), or None when no search runs:
    no budget, or ``--learn-bits`` (then ``--budget-bits`` is BAQ's)."""
    given = {f"budget_{k}": getattr(args, f"budget_{k}") for k in ("bits", "bytes", "bops")}
    given = {k: v for k, v in given.items() if v is not None}
    if not given or args.learn_bits:
        return None
    return given


# The flags of compress alone that count only with another option (shared.refuse_ignored):
# --workers is read by fine-tuning's DataLoader and by the search's engine, unless it is serial
# or a running Ray cluster (shared.engine_reads_workers).
COMPRESS_ONLY_WITH = (
    OnlyWith({"workers": "--workers"}, "--finetune, or a budget with --engine local or auto, or --engine ray "
             "without --ray-address (a running cluster has its own CPUs)",
             lambda a: a.finetune or (search_budget(a) is not None and engine_reads_workers(a.engine, a.ray_address))),
)


def remove_earlier_compress_report(path: Path) -> bool:
    """Remove the ``--report`` an earlier compress wrote at ``path`` (a JSON file holding its
    ``"export"`` and ``"layers"`` records; anything else stays): a run stopped after writing ``--out``
    left the earlier run's report describing another file beside it. Whether it was removed."""
    head = file_head(path)
    if head is None or not (head.lstrip().startswith(b"{") and b'"export"' in head and b'"layers"' in head):
        return False
    path.unlink()
    log.info("removed %s, an earlier run's --report, before compressing", path)
    return True


def check_compress(args: argparse.Namespace) -> None:
    """Every check of ``compress`` that needs no data and no model: paths and flags (exit 2)."""
    widths = width_paths(args.out, parse_export_bits(args.export_bits))
    check_paths(
        [("--model", args.model), ("--decode", args.decode), ("--weights", args.weights), ("--calib", args.calib), ("--train", args.train)],
        [Output("--out", args.out) if not args.export_bits else None,
         *(Output(f"--export-bits ({b} bits)", path) for b, path in widths.items()),
         Output("--report", args.report) if args.report else None,
         Output("--float-out", args.float_out) if args.float_out else None,
         Output("--sensitivity-cache", args.sensitivity_cache) if args.sensitivity_cache else None],
    )
    if args.report:  # an earlier run's report must not sit beside this run's --out if this run stops
        remove_earlier_compress_report(Path(args.report))
    quant_config(args)
    task_spec(args)
    finetune_config(args)
    budget = search_budget(args)
    if budget is not None:  # (--learn-bits starts from the PTQ widths: they are used)
        fixed = given_flags(args, FIXED_WIDTH_FLAGS)
        if fixed:
            raise ConfigError(MSG_WIDTHS_WITH_BUDGET.format(flags=", ".join(fixed)))
        search_config(args, **budget)
    elif not args.learn_bits:
        unused = given_flags(args, {**SEARCH_ONLY_FLAGS, "bit_choices": "--bit-choices"})
        if unused:
            raise ConfigError(MSG_SEARCH_WITHOUT_BUDGET.format(flags=", ".join(unused)))
    refuse_ignored(args, COMPRESS_ONLY_WITH + MODEL_ONLY_WITH)
