"""Kernel-target benchmark (issue 16): the demo model per group under each int8 kernel target.

One run: trains the demo SmallResNet, exports ORT ``quantize_static`` W8A8 and fqexport W8A8
(default x86-safe weights, and full-range weights), and validates each on the test split under
``native`` (this CPU), emulated ``x86-avx2`` and emulated ``x86-vnni``. Prints per-group accuracy,
emulated-vs-native agreement (bit-identical logits and top-1) and the cost of ``validate`` with
one emulated target vs native only.

    .venv/bin/python benchmarks/isa_bench.py [--out-dir bench-out/isa] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fqexport.calibration.sampling import group_balanced_subset
from fqexport.cli.common import print_table
from fqexport.config import QuantConfig
from fqexport.demo.run import (
    DEMO_NUM_CALIB,
    ort_quantize_static_baseline,
    prepare_demo_model,
)
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.kernel_emulation import EmulatedSession
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.exporters.qdq_onnx import export_float, export_qdq
from fqexport.pipeline.compress import compress
from fqexport.validation.gate import validate

TARGETS = ("x86-avx2", "x86-vnni")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path("bench-out/isa"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    isa = cpu_isa()
    print(f"CPU instruction set: {isa} (int8 kernel family {kernel_family(isa)})")

    model, train, test, t_train = prepare_demo_model(seed=args.seed, progress=False)
    print(f"trained demo model in {t_train:.1f} s; test {len(test)} samples, groups {test.group_names}")
    calib = group_balanced_subset(train, 2 * DEMO_NUM_CALIB, seed=args.seed)
    float_path = out / "float.onnx"
    export_float(model, torch.from_numpy(test.x[:2]), float_path)
    paths = {"float": float_path,
             "ORT quantize_static W8A8": ort_quantize_static_baseline(float_path, calib, out / "ort_w8a8.onnx")}
    for label, cfg in (("fqexport W8A8", QuantConfig(weight_bits=8)),
                       ("fqexport W8A8 full-range", QuantConfig(weight_bits=8, weight_range="full", target="x86-vnni"))):
        cm = compress(model, calib, replace(cfg, num_calib=DEMO_NUM_CALIB, seed=args.seed), progress=False)
        paths[label] = export_qdq(cm, out / (label.replace(" ", "_") + ".onnx")).path

    rows, agree_rows, record = [], [], {"cpu_isa": isa, "models": {}}
    for label, path in paths.items():
        r = validate(path, test, targets=TARGETS, measure_latency=False, threads=args.threads)
        native = run_batches(make_session(path, threads=args.threads), test.x, 256)
        rec = {"native": r.metrics.to_dict(), "unoptimized": r.unoptimized_metrics.to_dict()}
        for target in ("native", *TARGETS):
            m = r.metrics if target == "native" else r.target_metrics[target]
            row = {"model": label, "target": f"native ({isa})" if target == "native" else f"{target} (emulated)"}
            for g, v in m.by_group.items():
                row[f"{g} %"] = f"{100 * v['accuracy']:.2f}"
            row["worst %"] = f"{100 * m.group_min('accuracy')[1]:.2f}"
            rows.append(row)
            if target != "native":
                emu = run_batches(EmulatedSession(path, target, threads=args.threads), test.x, 256)
                exact = float((np.abs(emu - native).max(axis=1) == 0).mean())
                top1 = float((emu.argmax(1) == native.argmax(1)).mean())
                agree_rows.append({"model": label, "target": target, "bit-identical logits %": f"{100 * exact:.2f}",
                                   "top-1 agreement %": f"{100 * top1:.2f}",
                                   "max |Δlogit|": f"{float(np.abs(emu - native).max()):.4g}"})
                rec[target] = {"metrics": m.to_dict(), "bit_identical": exact, "top1_agreement": top1}
        record["models"][label] = rec

    print("\nper-group accuracy on the test split")
    print_table(rows, list(rows[0]))
    print("\nemulated vs native (this CPU)")
    print_table(agree_rows, list(agree_rows[0]))

    path = paths["fqexport W8A8"]
    times = {}
    for name, targets in (("native only", ("native",)), ("native + x86-avx2", ("native", "x86-avx2"))):
        t = time.perf_counter()
        validate(path, test, targets=targets, measure_latency=False, threads=args.threads)
        times[name] = time.perf_counter() - t
    print("\nvalidate time (fqexport W8A8, no latency, "
          f"{len(test)} samples, {args.threads} thread): "
          + "; ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    record["validate_seconds"] = times
    record["table"], record["agreement"] = rows, agree_rows
    (out / "isa_bench.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
