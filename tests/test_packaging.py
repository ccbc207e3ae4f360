"""Loading the extension (the CPU capability chosen, messages when it does not load) and the
messages of commands whose optional packages are missing."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import purified_ops
from purified_ops import _extension, _settings, cli
from purified_ops._extension import choose_cpu_capability, load_failure_message
from purified_ops._settings import CPU_CAPABILITIES

CAPABILITY_ENV = _settings.CPU_CAPABILITY

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
    with pytest.raises(ImportError, match="no CPU kernels for this CPU: built for AVX2"):
        choose_cpu_capability(("AVX2",), "DEFAULT")


@needs_extension
def test_the_chosen_capability_is_torchs_and_the_only_one_loaded():
    assert INFO["cpu_capabilities"][0] == "DEFAULT" and set(INFO["cpu_capabilities"]) <= set(CPU_CAPABILITIES)
    want = choose_cpu_capability(INFO["cpu_capabilities"], _extension.torch_cpu_capability(),
                                 _settings.cpu_capability(os.environ))
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


@needs_extension
def test_capability_names_are_taken_as_torch_spells_them():
    """torch takes ATEN_CPU_CAPABILITY=avx2 (lower case); so does PURIFIED_OPS_CPU_CAPABILITY."""
    capability = "AVX2" if "AVX2" in USABLE else "DEFAULT"
    out = run_python(["scripts/check_install.py", "--capability", capability], **{CAPABILITY_ENV: capability.lower()})
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("parse, value, parsed", [
    (_settings.cpu_capability, "avx2", "AVX2"), (_settings.cpu_capability, "AVX512", "AVX512"),
    (_settings.cpu_capability, " default ", "DEFAULT"), (_settings.cpu_capability, "", None),
    (_settings.cpu_cache_mb, "0", 0), (_settings.cpu_cache_mb, "2048", 2048), (_settings.cpu_cache_mb, "", None),
    (_settings.streaming_stores, "0", False), (_settings.streaming_stores, "1", True),
    (_settings.cuda_emulation, "asan", "asan"), (_settings.cuda_emulation, "", "0"),
])
def test_settings_parse_what_they_take(parse, value, parsed):
    name = {_settings.cpu_capability: CAPABILITY_ENV, _settings.cpu_cache_mb: _settings.CPU_CACHE_MB,
            _settings.streaming_stores: _settings.STREAMING_STORES, _settings.cuda_emulation: _settings.CUDA_EMU}[parse]
    assert parse({name: value}) == parsed
    assert parse({}) == parse({name: ""})  # unset and empty alike


INVALID_SETTINGS = [
    (CAPABILITY_ENV, "sse2", "one of default, avx2, avx512 (any case)"),
    (CAPABILITY_ENV, "avx", "one of default, avx2, avx512 (any case)"),
    (_settings.CPU_CACHE_MB, "abc", "a whole number of MiB from 0 (no cache)"),
    (_settings.CPU_CACHE_MB, "-1", "a whole number of MiB from 0 (no cache)"),  # not "unlimited"
    (_settings.CPU_CACHE_MB, "1.5", "a whole number of MiB"),
    (_settings.CPU_CACHE_MB, str(2**44), "a whole number of MiB"),  # more bytes than a size_t holds
    (_settings.STREAMING_STORES, "yes", "0 (never) or 1 (always)"),
    (_settings.CUDA_EMU, "on", "0, 1 or asan"),
]


@pytest.mark.parametrize("name, value, allowed", INVALID_SETTINGS)
def test_an_invalid_setting_is_rejected_when_the_extension_loads(monkeypatch, name, value, allowed):
    """Each variable is parsed once, when the extension loads, and an invalid value raises there,
    naming the variable, the value and what it takes (not at the first large call, not ignored)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name} must be {re.escape(allowed)}.*got {re.escape(repr(value))}"):
        _extension.load()


@needs_extension
@pytest.mark.parametrize("streaming", ["0", "1"])
def test_streaming_stores_setting_changes_no_result(streaming, tmp_path):
    """PURIFIED_OPS_STREAMING_STORES reaches the kernels (1: non-temporal stores for these small
    outputs too, 0: for none) and changes how outputs are written, not what."""
    code = ("import torch, purified_ops as p; g = torch.Generator().manual_seed(0); "
            "x, z = (torch.randn(*s, generator=g, requires_grad=True) for s in ((512, 1024), (512, 2, 1024))); "
            "y = p.purify(x, z); y.backward(torch.ones_like(y)); "
            "torch.save((y.detach(), x.grad, z.grad), __import__('sys').argv[1])")
    results = []
    for value in (None, streaming):
        path = tmp_path / f"streaming_{value}.pt"
        out = run_python(["-c", code, str(path)], **{_settings.STREAMING_STORES: value})
        assert out.returncode == 0, out.stderr
        results.append(torch.load(path))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_an_invalid_setting_fails_the_import_with_the_reason():
    out = run_python(["-c", "import purified_ops"], **{_settings.CPU_CACHE_MB: "abc"})
    assert out.returncode != 0
    assert (f"SettingError: {_settings.CPU_CACHE_MB} must be a whole number of MiB from 0 (no cache) to "
            f"{_settings.MAX_CPU_CACHE_MB}, got 'abc'") in out.stderr


def test_the_command_says_an_invalid_setting_in_one_line():
    """The command exits with status 2 and the setting's one-line reason, not a traceback (its entry
    point lies outside the package, whose import raises)."""
    with pytest.raises(_settings.SettingError) as setting:
        _settings.cpu_cache_mb({_settings.CPU_CACHE_MB: "abc"})
    message = f"purified-ops: error: {setting.value}\n"
    script = Path(sys.executable).with_name("purified-ops")  # the installed command, where there is one
    commands = [["-m", "purified_ops_cli", "info"]] + ([[str(script), "info"]] if script.exists() else [])
    # run_python runs sys.executable with these arguments: the script is a Python file too.
    for command in commands:
        out = run_python(command, **{_settings.CPU_CACHE_MB: "abc"})
        assert (out.returncode, out.stdout, out.stderr) == (2, "", message), command
    out = run_python(["-m", "purified_ops_cli", "info"])  # without it the command runs
    assert out.returncode == 0 and "backends:" in out.stdout, out.stderr


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
