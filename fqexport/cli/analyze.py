"""``fqexport analyze``, run after its flags and paths passed (``fqexport.cli.flags.analyze``):
per-group disparity diagnostics of a float model and its quantized variants, printed as a table
and a summary; ``--json`` writes everything (including the changes from float) atomically."""

from __future__ import annotations

import argparse

from fqexport.cli.common import EXIT_OK, parse_layer_bits, print_table
from fqexport.cli.flags.shared import given_values
from fqexport.config import QuantConfig
from fqexport.graph.loading import load_model
from fqexport.metrics.diagnostics import ROW_COLUMNS, analyze
from fqexport.validation.reports import write_json_data


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``analyze`` from parsed, checked args: print the table and summary, write JSON; return 0."""
    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle, decode=args.decode)
    config = (QuantConfig(layer_bits=parse_layer_bits(args.layer_bits), keep_float=tuple(args.keep_float))
              if args.layer_bits or args.keep_float else None)
    report = analyze(
        model, args.data, bits=tuple(args.bits), calib=args.calib, config=config, batch_size=args.batch_size,
        hessian_iters=args.hessian_iters, max_samples_per_group=args.max_samples_per_group, seed=args.seed,
        progress=not args.quiet, **given_values(args, ("method", "tol")),
    )
    print_table(report.rows(), ROW_COLUMNS)
    print()
    for line in report.summary():
        print(line)
    if args.json is not None:
        write_json_data(report.to_dict(), args.json)
        print(f"wrote {args.json}")
    return EXIT_OK
