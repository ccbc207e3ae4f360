"""The purification operator in plain PyTorch: the specification in code.

Per row ``x`` (length D) with K task-irrelevant directions ``Z`` (K x D)::

    G = Z Z^T + eps I,    c = G^{-1} Z x,    y = x - s Z^T c

Everything here is differentiable by autograd (double backward too), runs on
any device and any K, and serves as the oracle for the tests and the fallback
when no compiled kernel serves.  Inputs are assumed valid: validation lives in
:mod:`purified_ops._input_checks`, above this module.
"""
from __future__ import annotations

import contextlib
import math
import struct

import torch

__all__ = ["purify", "purify_forward", "purify_backward", "purify_jvp", "regularized_cholesky", "cholesky_solve",
           "factor_order", "direction_scale", "accumulate_dtype", "as_directions"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for inputs of ``dtype``: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_directions(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """View ``z`` as ``[..., K, D]``: a z with as many dims as x holds one direction (K = 1)."""
    return z.unsqueeze(-2) if z.dim() == x.dim() else z


# The fraction of G_jj below which a remaining pivot is passed over (row_math.h's pivot_fraction).
PIVOT_FRACTION = 0.25


def regularized_cholesky(gram: torch.Tensor, eps) -> torch.Tensor:
    """The Cholesky factor of ``gram`` (``Z Z^T + eps I``, ``[..., K, K]``) with the kernels'
    regularization and pivoting (``cholesky_inplace`` in csrc/row_math.h), differentiable by
    autograd. ``eps``: a float, or a tensor of gram's batch shape (one per matrix).

    Returned in direction rows, as the ops return ``chol``: row i is direction i's row of the
    factor L in pivot order (``M = P^T L``, so ``M M^T = gram``); where the directions were
    factored in index order (every pivot at least ``PIVOT_FRACTION`` of its G_jj) M is L,
    lower triangular. Direction i was factored at the step of its row's last nonzero entry
    (:func:`factor_order`).

    The next direction is the remaining one of lowest index unless its remaining pivot is below
    ``PIVOT_FRACTION`` of its G_jj; then the remaining one with the largest such fraction (ties:
    lowest index). In exact arithmetic every pivot is ``>= eps``. In precision ``u`` (the dtype's
    machine epsilon) a pivot ``d`` is resolved only down to ``rel G_jj`` (``rel = 4 K u``), so:
    where ``d > max(eps, rel G_jj)`` it is used (exact math); where ``eps >= rel G_jj`` it is
    floored at ``eps`` (exact-math regularization); where ``d <= rel G_jj`` and ``rel G_jj > eps``
    (the direction depends on earlier ones below this precision's resolution) or ``d`` is NaN,
    the direction is dropped: its pivot becomes ``sqrt(G_jj) / u``, so its coefficient and the
    entries below it are ~0, which leaves the span of Z (hence y) unchanged up to
    ``O(eps / |z|^2)``. Entries are clamped to their exact-math bound
    ``sqrt(G_ii - sum_{p<j} L_ip^2)``. Every branch is finite, so gradients are too.
    """
    return _regularized_factor(gram, eps)[0]


def _regularized_factor(gram, eps):
    """:func:`regularized_cholesky` and its order (``[..., K]``: the direction of each step)."""
    k = gram.shape[-1]
    batch = gram.shape[:-2]
    u = torch.finfo(gram.dtype).eps
    rel = 4 * k * u
    eps = torch.as_tensor(eps, dtype=gram.dtype, device=gram.device).expand(batch)
    rows = torch.arange(k, device=gram.device)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    done = torch.zeros((*batch, k), dtype=torch.bool, device=gram.device)
    cols, order = [], []
    for j in range(k):
        rem = diag
        if j:
            prev = torch.stack(cols, -1)  # [..., K, j]: the columns so far
            rem = rem - prev.square().sum(-1)
        # The pivot: the remaining direction of lowest index, or the one with the largest
        # remaining fraction where that one's is below PIVOT_FRACTION.
        key = torch.nan_to_num((rem / diag).detach(), nan=-1.0).masked_fill(done, -math.inf)
        natural = (~done).to(torch.int8).argmax(-1, keepdim=True)
        piv = torch.where(key.gather(-1, natural) >= PIVOT_FRACTION, natural, key.argmax(-1, keepdim=True))
        v = gram.gather(-1, piv.unsqueeze(-2).expand(*batch, k, 1)).squeeze(-1)  # G[:, piv]
        if j:
            v = v - (prev @ prev.gather(-2, piv.unsqueeze(-1).expand(*batch, 1, j)).transpose(-1, -2)).squeeze(-1)
        gjj = diag.gather(-1, piv).squeeze(-1)
        relf = rel * gjj
        d = v.gather(-1, piv).squeeze(-1)
        dropped = torch.isnan(d) | ((relf > eps) & (d <= relf))
        kept = torch.where(d > eps, d, eps).sqrt()
        r = torch.where(dropped, gjj.sqrt() / u, kept).unsqueeze(-1)
        # floored above zero (not at it) so that sqrt's derivative stays finite where unused
        bound = rem.clamp(min=torch.finfo(rem.dtype).tiny).sqrt()
        below = torch.clamp(v / r, -bound, bound)
        this = rows == piv
        cols.append(torch.where(this, r, torch.where(done, torch.zeros_like(r), below)))
        order.append(piv)
        done = done | this
    return torch.stack(cols, -1), torch.cat(order, -1)


def factor_order(chol: torch.Tensor) -> torch.Tensor:
    """The pivot order of a factor in direction rows (``[..., K, K]``, :func:`regularized_cholesky`):
    ``order[..., t]`` is the direction factored at step t, the one whose row's last nonzero entry
    (its pivot) is in column t (row_math.h's ``factor_order``)."""
    k = chol.shape[-1]
    cols = torch.arange(k, device=chol.device)
    step = torch.where(chol != 0, cols, 0).amax(-1)
    return torch.argsort(step, dim=-1, stable=True)


def cholesky_solve(chol: torch.Tensor, rhs: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """``G^{-1} rhs`` for ``rhs [..., K]`` and the factor ``chol`` of G in direction rows
    (:func:`regularized_cholesky`), whose pivot ``order`` is found from it where not given
    (:func:`factor_order`); ``chol``'s batch dims broadcast against rhs's.

    The factor's rows and rhs are taken in pivot order, then forward and back substitution, one
    direction at a time as ``cholesky_solve_inplace`` (csrc/row_math.h) does, in elementwise ops,
    gathers and sums only: ONNX has no triangular solve, and this is also what the op's
    decomposition for export runs (:func:`purify_forward`)."""
    k = rhs.shape[-1]
    order = factor_order(chol) if order is None else order
    lower = chol.gather(-2, order.unsqueeze(-1).expand(*order.shape, k))  # L in pivot order
    order = order.expand(*rhs.shape[:-1], k)
    rhs = rhs.gather(-1, order)
    w: list[torch.Tensor] = []
    for i in range(k):
        v = rhs[..., i]
        if i:
            v = v - (lower[..., i, :i] * torch.stack(w, -1)).sum(-1)
        w.append(v / lower[..., i, i])
    b: list[torch.Tensor] = [w[-1]] * k
    for i in reversed(range(k)):
        v = w[i]
        if i < k - 1:
            v = v - (lower[..., i + 1:, i] * torch.stack(b[i + 1:], -1)).sum(-1)
        b[i] = v / lower[..., i, i]
    sol = torch.stack(b, -1)
    return torch.empty_like(sol).scatter(-1, order, sol)


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2 v) exactly (as a float tensor), for positive finite v: log2's rounding corrected
    by comparing with exact powers of two (no frexp: it has no ONNX operator)."""
    e = torch.floor(torch.log2(v))
    e = torch.where(torch.exp2(e) > v, e - 1, e)
    return torch.where(torch.exp2(e + 1) <= v, e + 1, e)


def direction_scale(amax: torch.Tensor, d: int, eps: float):
    """The power of two ``m`` each direction set is divided by, as ``(1 / m, eps / m^2)``
    (row_math.h's ``direction_scale``, for ``amax`` the largest |z| entry of each set): m brings
    amax to [1, 2), but no further than keeps eps / m^2 a normal number unless more is needed to
    keep every Gram entry of the D-long directions finite (then eps / m^2 is floored at the
    smallest normal number); never below 1. The op is invariant to the scale (eps aside), and a
    power of two scales exactly: results are bitwise the unscaled ones wherever nothing over- or
    underflows."""
    fi = torch.finfo(amax.dtype)
    min_exponent, max_exponent = math.frexp(fi.tiny)[1], math.frexp(fi.max)[1]  # as C++ numeric_limits
    held = struct.unpack("f", struct.pack("f", eps))[0] if amax.dtype != torch.float64 else eps  # as the kernels hold it
    e_eps = (math.frexp(held)[1] - min_exponent) // 2
    log2_d = max(0, math.ceil(math.log2(d))) if d > 1 else 0
    ok = torch.isfinite(amax) & (amax > 0)
    big = _floor_log2(torch.where(ok, amax, torch.ones_like(amax)))  # amax in [2^big, 2^(big + 1))
    e = torch.minimum(big, torch.clamp(big + 1 - ((max_exponent - 3) - log2_d) // 2, min=e_eps)).clamp(min=0)
    inv_m = torch.exp2(-torch.where(ok, e, torch.zeros_like(e)))
    # eps 2^-e 2^-e: each product exact wherever the result is a normal number
    return inv_m, (eps * inv_m * inv_m).clamp(min=fi.tiny)


def _scaled(za, eps):
    """za divided by its sets' power-of-two scale, and (1 / m, eps') per set ([..., 1, 1], [...])."""
    inv_m, eps_scaled = direction_scale(za.detach().abs().amax((-2, -1)), za.shape[-1], eps)
    inv_m = inv_m.unsqueeze(-1).unsqueeze(-1)
    return za * inv_m, inv_m, eps_scaled


def _factor_and_solve(xa, za, eps):
    """The regularized factor of G = Z Z^T + eps I, its order and c = G^{-1} Z x (c broadcast over
    z's rows); eps a float or a tensor of z's batch shape."""
    gram = za @ za.transpose(-1, -2)
    eps_t = torch.as_tensor(eps, dtype=gram.dtype, device=gram.device)
    gram = gram + eps_t.unsqueeze(-1).unsqueeze(-1) * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol, order = _regularized_factor(gram, eps)
    return chol, order, cholesky_solve(chol, (za @ xa.unsqueeze(-1)).squeeze(-1), order)


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
        # Z / m and eps / m^2 (direction_scale): the factor m L' of G and c = c' / m returned; y
        # from the scaled ones (the same numbers: Z'^T c' = Z^T c), so that its derivative, g Z'^T,
        # cannot overflow either
        zs, inv_m, eps_s = _scaled(za, eps)
        chol, _, c = _factor_and_solve(xa, zs, eps_s)
        # s c first, as the kernels do: a non-finite strength then gives their Inf/NaN pattern
        y = (xa - ((s * c).unsqueeze(-2) @ zs).squeeze(-2)).to(x.dtype)
        return y, c * inv_m.squeeze(-1), chol / inv_m


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
        xa, (za, inv_m, eps_s) = x.to(acc), _scaled(z.to(acc), eps)
        s = strength.to(acc) if isinstance(strength, torch.Tensor) else strength
        chol, order, c = _factor_and_solve(xa, za, eps_s)
        p = (c.unsqueeze(-2) @ za).squeeze(-2)
        y_t = torch.zeros_like(p)
        if x_t is not None or z_t is not None:
            w = x_t.to(acc) if x_t is not None else torch.zeros_like(xa)
            if z_t is not None:
                zta = z_t.to(acc) * inv_m  # the same scale as z: y_t is invariant to it
                zt_c = (c.unsqueeze(-2) @ zta).squeeze(-2)
                w = w - zt_c
                r = (zta @ (xa - p).unsqueeze(-1)).squeeze(-1) + (za @ w.unsqueeze(-1)).squeeze(-1)
            else:
                zt_c, r = 0, (za @ w.unsqueeze(-1)).squeeze(-1)
            v = cholesky_solve(chol, r, order)
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
        xa, ga, (za, inv_m, eps_s) = x.to(acc), grad_y.to(acc), _scaled(z.to(acc), eps)
        s = strength.to(acc) if isinstance(strength, torch.Tensor) else strength
        chol, order, c = _factor_and_solve(xa, za, eps_s)
        u = cholesky_solve(chol, (za @ ga.unsqueeze(-1)).squeeze(-1), order)
        p = (c.unsqueeze(-2) @ za).squeeze(-2)
        q = (u.unsqueeze(-2) @ za).squeeze(-2)
        dx = ga - s * q
        # with z scaled by 1 / m, c and u are m times the unscaled ones: dz picks up 1 / m
        dz_rows = -s * (c.unsqueeze(-1) * (ga - q).unsqueeze(-2) + u.unsqueeze(-1) * (xa - p).unsqueeze(-2)) * inv_m
        dz = _sum_to(dz_rows, z.shape)
        ds = -(ga * p).sum()
        return dx, dz, ds
