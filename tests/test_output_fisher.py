"""The "output-fisher" sensitivity: its equation, group isolation, one factor per layer, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fqexport.search.output_fisher as output_fisher
from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.errors import ConfigError
from fqexport.search.sensitivity import measure_sensitivity, rtn_weight
from fqexport.tasks.segmentation import Segmentation
from test_sensitivity import two_path_case


class ConvNet(nn.Module):
    """A conv, an in-place ReLU on its output, a grouped conv and a Linear over flattened maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(self.conv2(self.relu(self.conv1(x))).flatten(1))


def conv_case(n: int = 40):
    torch.manual_seed(0)
    model = ConvNet().eval()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1.0, (n, 2, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int64)
    group = (np.arange(n) % 3 == 0).astype(np.int64)
    return model, GroupData(x, y, group, ("maj", "min"), "conv")


def test_rtn_table_is_half_the_output_fisher_times_the_output_error():
    """Δ_g(l, b) = ½ (1/N_g) Σ_{i∈g} Σ_c mean_p (∂ℓ_i/∂y_icp)² · Σ_p δy_icp², δy the layer run with
    the error weight Q − W: computed here with plain autograd (no in-place ReLU) and F.conv2d."""
    model, data = conv_case()
    bits = (2, 4)
    t = measure_sensitivity(model, data, bit_choices=bits, method="output-fisher", batch_size=16, cache=False,
                            solver=QuantConfig(method="rtn"))
    assert t.method == "output-fisher" and t.layers == ("conv1", "conv2", "fc")

    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    h1 = model.conv1(x).detach().requires_grad_()
    r1 = torch.relu(h1)
    h2 = model.conv2(r1)
    h2.retain_grad()
    f = h2.flatten(1)
    h3 = model.fc(f)
    h3.retain_grad()
    nn.functional.cross_entropy(h3, y, reduction="sum").backward()
    layers = {"conv1": (model.conv1, x, h1.grad), "conv2": (model.conv2, r1.detach(), h2.grad),
              "fc": (model.fc, f.detach(), h3.grad)}
    for name, (module, inputs, grad) in layers.items():
        energy = grad.pow(2).double()
        energy = energy.flatten(2).mean(2) if grad.dim() == 4 else energy  # mean over positions
        for b in bits:
            error = rtn_weight(module.weight, b) - module.weight.detach()
            with torch.no_grad():
                if isinstance(module, nn.Conv2d):
                    dy = nn.functional.conv2d(inputs, error, None, module.stride, module.padding, groups=module.groups)
                    err = dy.double().pow(2).flatten(2).sum(2)
                else:
                    err = (inputs @ error.t()).double().pow(2)
            per_sample = (energy * err).sum(1).numpy()
            want = [0.5 * per_sample[data.group == k].mean() for k in range(2)]
            np.testing.assert_allclose(t.at(name, b), want, rtol=1e-5)
            assert min(want) > 0


def test_a_layer_one_group_never_reaches_costs_that_group_nothing():
    model, data = two_path_case()
    t = measure_sensitivity(model, data, bit_choices=(2, 4, 8), method="output-fisher", cache=False)
    np.testing.assert_allclose(t.at("path_b", 2)[0], 0.0, atol=1e-15)  # group 0's features 4..7 are 0
    assert t.at("path_b", 2)[1] > t.at("path_b", 4)[1] > t.at("path_b", 8)[1] > 0
    assert t.at("path_a", 2)[0] > t.at("path_a", 8)[0] > 0


def test_solver_codes_one_factorisation_per_layer_for_every_width(monkeypatch):
    model, data = conv_case()
    calls = []
    real = output_fisher.factor_conv_groups
    monkeypatch.setattr(output_fisher, "factor_conv_groups", lambda *a, **k: calls.append(1) or real(*a, **k))
    solved = measure_sensitivity(model, data, bit_choices=(2, 3, 4), method="output-fisher", cache=False)
    assert len(calls) == 3  # conv1, conv2 (one call: both conv groups), fc; not one per width
    rtn = measure_sensitivity(model, data, bit_choices=(2, 3, 4), method="output-fisher", cache=False,
                              solver=QuantConfig(method="rtn"))
    assert len(calls) == 3 and solved.key != rtn.key  # RTN factors nothing; the key tells them apart
    # the grid is what compress would pick: clip-searched at 2 bits only, unless the config says so
    clipped = measure_sensitivity(model, data, bit_choices=(2, 3, 4), method="output-fisher", cache=False,
                                  solver=QuantConfig(clip_search=True))
    assert clipped.key != solved.key
    np.testing.assert_array_equal(clipped.delta[:, 0], solved.delta[:, 0])
    assert not np.array_equal(clipped.delta[:, 1:], solved.delta[:, 1:])
    # the solver's codes move each layer's output less than round to nearest at 2 bits, for the
    # group-mean of Δ (the solver minimises the output error; Δ weighs it by the gradients)
    assert (solved.delta[:, 0].mean(axis=1) < rtn.delta[:, 0].mean(axis=1)).all()


class EmbedThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def test_an_embedding_is_measured_and_the_rest_priced():
    torch.manual_seed(1)
    model = EmbedThenLinear().eval()
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 10, (50, 4)).astype(np.int64)
    data = GroupData(ids, rng.integers(0, 3, 50).astype(np.int64), (np.arange(50) % 2).astype(np.int64),
                     ("a", "b"), "tokens")
    t = measure_sensitivity(model, data, bit_choices=(2, 8), method="output-fisher", cache=False)
    measured = measure_sensitivity(model, data, bit_choices=(2, 8), method="measured", cache=False)
    np.testing.assert_array_equal(t.delta[0], measured.delta[0])  # emb: measured
    assert (t.delta[1] > 0).all() and not np.array_equal(t.delta[1], measured.delta[1])


def test_a_loss_without_gradient_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1000.0, 0.0], [0.0, 1000.0]]))
    x = np.array([[1.0, -1.0], [-1.0, 1.0]] * 10, dtype=np.float32)
    data = GroupData(x, x.argmax(1).astype(np.int64), (np.arange(20) % 2).astype(np.int64), ("a", "b"), "certain")
    with pytest.raises(ConfigError, match="no gradient at the float model.*use sensitivity 'measured'"):
        measure_sensitivity(model, data, bit_choices=(2,), method="output-fisher", cache=False)


@pytest.mark.parametrize("method", ["fisher", "output-fisher"])
def test_a_distillation_task_is_refused(method):
    model = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    rng = np.random.default_rng(0)
    data = GroupData(rng.normal(size=(8, 3, 4, 4)).astype(np.float32), None, (np.arange(8) % 2).astype(np.int64),
                     ("a", "b"), "maps")
    with pytest.raises(ConfigError, match=f"sensitivity '{method}' needs .*segmentation task's loss is a "
                                          "distillation.*use sensitivity 'measured'"):
        measure_sensitivity(model, data, bit_choices=(2,), method=method, cache=False, task=Segmentation())


class Windows(nn.Module):
    """A Linear over 2x2 windows folded into the batch ([B·4, tokens, C]: Swin, MobileViT), or,
    ``folded=False``, the same Linear over all the sample's tokens at once ([B, 4·tokens, C])."""

    def __init__(self, folded: bool) -> None:
        super().__init__()
        self.folded = folded
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        z = torch.relu(self.stem(x))
        b, c, h, w = z.shape
        win = z.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 3, 5, 1)
        win = win.reshape(b * 4, -1, c) if self.folded else win.reshape(b, -1, c)
        return self.head(torch.relu(self.mix(win)).reshape(b, -1, c).mean(1))


@pytest.mark.parametrize("solver", [QuantConfig(method="rtn"), QuantConfig()])
def test_rows_folded_into_the_batch_count_for_their_sample(solver):
    """Each sample's windows are its positions: the folded model's table equals the unfolded one's."""
    _, data = conv_case(48)
    torch.manual_seed(0)
    folded = Windows(True).eval()
    flat = Windows(False).eval()
    flat.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(folded(torch.from_numpy(data.x)), flat(torch.from_numpy(data.x)))
    t = [measure_sensitivity(m, data, bit_choices=(2, 4), method="output-fisher", batch_size=16, cache=False,
                             solver=solver) for m in (folded, flat)]
    assert t[0].layers == t[1].layers == ("stem", "mix", "head")
    np.testing.assert_allclose(t[0].delta, t[1].delta, rtol=1e-4)
    assert (t[0].delta[1] > 0).all()


class FixedGrid(nn.Module):
    """A conv on a fixed coordinate grid (batch 1, XCiT's positional encoding) added to every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.pos = nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        z = self.stem(x)
        grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 6), torch.linspace(0, 1, 6), indexing="ij"))[None]
        return self.head(torch.relu(z + self.pos(grid)).mean((2, 3)))


def test_a_layer_the_batch_shares_is_named_instead_of_misattributed():
    _, data = conv_case(32)
    with pytest.raises(ConfigError, match=r"layer 'pos' computes 1 rows for a batch of 16 samples .* use sensitivity "
                                          r"'measured'"):
        measure_sensitivity(FixedGrid().eval(), data, bit_choices=(2, 4), method="output-fisher", batch_size=16,
                            cache=False)


class SeqFirst(nn.Module):
    """Token features through a Linear on ``[B, T, C]`` or, ``seq_first``, on ``[T, B, C]``."""

    def __init__(self, seq_first: bool) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.mix = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.seq_first:
            return self.head(torch.relu(self.mix(x.transpose(0, 1))).mean(0))
        return self.head(torch.relu(self.mix(x)).mean(1))


@pytest.mark.parametrize("solver", [QuantConfig(method="rtn"), QuantConfig()])
def test_a_sequence_first_layer_prices_each_samples_rows(solver):
    """Rows of a Linear on [T, B, C] belong to the sample on dim 1: the table equals the batch-first one's
    (T = 16 = the batch size used to give token t's rows to sample t)."""
    rng = np.random.default_rng(0)
    g = np.arange(48) % 2
    data = GroupData((rng.normal(size=(48, 16, 6)) + g[:, None, None]).astype(np.float32), rng.integers(0, 3, 48), g,
                     ("a", "b"), "tokens")
    torch.manual_seed(0)
    seq, flat = SeqFirst(True).eval(), SeqFirst(False).eval()
    flat.load_state_dict(seq.state_dict())
    t = [measure_sensitivity(m, data, bit_choices=(2, 4), method="output-fisher", batch_size=16, cache=False,
                             solver=solver) for m in (seq, flat)]
    np.testing.assert_allclose(t[0].delta, t[1].delta, rtol=1e-4)
