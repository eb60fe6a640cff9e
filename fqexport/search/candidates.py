"""The search's results: a verified :class:`Candidate` (predicted vs measured) and the
:class:`MixedPrecisionResult` of :func:`fqexport.search.mixed_precision.search_mixed_precision`,
with the views a report, the ONNX metadata and a test read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fqexport.config import DEFAULT_STORAGE, MixedPrecisionConfig
from fqexport.metrics.group_metrics import GroupMetrics
from fqexport.search.allocation import Allocation, LayerCost, layer_container, stored_bits
from fqexport.search.sensitivity import SensitivityTable


def metrics_summary(m: GroupMetrics) -> dict[str, Any]:
    """Per-group accuracy (the primary metric: a detector's mAP@.5), loss and held-out sample
    count, the worst group and its value, and ``mean_*``: the value over all held-out samples
    together (sample-weighted, not a mean of the groups' values)."""
    worst, worst_acc = m.group_min()
    short = "acc" if m.primary == "accuracy" else m.primary
    return {
        m.primary: {g: float(r[m.primary]) for g, r in m.by_group.items()},
        "loss": {g: float(r["loss"]) for g, r in m.by_group.items()},
        "count": {g: int(r["count"]) for g, r in m.by_group.items()},
        "worst_group": worst,
        f"worst_group_{short}": float(worst_acc),
        f"mean_{short}": float(m.overall[m.primary]),
    }


@dataclass
class Candidate:
    """One allocation: predicted per-group loss increase vs what verification measured.

    ``measured_loss_increase`` is the held-out per-group loss of the quantized model minus the
    float model's; ``metrics`` the quantized model's held-out per-group metrics.
    """

    allocation: Allocation
    origin: str = "search"  # "search" (knapsack), "uniform", "mean" or "bytes-refit"
    metrics: GroupMetrics | None = None
    measured_loss_increase: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # its compress fit(s)
    predict_seconds: float = 0.0  # its held-out predictions (and the float model's, for the first)
    sample_loss: np.ndarray | None = field(default=None, repr=False)  # held-out, per sample

    @property
    def worst_group_acc(self) -> float:
        """The worst group's accuracy (the metrics' primary one: a detector's mAP@.5)."""
        return float(self.metrics.group_min()[1]) if self.metrics else float("nan")

    @property
    def mean_acc(self) -> float:
        """The value over all held-out samples together (sample-weighted: not a mean of the groups')."""
        return float(self.metrics.overall[self.metrics.primary]) if self.metrics else float("nan")

    @property
    def measured_worst(self) -> float:
        """The largest measured held-out loss increase over the groups (those without a loss left out)."""
        values = [v for v in self.measured_loss_increase.values() if not math.isnan(v)]
        return max(values) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = {
            "bits": dict(self.allocation.bits),
            "origin": self.origin,
            "avg_bits": self.allocation.avg_bits,
            "stored_bits": self.allocation.stored_bits,
            "weight_bytes": self.allocation.weight_bytes,
            "file_weight_bytes": self.allocation.file_weight_bytes,
            "used": self.allocation.used,
            "predicted_score": self.allocation.score,
            "predicted_loss_increase": dict(self.allocation.predicted),
            "measured_loss_increase": dict(self.measured_loss_increase),
            "verify_seconds": self.seconds,
            "predict_seconds": self.predict_seconds,
        }
        if self.metrics is not None:
            d["measured"] = metrics_summary(self.metrics)
        return d


@dataclass
class MixedPrecisionResult:
    """The outcome of :func:`fqexport.search.mixed_precision.search_mixed_precision`.

    Attributes:
        config: the MixedPrecisionConfig.
        allocation: the chosen allocation.
        candidates: every verified candidate (predicted vs measured): the best ``num_candidates``
            in predicted order, then the uniform allocation (``verify_uniform``), then the
            mean-objective allocation (``verify_mean``), each once.
        compressed: the winner's CompressedModel (``fqexport.export(cm, path)`` writes the ONNX file):
            quantized on all the calibration data with ``refit``, else the verified held-in fit.
        sensitivity: the Δ_g(l, b) table.
        layers: the layer costs (params, MACs, channels).
        float_metrics: the float model's metrics on the held-out samples (with folds: every
            calibration sample but a one-sample group's).
        seconds: wall time of each phase: sensitivity, allocation, verification, refit (and
            ``discarded_refit``, ``bytes_check``). On an engine of several workers the refit of
            the predicted-best candidate runs in this process while the workers verify, so the
            phases overlap; ``wall_seconds`` is the search's own.
        fallback: why the search returned a uniform allocation instead of the one it selected
            (the selected one measured a larger held-out worst-group loss increase than a uniform
            candidate within the budget); ``None`` when the selection stood.
        selection_note: why the returned candidate is not the one that measured best, when that
            is not the uniform fallback: the noise gate kept the predicted best because the
            measured best beat it by less than 2 standard errors (with the figures); else ``None``.
        fits: ``compress`` fits the search ran (verification fits per candidate × fold, the
            refit, refits for a bytes budget); ``fit_seconds`` their summed time.
        storage: the storage mode the returned model exports with (the base config's).
        target: the export target the returned model was compressed for (the base config's).
        verification: how the candidates were measured, in words (the held-out samples).
        wall_seconds: the search's wall time, start to end.
        refit_overlapped: the refit ran beside the verification fits (sharing the CPUs with them).
        discarded_fits: of ``fits``, the early refits of a wrong guess on an engine of several
            workers (step 6); the file's metadata counts the fits without them, so that every
            engine writes the same file.
    """

    config: MixedPrecisionConfig
    allocation: Allocation
    candidates: list[Candidate]
    compressed: Any  # pipeline.CompressedModel
    sensitivity: SensitivityTable
    layers: list[LayerCost]
    float_metrics: GroupMetrics
    seconds: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None
    selection_note: str | None = None
    fits: int = 0
    fit_seconds: float = 0.0
    storage: str = DEFAULT_STORAGE
    verification: str = ""
    target: str = "portable"
    wall_seconds: float = 0.0
    refit_overlapped: bool = False
    discarded_fits: int = 0

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.allocation is self.allocation)

    def one_compress(self) -> tuple[float, str]:
        """The seconds of one ``compress`` fit of this search, to price the search against, and
        which fit it was: the refit (``compress`` of the winner on all the data), else the
        winner's verification fit (its ``compress`` alone: the held-out predictions, which grow
        with the data given, are the candidate's ``predict_seconds``; with folds, one fold's
        share)."""
        if "refit" in self.seconds:
            beside = ", beside the verification fits" if self.refit_overlapped else ""
            return self.seconds["refit"], "the refit of the winner on all the data" + beside
        folds = max(1, self.config.verify_folds)
        return self.chosen.seconds / folds, "the winner's verification fit"

    @property
    def unguarded(self) -> str | None:
        """Why the result was not compared with a uniform allocation (``verify_uniform=False``),
        for the console; ``None`` when the guard ran."""
        if self.config.verify_uniform:
            return None
        return ("no uniform allocation was verified (verify_uniform=False; CLI --no-guard): nothing measured "
                "this allocation against uniform at the same budget")

    def table(self) -> list[dict[str, Any]]:
        """One row per layer: name, params, bits, sensitivity (max over groups of Δ_g at the
        chosen width) and the group it hurts most."""
        rows = []
        for info in self.layers:
            if info.name not in self.allocation.bits:
                continue
            b = self.allocation.bits[info.name]
            if b in self.sensitivity.bits:
                d = self.sensitivity.at(info.name, b)
                k = int(np.argmax(d))
                sens, worst = float(d[k]), self.sensitivity.groups[k]
            else:
                sens, worst = float("nan"), ""
            rows.append({"name": info.name, "params": info.params, "bits": b,
                         "stored_bits": round(stored_bits(info, b, self.storage, self.target), 3),
                         "container": layer_container(info, b, self.storage, self.target),
                         "sensitivity": sens, "most_sensitive_group": worst})
        return rows

    def allocation_info(self) -> dict[str, Any]:
        """What goes into the ONNX metadata under ``fqexport.search.allocation``."""
        c = self.chosen
        return {
            "objective": self.config.objective,
            "budget": {"kind": self.config.budget_kind, "value": self.config.budget_value},
            "avg_bits": round(self.allocation.avg_bits, 4),
            "stored_bits": round(self.allocation.stored_bits, 4),
            "weight_bytes": self.allocation.weight_bytes,
            "file_weight_bytes": self.allocation.file_weight_bytes,
            "storage": self.storage,
            "used": self.allocation.used,
            "origin": c.origin,
            "fallback": self.fallback,
            "uniform_guard": self.config.verify_uniform,
            "fits": self.fits - self.discarded_fits,  # the same on every engine
            "sensitivity_method": self.sensitivity.method,
            "table": [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in self.table()],
            "predicted_loss_increase": dict(self.allocation.predicted),
            "measured_holdout": metrics_summary(c.metrics) if c.metrics else None,
            "refit": self.config.refit,
            "settings": self.config.to_dict(),  # MixedPrecisionConfig(**settings): the search that chose it
        }

    def record_allocation(self) -> "MixedPrecisionResult":
        """Put :meth:`allocation_info` into the returned model's metadata (the ONNX file's); ``self``."""
        self.compressed.metadata = replace(self.compressed.metadata, allocation=self.allocation_info())
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocation": self.allocation_info(),
            "candidates": [c.to_dict() for c in self.candidates],
            "float_holdout": metrics_summary(self.float_metrics),
            "sensitivity": self.sensitivity.to_dict(),
            "seconds": dict(self.seconds),
            "fits": self.fits,
            "fit_seconds": self.fit_seconds,
            "wall_seconds": self.wall_seconds,
            "verification": self.verification,
            "selection_note": self.selection_note,
        }
