"""Tests of fqexport/finetune/adaround.py: the rounding math and the group-weighted layer loop."""

from __future__ import annotations

import pytest
import torch

from fqexport.config import QuantConfig
from fqexport.errors import ConfigError
from fqexport.finetune.api import finetune
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.adaround import (
    adaptive_rounding,
    group_weighted_mse,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    rounding_regulariser,
)
from fqexport.pipeline.compress import compress


def test_rectified_sigmoid_round_trips_and_saturates():
    h = torch.tensor([0.05, 0.3, 0.5, 0.9])
    assert rectified_sigmoid(inverse_rectified_sigmoid(h)).tolist() == pytest.approx(h.tolist(), abs=1e-6)
    assert rectified_sigmoid(torch.tensor([-20.0, 20.0])).tolist() == [0.0, 1.0]  # reaches 0 and 1 exactly


def test_rounding_regulariser_is_zero_only_at_hard_roundings():
    assert float(rounding_regulariser(torch.tensor([0.0, 1.0, 1.0]), 2.0)) == 0.0
    # 1 - |2h - 1|^2 at h = 0.5 and 0.25: 1 and 0.75
    assert float(rounding_regulariser(torch.tensor([0.5, 0.25]), 2.0)) == pytest.approx(1.75)


def test_group_weighted_mse_counts_every_group_equally():
    out = torch.tensor([[1.0], [1.0], [1.0], [3.0]])
    target = torch.zeros(4, 1)
    group = torch.tensor([0, 0, 0, 1])
    # group 0: mean 1 over three samples; group 1: 9 over one; equal weights: (1 + 9) / 2
    assert float(group_weighted_mse(out, target, group, 2)) == pytest.approx(5.0)
    # an absent group does not count
    assert float(group_weighted_mse(out[:3], target[:3], group[:3], 2)) == pytest.approx(1.0)


def test_adaptive_rounding_never_reconstructs_worse_than_the_solver(mlp_model, mlp_data):
    cm = compress(mlp_model, mlp_data, QuantConfig(weight_bits=2, method="rtn", num_calib=200), progress=False)
    out, rec = adaptive_rounding(cm, mlp_data, num_samples=128, iters=150)
    assert set(rec["layers"]) == set(cm.layers) and rec["num_samples"] == 128
    for name, r in rec["layers"].items():
        layer, before = out.layers[name], cm.layers[name]
        assert min(r["solver_error"], r["adaptive_error"]) <= r["solver_error"]
        # grids unchanged, codes inside them; a layer kept at "solver" keeps its codes exactly
        assert torch.equal(layer.scale, before.scale) and layer.bits == 2
        assert int(layer.codes.min()) >= -2 and int(layer.codes.max()) <= 1
        if r["kept"] == "solver":
            assert torch.equal(layer.codes, before.codes)
        else:
            assert r["adaptive_error"] < r["solver_error"]
            assert float((layer.codes != before.codes).float().mean()) == pytest.approx(r["codes_changed"], abs=1e-4)
    # round to nearest leaves room: at least one layer re-rounded
    assert any(r["kept"] == "adaptive" for r in rec["layers"].values())
    # the written-back reference computes with the new codes
    x = torch.from_numpy(mlp_data.x[:64])
    manual = out.reference(x)
    assert torch.allclose(torch.from_numpy(out.predict(mlp_data.x[:64])).float(), manual.float(), atol=1e-5)


def test_adaptive_rounding_brings_the_model_closer_to_the_float_model(cnn_model, cnn_data):
    """Each layer is fitted to the float model's own output (AdaRound's asymmetric target). Against
    the float layer on the quantized input, every layer re-rounded to a lower error of that kind
    while the model drifted from float: test accuracy 78.5 -> 49.9 % on a user's CNN (survey 50).
    Here (W2 round to nearest) that target doubled the KL divergence to the float model's
    predictions (0.034 -> 0.074) and lost accuracy (98.75 -> 97.5 %); the float inputs' target
    shrinks it (-> 0.021) and gains (-> 99.5 %)."""
    cm = compress(cnn_model, cnn_data, QuantConfig(weight_bits=2, method="rtn", num_calib=200), progress=False)
    out, _ = adaptive_rounding(cm, cnn_data, num_samples=128, iters=150)
    reference = torch.log_softmax(torch.from_numpy(cm.predict(cnn_data.x, quantized=False)), 1)

    def kl_and_accuracy(model):
        logits = torch.from_numpy(model.predict(cnn_data.x))
        kl = (reference.exp() * (reference - torch.log_softmax(logits, 1))).sum(1).mean()
        return float(kl), float((logits.argmax(1).numpy() == cnn_data.y).mean())

    (rtn_kl, rtn_acc), (kl, acc) = kl_and_accuracy(cm), kl_and_accuracy(out)
    assert kl < 0.8 * rtn_kl and acc >= rtn_acc, (rtn_kl, kl, rtn_acc, acc)


def test_finetune_with_adaptive_rounding_records_it_and_starts_from_it(mlp_model, mlp_data):
    cm = compress(mlp_model, mlp_data, QuantConfig(weight_bits=2, method="rtn", num_calib=200), progress=False)
    cfg = FinetuneConfig(epochs=1, batch_size=32, rounding="adaptive", adaround_iters=100)
    rec = finetune(cm, mlp_data, cfg, progress=False).metadata.finetune
    ar = rec["adaptive_rounding"]
    assert rec["settings"]["rounding"] == "adaptive" and set(ar["layers"]) == set(cm.layers) and ar["iters"] == 100
    # the hold-out "before" column is the solver's PTQ model, not the re-rounded start
    solver = finetune(cm, mlp_data, FinetuneConfig(epochs=1, batch_size=32), progress=False).metadata.finetune
    assert rec["holdout_before"] == solver["holdout_before"]
    with pytest.raises(ConfigError, match=r"FinetuneConfig.rounding='ada' is not one of solver, adaptive"):
        FinetuneConfig(rounding="ada")
