"""``fqexport sweep``: the mixed-precision search over several stored-bits budgets, written
as a Pareto report (JSON, CSV and, with matplotlib, a PNG)."""

from __future__ import annotations

from pathlib import Path

from fqexport.calibration.readers import load_data
from fqexport.cli.common import (
    EXIT_OK,
    add_model_and_quant_options,
    add_search_options,
    common_options,
    print_table,
    quant_config,
    search_config,
)
from fqexport.cli.paths import Output, check_paths
from fqexport.errors import ConfigError
from fqexport.graph.loading import load_model
from fqexport.search.pareto import (
    pareto_sweep,
    plot_pareto,
    write_pareto_csv,
    write_pareto_json,
)

PARETO_FILES = ("pareto.json", "pareto.csv", "pareto.png")


def _parse_budgets(text: str) -> list[float]:
    message = f"--budgets {text!r}: expected stored bits per weight like 2.5,3,3.5,4"
    try:
        budgets = [float(b) for b in text.split(",") if b.strip()]
    except ValueError as err:
        raise ConfigError(message) from err
    if not budgets:
        raise ConfigError(message)
    return budgets


def add_sweep_parser(sub) -> None:
    """Register ``sweep`` on an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "sweep", parents=[common_options()], help="mixed-precision search over budgets: a Pareto report",
        description="Run the fairness-aware mixed-precision search at each average-bits budget (the "
        "per-group sensitivity table is measured once) and write budget, average bits, weight bytes, "
        "worst-group and mean accuracy per budget to pareto.json, pareto.csv and pareto.png (the plot "
        "needs matplotlib).",
    )
    add_model_and_quant_options(p)
    p.add_argument("--budgets", required=True, help="stored bits per weight (codes in their containers + scales, as --budget-bits "
                        "of compress), comma separated, e.g. 2.5,3,3.5,4; more budget never returns a worse "
                        "measured worst group (a point reuses a smaller budget's result, see reused_from)")
    p.add_argument("--out-dir", required=True, help="folder for pareto.json, pareto.csv, pareto.png")
    p.add_argument("--test", help="measure each point on this labeled data (.npz/CSV) instead of the "
                   "held-out calibration data")
    add_search_options(p.add_argument_group("search"))
    p.set_defaults(func=run_sweep)


def run_sweep(args) -> int:
    check_paths(
        [("--model", args.model), ("--weights", args.weights), ("--calib", args.calib), ("--test", args.test)],
        [Output("--out-dir", args.out_dir, PARETO_FILES),
         Output("--sensitivity-cache", args.sensitivity_cache) if args.sensitivity_cache else None],
    )
    budgets = _parse_budgets(args.budgets)
    config = quant_config(args)
    configs = [search_config(args, budget_bits=b) for b in budgets]  # all checked before any search
    template = configs[0]
    test = load_data(args.test) if args.test else None
    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    points = pareto_sweep(model, args.calib, budgets, template, config, test=test, progress=not args.quiet)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_pareto_json(points, out / "pareto.json"), write_pareto_csv(points, out / "pareto.csv")]
    png = plot_pareto(points, out / "pareto.png")
    if png is not None:
        written.append(png)
    where = f"on {args.test}" if test is not None else "on held-out calibration data"
    print(f"Pareto sweep ({template.objective}), accuracies {where}:")
    print_table([{"budget": f"{p.budget:g}", "avg bits": f"{p.avg_bits:.3f}", "weight bytes": f"{p.weight_bytes:,.0f}",
                  "worst group": p.worst_group, "worst-group %": f"{100 * p.worst_group_acc:.2f}",
                  "mean %": f"{100 * p.mean_acc:.2f}", "float worst-group %": f"{100 * p.float_worst_group_acc:.2f}"}
                 for p in points],
                ["budget", "avg bits", "weight bytes", "worst group", "worst-group %", "mean %", "float worst-group %"])
    print("wrote " + ", ".join(str(w) for w in written) + ("" if png else " (no plot: matplotlib is not installed)"))
    return EXIT_OK
