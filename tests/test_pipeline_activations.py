"""Tests of the linear-pass layer loop (fqexport/pipeline/activations.py + compress.py):
the cached activations equal a restart-from-the-input recomputation, forward work does not grow
with depth, the memory cap spills without changing a bit, and the ``device`` option."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

import fixtures_models as fm
import fqexport.pipeline.compress as compress_mod
from fqexport.config import QuantConfig
from fqexport.errors import ConfigError
from fqexport.graph.prepare import fold_batchnorm, trace
from fqexport.pipeline.activations import ActivationCache, GraphStream
from fqexport.pipeline.compress import compress
from fqexport.quant.hessian import HessianAccumulator

CUDA = torch.cuda.is_available()


def _compress(model, data, **kw):
    kw.setdefault("num_calib", 128)
    kw.setdefault("batch_size", 32)
    return compress(model, data, QuantConfig(**kw), progress=False)


def _restart_inputs(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Input of module ``name`` when ``model`` runs from the input on ``x`` (the old way)."""
    seen = []
    handle = dict(model.named_modules())[name].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _prefix_model(cm, biases: dict[str, torch.Tensor], upto: list[str]) -> nn.Module:
    """The BN-folded float model with the final quantized weight and corrected bias (as the
    layer loop left them) of the layers in ``upto``."""
    model = copy.deepcopy(cm.float_model)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in upto:
            mods[name].weight.copy_(cm.layers[name].dequantized())
            mods[name].bias = nn.Parameter(biases[name].clone())
    return model


def _batches(cm):
    bs = cm.config.batch_size
    return [(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(g)) for x, _, g in cm.calib.batches(bs)]


@pytest.fixture(scope="module")
def recorded(cnn_model, cnn_data):
    """The CNN at 4 bits (float-output target) with the H and C the layer loop built per layer."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    biases: dict[str, torch.Tensor] = {}
    real = compress_mod._layer_moments
    real_correct = compress_mod._correct_layer

    def correct_spy(module, info, *args, **kw):
        real_correct(module, info, *args, **kw)
        biases[info.name] = module.bias.detach().clone()

    def spy(module, info, *args, **kw):
        h, c = real(module, info, *args, **kw)
        seen[info.name] = (h.clone(), None if c is None else c.clone())
        return h, c

    mp = pytest.MonkeyPatch()
    mp.setattr(compress_mod, "_layer_moments", spy)
    mp.setattr(compress_mod, "_correct_layer", correct_spy)
    try:
        cm = _compress(cnn_model, cnn_data, weight_bits=4)
    finally:
        mp.undo()
    assert list(biases) == list(cm.layers)  # every layer is corrected by default
    return cm, seen, biases


def test_hessians_equal_a_restart_from_the_input(recorded):
    """Layer l's H and C come from the final quantized prefix and the float model, exactly as if
    the network were re-run from the input for that layer."""
    cm, seen, biases = recorded
    names = list(cm.layers)
    assert list(seen) == names
    alpha = torch.tensor(cm.metadata.group_weights, dtype=torch.float32)
    float_mods = dict(cm.float_model.named_modules())
    for i, name in enumerate(names):
        prefix = _prefix_model(cm, biases, names[:i])
        acc = HessianAccumulator(float_mods[name], cm.calib.num_groups, cross=True)
        for x, g in _batches(cm):
            acc.add(_restart_inputs(prefix, name, x), g, _restart_inputs(cm.float_model, name, x))
        h, c = seen[name]
        torch.testing.assert_close(h, acc.hessian(alpha), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, acc.cross_moment(alpha), rtol=1e-5, atol=1e-6)
    # from the second layer on the quantized prefix's inputs differ from the float ones
    h, c = seen[names[1]]
    assert not torch.allclose(h, c, rtol=1e-3, atol=1e-3)


def test_corrected_layers_match_the_float_mean_on_the_final_prefix(recorded):
    """Bias correction / BN re-estimation used the quantized layer's output on the cached inputs:
    re-run from the input with all final weights, every layer's group-weighted output mean is
    the float model's."""
    cm, _, biases = recorded
    final = _prefix_model(cm, biases, list(cm.layers))
    alpha = torch.tensor(cm.metadata.group_weights, dtype=torch.float64)
    for name in cm.layers:
        dim = 1 if cm.layers[name].kind == "conv" else -1
        means = []
        for model in (final, cm.float_model):
            per = []
            for x, g in _batches(cm):
                out = []
                h = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: out.append(o))
                with torch.no_grad():
                    model(x)
                h.remove()
                z = out[0].double().movedim(dim, -1)
                z = z.reshape(z.shape[0], -1, z.shape[-1]).mean(1)   # [B, C]
                per.append((z, g))
            channel = torch.stack([
                torch.cat([z[g == k] for z, g in per]).mean(0) for k in range(cm.calib.num_groups)
            ])
            means.append((alpha[:, None] * channel).sum(0))
        torch.testing.assert_close(means[0], means[1], rtol=1e-4, atol=1e-4)


CALLS = {"first": 0}


def _count(module, args) -> None:
    CALLS["first"] += 1


def _deep_mlp(depth: int) -> nn.Module:
    """Linear layers with ReLUs; the first ReLU counts its calls (a hook survives deepcopy and
    tracing: the traced graph calls the same leaf module)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(fm.MLP_FEATURES, 32), nn.ReLU()]
    layers[1].register_forward_pre_hook(_count)
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    layers.append(nn.Linear(32, fm.NUM_CLASSES))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("target", ["float-output", "layer"])
def test_forward_work_does_not_grow_with_depth(target):
    """The first activation runs a fixed number of times per batch, whatever the depth (the
    old loop re-ran it for every later layer: O(layers²) forward work)."""
    data = fm.tabular_task(n=200, seed=2)
    counts = {}
    for depth in (3, 9):
        CALLS["first"] = 0
        _compress(_deep_mlp(depth), data, weight_bits=4, solver_target=target)
        counts[depth] = CALLS["first"]
    assert counts[3] == counts[9]
    n_batches = 128 // 32
    # shapes for BN folding + the Linears' batch-dim probe (2) + check + batch-memory probe + MACs
    # (6 one-off calls); float targets, quantized stream, float stream (float-output only) and
    # activation calibration: one call per batch each
    assert counts[9] == 6 + n_batches * (4 if target == "float-output" else 3)


def test_memory_cap_spills_to_disk_and_changes_nothing(cnn_model, cnn_data, caplog):
    kw = dict(weight_bits=4, num_calib=96, batch_size=16)
    with caplog.at_level(logging.INFO, logger="fqexport.pipeline.compress"):
        held = _compress(cnn_model, cnn_data, **kw)
        spilled = _compress(cnn_model, cnn_data, max_activation_memory_mb=0.1, **kw)
        uncapped = _compress(cnn_model, cnn_data, max_activation_memory_mb=float("inf"), **kw)  # crashed (survey 24)
    logs = [r.getMessage() for r in caplog.records if "activation cache" in r.getMessage()]
    assert "0.0 MB spilled (0 batches)" in logs[0] and "0.0 MB spilled (0 batches)" in logs[2]
    assert "0.0 MB spilled" not in logs[1] and "(0 batches)" not in logs[1], logs[1]
    for other in (spilled, uncapped):
        for name, layer in held.layers.items():
            assert torch.equal(layer.codes, other.layers[name].codes), name
            assert torch.equal(layer.scale, other.layers[name].scale), name
        np.testing.assert_array_equal(held.predict(cnn_data.x[:64]), other.predict(cnn_data.x[:64]))


def test_cache_holds_the_cap_and_returns_the_same_inputs(cnn_model, cnn_data):
    folded, _ = fold_batchnorm(trace(cnn_model))
    batches = [(torch.from_numpy(cnn_data.x[s:s + 16]), torch.from_numpy(cnn_data.group[s:s + 16]))
               for s in range(0, 96, 16)]
    stream = GraphStream(folded)
    k = stream.module_node("dw")
    one_batch = None
    for cap in (None, 0, 200_000):
        with ActivationCache([stream], batches, torch.device("cpu"), max_bytes=cap) as cache:
            cache.advance(k)
            got = [(inputs[0].clone(), g) for inputs, g in cache.layer_inputs(k)]
            if cap is None:
                one_batch = cache.peak_bytes / len(batches)
                assert cache.peak_spilled_bytes == 0
            else:
                assert cache.peak_bytes <= cap and cache.peak_spilled_bytes > 0
                assert cap == 0 or cache.peak_bytes >= cap - 2 * one_batch  # it fills the cap first
        for (x, g), (x_b, g_b) in zip(got, batches):
            assert torch.equal(x, _restart_inputs(folded, "dw", x_b)) and torch.equal(g, g_b)
    with pytest.raises(ValueError, match="layers must be processed in graph order"):
        with ActivationCache([stream], batches, torch.device("cpu")) as cache:
            cache.advance(k)
            cache.advance(k - 1)


def test_max_activation_memory_is_checked():
    with pytest.raises(ConfigError, match=r"max_activation_memory_mb=-1 must be >= 0"):
        QuantConfig(max_activation_memory_mb=-1)


@pytest.mark.skipif(CUDA, reason="checks the error raised on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error(mlp_data):
    with pytest.raises(ConfigError) as err:
        _compress(fm.tiny_mlp(), mlp_data, device="cuda")
    assert str(err.value) == (
        "QuantConfig.device='cuda' (CLI: --device cuda) but torch.cuda.is_available() is False: this "
        "torch build or machine has no usable CUDA GPU; use QuantConfig.device='auto' or 'cpu'")


@pytest.mark.skipif(CUDA, reason="'auto' picks CUDA on this machine")
def test_auto_device_runs_on_the_cpu_without_cuda(mlp_data, caplog):
    with caplog.at_level(logging.INFO, logger="fqexport.pipeline.compress"):
        auto = _compress(fm.tiny_mlp(), mlp_data, weight_bits=4)
        cpu = _compress(fm.tiny_mlp(), mlp_data, weight_bits=4, device="cpu")
    assert sum("activation cache on cpu" in r.getMessage() for r in caplog.records) == 2
    for name in auto.layers:
        assert torch.equal(auto.layers[name].codes, cpu.layers[name].codes)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_device_gives_cpu_results_close_to_the_cpu_run(cnn_model, cnn_data):
    gpu = _compress(cnn_model, cnn_data, weight_bits=4, device="cuda")
    cpu = _compress(cnn_model, cnn_data, weight_bits=4, device="cpu")
    for name, layer in gpu.layers.items():
        assert layer.codes.device.type == "cpu" and layer.scale.device.type == "cpu"
        # GPU matmuls round differently: a few codes may move by one step, scales barely
        same = float((layer.codes == cpu.layers[name].codes).float().mean())
        assert same > 0.95, (name, same)
        torch.testing.assert_close(layer.scale, cpu.layers[name].scale, rtol=1e-2, atol=1e-6)
    assert next(gpu.reference.parameters()).device.type == "cpu"
    agree = np.mean(gpu.predict(cnn_data.x).argmax(1) == cpu.predict(cnn_data.x).argmax(1))
    assert agree > 0.97
