"""ONNX Runtime sessions: open a model (optimized or not), run it in batches, see what ORT fused.

:func:`build_session` is the one place a session is built (a file or in-memory bytes, any
optimization level, an optional dump of the optimized graph); :func:`make_session` is the
single-input classifier file the gate runs.

What deploys is the *optimized* session (ORT's fused integer kernels), and on AVX2 CPUs
without VNNI it can disagree with what the graph means (ORT-NOTES.md), so this module can
open the same file both ways and dump the optimized graph to count the kernels ORT chose.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fqexport.config import MAX_THREADS
from fqexport.exporters.external_data import external_data_locations
from fqexport.errors import ConfigError, DataError, FqexportError, ModelLoadError

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

MSG_NO_FILE = "ONNX model {path} does not exist: check the path"
MSG_IS_DIR = "ONNX model {path} is a directory, not an .onnx file: give the model's .onnx file"
MSG_UNREADABLE = "cannot load ONNX model {path}: {err}. Is it a complete, valid .onnx file?"
# ORT's words when a session cannot get memory or threads (`ulimit -v`: "pthread_create failed ... Cannot
# allocate memory", onnx's C++ "std::bad_alloc")
ORT_OUT_OF_MEMORY = ("Cannot allocate memory", "bad_alloc", "Failed to allocate memory")
MSG_SESSION_MEMORY = "ONNX Runtime ran out of memory opening {path}: {err}"
MSG_NOT_UTF8 = ("ONNX model {path!r}: its path is not valid UTF-8, and ONNX Runtime opens a model with external "
                "data files by UTF-8 paths only; rename it (or copy it and its data files to a UTF-8 path)")
# ORT's CPU optimizers on an opset-21 file with int8 activations (the gpu target's S8S8): QDQ
# propagation inserts a QuantizeLinear with output_dtype INT8 beside the zero point that the S8->U8
# conversion made uint8, and the session refuses its own graph (onnxruntime issue 25526's error)
QDQ_PROPAGATION = "QDQPropagationTransformer"
QDQ_PROPAGATION_FAILURE = "does not match y_zero_point type"
MSG_PROPAGATION_OFF = (
    "ONNX Runtime's optimizers cannot load %s (%s): an ORT bug with int8 activation zero points at opset 21; "
    "it runs without QDQPropagationTransformer (the Q/DQ pairs stay where the file put them), and a deployment "
    "on ORT's CPU provider needs the same session option (disabled_optimizers)"
)
_PROPAGATION_OFF_SAID: set[str] = set()
MSG_PROVIDER = "provider={provider!r} is not one of {choices}"
MSG_NO_CUDA = (
    "provider 'cuda' asked for but CUDAExecutionProvider is not available in this onnxruntime "
    "(available: {available}). Install the GPU build: `pip uninstall onnxruntime && "
    "pip install onnxruntime-gpu`, and check that a CUDA GPU and its drivers are present"
)
MSG_CUDA_FELL_BACK = (
    "provider 'cuda' asked for but the session for {path} runs only on {providers}: no usable "
    "GPU (check drivers and CUDA/cuDNN versions matching onnxruntime-gpu: `pip install onnxruntime-gpu`)"
)
MSG_BATCH = "batch_size={batch_size!r} must be >= 1"
MSG_INPUTS = (
    "{path}: the model has {n} inputs ({names}); fqexport validates single-input classifiers"
)
MSG_OUTPUTS = (
    "{path}: the model has {n} outputs ({names}); fqexport measures a model's one output (the logits, "
    "boxes or masks): export the model with that output only"
)
MSG_EXTERNAL_ESCAPES = (
    "ONNX model {path}: external data location {loc!r} points outside the model's folder {folder}; "
    "keep the .onnx and its data files in one folder"
)
MSG_SCALAR_OUTPUT = (
    "the ONNX model returns a scalar (shape []); fqexport validates classifiers whose first output "
    "is logits [N, C]"
)
MSG_RUN = "ONNX Runtime failed on an input of shape {shape}: {err}"
MSG_THREADS = "threads={threads!r} must be from 0 (ORT's default) to {most}"
MSG_LEVEL = "level={level!r} is not one of {choices} (onnxruntime.GraphOptimizationLevel)"

# Graph optimization levels a session can be built at, by their onnxruntime names.
OPT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
IN_MEMORY = "<in-memory model>"  # the name of a model given as bytes, in error messages
# ORT's session options that make a dump of the optimized graph write its initializers (those of
# 1024 bytes or more: ORT's default) into a file beside it
_DUMP_DATA_FILE = "session.optimized_model_external_initializers_file_name"

# Op types that do the heavy lifting. Integer kernels (what a quantized model should reach)
# and float ones (a Conv/Gemm/MatMul that fell back to float math).
INTEGER_KERNELS = (
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulNBits",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
)
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose")


def kernel_line(counts: Mapping[str, int]) -> str:
    """``"QLinearAdd×3, QLinearConv×9, Gemm×1"``: the compute kernels that ran, for a table cell."""
    shown = (*INTEGER_KERNELS, "QLinearAdd", *FLOAT_KERNELS)
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()) if v and k in shown)


def _ort():
    import onnxruntime as ort

    return ort


def check_model_file(path: str | Path) -> None:
    """ModelLoadError unless ``path`` is a file: a directory and a missing path each say so."""
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(MSG_IS_DIR.format(path=path))
    if not path.is_file():
        raise ModelLoadError(MSG_NO_FILE.format(path=path))


def resolve_provider(provider: str) -> str:
    """Map ``"cpu"``/``"cuda"`` to an ORT provider name, checking it is installed."""
    if provider not in PROVIDERS:
        raise ConfigError(MSG_PROVIDER.format(provider=provider, choices=", ".join(PROVIDERS)))
    name = PROVIDERS[provider]
    available = _ort().get_available_providers()
    if name not in available:
        if provider == "cuda":
            raise ConfigError(MSG_NO_CUDA.format(available=", ".join(available)))
        raise ConfigError(f"{name} is not available in this onnxruntime ({', '.join(available)})")
    return name


def _optimization_level(ort: Any, level: str | Any) -> Any:
    """``onnxruntime.GraphOptimizationLevel`` from its name (or the value itself)."""
    name = level if isinstance(level, str) else getattr(level, "name", None)
    if name not in OPT_LEVELS:
        raise ConfigError(MSG_LEVEL.format(level=level, choices=", ".join(OPT_LEVELS)))
    return getattr(ort.GraphOptimizationLevel, name)


def build_session(
    model: str | Path | bytes,
    *,
    level: str | Any = "ORT_ENABLE_ALL",
    provider: str = "cpu",
    threads: int | None = None,
    disable: tuple[str, ...] = (),
    dump_path: str | Path | None = None,
    dump_data_file: str | None = None,
    label: str | None = None,
    spinning: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` of an ONNX file or of a serialized model: the one builder.

    Args:
        model: a path to an ``.onnx`` file (it must exist), or the bytes of a ``ModelProto``
            (``model.SerializeToString()``).
        level: the graph optimization level, by name or as the ``GraphOptimizationLevel``
            value: ``ORT_ENABLE_ALL`` (what deploys), ``ORT_ENABLE_EXTENDED`` (the QDQ fusions
            without the CPU layout transforms), ``ORT_ENABLE_BASIC``, ``ORT_DISABLE_ALL`` (what
            the graph means).
        provider: ``"cpu"`` or ``"cuda"`` (CUDA must be installed and usable, else ConfigError).
        threads: intra-op threads; ``None`` keeps ORT's default (one per physical core).
        disable: optimizer names to switch off (e.g. ``("MatMulAddFusion",)``).
        dump_path: where ORT writes the graph it runs, after its optimizations.
        dump_data_file: a file name in ``dump_path``'s folder where ORT writes the dump's large
            initializers, so that the dump loads from its own folder: without it the initializers
            of a model with external data keep the model's relative location, which does not
            resolve beside the dump.
        label: the model's name in error messages (default: the path, or ``<in-memory model>``).
        spinning: ORT's intra-op threads spin-wait for work after a run (its default); ``False``
            lets them sleep: two sessions timed run for run (:func:`~fqexport.validation.latency.
            measure_latency_pair`) then do not contend with each other's spinning threads.

    Any number of inputs is allowed (:func:`make_session` asks for one). Raises ModelLoadError
    (missing file, a model ORT cannot load) and ConfigError (provider, level, threads).
    """
    ort = _ort()
    source = model if isinstance(model, bytes) else str(Path(model))
    name_in_errors = label or (IN_MEMORY if isinstance(model, bytes) else Path(model))
    if not isinstance(model, bytes):
        check_model_file(model)
        try:
            str(model).encode("utf-8")
        except UnicodeEncodeError:  # a byte of the path that is not UTF-8 (decoded as a surrogate)
            if external_data_locations(model):  # its data files are found beside it, by path
                raise ModelLoadError(MSG_NOT_UTF8.format(path=os.fsencode(model))) from None
            source = Path(model).read_bytes()  # ORT opens files by UTF-8 paths only; it reads bytes too
    provider_name = resolve_provider(provider)
    so = ort.SessionOptions()
    so.graph_optimization_level = _optimization_level(ort, level)
    if threads is not None:
        if not 0 <= int(threads) <= MAX_THREADS:
            raise ConfigError(MSG_THREADS.format(threads=threads, most=MAX_THREADS))
        so.intra_op_num_threads = int(threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if dump_path is not None:
        so.optimized_model_filepath = str(dump_path)
        if dump_data_file is not None:
            so.add_session_config_entry(_DUMP_DATA_FILE, str(dump_data_file))
    providers = [provider_name] if provider_name == "CPUExecutionProvider" else [provider_name, "CPUExecutionProvider"]
    kwargs: dict[str, Any] = {"sess_options": so, "providers": providers}
    if disable:
        kwargs["disabled_optimizers"] = list(disable)
    try:
        session = ort.InferenceSession(source, **kwargs)
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/… types
        if any(t in str(err) for t in ORT_OUT_OF_MEMORY):  # not the file's fault ("Is it a valid .onnx file?")
            raise MemoryError(MSG_SESSION_MEMORY.format(path=name_in_errors, err=" ".join(str(err).split())[:300])) \
                from err
        if QDQ_PROPAGATION_FAILURE not in str(err) or QDQ_PROPAGATION in disable:
            raise ModelLoadError(MSG_UNREADABLE.format(path=name_in_errors, err=str(err).strip())) from err
        # ORT's own optimizers break the file (QDQ_PROPAGATION_FAILURE): load it without the one that does
        if str(name_in_errors) not in _PROPAGATION_OFF_SAID:  # once per file, not per session validate opens
            _PROPAGATION_OFF_SAID.add(str(name_in_errors))
            log.warning(MSG_PROPAGATION_OFF, name_in_errors, str(err).strip())
        return build_session(model, level=level, provider=provider, threads=threads, disable=(*disable, QDQ_PROPAGATION),
                             dump_path=dump_path, dump_data_file=dump_data_file, label=label, spinning=spinning)
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise ConfigError(MSG_CUDA_FELL_BACK.format(path=name_in_errors, providers=session.get_providers()))
    return session


def refused_by_cpu_optimizers(model_bytes: bytes) -> str | None:
    """ONNX Runtime's error when its default CPU session (``ORT_ENABLE_ALL``) refuses a serialized
    model through QDQ propagation (:data:`QDQ_PROPAGATION_FAILURE`, onnxruntime issue 25526); None
    when the session loads, or fails for another reason (the caller's own checks report those)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/… types
        return str(err).strip().rstrip(".") if QDQ_PROPAGATION_FAILURE in str(err) else None
    return None


def make_session(
    path: str | Path,
    *,
    provider: str = "cpu",
    optimized: bool = True,
    threads: int | None = None,
    disable: tuple[str, ...] = (),
    optimized_model_filepath: str | Path | None = None,
    spinning: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` of the single-input classifier file ``path``.

    Args:
        provider: ``"cpu"`` or ``"cuda"`` (CUDA must be installed and usable, else ConfigError).
        optimized: ``ORT_ENABLE_ALL`` (what deploys) or ``ORT_DISABLE_ALL`` (what the graph means).
        threads: intra-op threads; ``None`` keeps ORT's default (one per physical core).
        disable: optimizer names to switch off (e.g. ``("MatMulAddFusion",)``).
        optimized_model_filepath: where ORT should dump the graph it actually runs.
        spinning: as :func:`build_session` takes it (``False``: for timing two sessions in pairs).
    """
    path = Path(path)
    session = build_session(path, level="ORT_ENABLE_ALL" if optimized else "ORT_DISABLE_ALL", provider=provider,
                            threads=threads, disable=disable, dump_path=optimized_model_filepath, spinning=spinning)
    _check_one_input(session, path)
    return session


def _check_one_input(session: Any, path: Path) -> None:
    """ModelLoadError unless the model has one input and one output (a second output was
    ignored: the first one, whatever it held, was measured)."""
    if len(session.get_inputs()) != 1:
        names = ", ".join(i.name for i in session.get_inputs())
        raise ModelLoadError(MSG_INPUTS.format(path=path, n=len(session.get_inputs()), names=names))
    if len(session.get_outputs()) != 1:
        names = ", ".join(f"{o.name!r} {list(o.shape)}" for o in session.get_outputs())
        raise ModelLoadError(MSG_OUTPUTS.format(path=path, n=len(session.get_outputs()), names=names))


def input_shape(session: Any) -> tuple[int | str | None, ...]:
    """Shape of the model input; symbolic dims (batch) are their name or ``None``."""
    return tuple(session.get_inputs()[0].shape)


def input_dtype(session: Any) -> np.dtype:
    """The numpy dtype the session's (first) input is fed as."""
    t = session.get_inputs()[0].type  # "tensor(float)"
    return {"tensor(float16)": np.dtype(np.float16), "tensor(double)": np.dtype(np.float64),
            # token ids of an Embedding front end: fed as ids, never through float
            "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32)}.get(
        t, np.dtype(np.float32)
    )


def fixed_batch(session: Any) -> int | None:
    """The batch size the model is fixed to (an int first dim), or ``None`` when dynamic."""
    shape = input_shape(session)
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def run_batches(session: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits ``[N, C]`` of ``session`` on ``x`` ``[N, ...]``, run ``batch_size`` rows at a time.

    A model with a fixed batch dimension is run at that size (the last batch padded, the
    padding dropped from the result).
    """
    if int(batch_size) < 1:
        raise ConfigError(MSG_BATCH.format(batch_size=batch_size))
    fixed = fixed_batch(session)
    bs = fixed or int(batch_size)
    inp = session.get_inputs()[0].name
    dtype = input_dtype(session)
    outs = []
    for start in range(0, x.shape[0], bs):
        chunk = np.ascontiguousarray(x[start : start + bs], dtype=dtype)
        n = chunk.shape[0]
        if fixed and n < fixed:
            pad = np.zeros((fixed - n, *chunk.shape[1:]), dtype=dtype)
            chunk = np.concatenate([chunk, pad])
        try:
            out = session.run(None, {inp: chunk})[0]
        except FqexportError:  # an emulated session's own refusal names its cause: not ORT's failure
            raise
        except Exception as err:
            raise DataError(MSG_RUN.format(shape=chunk.shape, err=str(err).strip())) from err
        if np.ndim(out) == 0:
            raise DataError(MSG_SCALAR_OUTPUT)
        outs.append(np.asarray(out)[:n])
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outs).astype(np.float32, copy=False)


def _count_ops(model: Any) -> Counter:
    counts: Counter = Counter()
    for node in model.graph.node:
        counts[node.op_type] += 1
    return counts


def optimized_graph(path: str | Path, provider: str = "cpu", threads: int | None = None, disable: tuple[str, ...] = (),
                    *, weights: bool = True) -> Any:
    """The ``onnx.ModelProto`` ORT runs after its optimizations (dumped, then re-loaded).

    ``weights``: load the initializers' data (False: the graph's structure only, enough to count
    its nodes; its large initializers then name a data file that no longer exists). A model
    with external data works either way: the dump writes its own data file.
    """
    import onnx

    with tempfile.TemporaryDirectory(prefix="fqexport-opt-") as tmp:
        dump = Path(tmp) / "optimized.onnx"
        session = build_session(path, provider=provider, threads=threads, disable=disable, dump_path=dump,
                                dump_data_file=f"{dump.name}.data")
        _check_one_input(session, Path(path))
        return onnx.load(str(dump), load_external_data=weights)


def fused_kernels(path: str | Path, provider: str = "cpu", disable: tuple[str, ...] = ()) -> dict[str, int]:
    """Op-type counts of the graph ORT actually runs (com.microsoft ops included).

    Every op in :data:`INTEGER_KERNELS` and :data:`FLOAT_KERNELS` is present (0 when absent), so
    ``{"QLinearConv": 11, "QGemm": 1, "Conv": 0, ...}`` reads directly.
    """
    counts = _count_ops(optimized_graph(path, provider, disable=disable, weights=False))
    out = {k: 0 for k in (*INTEGER_KERNELS, *FLOAT_KERNELS)}
    out.update(counts)
    return dict(sorted(out.items()))


def float_fallbacks(path: str | Path, provider: str = "cpu", disable: tuple[str, ...] = ()) -> list[str]:
    """The Conv/Gemm/MatMul nodes that ORT runs in float (:func:`kernel_summary`)."""
    return kernel_summary(path, provider, disable)[1]


def kernel_summary(path: str | Path, provider: str = "cpu", disable: tuple[str, ...] = ()) -> tuple[dict[str, int], list[str]]:
    """``(fused_kernels(path), float nodes)`` from a single optimized-graph dump. A float node
    reads ``"stem.0 (FusedConv)"`` when its layer is found in the file (:class:`_LayerNames`), else
    ``"op:name"`` (``"Gemm:(unnamed)"``): ORT renames the nodes it fuses (``t9_nchwc``)."""
    import onnx

    model = optimized_graph(path, provider, disable=disable, weights=False)
    counts = {k: 0 for k in (*INTEGER_KERNELS, *FLOAT_KERNELS)}
    counts.update(_count_ops(model))
    nodes = [n for n in model.graph.node if n.op_type in FLOAT_KERNELS]
    layers = _LayerNames(onnx.load(str(path), load_external_data=False).graph) if nodes else None
    floats = []
    for n in nodes:
        layer = layers.of(n)
        floats.append(f"{layer} ({n.op_type})" if layer else f"{n.op_type}:{n.name or '(unnamed)'}")
    return dict(sorted(counts.items())), floats


_WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# the op between a layer and the tensor ORT names its fused node after (Conv → Relu → t9: ``t9_nchwc``)
_FUSED_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid")


class _LayerNames:
    """The layers (``stem.0``) of an optimized graph's nodes, read from the weights' names in the
    original graph (indexed once)."""

    def __init__(self, original: Any) -> None:
        self.producer = {o: n for n in original.node for o in n.output}
        self.tensors = {t.name for t in original.initializer} | set(self.producer)
        self.by_name = {n.name: n for n in original.node if n.name}

    def of(self, node: Any) -> str | None:
        """``node``'s layer: its own weight input when the original graph has that tensor, else
        the weight of the original node ORT renamed (its name, or the tensor it is named after,
        with ORT's ``_nchwc`` / ``_token_N`` suffixes dropped, through a fused activation). A
        weight not named ``<layer>.weight`` (torch's classic exporter folds BatchNorm into
        ``onnx::Conv_12``) gives that original node's name (``/stem/stem.0/Conv``); None when no
        original node is found."""
        own = len(node.input) > 1 and node.input[1] in self.tensors  # its weight is the original graph's
        weight = node.input[1] if own else None
        source = self.by_name.get(node.name) if own else None
        if weight is None:
            base = re.sub(r"(_nchwc|_token_\d+)+$", "", node.name)
            source = self.by_name.get(base) or self.producer.get(base)
            if source is not None and source.op_type in _FUSED_ACTIVATIONS and source.input[0] in self.producer:
                source = self.producer[source.input[0]]
            if source is not None and source.op_type in _WEIGHT_OPS and len(source.input) > 1:
                weight = source.input[1]
            else:
                source = None
        layer = re.fullmatch(r"(.+)\.weight(_quantized)?", weight or "")
        if layer:
            return layer.group(1)
        return source.name if source is not None and source.name else None


def model_files_size(path: str | Path) -> int:
    """Bytes on disk of ``path`` plus every external-data file its tensors point to (initializers,
    Constant nodes, subgraphs, functions: :func:`~fqexport.exporters.external_data.external_data_locations`)."""
    import onnx

    path = Path(path)
    check_model_file(path)
    total = path.stat().st_size
    try:
        onnx.load(str(path), load_external_data=False)  # a file ONNX cannot read is named as such
    except Exception as err:
        raise ModelLoadError(MSG_UNREADABLE.format(path=path, err=str(err).strip())) from err
    locations = set(external_data_locations(path))
    folder = path.parent.resolve()
    seen: set[Path] = set()  # one file named two ways (weights/w.bin, ./weights/w.bin) counts once
    for loc in sorted(locations):
        f = (folder / loc).resolve()
        if f != folder and folder not in f.parents:
            raise ModelLoadError(MSG_EXTERNAL_ESCAPES.format(path=path, loc=loc, folder=folder))
        if f in seen:
            continue
        seen.add(f)
        if f.is_file():
            total += f.stat().st_size
        else:
            log.warning("external data file %s of %s is missing", f, path)
    return int(total)


def session_threads(session: Any) -> int:
    """Intra-op threads the session uses: ORT's default 0 resolved as ORT resolves it, one thread
    per physical core (:func:`physical_cores`; ``os.cpu_count()`` counts SMT siblings too)."""
    n = int(session.get_session_options().intra_op_num_threads)
    return n if n > 0 else physical_cores()


def physical_cores(cpus: Sequence[int] | None = None, root: str | Path = "/sys/devices/system/cpu") -> int:
    """Physical cores among ``cpus`` (default: those this process may run on) by the Linux sysfs
    topology under ``root``, one per (package, core) pair; the logical CPU count where it cannot be
    read."""
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        topology = Path(root) / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus) or int(os.cpu_count() or 1)
    return len(cores) or int(os.cpu_count() or 1)
