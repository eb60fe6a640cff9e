"""fqexport called from several threads of one process (a web service's pool, a notebook's
executor): torch.export's and the warnings module's process-wide state (survey 42)."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fqexport.config import QuantConfig
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.pipeline.compress import compress
from fqexport.quant.solver import DampingIncreasedWarning, _raised_damp, quiet_damping_retries


def test_exports_from_two_threads_at_once_both_succeed_and_match_one_at_a_time(mlp_model, mlp_data, tmp_path):
    """torch.onnx.export keeps its tracing state in process globals: two at once failed in 6 of 8
    tries ("Trying to pop empty mode stack") and could leave torch.backends.mkldnn off."""
    cm = compress(mlp_model, mlp_data, QuantConfig(num_calib=128), progress=False)
    alone = export_qdq(cm, tmp_path / "alone.onnx").path.read_bytes()
    mkldnn = torch.backends.mkldnn.enabled
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda i: export_qdq(cm, tmp_path / f"t{i}.onnx").path, range(4)))
    assert all(p.read_bytes() == alone for p in paths)
    assert torch.backends.mkldnn.enabled == mkldnn


def _own(filters):
    """The filters but those a library adds when torch imports it lazily (sympy's 'once')."""
    return [f for f in filters if "sympy" not in repr(f[2])]


def test_compress_in_threads_leaves_the_warning_filters_alone(mlp_model, mlp_data):
    """compress wrapped each solver call in warnings.catch_warnings, which swaps the process's
    filters: threads interleaving left one call's 'always'/record filters installed for good,
    and the caller's own warnings stopped showing."""
    compress(mlp_model, mlp_data, QuantConfig(num_calib=128), progress=False)  # torch's lazy imports add their filters
    before = _own(warnings.filters)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda b: compress(mlp_model, mlp_data, QuantConfig(weight_bits=b, num_calib=128),
                                         progress=False), (2, 3, 4, 8)))
    assert _own(warnings.filters) == before
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("the caller's own", UserWarning)
    assert [str(w.message) for w in seen] == ["the caller's own"]


def test_quiet_damping_retries_quiets_only_its_own_thread():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_damping_retries():
            assert _raised_damp(0.01, 1) == 0.1
            with ThreadPoolExecutor(1) as pool:  # another thread: its warning still shows
                assert pool.submit(_raised_damp, 0.1, 1).result() == np.float64(1.0)
        assert _raised_damp(1.0, 1) == 10.0
    assert [w.category for w in seen] == [DampingIncreasedWarning, DampingIncreasedWarning]
