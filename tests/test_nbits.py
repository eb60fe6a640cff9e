"""MatMulNBits layers: per-block scales from the solver (GPTQ's groupsize) and their export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fixtures_models as fm
from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.exporters.ort_session import fused_kernels
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.exporters.weight_nbits import NBITS_ACCURACY_LEVEL
from fqexport.pipeline.compress import compress
from fqexport.quant.solver import choose_solver_grid, layer_error, solve_layer
from fqexport.search.allocation import layer_container, stored_bytes
from fqexport.search.costs import layer_costs


def _blockwise_weight(out: int = 32, cols: int = 192, block: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight whose blocks of ``block`` columns have magnitudes 0.1, 1 and 3, and a Hessian of
    random inputs."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.tensor([0.1, 1.0, 3.0]).repeat_interleave(block)[:cols]
    w = torch.randn(out, cols, generator=g) * mags
    x = torch.randn(cols, 1024, generator=g)
    return w, 2 * x @ x.T / 1024


def test_block_scales_follow_the_blocks_and_cut_the_layer_error():
    w, h = _blockwise_weight()
    per_row = choose_solver_grid(w, h, 4)
    per_block = choose_solver_grid(w, h, 4, block=64)
    assert tuple(per_row.scale.shape) == (32,) and tuple(per_block.scale.shape) == (32, 3)
    # each row's scales follow its blocks' magnitudes (0.1, 1, 3)
    s = per_block.scale
    assert bool((s[:, 1] > 4 * s[:, 0]).all()) and bool((s[:, 2] > 1.5 * s[:, 1]).all())
    row = solve_layer(w, h, per_row)
    block = solve_layer(w, h, per_block)
    assert block.loss < 0.7 * row.loss, (block.loss, row.loss)
    # codes on the block grid reproduce the solver's dequantized weight
    cols = torch.arange(192) // 64
    np.testing.assert_allclose(block.qweight.numpy(), (block.codes * s[:, cols]).numpy(), rtol=1e-6)
    assert abs(layer_error(w, block.qweight, h) - block.loss) <= 1e-3 * block.loss


def _token_task(model: nn.Module, n: int = 256, seed: int = 0) -> GroupData:
    rng = np.random.default_rng(seed)
    group = (rng.random(n) < 0.25).astype(np.int64)
    x = rng.standard_normal((n, 192)).astype(np.float32)
    x[group == 1] = 1.5 * x[group == 1] + 0.3
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    return GroupData(x, y.astype(np.int64), group, ("majority", "minority"), "tokens")


def test_packed_token_linears_export_as_matmulnbits_with_the_solvers_block_scales(tmp_path):
    torch.manual_seed(0)
    model = fm.TokenMLP().eval()
    data = _token_task(model)
    cfg = QuantConfig(weight_bits=4, num_calib=128, batch_size=64, storage="packed")
    cm = compress(model, data, cfg, progress=False)
    fc2 = cm.layers["fc2"]
    assert fc2.block_size == 64 and tuple(fc2.scale.shape) == (24, 3)
    assert cm.layers["fc1"].block_size is None  # K = 24: one block of 32
    res = export_qdq(cm, tmp_path / "tokens.onnx")  # the export check: agreement on decided samples >= 99%
    assert res.storage == {"fc1": "nbits", "fc2": "nbits", "head": "nbits"}
    assert res.agreement >= 0.99
    model_ = onnx.load(str(res.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model_.graph.initializer}
    nodes = {n.name: n for n in model_.graph.node if n.op_type == "MatMulNBits"}
    assert set(nodes) == {"fc1_MatMulNBits", "fc2_MatMulNBits", "head_MatMulNBits"}
    node = nodes["fc2_MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["accuracy_level"] == NBITS_ACCURACY_LEVEL
    assert (attrs["K"], attrs["N"], attrs["block_size"]) == (192, 24, 64)
    # the file's scales are the solver's block scales, row-major (|s|: signs moved into the codes)
    np.testing.assert_array_equal(inits[node.input[2]], np.abs(fc2.scale.numpy()).reshape(-1))
    assert fused_kernels(res.path).get("MatMulNBits", 0) == 3


def test_auto_keeps_token_linears_per_row_int4_cast_and_packed_blocks_them_for_matmulnbits(tmp_path):
    torch.manual_seed(0)
    model = fm.TokenMLP().eval()
    data = _token_task(model, n=128)
    auto = compress(model, data, QuantConfig(weight_bits=4, num_calib=64, batch_size=64, method="rtn"), progress=False)
    # a token Linear: auto stores it per row in INT4 behind a Cast (the int8 kernel), not MatMulNBits
    assert auto.layers["fc2"].block_size is None
    res = export_qdq(auto, tmp_path / "auto.onnx")
    assert res.storage == {"fc1": "int4", "fc2": "int4", "head": "nbits"}
    assert fused_kernels(res.path)["MatMulIntegerToFloat"] == 2
    cfg = QuantConfig(weight_bits=4, num_calib=64, batch_size=64, method="rtn", storage="packed")
    cm = compress(model, data, cfg, progress=False)
    assert cm.layers["fc2"].block_size == 64 and cm.layers["fc2"].container == "nbits"
    # the exporter writes the container each layer holds (decided in compress), nothing else
    res = export_qdq(cm, tmp_path / "packed.onnx")
    assert res.storage == {n: l.container for n, l in cm.layers.items()} == {"fc1": "nbits", "fc2": "nbits", "head": "nbits"}
    assert fused_kernels(res.path)["MatMulNBits"] == 3


@pytest.mark.parametrize("storage", ["auto", "packed"])
def test_allocator_predicts_the_token_linears_container_and_bytes(tmp_path, storage):
    # one heuristic (model.token_linear: more MACs per sample than weights) decides, for the
    # allocator and the exporter alike, that a Linear over tokens is INT4 + Cast under "auto"
    torch.manual_seed(0)
    model = fm.TokenMLP().eval()
    data = _token_task(model, n=128)
    costs = {c.name: c for c in layer_costs(model, torch.from_numpy(data.x[:1]))}
    cm = compress(model, data, QuantConfig(weight_bits=4, num_calib=64, batch_size=64, method="rtn", storage=storage),
                  progress=False)
    res = export_qdq(cm, tmp_path / f"{storage}.onnx")
    predicted = {n: layer_container(costs[n], 4, storage) for n in costs}
    assert predicted == res.storage
    assert predicted["fc1"] == ("int4" if storage == "auto" else "nbits") and predicted["head"] == "nbits"
    written: dict[str, int] = {}  # codes, scales and zero points of each layer's weight, as written
    for t in onnx.load(str(res.path)).graph.initializer:
        layer, _, _ = t.name.partition(".weight")
        if layer in costs and t.name != f"{layer}.bias":
            written[layer] = written.get(layer, 0) + len(t.raw_data)
    assert written == {n: stored_bytes(costs[n], 4, storage) for n in costs}
