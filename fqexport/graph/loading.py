"""Loading a user's float model: ``module:factory`` + state_dict, a ``torch.export`` ``.pt2``
program, or (only when trusted) a pickled whole module.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fqexport.calibration.npz import available_memory_bytes
from fqexport.errors import DataError, ModelLoadError
from fqexport.global_state import GLOBAL_STATE_LOCK, one_at_a_time
from fqexport.graph.decode import with_decode
from fqexport.graph.exported_program import (
    MSG_PT2_UNSAFE,
    lift_exported_modules,
    pt2_unsafe_reason,
)
from fqexport.graph.prepare import unwrap_model
from fqexport.graph.targets import free_program_names, reserved_names

log = logging.getLogger(__name__)

MSG_SPEC = (
    "model spec {spec!r} is neither 'package.module:factory' nor a .pt2 file "
    "(a pickled module needs trust_pickle=True / --trust-pickle)"
)
MSG_DECODE_SPEC = (
    "decode spec {spec!r} must be 'package.module:name' naming a function of the model's outputs or an nn.Module "
    "(instance or class)"
)
MSG_ONNX_AS_MODEL = (
    "{path}: an ONNX file; this takes the float PyTorch model ('package.module:factory' with its state_dict, "
    "a torch.export .pt2, or a pickled module): an ONNX file is what compress writes and validate reads"
)
MSG_DIR_AS_FILE = "{path} is a directory, not a {what} file: give the file"
MSG_PICKLE = (
    "{path}: loading a pickled whole module runs arbitrary code; pass trust_pickle=True "
    "(CLI: --trust-pickle) only for files you trust, or give 'module:factory' + a state_dict"
)
MSG_PT2_STATIC_BATCH = (
    "{path} was exported with a fixed batch of {batch} (torch.export.export specialises every dimension "
    "it is not told is dynamic) and fqexport runs it on batches of other sizes: export it with "
    "torch.export.export(model, (x,), dynamic_shapes=({{0: torch.export.Dim('batch')}},))"
)
MSG_PT2_INPUTS = (
    "{path}: the exported program takes {n} inputs ({names}); fqexport feeds one input (the data's 'x'): "
    "export a wrapper whose forward(x) supplies the others, e.g. torch.export.export(Wrapper(model), (x,), "
    "dynamic_shapes=({{0: torch.export.Dim('batch')}},))"
)
MSG_PT2_DYNAMIC_DIMS = (
    "{path}: the program's input is dynamic in {dims}, but fqexport's ONNX files keep only the batch "
    "dynamic: every other dimension is fixed to the calibration data's (a sequence length, an image size); "
    "export one file per size the deployment feeds"
)
MSG_PT2_RESERVED = (
    "; the program's {names} has a name torch.fx's GraphModule keeps for itself, so torch cannot rebuild "
    "the module: rename that attribute before torch.export, or give the model's code and weights instead "
    "(--model module:factory --weights; fqexport renames it then)"
)
STATIC_BATCH_KEY = "fqexport_static_batch"  # GraphModule.meta of a .pt2 with a fixed batch: its message
# GraphModule.meta of a .pt2: (its path, its input's sample dims: an int where torch.export fixed it, None where dynamic)
PT2_SAMPLE_DIMS_KEY = "fqexport_pt2_sample_dims"
MSG_PT2_SAMPLE_SHAPE = (
    "{source}: field 'x' has sample shape {data} but {path} was exported for samples of shape {program} "
    "(torch.export fixes every dimension it is not told is dynamic, and the program may compute with those "
    "sizes: torch itself refuses other ones); give data of that shape, or export the program at this size or "
    "with that dimension dynamic (dynamic_shapes)"
)
MSG_TORCHSCRIPT = (
    "{path}: a TorchScript archive (torch.jit.save): fqexport quantizes the Python nn.Module, whose "
    "graph torch.fx traces; give the model as 'package.module:factory' with its state_dict "
    "(CLI: --model pkg.mod:factory --weights FILE), or a torch.export .pt2"
)
MSG_TORCHSCRIPT_WEIGHTS = (
    "{path}: a TorchScript archive (torch.jit.save), not a state_dict: give the weights as "
    "torch.save(model.state_dict(), FILE) (fqexport quantizes the Python nn.Module the factory builds)"
)
MSG_EMA_BESIDE = (
    "{path}: loaded its '{key}' entry, the trained weights; it also holds {ema!r}, their moving average: to "
    "compress that one, save it alone (torch.save(ckpt[{ema!r}], FILE)) and give that file"
)
MSG_PICKLE_MODULE = (
    "{path}: the pickled model's class lives in module '{module}', which cannot be imported: run "
    "from the folder that holds it or add that folder to PYTHONPATH (a pickle stores the class by "
    "its module name, not its code)"
)

MSG_PICKLE_MAIN = (
    "{path}: the pickled model's class {name!r} was defined in the script that saved it (module "
    "'__main__'), which fqexport cannot import: move the class into a module (e.g. net.py) and save "
    "again, or save model.state_dict() and load it with --model net:{name} --weights <file>"
)

MSG_NO_WEIGHTS = (
    "factory '{spec}' was given no weights: the model keeps the parameters the factory sets "
    "(random unless it loads a checkpoint itself); pass weights= (CLI: --weights FILE) to load a state_dict"
)
MSG_WEIGHTS_AS_MODEL = (
    "{path}: holds {what}, not a model; give the model as 'package.module:factory' (a function "
    "returning the nn.Module) and this file as its weights (CLI: --model pkg.mod:factory --weights {path})"
)
MSG_INFLATES = (
    "{path}: its {n} archive entries inflate to {need:.2f} GB in memory ({stored:.2f} MB in the file), more than "
    "the {avail:.2f} GB available: refused before torch.load allocates them"
)
MSG_PICKLED_GLOBAL = "it pickles {name}, not only tensors (a whole model? save its state_dict instead)"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")

_TORCH_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")


def _clean(err: BaseException) -> str:
    """``err`` as one line, without torch's advice to re-run ``torch.load`` with
    ``weights_only=False`` (never suggest that for a file fqexport did not make)."""
    parts = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    kept = [p for p in parts if "weights_only" not in p and "Weights only load failed" not in p]
    text = " ".join(" ".join(kept).split())[:500]
    pickled = _UNSUPPORTED_GLOBAL.search(str(err))
    if pickled is not None and pickled.group(1) not in text:  # torch's advice dropped above named it
        text = (text + " " if text else "") + MSG_PICKLED_GLOBAL.format(name=pickled.group(1))
    if len(kept) < len(parts):
        text = (text + " " if text else "") + "(only plain tensors are read from an untrusted file)"
    if not re.search(r"[A-Za-z]{3}", text):  # torch's bare KeyError('101'), an empty EOFError
        text = f"{type(err).__name__}{': ' + text if text else ''} (not a file torch.save wrote, or a truncated one)"
    return text


@contextlib.contextmanager
def _quiet_torch():
    """Silence torch.export's own warnings (a 12-line traceback before our one-line error)."""
    loggers = [logging.getLogger(name) for name in _TORCH_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with GLOBAL_STATE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_pt2(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """A ``torch.export`` ``.pt2`` program as a plain module; without ``trust_pickle`` the archive
    is inspected first and refused when loading it would run code from the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: .pt2 file not found")
    check_inflated_size(path)
    if not trust_pickle:
        reason = pt2_unsafe_reason(path)
        if reason is not None:
            raise ModelLoadError(MSG_PT2_UNSAFE.format(path=path, reason=reason))
    try:
        with _quiet_torch():
            program = torch.export.load(str(path))
    except Exception as err:
        raise ModelLoadError(f"{path}: cannot load torch.export program: {_clean(err)}") from err
    try:
        with _quiet_torch():
            free_program_names(program)  # a top-level `meta` or `graph`: renamed, as a traced model's
            model = program.module()
    except Exception as err:
        kept = reserved_names(list(program.state_dict) + list(program.constants))
        advice = MSG_PT2_RESERVED.format(names=", ".join(map(repr, kept))) if kept else ""
        raise ModelLoadError(f"{path}: cannot load torch.export program: {_clean(err)}{advice}") from err
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) > 1:  # checked here: running it on one input would blame its batch or the data
        raise ModelLoadError(MSG_PT2_INPUTS.format(path=path, n=len(user_inputs), names=", ".join(user_inputs)))
    lifted = lift_exported_modules(model)
    batch = _static_batch(program)
    if batch is not None:  # many graphs run on any batch all the same; one that does not says why
        lifted.meta[STATIC_BATCH_KEY] = MSG_PT2_STATIC_BATCH.format(path=path, batch=batch)
    shape = _input_shape(program)
    if shape:
        lifted.meta[PT2_SAMPLE_DIMS_KEY] = (str(path), tuple(d if isinstance(d, int) else None for d in shape[1:]))
    dynamic = dynamic_sample_dims(program)
    if dynamic:
        log.warning(MSG_PT2_DYNAMIC_DIMS.format(path=path, dims=", ".join(dynamic)))
    return lifted


def _input_shape(program: Any) -> tuple | None:
    """The shape of a program's first input: ints, and SymInts where it was exported dynamic."""
    user_inputs = list(program.graph_signature.user_inputs)
    first = next((n for n in program.graph.nodes if n.op == "placeholder" and user_inputs and n.name == user_inputs[0]),
                 None)
    val = None if first is None else first.meta.get("val")
    shape = getattr(val, "shape", None)
    return tuple(shape) if shape else None


def _static_batch(program: Any) -> int | None:
    """The batch size a program's first input is fixed at (``torch.export.export(model, (x,))``
    without ``dynamic_shapes`` specialises it to x's), None when its batch is symbolic."""
    shape = _input_shape(program)
    if not shape:
        return None
    return int(shape[0]) if isinstance(shape[0], int) else None


def check_pt2_sample_shape(model: Any, sample_shape: tuple[int, ...], source: str) -> None:
    """A DataError when ``model`` is a loaded ``.pt2`` whose fixed sample dims differ from the
    data's ``sample_shape`` (:data:`MSG_PT2_SAMPLE_SHAPE`); nothing for another model."""
    meta = model.meta if isinstance(model, torch.fx.GraphModule) else {}  # a user's `self.meta` is no dict
    path, dims = meta.get(PT2_SAMPLE_DIMS_KEY, (None, None))
    if dims is None:
        return
    fits = len(dims) == len(sample_shape) and all(d is None or d == n for d, n in zip(dims, sample_shape))
    if not fits:
        program = "[" + ", ".join("dynamic" if d is None else str(d) for d in dims) + "]"
        raise DataError(MSG_PT2_SAMPLE_SHAPE.format(source=source, data=list(sample_shape), path=path, program=program))


def dynamic_sample_dims(program: Any) -> list[str]:
    """``"dim 2 (s1)"`` for each dimension after the batch that the program's input was exported
    dynamic in (a sequence's length, an image's size)."""
    shape = _input_shape(program) or ()
    return [f"dim {i} ({d})" for i, d in enumerate(shape) if i > 0 and not isinstance(d, int)]


def _is_onnx(path: Path) -> bool:
    """Whether ``path`` looks like an ONNX file: its suffix, or a protobuf opening with field 1
    (``ir_version``, tag byte 0x08) where a pickle opens with 0x80 and a torch.save zip with 'PK'."""
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x08"


def check_inflated_size(path: Path) -> None:
    """Refuse a torch zip archive (checkpoint, pickled module, ``.pt2``) whose entries declare more
    bytes than the memory available (:data:`MSG_INFLATES`): torch's reader allocates each entry at
    the size the zip's directory declares, so a deflated storage of a few MB may ask for GBs. A
    file that is not a zip (torch's legacy format) holds its tensors at their size: not checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    need, avail = sum(i.file_size for i in infos), available_memory_bytes()
    if need > avail:
        raise ModelLoadError(MSG_INFLATES.format(path=path, n=len(infos), need=need / 1e9,
                                                 stored=path.stat().st_size / 1e6, avail=avail / 1e9))


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript zip archive (it holds the scripted ``code/``; a
    ``torch.save`` file holds ``data.pkl`` and tensors only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/")[1:2] == ["code"] or n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _working_directory_importable() -> None:
    """Put the working directory on ``sys.path``, as ``python`` does for a script: a factory
    spec or a pickled model may name a module of the folder the user runs fqexport from."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


MSG_USER_EXIT = "{what} called sys.exit({code!r}) while fqexport ran it, which is not fqexport's exit{hint}"
MSG_IMPORT_EXIT_HINT = (
    ": a script's top level (argparse's parse_args(), sys.exit) runs when its module is imported; put it under "
    "`if __name__ == \"__main__\":`, or give fqexport a module that only defines the model"
)


@contextlib.contextmanager
def user_code(what: str, program: str, hint: str = "") -> Iterator[None]:
    """Run the user's module or factory (``what`` names it in messages): ``sys.argv`` is
    ``[program]`` (its module's name) only, so a module-level ``parse_args()`` does not read
    fqexport's command line, and its ``sys.exit`` is a ModelLoadError (:data:`MSG_USER_EXIT` +
    ``hint``), not fqexport's exit code."""
    argv = sys.argv
    sys.argv = [program]
    try:
        yield
    except SystemExit as err:
        raise ModelLoadError(MSG_USER_EXIT.format(what=what, code=err.code, hint=hint)) from None
    finally:
        sys.argv = argv


def _import_object(spec: str, what: str = "model", malformed: str = MSG_SPEC) -> Any:
    """The object ``package.module:attr`` names (``what``: model or decode, for the messages)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(malformed.format(spec=spec))
    _working_directory_importable()
    try:
        with user_code(f"module '{module_name}' of {what} spec {spec!r}", module_name, MSG_IMPORT_EXIT_HINT):
            module = importlib.import_module(module_name)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"cannot import module '{module_name}' of {what} spec {spec!r}: {err}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"module '{module_name}' has no attribute '{attr}' ({what} spec {spec!r})")
        obj = getattr(obj, part)
    return obj


def load_decode(spec: str) -> Callable[[Any], torch.Tensor] | nn.Module:
    """The decode ``package.module:name`` names: a function of the model's outputs, an
    ``nn.Module`` instance, or an ``nn.Module`` class (instantiated without arguments)."""
    obj = _import_object(str(spec), "decode", MSG_DECODE_SPEC)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        try:
            with user_code(f"decode '{spec}'", str(spec).partition(":")[0]):
                obj = obj()
        except ModelLoadError:
            raise
        except Exception as err:
            raise ModelLoadError(f"decode '{spec}' (an nn.Module class) failed to construct without arguments: "
                                 f"{type(err).__name__}: {err}") from err
    elif isinstance(obj, type) or not callable(obj):
        raise ModelLoadError(MSG_DECODE_SPEC.format(spec=spec) + f"; it names a {type(obj).__name__}")
    return obj


_STATE_KEYS = ("state_dict", "model_state_dict", "model")  # where checkpoint dicts keep the model's
_EXTRA_STATE = "_extra_state"  # a module's get_extra_state(): any value, in a state_dict too


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    found = obj
    if isinstance(obj, dict):
        key = next((k for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if key is not None:
            found = obj[key]
            averaged = [k for k in obj if k != key and isinstance(obj[k], dict) and "ema" in str(k).lower()]
            if averaged:  # timm's train.py: 'state_dict' and 'state_dict_ema'
                log.warning(MSG_EMA_BESIDE.format(path=path, key=key, ema=averaged[0]))
            elif len(obj) > 1:
                log.info("%s: the model's weights are its '%s' entry (of %s)", path, key, ", ".join(map(repr, obj)))
        if all(isinstance(k, str) for k in found) and all(
                isinstance(v, torch.Tensor) or k.endswith(_EXTRA_STATE) for k, v in found.items()):
            return found
    keys = f"; it holds the keys {', '.join(repr(k) for k in list(obj)[:8])}" if isinstance(obj, dict) else ""
    raise ModelLoadError(
        f"{path}: not a state_dict (expected a dict of parameter name -> tensor, "
        f"or one under {'/'.join(repr(k) for k in _STATE_KEYS)}){keys}"
    )


# What wrappers and trainers put before every key: DataParallel/DDP and AveragedModel ("module."),
# torch.compile ("_orig_mod."), a LightningModule holding the model as self.model ("model.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "module._orig_mod.", "_orig_mod.module.", "model.module.")
MSG_PREFIXES = ("{path}: the keys under each of {prefixes} are exactly the model's: save the state_dict of the "
                "one you mean (e.g. torch.save(module.net.state_dict(), ...))")
MSG_PREFIX_REST = ("{path}: the model's weights are the keys under {prefix!r}, loaded without it; the {n} other "
                   "keys of {total} ({some}) are not the model's and are ignored")
_WRAPPER_EXTRAS = frozenset({"n_averaged"})  # AveragedModel's own buffer beside the wrapped module's


def _without_wrapper_prefix(state: dict, model: nn.Module, path: Path) -> dict:
    """``state`` with the prefix a training wrapper put before every key removed, when that makes it
    the model's keys exactly (else ``state`` as it is, for the mismatch message)."""
    own = set(model.state_dict())
    if own <= set(state):
        return state
    for prefix in _WRAPPER_PREFIXES:
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        rest = {k for k in state if not k.startswith(prefix)}
        if inner and set(inner) == own and rest <= _WRAPPER_EXTRAS:
            log.info("%s: every key starts with %r (a training wrapper's); loaded without it", path, prefix)
            return inner
    return _under_one_prefix(state, own, path)


def _under_one_prefix(state: dict, own: set[str], path: Path) -> dict:
    """The keys under the one prefix (``net.``: a LightningModule's ``self.net``, ``backbone.``)
    that are exactly the model's keys, without it (other keys: warned as ignored); ``state`` when
    no prefix is; a ModelLoadError when several are (a teacher and a student: which one?)."""
    probe = next(iter(own), None)
    if probe is None:
        return state
    prefixes = {k[:-len(probe)] for k in state if k.endswith("." + probe)}
    fits = sorted(p for p in prefixes if {k[len(p):] for k in state if k.startswith(p)} == own)
    if len(fits) > 1:
        raise ModelLoadError(MSG_PREFIXES.format(path=path, prefixes=", ".join(map(repr, fits))))
    if not fits:
        return state
    inner = {k[len(fits[0]):]: v for k, v in state.items() if k.startswith(fits[0])}
    rest = [k for k in state if not k.startswith(fits[0])]
    if rest:
        log.warning(MSG_PREFIX_REST.format(path=path, prefix=fits[0], n=len(rest), total=len(state),
                                           some=", ".join(map(repr, rest[:3]))))
    else:
        log.info("%s: every key starts with %r; loaded without it", path, fits[0])
    return inner


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` with clear errors."""
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(MSG_DIR_AS_FILE.format(path=path, what="checkpoint"))
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint file not found")
    if _is_torchscript(path):
        raise ModelLoadError(MSG_TORCHSCRIPT_WEIGHTS.format(path=path))
    check_inflated_size(path)
    try:
        # a training script's argparse.Namespace of options (timm's train.py saves one under 'args'):
        # plain attributes, whose values the weights-only unpickler still restricts
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"{path}: cannot read checkpoint with torch.load(weights_only=True): {_clean(err)}") from err
    return _state_dict_of(obj, path)


def _refuse_weights_only(path: Path) -> None:
    """A model file that ``torch.load(weights_only=True)`` reads holds tensors only (a state_dict
    or a checkpoint dict), never a module: say so, instead of asking for ``--trust-pickle``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return  # a pickled module (or not a torch file): the caller's checks say which
    if isinstance(obj, nn.Module):
        return
    try:
        n = len(_state_dict_of(obj, path))
        what = f"a state_dict of {n} tensors"
    except ModelLoadError:
        what = f"a {type(obj).__name__}"
    raise ModelLoadError(MSG_WEIGHTS_AS_MODEL.format(path=path, what=what))


def _describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:5]}" + (" …" if len(missing) > 5 else ""))
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:5]}" + (" …" if len(unexpected) > 5 else ""))
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:5]))
    return ", ".join(parts)


@one_at_a_time
def load_model(
    spec: str | nn.Module,
    weights: str | Path | None = None,
    *,
    trust_pickle: bool = False,
    factory_kwargs: dict[str, Any] | None = None,
    decode: str | None = None,
) -> nn.Module:
    """Load a float model in eval mode.

    Args:
        spec: ``"package.module:factory"``, a ``.pt2`` file from ``torch.export.save``, a
            pickled ``nn.Module`` file (needs ``trust_pickle``), or an ``nn.Module``.
        weights: a state_dict file for the factory (``torch.load(weights_only=True)``).
        trust_pickle: allow unpickling a whole module (runs code from the file).
        factory_kwargs: keyword arguments of the factory.
        decode: ``"package.module:name"`` of the decode to compose after a model that returns raw
            head maps (:func:`~fqexport.graph.decode.with_decode`; loaded by :func:`load_decode`).
    """
    if isinstance(spec, nn.Module):
        model = spec
    elif str(spec).endswith(".pt2"):
        model = load_pt2(spec, trust_pickle=trust_pickle)
    elif ":" in str(spec) and not Path(str(spec)).is_file():
        factory = _import_object(str(spec))
        if not callable(factory):
            raise ModelLoadError(f"'{spec}' is not callable; it must be a factory returning an nn.Module")
        try:
            with user_code(f"factory '{spec}'", str(spec).partition(":")[0]):
                model = factory(**(factory_kwargs or {}))
        except ModelLoadError:
            raise
        except Exception as err:
            raise ModelLoadError(f"factory '{spec}' failed: {type(err).__name__}: {err}") from err
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"factory '{spec}' returned {type(model).__name__}, not an nn.Module")
        if weights is None:
            log.warning(MSG_NO_WEIGHTS.format(spec=spec))
    elif Path(str(spec)).is_dir():
        raise ModelLoadError(MSG_DIR_AS_FILE.format(path=spec, what="model"))
    elif Path(str(spec)).is_file():
        path = Path(str(spec))
        if _is_onnx(path):
            raise ModelLoadError(MSG_ONNX_AS_MODEL.format(path=path))
        if _is_torchscript(path):
            raise ModelLoadError(MSG_TORCHSCRIPT.format(path=path))
        check_inflated_size(path)
        _refuse_weights_only(path)
        if not trust_pickle:
            raise ModelLoadError(MSG_PICKLE.format(path=path))
        _working_directory_importable()
        try:
            # unpickling imports the model's module and may call its code: a sys.exit there is not fqexport's exit
            with user_code(f"unpickling {path}", path.stem, MSG_IMPORT_EXIT_HINT):
                model = torch.load(path, map_location="cpu", weights_only=False)
        except ModelLoadError:
            raise
        except ModuleNotFoundError as err:
            raise ModelLoadError(MSG_PICKLE_MODULE.format(path=path, module=err.name)) from err
        except AttributeError as err:  # "Can't get attribute 'Net' on <module '__main__' ...>"
            found = re.search(r"Can't get attribute '([^']+)' on <module '(?:[\w.]+\.)?__main__'", str(err))
            if found is None:
                raise ModelLoadError(f"{path}: cannot unpickle a model: {err}") from err
            raise ModelLoadError(MSG_PICKLE_MAIN.format(path=path, name=found.group(1))) from err
        except Exception as err:
            raise ModelLoadError(f"{path}: cannot unpickle a model: {err}") from err
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"{path}: holds {type(model).__name__}, not an nn.Module")
    else:
        raise ModelLoadError(MSG_SPEC.format(spec=spec))

    if weights is not None:
        # into the module a torch.compile / DataParallel factory wraps: it shares the wrapper's weights,
        # and a checkpoint holds its keys (any wrapper's prefix is stripped to match them)
        target = unwrap_model(model)
        state = _without_wrapper_prefix(load_state_dict_file(weights), target, Path(weights))
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = _describe_mismatch(target, state) or str(err)
            raise ModelLoadError(f"{weights}: state_dict does not match the model from {spec!r}: {detail}") from err
    if decode is not None:
        model = with_decode(model.eval(), load_decode(decode), name=str(decode))
    return model.eval()
