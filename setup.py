"""Builds purified_ops._C: the op schemas, the fused CPU kernels and, when a CUDA build of torch
and nvcc are present, the fused CUDA kernels.

Environment:
  PURIFIED_OPS_CUDA=0|1          force the CUDA extension off or on (default: automatic)
  TORCH_CUDA_ARCH_LIST           CUDA archs (default "8.0;9.0")
  PURIFIED_OPS_CPU_CAPABILITY    DEFAULT, AVX2 or AVX512 (default: what torch detects here)
  PURIFIED_OPS_PTXAS_VERBOSE=1   print ptxas' register and spill report for every kernel
  PURIFIED_OPS_CUDA_EMU=1|asan   also build the CUDA kernels emulated on the CPU (a test backend,
                                 see README): purified_ops._cuda_emu, or with asan
                                 purified_ops._cuda_emu_asan under -fsanitize=address,undefined
"""
import glob
import os
import shlex

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

# at::vec::Vectorized picks its implementation from CPU_CAPABILITY_* defines; without them it
# is a scalar emulation several times slower. The capability is fixed at build time, for the
# machine that builds (the package is built where it runs).
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_capability():
    cap = os.environ.get("PURIFIED_OPS_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    if cap not in CPU_CAPABILITY_FLAGS:
        cap = "AVX512" if cap.startswith("AVX512") else "DEFAULT"
    return cap


def want_cuda():
    forced = os.environ.get("PURIFIED_OPS_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"PURIFIED_OPS_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
            raise SystemExit("PURIFIED_OPS_CUDA=1 needs a CUDA build of torch and nvcc "
                             f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
        return forced == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def c_string(flags):
    return '"' + " ".join(flags).replace('"', '\\"') + '"'


def cxx_standard():
    # ATen's headers need C++20 from torch 2.14 on (#error otherwise); older torch builds with C++17.
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def extension():
    cap = cpu_capability()
    cxx = ["-O3", cxx_standard(), "-fopenmp", *CPU_CAPABILITY_FLAGS[cap]]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    defines = [("PURIFIED_OPS_CPU_CAPABILITY", f'"{cap}"'), ("PURIFIED_OPS_CXX_FLAGS", c_string(cxx))]
    link = ["-fopenmp"]
    if not want_cuda():
        return cpp_extension.CppExtension("purified_ops._C", sources, define_macros=defines,
                                          extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    if os.environ.get("PURIFIED_OPS_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    defines += [("PURIFIED_OPS_WITH_CUDA", None), ("PURIFIED_OPS_NVCC_FLAGS", c_string(nvcc)),
                ("PURIFIED_OPS_CUDA_ARCHS", f'"{archs}"')]
    # ATen/cuda headers pull in cusparse.h, which a pip CUDA torch ships under nvidia/cu13.
    includes = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
    return cpp_extension.CUDAExtension("purified_ops._C", sources, define_macros=defines,
                                       include_dirs=[os.path.abspath(p) for p in includes],
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                       extra_link_args=link)


def cuda_emulation_extensions():
    """The CUDA kernel sources compiled by the host compiler against csrc/cuda_emu/cuda_emu.h,
    with the CUDA ops' host code, as a test backend on CPU tensors (needs the CUDA toolkit's
    headers only: cuda_runtime.h for the types, cuda_fp16.h and cuda_bf16.h)."""
    mode = os.environ.get("PURIFIED_OPS_CUDA_EMU", "0")
    if mode == "0":
        return []
    if mode not in ("1", "asan"):
        raise SystemExit(f"PURIFIED_OPS_CUDA_EMU must be 0, 1 or asan, got {mode!r}")
    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, *sorted(glob.glob("/usr/local/cuda*"))]
    include = next((os.path.join(h, "include") for h in homes
                    if h and os.path.exists(os.path.join(h, "include", "cuda_fp16.h"))), None)
    if include is None:
        raise SystemExit("PURIFIED_OPS_CUDA_EMU needs the CUDA toolkit's headers (set CUDA_HOME)")
    # -fno-extern-tls-init: `extern __shared__` becomes an extern thread_local, which must not
    # go through a TLS init wrapper; -fno-strict-aliasing: the kernels type-pun as CUDA allows.
    # nvcc's `#pragma unroll` means nothing to g++ (it unrolls by itself at -O2).
    cxx = [cxx_standard(), "-fno-extern-tls-init", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
           "-include", os.path.join(ROOT, "csrc", "cuda_emu", "cuda_emu.h")]
    link = []
    name = "purified_ops._cuda_emu"
    if mode == "asan":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        cxx += ["-O1", "-g", "-fno-omit-frame-pointer", *sanitize]
        link += sanitize
        name += "_asan"
    else:
        # PURIFIED_OPS_CUDA_EMU_OPT=-O0 compiles 4x faster and runs slower: for the sensitivity
        # script, which rebuilds the kernels once per planted bug and runs a few tests on each.
        cxx += [os.environ.get("PURIFIED_OPS_CUDA_EMU_OPT", "-O2")]
    return [cpp_extension.CppExtension(name, sorted(glob.glob("csrc/cuda_emu/*.cpp")),
                                       define_macros=[("PURIFIED_OPS_CUDA_EMU", None)], include_dirs=[include],
                                       extra_compile_args={"cxx": cxx}, extra_link_args=link)]


setup(
    ext_modules=[extension(), *cuda_emulation_extensions()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
