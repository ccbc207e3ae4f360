"""The accuracy bounds of docs/DESIGN.md, the float64 evaluation of the reference they are measured
against, and the error measures they bound. The repository's tests take their bounds from here."""
from __future__ import annotations

import torch

from .. import reference

# docs/DESIGN.md: ||out - ref|| / ||ref|| against float64, for the output and every gradient.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Per-row error relative to |x| (the computation's scale), before the conditioning term.
ROW_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def reference_in_float64(x, z, strength=1.0, eps=1e-6):
    """The project's own reference (:func:`purified_ops.reference.purify`) evaluated in float64, from
    the very same (rounded) inputs: what the fused kernels' rounding is measured against. It is not
    an independent oracle; the tests check the reference itself against closed forms."""
    s = strength.double() if isinstance(strength, torch.Tensor) else strength
    return reference.purify(x.double(), z.double(), strength=s, eps=eps)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| (the absolute error where ref is zero)."""
    ref = ref.double()
    denom = ref.norm()
    diff = (out.double().reshape(ref.shape) - ref).norm()
    return (diff / denom).item() if denom > 0 else diff.item()


def unit_roundoff(dtype: torch.dtype) -> float:
    """Machine epsilon of the arithmetic dtype for inputs of ``dtype`` (float32 for 16-bit)."""
    return torch.finfo(reference.accumulate_dtype(dtype)).eps


def regularized_gram(z, eps) -> torch.Tensor:
    """``G = Z Z^T + eps I`` in float64 on z's device, for directions ``z`` of shape ``[..., K, D]``."""
    zd = z.detach().double()
    return zd @ zd.transpose(-1, -2) + eps * torch.eye(zd.shape[-2], dtype=torch.float64, device=zd.device)


def gram_condition(x, z, eps) -> torch.Tensor:
    """cond(Z Z^T + eps I) per row of x (float64), z broadcast as purify broadcasts it."""
    return torch.linalg.cond(regularized_gram(reference.as_directions(x, z), eps)).expand(x.shape[:-1])


def conditioned_row_bound(dtype, kappa, strength=1.0):
    """Bound on the per-row error of the output and of every gradient relative to its scale
    (:func:`error_scales`: |x| for y, |g| for dx, |s| (|c| |g| + |u| |x|) for dz, and for
    dstrength, one sum over the rows, sum |g_i p_i|): rounding in G = Z Z^T + eps I is amplified by
    its condition number kappa in any evaluation (near-square K, D; nearly dependent z), so the
    bound grows with it: ``(ROW_TOLERANCE + 8 u kappa) max(1, |s|)``, u the unit roundoff of the
    accumulate dtype. Measured worst (float32; K = 1 .. 16 with D = K + 1 .. 1000, random and
    nearly dependent directions, cond(G) up to ~7e6, four seeds of 32 rows each; fused CPU kernels
    of each capability, the float32 reference, the emulated CUDA kernels alike): 0.4 of the bound
    for dz, 0.17 for y and dx, 0.005 for dstrength."""
    return (ROW_TOLERANCE[dtype] + 8 * unit_roundoff(dtype) * kappa) * max(1.0, abs(float(strength)))


def error_scales(x, z, grad_y, strength=1.0, eps=1e-6):
    """What :func:`conditioned_row_bound` is relative to, in float64 from the same (rounded) inputs,
    z broadcast as purify broadcasts it: per row of x, ``kappa`` (cond(G)) and the scales of y
    (|x|), dx (|g|) and dz (``|s| (|c| |g| + |u| |x|)``, c = G^{-1} Z x, u = G^{-1} Z g: the size of
    the two terms dz sums, which cancel where x and g lie in the span); and for dstrength, one sum
    over all rows, ``sum |g_i p_i|`` with p = Z^T c. Returns a dict of those."""
    xd, gd = x.double(), grad_y.double()
    zd = reference.as_directions(x, z).double()
    gram = regularized_gram(zd, eps)
    c = torch.linalg.solve(gram, (zd @ xd.unsqueeze(-1))).squeeze(-1)
    u = torch.linalg.solve(gram, (zd @ gd.unsqueeze(-1))).squeeze(-1)
    p = (c.unsqueeze(-2) @ zd).squeeze(-2)
    s = abs(float(strength))
    return {"kappa": torch.linalg.cond(gram).expand(x.shape[:-1]), "y": xd.norm(dim=-1), "dx": gd.norm(dim=-1),
            "dz": s * (c.norm(dim=-1) * gd.norm(dim=-1) + u.norm(dim=-1) * xd.norm(dim=-1)),
            "ds": (gd * p).abs().sum()}


def span_condition(z, rank: int) -> torch.Tensor:
    """cond of the span of z's rows per row, ``(sigma_1 / sigma_rank)^2`` of z (float64), for z
    ``[..., K, D]`` of rank ``rank``: what conditions y where some directions depend on others
    (cond(G) itself is then about |z|^2 / eps, which y does not depend on)."""
    sv = torch.linalg.svdvals(z.double())
    return (sv[..., 0] / sv[..., rank - 1]).square()


def dependent_row_bound(dtype, k: int, kappa):
    """Bound on the per-row error of y relative to |x| where directions depend on others (rank <
    K, or K > D) with |z|^2 >> eps, kappa the condition of their span (``span_condition``):
    ``ROW_TOLERANCE + 8 K u kappa``, the factor's rounding amplified by the span's conditioning.
    It holds because the factorization pivots (docs/DESIGN.md section 2): measured worst (float32,
    K = 4 .. 100 of rank 1 .. 50 in D = 8 .. 64, 64 to 2048 rows, three seeds each; fused CPU
    kernels of each capability, the float32 reference, the emulated CUDA kernels alike) under a
    twentieth of the bound; without pivoting one row in ~1000 was off by up to 0.27 |x| at span
    condition 1.4."""
    return ROW_TOLERANCE[dtype] + 8 * k * unit_roundoff(dtype) * kappa


def rank_deficient_in_float64(x, z, strength=1.0, eps=1e-6):
    """The output in float64 through the D x D system, well conditioned where K >= D directions
    span R^D with |z|^2 >> eps: ``Z^T (Z Z^T + eps)^-1 Z = I - eps (Z^T Z + eps)^-1``, so
    ``y = (1 - s) x + s eps (Z^T Z + eps I)^-1 x``."""
    x64, z64 = x.double(), reference.as_directions(x, z).double()
    s = float(strength)
    m = z64.transpose(-1, -2) @ z64 + eps * torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    return (1 - s) * x64 + s * eps * torch.linalg.solve(m, x64.expand(m.shape[:-1]))


def rank_deficient_bound(dtype, k: int) -> float:
    """K >= D, |z|^2 >> eps: y is ~eps/|z|^2 of x, a cancellation no float32 evaluation resolves.
    The error is bounded relative to |x| instead (backward stability): ``64 K u`` for the
    arithmetic, plus the rounding of y to ``dtype`` (|y| <= |x| at s = 1)."""
    return 64 * k * unit_roundoff(dtype) + torch.finfo(dtype).eps


def sum_err(out, ref, terms) -> float:
    """|out - ref| / sum |terms| for a value that is the sum of ``terms``: the error relative to
    the sum's own scale. Where the terms cancel (|sum| << sum |terms|) no float32 summation is
    within 1e-5 of |sum| itself, whatever its order."""
    scale = terms.double().abs().sum()
    diff = (out.double() - ref.double()).abs().max()
    return (diff / scale).item() if scale > 0 else diff.item()


def row_err(out, ref, x) -> torch.Tensor:
    """Per-row ||out - ref|| / ||x||."""
    return (out.double() - ref.double()).norm(dim=-1) / (x.double().norm(dim=-1) + 1e-300)


def magnitude_errors(run, x0, z0, grad_y, strength, eps, z_exp: int, x_exp: int = 0) -> dict:
    """Errors of y and every gradient for z = z0 2^z_exp and x = x0 2^x_exp (exact in their dtype):
    ``run(x, z, grad_y, strength) -> (y, dx, dz, dstrength)``. The reference is the float64 op on
    (x0, z0) with eps 2^(-2 z_exp) (the op is invariant to scaling z with eps by the square, and
    linear in x; eps no smaller than float64's smallest normal, which changes nothing there) and
    the outputs are scaled back by the same powers of two (exact). Returns the relative errors
    (dstrength: against the sum of its terms, as :func:`sum_err`) by name, and ``"finite"``: whether
    every output is finite."""
    x, z = x0 * 2.0 ** x_exp, z0 * 2.0 ** z_exp
    outs = run(x, z, grad_y, strength)
    eps0 = max(eps * 2.0 ** (-2 * z_exp), torch.finfo(torch.float64).tiny)
    true, ds_terms = reference_grads_in_float64(x0, z0, strength, grad_y, eps0)
    back = (2.0 ** -x_exp, 1.0, 2.0 ** (z_exp - x_exp), 2.0 ** -x_exp)
    errors = {name: rel_err(o.double() * f, t) for name, o, t, f in zip(("y", "dx", "dz"), outs, true, back)}
    errors["dstrength"] = sum_err(outs[3].double() * back[3], true[3], ds_terms)
    errors["finite"] = all(bool(torch.isfinite(o).all()) for o in outs)
    return errors


def reference_grads_in_float64(x, z, s, g, eps):
    """(y, dx, dz, ds) of :func:`reference_in_float64` from the same rounded inputs, and the terms
    g * p whose sum is -ds (p = Z^T c, the removed part: (x - y) / s)."""
    x64, z64, s64 = (t.detach().double().requires_grad_() for t in (x, z, s))
    y = reference_in_float64(x64, z64, s64, eps)
    grads = torch.autograd.grad(y, (x64, z64, s64), g.double())
    return (y.detach(), *grads), g.double() * (x64.detach() - y.detach()) / s64.detach()
