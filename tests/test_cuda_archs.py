"""The CUDA archs: which a build compiles by default, which image serves a GPU, what the built
extension carries (scripts/cuda_images.py reads its fatbins), and what purified_ops does on a GPU
that no image of the build serves (a mocked device: no GPU needed)."""
import importlib.util
import os
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import cpp_extension

import purified_ops
from purified_ops import _cuda_archs, _extension, cli, ops, reference, testing
from purified_ops._cuda_archs import default_arch_list, gencode_flags, image_for, images_of_gencode, serves

ROOT = Path(__file__).resolve().parents[1]
INFO = purified_ops.build_info()
needs_extension = pytest.mark.skipif(not INFO["extension_loaded"], reason="compiled extension not loaded")
needs_cuda_build = pytest.mark.skipif(not INFO.get("cuda"), reason="needs the CUDA build of purified_ops")

spec = importlib.util.spec_from_file_location("cuda_images", ROOT / "scripts" / "cuda_images.py")
cuda_images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_images)

# torch 2.14.1 (CUDA 13.0)'s torch.cuda.get_arch_list() and CUDA 13.0's `nvcc --list-gpu-code`.
TORCH_CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
NVCC_13_0 = ("sm_75 sm_80 sm_86 sm_87 sm_88 sm_89 sm_90 sm_100 sm_110 sm_103 sm_120 sm_121 "
             "compute_75 compute_80 compute_86 compute_87 compute_88 compute_89 compute_90 compute_100 "
             "compute_110 compute_103 compute_120 compute_121").split()
NVCC_12_6 = "sm_50 sm_52 sm_53 sm_60 sm_61 sm_62 sm_70 sm_72 sm_75 sm_80 sm_86 sm_87 sm_89 sm_90 sm_90a".split()
DEFAULT_CU130 = "sm_75 sm_80 sm_86 sm_89 sm_90 sm_100 sm_120 compute_120".split()


# ---- the default archs ------------------------------------------------------------------------------

@pytest.mark.parametrize("torch_archs, nvcc, expected", [
    (TORCH_CU130, NVCC_13_0, "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    # torch's archs beyond the minimum are built; PTX is of the newest
    (TORCH_CU130 + ["sm_103", "sm_121"], NVCC_13_0, "7.5;8.0;8.6;8.9;9.0;10.0;10.3;12.0;12.1+PTX"),
    # a torch built for fewer archs still gets the minimum; torch's PTX entries count as their arch
    (["sm_80", "compute_90"], NVCC_13_0, "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    # an older nvcc: what it cannot compile is left out, PTX moves to the newest it can
    (TORCH_CU130, NVCC_12_6, "7.5;8.0;8.6;8.9;9.0+PTX"),
    # PTX of an arch-specific arch would run on that one capability only: it goes to the newest other
    (["sm_90a"], NVCC_12_6, "7.5;8.0;8.6;8.9;9.0+PTX;9.0a"),
])
def test_default_arch_list(torch_archs, nvcc, expected):
    assert default_arch_list(torch_archs, nvcc) == expected


def test_default_arch_list_without_a_compilable_arch_says_what_nvcc_lists():
    with pytest.raises(ValueError, match="nvcc compiles none of the archs wanted .* it lists sm_50, sm_60"):
        default_arch_list(["sm_75"], ["sm_50", "sm_60"])


@pytest.mark.parametrize("arch_list", [default_arch_list(TORCH_CU130, NVCC_13_0), "7.5;9.0a+PTX;12.0"])
def test_the_default_lists_flags_are_those_torch_writes_for_it(monkeypatch, arch_list):
    """setup.py writes the default list's -gencode flags itself (an older torch's reading of
    TORCH_CUDA_ARCH_LIST rejects archs newer than it); they are those torch writes for the list."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert sorted(gencode_flags(arch_list)) == cpp_extension._get_cuda_arch_flags()


def test_the_default_list_makes_the_images_it_names():
    assert images_of_gencode(gencode_flags(default_arch_list(TORCH_CU130, NVCC_13_0))) == DEFAULT_CU130


def test_images_of_gencode():
    assert images_of_gencode(["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_75,code=sm_75",
                              "-gencode=arch=compute_80,code=[sm_80,compute_80]"]) == \
        ["sm_75", "sm_80", "compute_80", "sm_90a"]
    with pytest.raises(ValueError, match="not a -gencode flag"):
        images_of_gencode(["-arch=sm_80"])


# ---- which image serves a GPU ------------------------------------------------------------------------

@pytest.mark.parametrize("capability, images, expected", [
    ((7, 5), DEFAULT_CU130, "sm_75"),      # T4
    ((8, 0), DEFAULT_CU130, "sm_80"),      # A100
    ((8, 7), DEFAULT_CU130, "sm_86"),      # Jetson Orin: a cubin runs on later minors of its major
    ((8, 9), DEFAULT_CU130, "sm_89"),      # L4, RTX 40
    ((9, 0), DEFAULT_CU130, "sm_90"),      # H100, H200
    ((10, 0), DEFAULT_CU130, "sm_100"),    # B200
    ((10, 3), DEFAULT_CU130, "sm_100"),    # B300
    ((12, 0), DEFAULT_CU130, "sm_120"),    # RTX 50
    ((12, 1), DEFAULT_CU130, "sm_120"),    # DGX Spark
    ((13, 0), DEFAULT_CU130, "compute_120"),  # a GPU newer than every cubin: the PTX
    ((11, 0), DEFAULT_CU130, None),        # Thor: no cubin of major 11, and PTX 12.0 is newer
    ((7, 0), DEFAULT_CU130, None),         # V100: older than every image
    ((7, 5), ["sm_80", "sm_90"], None),    # the former default build on a T4 ...
    ((10, 0), ["sm_80", "sm_90"], None),   # ... on a B200 ...
    ((12, 0), ["sm_80", "sm_90"], None),   # ... and on an RTX 50
    ((8, 6), ["sm_80", "sm_90"], "sm_80"),
    ((9, 0), ["sm_80", "compute_80"], "compute_80"),  # sm_80 never runs on major 9: the PTX does
    ((8, 0), ["sm_80", "compute_80"], "sm_80"),       # a cubin before PTX
])
def test_image_for(capability, images, expected):
    assert image_for(capability, images) == expected


def test_arch_specific_images_serve_their_own_capability_only():
    assert serves("sm_90a", (9, 0)) and not serves("sm_90a", (9, 1))
    assert serves("compute_90a", (9, 0)) and not serves("compute_90a", (10, 0))
    assert serves("sm_100f", (10, 3)) and not serves("sm_100f", (12, 0))
    assert serves("compute_100f", (10, 3)) and not serves("compute_100f", (12, 0))
    assert not serves("sm_86", (8, 0))


# ---- what a built file carries (scripts/cuda_images.py) ----------------------------------------------

def fatbin(entries):
    """One fat binary of (kind, arch, flags) entries with 8-byte payloads."""
    body = b""
    for kind, arch, flags in entries:
        header = struct.pack("<HHIQIIHHIIIQ", kind, 0x101, 64, 8, 0, 0, 8, 1, arch, 0, 0, flags)
        body += header.ljust(64, b"\0") + b"payload!"
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def elf_with_section(name: bytes, contents: bytes) -> bytes:
    """A minimal little-endian ELF64 file: a null section, `name` holding `contents`, .shstrtab."""
    shstrtab = b"\0" + name + b"\0.shstrtab\0"
    data_off = 64
    strtab_off = data_off + len(contents)
    shoff = (strtab_off + len(shstrtab) + 7) // 8 * 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def section(name_off, sh_type, offset, size):
        return struct.pack("<IIQQQQIIQQ", name_off, sh_type, 0, 0, offset, size, 0, 0, 8, 0)

    sections = (section(0, 0, 0, 0) + section(1, 1, data_off, len(contents))
                + section(len(name) + 2, 3, strtab_off, len(shstrtab)))
    body = header + contents + shstrtab
    return body.ljust(shoff, b"\0") + sections


def test_the_reader_lists_cubins_and_ptx_of_every_fatbin(tmp_path):
    one = fatbin([(2, 75, 0x11), (2, 90, 0x100011)])        # cubins sm_75, sm_90a
    two = fatbin([(2, 75, 0x11), (1, 120, 0x8011), (2, 100, 0x1200011)])  # PTX 12.0 (compressed), sm_100f
    path = tmp_path / "ext.so"
    path.write_bytes(elf_with_section(b".nv_fatbin", one + b"\0" * 8 + two))
    assert cuda_images.images(str(path)) == ["sm_75", "sm_90a", "sm_100f", "compute_120"]
    assert cuda_images.main([str(path), "--expect", "sm_75 sm_90a sm_100f compute_120"]) == 0
    assert cuda_images.main([str(path), "--expect", "sm_75 sm_90a"]) == 1


def test_the_reader_finds_nothing_in_a_file_without_gpu_code(tmp_path):
    path = tmp_path / "plain.so"
    path.write_bytes(elf_with_section(b".text", b"\x90" * 16))
    assert cuda_images.images(str(path)) == []
    path.write_bytes(elf_with_section(b".nv_fatbin", b"\x01" * 16))
    with pytest.raises(ValueError, match="no fat binary header at offset 0"):
        cuda_images.images(str(path))


def nvcc_path():
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda-13.0"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.access(path, os.X_OK) else shutil.which("nvcc")


@pytest.mark.skipif(nvcc_path() is None, reason="needs nvcc")
def test_the_reader_agrees_with_nvcc(tmp_path, monkeypatch):
    """An object nvcc compiled for a TORCH_CUDA_ARCH_LIST (torch's gencode flags) lists its images."""
    (tmp_path / "k.cu").write_text("__global__ void k(float* x) { x[threadIdx.x] *= 2.f; }\n")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;9.0a;12.0+PTX")
    flags = cpp_extension._get_cuda_arch_flags()
    out = subprocess.run([nvcc_path(), "-c", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.o"), *flags],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert cuda_images.images(str(tmp_path / "k.o")) == images_of_gencode(flags) == \
        ["sm_75", "sm_90a", "sm_120", "compute_120"]


@needs_cuda_build
def test_the_extension_carries_the_images_its_build_info_names():
    assert cuda_images.images(purified_ops._C.__file__) == INFO["cuda_archs"].split()


@needs_cuda_build
@pytest.mark.skipif(bool(os.environ.get("TORCH_CUDA_ARCH_LIST")), reason="built for the archs TORCH_CUDA_ARCH_LIST names")
def test_a_default_build_carries_a_cubin_for_every_arch_of_torch_and_ptx_of_the_newest():
    """What scripts/check_cuda_build.sh builds (TORCH_CUDA_ARCH_LIST unset): the extension's images
    are those of the default list, and among them a cubin for each arch torch was built for
    (torch.cuda.get_arch_list(), where nvcc compiles it) and PTX of the newest."""
    carried = cuda_images.images(purified_ops._C.__file__)
    nvcc = subprocess.run([nvcc_path(), "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split()
    torch_archs = torch.cuda.get_arch_list() or torch._C._cuda_getArchFlags().split()
    assert carried == images_of_gencode(gencode_flags(default_arch_list(torch_archs, nvcc)))
    cubins = [a for a in torch_archs if a.startswith("sm_") and a in nvcc]
    assert cubins and set(cubins) <= set(carried), (torch_archs, carried)
    newest = max(_cuda_archs.parse_image(n) for n in carried if n.startswith("sm_"))
    assert carried[-1] == f"compute_{newest.major}{newest.minor}", carried


# ---- a GPU that no image of the build serves (mocked: CPU only) --------------------------------------

class MockGPU:
    """Makes torch see one GPU of `capability`, and the build a CUDA build carrying `images`."""

    def __init__(self, monkeypatch, name, capability, images):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setitem(ops._BUILD_INFO, "cuda", True)
        monkeypatch.setitem(ops._BUILD_INFO, "cuda_archs", images)
        monkeypatch.setattr(_extension, "_CUDA_DEVICES", {})
        monkeypatch.setattr(_extension, "_WARNED_UNSERVED", set())
        self.reference_calls = 0

        def reference_forward(x, z, strength, eps):  # the routing is checked, not the math (fake tensors)
            self.reference_calls += 1
            return x.new_empty(x.shape), None, None

        monkeypatch.setattr(reference, "purify_forward", reference_forward)


def cuda_inputs():
    """x [4, 16] and z [4, 2, 16] on a (fake) CUDA device: purify routes and checks them as CUDA tensors."""
    mode = FakeTensorMode()
    with mode:
        return mode, torch.randn(4, 16, device="cuda"), torch.randn(4, 2, 16, device="cuda")


@needs_extension
def test_an_unserved_gpu_is_said_once_and_auto_runs_the_reference(monkeypatch):
    gpu = MockGPU(monkeypatch, "Tesla T4", (7, 5), "sm_80 sm_90")
    mode, x, z = cuda_inputs()
    with warnings.catch_warnings(record=True) as caught, mode:
        warnings.simplefilter("always")
        y = purified_ops.purify(x, z)
        purified_ops.purify(x, z)
        purified_ops.PurifyLayer()(x, z)
    assert y.shape == x.shape and y.device.type == "cuda"
    assert gpu.reference_calls == 3
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "no image for GPU 0, Tesla T4 (compute capability 7.5)" in message
    assert "built for sm_80 sm_90" in message
    assert "purify(backend='auto') runs the pure-PyTorch reference" in message
    assert '`TORCH_CUDA_ARCH_LIST="7.5" pip install --no-build-isolation .`' in message


@needs_extension
def test_an_unserved_gpu_makes_backend_cuda_raise_the_reason(monkeypatch):
    MockGPU(monkeypatch, "NVIDIA B200", (10, 0), "sm_80 sm_90")
    mode, x, z = cuda_inputs()
    with mode, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"no image for GPU 0, NVIDIA B200 \(compute capability 10\.0\): "
                                               r"it was built for sm_80 sm_90.*TORCH_CUDA_ARCH_LIST=\"10.0\""):
            purified_ops.purify(x, z, backend="cuda")


@needs_extension
@pytest.mark.parametrize("capability, images", [((8, 6), "sm_80 sm_90"), ((13, 0), " ".join(DEFAULT_CU130))])
def test_a_served_gpu_runs_the_compiled_op_without_a_word(monkeypatch, capability, images):
    gpu = MockGPU(monkeypatch, "some GPU", capability, images)
    mode, x, z = cuda_inputs()
    with warnings.catch_warnings(record=True) as caught, mode:
        warnings.simplefilter("always")
        y = purified_ops.purify(x, z)  # the registered op's fake kernel, on fake tensors
    assert y.shape == x.shape and gpu.reference_calls == 0 and not caught


@needs_extension
def test_a_gpu_seen_unserved_at_load_is_said_there_and_only_there(monkeypatch):
    MockGPU(monkeypatch, "Tesla T4", (7, 5), "sm_90")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    build_info = purified_ops._C.build_info
    monkeypatch.setattr(purified_ops._C, "build_info", lambda: {**build_info(), "cuda": True, "cuda_archs": "sm_90"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.load().error is None
        assert _extension.unserved_cuda_device("sm_90", 0) is not None  # a call later: no second word
    assert len(caught) == 1 and "Tesla T4 (compute capability 7.5)" in str(caught[0].message)


@needs_extension
def test_info_and_verify_show_the_archs_built_and_whether_this_gpu_is_served(monkeypatch, capsys):
    MockGPU(monkeypatch, "Tesla T4", (7, 5), "sm_80 sm_90 compute_90")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["info"]) == 0
        out = capsys.readouterr().out
        assert "gpu_kernel_image: purified_ops: the CUDA kernels of this build have no image for GPU 0, Tesla T4" in out
        assert "  cuda_archs: sm_80 sm_90 compute_90" in out
        report = testing.verify(device="cuda", quick=True)
    assert not report.passed and report.backends == []
    row = report.rows[0]
    assert (row.backend, row.case, row.passed) == ("cuda", "kernel image for this GPU", False)
    assert "Tesla T4 (compute capability 7.5): it was built for sm_80 sm_90 compute_90" in row.detail

    MockGPU(monkeypatch, "NVIDIA H200", (9, 0), "sm_80 sm_90 compute_90")
    assert cli.main(["info"]) == 0
    assert ("gpu_kernel_image: GPU 0, NVIDIA H200 (compute capability 9.0) runs the sm_90 image (cubin) of this "
            "build (sm_80 sm_90 compute_90)") in capsys.readouterr().out
