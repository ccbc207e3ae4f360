"""Argument checks of the public entry points, run before any kernel.

Errors follow docs/DESIGN.md: ValueError for shapes, broadcasting, eps, backend names and devices;
TypeError for non-tensors, sparse and nested tensors and non-floating dtypes. Messages name the
offending shapes or values.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .reference import accumulate_dtype, as_directions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PurifyArgs(NamedTuple):
    """Validated arguments in the form the kernels take."""

    x: torch.Tensor          # promoted dtype
    z: torch.Tensor          # promoted dtype, [..., K, D]
    strength: torch.Tensor   # 0-dim, accumulate dtype, on x's device (a view of a strength tensor)
    eps: float


def check_dense(name: str, t: torch.Tensor) -> None:
    """A dense tensor: not sparse, not nested. A nested tensor of the default layout reports
    torch.strided but has no sizes, so it is asked directly."""
    if t.is_nested:
        raise TypeError(f"purify: {name} must be a dense (strided) tensor, got a nested tensor (layout {t.layout})")
    if t.layout != torch.strided:
        raise TypeError(f"purify: {name} must be a dense (strided) tensor, got layout {t.layout}")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"purify: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(name, t)
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"purify: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


# Python numbers, and the symbolic floats torch.compile passes for them under dynamic shapes.
_REALS = (numbers.Real, torch.SymFloat, torch.SymInt)


def check_eps(eps):
    """eps as a float (a SymFloat stays symbolic); finite and > 0. Comparisons only, so a
    SymFloat is checked by guards instead of being specialized."""
    if type(eps) is not float:  # a float, the usual eps, needs neither the type checks nor conversion
        if isinstance(eps, bool) or not isinstance(eps, _REALS):
            raise TypeError(f"purify: eps must be a real number, got {type(eps).__name__}")
        if isinstance(eps, numbers.Real):
            eps = float(eps)
    if not 0 < eps < math.inf:  # also false for NaN
        raise ValueError(f"purify: eps must be finite and > 0, got {eps}")
    return eps


# torch.finfo of the two arithmetic dtypes, made once (the checks run on every call).
_FINFO = {dtype: torch.finfo(dtype) for dtype in (torch.float32, torch.float64)}


def check_eps_range(eps, acc: torch.dtype) -> None:
    """eps must be a normal number of the arithmetic dtype: a subnormal one is flushed to zero
    by CUDA's fast paths (and loses precision elsewhere), and G would then be singular."""
    info = _FINFO[acc]
    if not info.tiny <= eps <= info.max:
        dtypes = "float64" if acc == torch.float64 else "float16, bfloat16 and float32"
        raise ValueError(f"purify: eps must be between {info.tiny:.6g} and {info.max:.6g} (the normal {acc} "
                         f"numbers, the arithmetic dtype of {dtypes} inputs), got {eps}")


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def check_strength(strength):
    """strength as a float (a SymFloat stays symbolic) or a one-element floating tensor: 0-dim,
    or ``[1]`` (the shape FSDP needs of a learnable strength); a number must be finite."""
    if type(strength) is not float:  # a float, the usual strength, needs neither the type checks nor conversion
        if isinstance(strength, torch.Tensor):
            check_dense("strength", strength)
            if strength.dim() != 0 and tuple(strength.shape) != (1,):
                raise ValueError("purify: strength must be a float, a 0-dim tensor or a one-element 1-D tensor, "
                                 f"got shape {tuple(strength.shape)}")
            if not strength.is_floating_point():
                raise TypeError(f"purify: a strength tensor must be floating point, got {strength.dtype}")
            return strength
        if isinstance(strength, bool) or not isinstance(strength, _REALS):
            raise TypeError(f"purify: strength must be a float or a 0-dim tensor, got {type(strength).__name__}")
        if isinstance(strength, numbers.Real):
            try:
                strength = float(strength)  # also Fraction, numpy scalars and ints beyond float's range
            except (OverflowError, ValueError, TypeError):
                raise ValueError(f"purify: strength must be a finite float, got {_brief(strength)}, "
                                 "which is not one") from None
    if not -math.inf < strength < math.inf:  # inf times a zero projection would be NaN
        raise ValueError(f"purify: strength must be finite, got {strength}")
    return strength


def check_strength_range(strength, acc: torch.dtype) -> None:
    """A number strength must be finite in the arithmetic dtype (a tensor's value is not read:
    that would synchronize with the device)."""
    info = _FINFO[acc]
    if not isinstance(strength, torch.Tensor) and not -info.max <= strength <= info.max:
        dtypes = "float64" if acc == torch.float64 else "float16, bfloat16 and float32"
        raise ValueError(f"purify: strength must be at most {info.max:.6g} in magnitude (finite in {acc}, the "
                         f"arithmetic dtype of {dtypes} inputs), got {strength}")


def check_shapes(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Checks the shapes of x and z; returns z as [..., K, D] (reference.as_directions)."""
    if x.dim() < 1:
        raise ValueError("purify: x must be [..., D], got a 0-dim tensor")
    if z.dim() not in (x.dim(), x.dim() + 1):
        raise ValueError(
            f"purify: z must be [..., D] (one direction) or [..., K, D] with the same number of dims as x "
            f"or one more; got x {tuple(x.shape)} and z {tuple(z.shape)}")
    if z.shape[-1] != x.shape[-1]:
        raise ValueError(f"purify: z's last dim must equal x's (D = {x.shape[-1]}); got x {tuple(x.shape)} "
                         f"and z {tuple(z.shape)}")
    z3 = as_directions(x, z)
    if z3.shape[-2] < 1:
        raise ValueError(f"purify: z must hold at least one direction (K >= 1); got z {tuple(z.shape)}")
    for i, (nx, nz) in enumerate(zip(x.shape[:-1], z3.shape[:-2])):
        if nz != nx and nz != 1:
            raise ValueError(f"purify: z's leading dim {i} must equal x's or be 1 (z is broadcast over x's rows, "
                             f"never x over z's); got x {tuple(x.shape)} and z {tuple(z.shape)}")
    return z3


def strength_tensor(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Made per call, never cached: a tensor kept across calls would outlive the mode it was made
    # in (inference_mode, FakeTensorMode, jit.trace) and break the next call.
    return torch.full((), value, dtype=dtype, device=device)


def check_purify_args(x, z, strength, eps) -> PurifyArgs:
    """Validates and canonicalizes: promoted dtype, z as [..., K, D], strength as a tensor."""
    check_tensor("x", x)
    check_tensor("z", z)
    if x.device != z.device:
        raise ValueError(f"purify: x and z must be on one device, got {x.device} and {z.device}")
    z3 = check_shapes(x, z)
    eps = check_eps(eps)
    strength = check_strength(strength)
    dtype = x.dtype if x.dtype == z.dtype else torch.promote_types(x.dtype, z.dtype)
    acc = accumulate_dtype(dtype)
    check_eps_range(eps, acc)
    check_strength_range(strength, acc)
    if isinstance(strength, torch.Tensor) and strength.device != x.device and strength.device.type != "cpu":
        raise ValueError(f"purify: strength must be on x's device ({x.device}) or a CPU scalar, "
                         f"got {strength.device}")
    return canonical_args(x, z3, strength, eps, dtype)


def canonical_args(x, z, strength, eps, dtype: torch.dtype | None = None) -> PurifyArgs:
    """The kernels' form of arguments already checked: promoted dtype (``dtype``, where the
    caller has it), z as [..., K, D], strength as a 0-dim tensor of the accumulate dtype on x's
    device."""
    if dtype is None:
        dtype = x.dtype if x.dtype == z.dtype else torch.promote_types(x.dtype, z.dtype)
    acc = accumulate_dtype(dtype)
    if isinstance(strength, torch.Tensor):
        s = strength if strength.dim() == 0 else strength.reshape(())  # the tensor itself where it can be
        s = s.to(device=x.device, dtype=acc)
    else:
        s = strength_tensor(strength, acc, x.device)
    z = as_directions(x, z)
    return PurifyArgs(x if x.dtype == dtype else x.to(dtype), z if z.dtype == dtype else z.to(dtype), s, eps)
