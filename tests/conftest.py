"""Shared session-scoped fixtures: a tiny trained CNN and MLP on 2-group tasks, their files,
compressed versions and exports (each built once per test session, on first use).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread: on this shared 2-core machine, torch's default thread pool is up to
# 20x slower under load (measured: 10 training epochs 5 s with 1 thread, 96 s with 2).
torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # 'fixtures_models:tiny_cnn' resolves like a user's module
    sys.path.insert(0, str(TESTS_DIR))

import fixtures_models as fm  # noqa: E402
from fqexport.calibration.npz import save_npz  # noqa: E402
from fqexport.cli import main  # noqa: E402
from fqexport.config import QuantConfig  # noqa: E402
from fqexport.demo.scenes import make_scene_task  # noqa: E402
from fqexport.exporters import qdq_onnx  # noqa: E402
from fqexport.exporters.qdq_onnx import export_qdq  # noqa: E402
from fqexport.pipeline.compress import compress  # noqa: E402

# pytest-xdist's ``-n auto`` (README's test command): one worker per core, at most this many
# (each imports torch and builds the session fixtures once: about 1 GB apiece)
MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    from fqexport.exporters.cpu_isa import usable_cpus

    return min(usable_cpus(), MAX_TEST_WORKERS)


@pytest.fixture(scope="session")
def scenes():
    """The small seeded scene task (boxes and masks, 25% low-light) of the detector/segmenter tests."""
    return make_scene_task(n_train=32, n_test=24, minority_fraction=0.25, seed=3)


def scene_config(**kw) -> QuantConfig:
    """The detector/segmenter tests' QuantConfig: all 32 training scenes, judged as x86-avx2."""
    return QuantConfig(num_calib=32, target="x86-avx2", **kw)


def run_main(argv) -> tuple[int, str, str]:
    """``fqexport`` with ``argv`` (any items, as strings) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# Layer widths of the mixed-precision CNN used by the export tests.
MIXED_BITS = {"conv_a": 4, "dw": 6, "fc": 4}


@pytest.fixture(scope="session")
def tests_dir() -> Path:
    return TESTS_DIR


@pytest.fixture(scope="session")
def cnn_data():
    return fm.image_task()


@pytest.fixture(scope="session")
def cnn_model(cnn_data):
    """TinyCNN trained to ~97 % on the image task (not modified by any test)."""
    return fm.train(fm.tiny_cnn(), cnn_data, epochs=15, lr=0.02)


@pytest.fixture(scope="session")
def cnn_files(tmp_path_factory, cnn_model, cnn_data):
    """Folder with the CNN's state_dict (``cnn.pt``) and the task as ``calib.npz``."""
    d = tmp_path_factory.mktemp("cnn_files")
    torch.save(cnn_model.state_dict(), d / "cnn.pt")
    save_npz(cnn_data, d / "calib.npz")
    return d


def _compress(model, data, **kw):
    kw.setdefault("num_calib", 256)
    return compress(model, data, QuantConfig(**kw), progress=False)


@pytest.fixture(scope="session")
def cnn_cm8(cnn_model, cnn_data):
    """The CNN compressed at 8 bits (solver, x86-safe)."""
    return _compress(cnn_model, cnn_data)


@pytest.fixture(scope="session")
def cnn_cm_mixed(cnn_model, cnn_data):
    """The CNN with MIXED_BITS (others 8 bits)."""
    return _compress(cnn_model, cnn_data, layer_bits=MIXED_BITS)


@pytest.fixture(scope="session")
def cnn_cm_mixed_int8(cnn_model, cnn_data):
    """The CNN with MIXED_BITS compressed for storage 'int8' (every layer in an int8 container)."""
    return _compress(cnn_model, cnn_data, layer_bits=MIXED_BITS, storage="int8")


@pytest.fixture(scope="session")
def cnn_exports(tmp_path_factory, cnn_cm_mixed, cnn_cm_mixed_int8):
    """The mixed CNN exported twice: compressed for storage 'auto' and for 'int8'.

    Returns a dict with the two ExportResults and the ONNX proto ``torch_to_onnx`` produced
    (before the weight rewrite), so failure tests can skip the slow torch export.
    """
    d = tmp_path_factory.mktemp("cnn_exports")
    protos = []
    real = qdq_onnx.torch_to_onnx

    def capture(*args, **kwargs):
        proto = real(*args, **kwargs)
        protos.append(copy.deepcopy(proto))
        return proto

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qdq_onnx, "torch_to_onnx", capture)
        auto = export_qdq(cnn_cm_mixed, d / "auto.onnx")
    int8 = export_qdq(cnn_cm_mixed_int8, d / "int8.onnx")
    return {"dir": d, "auto": auto, "int8": int8, "proto": protos[0]}


@pytest.fixture(scope="session")
def gpu_cms(cnn_model, cnn_data, mlp_model, mlp_data):
    """Models compressed for target 'gpu' (S8S8; 4-bit Linears as blocked INT4, weight-only): the
    CNN at 8 bits and with MIXED_BITS (conv_a stays in an int8 container, fc blocked INT4), the MLP
    at 8 and 4 bits."""
    return {
        "cnn8": _compress(cnn_model, cnn_data, target="gpu"),
        "cnn_mixed": _compress(cnn_model, cnn_data, layer_bits=MIXED_BITS, target="gpu"),
        "mlp8": _compress(mlp_model, mlp_data, target="gpu"),
        "mlp4": _compress(mlp_model, mlp_data, weight_bits=4, target="gpu"),
    }


@pytest.fixture(scope="session")
def gpu_exports(tmp_path_factory, gpu_cms):
    """The ``gpu_cms`` exported (ExportResults by the same keys)."""
    d = tmp_path_factory.mktemp("gpu_exports")
    return {name: export_qdq(cm, d / f"{name}.onnx") for name, cm in gpu_cms.items()}


@pytest.fixture(scope="session")
def mlp_data():
    return fm.tabular_task()


@pytest.fixture(scope="session")
def mlp_model(mlp_data):
    return fm.train(fm.tiny_mlp(), mlp_data, epochs=15)


@pytest.fixture(scope="session")
def mlp_files(tmp_path_factory, mlp_model, mlp_data):
    d = tmp_path_factory.mktemp("mlp_files")
    torch.save(mlp_model.state_dict(), d / "mlp.pt")
    save_npz(mlp_data, d / "calib.npz")
    return d
