"""Every derivative runs on the fused ops: the profiler shows ``purify_backward`` under each
torch.func transform, ``create_graph=True`` and vmap, and no reference math runs; the derivative
of ``purify_backward`` (its own rule) is right to the third order; ``PurifyFunction`` is an
autograd Function whose backward is the same op."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import purified_ops
from purified_ops import PurifyFunction, purify, reference


def _ops_run(fn):
    """The purified_ops kernel ops that ``fn()`` calls, by name (the profiler's record of each
    dispatcher call; ``purified_ops::purify``, the checked entry in front of them, left out)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("purified_ops::") and e.name != "purified_ops::purify"}


@pytest.fixture
def no_reference_math(monkeypatch):
    """Any reference derivative raises: the rules must not fall back to it."""
    def refuse(*args, **kwargs):
        raise AssertionError("reference math ran inside a derivative")
    for name in ("purify_backward", "purify_jvp", "purify_forward"):
        monkeypatch.setattr(reference, name, refuse)


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, generator=g, dtype=dtype)
    z = torch.randn(4, 1, 2, 8, generator=g, dtype=dtype)
    s = torch.tensor(0.7, dtype=dtype)
    return x, z, s


def _loss(x, z, s):
    return purify(x, z, strength=s).pow(2).sum()


TRANSFORMS = {
    "grad": lambda x, z, s: torch.func.grad(_loss, argnums=(0, 1, 2))(x, z, s),
    "vjp": lambda x, z, s: torch.func.vjp(lambda a, b: purify(a, b, strength=s), x, z)[1](torch.ones_like(x)),
    "jacrev": lambda x, z, s: torch.func.jacrev(_loss, argnums=(0, 1))(x[0, :2], z[0, 0], s),
    "hessian": lambda x, z, s: torch.func.hessian(_loss, argnums=0)(x[0, :2], z[0, 0], s),
    "grad_of_grad": lambda x, z, s: torch.func.grad(
        lambda a: torch.func.grad(_loss)(a, z, s).pow(2).sum())(x),
    "vmap_grad": lambda x, z, s: torch.func.vmap(torch.func.grad(_loss), in_dims=(0, 0, None))(x, z, s),
    "vmap_grad_shared_z": lambda x, z, s: torch.func.vmap(torch.func.grad(_loss, argnums=(0, 1)),
                                                          in_dims=(0, None, None))(x, z[0], s),
    # Per-sample gradients of strength too (the batching rule's per-entry ds): a shared strength
    # with batched z, and a batched strength with shared z.
    "vmap_grad_strength": lambda x, z, s: torch.func.vmap(torch.func.grad(_loss, argnums=(0, 1, 2)),
                                                          in_dims=(0, 0, None))(x, z, s),
    "vmap_grad_batched_strength": lambda x, z, s: torch.func.vmap(
        torch.func.grad(_loss, argnums=(1, 2)), in_dims=(0, None, 0))(x, z[0], s * torch.linspace(0.5, 1, 4)),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_each_transform_runs_the_fused_backward(transform, no_reference_math):
    x, z, s = _inputs()
    names = _ops_run(lambda: TRANSFORMS[transform](x, z, s))
    assert "purified_ops::purify_backward" in names, names


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_each_transform_matches_the_reference(transform):
    x, z, s = _inputs()
    ours = TRANSFORMS[transform](x, z, s)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(globals(), "purify", reference.purify)
        ref = TRANSFORMS[transform](x, z, s)
    for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(ref)):
        torch.testing.assert_close(a, b)


def test_create_graph_runs_the_fused_backward_and_its_own_derivative(no_reference_math):
    x, z, s = (t.requires_grad_() for t in _inputs())

    def second_order():
        gx, gz, gs = torch.autograd.grad(_loss(x, z, s), (x, z, s), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gz.pow(2).sum() + gs, (x, z, s))

    names = _ops_run(second_order)
    assert "purified_ops::purify_backward" in names, names


def test_forward_mode_runs_the_fused_forward_on_the_tangent(no_reference_math):
    x, z, s = _inputs()
    # Only x's tangent: y_t is purify of the tangent, one more forward op call.
    names = _ops_run(lambda: torch.func.jvp(lambda a: purify(a, z, strength=s), (x,), (torch.randn_like(x),)))
    assert names == {"purified_ops::purify_forward"}, names


def _backward_of_forward(g, x, z, s):
    """purify_backward at the forward's own coeff and factor: the derivative of y in x, z, s."""
    _, coeff, chol = torch.ops.purified_ops.purify_forward(x, z, s, 1e-3)
    return torch.ops.purified_ops.purify_backward(g, x, z, s, coeff, chol, True)


def test_purify_backward_has_its_own_derivative_to_the_third_order():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64),
            torch.randn(1, 2, 5, generator=g, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(_backward_of_forward, args)
    assert torch.autograd.gradgradcheck(_backward_of_forward, args)
    # Forward mode of the backward op (forward over reverse, as jacfwd(jacrev) runs).
    assert torch.autograd.gradcheck(_backward_of_forward, args, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


def test_coeff_is_differentiable():
    x, z, s = (t.requires_grad_() for t in _inputs())
    assert torch.autograd.gradcheck(lambda a, b: PurifyFunction.apply(a, b, s, 1e-3)[1], (x, z))
    assert torch.autograd.gradcheck(lambda a, b: PurifyFunction.apply(a, b, s, 1e-3)[1], (x, z),
                                    check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


def test_purify_function_is_an_autograd_function_whose_backward_is_the_op(no_reference_math):
    assert issubclass(PurifyFunction, torch.autograd.Function)
    x, z, s = (t.requires_grad_() for t in _inputs(torch.float32))
    y, coeff, chol = PurifyFunction.apply(x, z, s, 1e-6)
    assert y.shape == x.shape and coeff.shape == (4, 3, 2) and chol.shape == (4, 1, 2, 2)
    assert y.requires_grad and not chol.requires_grad
    names = _ops_run(lambda: y.sum().backward())
    assert names == {"purified_ops::purify_backward"}, names
    assert x.grad is not None and z.grad.shape == z.shape and s.grad.shape == ()


def _python_calls_in(package: str, fn) -> list[str]:
    """The functions of ``package`` that Python runs during ``fn()`` (its own frames excluded)."""
    import sys
    seen = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith(package):
            seen.append(frame.f_code.co_name)
    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


@pytest.mark.parametrize("overload", ["default", "float_strength"])
def test_a_plain_training_step_of_the_op_runs_no_python_derivative(overload):
    # The Autograd kernels choose in C++: the op alone, or a C++ node whose backward is the fused
    # backward op; the Python rules run only where a transform or a higher order needs them.
    x, z, s = _inputs(torch.float32)
    x.requires_grad_()
    z.requires_grad_()
    if overload == "float_strength":
        s = s.item()
    op = getattr(torch.ops.purified_ops.purify_forward, overload)
    out = {}

    def step():
        out["y"] = op(x, z, s, 1e-6)[0]
        out["grads"] = torch.autograd.grad(out["y"].sum(), (x, z))

    assert _python_calls_in("purified_ops", step) == []
    with torch.no_grad():
        assert _python_calls_in("purified_ops", lambda: op(x, z, s, 1e-6)) == []
    expected = torch.autograd.grad(reference.purify_forward(x, z, s, 1e-6)[0].sum(), (x, z))
    for got, want in zip(out["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_raw_ops_outputs_differentiate_through_the_eager_node():
    # y and coeff of the op itself (outside PurifyFunction): first and second order, and the
    # coefficients' gradient, which the eager node hands to the Python rule.
    x, z, s = (t.requires_grad_() for t in _inputs())
    op = torch.ops.purified_ops.purify_forward.default
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, 1e-3)[:2], (x, z, s))
    assert torch.autograd.gradgradcheck(lambda a, b, c: op(a, b, c, 1e-3)[0], (x, z, s))
    y, coeff, chol = op(x, z, s, 1e-3)
    assert not chol.requires_grad
    names = _ops_run(lambda: torch.autograd.grad(y.sum(), (x, z, s)))
    assert names == {"purified_ops::purify_backward"}, names


def test_the_float_strength_overload_differentiates_like_the_tensor_one():
    # Its own node in eager code (the strength a constant), purify_forward's rules under
    # torch.func and forward mode, its batching rule under vmap: the tensor overload's numbers.
    x, z, s = _inputs()
    x.requires_grad_()
    z.requires_grad_()
    ops = torch.ops.purified_ops.purify_forward
    by_value = lambda a, b: ops.float_strength(a, b, 0.6, 1e-3)[:2]  # noqa: E731
    by_tensor = lambda a, b: ops.default(a, b, torch.tensor(0.6, dtype=torch.float64), 1e-3)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(by_value, (x, z))
    assert torch.autograd.gradgradcheck(lambda a, b: by_value(a, b)[0], (x, z))
    assert torch.autograd.gradcheck(by_value, (x, z), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False)
    g = torch.randn_like(x)
    for how in (lambda f: torch.autograd.grad(f(x, z)[0], (x, z), g),
                lambda f: torch.autograd.grad(f(x, z)[1].sum(), (x, z)),  # coeff's gradient
                lambda f: torch.func.grad(lambda a, b: (f(a, b)[0] * g).sum(), argnums=(0, 1))(x, z),
                lambda f: torch.func.jvp(lambda a: f(a, z)[0], (x,), (g,)),
                lambda f: torch.func.vmap(lambda a: f(a, z)[0])(x.detach().unsqueeze(0).expand(3, *x.shape)),
                lambda f: torch.func.vmap(torch.func.grad(lambda a: f(a, z[:1])[0].sum()))(x.unsqueeze(1))):
        for got, want in zip(how(by_value), how(by_tensor)):
            assert torch.equal(got, want)
    y = by_value(x, z)[0]
    names = _ops_run(lambda: torch.autograd.grad(y.sum(), (x, z)))
    assert names == {"purified_ops::purify_backward"}, names
