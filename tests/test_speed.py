"""Tests of fqexport/validation/speed.py: a compressed file timed against its own float model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fqexport.exporters.cpu_isa import cpu_isa
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.validation.speed import speed_vs_float
from fqexport.validation.validation_report import speedups


def test_the_file_is_timed_against_its_float_model_at_each_batch(cnn_cm8, tmp_path):
    path = export_qdq(cnn_cm8, tmp_path / "w8.onnx").path
    latency, float_latency, verdict = speed_vs_float(cnn_cm8, path, batch_sizes=(1, 4), warmup=1, repeats=4, max_repeats=4)
    assert [l.batch_size for l in latency] == [1, 4] == [l.batch_size for l in float_latency]
    assert all(l.repeats == 4 and l.p50_ms > 0 for l in (*latency, *float_latency))
    ratio = speedups(latency, float_latency)
    # the median ratio of the runs timed in pairs
    assert ratio == {l.batch_size: l.speedup for l in latency} and all(f.speedup is None for f in float_latency)
    assert all(0 < x < 100 for x in ratio.values())
    assert verdict.startswith(f"on this CPU ({cpu_isa()}) the file buys ")
    assert f"batch 4: {ratio[4]:.2f}x the float model's speed" in verdict
    assert list(tmp_path.iterdir()) == [path]  # the float model went to a temporary folder


def _fixed_and_dynamic(tmp_path):
    """The same small CNN exported with a fixed batch of 1 (torch.onnx.export's default) and with
    a dynamic batch."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    torch.onnx.export(m, (x,), str(tmp_path / "b1.onnx"), dynamo=False)
    torch.onnx.export(m, (x,), str(tmp_path / "dyn.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "N"}})
    return tmp_path / "b1.onnx", tmp_path / "dyn.onnx"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter makes the fixed-batch file users get
def test_a_fixed_batch_file_and_its_reference_are_timed_at_that_batch(tmp_path):
    """A file with a fixed batch of 1 runs only batch 1: the reference is timed at batch 1 too
    (its ratio at batch 16 compared batch 1 with batch 16), and once for every requested size. A
    reference with a fixed batch of 1 is timed at batch 1 only, the model at every requested size."""
    import numpy as np

    from fqexport.calibration.group_data import GroupData
    from fqexport.exporters.ort_session import make_session
    from fqexport.validation.latency import LatencyResult
    from fqexport.validation.measure import measure_latencies
    from fqexport.validation.validation_report import speed_verdict

    fixed, dynamic = (make_session(p, threads=1) for p in _fixed_and_dynamic(tmp_path))
    x = np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(np.float32)
    data = GroupData(x, np.zeros(32, np.int64), np.arange(32) % 2, ("a", "b"), "t.npz")
    lat, ref = measure_latencies(fixed, data, (1, 16), warmup=1, repeats=3, reference=dynamic)
    assert [l.batch_size for l in lat] == [1] == [r.batch_size for r in ref]
    # a fixed-batch reference does not change what the model is timed (and gated) at: batch 16 too,
    # the reference at its own batch 1 only, the speed compared at batch 1 only
    lat, ref = measure_latencies(dynamic, data, (16, 1, 16), warmup=1, repeats=3, reference=fixed)
    assert [l.batch_size for l in lat] == [16, 1] and [r.batch_size for r in ref] == [1]
    assert set(speedups(lat, ref)) == {1}
    assert speed_verdict(lat, ref, "x86-avx2").endswith(
        "; batch 16: not compared (the reference runs batch 1 only: a fixed batch)")
    lat, ref = measure_latencies(dynamic, data, (16,), warmup=1, repeats=3, reference=fixed)
    assert [l.batch_size for l in lat] == [16] and [r.batch_size for r in ref] == [1]
    assert speed_verdict(lat, ref, "x86-avx2") == (
        "on this CPU (x86-avx2) the speed is not compared: the file was timed at batch 16 and the reference runs "
        "batch 1 only (a fixed batch)")
    # two different fixed batches are not compared
    one = LatencyResult(1.0, 1.0, 1.0, 1e3, 1, 1, 1, 3)
    eight = LatencyResult(4.0, 4.0, 4.0, 2e3, 8, 1, 1, 3)
    assert speedups([one], [eight]) == {}
    assert speed_verdict([one], [eight], "x86-avx2") == (
        "on this CPU (x86-avx2) the speed is not compared: the file was timed at batch 1 and the reference runs "
        "batch 8 only (a fixed batch)")


def test_a_file_not_smaller_than_its_reference_is_not_said_to_buy_size():
    """A float file gated against an fp16 reference half its size was told it 'buys size only'
    (survey 54): with both sizes known, size is claimed only for a smaller file."""
    from fqexport.validation.latency import LatencyResult
    from fqexport.validation.validation_report import speed_verdict

    same = LatencyResult(1.0, 1.0, 1.0, 1e3, 1, 1, 1, 3)
    fast = LatencyResult(0.5, 0.5, 0.5, 2e3, 1, 1, 1, 3)
    assert speed_verdict([same], [same], "x86-avx2", sizes=(59207, 30902)) == (
        "on this CPU (x86-avx2) the file buys neither speed nor size: batch 1: 1.00x the reference's speed "
        "(same speed); the file takes 59,207 bytes, the reference 30,902")
    assert speed_verdict([fast], [same], "x86-avx2", sizes=(69298, 59207)).startswith(
        "on this CPU (x86-avx2) the file buys speed at batch 1, no size: batch 1: 2.00x")
    assert speed_verdict([same], [same], "x86-avx2", sizes=(100, 400)).startswith(
        "on this CPU (x86-avx2) the file buys size only, no speed")


class _Sleeper:
    """A session stand-in whose run takes ``seconds`` and logs its name."""

    def __init__(self, name: str, seconds: float, log: list[str]) -> None:
        self.name, self.seconds, self.log = name, seconds, log

    def get_inputs(self):
        return [type("I", (), {"name": "x", "shape": ["N", 2], "type": "tensor(float)"})()]

    def get_session_options(self):
        return type("O", (), {"intra_op_num_threads": 1})()

    def run(self, _outputs, _feed):
        import time

        self.log.append(self.name)
        time.sleep(self.seconds)


def test_a_pair_is_timed_run_by_run_in_alternating_order_and_compared_pair_by_pair():
    """Rounds of six runs per session let load that came and went hit one session's round and not the
    other's: the same file against itself read 0.73x-1.37x ('slower'/'faster') under load (survey 56)."""
    from fqexport.validation.latency import measure_latency_pair
    from fqexport.validation.validation_report import speedups

    log: list[str] = []
    slow, fast = _Sleeper("slow", 0.004, log), _Sleeper("fast", 0.002, log)
    mine, ref = measure_latency_pair(slow, fast, np.zeros((1, 2), np.float32), 1, warmup=1, repeats=6)
    assert log == ["slow", "fast"] + ["slow", "fast", "fast", "slow"] * 3  # warm-up, then A B, B A, ...
    assert mine.repeats == ref.repeats == 6 and ref.speedup is None
    assert 0.3 < mine.speedup < 0.75 and speedups([mine], [ref]) == {1: mine.speedup}


def test_size_is_claimed_only_for_a_file_at_least_5_percent_smaller():
    """A float file 25 bytes smaller than its reference was said to 'buy size' (survey 56)."""
    from fqexport.validation.latency import LatencyResult
    from fqexport.validation.validation_report import speed_verdict

    same = LatencyResult(1.0, 1.0, 1.0, 1e3, 1, 1, 1, 3)
    assert "buys neither speed nor size" in speed_verdict([same], [same], "x86-avx2", sizes=(59182, 59207))
    assert "buys size only" in speed_verdict([same], [same], "x86-avx2", sizes=(56000, 59207))


def test_the_word_is_the_shown_ratios_and_no_size_is_claimed_unmeasured():
    """survey 77: a measured 0.9047 read "0.90x ... (same speed)" though <= 0.90x is slower; a verdict
    without the sizes claimed "size only" (compress's, for a W8 file larger than its float model)."""
    from fqexport.validation.latency import LatencyResult
    from fqexport.validation.validation_report import speed_verdict, speed_word

    assert (speed_word(0.9047), speed_word(1.0951), speed_word(0.905), speed_word(1.094)) == (
        "slower", "faster", "same speed", "same speed")
    ref = LatencyResult(1.0, 1.0, 1.0, 1e3, 1, 1, 1, 3)
    mine = LatencyResult(1.0, 1.0, 1.0, 1e3, 1, 1, 1, 3, speedup=1.0951)
    assert speed_verdict([mine], [ref], "x86-avx2") == (
        "on this CPU (x86-avx2) the file buys speed at batch 1: batch 1: 1.10x the reference's speed (faster)")
    slow = LatencyResult(1.0, 1.0, 1.0, 1e3, 1, 1, 1, 3, speedup=0.97)
    assert speed_verdict([slow], [ref], "x86-avx2").startswith("on this CPU (x86-avx2) the file buys no speed: ")


def test_the_sessions_timed_in_pairs_do_not_spin(cnn_cm8, tmp_path, monkeypatch):
    """Two sessions run for run fought each other's spinning threads (survey 77; measured: a W8 CNN
    against its float model read 1.12x at batch 1 and 3.0x at batch 32 with spinning, 1.81x and
    1.63x without, alone 1.8x and 2.1x): compress's speed check and validate time without it."""
    import fqexport.validation.measure as measure
    import fqexport.validation.speed as speed
    from fqexport.exporters.ort_session import build_session
    from fqexport.validation.gate import validate

    path = export_qdq(cnn_cm8, tmp_path / "w8.onnx").path
    quiet = build_session(path, spinning=False).get_session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    opened: list[bool] = []
    for module in (speed, measure):
        real = module.make_session
        monkeypatch.setattr(module, "make_session", lambda *a, real=real, **k: opened.append(k.get("spinning", True))
                            or real(*a, **k))
    speed_vs_float(cnn_cm8, path, batch_sizes=(1,), warmup=1, repeats=2)
    assert opened == [False, False]
    opened.clear()
    from fqexport.exporters.qdq_onnx import export_float_reference

    reference = export_float_reference(cnn_cm8, tmp_path / "float.onnx").path
    validate(path, cnn_cm8.calib, reference=reference, latency_batch_sizes=(1,), warmup=1, repeats=2, kernel_check=False)
    assert opened == [False, False]  # the model's session (timed too) and the reference's


def test_the_median_interval_is_the_binomial_order_statistics():
    """The 95 % interval of a median from n pair ratios: r_(k), r_(n+1-k) with P(B(n, ½) < k) <= 2.5 %
    (n=10: k=2; n=30: k=10; 6 to 8 pairs: the whole range; fewer: none)."""
    from fqexport.validation.latency import median_interval

    r = np.arange(1, 31, dtype=float)  # sorted order statistics 1..30
    assert median_interval(r[:10]) == (2.0, 9.0)
    assert median_interval(r[::-1]) == (10.0, 21.0)
    assert median_interval(r[:6]) == (1.0, 6.0)  # the whole range: 1 - 2^-5 >= 95 %
    assert median_interval(r[:5]) is None and median_interval(np.array([1.3])) is None
    # the claimed coverage, by simulation: the true median (1) inside the interval of n=30 draws
    rng = np.random.default_rng(0)
    hits = [lo <= 1.0 <= hi for lo, hi in (median_interval(rng.lognormal(0, 0.3, 30)) for _ in range(2000))]
    assert 0.95 <= np.mean(hits) <= 0.99


def test_a_speed_the_noise_does_not_settle_is_said_to_be_within_it():
    """survey 98: ten pairs read a W8 CNN 1.02x ("same speed") once and 1.57x the next run, and a float
    file against itself 0.76-1.81x: a side is taken only when the median's 95 % interval lies on it."""
    from fqexport.validation.latency import LatencyResult
    from fqexport.validation.validation_report import speed_verdict, speed_word

    assert speed_word(1.5, 1.3, 1.7) == "faster" and speed_word(1.5, 0.98, 1.9) == "within the timing noise"
    assert speed_word(0.8, 0.7, 0.93) == "slower" and speed_word(0.8, 0.6, 1.05) == "within the timing noise"
    assert speed_word(1.0, 0.95, 1.06) == "same speed" and speed_word(1.0, 0.85, 1.2) == "within the timing noise"
    assert speed_word(1.12, 1.01, 1.3) == "faster"  # above the band, its interval above 1
    ref = LatencyResult(1.0, 1.0, 1.0, 1e3, 1, 1, 1, 10)
    noisy = LatencyResult(1.0, 1.0, 1.0, 1e3, 1, 1, 1, 10, speedup=1.26, speedup_low=0.88, speedup_high=1.62)
    assert speed_verdict([noisy], [ref], "x86-avx2", sizes=(100, 400)) == (
        "on this CPU (x86-avx2) the file buys size; no speed told apart from the timing noise at batch 1: batch 1: 1.26x "
        "the reference's speed (within the timing noise; 95 % interval 0.88-1.62x)")
    fast = replace(noisy, batch_size=32, speedup=1.8, speedup_low=1.6, speedup_high=1.9)
    ref32 = replace(ref, batch_size=32)
    assert speed_verdict([noisy, fast], [ref, ref32], "x86-avx2", sizes=(100, 400)).startswith(
        "on this CPU (x86-avx2) the file buys speed and size at batch 32: batch 1: 1.26x")


class _Cycle:
    """A session stand-in whose runs take the given seconds in turn."""

    def __init__(self, *seconds: float) -> None:
        self.seconds, self.runs = seconds, 0

    def get_inputs(self):
        return [type("I", (), {"name": "x", "shape": ["N", 2], "type": "tensor(float)"})()]

    def get_session_options(self):
        return type("O", (), {"intra_op_num_threads": 1})()

    def run(self, _outputs, _feed):
        import time

        time.sleep(self.seconds[self.runs % len(self.seconds)])
        self.runs += 1


def test_the_pair_count_follows_the_time_the_runs_take_never_their_ratios():
    """review 100: adding rounds until the interval looked settled took a side for two files of equal
    speed 10 % of the time, against the 5 % the interval claims. After the first `repeats` pairs, as
    many more as fit in max_seconds at their pace, at most max_repeats: the same count whatever the
    ratios; fewer than 6 pairs give no interval."""
    from fqexport.validation.latency import measure_latency_pair
    from fqexport.validation.validation_report import speed_verdict

    x = np.zeros((1, 2), np.float32)
    for fast, slow in ((0.001, 0.002), (0.002, 0.001), (0.001, 0.001)):  # faster, slower, the same
        a, b = _Cycle(fast), _Cycle(slow)
        got, ref = measure_latency_pair(a, b, x, 1, warmup=0, repeats=10, max_repeats=30, max_seconds=100.0)
        assert got.repeats == ref.repeats == a.runs == b.runs == 30
        assert got.speedup_low is not None and got.speedup_low <= got.speedup <= got.speedup_high
    quick, _ = measure_latency_pair(_Cycle(0.001), _Cycle(0.002), x, 1, warmup=0, repeats=10, max_repeats=30,
                                    max_seconds=1e-6)
    assert quick.repeats == 10  # no time left after the first pairs
    one, _ = measure_latency_pair(_Cycle(0.004, 0.020), _Cycle(0.012), x, 1, warmup=0, repeats=10)
    assert one.repeats == 10 and one.speedup_low < 1 < one.speedup_high  # no max_repeats: `repeats` pairs
    # review 101: fewer than 6 pairs decide by their whole range (as before), labelled as no 95 % interval
    few, ref = measure_latency_pair(_Cycle(0.004, 0.020), _Cycle(0.012), x, 1, warmup=0, repeats=5)
    assert few.speedup_low < 1 < few.speedup_high
    assert speed_verdict([few], [ref], "x86-avx2").endswith(
        f"(within the timing noise; range of 5 pair(s) {few.speedup_low:.2f}-{few.speedup_high:.2f}x, too few for a "
        "95 % interval)")
    # no time cap (0 or inf): max_repeats pairs; a deadline stops the pairs once passed (load that arrives)
    for cap in (0.0, float("inf")):
        assert measure_latency_pair(_Cycle(0.001), _Cycle(0.001), x, 1, warmup=0, repeats=10, max_repeats=20,
                                    max_seconds=cap)[0].repeats == 20
    slow = _Cycle(*([0.001] * 10 + [0.05] * 1000))  # quick first pairs, then each run 50 ms
    late, _ = measure_latency_pair(slow, _Cycle(0.001), x, 1, warmup=0, repeats=10, max_repeats=200, max_seconds=0.5)
    assert 10 < late.repeats < 30  # stopped near the 0.5 s deadline, not at the 200 the pace promised


def test_compress_says_when_its_timing_is_not_the_targets(monkeypatch):
    """survey 98: `compress --target x86-avx2` on a VNNI CPU, or with FQEXPORT_HOST_KERNELS=x86-avx2, printed
    "the file buys speed" from this CPU's own kernels with no word that the target's were not timed."""
    from fqexport.cli.compress import speed_caveat

    monkeypatch.delenv("FQEXPORT_HOST_KERNELS", raising=False)
    assert speed_caveat("x86-avx2", "x86-vnni").startswith(
        "speed: timed with this CPU's x86-vnni int8 kernels; the file's target x86-avx2 runs x86-avx2 kernels")
    assert speed_caveat("arm64", "x86-avx2").startswith("speed: timed with this CPU's x86-avx2 int8 kernels; "
                                                        "the file's target arm64 runs arm64 kernels")
    assert speed_caveat("portable", "x86-vnni") is None and speed_caveat("x86-vnni", "x86-vnni") is None
    monkeypatch.setenv("FQEXPORT_HOST_KERNELS", "x86-avx2")
    assert speed_caveat("portable", "x86-vnni") == (
        "speed: timed with this CPU's x86-vnni int8 kernels; FQEXPORT_HOST_KERNELS=x86-avx2 stands in for the "
        "x86-avx2 kernels in the accuracy checks only")
