"""`purified-ops verify` / purified_ops.testing.verify: passes on this build, fails (non-zero exit,
the failing case named) on a deliberately wrong backend, --json parses, --quick is a subset."""
import json
import os
import subprocess
import sys

import pytest
import torch

import purified_ops
from purified_ops import _extension, _settings, cli, testing
from purified_ops.testing import Backend, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.purified_ops


def _key(row):
    return row.backend, row.case, row.dtype


# The cases of docs/DESIGN.md's accuracy statement and of the scale of z (in --quick too).
NUMERICS_CASES = ("ill-conditioned G, y and gradients per row / scale", "K=16 D=32 rank 5 dependent z, y per row / |x|",
                  "K=4 D=7 |z| ~ 2^70", "K=4 D=7 |z| ~ 2^30, |x| ~ 2^80", "K=4 D=7 |z| ~ 2^600",
                  "K=4 D=7 |z| ~ 2^350, |x| ~ 2^700")

# The CPU kernels' capabilities that can run here (compiled, and not above what torch chose).
USABLE_CAPABILITIES = [c for c in purified_ops.build_info().get("cpu_capabilities", ())
                       if _extension.CPU_CAPABILITIES.index(c)
                       <= _extension.CPU_CAPABILITIES.index(_extension.torch_cpu_capability())]


@pytest.fixture(scope="module")
def full_report():
    return verify(device="cpu")


def test_passes_on_this_build(full_report):
    assert full_report.passed, full_report.verdict
    assert "cpu" in full_report.backends
    cases = {r.case for r in full_report.rows if r.backend == "cpu"}
    for expected in ("K=24 D=1000", "K=16 D=7 |z|^2~eps", "K=2 D=1 rank-deficient, y per row / |x|",
                     "K=4 D=1000 nearly dependent z, y per row / |x|", *NUMERICS_CASES):
        assert expected in cases
    assert any(c.startswith("gradcheck+gradgradcheck") for c in cases)
    assert any(c.startswith("opcheck purify_backward") for c in cases)
    assert any(c.startswith("bitwise determinism") for c in cases)
    assert {r.dtype for r in full_report.rows} >= {"float64", "float32", "float16", "bfloat16"}


def test_quick_is_a_subset_of_the_default(full_report):
    quick = verify(device="cpu", quick=True)
    assert quick.passed, quick.verdict
    quick_keys, full_keys = {_key(r) for r in quick.rows}, {_key(r) for r in full_report.rows}
    assert quick_keys < full_keys


def _perturbed(which, factor=1 + 1e-3):
    """The compiled CPU ops with one result scaled by `factor`: a deliberately wrong backend."""
    def forward(x, z, s, eps):
        y, coeff, chol = OPS.purify_forward(x, z, s, eps)
        return (y * factor if which == "y" else y), coeff, chol

    def backward(*args):
        out = dict(zip(("dx", "dz", "dstrength"), OPS.purify_backward(*args)))
        if which in out:
            out[which] = out[which] * factor
        return out["dx"], out["dz"], out["dstrength"]

    return Backend(f"cpu-wrong-{which}", "cpu", forward, backward)


@pytest.mark.parametrize("which", ["y", "dx", "dz", "dstrength"])
def test_a_wrong_backend_fails_with_the_case_named(which):
    report = verify(dtypes=["float32", "float64"], quick=True, backends=[_perturbed(which)])
    assert not report.passed
    failed = report.failures
    accuracy = [r for r in failed if r.case.startswith("K=")]
    assert accuracy and all(r.detail.startswith(which + ",") for r in accuracy)
    assert {r.dtype for r in accuracy} == {"float32", "float64"}
    assert f"cpu-wrong-{which} {accuracy[0].case}" in report.verdict
    # the same ops unperturbed pass: the failure is the perturbation's
    assert verify(dtypes=["float32"], quick=True, backends=[_perturbed(which, 1.0)]).passed


def test_a_gradient_error_fails_gradcheck_and_plain_callables_are_not_opchecked():
    report = verify(dtypes=["float64"], backends=[_perturbed("dz", 1.05)])
    gradcheck = [r for r in report.rows if r.case.startswith("gradcheck")]
    assert gradcheck and not any(r.passed for r in gradcheck)
    assert "Jacobian mismatch" in gradcheck[0].detail
    (opcheck,) = [r for r in report.rows if r.case == "opcheck"]
    assert not opcheck.passed and "not registered" in opcheck.detail


def test_nan_and_raising_backends_fail_and_the_report_is_json():
    nan = Backend("cpu-nan", "cpu", lambda *a: (OPS.purify_forward(*a)[0] * float("nan"), *OPS.purify_forward(*a)[1:]),
                  OPS.purify_backward)

    def broken(*args):
        raise RuntimeError("kernel exploded")

    raising = Backend("cpu-raising", "cpu", OPS.purify_forward, broken)
    report = verify(dtypes=["float32"], quick=True, backends=[nan, raising])
    assert not report.passed
    by_backend = {name: [r for r in report.rows if r.backend == name] for name in ("cpu-nan", "cpu-raising")}
    assert all(not r.passed for r in by_backend["cpu-nan"] if r.case.startswith("K="))
    assert any("kernel exploded" in r.detail for r in by_backend["cpu-raising"])
    parsed = json.loads(report.to_json())  # strict JSON: NaN becomes "nan"
    assert parsed["passed"] is False and "nan" in {r["error"] for r in parsed["rows"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where no CUDA device exists")
def test_no_backend_on_the_device_fails():
    report = verify(device="cuda", quick=True)
    assert not report.passed and report.backends == []
    assert "none available" in report.rows[0].detail


def test_without_the_compiled_extension_it_fails(monkeypatch):
    """Only the reference runs: there is nothing to verify, which an install check must not pass."""
    monkeypatch.setattr(testing.backends, "available_backends", lambda: ("reference",))
    monkeypatch.setattr(testing.backends, "emulated_cuda_ops", lambda: None)
    report = verify(quick=True)
    assert not report.passed and report.backends == [] and "no backend" in report.verdict


def test_cli_fails_on_a_wrong_backend(monkeypatch, capsys):
    monkeypatch.setattr(testing.matrix, "discover_backends", lambda device: [_perturbed("dx")])
    rc = cli.main(["verify", "--quick", "--dtypes", "float32", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert any(line.startswith("FAILED: cpu-wrong-dx K=1 D=7 float32: dx,") for line in out)
    assert out[-2].startswith("verify: FAIL")
    report = json.loads(out[-1])
    assert report["passed"] is False and report["backends"] == ["cpu-wrong-dx"]


def test_cli_outside_the_checkout(tmp_path):
    """`python -m purified_ops verify --quick --json` from another directory: the table first, the
    verdict, the JSON last; exit status 1 exactly when a check failed."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "purified_ops", "verify", "--quick", "--device", "cpu", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    failed = {(r["backend"], r["case"], r["dtype"]) for r in report["rows"] if not r["passed"]}
    assert not failed, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and report["passed"]
    assert "cpu" in report["backends"]
    assert lines[-2].startswith("verify: FAIL" if failed else "verify: PASS")
    assert lines[0].split()[:3] == ["backend", "case", "dtype"]


def test_unknown_dtype_or_device_is_an_error():
    with pytest.raises(ValueError, match="dtypes"):
        verify(dtypes=["int8"])
    with pytest.raises(ValueError, match="device"):
        verify(device="tpu")


def test_the_emulated_cuda_ops_are_a_cpu_backend_where_present(monkeypatch):
    monkeypatch.setattr(testing.backends, "emulated_cuda_ops", lambda: OPS)  # stands in for that build's namespace
    found = {b.name: b for b in testing.discover_backends("cpu")}
    assert found["cuda-emulated"].device == "cpu" and not found["cuda-emulated"].public
    assert "cuda-emulated" not in {b.name for b in testing.discover_backends("cuda")}
    report = verify(device="cpu", dtypes=["float32"], quick=True)
    assert "cuda-emulated" in report.backends
    assert any(r.backend == "cuda-emulated" and r.case.startswith("K=24") for r in report.rows)


@pytest.mark.parametrize("capability", USABLE_CAPABILITIES)
def test_accuracy_cases_pass_with_each_cpu_capability(capability):
    """`verify --quick` with the CPU kernels of each capability forced at import time (a fresh
    process each): the ill-conditioned, dependent-directions and large-magnitude cases pass with
    the DEFAULT (no AVX, no FMA), AVX2 and AVX-512 kernels alike."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", _settings.CPU_CAPABILITY: capability}
    proc = subprocess.run([sys.executable, "-m", "purified_ops", "verify", "--quick", "--device", "cpu",
                           "--dtypes", "float32", "float64", "--json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cpu_capability"] == capability
    cases = {r["case"] for r in report["rows"] if r["backend"] == "cpu"}
    assert set(NUMERICS_CASES) <= cases, sorted(cases)
    failed = [(r["case"], r["dtype"], r["detail"]) for r in report["rows"] if not r["passed"]]
    assert not failed and proc.returncode == 0, failed
