"""Whole-model benchmark of the PTQ solver (issue 4): per-group accuracy at W4A8 and W3A8.

    .venv/bin/python benchmarks/solver_models_bench.py                  # demo CNN + tabular MLP
    .venv/bin/python benchmarks/solver_models_bench.py --investigate    # + knob sweep on misses
    .venv/bin/python benchmarks/solver_models_bench.py --resnet18       # ResNet-18 compress time
    .venv/bin/python benchmarks/solver_models_bench.py --cache /tmp/fqb # reuse trained models

Models: the demo SmallResNet trained on the demo image task (90 % majority, 10 %
"inverted-contrast" minority) and an MLP trained on ``make_tabular_task`` (10 % "shifted"
minority). For each, float per-group accuracy on the test split, then at W4A8 and W3A8:

- RTN (plain: round to nearest on the min-max grid, no clip search, no bias correction);
- RTN + clip search + bias correction (what the pipeline adds around any method);
- solver, natural column order (group-weighted H);
- solver, sensitivity order, group-weighted H (the default);
- solver, sensitivity order, sample-weighted H (``group_weights="samples"``);
- solver, sensitivity order, layer target (``solver_target="layer"``: each layer fitted to its
  own float weights on the quantized inputs instead of the float model's output);
- plain GPTQ: act order ("hessian-diag") + sample-weighted H + layer target.

The test splits are larger than the demo's (``--n-test``, default 15000: 1500 minority images,
1 image = 0.07 pt); the training data, drawn first from the same seed, is unchanged.

Every variant uses the same calibration set: ``group_balanced_subset(train, 512)``. On that set
the groups have equal counts, so the sample-weighted H *equals* the group-weighted one; the
section "natural-distribution calibration" repeats the H-weighting comparison on a random
(90/10) 512-sample draw, where the two differ. Accuracy is measured in PyTorch fake-quant
(``CompressedModel.predict``); the default variant is also exported (QDQ ONNX, storage "auto":
INT4 containers for <= 4 bits, and "int8": the fused-kernel container) and validated in ONNX
Runtime's optimized session to show parity. Every compress is timed.

``--resnet18``: wall time of ``compress(method="solver")`` on a randomly initialised ResNet-18
(11.2 M params, 10 classes) with 64 calibration images of 64x64 in 2 groups, split into the
pipeline's phases by timing wrappers around its internal functions (``--profile`` adds
cProfile's top entries).

All torch work runs on ``--threads`` intra-op threads (1 by default: on the shared 2-core
machine, 2 threads were 10x slower under load; the ResNet-18 timing is run with 2 and 1). The machine may be
shared: times are wall-clock and carry the load of whatever else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import os
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fqexport.calibration.group_data import GroupData  # noqa: E402
from fqexport.calibration.sampling import group_balanced_subset  # noqa: E402
from fqexport.config import QuantConfig  # noqa: E402
from fqexport.metrics.group_metrics import GroupMetrics, group_metrics  # noqa: E402
from fqexport.model import CompressedModel  # noqa: E402
from fqexport.pipeline.compress import compress  # noqa: E402

NUM_CALIB = 512
BITS = (4, 3)
# Targets of issue 4 (demo CNN): percentage points.
TARGET_W4_MAX_GROUP_DROP = 0.5
TARGET_W3_MAX_GROUP_DROP = 2.0
TARGET_W3_ABOVE_RTN = 5.0  # "far above RTN": worst group at least this many points above RTN
RESNET18_TARGET_S = 120.0

# (label, QuantConfig overrides); weight_bits and num_calib are set per run.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("RTN (plain)", dict(method="rtn", clip_search=False, bias_correction=False, bn_reestimate=False)),
    ("RTN + clip + bias corr.", dict(method="rtn")),
    ("solver natural", dict(order="natural")),
    ("solver sensitivity (default)", dict()),
    ("solver sensitivity, samples H", dict(group_weights="samples")),
    ("solver sensitivity, layer target", dict(solver_target="layer")),
    ("plain GPTQ (hess-diag + samples H + layer target)",
     dict(order="hessian-diag", group_weights="samples", solver_target="layer")),
)
DEFAULT_LABEL = "solver sensitivity (default)"
NATURAL_VARIANTS = (
    ("solver sensitivity (default)", dict()),
    ("solver sensitivity, samples H", dict(group_weights="samples")),
    ("plain GPTQ (hess-diag + samples H + layer target)",
     dict(order="hessian-diag", group_weights="samples", solver_target="layer")),
)
# Knobs tried on the demo CNN by --investigate (label, overrides of the default config).
INVESTIGATE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default", dict()),
    ("damp 0.001", dict(damp=0.001)),
    ("damp 0.1", dict(damp=0.1)),
    ("block 32", dict(block_size=32)),
    ("no clip search", dict(clip_search=False)),
    ("no bias correction", dict(bias_correction=False, bn_reestimate=False)),
    ("no BN re-estimation", dict(bn_reestimate=False)),
    ("calibration mse", dict(calibration="mse")),
    ("calibration percentile 99.99", dict(calibration="percentile")),
    ("W8A8 (activation error alone, ~)", dict(weight_bits=8)),
)
INVESTIGATE_NUM_CALIB = 1024


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def pt(x: float) -> str:
    return f"{100.0 * x:.2f}"


def print_table(rows: list[dict[str, Any]], title: str | None = None) -> None:
    """A Markdown table of ``rows`` (same keys in every row)."""
    if title:
        print(f"\n### {title}\n")
    if not rows:
        print("(no rows)")
        return
    cols = list(rows[0].keys())
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    sys.stdout.flush()


@dataclass
class Result:
    """One compressed variant: metrics in PyTorch (and ONNX Runtime when exported)."""

    model: str
    bits: int
    label: str
    seconds: float
    torch_metrics: GroupMetrics
    ort: dict[str, GroupMetrics] = field(default_factory=dict)  # storage -> metrics
    export_info: dict[str, Any] = field(default_factory=dict)


def metrics_of(logits: np.ndarray, data: GroupData) -> GroupMetrics:
    return group_metrics(logits, data.y, data.group, data.group_names)


def row_of(label: str, m: GroupMetrics, ref: GroupMetrics | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Overall and per-group accuracy (%) with the drop vs ``ref`` in points."""
    row: dict[str, Any] = {"variant": label, "overall %": pt(m.overall["accuracy"])}
    for name, g in m.by_group.items():
        row[f"{name} %"] = pt(g["accuracy"])
    if ref is not None:
        row["overall drop"] = pt(ref.overall["accuracy"] - m.overall["accuracy"])
        for name, g in m.by_group.items():
            row[f"{name} drop"] = pt(ref.by_group[name]["accuracy"] - g["accuracy"])
        row["max group drop"] = pt(max_group_drop(m, ref))
    row["worst %"] = pt(m.group_min("accuracy")[1])
    row.update(extra or {})
    return row


def max_group_drop(m: GroupMetrics, ref: GroupMetrics) -> float:
    return max(ref.by_group[n]["accuracy"] - g["accuracy"] for n, g in m.by_group.items())


def set_threads(n: int) -> None:
    torch.set_num_threads(int(n))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def demo_cnn(cache: Path | None, seed: int, n_test: int) -> tuple[torch.nn.Module, GroupData, GroupData, str]:
    """The demo SmallResNet and its task; trained once, then loaded from ``cache`` if given."""
    from fqexport.demo.models import SmallResNet
    from fqexport.demo.task import make_image_task
    from fqexport.demo.training import DEMO_TASK_SIZES, DEMO_TRAIN, train_classifier

    path = cache / f"demo_cnn_seed{seed}.pt" if cache else None
    if path is not None and path.exists():
        s = DEMO_TASK_SIZES
        train, test = make_image_task(s.n_train, n_test, s.size, s.minority_fraction, seed=seed)
        model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), train, test, f"loaded from {path}"
    # DEMO_TRAIN's wall-clock budget (max_seconds) cuts training short on a loaded machine
    # (measured: 44 of 620 steps, 36 % test accuracy at load 9): train the full schedule.
    s = DEMO_TASK_SIZES
    train, test = make_image_task(s.n_train, n_test, s.size, s.minority_fraction, seed=seed)
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
    t = time.perf_counter()
    model = train_classifier(model, train, replace(DEMO_TRAIN, max_seconds=None), progress=False)
    seconds = time.perf_counter() - t
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), train, test, f"trained in {seconds:.0f} s"


def tabular_mlp(cache: Path | None, seed: int, n_test: int) -> tuple[torch.nn.Module, GroupData, GroupData, str]:
    """An MLP (32 → 256 → 256 → 4) trained on ``make_tabular_task``."""
    from fqexport.demo.models import MLP
    from fqexport.demo.task import make_tabular_task
    from fqexport.demo.training import TrainConfig, train_classifier

    train, test = make_tabular_task(n_test=n_test, seed=seed)
    torch.manual_seed(seed)
    model = MLP(train.x.shape[1], int(train.y.max()) + 1, hidden=256, depth=3)
    path = cache / f"tabular_mlp_seed{seed}.pt" if cache else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), train, test, f"loaded from {path}"
    t = time.perf_counter()
    model = train_classifier(model, train, TrainConfig(epochs=30, batch_size=128, lr=0.05, seed=seed),
                             progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), train, test, f"trained in {time.perf_counter() - t:.0f} s"


# ---------------------------------------------------------------------------------------------
# the per-group comparison
# ---------------------------------------------------------------------------------------------


def run_variant(model, calib: GroupData, test: GroupData, config: QuantConfig) -> tuple[CompressedModel, float, GroupMetrics]:
    t = time.perf_counter()
    cm = compress(model, calib, config, progress=False)
    seconds = time.perf_counter() - t
    return cm, seconds, metrics_of(cm.predict(test.x), test)


def ort_parity(cm: CompressedModel, model, calib: GroupData, test: GroupData, out_dir: Path, stem: str,
               storages: list[str]) -> tuple[dict[str, GroupMetrics], dict[str, Any]]:
    """Export ``cm`` — for another storage, the same compress with that storage (the container is
    decided in compress) — and validate each file in ONNX Runtime (optimized)."""
    from fqexport.exporters.qdq_onnx import export_qdq
    from fqexport.validation.gate import validate

    metrics, info = {}, {}
    for storage in storages:
        path = out_dir / f"{stem}_{storage}.onnx"
        scm = cm if storage == cm.config.storage else compress(model, calib, replace(cm.config, storage=storage),
                                                                progress=False)
        res = export_qdq(scm, path)
        report = validate(path, test, measure_latency=False)
        metrics[storage] = report.metrics
        kernels = {k: v for k, v in (report.fused_kernels or {}).items()
                   if v and k in ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulNBits", "Conv", "Gemm", "FusedConv", "FusedGemm")}
        info[storage] = {
            "calib agreement": f"{res.agreement:.4f}", "calib max|diff|": f"{res.max_abs_diff:.3g}",
            "kernel dev pt": pt(report.kernel_deviation or 0.0),
            "size KB": f"{res.size_bytes / 1e3:.0f}",
            "kernels": ", ".join(f"{k}x{v}" for k, v in sorted(kernels.items())),
        }
        path.unlink(missing_ok=True)
    return metrics, info


def compare_model(name: str, model, train: GroupData, test: GroupData, out_dir: Path, storages: list[str],
                  seed: int) -> list[Result]:
    calib = group_balanced_subset(train, NUM_CALIB, seed=seed)
    print(f"\n## {name}\n")
    print(f"calibration: group_balanced_subset(train, {NUM_CALIB}): "
          + ", ".join(f"{n}={c}" for n, c in zip(calib.group_names, calib.group_counts())))
    print("test split: " + ", ".join(f"{n}={c}" for n, c in zip(test.group_names, test.group_counts())))
    results: list[Result] = []
    float_m: GroupMetrics | None = None
    for bits in BITS:
        rows = []
        for label, over in VARIANTS:
            config = QuantConfig(weight_bits=bits, num_calib=NUM_CALIB, seed=seed, **over)
            cm, seconds, m = run_variant(model, calib, test, config)
            if float_m is None:
                float_m = metrics_of(cm.predict(test.x, quantized=False), test)
                print_table([row_of("float (BN folded)", float_m, None)], f"{name}: float, test split")
            r = Result(name, bits, label, seconds, m)
            if label == DEFAULT_LABEL:
                r.ort, r.export_info = ort_parity(cm, model, calib, test, out_dir, f"{name.split()[0]}_w{bits}", storages)
            results.append(r)
            rows.append(row_of(label, m, float_m, {"compress s": f"{seconds:.1f}"}))
            for storage, om in r.ort.items():
                rows.append(row_of(f"  └ same, ONNX Runtime ({storage})", om, float_m, {"compress s": ""}))
        print_table(rows, f"{name}: W{bits}A8, PyTorch fake-quant (drops in points vs float)")
        for r in results:
            if r.bits == bits and r.export_info:
                print_table([{"storage": s, **i} for s, i in r.export_info.items()],
                            f"{name}: W{bits}A8 default variant, export (agreement on the calibration set)")
    results.insert(0, Result(name, 32, "float", 0.0, float_m))  # type: ignore[arg-type]
    return results


def natural_calibration(name: str, model, train: GroupData, test: GroupData, float_m: GroupMetrics,
                        seed: int) -> None:
    """Group-weighted vs sample-weighted H on a random (population-distributed) draw."""
    rng = np.random.default_rng(seed + 1)
    calib = train.subset(rng.choice(len(train), NUM_CALIB, replace=False))
    print(f"\n### {name}: natural-distribution calibration (random {NUM_CALIB}: "
          + ", ".join(f"{n}={c}" for n, c in zip(calib.group_names, calib.group_counts())) + ")")
    for bits in BITS:
        rows = []
        for label, over in NATURAL_VARIANTS:
            config = QuantConfig(weight_bits=bits, num_calib=NUM_CALIB, seed=seed, **over)
            cm, seconds, m = run_variant(model, calib, test, config)
            rows.append(row_of(label, m, float_m, {"compress s": f"{seconds:.1f}"}))
        print_table(rows, f"{name}: W{bits}A8, natural calibration, PyTorch fake-quant")


def find(results: list[Result], bits: int, label: str) -> Result:
    return next(r for r in results if r.bits == bits and r.label == label)


def summary(results: list[Result]) -> list[str]:
    """Target checks for the demo CNN (issue 4) and the same numbers for the MLP."""
    lines = []
    models = sorted({r.model for r in results}, key=[r.model for r in results].index)
    for name in models:
        rs = [r for r in results if r.model == name]
        float_m = find(rs, 32, "float").torch_metrics
        for bits in BITS:
            d = find(rs, bits, DEFAULT_LABEL)
            rtn = find(rs, bits, "RTN (plain)")
            worst_q = d.torch_metrics.group_min("accuracy")
            worst_rtn = rtn.torch_metrics.group_min("accuracy")
            drop = max_group_drop(d.torch_metrics, float_m)
            ort_drops = {s: max_group_drop(m, float_m) for s, m in d.ort.items()}
            limit = TARGET_W4_MAX_GROUP_DROP if bits == 4 else TARGET_W3_MAX_GROUP_DROP
            ok = 100 * drop <= limit and all(100 * v <= limit for v in ort_drops.values())
            # the targets are the demo CNN's; other models get the same figures, unjudged
            judged = name == "demo CNN"

            def verdict(met: bool, target: str) -> str:
                return f" (target {target}) -> {'MET' if met else 'MISSED'}" if judged else ""

            text = (f"{name} W{bits}A8: max group drop {pt(drop)} pt in PyTorch"
                    + "".join(f", {pt(v)} pt in ORT ({s})" for s, v in ort_drops.items())
                    + verdict(ok, f"<= {limit} pt"))
            if bits == 3:
                margin = 100 * (worst_q[1] - worst_rtn[1])
                far = margin >= TARGET_W3_ABOVE_RTN
                rtn_cb = find(rs, bits, "RTN + clip + bias corr.").torch_metrics.group_min("accuracy")[1]
                gptq = find(rs, bits, VARIANTS[-1][0]).torch_metrics.group_min("accuracy")[1]
                text += (f"; worst group {pt(worst_q[1])} % vs plain RTN {pt(worst_rtn[1])} % "
                         f"(+{margin:.2f} pt){verdict(far, f'>= +{TARGET_W3_ABOVE_RTN}')}"
                         f" (vs RTN + clip + bias corr. {pt(rtn_cb)} %, plain GPTQ {pt(gptq)} %)")
            lines.append(text)
        for bits in BITS:
            t = {r.label: r.seconds for r in rs if r.bits == bits}
            lines.append(f"{name} W{bits}A8 compress time: "
                         + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    return lines


def investigate(model, train: GroupData, test: GroupData, float_m: GroupMetrics, bits_list: list[int],
                seed: int) -> None:
    """Knob sweep of the default solver on the demo CNN (PyTorch fake-quant)."""
    calib = group_balanced_subset(train, NUM_CALIB, seed=seed)
    big = group_balanced_subset(train, INVESTIGATE_NUM_CALIB, seed=seed)
    for bits in bits_list:
        rows = []
        runs = [(label, calib, over, NUM_CALIB) for label, over in INVESTIGATE]
        runs.append((f"num_calib {INVESTIGATE_NUM_CALIB}", big, {}, INVESTIGATE_NUM_CALIB))
        for label, data, over, n in runs:
            config = QuantConfig(**{**dict(weight_bits=bits, num_calib=n, seed=seed), **over})
            cm, seconds, m = run_variant(model, data, test, config)
            rows.append(row_of(label, m, float_m, {"compress s": f"{seconds:.1f}"}))
        # weights only: no activation quantization error (isolates the weight part)
        rows.append(row_of("(weights only: act QDQ off)", weights_only_metrics(model, calib, test, bits, seed),
                           float_m, {"compress s": ""}))
        print_table(rows, f"demo CNN: W{bits}A8 investigation (default solver, one knob changed)")


def weights_only_metrics(model, calib: GroupData, test: GroupData, bits: int, seed: int) -> GroupMetrics:
    """Accuracy of the BN-folded model with the solver's quantized weights and float activations."""
    cm = compress(model, calib, QuantConfig(weight_bits=bits, num_calib=NUM_CALIB, seed=seed), progress=False)
    fm = cm.float_model
    mods = dict(fm.named_modules())
    ref_mods = dict(cm.reference.named_modules())
    with torch.no_grad():
        for name, layer in cm.layers.items():
            mods[name].weight.copy_(layer.dequantized())
            if getattr(ref_mods.get(name), "bias", None) is not None:
                if mods[name].bias is None:
                    mods[name].bias = torch.nn.Parameter(ref_mods[name].bias.detach().clone())
                else:
                    mods[name].bias.copy_(ref_mods[name].bias)
    return metrics_of(cm.predict(test.x, quantized=False), test)


# ---------------------------------------------------------------------------------------------
# ResNet-18 timing
# ---------------------------------------------------------------------------------------------


class PhaseTimer:
    """Wall time per phase, collected by wrapping functions (``patch``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.last_end = 0.0
        self.first_start: float | None = None

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t = time.perf_counter()
            if self.first_start is None:
                self.first_start = t
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + end - t
                self.calls[phase] = self.calls.get(phase, 0) + 1
                self.last_end = end

        return timed


@contextlib.contextmanager
def patched(obj: Any, attr: str, timer: PhaseTimer, phase: str) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, timer.wrap(phase, old))
    try:
        yield
    finally:
        setattr(obj, attr, old)


def resnet18_data(n: int = 64, size: int = 64, seed: int = 0) -> GroupData:
    """``n`` random images, two groups of n/2; group 1 has inverted, brighter pixels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    group = np.arange(n) % 2
    x[group == 1] = 1.0 - 2.0 * x[group == 1]
    y = rng.integers(0, 10, n)
    return GroupData(x, y.astype(np.int64), group.astype(np.int64), ("majority", "minority"), "random 64x64")


def bench_resnet18(bits: int, profile: bool, seed: int) -> float:
    import fqexport.quant.hessian as hessian_mod
    import fqexport.pipeline.compress as pipeline_mod
    import fqexport.quant.solver as solver_mod
    from resnet18 import resnet18

    model = resnet18(num_classes=10, seed=seed).eval()
    params = sum(p.numel() for p in model.parameters())
    data = resnet18_data(seed=seed)
    config = QuantConfig(weight_bits=bits, num_calib=len(data), seed=seed)
    print(f"\n## ResNet-18 compress time (solver, W{bits}A8, {params / 1e6:.2f} M params, "
          f"{len(data)} calibration images 3x64x64, 2 groups, {torch.get_num_threads()} threads)\n")
    timer = PhaseTimer()
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(patched(pipeline_mod, "_float_targets", timer, "float targets pass (bias corr.)"))
        stack.enter_context(patched(pipeline_mod, "_layer_moments", timer, "Hessian (+ cross moment): collection (total)"))
        stack.enter_context(patched(hessian_mod.HessianAccumulator, "add", timer, "Hessian: unfold + XᵀX"))
        stack.enter_context(patched(pipeline_mod, "_retarget_to_float_output", timer, "float-output target"))
        stack.enter_context(patched(pipeline_mod, "choose_weight_grid", timer, "grid + clip search"))
        stack.enter_context(patched(solver_mod, "solve_layer", timer, "solve (shared H⁻¹, all rows)"))
        stack.enter_context(patched(pipeline_mod, "_correct_layer", timer, "corrections (bias / BN re-est.)"))
        prof = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        cm = compress(model, data, config, progress=False)
        if prof:
            prof.disable()
        total = time.perf_counter() - t0
    s = timer.seconds
    pre = (timer.first_start or t0) - t0
    act = t0 + total - timer.last_end
    hess_fwd = s.get("Hessian (+ cross moment): collection (total)", 0.0) - s.get("Hessian: unfold + XᵀX", 0.0)
    rows = [
        ("load, trace, BN fold, MACs", pre),
        ("float targets pass (bias corr.)", s.get("float targets pass (bias corr.)", 0.0)),
        ("Hessian: forward passes to each layer (quantized + float)", hess_fwd),
        ("Hessian: unfold + XᵀX and X_fXᵀ accumulation", s.get("Hessian: unfold + XᵀX", 0.0)),
        ("float-output target W* = W + W(C−H)(H+λI)⁻¹", s.get("float-output target", 0.0)),
        ("grid + clip search", s.get("grid + clip search", 0.0)),
        ("solve (shared H⁻¹, all rows)", s.get("solve (shared H⁻¹, all rows)", 0.0)),
        ("corrections (bias / BN re-est.)", s.get("corrections (bias / BN re-est.)", 0.0)),
        ("activation calibration (after the last layer)", act),
    ]
    accounted = sum(v for _, v in rows)
    rows.append(("other (layer loop glue)", total - accounted))
    print_table([{"phase": k, "seconds": f"{v:.2f}", "share %": f"{100 * v / total:.1f}"} for k, v in rows]
                + [{"phase": "**total compress**", "seconds": f"{total:.2f}", "share %": "100.0"}],
                "time split (wrappers around pipeline internals)")
    top = max(rows, key=lambda kv: kv[1])
    print(f"\nResNet-18 compress: {total:.1f} s (target < {RESNET18_TARGET_S:.0f} s -> "
          f"{'MET' if total < RESNET18_TARGET_S else 'MISSED'}); dominant phase: {top[0]} "
          f"({100 * top[1] / total:.0f} %); {len(cm.layers)} layers quantized; "
          f"{s.get('solve (shared H⁻¹, all rows)', 0.0) / max(timer.calls.get('solve (shared H⁻¹, all rows)', 1), 1):.2f} s per solve")
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        print("\ncProfile, top 15 by own time (profiling inflates Python-heavy parts):\n")
        print("```\n" + buf.getvalue().strip() + "\n```")
    return total


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on the shared 2-core machine at load ~8, "
                        "2 threads made a training step 10x slower, 2.6 s vs 0.25 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=15000,
                   help="test split size (10%% minority; the demo itself uses 3000)")
    p.add_argument("--cache", type=Path, default=None, help="folder caching the trained models")
    p.add_argument("--models", default="cnn,mlp", help="comma list of cnn, mlp")
    p.add_argument("--storages", default="auto,int8", help="export storages checked in ORT")
    p.add_argument("--no-natural", action="store_true", help="skip the natural-calibration section")
    p.add_argument("--investigate", action="store_true", help="knob sweep on the demo CNN")
    p.add_argument("--investigate-only", action="store_true", help="only the knob sweep")
    p.add_argument("--resnet18", action="store_true", help="only the ResNet-18 timing")
    p.add_argument("--resnet18-bits", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="cProfile the ResNet-18 compress")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# fqexport solver whole-model benchmark\n\ntorch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, load average at start {load:.1f} on {os.cpu_count()} cores (shared machine: "
          "times include other users' load)")
    t_start = time.perf_counter()
    if args.resnet18:
        bench_resnet18(args.resnet18_bits, args.profile, args.seed)
        return 0

    results: list[Result] = []
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="fqexport_bench_") as tmp:
        out = Path(tmp)
        if "cnn" in wanted:
            model, train, test, how = demo_cnn(args.cache, args.seed, args.n_test)
            print(f"\ndemo CNN (SmallResNet, {sum(p.numel() for p in model.parameters()) / 1e3:.0f} k params): {how}")
            if args.investigate_only:
                float_m = metrics_of(compress(model, group_balanced_subset(train, NUM_CALIB, seed=args.seed),
                                              QuantConfig(num_calib=NUM_CALIB), progress=False)
                                     .predict(test.x, quantized=False), test)
                investigate(model, train, test, float_m, list(BITS), args.seed)
                return 0
            rs = compare_model("demo CNN", model, train, test, out, storages, args.seed)
            results += rs
            if not args.no_natural:
                natural_calibration("demo CNN", model, train, test, rs[0].torch_metrics, args.seed)
            if args.investigate:
                investigate(model, train, test, rs[0].torch_metrics, list(BITS), args.seed)
        if "mlp" in wanted:
            model, train, test, how = tabular_mlp(args.cache, args.seed, args.n_test)
            print(f"\ntabular MLP ({sum(p.numel() for p in model.parameters()) / 1e3:.0f} k params): {how}")
            rs = compare_model("tabular MLP", model, train, test, out, storages, args.seed)
            results += rs
            if not args.no_natural:
                natural_calibration("tabular MLP", model, train, test, rs[0].torch_metrics, args.seed)
    print("\n## Summary (targets of issue 4 are for the demo CNN; the MLP is reported the same way)\n")
    lines = summary(results)
    for line in lines:
        print("- " + line)
    if any("MISSED" in line for line in lines):
        print("\nA target was missed. --investigate separates the causes (activation-only W8A8, "
              "weights-only, clip search, damping, bias correction, BN re-estimation, num_calib).")
    print(f"\nwhole run {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
