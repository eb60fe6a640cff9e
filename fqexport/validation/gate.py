"""Validate an ONNX classifier per group in ONNX Runtime: the numbers behind the CI gate.

``validate`` runs the *optimized* session (what deploys) on group-labeled data and reports
per-group accuracy/loss, gaps, fairness differences, agreement with a reference model, kernel
deviation (optimized vs the same graph unoptimized), the kernels ORT fused, latency, size,
average weight bits, BOPs and a performance-per-resource (PePR) score, then checks
:class:`~fqexport.validation.thresholds.Thresholds`. A file exported for the ``gpu`` target
(its metadata says so) is also checked for what TensorRT and ORT's CUDA EP take
(:mod:`~fqexport.exporters.gpu_rules`). A broken limit never raises: the report says
``passed == False``.

The steps live beside it: :mod:`~fqexport.validation.measure` runs the sessions,
:mod:`~fqexport.validation.validation_report` holds what they measured,
:mod:`~fqexport.validation.checks` compares it with the limits of
:mod:`~fqexport.validation.thresholds` (units there).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.stream import DataStream
from fqexport.config import check_argument
from fqexport.errors import ConfigError, DataError
from fqexport.exporters.cpu_isa import cpu_isa, emulated_host, host_family
from fqexport.exporters.export_check import TARGET_FAMILIES
from fqexport.exporters.gpu_rules import check_gpu_qdq
from fqexport.exporters.kernel_emulation import check_target
from fqexport.exporters.metadata import environment, read_metadata
from fqexport.exporters.ort_session import (
    fixed_batch,
    input_shape,
    model_files_size,
    run_batches,
)
from fqexport.metadata import ExportMetadata
from fqexport.metrics.group_metrics import GroupMetrics
from fqexport.tasks.base import Task
from fqexport.tasks.classification import Classification, check_label_range
from fqexport.tasks.resolve import resolve_task, task_from_dict
from fqexport.validation.checks import all_checks, native_node_notes, resolution_notes, same_kind_limit
from fqexport.validation.data_checks import check_data, compare_groups, read_test_data, shape_text
from fqexport.validation.latency import TIMED_SPINNING
from fqexport.validation.measure import (
    KernelCheck,
    ReferenceComparison,
    Runner,
    TargetResult,
    check_kernels,
    compare_reference,
    measure_latencies,
    measure_native,
    measure_target,
    on_data_error,
)
from fqexport.validation.resources import model_resources
from fqexport.validation.thresholds import (
    LIMIT_METRICS,
    Thresholds,
    check_measurements,
    flag,
)
from fqexport.validation.validation_report import (
    ValidationReport,
    measured_max,
    pepr_score,
)

log = logging.getLogger(__name__)

MSG_LIMIT_TASK = (
    "{flag} ({name}) limits the {metric} of a {want} model, but {model} is validated as a {task} model "
    "({why}); use {instead} or --task"
)
_METRIC_TASK = {"accuracy": "classification", "map": "detection", "miou": "segmentation"}


MSG_FIXED_BATCH_LIMIT = (
    "--max-latency-ms (max_latency_ms) at --latency-batch-sizes {asked}: model {model} runs batch {fixed} only "
    "(its input's batch dim is fixed), so the limit could not be checked at {other}; time batch {fixed} "
    "(--latency-batch-sizes {fixed}) or export the model with a dynamic batch"
)
MSG_FIXED_BATCH = "model %s runs batch %d only (a fixed batch dim): latency is timed at batch %d, not at %s"


MSG_REFERENCE_IS_MODEL = (
    "--reference {ref} is the model itself: its drops would be 0 and its agreement 100 % whatever the model "
    "does; give the float model (compress --float-out) as the reference"
)
MSG_REFERENCE_INPUT = (
    "--reference {ref} takes input {ref_shape}, model {model} takes {shape}, which the data {source} fits "
    "(per sample {sample}): the reference must take the model's input (its float model: compress --float-out)"
)
MSG_REFERENCE_SAME_BYTES = (
    "reference %s holds the same bytes as model %s: the drops are 0 and the agreement 100 %% by construction"
)


MSG_STAND_IN_NOT_GATED = (
    "FQEXPORT_HOST_KERNELS=%s stands in for that family's kernels, but validate gates the native target, this "
    "CPU's own session, and no %s target: add --target %s (API: targets=...) to gate the stand-in family"
)


MSG_OTHER_FAMILY = (
    "%s was exported for --target %s (the %s int8 kernels); this CPU's are %s, so its native figures are this "
    "CPU's deployment, not the target's%s"
)
MSG_NO_TARGET_FULL = (
    "%s records no --target (written before files recorded one) and holds full-range 8-bit weights; this CPU's "
    "int8 kernels are %s: %s, so its native figures are this CPU's deployment, saturation included"
)
MSG_OTHER_FAMILY_SATURATES = "; its full-range weights can saturate this CPU's 16-bit pair sums (docs/ort-kernels.md)"


def _warn_other_family(model: str | Path, meta: ExportMetadata | None, targets: Sequence[str], provider: str) -> None:
    """Warn when the file was exported for CPU kernels this machine's family is not among (a file
    for x86-vnni judged on an AVX2 CPU), and say how to judge it on its own target."""
    families = TARGET_FAMILIES.get(meta.target, ()) if meta is not None else ()
    host = host_family()
    if provider == "cpu" and meta is not None and meta.target is None and meta.weight_range == "full" \
            and host == "x86-avx2":  # written before files recorded their target
        log.warning(MSG_NO_TARGET_FULL, model, host, MSG_OTHER_FAMILY_SATURATES.removeprefix("; "))
        return
    if provider != "cpu" or not families or host in families:
        return
    missing = [f for f in families if f not in targets]
    advice = f": add --target {' --target '.join(missing)} to judge it on its target" if missing else ""
    saturates = MSG_OTHER_FAMILY_SATURATES if host == "x86-avx2" and meta.weight_range == "full" else ""
    log.warning(MSG_OTHER_FAMILY, model, meta.target, "/".join(families), host, saturates + advice)


def _check_reference(model: str | Path, reference: str | Path) -> None:
    """ConfigError when ``reference`` is ``model``'s own file; a warning when it is a copy."""
    m, r = Path(model), Path(reference)
    if m.exists() and r.exists() and m.resolve() == r.resolve():
        raise ConfigError(MSG_REFERENCE_IS_MODEL.format(ref=reference))
    if m.is_file() and r.is_file() and m.stat().st_size == r.stat().st_size and m.read_bytes() == r.read_bytes():
        log.warning(MSG_REFERENCE_SAME_BYTES, reference, model)


# ops whose result for one sample depends on the rest of its batch: one activation range per batch
_PER_BATCH_OPS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM")
MSG_PER_BATCH = (
    "%s quantizes its activations with one range per batch (%s, quantize_dynamic's ops): a sample's output "
    "depends on the other samples of its batch, so the per-group figures are those of batches of %d in the "
    "data's order (at batch 1, as often deployed, they differ); pass --batch-size 1 to measure one sample at a time"
)


def _warn_per_batch_ops(model: str | Path, batch_size: int) -> None:
    """Warn when ``model`` holds ops that quantize activations per batch and batches hold > 1 sample."""
    if int(batch_size) <= 1:
        return
    graph = onnx.load(str(model), load_external_data=False).graph
    ops = sorted({n.op_type for n in graph.node if n.op_type in _PER_BATCH_OPS})
    if ops:
        log.warning(MSG_PER_BATCH, model, ", ".join(ops), int(batch_size))


def _check_latency_batches(session: Any, batch_sizes: Sequence[int], t: Thresholds, model: str) -> None:
    """A model fixed to one batch is timed at it whatever batch was asked: with a latency limit
    that would leave the limit unchecked at the other batches (a ConfigError), else a warning."""
    fixed = fixed_batch(session)
    other = [int(b) for b in batch_sizes if fixed is not None and int(b) != fixed]
    if not other:
        return
    if t.max_latency_ms is not None:
        raise ConfigError(MSG_FIXED_BATCH_LIMIT.format(asked=",".join(str(int(b)) for b in batch_sizes), model=model,
                                                       fixed=fixed, other=", ".join(map(str, other))))
    log.warning(MSG_FIXED_BATCH, model, fixed, fixed, ", ".join(map(str, other)))


def validate(
    model: str | Path,
    data: GroupData | DataStream | str | Path | Any,
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
    task: str | Task | None = None,
    progress: bool = True,
) -> ValidationReport:
    """Measure ``model`` on ``data`` and check ``thresholds``; never raises for a broken limit.

    ``data``: what ``fqexport.load_data`` accepts or returns, with labels; a stream (a CSV
    manifest, a Dataset, a DataLoader) is run through each session batch by batch, only the
    logits ``[N, C]`` are kept.

    Raises ModelLoadError (unreadable ONNX), DataError (data not matching the model's input,
    labels out of range, an empty group), ConfigError (bad options, CUDA asked for and absent,
    a threshold whose measurement is switched off or needs ``reference``, an unknown target).

    ``targets``: kernel targets to gate (:data:`~fqexport.exporters.kernel_emulation.TARGETS`).
    ``native`` (ORT's optimized session on this CPU) is always measured and gated; each other
    target is emulated and gated by the same accuracy, gap, drop and kernel-deviation limits.

    ``task``: what the model does (:mod:`fqexport.tasks`): its metric per group (accuracy, COCO
    mAP, mIoU), agreement and limits. None: the task the file's fqexport metadata records, else
    inferred from the data's fields and the model's output (``compress``'s rule).

    ``progress``: a tqdm bar per pass over the data (the model, the unoptimized session, the
    reference, each emulated target); the CLI's ``-q`` turns them off.
    """
    # 1. options, checked before any session opens
    for name, path in (("model", model), ("reference", reference)):  # a CompressedModel is not a file yet
        check_argument(path, (str, os.PathLike), f"validate: {name}",
                       "; write it first with fqexport.export(cm, 'model.onnx') and validate that path")
    check_argument(thresholds, Thresholds, "validate: thresholds", "; e.g. Thresholds(**limits)")
    t = thresholds or Thresholds()
    target_list = _target_list(targets)
    stand_in = emulated_host()
    if stand_in is not None and stand_in not in target_list:
        log.warning(MSG_STAND_IN_NOT_GATED, stand_in, stand_in, stand_in)
    check_measurements(t, reference=reference, kernel_check=kernel_check,
                   latency=measure_latency and bool(latency_batch_sizes))
    if reference is not None:
        _check_reference(model, reference)
    # 2. the task, then the sessions, each measured per group
    meta = read_metadata(model)
    _warn_other_family(model, meta, target_list, provider)
    plain = Runner(provider=provider, threads=threads, batch_size=batch_size, progress=progress)
    session = plain.open(model, spinning=TIMED_SPINNING)  # the session timed too
    _warn_per_batch_ops(model, batch_size)
    if measure_latency:
        _check_latency_batches(session, latency_batch_sizes, t, str(model))
    gd = read_test_data(data)
    check_data(gd, str(model), input_shape(session), session.get_inputs()[0].type)
    ref_session = plain.open(reference, spinning=TIMED_SPINNING) if reference is not None else None
    if ref_session is not None:  # before any measurement: the data fits the model, so a misfit is the reference's
        try:
            check_data(gd, str(reference), input_shape(ref_session), ref_session.get_inputs()[0].type)
        except DataError as err:
            raise DataError(MSG_REFERENCE_INPUT.format(
                ref=reference, ref_shape=shape_text(input_shape(ref_session)), model=model,
                shape=shape_text(input_shape(session)), source=gd.source, sample=list(gd.sample_shape))) from err
    absent, uncalibrated = compare_groups(gd, meta.group_names if meta is not None else (), str(model))
    chosen, why = _task(task, meta, gd, session, str(model))
    _check_limits(t, chosen, why, str(model))
    runner = dataclasses.replace(plain, task=chosen)
    chosen.require_annotations(gd, "validate")  # a classifier's labels, a detector's boxes...
    classes = session.get_outputs()[0].shape[1:]
    if isinstance(chosen, Classification) and len(classes) == 1 and isinstance(classes[0], int) and classes[0] > 1:
        check_label_range(gd, classes[0], str(model))  # before the passes over the data (a stream reads it again)
    native = measure_native(session, gd, str(model), runner)
    kernels = check_kernels(model, gd, native, runner) if kernel_check else None
    ref = compare_reference(reference, ref_session, gd, native, str(model), runner) if reference is not None else None
    emulated = {x: measure_target(model, x, gd, native, kernels, runner) for x in target_list if x != "native"}
    latency, ref_latency = (measure_latencies(session, gd, latency_batch_sizes, warmup=warmup, repeats=repeats,
                                              reference=ref_session)
                            if measure_latency else ((), ()))
    # 3. the report, then its checks against the limits
    report = ValidationReport(
        model=str(model), data_source=gd.source, provider=provider, metrics=native.metrics, latency=latency,
        reference_latency=ref_latency, reference_size_bytes=model_files_size(reference) if reference is not None else None,
        thresholds=t, metadata=meta, cpu_isa=cpu_isa(), environment=environment(), host_kernels=emulated_host(), targets=target_list,
        task={**chosen.to_dict(), "chosen": why}, agreement_name=chosen.agreement_name,
        absent_groups=absent, uncalibrated_groups=uncalibrated,
        **_resource_fields(model, meta, native.metrics), **_kernel_fields(kernels), **_reference_fields(ref),
        **_target_fields(emulated, with_deviation=kernels is not None), **_gpu_rule_fields(model, meta),
    )
    return _with_checks(report, t)


def _target_list(targets: Sequence[str] | str) -> tuple[str, ...]:
    """``native`` first, then each asked-for target once (ConfigError for an unknown one)."""
    asked = (targets,) if isinstance(targets, str) else tuple(targets)
    return tuple(dict.fromkeys(["native", *(check_target(x) for x in asked)]))


def _task(task: str | Task | None, meta: ExportMetadata | None, data, session, model: str) -> tuple[Task, str]:
    """The task of the validation and how it was chosen: given, the file's metadata, or inferred."""
    if task is None and meta is not None and meta.task:
        return task_from_dict(meta.task), "recorded in the file's fqexport metadata"
    if isinstance(task, str) and meta is not None and meta.task and meta.task.get("name") == task:
        # the name of the task the file records: its options too (a detector's NMS settings)
        return task_from_dict(meta.task), "given, with the options recorded in the file's fqexport metadata"
    if task is not None and not isinstance(task, str):
        return task, "given"
    sample = data.take(np.arange(min(2, len(data))))
    try:
        out = torch.from_numpy(run_batches(session, sample.x, 2)) if len(sample) else None
    except DataError as err:  # (named as Runner.measure names it)
        raise on_data_error(model, data.source, err) from err
    return resolve_task(task, data, out)


def _check_limits(t: Thresholds, task: Task, why: str, model: str) -> None:
    """ConfigError for a limit on a metric the task does not measure (``--min-worst-group-map`` on
    a classifier)."""
    for name, metric in LIMIT_METRICS.items():
        if getattr(t, name) is not None and metric not in task.metric_names:
            other = same_kind_limit(name, tuple(task.metric_names))
            instead = f"{flag(other)}, the {task.name}'s limit of that kind," if other else f"the {task.name}'s limits"
            raise ConfigError(MSG_LIMIT_TASK.format(flag=flag(name), name=name, metric=metric, instead=instead,
                                                    want=_METRIC_TASK[metric], model=model, task=task.name, why=why))


def _resource_fields(model: str | Path, meta: ExportMetadata | None, metrics: GroupMetrics) -> dict[str, Any]:
    """Size, average weight bits, params, MACs, BOPs, and the PePR scores they give."""
    res = model_resources(model, meta)
    return dict(
        size_bytes=model_files_size(model),
        avg_weight_bits=res.avg_weight_bits,
        params=res.params,
        macs=res.macs,
        bops=res.bops,
        resource_source=res.source,
        pepr=pepr_score(metrics.overall[metrics.primary], res.avg_weight_bits),
        pepr_worst_group=pepr_score(metrics.group_min()[1], res.avg_weight_bits),
    )


def _kernel_fields(k: KernelCheck | None) -> dict[str, Any]:
    if k is None:
        return {}
    return dict(
        unoptimized_metrics=k.unoptimized,
        kernel_deviation=(measured_max(k.deviation_by_group) or ("", float("nan")))[1],
        kernel_deviation_by_group=k.deviation_by_group,
        kernel_agreement=k.agreement,
        fused_kernels=k.fused_kernels,
        float_fallbacks=k.float_fallbacks,
        kernel_reference=k.reference,
    )


def _reference_fields(ref: ReferenceComparison | None) -> dict[str, Any]:
    if ref is None:
        return {}
    return dict(reference=ref.model, reference_metrics=ref.metrics, group_drop=ref.group_drop,
                group_changes=ref.group_changes, agreement=ref.agreement)


def _target_fields(emulated: Mapping[str, TargetResult], *, with_deviation: bool) -> dict[str, Any]:
    if not emulated:
        return {}
    return dict(
        target_metrics={x: r.metrics for x, r in emulated.items()},
        target_kernel_deviation_by_group={x: r.kernel_deviation_by_group for x, r in emulated.items()}
        if with_deviation else None,
        target_agreement={x: r.agreement for x, r in emulated.items()},
        target_native=tuple(x for x, r in emulated.items() if r.native),
        target_emulated_nodes={x: r.emulated_nodes for x, r in emulated.items() if r.emulated_nodes is not None},
        target_native_nodes={x: r.native_nodes for x, r in emulated.items() if r.native_nodes},
    )


def _gpu_rule_fields(model: str | Path, meta: ExportMetadata | None) -> dict[str, Any]:
    """The TensorRT / CUDA EP rules' violations of a file exported for the ``gpu`` target."""
    if meta is None or meta.target != "gpu":
        return {}
    return dict(gpu_rule_violations=tuple(str(v) for v in check_gpu_qdq(onnx.load(str(model)))))


def _with_checks(report: ValidationReport, t: Thresholds) -> ValidationReport:
    """``report`` with one check per set limit (each emulated target's too), each logged."""
    checks = all_checks(report, t)
    for c in checks:
        (log.info if c.passed else log.warning)("%s: %s", "PASS" if c.passed else "FAIL", c.message)
    notes = tuple(resolution_notes(report, t) + native_node_notes(report))
    for note in notes:
        log.warning(note)
    return dataclasses.replace(report, checks=checks, notes=notes)
