"""The purification operator in plain PyTorch: the specification in code.

Per row ``x`` (length D) with K task-irrelevant directions ``Z`` (K x D)::

    G = Z Z^T + eps I,    c = G^{-1} Z x,    y = x - s Z^T c

Everything here is differentiable by autograd (double backward too), runs on
any device and any K, and serves as the oracle for the tests and the fallback
when no compiled kernel serves.  Inputs are assumed valid: validation lives in
:mod:`purified_ops._validate`, above this module.
"""
from __future__ import annotations

import torch

__all__ = ["purify", "purify_backward", "accumulate_dtype", "as_directions"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for inputs of ``dtype``: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_directions(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """View ``z`` as ``[..., K, D]``: a z with as many dims as x holds one direction (K = 1)."""
    return z.unsqueeze(-2) if z.dim() == x.dim() else z


def _solve_coefficients(xa, za, eps):
    gram = za @ za.transpose(-1, -2)
    gram = gram + eps * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    rhs = (za @ xa.unsqueeze(-1)).squeeze(-1)  # Z x, [..., K], broadcast over z's leading dims
    gram = gram.expand(*rhs.shape[:-1], *gram.shape[-2:])
    return gram, torch.linalg.solve(gram, rhs)


def purify(x: torch.Tensor, z: torch.Tensor, *, strength=1.0, eps: float = 1e-6) -> torch.Tensor:
    """``x - strength * proj_{span Z}(x)`` per row, computed in float32 (float64 for float64).

    ``x``: ``[..., D]``; ``z``: ``[..., D]`` (K = 1) or ``[..., K, D]`` with leading dims equal to
    x's or 1. Returns a tensor of x's shape in the promoted dtype of x and z.
    """
    out_dtype = torch.promote_types(x.dtype, z.dtype)
    acc = accumulate_dtype(out_dtype)
    xa, za = x.to(acc), as_directions(x, z).to(acc)
    s = strength.to(acc) if isinstance(strength, torch.Tensor) else strength
    _, c = _solve_coefficients(xa, za, eps)
    proj = (c.unsqueeze(-2) @ za).squeeze(-2)  # Z^T c, [..., D]
    return (xa - s * proj).to(out_dtype)


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape`` (sums over the broadcast dims)."""
    lead = t.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and t.shape[i + lead] != 1)
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


def purify_backward(grad_y, x, z, strength, eps):
    """The closed-form backward of :func:`purify` (DESIGN.md section 2), differentiable itself.

    With ``u = G^{-1} Z g``, ``p = Z^T c``, ``q = Z^T u``::

        dx = g - s q,   dZ = -s (c (g - q)^T + u (x - p)^T),   ds = -sum <g, p>

    ``z`` must be ``[..., K, D]``. Returns ``(dx, dz, ds)`` in float32 (float64 for float64):
    dx of x's shape, dz of z's shape (summed over broadcast rows), ds a 0-dim tensor.
    """
    acc = accumulate_dtype(torch.promote_types(x.dtype, z.dtype))
    xa, za, ga = x.to(acc), z.to(acc), grad_y.to(acc)
    s = strength.to(acc) if isinstance(strength, torch.Tensor) else torch.tensor(strength, dtype=acc, device=x.device)
    gram, c = _solve_coefficients(xa, za, eps)
    u = torch.linalg.solve(gram, (za @ ga.unsqueeze(-1)).squeeze(-1))
    p = (c.unsqueeze(-2) @ za).squeeze(-2)
    q = (u.unsqueeze(-2) @ za).squeeze(-2)
    dx = ga - s * q
    dz_rows = -s * (c.unsqueeze(-1) * (ga - q).unsqueeze(-2) + u.unsqueeze(-1) * (xa - p).unsqueeze(-2))
    dz = _sum_to(dz_rows, z.shape)
    ds = -(ga * p).sum()
    return dx, dz, ds
