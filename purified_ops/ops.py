"""The registered ops: loading the extension, their fake kernels, the autograd wiring
(:class:`PurifyFunction`) and the functional entry point :func:`purify`."""
from __future__ import annotations

import warnings

import torch
from torch.autograd import forward_ad as _fwad

from . import _extension, reference
from ._validate import canonical_args, check_purify_args

__all__ = ["PurifyFunction", "purify", "available_backends", "build_info", "empty_cpu_cache", "cpu_cache_bytes",
           "BACKENDS", "emulated_cuda_ops"]

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


_EMULATED_CUDA: list = []  # [module or None], filled on first use


def emulated_cuda_module():
    """The emulated CUDA backend's extension module, imported on first use, or None where it is
    not built (``PURIFIED_OPS_CUDA_EMU=1 python setup.py build_ext --inplace``). With
    PURIFIED_OPS_CUDA_EMU=asan in the environment it is the sanitizer build
    (``purified_ops._cuda_emu_asan``, which needs libasan preloaded). Its test knobs:
    ``set_schedule("forward" | "reverse")`` and ``set_max_grid_stride_blocks(n)``."""
    if not _EMULATED_CUDA:
        import importlib
        import os

        name = "_cuda_emu_asan" if os.environ.get("PURIFIED_OPS_CUDA_EMU") == "asan" else "_cuda_emu"
        try:
            _EMULATED_CUDA.append(importlib.import_module(f"{__package__}.{name}"))  # registers the ops
        except ImportError:
            _EMULATED_CUDA.append(None)
        else:
            _register_fakes("purified_ops_cuda_emu")
    return _EMULATED_CUDA[0]


def emulated_cuda_ops():
    """``torch.ops.purified_ops_cuda_emu``: the CUDA kernels and their host code emulated on the
    CPU, on CPU tensors, with the schemas of ``torch.ops.purified_ops`` (a test backend: CUDA's
    thread, barrier and shuffle semantics, checked); None where it is not built."""
    return torch.ops.purified_ops_cuda_emu if emulated_cuda_module() is not None else None


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


def _purify_forward_fake(x, z, strength, eps):
    acc = reference.accumulate_dtype(x.dtype)
    k = z.shape[-2]
    return (x.new_empty(x.shape), x.new_empty((*x.shape[:-1], k), dtype=acc),
            x.new_empty((*z.shape[:-2], k, k), dtype=acc))


def _purify_backward_fake(grad_y, x, z, strength, coeff, chol, compute_grad_z):
    acc = reference.accumulate_dtype(x.dtype)
    return (x.new_empty(x.shape), z.new_empty(z.shape if compute_grad_z else (0,)),
            x.new_empty((), dtype=acc))


def _register_fakes(namespace: str) -> None:
    """Fake kernels of a namespace's functional ops (the registered ops and the emulated CUDA
    ones share the schemas), so torch.compile, export and opcheck trace them."""
    torch.library.register_fake(f"{namespace}::purify_forward")(_purify_forward_fake)
    torch.library.register_fake(f"{namespace}::purify_backward")(_purify_backward_fake)


if _C is not None:
    _register_fakes("purified_ops")

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


def _transforms_active() -> bool:
    """Whether a torch.func transform or a forward-mode AD level is active: then the op must be
    seen through :class:`PurifyFunction` (which has their rules), even with nothing requiring grad."""
    return _fwad._current_level >= 0 or torch._C._are_functorch_transforms_active()


class _PurifyAutograd(torch.autograd.Function):
    """The autograd wiring, less the forward-mode rule: what torch.compile traces, since Dynamo
    does not trace a Function that defines ``jvp``. :class:`PurifyFunction` adds the rule."""

    @staticmethod
    def forward(x, z, strength, eps):
        _, y, coeff, chol = _run_forward(x, z, strength, eps)
        return y, coeff, chol

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, z, strength, eps = inputs
        _, coeff, chol = output
        ctx.mark_non_differentiable(coeff, chol)
        ctx.set_materialize_grads(False)
        # The original inputs: the backward re-promotes them (cheap, and no promoted copy is kept
        # alive between forward and backward), and a double backward differentiates through them.
        s_t = strength if isinstance(strength, torch.Tensor) else None
        ctx.save_for_backward(x, z, s_t, coeff, chol)
        ctx.save_for_forward(x, z, s_t)
        ctx.eps, ctx.strength = eps, None if s_t is not None else strength

    @staticmethod
    def backward(ctx, grad_y, _grad_coeff, _grad_chol):
        x_in, z_in, s_in, coeff, chol = ctx.saved_tensors
        need_x, need_z, need_s, _ = ctx.needs_input_grad
        if grad_y is None:
            return None, None, None, None
        strength = s_in if s_in is not None else ctx.strength
        args = canonical_args(x_in, z_in, strength, ctx.eps)  # checked in the forward
        if torch.is_grad_enabled() or _transforms_active():
            # Recorded (double backward) or seen by a transform: the closed form in PyTorch ops.
            dx, dz, ds = reference.purify_backward(grad_y, x_in, reference.as_directions(x_in, z_in),
                                                   strength, args.eps)
        else:
            dx, dz, ds = torch.ops.purified_ops.purify_backward(
                grad_y.to(args.x.dtype), args.x, args.z, args.strength, coeff, chol, need_z)
        return (dx.to(x_in.dtype) if need_x else None,
                dz.reshape(z_in.shape).to(z_in.dtype) if need_z else None,
                ds.to(device=s_in.device, dtype=s_in.dtype) if need_s else None,
                None)

    @staticmethod
    def vmap(info, in_dims, x, z, strength, eps):
        """One call of the op for the whole batch: the vmapped dim becomes a leading dim of x and
        z (z's is 1 when z is not batched: shared, never expanded)."""
        x_bdim, z_bdim, s_bdim, _ = in_dims
        size = info.batch_size
        x_dim = x.dim() - (x_bdim is not None)
        z_dim = z.dim() - (z_bdim is not None)
        x = x.movedim(x_bdim, 0) if x_bdim is not None else x.unsqueeze(0)
        z = z.movedim(z_bdim, 0) if z_bdim is not None else z.unsqueeze(0)
        if z_dim == x_dim:  # one direction: [B, ..., D] -> [B, ..., 1, D]
            z = z.unsqueeze(-2)
        if x_bdim is None and z_bdim is not None:
            x = x.expand(size, *x.shape[1:])  # a view: y has the batch dim, x is read once per z
        if s_bdim is None:
            y, coeff, chol = PurifyFunction.apply(x, z, strength, eps)
        else:
            # A batched strength scales the removed projection per batch entry; coeff and chol do
            # not depend on it.
            y1, coeff, chol = PurifyFunction.apply(x, z, 1.0, eps)
            s = strength.movedim(s_bdim, 0).reshape(size, *([1] * x_dim))
            acc = reference.accumulate_dtype(y1.dtype)
            y = (x.to(acc) - s.to(acc) * (x.to(acc) - y1.to(acc))).to(y1.dtype)
        # Outputs of an unbatched input keep its size-1 dim: not vmapped.
        coeff, coeff_dim = (coeff, 0) if x_bdim is not None or z_bdim is not None else (coeff.squeeze(0), None)
        chol, chol_dim = (chol, 0) if z_bdim is not None else (chol.squeeze(0), None)
        return (y, coeff, chol), (0, coeff_dim, chol_dim)


class PurifyFunction(_PurifyAutograd):
    """Autograd wiring of the compiled ops: ``y, coeff, chol = PurifyFunction.apply(x, z, strength, eps)``.

    Validates its arguments, promotes dtypes, and runs ``purified_ops::purify_forward``, which
    also returns the per-row coefficients ``coeff`` and the Cholesky factors ``chol`` that the
    backward reuses (outputs, not differentiable: torch.func needs a Function to return what its
    backward saves). The backward runs ``purified_ops::purify_backward``. When the backward itself
    is recorded (``create_graph=True``, double backward) or seen by a torch.func transform, it
    uses the closed-form formulas of :func:`purified_ops.reference.purify_backward`, which
    autograd differentiates. Forward-mode AD (``jvp``: ``torch.func.jvp``, ``jacfwd``,
    ``torch.autograd.forward_ad``) uses :func:`purified_ops.reference.purify_jvp`; ``vmap``
    runs the op once for the whole batch. :func:`purify` is the usual entry point.
    """

    @staticmethod
    def jvp(ctx, x_t, z_t, strength_t, _eps_t):
        x, z, s_t = ctx.saved_tensors
        strength = s_t if s_t is not None else ctx.strength
        y_t = reference.purify_jvp(x, reference.as_directions(x, z), strength, ctx.eps,
                                   x_t, None if z_t is None else reference.as_directions(x, z_t), strength_t)
        return y_t, None, None


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
        if torch.compiler.is_compiling():
            return _PurifyAutograd.apply(x, z, strength, eps)[0]  # traced: no cost to branch on
        if _transforms_active() or (torch.is_grad_enabled() and (
                x.requires_grad or getattr(z, "requires_grad", False) or getattr(strength, "requires_grad", False))):
            return PurifyFunction.apply(x, z, strength, eps)[0]
        return _run_forward(x, z, strength, eps)[1]  # nothing to record: the op alone
    args = check_purify_args(x, z, strength, eps)
    s = strength if isinstance(strength, torch.Tensor) else args.strength
    return reference.purify(args.x, args.z, strength=s, eps=args.eps)
