"""Tests of the GPU target's symmetric int8 activation quantization: fqexport/quant/grid.py
(act_qparams, fake_quantize_act with ``symmetric``) and fqexport/graph/act_quant.py (the
``fqexport::act_qdq`` op, ActQuantizer, insert_act_quantizers with ``symmetric`` and
``weight_only``), and its ONNX translation (exporters/act_qdq.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqexport.calibration.observers import make_observer
from fqexport.exporters.torch_export import torch_to_onnx
from fqexport.graph.act_quant import ActQuantizer, GroupContext, act_qdq, insert_act_quantizers
from fqexport.graph.prepare import trace
from fqexport.quant.grid import act_code_range, act_qparams, fake_quantize_act


def _minmax():
    return make_observer("minmax", 1)


def _quantized_args(gm):
    return [str(n.args[0]) for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("act_quant")]


def test_symmetric_qparams_map_the_largest_magnitude_to_127_with_zero_point_0():
    assert act_qparams(-1.0, 3.0, symmetric=True) == (pytest.approx(3.0 / 127), 0)
    assert act_qparams(-5.0, 2.0, symmetric=True) == (pytest.approx(5.0 / 127), 0)
    assert act_qparams(0.0, 6.0, symmetric=True) == (pytest.approx(6.0 / 127), 0)  # after a ReLU: half the codes
    assert act_qparams(0.0, 0.0, symmetric=True) == (1.0, 0)  # a zero range: scale 1, as ORT's quantizer
    assert act_qparams(-1.0, 3.0) == (pytest.approx(4.0 / 255), 64)  # the uint8 scheme unchanged
    assert act_code_range(True) == (-128, 127) and act_code_range(False) == (0, 255)


def test_symmetric_fake_quant_is_quantizelinear_int8_then_dequantizelinear():
    x = torch.linspace(-4.0, 4.0, 101)
    s, _ = act_qparams(-3.0, 3.0, symmetric=True)
    got = fake_quantize_act(x, s, 0, symmetric=True)
    want = torch.clamp(torch.round(x / s), -128, 127) * s  # ONNX: saturate to int8, round half to even
    assert torch.equal(got, want)
    assert float(got.min()) == pytest.approx(-128 * s) and float(got.max()) == pytest.approx(127 * s)


@pytest.mark.parametrize("scale", [0.01, 3.0 / 127])
def test_act_qdq_symmetric_equals_torch_fake_quantize_and_its_ste_clips_at_int8(scale):
    x = (torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_(True)
    want = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    assert torch.equal(act_qdq(x, scale, 0, True), want)
    assert torch.equal(torch.ops.fqexport.act_qdq(x, scale, 0, True), want)
    (g_ours,) = torch.autograd.grad((act_qdq(x, scale, 0, True) ** 2).sum(), x)
    (g_ref,) = torch.autograd.grad((want ** 2).sum(), x)
    assert torch.equal(g_ours, g_ref)


def test_symmetric_quantizer_freezes_to_int8_codes():
    q = ActQuantizer(_minmax, GroupContext(), symmetric=True)
    q(torch.tensor([[-0.5, 2.54]]))
    q.freeze()
    assert (q.scale, q.zero_point) == (pytest.approx(2.54 / 127), 0) and q.codes == (-128, 127)
    assert q.extra_repr() == "scale=0.02, zero_point=0, int8 symmetric"
    x = torch.tensor([[-3.0, -0.5, 1.0, 2.54, 9.0]])
    assert torch.equal(q(x), torch.fake_quantize_per_tensor_affine(x, q.scale, 0, -128, 127))
    assert ActQuantizer(_minmax, GroupContext()).codes == (0, 255)


class _Affine(nn.Module):
    def __init__(self, scale: float, symmetric: bool) -> None:
        super().__init__()
        self.scale, self.symmetric = scale, symmetric

    def forward(self, x):
        return act_qdq(x, self.scale, 0, True) if self.symmetric else act_qdq(x, self.scale, 128)


@pytest.mark.parametrize("symmetric", [True, False], ids=["int8", "uint8"])
def test_onnx_translation_writes_the_zero_point_type_of_the_scheme_and_ort_matches(symmetric):
    s = 0.05
    model = torch_to_onnx(_Affine(s, symmetric), torch.zeros(2, 8), what="quantized")
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for node in (n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")):
        zp = inits.get(node.input[2])
        dtype = zp.data_type if zp is not None else onnx.helper.get_attribute_value(consts[node.input[2]].attribute[0]).data_type
        assert dtype == (onnx.TensorProto.INT8 if symmetric else onnx.TensorProto.UINT8)
    x = np.linspace(-8.0, 8.0, 16, dtype=np.float32).reshape(2, 8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    ref = _Affine(s, symmetric)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, ref)
    if symmetric:
        assert got.min() == pytest.approx(-128 * s) and got.max() == pytest.approx(127 * s)


class _Block(nn.Module):
    """conv → ReLU → residual add with the input; a padded conv; a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.pad = nn.ZeroPad2d(1)
        self.c2 = nn.Conv2d(2, 2, 3)
        self.c3 = nn.Conv2d(2, 2, 3)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        y = torch.relu(self.c1(x)) + x
        y = self.c2(self.pad(y))
        y = self.c3(F.pad(y, (1, 1, 1, 1), mode="reflect"))
        return self.fc(y.mean((2, 3)))


def test_gpu_placement_puts_the_pair_before_explicit_pads_and_keeps_the_cpu_placement_otherwise():
    cpu = trace(_Block())
    insert_act_quantizers(cpu, _minmax, {"c1", "c2", "c3", "fc"})
    assert _quantized_args(cpu) == ["x", "relu", "add", "pad", "c2", "pad_1", "c3", "mean"]
    gpu = trace(_Block())
    _, qs = insert_act_quantizers(gpu, _minmax, {"c1", "c2", "c3", "fc"}, symmetric=True)
    # c2 and c3 read their Pad: the pair sits on the Pad's input (add's output and c2's output)
    assert _quantized_args(gpu) == ["x", "relu", "add", "c2", "c3", "mean"]
    assert all(q.symmetric for q in qs.values())
    pads = [n for n in gpu.graph.nodes if n.name in ("pad", "pad_1")]
    assert all(str(p.args[0].target).startswith("act_quant") for p in pads)
    assert [str(n.args[0]) for n in gpu.graph.nodes if n.name in ("c2", "c3")] == ["pad", "pad_1"]


class _MixedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(h)) + h)


def test_weight_only_layers_get_no_pairs_and_read_the_float_tensor():
    gm = trace(_MixedMLP())
    insert_act_quantizers(gm, _minmax, {"fc1", "fc2", "fc3"}, symmetric=True, weight_only={"fc2", "fc3"})
    # x and fc1's output after its ReLU (fc1 is int8; its output also feeds the residual add), fc2's
    # ReLU output as the add's other input; no pair for fc2's input, fc3's input (the add's output)
    # or fc2's own output
    assert _quantized_args(gm) == ["x", "relu", "relu_1"]
    fc2 = next(n for n in gm.graph.nodes if n.name == "fc2")
    assert fc2.args[0].name == "relu"  # fc2 reads fc1's float output, the add reads the pair
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert all(str(a.target).startswith("act_quant") for a in add.args[:2])
    fc3 = next(n for n in gm.graph.nodes if n.name == "fc3")
    assert fc3.args[0].name == "add"


def test_fine_tuning_keeps_the_quantizers_int8_codes():
    from fqexport.finetune.qat import LearnableActQuant

    q = ActQuantizer(_minmax, GroupContext(), symmetric=True)
    q(torch.tensor([[-1.0, 2.54]]))
    q.freeze()
    learned = LearnableActQuant(q)
    assert (learned.qmin, learned.qmax, learned.zero_point) == (-128, 127, 0)
    x = torch.linspace(-4.0, 4.0, 33).reshape(1, -1)
    with torch.no_grad():
        assert torch.allclose(learned(x), q(x), atol=1e-7)  # the untrained student computes what PTQ computes
    u8 = ActQuantizer(_minmax, GroupContext())
    u8(torch.tensor([[-1.0, 2.54]]))
    u8.freeze()
    assert (LearnableActQuant(u8).qmin, LearnableActQuant(u8).qmax) == (0, 255)
