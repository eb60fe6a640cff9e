"""``fqexport demo``, run after its output folder passed (``fqexport.cli.flags.demo``): the
embedded default task end to end; prints the steps and the table."""

from __future__ import annotations

import argparse
from pathlib import Path

from fqexport.cli.common import EXIT_OK, print_table
from fqexport.demo.run import run_demo


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo; print each step and the per-group table; return 0."""
    result = run_demo(Path(args.out_dir), seed=args.seed, progress=not args.quiet, on_step=print)
    print()
    print_table(result.table, list(result.table[0].keys()))
    print(f"\ntraining {result.train_seconds:.0f} s, whole demo {result.total_seconds:.0f} s; "
          f"files in {result.out_dir}/")
    return EXIT_OK
