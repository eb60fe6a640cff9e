"""The GPU target (issue 24) on a CPU-only machine, two figures:

1. ``rules``: every coverage-bench model (benchmarks/coverage_bench.py: ResNet-18, MobileNet-V2,
   ConvNeXt-, DeiT-tiny-shaped, text transformer, UNet; random seeded weights, 32x32 inputs)
   compressed for ``target="gpu"`` at W8A8 and W4, exported (the export runs
   :func:`~fqexport.exporters.gpu_rules.check_gpu_qdq` and refuses a violation), then checked
   again on the written file; beside it the violations of the same model's CPU (``portable``)
   W8A8 file, which the rules must refuse (uint8 pairs, MatMulNBits).
2. ``demo``: the demo task (make_image_task + SmallResNet + train_classifier, a short schedule)
   compressed at W8A8 for ``portable`` (U8S8) and for ``gpu`` (S8S8) from the same calibration
   subset, each file validated per group in ONNX Runtime's optimized CPU session (and the graph's
   own math, optimizations off), on a test split with ``--n-test`` images.

    .venv/bin/python benchmarks/gpu_target_bench.py rules [--only ResNet-18 ...] [--variants W8A8 W4]
    .venv/bin/python benchmarks/gpu_target_bench.py demo [--epochs 4] [--n-test 6000] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage_bench import VARIANTS, bench_models  # noqa: E402

from fqexport.calibration.sampling import group_balanced_subset  # noqa: E402
from fqexport.cli.common import print_table  # noqa: E402
from fqexport.config import QuantConfig  # noqa: E402
from fqexport.exporters.cpu_isa import cpu_isa  # noqa: E402
from fqexport.exporters.gpu_rules import check_gpu_qdq  # noqa: E402
from fqexport.exporters.qdq_onnx import export_float, export_qdq  # noqa: E402
from fqexport.graph.act_quant import ActQuantizer  # noqa: E402
from fqexport.pipeline.compress import compress  # noqa: E402
from fqexport.validation.gate import validate  # noqa: E402


def _rules_row(name: str, variant: str, model, data, out: Path, method: str) -> dict:
    row = {"model": name, "variant": variant}
    config = replace(VARIANTS[variant], target="gpu", method=method)
    t0 = time.perf_counter()
    try:
        cm = compress(model, data, config, progress=False)
        res = export_qdq(cm, out / f"{name.split()[0].lower()}_{variant}_gpu.onnx")
    except Exception as err:  # noqa: BLE001 - a model that fails is a row
        row.update(export=f"FAIL {type(err).__name__}: {str(err)[:300]}")
        return row
    proto = onnx.load(str(res.path))
    qs = [m for m in cm.reference.modules() if isinstance(m, ActQuantizer)]
    containers = list(res.storage.values())
    row.update(
        export="ok", violations=str(len(check_gpu_qdq(proto))), agreement=f"{100 * res.agreement:.2f}%",
        pairs=f"{len(qs)} (int8 zp 0: {sum(q.symmetric and q.zero_point == 0 for q in qs)})",
        layers=f"int8 {containers.count('int8')}, int4-blocked {containers.count('int4-blocked')}",
        seconds=f"{time.perf_counter() - t0:.0f}",
    )
    if variant == "W8A8":  # the CPU file of the same model, which the rules must refuse
        cpu = compress(model, data, replace(config, target="portable"), progress=False)
        cpu_res = export_qdq(cpu, out / f"{name.split()[0].lower()}_{variant}_cpu.onnx", check=False)
        found = check_gpu_qdq(onnx.load(str(cpu_res.path)))
        row["cpu file"] = f"{len(found)} violations ({', '.join(sorted({v.rule for v in found}))})"
    return row


def rules(args) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, model, data in bench_models(args.only, n=args.n):
        for variant in args.variants:
            row = _rules_row(name, variant, model, data, out, args.method)
            print(row, flush=True)
            rows.append(row)
    print(f"\n## TensorRT / CUDA EP rules on the coverage models (target gpu, method {args.method}, "
          f"{args.n} samples, CPU {cpu_isa()})\n")
    print_table(rows, ["model", "variant", "export", "violations", "agreement", "pairs", "layers", "seconds", "cpu file"])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _demo_model(args):
    from fqexport.demo.models import SmallResNet
    from fqexport.demo.task import make_image_task
    from fqexport.demo.training import DEMO_TASK_SIZES, DEMO_TRAIN, train_classifier

    s = DEMO_TASK_SIZES
    train, test = make_image_task(s.n_train, args.n_test, s.size, s.minority_fraction, seed=args.seed)
    torch.manual_seed(args.seed)
    model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
    path = Path(args.cache) / f"gpu_bench_demo_seed{args.seed}_ep{args.epochs}.pt" if args.cache else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), train, test, f"loaded from {path}"
    t = time.perf_counter()
    model = train_classifier(model, train, replace(DEMO_TRAIN, epochs=args.epochs, max_seconds=None), progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), train, test, f"trained {args.epochs} epochs in {time.perf_counter() - t:.0f} s"


def demo(args) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, train, test, how = _demo_model(args)
    print(f"demo SmallResNet: {how}; test split {len(test.x)} images")
    calib = group_balanced_subset(train, 512, seed=args.seed)
    float_path = export_float(model, torch.from_numpy(test.x[:2]), out / "demo_float.onnx").path
    m = validate(float_path, test, measure_latency=False, kernel_check=False).metrics
    rows = [{"file": "float", **{f"{g} % (n={int(v['count'])})": f"{100 * v['accuracy']:.2f}" for g, v in m.by_group.items()}}]
    acc = {}
    for label, target in (("U8S8 (portable)", "portable"), ("S8S8 (gpu)", "gpu")):
        cm = compress(model, calib, QuantConfig(num_calib=512, target=target), progress=False)
        res = export_qdq(cm, out / f"demo_w8a8_{target}.onnx")
        rep = validate(res.path, test, measure_latency=False)
        acc[target] = {g: v["accuracy"] for g, v in rep.metrics.by_group.items()}
        row = {"file": label, "export agreement": f"{100 * res.agreement:.2f}%"}
        for g, v in rep.metrics.by_group.items():
            row[f"{g} % (n={int(v['count'])})"] = f"{100 * v['accuracy']:.2f}"
            row[f"{g} % graph"] = f"{100 * rep.unoptimized_metrics.by_group[g]['accuracy']:.2f}"
        row["gpu rules"] = "-" if rep.gpu_rule_violations is None else f"{len(rep.gpu_rule_violations)} violations"
        rows.append(row)
    print(f"\n## Demo W8A8: per-group accuracy, ONNX Runtime optimized CPU session ({cpu_isa()}) "
          "and the graph's math (optimizations off)\n")
    print_table(rows, list(rows[1].keys()))
    for g in acc["gpu"]:
        print(f"{g}: S8S8 - U8S8 = {100 * (acc['gpu'][g] - acc['portable'][g]):+.2f} pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    r = sub.add_parser("rules", help="the structural check on the coverage-bench models")
    r.add_argument("--only", nargs="*", help="model names (default: all)")
    r.add_argument("--variants", nargs="*", default=["W8A8", "W4"], choices=list(VARIANTS))
    r.add_argument("--method", default="solver", choices=("solver", "rtn"))
    r.add_argument("--n", type=int, default=128, help="task samples per model")
    r.add_argument("--json", help="also write the rows here")
    d = sub.add_parser("demo", help="per-group accuracy of S8S8 vs U8S8 on the demo task")
    d.add_argument("--epochs", type=int, default=10, help="training epochs (the demo's schedule: 10)")
    d.add_argument("--n-test", type=int, default=6000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cache", default=None, help="folder caching the trained demo model")
    for p in (r, d):
        p.add_argument("--out-dir", default="bench-out/gpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rules(args) if args.part == "rules" else demo(args)


if __name__ == "__main__":
    main()
