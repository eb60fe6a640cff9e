"""``fqexport sweep``, run after its flags and paths passed (``fqexport.cli.flags.sweep``): the
mixed-precision search over several stored-bits budgets, written as a Pareto report (JSON, CSV
and, with matplotlib, a PNG). A budget below the minimum feasible one is skipped and shown as
``infeasible`` (in the table, pareto.json and pareto.csv); when no budget is feasible the sweep
exits 2 naming the minimum, and writes nothing."""

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
    ParetoPoint,
    pareto_sweep,
    plot_pareto,
    skipped_budgets,
    write_pareto_csv,
    write_pareto_json,
)

MSG_REUSED = (
    " (it measured better by the objective on the held-out samples than this budget's own search, whatever "
    "the noise: more budget never shows a worse point; `compress --budget-bits` at this budget writes its own "
    "search's result)"
)
COLUMNS = ["budget", "avg bits", "weight bytes", "worst group", "worst-group %", "overall %", "float worst-group %"]


def run_sweep(args: argparse.Namespace) -> int:
    """Run ``sweep`` from parsed, checked args: the search at every feasible budget, the Pareto
    files (infeasible budgets reported in them and in the table); return 0."""
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
    metric = points[0].metric if points else "accuracy"
    print(f"Pareto sweep ({template.objective}), {'accuracies' if metric == 'accuracy' else metric} {where} "
          f"(the % columns):")
    print_table([_row(p) for p in points], COLUMNS)
    skipped = skipped_budgets(points)
    if skipped:
        print(f"note: {skipped}")
    reused = [p for p in points if p.feasible and p.reused_from is not None]
    if reused:
        print("note: " + "; ".join(f"budget {p.budget:g} repeats budget {p.reused_from:g}'s result" for p in reused)
              + MSG_REUSED)
    print("wrote " + ", ".join(str(w) for w in written) + ("" if png else " (no plot: matplotlib is not installed)"))
    return EXIT_OK


def _row(p: ParetoPoint) -> dict[str, str]:
    """A point as a row of the console table; an infeasible budget says so and gives the minimum."""
    if not p.feasible:
        return {"budget": f"{p.budget:g}", "avg bits": "infeasible", "weight bytes": "-",
                "worst group": f"needs a budget >= {p.min_feasible_budget:g}", "worst-group %": "-", "overall %": "-",
                "float worst-group %": "-"}
    # a point that reuses a smaller budget's result (it measured better on the held-out samples) says so:
    # `compress --budget-bits` at this budget writes that budget's own search result (survey 99)
    budget = f"{p.budget:g}" if p.reused_from is None else f"{p.budget:g} (= {p.reused_from:g})"
    return {"budget": budget, "avg bits": f"{p.avg_bits:.3f}", "weight bytes": f"{p.weight_bytes:,.0f}",
            "worst group": p.worst_group, "worst-group %": f"{100 * p.worst_group_acc:.2f}",
            "overall %": f"{100 * p.mean_acc:.2f}", "float worst-group %": f"{100 * p.float_worst_group_acc:.2f}"}
