"""Tests of fqexport/graph/lift.py on traced eager models: functional weight calls on parameters,
and weights computed from parameters alone (timm's weight-standardised convs), become layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqexport.config import QuantConfig
from fqexport.errors import UnsupportedLayerError
from fqexport.graph.prepare import prepare_model, trace
from fqexport.pipeline.compress import compress


class StdConv2d(nn.Conv2d):
    """timm.layers.StdConv2d (1.0.x): the weight standardised per output channel in forward."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.ScaledStdConv2d (NF-ResNet/NF-RegNet): standardised, times a learned gain."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.5))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _standardised(conv: nn.Conv2d, eps: float = 1e-6) -> torch.Tensor:
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    w = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + eps)
    return w.reshape_as(conv.weight)


def _ws_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.ReLU()),
        ScaledStdConv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def test_weight_standardised_convs_become_conv2d_layers_named_after_their_parameters():
    net = _ws_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = prepare_model(net, skip_unsupported=False)  # strict: nothing may stay float
    assert p.names == ["0.0", "1", "5"] and p.float_layers == ()
    conv = p.folded.get_submodule("0.0")
    assert type(conv) is nn.Conv2d and conv.padding == (1, 1)
    torch.testing.assert_close(conv.weight.detach(), _standardised(net[0][0]), rtol=1e-5, atol=1e-5)
    scaled = p.folded.get_submodule("1")
    assert type(scaled) is nn.Conv2d and scaled.bias is None
    gain = 1.5 * net[1].weight[0].numel() ** -0.5
    torch.testing.assert_close(scaled.weight.detach(), gain * _standardised(net[1], 1e-5), rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(p.folded(x), net(x), rtol=1e-5, atol=1e-5)
    # the user's model keeps its classes, parameters and attributes
    assert type(net[0][0]) is StdConv2d and type(net[1]) is ScaledStdConv2d
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any("folded" in n for n, _ in net.named_buffers())


def test_compress_quantizes_weight_standardised_convs(tmp_path):
    net = _ws_net()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, y=y.astype(np.int64), group=(np.arange(48) % 2).astype(np.int64))
    cm = compress(net, str(path), QuantConfig(weight_bits=4, num_calib=48), progress=False)
    assert sorted(cm.layers) == ["0.0", "1", "5"]
    assert cm.metadata.float_layers == () and cm.metadata.avg_weight_bits == pytest.approx(4.0)
    layer = cm.layers["0.0"]
    assert layer.bits == 4 and int(layer.codes.abs().max()) <= 8
    # the codes quantize the standardised weight, not the raw parameter
    err = (layer.dequantized() - _standardised(net[0][0])).abs().max() / _standardised(net[0][0]).abs().max()
    assert err < 0.2


class LeafAndComputed(nn.Module):
    """A conv called as a layer, whose weight also feeds a computed functional conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = self.conv(x) + F.conv2d(x, self.conv.weight * 0.5, padding=1)
        return self.head(y.mean((2, 3)))


def test_a_leaf_layer_whose_weight_also_feeds_a_computed_conv_is_left_alone():
    torch.manual_seed(0)
    net = LeafAndComputed().eval()
    p = prepare_model(net, skip_unsupported=False)
    lifted = [n for n in p.names if n not in ("conv", "head")]
    assert len(lifted) == 1 and p.names[0] == "conv"
    torch.testing.assert_close(p.folded.get_submodule(lifted[0]).weight.detach(), 0.5 * net.conv.weight.detach())
    assert set(dict(net.conv.named_buffers())) == set()  # nothing registered on the user's layer
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(p.folded(x), net(x))


class Functional(nn.Module):
    """F.linear on a parameter, a weight tied to an Embedding, a conv whose weight depends on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.k = nn.Parameter(torch.randn(2, 1, 3))

    def forward(self, ids):
        h = F.linear(self.emb(ids), self.w)  # (N, T, 4)
        dyn = F.conv1d(h.transpose(1, 2)[:1, :1], self.k * h.mean())  # weight scaled by the input
        return F.linear(h, self.emb.weight).mean(1) + dyn.mean()


def test_functional_calls_are_lifted_unless_tied_or_input_dependent():
    torch.manual_seed(0)
    net = Functional().eval()
    gm = trace(net)
    kinds = {n: type(m) for n, m in gm.named_modules() if n}
    assert kinds["emb"] is nn.Embedding
    lifted = [n for n, t in kinds.items() if t is nn.Linear]
    assert lifted == ["w"] and torch.equal(gm.get_submodule("w").weight, net.w)  # named after its parameter
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.conv1d in calls and calls.count(F.linear) == 1  # input-dependent weight; the tied head
    ids = torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), net(ids))
    with pytest.raises(UnsupportedLayerError, match=r"2 layer\(s\) .*'k' \(F\.conv1d with a weight computed from "
                                                    r"the input, 6 params\), 'emb' \(F\.linear, 40 params\)"):
        prepare_model(net, skip_unsupported=False)


class ComputedMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.proj = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return torch.matmul(self.fc(x), self.proj * 2.0)


def test_a_computed_weight_no_layer_takes_is_named_as_a_float_layer():
    net = ComputedMatmul().eval()
    p = prepare_model(net)
    assert p.names == ["fc"] and [(f.name, f.kind, f.params) for f in p.float_layers] == [("proj", "F.matmul", 12)]
    with pytest.raises(UnsupportedLayerError, match=r"'proj' \(F\.matmul, 12 params\)"):
        prepare_model(net, skip_unsupported=False)


class QkvWithComputedBias(nn.Module):
    """timm's BEiT attention: F.linear by keywords on the qkv weight, with a bias computed from
    its q and v biases (no k bias); then a keyword F.linear on the weight of a layer also called."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12, bias=False)
        self.q_bias = nn.Parameter(torch.randn(4))
        self.v_bias = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(12, 12)

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        h = F.linear(input=x, weight=self.qkv.weight, bias=bias)
        return F.linear(input=h, weight=self.head.weight) + self.head(h)


def test_a_bias_computed_from_parameters_is_folded_and_keyword_calls_are_seen():
    torch.manual_seed(0)
    net = QkvWithComputedBias().eval()
    p = prepare_model(net)
    assert p.names == ["qkv"]
    bias = p.folded.get_submodule("qkv").bias.detach()
    torch.testing.assert_close(bias, torch.cat((net.q_bias, torch.zeros(4), net.v_bias)).detach())
    # the keyword F.linear on the weight of a called layer stays a call; the layer stays float, named once
    assert [(f.name, f.kind, f.params) for f in p.float_layers] == [("head", "F.linear", 144)]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(p.folded(x), net(x))


class FunctionalAttention(nn.Module):
    """Projections written as F.linear on the module's own parameters (q, k, v, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.w_q, self.w_k, self.w_v, self.w_o = (nn.Parameter(torch.randn(8, 8) / 3) for _ in range(4))
        self.b_o = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        q, k, v = F.linear(x, self.w_q), F.linear(x, self.w_k), F.linear(x, self.w_v)
        return F.linear(F.scaled_dot_product_attention(q, k, v), self.w_o, self.b_o)


def test_several_functional_projections_of_one_module_are_named_after_their_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(FunctionalAttention(), nn.Flatten(), nn.Linear(32, 3)).eval()
    p = prepare_model(net, skip_unsupported=False)
    assert p.names == ["0.w_q", "0.w_k", "0.w_v", "0.w_o", "2"]
    assert torch.equal(p.folded.get_submodule("0.w_o").bias, net[0].b_o)
    assert isinstance(net[0].w_q, nn.Parameter)  # the user's module keeps its parameters
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(p.folded(x), net(x))


class CondConv(nn.Module):
    """CondConv: the conv's weight mixes expert kernels by routing weights computed from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.route = nn.Linear(4, 3)
        self.experts = nn.Parameter(torch.randn(3, 4 * 4 * 3 * 3) / 6)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        z = torch.relu(self.stem(x))
        a = torch.sigmoid(self.route(z.mean((2, 3))))[:1]  # one routing for the batch, as timm's batch-1 path
        w = (a @ self.experts).reshape(4, 4, 3, 3)
        return self.head(F.conv2d(z, w, padding=1).mean((2, 3)))


def test_a_weight_built_from_the_input_is_named_as_a_float_layer():
    torch.manual_seed(0)
    p = prepare_model(CondConv().eval())
    assert p.names == ["stem", "route", "head"]
    assert [(f.name, f.kind, f.params) for f in p.float_layers] == [
        ("experts", "F.conv2d with a weight computed from the input", 3 * 144)]
    with pytest.raises(UnsupportedLayerError, match=r"'experts' \(F\.conv2d with a weight computed from the input"):
        prepare_model(CondConv().eval(), skip_unsupported=False)


class PerSampleCondConv(nn.Module):
    """timm's CondConv2d: per-sample expert kernels, one conv over ``[1, B·C, H, W]`` with ``groups=B``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.route, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3), nn.Linear(4, 2)
        self.experts = nn.Parameter(torch.randn(3, 4 * 4 * 3 * 3) / 6)

    def forward(self, x):
        z = torch.relu(self.stem(x))
        B, C, H, W = z.shape
        w = (torch.sigmoid(self.route(z.mean((2, 3)))) @ self.experts).view(B * 4, 4, 3, 3)
        out = F.conv2d(z.reshape(1, B * C, H, W), w, padding=1, groups=B).view(B, 4, H, W)
        return self.head(out.mean((2, 3)))


def test_a_conv_whose_groups_come_from_the_batch_is_refused_before_any_work():
    """Survey 69: efficientnet_cc_b0_4e ran the solver for 62 s, then failed in the ONNX exporter with
    'Unsupported attribute type: SymbolicTensor', naming no layer."""
    with pytest.raises(UnsupportedLayerError, match=r"layer 'experts': F\.conv2d with groups computed from the input "
                                                    r"\(CondConv's groups = batch size\) cannot be exported"):
        prepare_model(PerSampleCondConv().eval(), example=torch.randn(2, 3, 8, 8))


class TwiceCalled(nn.Module):
    """One functional conv weight called twice; one computed weight (weight_norm by hand) fed to two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, 3, 3) / 5)
        self.g = nn.Parameter(torch.ones(3, 1, 1, 1))
        self.v = nn.Parameter(torch.randn(3, 3, 1, 1))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = F.conv2d(F.conv2d(x, self.w, padding=1), self.w, padding=1)
        k = self.g * self.v / self.v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self.head((F.conv2d(y, k) + F.conv2d(x, k)).mean((2, 3)))


def test_a_functional_weight_called_twice_stays_float_and_a_shared_computed_one_is_named_after_it():
    torch.manual_seed(0)
    net = TwiceCalled().eval()
    p = prepare_model(net)
    assert p.names == ["v", "v_1", "head"]  # the computed weight's copies: named after its parameter
    assert [(f.name, f.kind) for f in p.float_layers] == [("w", "F.conv2d called 2 times in forward()")]  # float, not refused
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(p.folded(x), net(x))


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # a user's legacy wrapper
@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "hook_weight_norm", "hook_spectral_norm"])
def test_a_parametrized_layer_is_quantized_with_the_weight_it_computes(wrap, tmp_path):
    from fqexport.exporters.qdq_onnx import export_qdq

    torch.manual_seed(0)
    wrapper = {"weight_norm": torch.nn.utils.parametrizations.weight_norm,
               "spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
               "hook_weight_norm": torch.nn.utils.weight_norm, "hook_spectral_norm": torch.nn.utils.spectral_norm}[wrap]
    net = nn.Sequential(wrapper(nn.Conv2d(3, 6, 3, padding=1)), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 3)).eval()
    x = np.random.default_rng(0).normal(size=(48, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():  # the forward first: hook-based spectral_norm sets its weight when it runs
        y = net(torch.from_numpy(x)).argmax(1).numpy()
        want = net[0].weight.detach().clone()
    p = prepare_model(net, skip_unsupported=False)
    conv = p.folded.get_submodule("0")
    assert type(conv) is nn.Conv2d and not conv._forward_pre_hooks
    torch.testing.assert_close(conv.weight.detach(), want)
    assert type(net[0]) is not nn.Conv2d or net[0]._forward_pre_hooks  # the user's layer keeps its wrapper
    np.savez(tmp_path / "c.npz", x=x, y=y.astype(np.int64), group=(np.arange(48) % 2).astype(np.int64))
    cm = compress(net, str(tmp_path / "c.npz"), QuantConfig(num_calib=48), progress=False)
    export_qdq(cm, tmp_path / "m.onnx")  # its check: the file agrees with the reference on this CPU's kernels
    assert sorted(cm.layers) == ["0", "4"] and (tmp_path / "m.onnx").is_file()
    with torch.no_grad():
        torch.testing.assert_close(net[0].weight, want)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch: the hook-based weight_norm is deprecated
def test_a_hook_weight_norm_model_compresses_without_a_forward_first(tmp_path):
    """torch.nn.utils.weight_norm leaves a non-leaf `weight` that copy.deepcopy refused: exit 3 (survey 28)."""
    torch.manual_seed(0)
    net = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 6, 3, padding=1)), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(6, 3)).eval()
    assert not net[0].weight.is_leaf  # the state a freshly wrapped layer is in
    x = np.random.default_rng(0).normal(size=(48, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=(np.arange(48) % 3).astype(np.int64), group=(np.arange(48) % 2).astype(np.int64))
    cm = compress(net, str(tmp_path / "c.npz"), QuantConfig(num_calib=48), progress=False)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(cm.predict(x, quantized=False), want, atol=1e-5)
    assert sorted(cm.layers) == ["0", "4"]
