"""The export check: does the file compute what the PyTorch fake-quant reference computes, under
the int8 kernels of the CPU (or GPU) family it is exported for?

What deploys is ONNX Runtime's fused integer kernels, whose arithmetic depends on the CPU
(ORT-NOTES.md, :mod:`fqexport.exporters.cpu_isa`). So the check is target-aware:

- each kernel family the target covers (:data:`TARGET_FAMILIES`; ``portable`` covers all) is
  judged once — families with the same arithmetic (x86-vnni and arm64 add exactly in int32)
  by one judge;
- this CPU's own optimized ORT session judges only its own family (:func:`runs_natively`), on
  every calibration sample; every other family is judged by its bit-exact emulation
  (:class:`~fqexport.exporters.kernel_emulation.EmulatedSession`), on a group-balanced subset of
  :data:`MAX_EMULATED_SAMPLES` — unless the emulation holds no fused node whose sums depend on
  the kernels: the family then computes the file as this CPU does, and this CPU's verdict is its;
- ``gpu`` has no CPU kernels: the graph's own math (ORT with optimizations off) judges it.

What a judge compares comes from the model's task (:meth:`fqexport.tasks.base.Task.compare`):
for a classifier, top-1 agreement with the reference on decided samples (top-2 logits more than
``TIE_FRACTION`` of the logit spread apart) of at least ``MIN_AGREEMENT``, or a single sample
flipped (:mod:`fqexport.tasks.classification`); for a detector, the boxes kept after NMS matched
by class and IoU; for a segmenter, per-pixel agreement.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from fqexport.errors import ExportError, FqexportError
from fqexport.exporters.cpu_isa import EXACT_FAMILIES, host_family, runs_natively
from fqexport.exporters.kernel_emulation import ControlFlowUnsupported, EmulatedSession
from fqexport.exporters.ort_session import make_session, run_batches
from fqexport.tasks.base import Comparison, Task
from fqexport.tasks.classification import Classification

log = logging.getLogger(__name__)

# The emulated kernels are numpy (slower than ORT's): they judge at most this many calibration
# samples, an equal share per group.
MAX_EMULATED_SAMPLES = 256
GRAPH = "graph"  # the judge of a target without CPU kernels: the file's own math

# How far (in quantization steps) the reference's activations move before rounding to find the
# outputs that turn on rounding ties. ORT's requantization and the reference differ only at ties:
# on random-weight EfficientNets ~2 codes per million, each within 1.1e-5 step of a .5 tie, 1 step
# apart; in a network whose logits are that sensitive, those few codes flip 2-4 % of the samples.
TIE_JITTER_STEPS = 1e-4

# QuantConfig.target -> the kernel families it must hold on (docs/kernel-targets.md).
TARGET_FAMILIES: dict[str, tuple[str, ...]] = {
    "portable": ("x86-avx2", "x86-vnni", "arm64"), "x86-avx2": ("x86-avx2",), "x86-vnni": ("x86-vnni",),
    "arm64": ("arm64",), "gpu": (),
}

MSG_AGREEMENT = (
    "{path}: for target={target!r}, the exported model run with {kernels} {summary}; the file was not "
    "written. {cause}"
)
# The cause named by MSG_AGREEMENT. The reference already models ORT's int32 bias rounding
# (s_x·s_w[c] steps, WeightBiasQuantization) and its uint8 activations, so what is left is a
# saturating kernel or an op ORT computes differently.
CAUSE_FULL_RANGE = (
    "The model has full-range 8-bit weights (weight_range='full'), and target={target!r} covers x86 "
    "CPUs without VNNI, whose u8*s8 kernels (vpmaddubsw) saturate 16-bit sums of product pairs: "
    "use weight_range='x86-safe' (the default, --weight-range x86-safe), or target='x86-vnni', "
    "'arm64' or 'gpu' (--target) if the model never runs on such a CPU"
)
CAUSE_KERNELS = (
    "The {family} kernels compute some op differently from the reference (which models ORT's int32 "
    "bias rounding and uint8 activation pairs): export with check=False and run `fqexport validate "
    "--target {family}`, whose per-group figures and fused-kernel list show what it costs; "
    "storage='int8' rules out the 4-bit kernels"
)
CAUSE_GRAPH = (
    "ONNX Runtime computes some op of the graph differently from the reference: export with "
    "check=False and compare per group with `fqexport validate`"
)
MSG_RUN = "{path}: the export check cannot run the exported model with {kernels}: {err}"


@dataclass(frozen=True)
class Judge:
    """Who judges a file for a kernel family: this CPU's ORT session or the emulation.

    ``family``: a kernel family, or :data:`GRAPH`; ``also``: families of the same arithmetic it
    stands for; ``native``: this CPU's optimized ORT session (else the emulated kernels).
    """

    family: str
    native: bool
    also: tuple[str, ...] = ()

    @property
    def families(self) -> tuple[str, ...]:
        return (self.family, *self.also)

    def describe(self) -> str:
        """``"this CPU's x86-avx2 int8 kernels (ONNX Runtime's optimized session)"``,
        ``"the emulated x86-vnni/arm64 int8 kernels"`` or the graph's math."""
        if self.family == GRAPH:
            return "the graph's own math (ONNX Runtime with optimizations off: no CPU int8 kernels)"
        names = "/".join(self.families)
        if self.native:
            return f"this CPU's {names} int8 kernels (ONNX Runtime's optimized session)"
        return f"the emulated {names} int8 kernels"


def _same_arithmetic(a: str, b: str) -> bool:
    return a == b or (a in EXACT_FAMILIES and b in EXACT_FAMILIES)


def kernel_judges(target: str) -> tuple[Judge, ...]:
    """The judges of an export for ``target``: one per distinct arithmetic among the target's
    families, this machine's family first (judged natively where :func:`runs_natively`)."""
    families = TARGET_FAMILIES[target]
    if not families:
        return (Judge(GRAPH, native=False),)
    host = host_family()
    judges: list[Judge] = []
    for family in sorted(families, key=lambda f: (f != host, families.index(f))):
        for i, judge in enumerate(judges):
            if _same_arithmetic(judge.family, family):
                judges[i] = Judge(judge.family, judge.native, (*judge.also, family))
                break
        else:
            judges.append(Judge(family, runs_natively(family)))
    return tuple(judges)


@dataclass(frozen=True)
class Verdict:
    """One judge's comparison of the file with the reference."""

    judge: Judge
    samples: int
    agreement: float  # top-1 agreement (the task's agreement), all judged samples
    decided_agreement: float  # on samples that are not near-ties
    max_abs_diff: float
    passed: bool
    what: str = "top-1 agreement"  # the task's agreement_name
    diff: str = "logit diff"  # the task's diff_name
    # per group: the decided agreement within that group's judged samples (the rule holds per group too)
    by_group: Mapping[str, float] = field(default_factory=dict)
    decided: int | None = None  # the samples that are not near-ties (None: the task does not count them)

    def line(self) -> str:
        """One console line: who judged, on how many samples, with what result (and its worst group)."""
        worst = min(self.by_group.items(), key=lambda kv: kv[1]) if len(self.by_group) > 1 else None
        worst = worst if worst is not None and worst[1] < 1.0 else None
        decided = (MSG_NONE_DECIDED if self.decided == 0 else f"{self.decided_agreement:.2%} of the decided ones"
                   + (f"; worst group {worst[0]!r} {worst[1]:.2%}" if worst else ""))
        return (f"{self.judge.describe()}: {self.what} {self.agreement:.2%} on {self.samples} calibration "
                f"samples ({decided}), max |{self.diff}| {self.max_abs_diff:.4g} — {'passed' if self.passed else 'FAILED'}")

    def to_dict(self) -> dict:
        return {"kernels": self.judge.describe(), "families": list(self.judge.families), "native": self.judge.native,
                "samples": self.samples, "agreement": self.agreement, "decided_agreement": self.decided_agreement,
                "decided_agreement_by_group": dict(self.by_group), "max_abs_diff": self.max_abs_diff,
                "passed": self.passed}


def check_subset(group: np.ndarray, cap: int) -> np.ndarray:
    """Sorted indices of at most ``cap`` samples, taken round-robin over the groups (a group
    smaller than its share comes whole)."""
    n = len(group)
    if n <= cap:
        return np.arange(n)
    _, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.sort(np.lexsort((inverse, rank))[:cap])


def _judge_session(judge: Judge, file: Path):
    """What runs the file for ``judge``: ORT's plain or optimized session, or the emulated kernels."""
    if judge.family == GRAPH:
        return make_session(file, optimized=False)
    if judge.native:
        return make_session(file, optimized=True)
    return EmulatedSession(file, judge.family, threads=1, native_log_level=logging.INFO)


def _judge_logits(judge: Judge, file: Path, x: np.ndarray, session=None) -> np.ndarray:
    """``judge``'s outputs of the file on ``x`` (through ``session``, default: a new one)."""
    session = session if session is not None else _judge_session(judge, file)
    return run_batches(session, x, 128 if isinstance(session, EmulatedSession) else 256)


# every reference prediction a near-tie (a model whose logits are all equal): the agreement judged nothing
MSG_NONE_DECIDED = ("no sample decided: every reference prediction is a near-tie at the export's resolution, so "
                    "the agreement cannot judge this file; the max difference below is what can")
MSG_NOT_JUDGED = (
    "export check of %s: not judged under %s (%s); its weights use the x86-safe range, whose integer sums "
    "those kernels cannot saturate; the other judges check it"
)
MSG_AS_NATIVE = (
    "export check of %s: %s hold no fused node whose sums depend on the kernels: they compute the file as %s "
    "do, whose verdict stands for them"
)
MSG_NONFINITE_REFERENCE = (
    "{path}: the PyTorch reference outputs NaN or Inf on {n} of the {total} calibration samples: the model "
    "does not compute finite outputs, so no file can be checked against it; nothing was written"
)


def _by_group(task: Task, got: np.ndarray, want: np.ndarray, shaken: np.ndarray | None, group: np.ndarray,
              names: Sequence[str] | None) -> dict[str, Comparison]:
    """``task``'s comparison within each group's samples (named by ``names``, else by id)."""
    out = {}
    for g in np.unique(group):
        sel = group == g
        name = names[int(g)] if names is not None and int(g) < len(names) else str(int(g))
        out[str(name)] = task.compare(got[sel], want[sel], None if shaken is None else shaken[sel])
    return out


def check_export(model: onnx.ModelProto, want: np.ndarray, x: np.ndarray, group: np.ndarray, *, target: str,
                 full_range: bool, path: Path, task: Task | None = None,
                 shaken: np.ndarray | None = None, group_names: Sequence[str] | None = None) -> tuple[Verdict, ...]:
    """Judge ``model`` (about to be written to ``path``) against the reference outputs ``want`` on
    the calibration inputs ``x`` (groups ``group``, named ``group_names``) under every judge of
    ``target``, each by ``task``'s comparison (default: a classifier's top-1 agreement), over all
    the samples and within each group: a file whose flips fall on one group's few samples fails
    there though the whole agrees (2 of a 47-sample minority flipped by saturation: 99.6 % overall).
    ``shaken``: the reference's outputs with its rounding ties jittered (:data:`TIE_JITTER_STEPS`):
    samples they flip are near-ties, which ORT's requantization may round the other way without
    any op being wrong.

    Raises ExportError naming the judge, the agreement and the cause at the first failing judge.
    ``full_range``: the weights use the full 8-bit range (names the saturation as the cause).
    """
    task = task or Classification()
    if not np.isfinite(want).all():  # NaN agrees with NaN under argmax: the check would pass a broken file
        bad = int((~np.isfinite(want.reshape(len(want), -1))).any(axis=1).sum())
        raise ExportError(MSG_NONFINITE_REFERENCE.format(path=path, n=bad, total=len(want)))
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="fqexport-check-") as tmp:
        file = Path(tmp) / "model.onnx"  # not the user's name: one that is not UTF-8 failed ORT's constructor
        onnx.save_model(model, str(file), save_as_external_data=False)
        native: Verdict | None = None  # this CPU's own kernels' verdict, on every sample
        for judge in kernel_judges(target):
            idx = np.arange(len(x)) if judge.native or judge.family == GRAPH else check_subset(group, MAX_EMULATED_SAMPLES)
            try:
                session = _judge_session(judge, file)
                if isinstance(session, EmulatedSession) and not session.emulated_nodes and native is not None:
                    # no fused node whose sums depend on the kernels: the family computes the file as
                    # this CPU does, whose verdict on every sample is its verdict (a subset's would
                    # judge the same outputs on fewer samples: a coin flip near the limit)
                    verdicts.append(replace(native, judge=judge))
                    log.info(MSG_AS_NATIVE, path, judge.describe(), native.judge.describe())
                    continue
                got = _judge_logits(judge, file, x[idx], session)
            except ControlFlowUnsupported as err:
                if full_range:  # saturation is then possible, and only the emulation would show it
                    raise ExportError(MSG_RUN.format(path=path, kernels=judge.describe(), err=err)) from err
                log.warning(MSG_NOT_JUDGED, path, judge.describe(), err)
                continue
            except FqexportError as err:
                raise ExportError(MSG_RUN.format(path=path, kernels=judge.describe(), err=err)) from err
            c = task.compare(got, want[idx], None if shaken is None else shaken[idx])
            groups = _by_group(task, got, want[idx], None if shaken is None else shaken[idx], group[idx], group_names)
            failing = next(((name, g) for name, g in groups.items() if not g.passed), None) if c.passed else None
            if failing is not None:  # the whole passed, one group did not: a minority's flips averaged away
                c = replace(c, passed=False, summary=f"on group {failing[0]!r} {failing[1].summary}")
            verdict = Verdict(judge, len(idx), c.agreement, c.decided_agreement, c.max_abs_diff, c.passed,
                              task.agreement_name, task.diff_name, {n: g.decided_agreement for n, g in groups.items()},
                              c.decided)
            verdicts.append(verdict)
            native = verdict if judge.native else native
            log.info("export check of %s for target=%s: %s", path, target, verdict.line())
            if not verdict.passed:
                if full_range and "x86-avx2" in judge.families:
                    cause = CAUSE_FULL_RANGE.format(target=target)
                elif judge.family == GRAPH:
                    cause = CAUSE_GRAPH
                else:
                    cause = CAUSE_KERNELS.format(family=judge.family)
                raise ExportError(MSG_AGREEMENT.format(path=path, target=target, kernels=judge.describe(),
                                                       summary=c.summary, cause=cause))
    return tuple(verdicts)
