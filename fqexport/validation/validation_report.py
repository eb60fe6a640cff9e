"""What ``validate`` measured: :class:`ValidationReport`, its views, and the quantities it defines.

Fractions in metrics, percent points in checks (:mod:`fqexport.validation.thresholds`). The
writers of this report (JSON, Markdown, JUnit, plots) are in :mod:`fqexport.validation.reports`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fqexport.errors import ValidationFailed
from fqexport.exporters.cpu_isa import kernel_family
from fqexport.metadata import ExportMetadata
from fqexport.metrics.group_metrics import GroupMetrics, json_safe
from fqexport.validation.latency import MIN_INTERVAL_PAIRS, LatencyResult, speed_word
from fqexport.validation.thresholds import CheckResult, Thresholds

MSG_FAILED = "{model}: {count} limit(s) broken: {checks}"
MSG_NOT_COMPARED = "batch {batches}: not compared ({noun} runs batch {theirs} only: a fixed batch)"


def pepr_score(performance: float, avg_weight_bits: float) -> float:
    """PePR = P / (1 + R), R = avg_weight_bits / 32 ∈ (0, 1]: fp32 halves P, 4-bit keeps P/1.125."""
    return float(performance) / (1.0 + float(avg_weight_bits) / 32.0)


def group_drop(reference: GroupMetrics, model: GroupMetrics) -> dict[str, float]:
    """drop_g = acc_g(reference) − acc_g(model), fraction; positive = the model is worse (acc:
    the primary metric, a detector's mAP@[.5:.95], a segmenter's mIoU)."""
    p = model.primary
    return {g: float(reference.by_group[g][p]) - float(row[p]) for g, row in model.by_group.items()}


def measured_max(values: Mapping[str, float]) -> tuple[str, float] | None:
    """``(group, value)`` of the largest value that is not NaN (a group whose metric cannot be
    measured: a detector's images without boxes, masks without labelled pixels); None when none is."""
    measured = [(g, float(v)) for g, v in values.items() if not math.isnan(float(v))]
    return max(measured, key=lambda kv: kv[1]) if measured else None


def not_measured(values: Mapping[str, float]) -> list[str]:
    """The groups whose value is NaN (their metric cannot be measured)."""
    return [str(g) for g, v in values.items() if math.isnan(float(v))]


def kernel_deviation(kernels: GroupMetrics, graph: GroupMetrics) -> dict[str, float]:
    """dev_g = |acc_g(kernels) − acc_g(graph)|, fraction: what the kernels changed, per group (the
    primary metric)."""
    p = kernels.primary
    return {g: abs(float(row[p]) - float(graph.by_group[g][p])) for g, row in kernels.by_group.items()}


# A speed-up of at least 10 % (at most 10 % slower) counts as faster (slower); between, the same:
# latencies on a shared machine move by a few percent from run to run.
SMALLER = 0.95  # a file buys size when it takes at most this share of the reference's bytes
UNOPTIMIZED = "the unoptimized session"  # the kernel check's usual reference (ValidationReport.kernel_reference)


def speedups(latency: Sequence[LatencyResult], reference: Sequence[LatencyResult]) -> dict[int, float]:
    """Batch size -> how much faster the model runs than the reference (> 1: faster), for the
    batch sizes both were timed at (a file with a fixed batch runs only that one): the median
    ratio of their paired runs (``LatencyResult.speedup``), else the ratio of their p50s."""
    theirs = {r.batch_size: r for r in reference}
    return {m.batch_size: m.speedup if m.speedup is not None else theirs[m.batch_size].p50_ms / m.p50_ms
            for m in latency if m.p50_ms > 0 and m.batch_size in theirs}


def speed_verdict(latency: Sequence[LatencyResult], reference: Sequence[LatencyResult], isa: str,
                  noun: str = "the reference", sizes: tuple[int, int] | None = None) -> str | None:
    """``"on this CPU (x86-avx2) the file buys size only, no speed: batch 1: 0.95x the
    reference's speed (same speed)"``, and the batch sizes not compared (the reference has another
    fixed batch); ``None`` when nothing was compared. ``sizes``: (the file's bytes, the
    reference's): a file not at least 5 % smaller (:data:`SMALLER`) buys no size, and says so
    (without them the size is not judged: "speed" or "no speed" alone)."""
    ratio = speedups(latency, reference)
    if not latency or not reference:
        return None
    mine = sorted({m.batch_size for m in latency})
    theirs = sorted({r.batch_size for r in reference})
    if not ratio:
        return (f"on this CPU ({isa}) the speed is not compared: the file was timed at batch "
                f"{', '.join(map(str, mine))} and {noun} runs batch {', '.join(map(str, theirs))} only (a fixed batch)")
    interval = {m.batch_size: (m.speedup_low, m.speedup_high) for m in latency if m.batch_size in ratio}
    words = {bs: speed_word(x, *interval[bs]) for bs, x in ratio.items()}
    pairs = {m.batch_size: m.repeats for m in latency}
    parts = [f"batch {bs}: {x:.2f}x {noun}'s speed ({_with_interval(words[bs], *interval[bs], pairs[bs])})"
             for bs, x in ratio.items()]
    fast = [bs for bs, w in words.items() if w == "faster"]
    noisy = [bs for bs, w in words.items() if w == "within the timing noise"]
    at = f"at batch {', '.join(map(str, fast))}"
    no_speed = (f"no speed told apart from the timing noise at batch {', '.join(map(str, noisy))}" if noisy
                else "no speed")
    if sizes is None:
        buys = f"speed {at}" if fast else no_speed
    elif sizes[0] <= SMALLER * sizes[1]:
        buys = f"speed and size {at}" if fast else ("size; " if noisy else "size only, ") + no_speed
    else:
        buys = f"speed {at}, no size" if fast else ("no size; " + no_speed if noisy else "neither speed nor size")
        parts.append(f"the file takes {sizes[0]:,} bytes, {noun} {sizes[1]:,}")
    unpaired = [bs for bs in mine if bs not in ratio]
    if unpaired:
        parts.append(MSG_NOT_COMPARED.format(batches=", ".join(map(str, unpaired)), noun=noun,
                                             theirs=", ".join(map(str, theirs))))
    return f"on this CPU ({isa}) the file buys {buys}: " + "; ".join(parts)


def _with_interval(word: str, low: float | None, high: float | None, pairs: int) -> str:
    """``"faster; 95 % interval 1.41-1.62x"``: the speed word and the interval that decided it (the
    whole range of fewer than :data:`MIN_INTERVAL_PAIRS` pairs, said as such)."""
    if low is None or high is None:
        return word
    if pairs < MIN_INTERVAL_PAIRS:
        return f"{word}; range of {pairs} pair(s) {low:.2f}-{high:.2f}x, too few for a 95 % interval"
    return f"{word}; 95 % interval {low:.2f}-{high:.2f}x"


@dataclass(frozen=True)
class ValidationReport:
    """Everything ``validate`` measured. Fractions in metrics; percent in checks.

    kernel_deviation = max_g |acc_g(optimized) − acc_g(unoptimized)| (fraction), with per-group
    values in ``kernel_deviation_by_group``; group_drop_g = acc_g(reference) − acc_g(model)
    (fraction, positive = the model is worse). PePR = P / (1 + R) with R = avg_weight_bits / 32
    (the weight memory relative to fp32) and P = overall accuracy (``pepr``) or worst-group
    accuracy (``pepr_worst_group``).

    ``cpu_isa`` names this machine's instruction set (the ORT figures above were measured on
    it). ``targets`` are the kernel targets gated: ``native`` (``metrics``, always) and CPU
    families, whose per-group metrics are in ``target_metrics``, their kernel deviation (vs the
    unoptimized session, per group, fraction) in ``target_kernel_deviation_by_group`` and their
    top-1 agreement with the native session in ``target_agreement``. A family is judged by this
    CPU's own session when this CPU is of that family (``target_native``), else by its emulation
    (:mod:`fqexport.exporters.kernel_emulation`).

    ``gpu_rule_violations``: for a file exported for the ``gpu`` target (its metadata says so),
    every break of what TensorRT's importer and ORT's CUDA EP take
    (:func:`~fqexport.exporters.gpu_rules.check_gpu_qdq`; empty: none); ``None`` for other files.
    """

    model: str
    data_source: str
    provider: str
    metrics: GroupMetrics
    unoptimized_metrics: GroupMetrics | None = None
    kernel_deviation: float | None = None
    kernel_deviation_by_group: Mapping[str, float] | None = None
    kernel_agreement: float | None = None
    # what "unoptimized" ran (fqexport.validation.measure.graph_math_session); None without the kernel check
    kernel_reference: str | None = None
    reference: str | None = None
    reference_metrics: GroupMetrics | None = None
    group_drop: Mapping[str, float] | None = None
    # per group: samples the reference got right and the model wrong (worse), the reverse (better),
    # McNemar's exact p-value (fqexport.metrics.paired); None without per-sample correctness
    group_changes: Mapping[str, Mapping[str, float]] | None = None
    agreement: float | None = None
    fused_kernels: Mapping[str, int] | None = None
    float_fallbacks: tuple[str, ...] | None = None
    latency: tuple[LatencyResult, ...] = ()
    # the reference's: at the model's batch sizes, timed interleaved with ``latency``; at its own
    # fixed batch where it has another one (not compared)
    reference_latency: tuple[LatencyResult, ...] = ()
    size_bytes: int = 0
    reference_size_bytes: int | None = None  # the reference's files, as size_bytes counts them
    avg_weight_bits: float = 32.0
    params: int = 0
    macs: int | None = None
    bops: float | None = None
    resource_source: str = "graph"
    pepr: float = float("nan")
    pepr_worst_group: float = float("nan")
    thresholds: Thresholds = field(default_factory=Thresholds)
    checks: tuple[CheckResult, ...] = ()
    metadata: ExportMetadata | None = None
    cpu_isa: str = "unknown"
    # what measured it: fqexport's, Python's and the libraries' versions, the CPU's instruction set
    # (exporters.metadata.environment); the file's own writer is in metadata.environment
    environment: Mapping[str, str] | None = None
    # the family FQEXPORT_HOST_KERNELS made this machine stand in for (every target then emulated)
    host_kernels: str | None = None
    targets: tuple[str, ...] = ("native",)
    target_metrics: Mapping[str, GroupMetrics] | None = None
    target_kernel_deviation_by_group: Mapping[str, Mapping[str, float]] | None = None
    target_agreement: Mapping[str, float] | None = None
    target_native: tuple[str, ...] = ()  # targets judged by this CPU's own session (its family), not emulated
    # per emulated target: the fused nodes whose sums depend on the kernels, computed by the emulation
    # (none: every node computes alike on every family, and the figures are this CPU's own)
    target_emulated_nodes: Mapping[str, tuple[str, ...]] | None = None
    # per emulated target: the integer nodes the emulation does not model (a QOperator file's int8
    # activations...), run with this CPU's own kernels: their sums are this CPU's, not the target's
    target_native_nodes: Mapping[str, tuple[str, ...]] | None = None
    gpu_rule_violations: tuple[str, ...] | None = None
    task: Mapping[str, Any] | None = None  # the task measured (fqexport.tasks: name, options, how chosen)
    agreement_name: str = "top-1 agreement"  # what agreement and kernel_agreement count
    # groups the file was calibrated on (its metadata's group_names) that the test data lacks, when
    # the two share group names at all (:func:`absent_groups`); the per-group limits fail on them
    absent_groups: tuple[str, ...] = ()
    # test groups the file was not calibrated on (same condition); figures of groups it never saw
    uncalibrated_groups: tuple[str, ...] = ()
    # what the figures cannot tell (a limit finer than one sample of a group...): logged, and kept
    # in every report file beside the checks
    notes: tuple[str, ...] = ()

    def group_lines(self) -> list[str]:
        """The sentences naming :attr:`absent_groups` and :attr:`uncalibrated_groups`, those there
        are (console, report.md, the JUnit file)."""
        lines = []
        if self.absent_groups:
            lines.append(f"not in the test data: group(s) {', '.join(repr(g) for g in self.absent_groups)}, which "
                         f"the model was calibrated on (its metadata's group_names): no per-group figure covers them")
        if self.uncalibrated_groups:
            lines.append(f"not calibrated on: group(s) {', '.join(repr(g) for g in self.uncalibrated_groups)} of the "
                         f"test data, which the model's calibration never saw (its metadata's group_names)")
        return lines

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def raise_for_failures(self) -> None:
        """The gate: raise :class:`~fqexport.errors.ValidationFailed` naming every broken limit
        (``err.failures``: one ``"name: message"`` per broken check), else return. The CLI maps it
        to exit code 1."""
        failed = [f"{c.name}: {c.message}" for c in self.failures()]
        if failed:
            raise ValidationFailed(MSG_FAILED.format(model=self.model, count=len(failed), checks="; ".join(failed)),
                                   failures=failed)

    def speedups(self) -> dict[int, float]:
        """Batch size -> how much faster the model runs than the reference on this CPU (> 1:
        faster): the median ratio of their paired runs, else the ratio of their p50s (:func:`speedups`)."""
        return speedups(self.latency, self.reference_latency)

    def speed_verdict(self) -> str | None:
        """Whether the file buys speed on this CPU or only size, per measured batch size
        (``None`` without the reference's latency)."""
        sizes = None if self.reference_size_bytes is None else (self.size_bytes, self.reference_size_bytes)
        return speed_verdict(self.latency, self.reference_latency, self.cpu_isa, sizes=sizes)

    @property
    def max_group_drop(self) -> tuple[str, float] | None:
        """(group, drop) of the largest per-group drop vs the reference, fraction, over the groups
        whose drop was measured (:func:`measured_max`); None without a reference or a measured drop."""
        return measured_max(self.group_drop) if self.group_drop else None

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        worst = m.group_min()
        gpu = {} if self.gpu_rule_violations is None else {
            "gpu_rules": {"passed": not self.gpu_rule_violations, "violations": list(self.gpu_rule_violations)}}
        # one pass makes the whole report JSON-safe (NaN -> null: a group whose metric cannot be measured)
        return json_safe({
            "model": self.model,
            "data": self.data_source,
            "provider": self.provider,
            "cpu_isa": self.cpu_isa,
            "cpu_kernel_family": kernel_family(self.cpu_isa),
            "environment": dict(self.environment) if self.environment is not None else None,
            "host_kernels_stand_in": self.host_kernels,
            "passed": self.passed,
            "units": {"accuracy": "fraction in metrics, percent points in checks", "latency": "ms", "size": "bytes"},
            "metrics": self.metrics.to_dict(),
            "worst_group": worst[0],
            f"worst_group_{m.primary}": worst[1],
            f"{m.primary}_gap": m.difference(),
            "kernel": self._kernel_dict(),
            "reference": self._reference_dict(),
            "latency": [lat.to_dict() for lat in self.latency],
            "reference_latency": [lat.to_dict() for lat in self.reference_latency],
            "speedup_vs_reference": {str(bs): x for bs, x in self.speedups().items()},
            "speed_verdict": self.speed_verdict(),
            "size_bytes": self.size_bytes,
            "avg_weight_bits": self.avg_weight_bits,
            "params": self.params,
            "macs_per_sample": self.macs,
            "bops_per_sample": self.bops,
            "resource_source": self.resource_source,
            "pepr": self.pepr,
            "pepr_worst_group": self.pepr_worst_group,
            "thresholds": self.thresholds.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
            "metadata": self.metadata.to_dict() if self.metadata is not None else None,
            "targets": {name: self.target_dict(name) for name in self.targets},
            "task": dict(self.task) if self.task is not None else {"name": "classification"},
            "absent_groups": list(self.absent_groups),
            "uncalibrated_groups": list(self.uncalibrated_groups),
            "notes": list(self.notes),
            **gpu,
        })

    def _kernel_dict(self) -> dict[str, Any]:
        """The kernel check: what ORT fused and how far the optimized session moved from the graph."""
        return {
            "fused_kernels": _dict_or_none(self.fused_kernels),
            "float_fallbacks": list(self.float_fallbacks) if self.float_fallbacks is not None else None,
            "unoptimized_metrics": self.unoptimized_metrics.to_dict() if self.unoptimized_metrics else None,
            "kernel_deviation": self.kernel_deviation,
            "kernel_deviation_by_group": _dict_or_none(self.kernel_deviation_by_group),
            "kernel_agreement": self.kernel_agreement,
            "kernel_reference": self.kernel_reference,
        }

    def _reference_dict(self) -> dict[str, Any]:
        """The comparison with the reference model."""
        return {
            "model": self.reference,
            "size_bytes": self.reference_size_bytes,
            "metrics": self.reference_metrics.to_dict() if self.reference_metrics else None,
            "group_drop": _dict_or_none(self.group_drop),
            "max_group_drop": list(self.max_group_drop) if self.max_group_drop else None,
            "group_changes": ({g: dict(v) for g, v in self.group_changes.items()}
                              if self.group_changes is not None else None),
            "agreement": self.agreement,
        }

    def target_dict(self, target: str) -> dict[str, Any]:
        """Metrics, kernel deviation and agreement with native of one kernel target."""
        if target == "native":
            return json_safe({"emulated": False, "emulated_nodes": None, "native_nodes": None,
                              "metrics": self.metrics.to_dict(),
                              "kernel_deviation_by_group": _dict_or_none(self.kernel_deviation_by_group),
                              "agreement_with_native": 1.0})
        dev = (self.target_kernel_deviation_by_group or {}).get(target)
        nodes = (self.target_emulated_nodes or {}).get(target)
        return json_safe({"emulated": target not in self.target_native,
                          "emulated_nodes": list(nodes) if nodes is not None else None,
                          "native_nodes": list((self.target_native_nodes or {}).get(target, ())),
                          "metrics": self.target_metrics[target].to_dict(),
                          "kernel_deviation_by_group": _dict_or_none(dev),
                          "agreement_with_native": (self.target_agreement or {}).get(target)})


def _dict_or_none(mapping: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return dict(mapping) if mapping is not None else None
