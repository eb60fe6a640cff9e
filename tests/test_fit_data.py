"""The training data as fine-tuning sees it (fqexport.finetune.fit_data): the core-set's batches."""

from __future__ import annotations

import numpy as np
import torch

from fqexport.calibration.group_data import GroupData
from fqexport.calibration.readers import open_stream
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.fit_data import FitData, epoch_batches, steps_per_epoch


def test_coreset_keeps_where_quantization_moved_the_model_in_group_balanced_batches():
    # student == teacher except on 5 samples; the labels are ones neither model predicts, so
    # label cross-entropy is high everywhere and says nothing about what quantization broke
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    group = np.array([0] * 60 + [1] * 20)
    student = torch.nn.Linear(4, 3)
    with torch.no_grad():
        teacher = student(torch.from_numpy(x))
    y = teacher.argmin(1)
    moved = [1, 5, 9, 61, 65]
    teacher = teacher.clone()
    teacher[moved] += torch.tensor([4.0, -4.0, 0.0])
    fit = GroupData(x, y.numpy(), group, ("a", "b"))
    cfg = FinetuneConfig(batch_size=4, sampler="core-set", coreset_fraction=0.05, coreset_min_per_group=2,
                         coreset_score="disagreement")
    fixed = type("Fixed", (torch.nn.Module,), {"forward": lambda self, xb: teacher})()  # the logits above
    fit = FitData(open_stream(fit), fixed, torch.device("cpu"), 0)
    batches = epoch_batches(student, fit, cfg, np.random.default_rng(0), 2)
    assert sorted(set(np.concatenate(batches).tolist())) == moved  # 3 of a (5% of 60), 2 of b (the floor)
    # ceil(5 / 4) batches, each with as many samples of a as of b (b's two are revisited)
    assert [sorted(group[b].tolist()) for b in batches] == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert steps_per_epoch(group, cfg) == len(batches)
