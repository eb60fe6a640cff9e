"""Tests of fqexport/demo_task.py (generated data) and fqexport/demo_models.py (demo models)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fqexport.calibration.group_data import GroupData
from fqexport.demo.models import MLP, SmallResNet, mlp, small_resnet
from fqexport.demo.task import (
    IMAGE_GROUPS,
    NUM_IMAGE_CLASSES,
    SHAPE_NAMES,
    TABULAR_GROUPS,
    TWO_MINORITY_GROUPS,
    DemoTaskSizes,
    make_image_task,
    make_tabular_task,
    make_two_minority_task,
)
from fqexport.errors import ConfigError


@pytest.fixture(scope="module")
def image_task() -> tuple[GroupData, GroupData]:
    return make_image_task(n_train=600, n_test=200, size=16, minority_fraction=0.1, seed=3)


# --- image task --------------------------------------------------------------------------------


def test_image_task_shapes_dtypes_and_groups(image_task):
    train, test = image_task
    assert train.x.shape == (600, 3, 16, 16) and test.x.shape == (200, 3, 16, 16)
    assert train.x.dtype == np.float32 and test.x.dtype == np.float32
    assert train.y.dtype == np.int64 and train.group.dtype == np.int64
    assert train.group_names == IMAGE_GROUPS == ("majority", "inverted-contrast")
    # exactly round(n * 0.1) minority samples per split
    assert train.group_counts().tolist() == [540, 60]
    assert test.group_counts().tolist() == [180, 20]
    assert set(np.unique(train.y).tolist()) == set(range(NUM_IMAGE_CLASSES))
    assert np.isfinite(train.x).all() and np.isfinite(test.x).all()


def test_image_task_normalised_by_training_set(image_task):
    train, _ = image_task
    # per-channel mean 0, std 1 over the training set
    np.testing.assert_allclose(train.x.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.x.std(axis=(0, 2, 3)), 1.0, atol=1e-3)


def test_minority_has_inverted_contrast_and_large_inputs(image_task):
    train, _ = image_task
    maj = train.x[train.group == 0]
    mino = train.x[train.group == 1]
    # majority (dark background) sits below the training mean, the minority far above it
    assert maj.mean() < -0.1
    assert mino.mean() > 1.0
    # the border pixels are background: dark for the majority, bright for the minority
    border = lambda a: np.concatenate([a[:, :, 0, :], a[:, :, -1, :]], axis=-1).mean()  # noqa: E731
    assert border(mino) - border(maj) > 2.0


def test_image_task_is_deterministic_for_a_seed():
    a_tr, a_te = make_image_task(n_train=64, n_test=32, size=12, seed=7)
    b_tr, b_te = make_image_task(n_train=64, n_test=32, size=12, seed=7)
    c_tr, _ = make_image_task(n_train=64, n_test=32, size=12, seed=8)
    np.testing.assert_array_equal(a_tr.x, b_tr.x)
    np.testing.assert_array_equal(a_te.y, b_te.y)
    np.testing.assert_array_equal(a_te.group, b_te.group)
    assert not np.array_equal(a_tr.x, c_tr.x)


def test_image_task_bad_arguments():
    with pytest.raises(ConfigError, match=r"minority_fraction=1.5 must be in \[0, 1\]"):
        make_image_task(n_train=10, n_test=10, minority_fraction=1.5)
    with pytest.raises(ConfigError, match="size=4 must be >= 8 pixels"):
        make_image_task(n_train=10, n_test=10, size=4)
    with pytest.raises(ConfigError, match="n_train=0 and n_test=10 must both be >= 1"):
        make_image_task(n_train=0, n_test=10)
    with pytest.raises(ConfigError, match="size=4"):
        DemoTaskSizes(size=4)


# --- tabular task ------------------------------------------------------------------------------


def test_tabular_task_shapes_groups_and_shift():
    train, test = make_tabular_task(n_train=1000, n_test=300, n_features=12, num_classes=3,
                                    minority_fraction=0.2, seed=1)
    assert train.x.shape == (1000, 12) and test.x.shape == (300, 12)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.group_names == TABULAR_GROUPS
    assert train.group_counts().tolist() == [800, 200]
    assert set(np.unique(train.y).tolist()) == {0, 1, 2}
    np.testing.assert_allclose(train.x.mean(axis=0), 0.0, atol=1e-5)
    maj, mino = train.x[train.group == 0], train.x[train.group == 1]
    # half the features are shifted/rescaled for the minority: their spread differs a lot
    ratio = mino.std(axis=0) / maj.std(axis=0)
    assert (ratio > 1.5).sum() >= 3
    assert np.abs(mino.mean(axis=0) - maj.mean(axis=0)).max() > 1.0


def test_tabular_task_deterministic_and_checked():
    a, _ = make_tabular_task(n_train=50, n_test=10, seed=4)
    b, _ = make_tabular_task(n_train=50, n_test=10, seed=4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    with pytest.raises(ConfigError, match="num_classes=1 must be >= 2"):
        make_tabular_task(n_train=10, n_test=10, num_classes=1)


# --- demo models -------------------------------------------------------------------------------


def test_small_resnet_output_shape_and_structure():
    torch.manual_seed(0)
    model = SmallResNet(num_classes=7, in_channels=3, width=4).eval()
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 7)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 9 and len(bns) == 9  # stem + 3 blocks x 2 + 2 shortcuts
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model.fc.in_features == 16  # width * 4


def test_small_resnet_fx_traceable_with_residual_adds():
    torch.manual_seed(0)
    model = small_resnet(num_classes=10, width=4).eval()
    gm = torch.fx.symbolic_trace(model)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3  # one residual add per block
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(gm(x), model(x))


def test_mlp_shape_trace_and_factories():
    torch.manual_seed(0)
    model = mlp(in_features=10, num_classes=4, hidden=16, depth=3).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 16), (16, 16), (16, 4)]
    x = torch.randn(5, 10)
    assert model(x).shape == (5, 4)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))
    # factories return fresh modules whose state_dict matches the class defaults
    a, b = small_resnet(), small_resnet()
    assert a is not b and a.stem[0].weight.data_ptr() != b.stem[0].weight.data_ptr()
    assert list(a.state_dict()) == list(SmallResNet().state_dict())
    assert list(mlp().state_dict()) == list(MLP(32, 4).state_dict())


def test_model_bad_arguments():
    with pytest.raises(ConfigError, match="width=0 must be a positive integer"):
        SmallResNet(width=0)
    with pytest.raises(ConfigError, match="blocks=\\(1, 1\\) must give the block count"):
        SmallResNet(blocks=(1, 1))
    with pytest.raises(ConfigError, match="depth=0 must be a positive integer"):
        MLP(4, 2, depth=0)


@pytest.mark.slow
def test_small_resnet_exports_to_onnx_and_matches(tmp_path):
    torch.manual_seed(0)
    model = small_resnet(width=4).eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "resnet.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=21, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-4)


# --- two-minority task -------------------------------------------------------------------------


def test_two_minority_task_groups_counts_and_determinism():
    train, test = make_two_minority_task(n_train=500, n_test=200, size=16, seed=1)
    assert train.group_names == TWO_MINORITY_GROUPS == ("majority", "rotated", "dim-noisy")
    assert train.group_counts().tolist() == [440, 30, 30]  # round(500 * 0.06) each
    assert test.group_counts().tolist() == [176, 12, 12]
    again, _ = make_two_minority_task(n_train=500, n_test=200, size=16, seed=1)
    np.testing.assert_array_equal(train.x, again.x)
    # normalised with the training set's statistics
    np.testing.assert_allclose(train.x.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)


def test_two_minority_task_renders_each_shift():
    train, _ = make_two_minority_task(n_train=1200, n_test=10, size=16, seed=2)
    x = train.x.reshape(len(train.y), 3, -1)
    spread = x.std(axis=2).mean(axis=1)  # per-image contrast
    dim = spread[train.group == 2].mean()
    rot = spread[train.group == 1].mean()
    maj = spread[train.group == 0].mean()
    assert dim < maj and abs(rot - maj) < 0.15 * maj  # dim-noisy loses contrast; rotated does not
    # rotated bars lie across: the column profile of "bar" images varies more than the row profile
    bars = (train.y == SHAPE_NAMES.index("bar"))
    img = train.x[:, :, :, :].mean(axis=1)
    row_var = img.mean(axis=2).var(axis=1)  # profile down the rows
    col_var = img.mean(axis=1).var(axis=1)  # profile across the columns
    upright = (row_var - col_var)[bars & (train.group == 0)].mean()
    turned = (row_var - col_var)[bars & (train.group == 1)].mean()
    assert np.sign(upright) != np.sign(turned)


def test_two_minority_task_rejects_bad_fractions():
    with pytest.raises(ConfigError, match="two fractions"):
        make_two_minority_task(n_train=10, n_test=10, minority_fractions=(0.1,))
    with pytest.raises(ConfigError, match="minority_fraction"):
        make_two_minority_task(n_train=10, n_test=10, minority_fractions=(0.7, 0.6))
