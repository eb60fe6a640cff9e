"""``fqexport compress``, run after its flags and paths passed (``fqexport.cli.flags.compress``):
quantize a float model (uniform or by the mixed-precision search), optionally fine-tune it, and
write a QDQ ONNX file checked against the PyTorch fake-quant reference."""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path

from fqexport.calibration.readers import load_data
from fqexport.cli.common import EXIT_OK, cell_text, print_table, size_text
from fqexport.cli.finetune import finetune_plan, run_finetune, run_finetune_widths
from fqexport.cli.flags.compress import search_budget
from fqexport.cli.flags.finetune import parse_export_bits, width_paths
from fqexport.cli.flags.shared import quant_config, search_config
from fqexport.cli.tasks import task_line, task_of
from fqexport.config import QuantConfig
from fqexport.exporters.cpu_isa import cpu_isa, emulated_host, kernel_family
from fqexport.exporters.export_check import TARGET_FAMILIES
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.qdq_onnx import export_float_reference, export_qdq
from fqexport.finetune.api import worst_of
from fqexport.graph.loading import load_model
from fqexport.graph.prepare import UNSUPPORTED
from fqexport.pipeline.compress import compress
from fqexport.search.byte_budget import check_finetuned_size
from fqexport.search.candidates import MixedPrecisionResult
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.shown_text import loss_text
from fqexport.validation.reports import float_tail_words, write_json_data
from fqexport.validation.resources import from_metadata
from fqexport.validation.speed import speed_vs_float


MSG_SPEED_OTHER_FAMILY = (
    "speed: timed with this CPU's {host} int8 kernels; the file's target {target} runs {families} kernels, "
    "whose speed differs (int8 without VNNI gains little over float: docs/ort-kernels.md); time it on such a "
    "CPU (fqexport validate --reference)"
)
MSG_SPEED_STAND_IN = (
    "speed: timed with this CPU's {host} int8 kernels; FQEXPORT_HOST_KERNELS={stand_in} stands in for the "
    "{stand_in} kernels in the accuracy checks only"
)


def speed_caveat(target: str, host: str) -> str | None:
    """What the speed line does not cover: a target whose kernel families exclude this CPU's
    (``host``: its kernel family), or a FQEXPORT_HOST_KERNELS stand-in (timing is never emulated);
    ``None`` when the timing is the target's own."""
    families = TARGET_FAMILIES.get(target, ())
    if families and host not in families:
        return MSG_SPEED_OTHER_FAMILY.format(host=host, target=target, families="/".join(families))
    stand_in = emulated_host()
    if stand_in is not None and stand_in != host:
        return MSG_SPEED_STAND_IN.format(host=host, stand_in=stand_in)
    return None


def run_compress(args: argparse.Namespace) -> int:
    """Run ``compress`` from parsed, checked args: quantize, export, print the layer table; return 0."""
    widths = width_paths(args.out, parse_export_bits(args.export_bits))
    config = quant_config(args)
    plan = finetune_plan(args, load_data(args.calib) if args.finetune else None)
    model = load_model(args.model, args.weights, trust_pickle=args.trust_pickle, decode=args.decode)
    search = None
    task = task_of(args)
    budget = search_budget(args)
    if budget is not None:
        search = _run_search(args, model, config, budget, task)
        cm = search.compressed
    else:
        cm = compress(model, args.calib, config, progress=not args.quiet, task=task)
    if plan is not None and plan.export_bits:
        return _export_widths(args, run_finetune_widths(plan, cm, quiet=args.quiet), widths)
    if plan is not None:
        cm = run_finetune(plan, cm, quiet=args.quiet)
        if budget is not None and "budget_bytes" in budget:  # its record grew the metadata the search measured
            check_finetuned_size(cm, budget["budget_bytes"])
    result = export_qdq(cm, args.out)
    reference = export_float_reference(cm, args.float_out) if args.float_out else None
    rows = [dict(r, macs=f"{r['macs']:,}", params=f"{r['params']:,}") for r in cm.layer_table()]
    floats = cm.metadata.float_layers
    print_table(rows, ["name", "module", "bits", "params", "macs", "storage"] + (["reason"] if floats else []))
    kept = sum(1 for f in floats if (f.reason or "").startswith("keep_float"))
    if kept:
        print(f"\n{kept} weight layer(s) stay in float by --keep-float (reason above)")
    unsupported = sum(1 for f in floats if (f.reason or UNSUPPORTED) == UNSUPPORTED)
    if unsupported:
        print(f"\nwarning: {unsupported} weight layer(s) fqexport cannot quantize stay in float (storage "
              "float32 above; --strict refuses them)")
    print(f"\n{task_line(cm.metadata.task)}")
    if cm.metadata.float_ops:
        decode = (cm.metadata.task or {}).get("decode")
        named = f"the box decode, {decode}" if decode else float_tail_words(cm.metadata.task)
        print(f"{len(cm.metadata.float_ops)} ops after the last weight layers stay float ({named}): "
              + ", ".join(cm.metadata.float_ops))
    written = read_metadata(result.path)
    stored = from_metadata(written)  # the codes at their containers' width, as validate counts them
    wider = (f"; {stored.avg_weight_bits:.2f} at the width of the containers the file stores the codes in, what "
             "validate reports" if stored is not None and abs(stored.avg_weight_bits - cm.avg_weight_bits) >= 0.005 else "")
    print(f"\naverage weight bits {cm.avg_weight_bits:.2f} (float layers at 32; {cm.quantized_fraction:.1%} of "
          f"weights quantized{wider}; {cm.stored_weight_bits:.2f} stored with the scales and zero points); "
          f"wrote {result.path} ({size_text(result.size_bytes)}, opset {result.opset})")
    if reference is not None:
        print(f"wrote the float reference {reference.path} ({size_text(reference.size_bytes)}): "
              f"fqexport validate {shlex.quote(str(result.path))} --reference {shlex.quote(str(reference.path))} ...")
    print(f"export check for target {cm.config.target} (the file vs the PyTorch fake-quant reference), judged by:")
    for verdict in result.checks:
        print(f"  {verdict.line()}")
    speed, timings = None, None
    if cm.config.target == "gpu" and not args.no_speed_check:
        print("speed: not timed here (--target gpu writes S8S8 for TensorRT / ORT's CUDA EP, which this CPU's "
              "timing says nothing about: fqexport validate --provider cuda on the GPU)")
    elif not args.no_speed_check:
        latency, float_latency, speed = speed_vs_float(cm, result.path)
        # the verdict is the median ratio of the paired runs, which the two sides' p50s can differ from
        threads = latency[0].threads if latency else 0
        print(f"speed vs the float model, ONNX Runtime optimized sessions on this CPU ({threads} thread(s); "
              "p50 ms, run alternately): "
              + ", ".join(f"batch {q.batch_size} {q.p50_ms:.3f} vs {f.p50_ms:.3f}"
                          + (f" ({q.repeats} pairs, median of their ratios {q.speedup:.2f}x)"
                             if q.speedup is not None else "")
                          for q, f in zip(latency, float_latency)))
        print(speed)
        isa = cpu_isa()  # the figures hold for this CPU only, as validate's report.json says
        caveat = speed_caveat(cm.config.target, kernel_family(isa))
        if caveat:
            print(caveat)
        timings = {"cpu_isa": isa, "cpu_kernel_family": kernel_family(isa),
                   "latency": [q.to_dict() for q in latency], "float_latency": [f.to_dict() for f in float_latency],
                   "speedup_vs_float": {str(q.batch_size): q.speedup for q in latency}}
    if args.report:
        # the record the file holds (storage, opset and containers are set by the export), not the model's
        summary = {"export": result.to_dict(), "layers": cm.layer_table(), "metadata": written.to_dict(),
                   "avg_weight_bits": cm.avg_weight_bits,
                   # the codes at their containers' width (validate's figure); with scales and zero points
                   "avg_container_weight_bits": stored.avg_weight_bits if stored is not None else None,
                   "avg_stored_weight_bits": cm.stored_weight_bits,
                   "speed": speed, "speed_timings": timings}
        if search is not None:
            summary["mixed_precision"] = search.to_dict()
        write_json_data(summary, Path(args.report))
    return EXIT_OK


def _export_widths(args: argparse.Namespace, models: dict, paths: dict) -> int:
    """``--export-bits``: one ONNX file per width of one fine-tuning run (and the --report)."""
    rows, exports = [], {}
    if args.float_out:  # one float model behind every width
        print(f"wrote the float reference {export_float_reference(next(iter(models.values())), args.float_out).path}")
    for b, m in models.items():
        result = export_qdq(m, paths[b])
        exports[b] = result.to_dict()
        worst = worst_of((m.metadata.finetune or {}).get("holdout_after"), m.task.search_metric)
        rows.append({"bits": b, "file": str(result.path), "MB": f"{result.size_bytes / 1e6:.3f}",
                     "avg weight bits": f"{m.avg_weight_bits:.2f}",
                     f"hold-out worst-group {m.task.search_metric} %": "-" if worst is None else f"{100 * worst:.2f}",
                     f"ORT {m.task.agreement_name}": f"{result.agreement:.2%}",
                     f"max |{m.task.diff_name}|": f"{result.max_abs_diff:.4g}"})
    print("exported widths (a layer trained at the width keeps its codes, the others' trained weights are "
          "re-quantized at it without training; hold-out: fine-tuning's split; ORT vs the fake-quant reference "
          "on the calibration samples):")
    print_table(rows, list(rows[0].keys()))
    if args.report:
        write_json_data({"exports": {str(b): e for b, e in exports.items()},
                         "metadata": {str(b): m.metadata.to_dict() for b, m in models.items()}}, Path(args.report))
    return EXIT_OK


def _run_search(args: argparse.Namespace, model, config: QuantConfig, budget: dict[str, float],
                task) -> MixedPrecisionResult:
    """The fairness-aware mixed-precision search of ``fqexport compress --budget-*``."""
    mp = search_config(args, **budget)
    res = search_mixed_precision(model, args.calib, mp, config, progress=not args.quiet, task=task)
    metric = "" if res.compressed.task.search_metric == "accuracy" else f" {res.compressed.task.search_metric}"
    print(f"mixed precision ({mp.objective}, budget {mp.budget_kind} {mp.budget_value:g}):")
    # a pinned width outside the measured ones has no sensitivity entry: said, not "nan"
    rows = [dict(r, sensitivity="not measured" if math.isnan(r["sensitivity"]) else f"{r['sensitivity']:.4g}")
            for r in res.table()]
    print_table(rows, ["name", "params", "bits", "stored_bits", "container", "sensitivity", "most_sensitive_group"])
    cands = []
    for c in res.candidates:
        cands.append({"chosen": "*" if c.allocation is res.allocation else "", "origin": c.origin,
                      "avg bits": f"{c.allocation.avg_bits:.3f}",
                      "stored bits": f"{c.allocation.stored_bits:.3f}",
                      "weight bytes": f"{c.allocation.file_weight_bytes:,}",
                      "predicted worst Δloss": loss_text(c.allocation.predicted_worst),
                      "held-out worst Δloss": loss_text(c.measured_worst),
                      f"held-out worst-group{metric} %": f"{100 * c.worst_group_acc:.2f}",
                      f"held-out overall{metric} %": f"{100 * c.mean_acc:.2f}"})
    print(f"\ncandidates verified on held-out calibration data ({res.verification}; predicted vs measured):")
    print_table(cands, list(cands[0].keys()))
    if (line := holdout_counts_line(res)) is not None:
        print(line)
    print(f"\n{res.fits} compress fit{'s' if res.fits != 1 else ''} in {_secs(res.fit_seconds)} s; search {_secs(res.wall_seconds)} s; "
          f"storage {res.storage}: nominal {res.allocation.avg_bits:.3f} bits, stored "
          f"{res.allocation.stored_bits:.3f} bits/weight with scales, {res.allocation.file_weight_bytes:,} weight bytes")
    one, which = res.one_compress()
    print(f"search wall time {_secs(res.wall_seconds)} s = {res.wall_seconds / max(one, 1e-9):.2f}x one compress "
          f"({_secs(one)} s: {which})")
    for note in (res.fallback, res.unguarded):
        if note:
            print(f"note: {note}")
    if res.selection_note:
        print(f"note: {res.selection_note}")
    print()
    return res


def holdout_counts_line(res: MixedPrecisionResult) -> str | None:
    """The held-out samples per group behind the candidates' figures, with the smallest group's
    one prediction in pp when it is coarser than 1 pp (a 4-sample group moves by 25 pp)."""
    measured = next((c.metrics for c in res.candidates if c.metrics is not None), None)
    if measured is None:
        return None
    counts = {g: int(r["count"]) for g, r in measured.by_group.items()}
    line = "held-out samples per group: " + ", ".join(f"{cell_text(g)} {n}" for g, n in counts.items())
    small = min((g for g in counts if counts[g] > 0), key=counts.get, default=None)
    if small is not None and counts[small] < 100:
        line += f" (one prediction of {cell_text(small)} is {100 / counts[small]:.2f} pp of its figure)"
    return line


def _secs(seconds: float) -> str:
    """Seconds with the digits a ratio of them needs: ``12.3``, ``1.23``, ``0.031`` (not ``0.0``)."""
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.3g}"
