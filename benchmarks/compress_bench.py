"""Wall time and peak RSS of ``compress`` at W4, before vs after the linear-pass layer loop.

Usage::

    .venv/bin/python benchmarks/compress_bench.py [--before-commit SHA] [--cases resnet18 resnet50 demo]

"Before" is the implementation of ``--before-commit`` (default: the commit before the
linear-pass change), checked out with ``git worktree add --detach`` (default
``/tmp/fq-before``); "after" is this working tree. Each (case, implementation) runs in a
fresh subprocess with ``PYTHONPATH`` pointing at its tree, so wall time and peak RSS
(``ru_maxrss`` of that process) are its own; the parent compares the layer codes.

Cases (random init is fine for timing; two random groups):
  resnet18  benchmarks/resnet18.py, 64 images 3x64x64, 10 classes (21 layers)
  resnet50  benchmarks/resnet50.py (bottleneck), 64 images 3x64x64, 10 classes (54 layers)
  demo      fqexport.demo.models.SmallResNet (untrained), 512 images 3x32x32 from
            fqexport.demo.task.make_image_task (10 layers)

``QuantConfig(weight_bits=4, num_calib=<images>)``, everything else default (solver,
float-output target, bias correction / BN re-estimation, batch 64), device cpu, torch's
default intra-op threads (printed).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEFORE_COMMIT = "ca4db2104d5286a45c3414eb4ea4c7a09a8987f9"
CASES = ("resnet18", "resnet50", "demo")


class _TreeFinder(importlib.abc.MetaPathFinder):
    """Resolve ``fqexport.calibration`` / ``fqexport.exporters`` inside one tree: the editable
    install maps them to the main checkout's folders whatever ``PYTHONPATH`` says."""

    def __init__(self, root: Path) -> None:
        self.packages = {"fqexport.calibration": root / "calibration", "fqexport.exporters": root / "exporters"}

    def find_spec(self, name, path, target=None):
        folder = self.packages.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])


# A worker imports fqexport from the tree it measures (FQ_BENCH_TREE, also on PYTHONPATH).
if os.environ.get("FQ_BENCH_TREE"):
    sys.meta_path.insert(0, _TreeFinder(Path(os.environ["FQ_BENCH_TREE"])))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from resnet18 import resnet18  # noqa: E402
from resnet50 import resnet50  # noqa: E402

from fqexport.calibration.group_data import GroupData  # noqa: E402
from fqexport.config import QuantConfig  # noqa: E402
from fqexport.demo.models import SmallResNet  # noqa: E402
from fqexport.demo.task import make_image_task  # noqa: E402
from fqexport.pipeline.compress import compress  # noqa: E402


def cpu_flags() -> str:
    """The CPU model and the int8-relevant instruction sets from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model, flags = "?", set()
    for line in text.splitlines():
        if line.startswith("model name") and model == "?":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]
    have = [f for f in wanted if f in flags]
    return f"{model}; {os.cpu_count()} CPUs; flags: {' '.join(have) or 'none of ' + ' '.join(wanted)}"


# ---------------------------------------------------------------------------------- worker
def _build(case: str, images: int = 64):
    """(model, data, num_calib): for the ResNet sizes ``images`` random images 3x64x64 (two
    random groups) and num_calib 64."""
    if case in ("resnet18", "resnet50"):
        n, size = images, 64
        factory = resnet18 if case == "resnet18" else resnet50
        model = factory(num_classes=10, seed=0).eval()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
        y = rng.integers(0, 10, n).astype(np.int64)
        group = rng.integers(0, 2, n).astype(np.int64)
        return model, GroupData(x, y, group, ("a", "b"), f"random {size}x{size}"), 64
    train, _ = make_image_task(n_train=512, n_test=64, size=32, seed=0)
    torch.manual_seed(0)
    model = SmallResNet(num_classes=int(train.y.max()) + 1, in_channels=train.x.shape[1]).eval()
    return model, train, len(train)


def worker(case: str, out: Path) -> None:
    model, data, n = _build(case)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    cm = compress(model, data, QuantConfig(weight_bits=4, num_calib=n, device="cpu"), progress=False)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save({k: (l.codes, l.scale) for k, l in cm.layers.items()}, out)
    print(json.dumps({"wall_s": wall, "peak_rss_mb": rss, "rss_before_mb": rss_before,
                      "threads": torch.get_num_threads(), "layers": len(cm.layers)}))


# ---------------------------------------------------------------------------------- parent
def _ensure_worktree(path: Path, commit: str) -> None:
    if (path / "fqexport" / "pipeline" / "compress.py").exists():
        return
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True)


def _run(tree: Path, case: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), FQ_BENCH_TREE=str(tree))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--out", str(out)],
        env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{case} in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare(a: Path, b: Path) -> str:
    before, after = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if list(before) != list(after):
        return "different layers"
    codes = all(torch.equal(before[k][0], after[k][0]) for k in before)
    scale = max(float(((before[k][1] - after[k][1]).abs() / before[k][1].abs().clamp_min(1e-12)).max())
                for k in before)
    if codes:
        return f"codes identical (max rel. scale diff {scale:.1e})"
    diff = sum(int((before[k][0] != after[k][0]).sum()) for k in before)
    total = sum(before[k][0].numel() for k in before)
    return f"codes DIFFER: {diff}/{total} ({diff / total:.2e}); max rel. scale diff {scale:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--before-commit", default=BEFORE_COMMIT)
    p.add_argument("--before-tree", type=Path, default=Path("/tmp/fq-before"))
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return
    _ensure_worktree(args.before_tree, args.before_commit)
    print(f"CPU: {cpu_flags()}")
    print(f"before: {args.before_commit[:10]} ({args.before_tree}); after: working tree {ROOT}")
    print(f"{'case':<10} {'impl':<7} {'layers':>6} {'wall s':>8} {'peak RSS MB':>12} {'threads':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            res = {}
            for impl, tree in (("before", args.before_tree), ("after", ROOT)):
                res[impl] = _run(tree, case, Path(tmp) / f"{case}_{impl}.pt")
                r = res[impl]
                print(f"{case:<10} {impl:<7} {r['layers']:>6} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>12.0f} "
                      f"{r['threads']:>7}", flush=True)
            b, a = res["before"], res["after"]
            print(f"{case:<10} speed-up {b['wall_s'] / a['wall_s']:.2f}x, peak RSS after/before "
                  f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}, "
                  f"{_compare(Path(tmp) / f'{case}_before.pt', Path(tmp) / f'{case}_after.pt')}", flush=True)


if __name__ == "__main__":
    main()
