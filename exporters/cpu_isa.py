"""Which instruction set this CPU gives ONNX Runtime's int8 kernels, and which kernel family that is.

The fused u8×s8 kernels ORT (MLAS) runs on a CPU differ in how they add products:

- ``x86-avx2``: AVX2 (or AVX-512 without VNNI) multiplies with ``vpmaddubsw``, which adds each
  pair of adjacent u8·s8 products into a *saturating* int16 before widening to int32;
- ``x86-vnni``: AVX512-VNNI / AVX-VNNI (and AMX) add the products exactly in int32;
- ``arm64``: the dot-product paths add exactly in int32;
- ``unknown``: anything else (no ``/proc/cpuinfo``, another architecture).

:func:`cpu_isa` names the instruction set (``"x86-avx512-vnni+amx"``, ``"x86-avx2"``, …) from
``/proc/cpuinfo`` flags; :func:`kernel_family` maps such a name to the family above.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

from fqexport.errors import ConfigError

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")

KERNEL_FAMILIES = ("x86-avx2", "x86-vnni", "arm64", "unknown")
# Families whose u8×s8 kernels fqexport can emulate (exporters/kernel_emulation.py).
EMULATED_FAMILIES = KERNEL_FAMILIES[:3]
# Families that add the products exactly in int32: the emulation computes them alike.
EXACT_FAMILIES = ("x86-vnni", "arm64")

# Run as if this machine's int8 kernels were another family's: every check that would judge a
# file by this CPU's own ORT session judges it by that family's emulated kernels instead. For CI
# and tests (run the suite once per family); latency is still this machine's.
HOST_KERNELS_ENV = "FQEXPORT_HOST_KERNELS"
MSG_HOST_KERNELS = (
    "environment variable " + HOST_KERNELS_ENV + "={value!r} is not one of "
    + ", ".join(EMULATED_FAMILIES) + " (unset it to use this CPU's own kernels)"
)

# Instruction-set name -> kernel family (see the module doc).
_FAMILY = {
    "x86-avx512-vnni+amx": "x86-vnni",
    "x86-avx512-vnni": "x86-vnni",
    "x86-avx-vnni": "x86-vnni",
    "x86-avx512": "x86-avx2",  # AVX-512 without VNNI: vpmaddubsw, saturates like AVX2
    "x86-avx2": "x86-avx2",
    "arm64": "arm64",
}


def _flags(text: str) -> tuple[set[str], bool]:
    """CPU feature flags of the first processor in a ``/proc/cpuinfo`` text, and whether it is ARM."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags":  # x86
            return set(value.split()), False
        if key == "features":  # arm64 Linux
            return set(value.split()), True
    return set(), False


def isa_from_cpuinfo(text: str, machine: str = "") -> str:
    """The instruction-set name for a ``/proc/cpuinfo`` text (``machine`` as ``platform.machine()``)."""
    flags, arm = _flags(text)
    m = machine.lower()
    if arm or m in ("aarch64", "arm64"):
        return "arm64"
    if not flags:
        return "unknown"
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "x86-avx512-vnni+amx" if "amx_int8" in flags else "x86-avx512-vnni"
    if "avx_vnni" in flags or "avxvnni" in flags:
        return "x86-avx-vnni"
    if "avx512bw" in flags:
        return "x86-avx512"
    if "avx2" in flags:
        return "x86-avx2"
    return "unknown"


def cpu_isa(cpuinfo: str | Path | None = None) -> str:
    """This machine's instruction set for int8 kernels, e.g. ``"x86-avx512-vnni+amx"``, ``"x86-avx2"``.

    ``"unknown"`` when ``/proc/cpuinfo`` cannot be read and the architecture is not arm64.
    ``cpuinfo`` overrides the file read (a path), mainly for tests.
    """
    path = Path(cpuinfo) if cpuinfo is not None else CPUINFO
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        log.debug("cannot read %s: %s", path, err)
        text = ""
    return isa_from_cpuinfo(text, platform.machine())


def usable_cpus() -> int:
    """Logical CPUs this process may run on: its affinity (``taskset``, a container's cpuset),
    not the machine's count, which ``os.cpu_count()`` gives."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call (macOS)
        return int(os.cpu_count() or 1)


def kernel_family(isa: str) -> str:
    """The kernel family (:data:`KERNEL_FAMILIES`) of an instruction-set name; ``"unknown"`` if none."""
    return _FAMILY.get(isa, "unknown")


def emulated_host() -> str | None:
    """The kernel family :data:`HOST_KERNELS_ENV` asks this machine to stand in for, or ``None``."""
    value = os.environ.get(HOST_KERNELS_ENV, "").strip()
    if not value:
        return None
    if value not in EMULATED_FAMILIES:
        raise ConfigError(MSG_HOST_KERNELS.format(value=value))
    return value


def host_family() -> str:
    """The kernel family this machine's checks stand for: :func:`emulated_host` when set, else
    this CPU's own (:func:`kernel_family` of :func:`cpu_isa`)."""
    return emulated_host() or kernel_family(cpu_isa())


def runs_natively(family: str) -> bool:
    """Whether this CPU's own ORT session computes ``family``'s int8 arithmetic, so it may judge a
    file for that family in place of the emulation: it is this CPU's family and no
    :data:`HOST_KERNELS_ENV` stand-in is set."""
    return emulated_host() is None and family != "unknown" and family == kernel_family(cpu_isa())
