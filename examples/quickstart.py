"""A first use of purified_ops: purify token features against per-sample irrelevant directions,
check the result and its gradients against the pure-PyTorch reference, and time it."""
import time

import torch

import purified_ops
from purified_ops import PurifyLayer, purify, reference

torch.manual_seed(0)
print(f"purified_ops {purified_ops.__version__}, backends: {purified_ops.available_backends()}")

x = torch.randn(32, 64, 512, requires_grad=True)          # 32 samples x 64 tokens x 512 features
z = torch.randn(32, 1, 4, 512, requires_grad=True)        # 4 irrelevant directions per sample
y = purify(x, z)
print(f"y: {tuple(y.shape)} {y.dtype}; max |<y, z_k>| = {torch.einsum('btd,bkd->btk', y, z[:, 0]).abs().max():.2e}")

g = torch.randn_like(y)
gx, gz = torch.autograd.grad(y, (x, z), g)
ry = reference.purify(x, z)
rgx, rgz = torch.autograd.grad(ry, (x, z), g)
for name, a, b in [("y", y, ry), ("dx", gx, rgx), ("dz", gz, rgz)]:
    print(f"{name}: max |fused - reference| = {(a - b).abs().max():.2e}")

layer = PurifyLayer(learnable_strength=True)
print(layer)
for backend in ("auto", "reference"):
    start = time.perf_counter()
    for _ in range(10):
        out = purify(x, z, backend=backend)
        torch.autograd.grad(out, (x, z), g)
    print(f"{backend:>9}: forward+backward {1e3 * (time.perf_counter() - start) / 10:.2f} ms")
