"""Fairness-aware fine-tuning after PTQ: learnable steps with straight-through rounding on the
export's grids, natural / group-balanced / core-set sampling, distillation from the float model
with plain, group-weighted or worst-group (group DRO) objectives."""

from fqexport.finetune.config import FinetuneConfig
from fqexport.finetune.api import finetune, finetune_widths

__all__ = ["FinetuneConfig", "finetune", "finetune_widths"]
