"""Forward and every gradient against the float64 truth, through each public entry point."""
import pytest
import torch

import purified_ops
from purified_ops import PurifyFunction, PurifyLayer, reference

from purified_ops.testing import TOLERANCE, rank_deficient_bound, rel_err, rounding, row_err, truth, truth_rank_deficient

DTYPES = list(TOLERANCE)  # float64, float32, float16, bfloat16
KS = [1, 2, 5, 16, 20]
DS = [1, 3, 127, 1000]


def _inputs(K, D, dtype, device, layout):
    g = torch.Generator().manual_seed(1000 * K + D)
    x = torch.randn(2, 3, D, generator=g).to(device, dtype)
    if layout == "per_sample":  # one z per sample, shared by its 3 rows
        z = torch.randn(2, 1, K, D, generator=g)
    else:  # one z per position, shared by the 2 samples
        z = torch.randn(1, 3, K, D, generator=g)
    if K >= D:
        # K >= D directions span R^D: with |z|^2 >> eps the output is ~eps/|z|^2 of x, a
        # cancellation no float32 evaluation resolves (test_rank_deficient covers that regime).
        # With |z|^2 ~ eps the Gram matrix is well conditioned and DESIGN's bounds apply.
        z = z * 1e-3
    z = z.to(device, dtype)
    if K == 1 and layout == "per_sample":
        z = z.squeeze(-2)  # the [..., D] form of a single direction
    grad = torch.randn(2, 3, D, generator=g).to(device, dtype)
    return x, z, grad


def _run(entry, x, z, strength, grad):
    """Output and gradients (x, z, strength) of one entry point."""
    x = x.detach().requires_grad_()
    z = z.detach().requires_grad_()
    if entry == "layer":
        layer = PurifyLayer(strength=float(strength), learnable_strength=True).to(x.device, strength.dtype)
        y = layer(x, z)
        s = layer.strength
    else:
        s = strength.detach().to(x.device).requires_grad_()
        y = PurifyFunction.apply(x, z, s, 1e-6)[0] if entry == "function" else purified_ops.purify(x, z, strength=s)
    gx, gz, gs = torch.autograd.grad(y, (x, z, s), grad)
    return y, gx, gz, gs


@pytest.mark.parametrize("entry", ["function", "purify", "layer"])
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_truth(device, dtype, K, D, entry):
    layout = "per_sample" if K % 2 else "per_position"
    x, z, grad = _inputs(K, D, dtype, device, layout)
    strength = torch.tensor(0.75, dtype=reference.accumulate_dtype(dtype))  # a gradient has its input's dtype
    ours = _run(entry, x, z, strength, grad)
    assert ours[0].dtype == dtype and ours[0].shape == x.shape

    # Truth: float64 from the very same (rounded) inputs.
    x64, z64 = x.double().requires_grad_(), z.double().requires_grad_()
    s64 = strength.double().to(device).requires_grad_()
    true = (y := truth(x64, z64, s64),) + torch.autograd.grad(y, (x64, z64, s64), grad.double())
    for name, o, t in zip(["y", "dx", "dz", "dstrength"], ours, true):
        err = rel_err(o, t)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3g} ({dtype}, K={K}, D={D}, {entry})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rank_deficient_is_stable(device, dtype):
    """K >= D with |z|^2 >> eps: y is ~eps/|z|^2 of x. Its error is bounded relative to x, the
    scale of the computation (backward stability), rather than to the tiny y."""
    g = torch.Generator().manual_seed(7)
    for K, D in [(1, 1), (5, 3), (16, 3), (20, 1), (20, 3)]:
        x = torch.randn(64, D, generator=g).to(device, dtype)
        z = torch.randn(64, K, D, generator=g).to(device, dtype)
        y = purified_ops.purify(x, z)
        # The exact result through the D x D system, well conditioned here.
        err = row_err(y, truth_rank_deficient(x, z), x).max().item()
        assert err <= rank_deficient_bound(dtype, K), f"K={K}, D={D}: {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounding_check_tells_nearest_even_from_directed_rounding(dtype):
    # The check of the kernels' 16-bit outputs (scripts/check_install.py for each CPU capability,
    # tests/test_cuda.py for CUDA) on values rounded by torch, then moved one ulp where rounding
    # to nearest went away from zero (truncation) or toward it (rounding away from zero).
    exact = torch.randn(100_000, generator=torch.Generator().manual_seed(5))
    nearest = exact.to(dtype)
    away = nearest.abs() > exact.abs()
    truncated = torch.where(away, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    infinity = (float("inf") * exact.sign()).to(dtype)
    rounded_away = torch.where(~away & (nearest != exact), torch.nextafter(nearest, infinity), nearest)
    assert rounding("nearest", nearest, exact).passed
    for name, out in (("truncated", truncated), ("away from zero", rounded_away)):
        found = rounding(name, out, exact)
        assert found.worst == 1 and not found.passed, found
        assert abs(abs(found.toward_zero) - 0.5) < 0.05, found


CPU_KERNELS = purified_ops.ops._CPU  # the CPU kernels' module of the capability chosen here (None: not built)


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


@pytest.mark.skipif(CPU_KERNELS is None, reason="compiled extension not loaded")
def test_the_cpu_bfloat16_conversion_is_used_where_the_cpu_has_it():
    info = purified_ops.build_info()
    expected = "avx512_bf16" if info["cpu_capability"] == "AVX512" and _cpu_has_avx512_bf16() else "software"
    assert info["cpu_bf16_conversion"] == expected
    assert CPU_KERNELS.bf16_hardware_conversion() == (expected == "avx512_bf16")


@pytest.mark.skipif(CPU_KERNELS is None or purified_ops.build_info().get("cpu_bf16_conversion") != "avx512_bf16",
                    reason="the CPU kernels chosen here round bfloat16 in software (no AVX512_BF16 or not AVX512)")
def test_bfloat16_outputs_are_the_same_with_the_cpu_conversion():
    # VCVTNE2PS2BF16 rounds to nearest even but flushes subnormals to zero and keeps NaN
    # payloads: the kernels round vectors holding either in software, so every output is
    # bitwise what the software rounding gives, here with subnormal, huge and NaN rows.
    g = torch.Generator().manual_seed(7)
    scale = torch.tensor([1.0, 1e-37, 4e-39, 1e37]).repeat_interleave(8)[:, None]
    layouts = {"z per row": ((32, 200), (32, 3, 200)), "z shared": ((4, 8, 200), (4, 1, 3, 200))}
    for layout, (xs, zs) in layouts.items():
        x = (torch.randn(*xs, generator=g) * scale.reshape(*xs[:-1], 1)).to(torch.bfloat16)
        gy = (torch.randn(*xs, generator=g) * scale.reshape(*xs[:-1], 1)).to(torch.bfloat16)
        z = torch.randn(*zs, generator=g).to(torch.bfloat16)
        x.view(-1, xs[-1])[5, 7] = float("nan")
        results = []
        for hardware in (True, False):
            CPU_KERNELS.set_bf16_hardware_conversion(hardware)
            try:
                y, coeff, chol = torch.ops.purified_ops.purify_forward(x, z, torch.tensor(0.75), 1e-6)
                dx, dz, _ = torch.ops.purified_ops.purify_backward(gy, x, z, torch.tensor(0.75), coeff, chol, True)
            finally:
                CPU_KERNELS.set_bf16_hardware_conversion(True)
            results.append([t.view(torch.int16) for t in (y, dx, dz)])
        for name, a, b in zip(("y", "dx", "dz"), *results):
            assert torch.equal(a, b), f"{layout}: {name} differs where {(a != b).sum()} elements"
        y = results[0][0].view(torch.bfloat16)
        subnormal = (y != 0) & (y.abs() < torch.finfo(torch.bfloat16).tiny)
        assert subnormal.sum() > 100 and y.isnan().any() and (y.abs() > 1e36).any()
