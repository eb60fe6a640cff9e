"""Compare a :class:`ValidationReport` against :class:`Thresholds`: one :class:`CheckResult` per limit.

Pure: numbers in, check results out (no sessions, no I/O). Values are converted to the
threshold's unit (percent points, ms, MB) before comparing.
"""

from __future__ import annotations

import dataclasses
import math

from fqexport.validation.thresholds import MB, CheckResult, Thresholds, flag, pct

# The worst-group and drop limits of each task's metric: limit -> (metric, words).
WORST_GROUP_LIMITS = {"min_worst_group_acc": ("accuracy", "worst-group accuracy"),
                      "min_worst_group_map": ("map", "worst-group mAP@[.5:.95]"),
                      "min_worst_group_miou": ("miou", "worst-group mIoU")}
# The gap limits (largest minus smallest group value) of each task's metric.
GAP_LIMITS = {"max_acc_gap": ("accuracy", "accuracy"), "max_map_gap": ("map", "mAP@[.5:.95]"),
              "max_miou_gap": ("miou", "mIoU")}
DROP_LIMITS = {"max_group_drop": ("accuracy", "accuracy drop vs reference"),
               "max_group_map_drop": ("map", "mAP@[.5:.95] drop vs reference"),
               "max_group_miou_drop": ("miou", "mIoU drop vs reference")}
from fqexport.validation.validation_report import ValidationReport, group_drop, measured_max


def same_kind_limit(name: str, metrics: tuple[str, ...]) -> str | None:
    """The limit of ``name``'s kind (worst group, drop, gap: the tables above) on one of
    ``metrics`` (a task's), e.g. ``max_miou_gap`` for ``max_acc_gap`` on a segmenter; None when
    there is none."""
    for kind in (WORST_GROUP_LIMITS, DROP_LIMITS, GAP_LIMITS):
        if name in kind:
            return next((other for other, (metric, _) in kind.items() if metric in metrics), None)
    return None


_TOL = 1e-9  # a value this close to its limit passes (float round-off of the percent conversion)
GPU_RULES = "gpu_rules"  # the check of a gpu-target file's structure (no threshold: always on)
MSG_GPU_RULES = "what TensorRT and ORT's CUDA EP take (target gpu): {n} violation(s){details}"
MSG_UNMEASURED = ("{what}: group {group!r} cannot be measured (its {count} sample(s) give no value: a "
                  "detector's images without ground-truth boxes, or masks without labelled pixels); the check "
                  "fails rather than pass without the group")

MSG_ONE_GROUP = ("{metric} gap: the test data holds one group with samples ({group!r}): a gap between groups "
                 "needs two; label the groups of the test data (its 'group' field), or drop {flag}")

MSG_ABSENT = ("{what}: the test data holds no samples of group(s) {groups}, which the model was calibrated on (its "
              "metadata's group_names); the check fails rather than pass without them")


def _absent(t: Thresholds, name: str, report: ValidationReport, what: str) -> CheckResult | None:
    """A failed check for the first calibrated group the test data lacks (``report.absent_groups``), else None."""
    if not report.absent_groups:
        return None
    groups = ", ".join(repr(g) for g in report.absent_groups)
    return CheckResult(name, float(getattr(t, name)), float("nan"), False, report.absent_groups[0],
                       MSG_ABSENT.format(what=what, groups=groups))


def _unmeasured(t: Thresholds, name: str, report: ValidationReport, m, metric: str, what: str) -> CheckResult | None:
    """:func:`_absent`, else a failed check for the first group that has samples but no value of
    ``metric`` (else None): ``group_min`` and the drops skip such a group, and a gate would pass
    without it."""
    if (absent := _absent(t, name, report, what)) is not None:
        return absent
    for group, row in m.by_group.items():
        if row["count"] > 0 and math.isnan(float(row[metric])):
            return CheckResult(name, float(getattr(t, name)), float("nan"), False, group,
                               MSG_UNMEASURED.format(what=what, group=group, count=int(row["count"])))
    return None


def _shown(value: float, limit: float, ok: bool, above: bool) -> tuple[str, str]:
    """``(value, limit)`` as text: the value with 2 decimals and the limit as given (up to 15
    significant digits: 4.908133, not 4.90813), or both with as many significant digits as it
    takes to show which side of the limit the value is on where 2 decimals would hide it ("0.00 MB
    exceeds 0.0001", "0.50 pp exceeds 0.5", "66.66666 % below 66.66667"); a value at the limit
    (as the check takes it) that 2 decimals would move off it is shown as the limit ("4.908133 MB
    within 4.908133", not "4.91")."""
    text, given = f"{value:.2f}", f"{limit:.15g}"
    if abs(value - limit) <= _TOL:  # at the limit, as the check takes it (round-off aside)
        return text if float(text) == limit else given, given
    shown = float(text)
    hides = (shown > limit if above else shown < limit) != (not ok) or shown == limit
    if not hides:
        return text, given
    for digits in range(6, 18):
        v, lim = f"{value:.{digits}g}", f"{limit:.{digits}g}"
        if v != lim:
            return v, lim
    return repr(value), repr(limit)


def _at_least(t: Thresholds, name: str, value: float, group: str | None, what: str) -> CheckResult:
    limit = float(getattr(t, name))
    ok = value >= limit - _TOL
    where = f" (group {group!r})" if group else ""
    verdict = "ok" if ok else "below"
    shown, bound = _shown(value, limit, ok, above=False)
    return CheckResult(name, limit, value, ok, group, f"{what}{where} {shown} % {verdict} {flag(name)} {bound}")


def _at_most(t: Thresholds, name: str, value: float, group: str | None, what: str, unit: str,
             check_name: str | None = None) -> CheckResult:
    limit = float(getattr(t, name))
    ok = value <= limit + _TOL
    where = f" (group {group!r})" if group else ""
    verdict = "within" if ok else "exceeds"
    shown, bound = _shown(value, limit, ok, above=True)
    message = f"{what}{where} {shown} {unit} {verdict} {flag(name)} {bound}"
    return CheckResult(check_name or name, limit, value, ok, group, message)


def run_checks(report: ValidationReport, t: Thresholds, *, size: bool = True) -> tuple[CheckResult, ...]:
    """One :class:`CheckResult` per set threshold (latency: one per measured batch size; the file
    size unless ``size`` is False)."""
    out: list[CheckResult] = []
    m = report.metrics
    if t.min_acc is not None:
        out.append(_at_least(t, "min_acc", pct(m.overall["accuracy"]), None, "overall accuracy"))
    for name, (metric, what) in WORST_GROUP_LIMITS.items():
        if getattr(t, name) is not None and metric in m.metric_names:
            if (missing := _unmeasured(t, name, report, m, metric, what)) is not None:
                out.append(missing)
                continue
            g, value = m.group_min(metric)
            out.append(_at_least(t, name, pct(value), g, what))
    for name, (metric, words) in GAP_LIMITS.items():
        if getattr(t, name) is None or metric not in m.metric_names:
            continue
        lo, hi = m.group_min(metric), m.group_max(metric)
        what = f"{words} gap of group {lo[0]!r} to the best group {hi[0]!r}"
        present = [g for g, row in m.by_group.items() if row["count"] > 0]
        alone = (CheckResult(name, float(getattr(t, name)), float("nan"), False, present[0],
                             MSG_ONE_GROUP.format(metric=words, group=present[0], flag=flag(name)))
                 if len(present) == 1 else None)
        # the difference would skip such a group (and lo, hi may then be one group): the gap named alone
        missing = _unmeasured(t, name, report, m, metric, f"{words} gap")
        gap = _at_most(t, name, pct(m.difference(metric)), None, what, "pp")
        out.append(missing or alone or dataclasses.replace(gap, group=lo[0]))
    for name, (metric, what) in DROP_LIMITS.items():  # report.group_drop is of the primary metric
        if getattr(t, name) is not None and report.group_drop is not None and m.primary == metric:
            if (missing := _unmeasured(t, name, report, m, metric, what)) is not None:
                out.append(missing)
            elif report.max_group_drop is not None:
                g, drop = report.max_group_drop
                out.append(_at_most(t, name, pct(drop), g, what, "pp"))
    if t.max_kernel_deviation is not None and report.kernel_deviation_by_group is not None:
        what = "kernel deviation (optimized vs unoptimized)"
        worst = measured_max(report.kernel_deviation_by_group)  # max over groups in any order
        if (missing := _unmeasured(t, "max_kernel_deviation", report, m, m.primary, what)) is not None:
            out.append(missing)
        elif worst is not None:
            out.append(_at_most(t, "max_kernel_deviation", pct(worst[1]), worst[0], what, "pp"))
    if t.max_latency_ms is not None:
        for lat in report.latency:
            out.append(_at_most(t, "max_latency_ms", lat.p95_ms, None, f"p95 latency at batch {lat.batch_size}", "ms",
                                check_name=f"max_latency_ms[batch={lat.batch_size}]"))
    if t.max_size_mb is not None and size:
        # the bytes beside the MB: 2 decimals of a small file's MB can be a quarter off (8,104 B as 0.01)
        out.append(_at_most(t, "max_size_mb", report.size_bytes / MB, None, "model size", f"MB ({report.size_bytes:,} bytes)"))
    return tuple(out)


def target_checks(report: ValidationReport, t: Thresholds) -> tuple[CheckResult, ...]:
    """The accuracy, gap, drop and kernel-deviation checks of every emulated target.

    Named ``<check>[target=<name>]``; latency and size belong to the native session only.
    """
    out: list[CheckResult] = []
    for target, m in (report.target_metrics or {}).items():
        drop = group_drop(report.reference_metrics, m) if report.reference_metrics is not None else None
        dev = (report.target_kernel_deviation_by_group or {}).get(target)
        view = dataclasses.replace(report, metrics=m, group_drop=drop, kernel_deviation_by_group=dev, latency=())
        for c in run_checks(view, t, size=False):  # no latency in the view; not Thresholds again: it warns
            out.append(dataclasses.replace(c, name=f"{c.name}[target={target}]", message=f"{target}: {c.message}"))
    return tuple(out)


def gpu_rule_checks(report: ValidationReport) -> tuple[CheckResult, ...]:
    """For a file exported for the ``gpu`` target: one check, passed when the graph breaks none of
    the TensorRT / CUDA EP rules (value: the number of violations, limit 0); none otherwise."""
    found = report.gpu_rule_violations
    if found is None:
        return ()
    details = "".join(f"; {v}" for v in found)
    return (CheckResult(GPU_RULES, 0.0, float(len(found)), not found, None,
                        MSG_GPU_RULES.format(n=len(found), details=details)),)


# The limits on a difference of per-group accuracies (percent points), and what they compare.
DIFFERENCE_LIMITS = {"max_group_drop": "drop vs reference", "max_acc_gap": "gap", "max_kernel_deviation": "deviation"}
MSG_RESOLUTION = ("{flag} {limit:g} pp is finer than one sample of group {group!r}: its {n} test samples make one "
                  "prediction worth {step:.2f} pp of its accuracy, so the check cannot tell a real {what} from one "
                  "sample; give that group more test samples")


_COARSE_PP = 1.0  # a group whose one prediction moves its accuracy more than this is noted near a limit
MSG_ONE_SAMPLE_FROM_LIMIT = (
    "{flag} {limit:g} % is within one sample of group {group!r}: its {n} test samples make one prediction worth "
    "{step:.2f} pp, and it is at {acc:.2f} %, so a single prediction decides the check; give that group more "
    "test samples")


def resolution_notes(report: ValidationReport, t: Thresholds) -> list[str]:
    """One note per set limit that a single prediction can decide: a limit on an accuracy
    difference finer than one sample (100 / N_g pp) of the smallest measured group
    (:data:`MSG_RESOLUTION`), and a worst-group accuracy limit less than one prediction away from
    the accuracy of a group of under 100 samples (:data:`MSG_ONE_SAMPLE_FROM_LIMIT`; the closest
    such group, in predictions). Accuracy only: mAP and mIoU are not per-sample counts."""
    m = report.metrics
    counts = {g: int(r["count"]) for g, r in m.by_group.items() if int(r["count"]) > 0}
    if m.primary != "accuracy" or not counts:
        return []
    group = min(counts, key=counts.get)
    step = 100.0 / counts[group]
    notes = [MSG_RESOLUTION.format(flag=flag(name), limit=float(getattr(t, name)), group=group, n=counts[group],
                                   step=step, what=what)
             for name, what in DIFFERENCE_LIMITS.items()
             if getattr(t, name) is not None and step > float(getattr(t, name)) + _TOL]
    if t.min_worst_group_acc is not None:
        limit = float(t.min_worst_group_acc)
        # |acc_g − limit| in units of one prediction of g: below 1, one prediction moves g across
        near = {g: abs(pct(m.by_group[g]["accuracy"]) - limit) * n / 100.0 for g, n in counts.items()
                if not math.isnan(float(m.by_group[g]["accuracy"]))}
        close = [g for g, d in near.items() if d < 1.0 - _TOL and 100.0 / counts[g] > _COARSE_PP]
        if close:
            g = min(close, key=near.get)
            notes.append(MSG_ONE_SAMPLE_FROM_LIMIT.format(
                flag=flag("min_worst_group_acc"), limit=limit, group=g, acc=pct(m.by_group[g]["accuracy"]),
                n=counts[g], step=100.0 / counts[g]))
    return notes


MSG_NATIVE_NODES = (
    "target {target}: {n} integer node(s) are not emulated ({nodes}; the emulation models integer GEMMs and convs "
    "of uint8 activations and int8 weights): they ran with this {isa} CPU's own kernels, so the {target} figures "
    "hold this CPU's sums for them, not {target}'s"
)


def native_node_notes(report: ValidationReport) -> list[str]:
    """One note per emulated target that ran integer nodes the emulation does not model with this
    CPU's kernels (:data:`MSG_NATIVE_NODES`): its figures are then partly this CPU's."""
    return [MSG_NATIVE_NODES.format(target=target, n=len(nodes), isa=report.cpu_isa,
                                    nodes=", ".join(nodes[:6]) + (" …" if len(nodes) > 6 else ""))
            for target, nodes in (report.target_native_nodes or {}).items() if nodes]


def all_checks(report: ValidationReport, t: Thresholds) -> tuple[CheckResult, ...]:
    """The native session's checks, then every emulated target's, then a gpu file's structure."""
    return run_checks(report, t) + target_checks(report, t) + gpu_rule_checks(report)
