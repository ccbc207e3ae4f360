import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every test taking `device` runs on the CPU and, where a GPU and the CUDA build exist, on CUDA."""
    import purified_ops

    if request.param not in purified_ops.available_backends():
        pytest.skip(f"backend {request.param!r} not available here")
    return request.param
