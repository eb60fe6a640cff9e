"""Small hand-written detectors in the two layouts users export, and a UNet-style segmenter.

- :class:`YoloV5`: Conv-BN-SiLU blocks, C3, SPPF, a PAN neck and an anchor-based Detect head on
  two strides (8, 16) whose forward decodes (Sigmoid, grid offset, anchor and stride Mul, Concat)
  to YOLOv5's ``[N, K, 5 + C]``: cx, cy, w, h in pixels, objectness, class probabilities.
- :class:`YoloV8`: C2f blocks, SPPF, the same neck, a decoupled anchor-free head (box and class
  branches) and the DFL (a softmax over ``reg_max`` bins and its expectation), decoded to
  YOLOv8's ``[N, 4 + C, K]``.
- :class:`UNet`: a three-level encoder/decoder with skip connections, logits ``[N, C, H, W]``.

The grids, anchors and strides are buffers made for a fixed input size (as a YOLO export fixes
them), so ``torch.fx`` traces the decode and ONNX keeps it. Widths are small: they train in a
couple of minutes on two CPU cores (:mod:`fqexport.demo.detection_training`).
"""

from __future__ import annotations

import torch
from torch import nn

V5_ANCHORS = (((8, 8), (12, 12), (16, 16)), ((16, 16), (22, 22), (28, 28)))
STRIDES = (8, 16)


class ConvBNSiLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = ConvBNSiLU(c, c, 1)
        self.cv2 = ConvBNSiLU(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C3(nn.Module):
    """YOLOv5's CSP block: two 1×1 branches, bottlenecks on one, a 1×1 over their Concat."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        c = c_out // 2
        self.cv1 = ConvBNSiLU(c_in, c, 1)
        self.cv2 = ConvBNSiLU(c_in, c, 1)
        self.m = nn.Sequential(*(Bottleneck(c, shortcut) for _ in range(n)))
        self.cv3 = ConvBNSiLU(2 * c, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C2f(nn.Module):
    """YOLOv8's block: a 1×1 split in two halves, bottlenecks chained on the second, all Concat."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBNSiLU(c_in, 2 * self.c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        parts = [y[:, :self.c], y[:, self.c:]]
        for m in self.m:
            parts.append(m(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        c = c_in // 2
        self.cv1 = ConvBNSiLU(c_in, c, 1)
        self.cv2 = ConvBNSiLU(4 * c, c_out, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), 1))


class Backbone(nn.Module):
    """Stem → stride 8 (P3) → stride 16 (P4, SPPF) and a PAN neck: outputs at strides 8 and 16."""

    def __init__(self, block: type, w: int) -> None:
        super().__init__()
        self.stem = ConvBNSiLU(3, w, 3, 2)
        self.down1 = ConvBNSiLU(w, 2 * w, 3, 2)
        self.stage1 = block(2 * w, 2 * w)
        self.down2 = ConvBNSiLU(2 * w, 4 * w, 3, 2)
        self.stage2 = block(4 * w, 4 * w)
        self.down3 = ConvBNSiLU(4 * w, 6 * w, 3, 2)
        self.stage3 = block(6 * w, 6 * w)
        self.sppf = SPPF(6 * w, 6 * w)
        self.lateral = ConvBNSiLU(6 * w, 4 * w, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down = block(8 * w, 4 * w, shortcut=False)
        self.down4 = ConvBNSiLU(4 * w, 4 * w, 3, 2)
        self.bottom_up = block(8 * w, 6 * w, shortcut=False)
        self.channels = (4 * w, 6 * w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.stage2(self.down2(self.stage1(self.down1(self.stem(x)))))
        p4 = self.sppf(self.stage3(self.down3(p3)))
        lat = self.lateral(p4)
        n3 = self.top_down(torch.cat((self.up(lat), p3), 1))
        n4 = self.bottom_up(torch.cat((self.down4(n3), lat), 1))
        return n3, n4


class YoloV5(nn.Module):
    """Anchor-based, decoded to ``[N, K, 5 + C]`` (module docstring)."""

    def __init__(self, num_classes: int = 3, width: int = 16, image_size: int = 64) -> None:
        super().__init__()
        self.nc, self.no, self.na = num_classes, num_classes + 5, len(V5_ANCHORS[0])
        self.body = Backbone(C3, width)
        self.head = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in self.body.channels)
        self.sizes = [(image_size // s, image_size // s) for s in STRIDES]
        for i, ((ny, nx), anchors) in enumerate(zip(self.sizes, V5_ANCHORS)):
            yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
            self.register_buffer(f"grid{i}", torch.stack((xv, yv), 2).float().expand(1, self.na, ny, nx, 2).clone())
            a = torch.tensor(anchors, dtype=torch.float32).view(1, self.na, 1, 1, 2)
            self.register_buffer(f"anchor_grid{i}", a.expand(1, self.na, ny, nx, 2).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i, feat in enumerate(self.body(x)):
            ny, nx = self.sizes[i]
            p = self.head[i](feat).view(-1, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2)
            y = p.sigmoid()
            xy = (y[..., 0:2] * 2 - 0.5 + getattr(self, f"grid{i}")) * STRIDES[i]
            wh = (y[..., 2:4] * 2) ** 2 * getattr(self, f"anchor_grid{i}")
            out.append(torch.cat((xy, wh, y[..., 4:]), -1).reshape(-1, self.na * ny * nx, self.no))
        return torch.cat(out, 1)


class _Branch(nn.Module):
    def __init__(self, c_in: int, c: int, c_out: int) -> None:
        super().__init__()
        self.cv1 = ConvBNSiLU(c_in, c, 3)
        self.cv2 = ConvBNSiLU(c, c, 3)
        self.out = nn.Conv2d(c, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.cv2(self.cv1(x)))


class YoloV8(nn.Module):
    """Anchor-free with a decoupled head and DFL, decoded to ``[N, 4 + C, K]`` (module docstring)."""

    def __init__(self, num_classes: int = 3, width: int = 16, image_size: int = 64, reg_max: int = 8) -> None:
        super().__init__()
        self.nc, self.reg_max = num_classes, reg_max
        self.body = Backbone(C2f, width)
        self.box = nn.ModuleList(_Branch(c, 2 * width, 4 * reg_max) for c in self.body.channels)
        self.cls = nn.ModuleList(_Branch(c, 2 * width, num_classes) for c in self.body.channels)
        self.cells = [(image_size // s) ** 2 for s in STRIDES]
        centres, strides = [], []
        for s in STRIDES:
            n = image_size // s
            yv, xv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            centres.append(torch.stack((xv, yv), 0).reshape(2, -1).float() + 0.5)
            strides.append(torch.full((1, n * n), float(s)))
        self.register_buffer("anchors", torch.cat(centres, 1).unsqueeze(0))  # [1, 2, K] in cells
        self.register_buffer("strides", torch.cat(strides, 1).unsqueeze(0))  # [1, 1, K]
        self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32).view(1, 1, reg_max, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        box = torch.cat([self.box[i](f).view(-1, 4 * self.reg_max, n) for i, (f, n) in
                         enumerate(zip(feats, self.cells))], 2)
        cls = torch.cat([self.cls[i](f).view(-1, self.nc, n) for i, (f, n) in enumerate(zip(feats, self.cells))], 2)
        k = sum(self.cells)
        dist = (box.view(-1, 4, self.reg_max, k).softmax(2) * self.proj).sum(2)  # DFL: ltrb in cells
        x1y1 = self.anchors - dist[:, :2]
        x2y2 = self.anchors + dist[:, 2:]
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((xywh, cls.sigmoid()), 1)


class UNet(nn.Module):
    """A three-level UNet: Conv-BN-ReLU pairs, max-pool down, transposed-conv up, skip Concat."""

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()

        def pair(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        w = width
        self.enc1, self.enc2, self.enc3 = pair(3, w), pair(w, 2 * w), pair(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = pair(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = pair(2 * w, w)
        self.out = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(torch.cat((self.up2(e3), e2), 1))
        d1 = self.dec1(torch.cat((self.up1(d2), e1), 1))
        return self.out(d1)


def yolov5_tiny(num_classes: int = 3, width: int = 16, image_size: int = 64) -> YoloV5:
    return YoloV5(num_classes, width, image_size)


def yolov8_tiny(num_classes: int = 3, width: int = 16, image_size: int = 64) -> YoloV8:
    return YoloV8(num_classes, width, image_size)


def unet_small(num_classes: int = 4, width: int = 16) -> UNet:
    return UNet(num_classes, width)
