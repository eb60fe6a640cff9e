"""The calibration batch size that keeps one batch's activations bounded.

``QuantConfig.batch_size`` (64) samples of a megapixel image give GB-sized layer outputs, and a
calibration pass holds a few of them at once (a layer's output, its statistics, the next layer's
input). :func:`calibration_batch_size` lowers the batch until the largest activation of one batch
(one node's output) fits :data:`MAX_BATCH_ACTIVATION_BYTES`; batches of small inputs (a 224×224
ResNet-50: 3.2 MB per sample at its largest) keep the requested size, and so their results.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import fx

from fqexport.graph.decode import leaves

log = logging.getLogger(__name__)

# The largest activation one calibration batch may hold (a single node's output, all its samples).
MAX_BATCH_ACTIVATION_BYTES = 256 * 2**20

MSG_SMALLER_BATCH = (
    "calibration batches of %d samples instead of batch_size=%d: one sample's largest activation (%s) is "
    "%.1f MB, and a batch keeps its activations under %d MB"
)


class _LargestOutput(fx.Interpreter):
    """Runs the graph (values freed after their last use) and keeps its largest node output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.largest = (0, "")

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        items = leaves(list(out.values()) if isinstance(out, Mapping) else out)
        size = sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
        if n.op != "placeholder" and size > self.largest[0]:
            self.largest = (size, n.name)
        return out


def calibration_batch_size(gm: fx.GraphModule, sample: torch.Tensor, requested: int) -> int:
    """``requested``, or fewer samples when one sample's (``sample``: a batch of one) largest
    activation times ``requested`` exceeds :data:`MAX_BATCH_ACTIVATION_BYTES` (at least 1).
    A graph that cannot run one sample keeps ``requested`` (the passes report their own errors)."""
    probe = _LargestOutput(gm)
    try:
        with torch.no_grad():
            probe.run(sample)
    except Exception as err:  # noqa: BLE001 - a probe only; compress's own passes raise the clear error
        log.debug("batch memory probe failed (%s: %s); batch_size stays %d", type(err).__name__, err, requested)
        return requested
    per_sample, node = probe.largest
    if per_sample * requested <= MAX_BATCH_ACTIVATION_BYTES:
        return requested
    batch = max(1, MAX_BATCH_ACTIVATION_BYTES // max(per_sample, 1))
    log.info(MSG_SMALLER_BATCH, batch, requested, node, per_sample / 2**20, MAX_BATCH_ACTIVATION_BYTES // 2**20)
    return int(batch)
