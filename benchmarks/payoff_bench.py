"""Does the mixed-precision search pay off? File size and worst-group accuracy in ONNX Runtime.

    .venv/bin/python benchmarks/payoff_bench.py                       # demo CNN, ~10 min on 2 cores
    .venv/bin/python benchmarks/payoff_bench.py --budgets 2.5,3 --json payoff.json

On the demo task (``prepare_demo_model(seed=0)``: the demo's task sizes and SmallResNet, its 10 %
inverted-contrast minority, trained with ``DEMO_TRAIN`` but ``--epochs`` (default 4) and no time
budget, so the model does not depend on the machine's load; cached in ``--work-dir``;
calibration = the demo's group-balanced 1024 training images, ``num_calib`` 512, as
``fqexport demo`` uses): for

* uniform W8 / W4 / W2 (one ``compress`` per width), exported with ``storage="packed"`` (the
  smallest file: INT4/INT2 containers) and with the default storage (``"auto"``: int8 convs);
* the search at stored-bit budgets (default 2.5, 3, 3.5; storage ``packed``, the search's own
  default) and at byte budgets of 75 % and 85 % of the uniform-W4 packed file,

it writes the ONNX file, validates it in ORT on the 3000 test images
(``fqexport.validate(..., measure_latency=False)``) and prints file size and worst-group
accuracy. Then: does the search dominate uniform (for each uniform packed point, a search
point with a file no larger and a worst group at least as good, or better at no larger
size), and the search's wall time against one ``compress`` at a single width.
Serial engine; accuracies are ORT's optimized session (what deploys).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fqexport.calibration.sampling import group_balanced_subset
from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
from fqexport.demo.models import SmallResNet
from fqexport.demo.run import DEMO_NUM_CALIB, prepare_demo_model
from fqexport.demo.task import make_image_task
from fqexport.demo.training import DEMO_TASK_SIZES, DEMO_TRAIN
from fqexport.errors import ConfigError
from fqexport.metrics.group_metrics import group_metrics
from fqexport.pipeline.compress import compress
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.validation.gate import validate


def _measure(path: Path, test) -> tuple[int, float, float]:
    """(file bytes, worst-group accuracy %, overall accuracy %) of an ONNX file in ORT."""
    rep = validate(path, test, measure_latency=False, kernel_check=False)
    return path.stat().st_size, 100 * float(rep.metrics.group_min("accuracy")[1]), \
        100 * float(rep.metrics.overall["accuracy"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2.5,3,3.5", help="stored-bit budgets of the search")
    ap.add_argument("--bytes-fractions", default="0.75,0.85", help="byte budgets as shares of the uniform-W4 packed file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs of the demo model (no time budget)")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "fqexport-payoff",
                    help="the trained model is cached here")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    train_config = replace(DEMO_TRAIN, epochs=args.epochs, max_seconds=None)
    cached = args.work_dir / f"demo-seed{args.seed}-e{args.epochs}.pt"
    if cached.exists():  # the task is generated again (deterministic); training is skipped
        _, train, test = None, *make_image_task(DEMO_TASK_SIZES.n_train, DEMO_TASK_SIZES.n_test, DEMO_TASK_SIZES.size,
                                               DEMO_TASK_SIZES.minority_fraction, seed=args.seed)
        model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
        model.load_state_dict(torch.load(cached, weights_only=True))
        model.eval()
    else:
        model, train, test, _ = prepare_demo_model(seed=args.seed, progress=False, train_config=train_config)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached)
    calib = group_balanced_subset(train, 2 * DEMO_NUM_CALIB, seed=args.seed)
    print(f"trained the demo SmallResNet in {time.perf_counter() - t:.0f} s; calibration {len(calib)} images, "
          f"test {len(test)}", flush=True)
    base = QuantConfig(num_calib=DEMO_NUM_CALIB, seed=args.seed)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="payoff-"))

    compress_s = {}
    for w in (8, 4, 2):
        t = time.perf_counter()
        cm = compress(model, calib, replace(base, weight_bits=w), progress=False)
        compress_s[w] = time.perf_counter() - t
        if w == 8:
            f = group_metrics(cm.predict(test.x, quantized=False), test.y, test.group, test.group_names)
            print(f"float model (PyTorch): worst group {100 * f.group_min('accuracy')[1]:.2f} %, "
                  f"mean {100 * f.overall['accuracy']:.2f} %", flush=True)
        for storage in ("packed", "auto"):
            path = tmp / f"uniform_w{w}_{storage}.onnx"
            cm.export(path, storage=storage)
            size, worst, mean = _measure(path, test)
            rows.append({"model": f"uniform W{w}", "storage": storage, "budget": "-", "avg_bits": cm.avg_weight_bits,
                         "bytes": size, "worst": worst, "mean": mean, "seconds": compress_s[w], "fits": 1})
        print(f"uniform W{w}: compress {compress_s[w]:.1f} s", flush=True)

    w4 = next(r for r in rows if r["model"] == "uniform W4" and r["storage"] == "packed")["bytes"]
    budgets = [("bits", float(b)) for b in args.budgets.split(",")]
    budgets += [("bytes", float(f) * w4) for f in args.bytes_fractions.split(",")]
    table = None
    for kind, value in budgets:
        mp = MixedPrecisionConfig(**{f"budget_{kind}": value}, engine=EngineConfig(engine="serial"))
        label = f"{value:g} bits" if kind == "bits" else f"{value:.0f} B ({value / w4:.0%} of W4)"
        t = time.perf_counter()
        try:
            res = search_mixed_precision(model, calib, mp, base, progress=False, sensitivity=table)
        except ConfigError as err:  # e.g. a byte budget below the smallest file the search can write
            print(f"search {label}: {err}", flush=True)
            continue
        wall = time.perf_counter() - t
        first = table is None
        table = res.sensitivity
        path = tmp / f"search_{kind}_{value:g}.onnx"
        res.compressed.export(path)
        size, worst, mean = _measure(path, test)
        rows.append({"model": "search", "storage": res.storage, "budget": label, "avg_bits": res.allocation.avg_bits,
                     "stored_bits": res.allocation.stored_bits, "bytes": size, "worst": worst, "mean": mean,
                     "seconds": wall, "fits": res.fits, "fit_seconds": res.fit_seconds,
                     "sensitivity_s": res.seconds.get("sensitivity", 0.0) if first else 0.0,
                     "origin": res.chosen.origin, "fallback": res.fallback, "bits": dict(res.allocation.bits)})
        print(f"search {label}: {wall:.1f} s ({res.fits} fits, {res.fit_seconds:.1f} s; sensitivity "
              f"{res.seconds.get('sensitivity', 0.0):.1f} s), origin {res.chosen.origin}"
              + (f"; {res.fallback}" if res.fallback else ""), flush=True)

    print(f"\n{'model':<12} {'storage':<7} {'budget':<22} {'avg bits':>8} {'KB':>8} {'worst %':>8} {'mean %':>7} "
          f"{'s':>6} {'fits':>4}")
    for r in rows:
        print(f"{r['model']:<12} {r['storage']:<7} {r['budget']:<22} {r['avg_bits']:>8.3f} {r['bytes'] / 1e3:>8.1f} "
              f"{r['worst']:>8.2f} {r['mean']:>7.2f} {r['seconds']:>6.1f} {r['fits']:>4}")

    search = [r for r in rows if r["model"] == "search"]
    print("\ndominance (each uniform point, packed storage, vs the search points):")
    for u in (r for r in rows if r["model"].startswith("uniform") and r["storage"] == "packed"):
        smaller_eq = [s for s in search if s["bytes"] <= u["bytes"] and s["worst"] >= u["worst"]]
        better = [s for s in search if s["bytes"] <= u["bytes"] and s["worst"] > u["worst"]]
        no_larger = [s for s in search if s["bytes"] <= u["bytes"]]
        verdict = ("dominated (better worst group at no larger file)" if better else
                   "matched (equal worst group at no larger file)" if smaller_eq else
                   "not dominated" if no_larger else "no search point this small")
        best = max(no_larger, key=lambda s: s["worst"]) if no_larger else None
        extra = f"; best search point no larger: {best['budget']} {best['bytes'] / 1e3:.1f} KB, {best['worst']:.2f} %" \
            if best else ""
        print(f"  {u['model']} ({u['bytes'] / 1e3:.1f} KB, worst {u['worst']:.2f} %): {verdict}{extra}")
    w4row = next(r for r in rows if r["model"] == "uniform W4" and r["storage"] == "packed")
    for b in (s for s in search if s["budget"].endswith("of W4)")):
        print(f"\nbyte budget {b['budget']}: worst {b['worst']:.2f} % vs uniform W4 packed {w4row['worst']:.2f} % "
              f"({b['worst'] - w4row['worst']:+.2f} pt), {b['bytes'] / 1e3:.1f} KB vs {w4row['bytes'] / 1e3:.1f} KB")
    later = [s["seconds"] for s in search[1:]]
    print(f"search wall time: first {search[0]['seconds']:.1f} s (with the sensitivity pass), later "
          f"{', '.join(f'{s:.1f}' for s in later)} s (table reused); one compress at W4 {compress_s[4]:.1f} s "
          f"-> {search[0]['seconds'] / compress_s[4]:.1f}x / {max(later, default=0) / compress_s[4]:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
