"""Tests of fqexport/finetune/data.py: the training stream (GroupData, memory-mapped .npz,
Dataset through a DataLoader with workers) and fine-tuning from it.

What is guaranteed: a Dataset (any num_workers) or an .npz gives the same labels, groups, hold-out
split and sampled batches as the equivalent GroupData, so the same x per step; the teacher's
logits are computed per batch for streamed data (once for in-memory data), which may differ in
the last float bits, so the fine-tuned weights agree within float tolerance, not bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fqexport.calibration.group_data import GroupData
from fqexport.cli.main import main
from fqexport.config import QuantConfig
from fqexport.errors import DataError
from fqexport.finetune.api import finetune
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.data import open_train
from fqexport.pipeline.compress import compress

TESTS = Path(__file__).parent


class ItemsDataset(torch.utils.data.Dataset):
    """The items of a GroupData, group as a name; ``bad`` maps an index to a replacement item."""

    def __init__(self, data: GroupData, bad: dict | None = None, declare: bool = False) -> None:
        self.data, self.bad, self.declare = data, bad or {}, declare

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        if i in self.bad:
            return self.bad[i]
        d = self.data
        return torch.from_numpy(d.x[i]), int(d.y[i]), d.group_names[d.group[i]]

    def __getattr__(self, name):
        if name == "labels_and_groups" and self.__dict__.get("declare"):
            return lambda: (self.data.y, np.array(self.data.group_names)[self.data.group])
        raise AttributeError(name)


@pytest.fixture(scope="module")
def mlp_cm2(mlp_model, mlp_data):
    return compress(mlp_model, mlp_data, QuantConfig(weight_bits=2, method="rtn", num_calib=200), progress=False)


def _weights(cm):
    return {k: v.detach().clone() for k, v in cm.reference.state_dict().items()}


# ------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_x_is_memory_mapped_and_batches_match_the_arrays(tmp_path, mlp_data, compressed):
    path = tmp_path / "t.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=mlp_data.x, y=mlp_data.y, group=mlp_data.group)
    stream = open_train(path)
    assert isinstance(stream._reader.x, np.memmap)
    assert not stream.in_memory and stream.sample_shape == mlp_data.x.shape[1:]
    np.testing.assert_array_equal(stream.y, mlp_data.y)
    sub = stream.subset(np.arange(100, 300))
    (x, y, g), = sub.batches([np.array([7, 0, 199])])
    np.testing.assert_array_equal(x, mlp_data.x[[107, 100, 299]])
    np.testing.assert_array_equal(g, mlp_data.group[[107, 100, 299]])


def test_npz_with_nan_fails_at_open_naming_the_sample(tmp_path, mlp_data):
    x = mlp_data.x.copy()
    x[123, 0] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=mlp_data.y, group=mlp_data.group)
    with pytest.raises(DataError, match=r"bad\.npz: sample 123: field 'x' contains NaN or Inf \(1 values\)"):
        open_train(path)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_light_pass_gives_the_readers_labels_and_groups(mlp_data, workers):
    stream = open_train(ItemsDataset(mlp_data), num_workers=workers)
    assert stream.group_names == mlp_data.group_names
    np.testing.assert_array_equal(stream.y, mlp_data.y)
    np.testing.assert_array_equal(stream.group, mlp_data.group)
    batches = [np.array([5, 1]), np.array([399, 0, 17])]
    for (x, _, _), idx in zip(stream.batches(batches, workers), batches):
        np.testing.assert_array_equal(x, mlp_data.x[idx])


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_item_in_a_streamed_batch_names_its_index(mlp_data, workers):
    nan_x = torch.full(mlp_data.x.shape[1:], float("nan"))
    stream = open_train(ItemsDataset(mlp_data, bad={250: (nan_x, 0, "group0")}, declare=True))
    with pytest.raises(DataError, match=r"<ItemsDataset>: sample 250: field 'x' contains NaN or Inf"):
        list(stream.batches([np.arange(0, 64), np.arange(240, 260)], workers))
    unknown = (torch.zeros(mlp_data.x.shape[1:]), int(mlp_data.y[301]), "martians")
    stream = open_train(ItemsDataset(mlp_data, bad={301: unknown}, declare=True))
    with pytest.raises(DataError, match=r"holds the name 'martians' \(sample 301\) that is not in group_names"):
        list(stream.batches([np.arange(290, 310)], workers))


# ------------------------------------------------------------------------- fine-tuning from a stream


@pytest.mark.parametrize("workers", [0, 2])
def test_finetune_from_a_dataset_matches_the_groupdata(mlp_cm2, mlp_data, workers):
    cfg = FinetuneConfig(epochs=1, batch_size=32, sampler="core-set", loss="worst-group",
                         coreset_min_per_group=8, num_workers=workers)
    ref = finetune(mlp_cm2, mlp_data, cfg, progress=False)
    got = finetune(mlp_cm2, ItemsDataset(mlp_data), cfg, progress=False)
    a, b = _weights(ref), _weights(got)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    ra, rb = ref.metadata.finetune, got.metadata.finetune
    assert (ra["num_fit"], ra["num_holdout"], ra["steps"]) == (rb["num_fit"], rb["num_holdout"], rb["steps"])
    assert ra["train_group_counts"] == rb["train_group_counts"]


def test_bad_item_mid_epoch_raises_before_any_output(mlp_cm2, mlp_data, tmp_path):
    # labels_and_groups() declared: no light pass, so the NaN is met only while training
    nan_x = torch.full(mlp_data.x.shape[1:], float("nan"))
    ds = ItemsDataset(mlp_data, bad={333: (nan_x, int(mlp_data.y[333]), mlp_data.group_names[mlp_data.group[333]])},
                      declare=True)
    before = _weights(mlp_cm2)
    with pytest.raises(DataError, match=r"sample 333: field 'x' contains NaN or Inf"):
        finetune(mlp_cm2, ds, FinetuneConfig(epochs=1, batch_size=32), progress=False)
    after = _weights(mlp_cm2)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_holdout_is_capped_and_balanced(mlp_cm2, mlp_data):
    out = finetune(mlp_cm2, mlp_data, FinetuneConfig(epochs=1, batch_size=64, holdout_fraction=0.3,
                                                     holdout_max=40, max_steps=1), progress=False)
    rec = out.metadata.finetune
    assert rec["num_holdout"] == 40 and rec["num_fit"] == len(mlp_data) - 40
    assert [rec["holdout_after"][g]["count"] for g in mlp_data.group_names] == [20, 20]
    assert rec["steps"] == 1 and rec["stopped"] == "max_steps"


def test_cli_compress_finetune_from_npz_with_workers(mlp_files, tmp_path, capsys):
    out = tmp_path / "ft.onnx"
    rc = main(["compress", "--model", "fixtures_models:tiny_mlp", "--weights", str(mlp_files / "mlp.pt"),
               "--calib", str(mlp_files / "calib.npz"), "--out", str(out), "--num-calib", "200",
               "--weight-bits", "2", "--finetune", "--train", str(mlp_files / "calib.npz"), "--epochs", "1",
               "--workers", "2", "--loss", "ce", "--sampler", "natural"])
    assert rc == 0 and out.is_file()
    assert "fine-tuning (ce, natural sampling): 1 epoch(s)" in capsys.readouterr().out


# ------------------------------------------------------------------------- bounded memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    import fixtures_models as fm
    from fqexport.config import QuantConfig
    from fqexport.finetune.api import finetune
    from fqexport.finetune.config import FinetuneConfig
    from fqexport.pipeline.compress import compress

    class Big(torch.utils.data.Dataset):
        group_names = ("majority", "minority")
        # 50k items of 3x16x16 float32 made from the index: 153.6 MB if materialized
        def __len__(self):
            return 50_000
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            x = torch.rand(3, 16, 16, generator=g) + (0.5 if i % 10 == 0 else 0.0)
            return x, i % 2, i % 10 == 0
        def labels_and_groups(self):  # labels and groups without reading every image
            i = np.arange(50_000)
            return i % 2, (i % 10 == 0).astype(np.int64)

    small = fm.image_task(200)
    cm = compress(fm.train(fm.tiny_cnn(), small, epochs=1), small, QuantConfig(weight_bits=4, num_calib=64),
                  progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = finetune(cm, Big(), FinetuneConfig(epochs=1, batch_size=64, max_steps=20, holdout_max=256), progress=False)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print("RSS_GROWTH_KB", grew, "STEPS", out.metadata.finetune["steps"])
""")


@pytest.mark.slow
def test_streaming_50k_items_keeps_memory_far_below_the_materialized_size():
    # fixtures_models.image_task is 3x16x16 like Big; run alone so ru_maxrss measures this run only
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.format(tests=str(TESTS))], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS_GROWTH_KB")][0].split()
    grew_mb, steps = int(line[1]) / 1024, int(line[3])
    assert steps == 20
    assert grew_mb < 40, f"peak RSS grew {grew_mb:.1f} MB; x materialized would be 153.6 MB"
