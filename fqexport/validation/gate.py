"""Validate an ONNX classifier per group in ONNX Runtime: the numbers behind the CI gate.

``validate`` runs the *optimized* session (what deploys) on group-labeled data and reports
per-group accuracy/loss, gaps, fairness differences, agreement with a reference model, kernel
deviation (optimized vs the same graph unoptimized), the kernels ORT fused, latency, size,
average weight bits, BOPs and a performance-per-resource (PePR) score, then checks
:class:`Thresholds`. A broken limit never raises: the report says ``passed == False``.

Units: accuracies inside :class:`~fqexport.metrics.group_metrics.GroupMetrics` are fractions; every
threshold and every :class:`CheckResult` value is in the unit of its flag: accuracies, gaps,
drops and kernel deviation in **percent points**, latency in ms, size in MB (10⁶ bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.errors import ConfigError, DataError, ModelLoadError
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.kernel_emulation import EmulatedSession, check_target
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.ort_session import (
    input_shape,
    kernel_summary,
    make_session,
    model_files_size,
    run_batches,
)
from fqexport.metadata import ExportMetadata
from fqexport.metrics.group_metrics import (
    GroupMetrics,
    agreement,
    group_metrics,
    json_safe,
)
from fqexport.validation.latency import LatencyResult
from fqexport.validation.latency import measure_latency as _measure_latency
from fqexport.validation.resources import model_resources

log = logging.getLogger(__name__)

MSG_THRESHOLD = "threshold {name}={value!r} must be a finite number {rule}"
MSG_NEEDS_REFERENCE = "--max-group-drop (max_group_drop) needs a reference model: pass --reference float.onnx"
MSG_NEEDS_KERNEL = "--max-kernel-deviation (max_kernel_deviation) needs the kernel check; do not disable it"
MSG_NEEDS_LATENCY = "--max-latency-ms (max_latency_ms) needs latency measurement; do not disable it"
MSG_SHAPE = (
    "data {source}: x has shape {got} per sample but model {model} expects input {expected} "
    "(batch first); give data matching the model's input"
)
MSG_RANK = (
    "data {source}: x has {got} dims per sample but model {model} expects input {expected}"
)
MSG_EMPTY = "data {source} holds no samples"
MSG_EMPTY_GROUP = (
    "data {source}: group {name!r} (id {gid}) has no samples; every group must be present to "
    "validate per group (drop it from group_names or add samples)"
)
MSG_LABELS = (
    "data {source}: label {label} is out of range for model {model}, which has {num_classes} "
    "outputs (labels must be in 0..{last})"
)
MSG_OUTPUT = "model {model} returns output of shape {shape}; fqexport validates classifiers with logits [N, C]"
MSG_REF_CLASSES = "reference {ref} has {ref_c} outputs but model {model} has {c}: they must be the same task"

PCT = 100.0
MB = 1e6
_TOL = 1e-9


def _pct(x: float) -> float:
    return float(x) * PCT


@dataclass(frozen=True)
class Thresholds:
    """Limits of the gate; ``None`` = not checked.

    Accuracies, gaps, drops and kernel deviation are in percent points (``min_worst_group_acc=85``
    means 85 %), like the CLI flags. ``max_latency_ms`` bounds the p95 latency per batch at every
    measured batch size; ``max_size_mb`` bounds the file size (plus external data) in MB (10⁶ B).
    """

    min_acc: float | None = None
    min_worst_group_acc: float | None = None
    max_acc_gap: float | None = None
    max_group_drop: float | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    max_kernel_deviation: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ConfigError(MSG_THRESHOLD.format(name=f.name, value=v, rule="(or None)"))
            if f.name in ("min_acc", "min_worst_group_acc", "max_acc_gap", "max_group_drop", "max_kernel_deviation"):
                lo = -100.0 if f.name == "max_group_drop" else 0.0
                if not (lo <= float(v) <= 100.0):
                    raise ConfigError(
                        MSG_THRESHOLD.format(
                            name=f.name, value=v, rule=f"in [{lo:g}, 100] (percent points, e.g. 85 for 85 %)"
                        )
                    )
                if f.name.startswith("min_") and 0 < float(v) <= 1.0:
                    log.warning(
                        "%s=%g is read as %g %% (percent points), not as a fraction", f.name, v, v
                    )
            elif float(v) <= 0:
                raise ConfigError(MSG_THRESHOLD.format(name=f.name, value=v, rule="> 0"))

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class CheckResult:
    """One threshold check. ``limit`` and ``value`` in the threshold's unit (see module doc)."""

    name: str
    limit: float
    value: float
    passed: bool
    group: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["value"], float) and math.isnan(d["value"]):
            d["value"] = None
        return d


def flag(name: str) -> str:
    """CLI flag of a threshold field: ``min_worst_group_acc`` → ``--min-worst-group-acc``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ValidationReport:
    """Everything ``validate`` measured. Fractions in metrics; percent in checks.

    kernel_deviation = max_g |acc_g(optimized) − acc_g(unoptimized)| (fraction), with per-group
    values in ``kernel_deviation_by_group``; group_drop_g = acc_g(reference) − acc_g(model)
    (fraction, positive = the model is worse). PePR = P / (1 + R) with R = avg_weight_bits / 32
    (the weight memory relative to fp32) and P = overall accuracy (``pepr``) or worst-group
    accuracy (``pepr_worst_group``).

    ``cpu_isa`` names this machine's instruction set (the ORT figures above were measured on
    it). ``targets`` are the kernel targets gated: ``native`` (``metrics``, always) and the
    emulated ones (:mod:`fqexport.exporters.kernel_emulation`), whose per-group metrics are in
    ``target_metrics``, their kernel deviation (emulated vs unoptimized, per group, fraction)
    in ``target_kernel_deviation_by_group`` and their top-1 agreement with the native session
    in ``target_agreement``.
    """

    model: str
    data_source: str
    provider: str
    metrics: GroupMetrics
    unoptimized_metrics: GroupMetrics | None = None
    kernel_deviation: float | None = None
    kernel_deviation_by_group: Mapping[str, float] | None = None
    kernel_agreement: float | None = None
    reference: str | None = None
    reference_metrics: GroupMetrics | None = None
    group_drop: Mapping[str, float] | None = None
    agreement: float | None = None
    fused_kernels: Mapping[str, int] | None = None
    float_fallbacks: tuple[str, ...] | None = None
    latency: tuple[LatencyResult, ...] = ()
    size_bytes: int = 0
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
    targets: tuple[str, ...] = ("native",)
    target_metrics: Mapping[str, GroupMetrics] | None = None
    target_kernel_deviation_by_group: Mapping[str, Mapping[str, float]] | None = None
    target_agreement: Mapping[str, float] | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    @property
    def max_group_drop(self) -> tuple[str, float] | None:
        """(group, drop) of the largest per-group drop vs the reference, fraction."""
        if not self.group_drop:
            return None
        return max(self.group_drop.items(), key=lambda kv: kv[1])

    def to_dict(self) -> dict[str, Any]:
        worst = self.metrics.group_min("accuracy")
        return {
            "model": self.model,
            "data": self.data_source,
            "provider": self.provider,
            "cpu_isa": self.cpu_isa,
            "cpu_kernel_family": kernel_family(self.cpu_isa),
            "passed": self.passed,
            "units": {"accuracy": "fraction in metrics, percent points in checks", "latency": "ms", "size": "bytes"},
            "metrics": self.metrics.to_dict(),
            "worst_group": worst[0],
            "worst_group_accuracy": json_safe(worst[1]),
            "accuracy_gap": json_safe(self.metrics.difference("accuracy")),
            "kernel": {
                "fused_kernels": dict(self.fused_kernels) if self.fused_kernels is not None else None,
                "float_fallbacks": list(self.float_fallbacks) if self.float_fallbacks is not None else None,
                "unoptimized_metrics": self.unoptimized_metrics.to_dict() if self.unoptimized_metrics else None,
                "kernel_deviation": self.kernel_deviation,
                "kernel_deviation_by_group": dict(self.kernel_deviation_by_group)
                if self.kernel_deviation_by_group is not None
                else None,
                "kernel_agreement": self.kernel_agreement,
            },
            "reference": {
                "model": self.reference,
                "metrics": self.reference_metrics.to_dict() if self.reference_metrics else None,
                "group_drop": dict(self.group_drop) if self.group_drop is not None else None,
                "max_group_drop": list(self.max_group_drop) if self.max_group_drop else None,
                "agreement": self.agreement,
            },
            "latency": [lat.to_dict() for lat in self.latency],
            "size_bytes": self.size_bytes,
            "avg_weight_bits": self.avg_weight_bits,
            "params": self.params,
            "macs_per_sample": self.macs,
            "bops_per_sample": self.bops,
            "resource_source": self.resource_source,
            "pepr": json_safe(self.pepr),
            "pepr_worst_group": json_safe(self.pepr_worst_group),
            "thresholds": self.thresholds.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
            "metadata": self.metadata.to_dict() if self.metadata is not None else None,
            "targets": {name: self.target_dict(name) for name in self.targets},
        }

    def target_dict(self, target: str) -> dict[str, Any]:
        """Metrics, kernel deviation and agreement with native of one kernel target."""
        if target == "native":
            return {"emulated": False, "metrics": self.metrics.to_dict(),
                    "kernel_deviation_by_group": dict(self.kernel_deviation_by_group)
                    if self.kernel_deviation_by_group is not None else None,
                    "agreement_with_native": 1.0}
        dev = (self.target_kernel_deviation_by_group or {}).get(target)
        return {"emulated": True, "metrics": self.target_metrics[target].to_dict(),
                "kernel_deviation_by_group": dict(dev) if dev is not None else None,
                "agreement_with_native": (self.target_agreement or {}).get(target)}


def pepr_score(performance: float, avg_weight_bits: float) -> float:
    """PePR = P / (1 + R), R = avg_weight_bits / 32 ∈ (0, 1]: fp32 halves P, 4-bit keeps P/1.125."""
    return float(performance) / (1.0 + float(avg_weight_bits) / 32.0)


# ---------------------------------------------------------------------------------------- data


def _load(data: GroupData | str | Path) -> GroupData:
    if isinstance(data, GroupData):
        return data

    return load_data(str(data))


def check_data(data: GroupData, model: str, expected: Sequence[Any]) -> None:
    """DataError when ``data`` cannot be fed to a model with input shape ``expected``."""
    if len(data) == 0:
        raise DataError(MSG_EMPTY.format(source=data.source))
    got = tuple(data.x.shape[1:])
    exp = tuple(expected[1:])
    exp_str = "[" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in expected) + "]"
    if len(got) != len(exp):
        raise DataError(MSG_RANK.format(source=data.source, got=len(got), model=model, expected=exp_str))
    for g, e in zip(got, exp):
        if isinstance(e, int) and e > 0 and g != e:
            raise DataError(MSG_SHAPE.format(source=data.source, got=list(got), model=model, expected=exp_str))
    counts = data.group_counts()
    for gid, name in enumerate(data.group_names):
        if counts[gid] == 0:
            raise DataError(MSG_EMPTY_GROUP.format(source=data.source, name=name, gid=gid))


def _check_logits(logits: np.ndarray, model: str, data: GroupData) -> None:
    if logits.ndim != 2:
        raise ModelLoadError(MSG_OUTPUT.format(model=model, shape=list(logits.shape)))
    c = logits.shape[1]
    bad = (data.y < 0) | (data.y >= c)
    if bad.any():
        raise DataError(
            MSG_LABELS.format(source=data.source, label=int(data.y[bad][0]), model=model, num_classes=c, last=c - 1)
        )


def _metrics_of(session: Any, data: GroupData, batch_size: int, model: str) -> tuple[np.ndarray, GroupMetrics]:
    try:
        logits = run_batches(session, data.x, batch_size)
    except DataError as err:
        raise DataError(f"model {model} on data {data.source}: {err}") from err
    _check_logits(logits, model, data)
    return logits, group_metrics(logits, data.y, data.group, data.group_names)


# -------------------------------------------------------------------------------------- checks


def run_checks(report: ValidationReport, t: Thresholds) -> tuple[CheckResult, ...]:
    """One :class:`CheckResult` per set threshold (latency: one per measured batch size)."""
    out: list[CheckResult] = []
    m = report.metrics

    def add_min(name: str, value: float, group: str | None, what: str) -> None:
        limit = float(getattr(t, name))
        ok = value >= limit - _TOL
        where = f" (group {group!r})" if group else ""
        verdict = "ok" if ok else "below"
        out.append(CheckResult(name, limit, value, ok, group, f"{what}{where} {value:.2f} % {verdict} {flag(name)} {limit:g}"))

    def add_max(name: str, value: float, group: str | None, what: str, unit: str, limit_name: str | None = None) -> None:
        limit = float(getattr(t, name))
        ok = value <= limit + _TOL
        where = f" (group {group!r})" if group else ""
        verdict = "within" if ok else "exceeds"
        out.append(
            CheckResult(limit_name or name, limit, value, ok, group, f"{what}{where} {value:.2f} {unit} {verdict} {flag(name)} {limit:g}")
        )

    if t.min_acc is not None:
        add_min("min_acc", _pct(m.overall["accuracy"]), None, "overall accuracy")
    if t.min_worst_group_acc is not None:
        g, acc = m.group_min("accuracy")
        add_min("min_worst_group_acc", _pct(acc), g, "worst-group accuracy")
    if t.max_acc_gap is not None:
        lo, hi = m.group_min("accuracy"), m.group_max("accuracy")
        add_max("max_acc_gap", _pct(m.difference("accuracy")), lo[0], f"accuracy gap to group {hi[0]!r}", "pp")
    if t.max_group_drop is not None and report.max_group_drop is not None:
        g, drop = report.max_group_drop
        add_max("max_group_drop", _pct(drop), g, "accuracy drop vs reference", "pp")
    if t.max_kernel_deviation is not None and report.kernel_deviation_by_group is not None:
        g, dev = max(report.kernel_deviation_by_group.items(), key=lambda kv: kv[1])
        add_max("max_kernel_deviation", _pct(dev), g, "kernel deviation (optimized vs unoptimized)", "pp")
    if t.max_latency_ms is not None:
        for lat in report.latency:
            add_max("max_latency_ms", lat.p95_ms, None, f"p95 latency at batch {lat.batch_size}", "ms",
                    limit_name=f"max_latency_ms[batch={lat.batch_size}]")
    if t.max_size_mb is not None:
        add_max("max_size_mb", report.size_bytes / MB, None, "model size", "MB")
    return tuple(out)


def target_checks(report: ValidationReport, t: Thresholds) -> tuple[CheckResult, ...]:
    """The accuracy, gap, drop and kernel-deviation checks of every emulated target.

    Named ``<check>[target=<name>]``; latency and size belong to the native session only.
    """
    acc_only = dataclasses.replace(t, max_latency_ms=None, max_size_mb=None)
    out: list[CheckResult] = []
    for target, m in (report.target_metrics or {}).items():
        drop = None
        if report.reference_metrics is not None:
            drop = {g: float(report.reference_metrics.by_group[g]["accuracy"]) - float(m.by_group[g]["accuracy"])
                    for g in m.by_group}
        dev = (report.target_kernel_deviation_by_group or {}).get(target)
        view = dataclasses.replace(report, metrics=m, group_drop=drop, kernel_deviation_by_group=dev, latency=())
        for c in run_checks(view, acc_only):
            out.append(dataclasses.replace(c, name=f"{c.name}[target={target}]", message=f"{target}: {c.message}"))
    return tuple(out)


# ------------------------------------------------------------------------------------ validate


def validate(
    model: str | Path,
    data: GroupData | str | Path,
    *,
    reference: str | Path | None = None,
    thresholds: Thresholds | None = None,
    provider: str = "cpu",
    batch_size: int = 64,
    latency_batch_sizes: Sequence[int] = (1,),
    measure_latency: bool = True,
    kernel_check: bool = True,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
    targets: Sequence[str] = ("native",),
) -> ValidationReport:
    """Measure ``model`` on ``data`` and check ``thresholds``; never raises for a broken limit.

    Raises ModelLoadError (unreadable ONNX), DataError (data not matching the model's input,
    labels out of range, an empty group), ConfigError (bad options, CUDA asked for and absent,
    a threshold whose measurement is switched off or needs ``reference``, an unknown target).

    ``targets``: kernel targets to gate (:data:`~fqexport.exporters.kernel_emulation.TARGETS`).
    ``native`` (ORT's optimized session on this CPU) is always measured and gated; each other
    target is emulated and gated by the same accuracy, gap, drop and kernel-deviation limits.
    """
    t = thresholds or Thresholds()
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    target_list = tuple(dict.fromkeys(["native", *(check_target(x) for x in targets)]))
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
    if t.max_group_drop is not None and reference is None:
        raise ConfigError(MSG_NEEDS_REFERENCE)
    if t.max_kernel_deviation is not None and not kernel_check:
        raise ConfigError(MSG_NEEDS_KERNEL)
    if t.max_latency_ms is not None and not (measure_latency and latency_batch_sizes):
        raise ConfigError(MSG_NEEDS_LATENCY)
    model_s = str(model)
    meta = read_metadata(model)
    session = make_session(model, provider=provider, optimized=True, threads=threads)
    gd = _load(data)
    check_data(gd, model_s, input_shape(session))
    logits, metrics = _metrics_of(session, gd, batch_size, model_s)
    log.info("%s: overall accuracy %.2f %%", model_s, _pct(metrics.overall["accuracy"]))

    kw: dict[str, Any] = {}
    if kernel_check:
        raw = make_session(model, provider=provider, optimized=False, threads=threads)
        raw_logits, raw_metrics = _metrics_of(raw, gd, batch_size, model_s)
        dev = {
            name: abs(float(metrics.by_group[name]["accuracy"]) - float(raw_metrics.by_group[name]["accuracy"]))
            for name in gd.group_names
        }
        counts, floats = kernel_summary(model, provider=provider)
        kw.update(
            unoptimized_metrics=raw_metrics,
            kernel_deviation=max(dev.values()),
            kernel_deviation_by_group=dev,
            kernel_agreement=agreement(logits, raw_logits),
            fused_kernels=counts,
            float_fallbacks=tuple(floats),
        )
    if reference is not None:
        ref_session = make_session(reference, provider=provider, optimized=True, threads=threads)
        check_data(gd, str(reference), input_shape(ref_session))
        ref_logits, ref_metrics = _metrics_of(ref_session, gd, batch_size, str(reference))
        if ref_logits.shape[1] != logits.shape[1]:
            raise DataError(MSG_REF_CLASSES.format(ref=reference, ref_c=ref_logits.shape[1], model=model_s, c=logits.shape[1]))
        drop = {
            name: float(ref_metrics.by_group[name]["accuracy"]) - float(metrics.by_group[name]["accuracy"])
            for name in gd.group_names
        }
        kw.update(reference=str(reference), reference_metrics=ref_metrics, group_drop=drop,
                  agreement=agreement(logits, ref_logits))
    emulated = [x for x in target_list if x != "native"]
    if emulated:
        t_metrics: dict[str, GroupMetrics] = {}
        t_dev: dict[str, dict[str, float]] = {}
        t_agree: dict[str, float] = {}
        for target in emulated:
            emu_logits, t_metrics[target] = _metrics_of(EmulatedSession(model, target, threads=threads), gd, batch_size, model_s)
            t_agree[target] = agreement(emu_logits, logits)
            if kernel_check:
                raw_m = kw["unoptimized_metrics"]
                t_dev[target] = {
                    name: abs(float(t_metrics[target].by_group[name]["accuracy"]) - float(raw_m.by_group[name]["accuracy"]))
                    for name in gd.group_names
                }
            log.info("%s emulated: overall accuracy %.2f %%, agreement with native %.2f %%", target,
                     _pct(t_metrics[target].overall["accuracy"]), _pct(t_agree[target]))
        kw.update(target_metrics=t_metrics, target_kernel_deviation_by_group=t_dev if kernel_check else None,
                  target_agreement=t_agree)
    latency: list[LatencyResult] = []
    if measure_latency:
        for bs in latency_batch_sizes:
            latency.append(_measure_latency(session, gd.x[: int(bs)], int(bs), warmup=warmup, repeats=repeats))
            log.info("latency batch %d: p50 %.3f ms, p95 %.3f ms", latency[-1].batch_size, latency[-1].p50_ms, latency[-1].p95_ms)
    res = model_resources(model, meta)
    worst = metrics.group_min("accuracy")[1]
    report = ValidationReport(
        model=model_s,
        data_source=gd.source,
        provider=provider,
        metrics=metrics,
        latency=tuple(latency),
        size_bytes=model_files_size(model),
        avg_weight_bits=res.avg_weight_bits,
        params=res.params,
        macs=res.macs,
        bops=res.bops,
        resource_source=res.source,
        pepr=pepr_score(metrics.overall["accuracy"], res.avg_weight_bits),
        pepr_worst_group=pepr_score(worst, res.avg_weight_bits),
        thresholds=t,
        metadata=meta,
        cpu_isa=cpu_isa(),
        targets=target_list,
        **kw,
    )
    checks = run_checks(report, t) + target_checks(report, t)
    for c in checks:
        (log.info if c.passed else log.warning)("%s: %s", "PASS" if c.passed else "FAIL", c.message)
    return _replace(report, checks=checks)


def _replace(report: ValidationReport, **changes: Any) -> ValidationReport:
    return dataclasses.replace(report, **changes)
