"""Reports of a :class:`~fqexport.validation.validation_report.ValidationReport`: JSON, Markdown, JUnit XML, PNG.

Every writer is atomic: it writes a temporary file in the target directory, then
``os.replace``s it, so a reader never sees half a report. Reports show accuracies in percent.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Sequence

from fqexport.atomic import atomic_write, file_head
from fqexport.exporters.cpu_isa import kernel_family
from fqexport.global_state import GLOBAL_STATE_LOCK
from fqexport.shown_text import shown_text
from fqexport.metrics.group_metrics import MSG_ODDS_SUPPORT, json_safe
from fqexport.validation.validation_report import UNOPTIMIZED, not_measured

log = logging.getLogger(__name__)

MSG_NO_MATPLOTLIB = "matplotlib is not installed: skipping plots (pip install matplotlib)"
MSG_STALE_PLOT = "removed %s: a plot of an earlier run that this run did not draw"
MSG_EARLIER_REPORT = "removed %s, an earlier run's report, before measuring"
GROUP_PLOT, LATENCY_PLOT = "group_accuracy.png", "latency.png"  # what write_plots writes
JUNIT_SUITE_NAME = "fqexport.validate"  # the <testsuite name> of write_junit's files
JUNIT_SUITE = f'name="{JUNIT_SUITE_NAME}"'
# How reports name each task's per-group metrics (fqexport.tasks); the fractions show in percent.
METRIC_LABELS = {"accuracy": "accuracy", "map": "mAP@[.5:.95]", "map50": "mAP@.5", "miou": "mIoU", "dice": "Dice",
                 "pixel_accuracy": "pixel accuracy"}


# What XML 1.0 allows (https://www.w3.org/TR/xml/#charsets): anything else makes the file not well-formed.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def float_tail_words(task: Any) -> str:
    """What the float ops after the last weight layers are, by the metadata's ``task`` dict: a
    detector's box decode, else the output's tail (a segmenter's upsampling, a classifier's last ops)."""
    return "the box decode" if (task or {}).get("name") == "detection" else "the output's tail"


def md_text(value: Any) -> str:
    """``value`` as literal text in a Markdown table cell or list line: Markdown's emphasis, code
    and link marks and ``|`` (it would split the cell) backslash-escaped, ``<``/``>``/``&`` as
    HTML entities (a group named ``<b>`` is not markup), then as :func:`~fqexport.shown_text.shown_text`
    shows it: a line break as ``\\n`` (it would end the row; a space would make ``new\\nline``
    read as the group ``new line``), any other control character escaped, edge spaces quoted."""
    text = _MD_MARKS.sub(r"\\\g<0>", str(value))
    return shown_text(text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


_MD_MARKS = re.compile(r"[\\`*_\[\]|]")


def xml_text(value: Any) -> str:
    """``value`` as text for XML 1.0: each character XML does not allow (control characters but
    tab and line breaks, lone surrogates, U+FFFE/U+FFFF) written as its escape, ``\\x1b``."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        str(value))


def _write_text(path: str | Path, text: str) -> Path:
    # a path that is not UTF-8 in the text (a model file named with other bytes) is written escaped
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))


def percent_text(x: float | None) -> str:
    """A fraction as percent points with 2 decimals (``0.8512`` → ``85.12``); ``n/a`` for None or
    NaN; a value that rounds to zero is ``0.00``, never ``-0.00``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{round(100.0 * float(x), 2) + 0.0:.2f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(float(x), fmt)


def write_json(report: Any, path: str | Path) -> Path:
    """All metrics as JSON (``report.to_dict()``; accuracies as fractions, NaN as null)."""
    return _write_text(path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")


def write_json_data(data: Any, path: str | Path) -> Path:
    """Any JSON-serialisable ``data`` (NaN written as null), atomically."""
    return _write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False, default=str) + "\n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys) as a Markdown table."""
    if not rows:
        return ""
    cols = list(rows[0].keys())
    lines = ["| " + " | ".join(md_text(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(md_text(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown_table(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """A titled Markdown table file, atomically."""
    head = f"# {title}\n\n" if title else ""
    return _write_text(path, head + markdown_table(rows))


def group_rows(report: Any) -> list[dict[str, Any]]:
    """One row per group: name, count, the task's metrics (accuracy/loss; mAP, mAP@.5; mIoU, Dice),
    the reference's primary metric, drop, unoptimized, kernel deviation."""
    m = report.metrics
    p = m.primary
    rows = []
    for name, r in m.by_group.items():
        ref = report.reference_metrics.by_group[name][p] if report.reference_metrics else None
        unopt = report.unoptimized_metrics.by_group[name][p] if report.unoptimized_metrics else None
        rows.append(
            {
                "group": name,
                "count": int(r["count"]),
                **{k: r[k] for k in m.metric_names},
                f"reference_{p}": ref,
                "drop": report.group_drop[name] if report.group_drop is not None else None,
                f"unoptimized_{p}": unopt,
                "kernel_deviation": report.kernel_deviation_by_group[name]
                if report.kernel_deviation_by_group is not None
                else None,
            }
        )
    return rows


def changes_line(report: Any, text: Callable[[str], str] = str) -> str | None:
    """The paired comparison with the reference per group (``report.group_changes``), one line;
    None without it. ``text`` escapes a group name for where the line goes."""
    changes = getattr(report, "group_changes", None)
    if not changes:
        return None
    parts = [f"{text(g)}: {int(c['worse'])} worse / {int(c['better'])} better (p {c['p_value']:.2g})"
             for g, c in changes.items()]
    return ("changed predictions vs reference per group (reference right and model wrong / the reverse; "
            "exact McNemar p): " + "; ".join(parts))


def _cell(metric: str, value: Any) -> str:
    return _num(value, ".4f") if metric == "loss" else percent_text(value)


def format_group_table(report: Any) -> str:
    """A Markdown table of the per-group metrics (percent; the loss as it is)."""
    m = report.metrics
    p = m.primary
    heads = " | ".join("loss" if k == "loss" else f"{METRIC_LABELS.get(k, k)} %" for k in m.metric_names)
    lines = [
        f"| group | n | {heads} | reference % | drop pp | unoptimized % | kernel dev pp |",
        "|---|---:|" + "---:|" * len(m.metric_names) + "---:|---:|---:|---:|",
    ]
    for r in group_rows(report):
        cells = " | ".join(_cell(k, r[k]) for k in m.metric_names)
        lines.append(
            f"| {md_text(r['group'])} | {r['count']} | {cells} | "
            f"{percent_text(r[f'reference_{p}'])} | {percent_text(r['drop'])} | {percent_text(r[f'unoptimized_{p}'])} | "
            f"{percent_text(r['kernel_deviation'])} |"
        )
    overall = " | ".join(_cell(k, m.overall[k]) for k in m.metric_names)
    lines.append(
        f"| **overall** | {m.overall['count']} | {overall} | "
        f"{percent_text(report.reference_metrics.overall[p]) if report.reference_metrics else 'n/a'} | | "
        f"{percent_text(report.unoptimized_metrics.overall[p]) if report.unoptimized_metrics else 'n/a'} | |"
    )
    return "\n".join(lines)


def isa_line(report: Any) -> str:
    """``"x86-avx2 (int8 kernel family x86-avx2)"``: where the ORT figures were measured."""
    isa = getattr(report, "cpu_isa", "unknown")
    return f"{isa} (int8 kernel family {kernel_family(isa)})"


def target_rows(report: Any) -> list[dict[str, Any]]:
    """One row per (kernel target, group): accuracy, kernel deviation, agreement with native."""
    rows = []
    for target in getattr(report, "targets", ("native",)):
        d = report.target_dict(target)
        dev = d["kernel_deviation_by_group"]
        for name, r in d["metrics"]["by_group"].items():
            p = report.metrics.primary
            rows.append({"target": target, "emulated": d["emulated"], "group": name, p: r[p],
                         "kernel_deviation": dev[name] if dev is not None else None,
                         "agreement_with_native": d["agreement_with_native"]})
    return rows


def format_target_table(report: Any) -> str:
    """A Markdown table of the per-group accuracy (the primary metric) under every kernel target (percent)."""
    p = report.metrics.primary
    agree = getattr(report, "agreement_name", "top-1 agreement")
    lines = [f"| target | group | {METRIC_LABELS.get(p, p)} % | kernel dev pp | {agree} with native % |",
             "|---|---|---:|---:|---:|"]
    for r in target_rows(report):
        isa = getattr(report, "cpu_isa", "unknown")
        label = (f"{r['target']} (emulated)" if r["emulated"] else f"native ({isa})" if r["target"] == "native"
                 else f"{r['target']} (this CPU's own kernels, {isa})")
        lines.append(f"| {label} | {md_text(r['group'])} | {percent_text(r[p])} | {percent_text(r['kernel_deviation'])} | "
                     f"{percent_text(r['agreement_with_native'])} |")
    return "\n".join(lines)


def to_markdown(report: Any) -> str:
    """The human report: summary, per-group table, kernels, latency, resources, checks."""
    m = report.metrics
    label = METRIC_LABELS.get(m.primary, m.primary)
    agree = getattr(report, "agreement_name", "top-1 agreement")
    worst, worst_acc = m.group_min()
    out = [
        f"# fqexport validation: {'PASS' if report.passed else 'FAIL'}",
        "",
        f"- model: `{report.model}`",
        f"- data: `{report.data_source}`",
        f"- provider: {report.provider}; CPU instruction set: {isa_line(report)}",
    ]
    if getattr(report, "host_kernels", None):
        out.append(f"- standing in for the {report.host_kernels} int8 kernels (`FQEXPORT_HOST_KERNELS`): "
                   "every --target family is emulated; the native row is still this CPU's own session")
    if report.reference:
        out.append(f"- reference: `{report.reference}` ({agree} {percent_text(report.agreement)} %)")
    out += [
        "",
        "## Per group",
        "",
        format_group_table(report),
        "",
        f"- worst group: **{md_text(worst)}**"
        + (f" (tied with {md_text(', '.join(tied))})" if (tied := m.tied_with_min()) else "")
        + f" {percent_text(worst_acc)} %; {label} gap (max − min) {percent_text(m.difference())} pp",
    ]
    out += [f"- {md_text(line)}" for line in (report.group_lines() if hasattr(report, "group_lines") else ())]
    out += [f"- note: {md_text(n)}" for n in getattr(report, "notes", ())]
    task = getattr(report, "task", None)
    if task and task.get("name") != "classification":
        out.append(f"- task: {task['name']} ({task.get('chosen', 'given')}); per-group {label}")
    floats = getattr(getattr(report, "metadata", None), "float_ops", ())
    if floats:
        out.append(f"- kept float after the last weight layers ({len(floats)} ops: {float_tail_words(task)}): "
                   + ", ".join(f"`{f}`" for f in floats))
    if m.equalized_odds_difference is not None or m.demographic_parity_difference is not None:
        out.append(
            f"- equalized-odds difference {percent_text(m.equalized_odds_difference)} pp"
            + (MSG_ODDS_SUPPORT.format(support=md_text(support)) if (support := m.odds_support()) else "")
            + f"; demographic-parity difference {percent_text(m.demographic_parity_difference)} pp"
        )
    if report.group_drop is not None:
        unmeasured = not_measured(report.group_drop)
        among = f" (without {md_text(', '.join(unmeasured))}: not measured)" if unmeasured else ""
        worst = report.max_group_drop
        drop = f"{percent_text(worst[1])} pp (group {md_text(worst[0])})" if worst is not None else "n/a"
        out.append(f"- largest drop vs reference: {drop}{among}")
        if (line := changes_line(report, md_text)) is not None:
            out.append(f"- {line}")
    if len(getattr(report, "targets", ("native",))) > 1:
        out += ["", "## Kernel targets", "",
                "Emulated targets compute the fused int8 kernels with that CPU family's integer "
                "accumulation (docs/kernel-targets.md); every limit applies to each target.", "",
                format_target_table(report)]
    if report.fused_kernels is not None:
        nonzero = {k: v for k, v in report.fused_kernels.items() if v}
        kernels = ", ".join(f"{k}: {v}" for k, v in nonzero.items()) or "none"
        out += [
            "",
            "## Kernels",
            "",
            f"- measured on: {isa_line(report)}",
            f"- kernel deviation (optimized vs unoptimized, max over groups): {percent_text(report.kernel_deviation)} pp; "
            f"{agree} {percent_text(report.kernel_agreement)} %",
            *([f"- \"unoptimized\" is {md_text(report.kernel_reference)}"]
              if report.kernel_reference not in (None, UNOPTIMIZED) else []),
            f"- ops ORT runs: {kernels}",
            f"- Conv/Gemm/MatMul in float: {', '.join(report.float_fallbacks) if report.float_fallbacks else 'none'}",
        ]
    if getattr(report, "gpu_rule_violations", None) is not None:
        found = report.gpu_rule_violations
        out += ["", "## GPU rules (TensorRT importer, ONNX Runtime CUDA EP)", "",
                f"- target gpu: {len(found)} violation(s)" + ("" if found else " (S8S8, int8 zero points 0)")]
        out += [f"- {v}" for v in found]
    if report.latency:
        ref = {r.batch_size: r for r in report.reference_latency}
        faster = report.speedups()  # the verdict's figure (the median of paired runs' ratios), not p50 / p50
        out += ["", "## Latency", "", f"Measured on {isa_line(report)}.", "",
                "| batch | p50 ms | p95 ms | mean ms | samples/s | threads | warm-up | repeats | reference p50 ms | speed-up |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for lat in report.latency:
            r = ref.get(lat.batch_size)
            out.append(
                f"| {lat.batch_size} | {lat.p50_ms:.3f} | {lat.p95_ms:.3f} | {lat.mean_ms:.3f} | "
                f"{lat.throughput_per_s:.1f} | {lat.threads} | {lat.warmup} | {lat.repeats} | "
                f"{f'{r.p50_ms:.3f}' if r else '-'} | "
                f"{f'{faster[lat.batch_size]:.2f}x' if lat.batch_size in faster else '-'} |"
            )
        if report.speed_verdict():
            out += ["", f"- {report.speed_verdict()} (other CPU families: docs/ort-kernels.md)"]
    out += [
        "",
        "## Resources",
        "",
        f"- file size: {report.size_bytes} bytes ({report.size_bytes / 1e6:.3f} MB)",
        f"- average weight bits: {report.avg_weight_bits:.2f} ({report.resource_source}); parameters: {report.params}",
        f"- MACs per sample: {report.macs if report.macs is not None else 'n/a'}; "
        f"BOPs per sample: {_num(report.bops, '.4g')}",
        f"- PePR = P / (1 + bits/32): {_num(report.pepr, '.4f')} (overall), {_num(report.pepr_worst_group, '.4f')} (worst group)",
        *_float_layer_lines(report),
        "",
        "## Checks",
        "",
    ]
    if report.checks:
        out += ["| check | limit | value | group | result |", "|---|---:|---:|---|---|"]
        for c in report.checks:
            out.append(
                f"| {c.name} | {c.limit:g} | {_num(c.value, '.3f')} | {md_text(c.group or '')} | {'PASS' if c.passed else '**FAIL**'} |"
            )
        fails = report.failures()
        if fails:
            out += [""] + [f"- FAIL: {md_text(c.message)}" for c in fails]
    else:
        out.append("No thresholds set.")
    return "\n".join(out) + "\n"


def _float_layer_lines(report: Any) -> list[str]:
    """The weight layers the file keeps in float, with why (from its fqexport metadata)."""
    floats = getattr(getattr(report, "metadata", None), "float_layers", ())
    if not floats:
        return []
    return ["- weight layers in float (counted at 32 bits): " + ", ".join(
        f"`{f.name}` ({f.kind}, {f.params} params; {f.reason or 'unsupported'})" for f in floats)]


def write_markdown(report: Any, path: str | Path) -> Path:
    """Per-group table and pass/fail per threshold, as Markdown."""
    return _write_text(path, to_markdown(report))


def to_junit(report: Any) -> ET.Element:
    """``<testsuite>`` with one ``<testcase>`` per check (a failed check has a ``<failure>``); text
    XML 1.0 does not allow (a group name's control characters) is escaped (:func:`xml_text`).

    With no thresholds set, one passing ``validate`` case records that the model ran.
    """
    checks = list(report.checks)
    suite = ET.Element(
        "testsuite",
        {
            "name": JUNIT_SUITE_NAME,
            "tests": str(max(1, len(checks))),
            "failures": str(sum(1 for c in checks if not c.passed)),
            "errors": "0",
            "skipped": "0",
        },
    )
    props = ET.SubElement(suite, "properties")
    for k, v in (("model", report.model), ("data", report.data_source), ("provider", report.provider),
                 ("cpu_isa", getattr(report, "cpu_isa", "unknown")),
                 ("cpu_kernel_family", kernel_family(getattr(report, "cpu_isa", "unknown"))),
                 ("host_kernels_stand_in", getattr(report, "host_kernels", None) or ""),
                 ("targets", ",".join(getattr(report, "targets", ("native",))))):
        ET.SubElement(props, "property", {"name": k, "value": xml_text(v)})
    if not checks:
        ET.SubElement(suite, "testcase", {"classname": "fqexport.validate", "name": "validate"})
    for c in checks:
        case = ET.SubElement(suite, "testcase", {"classname": "fqexport.validate", "name": xml_text(c.name)})
        if not c.passed:
            fail = ET.SubElement(case, "failure", {"message": xml_text(c.message), "type": "ThresholdExceeded"})
            fail.text = xml_text(f"{c.name}: value {c.value} limit {c.limit} group {c.group or '-'}")
        else:
            out = ET.SubElement(case, "system-out")
            out.text = xml_text(c.message)
    caveats = list(report.group_lines()) if hasattr(report, "group_lines") else []
    caveats += [f"note: {n}" for n in getattr(report, "notes", ())]
    if caveats:  # what the checks cannot tell, beside them (after the cases, as the schema orders it)
        ET.SubElement(suite, "system-out").text = xml_text("\n".join(caveats))
    return suite


def write_junit(report: Any, path: str | Path) -> Path:
    """JUnit XML for CI systems: one test case per threshold check."""
    root = ET.ElementTree(to_junit(report))
    ET.indent(root)
    return atomic_write(path, lambda tmp: root.write(tmp, encoding="utf-8", xml_declaration=True))


MSG_PLOT_FAILED = "the plots in {dir} were not drawn ({kind}: {err}); the reports and the verdict stand"


def write_plots(report: Any, dir: str | Path) -> list[Path]:
    """PNG plots (per-group accuracy reference vs quantized; latency). [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info(MSG_NO_MATPLOTLIB)
        return []
    # a group name in a script the default font lacks (CJK) is drawn as boxes: a figure
    # matter, not a warning about the user's data on the console
    with GLOBAL_STATE_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
        try:
            return _draw_plots(plt, report, Path(dir))
        except Exception as err:  # a figure must not turn a gate's verdict into a crash (exit 3)
            plt.close("all")
            log.warning(MSG_PLOT_FAILED.format(dir=dir, kind=type(err).__name__, err=" ".join(str(err).split())[:300]))
            return []


def _draw_plots(plt: Any, report: Any, dir: Path) -> list[Path]:
    dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = group_rows(report)
    # a name's "$...$" would be parsed as mathtext (drawn in italics, or a ParseException)
    names = [str(r["group"]).replace("$", r"\$") for r in rows]
    p = report.metrics.primary
    series = [("model (optimized)", [r[p] for r in rows])]
    if report.unoptimized_metrics is not None:
        series.append(("model (unoptimized)", [r[f"unoptimized_{p}"] for r in rows]))
    if report.reference_metrics is not None:
        series.insert(0, ("reference", [r[f"reference_{p}"] for r in rows]))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [100.0 * v for v in values], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"{METRIC_LABELS.get(p, p)} %")
    ax.set_title(f"per-group {METRIC_LABELS.get(p, p)}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    written.append(atomic_write(dir / GROUP_PLOT, lambda tmp: fig.savefig(tmp, format="png", dpi=100)))
    plt.close(fig)
    if report.latency:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        bs = [str(l.batch_size) for l in report.latency]
        ax.bar([i - 0.2 for i in range(len(bs))], [l.p50_ms for l in report.latency], 0.4, label="p50")
        ax.bar([i + 0.2 for i in range(len(bs))], [l.p95_ms for l in report.latency], 0.4, label="p95")
        ax.set_xticks(range(len(bs)), bs)
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per batch")
        ax.set_title(f"latency ({report.latency[0].threads} threads)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(atomic_write(dir / LATENCY_PLOT, lambda tmp: fig.savefig(tmp, format="png", dpi=100)))
        plt.close(fig)
    return written


REPORT_JSON, REPORT_MD = "report.json", "report.md"


def remove_earlier_reports(dir: str | Path | None, junit: str | Path | None,
                           inputs: Sequence[str | Path | None] = ()) -> list[Path]:
    """Remove what an earlier run wrote where this one will write (``dir``'s report.json,
    report.md and plots, the ``junit`` file; regular files only), before anything else can stop
    this run: a run that stops with an error then leaves no earlier PASS report for CI to read.
    Only files fqexport wrote (:func:`_written_here`: a file of another tool or of the user that
    merely has a report's name stays), never one of this run's ``inputs`` (``--junit data.npz``
    is refused later, not obeyed). Returns the removed paths."""
    # an empty path names no place (an unset variable: refused), not the working folder
    paths = [Path(dir) / n for n in (REPORT_JSON, REPORT_MD, GROUP_PLOT, LATENCY_PLOT)] if dir not in (None, "") else []
    paths += [Path(junit)] if junit not in (None, "") else []
    kept = {Path(p).resolve() for p in inputs if p is not None}
    removed = []
    for path in paths:
        if path.resolve() not in kept and _written_here(path):
            path.unlink()
            log.info(MSG_EARLIER_REPORT, path)
            removed.append(path)
    return removed


_PNG = b"\x89PNG\r\n\x1a\n"


def _written_here(path: Path) -> bool:
    """Whether ``path`` is a regular file that looks like what this module writes there: a
    report.md under its title, a report.json holding a validation's keys, a PNG plot, a JUnit
    file of fqexport's suite."""
    head = file_head(path)
    if head is None:
        return False
    if path.name == REPORT_MD:
        return head.startswith(b"# fqexport validation")
    if path.name == REPORT_JSON:
        return b'"cpu_kernel_family"' in head or b'"cpu_isa"' in head
    if path.name in (GROUP_PLOT, LATENCY_PLOT):
        return head.startswith(_PNG)
    return JUNIT_SUITE.encode() in head


def remove_stale_plots(dir: str | Path, written: list[Path]) -> list[Path]:
    """Remove the plots :func:`write_plots` writes (by their names, regular files only) that are in
    ``dir`` but not in ``written`` (this run's: none with ``--no-plots`` or without matplotlib,
    no latency plot without latency), so that no plot of an earlier run sits beside this run's
    report. Returns the removed paths."""
    keep = {Path(p).resolve() for p in written}
    removed = []
    for name in (GROUP_PLOT, LATENCY_PLOT):
        path = Path(dir) / name
        if path.is_file() and not path.is_symlink() and path.resolve() not in keep:
            path.unlink()
            log.info(MSG_STALE_PLOT, path)
            removed.append(path)
    return removed
