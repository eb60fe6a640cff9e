"""Tests of fqexport/fake_quant.py: where activation Q/DQ pairs go, freezing, the act_qdq op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fqexport.calibration.observers import make_observer
from fqexport.graph.act_quant import (
    ActQuantizer,
    GroupContext,
    act_qdq,
    insert_act_quantizers,
    round_biases_to_int32_grid,
)
from fqexport.graph.prepare import trace


def _minmax():
    return make_observer("minmax", 1)


def _by_source(gm, qs):
    """{name of the node feeding it: quantizer}."""
    return {str(n.args[0]): qs[str(n.target)] for n in gm.graph.nodes if str(n.target) in qs}


def _quantized_args(gm):
    """Name of the node feeding each inserted quantizer, in graph order."""
    return [str(n.args[0]) for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("act_quant")]


class ConvReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.c2(self.relu(self.c1(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        return torch.relu(y + self.c2(y))


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        return torch.relu(y) * y


def test_conv_relu_conv_placement():
    gm = trace(ConvReluConv())
    _, qs = insert_act_quantizers(gm, _minmax, {"c1", "c2"})
    assert len(qs) == 2
    # after the input and after the ReLU (not between conv and ReLU); the last conv's output is
    # the model output (logits) and stays float
    assert sorted(_quantized_args(gm)) == ["relu", "x"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.args[0].name == "c2"
    order = [n.name for n in gm.graph.nodes if n.op != "output"]
    assert order.index("c1") < order.index("relu")
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    assert relu.args[0].name == "c1"  # conv output feeds the ReLU directly


def test_functional_relu_is_recognised():
    class F(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.relu(self.fc(x))

    gm = trace(F())
    insert_act_quantizers(gm, _minmax, {"fc"})
    # fc's output goes through the ReLU straight to the model output: only the input is quantized
    assert sorted(_quantized_args(gm)) == ["x"]


def test_output_with_two_users_is_quantized_before_the_relu():
    gm = trace(TwoUsers())
    insert_act_quantizers(gm, _minmax, {"c1"})
    assert sorted(_quantized_args(gm)) == ["c1", "x"]


def test_residual_add_inputs_and_output_are_quantized():
    gm = trace(Residual())
    _, qs = insert_act_quantizers(gm, _minmax, {"c1", "c2"})
    # x; c1 output (shared by c2 and the add); c2 output; the add's ReLU output is the model
    # output and stays float
    assert sorted(_quantized_args(gm)) == ["c1", "c2", "x"]
    assert len(qs) == 3
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert all(str(a.target).startswith("act_quant") for a in add.args[:2])


def test_float_layers_get_no_pairs():
    gm = trace(ConvReluConv())
    _, qs = insert_act_quantizers(gm, _minmax, {"c2"})
    assert sorted(_quantized_args(gm)) == ["relu"]  # c2's input; its output is the model output
    gm2 = trace(ConvReluConv())
    _, qs2 = insert_act_quantizers(gm2, _minmax, set())
    assert qs2 == {}


def test_observing_is_identity_and_freeze_gives_observed_qparams():
    gm = trace(ConvReluConv())
    context, qs = insert_act_quantizers(gm, _minmax, {"c1", "c2"})
    x = torch.linspace(-1.0, 3.0, 2 * 36).reshape(2, 1, 6, 6)
    ref = ConvReluConv()
    ref.load_state_dict(gm.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(gm(x), ref(x))  # observing: no change
    by = _by_source(gm, qs)
    for q in qs.values():
        q.freeze()
    assert by["x"].scale == pytest.approx(4.0 / 255.0) and by["x"].zero_point == 64
    assert all(not q.observing for q in qs.values())
    assert by["relu"].zero_point == 0  # the ReLU output range starts at 0
    with torch.no_grad():  # frozen: the input is fake-quantized on the observed grid
        got = by["x"](x)
    assert torch.equal(got, torch.fake_quantize_per_tensor_affine(x, 4.0 / 255.0, 64, 0, 255))


def test_quantizer_feeds_group_ids_to_observer():
    seen = []

    class Spy:
        def observe(self, x, group):
            seen.append(group.tolist())

        def range(self):
            return (0.0, 1.0)

    ctx = GroupContext()
    q = ActQuantizer(Spy, ctx)
    q(torch.zeros(3, 2))
    ctx.group = torch.tensor([1, 0, 1])
    q(torch.zeros(3, 2))
    assert seen == [[0, 0, 0], [1, 0, 1]]
    q.freeze()
    assert "scale=0.00392157, zero_point=0" in q.extra_repr()


@pytest.mark.parametrize("scale, zp", [(0.02, 0), (4.0 / 255.0, 64), (0.1, 255)])
def test_act_qdq_equals_torch_fake_quantize(scale, zp):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    want = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
    assert torch.equal(act_qdq(x, scale, zp), want)
    assert torch.equal(torch.ops.fqexport.act_qdq(x, scale, zp), want)


def test_straight_through_estimator_of_act_qdq_matches_torch_fake_quantize():
    from fqexport.graph.act_quant import act_qdq

    x = torch.linspace(-3.0, 3.0, 41, requires_grad=True)
    scale, zp = 0.02, 100  # representable range [-2.0, 3.1]
    (g_ours,) = torch.autograd.grad((act_qdq(x, scale, zp) ** 2).sum(), x)
    (g_ref,) = torch.autograd.grad((torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255) ** 2).sum(), x)
    assert torch.equal(g_ours, g_ref)
    assert float(g_ours[0]) == 0.0 and float(g_ours[-1]) != 0.0  # clipped below, passed above


class PositionEmbedding(nn.Module):
    """``tokens + self.pos`` (a batch-1 parameter) is not a residual add; ``h + tokens`` is."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.pos = nn.Parameter(torch.randn(1, 3, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        tokens = self.proj(x) + self.pos
        h = self.fc(tokens)
        return (h + tokens).mean(1)


def test_parameter_add_is_not_residual_and_calibrates_with_groups():
    gm = trace(PositionEmbedding().eval())
    context, qs = insert_act_quantizers(gm, lambda: make_observer("minmax", 2), {"proj", "fc"})
    # proj in, proj out (the parameter add stays a float add: no pair on `pos`), fc in (the
    # parameter add's output, also the residual's other input), fc out, the residual's output
    assert _quantized_args(gm) == ["x", "proj", "add", "fc", "add_1"]
    context.group = torch.tensor([0, 1, 1, 0, 1])
    gm(torch.randn(5, 3, 4))  # before the fix: "group has 5 ids for a batch of 1 samples"
    assert all(q.observer.observed_groups() == [0, 1] for q in qs.values())


def test_observer_gets_the_batch_dim_of_sequence_first_tensors():
    context = GroupContext()
    q = ActQuantizer(lambda: make_observer("minmax", 2), context)
    context.group = torch.tensor([0, 1])
    x = torch.zeros(7, 2, 3)  # [L, B, E]
    x[:, 1] = 5.0  # only group 1 has large values
    q(x)
    assert q.observer.group_minmax() == [(0.0, 0.0), (5.0, 5.0)]


class LinearBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def test_biases_are_rounded_to_the_int32_grid_of_s_x_times_s_w():
    torch.manual_seed(0)
    gm = trace(LinearBias().eval())
    _, qs = insert_act_quantizers(gm, _minmax, {"fc"})
    gm(torch.linspace(-1.0, 1.0, 12).reshape(4, 3))
    for q in qs.values():
        q.freeze()
    with torch.no_grad():
        gm.fc.bias.copy_(torch.tensor([0.1234, -0.0577]))
    s_x = qs["act_quant_0"].scale  # the input's scale: 2/255
    s_w = torch.tensor([0.01, -0.02])  # a negative scale rounds with |s_w|
    assert round_biases_to_int32_grid(gm, {"fc": s_w}) == ["fc"]
    step = torch.tensor(s_x, dtype=torch.float32) * s_w.abs()
    # 0.1234 / (2/255 · 0.01) = 1573.35 -> 1573;  -0.0577 / (2/255 · 0.02) = -367.84 -> -368
    assert torch.equal(gm.fc.bias.detach(), torch.tensor([1573.0, -368.0]) * step)
    before = gm.fc.bias.detach().clone()
    round_biases_to_int32_grid(gm, {"fc": s_w})  # idempotent
    assert torch.equal(gm.fc.bias.detach(), before)


class _MaskedScores(nn.Module):
    """Hand-written attention with a BERT-style additive padding mask (``s + pad * -1e4``), or
    ``nn.MultiheadAttention`` with a key padding mask and its default ``need_weights=True``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        with torch.no_grad():
            self.q.weight.mul_(4)
            self.k.weight.mul_(4)  # peaky attention, as trained models have
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        pad = x[..., 0] > 0.8
        if self.kind == "additive":
            s = self.q(x) @ self.k(x).transpose(-1, -2) / 8 ** 0.5
            s = s + pad[:, None, :].float() * -10000.0
            h = x + self.o(s.softmax(-1) @ self.v(x))
        else:
            a, _ = self.mha(x, x, x, key_padding_mask=pad)
            h = x + a
        return self.head(h.mean(1))


@pytest.mark.parametrize("kind", ["additive", "mha"])
def test_a_mask_added_to_attention_scores_keeps_them_float(kind):
    """The scores + mask add is not a residual add: quantized, a uint8 grid over [-1e4, max] zeroed
    every score (attention went uniform) and a -inf mask raised 'activation contains NaN or Inf'
    (survey 20). The residual add after the attention keeps its pairs."""
    from fqexport.graph.act_quant import ActQuantizer

    import fqexport
    from fqexport.calibration.group_data import GroupData

    torch.manual_seed(0)
    net = _MaskedScores(kind).eval()
    x = torch.randn(256, 6, 8)
    x[:, 0, 0] = -1.0  # at least one key unmasked per sample
    with torch.no_grad():
        want = net(x)
    data = GroupData(x.numpy(), want.argmax(1).numpy(), np.arange(256) % 2, ("a", "b"), "m")
    cm = fqexport.compress(net, data, fqexport.QuantConfig(weight_bits=8), progress=False)
    got = torch.as_tensor(np.asarray(cm.predict(x.numpy())))
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.97
    scales = [float(m.scale) for m in cm.reference.modules() if isinstance(m, ActQuantizer)]
    assert len(scales) >= 2 and max(scales) < 0.1  # a pair over the -1e4 mask had a scale near 39
