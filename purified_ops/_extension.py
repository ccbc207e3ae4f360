"""Loading the compiled extension: ``purified_ops._C`` (op schemas, autocast, CUDA kernels) and the
CPU kernels compiled for the best CPU capability the running CPU supports.

setup.py compiles the CPU kernels once per capability, each into a module of its own
(``purified_ops._cpu_default``, ``_cpu_avx2``, ``_cpu_avx512``); exactly one of them is imported,
so no code compiled for a capability the CPU lacks is ever loaded. The choice follows torch's
own (``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``);
``PURIFIED_OPS_CPU_CAPABILITY`` may lower it further, never raise it. The environment's settings
are parsed by :mod:`purified_ops._settings` and passed to the module loaded.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NamedTuple, Sequence

import torch

from . import _settings
from ._settings import CPU_CAPABILITIES


class Extension(NamedTuple):
    core: ModuleType | None  # purified_ops._C
    cpu: ModuleType | None  # the chosen purified_ops._cpu_<capability>
    build_info: dict  # both modules' build info; {} when they did not load
    error: Exception | None  # why they did not load


def torch_cpu_capability() -> str:
    """The capability torch runs its own CPU kernels with, as one of :data:`CPU_CAPABILITIES`."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in CPU_CAPABILITIES:
        return cap
    return "AVX512" if cap.startswith("AVX512") else "DEFAULT"  # e.g. AVX512 variants; ARM's SVE


def choose_cpu_capability(compiled: Sequence[str], supported: str, limit: str | None = None) -> str:
    """The highest of the `compiled` capabilities that is at most `supported` (torch's choice) and
    at most `limit` (the PURIFIED_OPS_CPU_CAPABILITY setting, :func:`_settings.cpu_capability`;
    None when unset)."""
    rank = CPU_CAPABILITIES.index
    top = min(rank(supported), rank(limit)) if limit is not None else rank(supported)
    usable = [c for c in compiled if rank(c) <= top]
    if not usable:
        raise ImportError(f"no CPU kernels for this CPU: built for {', '.join(compiled)}, "
                          f"which needs more than {CPU_CAPABILITIES[top]}")
    return max(usable, key=rank)


def load() -> Extension:
    """Imports _C and the CPU kernels of the chosen capability, configured as the environment says;
    an invalid setting raises :class:`_settings.SettingError` (a ValueError naming the variable),
    a missing or broken module is reported in ``Extension.error``."""
    limit = _settings.cpu_capability(os.environ)
    cache_mb = _settings.cpu_cache_mb(os.environ)
    streaming = _settings.streaming_stores(os.environ)
    _settings.cuda_emulation(os.environ)  # checked here with the others; ops.py picks the build by it
    try:
        from . import _C  # registers torch.ops.purified_ops.* (TORCH_LIBRARY) as a side effect

        info = dict(_C.build_info())
        compiled = tuple(info.pop("cpu_capabilities").split())
        capability = choose_cpu_capability(compiled, torch_cpu_capability(), limit)
        # registers the CPU kernels (TORCH_LIBRARY_IMPL) as a side effect
        cpu = importlib.import_module(f"{__package__}._cpu_{capability.lower()}")
    except ImportError as exc:
        return Extension(None, None, {}, exc)
    if cache_mb is not None:
        cpu.set_output_cache_limit(cache_mb << 20)
    if streaming is not None:
        cpu.set_streaming_stores(streaming)
    info.update(cpu.build_info())
    info["cpu_capabilities"] = list(compiled)
    return Extension(_C, cpu, info, None)


# Text in a loader error when the extension was compiled against another torch (or C++ runtime)
# than the one running: its references to torch's C++ symbols no longer resolve.
_ABI_MISMATCH_SIGNS = ("undefined symbol", "version `GLIBCXX", "version `CXXABI")


def load_failure_message(error: Exception) -> str:
    """Why the extension did not load, and what to do about it."""
    text = f"{type(error).__name__}: {error}"
    if any(sign in str(error) for sign in _ABI_MISMATCH_SIGNS):
        return (f"the compiled extension did not load ({text}): it was built against another torch than "
                f"this one (torch {torch.__version__}), as `pip install .` does with build isolation, which "
                "compiles against whatever torch pip puts in its isolated environment. Rebuild it against "
                "this torch with `pip install --no-build-isolation .`")
    return (f"the compiled extension did not load ({text}). Build it against this torch with "
            "`pip install --no-build-isolation .` (`-e .` in a checkout)")
