"""``fqexport validate``, run after its flags and paths passed (``fqexport.cli.flags.validate``):
run an ONNX model per group in ONNX Runtime, print the summary, write the reports, and gate.

Exit codes: 0 every limit holds, 1 a limit is broken (``ValidationReport.raise_for_failures``
raises :class:`~fqexport.errors.ValidationFailed`, which ``fqexport.cli.main`` maps to 1 with
one ``FAIL:`` line on stderr), 2 bad input.
"""

from __future__ import annotations

import argparse
import math

from fqexport.cli.common import EXIT_OK, cell_text, display_width, pad
from fqexport.cli.flags.shared import given_values
from fqexport.cli.flags.validate import LATENCY_FLAGS, thresholds
from fqexport.cli.tasks import task_line, task_of
from fqexport.exporters.cpu_isa import kernel_family
from fqexport.metrics.group_metrics import MSG_ODDS_SUPPORT
from fqexport.validation.gate import validate
from fqexport.validation.reports import (
    REPORT_JSON,
    REPORT_MD,
    changes_line,
    float_tail_words,
    percent_text,
    remove_earlier_reports,
    remove_stale_plots,
    write_json,
    write_junit,
    write_markdown,
    write_plots,
)
from fqexport.validation.validation_report import UNOPTIMIZED


# Column heads of each task's metrics in the console table (fqexport.tasks metric_names).
HEADS = {"accuracy": "acc %", "loss": "loss", "map": "mAP %", "map50": "mAP50 %", "miou": "mIoU %", "dice": "Dice %",
         "pixel_accuracy": "pix %"}


def _cells(row, names) -> str:
    return " ".join(f"{row[k]:>8.4f}" if k == "loss" else f"{percent_text(row[k]):>7}" for k in names)


def print_summary(report) -> None:
    """The per-group table and one PASS/FAIL line per check, on stdout."""
    m = report.metrics
    p = m.primary
    has_ref = report.reference_metrics is not None
    has_k = report.unoptimized_metrics is not None
    w = max([16] + [display_width(cell_text(g)) for g in m.by_group])  # group names in any script line up
    header = f"{pad('group', w)} {'n':>7} " + " ".join(f"{HEADS.get(k, k):>{8 if k == 'loss' else 7}}"
                                                  for k in m.metric_names)
    header += f" {'ref %':>7} {'drop':>7}" if has_ref else ""
    header += f" {'unopt %':>7} {'k.dev':>7}" if has_k else ""
    isa = report.cpu_isa
    print(f"model {report.model}  data {report.data_source}  provider {report.provider}  "
          f"cpu {isa} (int8 kernel family {kernel_family(isa)})"
          + (f"; standing in for {report.host_kernels} (FQEXPORT_HOST_KERNELS: every --target family emulated; native is this CPU's own session)"
             if report.host_kernels else ""))
    if p != "accuracy":
        print(task_line(report.task))
    print(header)
    for name, r in m.by_group.items():
        line = f"{pad(cell_text(name), w)} {r['count']:>7} {_cells(r, m.metric_names)}"
        if has_ref:
            ref, drop = report.reference_metrics.by_group[name][p], report.group_drop[name]
            line += f" {percent_text(ref):>7} {percent_text(drop):>7}"
        if has_k:
            plain, dev = report.unoptimized_metrics.by_group[name][p], report.kernel_deviation_by_group[name]
            line += f" {percent_text(plain):>7} {percent_text(dev):>7}"
        print(line)
    print(f"{pad('overall', w)} {m.overall['count']:>7} {_cells(m.overall, m.metric_names)}")
    worst, acc = m.group_min()
    unmeasured = [cell_text(g) for g, r in m.by_group.items() if r["count"] > 0 and math.isnan(float(r[p]))]
    among = f" (without {', '.join(unmeasured)}: not measured)" if unmeasured else ""
    tied = m.tied_with_min()
    tie = f" (tied with {', '.join(cell_text(g) for g in tied)})" if tied else ""
    print(f"worst group {cell_text(worst)}{tie}: {percent_text(acc)} %; gap {percent_text(m.difference())} pp{among}")
    for line in report.group_lines():
        print(line)
    if m.equalized_odds_difference is not None:
        few = MSG_ODDS_SUPPORT.format(support=cell_text(support)) if (support := m.odds_support()) else ""
        print(f"equalized-odds diff {percent_text(m.equalized_odds_difference)} pp{few}; "
              f"demographic-parity diff {percent_text(m.demographic_parity_difference)} pp")
    if report.agreement is not None:
        print(f"{report.agreement_name} with reference: {percent_text(report.agreement)} %")
    if (line := changes_line(report, cell_text)) is not None:
        print(line)
    if report.metadata is not None and report.metadata.float_ops:
        print(f"kept float after the last weight layers ({float_tail_words(report.task)}): "
              f"{', '.join(report.metadata.float_ops)}")
    for target in report.targets[1:]:
        tm = report.target_metrics[target]
        dev = (report.target_kernel_deviation_by_group or {}).get(target)
        accs = ", ".join(
            # a name holding the separator is quoted ('Zoë, née Müller' would read as two groups)
            f"{repr(g) if ',' in g else cell_text(g)} {percent_text(r[p])} %"
            + (f" (k.dev {percent_text(dev[g])})" if dev else "")
            for g, r in tm.by_group.items()
        )
        nodes = (report.target_emulated_nodes or {}).get(target)
        native = (report.target_native_nodes or {}).get(target, ())
        how = ("this CPU's own kernels" if target in report.target_native else
               f"emulated: {len(nodes)} kernel-dependent node(s)" if nodes else
               "emulated: no fused node whose sums depend on the kernels, the same as this CPU's"
               if nodes == () and not native else "emulated")
        if native and target not in report.target_native:
            how += f"; {len(native)} node(s) not emulated, on this CPU's own kernels"
        print(f"target {target} ({how}): {accs}; agreement with native "
              f"{percent_text(report.target_agreement[target])} %")
    if report.kernel_reference not in (None, UNOPTIMIZED):
        print(f"unopt % and k.dev: against {report.kernel_reference}")
    if report.fused_kernels is not None:
        ks = ", ".join(f"{k}={v}" for k, v in report.fused_kernels.items() if v)
        print(f"kernels: {ks} (what ORT fused on {isa})")
        if report.float_fallbacks:
            print(f"float Conv/Gemm/MatMul: {', '.join(report.float_fallbacks)}")
    for lat in report.latency:
        print(f"latency on {isa} batch {lat.batch_size}: p50 {lat.p50_ms:.3f} ms, p95 {lat.p95_ms:.3f} ms, "
              f"{lat.throughput_per_s:.1f} samples/s ({lat.threads} threads, {lat.warmup} warm-up, {lat.repeats} runs)")
    paired = {lat.batch_size for lat in report.latency}
    for ref in report.reference_latency:
        how = "timed interleaved with the model" if ref.batch_size in paired else "its fixed batch, not compared"
        print(f"reference latency batch {ref.batch_size}: p50 {ref.p50_ms:.3f} ms ({how})")
    if report.speed_verdict():
        print(report.speed_verdict())
    bops = f"{report.bops:.4g}" if report.bops is not None else "n/a"
    print(f"size {report.size_bytes} B; avg weight bits {report.avg_weight_bits:.2f}; BOPs {bops}; "
          f"PePR {report.pepr:.4f} (worst group {report.pepr_worst_group:.4f})")
    for c in report.checks:
        print(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.message}")
    print("PASS" if report.passed else f"FAIL: {len(report.failures())} limit(s) broken")


def run_validate(args: argparse.Namespace) -> int:
    """Run ``validate`` from parsed, checked args; print, write reports; 0 when every limit holds,
    else raise ValidationFailed (exit 1). An earlier run's reports at the same paths are removed
    first: a run that stops with an error leaves none of them behind."""
    remove_earlier_reports(args.report_dir, args.junit)
    report = validate(
        args.model,
        args.data,
        reference=args.reference,
        thresholds=thresholds(args),
        provider=args.provider,
        batch_size=args.batch_size,
        measure_latency=not args.no_latency,
        kernel_check=not args.no_kernel_check,
        threads=args.threads,
        **given_values(args, LATENCY_FLAGS),
        targets=tuple(args.targets or ("native",)),
        task=task_of(args),
        progress=not args.quiet,
    )
    # the files first: a reader that closes stdout early (`| head`) stops the run at a print
    if args.report_dir is not None:
        write_json(report, args.report_dir / REPORT_JSON)
        write_markdown(report, args.report_dir / REPORT_MD)
        remove_stale_plots(args.report_dir, [] if args.no_plots else write_plots(report, args.report_dir))
    if args.junit is not None:
        write_junit(report, args.junit)
    print_summary(report)
    if args.report_dir is not None:
        print(f"reports written to {args.report_dir}")
    report.raise_for_failures()
    return EXIT_OK
