"""Tests of ``compress --target``: QuantConfig.target, the target-aware export check
(exporters/export_check.py), the metadata, and the CLI flag.

The saturating fixture (fixtures_models.SaturatingMLP) flips every class-0 sample under AVX2's
16-bit pair sums at full 8-bit weight range. These hold on every CPU family: a target is judged
by this CPU's own session only when this CPU is of the target's family, by the emulation
otherwise, and each test reads which judge that is from ``kernel_judges`` (whose plan per CPU is
checked by hand in tests/test_export_check.py). Run them as if on another family with
``FQEXPORT_HOST_KERNELS=x86-vnni`` (or ``x86-avx2``, ``arm64``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import get_args

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fixtures_models import saturating_mlp, saturating_task
from conftest import run_main
from fqexport.calibration.npz import save_npz
from fqexport.config import ExportTarget, QuantConfig
from fqexport.errors import ConfigError, ExportError
from fqexport.exporters.export_check import (
    CAUSE_FULL_RANGE,
    GRAPH,
    TARGET_FAMILIES,
    kernel_judges,
)
from fqexport.exporters.kernel_emulation import EmulatedSession
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.ort_session import run_batches
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.pipeline.compress import compress
from fqexport.tasks.classification import top1_agreement

# what these tests expect depends on the int8 kernels: CI also runs them as if on each CPU family
# (FQEXPORT_HOST_KERNELS=x86-avx2|x86-vnni|arm64 pytest -m isa)
pytestmark = pytest.mark.isa

# rtn without clipping or bias correction keeps the fixture's weights on the designed codes.
_PLAIN = dict(method="rtn", bias_correction=False, bn_reestimate=False, clip_search=False)


@pytest.fixture(scope="module")
def sat_data():
    return saturating_task()


def _compress(data, weight_range, target):
    config = QuantConfig(weight_range=weight_range, target=target, num_calib=len(data.x), **_PLAIN)
    return compress(saturating_mlp(), data, config, progress=False)


@pytest.fixture(scope="module")
def cm_full(sat_data):
    return _compress(sat_data, "full", "x86-vnni")


def _retarget(cm, target):
    return dataclasses.replace(cm, config=dataclasses.replace(cm.config, target=target))


def _fc1_codes(path) -> np.ndarray:
    ints = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return next(a for a in ints if a.shape == (2, 16))


def _avx2_judge(target: str):
    """The judge of ``target`` that covers x86-avx2: this CPU's session on an AVX2 CPU, else the emulation."""
    return next(j for j in kernel_judges(target) if "x86-avx2" in j.families)


def _refusal_pattern(path, target: str) -> str:
    return (
        re.escape(f"{path}: for target='{target}', the exported model run with {_avx2_judge(target).describe()} "
                  "agrees with the PyTorch fake-quant reference on only ")
        + r"(\d+\.\d\d)% of the \d+ calibration samples whose top-2 logits are more than 2% of the logit spread "
        r"apart and keep their top-1 when the reference's rounding ties move \(need >= 99%, or a single flipped "
        r"sample; max \|logit diff\| [0-9.]+\); the file was not written\. "
        + re.escape(CAUSE_FULL_RANGE.format(target=target))
    )


def test_x86_vnni_target_allows_full_range(cm_full, sat_data, tmp_path):
    path = tmp_path / "vnni.onnx"
    result = export_qdq(cm_full, path)
    assert result.agreement == 1.0
    # judged by the x86-vnni kernels alone: natively on a VNNI CPU, emulated on any other
    assert [v.judge.families for v in result.checks] == [("x86-vnni",)]
    assert [v.judge for v in result.checks] == list(kernel_judges("x86-vnni"))
    assert np.abs(_fc1_codes(path)).max() == 127  # the full 8-bit range was used
    assert read_metadata(path).target == "x86-vnni"
    assert read_metadata(path).weight_range == "full"


@pytest.mark.parametrize("target", ["x86-avx2", "portable"])
def test_full_range_export_for_avx2_is_refused_on_any_machine(cm_full, sat_data, target, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        export_qdq(_retarget(cm_full, target), out)
    match = re.fullmatch(_refusal_pattern(out, target), str(info.value))
    assert match, str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file

    # Recompute the refusal independently: the same graph exported for x86-vnni (exact int32
    # sums agree with the reference), run under the emulated AVX2 kernels (bit-exact with an AVX2
    # CPU's own session: test_kernel_emulation.py).
    vnni = export_qdq(cm_full, tmp_path / "vnni.onnx").path
    want = cm_full.predict(sat_data.x)
    exact = run_batches(EmulatedSession(vnni, "x86-vnni", threads=1), sat_data.x, 64)
    avx2 = run_batches(EmulatedSession(vnni, "x86-avx2", threads=1), sat_data.x, 64)
    spread = float(np.median(want.max(1) - want.min(1)))
    assert top1_agreement(exact, want, 0.02 * spread)[1] == 1.0
    decided = top1_agreement(avx2, want, 0.02 * spread)[1]
    assert decided < 0.6  # the class-0 half flips to class 1
    assert float(match.group(1)) == pytest.approx(100 * decided, abs=0.005)


def test_gpu_target_is_judged_by_the_graphs_math_not_a_cpus_kernels(sat_data, cm_full, tmp_path):
    path = tmp_path / "gpu.onnx"
    # compressed for the GPU: S8S8 activations (a model compressed for a CPU target has uint8
    # pairs, which the gpu export refuses: tests/test_gpu_target.py)
    result = export_qdq(_compress(sat_data, "full", "gpu"), path)
    assert read_metadata(path).target == "gpu"
    assert [v.judge.family for v in result.checks] == [GRAPH] and result.agreement == 1.0
    with pytest.raises(ExportError, match=r"the export for target='gpu' breaks \d+ rule\(s\)"):
        export_qdq(_retarget(cm_full, "gpu"), tmp_path / "retargeted.onnx")
    assert not (tmp_path / "retargeted.onnx").exists()


def test_default_portable_export_passes_and_cannot_saturate(sat_data, tmp_path):
    cm = _compress(sat_data, "x86-safe", "portable")
    assert QuantConfig().target == "portable"
    path = tmp_path / "portable.onnx"
    assert export_qdq(cm, path).agreement == 1.0
    assert read_metadata(path).target == "portable"
    assert np.abs(_fc1_codes(path)).max() == 63
    avx2 = run_batches(EmulatedSession(path, "x86-avx2", threads=1), sat_data.x, 64)
    vnni = run_batches(EmulatedSession(path, "x86-vnni", threads=1), sat_data.x, 64)
    np.testing.assert_array_equal(avx2, vnni)


def test_unknown_target_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape(
            "target='x86-sse' is not one of portable, x86-avx2, x86-vnni, arm64, gpu")):
        QuantConfig(target="x86-sse")


def test_every_target_names_the_kernel_families_it_must_hold_on():
    assert tuple(TARGET_FAMILIES) == get_args(ExportTarget)
    assert TARGET_FAMILIES["portable"] == ("x86-avx2", "x86-vnni", "arm64") and TARGET_FAMILIES["gpu"] == ()


def test_cli_target(tmp_path, sat_data, tests_dir, monkeypatch):
    torch.save(saturating_mlp().state_dict(), tmp_path / "sat.pt")
    save_npz(sat_data, tmp_path / "calib.npz")
    monkeypatch.chdir(tests_dir)  # 'fixtures_models:saturating_mlp' resolves from the working directory
    args = ["-q", "compress", "--model", "fixtures_models:saturating_mlp", "--weights", tmp_path / "sat.pt",
            "--calib", tmp_path / "calib.npz", "--num-calib", "200", "--method", "rtn", "--no-clip-search",
            "--no-bias-correction", "--weight-range", "full"]
    code, _, err = run_main([*args, "--out", tmp_path / "portable.onnx"])
    assert code == 2
    assert f"for target='portable', the exported model run with {_avx2_judge('portable').describe()} agrees" in err
    assert "use weight_range='x86-safe' (the default, --weight-range x86-safe)" in err
    assert not (tmp_path / "portable.onnx").exists()
    code, out, err = run_main([*args, "--target", "x86-vnni", "--out", tmp_path / "vnni.onnx"])
    assert code == 0, err
    assert read_metadata(tmp_path / "vnni.onnx").target == "x86-vnni"
    # the console says which kernels judged the file
    (judge,) = kernel_judges("x86-vnni")
    assert re.search(rf"export check for target x86-vnni.*\n  {re.escape(judge.describe())}: top-1 agreement 100\.00% "
                     r"on 200 calibration samples", out), out


def test_cli_gpu_target_is_not_timed_on_this_cpu(tmp_path, sat_data, tests_dir, monkeypatch):
    torch.save(saturating_mlp().state_dict(), tmp_path / "sat.pt")
    save_npz(sat_data, tmp_path / "calib.npz")
    monkeypatch.chdir(tests_dir)
    code, out, err = run_main(["-q", "compress", "--model", "fixtures_models:saturating_mlp", "--weights",
                           tmp_path / "sat.pt", "--calib", tmp_path / "calib.npz", "--num-calib", "200",
                           "--method", "rtn", "--target", "gpu", "--out", tmp_path / "gpu.onnx"])
    assert code == 0, err
    assert "speed: not timed here (--target gpu" in out and "speed vs the float model" not in out
