"""What a training step keeps alive: the fused op saves its inputs and O(rows x K) values, never
an N x D intermediate."""
import torch

from purified_ops import PurifyLayer


def _saved(fn, *inputs):
    """Storages autograd saves for the backward, other than the inputs' own."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    own = {t.untyped_storage().data_ptr() for t in inputs}
    return out, {p: n for p, n in saved.items() if p not in own}


def test_training_step_saves_no_row_by_feature_tensor(device):
    N, K, D = 512, 3, 256
    x = torch.randn(N, D, device=device, requires_grad=True)
    z = torch.randn(N, K, D, device=device, requires_grad=True)
    layer = PurifyLayer(learnable_strength=True).to(device)
    y, extra = _saved(layer, x, z)
    row_values = N * K * 4 + N * K * K * 4  # coeff and the Cholesky factors, float32
    assert sum(extra.values()) <= row_values + 64, extra
    assert all(n < N * D * 4 for n in extra.values())
    y.sum().backward()  # and the saved state suffices for the backward
    assert x.grad is not None and z.grad is not None
