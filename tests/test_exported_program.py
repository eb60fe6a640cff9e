"""Tests of fqexport/exported_program.py: a torch.export .pt2 becomes a module-based graph."""

from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from conftest import run_main
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.npz import save_npz
from fqexport.config import QuantConfig
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.graph.loading import load_model
from fqexport.graph.prepare import fold_batchnorm, quantizable_layers, trace
from fqexport.pipeline.compress import compress


class ConvBnLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6, eps=1e-3))
        self.head = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def pt2(tmp_path_factory, cnn_data):
    torch.manual_seed(0)
    net = ConvBnLinear()
    with torch.no_grad():  # non-trivial BN statistics
        net.features[1].running_mean.uniform_(-0.5, 0.5)
        net.features[1].running_var.uniform_(0.5, 2.0)
        net.features[1].weight.uniform_(0.5, 1.5)
        net.features[1].bias.uniform_(-0.2, 0.2)
    net.eval()
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.from_numpy(cnn_data.x[:2]),)), str(path))
    return net, path


def test_calls_are_lifted_to_named_modules(pt2):
    _, path = pt2
    gm = load_model(str(path))
    mods = dict(gm.named_modules())
    assert isinstance(mods["features.0"], nn.Conv2d) and mods["features.0"].stride == (2, 2)
    assert mods["features.0"].padding == (1, 1) and mods["features.0"].bias is None
    assert isinstance(mods["features.1"], nn.BatchNorm2d) and mods["features.1"].eps == pytest.approx(1e-3)
    assert isinstance(mods["head"], nn.Linear) and mods["head"].in_features == 384
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.conv2d.default not in targets and torch.ops.aten.linear.default not in targets


def test_lifted_graph_matches_eager_outputs(pt2, cnn_data):
    net, path = pt2
    gm = load_model(str(path))
    x = torch.from_numpy(cnn_data.x[:32])
    with torch.no_grad():
        assert torch.allclose(gm(x), net(x), atol=1e-6)
        assert gm(x[:5]).shape == (5, 4)  # a plain positional forward with any batch size


def test_lifted_graph_is_traceable_and_bn_folds(pt2, cnn_data):
    _, path = pt2
    gm = load_model(str(path))
    assert trace(gm) is gm
    folded, had_bn = fold_batchnorm(gm)
    assert had_bn == {"features.0"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.from_numpy(cnn_data.x[:32])
    with torch.no_grad():
        assert (folded(x) - gm(x)).abs().max().item() < 1e-5
    assert [l.name for l in quantizable_layers(folded, had_batchnorm=had_bn)] == ["features.0", "head"]


def test_compress_and_export_from_pt2(pt2, cnn_data, tmp_path):
    net, path = pt2
    with torch.no_grad():
        y = net(torch.from_numpy(cnn_data.x)).argmax(1).numpy()  # labels the float model gets right
    data = GroupData(cnn_data.x, y, cnn_data.group, cnn_data.group_names, "pt2-task")
    cm = compress(load_model(str(path)), data, QuantConfig(method="rtn", num_calib=128), progress=False)
    assert list(cm.layers) == ["features.0", "head"] and cm.layers["features.0"].bits == 8
    assert np.mean(cm.predict(data.x).argmax(1) == y) >= 0.97
    res = export_qdq(cm, tmp_path / "pt2.onnx")
    assert res.path.is_file() and res.agreement >= 0.99
    assert res.storage == {"features.0": "int8", "head": "int8"}


def test_tiny_cnn_pt2_gets_the_same_layers_and_quantizers_as_eager(cnn_model, cnn_data, tmp_path):
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(cnn_model, (torch.from_numpy(cnn_data.x[:2]),)), str(path))
    gm = load_model(str(path))
    cfg = QuantConfig(method="rtn", num_calib=64)
    from_pt2 = compress(gm, cnn_data, cfg, progress=False)
    eager = compress(cnn_model, cnn_data, cfg, progress=False)
    assert list(from_pt2.layers) == list(eager.layers)

    def n_quantizers(cm):
        return sum(1 for n in cm.reference.graph.nodes if str(n.target).startswith("act_quant"))

    assert n_quantizers(from_pt2) == n_quantizers(eager) == 8  # the logits stay float
    for name in eager.layers:
        assert torch.equal(from_pt2.layers[name].codes, eager.layers[name].codes), name


class InPlaceResidual(nn.Module):
    """torchvision-style: ReLU(inplace=True) and ``out += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += x
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


def test_inplace_aten_relu_and_add_get_the_eager_quantizers(cnn_data, tmp_path):
    torch.manual_seed(0)
    net = InPlaceResidual().eval()
    path = tmp_path / "inplace.pt2"
    torch.export.save(torch.export.export(net, (torch.from_numpy(cnn_data.x[:2]),)), str(path))
    gm = load_model(str(path))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {torch.ops.aten.relu_.default, torch.ops.aten.add_.Tensor} <= targets  # what torch.export keeps
    cfg = QuantConfig(method="rtn", num_calib=64)
    from_pt2 = compress(gm, cnn_data, cfg, progress=False)
    eager = compress(net, cnn_data, cfg, progress=False)

    def quantized_tensors(cm):
        """What each quantizer quantizes, as the op producing its input ("relu" for relu/relu_)."""
        out = []
        for n in cm.reference.graph.nodes:
            if n.op == "call_module" and str(n.target).startswith("act_quant"):
                src = n.args[0]
                name = "input" if src.op == "placeholder" else str(src.target)
                out.append({"aten.relu_.default": "relu", "aten.mean.dim": "mean"}.get(name, name))
        return out

    # pairs after the ReLUs (ORT drops them), on the residual add's output (after its ReLU) and
    # inputs (x, conv2's output); without in-place matching the .pt2 got a pair before relu_
    # (on conv1) and a float add: ['input', 'conv1', 'relu', 'conv2', 'mean']
    assert quantized_tensors(from_pt2) == quantized_tensors(eager) == ["input", "relu", "conv2", "relu", "mean"]
    res = export_qdq(from_pt2, tmp_path / "inplace.onnx")
    assert res.agreement >= 0.99


# --------------------------------------------------------------------------- BatchNorm1d, Conv1d, Embedding
# A .pt2 of a Linear+BatchNorm1d MLP or a Conv1d+BatchNorm1d sequence net was refused with a data
# error ("expected 4D input (got 2D input)": every aten.batch_norm became an nn.BatchNorm2d), its
# Conv1d layers and Embeddings stayed float F.conv1d/F.embedding. They now get the modules, BN folding,
# layer kinds, bits and codes of the factory path.


class TabMLP(nn.Module):
    """Tabular MLP on [N, 12]: Linear → BatchNorm1d → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32, eps=1e-3), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(x))


class Seq1D(nn.Module):
    """Sequence net on [N, 4, 32]: Conv1d(stride 2) → BatchNorm1d → ReLU → dilated grouped Conv1d → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, stride=2, padding=2, bias=False)
        self.b1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        return self.fc(torch.relu(self.c2(x)).mean(2))


class EmbBag(nn.Module):
    """Bag of words over int64 token ids [N, 10]: Embedding(padding_idx=0) → mean → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def _randomize_bn(net: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-trivial BN statistics
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _inputs(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "tab":
        return rng.standard_normal((n, 12)).astype(np.float32)
    if kind == "seq":
        return rng.standard_normal((n, 4, 32)).astype(np.float32)
    return rng.integers(0, 50, (n, 10)).astype(np.int64)


_NETS = {"tab": TabMLP, "seq": Seq1D, "emb": EmbBag}


@pytest.fixture(scope="module")
def small_pt2s(tmp_path_factory):
    """kind -> (eager model, its .pt2 with a dynamic batch, data labelled by the float model)."""
    d = tmp_path_factory.mktemp("pt2_small")
    out = {}
    for kind, cls in _NETS.items():
        torch.manual_seed(0)
        net = _randomize_bn(cls())
        x = _inputs(kind, 240)
        ep = torch.export.export(net, (torch.from_numpy(x[:4]),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        torch.export.save(ep, str(d / f"{kind}.pt2"))
        with torch.no_grad():
            y = net(torch.from_numpy(x)).argmax(1).numpy()
        group = (np.random.default_rng(1).random(len(x)) < 0.3).astype(np.int64)
        out[kind] = (net, d / f"{kind}.pt2", GroupData(x, y, group, ("a", "b"), f"pt2-{kind}"))
    return out


def _lifted_types(gm) -> dict[str, type]:
    """Each named layer module of ``gm`` (the plain containers of torch.export's unflattening left out)."""
    return {name: type(m) for name, m in gm.named_modules() if name and type(m) is not nn.Module}


def _aten_weight_calls(gm) -> set:
    aten = torch.ops.aten
    weight_ops = {aten.conv1d.default, aten.conv2d.default, aten.linear.default, aten.embedding.default,
                  aten.batch_norm.default, aten.conv1d.padding, aten.conv2d.padding, aten.conv_transpose2d.input}
    return {n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in weight_ops}


def test_batchnorm_on_a_2d_input_is_lifted_as_batchnorm1d(small_pt2s):
    net, path, data = small_pt2s["tab"]
    gm = load_model(str(path))
    assert _lifted_types(gm) == {"body.0": nn.Linear, "body.1": nn.BatchNorm1d, "head": nn.Linear}
    bn = gm.get_submodule("body.1")
    assert bn.eps == pytest.approx(1e-3) and not bn.training
    assert torch.equal(bn.running_var, net.body[1].running_var) and torch.equal(bn.weight, net.body[1].weight)
    assert not _aten_weight_calls(gm)
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        assert torch.allclose(gm(x), net(x), atol=1e-6)
        assert gm(x[:1]).shape == (1, 3)  # BatchNorm1d on [N, C]: any batch, even 1 (eval statistics)


def test_conv1d_and_its_batchnorm_are_lifted_as_1d_modules(small_pt2s):
    net, path, data = small_pt2s["seq"]
    gm = load_model(str(path))
    assert _lifted_types(gm) == {"c1": nn.Conv1d, "b1": nn.BatchNorm1d, "c2": nn.Conv1d, "fc": nn.Linear}
    c1, c2 = gm.get_submodule("c1"), gm.get_submodule("c2")
    assert (c1.kernel_size, c1.stride, c1.padding, c1.dilation, c1.groups, c1.bias) == ((5,), (2,), (2,), (1,), 1, None)
    assert (c2.kernel_size, c2.stride, c2.padding, c2.dilation, c2.groups) == ((3,), (1,), (2,), (2,), 2)
    assert torch.equal(c2.weight, net.c2.weight) and torch.equal(c2.bias, net.c2.bias)
    assert not _aten_weight_calls(gm)
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        assert torch.allclose(gm(x), net(x), atol=1e-6)


def test_embedding_is_lifted_with_its_padding_idx(small_pt2s):
    net, path, data = small_pt2s["emb"]
    gm = load_model(str(path))
    assert _lifted_types(gm) == {"emb": nn.Embedding, "fc": nn.Linear}
    emb = gm.get_submodule("emb")
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (50, 16, 0)
    assert emb.max_norm is None and not emb.sparse
    assert torch.equal(emb.weight, net.emb.weight)  # row 0 as trained, not re-zeroed
    assert not _aten_weight_calls(gm)
    ids = torch.from_numpy(data.x)
    with torch.no_grad():
        assert torch.equal(gm(ids), net(ids))


@pytest.mark.parametrize("kind, folded_convs", [("tab", set()), ("seq", {"c1"})])
def test_batchnorm1d_folds_like_on_the_factory_path(small_pt2s, kind, folded_convs):
    net, path, data = small_pt2s[kind]
    folded, had_bn = fold_batchnorm(load_model(str(path)))
    eager_folded, eager_had_bn = fold_batchnorm(net)
    assert had_bn == eager_had_bn == folded_convs
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        assert (folded(x) - net(x)).abs().max().item() < 1e-5
    layers = quantizable_layers(folded, had_batchnorm=had_bn)
    assert [(l.name, l.kind) for l in layers] == [(l.name, l.kind) for l in quantizable_layers(eager_folded)]


@pytest.mark.parametrize("kind, layers", [
    ("tab", {"body.0": "linear", "head": "linear"}),
    ("seq", {"c1": "conv", "c2": "conv", "fc": "linear"}),
    ("emb", {"emb": "embedding", "fc": "linear"}),
])
def test_pt2_compresses_and_exports_like_the_factory_model(small_pt2s, tmp_path, kind, layers):
    net, path, data = small_pt2s[kind]
    cfg = QuantConfig(method="rtn", num_calib=128)
    from_pt2 = compress(load_model(str(path)), data, cfg, progress=False)
    eager = compress(net, data, cfg, progress=False)
    assert {n: l.kind for n, l in from_pt2.layers.items()} == layers
    assert list(from_pt2.layers) == list(eager.layers)
    assert all(l.bits == 8 for l in from_pt2.layers.values())
    assert from_pt2.metadata.float_layers == eager.metadata.float_layers == ()  # nothing left in float
    for name in eager.layers:  # same folded weights, same grid
        assert torch.equal(from_pt2.layers[name].codes, eager.layers[name].codes), name
        assert torch.allclose(from_pt2.layers[name].scale, eager.layers[name].scale), name
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        ref, fl = from_pt2.reference(x), net(x)
        assert torch.allclose(ref, eager.reference(x), atol=1e-5)
    assert (ref - fl).abs().max().item() < 0.1 * fl.abs().max().item()
    assert np.mean(ref.argmax(1).numpy() == data.y) >= 0.95
    res = export_qdq(from_pt2, tmp_path / f"{kind}.onnx")
    assert res.path.is_file() and res.agreement >= 0.99
    assert res.storage == {name: "int8" for name in layers}


@pytest.mark.parametrize("kind, kinds", [("tab", ["linear", "linear"]), ("seq", ["conv", "conv", "linear"]),
                                         ("emb", ["embedding", "linear"])])
def test_cli_compresses_a_pt2(small_pt2s, tmp_path, kind, kinds):
    """``fqexport compress --model X.pt2 --calib calib.npz --out out.onnx``: the survey's failing command."""
    net, path, data = small_pt2s[kind]
    save_npz(data, tmp_path / "calib.npz")
    code, _, err = run_main(["-q", "compress", "--model", path, "--calib", tmp_path / "calib.npz",
                             "--out", tmp_path / "out.onnx", "--no-speed-check", "--report", tmp_path / "r.json"])
    assert code == 0, err
    assert "does not fit the model" not in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(r["kind"], r["bits"]) for r in report["layers"]] == [(k, 8) for k in kinds]
    assert report["export"]["agreement"] >= 0.99
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: data.x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(data.x)).numpy()
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


# --------------------------------------------------------------------------- what stays an aten call


class Edge(nn.Module):
    """ConvTranspose2d, padding="same", BatchNorm3d after a Conv3d, a BatchNorm without affine
    parameters, one with batch statistics, and a conv with a computed (standardised) weight."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.same = nn.Conv2d(4, 4, 3, padding="same")
        self.c3 = nn.Conv3d(1, 2, 1)
        self.bn3 = nn.BatchNorm3d(2)
        self.plain = nn.BatchNorm1d(4, affine=False)
        self.batch_stats = nn.BatchNorm1d(4, track_running_stats=False)
        self.std = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        u = self.same(self.up(x)).mean((2, 3))
        v = self.bn3(self.c3(x[:, :1, None])).mean((1, 2, 3, 4))
        w = self.std.weight - self.std.weight.mean((1, 2, 3), keepdim=True)
        s = torch.nn.functional.conv2d(x, w, self.std.bias, padding=1).mean((2, 3))
        return self.plain(u) + self.batch_stats(s) + v[:, None]


def test_other_lifted_kinds_and_calls_that_stay_aten(tmp_path):
    torch.manual_seed(0)
    net = _randomize_bn(Edge())
    x = torch.randn(6, 3, 8, 8)
    torch.export.save(torch.export.export(net, (x[:2],)), str(tmp_path / "edge.pt2"))
    gm = load_model(str(tmp_path / "edge.pt2"))  # a computed weight used to raise "expected a parameter"
    types = _lifted_types(gm)
    assert types["up"] is nn.ConvTranspose2d and gm.get_submodule("up").output_padding == (1, 1)
    assert types["same"] is nn.Conv2d and gm.get_submodule("same").padding == "same"
    assert types["bn3"] is nn.BatchNorm3d and types["plain"] is nn.BatchNorm1d
    assert not gm.get_submodule("plain").affine
    assert not any(isinstance(m, (nn.Conv3d, nn.modules.batchnorm._BatchNorm)) for n, m in gm.named_modules()
                   if n in ("c3", "batch_stats"))  # Conv3d is not quantizable; batch statistics
    # the computed (standardised) weight is folded to its value: a Conv2d named after its parameters
    assert types["std"] is nn.Conv2d
    w = net.std.weight - net.std.weight.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(gm.get_submodule("std").weight.detach(), w.detach())
    left = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.conv3d.default", "aten.batch_norm.default"} <= left and "aten.conv2d.default" not in left
    with torch.no_grad():
        assert torch.allclose(gm(x), net(x), atol=1e-5)
    eager_layers = [(l.name, l.kind) for l in quantizable_layers(fold_batchnorm(net)[0])]
    assert [(l.name, l.kind) for l in quantizable_layers(fold_batchnorm(gm)[0])] == eager_layers
    assert eager_layers == [("up", "conv_transpose"), ("same", "conv"), ("std", "conv")]


class Tied(nn.Module):
    """A weight tied between an Embedding and a Linear head, and an Embedding with max_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.renorm = nn.Embedding(20, 8, max_norm=1.0)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids):
        h = self.fc(self.emb(ids).mean(1) + self.renorm(ids).mean(1))
        return torch.nn.functional.linear(h, self.emb.weight)


def test_shared_or_renormalised_weights_stay_aten_calls(tmp_path):
    torch.manual_seed(0)
    net = Tied().eval()
    ids = torch.randint(0, 20, (5, 6))
    torch.export.save(torch.export.export(net, (ids[:2],)), str(tmp_path / "tied.pt2"))
    gm = load_model(str(tmp_path / "tied.pt2"))
    types = _lifted_types(gm)
    assert types["fc"] is nn.Linear
    assert not isinstance(getattr(gm, "emb", None), (nn.Embedding, nn.Linear))  # one module cannot be both
    assert not isinstance(getattr(gm, "renorm", None), nn.Embedding)  # max_norm rewrites its rows: float
    left = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert left.count("aten.embedding.default") == 2 and "aten.linear.default" in left
    with torch.no_grad():
        assert torch.allclose(gm(ids), net(ids), atol=1e-6)
    assert [l.name for l in quantizable_layers(fold_batchnorm(gm)[0])] == ["fc"]


class _BatchReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        z = torch.relu(self.conv(x))
        return self.fc(z.reshape(z.shape[0], -1))  # the batch size is baked in by a static export


def test_a_pt2_with_a_fixed_batch_that_breaks_says_how_to_export_it(tmp_path):
    from fqexport.errors import ModelLoadError

    torch.manual_seed(0)
    model = _BatchReshape().eval()
    torch.export.save(torch.export.export(model, (torch.randn(4, 3, 4, 4),)), str(tmp_path / "m.pt2"))
    x = np.random.default_rng(0).normal(size=(64, 3, 4, 4)).astype(np.float32)
    data = GroupData(x, np.arange(64) % 3, np.arange(64) % 2, ("a", "b"), "c.npz")
    with pytest.raises(ModelLoadError) as info:
        compress(load_model(str(tmp_path / "m.pt2")), data, QuantConfig(num_calib=64), progress=False)
    assert "m.pt2 was exported with a fixed batch of 4" in str(info.value)
    assert "dynamic_shapes=({0: torch.export.Dim('batch')},)" in str(info.value)
    # fixed at 2, the batch of the first check: it ran, then compress failed at batch 1 with an
    # internal error (survey 39)
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 4, 4),)), str(tmp_path / "m2.pt2"))
    with pytest.raises(ModelLoadError, match="m2.pt2 was exported with a fixed batch of 2"):
        compress(load_model(str(tmp_path / "m2.pt2")), data, QuantConfig(num_calib=64), progress=False)
    dynamic = torch.export.export(model, (torch.randn(4, 3, 4, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(dynamic, str(tmp_path / "d.pt2"))
    cm = compress(load_model(str(tmp_path / "d.pt2")), data, QuantConfig(num_calib=64), progress=False)
    assert set(cm.layers) == {"conv", "fc"}


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, z):
        return self.head(torch.relu(self.a(x) + self.b(z)))


def test_a_pt2_of_two_inputs_is_refused_at_load_naming_them(tmp_path):
    """It was refused with the fixed-batch message (the run on one input failed), which blamed the batch (survey 26)."""
    from fqexport.errors import ModelLoadError

    batch = torch.export.Dim("batch")
    program = torch.export.export(_TwoInputs().eval(), (torch.randn(2, 4), torch.randn(2, 3)),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(tmp_path / "two.pt2"))
    with pytest.raises(ModelLoadError, match=r"two.pt2: the exported program takes 2 inputs \(x, z\); fqexport "
                                             r"feeds one input \(the data's 'x'\): export a wrapper"):
        load_model(str(tmp_path / "two.pt2"))


def test_a_parametrized_layer_in_a_pt2_keeps_the_users_name(tmp_path):
    """weight_norm's weight is computed from parametrizations.weight.original0/1: folded, and the
    layer is named after the user's module, as on the eager path (--keep-float / --layer-bits names)."""
    torch.manual_seed(0)
    net = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.randn(3, 3, 6, 6)
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), str(tmp_path / "wn.pt2"))
    gm = load_model(str(tmp_path / "wn.pt2"))
    assert [l.name for l in quantizable_layers(fold_batchnorm(gm)[0])] == ["0", "3"]
    with torch.no_grad():
        torch.testing.assert_close(gm.get_submodule("0").weight, net[0].weight)
        torch.testing.assert_close(gm(x), net(x))


def test_an_interrupt_that_torch_onnx_wrapped_is_raised_again():
    """Ctrl-C or the CLI's signal landing inside torch.onnx.export comes back wrapped in torch's
    own error; it is an interrupt (exit 130/143), not a failed export (survey: exit 2)."""
    from fqexport.exporters.torch_export import _reraise_interrupt

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as inner:
            raise RuntimeError("torch.onnx: export failed") from inner
    except RuntimeError as wrapped:
        with pytest.raises(KeyboardInterrupt):
            _reraise_interrupt(wrapped)
    _reraise_interrupt(RuntimeError("a model error"))  # nothing to re-raise


class _Signal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean(-1))


def test_a_pt2_dynamic_beyond_the_batch_is_warned_about(tmp_path, caplog):
    """The ONNX files fix every dimension but the batch: a .pt2 whose time axis was exported dynamic
    silently became a fixed-length file (survey 46)."""
    x = torch.zeros(2, 2, 32)
    batch, steps = torch.export.Dim("batch"), torch.export.Dim("T", min=4, max=4096)
    both, only_batch = tmp_path / "both.pt2", tmp_path / "batch.pt2"
    torch.export.save(torch.export.export(_Signal().eval(), (x,), dynamic_shapes=({0: batch, 2: steps},)), str(both))
    torch.export.save(torch.export.export(_Signal().eval(), (x,), dynamic_shapes=({0: batch},)), str(only_batch))
    with caplog.at_level("WARNING", logger="fqexport.graph.loading"):
        load_model(only_batch)
        assert "dynamic" not in caplog.text
        load_model(both)
    assert re.search(re.escape(f"{both}: the program's input is dynamic in dim 2 (") + r"\w+\), but fqexport's ONNX "
                     "files keep only the batch dynamic: every other dimension is fixed to the calibration data's",
                     caplog.text)


class _LengthMean(nn.Module):
    """A mean written as sum / length: torch.export bakes the example's length in as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.sum(2) / h.shape[2])


def test_a_pt2_fixed_at_one_length_refuses_data_of_another(tmp_path):
    """A .pt2 exported at T=32 (batch dynamic only) was calibrated and exported at T=48 without a
    word: its baked-in /32 made every logit 1.5x off, the --float-out reference too, and validate
    passed (survey 49). torch itself refuses that input; compress now does, naming both shapes."""
    from fqexport.errors import DataError

    path = tmp_path / "m.pt2"
    program = torch.export.export(_LengthMean().eval(), (torch.zeros(2, 2, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    rng = np.random.default_rng(0)

    def data(steps):
        return GroupData(rng.normal(size=(64, 2, steps)).astype(np.float32), np.arange(64) % 3, np.arange(64) % 2,
                         ("a", "b"), f"t{steps}.npz")

    with pytest.raises(DataError, match=re.escape(
            f"t48.npz: field 'x' has sample shape [2, 48] but {path} was exported for samples of shape [2, 32]")):
        compress(load_model(path), data(48), QuantConfig(num_calib=32), progress=False)
    cm = compress(load_model(path), data(32), QuantConfig(num_calib=32), progress=False)  # its own length runs
    assert tuple(cm.metadata.input_shape) == (2, 32)


class _GruText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(50, 16), nn.GRU(16, 24, batch_first=True), nn.Linear(24, 3)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.fc(h[:, -1])


@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")  # torch.export's own note on nn.GRU
def test_a_pt2_recurrent_layer_is_listed_as_the_module_it_came_from(tmp_path):
    """A .pt2 runs nn.GRU as aten.gru over four parameters: listed as 'rnn' (GRU) with its MACs, as
    the nn.Module is (survey 73: two bare Parameters "read directly", MACs 0)."""
    torch.manual_seed(0)
    net = _GruText().eval()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (160, 12)).astype(np.int64)
    data = GroupData(x, rng.integers(0, 3, 160), (rng.random(160) < 0.3).astype(np.int64), ("a", "b"), "gru")
    ep = torch.export.export(net, (torch.from_numpy(x[:4]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(tmp_path / "gru.pt2"))
    config = QuantConfig(num_calib=64, method="rtn")
    module = compress(net, data, config, progress=False).metadata.float_layers
    program = compress(load_model(tmp_path / "gru.pt2"), data, config, progress=False).metadata.float_layers
    gru = 3 * 24 * (16 + 24)  # gates · H · (input + state)
    assert [(f.name, f.kind, f.params, f.macs, f.reason) for f in program] == [
        ("rnn", "GRU", gru, 12 * gru, "unsupported")]
    assert [(f.name, f.kind, f.params, f.macs) for f in module] == [(f.name, f.kind, f.params, f.macs) for f in program]
