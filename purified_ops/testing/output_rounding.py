"""The check that 16-bit outputs are rounded to nearest even from the float32 values they stand for
(truncation is half an ulp off on average, which the accuracy tolerances would hide)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backends import EPS, Backend, strength_tensor
from .report import dtype_name

# Bound on the mean error of a 16-bit output, in its units in the last place: rounding to nearest
# even has none on random data (|mean| about 0.3 / sqrt(count)), truncation about 0.5.
ROUNDING_BIAS = 0.05


@dataclass(frozen=True)
class Rounding:
    """How one 16-bit output was rounded from the float32 value it stands for, in units in the
    last place (ulps) of the 16-bit dtype at that value, over the ``count`` elements of magnitude
    at least 1/64 of the output's RMS: ``worst``, the largest distance from that value rounded
    to nearest even; ``bias``, the mean signed error; ``toward_zero``, the mean amount by which
    the magnitude falls short (about 0.5 for truncation). The float32 value comes from a
    separate call, whose sums may differ in their last bits: that can put it on the other side
    of a rounding boundary (hence ``worst`` up to 1), and in the smallest elements, the results
    of cancellation, it can be several of their ulps away (hence the cut)."""

    output: str
    dtype: str
    count: int
    worst: float
    bias: float
    toward_zero: float

    @property
    def passed(self) -> bool:
        return self.worst <= 1 and abs(self.bias) <= ROUNDING_BIAS and abs(self.toward_zero) <= ROUNDING_BIAS


def rounding(output: str, out: torch.Tensor, exact: torch.Tensor) -> Rounding:
    """The :class:`Rounding` of ``out`` (float16 or bfloat16) from ``exact`` (float32)."""
    dtype = out.dtype
    finfo = torch.finfo(dtype)
    nearest = exact.to(dtype).double().cpu().flatten()  # torch rounds to nearest even
    out, exact = out.double().cpu().flatten(), exact.double().cpu().flatten()
    kept = exact.abs() >= exact.square().mean().sqrt() / 64
    out, exact, nearest = out[kept], exact[kept], nearest[kept]
    # exact = m 2^e with 1/2 <= |m| < 1: the ulp is 2^(e - 1) eps, or the subnormals' spacing below.
    ulp = torch.ldexp(torch.full_like(exact, finfo.eps / 2), torch.frexp(exact).exponent)
    ulp = ulp.clamp_min(finfo.tiny * finfo.eps)
    if out.numel() == 0:  # none kept: the float32 result is NaN (the check fails)
        return Rounding(output, dtype_name(dtype), 0, math.nan, math.nan, math.nan)
    return Rounding(output, dtype_name(dtype), out.numel(), ((out - nearest).abs() / ulp).max().item(),
                    ((out - exact) / ulp).mean().item(), ((exact.abs() - out.abs()) / ulp).mean().item())


def rounding_of_16bit_outputs(backend: Backend, seed: int = 0) -> list[Rounding]:
    """The rounding of every 16-bit output of a backend's raw ops (y, dx, dz; z per row and z
    shared by rows) for float16 and bfloat16: each against the same op in float32 on the same
    values. The ops compute in float32 for 16-bit inputs, so that is the value each output rounds
    (up to the last bits of float32). About 10^5 elements per output and dtype; D is not a
    multiple of any vector width (vector loops and scalar tails)."""
    g = torch.Generator().manual_seed(seed)
    found = []
    for dtype in (torch.bfloat16, torch.float16):
        for layout, xs, zs in (("z per row", (64, 1000), (64, 2, 1000)),
                               ("z shared", (4, 16, 1001), (4, 1, 2, 1001))):
            x, z, gy = (torch.randn(*shape, generator=g).to(dtype) for shape in (xs, zs, xs))
            results = {}
            for run_dtype in (dtype, torch.float32):
                xd, zd, gd = (t.to(device=backend.device, dtype=run_dtype) for t in (x, z, gy))
                s = strength_tensor(run_dtype, backend.device)
                y, coeff, chol = backend.forward(xd, zd, s, EPS)
                dx, dz, _ = backend.backward(gd, xd, zd, s, coeff, chol, True)
                results[run_dtype] = {"y": y, "dx": dx, "dz": dz}
            for name, out in results[dtype].items():
                found.append(rounding(f"{name} ({layout})", out, results[torch.float32][name]))
    return found
