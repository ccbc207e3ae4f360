"""The numbers of docs/DESIGN.md that are not accuracy: exactness, finiteness, isolation, determinism,
no writes to inputs, and the layouts (strides, offsets, broadcasting, empty tensors)."""
import pytest
import torch

import purified_ops
from purified_ops import PurifyLayer, purify, reference

from purified_ops.testing import TOLERANCE, rel_err, reference_in_float64

DTYPES = list(TOLERANCE)  # float64, float32, float16, bfloat16


def _grads(x, z, strength=1.0, seed=0):
    x = x.detach().requires_grad_()
    z = z.detach().requires_grad_()
    y = purify(x, z, strength=strength)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    gx, gz = torch.autograd.grad(y, (x, z), g)
    return y, gx, gz


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_direction_is_identity(device, dtype):
    x = torch.randn(5, 4, 77, device=device).to(dtype)
    z = torch.zeros(5, 1, 3, 77, device=device, dtype=dtype)
    assert torch.equal(purify(x, z), x)
    assert torch.equal(purify(x, z, strength=0.3), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_and_dependent_directions_stay_finite(device, dtype):
    z1 = torch.randn(6, 1, 50, device=device) * 100  # |z|^2 ~ 5e5 >> eps: rounding could break Cholesky
    z = torch.cat([z1, z1, 2 * z1, -z1], dim=1).to(dtype)  # K = 4, rank 1
    x = torch.randn(6, 50, device=device).to(dtype)
    y, gx, gz = _grads(x, z)
    for t in (y, gx, gz):
        assert torch.isfinite(t).all()
    # Still the projection onto the one direction: y orthogonal to z1.
    cos = (y.double() * z1.double().squeeze(1)).sum(-1) / (y.double().norm(dim=-1) * z1.double().squeeze(1).norm(dim=-1))
    assert cos.abs().max() < {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 5e-2)


def test_nan_stays_in_its_row(device):
    x = torch.randn(8, 33, device=device)
    z = torch.randn(8, 2, 33, device=device)
    x[3, 5] = float("nan")
    z[6, 1, 7] = float("nan")
    y, gx, gz = _grads(x, z)
    bad = torch.zeros(8, dtype=torch.bool)
    bad[[3, 6]] = True
    assert y.isnan().any(1).cpu()[bad].all()  # y of a NaN row is NaN (dx needn't be: it doesn't involve x)
    for t in (y, gx, gz.flatten(1)):
        assert not t.isnan().flatten(1).any(1).cpu()[~bad].any()


def test_nan_stays_in_its_row_with_shared_z(device):
    x = torch.randn(4, 6, 33, device=device)
    z = torch.randn(4, 1, 33, device=device)
    x[1, 2, 0] = float("nan")
    y, gx, gz = _grads(x, z)
    assert y[1, 2].isnan().all() and not y[1, [0, 1, 3, 4, 5]].isnan().any() and not y[[0, 2, 3]].isnan().any()
    assert not gx[[0, 2, 3]].isnan().any()
    # The shared z row of sample 1 sums over its rows, so only its gradient sees the NaN.
    assert gz[1].isnan().any() and not gz[[0, 2, 3]].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inputs_never_written(device, dtype):
    x = torch.randn(3, 5, 64, device=device).to(dtype).requires_grad_()
    z = torch.randn(3, 1, 2, 64, device=device).to(dtype).requires_grad_()
    s = torch.tensor(0.5, device=device, requires_grad=True)
    before = [t.detach().clone() for t in (x, z, s)]
    versions = [t._version for t in (x, z, s)]
    y = purify(x, z, strength=s)
    g = torch.randn_like(y)
    g_before = g.clone()
    y.backward(g)
    for t, b, v in zip((x, z, s), before, versions):
        assert torch.equal(t.detach(), b) and t._version == v
    assert torch.equal(g, g_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(device, dtype):
    # Shared z rows exercise the partial-sum reduction of dz.
    x = torch.randn(4, 300, 129, device=device).to(dtype)
    z = torch.randn(4, 1, 3, 129, device=device).to(dtype)
    s = torch.tensor(0.8, device=device)
    runs = []
    for _ in range(3):
        ss = s.clone().requires_grad_()
        y, gx, gz = _grads(x, z, strength=ss)
        runs.append((y, gx, gz))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_bitwise_deterministic_across_thread_counts():
    x = torch.randn(2, 500, 96)
    z = torch.randn(2, 1, 2, 96)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_grads(x, z))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


LAYOUTS = {
    "transposed": lambda d: (torch.randn(40, 6, device=d).t(), torch.randn(40, 6, device=d).t()),
    "offset": lambda d: (torch.randn(7, 41, device=d)[:, 1:], torch.randn(7, 2, 41, device=d)[:, :, 1:]),
    "row_step": lambda d: (torch.randn(14, 40, device=d)[::2], torch.randn(7, 3, 80, device=d)[..., ::2]),
    "expanded_z": lambda d: (torch.randn(5, 9, 40, device=d), torch.randn(1, 1, 40, device=d).expand(5, 9, 40)),
    "permuted": lambda d: (torch.randn(9, 5, 40, device=d).transpose(0, 1), torch.randn(9, 1, 2, 40, device=d).transpose(0, 1)),
    "interleaved_broadcast": lambda d: (torch.randn(3, 4, 5, 6, 24, device=d), torch.randn(3, 1, 5, 1, 2, 24, device=d)),
    "fully_shared": lambda d: (torch.randn(1000, 24, device=d), torch.randn(1, 3, 24, device=d)),
    "scalar_rows": lambda d: (torch.randn(24, device=d), torch.randn(2, 24, device=d)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_any_strides_equal_contiguous(device, layout):
    x, z = LAYOUTS[layout](device)
    y, gx, gz = _grads(x, z, strength=0.9)
    yc, gxc, gzc = _grads(x.contiguous(), z.contiguous(), strength=0.9)
    for a, b in ((y, yc), (gx, gxc), (gz, gzc)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert rel_err(y, reference_in_float64(x, z, 0.9)) < 1e-5


def test_more_leading_dims_than_the_row_grid_holds(device, many_dims):
    x, z = many_dims(device)

    def run(x, z):
        x, z = x.detach().requires_grad_(), z.detach().requires_grad_()
        s = torch.tensor(0.9, device=device, requires_grad=True)
        y = purify(x, z, strength=s)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        return (y, *torch.autograd.grad(y, (x, z, s), g))

    got, contiguous = run(x, z), run(x.contiguous(), z.contiguous())
    for a, b in zip(got, contiguous):
        assert a.shape == b.shape and torch.equal(a, b)
    assert rel_err(got[0], reference_in_float64(x, z, 0.9)) < 1e-5


@pytest.mark.parametrize("shapes", [((0, 8), (0, 2, 8)), ((0, 8), (1, 8)), ((4, 0), (4, 3, 0)),
                                    ((2, 0, 5), (2, 1, 5)), ((3, 4, 0), (1, 4, 2, 0)),
                                    ((0, 16), (0, 20, 16)), ((4, 0), (4, 20, 0))])  # K > 16 too
def test_empty(device, shapes):
    xs, zs = shapes
    x = torch.randn(xs, device=device, requires_grad=True)
    z = torch.randn(zs, device=device, requires_grad=True)
    s = torch.tensor(1.0, device=device, requires_grad=True)
    y = purify(x, z, strength=s)
    assert y.shape == x.shape
    gx, gz, gs = torch.autograd.grad(y.sum(), (x, z, s))
    assert gx.shape == x.shape and gz.shape == z.shape and gs.shape == ()
    assert not gz.any() and gs.item() == 0


def test_strength_zero_and_one(device):
    x = torch.randn(10, 20, device=device, dtype=torch.float64)
    z = torch.randn(10, 3, 20, device=device, dtype=torch.float64)
    assert torch.equal(purify(x, z, strength=0.0), x)
    y = purify(x, z, strength=1.0, eps=1e-12)
    assert (z @ y.unsqueeze(-1)).abs().max() < 1e-9  # orthogonal to every direction


def test_mixed_dtypes_promote(device):
    x = torch.randn(4, 16, device=device, dtype=torch.bfloat16)
    z = torch.randn(4, 16, device=device, dtype=torch.float32)
    y = purify(x, z)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, purify(x.float(), z))
    xr = x.detach().requires_grad_()
    purify(xr, z).sum().backward()
    assert xr.grad.dtype == torch.bfloat16


def test_cpu_scalar_strength_with_other_device(device):
    x = torch.randn(4, 16, device=device)
    z = torch.randn(4, 16, device=device)
    s = torch.tensor(0.5, requires_grad=True)  # a CPU scalar, as torch binary ops allow
    purify(x, z, strength=s).sum().backward()
    assert s.grad is not None and s.grad.device.type == "cpu"


def test_backends_agree(device):
    x = torch.randn(3, 7, 50, device=device, dtype=torch.float64)
    z = torch.randn(3, 1, 2, 50, device=device, dtype=torch.float64)
    torch.testing.assert_close(purify(x, z, backend=device), purify(x, z, backend="reference"))
    torch.testing.assert_close(purify(x, z, backend="auto"), reference.purify(x, z))


def test_available_backends_and_build_info():
    backends = purified_ops.available_backends()
    assert "reference" in backends and "cpu" in backends
    info = purified_ops.build_info()
    assert info["extension_loaded"] and info["openmp"]
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
