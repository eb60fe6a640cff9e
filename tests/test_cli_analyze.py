"""Tests of ``fqexport analyze`` through the real fqexport.cli:main (exit codes, table, JSON)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_models import tabular_task, tiny_mlp

from fqexport.cli import main as cli_main


@pytest.fixture
def main():
    return lambda argv: cli_main([str(a) for a in argv])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyze")
    data = tabular_task(n=120)
    np.savez(d / "data.npz", x=data.x, y=data.y, group=data.group, group_names=np.array(data.group_names))
    np.savez(d / "wrong.npz", x=data.x[:, :5], y=data.y, group=data.group)
    torch.save(tiny_mlp().state_dict(), d / "mlp.pt")
    return d


def test_prints_table_and_writes_json(main, files, tmp_path, capsys):
    out = tmp_path / "analysis.json"
    rc = main(["--quiet", "analyze", "--model", "fixtures_models:tiny_mlp", "--weights", files / "mlp.pt",
               "--data", files / "data.npz", "--bits", 8, "--hessian-iters", 3, "--max-samples-per-group", 16,
               "--json", out])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["group", "variant", "n", "acc"]
    body = [line.split() for line in lines[2:6]]
    assert [(r[0], r[1], r[2]) for r in body] == [("a", "float", "16"), ("a", "W8A8", "16"),
                                                 ("b", "float", "16"), ("b", "W8A8", "16")]
    assert any(line.startswith(("W8A8: most hurt group", "W8A8: no group hurt")) for line in lines)
    report = json.loads(out.read_text())
    assert report["variants"] == ["float", "W8A8"]
    assert report["settings"]["hessian_iters"] == 3 and report["settings"]["method"] == "rtn"
    diag = report["diagnostics"]["W8A8"]["b"]
    assert diag["count"] == 16 and diag["grad_norm"] > 0 and 1 <= diag["hessian_iterations"] <= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis.json"]  # no temp file left


def test_no_bits_gives_float_only(main, files, capsys):
    rc = main(["--quiet", "analyze", "--model", "fixtures_models:tiny_mlp", "--data", files / "data.npz",
               "--bits", "--hessian-iters", 0, "--max-samples-per-group", 8])
    assert rc == 0
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert [r.split()[:3] for r in rows] == [["a", "float", "8"], ["b", "float", "8"]]
    assert rows[0].split()[-2:] == ["n/a", "0"]  # λ_max skipped


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "{d}/wrong.npz"], "field 'x' with sample shape (5,) does not fit the model"),
        (["--data", "{d}/missing.npz"], "missing.npz"),
        (["--data", "{d}/data.npz", "--bits", "9"], "--bits=9 is not supported"),
        (["--data", "{d}/data.npz", "--tol", "0"], "--tol 0: must be a finite number > 0"),
        # inf stopped the power iteration after 2 products, "converged" (survey 25)
        (["--data", "{d}/data.npz", "--tol", "inf"], "--tol inf: must be a finite number > 0"),
        (["--data", "{d}/data.npz", "--layer-bits", "fc3=9"], "--layer-bits=9 is not supported"),
        (["--data", "{d}/data.npz", "--bits", "--keep-float", "fc2"],
         "--keep-float: used only with quantized variants (--bits with a width)"),
    ],
)
def test_bad_input_exits_2_without_json(main, files, tmp_path, capsys, extra, message):
    out = tmp_path / "analysis.json"
    argv = ["--quiet", "analyze", "--model", "fixtures_models:tiny_mlp", "--hessian-iters", 1,
            "--max-samples-per-group", 4, "--json", out] + [e.format(d=files) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_keep_float_and_layer_bits_reach_every_variant_and_its_summary(main, files, tmp_path, capsys):
    """Acting on analyze's advice (survey 74: only the undocumented API's config= could)."""
    out = tmp_path / "analysis.json"
    assert main(["--quiet", "analyze", "--model", "fixtures_models:tiny_mlp", "--weights", files / "mlp.pt",
                 "--data", files / "data.npz", "--bits", 4, 2, "--hessian-iters", 0, "--max-samples-per-group", 16,
                 "--keep-float", "fc2", "--layer-bits", "fc3=8", "--json", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    for w in ("W4A8", "W2A8"):
        assert any(l.startswith(f"{w}: ") and l.endswith(f"; not at {w}'s width: 1 weight layer(s) float "
                                                         "('fc2' [keep_float: fc2]); 'fc3' at 8 bits") for l in lines)
    settings = json.loads(out.read_text())["settings"]
    assert settings["keep_float"] == ["fc2"] and settings["layer_bits"] == {"fc3": 8}


def test_bad_model_and_bad_options(main, files, capsys):
    assert main(["analyze", "--model", "no_such_module_h7:factory", "--data", files / "data.npz"]) == 2
    assert "cannot import module 'no_such_module_h7'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--model", "fixtures_models:tiny_mlp", "--data", files / "data.npz", "--hessian-iters", -1])
    assert exc.value.code == 2
    assert "'-1' must be >= 0" in capsys.readouterr().err


def test_quiet_and_verbose_are_accepted_after_the_subcommand(main, files, capsys):
    rc = main(["analyze", "--model", "fixtures_models:tiny_mlp", "--data", files / "data.npz", "--bits",
               "--hessian-iters", 0, "--max-samples-per-group", 4, "-q"])
    assert rc == 0
    assert [r.split()[:3] for r in capsys.readouterr().out.splitlines()[2:4]] == [["a", "float", "4"],
                                                                               ["b", "float", "4"]]


@pytest.mark.parametrize("field, task", [("masks", "segmentation"), ("boxes", "detection")])
def test_a_segmenters_or_detectors_data_is_refused_without_task(main, tmp_path, capsys, field, task):
    """analyze infers the task from the data, as --task's default says, instead of asking for labels."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)
    notes = ({"masks": rng.integers(0, 2, size=(8, 8, 8)).astype(np.int64)} if field == "masks" else
             {"boxes": np.array([[1, 1, 5, 5]] * 8, np.float32), "box_labels": np.zeros(8, np.int64),
              "box_image": np.arange(8, dtype=np.int64)})
    np.savez(tmp_path / "d.npz", x=x, group=(np.arange(8) % 2).astype(np.int64), **notes)
    rc = main(["--quiet", "analyze", "--model", "fixtures_models:tiny_mlp", "--data", tmp_path / "d.npz", "--bits", 8])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error: analyze diagnoses classifiers" in err and f"for a {task} model use validate --task {task}" in err


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_outside_the_generators_range_is_a_usage_error(main, files, capsys, seed):
    """--seed -1 ended in "internal error: ValueError: expected non-negative integer", exit 3 (survey 25)."""
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "--model", "fixtures_models:tiny_mlp", "--data", f"{files}/data.npz", "--seed", seed])
    assert exit_.value.code == 2
    assert f"argument --seed: '{seed}' must be >= 0 and <= 4294967295" in capsys.readouterr().err


def test_configs_refuse_a_seed_outside_the_generators_range():
    from fqexport.config import MixedPrecisionConfig, QuantConfig
    from fqexport.errors import ConfigError
    from fqexport.finetune.config import FinetuneConfig

    for make in (lambda s: QuantConfig(seed=s), lambda s: MixedPrecisionConfig(budget_bits=4, seed=s),
                 lambda s: FinetuneConfig(seed=s)):
        with pytest.raises(ConfigError, match=r"^seed=-1 must be an integer in \[0, 4294967295\]"):
            make(-1)
        assert make(2**32 - 1).seed == 2**32 - 1


def test_a_detector_on_label_free_data_is_refused_as_a_detector(main, tmp_path, capsys):
    """It asked for labels y, then refused the y the user added (survey 36): the output says detection."""
    x = np.random.default_rng(0).normal(size=(8, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, group=(np.arange(8) % 2).astype(np.int64))
    rc = main(["--quiet", "analyze", "--model", "fixtures_models:yolov5_test", "--data", tmp_path / "d.npz", "--bits", 8])
    err = capsys.readouterr().err
    assert rc == 2 and "error: analyze diagnoses classifiers" in err and "for a detection model" in err, err
