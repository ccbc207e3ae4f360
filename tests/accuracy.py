"""The float64 truth and DESIGN.md's accuracy bounds, shared by the tests."""
import torch

from purified_ops import reference

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def truth(x, z, strength=1.0, eps=1e-6):
    """The result computed in float64 by the reference, from the very same (rounded) inputs."""
    s = strength.double() if isinstance(strength, torch.Tensor) else strength
    return reference.purify(x.double(), z.double(), strength=s, eps=eps)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| (the absolute error where ref is zero)."""
    ref = ref.double()
    denom = ref.norm()
    diff = (out.double() - ref).norm()
    return (diff / denom).item() if denom > 0 else diff.item()
