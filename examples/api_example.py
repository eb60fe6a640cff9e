"""fqexport through its Python API: compress → export → validate, per group.

1. generate the embedded group-labeled image task (majority vs inverted-contrast minority);
2. train a small ResNet on CPU (a few hundred samples with --quick);
3. ``compress`` it to W8A8 (or --bits) with the group-aware solver, ``export`` QDQ ONNX;
4. ``validate`` the ONNX file in ONNX Runtime per group against the float ONNX model;
5. print the per-group table, write report.json.

The files it leaves in --out-dir (model.pt, calib.npz, test.npz, float.onnx) are what
``examples/cli_example.sh`` and ``examples/ci_workflow.yml`` feed to the CLI.

    python examples/api_example.py --out-dir example-out            # ~8000 images, a few minutes
    python examples/api_example.py --quick --out-dir example-out    # tiny, about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fqexport
from fqexport import GroupData, QuantConfig, Thresholds, save_npz
from fqexport.demo.models import small_resnet
from fqexport.demo.task import make_image_task
from fqexport.demo.training import TrainConfig, train_classifier

# (n_train, n_test, image size, epochs, batch size, learning rate, calibration samples, minority fraction)
FULL = (8000, 2000, 32, 6, 128, 0.1, 512, 0.1)
# --quick: 256 training images, 10 short epochs. Far from a good model, but it fits its training
# images, which are also the calibration images, with clear logit margins — so the export's
# ONNX Runtime vs PyTorch top-1 agreement check is not decided by near-ties.
QUICK = (256, 200, 12, 10, 32, 0.1, 128, 0.2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=Path("fqexport-example"), help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a good model)")
    p.add_argument("--n-train", type=int, help="training images (default 8000, --quick 256)")
    p.add_argument("--n-test", type=int, help="test images (default 2000, --quick 200)")
    p.add_argument("--size", type=int, help="image side in pixels (default 32, --quick 12)")
    p.add_argument("--epochs", type=int, help="training epochs (default 6, --quick 10)")
    p.add_argument("--bits", type=int, default=8, help="weight bits of the compressed model (default 8)")
    p.add_argument("--method", choices=["solver", "rtn"], default="solver")
    p.add_argument("--max-group-drop", type=float, default=None,
                   help="exit 1 when a group loses more than this many accuracy points vs float")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def balanced_subset(data: GroupData, n: int, seed: int) -> GroupData:
    """Up to ``n`` samples with every group as equally represented as its size allows."""
    rng = np.random.default_rng(seed)
    per_group = n // data.num_groups
    picked = [rng.permutation(np.flatnonzero(data.group == g))[:per_group] for g in range(data.num_groups)]
    return data.subset(rng.permutation(np.concatenate(picked)))


def print_table(rows: list[dict[str, object]]) -> None:
    cells = [list(rows[0])] + [[str(v) for v in r.values()] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for k, row in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n_train, n_test, size, epochs, batch_size, lr, num_calib, minority = QUICK if args.quick else FULL
    n_train, n_test = args.n_train or n_train, args.n_test or n_test
    size, epochs = args.size or size, args.epochs or epochs
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # 1. data: GroupData with x [N, 3, size, size], y [N], group [N], group_names.
    train, test = make_image_task(n_train, n_test, size, minority, seed=args.seed)
    calib = balanced_subset(train, min(2 * num_calib, len(train)), seed=args.seed)
    save_npz(calib, out / "calib.npz")
    save_npz(test, out / "test.npz")
    print(f"data: {len(train)} train / {len(test)} test images {size}x{size}, groups {train.group_names}")

    # 2. a float model (the CLI loads it back as fqexport.demo.models:small_resnet + model.pt).
    torch.manual_seed(args.seed)
    model = small_resnet(num_classes=10, in_channels=3)
    model = train_classifier(model, train, TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=args.seed),
                             progress=not args.quick)
    torch.save(model.state_dict(), out / "model.pt")
    print(f"trained SmallResNet: {epochs} epochs ({time.perf_counter() - t0:.0f} s so far)")
    fqexport.export_float(model, torch.from_numpy(test.x[:2]), out / "float.onnx")

    # 3. compress → export.
    config = QuantConfig(weight_bits=args.bits, method=args.method, num_calib=num_calib, seed=args.seed)
    cm = fqexport.compress(model, calib, config, progress=not args.quick)
    onnx_path = out / f"model_w{args.bits}.onnx"
    result = fqexport.export(cm, onnx_path)
    print(f"exported {onnx_path} ({result.size_bytes / 1e6:.3f} MB); ONNX Runtime vs PyTorch reference: "
          f"top-1 agreement {result.agreement:.2%} ({time.perf_counter() - t0:.0f} s so far)")

    # 4. validate in ONNX Runtime, per group, against the float ONNX model.
    report = fqexport.validate(onnx_path, test, reference=out / "float.onnx",
                               thresholds=Thresholds(max_group_drop=args.max_group_drop),
                               measure_latency=not args.quick, kernel_check=not args.quick)
    rows = []
    for name, r in report.metrics.by_group.items():
        ref = report.reference_metrics.by_group[name]["accuracy"]
        rows.append({"group": name, "n": r["count"], "float acc %": f"{100 * ref:.2f}",
                     f"W{args.bits}A8 acc %": f"{100 * r['accuracy']:.2f}",
                     "drop pp": f"{100 * report.group_drop[name]:.2f}"})
    print()
    print_table(rows)
    worst, acc = report.metrics.group_min("accuracy")
    print(f"\nworst group {worst}: {100 * acc:.2f} %; gap {100 * report.metrics.difference('accuracy'):.2f} pp")
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    print(f"wrote {out / 'report.json'} ({time.perf_counter() - t0:.0f} s)")
    for check in report.failures():
        print(f"FAIL {check.name}: {check.message}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except fqexport.FqexportError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
