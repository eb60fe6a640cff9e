"""The demo end to end at toy size: files written, table rows, per-group numbers present."""

import json

import onnx
import pytest

from fqexport.demo.run import DEMO_MIXED, DEMO_VARIANTS, run_demo
from fqexport.demo.task import DemoTaskSizes
from fqexport.demo.training import TrainConfig


@pytest.mark.slow
def test_demo_runs_end_to_end_at_toy_size(tmp_path, capsys):
    steps: list[str] = []
    result = run_demo(
        tmp_path, progress=False, sizes=DemoTaskSizes(n_train=400, n_test=200, size=16, minority_fraction=0.2),
        train_config=TrainConfig(epochs=1, batch_size=64, lr=0.05), num_calib=64, on_step=steps.append,
    )
    rows = result.rows
    labels = [r.label for r in rows]
    assert labels == ["float", "ORT quantize_static W8A8"] + [label for label, _ in DEMO_VARIANTS] + [DEMO_MIXED[0]]
    for name in ["float.onnx", "model.pt", "calib.npz", "test.npz", "demo_report.json", "demo_report.md"]:
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert len(report["rows"]) == len(rows)
    for row in rows:
        by_group = row.report.metrics.by_group
        assert set(by_group) == {"majority", "inverted-contrast"}
        assert by_group["inverted-contrast"]["count"] == 40
    assert [r["model"] for r in result.table] == labels
    assert all("inverted-contrast %" in r for r in result.table)
    # issue 16: the CPU's instruction set is named; two rows also run under emulated AVX2 kernels
    from fqexport.exporters.cpu_isa import cpu_isa

    emulated = {r["model"]: r["inverted-contrast % x86-avx2"] for r in result.table}
    assert emulated["float"] == "-" and emulated["ORT quantize_static W8A8"] != "-"
    fq = next(r for r in rows if r.label == "fqexport W8A8").report
    assert emulated["fqexport W8A8"] == f"{100 * fq.target_metrics['x86-avx2'].by_group['inverted-contrast']['accuracy']:.2f}"
    assert f"on this CPU: {cpu_isa()}" in "\n".join(steps)
    out = "\n".join(steps)
    # the mixed-precision row's file holds an allocation within its 3-bit average budget
    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "fqexport_mixed_avg3bit.onnx")).metadata_props}["fqexport"])
    assert meta["allocation"]["objective"] == "worst-group" and meta["allocation"]["avg_bits"] <= 3.0
    assert "mixed precision (worst-group, " in out
    md = (tmp_path / "demo_report.md").read_text()
    assert md.count("\n|") >= len(rows) + 1
    # progress=False (the CLI's -q, or stderr not a terminal): no bar, the validation's included
    assert "validate:" not in capsys.readouterr().err


def test_demo_model_is_trained_once_per_settings_and_reused(tmp_path):
    from fqexport.demo.run import CHECKPOINT, prepare_demo_model

    sizes = DemoTaskSizes(n_train=200, n_test=40, size=16, minority_fraction=0.2)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    steps: list[str] = []
    first, _, _, t1 = prepare_demo_model(sizes=sizes, train_config=cfg, progress=False, cache_dir=tmp_path,
                                         on_step=steps.append)
    assert t1 > 0 and "training SmallResNet on CPU: 3 steps, seed 0" in steps[-1]
    again, _, _, t2 = prepare_demo_model(sizes=sizes, train_config=cfg, progress=False, cache_dir=tmp_path,
                                         on_step=steps.append)
    assert t2 == 0.0 and steps[-1].startswith("[2/4] reusing the SmallResNet")
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert (a == b).all(), name
    # another seed, or a checkpoint that is not the one the key describes: trained again
    _, _, _, t3 = prepare_demo_model(seed=1, sizes=sizes, train_config=cfg, progress=False, cache_dir=tmp_path,
                                     on_step=steps.append)
    # and the console says why the checkpoint there was not reused (survey 65: it was replaced without a word)
    assert t3 > 0 and "seed 1" in steps[-1]
    assert steps[-1].endswith(f"(not reusing {tmp_path / CHECKPOINT}: it was trained with other seed (recorded in "
                              "model.key.json); it is replaced)")
    (tmp_path / CHECKPOINT).write_bytes(b"not the trained model")
    _, _, _, t4 = prepare_demo_model(seed=1, sizes=sizes, train_config=cfg, progress=False, cache_dir=tmp_path,
                                     on_step=steps.append)
    assert t4 > 0 and steps[-1].startswith("[2/4] training")
    assert "its bytes are not those recorded in model.key.json; it is replaced)" in steps[-1]
    (tmp_path / "model.key.json").unlink()  # a folder of a release before the key
    _, _, _, t5 = prepare_demo_model(seed=1, sizes=sizes, train_config=cfg, progress=False, cache_dir=tmp_path,
                                     on_step=steps.append)
    assert t5 > 0 and "it has no model.key.json saying how it was trained; it is replaced)" in steps[-1]
