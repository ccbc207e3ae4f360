"""CUDA-only checks of the fused kernels (skipped without a GPU and a CUDA build): layouts the
kernels special-case (tiles, vector vs scalar paths, broadcast z, K buckets), offsets and
misalignment, > 2^31 elements, a second device, CUDA-graph capture, determinism, streams.
The general tests (tests/test_*.py with the `device` fixture) also run on CUDA."""
import pytest
import torch

import purified_ops
from purified_ops import reference

pytestmark = pytest.mark.skipif("cuda" not in purified_ops.available_backends(),
                                reason="needs a GPU and the CUDA build of purified_ops")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
OPS = torch.ops.purified_ops if hasattr(torch.ops, "purified_ops") else None


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def ref_all(x, z, s, eps, g):
    """(y, dx, dz, ds) in float64 on the CPU, z of shape [..., K, D]."""
    xd, zd, gd = x.double().cpu(), z.double().cpu(), g.double().cpu()
    sd = torch.tensor(float(s), dtype=torch.float64)
    y = reference.purify(xd, zd, strength=sd, eps=eps)
    dx, dz, ds = reference.purify_backward(gd, xd, zd, sd, eps)
    return y, dx, dz, ds


def run_ops(x, z, s, eps, g, compute_grad_z=True):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    st = torch.tensor(s, dtype=acc, device=x.device)
    y, coeff, chol = OPS.purify_forward(x, z, st, eps)
    dx, dz, ds = OPS.purify_backward(g, x, z, st, coeff, chol, compute_grad_z)
    return y, coeff, chol, dx, dz, ds


def check_against_reference(x, z, s=0.8, eps=1e-4, seed=0):
    torch.manual_seed(seed)
    g = torch.randn_like(x)
    y, coeff, chol, dx, dz, ds = run_ops(x, z, s, eps, g)
    ry, rdx, rdz, rds = ref_all(x, z, s, eps, g)
    tol = TOL[x.dtype]
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dz).all()
    assert rel_err(y.cpu(), ry) <= tol, ("y", rel_err(y.cpu(), ry))
    assert rel_err(dx.cpu(), rdx) <= tol, ("dx", rel_err(dx.cpu(), rdx))
    assert rel_err(dz.cpu(), rdz) <= tol, ("dz", rel_err(dz.cpu(), rdz))
    assert abs(ds.item() - rds.item()) <= 10 * tol * max(1.0, abs(rds.item())), ("ds", ds.item(), rds.item())
    # chol really is the factor of Z Z^T + eps I (lower, per z row)
    zd = z.double()
    gram = zd @ zd.transpose(-1, -2) + eps * torch.eye(z.shape[-2], dtype=torch.float64, device=z.device)
    L = chol.double()
    assert torch.equal(L, L.tril())
    assert rel_err(L @ L.transpose(-1, -2), gram) <= max(tol, 1e-5)
    return y, dx, dz, ds


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("D", [1, 7, 64, 1000, 1024, 4100])
def test_shapes_k_buckets_and_tiles(dtype, K, D):
    # D = 4100 is longer than one tile for every K > 2 (re-read path) and not a multiple of 8.
    torch.manual_seed(K * 1000 + D)
    x = torch.randn(37, D, device="cuda", dtype=dtype)
    z = torch.randn(37, K, D, device="cuda", dtype=dtype)
    check_against_reference(x, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 4, 16])
@pytest.mark.parametrize("D", [8, 512, 8192, 20000])
def test_broadcast_z_shared_by_many_rows(dtype, K, D):
    # z shared over T tokens: the dz partials + fixed-order finalize path, several items per z row.
    torch.manual_seed(K + D)
    B, T = 3, 300
    x = torch.randn(B, T, D, device="cuda", dtype=dtype)
    z = torch.randn(B, 1, K, D, device="cuda", dtype=dtype)
    check_against_reference(x, z)


def test_broadcast_patterns_interleaved():
    torch.manual_seed(1)
    x = torch.randn(4, 5, 6, 96, device="cuda")
    for zs in [(1, 5, 1), (4, 1, 6), (1, 1, 1), (4, 5, 6), (4, 1, 1)]:
        z = torch.randn(*zs, 3, 96, device="cuda")
        check_against_reference(x, z)


@pytest.mark.parametrize("dtype", DTYPES)
def test_offset_and_misaligned_inputs(dtype):
    torch.manual_seed(2)
    base_x = torch.randn(64, 1 + 512, device="cuda", dtype=dtype)
    base_z = torch.randn(64, 4, 3 + 512, device="cuda", dtype=dtype)
    x = base_x[:, 1:]                  # storage offset 1 element: misaligned rows
    z = base_z[:, :, 3:]
    assert x.data_ptr() % 16 != 0
    y, dx, dz, ds = check_against_reference(x, z)
    # the scalar path must give the same numbers as the vector path on the same values
    y2 = run_ops(x.contiguous(), z.contiguous(), 0.8, 1e-4, torch.randn_like(x))[0]
    assert torch.equal(y, y2)
    # non-unit strides in the leading dims, transposed layouts
    xt = torch.randn(512, 48, device="cuda", dtype=dtype).t()  # last dim stride 48: copied
    zt = torch.randn(48, 2, 512, device="cuda", dtype=dtype)
    check_against_reference(xt, zt)


def test_inputs_are_not_written_and_outputs_fully_written():
    torch.manual_seed(3)
    x = torch.randn(129, 300, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(129, 5, 300, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    copies = [t.clone() for t in (x, z, g)]
    y, coeff, chol, dx, dz, ds = run_ops(x, z, 1.0, 1e-6, g)
    for a, b in zip((x, z, g), copies):
        assert torch.equal(a, b)
    for t in (y, coeff, chol, dx, dz, ds):
        assert torch.isfinite(t).all()


def test_zero_direction_is_identity_and_dependent_directions_finite():
    x = torch.randn(16, 1000, device="cuda")
    z = torch.zeros(16, 3, 1000, device="cuda")
    y = purified_ops.purify(x, z)
    assert torch.equal(y, x)
    d = torch.randn(16, 1, 1000, device="cuda") * 100
    z = torch.cat([d, d, 2 * d, d], dim=1)  # repeated and dependent directions
    x.requires_grad_(True)
    zz = z.clone().requires_grad_(True)
    y = purified_ops.purify(x, zz, eps=1e-6)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(zz.grad).all()


def test_nan_row_stays_in_its_row():
    x = torch.randn(8, 300, device="cuda")
    z = torch.randn(8, 2, 300, device="cuda")
    x[3, 17] = float("nan")
    y = purified_ops.purify(x, z)
    assert torch.isnan(y[3]).any()
    assert torch.isfinite(torch.cat([y[:3], y[4:]])).all()


def test_empty_tensors():
    for xs, zs in [((0, 16), (0, 2, 16)), ((4, 0), (4, 2, 0)), ((3, 0, 8), (3, 1, 1, 8))]:
        x = torch.randn(*xs, device="cuda")
        z = torch.randn(*zs, device="cuda")
        y, coeff, chol, dx, dz, ds = run_ops(x, z, 1.0, 1e-6, torch.randn_like(x))
        assert y.shape == x.shape and dx.shape == x.shape and dz.shape == z.shape
        assert ds.item() == 0.0


@pytest.mark.parametrize("K", [17, 24])
def test_large_k_fallback(K):
    torch.manual_seed(K)
    x = torch.randn(20, 256, device="cuda", dtype=torch.float64)
    z = torch.randn(20, K, 256, device="cuda", dtype=torch.float64)
    check_against_reference(x, z)
    x = torch.randn(4, 7, 256, device="cuda")
    z = torch.randn(4, 1, K, 256, device="cuda")
    check_against_reference(x, z)


def test_large_k_fallback_ignores_tf32():
    # The K > 16 path runs cuBLAS matmuls; a user's global TF32 switch must not cost accuracy.
    torch.manual_seed(20)
    x = torch.randn(64, 512, device="cuda")
    z = torch.randn(64, 20, 512, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_against_reference(x, z)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_large_k_shared_z_is_not_expanded_per_row():
    # 8192 x rows share two z rows of K = 64: z expanded per row would be 512 MiB in float32,
    # x is 8 MiB. The unfused K > 16 path keeps to a few x-sized temporaries (and cuBLAS's
    # workspace, when this is its first use): far below half of that.
    torch.manual_seed(64)
    x = torch.randn(2, 4096, 256, device="cuda")
    z = torch.randn(2, 1, 64, 256, device="cuda")
    g = torch.randn_like(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run_ops(x, z, 1.0, 1e-6, g)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    per_row_z = x.numel() * z.shape[-2] * 4
    assert peak < per_row_z / 2, (peak / 2**20, per_row_z / 2**20)
    assert all(torch.isfinite(t).all() for t in out)
    assert torch.equal(run_ops(x, z, 1.0, 1e-6, g)[4], out[4])  # dz, reduced in a fixed order


def test_bitwise_deterministic():
    torch.manual_seed(4)
    for x, z in [(torch.randn(257, 3000, device="cuda", dtype=torch.bfloat16),
                  torch.randn(257, 4, 3000, device="cuda", dtype=torch.bfloat16)),
                 (torch.randn(2, 4000, 700, device="cuda"), torch.randn(2, 1, 16, 700, device="cuda"))]:
        g = torch.randn_like(x)
        first = run_ops(x, z, 0.7, 1e-5, g)
        for _ in range(3):
            again = run_ops(x, z, 0.7, 1e-5, g)
            for a, b in zip(first, again):
                assert torch.equal(a, b)


def test_cuda_graph_capture_and_replay_equals_eager():
    torch.manual_seed(5)
    x = torch.randn(3, 100, 1024, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(3, 1, 4, 1024, device="cuda", dtype=torch.bfloat16)  # shared by 100 rows
    g = torch.randn_like(x)
    s = torch.tensor(0.9, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as graph capture wants
        for _ in range(2):
            eager = run_graphable(x, z, s, g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_graphable(x, z, s, g)
    x.copy_(torch.randn_like(x))
    s.fill_(0.5)  # strength is read from device memory at replay time
    graph.replay()
    torch.cuda.synchronize()
    expect = run_graphable(x, z, s, g)
    for a, b in zip(captured, expect):
        assert torch.equal(a, b)
    assert not torch.equal(eager[0], expect[0])


def run_graphable(x, z, s, g):
    y, coeff, chol = OPS.purify_forward(x, z, s, 1e-6)
    dx, dz, ds = OPS.purify_backward(g, x, z, s, coeff, chol, True)
    return y, coeff, chol, dx, dz, ds


def test_two_streams_concurrently():
    torch.manual_seed(6)
    xs = [torch.randn(512, 2048, device="cuda") for _ in range(2)]
    zs = [torch.randn(512, 4, 2048, device="cuda") for _ in range(2)]
    gs = [torch.randn_like(x) for x in xs]
    expect = [run_ops(x, z, 1.0, 1e-6, g) for x, z, g in zip(xs, zs, gs)]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [None, None]
    for _ in range(3):
        for i, st in enumerate(streams):
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                outs[i] = run_ops(xs[i], zs[i], 1.0, 1e-6, gs[i])
        torch.cuda.synchronize()
        for i in range(2):
            for a, b in zip(outs[i], expect[i]):
                assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    torch.manual_seed(7)
    x = torch.randn(64, 512, device="cuda:1")
    z = torch.randn(64, 3, 512, device="cuda:1")
    y, dx, dz, ds = check_against_reference(x, z)
    assert y.device == torch.device("cuda:1") and dz.device == torch.device("cuda:1")


def test_autograd_through_purify_on_cuda():
    torch.manual_seed(8)
    x = torch.randn(6, 50, 256, device="cuda", requires_grad=True)
    z = torch.randn(6, 1, 4, 256, device="cuda", requires_grad=True)
    s = torch.tensor(0.7, device="cuda", requires_grad=True)
    y = purified_ops.purify(x, z, strength=s, backend="cuda")
    y.square().sum().backward()
    xr, zr, sr = (t.detach().double().cpu().requires_grad_(True) for t in (x, z, s))
    yr = reference.purify(xr, zr, strength=sr, eps=1e-6)
    yr.square().sum().backward()
    assert rel_err(y.detach().cpu(), yr.detach()) <= 1e-5
    for a, b in ((x, xr), (z, zr), (s, sr)):
        assert rel_err(a.grad.cpu(), b.grad) <= 1e-4


def test_bf16_past_2_pow_31_elements():
    need = (2**31 + 2**20) * 2 * 2 + (1 << 30)  # x and y in bf16, plus slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free, {free / 2**30:.1f} GiB free")
    D = 4096
    rows = (2**31 + 2**20) // D + 1  # > 2^31 elements
    x = torch.empty(rows, D, device="cuda", dtype=torch.bfloat16)
    x.normal_()
    z = torch.randn(1, 1, D, device="cuda", dtype=torch.bfloat16)  # one direction for all rows
    st = torch.tensor(1.0, device="cuda")
    y, coeff, chol = OPS.purify_forward(x, z, st, 1e-6)
    # check rows on both sides of the 2^31 element boundary against the reference
    idx = torch.tensor([0, 2**31 // D - 1, 2**31 // D, 2**31 // D + 1, rows - 1], device="cuda")
    ref = reference.purify(x[idx].double().cpu(), z.double().cpu()[0], eps=1e-6)
    assert rel_err(y[idx].cpu(), ref) <= TOL[torch.bfloat16]
    del y, coeff
    torch.cuda.empty_cache()
