"""``fqexport sweep``, run after its flags and paths passed (``fqexport.cli.flags.sweep``): the
mixed-precision search over several stored-bits budgets, written as a Pareto report (JSON, CSV
and, with matplotlib, a PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fqexport.calibration.readers import load_data
from fqexport.cli.common import EXIT_OK, print_table
from fqexport.cli.flags.shared import quant_config, search_config
from fqexport.cli.flags.sweep import parse_budgets
from fqexport.cli.tasks import task_of
from fqexport.graph.loading import load_model
from fqexport.search.pareto import (
    pareto_sweep,
    plot_pareto,
    write_pareto_csv,
    write_pareto_json,
)


def run_sweep(args: argparse.Namespace) -> int:
    """Run ``sweep`` from parsed, checked args: the search at every budget, the Pareto files; return 0."""
    budgets = parse_budgets(args.budgets)
    config = quant_config(args)
    configs = [search_config(args, budget_bits=b) for b in budgets]
    template = configs[0]
    test = load_data(args.test) if args.test else None
    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle, decode=args.decode)
    points = pareto_sweep(model, args.calib, budgets, template, config, test=test, progress=not args.quiet,
                          task=task_of(args))
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
