"""Checks an installed purified_ops where it runs: the fused CPU kernels loaded (not the reference
fallback), for the expected CPU capability, they equal the reference, forward and backward, and
their 16-bit outputs are rounded to nearest even. Small sizes: it also runs under qemu-x86_64 with
older CPU models (see scripts/check_dist.sh).

Usage: python scripts/check_install.py [--capability DEFAULT|AVX2|AVX512]
(run from outside the checkout, or the checkout's package is the one imported)."""
import argparse
import sys
import warnings

import torch

warnings.simplefilter("error")  # a fallback to the reference warns: here that is a failure

import purified_ops  # noqa: E402
from purified_ops import reference, testing  # noqa: E402


def check_dtype(dtype, shared_z):
    gen = torch.Generator().manual_seed(0)
    # D = 37 is not a multiple of any vector width: the vector loops and their scalar tails run
    n, k, d = 6, 3, 37
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    z = torch.randn(1 if shared_z else n, k, d, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    outs = {}
    for backend in ("cpu", "reference"):
        xb, zb = x.clone().requires_grad_(), z.clone().requires_grad_()
        s = torch.tensor(0.75, dtype=torch.float64, requires_grad=True)
        y = purified_ops.purify(xb, zb, strength=s, backend=backend)
        y.backward(g)
        outs[backend] = (y, xb.grad, zb.grad, s.grad)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for name, got, want in zip(("y", "dx", "dz", "ds"), outs["cpu"], outs["reference"]):
        err = (got.double() - want.double()).abs().max().item() / max(1.0, want.double().abs().max().item())
        if not err <= tol:
            raise SystemExit(f"check_install: {name} ({dtype}, shared z: {shared_z}) differs from the "
                             f"reference by {err:.3g} > {tol:g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", choices=("DEFAULT", "AVX2", "AVX512"),
                        help="the CPU capability whose kernels must have been chosen")
    args = parser.parse_args()
    info = purified_ops.build_info()
    if not info["extension_loaded"]:
        raise SystemExit(f"check_install: {info['extension_error']}")
    if "cpu" not in purified_ops.available_backends():
        raise SystemExit(f"check_install: no fused CPU backend: {purified_ops.available_backends()}")
    if args.capability is not None and info["cpu_capability"] != args.capability:
        raise SystemExit(f"check_install: chose {info['cpu_capability']} kernels, expected {args.capability}")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for shared_z in (False, True):
            check_dtype(dtype, shared_z)
    cpu = next(b for b in testing.discover_backends("cpu") if b.name == "cpu")
    wrong = [r for r in testing.rounding_of_16bit_outputs(cpu) if not r.passed]
    if wrong:
        raise SystemExit(f"check_install: 16-bit outputs not rounded to nearest even (worst <= 1 ulp, |bias| <= "
                         f"{testing.ROUNDING_BIAS} ulp): {wrong}")
    print(f"check_install: purified_ops {purified_ops.__version__} from {purified_ops.__file__}: "
          f"{info['cpu_capability']} kernels (compiled: {' '.join(info['cpu_capabilities'])}; torch chose "
          f"{torch.backends.cpu.get_cpu_capability()}) equal the reference, forward and backward, and round "
          f"16-bit outputs to nearest even")
    return 0


if __name__ == "__main__":
    sys.exit(main())
