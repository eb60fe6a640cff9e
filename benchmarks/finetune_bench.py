"""Fine-tuning after PTQ on the demo CNN: W2 uniform PTQ vs three fine-tunes, in ONNX Runtime.

    .venv/bin/python benchmarks/finetune_bench.py                    # small default run
    .venv/bin/python benchmarks/finetune_bench.py --size 32 --n-train 8000 --epochs 2 --json out.json

Rows (one run, same trained model, same data):

* float: the BN-folded float model (PyTorch);
* PTQ W2: ``compress(QuantConfig(weight_bits=2))`` (solver), exported and run in ORT;
* ft ce/natural: ``finetune(loss="ce", sampler="natural")``;
* ft worst-group/group-balanced: ``finetune(loss="worst-group", sampler="group-balanced")``;
* ft worst-group/core-set: ``finetune(loss="worst-group", sampler="core-set")``.

Section ``oscillation`` (``--sections w2,oscillation``): 3-bit QAT with λ = 0 and λ =
``--oscillation``, each re-quantized at 3/4/5/6/8 bits by ``finetune_widths`` (fake-quant
reference accuracies).

Every quantized row of the w2 section is exported (QDQ ONNX, the export's ORT parity check) and evaluated per
group on the test split in the optimized ORT CPU session. Columns: accuracy per group, mean
(population) accuracy, worst-group accuracy, gap (max − min group accuracy), the gap's
reduction vs PTQ in %, fine-tuning wall time and the training samples it saw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fqexport.calibration.sampling import group_balanced_subset
from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
from fqexport.demo.models import SmallResNet
from fqexport.demo.task import make_image_task
from fqexport.demo.training import DEMO_TRAIN, train_classifier
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.finetune import FinetuneConfig, finetune, finetune_widths
from fqexport.finetune.adaround import adaptive_rounding
from fqexport.metrics.group_metrics import group_metrics
from fqexport.pipeline.compress import compress
from fqexport.search.mixed_precision import search_mixed_precision

# (label, FinetuneConfig overrides) of the w2 section; "lr" rows use --lrs, the rest --lr.
RUNS = (
    ("ft ce/natural", dict(loss="ce", sampler="natural")),
    ("ft worst-group/group-balanced", dict(loss="worst-group", sampler="group-balanced")),
    ("ft worst-group/core-set 0.5 score=disagreement", dict(loss="worst-group", sampler="core-set",
                                                             coreset_fraction=0.5, coreset_score="disagreement")),
    ("ft worst-group/core-set 0.25 score=disagreement", dict(loss="worst-group", sampler="core-set",
                                                              coreset_fraction=0.25, coreset_score="disagreement")),
    ("ft worst-group/core-set 0.5 score=loss", dict(loss="worst-group", sampler="core-set", coreset_fraction=0.5,
                                                     coreset_score="loss")),
)


def _row(label, logits, test, seconds=None, seen=None):
    gm = group_metrics(logits, test.y, test.group, test.group_names)
    row = {"row": label, "mean %": round(100 * gm.overall["accuracy"], 2)}
    for g, r in gm.by_group.items():
        row[f"{g} %"] = round(100 * r["accuracy"], 2)
    row["worst %"] = round(100 * gm.group_min("accuracy")[1], 2)
    row["gap pt"] = round(100 * gm.difference("accuracy"), 2)
    row["seconds"] = None if seconds is None else round(seconds, 1)
    row["samples seen"] = seen
    return row


def _ort_logits(cm, path: Path, test) -> np.ndarray:
    cm.export(path)
    return run_batches(make_session(path), test.x, 256)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=3000)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--minority", type=float, default=0.1)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--lrs", default="0.01,0.03", help="comma separated: extra worst-group/group-balanced rows "
                   "of the w2 section at these step sizes")
    p.add_argument("--budget-bits", type=float, default=2.5, help="average-bits budget of the baq section")
    p.add_argument("--sections", default="w2", help="comma separated: w2 (PTQ vs fine-tunes and core-sets, ORT), "
                   "oscillation (3-bit QAT with/without the regulariser, re-quantized at 3..8 bits), "
                   "baq (learned widths vs the PTQ search at --budget-bits, ORT), "
                   "rounding (solver vs group-weighted adaptive rounding, no fine-tuning, ORT), "
                   "coreset (core-set at more epochs vs group-balanced at fewer, ORT)")
    p.add_argument("--oscillation", type=float, default=0.1, help="λ of the oscillation section")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "fqexport_finetune_bench")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.lrs = [float(v) for v in args.lrs.split(",") if v]
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    train, test = make_image_task(args.n_train, args.n_test, args.size, args.minority, seed=0)
    key = hashlib.sha1(train.x.tobytes()[:1 << 20] + repr((args.n_train, args.size)).encode()).hexdigest()[:10]
    ckpt = args.work_dir / f"small_resnet_{key}.pt"
    torch.manual_seed(0)
    model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
    t = time.perf_counter()
    if ckpt.exists():
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        model.eval()
    else:
        train_classifier(model, train, replace(DEMO_TRAIN, max_seconds=None))
        torch.save(model.state_dict(), ckpt)
    print(f"float model ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    calib = group_balanced_subset(train, 512, seed=0)
    sections = set(args.sections.split(","))
    result = {"args": {k: str(v) for k, v in vars(args).items()}}
    if "w2" in sections:
        t = time.perf_counter()
        cm = compress(model, calib, QuantConfig(weight_bits=args.bits), progress=False)
        result["rows"] = _w2_section(args, cm, time.perf_counter() - t, train, test)
    if "coreset" in sections:
        result["coreset"] = _coreset_section(args, model, calib, train, test)
    if "rounding" in sections:
        result["rounding"] = _rounding_section(args, model, calib, train, test)
    if "baq" in sections:
        result["baq"] = _baq_section(args, model, calib, train, test)
    if "oscillation" in sections:
        result["oscillation"] = _oscillation_section(args, model, calib, train, test)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _print(rows) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    print()


def _oscillation_section(args, model, calib, train, test) -> list[dict]:
    """3-bit QAT with and without the oscillation regulariser, each re-quantized at 3..8 bits
    (no training at those widths); accuracies of the fake-quant reference (what exports match)."""
    cm3 = compress(model, calib, QuantConfig(weight_bits=3), progress=False)
    rows = []
    for lam in (0.0, args.oscillation):
        cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, oscillation=lam, device="cpu")
        t = time.perf_counter()
        models = finetune_widths(cm3, train, cfg, (3, 4, 5, 6, 8), progress=False)
        secs = time.perf_counter() - t
        for b, m in models.items():
            row = _row(f"QAT@3 λ={lam:g} → W{b}", m.predict(test.x), test, secs if b == 3 else None)
            row["latent off-grid"] = m.metadata.finetune["latent_offgrid"]
            rows.append(row)
    _print(rows)
    return rows


def _w2_section(args, cm, ptq_s, train, test) -> list[dict]:
    rows = [_row("float (PyTorch)", cm.predict(test.x, quantized=False), test)]
    rows.append(_row(f"PTQ W{args.bits} solver", _ort_logits(cm, args.work_dir / "ptq.onnx", test), test, ptq_s))
    runs = [(label, kw) for label, kw in RUNS]
    runs += [(f"ft worst-group/group-balanced lr={lr:g}", dict(loss="worst-group", sampler="group-balanced", lr=lr))
             for lr in args.lrs if lr != args.lr]
    for k, (label, kw) in enumerate(runs):
        cfg = FinetuneConfig(**{"epochs": args.epochs, "lr": args.lr, "device": "cpu", **kw})
        t = time.perf_counter()
        ft = finetune(cm, train, cfg, progress=False)
        secs = time.perf_counter() - t
        rec = ft.metadata.finetune
        logits = _ort_logits(ft, args.work_dir / f"ft_{k}.onnx", test)
        rows.append(_row(label, logits, test, secs, rec["samples_seen"]))
        rows[-1]["best epoch"] = rec["best_epoch"]
    ptq_gap = rows[1]["gap pt"]
    ref = next(r for r in rows if r["row"] == "ft worst-group/group-balanced")
    for r in rows[1:]:
        r["gap reduction %"] = round(100 * (ptq_gap - r["gap pt"]) / ptq_gap, 1) if ptq_gap else None
        if r["samples seen"]:
            r["data vs balanced"] = round(r["samples seen"] / ref["samples seen"], 3)
            r["time vs balanced"] = round(r["seconds"] / ref["seconds"], 3)
    _print(rows)
    return rows


# (label, FinetuneConfig overrides) of the coreset section: the core-set at more epochs vs
# group-balanced at fewer, to read off the data and time each needs for the same worst group.
CORESET_RUNS = (
    ("ft worst-group/group-balanced 1 epoch", dict(sampler="group-balanced", epochs=1)),
    ("ft worst-group/core-set 0.5 score=disagreement 3 epochs", dict(sampler="core-set", coreset_fraction=0.5,
                                                                      epochs=3, coreset_score="disagreement")),
    ("ft worst-group/core-set 0.5 score=disagreement 4 epochs", dict(sampler="core-set", coreset_fraction=0.5,
                                                                      epochs=4, coreset_score="disagreement")),
    ("ft worst-group/core-set 0.5 score=loss 4 epochs", dict(sampler="core-set", coreset_fraction=0.5, epochs=4,
                                                              coreset_score="loss")),
)


def _coreset_section(args, model, calib, train, test) -> list[dict]:
    cm = compress(model, calib, QuantConfig(weight_bits=args.bits), progress=False)
    rows = []
    for k, (label, kw) in enumerate(CORESET_RUNS):
        cfg = FinetuneConfig(**{"lr": args.lr, "device": "cpu", "loss": "worst-group", **kw})
        t = time.perf_counter()
        ft = finetune(cm, train, cfg, progress=False)
        secs = time.perf_counter() - t
        rec = ft.metadata.finetune
        rows.append(_row(label, _ort_logits(ft, args.work_dir / f"cs_{k}.onnx", test), test, secs,
                         rec["samples_seen"]))
        rows[-1]["best epoch"] = rec["best_epoch"]
    _print(rows)
    return rows


def _rounding_section(args, model, calib, train, test) -> list[dict]:
    """The solver's rounding vs group-weighted adaptive rounding on top of it (no fine-tuning),
    at --bits, both exported and run in ORT."""
    t = time.perf_counter()
    cm = compress(model, calib, QuantConfig(weight_bits=args.bits), progress=False)
    rows = [_row(f"PTQ W{args.bits} solver", _ort_logits(cm, args.work_dir / "ptq.onnx", test), test,
                 time.perf_counter() - t)]
    t = time.perf_counter()
    ar, rec = adaptive_rounding(cm, train, iters=FinetuneConfig.adaround_iters, seed=0)
    rows.append(_row(f"PTQ W{args.bits} solver + adaptive rounding",
                     _ort_logits(ar, args.work_dir / "adaround.onnx", test), test, time.perf_counter() - t))
    rows[-1]["layers re-rounded"] = sum(r["kept"] == "adaptive" for r in rec["layers"].values())
    _print(rows)
    return rows


def _baq_section(args, model, calib, train, test) -> list[dict]:
    """BAQ (learned widths, projected onto the budget, fine-tuned) vs the PTQ mixed-precision
    search at the same average-bits budget, both exported and run in ORT."""
    t = time.perf_counter()
    mp = MixedPrecisionConfig(budget_bits=args.budget_bits, engine=EngineConfig(engine="serial"))
    search = search_mixed_precision(model, calib, mp, QuantConfig(), progress=False).compressed
    search_s = time.perf_counter() - t
    rows = [_row(f"PTQ search avg {search.avg_weight_bits:.3f} bits",
                 _ort_logits(search, args.work_dir / "search.onnx", test), test, search_s)]
    t = time.perf_counter()
    cm2 = compress(model, calib, QuantConfig(weight_bits=int(math.ceil(args.budget_bits))), progress=False)
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, loss="worst-group", sampler="group-balanced",
                         learn_bits=True, budget_bits=args.budget_bits, device="cpu")
    baq = finetune(cm2, train, cfg, progress=False)
    secs = time.perf_counter() - t
    rows.append(_row(f"BAQ avg {baq.avg_weight_bits:.3f} bits", _ort_logits(baq, args.work_dir / "baq.onnx", test),
                     test, secs, baq.metadata.finetune["samples_seen"]))
    rows[-1]["widths"] = ",".join(str(b) for b in baq.metadata.finetune["baq"]["bits"].values())
    rows[0]["widths"] = ",".join(str(l.bits) for l in search.layers.values())
    _print(rows)
    return rows

if __name__ == "__main__":
    sys.exit(main())
