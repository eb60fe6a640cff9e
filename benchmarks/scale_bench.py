"""Scale-out of the search: serial vs a local process pool vs Ray, and a projection for
ResNet-18-size models (issue 15).

    .venv/bin/python benchmarks/scale_bench.py                      # everything, one run
    .venv/bin/python benchmarks/scale_bench.py --num-calib 128 --skip-resnet --json out.json

1. Demo search (SmallResNet on the demo image task, budget 2.25 average bits, the default
   verification: 3 candidates + uniform + mean-objective, 3 folds): wall time with the serial
   engine, the local engine (2 workers) and Ray (a local cluster with 2 CPUs) — the same search,
   and the script checks that all three chose the same allocation from the same table. The
   model is randomly initialised (the timings do not depend on training; say so when quoting).
   The first local run pays the forkserver start (importing torch once); it is reported apart.
2. ResNet-18 (benchmarks/resnet18.py, random init, 32×32 inputs): time of one sensitivity task
   and one verification fit (serial engine, one thread — what a worker runs), the task counts of
   a default search, and the projected wall time on W workers:
   ``T(W) = serial + ceil(n_sens/W)·(t_sens + o) + ceil(n_fit/W)·(t_fit + o) + start``,
   ``serial`` the parts that do not split (table-independent preparation, allocation, refit =
   one fit), ``o`` the measured per-task overhead of the local engine, ``start`` its pool start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from fqexport.calibration.sampling import group_balanced_subset
from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
from fqexport.demo.models import SmallResNet
from fqexport.demo.run import DEMO_NUM_CALIB
from fqexport.demo.task import make_image_task
from fqexport.engine import LocalEngine, SerialEngine, Task, make_engine
from fqexport.graph.prepare import prepare_model
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.search.verification import (
    VerifyContext,
    fit_candidate,
    verification_splits,
    verification_tasks,
)
from fqexport.search.sensitivity import DEFAULT_CACHE, measure_sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet18 import resnet18  # noqa: E402


def _noop(ctx, task):
    return task.payload


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and every live descendant (pool workers, the
    forkserver, a local Ray cluster), read from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick)  # ppid, utime + stime
    mine, grew = {os.getpid()}, True
    while grew:
        new = {p for p, (pp, _) in stats.items() if pp in mine and p not in mine}
        mine |= new
        grew = bool(new)
    return sum(stats[p][1] for p in mine if p in stats)


def engine_overhead(workers: int, n: int = 200) -> dict:
    """Pool start (first map) and per-task overhead of the local engine on no-op tasks."""
    with LocalEngine(workers, preload=[search_mixed_precision.__module__]) as e:
        t0 = time.perf_counter()
        e.map(_noop, [Task(("warm", i), "warm", i) for i in range(workers)], None, "start")
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        e.map(_noop, [Task(("noop", i), "noop", i) for i in range(n)], None, "noop")
        per_task = (time.perf_counter() - t0) * workers / n
    return {"start_s": start, "per_task_s": per_task}


def demo_search(num_calib: int, engines: list[EngineConfig]) -> list[dict]:
    train, _ = make_image_task(4000, 10, 32, 0.1, seed=0)
    calib = group_balanced_subset(train, 2 * num_calib, seed=0)
    torch.manual_seed(0)
    model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1]).eval()
    rows = []
    for eng in engines:
        DEFAULT_CACHE.clear()
        mp = MixedPrecisionConfig(budget_bits=2.25, engine=eng)
        with make_engine(eng, preload=[search_mixed_precision.__module__]) as engine:
            if eng.kind != "serial":  # start the workers (a Ray cluster) outside the timing; reported apart
                t0 = time.perf_counter()
                engine.map(_noop, [Task(("warm", i), "warm", i) for i in range(engine.workers)], None, "start")
                start = time.perf_counter() - t0
            else:
                start = 0.0
            c0, t0 = _cpu_seconds(), time.perf_counter()
            res = search_mixed_precision(model, calib, mp, QuantConfig(num_calib=num_calib), progress=False,
                                         engine=engine)
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        rows.append({"engine": engine.label, "wall_s": wall, "cpu_s": cpu, "start_s": start,
                     "phases_s": res.seconds, "bits": res.allocation.bits,
                     "table_sha": hashlib.sha1(res.sensitivity.delta.tobytes()).hexdigest()[:12],
                     "tasks": len(res.sensitivity.layers) * len(res.sensitivity.bits) + 3 * len(res.candidates)})
        print(f"demo search, {engine.label}: {wall:.1f} s wall, {cpu:.1f} CPU s (this process and its workers), "
              f"start {start:.1f} s  {json.dumps({k: round(v, 1) for k, v in res.seconds.items()})}", flush=True)
    return rows


def resnet_projection(num_calib: int, overhead: dict, workers=(1, 8, 32, 128)) -> dict:
    train, _ = make_image_task(600, 10, 32, 0.1, seed=0)
    calib = group_balanced_subset(train, 2 * num_calib, seed=0)
    model = resnet18(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1]).eval()
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    table = measure_sensitivity(model, calib, layers=["layer2.0.conv1", "fc"], bit_choices=(4,), num_samples=num_calib,
                                cache=False, engine=SerialEngine())
    # two tasks, plus the preparation once: an upper bound per task
    t_sens, c_sens = (time.perf_counter() - t0) / 2, (time.process_time() - c0) / 2
    n_layers = len(prepare_model(model).names)
    mp = MixedPrecisionConfig(budget_bits=2.25)
    base = QuantConfig(num_calib=num_calib)
    held_out, splits, _ = verification_splits(calib, mp, base)
    ctx = VerifyContext(model, held_out, splits, base)

    class _A:  # an allocation stand-in: 4 bits everywhere
        bits = {n: 4 for n in table.layers}
        avg_bits = 4.0

    t0, c0 = time.perf_counter(), time.process_time()
    SerialEngine().map(fit_candidate, verification_tasks([_A()], 3)[:1], ctx, "fit")
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    n_sens = n_layers * len(mp.bit_choices)
    n_fit = 3 * (mp.num_candidates + 2)  # candidates + uniform + mean, 3 folds
    o, start = overhead["per_task_s"], overhead["start_s"]

    def project(ts: float, tf: float) -> dict:
        # the refit (one fit) does not split; allocation is well under a second
        return {w: tf + math.ceil(n_sens / w) * (ts + o) + math.ceil(n_fit / w) * (tf + o) + (start if w > 1 else 0)
                for w in workers}

    proj, proj_cpu = project(t_sens, t_fit), project(c_sens, c_fit)
    out = {"t_sens_s": t_sens, "t_fit_s": t_fit, "cpu_sens_s": c_sens, "cpu_fit_s": c_fit, "n_sens": n_sens,
           "n_fit": n_fit, "layers": n_layers, "num_calib": num_calib, "projected_s": proj,
           "projected_dedicated_core_s": proj_cpu}
    print(f"ResNet-18 ({n_layers} layers, {num_calib} calibration samples, 1 thread): sensitivity task {t_sens:.2f} s "
          f"wall / {c_sens:.2f} CPU s × {n_sens}, verification fit {t_fit:.1f} s wall / {c_fit:.1f} CPU s × {n_fit}",
          flush=True)
    for w in workers:
        print(f"  projected search on {w:>3} workers: {proj[w]:7.1f} s at this machine's load, "
              f"{proj_cpu[w]:7.1f} s with a dedicated core per worker", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-calib", type=int, default=DEMO_NUM_CALIB, help="calibration samples of the demo search")
    p.add_argument("--resnet-calib", type=int, default=128, help="calibration samples of the ResNet-18 timing")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(1)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"load average at start: {' '.join(load)} on {torch.multiprocessing.cpu_count()} cores", flush=True)
    overhead = engine_overhead(args.workers)
    print(f"local engine ×{args.workers}: pool start {overhead['start_s']:.1f} s (first in this process: "
          f"forkserver imports torch), per-task overhead {1000 * overhead['per_task_s']:.1f} ms", flush=True)
    engines = [EngineConfig(engine="serial"), EngineConfig(engine="local", workers=args.workers)]
    try:
        import ray  # noqa: F401  (optional)
        if not args.skip_ray:
            engines.append(EngineConfig(engine="ray", workers=args.workers))
    except ImportError:
        print("ray is not installed: no Ray row (pip install 'fqexport[ray]')")
    rows = demo_search(args.num_calib, engines)
    same = len({(json.dumps(r["bits"], sort_keys=True), r["table_sha"]) for r in rows}) == 1
    print(f"identical allocation and sensitivity table across engines: {same}")
    base = rows[0]
    for r in rows[1:]:
        w = int(r["engine"].split("×")[1])
        print(f"  {r['engine']}: {base['wall_s'] / r['wall_s']:.2f}× the serial wall time; CPU {r['cpu_s'] / base['cpu_s']:.2f}× "
              f"serial's; with a free core per worker: {base['cpu_s'] / (r['cpu_s'] / w):.2f}× "
              f"(serial CPU / local CPU per worker)")
    out = {"load_average": load, "overhead": overhead, "demo": rows, "identical": same}
    if not args.skip_resnet:
        out["resnet18"] = resnet_projection(args.resnet_calib, overhead)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
