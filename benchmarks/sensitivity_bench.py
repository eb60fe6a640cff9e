"""The search's sensitivity tables: what each costs, and how well it ranks what compress writes.

    .venv/bin/python benchmarks/sensitivity_bench.py                 # demo CNN + tabular MLP (trained)
    .venv/bin/python benchmarks/sensitivity_bench.py --coverage      # + coverage_bench's random-weight models
    .venv/bin/python benchmarks/sensitivity_bench.py --cache /tmp/fqb

For each model, the tables at the search's widths (2, 4, 8) with ``measured`` (RTN codes, loss
measured) and ``output-fisher`` (the solver's codes, second-order estimate), their wall time,
and the **truth** they stand in for: the loss increase, measured the same way as ``measured``,
of one layer at a time on *the solver's codes* (``output-fisher``'s own codes, captured while it
runs; the solver on the float inputs' Hessian of ``num_calib`` = 64 samples). Per group, the
Spearman rank correlation of each table with the truth over all (layer, width) entries: the
allocator only ranks, so ranks are what count.

The demo CNN and the tabular MLP are trained once (``solver_models_bench``'s models, cached in
``--cache``). The coverage models have random weights and labels from their own top-1 (a task
with no meaning, near-tied logits): a stress test of the estimates, not of their use.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fqexport.search.output_fisher as output_fisher  # noqa: E402
import fqexport.search.sensitivity as sensitivity  # noqa: E402
from fqexport.config import SEARCH_BIT_CHOICES, QuantConfig  # noqa: E402
from fqexport.model import rows_to_weight, weight_rows  # noqa: E402

SOLVER = QuantConfig(num_calib=64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a.ravel())), np.argsort(np.argsort(b.ravel()))
    return float(np.corrcoef(ra, rb)[0, 1])


def _key(rows: torch.Tensor, qmax: int) -> tuple:
    """A layer weight's identity (shape and sum of its rows) and the width's grid."""
    return tuple(rows.shape), round(float(rows.double().sum()), 4), int(qmax)


@contextmanager
def captured_solver_codes(store: dict) -> Iterator[None]:
    """While it runs, every solve of ``output-fisher`` is kept in ``store`` (its dequantized rows)."""
    real = output_fisher.solve_conv_groups

    def capture(rows, H, grid, **options):
        result = real(rows, H, grid, **options)
        store[_key(rows, grid.qmax)] = result.qweight
        return result

    output_fisher.solve_conv_groups = capture
    try:
        yield
    finally:
        output_fisher.solve_conv_groups = real


@contextmanager
def measured_on(store: dict) -> Iterator[None]:
    """While it runs, ``measured`` puts each layer on the codes in ``store`` instead of RTN's."""
    real = sensitivity.rtn_weight

    def solved(weight, bits, weight_range="x86-safe", clip_search=True, kind="linear"):
        rows = weight_rows(kind, weight.detach()).float()
        qmax = sensitivity.choose_solver_grid(rows[:1], None, bits, weight_range=weight_range,
                                              clip_search=False).qmax
        q = store[_key(rows, qmax)]
        return rows_to_weight(kind, q, weight.shape).to(weight.dtype)

    sensitivity.rtn_weight = solved
    try:
        yield
    finally:
        sensitivity.rtn_weight = real


def timed_table(model, data, method: str):
    t0 = time.perf_counter()
    table = sensitivity.measure_sensitivity(model, data, bit_choices=SEARCH_BIT_CHOICES, method=method,
                                            cache=False, solver=SOLVER)
    return table, time.perf_counter() - t0


def models(cache: Path, coverage: bool):
    from solver_models_bench import demo_cnn, tabular_mlp

    for name, make in (("demo CNN (trained)", demo_cnn), ("tabular MLP (trained)", tabular_mlp)):
        model, train, _, _ = make(cache, 0, 2000)
        yield name, model, train
    if coverage:
        from coverage_bench import bench_models

        for name, model, data in bench_models(n=128):
            yield f"{name} (random)", model, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coverage", action="store_true", help="also coverage_bench's random-weight models")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fqexport-speed-bench-models")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"{'model':<32} {'group':<18} {'measured s':>10} {'o-fisher s':>10} {'rho measured':>12} "
          f"{'rho o-fisher':>12}")
    for name, model, data in models(args.cache, args.coverage):
        store: dict = {}
        with captured_solver_codes(store):
            fisher, fisher_s = timed_table(model, data, "output-fisher")
        measured, measured_s = timed_table(model, data, "measured")
        with measured_on(store):
            truth, _ = timed_table(model, data, "measured")
        for k, group in enumerate(truth.groups):
            print(f"{name:<32} {group:<18} {measured_s:>10.1f} {fisher_s:>10.1f} "
                  f"{spearman(measured.delta[:, :, k], truth.delta[:, :, k]):>12.3f} "
                  f"{spearman(fisher.delta[:, :, k], truth.delta[:, :, k]):>12.3f}", flush=True)


if __name__ == "__main__":
    main()
