"""Detectors and a segmenter compressed and validated per group (issue 22's figures).

    .venv/bin/python benchmarks/detection_bench.py                     # every part
    .venv/bin/python benchmarks/detection_bench.py --part detection --kinds yolov5
    .venv/bin/python benchmarks/detection_bench.py --part segmentation
    .venv/bin/python benchmarks/detection_bench.py --part compress-time
    .venv/bin/python benchmarks/detection_bench.py --part finetune --kinds yolov5 yolov8

Part ``detection``: the YOLOv5-style and the YOLOv8-style detector trained on the scene task
(:mod:`fqexport.demo.scenes`: 10% low-light minority), each run through
``fqexport.demo.detection_run.run_detection_demo``: float, ORT ``quantize_static`` W8A8 (as a
user runs it; and with the box decode in ``nodes_to_exclude``), fqexport W8A8, W4A8 and the
worst-group mixed-precision search at 3 stored bits per weight; per group COCO mAP@[.5:.95] and
mAP@.5 (pycocotools, NMS after the model) in ONNX Runtime's optimized session, the largest
per-group drop vs float, file size, p50 latency at batch 1 and 8.

Part ``segmentation``: the UNet-style segmenter on the same scenes (masks): float, ORT
``quantize_static`` W8A8, fqexport W8A8, W4A8, mixed avg-3-bit; mIoU and Dice per group.

Part ``finetune``: each detector at W3A8 (uniform 3-bit weights: a drop fine-tuning can recover),
then fine-tuned (``fqexport.finetune``, worst-group loss, 4 epochs) on the training scenes once
without their boxes (distillation to the float model only) and once with them (distillation + the
detector's own training loss, :mod:`fqexport.tasks.detection_loss`); per-group mAP on the test
scenes, and the fine-tuning seconds. First, the loss's consistency: the trained float model after 60
Adam steps on its own training loss, test mAP before and after (a loss that assigns differently
from how the model learned would pull it down).

Part ``compress-time``: wall time of ``compress`` (W8, solver, 256 calibration samples) of the
YOLOv5-style detector vs a classifier of the same size (its backbone and neck, global pooling,
a Linear), one thread, three runs each (the median).

The CPU's instruction set heads the output; models are trained once and cached in ``--dir``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.sampling import group_balanced_subset
from fqexport.cli.common import print_table
from fqexport.config import MixedPrecisionConfig, QuantConfig
from fqexport.demo.detection_run import run_detection_demo
from fqexport.demo.detectors import C3, Backbone
from fqexport.demo.run import ort_quantize_static_baseline
from fqexport.demo.scene_models import SCENE_SIZES, trained_scene_model
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.qdq_onnx import export_float, export_qdq
from fqexport.finetune.api import finetune
from fqexport.finetune.config import FinetuneConfig
from fqexport.pipeline.compress import compress
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.tasks import Detection, Segmentation
from fqexport.validation.gate import validate


def detection(out: Path, kinds: list[str]) -> None:
    for kind in kinds:
        result = run_detection_demo(out / kind, kind=kind, progress=False, on_step=print)
        print(f"\n{kind}: per-group COCO mAP@[.5:.95] / mAP@.5 (points), ORT optimized session on {cpu_isa()}; "
              f"whole run {result.total_seconds:.0f} s (training {result.train_seconds:.0f} s)")
        print_table(result.table, list(result.table[0].keys()))
        print()


def segmentation(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model, scenes, seconds = trained_scene_model("unet", cache_dir=out, on_step=print)
    calib = group_balanced_subset(scenes.train.segmentation("calib"), 512, seed=0)
    test = scenes.test.segmentation("test")
    task = Segmentation()
    float_path = out / "float.onnx"
    export_float(model, torch.from_numpy(test.x[:2]), float_path)
    paths = [("float", float_path),
             ("ORT quantize_static W8A8", ort_quantize_static_baseline(float_path, calib, out / "ort_w8a8.onnx"))]
    for label, bits in (("fqexport W8A8", 8), ("fqexport W4A8", 4)):
        cm = compress(model, calib, QuantConfig(weight_bits=bits, num_calib=256), progress=False, task=task)
        paths.append((label, export_qdq(cm, out / f"w{bits}a8.onnx").path))
    search = search_mixed_precision(model, calib, MixedPrecisionConfig(budget_bits=3.0), QuantConfig(num_calib=256),
                                    progress=False, task=task)
    paths.append((f"fqexport mixed avg-3-bit A8 ({search.allocation.avg_bits:.2f} avg bits)",
                  export_qdq(search.compressed, out / "mixed.onnx").path))
    rows = []
    for label, path in paths:
        r = validate(path, test, reference=None if label == "float" else float_path, task=task,
                     latency_batch_sizes=(1, 8), repeats=20, warmup=3)
        row = {"model": label}
        for g, m in r.metrics.by_group.items():
            row[f"{g} mIoU"] = f"{100 * m['miou']:.2f}"
            row[f"{g} Dice"] = f"{100 * m['dice']:.2f}"
        row["worst drop pt"] = f"{100 * r.max_group_drop[1]:.2f} ({r.max_group_drop[0]})" if r.group_drop else "-"
        row["size KB"] = f"{r.size_bytes / 1e3:.0f}"
        for lat in r.latency:
            row[f"p50 ms b{lat.batch_size}"] = f"{lat.p50_ms:.2f}"
        rows.append(row)
    print(f"\nUNet-style segmenter: per-group mIoU / Dice (points), ORT optimized session on {cpu_isa()}")
    print_table(rows, list(rows[0].keys()))


def loss_consistency(model: nn.Module, train: GroupData, test: GroupData, task: Detection, steps: int = 60) -> str:
    """The trained float model (a copy) after ``steps`` Adam steps (lr 1e-4, batch 32) on its own
    training loss: its test mAP before and after. A loss whose targets the float model already
    meets keeps it; one that assigns differently from how the model was trained lowers it."""
    def test_map(m: nn.Module) -> float:
        with torch.no_grad():
            return task.evaluate(m(torch.from_numpy(test.x)).numpy(), test).overall["map"]

    x = torch.from_numpy(train.x)
    with torch.no_grad():
        targets = task.train_targets(train, torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]))
    student = copy.deepcopy(model)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    before = test_map(model)
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(x), 32, replace=False))
        loss = task.train_loss(student(x[idx]), targets[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (f"the float model trained {steps} steps on its own loss: test mAP {100 * before:.1f} -> "
            f"{100 * test_map(student):.1f}")


def finetune_rows(out: Path, kinds: list[str], bits: int = 3, epochs: int = 4) -> None:
    for kind in kinds:
        model, scenes, _ = trained_scene_model(kind, cache_dir=out / kind, on_step=print)
        with_boxes = scenes.train.detection("train")
        bare = GroupData(with_boxes.x, None, with_boxes.group, with_boxes.group_names, "train (no boxes)")
        test = scenes.test.detection("test")
        task = Detection(layout="v5" if kind == "yolov5" else "v8")
        torch.manual_seed(0)
        print(f"{kind}: {loss_consistency(model, with_boxes, test, task)}")
        ptq = compress(model, with_boxes, QuantConfig(weight_bits=bits, num_calib=256), progress=False, task=task)
        float_path = export_float(model, torch.from_numpy(test.x[:2]), out / kind / "ft_float.onnx",
                                  output_name=task.output_name).path
        runs = [("float", float_path, None), (f"fqexport W{bits}A8 (PTQ)", export_qdq(ptq, out / kind / "ft_ptq.onnx").path,
                                               None)]
        for label, data in (("+ fine-tune, distillation only (no boxes)", bare),
                            ("+ fine-tune, distillation + own loss (boxes)", with_boxes)):
            t = time.perf_counter()
            tuned = finetune(ptq, data, FinetuneConfig(epochs=epochs, seed=0), progress=False)
            seconds = time.perf_counter() - t
            label = f"{label}, kept epoch {tuned.metadata.finetune['best_epoch']}"
            runs.append((label, export_qdq(tuned, out / kind / f"ft_{len(runs)}.onnx").path, seconds))
        rows = []
        for label, path, seconds in runs:
            r = validate(path, test, reference=None if label == "float" else float_path, task=task,
                         measure_latency=False)
            row = {"model": label}
            for g, m in r.metrics.by_group.items():
                row[f"{g} mAP"] = f"{100 * m['map']:.1f}"
                row[f"{g} mAP@.5"] = f"{100 * m['map50']:.1f}"
            row["worst drop pt"] = f"{100 * r.max_group_drop[1]:.1f} ({r.max_group_drop[0]})" if r.group_drop else "-"
            row["fine-tune s"] = "-" if seconds is None else f"{seconds:.0f}"
            rows.append(row)
        print(f"\n{kind}: W{bits}A8 fine-tuned {epochs} epochs on {len(with_boxes)} scenes, per-group COCO mAP (points) "
              f"on {len(test)} test scenes, ORT on {cpu_isa()}")
        print_table(rows, list(rows[0].keys()))


class SameSizeClassifier(nn.Module):
    """The YOLOv5-style detector's backbone and neck, global average pooling of both outputs, a Linear."""

    def __init__(self, num_classes: int = 3, width: int = SCENE_SIZES.width) -> None:
        super().__init__()
        self.body = Backbone(C3, width)
        self.fc = nn.Linear(sum(self.body.channels), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n3, n4 = self.body(x)
        return self.fc(torch.cat((n3.mean((2, 3)), n4.mean((2, 3))), 1))


def compress_time(out: Path) -> None:
    torch.set_num_threads(1)
    detector, scenes, _ = trained_scene_model("yolov5", cache_dir=out / "yolov5", on_step=print)
    calib = group_balanced_subset(scenes.train.detection("calib"), 256, seed=0)
    labels = np.zeros(len(scenes.train.x), np.int64)
    labels[scenes.train.boxes.image] = scenes.train.boxes.labels  # the class of each image's last object
    cls_data = group_balanced_subset(GroupData(scenes.train.x, labels, scenes.train.group,
                                               ("daylight", "low-light"), "scenes"), 256, seed=0)
    torch.manual_seed(0)
    classifier = SameSizeClassifier().eval()
    config = QuantConfig(weight_bits=8, num_calib=256)
    rows = []
    for label, model, data in (("YOLOv5-style detector", detector, calib), ("same-size classifier", classifier, cls_data)):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            compress(model, data, config, progress=False)
            times.append(time.perf_counter() - t)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": label, "params": f"{params:,}", "compress s (median of 3)": f"{statistics.median(times):.2f}",
                     "runs s": ", ".join(f"{t:.2f}" for t in times)})
    print(f"\ncompress wall time (W8 solver, 256 calibration images 3x64x64, 1 thread) on {cpu_isa()}")
    print_table(rows, list(rows[0].keys()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "detection", "segmentation", "finetune", "compress-time"), default="all")
    p.add_argument("--kinds", nargs="+", default=["yolov5", "yolov8"], choices=["yolov5", "yolov8"])
    p.add_argument("--dir", type=Path, default=Path("bench-detection"), help="models, data and ONNX files")
    args = p.parse_args()
    isa = cpu_isa()
    print(f"CPU instruction set: {isa} (int8 kernel family {kernel_family(isa)}); torch threads "
          f"{torch.get_num_threads()}")
    if args.part in ("all", "detection"):
        detection(args.dir, args.kinds)
    if args.part in ("all", "segmentation"):
        segmentation(args.dir / "unet")
    if args.part in ("all", "finetune"):
        finetune_rows(args.dir, args.kinds)
    if args.part in ("all", "compress-time"):
        compress_time(args.dir)


if __name__ == "__main__":
    main()
