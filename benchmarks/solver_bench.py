"""Layer-level benchmark of the sensitivity-guided solver against RTN and per-row OBQ.

    .venv/bin/python benchmarks/solver_bench.py            # full run (~4 min on 2 cores)
    .venv/bin/python benchmarks/solver_bench.py --quick    # smaller OBQ subsets (~1 min)

For each layer (W ``[out, cols]``, H from correlated inputs ``X = relu(Z A)``) and width:
the layer output error ``tr((W - Q) H (W - Q)ᵀ)`` of RTN, of the solver in every column
order (and with a plain, not H-aware, clipping grid), and of OBQ (``benchmarks/obq_reference.py``), all on the same H-aware per-row grid.
OBQ is O(cols³) per row, so it runs on the first ``obq_rows`` rows only: errors are compared
on those rows, and OBQ's time is extrapolated linearly to all rows (rows are independent).
Then the solver alone on ResNet-18's layer shapes (random SPD H) for a whole-model estimate.
Times are the minimum over repeats (the machine may be shared); OBQ runs once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from obq_reference import obq_quantize  # noqa: E402

from fqexport.quant.grid import WeightGrid, dequantize  # noqa: E402
from fqexport.quant.solver import choose_solver_grid, layer_error, rtn_layer, solve_layer  # noqa: E402

# (name, out, cols, OBQ rows full, OBQ rows --quick)
LAYERS = [
    ("conv 64x64x3x3", 64, 576, 64, 16),
    ("conv 128x128x3x3", 128, 1152, 32, 8),
    ("conv 256x256x3x3", 256, 2304, 8, 2),
]

# ResNet-18 (ImageNet) Conv/Linear weights as [out, in·kh·kw] with their counts.
RESNET18 = [
    ("conv1 7x7", 64, 147, 1),
    ("layer1 3x3", 64, 576, 4),
    ("layer2.0.conv1", 128, 576, 1),
    ("layer2 3x3", 128, 1152, 3),
    ("layer2 down", 128, 64, 1),
    ("layer3.0.conv1", 256, 1152, 1),
    ("layer3 3x3", 256, 2304, 3),
    ("layer3 down", 256, 128, 1),
    ("layer4.0.conv1", 512, 2304, 1),
    ("layer4 3x3", 512, 4608, 3),
    ("layer4 down", 512, 256, 1),
    ("fc", 1000, 512, 1),
]


def correlated_layer(out: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W with heavy-ish tails and varied row norms; H = 2 XᵀX/N, X = relu(Z A), rank cols/2."""
    g = torch.Generator().manual_seed(seed)
    k = cols // 2
    A = torch.randn(k, cols, generator=g) / k ** 0.5
    X = torch.relu(torch.randn(2 * cols, k, generator=g) @ A)
    H = 2 * X.T @ X / X.shape[0]
    t = torch.distributions.StudentT(5.0).sample((out, cols))
    row_scale = torch.exp(0.5 * torch.randn(out, 1, generator=g))
    return (0.02 * t * row_scale).float(), H


def timed(fn, repeat: int = 1):
    times, res = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return res, min(times)  # min: the uncontended time on a shared machine


def bench_layers(bits_list: list[int], quick: bool) -> None:
    print("\n## Solver vs RTN vs per-row OBQ (error = tr((W-Q) H (W-Q)^T), same H-aware grid)\n")
    print("| layer | bits | OBQ rows | RTN err | solver err (sens) | natural | hess-diag | obs | plain grid "
          "| OBQ err | solver/OBQ err | solver s | OBQ s (measured) | OBQ s (all rows, extrap.) "
          "| OBQ/solver time |")
    print("|" + "---|" * 15)
    for li, (name, out, cols, obq_full, obq_quick) in enumerate(LAYERS):
        W, H = correlated_layer(out, cols, seed=li)
        n_obq = obq_quick if quick else obq_full
        for bits in bits_list:
            grid = choose_solver_grid(W, H, bits)
            rtn = rtn_layer(W, grid, H)
            res, t_solver = timed(lambda: solve_layer(W, H, grid), repeat=5)
            others = {o: solve_layer(W, H, grid, order=o).loss
                      for o in ("natural", "hessian-diag", "obs")}
            plain = solve_layer(W, H, choose_solver_grid(W, H, bits, hessian_aware=False)).loss
            sub = WeightGrid(grid.scale[:n_obq], grid.qmax)
            codes, t_obq = timed(lambda: obq_quantize(W[:n_obq], H, sub))
            q_obq = dequantize(codes, sub.scale)
            err_obq = layer_error(W[:n_obq], q_obq, H)
            err_solver_sub = layer_error(W[:n_obq], res.qweight[:n_obq], H)
            t_obq_all = t_obq * out / n_obq
            print(f"| {name} ({out}x{cols}) | {bits} | {n_obq}/{out} | {rtn.loss:.4g} "
                  f"| {res.loss:.4g} | {others['natural']:.4g} | {others['hessian-diag']:.4g} "
                  f"| {others['obs']:.4g} | {plain:.4g} | {err_obq:.4g} (rows) "
                  f"| {err_solver_sub / err_obq:.3f} | {t_solver:.3f} | {t_obq:.1f} "
                  f"| {t_obq_all:.0f} | {t_obq_all / t_solver:.0f}x |")
            sys.stdout.flush()


def bench_resnet18(bits: int) -> None:
    print(f"\n## Solver time on ResNet-18 layer shapes ({bits} bits, random SPD H, "
          f"{torch.get_num_threads()} threads)\n")
    print("| layer | W shape | count | solver s (one) | total s |")
    print("|---|---|---|---|---|")
    total = 0.0
    for i, (name, out, cols, count) in enumerate(RESNET18):
        g = torch.Generator().manual_seed(100 + i)
        X = torch.randn(cols + 64, cols, generator=g)
        H = 2 * X.T @ X / X.shape[0]
        W = 0.02 * torch.randn(out, cols, generator=g)
        grid = choose_solver_grid(W, H, bits)
        _, t = timed(lambda: solve_layer(W, H, grid), repeat=2)
        total += t * count
        print(f"| {name} | {out}x{cols} | {count} | {t:.2f} | {t * count:.2f} |")
        sys.stdout.flush()
    print(f"\nEstimated whole-model solve time (solver only, no Hessian collection): {total:.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer OBQ rows")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if not args.skip_layers:
        bench_layers(args.bits, args.quick)
    if not args.skip_resnet:
        bench_resnet18(args.bits[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
