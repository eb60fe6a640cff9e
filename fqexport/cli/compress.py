"""``fqexport compress``: quantize a float model (uniform or by the mixed-precision search) and
write a QDQ ONNX file checked against the PyTorch fake-quant reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from fqexport.cli.common import (
    EXIT_OK,
    add_model_and_quant_options,
    add_search_options,
    common_options,
    print_table,
    quant_config,
    search_config,
)
from fqexport.config import QuantConfig
from fqexport.graph.loading import load_model
from fqexport.pipeline.compress import compress
from fqexport.search.mixed_precision import MixedPrecisionResult, search_mixed_precision
from fqexport.validation.reports import write_json_data


def add_compress_parser(sub) -> None:
    """Register ``compress`` on an ``argparse`` subparsers object."""
    p = sub.add_parser("compress", parents=[common_options()], help="quantize a float model and export QDQ ONNX",
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


def run_compress(args: argparse.Namespace) -> int:
    """Run ``compress`` from parsed args: quantize, export, print the layer table; return 0."""
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
        summary = {"export": result.to_dict(), "layers": cm.layer_table(), "metadata": cm.metadata.to_dict(),
                   "avg_weight_bits": cm.avg_weight_bits}
        if search is not None:
            summary["mixed_precision"] = search.to_dict()
        write_json_data(summary, Path(args.report))
    return EXIT_OK


def _run_search(args: argparse.Namespace, model, config: QuantConfig) -> MixedPrecisionResult:
    """The fairness-aware mixed-precision search of ``fqexport compress --budget-*``."""
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
