"""The processor as the CPUID instruction reports it to this process (no torch, no C compiler).

Under QEMU user-mode emulation `/proc/cpuinfo` is the host's file, so it names the host's
processor and flags, not the emulated one; CPUID is executed by the emulator and answers
for the processor it emulates (the same source torch's cpuinfo library uses to choose its
kernels). The instruction is run from a few bytes of x86-64 machine code placed in an
executable anonymous mapping and called through ctypes.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from pathlib import Path
from typing import Any

from qlorax.artifacts import sha256_bytes

# Set by the launcher's caller for a child it runs under an emulator: the CPU model's name.

# void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4]) under the System V x86-64 ABI.
_CPUID_CODE = bytes([
    0x53,                    # push rbx            (callee-saved, CPUID overwrites it)
    0x89, 0xF8,              # mov eax, edi        leaf
    0x89, 0xF1,              # mov ecx, esi        subleaf
    0x49, 0x89, 0xD0,        # mov r8, rdx         out
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])

# (flag name as in /proc/cpuinfo, leaf, subleaf, register index eax=0 ebx=1 ecx=2 edx=3, bit)
_FLAG_BITS = (
    ("sse4_2", 1, 0, 2, 20), ("fma", 1, 0, 2, 12), ("avx", 1, 0, 2, 28), ("f16c", 1, 0, 2, 29),
    ("avx2", 7, 0, 1, 5), ("avx512f", 7, 0, 1, 16), ("avx512bw", 7, 0, 1, 30), ("avx512vl", 7, 0, 1, 31),
    ("avx512_vnni", 7, 0, 2, 11), ("amx_bf16", 7, 0, 3, 22), ("amx_tile", 7, 0, 3, 24),
    ("avx512_bf16", 7, 1, 0, 5),
)


class _Cpuid:
    """The CPUID instruction as a Python callable (keeps its executable page alive)."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CPUID_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._call = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                      ctypes.POINTER(ctypes.c_uint32 * 4))(address)

    def __call__(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self._call(leaf, subleaf, ctypes.byref(out))
        return out[0], out[1], out[2], out[3]


# The CPU flags that change which kernels run; the full list is hashed too.
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_bf16", "sse4_2")


def cpu_info() -> dict[str, Any]:
    """The processor as /proc/cpuinfo describes it (the host's, even under QEMU user mode)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = sorted(value.split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_isa_flags": [flag for flag in ISA_FLAGS if flag in flags],
        "cpu_flags_sha256": sha256_bytes(" ".join(flags).encode()),
        "machine": platform.machine(),
    }


def _registers_text(*registers: int) -> str:
    return b"".join(r.to_bytes(4, "little") for r in registers).decode("ascii", "replace").strip("\x00 ").strip()


def cpuid_info() -> dict[str, Any]:
    """Vendor, brand string and ISA flags from CPUID, in the shape of cpu_info()
    (so Profile.unsupported_cpu reads it), plus `source`. Raises OSError when this is not an
    x86-64 process or executable memory is refused."""
    if platform.machine() != "x86_64":
        raise OSError(f"CPUID is an x86-64 instruction; this process runs on {platform.machine()}")
    cpuid = _Cpuid()
    max_leaf, ebx, ecx, edx = cpuid(0)
    vendor = _registers_text(ebx, edx, ecx)
    max_extended = cpuid(0x80000000)[0]
    brand = ""
    if max_extended >= 0x80000004:
        brand = _registers_text(*(r for leaf in (0x80000002, 0x80000003, 0x80000004) for r in cpuid(leaf)))
    max_subleaf7 = cpuid(7, 0)[0] if max_leaf >= 7 else 0
    flags = []
    for name, leaf, subleaf, register, bit in _FLAG_BITS:
        if leaf > max_leaf or (leaf == 7 and subleaf > max_subleaf7):
            continue
        if cpuid(leaf, subleaf)[register] >> bit & 1:
            flags.append(name)
    return {"source": "cpuid", "vendor": vendor, "cpu_model": " ".join(brand.split()) or vendor,
            "cpu_isa_flags": sorted(flags), "machine": platform.machine()}


def processor_facts(emulated_cpu: str | None) -> dict[str, Any]:
    """What this process can learn about its processor, and from where.

    CPUID answers for the emulated processor; /proc/cpuinfo is the host's file under QEMU
    user mode, so it is recorded separately and is not used to judge the processor."""
    try:
        cpu = cpuid_info()
    except OSError as exc:
        cpu = {**cpu_info(), "source": "/proc/cpuinfo", "cpuid_error": str(exc)}
    proc = cpu_info()
    return {**cpu, "emulated": emulated_cpu is not None, "emulated_cpu": emulated_cpu,
            "proc_cpuinfo": {"cpu_model": proc["cpu_model"], "cpu_isa_flags": proc["cpu_isa_flags"]}}
