"""Pipeline-level tests of the PTQ solver: compress(method="solver") on tiny models.

The solver's own math is tested in test_solver.py; here: does the whole pipeline get a better
model than RTN, does the export match in ONNX Runtime, does BN re-estimation help, are
per-layer widths honoured in the file, and does the group weighting reach the Hessian.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import fixtures_models as fm
from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.pipeline.compress import compress
from fqexport.quant.grid import weight_qmax

MLP_LAYERS = ("fc1", "fc2", "fc3")
MIXED = {"fc1": 3, "fc2": 6, "fc3": 2}


def _compress(model, data, **kw):
    kw.setdefault("num_calib", 256)
    return compress(model, data, QuantConfig(**kw), progress=False)


def _output_mse(cm, x: np.ndarray) -> float:
    """Mean squared logit error of the fake-quant model vs the BN-folded float model."""
    return float(((cm.predict(x) - cm.predict(x, quantized=False)) ** 2).mean())


def _weights_only_mse(cm, x: np.ndarray) -> float:
    """:func:`_output_mse` with every activation quantization point passing values through."""
    from fqexport.graph.act_quant import ActQuantizer

    points = [m for m in cm.reference.modules() if isinstance(m, ActQuantizer)]
    assert points
    for m in points:
        m.observing = True  # observing = identity
    try:
        return _output_mse(cm, x)
    finally:
        for m in points:
            m.observing = False


def _ort_logits(path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mlp_mixed(mlp_model, mlp_data):
    """The tiny MLP quantized by the solver at fc1 3 / fc2 6 / fc3 2 bits."""
    return _compress(mlp_model, mlp_data, layer_bits=MIXED)


@pytest.fixture(scope="module")
def mlp_mixed_export(tmp_path_factory, mlp_mixed):
    path = tmp_path_factory.mktemp("solver_export") / "mlp_mixed.onnx"
    return export_qdq(mlp_mixed, path)


class ConvBN(nn.Module):
    """conv-BN-ReLU ×2 + pool + Linear; BN statistics are set from data, weights random."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def convbn_model():
    """A conv+BN model whose BN running statistics are the exact statistics of image_task."""
    torch.manual_seed(0)
    model = ConvBN()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: after one pass = the batch statistics
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    data = fm.image_task(n=200, seed=3)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(data.x))
    return model.eval()


def _imbalanced(n: int = 600, minority: int = 40, seed: int = 5) -> GroupData:
    """The tabular task with all of group 'a' and only ``minority`` samples of group 'b'."""
    d = fm.tabular_task(n=n, seed=seed)
    keep = np.concatenate([np.flatnonzero(d.group == 0), np.flatnonzero(d.group == 1)[:minority]])
    return d.subset(np.sort(keep))


class _HessianSpy:
    """Records the Hessian the pipeline hands to the solver, layer by layer."""

    def __init__(self, monkeypatch) -> None:
        import fqexport.pipeline.compress as solver  # the layer loop's binding of solve_conv_groups

        self.hessians: list[torch.Tensor] = []
        real = solver.solve_conv_groups

        def spy(W, H, grid, **kw):
            self.hessians.append(H.detach().double().clone())
            return real(W, H, grid, **kw)

        monkeypatch.setattr(solver, "solve_conv_groups", spy)


def _group_hessian(x: np.ndarray) -> torch.Tensor:
    """H_g = 2 XᵀX / N of one group's layer inputs."""
    X = torch.from_numpy(x).double()
    return 2.0 * X.T @ X / X.shape[0]


# ------------------------------------------------------------------------------- tests


def test_solver_has_lower_output_error_than_rtn_at_3_bits(mlp_model, mlp_data):
    solver = _compress(mlp_model, mlp_data, weight_bits=3)
    rtn = _compress(mlp_model, mlp_data, weight_bits=3, method="rtn")
    plain_rtn = _compress(mlp_model, mlp_data, weight_bits=3, method="rtn", clip_search=False,
                          bias_correction=False)
    e_solver, e_rtn, e_plain = (_output_mse(cm, mlp_data.x) for cm in (solver, rtn, plain_rtn))
    # measured: solver 1.3, RTN (same clip search + bias correction) 5.2, plain RTN 3.0
    assert e_solver < 0.5 * e_rtn
    assert e_solver < 0.7 * e_plain
    # and the layers really differ: the solver moved codes away from nearest rounding
    diff = sum(int((solver.layers[n].codes != rtn.layers[n].codes).sum()) for n in MLP_LAYERS)
    assert diff > 0
    assert solver.metadata.method == "solver" and solver.metadata.order == "sensitivity"


def test_solver_export_matches_pytorch_in_onnx_runtime(mlp_mixed, mlp_mixed_export, mlp_data):
    res = mlp_mixed_export
    assert res.agreement is not None and res.agreement >= 0.99
    want = mlp_mixed.predict(mlp_data.x)
    got = _ort_logits(res.path, mlp_data.x)
    agreement = float(np.mean(got.argmax(1) == want.argmax(1)))
    scale = float(np.abs(want).max())
    assert agreement >= 0.99
    # activation rounding at 8 bits can flip a code here and there: small relative to the logits
    assert float(np.abs(got - want).max()) <= 0.05 * scale
    assert float(np.abs(got - want).mean()) <= 0.005 * scale


def test_per_layer_widths_are_honoured_in_the_onnx_file(mlp_mixed, mlp_mixed_export, mlp_model, mlp_data, tmp_path):
    # storage "auto": the 3-4-bit Linears of this MLP (one vector per sample) become MatMulNBits,
    # 2-bit ones INT2 behind a Cast to int8
    auto = onnx.load(str(mlp_mixed_export.path))
    nbits = [n for n in auto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == sum(1 for b in MIXED.values() if 3 <= b <= 4)
    assert mlp_mixed_export.storage == {n: "int2" if b <= 2 else "nbits" if b <= 4 else "int8" for n, b in MIXED.items()}
    assert all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nbits)
    # storage "packed": INT4 / INT2 containers hold the codes of the narrow layers; "int8": all
    # layers in int8 — the codes themselves are checked in the int8 export (the container is
    # decided in compress: the same fit with storage "int8")
    int8_cm = _compress(mlp_model, mlp_data, layer_bits=MIXED, storage="int8")
    assert {n: l.container for n, l in int8_cm.layers.items()} == {n: "int8" for n in MLP_LAYERS}
    int8 = export_qdq(int8_cm, tmp_path / "int8.onnx")
    model = onnx.load(str(int8.path))
    inits = {i.name: i for i in model.graph.initializer}
    for name in MLP_LAYERS:
        bits = MIXED[name]
        init = inits[f"{name}.weight_quantized"]
        assert f"{name}.weight" not in inits  # no float copy left
        assert init.data_type == TensorProto.INT8, name
        codes = numpy_helper.to_array(init).astype(np.int64)
        qmax = weight_qmax(bits)
        layer = int8_cm.layers[name]
        # rows with a negative scale (2-bit grids mirrored to put the 4th level on the positive
        # side) are stored negated with |scale|: codes -1..2 instead of -2..1
        sign = np.sign(layer.scale.numpy()).astype(np.int64)[:, None]
        if bits == 2:
            assert codes.min() >= -2 and codes.max() <= 2
            assert set(np.unique(layer.codes.numpy())) <= {-2, -1, 0, 1}
        else:
            assert codes.min() >= -qmax and codes.max() <= qmax, (name, codes.min(), codes.max())
            assert (sign > 0).all()
        assert np.array_equal(codes, layer.codes.numpy().astype(np.int64) * sign)
        scale = numpy_helper.to_array(inits[f"{name}.weight_scale"])
        assert np.array_equal(scale, np.abs(layer.scale.numpy()))
        # a 3-bit solver layer uses its whole grid, not only 0 (the solver did quantize)
        if bits == 3:
            assert set(np.unique(codes)) == set(range(-qmax, qmax + 1))
    meta = json.loads({p.key: p.value for p in auto.metadata_props}["fqexport"])
    assert {r["name"]: r["bits"] for r in meta["layers"]} == MIXED
    assert {r["name"]: r["storage"] for r in meta["layers"]} == mlp_mixed_export.storage
    assert meta["method"] == "solver"


def test_bn_reestimation_lowers_output_error(convbn_model):
    data = fm.image_task(n=200, seed=4)
    # Solver with a clipped grid at 3 bits: the conv outputs' per-channel statistics shift
    # visibly, which re-estimation undoes (measured: output MSE 1.27x lower). With small errors (no
    # clipping) the rescale is within noise, and it is not an MSE-optimal shrinkage.
    # Layer target: with the default float-output target the next conv already absorbs most of
    # that shift (this model: re-estimation is then within noise, 5.9e-5 vs 5.3e-5).
    kw = dict(weight_bits=3, num_calib=128, clip_search=True, solver_target="layer")
    on = _compress(convbn_model, data, **kw)
    off = _compress(convbn_model, data, bn_reestimate=False, **kw)
    # what re-estimation targets is the weights' error: measured with activation QDQ off
    # (measured 0.81x); the full fake-quant model gains too (0.84x with min-max ranges)
    w_on, w_off = _weights_only_mse(on, data.x), _weights_only_mse(off, data.x)
    assert w_on < 0.9 * w_off, (w_on, w_off)
    e_on, e_off = _output_mse(on, data.x), _output_mse(off, data.x)
    assert e_on < 0.95 * e_off, (e_on, e_off)
    # BN re-estimation only rescales the per-channel scales of the BN convs: codes unchanged
    for name in ("c1", "c2"):
        assert not torch.equal(on.layers[name].scale, off.layers[name].scale)


def test_group_weights_reach_the_hessian_when_groups_are_imbalanced(monkeypatch, mlp_model):
    calib = _imbalanced()
    counts = calib.group_counts()
    assert counts[1] / counts.sum() < 0.15
    h_major, h_minor = (_group_hessian(calib.x[calib.group == g]) for g in (0, 1))

    spy_eq = _HessianSpy(monkeypatch)
    equal = _compress(mlp_model, calib, weight_bits=3, num_calib=len(calib))
    spy_s = _HessianSpy(monkeypatch)
    samples = _compress(mlp_model, calib, weight_bits=3, num_calib=len(calib), group_weights="samples")

    # fc1 sees the raw inputs: H = Σ_g α_g 2 X_gᵀX_g / N_g with α = (½, ½) or the sample shares
    p = counts / counts.sum()
    want_eq = 0.5 * h_major + 0.5 * h_minor
    want_s = p[0] * h_major + p[1] * h_minor
    assert torch.allclose(spy_eq.hessians[0], want_eq, rtol=1e-4, atol=1e-4)
    assert torch.allclose(spy_s.hessians[0], want_s, rtol=1e-4, atol=1e-4)
    assert (spy_eq.hessians[0] - spy_s.hessians[0]).abs().max() > 0.1 * want_s.abs().max()
    assert list(equal.metadata.group_weights) == [0.5, 0.5]
    assert list(samples.metadata.group_weights) == pytest.approx(list(p), abs=1e-6)

    # the result differs, and the minority's layer error is lower when it counts as much
    assert not torch.equal(equal.layers["fc1"].codes, samples.layers["fc1"].codes)
    w = mlp_model.fc1.weight.detach().double()

    def err(cm, h):
        d = w - cm.layers["fc1"].dequantized().double()
        return float(((d @ h) * d).sum())

    assert err(equal, h_minor) < err(samples, h_minor)
    assert err(samples, h_major) < err(equal, h_major)


def test_sample_weights_follow_the_calibration_population(mlp_model):
    calib = fm.tabular_task(n=600, seed=6)  # ~30 % minority
    share = calib.group_counts() / len(calib)
    samples = _compress(mlp_model, calib, weight_bits=3, num_calib=200, group_weights="samples")
    equal = _compress(mlp_model, calib, weight_bits=3, num_calib=200)
    assert list(equal.metadata.group_weights) == [0.5, 0.5]
    assert list(samples.metadata.group_weights) == pytest.approx(list(share), abs=1e-3)


@pytest.mark.parametrize("fixture", ["mlp", "convbn"])
def test_float_output_target_lowers_the_model_output_error(request, fixture):
    if fixture == "mlp":
        model, data = request.getfixturevalue("mlp_model"), request.getfixturevalue("mlp_data")
    else:
        model, data = request.getfixturevalue("convbn_model"), fm.image_task(n=200, seed=4)
    kw = dict(weight_bits=3, num_calib=128)
    layer = _compress(model, data, solver_target="layer", **kw)
    target = _compress(model, data, **kw)
    assert target.metadata.solver_target == "float-output" and layer.metadata.solver_target == "layer"
    # the first layer sees the raw input (no upstream error): identical codes either way
    first = next(iter(target.layers))
    assert torch.equal(target.layers[first].codes, layer.layers[first].codes)
    e_target, e_layer = _output_mse(target, data.x), _output_mse(layer, data.x)
    assert e_target < 0.9 * e_layer, (e_target, e_layer)


def test_solver_target_is_checked():
    with pytest.raises(Exception, match=r"solver_target='output' is not one of float-output, layer"):
        QuantConfig(solver_target="output")
