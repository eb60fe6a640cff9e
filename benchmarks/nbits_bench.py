"""4-bit Linear layers as ORT MatMulNBits (issue 12): size, speed, agreement, per-block scales.

1. The DeiT-tiny-shaped ViT of coverage_bench.py (random seeded weights, labels = the float
   model's predictions on a 2-group input): fp32 vs W8A8 (int8) vs W4 ``storage="auto"`` (token
   Linears int8, the head MatMulNBits) vs W4 ``storage="packed"`` (every Linear MatMulNBits,
   per-block scales from the solver): file size vs fp32 (scales included), latency at batch 1
   and 32 (each file timed against fp32 in ``--repeats`` alternating pairs of runs, ``--threads``
   threads: p50s and the median pair ratio), the ops ORT
   ran and the export check's agreement.
2. Per-row vs per-block scales (GPTQ's groupsize = the MatMulNBits block) at 4 and 2 bits, on
   the DeiT-shaped model (top-1 agreement of the fake-quant reference with the float model on
   held-out inputs) and on the demo MLP (hidden 192: 3 blocks of 64) on the tabular task (test
   accuracy, worst group). Compress only; the per-row / per-block choice is forced by replacing
   the layout rule (``layer_layout``) in the pipeline for the run.

    .venv/bin/python benchmarks/nbits_bench.py [--out-dir bench-out/nbits] [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage_bench import DeiTTiny, task, vs_fp32  # noqa: E402

import fqexport.pipeline.compress as compress_mod  # noqa: E402
from fqexport.config import ExportSpec, QuantConfig  # noqa: E402
from fqexport.demo.models import mlp  # noqa: E402
from fqexport.demo.task import make_tabular_task  # noqa: E402
from fqexport.exporters.cpu_isa import cpu_isa  # noqa: E402
from fqexport.exporters.ort_session import fused_kernels, kernel_line  # noqa: E402
from fqexport.exporters.qdq_onnx import export_float, export_qdq  # noqa: E402
from fqexport.exporters.weight_nbits import NBITS_ACCURACY_LEVEL  # noqa: E402
from fqexport.quant.grid import num_blocks  # noqa: E402
from fqexport.quant.layout import LayerLayout, layer_layout, nbits_block_size  # noqa: E402


def per_row(kind: str, bits: int, export: ExportSpec, cols: int, macs: int, params: int) -> LayerLayout:
    """The default container with one scale per row."""
    return LayerLayout(layer_layout(kind, bits, export, cols, macs, params).container)


def per_block(kind: str, bits: int, export: ExportSpec, cols: int, macs: int, params: int) -> LayerLayout:
    """MatMulNBits with per-block scales for every <=4-bit Linear spanning more than one block
    (2-bit codes too: they fit its 4-bit container)."""
    bs = nbits_block_size(cols)
    if kind == "linear" and bits <= 4 and num_blocks(cols, bs) > 1:
        return LayerLayout("nbits", bs)
    return layer_layout(kind, bits, export, cols, macs, params)


def compress_with(model, data, cfg, blocks: str):
    compress_mod.layer_layout = {"default": layer_layout, "row": per_row, "block": per_block}[blocks]
    try:
        return compress_mod.compress(model, data, cfg, progress=False)
    finally:
        compress_mod.layer_layout = layer_layout


def deit_table(args, out: Path) -> None:
    torch.manual_seed(3)
    model = DeiTTiny().eval()
    data = task(model, (3, 32, 32))
    x = np.ascontiguousarray(data.x[:32])
    paths, agree = {"fp32": out / "deit_fp32.onnx"}, {}
    export_float(model, torch.from_numpy(data.x[:2]), paths["fp32"])
    w8 = compress_with(model, data, QuantConfig(num_calib=64, batch_size=32), "default")
    w4 = compress_with(model, data, QuantConfig(weight_bits=4, num_calib=64, batch_size=32), "default")
    w4p = compress_with(model, data, QuantConfig(weight_bits=4, num_calib=64, batch_size=32, storage="packed"), "default")
    for key, cm in (("W8A8", w8), ("W4 auto", w4), ("W4 packed", w4p)):
        res = export_qdq(cm, out / f"deit_{key.replace(' ', '_')}.onnx")
        paths[key], agree[key] = res.path, res.agreement
    base = paths["fp32"].stat().st_size
    print(f"\n## DeiT-tiny-shaped ViT, ORT CPU ({cpu_isa()}), {args.threads} threads, "
          f"each file and fp32 in {args.repeats} alternating pairs (p50s; speed: the median pair ratio), "
          f"MatMulNBits accuracy_level={NBITS_ACCURACY_LEVEL}\n")
    print("| export | bytes | vs fp32 | b1 ms (speed vs fp32) | b32 ms (speed vs fp32) | agreement | kernels |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for key, p in paths.items():
        if key == "fp32":
            continue
        b1, _, s1 = vs_fp32(p, paths["fp32"], x, 1, args.threads, args.repeats)
        b32, _, s32 = vs_fp32(p, paths["fp32"], x, 32, args.threads, args.repeats)
        a = f"{100 * agree[key]:.2f}%" if key in agree else "-"
        print(f"| {key} | {p.stat().st_size} | {base / p.stat().st_size:.2f}x smaller | {b1:.2f} ({s1:.2f}x) | "
              f"{b32:.2f} ({s32:.2f}x) | {a} | {kernel_line(fused_kernels(p))} |", flush=True)


def fidelity(cm, x: np.ndarray, want: np.ndarray) -> float:
    return float((cm.predict(x).argmax(1) == want).mean())


def scales_table(args) -> None:
    print("\n## Per-row vs per-block scales (solver, float-output target)\n")
    print("| model | bits | per-row | per-block |")
    print("|---|---:|---:|---:|")
    torch.manual_seed(3)
    model = DeiTTiny().eval()
    data = task(model, (3, 32, 32))
    held = task(model, (3, 32, 32), n=256, seed=1)
    for bits in (4, 2):
        cells = []
        for blocks in ("row", "block"):
            cm = compress_with(model, data, QuantConfig(weight_bits=bits, num_calib=64, batch_size=32), blocks)
            cells.append(f"{100 * fidelity(cm, held.x, held.y):.2f}% top-1 = float")
        print(f"| DeiT-tiny-shaped | {bits} | " + " | ".join(cells) + " |", flush=True)
    train_data, test = make_tabular_task()
    net = _train_mlp(train_data, args.mlp_epochs)
    base = _acc(lambda x: net(torch.from_numpy(x)).detach().numpy(), test)
    print(f"| demo MLP (hidden 192), float: {base[0]:.2f}% (worst group {base[1]:.2f}%) | | | |")
    for bits in (4, 2):
        cells = []
        for blocks in ("row", "block"):
            cm = compress_with(net, train_data, QuantConfig(weight_bits=bits, num_calib=512), blocks)
            acc, worst = _acc(cm.predict, test)
            cells.append(f"{acc:.2f}% (worst {worst:.2f}%)")
        print(f"| demo MLP (hidden 192) | {bits} | " + " | ".join(cells) + " |", flush=True)


def _train_mlp(data, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = mlp(hidden=192)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def _acc(predict, data) -> tuple[float, float]:
    with torch.no_grad():
        ok = predict(data.x).argmax(1) == data.y
    per_group = [ok[data.group == g].mean() for g in np.unique(data.group)]
    return 100 * float(ok.mean()), 100 * float(min(per_group))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="bench-out/nbits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--mlp-epochs", type=int, default=10)
    ap.add_argument("--only", choices=("deit", "scales"), help="run one part")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.only in (None, "deit"):
        deit_table(args, out)
    if args.only in (None, "scales"):
        scales_table(args)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
