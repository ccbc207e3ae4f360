"""The registered ops: loading the extension, their fake kernels, the autograd wiring
(:class:`PurifyFunction`) and the functional entry point :func:`purify`."""
from __future__ import annotations

import warnings

import torch

from . import _extension, reference
from ._validate import check_purify_args

__all__ = ["PurifyFunction", "purify", "available_backends", "build_info", "empty_cpu_cache", "cpu_cache_bytes",
           "BACKENDS"]

BACKENDS = ("auto", "cpu", "cuda", "reference")

# _C registers the op schemas, _CPU (the kernels of the CPU capability chosen here) the CPU
# kernels. Without them the reference serves, with one warning. The build info is read once:
# purify() consults it on every call, also while torch.compile traces.
_C, _CPU, _BUILD_INFO, _LOAD_ERROR = _extension.load()

_warned_fallback = False


def build_info() -> dict:
    """How the extension was built (the CPU capabilities compiled and the one chosen here, flags,
    CUDA archs), or why it did not load."""
    info = {"extension_loaded": _C is not None}
    if _C is None:
        info["extension_error"] = _extension.load_failure_message(_LOAD_ERROR)
    else:
        info.update(_BUILD_INFO)
    return info


def empty_cpu_cache() -> int:
    """Frees the blocks the CPU kernels keep for reuse as outputs; returns the bytes released.

    Large CPU outputs (y, dx, dz) come from a caching allocator, as CUDA memory does in torch:
    freed blocks are kept (up to PURIFIED_OPS_CPU_CACHE_MB, default 512; 0 turns it off) so the
    next step does not fault in fresh pages. Like ``torch.cuda.empty_cache()``.
    """
    return _CPU.empty_cpu_output_cache() if _CPU is not None else 0


def cpu_cache_bytes() -> int:
    """Bytes the CPU output cache holds for reuse (not in live tensors)."""
    return _CPU.cpu_output_cache_bytes() if _CPU is not None else 0


def available_backends() -> tuple[str, ...]:
    """The backends that can run here: "cpu" and "cuda" need the compiled extension (and, for
    "cuda", a CUDA build of it and a visible GPU); "reference" always runs."""
    found = []
    if _C is not None:
        found.append("cpu")
        if _BUILD_INFO["cuda"] and torch.cuda.is_available():
            found.append("cuda")
    found.append("reference")
    return tuple(found)


if _C is not None:

    @torch.library.register_fake("purified_ops::purify_forward")
    def _purify_forward_fake(x, z, strength, eps):
        acc = reference.accumulate_dtype(x.dtype)
        k = z.shape[-2]
        return (x.new_empty(x.shape), x.new_empty((*x.shape[:-1], k), dtype=acc),
                x.new_empty((*z.shape[:-2], k, k), dtype=acc))

    @torch.library.register_fake("purified_ops::purify_backward")
    def _purify_backward_fake(grad_y, x, z, strength, coeff, chol, compute_grad_z):
        acc = reference.accumulate_dtype(x.dtype)
        return (x.new_empty(x.shape), z.new_empty(z.shape if compute_grad_z else (0,)),
                x.new_empty((), dtype=acc))

    @torch.library.register_fake("purified_ops::purify_forward_out")
    def _purify_forward_out_fake(x, z, strength, eps, y, coeff, chol):
        return None

    @torch.library.register_fake("purified_ops::purify_backward_out")
    def _purify_backward_out_fake(grad_y, x, z, strength, coeff, chol, compute_grad_z, grad_x, grad_z,
                                  grad_strength):
        return None


def _run_forward(x, z, strength, eps):
    """Validates, promotes and runs the registered forward op: (args, y, coeff, chol)."""
    args = check_purify_args(x, z, strength, eps)
    if _C is None:
        raise RuntimeError(f"purified_ops: {_extension.load_failure_message(_LOAD_ERROR)}; "
                           "or use purify(..., backend='reference')")
    y, coeff, chol = torch.ops.purified_ops.purify_forward(args.x, args.z, args.strength, args.eps)
    return args, y, coeff, chol


class PurifyFunction(torch.autograd.Function):
    """Autograd wiring of the compiled ops: ``PurifyFunction.apply(x, z, strength, eps)``.

    Validates its arguments, promotes dtypes, and runs ``purified_ops::purify_forward``; the
    backward runs ``purified_ops::purify_backward``. When the backward itself is recorded
    (``create_graph=True``, double backward), it uses the closed-form formulas of
    :func:`purified_ops.reference.purify_backward`, which autograd differentiates.
    """

    @staticmethod
    def forward(ctx, x, z, strength, eps):
        args, y, coeff, chol = _run_forward(x, z, strength, eps)
        # The original inputs too: a double backward must differentiate through them, not
        # through the promoted views made here.
        s_in = strength if isinstance(strength, torch.Tensor) else args.strength
        ctx.save_for_backward(x, z, s_in, args.x, args.z, args.strength, coeff, chol)
        ctx.eps = args.eps
        ctx.strength_meta = (strength.device, strength.dtype) if isinstance(strength, torch.Tensor) else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_in, z_in, s_in, x, z, strength, coeff, chol = ctx.saved_tensors
        need_x, need_z, need_s, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():
            dx, dz, ds = reference.purify_backward(grad_y, x_in, reference.as_directions(x_in, z_in), s_in, ctx.eps)
        else:
            dx, dz, ds = torch.ops.purified_ops.purify_backward(
                grad_y.to(x.dtype), x, z, strength, coeff, chol, need_z)
        return (dx if need_x else None,
                dz.reshape(z_in.shape) if need_z else None,
                ds.to(*ctx.strength_meta) if need_s else None,
                None)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"purify: backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends()
    if backend == "auto":
        if device.type == "meta" and _C is not None:
            return "compiled"
        if device.type in ("cpu", "cuda") and device.type in available:
            return "compiled"
        if _C is None:
            global _warned_fallback
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(f"purified_ops: falling back to the pure-PyTorch reference, which is correct "
                              f"but slower: {_extension.load_failure_message(_LOAD_ERROR)}.", RuntimeWarning,
                              stacklevel=3)
        return "reference"
    if backend == "reference":
        return "reference"
    if backend not in available:
        raise RuntimeError(f"purify: backend {backend!r} is not available here (available: {available}; "
                           f"build info: {build_info()})")
    if device.type != backend:
        raise ValueError(f"purify: backend {backend!r} serves {backend} tensors, but x is on {device}")
    return "compiled"


def purify(x: torch.Tensor, z: torch.Tensor, *, strength=1.0, eps: float = 1e-6,
           backend: str = "auto") -> torch.Tensor:
    r"""Removes from each row of ``x`` its projection onto the span of that row's directions ``z``.

    .. math::
        y = x - s\, Z^\top (Z Z^\top + \varepsilon I)^{-1} Z x

    Args:
        x: features, ``[..., D]``.
        z: task-irrelevant directions, ``[..., D]`` (one) or ``[..., K, D]``; each leading dim
            equals x's or is 1 (shared by those rows, never materialized).
        strength: ``s``, a float or a 0-dim tensor (which then gets a gradient). 1 removes the
            whole projection.
        eps: ``> 0``, keeps the Gram matrix invertible for zero or dependent directions.
        backend: ``"auto"`` (the compiled kernel for the tensor's device, else the reference),
            ``"cpu"``, ``"cuda"`` or ``"reference"``.

    Returns:
        A tensor of x's shape in the promoted dtype of x and z.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"purify: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(backend, str):
        raise ValueError(f"purify: backend must be one of {BACKENDS}, got {backend!r}")
    if _resolve_backend(backend, x.device) == "compiled":
        if torch.is_grad_enabled() and (x.requires_grad or getattr(z, "requires_grad", False)
                                        or getattr(strength, "requires_grad", False)):
            return PurifyFunction.apply(x, z, strength, eps)
        return _run_forward(x, z, strength, eps)[1]  # nothing to record: the op alone
    args = check_purify_args(x, z, strength, eps)
    s = strength if isinstance(strength, torch.Tensor) else args.strength
    return reference.purify(args.x, args.z, strength=s, eps=args.eps)
