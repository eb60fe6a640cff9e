"""The scene task's trained models (:mod:`fqexport.demo.detectors`), each trained once per key and
cached as a checkpoint: what ``fqexport demo --task detection`` and the benchmarks start from."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fqexport.atomic import atomic_write
from fqexport.demo.detection_training import DetTrainConfig, train_detector, train_segmenter
from fqexport.demo.detectors import UNet, YoloV5, YoloV8
from fqexport.demo.scenes import SCENE_CLASSES, SceneTask, make_scene_task
from fqexport.errors import ConfigError
from fqexport.version import __version__

KINDS = ("yolov5", "yolov8", "unet")
MSG_KIND = "scene model {kind!r} is not one of " + ", ".join(KINDS)


@dataclass(frozen=True)
class SceneSizes:
    """The scene task and the models' widths of the demo and the benchmarks."""

    n_train: int = 1200
    n_test: int = 400
    minority_fraction: float = 0.1
    width: int = 8


SCENE_SIZES = SceneSizes()
SCENE_TRAIN = DetTrainConfig(epochs=24, batch_size=16)
# Training runs on one intra-op thread: these small convolutions are overhead-bound, and on a shared
# 2-core machine torch's default pool was several times slower (YOLOv5-style, 12 epochs: 48 s
# with 1 thread, 600 s with 2 while other work ran).
TRAIN_THREADS = 1


def build(kind: str, width: int) -> nn.Module:
    """An untrained model of ``kind`` for the scene task."""
    if kind == "yolov5":
        return YoloV5(len(SCENE_CLASSES), width)
    if kind == "yolov8":
        return YoloV8(len(SCENE_CLASSES), width)
    if kind == "unet":
        return UNet(len(SCENE_CLASSES) + 1, width)
    raise ConfigError(MSG_KIND.format(kind=kind))


def trained_scene_model(kind: str, *, seed: int = 0, sizes: SceneSizes = SCENE_SIZES,
                        config: DetTrainConfig = SCENE_TRAIN, cache_dir: Path | None = None,
                        on_step: Callable[[str], None] = lambda _: None) -> tuple[nn.Module, SceneTask, float]:
    """``(model in eval mode, the scene task, training seconds)``; with ``cache_dir`` a checkpoint
    trained there with the same kind, sizes, schedule, seed, torch and fqexport versions and threads is
    reused (0 seconds), else the model is trained and saved there."""
    task = make_scene_task(sizes.n_train, sizes.n_test, sizes.minority_fraction, seed=seed)
    torch.manual_seed(seed)
    model = build(kind, sizes.width)
    key = {"kind": kind, "seed": seed, "sizes": asdict(sizes), "train": asdict(config), "torch": torch.__version__,
           "fqexport": __version__, "threads": TRAIN_THREADS}
    ckpt = None if cache_dir is None else Path(cache_dir) / f"{kind}.pt"
    if ckpt is not None and ckpt.exists() and ckpt.with_suffix(".json").exists() \
            and json.loads(ckpt.with_suffix(".json").read_text()) == key:
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        on_step(f"reusing the {kind} an earlier run trained with the same settings ({ckpt}; delete it to train again)")
        return model.eval(), task, 0.0
    on_step(f"training the {kind}-style model on CPU: {len(task.train.x)} scenes, {config.epochs} epochs, seed {seed}")
    t = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        if kind == "unet":
            train_segmenter(model, task.train.x, task.train.masks, config)
        else:
            train_detector(model, task.train.x, task.train.boxes, config)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(ckpt, lambda tmp: torch.save(model.state_dict(), tmp))
        atomic_write(ckpt.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(key)))
    return model.eval(), task, seconds
