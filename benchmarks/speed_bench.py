"""Issue 24: the solver at its floor. Compress wall time before/after, the solver's share of the
machine's GEMM rate, codes changed, per-group accuracy unchanged, the search beside one compress.

Usage (one command, one table per section)::

    .venv/bin/python benchmarks/speed_bench.py                       # everything
    .venv/bin/python benchmarks/speed_bench.py --sections compress   # compress + solver profile
    .venv/bin/python benchmarks/speed_bench.py --sections accuracy --cache /tmp/fqb
    .venv/bin/python benchmarks/speed_bench.py --sections search

"Before" is ``--base-commit`` (default: the commit this work started from), checked out with
``git worktree add --detach`` into ``--base-tree``; "after" is this working tree. Every run is
a fresh subprocess importing fqexport from its tree (``compress_bench``'s tree finder), and the
before/after runs of a case alternate (``--repeats`` pairs): the machine is shared, so compare
the ratio within a pair, not seconds across runs.

Sections:

- ``compress``: ``compress`` at W4, ``QuantConfig(weight_bits=4, num_calib=64)`` on the
  ResNet-18 / ResNet-50-size models of ``benchmarks/resnet18.py`` / ``resnet50.py`` (random
  weights, 64 images 3x64x64, two random groups); wall time, the codes that differ between
  before and after (beside the rounding floor: after vs after on images changed by at most one
  float32 ulp), and (after) the solver's arithmetic from ``fqexport.pipeline.compress``'s
  debug records: per step (``factor``: the one Cholesky per layer and conv group, with the
  column order; ``retarget``: the float-output target through that factor; ``solve``: the column
  updates) the flops, seconds and GFLOP/s, against ``torch.mm``'s rate measured in the same
  process just before, and the whole solver's time over its floor (all its flops at that rate);
  ``--per-layer`` prints every layer.
- ``accuracy``: per-group test accuracy of the solver benchmark models
  (``benchmarks/solver_models_bench.py``: the demo CNN and the tabular MLP, trained once and
  cached in ``--cache``) at W4A8 and W3A8, solver variants default (sensitivity order), natural
  and obs, before vs after, in PyTorch fake-quant, with the codes that differ.
- ``search``: the measured sensitivity table (serial, widths 2/4/8) before vs after (time, and
  whether the tables are equal bit for bit); then ``search_mixed_precision`` at
  ``budget_bits=3.0`` on the ResNet-18 size data, 64 images (num_calib: a hold-out split and a
  refit) and 192 images (num_calib 64: the verification fits are the refit; ``--search-images``)
  (after), serial and with ``EngineConfig(engine="local", workers=2)``, beside one compress of
  the same data in the same run (``--search-base`` also runs the searches of before, alternating
  with after's). The phases of a run on 2 workers overlap: the refit of the predicted best runs
  beside the last verification fits (``discarded_refit``: the guess was wrong).
  ``--search-variants one-fit`` also runs the unguarded one-candidate search
  (``num_candidates=1, verify_uniform=False, verify_mean=False``; CLI ``--candidates 1
  --no-guard``): the sensitivity plus one fit, in the search's process on all its threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE_COMMIT = "4944494"
CASES = ("resnet18", "resnet50")
RESULTS: dict[str, list[dict]] = {"compress": [], "search": []}  # --json: the key figures of each section
ACCURACY_VARIANTS = (("solver sensitivity (default)", {}), ("solver natural", {"order": "natural"}),
                     ("solver obs", {"order": "obs"}))

sys.path.insert(0, str(HERE))
# compress_bench resolves fqexport in the tree of FQ_BENCH_TREE (a worker's tree) when imported
from compress_bench import _build, cpu_flags  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


# ------------------------------------------------------------------------------ measurements
def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of ``torch.mm`` on two float32 ``n x n`` matrices, best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _WorkRecords(logging.Handler):
    """Collects the ``solver_work`` dicts of ``fqexport.pipeline.compress``'s debug records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.work: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        work = getattr(record, "solver_work", None)
        if work is not None:
            self.work.append(dict(work))


# ------------------------------------------------------------------------------ workers
def _perturbed(data):
    """``data`` with its images times ``1 + u·2⁻²³`` (u uniform in [-1, 1]): a change at float32's
    rounding level, to see how far rounding alone moves the codes."""
    from fqexport.calibration.group_data import GroupData

    u = np.random.default_rng(1).uniform(-1, 1, data.x.shape).astype(np.float32)
    x = (data.x * (1 + u * np.float32(2.0**-23))).astype(np.float32)
    return GroupData(x, data.y, data.group, data.group_names, data.source)


def worker_compress(case: str, out: Path, perturb: bool = False) -> dict:
    """One compress; ``perturb``: on :func:`_perturbed` images."""
    from fqexport.config import QuantConfig
    from fqexport.pipeline.compress import compress

    model, data, n = _build(case)
    if perturb:
        data = _perturbed(data)
    handler = _WorkRecords()
    logger = logging.getLogger("fqexport.pipeline.compress")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    rate = gemm_rate()
    t0 = time.perf_counter()
    cm = compress(model, data, QuantConfig(weight_bits=4, num_calib=n, device="cpu"), progress=False)
    wall = time.perf_counter() - t0
    torch.save({k: (l.codes, l.scale) for k, l in cm.layers.items()}, out)
    return {"wall_s": wall, "gemm_gflops": rate, "threads": torch.get_num_threads(), "work": handler.work,
            "layers": len(cm.layers)}


def worker_accuracy(model_name: str, bits: int, variant: str, cache: Path, out: Path, perturb: bool = False) -> dict:
    from solver_models_bench import NUM_CALIB, demo_cnn, metrics_of, tabular_mlp

    from fqexport.calibration.sampling import group_balanced_subset
    from fqexport.config import QuantConfig
    from fqexport.pipeline.compress import compress

    build = demo_cnn if model_name == "cnn" else tabular_mlp
    model, train, test, _ = build(cache, 0, 15000)
    calib = group_balanced_subset(train, NUM_CALIB, seed=0)
    calib = _perturbed(calib) if perturb else calib
    over = dict(ACCURACY_VARIANTS)[variant]
    t0 = time.perf_counter()
    cm = compress(model, calib, QuantConfig(weight_bits=bits, num_calib=NUM_CALIB, seed=0, **over), progress=False)
    wall = time.perf_counter() - t0
    m = metrics_of(cm.predict(test.x), test)
    torch.save({k: (l.codes, l.scale) for k, l in cm.layers.items()}, out)
    return {"wall_s": wall, "by_group": {g: float(v["accuracy"]) for g, v in m.by_group.items()},
            "overall": float(m.overall["accuracy"])}


def worker_sensitivity(case: str, out: Path) -> dict:
    from fqexport.config import SEARCH_BIT_CHOICES
    from fqexport.engine.base import SerialEngine
    from fqexport.search.sensitivity import measure_sensitivity

    model, data, _ = _build(case)
    t0 = time.perf_counter()
    table = measure_sensitivity(model, data, bit_choices=SEARCH_BIT_CHOICES, cache=False, engine=SerialEngine())
    wall = time.perf_counter() - t0
    np.save(out, table.delta)
    return {"wall_s": wall, "layers": len(table.layers), "bits": list(table.bits)}


# the searches of the search section: the default (guarded) one, and one candidate without guards
SEARCH_VARIANTS = {"default": {}, "one-fit": {"num_candidates": 1, "verify_uniform": False, "verify_mean": False}}


def worker_search(case: str, engine: str, workers: int, images: int, sensitivity: str = "measured",
                  variant: str = "default") -> dict:
    from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
    from fqexport.pipeline.compress import compress
    from fqexport.search.mixed_precision import search_mixed_precision

    model, data, n = _build(case, images)
    base = QuantConfig(weight_bits=4, num_calib=n, device="cpu")
    t0 = time.perf_counter()
    compress(model, data, base, progress=False)
    one = time.perf_counter() - t0
    mp = MixedPrecisionConfig(budget_bits=3.0, engine=EngineConfig(engine=engine, workers=workers),
                              sensitivity=sensitivity, **SEARCH_VARIANTS[variant])
    t0 = time.perf_counter()
    res = search_mixed_precision(model, data, mp, base, progress=False)
    wall = time.perf_counter() - t0
    return {"compress_s": one, "search_s": wall, "phases": {k: float(v) for k, v in res.seconds.items()},
            "fits": res.fits, "fit_seconds": res.fit_seconds, "avg_bits": float(res.allocation.avg_bits),
            "sensitivity_tasks": len(res.sensitivity.layers) * len(res.sensitivity.bits)}


# ------------------------------------------------------------------------------ parent
def _ensure_worktree(path: Path, commit: str) -> None:
    if (path / "fqexport" / "pipeline" / "compress.py").exists():
        return
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True)


def _run(tree: Path, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{HERE}", FQ_BENCH_TREE=str(tree))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *args], env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{args} in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def codes_changed(a: Path, b: Path) -> tuple[int, int]:
    """(codes that differ, codes) between two saved ``{layer: (codes, scale)}`` files."""
    before, after = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    diff = sum(int((before[k][0] != after[k][0]).sum()) for k in before)
    return diff, sum(before[k][0].numel() for k in before)


def _steps(work: list[dict]) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for w in work:
        f, s = out.get(w["step"], (0.0, 0.0))
        out[w["step"]] = (f + w["flops"], s + w["seconds"])
    return out


def section_compress(args, tmp: Path) -> None:
    print("\n## compress W4, 64 images 64x64 (before = base commit, after = this tree; pairs alternate)\n")
    print(f"{'case':<9} {'pair':>4} {'before s':>9} {'after s':>8} {'after/before':>12} {'codes changed':>20}")
    for case in args.cases:
        last = None
        for r in range(args.repeats):
            fb, fa = tmp / f"{case}_b{r}.pt", tmp / f"{case}_a{r}.pt"
            b = _run(args.base_tree, ["compress", case, str(fb)])
            a = _run(ROOT, ["compress", case, str(fa)])
            d, n = codes_changed(fb, fa)
            print(f"{case:<9} {r + 1:>4} {b['wall_s']:>9.1f} {a['wall_s']:>8.1f} {a['wall_s'] / b['wall_s']:>12.3f} "
                  f"{d:>9}/{n} ({100 * d / n:.2f}%)", flush=True)
            last = a
        fp = tmp / f"{case}_perturbed.pt"
        _run(ROOT, ["compress", case, str(fp), "perturb"])
        d_ulp, _ = codes_changed(fa, fp)
        print(f"{case:<9} rounding floor: after vs after on images changed by <= 1 ulp (x·(1 + u·2⁻²³)): "
              f"{d_ulp}/{n} codes ({100 * d_ulp / n:.2f}%)")
        rate = last["gemm_gflops"]
        print(f"\n{case} (after, last pair): torch.mm {rate:.1f} GFLOP/s on {last['threads']} threads")
        steps = _steps(last["work"])
        for step, (f, s) in steps.items():
            print(f"  {step:<9} {f / 1e9:8.1f} GFLOP in {s:6.2f} s = {f / 1e9 / s:6.1f} GFLOP/s "
                  f"({100 * f / 1e9 / s / rate:.0f}% of torch.mm)")
        flops, seconds = sum(f for f, _ in steps.values()), sum(s for _, s in steps.values())
        floor = flops / 1e9 / rate
        print(f"  solver    {flops / 1e9:8.1f} GFLOP in {seconds:6.2f} s; floor at torch.mm's rate {floor:.2f} s: "
              f"{seconds / floor:.2f}x the floor")
        RESULTS["compress"].append({"case": case, "before_s": b["wall_s"], "after_s": last["wall_s"],
                                    "solver_s": seconds, "floor_s": floor, "gemm_gflops": rate,
                                    "codes_changed": d / n, "rounding_floor": d_ulp / n})
        if args.per_layer:
            print(f"  {'layer':<28} {'step':<9} {'cols':>5} {'GFLOP':>7} {'s':>6} {'GFLOP/s':>8} {'% mm':>5}")
            for w in last["work"]:
                g = w["flops"] / 1e9
                print(f"  {w['layer']:<28} {w['step']:<9} {w['cols']:>5} {g:>7.2f} {w['seconds']:>6.2f} "
                      f"{g / w['seconds']:>8.1f} {100 * g / w['seconds'] / rate:>5.0f}")
        print(flush=True)


def section_accuracy(args, tmp: Path) -> None:
    print("\n## per-group test accuracy (PyTorch fake-quant), before vs after; 'before ±ulp': before on calibration")
    print("## images changed by <= 1 float32 ulp, the spread that rounding alone gives\n")
    print(f"{'model':<6} {'bits':>4} {'variant':<30} {'group':<18} {'before':>7} {'±ulp':>7} {'after':>7} "
          f"{'codes changed':>22} {'±ulp codes':>22}")
    for model_name in ("cnn", "mlp"):
        for bits in (4, 3):
            for variant, _ in ACCURACY_VARIANTS[:args.accuracy_variants]:
                fb, fa, fp = tmp / "acc_b.pt", tmp / "acc_a.pt", tmp / "acc_p.pt"
                job = ["accuracy", model_name, str(bits), variant, str(args.cache)]
                b = _run(args.base_tree, job + [str(fb)])
                p = _run(args.base_tree, job + [str(fp), "perturb"])
                a = _run(ROOT, job + [str(fa)])
                d, n = codes_changed(fb, fa)
                dp, _ = codes_changed(fb, fp)
                for g in ["overall", *b["by_group"]]:
                    v = [r["overall"] if g == "overall" else r["by_group"][g] for r in (b, p, a)]
                    print(f"{model_name:<6} {bits:>4} {variant:<30} {g:<18} {100 * v[0]:>7.2f} {100 * v[1]:>7.2f} "
                          f"{100 * v[2]:>7.2f} {d:>10}/{n} ({100 * d / n:.2f}%) {dp:>10}/{n} ({100 * dp / n:.2f}%)",
                          flush=True)


def section_search(args, tmp: Path) -> None:
    print("\n## measured sensitivity (serial engine, the search's widths) on the resnet18-size data\n")
    fb, fa = tmp / "sens_b.npy", tmp / "sens_a.npy"
    b = _run(args.base_tree, ["sensitivity", "resnet18", str(fb)])
    a = _run(ROOT, ["sensitivity", "resnet18", str(fa)])
    db, da = np.load(fb), np.load(fa)
    print(f"{b['layers']} layers x widths {b['bits']}: before {b['wall_s']:.1f} s, after {a['wall_s']:.1f} s "
          f"(after/before {a['wall_s'] / b['wall_s']:.2f}); tables bit for bit equal: {np.array_equal(db, da)} "
          f"(max |diff| {np.abs(db - da).max():.2e})", flush=True)
    print("\n## avg-3-bit search (budget_bits=3.0) on the resnet18-size data, beside one compress in the same run\n")
    print("64 images = num_calib: a stratified hold-out split, each verification fit sees 70 % of the data, then the")
    print("winner is refitted on all; 192 images: 64 per fit and >= 50 unused per group, so each verification fit is")
    print("the refit (the held-out set is the unused images) -- what a calibration set larger than num_calib gives.\n")
    print(f"{'tree':<7} {'search':<8} {'images':>6} {'sensitivity':<11} {'engine':<10} {'compress s':>10} {'search s':>9} "
          f"{'search/compress':>15} {'fits':>4} {'sens tasks':>10}  phases")
    runs = [("after", ROOT, "serial", 1), ("after", ROOT, "local", 2)]
    if args.search_base:  # before and after alternate: serial, then 2 workers
        runs = [("before", args.base_tree, "serial", 1), runs[0], ("before", args.base_tree, "local", 2), runs[1]]
    cases = [(s, i, v) for s in args.search_sensitivity for i in args.search_images for v in args.search_variants]
    for sens, images, variant in cases:
        for label, tree, engine, workers in runs:
            extra = [] if variant == "default" else [variant]  # a base tree's worker may not know the variants
            r = _run(tree, ["search", "resnet18", engine, str(workers), str(images), sens, *extra])
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
            RESULTS["search"].append({"tree": label, "variant": variant, "images": images, "sensitivity": sens,
                                      "workers": workers, "compress_s": r["compress_s"], "search_s": r["search_s"]})
            print(f"{label:<7} {variant:<8} {images:>6} {sens:<11} {engine + ' x' + str(workers):<10} {r['compress_s']:>10.1f} "
                  f"{r['search_s']:>9.1f} {r['search_s'] / r['compress_s']:>15.2f} {r['fits']:>4} "
                  f"{r['sensitivity_tasks']:>10}  {phases}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--sections", nargs="+", choices=("compress", "accuracy", "search"),
                   default=["compress", "accuracy", "search"])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--repeats", type=int, default=2, help="before/after pairs per compress case")
    p.add_argument("--per-layer", action="store_true", help="every layer's solver arithmetic")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fqexport-speed-bench-models")
    p.add_argument("--accuracy-variants", type=int, default=len(ACCURACY_VARIANTS),
                   help="the first K solver variants of the accuracy section (1: the default order only)")
    p.add_argument("--search-base", action="store_true", help="also the searches of the base commit")
    p.add_argument("--search-images", type=int, nargs="+", default=[64, 192],
                   help="calibration set sizes of the search runs (num_calib stays 64)")
    p.add_argument("--search-sensitivity", nargs="+", choices=("measured", "fisher", "output-fisher"), default=["measured"],
                   help="the sensitivity methods of the search runs")
    p.add_argument("--search-variants", nargs="+", choices=tuple(SEARCH_VARIANTS), default=["default"],
                   help="the searches run: default (guarded), one-fit (--candidates 1 --no-guard)")
    p.add_argument("--json", type=Path, help="also write the key figures of each section here")
    p.add_argument("--base-commit", default=BASE_COMMIT)
    p.add_argument("--base-tree", type=Path, default=Path(tempfile.gettempdir()) / "fqexport-speed-bench-base")
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "compress":
            result = worker_compress(rest[0], Path(rest[1]), perturb=rest[2:] == ["perturb"])
        elif kind == "accuracy":
            result = worker_accuracy(rest[0], int(rest[1]), rest[2], Path(rest[3]), Path(rest[4]),
                                     perturb=rest[5:] == ["perturb"])
        elif kind == "sensitivity":
            result = worker_sensitivity(rest[0], Path(rest[1]))
        else:
            result = worker_search(rest[0], rest[1], int(rest[2]), int(rest[3]), *rest[4:])
        print(json.dumps(result))
        return
    _ensure_worktree(args.base_tree, args.base_commit)
    load = os.getloadavg()[0]
    print(f"CPU: {cpu_flags()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{load:.1f} at start (a shared machine: read ratios within a pair)")
    print(f"before: {args.base_commit} ({args.base_tree}); after: working tree {ROOT}")
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections:
            globals()[f"section_{section}"](args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
