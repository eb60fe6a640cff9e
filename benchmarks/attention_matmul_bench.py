"""Issue 12: should the attention's activation MatMuls (Q·Kᵀ and softmax·V) be quantized?

The exporter quantizes every Linear of a transformer (q/k/v/out projections, MLP) and leaves
the two activation×activation MatMuls of attention in float. This benchmark measures the
alternative on the small ViT of ``vit_bench.py`` trained on the demo task:

1. fqexport W8A8 export (the default: attention MatMuls float);
2. the same file with uint8 QuantizeLinear→DequantizeLinear pairs inserted on both inputs and
   the output of every activation×activation MatMul (per-tensor asymmetric ranges from the
   calibration set's min/max, the softmax probabilities on [0, 1] with zero point 0) — the
   form ORT needs to run ``QLinearMatMul``/``MatMulInteger``.

For each: accuracy per group in ORT's optimized session (``fqexport.validate``), the kernels ORT
ran, and latency at batch 1 and 32 (median of repeated runs). The default stays float if
quantizing them costs a group accuracy or buys no speed.

    .venv/bin/python benchmarks/attention_matmul_bench.py [--epochs 40] [--out DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from vit_bench import train_vit, vit_arguments

import fqexport
from fqexport.calibration.sampling import group_balanced_subset
from fqexport.exporters.cpu_isa import cpu_isa
from fqexport.exporters.ort_session import fused_kernels, kernel_line


def activation_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose two inputs are both computed (no initializer, no constant DQ)."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    # A DequantizeLinear of an initializer is a weight, not an activation.
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    return [n for n in model.graph.node if n.op_type == "MatMul" and not (set(n.input) & consts)]


def tensor_ranges(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, tuple[float, float]]:
    """min/max of each named tensor over ``x`` (graph optimizations off: the graph's own math)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for start in range(0, len(x), 128):
        outs = sess.run(names, {sess.get_inputs()[0].name: x[start:start + 128]})
        for n, v in zip(names, outs):
            lo[n] = min(lo[n], float(v.min()))
            hi[n] = max(hi[n], float(v.max()))
    return {n: (lo[n], hi[n]) for n in names}


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8: range [min(lo, 0), max(hi, 0)] onto 0..255, zero point on the grid."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def insert_qdq(model: onnx.ModelProto, calib_x: np.ndarray) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with uint8 Q→DQ on the inputs and output of each activation MatMul."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = activation_matmuls(out)
    names = sorted({t for n in nodes for t in (*n.input, n.output[0])})
    ranges = tensor_ranges(out, names, calib_x)
    graph = out.graph
    for name in names:
        scale, zp = uint8_params(*ranges[name])
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}_am_scale"),
                                  numpy_helper.from_array(np.array(zp, np.uint8), f"{name}_am_zp")])
    new_nodes: list[onnx.NodeProto] = []
    target = {id(n) for n in nodes}
    for node in graph.node:
        if id(node) not in target:
            new_nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            q, dq = f"{name}_am_q_{node.name}", f"{name}_am_dq_{node.name}"
            new_nodes.append(helper.make_node("QuantizeLinear", [name, f"{name}_am_scale", f"{name}_am_zp"], [q]))
            new_nodes.append(helper.make_node("DequantizeLinear", [q, f"{name}_am_scale", f"{name}_am_zp"], [dq]))
            node.input[i] = dq
        y = node.output[0]
        raw = f"{y}_am_raw"
        node.output[0] = raw
        new_nodes.append(node)
        new_nodes.append(helper.make_node("QuantizeLinear", [raw, f"{y}_am_scale", f"{y}_am_zp"], [f"{y}_am_yq"]))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{y}_am_yq", f"{y}_am_scale", f"{y}_am_zp"], [y]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.checker.check_model(out)
    return out, len(nodes)


def median_latency_ms(path: Path, sample: np.ndarray, batch: int, repeats: int = 30) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.repeat(sample[:1], batch, axis=0)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    args = vit_arguments(__doc__, "attention_matmul_bench_")
    out = args.out
    model, train, test, seconds = train_vit(args)
    print(f"trained TinyViT: {args.epochs} epochs, {seconds:.1f} s")
    calib = group_balanced_subset(train, 1024, seed=0)
    float_path = out / "float.onnx"
    fqexport.export_float(model, torch.from_numpy(test.x[:2]), float_path)
    w8_path = out / "w8a8.onnx"
    fqexport.compress(model, calib, fqexport.QuantConfig(weight_bits=8), progress=False).export(w8_path)
    am_model, count = insert_qdq(onnx.load(w8_path), calib.x)
    am_path = out / "w8a8_attention_matmuls.onnx"
    onnx.save(am_model, am_path)
    print(f"quantized {count} activation MatMuls (Q·Kᵀ and softmax·V of each head group)")

    rows = []
    for label, path in (("float", float_path), ("W8A8, attention MatMuls float (default)", w8_path),
                        ("W8A8, attention MatMuls u8", am_path)):
        report = fqexport.validate(path, test, reference=None if label == "float" else float_path,
                                   measure_latency=False)
        lat = [median_latency_ms(path, test.x, b) for b in (1, 32)]
        rows.append((label, report, lat, kernel_line(fused_kernels(path))))
    groups = list(rows[0][1].metrics.by_group)
    print(f"\nCPU: {cpu_isa()}; test: {len(test)} images, "
          + ", ".join(f"{g} n={int((test.group == i).sum())}" for i, g in enumerate(test.group_names)))
    print("| model | " + " | ".join(f"{g} %" for g in groups) + " | worst % | ms b1 | ms b32 | kernels |")
    print("|---|" + "---:|" * (len(groups) + 3) + "---|")
    for label, report, lat, kernels in rows:
        m = report.metrics
        accs = " | ".join(f"{100 * m.by_group[g]['accuracy']:.2f}" for g in groups)
        print(f"| {label} | {accs} | {100 * m.group_min('accuracy')[1]:.2f} | {lat[0]:.3f} | {lat[1]:.2f} | {kernels} |")
    base, quant = rows[1], rows[2]
    drops = {g: 100 * (base[1].metrics.by_group[g]["accuracy"] - quant[1].metrics.by_group[g]["accuracy"])
             for g in groups}
    print("\nquantizing the attention MatMuls: accuracy change per group (pt) "
          + ", ".join(f"{g} {-d:+.2f}" for g, d in drops.items())
          + f"; speed vs default b1 {base[2][0] / quant[2][0]:.2f}×, b32 {base[2][1] / quant[2][1]:.2f}×")


if __name__ == "__main__":
    main()
