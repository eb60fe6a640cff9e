"""reuse_freed_memory: glibc's thresholds raised while it runs, restored and trimmed after."""

from __future__ import annotations

import threading

import pytest

import fqexport.heap as heap


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: lib)
    monkeypatch.delenv(heap.ENV, raising=False)
    return lib


RAISE = [("mallopt", heap.M_MMAP_THRESHOLD, heap.RAISED), ("mallopt", heap.M_TRIM_THRESHOLD, heap.RAISED)]
SETTLE = [("malloc_trim", 0), ("mallopt", heap.M_MMAP_THRESHOLD, 32 << 20),
          ("mallopt", heap.M_TRIM_THRESHOLD, 64 << 20)]


def test_raised_inside_then_trimmed_and_settled(fake):
    with heap.reuse_freed_memory():
        assert fake.calls == RAISE
    assert fake.calls == RAISE + SETTLE


def test_nested_and_concurrent_uses_set_once_and_restore_once(fake):
    inner_done, release = threading.Event(), threading.Event()

    def other():
        with heap.reuse_freed_memory():
            inner_done.set()
            release.wait(5)

    with heap.reuse_freed_memory():
        t = threading.Thread(target=other)
        t.start()
        inner_done.wait(5)
        with heap.reuse_freed_memory():
            pass
    assert fake.calls == RAISE  # the thread is still inside: nothing restored yet
    release.set()
    t.join()
    assert fake.calls == RAISE + SETTLE


def test_an_exception_still_restores(fake):
    with pytest.raises(ValueError):
        with heap.reuse_freed_memory():
            raise ValueError("boom")
    assert fake.calls == RAISE + SETTLE


def test_the_environment_turns_it_off(fake, monkeypatch):
    monkeypatch.setenv(heap.ENV, "0")
    with heap.reuse_freed_memory():
        pass
    assert fake.calls == []


def test_without_glibc_nothing_happens(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with heap.reuse_freed_memory():
        pass  # no error, no call


def test_glibc_accepts_the_thresholds():
    lib = heap._glibc()
    if lib is None:
        pytest.skip("the C library is not glibc: reuse_freed_memory does nothing here")
    try:
        assert lib.mallopt(heap.M_MMAP_THRESHOLD, heap.RAISED) == 1
        assert lib.mallopt(heap.M_TRIM_THRESHOLD, heap.RAISED) == 1
    finally:
        lib.mallopt(heap.M_MMAP_THRESHOLD, heap.SETTLED_MMAP)
        lib.mallopt(heap.M_TRIM_THRESHOLD, heap.SETTLED_TRIM)


@pytest.mark.parametrize("var, value", [("MALLOC_MMAP_THRESHOLD_", "262144"), ("MALLOC_TRIM_THRESHOLD_", "1"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=262144")])
def test_a_process_started_with_its_own_thresholds_is_left_alone(fake, monkeypatch, var, value):
    """The exit set 32 MB / 64 MB over the user's MALLOC_MMAP_THRESHOLD_ for the rest of the process (survey 42)."""
    monkeypatch.setenv(var, value)
    with heap.reuse_freed_memory():
        pass
    assert fake.calls == []
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")  # other tunables: tuned as usual
    monkeypatch.delenv(var if var != "GLIBC_TUNABLES" else "MALLOC_MMAP_THRESHOLD_", raising=False)
    with heap.reuse_freed_memory():
        pass
    assert fake.calls == RAISE + SETTLE
