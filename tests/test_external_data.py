"""Tests of exporters/external_data.py: the external-data files an ONNX file names, read without onnx,
checked against onnx's own reading of the same files."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, convert_model_to_external_data, uses_external_data

from fqexport.exporters.external_data import external_data_locations, external_data_paths


def _model() -> onnx.ModelProto:
    """A Gemm initializer, a Constant node and an If whose branches hold Constants (subgraphs)."""
    rng = np.random.default_rng(0)

    def branch(name: str, value: float) -> onnx.GraphProto:
        const = numpy_helper.from_array(np.full(400, value, np.float32), f"{name}_value")
        return helper.make_graph([helper.make_node("Constant", [], [name], value=const)], name, [],
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((3, 300), np.float32), "cv")),
             helper.make_node("If", ["cond"], ["z"], then_branch=branch("t", 1.0), else_branch=branch("e", 0.0))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((3, 12)).astype(np.float32), "fw")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _onnx_locations(path) -> set[str]:
    """What onnx itself reads: the location of every tensor stored outside the file."""
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in _get_all_tensors(model) if uses_external_data(t) for e in t.external_data
            if e.key == "location"}


def test_locations_of_initializers_constants_and_subgraphs_are_onnxs(tmp_path):
    onnx.save(_model(), str(tmp_path / "inline.onnx"))
    onnx.save(_model(), str(tmp_path / "one.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    every = _model()  # every tensor, Constant values and subgraphs included, in a file of its own
    convert_model_to_external_data(every, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    onnx.save(every, str(tmp_path / "every.onnx"))
    assert external_data_locations(tmp_path / "inline.onnx") == ()
    assert external_data_locations(tmp_path / "one.onnx") == ("weights.bin",)
    assert set(external_data_locations(tmp_path / "every.onnx")) == {"fw", "cv", "t_value", "e_value"}
    for name in ("inline", "one", "every"):
        assert set(external_data_locations(tmp_path / f"{name}.onnx")) == _onnx_locations(tmp_path / f"{name}.onnx")
    assert external_data_paths(tmp_path / "one.onnx") == (tmp_path / "weights.bin",)


def test_a_path_that_is_no_onnx_file_names_no_external_data(tmp_path):
    onnx.save(_model(), str(tmp_path / "one.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    whole = (tmp_path / "one.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "junk.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("cut.onnx", "junk.onnx", "empty.onnx", "missing.onnx", "."):
        assert external_data_locations(tmp_path / name) == (), name
    assert external_data_paths(tmp_path / "missing.onnx") == ()
