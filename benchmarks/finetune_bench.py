"""Fine-tuning after PTQ: W2 uniform PTQ vs fine-tunes, BAQ vs the search, the core-set, in ONNX Runtime.

    .venv/bin/python benchmarks/finetune_bench.py                    # small default run
    .venv/bin/python benchmarks/finetune_bench.py --task two-minority --size 32 --n-train 8000 --epochs 2 --json out.json

Tasks (``--task``): ``demo`` (``make_image_task``, one inverted-contrast minority) or
``two-minority`` (``make_two_minority_task``: rotated and dim-noisy minorities). The float
SmallResNet trains for ``--train-epochs`` epochs (no wall-time limit) and is cached per task.

Section ``w2`` (one run, same trained model, same data):

* float: the BN-folded float model (PyTorch);
* PTQ W2: ``compress(QuantConfig(weight_bits=2))`` (solver), exported and run in ORT;
* ft ce/natural: ``finetune(loss="ce", sampler="natural")``;
* ft worst-group/group-balanced: ``finetune(loss="worst-group", sampler="group-balanced")``;
* ft worst-group/core-set 0.5 and 0.3: ``finetune(loss="worst-group", sampler="core-set")``.

Section ``baq``: the PTQ search at ``--budget-bits`` stored bits vs the search fine-tuned at its
widths, BAQ seeded by the search's widths and BAQ from a PTQ start, all at the search's nominal
average bits (see ``_baq_section``). Section ``coreset``: group-balanced and core-set at equal
steps and equal wall time. Section ``oscillation``: 3-bit QAT with λ = 0 and λ =
``--oscillation``, each re-quantized at 3/4/5/6/8 bits by ``finetune_widths`` (fake-quant
reference accuracies). Section ``rounding``: solver vs adaptive rounding.

Every quantized row of the w2, baq and coreset sections is exported (QDQ ONNX, the export's ORT
parity check) and evaluated per group on the test split in the optimized ORT CPU session.
Columns: accuracy per group, mean (population) accuracy, worst-group accuracy, gap (max − min
group accuracy), the gap's reduction vs PTQ in %, fine-tuning wall time and the training samples
it saw. Each row is also written to stderr as JSON when it is measured (partial results).
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

from fqexport import FinetuneConfig, finetune, finetune_widths
from fqexport.calibration.sampling import group_balanced_subset
from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
from fqexport.demo.models import SmallResNet
from fqexport.demo.task import make_image_task, make_two_minority_task
from fqexport.demo.training import DEMO_TRAIN, train_classifier
from fqexport.exporters.cpu_isa import cpu_isa
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.finetune.adaround import adaptive_rounding
from fqexport.metrics.group_metrics import group_metrics
from fqexport.pipeline.compress import compress
from fqexport.search.mixed_precision import search_mixed_precision

# (label, FinetuneConfig overrides) of the w2 section; "lr" rows use --lrs, the rest --lr.
RUNS = (
    ("ft ce/natural", dict(loss="ce", sampler="natural")),
    ("ft worst-group/group-balanced", dict(loss="worst-group", sampler="group-balanced")),
    ("ft worst-group/core-set 0.5", dict(loss="worst-group", sampler="core-set", coreset_fraction=0.5)),
    ("ft worst-group/core-set 0.3", dict(loss="worst-group", sampler="core-set", coreset_fraction=0.3)),
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
    print("row " + json.dumps(row), file=sys.stderr, flush=True)  # partial results of a long run
    return row


def _ort_logits(cm, path: Path, test) -> np.ndarray:
    export_qdq(cm, path)
    return run_batches(make_session(path), test.x, 256)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=3000)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--task", choices=("demo", "two-minority"), default="demo",
                   help="demo: make_image_task (one inverted-contrast minority of --minority); two-minority: "
                   "make_two_minority_task (rotated and dim-noisy minorities of --minority-fractions each)")
    p.add_argument("--minority", type=float, default=0.1)
    p.add_argument("--minority-fractions", default="0.06,0.06")
    p.add_argument("--train-epochs", type=int, default=DEMO_TRAIN.epochs,
                   help="epochs of the float model's training (an epoch count, no wall-time limit)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--lrs", default="", help="comma separated: extra worst-group/group-balanced rows "
                   "of the w2 section at these step sizes")
    p.add_argument("--budget-bits", type=float, default=2.5, help="the search's budget (stored bits per weight, "
                   "scales included) in the baq section; BAQ gets the search's nominal average")
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

    if args.task == "demo":
        train, test = make_image_task(args.n_train, args.n_test, args.size, args.minority, seed=0)
    else:
        fractions = tuple(float(v) for v in args.minority_fractions.split(","))
        train, test = make_two_minority_task(args.n_train, args.n_test, args.size, fractions, seed=0)
    key = hashlib.sha1(train.x.tobytes()[:1 << 20] + repr((args.task, args.n_train, args.size,
                                                           args.train_epochs)).encode()).hexdigest()[:10]
    ckpt = args.work_dir / f"small_resnet_{key}.pt"
    torch.manual_seed(0)
    model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1])
    t = time.perf_counter()
    if ckpt.exists():
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        model.eval()
    else:
        train_classifier(model, train, replace(DEMO_TRAIN, epochs=args.train_epochs, max_seconds=None))
        torch.save(model.state_dict(), ckpt)
    print(f"float model ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    calib = group_balanced_subset(train, 512, seed=0)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "cpu_isa": cpu_isa(),
              "groups": {n: int(c) for n, c in zip(test.group_names, test.group_counts())}}
    print(f"task {args.task}: test group counts {result['groups']}, ISA {result['cpu_isa']}", file=sys.stderr)
    sections = set(args.sections.split(","))
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
        # plain QAT, as measured in docs/finetune.md (the defaults were ce/natural then)
        cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, oscillation=lam, device="cpu", loss="ce", sampler="natural")
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


def _coreset_section(args, model, calib, train, test) -> list[dict]:
    """The core-set's data and time at equal worst-group accuracy: core-set fractions 0.5 and 0.3
    vs group-balanced with the same number of steps and with the same wall time (group-balanced
    at --epochs stopped by ``max_minutes`` at the core-set's seconds)."""
    cm = compress(model, calib, QuantConfig(weight_bits=args.bits), progress=False)
    rows = []

    def run(label, **kw):
        cfg = FinetuneConfig(**{"epochs": args.epochs, "lr": args.lr, "device": "cpu", "loss": "worst-group", **kw})
        t = time.perf_counter()
        ft = finetune(cm, train, cfg, progress=False)
        secs = time.perf_counter() - t
        rec = ft.metadata.finetune
        rows.append(_row(label, _ort_logits(ft, args.work_dir / f"cs_{len(rows)}.onnx", test), test, secs,
                         rec["samples_seen"]))
        rows[-1].update({"steps": rec["steps"], "best epoch": rec["best_epoch"], "stopped": rec["stopped"]})
        return secs

    # The w2 section has group-balanced and core-set 0.5 / 0.3 at --epochs; here the rows that
    # match their steps and wall time, most telling first.
    e = args.epochs
    run(f"group-balanced {max(1, e // 2)} epoch(s) (≈ core-set 0.5's steps at {e} epochs)", sampler="group-balanced",
        epochs=max(1, e // 2))
    run(f"core-set 0.5 {2 * e} epochs (= group-balanced's steps at {e} epochs)", sampler="core-set",
        coreset_fraction=0.5, epochs=2 * e)
    secs = run(f"core-set 0.3 {e} epochs", sampler="core-set", coreset_fraction=0.3)
    run(f"group-balanced {e} epochs stopped at core-set 0.3's {secs:.0f} s", sampler="group-balanced",
        max_minutes=secs / 60.0)
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
    """BAQ vs the PTQ mixed-precision search at the same budget, all exported and run in ORT.

    The search's ``budget_bits`` counts stored bits (scales included, packed containers); BAQ's
    counts nominal widths. So the search runs first at ``--budget-bits`` stored bits, and every
    BAQ row gets the search's *nominal* average as its budget and the search's candidate widths
    (2, 4, 8), so both are held to the same nominal bits and the same containers. Rows: the
    search (PTQ only); the search's allocation fine-tuned at its fixed widths (--epochs); BAQ from
    a PTQ start at the narrowest candidate width ≥ the budget; BAQ started at the search's allocation (its widths seed the
    learned preferences). Fine-tunes: worst-group / group-balanced, --epochs at fixed widths
    (+ 1 width-learning epoch for BAQ)."""
    t = time.perf_counter()
    mp = MixedPrecisionConfig(budget_bits=args.budget_bits, engine=EngineConfig(engine="serial"))
    res = search_mixed_precision(model, calib, mp, QuantConfig(), progress=False)
    search = res.compressed
    search_s = time.perf_counter() - t
    nominal = float(search.avg_weight_bits)
    choices = tuple(mp.bit_choices)
    rows = [_row("PTQ search", _ort_logits(search, args.work_dir / "search.onnx", test), test, search_s)]
    rows[0].update({"avg bits": round(nominal, 3), "stored bits": round(res.allocation.stored_bits, 3),
                    "fits": len(res.candidates),
                    "widths": ",".join(str(l.bits) for l in search.layers.values())})

    def ft_row(label, start, start_s, **kw):
        cfg = FinetuneConfig(**{"epochs": args.epochs, "lr": args.lr, "loss": "worst-group",
                                "sampler": "group-balanced", "device": "cpu", **kw})
        t = time.perf_counter()
        ft = finetune(start, train, cfg, progress=False)
        secs = start_s + time.perf_counter() - t
        rec = ft.metadata.finetune
        rows.append(_row(label, _ort_logits(ft, args.work_dir / f"baq_{len(rows)}.onnx", test), test, secs,
                         rec["samples_seen"]))
        rows[-1].update({"avg bits": round(float(ft.avg_weight_bits), 3),
                         "epochs": cfg.epochs + (cfg.bit_epochs if cfg.learn_bits else 0),
                         "widths": ",".join(str(l.bits) for l in ft.layers.values()), "best epoch": rec["best_epoch"]})
        return ft

    ft_row("BAQ seeded by the search's widths", search, search_s, learn_bits=True, budget_bits=nominal,
           bit_choices=choices)
    ft_row(f"search + fine-tune {args.epochs} epochs at its widths", search, search_s)
    start_bits = min(b for b in choices if b >= math.ceil(nominal))  # a candidate: its grid is the PTQ start's
    t = time.perf_counter()
    cm = compress(model, calib, QuantConfig(weight_bits=start_bits), progress=False)
    ft_row(f"BAQ from PTQ W{start_bits}", cm, time.perf_counter() - t, learn_bits=True, budget_bits=nominal,
           bit_choices=choices)
    _print(rows)
    return rows


if __name__ == "__main__":
    sys.exit(main())
