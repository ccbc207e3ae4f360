"""Autograd, the registered ops and the compilers: gradcheck, double backward, opcheck,
torch.compile and torch.export."""
import pytest
import torch

import purified_ops
from purified_ops import PurifyFunction, PurifyLayer, purify

from purified_ops.testing import reference_in_float64


@pytest.mark.parametrize("shapes", [((4, 7), (4, 7)), ((3, 4, 6), (3, 1, 2, 6)), ((5, 6), (1, 3, 6)),
                                    ((2, 3, 5), (1, 3, 5))])
def test_gradcheck_and_gradgradcheck(device, shapes):
    xs, zs = shapes
    x = torch.randn(xs, dtype=torch.float64, device=device, requires_grad=True)
    z = torch.randn(zs, dtype=torch.float64, device=device, requires_grad=True)
    s = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, z, s: PurifyFunction.apply(x, z, s, 1e-3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, z, s))
    assert torch.autograd.gradgradcheck(fn, (x, z, s))


def test_double_backward_matches_reference(device):
    x = torch.randn(3, 5, 9, dtype=torch.float64, device=device, requires_grad=True)
    z = torch.randn(3, 1, 2, 9, dtype=torch.float64, device=device, requires_grad=True)

    def second(fn):
        (gx,) = torch.autograd.grad(fn(x, z).pow(2).sum(), (x,), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (x, z))

    ours = second(lambda x, z: purify(x, z))
    ref = second(lambda x, z: purify(x, z, backend="reference"))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def _op_samples(device):
    f64 = dict(device=device, dtype=torch.float64)
    f32 = dict(device=device, dtype=torch.float32)
    s32, s64 = torch.tensor(0.7, **f32), torch.tensor(0.7, **f64)
    samples = [
        (torch.randn(6, 16, **f32), torch.randn(6, 1, 16, **f32), s32),
        (torch.randn(4, 5, 16, **f32), torch.randn(4, 1, 3, 16, **f32), s32),
        (torch.randn(8, 12, **f64), torch.randn(1, 2, 12, **f64), s64),
        (torch.randn(16, 6, **f32).t(), torch.randn(16, 6, **f32).t().unsqueeze(1), s32),  # transposed
        (torch.randn(5, 17, **f32)[:, 1:], torch.randn(5, 2, 17, **f32)[..., 1:], s32),  # offset
        (torch.randn(0, 8, **f32), torch.randn(0, 2, 8, **f32), s32),  # empty
        (torch.randn(3, 4, 8, dtype=torch.bfloat16, device=device), torch.randn(3, 1, 1, 8, dtype=torch.bfloat16, device=device), s32),
    ]
    return samples


def test_opcheck_forward_and_backward(device):
    for x, z, s in _op_samples(device):
        torch.library.opcheck(torch.ops.purified_ops.purify_forward.default, (x, z, s, 1e-6))
        y, coeff, chol = torch.ops.purified_ops.purify_forward(x, z, s, 1e-6)
        g = torch.randn_like(y)
        for want_dz in (True, False):
            torch.library.opcheck(torch.ops.purified_ops.purify_backward.default,
                                  (g, x, z, s, coeff, chol, want_dz))
            dx, dz, ds = torch.ops.purified_ops.purify_backward(g, x, z, s, coeff, chol, want_dz)
            outs = (torch.empty_like(dx), torch.empty_like(dz), torch.empty_like(ds))
            args = (g, x, z, s, coeff, chol, want_dz)
            torch.library.opcheck(torch.ops.purified_ops.purify_backward_out.default, args + outs)
            torch.ops.purified_ops.purify_backward_out(*args, *outs)
            assert all(torch.equal(a, b) for a, b in zip((dx, dz, ds), outs))
        # The strength by value: the same numbers, bit for bit.
        torch.library.opcheck(torch.ops.purified_ops.purify_forward.float_strength, (x, z, 0.7, 1e-6))
        by_value = torch.ops.purified_ops.purify_forward.float_strength(x, z, 0.7, 1e-6)
        assert all(torch.equal(a, b) for a, b in zip((y, coeff, chol), by_value))
        outs = (torch.empty_like(y), torch.empty_like(coeff), torch.empty_like(chol))
        torch.library.opcheck(torch.ops.purified_ops.purify_forward_out.default, (x, z, s, 1e-6) + outs)
        torch.ops.purified_ops.purify_forward_out(x, z, s, 1e-6, *outs)
        assert all(torch.equal(a, b) for a, b in zip((y, coeff, chol), outs))


def test_out_variants_reject_wrong_outputs(device):
    x, z, s = torch.randn(3, 8, device=device), torch.randn(3, 1, 8, device=device), torch.tensor(1.0, device=device)
    y, coeff, chol = torch.ops.purified_ops.purify_forward(x, z, s, 1e-6)
    with pytest.raises(ValueError, match=r"y must be a contiguous \[3, 8\] Float"):
        torch.ops.purified_ops.purify_forward_out(x, z, s, 1e-6, y[:2], coeff, chol)
    with pytest.raises(ValueError, match="not contiguous"):
        torch.ops.purified_ops.purify_forward_out(x, z, s, 1e-6, torch.empty(8, 3, device=device).t(), coeff, chol)
    with pytest.raises(ValueError, match="grad_z must be"):
        torch.ops.purified_ops.purify_backward_out(y, x, z, s, coeff, chol, True, torch.empty_like(x),
                                                   torch.empty(0, device=device), s.clone())


def _model(device, learnable_strength=True):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(12, 24)
            self.irr = torch.nn.Linear(12, 2 * 24)
            self.purify = PurifyLayer(0.8, learnable_strength=learnable_strength)
            self.head = torch.nn.Linear(24, 3)

        def forward(self, x):
            h = self.enc(x)                                  # [B, T, 24]
            z = self.irr(x.mean(1)).view(-1, 1, 2, 24)      # [B, 1, K=2, 24]: per sample
            return self.head(self.purify(h, z))

    torch.manual_seed(0)
    return Net().to(device)


def _no_reference_backward(*args, **kwargs):
    raise AssertionError("a first-order backward must run the fused backward op, not the reference")


def test_torch_compile_fullgraph_matches_eager(device, monkeypatch):
    monkeypatch.setattr(purified_ops.reference, "purify_backward", _no_reference_backward)
    model = _model(device)
    x = torch.randn(4, 5, 12, device=device)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("learnable_strength", [True, False])
def test_torch_export(device, learnable_strength):
    model = _model(device, learnable_strength)
    x = torch.randn(4, 5, 12, device=device)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    # The program keeps the checked entry op (a custom CompositeImplicitAutograd op, which export
    # preserves); decomposed, it is the canonical form and the fused op (a fixed strength: the
    # overload that takes it as a number).
    entry, fused = (("purify.strength_tensor", "purify_forward.default") if learnable_strength
                    else ("purify.default", "purify_forward.float_strength"))
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert f"purified_ops.{entry}" in names, names
    decomposed = exported.run_decompositions()
    names = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert f"purified_ops.{fused}" in names, names
    torch.testing.assert_close(decomposed.module()(x), model(x))
    # For runtimes without purified_ops: core ATen alone.
    core = exported.run_decompositions(purified_ops.export_decompositions())
    names = {str(n.target) for n in core.graph.nodes if n.op == "call_function"}
    assert not any(name.startswith("purified_ops.") for name in names), names
    torch.testing.assert_close(core.module()(x), model(x))


def test_fake_tensor_shapes_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, z, s = torch.randn(3, 5, 9), torch.randn(3, 1, 2, 9), torch.tensor(1.0)
    real = torch.ops.purified_ops.purify_forward(x, z, s, 1e-6)
    with FakeTensorMode() as mode:
        fake = torch.ops.purified_ops.purify_forward(mode.from_tensor(x), mode.from_tensor(z), mode.from_tensor(s), 1e-6)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()


def test_meta_tensors_give_shapes():
    y = purify(torch.empty(4, 6, 10, device="meta"), torch.empty(4, 1, 3, 10, device="meta"))
    assert y.shape == (4, 6, 10) and y.device.type == "meta"


def test_first_order_backward_runs_the_fused_op(device, monkeypatch):
    monkeypatch.setattr(purified_ops.reference, "purify_backward", _no_reference_backward)
    x = torch.randn(3, 4, 8, device=device, requires_grad=True)
    z = torch.randn(3, 1, 2, 8, device=device, requires_grad=True)
    purify(x, z).sum().backward()
    assert x.grad is not None and z.grad is not None


def test_grad_of_each_input_alone(device):
    """needs_input_grad: z without grad skips dz; strength alone still gets its gradient."""
    x = torch.randn(6, 20, device=device, dtype=torch.float64)
    z = torch.randn(6, 2, 20, device=device, dtype=torch.float64)
    s = torch.tensor(0.5, device=device, dtype=torch.float64, requires_grad=True)
    purify(x, z, strength=s).sum().backward()
    s64 = s.detach().clone().requires_grad_()
    reference_in_float64(x, z, s64).sum().backward()
    torch.testing.assert_close(s.grad, s64.grad)
    xr = x.clone().requires_grad_()
    purify(xr, z).sum().backward()
    assert xr.grad is not None


def test_raw_op_rejects_bad_arguments():
    x, z, s = torch.randn(3, 8), torch.randn(3, 1, 8), torch.tensor(1.0)
    # The raw ops own these checks (the public API's never reach them): messages name the op.
    with pytest.raises(ValueError, match=r"purify_forward: .* one dim more"):
        torch.ops.purified_ops.purify_forward(x, z.squeeze(1), s, 1e-6)
    with pytest.raises(ValueError, match=r"purify_forward: z's dim 0 \(2\) must be x's \(3\) or 1"):
        torch.ops.purified_ops.purify_forward(x, z[:2], s, 1e-6)
    with pytest.raises(TypeError, match="purify_forward: z must have x's dtype"):
        torch.ops.purified_ops.purify_forward(x, z.double(), s, 1e-6)
    with pytest.raises(ValueError, match="purify_forward: strength"):
        torch.ops.purified_ops.purify_forward(x, z, s.double(), 1e-6)
    for value in (float("inf"), float("nan"), 1e39):  # 1e39 is inf in float32
        with pytest.raises(ValueError, match="purify_forward: strength must be finite in Float"):
            torch.ops.purified_ops.purify_forward.float_strength(x, z, value, 1e-6)
    for eps in (0.0, -1.0, float("nan"), float("inf"), 1e-40):
        with pytest.raises(ValueError, match="purify_forward: eps must be a normal Float number"):
            torch.ops.purified_ops.purify_forward(x, z, s, eps)
    y, coeff, chol = torch.ops.purified_ops.purify_forward(x, z, s, 1e-6)
    with pytest.raises(ValueError, match="purify_backward: coeff"):
        torch.ops.purified_ops.purify_backward(y, x, z, s, coeff[:2], chol, True)
    with pytest.raises(ValueError, match="purify_backward: grad_y must match x"):
        torch.ops.purified_ops.purify_backward(y[:2], x, z, s, coeff, chol, True)
