"""Tests of fqexport/model_graph.py: tracing, unsupported layers, BN folding, layers, MACs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fixtures_models as fm
from fqexport.errors import ModelLoadError, UnsupportedLayerError
from fqexport.graph.prepare import (
    MSG_NO_LAYERS,
    check_supported,
    count_macs,
    fold_batchnorm,
    prepare_model,
    quantizable_layers,
    trace,
    unsupported_layers,
)


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class WithConvTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.up(x).flatten(1))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize("norm", [nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.RMSNorm(8), nn.BatchNorm1d(8)])
def test_normalisation_layers_stay_float_ops_without_error(norm, caplog):
    net = WithLayerNorm()
    net.norm = norm
    with caplog.at_level("WARNING", logger="fqexport.graph.prepare"):
        assert check_supported(trace(net.eval()), skip_unsupported=False) == set()
    assert caplog.text == ""


def test_grouped_conv_transpose_is_unsupported_and_named():
    # groups=1 is quantized (per output channel, axis 1); grouped ones stay float
    assert unsupported_layers(trace(WithConvTranspose())) == []
    net = WithConvTranspose()
    net.up = nn.ConvTranspose2d(2, 4, 2, stride=2, groups=2)
    assert unsupported_layers(trace(net)) == [("up", "ConvTranspose2d(groups=2)")]


class OwnProjection(nn.Module):
    """Not a torch.nn class: fx traces into it and sees torch.matmul on a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.matmul(x, self.weight)


class TwoUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.proj = OwnProjection()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(self.proj(x))
        return self.fc(out[:, -1])


def test_strict_error_names_every_unsupported_layer():
    with pytest.raises(UnsupportedLayerError) as info:
        check_supported(trace(TwoUnsupported()), skip_unsupported=False)
    msg = str(info.value)
    assert msg.startswith("2 layer(s) cannot be quantized and strict=True (CLI: --strict) refuses float layers: ")
    assert "'rnn' (LSTM, 128 params)" in msg and "'proj' (F.matmul, 16 params)" in msg


class Products(nn.Module):
    """Parameters read by every kind of matrix product, beside one Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        for name in ("at", "method", "mm", "ein", "addmm"):
            setattr(self, name, nn.Parameter(torch.randn(4, 4)))
        self.bias = nn.Parameter(torch.zeros(4))  # one dim: not a weight
        self.pair = nn.Bilinear(4, 4, 4)  # a torch.nn module: a leaf, reported by its class

    def forward(self, x):
        h = self.fc(x) @ self.at
        h = h.matmul(self.method) + torch.mm(h, self.mm)
        h = torch.einsum("nk,kj->nj", h, self.ein.t())
        return self.pair(torch.addmm(self.bias, h, self.addmm), h)


def test_a_parameter_in_any_matrix_product_is_a_float_layer():
    assert unsupported_layers(trace(Products())) == [
        ("at", "torch.matmul"), ("method", "torch.matmul"), ("mm", "torch.mm"), ("ein", "torch.einsum"),
        ("addmm", "torch.addmm"), ("pair", "Bilinear")]
    with pytest.raises(UnsupportedLayerError, match=r"6 layer\(s\) cannot be quantized"):
        check_supported(trace(Products()), skip_unsupported=False)


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def test_lstm_is_unsupported_under_strict():
    with pytest.raises(UnsupportedLayerError, match=r"1 layer\(s\) cannot be quantized .*'rnn' \(LSTM, 128 params\)"):
        check_supported(trace(WithLSTM()), skip_unsupported=False)


def test_reflect_padding_conv_is_unsupported():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    assert unsupported_layers(trace(net)) == [("0", "Conv2d(padding_mode='reflect')")]


def test_skip_unsupported_returns_names_and_warns_once(caplog):
    with caplog.at_level("WARNING", logger="fqexport.graph.prepare"):
        skipped = check_supported(trace(WithLSTM()), skip_unsupported=True)
    assert skipped == {"rnn"}
    # LSTM weights 2 x 4x16 = 128 of 128 + fc 8 = 136 weight params
    assert "1 weight layer(s) stay in float (128 of 136 weight parameters, 94.1%): 'rnn' (LSTM, 128 params)" in caplog.text
    assert len(caplog.records) == 1


def test_the_float_layer_warning_comes_once_per_model_however_often_it_is_prepared(caplog):
    """compress, the sensitivity and each verification fit of a search prepare the user's model
    (compress on a copy): the warning is given once per model object, again for another one."""
    from fqexport.graph.prepare import prepare_model

    model, other = WithLSTM().eval(), WithLSTM().eval()
    with caplog.at_level("WARNING", logger="fqexport.graph.prepare"):
        for _ in range(3):
            prepare_model(model)
        prepare_model(copy.deepcopy(model), owner=model)  # compress prepares a copy on the model's behalf
        assert sum("stay in float" in r.getMessage() for r in caplog.records) == 1
        prepare_model(other)
    assert sum("stay in float" in r.getMessage() for r in caplog.records) == 2


def test_supported_model_has_no_unsupported_layers(cnn_model):
    assert unsupported_layers(trace(cnn_model)) == []


def test_untraceable_model_raises_model_load_error():
    with pytest.raises(ModelLoadError, match="cannot trace the model with torch.fx"):
        trace(DataDependent())
    # with a batch to export on, torch.export is tried too: both reasons are named
    with pytest.raises(ModelLoadError, match=r"cannot trace the model: torch.fx failed \(TraceError: .*\), and so did "
                                             r"torch.export on a batch of the data with a dynamic batch size \("):
        trace(DataDependent(), example=torch.randn(2, 4))


class SplitIntoList(nn.Module):
    """Ultralytics' C2f forward, verbatim: ``list(x.chunk(2, 1))`` iterates a tensor, which fx cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.m = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1)])
        self.cv2 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.fc(self.cv2(torch.cat(y, 1)).mean((2, 3)))


def test_a_model_fx_cannot_trace_is_traced_by_torch_export_with_its_layer_names(caplog):
    torch.manual_seed(0)
    net = SplitIntoList().eval()
    with torch.no_grad():
        net.cv1[1].running_mean.uniform_(-1, 1)
    x = torch.randn(5, 3, 6, 6)
    with caplog.at_level("INFO", logger="fqexport.graph.prepare"):
        prepared = prepare_model(net, example=x[:2])
    assert "torch.fx cannot trace the model (TraceError: " in caplog.text and "traced with torch.export" in caplog.text
    assert prepared.names == ["cv1.0", "m.0", "cv2", "fc"] and prepared.bn_convs == {"cv1.0"}
    with torch.no_grad():  # the batch stays dynamic: 5 samples through a graph exported on 2
        torch.testing.assert_close(prepared.folded(x), net(x), rtol=1e-4, atol=1e-5)


def test_bn_folding_preserves_outputs_and_reports_convs(cnn_model, cnn_data):
    folded, had_bn = fold_batchnorm(copy.deepcopy(cnn_model))
    assert had_bn == {"stem", "conv_a", "conv_b", "dw"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.stem.bias is not None  # the BN shift became a conv bias
    x = torch.from_numpy(cnn_data.x[:64])
    with torch.no_grad():
        diff = (folded(x) - cnn_model(x)).abs().max().item()
    assert diff < 1e-5


def test_bn_folding_does_not_change_the_input_weights(cnn_model):
    before = {k: v.clone() for k, v in cnn_model.state_dict().items()}
    fold_batchnorm(cnn_model)
    after = cnn_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bn_folding_leaves_input_training_mode_alone():
    net = fm.tiny_cnn().train()
    fold_batchnorm(net)
    assert net.stem_bn.training


def test_quantizable_layers_in_execution_order(cnn_model):
    folded, had_bn = fold_batchnorm(copy.deepcopy(cnn_model))
    layers = quantizable_layers(folded, skip={"pw"}, had_batchnorm=had_bn)
    assert [l.name for l in layers] == ["stem", "conv_a", "conv_b", "dw", "fc"]
    by = {l.name: l for l in layers}
    assert (by["stem"].kind, by["stem"].params, by["stem"].had_batchnorm) == ("conv", 8 * 3 * 9, True)
    assert (by["dw"].params, by["fc"].kind, by["fc"].params, by["fc"].had_batchnorm) == (8 * 9, "linear", 64, False)


def test_weight_sharing_is_refused():
    with pytest.raises(UnsupportedLayerError, match="layer 'fc' is called more than once in forward"):
        quantizable_layers(trace(Shared()))


def test_count_macs_conv_stride_padding_groups_and_linear():
    net = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),  # 9x9 -> 5x5
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise 5x5
        nn.Flatten(),
        nn.Linear(6 * 25, 3),
    )
    macs = count_macs(net, torch.zeros(2, 4, 9, 9), ["0", "1", "3"])
    # per sample: out elements x (in/groups · kh · kw) for convs, out x in for Linear
    assert macs == {"0": 6 * 25 * (2 * 9), "1": 6 * 25 * 9, "3": 3 * 150}
    assert not net[0]._forward_hooks  # hooks removed


class _Recurrent(nn.Module):
    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


class _CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(x)))


def test_count_macs_of_3d_convs_1d_transposed_convs_and_recurrent_layers():
    """Layers that stay float (Conv3d, ConvTranspose1d, GRU, LSTM) said 0 MACs in the compress table
    and the metadata (surveys 46, 47)."""
    conv3d = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1))
    assert count_macs(conv3d, torch.zeros(2, 1, 4, 6, 6), ["0"]) == {"0": 4 * 4 * 6 * 6 * 27}
    up = nn.Sequential(nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1))
    assert count_macs(up, torch.zeros(2, 16, 64), ["0"]) == {"0": 16 * 64 * 8 * 4}  # each input position · C_out · k
    # per step, layer and direction: gates · H · (input + state); T = 32 steps
    gru = _Recurrent(nn.GRU(2, 8, batch_first=True))
    assert count_macs(gru, torch.zeros(2, 32, 2), ["rnn"]) == {"rnn": 32 * 3 * 8 * (2 + 8)}
    lstm = _Recurrent(nn.LSTM(2, 8, num_layers=2, bidirectional=True))  # time first: [T, B, I]
    assert count_macs(lstm, torch.zeros(32, 2, 2), ["rnn"]) == {"rnn": 32 * 2 * 4 * 8 * ((2 + 8) + (16 + 8))}
    twice = _CalledTwice()  # a layer called twice computes twice (survey 70: one call's worth was said)
    assert count_macs(twice, torch.zeros(2, 8, 16, 16), ["shared"]) == {"shared": 2 * 8 * 16 * 16 * 8 * 9}
    proj = _Recurrent(nn.LSTM(2, 8, proj_size=3, batch_first=True))  # the state is the 3-wide projection
    assert count_macs(proj, torch.zeros(2, 5, 2), ["rnn"]) == {"rnn": 5 * (4 * 8 * (2 + 3) + 8 * 3)}


class DropoutByMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(nn.functional.dropout(x, 0.5, training=self.training))


def test_prepare_model_folds_bn_lists_layers_and_leaves_the_model_alone(cnn_model):
    model = copy.deepcopy(cnn_model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_model(model)
    assert prepared.names == ["stem", "conv_a", "conv_b", "dw", "pw", "fc"]
    assert prepared.bn_convs == {"stem", "conv_a", "conv_b", "dw"}
    assert [l.had_batchnorm for l in prepared.layers] == [True, True, True, True, False, False]
    assert prepared.skipped == frozenset()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.folded.modules())
    assert not prepared.folded.training and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(prepared.folded(x), cnn_model.eval()(x), rtol=1e-4, atol=1e-4)


def test_prepare_model_skip_rules():
    with pytest.raises(UnsupportedLayerError, match=r"'rnn' \(LSTM, 128 params\)"):
        prepare_model(WithLSTM(), skip_unsupported=False)
    prepared = prepare_model(WithLSTM())
    assert prepared.names == ["fc"] and prepared.skipped == {"rnn"}
    assert [(f.name, f.kind, f.params) for f in prepared.float_layers] == [("rnn", "LSTM", 128)]
    assert prepare_model(WithLayerNorm()).names == ["fc1", "fc2"]
    with pytest.raises(UnsupportedLayerError, match=MSG_NO_LAYERS):
        prepare_model(nn.Sequential(nn.ReLU()))


def test_prepare_model_traces_a_training_model_in_eval_mode():
    torch.manual_seed(0)
    model = DropoutByMode().train()
    prepared = prepare_model(model)
    x = torch.ones(64, 4)
    # dropout(training=self.training) is baked in at trace time: eval mode, so no dropout
    torch.testing.assert_close(prepared.folded(x), model.eval()(x))


class PlainSubclassBN(nn.BatchNorm2d):
    """A subclass that keeps nn.BatchNorm2d's forward (fx would trace into it and fail)."""


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style (timm 1.0's ``BatchNormAct2d``): it asserts its input's rank, then calls
    F.batch_norm on its parameters, then an activation. The rank read is a second user of the
    conv's output in the traced graph, which must not keep the BN from folding."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                           self.training, self.momentum, self.eps)
        return self.act(x)


class LayerNorm2d(nn.LayerNorm):
    """timm-style channels-first LayerNorm with its own forward."""

    def forward(self, x):
        return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight,
                                              self.bias, self.eps).permute(0, 3, 1, 2)


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), PlainSubclassBN(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), BatchNormAct2d(4)
        self.norm = LayerNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.norm(self.bn2(self.c2(self.bn1(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


def test_batchnorm_subclasses_fold_like_their_base():
    torch.manual_seed(0)
    net = SubclassNet()
    for bn in (net.bn1, net.bn2):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    net.eval()
    prepared = prepare_model(net, skip_unsupported=False)  # nothing is left in float
    assert prepared.bn_convs == {"c1", "c2"} and prepared.float_layers == ()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.folded.modules())
    ops = {n.target for n in prepared.folded.graph.nodes if n.op == "call_function"}
    assert torch.nn.functional.batch_norm not in ops
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(prepared.folded(x), net(x), rtol=1e-4, atol=1e-5)


class TransformerText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # x [B, 4, 8] -> sequence-first
        return self.fc(self.encoder(x.transpose(0, 1)).mean(0))


def test_transformer_encoder_linears_become_layers_with_the_same_outputs():
    torch.manual_seed(0)
    net = TransformerText().eval()
    prepared = prepare_model(net, skip_unsupported=False)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2"]
    assert prepared.names == [f"encoder.layers.{i}.{n}" for i in range(2) for n in per_layer] + ["fc"]
    assert isinstance(net.encoder, nn.TransformerEncoder)  # the user's model is not modified
    x = torch.randn(5, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(prepared.folded(x), net(x), rtol=1e-4, atol=1e-5)


class MaskedText(nn.Module):
    """Token ids → embeddings → attention whose padding mask is built from the ids in the forward."""

    def __init__(self, encoder: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.encoder = encoder
        if encoder:
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.attn = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        else:
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        if self.encoder:
            return self.fc(self.attn(h, src_key_padding_mask=ids == 0)[:, 0])
        a, _ = self.attn(h, h, h, key_padding_mask=ids == 0, need_weights=False)
        return self.fc((h + a)[:, 0])


@pytest.mark.parametrize("encoder", [False, True])
def test_a_padding_mask_built_from_the_token_ids_traces_with_the_same_outputs(encoder):
    torch.manual_seed(0)
    net = MaskedText(encoder).eval()
    ids = torch.randint(1, 20, (4, 6))
    ids[:, 4:] = 0  # padding
    prepared = prepare_model(net, example=ids, skip_unsupported=False)
    q = "attn.layers.0.self_attn.q_proj" if encoder else "attn.q_proj"
    assert q in prepared.names and prepared.names[-1] == "fc"
    with torch.no_grad():
        torch.testing.assert_close(prepared.folded(ids), net(ids), rtol=1e-4, atol=1e-5)


class DefaultAttention(nn.Module):
    """``nn.MultiheadAttention`` called as PyTorch's docs call it (need_weights=True by default)."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.masked = masked
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        pad = x[..., 0] > 1.0 if self.masked else None
        a, weights = self.attn(x, x, x, key_padding_mask=pad)
        return self.fc((x + a)[:, 0]) + weights[:, 0, :3]


@pytest.mark.parametrize("masked", [False, True])
def test_attention_called_with_its_default_need_weights_traces_with_the_same_outputs(masked):
    """The survey: ``a, _ = mha(h, h, h)`` without a mask crashed compress (the traced graph added
    the mask leaf's None to the scores)."""
    torch.manual_seed(0)
    net = DefaultAttention(masked).eval()
    x = torch.randn(4, 6, 8)
    prepared = prepare_model(net, example=x, skip_unsupported=False)
    assert "attn.q_proj" in prepared.names
    with torch.no_grad():
        torch.testing.assert_close(prepared.folded(x), net(x), rtol=1e-4, atol=1e-5)


class TimmLinear(nn.Linear):
    """timm.layers.Linear (1.0.x): a TorchScript branch, then the plain F.linear."""

    def forward(self, input):
        if torch.jit.is_scripting():
            bias = self.bias.to(dtype=input.dtype) if self.bias is not None else None
            return torch.nn.functional.linear(input, self.weight.to(dtype=input.dtype), bias=bias)
        return torch.nn.functional.linear(input, self.weight, self.bias)


class ScaledLinear(nn.Linear):
    """A subclass whose forward does more than F.linear: traced into, its weight computed from its parameter."""

    def forward(self, input):
        return torch.nn.functional.linear(input, self.weight * 2.0, self.bias)


def test_a_linear_subclass_whose_forward_is_f_linear_is_quantized_like_nn_linear():
    from fqexport.graph.prepare import prepare_model

    torch.manual_seed(0)
    for bias in (True, False):
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), TimmLinear(8, 3, bias=bias)).eval()
        p = prepare_model(net, skip_unsupported=False)
        assert p.names == ["0", "2"] and p.float_layers == ()
        x = torch.randn(4, 6)
        torch.testing.assert_close(p.folded(x), net(x))
    scaled = nn.Sequential(nn.Linear(6, 8), ScaledLinear(8, 3)).eval()
    other = prepare_model(scaled, skip_unsupported=False)
    # the weight it computes (2·W) is folded to its value: a Linear named after the subclass's parameters
    assert other.names == ["0", "1"] and other.float_layers == ()
    torch.testing.assert_close(other.folded.get_submodule("1").weight.detach(), 2.0 * scaled[1].weight.detach())
    torch.testing.assert_close(other.folded(x), scaled(x))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _Block()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def _hooked_model(where: str) -> nn.Module:
    torch.manual_seed(0)
    m = _Hooked()
    with torch.no_grad():
        m.block.bn.running_mean.uniform_(-0.5, 0.5)
        m.block.bn.running_var.uniform_(0.5, 2.0)
    m.eval()
    target = m if where == "" else m.get_submodule(where)
    if where in ("", "block"):
        target.register_forward_pre_hook(lambda mod, args: (args[0] * 3.0 + 1.0,))
    else:
        target.register_forward_hook(lambda mod, args, out: out * 2.0 + 0.3)
    return m


@pytest.mark.parametrize("where", ["", "block", "block.bn", "block.conv", "fc"])
def test_forward_hooks_are_part_of_the_prepared_model(where):
    """A hook on the model itself makes it traced by torch.export (fx leaves it out); a hook on a
    conv or its BN keeps the two unfolded: the prepared model computes what model(x) does."""
    model = _hooked_model(where)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        unhooked = copy.deepcopy(model)
        for m in unhooked.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        assert float((unhooked(x) - want).abs().max()) > 0.05  # the hook matters
        got = prepare_model(model, example=x).folded(x)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_hooks_fx_would_drop_without_an_example_are_refused():
    with pytest.raises(ModelLoadError, match=r"^the model has forward hooks on the model itself, which a "
                                             r"torch.fx trace leaves out .*Give an example batch"):
        trace(_hooked_model(""))
    for where in ("block", "fc"):  # a submodule's hook is traced, a leaf's runs: no refusal
        trace(_hooked_model(where))


class _ConvTwice(nn.Module):
    """One conv called twice, a BatchNorm after its first call only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc((self.bn(self.conv(x)) + self.conv(x)).mean((2, 3)))


def test_a_layer_called_twice_stays_float_and_its_bn_unfolded():
    torch.manual_seed(0)
    net = _ConvTwice().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 4, 6, 6)
    prepared = prepare_model(net, example=x)
    assert list(prepared.names) == ["fc"] and "conv" in prepared.skipped
    with torch.no_grad():  # folding the BN into the shared conv would change its second call too
        torch.testing.assert_close(prepared.folded(x), net(x), rtol=1e-5, atol=1e-5)


class _VarArgs(nn.Module):
    """A wrapper's ``forward(self, *inputs)``; ``both`` reads a second input too."""

    def __init__(self, both: bool = False) -> None:
        super().__init__()
        self.conv, self.fc, self.both = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2), both

    def forward(self, *inputs):
        h = torch.relu(self.conv(inputs[0])).mean((2, 3))
        return self.fc(h + inputs[1] if self.both else h)


def test_a_varargs_forward_takes_the_batch_as_its_first_input():
    """The traced graph takes the tensor itself: fed the batch where it wanted (x,), inputs[0] was one
    sample and the conv ran unbatched (survey 26: a 'group labels' error blamed the data)."""
    model = _VarArgs().eval()
    prepared = prepare_model(model, example=torch.randn(2, 3, 8, 8))
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(prepared.folded(x), model(x))
    assert [n.target for n in prepared.folded.graph.nodes if n.op == "placeholder"] == ["x"]
    with pytest.raises(ModelLoadError, match=r"forward takes \*inputs and uses more than its first item: .* wrap it"):
        prepare_model(_VarArgs(both=True).eval())


def test_a_batchnorm_without_running_statistics_is_warned_about(caplog):
    """It normalises each batch by its own statistics: per-group figures depend on the batch size (survey 28)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    with caplog.at_level("WARNING"):
        prepare_model(model, example=torch.randn(2, 3, 8, 8))
    assert "BatchNorm '1' keeps no running statistics (track_running_stats=False)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2)).eval(),
                      example=torch.randn(2, 3, 8, 8))
    assert "running statistics" not in caplog.text


class _LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: a token Linear, then BatchNorm1d on its rows ``[B·N, C]``."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(i, o, bias=False), nn.BatchNorm1d(o)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class _TokensWithNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp, self.mlp2 = _LinearNorm(8, 16), _LinearNorm(16, 8)
        self.a, self.b = nn.Conv1d(8, 4, 1), nn.Conv1d(8, 4, 3, padding=1)
        self.mixed_bn = nn.BatchNorm1d(8)  # after a concat of two convs (MixNet's mixed conv): folded per slice
        self.c, self.d = nn.Conv1d(8, 8, 1), nn.Conv1d(8, 8, 1)
        self.sum_bn = nn.BatchNorm1d(8)  # after a sum of two convs: stays, warned
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x + self.mlp2(torch.relu(self.mlp(x)))  # [B, N, 8]
        t = x.transpose(1, 2)
        t = torch.relu(self.mixed_bn(torch.cat([self.a(t), self.b(t)], 1)))
        t = self.sum_bn(self.c(t) + self.d(t))
        return self.head(t.mean(-1))


def test_a_batchnorm_on_a_linears_flattened_rows_is_folded_and_one_that_cannot_be_is_warned(caplog):
    """LeViT's LinearNorm left 48 float BatchNormalization nodes that no report named, MixNet's BN after
    a concat of convs 34 (survey 69); a BN after a sum stays, named in a warning."""
    torch.manual_seed(0)
    net = _TokensWithNorms().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 5, 8)
    with caplog.at_level("WARNING", logger="fqexport.graph.prepare"):
        prepared = prepare_model(net, example=x)
    bns = [n.target for n in prepared.folded.graph.nodes if n.op == "call_module"
           and isinstance(prepared.folded.get_submodule(n.target), nn.BatchNorm1d)]
    assert bns == ["sum_bn"] and {"a", "b"} <= set(prepared.bn_convs)
    assert "1 BatchNorm(s) cannot be folded into a conv or Linear" in caplog.text and "'sum_bn' (after add)" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(prepared.folded(x), net(x), rtol=1e-5, atol=1e-5)


class ImageAndMetadata(nn.Module):
    """A medical model's layout: image and patient metadata in one flat input, the metadata
    branch named ``meta``, a buffer named ``graph`` and a head named ``code`` (names torch.fx's
    GraphModule keeps for itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.meta = nn.Linear(4, 8)
        self.register_buffer("graph", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), persistent=False)
        self.code = nn.Sequential(nn.Linear(16, 3))

    def forward(self, x):
        img = x[:, :192].reshape(-1, 3, 8, 8) - self.graph
        a = torch.relu(self.conv(img)).mean((2, 3))
        return self.code(torch.cat([a, torch.relu(self.meta(x[:, 192:]))], 1))


def test_modules_and_buffers_named_like_graphmodule_attributes_are_traced_under_a_free_name(caplog):
    torch.manual_seed(0)
    model = ImageAndMetadata().eval()
    x = torch.randn(5, 196)
    with caplog.at_level("WARNING"):
        gm = trace(model)
    assert isinstance(gm.meta, dict) and isinstance(gm.meta_, nn.Linear) and isinstance(gm.get_submodule("code_.0"), nn.Linear)
    assert not gm.training
    torch.testing.assert_close(gm(x), model(x))
    assert "'code', 'graph', 'meta'" in caplog.text and "'code_', 'graph_', 'meta_'" in caplog.text
    prepared = prepare_model(model)
    assert prepared.names == ["conv", "meta_", "code_.0"]
    torch.testing.assert_close(prepared.folded(x), model(x))
    assert isinstance(model.meta, nn.Linear) and "meta_" not in dict(model.named_modules())  # the user's model kept


def test_a_model_with_a_meta_branch_compresses_and_exports_with_its_outputs(tmp_path):
    import numpy as np
    import onnxruntime as ort

    import fqexport
    from fqexport.calibration.group_data import GroupData

    torch.manual_seed(0)
    model = ImageAndMetadata().eval()
    x = np.random.default_rng(0).standard_normal((48, 196)).astype(np.float32)
    data = GroupData(x, np.arange(48) % 3, (np.arange(48) % 4 == 0).astype(np.int64), ("a", "b"), "meta.npz")
    cm = fqexport.compress(model, data, fqexport.QuantConfig(num_calib=48), progress=False)
    assert sorted(cm.layers) == ["code_.0", "conv", "meta_"]
    path = fqexport.export(cm, tmp_path / "meta.onnx").path
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


class _MetaAfterSplit(ImageAndMetadata):
    """The metadata branch behind C2f's ``list(x.split(...))``: torch.fx fails, torch.export traces."""

    def forward(self, x):
        img = x[:, :192].reshape(-1, 3, 8, 8) - self.graph
        a, b = list(torch.relu(self.conv(img)).split((4, 4), 1))
        return self.code(torch.cat([torch.cat([a, b], 1).mean((2, 3)), torch.relu(self.meta(x[:, 192:]))], 1))


def test_names_graphmodule_keeps_are_moved_on_the_torch_export_path_too(caplog):
    """Survey 91: the torch.export fallback rebuilt the module with `meta` and failed, advising a
    .pt2, which was refused for the same name."""
    torch.manual_seed(0)
    model, x = _MetaAfterSplit().eval(), torch.randn(5, 196)
    with caplog.at_level("WARNING"):
        prepared = prepare_model(model, example=x)
    assert sorted(prepared.names) == ["code_.0", "conv", "meta_"] and "traced as" in caplog.text
    torch.testing.assert_close(prepared.folded(x), model(x))


class _TiedAfterSplit(nn.Module):
    """An Embedding tied to the head, traced by torch.export (fx fails on the split): both read one
    weight there, as F.embedding and F.linear calls."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj, self.out = nn.Embedding(30, 16), nn.Linear(16, 16), nn.Linear(16, 30, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        a, b = list(self.emb(ids).split((8, 8), 2))
        return self.out(self.proj(torch.cat([a, b], 2).mean(1)))


def test_a_weight_tied_between_a_lookup_and_a_head_is_said_as_tied_not_as_called_twice():
    """Survey 95: the reason read 'F.linear called 2 times in forward()' for a head called once."""
    ids = torch.randint(0, 30, (4, 5))
    floats = {f.name: f for f in prepare_model(_TiedAfterSplit().eval(), skip_unsupported=True, example=ids).float_layers}
    (layer,) = floats.values()
    assert layer.kind == "one weight tied between F.embedding and F.linear (2 calls in forward())"
    assert layer.params == 30 * 16
