"""Embedded demo tasks: group-labeled data generated in memory (numpy only, nothing downloaded).

Three tasks:

* :func:`make_image_task` — 10 classes of procedurally drawn shapes (random position, scale,
  rotation, colour, clutter, illumination gradient, noise). The minority group
  ``"inverted-contrast"`` (~10%) shows the same classes with inverted contrast: a bright
  background and dark shapes. Inputs are normalised with one per-channel mean/std computed over
  the training set, so the (dark) majority dominates normalisation and the minority's inputs
  and early activations are large — the kind of shift a majority-dominated quantization range
  clips or resolves coarsely.
* :func:`make_two_minority_task` — the same shapes drawn upright, with two minorities of
  different kinds (~6% each): ``"rotated"`` (turned by 90°) and ``"dim-noisy"`` (low contrast,
  heavy noise).
* :func:`make_tabular_task` — synthetic tabular classification whose minority has shifted and
  rescaled features and a partly different decision rule (for an MLP benchmark).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fqexport.calibration.group_data import GroupData
from fqexport.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_GROUPS = ("majority", "inverted-contrast")
TWO_MINORITY_GROUPS = ("majority", "rotated", "dim-noisy")
# The two-minority task: upright shapes (θ within ±20°); "rotated" turns them by 90°,
# "dim-noisy" renders them at 30% contrast with 2.5× the noise.
UPRIGHT_RADIANS = 0.35
ROTATED_RADIANS = np.pi / 2
DIM_CONTRAST = 0.3
NOISY_FACTOR = 2.5
TABULAR_GROUPS = ("majority", "shifted")
SHAPE_NAMES = (
    "disk",
    "ring",
    "square",
    "square-outline",
    "triangle",
    "plus",
    "double-bar",
    "bar",
    "half-disk",
    "two-dots",
)
NUM_IMAGE_CLASSES = len(SHAPE_NAMES)

_CHUNK = 2048  # samples rendered at once (bounds memory: a few [chunk, H, W] float32 arrays)


@dataclass(frozen=True)
class DemoTaskSizes:
    """Sample counts of the demo image task."""

    n_train: int = 8000
    n_test: int = 3000
    size: int = 32
    minority_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check_sizes(self.n_train, self.n_test, self.minority_fraction)
        if int(self.size) < 8:
            raise ConfigError(f"size={self.size!r} must be >= 8 pixels")


def _check_sizes(n_train: int, n_test: int, minority_fraction: float) -> None:
    if int(n_train) < 1 or int(n_test) < 1:
        raise ConfigError(f"n_train={n_train!r} and n_test={n_test!r} must both be >= 1")
    if not (0.0 <= float(minority_fraction) <= 1.0):
        raise ConfigError(f"minority_fraction={minority_fraction!r} must be in [0, 1]")


# ---------------------------------------------------------------------------------------------
# image task
# ---------------------------------------------------------------------------------------------


def _shape_sdf(label: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of shape ``label`` at local coordinates (x, y).

    Shapes live in the unit box [-1, 1]²; distances are in the same units. Box distances use
    the Chebyshev form ``max(|x|-a, |y|-b)``, exact enough for anti-aliasing.
    """
    ax, ay = np.abs(x), np.abs(y)
    r = np.sqrt(x * x + y * y)
    if label == 0:  # disk
        return r - 0.8
    if label == 1:  # ring
        return np.abs(r - 0.62) - 0.2
    if label == 2:  # filled square
        return np.maximum(ax, ay) - 0.68
    if label == 3:  # square outline
        return np.abs(np.maximum(ax, ay) - 0.58) - 0.17
    if label == 4:  # equilateral triangle: max over 3 edge normals n_k·p - r
        d = None
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            e = x * np.cos(a) + y * np.sin(a)
            d = e if d is None else np.maximum(d, e)
        return d - 0.42
    if label == 5:  # plus
        return np.minimum(np.maximum(ax - 0.2, ay - 0.8), np.maximum(ay - 0.2, ax - 0.8))
    if label == 6:  # two parallel bars "="
        return np.maximum(ax - 0.8, np.abs(ay - 0.42) - 0.17)
    if label == 7:  # single bar
        return np.maximum(ax - 0.85, ay - 0.22)
    if label == 8:  # half disk (flat side down, centred)
        return np.maximum(np.sqrt(x * x + (y + 0.35) ** 2) - 0.85, -(y + 0.35))
    if label == 9:  # two dots
        return np.minimum(np.sqrt((x - 0.48) ** 2 + y * y), np.sqrt((x + 0.48) ** 2 + y * y)) - 0.32
    raise ValueError(f"unknown shape label {label}")


@dataclass(frozen=True)
class _Rendering:
    """Per-sample rendering conditions (all optional; ``None`` = the majority's)."""

    rotation: np.ndarray | None = None  # float [N]: θ replaced by θ_0 + this (radians)
    contrast: np.ndarray | None = None  # float [N]: foreground - background scaled by this
    noise: np.ndarray | None = None  # float [N]: noise standard deviation scaled by this


def _render_images(
    labels: np.ndarray,
    inverted: np.ndarray,
    size: int,
    rng: np.random.Generator,
    upright: float | None = None,
    rendering: _Rendering | None = None,
) -> np.ndarray:
    """Raw images in [0, 1], ``[N, 3, size, size]`` float32 (before normalisation).

    ``upright``: if given, every shape's rotation θ is drawn from [-upright, upright] instead of
    [0, 2π) (so orientation carries information and a rotated group is a real shift).
    ``rendering`` adds per-sample conditions; the random draws are the same with or without
    them, so a seed gives the same scenes.
    """
    n = labels.shape[0]
    f32 = np.float32
    # Per-sample pose: centre c, radius s (half-image units), rotation θ, aspect a.
    s = rng.uniform(0.36, 0.72, n).astype(f32)
    c = rng.uniform(-1.0, 1.0, (n, 2)).astype(f32) * (0.95 - s)[:, None]
    theta = rng.uniform(0.0, 2 * np.pi, n).astype(f32)
    aspect = rng.uniform(0.85, 1.18, n).astype(f32)
    # Colours: bright foreground with a random tint, dark tinted background.
    fg = rng.uniform(0.6, 1.0, (n, 3)).astype(f32)
    bg = rng.uniform(0.0, 0.25, (n, 3)).astype(f32)
    # Illumination gradient g·(u, v) and global brightness jitter b.
    grad = rng.normal(0.0, 0.08, (n, 2)).astype(f32)
    bright = rng.uniform(0.85, 1.15, n).astype(f32)
    noise_std = rng.uniform(0.03, 0.14, n).astype(f32)
    if upright is not None:
        theta = (theta / np.float32(np.pi) - 1.0) * np.float32(upright)  # [0, 2π) → [-u, u)
    r = rendering or _Rendering()
    if r.rotation is not None:
        theta = theta + r.rotation.astype(f32)
    if r.contrast is not None:
        fg = bg + (fg - bg) * r.contrast.astype(f32)[:, None]
    if r.noise is not None:
        noise_std = noise_std * r.noise.astype(f32)

    coords = (np.arange(size, dtype=f32) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    v, u = np.meshgrid(coords, coords, indexing="ij")  # v: rows (down), u: columns
    u = u[None]
    v = v[None]

    du = u - c[:, 0, None, None]
    dv = v - c[:, 1, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    sc = s[:, None, None]
    # Local coordinates: p_local = R(-θ)(p - c) / s, x stretched by the aspect.
    x = (du * cos + dv * sin) / (sc * aspect[:, None, None])
    y = (-du * sin + dv * cos) / sc

    sdf = np.empty((n, size, size), dtype=f32)
    for label in range(NUM_IMAGE_CLASSES):
        idx = np.nonzero(labels == label)[0]
        if idx.size:
            sdf[idx] = _shape_sdf(label, x[idx], y[idx])
    # Anti-aliased coverage: a pixel spans (2/size)/s local units.
    pixel = (2.0 / size) / sc
    cover = np.clip(0.5 - sdf / pixel, 0.0, 1.0)

    # Clutter: 3 small dots per image at random places (same colour as the shape, dimmer).
    for _ in range(3):
        pc = rng.uniform(-0.9, 0.9, (n, 2)).astype(f32)
        rad = rng.uniform(0.04, 0.09, n).astype(f32)[:, None, None]
        d = np.sqrt((u - pc[:, 0, None, None]) ** 2 + (v - pc[:, 1, None, None]) ** 2) - rad
        cover = np.maximum(cover, 0.6 * np.clip(0.5 - d / (2.0 / size), 0.0, 1.0))

    cover = cover[:, None]  # [N, 1, H, W]
    img = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * cover
    img = img + (grad[:, 0, None, None] * u + grad[:, 1, None, None] * v)[:, None]
    img = img * bright[:, None, None, None]
    img = img + rng.normal(0.0, 1.0, img.shape).astype(f32) * noise_std[:, None, None, None]
    img = np.clip(img, 0.0, 1.0)
    # Minority rendering condition: inverted contrast (bright background, dark shapes).
    img[inverted] = 1.0 - img[inverted]
    return img.astype(f32, copy=False)


def _draw_groups(n: int, minority_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``round(n·fraction)`` minority samples (id 1) at random positions."""
    n_min = int(round(n * float(minority_fraction)))
    group = np.zeros(n, dtype=np.int64)
    group[rng.permutation(n)[:n_min]] = 1
    return group


def _render_split(
    n: int, size: int, minority_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = rng.integers(0, NUM_IMAGE_CLASSES, n).astype(np.int64)
    group = _draw_groups(n, minority_fraction, rng)
    x = np.empty((n, 3, size, size), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        x[start:stop] = _render_images(y[start:stop], group[start:stop] == 1, size, rng)
    return x, y, group


def _normalise_images(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(x - μ_c) / σ_c`` for both splits with the *training* set's per-channel statistics
    (μ_c = mean over (n, h, w) of channel c); returns the two float32 splits, μ and σ."""
    mean = xtr.mean(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)[None, :, None, None]
    std = np.maximum(xtr.std(axis=(0, 2, 3), dtype=np.float64).astype(np.float32), 1e-6)[None, :, None, None]
    return ((xtr - mean) / std).astype(np.float32), ((xte - mean) / std).astype(np.float32), mean, std


def make_image_task(
    n_train: int = 8000,
    n_test: int = 3000,
    size: int = 32,
    minority_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[GroupData, GroupData]:
    """The demo image task: ``(train, test)`` with groups ``("majority", "inverted-contrast")``.

    ``x`` is float32 ``[N, 3, size, size]``, normalised per channel as ``(x - μ_c) / σ_c`` with
    μ, σ computed over the *training* images (the majority dominates them); ``y`` holds
    :data:`NUM_IMAGE_CLASSES` shape classes. Fully determined by ``seed``.
    """
    _check_sizes(n_train, n_test, minority_fraction)
    if int(size) < 8:
        raise ConfigError(f"size={size!r} must be >= 8 pixels")
    rng = np.random.default_rng(seed)
    xtr, ytr, gtr = _render_split(int(n_train), int(size), minority_fraction, rng)
    xte, yte, gte = _render_split(int(n_test), int(size), minority_fraction, rng)
    xtr, xte, mean, std = _normalise_images(xtr, xte)
    src = f"demo image task (seed={seed}, size={size}, minority_fraction={minority_fraction})"
    train = GroupData(xtr.astype(np.float32), ytr, gtr, IMAGE_GROUPS, src + " [train]")
    test = GroupData(xte.astype(np.float32), yte, gte, IMAGE_GROUPS, src + " [test]")
    logger.debug("image task: train %s, test %s, mean %s, std %s", xtr.shape, xte.shape,
                 mean.ravel(), std.ravel())
    return train, test


def _draw_group_ids(n: int, fractions: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Exactly ``round(n·f_g)`` samples of each minority ``g = 1, 2, …`` at random positions."""
    group = np.zeros(n, dtype=np.int64)
    order = rng.permutation(n)
    start = 0
    for gid, frac in enumerate(fractions, start=1):
        count = int(round(n * float(frac)))
        group[order[start:start + count]] = gid
        start += count
    return group


def _render_two_minority_split(
    n: int, size: int, fractions: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = rng.integers(0, NUM_IMAGE_CLASSES, n).astype(np.int64)
    group = _draw_group_ids(n, fractions, rng)
    rotation = np.where(group == 1, ROTATED_RADIANS, 0.0)
    contrast = np.where(group == 2, DIM_CONTRAST, 1.0)
    noise = np.where(group == 2, NOISY_FACTOR, 1.0)
    x = np.empty((n, 3, size, size), dtype=np.float32)
    no_inversion = np.zeros(n, dtype=bool)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        rendering = _Rendering(rotation=rotation[sl], contrast=contrast[sl], noise=noise[sl])
        x[sl] = _render_images(y[sl], no_inversion[sl], size, rng, upright=UPRIGHT_RADIANS,
                               rendering=rendering)
    return x, y, group


def make_two_minority_task(
    n_train: int = 8000,
    n_test: int = 3000,
    size: int = 32,
    minority_fractions: tuple[float, float] = (0.06, 0.06),
    seed: int = 0,
) -> tuple[GroupData, GroupData]:
    """A second image task with two minorities of different kinds: ``(train, test)`` with groups
    ``("majority", "rotated", "dim-noisy")``.

    The same ten shape classes as :func:`make_image_task`, but drawn upright (θ within ±20°), so
    orientation is part of what the majority teaches: ``"rotated"`` shows them turned by 90°
    (a geometric shift: bar vs. double-bar, half-disk, triangle change look), ``"dim-noisy"``
    at 30% contrast with 2.5× the sensor noise (a photometric shift: small activations that a
    majority-sized quantization step resolves coarsely). Normalised with the training set's
    per-channel mean/std. Fully determined by ``seed``.
    """
    fr = tuple(float(f) for f in minority_fractions)
    if len(fr) != 2:
        raise ConfigError(f"minority_fractions={minority_fractions!r} must hold two fractions")
    _check_sizes(n_train, n_test, sum(fr))
    if min(fr) < 0.0:
        raise ConfigError(f"minority_fractions={minority_fractions!r} must be >= 0")
    if int(size) < 8:
        raise ConfigError(f"size={size!r} must be >= 8 pixels")
    rng = np.random.default_rng(seed)
    xtr, ytr, gtr = _render_two_minority_split(int(n_train), int(size), fr, rng)
    xte, yte, gte = _render_two_minority_split(int(n_test), int(size), fr, rng)
    xtr, xte, _, _ = _normalise_images(xtr, xte)
    src = f"two-minority image task (seed={seed}, size={size}, minority_fractions={fr})"
    train = GroupData(xtr, ytr, gtr, TWO_MINORITY_GROUPS, src + " [train]")
    test = GroupData(xte, yte, gte, TWO_MINORITY_GROUPS, src + " [test]")
    return train, test


# ---------------------------------------------------------------------------------------------
# tabular task
# ---------------------------------------------------------------------------------------------


def make_tabular_task(
    n_train: int = 8000,
    n_test: int = 3000,
    n_features: int = 32,
    num_classes: int = 4,
    minority_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[GroupData, GroupData]:
    """Synthetic tabular classification: ``(train, test)``, groups ``("majority", "shifted")``.

    Latent z ~ N(0, I). Labels: ``y = argmax(z A + 0.3·sin(z B) + b)``, a mostly linear rule
    with a nonlinear part. The minority's rule mixes in a second matrix,
    ``A' = 0.8·A + 0.2·A2`` (a partly different decision rule), and its observed features are
    shifted and rescaled, ``x = z ⊙ scale + shift`` with scale ∈ [2, 6] and shift ∈ [-4, 4] on
    half of the features (large inputs, hence large first-layer activations, for the minority).
    Features are standardised with the training set's mean/std. 3% label noise keeps it from
    being trivially separable.
    """
    _check_sizes(n_train, n_test, minority_fraction)
    if int(n_features) < 2:
        raise ConfigError(f"n_features={n_features!r} must be >= 2")
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes={num_classes!r} must be >= 2")
    d, k = int(n_features), int(num_classes)
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, (d, k)) / np.sqrt(d) * 3.0
    a2 = rng.normal(0.0, 1.0, (d, k)) / np.sqrt(d) * 3.0
    bmat = rng.normal(0.0, 1.0, (d, k)) / np.sqrt(d) * 2.0
    bias = rng.normal(0.0, 0.3, k)
    a_min = 0.8 * a + 0.2 * a2
    shifted = rng.permutation(d)[: d // 2]
    scale = np.ones(d)
    shift = np.zeros(d)
    scale[shifted] = rng.uniform(2.0, 6.0, shifted.size)
    shift[shifted] = rng.uniform(-4.0, 4.0, shifted.size)

    def split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        group = _draw_groups(n, minority_fraction, rng)
        z = rng.normal(0.0, 1.0, (n, d))
        minority = group == 1
        logits = z @ a + 0.3 * np.sin(z @ bmat) + bias
        logits[minority] = z[minority] @ a_min + 0.3 * np.sin(z[minority] @ bmat) + bias
        y = logits.argmax(axis=1)
        flip = rng.random(n) < 0.03
        y[flip] = rng.integers(0, k, int(flip.sum()))
        x = z.copy()
        x[minority] = z[minority] * scale + shift
        return x, y.astype(np.int64), group

    xtr, ytr, gtr = split(int(n_train))
    xte, yte, gte = split(int(n_test))
    mean = xtr.mean(axis=0, keepdims=True)
    std = np.maximum(xtr.std(axis=0, keepdims=True), 1e-6)
    src = f"demo tabular task (seed={seed}, n_features={d}, minority_fraction={minority_fraction})"
    train = GroupData(((xtr - mean) / std).astype(np.float32), ytr, gtr, TABULAR_GROUPS,
                      src + " [train]")
    test = GroupData(((xte - mean) / std).astype(np.float32), yte, gte, TABULAR_GROUPS,
                     src + " [test]")
    return train, test
