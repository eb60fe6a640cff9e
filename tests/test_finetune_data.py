"""Fine-tuning from a stream (fqexport.calibration.stream: GroupData, memory-mapped .npz, Dataset
through a DataLoader with workers; the stream itself is tested in test_stream.py).

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

from fixtures_models import ItemsDataset
from fqexport.calibration.readers import load_data
from fqexport.cli.main import main
from fqexport.config import QuantConfig
from fqexport.errors import DataError
from fqexport.finetune.api import finetune
from fqexport.finetune.config import FinetuneConfig
from fqexport.pipeline.compress import compress

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def mlp_cm2(mlp_model, mlp_data):
    return compress(mlp_model, mlp_data, QuantConfig(weight_bits=2, method="rtn", num_calib=200), progress=False)


def _weights(cm):
    return {k: v.detach().clone() for k, v in cm.reference.state_dict().items()}


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


def test_a_holdout_cap_below_the_group_count_keeps_one_sample_of_each_group(mlp_cm2, mlp_data, caplog):
    with caplog.at_level("WARNING"):
        out = finetune(mlp_cm2, mlp_data, FinetuneConfig(epochs=1, batch_size=64, holdout_max=1, max_steps=1),
                       progress=False)
    rec = out.metadata.finetune
    assert [rec["holdout_after"][g]["count"] for g in mlp_data.group_names] == [1, 1]
    assert rec["num_holdout"] == 2 and rec["num_fit"] == len(mlp_data) - 2
    assert "holdout_max=1 is below the 2 groups of the fine-tuning hold-out: it keeps one sample of each" in caplog.text


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


def test_finetune_without_labels_says_so_before_any_step(mlp_cm2, mlp_data):
    x_alone = load_data([torch.from_numpy(x) for x in mlp_data.x], groups=np.array(mlp_data.group_names)[mlp_data.group])
    with pytest.raises(DataError) as info:
        finetune(mlp_cm2, x_alone, FinetuneConfig(epochs=1), progress=False)
    assert str(info.value) == "finetune needs labels: <list> yields no y; give (x, y) or (x, y, group) samples"


def test_training_data_with_the_calibrations_groups_in_another_order_is_renumbered(mlp_data):
    """String groups come sorted and a CSV manifest states no order: the same names in another
    order than the calibration file's are renumbered by name, other names refused."""
    from types import SimpleNamespace

    from fqexport.calibration.group_data import GroupData
    from fqexport.calibration.stream import in_memory_stream
    from fqexport.errors import DataError
    from fqexport.finetune.start import check_train_data
    from fqexport.tasks.classification import Classification

    names = tuple(mlp_data.group_names)
    flipped = GroupData(mlp_data.x, mlp_data.y, (mlp_data.num_groups - 1) - mlp_data.group, names[::-1], "t.npz")
    cm = SimpleNamespace(group_names=names, input_shape=mlp_data.sample_shape, task=Classification(), num_classes=4)
    for data in (flipped, in_memory_stream(flipped)):
        got = check_train_data(data, cm)
        assert got.group_names == names and type(got) is type(data)
        np.testing.assert_array_equal(got.group, mlp_data.group)  # each sample keeps its group's name
        assert data.group_names == names[::-1]  # the caller's data is not modified
    other = GroupData(mlp_data.x, mlp_data.y, mlp_data.group, ("x", "y"), "o.npz")
    with pytest.raises(DataError, match=r"o.npz: the training data's groups do not match the calibration data's "
                                        r"\(missing from the training data: 'a', 'b'; not in the calibration data: "
                                        r"'x', 'y'\)"):
        check_train_data(other, cm)
