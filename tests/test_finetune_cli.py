"""``fqexport compress --finetune`` through main([...]): exit codes, files, the printed table."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import run_main
from fqexport.cli.flags.finetune import (
    MSG_EXPORT_BITS,
    MSG_EXPORT_BITS_BUDGET,
    MSG_EXPORT_BITS_LAYER_BITS,
    MSG_EXPORT_BITS_WITHOUT,
    MSG_LEARN_BITS_BUDGET,
    MSG_LEARN_BITS_SEARCH,
    MSG_LEARN_BITS_WITHOUT,
    MSG_NO_TRAIN,
    MSG_TRAIN_WITHOUT,
)
from fqexport.cli.flags.shared import MSG_ONLY_WITH
from fqexport.cli.main import build_parser
from fqexport.errors import ConfigError
from fqexport.exporters.metadata import read_metadata


def _args(files, out, *extra):
    return ["-q", "compress", "--model", "fixtures_models:tiny_mlp", "--weights", files / "mlp.pt",
            "--calib", files / "calib.npz", "--out", out, "--num-calib", "200", "--weight-bits", "2", *extra]


def test_finetune_without_train_is_bad_input(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--finetune"))
    assert code == 2 and MSG_NO_TRAIN in err and not out.exists()


def test_train_without_finetune_is_bad_input(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--train", mlp_files / "calib.npz"))
    assert code == 2 and MSG_TRAIN_WITHOUT in err and not out.exists()


def test_train_groups_not_matching_calibration_is_bad_input(mlp_files, mlp_data, tmp_path):
    train = tmp_path / "train.npz"
    np.savez(train, x=mlp_data.x, y=mlp_data.y, group=mlp_data.group, group_names=np.array(["young", "old"]))
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", train))
    assert code == 2 and not out.exists()
    assert (f"{train}: the training data's groups do not match the calibration data's (missing from the training "
            "data: 'a', 'b'; not in the calibration data: 'young', 'old')") in err


def test_bad_sampler_option_value_is_bad_input(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz",
                              "--sampler", "core-set", "--coreset-fraction", "1.5"))
    assert code == 2 and "--coreset-fraction: FinetuneConfig.coreset_fraction=1.5 must be in (0, 1]" in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value, field", [("--ft-batch-size", "0", "batch_size"), ("--epochs", "0", "epochs"),
                                                ("--max-minutes", "0", "max_minutes")])
def test_a_bad_finetune_value_is_named_by_its_flag(mlp_files, tmp_path, flag, value, field):
    """'FinetuneConfig.batch_size=0 must be …' named a field no flag is called (and compress has its own
    --batch-size): the error leads with the flag typed (survey 59)."""
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", flag, value))
    assert code == 2 and err.startswith(f"error: {flag}: FinetuneConfig.{field}=") and not out.exists()


def test_compress_finetune_prints_groups_before_after_and_records_metadata(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz",
                                   "--epochs", "1", "--loss", "worst-group", "--sampler", "group-balanced"))
    assert code == 0, err
    assert "fine-tuning (worst-group, group-balanced sampling): 1 epoch(s)" in stdout
    lines = [l.split() for l in stdout.splitlines() if l.startswith(("a ", "b "))]
    assert [l[0] for l in lines] == ["a", "b"] and all(len(l) == 6 for l in lines)
    meta = read_metadata(out)
    rec = meta.finetune
    assert rec["settings"]["sampler"] == "group-balanced" and rec["epochs_run"] == 1
    assert sum(rec["train_group_counts"].values()) == rec["num_fit"] + rec["num_holdout"]
    # the printed hold-out accuracies are the recorded ones
    for l in lines:
        assert float(l[2]) == round(100 * rec["holdout_before"][l[0]]["accuracy"], 2)
        assert float(l[3]) == round(100 * rec["holdout_after"][l[0]]["accuracy"], 2)


def test_learn_bits_needs_finetune_and_a_bits_budget(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--learn-bits", "--budget-bits", "2.5"))
    assert code == 2 and MSG_LEARN_BITS_WITHOUT in err and not out.exists()
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", "--learn-bits"))
    assert code == 2 and MSG_LEARN_BITS_BUDGET in err and not out.exists()
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", "--learn-bits",
                              "--budget-bits", "1.5"))
    assert code == 2 and "a budget below the smallest width cannot be met" in err and not out.exists()


def test_compress_learn_bits_meets_the_budget(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", "--epochs", "1",
                                   "--learn-bits", "--budget-bits", "2.5", "--weight-bits", "4"))
    assert code == 0, err
    assert "learned widths (BAQ, budget 2.5 bits" in stdout
    meta = read_metadata(out)
    assert meta.avg_weight_bits <= 2.5 and meta.finetune["baq"]["bits"] == {r.name: r.bits for r in meta.layers}
    # the model given (4-bit) and the start after learning the widths (epoch 0) are both shown
    assert "before: the model given to fine-tuning; start: after the widths learned (BAQ), epoch 0" in stdout
    lines = [l.split() for l in stdout.splitlines() if l.startswith(("a ", "b "))]
    assert [l[0] for l in lines] == ["a", "b"] and all(len(l) == 8 for l in lines)
    for l in lines:
        assert float(l[3]) == round(100 * meta.finetune["history"][0]["holdout"][l[0]]["accuracy"], 2)


def test_learn_bits_refuses_the_search_options_it_would_ignore(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    base = ("--finetune", "--train", mlp_files / "calib.npz", "--learn-bits", "--budget-bits", "2.5")
    for extra, named in ((("--objective", "mean"), "--objective"), (("--pin", "fc1=8"), "--pin"),
                         (("--objective", "worst-group", "--pin", "fc1=8", "--engine", "serial"),
                          "--objective, --pin, --engine"),
                         (("--candidates", "3", "--verify-folds", "2"), "--candidates, --verify-folds")):
        code, stdout, err = run_main(_args(mlp_files, out, *base, *extra))
        assert code == 2 and f"error: {MSG_LEARN_BITS_SEARCH.format(flags=named)}" in err, err
        assert "fine-tuning" not in stdout and not out.exists()


def test_learn_bits_uses_bit_choices(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", "--epochs", "1",
                                   "--learn-bits", "--budget-bits", "3", "--bit-choices", "2,4",
                                   "--weight-bits", "4"))
    assert code == 0, err
    assert "budget 3 bits" in stdout and "nominal bits" in stdout
    meta = read_metadata(out)
    assert meta.finetune["settings"]["bit_choices"] == [2, 4]
    assert {r.bits for r in meta.layers} <= {2, 4} and meta.avg_weight_bits <= 3
    # a budget outside the given widths is refused before any compute
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", "--learn-bits",
                              "--budget-bits", "5", "--bit-choices", "2,4"))
    assert code == 2 and "FinetuneConfig.budget_bits=5.0 is outside the candidate widths [2, 4]" in err


def test_export_bits_writes_one_file_per_width_from_one_run(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", "--epochs", "1",
                                   "--oscillation", "0.1", "--export-bits", "3,8", "--loss", "ce", "--sampler", "natural"))
    assert code == 0, err
    assert not out.exists() and stdout.count("fine-tuning (ce, natural sampling): 1 epoch(s)") == 1
    metas = {b: read_metadata(tmp_path / f"m.w{b}.onnx") for b in (3, 8)}
    for b, meta in metas.items():
        assert {r.bits for r in meta.layers} == {b} and meta.avg_weight_bits == b
        assert meta.finetune["requantized_to"] == b
    # one run: both files carry the same fine-tuning record (same kept epoch, same steps)
    assert metas[3].finetune["steps"] == metas[8].finetune["steps"] > 0
    assert metas[3].finetune["history"] == metas[8].finetune["history"]
    # each width's own hold-out worst group, as its metadata records it (survey 93: a collapsed W2 read fine)
    for b, meta in metas.items():
        worst = min(r["accuracy"] for r in meta.finetune["holdout_after"].values() if r["count"])
        assert re.search(rf"\n{b}\s+\S+m\.w{b}\.onnx\s+[0-9.]+\s+[0-9.]+\s+{100 * worst:.2f}\s", stdout), stdout


def test_export_bits_collision_is_caught_before_compute(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    report = tmp_path / "m.w4.onnx"
    code, stdout, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz",
                                   "--export-bits", "4,8", "--report", report))
    assert code == 2 and "--report" in err and "--export-bits (4 bits)" in err and "fine-tuning" not in stdout
    assert not report.exists() and not (tmp_path / "m.w8.onnx").exists()


@pytest.mark.parametrize("budget", [("--budget-bits", "4"), ("--budget-bytes", "9000"), ("--layer-bits", "fc3=8")])
def test_export_bits_with_a_search_budget_is_refused_before_compute(mlp_files, tmp_path, budget):
    """Each width re-quantizes every layer: the search's allocation (and its budget) would be thrown away."""
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", "--export-bits",
                                  "4,8", *budget))
    # --layer-bits too: its widths were dropped silently while settings still recorded them (survey 44)
    want = (MSG_EXPORT_BITS_LAYER_BITS.format(layers="fc3=8") if budget[0] == "--layer-bits"
            else MSG_EXPORT_BITS_BUDGET.format(flag=budget[0]))
    assert code == 2 and want in err
    assert not list(tmp_path.glob("m*.onnx"))


def test_export_bits_bad_values_and_without_finetune_are_bad_input(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    for bad in ("3,3", "1,4", "four"):
        code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz",
                                  "--export-bits", bad))
        assert code == 2 and MSG_EXPORT_BITS.format(value=bad) in err
    code, _, err = run_main(_args(mlp_files, out, "--export-bits", "3,4"))
    assert code == 2 and MSG_EXPORT_BITS_WITHOUT in err
    assert not list(tmp_path.glob("*.onnx"))


def test_rounding_adaptive_is_recorded_in_the_exported_metadata(mlp_files, tmp_path):
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", "--epochs", "1",
                              "--rounding", "adaptive"))
    assert code == 0, err
    rec = read_metadata(out).finetune
    assert rec["settings"]["rounding"] == "adaptive"
    assert {r["kept"] for r in rec["adaptive_rounding"]["layers"].values()} <= {"solver", "adaptive"}


def test_finetune_options_without_finetune_are_refused(mlp_files, tmp_path):
    """Every fine-tuning option is used only with --finetune; given alone it would be ignored."""
    out = tmp_path / "m.onnx"
    for extra, named in ((("--epochs", "5"), "--epochs"), (("--lr", "0.1", "--sampler", "natural"), "--sampler, --lr"),
                         (("--max-minutes", "1"), "--max-minutes")):
        code, _, err = run_main(_args(mlp_files, out, *extra))
        assert code == 2 and f"error: {named}: fine-tuning options, used only with --finetune" in err, err
        assert not out.exists()


def test_fixed_widths_with_a_search_budget_are_refused(mlp_files, tmp_path):
    """_args gives --weight-bits 2: with a budget the search sets every width, so it is refused."""
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--budget-bits", "4"))
    assert code == 2 and "error: --weight-bits: a budget lets the search choose every layer's width" in err
    assert "--pin NAME=BITS" in err and not out.exists()


@pytest.mark.parametrize("extra, flags, needs", [
    (("--group-loss-weights", "a=1,b=5"), "--group-loss-weights", "--loss group-weighted"),
    (("--loss", "ce", "--group-loss-weights", "a=1,b=5"), "--group-loss-weights", "--loss group-weighted"),
    (("--loss", "ce", "--dro-eta", "0.1"), "--dro-eta", "--loss worst-group"),
    (("--loss", "group-weighted", "--group-loss-weights", "a=1", "--dro-eta", "0.5"), "--dro-eta",
     "--loss worst-group"),  # given at its default: given
    (("--coreset-fraction", "0.2", "--coreset-score", "disagreement"), "--coreset-fraction, --coreset-score",
     "--sampler core-set"),
    (("--sampler", "natural", "--coreset-score", "loss"), "--coreset-score", "--sampler core-set"),
    (("--bit-epochs", "3"), "--bit-epochs", "--learn-bits"),
    (("--budget-bits", "4", "--bit-epochs", "1", "--lambda-fair", "0.5"), "--bit-epochs, --lambda-fair",
     "--learn-bits"),  # a budget without --learn-bits runs the search, not BAQ
])
def test_finetune_options_their_settings_would_ignore_are_refused(mlp_files, tmp_path, extra, flags, needs):
    """A fine-tuning option read only under another option's value: without it, exit 2 naming both."""
    out = tmp_path / "m.onnx"
    code, stdout, err = run_main(_args(mlp_files, out, "--finetune", "--train", mlp_files / "calib.npz", *extra))
    assert code == 2 and stdout == "" and not out.exists()
    assert err.strip() == f"error: {MSG_ONLY_WITH.format(flags=flags, needs=needs)}"


def test_an_ignored_finetune_option_error_is_one_line_naming_both(tmp_path):
    args = build_parser().parse_args(["compress", "--model", "m:f", "--calib", "c.npz", "--out", str(tmp_path / "m.onnx"),
                                      "--finetune", "--train", "t.npz", "--loss", "ce", "--dro-eta", "0.1"])
    with pytest.raises(ConfigError) as err:
        args.check(args)
    assert str(err.value) == ("--dro-eta: used only with --loss worst-group, so they would be ignored here; "
                              "use --loss worst-group, or drop them")


@pytest.mark.parametrize("extra", [
    ("--loss", "group-weighted", "--group-loss-weights", "a=1,b=5"),
    ("--dro-eta", "0.1"),  # the default loss is worst-group
    ("--loss", "worst-group", "--dro-eta", "0.1"),
    ("--sampler", "core-set", "--coreset-fraction", "0.2", "--coreset-score", "disagreement"),
    ("--learn-bits", "--budget-bits", "3", "--bit-epochs", "2", "--lambda-fair", "0.5"),
])
def test_finetune_options_their_settings_read_pass_the_checks(tmp_path, extra):
    args = build_parser().parse_args(["compress", "--model", "m:f", "--calib", "c.npz", "--out",
                                      str(tmp_path / "m.onnx"), "--finetune", "--train", "t.npz", *extra])
    args.check(args)  # no ConfigError


def test_a_label_free_segmenter_fine_tunes_without_task(tmp_path, scenes, tests_dir, monkeypatch):
    """Without --task the task is inferred during compress: label-free data of a segmenter is
    valid (distillation); it was refused up front with the classifier's "needs labels" (survey 21)."""
    import torch

    import fixtures_models as fm
    from fqexport.calibration.group_data import GroupData
    from fqexport.calibration.npz import save_npz

    monkeypatch.chdir(tests_dir)
    seg = scenes.train.segmentation("seg.npz")
    save_npz(GroupData(seg.x, None, seg.group, seg.group_names, "free"), tmp_path / "free.npz")
    torch.save(fm.unet_test().state_dict(), tmp_path / "unet.pt")
    code, _, err = run_main(["-q", "compress", "--model", "fixtures_models:unet_test", "--weights", tmp_path / "unet.pt",
                             "--calib", tmp_path / "free.npz", "--out", tmp_path / "u.onnx", "--num-calib", "32",
                             "--target", "x86-avx2", "--finetune", "--train", tmp_path / "free.npz", "--epochs", "1",
                             "--no-speed-check"])
    assert code == 0, err
    meta = read_metadata(tmp_path / "u.onnx")
    assert meta.task["name"] == "segmentation" and meta.finetune["loss_terms"].startswith("distillation")


def test_training_data_of_another_shape_is_refused_before_the_compress(mlp_files, tmp_path, monkeypatch):
    """--train of another sample shape was refused only after the whole PTQ had run (survey 59)."""
    import numpy as np

    import fqexport.cli.compress as cli_compress

    def never(*args, **kwargs):
        raise AssertionError("compress ran before the training data was checked")

    monkeypatch.setattr(cli_compress, "compress", never)
    calib = np.load(mlp_files / "calib.npz")
    train = tmp_path / "narrow.npz"
    np.savez(train, **{k: calib[k] for k in calib.files if k != "x"}, x=calib["x"][:, :-1])
    out = tmp_path / "m.onnx"
    code, _, err = run_main(_args(mlp_files, out, "--finetune", "--train", train))
    want = (f"{train}: field 'x' has sample shape ({calib['x'].shape[1] - 1},), but the model was compressed for "
            f"({calib['x'].shape[1]},)")
    assert code == 2 and want in err and not out.exists()
