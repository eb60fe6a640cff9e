"""Tiny models and a tiny 2-group task shared by the core tests (importable as a factory spec:
``fixtures_models:tiny_cnn``, ``fixtures_models:tiny_mlp`` when the tests folder is on sys.path
or the working directory).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fqexport.calibration.group_data import GroupData
from fqexport.demo.detectors import STRIDES, UNet, YoloV5, YoloV8

IMAGE_SHAPE = (3, 16, 16)
NUM_CLASSES = 4
MLP_FEATURES = 64


class TinyCNN(nn.Module):
    """Conv+BN+ReLU stem, a residual block, a depthwise conv, a 1x1 conv, avg pool, Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width, bias=False)
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        y = self.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y))
        x = self.relu(x + y)
        x = self.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(self.pw(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class TinyMLP(nn.Module):
    def __init__(self, in_features: int = MLP_FEATURES, hidden: int = 256, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_cnn(num_classes: int = NUM_CLASSES) -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(num_classes)


def tiny_mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def failing_factory() -> nn.Module:
    raise RuntimeError("boom from the factory")


def not_a_module() -> int:
    return 3


def image_task(n: int = 400, minority: float = 0.25, seed: int = 0) -> GroupData:
    """Label = the quadrant holding a bright blob; the minority has inverted, brighter images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    group = (rng.random(n) < minority).astype(np.int64)
    x = 0.3 * rng.standard_normal((n, *IMAGE_SHAPE)).astype(np.float32)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        r0, c0 = 8 * r + rng.integers(1, 4), 8 * c + rng.integers(1, 4)
        x[i, :, r0:r0 + 4, c0:c0 + 4] += 1.5
    x[group == 1] = 1.0 - 2.0 * x[group == 1]  # inverted contrast, larger values
    return GroupData(x.astype(np.float32), y.astype(np.int64), group, ("majority", "minority"), "image-task")


def tabular_task(n: int = 400, seed: int = 1) -> GroupData:
    """Labels from a fixed random linear teacher; the minority is shifted and scaled."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(123).standard_normal((MLP_FEATURES, NUM_CLASSES))
    group = (rng.random(n) < 0.3).astype(np.int64)
    x = rng.standard_normal((n, MLP_FEATURES)).astype(np.float32)
    x[group == 1] = 2.0 * x[group == 1] + 0.5
    y = (x @ teacher).argmax(1)
    return GroupData(x.astype(np.float32), y.astype(np.int64), group, ("a", "b"), "tabular-task")


def train(model: nn.Module, data: GroupData, epochs: int = 15, lr: float = 0.01, seed: int = 0) -> nn.Module:
    """A few Adam epochs; returns the model in eval mode."""
    torch.manual_seed(seed)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 50):
            idx = perm[start:start + 50]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, data: GroupData) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(data.x)).argmax(1).numpy()
    return float((pred == data.y).mean())


def saturating_qdq_gemm(path) -> GroupData:
    """A 2-class QDQ Gemm (K=4) whose minority is right with exact int32 sums, wrong on AVX2.

    Input quantized on [0, 1] (zero point 0), output on [0, 10]. Class 0 has weights +127
    (full 8-bit range), class 1 zero weights and bias 3.0. The minority's inputs are 1.0
    (uint8 255): class 0 scores 4.0 with exact sums, but AVX2's vpmaddubsw saturates each pair
    (2·255·127 = 64770 -> 32767) to 2.02 < 3.0, so the minority flips to class 1. The majority
    (inputs 0.2, class 0 scores 0.8) is class 1 on every target. Returns the 40-sample test data.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sx, sy, sw = 1.0 / 255.0, 10.0 / 255.0, 1.0 / 127.0
    inits = [
        numpy_helper.from_array(np.array(sx, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(np.array(sy, np.float32), "sy"),
        numpy_helper.from_array(np.array(0, np.uint8), "zy"),
        numpy_helper.from_array(np.array([[127] * 4, [0] * 4], np.int8), "wq"),
        numpy_helper.from_array(np.full(2, sw, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(2, np.int8), "zw"),
        numpy_helper.from_array(np.array([0.0, 3.0], np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("Gemm", ["xd", "wd", "b"], ["h"], transB=1),
        helper.make_node("QuantizeLinear", ["h", "sy", "zy"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "sy", "zy"], ["y"]),
    ]
    g = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    group = (np.arange(40) % 4 == 0).astype(np.int64)  # 10 minority samples
    x = np.where(group[:, None] == 1, 1.0, 0.2).astype(np.float32).repeat(4, axis=1)
    y = np.where(group == 1, 0, 1).astype(np.int64)
    return GroupData(x, y, group, ("majority", "minority"), "saturating-task")


SAT_FEATURES = 16


class SaturatingMLP(nn.Module):
    """Two Linear layers whose first saturates AVX2's u8×s8 pairs at full 8-bit weight range.

    ``fc1`` computes h0 = Σx (every weight 1.0, i.e. +127 at full range) and h1 = 0.3·Σx + 8.96
    (weights 38 at full range); ``fc2`` passes them through. With inputs in [0.6, 1] (uint8 codes
    153..255), each pair of h0 sums to >= 2·153·127 = 38862 > 32767: AVX2's vpmaddubsw clips it,
    so h0 drops to about 8.1 and every sample becomes class 1. Exact int32 sums (VNNI, ARM) and
    7-bit weights (|q| <= 63: pairs <= 255·126 = 32130) are unaffected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(SAT_FEATURES, 2)
        self.fc2 = nn.Linear(2, 2)
        w = torch.full((2, SAT_FEATURES), 0.3)
        w[0] = 1.0
        with torch.no_grad():
            self.fc1.weight.copy_(w)
            self.fc1.bias.copy_(torch.tensor([0.0, 8.96]))
            self.fc2.weight.copy_(torch.eye(2))
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def saturating_mlp() -> SaturatingMLP:
    return SaturatingMLP().eval()


def saturating_task(n: int = 200, seed: int = 0) -> GroupData:
    """Inputs in [0.6, 1] for :class:`SaturatingMLP`, labeled by the float model (about half each
    class), every 4th sample in the minority."""
    x = np.random.default_rng(seed).uniform(0.6, 1.0, (n, SAT_FEATURES)).astype(np.float32)
    with torch.no_grad():
        y = saturating_mlp()(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)
    group = (np.arange(n) % 4 == 0).astype(np.int64)
    return GroupData(x, y, group, ("majority", "minority"), "saturating-mlp-task")


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


# ---------------------------------------------------------------------------------- tasks
# Small detectors and a segmenter (fqexport.demo.detectors) for the end-to-end tests of the tasks.


def yolov5_test():
    torch.manual_seed(0)
    return YoloV5(num_classes=3, width=4, image_size=64).eval()


def yolov8_test():
    torch.manual_seed(0)
    return YoloV8(num_classes=3, width=4, image_size=64).eval()


class RawYoloV5(YoloV5):
    """:class:`YoloV5` returning its raw head maps ``[N, A·(5 + C), H, W]`` per stride (what a
    training-mode YOLO returns); :class:`YoloV5Decode` turns them into the v5 layout."""

    def forward(self, x):
        return [head(feat) for head, feat in zip(self.head, self.body(x))]


def yolov5_raw_test():
    torch.manual_seed(0)
    return RawYoloV5(num_classes=3, width=4, image_size=64).eval()


class YoloV5Decode(nn.Module):
    """YoloV5's decode of 3 classes on 64×64 inputs as a module of its own (grids and anchors
    as buffers): a decode a user names with ``--decode fixtures_models:YoloV5Decode``."""

    def __init__(self):
        super().__init__()
        src = YoloV5(num_classes=3, width=4, image_size=64)
        self.na, self.no, self.sizes = src.na, src.no, src.sizes
        for i in range(len(self.sizes)):
            self.register_buffer(f"grid{i}", getattr(src, f"grid{i}").clone())
            self.register_buffer(f"anchor_grid{i}", getattr(src, f"anchor_grid{i}").clone())

    def forward(self, maps):
        out = []
        for i, p in enumerate(maps):
            ny, nx = self.sizes[i]
            y = p.view(-1, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            xy = (y[..., 0:2] * 2 - 0.5 + getattr(self, f"grid{i}")) * STRIDES[i]
            wh = (y[..., 2:4] * 2) ** 2 * getattr(self, f"anchor_grid{i}")
            out.append(torch.cat((xy, wh, y[..., 4:]), -1).reshape(-1, self.na * ny * nx, self.no))
        return torch.cat(out, 1)


class RawYoloV8(YoloV8):
    """:class:`YoloV8` returning per stride ``(box maps [N, 4·reg_max, H, W], class maps [N, C, H, W])``;
    :func:`decode_yolov8_test` turns them into the v8 layout."""

    def forward(self, x):
        return [(box(f), cls(f)) for box, cls, f in zip(self.box, self.cls, self.body(x))]


def yolov8_raw_test():
    torch.manual_seed(0)
    return RawYoloV8(num_classes=3, width=4, image_size=64).eval()


def decode_yolov8_test(levels):
    """YoloV8's DFL decode as a plain function (its anchor centres and strides made inside, from the
    fixed 64×64 input size: tensor constants of the traced graph)."""
    reg_max, boxes, classes, centres, strides = 8, [], [], [], []
    for (box, cls), s in zip(levels, STRIDES):
        n = 64 // s
        boxes.append(box.flatten(2))
        classes.append(cls.flatten(2))
        yv, xv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        centres.append(torch.stack((xv, yv), 0).reshape(2, -1).float() + 0.5)
        strides.append(torch.full((1, n * n), float(s)))
    box, cls = torch.cat(boxes, 2), torch.cat(classes, 2)
    k = box.shape[2]
    proj = torch.arange(reg_max, dtype=torch.float32).view(1, 1, reg_max, 1)
    dist = (box.view(-1, 4, reg_max, k).softmax(2) * proj).sum(2)
    anchors = torch.cat(centres, 1).unsqueeze(0)
    x1y1, x2y2 = anchors - dist[:, :2], anchors + dist[:, 2:]
    xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * torch.cat(strides, 1).unsqueeze(0)
    return torch.cat((xywh, cls.sigmoid()), 1)


def unet_test():
    torch.manual_seed(0)
    return UNet(num_classes=4, width=4).eval()


class TokenMLP(nn.Module):
    """[B, 8·24] → 8 tokens of 24 → Linear(24, 192) → GELU → Linear(192, 24) → mean → head: two
    token Linears (MatMul over [B, T, K]; fc1 over K = 192, three blocks of 64) and a vector head
    (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(24, 192), nn.Linear(192, 24), nn.Linear(24, 3)

    def forward(self, x):
        t = x.unflatten(1, (8, 24))
        return self.head(self.fc2(nn.functional.gelu(self.fc1(t))).mean(1))


def compiled_tiny_mlp() -> nn.Module:
    """A training script's factory: the model behind torch.compile (compiled only when first called)."""
    return torch.compile(tiny_mlp())
