"""``fqexport analyze``: per-group disparity diagnostics of a float model and its quantized variants.

Prints one row per (group, variant): sample count, accuracy, loss, logit variance, gradient
norm, top Hessian eigenvalue (power iteration; ``*`` after the iteration count: not converged),
then which group is sharpest and which is hurt most by each width. ``--json`` writes everything
(including the changes from float) atomically. Exit codes: 0 ok, 2 bad input (an
:class:`~fqexport.errors.FqexportError`, printed by ``fqexport.cli:main``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fqexport.cli.common import (
    EXIT_OK,
    add_model_options,
    common_options,
    int_at_least,
    print_table,
)
from fqexport.cli.paths import Output, check_paths
from fqexport.graph.loading import load_model
from fqexport.metrics.diagnostics import ROW_COLUMNS, analyze
from fqexport.validation.reports import write_json_data

EPILOG = (
    "Definitions: loss = mean cross-entropy of the group; logit var = mean over samples of the "
    "variance of the logit vector; grad norm = ||d loss / d params||; λ_max = dominant eigenvalue of "
    "the group's loss Hessian w.r.t. all parameters (power iteration with Hessian-vector products). "
    "Quantized variants are the PyTorch fake-quant reference (W<b>A8); gradients pass the activation "
    "fake quantization with a clipped straight-through estimator."
)


def add_analyze_parser(subparsers) -> None:
    """Register ``analyze`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "analyze",
        parents=[common_options()],
        help="per-group diagnostics (loss, gradient norm, Hessian λ_max) float vs quantized",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
    )
    add_model_options(p)
    p.add_argument("--data", required=True, help="group-labeled data to diagnose (.npz or CSV manifest)")
    p.add_argument("--calib", help="calibration data for the quantized variants (default: --data)")
    p.add_argument("--bits", type=int, nargs="*", default=[8, 4], metavar="B",
                   help="weight widths to compare with float (default: 8 4; none: float only)")
    p.add_argument("--method", choices=["rtn", "solver"], default="rtn", help="weight quantizer (default rtn)")
    p.add_argument("--hessian-iters", type=int_at_least(0), default=20,
                   help="max Hessian-vector products of the power iteration (0: skip λ_max)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative convergence tolerance of the power iteration")
    p.add_argument("--max-samples-per-group", type=int_at_least(1), default=512,
                   help="samples per group used (seeded random subset when larger)")
    p.add_argument("--batch-size", type=int_at_least(1), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the full report as JSON here")
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``analyze`` from parsed args: print the table and summary, write JSON; return 0."""
    check_paths(
        [("--model", args.model), ("--weights", args.weights), ("--data", args.data), ("--calib", args.calib)],
        [Output("--json", args.json) if args.json is not None else None],
    )
    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    report = analyze(
        model, args.data, bits=tuple(args.bits), method=args.method, calib=args.calib,
        batch_size=args.batch_size, hessian_iters=args.hessian_iters,
        max_samples_per_group=args.max_samples_per_group, seed=args.seed, tol=args.tol,
        progress=not args.quiet,
    )
    print_table(report.rows(), ROW_COLUMNS)
    print()
    for line in report.summary():
        print(line)
    if args.json is not None:
        write_json_data(report.to_dict(), args.json)
        print(f"wrote {args.json}")
    return EXIT_OK
