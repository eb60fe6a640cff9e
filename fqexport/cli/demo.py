"""``fqexport demo``, run after its output folder passed (``fqexport.cli.flags.demo``): the
embedded default task end to end; prints the steps and the table."""

from __future__ import annotations

import argparse
from pathlib import Path

from fqexport.cli.common import EXIT_OK, print_table
from fqexport.demo.detection_run import run_detection_demo
from fqexport.demo.run import run_demo


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo (``--task``); print each step and the per-group table; return 0."""
    if args.task == "detection":
        kind = "yolov8" if args.layout == "v8" else "yolov5"  # --layout default: v5
        found = run_detection_demo(Path(args.out_dir), seed=args.seed, progress=not args.quiet, kind=kind,
                                   on_step=print)
        print()
        print_table(found.table, list(found.table[0].keys()))
        print(f"\nper-group COCO mAP@[.5:.95] / mAP@.5 in points; training {found.train_seconds:.0f} s, whole demo "
              f"{found.total_seconds:.0f} s; files in {found.out_dir}/")
        return EXIT_OK
    result = run_demo(Path(args.out_dir), seed=args.seed, progress=not args.quiet, on_step=print)
    print()
    print_table(result.table, list(result.table[0].keys()))
    print(f"\ntraining {result.train_seconds:.0f} s, whole demo {result.total_seconds:.0f} s; "
          f"files in {result.out_dir}/")
    return EXIT_OK
