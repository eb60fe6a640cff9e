"""What each quantizable layer of a model costs: parameters, MACs per sample, output channels."""

from __future__ import annotations

import torch
from torch import nn

from fqexport.graph.prepare import count_macs, prepare_model
from fqexport.search.allocation import LayerCost


def layer_costs(model: nn.Module, example: torch.Tensor, skip_unsupported: bool = False) -> list[LayerCost]:
    """Params, MACs per sample and output channels of each quantizable layer (BN folded;
    ``skip_unsupported`` as in ``QuantConfig``)."""
    prepared = prepare_model(model, skip_unsupported)
    macs = count_macs(prepared.folded, example, prepared.names)
    modules = dict(prepared.folded.named_modules())
    return [LayerCost(i.name, i.params, macs.get(i.name, 0), int(modules[i.name].weight.shape[0]), i.kind)
            for i in prepared.layers]
