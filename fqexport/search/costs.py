"""What each quantizable layer of a model costs: parameters, MACs per sample, output channels."""

from __future__ import annotations

import torch
from torch import nn

from fqexport.config import WeightSpec
from fqexport.graph.prepare import FloatLayer, count_macs, prepare_model
from fqexport.model import weight_rows
from fqexport.search.allocation import LayerCost


def model_costs(model: nn.Module, example: torch.Tensor,
                weights: WeightSpec) -> tuple[list[LayerCost], tuple[FloatLayer, ...]]:
    """Params, MACs per sample and output channels of each layer ``weights`` quantizes (BN
    folded; unsupported and ``keep_float`` layers left out), and the weight layers that stay
    float (their parameters count at 32 bits). ``example``: a batch of two samples, as ``compress`` traces with (torch.export,
    the fallback of a model fx cannot trace, fixes a batch of one as a constant); the MACs are
    counted on its first sample."""
    prepared = prepare_model(model, weights.skip_unsupported, weights.keep_float, example=example)
    macs = count_macs(prepared.folded, example[:1], prepared.names)
    modules = dict(prepared.folded.named_modules())
    # output channels: one scale each (a ConvTranspose2d's are on its weight's axis 1)
    costs = [LayerCost(i.name, i.params, macs.get(i.name, 0), weight_rows(i.kind, modules[i.name].weight).shape[0],
                       i.kind) for i in prepared.layers]
    return costs, prepared.float_layers


def layer_costs(model: nn.Module, example: torch.Tensor, skip_unsupported: bool = False) -> list[LayerCost]:
    """:func:`model_costs` of every quantizable layer (``skip_unsupported`` as in ``QuantConfig``)."""
    return model_costs(model, example, WeightSpec(strict=not skip_unsupported))[0]
