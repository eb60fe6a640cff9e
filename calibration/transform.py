"""The user's ``transform`` of ``load_data(source, transform=...)``, applied to x batch by batch.

``transform(x)`` takes a torch tensor ``[B, ...]`` (the source's dtype; float32 CHW in [0, 1] for
a CSV manifest's images) and returns a tensor or array ``[B, ...]``: each batch of a DataLoader,
each sample of a Dataset or CSV manifest as a batch of one (so that images of different sizes
can be resized before they are stacked). It must treat the samples of a batch independently
(resize, normalise: the mean/std the model was trained with).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from fqexport.errors import DataError

from .checks import data_error
from .dataset import to_numpy

MSG_TRANSFORM = "sample {index}: transform failed: {kind}: {err}"
MSG_TRANSFORM_SHAPE = (
    "sample {index}: transform returned shape {got} for a batch of {n}; it must return [batch, ...] "
    "(it is called on x with a batch dimension first)"
)


def apply_transform(transform: Callable[[torch.Tensor], Any], x: np.ndarray, index: int, source: str) -> np.ndarray:
    """``transform`` of the batch ``x`` ``[B, ...]`` whose first sample is ``index`` in ``source``,
    as a numpy array; its failure or a lost batch dimension is a DataError naming the sample."""
    try:
        out = transform(torch.from_numpy(np.ascontiguousarray(x)))
    except DataError:
        raise
    except Exception as err:  # the user's transform, named by the sample it failed on
        raise data_error(source, MSG_TRANSFORM.format(index=index, kind=type(err).__name__, err=err)) from err
    arr = to_numpy(out)
    if arr.ndim < 1 or arr.shape[0] != x.shape[0]:
        raise data_error(source, MSG_TRANSFORM_SHAPE.format(index=index, got=arr.shape, n=x.shape[0]))
    return arr
