"""What a training step keeps alive: the fused op saves its inputs and O(rows x K) values, never
an N x D intermediate."""
import os
import subprocess
import sys

import pytest
import torch

from purified_ops import PurifyLayer
from purified_ops.bench import saved_storages


def test_training_step_saves_no_row_by_feature_tensor(device):
    N, K, D = 512, 3, 256
    x = torch.randn(N, D, device=device, requires_grad=True)
    z = torch.randn(N, K, D, device=device, requires_grad=True)
    layer = PurifyLayer(learnable_strength=True).to(device)
    y, extra = saved_storages(layer, x, z)
    row_values = N * K * 4 + N * K * K * 4  # coeff and the Cholesky factors, float32
    assert sum(extra.values()) <= row_values + 64, extra
    assert all(n < N * D * 4 for n in extra.values())
    y.sum().backward()  # and the saved state suffices for the backward
    assert x.grad is not None and z.grad is not None


def test_cpu_outputs_reuse_cached_blocks():
    import purified_ops

    purified_ops.empty_cpu_cache()
    x, z = torch.randn(512, 1024), torch.randn(512, 1, 1024)  # 2 MiB outputs: cached
    y = purified_ops.purify(x, z)
    ptr = y.data_ptr()
    del y
    assert purified_ops.cpu_cache_bytes() >= 512 * 1024 * 4
    y2 = purified_ops.purify(x, z)
    assert y2.data_ptr() == ptr  # the freed block, no fresh pages
    torch.testing.assert_close(y2, purified_ops.purify(x, z, backend="reference"), rtol=1e-5, atol=1e-5)
    y2.resize_(600, 1024)  # storage stays resizable
    del y2
    assert purified_ops.empty_cpu_cache() > 0 and purified_ops.cpu_cache_bytes() == 0


@pytest.mark.parametrize("cap_mb, cached", [("0", 0), ("3", 2 << 20), ("", 4 << 20)])
def test_cpu_output_cache_holds_up_to_its_setting(cap_mb, cached):
    # two 2 MiB outputs freed: none kept with the cache off, one under a 3 MiB cap, both by default
    code = ("import torch, purified_ops as p; x, z = torch.randn(512, 1024), torch.randn(512, 1024); "
            "y1, y2 = p.purify(x, z), p.purify(x, z); del y1, y2; print(p.cpu_cache_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PURIFIED_OPS_CPU_CACHE_MB": cap_mb}).stdout
    assert int(out) == cached


def test_cpu_output_cache_makes_room_for_the_sizes_in_use():
    # Under a 5 MiB cap, a 2 MiB output's block is cached; a 4 MiB output freed next does not fit
    # beside it. The block freed longest ago gives way, so the next 4 MiB output reuses the newer
    # block (without eviction, a cache full of an earlier phase's sizes sends every output of the
    # current size to fresh pages).
    code = ("import torch, purified_ops as p\n"
            "small, large = torch.randn(512, 1024), torch.randn(1024, 1024)\n"
            "z = lambda x: x[:, None, :].flip(-1).contiguous()\n"
            "del_small = p.purify(small, z(small)); del del_small\n"
            "y = p.purify(large, z(large)); ptr = y.data_ptr(); del y\n"
            "held = p.cpu_cache_bytes()\n"
            "y = p.purify(large, z(large))\n"
            "print(held, int(y.data_ptr() == ptr))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PURIFIED_OPS_CPU_CACHE_MB": "5"}).stdout.split()
    assert out == [str(4 << 20), "1"]
