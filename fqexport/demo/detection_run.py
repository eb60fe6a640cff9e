"""``fqexport demo --task detection``: a detector on the embedded scene task, end to end.

Trains the YOLOv5-style detector (:mod:`fqexport.demo.detectors`) on scenes with a 10% low-light
minority (:mod:`fqexport.demo.scenes`), then compares in ONNX Runtime (optimized sessions) per
group, COCO mAP@[.5:.95] and mAP@.5 on the test scenes: float; ONNX Runtime's ``quantize_static``
W8A8 as a user would run it (every node, the box decode included) and with the decode excluded
(``nodes_to_exclude``, as ORT's maintainers advise for YOLO); fqexport W8A8, W4A8 and the
worst-group mixed-precision search at 3 stored bits per weight. Each row also gives the file
size and the latency at batch 1 and 8. NMS runs after the model, in numpy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from fqexport.calibration.npz import save_npz
from fqexport.calibration.sampling import group_balanced_subset
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.demo.run import ort_quantize_static_baseline, search_and_export
from fqexport.demo.scene_models import SCENE_SIZES, SCENE_TRAIN, trained_scene_model
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.qdq_onnx import export_float, export_qdq
from fqexport.pipeline.compress import compress
from fqexport.tasks.detection import Detection
from fqexport.validation.gate import validate
from fqexport.validation.reports import write_json_data, write_markdown_table

log = logging.getLogger(__name__)

DET_NUM_CALIB = 256
DET_VARIANTS: tuple[tuple[str, QuantConfig], ...] = (
    ("fqexport W8A8", QuantConfig(weight_bits=8)),
    ("fqexport W4A8", QuantConfig(weight_bits=4)),
)
DET_MIXED = ("fqexport mixed avg-3-bit A8", MixedPrecisionConfig(budget_bits=3.0, objective="worst-group"))
LATENCY_BATCHES = (1, 8)


@dataclass(frozen=True)
class DetectionDemoResult:
    """The validated models (label, path, report), the printable table and timings."""

    rows: list[tuple[str, Path, Any]]
    table: list[dict[str, str]]
    out_dir: Path
    train_seconds: float
    total_seconds: float


def decode_nodes(float_onnx: Path) -> list[str]:
    """Names of the nodes of an ONNX graph after its last Conv/Gemm (no Conv reachable from them):
    the box decode that ORT's ``nodes_to_exclude`` keeps float."""
    graph = onnx.load(str(float_onnx)).graph
    users: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            users.setdefault(name, []).append(i)
    reaches = [False] * len(graph.node)
    for i in reversed(range(len(graph.node))):
        for out in graph.node[i].output:
            for j in users.get(out, []):
                if graph.node[j].op_type in ("Conv", "Gemm") or reaches[j]:
                    reaches[i] = True
    return [n.name for i, n in enumerate(graph.node) if not reaches[i] and n.op_type not in ("Conv", "Gemm")]


def _row(label: str, report) -> dict[str, str]:
    m = report.metrics
    row: dict[str, str] = {"model": label}
    for name, g in m.by_group.items():
        row[f"{name} mAP"] = f"{100 * g['map']:.1f}"
        row[f"{name} mAP50"] = f"{100 * g['map50']:.1f}"
    if report.max_group_drop is not None:
        g, drop = report.max_group_drop
        row["worst drop pt"] = f"{100 * drop:.1f} ({g})"
    else:
        row["worst drop pt"] = "-"
    row["size KB"] = f"{report.size_bytes / 1e3:.0f}"
    for lat in report.latency:
        row[f"p50 ms b{lat.batch_size}"] = f"{lat.p50_ms:.2f}"
    return row


def run_detection_demo(out_dir: Path, *, seed: int = 0, progress: bool = True, kind: str = "yolov5",
                       sizes=SCENE_SIZES, train_config=SCENE_TRAIN, num_calib: int = DET_NUM_CALIB,
                       with_search: bool = True, repeats: int = 20,
                       on_step: Callable[[str], None] = log.info) -> DetectionDemoResult:
    """Run the detection demo into ``out_dir`` (module docstring); ``kind``: ``"yolov5"`` or
    ``"yolov8"``; ``sizes``/``train_config``/``num_calib``/``with_search`` shrink it (tests)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    on_step(f"[1/4] scenes: {sizes.n_train} train / {sizes.n_test} test images 3x64x64, 3 shape classes, "
            f"minority 'low-light' = {sizes.minority_fraction:.0%}")
    model, scenes, t_train = trained_scene_model(kind, seed=seed, sizes=sizes, config=train_config, cache_dir=out_dir,
                                                 on_step=lambda m: on_step(f"[2/4] {m}"))
    task = Detection(layout="v5" if kind == "yolov5" else "v8")
    calib = group_balanced_subset(scenes.train.detection("calib.npz"), 2 * num_calib, seed=seed)
    test = scenes.test.detection("test.npz")
    save_npz(calib, out_dir / "calib.npz", compressed=True)
    save_npz(test, out_dir / "test.npz", compressed=True)

    on_step("[3/4] compressing and exporting (the box decode stays float in fqexport's files)")
    float_path = out_dir / "float.onnx"
    export_float(model, torch.from_numpy(test.x[:2]), float_path, output_name=task.output_name)
    naive = ort_quantize_static_baseline(float_path, calib, out_dir / "ort_quantize_static_w8a8.onnx")
    excluded = ort_quantize_static_baseline(float_path, calib, out_dir / "ort_quantize_static_w8a8_decode_float.onnx",
                                            exclude=decode_nodes)
    paths = [("float", float_path), ("ORT quantize_static W8A8", naive),
             ("ORT quantize_static W8A8, decode excluded", excluded)]
    for label, config in DET_VARIANTS:
        cm = compress(model, calib, replace(config, num_calib=num_calib, seed=seed), progress=progress, task=task)
        path = out_dir / (label.lower().replace(" ", "_") + ".onnx")
        export_qdq(cm, path)
        paths.append((label, path))
    if with_search:
        paths.append(search_and_export(model, calib, DET_MIXED, out_dir, num_calib=num_calib, seed=seed,
                                       progress=progress, on_step=on_step, task=task))

    isa = cpu_isa()
    on_step(f"[4/4] validating every model in ONNX Runtime (optimized session) on the test scenes, per group "
            f"COCO mAP (pycocotools), NMS after the model; CPU {isa} (int8 kernel family {kernel_family(isa)})")
    rows = []
    for label, path in paths:
        report = validate(path, test, reference=None if label == "float" else float_path, task=task,
                          latency_batch_sizes=LATENCY_BATCHES, repeats=repeats, warmup=3, progress=progress)
        rows.append((label, path, report))
    table = [_row(label, report) for label, _, report in rows]
    total = time.perf_counter() - t0
    write_json_data({"rows": [{"label": l, "path": str(p), "report": r.to_dict()} for l, p, r in rows],
                     "train_seconds": t_train, "total_seconds": total}, out_dir / "demo_report.json")
    write_markdown_table(table, out_dir / "demo_report.md",
                         title=f"fqexport detection demo ({kind}): per-group COCO mAP in ONNX Runtime on {isa}")
    return DetectionDemoResult(rows, table, out_dir, t_train, total)
