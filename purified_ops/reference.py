"""The purification operator in plain PyTorch: the specification in code.

Per row ``x`` (length D) with K task-irrelevant directions ``Z`` (K x D)::

    G = Z Z^T + eps I,    c = G^{-1} Z x,    y = x - s Z^T c

Everything here is differentiable by autograd (double backward too), runs on
any device and any K, and serves as the oracle for the tests and the fallback
when no compiled kernel serves.  Inputs are assumed valid: validation lives in
:mod:`purified_ops._validate`, above this module.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["purify", "purify_forward", "purify_backward", "purify_jvp", "regularized_cholesky", "cholesky_solve", "accumulate_dtype",
           "as_directions"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for inputs of ``dtype``: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_directions(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """View ``z`` as ``[..., K, D]``: a z with as many dims as x holds one direction (K = 1)."""
    return z.unsqueeze(-2) if z.dim() == x.dim() else z


def regularized_cholesky(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """The lower Cholesky factor of ``gram`` (``Z Z^T + eps I``, ``[..., K, K]``) with the
    kernels' regularization (``cholesky_inplace`` in csrc/row_math.h), differentiable by autograd.

    In exact arithmetic every pivot is ``>= eps``. In precision ``u`` (the dtype's machine
    epsilon) a pivot ``d`` is resolved only down to ``rel G_jj`` (``rel = 4 K u``), so: where
    ``d > max(eps, rel G_jj)`` it is used (exact math); where ``eps >= rel G_jj`` it is floored at
    ``eps`` (exact-math regularization); where ``d <= rel G_jj`` and ``rel G_jj > eps`` (the
    direction depends on earlier ones below this precision's resolution) or ``d`` is NaN, the
    direction is dropped: its pivot becomes ``sqrt(G_jj) / u``, so its coefficient and the
    entries below it are ~0, which leaves the span of Z (hence y) unchanged up to
    ``O(eps / |z|^2)``. Entries are clamped to their exact-math bound
    ``sqrt(G_ii - sum_{p<j} L_ip^2)``. Every branch is finite, so gradients are too.
    """
    k = gram.shape[-1]
    u = torch.finfo(gram.dtype).eps
    rel = 4 * k * u
    rows = torch.arange(k, device=gram.device)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    cols = []
    for j in range(k):
        v, rem = gram[..., :, j], diag
        if j:
            done = torch.stack(cols, -1)  # [..., K, j]: the columns so far
            v = v - (done @ done[..., j, :].unsqueeze(-1)).squeeze(-1)
            rem = rem - done.square().sum(-1)
        gjj = gram[..., j, j]
        relf = rel * gjj
        d = v[..., j]
        dropped = torch.isnan(d) | ((relf > eps) & (d <= relf))
        kept = torch.where(d > eps, d, torch.full_like(d, eps)).sqrt()
        r = torch.where(dropped, gjj.sqrt() / u, kept).unsqueeze(-1)
        # floored above zero (not at it) so that sqrt's derivative stays finite where unused
        bound = rem.clamp(min=torch.finfo(rem.dtype).tiny).sqrt()
        below = torch.clamp(v / r, -bound, bound)
        cols.append(torch.where(rows > j, below, torch.where(rows == j, r, torch.zeros_like(r))))
    return torch.stack(cols, -1)


def cholesky_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^{-1} rhs`` for ``rhs [..., K]``; ``chol``'s batch dims broadcast against rhs's.

    Forward then back substitution, one direction at a time as ``cholesky_solve_inplace``
    (csrc/row_math.h) does, in elementwise ops and sums only: ONNX has no triangular solve, and
    this is also what the op's decomposition for export runs (:func:`purify_forward`)."""
    k = rhs.shape[-1]
    w: list[torch.Tensor] = []
    for i in range(k):
        v = rhs[..., i]
        if i:
            v = v - (chol[..., i, :i] * torch.stack(w, -1)).sum(-1)
        w.append(v / chol[..., i, i])
    b: list[torch.Tensor] = [w[-1]] * k
    for i in reversed(range(k)):
        v = w[i]
        if i < k - 1:
            v = v - (chol[..., i + 1:, i] * torch.stack(b[i + 1:], -1)).sum(-1)
        b[i] = v / chol[..., i, i]
    return torch.stack(b, -1)


def _factor_and_solve(xa, za, eps):
    """The regularized factor of G = Z Z^T + eps I and c = G^{-1} Z x (c broadcast over z's rows)."""
    gram = za @ za.transpose(-1, -2)
    gram = gram + eps * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = regularized_cholesky(gram, eps)
    return chol, cholesky_solve(chol, (za @ xa.unsqueeze(-1)).squeeze(-1))


def _no_autocast(device: torch.device):
    """The math runs in the accumulate dtype also inside an autocast region (which would round
    its products to 16 bits)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def purify_forward(x: torch.Tensor, z: torch.Tensor, strength, eps: float):
    """The registered op ``purified_ops::purify_forward`` in standard PyTorch ops: ``(y, coeff,
    chol)`` with the op's shapes and dtypes, for its canonical arguments (x and z of one dtype,
    z ``[..., K, D]``; strength a float or a 0-dim tensor). Its decomposition for export
    (:func:`purified_ops.export_decompositions`, ONNX): no linear-algebra ops."""
    acc = accumulate_dtype(x.dtype)
    with _no_autocast(x.device):
        xa, za = x.to(acc), z.to(acc)
        s = strength.to(acc) if isinstance(strength, torch.Tensor) else strength
        chol, c = _factor_and_solve(xa, za, eps)
        # s c first, as the kernels do: a non-finite strength then gives their Inf/NaN pattern
        y = (xa - ((s * c).unsqueeze(-2) @ za).squeeze(-2)).to(x.dtype)
        return y, c, chol


def purify(x: torch.Tensor, z: torch.Tensor, *, strength=1.0, eps: float = 1e-6) -> torch.Tensor:
    """``x - strength * proj_{span Z}(x)`` per row, computed in float32 (float64 for float64).

    ``x``: ``[..., D]``; ``z``: ``[..., D]`` (K = 1) or ``[..., K, D]`` with leading dims equal to
    x's or 1. Returns a tensor of x's shape in the promoted dtype of x and z.
    """
    out_dtype = torch.promote_types(x.dtype, z.dtype)
    return purify_forward(x.to(out_dtype), as_directions(x, z).to(out_dtype), strength, eps)[0]


def purify_jvp(x, z, strength, eps, x_t, z_t, strength_t):
    """The forward-mode derivative of :func:`purify`: the tangent of y for the tangents of x, z
    and strength (each may be None, meaning zero), differentiable itself.

    With ``p = Z^T c``, ``w = x_t - Z_t^T c`` and ``v = G^{-1} (Z_t (x - p) + Z w)``::

        y_t = x_t - s_t p - s (Z_t^T c + Z^T v)

    ``z`` and ``z_t`` must be ``[..., K, D]``. Returns y_t in the promoted dtype of x and z.
    """
    out_dtype = torch.promote_types(x.dtype, z.dtype)
    acc = accumulate_dtype(out_dtype)
    with _no_autocast(x.device):
        xa, za = x.to(acc), z.to(acc)
        s = strength.to(acc) if isinstance(strength, torch.Tensor) else strength
        chol, c = _factor_and_solve(xa, za, eps)
        p = (c.unsqueeze(-2) @ za).squeeze(-2)
        y_t = torch.zeros_like(p)
        if x_t is not None or z_t is not None:
            w = x_t.to(acc) if x_t is not None else torch.zeros_like(xa)
            if z_t is not None:
                zta = z_t.to(acc)
                zt_c = (c.unsqueeze(-2) @ zta).squeeze(-2)
                w = w - zt_c
                r = (zta @ (xa - p).unsqueeze(-1)).squeeze(-1) + (za @ w.unsqueeze(-1)).squeeze(-1)
            else:
                zt_c, r = 0, (za @ w.unsqueeze(-1)).squeeze(-1)
            v = cholesky_solve(chol, r)
            y_t = y_t - s * (zt_c + (v.unsqueeze(-2) @ za).squeeze(-2))
            if x_t is not None:
                y_t = y_t + x_t.to(acc)
        if strength_t is not None:
            y_t = y_t - strength_t.to(acc) * p
        return y_t.to(out_dtype)


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape`` (sums over the broadcast dims)."""
    lead = t.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and t.shape[i + lead] != 1)
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


def purify_backward(grad_y, x, z, strength, eps):
    """The closed-form backward of :func:`purify` (docs/DESIGN.md section 2), differentiable itself.

    With ``u = G^{-1} Z g``, ``p = Z^T c``, ``q = Z^T u``::

        dx = g - s q,   dZ = -s (c (g - q)^T + u (x - p)^T),   ds = -sum <g, p>

    ``z`` must be ``[..., K, D]``. Returns ``(dx, dz, ds)`` in float32 (float64 for float64):
    dx of x's shape, dz of z's shape (summed over broadcast rows), ds a 0-dim tensor.
    """
    acc = accumulate_dtype(torch.promote_types(x.dtype, z.dtype))
    with _no_autocast(x.device):
        xa, za, ga = x.to(acc), z.to(acc), grad_y.to(acc)
        s = strength.to(acc) if isinstance(strength, torch.Tensor) else strength
        chol, c = _factor_and_solve(xa, za, eps)
        u = cholesky_solve(chol, (za @ ga.unsqueeze(-1)).squeeze(-1))
        p = (c.unsqueeze(-2) @ za).squeeze(-2)
        q = (u.unsqueeze(-2) @ za).squeeze(-2)
        dx = ga - s * q
        dz_rows = -s * (c.unsqueeze(-1) * (ga - q).unsqueeze(-2) + u.unsqueeze(-1) * (xa - p).unsqueeze(-2))
        dz = _sum_to(dz_rows, z.shape)
        ds = -(ga * p).sum()
        return dx, dz, ds
