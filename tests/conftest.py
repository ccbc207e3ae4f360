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
