"""`resolve_device`: the one reading of a device setting, shared by training and serving."""

from __future__ import annotations

import torch


def resolve_device(spec: str | None) -> torch.device:
    """None or `auto` is CUDA when present, else CPU; an explicit CUDA request without one fails."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    return dev


#: x86 CPU flags (Linux /proc/cpuinfo names) of native bfloat16 arithmetic: AVX512-BF16 dot
#: products (Cooper Lake, Zen 4 and later) and AMX tiles (Sapphire Rapids and later). oneDNN runs
#: bfloat16 matmuls on these; without them torch emulates bfloat16 and is slower than float32.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo text (the first `flags` line; every core lists the same)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def host_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """This host's CPU flags; empty where there is no /proc/cpuinfo (macOS, Windows): float32 there."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_cpu_flags(f.read())
    except OSError:
        return frozenset()


def auto_dtype(device: torch.device, *, cuda_bf16: bool, cpu_flags: frozenset[str]) -> torch.dtype:
    """What `dtype auto` means, from what the hardware computes natively: bfloat16 on a CUDA device
    that supports it, and on a CPU with AVX512-BF16 or AMX; float32 everywhere else (ARM CPUs
    included: torch's bfloat16 there depends on the build, so float32 is the safe default)."""
    if device.type == "cuda":
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if device.type == "cpu" and cpu_flags & NATIVE_BF16_CPU_FLAGS:
        return torch.bfloat16
    return torch.float32


def host_auto_dtype(device: torch.device) -> torch.dtype:
    """`auto_dtype` with this host's facts."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return auto_dtype(device, cuda_bf16=cuda_bf16, cpu_flags=host_cpu_flags() if device.type == "cpu" else frozenset())
