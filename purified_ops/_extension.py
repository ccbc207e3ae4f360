"""Loading the compiled extension: ``purified_ops._C`` (op schemas, autocast, CUDA kernels) and the
CPU kernels compiled for the best CPU capability the running CPU supports.

setup.py compiles the CPU kernels once per capability, each into a module of its own
(``purified_ops._cpu_default``, ``_cpu_avx2``, ``_cpu_avx512``); exactly one of them is imported,
so no code compiled for a capability the CPU lacks is ever loaded. The choice follows torch's
own (``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``);
``PURIFIED_OPS_CPU_CAPABILITY`` may lower it further, never raise it. The environment's settings
are parsed by :mod:`purified_ops._settings` and passed to the module loaded.

The CUDA kernels are compiled for the archs setup.py chose (build info ``cuda_archs``: the cubins
and PTX the extension carries, see ``_cuda_archs``). A GPU that none of them serves is said so once
(a RuntimeWarning naming the GPU, its compute capability, the archs built and how to rebuild): at
load when CUDA is already initialized, else at the first call on that GPU.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import NamedTuple, Sequence

import torch

from . import _cuda_archs, _settings
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
    if info["cuda"] and torch.cuda.is_initialized():  # else the first call on a GPU checks it
        unserved_cuda_device(info["cuda_archs"])
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


class CudaDevice(NamedTuple):
    """A visible GPU and the kernel image of the build that the driver runs on it."""
    index: int
    name: str
    capability: tuple[int, int]
    image: str | None  # None: no image of the build serves this GPU


_CUDA_DEVICES: dict[int, CudaDevice] = {}  # by device index: capabilities do not change in a process


def cuda_device(images: str, index: int | None = None) -> CudaDevice:
    """The GPU `index` (default: the current one) and the image of `images` (build info
    ``cuda_archs``) that serves it. Initializes CUDA."""
    index = torch.cuda.current_device() if index is None else index
    if index not in _CUDA_DEVICES:
        capability = tuple(torch.cuda.get_device_capability(index))
        _CUDA_DEVICES[index] = CudaDevice(index, torch.cuda.get_device_name(index), capability,
                                          _cuda_archs.image_for(capability, images.split()))
    return _CUDA_DEVICES[index]


def unserved_gpu_message(device: CudaDevice, images: str) -> str:
    """Why the CUDA kernels do not run on `device`, and how to build them for it."""
    cap = "{}.{}".format(*device.capability)
    return (f"purified_ops: the CUDA kernels of this build have no image for GPU {device.index}, {device.name} "
            f"(compute capability {cap}): it was built for {images or 'no arch'} (a cubin sm_XY runs on "
            f"compute capability X.Y to X.9, PTX compute_XY on X.Y and newer). On this GPU purify(backend='auto') "
            f"runs the pure-PyTorch reference (correct, slower); backend='cuda', PurifyFunction and the raw ops "
            f"raise. Build for it with `TORCH_CUDA_ARCH_LIST=\"{cap}\" pip install --no-build-isolation .` "
            "(or with TORCH_CUDA_ARCH_LIST unset: every arch this torch was built for, and PTX for newer GPUs)")


_WARNED_UNSERVED: set[int] = set()


@torch.compiler.assume_constant_result  # a constant of the process: torch.compile calls it while tracing
def unserved_cuda_device(images: str, index: int | None = None) -> str | None:
    """None when the build's kernels (`images`: build info ``cuda_archs``) run on GPU `index`
    (default: the current one), else :func:`unserved_gpu_message`, which is also warned, once per
    GPU and process (RuntimeWarning)."""
    device = cuda_device(images, index)
    if device.image is not None:
        return None
    message = unserved_gpu_message(device, images)
    if device.index not in _WARNED_UNSERVED:
        _WARNED_UNSERVED.add(device.index)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return message


def cuda_device_summary(info: dict) -> str | None:
    """The current GPU and the image of the build (`info`: build info) that serves it, or
    :func:`unserved_gpu_message` when none does; None without a CUDA build or a visible GPU. For
    ``purified-ops info`` and ``verify``."""
    if not (info.get("cuda") and torch.cuda.is_available()):
        return None
    images = info["cuda_archs"]
    device = cuda_device(images)
    if device.image is None:
        return unserved_gpu_message(device, images)
    kind = "PTX, compiled by the driver" if device.image.startswith("compute_") else "cubin"
    return (f"GPU {device.index}, {device.name} (compute capability {'{}.{}'.format(*device.capability)}) runs "
            f"the {device.image} image ({kind}) of this build ({images})")
