"""Tests of exporters/cpu_isa.py: instruction-set names from /proc/cpuinfo text."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from fqexport.exporters.cpu_isa import (
    KERNEL_FAMILIES,
    cpu_isa,
    isa_from_cpuinfo,
    kernel_family,
)

SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8\n"
ICELAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n"
ALDERLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx_vnni\n"
SKYLAKE_X = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n"
HASWELL = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
OLD = "processor\t: 0\nflags\t\t: fpu sse2 ssse3\n"
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd asimddp i8mm\n"


@pytest.mark.parametrize(
    "text, machine, isa, family",
    [
        (SAPPHIRE, "x86_64", "x86-avx512-vnni+amx", "x86-vnni"),
        (ICELAKE, "x86_64", "x86-avx512-vnni", "x86-vnni"),
        (ALDERLAKE, "x86_64", "x86-avx-vnni", "x86-vnni"),
        (SKYLAKE_X, "x86_64", "x86-avx512", "x86-avx2"),
        (HASWELL, "x86_64", "x86-avx2", "x86-avx2"),
        (OLD, "x86_64", "unknown", "unknown"),
        (GRAVITON, "aarch64", "arm64", "arm64"),
        ("", "arm64", "arm64", "arm64"),
        ("", "x86_64", "unknown", "unknown"),
    ],
)
def test_isa_and_family_from_cpuinfo(text, machine, isa, family):
    assert isa_from_cpuinfo(text, machine) == isa
    assert kernel_family(isa) == family
    assert family in KERNEL_FAMILIES


def test_cpu_isa_reads_the_given_file(tmp_path, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    f = tmp_path / "cpuinfo"
    f.write_text(HASWELL + "\nprocessor\t: 1\nflags\t\t: avx512_vnni\n")  # first processor counts
    assert cpu_isa(f) == "x86-avx2"
    assert cpu_isa(tmp_path / "missing") == "unknown"


def test_this_machine_has_a_known_name():
    # every x86-64 CPU with AVX2 and every arm64 CPU maps to an int8 kernel family; the flags are
    # read here independently of cpu_isa's parser
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.lower().startswith(("flags", "features"))), []))
    family = kernel_family(cpu_isa())
    assert family in KERNEL_FAMILIES
    if platform.machine() in ("aarch64", "arm64"):
        assert family == "arm64"
    elif "avx512_vnni" in flags or "avx_vnni" in flags:
        assert family == "x86-vnni"
    elif "avx2" in flags:
        assert family == "x86-avx2"
    else:
        pytest.skip(f"this CPU ({platform.machine()}, no AVX2) has no int8 kernel family fqexport emulates")
