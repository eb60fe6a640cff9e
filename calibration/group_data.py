"""Group-labeled arrays: the in-memory form of the readers (a :class:`~.stream.DataStream` is the
streamed form; both have ``group``, ``y``, ``group_names``, ``source``, ``sample_shape`` and
``take``)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fqexport.errors import ConfigError

log = logging.getLogger(__name__)


class GroupViews:
    """What the in-memory and the streamed form both derive from ``group``, ``y`` and
    ``group_names``: group count, whether labels are present, samples per group."""

    group: np.ndarray
    y: np.ndarray | None
    group_names: tuple[str, ...]

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def group_counts(self) -> np.ndarray:
        """Samples per group id, ``[num_groups]``."""
        return np.bincount(self.group, minlength=self.num_groups)

    def _summary(self, kind: str) -> str:
        """``"GroupData(d.npz: 128 samples of (3, 64, 64), 212 boxes, groups {...})"``: what the
        data holds to measure against (labels, boxes, masks or nothing), not every array."""
        notes = getattr(self, "annotations", None)
        truth = (f"{len(notes)} {notes.kind}" if notes is not None
                 else "labels" if self.y is not None else "no labels")
        return (f"{kind}({self.source}: {len(self)} samples of {self.sample_shape}, {truth}, "
                f"groups {dict(zip(self.group_names, self.group_counts().tolist()))})")

    def in_group_order(self, names: Sequence[str]):
        """The same samples with their group ids renumbered so that ``group_names`` is ``names``
        (the same names in another order: string groups are sorted, a calibration file may state
        its own order); ``self`` when the order is already ``names``. Nothing is read or copied
        but the ids."""
        names = tuple(str(n) for n in names)
        if names == self.group_names:
            return self
        if sorted(names) != sorted(self.group_names):
            raise ValueError(f"in_group_order: {names} are not the groups {self.group_names}")
        new_id = np.array([names.index(n) for n in self.group_names], dtype=np.int64)
        other = copy.copy(self)
        object.__setattr__(other, "group", new_id[self.group])  # (GroupData is a frozen dataclass)
        object.__setattr__(other, "group_names", names)
        return other


@dataclass(frozen=True)
class GroupData(GroupViews):
    """Samples with class labels and group labels.

    Attributes:
        x: inputs, float32, ``[N, ...]``.
        y: class labels, int64, ``[N]``; None when the data has no labels (a stage that needs
            them says so, :func:`~.checks.require_labels`).
        group: group ids, int64, ``[N]``, each in ``range(len(group_names))``.
        group_names: a name per group id.
        source: where the data came from (a path or a description), used in messages.
        annotations: the boxes of a detection set or the masks of a segmentation set
            (:mod:`~.annotations`), following every subset; None for class labels only.
    """

    x: np.ndarray
    y: np.ndarray | None
    group: np.ndarray
    group_names: tuple[str, ...]
    source: str = "<memory>"
    annotations: Any = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:  # a summary, like DataStream's (the default printed every array)
        return self._summary("GroupData")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one x."""
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, index: np.ndarray) -> "GroupData":
        """The samples at ``index`` (same group names and source)."""
        index = np.asarray(index)
        y = None if self.y is None else self.y[index]
        notes = None if self.annotations is None else self.annotations.subset(index)
        return GroupData(self.x[index], y, self.group[index], self.group_names, self.source, notes)

    def take(self, index: np.ndarray | None = None, num_workers: int = 0, batch_size: int = 256) -> "GroupData":
        """The samples at ``index`` (all when None): :meth:`subset` — the in-memory form of
        :meth:`DataStream.take <fqexport.calibration.stream.DataStream.take>`."""
        return self if index is None else self.subset(index)

    def batches(self, batch_size: int):
        """Yield ``(x, y, group)`` numpy slices of at most ``batch_size`` samples, in order
        (y None when the data has no labels)."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            y = None if self.y is None else self.y[start:stop]
            yield self.x[start:stop], y, self.group[start:stop]


MSG_UNKNOWN_GROUP = (
    "group_weights names group {name!r}, which is not in the calibration data (groups: {groups})"
)
MSG_WEIGHED_TWICE = "group_weights weigh the group {name!r} twice (as {first!r} and as {second!r}): give each group once"
MSG_ZERO_WEIGHTS = "group_weights {weights!r} give every group of {groups} weight 0: at least one must be > 0"
MSG_NEEDS_COUNTS = "group_weights='samples' needs the groups' sample counts"
MSG_UNNAMED_GROUPS = (
    "group_weights {weights} do not name group(s) {groups}: they get weight 0, so their samples count for nothing "
    "here; name every group to weigh it (e.g. {example})"
)
_said_unnamed: set[str] = set()  # the warnings given: once per process (a search weighs its groups many times)


@dataclass(frozen=True)
class GroupWeights:
    """How much each group counts, as one normalised vector α (Σ_g α_g = 1) — the one place the
    Hessian's α (compress), the allocator's weights (search), the group-weighted fine-tuning loss
    and their defaults are resolved.

    ``spec``: ``None`` — every group alike, whatever its size (fqexport's default: a minority is
    not outvoted); ``"samples"`` — each group's share of the data (plain GPTQ, HAWQ); a mapping of
    group name or id to weight (``{"minority": 2.0}``; unnamed groups 0).
    """

    spec: Mapping[Any, float] | str | None = None

    def vector(self, group_names: Sequence[str], counts: Sequence[int] | np.ndarray | None = None,
               unknown: str = MSG_UNKNOWN_GROUP, unnamed: str = MSG_UNNAMED_GROUPS) -> np.ndarray:
        """α over ``group_names`` (float64, sums to 1); ``counts`` (per group) for ``"samples"``;
        ``unknown`` is the ConfigError template for a key that is not a group, ``unnamed`` the
        warning (once per process) for groups a mapping leaves at 0 (``{weights}``, ``{groups}``,
        ``{example}``)."""
        n = len(group_names)
        if self.spec is None:
            return np.full(n, 1.0 / n)
        if self.spec == "samples":
            if counts is None:
                raise ConfigError(MSG_NEEDS_COUNTS)
            v = np.asarray(counts, dtype=np.float64)
        else:
            given = _weights_by_index(self.spec, group_names, unknown)
            v = _as_vector(given, len(group_names))
            left = [repr(g) for i, g in enumerate(group_names) if i not in given]
            if left and v.sum() > 0:
                example = ",".join(f"{g}={given.get(i, 1.0):g}" for i, g in enumerate(group_names))
                said = unnamed.format(weights=dict(self.spec), groups=", ".join(left), example=example)
                if said not in _said_unnamed:
                    _said_unnamed.add(said)
                    log.warning(said)
        if not v.sum() > 0:
            raise ConfigError(MSG_ZERO_WEIGHTS.format(weights=self.spec, groups=list(group_names)))
        return v / v.sum()


def _as_vector(by_index: Mapping[int, float], n: int) -> np.ndarray:
    v = np.zeros(n, dtype=np.float64)
    for i, w in by_index.items():
        v[i] = w
    return v


def _weights_by_index(weights, group_names, unknown: str) -> dict[int, float]:
    """``{group index: weight}`` of the groups ``weights`` names, by name or id (``{"minority": 2}``,
    ``{1: 2}``, ``{"1": 2}``); a ConfigError with ``unknown`` (a template of {name} and {groups}) for
    a key that is not a group, or a group named twice."""
    names = list(group_names)
    out: dict[int, float] = {}
    given: dict[int, Any] = {}  # group index -> the key that weighed it
    for key, w in weights.items():
        if str(key) in names:
            i = names.index(str(key))
        elif isinstance(key, (int, np.integer)) and 0 <= int(key) < len(names):
            i = int(key)
        elif isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < len(names):
            i = int(key)
        else:
            raise ConfigError(unknown.format(name=key, groups=", ".join(names)))
        if i in given:  # by name and by id: whichever came last would win
            raise ConfigError(MSG_WEIGHED_TWICE.format(name=names[i], first=given[i], second=key))
        given[i], out[i] = key, float(w)
    return out
