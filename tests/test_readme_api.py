"""README.md's "Python API" block runs as written: extracted verbatim and executed as a script
(with its ``__main__`` guard; the search starts worker processes) in a folder holding tiny
stand-ins for everything it names: ``mypkg.models:resnet`` (the test MLP: its layers are wide
enough for the block's 3-stored-bit budget, scales included), ``ckpt.pt``, ``calib.npz``,
``train.npz`` and ``test.npz``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import fqexport
from fqexport.exporters.metadata import read_metadata

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
FACTORY = "from fixtures_models import tiny_mlp\n\n\ndef resnet():\n    return tiny_mlp()\n"


def readme_api_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md: no python block under '## Python API'"
    return match.group(1)


def test_the_block_is_a_script_with_a_main_guard_using_only_public_names():
    block = readme_api_block()
    assert 'if __name__ == "__main__":' in block
    used = set(re.findall(r"\bfqexport\.([A-Za-z_]\w*)", block))
    assert used <= set(fqexport.__all__), used - set(fqexport.__all__)
    assert "cm.export(" not in block and "example_batch =" in block
    compile(block, "README.md", "exec")


@pytest.mark.slow
def test_the_block_runs_on_tiny_fixtures(tmp_path, mlp_files):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(FACTORY)
    shutil.copy(mlp_files / "mlp.pt", tmp_path / "ckpt.pt")
    for name in ("calib.npz", "train.npz", "test.npz"):
        shutil.copy(mlp_files / "calib.npz", tmp_path / name)
    script = tmp_path / "readme_api.py"
    script.write_text(readme_api_block())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("model_w4.onnx", "float.onnx", "model_mp.onnx"):
        onnx.checker.check_model(onnx.load(str(tmp_path / name)))
    meta = read_metadata(tmp_path / "model_w4.onnx")
    assert meta.finetune["settings"]["loss"] == "worst-group" and meta.finetune["epochs_run"] >= 1
    assert read_metadata(tmp_path / "model_mp.onnx").allocation is not None
    assert "accuracy" in proc.stdout
