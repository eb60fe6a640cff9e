"""Coverage of the model zoo users bring (issue 12): one run, small inputs, hand-written models.

ResNet-18 (benchmarks/resnet18.py), a MobileNet-V2-shaped net (depthwise convs, folded BN,
ReLU6), a ConvNeXt-shaped block net (depthwise 7x7 + LayerNorm + Linear MLP), a DeiT-tiny-shaped
ViT (dim 192, 12 blocks, 3 heads, SDPA, position embedding), a text transformer
(``nn.TransformerEncoder`` over a float input sequence) and a UNet-style classifier (two
stride-2 downs, two ConvTranspose2d ups with skip concats, a conv head), × {W8A8, W4, the
avg-3-bit mixed-precision search}: export ok, export-check agreement, the kernels ORT ran,
quantized fraction of the weights, average (and, for the search, stored) bits, size and batch-1 /
batch-32 latency vs the fp32 export; for the search also its wall time and ``compress`` fits. Then the 4-bit Linear figure: the DeiT-tiny-shaped ViT, fp32 vs int8 vs W4
(storage auto: token Linears INT4 + Cast, run by the int8 kernel; the head MatMulNBits) vs W4
packed (every Linear MatMulNBits), size and latency at batch 1 and 32.

Weights are random (seeded) and labels are the float model's own predictions on a synthetic
2-group input (a 20% minority with shifted, scaled inputs): the figures are about coverage,
agreement and speed, not accuracy. Each model's calibration uses 64 group-balanced samples.

    .venv/bin/python benchmarks/coverage_bench.py [--out-dir bench-out/coverage] [--threads 2]
    .venv/bin/python benchmarks/coverage_bench.py --retime --repeats 60   # latency only, interleaved
    .venv/bin/python benchmarks/coverage_bench.py --variants search       # only the avg-3-bit search rows
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resnet18 import resnet18  # noqa: E402

from fqexport.calibration.group_data import GroupData  # noqa: E402
from fqexport.config import MixedPrecisionConfig, QuantConfig  # noqa: E402
from fqexport.exporters.cpu_isa import cpu_isa  # noqa: E402
from fqexport.exporters.ort_session import fused_kernels, kernel_line, make_session  # noqa: E402
from fqexport.exporters.qdq_onnx import export_float, export_qdq  # noqa: E402
from fqexport.pipeline.compress import compress  # noqa: E402
from fqexport.search.mixed_precision import search_mixed_precision  # noqa: E402
from fqexport.validation.latency import TIMED_SPINNING, measure_latency_pair  # noqa: E402

CLASSES = 10


# ---------------------------------------------------------------- models (hand-written)
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        h = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6()]
        layers += [nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                   nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNet-V2 layout (width 1.0) truncated after the 96-channel stage, for 32x32 inputs."""

    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        c = 32
        for t, cout, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers += [nn.Conv2d(c, 320, 1, bias=False), nn.BatchNorm2d(320), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(320, CLASSES)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(1e-1 * torch.ones(c))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt layout (stem 4x4/4 + LayerNorm2d, stages of blocks, 2x2/2 downsampling)."""

    def __init__(self, dims=(48, 96, 192), depths=(1, 1, 3)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0])]
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i:
                layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            layers += [ConvNeXtBlock(d) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], CLASSES)

    def forward(self, x):
        return self.head(self.norm(self.features(x).mean((2, 3))))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DeiTTiny(nn.Module):
    """DeiT-tiny shape (dim 192, depth 12, 3 heads, MLP 768) on 32x32 inputs, 4x4 patches
    (64 tokens + a class token), a learned batch-1 position embedding."""

    def __init__(self, dim: int = 192, depth: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 65, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, CLASSES)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


class TextTransformer(nn.Module):
    """``nn.TransformerEncoder`` (4 layers, d 128, 4 heads, FF 512) over 32 float tokens of 16."""

    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UNetClassifier(nn.Module):
    """UNet-style, 32x32: encoder 32 → 64 (/2) → 128 (/4), ConvTranspose2d ups (k 3, stride 2,
    padding 1, output_padding 1, + BN) back to 32x32 with skip concats, a conv head, pooled logits."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.enc1, self.enc2, self.enc3 = _conv_bn(3, c), _conv_bn(c, 2 * c, 2), _conv_bn(2 * c, 4 * c, 2)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(4 * c, 2 * c, 3, 2, 1, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.dec2 = _conv_bn(4 * c, 2 * c)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(2 * c, c, 3, 2, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.dec1 = _conv_bn(2 * c, c)
        self.head = nn.Conv2d(c, CLASSES, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.up2(self.enc3(e2)), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return F.adaptive_avg_pool2d(self.head(d1), 1).flatten(1)


MODELS = {
    "ResNet-18": (lambda: resnet18(CLASSES), (3, 32, 32)),
    "MobileNet-V2": (MobileNetV2, (3, 32, 32)),
    "ConvNeXt-shaped": (ConvNeXt, (3, 32, 32)),
    "DeiT-tiny-shaped": (DeiTTiny, (3, 32, 32)),
    "text transformer": (TextTransformer, (32, 16)),
    "UNet-style classifier": (UNetClassifier, (3, 32, 32)),
}
VARIANTS = {"W8A8": QuantConfig(num_calib=64, batch_size=32), "W4": QuantConfig(weight_bits=4, num_calib=64, batch_size=32)}
# The avg-3-bit search: budget 3.0 stored bits per weight (scales included), default widths
# (2, 4, 8), the W8A8 QuantConfig as base (the search sets layer_bits); its verification holds
# out 30% of the task's 256 samples, compress draws the same 64 calibration samples as above.
SEARCH = "search avg-3-bit"
SEARCH_CONFIG = MixedPrecisionConfig(budget_bits=3.0)
VARIANT_KEYS = {"W8A8": "W8A8", "W4": "W4", "search": SEARCH}


# ---------------------------------------------------------------- helpers
def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


def task(model: nn.Module, shape: tuple[int, ...], n: int = 256, seed: int = 0) -> GroupData:
    """Inputs with a 20% minority (shifted, scaled); labels = the float model's predictions."""
    rng = np.random.default_rng(seed)
    group = (rng.random(n) < 0.2).astype(np.int64)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    x[group == 1] = 1.5 * x[group == 1] + 0.5
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    return GroupData(x, y.astype(np.int64), group, ("majority", "minority"), "coverage-task")


def bench_models(only=None, n: int = 256):
    """``(name, model, data)`` of each bench model (``only``: those names), seeded by its position:
    random weights, BatchNorm statistics randomized, the minority task labelled by the model."""
    for mi, (name, (make, shape)) in enumerate(MODELS.items()):
        if only and name not in only:
            continue
        torch.manual_seed(mi)
        model = make().eval()
        _randomize_bn(model, mi)
        yield name, model, task(model, shape, n=n)


def vs_fp32(path: Path, fp32: Path, sample: np.ndarray, batch: int, threads: int, repeats: int
            ) -> tuple[float, float, float]:
    """(p50 ms of ``path``, p50 ms of ``fp32``, speed-up over fp32): the two sessions timed in
    alternating pairs of runs, without spinning (``measure_latency_pair``, what ``validate`` and
    compress's speed line do), the speed-up the median of the pairs' ratios: files timed one after
    the other read the same file 0.33-2.79x against itself on this shared machine (survey 98)."""
    sessions = [make_session(p, threads=threads, spinning=TIMED_SPINNING) for p in (path, fp32)]
    x = np.repeat(sample[:1], batch, axis=0) if len(sample) < batch else sample[:batch]
    mine, theirs = measure_latency_pair(*sessions, x, batch, warmup=3, repeats=repeats)
    return mine.p50_ms, theirs.p50_ms, float(mine.speedup)


def interleaved_ms(paths: dict[str, Path], sample: np.ndarray, batch: int, threads: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` latency (ms) of each file, the sessions run round-robin so that load
    from other processes on a shared machine hits every file alike."""
    sessions = {k: make_session(p, threads=threads) for k, p in paths.items()}
    x = sample[:batch]
    name = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        s.run(None, {name[k]: x})
    best = {k: float("inf") for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {name[k]: x})
            best[k] = min(best[k], 1000 * (time.perf_counter() - t0))
    return best


def retime(args) -> None:
    """Latency only, of the files a previous run left in ``--out-dir`` (interleaved, best of N)."""
    out = Path(args.out_dir)
    print(f"\n## Latency, best of {args.repeats} interleaved runs, {args.threads} threads (ms)\n")
    keys = ("fp32", "W8A8", "W4", "W4_packed", "search3")
    print("| model | batch | fp32 | W8A8 | W4 (auto) | W4 packed | search avg-3-bit | W8A8 vs fp32 | W4 vs fp32 "
          "| search vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mi, (name, (make, shape)) in enumerate(MODELS.items()):
        stem = name.split()[0].replace("-", "").lower()
        paths = {k: out / f"{stem}_{k}.onnx" for k in keys}
        paths = {k: p for k, p in paths.items() if p.is_file()}
        if "fp32" not in paths:
            continue
        x = np.random.default_rng(mi).standard_normal((32, *shape)).astype(np.float32)
        for batch in (1, 32):
            t = interleaved_ms(paths, x, batch, args.threads, args.repeats if batch == 1 else max(3, args.repeats // 6))
            cells = [f"{t[k]:.2f}" if k in t else "-" for k in keys]
            cells += [f"{t['fp32'] / t[k]:.2f}x" if k in t else "-" for k in ("W8A8", "W4", "search3")]
            print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)


def _short_kernels(path: Path) -> str:
    return kernel_line(fused_kernels(path))


def _variant(model: nn.Module, data: GroupData, variant: str, path: Path, row: dict):
    """Quantize ``model`` as ``variant`` and export it to ``path``: (CompressedModel, ExportResult).
    The search variant also fills the row's stored bits, widths, search seconds, fits and fallback."""
    if variant != SEARCH:
        cm = compress(model, data, VARIANTS[variant], progress=False)
        return cm, export_qdq(cm, path)
    t0 = time.perf_counter()
    result = search_mixed_precision(model, data, SEARCH_CONFIG, VARIANTS["W8A8"], progress=False)
    row["search s"] = f"{time.perf_counter() - t0:.0f}"
    row["fits"] = str(result.fits)
    row["stored bits"] = f"{result.allocation.stored_bits:.2f}"
    row["widths"] = _widths(result.allocation.bits)
    row["fallback"] = "uniform" if result.fallback else "no"
    row["candidates"] = "; ".join(  # in the log line only: what verification measured
        f"{c.origin} {c.allocation.stored_bits:.2f}b worst dL {c.measured_worst:.4f} worst acc {c.worst_group_acc:.3f}"
        for c in result.candidates)
    return result.compressed, export_qdq(result.compressed, path)


def _widths(bits: dict[str, int]) -> str:
    """Layers per width, e.g. ``"2b:3 4b:10 8b:1"``."""
    widths = list(bits.values())
    return " ".join(f"{b}b:{widths.count(b)}" for b in sorted(set(widths)))


def run(args) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    variants = [VARIANT_KEYS[v] for v in (args.variants or VARIANT_KEYS)]
    rows = []
    deit_paths: dict[str, Path] = {}
    deit_sample = None
    for name, model, data in bench_models(args.only):
        stem = name.split()[0].replace("-", "").lower()
        fp32 = out / f"{stem}_fp32.onnx"
        export_float(model, torch.from_numpy(data.x[:2]), fp32)
        if name == "DeiT-tiny-shaped":
            deit_paths["fp32"], deit_sample = fp32, data.x
        for variant in variants:
            row = {"model": name, "variant": variant}
            t0 = time.perf_counter()
            path = out / f"{stem}_{'search3' if variant == SEARCH else variant}.onnx"
            try:
                cm, res = _variant(model, data, variant, path, row)
                row.update(ok="ok", agreement=f"{100 * res.agreement:.2f}%")
            except Exception as err:  # noqa: BLE001 - a variant that raises is a row, not the end of the run
                row.update(ok=f"FAIL {type(err).__name__}: {str(err)[:160]}", agreement="-")
                row["time s"] = f"{time.perf_counter() - t0:.0f}"
                rows.append(row)
                print(row, flush=True)
                continue
            row["quantized"] = f"{100 * cm.quantized_fraction:.0f}%"
            row["avg bits"] = f"{cm.avg_weight_bits:.2f}"
            row["size vs fp32"] = f"{fp32.stat().st_size / res.size_bytes:.2f}x smaller"
            ms, fp32_ms, speed = vs_fp32(path, fp32, data.x, 1, args.threads, args.repeats)
            row["b1 ms (fp32)"] = f"{ms:.2f} ({fp32_ms:.2f})"
            row["speed vs fp32"] = f"{speed:.2f}x"
            b32, fp32_b32, speed = vs_fp32(path, fp32, data.x, 32, args.threads, max(5, args.repeats // 4))
            row["b32 ms (fp32)"] = f"{b32:.2f} ({fp32_b32:.2f})"
            row["b32 vs fp32"] = f"{speed:.2f}x"
            row["kernels"] = _short_kernels(path)
            row["time s"] = f"{time.perf_counter() - t0:.0f}"
            rows.append(row)
            print(row, flush=True)
            if name == "DeiT-tiny-shaped" and variant in VARIANTS:
                deit_paths[variant] = path
                if variant == "W4":  # the size-first choice: every 4-bit Linear as MatMulNBits
                    packed = compress(model, data, replace(VARIANTS["W4"], storage="packed"), progress=False)
                    deit_paths["W4 packed"] = export_qdq(packed, out / f"{stem}_W4_packed.onnx").path
    print("\n## Coverage matrix (ONNX Runtime optimized session, CPU "
          f"{cpu_isa()}, {args.threads} threads, each file and fp32 timed in {args.repeats} / "
          f"{max(5, args.repeats // 4)} alternating pairs at batch 1 / 32: p50s, speed = median pair ratio)\n")
    cols = ["model", "variant", "ok", "agreement", "quantized", "avg bits", "size vs fp32", "b1 ms (fp32)",
            "speed vs fp32", "b32 ms (fp32)", "b32 vs fp32", "kernels"]
    if SEARCH in variants:
        cols += ["stored bits", "widths", "search s", "fits", "fallback"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")

    if {"fp32", "W8A8", "W4"} <= set(deit_paths):
        print("\n## 4-bit Linear: DeiT-tiny-shaped ViT (5.5 M params)\n")
        print("| export | bytes | vs fp32 | b1 p50 ms (speed vs fp32) | b32 p50 ms (speed vs fp32) | kernels |")
        print("|---|---:|---:|---:|---:|---|")
        base = deit_paths["fp32"].stat().st_size
        for label, key in (("W8A8 (int8)", "W8A8"), ("W4, storage auto (token Linears INT4+Cast)", "W4"),
                           ("W4, storage packed (all Linears MatMulNBits)", "W4 packed")):
            p = deit_paths[key]
            b1, _, s1 = vs_fp32(p, deit_paths["fp32"], deit_sample, 1, args.threads, args.repeats)
            b32, _, s32 = vs_fp32(p, deit_paths["fp32"], deit_sample, 32, args.threads, max(5, args.repeats // 4))
            print(f"| {label} | {p.stat().st_size} | {base / p.stat().st_size:.2f}x smaller | {b1:.2f} ({s1:.2f}x) | "
                  f"{b32:.2f} ({s32:.2f}x) | {_short_kernels(p)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="bench-out/coverage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--only", nargs="*", help="model names to run (default: all)")
    ap.add_argument("--variants", nargs="*", choices=list(VARIANT_KEYS),
                    help="variants to run (default: all): W8A8, W4, search (the avg-3-bit search)")
    ap.add_argument("--retime", action="store_true", help="only re-time the files already in --out-dir")
    args = ap.parse_args()
    torch.set_num_threads(1)
    retime(args) if args.retime else run(args)


if __name__ == "__main__":
    main()
