"""Tests of fqexport/pipeline.py: compress() on the tiny CNN / MLP tasks of conftest.py."""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import MIXED_BITS
from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import load_data
from fqexport.calibration.sampling import group_balanced_indices
from fqexport.config import QuantConfig
from fqexport.errors import ConfigError, DataError, ModelLoadError
from fqexport.model import CompressedModel
from fqexport.pipeline.compress import compress

ALL_LAYERS = ["stem", "conv_a", "conv_b", "dw", "pw", "fc"]


def _compress(model, data, **kw):
    kw.setdefault("num_calib", 256)
    return compress(model, data, QuantConfig(**kw), progress=False)


def _logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _rel_weight_error(cm: CompressedModel) -> dict[str, float]:
    """||W_float − W_q|| / ||W_float|| per layer (W_float: the BN-folded float weight)."""
    mods = dict(cm.float_model.named_modules())
    out = {}
    for name, layer in cm.layers.items():
        w = mods[name].weight.detach()
        out[name] = float((w - layer.dequantized()).norm() / w.norm())
    return out


@pytest.fixture(scope="module")
def cnn_cm4(cnn_model, cnn_data):
    return _compress(cnn_model, cnn_data, weight_bits=4)


def test_8bit_agrees_with_float_model(cnn_cm8, cnn_model, cnn_data):
    assert isinstance(cnn_cm8, CompressedModel) and list(cnn_cm8.layers) == ALL_LAYERS
    want = _logits(cnn_model, cnn_data.x).argmax(1)
    got = cnn_cm8.predict(cnn_data.x).argmax(1)
    assert np.mean(got == want) >= 0.99
    for g in range(2):  # no group is left behind at 8 bits
        m = cnn_data.group == g
        assert np.mean(got[m] == want[m]) >= 0.97
    # the BN-folded float model is the float model
    np.testing.assert_allclose(cnn_cm8.predict(cnn_data.x, quantized=False), _logits(cnn_model, cnn_data.x), atol=1e-4)


def test_an_npz_path_is_memory_mapped_and_gives_the_same_model(cnn_model, cnn_data, tmp_path, monkeypatch):
    """compress read a whole .npz into memory to draw num_calib samples (survey 66: 2.7 GB peak for
    a 2 GB file, 256 samples drawn); its x is now memory-mapped, and only the drawn rows are read."""
    import fqexport.calibration.readers as readers
    from fqexport.calibration.npz import save_npz

    path = save_npz(cnn_data, tmp_path / "calib.npz")
    config = QuantConfig(num_calib=64, batch_size=64)
    in_memory = compress(cnn_model, load_data(path), config, progress=False)

    def whole(*a, **k):
        raise AssertionError("the whole .npz was read")

    monkeypatch.setattr(readers, "load_npz", whole)
    mapped = compress(cnn_model, str(path), config, progress=False)
    for name, layer in in_memory.layers.items():
        assert torch.equal(layer.codes, mapped.layers[name].codes) and torch.equal(layer.scale, mapped.layers[name].scale)
    np.testing.assert_array_equal(in_memory.predict(cnn_data.x), mapped.predict(cnn_data.x))


def test_compressed_model_fields(cnn_cm8, cnn_data):
    assert cnn_cm8.group_names == ("majority", "minority")
    assert cnn_cm8.input_shape == (3, 16, 16) and cnn_cm8.num_classes == 4
    assert len(cnn_cm8.calib) == 256
    assert cnn_cm8.avg_weight_bits == 8.0
    assert list(cnn_cm8.metadata.group_weights) == [0.5, 0.5]  # default: each group counts equally
    assert cnn_cm8.metadata.num_calib == 256 and list(cnn_cm8.metadata.skipped_layers) == []


def test_4bit_has_larger_weight_error_than_8bit(cnn_cm8, cnn_cm4):
    e8, e4 = _rel_weight_error(cnn_cm8), _rel_weight_error(cnn_cm4)
    for name in ALL_LAYERS:
        assert e4[name] > 2 * e8[name], (name, e4[name], e8[name])
    assert all(l.bits == 4 and l.qmax == 7 for l in cnn_cm4.layers.values())


def test_layer_bits_honoured_with_x86_safe_codes(cnn_cm_mixed):
    cm = cnn_cm_mixed
    want_bits = {name: MIXED_BITS.get(name, 8) for name in ALL_LAYERS}
    qmax = {8: 63, 6: 31, 4: 7}
    mods = dict(cm.reference.named_modules())
    for name, layer in cm.layers.items():
        assert layer.bits == want_bits[name]
        assert layer.qmax == qmax[layer.bits]
        assert layer.codes.dtype == torch.int8
        top = int(layer.codes.abs().max())
        assert top <= layer.qmax, (name, top)
        assert top >= layer.qmax - 1  # the grid is used, not a narrower one
        assert layer.scale.shape == (layer.codes.shape[0],) and torch.all(layer.scale > 0)
        # the reference runs exactly the dequantized codes
        assert torch.equal(mods[name].weight.detach(), layer.dequantized())


def test_full_weight_range_uses_127(cnn_model, cnn_data):
    cm = _compress(cnn_model, cnn_data, method="rtn", weight_range="full", bias_correction=False)
    for layer in cm.layers.values():
        assert layer.qmax == 127
        assert 63 < int(layer.codes.abs().max()) <= 127


def test_avg_bits_and_layer_table(cnn_cm_mixed):
    params = {"stem": 216, "conv_a": 576, "conv_b": 576, "dw": 72, "pw": 128, "fc": 64}
    bits = {name: MIXED_BITS.get(name, 8) for name in params}
    want = sum(bits[n] * params[n] for n in params) / sum(params.values())
    assert cnn_cm_mixed.avg_weight_bits == pytest.approx(want)  # 10352 / 1632
    rows = {r["name"]: r for r in cnn_cm_mixed.layer_table()}
    assert {n: r["params"] for n, r in rows.items()} == params
    assert {n: r["storage"] for n, r in rows.items()} == {
        "stem": "int8", "conv_a": "int4", "conv_b": "int8", "dw": "int8", "pw": "int8", "fc": "nbits"}
    # MACs per sample: 16x16 outputs for stem/conv_a/conv_b, 8x8 after the stride-2 depthwise
    assert rows["stem"]["macs"] == 8 * 256 * 27 and rows["conv_a"]["macs"] == 8 * 256 * 72
    assert rows["dw"]["macs"] == 8 * 64 * 9 and rows["pw"]["macs"] == 16 * 64 * 8
    assert rows["fc"]["macs"] == 64 and rows["dw"]["kind"] == "conv" and rows["fc"]["kind"] == "linear"
    assert rows["dw"]["module"] == "Conv2d" and rows["fc"]["module"] == "Linear"


def test_unknown_layer_in_layer_bits(cnn_model, cnn_data):
    with pytest.raises(ConfigError) as info:
        _compress(cnn_model, cnn_data, layer_bits={"nope": 4})
    assert "layer_bits names 'nope', not a quantizable layer of the model" in str(info.value)
    assert "(layers: stem, conv_a, conv_b, dw, pw, fc)" in str(info.value)


def test_labels_out_of_range(cnn_model, cnn_data):
    y = cnn_data.y.copy()
    y[5] = 7
    bad = GroupData(cnn_data.x, y, cnn_data.group, cnn_data.group_names, "labels.npz")
    with pytest.raises(DataError, match=r"labels.npz: sample \d+: field 'y' holds the label 7 outside \[0, 4\)"):
        _compress(cnn_model, bad)


def test_data_shape_not_fitting_the_model(cnn_model):
    data = GroupData(np.zeros((8, 5), np.float32), np.zeros(8, np.int64), np.arange(8) % 2, ("a", "b"), "flat.npz")
    with pytest.raises(DataError, match=r"flat.npz: field 'x' with sample shape \(5,\) does not fit the model"):
        _compress(cnn_model, data)


class _DictInput(nn.Module):
    """A medical model's forward over a dict batch (image + metadata)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, batch):
        return self.fc(self.conv(batch["image"]).mean((2, 3)))


class _KeywordInputs(_DictInput):
    def forward(self, x, **inputs):
        return self.fc(self.conv(x).mean((2, 3)) + inputs["meta"])


@pytest.mark.parametrize("model", [_DictInput(), _KeywordInputs()], ids=["dict", "kwargs"])
def test_a_forward_over_a_dict_or_keywords_is_told_it_gets_one_tensor(model, cnn_data):
    with pytest.raises(DataError) as info:
        _compress(model, cnn_data)
    msg = str(info.value)
    assert "field 'x' with sample shape (3, 16, 16) does not fit the model" in msg
    assert ("If the model's forward takes a dict, several tensors or keyword inputs: fqexport feeds it one tensor, "
            "a batch of the data's 'x'; wrap it in a module whose forward(self, x) builds them from that tensor") in msg


def test_a_plain_shape_error_gets_no_advice_about_the_forwards_inputs(cnn_model):
    data = GroupData(np.zeros((8, 5), np.float32), np.zeros(8, np.int64), np.arange(8) % 2, ("a", "b"), "flat.npz")
    with pytest.raises(DataError) as info:
        _compress(cnn_model, data)
    assert "does not fit the model (RuntimeError" in str(info.value) and "dict" not in str(info.value)


def test_data_that_fails_the_shape_pass_prints_no_traceback(cnn_model, capfd):
    """NHWC images for an NCHW CNN with BatchNorm: BN folding's shape pass fails on them first,
    quietly; the data check then names the field (fx's ShapeProp printed a traceback here)."""
    data = GroupData(np.zeros((8, 16, 16, 3), np.float32), np.zeros(8, np.int64), np.arange(8) % 2, ("a", "b"),
                     "nhwc.npz")
    with pytest.raises(DataError, match=r"nhwc.npz: field 'x' with sample shape \(16, 16, 3\) does not fit"):
        _compress(cnn_model, data)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out


class _DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        z = self.fc(x)
        return {"logits": z, "probs": z.softmax(1)}


def test_a_dict_output_is_named_with_the_wrapper_advice():
    data = GroupData(np.zeros((8, 5), np.float32), np.zeros(8, np.int64), np.arange(8) % 2, ("a", "b"), "d.npz")
    with pytest.raises(ModelLoadError) as info:
        _compress(_DictOutput().eval(), data)
    assert str(info.value).startswith("the model returns a dict (keys 'logits', 'probs'), not a tensor")
    assert "returns model(x)['logits']" in str(info.value)


def test_output_that_is_not_logits_names_the_data_file_and_field(cnn_data):
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(DataError, match=rf"{re.escape(cnn_data.source)}: field 'x' with sample shape \(3, 16, 16\) "
                       r"gives a model output of shape \(4, 14, 14\) per sample, not class logits \[batch, classes\]"):
        _compress(net, cnn_data)


def test_a_one_value_or_unflattened_output_gets_its_own_advice(cnn_data):
    """[N] and [N, C, 1, 1] were told to check x's shape (survey 31)."""
    class OneValue(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 16 * 16, 1)

        def forward(self, x):
            return self.fc(x.flatten(1)).squeeze(1)

    with pytest.raises(DataError, match=r"the model returns one value per sample \(output \[batch\]\).* a regressor "
                                        r"is not supported"):
        _compress(OneValue(), cnn_data)
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(DataError, match=r"the model returns \[batch, 4, 1, 1\] \(a conv head without a flatten\).*"
                                        r"\.flatten\(1\)"):
        _compress(head, cnn_data)


def test_one_output_with_labels_beyond_one_is_refused_as_a_regressor():
    """The binary-classifier advice (cat([0, z])) would then fail on labels 2..5 (survey 31)."""
    rng = np.random.default_rng(0)
    data = GroupData(rng.standard_normal((32, 6)).astype(np.float32), np.arange(32) % 6, np.arange(32) % 2,
                     ("a", "b"), "counts.npz")
    with pytest.raises(DataError, match=r"counts.npz: the model returns one value per sample \(\[batch, 1\]\) and the "
                                        r"labels go up to 5: a regressor \(or a count model\) is not supported"):
        compress(nn.Sequential(nn.Linear(6, 1)).eval(), data, QuantConfig(num_calib=32), progress=False)


def test_the_search_checks_the_output_and_labels_before_any_loss(mlp_model, mlp_data):
    """compress --budget-bits on a 4-class model with labels 0..9 was an IndexError in the
    sensitivity's cross-entropy: exit 3 (survey 31)."""
    from fqexport.config import MixedPrecisionConfig
    from fqexport.search.mixed_precision import search_mixed_precision

    y = mlp_data.y.copy()
    y[5] = 9
    bad = GroupData(mlp_data.x, y, mlp_data.group, mlp_data.group_names, "y10.npz")
    with pytest.raises(DataError, match=r"y10.npz: sample \d+: field 'y' holds the label 9 outside \[0, 4\)"):
        search_mixed_precision(mlp_model, bad, MixedPrecisionConfig(budget_bits=6.0), progress=False)


def test_a_one_logit_binary_classifier_is_refused_with_the_two_logit_wrapper_that_works():
    """One logit per sample leaves softmax cross-entropy constant: refused, naming the fix; the
    suggested cat([0, z]) model compresses, and its argmax is the sigmoid decision z > 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    data = GroupData(x, y, np.arange(96) % 2, ("a", "b"), "binary.npz")
    torch.manual_seed(0)
    one = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    with pytest.raises(DataError, match=r"binary.npz: the model returns one logit per sample \(a sigmoid / BCE "
                                        r"binary classifier\).*torch.cat\(\[torch.zeros_like\(z\), z\], dim=1\)"):
        compress(one, data, QuantConfig(num_calib=64), progress=False)

    class TwoLogits(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            z = self.net(x)
            return torch.cat([torch.zeros_like(z), z], dim=1)

    cm = compress(TwoLogits(one), data, QuantConfig(num_calib=64), progress=False)
    z = cm.predict(data.x)
    assert z.shape == (96, 2) and np.all(z[:, 0] == 0)
    assert np.array_equal(z.argmax(1), (z[:, 1] > 0).astype(np.int64))
    # an ONNX file with one logit, at validate: the same advice, naming the file
    from fqexport.errors import ModelLoadError
    from fqexport.tasks.classification import check_logits

    with pytest.raises(ModelLoadError, match=r"one.onnx: the model returns one logit per sample"):
        check_logits(np.zeros((96, 1), np.float32), "one.onnx", data)


def test_bias_correction_reduces_mean_output_shift(cnn_model, cnn_data):
    def shift(cm):
        return float(np.linalg.norm((cm.predict(cnn_data.x) - cm.predict(cnn_data.x, quantized=False)).mean(0)))

    with_bc = shift(_compress(cnn_model, cnn_data, weight_bits=3, method="rtn", bias_correction=True))
    without = shift(_compress(cnn_model, cnn_data, weight_bits=3, method="rtn", bias_correction=False,
                              bn_reestimate=False))
    assert with_bc < 0.5 * without, (with_bc, without)
    # with BN re-estimation on, bias_correction=False still corrected every conv+BN bias: their biases
    # were bit-identical with and without it (survey 44). The rescale alone keeps each layer's own mean
    on, off = (_compress(cnn_model, cnn_data, weight_bits=3, method="rtn", bias_correction=b) for b in (True, False))
    assert on.layers["stem"].codes.equal(off.layers["stem"].codes)  # the first conv: the same inputs, codes
    assert not on.reference.get_submodule("stem").bias.equal(off.reference.get_submodule("stem").bias)
    assert shift(off) > 2 * with_bc


def test_group_weights_by_name(cnn_model, cnn_data):
    cm = _compress(cnn_model, cnn_data, method="rtn", group_weights={"majority": 1.0, "minority": 3.0})
    assert list(cm.metadata.group_weights) == [0.25, 0.75]


def test_group_weights_samples(cnn_model, cnn_data):
    cm = _compress(cnn_model, cnn_data, method="rtn", group_weights="samples")
    counts = cnn_data.group_counts()  # the user's data, not the balanced subset compress draws
    assert list(cm.metadata.group_weights) == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)


def test_group_weights_unknown_group(cnn_model, cnn_data):
    with pytest.raises(ConfigError) as info:
        _compress(cnn_model, cnn_data, group_weights={"majority": 1.0, "zzz": 2.0})
    assert "group_weights names group 'zzz', which is not in the calibration data (groups: majority, minority)" in str(info.value)


def test_input_model_is_not_modified(cnn_model, cnn_data):
    net = copy.deepcopy(cnn_model).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _compress(net, cnn_data, weight_bits=4, method="rtn")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and net.stem_bn.training  # modes untouched
    assert not any(m._forward_hooks for m in net.modules())
    assert isinstance(net.stem_bn, nn.BatchNorm2d) and net.stem.bias is None  # not folded in place


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def test_layernorm_stays_a_float_op_even_under_strict(mlp_data):
    torch.manual_seed(0)
    net = WithLayerNorm().eval()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
    cm = _compress(net, mlp_data, strict=True)  # normalisation is not a float weight layer
    assert list(cm.layers) == ["fc1", "fc2"] and cm.metadata.skipped_layers == ()
    assert cm.metadata.float_layers == () and cm.quantized_fraction == 1.0
    assert torch.equal(cm.reference.norm.weight, net.norm.weight)


def test_compress_reads_npz_path(mlp_files, mlp_model, mlp_data):
    cm = _compress(mlp_model, str(mlp_files / "calib.npz"), method="rtn")
    assert cm.group_names == ("a", "b") and cm.calib.source.endswith("calib.npz")
    agree = np.mean(cm.predict(mlp_data.x).argmax(1) == _logits(mlp_model, mlp_data.x).argmax(1))
    assert agree >= 0.97


# ------------------------------------------------------------------------- your own data, streamed


def _same_codes(a: CompressedModel, b: CompressedModel) -> None:
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        assert torch.equal(a.layers[name].codes, b.layers[name].codes), name
        assert torch.equal(a.layers[name].scale, b.layers[name].scale), name


def test_compress_from_a_dataloader_or_x_alone_gives_the_npz_codes(cnn_cm8, cnn_model, cnn_data, tmp_path):
    # cnn_cm8: the same data as a GroupData (what an .npz loads to), QuantConfig(num_calib=256)
    names = np.array(cnn_data.group_names)[cnn_data.group]
    pairs = torch.utils.data.TensorDataset(torch.from_numpy(cnn_data.x), torch.from_numpy(cnn_data.y))
    loader = torch.utils.data.DataLoader(pairs, batch_size=50)
    from_loader = compress(cnn_model, load_data(loader, groups=names), QuantConfig(num_calib=256), progress=False)
    _same_codes(from_loader, cnn_cm8)
    assert from_loader.group_names == cnn_data.group_names and from_loader.calib.source == "<DataLoader of TensorDataset>"
    x_alone = load_data([torch.from_numpy(x) for x in cnn_data.x], groups=names)
    assert x_alone.y is None
    unlabeled = compress(cnn_model, x_alone, QuantConfig(num_calib=256), progress=False)
    _same_codes(unlabeled, cnn_cm8)
    assert unlabeled.calib.y is None


def test_compress_reads_only_the_calibration_subset_of_a_dataset(cnn_model, cnn_data):
    class Counting(torch.utils.data.Dataset):
        targets = cnn_data.y.tolist()  # as torchvision's ImageFolder: labels without reading an image

        def __init__(self):
            self.read = set()

        def __len__(self):
            return len(cnn_data)

        def __getitem__(self, i):
            self.read.add(i)
            return torch.from_numpy(cnn_data.x[i]), int(cnn_data.y[i])

    ds = Counting()
    stream = load_data(ds, groups=cnn_data.group)
    assert ds.read == {0}  # its shape, when the stream is opened: labels from targets, groups given
    cm = compress(cnn_model, stream, QuantConfig(num_calib=64, method="rtn"), progress=False)
    assert len(cm.calib) == 64
    assert ds.read == {0} | set(group_balanced_indices(stream, 64, seed=0).tolist())


def test_compress_checks_labels_of_a_stream_before_quantizing(cnn_model, cnn_data):
    bad = [(torch.from_numpy(x), 9) for x in cnn_data.x[:40]]
    with pytest.raises(DataError, match=r"<list>: sample \d+: field 'y' holds the label 9 outside \[0, 4\)"):
        compress(cnn_model, load_data(bad, groups=cnn_data.group[:40]), QuantConfig(num_calib=16), progress=False)


@pytest.mark.parametrize("order", ["sensitivity", "obs"])
def test_the_retarget_and_the_solve_share_one_factorisation(cnn_model, cnn_data, caplog, order):
    """The solver's debug records: per layer one ``factor`` step (one Cholesky per conv group),
    and a retarget without a Cholesky of its own; the ``obs`` order scores columns on the grid of
    the retargeted weight, so it factors after the retarget (inside its retarget and solve)."""
    import logging

    from fqexport.quant.solver import factor_flops, retarget_flops, solve_flops

    caplog.set_level(logging.DEBUG, logger="fqexport.pipeline.compress")
    cm = _compress(cnn_model, cnn_data, weight_bits=4, order=order, num_calib=64)
    steps: dict[str, dict[str, float]] = {}
    for r in caplog.records:
        w = getattr(r, "solver_work", None)
        if w is not None:
            assert w["step"] not in steps.setdefault(w["layer"], {})
            steps[w["layer"]][w["step"]] = w["flops"]
    assert set(steps) == set(ALL_LAYERS)
    mods = dict(cm.float_model.named_modules())
    for name, flops in steps.items():
        m = mods[name]
        groups = getattr(m, "groups", 1)
        out, cols = m.weight.shape[0] // groups, m.weight[0].numel()
        shared = order != "obs"
        assert set(flops) == ({"factor", "retarget", "solve"} if shared else {"retarget", "solve"}), name
        assert flops["retarget"] == pytest.approx(groups * retarget_flops(out, cols, factored=shared))
        assert flops["solve"] == pytest.approx(groups * solve_flops(out, cols, order, False, factored=shared))
        if shared:
            assert flops["factor"] == pytest.approx(groups * factor_flops(cols))
    assert getattr(mods["dw"], "groups", 1) > 1  # the depthwise conv: a factor per conv group


def test_a_raised_damping_is_logged_once_per_layer_and_the_warning_kept_back(mlp_model, mlp_data, caplog):
    """damp=0 on 8 samples: every Hessian wider than 8 columns is singular, the one factor of
    each such layer raises the damping, and compress says so once per layer in its log (the
    DampingIncreasedWarning itself does not reach the caller)."""
    import logging
    import warnings

    from fqexport.quant.solver import DampingIncreasedWarning

    caplog.set_level(logging.WARNING, logger="fqexport.pipeline.compress")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cm = _compress(mlp_model, mlp_data, weight_bits=4, damp=0.0, num_calib=8)
    assert not [w for w in seen if issubclass(w.category, DampingIncreasedWarning)]
    raised = [r.getMessage() for r in caplog.records if "not positive definite" in r.getMessage()]
    wide = [n for n, l in cm.layers.items() if dict(cm.float_model.named_modules())[n].weight.shape[1] > 8]
    assert wide and len(raised) == len(wide), raised
    assert all("at damp=0; solved with damp=0.001" in m for m in raised), raised


def test_a_group_with_few_calibration_samples_is_warned_about_once(caplog, mlp_model, mlp_data):
    """A draw that leaves a group fewer than 8 samples says which groups and how many, once per
    data and draw; an ample draw says nothing."""
    import logging

    from fqexport.pipeline import compress as pipeline

    pipeline._warned_few.clear()
    with caplog.at_level(logging.WARNING, logger="fqexport.pipeline.compress"):
        for _ in range(2):
            compress(mlp_model, mlp_data, QuantConfig(num_calib=6, method="rtn"), progress=False)
    few = [r for r in caplog.records if "hold few of some groups" in r.getMessage()]
    counts = ", ".join(f"'{g}' 3" for g in mlp_data.group_names)
    assert len(few) == 1 and f"the 6 calibration samples drawn (num_calib=6) hold few of some groups ({counts}" in \
        few[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fqexport.pipeline.compress"):
        compress(mlp_model, mlp_data, QuantConfig(num_calib=64, method="rtn"), progress=False)
    assert not [r for r in caplog.records if "hold few" in r.getMessage()]
    assert not [r for r in caplog.records if "one group" in r.getMessage()]



def test_a_search_fit_on_a_part_of_the_data_leaves_the_draw_warning_to_the_refit(caplog, mlp_model, mlp_data):
    """A sweep said two different counts for one draw (survey 82): the hold-out split's fit warned
    about its own draw, then the refit on all the data about the returned model's."""
    import logging

    from fqexport.pipeline import compress as pipeline
    from fqexport.search.verification import VerifyContext, _fit

    pipeline._warned_few.clear()
    ctx = VerifyContext(mlp_model, mlp_data, [], QuantConfig(num_calib=6, method="rtn"), parts=True)
    with caplog.at_level(logging.WARNING, logger="fqexport.pipeline.compress"):
        _fit(ctx, mlp_data.take(np.arange(0, len(mlp_data), 2)), {})  # a part: quiet
        assert not [r for r in caplog.records if "hold few" in r.getMessage()]
        _fit(replace(ctx, parts=False), mlp_data, {})  # the fit that is the refit says it
    assert len([r for r in caplog.records if "hold few" in r.getMessage()]) == 1

def test_data_of_one_group_is_warned_about(caplog, mlp_model, mlp_data):
    """Data whose samples are all in one group compressed without a word (survey 49): a
    fairness tool then measures nothing per group."""
    import logging

    from fqexport.calibration.group_data import GroupData

    one = GroupData(mlp_data.x, mlp_data.y, np.zeros(len(mlp_data), np.int64), ("everyone",), "one.npz")
    with caplog.at_level(logging.WARNING, logger="fqexport.pipeline.compress"):
        compress(mlp_model, one, QuantConfig(num_calib=64, method="rtn"), progress=False)
    said = [r.getMessage() for r in caplog.records if "one group" in r.getMessage()]
    assert said == ["one.npz: every sample is in one group ('everyone'): the group-weighted calibration and every "
                    "per-group figure are then the overall ones; label each sample's group (the 'group' field) to "
                    "see what compression does to each"]


class _TokensLinearBN(nn.Module):
    """A Linear over [N, T, C] then BatchNorm1d: it normalises the T axis (T = out_features = 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.bn(self.fc(x)).flatten(1))


def test_a_batchnorm1d_over_a_sequence_is_not_folded_into_the_linear_before_it():
    """Folding it into the Linear's features would scale the wrong axis (the output changed by
    1.24 before); with the calibration samples' shapes it stays, and compress's float model is
    the user's."""
    from fqexport.graph.prepare import prepare_model

    torch.manual_seed(0)
    m = _TokensLinearBN().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1), m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2), m.bn.bias.uniform_(-1, 1)
    x = torch.randn(64, 8, 6)
    prepared = prepare_model(m, False, example=x[:2])
    assert any(isinstance(mod, nn.BatchNorm1d) for mod in prepared.folded.modules())
    torch.testing.assert_close(prepared.folded(x), m(x))
    with torch.no_grad():
        y = m(x).argmax(1).numpy()
    cm = compress(m, GroupData(x.numpy(), y, np.arange(64) % 2, ("a", "b"), "seq"), QuantConfig(num_calib=64),
                  progress=False)
    np.testing.assert_allclose(cm.predict(x.numpy(), quantized=False), m(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    # a Linear on [N, features] still absorbs its BatchNorm1d
    flat = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    folded = prepare_model(flat, False, example=torch.randn(2, 6)).folded
    assert not any(isinstance(mod, nn.BatchNorm1d) for mod in folded.modules())


class _SeqNet(nn.Module):
    """Token features → two Linears → mean over tokens; ``seq_first`` runs them on ``[T, B, E]``."""

    def __init__(self, seq_first: bool) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):  # x [B, T, 8]
        if self.seq_first:
            return self.head(self.fc2(torch.relu(self.fc1(x.transpose(0, 1)))).mean(0))
        return self.head(self.fc2(torch.relu(self.fc1(x))).mean(1))


@pytest.mark.parametrize("tokens", [16, 32])
def test_a_sequence_first_linear_gives_each_row_its_samples_group(tokens):
    """The same weights batch-first and sequence-first give the same codes under weights that
    favour one group: the Hessian and bias correction find the samples on dim 1 (with T = 32 =
    the batch, rows used to take token t's position as sample t's group; T = 16 failed in
    index_add)."""
    from fqexport.graph.prepare import prepare_model

    torch.manual_seed(0)
    bf, sf = _SeqNet(False).eval(), _SeqNet(True).eval()
    sf.load_state_dict(bf.state_dict())
    rng = np.random.default_rng(0)
    g = (np.arange(96) % 4 == 0).astype(np.int64)
    x = (rng.normal(size=(96, tokens, 8)) + 2.0 * g[:, None, None]).astype(np.float32)
    data = GroupData(x, rng.integers(0, 2, 96), g, ("majority", "minority"), "tokens")
    dims = {l.name: l.batch_dim for l in prepare_model(sf, example=torch.from_numpy(x[:2])).layers}
    assert dims == {"fc1": 1, "fc2": 1, "head": 0}
    cfg = QuantConfig(weight_bits=3, batch_size=32, num_calib=96, group_weights={"majority": 0.05, "minority": 1.0})
    a, b = compress(bf, data, cfg, progress=False), compress(sf, data, cfg, progress=False)
    for name in ("fc1", "fc2", "head"):
        assert torch.equal(a.layers[name].codes, b.layers[name].codes), name
    np.testing.assert_allclose(a.predict(x), b.predict(x), rtol=1e-4, atol=1e-5)  # the corrected biases too


class _Flatten768(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(768, 4)

    def forward(self, x):
        return self.fc(x.view(x.size(0), 768))


def test_data_that_does_not_fit_a_traced_op_is_one_error_line_without_fx_code(capfd):
    """torch.fx printed the generated forward's code to stderr before the DataError (survey 26)."""
    data = GroupData(np.zeros((8, 1, 16, 16), np.float32), np.zeros(8, np.int64), np.arange(8) % 2, ("a", "b"),
                     "bad.npz")
    with pytest.raises(DataError, match=r"bad.npz: field 'x' with sample shape \(1, 16, 16\) does not fit the model "
                                        r"\(RuntimeError: shape '\[2, 768\]' is invalid"):
        compress(_Flatten768(), data, QuantConfig(num_calib=8), progress=False)
    err = capfd.readouterr().err
    assert "FX-traced Module" not in err and "Traceback" not in err


class _SoftmaxHead(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return torch.softmax(self.mlp(x), dim=1)


def test_a_classifier_returning_probabilities_keeps_its_logits_float_and_is_warned_about(mlp_model, mlp_data,
                                                                                         tmp_path, caplog):
    """The logits went through a uint8 pair before the softmax; the losses read probabilities as logits
    without a word (survey 31)."""
    import onnx

    from fqexport.exporters.qdq_onnx import export_qdq

    with caplog.at_level("WARNING"):
        cm = compress(_SoftmaxHead(copy.deepcopy(mlp_model)).eval(), mlp_data, QuantConfig(num_calib=128),
                      progress=False)
    assert "the model returns probabilities (every output row lies in [0, 1] and sums to 1" in caplog.text
    graph = onnx.load(str(export_qdq(cm, tmp_path / "p.onnx").path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax"]
    assert producer[softmax.input[0]].op_type in ("Gemm", "MatMul", "Add")  # the logits, not a DequantizeLinear
    assert any("softmax" in op for op in cm.metadata.float_ops)


def test_a_parameter_holding_nan_is_refused_by_name_and_a_mask_buffer_of_minus_inf_is_not(mlp_model, mlp_data):
    """A NaN bias was exported, and the export check passed it (NaN agrees with NaN under argmax) (survey 30)."""
    broken = copy.deepcopy(mlp_model)
    with torch.no_grad():
        broken.fc3.bias[1] = float("nan")
    with pytest.raises(ModelLoadError, match=r"the model's parameter 'fc3.bias' holds NaN or Inf \(1 of its 4 "
                                             r"values\)"):
        compress(broken, mlp_data, QuantConfig(num_calib=64), progress=False)
    masked = copy.deepcopy(mlp_model)
    masked.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))
    assert compress(masked, mlp_data, QuantConfig(num_calib=64), progress=False).layers


def test_group_metrics_refuse_nan_logits():
    """argmax counted a NaN row as class 0: analyze printed accuracies for an all-NaN model (survey 30)."""
    from fqexport.metrics.group_metrics import group_metrics

    logits = np.zeros((4, 3), np.float32)
    logits[2, 1] = np.nan
    with pytest.raises(DataError, match=r"the logits hold NaN or Inf on 1 of the 4 samples"):
        group_metrics(logits, np.zeros(4), np.zeros(4), ("a",))


def test_a_dead_relu_layer_exports_and_matches_the_float_model(mlp_model, mlp_data, tmp_path):
    """An activation that is always 0 on the calibration data got scale 1e-8: the next layer's int32 bias
    (steps of s_x·s_w) overflowed in ORT and the export check failed, blaming the kernels (survey 30)."""
    from fqexport.exporters.ort_session import make_session, run_batches
    from fqexport.exporters.qdq_onnx import export_qdq

    dead = copy.deepcopy(mlp_model)
    with torch.no_grad():
        dead.fc1.bias.fill_(-1000.0)  # relu(fc1(x)) == 0 for every sample
    cm = compress(dead, mlp_data, QuantConfig(num_calib=128), progress=False)
    got = run_batches(make_session(export_qdq(cm, tmp_path / "dead.onnx").path), mlp_data.x[:64], 64)
    np.testing.assert_allclose(got, cm.predict(mlp_data.x[:64]), atol=1e-4)  # the reference, to rounding
    np.testing.assert_allclose(got, cm.predict(mlp_data.x[:64], quantized=False), atol=1e-2)


def test_calibration_samples_that_are_all_the_same_input_are_warned_about(mlp_model, mlp_data, caplog):
    """All-zero calibration x compressed silently; the file scored 29 % against 88 % for float (survey 30)."""
    zeros = GroupData(np.zeros_like(mlp_data.x), mlp_data.y, mlp_data.group, mlp_data.group_names, "zeros.npz")
    with caplog.at_level("WARNING"):
        compress(mlp_model, zeros, QuantConfig(num_calib=64, method="rtn"), progress=False)
    assert "zeros.npz: the 64 calibration samples drawn are all the same input (all zeros)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        compress(mlp_model, mlp_data, QuantConfig(num_calib=64, method="rtn"), progress=False)
    assert "all the same input" not in caplog.text


class _FunctionalHead(nn.Module):
    """A parameter used through F.linear: fqexport lifts it into an nn.Linear it builds."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 8)
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(self.fc(x)), self.w)


def test_compress_leaves_the_callers_random_stream_as_it_was(mlp_data):
    """Building the layers it lifts (F.linear on a parameter, attention) drew initial weights from
    the caller's torch generator: a seeded notebook got other numbers after a compress (survey 53)."""
    model = _FunctionalHead().eval()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    cm = compress(model, mlp_data, QuantConfig(num_calib=64, method="rtn"), progress=False)
    assert len(cm.layers) == 2  # fc and the lifted head
    assert torch.equal(torch.random.get_rng_state(), before)


def test_an_activation_memory_cap_beyond_any_int_is_no_cap(mlp_model, mlp_data):
    """survey 76: --max-activation-memory-mb 1e303 passed the config check, then int(mb * 2**20)
    overflowed: exit 3 "internal error" (inf worked)."""
    base = QuantConfig(num_calib=64, method="rtn")
    import dataclasses

    huge = compress(mlp_model, mlp_data, dataclasses.replace(base, max_activation_memory_mb=1e303), progress=False)
    none = compress(mlp_model, mlp_data, dataclasses.replace(base, max_activation_memory_mb=float("inf")), progress=False)
    assert all(torch.equal(huge.layers[n].codes, none.layers[n].codes) for n in none.layers)


def test_a_bias_past_the_int32_grid_widens_its_channels_step_instead_of_being_clamped(tmp_path, caplog):
    """Survey 84: a conv bias of 1e5 was clamped to int32 without a word (the reference then computed another
    function, and the export check blamed the CPU's kernels); review: refusing it refused near-dead BatchNorm
    channels at W8 too. The channel's weight step is widened until the bias fits, as onnxruntime's quantizer does."""
    import logging

    from fqexport.calibration.group_data import GroupData
    from fqexport.exporters.ort_session import make_session, run_batches
    from fqexport.exporters.qdq_onnx import export_qdq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[2].bias.fill_(1e5)
        model[2].bias[3] = 0.5
    rng = np.random.default_rng(0)
    data = GroupData(rng.standard_normal((32, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, 32),
                     np.arange(32) % 2, ("a", "b"))
    with caplog.at_level(logging.WARNING, logger="fqexport.model"):
        cm = compress(model, data, QuantConfig(num_calib=32, method="rtn"), progress=False)
    (said,) = [r.getMessage() for r in caplog.records if "past half of int32" in r.getMessage()]
    assert said.startswith("layer '2': 7 output channel(s) (0, 1, 2, 4, 5 ...) have a bias past half of int32")
    bias = dict(cm.reference.named_modules())["2"].bias.detach()
    np.testing.assert_allclose(bias.numpy(), model[2].bias.detach().numpy(), rtol=1e-6, atol=1e-3)  # kept, not clamped
    res = export_qdq(cm, tmp_path / "m.onnx")  # the export check passes: ORT computes what the reference does
    got = run_batches(make_session(res.path), data.x, 32)
    want = model(torch.from_numpy(data.x)).detach().numpy()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


class _Tempered(nn.Module):
    """Linear → ReLU → Linear(300 classes), then a temperature: an op after the logits layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 300))

    def forward(self, x):
        return self.body(x) / 2.0


def test_logits_behind_a_trailing_op_stay_float():
    """Survey 84: a model ending in z / 2 (or z.double()) had its logits on a uint8 grid (1000 logits on
    ~131 levels, W8A8 agreement 97.3 % -> 96.1 %); only a logits layer feeding the output directly stayed float."""
    from fqexport.calibration.group_data import GroupData

    torch.manual_seed(0)
    model = _Tempered().eval()
    rng = np.random.default_rng(0)
    data = GroupData(rng.standard_normal((64, 16)).astype(np.float32), rng.integers(0, 300, 64),
                     np.arange(64) % 2, ("a", "b"))
    cm = compress(model, data, QuantConfig(num_calib=64, method="rtn"), progress=False)
    logits = cm.predict(data.x[:4])
    assert all(len(np.unique(row)) == 300 for row in logits)  # 300 distinct values: no 256-level grid


def test_a_calibration_sample_far_past_the_others_is_named(caplog, mlp_model, mlp_data):
    """Survey 84: one x1e4 sample of 192 set every min-max range; W8A8 agreed 32.8 % with the float
    model on clean data, and the export check (same ranges on both sides) passed, without a word."""
    import logging

    glitch = copy.deepcopy(mlp_data)
    glitch.x[5] *= 1e4
    with caplog.at_level(logging.WARNING, logger="fqexport.pipeline.compress"):
        compress(mlp_model, glitch, QuantConfig(num_calib=len(glitch), method="rtn"), progress=False)
        said = [r.getMessage() for r in caplog.records if "calibration sample(s)" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith(f"{glitch.source}: calibration sample(s) 5 reach |x| = ")
        assert said[0].endswith("or calibrate with --calibration percentile (QuantConfig(calibration='percentile'))")
        caplog.clear()
        compress(mlp_model, mlp_data, QuantConfig(num_calib=len(mlp_data), method="rtn"), progress=False)
        compress(mlp_model, glitch, QuantConfig(num_calib=len(glitch), method="rtn", calibration="percentile"),
                 progress=False)
    assert not [r for r in caplog.records if "calibration sample(s)" in r.getMessage()]
    # review: a loud population (45 % of the draw, 500x the quiet clips) is no glitch; with most
    # samples all zeros the glitch is still named (the median is over the samples that hold anything)
    loud = copy.deepcopy(mlp_data)
    loud.x[: int(0.55 * len(loud))] *= 1e-3
    zeros = copy.deepcopy(mlp_data)
    zeros.x[: int(0.6 * len(zeros))] = 0.0
    zeros.x[-1] *= 1e4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fqexport.pipeline.compress"):
        compress(mlp_model, loud, QuantConfig(num_calib=len(loud), method="rtn"), progress=False)
        assert not [r for r in caplog.records if "calibration sample(s)" in r.getMessage()]
        compress(mlp_model, zeros, QuantConfig(num_calib=len(zeros), method="rtn"), progress=False)
    assert [r for r in caplog.records if f"calibration sample(s) {len(zeros) - 1} reach" in r.getMessage()]


class _NormalizedInput(nn.Module):
    """x / Σ|x| before a Linear: 0 / 0 on an all-zero sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x / x.abs().sum(dim=1, keepdim=True))))


@pytest.mark.parametrize("method", ["solver", "rtn"])
def test_a_nan_the_model_computes_on_a_sample_is_named_by_that_sample(method):
    """Survey 84: "solver: the Hessian holds NaN or Inf; check the calibration inputs of this layer"
    (which layer?) with the solver, another error type with rtn; the cause was sample 41, all zeros."""
    from fqexport.calibration.group_data import GroupData
    from fqexport.errors import DataError

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[41] = 0.0
    data = GroupData(x, rng.integers(0, 3, 64), np.arange(64) % 2, ("a", "b"))
    with pytest.raises(DataError) as info:
        compress(_NormalizedInput().eval(), data, QuantConfig(num_calib=64, method=method), progress=False)
    assert str(info.value).startswith(f"{data.source}: the float model computes NaN or Inf inside on 1 of the 64 "
                                      "calibration samples drawn (sample 41 of the data)")


def test_the_last_conv_of_a_pooled_head_keeps_its_integer_kernel(tmp_path):
    """Review of the float-logits rule: a conv → ReLU → pool → flatten head (SqueezeNet's) lost its
    output pair, and ORT ran that conv as a float one; only a Linear's logits (QGemm writes float) stay float."""
    from fqexport.calibration.group_data import GroupData
    from fqexport.exporters.ort_session import fused_kernels
    from fqexport.exporters.qdq_onnx import export_qdq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).eval()
    rng = np.random.default_rng(0)
    data = GroupData(rng.standard_normal((32, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 32),
                     np.arange(32) % 2, ("a", "b"))
    cm = compress(model, data, QuantConfig(num_calib=32, method="rtn"), progress=False)
    path = export_qdq(cm, tmp_path / "m.onnx").path
    assert fused_kernels(path).get("QLinearConv", 0) == 2
