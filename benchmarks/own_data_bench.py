"""Your own data (docs/your-own-model.md): streamed adapters vs the arrays, and their memory.

    .venv/bin/python benchmarks/own_data_bench.py                      # both parts
    .venv/bin/python benchmarks/own_data_bench.py --part codes         # identical codes?
    .venv/bin/python benchmarks/own_data_bench.py --part memory --n 20000 --size 96 --input 64

Part ``codes``: the demo's SmallResNet trained on its image task (``make_image_task``, the demo's
recipe ``DEMO_TRAIN`` at ``--image-size`` pixels), compressed
(W8 solver, then W4 solver) from the calibration data given three ways — an ``.npz`` (arrays), a
``DataLoader`` of ``(x, y)`` with the groups as an array, and x alone (no labels: a DataLoader of
x with the groups as an array) — each exported and validated per group in ONNX Runtime on the
test ``.npz``. Printed: whether every ``QuantizedLayer``'s codes and scales equal the ``.npz``
fit's, and the per-group ORT accuracy of each.

Part ``memory``: the walkthrough of docs/your-own-model.md — ``load_data(ImageFolder, groups=
GroupsFromCSV, transform=resize+normalise)`` → ``compress`` (num_calib) → ``export`` → ``validate``
(with the float reference and the kernel check) — on an ImageFolder of ``--n`` PNGs (``--size``
pixels, resized to ``--input``) written to a temporary folder, once streamed from disk (the
DataStream) and once loaded into memory first (``.take()``: a GroupData, what a Dataset became
before streaming). Each mode runs in its own process; printed: wall time per step and the peak
RSS growth over the process's RSS after the model is built (``ru_maxrss``), and the size of x
in memory. The CPU's instruction set (``cpu_isa()``) heads the output.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fqexport
from fqexport.demo.models import small_resnet
from fqexport.demo.task import make_image_task
from fqexport.demo.training import DEMO_TRAIN, train_classifier
from fqexport.exporters.cpu_isa import cpu_isa

# ------------------------------------------------------------------------- part 1: identical codes


def _codes_equal(a: fqexport.CompressedModel, b: fqexport.CompressedModel) -> bool:
    return list(a.layers) == list(b.layers) and all(
        torch.equal(a.layers[n].codes, b.layers[n].codes) and torch.equal(a.layers[n].scale, b.layers[n].scale)
        for n in a.layers)


def part_codes(args: argparse.Namespace, out: Path) -> list[dict]:
    train, test = make_image_task(args.n_train, args.n_test, args.image_size, 0.2, seed=0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = train_classifier(small_resnet(num_classes=10, in_channels=3), train,
                             replace(DEMO_TRAIN, epochs=args.epochs), progress=False)
    print(f"trained SmallResNet on {len(train)} images of {args.image_size}x{args.image_size} in "
          f"{time.perf_counter() - t0:.0f} s")
    fqexport.save_npz(train, out / "calib.npz")
    fqexport.save_npz(test, out / "test.npz")
    fqexport.export_float(model, torch.from_numpy(test.x[:2]), out / "float.onnx")
    # the group ids as the array: names given as an array become ids in sorted order of the names,
    # which would number the groups otherwise than the .npz (and draw another balanced subset)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    sources = {
        ".npz": lambda: out / "calib.npz",
        "DataLoader (x, y), groups array": lambda: fqexport.load_data(
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64), groups=train.group),
        "DataLoader x alone (no labels)": lambda: fqexport.load_data(
            torch.utils.data.DataLoader(x, batch_size=64), groups=train.group),
    }
    rows = []
    for bits in (8, 4):
        ref = None
        for label, source in sources.items():
            t0 = time.perf_counter()
            cm = fqexport.compress(model, source(), fqexport.QuantConfig(weight_bits=bits, num_calib=512),
                                   progress=False)
            seconds = time.perf_counter() - t0
            ref = ref or cm
            path = out / f"w{bits}_{len(rows)}.onnx"
            fqexport.export(cm, path)
            report = fqexport.validate(path, out / "test.npz", reference=out / "float.onnx", measure_latency=False)
            acc = {g: round(100 * r["accuracy"], 2) for g, r in report.metrics.by_group.items()}
            rows.append({"bits": bits, "calibration data": label, "calib labels": cm.calib.y is not None,
                         "codes equal .npz": _codes_equal(cm, ref), "ORT acc % on test.npz": acc,
                         "float acc %": {g: round(100 * r["accuracy"], 2) for g, r in
                                         report.reference_metrics.by_group.items()},
                         "compress s": round(seconds, 1)})
            print(json.dumps(rows[-1]))
    return rows


# ------------------------------------------------------------------------- part 2: memory


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>: items (image float32 CHW in [0, 1], class id) — docs/your-own-model.md's."""

    def __init__(self, root):
        root = Path(root)
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(str(p), c) for c, name in enumerate(self.classes) for p in sorted((root / name).glob("*.png"))]
        self.targets = [c for _, c in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image  # the optional extra, as in the walkthrough's reader

        path, label = self.samples[i]
        with Image.open(path) as img:
            x = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(x).permute(2, 0, 1), label


def write_tree(root: Path, n: int, size: int) -> None:
    """n PNGs of ``size`` pixels in root/{cat,dog}/ and root/groups.csv (a quarter "dark")."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label, dark = i % 2, i % 8 >= 6
        img = rng.normal(0.3 if dark else 0.6, 0.08, (size, size, 3))
        side = size * 3 // 10
        r, c = rng.integers(1, size - side - 1, 2)
        img[r:r + side, c:c + side, 2 * label] += 0.2 if dark else 0.3
        path = root / ("cat", "dog")[label] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((255 * img.clip(0, 1)).astype(np.uint8)).save(path)
        rows.append((f"{path.parent.name}/{path.name}", "dark" if dark else "light"))
    with open(root / "groups.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "skin"), *rows])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_walkthrough(root: Path, mode: str, input_size: int, num_calib: int) -> dict:
    """One mode of part ``memory``, in this process (a fresh one: ru_maxrss is per process)."""
    mean = torch.tensor([0.55, 0.55, 0.55]).view(1, 3, 1, 1)
    std = torch.tensor([0.15, 0.15, 0.15]).view(1, 3, 1, 1)

    def transform(x):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
        return (x - mean) / std

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 2),
    )
    groups = fqexport.GroupsFromCSV(root / "groups.csv", column="skin")
    # a few steps on 512 images so the export's agreement check has margins (not measured)
    warm = fqexport.load_data(ImageFolder(root), groups=groups, transform=transform)
    sub = warm.take(np.random.default_rng(0).permutation(len(warm))[:512])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(4):
        for idx in np.array_split(np.random.default_rng(1).permutation(512), 16):
            loss = F.cross_entropy(model(torch.from_numpy(sub.x[idx])), torch.from_numpy(sub.y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    del warm, sub
    base = _rss_mb()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    data = fqexport.load_data(ImageFolder(root), groups=groups, transform=transform)
    if mode == "in memory":
        data = data.take()
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    cm = fqexport.compress(model, data, fqexport.QuantConfig(weight_bits=8, num_calib=num_calib), progress=False)
    seconds["compress"] = time.perf_counter() - t
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fqexport.export(cm, Path(tmp) / "model.onnx")
        fqexport.export_float(model, torch.from_numpy(cm.calib.x[:2]), Path(tmp) / "float.onnx")
        seconds["export"] = time.perf_counter() - t
        t = time.perf_counter()
        report = fqexport.validate(Path(tmp) / "model.onnx", data, reference=Path(tmp) / "float.onnx",
                                   measure_latency=False)
        seconds["validate"] = time.perf_counter() - t
    return {"mode": mode, "samples": len(data), "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "total_s": round(sum(seconds.values()), 1), "peak_rss_growth_mb": round(_rss_mb() - base, 1),
            "x_in_memory_mb": round(len(data) * 3 * input_size * input_size * 4 / 2**20, 1),
            "ort_acc_pct": {g: round(100 * r["accuracy"], 2) for g, r in report.metrics.by_group.items()}}


def part_memory(args: argparse.Namespace, out: Path) -> list[dict]:
    root = out / "images"
    t0 = time.perf_counter()
    write_tree(root, args.n, args.size)
    print(f"wrote {args.n} PNGs of {args.size}x{args.size} in {time.perf_counter() - t0:.0f} s")
    rows = []
    for mode in ("streamed", "in memory"):
        cmd = [sys.executable, __file__, "--run-mode", mode, "--root", str(root), "--input", str(args.input),
               "--num-calib", str(args.num_calib)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("codes", "memory", "both"), default="both")
    p.add_argument("--n-train", type=int, default=4000, help="part codes: training (and calibration) images")
    p.add_argument("--n-test", type=int, default=1000, help="part codes: test images")
    p.add_argument("--image-size", type=int, default=16, help="part codes: image side in pixels")
    p.add_argument("--epochs", type=int, default=10, help="part codes: training epochs (the demo's recipe)")
    p.add_argument("--n", type=int, default=20000, help="part memory: images in the ImageFolder")
    p.add_argument("--size", type=int, default=96, help="part memory: PNG side in pixels")
    p.add_argument("--input", type=int, default=64, help="part memory: the model's input side (the transform resizes)")
    p.add_argument("--num-calib", type=int, default=512)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--run-mode", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_mode:  # one mode of part memory, in its own process
        print(json.dumps(run_walkthrough(args.root, args.run_mode, args.input, args.num_calib)))
        return 0
    print(f"CPU instruction set: {cpu_isa()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("codes", "both"):
            rows["codes"] = part_codes(args, Path(tmp))
        if args.part in ("memory", "both"):
            rows["memory"] = part_memory(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps({"cpu_isa": cpu_isa(), **rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
