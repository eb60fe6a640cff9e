"""The flags of ``fqexport analyze`` and their checks before any compute."""

from __future__ import annotations

import argparse
import math

from fqexport.cli.common import SEED, HelpFormatter, common_options, int_at_least, parse_layer_bits
from fqexport.cli.flags.shared import (
    MODEL_ONLY_WITH,
    OnlyWith,
    add_model_options,
    add_task_options,
    output_path,
    refuse_ignored,
    task_spec,
)
from fqexport.cli.paths import Output, check_paths
from fqexport.config import check_bits
from fqexport.calibration.checks import MSG_NOT_CLASSIFIER, TASK_METRICS
from fqexport.errors import ConfigError


DESCRIPTION = (
    "Per-group disparity diagnostics of a float model and its quantized variants: one row per "
    "(group, variant) with sample count, accuracy, loss, logit variance, gradient norm and top Hessian "
    "eigenvalue (power iteration; * after the iteration count: not converged), then which group is "
    "sharpest and which is hurt most by each width. Classifiers only (logits [N, C]): a detector or "
    "segmenter is refused. Exit 0 ok, 2 bad input."
)
EPILOG = (
    "Definitions: loss = mean cross-entropy of the group; logit var = mean over samples of the "
    "variance of the logit vector; grad norm = ||d loss / d params||; λ_max = dominant eigenvalue of "
    "the group's loss Hessian w.r.t. all parameters (power iteration with Hessian-vector products). "
    "The parameters are those of the BatchNorm-folded model, for float and every quantized variant alike "
    "(the same function as the model, another parameterisation: a model with BatchNorm reads a lower "
    "grad norm than over its own unfolded parameters). Quantized variants are the PyTorch fake-quant "
    "reference (W<b>A8); gradients pass the activation fake quantization with a clipped straight-through "
    "estimator."
)


def add_analyze_parser(subparsers) -> None:
    """Register ``analyze`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "analyze", parents=[common_options()], formatter_class=HelpFormatter,
        help="per-group diagnostics (loss, gradient norm, Hessian λ_max) float vs quantized (classifiers)",
        description=DESCRIPTION, epilog=EPILOG,
    )
    add_model_options(p)
    add_task_options(p)
    p.add_argument("--data", required=True, help="group-labeled data to diagnose (.npz or CSV manifest)")
    p.add_argument("--calib", help="calibration data for the quantized variants (default: --data)")
    p.add_argument("--bits", type=int, nargs="*", default=[8, 4], metavar="B",
                   help="weight widths to compare with float (default: 8 4; a bare --bits with no width: float only)")
    p.add_argument("--method", choices=["rtn", "solver"], default=None, help="weight quantizer (default: rtn)")
    p.add_argument("--layer-bits", action="append", default=[], metavar="NAME=BITS",
                   help="a layer's width in every quantized variant, overriding --bits for it (repeatable): "
                   "to check what keeping a hurt layer wider buys each group")
    p.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                   help="keep matching weight layers float in every quantized variant (repeatable; patterns as "
                   "compress --keep-float); the summary names the layers each variant leaves off its width")
    p.add_argument("--hessian-iters", type=int_at_least(0), default=20,
                   help="max Hessian-vector products of the power iteration (0: skip λ_max)")
    p.add_argument("--tol", type=float, default=None,
                   help="relative convergence tolerance of the power iteration (default: 0.001)")
    p.add_argument("--max-samples-per-group", type=int_at_least(1), default=512,
                   help="samples per group used (seeded random subset when larger)")
    p.add_argument("--batch-size", type=int_at_least(1), default=128, help="samples per forward/backward pass")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the per-group subsets and the power iteration")
    p.add_argument("--json", type=output_path, default=None, metavar="FILE", help="write the full report as JSON here")
    p.set_defaults(check=check_analyze)


# The flags that count only with another option (shared.refuse_ignored); their parse default is
# None so that a given one is seen (analyze() holds the defaults).
ANALYZE_ONLY_WITH = (
    OnlyWith({"calib": "--calib", "method": "--method", "layer_bits": "--layer-bits", "keep_float": "--keep-float"},
             "quantized variants (--bits with a width)", lambda a: bool(a.bits)),
    OnlyWith({"tol": "--tol"}, "the power iteration (--hessian-iters above 0)", lambda a: a.hessian_iters > 0),
)


def check_analyze(args: argparse.Namespace) -> None:
    """The output path, the widths, the task and flags that would be ignored, before any compute (exit 2)."""
    refuse_ignored(args, ANALYZE_ONLY_WITH + MODEL_ONLY_WITH)
    check_paths(
        [("--model", args.model), ("--decode", args.decode), ("--weights", args.weights), ("--data", args.data), ("--calib", args.calib)],
        [Output("--json", args.json) if args.json is not None else None],
    )
    for bits in args.bits:
        check_bits(bits, "--bits")
    for bits in parse_layer_bits(args.layer_bits).values():
        check_bits(bits, "--layer-bits")
    if args.tol is not None and not (math.isfinite(args.tol) and args.tol > 0):  # analyze()'s rule, before the model loads
        raise ConfigError(f"--tol {args.tol:g}: must be a finite number > 0")
    task, _ = task_spec(args)
    if task not in (None, "classification"):
        raise ConfigError(MSG_NOT_CLASSIFIER.format(task=task, metric=TASK_METRICS[task]))
