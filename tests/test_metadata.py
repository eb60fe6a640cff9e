"""ExportMetadata: the typed, versioned contract in the ONNX file (fqexport/metadata.py,
exporters/metadata.py)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import onnx
import torch
import pytest

from fqexport.errors import ModelLoadError
from fqexport.exporters.metadata import read_metadata, write_metadata
from fqexport.metadata import METADATA_VERSION, ExportMetadata, LayerRecord


def _meta(**kw) -> ExportMetadata:
    base = dict(fqexport_version="0.1.0", method="solver", order="sensitivity", group_names=("a", "b"),
                group_weights=(0.5, 0.5), layers=(LayerRecord("fc1", "linear", 4, 10, 10, "int4"),),
                input_shape=(8,), num_classes=3, avg_weight_bits=4.0)
    base.update(kw)
    return ExportMetadata(**base)


def _tiny_onnx() -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])


def test_round_trip_through_json_and_onnx(tmp_path):
    meta = _meta(allocation={"objective": "worst-group", "avg_bits": 3.0})
    assert ExportMetadata.from_json(meta.to_json()) == meta
    m = _tiny_onnx()
    write_metadata(m, meta)
    onnx.save(m, str(tmp_path / "m.onnx"))
    back = read_metadata(tmp_path / "m.onnx")
    assert back == meta and back.layers[0].storage == "int4" and back.schema_version == METADATA_VERSION


def test_the_root_reads_a_files_metadata_and_the_version_that_wrote_it(tmp_path):
    import fqexport
    from fqexport.version import __version__

    m = _tiny_onnx()
    write_metadata(m, _meta(fqexport_version=__version__))
    onnx.save(m, str(tmp_path / "m.onnx"))
    meta = fqexport.read_metadata(tmp_path / "m.onnx")
    assert meta.fqexport_version == __version__ != "0.1.0"  # 0.1.0: every build before the first bump
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {__version__} " in changelog  # a release names what changed


def test_absent_metadata_is_none(tmp_path):
    onnx.save(_tiny_onnx(), str(tmp_path / "plain.onnx"))
    assert read_metadata(tmp_path / "plain.onnx") is None


def test_newer_schema_is_refused_with_the_file_name():
    d = _meta().to_dict() | {"schema_version": METADATA_VERSION + 1}
    with pytest.raises(ModelLoadError, match=rf"m\.onnx: its fqexport metadata has schema version {METADATA_VERSION + 1}, "
                       rf"newer than this fqexport understands \({METADATA_VERSION}\): upgrade fqexport"):
        ExportMetadata.from_dict(d, "m.onnx")


def test_unversioned_metadata_of_earlier_files_reads_as_version_1():
    legacy = {"fqexport_version": "0.1.0", "method": "rtn", "activation_bits": 8, "storage": "auto",
              "layers": [{"name": "fc", "kind": "linear", "bits": 8, "params": 4, "macs": 4, "storage": "int8"}]}
    meta = ExportMetadata.from_dict(legacy)
    assert meta.schema_version == 1 and meta.layers[0].bits == 8 and meta.storage == "auto"


def test_malformed_metadata_names_the_file(tmp_path):
    m = _tiny_onnx()
    onnx.helper.set_model_props(m, {"fqexport": "{not json"})
    onnx.save(m, str(tmp_path / "badmeta.onnx"))
    with pytest.raises(ModelLoadError, match=r"badmeta\.onnx: fqexport metadata is not valid JSON"):
        read_metadata(tmp_path / "badmeta.onnx")
    onnx.helper.set_model_props(m, {"fqexport": json.dumps({"fqexport_version": "0", "method": "x",
                                                            "layers": [{"nom": "fc"}]})})
    onnx.save(m, str(tmp_path / "badlayer.onnx"))
    with pytest.raises(ModelLoadError, match=r"badlayer\.onnx: fqexport metadata field 'layers' is invalid"):
        read_metadata(tmp_path / "badlayer.onnx")


@pytest.mark.parametrize("field, value, words", [
    # survey 65: a string where an object is crashed validate (exit 3); other fields were blamed on 'layers'
    ("task", "classification", "'classification' is not a JSON object or null"),
    ("settings", "seed=0", "'seed=0' is not a JSON object or null"),
    ("allocation", [1], "[1] is not a JSON object or null"),
    ("layers", [{"name": "fc1", "kind": "linear", "bits": None, "params": 10}], "layer 'fc1': bits=None is not an integer"),
    ("layers", ["fc1"], "a layer record must be an object, got 'fc1'"),
    ("float_layers", [{"name": "fc", "kind": "linear", "bits": 32, "params": 4, "why": "x"}],
     "layer record 'fc' has unknown key(s) why"),
    ("input_shape", "1x8", "'1x8' is not a list"),
    ("input_shape", [1, 2.5], "[1, 2.5] is not a list of integers"),
    ("group_names", "ab", "'ab' is not a list"),  # was split into the groups 'a', 'b'
    ("float_ops", 5, "5 is not a list"),
    ("num_calib", "64", "'64' is not an integer"),
    ("avg_weight_bits", True, "True is not a number or null"),
    ("method", None, "None is not a string"),
])
def test_a_field_of_the_wrong_type_is_named(field, value, words):
    d = _meta().to_dict() | {field: value}
    with pytest.raises(ModelLoadError, match=rf"^m\.onnx: fqexport metadata field '{field}' is invalid: {re.escape(words)}"):
        ExportMetadata.from_dict(d, "m.onnx")


@pytest.mark.parametrize("field", ["fqexport_version", "method"])
def test_a_missing_required_field_is_named(field):
    d = {k: v for k, v in _meta().to_dict().items() if k != field}
    with pytest.raises(ModelLoadError, match=rf"^m\.onnx: fqexport metadata lacks the field '{field}'$"):
        ExportMetadata.from_dict(d, "m.onnx")


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match=r"cannot load ONNX model .*broken\.onnx"):
        read_metadata(bad)


def test_the_file_records_every_option_that_decided_it(mlp_model, mlp_data, tmp_path):
    """seed, damp, block size... are in the metadata: QuantConfig(**settings) reruns the file (survey 27)."""
    from fqexport.config import QuantConfig
    from fqexport.exporters.qdq_onnx import export_qdq
    from fqexport.pipeline.compress import compress

    class Head(torch.nn.Linear):
        pass

    model = copy.deepcopy(mlp_model)
    model.fc3.__class__ = Head  # a class pattern that selects one layer
    config = QuantConfig(weight_bits=4, seed=7, damp=0.05, block_size=32, num_calib=100,
                         keep_float=("fc1", Head), group_weights={"a": 2, "b": 1})
    cm = compress(model, mlp_data, config, progress=False)
    path = export_qdq(cm, tmp_path / "m.onnx").path
    settings = read_metadata(path).settings
    assert settings["seed"] == 7 and settings["damp"] == 0.05 and settings["block_size"] == 32
    assert settings["keep_float"] == ["fc1", "type:Head"] and settings["group_weights"] == {"a": 2.0, "b": 1.0}
    assert "device" not in settings and "max_activation_memory_mb" not in settings
    again = compress(model, mlp_data, QuantConfig(**settings), progress=False)
    assert export_qdq(again, tmp_path / "again.onnx").path.read_bytes() == path.read_bytes()


def test_the_file_names_its_calibration_data_and_what_wrote_it(mlp_model, mlp_data, tmp_path):
    """Survey 83: nothing in a file named the calibration data, nor the torch / onnx / onnxruntime
    versions and the CPU whose kernels the export check ran; validate's report named no runtime."""
    import hashlib

    import numpy as np
    import onnxruntime

    from fqexport.calibration.npz import save_npz
    from fqexport.config import QuantConfig
    from fqexport.exporters.cpu_isa import cpu_isa
    from fqexport.exporters.qdq_onnx import export_qdq
    from fqexport.pipeline.compress import compress
    from fqexport.calibration.sampling import group_balanced_indices
    from fqexport.validation.gate import validate

    save_npz(mlp_data, tmp_path / "calib.npz")
    cm = compress(mlp_model, str(tmp_path / "calib.npz"), QuantConfig(num_calib=64, method="rtn"), progress=False)
    meta = read_metadata(export_qdq(cm, tmp_path / "m.onnx").path)
    drawn = mlp_data.take(group_balanced_indices(mlp_data, 64, seed=0))
    sha = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in (drawn.x, drawn.group, drawn.y)))
    assert meta.calibration_data == {"source": str(tmp_path / "calib.npz"), "samples": len(mlp_data), "drawn": 64,
                                     "sha256": sha.hexdigest()}
    env = meta.environment
    assert (env["torch"], env["onnx"], env["onnxruntime"], env["cpu_isa"]) == (
        torch.__version__, onnx.__version__, onnxruntime.__version__, cpu_isa())
    report = validate(tmp_path / "m.onnx", mlp_data, measure_latency=False, kernel_check=False).to_dict()
    assert report["environment"]["onnxruntime"] == onnxruntime.__version__
    assert report["environment"]["fqexport"] == env["fqexport"]
