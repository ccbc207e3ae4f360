"""Builds the extension modules of purified_ops:

  purified_ops._C            the op schemas, the autocast policy, the build-info binding and, when a
                             CUDA build of torch and nvcc are present, the fused CUDA kernels;
  purified_ops._cpu_default  the fused CPU kernels, once per CPU capability (DEFAULT, AVX2, AVX512
  purified_ops._cpu_avx2     on x86-64). purified_ops imports the one for the best capability the
  purified_ops._cpu_avx512   running CPU supports (torch's choice), and never another.

One module per capability keeps the code compiled with -mavx2 or -mavx512f out of every process whose
CPU lacks it: inline and template functions from headers (std::, c10::) are emitted in every
translation unit that uses them, and within one shared object the linker keeps any one copy, so a
copy compiled for AVX-512 could serve a DEFAULT kernel and die with SIGILL on an older CPU.

Environment:
  PURIFIED_OPS_CUDA=0|1          force the CUDA extension off or on (default: automatic)
  TORCH_CUDA_ARCH_LIST           CUDA archs, e.g. "8.6" or "8.0;9.0+PTX" (default: the archs torch was
                                 built for and those of purified_ops/_cuda_archs.py's MINIMUM_ARCHS that
                                 nvcc compiles, with PTX for the newest)
  PURIFIED_OPS_CPU_CAPABILITY    default, avx2 or avx512 (any case): the highest capability compiled
                                 (default: all of them on x86-64, DEFAULT elsewhere)
  PURIFIED_OPS_PTXAS_VERBOSE=1   print ptxas' register and spill report for every kernel
  PURIFIED_OPS_CUDA_EMU=1|asan   build only the CUDA kernels emulated on the CPU (a test backend,
                                 see docs/cuda_emulation.md), next to a build of the rest: purified_ops._cuda_emu, or with asan
                                 purified_ops._cuda_emu_asan under -fsanitize=address,undefined
"""
import glob
import importlib.util
import os
import platform
import subprocess

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_package_module(name):
    """purified_ops/<name>.py, a module the package uses at run time and the build needs too
    (_settings: the environment's parser; _cuda_archs: the default archs), loaded by its path: the
    package itself is not importable before it is built."""
    spec = importlib.util.spec_from_file_location(f"purified_ops_{name}", os.path.join(ROOT, "purified_ops", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTINGS = load_package_module("_settings")
cuda_archs = load_package_module("_cuda_archs")

# at::vec::Vectorized picks its implementation from CPU_CAPABILITY_* defines; without them it
# is a scalar emulation several times slower. The flags are those torch compiles its own kernels
# of each capability with, so a kernel runs wherever torch chooses that capability.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
CPU_CAPABILITIES = tuple(CPU_CAPABILITY_FLAGS)  # from lowest to highest
assert CPU_CAPABILITIES == SETTINGS.CPU_CAPABILITIES


def setting(parse):
    """A setting parsed from the environment; an invalid one stops the build with the reason."""
    try:
        return parse(os.environ)
    except SETTINGS.SettingError as exc:
        raise SystemExit(str(exc)) from None


def cpu_capabilities():
    """The capabilities to compile CPU kernels for: up to PURIFIED_OPS_CPU_CAPABILITY (x86-64 only)."""
    top = setting(SETTINGS.cpu_capability) or CPU_CAPABILITIES[-1]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("DEFAULT",)
    return CPU_CAPABILITIES[:CPU_CAPABILITIES.index(top) + 1]


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


def nvcc_gpu_codes():
    """The cubin and PTX targets this nvcc compiles (`nvcc --list-gpu-code`: sm_75, ..., compute_120)."""
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cannot list the GPU archs of {nvcc} (--list-gpu-code): {exc}") from exc
    return out.split()


def cuda_targets():
    """(TORCH_CUDA_ARCH_LIST, nvcc's -gencode flags for it): the list given, as torch reads it ("8.6",
    "9.0+PTX", names such as "Ampere"), else cuda_archs.default_arch_list, whose flags are written
    here (an older torch's reading knows fewer archs than nvcc compiles)."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if given:
        return given, cpp_extension._get_cuda_arch_flags()
    # torch.cuda.get_arch_list() is empty where no GPU is visible in some torch versions; the
    # flags it reads are those torch was compiled with either way.
    torch_archs = torch.cuda.get_arch_list() or (torch._C._cuda_getArchFlags() or "").split()
    try:
        default = cuda_archs.default_arch_list(torch_archs, nvcc_gpu_codes())
    except ValueError as exc:
        raise SystemExit(f"purified_ops: {exc}; set TORCH_CUDA_ARCH_LIST") from exc
    return default, cuda_archs.gencode_flags(default)


def c_string(text):
    return '"' + text.replace('"', '\\"') + '"'


def cxx_standard():
    # ATen's headers need C++20 from torch 2.14 on (#error otherwise); older torch builds with C++17.
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


CXX = ["-O3", cxx_standard(), "-fopenmp"]
LINK = ["-fopenmp"]


def cpu_kernel_extension(capability):
    """purified_ops._cpu_<capability>: the CPU kernels, the output cache they allocate from and the
    host code they call, all compiled for this capability."""
    cxx = [*CXX, *CPU_CAPABILITY_FLAGS[capability]]
    sources = ["csrc/purify_host.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    defines = [("PURIFIED_OPS_CPU_CAPABILITY", c_string(capability)),
               ("PURIFIED_OPS_CXX_FLAGS", c_string(" ".join(cxx)))]
    return cpp_extension.CppExtension(f"purified_ops._cpu_{capability.lower()}", sources, define_macros=defines,
                                      extra_compile_args={"cxx": cxx}, extra_link_args=LINK)


def core_extension(capabilities):
    """purified_ops._C: schemas, purify's checks, the Autograd and autocast kernels, build info, and
    the CUDA kernels when built with CUDA."""
    sources = ["csrc/purify.cpp", "csrc/purify_autocast.cpp", "csrc/purify_public.cpp", "csrc/purify_host.cpp"]
    defines = [("PURIFIED_OPS_CPU_CAPABILITIES", c_string(" ".join(capabilities)))]
    if not want_cuda():
        return cpp_extension.CppExtension("purified_ops._C", sources, define_macros=defines,
                                          extra_compile_args={"cxx": CXX}, extra_link_args=LINK)
    arch_list, gencode = cuda_targets()
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    if os.environ.get("PURIFIED_OPS_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    # cuda_archs: the images the extension carries (sm_XY cubins, compute_XY PTX); at run time
    # purified_ops tells from them whether the GPU it runs on is served.
    images = " ".join(cuda_archs.images_of_gencode(gencode))
    defines += [("PURIFIED_OPS_WITH_CUDA", None), ("PURIFIED_OPS_NVCC_FLAGS", c_string(" ".join(nvcc))),
                ("PURIFIED_OPS_CUDA_ARCHS", c_string(images))]
    print(f"purified_ops: CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list}: {images}")
    # ATen/cuda headers pull in cusparse.h, which a pip CUDA torch ships under nvidia/cu13.
    includes = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
    return cpp_extension.CUDAExtension("purified_ops._C", sources, define_macros=defines,
                                       include_dirs=[os.path.abspath(p) for p in includes],
                                       extra_compile_args={"cxx": CXX, "nvcc": nvcc + gencode},
                                       extra_link_args=LINK)


def cuda_emulation_extensions():
    """The CUDA kernel sources compiled by the host compiler against csrc/cuda_emu/cuda_emu.h,
    with the CUDA ops' host code, as a test backend on CPU tensors (needs the CUDA toolkit's
    headers only: cuda_runtime.h for the types, cuda_fp16.h and cuda_bf16.h)."""
    mode = setting(SETTINGS.cuda_emulation)
    if mode == "0":
        return []
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


class BuildExtension(cpp_extension.BuildExtension):
    """Compiles each module's objects in a folder of its own: the CPU kernel modules compile the
    same sources with different flags, and would otherwise overwrite each other's objects."""

    def build_extension(self, ext):
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp


# The emulated CUDA module is built on its own, next to an existing build of the package (it
# registers its own op namespace): the sensitivity script rebuilds it once per planted bug.
CAPABILITIES = cpu_capabilities()
setup(
    ext_modules=cuda_emulation_extensions() or [core_extension(CAPABILITIES),
                                                *(cpu_kernel_extension(c) for c in CAPABILITIES)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
