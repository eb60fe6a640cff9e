"""A bytes budget counts the written ONNX file: the allocator starts from an estimate of the
file's bytes outside the layers' weights (:func:`file_overhead_estimate`), and
:func:`fit_file_budget` checks the file the result writes and, while it is larger than the budget,
refits the next smaller allocation with the measured non-weight bytes.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fqexport.config import MixedPrecisionConfig
from fqexport.errors import ConfigError
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.search.allocation import Allocation, LayerCost
from fqexport.search.candidates import Candidate

log = logging.getLogger(__name__)

# Bytes of an exported file outside the layers' weights (graph, fp32 biases, activation Q/DQ
# parameters, metadata): a first estimate for a bytes budget; the written size is then checked.
# After exporters/compact.py, the demo SmallResNet's search result (10 layers, 346 output
# channels) had 13.3-13.6 KB outside its weights: ~0.7 KB of nodes and activation Q/DQ parameters
# per layer, the fp32 biases, ~4-5 KB of metadata (with the allocation record), inputs and opsets.
OVERHEAD_BASE_BYTES = 5500
OVERHEAD_LAYER_BYTES = 700
MAX_BYTES_REFITS = 3
MSG_BYTES_BUDGET = (
    "budget_bytes={budget:g} cannot be met: the file written took {size} bytes (weights {weights} + graph "
    "and metadata {overhead}), and no allocation of bit_choices={choices} fits its weights in the "
    "{room} bytes left; raise --budget-bytes{hint}"
)
MSG_BYTES_REFITS = (
    "budget_bytes={budget:g}: after {refits} refits the file written still took {size} bytes (weights "
    "{weights} + graph and metadata {overhead}); raise --budget-bytes"
)


def file_overhead_estimate(layers: Sequence[LayerCost]) -> float:
    """A first estimate of an export's bytes outside the layers' weights: fp32 biases (4 bytes
    per channel) plus :data:`OVERHEAD_LAYER_BYTES` per layer and :data:`OVERHEAD_BASE_BYTES`."""
    return float(OVERHEAD_BASE_BYTES + sum(OVERHEAD_LAYER_BYTES + 4 * l.channels for l in layers))


def written_size(cm: Any) -> int:
    """Bytes of ``cm``'s ONNX file as the export writes it (a temporary export, unchecked)."""
    with tempfile.TemporaryDirectory(prefix="fqexport-size-") as tmp:
        return int(export_qdq(cm, Path(tmp) / "size.onnx", check=False).size_bytes)


@dataclass
class BytesFit:
    """What :func:`fit_file_budget` returns: the candidate and its model, the refits it took, and
    what it did in words (``None`` when the first file fitted)."""

    candidate: Candidate
    model: Any
    refits: int
    note: str | None


def fit_file_budget(
    best: Candidate,
    chosen: Any,
    candidates: list[Candidate],
    mp: MixedPrecisionConfig,
    *,
    propose: Callable[[float], Allocation],
    verify: Callable[[Allocation], Candidate],
    refit: Callable[[Allocation], Any],
    measure: Callable[[Candidate, Any, str | None, int], int],
) -> BytesFit:
    """Check ``mp``'s bytes budget against the written file; while it is exceeded, take the next
    smaller allocation with the measured non-weight bytes — the knapsack's best for the bytes
    left (verified when new, and appended to ``candidates``) or a verified candidate that fits,
    whichever measured the smaller held-out worst-group loss increase — and refit it.

    Args:
        best, chosen: the selected candidate and its model.
        candidates: the verified candidates.
        mp: the budget (``budget_bytes``) and ``bit_choices`` (for the error message).
        propose: the knapsack's best allocation given the file's non-weight bytes (raises
            ConfigError when none fits).
        verify: measures a new allocation like the other candidates.
        refit: the model of an allocation, quantized on all the calibration data.
        measure: ``measure(candidate, model, note, refits)``, the size of the file the result
            writes (its allocation metadata included).
    """
    size = measure(best, chosen, None, 0)
    refits, note = 0, None
    while size > mp.budget_value:
        overhead = size - best.allocation.weight_bytes
        if refits >= MAX_BYTES_REFITS:
            raise ConfigError(MSG_BYTES_REFITS.format(budget=mp.budget_value, refits=refits, size=size,
                                                      weights=best.allocation.weight_bytes, overhead=overhead))
        room = mp.budget_value - overhead
        try:
            alloc = propose(overhead)
        except ConfigError:
            alloc = None
        if alloc is not None and all(alloc.bits != c.allocation.bits for c in candidates):
            new = verify(alloc)
            new.origin = "bytes-refit"
            candidates.append(new)
        fitting = [c for c in candidates if c.allocation.weight_bytes <= room and c.metrics is not None]
        if not fitting:
            raise ConfigError(MSG_BYTES_BUDGET.format(
                budget=mp.budget_value, size=size, weights=best.allocation.weight_bytes, overhead=overhead,
                choices=",".join(map(str, mp.bit_choices)), room=math.floor(room),
                hint="" if 2 in mp.bit_choices else " or add 2 to bit_choices"))
        nxt = min(fitting, key=lambda c: (c.measured_worst, c.allocation.weight_bytes))
        note = (f"the written file took {size} bytes > budget_bytes={mp.budget_value:g}: refitted the next smaller "
                f"allocation ({nxt.allocation.weight_bytes} weight bytes + {overhead} bytes of graph and metadata)")
        log.info(note)
        best = nxt
        chosen = refit(best.allocation)
        refits += 1
        size = measure(best, chosen, note, refits)
    return BytesFit(best, chosen, refits, note)
