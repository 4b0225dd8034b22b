"""Process-wide XLA and JAX settings that must happen before or right after JAX starts.

XLA:CPU sends convolutions through YNNPACK by default, which is ~3.7x slower than the
Eigen path on small CPUs (WRN-16-2 train step, batch 128: 4.3 s -> 1.1 s; see
README "Speed on CPU"). `configure_xla` appends the flag that turns it off to any
XLA_FLAGS the user set, only when JAX has not been imported yet and only for jaxlib
releases known to accept the flag (an unknown XLA flag aborts the process).
Opt out with SCALING_CPU_CONV_FLAG=0. The flag only affects the CPU backend.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib releases on which the flag was checked to exist.
_FLAG_KNOWN = ((0, 10), (0, 11), (0, 12))


def _jaxlib_minor() -> tuple[int, int] | None:
    try:
        parts = metadata.version("jaxlib").split(".")
        return int(parts[0]), int(parts[1])
    except Exception:  # not installed or odd version string
        return None


def configure_xla() -> bool:
    """Adds the CPU convolution flag to XLA_FLAGS; returns True when it is in effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return True
    if os.environ.get("SCALING_CPU_CONV_FLAG", "1") == "0":
        return False
    if "jax" in sys.modules or "jaxlib" in sys.modules:
        return False
    if _jaxlib_minor() not in _FLAG_KNOWN:
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + CPU_CONV_FLAG).strip()
    return True


def environ_without_conv_flag() -> dict[str, str]:
    """This process's environment for a child process that runs XLA's default CPU conv path
    (the flag is process-wide, so comparisons run it in a subprocess)."""
    env = dict(os.environ, SCALING_CPU_CONV_FLAG="0")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_cpu_experimental_ynn_fusion_type" not in f)
    return env


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); without it XLA:CPU
    emulates bf16 through float32 and `train.compute_dtype=bfloat16` is slower than float32."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: unknown, assume not
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (a second process compiles ~20x faster)."""
    import jax

    path = path or os.environ.get(
        "SCALING_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "scaling", "jax"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
