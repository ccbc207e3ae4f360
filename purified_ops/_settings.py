"""The environment variables purified_ops reads, each parsed here and nowhere else.

Run time (read once, when ``import purified_ops`` loads the extension; docs/DESIGN.md, "Environment"):

- ``PURIFIED_OPS_CPU_CAPABILITY``: the highest CPU capability whose kernels may be chosen,
  ``default``, ``avx2`` or ``avx512`` as torch spells ``ATEN_CPU_CAPABILITY``, in any case;
- ``PURIFIED_OPS_CPU_CACHE_MB``: the CPU output cache's cap in MiB, a whole number >= 0 (0 turns
  the cache off);
- ``PURIFIED_OPS_STREAMING_STORES``: ``0`` or ``1`` overrides the size rule for non-temporal stores.

An empty value counts as unset. Any other value raises :class:`SettingError`, naming the variable
and what it takes: a setting that forces a kernel or a memory cap must not be silently replaced
by the default.

Build time (setup.py loads this file by its path, so it imports nothing but the standard
library): ``PURIFIED_OPS_CPU_CAPABILITY`` is the highest capability compiled, and
``PURIFIED_OPS_CUDA_EMU`` (``0``, ``1`` or ``asan``) which emulated CUDA build is made.
"""
from __future__ import annotations

from typing import Mapping

CPU_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")  # lowest first, as setup.py compiles them

CPU_CAPABILITY = "PURIFIED_OPS_CPU_CAPABILITY"
CPU_CACHE_MB = "PURIFIED_OPS_CPU_CACHE_MB"
STREAMING_STORES = "PURIFIED_OPS_STREAMING_STORES"
CUDA_EMU = "PURIFIED_OPS_CUDA_EMU"

# The cache's cap is kept in bytes in a 64-bit size_t.
MAX_CPU_CACHE_MB = (2**64 - 1) >> 20


class SettingError(ValueError):
    """An environment variable of purified_ops holds a value it does not take."""


def _value(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "")
    return value.strip() or None


def _reject(name: str, value: str, allowed: str) -> SettingError:
    return SettingError(f"{name} must be {allowed}, got {value!r} (unset it for the default)")


def cpu_capability(environ: Mapping[str, str]) -> str | None:
    """``PURIFIED_OPS_CPU_CAPABILITY`` as one of :data:`CPU_CAPABILITIES`, or None when unset.

    torch takes ``ATEN_CPU_CAPABILITY`` in lower case (``default``, ``avx2``, ``avx512``); the
    names here are its capability names, so both spellings (any case) are taken."""
    value = _value(environ, CPU_CAPABILITY)
    if value is None:
        return None
    if value.upper() not in CPU_CAPABILITIES:
        raise _reject(CPU_CAPABILITY, value, "one of default, avx2, avx512 (any case)")
    return value.upper()


def cpu_cache_mb(environ: Mapping[str, str]) -> int | None:
    """``PURIFIED_OPS_CPU_CACHE_MB`` as a whole number of MiB (0: no cache), or None when unset."""
    value = _value(environ, CPU_CACHE_MB)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_CPU_CACHE_MB:
        raise _reject(CPU_CACHE_MB, value, f"a whole number of MiB from 0 (no cache) to {MAX_CPU_CACHE_MB}")
    return int(value)


def streaming_stores(environ: Mapping[str, str]) -> bool | None:
    """``PURIFIED_OPS_STREAMING_STORES``: True (always), False (never), None (unset: by size)."""
    value = _value(environ, STREAMING_STORES)
    if value is None:
        return None
    if value not in ("0", "1"):
        raise _reject(STREAMING_STORES, value, "0 (never) or 1 (always)")
    return value == "1"


def cuda_emulation(environ: Mapping[str, str]) -> str:
    """``PURIFIED_OPS_CUDA_EMU``: "0" (unset), "1" or "asan"."""
    value = _value(environ, CUDA_EMU) or "0"
    if value not in ("0", "1", "asan"):
        raise _reject(CUDA_EMU, value, "0, 1 or asan")
    return value
