"""Tests of fqexport/model_loading.py: factory + state_dict, .pt2, pickled modules, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import fixtures_models as fm
from fqexport.errors import ModelLoadError
from fqexport.graph.loading import load_model, load_state_dict_file


def _same_outputs(a, b, data, atol=0.0):
    x = torch.from_numpy(data.x[:16])
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=atol, rtol=0)


def _load_error(*args, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(*args, **kwargs)
    return str(info.value)


def test_factory_and_weights(cnn_files, cnn_model, cnn_data):
    model = load_model("fixtures_models:tiny_cnn", cnn_files / "cnn.pt")
    assert isinstance(model, fm.TinyCNN) and not model.training and not model.stem_bn.training
    assert _same_outputs(model, cnn_model, cnn_data)


def test_factory_kwargs():
    model = load_model("fixtures_models:tiny_cnn", factory_kwargs={"num_classes": 7})
    assert model.fc.out_features == 7


def test_a_factory_without_weights_is_loaded_with_a_warning(caplog, cnn_files):
    """A factory's own parameters may be random: a model without weights is said to be one
    (a CI gate would otherwise pass a random model in silence); with weights, nothing is said."""
    with caplog.at_level(logging.WARNING, logger="fqexport.graph.loading"):
        load_model("fixtures_models:tiny_cnn")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "factory 'fixtures_models:tiny_cnn' was given no weights" in caplog.text and "--weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fqexport.graph.loading"):
        load_model("fixtures_models:tiny_cnn", cnn_files / "cnn.pt")
    assert not caplog.records


def test_nested_state_dict_accepted(tmp_path, cnn_model, cnn_data):
    torch.save({"state_dict": cnn_model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    model = load_model("fixtures_models:tiny_cnn", tmp_path / "ckpt.pt")
    assert _same_outputs(model, cnn_model, cnn_data)


def test_module_is_returned_in_eval_mode():
    net = fm.tiny_mlp().train()
    assert load_model(net) is net and not net.training


def test_missing_weights_file(tmp_path):
    msg = _load_error("fixtures_models:tiny_cnn", tmp_path / "nope.pt")
    assert "nope.pt: checkpoint file not found" in msg


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    msg = _load_error("fixtures_models:tiny_cnn", tmp_path / "list.pt")
    assert "list.pt: not a state_dict" in msg


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    msg = _load_error("fixtures_models:tiny_cnn", tmp_path / "garbage.pt")
    assert "garbage.pt: cannot read checkpoint with torch.load(weights_only=True)" in msg


def test_mismatching_keys_are_listed(tmp_path, cnn_model):
    state = dict(cnn_model.state_dict())
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    msg = _load_error("fixtures_models:tiny_cnn", tmp_path / "bad.pt")
    assert "state_dict does not match the model from 'fixtures_models:tiny_cnn'" in msg
    assert "missing keys ['fc.bias']" in msg
    assert "unexpected keys ['extra.weight']" in msg


def test_shape_mismatch_is_described(tmp_path, cnn_model):
    state = dict(cnn_model.state_dict())
    state["fc.weight"] = torch.zeros(5, 16)
    torch.save(state, tmp_path / "shape.pt")
    msg = _load_error("fixtures_models:tiny_cnn", tmp_path / "shape.pt")
    assert "shape mismatch fc.weight: checkpoint (5, 16) vs model (4, 16)" in msg


@pytest.mark.parametrize("spec", ["no_colon_and_no_file", "fixtures_models:", ":tiny_cnn"])
def test_bad_spec(spec):
    msg = _load_error(spec)
    assert f"model spec {spec!r} is neither 'package.module:factory' nor a .pt2 file" in msg


def test_import_error():
    msg = _load_error("no_such_module_xyz:factory")
    assert "cannot import module 'no_such_module_xyz' of model spec 'no_such_module_xyz:factory'" in msg


def test_missing_attribute():
    assert "module 'fixtures_models' has no attribute 'nope'" in _load_error("fixtures_models:nope")


def test_factory_raising():
    msg = _load_error("fixtures_models:failing_factory")
    assert "factory 'fixtures_models:failing_factory' failed: RuntimeError: boom from the factory" in msg


def test_a_user_module_or_factory_that_exits_is_a_load_error_not_fqexports_exit(tmp_path, monkeypatch, capsys):
    """survey 76: sys.exit(1) at import made fqexport exit 1 (CI's "gate failed") with no message,
    and a module-level parse_args() read fqexport's own arguments and rejected them."""
    import sys

    from fqexport.cli import main

    (tmp_path / "exits_mod.py").write_text("import sys\nsys.exit(1)\n")
    (tmp_path / "exits_fac.py").write_text("import sys\ndef net():\n    sys.exit('no GPU available')\n")
    (tmp_path / "parses_mod.py").write_text(
        "import argparse, sys, torch\nARGV = list(sys.argv)\nargs = argparse.ArgumentParser().parse_args()\n"
        "def net():\n    return torch.nn.Linear(4, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _load_error("exits_mod:net").startswith(
        "module 'exits_mod' of model spec 'exits_mod:net' called sys.exit(1) while fqexport ran it, which is not "
        "fqexport's exit: a script's top level (argparse's parse_args(), sys.exit) runs when its module is imported")
    assert _load_error("exits_fac:net") == (
        "factory 'exits_fac:net' called sys.exit('no GPU available') while fqexport ran it, which is not fqexport's exit")
    argv = list(sys.argv)
    assert isinstance(load_model("parses_mod:net"), torch.nn.Linear) and sys.argv == argv
    assert sys.modules["parses_mod"].ARGV == ["parses_mod"]  # its own name, not fqexport's arguments
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.zeros(4, np.int64), group=np.zeros(4, np.int64))
    code = main(["analyze", "--model", "exits_mod:net", "--data", str(tmp_path / "d.npz")])
    assert code == 2 and "called sys.exit(1)" in capsys.readouterr().err



def test_a_pickled_models_module_that_exits_while_unpickled_is_a_load_error(tmp_path, monkeypatch):
    """The pickled-module path (--trust-pickle) imports the model's module too (survey 79)."""
    import sys

    (tmp_path / "pickmod.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import pickmod

    torch.save(pickmod.Net(4, 2), tmp_path / "net.pt")
    del sys.modules["pickmod"]
    (tmp_path / "pickmod.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "net.pt"), trust_pickle=True)
    assert str(info.value).startswith(f"unpickling {tmp_path / 'net.pt'} called sys.exit(3) while fqexport ran it, "
                                      "which is not fqexport's exit: a script's top level")
    sys.modules.pop("pickmod", None)

def test_factory_returning_non_module():
    assert "returned int, not an nn.Module" in _load_error("fixtures_models:not_a_module")


def test_pt2_round_trip_gives_identical_outputs(tmp_path, cnn_model, cnn_data):
    ep = torch.export.export(cnn_model, (torch.from_numpy(cnn_data.x[:2]),))
    torch.export.save(ep, str(tmp_path / "cnn.pt2"))
    model = load_model(str(tmp_path / "cnn.pt2"))
    assert isinstance(model, torch.fx.GraphModule) and not model.training
    assert _same_outputs(model, cnn_model, cnn_data)


class _LogitsAndFeatures(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 3)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(f), f


def test_a_pt2_returning_several_outputs_is_compressed_on_its_first(tmp_path, caplog):
    """As a factory's model is: the first output (warned), not an internal error in the export check
    (survey 26); the loaded program itself still returns both."""
    from fqexport.calibration.checks import validate_group_data
    from fqexport.config import QuantConfig
    from fqexport.exporters.qdq_onnx import export_qdq
    from fqexport.pipeline.compress import compress

    torch.manual_seed(0)
    net = _LogitsAndFeatures().eval()
    x = torch.randn(64, 3, 8, 8)
    program = torch.export.export(net, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "two.pt2"))
    model = load_model(str(tmp_path / "two.pt2"))
    data = validate_group_data(x.numpy(), net(x)[0].argmax(1).numpy(), (torch.arange(64) % 2).numpy(), ["a", "b"],
                               "calib.npz")
    with caplog.at_level(logging.WARNING):
        cm = compress(model, data, QuantConfig(num_calib=64), progress=False)
    assert "returns a tuple of 2 outputs" in caplog.text
    assert cm.predict(data.x).shape == (64, 3)
    assert export_qdq(cm, tmp_path / "two.onnx").agreement >= 0.99
    assert isinstance(model(x[:2]), tuple)


def test_missing_pt2(tmp_path):
    assert "missing.pt2: .pt2 file not found" in _load_error(str(tmp_path / "missing.pt2"))


def test_corrupt_pt2(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    assert "bad.pt2: not a torch.export .pt2 archive (File is not a zip file)" in _load_error(str(tmp_path / "bad.pt2"))


def test_pickled_module_refused_without_trust(tmp_path, cnn_model):
    torch.save(cnn_model, tmp_path / "whole.pth")
    msg = _load_error(str(tmp_path / "whole.pth"))
    assert "whole.pth: loading a pickled whole module runs arbitrary code" in msg
    assert "--trust-pickle" in msg


def test_pickled_module_accepted_with_trust(tmp_path, cnn_model, cnn_data):
    torch.save(cnn_model, tmp_path / "whole.pth")
    model = load_model(str(tmp_path / "whole.pth"), trust_pickle=True)
    assert isinstance(model, fm.TinyCNN) and model is not cnn_model
    assert _same_outputs(model, cnn_model, cnn_data)


def test_a_pickled_model_finds_its_module_in_the_working_directory(tmp_path, monkeypatch):
    """Like a factory spec, a pickle's class may live in a module of the folder fqexport runs
    from; from elsewhere the message says where the class must be importable from."""
    import subprocess
    import sys

    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "pickled_net_m7.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n")
    subprocess.run([sys.executable, "-c", "import torch, pickled_net_m7; torch.save(pickled_net_m7.Net(), 'whole.pt')"],
                   cwd=folder, check=True)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    msg = _load_error(str(folder / "whole.pt"), trust_pickle=True)
    assert "whole.pt: the pickled model's class lives in module 'pickled_net_m7', which cannot be imported" in msg
    monkeypatch.chdir(folder)
    model = load_model("whole.pt", trust_pickle=True)
    assert type(model).__name__ == "Net" and not model.training


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # a user's TorchScript file, made here
@pytest.mark.parametrize("trust", [False, True])
def test_a_torchscript_file_is_named_as_such(tmp_path, trust):
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), tmp_path / "ts.pt")
    msg = _load_error(str(tmp_path / "ts.pt"), trust_pickle=trust)
    assert "ts.pt: a TorchScript archive (torch.jit.save)" in msg and "--weights" in msg
    torch.save(torch.nn.Linear(4, 2), tmp_path / "whole.pt")  # a pickled module is not taken for one
    assert "TorchScript" not in _load_error(str(tmp_path / "whole.pt"))


def test_trusted_pickle_of_non_module(tmp_path):
    torch.save({"a": 1}, tmp_path / "dict.pth")
    assert "dict.pth: holds a dict, not a model" in _load_error(str(tmp_path / "dict.pth"), trust_pickle=True)
    torch.save([1, object], tmp_path / "list.pth")  # not readable with weights_only: unpickled when trusted
    assert "list.pth: holds list, not an nn.Module" in _load_error(str(tmp_path / "list.pth"), trust_pickle=True)


@pytest.mark.parametrize("trust", [False, True])
def test_a_state_dict_given_as_the_model_says_to_pass_it_as_weights(tmp_path, cnn_model, trust):
    """A state_dict (or a checkpoint dict around one) is read safely and named as such, with or
    without --trust-pickle: the advice is a factory plus --weights, never --trust-pickle."""
    torch.save(cnn_model.state_dict(), tmp_path / "sd.pt")
    torch.save({"state_dict": cnn_model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    n = len(cnn_model.state_dict())
    for name in ("sd.pt", "ckpt.pt"):
        msg = _load_error(str(tmp_path / name), trust_pickle=trust)
        assert f"{name}: holds a state_dict of {n} tensors, not a model" in msg
        assert "--weights" in msg and "--trust-pickle" not in msg


def test_load_state_dict_file_returns_tensors(cnn_files):
    state = load_state_dict_file(cnn_files / "cnn.pt")
    assert "stem.weight" in state and tuple(state["fc.weight"].shape) == (4, 16)


def test_a_whole_pickled_model_given_as_weights_names_its_class(tmp_path):
    """torch's message names the class only inside the advice fqexport drops: keep the name."""
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    msg = _load_error("fixtures_models:tiny_cnn", tmp_path / "whole.pt")
    assert msg.endswith(": cannot read checkpoint with torch.load(weights_only=True): it pickles "
                        "torch.nn.modules.linear.Linear, not only tensors (a whole model? save its state_dict "
                        "instead) (only plain tensors are read from an untrusted file)")


def test_a_timm_train_checkpoint_loads_its_state_dict_and_warns_of_the_ema_beside_it(tmp_path, caplog, cnn_model):
    """timm's train.py saves {'state_dict', 'state_dict_ema', 'args': argparse.Namespace, ...}: it was
    refused as 'a whole model?' (survey 69); the Namespace is plain options."""
    import argparse

    ema = {k: v + 1 if v.is_floating_point() else v for k, v in cnn_model.state_dict().items()}
    torch.save({"epoch": 3, "arch": "cnn", "state_dict": cnn_model.state_dict(), "optimizer": {}, "version": 2,
                "args": argparse.Namespace(model="cnn", lr=0.1), "metric": 97.0, "state_dict_ema": ema},
               tmp_path / "last.pth.tar")
    with caplog.at_level(logging.WARNING):
        state = load_state_dict_file(tmp_path / "last.pth.tar")
    assert all(torch.equal(state[k], v) for k, v in cnn_model.state_dict().items())
    assert "loaded its 'state_dict' entry, the trained weights; it also holds 'state_dict_ema'" in caplog.text


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # a user's TorchScript file, made here
def test_a_torchscript_file_given_as_weights_is_named_as_such(tmp_path, recwarn):
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), tmp_path / "ts.pt")
    with pytest.raises(ModelLoadError, match=r"ts\.pt: a TorchScript archive \(torch\.jit\.save\), not a state_dict"):
        load_state_dict_file(tmp_path / "ts.pt")
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]  # torch's own warning does not leak


def _trained_mlp_state() -> dict:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in fm.TinyMLP().state_dict().items()}


@pytest.mark.parametrize("form", ["DataParallel", "torch.compile", "Lightning", "AveragedModel"])
def test_a_training_wrappers_key_prefix_is_removed(tmp_path, caplog, form):
    state = _trained_mlp_state()
    saved = {"DataParallel": {f"module.{k}": v for k, v in state.items()},
             "torch.compile": {f"_orig_mod.{k}": v for k, v in state.items()},
             "Lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
             "AveragedModel": {**{f"module.{k}": v for k, v in state.items()}, "n_averaged": torch.tensor(5)}}[form]
    torch.save(saved, tmp_path / "w.pt")
    with caplog.at_level(logging.INFO, logger="fqexport.graph.loading"):
        model = load_model("fixtures_models:tiny_mlp", tmp_path / "w.pt")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert any("(a training wrapper's); loaded without it" in r.getMessage() for r in caplog.records)


def test_a_prefix_that_does_not_make_the_models_keys_is_a_mismatch(tmp_path):
    state = _trained_mlp_state()
    torch.save({f"module.{k}": v for k, v in list(state.items())[1:]}, tmp_path / "w.pt")
    assert "missing keys" in _load_error("fixtures_models:tiny_mlp", tmp_path / "w.pt")


def test_the_keys_under_any_one_prefix_that_are_exactly_the_models_are_loaded(tmp_path, caplog):
    state = _trained_mlp_state()
    torch.save({"state_dict": {**{f"net.{k}": v for k, v in state.items()}, "criterion.pos_weight": torch.ones(3)}},
               tmp_path / "w.pt")
    with caplog.at_level(logging.INFO, logger="fqexport.graph.loading"):
        model = load_model("fixtures_models:tiny_mlp", tmp_path / "w.pt")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "keys under 'net.', loaded without it; the 1 other keys of" in caplog.text and "'criterion.pos_weight'" in caplog.text


def test_two_prefixes_that_each_hold_the_models_keys_are_refused_by_name(tmp_path):
    state = _trained_mlp_state()
    torch.save({**{f"student.{k}": v for k, v in state.items()}, **{f"teacher.{k}": v for k, v in state.items()}},
               tmp_path / "w.pt")
    msg = _load_error("fixtures_models:tiny_mlp", tmp_path / "w.pt")
    assert "the keys under each of 'student.', 'teacher.' are exactly the model's" in msg


def test_a_state_dict_with_a_modules_extra_state_loads(tmp_path):
    class WithExtra(torch.nn.Linear):
        def get_extra_state(self):
            return {"calibrated": True}

        def set_extra_state(self, state):
            self.extra = state

    torch.save(WithExtra(2, 2).state_dict(), tmp_path / "w.pt")
    state = load_state_dict_file(tmp_path / "w.pt")
    assert state["_extra_state"] == {"calibrated": True} and set(state) == {"weight", "bias", "_extra_state"}


def test_unreadable_checkpoints_say_what_they_are(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello world\n")
    torch.save({"ema": {"fc.weight": 1}, "epoch": 3}, tmp_path / "other.pt")
    assert _load_error("fixtures_models:tiny_mlp", tmp_path / "empty.pt").endswith(
        "empty.pt: cannot read checkpoint with torch.load(weights_only=True): EOFError (not a file torch.save "
        "wrote, or a truncated one)")
    assert _load_error("fixtures_models:tiny_mlp", tmp_path / "text.pt").endswith(
        "KeyError: 101 (not a file torch.save wrote, or a truncated one)")
    assert _load_error("fixtures_models:tiny_mlp", tmp_path / "other.pt").endswith(
        "other.pt: not a state_dict (expected a dict of parameter name -> tensor, or one under "
        "'state_dict'/'model_state_dict'/'model'); it holds the keys 'ema', 'epoch'")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # the test scripts a model, as a user would
def test_wrapped_half_and_scripted_models_given_to_compress(mlp_model, mlp_data):
    """DataParallel and torch.compile add no computation: their model is compressed; a float16 model
    is calibrated in float32 (not a data error); a TorchScript module is named as such."""
    import copy

    from fqexport.config import QuantConfig
    from fqexport.pipeline.compress import compress

    config = QuantConfig(num_calib=64)
    plain = compress(mlp_model, mlp_data, config, progress=False)
    for wrapped in (torch.nn.DataParallel(mlp_model), torch.compile(mlp_model)):
        cm = compress(wrapped, mlp_data, config, progress=False)
        assert sorted(cm.layers) == sorted(plain.layers)
        assert all(torch.equal(cm.layers[n].codes, plain.layers[n].codes) for n in plain.layers)
    half = copy.deepcopy(mlp_model).half()
    cm = compress(half, mlp_data, config, progress=False)
    assert sorted(cm.layers) == sorted(plain.layers) and next(half.parameters()).dtype == torch.float16
    with pytest.raises(ModelLoadError, match=r"^the model is a TorchScript module \(RecursiveScriptModule\): "):
        compress(torch.jit.script(mlp_model), mlp_data, config, progress=False)


def test_a_pickled_model_whose_class_lived_in_the_saving_script_gets_the_way_out(tmp_path):
    """torch.save(model) from train.py stores the class as __main__.Net, which no other process has (survey 26)."""
    ScriptNet = type("ScriptNet", (torch.nn.Sequential,), {"__module__": "__main__"})
    import __main__
    __main__.ScriptNet = ScriptNet
    try:
        torch.save(ScriptNet(torch.nn.Linear(4, 2)), tmp_path / "model.pt")
    finally:
        del __main__.ScriptNet
    assert _load_error(str(tmp_path / "model.pt"), trust_pickle=True) == (
        f"{tmp_path / 'model.pt'}: the pickled model's class 'ScriptNet' was defined in the script that saved it "
        "(module '__main__'), which fqexport cannot import: move the class into a module (e.g. net.py) and save "
        "again, or save model.state_dict() and load it with --model net:ScriptNet --weights <file>")


def test_plain_weights_load_into_a_factory_that_returns_a_compiled_model(tmp_path):
    """The loader matched the checkpoint against the wrapper's _orig_mod.* keys: exit 2 (survey 28)."""
    trained = fm.tiny_mlp()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    torch.save(trained.state_dict(), tmp_path / "plain.pt")
    model = load_model("fixtures_models:compiled_tiny_mlp", weights=str(tmp_path / "plain.pt"))
    inner = model._orig_mod
    assert all(torch.equal(a, b) for a, b in zip(inner.state_dict().values(), trained.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_export_float_writes_a_half_model_as_its_float32_copy(tmp_path, mlp_model, mlp_data, dtype):
    """compress takes a float16/bfloat16 model (from a float32 copy); export_float failed on it with
    'Input type (float) and bias type (c10::Half) should be the same' (survey 70)."""
    import copy

    from fqexport.exporters.ort_session import make_session, run_batches
    from fqexport.exporters.qdq_onnx import export_float

    half = copy.deepcopy(mlp_model).to(dtype)
    res = export_float(half, torch.from_numpy(mlp_data.x[:2]), tmp_path / "f.onnx")
    with torch.no_grad():
        want = copy.deepcopy(half).float()(torch.from_numpy(mlp_data.x[:50])).numpy()
    np.testing.assert_allclose(run_batches(make_session(res.path), mlp_data.x[:50], 50), want, rtol=1e-5, atol=1e-4)
    assert next(half.parameters()).dtype == dtype  # the user's model is left as it was


def test_export_float_takes_a_compiled_model(tmp_path, mlp_model, mlp_data):
    """torch.onnx failed on the wrapper with an IndexError (survey 28)."""
    from fqexport.exporters.ort_session import make_session, run_batches
    from fqexport.exporters.qdq_onnx import export_float

    res = export_float(torch.compile(mlp_model), torch.from_numpy(mlp_data.x[:2]), tmp_path / "f.onnx")
    with torch.no_grad():
        want = mlp_model(torch.from_numpy(mlp_data.x[:50])).numpy()
    np.testing.assert_allclose(run_batches(make_session(res.path), mlp_data.x[:50], 50), want, atol=1e-5)


class _MetaBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.meta = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.meta(self.conv(x).mean((2, 3)))


def test_a_pt2_whose_attribute_is_named_like_a_graphmodule_attribute_loads_under_a_free_name(tmp_path, caplog):
    """torch could not rebuild the program's module ("target meta.weight references nonexistent
    attribute weight of meta"): the name is moved to meta_ first, as on the traced path."""
    torch.manual_seed(0)
    model, x = _MetaBranch().eval(), torch.randn(2, 3, 8, 8)
    path = tmp_path / "meta.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    with caplog.at_level(logging.WARNING):
        loaded = load_model(str(path))
    assert "traced as 'meta_'" in caplog.text
    assert isinstance(loaded.get_submodule("meta_"), torch.nn.Linear)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_models_own_meta_attribute_is_not_read_as_a_pt2_programs_shape():
    from fqexport.graph.loading import check_pt2_sample_shape

    check_pt2_sample_shape(_MetaBranch(), (3, 8, 8), "data.npz")  # its Linear has no .get: was exit 3
