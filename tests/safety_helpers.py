"""Helpers of the safety tests (tests/test_safety_*.py): run the real CLI in a subprocess, take
a byte-exact snapshot of a folder, and craft hostile files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from fqexport.calibration.npz import save_npz

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_cli(args, cwd, timeout=300) -> tuple[int, str, str]:
    """``python -m fqexport.cli ARGS`` in ``cwd``: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "fqexport.cli", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Payload:
    """Unpickling this creates ``marker`` (what a hostile checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return buf.getvalue()


def save_clean_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.export.save(torch.export.export(model.eval(), (example,)), str(path))
    return path


def rewrite_pt2(src: Path, dst: Path, edit) -> Path:
    """Copy the archive ``src`` to ``dst``; ``edit(rel_name, bytes) -> bytes`` rewrites entries,
    ``edit(None, None)`` returns {rel_name: bytes} to add."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            rel = info.filename.partition("/")[2]
            zout.writestr(info, edit(rel, zin.read(info)))
        for rel, data in (edit(None, None) or {}).items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def pickled_weight_pt2(src: Path, dst: Path, marker: Path) -> Path:
    """A .pt2 whose first weight is marked use_pickle and holds a payload."""
    def edit(rel, data):
        if rel is None:
            return {"data/weights/weight_evil": pickled_payload(marker)}
        if rel.endswith("_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"]))
            cfg["config"][first].update(use_pickle=True, path_name="weight_evil")
            return json.dumps(cfg).encode()
        return data
    return rewrite_pt2(src, dst, edit)


def huge_header_npz(path: Path, rows: int = 10**12) -> Path:
    """An .npz whose 'x' header declares ``rows`` x 64 float32 (the data holds 4 rows)."""
    x = np.zeros((4, 64), np.float32)
    header = np.lib.format.header_data_from_array_1_0(x)
    header["shape"] = (rows, 64)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(x.tobytes())
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
        for name in ("y", "group"):
            b = io.BytesIO()
            np.save(b, np.zeros(4, np.int64))
            zf.writestr(f"{name}.npy", b.getvalue())
    return path


def tiny_onnx(path: Path, scalar_output: bool = False, features: int = 64, classes: int = 4) -> Path:
    """A one-MatMul classifier ONNX (or one returning a scalar)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(features, classes)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"])]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])
    if scalar_output:
        nodes.append(helper.make_node("ReduceSum", ["logits"], ["s"], keepdims=0))
        out = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [out], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def make_inputs(folder: Path) -> Path:
    """``mlp.pt`` (an untrained tiny MLP's state_dict), ``calib.npz`` and ``model.onnx`` in ``folder``."""
    import fixtures_models as fm

    torch.save(fm.tiny_mlp().state_dict(), folder / "mlp.pt")
    save_npz(fm.tabular_task(n=120), folder / "calib.npz")
    tiny_onnx(folder / "model.onnx")
    return folder


def compress_args(*extra) -> list[str]:
    return ["compress", "--model", "fixtures_models:tiny_mlp", "--weights", "mlp.pt", "--calib", "calib.npz",
            "--num-calib", "64", *extra]
