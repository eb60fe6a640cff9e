"""The model zoo users bring, end to end on small hand-written blocks: compress → export → the
optimized ONNX Runtime session, per group. A MobileNet-V2 inverted residual (depthwise conv +
folded BN, ReLU6), DeiT-style blocks (LayerNorm, ``F.scaled_dot_product_attention`` /
``nn.MultiheadAttention``, a batch-1 position embedding), a LayerNorm MLP and an
``nn.TransformerEncoder`` text model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fixtures_models as fm
from fqexport.calibration.checks import validate_group_data
from fqexport.config import QuantConfig
from fqexport.errors import DataError, UnsupportedLayerError
from fqexport.graph.prepare import READ_DIRECTLY
from fqexport.exporters.export_check import kernel_judges
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.metadata import ExportMetadata
from fqexport.pipeline.compress import compress
from fqexport.search.sensitivity import measure_sensitivity
from fqexport.validation.gate import validate


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN,
    residual add."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class MobileNetV2Block(nn.Module):
    def __init__(self, width: int = 16, classes: int = fm.NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.block1 = InvertedResidual(width)
        self.block2 = InvertedResidual(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SDPAAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class MHAAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class DeiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SDPAAttention(dim, heads) if attention == "sdpa" else MHAAttention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """4x4 patches of a 16x16 image → 16 tokens + a batch-1 position embedding → 2 blocks."""

    def __init__(self, attention: str = "sdpa", dim: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, 16, dim))
        self.blocks = nn.Sequential(*[DeiTBlock(dim, heads, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, fm.NUM_CLASSES)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos_embedding
        return self.head(self.norm(self.blocks(x)).mean(1))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2, self.fc3 = nn.Linear(64, 128), nn.LayerNorm(128), nn.Linear(128, 128), nn.Linear(128, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(F.gelu(self.norm(self.fc1(x))))))


class TextTransformer(nn.Module):
    """The 64 tabular features as a sequence of 8 tokens of 8 → a sequence-first
    nn.TransformerEncoder (``batch_first=False``, the torch default)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, fm.NUM_CLASSES)

    def forward(self, x):
        tokens = self.embed(x.unflatten(1, (8, 8))).transpose(0, 1)  # [T, B, D]
        return self.head(self.encoder(tokens).mean(0))


def _optimized_session(path) -> tuple[ort.InferenceSession, list[str]]:
    """The optimized CPU session of ``path`` and the op types of its optimized graph."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(path) + ".opt.onnx"
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess, [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _run(model, data, tmp_path, **kw):
    """Compress, export (the export checks agreement >= 99%), run ORT per group."""
    cm = compress(model, data, QuantConfig(num_calib=256, **kw), progress=False)
    result = export_qdq(cm, tmp_path / "model.onnx")
    sess, ops = _optimized_session(result.path)
    got = sess.run(None, {sess.get_inputs()[0].name: data.x})[0]
    want = cm.predict(data.x)
    per_group = {
        g: float((got[data.group == g].argmax(1) == want[data.group == g].argmax(1)).mean())
        for g in range(data.num_groups)
    }
    return cm, result, ops, per_group


@pytest.fixture(scope="module")
def image_data():
    return fm.image_task(n=320)


@pytest.fixture(scope="module")
def tabular_data():
    return fm.tabular_task(n=320)


@pytest.fixture(scope="module")
def mobilenet(image_data):
    return fm.train(MobileNetV2Block(), image_data, epochs=6, lr=0.01)


@pytest.mark.parametrize("bits", [8, 4])
def test_mobilenet_v2_inverted_residual_matches_optimized_ort(mobilenet, image_data, tmp_path, bits):
    cm, result, ops, per_group = _run(mobilenet, image_data, tmp_path, weight_bits=bits)
    assert result.agreement >= 0.99
    assert min(per_group.values()) >= 0.99
    # every conv is a fused integer kernel (4-bit codes packed INT4 behind a Cast to int8)
    assert ops.count("QLinearConv") == 7 and "Conv" not in ops
    assert set(result.storage.values()) == ({"int8"} if bits == 8 else {"int4", "nbits"})
    assert cm.metadata.quantized_fraction == 1.0 and cm.metadata.float_layers == ()


@pytest.mark.slow  # trains a 2-block ViT, compresses and exports it: ~15 s each
@pytest.mark.parametrize("attention", ["sdpa", "mha"])
def test_deit_block_quantizes_every_linear_and_matches_ort(image_data, tmp_path, attention):
    torch.manual_seed(0)
    vit = fm.train(TinyViT(attention), image_data, epochs=4, lr=0.003)
    cm, result, ops, per_group = _run(vit, image_data, tmp_path)
    linears = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear)]
    if attention == "mha":  # q/k/v projections of nn.MultiheadAttention become Linear layers
        linears = [n for n in linears if not n.endswith("out_proj")]
        linears += [f"blocks.{i}.attn.attn.{p}_proj" for i in range(2) for p in ("q", "k", "v", "out")]
    assert set(cm.layers) == {"patch", *linears}
    # the position table ships as float32: counted, not refused
    assert [(r.name, r.reason) for r in cm.metadata.float_layers] == [("pos_embedding", READ_DIRECTLY)]
    assert 0.95 < cm.quantized_fraction < 1.0
    assert result.agreement >= 0.99 and min(per_group.values()) >= 0.99
    # the position embedding add is not a residual add: no pair on the batch-1 parameter
    assert not any("pos_embedding" in str(n.args) for n in cm.reference.graph.nodes if n.op == "call_module"
                   and n.target.startswith("act_quant"))
    assert ops.count("QLinearConv") == 1 and ops.count("LayerNormalization") == 5


def test_layernorm_mlp_end_to_end(tabular_data, tmp_path):
    torch.manual_seed(0)
    mlp = fm.train(LayerNormMLP(), tabular_data, epochs=6)
    cm, result, ops, per_group = _run(mlp, tabular_data, tmp_path)
    assert list(cm.layers) == ["fc1", "fc2", "fc3"] and cm.metadata.skipped_layers == ()
    assert result.agreement >= 0.99 and min(per_group.values()) >= 0.99
    assert "LayerNormalization" in ops


@pytest.mark.slow  # trains, compresses and exports twice: ~20 s
def test_transformer_encoder_linears_are_quantized_not_hidden(tabular_data, tmp_path):
    torch.manual_seed(0)
    text = fm.train(TextTransformer(), tabular_data, epochs=4, lr=0.003)
    cm, result, ops, per_group = _run(text, tabular_data, tmp_path, weight_bits=4)
    per_layer = [f"encoder.layers.{i}.{n}" for i in range(2)
                 for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2")]
    assert set(cm.layers) == {"embed", "head", *per_layer}
    assert cm.quantized_fraction == 1.0 and cm.avg_weight_bits == 4.0
    assert result.agreement >= 0.99 and min(per_group.values()) >= 0.99
    # storage "auto": Linears over tokens (and the embedding) INT4 behind a Cast, so they run the
    # int8 kernel; the head (one vector per sample) is MatMulNBits; "packed" (size first): every
    # 4-bit Linear is MatMulNBits
    assert result.storage == {n: "nbits" if n == "head" else "int4" for n in cm.layers}
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMulIntegerToFloat") == len(cm.layers) - 1
    packed = export_qdq(compress(text, tabular_data, QuantConfig(num_calib=256, weight_bits=4, storage="packed"),
                                 progress=False), tmp_path / "packed.onnx")
    assert set(packed.storage.values()) == {"nbits"} and packed.agreement >= 0.99
    assert _optimized_session(packed.path)[1].count("MatMulNBits") == len(cm.layers)
    assert packed.size_bytes < result.size_bytes


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.rnn = nn.GRU(16, 64, batch_first=True)
        self.fc2 = nn.Linear(64, fm.NUM_CLASSES)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.fc1(x.unflatten(1, (8, 8)))))
        return self.fc2(out[:, -1])


def test_float_layers_are_warned_recorded_and_counted_at_32_bits(tabular_data, tmp_path, caplog):
    torch.manual_seed(0)
    net = WithLSTM().eval()
    with caplog.at_level("WARNING", logger="fqexport.graph.prepare"):
        cm = compress(net, tabular_data, QuantConfig(num_calib=64, method="rtn"), progress=False)
    gru = 3 * 64 * 16 + 3 * 64 * 64  # weight_ih + weight_hh
    assert f"'rnn' (GRU, {gru} params)" in caplog.text
    quantized = 8 * 16 + 64 * 4
    assert [(r.name, r.kind, r.bits, r.params) for r in cm.metadata.float_layers] == [("rnn", "GRU", 32, gru)]
    assert cm.quantized_fraction == pytest.approx(quantized / (quantized + gru))
    assert cm.avg_weight_bits == pytest.approx((8 * quantized + 32 * gru) / (quantized + gru))
    assert cm.metadata.avg_weight_bits == pytest.approx(cm.avg_weight_bits, abs=1e-4)
    assert ExportMetadata.from_json(cm.metadata.to_json()).float_layers == cm.metadata.float_layers
    steps_macs = 8 * 3 * 64 * (16 + 64)  # 8 steps · 3 gates · H · (input + state)
    assert cm.layer_table()[-1] == {"name": "rnn", "kind": "GRU", "module": "GRU", "bits": 32, "params": gru, "macs": steps_macs,
                                    "storage": "float32", "reason": "unsupported"}
    # a file written before these fields reads as "nothing recorded"
    old = {k: v for k, v in cm.metadata.to_dict().items() if k not in ("float_layers", "quantized_fraction")}
    assert ExportMetadata.from_dict(old).float_layers == () and ExportMetadata.from_dict(old).quantized_fraction is None
    with pytest.raises(UnsupportedLayerError, match=r"1 layer\(s\) cannot be quantized and strict=True .*'rnn' \(GRU"):
        compress(net, tabular_data, QuantConfig(num_calib=64, strict=True), progress=False)


class WithPositionTable(nn.Module):
    """Tokens + a position table and a class token as bare Parameters (ViT style), a layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.pos = nn.Parameter(torch.randn(1, 8, 16) * 0.1)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.gamma = nn.Parameter(torch.ones(16))  # 1-D: a scale, not a table
        self.head = nn.Linear(16, fm.NUM_CLASSES)

    def forward(self, x):
        h = self.embed(x.unflatten(1, (8, 8))) + self.pos
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], 1) * self.gamma
        return self.head(h.mean(1))


def test_a_parameter_table_read_directly_is_counted_at_32_bits_but_not_refused(tabular_data, tmp_path):
    torch.manual_seed(0)
    net = WithPositionTable().eval()
    cm = compress(net, tabular_data, QuantConfig(num_calib=64, method="rtn", strict=True), progress=False)
    assert [(r.name, r.kind, r.params, r.reason) for r in cm.metadata.float_layers] == [
        ("pos", "Parameter (1, 8, 16)", 128, READ_DIRECTLY), ("cls", "Parameter (1, 1, 16)", 16, READ_DIRECTLY)]
    quantized, tables = 8 * 16 + 16 * fm.NUM_CLASSES, 128 + 16
    assert cm.quantized_fraction == pytest.approx(quantized / (quantized + tables))
    assert cm.avg_weight_bits == pytest.approx((8 * quantized + 32 * tables) / (quantized + tables))
    # the file holds them as float32 initializers of those sizes
    export_qdq(cm, tmp_path / "m.onnx")
    sizes = sorted(int(np.prod(t.dims)) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 3)
    assert sizes == [16, 128]


class ECGNet(nn.Module):
    """A 1-D CNN over a 1-channel signal of 64 samples: (Conv1d + BN + ReLU) x3, global average
    pool, Linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers, c = [], 1
        for i, (k, s) in enumerate([(7, 1), (5, 2), (3, 2)]):
            layers += [nn.Conv1d(c, width, k, stride=s, padding=k // 2, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, fm.NUM_CLASSES)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


@pytest.fixture(scope="module")
def signal_data(tabular_data):
    """The tabular task's 64 features as a 1-channel signal ``[N, 1, 64]``."""
    d = tabular_data
    return type(d)(d.x.reshape(len(d), 1, -1), d.y, d.group, d.group_names, "signal-task")


@pytest.mark.parametrize("bits", [8, 4])
def test_conv1d_net_goes_through_the_solver_and_fuses_qlinearconv(signal_data, tmp_path, bits):
    torch.manual_seed(0)
    net = fm.train(ECGNet(), signal_data, epochs=6)
    cm, result, ops, per_group = _run(net, signal_data, tmp_path, weight_bits=bits)
    convs = [f"features.{i}" for i in (0, 3, 6)]
    assert list(cm.layers) == [*convs, "head"] and cm.quantized_fraction == 1.0
    assert cm.metadata.float_layers == () and cm.metadata.skipped_layers == ()
    # BN folded into every Conv1d; the codes keep the weight's [out, in, k] shape, on the grid
    assert all(cm.layers[n].codes.shape == net.get_submodule(n).weight.shape for n in convs)
    assert all(int(cm.layers[n].codes.abs().max()) <= cm.layers[n].qmax for n in convs)
    assert "BatchNormalization" not in ops
    assert result.agreement >= 0.99 and min(per_group.values()) >= 0.99
    # ORT fuses the 1-D convs into QLinearConv like 2-D ones
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops


VOCAB, SEQ = 50, 12


class TextClassifier(nn.Module):
    """Token ids ``[B, T]`` int64 → Embedding → mean over tokens → Linear → ReLU → Linear."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, fm.NUM_CLASSES)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.embed(ids).mean(1))))


def _token_data(n: int = 320, seed: int = 0):
    """Label = which quarter of the vocabulary most tokens come from; the minority (30%) draws
    from the upper half of each quarter only."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, fm.NUM_CLASSES, n)
    group = (rng.random(n) < 0.3).astype(np.int64)
    q = VOCAB // fm.NUM_CLASSES
    lo = y[:, None] * q + np.where(group[:, None] == 1, q // 2, 0)
    ids = lo + rng.integers(0, q // 2, (n, SEQ))
    noise = rng.random((n, SEQ)) < 0.3
    ids = np.where(noise, rng.integers(0, VOCAB, (n, SEQ)), ids).astype(np.int64)
    return validate_group_data(ids, y, group, ["a", "b"], "token-task")


def test_embedding_rows_are_quantized_and_token_ids_stay_int64(tmp_path, monkeypatch):
    data = _token_data()
    assert data.x.dtype == np.int64  # the reader keeps integer ids, never casts them to float
    torch.manual_seed(0)
    net = fm.train(TextClassifier(), data, epochs=8)
    cm, result, ops, per_group = _run(net, data, tmp_path)
    assert list(cm.layers) == ["embed", "fc", "head"] and cm.quantized_fraction == 1.0
    emb = cm.layers["embed"]
    assert emb.kind == "embedding" and emb.scale.shape == (VOCAB,) and emb.codes.shape == (VOCAB, 32)
    # per-row round to nearest: each row's largest |code| is the grid's qmax
    assert bool((emb.codes.abs().amax(1) == emb.qmax).all())
    assert result.agreement >= 0.99 and min(per_group.values()) >= 0.99
    model = onnx.load(result.path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "embed.weight"]
    assert len(dq) == 1 and [a.i for a in dq[0].attribute if a.name == "axis"] == [0]
    assert "Gather" in ops
    sess = _optimized_session(result.path)[0]
    got = sess.run(None, {sess.get_inputs()[0].name: data.x})[0]
    # validate feeds the int64 ids as they are (a float feed would be refused by ORT)
    report = validate(result.path, data, measure_latency=False)
    assert report.metrics.group_min("accuracy")[1] == pytest.approx(
        min(float((got.argmax(1) == data.y)[data.group == g].mean()) for g in range(2)))
    # BOPs count the Linears (the lookup has no MACs, and no longer hides the figure)
    assert report.bops == pytest.approx(8 * 8 * (cm.layers["fc"].macs + cm.layers["head"].macs))
    # an id past the table: a data error naming the Embedding, not ONNX Runtime's Gather error
    bad = validate_group_data(np.where(np.arange(data.x.size).reshape(data.x.shape) == 5, VOCAB + 3, data.x),
                              data.y, data.group, ["a", "b"], "oov.npz")
    with pytest.raises(DataError, match=rf"oov.npz: field 'x' holds the token id {VOCAB + 3} outside the vocabulary "
                                        rf"\[0, {VOCAB}\) of the model's Embedding 'embed'"):
        validate(result.path, bad, measure_latency=False)
    # the same test data as an .npz path (read as a stream, chunk by chunk: survey 73 got ORT's raw
    # Gather error there), the bad id in the last sample past the first chunk
    import fqexport.validation.data_checks as data_checks

    x = data.x.copy()
    x[-1, -1] = VOCAB + 3
    np.savez(tmp_path / "oov.npz", x=x, y=data.y, group=data.group)
    monkeypatch.setattr(data_checks, "_ID_CHUNK", 16)
    with pytest.raises(DataError, match=rf"oov.npz: field 'x' holds the token id {VOCAB + 3} outside the vocabulary "
                                        rf"\[0, {VOCAB}\) of the model's Embedding 'embed'"):
        validate(result.path, str(tmp_path / "oov.npz"), measure_latency=False)
    # float ids: whole numbers are fed as the ids they are; a fractional one would be truncated
    whole = validate_group_data(data.x.astype(np.float32), data.y, data.group, ["a", "b"], "whole.npz")
    assert validate(result.path, whole, measure_latency=False).metrics.by_group == report.metrics.by_group
    frac = validate_group_data(data.x + np.where(np.arange(data.x.size).reshape(data.x.shape) == 7, 0.6, 0.0),
                               data.y, data.group, ["a", "b"], "frac.npz")
    with pytest.raises(DataError, match=r"frac.npz: field 'x' holds the non-integer value \d+\.6 \(float32\), but "
                                        r".* takes tensor\(int64\): token ids, which ONNX Runtime would get truncated"):
        validate(result.path, frac, measure_latency=False)


def test_token_ids_are_range_checked(tmp_path):
    data = _token_data(n=64)
    with pytest.raises(DataError, match=r"field 'x' holds signed integers, read as token ids .* negative id -3"):
        validate_group_data(np.full((4, SEQ), -3), np.zeros(4), np.zeros(4), None, "ids.npz")
    small = TextClassifier()
    small.embed = nn.Embedding(10, 32)
    with pytest.raises(DataError, match=r"token-task: field 'x' holds the token id 4\d outside the vocabulary "
                                        r"\[0, 10\) of the model's Embedding 'embed'"):
        compress(small, data, QuantConfig(num_calib=64, method="rtn"), progress=False)
    floats = validate_group_data(data.x.astype(np.float32), data.y, data.group, ["a", "b"], "float-ids.npz")
    with pytest.raises(DataError, match=r"float-ids.npz: field 'x' holds float32 values, but the model input is read "
                                        r"by the Embedding 'embed' \(token ids\): store the ids as integers"):
        compress(TextClassifier(), floats, QuantConfig(num_calib=64, method="rtn"), progress=False)


class Categorical(nn.Module):
    """The categorical-embedding MLP: two code columns of x looked up, beside the numeric ones."""

    def __init__(self) -> None:
        super().__init__()
        self.e0, self.e1 = nn.Embedding(5, 4), nn.Embedding(7, 4)
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        codes = x[:, :2].long()
        return self.fc(torch.cat([self.e0(codes[:, 0]), self.e1(codes[:, 1]), x[:, 2:]], 1))


def test_an_id_the_model_computes_is_range_checked_on_the_calibration_samples(tmp_path):
    """Not an internal IndexError: a data error naming the Embedding, the id and the sample (its index in
    the user's data), from compress, the search's sensitivity and validate alike."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 5, (64, 1)), rng.integers(0, 7, (64, 1)), rng.normal(size=(64, 2))], 1)
    x[40, 0] = 7  # a category the table has not seen
    data = validate_group_data(x.astype(np.float32), rng.integers(0, 2, 64), np.arange(64) % 2, ["a", "b"], "tab.npz")
    want = (r"tab.npz: the model's Embedding 'e0' \(num_embeddings=5\) looks up the id 7, which the model computes "
            r"from field 'x' of sample 40: outside \[0, 5\); check the categorical codes in x or the model")
    with pytest.raises(DataError, match=want):
        compress(Categorical(), data, QuantConfig(num_calib=64, method="rtn"), progress=False)
    with pytest.raises(DataError, match=want):
        measure_sensitivity(Categorical(), data, bit_choices=(4,), cache=False)
    x[40, 0] = 4
    ok = validate_group_data(x.astype(np.float32), data.y, data.group, ["a", "b"], "tab.npz")
    cm = compress(Categorical(), ok, QuantConfig(num_calib=64, method="rtn"), progress=False)
    assert set(cm.layers) == {"e0", "e1", "fc"}
    # the file: ONNX Runtime's Gather reads -1 as the last row of the (int8) table; validate refuses it
    path = export_qdq(cm, tmp_path / "tab.onnx").path
    assert validate(path, ok, measure_latency=False).metrics.by_group
    x[9, 1] = -1  # an unseen category coded -1
    unseen = validate_group_data(x.astype(np.float32), data.y, data.group, ["a", "b"], "test.npz")
    with pytest.raises(DataError, match=r"test.npz: the model's Embedding 'e1' \(num_embeddings=7\) looks up the id -1, "
                                        r"which the model computes from field 'x' of sample 9: outside \[0, 7\)"):
        validate(path, unseen, measure_latency=False)


class UNetClassifier(nn.Module):
    """UNet-style: Conv2d down (stride 2) + BN, a ConvTranspose2d up (stride 2, padding 1,
    output_padding 1) + BN back to 16x16, skip concat with the encoder's full-resolution map, a
    Conv head, a Linear classifier head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.up_bn = nn.BatchNorm2d(width)
        self.fuse = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, fm.NUM_CLASSES)

    def forward(self, x):
        skip = self.stem(x)
        up = torch.relu(self.up_bn(self.up(self.down(skip))))
        y = self.fuse(torch.cat([up, skip], dim=1))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.fixture(scope="module")
def unet(image_data):
    torch.manual_seed(0)
    return fm.train(UNetClassifier(), image_data, epochs=5, lr=0.01)


@pytest.mark.parametrize("bits", [8, 4])
def test_unet_conv_transpose2d_is_quantized_per_output_channel_and_matches_optimized_ort(unet, image_data, tmp_path, bits):
    cm, result, ops, per_group = _run(unet, image_data, tmp_path, weight_bits=bits)
    up = cm.layers["up"]
    assert list(cm.layers) == ["stem.0", "down.0", "up", "fuse.0", "head"]
    assert cm.metadata.float_layers == () and up.kind == "conv_transpose"
    # BN folded into the ConvTranspose; codes in the weight's layout [C_in, C_out, kh, kw],
    # one scale per output channel (axis 1), every code on the grid
    assert up.codes.shape == (16, 8, 3, 3) and up.scale.shape == (8,)
    assert int(up.codes.abs().max()) <= up.qmax == (63 if bits == 8 else 7)
    assert torch.equal(up.codes.float(), torch.round(up.codes.float()))
    assert torch.allclose(up.dequantized(), up.codes.float() * up.scale.reshape(1, -1, 1, 1))
    assert torch.equal(dict(cm.reference.named_modules())["up"].weight.detach(), up.dequantized())
    assert up.macs == 16 * 8 * 8 * 8 * 3 * 3  # each 8x8 input pixel meets C_out·kh·kw weights
    model = onnx.load(result.path)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "up.weight"]
    # axis 1 (ONNX's default for DequantizeLinear, so the attribute may be left out)
    assert len(dq) == 1 and ([a.i for a in dq[0].attribute if a.name == "axis"] or [1]) == [1]
    # 8 bits: int8 codes; 4 bits: INT4 codes behind a Cast to int8
    cast_from = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    codes = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}[
        cast_from.get(dq[0].input[0], dq[0].input[0])]
    assert (dq[0].input[0] in cast_from) == (bits == 4)
    assert np.array_equal(codes.astype(np.int8), up.codes.numpy())
    assert result.agreement >= 0.99 and min(per_group.values()) >= 0.99
    # ORT 1.32 CPU fuses no QLinearConvTranspose: a float ConvTranspose between the pairs
    assert "ConvTranspose" in ops and ops.count("QLinearConv") == 3
    # the x86-avx2 emulation runs the float ConvTranspose natively and the QLinearConvs emulated
    # (|q| <= 63 cannot saturate): same decisions as the optimized session
    report = validate(result.path, image_data, measure_latency=False, targets=("native", "x86-avx2"))
    assert report.passed and report.target_agreement["x86-avx2"] >= 0.99


def test_unet_conv_transpose2d_packs_to_int2_and_int4_with_channel_scales_on_axis_1(unet, image_data, tmp_path):
    cm = compress(unet, image_data, QuantConfig(num_calib=256, weight_bits=2, layer_bits={"up": 2, "fuse.0": 3},
                                                storage="packed"), progress=False)
    up = cm.layers["up"]
    assert int(up.codes.min()) >= -2 and int(up.codes.max()) <= 1
    result = export_qdq(cm, tmp_path / "packed.onnx")
    assert result.storage["up"] == "int2" and result.storage["fuse.0"] == "int4"
    assert result.agreement >= 0.99
    model = onnx.load(result.path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    # INT2: DequantizeLinear(Cast(q → int8), s, axis=1) with the signed per-output-channel scale
    assert inits["up.weight_scale"].shape == (8,)
    np.testing.assert_allclose(inits["up.weight_quantized"].astype(np.float32) * inits["up.weight_scale"].reshape(1, 8, 1, 1),
                               up.dequantized().numpy(), rtol=1e-6)
    sess, ops = _optimized_session(result.path)
    got = sess.run(None, {sess.get_inputs()[0].name: image_data.x})[0]
    assert float((got.argmax(1) == cm.predict(image_data.x).argmax(1)).mean()) >= 0.99
    assert "ConvTranspose" in ops


class MaskableAttentionMLP(nn.Module):
    """timm's ViT style: ``forward(x, attn_mask=None, is_causal=False)``, an ``if`` on the mask,
    the mask handed to SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, fm.NUM_CLASSES)

    def forward(self, x, attn_mask=None, is_causal=False):
        h = torch.relu(self.fc1(x)).reshape(x.shape[0], 2, 4, 4)  # [B, heads, tokens, dim]
        if attn_mask is not None:
            h = h * 2.0
        h = F.scaled_dot_product_attention(h, h, h, attn_mask=attn_mask, is_causal=is_causal)
        return self.fc2(h.reshape(x.shape[0], 32))


def test_a_forward_with_defaulted_extra_arguments_runs_at_their_defaults(tabular_data, tmp_path):
    """fqexport feeds one input: the other parameters are traced at their defaults (the mask
    branch not taken), compress / export / ORT agree; a required second input is named."""
    torch.manual_seed(0)
    model = fm.train(MaskableAttentionMLP(), tabular_data, epochs=3)
    cm, result, ops, per_group = _run(model, tabular_data, tmp_path)
    assert set(cm.layers) == {"fc1", "fc2"} and result.agreement >= 0.99 and min(per_group.values()) >= 0.99
    np.testing.assert_allclose(cm.predict(tabular_data.x[:16], quantized=False),
                               model(torch.from_numpy(tabular_data.x[:16])).detach().numpy(), rtol=1e-5, atol=1e-5)

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 4)

        def forward(self, x, mask):
            return self.fc(x * mask)

    from fqexport.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"forward takes required inputs beyond 'x': mask; fqexport feeds one") as err:
        compress(TwoInputs(), tabular_data, QuantConfig(num_calib=64), progress=False)
    assert "cannot trace" not in str(err.value) and "torch.export" not in str(err.value)  # not the trace's advice


def test_a_failed_torch_onnx_export_names_its_root_cause():
    """torch.onnx's error chain in one line: the innermost cause and the node it failed on."""
    from exporters.torch_export import _root_cause

    try:
        try:
            raise AssertionError("only 4D query, key, and value are supported\nmore lines")
        except AssertionError as inner:
            raise RuntimeError("\x1b[1mError when translating node %scaled_dot_product_attention (aten op).") from inner
    except RuntimeError as err:
        assert _root_cause(err) == ("AssertionError: only 4D query, key, and value are supported "
                                    "(at node %scaled_dot_product_attention)")


class Attention(nn.Module):
    """Attention on 3-D ``[B, L, E]`` or, windowed (Twins, NesT), 5-D ``[B, G, H, L, E]`` inputs, with an
    optional additive mask: torch.onnx exports 4-D attention only."""

    def __init__(self, rank: int, masked: bool = False, iterates: bool = False) -> None:
        super().__init__()
        self.rank, self.masked, self.iterates = rank, masked, iterates
        self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):  # x [B, 4, 6, 8]: 4 windows of 6 tokens
        if self.iterates:  # fx cannot trace this: torch.export's graph, with the aten attention op
            x = torch.stack(list(x.unbind(1)), 1)
        b, g, n, c = x.shape
        if self.rank == 3:
            q, k, v = self.qkv(x.reshape(b, g * n, c)).chunk(3, -1)
            mask = torch.linspace(-1.0, 0.0, g * n)  # [S], broadcast over queries
        else:
            q, k, v = self.qkv(x).reshape(b, g, n, 3, 2, 4).permute(3, 0, 1, 4, 2, 5).unbind(0)
            mask = torch.linspace(-1.0, 0.0, n)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if self.masked else None)
        if self.rank == 5:
            a = a.transpose(2, 3).reshape(b, g, n, c)
        return self.head(a.reshape(b, -1, c).mean(1))


@pytest.mark.parametrize("rank,masked,iterates", [(3, False, False), (5, False, False), (5, True, False),
                                                   (5, False, True)])
def test_attention_on_other_than_4_dims_is_exported_as_its_4d_equivalent(rank, masked, iterates, tmp_path):
    from exporters.torch_export import attention_4d

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 4), torch.randn(3, 2, 2, 7, 4), torch.randn(3, 2, 2, 7, 4)
    mask = torch.randn(7)
    torch.testing.assert_close(attention_4d(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, mask))
    torch.testing.assert_close(attention_4d(q[0, 0], k[0, 0], v[0, 0]), F.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]))
    x = np.random.default_rng(0).normal(size=(64, 4, 6, 8)).astype(np.float32)
    model = Attention(rank, masked, iterates).eval()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    cm = compress(model, validate_group_data(x, y, np.arange(64) % 2, source="t.npz"), QuantConfig(num_calib=64),
                  progress=False)
    result = export_qdq(cm, tmp_path / "m.onnx")  # torch.onnx refused these: "only 4D query, key, and value"
    assert result.agreement >= 0.99
    assert any(n.op_type == "Softmax" or "Attention" in n.op_type for n in onnx.load(result.path).graph.node)


class WindowNet(nn.Module):
    """Swin / MobileViT style: 2x2 windows folded into the batch, a Linear on [B*4, tokens, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, fm.NUM_CLASSES)

    def forward(self, x):
        z = torch.relu(self.stem(x))
        b, c, h, w = z.shape
        win = z.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, (h // 2) * (w // 2), c)
        return self.head(torch.relu(self.mix(win)).reshape(b, -1, c).mean(1))


def test_a_linear_on_windows_folded_into_the_batch_is_quantized(image_data, tmp_path):
    """Its rows are 4 per sample: each window row counts toward its sample's group (the Hessian,
    bias correction), and compress / export / ORT agree."""
    from fqexport.quant.per_group import row_groups

    assert row_groups(torch.tensor([0, 1]), 6).tolist() == [0, 0, 0, 1, 1, 1]
    assert row_groups(torch.tensor([0, 1]), 2).tolist() == [0, 1]
    torch.manual_seed(0)
    model = fm.train(WindowNet(), image_data, epochs=3, lr=0.01)
    cm, result, ops, per_group = _run(model, image_data, tmp_path)
    assert set(cm.layers) == {"stem", "mix", "head"}
    assert result.agreement >= 0.99 and min(per_group.values()) >= 0.99


class FixedGridProjection(nn.Module):
    """XCiT's positional encoding: a conv on a fixed coordinate grid (batch 1, no input in it),
    repeated over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos_proj = nn.Conv2d(2, 8, 1)
        self.head = nn.Linear(8, fm.NUM_CLASSES)

    def forward(self, x):
        z = self.stem(x)
        b, _, h, w = z.shape
        ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 1, h, w)
        xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, h, w)
        pos = self.pos_proj(torch.cat([ys, xs], 1) / h)
        return self.head(torch.relu(z + pos.repeat(b, 1, 1, 1)).mean((2, 3)))


def test_a_layer_on_a_batch_independent_tensor_counts_for_every_sample(image_data, tmp_path):
    from fqexport.quant.per_group import per_sample

    assert per_sample(torch.ones(1, 3), 4).shape == (4, 3) and per_sample(torch.ones(2, 3), 4).shape == (2, 3)
    torch.manual_seed(0)
    model = fm.train(FixedGridProjection(), image_data, epochs=3, lr=0.01)
    cm, result, ops, per_group = _run(model, image_data, tmp_path)
    assert set(cm.layers) == {"stem", "pos_proj", "head"}
    assert result.agreement >= 0.99 and min(per_group.values()) >= 0.99


class _Bag(nn.Module):
    """A bag-of-ids text classifier: nn.EmbeddingBag (a Loop in ONNX), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 8, mode="mean")
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.bag(x))


@pytest.mark.isa
def test_an_embedding_bag_model_exports_and_its_ids_are_range_checked(tmp_path, caplog):
    """The export dropped the initializers its Loop body reads (onnx.checker refused the file), the AVX2
    emulation could not run the Loop, and an id beyond the bag's table was an exit-3 IndexError (survey 35).
    Which kernels the export check cannot emulate depends on this CPU's family: the ones it does not
    run natively (on an AVX2 CPU: x86-vnni/arm64; elsewhere: x86-avx2)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (96, 6))
    torch.manual_seed(0)
    model = _Bag().eval()
    y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = validate_group_data(x, y, np.arange(96) % 2, ["a", "b"], "bag.npz")
    cm = compress(model, data, QuantConfig(num_calib=96), progress=False)
    with caplog.at_level("WARNING"):
        res = export_qdq(cm, tmp_path / "bag.onnx")
    judges = kernel_judges(cm.metadata.target)
    emulated = [j for j in judges if not j.native]
    assert emulated  # with FQEXPORT_HOST_KERNELS set, every judge is an emulation and none judges the Loop
    assert res.agreement >= 0.99 if len(emulated) < len(judges) else res.agreement is None
    for judge in emulated:
        assert f"not judged under {judge.describe()}" in caplog.text
    got = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, cm.predict(x), atol=1e-4)
    x[7, 2] = 50
    bad = validate_group_data(x, y, np.arange(96) % 2, ["a", "b"], "bad.npz")
    with pytest.raises(DataError, match=r"the token id 50 outside the vocabulary \[0, 50\) of the model's Embedding 'bag'"):
        compress(model, bad, QuantConfig(num_calib=96), progress=False)


def test_an_int8_embedding_table_uses_the_full_grid_and_stores_no_zero_points(tmp_path):
    """It was held to x86-safe codes (±63: half the levels, for kernels a lookup never reaches) and kept
    an all-zero zero point per row the budget did not count (survey 35)."""
    data = _token_data(n=64)
    cm = compress(TextClassifier(), data, QuantConfig(num_calib=64), progress=False)
    assert int(cm.layers["embed"].codes.abs().max()) == 127
    graph = onnx.load(str(export_qdq(cm, tmp_path / "t.onnx").path)).graph
    (dq,) = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("embed.")]
    assert len(dq.input) == 2  # codes and scales: the all-zero zero point left out


def test_a_sparse_embedding_is_quantized_like_any(tmp_path):
    """``sparse=True`` only changes how the table's gradients are stored; it was kept float (survey 35)."""
    model = TextClassifier()
    model.embed.sparse = True
    data = _token_data(n=64)
    cm = compress(model, data, QuantConfig(weight_bits=4, num_calib=64), progress=False)
    assert not cm.metadata.float_layers and "embed" in cm.layers and cm.metadata.avg_weight_bits == 4.0
    graph = onnx.load(str(export_qdq(cm, tmp_path / "s.onnx").path)).graph
    assert any(n.op_type == "DequantizeLinear" and n.input[0].startswith("embed.") for n in graph.node)


class _NamedOut(nn.Module):
    """A classifier returning ``Out(logits, feat)``."""

    Out = __import__("collections").namedtuple("Out", ["logits", "feat"])

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        feat = torch.relu(self.conv(x)).mean((2, 3))
        return self.Out(logits=self.fc(feat), feat=feat)


class _Listed(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        y = self.body(x)
        return [y, y * 2]


def test_a_namedtuple_or_tuple_output_is_measured_exported_and_referenced_by_its_first(tmp_path, caplog):
    """A namedtuple output passed compress, then export crashed ('Out' has no .numpy, exit 3); a
    tuple model's export_float wrote both outputs, which validate then refused as a reference (survey 39)."""
    from fqexport.exporters.qdq_onnx import export_float

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = _NamedOut().eval()
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    y = model(torch.from_numpy(x)).logits.argmax(1).numpy()
    data = validate_group_data(x, y, np.arange(64) % 2, ["a", "b"], "n.npz")
    with caplog.at_level("WARNING"):
        cm = compress(model, data, QuantConfig(num_calib=64), progress=False)
    assert "the model returns a namedtuple Out of 2 outputs: fqexport measures, compresses and exports the first" in caplog.text
    path = export_qdq(cm, tmp_path / "n.onnx").path
    export_float(model, torch.from_numpy(x[:2]), tmp_path / "float.onnx")
    listed = nn.Sequential(model.conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.fc).eval()
    caplog.clear()
    with caplog.at_level("WARNING"):
        compress(_Listed(listed), data, QuantConfig(num_calib=64), progress=False)
    assert "the model returns a list of 2 outputs" in caplog.text  # fx's immutable_list, as the user wrote it
    assert len(onnx.load(str(tmp_path / "float.onnx")).graph.output) == 1
    report = validate(path, data, reference=tmp_path / "float.onnx", measure_latency=False)
    assert report.agreement is not None and report.agreement >= 0.95


class _MaxNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cat = nn.Embedding(10, 3, max_norm=1.0)
        self.fc = nn.Linear(3 + 2, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.cat(x[:, 0].long()), x[:, 1:]], 1))


def test_validate_range_checks_the_ids_of_a_max_norm_embedding(tmp_path):
    """Its lookup reads the renormalised table (a ScatterND output), not an initializer: -1 passed (survey 35)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 10, (64, 1)), rng.normal(size=(64, 2))], 1).astype(np.float32)
    data = validate_group_data(x, rng.integers(0, 2, 64), np.arange(64) % 2, ["a", "b"], "tab.npz")
    cm = compress(_MaxNorm().eval(), data, QuantConfig(num_calib=64), progress=False)
    path = export_qdq(cm, tmp_path / "mn.onnx").path
    x[4, 0] = -1
    bad = validate_group_data(x, data.y, data.group, ["a", "b"], "t.npz")
    with pytest.raises(DataError, match=r"looks up the id -1, which the model computes from field 'x' of sample 4"):
        validate(path, bad, measure_latency=False)


class _CausalText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, ids):
        t = ids.shape[1]
        return self.head(self.enc(self.tok(ids), mask=torch.triu(torch.full((t, t), float("-inf")), 1))[:, -1])


def test_export_float_writes_an_encoder_with_a_mask_through_the_attention_stand_ins(tmp_path):
    """torch's encoder checks its mask's values, which torch.onnx cannot trace: export_float of the
    user's model failed where compress and --float-out (the stand-ins) worked (survey 43)."""
    from fqexport.exporters.qdq_onnx import export_float

    torch.manual_seed(0)
    model = _CausalText().eval()
    ids = torch.randint(1, 50, (8, 12))
    export_float(model, ids[:2], tmp_path / "f.onnx")
    got = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"input": ids.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(ids).numpy(), atol=1e-4)
    assert isinstance(model.enc, nn.TransformerEncoder)  # the user's model is left as it was
