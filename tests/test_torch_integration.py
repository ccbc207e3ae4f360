"""purify inside torch's machinery: autocast, state and serialization, threads,
DistributedDataParallel."""
import copy
import os
import pickle
import socket
import tempfile
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from purified_ops import PurifyLayer, purify, reference

AUTOCAST_DTYPES = {"cpu": [torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_computes_in_float32_and_outputs_the_promoted_dtype(device, amp_dtype):
    if amp_dtype not in AUTOCAST_DTYPES[device]:
        pytest.skip(f"autocast {amp_dtype} is not a {device} configuration")
    torch.manual_seed(0)
    enc, irr = torch.nn.Linear(16, 32).to(device), torch.nn.Linear(16, 2 * 32).to(device)
    layer = PurifyLayer(learnable_strength=True).to(device)
    x = torch.randn(8, 5, 16, device=device)
    z_outside = torch.randn(8, 1, 2, 32, device=device)  # float32, made outside the region
    with torch.autocast(device, dtype=amp_dtype):
        h = enc(x)                                          # amp_dtype
        z = irr(x.mean(1)).view(8, 1, 2, 32)                # amp_dtype
        y = layer(h, z)
        y_mixed = layer(h, z_outside)
        raw = torch.ops.purified_ops.purify_forward(h, z_outside, torch.tensor(1.0, device=device), 1e-6)[0]
    assert h.dtype == amp_dtype and y.dtype == amp_dtype
    assert y_mixed.dtype == torch.float32 and raw.dtype == torch.float32  # promoted, as torch.add would
    # Computed in float32: only the final rounding separates it from the float32 result.
    ref = reference.purify(h.float(), z.float())
    assert (y.float() - ref).norm() / ref.norm() < {torch.bfloat16: 1e-2, torch.float16: 2e-3}[amp_dtype]
    torch.testing.assert_close(y_mixed, reference.purify(h.float(), z_outside), rtol=1e-5, atol=1e-5)
    (y.float().square().sum() + y_mixed.square().sum()).backward()
    for p in (*enc.parameters(), *irr.parameters(), layer.strength):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_state_dict_round_trip_deepcopy_and_pickle(tmp_path):
    layer = PurifyLayer(0.3, learnable_strength=True, eps=1e-4, detach_irrelevant=True, dim=1)
    with torch.no_grad():
        layer.strength.fill_(0.625)
    fresh = PurifyLayer(learnable_strength=True, eps=1e-4, detach_irrelevant=True, dim=1)
    fresh.load_state_dict(layer.state_dict())
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    loaded = PurifyLayer(learnable_strength=True, eps=1e-4, detach_irrelevant=True, dim=1)
    loaded.load_state_dict(torch.load(path))
    x, z = torch.randn(2, 6, 3, 3), torch.randn(2, 2, 6)
    expect = layer(x, z)
    for other in (fresh, loaded, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert repr(other) == repr(layer)
        assert torch.equal(other(x, z), expect)
    whole = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(layer), whole)
    assert torch.equal(torch.load(whole, weights_only=False)[0](x, z), expect)


def test_concurrent_threads_give_correct_results():
    inputs = [(torch.randn(64, 4, 96), torch.randn(64, 1, 3, 96)) for _ in range(8)]
    expected = [purify(x, z) for x, z in inputs]
    results, errors = [None] * 32, []

    def work(i):
        try:
            x, z = inputs[i % 8]
            xr = x.clone().requires_grad_()
            y = purify(xr, z)
            y.sum().backward()
            results[i] = (y.detach(), xr.grad)
        except Exception as exc:  # noqa: BLE001  reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (y, gx) in enumerate(results):
        assert torch.equal(y, expected[i % 8])
        assert torch.isfinite(gx).all()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(12, 16)
        self.irr = torch.nn.Linear(12, 16)
        self.purify = PurifyLayer(0.5, learnable_strength=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):  # x [B, T, 12]: per-sample directions shared by the T tokens
        z = self.irr(x.mean(1)).unsqueeze(1)
        return self.head(self.purify(self.enc(x), z)).mean(1)


STEPS, BATCH = 4, 8


def _train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, t in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), t).backward()
        opt.step()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, 12, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def _ddp_worker(rank, world, port, out):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(_Net())
        share = BATCH // world
        _train(model, [(x[rank * share:(rank + 1) * share], t[rank * share:(rank + 1) * share]) for x, t in _batches()])
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, out)
        # Both ranks leave together: a rank that tears gloo down while its peer is still busy
        # can abort the peer ("terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process_training():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
        distributed = torch.load(out)
    torch.manual_seed(0)
    single = _Net()
    _train(single, _batches())  # the concatenated batch: DDP averages the two halves' gradients
    assert set(distributed) == set(single.state_dict()) and "purify.strength" in distributed
    for name, value in single.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert distributed["purify.strength"].item() != 0.5  # the strength was trained
