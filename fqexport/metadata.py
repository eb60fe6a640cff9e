"""``ExportMetadata``: the one typed, versioned record that compress, the exporter, the search
and the CI gate share. It travels inside each ONNX file as JSON under ``metadata_props["fqexport"]``.

``compress`` fills the provenance fields, the exporter adds what it wrote (storage, opset, the
layer table with each layer's container), the mixed-precision search adds its allocation, and
``validate`` reads it back. Readers refuse a newer schema than they know, with a clear error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from fqexport.errors import ModelLoadError
from fqexport.metrics.group_metrics import json_safe

METADATA_KEY = "fqexport"
# 2: LayerRecord.reason (why a float layer stays float). Version-1 files are read as before.
METADATA_VERSION = 2
# Activations are quantized to uint8 everywhere (ORT's fused integer kernels need 8 bits).
ACTIVATION_BITS = 8
# Width at which weight layers left in float count (avg_weight_bits, float_layers).
FLOAT_BITS = 32

MSG_NEWER = (
    "{source}: its fqexport metadata has schema version {version}, newer than this fqexport "
    "understands ({known}): upgrade fqexport to read it"
)
MSG_BAD_VERSION = "{source}: fqexport metadata schema_version={version!r} is not a positive integer"
MSG_BAD_FIELD = "{source}: fqexport metadata field {field!r} is invalid: {err}"
MSG_NOT_OBJECT = "{source}: fqexport metadata is not a JSON object"
MSG_MISSING = "{source}: fqexport metadata lacks the field {field!r}"


@dataclass(frozen=True)
class LayerRecord:
    """One quantized layer as written: width, size, work, and the container of its codes."""

    name: str
    kind: str
    bits: int
    params: int
    macs: int = 0
    storage: str | None = None  # int8 | int4 | int2 | nbits | int4-blocked once exported; float32 for a float layer
    reason: str | None = None  # a float layer's: "unsupported" or "keep_float: <pattern>"


@dataclass(frozen=True)
class ExportMetadata:
    """Provenance and resources of a compressed model (see the module docstring).

    ``layers`` lists the quantized layers; ``allocation`` is the mixed-precision search's record
    (``None`` for uniform widths); ``storage``/``opset`` are set by the exporter.
    """

    fqexport_version: str
    method: str
    order: str | None = None
    solver_target: str | None = None
    calibration: str = "minmax"
    weight_range: str = "x86-safe"
    activation_bits: int = ACTIVATION_BITS
    num_calib: int = 0
    group_names: tuple[str, ...] = ()
    group_weights: tuple[float, ...] = ()
    skipped_layers: tuple[str, ...] = ()
    layers: tuple[LayerRecord, ...] = ()
    input_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    avg_weight_bits: float | None = None
    storage: str | None = None
    opset: int | None = None
    allocation: Mapping[str, Any] | None = None
    # fine-tuning settings, training data group counts, hold-out figures (None: PTQ only)
    finetune: Mapping[str, Any] | None = None
    # weight layers left in float (bits=FLOAT_BITS) and the quantized share of weight params;
    # avg_weight_bits counts the float layers at 32 bits (files before these fields: () / None)
    float_layers: tuple[LayerRecord, ...] = ()
    quantized_fraction: float | None = None
    # QuantConfig.target the export was checked for (portable, x86-avx2, x86-vnni, arm64, gpu);
    # None in files written before the field
    target: str | None = None
    # the task (fqexport.tasks: name, options, how it was chosen); None: a classifier (files before tasks)
    task: Mapping[str, Any] | None = None
    # ops after the last weight layers kept float (a detector's box decode), "name (op)"
    float_ops: tuple[str, ...] = ()
    # QuantConfig.to_dict(): every option that decided the file (seed, damp, block_size, ...), so
    # that QuantConfig(**settings) reruns it; None in files written before the field
    settings: Mapping[str, Any] | None = None
    # the calibration data: its source (a path, or the object's kind), samples, the drawn ones and a
    # sha256 of what was drawn (x, group, y), so that an audit can tell the data; None in older files
    calibration_data: Mapping[str, Any] | None = None
    # what wrote the file: the versions of fqexport's libraries and the CPU's instruction set (the
    # export check ran its kernels); None in older files
    environment: Mapping[str, Any] | None = None
    schema_version: int = METADATA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        d = asdict(self)
        d["layers"] = [asdict(l) for l in self.layers]
        d["float_layers"] = [asdict(l) for l in self.float_layers]
        for k in ("group_names", "group_weights", "skipped_layers", "input_shape", "float_ops"):
            d[k] = list(d[k])
        d["task"] = dict(self.task) if self.task is not None else None
        d["allocation"] = dict(self.allocation) if self.allocation is not None else None
        d["finetune"] = dict(self.finetune) if self.finetune is not None else None
        for k in ("settings", "calibration_data", "environment"):
            d[k] = dict(getattr(self, k)) if getattr(self, k) is not None else None
        return d

    def to_json(self) -> str:
        """Strict JSON (a hold-out figure of a group without samples, NaN, is written null)."""
        return json.dumps(json_safe(self.to_dict()), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<metadata>") -> "ExportMetadata":
        """Parse a dict written by ``to_dict``; unknown keys of the same schema are ignored.

        A file without ``schema_version`` predates versioning and is read as version 1.
        Raises ModelLoadError naming ``source`` for a newer schema or a malformed field.
        """
        if not isinstance(d, Mapping):
            raise ModelLoadError(MSG_NOT_OBJECT.format(source=source))
        version = d.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ModelLoadError(MSG_BAD_VERSION.format(source=source, version=version))
        if version > METADATA_VERSION:
            raise ModelLoadError(MSG_NEWER.format(source=source, version=version, known=METADATA_VERSION))
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        missing = [k for k in ("fqexport_version", "method") if k not in kw]
        if missing:
            raise ModelLoadError(MSG_MISSING.format(source=source, field=missing[0]))
        for k in list(kw):
            kw[k] = _parsed(k, kw[k], source)
        kw["schema_version"] = version
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str, source: str = "<metadata>") -> "ExportMetadata":
        """Parse ``to_json`` output; a ModelLoadError names ``source`` when it is not valid JSON."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:  # nested deeper than Python recurses: not ours
            raise ModelLoadError(f"{source}: fqexport metadata is not valid JSON: {err}") from err
        return cls.from_dict(d, source)


# The type of each scalar field (None: may be null); int is accepted where a float is.
_SCALARS: dict[str, tuple[type, bool]] = {
    "fqexport_version": (str, False), "method": (str, False), "order": (str, True), "solver_target": (str, True),
    "calibration": (str, False), "weight_range": (str, False), "activation_bits": (int, False),
    "num_calib": (int, False), "num_classes": (int, True), "avg_weight_bits": (float, True), "storage": (str, True),
    "opset": (int, True), "quantized_fraction": (float, True), "target": (str, True),
}
_LAYER_TYPES = {"name": (str, False), "kind": (str, False), "bits": (int, False), "params": (int, False),
                "macs": (int, False), "storage": (str, True), "reason": (str, True)}
_RECORDS = ("layers", "float_layers")
_TEXTS = ("group_names", "skipped_layers", "float_ops")
_MAPPINGS = ("allocation", "finetune", "task", "settings", "calibration_data", "environment")


def _typed(value: Any, kind: type, nullable: bool) -> bool:
    if value is None:
        return nullable
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _layer(value: Any) -> LayerRecord:
    """A LayerRecord from its JSON object; ValueError naming what is wrong."""
    if not isinstance(value, Mapping):
        raise ValueError(f"a layer record must be an object, got {value!r}")
    unknown = sorted(set(value) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer record {value.get('name')!r} has unknown key(s) {', '.join(unknown)}")
    for key, (kind, nullable) in _LAYER_TYPES.items():
        if key in value and not _typed(value[key], kind, nullable):
            raise ValueError(f"layer {value.get('name')!r}: {key}={value[key]!r} is not {_kind_words(kind, nullable)}")
    return LayerRecord(**value)


def _kind_words(kind: type, nullable: bool) -> str:
    words = {str: "a string", int: "an integer", float: "a number"}[kind]
    return f"{words} or null" if nullable else words


def _parsed(key: str, value: Any, source: str) -> Any:
    """One metadata field checked for its type and converted (tuples of records and texts);
    ModelLoadError naming the field."""
    try:
        if key in _SCALARS:
            kind, nullable = _SCALARS[key]
            if not _typed(value, kind, nullable):
                raise ValueError(f"{value!r} is not {_kind_words(kind, nullable)}")
            return value
        if key in _MAPPINGS:
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{value!r} is not a JSON object or null")
            return value
        if key not in _RECORDS + _TEXTS + ("group_weights", "input_shape"):
            return value
        if value is not None and (isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__")):
            raise ValueError(f"{value!r} is not a list")
        items = list(value or ())
        if key in _RECORDS:
            return tuple(_layer(l) for l in items)
        if key in _TEXTS:
            return tuple(str(v) for v in items)
        if key == "group_weights":
            return tuple(float(v) for v in items)
        if not all(_typed(v, int, False) for v in items):  # input_shape
            raise ValueError(f"{items!r} is not a list of integers")
        return tuple(int(v) for v in items)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(MSG_BAD_FIELD.format(source=source, field=key, err=err)) from err


def layer_records(layers: Mapping[str, Any], storage: Mapping[str, str] | None = None) -> tuple[LayerRecord, ...]:
    """``LayerRecord``s of quantized layers (objects with name, kind, bits, params, macs)."""
    return tuple(
        LayerRecord(l.name, l.kind, int(l.bits), int(l.params), int(l.macs),
                    None if storage is None else storage.get(l.name))
        for l in layers.values()
    )
