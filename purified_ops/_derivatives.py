"""The derivative of ``purify_forward``, registered on the op itself (docs/DESIGN.md, section 3):
its Autograd kernel and its batching rule, for the library's namespace and the emulated CUDA
one. Every caller of the op then differentiates it: eager code, torch.compile, torch.func (also
under compile), exported programs, traced modules."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._C._functorch import get_single_level_autograd_function_allowed, set_single_level_autograd_function_allowed
from torch.autograd import forward_ad as _fwad
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from . import reference

__all__ = ["register"]


def _transforms_active() -> bool:
    """Whether a torch.func transform or a forward-mode AD level is active: then the op records
    its derivative even with nothing requiring grad, and a backward is itself differentiated."""
    return _fwad._current_level >= 0 or torch._C._are_functorch_transforms_active()


@dataclass(frozen=True)
class _Dispatch:
    """Where :class:`_PurifyAutograd`'s forward continues: the namespace's ops (the library's, or
    the emulated CUDA ones), called with the dispatch keys below the Autograd kernel that called
    it (``keyset``, that kernel's)."""

    forward: torch._ops.OpOverload
    backward: torch._ops.OpOverload

    def below_autograd(self, keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return self.forward.redispatch(keyset & torch._C._after_autograd_keyset, *args)


class _PurifyAutograd(torch.autograd.function._SingleLevelFunction):
    """The derivative of ``purify_forward``, applied by the op's own Autograd kernel, so that
    every caller of the op differentiates it: eager code, torch.compile, torch.func (also under
    compile), exported programs, traced modules (docs/DESIGN.md, "Autograd").

    Backward: the fused ``purify_backward`` op; where the backward is itself recorded (double
    backward, ``create_graph=True``) or seen by a torch.func transform, the same formulas in
    PyTorch ops (:func:`purified_ops.reference.purify_backward`), which autograd differentiates.
    Forward mode: :func:`purified_ops.reference.purify_jvp`.

    A single-level Function (what functorch itself generates for an autograd.Function): the
    Autograd kernel runs at one functorch level at a time, with its inputs unwrapped to that
    level, exactly as the Autograd kernel of a built-in op does.
    """

    @staticmethod
    def forward(x, z, strength, eps, dispatch: _Dispatch, keyset):
        # Continues the dispatch below autograd with grad modes on, as functorch's own
        # single-level Functions do: a transform below this level then records the op too.
        with torch.enable_grad(), _set_fwd_grad_enabled(True):
            return dispatch.below_autograd(keyset, x, z, strength, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, z, strength, eps, dispatch, _ = inputs
        _, coeff, chol = output
        ctx.mark_non_differentiable(coeff, chol)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, z, strength, coeff, chol)
        ctx.save_for_forward(x, z, strength)
        ctx.eps, ctx.backward_op = eps, dispatch.backward

    @staticmethod
    def backward(ctx, grad_y, _grad_coeff, _grad_chol):
        x, z, strength, coeff, chol = ctx.saved_tensors
        _, need_z, need_s, _, _, _ = ctx.needs_input_grad
        if grad_y is None:
            return None, None, None, None, None, None
        if torch.is_grad_enabled() or _transforms_active():
            dx, dz, ds = reference.purify_backward(grad_y, x, z, strength, ctx.eps)
            return dx.to(x.dtype), dz.to(z.dtype), ds, None, None, None
        dx, dz, ds = ctx.backward_op(grad_y.to(x.dtype), x, z, strength, coeff, chol, need_z)
        return dx, dz if need_z else None, ds if need_s else None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, z_t, strength_t, _eps_t, _dispatch_t, _keyset_t):
        x, z, strength = ctx.saved_tensors
        return reference.purify_jvp(x, z, strength, ctx.eps, x_t, z_t, strength_t), None, None


def _autograd_kernel(forward: torch._ops.OpOverload, backward: torch._ops.OpOverload):
    """The Autograd kernel of ``forward``: the op alone where nothing is differentiated (no
    Python Function on the inference path), else :class:`_PurifyAutograd`."""

    dispatch = _Dispatch(forward, backward)

    def kernel(keyset, x, z, strength, eps):
        if _transforms_active() or (torch.is_grad_enabled() and torch._C._any_requires_grad(x, z, strength)):
            # torch._functorch.utils.enable_single_level_autograd_function, without a generator
            # context manager's cost on every call.
            allowed = get_single_level_autograd_function_allowed()
            set_single_level_autograd_function_allowed(True)
            try:
                return _PurifyAutograd.apply(x, z, strength, eps, dispatch, keyset)
            finally:
                set_single_level_autograd_function_allowed(allowed)
        return dispatch.below_autograd(keyset, x, z, strength, eps)

    return kernel


def _vmap_rule(forward: torch._ops.OpOverload):
    """The batching rule of ``forward``: one call for the whole batch, the vmapped dim a leading
    dim of x and z (of size 1 in z when z is not batched: shared, never expanded)."""

    def rule(info, in_dims, x, z, strength, eps):
        x_bdim, z_bdim, s_bdim, _ = in_dims
        x_dim = x.dim() - (x_bdim is not None)
        x = x.movedim(x_bdim, 0) if x_bdim is not None else x.unsqueeze(0)
        z = z.movedim(z_bdim, 0) if z_bdim is not None else z.unsqueeze(0)
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


_LIBRARIES: list = []  # the registrations below last as long as these objects


def register(namespace: str) -> None:
    """The Autograd kernel and the batching rule of a namespace's ``purify_forward``."""
    ops = getattr(torch.ops, namespace)
    forward, backward = ops.purify_forward.default, ops.purify_backward.default
    lib = torch.library.Library(namespace, "IMPL")
    lib.impl("purify_forward", _autograd_kernel(forward, backward), "Autograd", with_keyset=True)
    torch.library.register_vmap(f"{namespace}::purify_forward", _vmap_rule(forward), lib=lib)
    _LIBRARIES.append(lib)
