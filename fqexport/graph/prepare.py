"""Model graph preparation: trace with torch.fx, check layers, fold BatchNorm, list layers.

Quantizable layers are ``nn.Conv2d`` and ``nn.Conv1d`` (groups=1, grouped and depthwise),
``nn.ConvTranspose2d`` (groups=1: per output channel, the weight's axis 1), ``nn.Linear`` and ``nn.Embedding`` (per row, round to nearest; subclasses included); a BatchNorm right after a conv or ConvTranspose2d (``nn.BatchNorm2d`` or a subclass, or a
traced ``F.batch_norm`` on parameters, e.g. timm's ``BatchNormAct2d``) or a Linear
(``BatchNorm1d``) is folded into it. Normalisation layers (LayerNorm, GroupNorm, InstanceNorm,
RMSNorm, BatchNorm that cannot be folded) stay float ops between the quantized layers.
Attention modules are first swapped for traceable stand-ins (graph/decompose.py) so their
projections are Linear layers. ``F.conv2d``/``F.linear``... on a parameter, or on a weight computed
from parameters alone (timm's ``StdConv2d``), become those layers (graph/lift.py). Any other layer
with a weight (LSTM, an Embedding with max_norm, a ``torch.matmul`` on a parameter) stays float
with a warning naming every such layer; ``strict`` makes it an error.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import operator
import re
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from fqexport.engine.base import in_worker
from fqexport.errors import ConfigError, ModelLoadError, UnsupportedLayerError
from fqexport.global_state import GLOBAL_STATE_LOCK, keeps_random_state
from fqexport.graph.act_quant import input_dependent
from fqexport.graph.decode import DecodedModel, strip_wrapper
from fqexport.graph.decompose import decompose_attention
from fqexport.graph.exported_program import lift_exported_modules
from fqexport.graph.lift import (
    dynamic_weight_params,
    fold_computed_weights,
    layer_owner,
    lift_weight_calls,
    parameter_weight_leaves,
)
from fqexport.graph.targets import attribute, free_program_names, graph_module

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
_CONVS = (nn.Conv2d, nn.Conv1d)
# Convs whose output channels are dim 1 of the output (BN folding, MAC count).
_ALL_CONVS = _CONVS + (nn.ConvTranspose2d,)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Layers with parameters that stay float ops between quantized layers, by design.
NORMS = _BATCHNORM + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                      nn.InstanceNorm3d, nn.RMSNorm, nn.PReLU)
MSG_MORE_INPUTS = (
    "the model's forward takes required inputs beyond {first!r}: {names}; fqexport feeds one input "
    "(the data's 'x'): give the others defaults, or wrap the model in a module whose forward(x) supplies them"
)
MSG_FIRST_OUTPUT = ("the model returns a {kind} of {n} outputs: fqexport measures, compresses and exports the "
                    "first (the others are left out of the file)")

# Subclasses of these that keep the base forward are traced as leaves, like their base.
_LEAF_BASES = QUANTIZABLE + NORMS
# Functional weight ops on parameters (a module traced through): float weight layers.
_aten = torch.ops.aten
_WEIGHT_FUNCS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
                 F.embedding: "embedding", torch.matmul: "matmul", F.conv_transpose2d: "conv_transpose2d",
                 # what a torch.export program keeps after the pass that lifts conv2d/linear to modules
                 _aten.linear.default: "linear", _aten.conv1d.default: "conv1d",
                 _aten.conv2d.default: "conv2d", _aten.embedding.default: "embedding",
                 _aten.matmul.default: "matmul", _aten.conv_transpose2d.input: "conv_transpose2d"}

# Matrix products that read a weight among any of their operands (``x @ self.W``,
# ``torch.einsum("nk,kj->nj", x, self.W)``, ``torch.addmm(b, x, W)``): float weight layers too.
_PRODUCT_FUNCS = {operator.matmul: "matmul", torch.mm: "mm", torch.bmm: "bmm", torch.einsum: "einsum",
                  torch.addmm: "addmm", torch.baddbmm: "baddbmm", torch.tensordot: "tensordot",
                  F.bilinear: "bilinear", _aten.mm.default: "mm", _aten.bmm.default: "bmm",
                  _aten.einsum.default: "einsum", _aten.addmm.default: "addmm"}
_PRODUCT_METHODS = {"matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "matmul", "mm": "mm", "bmm": "bmm",
                    "addmm": "addmm"}

# weight ops whose second argument is a layer's weight (a dynamic one is built from the input)
_OPS_WITH_WEIGHT = frozenset({"linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d"})

MSG_TRACE = (
    "cannot trace the model with torch.fx ({err}). fqexport needs a model whose forward has no "
    "data-dependent Python control flow; export it with torch.export to a .pt2 file or simplify "
    "the forward"
)
MSG_BATCH_STATS = (
    "BatchNorm {layers} keeps no running statistics (track_running_stats=False): at inference it normalises "
    "each batch with that batch's own mean and variance, so a sample's output depends on the samples it is "
    "batched with (the file does the same; validate's per-group figures change with --batch-size). Train "
    "with running statistics, or replace it (e.g. GroupNorm) to get outputs that do not"
)
MSG_VARARGS = (
    "the model's forward takes {name} and uses more than its first item: fqexport feeds the model one "
    "tensor; wrap it in a module whose forward(self, x) calls it"
)
MSG_TRACE_BOTH = (
    "cannot trace the model: torch.fx failed ({err}), and so did torch.export on a batch of the data with a "
    "dynamic batch size ({export_err}). fqexport needs a graph of the forward: write it without Python control "
    "flow on tensor values (if x.sum() > 0, iterating over a tensor), or export it yourself with torch.export "
    "to a .pt2 file"
)
MSG_HOOKS = "forward hooks on {modules}, which a torch.fx trace leaves out (it runs the model's forward)"
MSG_HOOKS_NO_EXAMPLE = (
    "the model has " + MSG_HOOKS + ": the traced model would compute something else than model(x). Give an "
    "example batch (compress does) so that torch.export traces it with its hooks, or fold what the hooks do "
    "into forward()"
)
MSG_TRACED_BY_EXPORT = (
    "torch.fx cannot trace the model (%s); it was traced with torch.export instead (layer names are the "
    "modules' own)"
)
MSG_COMPUTED_GROUPS = (
    "{where}: F.{op} with groups computed from the input (CondConv's groups = batch size) cannot be "
    "exported: an ONNX Conv's group is a fixed number and fqexport's files take any batch size; compress a "
    "variant whose convs have fixed groups (timm: not the _cc_ models)"
)
MSG_UNFOLDED_BN = (
    "%d BatchNorm(s) cannot be folded into a conv or Linear (not right after one, or that layer has other "
    "users): each stays a float op between the quantized layers, with a dequantize/quantize pair around it: %s"
)
MSG_UNSUPPORTED = (
    "{count} layer(s) cannot be quantized and strict=True (CLI: --strict) refuses float layers: "
    "{layers}. Supported: Conv2d, Conv1d, ConvTranspose2d (groups=1), Linear, Embedding (also inside nn.MultiheadAttention / "
    "nn.TransformerEncoder), BatchNorm (folded), normalisation layers (float), activations, "
    "residual adds, pooling, flatten, attention. Drop strict to leave them in float"
)
MSG_FLOAT_LAYERS = "%d weight layer(s) stay in float (%d of %d weight parameters, %.1f%%): %s"


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer of the prepared graph."""

    name: str
    kind: str  # "conv" | "conv_transpose" | "linear" | "embedding"
    params: int  # weight elements
    had_batchnorm: bool
    batch_dim: int = 0  # the dim of its input and output that holds the samples (1: [T, B, E] sequence-first)


UNSUPPORTED = "unsupported"  # a FloatLayer's reason when fqexport cannot quantize it
# a FloatLayer's reason for a Parameter table the graph reads itself (``x + self.pos``): no layer
# to quantize, stored as float32 in the file (counted, neither warned about nor refused by strict)
READ_DIRECTLY = "a Parameter read directly, not a layer"


@dataclass(frozen=True)
class FloatLayer:
    """A layer with a weight that stays in float: fqexport cannot quantize it, or the user kept it
    float (``QuantConfig.keep_float``; ``reason`` names the pattern that matched)."""

    name: str
    kind: str  # module type, e.g. "LSTM", "Conv2d(padding_mode='reflect')", "F.linear"
    params: int  # weight elements (parameters with >= 2 dims)
    reason: str = UNSUPPORTED  # or "keep_float: <pattern>", or READ_DIRECTLY

    def describe(self) -> str:
        return f"'{self.name}' ({self.kind}, {self.params} params)"


def keep_float_match(name: str, module: nn.Module, patterns: tuple) -> str | None:
    """The first ``keep_float`` pattern that selects the layer ``name`` (``module``): a regular
    expression matching the whole name (a plain name matches itself), ``"type:ClassName"`` (the
    module's class or a base class by name) or an ``nn.Module`` subclass; ``None`` when none does."""
    for p in patterns:
        if isinstance(p, type):
            hit = isinstance(module, p)
        elif p.startswith("type:"):
            hit = p[5:] in {c.__name__ for c in type(module).__mro__}
        else:
            hit = re.fullmatch(p, name) is not None
        if hit:
            return p if isinstance(p, str) else f"type:{p.__name__}"
    return None


def kept_float_layers(gm: torch.fx.GraphModule, patterns: tuple) -> list[FloatLayer]:
    """The quantizable layers of ``gm`` that ``keep_float`` patterns keep in float."""
    if not patterns:
        return []
    modules = dict(gm.named_modules())
    out = []
    for name in called_layers(gm):
        match = keep_float_match(name, modules[name], patterns)
        if match is not None:
            out.append(FloatLayer(name, type(modules[name]).__name__, modules[name].weight.numel(), f"keep_float: {match}"))
    return out


def called_layers(gm: torch.fx.GraphModule) -> list[str]:
    """The quantizable layer modules ``gm`` calls, each once in call order (a layer a
    ``keep_float`` pattern keeps may be called more than once: a DFL conv per scale)."""
    modules = dict(gm.named_modules())
    return list(dict.fromkeys(str(n.target) for n in gm.graph.nodes
                              if n.op == "call_module" and isinstance(modules.get(n.target), QUANTIZABLE)))


def unmatched_keep_float(gm: torch.fx.GraphModule, patterns: tuple) -> list[str]:
    """The ``keep_float`` patterns, each as :func:`keep_float_match` names it, that select no
    quantizable layer of ``gm`` (a typo would otherwise quantize the layer silently)."""
    modules = dict(gm.named_modules())
    names = [*called_layers(gm), *(f.name for f in float_layers(gm))]  # an unsupported layer may be named too
    return [p if isinstance(p, str) else f"type:{p.__name__}" for p in patterns
            if not any(keep_float_match(n, modules.get(n), (p,)) for n in names)]




class _Tracer(torch.fx.Tracer):
    """fx's tracer, with subclasses of Conv2d/Linear/norm layers that keep their base's forward
    as leaves too (fx would trace into a non-``torch.nn`` subclass and fail on its input check)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if super().is_leaf_module(m, qualname):
            return True
        for base in _LEAF_BASES:
            if isinstance(m, base):
                return type(m).forward is base.forward or (base is nn.Linear and _plain_linear(m))
        return False


def _plain_linear(m: nn.Linear) -> bool:
    """Whether a Linear subclass's own forward traces to exactly ``F.linear(input, self.weight,
    self.bias)`` (timm's ``Linear``, the classifier of its MobileNetV3, GhostNet, LCNet: a
    TorchScript branch fx never takes, then the plain call): a leaf, quantized like nn.Linear."""
    try:
        graph = torch.fx.Tracer().trace(m)
    except Exception:  # noqa: BLE001 (a forward fx cannot trace on its own: traced into, as before)
        return False
    calls = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    if len(calls) != 1 or calls[0].target is not F.linear:
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    args = [*calls[0].args, *calls[0].kwargs.values()]  # (input, weight[, bias])

    def attr(a: Any) -> str | None:
        return a.target if isinstance(a, torch.fx.Node) and a.op == "get_attr" else None

    bias_ok = (len(args) == 3 and attr(args[2]) == "bias") if m.bias is not None else (
        len(args) == 2 or (len(args) == 3 and args[2] is None))
    return len(inputs) == 1 and len(args) >= 2 and args[0] is inputs[0] and attr(args[1]) == "weight" and bias_ok


def _defaulted_arguments(model: nn.Module) -> dict[str, Any] | None:
    """``forward``'s parameters after its input, at their defaults, as fx's ``concrete_args``
    (timm's ViTs take ``forward(x, attn_mask=None, ...)``): fqexport feeds the one input, and an
    ``if attn_mask is not None`` must see None while tracing, not a placeholder. A ModelLoadError
    for a further parameter without a default."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: trace as fx does
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    extra = [p for p in params[1:] if p.kind in named]
    required = [p.name for p in extra if p.default is inspect.Parameter.empty]
    if params and required:
        raise ModelLoadError(MSG_MORE_INPUTS.format(first=params[0].name, names=", ".join(required)))
    return {p.name: p.default for p in extra} or None


MSG_SCRIPTED = (
    "the model is a TorchScript module ({kind}): fqexport quantizes the Python nn.Module, whose graph "
    "torch.fx traces; pass the module before torch.jit.script/trace (or a factory with its state_dict, "
    "CLI: --model pkg.mod:factory --weights FILE)"
)


MSG_META = (
    "the model's {what} {name!r} is on the 'meta' device (a shape without data): load the weights first "
    "(model.to_empty(device='cpu') then load_state_dict, or load_state_dict(..., assign=True))"
)


MSG_NONFINITE = (
    "the model's {what} '{name}' holds NaN or Inf ({n} of its {total} values), so its outputs are not finite "
    "(nothing to quantize or measure them against); check the checkpoint (a diverged training run, a failed conversion)"
)


def check_materialized(model: nn.Module) -> None:
    """ModelLoadError naming the first parameter or buffer on the ``meta`` device (one built under
    ``torch.device('meta')`` and never loaded), rather than torch's "Cannot copy out of meta tensor",
    and the first parameter holding NaN or Inf (a buffer holding NaN)."""
    for what, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta:
                raise ModelLoadError(MSG_META.format(what=what, name=name))
            # a parameter must be finite; a buffer may hold -inf (an attention mask), not NaN
            bad = (~torch.isfinite(t) if what == "parameter" else torch.isnan(t)) if t.is_floating_point() else None
            if bad is not None and bool(bad.any()):
                raise ModelLoadError(MSG_NONFINITE.format(what=what, name=name, n=int(bad.sum()), total=t.numel()))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside the wrappers that add no computation: ``nn.DataParallel`` /
    ``DistributedDataParallel`` (``.module``) and ``torch.compile``'s ``OptimizedModule``
    (``._orig_mod``), which torch.fx cannot trace; a TorchScript module or one whose weights are
    on the ``meta`` device is refused (ModelLoadError)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, torch.jit.ScriptModule):
            raise ModelLoadError(MSG_SCRIPTED.format(kind=type(model).__name__))
        else:
            check_materialized(model)
            return model


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of the user's ``model``. A tensor attribute computed with autograd on (the
    hook-based ``weight_norm``'s ``weight = g · v / ||v||``, set when the hook is installed) is
    not a graph leaf, which ``copy.deepcopy`` refuses: the copy holds it detached (its hook
    recomputes it from the copied ``g`` and ``v`` at the next forward)."""
    memo = {id(t): t.detach().clone() for m in model.modules() for t in vars(m).values()
            if isinstance(t, torch.Tensor) and not t.is_leaf}
    return copy.deepcopy(model, memo)


def float32(model: nn.Module) -> nn.Module:
    """``model`` with float32 parameters and buffers (what fqexport calibrates, quantizes and
    exports against): a float32 copy of a float16/bfloat16/float64 model, else ``model`` itself."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        return model
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()} - {"float32"})
    log.info("the model's %s weights are computed in float32 (a float32 copy)", "/".join(dtypes))
    return copy_model(model).float()


def user_hooks(m: nn.Module) -> int:
    """Forward and forward-pre hooks on ``m``, the hook-based ``weight_norm`` / ``spectral_norm``
    aside (their weight becomes a plain one: :func:`_plain_parametrized_layers`)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    pre = [h for h in m._forward_pre_hooks.values() if not isinstance(h, (WeightNorm, SpectralNorm))]
    return len(pre) + len(m._forward_hooks)


def trace(model: nn.Module, owner: nn.Module | None = None, example: torch.Tensor | None = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (already a GraphModule: returned as is, or a copy cut to its
    first output when it returns several).

    Attention modules are replaced by traceable stand-ins first (on a copy when there are any:
    ``model`` itself is not modified). ``owner``: whose warnings these are (default ``model``).
    Where torch.fx fails (``list(x.chunk(2, 1))``: a tensor iterated) and ``example`` (a batch of
    inputs) is given, the model is traced with ``torch.export`` instead, its batch dim dynamic,
    as a ``.pt2`` program of it would be loaded (:func:`_exported`).
    """
    if isinstance(model, torch.fx.GraphModule):
        out = next(n for n in model.graph.nodes if n.op == "output").args[0]
        if isinstance(out, (tuple, list)) and len(out) > 1:  # a .pt2 returning (logits, features)
            cut = torch.fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)  # the caller's graph stays
            cut.meta.update(model.meta)
            _keep_first_output(cut, owner=model if owner is None else owner)
            return cut
        return model
    source = model if owner is None else owner  # warnings are given once per user model
    model = unwrap_model(model)
    if any(decompose_attention_needed(m) for m in model.modules()):
        model, swapped = decompose_attention(copy_model(model))
        log.info("traced through attention modules: %s", ", ".join(swapped))
    # a hook on the model itself: fx runs its forward and drops it (a submodule is called through
    # Module.__call__, its hooks traced; a leaf runs as a module); torch.export calls the model
    if user_hooks(model):
        why = MSG_HOOKS.format(modules="the model itself")
        if example is None:
            raise ModelLoadError(MSG_HOOKS_NO_EXAMPLE.format(modules="the model itself"))
        gm = _own_names(_exported(model, example, why), model)
        _keep_first_output(gm, owner=source)
        return gm
    concrete = _defaulted_arguments(model)  # its own ModelLoadError, not the trace's advice
    try:
        graph = _Tracer().trace(model, concrete_args=concrete)
    except Exception as err:  # fx raises many kinds of errors for untraceable code
        why = f"{type(err).__name__}: {_first_line(err)}"
        if example is None:
            raise ModelLoadError(MSG_TRACE.format(err=why)) from err
        gm = _own_names(_exported(model, example, why), model)
        _keep_first_output(gm, owner=source)
        return gm
    gm = _own_names(graph_module(model, graph, type(model).__name__), model)  # `meta`, `graph`: renamed
    _plain_varargs(gm)
    _keep_first_output(gm, owner=source)
    _plain_parametrized_layers(gm)
    # F.conv2d/F.linear on a parameter, or on a weight computed from parameters (timm's StdConv2d)
    fold_computed_weights(gm)
    if lift_weight_calls(gm):
        gm.recompile()
    return gm


def _own_names(gm: torch.fx.GraphModule, model: nn.Module) -> torch.fx.GraphModule:
    """``gm`` with the user's layer names where ``model`` is a :class:`DecodedModel` (``head.0``,
    not the wrapper's ``model.head.0``), however it was traced; else ``gm``."""
    return strip_wrapper(gm, type(model.model).__name__) if isinstance(model, DecodedModel) else gm


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _exported(model: nn.Module, example: torch.Tensor, fx_error: str) -> torch.fx.GraphModule:
    """``model`` traced by ``torch.export`` on ``example`` with a dynamic batch dim, its conv/linear
    calls lifted back to modules (graph/exported_program.py, as a loaded ``.pt2``); a
    ModelLoadError naming both failures when export fails too."""
    batch = torch.export.Dim("batch")
    try:
        with GLOBAL_STATE_LOCK, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
            free_program_names(program)  # a top-level `meta` or `graph`: renamed, as the fx path does
            gm = program.module()
    except Exception as err:  # noqa: BLE001 (export fails in many ways; both reasons go to the user)
        raise ModelLoadError(MSG_TRACE_BOTH.format(err=fx_error, export_err=f"{type(err).__name__}: "
                                                   f"{_first_line(err)}")) from err
    log.info(MSG_TRACED_BY_EXPORT, fx_error)
    return lift_exported_modules(gm)


def _plain_parametrized_layers(gm: torch.fx.GraphModule) -> None:
    """Give each called layer whose weight is computed when it runs (``parametrizations.weight_norm``
    / ``spectral_norm``, the hook-based ``weight_norm`` / ``spectral_norm``) a plain copy holding
    that weight as inference sees it (eval mode: spectral_norm's power iteration is frozen), so
    the quantized weight is the one the layer uses and the exporter writes it as an initializer.
    The user's layer (shared by the trace) is not touched."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(str(node.target))
        hooks = [h for h in layer._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]
        if not (parametrize.is_parametrized(layer) or hooks) or not isinstance(layer, QUANTIZABLE):
            continue
        with torch.no_grad():
            values = {name: getattr(layer, name).detach().clone() for name in
                      (layer.parametrizations if parametrize.is_parametrized(layer) else ())}
            plain = copy_model(layer)
            if values:  # not remove_parametrizations: the copy shares its class, whose properties it would delete
                plain.__class__ = type(layer).__bases__[0]  # parametrize's class derives from the layer's own
                del plain._modules["parametrizations"]
                for name, value in values.items():
                    setattr(plain, name, nn.Parameter(value))
            for key, hook in list(plain._forward_pre_hooks.items()):
                if isinstance(hook, (WeightNorm, SpectralNorm)):
                    hook.remove(plain)  # the weight as a parameter (spectral_norm: no power-iteration step)
                    del plain._forward_pre_hooks[key]
        gm.set_submodule(str(node.target), plain)


def first_output_warning(kind: type, n: int) -> str:
    """:data:`MSG_FIRST_OUTPUT` for an output of type ``kind`` with ``n`` items: a namedtuple by its
    name, a list (fx records one as its ``immutable_list``) or a tuple, as the user wrote it."""
    words = (f"namedtuple {kind.__name__}" if issubclass(kind, tuple) and hasattr(kind, "_fields")
             else "list" if issubclass(kind, list) else "tuple")
    return MSG_FIRST_OUTPUT.format(kind=words, n=n)


MSG_MAPPING_OUTPUT = (
    "the model returns a {kind} (keys {keys}), not a tensor: fqexport quantizes and exports a model "
    "whose forward returns its output tensor (or a tuple that starts with it); wrap it, e.g. a module "
    "whose forward returns model(x)[{first}]"
)


def refuse_mapping_output(out: Any) -> Any:
    """``out`` unless it is a dict-like output (ModelLoadError, :data:`MSG_MAPPING_OUTPUT`: which
    value is the model's output is the user's to say)."""
    if isinstance(out, Mapping):
        keys = ", ".join(repr(k) for k in list(out)[:6])
        raise ModelLoadError(MSG_MAPPING_OUTPUT.format(kind=type(out).__name__, keys=keys,
                                                       first=repr(next(iter(out), "logits"))))
    return out


def first_output(out: Any) -> Any:
    """The output fqexport measures: the first of a tuple or list whose first item is a tensor
    (e.g. a YOLO model in eval mode returns ``(decoded, raw_maps)``), else ``out`` itself."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


# The warnings already given per model object: a model is prepared by compress, the sensitivity
# and each verification fit of a search, and each would repeat them.
_warned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _warn_once(owner: nn.Module | None, message: str) -> None:
    """``log.warning(message)`` once per ``owner`` (None: every time), never in an engine's
    worker (the search's own process says it)."""
    if in_worker():
        return
    seen = _warned.setdefault(owner, set()) if owner is not None else set()
    if message not in seen:
        seen.add(message)
        log.warning(message)


def _plain_varargs(gm: torch.fx.GraphModule) -> None:
    """``forward(self, *inputs)`` reading ``inputs[0]``: the graph takes that one tensor instead
    (fqexport feeds a batch where the traced graph wants the tuple); any other use of the
    tuple is refused (:data:`MSG_VARARGS`)."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    if first is None or not str(first.target).startswith("*"):
        return
    users = list(first.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1:] == (0,) for u in users):
        raise ModelLoadError(MSG_VARARGS.format(name=str(first.target)))
    with gm.graph.inserting_before(first):
        x = gm.graph.placeholder("x")
    for u in users:
        u.replace_all_uses_with(x)
        gm.graph.erase_node(u)
    gm.graph.erase_node(first)
    gm.recompile()


def _keep_first_output(gm: torch.fx.GraphModule, owner: nn.Module | None = None) -> None:
    """Cut a traced tuple/list output down to its first item (:func:`first_output`), so the
    reference and the ONNX file return what a deployment of the model reads (Ultralytics' and
    torchvision's ONNX exports keep the first output alike)."""
    node = next(n for n in gm.graph.nodes if n.op == "output")
    value = node.args[0]
    kind = type(value)
    if (isinstance(value, torch.fx.Node) and value.op == "call_function" and isinstance(value.target, type)
            and issubclass(value.target, tuple) and hasattr(value.target, "_fields")):
        # a namedtuple: fx records its construction as a call of the class on the items
        fields = value.target._fields[len(value.args):]
        kind = value.target
        value = tuple(value.args) + tuple(value.kwargs[f] for f in fields if f in value.kwargs)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.fx.Node):
        _warn_once(owner, first_output_warning(kind, len(value)))
        node.args = (value[0],)
        gm.graph.eliminate_dead_code()
        gm.recompile()


def decompose_attention_needed(m: nn.Module) -> bool:
    return isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder))


def _weight_params(mod: nn.Module, recurse: bool = False) -> int:
    return sum(p.numel() for p in mod.parameters(recurse=recurse) if p.dim() >= 2)


def _call_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many times each module is called in the graph (by its qualified name)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def float_layers(gm: torch.fx.GraphModule) -> list[FloatLayer]:
    """Layers of ``gm`` with a weight that fqexport cannot quantize, in graph order: leaf
    modules with parameters that are neither quantizable nor normalisation, Conv2d with a
    non-zero padding mode, and functional weight ops (``F.linear``, ``torch.matmul``…) on a
    parameter or on a weight computed from parameters alone that no layer took (graph/lift.py)."""
    modules = dict(gm.named_modules())
    out: dict[str, FloatLayer] = {}
    tied = _tied_layers(gm, modules)
    dependent = input_dependent(gm, cuts=_reads_metadata_only)  # pos(arange(ids.shape[1])): the shape only
    calls = _call_counts(gm)
    sites: dict[str, list[tuple[str, str]]] = {}  # per float layer: (op, weight read) of each call (F.linear(x, self.w) twice)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules.get(node.target)
            name = str(node.target)
            if name in tied:
                out[name] = tied[name]
            elif isinstance(mod, QUANTIZABLE) and calls[name] > 1:
                # one module, several call sites (a shared conv position encoding, a siamese branch
                # called twice): its codes are fitted for one input distribution, its activation pairs
                # placed per call; it stays float, as a weight tied between modules does
                out[name] = FloatLayer(name, f"{type(mod).__name__} called {calls[name]} times in forward()",
                                       _weight_params(mod))
            elif isinstance(mod, _CONVS) and mod.padding_mode != "zeros":
                kind = f"{type(mod).__name__}(padding_mode={mod.padding_mode!r})"
                out[name] = FloatLayer(name, kind, _weight_params(mod))
            elif isinstance(mod, nn.ConvTranspose2d) and mod.groups > 1:
                # per output channel is the weight's axis 1, only C_out/groups long: no
                # per-axis DequantizeLinear holds C_out scales
                out[name] = FloatLayer(name, f"ConvTranspose2d(groups={mod.groups})", _weight_params(mod))
            elif isinstance(mod, nn.Embedding) and node.args and node.args[0] not in dependent:
                # indices that do not depend on the input's values (``pos(torch.arange(L))``): the ONNX
                # exporter folds the lookup into a constant, leaving no table to store in integers
                out[name] = FloatLayer(name, "Embedding(constant indices)", _weight_params(mod))
            elif isinstance(mod, nn.Embedding) and mod.max_norm is not None:
                # max_norm renormalises rows in place at every lookup: not a fixed integer table
                # (``sparse`` only changes how the table's gradients are stored: quantized as any)
                out[name] = FloatLayer(name, "Embedding(max_norm)", _weight_params(mod))
            elif (not isinstance(mod, QUANTIZABLE + NORMS) and any(True for _ in mod.parameters(recurse=False))) or (
                not isinstance(mod, QUANTIZABLE) and _weight_params(mod, recurse=True)
            ):
                out[name] = FloatLayer(name, type(mod).__name__, _weight_params(mod, recurse=True))
        elif (layer := _recurrent_op_layer(gm, node)) is not None:
            out[layer.name] = layer
        elif (op := _product_op(node)) is not None:
            operands = [n for a in (*node.args, *node.kwargs.values()) for n in (a if isinstance(a, (list, tuple)) else [a])]
            if (layer := _float_weight_operand(gm, operands, f"torch.{op}")) is not None:
                out[layer.name] = layer
        elif node.op == "call_function" and node.target in _WEIGHT_FUNCS:
            # a weight fetched, or computed from parameters alone (one that stayed a call: tied...)
            op = _WEIGHT_FUNCS[node.target]
            operands = [*node.args[:2], *(node.kwargs[k] for k in ("input", "weight", "other") if k in node.kwargs)]
            if (layer := _float_weight_operand(gm, operands, f"F.{op}")) is not None:
                out[layer.name] = layer
                read = next((str(o.target) for o in operands if isinstance(o, torch.fx.Node) and o.op == "get_attr"),
                            layer.name)
                sites.setdefault(layer.name, []).append((f"F.{op}", read))
            elif op in _OPS_WITH_WEIGHT:  # a weight built from the input and parameters (CondConv)
                weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                params = [(t, p) for t in dynamic_weight_params(weight)
                          if isinstance(p := attribute(gm, t), torch.Tensor) and p.dim() >= 2]
                if params:
                    name = layer_owner(params[0][0])
                    out[name] = FloatLayer(name, f"F.{op} with a weight computed from the input",
                                           sum(int(p.numel()) for _, p in params))
    for name, calls in sites.items():  # called at several sites: said as of a module called twice
        by_weight: dict[str, list[str]] = {}
        for op, weight in calls:
            by_weight.setdefault(weight, []).append(op)
        tied = next((ops for ops in by_weight.values() if len(set(ops)) > 1), None)
        if tied is not None:  # one weight two kinds of op read: tied (an Embedding's table as the head's weight)
            read = " and ".join(dict.fromkeys(tied))
            out[name] = replace(out[name], kind=f"one weight tied between {read} ({len(tied)} calls in forward())")
        elif (n := max(len(ops) for ops in by_weight.values())) > 1 and " called " not in out[name].kind:
            out[name] = replace(out[name], kind=f"{out[name].kind} called {n} times in forward()")
    for target, param in _tables_read_directly(gm, modules):
        if layer_owner(target) not in out and target not in out:
            out[target] = FloatLayer(target, f"Parameter {tuple(param.shape)}", int(param.numel()),
                                     reason=READ_DIRECTLY)
    return list(out.values())


# aten's recurrent ops (a torch.export program runs nn.GRU / LSTM / RNN as one of these) -> the module's name
_RECURRENT_OPS = {"gru": "GRU", "lstm": "LSTM", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


def _recurrent_op_layer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> FloatLayer | None:
    """The float layer of an aten recurrent op (``aten.gru.input`` of a .pt2 program) that reads
    parameters: named after their owner (``rnn`` of ``rnn.weight_ih_l0``) and the module it runs,
    as the nn.GRU it came from is listed; None for any other node."""
    kind = _RECURRENT_OPS.get(getattr(node.target, "_opname", "")) if node.op == "call_function" else None
    if kind is None:
        return None
    flat = [n for a in node.args for n in (a if isinstance(a, (list, tuple)) else [a])]
    params = [str(n.target) for n in flat if isinstance(n, torch.fx.Node) and n.op == "get_attr"]
    if not params:
        return None
    owners = {layer_owner(t) for t in params}
    name = owners.pop() if len(owners) == 1 else params[0]
    weights = [p for t in params if isinstance(p := attribute(gm, t), torch.Tensor) and p.dim() >= 2]
    return FloatLayer(name, kind, sum(int(p.numel()) for p in weights))


def _tables_read_directly(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """``(target, Parameter)`` of each Parameter of >= 2 dims the graph fetches itself (a position
    table ``x + self.pos``, a class token, a relative-position bias table): it ships as a float32
    initializer like a float layer's weight. Parameters of a called module are its own."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    found: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or str(node.target) in found:
            continue
        param = attribute(gm, str(node.target))
        owner = str(node.target).rpartition(".")[0]
        if isinstance(param, nn.Parameter) and param.dim() >= 2 and owner not in called:
            found[str(node.target)] = param
    return list(found.items())


def _tied_layers(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> dict[str, FloatLayer]:
    """The quantizable layers called in ``gm`` whose weight is one Parameter with another's (a
    tied ``self.out.weight = self.emb.weight``, a siamese pair): one tensor cannot hold two grids,
    so each stays float, the tensor's parameters counted at the first of them."""
    by_weight: dict[int, list[str]] = {}  # id of a Parameter (each alive in its module) -> its layers
    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        # a parametrized weight is a new tensor per access (never shared): only Parameters count
        if isinstance(mod, QUANTIZABLE) and isinstance(mod._parameters.get("weight"), nn.Parameter):
            names = by_weight.setdefault(id(mod._parameters["weight"]), [])
            if str(node.target) not in names:
                names.append(str(node.target))
    out: dict[str, FloatLayer] = {}
    for names in (n for n in by_weight.values() if len(n) > 1):
        for i, name in enumerate(names):
            others = ", ".join(repr(o) for o in names if o != name)
            mod = modules[name]
            out[name] = FloatLayer(name, f"{type(mod).__name__} with its weight tied to {others}",
                                   _weight_params(mod) if i == 0 else 0)
    return out


def _product_op(node: torch.fx.Node) -> str | None:
    """The name of a matrix product node (:data:`_PRODUCT_FUNCS`, :data:`_PRODUCT_METHODS`), else None."""
    if node.op == "call_function":
        return _PRODUCT_FUNCS.get(node.target)
    return _PRODUCT_METHODS.get(node.target) if node.op == "call_method" else None


def _float_weight_operand(gm: torch.fx.GraphModule, operands: list, op: str) -> FloatLayer | None:
    """The float layer of the first operand that is a weight (a parameter or buffer of >= 2 dims,
    fetched or computed from parameters alone), named after its owner; None when no operand is."""
    for arg in operands:
        found = [(t, p) for t in parameter_weight_leaves(arg)
                 if isinstance(p := attribute(gm, t), torch.Tensor) and p.dim() >= 2]
        if found:
            target, param = found[0]
            return FloatLayer(layer_owner(target), op, int(param.numel()))
    return None


def unsupported_layers(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """``(name, type)`` of the layers that stay in float (see :func:`float_layers`)."""
    return [(l.name, l.kind) for l in float_layers(gm)]


def all_float_layers(gm: torch.fx.GraphModule, keep_float: tuple = ()) -> list[FloatLayer]:
    """Every weight layer of ``gm`` that stays float, once each: the unsupported ones
    (:func:`float_layers`; one a ``keep_float`` pattern names is recorded as kept by it: the user
    asked for it), then the quantizable ones ``keep_float`` keeps (:func:`kept_float_layers`)."""
    modules = dict(gm.named_modules())
    out: dict[str, FloatLayer] = {}
    for f in float_layers(gm):
        hit = keep_float_match(f.name, modules.get(f.name), keep_float) if keep_float else None
        out[f.name] = replace(f, reason=f"keep_float: {hit}") if hit else f
    for f in kept_float_layers(gm, keep_float):
        out.setdefault(f.name, f)
    return list(out.values())


def check_supported(gm: torch.fx.GraphModule, skip_unsupported: bool = True, owner: nn.Module | None = None,
                    keep_float: tuple = ()) -> set[str]:
    """Names of the weight layers that stay in float (:func:`all_float_layers`). The unsupported
    ones no ``keep_float`` pattern names (the user accepts those as float: a GRU kept by name
    under ``--strict``) are logged in one warning, once per ``owner`` (the user's model, which
    compress, the sensitivity and the search each prepare), or refused together with an
    UnsupportedLayerError when ``skip_unsupported`` is False (``strict``)."""
    floats = all_float_layers(gm, keep_float)
    _refuse_or_warn(gm, floats, skip_unsupported, owner)
    return {f.name for f in floats}


def _refuse_or_warn(gm: torch.fx.GraphModule, floats: Sequence[FloatLayer], skip_unsupported: bool,
                    owner: nn.Module | None) -> None:
    """:func:`check_supported`'s warning or refusal of the unsupported layers among ``floats``."""
    bad = [f for f in floats if f.reason == UNSUPPORTED]
    if not bad:
        return
    listing = ", ".join(l.describe() for l in bad)
    if not skip_unsupported:
        raise UnsupportedLayerError(MSG_UNSUPPORTED.format(count=len(bad), layers=listing))
    total = _weight_params(gm, recurse=True)
    fl = sum(l.params for l in bad)
    _warn_once(owner, MSG_FLOAT_LAYERS % (len(bad), fl, total, 100.0 * fl / max(total, 1), listing))


_BN_SIGNATURE = inspect.signature(F.batch_norm)


def _batchnorm_params(gm: torch.fx.GraphModule, node: torch.fx.Node, modules: dict[str, nn.Module]):
    """``(running_mean, running_var, weight, bias, eps)`` of an eval-mode BatchNorm node (a
    BatchNorm module or subclass, or ``F.batch_norm`` on parameters); None for anything else."""
    if node.op == "call_module":
        bn = modules.get(node.target)
        if not isinstance(bn, _BATCHNORM) or bn.training or bn.running_mean is None:
            return None
        return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    try:
        bound = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    args = bound.arguments
    if args["training"] is not False:
        return None
    tensors = []
    for key in ("running_mean", "running_var", "weight", "bias"):
        v = args[key]
        if v is None and key in ("weight", "bias"):
            tensors.append(None)
        elif isinstance(v, torch.fx.Node) and v.op == "get_attr":
            tensors.append(attribute(gm, str(v.target)))
        else:
            return None
    return (*tensors, float(args["eps"]))


def _foldable(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]):
    """``(layer node, BN node, BN params)`` of every Conv2d→BatchNorm / Linear→BatchNorm1d
    pair where the BN is the layer's only user. A Linear's output must be ``[N, features]``
    when its shape is known: on ``[N, T, features]`` a BatchNorm1d normalises the T axis, and
    folding it into the features would be wrong whenever T happens to equal their count."""
    pairs = []
    calls = _call_counts(gm)

    def alone(n: torch.fx.Node) -> bool:
        # a layer (or BN) called at another site too: folding would change that call as well; a
        # hook on either sees the tensor between the two, which folding removes
        return n.op != "call_module" or (calls.get(str(n.target), 0) <= 1 and not user_hooks(modules[n.target]))

    for node in gm.graph.nodes:
        params = _batchnorm_params(gm, node, modules)
        src = node.args[0] if node.args else None
        if params is None or not isinstance(src, torch.fx.Node) or not alone(node):
            continue
        channels = params[0].shape[0]
        if (linear := _flattened_linear(src, modules)) is not None:
            # LeViT's LinearNorm: bn(linear(x).flatten(0, 1)).reshape_as(x): the rows change, the
            # features stay the last axis, which a BatchNorm1d on [rows, features] normalises
            if alone(linear) and channels == modules[linear.target].out_features:
                pairs.append((linear, node, params))
            continue
        if (convs := _concatenated_convs(src, modules)) is not None:
            # MixNet's mixed conv: bn(cat([conv_k(x_k) ...], 1)): each conv takes its channels' slice
            if all(alone(c) for c in convs) and channels == sum(modules[c.target].out_channels for c in convs):
                start = 0
                for c in convs:
                    stop = start + modules[c.target].out_channels
                    pairs.append((c, node, tuple(p[start:stop] if isinstance(p, torch.Tensor) else p for p in params)))
                    start = stop
            continue
        if src.op != "call_module" or any(u is not node and not _reads_metadata_only(u) for u in src.users):
            continue
        layer = modules.get(src.target)
        if not alone(src):
            continue
        if isinstance(layer, _ALL_CONVS) and layer.out_channels == channels:
            pairs.append((src, node, params))
        elif isinstance(layer, nn.Linear) and layer.out_features == channels and not (
            node.op == "call_module" and not isinstance(modules[node.target], nn.BatchNorm1d)
        ) and _rank(src) in (None, 2):
            pairs.append((src, node, params))
    return pairs


def _concatenated_convs(node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[torch.fx.Node] | None:
    """The conv nodes ``node`` concatenates along the channels (``torch.cat([...], 1)``), each
    read by that cat alone (or for its shape); None for anything else."""
    if node.op != "call_function" or node.target is not torch.cat or sum(
            1 for u in node.users if not _reads_metadata_only(u)) != 1:  # timm's BatchNormAct2d reads x.ndim too
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = _rank(node)
    if not isinstance(parts, (list, tuple)) or not parts or not (dim == 1 or (rank is not None and dim == 1 - rank)):
        return None
    for c in parts:
        if not (isinstance(c, torch.fx.Node) and c.op == "call_module" and isinstance(modules.get(c.target), _ALL_CONVS)
                and all(u is node or _reads_metadata_only(u) for u in c.users)):
            return None
    return list(parts)


_ROW_RESHAPES = frozenset({"flatten", "reshape", "view"})


def _flattened_linear(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The Linear node whose output ``node`` only regroups into rows ``[rows, features]`` (a
    flatten/reshape/view keeping its last axis, shapes known from the example), each the other's
    only user; None otherwise."""
    is_reshape = (node.op == "call_method" and node.target in _ROW_RESHAPES) or (
        node.op == "call_function" and getattr(node.target, "__name__", "") in _ROW_RESHAPES)
    src = node.args[0] if is_reshape and node.args else None
    if not isinstance(src, torch.fx.Node) or src.op != "call_module" or not isinstance(modules.get(src.target), nn.Linear):
        return None
    before, after = src.meta.get("shape"), node.meta.get("shape")
    if before is None or after is None or len(after) != 2 or after[-1] != before[-1] or after[0] != math.prod(before[:-1]):
        return None
    if len(node.users) != 1 or any(u is not node and not _reads_shape_of(u, src) for u in src.users):
        return None
    return src


_AS_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})  # t.reshape_as(other): other's shape only


def _reads_shape_of(user: torch.fx.Node, src: torch.fx.Node) -> bool:
    """Whether ``user`` reads only ``src``'s shape, rank, dtype or device (``t.reshape_as(src)``)."""
    if _reads_metadata_only(user):
        return True
    return (user.op == "call_method" and user.target in _AS_METHODS and len(user.args) == 2
            and user.args[0] is not src and user.args[1] is src)


# What a use of a tensor may read without depending on its values: folding a BN into the layer
# before it changes the layer output's values, never these (timm's BatchNormAct2d asserts
# ``x.ndim == 4`` on its input, which fx records as a second user of the conv's output).
_METADATA_ATTRS = frozenset({"ndim", "shape", "dtype", "device", "is_cuda"})
_METADATA_METHODS = frozenset({"dim", "size", "ndimension", "numel", "type", "get_device"})


def _reads_metadata_only(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads only its input tensor's rank, shape, dtype or device."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS and not (
        node.target == "type" and (len(node.args) > 1 or node.kwargs))  # x.type(dtype) converts


class _OutputShapes(torch.fx.Interpreter):
    """Runs the graph once and records each tensor output's shape in ``node.meta["shape"]``
    (fx's ShapeProp prints a traceback to stderr on a failure; the caller reports its own)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
        return result


def _rank(node: torch.fx.Node) -> int | None:
    """The rank of ``node``'s output as :class:`_OutputShapes` recorded it; ``None`` when unknown."""
    shape = node.meta.get("shape")
    return None if shape is None else len(shape)


_GROUPS_ARG = 6  # F.conv1d/2d/3d(input, weight, bias, stride, padding, dilation, groups); conv_transpose2d too


def _refuse_computed_groups(gm: torch.fx.GraphModule) -> None:
    """UnsupportedLayerError for a conv call whose ``groups`` is computed from the input (timm's
    CondConv: ``groups=B``), before any work: an ONNX Conv's group is a fixed attribute, so the
    export (its batch dynamic) fails on it, after the whole solver."""
    for node in gm.graph.nodes:
        op = _WEIGHT_FUNCS.get(node.target) if node.op == "call_function" else None
        if op is None or not op.startswith("conv"):
            continue
        groups = node.kwargs.get("groups", node.args[_GROUPS_ARG] if len(node.args) > _GROUPS_ARG else 1)
        if isinstance(groups, torch.fx.Node):
            params = dynamic_weight_params(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
            where = f"layer {layer_owner(params[0])!r}" if params else f"node {node.name!r}"
            raise UnsupportedLayerError(MSG_COMPUTED_GROUPS.format(where=where, op=op))


def _unfolded_batchnorms(gm: torch.fx.GraphModule) -> list[str]:
    """``'name' (after <op>)`` of each BatchNorm left in ``gm`` after folding."""
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        if _batchnorm_params(gm, node, modules) is None:
            continue
        src = node.args[0] if node.args else None
        after = (type(modules[src.target]).__name__ if isinstance(src, torch.fx.Node) and src.op == "call_module"
                 else getattr(src.target, "__name__", str(src.target)) if isinstance(src, torch.fx.Node) else "input")
        out.append(f"'{node.target if node.op == 'call_module' else node.name}' (after {after})")
    return out


def fold_batchnorm(model: nn.Module, example: torch.Tensor | None = None) -> tuple[torch.fx.GraphModule, set[str]]:
    """Fold every Conv2d/ConvTranspose2d→BatchNorm (module, subclass or traced ``F.batch_norm``) and
    Linear→BatchNorm1d pair (eval statistics) into the layer. ``example`` (a batch of model
    inputs): the shapes that tell a Linear on ``[N, features]`` (folded) from one on a sequence
    (its BatchNorm1d stays).

    Returns the folded graph (a copy) and the names of the convs that absorbed a BN.
    """
    # symbolic_trace shares submodules with ``model``: copy so eval() and folding leave it alone.
    gm = copy.deepcopy(trace(model, example=example)).eval()  # the example: torch.export, where fx fails
    if example is not None:
        try:
            with torch.no_grad():
                _OutputShapes(gm).run(example)
        except Exception as err:  # shapes stay unknown: every pair folds as without an example
            log.debug("shape propagation for BatchNorm folding failed: %s", err)
    modules = dict(gm.named_modules())
    folded, erased = set(), set()
    for src, bn_node, (mean, var, weight, bias, eps) in _foldable(gm, modules):
        layer = modules[src.target]
        with torch.no_grad():
            if isinstance(layer, _ALL_CONVS):
                # ConvTranspose2d: output channels on the weight's axis 1 (transpose=True)
                w, b = fuse_conv_bn_weights(layer.weight, layer.bias, mean, var, eps, weight, bias,
                                            transpose=isinstance(layer, nn.ConvTranspose2d))
                folded.add(str(src.target))
            else:
                ones = torch.ones_like(mean)
                w, b = fuse_linear_bn_weights(layer.weight, layer.bias, mean, var, eps,
                                              ones if weight is None else weight,
                                              torch.zeros_like(mean) if bias is None else bias)
        layer.weight, layer.bias = w, b
        if bn_node not in erased:  # a concat's BN: once for all its convs
            bn_node.replace_all_uses_with(bn_node.args[0])  # the layer's output, its rows (a flatten), the concat
            gm.graph.erase_node(bn_node)
            erased.add(bn_node)
    for node in list(gm.graph.nodes):  # the BN's parameter fetches, now unused
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded


def quantizable_layers(
    gm: torch.fx.GraphModule, skip: set[str] = frozenset(), had_batchnorm: set[str] = frozenset()
) -> list[LayerInfo]:
    """Conv2d/Conv1d/ConvTranspose2d/Linear/Embedding layers in execution order (each called once), minus ``skip``."""
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
                "layer for one call site (weight sharing is not supported): keep it float with "
                f"--keep-float {name!r} (API: QuantConfig(keep_float=({name!r},)))"
            )
        names.add(name)
        # Conv1d is a "conv" like Conv2d: per-output-channel rows (axis 0), channels on dim 1.
        # ConvTranspose2d: output channels on the weight's axis 1 and on dim 1 of the output.
        kind = ("conv" if isinstance(mod, _CONVS) else "conv_transpose" if isinstance(mod, nn.ConvTranspose2d)
                else "embedding" if isinstance(mod, nn.Embedding) else "linear")
        seen.append(LayerInfo(name, kind, mod.weight.numel(), name in had_batchnorm))
    return seen


def run_model(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)``; a GraphModule's generated ``forward`` is called directly, so that a failure
    is only raised: torch.fx's call wrapper prints the generated code to stderr first (a
    traceback where fqexport reports the error in one line). Hooks on submodules still run."""
    if isinstance(model, torch.fx.GraphModule) and not user_hooks(model):
        return model.forward(x)
    return model(x)


def layer_batch_dims(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, int]:
    """The batch dim of each named layer's input, where it is not 0: the one dim whose size
    follows the batch's (2k for 2 samples, 3k for 3) when the model runs one sample repeated 2 and
    3 times. A sequence-first Linear (``[T, B, E]``) gets 1; a layer whose leading dim folds k rows
    per sample (Swin's windows), or whose input does not follow the batch, keeps 0. A model that
    does not run at those batch sizes keeps 0 everywhere (logged)."""
    modules = dict(model.named_modules())
    shapes: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    hooks = [modules[n].register_forward_hook(
        lambda mod, inputs, output, n=n: shapes[n].append(tuple(inputs[0].shape))) for n in names]
    one = example[:1]
    try:
        with torch.no_grad():
            for b in (2, 3):
                run_model(model, one.expand(b, *one.shape[1:]).contiguous())
    except Exception as err:  # noqa: BLE001 (a model tied to one batch size: dim 0 as before)
        log.debug("batch dims not probed (%s: %s): dim 0 for every layer", type(err).__name__, err)
        return {}
    finally:
        for h in hooks:
            h.remove()
    dims: dict[str, int] = {}
    for name, seen in shapes.items():
        if len(seen) != 2 or len(seen[0]) != len(seen[1]):
            continue
        moved = [d for d, (a, b) in enumerate(zip(*seen)) if a != b]
        if len(moved) == 1 and moved[0] > 0 and seen[0][moved[0]] * 3 == seen[1][moved[0]] * 2:
            dims[name] = moved[0]
    return dims


MSG_NO_LAYERS = "the model has no Conv2d, Conv1d, ConvTranspose2d or Linear layer to quantize"
MSG_ALL_KEPT_FLOAT = (
    "keep_float {patterns} keeps every quantizable layer of the model in float ({layers}): nothing is "
    "left to quantize; narrow the patterns (--keep-float)"
)
MSG_KEPT_FLOAT = "keep_float: %d layer(s) stay in float by request: %s"
MSG_KEEP_FLOAT_UNMATCHED = (
    "keep_float {patterns} match{s} no quantizable layer of the model, so the layer meant to stay float "
    "would be quantized (layers: {layers}); check the spelling (--keep-float: a module name, a regex over "
    "the full name, or type:ClassName)"
)


@dataclass(frozen=True)
class PreparedModel:
    """A model ready to quantize: traced, checked, BatchNorm folded, layers listed.

    Attributes:
        folded: the BN-folded graph, a copy of the model in eval mode on the CPU.
        layers: its quantizable layers in execution order (unsupported and kept-float ones left out).
        skipped: names of the weight layers left in float (unsupported, or kept by ``keep_float``).
        bn_convs: names of the convs that absorbed a BatchNorm.
        float_layers: the layers of ``skipped`` with their kind, weight parameters and reason.
    """

    folded: torch.fx.GraphModule
    layers: tuple[LayerInfo, ...]
    skipped: frozenset[str]
    bn_convs: frozenset[str]
    float_layers: tuple[FloatLayer, ...] = ()

    @property
    def float_params(self) -> int:
        """Weight parameters that stay in float (counted at 32 bits in budgets and averages)."""
        return sum(f.params for f in self.float_layers)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]


@keeps_random_state  # the layers it builds (lifted, decomposed) would draw from the caller's generator
def prepare_model(model: nn.Module, skip_unsupported: bool = True, keep_float: tuple = (),
                  example: torch.Tensor | None = None, owner: nn.Module | None = None) -> PreparedModel:
    """Trace → support check → fold BN → quantizable layers: the one model preparation of
    compress, sensitivity and the search's layer costs. ``model`` is not modified.

    A weight layer fqexport cannot quantize stays in float with a warning listing every such
    layer; with ``skip_unsupported=False`` (``QuantConfig.strict``) it raises an
    UnsupportedLayerError naming all of them. Layers ``keep_float`` selects
    (:func:`keep_float_match`) stay float too, logged with the pattern that matched. Also raises
    UnsupportedLayerError when no layer is left to quantize, and ModelLoadError when the model
    cannot be traced. ``example``: a batch of inputs for :func:`fold_batchnorm`'s shapes.
    ``owner``: the user's model when ``model`` is a copy of it (its warnings are given once per
    owner; default ``model``, which is then copied first).
    """
    mine = owner is not None and owner is not model  # the caller's own copy of the user's model
    owner = model if owner is None else owner
    unwrapped = unwrap_model(model)
    model = float32(unwrapped)  # a copy already when the model was not float32
    if not mine and model is unwrapped:  # the traced graph shares its modules: folding BN ran the user's buffers
        model = copy_model(model)
    model = model.eval()  # trace in eval mode: `self.training` is baked into the traced graph
    raw = trace(model, owner=owner, example=example)
    _refuse_computed_groups(raw)
    floats = tuple(all_float_layers(raw, tuple(keep_float)))
    _refuse_or_warn(raw, floats, skip_unsupported, owner)
    kept = [f for f in floats if f.reason.startswith("keep_float")]
    unmatched = unmatched_keep_float(raw, tuple(keep_float))
    if unmatched:  # a typo would quantize the very layer the user meant to keep float
        known = called_layers(raw)
        raise ConfigError(MSG_KEEP_FLOAT_UNMATCHED.format(
            patterns=", ".join(map(repr, unmatched)), s="" if len(unmatched) > 1 else "es",
            layers=", ".join(known[:12]) + (" …" if len(known) > 12 else "")))
    if kept:
        log.info(MSG_KEPT_FLOAT, len(kept), ", ".join(f"{k.describe()} [{k.reason}]" for k in kept))
    batch_stats = [str(n.target) for n in raw.graph.nodes if n.op == "call_module"
                   and isinstance(raw.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm)
                   and raw.get_submodule(str(n.target)).running_mean is None]
    if batch_stats:
        _warn_once(owner, MSG_BATCH_STATS.format(layers=", ".join(f"'{b}'" for b in batch_stats)))
    folded, bn_convs = fold_batchnorm(raw, example)
    folded = folded.eval().cpu()
    left = _unfolded_batchnorms(folded)
    if left:
        _warn_once(owner, MSG_UNFOLDED_BN % (len(left), ", ".join(left)))
    skipped = frozenset(f.name for f in floats)  # unsupported, or kept by keep_float
    layers = quantizable_layers(folded, skipped, bn_convs)
    tokens = [l.name for l in layers if l.kind in ("linear", "embedding")]  # a conv's batch is dim 0
    if example is not None and tokens:
        dims = layer_batch_dims(folded, example, tokens)
        layers = [replace(l, batch_dim=dims.get(l.name, 0)) for l in layers]
    if not layers:
        if kept:
            raise UnsupportedLayerError(MSG_ALL_KEPT_FLOAT.format(
                patterns=list(keep_float), layers=", ".join(k.name for k in kept)))
        raise UnsupportedLayerError(MSG_NO_LAYERS)
    return PreparedModel(folded, tuple(layers), skipped, frozenset(bn_convs),
                         floats)


def recurrent_op_layers(model: nn.Module) -> set[str]:
    """The layers of ``model``'s graph that an aten recurrent op runs (:func:`_recurrent_op_layer`)."""
    if not isinstance(model, torch.fx.GraphModule):
        return set()
    return {layer.name for node in model.graph.nodes if (layer := _recurrent_op_layer(model, node)) is not None}


def _recurrent_op_macs(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of the aten recurrent ops (:func:`_recurrent_op_layer`) of
    a graph named ``names``, from the input shapes the program recorded (``node.meta["val"]``):
    every step multiplies each weight matrix once, ``steps · Σ weights``; a symbolic length: none."""
    if not names or not isinstance(model, torch.fx.GraphModule):
        return {}
    out: dict[str, int] = {}
    for node in model.graph.nodes:
        layer = _recurrent_op_layer(model, node)
        shape = getattr(getattr(node.args[0], "meta", {}).get("val"), "shape", None) if layer else None
        if layer is None or layer.name not in names or shape is None or len(shape) not in (2, 3):
            continue
        batch_first = bool(node.args[8]) if len(node.args) > 8 else False
        steps = shape[1] if len(shape) == 3 and batch_first else shape[0]
        if isinstance(steps, int):
            out[layer.name] = out.get(layer.name, 0) + steps * layer.params
    return out


def _recurrent_macs(mod: nn.RNNBase, x: torch.Tensor) -> int:
    """Multiply-accumulates per sequence of an RNN / GRU / LSTM on input ``x`` (a packed sequence:
    0): every step, every layer and direction multiplies its input and its recurrent state by
    each gate's weights, ``gates · H · (I_l + R)``, then an LSTM's projection ``H · P``."""
    if not isinstance(x, torch.Tensor):
        return 0
    steps = int(x.shape[0] if x.dim() == 2 or not mod.batch_first else x.shape[1])  # [T, I] unbatched
    gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
    dirs = 2 if mod.bidirectional else 1
    proj = getattr(mod, "proj_size", 0)  # an LSTM's projection of h (0: none)
    state = proj or mod.hidden_size  # R: what the recurrent weights multiply
    per_step = 0
    for layer in range(mod.num_layers):
        inputs = mod.input_size if layer == 0 else state * dirs
        per_step += dirs * (gates * mod.hidden_size * (inputs + state) + mod.hidden_size * proj)
    return steps * per_step


_MAC_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.RNNBase)  # what count_macs' hook counts


def count_macs(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of each named Conv/ConvTranspose (1-3 d), Linear, RNN/GRU/LSTM or
    Embedding layer."""
    modules = dict(model.named_modules())
    macs: dict[str, int] = {}
    hooks = []

    def make_hook(name: str):
        def hook(mod, inputs, output):
            batch = max(int(inputs[0].shape[0]), 1)
            if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:  # Conv1d/2d/3d
                per_out = mod.in_channels // mod.groups * math.prod(mod.kernel_size)
                done = int(output.numel() // batch * per_out)
            elif isinstance(mod, nn.modules.conv._ConvNd):  # ConvTranspose1d/2d/3d
                # every input pixel meets C_out/G · kh · kw weights (zero-inserted pixels cost none)
                per_in = mod.out_channels // mod.groups * math.prod(mod.kernel_size)
                done = int(inputs[0].numel() // batch * per_in)
            elif isinstance(mod, nn.Embedding):
                done = 0  # a row lookup, no multiply-accumulate
            elif isinstance(mod, nn.RNNBase):
                done = _recurrent_macs(mod, inputs[0])
            else:
                done = int(output.numel() // batch * mod.in_features)
            macs[name] = macs.get(name, 0) + done  # a layer called twice computes twice

        return hook

    # a layer module is hooked; another name is a program's recurrent op (a .pt2's aten.gru, whose
    # parameters sit in a plain container module)
    hooked = [n for n in names if isinstance(modules.get(n), _MAC_LAYERS)]
    for name in hooked:
        hooks.append(modules[name].register_forward_hook(make_hook(name)))
    macs.update(_recurrent_op_macs(model, [n for n in names if n not in hooked]))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return macs
