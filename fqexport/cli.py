"""Command line: ``fqexport compress | validate | analyze | sweep | demo``.

The CLI only parses arguments and calls the API. Exit codes: 0 ok, 1 a validation limit
broken, 2 bad input (any other fqexport error), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import ConfigError, FqexportError, ValidationFailed

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parse_assignments(items: Sequence[str], flag: str, value: str, convert, example: str) -> dict:
    # value names the right-hand side in messages: "BITS" (an integer) or "W" (a number)
    """``["a=1", "b=2"]`` → ``{"a": convert("1"), ...}`` with errors naming ``flag``."""
    out = {}
    for item in items:
        name, sep, raw = item.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"{flag} {item!r}: expected NAME={value}, e.g. {example}")
        try:
            out[name] = convert(raw)
        except ValueError as err:
            kind = "an integer" if convert is int else "a number"
            raise ConfigError(f"{flag} {item!r}: {value} must be {kind}") from err
    return out


def _parse_layer_bits(items: Sequence[str]) -> dict[str, int]:
    return _parse_layer_bits_flag(items, "--layer-bits")


def _parse_layer_bits_flag(items: Sequence[str], flag: str) -> dict[str, int]:
    return _parse_assignments(items, flag, "BITS", int, "fc=8")


def _parse_group_weights(text: str | None):
    """``equal`` (None), ``samples``, or ``NAME=W,NAME=W``."""
    if text is None or text == "equal":
        return None
    if text == "samples":
        return "samples"
    return _parse_assignments(text.split(","), "--group-weights", "W", float, "minority=2,majority=1")


def print_table(rows: list[dict], columns: list[str], file=None) -> None:
    """Print ``rows`` as an aligned text table."""
    file = file or sys.stdout
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def _common() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name (``fqexport compress ... -q``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return common


def add_model_and_quant_options(p: argparse.ArgumentParser) -> None:
    """The model, calibration data and QuantConfig options (``compress`` and ``sweep``)."""
    p.add_argument("--model", required=True, help="'package.module:factory', a torch.export .pt2 file, "
                   "or a pickled module file (with --trust-pickle)")
    p.add_argument("--weights", help="state_dict file for the factory (torch.load weights_only=True)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled whole module")
    p.add_argument("--calib", required=True, help="calibration data: .npz (x, y, group[, group_names]) or CSV manifest")
    p.add_argument("--weight-bits", type=int, default=8, help="weight width of every layer, 2..8 (default 8)")
    p.add_argument("--layer-bits", action="append", default=[], metavar="NAME=BITS", help="per-layer width (repeatable)")
    p.add_argument("--method", choices=["solver", "rtn"], default="solver", help="weight quantizer (default solver)")
    p.add_argument("--order", choices=["sensitivity", "hessian-diag", "natural"], default="sensitivity")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening relative to mean(diag H)")
    p.add_argument(
        "--solver-target", choices=["float-output", "layer"], default="float-output",
        help="fit each layer to the float model's output (default; corrects the error its quantized "
             "inputs carry) or to its own float weights on those inputs (plain GPTQ)",
    )
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--group-weights", help="'equal' (default), 'samples', or NAME=W,NAME=W")
    p.add_argument("--calibration", choices=["minmax", "percentile", "mse"], default="minmax",
                   help="activation range observer (default minmax: never clips a group's tail)")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--num-calib", type=int, default=512, help="calibration samples, drawn group-balanced")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weight-range", choices=["x86-safe", "full"], default="x86-safe",
                   help="x86-safe: 8-bit weights in |q|<=63 so AVX2 u8*s8 kernels cannot saturate; "
                   "full: |q|<=127 for VNNI CPUs and GPUs")
    p.add_argument("--storage", choices=["auto", "int8", "packed"], default="auto",
                   help="auto: <=4-bit layers packed INT4; int8: every layer int8 (fastest); packed: INT4, INT2 for 2-bit")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel clipping search for weight scales (default: on for rtn and 2-bit layers, off for the solver at 3+ bits)")
    p.add_argument("--no-bias-correction", action="store_true")
    p.add_argument("--no-bn-reestimate", action="store_true")
    p.add_argument("--skip-unsupported", action="store_true", help="leave unsupported layers in float (warn)")
    p.add_argument("--seed", type=int, default=0)


def add_search_options(mp) -> None:
    """The MixedPrecisionConfig options but the budget (``compress`` and ``sweep``)."""
    mp.add_argument("--objective", choices=["worst-group", "mean", "weighted"], default="worst-group")
    mp.add_argument("--bit-choices", default="2,3,4,5,6,8", help="candidate widths, comma separated")
    mp.add_argument("--pin", action="append", default=[], metavar="PATTERN=BITS",
                    help="fix layers matching a name pattern (fnmatch) to a width, e.g. 'stem.*=8' (repeatable)")
    mp.add_argument("--sensitivity", choices=["measured", "fisher"], default="measured")
    mp.add_argument("--candidates", type=int, default=3, help="allocations verified on held-out calibration data")
    mp.add_argument("--verify-folds", type=int, default=3,
                    help="cross-fitting folds of the verification: each candidate is quantized on all folds but "
                    "one and measured on the one left out, for every fold (1: a single 30%% hold-out split)")
    mp.add_argument("--objective-weights", metavar="NAME=W,...", help="group weights of --objective weighted")
    mp.add_argument("--sensitivity-cache", help="JSON file caching the sensitivity table across runs")


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", parents=[_common()], help="quantize a float model and export QDQ ONNX",
                       description="Quantize a float PyTorch model with group-labeled calibration data "
                       "and write a QDQ ONNX file (checked against the PyTorch fake-quant reference).")
    add_model_and_quant_options(p)
    p.add_argument("--out", required=True, help="output ONNX file")
    p.add_argument("--report", help="write a JSON summary (layers, export checks) to this file")
    mp = p.add_argument_group("fairness-aware mixed precision (any budget turns the search on)")
    budget = mp.add_mutually_exclusive_group()
    budget.add_argument("--budget-bits", type=float, help="average weight bits (parameter-weighted), e.g. 4.0")
    budget.add_argument("--budget-bytes", type=float, help="weight bytes of the export (codes + per-channel scales)")
    budget.add_argument("--budget-bops", type=float, help="bit operations per sample: sum of w_bits * 8 * MACs")
    add_search_options(mp)
    p.set_defaults(func=run_compress)


def quant_config(args):
    """The QuantConfig of the parsed ``add_model_and_quant_options`` flags."""
    from .config import QuantConfig

    return QuantConfig(
        weight_bits=args.weight_bits, layer_bits=_parse_layer_bits(args.layer_bits), method=args.method,
        order=args.order, damp=args.damp, solver_target=args.solver_target, block_size=args.block_size,
        group_weights=_parse_group_weights(args.group_weights), calibration=args.calibration,
        percentile=args.percentile, num_calib=args.num_calib, batch_size=args.batch_size,
        weight_range=args.weight_range, storage=args.storage, bias_correction=not args.no_bias_correction,
        bn_reestimate=not args.no_bn_reestimate, skip_unsupported=args.skip_unsupported, seed=args.seed,
        clip_search=args.clip_search,
    )


def run_compress(args) -> int:
    from .model_loading import load_model
    from .pipeline import compress

    config = quant_config(args)
    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle)
    search = None
    if args.budget_bits is not None or args.budget_bytes is not None or args.budget_bops is not None:
        search = _run_search(args, model, config)
        cm = search.compressed
    else:
        cm = compress(model, args.calib, config, progress=not args.quiet)
    result = cm.export(args.out)
    rows = [dict(r, macs=f"{r['macs']:,}", params=f"{r['params']:,}") for r in cm.layer_table()]
    print_table(rows, ["name", "kind", "bits", "params", "macs", "storage"])
    print(f"\naverage weight bits {cm.avg_weight_bits:.2f}; wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, opset {result.opset})")
    print(f"ONNX Runtime vs PyTorch fake-quant reference on {len(cm.calib)} calibration samples: "
          f"top-1 agreement {result.agreement:.2%}, max |logit diff| {result.max_abs_diff:.4g}")
    if args.report:
        from .exporters.reports import write_json_data

        summary = {"export": result.to_dict(), "layers": cm.layer_table(), "info": cm.info,
                   "avg_weight_bits": cm.avg_weight_bits}
        if search is not None:
            summary["mixed_precision"] = search.to_dict()
        write_json_data(summary, Path(args.report))
    return EXIT_OK


def search_config(args, **budget):
    """The MixedPrecisionConfig of the parsed ``add_search_options`` flags and ``budget``."""
    from .config import MixedPrecisionConfig

    try:
        choices = tuple(int(b) for b in args.bit_choices.split(","))
    except ValueError as err:
        raise ConfigError(f"--bit-choices {args.bit_choices!r}: expected integers like 2,3,4,8") from err
    return MixedPrecisionConfig(
        **budget, objective=args.objective, bit_choices=choices, pins=_parse_layer_bits_flag(args.pin, "--pin"),
        sensitivity=args.sensitivity, num_candidates=args.candidates, verify_folds=args.verify_folds,
        group_weights=_parse_assignments(args.objective_weights.split(","), "--objective-weights", "W", float,
                                         "minority=2") if args.objective_weights else None,
        cache_path=args.sensitivity_cache, seed=args.seed,
    )


def _run_search(args, model, config):
    """The fairness-aware mixed-precision search of ``fqexport compress --budget-*``."""
    from .mixed_precision import search_mixed_precision

    mp = search_config(args, budget_bits=args.budget_bits, budget_bytes=args.budget_bytes,
                       budget_bops=args.budget_bops)
    res = search_mixed_precision(model, args.calib, mp, config, progress=not args.quiet)
    print(f"mixed precision ({mp.objective}, budget {mp.budget_kind} {mp.budget_value:g}):")
    print_table(res.table(), ["name", "params", "bits", "sensitivity", "most_sensitive_group"])
    cands = []
    for c in res.candidates:
        cands.append({"chosen": "*" if c.allocation is res.allocation else "",
                      "avg bits": f"{c.allocation.avg_bits:.3f}",
                      "predicted worst Δloss": f"{c.allocation.predicted_worst:.4f}",
                      "held-out worst Δloss": f"{c.measured_worst:.4f}",
                      "held-out worst-group %": f"{100 * c.worst_group_acc:.2f}",
                      "held-out mean %": f"{100 * c.mean_acc:.2f}"})
    how = (f"{mp.verify_folds}-fold cross-fitted: every calibration sample held out once"
           if mp.verify_folds > 1 else f"a {mp.holdout_fraction:.0%} hold-out split")
    print(f"\ncandidates verified on held-out calibration data ({how}; predicted vs measured):")
    print_table(cands, list(cands[0].keys()))
    print()
    return res


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", parents=[_common()], help="run the whole pipeline on an embedded synthetic task",
                       description="Generate a group-labeled image task (90%% majority, 10%% inverted-contrast "
                       "minority), train a small ResNet on CPU, compress it (naive W8A8, fqexport W8A8, RTN W4A8, "
                       "fqexport W4A8), export QDQ ONNX, validate every model per group in ONNX Runtime.")
    p.add_argument("--out-dir", default="fqexport-demo", help="folder for checkpoint, data, ONNX files, reports")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .demo import run_demo as demo

    demo(Path(args.out_dir), seed=args.seed, progress=not args.quiet)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fqexport", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fqexport {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compress(sub)
    from .cli_validate import add_validate_parser

    add_validate_parser(sub)
    from .cli_analyze import add_analyze_parser

    add_analyze_parser(sub)
    from .cli_sweep import add_sweep_parser

    add_sweep_parser(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ValidationFailed as err:
        print(f"FAIL: {err}", file=sys.stderr)
        return EXIT_FAILED
    except FqexportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
