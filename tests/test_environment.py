"""The process's environment: no stderr to draw progress bars on, file names that are not UTF-8."""

from __future__ import annotations

import sys

from fqexport.config import QuantConfig
from fqexport.pipeline.compress import compress
from fqexport.progress import tqdm


def test_bars_are_off_without_a_stderr_and_the_api_runs(mlp_model, mlp_data, monkeypatch):
    """survey 97: under pythonw, a --noconsole app or a service without standard streams, sys.stderr
    is None and fqexport.compress / validate with their default progress=True raised AttributeError
    inside tqdm."""
    assert not tqdm(range(3), disable=False).disable
    monkeypatch.setattr(sys, "stderr", None)
    assert tqdm(range(3), disable=False).disable
    cm = compress(mlp_model, mlp_data, QuantConfig(num_calib=64), progress=True)
    assert sorted(cm.layers) == ["fc1", "fc2", "fc3"]


def test_a_file_name_that_is_not_utf8_is_written_and_named_when_read(cnn_cm8, tmp_path):
    """survey 97: `compress --out 'm\\xff.onnx'` failed after all the compute (the export check copied
    the model under the user's name, which ONNX Runtime cannot open); validate of such a file said
    "incompatible constructor arguments ... Is it a complete, valid .onnx file?". ORT gets its bytes;
    one with external data files (found by path) is refused naming the path as the cause."""
    import os

    import pytest

    import onnx

    from fqexport.errors import ModelLoadError
    from fqexport.exporters.metadata import read_metadata
    from fqexport.exporters.qdq_onnx import export_qdq
    from fqexport.validation.gate import validate

    path = tmp_path / os.fsdecode(b"m\xff.onnx")
    try:
        path.write_bytes(b"")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    assert export_qdq(cnn_cm8, path).path == path and path.stat().st_size > 0
    assert read_metadata(path).layers  # onnx reads it by name
    report = validate(path, cnn_cm8.calib, latency_batch_sizes=(1,), repeats=2, kernel_check=False)  # ORT, as bytes
    assert report.metrics.overall["accuracy"] > 0.5
    data = tmp_path / "data.bin"
    data.write_bytes(b"")
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="data.bin",
                    size_threshold=0)
    with pytest.raises(ModelLoadError, match="its path is not valid UTF-8, and ONNX Runtime opens a model with "
                                             "external data files by UTF-8 paths only; rename it"):
        validate(path, cnn_cm8.calib, latency_batch_sizes=(), kernel_check=False)


SPILL_UNDER_A_FILE_SIZE_LIMIT = """
import errno, resource, signal, sys
import torch
from fqexport.pipeline.activations import _save_spill
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
try:
    _save_spill([{"x": torch.zeros(100_000)}], __import__("pathlib").Path(sys.argv[1]))
except OSError as err:
    print(err.errno == errno.EFBIG, err.filename)
"""


def test_a_full_disk_under_the_activation_spill_is_said_as_such(tmp_path):
    """review 101: torch.save reports a full disk or file-size limit as "RuntimeError: [enforce fail at
    inline_container.cc:672] unexpected pos", with no OSError in its cause: the CLI said "this is a bug".
    The spill raises the OSError naming its file (which the CLI turns into exit 2 with the way out)."""
    import subprocess
    import sys

    import pytest

    if not hasattr(__import__("signal"), "SIGXFSZ"):
        pytest.skip("no file-size limit signal on this platform")
    run = subprocess.run([sys.executable, "-c", SPILL_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path / "b.pt")],
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["True", str(tmp_path / "b.pt")], run.stderr[-2000:]


def test_validate_writes_its_reports_for_a_file_name_that_is_not_utf8(cnn_cm8, tmp_path):
    """review 101: with ORT reading such a file, validate ran to the end and then crashed writing
    report.md (UnicodeEncodeError, exit 3): the name is written escaped."""
    import os

    import pytest

    from fqexport.exporters.qdq_onnx import export_qdq
    from fqexport.validation.gate import validate
    from fqexport.validation.reports import write_json, write_markdown

    path = tmp_path / os.fsdecode(b"m\xff.onnx")
    try:
        path.write_bytes(b"")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    export_qdq(cnn_cm8, path)
    report = validate(path, cnn_cm8.calib, latency_batch_sizes=(), kernel_check=False)
    write_json(report, tmp_path / "report.json")
    write_markdown(report, tmp_path / "report.md")
    assert "m\\udcff.onnx" in (tmp_path / "report.md").read_text()
