"""Workflows beyond one training step: modes before training, torch.func and forward-mode AD,
fake tensors and tracing, dynamic shapes, dependent directions, eps at the dtype's limits, and
the odd inputs (sparse, scripting, raw ops with grad)."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import purified_ops
from purified_ops import PurifyFunction, PurifyLayer, purify, reference
from purified_ops.ops import emulated_cuda_ops

from purified_ops.testing import (TOLERANCE, dependent_row_bound, rank_deficient_in_float64, rel_err, row_err,
                                  span_condition)


def _f64(device, *shape):
    return torch.randn(*shape, dtype=torch.float64, device=device)


# ---- No tensor outlives the mode it was made in -------------------------------------------

@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_a_pass_under_a_mode_then_training(device, mode):
    layer = PurifyLayer(0.7)
    x, z = torch.randn(4, 16, device=device), torch.randn(4, 2, 16, device=device)
    with getattr(torch, mode)():
        layer(x, z)
    xr = x.clone().requires_grad_()
    layer(xr, z).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_fake_tensor_mode_then_real_calls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, z = torch.randn(3, 8), torch.randn(3, 2, 8)
    with FakeTensorMode() as mode:
        purify(mode.from_tensor(x), mode.from_tensor(z), strength=0.3)
    torch.testing.assert_close(purify(x, z, strength=0.3), reference.purify(x, z, strength=0.3))


def test_first_jit_trace_of_a_layer():
    layer = PurifyLayer(0.6)  # a strength never seen before in this process
    x, z = torch.randn(4, 8), torch.randn(4, 2, 8)
    traced = torch.jit.trace(layer, (x, z))
    torch.testing.assert_close(traced(x, z), layer(x, z))


# ---- torch.func and forward-mode AD give what the reference gives --------------------------

def _inputs(device):
    torch.manual_seed(0)
    return _f64(device, 3, 5, 9), _f64(device, 3, 1, 2, 9), torch.tensor(0.7, dtype=torch.float64, device=device)


def _both(fn):
    """fn applied to purify and to the reference: (ours, theirs)."""
    return (fn(lambda x, z, s=1.0: purify(x, z, strength=s)),
            fn(lambda x, z, s=1.0: reference.purify(x, z, strength=s)))


def _assert_all_close(a, b):
    for u, v in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(u, v)


def test_jvp_of_x_z_and_strength(device):
    x, z, s = _inputs(device)
    tangents = (torch.randn_like(x), torch.randn_like(z), torch.tensor(0.3, dtype=torch.float64, device=device))
    ours, ref = _both(lambda f: torch.func.jvp(f, (x, z, s), tangents))
    assert ref[1].abs().max() > 0.1
    _assert_all_close(ours, ref)
    # One tangent at a time, including a one-direction z ([..., D]).
    z1 = _f64(device, 3, 5, 9)
    t1 = torch.randn_like(z1)
    ours, ref = _both(lambda f: torch.func.jvp(lambda a: f(x, a), (z1,), (t1,)))
    _assert_all_close(ours, ref)


@pytest.mark.parametrize("transform", ["jacfwd", "jacrev", "hessian"])
def test_jacobians_and_hessian(device, transform):
    x, z, s = _inputs(device)
    x, z = x[0, :2], z[0, 0]  # small: a Hessian of 2 x 9 + 2 x 9 inputs
    fn = getattr(torch.func, transform)
    if transform == "hessian":
        ours, ref = _both(lambda f: fn(lambda a, b: f(a, b, s).pow(2).sum(), argnums=(0, 1))(x, z))
    else:
        ours, ref = _both(lambda f: fn(f, argnums=(0, 1, 2))(x, z, s))
    _assert_all_close(ours, ref)


def test_grad_vmap_and_per_sample_gradients_without_warnings(device):
    x, z, s = _inputs(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "batching rule not implemented" fallback
        ours, ref = _both(lambda f: torch.func.grad(lambda a, b, c: f(a, b, c).pow(2).sum(), argnums=(0, 1, 2))(x, z, s))
        _assert_all_close(ours, ref)
        # (x, z, in_dims): both batched, z shared, x shared, a batch dim inside, a one-direction z
        for xx, zz, dims in [(x, z, (0, 0)), (x, z[0], (0, None)), (x[0], z, (None, 0)), (x, z[0], (1, None)),
                             (x, z[:, 0, 0].unsqueeze(1), (0, 0))]:
            ours, ref = _both(lambda f: torch.func.vmap(f, in_dims=dims)(xx, zz))
            _assert_all_close(ours, ref)
        strengths = torch.rand(3, dtype=x.dtype, device=device)
        ours, ref = _both(lambda f: torch.func.vmap(lambda a, b, c: f(a, b, c))(x, z, strengths))
        _assert_all_close(ours, ref)
        # Per-sample gradients of a layer with a learnable strength.
        layer = PurifyLayer(0.5, learnable_strength=True).to(device, torch.float64)
        params = {k: v.detach() for k, v in layer.named_parameters()}

        def loss(p, xi, zi):
            return torch.func.functional_call(layer, p, (xi, zi)).pow(2).sum()

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, z)
        for i in range(3):
            s_i = params["strength"].clone().requires_grad_()
            (g,) = torch.autograd.grad(reference.purify(x[i], z[i], strength=s_i).pow(2).sum(), s_i)
            torch.testing.assert_close(per_sample["strength"][i], g)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_forward_ad_dual_tensors(device, grad_mode):
    x, z, s = _inputs(device)
    tx, tz, ts = torch.randn_like(x), torch.randn_like(z), torch.tensor(-0.4, dtype=torch.float64, device=device)
    _, expect = torch.func.jvp(lambda a, b, c: reference.purify(a, b, strength=c), (x, z, s), (tx, tz, ts))
    with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
        y = purify(fwAD.make_dual(x, tx), fwAD.make_dual(z, tz), strength=fwAD.make_dual(s, ts))
        tangent = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(tangent, expect)


# ---- Dependent directions and K > D stay finite, as accurate as conditioning allows --------

DEPENDENT = [  # (K, D, rank): rank < K means dependent directions; K > D forces them
    (8, 64, 2), (4, 16, 1), (16, 32, 5), (16, 16, 15), (25, 16, 16), (42, 32, 32), (55, 50, 50),
    (100, 50, 50), (200, 50, 50)]


# Resolvable in float32: exactly dependent directions (rank < K <= D) with a well-conditioned span.
RESOLVABLE_IN_FLOAT32 = {(8, 64, 2), (4, 16, 1), (16, 32, 5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", DEPENDENT, ids=lambda c: "K%d-D%d-r%d" % c)
def test_dependent_directions_and_k_above_d_are_finite_and_bounded(device, dtype, case):
    K, D, rank = case
    g = torch.Generator().manual_seed(K * 1000 + D)
    z = (torch.randn(6, K, rank, generator=g) @ torch.randn(6, rank, D, generator=g)).to(device, dtype)
    x = torch.randn(6, D, generator=g).to(device, dtype)
    xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()
    y = purify(xr, zr)
    gx, gz = torch.autograd.grad(y.pow(2).sum(), (xr, zr))
    for t in (y, gx, gz):
        assert torch.isfinite(t).all()
    x64 = x.double()
    # A projection never grows x, however unresolvable G is in this precision.
    assert (y.double().norm(dim=-1) <= 1.01 * x64.norm(dim=-1)).all()
    # Against the float64 reference from the same (rounded) inputs, relative to |x|: float64 always;
    # float32 where the dependence is resolvable in float32 (docs/accuracy.md, "Numbers that hold").
    if dtype == torch.float64 or (dtype == torch.float32 and case in RESOLVABLE_IN_FLOAT32):
        err = ((y.double() - reference.purify(x64, z.double())).norm(dim=-1) / x64.norm(dim=-1)).max().item()
        assert err <= {torch.float64: 1e-8, torch.float32: 1e-4}[dtype], err


def test_issue_reproducer_dependent_rows_float32(device):
    torch.manual_seed(3)
    z = (torch.randn(4, 8, 2) @ torch.randn(4, 2, 64)).to(device)
    x = torch.randn(4, 64).to(device)
    for backend in ("auto", "reference"):
        assert torch.isfinite(purify(x, z, backend=backend)).all()


def _float32_forward(backend):
    """y = purify(x, z) in float32 through one backend: the public CPU and reference paths, or
    the CUDA kernels emulated on the CPU (skipped where that build is absent)."""
    if backend != "cuda-emulated":
        return lambda x, z: purify(x, z, backend=backend)
    emu = emulated_cuda_ops()
    if emu is None:
        pytest.skip("the emulated CUDA backend is not built (PURIFIED_OPS_CUDA_EMU=1)")
    return lambda x, z: emu.purify_forward(x, z, torch.tensor(1.0), 1e-6)[0]


# Dependent directions below float32's resolution (|z|^2 >> eps): K < D of low rank, K > D, and
# K = 16 (the largest fused K) in D = 15. A pivot kept at noise level would turn the dependent
# direction's coefficient into noise / floor: errors up to 27 |x| in these rows. (K = 16 in
# D = 15 and K = 20 in D = 16 over 512 rows: at 2048 rows one row of each, of span condition
# 1e5, is 1.5 and 1.9 |x| off.)
@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda-emulated"])
@pytest.mark.parametrize("case", [(8, 64, 2, 2048), (16, 32, 5, 2048), (16, 15, 15, 512), (20, 16, 16, 512)],
                         ids=lambda c: "K%d-D%d-r%d-n%d" % c)
def test_dependent_directions_float32_error_within_span_conditioning(backend, case):
    K, D, rank, n = case
    forward = _float32_forward(backend)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, K, rank, generator=g) @ torch.randn(n, rank, D, generator=g)
    x = torch.randn(n, D, generator=g)
    exact = rank_deficient_in_float64(x, z) if K >= D else reference.purify(x.double(), z.double())
    err = row_err(forward(x, z), exact, x)
    bound = dependent_row_bound(torch.float32, K, span_condition(z, rank))
    worst = int((err / bound).argmax())
    assert err[worst] <= bound[worst], f"row {worst}: {err[worst]:.3g} > {bound[worst]:.3g}"


def test_factor_is_bounded_like_exact_cholesky():
    """The reference factor (the kernels' semantics) of a rank-2 Gram in float32: every entry
    other than a pivot within sqrt(G_ii), as in exact arithmetic (an unbounded factor grew past
    1e20); two pivots per row kept (within sqrt(G_jj)), the dependent six dropped
    (sqrt(G_jj) / u). The factor is in direction rows: direction i's pivot is the last nonzero
    entry of its row, at the step it was factored (reference.factor_order). The directions are
    small-integer combinations of two small-integer vectors, so G is exact in float32 whatever the
    order of its sums (the BLAS's): its rank is exactly 2, and what is left of a dependent pivot
    is the elimination's own rounding, a few u G_jj, below the drop threshold 4 K u G_jj."""
    g = torch.Generator().manual_seed(3)
    basis = torch.randint(-3, 4, (4, 2, 64), generator=g).float()
    coeffs = torch.randint(-3, 4, (4, 8, 2), generator=g).float()
    coeffs[..., 0] += (coeffs.abs().sum(-1) == 0).float()  # no zero direction
    z = coeffs @ basis
    assert torch.equal(z.double(), coeffs.double() @ basis.double())
    assert (torch.linalg.matrix_rank(z.double()) == 2).all()
    gram = z @ z.transpose(-1, -2) + 1e-6 * torch.eye(8)
    chol = reference.regularized_cholesky(gram, 1e-6)
    root = torch.diagonal(gram, dim1=-2, dim2=-1).sqrt()
    order = reference.factor_order(chol)
    step = torch.argsort(order, dim=-1)  # the step at which each direction was factored
    is_pivot = torch.nn.functional.one_hot(step, 8).bool()
    assert (chol.abs().masked_fill(is_pivot, 0) <= root.unsqueeze(-1) * (1 + 1e-6)).all()
    pivots = chol.gather(-1, step.unsqueeze(-1)).squeeze(-1)
    dropped = pivots == root / torch.finfo(torch.float32).eps
    assert (dropped | (pivots <= root * (1 + 1e-6))).all()
    assert (dropped.sum(-1) == 6).all(), dropped
    well = torch.randn(8, 64, dtype=torch.float64)  # well conditioned: exactly torch's factor
    g64 = well @ well.T + 1e-6 * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(reference.regularized_cholesky(g64, 1e-6), torch.linalg.cholesky(g64))


def test_pivoted_factor_reproduces_the_gram_in_direction_order():
    """Two nearly parallel directions first: the factorization passes over the second (its
    remaining pivot is ~1e-4 of its G_jj, below PIVOT_FRACTION) for the third, so the factor is
    not lower triangular, yet M M^T = G in direction order and the solve is G's."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 32, generator=g, dtype=torch.float64), torch.randn(3, 1, 32, generator=g, dtype=torch.float64)
    z = torch.cat([a, a + 0.01 * torch.randn(3, 1, 32, generator=g, dtype=torch.float64), b], dim=1)
    gram = z @ z.mT + 1e-6 * torch.eye(3, dtype=torch.float64)
    chol = reference.regularized_cholesky(gram, 1e-6)
    assert (reference.factor_order(chol) == torch.tensor([0, 2, 1])).all()
    assert not torch.equal(chol, chol.tril())
    torch.testing.assert_close(chol @ chol.mT, gram)
    rhs = torch.randn(3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(reference.cholesky_solve(chol, rhs), torch.linalg.solve(gram, rhs))


# ---- Repeated directions and tiny eps in the reference and the double backward -------------

def test_double_backward_and_reference_with_repeated_directions(device):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 9, device=device, requires_grad=True)
    z1 = 100 * torch.randn(3, 1, 1, 9, device=device)  # |z|^2 + eps rounds to |z|^2: G exactly singular
    z = torch.cat([z1, z1], -2)
    (gx,) = torch.autograd.grad(purify(x, z).pow(2).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(gx.pow(2).sum(), x)
    assert torch.isfinite(gx).all() and torch.isfinite(gg).all()
    y_ref = purify(x, z, backend="reference")
    assert torch.isfinite(y_ref).all()
    torch.testing.assert_close(y_ref, purify(x, z1.squeeze(-2)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_zero_z_with_the_smallest_eps_is_the_identity(device, backend):
    x = torch.randn(3, 8, device=device)
    for dtype, eps in [(torch.float32, torch.finfo(torch.float32).tiny), (torch.float64, 1e-300)]:
        xd = x.to(dtype)
        assert torch.equal(purify(xd, torch.zeros(3, 2, 8, device=device, dtype=dtype), eps=eps, backend=backend), xd)


# ---- eps must be a normal number of the arithmetic dtype -----------------------------------

@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1e-46), (torch.float32, 1e-39), (torch.bfloat16, 1e-40),
                                       (torch.float32, 1e39), (torch.float64, 1e-310)])
def test_eps_outside_the_normal_range_is_rejected_everywhere(dtype, eps):
    x, z = torch.randn(3, 8, dtype=dtype), torch.zeros(3, 2, 8, dtype=dtype)
    acc = reference.accumulate_dtype(dtype)
    tiny = f"{torch.finfo(acc).tiny:.6g}"
    for call in (lambda: purify(x, z, eps=eps), lambda: purify(x, z, eps=eps, backend="reference"),
                 lambda: PurifyLayer(eps=eps)(x, z)):
        with pytest.raises(ValueError, match=f"eps must be between {tiny}"):
            call()
    s = torch.tensor(1.0, dtype=acc)
    c10_name = {torch.float32: "Float", torch.float64: "Double"}[acc]
    with pytest.raises(ValueError, match=fr"purify_forward: eps must be a normal {c10_name} number, in \[{tiny}"):
        torch.ops.purified_ops.purify_forward(x, z, s, eps)


def test_float64_accepts_eps_below_float32_range():
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(purify(x, torch.zeros(3, 8, dtype=torch.float64), eps=1e-46), x)


# ---- Lower: autocast, raw ops with grad, infinite strength, sparse, scripting --------------

def test_reference_under_cpu_bf16_autocast_computes_in_float32():
    torch.manual_seed(0)
    x, z = torch.randn(16, 64), torch.randn(16, 2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = purify(x, z, backend="reference")
        fused = purify(x, z)
    ref64 = reference.purify(x.double(), z.double())
    assert ref.dtype == fused.dtype == torch.float32
    assert rel_err(ref, ref64) <= TOLERANCE[torch.float32]
    assert rel_err(fused, ref64) <= TOLERANCE[torch.float32]


def test_the_raw_ops_are_differentiable():
    x, z, s = torch.randn(3, 8, requires_grad=True), torch.randn(3, 1, 8, requires_grad=True), torch.tensor(0.5)
    y, coeff, chol = torch.ops.purified_ops.purify_forward(x, z, s, 1e-6)
    assert coeff.requires_grad and not chol.requires_grad
    gx, gz = torch.autograd.grad(y.square().sum(), (x, z), retain_graph=True)
    xr, zr = x.detach().requires_grad_(), z.detach().requires_grad_()
    ex, ez = torch.autograd.grad(reference.purify(xr, zr, strength=0.5).square().sum(), (xr, zr))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gz, ez)
    # purify_backward has a derivative of its own: the second derivative of y.
    dx, dz, _ = torch.ops.purified_ops.purify_backward(y, x, z, s, coeff, chol, True)
    hx, hz = torch.autograd.grad(dx.square().sum() + dz.square().sum(), (x, z))
    # dx, dz = J^T y: the gradient of |y|^2 / 2
    ex, ez = torch.autograd.grad(reference.purify(xr, zr, strength=0.5).square().sum() / 2, (xr, zr),
                                 create_graph=True)
    rx, rz = torch.autograd.grad(ex.square().sum() + ez.square().sum(), (xr, zr))
    torch.testing.assert_close(hx, rx)
    torch.testing.assert_close(hz, rz)


def test_infinite_strength_is_rejected_on_every_backend():
    x, z = torch.randn(3, 8), torch.randn(3, 8)
    for backend in ("auto", "reference"):
        for s in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ValueError, match="strength must be finite"):
                purify(x, z, strength=s, backend=backend)
    with pytest.raises(ValueError, match="strength must be finite"):
        PurifyLayer(float("inf"))


def test_non_finite_strength_tensor_gives_the_same_pattern_on_every_backend(device):
    # A tensor strength is not read on the host (that would synchronize the device): its
    # non-finite values give non-finite outputs, the same ones on every backend.
    x, z = torch.randn(3, 8, device=device), torch.randn(3, 2, 8, device=device)
    z[1] = 0
    for value in (float("inf"), float("-inf"), float("nan")):
        s = torch.tensor(value, device=device)
        fused, ref = purify(x, z, strength=s), purify(x, z, strength=s, backend="reference")
        assert torch.equal(fused.isnan(), ref.isnan()) and torch.equal(fused.isinf(), ref.isinf())


@pytest.mark.parametrize("which", ["x", "z"])
def test_sparse_inputs_raise_type_error(which):
    x, z = torch.randn(3, 8), torch.randn(3, 8)
    args = {"x": x, "z": z}
    args[which] = args[which].to_sparse()
    for backend in ("auto", "reference"):
        with pytest.raises(TypeError, match=f"{which} must be a dense"):
            purify(args["x"], args["z"], backend=backend)
    with pytest.raises(TypeError, match=f"{which} must be a dense"):
        PurifyLayer()(args["x"], args["z"])


def test_jit_script_says_what_works():
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.jit.trace, torch.compile and torch.export"):
        torch.jit.script(PurifyLayer())
    with pytest.raises(RuntimeError, match="torch.jit.trace, torch.compile and torch.export"):
        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(8, 8), PurifyLayer()))


# ---- torch.compile with dynamic shapes -----------------------------------------------------

def test_compile_layer_with_dynamic_shapes(device):
    torch._dynamo.reset()
    layer = PurifyLayer(0.5)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (4, 7):
        x = torch.randn(n, 16, device=device, requires_grad=True)
        z = torch.randn(n, 2, 16, device=device)
        y = compiled(x, z)
        torch.testing.assert_close(y, layer(x, z))
        (g,) = torch.autograd.grad(y.sum(), x)
        (g_ref,) = torch.autograd.grad(layer(x, z).sum(), x)
        torch.testing.assert_close(g, g_ref)
