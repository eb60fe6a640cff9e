"""``fqexport demo``: the embedded default task end to end; prints the steps and the table."""

from __future__ import annotations

import argparse
from pathlib import Path

from fqexport.cli.common import EXIT_OK, common_options, print_table
from fqexport.cli.paths import Output, check_paths
from fqexport.demo.run import run_demo


def add_demo_parser(sub) -> None:
    """Register ``demo`` on an ``argparse`` subparsers object."""
    p = sub.add_parser("demo", parents=[common_options()], help="run the whole pipeline on an embedded synthetic task",
                       description="Generate a group-labeled image task (90%% majority, 10%% inverted-contrast "
                       "minority), train a small ResNet on CPU, compress it (ORT quantize_static W8A8, fqexport "
                       "W8A8, RTN W4A8, fqexport W4A8, the worst-group mixed-precision search at an average of "
                       "3 weight bits), export QDQ ONNX, validate every model per group in ONNX Runtime.")
    p.add_argument("--out-dir", default="fqexport-demo", help="folder for checkpoint, data, ONNX files, reports")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo; print each step and the per-group table; return 0."""
    check_paths([], [Output("--out-dir", args.out_dir, ())])
    result = run_demo(Path(args.out_dir), seed=args.seed, progress=not args.quiet, on_step=print)
    print()
    print_table(result.table, list(result.table[0].keys()))
    print(f"\ntraining {result.train_seconds:.0f} s, whole demo {result.total_seconds:.0f} s; "
          f"files in {result.out_dir}/")
    return EXIT_OK
