import os

import pytest
from hypothesis import settings

# CI runs a fixed set of examples (reproducible); HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every test taking `device` runs on the CPU and, where a GPU and the CUDA build exist, on CUDA."""
    import purified_ops

    if request.param not in purified_ops.available_backends():
        pytest.skip(f"backend {request.param!r} not available here")
    return request.param


# More of z's own leading dims than the row grid addresses in place (csrc/row_grid.h: 12 of one
# kind after merging), so the call runs grouped (csrc/purify_host.h, GroupedCall): 13 of them;
# with a broadcast dim between them (grouping reorders x's rows, the outputs are copied back) or
# after them (the rows keep their order: the outputs are written in place). (dims, broadcast dims)
MANY_DIMS = {"own": (13, ()), "broadcast_inside": (14, (6,)), "broadcast_last": (14, (13,))}


@pytest.fixture(params=sorted(MANY_DIMS))
def many_dims(request):
    """make(device, K=2, D=8) -> (x, z): x with that many leading dims of size 2, permuted so that
    no two of them merge in memory, and z likewise, with size 1 at the broadcast dims."""
    import torch

    dims, broadcast = MANY_DIMS[request.param]

    def make(device, K=2, D=8):
        gen = torch.Generator().manual_seed(dims)
        order = [(5 * i) % dims for i in range(dims)]  # neighbours 5 apart in memory
        x = torch.randn([2] * dims + [D], generator=gen).to(device).permute(*order, dims)
        z = torch.randn([2] * dims + [K, D], generator=gen).to(device).permute(*order, dims, dims + 1)
        return x, z[tuple(slice(0, 1) if i in broadcast else slice(None) for i in range(dims))]

    return make
