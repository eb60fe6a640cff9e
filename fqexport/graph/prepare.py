"""Model graph preparation: trace with torch.fx, check layers, fold BatchNorm, list layers.

Quantizable layers are ``nn.Conv2d`` (groups=1, grouped and depthwise) and ``nn.Linear``;
``nn.BatchNorm2d`` is folded into the preceding conv.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.experimental.optimization import fuse

from fqexport.errors import ModelLoadError, UnsupportedLayerError

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv2d, nn.Linear)
# Leaf modules with parameters that fqexport knows how to handle (BN is folded away).
_PARAM_OK = QUANTIZABLE + (nn.BatchNorm2d, nn.BatchNorm1d)

MSG_TRACE = (
    "cannot trace the model with torch.fx ({err}). fqexport needs a model whose forward has no "
    "data-dependent Python control flow; export it with torch.export to a .pt2 file or simplify "
    "the forward"
)
MSG_UNSUPPORTED = (
    "layer '{name}' ({kind}) cannot be quantized: supported layers are Conv2d, Linear, "
    "BatchNorm2d (folded), activations, residual adds, pooling and flatten. "
    "Pass skip_unsupported=True (CLI: --skip-unsupported) to leave it in float"
)


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer of the prepared graph."""

    name: str
    kind: str  # "conv" | "linear"
    params: int  # weight elements
    had_batchnorm: bool


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (already a GraphModule: returned as is)."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many kinds of errors for untraceable code
        raise ModelLoadError(MSG_TRACE.format(err=f"{type(err).__name__}: {err}")) from err


def unsupported_layers(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """``(name, type)`` of leaf modules with parameters that fqexport cannot quantize."""
    used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    bad = []
    for name, mod in gm.named_modules():
        if name not in used:
            continue
        has_params = any(True for _ in mod.parameters(recurse=False))
        if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            bad.append((name, f"Conv2d(padding_mode={mod.padding_mode!r})"))
        elif has_params and not isinstance(mod, _PARAM_OK):
            bad.append((name, type(mod).__name__))
    return bad


def check_supported(gm: torch.fx.GraphModule, skip_unsupported: bool) -> set[str]:
    """Raise on unsupported layers, or return their names (left float) when skipping."""
    bad = unsupported_layers(gm)
    if bad and not skip_unsupported:
        name, kind = bad[0]
        raise UnsupportedLayerError(MSG_UNSUPPORTED.format(name=name, kind=kind))
    for name, kind in bad:
        log.warning("layer '%s' (%s) is not supported and stays in float", name, kind)
    return {name for name, _ in bad}


def convs_followed_by_batchnorm(gm: torch.fx.GraphModule) -> set[str]:
    """Names of convs whose only user is a BatchNorm2d (what ``fold_batchnorm`` folds)."""
    modules = dict(gm.named_modules())
    names = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), nn.Conv2d)
            and len(src.users) == 1
        ):
            names.add(str(src.target))
    return names


def fold_batchnorm(model: nn.Module) -> tuple[torch.fx.GraphModule, set[str]]:
    """Fold every Conv2d→BatchNorm2d pair (eval statistics) into the conv.

    Returns the folded graph (a copy) and the names of the convs that absorbed a BN.
    """
    # symbolic_trace shares submodules with ``model``: copy so eval() and folding leave it alone.
    gm = copy.deepcopy(trace(model)).eval()
    folded = convs_followed_by_batchnorm(gm)
    return fuse(gm, inplace=True), folded


def quantizable_layers(
    gm: torch.fx.GraphModule, skip: set[str] = frozenset(), had_batchnorm: set[str] = frozenset()
) -> list[LayerInfo]:
    """Conv2d/Linear layers in execution order (each called once), minus ``skip``."""
    modules = dict(gm.named_modules())
    seen: list[LayerInfo] = []
    names = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules.get(node.target)
        if not isinstance(mod, QUANTIZABLE) or node.target in skip:
            continue
        name = str(node.target)
        if name in names:
            raise UnsupportedLayerError(
                f"layer '{name}' is called more than once in forward(); fqexport quantizes each "
                "layer for one call site (weight sharing is not supported)"
            )
        names.add(name)
        kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
        seen.append(LayerInfo(name, kind, mod.weight.numel(), name in had_batchnorm))
    return seen


MSG_NO_LAYERS = "the model has no Conv2d or Linear layer to quantize"


@dataclass(frozen=True)
class PreparedModel:
    """A model ready to quantize: traced, checked, BatchNorm folded, layers listed.

    Attributes:
        folded: the BN-folded graph, a copy of the model in eval mode on the CPU.
        layers: its quantizable layers in execution order (unsupported ones left out).
        skipped: names of the unsupported layers left in float (``skip_unsupported``).
        bn_convs: names of the convs that absorbed a BatchNorm.
    """

    folded: torch.fx.GraphModule
    layers: tuple[LayerInfo, ...]
    skipped: frozenset[str]
    bn_convs: frozenset[str]

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]


def prepare_model(model: nn.Module, skip_unsupported: bool = False) -> PreparedModel:
    """Trace → support check → fold BN → quantizable layers: the one model preparation of
    compress, sensitivity and the search's layer costs. ``model`` is not modified.

    Raises UnsupportedLayerError for an unsupported layer (unless ``skip_unsupported``: then it
    stays in float, with a warning) and when no layer is left to quantize; ModelLoadError when
    the model cannot be traced.
    """
    if model.training:  # trace in eval mode: `self.training` is baked into the traced graph
        model = copy.deepcopy(model).eval()
    raw = trace(model)
    skipped = check_supported(raw, skip_unsupported)
    folded, bn_convs = fold_batchnorm(raw)
    folded = folded.eval().cpu()
    layers = quantizable_layers(folded, skipped, bn_convs)
    if not layers:
        raise UnsupportedLayerError(MSG_NO_LAYERS)
    return PreparedModel(folded, tuple(layers), frozenset(skipped), frozenset(bn_convs))


def count_macs(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of each named Conv2d/Linear layer."""
    modules = dict(model.named_modules())
    macs: dict[str, int] = {}
    hooks = []

    def make_hook(name: str):
        def hook(mod, inputs, output):
            batch = max(int(inputs[0].shape[0]), 1)
            if isinstance(mod, nn.Conv2d):
                per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                macs[name] = int(output.numel() // batch * per_out)
            else:
                macs[name] = int(output.numel() // batch * mod.in_features)

        return hook

    for name in names:
        hooks.append(modules[name].register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return macs
