"""Tests of fqexport/exported_program.py: a torch.export .pt2 becomes a module-based graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
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
