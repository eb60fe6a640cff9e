"""The flags of ``fqexport demo`` and their check before any compute."""

from __future__ import annotations

import argparse

from fqexport.cli.common import SEED, HelpFormatter, common_options
from fqexport.cli.flags.shared import MSG_LAYOUT
from fqexport.cli.paths import Output, check_paths
from fqexport.errors import ConfigError


def add_demo_parser(sub) -> None:
    """Register ``demo`` on an ``argparse`` subparsers object."""
    p = sub.add_parser("demo", parents=[common_options()], formatter_class=HelpFormatter,
                       help="run the whole pipeline on an embedded synthetic task",
                       description="Generate a group-labeled image task (90 percent majority, 10 percent "
                       "inverted-contrast minority), train a small ResNet on CPU, compress it (ORT quantize_static "
                       "W8A8, fqexport W8A8, RTN W4A8, fqexport W4A8, the worst-group mixed-precision search at "
                       "3 stored bits per weight), export QDQ ONNX, validate every model per group in ONNX Runtime.")
    p.add_argument("--out-dir", default="fqexport-demo", help="folder for checkpoint, data, ONNX files, reports")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the task, the training and the calibration draw")
    p.add_argument("--task", choices=("classification", "detection"), default="classification",
                   help="classification: the image task above; detection: scenes of shapes with known boxes and a "
                   "10 percent low-light minority, a YOLOv5-style detector (--layout v8: YOLOv8-style), float vs ORT "
                   "quantize_static (as a user runs it, and with the box decode excluded) vs fqexport W8A8 / W4A8 / "
                   "mixed at 3 bits, per-group COCO mAP after NMS, file size, latency at batch 1 and 8")
    p.add_argument("--layout", choices=("v5", "v8"), default=None,
                   help="the detector of --task detection (default: v5)")
    p.set_defaults(check=check_demo)


def check_demo(args: argparse.Namespace) -> None:
    """The output folder and ``--layout`` (an option of ``--task detection``), before any compute (exit 2)."""
    if args.layout is not None and args.task != "detection":
        raise ConfigError(MSG_LAYOUT.format(layout=args.layout, task=args.task))
    check_paths([], [Output("--out-dir", args.out_dir, ())])
