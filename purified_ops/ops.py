"""The registered ops: loading the extension, their fake kernels and derivatives (registered on
the ops, :mod:`purified_ops._derivatives`), the checked op call :class:`PurifyFunction`, the
functional entry point :func:`purify` and the decomposition table for export.

Registration of the ops, one place per language: Python here and in ``_derivatives.py``
(Autograd kernels, batching rules); C++ in ``csrc/purify.cpp`` (schemas), whose header lists
the kernels' registrations (``purify_autocast.cpp``, ``cpu/purify_cpu.cpp``,
``cuda/purify_cuda.cpp``, ``cuda_emu/purify_emu.cpp``)."""
from __future__ import annotations

import sys
import warnings

import torch

from . import _derivatives, _extension, _settings, reference
from ._input_checks import canonical_args, check_eps, check_purify_args, check_strength

__all__ = ["PurifyFunction", "purify", "available_backends", "build_info", "empty_cpu_cache", "cpu_cache_bytes",
           "export_decompositions", "BACKENDS", "emulated_cuda_ops"]

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
    ``set_schedule(name, seed=0)`` (the names in its ``schedules``),
    ``set_max_grid_stride_blocks(n)`` and ``set_shared_memory_fill(byte)``."""
    if not _EMULATED_CUDA:
        import importlib
        import os

        name = "_cuda_emu_asan" if _settings.cuda_emulation(os.environ) == "asan" else "_cuda_emu"
        try:
            _EMULATED_CUDA.append(importlib.import_module(f"{__package__}.{name}"))  # registers the ops
        except ImportError:
            _EMULATED_CUDA.append(None)
        else:
            _register_python_kernels("purified_ops_cuda_emu", _EMULATED_CUDA[0])
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
    torch.library.register_fake(f"{namespace}::purify_forward.float_strength")(_purify_forward_fake)
    torch.library.register_fake(f"{namespace}::purify_backward")(_purify_backward_fake)


def _register_python_kernels(namespace: str, module) -> None:
    _register_fakes(namespace)
    _derivatives.register(namespace, module)


_PURIFY_OP = None  # torch.ops.purified_ops.purify, where the extension loaded

if _C is not None:
    _register_python_kernels("purified_ops", _C)
    _PURIFY_OP = torch.ops.purified_ops.purify

    @torch.library.register_fake("purified_ops::purify_forward_out")
    def _purify_forward_out_fake(x, z, strength, eps, y, coeff, chol):
        return None

    @torch.library.register_fake("purified_ops::purify_backward_out")
    def _purify_backward_out_fake(grad_y, x, z, strength, coeff, chol, compute_grad_z, grad_x, grad_z,
                                  grad_strength):
        return None


def export_decompositions() -> dict:
    """torch.export's default decomposition table plus the decomposition of
    ``purified_ops::purify_forward`` (both overloads) into standard ops
    (:func:`purified_ops.reference.purify_forward`: no linear-algebra op, no purified_ops op), for
    programs bound to runtimes without this package:
    ``exported.run_decompositions(purified_ops.export_decompositions())`` gives core ATen."""
    if _C is None:
        raise RuntimeError(f"purified_ops: {_extension.load_failure_message(_LOAD_ERROR)}")
    table = torch.export.default_decompositions()
    forward = torch.ops.purified_ops.purify_forward
    table[forward.default] = table[forward.float_strength] = reference.purify_forward
    return table


def _exporting_to_onnx() -> bool:
    """Whether torch.onnx.export is tracing (ONNX has no purified_ops domain: the export gets
    the op's decomposition into standard ops). Never imports torch.onnx itself, and asks it only
    inside a trace (its exporters run torch.export or torch.jit.trace), since its own check
    imports two modules on every call."""
    onnx = sys.modules.get("torch.onnx")
    if onnx is None or not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()):
        return False
    return onnx.is_in_onnx_export()


class PurifyFunction(torch.autograd.Function):
    """The checked call of the registered op, with all of its outputs, as a
    ``torch.autograd.Function``: ``y, coeff, chol = PurifyFunction.apply(x, z, strength, eps)``.

    Validates its arguments, promotes dtypes and runs ``purified_ops::purify_forward``, which
    returns, besides ``y``, the per-row coefficients ``coeff`` (differentiable) and the Cholesky
    factors ``chol`` that its backward reuses (not differentiable). Its backward and forward mode
    are the op's own (:mod:`purified_ops._derivatives`): the fused ``purify_backward`` op, itself
    differentiable. :func:`purify` is the usual entry point.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, z, strength, eps):
        args = check_purify_args(x, z, strength, eps)
        if _C is None:
            raise RuntimeError(f"purified_ops: {_extension.load_failure_message(_LOAD_ERROR)}; "
                               "or use purify(..., backend='reference')")
        return torch.ops.purified_ops.purify_forward(args.x, args.z, args.strength, args.eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, z, strength, eps = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        # The inputs as given: the rules make the kernels' form of them again where they run, so
        # that a recorded backward (create_graph) connects to the inputs themselves.
        saved = (x, z, strength if isinstance(strength, torch.Tensor) else None, output[1], output[2])
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.eps = float(eps)
        ctx.strength = None if isinstance(strength, torch.Tensor) else strength

    @staticmethod
    def _canonical(ctx):
        x, z, strength, coeff, chol = ctx.saved_tensors
        args = canonical_args(x, z, strength if strength is not None else ctx.strength, ctx.eps)
        return (args.x, args.z, args.strength, coeff, chol), (x, z, strength)

    @staticmethod
    def backward(ctx, grad_y, grad_coeff, _grad_chol):
        need_x, need_z, need_s, _ = ctx.needs_input_grad
        saved, (x, z, strength) = PurifyFunction._canonical(ctx)
        dx, dz, ds = _derivatives.forward_vjp(_dispatch(), ctx.eps, saved, need_z, need_s, grad_y, grad_coeff)
        return (dx if need_x else None, dz.reshape(z.shape) if dz is not None else None,
                ds.reshape(strength.shape) if ds is not None and strength is not None else None, None)

    @staticmethod
    def jvp(ctx, x_t, z_t, strength_t, _eps_t):
        saved, (x, z, _) = PurifyFunction._canonical(ctx)
        dtype = saved[0].dtype
        x_t = x_t.to(dtype) if x_t is not None else None
        z_t = reference.as_directions(x, z_t).to(dtype) if z_t is not None else None
        strength_t = strength_t.reshape(()) if strength_t is not None else None
        return _derivatives.forward_jvp(_dispatch(), ctx.eps, saved, x_t, z_t, strength_t)


def _dispatch():
    ops = torch.ops.purified_ops
    return _derivatives._Dispatch(ops.purify_forward.default, ops.purify_backward.default)


# _resolve_backend's answers by (backend, device, whether the extension loaded): what serves a
# CPU or meta tensor is fixed for a process, so each is worked out once (a call that raises is
# not remembered). A CUDA tensor's answer depends on which GPU is current; _extension keeps what
# each GPU is.
_RESOLVED: dict = {}


def _resolve_backend(backend: str, device: torch.device) -> str:
    if device.type == "cuda":
        return _resolve_backend_uncached(backend, device)
    key = (backend, device, _C is None)
    found = _RESOLVED.get(key)
    if found is None:
        found = _RESOLVED[key] = _resolve_backend_uncached(backend, device)
    return found


def _resolve_backend_uncached(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"purify: backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends()
    if device.type == "cuda" and "cuda" in available:
        # A GPU no kernel image of the build serves (said once, as a warning): auto falls back.
        unserved = _extension.unserved_cuda_device(_BUILD_INFO["cuda_archs"], device.index)
        if unserved is not None:
            if backend == "cuda":
                raise RuntimeError(unserved)
            available = tuple(b for b in available if b != "cuda")
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
        backend: ``"auto"`` (the compiled kernel for the tensor's device, else the reference, also on
            a GPU that the build has no kernel image for), ``"cpu"``, ``"cuda"`` or ``"reference"``.

    Returns:
        A tensor of x's shape in the promoted dtype of x and z.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"purify: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(backend, str):
        raise ValueError(f"purify: backend must be one of {BACKENDS}, got {backend!r}")
    # The usual call (auto, a CPU tensor, the extension loaded) needs no lookup.
    compiled = (backend == "auto" and x.is_cpu and _C is not None) or _resolve_backend(backend, x.device) == "compiled"
    if compiled and not _exporting_to_onnx():
        # The op checks the rest in C++ (purify_public.cpp). Here only what never reaches its
        # kernel: a z that is no tensor, nested tensors (no kernel of theirs), and numbers that are
        # not Python floats (docs/DESIGN.md, "Errors").
        if not isinstance(z, torch.Tensor) or x.is_nested or z.is_nested:
            check_purify_args(x, z, strength, eps)  # raises
        if type(eps) is not float:
            eps = check_eps(eps)
        if isinstance(strength, torch.Tensor):
            if strength.is_nested:
                check_strength(strength)  # raises
            return _PURIFY_OP.strength_tensor(x, z, strength, eps)
        if type(strength) is not float:
            strength = check_strength(strength)
        return _PURIFY_OP.default(x, z, strength, eps)
    args = check_purify_args(x, z, strength, eps)
    return reference.purify_forward(args.x, args.z, args.strength, args.eps)[0]
