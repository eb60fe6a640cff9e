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
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fqexport.calibration.sampling import group_balanced_subset
from fqexport.config import QuantConfig
from fqexport.demo.models import SmallResNet
from fqexport.demo.task import make_image_task
from fqexport.demo.training import DEMO_TRAIN, train_classifier
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.finetune import FinetuneConfig, finetune, finetune_widths
from fqexport.metrics.group_metrics import group_metrics
from fqexport.pipeline.compress import compress

RUNS = (("ce", "natural"), ("worst-group", "group-balanced"), ("worst-group", "core-set"))


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
    p.add_argument("--sections", default="w2", help="comma separated: w2 (PTQ vs fine-tunes, ORT), "
                   "oscillation (3-bit QAT with/without the regulariser, re-quantized at 3..8 bits)")
    p.add_argument("--oscillation", type=float, default=0.1, help="λ of the oscillation section")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "fqexport_finetune_bench")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
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
        result["rows"] = _w2_section(args, model, calib, train, test)
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


def _w2_section(args, model, calib, train, test) -> list[dict]:
    t = time.perf_counter()
    cm = compress(model, calib, QuantConfig(weight_bits=args.bits), progress=False)
    ptq_s = time.perf_counter() - t
    rows = [_row("float (PyTorch)", cm.predict(test.x, quantized=False), test)]
    rows.append(_row(f"PTQ W{args.bits} solver", _ort_logits(cm, args.work_dir / "ptq.onnx", test), test, ptq_s))
    for loss, sampler in RUNS:
        cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, loss=loss, sampler=sampler, device="cpu")
        t = time.perf_counter()
        ft = finetune(cm, train, cfg, progress=False)
        secs = time.perf_counter() - t
        rec = ft.metadata.finetune
        logits = _ort_logits(ft, args.work_dir / f"ft_{loss}_{sampler}.onnx", test)
        rows.append(_row(f"ft {loss}/{sampler}", logits, test, secs, rec["samples_seen"]))
        rows[-1]["best epoch"] = rec["best_epoch"]
    ptq_gap = rows[1]["gap pt"]
    for r in rows[1:]:
        r["gap reduction %"] = round(100 * (ptq_gap - r["gap pt"]) / ptq_gap, 1) if ptq_gap else None
    _print(rows)
    return rows


if __name__ == "__main__":
    sys.exit(main())
