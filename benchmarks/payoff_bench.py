"""Does the mixed-precision search pay off? File size and worst-group accuracy in ONNX Runtime.

    .venv/bin/python benchmarks/payoff_bench.py --task demo --json payoff-demo.json
    .venv/bin/python benchmarks/payoff_bench.py --task two-minority --json payoff-two.json
    .venv/bin/python benchmarks/payoff_bench.py --resnet18 --json payoff-resnet18.json

``--task demo``: the demo task (10 % inverted-contrast minority), ``--task two-minority``:
``make_two_minority_task`` (6 % rotated, 6 % dim-noisy), both at the demo's sizes (8000 train /
3000 test, 32x32). The task's SmallResNet is trained with ``DEMO_TRAIN`` but ``--epochs``
(default 10) and no time budget, so the model does not depend on the machine's load; cached in
``--work-dir`` (``--train-only`` trains and stops). Calibration = a group-balanced 1024 training
images, ``num_calib`` 512, as ``fqexport demo`` uses. For

* uniform W8 / W4 / W2 (one ``compress`` per width), exported with ``storage="packed"`` (the
  smallest file: INT4/INT2 containers) and with the default storage (``"auto"``: int8 convs);
* the search at byte budgets of 75 % and 85 % of the uniform-W4 packed file (first: the headline
  figure) and at stored-bit budgets (default 2.5, 3, 3.5; storage ``packed``),

it writes the ONNX file, validates it in ORT on the test images
(``fqexport.validate(..., measure_latency=False)``) and prints file size, worst-group and mean
accuracy, wall time and fits; the rows go to ``--json`` after every step. Then: does the search
dominate uniform (for each uniform packed point, a search point with a file no larger and a worst
group at least as good, or better at no larger size), and the search's wall time against one
``compress`` at W4 in the same run. Serial engine; accuracies are ORT's optimized session.

``--resnet18``: only one ``compress`` at W4 and one search at 3 stored bits on a random-init
ResNet-18 (64x64 demo-task images, 2 groups, ``--resnet18-calib`` images), same run: the ratio
and the number of fits.
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
from resnet18 import resnet18  # benchmarks/ is on sys.path when this script runs

from fqexport.calibration.sampling import group_balanced_subset
from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
from fqexport.demo.models import SmallResNet
from fqexport.demo.run import DEMO_NUM_CALIB
from fqexport.demo.task import make_image_task, make_two_minority_task
from fqexport.demo.training import DEMO_TASK_SIZES, DEMO_TRAIN, train_classifier
from fqexport.errors import ConfigError
from fqexport.exporters.cpu_isa import cpu_isa
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.metrics.group_metrics import group_metrics
from fqexport.pipeline.compress import compress
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.validation.gate import validate


def _measure(path: Path, test) -> tuple[int, float, float]:
    """(file bytes, worst-group accuracy %, overall accuracy %) of an ONNX file in ORT."""
    rep = validate(path, test, measure_latency=False, kernel_check=False)
    return path.stat().st_size, 100 * float(rep.metrics.group_min("accuracy")[1]), \
        100 * float(rep.metrics.overall["accuracy"])


def _dump(path: Path | None, rows: list[dict]) -> None:
    """Write the rows so far (a long run that is stopped keeps what it measured)."""
    if path is not None:
        path.write_text(json.dumps(rows, indent=1, default=str))


def _task(name: str, seed: int):
    """``(train, test)`` of the demo task or the two-minority task (same sizes as the demo)."""
    sz = DEMO_TASK_SIZES
    if name == "demo":
        return make_image_task(sz.n_train, sz.n_test, sz.size, sz.minority_fraction, seed=seed)
    return make_two_minority_task(sz.n_train, sz.n_test, sz.size, seed=seed)


def _trained_model(args) -> tuple[SmallResNet, object, object]:
    """The task's SmallResNet trained with ``DEMO_TRAIN`` at ``--epochs`` and no time budget
    (so the model does not depend on the machine's load), cached in ``--work-dir``."""
    train, test = _task(args.task, args.seed)
    cached = args.work_dir / f"{args.task}-seed{args.seed}-e{args.epochs}.pt"
    torch.manual_seed(args.seed)
    model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
    if cached.exists():  # the task is generated again (deterministic); training is skipped
        model.load_state_dict(torch.load(cached, weights_only=True))
    else:
        model = train_classifier(model, train, replace(DEMO_TRAIN, epochs=args.epochs, max_seconds=None),
                                 progress=False)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached)
    return model.eval(), train, test


def resnet18_search_time(args) -> dict:
    """One ``compress`` at W4 and one ``search_mixed_precision`` at 3 stored bits on a random-init
    ResNet-18 (10 classes, 64x64 inputs of the demo task: 2 groups), same run, serial engine;
    ``--resnet18-calib`` calibration images (group-balanced)."""
    train, _ = make_image_task(2 * args.resnet18_calib, 100, 64, DEMO_TASK_SIZES.minority_fraction, seed=args.seed)
    calib = group_balanced_subset(train, args.resnet18_calib, seed=args.seed)
    model = resnet18(num_classes=int(train.y.max()) + 1, seed=args.seed).eval()
    base = QuantConfig(num_calib=args.resnet18_calib // 2, seed=args.seed)
    t = time.perf_counter()
    compress(model, calib, replace(base, weight_bits=4), progress=False)
    one = time.perf_counter() - t
    print(f"ResNet-18: one compress at W4 {one:.1f} s", flush=True)
    mp = MixedPrecisionConfig(budget_bits=3.0, engine=EngineConfig(engine="serial"))
    t = time.perf_counter()
    res = search_mixed_precision(model, calib, mp, base, progress=False)
    wall = time.perf_counter() - t
    row = {"model": "ResNet-18", "calib": len(calib), "compress_w4_s": one, "search_s": wall, "ratio": wall / one,
           "fits": res.fits, "fit_seconds": res.fit_seconds, "sensitivity_s": res.seconds.get("sensitivity", 0.0),
           "stored_bits": res.allocation.stored_bits, "origin": res.chosen.origin}
    print(f"ResNet-18: search at 3 stored bits {wall:.1f} s = {wall / one:.1f}x one compress ({res.fits} fits, "
          f"{res.fit_seconds:.1f} s; sensitivity {row['sensitivity_s']:.1f} s), stored bits "
          f"{res.allocation.stored_bits:.3f}, origin {res.chosen.origin}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2.5,3,3.5", help="stored-bit budgets of the search")
    ap.add_argument("--bytes-fractions", default="0.75,0.85", help="byte budgets as shares of the uniform-W4 packed file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--task", choices=("demo", "two-minority"), default="demo",
                    help="the demo task (10%% inverted contrast) or the two-minority task (6%% rotated, 6%% dim-noisy)")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs of the task's model (no time budget)")
    ap.add_argument("--train-only", action="store_true", help="train (and cache) the model, then stop")
    ap.add_argument("--resnet18", action="store_true",
                    help="only time one compress W4 and one search at 3 stored bits on a random-init ResNet-18")
    ap.add_argument("--resnet18-calib", type=int, default=512, help="ResNet-18 calibration images")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "fqexport-payoff",
                    help="the trained model is cached here")
    args = ap.parse_args(argv)

    print(f"CPU: {cpu_isa()}", flush=True)
    if args.resnet18:
        row = resnet18_search_time(args)
        if args.json:
            args.json.write_text(json.dumps([row], indent=1, default=str))
        return 0
    t = time.perf_counter()
    model, train, test = _trained_model(args)
    if args.train_only:
        print(f"trained the {args.task} SmallResNet in {time.perf_counter() - t:.0f} s", flush=True)
        return 0
    calib = group_balanced_subset(train, 2 * DEMO_NUM_CALIB, seed=args.seed)
    print(f"trained the {args.task} SmallResNet in {time.perf_counter() - t:.0f} s; calibration {len(calib)} images, "
          f"test {len(test)}", flush=True)
    base = QuantConfig(num_calib=DEMO_NUM_CALIB, seed=args.seed)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="payoff-"))

    compress_s = {}
    for w in (8, 4, 2):
        for storage in ("packed", "auto"):  # the container is decided in compress: one fit per storage
            t = time.perf_counter()
            cm = compress(model, calib, replace(base, weight_bits=w, storage=storage), progress=False)
            compress_s.setdefault(w, time.perf_counter() - t)
            if w == 8 and storage == "packed":
                f = group_metrics(cm.predict(test.x, quantized=False), test.y, test.group, test.group_names)
                print(f"float model (PyTorch): worst group {100 * f.group_min('accuracy')[1]:.2f} %, "
                      f"mean {100 * f.overall['accuracy']:.2f} %", flush=True)
            path = tmp / f"uniform_w{w}_{storage}.onnx"
            export_qdq(cm, path)
            size, worst, mean = _measure(path, test)
            rows.append({"model": f"uniform W{w}", "storage": storage, "budget": "-", "avg_bits": cm.avg_weight_bits,
                         "bytes": size, "worst": worst, "mean": mean, "seconds": compress_s[w], "fits": 1})
            _dump(args.json, rows)
        print(f"uniform W{w}: compress {compress_s[w]:.1f} s", flush=True)

    w4 = next(r for r in rows if r["model"] == "uniform W4" and r["storage"] == "packed")["bytes"]
    # the byte budgets first: 75 % of the W4 file is the headline figure of a run that is stopped early
    budgets = [("bytes", float(f) * w4) for f in args.bytes_fractions.split(",")]
    budgets += [("bits", float(b)) for b in args.budgets.split(",")]
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
        export_qdq(res.compressed, path)
        size, worst, mean = _measure(path, test)
        rows.append({"model": "search", "storage": res.storage, "budget": label, "avg_bits": res.allocation.avg_bits,
                     "stored_bits": res.allocation.stored_bits, "bytes": size, "worst": worst, "mean": mean,
                     "seconds": wall, "fits": res.fits, "fit_seconds": res.fit_seconds,
                     "sensitivity_s": res.seconds.get("sensitivity", 0.0) if first else 0.0,
                     "origin": res.chosen.origin, "fallback": res.fallback, "bits": dict(res.allocation.bits)})
        _dump(args.json, rows)
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
    _dump(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
