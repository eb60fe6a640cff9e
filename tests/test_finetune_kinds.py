"""Fine-tuning every layer kind compress quantizes: Conv1d, ConvTranspose2d (output channels on
the weight's axis 1), Embedding (int64 token ids, per-row steps) and <=4-bit Linears with
per-block scales (MatMulNBits). Each goes compress → finetune → export (ORT parity check), and
the ConvTranspose2d sensitivity is measured on the exported per-output-channel grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fixtures_models as fm
from fqexport.calibration.group_data import GroupData
from fqexport.config import QuantConfig
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.finetune.api import finetune
from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.qat import build_student, requantize
from fqexport.pipeline.compress import compress
from fqexport.quant.grid import choose_weight_grid, quantize
from fqexport.search.sensitivity import rtn_weight

VOCAB, SEQ, FEATURES = 40, 10, 40


class SignalNet(nn.Module):
    """Conv1d (+BN) x2 over a 1-channel signal, mean pool, Linear."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, width, 5, padding=2)
        self.c2 = nn.Conv1d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, fm.NUM_CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.c2(torch.relu(self.c1(x))))).mean(-1))


class UpNet(nn.Module):
    """UNet-style: a stride-2 conv down, a ConvTranspose2d up (stride 2, padding 1,
    output_padding 1) back to full resolution, a skip concat, a Linear head."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(2 * width, fm.NUM_CLASSES)

    def forward(self, x):
        skip = torch.relu(self.stem(x))
        up = torch.relu(self.up(torch.relu(self.down(skip))))
        return self.head(F.adaptive_avg_pool2d(torch.cat([up, skip], 1), 1).flatten(1))


class TextNet(nn.Module):
    """Token ids [B, T] (int64) → Embedding → mean → Linear."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, fm.NUM_CLASSES)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


class BlockMLP(nn.Module):
    """Widths whose MatMulNBits blocks split each row: K=40 → blocks of 16 (the last one 8
    long), K=96 → blocks of 32."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 96)
        self.fc2 = nn.Linear(96, 96)
        self.fc3 = nn.Linear(96, fm.NUM_CLASSES)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _signal_data() -> GroupData:
    d = fm.tabular_task(n=320)
    return GroupData(d.x.reshape(len(d), 1, -1), d.y, d.group, d.group_names, "signal")


def _token_data(n: int = 320, seed: int = 0) -> GroupData:
    """Label = the quarter of the vocabulary most tokens come from (30% noise tokens); the
    minority draws from the upper half of each quarter."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, fm.NUM_CLASSES, n)
    group = (rng.random(n) < 0.3).astype(np.int64)
    q = VOCAB // fm.NUM_CLASSES
    ids = y[:, None] * q + np.where(group[:, None] == 1, q // 2, 0) + rng.integers(0, q // 2, (n, SEQ))
    ids = np.where(rng.random((n, SEQ)) < 0.3, rng.integers(0, VOCAB, (n, SEQ)), ids)
    return GroupData(ids.astype(np.int64), y.astype(np.int64), group, ("a", "b"), "tokens")


def _mlp_data(n: int = 320, seed: int = 1) -> GroupData:
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(7).standard_normal((FEATURES, fm.NUM_CLASSES))
    group = (rng.random(n) < 0.3).astype(np.int64)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    x[group == 1] = 2.0 * x[group == 1] + 0.5
    return GroupData(x, (x @ teacher).argmax(1).astype(np.int64), group, ("a", "b"), "mlp")


# name -> (model, data, weight bits, the layer of the kind under test, its kind)
CASES = {
    "conv1d": (SignalNet, _signal_data, 4, "c2", "conv"),
    "conv_transpose": (UpNet, lambda: fm.image_task(n=240), 4, "up", "conv_transpose"),
    "embedding": (TextNet, _token_data, 4, "embed", "embedding"),
    "block_scales": (BlockMLP, _mlp_data, 4, "fc1", "linear"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    make, data_fn, bits, name, kind = CASES[request.param]
    data = data_fn()
    torch.manual_seed(0)
    net = fm.train(make(), data, epochs=15, lr=0.02)
    cm = compress(net, data, QuantConfig(weight_bits=bits, num_calib=128), progress=False)
    return request.param, cm, data, name, kind


def test_student_starts_at_the_ptq_reference_and_its_loss_goes_down(case):
    label, cm, data, name, kind = case
    layer = cm.layers[name]
    assert layer.kind == kind
    if label == "block_scales":  # per-(row, block) scales, the last block of fc1 short
        assert layer.block_size == 16 and layer.scale.shape == (96, 3)
        assert cm.layers["fc2"].block_size == 32 and cm.layers["fc2"].scale.shape == (96, 3)
    student, weights, _ = build_student(cm.reference, cm.layers)
    x = torch.from_numpy(data.x[:96])
    y = torch.from_numpy(data.y[:96])
    with torch.no_grad():
        ref = cm.reference(x)
        torch.testing.assert_close(student(x), ref, rtol=0, atol=1e-5)
    # every kind's weight is the layer's dequantized weight, its step broadcast on the right axis
    for n, m in weights.items():
        torch.testing.assert_close(m.weight().detach(), cm.layers[n].dequantized(), rtol=0, atol=1e-7)
    latent = [m.latent for m in weights.values()]
    others = [p for p in student.parameters() if p.requires_grad and all(p is not q for q in latent)]
    opt = torch.optim.Adam([{"params": latent, "lr": 0.1}, {"params": others, "lr": 1e-3}])
    start = float(F.cross_entropy(ref, y))
    for _ in range(30):
        loss = F.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert weights[name].latent.grad is not None and float(weights[name].ratio.grad.abs().sum()) > 0
    with torch.no_grad():
        end = float(F.cross_entropy(student(x), y))
    assert end < 0.95 * start


def test_finetune_keeps_each_kinds_grid_and_exports_with_ort_parity(case, tmp_path):
    label, cm, data, name, _ = case
    out = finetune(cm, data, FinetuneConfig(epochs=1, batch_size=32, lr=1e-2, holdout_fraction=0.2),
                   progress=False)
    changed = 0
    for n, before in cm.layers.items():
        after = out.layers[n]
        assert after.codes.dtype == torch.int8 and after.codes.shape == before.codes.shape
        assert after.scale.shape == before.scale.shape and after.block_size == before.block_size
        assert before.qmin <= int(after.codes.min()) and int(after.codes.max()) <= before.qmax
        module = out.reference.get_submodule(n)
        assert torch.equal(module.weight.detach(), after.dequantized())
        changed += int(not torch.equal(after.scale, before.scale) or not torch.equal(after.codes, before.codes))
    history = out.metadata.finetune["history"]
    assert len(history) == 2 and np.isfinite(history[1]["holdout_worst_group_loss"])
    if out.metadata.finetune.get("best_epoch", 1) == 1:
        assert changed > 0  # the kept epoch moved codes or steps
    result = export_qdq(out, tmp_path / f"{label}.onnx")  # raises unless ORT agrees with the reference
    assert result.agreement >= 0.99
    if label == "block_scales":
        assert result.storage["fc1"] == "nbits" and result.storage["fc2"] == "nbits"


def test_requantize_keeps_the_kinds_channel_axis_and_blocks(case):
    label, cm, _, name, kind = case
    _, weights, _ = build_student(cm.reference, cm.layers)
    layer = cm.layers[name]
    other = 8 if layer.bits != 8 else 4
    new = requantize(weights[name], layer, other, cm.config.weight_range, cm.config.export)
    assert new.codes.shape == layer.codes.shape and new.bits == other
    assert new.scale.shape[0] == layer.scale.shape[0]  # one scale (row) per output channel
    assert int(new.codes.abs().max()) <= new.qmax
    # 8 bits: one scale per output channel (on the kind's axis), no blocks; every weight inside
    # its channel's (clipped) range comes back within half a step
    assert new.block_size is None and new.scale.dim() == 1
    w = weights[name].trained_weight()
    shape = [1] * w.dim()
    shape[1 if kind == "conv_transpose" else 0] = -1
    s = new.scale.abs().reshape(shape)
    inside = w.abs() <= new.qmax * s
    assert float(inside.float().mean()) > 0.9
    assert bool(((new.dequantized() - w).abs() <= s / 2 + 1e-6)[inside].all())


def test_conv_transpose_sensitivity_uses_the_exported_per_output_channel_grid():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
    with torch.no_grad():  # output channels of very different ranges: the grid's axis matters
        up.weight.mul_(torch.tensor([0.1, 1.0, 5.0, 0.5]).reshape(1, -1, 1, 1))
    w = up.weight.detach()
    got = rtn_weight(w, 4, kind="conv_transpose")
    # the exported grid: per output channel (axis 1), round to nearest after the clipping search
    rows = w.transpose(0, 1).reshape(4, -1)
    grid = choose_weight_grid(rows, 4)
    want = (quantize(rows, grid.scale, grid.qmax) * grid.scale.reshape(-1, 1)).reshape(4, 6, 3, 3).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    # per output channel: each channel takes at most 2·7+1 levels of its own step
    for c in range(4):
        levels = torch.unique(got[:, c] / grid.scale[c])
        assert torch.allclose(levels, torch.round(levels), atol=1e-4) and levels.abs().max() <= 7
    # the per-input-channel grid (the old behaviour) is a different, worse weight
    old = rtn_weight(w, 4)
    assert not torch.allclose(old, got)
    assert float((got - w).pow(2).sum()) < float((old - w).pow(2).sum())


class _ExpandedGrid(nn.Module):
    """A constant grid built as YOLO decodes build theirs: ``arange(G).view(...).expand(...)``, which
    the traced student holds as an expanded view (``_tensor_constant0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        grid = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1).expand(1, 1, 8, 8)
        return self.fc((self.conv(x) * grid).flatten(1))


def test_finetune_restores_its_best_epoch_into_a_student_holding_an_expanded_constant():
    """Restoring the best checkpoint copied every state entry back, the expanded grid included, which
    torch refuses ("more than one element of the written-to tensor refers to a single memory location"):
    an exit-3 crash after the whole fine-tuning had run (survey 55)."""
    torch.manual_seed(0)
    model = _ExpandedGrid().eval()
    x = np.random.default_rng(0).standard_normal((128, 1, 8, 8)).astype(np.float32)
    y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = GroupData(x, y, np.arange(128) % 2, ("a", "b"), "grid")
    cm = compress(model, data, QuantConfig(weight_bits=3, num_calib=64), progress=False)
    constant = cm.reference.get_buffer("_tensor_constant0")
    assert constant.stride() != constant.contiguous().stride()  # the expanded view the crash needed
    out = finetune(cm, data, FinetuneConfig(epochs=2, batch_size=32, lr=1e-2, holdout_fraction=0.25), progress=False)
    record = out.metadata.finetune
    assert len(record["history"]) == 3 and record["best_epoch"] in (0, 1, 2)
    np.testing.assert_allclose(out.predict(x[:16]), out.reference(torch.from_numpy(x[:16])).detach().numpy(), atol=1e-5)
