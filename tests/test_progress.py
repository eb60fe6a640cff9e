"""Progress bars where there is no stderr to draw on."""

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
