"""The flags of ``fqexport validate`` and their checks before any compute.

Exit codes: 0 every limit holds, 1 a limit is broken (each named with its value and group),
2 bad input. Accuracy limits are in percent (``--min-worst-group-acc 85``).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import fields
from pathlib import Path
from typing import get_args

from fqexport.cli.common import HelpFormatter, common_options, int_at_least
from fqexport.cli.flags.shared import OnlyWith, add_task_options, output_path, refuse_ignored, task_spec
from fqexport.cli.paths import Output, check_paths
from fqexport.config import MAX_THREADS, KernelTarget
from fqexport.errors import ConfigError
from fqexport.validation.reports import remove_earlier_reports
from fqexport.exporters.external_data import external_data_paths
from fqexport.validation.thresholds import Thresholds, check_measurements

DESCRIPTION = "Run an ONNX model per group in ONNX Runtime and gate on limits (the CI gate)."
EPILOG = (
    "Accuracy limits, gaps, drops and kernel deviation are in percent points "
    "(--min-worst-group-acc 85 means 85 percent); a detector's COCO mAP@[.5:.95] and a segmenter's mIoU "
    "in points too (--min-worst-group-map 40 means mAP 0.40). Exit 0: all limits hold; 1: a limit is broken; "
    "2: bad input."
)
REPORT_FILES = ("report.json", "report.md", "group_accuracy.png", "latency.png")
MSG_MODEL_DIR = "{flag} {path} is a directory; validate takes an .onnx file (the model's file, not its folder)"
MSG_MODEL_MISSING = "{flag} {path}: ONNX model does not exist: check the path"


def _batch_list(text: str) -> tuple[int, ...]:
    sizes = tuple(int_at_least(1)(t) for t in text.split(",") if t.strip())
    if not sizes:  # an empty list would switch latency off without --no-latency
        raise argparse.ArgumentTypeError(f"{text!r}: expected batch sizes like 1,32 (no latency: --no-latency)")
    return sizes


def add_validate_parser(subparsers) -> None:
    """Register ``validate`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "validate", parents=[common_options()], formatter_class=HelpFormatter,
        help="validate an ONNX model per group in ONNX Runtime (CI gate)",
        description=DESCRIPTION, epilog=EPILOG,
    )
    p.add_argument("model", type=Path, help="the ONNX model to validate")
    p.add_argument("--data", required=True, help="group-labeled test data: .npz (x, y, group[, group_names]; a "
                   "detector's boxes, box_labels, box_image; a segmenter's masks) or CSV manifest (images as CHW float "
                   "in [0, 1], no resize, no normalisation)")
    add_task_options(p)
    p.add_argument("--reference", type=Path, default=None,
                   help="float ONNX model to compare with (per-group drop, agreement)")
    g = p.add_argument_group("thresholds (accuracies in percent points; default: no limit)")
    g.add_argument("--min-acc", type=float, help="minimum overall accuracy, %%")
    g.add_argument("--min-worst-group-acc", type=float, help="minimum accuracy of every group, %%")
    g.add_argument("--max-acc-gap", type=float, help="maximum accuracy gap between groups (max - min), pp")
    g.add_argument("--max-group-drop", type=float, help="maximum per-group accuracy drop vs --reference, pp")
    g.add_argument("--max-latency-ms", type=float, help="maximum p95 latency per batch, ms (each --latency-batch-sizes)")
    g.add_argument("--max-size-mb", type=float, help="maximum file size incl. external data, MB (10^6 bytes)")
    g.add_argument("--max-kernel-deviation", type=float,
                   help="maximum per-group accuracy difference optimized vs unoptimized session, pp (a detector: mAP, "
                   "a segmenter: mIoU)")
    g.add_argument("--min-worst-group-map", type=float,
                   help="detection: minimum COCO mAP@[.5:.95] of every group, points (40 = 0.40)")
    g.add_argument("--max-group-map-drop", type=float,
                   help="detection: maximum per-group mAP@[.5:.95] drop vs --reference, points")
    g.add_argument("--min-worst-group-miou", type=float, help="segmentation: minimum mIoU of every group, points")
    g.add_argument("--max-group-miou-drop", type=float,
                   help="segmentation: maximum per-group mIoU drop vs --reference, points")
    g.add_argument("--max-map-gap", type=float,
                   help="detection: maximum mAP@[.5:.95] gap between groups (max - min), points")
    g.add_argument("--max-miou-gap", type=float, help="segmentation: maximum mIoU gap between groups (max - min), points")
    p.add_argument("--target", dest="targets", action="append", choices=get_args(KernelTarget), default=None,
                   help="int8 kernel target to gate (repeatable; default: native = this CPU). x86-avx2, "
                        "x86-vnni and arm64: that CPU family's integer accumulation, this CPU's own session "
                        "when it is of that family, else the bit-exact emulation; every limit applies to each target")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="batch size of the accuracy runs")
    p.add_argument("--latency-batch-sizes", type=_batch_list, default=None, metavar="B,B,...",
                   help="batch sizes of the latency runs, e.g. 1,32 (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="untimed latency runs (default: 5)")
    p.add_argument("--repeats", type=int_at_least(1), default=None, help="timed latency runs (default: 30)")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--no-kernel-check", action="store_true", help="skip the unoptimized session and kernel dump")
    p.add_argument("--report-dir", type=output_path, default=None, help="write report.json, report.md, plots here")
    p.add_argument("--junit", type=output_path, default=None, help="write JUnit XML here (one test case per threshold)")
    p.add_argument("--no-plots", action="store_true", default=None, help="do not write PNG plots into --report-dir")
    p.set_defaults(check=check_validate)


# The latency flags count only when latency is measured, --no-plots only with --report-dir
# (shared.refuse_ignored); their parse default is None so that a given one is seen: validate()
# holds the latency defaults.
LATENCY_FLAGS = {"latency_batch_sizes": "--latency-batch-sizes", "warmup": "--warmup", "repeats": "--repeats"}
VALIDATE_ONLY_WITH = (
    OnlyWith(LATENCY_FLAGS, "latency measurement (without --no-latency)", lambda a: not a.no_latency),
    OnlyWith({"no_plots": "--no-plots"}, "--report-dir", lambda a: a.report_dir is not None),
)


def thresholds(args: argparse.Namespace) -> Thresholds:
    """The limits of the parsed flags (percent points); built once per set of values, so that a
    limit that looks like a fraction is warned about once (the check and the run both ask)."""
    return _thresholds(tuple(getattr(args, f.name) for f in fields(Thresholds)))


@functools.lru_cache(maxsize=8)
def _thresholds(values: tuple) -> Thresholds:
    return Thresholds(*values)


def check_validate(args: argparse.Namespace) -> None:
    """Paths, ``--threads``, the limits and the measurements they need, before ONNX Runtime is
    imported (exit 2). An earlier run's reports at the output paths are removed first
    (:func:`~fqexport.validation.reports.remove_earlier_reports`, never an input): a run that
    stops with an error, here or later, leaves no earlier PASS for CI."""
    external = [("model's external data", p) for p in (Path(f"{args.model}.data"), *external_data_paths(args.model))]
    if args.reference is not None:
        external += [("--reference's external data", p) for p in external_data_paths(args.reference)]
    inputs = [("model", args.model), ("--data", args.data), ("--reference", args.reference), *external]
    # first: any error below (a bad output path, a limit, the flags) leaves no earlier PASS behind
    remove_earlier_reports(args.report_dir, args.junit, [p for _, p in inputs])
    check_paths(
        inputs,
        [Output("--report-dir", args.report_dir, REPORT_FILES) if args.report_dir is not None else None,
         Output("--junit", args.junit) if args.junit is not None else None],
    )
    for flag, model in (("model", args.model), ("--reference", args.reference)):
        if model is not None and Path(model).is_dir():
            raise ConfigError(MSG_MODEL_DIR.format(flag=flag, path=model))
    if args.threads is not None and not 0 <= args.threads <= MAX_THREADS:
        raise ConfigError(f"--threads {args.threads} must be from 0 (ORT's default) to {MAX_THREADS}")
    refuse_ignored(args, VALIDATE_ONLY_WITH)
    check_measurements(thresholds(args), reference=args.reference, kernel_check=not args.no_kernel_check,
                       latency=not args.no_latency)
    task_spec(args)
    if args.reference is not None and not Path(args.reference).exists():
        raise ConfigError(MSG_MODEL_MISSING.format(flag="--reference", path=args.reference))
