"""The flags of ``fqexport sweep`` and their checks before any compute."""

from __future__ import annotations

import argparse
import logging

from fqexport.cli.common import HelpFormatter, common_options
from fqexport.cli.flags.shared import (
    FIXED_WIDTH_FLAGS,
    MODEL_ONLY_WITH,
    MSG_WIDTHS_WITH_BUDGET,
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
from fqexport.config import check_budget
from fqexport.errors import ConfigError

log = logging.getLogger(__name__)

PARETO_FILES = ("pareto.json", "pareto.csv", "pareto.png")

# The flags of sweep alone that count only with another option (shared.refuse_ignored): the
# search's serial engine runs one task after another, whatever --workers says.
SWEEP_ONLY_WITH = (
    OnlyWith({"workers": "--workers"}, "--engine local or auto, or --engine ray without --ray-address (a running "
             "cluster has its own CPUs)", lambda a: engine_reads_workers(a.engine, a.ray_address)),
)


def parse_budgets(text: str) -> list[float]:
    """``--budgets 2.5,3`` -> ``[2.5, 3.0]``, each budget once (``3,3`` searched it twice and wrote
    two identical rows); ConfigError when malformed, empty or out of range, naming ``--budgets``."""
    message = f"--budgets {text!r}: expected stored bits per weight like 2.5,3,3.5,4"
    parts = [b.strip() for b in text.split(",")]
    if parts and not parts[-1]:
        parts.pop()  # a trailing comma
    if "" in parts:  # `3,,4`: an unset variable in a CI script?
        raise ConfigError(f"{message} (an empty entry between commas: an unset variable?)")
    try:
        budgets = [float(b) for b in parts]
    except ValueError as err:
        raise ConfigError(message) from err
    if not budgets:
        raise ConfigError(message)
    for b in budgets:
        try:
            check_budget("bits", b)
        except ConfigError as err:
            raise ConfigError(f"--budgets {text!r}: {err}") from err
    once = list(dict.fromkeys(budgets))
    if len(once) < len(budgets):
        log.warning("--budgets %r: each budget is searched once (%s)", text, ",".join(f"{b:g}" for b in once))
    return once


def add_sweep_parser(sub) -> None:
    """Register ``sweep`` on an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "sweep", parents=[common_options()], formatter_class=HelpFormatter,
        help="mixed-precision search over budgets: a Pareto report",
        description="Run the fairness-aware mixed-precision search at each average-bits budget (the "
        "per-group sensitivity table is measured once) and write budget, average bits, weight bytes, "
        "worst-group and mean accuracy per budget to pareto.json, pareto.csv and pareto.png (the plot "
        "needs matplotlib).",
    )
    add_model_and_quant_options(p, fixed_widths=False)  # each point's widths are its budget's
    p.add_argument("--budgets", required=True, help="stored bits per weight (codes in their containers + scales, "
                   "as --budget-bits of compress), comma separated, e.g. 2.5,3,3.5,4; more budget never returns "
                   "a result that measured worse on the held-out samples by --objective (worst-group: a larger "
                   "worst-group loss increase; a point reuses a smaller budget's result, see reused_from; --test "
                   "accuracy is measured after, and may still dip)")
    p.add_argument("--out-dir", required=True, help="folder for pareto.json, pareto.csv, pareto.png")
    p.add_argument("--test", help="measure each point on this labeled data (.npz/CSV) instead of the "
                   "held-out calibration data")
    add_search_options(p.add_argument_group("search"))
    p.set_defaults(check=check_sweep)


def check_sweep(args: argparse.Namespace) -> None:
    """Paths, budgets and every config, before any compute (exit 2)."""
    check_paths(
        [("--model", args.model), ("--decode", args.decode), ("--weights", args.weights), ("--calib", args.calib), ("--test", args.test)],
        [Output("--out-dir", args.out_dir, PARETO_FILES),
         Output("--sensitivity-cache", args.sensitivity_cache) if args.sensitivity_cache else None],
    )
    budgets = parse_budgets(args.budgets)
    fixed = given_flags(args, FIXED_WIDTH_FLAGS)
    if fixed:
        raise ConfigError(MSG_WIDTHS_WITH_BUDGET.format(flags=", ".join(fixed)))
    quant_config(args)
    task_spec(args)
    for b in budgets:
        search_config(args, budget_bits=b)
    refuse_ignored(args, SWEEP_ONLY_WITH + MODEL_ONLY_WITH)
