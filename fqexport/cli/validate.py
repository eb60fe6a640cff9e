"""``fqexport validate``: run an ONNX model per group in ONNX Runtime and gate on limits.

Exit codes: 0 every limit holds, 1 a limit is broken (each named with its value and group),
2 bad input (raised as :class:`~fqexport.errors.FqexportError`; ``fqexport.cli:main`` prints
``error: <message>`` and exits 2). Accuracy limits are in percent (``--min-worst-group-acc 85``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fqexport.cli.common import EXIT_FAILED, EXIT_OK, common_options, int_at_least
from fqexport.cli.paths import Output, check_paths
from fqexport.errors import ConfigError
from fqexport.exporters.cpu_isa import kernel_family
from fqexport.exporters.kernel_emulation import TARGETS
from fqexport.validation.gate import validate
from fqexport.validation.reports import (
    write_json,
    write_junit,
    write_markdown,
    write_plots,
)
from fqexport.validation.thresholds import Thresholds

EPILOG = (
    "accuracy limits, gaps, drops and kernel deviation are in percent points "
    "(--min-worst-group-acc 85 means 85 %%). Exit 0: all limits hold; 1: a limit is broken; "
    "2: bad input."
)


REPORT_FILES = ("report.json", "report.md", "group_accuracy.png", "latency.png")


def _batch_list(text: str) -> tuple[int, ...]:
    return tuple(int_at_least(1)(t) for t in text.split(",") if t.strip())


def add_validate_parser(subparsers) -> None:
    """Register ``validate`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "validate",
        parents=[common_options()],
        help="validate an ONNX model per group in ONNX Runtime (CI gate)",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
    )
    p.add_argument("model", type=Path, help="the ONNX model to validate")
    p.add_argument("--data", required=True, help="group-labeled test data: .npz (x, y, group[, group_names]) or CSV "
                   "manifest (images as CHW float in [0, 1], no resize, no normalisation)")
    p.add_argument("--reference", type=Path, default=None, help="float ONNX model to compare with (per-group drop, agreement)")
    g = p.add_argument_group("thresholds (accuracies in percent points)")
    g.add_argument("--min-acc", type=float, help="minimum overall accuracy, %%")
    g.add_argument("--min-worst-group-acc", type=float, help="minimum accuracy of every group, %%")
    g.add_argument("--max-acc-gap", type=float, help="maximum accuracy gap between groups (max - min), pp")
    g.add_argument("--max-group-drop", type=float, help="maximum per-group accuracy drop vs --reference, pp")
    g.add_argument("--max-latency-ms", type=float, help="maximum p95 latency per batch, ms (each --latency-batch-sizes)")
    g.add_argument("--max-size-mb", type=float, help="maximum file size incl. external data, MB (10^6 bytes)")
    g.add_argument("--max-kernel-deviation", type=float,
                   help="maximum per-group accuracy difference optimized vs unoptimized session, pp")
    p.add_argument("--target", dest="targets", action="append", choices=TARGETS, default=None,
                   help="int8 kernel target to gate (repeatable; default native = this CPU). x86-avx2, "
                        "x86-vnni and arm64: that CPU family's integer accumulation — this CPU's own session "
                        "when it is of that family, else the bit-exact emulation; every limit applies to each target")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="batch size of the accuracy runs")
    p.add_argument("--latency-batch-sizes", type=_batch_list, default=(1,), help="comma list, e.g. 1,32")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    p.add_argument("--warmup", type=int, default=5, help="untimed latency runs")
    p.add_argument("--repeats", type=int_at_least(1), default=30, help="timed latency runs")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--no-kernel-check", action="store_true", help="skip the unoptimized session and kernel dump")
    p.add_argument("--report-dir", type=Path, default=None, help="write report.json, report.md, plots here")
    p.add_argument("--junit", type=Path, default=None, help="write JUnit XML here (one test case per threshold)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots into --report-dir")
    p.set_defaults(func=run_validate)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100.0 * x:6.2f}"


def print_summary(report) -> None:
    """The per-group table and one PASS/FAIL line per check, on stdout."""
    m = report.metrics
    has_ref = report.reference_metrics is not None
    has_k = report.unoptimized_metrics is not None
    header = f"{'group':<16} {'n':>7} {'acc %':>7} {'loss':>8}"
    header += f" {'ref %':>7} {'drop':>7}" if has_ref else ""
    header += f" {'unopt %':>7} {'k.dev':>7}" if has_k else ""
    isa = report.cpu_isa
    print(f"model {report.model}  data {report.data_source}  provider {report.provider}  "
          f"cpu {isa} (int8 kernel family {kernel_family(isa)})")
    print(header)
    for name, r in m.by_group.items():
        line = f"{name:<16} {r['count']:>7} {_pct(r['accuracy']):>7} {r['loss']:>8.4f}"
        if has_ref:
            line += f" {_pct(report.reference_metrics.by_group[name]['accuracy']):>7} {_pct(report.group_drop[name]):>7}"
        if has_k:
            line += f" {_pct(report.unoptimized_metrics.by_group[name]['accuracy']):>7} {_pct(report.kernel_deviation_by_group[name]):>7}"
        print(line)
    print(f"{'overall':<16} {m.overall['count']:>7} {_pct(m.overall['accuracy']):>7} {m.overall['loss']:>8.4f}")
    worst, acc = m.group_min("accuracy")
    print(f"worst group {worst}: {_pct(acc).strip()} %; gap {_pct(m.difference('accuracy')).strip()} pp")
    if m.equalized_odds_difference is not None:
        print(f"equalized-odds diff {m.equalized_odds_difference:.4f}; demographic-parity diff {m.demographic_parity_difference:.4f}")
    if report.agreement is not None:
        print(f"top-1 agreement with reference: {_pct(report.agreement).strip()} %")
    for target in report.targets[1:]:
        tm = report.target_metrics[target]
        dev = (report.target_kernel_deviation_by_group or {}).get(target)
        accs = ", ".join(
            f"{g} {_pct(r['accuracy']).strip()} %" + (f" (k.dev {_pct(dev[g]).strip()})" if dev else "")
            for g, r in tm.by_group.items()
        )
        how = "this CPU's own kernels" if target in report.target_native else "emulated"
        print(f"target {target} ({how}): {accs}; agreement with native "
              f"{_pct(report.target_agreement[target]).strip()} %")
    if report.fused_kernels is not None:
        ks = ", ".join(f"{k}={v}" for k, v in report.fused_kernels.items() if v)
        print(f"kernels: {ks} (what ORT fused on {isa})")
        if report.float_fallbacks:
            print(f"float Conv/Gemm/MatMul: {', '.join(report.float_fallbacks)}")
    for lat in report.latency:
        print(f"latency on {isa} batch {lat.batch_size}: p50 {lat.p50_ms:.3f} ms, p95 {lat.p95_ms:.3f} ms, "
              f"{lat.throughput_per_s:.1f} samples/s ({lat.threads} threads, {lat.warmup} warm-up, {lat.repeats} runs)")
    bops = f"{report.bops:.4g}" if report.bops is not None else "n/a"
    print(f"size {report.size_bytes} B; avg weight bits {report.avg_weight_bits:.2f}; BOPs {bops}; "
          f"PePR {report.pepr:.4f} (worst group {report.pepr_worst_group:.4f})")
    for c in report.checks:
        print(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.message}")
    print("PASS" if report.passed else f"FAIL: {len(report.failures())} limit(s) broken")


def run_validate(args: argparse.Namespace) -> int:
    """Run ``validate`` from parsed args; print, write reports; 0 pass, 1 a limit broken."""
    check_paths(
        [("model", args.model), ("--data", args.data), ("--reference", args.reference),
         ("model's external data", Path(f"{args.model}.data"))],
        [Output("--report-dir", args.report_dir, REPORT_FILES) if args.report_dir is not None else None,
         Output("--junit", args.junit) if args.junit is not None else None],
    )
    if args.threads is not None and args.threads < 0:
        raise ConfigError(f"--threads {args.threads} must be >= 0")
    thresholds = Thresholds(
        min_acc=args.min_acc,
        min_worst_group_acc=args.min_worst_group_acc,
        max_acc_gap=args.max_acc_gap,
        max_group_drop=args.max_group_drop,
        max_latency_ms=args.max_latency_ms,
        max_size_mb=args.max_size_mb,
        max_kernel_deviation=args.max_kernel_deviation,
    )
    report = validate(
        args.model,
        args.data,
        reference=args.reference,
        thresholds=thresholds,
        provider=args.provider,
        batch_size=args.batch_size,
        latency_batch_sizes=args.latency_batch_sizes,
        measure_latency=not args.no_latency,
        kernel_check=not args.no_kernel_check,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        targets=tuple(args.targets or ("native",)),
    )
    print_summary(report)
    if args.report_dir is not None:
        write_json(report, args.report_dir / "report.json")
        write_markdown(report, args.report_dir / "report.md")
        if not args.no_plots:
            write_plots(report, args.report_dir)
        print(f"reports written to {args.report_dir}")
    if args.junit is not None:
        write_junit(report, args.junit)
    return EXIT_OK if report.passed else EXIT_FAILED
