"""Untrusted files never run code: crafted .pt2 archives, pickled checkpoints, forged .npz
headers, decompression-bomb images and ONNX external data that escapes its folder."""

from __future__ import annotations

import json

import fixtures_models as fm
import numpy as np
import pytest
import torch
from fqexport.calibration.images import MAX_IMAGE_PIXELS
from fqexport.calibration.manifest import load_csv_manifest
from fqexport.calibration.npz import load_npz
from fqexport.exporters.ort_session import model_files_size
from safety_helpers import (
    compress_args,
    first_line,
    huge_header_npz,
    make_inputs,
    pickled_payload,
    pickled_weight_pt2,
    rewrite_pt2,
    run_cli,
    save_clean_pt2,
    snapshot,
)

from fqexport.errors import DataError, ModelLoadError
from fqexport.graph.loading import load_model, load_state_dict_file


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = make_inputs(tmp_path_factory.mktemp("untrusted"))
    save_clean_pt2(fm.tiny_mlp(), torch.randn(2, fm.MLP_FEATURES), d / "clean.pt2")
    return d


def _refusal(path, reason):
    return (f"{path}: refusing to load this .pt2 without --trust-pickle: {reason}, which runs code from the "
            "file when torch.export.load reads it; pass --trust-pickle (API: trust_pickle=True) only for a "
            "file you trust, or re-save the program with torch.export.save from plain tensor weights")


def test_pickled_pt2_weight_never_runs_through_the_cli(work, tmp_path):
    marker = tmp_path / "PWNED"
    pickled_weight_pt2(work / "clean.pt2", tmp_path / "evil.pt2", marker)
    for name in ("mlp.pt", "calib.npz"):
        (tmp_path / name).write_bytes((work / name).read_bytes())
    before = snapshot(tmp_path)
    code, _, err = run_cli(["compress", "--model", "evil.pt2", "--calib", "calib.npz", "--out", "o.onnx"], tmp_path)
    assert code == 2
    assert first_line(err) == "error: " + _refusal(
        "evil.pt2", "weight 'fc1.weight' is pickled (use_pickle in data/weights/model_weights_config.json)")
    assert not marker.exists()
    assert snapshot(tmp_path) == before
    assert "Traceback" not in err and "WARNING" not in err


@pytest.mark.parametrize("kind", ["opaque_constant", "sample_inputs", "sympy_expr", "legacy_layout", "aoti"])
def test_every_code_path_of_torch_export_load_is_refused(work, tmp_path, kind):
    marker = tmp_path / "PWNED"
    payload = pickled_payload(marker)
    evil_expr = f"__import__('builtins').open({str(marker)!r}, 'w')"

    def edit(rel, data):
        if rel is None:
            return {"data/aotinductor/model/model.so": b"\x7fELF"} if kind == "aoti" else {}
        if kind == "opaque_constant" and rel.endswith("_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                "use_pickle": False, "tensor_meta": None}}}).encode()
        if kind == "sample_inputs" and rel.startswith("data/sample_inputs/"):
            return payload
        if kind == "sympy_expr" and rel == "models/model.json":
            program = json.loads(data)
            program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0] = {
                "as_expr": {"expr_str": evil_expr, "hint": {"as_int": 2}}}
            return json.dumps(program).encode()
        if kind == "legacy_layout" and rel == "archive_format":
            return b"legacy"
        return data

    evil = rewrite_pt2(work / "clean.pt2", tmp_path / "evil.pt2", edit)
    with pytest.raises(ModelLoadError, match="refusing to load this .pt2 without --trust-pickle") as info:
        load_model(str(evil))
    expected = {
        "opaque_constant": "constant 'c' is a pickled object (opaque_obj_0)",
        "sample_inputs": "its sample inputs data/sample_inputs/model.pt are not plain tensors (torch would unpickle them)",
        "sympy_expr": "its program models/model.json holds a symbolic expression that is not plain arithmetic",
        "legacy_layout": "it is not in the current pt2 archive layout (the legacy layout is read with pickle)",
        "aoti": "it holds compiled code (data/aotinductor/model/model.so)",
    }[kind]
    assert expected in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["case", "suffix"])
def test_entries_torch_reads_under_another_name_are_inspected(work, tmp_path, kind):
    """survey 79: torch's zip reader finds data/Sample_Inputs/model.pt as the sample inputs (letter
    case ignored) and takes every models/* entry as a program (models/evil_json): the inspection
    matched exact names and .json only, and the payloads ran without --trust-pickle."""
    import zipfile

    marker = tmp_path / "PWNED"
    evil_expr = f"__import__('builtins').open({str(marker)!r}, 'w')"
    with zipfile.ZipFile(work / "clean.pt2") as zin, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as zout:
        for info in zin.infolist():
            root, _, rel = info.filename.partition("/")
            data = zin.read(info)
            if kind == "case" and rel.startswith("data/sample_inputs/"):
                zout.writestr(f"{root}/data/Sample_Inputs/{rel.rpartition('/')[2]}", pickled_payload(marker))
                continue
            zout.writestr(info, data)
            if kind == "suffix" and rel == "models/model.json":
                program = json.loads(data)
                program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0] = {
                    "as_expr": {"expr_str": evil_expr, "hint": {"as_int": 2}}}
                zout.writestr(f"{root}/models/evil_json", json.dumps(program).encode())
    with pytest.raises(ModelLoadError, match="refusing to load this .pt2 without --trust-pickle") as info:
        load_model(str(tmp_path / "evil.pt2"))
    assert {"case": "its sample inputs data/sample_inputs/model.pt are not plain tensors",
            "suffix": "its program models/evil_json holds a symbolic expression"}[kind] in str(info.value)
    assert not marker.exists()


def test_clean_pt2_with_a_dynamic_batch_still_loads(work, tmp_path):
    ep = torch.export.export(fm.tiny_mlp().eval(), (torch.randn(2, fm.MLP_FEATURES),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(tmp_path / "dyn.pt2"))
    model = load_model(str(tmp_path / "dyn.pt2"))
    x = torch.randn(5, fm.MLP_FEATURES)
    torch.testing.assert_close(model(x), fm.tiny_mlp().eval()(x))


def test_pickled_state_dict_is_refused_without_torchs_advice(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.pt").write_bytes(pickled_payload(marker))
    with pytest.raises(ModelLoadError) as info:
        load_state_dict_file(tmp_path / "evil.pt")
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'evil.pt'}: cannot read checkpoint with torch.load(weights_only=True): ")
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text
    assert text.endswith("(only plain tensors are read from an untrusted file)")
    assert not marker.exists()


def test_npz_declaring_a_trillion_rows_is_data_error_before_allocation(work, tmp_path):
    huge_header_npz(tmp_path / "huge.npz")
    with pytest.raises(DataError, match=r"huge\.npz: field 'x' declares shape 1000000000000x64 float32 = "
                                         r"2\.56e\+05 GB, more than the .* GB of memory available"):
        load_npz(tmp_path / "huge.npz")


def test_npz_declaring_more_rows_than_it_stores_is_named(tmp_path):
    huge_header_npz(tmp_path / "short.npz", rows=1000)
    with pytest.raises(DataError) as info:
        load_npz(tmp_path / "short.npz")
    assert str(info.value) == (f"{tmp_path / 'short.npz'}: field 'x' declares shape 1000x64 float32 = 256,000 bytes "
                               "but the archive holds 1,024; the file is truncated or forged, write it again with "
                               "numpy.savez")


def test_huge_npz_through_the_cli_exits_2(work, tmp_path):
    (tmp_path / "mlp.pt").write_bytes((work / "mlp.pt").read_bytes())
    huge_header_npz(tmp_path / "calib.npz")
    before = snapshot(tmp_path)
    code, _, err = run_cli([*compress_args("--out", "o.onnx")], tmp_path)
    assert code == 2
    assert first_line(err).startswith("error: calib.npz: field 'x' declares shape 1000000000000x64 float32")
    assert snapshot(tmp_path) == before


def test_decompression_bomb_png_is_data_error(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 10
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # a few kB on disk
    (tmp_path / "m.csv").write_text("path,label,group\nbomb.png,0,a\n")
    with pytest.raises(DataError) as info:
        load_csv_manifest(tmp_path / "m.csv")
    assert str(info.value) == (f"{tmp_path / 'm.csv'} line 2: image {tmp_path / 'bomb.png'} is {side}x{side} = "
                               f"{side * side:,} pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
                               "(a decompression bomb or a wrong file); resize it")


def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "secret.bin").write_bytes(b"s" * 64)
    (tmp_path / "sub").mkdir()
    w = numpy_helper.from_array(np.zeros((4, 2), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "32")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    path = tmp_path / "sub" / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(ModelLoadError) as info:
        model_files_size(path)
    assert str(info.value) == (f"ONNX model {path}: external data location '../secret.bin' points outside the "
                               f"model's folder {tmp_path / 'sub'}; keep the .onnx and its data files in one folder")
    assert onnx  # the checker-free proto above is what a hostile file looks like


def test_structures_nested_past_pythons_recursion_are_refused_as_bad_files(tmp_path):
    """survey 79: a 9 KB .onnx of 1000 nested subgraphs made validate's external-data scan exit 3
    ("internal error: BufferError"), and metadata JSON nested as deep did the same."""
    from fqexport.exporters.external_data import external_data_locations
    from fqexport.metadata import ExportMetadata

    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            if not n:
                return out + bytes([b])
            out += bytes([b | 0x80])

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    nested = b""
    for _ in range(5000):  # GraphProto.node -> NodeProto.attribute -> AttributeProto.g -> ...
        nested = field(1, field(5, field(6, nested)))
    (tmp_path / "nest.onnx").write_bytes(varint(1 << 3) + varint(8) + field(7, nested))
    assert external_data_locations(tmp_path / "nest.onnx") == ()  # its loader names the bad file
    with pytest.raises(ModelLoadError, match=r"^deep\.onnx: fqexport metadata is not valid JSON"):
        ExportMetadata.from_json("[" * 100_000 + "]" * 100_000, "deep.onnx")


def test_an_npz_member_padded_past_its_array_is_refused_before_inflating(tmp_path):
    """survey 79: a 265 KB .npz whose x.npy is a small array then 256 MiB of deflated zeros made
    compress (which memory-maps x) write the whole member to a temporary file."""
    import io
    import zipfile

    from fqexport.calibration.readers import open_stream
    from fqexport.errors import DataError

    x = io.BytesIO()
    np.save(x, np.zeros((60, 16), np.float32))
    with zipfile.ZipFile(tmp_path / "pad.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", x.getvalue() + bytes(64 * 2**20))
        for name, arr in (("y", np.zeros(60, np.int64)), ("group", np.arange(60) % 2)):
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{name}.npy", buf.getvalue())
    assert (tmp_path / "pad.npz").stat().st_size < 2**20
    with pytest.raises(DataError, match=r"field 'x' declares shape 60x16 float32 = 3,840 bytes but its member holds "
                                        r"67,112,704: numpy writes no bytes past an array"):
        open_stream(tmp_path / "pad.npz")


def _deflated_checkpoint(path, elements: int):
    """A state_dict of one zero tensor of ``elements`` float32, its archive entries deflated (a
    few KB on disk for MBs in memory); torch reads it all the same."""
    import zipfile

    plain = path.with_suffix(".plain")
    torch.save({"w": torch.zeros(elements)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    plain.unlink()
    return path


def test_a_checkpoint_inflating_past_the_memory_available_is_refused_before_loading(tmp_path, monkeypatch):
    import fqexport.graph.loading as loading

    bomb = _deflated_checkpoint(tmp_path / "bomb.pt", 2**20)  # 4 MiB of zeros
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(loading, "available_memory_bytes", lambda: 2**21)
    for load in (load_state_dict_file, lambda p: load_model(str(p), trust_pickle=True)):
        with pytest.raises(ModelLoadError) as info:
            load(bomb)
        assert str(info.value).startswith(f"{bomb}: its ")
        assert " archive entries inflate to 0.00 GB in memory (0.0" in str(info.value)
        assert str(info.value).endswith("more than the 0.00 GB available: refused before torch.load allocates them")
    monkeypatch.setattr(loading, "available_memory_bytes", lambda: 2**30)
    assert load_state_dict_file(bomb)["w"].shape == (2**20,)  # what fits is read as before
