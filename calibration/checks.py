"""Checks of group-labeled data: arrays, labels, groups and token ids, whole or one batch at a time.

The rules every reader (and the training stream) holds data to: x numeric with at least two
dimensions, no NaN/Inf, kept float32 — or int64 token ids when ``x`` holds signed integers (see
:data:`MSG_NEGATIVE_IDS` and :func:`check_vocabulary`); y and group integer ``[N]``; every group id
naming a group that has samples. A failed check raises one :class:`DataError` whose message starts
with the source (a file or a description) and names the field, e.g.
``"test.npz: field 'x' contains NaN or Inf (3 values)"``; given the samples' positions (``index``,
for a streamed batch) it names the first bad sample too.

Groups may be given as integer ids or as names (strings). Names become ids in sorted order of
the unique names (``["f", "m", "f"]`` → names ``("f", "m")``, ids ``[0, 1, 0]``) unless
``group_names`` is given, which then fixes the order. Integer ids without names get the names
``group0``, ``group1``, ….
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import numpy as np

from fqexport.errors import ConfigError, DataError

from .annotations import Boxes, Masks, check_boxes, check_masks
from .group_data import GroupData

log = logging.getLogger(__name__)

MSG_UNSIGNED_X = (
    "%s: field 'x' is %s, read as pixels: the model gets its values as floats 0-%d, not scaled to [0, 1] "
    "as the CSV manifest's images are; if the model was trained on [0, 1] (or normalised) inputs, save x / %d "
    "(or pass transform=) instead; token ids belong in a signed integer x (int64)"
)
MSG_NEGATIVE_IDS = (
    "field 'x' holds signed integers, read as token ids (kept int64 for an Embedding), but has the "
    "negative id {value}; ids must be >= 0 — store float features as float32, or fix the ids"
)
MSG_NEEDS_LABELS = "{stage} needs labels: {source} yields no y; give (x, y) or (x, y, group) samples"
MSG_NOT_CLASSIFIER = (
    "analyze diagnoses classifiers (accuracy, cross-entropy, its gradients and Hessian per group); for a "
    "{task} model use validate --task {task} (per-group {metric}) or compress --budget-bits (per-group sensitivity "
    "from the distillation loss)"
)
TASK_METRICS = {"detection": "COCO mAP", "segmentation": "mIoU and Dice"}
MSG_COMPUTED_IDS = (
    "the model's Embedding '{layer}' (num_embeddings={vocab}) looks up the id {value}, which the model computes "
    "from field 'x' of sample {sample}: outside [0, {vocab}); check the categorical codes in x or the model"
)
MSG_VOCABULARY = (
    "field 'x' holds the token id {value} outside the vocabulary [0, {vocab}) of the model's "
    "Embedding '{layer}' (num_embeddings={vocab}); check the tokenizer or the model"
)
MSG_Y_MASKS = ("; per-pixel labels [N, H, W] of a segmenter go into the npz field 'masks' (with 'ignore_index'), "
               "not 'y' (docs/tasks.md)")


def data_error(source: str, message: str) -> DataError:
    """The :class:`DataError` of ``message`` about ``source``: ``"<source>: <message>"``."""
    return DataError(f"{source}: {message}")


_INT64_MAX = 2**63 - 1
MSG_TOO_LARGE = ("field '{field}' holds the value {value!r} (dtype {dtype}), too large for a class or group id; "
                 "{field} must hold small integer ids")


def _as_int_array(a: np.ndarray, field: str, source: str) -> np.ndarray:
    """int64 view of an integer (or bool, or whole-number float) array, else DataError (a value
    int64 cannot hold is named as stored, not as the wrapped number a cast would give)."""
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        if a.dtype == np.uint64 and a.size and int(a.max()) > _INT64_MAX:
            raise data_error(source, MSG_TOO_LARGE.format(field=field, value=int(a.max()), dtype=a.dtype))
        return a.astype(np.int64, copy=False)
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if finite.all() and np.all(a == np.round(a)):
            if a.size and float(np.abs(a).max()) >= 2.0**63:
                big = a.flat[int(np.abs(a).argmax())].item()
                raise data_error(source, MSG_TOO_LARGE.format(field=field, value=big, dtype=a.dtype))
            return a.astype(np.int64)
        bad = a[~finite] if not finite.all() else a[a != np.round(a)]
        raise data_error(
            source,
            f"field '{field}' must hold integers, found the non-integer value {bad.flat[0].item()!r} "
            f"(dtype {a.dtype}); store {field} as integer ids"
            + (" (class labels: fqexport measures classifiers, detectors and segmenters; regression targets are "
               "not supported)" if field == "y" else ""),
        )
    raise data_error(
        source,
        f"field '{field}' must hold integers, got dtype {a.dtype}; store {field} as integer ids"
        + (" or group names" if field == "group" else ""),
    )


def _names_from_array(group_names: Any, source: str) -> tuple[str, ...]:
    arr = np.asarray(group_names)
    if arr.ndim != 1:
        raise data_error(source, f"field 'group_names' must be 1-D, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.str_) or np.issubdtype(arr.dtype, np.bytes_)):
        raise data_error(source, f"field 'group_names' must hold strings, got dtype {arr.dtype}")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in arr.tolist())
    if not names:
        raise data_error(source, "field 'group_names' is empty; give one name per group id")
    seen: set[str] = set()
    for n in names:
        if n == "":
            raise data_error(source, "field 'group_names' contains an empty name")
        if n in seen:
            raise data_error(source, f"field 'group_names' names the group {n!r} twice")
        seen.add(n)
    return names


def _group_ids(
    group: np.ndarray, group_names: Any, source: str, index: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """(int64 ids, names) from ids or names, with optional explicit ``group_names``; ``index``
    (a streamed batch's sample positions) makes the messages name the sample."""
    names = None if group_names is None else _names_from_array(group_names, source)
    if group.ndim != 1:
        raise data_error(source, f"field 'group' must be 1-D [N], got shape {group.shape}")
    if group.dtype.kind in "US" or group.dtype == object:
        return _ids_of_names(group, names, source, index)
    return _ids_of_ids(group, names, source, index)


def _ids_of_names(
    group: np.ndarray, names: tuple[str, ...] | None, source: str, index: np.ndarray | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Group names as ids: into ``names`` when given, else into the sorted unique names."""
    labels = np.array([g.decode() if isinstance(g, bytes) else str(g) for g in group.tolist()])
    if names is None:
        names = tuple(str(n) for n in np.unique(labels)) if labels.size else ("group0",)
    lookup = {n: i for i, n in enumerate(names)}
    ids = np.empty(labels.shape[0], dtype=np.int64)
    for i, lab in enumerate(labels.tolist()):
        if lab not in lookup:
            raise data_error(
                source,
                f"field 'group' holds the name {lab!r} (sample {_sample(index, i)}) that is not in "
                f"group_names {list(names)}",
            )
        ids[i] = lookup[lab]
    return ids, names


def _ids_of_ids(
    group: np.ndarray, names: tuple[str, ...] | None, source: str, index: np.ndarray | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Group ids checked (integers >= 0, each naming one of ``names``); ``group0``, ``group1``, …
    when no names are given."""
    ids = _as_int_array(group, "group", source)
    if ids.size and ids.min() < 0:
        k = int(np.argmax(ids < 0))  # the first offending sample
        raise data_error(
            source, f"sample {_sample(index, k)}: field 'group' holds the negative id {int(ids[k])}; ids start at 0"
        )
    if names is None:
        n = int(ids.max()) + 1 if ids.size else 1
        names = tuple(f"group{i}" for i in range(n))
    elif ids.size and ids.max() >= len(names):
        k = int(np.argmax(ids >= len(names)))
        raise data_error(
            source,
            f"sample {_sample(index, k)}: field 'group' holds the id {int(ids[k])} but group_names has only "
            f"{len(names)} names (ids 0..{len(names) - 1})",
        )
    return ids, names


def _sample(index: np.ndarray | None, i: int) -> int:
    """The position in the source of a batch's ``i``-th sample (``i`` itself for a whole array)."""
    return int(index[i]) if index is not None else i


def _check_x_dtype(x: np.ndarray, source: str, where: str = "") -> None:
    if x.dtype == object or not (x.dtype == np.bool_ or np.issubdtype(x.dtype, np.number)) or (
        np.issubdtype(x.dtype, np.complexfloating)
    ):
        raise data_error(source, f"{where}field 'x' must be numeric, got dtype {x.dtype}")


def group_ids(group: Any, group_names: Sequence[str], source: str, index: np.ndarray) -> np.ndarray:
    """int64 ids of one streamed batch's groups (ids or names) over the known ``group_names``;
    DataError naming the sample (its position in ``index``) for an unknown name or id."""
    return _group_ids(np.asarray(group), list(group_names), source, np.asarray(index))[0]


@functools.lru_cache(maxsize=64)
def _warn_unsigned(source: str, dtype: np.dtype) -> None:
    """Once per source and type (a stream checks every batch)."""
    top = int(np.iinfo(dtype).max)
    log.warning(MSG_UNSIGNED_X, source, dtype.name, top, top)


def check_x_values(x: Any, source: str, index: np.ndarray | None = None) -> np.ndarray:
    """``x`` as float32 (int64 for signed-integer token ids), checked: numeric, ids >= 0, no NaN/Inf.

    ``index`` (the samples' positions in ``source``, for one batch of streamed data) makes the
    message name the first bad sample, e.g. ``"train.npz: sample 1234: field 'x' contains NaN or
    Inf (3 values)"``; without it the message names the field only (a whole array).
    """
    x = np.asarray(x)
    first = (lambda bad: f"sample {int(index[np.flatnonzero(bad.reshape(len(bad), -1).any(1))[0]])}: "
             if index is not None else "")
    _check_x_dtype(x, source, first(np.ones(len(x), bool)) if index is not None and len(x) else "")
    if np.issubdtype(x.dtype, np.signedinteger):
        x = x.astype(np.int64, copy=False)
        if x.size and int(x.min()) < 0:
            raise data_error(source, first(x < 0) + MSG_NEGATIVE_IDS.format(value=int(x.min())))
    else:
        if np.issubdtype(x.dtype, np.unsignedinteger):  # uint8 photos, uint16 DICOM / 16-bit PNG pixels
            _warn_unsigned(source, x.dtype)
        if x.dtype == np.float64:  # past float32's range it would read as Inf, which the data does not hold
            big = np.isfinite(x) & (np.abs(x) > np.finfo(np.float32).max)
            if big.any():
                raise data_error(source, first(big) + f"field 'x' holds values past float32's range (±3.4e38; "
                                 f"{int(big.sum())} values, largest {float(np.abs(x[big]).max()):.3g}), which "
                                 "fqexport computes in: rescale the data")
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x)
        bad = int(x.size - np.count_nonzero(finite))
        if bad:
            raise data_error(source, first(~finite) + f"field 'x' contains NaN or Inf ({bad} values)")
    return x


def validate_targets(
    y: Any, group: Any, group_names: Sequence[str] | np.ndarray | None, n: int, source: str
) -> tuple[np.ndarray | None, np.ndarray, tuple[str, ...]]:
    """The labels and groups of ``n`` samples checked and converted: ``(y int64, group ids int64,
    names)`` (the rules of :func:`validate_group_data` for fields y and group); ``y=None`` (data
    without labels) stays None."""
    group = np.asarray(group)
    fields = [("group", group)]
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1:
            # [N, H, W] labels are a segmenter's masks: they have a field of their own
            masks = MSG_Y_MASKS if y.ndim == 3 else ""
            raise data_error(source, f"field 'y' must be 1-D [N], got shape {y.shape}{masks}")
        fields.insert(0, ("y", y))
    for field, arr in fields:
        if arr.ndim >= 1 and arr.shape[0] != n:
            raise data_error(
                source,
                f"length mismatch: field 'x' has {n} samples but field '{field}' has "
                f"{arr.shape[0]}",
            )
    if y is not None:
        y = _as_int_array(y, "y", source)
        if y.size and y.min() < 0:
            raise data_error(
                source,
                f"field 'y' holds the negative label {int(y.min())}; labels must be class ids >= 0",
            )
    ids, names = _group_ids(group, group_names, source)
    counts = np.bincount(ids, minlength=len(names))
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty and group_names is None and np.asarray(group).dtype.kind in "iufb":
        # ids are labels: id k is the group 'group{k}' whichever others are present (a test set may
        # lack a calibrated group; renumbering would name the others after it)
        present = np.flatnonzero(counts)
        ids = np.searchsorted(present, ids)
        names, empty = [names[i] for i in present], []
    if empty:
        raise data_error(
            source,
            f"group {empty[0]!r} has no samples (field 'group'); drop it from group_names "
            "or add samples of it",
        )
    return y, ids, tuple(names)


def validate_group_data(
    x: Any,
    y: Any,
    group: Any,
    group_names: Sequence[str] | np.ndarray | None = None,
    source: str = "<memory>",
    annotations: Boxes | Masks | None = None,
) -> GroupData:
    """Check and convert raw arrays into a :class:`GroupData` (x float32, y/group int64; ``y=None``
    for data without labels).

    ``x`` of a signed integer dtype (int8…int64) holds token ids: it is kept as int64 (never cast
    to float, so an Embedding front end sees its ids) and must be >= 0. Unsigned integers and
    bools (e.g. uint8 pixels) are cast to float32 as before.

    Raises:
        DataError: naming ``source`` and the field, for an empty dataset, x not numeric or
            with fewer than 2 dims, NaN/Inf in x, y/group not integer, negative labels, a
            length mismatch, a group id outside ``group_names`` or a group with no samples.
    """
    x = np.asarray(x)
    group = np.asarray(group)
    _check_x_dtype(x, source)
    if x.ndim < 2:
        raise data_error(
            source,
            f"field 'x' must have at least 2 dims [N, features...], got shape {x.shape}; "
            "add a feature axis, e.g. x[:, None]",
        )
    n = x.shape[0]
    if n == 0:
        raise data_error(source, "the dataset is empty (field 'x' has 0 samples)")
    y, ids, names = validate_targets(y, group, group_names, n, source)
    x = check_x_values(x, source)
    return GroupData(x=x, y=y, group=ids, group_names=tuple(names), source=str(source),
                     annotations=check_annotations(annotations, x.shape[1:], source, n))


def check_annotations(annotations: Boxes | Masks | None, sample_shape: tuple[int, ...], source: str,
                      n: int) -> Boxes | Masks | None:
    """``annotations`` checked against ``n`` samples of ``sample_shape`` (:mod:`.annotations`)."""
    if isinstance(annotations, Boxes):
        return check_boxes(annotations.boxes, annotations.labels, annotations.image, sample_shape, source, n)
    if isinstance(annotations, Masks):
        return check_masks(annotations.masks, sample_shape, source, n, annotations.ignore_index)
    if annotations is not None:
        raise data_error(source, f"annotations must be Boxes or Masks, got {type(annotations).__name__}")
    return None


def validate(data: GroupData) -> GroupData:
    """Re-check a :class:`GroupData` built elsewhere (same rules as the readers)."""
    return validate_group_data(data.x, data.y, data.group, list(data.group_names), data.source, data.annotations)


def check_vocabulary(x: np.ndarray, source: str, vocab: int, layer: str) -> None:
    """Raise :class:`DataError` (naming ``source``) unless every token id of ``x`` is in ``[0,
    vocab)`` (``vocab``: the ``num_embeddings`` of the Embedding ``layer`` that reads ``x``); ``x``
    holds integers, or whole numbers stored as floats (which ONNX Runtime casts to its integer
    input: -1 would then read the table's last row)."""
    if x.size == 0 or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= vocab:
        raise data_error(source, MSG_VOCABULARY.format(value=lo if lo < 0 else hi, vocab=vocab, layer=layer))


def require_labels(data: Any, stage: str) -> None:
    """Raise :class:`DataError` (:data:`MSG_NEEDS_LABELS`) when ``data`` (a GroupData or a
    DataStream) has no labels and ``stage`` needs them."""
    if data.y is None:
        raise DataError(MSG_NEEDS_LABELS.format(stage=stage, source=data.source))


def require_classification(data: Any, task: str | None = None) -> None:
    """Raise :class:`ConfigError` (:data:`MSG_NOT_CLASSIFIER`) when ``data`` holds boxes or masks,
    or ``task`` (a task's name, e.g. inferred from the model's output) is detection or
    segmentation: what ``analyze`` does not diagnose."""
    notes = getattr(data, "annotations", None)
    if isinstance(notes, (Boxes, Masks)):
        task = "detection" if isinstance(notes, Boxes) else "segmentation"
    if task in TASK_METRICS:
        raise ConfigError(MSG_NOT_CLASSIFIER.format(task=task, metric=TASK_METRICS[task]))


def check_labels(data: GroupData, num_classes: int) -> None:
    """Raise :class:`DataError` unless every label is in ``[0, num_classes)`` (nothing to check
    for data without labels)."""
    if data.y is None or data.y.size == 0:
        return
    bad = (data.y < 0) | (data.y >= num_classes)
    if bad.any():
        first = int(np.argmax(bad))
        raise data_error(
            data.source,
            f"sample {first}: field 'y' holds the label {int(data.y[first])} outside [0, {num_classes}) "
            f"({int(bad.sum())} sample(s) outside; the model has num_classes={num_classes}); check the labels or the model",
        )
