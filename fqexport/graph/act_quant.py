"""Activation quantization points: where QuantizeLinear→DequantizeLinear pairs go, and the
PyTorch fake-quant module that both calibrates them and is the reference the export must match.

Placement follows what ONNX Runtime fuses into integer kernels (ORT-NOTES.md): a pair on every
input and every output of Conv/Linear and residual adds; an output followed by a ReLU (or ReLU6)
gets its pair after it (ORT then drops the ReLU / Clip). The model's final output is left in
float. A residual add is an add of two activations that both depend on the model input; an add
of a parameter, buffer or constant (``x + self.pos_embedding``) is not one and stays float.
Attention's activation MatMuls (Q·Kᵀ, softmax·V) and normalisation layers stay float.

Two schemes (chosen in compress from ``QuantConfig.target``): CPU targets get uint8 asymmetric
pairs; ``symmetric`` (the GPU target) gets int8 pairs with zero point 0 (S8S8, what TensorRT's
importer and ORT's CUDA EP accept), and there a conv reading an explicit Pad (``F.pad``,
``nn.ZeroPad2d``, …) gets its pair before the Pad, not between Pad and Conv (a zero point of 0
pads with code 0, so the two orders compute the same). Layers in ``weight_only`` (INT4 blocked
weights that ORT's CUDA EP runs as MatMulNBits, a weight-only kernel with float activations) get
no pairs of their own and read their input in float.

ONNX Runtime's optimized session stores each quantized Conv/Linear bias as int32 in steps of
s_x·s_w[c] (``WeightBiasQuantization``, what lets it fuse QLinearConv/QGemm): the reference
rounds its biases the same way (:func:`round_biases_to_int32_grid`), so the reference, the
exported graph and every ORT kernel compute with the same bias.
"""

from __future__ import annotations

import copy
import operator
from contextlib import contextmanager
from typing import Callable, Collection, Iterator, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fqexport.errors import UnsupportedLayerError
from fqexport.quant.grid import act_code_range, act_qparams, fake_quantize_act

# Modules whose input gets a Q/DQ pair when quantized (ORT fuses QLinearConv / QGemm /
# MatMulInteger on them); Conv1d exports as a 1-D ONNX Conv. ConvTranspose2d gets its pairs the
# same way (ORT 1.32 CPU fuses no QLinearConvTranspose: it runs a float ConvTranspose on the
# dequantized tensors, with the bias still rounded to int32 by WeightBiasQuantization).
INTEGER_KERNEL_LAYERS = (nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d, nn.Linear)


@torch.library.custom_op("fqexport::act_qdq", mutates_args=())
def act_qdq(x: torch.Tensor, scale: float, zero_point: int, symmetric: bool = False) -> torch.Tensor:
    """Per-tensor fake quantization, uint8 (or with ``symmetric`` int8, zero point 0); exported as
    QuantizeLinear→DequantizeLinear."""
    return fake_quantize_act(x, scale, zero_point, symmetric)


@act_qdq.register_fake
def _act_qdq_fake(x: torch.Tensor, scale: float, zero_point: int, symmetric: bool = False) -> torch.Tensor:
    return torch.empty_like(x)


def _ste_setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, scale, zero_point = inputs[:3]
    ctx.save_for_backward(x)
    ctx.scale = float(scale)
    ctx.zero_point = int(zero_point)
    ctx.codes = act_code_range(bool(inputs[3]) if len(inputs) > 3 else False)


def _ste_backward(ctx, grad: torch.Tensor):
    # Clipped straight-through estimator, torch.fake_quantize's rule:
    # d qdq(x)/dx = 1[qmin <= round(x/s) + z <= qmax].
    (x,) = ctx.saved_tensors
    q = torch.round(x / ctx.scale) + ctx.zero_point
    qmin, qmax = ctx.codes
    return grad * ((q >= qmin) & (q <= qmax)).to(grad.dtype), None, None, None


act_qdq.register_autograd(_ste_backward, setup_context=_ste_setup_context)


class GroupContext:
    """The group ids of the batch being run, shared by every observer of a model."""

    def __init__(self) -> None:
        self.group: torch.Tensor | None = None


class ActQuantizer(nn.Module):
    """A quantization point: observes ranges while calibrating, fake-quantizes afterwards."""

    def __init__(self, make_observer: Callable[[], object], context: GroupContext, symmetric: bool = False) -> None:
        super().__init__()
        self.observer = make_observer()
        self.context = context
        self.observing = True
        self.scale = 1.0
        self.zero_point = 0
        self.symmetric = symmetric  # int8 with zero point 0 (GPU), else uint8 asymmetric

    @property
    def codes(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the codes: uint8 ``(0, 255)`` or symmetric int8 ``(-128, 127)``."""
        return act_code_range(self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            group = self.context.group
            if group is None:
                group = torch.zeros(x.shape[0], dtype=torch.long)
            self.observer.observe(*_batch_first(x.detach(), group))
            return x
        jitter = getattr(self, "jitter", 0.0)  # (modules pickled before it have none)
        if jitter:  # move each value by up to ±jitter steps: what rounds at a tie may round the other way
            gen = getattr(self, "jitter_generator", None)
            noise = torch.rand(x.shape, dtype=x.dtype, generator=gen).to(x.device) if gen is not None else \
                torch.rand_like(x)
            x = x + (noise * 2 - 1) * (jitter * float(self.scale))
        if self.symmetric:
            return act_qdq(x, self.scale, self.zero_point, True)
        return act_qdq(x, self.scale, self.zero_point)

    def freeze(self) -> None:
        """Fix (scale, zero point) from the observed range and switch to fake quantization."""
        lo, hi = self.observer.range()
        self.scale, self.zero_point = act_qparams(lo, hi, self.symmetric)
        self.observing = False

    def extra_repr(self) -> str:
        if self.observing:
            return "observing"
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}" + (", int8 symmetric" if self.symmetric else "")


@contextmanager
def rounding_jitter(model: nn.Module, steps: float, seed: int = 0) -> Iterator[nn.Module]:
    """A copy of ``model`` in which every :class:`ActQuantizer` moves its input by a uniform
    ±``steps`` quantization steps before rounding: only values within ``steps`` of a rounding tie
    change code. ONNX Runtime's kernels and the reference differ exactly there (the
    requantization's float rounding, ~1e-5 step), so an output that moves under this jitter is one
    the file may compute differently without any op being wrong. The draws come from one
    generator seeded with ``seed``, not torch's global one, and ``model`` itself is not touched:
    the caller's random stream and another thread running ``model`` meanwhile are left alone
    (setting the jitter on the shared quantizers and reseeding the global generator had moved
    both)."""
    shaken = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(int(seed))
    for q in shaken.modules():
        if isinstance(q, ActQuantizer):
            q.jitter, q.jitter_generator = float(steps), gen
    yield shaken


def _batch_first(x: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, group)`` with the batch dimension of ``x`` first, for the observer.

    Sequence-first layouts (``nn.MultiheadAttention(batch_first=False)``) carry the batch in
    dim 1: that dim is moved to the front. A tensor with no dim of the batch's size (a
    parameter-derived one) counts once for every group of the batch.
    """
    n = int(group.numel())
    if x.dim() > 0 and x.shape[0] == n:
        return x, group
    for d in range(1, x.dim()):
        if x.shape[d] == n:
            return x.movedim(d, 0), group
    present = torch.unique(group)
    return x.unsqueeze(0).expand(len(present), *x.shape), present


_RELU_FUNCS = {
    torch.relu, torch.relu_, torch.nn.functional.relu, torch.ops.aten.relu.default,
    torch.ops.aten.relu_.default,
}
_RELU6_FUNCS = {torch.nn.functional.relu6, torch.ops.aten.relu6.default}
_HARDTANH_FUNCS = {torch.nn.functional.hardtanh, torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
# Explicit padding (exported as an ONNX Pad): its conv's pair goes before it on the GPU target.
_PAD_MODULES = (
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
_PAD_FUNCS = {torch.nn.functional.pad, torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default}


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A ReLU, or a ReLU6 / hardtanh(0, 6) (ONNX Clip(0, 6)): ops whose output starts at 0,
    so a uint8 pair after them has zero point 0 and ORT drops the op."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        return isinstance(mod, (nn.ReLU, nn.ReLU6)) or (
            isinstance(mod, nn.Hardtanh) and mod.min_val == 0.0 and mod.max_val > 0.0
        )
    if node.op == "call_function":
        if node.target in _RELU_FUNCS or node.target in _RELU6_FUNCS:
            return True
        if node.target in _HARDTANH_FUNCS:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            return lo == 0.0
        return False
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_pad(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An explicit pad of its first argument (``F.pad``, ``nn.ZeroPad2d``, reflection, …)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _PAD_MODULES)
    return node.op == "call_function" and node.target in _PAD_FUNCS and isinstance(node.args[0], torch.fx.Node)


def input_dependent(gm: torch.fx.GraphModule,
                    cuts: Callable[[torch.fx.Node], bool] | None = None) -> set[torch.fx.Node]:
    """Nodes whose value depends on the model input (a placeholder); parameters, buffers,
    constants and anything computed only from them are not, nor (given ``cuts``) a node it
    marks and what only such nodes feed (a read of the input's shape: a value that follows the
    input's shape, not its values)."""
    dep: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (not (cuts and cuts(node)) and any(a in dep for a in node.all_input_nodes)):
            dep.add(node)
    return dep


_SOFTMAX_FUNCS = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}
# ops between attention scores and their softmax that keep them scores (scaling, more masks, casts)
_SCORE_FUNCS = {*_ADD_FUNCS, operator.sub, operator.mul, operator.truediv, torch.mul, torch.div,
                torch.masked_fill, F.dropout}
_SCORE_METHODS = {"add", "add_", "sub", "mul", "div", "masked_fill", "masked_fill_", "float", "to", "type"}


def _is_softmax(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), (nn.Softmax, nn.LogSoftmax))
    return (node.op == "call_function" and node.target in _SOFTMAX_FUNCS) or (
        node.op == "call_method" and node.target in ("softmax", "log_softmax"))


def _feeds_softmax(node: torch.fx.Node, modules: dict[str, nn.Module], depth: int = 4) -> bool:
    """Whether ``node`` reaches a softmax through at most ``depth`` score-preserving ops (scaling,
    mask adds, casts, dropout): attention scores, which stay float (docs/model-support.md)."""
    for user in node.users:
        if _is_softmax(user, modules):
            return True
        passes = (user.op == "call_function" and user.target in _SCORE_FUNCS) or (
            user.op == "call_method" and user.target in _SCORE_METHODS) or (
            user.op == "call_module" and isinstance(modules.get(user.target), nn.Dropout))
        if passes and depth > 1 and _feeds_softmax(user, modules, depth - 1):
            return True
    return False


def _is_add(node: torch.fx.Node, dependent: set[torch.fx.Node] | None = None,
            modules: dict[str, nn.Module] | None = None) -> bool:
    """A residual add: two activations (both input-dependent when ``dependent`` is given). With
    ``modules``, an add on the way to a softmax is not one: a mask added to attention scores
    (``s + pad * -1e4``), which stay float — a uint8 grid over [-1e4, max] zeroes every score."""
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        args = node.args[:2]
    elif node.op == "call_method" and node.target in ("add", "add_") and len(node.args) >= 2:
        args = node.args[:2]
    else:
        return False
    if len(args) < 2 or not all(isinstance(a, torch.fx.Node) for a in args):
        return False
    if dependent is not None and not all(a in dependent for a in args):
        return False
    return modules is None or not _feeds_softmax(node, modules)


# Weight ops ORT's WeightBiasQuantization quantizes itself when their input comes from a
# DequantizeLinear (per-tensor int8 weights; MatMul is not among them): a layer fqexport keeps
# float (keep_float, a layer called twice, a tied weight) must read the float tensor, not a pair.
_FLOAT_WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                         nn.ConvTranspose3d, nn.Linear)
_FLOAT_WEIGHT_FUNCS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                       torch.addmm}


def _float_weight_op(node: torch.fx.Node, modules: dict[str, nn.Module], layers: Collection[str]) -> bool:
    """A Conv/ConvTranspose/Linear that stays float: a module not in ``layers``, or the function."""
    if node.op == "call_module":
        return node.target not in layers and isinstance(modules.get(node.target), _FLOAT_WEIGHT_MODULES)
    return node.op == "call_function" and node.target in _FLOAT_WEIGHT_FUNCS


def _quantized_inputs(node: torch.fx.Node, modules: dict[str, nn.Module], dependent: set[torch.fx.Node],
                      before_pad: bool = False) -> list[torch.fx.Node]:
    """Tensor inputs of ``node`` that must arrive quantized (empty for other ops); with
    ``before_pad`` a weight layer reading explicit pads has the pads' input quantized instead."""
    if node.op == "call_module" and isinstance(modules.get(node.target), INTEGER_KERNEL_LAYERS):
        src = node.args[0]
        while before_pad and isinstance(src, torch.fx.Node) and _is_pad(src, modules):
            src = src.args[0]
        return [src] if isinstance(src, torch.fx.Node) else []
    if _is_add(node, dependent, modules):
        return [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    return []


def insert_act_quantizers(
    gm: torch.fx.GraphModule,
    make_observer: Callable[[], object],
    layers: set[str],
    *,
    symmetric: bool = False,
    weight_only: Collection[str] = (),
    float_tail: Collection[torch.fx.Node] | None = None,
) -> tuple[GroupContext, dict[str, ActQuantizer]]:
    """Insert ``ActQuantizer`` modules into ``gm`` (in place) at the ORT fusion points.

    ``layers`` names the Conv/Linear modules that are quantized (others stay float and get no
    pairs). ``symmetric``: int8 pairs with zero point 0, a conv's pair before its explicit Pad
    (the GPU target); else uint8 pairs. ``weight_only``: quantized layers that read and write
    float activations (no pairs of their own; a pair another op needs on their input is not
    theirs). ``float_tail``: the ops after the last weight layers that stay float
    (:func:`fqexport.graph.float_tail.float_tail`, a detector's box decode): none of them is
    quantized, they read their inputs float, and a weight layer's output that only they read gets
    no pair (None: only the model's own output stays float). Returns the shared group context and
    the inserted quantizers by module name.
    """
    modules = dict(gm.named_modules())
    context = GroupContext()
    quantizers: dict[str, ActQuantizer] = {}
    dependent = input_dependent(gm)
    weight_only = set(weight_only)
    tail = set(float_tail) if float_tail is not None else set()

    def quantized_op(node: torch.fx.Node) -> bool:
        if node in tail:
            return False
        if node.op == "call_module" and node.target in layers:
            # an Embedding's Gather gets no pair: its float rows feed the next quantized op's input pair
            return isinstance(modules.get(node.target), INTEGER_KERNEL_LAYERS) and node.target not in weight_only
        return _is_add(node, dependent, modules) and bool(layers)

    def reads_float(user: torch.fx.Node) -> bool:
        return (user.op == "call_module" and user.target in weight_only) or user in tail or _float_weight_op(
            user, modules, layers)

    def only_to_output(n: torch.fx.Node, depth: int = 4) -> bool:
        """Whether every path from ``n`` reaches the model's output through a few ops none of which
        is quantized or a module with weights (a temperature ``z / T``, a cast, a softmax)."""
        for u in n.users:
            if u.op == "output":
                continue
            if depth == 0 or quantized_op(u) or (u.op == "call_module" and (
                    u.target in layers or any(True for _ in modules[u.target].parameters()))) \
                    or not only_to_output(u, depth - 1):
                return False
        return bool(n.users)

    def stays_float(out: torch.fx.Node, producer: torch.fx.Node) -> bool:
        if float_tail is not None:
            return all(u in tail for u in out.users)
        if any(u.op == "output" for u in out.users):
            return True
        # a Linear's logits behind a temperature, a cast or a softmax (survey 84: z / 2 put 1000 logits on
        # ~131 uint8 levels): ORT's QGemm writes float; a conv has no float-output integer kernel, and its
        # output keeps its pair (review: the last conv of a pooled head ran as a float conv)
        return isinstance(modules.get(producer.target), nn.Linear) and only_to_output(out)

    # 1. Tensors to quantize: outputs of quantized ops (after a sole ReLU user), and inputs.
    targets: list[torch.fx.Node] = []
    for node in list(gm.graph.nodes):
        if not quantized_op(node):
            continue
        out = node
        users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], modules):
            out = users[0]
        # The model's own output (the logits) stays float: a uint8 grid over the logit range
        # ties close logits and flips top-1 decisions (measured on the demo: the minority lost
        # 2 pt at W8A8 from this pair alone); ORT runs the last Gemm with a float output.
        if not stays_float(out, node):
            targets.append(out)
        targets.extend(_quantized_inputs(node, modules, dependent, before_pad=symmetric))

    done: set[torch.fx.Node] = set()
    for target in targets:
        if target in done or all(reads_float(u) for u in target.users):
            continue  # (a pair that only float readers would read is not placed)
        done.add(target)
        name = f"act_quant_{len(quantizers)}"
        quantizer = ActQuantizer(make_observer, context, symmetric)
        gm.add_submodule(name, quantizer)
        with gm.graph.inserting_after(target):
            qnode = gm.graph.call_module(name, (target,))
        target.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode and not reads_float(user))
        quantizers[name] = quantizer
    gm.graph.lint()
    gm.recompile()
    return context, quantizers


MSG_BIAS_INT32 = (
    "layer {name!r}: its bias (channel {channel}: {bias:.4g}) is {steps:.3g} steps of the int32 grid ONNX Runtime "
    "adds it on (input scale x weight scale = {step:.3g}), past int32: the integer kernel cannot hold it, and "
    "clamped the layer would compute another function; keep it float (--keep-float {name}; API: "
    "keep_float=({name!r},))"
)


INT32_MAX = 2**31 - 1


def bias_input_scales(gm: torch.fx.GraphModule, names: Collection[str]) -> dict[str, tuple[torch.Tensor, float]]:
    """``{layer: (its float32 bias, its input's scale s_x)}`` for the layers of ``names`` that have
    a bias and read a frozen :class:`ActQuantizer`: what ORT puts on the int32 grid s_x·s_w."""
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        layer = modules[node.target]
        src = node.args[0] if node.args else None
        quant = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if getattr(layer, "bias", None) is None or not isinstance(quant, ActQuantizer) or quant.observing:
            continue
        out[str(node.target)] = (layer.bias.detach().float().cpu(), float(quant.scale))
    return out


def round_biases_to_int32_grid(gm: torch.fx.GraphModule, weight_scales: Mapping[str, torch.Tensor]) -> list[str]:
    """Round the bias of each quantized layer of ``gm`` to the int32 grid ORT uses (in place).

    For a layer named in ``weight_scales`` (its per-output-channel weight scales s_w) whose
    input comes from a frozen :class:`ActQuantizer` (scale s_x): b ← round(b / (s_x·|s_w|)) ·
    s_x·|s_w|, in float32 as ORT computes it. Idempotent. Returns the names of the rounded layers.
    A bias past int32 on that grid is an UnsupportedLayerError naming the layer (:data:`MSG_BIAS_INT32`).
    """
    modules = dict(gm.named_modules())
    rounded = []
    for name, (b, s_x) in bias_input_scales(gm, weight_scales).items():
        layer = modules[name]
        with torch.no_grad():
            s_w = weight_scales[name].detach().float().abs().cpu()
            step = torch.tensor(s_x, dtype=torch.float32) * s_w
            q = torch.where(step > 0, torch.round(b / torch.where(step > 0, step, 1.0)), 0.0)
            if bool((q.abs() > INT32_MAX).any()):  # clamped, the layer would compute another function
                c = int(q.abs().argmax())
                raise UnsupportedLayerError(MSG_BIAS_INT32.format(
                    name=name, steps=float(q.abs()[c]), step=float(step[c]), bias=float(b[c]), channel=c))
            new = torch.where(step > 0, q * step, b)
            layer.bias.copy_(new.to(layer.bias.device, layer.bias.dtype))
        rounded.append(name)
    return rounded
