"""The backends :func:`purified_ops.testing.verify` checks: pairs of raw ops with the library's schemas
and the device their tensors live on, found here or given; and the eps and strength the checks
call them with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import reference
from ..ops import available_backends, emulated_cuda_ops
from .report import cuda_image_row

EPS = 1e-6
STRENGTH = 0.75


@dataclass(frozen=True)
class Backend:
    """Raw forward and backward ops with the schemas of ``purified_ops::purify_forward(x, z,
    strength, eps) -> (y, coeff, chol)`` and ``purified_ops::purify_backward(grad_y, x, z, strength,
    coeff, chol, compute_grad_z) -> (dx, dz, ds)``, and the device their tensors live on.
    ``public``: the public entry points (``PurifyFunction``, ``purify(backend=name)``) run these
    ops, and are checked with them."""

    name: str
    device: str
    forward: Callable
    backward: Callable
    public: bool = False


def discover_backends(device: str = "all") -> list[Backend]:
    """The backends that run here on ``device`` ("cpu", "cuda" or "all")."""
    if device not in ("cpu", "cuda", "all"):
        raise ValueError(f"verify: device must be 'cpu', 'cuda' or 'all', got {device!r}")
    found = []
    compiled = available_backends()
    if "cuda" in compiled and not cuda_image_row().passed:
        compiled = tuple(b for b in compiled if b != "cuda")  # no kernel image for this GPU: verify says so
    ops = torch.ops.purified_ops
    for name in ("cpu", "cuda"):
        if name in compiled and device in (name, "all"):
            found.append(Backend(name, name, ops.purify_forward, ops.purify_backward, public=True))
    if device in ("cpu", "all") and (emu := emulated_cuda_ops()) is not None:
        found.append(Backend("cuda-emulated", "cpu", emu.purify_forward, emu.purify_backward))
    return found


def strength_tensor(dtype, device, value=STRENGTH):
    return torch.tensor(value, dtype=reference.accumulate_dtype(dtype), device=device)
