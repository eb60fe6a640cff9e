"""Fairness-aware fine-tuning after PTQ: learnable steps with straight-through rounding on the
export's grids, natural / group-balanced / core-set sampling, distillation from the float model
with plain, group-weighted or worst-group (group DRO) objectives.

The public names are top-level: ``fqexport.finetune``, ``fqexport.finetune_widths``,
``fqexport.FinetuneConfig`` (defined in :mod:`fqexport.finetune.api` and
:mod:`fqexport.finetune.config`). This package re-exports nothing, so that reading
``FinetuneConfig``'s defaults (the CLI's ``--help``) does not import torch."""
