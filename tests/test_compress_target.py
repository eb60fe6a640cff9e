"""Tests of ``compress --target``: QuantConfig.target, the export check under the target's
emulated int8 kernels (exporters/qdq_onnx.py::export_qdq), the metadata, and the CLI flag.

The saturating fixture (fixtures_models.SaturatingMLP) flips every class-0 sample under AVX2's
16-bit pair sums at full 8-bit weight range, so these hold on any x86 machine: the AVX2 kernels
are emulated, never run natively.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from typing import get_args

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fixtures_models import saturating_mlp, saturating_task, save_npz
from fqexport.cli import main
from fqexport.config import ExportTarget, QuantConfig
from fqexport.errors import ConfigError, ExportError
from fqexport.exporters.kernel_emulation import EmulatedSession
from fqexport.exporters.metadata import read_metadata
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.exporters.qdq_onnx import (
    CAUSE_TARGET_FULL_RANGE,
    MAX_EMULATED_SAMPLES,
    TARGET_FAMILY,
    check_subset,
    export_qdq,
    top1_agreement,
)
from fqexport.pipeline.compress import compress

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


def _refusal_pattern(path, target: str) -> str:
    return (
        re.escape(f"{path}: for target='{target}', the exported model run with the emulated x86-avx2 int8 kernels "
                  "agrees with the PyTorch fake-quant reference on only ")
        + r"(\d+\.\d\d)% of 200 calibration samples whose top-2 logits are more than 2% of the logit spread "
        r"apart \(need >= 99%, or a single flipped sample; max \|logit diff\| [0-9.]+\); the file was not written\. "
        + re.escape(CAUSE_TARGET_FULL_RANGE.format(target=target))
    )


def test_x86_vnni_target_allows_full_range(cm_full, sat_data, tmp_path):
    path = tmp_path / "vnni.onnx"
    result = export_qdq(cm_full, path)
    assert result.agreement == 1.0
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

    # Recompute the refusal independently: the same graph exported for x86-vnni (passes on this
    # machine's native kernels), run under the emulated AVX2 kernels.
    vnni = export_qdq(cm_full, tmp_path / "vnni.onnx").path
    want = cm_full.predict(sat_data.x)
    native = run_batches(make_session(vnni, threads=1), sat_data.x, 64)
    avx2 = run_batches(EmulatedSession(vnni, "x86-avx2", threads=1), sat_data.x, 64)
    spread = float(np.median(want.max(1) - want.min(1)))
    assert top1_agreement(native, want, 0.02 * spread)[1] == 1.0
    decided = top1_agreement(avx2, want, 0.02 * spread)[1]
    assert decided < 0.6  # the class-0 half flips to class 1
    assert float(match.group(1)) == pytest.approx(100 * decided, abs=0.005)


def test_gpu_target_skips_the_cpu_emulation(cm_full, tmp_path):
    path = tmp_path / "gpu.onnx"
    export_qdq(_retarget(cm_full, "gpu"), path)
    assert read_metadata(path).target == "gpu"


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


def test_every_target_has_an_emulated_family_or_none():
    assert tuple(TARGET_FAMILY) == get_args(ExportTarget)
    assert TARGET_FAMILY["portable"] == "x86-avx2" and TARGET_FAMILY["gpu"] is None


def test_check_subset_takes_the_groups_round_robin():
    group = np.array([0] * 900 + [1] * 60 + [2] * 40)  # sorted by group, like many data files
    idx = check_subset(group, MAX_EMULATED_SAMPLES)
    assert len(idx) == MAX_EMULATED_SAMPLES and np.all(np.diff(idx) > 0)
    assert np.bincount(group[idx], minlength=3).tolist() == [156, 60, 40]  # small groups whole
    two = np.array([1, 0] * 500)
    assert np.bincount(two[check_subset(two, MAX_EMULATED_SAMPLES)]).tolist() == [128, 128]
    np.testing.assert_array_equal(check_subset(group[:100], MAX_EMULATED_SAMPLES), np.arange(100))


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_target(tmp_path, sat_data, tests_dir, monkeypatch):
    torch.save(saturating_mlp().state_dict(), tmp_path / "sat.pt")
    save_npz(sat_data, tmp_path / "calib.npz")
    monkeypatch.chdir(tests_dir)  # 'fixtures_models:saturating_mlp' resolves from the working directory
    args = ["-q", "compress", "--model", "fixtures_models:saturating_mlp", "--weights", tmp_path / "sat.pt",
            "--calib", tmp_path / "calib.npz", "--num-calib", "200", "--method", "rtn", "--no-clip-search",
            "--no-bias-correction", "--weight-range", "full"]
    code, _, err = _run([*args, "--out", tmp_path / "portable.onnx"])
    assert code == 2
    assert "for target='portable', the exported model run with the emulated x86-avx2 int8 kernels" in err
    assert "use weight_range='x86-safe' (the default, --weight-range x86-safe)" in err
    assert not (tmp_path / "portable.onnx").exists()
    code, _, err = _run([*args, "--target", "x86-vnni", "--out", tmp_path / "vnni.onnx"])
    assert code == 0, err
    assert read_metadata(tmp_path / "vnni.onnx").target == "x86-vnni"
