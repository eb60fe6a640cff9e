"""The option groups several subcommands share, built from the config dataclasses (choices and
defaults are defined once, in ``fqexport.config``), and the configs of their parsed flags: the
model (compress, sweep, analyze), ``QuantConfig`` (compress, sweep) and the search's
``MixedPrecisionConfig`` (compress, sweep). A flag that counts only with another option is
refused without it (:class:`OnlyWith` tables, :func:`refuse_ignored`), before any compute."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence, get_args

from fqexport.cli.common import (
    SEED,
    int_at_least,
    parse_group_assignments,
    parse_group_weights,
    parse_layer_bits,
)
from fqexport.config import (
    DEFAULT_BIT_CHOICES,
    Calibration,
    Device,
    EngineConfig,
    EngineKind,
    ExportTarget,
    Method,
    MixedObjective,
    MixedPrecisionConfig,
    Order,
    QuantConfig,
    SensitivityMethod,
    SolverTarget,
    Storage,
    WeightRange,
)
from fqexport.errors import ConfigError

_Q = QuantConfig()
_MP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MixedPrecisionConfig)}
_ENGINE = EngineConfig()

# The options only the mixed-precision search reads (dest -> flag). They default to None (or [])
# so that "given" can be told from "left at its default": --learn-bits refuses them by name.
SEARCH_ONLY_FLAGS = {
    "objective": "--objective", "pin": "--pin", "pin_first_last": "--pin-first-last",
    "sensitivity": "--sensitivity", "candidates": "--candidates", "no_guard": "--no-guard", "verify_folds": "--verify-folds",
    "objective_weights": "--objective-weights", "sensitivity_cache": "--sensitivity-cache",
    "engine": "--engine", "ray_address": "--ray-address", "task_cpus": "--task-cpus", "task_gpus": "--task-gpus",
}


# The tasks (fqexport.tasks.resolve.TASK_NAMES; not imported here: the parsers load no stage) and
# the detection layouts (fqexport.tasks.detection.LAYOUTS). tests/test_tasks_cli.py checks both lists.
TASKS = ("classification", "detection", "segmentation")
LAYOUTS = ("v5", "v8")
MSG_WEIGHTED_NEEDS_WEIGHTS = (
    "--objective weighted needs --objective-weights NAME=W,... (one weight per group, e.g. minority=2,majority=1); "
    "--group-weights weights the Hessians, not the objective"
)
MSG_OBJECTIVE_WEIGHTS = (
    "--objective-weights: group weights of --objective weighted, which --objective {objective} would ignore; "
    "add --objective weighted or drop them"
)
MSG_LAYOUT = "--layout {layout} is an option of --task detection (got --task {task})"


def output_path(text: str) -> Path:
    """An output flag's path: ``Path(text)``, but a file named ``-`` spelled ``./-`` (which
    ``Path`` shortens to ``-``, the standard output that ``check_paths`` refuses) absolute."""
    path = Path(text)
    return Path(os.path.abspath(text)) if text != "-" and os.fspath(path) == "-" else path


def add_task_options(p: argparse.ArgumentParser) -> None:
    """``--task`` and ``--layout`` (compress, sweep, analyze, validate)."""
    p.add_argument("--task", choices=TASKS, default=None,
                   help="what the model does: classification (logits [N, C]), detection (YOLOv5 [N, K, 5+C] or "
                   "YOLOv8 [N, 4+C, K], NMS after the model, per-group COCO mAP) or segmentation (logits [N, C, H, W], "
                   "per-group mIoU). Default: inferred from the data's fields (boxes, masks) and the model's output, "
                   "and stated in the console")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="a detector's output layout: v5 [N, K, 5+C] (cx, cy, w, h, objectness, classes) or v8 "
                   "[N, 4+C, K] (default: inferred from the output's shape)")


def task_spec(args: argparse.Namespace) -> tuple[str | None, dict]:
    """``(task name or None, its options)`` of ``--task`` / ``--layout`` (checked, nothing imported)."""
    task, layout = getattr(args, "task", None), getattr(args, "layout", None)
    if layout is not None and task not in (None, "detection"):
        raise ConfigError(MSG_LAYOUT.format(layout=layout, task=task))
    if layout is not None:
        return "detection", {"layout": layout}
    return task, {}


# Widths set by hand, which a budget's search (or --learn-bits) replaces with its own.
FIXED_WIDTH_FLAGS = {"weight_bits": "--weight-bits", "layer_bits": "--layer-bits"}
MSG_WIDTHS_WITH_BUDGET = (
    "{flags}: a budget lets the search choose every layer's width (from --bit-choices), so they would be "
    "ignored; fix a layer's width with --pin NAME=BITS, or drop the budget"
)


def given_values(args: argparse.Namespace, dests) -> dict[str, object]:
    """The flags of ``dests`` given on the command line (parse default None), as keyword arguments
    of the function they configure: the others keep that function's defaults."""
    return {dest: getattr(args, dest) for dest in dests if getattr(args, dest) is not None}


def given_flags(args: argparse.Namespace, flags: Mapping[str, str]) -> list[str]:
    """The flags of ``flags`` (dest -> flag) given on the command line (their value is not None / [])."""
    return [flag for dest, flag in flags.items() if getattr(args, dest, None) not in (None, [])]


MSG_ONLY_WITH = "{flags}: used only with {needs}, so they would be ignored here; use {needs}, or drop them"


@dataclasses.dataclass(frozen=True)
class OnlyWith:
    """Flags (dest -> flag, parse default None) that count only with another option: ``needs``
    names it as typed, ``counts`` tells whether the parsed flags set it."""

    flags: Mapping[str, str]
    needs: str
    counts: Callable[[argparse.Namespace], bool]


def refuse_ignored(args: argparse.Namespace, rules: Sequence[OnlyWith]) -> None:
    """ConfigError (exit 2) naming the flags of the first rule given without its option: they would
    be ignored. Given: any value, the default too (:func:`given_flags`)."""
    for rule in rules:
        ignored = given_flags(args, rule.flags)
        if ignored and not rule.counts(args):
            raise ConfigError(MSG_ONLY_WITH.format(flags=", ".join(ignored), needs=rule.needs))


def _eight_bit_layers(a: argparse.Namespace) -> bool:
    """Whether the flags can give a layer 8-bit weights, all that ``--weight-range`` changes: a
    search or learned widths whose choices hold 8 (given choices; the defaults do), fine-tuning's
    ``--export-bits`` with 8, or ``--weight-bits`` (default 8) / a ``--layer-bits`` at 8."""
    searched = getattr(a, "learn_bits", False) or not hasattr(a, "weight_bits") or any(
        getattr(a, f"budget_{k}", None) is not None for k in ("bits", "bytes", "bops"))
    if searched:
        return getattr(a, "bit_choices", None) is None or 8 in parse_bit_choices(a.bit_choices, ())
    export = getattr(a, "export_bits", None)
    widths = [_Q.weight_bits if a.weight_bits is None else a.weight_bits, *parse_layer_bits(a.layer_bits).values()]
    return 8 in widths or (export is not None and "8" in [w.strip() for w in export.split(",")])


# The flags of this module that count only with another option (the tables of the fine-tuning
# flags and of each subcommand's own are beside them): quant_config and search_config refuse them.
QUANT_ONLY_WITH = (
    OnlyWith({"percentile": "--percentile"}, "--calibration percentile", lambda a: a.calibration == "percentile"),
    OnlyWith({"weight_range": "--weight-range"}, "8-bit weights (--weight-bits 8, the default; an 8-bit --layer-bits; "
             "a search or --export-bits whose widths hold 8)", _eight_bit_layers),
    OnlyWith({"order": "--order", "damp": "--damp", "solver_target": "--solver-target", "block_size": "--block-size"},
             "--method solver",
             lambda a: a.method == "solver"),
)
# --model's flags that count only with some kind of --model: a factory spec unpickles nothing
MODEL_ONLY_WITH = (
    OnlyWith({"trust_pickle": "--trust-pickle"}, "a --model that is a pickled module file or a .pt2 program "
             "(a 'package.module:factory' spec unpickles nothing; --weights is read with weights_only=True)",
             lambda a: not (":" in str(a.model) and not Path(str(a.model)).is_file())),
)
SEARCH_ONLY_WITH = (
    OnlyWith({"ray_address": "--ray-address", "task_cpus": "--task-cpus", "task_gpus": "--task-gpus"}, "--engine ray",
             lambda a: a.engine == "ray"),
)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--trust-pickle`` (compress, sweep, analyze)."""
    p.add_argument("--model", required=True,
                   help="'package.module:factory' (imports and runs that Python module, from the working directory "
                   "or sys.path: see docs/safety.md), a torch.export .pt2 file, or a pickled module file "
                   "(with --trust-pickle)")
    p.add_argument("--weights", help="state_dict file for the factory, read with torch.load(weights_only=True)")
    p.add_argument("--decode", metavar="package.module:name",
                   help="for a model that returns raw head maps: the decode (a function of the model's outputs, or "
                   "an nn.Module or its class) composed after it into one graph, e.g. to YOLOv5's [N, K, 5 + C]; "
                   "it stays float like any detector's decode (docs/tasks.md); imports and runs that Python module, "
                   "as --model's spec does (docs/safety.md), also beside a .pt2 --model")
    p.add_argument("--trust-pickle", action="store_true", default=None,
                   help="allow loading a pickled whole module (and a .pt2 that torch would unpickle); runs its code")


def add_model_and_quant_options(p: argparse.ArgumentParser, fixed_widths: bool = True) -> None:
    """The model, calibration data, task and QuantConfig options (``compress`` and ``sweep``).
    ``fixed_widths=False`` (sweep: every point has a budget) keeps :data:`FIXED_WIDTH_FLAGS` out of
    ``--help``; given anyway, the command's check says why they do not apply."""
    add_model_options(p)
    add_task_options(p)
    p.add_argument("--calib", required=True, help="calibration data: .npz (x, group[, y, group_names]) or CSV manifest "
                   "(path,label,group; images as CHW float in [0, 1], no resize, no normalisation: "
                   "save normalised data with fqexport.save_npz)")
    p.add_argument("--weight-bits", type=int, default=None,
                   help=f"weight width of every layer, 2..8 (default: {_Q.weight_bits})" if fixed_widths else argparse.SUPPRESS)
    p.add_argument("--layer-bits", action="append", default=[], metavar="NAME=BITS",
                   help="per-layer width, overriding --weight-bits (repeatable)" if fixed_widths else argparse.SUPPRESS)
    p.add_argument("--method", choices=get_args(Method), default=_Q.method,
                   help="weight quantizer: solver (sensitivity-guided, error compensated) or rtn (round to nearest)")
    p.add_argument("--order", choices=get_args(Order), default=None,
                   help="column order of the solver: sensitivity (sum_i w_ij^2 H_jj), hessian-diag (H_jj), "
                   f"natural, or obs (the OBS cost of rounding each column alone) (default: {_Q.order})")
    p.add_argument("--damp", type=float, default=None,
                   help=f"Hessian dampening of the solver, relative to mean(diag H), in [0, 10) (default: {_Q.damp:g})")
    p.add_argument("--solver-target", choices=get_args(SolverTarget), default=None,
                   help="float-output: fit each layer to the float model's output (also corrects the error its "
                   "quantized inputs carry); layer: to its own float weights on those inputs (plain GPTQ) "
                   f"(default: {_Q.solver_target})")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"columns per lazy block update of the solver (speed only) (default: {_Q.block_size})")
    p.add_argument("--group-weights", metavar="equal|samples|NAME=W,...",
                   help="weight of each group in the Hessian: equal (the default: each group counts the same "
                   "whatever its size), samples (by sample count, plain GPTQ) or NAME=W,NAME=W (a group not named "
                   "gets weight 0: name every group, e.g. majority=1,minority=2)")
    p.add_argument("--calibration", choices=get_args(Calibration), default=_Q.calibration,
                   help="activation range observer; minmax never clips a group's tail")
    p.add_argument("--percentile", type=float, default=None,
                   help=f"percentile of each group's activations kept by --calibration percentile "
                   f"(default: {_Q.percentile:g})")
    p.add_argument("--num-calib", type=int, default=_Q.num_calib, help="calibration samples, drawn group-balanced")
    p.add_argument("--batch-size", type=int, default=_Q.batch_size,
                   help="samples per forward pass while collecting calibration statistics")
    p.add_argument("--weight-range", choices=get_args(WeightRange), default=None,
                   help=f"(default: {_Q.weight_range}) x86-safe: 8-bit weights in |q|<=63 so AVX2 u8*s8 kernels cannot saturate; "
                   "full: |q|<=127 (one more bit of resolution) for VNNI, arm64 and GPU kernels; accepted with any "
                   "--target, whose export check refuses the file where AVX2's pair sums change predictions")
    p.add_argument("--target", choices=get_args(ExportTarget), default=_Q.target,
                   help="where the export runs: the export check judges the file under the int8 kernels of every "
                   "CPU family the target covers (portable: all of them), with this CPU's own session for its own "
                   "family and the emulation for the others; gpu: the graph's math, and the file is S8S8 (int8 "
                   "activations, zero point 0) with 2-4-bit Linears as blocked INT4, what TensorRT and ORT's CUDA EP "
                   "take. --weight-range full is safe on x86-vnni, arm64 and gpu; the other targets measure it")
    p.add_argument("--storage", choices=get_args(Storage), default=_Q.storage,
                   help="auto: 2-bit codes INT2 and 3-4-bit codes INT4 behind a Cast that ONNX Runtime folds at load "
                   "(the fused int8 kernels run), 3-4-bit vector Linears as MatMulNBits, wider layers int8; "
                   "packed: also Linears over tokens as MatMulNBits (fp32 speed there); int8: every layer int8")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=_Q.clip_search,
                   help="per-channel clipping search for weight scales (default: on for rtn and 2-bit layers, "
                   "off for the solver at 3+ bits)")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="skip the bias correction after each layer is quantized (default: corrected)")
    p.add_argument("--no-bn-reestimate", action="store_true",
                   help="skip the BatchNorm re-estimation of a conv that absorbed a BatchNorm: after it is "
                   "quantized, a per-channel rescale of its weight scales (codes unchanged) that gives its output "
                   "the float model's variance on the calibration data (default: re-estimated)")
    p.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                   help="keep matching weight layers in float (repeatable): a module name or a regex over the full "
                   "name ('fc', 'layer4\\..*'), or 'type:ClassName' (e.g. type:Conv1d); listed in the report with the "
                   "pattern, counted at 32 bits (also in a --budget-bits budget); a pattern that matches no layer is "
                   "refused (exit 2)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) when a weight layer fqexport cannot quantize would stay in float, naming all "
                   "of them (default: such layers stay float with one warning); layers --keep-float names stay float")
    p.add_argument("--device", choices=get_args(Device), default=_Q.device,
                   help="where the Hessians and the solver run; auto: CUDA when available")
    p.add_argument("--max-activation-memory-mb", type=float, default=_Q.max_activation_memory_mb,
                   help="cap on cached calibration activations; beyond it they spill to a temp dir")
    p.add_argument("--seed", type=SEED, default=_Q.seed,
                   help="seed of the calibration draw, the search's splits and fine-tuning's sampling")


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig of the parsed ``add_model_and_quant_options`` flags (ConfigError naming a
    flag that would be ignored, :data:`QUANT_ONLY_WITH`)."""
    refuse_ignored(args, QUANT_ONLY_WITH)
    return QuantConfig(
        weight_bits=_Q.weight_bits if args.weight_bits is None else args.weight_bits, layer_bits=parse_layer_bits(args.layer_bits), method=args.method,
        order=_or(args.order, _Q.order), damp=_or(args.damp, _Q.damp),
        solver_target=_or(args.solver_target, _Q.solver_target), block_size=_or(args.block_size, _Q.block_size),
        group_weights=parse_group_weights(args.group_weights), calibration=args.calibration,
        percentile=_or(args.percentile, _Q.percentile), num_calib=args.num_calib, batch_size=args.batch_size,
        weight_range=_or(args.weight_range, _Q.weight_range), target=args.target, storage=args.storage, bias_correction=not args.no_bias_correction,
        bn_reestimate=not args.no_bn_reestimate, keep_float=tuple(args.keep_float), strict=args.strict, seed=args.seed,
        clip_search=args.clip_search, device=args.device,
        max_activation_memory_mb=args.max_activation_memory_mb,
    )


def _widths(bits) -> str:
    return ",".join(str(b) for b in bits)


def add_search_options(mp) -> None:
    """The MixedPrecisionConfig options but the budget (``compress`` and ``sweep``).

    The options of :data:`SEARCH_ONLY_FLAGS` and ``--bit-choices`` default to None: their help
    names the dataclass default, :func:`search_config` fills it in."""
    d, e = _MP_DEFAULTS, _ENGINE
    mp.add_argument("--objective", choices=get_args(MixedObjective), default=None,
                    help=f"what the allocation minimises: worst-group (the largest group loss increase), mean "
                    f"(population-weighted, HAWQ-like) or weighted (--objective-weights) (default: {d['objective']})")
    mp.add_argument("--bit-choices", default=None, metavar="B,B,...",
                    help=f"candidate widths, comma separated (default: {_widths(d['bit_choices'])} for the search: "
                    "the containers ONNX Runtime loads; with --learn-bits "
                    f"{_widths(DEFAULT_BIT_CHOICES)})")
    mp.add_argument("--pin", action="append", default=[], metavar="PATTERN=BITS",
                    help="fix layers matching a name pattern (fnmatch) to a width, e.g. 'stem.*=8' "
                    "(repeatable; default: none pinned)")
    mp.add_argument("--pin-first-last", type=int, default=None, metavar="BITS",
                    help="fix the first and the last quantizable layer to this width, e.g. 8 (default: free)")
    mp.add_argument("--sensitivity", choices=get_args(SensitivityMethod), default=None,
                    help="per-group sensitivity: measured (quantize one layer at one width, measure each group's "
                    "loss), fisher (the weights' Fisher diagonal, one pass) or output-fisher (each layer's output "
                    "error under the solver's codes, weighted by the output's Fisher diagonal: one float pass, one "
                    f"backward pass, one factorisation per layer; classifiers) (default: {d['sensitivity']})")
    mp.add_argument("--candidates", type=int, default=None, metavar="N",
                    help=f"allocations verified on held-out calibration data (default: {d['num_candidates']})")
    mp.add_argument("--no-guard", action="store_const", const=True, default=None,
                    help="verify only the --candidates allocations: no uniform allocation and no mean-objective "
                    "optimum beside them, so no never-worse-than-uniform check; with --candidates 1 the search is "
                    "its sensitivity plus one compress fit when compress leaves 50 samples of each group unused "
                    "(else a fit on a hold-out split and a refit) (default: both guards verified)")
    mp.add_argument("--verify-folds", type=int, default=None, metavar="K",
                    help="cross-fitting folds of the verification: each candidate is quantized on all folds but "
                    "one and measured on the one left out, for every fold; 1: the samples compress does not "
                    f"draw, else a single 30 percent hold-out split (default: {d['verify_folds']})")
    mp.add_argument("--objective-weights", metavar="NAME=W,...", help="group weights of --objective weighted")
    mp.add_argument("--sensitivity-cache", metavar="FILE",
                    help="JSON file caching the sensitivity table across runs (default: no cache)")
    mp.add_argument("--engine", choices=get_args(EngineKind), default=None,
                    help="where the search's independent tasks run: serial, local (a process pool), ray "
                    "(pip install 'fqexport[ray]'); auto: local with more than one core. Results do not "
                    f"depend on it (default: {e.engine})")
    mp.add_argument("--workers", type=int_at_least(1), default=e.workers, metavar="N",
                    help="worker processes of --engine local, CPUs of a local Ray cluster (default: the CPUs this process may run on: its affinity, a container's cpuset); "
                    "with --finetune also the DataLoader workers reading --train batch by batch (without "
                    "--workers: none, --train is read in this process)")
    mp.add_argument("--ray-address", default=None, metavar="ADDRESS",
                    help="a running Ray cluster: auto (on its head node) or ray://HEAD:10001 "
                    "(default: start a local one)")
    mp.add_argument("--task-cpus", type=float, default=None, metavar="N",
                    help=f"Ray CPUs per task (default: {e.task_cpus:g})")
    mp.add_argument("--task-gpus", type=float, default=None, metavar="N",
                    help=f"Ray GPUs per task; a fraction shares a GPU (default: {e.task_gpus:g})")


def engine_reads_workers(engine: str | None, ray_address: str | None) -> bool:
    """Whether the search's engine reads --workers: a local pool's processes, a local Ray cluster's
    CPUs; not the serial engine, nor a running Ray cluster (--ray-address: its own CPUs)."""
    return engine != "serial" and not (engine == "ray" and ray_address)


def parse_bit_choices(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """``--bit-choices "2,4,8"`` -> ``(2, 4, 8)``; ``default`` when not given; ConfigError when malformed."""
    if text is None:
        return tuple(default)
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError as err:
        raise ConfigError(f"--bit-choices {text!r}: expected integers like 2,3,4,8") from err


def _or(value, default):
    return default if value is None else value


def search_config(args: argparse.Namespace, **budget) -> MixedPrecisionConfig:
    """The MixedPrecisionConfig of the parsed ``add_search_options`` flags and ``budget`` (the
    dataclass defaults for the options not given; ConfigError naming a flag that would be ignored,
    :data:`SEARCH_ONLY_WITH`)."""
    d, e = _MP_DEFAULTS, _ENGINE
    refuse_ignored(args, SEARCH_ONLY_WITH)
    objective, engine = _or(args.objective, d["objective"]), _or(args.engine, e.engine)
    if args.objective_weights and objective != "weighted":
        raise ConfigError(MSG_OBJECTIVE_WEIGHTS.format(objective=objective))
    if objective == "weighted" and not args.objective_weights:
        raise ConfigError(MSG_WEIGHTED_NEEDS_WEIGHTS)
    return MixedPrecisionConfig(
        **budget, objective=objective,
        bit_choices=parse_bit_choices(args.bit_choices, d["bit_choices"]),
        pins=parse_layer_bits(args.pin, "--pin"), pin_first_last=args.pin_first_last,
        sensitivity=_or(args.sensitivity, d["sensitivity"]), num_candidates=_or(args.candidates, d["num_candidates"]),
        verify_uniform=d["verify_uniform"] and not args.no_guard, verify_mean=d["verify_mean"] and not args.no_guard,
        verify_folds=_or(args.verify_folds, d["verify_folds"]),
        group_weights=parse_group_assignments(args.objective_weights, "--objective-weights", "minority=2")
        if args.objective_weights else None,
        cache_path=args.sensitivity_cache, seed=args.seed,
        # with --engine serial, --workers can only be the fine-tuning DataLoader's: compress's and
        # sweep's OnlyWith tables refuse it otherwise (COMPRESS_ONLY_WITH, SWEEP_ONLY_WITH)
        engine=EngineConfig(engine=engine, workers=args.workers if engine_reads_workers(engine, args.ray_address) else None,
                            ray_address=args.ray_address, task_cpus=_or(args.task_cpus, e.task_cpus),
                            task_gpus=_or(args.task_gpus, e.task_gpus)),
    )
