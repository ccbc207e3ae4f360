"""The verify matrix: the fixed cases :func:`verify` runs on each backend (accuracy over K, D, layouts
and dtypes; rank-deficient, ill-conditioned and dependent directions; large magnitudes; gradcheck,
opcheck, determinism), and :func:`verify` itself."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from .. import reference
from ..ops import PurifyFunction, available_backends, build_info, purify
from .backends import EPS, STRENGTH, Backend, discover_backends, strength_tensor
from .bounds import (DTYPES, TOLERANCE, conditioned_row_bound, dependent_row_bound, error_scales, gram_condition,
                     magnitude_errors, rank_deficient_bound, rank_deficient_in_float64, reference_grads_in_float64,
                     reference_in_float64, rel_err, row_err, span_condition, sum_err)
from .report import Row, VerifyReport, cuda_image_row, dtype_name

LAYOUTS = ("rows", "shared z", "transposed x", "offset x, z")


@dataclass(frozen=True)
class _Plan:
    ks: tuple
    ds: tuple
    layouts: tuple
    gradcheck_shapes: tuple   # (x shape, z shape) pairs, float64
    opcheck_samples: int      # 0: no opcheck (its first call imports torch's test machinery, seconds)
    determinism: tuple        # (K, x shape, z shape)
    magnitude_ks: tuple = (1, 4)  # K of the large-|z| and large-x cases


FULL = _Plan(ks=(1, 2, 4, 16, 24), ds=(1, 7, 1000), layouts=LAYOUTS, magnitude_ks=(1, 2, 4, 16, 24),
             gradcheck_shapes=(((4, 7), (4, 7)), ((3, 4, 6), (3, 1, 2, 6)), ((5, 6), (1, 3, 6)),
                               ((2, 2, 24), (1, 2, 18, 24))),  # the last: K > 16, below D
             opcheck_samples=4,
             determinism=((4, (8, 64, 1000), (8, 1, 4, 1000)), (24, (4, 32, 300), (4, 1, 24, 300))))
QUICK = _Plan(ks=(1, 24), ds=(7, 1000), layouts=LAYOUTS,
              gradcheck_shapes=FULL.gradcheck_shapes[1:2], opcheck_samples=0, determinism=FULL.determinism[:1])


def _inputs(k, d, dtype, layout, device, seed):
    """x, z (z in [..., D] form for K = 1 with rows layout), grad_y; fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    # K >= D directions span R^D: with |z|^2 >> eps the output is ~eps/|z|^2 of x, which the
    # rank-deficient rows check separately; with |z|^2 ~ eps the Gram matrix is well conditioned.
    zscale = 1e-3 if k >= d else 1.0

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if layout == "shared z":    # one z per sample, shared by its 3 rows (never expanded)
        x, z = make(2, 3, d), make(2, 1, k, d, scale=zscale)
    elif layout == "transposed x":
        x, z = make(d, 5).t(), make(k, d, 5, scale=zscale).permute(2, 0, 1)
    elif layout == "offset x, z":  # storage offset 1, row stride D + 1
        x, z = make(5, d + 1)[:, 1:], make(5, k, d + 1, scale=zscale)[..., 1:]
    else:
        x, z = make(5, d), make(5, k, d, scale=zscale)
        if k == 1:
            z = z.squeeze(-2)   # the [..., D] form of a single direction
    return x, z, make(*x.shape)


def _entry_points(backend: Backend, x, z, s, g):
    """(entry name, (y, dx, dz, ds)) for the raw ops and, for a public backend, the public autograd
    path."""
    z3 = reference.as_directions(x, z)
    y, coeff, chol = backend.forward(x, z3, s, EPS)
    dx, dz, ds = backend.backward(g, x, z3, s, coeff, chol, True)
    yield "raw ops", (y, dx, dz, ds)
    if backend.public:  # purify: the checks, the promotion and the op
        xr, zr, sr = (t.detach().requires_grad_() for t in (x, z, s))
        out = purify(xr, zr, strength=sr, eps=EPS, backend=backend.name)
        yield "purify", (out.detach(), *torch.autograd.grad(out, (xr, zr, sr), g))


def _worst(pairs):
    """The (error, where) pair with the largest error; NaN counts as the largest."""
    return max(pairs, key=lambda p: math.inf if math.isnan(p[0]) else p[0])


def _accuracy_case(backend: Backend, k, d, dtype, layouts):
    """Output and every gradient against the float64 reference over the layouts and entry points."""
    errors = []
    for i, layout in enumerate(layouts):
        x, z, g = _inputs(k, d, dtype, layout, backend.device, seed=10007 * k + 101 * d + i)
        s = strength_tensor(dtype, backend.device)
        true, ds_terms = reference_grads_in_float64(x, z, s, g, EPS)
        for entry, ours in _entry_points(backend, x, z, s, g):
            for name, o, t in zip(("y", "dx", "dz"), ours, true):
                errors.append((rel_err(o, t), f"{name}, {layout}, {entry}"))
            errors.append((sum_err(ours[3], true[3], ds_terms), f"dstrength, {layout}, {entry}"))
    err, where = _worst(errors)
    tol = TOLERANCE[dtype]
    case = f"K={k} D={d}" + (" |z|^2~eps" if k >= d else "")
    return Row(backend.name, case, dtype_name(dtype), err, tol, err <= tol, where)


def _rank_deficient_case(backend: Backend, k, d, dtype):
    """K >= D, |z|^2 >> eps: the output's per-row error relative to |x|."""
    g = torch.Generator().manual_seed(7 * k + d)
    x = torch.randn(64, d, generator=g).to(backend.device, dtype)
    z = torch.randn(64, k, d, generator=g).to(backend.device, dtype)
    exact = rank_deficient_in_float64(x, z, 1.0, EPS)
    errors = [(row_err(backend.forward(x, z, strength_tensor(dtype, backend.device, 1.0), EPS)[0], exact, x)
               .max().item(), "y, raw ops")]
    if backend.public:
        errors.append((row_err(purify(x, z, eps=EPS, backend=backend.name), exact, x).max().item(), "y, purify"))
    err, where = _worst(errors)
    tol = rank_deficient_bound(dtype, k)
    return Row(backend.name, f"K={k} D={d} rank-deficient, y per row / |x|", dtype_name(dtype), err, tol,
               err <= tol, where)


def _worst_y_row(backend: Backend, dtype, x, z, ref, bound):
    """y of the raw ops (and of `purify` where the backend is public) against `ref` per row
    relative to |x|: (the worst error / bound, where, that error, its bound)."""
    s = strength_tensor(dtype, backend.device)
    outputs = [("y, raw ops", backend.forward(x, z, s, EPS)[0])]
    if backend.public:
        outputs.append(("y, purify", purify(x, z, strength=STRENGTH, eps=EPS, backend=backend.name)))
    worst = []
    for where, y in outputs:
        err = row_err(y, ref, x)
        ratio = torch.nan_to_num(err / bound, nan=math.inf)
        i = int(ratio.argmax())
        worst.append((ratio[i].item(), f"{where}, row {i}", err[i].item(), bound[i].item()))
    return max(worst)


def _dependent_case(backend: Backend, dtype):
    """Nearly dependent directions (K = 4 < D, G ill-conditioned): the output's per-row error
    relative to |x| against the bound that grows with cond(G)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1000, generator=g)
    a = torch.randn(32, 2, 1000, generator=g)
    z = torch.cat([a, a + 0.1 * torch.randn(32, 2, 1000, generator=g)], dim=1)
    x, z = x.to(backend.device, dtype), z.to(backend.device, dtype)
    ref = reference_in_float64(x, z, STRENGTH, EPS)
    bound = conditioned_row_bound(dtype, gram_condition(x, z, EPS), STRENGTH)
    ratio, where, err, tol = _worst_y_row(backend, dtype, x, z, ref, bound)
    return Row(backend.name, "K=4 D=1000 nearly dependent z, y per row / |x|", dtype_name(dtype), err, tol,
               ratio <= 1, where)


# Powers of two for the large-magnitude cases, per accumulate dtype: (z exponent, x exponent).
# |z| 2^70 (~1e21): |z|^2 overflows float32; x 2^80 with z 2^30: z.x overflows float32. float64:
# |z| 2^600 (~4e180) and x 2^700 with z 2^350.
_MAGNITUDES = {torch.float32: ((70, 0), (30, 80)), torch.float64: ((600, 0), (350, 700))}


def _magnitude_case(backend: Backend, k, dtype):
    """Large directions, and large x with moderate directions (K well below D): y and every
    gradient against the float64 reference of the same inputs scaled down by powers of two (exact), as
    relative errors against the dtype's bound (float16 inputs are skipped: nothing they hold
    overflows float32)."""
    rows = []
    acc = reference.accumulate_dtype(dtype)
    d = 7 if k < 7 else 4 * k  # K well below D: G well conditioned however large |z|
    for i, (z_exp, x_exp) in enumerate(_MAGNITUDES[acc]):
        case = f"K={k} D={d} |z| ~ 2^{z_exp}" + (f", |x| ~ 2^{x_exp}" if x_exp else "")
        if dtype == torch.float16:
            continue
        g = torch.Generator().manual_seed(97 * k + i)
        x0, z0, gy = (torch.randn(*shape, generator=g).to(backend.device, dtype) for shape in ((5, d), (5, k, d), (5, d)))
        s = strength_tensor(dtype, backend.device)
        errors = []
        for entry, run in _magnitude_runs(backend):
            found = magnitude_errors(run, x0, z0, gy, s, EPS, z_exp, x_exp)
            if not found.pop("finite"):
                errors.append((math.inf, f"non-finite output, {entry}"))
            errors.extend((e, f"{name}, {entry}") for name, e in found.items())
        err, where = _worst(errors)
        tol = TOLERANCE[dtype]
        rows.append(Row(backend.name, case, dtype_name(dtype), err, tol, err <= tol, where))
    return rows


def _magnitude_runs(backend: Backend):
    """(entry name, run(x, z, grad_y, strength) -> (y, dx, dz, ds)) for the raw ops and, for a
    public backend, purify (PurifyFunction)."""
    def raw(x, z, gy, s):
        y, coeff, chol = backend.forward(x, z, s, EPS)
        return (y, *backend.backward(gy, x, z, s, coeff, chol, True))

    yield "raw ops", raw
    if backend.public:
        def public(x, z, gy, s):
            xr, zr, sr = (t.detach().requires_grad_() for t in (x, z, s))
            out = purify(xr, zr, strength=sr, eps=EPS, backend=backend.name)
            return (out.detach(), *torch.autograd.grad(out, (xr, zr, sr), gy))

        yield "purify", public


def _conditioned_inputs(dtype, device):
    """(name, x, z, grad_y): 64 rows of random K = 16 directions in D = 17 (near-square: cond(G)
    from ~1e2 to ~1e6), and 64 rows of K = 8 in D = 32 whose last four directions are the first
    four plus 10^-3 .. 10^-1 of noise (nearly dependent: cond(G) up to ~1e6)."""
    g = torch.Generator().manual_seed(17)
    near = (torch.randn(64, 17, generator=g), torch.randn(64, 16, 17, generator=g), torch.randn(64, 17, generator=g))
    z = torch.randn(64, 8, 32, generator=g)
    delta = 10 ** (-1 - 2 * torch.rand(64, 1, 1, generator=g))
    z = torch.cat([z[:, :4], z[:, :4] + delta * torch.randn(64, 4, 32, generator=g)], dim=1)
    nearly = (torch.randn(64, 32, generator=g), z, torch.randn(64, 32, generator=g))
    for name, tensors in (("K=16 D=17", near), ("K=8 D=32 nearly dependent", nearly)):
        yield (name, *(t.to(device, dtype) for t in tensors))


def _conditioned_case(backend: Backend, dtype):
    """Ill-conditioned G (near-square K, D; nearly dependent directions): the per-row error of y and
    of every gradient relative to its scale against conditioned_row_bound (cond(G) of the row;
    dstrength, one sum, against the largest cond(G) of the call); the row nearest its bound."""
    worst = []
    for name, x, z, gy in _conditioned_inputs(dtype, backend.device):
        s = strength_tensor(dtype, backend.device)
        scales = error_scales(x, z, gy, s, EPS)
        bound = conditioned_row_bound(dtype, scales["kappa"], STRENGTH)
        (ty, tdx, tdz, tds), _ = reference_grads_in_float64(x, z, s, gy, EPS)
        for entry, run in _magnitude_runs(backend):
            y, dx, dz, ds = run(x, z, gy, s)
            errors = {"y": (y.double() - ty).norm(dim=-1) / scales["y"],
                      "dx": (dx.double() - tdx).norm(dim=-1) / scales["dx"],
                      "dz": (dz.double() - tdz).flatten(-2).norm(dim=-1) / scales["dz"]}
            for what, err in errors.items():
                ratio = torch.nan_to_num(err / bound, nan=math.inf)
                i = int(ratio.argmax())
                worst.append((ratio[i].item(), f"{what}, {name}, {entry}, row {i}", err[i].item(), bound[i].item()))
            ds_err = (ds.double() - tds).abs().item() / scales["ds"].item()
            ds_bound = bound.max().item()
            worst.append((ds_err / ds_bound, f"dstrength, {name}, {entry}", ds_err, ds_bound))
    ratio, where, err, tol = max(worst, key=lambda w: math.inf if math.isnan(w[0]) else w[0])
    return Row(backend.name, "ill-conditioned G, y and gradients per row / scale", dtype_name(dtype), err, tol,
               ratio <= 1, where)


def _dependent_directions_case(backend: Backend, dtype):
    """Exactly dependent directions, K = 16 of rank 5 in D = 32, 512 rows: y per row relative to
    |x| against dependent_row_bound (kappa: the condition of the span)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(512, 16, 5, generator=g) @ torch.randn(512, 5, 32, generator=g)
    x = torch.randn(512, 32, generator=g)
    x, z = x.to(backend.device, dtype), z.to(backend.device, dtype)
    ref = reference_in_float64(x, z, STRENGTH, EPS)
    bound = dependent_row_bound(dtype, 16, span_condition(z, 5))
    ratio, where, err, tol = _worst_y_row(backend, dtype, x, z, ref, bound)
    return Row(backend.name, "K=16 D=32 rank 5 dependent z, y per row / |x|", dtype_name(dtype), err, tol,
               ratio <= 1, where)


class _RawOpsFunction(torch.autograd.Function):
    """First-order autograd over one backend's forward and backward callables (canonical
    arguments), for gradcheck: checks the backend's backward, which a test double's forward would
    not reach through the registered op's own derivative."""

    @staticmethod
    def forward(ctx, x, z, strength, eps, backend):
        y, coeff, chol = backend.forward(x, z, strength, eps)
        ctx.save_for_backward(x, z, strength, coeff, chol)
        ctx.backend = backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, z, strength, coeff, chol = ctx.saved_tensors
        dx, dz, ds = ctx.backend.backward(grad_y, x, z, strength, coeff, chol, True)
        return dx, dz, ds, None, None


def _gradcheck_inputs(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    xs, zs = shapes
    x = torch.randn(xs, generator=g, dtype=torch.float64).to(device).requires_grad_()
    z = torch.randn(zs, generator=g, dtype=torch.float64).to(device).requires_grad_()
    s = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
    return x, z, s


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " ".join(text[:3])[:300]


def _gradcheck_case(backend: Backend, shapes, second_order: bool):
    """torch.autograd.gradcheck (and gradgradcheck) in float64 through the raw ops or PurifyFunction."""
    x, z, s = _gradcheck_inputs(shapes, backend.device, seed=sum(shapes[1]))
    eps = 1e-3
    if second_order:
        fn = lambda x, z, s: PurifyFunction.apply(x, z, s, eps)  # noqa: E731
        what = "gradcheck+gradgradcheck, PurifyFunction"
    else:
        fn = lambda x, z, s: _RawOpsFunction.apply(x, reference.as_directions(x, z), s, eps, backend)  # noqa: E731
        what = "gradcheck, raw ops"
    try:
        ok = torch.autograd.gradcheck(fn, (x, z, s), fast_mode=True)
        if second_order:
            ok = ok and torch.autograd.gradgradcheck(fn, (x, z, s), fast_mode=True)
        detail = ""
    except Exception as exc:  # a gradcheck failure, or the backend raising: both fail the check
        ok, detail = False, _first_line(exc)
    case = f"{what} x{list(shapes[0])} z{list(shapes[1])}"
    return Row(backend.name, case, "float64", None, None, bool(ok), detail)


def _registered(op):
    overload = getattr(op, "default", op)
    return overload if isinstance(overload, torch._ops.OpOverload) else None


def _opcheck_samples(device, count):
    f32, f64 = dict(device=device, dtype=torch.float32), dict(device=device, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    r = lambda *shape, **kw: torch.randn(*shape, generator=g, dtype=kw["dtype"]).to(device)  # noqa: E731
    s32, s64 = torch.tensor(0.7, **f32), torch.tensor(0.7, **f64)
    samples = [
        ("shared z", r(4, 5, 16, **f32), r(4, 1, 3, 16, **f32), s32),
        ("float64", r(8, 12, **f64), r(1, 2, 12, **f64), s64),
        ("offset", r(5, 17, **f32)[:, 1:], r(5, 2, 17, **f32)[..., 1:], s32),
        ("bfloat16", r(3, 4, 8, dtype=torch.bfloat16), r(3, 1, 1, 8, dtype=torch.bfloat16), s32),
    ]
    return samples[:count]


def _opcheck_case(backend: Backend, count):
    """torch.library.opcheck on the registered forward and backward ops."""
    fwd, bwd = _registered(backend.forward), _registered(backend.backward)
    if fwd is None or bwd is None:
        return [Row(backend.name, "opcheck", "-", None, None, False, "not registered torch ops")]
    rows = []
    for label, x, z, s in _opcheck_samples(backend.device, count):
        for name, op in (("purify_forward", fwd), ("purify_backward", bwd)):
            try:
                if op is fwd:
                    torch.library.opcheck(op, (x, z, s, EPS))
                else:
                    y, coeff, chol = fwd(x, z, s, EPS)
                    torch.library.opcheck(op, (torch.randn_like(y), x, z, s, coeff, chol, True))
                ok, detail = True, ""
            except Exception as exc:
                ok, detail = False, _first_line(exc)
            rows.append(Row(backend.name, f"opcheck {name}, {label}", dtype_name(x.dtype), None, None, ok, detail))
    return rows


def _determinism_case(backend: Backend, k, xs, zs, dtype):
    """Two runs of forward and backward on the same inputs give bitwise the same results."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(xs, generator=g).to(backend.device, dtype)
    z = torch.randn(zs, generator=g).to(backend.device, dtype)
    gy = torch.randn(xs, generator=g).to(backend.device, dtype)
    s = strength_tensor(dtype, backend.device)

    def run():
        y, coeff, chol = backend.forward(x, z, s, EPS)
        return (y, coeff, chol, *backend.backward(gy, x, z, s, coeff, chol, True))

    first, second = run(), run()
    names = ("y", "coeff", "chol", "dx", "dz", "ds")
    diffs = [((a.double() - b.double()).abs().max().item() if a.numel() else 0.0, n)
             for a, b, n in zip(first, second, names)]
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    worst, where = _worst(diffs)
    case = f"bitwise determinism, K={k} x{list(xs)} z{list(zs)}"
    return Row(backend.name, case, dtype_name(dtype), worst, 0.0, same, "" if same else f"{where} differs")


NOTES = [
    "worst rel. error: ||out - ref|| / ||ref|| against the float64 reference from the same rounded inputs "
    "(for dstrength = -sum g.p over all N x D products: |out - ref| / sum |g.p|, the sum's own scale, "
    "since a cancelling sum has no float32 evaluation within 1e-5 of itself), worst over y, dx, dz, dstrength, "
    "the layouts (rows, a z shared by rows, a transposed x, x and z at a storage offset) and the entry "
    "points (raw ops; for the public backends also purify); "
    "tolerance: docs/DESIGN.md's bound for the dtype (float64 1e-10, float32 1e-5, float16 3e-3, bfloat16 2e-2)",
    "|z|^2~eps: K >= D directions span R^D; z is scaled by 1e-3 so that G = Z Z^T + eps I is well conditioned "
    "and docs/DESIGN.md's bounds apply",
    "rank-deficient: K >= D with |z|^2 >> eps, where y is ~eps/|z|^2 of x (a cancellation no float32 "
    "evaluation resolves): the per-row error of y relative to |x| against the exact D x D formula "
    "y = (1 - s) x + s eps (Z^T Z + eps I)^-1 x, bound 64 K u (u: epsilon of the arithmetic dtype, float32 "
    "for 16-bit inputs) plus the dtype's epsilon (the rounding of y)",
    "nearly dependent z: z = [a, a + 0.1 n] (K = 4 < D), G ill-conditioned: the per-row error of y relative "
    "to |x| against the float64 reference, bound (r + 8 u kappa) max(1, |s|), kappa = cond(G) of the row, r: "
    "float64 1e-9, float32 2e-5, float16 4e-3, bfloat16 3e-2 (the bound of the property tests); the table "
    "shows the row nearest its bound",
    "large |z|, |x|: z scaled by 2^70 (float32, bfloat16; |z|^2 overflows float32) or 2^600 (float64), and x "
    "by 2^80 with z by 2^30 (z.x overflows float32; float64: 2^700 and 2^350): y and every gradient against "
    "the float64 reference of the inputs scaled back by the same powers of two (exact), with the bounds above",
    "ill-conditioned G: 64 rows of random K = 16 directions in D = 17 (cond(G) ~1e2 to ~1e6) and 64 rows of "
    "K = 8 in D = 32 with four directions 1e-3 to 1e-1 away from the other four: per row the error of y, dx "
    "and dz relative to their scales (|x|, |g|, |s| (|c| |g| + |u| |x|)), dstrength's relative to sum |g_i p_i|, "
    "against (r + 8 u kappa) max(1, |s|), kappa = cond(G) (docs/DESIGN.md); the table shows the row nearest "
    "its bound",
    "dependent z: z = A B of rank 5, K = 16, D = 32, 512 rows: the per-row error of y relative to |x| against "
    "r + 8 K u kappa, kappa the condition of the span of z's rows",
    "gradcheck / gradgradcheck: torch.autograd's, fast mode (a random projection of the Jacobian), default "
    "tolerances (atol 1e-5, rtol 1e-3), float64, eps 1e-3; "
    "opcheck: torch.library.opcheck's schema, fake-tensor, autograd-registration and AOT-dispatch tests; "
    "determinism: two runs of forward and backward, bitwise equal (error column: max |difference|)",
]


def _tasks(backends, dtypes, plan):
    """(backend, case, dtype, thunk returning rows) for every check, in table order."""
    tasks = []
    for b in backends:
        add = lambda case, dtype, thunk, b=b: tasks.append((b.name, case, dtype, thunk))  # noqa: E731
        for dtype in dtypes:
            dn = dtype_name(dtype)
            for k in plan.ks:
                for d in plan.ds:
                    add(f"K={k} D={d}", dn, lambda b=b, k=k, d=d, t=dtype: [_accuracy_case(b, k, d, t, plan.layouts)])
            for k in plan.ks:
                for d in plan.ds:
                    if k >= d:
                        add(f"K={k} D={d} rank-deficient", dn,
                            lambda b=b, k=k, d=d, t=dtype: [_rank_deficient_case(b, k, d, t)])
            add("nearly dependent z", dn, lambda b=b, t=dtype: [_dependent_case(b, t)])
            add("ill-conditioned G", dn, lambda b=b, t=dtype: [_conditioned_case(b, t)])
            if dtype in (torch.float32, torch.float64):
                add("dependent z", dn, lambda b=b, t=dtype: [_dependent_directions_case(b, t)])
            if dtype != torch.float16:
                for k in plan.magnitude_ks:
                    add(f"K={k} large |z|, |x|", dn, lambda b=b, k=k, t=dtype: _magnitude_case(b, k, t))
        for shapes in plan.gradcheck_shapes:
            add("gradcheck", "float64", lambda b=b, shapes=shapes: [_gradcheck_case(b, shapes, False)])
            if b.public:
                add("gradgradcheck", "float64", lambda b=b, shapes=shapes: [_gradcheck_case(b, shapes, True)])
        if plan.opcheck_samples:
            add("opcheck", "-", lambda b=b: _opcheck_case(b, plan.opcheck_samples))
        for dtype in dtypes:
            for k, xs, zs in plan.determinism:
                add(f"determinism K={k}", dtype_name(dtype),
                    lambda b=b, k=k, xs=xs, zs=zs, t=dtype: [_determinism_case(b, k, xs, zs, t)])
    return tasks


def _guarded(backend_name, case, dtype, thunk):
    """A check whose backend raises fails with the error named, and the run goes on."""
    try:
        return thunk()
    except Exception as exc:
        return [Row(backend_name, case, dtype, None, None, False, _first_line(exc))]


def verify(device: str = "all", dtypes=None, quick: bool = False, *, backends: list[Backend] | None = None,
           progress: bool = False) -> VerifyReport:
    """Checks every backend available on ``device`` ("cpu", "cuda" or "all") against the float64
    reference: forward and every gradient over a fixed matrix of K, D, layouts and ``dtypes``
    (names or torch dtypes; default all four), gradcheck and gradgradcheck in float64, opcheck of
    the registered ops, and bitwise determinism. ``quick``: a subset, a few seconds on a CPU.
    ``backends``: check these instead of the ones found here. ``progress``: a tqdm bar on stderr.

    Returns a :class:`VerifyReport`; ``report.passed`` is False when any check fails or no backend
    was found.
    """
    start = time.perf_counter()
    names = list(DTYPES) if dtypes is None else [d if isinstance(d, str) else dtype_name(d) for d in dtypes]
    unknown = [n for n in names if n not in DTYPES]
    if unknown or not names:
        raise ValueError(f"verify: dtypes must be among {list(DTYPES)}, got {names}")
    chosen = discover_backends(device) if backends is None else list(backends)
    report = VerifyReport(device=device, dtypes=names, quick=quick, backends=[b.name for b in chosen],
                          notes=list(NOTES), cpu_capability=build_info().get("cpu_capability"))
    if backends is None and device in ("cuda", "all") and (image_row := cuda_image_row()) is not None:
        report.rows.append(image_row)
    if not chosen:
        report.rows.append(Row("-", f"backends on {device}", "-", None, None, False,
                               f"none available here (available: {list(available_backends())})"))
    tasks = _tasks(chosen, [DTYPES[n] for n in names], QUICK if quick else FULL)
    bar = _progress(tasks, progress)
    for name, case, dtype, thunk in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{name} {case} {dtype}", refresh=False)
        report.rows.extend(_guarded(name, case, dtype, thunk))
    report.seconds = time.perf_counter() - start
    return report


def _progress(tasks, enabled):
    if not enabled:
        return tasks
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience: without tqdm the run is the same, silent
        return tasks
    return tqdm(tasks, desc="verify", file=sys.stderr, unit="check", leave=False)
