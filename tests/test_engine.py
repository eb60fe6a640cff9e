"""The engines that run the search's independent tasks: results in task order and seeded from
the task's key whatever the engine, the context sent once per worker, a killed worker retried
once and then a clear error, task errors that name the task, and identical searches (allocation,
sensitivity table, exported bytes) with the serial, local and Ray engines."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fqexport.engine.ray_engine as ray_engine
from conftest import run_main
from fqexport.cli.flags.shared import MSG_ONLY_WITH
from fqexport.config import EngineConfig, MixedPrecisionConfig, QuantConfig
from fqexport.engine import (
    KILL_ENV,
    LocalEngine,
    SerialEngine,
    Task,
    make_engine,
    task_seed,
)
from fqexport.engine.local import SOCKET_PATH_LIMIT
from fqexport.errors import ConfigError, DataError, EngineError
from fqexport.exporters.qdq_onnx import export_qdq
from fqexport.search.mixed_precision import search_mixed_precision
from fqexport.search.sensitivity import DEFAULT_CACHE

_UNPICKLED = 0  # in a worker: how many times it unpickled a _Counted context


class _Counted:
    def __init__(self, value: int) -> None:
        self.value = value

    def __setstate__(self, state) -> None:
        global _UNPICKLED
        _UNPICKLED += 1
        self.__dict__.update(state)


def _draw(ctx, task):
    """A task's random draw, its worker, the context's unpickle count there and its threads."""
    return (torch.rand(3).tolist(), float(np.random.rand()), os.getpid(), _UNPICKLED,
            torch.get_num_threads(), ctx.value + task.payload)


def _fail(ctx, task):
    if task.payload == 2:
        raise DataError("calib.npz: field 'y' has NaN")
    if task.payload == 3:
        raise RuntimeError("boom")
    return task.payload


def _tasks(n=6):
    return [Task(("draw", i), f"task {i}", i) for i in range(n)]


@pytest.fixture(scope="module")
def local2():
    with LocalEngine(2) as engine:
        yield engine


def test_task_seed_is_a_stable_hash_of_the_key():
    assert task_seed(("fit", 0, 1)) != task_seed(("fit", 1, 0))
    # sha256, not Python's per-process salted hash(): the same number in every process
    assert task_seed(("a", 1)) == 1532239161
    code = "from fqexport.engine.base import task_seed; print(task_seed(('sensitivity', 'fc1', 4)))"
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout
        assert int(out) == task_seed(("sensitivity", "fc1", 4))


def test_serial_and_local_give_the_same_results_in_task_order(local2):
    ctx = _Counted(100)
    torch.set_num_threads(2)
    try:
        serial = SerialEngine().map(_draw, _tasks(), ctx, "draw")
        assert torch.get_num_threads() == 2  # the caller's thread count is restored
    finally:
        torch.set_num_threads(1)
    local = local2.map(_draw, _tasks(), ctx, "draw")
    assert [r[:2] for r in serial] == [r[:2] for r in local]      # same draws, same order
    assert [r[5] for r in local] == [100 + i for i in range(6)]   # results in task order
    assert len({tuple(r[0]) for r in serial}) == 6                # every task its own seed
    assert all(r[4] == 1 for r in local + serial)                 # one torch thread per task


def _sleep(ctx, task):
    time.sleep(task.payload)
    return time.time()


def test_local_engine_says_once_when_a_worker_is_left_without_a_task(local2):
    # 3 tasks on 2 workers, the last one the longest: called once its worker has nothing left,
    # while it still runs; 1 task: at once
    for seconds in ([0.0, 0.5, 2.0], [0.5]):
        called = []
        tasks = [Task(("sleep", i), f"task {i}", s) for i, s in enumerate(seconds)]
        ends = local2.map(_sleep, tasks, None, "sleep", on_idle=lambda: called.append(time.time()))
        assert len(called) == 1 and called[0] < ends[-1]
    called = []
    SerialEngine().map(_draw, _tasks(3), _Counted(0), "draw", on_idle=lambda: called.append(1))
    assert called == []  # this process runs every task: never idle


def test_beside_runs_on_this_thread_while_the_workers_run_the_tasks(local2):
    # the search's own fit: on the calling thread (a helper thread's arena page-faults every
    # large tensor), started once the tasks are out, so it overlaps them
    seen = []

    def beside():
        seen.append((threading.current_thread() is threading.main_thread(), time.time()))
        time.sleep(0.5)

    tasks = [Task(("sleep", i), f"task {i}", 1.0) for i in range(2)]
    ends = local2.map(_sleep, tasks, None, "sleep", beside=beside)
    assert len(seen) == 1 and seen[0][0] and seen[0][1] < min(ends)
    assert SerialEngine().map(_sleep, tasks[:1], None, "sleep", beside=beside) and len(seen) == 2
    assert local2.map(_sleep, [], None, "sleep", beside=beside) == [] and len(seen) == 3

    def boom():
        raise RuntimeError("boom beside")

    for engine in (SerialEngine(), local2):
        with pytest.raises(RuntimeError, match="boom beside"):
            engine.map(_sleep, tasks, None, "sleep", beside=boom)
    # the pool stopped for the error is started again by the next map
    assert [r[5] for r in local2.map(_draw, _tasks(2), _Counted(0), "draw")] == [0, 1]


def test_context_is_unpickled_once_per_worker_not_per_task(local2):
    ctx = _Counted(0)
    out = local2.map(_draw, _tasks(8), ctx, "draw")
    per_worker = {}
    for r in out:
        per_worker.setdefault(r[2], set()).add(r[3])
    assert os.getpid() not in per_worker
    # each worker's count went up by one for this map whatever its number of tasks
    assert all(len(counts) == 1 for counts in per_worker.values())
    again = local2.map(_draw, _tasks(8), _Counted(0), "draw")  # a new context: loaded once more
    for r in again:
        assert r[3] == next(iter(per_worker.get(r[2], {r[3] - 1}))) + 1


def test_a_task_error_names_the_task_and_keeps_its_class(local2):
    for engine in (SerialEngine(), local2):
        with pytest.raises(DataError, match=r"^task 2: calib.npz: field 'y' has NaN$"):
            engine.map(_fail, [Task((i,), f"task {i}", i) for i in range(3)], None, "fail")
        with pytest.raises(EngineError, match=rf"^{engine.name} engine: task 3 failed: RuntimeError: boom$"):
            engine.map(_fail, [Task((3,), "task 3", 3)], None, "fail")


def test_a_killed_worker_is_retried_once(local2, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"task 4|{marker}")
    out = local2.map(_draw, _tasks(), _Counted(7), "draw")
    assert marker.exists()  # the worker running task 4 died once
    assert [r[5] for r in out] == [7 + i for i in range(6)]
    assert [r[:2] for r in out] == [r[:2] for r in SerialEngine().map(_draw, _tasks(), _Counted(7), "draw")]


def test_a_worker_killed_twice_stops_the_map_naming_the_task(tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ENV, "task 1")
    with LocalEngine(2) as engine:
        with pytest.raises(EngineError, match=r"^local engine: the worker running task 1 died 2 times"):
            engine.map(_draw, _tasks(4), _Counted(0), "draw")
        monkeypatch.delenv(KILL_ENV)
        assert len(engine.map(_draw, _tasks(4), _Counted(0), "draw")) == 4  # the pool recovers


def test_serial_never_runs_the_kill_hook(monkeypatch):
    monkeypatch.setenv(KILL_ENV, "task")
    assert len(SerialEngine().map(_draw, _tasks(2), _Counted(0), "draw")) == 2


def test_duplicate_keys_are_refused():
    with pytest.raises(ConfigError, match=r"task keys must be unique \(repeated: \('a',\)\)"):
        SerialEngine().map(_draw, [Task(("a",), "x", 0), Task(("a",), "y", 1)], _Counted(0), "draw")


def test_make_engine_and_engine_config():
    assert isinstance(make_engine(EngineConfig(engine="serial")), SerialEngine)
    assert isinstance(make_engine(EngineConfig(engine="local", workers=1)), SerialEngine)
    assert EngineConfig(workers=1).kind == "serial" and EngineConfig(workers=3).kind == "local"
    assert EngineConfig().num_workers == os.cpu_count()
    with LocalEngine(2) as e:
        assert e.label == "local ×2"
    with pytest.raises(ConfigError, match=r"workers=0 must be an integer >= 1"):
        EngineConfig(workers=0)
    assert EngineConfig(engine="serial", workers=1).kind == "serial"
    with pytest.raises(ConfigError, match=r"workers=3 would be ignored by engine='serial'.*--engine local --workers 3"):
        EngineConfig(engine="serial", workers=3)
    with pytest.raises(ConfigError, match=r"engine='dask' is not one of auto, serial, local, ray"):
        EngineConfig(engine="dask")
    with pytest.raises(ConfigError, match=r"ray_address='auto' is only used by engine='ray'"):
        EngineConfig(engine="local", ray_address="auto")
    with pytest.raises(ConfigError, match=r"retries=-1 must be an integer >= 0"):
        EngineConfig(retries=-1)
    with pytest.raises(ConfigError, match=r"task_cpus=0 must be a finite number > 0 with at most 4 decimals"):
        EngineConfig(task_cpus=0)


@pytest.mark.parametrize("kwargs, message", [
    # survey 64: inf overflowed Ray's resource units and 0.00001 broke its precision, both after the
    # cluster started (exit 3); a negative GPU count was named with the CPUs' field
    ({"task_cpus": float("inf")}, "task_cpus=inf must be a finite number > 0 with at most 4 decimals (the Ray CPUs"),
    ({"task_gpus": float("inf")}, "task_gpus=inf must be a finite number >= 0 with at most 4 decimals (the Ray GPUs"),
    ({"task_cpus": 0.00001}, "task_cpus=1e-05 must be a finite number > 0 with at most 4 decimals"),
    ({"task_gpus": -0.5}, "task_gpus=-0.5 must be a finite number >= 0"),
    ({"ray_address": "auto", "workers": 7}, "workers=7 would be ignored with ray_address='auto': the cluster there "
                                            "has its own CPUs"),
])
def test_engine_config_refuses_ray_resources_ray_would_refuse_late(kwargs, message):
    with pytest.raises(ConfigError) as err:
        EngineConfig(engine="ray", **kwargs)
    assert str(err.value).startswith(message)
    assert EngineConfig(engine="ray", task_cpus=0.5, task_gpus=0.0001).task_cpus == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "local", "task_cpus": 2}, "task_cpus=2 is only used by engine='ray' (got engine='local')"),
    ({"engine": "serial", "task_gpus": 0.5}, "task_gpus=0.5 is only used by engine='ray' (got engine='serial')"),
    ({"task_gpus": 1}, "task_gpus=1 is only used by engine='ray' (got engine='auto')"),  # auto: local or serial
])
def test_engine_config_refuses_ray_resources_another_engine_would_ignore(kwargs, message):
    with pytest.raises(ConfigError) as err:
        EngineConfig(**kwargs)
    assert message in str(err.value)


def test_engine_config_ray_only_error_names_the_field_and_the_engine():
    with pytest.raises(ConfigError) as err:
        EngineConfig(engine="local", task_cpus=2)
    assert str(err.value) == "task_cpus=2 is only used by engine='ray' (got engine='local'); CLI: --engine ray"


def test_engine_config_takes_ray_resources_for_ray_and_defaults_for_any_engine():
    assert EngineConfig(engine="ray", task_cpus=2, task_gpus=0.5).task_gpus == 0.5
    assert EngineConfig(engine="local", task_cpus=1.0, task_gpus=0.0).kind == "local"  # the defaults: nothing ignored


def test_ray_engine_without_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'fqexport\[ray\]'"):
        make_engine(EngineConfig(engine="ray"))


# ---------------------------------------------------------------------------------------------
# the search: identical whatever the engine
# ---------------------------------------------------------------------------------------------

BASE = QuantConfig(num_calib=128, batch_size=128)


def _search(model, data, engine: EngineConfig, tmp_path):
    mp = MixedPrecisionConfig(budget_bits=3.0, pins={"fc3": 8}, bit_choices=(2, 3, 4, 8), num_candidates=2,
                              sensitivity_samples=128, mw_steps=20, engine=engine)
    DEFAULT_CACHE.clear()  # measure the table with this engine
    res = search_mixed_precision(model, data, mp, BASE, progress=False)
    path = tmp_path / f"{engine.kind}.onnx"
    export_qdq(res.compressed, path)
    return res, path.read_bytes()


@pytest.fixture(scope="module")
def serial_search(mlp_model, mlp_data, tmp_path_factory):
    return _search(mlp_model, mlp_data, EngineConfig(engine="serial"), tmp_path_factory.mktemp("serial"))


def _assert_same(a, b):
    (ra, ba), (rb, bb) = a, b
    assert ra.allocation.bits == rb.allocation.bits
    assert np.array_equal(ra.sensitivity.delta, rb.sensitivity.delta)  # bit for bit
    assert [c.allocation.bits for c in ra.candidates] == [c.allocation.bits for c in rb.candidates]
    assert [c.measured_loss_increase for c in ra.candidates] == [c.measured_loss_increase for c in rb.candidates]
    assert (ra.fits, ra.fallback, ra.chosen.origin) == (rb.fits, rb.fallback, rb.chosen.origin)
    # the default verification (verify_folds=1, data beyond num_calib): one fit per candidate,
    # the winner's fit returned without a refit — rebuilt in this process for a pool's fits
    assert ra.config.verify_folds == 1 and ra.fits == len(ra.candidates) and "refit" not in ra.seconds
    assert ba == bb  # the exported ONNX bytes


def test_local_search_is_identical_to_serial(mlp_model, mlp_data, serial_search, tmp_path):
    _assert_same(serial_search, _search(mlp_model, mlp_data, EngineConfig(engine="local", workers=2), tmp_path))


@pytest.mark.slow
def test_ray_search_is_identical_to_serial(mlp_model, mlp_data, serial_search, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fqexport[ray]'")
    t0 = time.perf_counter()
    _assert_same(serial_search, _search(mlp_model, mlp_data, EngineConfig(engine="ray", workers=2), tmp_path))
    print(f"ray search: {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
def test_ray_engine_names_the_address_no_cluster_answers_at(monkeypatch):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fqexport[ray]'")
    monkeypatch.setattr(ray_engine, "_has_ray_client", lambda: True)  # as with ray[client]; a closed port
    if importlib.util.find_spec("grpc") is None:  # plain ray: init fails at once, said as the address's failure
        with pytest.raises(EngineError, match=r"no Ray cluster answered at ray://127\.0\.0\.1:1 "):
            ray_engine.RayEngine(2, address="ray://127.0.0.1:1")
    # without the client package a ray:// address is refused naming the missing package, not the
    # cluster ("no Ray cluster answered", survey 41: the user was told to start a cluster that ran)
    monkeypatch.setattr(ray_engine, "_has_ray_client", lambda: False)
    with pytest.raises(EngineError, match=r"--ray-address ray://h:10001 connects through the Ray Client, which this "
                                          r"Ray install lacks \(its grpcio package\): pip install 'fqexport\[ray\]'"):
        ray_engine.RayEngine(2, address="ray://h:10001")


def test_a_task_no_node_can_run_is_refused_instead_of_waiting_for_ever():
    """--task-cpus 3 on a 1-CPU local cluster (or --task-gpus 1 without a GPU) sat at 0 % for ever:
    Ray keeps an infeasible task pending and said so only in its own logs (survey 64)."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fqexport[ray]'")
    t0 = time.time()
    for cpus, gpus in ((3.0, 0.0), (1.0, 1.0)):
        with pytest.raises(EngineError) as err:
            ray_engine.RayEngine(1, task_cpus=cpus, task_gpus=gpus)
        more = " or give the local cluster more CPUs (--workers, now 1)" if not gpus else ""  # CPUs give no GPU
        assert str(err.value) == (
            f"ray engine: no node of the Ray cluster (1 CPU, 0 GPU) has the resources one task asks for (--task-cpus "
            f"{cpus:g}, --task-gpus {gpus:g}), so no task could ever start; lower them{more}")
        assert not ray.is_initialized()  # the cluster it started is stopped
    assert time.time() - t0 < 120


def test_a_host_port_no_cluster_listens_at_is_refused_at_once():
    """--ray-address 127.0.0.1:PORT with nothing there hung for minutes in ray.init, printing
    Ray's own warnings, and ignored SIGTERM (survey 51)."""
    import socket

    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fqexport[ray]'")
    with socket.socket() as s:  # a port just free
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(EngineError, match=rf"no Ray cluster answered at 127\.0\.0\.1:{port} \(ConnectionRefusedError"):
        ray_engine.RayEngine(2, address=f"127.0.0.1:{port}")
    assert time.time() - t0 < ray_engine.CONNECT_SECONDS + 5


def test_the_callers_sigterm_handler_survives_ray_init_and_a_wrapped_signal_is_an_interrupt():
    """ray.init replaced the CLI's SIGTERM handler (a cancel printed Ray's stack dump and aborted);
    the handler's exception raised inside Ray's C wait came back as a SystemError, exit 3 (survey 51)."""
    import signal

    cli_main = importlib.import_module("fqexport.cli.main")

    mine = signal.getsignal(signal.SIGTERM)
    with ray_engine._own_sigterm():
        signal.signal(signal.SIGTERM, lambda *a: None)  # what ray.init does
    assert signal.getsignal(signal.SIGTERM) is mine
    try:
        try:
            raise cli_main._Signalled(signal.SIGTERM)
        except cli_main._Signalled as inner:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from inner
    except SystemError as wrapped:
        assert cli_main._signal_behind(wrapped).signum == signal.SIGTERM
    assert cli_main._signal_behind(ValueError("x")) is None


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------


def _search_args(mlp_files, out, *extra):
    return ["-q", "compress", "--model", "fixtures_models:tiny_mlp", "--weights", mlp_files / "mlp.pt",
            "--calib", mlp_files / "calib.npz", "--out", out, "--num-calib", "128", "--budget-bits", "4",
            "--bit-choices", "2,4,8", "--candidates", "1", "--method", "rtn", *extra]


def test_cli_a_worker_that_dies_twice_exits_2_and_writes_nothing(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    monkeypatch.setenv(KILL_ENV, "fold 2/3")
    out, report = tmp_path / "mp.onnx", tmp_path / "report.json"
    code, _, err = run_main(_search_args(mlp_files, out, "--verify-folds", "3", "--engine", "local", "--workers", "2",
                                     "--report", report))
    assert code == 2, err
    assert "local engine: the worker running verification fit of candidate 0" in err
    assert "fold 2/3 died 2 times" in err
    assert not out.exists() and not report.exists() and list(tmp_path.iterdir()) == []


def test_cli_a_broken_pool_ends_with_fqexports_line_only(tmp_path, mlp_files, tests_dir):
    """After a worker died twice, Python's resource tracker printed 'There appear to be 1 leaked
    semaphore objects to clean up at shutdown' below fqexport's last line (survey 51)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{KILL_ENV: "fold 2/3"},
               PYTHONPATH=os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")]))
    args = _search_args(mlp_files, tmp_path / "mp.onnx", "--verify-folds", "3", "--engine", "local", "--workers", "2")
    proc = subprocess.run([sys.executable, "-m", "fqexport.cli", *map(str, args)], cwd=tests_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "leaked" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: local engine: the worker running verification fit")


def test_cli_engine_flags(tmp_path, mlp_files, tests_dir, monkeypatch):
    monkeypatch.chdir(tests_dir)
    code, _, err = run_main(_search_args(mlp_files, tmp_path / "a.onnx", "--engine", "serial"))
    assert code == 0, err
    code, _, err = run_main(_search_args(mlp_files, tmp_path / "b.onnx", "--engine", "local", "--ray-address", "auto"))
    assert code == 2 and err.strip() == f"error: {MSG_ONLY_WITH.format(flags='--ray-address', needs='--engine ray')}"
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = run_main(_search_args(mlp_files, tmp_path / "c.onnx", "--engine", "ray"))
    assert code == 2 and "pip install 'fqexport[ray]'" in err
    assert not (tmp_path / "b.onnx").exists() and not (tmp_path / "c.onnx").exists()



SLOW_IMPORT = """
import os, time
open(os.path.join(os.environ["NAP_DIR"], "importing"), "w").close()
time.sleep(120)
def nap(ctx, task):
    return task.payload
"""
CTRL_C = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C (not a background job's)
from fqexport.engine import LocalEngine, Task
if __name__ == "__main__":
    try:
        with LocalEngine(2, preload=["slowmod"]) as engine:
            engine.map(print, [Task(("nap", i), f"nap {i}", i) for i in range(2)], None, "naps")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
"""


def test_ctrl_c_while_the_workers_start_prints_only_the_callers_line(tmp_path):
    """A terminal's Ctrl-C signals every process of the group, the forkserver too, which may be
    importing the preload modules (torch: seconds): it ignores SIGINT (its traceback was printed
    beside the caller's message, survey 14), and the caller stops it with the pool, so it starts
    no queued worker after the caller is gone (each would print a traceback). stderr is read to
    its end: every process that held it has exited."""
    import signal

    (tmp_path / "slowmod.py").write_text(SLOW_IMPORT)
    (tmp_path / "main.py").write_text(CTRL_C)
    env = dict(os.environ, NAP_DIR=str(tmp_path), OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "main.py"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "importing").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    rc, err = proc.wait(60), proc.stderr.read()
    assert rc == 130 and err.strip() == "interrupted", err[-3000:]
    assert time.time() - t0 < 30


PIDMOD = """
import os, time
def hold(ctx, task):
    open(os.path.join(os.environ["PID_DIR"], f"worker-{os.getpid()}"), "w").close()
    time.sleep(120)
"""
KILLED_CALLER = """
from fqexport.engine import LocalEngine, Task
if __name__ == "__main__":
    with LocalEngine(1, preload=["pidmod"]) as engine:
        import pidmod
        engine.map(pidmod.hold, [Task(("hold", 0), "hold", 0)], None, "holds")
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists a session's processes through /proc")
def test_workers_end_when_the_caller_is_killed_outright(tmp_path, monkeypatch, request):
    """A caller SIGKILLed (OOM killer, a CI timeout) left its forkserver, workers and resource
    tracker running forever, each holding torch and the model (survey 51): a worker watches the
    caller and ends within a second or two of it; the forkserver then ends with its workers. The
    next engine removes the context folder (a pickle of the model and data) the caller left."""
    import signal
    import tempfile

    from fqexport.engine import local

    (tmp_path / "pidmod.py").write_text(PIDMOD)
    (tmp_path / "main.py").write_text(KILLED_CALLER)
    # the caller's temporary folder: a short path (the forkserver's socket lives under it, and
    # pytest-xdist's tmp_path is too long for one: MSG_SOCKET_PATH)
    tmp = Path(tempfile.mkdtemp(prefix="fqk-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    env = dict(os.environ, PID_DIR=str(tmp_path), OMP_WAIT_POLICY="PASSIVE", TMPDIR=str(tmp),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "main.py"], cwd=tmp_path, env=env, stderr=open(tmp_path / "err.txt", "w"),
                            start_new_session=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob("worker-*")):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "err.txt").read_text()
        time.sleep(0.2)
    worker = int(next(tmp_path.glob("worker-*")).name.split("-")[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _session_pids(proc.pid):
        time.sleep(0.2)
    left = _session_pids(proc.pid)
    for pid in left:  # leave nothing behind, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    assert worker not in left and not left, left
    assert [p.name.split("-")[2] for p in tmp.glob("fqexport-engine-*")] == [str(proc.pid)]
    (tmp / f"fqexport-engine-{os.getpid()}-mine").mkdir()  # a live caller's: kept
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    local._remove_dead_callers_dirs()
    assert [p.name for p in tmp.glob("fqexport-engine-*")] == [f"fqexport-engine-{os.getpid()}-mine"]


def _session_pids(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def test_a_model_class_from_an_interactive_session_runs_serially_under_auto(monkeypatch, caplog):
    """A notebook's model failed the default search: workers cannot import a class of an
    interactive __main__ ("Can't get attribute 'Net' on <module '__main__'>"), and the error gave no
    fix (survey 53). 'auto' runs such a search serially, said once; 'local' is refused naming the
    class and the fix, before any worker starts."""
    import types

    from fqexport.engine import interactive_class, make_engine

    Net = type("Net", (torch.nn.Sequential,), {"__module__": "__main__"})
    model = Net(torch.nn.Linear(2, 2))
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no __file__: a notebook
    assert interactive_class([model]) == ("the model's", "Net")
    with caplog.at_level("WARNING", logger="fqexport.engine"):
        engine = make_engine(EngineConfig(engine="auto", workers=2), sent=(model, "calib.npz"))
    assert isinstance(engine, SerialEngine)
    assert "engine 'auto': the model's class 'Net' is defined in an interactive session" in caplog.text
    with pytest.raises(EngineError, match=r"local engine: the model's class 'Net' is defined in an interactive "
                                          r"session .* EngineConfig\(engine='serial'\)"):
        make_engine(EngineConfig(engine="local", workers=2), sent=(model,))
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))  # importable classes: the pool as asked
    with make_engine(EngineConfig(engine="local", workers=2), sent=(plain,)) as pool:
        assert isinstance(pool, LocalEngine)


ENGINE_OF = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from fqexport.config import EngineConfig
from fqexport.engine import make_engine
{guard}
    with make_engine(EngineConfig(engine=sys.argv[1], workers=2)) as engine:
        print(type(engine).__name__)
{after}"""


@pytest.mark.parametrize("guard, after, engine, out, err", [
    ("if True:", "", "auto", "SerialEngine", "has no `if __name__ == \"__main__\":` guard, and the local pool's "
                                             "worker processes would run it again: the search runs serially"),
    ("if True:", "", "local", "", "local engine: the script"),
    # a guard below the call does not keep the workers from making it (survey 94)
    ("if True:", 'if __name__ == "__main__":\n    pass\n', "local", "", "local engine: the script"),
    ('if __name__ == "__main__":', "", "auto", "LocalEngine", ""),
    ('if "__main__" == __name__:', "", "local", "LocalEngine", ""),
    # other spellings of the guard (survey 94: refused a pool)
    ('if __name__ == "__main__" and not sys.flags.quiet:', "", "local", "LocalEngine", ""),
    ('if __name__ in ("__main__",):', "", "local", "LocalEngine", ""),
    ('if False:\n    pass\nelif __name__ == "__main__":', "", "local", "LocalEngine", ""),
    # survey 96: the else of a negated test; a call exec'd or made from a thread at the top level
    ('if __name__ != "__main__":\n    pass\nelse:', "", "local", "LocalEngine", ""),
    ('exec("""if True:', '""")\n', "local", "", "local engine: the script"),
    ("from concurrent.futures import ThreadPoolExecutor\ndef run():",
     "ThreadPoolExecutor(1).submit(run).result()\n", "local", "", "local engine: the script"),
])
def test_a_call_outside_the_main_guard_gets_no_local_pool(tmp_path, guard, after, engine, out, err):
    """A plain script calling the search without the guard: every local worker imported it (running
    its calls again, each starting a pool of its own) until the map failed; now ``auto`` runs
    serially, said, and an explicit ``local`` is refused before any worker starts. Where the call
    runs decides (the script's top-level frame on the stack, against the guard's lines)."""
    (tmp_path / "main.py").write_text(ENGINE_OF.format(guard=guard, after=after))
    proc = subprocess.run([sys.executable, "main.py", engine], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert proc.stdout.strip() == out
    assert err in proc.stderr and (proc.returncode == 0) == bool(out), proc.stderr[-2000:]


def test_a_temporary_folder_too_long_for_the_workers_socket_is_named_with_the_fix(tmp_path):
    """With a long TMPDIR the local engine died in multiprocessing's forkserver with "OSError:
    AF_UNIX path too long" (its listening socket lives under the temporary folder): the error
    names the folder, the limit and the fix."""
    long_tmp = tmp_path / ("t" * max(1, SOCKET_PATH_LIMIT - len(str(tmp_path))))
    long_tmp.mkdir()
    (tmp_path / "main.py").write_text(ONE_TASK_CALLER)
    env = dict(os.environ, TMPDIR=str(long_tmp), OMP_WAIT_POLICY="PASSIVE")
    run = subprocess.run([sys.executable, "main.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("fqexport.errors.EngineError: local engine: the worker processes cannot be started")
    assert repr(str(long_tmp)) in last and "set TMPDIR to a shorter folder" in last, last


ONE_TASK_CALLER = """
from fqexport.engine import LocalEngine, Task
def one(context, task):
    return 1
if __name__ == "__main__":
    with LocalEngine(1) as engine:
        print(engine.map(one, [Task(("one",), "one", 0)], None, "one"))
"""


def test_the_default_worker_count_is_the_cpus_this_process_may_run_on(monkeypatch):
    """survey 97: `taskset -c 0 fqexport sweep` (a container's cpuset) started a local pool of
    os.cpu_count() workers: a 64-core host's pinned container would start 64 torch processes."""
    import fqexport.exporters.cpu_isa as cpu_isa

    monkeypatch.setattr(cpu_isa.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert cpu_isa.usable_cpus() == 1
    assert EngineConfig().num_workers == 1 and EngineConfig().kind == "serial"
    monkeypatch.setattr(cpu_isa.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert EngineConfig().num_workers == 3 and EngineConfig().kind == "local"
    assert EngineConfig(workers=2).num_workers == 2


def test_auto_runs_serially_where_the_temporary_folder_is_too_long_for_the_pools_socket(tmp_path, monkeypatch,
                                                                                        caplog):
    """survey 97: the default engine failed under a TMPDIR over ~75 bytes with the local engine's error;
    'auto' runs serially, said, as it does for an unguarded script; an explicit 'local' keeps the error
    (test_a_temporary_folder_too_long_for_the_workers_socket_is_named_with_the_fix)."""
    import tempfile

    long_tmp = tmp_path / ("t" * max(1, SOCKET_PATH_LIMIT - 32 - len(str(tmp_path))))
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with caplog.at_level("WARNING", logger="fqexport.engine"):
        engine = make_engine(EngineConfig(engine="auto", workers=2))
    assert isinstance(engine, SerialEngine)
    assert "is too long a path for the local pool's Unix socket: the search runs serially" in caplog.text
    assert isinstance(make_engine(EngineConfig(engine="local", workers=2)), LocalEngine)
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert isinstance(make_engine(EngineConfig(engine="auto", workers=2)), LocalEngine)


KILLED_SERVER_CALLER = """
import os, signal, time
from multiprocessing import forkserver
from fqexport.engine import LocalEngine, Task
def double(context, task):
    return task.payload * 2
if __name__ == "__main__":
    with LocalEngine(2) as engine:
        print(engine.map(double, [Task(("a", 0), "a", 0)], None, "one"))
        os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)  # a container's OOM killer
        time.sleep(0.5)
        print(engine.map(double, [Task(("b", i), "b", i) for i in range(3)], None, "two"))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the forkserver start method is POSIX's")
def test_a_killed_forkserver_gets_a_new_pool_instead_of_an_internal_error(tmp_path):
    """survey 97: the forkserver killed between two maps (an OOM killer) ended the next map with exit 3
    ("BrokenProcessPool"/"EOFError ... this is a bug") raised by the pool's submit: a new pool and
    server start, said once."""
    (tmp_path / "main.py").write_text(KILLED_SERVER_CALLER)
    run = subprocess.run([sys.executable, "main.py"], cwd=tmp_path, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["[0]", "[0,", "2,", "4]"]
    assert "local engine: the worker pool cannot start a worker (" in run.stderr
