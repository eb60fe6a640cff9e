"""What every subcommand shares: exit codes, the table printer, the option groups built from the
config dataclasses (choices and defaults are defined once, in ``fqexport.config``), and the
parsers of ``NAME=VALUE`` flags."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence, get_args

from fqexport.config import (
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

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3  # a signal n exits 128 + n (cli/main.py)

_Q = QuantConfig()
_MP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MixedPrecisionConfig)}


def parse_assignments(items: Sequence[str], flag: str, value: str, convert, example: str) -> dict:
    """``["a=1", "b=2"]`` → ``{"a": convert("1"), ...}`` with errors naming ``flag``.

    ``value`` names the right-hand side in messages: "BITS" (an integer) or "W" (a number).
    """
    out = {}
    for item in items:
        name, sep, raw = item.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"{flag} {item!r}: expected NAME={value}, e.g. {example}")
        try:
            out[name] = convert(raw)
        except ValueError as err:
            kind = "an integer" if convert is int else "a number"
            raise ConfigError(f"{flag} {item!r}: {value} must be {kind}") from err
    return out


def parse_layer_bits(items: Sequence[str], flag: str = "--layer-bits") -> dict[str, int]:
    """``["fc=8"]`` → ``{"fc": 8}``; errors name ``flag``."""
    return parse_assignments(items, flag, "BITS", int, "fc=8")


def parse_group_weights(text: str | None):
    """``equal`` (None), ``samples``, or ``NAME=W,NAME=W``."""
    if text is None or text == "equal":
        return None
    if text == "samples":
        return "samples"
    return parse_assignments(text.split(","), "--group-weights", "W", float, "minority=2,majority=1")


def int_at_least(low: int):
    """An argparse ``type`` accepting integers >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}")
        return value

    return parse


def print_table(rows: list[dict], columns: list[str], file=None) -> None:
    """Print ``rows`` as an aligned text table."""
    file = file or sys.stdout
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name (``fqexport validate ... -q``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an internal error")
    return common


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--trust-pickle`` (compress, sweep, analyze)."""
    p.add_argument("--model", required=True, help="'package.module:factory', a torch.export .pt2 file, "
                   "or a pickled module file (with --trust-pickle)")
    p.add_argument("--weights", help="state_dict file for the factory (torch.load weights_only=True)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled whole module")


def add_model_and_quant_options(p: argparse.ArgumentParser) -> None:
    """The model, calibration data and QuantConfig options (``compress`` and ``sweep``)."""
    add_model_options(p)
    p.add_argument("--calib", required=True, help="calibration data: .npz (x, group[, y, group_names]) or CSV manifest "
                   "(path,label,group; images as CHW float in [0, 1], no resize, no normalisation: "
                   "save normalised data with fqexport.save_npz)")
    p.add_argument("--weight-bits", type=int, default=_Q.weight_bits,
                   help=f"weight width of every layer, 2..8 (default {_Q.weight_bits})")
    p.add_argument("--layer-bits", action="append", default=[], metavar="NAME=BITS", help="per-layer width (repeatable)")
    p.add_argument("--method", choices=get_args(Method), default=_Q.method, help=f"weight quantizer (default {_Q.method})")
    p.add_argument("--order", choices=get_args(Order), default=_Q.order, help="column order of the solver")
    p.add_argument("--damp", type=float, default=_Q.damp, help="Hessian dampening relative to mean(diag H)")
    p.add_argument(
        "--solver-target", choices=get_args(SolverTarget), default=_Q.solver_target,
        help="fit each layer to the float model's output (default; corrects the error its quantized "
             "inputs carry) or to its own float weights on those inputs (plain GPTQ)",
    )
    p.add_argument("--block-size", type=int, default=_Q.block_size)
    p.add_argument("--group-weights", help="'equal' (default), 'samples', or NAME=W,NAME=W")
    p.add_argument("--calibration", choices=get_args(Calibration), default=_Q.calibration,
                   help="activation range observer (default minmax: never clips a group's tail)")
    p.add_argument("--percentile", type=float, default=_Q.percentile)
    p.add_argument("--num-calib", type=int, default=_Q.num_calib, help="calibration samples, drawn group-balanced")
    p.add_argument("--batch-size", type=int, default=_Q.batch_size)
    p.add_argument("--weight-range", choices=get_args(WeightRange), default=_Q.weight_range,
                   help="x86-safe: 8-bit weights in |q|<=63 so AVX2 u8*s8 kernels cannot saturate; "
                   "full: |q|<=127 for VNNI CPUs and GPUs")
    p.add_argument("--target", choices=get_args(ExportTarget), default=_Q.target,
                   help="where the export runs; the export check also emulates its int8 kernels "
                   "(portable, the default, and x86-avx2: the saturating AVX2 kernels; gpu: none). "
                   "--weight-range full needs x86-vnni, arm64 or gpu")
    p.add_argument("--storage", choices=get_args(Storage), default=_Q.storage,
                   help="auto: 2-bit codes INT2 and 3-4-bit codes INT4 behind a Cast that ONNX Runtime folds at load "
                   "(the fused int8 kernels run), 3-4-bit vector Linears as MatMulNBits, wider layers int8; "
                   "packed: also Linears over tokens as MatMulNBits (fp32 speed there); int8: every layer int8")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=_Q.clip_search,
                   help="per-channel clipping search for weight scales (default: on for rtn and 2-bit layers, off for the solver at 3+ bits)")
    p.add_argument("--no-bias-correction", action="store_true")
    p.add_argument("--no-bn-reestimate", action="store_true")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) when any weight layer would stay in float, naming all of them")
    p.add_argument("--device", choices=get_args(Device), default=_Q.device,
                   help="where the Hessians and the solver run (default auto: CUDA when available)")
    p.add_argument("--max-activation-memory-mb", type=float, default=_Q.max_activation_memory_mb,
                   help="cap on cached calibration activations; beyond it they spill to a temp dir")
    p.add_argument("--seed", type=int, default=_Q.seed)


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig of the parsed ``add_model_and_quant_options`` flags."""
    return QuantConfig(
        weight_bits=args.weight_bits, layer_bits=parse_layer_bits(args.layer_bits), method=args.method,
        order=args.order, damp=args.damp, solver_target=args.solver_target, block_size=args.block_size,
        group_weights=parse_group_weights(args.group_weights), calibration=args.calibration,
        percentile=args.percentile, num_calib=args.num_calib, batch_size=args.batch_size,
        weight_range=args.weight_range, target=args.target, storage=args.storage, bias_correction=not args.no_bias_correction,
        bn_reestimate=not args.no_bn_reestimate, strict=args.strict, seed=args.seed,
        clip_search=args.clip_search, device=args.device,
        max_activation_memory_mb=args.max_activation_memory_mb,
    )


def add_search_options(mp) -> None:
    """The MixedPrecisionConfig options but the budget (``compress`` and ``sweep``)."""
    d = _MP_DEFAULTS
    mp.add_argument("--objective", choices=get_args(MixedObjective), default=d["objective"])
    mp.add_argument("--bit-choices", default=",".join(str(b) for b in d["bit_choices"]),
                    help="candidate widths, comma separated")
    mp.add_argument("--pin", action="append", default=[], metavar="PATTERN=BITS",
                    help="fix layers matching a name pattern (fnmatch) to a width, e.g. 'stem.*=8' (repeatable)")
    mp.add_argument("--pin-first-last", type=int, default=d["pin_first_last"], metavar="BITS",
                    help="fix the first and the last quantizable layer to this width (e.g. 8)")
    mp.add_argument("--sensitivity", choices=get_args(SensitivityMethod), default=d["sensitivity"])
    mp.add_argument("--candidates", type=int, default=d["num_candidates"],
                    help="allocations verified on held-out calibration data")
    mp.add_argument("--verify-folds", type=int, default=d["verify_folds"],
                    help="cross-fitting folds of the verification: each candidate is quantized on all folds but "
                    "one and measured on the one left out, for every fold (1: a single 30%% hold-out split)")
    mp.add_argument("--objective-weights", metavar="NAME=W,...", help="group weights of --objective weighted")
    mp.add_argument("--sensitivity-cache", help="JSON file caching the sensitivity table across runs")
    e = EngineConfig()
    mp.add_argument("--engine", choices=get_args(EngineKind), default=e.engine,
                    help="where the search's independent tasks run: serial, local (a process pool), ray "
                    "(pip install 'fqexport[ray]'); auto: local with more than one core. Results do not depend on it")
    mp.add_argument("--workers", type=int_at_least(1), default=e.workers, metavar="N",
                    help="worker processes of --engine local, CPUs of a local Ray cluster (default: all cores); "
                    "with --finetune also the DataLoader workers reading --train batch by batch (default 0: in process)")
    mp.add_argument("--ray-address", default=e.ray_address, metavar="ADDRESS",
                    help="a running Ray cluster: auto (on its head node) or ray://HEAD:10001 (default: start a local one)")
    mp.add_argument("--task-cpus", type=float, default=e.task_cpus, help="Ray CPUs per task")
    mp.add_argument("--task-gpus", type=float, default=e.task_gpus, help="Ray GPUs per task (a fraction shares a GPU)")


def search_config(args: argparse.Namespace, **budget) -> MixedPrecisionConfig:
    """The MixedPrecisionConfig of the parsed ``add_search_options`` flags and ``budget``."""
    try:
        choices = tuple(int(b) for b in args.bit_choices.split(","))
    except ValueError as err:
        raise ConfigError(f"--bit-choices {args.bit_choices!r}: expected integers like 2,3,4,8") from err
    return MixedPrecisionConfig(
        **budget, objective=args.objective, bit_choices=choices, pins=parse_layer_bits(args.pin, "--pin"),
        pin_first_last=args.pin_first_last,
        sensitivity=args.sensitivity, num_candidates=args.candidates, verify_folds=args.verify_folds,
        group_weights=parse_assignments(args.objective_weights.split(","), "--objective-weights", "W", float,
                                         "minority=2") if args.objective_weights else None,
        cache_path=args.sensitivity_cache, seed=args.seed,
        engine=EngineConfig(engine=args.engine, workers=args.workers, ray_address=args.ray_address,
                            task_cpus=args.task_cpus, task_gpus=args.task_gpus),
    )
