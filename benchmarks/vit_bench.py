"""Issue 12: a small hand-written ViT trained on the demo image task, compressed and validated
per group in ONNX Runtime (optimized sessions).

Variants: float, fqexport W8A8, fqexport W4 (A8) and the mixed-precision search at an average of
3 weight bits. Prints one table per group (accuracy %, worst group, gap, size, fused kernels),
the float-vs-quantized drop per group and this machine's CPU ISA.

Targets (issue 12): W8A8 every group within 1 pt of float; W4 within 1.5 pt.

    .venv/bin/python benchmarks/vit_bench.py [--out DIR] [--n-train N] [--epochs E]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fqexport
from fqexport.calibration.sampling import group_balanced_subset
from fqexport.demo.task import make_image_task
from fqexport.demo.training import TrainConfig, train_classifier
from fqexport.exporters.cpu_isa import cpu_isa
from fqexport.exporters.ort_session import kernel_line
from fqexport.exporters.qdq_onnx import export_qdq

TARGET_DROP_PT = {"W8A8": 1.0, "W4A8": 1.5}


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Conv patch embedding + learned position embedding + blocks + mean pooling + LN + Linear."""

    def __init__(self, image_size: int = 16, patch: int = 4, in_channels: int = 3, dim: int = 64,
                 depth: int = 3, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, tokens, dim]
        x = self.blocks(x + self.pos_embedding)
        return self.head(self.norm(x.mean(dim=1)))


def _row(label: str, report) -> str:
    m = report.metrics
    accs = [f"{100 * g['accuracy']:.2f}" for g in m.by_group.values()]
    _, worst = m.group_min("accuracy")
    return (f"| {label} | " + " | ".join(accs) + f" | {100 * worst:.2f} | {100 * m.difference('accuracy'):.2f} | "
            f"{report.size_bytes / 1e3:.1f} | {kernel_line(report.fused_kernels or {})} |")


def vit_arguments(doc: str, prefix: str) -> argparse.Namespace:
    """The options shared by the ViT benchmarks (task size, training) and the output folder."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.out = args.out or Path(tempfile.mkdtemp(prefix=prefix))
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def train_vit(args: argparse.Namespace):
    """The demo task (minority 10%) and a TinyViT trained on it: ``(model, train, test, seconds)``."""
    train, test = make_image_task(args.n_train, args.n_test, args.size, minority_fraction=0.1, seed=0)
    torch.manual_seed(0)
    model = TinyViT(image_size=args.size, num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, weight_decay=5e-4, seed=0, hflip=True,
                         max_seconds=None)
    t = time.perf_counter()
    model = train_classifier(model, train, config, progress=False).eval()
    return model, train, test, time.perf_counter() - t


def main() -> None:
    args = vit_arguments(__doc__, "vit_bench_")
    out = args.out
    t0 = time.perf_counter()
    model, train, test, t_train = train_vit(args)
    print(f"trained TinyViT ({sum(p.numel() for p in model.parameters())} params) on {len(train)} images "
          f"{args.size}x{args.size}, {args.epochs} epochs, lr {args.lr}: {t_train:.1f} s")

    calib = group_balanced_subset(train, 1024, seed=0)
    example = torch.from_numpy(test.x[:2])
    float_path = out / "float.onnx"
    fqexport.export_float(model.eval(), example, float_path)
    paths = [("float", float_path)]
    for label, bits in (("W8A8", 8), ("W4A8", 4)):
        t = time.perf_counter()
        cm = fqexport.compress(model, calib, fqexport.QuantConfig(weight_bits=bits), progress=False)
        path = out / f"{label.lower()}.onnx"
        res = export_qdq(cm, path)
        print(f"{label}: compress+export {time.perf_counter() - t:.1f} s, export agreement {res.agreement}")
        paths.append((label, path))
    t = time.perf_counter()
    search = fqexport.search_mixed_precision(model, calib, fqexport.MixedPrecisionConfig(budget_bits=3.0),
                                             progress=False)
    path = out / "mixed_avg3.onnx"
    export_qdq(search.compressed, path)
    print(f"mixed avg-3-bit: search+export {time.perf_counter() - t:.1f} s, allocation "
          f"{search.allocation.avg_bits:.2f} avg bits: "
          + ", ".join(f"{r['name']}={r['bits']}" for r in search.table())
          + (f" (fallback: {search.fallback})" if search.fallback else ""))
    paths.append(("mixed avg-3-bit", path))

    reports = [(label, fqexport.validate(p, test, reference=None if label == "float" else float_path,
                                         measure_latency=False)) for label, p in paths]
    groups = list(reports[0][1].metrics.by_group)
    print()
    print(f"CPU: {cpu_isa()}; test split: " + ", ".join(
        f"{g} n={int(reports[0][1].metrics.by_group[g].get('count', 0)) or '?'}" for g in groups))
    print()
    print("| model | " + " | ".join(f"{g} %" for g in groups) + " | worst % | gap pt | size KB | kernels |")
    print("|---|" + "---:|" * (len(groups) + 3) + "---|")
    for label, report in reports:
        print(_row(label, report))
    print()
    print("| model | " + " | ".join(f"{g} drop pt" for g in groups) + " | target | met |")
    print("|---|" + "---:|" * len(groups) + "---:|---|")
    for label, report in reports[1:]:
        drops = [100 * float(report.group_drop[g]) for g in groups]
        target = TARGET_DROP_PT.get(label)
        met = "-" if target is None else ("yes" if max(drops) <= target else "no")
        print(f"| {label} | " + " | ".join(f"{d:+.2f}" for d in drops)
              + f" | {'-' if target is None else f'≤ {target}'} | {met} |")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s (training {t_train:.1f} s); files in {out}")


if __name__ == "__main__":
    main()
