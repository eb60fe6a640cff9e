"""Issue 24: does int8 buy speed on this CPU, where does the time go, and how fast is the emulation.

    .venv/bin/python benchmarks/latency_bench.py                          # every section
    .venv/bin/python benchmarks/latency_bench.py --sections latency profile --models resnet18
    .venv/bin/python benchmarks/latency_bench.py --sections emulation --images 10000

Models: ``demo`` (the demo's trained SmallResNet, 32x32, reused from ``--demo-cache`` when an
earlier ``fqexport demo`` trained it there) and ``resnet18`` (the ResNet-18-size CNN of
``benchmarks/resnet18.py``, random weights, 3x64x64). For each: the fp32 file, fqexport W8A8 (the
default ``QuantConfig(weight_bits=8)``: x86-safe weights), ORT ``quantize_static`` U8S8
per-channel as a user runs it (full-range weights) and with ``reduce_range=True`` (ORT's advice
for CPUs without VNNI).

Sections:

- ``latency``: p50 ms of each file at batch 1 and 32 with ``--threads`` intra-op threads, each
  timed interleaved with the fp32 file (``measure_latency_pair``) so the ratio holds on a shared
  machine; ratio < 1 is faster than fp32.
- ``profile``: ORT's per-node profile of the fp32 and fqexport W8A8 files at batch 32, summed by
  op type (where the time goes; ``--threads`` threads).
- ``emulation``: ``validate`` of the full-range ``quantize_static`` file of ``resnet18`` on
  ``--images`` random images, native only vs ``--target`` (each a fresh process; when the host's
  own family is the target, the host is declared another family with FQEXPORT_HOST_KERNELS so
  the target is really emulated), and the emulated outputs against the native ones.

The CPU's instruction set heads the output.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.npz import save_npz
from fqexport.cli.common import print_table
from fqexport.config import QuantConfig
from fqexport.demo.run import ort_quantize_static_baseline, prepare_demo_model
from fqexport.exporters.cpu_isa import cpu_isa, kernel_family
from fqexport.exporters.ort_session import make_session
from fqexport.exporters.qdq_onnx import export_float, export_qdq
from fqexport.pipeline.compress import compress
from fqexport.validation.latency import measure_latency_pair

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet18 import resnet18  # noqa: E402

FILES = ("fp32", "fqexport W8A8", "quantize_static", "quantize_static reduce_range")
RESULTS: dict[str, list[dict]] = {"latency": [], "emulation": []}  # --json: the key figures


def _models(names: list[str], demo_cache: Path) -> dict[str, tuple[torch.nn.Module, GroupData]]:
    """name -> (float model, calibration data)."""
    out = {}
    if "demo" in names:
        model, train, _test, _ = prepare_demo_model(progress=False, cache_dir=demo_cache)
        out["demo"] = (model, train.take(np.arange(min(256, len(train)))))
    if "resnet18" in names:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 3, 64, 64)).astype(np.float32)
        out["resnet18"] = (resnet18(num_classes=10, seed=0).eval(),
                           GroupData(x, rng.integers(0, 10, 64), rng.integers(0, 2, 64), ("a", "b"), "random"))
    return out


def _export_all(name: str, model: torch.nn.Module, calib: GroupData, d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    f = export_float(model, torch.from_numpy(calib.x[:2]), d / "fp32.onnx").path
    cm = compress(model, calib, QuantConfig(weight_bits=8, num_calib=len(calib)), progress=False)
    files = {"fp32": f, "fqexport W8A8": export_qdq(cm, d / "w8a8.onnx").path,
             "quantize_static": ort_quantize_static_baseline(f, calib, d / "qs.onnx"),
             "quantize_static reduce_range": ort_quantize_static_baseline(f, calib, d / "qs_rr.onnx", reduce_range=True)}
    print(f"  {name}: " + ", ".join(f"{k} {p.stat().st_size / 1e6:.2f} MB" for k, p in files.items()), flush=True)
    return files


def latency(models, files, threads: int, repeats: int) -> None:
    rows = []
    for name, (_m, calib) in models.items():
        sessions = {k: make_session(p, threads=threads) for k, p in files[name].items()}
        for b in (1, 32):
            row = {"model": name, "batch": b}
            for k in FILES[1:]:
                got, ref = measure_latency_pair(sessions[k], sessions["fp32"], calib.x, b, warmup=10,
                                                repeats=repeats)
                row[f"fp32 ms ({k})"] = ref.p50_ms
                row[k] = f"{got.p50_ms:.3f} ms = {got.p50_ms / ref.p50_ms:.2f}x"
                RESULTS["latency"].append({"model": name, "batch": b, "file": k, "ratio_vs_fp32": got.p50_ms / ref.p50_ms})
            fp32 = [v for c, v in row.items() if c.startswith("fp32 ms")]
            row = {"model": name, "batch": b, "fp32 ms": f"{np.median(fp32):.3f}",
                   **{k: row[k] for k in FILES[1:]}}
            rows.append(row)
    print(f"\n== latency, p50, {threads} thread(s), each file interleaved with fp32 (x = its time / fp32's)")
    print_table(rows, list(rows[0]))


def _profile(path: Path, x: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    """Mean ms per run by op type, from ORT's node profile."""
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: x}
    for _ in range(3):
        s.run(None, feed)
    for _ in range(runs):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3
    return {k: v / (runs + 3) for k, v in by_op.items()}


def profile(models, files, threads: int) -> None:
    for name, (_m, calib) in models.items():
        x = np.ascontiguousarray(calib.x[np.arange(32) % len(calib)])
        table = {k: _profile(files[name][k], x, threads, 10) for k in ("fp32", "fqexport W8A8", "quantize_static reduce_range")}
        ops = sorted({o for t in table.values() for o in t}, key=lambda o: -max(t.get(o, 0) for t in table.values()))
        rows = [{"op": o, **{k: f"{t[o]:.3f}" if o in t else "" for k, t in table.items()}} for o in ops]
        rows.append({"op": "sum", **{k: f"{sum(t.values()):.3f}" for k, t in table.items()}})
        print(f"\n== {name}: ms per batch-32 run by op type (ORT profile, {threads} thread(s))")
        print_table(rows, list(rows[0]))


def _validate_seconds(path: Path, data: Path, targets: list[str], host: str | None) -> tuple[float, str]:
    env = dict(os.environ)
    if host:
        env["FQEXPORT_HOST_KERNELS"] = host
    cmd = [sys.executable, "-m", "fqexport.cli.main", "validate", str(path), "--data", str(data), "--no-latency",
           "--no-kernel-check", "--report-dir", str(data.parent / f"report-{'-'.join(targets) or 'native'}")]
    for t in targets:
        cmd += ["--target", t]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, done.stdout + done.stderr


def emulation(files, images: int, targets: list[str], d: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((images, 3, 64, 64)).astype(np.float32)
    native = make_session(files["resnet18"]["fp32"])
    y = np.concatenate([native.run(None, {native.get_inputs()[0].name: x[i:i + 500]})[0].argmax(1)
                        for i in range(0, images, 500)])
    data = d / f"test{images}.npz"
    save_npz(GroupData(x, y, rng.integers(0, 2, images), ("a", "b"), "random"), data)
    path = files["resnet18"]["quantize_static"]
    base, _ = _validate_seconds(path, data, [], None)
    rows = [{"validate": "native only", "wall s": f"{base:.1f}", "x native-only": "1.00"}]
    host = kernel_family(cpu_isa())
    for t in targets:
        declared = next(f for f in ("x86-vnni", "x86-avx2") if f != t) if t == host else None
        secs, out = _validate_seconds(path, data, [t], declared)
        rows.append({"validate": f"--target {t}" + (f" (host declared {declared})" if declared else ""),
                     "wall s": f"{secs:.1f}", "x native-only": f"{secs / base:.2f}"})
        RESULTS["emulation"].append({"target": t, "images": images, "native_s": base, "emulated_s": secs})
        print(out.strip().splitlines()[-1] if out.strip() else "", flush=True)
    print(f"\n== validate of resnet18's quantize_static (full-range) file on {images} images, --no-latency "
          "--no-kernel-check, a fresh process each (import and reading included)")
    print_table(rows, list(rows[0]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", choices=("latency", "profile", "emulation"),
                   default=["latency", "profile", "emulation"])
    p.add_argument("--models", nargs="+", choices=("demo", "resnet18"), default=["demo", "resnet18"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--targets", nargs="+", default=["x86-avx2"])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fqexport-latency-bench")
    p.add_argument("--demo-cache", type=Path, default=Path(tempfile.gettempdir()) / "fqexport-latency-bench" / "demo")
    p.add_argument("--json", type=Path, help="also write the key figures here")
    a = p.parse_args(argv)
    print(f"CPU instruction set: {cpu_isa()} (int8 kernel family {kernel_family(cpu_isa())}); "
          f"onnxruntime {ort.__version__}; {os.cpu_count()} CPUs", flush=True)
    names = sorted(set(a.models) | ({"resnet18"} if "emulation" in a.sections else set()))
    models = _models(names, a.demo_cache)
    files = {n: _export_all(n, m, c, a.dir / n) for n, (m, c) in models.items()}
    shown = {n: v for n, v in models.items() if n in a.models}
    if "latency" in a.sections:
        latency(shown, files, a.threads, a.repeats)
    if "profile" in a.sections:
        profile(shown, files, a.threads)
    if "emulation" in a.sections:
        emulation(files, a.images, a.targets, a.dir)
    if a.json:
        a.json.write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
