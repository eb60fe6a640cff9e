"""Start-up benchmark (issue 23): wall time from the command to its output for ``--help``, a flag
error, an output-path error and ``import fqexport``, each in a fresh interpreter.

    .venv/bin/python benchmarks/startup_bench.py [--runs 5] [--baseline SRC]

``--baseline SRC``: also time a source tree of another commit (e.g. ``git archive <rev> | tar -x
-C SRC``, with ``calibration/`` and ``exporters/`` linked into ``SRC/fqexport/`` as the wheel
installs them), interleaved run by run with this checkout so that machine load hits both alike.
Prints the CPU's instruction set and the load average beside the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from fqexport.exporters.cpu_isa import cpu_isa

COMMANDS = {
    "fqexport --help": ["-m", "fqexport.cli", "--help"],
    "fqexport compress --help": ["-m", "fqexport.cli", "compress", "--help"],
    "compress --out /missing/folder/x.onnx": ["-m", "fqexport.cli", "compress", "--model", "x:y", "--calib",
                                              "c.npz", "--out", "/missing/folder/x.onnx"],
    "compress --weight-bits 9": ["-m", "fqexport.cli", "compress", "--model", "x:y", "--calib", "c.npz",
                                 "--out", "x.onnx", "--weight-bits", "9"],
    "import fqexport": ["-c", "import fqexport"],
}


def _time(argv: list[str], pythonpath: str | None, cwd: str) -> float:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per command (default 5)")
    ap.add_argument("--baseline", help="source tree of another commit, timed interleaved")
    args = ap.parse_args()
    trees = {"this checkout": None, **({"baseline": args.baseline} if args.baseline else {})}
    print(f"CPU {cpu_isa()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"median (min) of {args.runs} runs, seconds")
    with tempfile.TemporaryDirectory() as cwd:
        for name, argv in COMMANDS.items():
            times: dict[str, list[float]] = {t: [] for t in trees}
            for _ in range(args.runs):
                for label, path in trees.items():
                    times[label].append(_time(argv, path, cwd))
            cells = [f"{label} {statistics.median(ts):.2f} ({min(ts):.2f})" for label, ts in times.items()]
            print(f"{name:<40} " + "   ".join(cells))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
