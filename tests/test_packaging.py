"""Loading the extension (the CPU capability chosen, messages when it does not load) and the
messages of commands whose optional packages are missing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import purified_ops
from purified_ops import _extension, cli
from purified_ops._extension import CAPABILITY_ENV, CPU_CAPABILITIES, choose_cpu_capability, load_failure_message

ROOT = Path(__file__).resolve().parents[1]
INFO = purified_ops.build_info()
needs_extension = pytest.mark.skipif(not INFO["extension_loaded"], reason="compiled extension not loaded")
ALL = ("DEFAULT", "AVX2", "AVX512")


@pytest.mark.parametrize("compiled, supported, limit, chosen", [
    (ALL, "AVX512", None, "AVX512"),
    (ALL, "AVX2", None, "AVX2"),
    (ALL, "DEFAULT", None, "DEFAULT"),
    (ALL, "AVX512", "AVX2", "AVX2"),  # the setting lowers torch's choice
    (ALL, "AVX512", "DEFAULT", "DEFAULT"),
    (ALL, "AVX2", "AVX512", "AVX2"),  # but never raises it
    (("DEFAULT", "AVX2"), "AVX512", None, "AVX2"),  # built without AVX-512
])
def test_choose_cpu_capability(compiled, supported, limit, chosen):
    assert choose_cpu_capability(compiled, supported, limit) == chosen


def test_choose_cpu_capability_errors():
    with pytest.raises(ValueError, match=f"{CAPABILITY_ENV} must be one of DEFAULT, AVX2, AVX512, got 'avx2'"):
        choose_cpu_capability(ALL, "AVX2", "avx2")
    with pytest.raises(ImportError, match="no CPU kernels for this CPU: built for AVX2"):
        choose_cpu_capability(("AVX2",), "DEFAULT")


@needs_extension
def test_the_chosen_capability_is_torchs_and_the_only_one_loaded():
    assert INFO["cpu_capabilities"][0] == "DEFAULT" and set(INFO["cpu_capabilities"]) <= set(CPU_CAPABILITIES)
    want = choose_cpu_capability(INFO["cpu_capabilities"], _extension.torch_cpu_capability(),
                                 os.environ.get(CAPABILITY_ENV) or None)
    assert INFO["cpu_capability"] == want
    assert f"-DCPU_CAPABILITY={want}" in INFO["cxx_flags"]
    loaded = sorted(m for m in sys.modules if m.startswith("purified_ops._cpu_"))
    assert loaded == [f"purified_ops._cpu_{want.lower()}"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("purified_ops::purify_forward", "CPU")


@needs_extension
def test_info_shows_the_compiled_and_the_chosen_capability(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"  cpu_capabilities: {INFO['cpu_capabilities']}" in out
    assert f"  cpu_capability: {INFO['cpu_capability']}" in out


def run_python(args, **env):
    """Runs python with the checkout's package first on the path and `env` added."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    for key in [k for k, v in env.items() if v is None]:
        del full_env[key]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)


USABLE = [c for c in INFO.get("cpu_capabilities", ())
          if CPU_CAPABILITIES.index(c) <= CPU_CAPABILITIES.index(_extension.torch_cpu_capability())]


@needs_extension
@pytest.mark.parametrize("capability", USABLE)
def test_each_usable_capability_can_be_chosen_and_equals_the_reference(capability):
    """PURIFIED_OPS_CPU_CAPABILITY lowers the choice at run time: every compiled capability this CPU
    runs gets checked against the reference, forward and backward (scripts/check_install.py)."""
    out = run_python(["scripts/check_install.py", "--capability", capability], **{CAPABILITY_ENV: capability})
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{capability} kernels" in out.stdout


@needs_extension
def test_torchs_capability_setting_is_followed():
    out = run_python(["scripts/check_install.py", "--capability", "DEFAULT"],
                     ATEN_CPU_CAPABILITY="default", **{CAPABILITY_ENV: None})
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_invalid_capability_setting_fails_the_import_with_the_reason():
    out = run_python(["-c", "import purified_ops"], **{CAPABILITY_ENV: "SSE2"})
    assert out.returncode != 0
    assert f"{CAPABILITY_ENV} must be one of DEFAULT, AVX2, AVX512, got 'SSE2'" in out.stderr


def test_an_abi_mismatch_names_the_install_without_build_isolation():
    error = ImportError("/site-packages/purified_ops/_C.so: undefined symbol: _ZN3c106detail14torchCheckFailEv")
    message = load_failure_message(error)
    assert "undefined symbol: _ZN3c106detail14torchCheckFailEv" in message
    assert f"built against another torch than this one (torch {torch.__version__})" in message
    assert "`pip install --no-build-isolation .`" in message


def test_a_missing_build_says_how_to_build():
    message = load_failure_message(ModuleNotFoundError("No module named 'purified_ops._C'"))
    assert "No module named 'purified_ops._C'" in message and "another torch" not in message
    assert "`pip install --no-build-isolation .`" in message


BROKEN_EXTENSION = """
import importlib.abc, sys, warnings
import torch

class Broken(importlib.abc.MetaPathFinder):  # the import error a wheel built for another torch gives
    def find_spec(self, name, path, target=None):
        if name == "purified_ops._C":
            raise ImportError("_C.so: undefined symbol: _ZN3c1015SmallVectorBaseIjE8grow_podEPKvmm")

sys.meta_path.insert(0, Broken())
import purified_ops
assert not purified_ops.build_info()["extension_loaded"]
x, z = torch.randn(3, 8), torch.randn(3, 8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = purified_ops.purify(x, z)
    purified_ops.purify(x, z)
torch.testing.assert_close(y, purified_ops.purify(x, z, backend="reference"))
print(len(caught))
print(caught[0].message)
"""


def test_a_broken_extension_warns_once_with_the_cause_and_the_fix():
    out = run_python(["-c", BROKEN_EXTENSION])
    assert out.returncode == 0, out.stderr
    count, message = out.stdout.split("\n", 1)
    assert count == "1"
    assert "falling back to the pure-PyTorch reference" in message and "undefined symbol" in message
    assert "`pip install --no-build-isolation .`" in message


def test_demo_without_its_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail as if not installed
    assert cli.main(["demo", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "purified-ops demo needs scikit-learn, not installed here: pip install 'purified-ops[demo]'"


def test_plots_without_matplotlib_say_what_to_install(tmp_path):
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['plot.py', {str(tmp_path / 'none.csv')!r}]; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'plot.py')!r}, run_name='__main__')")
    out = run_python(["-c", code])
    assert out.returncode == 1
    assert "benchmarks/plot.py needs matplotlib, not installed here: pip install 'purified-ops[bench]'" in out.stderr
