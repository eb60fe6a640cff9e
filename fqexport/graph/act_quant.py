"""Activation quantization points: where QuantizeLinear→DequantizeLinear pairs go, and the
PyTorch fake-quant module that both calibrates them and is the reference the export must match.

Placement follows what ONNX Runtime fuses into integer kernels (ORT-NOTES.md): a pair on every
input and every output of Conv/Linear and residual adds; an output followed by a ReLU gets its
pair after the ReLU (ORT then drops the ReLU). The model's final output is left in float.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx
from torch import nn

from fqexport.quant.grid import act_qparams, fake_quantize_act


@torch.library.custom_op("fqexport::act_qdq", mutates_args=())
def act_qdq(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8 per-tensor fake quantization; exported as QuantizeLinear→DequantizeLinear."""
    return fake_quantize_act(x, scale, zero_point)


@act_qdq.register_fake
def _act_qdq_fake(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(x)


def _ste_setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, scale, zero_point = inputs
    ctx.save_for_backward(x)
    ctx.scale = float(scale)
    ctx.zero_point = int(zero_point)


def _ste_backward(ctx, grad: torch.Tensor):
    # Clipped straight-through estimator, torch.fake_quantize's rule:
    # d qdq(x)/dx = 1[0 <= round(x/s) + z <= 255].
    (x,) = ctx.saved_tensors
    q = torch.round(x / ctx.scale) + ctx.zero_point
    return grad * ((q >= 0) & (q <= 255)).to(grad.dtype), None, None


act_qdq.register_autograd(_ste_backward, setup_context=_ste_setup_context)


class GroupContext:
    """The group ids of the batch being run, shared by every observer of a model."""

    def __init__(self) -> None:
        self.group: torch.Tensor | None = None


class ActQuantizer(nn.Module):
    """A quantization point: observes ranges while calibrating, fake-quantizes afterwards."""

    def __init__(self, make_observer: Callable[[], object], context: GroupContext) -> None:
        super().__init__()
        self.observer = make_observer()
        self.context = context
        self.observing = True
        self.scale = 1.0
        self.zero_point = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            group = self.context.group
            if group is None:
                group = torch.zeros(x.shape[0], dtype=torch.long)
            self.observer.observe(x.detach(), group)
            return x
        return act_qdq(x, self.scale, self.zero_point)

    def freeze(self) -> None:
        """Fix (scale, zero point) from the observed range and switch to fake quantization."""
        lo, hi = self.observer.range()
        self.scale, self.zero_point = act_qparams(lo, hi)
        self.observing = False

    def extra_repr(self) -> str:
        return "observing" if self.observing else f"scale={self.scale:.6g}, zero_point={self.zero_point}"


_RELU_FUNCS = {torch.relu, torch.nn.functional.relu, torch.ops.aten.relu.default}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor}


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        return sum(isinstance(a, torch.fx.Node) for a in node.args[:2]) == 2
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) >= 2 and all(
        isinstance(a, torch.fx.Node) for a in node.args[:2]
    )


def _quantized_inputs(node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[torch.fx.Node]:
    """Tensor inputs of ``node`` that must arrive quantized (empty for other ops)."""
    if node.op == "call_module" and isinstance(modules.get(node.target), (nn.Conv2d, nn.Linear)):
        return [node.args[0]] if isinstance(node.args[0], torch.fx.Node) else []
    if _is_add(node):
        return [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    return []


def insert_act_quantizers(
    gm: torch.fx.GraphModule,
    make_observer: Callable[[], object],
    layers: set[str],
) -> tuple[GroupContext, dict[str, ActQuantizer]]:
    """Insert ``ActQuantizer`` modules into ``gm`` (in place) at the ORT fusion points.

    ``layers`` names the Conv/Linear modules that are quantized (others stay float and get no
    pairs). Returns the shared group context and the inserted quantizers by module name.
    """
    modules = dict(gm.named_modules())
    context = GroupContext()
    quantizers: dict[str, ActQuantizer] = {}

    def quantized_op(node: torch.fx.Node) -> bool:
        if node.op == "call_module" and node.target in layers:
            return True
        return _is_add(node) and bool(layers)

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
        if not any(u.op == "output" for u in out.users):
            targets.append(out)
        targets.extend(_quantized_inputs(node, modules))

    done: set[torch.fx.Node] = set()
    for target in targets:
        if target in done:
            continue
        done.add(target)
        name = f"act_quant_{len(quantizers)}"
        quantizer = ActQuantizer(make_observer, context)
        gm.add_submodule(name, quantizer)
        with gm.graph.inserting_after(target):
            qnode = gm.graph.call_module(name, (target,))
        target.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        quantizers[name] = quantizer
    gm.graph.lint()
    gm.recompile()
    return context, quantizers
