"""Forward and every gradient against the float64 reference, through each public entry point: well
conditioned, rank-deficient, ill-conditioned (the accuracy statement of docs/DESIGN.md), and at
magnitudes whose squares or products overflow the arithmetic dtype."""
import math

import pytest
import torch
from torch.func import jvp

import purified_ops
from purified_ops import PurifyFunction, PurifyLayer, reference

from purified_ops.testing import (TOLERANCE, conditioned_row_bound, error_scales, magnitude_errors,
                                  rank_deficient_bound, rank_deficient_in_float64, reference_in_float64, rel_err,
                                  rounding, row_err)

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
def test_matches_the_reference_in_float64(device, dtype, K, D, entry):
    layout = "per_sample" if K % 2 else "per_position"
    x, z, grad = _inputs(K, D, dtype, device, layout)
    strength = torch.tensor(0.75, dtype=reference.accumulate_dtype(dtype))  # a gradient has its input's dtype
    ours = _run(entry, x, z, strength, grad)
    assert ours[0].dtype == dtype and ours[0].shape == x.shape

    # Truth: float64 from the very same (rounded) inputs.
    x64, z64 = x.double().requires_grad_(), z.double().requires_grad_()
    s64 = strength.double().to(device).requires_grad_()
    true = (y := reference_in_float64(x64, z64, s64),) + torch.autograd.grad(y, (x64, z64, s64), grad.double())
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
        err = row_err(y, rank_deficient_in_float64(x, z), x).max().item()
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


# ---- Directions and features of any finite magnitude (docs/DESIGN.md, "The scale of z") ------

BACKENDS = ["compiled", "reference"]


def _public_run(backend):
    """run(x, z, g, s) -> (y, dx, dz, ds) through purify and autograd on one backend."""
    def run(x, z, g, s):
        xr, zr, sr = (t.detach().requires_grad_() for t in (x, z, s))
        y = purified_ops.purify(xr, zr, strength=sr, backend="auto" if backend == "compiled" else backend)
        return (y.detach(), *torch.autograd.grad(y, (xr, zr, sr), g))
    return run


# (z exponent, x exponent): |z|^2 overflows float32 from |z| ~ 2^64 (1e20 ~ 2^66),
# float64 from ~2^512; z.x overflows float32 at 2^30 x 2^80.
MAGNITUDES = {torch.float32: [(66, 0), (100, 0), (125, 0), (30, 80)],
              torch.bfloat16: [(66, 0), (120, 0), (30, 80)],
              torch.float64: [(512, 0), (600, 0), (1000, 0), (350, 700)]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 16, 20])
@pytest.mark.parametrize("dtype", list(MAGNITUDES), ids=str)
def test_large_directions_and_features_give_the_right_result(device, backend, dtype, K):
    """y and every gradient finite and within the dtype's bound, by the float64 reference of the same inputs
    scaled back by powers of two (the op is invariant to scaling z, eps aside, and linear in x)."""
    g = torch.Generator().manual_seed(K)
    D = 7 if K < 16 else 24
    x0, z0, gy = (torch.randn(*shape, generator=g).to(device, dtype) for shape in ((2, 3, D), (2, 1, K, D), (2, 3, D)))
    s = torch.tensor(0.75, dtype=reference.accumulate_dtype(dtype), device=device)
    for z_exp, x_exp in MAGNITUDES[dtype]:
        errors = magnitude_errors(_public_run(backend), x0, z0, gy, s, 1e-6, z_exp, x_exp)
        assert errors.pop("finite"), (z_exp, x_exp)
        for name, err in errors.items():
            assert err <= TOLERANCE[dtype], f"{name}: {err:.3g} at |z| 2^{z_exp}, |x| 2^{x_exp}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_reproducer_huge_directions_are_removed(device, backend):
    """purify(x, z * 1e20) returned x unchanged (K = 1) and NaN (K >= 2): |z|^2 overflowed."""
    be = "auto" if backend == "compiled" else backend
    torch.manual_seed(0)
    x = torch.randn(2, 8, device=device)
    for z in (torch.randn(2, 1, 8, device=device), torch.randn(2, 2, 8, device=device)):
        y = purified_ops.purify(x, z * 1e20, backend=be)
        assert torch.isfinite(y).all() and not torch.equal(y, x)
        torch.testing.assert_close(y, purified_ops.purify(x, z, backend=be), rtol=1e-5, atol=1e-5)


def test_large_directions_double_backward_and_forward_ad(device):
    """The double backward (reference.purify_backward, recorded) and forward AD
    (reference.purify_jvp) at |z| 2^70 in float32 equal the float64 ones at |z| ~ 1 (eps
    scaled alike), scaled back."""
    a = 70
    g = torch.Generator().manual_seed(3)
    x0, z0 = torch.randn(4, 6, generator=g), torch.randn(4, 3, 6, generator=g)
    tx, tz0 = torch.randn(4, 6, generator=g), torch.randn(4, 3, 6, generator=g)
    eps0 = 1e-6 * 2.0 ** (-2 * a)

    def second_order(x, z, eps, fn, z_exp):
        x, z = x.detach().requires_grad_(), z.detach().requires_grad_()
        gx, gz = torch.autograd.grad(fn(x, z, eps).pow(2).sum(), (x, z), create_graph=True)
        return (gx, gz, *torch.autograd.grad(gx.pow(2).sum() + (gz * 2.0 ** z_exp).pow(2).sum(), (x, z)))

    ours = second_order(x0.to(device), z0.to(device) * 2.0 ** a, 1e-6,
                        lambda x, z, e: purified_ops.purify(x, z, eps=e), a)
    true = second_order(x0.double(), z0.double(), eps0, lambda x, z, e: reference.purify(x, z, eps=e), 0)
    # d/dz at z0 2^a is 2^-a d/dz0 (and gz 2^a is gz0, so both second-order sums are the same)
    for name, o, t, f in zip(("gx", "gz", "ggx", "ggz"), ours, true, (1.0, 2.0 ** a, 1.0, 2.0 ** a)):
        assert torch.isfinite(o).all(), name
        assert rel_err(o.cpu() * f, t) <= 1e-4, (name, rel_err(o.cpu() * f, t))
    _, y_t = jvp(lambda x, z: purified_ops.purify(x, z), (x0.to(device), z0.to(device) * 2.0 ** a),
                 (tx.to(device), tz0.to(device) * 2.0 ** a))
    _, true_t = jvp(lambda x, z: reference.purify(x, z, eps=eps0), (x0.double(), z0.double()), (tx.double(), tz0.double()))
    assert torch.isfinite(y_t).all() and rel_err(y_t.cpu(), true_t) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_directions_stay_right(device, backend):
    """|z| ~ 2^-60: |z|^2 is far below eps, and y ~ x; the gradients (~ z / eps) are right too."""
    g = torch.Generator().manual_seed(5)
    x0, z0, gy = (torch.randn(*shape, generator=g).to(device) for shape in ((6, 9), (6, 3, 9), (6, 9)))
    errors = magnitude_errors(_public_run(backend), x0, z0, gy, torch.tensor(0.75, device=device), 1e-6, -60)
    assert errors.pop("finite")
    for name, err in errors.items():
        assert err <= TOLERANCE[torch.float32], (name, err)


# ---- The accuracy statement (docs/DESIGN.md, "Numbers that must hold") ---------------------

def _conditioned_family(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "near-square":  # random K in D = K + 1: cond(G) from ~10 to ~1e6
        K = [2, 4, 8, 16][seed % 4]
        x, z = torch.randn(n, K + 1, generator=g), torch.randn(n, K, K + 1, generator=g)
    elif kind == "nearly dependent":  # half the directions 1e-3 .. 1e-1 away from the others
        z = torch.randn(n, 4, 48, generator=g)
        delta = 10 ** (-1 - 2 * torch.rand(n, 1, 1, generator=g))
        z = torch.cat([z, z + delta * torch.randn(n, 4, 48, generator=g)], dim=1)
        x = torch.randn(n, 48, generator=g)
    else:  # well conditioned
        x, z = torch.randn(n, 300, generator=g), torch.randn(n, 6, 300, generator=g)
    return x, z, torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["well conditioned", "near-square", "nearly dependent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_error_within_the_conditioned_bound(device, backend, kind, dtype):
    """Per row, y, dx and dz within (r + 8 u cond(G)) max(1, |s|) of their scales, dstrength of
    sum |g_i p_i|, over random well- and ill-conditioned directions (four seeds, 64 rows each)."""
    run = _public_run(backend)
    for seed in range(4):
        x, z, gy = (t.to(device, dtype) for t in _conditioned_family(kind, 64, seed))
        s = torch.tensor(0.75, dtype=dtype, device=device)
        scales = error_scales(x, z, gy, 0.75)
        bound = conditioned_row_bound(dtype, scales["kappa"], 0.75)
        y, dx, dz, ds = run(x, z, gy, s)
        xt, zt, st = (t.detach().double().requires_grad_() for t in (x, z, s))
        yt = reference_in_float64(xt, zt, st)
        true = (yt.detach(), *torch.autograd.grad(yt, (xt, zt, st), gy.double()))
        errors = {"y": (y.double() - true[0]).norm(dim=-1) / scales["y"],
                  "dx": (dx.double() - true[1]).norm(dim=-1) / scales["dx"],
                  "dz": (dz.double() - true[2]).flatten(-2).norm(dim=-1) / scales["dz"]}
        for name, err in errors.items():
            worst = int((err / bound).argmax())
            assert err[worst] <= bound[worst], (f"{name}, seed {seed}, row {worst}: {err[worst]:.3g} > "
                                                f"{bound[worst]:.3g} (cond {scales['kappa'][worst]:.3g})")
        ds_err = abs(ds.item() - true[3].item()) / scales["ds"].item()
        assert ds_err <= bound.max().item(), ("dstrength", seed, ds_err)
