"""Tests of fqexport/demo/training.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.demo.models import MLP, SmallResNet
from fqexport.demo.task import make_image_task, make_tabular_task
from fqexport.demo.training import (
    DEMO_TASK_SIZES,
    DEMO_TRAIN,
    TrainConfig,
    lr_at,
    train_classifier,
)
from fqexport.errors import ConfigError, DataError
from fqexport.metrics.group_metrics import GroupMetrics, group_metrics


def test_train_config_checks():
    with pytest.raises(ConfigError, match="TrainConfig.epochs=0 must be a positive integer"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="TrainConfig.lr=-1.0 must be a finite number > 0"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="TrainConfig.max_seconds=0 must be > 0 or None"):
        TrainConfig(max_seconds=0)
    with pytest.raises(ConfigError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        TrainConfig(label_smoothing=1.0)
    assert DEMO_TRAIN.max_seconds is None  # fixed steps: the demo's model does not depend on machine load
    assert DEMO_TASK_SIZES.minority_fraction == pytest.approx(0.1)


def test_lr_schedule_warmup_peak_and_anneal():
    assert lr_at(0.0, 1.0) == pytest.approx(0.02)
    assert lr_at(0.075, 1.0) == pytest.approx(0.5)
    assert lr_at(0.15, 1.0) == pytest.approx(1.0)
    assert lr_at(0.575, 1.0) == pytest.approx(0.5)
    assert lr_at(1.0, 1.0) == pytest.approx(0.0, abs=1e-12)


def _metrics(model: nn.Module, data: GroupData) -> GroupMetrics:
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x)).numpy()
    return group_metrics(logits, data.y, data.group, data.group_names)


def test_tiny_resnet_training_lowers_loss_and_returns_eval_mode():
    train, _ = make_image_task(n_train=320, n_test=10, size=16, seed=0)
    torch.manual_seed(0)
    model = SmallResNet(width=8)
    before = _metrics(model.eval(), train).overall["loss"]
    out = train_classifier(model, train, TrainConfig(epochs=1, batch_size=16, lr=0.1),
                           progress=False)
    after = _metrics(model, train).overall["loss"]
    assert out is model and not model.training
    assert after < before - 0.1, (before, after)
    # parameters are back in the default (contiguous) memory format after channels_last training
    assert all(p.is_contiguous() for p in model.parameters())


def test_mlp_training_is_deterministic_and_learns():
    train, test = make_tabular_task(n_train=600, n_test=300, n_features=8, num_classes=3, seed=0)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=5)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = train_classifier(MLP(8, 3, hidden=32), train, cfg, progress=False)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)
    assert _metrics(model, test).overall["accuracy"] > 0.6  # chance is 1/3


def test_time_budget_stops_early(caplog):
    train, _ = make_tabular_task(n_train=256, n_test=10, n_features=4, seed=0)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1000, batch_size=16, max_seconds=0.2)
    with caplog.at_level(logging.WARNING, logger="fqexport.demo.training"):
        model = train_classifier(MLP(4, 4, hidden=8), train, cfg, progress=False)
    assert not model.training
    assert "max_seconds=0.2 reached" in caplog.text


def test_bad_training_data():
    data = GroupData(np.zeros((4, 3), np.float32), np.array([0, 1, 5, 2]), np.zeros(4, np.int64),
                     ("all",), "mem.npz")
    with pytest.raises(DataError, match=r"'mem.npz': field 'y' holds labels in \[0, 5\] but the "
                                        r"model has 3 outputs"):
        train_classifier(MLP(3, 3, hidden=4), data, TrainConfig(epochs=1), progress=False)
    empty = data.subset(np.array([], dtype=np.int64))
    with pytest.raises(DataError, match="'mem.npz' holds no samples"):
        train_classifier(MLP(3, 3, hidden=4), empty, TrainConfig(epochs=1), progress=False)
