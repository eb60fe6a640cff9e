"""Per-group sensitivity Δ_g(l, b): measured and Fisher, per-group isolation, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.errors import ConfigError, OutputPathError
from fqexport.search.sensitivity import (
    SensitivityCache,
    SensitivityTable,
    fisher_delta,
    measure_sensitivity,
    rtn_weight,
)


class TwoPaths(nn.Module):
    """Features 0..3 go through ``path_a``, features 4..7 through ``path_b``; outputs add."""

    def __init__(self) -> None:
        super().__init__()
        self.path_a = nn.Linear(4, 3)
        self.path_b = nn.Linear(4, 3)

    def forward(self, x):
        return self.path_a(x[:, :4]) + self.path_b(x[:, 4:])


class _Subtracted(TwoPaths):
    def forward(self, x):
        return self.path_a(x[:, :4]) - self.path_b(x[:, 4:])


def two_path_case(n: int = 96):
    """Group 0's inputs are zero on features 4..7 (it never uses path_b); group 1 uses both."""
    torch.manual_seed(0)
    model = TwoPaths().eval()
    with torch.no_grad():  # confident logits: float loss ≈ 0, quantization can only add loss
        for p in model.parameters():
            p.mul_(5.0)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2.0, (n, 8)).astype(np.float32)
    group = np.arange(n) % 2
    x[group == 0, 4:] = 0.0
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    return model, GroupData(x, y.astype(np.int64), group.astype(np.int64), ("maj", "min"), "two-path")


def test_layer_only_one_group_depends_on_hurts_only_that_group():
    model, data = two_path_case()
    t = measure_sensitivity(model, data, bit_choices=(2, 4, 8), cache=False)
    assert t.layers == ("path_a", "path_b")
    assert t.bits == (2, 4, 8)
    d_b = t.delta[t.layers.index("path_b")]  # [bits, groups]
    # path_b never sees group 0's input: quantizing it changes nothing for group 0
    np.testing.assert_allclose(d_b[:, 0], 0.0, atol=1e-12)
    assert d_b[0, 1] > 1e-3  # 2 bits hurt group 1
    # fewer bits hurt more
    assert t.at("path_b", 2)[1] > t.at("path_b", 8)[1]
    # group 0 depends on path_a alone; group 1 (float loss 0.09, not ~0) can gain or lose a
    # little from path_a's rounding, so path_a is compared on group 0 and on the group mean
    assert t.at("path_a", 2)[0] > t.at("path_a", 8)[0] + 1e-2
    assert t.at("path_a", 2).mean() > t.at("path_a", 8).max()
    assert list(t.num_samples) == [48, 48]


def test_measured_delta_is_the_per_group_loss_increase():
    model, data = two_path_case()
    t = measure_sensitivity(model, data, layers=["path_a"], bit_choices=(3,), cache=False)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    with torch.no_grad():
        base = nn.functional.cross_entropy(model(x), y, reduction="none")
        q = TwoPaths()
        q.load_state_dict(model.state_dict())
        q.path_a.weight.copy_(rtn_weight(model.path_a.weight, 3))
        loss = nn.functional.cross_entropy(q(x), y, reduction="none")
    increase = (loss - base).double().numpy()
    want = np.array([increase[data.group == k].mean() for k in range(2)])
    # subset order differs (shuffled), the per-group means do not
    np.testing.assert_allclose(t.at("path_a", 3), want, rtol=1e-5, atol=1e-7)


class InPlaceAfter(nn.Module):
    """``fc2`` reads ``h``, then ``h`` is overwritten in place (ReLU, inplace) and joins again:
    the activations cached at ``fc2`` must not carry one width's in-place write to the next."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.relu = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        y = self.fc2(h)
        z = self.relu(h)
        return self.fc3(y + z)


def test_measured_delta_from_cached_prefix_equals_full_forwards():
    """Per layer the prefix runs once and the rest once per width: every width's Δ_g equals a
    full forward of the model with that layer alone quantized (to float32 rounding of the losses:
    bit for bit on AMD, a few ulp apart on an Intel AVX-512 CPU)."""
    torch.manual_seed(3)
    model = InPlaceAfter().eval()
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2.0, (70, 8)).astype(np.float32)
    group = np.arange(70) % 2
    y = rng.integers(0, 3, 70).astype(np.int64)
    data = GroupData(x, y, group.astype(np.int64), ("a", "b"), "in-place")
    t = measure_sensitivity(model, data, bit_choices=(2, 3, 8), batch_size=32, cache=False)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        base = torch.cat([nn.functional.cross_entropy(model(xs[s:s + 32]), ys[s:s + 32], reduction="none")
                          for s in range(0, 70, 32)])
        for name in ("fc1", "fc2", "fc3"):
            for bits in (2, 3, 8):
                q = InPlaceAfter().eval()
                q.load_state_dict(model.state_dict())
                layer = getattr(q, name)
                layer.weight.copy_(rtn_weight(layer.weight, bits))
                loss = torch.cat([nn.functional.cross_entropy(q(xs[s:s + 32]), ys[s:s + 32], reduction="none")
                                  for s in range(0, 70, 32)])
                inc = (loss.double() - base.double()).numpy()
                want = np.array([inc[group == k].mean() for k in range(2)])
                np.testing.assert_allclose(t.at(name, bits), want, rtol=1e-5, atol=1e-7)  # float32 losses ~1


def test_fisher_proxy_isolates_groups_and_ranks_widths():
    model, data = two_path_case()
    t = measure_sensitivity(model, data, bit_choices=(2, 8), method="fisher", cache=False)
    assert t.method == "fisher"
    np.testing.assert_allclose(t.at("path_b", 2)[0], 0.0, atol=1e-12)
    assert t.at("path_b", 2)[1] > t.at("path_b", 8)[1] > 0


@pytest.mark.parametrize("method", ["measured", "fisher"])
def test_without_labels_the_float_models_top1_is_the_label(method):
    model, data = two_path_case()  # its labels are the float model's top-1
    unlabeled = GroupData(data.x, None, data.group, data.group_names, data.source)
    want = measure_sensitivity(model, data, bit_choices=(2, 8), method=method, cache=False)
    got = measure_sensitivity(model, unlabeled, bit_choices=(2, 8), method=method, cache=False)
    np.testing.assert_allclose(got.delta, want.delta, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.float_loss, want.float_loss, rtol=1e-6)
    assert got.key != want.key  # the cache tells labeled from unlabeled data


def test_fisher_delta_equation():
    fisher = torch.tensor([[[1.0, 2.0]], [[0.0, 4.0]]])  # [G=2, 1, 2]
    w = torch.tensor([[1.0, 1.0]])
    q = torch.tensor([[0.5, 0.0]])
    # ½ Σ_j F_gj (w_j - q_j)²: g0 = ½(1·0.25 + 2·1) = 1.125, g1 = ½(0 + 4·1) = 2
    np.testing.assert_allclose(fisher_delta(fisher, w, q).numpy(), [1.125, 2.0])


def test_cache_in_memory_and_on_disk(tmp_path, caplog):
    model, data = two_path_case()
    cache = SensitivityCache()
    a = measure_sensitivity(model, data, bit_choices=(2, 8), cache=cache)
    b = measure_sensitivity(model, data, bit_choices=(2, 8), cache=cache)
    assert b is a and cache.hits == 1 and cache.misses == 1
    c = measure_sensitivity(model, data, bit_choices=(2, 4), cache=cache)  # other options: new key
    assert c.key != a.key and cache.misses == 2
    # the same weights in an edited forward (a notebook's class reloaded with its checkpoint): another
    # model, whose table it was given before (survey 42)
    edited = _Subtracted()
    edited.load_state_dict(model.state_dict())
    f = measure_sensitivity(edited, data, bit_choices=(2, 8), cache=cache)
    assert f.key != a.key and cache.misses == 3 and not np.allclose(f.float_loss, a.float_loss)

    path = tmp_path / "sens.json"
    d = measure_sensitivity(model, data, bit_choices=(2, 8), cache=False, cache_path=path)
    assert json.loads(path.read_text())["key"] == d.key
    # poison the file's numbers: a read from disk must return them (proves no recompute)
    doc = json.loads(path.read_text())
    doc["delta"]["path_a"]["2"]["maj"] = 123.0
    path.write_text(json.dumps(doc))
    e = measure_sensitivity(model, data, bit_choices=(2, 8), cache=False, cache_path=path)
    assert e.at("path_a", 2)[0] == 123.0
    # another model: the file's key does not match, it is recomputed and rewritten
    with torch.no_grad():
        model.path_a.weight.mul_(2.0)
    with caplog.at_level("WARNING", logger="fqexport.search.sensitivity"):
        f = measure_sensitivity(model, data, bit_choices=(2, 8), cache=False, cache_path=path)
    assert f.key != d.key and json.loads(path.read_text())["key"] == f.key
    # said at the default level (survey 65: a file from an older version was dropped without a word)
    assert f"sensitivity cache file {path} was written for another model, data or options" in caplog.text



def test_a_cache_file_with_this_runs_key_but_another_table_is_recomputed(tmp_path, caplog):
    """Survey 81: a file whose layers or widths were edited (its key left alone) was read, and the
    search allocated 5 of 6 layers, or never considered 8 bits."""
    model, data = two_path_case()
    path = tmp_path / "sens.json"
    d = measure_sensitivity(model, data, bit_choices=(2, 8), cache=False, cache_path=path)
    for edit, said in [
        (lambda doc: doc["layers"].pop(), "layers ['path_a'] instead of ['path_a', 'path_b']"),
        (lambda doc: doc["bits"].pop(), "widths [2] instead of [2, 8]"),
    ]:
        doc = json.loads(path.read_text())
        edit(doc)
        doc["delta"] = {l: {str(b): v for b, v in doc["delta"][l].items() if int(b) in doc["bits"]} for l in doc["layers"]}
        path.write_text(json.dumps(doc))
        caplog.clear()
        with caplog.at_level("WARNING", logger="fqexport.search.sensitivity"):
            t = measure_sensitivity(model, data, bit_choices=(2, 8), cache=False, cache_path=path)
        assert (t.layers, t.bits) == (d.layers, d.bits)
        np.testing.assert_array_equal(t.delta, d.delta)
        assert f"sensitivity cache file {path} has this run's fingerprint but not its table ({said})" in caplog.text
        assert json.loads(path.read_text())["layers"] == list(d.layers)  # rewritten whole


def test_a_cache_file_that_cannot_be_written_is_said_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    """Survey 81: a full disk under --sensitivity-cache failed the whole compress (exit 2, no model)."""
    from fqexport.search import sensitivity

    def full(path, write):
        raise OutputPathError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(sensitivity, "atomic_write", full)
    model, data = two_path_case()
    with caplog.at_level("WARNING", logger="fqexport.search.sensitivity"):
        t = measure_sensitivity(model, data, bit_choices=(2, 8), cache=False, cache_path=tmp_path / "s.json")
    assert t.delta.shape == (2, 2, 2)
    assert (f"sensitivity cache file {tmp_path / 's.json'} not saved (cannot write {tmp_path / 's.json'}: "
            "No space left on device); the run goes on with the table it measured") in caplog.text

def test_table_round_trips_through_dict():
    t = SensitivityTable(("a", "b"), (2, 8), ("g0", "g1"), np.arange(8.0).reshape(2, 2, 2), "measured",
                         np.array([0.5, 0.7]), np.array([10, 12]), "k")
    u = SensitivityTable.from_dict(json.loads(json.dumps(t.to_dict())))
    np.testing.assert_array_equal(u.delta, t.delta)
    assert (u.layers, u.bits, u.groups, u.key) == (t.layers, t.bits, t.groups, "k")
    assert t.to_dict()["delta"]["b"]["8"] == {"g0": 6.0, "g1": 7.0}


def test_errors_name_the_bad_value():
    model, data = two_path_case()
    with pytest.raises(ConfigError, match=r"'fc' not a quantizable layer of the model \(layers: path_a, path_b\)"):
        measure_sensitivity(model, data, layers=["fc"], cache=False)
    with pytest.raises(ConfigError, match="method='hessian' is not one of measured, fisher"):
        measure_sensitivity(model, data, method="hessian", cache=False)
    with pytest.raises(ConfigError, match="bit_choices=.* must be a non-empty set of integers from 2 to 8"):
        measure_sensitivity(model, data, bit_choices=(1, 4), cache=False)
    t = measure_sensitivity(model, data, bit_choices=(2,), cache=False)
    with pytest.raises(ConfigError, match="no entry for layer 'path_a' at 5 bits"):
        t.at("path_a", 5)
    with pytest.raises(ConfigError, match=r"delta has shape \(1, 1, 1\), expected \[layers=2"):
        SensitivityTable(("a", "b"), (2,), ("g",), np.zeros((1, 1, 1)), "measured")


def test_the_cache_key_includes_the_group_names():
    """A table holds its groups by name: the same arrays with other group names are another
    table (survey: a cached group0/group1 table was reused for majority/minority data)."""
    from fqexport.search.sensitivity import _fingerprint

    model = torch.nn.Linear(3, 2)
    x, y, g = np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    ids = GroupData(x, y, g, ("group0", "group1"), "a")
    named = GroupData(x, y, g, ("majority", "minority"), "a")
    assert _fingerprint(model, ids, {}) == _fingerprint(model, GroupData(x, y, g, ("group0", "group1"), "b"), {})
    assert _fingerprint(model, ids, {}) != _fingerprint(model, named, {})
