"""The derivatives of ``purify_forward`` and ``purify_backward``, registered on the ops themselves
(docs/DESIGN.md, "Autograd"): each op's Autograd kernel (backward and forward mode) and its
batching rule, for the library's namespace and the emulated CUDA one. Every caller of the ops
then differentiates them, to any order: eager code, torch.compile, torch.func (also under
compile), exported programs, traced modules.

One implementation per derivative order: the first-order backward of ``purify_forward`` is the
fused ``purify_backward`` op, always; the derivative of ``purify_backward`` (second order: double
backward, ``create_graph=True``, torch.func's nested transforms) is a closed form in the fused ops
and elementwise PyTorch ops below; a third order differentiates those rules in turn.

Registration of the ops, in one place per language: C++ ``csrc/purify.cpp`` (schemas; it names
the others), Python ``purified_ops/ops.py`` (fake kernels, loading) and this module (autograd and
batching rules).

The formulas, per row, with ``G = Z Z^T + eps I``, ``M = G^{-1}``, ``P = Z^T M Z``,
``c = M Z x`` (the op's ``coeff``), ``p = Z^T c``, ``e = x - p``; for the backward's ``g``:
``u = M Z g``, ``q = Z^T u``, ``h = g - q``. The backward op computes

    dx = g - s q,    dZ = -s (c h^T + u e^T),    ds = -sum <g, p>

as a function of its own inputs ``(g, x, Z, s, c)`` (``c`` is a differentiable output of the
forward; ``chol`` is not, and serves only as M's factor, whose derivative is that of G(Z)).
Everything runs on z divided by its power-of-two scale (:func:`reference.direction_scale`), as
the kernels do, so the rules stay finite for directions of any magnitude.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
from torch._C._functorch import get_single_level_autograd_function_allowed, set_single_level_autograd_function_allowed
from torch.autograd import forward_ad as _fwad
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from . import reference

__all__ = ["register"]


def _transforms_active() -> bool:
    """Whether a torch.func transform or a forward-mode AD level is active: then the op records
    its derivative even with nothing requiring grad."""
    return _fwad._current_level >= 0 or torch._C._are_functorch_transforms_active()


# ---- per-row algebra (z [..., K, D] broadcast against x's rows) ----------------------------------

def _zt(v, z):
    """Z^T v: [..., K] -> [..., D]."""
    return (v.unsqueeze(-2) @ z).squeeze(-2)


def _zv(z, w):
    """Z w: [..., D] -> [..., K]."""
    return (z @ w.unsqueeze(-1)).squeeze(-1)


def _outer(k, d):
    return k.unsqueeze(-1) * d.unsqueeze(-2)


def _sum_to(t, shape):
    return reference._sum_to(t, shape)


# ``purified_ops::gram_solve(z, chol, v)``: ``G^{-1} v`` for ``v [..., K]`` with the factor of G
# that the forward op returned (``chol``, not differentiable), in PyTorch ops (the reference's
# substitution solves). An op rather than a Python Function, so that torch.func runs its rules
# at each of its levels as it does the other ops'. Differentiable in z (``dM = -M dG M``,
# ``dG = dZ Z^T + Z dZ^T``) and in v, to any order (its rules call it again).
_GRAM_SOLVE_SCHEMA = "gram_solve(Tensor z, Tensor chol, Tensor v) -> Tensor"


def _gram_solve_impl(z, chol, v):
    return reference.cholesky_solve(chol, v)


def _gram_solve():
    return torch.ops.purified_ops.gram_solve.default


class _GramSolveAutograd(torch.autograd.function._SingleLevelFunction):
    @staticmethod
    def forward(z, chol, v, op, keyset):
        with torch.enable_grad(), _set_fwd_grad_enabled(True):
            return _Dispatch.below_autograd(op, keyset, z, chol, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, chol, v, _, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, chol, output)
        ctx.save_for_forward(z, chol, output)
        ctx.v_shape = v.shape

    @staticmethod
    def backward(ctx, grad_w):
        z, chol, w = ctx.saved_tensors
        if grad_w is None:
            return None, None, None, None, None
        o = _gram_solve()(z, chol, grad_w)
        grad_z = -_sum_to(_outer(o, _zt(w, z)) + _outer(w, _zt(o, z)), z.shape) if ctx.needs_input_grad[0] else None
        return grad_z, None, _sum_to(o, ctx.v_shape), None, None

    @staticmethod
    def jvp(ctx, z_t, _chol_t, v_t, _op_t, _keyset_t):
        z, chol, w = ctx.saved_tensors
        rhs = v_t if v_t is not None else torch.zeros_like(w)
        if z_t is not None:
            rhs = rhs - _zv(z_t, _zt(w, z)) - _zv(z, _zt(w, z_t))
        return _gram_solve()(z, chol, rhs)


def _gram_solve_vmap_rule(info, in_dims, z, chol, v):
    z, chol, v = (t.movedim(d, 0) if d is not None else t.unsqueeze(0) for t, d in zip((z, chol, v), in_dims))
    return _gram_solve()(z, chol, v), 0


@dataclass
class _Terms:
    """The saved inputs of one op call in the rules' units: the accumulate dtype, z (and the
    coefficients and factor) at z's power-of-two scale; ``fused(v, s)`` runs the forward op on
    rows v (y in the accumulate dtype, coeff at the scale)."""

    forward: torch._ops.OpOverload | None  # None: rows projected through the factor instead
    eps: float | None
    dtype: torch.dtype
    z_raw: torch.Tensor
    x: torch.Tensor
    z: torch.Tensor
    s: torch.Tensor
    c: torch.Tensor
    chol: torch.Tensor
    inv_m_z: torch.Tensor   # [..., 1, 1] over z's sets
    inv_m_c: torch.Tensor   # [..., 1] over the coefficients' rows

    @classmethod
    def of(cls, forward, eps, x, z, s, coeff, chol):
        acc = reference.accumulate_dtype(x.dtype)
        za = z.to(acc)
        # Any power of two scales z, its factor and c exactly; this one brings |z| near 1 (the
        # smallest normal number as eps: no floor on the scale from eps).
        inv_m, _ = reference.direction_scale(za.detach().abs().amax((-2, -1)), z.shape[-1], torch.finfo(acc).tiny)
        inv_m_z = inv_m.unsqueeze(-1).unsqueeze(-1)
        inv_m_c = inv_m.unsqueeze(-1)
        return cls(forward, eps, x.dtype, z, x.to(acc), za * inv_m_z, s.to(acc), coeff / inv_m_c,
                   chol * inv_m_z, inv_m_z, inv_m_c)

    def fused(self, v, s):
        """``(v - s P v, M Z v)`` for rows v: the fused forward op where eps is known (the
        forward's rules), else through the factor (the backward op does not take eps)."""
        if self.forward is None:
            c = self.solve(_zv(self.z, v))
            return v - s * _zt(c, self.z), c
        y, coeff, _ = self.forward(v.to(self.dtype), self.z_raw, s, self.eps)
        return y.to(self.x.dtype), coeff / self.inv_m_c

    def solve(self, v):
        return _gram_solve()(self.z, self.chol, v)

    def ones(self):
        return torch.ones((), dtype=self.s.dtype, device=self.s.device)

    def to_z(self, dz_scaled):
        """A gradient or tangent of the scaled z, as one of z (z = m z')."""
        return _sum_to(dz_scaled, self.z.shape) * self.inv_m_z

    def p(self):
        return _zt(self.c, self.z)


def _tangent(t: _Terms, x_t, z_t, s_t):
    """The forward-mode derivative of (y, coeff) at t's point for tangents of x, (scaled) z and
    s, each possibly None: ``y_t = purify(x_t - r) + (1 - s) r - s Z^T w - s_t p``, with
    ``r = Z_t^T c`` and ``w = M Z_t e``; ``c_t = M Z (x_t - r) + w`` (scaled). The tangent of x
    enters linearly, through the fused op. Also returns ``(x_t - r) - Z^T c_t``, the vector the
    backward op's own derivative reuses."""
    zero = torch.zeros_like(t.x)
    r = _zt(t.c, z_t) if z_t is not None else None
    v0 = x_t if r is None else (r.neg() if x_t is None else x_t - r)
    if v0 is not None:
        y_t, c_t = t.fused(v0, t.s)
    else:
        v0, y_t, c_t = zero, zero, torch.zeros_like(t.c)
    if z_t is not None:
        w = t.solve(_zv(z_t, t.x - t.p()))
        y_t = y_t + (1 - t.s) * r - t.s * _zt(w, t.z)
        c_t = c_t + w
    if s_t is not None:
        y_t = y_t - s_t.to(t.x.dtype) * t.p()
    return y_t, c_t, v0 - _zt(c_t, t.z)


@dataclass(frozen=True)
class _Dispatch:
    """Where an op's Autograd kernel continues: its namespace's ops (the library's, or the
    emulated CUDA ones), called with the dispatch keys below the Autograd kernel that called it
    (``keyset``, that kernel's)."""

    forward: torch._ops.OpOverload
    backward: torch._ops.OpOverload

    @staticmethod
    def below_autograd(op, keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


class _PurifyForwardAutograd(torch.autograd.function._SingleLevelFunction):
    """The derivative of ``purify_forward`` (outputs y and coeff; chol is not differentiable).

    Backward: the fused ``purify_backward`` op for y's gradient, wherever it is taken (recorded
    by its own Autograd kernel where the backward is itself differentiated); a gradient of coeff
    (only a rule that reuses coeff has one) adds ``Z^T M gc`` to dx and ``M gc e^T - c (Z^T M gc)^T``
    to dz. Forward mode: :func:`_tangent`.

    A single-level Function (what functorch itself generates for an autograd.Function): the
    Autograd kernel runs at one functorch level at a time, with its inputs unwrapped to that
    level, exactly as the Autograd kernel of a built-in op does.
    """

    @staticmethod
    def forward(x, z, strength, eps, dispatch: _Dispatch, keyset):
        # Continues the dispatch below autograd with grad modes on, as functorch's own
        # single-level Functions do: a transform below this level then records the op too.
        with torch.enable_grad(), _set_fwd_grad_enabled(True):
            return dispatch.below_autograd(dispatch.forward, keyset, x, z, strength, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, z, strength, eps, dispatch, _ = inputs
        _, coeff, chol = output
        ctx.mark_non_differentiable(chol)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, z, strength, coeff, chol)
        ctx.save_for_forward(x, z, strength, coeff, chol)
        ctx.eps, ctx.dispatch = eps, dispatch

    @staticmethod
    def backward(ctx, grad_y, grad_coeff, _grad_chol):
        _, need_z, need_s, _, _, _ = ctx.needs_input_grad
        return (*forward_vjp(ctx.dispatch, ctx.eps, ctx.saved_tensors, need_z, need_s, grad_y, grad_coeff),
                None, None, None)

    @staticmethod
    def jvp(ctx, x_t, z_t, strength_t, _eps_t, _dispatch_t, _keyset_t):
        return forward_jvp(ctx.dispatch, ctx.eps, ctx.saved_tensors, x_t, z_t, strength_t)


# Inside forward_vjp's call of the backward op when ds is not wanted: every purify_backward
# call in that extent (the op's own levels: its Autograd kernels, batching rules, forward-mode
# rules) computes that ds or a derivative of it, which nothing reads.
_DS_UNUSED = threading.local()


def forward_vjp(dispatch: _Dispatch, eps, saved, need_z, need_s, grad_y, grad_coeff):
    """``purify_forward``'s backward: (dx, dz, ds) for the gradients of y and coeff (either None),
    ``saved`` its ``(x, z, strength, coeff, chol)``. y's through the fused backward op."""
    x, z, strength, coeff, chol = saved
    dx = dz = ds = None
    if grad_y is not None:
        if need_s:
            dx, dz, ds = dispatch.backward(grad_y.to(x.dtype), x, z, strength, coeff, chol, need_z)
        else:
            # ds is dropped: its batching rule may skip its per-entry sums (the op itself computes
            # ds in the same pass as dx and dz; the rule needs one more product over the rows).
            _DS_UNUSED.depth = getattr(_DS_UNUSED, "depth", 0) + 1
            try:
                dx, dz, _ = dispatch.backward(grad_y.to(x.dtype), x, z, strength, coeff, chol, need_z)
            finally:
                _DS_UNUSED.depth -= 1
    if grad_coeff is not None:
        t = _Terms.of(dispatch.forward, eps, x, z, strength, coeff, chol)
        w = t.solve(grad_coeff.to(t.x.dtype) * t.inv_m_c)
        zw = _zt(w, t.z)
        gx = zw.to(x.dtype)
        dx = gx if dx is None else dx + gx
        if need_z:
            gz = t.to_z(_outer(w, t.x - t.p()) - _outer(t.c, zw)).to(z.dtype)
            dz = gz if grad_y is None else dz + gz
    return dx, dz if need_z else None, ds if need_s else None


def forward_jvp(dispatch: _Dispatch, eps, saved, x_t, z_t, strength_t):
    """``purify_forward``'s forward mode: the tangents of (y, coeff, chol) (:func:`_tangent`)."""
    x, z, strength, coeff, chol = saved
    t = _Terms.of(dispatch.forward, eps, x, z, strength, coeff, chol)
    y_t, c_t, _ = _tangent(t, None if x_t is None else x_t.to(t.x.dtype),
                           None if z_t is None else z_t.to(t.x.dtype) * t.inv_m_z, strength_t)
    return y_t.to(x.dtype), c_t * t.inv_m_c, None


class _PurifyBackwardAutograd(torch.autograd.function._SingleLevelFunction):
    """The derivative of ``purify_backward`` (a function of g, x, z, s and coeff), in closed
    form (module docstring). Its backward, for cotangents (a, B, b) of (dx, dz, ds), with
    ``r_c = B^T c``, ``r_u = B^T u`` and the forward's tangent (y_t, c_t) at (a, B, b):

        grad g = y_t,   grad x = -s r_u,   grad c = -s B h + s Z r_u - b Z g,
        grad s = -(<a, q> + c^T B h + u^T B e),
        grad Z = -s (c_t h^T + u ((a - r_c) - Z^T c_t)^T - c r_u^T) - b c g^T

    Its forward mode: the op on g's tangent (it is linear in g) plus the other inputs' terms.
    The op takes no eps: u, h and the other rows M Z v come from the forward's factor."""

    @staticmethod
    def forward(grad_y, x, z, strength, coeff, chol, compute_grad_z, dispatch: _Dispatch, keyset):
        with torch.enable_grad(), _set_fwd_grad_enabled(True):
            return dispatch.below_autograd(dispatch.backward, keyset, grad_y, x, z, strength, coeff, chol,
                                           compute_grad_z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, z, strength, coeff, chol, compute_grad_z, dispatch, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, z, strength, coeff, chol)
        ctx.save_for_forward(grad_y, x, z, strength, coeff, chol)
        ctx.compute_grad_z, ctx.dispatch = compute_grad_z, dispatch

    @staticmethod
    def _terms(ctx):
        g, x, z, strength, coeff, chol = ctx.saved_tensors
        t = _Terms.of(None, None, x, z, strength, coeff, chol)
        h, u = t.fused(g, t.ones())
        return t, g, g.to(t.x.dtype), h, u

    @staticmethod
    def backward(ctx, a, dz_bar, b):
        t, g, ga, h, u = _PurifyBackwardAutograd._terms(ctx)
        need_g, need_x, need_z, need_s, need_c = ctx.needs_input_grad[:5]
        s = t.s
        a = None if a is None else a.to(t.x.dtype)
        B = dz_bar.to(t.x.dtype) * t.inv_m_z if ctx.compute_grad_z and dz_bar is not None else None
        b = None if b is None else b.to(t.x.dtype)
        if a is None and B is None and b is None:
            return (None,) * 9
        e = t.x - t.p()
        y_t, c_t, v = _tangent(t, a, B, b)
        grad_x = grad_c = grad_zs = grad_s = None
        terms_s = []
        if a is not None:
            terms_s.append((a * (ga - h)).sum())
        if B is not None:
            r_u = _zt(u, B)
            bh = _zv(B, h)
            grad_x = -s * r_u
            grad_c = -s * bh + s * _zv(t.z, r_u)
            grad_zs = -s * (_outer(c_t, h) + _outer(u, v) - _outer(t.c, r_u))
            terms_s += [(t.c * bh).sum(), (u * _zv(B, e)).sum()]
        elif a is not None:
            grad_zs = -s * (_outer(c_t, h) + _outer(u, v))
        if b is not None:
            zg = _zv(t.z, ga)
            grad_c = -b * zg if grad_c is None else grad_c - b * zg
            gz_b = -b * _outer(t.c, ga)
            grad_zs = gz_b if grad_zs is None else grad_zs + gz_b
        if terms_s:
            grad_s = -torch.stack(terms_s).sum()
        return (y_t.to(g.dtype) if need_g else None,
                grad_x.to(t.x.dtype).to(ctx.saved_tensors[1].dtype) if need_x and grad_x is not None else None,
                t.to_z(grad_zs).to(t.z_raw.dtype) if need_z and grad_zs is not None else None,
                grad_s.to(ctx.saved_tensors[3].dtype) if need_s and grad_s is not None else None,
                grad_c / t.inv_m_c if need_c and grad_c is not None else None,
                None, None, None, None)

    @staticmethod
    def jvp(ctx, g_t, x_t, z_t, s_t, c_t, _chol_t, _cz_t, _dispatch_t, _keyset_t):
        g, x, z, strength, coeff, chol = ctx.saved_tensors
        need_z = ctx.compute_grad_z
        if g_t is not None:
            dx, dz, ds = ctx.dispatch.backward(g_t.to(g.dtype), x, z, strength, coeff, chol, need_z)
        else:
            dx, dz, ds = (torch.zeros_like(x), torch.zeros_like(z) if need_z else z.new_zeros(0),
                          torch.zeros_like(strength))
        if x_t is None and z_t is None and s_t is None and c_t is None:
            return dx, dz, ds
        t, _, ga, h, u = _PurifyBackwardAutograd._terms(ctx)
        s = t.s
        e = t.x - t.p()
        dx_s = dzs = ds_s = None

        def add(acc, v):
            return v if acc is None else acc + v

        if x_t is not None:
            dzs = add(dzs, -s * _outer(u, x_t.to(t.x.dtype)))
        if c_t is not None:
            cs_t = c_t / t.inv_m_c
            p_t = _zt(cs_t, t.z)
            dzs = add(dzs, -s * (_outer(cs_t, h) - _outer(u, p_t)))
            ds_s = add(ds_s, -(ga * p_t).sum())
        if s_t is not None:
            s_t = s_t.to(t.x.dtype)
            dx_s = add(dx_s, -s_t * (ga - h))
            dzs = add(dzs, -s_t * (_outer(t.c, h) + _outer(u, e)))
        if z_t is not None:
            zs_t = z_t.to(t.x.dtype) * t.inv_m_z
            e_ru, c_ru = t.fused(_zt(u, zs_t), t.ones())
            w_h = t.solve(_zv(zs_t, h))
            dp_g = e_ru + _zt(w_h, t.z)  # dP[Z_t] g
            r_c = _zt(t.c, zs_t)
            dx_s = add(dx_s, -s * dp_g)
            dzs = add(dzs, -s * (_outer(t.c, -dp_g) + _outer(w_h - c_ru, e) - _outer(u, r_c)))
            ds_s = add(ds_s, -(ga * r_c).sum())
        if dx_s is not None:
            dx = dx + dx_s.to(dx.dtype)
        if need_z and dzs is not None:
            dz = dz + t.to_z(dzs).to(dz.dtype)
        if ds_s is not None:
            ds = ds + ds_s.to(ds.dtype)
        return dx, dz, ds


def _rules_kernel(function, dispatch):
    """The rules of ``function`` as an Autograd kernel's body: applied with ``dispatch`` (where its
    forward continues) and the kernel's keyset, as a single-level Function."""

    def kernel(keyset, *args):
        # torch._functorch.utils.enable_single_level_autograd_function, without a generator
        # context manager's cost on every call.
        allowed = get_single_level_autograd_function_allowed()
        set_single_level_autograd_function_allowed(True)
        try:
            return function.apply(*args, dispatch, keyset)
        finally:
            set_single_level_autograd_function_allowed(allowed)

    return kernel


def _autograd_kernel(function, op: torch._ops.OpOverload, dispatch):
    """A Python op's Autograd kernel: the op alone where nothing is differentiated, else
    ``function``'s rules (:func:`_rules_kernel`). The fused ops' kernels make this choice in C++
    (``csrc/purify_autograd.h``) and call the rules only where a derivative is taken."""
    rules = _rules_kernel(function, dispatch)

    def kernel(keyset, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if _transforms_active() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors)):
            return rules(keyset, *args)
        return _Dispatch.below_autograd(op, keyset, *args)

    return kernel


def _batched(t, bdim, size):
    """t with its vmapped dim first, or a size-1 dim there where it is not vmapped."""
    return t.movedim(bdim, 0) if bdim is not None else t.unsqueeze(0)


def _expanded(t, bdim, size):
    t = _batched(t, bdim, size)
    return t if bdim is not None else t.expand(size, *t.shape[1:])


def _entry_dots(c, z, g):
    """``sum <c, Z g>`` over each batch entry's rows: c ``[n, ..., K]``, z ``[n or 1, ..., K, D]``
    (a leading dim x's or 1), g ``[n, ..., D]``; returns ``[n]``. Each distinct Z meets all the rows
    that share it in one matrix product, so z is never expanded per row (an einsum over the
    broadcast dims takes a path several times slower)."""
    lead = g.shape[:-1]
    k, d = z.shape[-2:]
    shared = [i for i in range(len(lead)) if z.shape[i] == 1 and lead[i] != 1]
    own = [i for i in range(len(lead)) if i not in shared]
    n_own = n_shared = 1
    for i in own:
        n_own *= lead[i]
    for i in shared:
        n_shared *= lead[i]
    order = (*own, *shared, len(lead))
    gp = g.permute(order).reshape(n_own, n_shared, d)
    cp = c.permute(order).reshape(n_own, n_shared, k)
    zg = torch.bmm(z.reshape(n_own, k, d), gp.transpose(1, 2))  # [own, K, shared]: Z g per row
    dots = (zg.transpose(1, 2) * cp).sum(-1)  # [own, shared]
    n = lead[0]
    if shared and shared[0] == 0:  # z not batched: the entries are z's shared rows
        return dots.sum(0).reshape(n, n_shared // n if n else 0).sum(1)
    return dots.sum(1).reshape(n, n_own // n if n else 0).sum(1)


def _forward_vmap_rule(forward: torch._ops.OpOverload):
    """The batching rule of ``forward``: one call for the whole batch, the vmapped dim a leading
    dim of x and z (of size 1 in z when z is not batched: shared, never expanded)."""

    def rule(info, in_dims, x, z, strength, eps):
        x_bdim, z_bdim, s_bdim, _ = in_dims
        x_dim = x.dim() - (x_bdim is not None)
        x = _batched(x, x_bdim, info.batch_size)
        z = _batched(z, z_bdim, info.batch_size)
        if x_bdim is None and z_bdim is not None:
            x = x.expand(info.batch_size, *x.shape[1:])  # a view: y has the batch dim, x is read once per z
        if s_bdim is None:
            y, coeff, chol = forward(x, z, strength, eps)
        else:
            # A batched strength scales the removed projection per batch entry; coeff and chol do
            # not depend on it.
            y1, coeff, chol = forward(x, z, strength.new_ones(()), eps)
            acc = strength.dtype
            s = strength.movedim(s_bdim, 0).reshape(info.batch_size, *([1] * x_dim))
            y = (x.to(acc) - s * (x.to(acc) - y1.to(acc))).to(y1.dtype)
        # Outputs of an unbatched input keep its size-1 dim: not vmapped.
        coeff, coeff_dim = (coeff, 0) if x_bdim is not None or z_bdim is not None else (coeff.squeeze(0), None)
        chol, chol_dim = (chol, 0) if z_bdim is not None else (chol.squeeze(0), None)
        return (y, coeff, chol), (0, coeff_dim, chol_dim)

    return rule


def _backward_vmap_rule(backward: torch._ops.OpOverload):
    """The batching rule of ``backward``: one call for the whole batch. Rows (g, x, coeff) get
    the vmapped dim first; z and its factor too where dz is wanted (each batch entry its own dz),
    else a shared size-1 dim where they are not vmapped. ds, one sum per batch entry, is
    ``-sum <g, Z^T c>`` over that entry's rows (:func:`_entry_dots`; zeros where forward_vjp drops
    ds); a batched strength scales the op's s = 1 result."""

    def rule(info, in_dims, grad_y, x, z, strength, coeff, chol, compute_grad_z):
        n = info.batch_size
        g_bdim, x_bdim, z_bdim, s_bdim, c_bdim, f_bdim, _ = in_dims
        g, x, coeff = _expanded(grad_y, g_bdim, n), _expanded(x, x_bdim, n), _expanded(coeff, c_bdim, n)
        z_batched = z_bdim is not None or f_bdim is not None or compute_grad_z
        if z_batched:
            z, chol = _expanded(z, z_bdim, n), _expanded(chol, f_bdim, n)
        else:
            z, chol = z.unsqueeze(0), chol.unsqueeze(0)
        coeff, chol = coeff.contiguous(), chol.contiguous()
        s = strength if s_bdim is None else strength.new_ones(())
        dx, dz, _ = backward(g, x, z, s, coeff, chol, compute_grad_z)
        acc = coeff.dtype
        if getattr(_DS_UNUSED, "depth", 0):
            ds = coeff.new_zeros(n)  # nothing reads it
        else:
            ds = -_entry_dots(coeff, z.to(acc), g.to(acc))
        if s_bdim is not None:
            sb = strength.movedim(s_bdim, 0).to(acc)
            ga = g.to(acc)
            dx = (ga - sb.reshape(n, *([1] * (x.dim() - 1))) * (ga - dx.to(acc))).to(dx.dtype)
            if compute_grad_z:
                dz = (sb.reshape(n, *([1] * (z.dim() - 1))) * dz.to(acc)).to(dz.dtype)
        return (dx, dz, ds), (0, 0 if compute_grad_z else None, 0)

    return rule


_LIBRARIES: list = []  # the registrations below last as long as these objects


def _register_gram_solve() -> None:
    lib = torch.library.Library("purified_ops", "FRAGMENT")
    lib.define(_GRAM_SOLVE_SCHEMA)
    op = _gram_solve()
    lib.impl("gram_solve", _gram_solve_impl, "CompositeExplicitAutograd")
    lib.impl("gram_solve", _autograd_kernel(_GramSolveAutograd, op, op), "Autograd", with_keyset=True)
    torch.library.register_vmap("purified_ops::gram_solve", _gram_solve_vmap_rule, lib=lib)
    _LIBRARIES.append(lib)


def register(namespace: str, module) -> None:
    """The derivatives and batching rules of a namespace's ``purify_forward`` and
    ``purify_backward`` (and, once, ``purified_ops::gram_solve``, which their rules call). The
    ops' Autograd kernels are C++, registered by the extension ``module`` that defines them;
    they call these rules where a derivative is taken."""
    if not hasattr(torch.ops.purified_ops, "gram_solve"):
        _register_gram_solve()
    ops = getattr(torch.ops, namespace)
    forward, backward = ops.purify_forward.default, ops.purify_backward.default
    dispatch = _Dispatch(forward, backward)
    module._set_python_rules(_rules_kernel(_PurifyForwardAutograd, dispatch),
                             _rules_kernel(_PurifyBackwardAutograd, dispatch),
                             functools.partial(forward_vjp, dispatch))
    lib = torch.library.Library(namespace, "IMPL")
    torch.library.register_vmap(f"{namespace}::purify_forward", _forward_vmap_rule(forward), lib=lib)
    # The float-strength overload (a number: never batched) under vmap without a derivative;
    # with one, its Autograd kernel calls purify_forward instead.
    torch.library.register_vmap(f"{namespace}::purify_forward.float_strength",
                                _forward_vmap_rule(ops.purify_forward.float_strength), lib=lib)
    torch.library.register_vmap(f"{namespace}::purify_backward", _backward_vmap_rule(backward), lib=lib)
    _LIBRARIES.append(lib)
