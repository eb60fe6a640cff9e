"""A bytes budget counts the written ONNX file. Two figures of the file's bytes outside the layers'
weights (graph, fp32 biases, activation Q/DQ parameters, metadata) serve it:

1. :func:`file_overhead_estimate`, before any fit: a **floor** computed from what the exporter
   writes per layer and what the metadata holds (no constants tuned on one model). The allocator
   plans with it, and its "cannot be met" error uses it: since every file the search can write
   holds at least these bytes, that error fires only for a budget no file can meet.
2. :func:`fit_file_budget`, after the selection: the **measured** bytes of the file the result
   writes (its size minus its weight bytes) replace the floor. Larger than the budget: the next
   smaller allocation is refitted. Well under it (more than :data:`GROW_FRACTION` of the budget
   unused): a larger allocation that fits the measured room is verified and, when it measured a
   smaller held-out worst-group loss increase, refitted; should its file exceed the budget, the
   last file that fitted is kept. At most :data:`MAX_BYTES_REFITS` refits in all, each counted in
   the search's ``fits``; when no file fits, a ConfigError gives the measured sizes.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fqexport.atomic import scratch_writes
from fqexport.config import MixedPrecisionConfig
from fqexport.errors import ConfigError
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.metadata import METADATA_KEY, ExportMetadata, LayerRecord
from fqexport.search.allocation import Allocation, LayerCost
from fqexport.search.candidates import Candidate
from fqexport.version import __version__

log = logging.getLogger(__name__)

# What the exporter writes for every conv or Linear besides its weight's codes and scales (which
# the allocator counts) and its fp32 bias (4 bytes per output channel; every layer has one after
# bias correction), at the least: the node that reads the weight (DequantizeLinear, or
# MatMulNBits) and the layer's own node, the names, types and dims of its initializers, and the
# QuantizeLinear/DequantizeLinear pair of its input with their scalars. Measured over 12 models
# (demo CNN and MLP, test fixtures, tabular, 1-D conv, ViT, text transformer; every container):
# 277-2,550 bytes, median ~450 (int8 Linears whose output stays float carry an int32 bias, its
# scale and zero point, besides). Plus each name twice (the weight's and the bias' initializers).
LAYER_GRAPH_BYTES = 260
# An Embedding: no bias; the Gather and the weight's DequantizeLinear (measured >= 250 bytes).
EMBEDDING_GRAPH_BYTES = 150
BIAS_BYTES = 4  # fp32, per output channel of a conv or Linear
# The graph's input and output, opset imports, producer: ~80 bytes.
GRAPH_BASE_BYTES = 64
# Bytes of the metadata_props entry around the JSON (its key and protobuf framing).
METADATA_FRAMING_BYTES = 8
# What the search writes into the metadata after the bytes check, or differently on each path to
# the same allocation (or for each budget), counted by the check at a fixed length, so that an
# allocation's file measures the same whatever the path and the budget, and never less than the
# file written: how the task was chosen ("inferred: the data holds no boxes or masks", a
# detector's output shape...), the note (``fallback``: the refit or the uniform fallback, in
# words), the number of fits, the candidate's origin ("bytes-refit") and the budget's value.
TASK_REASON_BYTES = 96
NOTE_BYTES = 240  # NOTE_SHRINK/NOTE_GROW and NOTE_REFITS with 9-digit sizes
FITS_DIGITS = 4
ORIGIN_BYTES = 13
BUDGET_DIGITS = 14
# Refits after the first file (to shrink it, or once to grow it), each a compress counted in
# result.fits, as is the verification of each new allocation.
MAX_BYTES_REFITS = 3
# A file under the budget by more than this share of it tries one larger allocation.
GROW_FRACTION = 0.02
# Knapsack solves per step for an allocation not known to write too large a file (no fits).
MAX_PROPOSALS = 3

MSG_BYTES_BUDGET = (
    "budget_bytes={budget} cannot be met by the allocations the search tried: the one with the fewest weight bytes "
    "({allocation}; weights {weights} + graph and metadata {overhead} bytes) writes a file of {size} bytes, "
    "measured (the graph bytes change with the containers: another allocation's file may be smaller); raise "
    "--budget-bytes ({size} fits this one){hint}"
)
MSG_BYTES_REFITS = (
    "budget_bytes={budget}: after {refits} refits the file written still took {size} bytes (weights "
    "{weights} + graph and metadata {overhead}); raise --budget-bytes"
)
# (at most NOTE_BYTES with 8-digit sizes)
NOTE_SHRINK = (
    "the written file took {size} bytes > budget_bytes={budget}: refitted a smaller allocation of {weights} "
    "weight bytes (file <= {written} bytes)"
)
NOTE_REFITS = "; {refits} refits, files of {sizes} bytes in turn"
NOTE_GROW = (
    "the written file took {size} bytes, {unused} under budget_bytes={budget}: refitted a larger allocation of "
    "{weights} weight bytes (file <= {written} bytes)"
)


def _json_bytes(obj: Any) -> int:
    """UTF-8 bytes of ``obj`` as the exporter writes the metadata (compact, sorted keys)."""
    return len(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def layer_overhead_floor(layer: LayerCost) -> int:
    """The least the exporter writes for ``layer`` outside the weight's codes and scales: its fp32
    bias (a conv or Linear), its nodes and initializer headers (:data:`LAYER_GRAPH_BYTES`,
    :data:`EMBEDDING_GRAPH_BYTES`) and its name twice."""
    name = 2 * len(layer.name.encode())
    if layer.kind == "embedding":
        return EMBEDDING_GRAPH_BYTES + name
    # a ConvTranspose's "channels" (its weight's first dim) are its inputs: its bias not counted
    bias = BIAS_BYTES * int(layer.channels) if layer.kind in ("conv", "linear") else 0
    return LAYER_GRAPH_BYTES + name + bias


def metadata_floor(layers: Sequence[LayerCost]) -> int:
    """The least the metadata of a search's file holds: every field of
    :class:`~fqexport.metadata.ExportMetadata` at its shortest value, a record per layer, and the
    allocation record with its per-layer table (what
    :meth:`~fqexport.search.candidates.MixedPrecisionResult.allocation_info` writes), without the
    groups, the measured figures and the notes (they only add bytes)."""
    records = tuple(LayerRecord(l.name, l.kind, 2, int(l.params), 0, "int2") for l in layers)
    table = [{"bits": 2, "container": "int2", "most_sensitive_group": "", "name": l.name, "params": int(l.params),
              "sensitivity": 0.0, "stored_bits": 0.0} for l in layers]
    allocation = {"avg_bits": 0.0, "budget": {"kind": "bytes", "value": 0.0}, "fallback": None, "fits": 0,
                  "measured_holdout": None, "objective": "mean", "origin": "mean", "predicted_loss_increase": {},
                  "refit": True, "sensitivity_method": "fisher", "storage": "int8", "stored_bits": 0.0,
                  "table": table, "used": 0.0, "weight_bytes": 0}
    meta = ExportMetadata(fqexport_version=__version__, method="rtn", calibration="", weight_range="", num_calib=0,
                          layers=records, num_classes=0, avg_weight_bits=0.0, opset=0, quantized_fraction=0.0,
                          target="", allocation=allocation)
    return _json_bytes(meta.to_dict()) + len(METADATA_KEY) + METADATA_FRAMING_BYTES


def file_overhead_estimate(layers: Sequence[LayerCost]) -> float:
    """A floor of a search's file bytes outside the layers' weights, before any fit:
    :data:`GRAPH_BASE_BYTES`, :func:`layer_overhead_floor` of every layer and the
    :func:`metadata_floor`. The ops outside the layers (norms, pooling, residual adds and their
    activation Q/DQ) and the groups' figures in the metadata are not known here and only add
    bytes: the measured file (:func:`fit_file_budget`) counts them."""
    return float(GRAPH_BASE_BYTES + sum(layer_overhead_floor(l) for l in layers) + metadata_floor(layers))


MSG_FINETUNED_BYTES = (
    "budget_bytes={budget}: the fine-tuned model's file takes {size} bytes, over the budget the search met; the "
    "fine-tuning record in its metadata adds {record} bytes. Nothing was written: raise --budget-bytes to at least "
    "{size}"
)


def _exported_size(cm: Any) -> int:
    """Bytes of ``cm``'s file exported, unchecked, to a temporary folder: a working file, not an
    output of the run (an error or interrupt note does not name it)."""
    with tempfile.TemporaryDirectory(prefix="fqexport-size-") as tmp, scratch_writes():
        return int(export_qdq(cm, Path(tmp) / "size.onnx", check=False).size_bytes)


def check_finetuned_size(cm: Any, budget: float) -> int:
    """The exact size of the file a fine-tuned searched model writes (a temporary export), or a
    ConfigError (:data:`MSG_FINETUNED_BYTES`) when it exceeds ``budget``: fine-tuning adds its
    record to the metadata after the search met the budget."""
    size = _exported_size(cm)
    if size > budget:
        record = _json_bytes((getattr(cm.metadata, "finetune", None) or {}))
        raise ConfigError(MSG_FINETUNED_BYTES.format(budget=_num(budget), size=size, record=record))
    return size


def written_size(cm: Any) -> int:
    """Bytes of ``cm``'s ONNX file as the export writes it (a temporary export, unchecked), with the
    metadata's task reason, note, fits count, origin and budget value counted at
    :data:`TASK_REASON_BYTES`, :data:`NOTE_BYTES`, :data:`FITS_DIGITS`, :data:`ORIGIN_BYTES` and
    :data:`BUDGET_DIGITS` at least: the search writes the first after the bytes check, the others
    change with the path that led to the allocation and with the budget."""
    size = _exported_size(cm)
    meta = getattr(cm, "metadata", None)
    task = getattr(meta, "task", None) or {}
    allocation = getattr(meta, "allocation", None) or {}
    pads = [(task.get("chosen"), TASK_REASON_BYTES)] if "chosen" in task else []
    if allocation:
        pads += [(allocation.get("fallback"), NOTE_BYTES), (allocation.get("fits"), FITS_DIGITS),
                 (allocation.get("origin"), ORIGIN_BYTES), ((allocation.get("budget") or {}).get("value"), BUDGET_DIGITS)]
    for value, length in pads:
        size += max(0, length - _json_bytes(value))
    return size


@dataclass
class BytesFit:
    """What :func:`fit_file_budget` returns: the candidate and its model, the refits it took (every
    one, those whose file was dropped included), what it did in words (``None`` when the first
    file stood) and the size of every file it measured, in order."""

    candidate: Candidate
    model: Any
    refits: int
    note: str | None
    sizes: list[int] = field(default_factory=list)


@dataclass
class _File:
    candidate: Candidate
    model: Any
    size: int
    note: str | None


def _num(value: float) -> str:
    """A byte count as written in the messages (no exponent for whole numbers)."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


def _widths(alloc: Allocation) -> str:
    """``alloc``'s widths in words: ``uniform 2-bit`` or ``2-8 bits``."""
    widths = sorted(set(alloc.bits.values()))
    return f"uniform {widths[0]}-bit" if len(widths) == 1 else f"{widths[0]}-{widths[-1]} bits"


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
    """Check ``mp``'s bytes budget against the written file and use the measured non-weight bytes.

    While no file fitted, take the next smaller allocation: the knapsack's best for the bytes left
    with the largest non-weight bytes measured so far (verified when new, and appended to
    ``candidates``) or a verified candidate that fits them, whichever measured the smaller held-out
    worst-group loss increase, and refit it; when none fits them, the smallest verified allocation
    not measured yet (a file's non-weight bytes change a little with its containers), and when
    that file too is larger than the budget, a ConfigError gives its measured size. Once a file
    fits with more than :data:`GROW_FRACTION` of the budget unused, do the same once with that
    file's non-weight bytes for an allocation larger than it, taken only when it measured a
    smaller held-out worst-group loss increase; should its file exceed the budget, the one that
    fitted is kept. At most :data:`MAX_BYTES_REFITS` refits.

    Args:
        best, chosen: the selected candidate and its model.
        candidates: the verified candidates.
        mp: the budget (``budget_bytes``) and ``bit_choices`` (for the error message).
        propose: the knapsack's best allocation given the file's non-weight bytes (raises
            ConfigError when none fits).
        verify: measures a new allocation like the other candidates.
        refit: the model of an allocation, quantized on all the calibration data.
        measure: ``measure(candidate, model, note, refits)``, the size of the file the result
            writes (its allocation metadata included: :func:`written_size`).
    """
    budget = float(mp.budget_value)
    size = measure(best, chosen, None, 0)
    sizes, overheads = [size], [size - best.allocation.weight_bytes]
    kept = _File(best, chosen, size, None) if size <= budget else None
    too_large = {} if kept else {allocation_key(best): (best, size)}  # allocations whose file exceeded the budget
    last, refits, grew = best, 0, False  # last: the candidate of the last file written
    while refits < MAX_BYTES_REFITS:
        if kept is not None and (grew or budget - kept.size <= GROW_FRACTION * budget):
            break  # a file fits, and growing it was tried or is not worth a fit
        # shrinking: the largest non-weight bytes seen; growing: those of the file that fitted
        overhead = max(overheads) if kept is None else overheads[-1]
        room = budget - overhead
        alloc = _propose(propose, overhead, budget, too_large)
        if kept is not None and alloc is not None and alloc.weight_bytes <= kept.candidate.allocation.weight_bytes:
            alloc = None  # growing: no larger allocation fits the bytes left, none to verify
        if alloc is not None and all(alloc.bits != c.allocation.bits for c in candidates):
            new = verify(alloc)
            new.origin = "bytes-refit"
            candidates.append(new)
        verified = [c for c in candidates if c.metrics is not None]
        pool = [c for c in verified if c.allocation.weight_bytes <= room and allocation_key(c) not in too_large]
        if kept is not None:  # growing: larger than the file kept, and measured better
            pool = [c for c in pool if c.allocation.weight_bytes > kept.candidate.allocation.weight_bytes
                    and c.measured_worst < kept.candidate.measured_worst]
        elif not pool and verified:  # none fits the bytes measured: the smallest one's own file decides
            smallest = min(verified, key=lambda c: c.allocation.weight_bytes)
            pool = [] if allocation_key(smallest) in too_large else [smallest]
        if not pool:
            break
        nxt = min(pool, key=lambda c: (c.measured_worst, c.allocation.weight_bytes))
        # the note bounds the refitted file's size: the measured size (written_size: the metadata's
        # variable fields at their longest, an upper bound) does not depend on the note, so it is
        # measured first with a placeholder
        if kept is None:
            note = functools.partial(NOTE_SHRINK.format, size=sizes[0], budget=_num(budget),
                                     weights=nxt.allocation.weight_bytes)
        else:
            note = functools.partial(NOTE_GROW.format, size=kept.size, unused=_num(budget - kept.size),
                                     budget=_num(budget), weights=nxt.allocation.weight_bytes)
            grew = True
        model = refit(nxt.allocation)
        refits += 1
        size = measure(nxt, model, "", refits)
        note = note(written=size)
        log.info(note)
        sizes.append(size)
        overheads.append(size - nxt.allocation.weight_bytes)
        last = nxt
        if size <= budget:
            kept = _File(nxt, model, size, note)
        else:
            too_large[allocation_key(nxt)] = (nxt, size)
            if kept is not None:
                log.info("the larger allocation's file took %d bytes > budget_bytes=%s: keeping the %d-byte one",
                         size, _num(budget), kept.size)
    if kept is None:
        if refits >= MAX_BYTES_REFITS:
            raise ConfigError(MSG_BYTES_REFITS.format(budget=_num(budget), refits=refits, size=size,
                                                      weights=last.allocation.weight_bytes,
                                                      overhead=size - last.allocation.weight_bytes))
        small, small_size = min(too_large.values(), key=lambda v: v[0].allocation.weight_bytes)
        raise ConfigError(MSG_BYTES_BUDGET.format(
            budget=_num(budget), allocation=_widths(small.allocation), weights=small.allocation.weight_bytes,
            overhead=small_size - small.allocation.weight_bytes, size=small_size,
            hint="" if 2 in mp.bit_choices else " or add 2 to bit_choices"))
    if kept.candidate is not best or refits:
        log.info("bytes budget: files of %s bytes measured; kept %d bytes (%d refits)",
                 ", ".join(map(str, sizes)), kept.size, refits)
    note = kept.note
    if note is not None and refits > 1:  # the last step alone misread a run of several refits
        note += NOTE_REFITS.format(sizes=", ".join(map(str, sizes)), refits=refits)
    return BytesFit(kept.candidate, kept.model, refits, note, sizes)


def allocation_key(c: Candidate | Allocation) -> tuple[tuple[str, int], ...]:
    """An allocation's (or candidate's) layer widths as a hashable key: equal widths, one key."""
    return tuple(sorted((c.allocation if isinstance(c, Candidate) else c).bits.items()))


def _propose(propose: Callable[[float], Allocation], overhead: float, budget: float,
             too_large: dict) -> Allocation | None:
    """The knapsack's best allocation for ``budget - overhead`` weight bytes that is not known to
    write too large a file (the next best below one that is, :data:`MAX_PROPOSALS` tries); ``None``
    when none fits."""
    for _ in range(MAX_PROPOSALS):
        try:
            alloc = propose(overhead)
        except ConfigError:
            return None
        if allocation_key(alloc) not in too_large:
            return alloc
        overhead = budget - (alloc.weight_bytes - 1)  # fewer weight bytes than that one
    return None
