"""``fqexport demo``: the embedded default, end to end, with nothing from outside.

Generates the group-labeled image task (90% majority, 10% inverted-contrast minority), trains
a small ResNet on CPU, then compares in ONNX Runtime (optimized sessions, i.e. the kernels
that deploy): float, ONNX Runtime's own ``quantize_static`` W8A8 (the naive baseline),
fqexport W8A8, round-to-nearest W4A8, fqexport W4A8 and fqexport's worst-group mixed-precision
search at an average of 3 weight bits — per group, worst group and gap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from fqexport.atomic import atomic_write
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.npz import save_npz
from fqexport.calibration.sampling import group_balanced_subset
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.demo.models import SmallResNet
from fqexport.demo.task import make_image_task
from fqexport.demo.training import DEMO_TASK_SIZES, DEMO_TRAIN, train_classifier
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family, runs_natively
from fqexport.exporters.ort_session import kernel_line
from fqexport.exporters.qdq_onnx import export_float, export_qdq
from fqexport.pipeline.compress import compress
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.validation.gate import validate
from fqexport.validation.reports import write_json_data, write_markdown_table
from fqexport.version import __version__

log = logging.getLogger(__name__)

# (row label, config) of the fqexport variants the demo compresses.
DEMO_VARIANTS: tuple[tuple[str, QuantConfig], ...] = (
    ("fqexport W8A8", QuantConfig(weight_bits=8)),
    ("RTN W4A8", QuantConfig(weight_bits=4, method="rtn", bias_correction=False, bn_reestimate=False,
                             clip_search=False)),
    ("fqexport W4A8", QuantConfig(weight_bits=4)),
)
DEMO_NUM_CALIB = 512
# the fairness-aware mixed-precision row: worst-group objective, average weight bits
DEMO_MIXED = ("fqexport mixed avg-3-bit A8", MixedPrecisionConfig(budget_bits=3.0, objective="worst-group"))
# rows also validated for an AVX2-without-VNNI CPU (emulated unless this CPU is one), whose int8 kernels saturate
# (docs/kernel-targets.md): the harm of full-range 8-bit weights shows on any machine
DEMO_EMULATED_TARGET = "x86-avx2"
DEMO_EMULATED_ROWS = ("ORT quantize_static W8A8", "fqexport W8A8")


@dataclass(frozen=True)
class DemoRow:
    """One model of the demo table."""

    label: str
    path: Path
    report: Any  # exporters.validation.ValidationReport

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "path": str(self.path), "report": self.report.to_dict()}


@dataclass(frozen=True)
class DemoResult:
    """What ``run_demo`` produced: the validated models, the printable table and timings."""

    rows: list[DemoRow]
    table: list[dict[str, str]]
    out_dir: Path
    train_seconds: float
    total_seconds: float


def _quiet(message: str) -> None:
    """The default ``on_step``: library code reports its steps only to a caller that asks."""
    log.info(message)


def ort_quantize_static_baseline(float_onnx: Path, calib: GroupData, out: Path,
                                 exclude: Callable[[Path], list[str]] | None = None, reduce_range: bool = False) -> Path:
    """ONNX Runtime's own W8A8 QDQ quantizer (per-channel, u8 activations, s8 weights); ``exclude``
    names the nodes of the pre-processed file it leaves float (its ``nodes_to_exclude``);
    ``reduce_range``: 7-bit weights (ORT's advice for CPUs without VNNI)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": calib.x[i:i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self._it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(float_onnx), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude(pre) if exclude else [],
                    reduce_range=reduce_range)
    pre.unlink(missing_ok=True)
    return out


def search_and_export(model: torch.nn.Module, calib: GroupData, mixed: tuple[str, MixedPrecisionConfig], out_dir: Path,
                      *, num_calib: int, seed: int, progress: bool, on_step: Callable[[str], None],
                      task: Any = None) -> tuple[str, Path]:
    """A demo's mixed-precision row: the search ``mixed`` = (label, config) on ``calib``, its file
    ``fqexport_mixed_avg3bit.onnx`` in ``out_dir``, the chosen widths told to ``on_step``."""
    label, mp = mixed
    search = search_mixed_precision(model, calib, replace(mp, seed=seed), QuantConfig(num_calib=num_calib, seed=seed),
                                    progress=progress, task=task)
    path = out_dir / "fqexport_mixed_avg3bit.onnx"
    export_qdq(search.compressed, path)
    on_step(f"mixed precision ({mp.objective}, {search.allocation.avg_bits:.2f} avg bits): "
            + ", ".join(f"{r['name']}={r['bits']}" for r in search.table()))
    return label, path


def _row(label: str, report) -> dict[str, Any]:
    m = report.metrics
    row: dict[str, Any] = {"model": label}
    for name, g in m.by_group.items():
        row[f"{name} %"] = f"{100 * g['accuracy']:.2f}"
    emulated = (report.target_metrics or {}).get(DEMO_EMULATED_TARGET)
    for name in m.by_group:
        row[f"{name} % {DEMO_EMULATED_TARGET}"] = (
            f"{100 * emulated.by_group[name]['accuracy']:.2f}" if emulated is not None else "-")
    worst_name, worst = m.group_min("accuracy")
    row["worst %"] = f"{100 * worst:.2f}"
    row["gap pt"] = f"{100 * m.difference('accuracy'):.2f}"
    row["size MB"] = f"{report.size_bytes / 1e6:.3f}"
    lat = report.latency[0] if report.latency else None
    row["p50 ms (b=1)"] = f"{lat.p50_ms:.2f}" if lat else "-"
    row["kernels"] = kernel_line(report.fused_kernels or {})
    return row


# The trained checkpoint and what it was trained with; a later run with the same key reuses it.
CHECKPOINT = "model.pt"
CHECKPOINT_KEY = "model.key.json"


def _training_key(seed: int, sizes, train_config) -> dict[str, Any]:
    """Everything the trained weights depend on (on one machine): task, schedule, seed, versions,
    intra-op threads (they change the order of float sums)."""
    return {"seed": int(seed), "sizes": asdict(sizes), "train": asdict(train_config), "torch": torch.__version__,
            "fqexport": __version__, "threads": torch.get_num_threads()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_model(cache_dir: Path | None, key: dict[str, Any], model: torch.nn.Module) -> tuple[bool, str | None]:
    """Load the checkpoint of ``cache_dir`` into ``model`` when it was trained with ``key``:
    ``(loaded, why not)``, the reason a checkpoint that is there was not reused (None: none there)."""
    if cache_dir is None:
        return False, None
    ckpt, key_file = cache_dir / CHECKPOINT, cache_dir / CHECKPOINT_KEY
    if not ckpt.exists():
        return False, None
    try:
        saved = json.loads(key_file.read_text(encoding="utf-8"))
        want = json.loads(json.dumps(key))
        if not isinstance(saved, dict) or not isinstance(saved.get("key"), dict):
            return False, f"{key_file.name} does not record how it was trained"
        if saved["key"] != want:
            changed = sorted(k for k in set(want) | set(saved["key"]) if saved["key"].get(k) != want.get(k))
            return False, f"it was trained with other {', '.join(changed)} (recorded in {key_file.name})"
        if saved.get("sha256") != _digest(ckpt):
            return False, f"its bytes are not those recorded in {key_file.name}"
        model.load_state_dict(torch.load(ckpt, weights_only=True))
    except FileNotFoundError:
        return False, f"it has no {key_file.name} saying how it was trained"
    except (OSError, ValueError, RuntimeError) as err:  # a checkpoint that does not load or fit: train
        return False, f"it does not load ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    return True, None


def _save_checkpoint(cache_dir: Path, key: dict[str, Any], model: torch.nn.Module) -> None:
    ckpt = cache_dir / CHECKPOINT
    atomic_write(ckpt, lambda tmp: torch.save(model.state_dict(), tmp))
    write_json_data({"key": key, "sha256": _digest(ckpt)}, cache_dir / CHECKPOINT_KEY)


def prepare_demo_model(*, seed: int = 0, progress: bool = True, on_step: Callable[[str], None] = _quiet,
                       sizes=None, train_config=None, cache_dir: Path | None = None):
    """Generate the demo task and train its SmallResNet: ``(model, train, test, seconds)``.

    ``sizes`` (DemoTaskSizes) and ``train_config`` (TrainConfig) default to the demo's own;
    ``on_step`` receives a one-line message at each step (the CLI prints them). With
    ``cache_dir``, a checkpoint an earlier run trained there with the same task, schedule, seed,
    versions and threads is reused (``seconds`` 0), and a new one is saved there.
    """

    sizes = sizes or DEMO_TASK_SIZES
    train_config = train_config or DEMO_TRAIN
    on_step(f"[1/4] generating the image task: {sizes.n_train} train / {sizes.n_test} test images, "
            f"{sizes.size}x{sizes.size}, minority 'inverted-contrast' = {sizes.minority_fraction:.0%}")
    train, test = make_image_task(sizes.n_train, sizes.n_test, sizes.size, sizes.minority_fraction, seed=seed)
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
    key = _training_key(seed, sizes, train_config)
    reused, why_not = _cached_model(cache_dir, key, model)
    if reused:
        on_step(f"[2/4] reusing the SmallResNet an earlier run trained with the same seed and settings "
                f"({cache_dir / CHECKPOINT}; delete it to train again)")
        return model.eval(), train, test, 0.0
    steps = (len(train) // train_config.batch_size if len(train) > train_config.batch_size else 1) * train_config.epochs
    retrain = f" (not reusing {cache_dir / CHECKPOINT}: {why_not}; it is replaced)" if why_not else ""
    on_step(f"[2/4] training SmallResNet on CPU: {steps} steps, seed {seed}{retrain}")
    t = time.perf_counter()
    model = train_classifier(model, train, train_config, progress=progress)
    if cache_dir is not None:
        _save_checkpoint(cache_dir, key, model)
    return model.eval(), train, test, time.perf_counter() - t


def run_demo(out_dir: Path, *, seed: int = 0, progress: bool = True, sizes=None, train_config=None,
             num_calib: int = DEMO_NUM_CALIB, on_step: Callable[[str], None] = _quiet) -> DemoResult:
    """Run the whole demo into ``out_dir``; return the validated models and the per-group table.

    ``sizes``/``train_config``/``num_calib`` shrink the demo (tests); defaults are the demo's.
    ``on_step`` receives a one-line message at each step (the CLI prints them).
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, train, test, t_train = prepare_demo_model(seed=seed, progress=progress, on_step=on_step,
                                                     sizes=sizes, train_config=train_config, cache_dir=out_dir)
    calib = group_balanced_subset(train, 2 * num_calib, seed=seed)
    save_npz(calib, out_dir / "calib.npz", compressed=True)
    save_npz(test, out_dir / "test.npz", compressed=True)

    on_step("[3/4] compressing and exporting")
    rows: list[DemoRow] = []
    example = torch.from_numpy(test.x[:2])
    float_path = out_dir / "float.onnx"
    export_float(model, example, float_path)
    naive_path = ort_quantize_static_baseline(float_path, calib, out_dir / "ort_quantize_static_w8a8.onnx")
    paths = [("float", float_path), ("ORT quantize_static W8A8", naive_path)]
    for label, config in DEMO_VARIANTS:
        cm = compress(model, calib, replace(config, num_calib=num_calib, seed=seed), progress=progress)
        path = out_dir / (label.lower().replace(" ", "_") + ".onnx")
        result = export_qdq(cm, path)
        log.info("%s: agreement with fake-quant reference %.4f", label, result.agreement)
        paths.append((label, path))
    paths.append(search_and_export(model, calib, DEMO_MIXED, out_dir, num_calib=num_calib, seed=seed,
                                   progress=progress, on_step=on_step))

    isa = cpu_isa()
    # an AVX2 CPU measures the x86-avx2 columns with its own kernels; any other emulates them
    how = "this CPU's own" if runs_natively(DEMO_EMULATED_TARGET) else "emulated"
    on_step(f"[4/4] validating every model in ONNX Runtime (optimized session) on the test split, on this "
            f"CPU: {isa} (int8 kernel family {kernel_family(isa)}); {', '.join(DEMO_EMULATED_ROWS)} also "
            f"under {how} {DEMO_EMULATED_TARGET} kernels (the '% {DEMO_EMULATED_TARGET}' columns)")
    for label, path in paths:
        targets = ("native", DEMO_EMULATED_TARGET) if label in DEMO_EMULATED_ROWS else ("native",)
        report = validate(path, test, reference=None if label == "float" else float_path, targets=targets,
                          progress=progress)
        rows.append(DemoRow(label, path, report))
    table = [_row(r.label, r.report) for r in rows]
    total = time.perf_counter() - t0
    write_json_data({"rows": [r.to_dict() for r in rows], "train_seconds": t_train, "total_seconds": total},
                    out_dir / "demo_report.json")
    write_markdown_table(table, out_dir / "demo_report.md",
                         title=f"fqexport demo: per-group accuracy in ONNX Runtime on {isa} "
                               f"('% {DEMO_EMULATED_TARGET}' columns: {how} {DEMO_EMULATED_TARGET} kernels)")
    return DemoResult(rows, table, out_dir, t_train, total)
