"""Checks of the fused CUDA kernels: layouts the kernels special-case (tiles, vector vs scalar
paths, broadcast z, K buckets), offsets and misalignment, determinism, and, on a GPU only,
> 2^31 elements, a second device, CUDA-graph capture and streams. The general tests
(tests/test_*.py with the `device` fixture) also run on CUDA: what they cover there (zero
directions, NaN rows, empty tensors, determinism, autograd) is not repeated here.

Tests taking `target` run through two backends with the same code: the real CUDA ops (a GPU and
the CUDA build) and the emulated ones (the same kernel sources and host code run on the CPU
with CUDA's thread, barrier and shuffle semantics: purified_ops.ops.emulated_cuda_ops(), built
with PURIFIED_OPS_CUDA_EMU=1). The general tests do not run on the emulated backend, so the
checks they make on real CUDA run here on it alone (`EMULATED_ONLY`). Tests without `target`
need a GPU."""
import zlib
from dataclasses import dataclass

import pytest
import torch

import purified_ops
from purified_ops import ops as ops_layer
from purified_ops import reference
from purified_ops.testing import (DTYPES, TOLERANCE, Backend, magnitude_errors, regularized_gram, rel_err,
                                  rounding_of_16bit_outputs, sum_err, unit_roundoff)

HAVE_GPU = "cuda" in purified_ops.available_backends()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs a GPU and the CUDA build of purified_ops")

OPS = torch.ops.purified_ops if hasattr(torch.ops, "purified_ops") else None


@dataclass
class Target:
    """Where the CUDA ops run: tensors on `device`, ops from the namespace `ops`."""
    name: str
    device: str
    ops: object

    @property
    def emulated(self):
        return self.name == "emulated"


@pytest.fixture(params=["cuda", "emulated"])
def target(request):
    """The backend a test runs on: each of them, or the emulated one alone (EMULATED_ONLY)."""
    if request.param == "cuda":
        if not HAVE_GPU:
            pytest.skip("needs a GPU and the CUDA build of purified_ops")
        yield Target("cuda", "cuda", OPS)
        return
    emulated = ops_layer.emulated_cuda_ops()
    if emulated is None:
        pytest.skip("the emulated CUDA backend is not built (PURIFIED_OPS_CUDA_EMU=1)")
    # Each schedule exposes other barrier bugs (a thread that runs ahead reads what others have
    # not written yet; warps of several teams meet at a barrier id they share): each test runs
    # one, picked (and the random one seeded) by a stable hash of its id.
    module = ops_layer.emulated_cuda_module()
    key = zlib.crc32(request.node.nodeid.encode())
    module.set_schedule(module.schedules[key % len(module.schedules)], key)
    try:
        yield Target("emulated", "cpu", emulated)
    finally:
        reset_emulation(module)


def reset_emulation(module):
    """The emulated backend's test knobs back to their defaults (a test may change any of them)."""
    module.set_schedule("forward")
    module.set_max_grid_stride_blocks(0)
    module.set_shared_memory_fill(0xff)


# For a check the general tests already make on real CUDA through the `device` fixture.
EMULATED_ONLY = pytest.mark.parametrize("target", ["emulated"], indirect=True)


def ref_all(x, z, s, eps, g):
    """(y, dx, dz, ds) in float64 on the CPU, z of shape [..., K, D]."""
    xd, zd, gd = x.double().cpu(), z.double().cpu(), g.double().cpu()
    sd = torch.tensor(float(s), dtype=torch.float64)
    y = reference.purify(xd, zd, strength=sd, eps=eps)
    dx, dz, ds = reference.purify_backward(gd, xd, zd, sd, eps)
    return y, dx, dz, ds


def run_ops(x, z, s, eps, g, compute_grad_z=True, ops=None):
    ops = OPS if ops is None else ops
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    st = torch.tensor(s, dtype=acc, device=x.device)
    y, coeff, chol = ops.purify_forward(x, z, st, eps)
    dx, dz, ds = ops.purify_backward(g, x, z, st, coeff, chol, compute_grad_z)
    return y, coeff, chol, dx, dz, ds


def tolerance(z, eps, dtype):
    """DESIGN's bound where G = Z Z^T + eps I is well conditioned; where it is not (near-square
    shapes), the float64 reference from the same rounded inputs differs by the solve's forward error,
    about K u cond(G) (u of the accumulate dtype), which no evaluation in that dtype avoids."""
    K = z.shape[-2]
    if z.numel() == 0:
        return TOLERANCE[dtype]
    gram = regularized_gram(z.cpu(), eps)
    cond = torch.linalg.cond(gram.reshape(-1, K, K)).max().item()
    return TOLERANCE[dtype] + 4 * K * unit_roundoff(dtype) * cond


def check_against_reference(x, z, s=0.8, eps=1e-4, seed=0, ops=None, order=None):
    """The ops against the float64 reference; ``order``, where given, is the pivot order the
    factor must have (``[rows, K]``, reference.factor_order's)."""
    torch.manual_seed(seed)
    g = torch.randn_like(x)
    y, coeff, chol, dx, dz, ds = run_ops(x, z, s, eps, g, ops=ops)
    ry, rdx, rdz, rds = ref_all(x, z, s, eps, g)
    tol = tolerance(z, eps, x.dtype)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dz).all()
    assert rel_err(y.cpu(), ry) <= tol, ("y", rel_err(y.cpu(), ry), tol)
    assert rel_err(dx.cpu(), rdx) <= tol, ("dx", rel_err(dx.cpu(), rdx), tol)
    assert rel_err(dz.cpu(), rdz) <= tol, ("dz", rel_err(dz.cpu(), rdz), tol)
    assert abs(ds.item() - rds.item()) <= 10 * tol * max(1.0, abs(rds.item())), ("ds", ds.item(), rds.item())
    # chol really is the factor of Z Z^T + eps I per z row, in direction rows (docs/DESIGN.md
    # section 2): lower triangular in its pivot order, M M^T = G in direction order
    M = chol.double().cpu()
    found = reference.factor_order(M)
    L = M.gather(-2, found.unsqueeze(-1).expand(*found.shape, M.shape[-1]))
    assert torch.equal(L, L.tril())
    assert rel_err(M @ M.transpose(-1, -2), regularized_gram(z, eps).cpu()) <= max(tol, 1e-5)
    if order is not None:
        assert torch.equal(found, order), "pivot order"
    return y, dx, dz, ds


def directions(shape, dtype, device, D):
    """Random z. Where K >= D the K directions span R^D and, with |z|^2 >> eps, y is ~eps/|z|^2
    of x, a cancellation no float32 evaluation resolves (tests/test_accuracy.py's
    test_rank_deficient_is_stable covers that regime); where K > D / 2, Z Z^T of random
    directions is ill-conditioned (cond ~ 1e4 at K = 4, D = 5). There z is scaled so that
    |z|^2 ~ eps: G is then well conditioned and the tolerance stays DESIGN's."""
    z = torch.randn(*shape)
    if 2 * shape[-2] > D:
        z = z * 1e-3
    return z.to(device, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("D", [1, 5, 7, 64, 1000, 1024, 4100])
def test_shapes_k_buckets_and_tiles(target, dtype, K, D):
    # D = 4100 is longer than one tile for every K > 2 (re-read path) and not a multiple of 8.
    torch.manual_seed(K * 1000 + D)
    rows = 37 if not target.emulated or D <= 1024 else 9
    x = torch.randn(rows, D).to(target.device, dtype)
    z = directions((rows, K, D), dtype, target.device, D)
    check_against_reference(x, z, ops=target.ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K", [1, 4, 16])
@pytest.mark.parametrize("D", [8, 512, 8192, 20000])
def test_broadcast_z_shared_by_many_rows(target, dtype, K, D):
    # z shared over T tokens: the dz partials + fixed-order finalize path, several items per z row.
    torch.manual_seed(K + D)
    B, T = 3, 300
    if target.emulated and D > 512:
        if D > 8192:
            pytest.skip("emulated: D = 8192 already takes several tiles per row; 20000 only costs time")
        T = 40  # still several work items per z row (>= 16 rows each)
    x = torch.randn(B, T, D).to(target.device, dtype)
    z = torch.randn(B, 1, K, D).to(target.device, dtype)
    check_against_reference(x, z, ops=target.ops)


def test_broadcast_patterns_interleaved(target):
    torch.manual_seed(1)
    x = torch.randn(4, 5, 6, 96, device=target.device)
    for zs in [(1, 5, 1), (4, 1, 6), (1, 1, 1), (4, 5, 6), (4, 1, 1)]:
        z = torch.randn(*zs, 3, 96, device=target.device)
        check_against_reference(x, z, ops=target.ops)


def test_more_leading_dims_than_the_row_grid_holds(target, many_dims):
    # The fused kernels' host code runs such a call grouped (purify_host.h): every output of the
    # raw ops bitwise that of the contiguous inputs (whose accuracy the other tests check).
    x, z = many_dims(target.device)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(x)
    got = run_ops(x, z, 0.9, 1e-4, g, ops=target.ops)
    contiguous = run_ops(x.contiguous(), z.contiguous(), 0.9, 1e-4, g, ops=target.ops)
    for a, b in zip(got, contiguous):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
def test_offset_and_misaligned_inputs(target, dtype):
    torch.manual_seed(2)
    base_x = torch.randn(64, 1 + 512).to(target.device, dtype)
    base_z = torch.randn(64, 4, 3 + 512).to(target.device, dtype)
    x = base_x[:, 1:]                  # storage offset 1 element: misaligned rows
    z = base_z[:, :, 3:]
    assert x.data_ptr() % 16 != 0
    check_against_reference(x, z, ops=target.ops)
    # non-unit strides in the leading dims, transposed layouts
    xt = torch.randn(512, 48).to(target.device, dtype).t()  # last dim stride 48: copied
    zt = torch.randn(48, 2, 512).to(target.device, dtype)
    check_against_reference(xt, zt, ops=target.ops)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
@pytest.mark.parametrize("shared", [False, True])
def test_vector_path_equals_scalar_path(target, dtype, shared):
    # The same values read 16 bytes at a time (aligned) and element by element (storage offset 1
    # of x, z and grad_y): every output bitwise equal, dz partials included when z is shared.
    torch.manual_seed(9)
    D, K = 520, 3
    lead = (2, 40) if shared else (80,)
    zlead = (2, 1) if shared else lead
    base = [torch.randn(n + 1).to(target.device, dtype) for n in
            (torch.Size(lead).numel() * D, torch.Size(zlead).numel() * K * D, torch.Size(lead).numel() * D)]
    x, z, g = (b[1:].view(*shape) for b, shape in zip(base, ((*lead, D), (*zlead, K, D), (*lead, D))))
    assert x.data_ptr() % 16 != 0 and z.data_ptr() % 16 != 0
    scalar = run_ops(x, z, 0.9, 1e-4, g, ops=target.ops)
    vector = run_ops(x.clone(), z.clone(), 0.9, 1e-4, g.clone(), ops=target.ops)
    for a, b in zip(scalar, vector):
        assert torch.equal(a, b)


def test_16bit_outputs_round_to_nearest_even(target):
    # The tolerances hide a 1-ulp bias (truncating float -> bfloat16 passes them): the rounding
    # itself, against the same ops in float32 (purified_ops.testing.rounding_of_16bit_outputs).
    backend = Backend(target.name, target.device, target.ops.purify_forward, target.ops.purify_backward)
    found = rounding_of_16bit_outputs(backend)
    assert all(r.passed for r in found), [r for r in found if not r.passed]


def test_inputs_are_not_written_and_outputs_fully_written(target):
    torch.manual_seed(3)
    x = torch.randn(129, 300).to(target.device, torch.bfloat16)
    z = torch.randn(129, 5, 300).to(target.device, torch.bfloat16)
    g = torch.randn_like(x)
    copies = [t.clone() for t in (x, z, g)]
    y, coeff, chol, dx, dz, ds = run_ops(x, z, 1.0, 1e-6, g, ops=target.ops)
    for a, b in zip((x, z, g), copies):
        assert torch.equal(a, b)
    for t in (y, coeff, chol, dx, dz, ds):
        assert torch.isfinite(t).all()


@EMULATED_ONLY
def test_empty_tensors(target):
    for xs, zs in [((0, 16), (0, 2, 16)), ((4, 0), (4, 2, 0)), ((3, 0, 8), (3, 1, 1, 8)), ((0, 16), (0, 20, 16)),
                   ((4, 0), (4, 20, 0))]:
        x = torch.randn(*xs, device=target.device)
        z = torch.randn(*zs, device=target.device)
        y, coeff, chol, dx, dz, ds = run_ops(x, z, 1.0, 1e-6, torch.randn_like(x), ops=target.ops)
        assert y.shape == x.shape and dx.shape == x.shape and dz.shape == z.shape
        assert ds.item() == 0.0


# (z exponent, x exponent): |z|^2 overflows float32 from |z| ~ 2^64, float64 from ~2^512; z.x
# overflows float32 at 2^30 x 2^80 (docs/DESIGN.md, "The scale of z").
MAGNITUDES = {torch.float32: [(66, 0), (125, 0), (30, 80)], torch.bfloat16: [(70, 0), (30, 80)],
              torch.float64: [(600, 0), (350, 700)]}


def _raw_run(ops):
    def run(x, z, g, s):
        y, coeff, chol = ops.purify_forward(x, z, s, 1e-6)
        return (y, *ops.purify_backward(g, x, z, s, coeff, chol, True))
    return run


@pytest.mark.parametrize("layout", ["rows", "shared z", "long rows"])
@pytest.mark.parametrize("K", [1, 4, 16, 20])
@pytest.mark.parametrize("dtype", list(MAGNITUDES), ids=str)
def test_large_directions_and_features(target, dtype, K, layout):
    """The scaled path of the fused kernels (first row of an item, rows of a shared z, rows longer
    than a tile) and the scaled K > 16 path: y and every gradient right, by the float64 reference of the
    inputs scaled back by powers of two."""
    if layout == "long rows" and (dtype != torch.float32 or K not in (4, 16)):
        pytest.skip("one dtype: the tile logic is dtype-independent")
    D = 4100 if layout == "long rows" else 24
    # "rows": 9 items, more than a block's teams (8 teams of one warp at D = 24), so that every
    # team's slice of shared memory, the last one's scale slots too, holds the scaled path.
    shapes = ((2, 5, D), (2, 1, K, D)) if layout == "shared z" else ((3, D), (3, K, D)) if layout == "long rows" \
        else ((9, D), (9, K, D))
    g = torch.Generator().manual_seed(K + D)
    x0, z0 = (torch.randn(*sh, generator=g).to(target.device, dtype) for sh in shapes)
    gy = torch.randn(*shapes[0], generator=g).to(target.device, dtype)
    s = torch.tensor(0.75, dtype=reference.accumulate_dtype(dtype), device=target.device)
    # row norms stay representable (the factor returned for the backward has entries ~|z_k|)
    magnitudes = [(100, 0), (30, 80)] if layout == "long rows" else MAGNITUDES[dtype]
    for z_exp, x_exp in magnitudes:
        errors = magnitude_errors(_raw_run(target.ops), x0, z0, gy, s, 1e-6, z_exp, x_exp)
        assert errors.pop("finite"), (z_exp, x_exp)
        for name, err in errors.items():
            assert err <= TOLERANCE[dtype], f"{name}: {err:.3g} at |z| 2^{z_exp}, |x| 2^{x_exp}"


@pytest.mark.parametrize("K", [2, 16, 20])
def test_rows_of_one_item_at_different_scales(target, K):
    """One shared z (|z| ~ 2^30) and rows whose z.x or z.g overflows float32 only every third row:
    the item switches to the scaled path at such a row and keeps it for the rows after; every row
    and the summed dz and dstrength are right (float64 holds these magnitudes: its reference is direct)."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(1, 48, 32, generator=g)
    gy = torch.randn(1, 48, 32, generator=g)
    z = torch.randn(1, 1, K, 32, generator=g) * 2.0 ** 30
    x[:, 1::3] *= 2.0 ** 80
    gy[:, 2::3] *= 2.0 ** 80
    x, gy, z = x.to(target.device), gy.to(target.device), z.to(target.device)
    s = torch.tensor(0.75, device=target.device)
    y, dx, dz, ds = _raw_run(target.ops)(x, z, gy, s)
    ry, rdx, rdz, rds = ref_all(x, z, 0.75, 1e-6, gy)
    for name, o in (("y", y), ("dx", dx), ("dz", dz), ("ds", ds)):
        assert torch.isfinite(o).all(), name
    xs, gs = x.double().cpu().norm(dim=-1), gy.double().cpu().norm(dim=-1)
    assert ((y.double().cpu() - ry).norm(dim=-1) / xs).max() <= 1e-5
    assert ((dx.double().cpu() - rdx).norm(dim=-1) / gs).max() <= 1e-5
    assert rel_err(dz.cpu(), rdz) <= 1e-5
    assert sum_err(ds.cpu(), rds, gy.double().cpu() * (x.double().cpu() - ry) / 0.75) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("K", [4, 16])
def test_pivoting_on_nearly_dependent_directions(target, dtype, K):
    """Direction pairs 5% apart: the warp factor's lazy pivoting takes each pair's second out of
    natural order, and in most rows the direction factored last is neither the first nor the last
    (its lane learns its step from the order lane 0 wrote). Every row right, in the CPU factor's
    pivot order. On the emulated backend under every schedule, also with shared memory starting
    finite (as a GPU leaves it) and with a grid of one block (each team then serves several items
    and finds the previous item's order): a lane that reads the order before lane 0 wrote it then
    gets a finite wrong factor. (The default NaN fill would send the row down the scaled path,
    which factors again and by then reads what was written.)"""
    g = torch.Generator().manual_seed(K)
    half = torch.randn(37, K // 2, 64, generator=g)
    pairs = torch.stack([half, half + 0.05 * torch.randn(half.shape, generator=g)], dim=2)
    x = torch.randn(37, 64, generator=g).to(target.device, dtype)
    z = pairs.reshape(37, K, 64).to(target.device, dtype)
    order = reference.factor_order(reference.regularized_cholesky(regularized_gram(z.cpu(), 1e-4), 1e-4))
    assert ((order[:, -1] != 0) & (order[:, -1] != K - 1)).sum() >= 20  # the case this test is for
    module = ops_layer.emulated_cuda_module() if target.emulated else None
    runs = [(s, blocks, fill) for s in module.schedules for blocks, fill in ((0, 0xff), (0, 0x3c), (1, 0xff))] \
        if module is not None else [(None, 0, None)]
    for schedule, blocks, fill in runs:  # the target fixture resets the knobs
        if module is not None:
            module.set_schedule(schedule, K)
            module.set_max_grid_stride_blocks(blocks)
            module.set_shared_memory_fill(fill)
        check_against_reference(x, z, ops=target.ops, order=order)


@pytest.mark.parametrize("K", [17, 24])
def test_large_k_fallback(target, K):
    torch.manual_seed(K)
    x = torch.randn(20, 256, device=target.device, dtype=torch.float64)
    z = torch.randn(20, K, 256, device=target.device, dtype=torch.float64)
    check_against_reference(x, z, ops=target.ops)
    x = torch.randn(4, 7, 256, device=target.device)
    z = torch.randn(4, 1, K, 256, device=target.device)
    check_against_reference(x, z, ops=target.ops)
    for dtype in (torch.float16, torch.bfloat16):  # accumulate in float32, K >= D scaled as above
        x = torch.randn(5, 9).to(target.device, dtype)
        check_against_reference(x, directions((5, K, 9), dtype, target.device, 9), ops=target.ops)


# The factor kernel of that path (one thread per matrix, 128 per block) over several blocks.
def test_large_k_factor_kernel_many_blocks(target):
    torch.manual_seed(30)
    x = torch.randn(300, 40, device=target.device)
    z = torch.randn(300, 18, 40, device=target.device)
    check_against_reference(x, z, ops=target.ops)


@needs_gpu
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


@needs_gpu
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


@EMULATED_ONLY
def test_bitwise_deterministic(target):
    torch.manual_seed(4)
    for x, z in [(torch.randn(257, 3000).to(target.device, torch.bfloat16),
                  torch.randn(257, 4, 3000).to(target.device, torch.bfloat16)),
                 (torch.randn(2, 200, 700, device=target.device), torch.randn(2, 1, 16, 700, device=target.device))]:
        g = torch.randn_like(x)
        first = run_ops(x, z, 0.7, 1e-5, g, ops=target.ops)
        again = run_ops(x, z, 0.7, 1e-5, g, ops=target.ops)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


EMULATED_LAYOUTS = [  # (x shape, z shape): own z rows; z shared by several work items; K > 16
    ((70, 1000), (70, 3, 1000)),
    ((2, 300, 96), (2, 1, 8, 96)),
    ((3, 90, 33), (3, 1, 16, 33)),
    ((20, 64), (20, 20, 64)),
]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
@pytest.mark.parametrize("K", [2, 16, 20])
def test_strength_by_value_equals_the_strength_tensor(target, dtype, K):
    # purify_forward.float_strength passes the number in the launch parameters (the fused path)
    # or makes it a tensor (K > 16): the strength tensor's numbers, bit for bit, in every dtype.
    torch.manual_seed(K)
    x = torch.randn(2, 5, 40).to(target.device, dtype)
    z = directions((2, 1, K, 40), dtype, target.device, 40)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for s in (0.3, -1.7):
        by_tensor = target.ops.purify_forward(x, z, torch.tensor(s, dtype=acc, device=target.device), 1e-4)
        by_value = target.ops.purify_forward.float_strength(x, z, s, 1e-4)
        for a, b in zip(by_tensor, by_value):
            assert torch.equal(a, b)


@pytest.mark.parametrize("xs,zs", EMULATED_LAYOUTS)
def test_emulated_schedules_and_grids_bitwise_equal(xs, zs):
    # Emulation only: the results may not depend on the order the threads of a block run in,
    # nor on the grid (a grid of one block makes every team serve many work items), nor on what
    # shared memory held before (NaN bytes, zeros, or finite values as a GPU leaves them).
    emulated = ops_layer.emulated_cuda_ops()
    if emulated is None:
        pytest.skip("the emulated CUDA backend is not built (PURIFIED_OPS_CUDA_EMU=1)")
    module = ops_layer.emulated_cuda_module()
    torch.manual_seed(11)
    x, z = torch.randn(*xs), torch.randn(*zs)
    g = torch.randn_like(x)
    first = run_ops(x, z, 0.6, 1e-4, g, ops=emulated)
    try:
        for schedule, blocks, fill in [("reverse", 0, 0xff), ("forward", 1, 0xff), ("reverse", 2, 0xff),
                                       ("round-robin", 2, 0xff), ("random", 1, 0xff), ("forward", 0, 0x3c),
                                       ("random", 0, 0x00)]:
            module.set_schedule(schedule, 7)
            module.set_max_grid_stride_blocks(blocks)
            module.set_shared_memory_fill(fill)
            again = run_ops(x, z, 0.6, 1e-4, g, ops=emulated)
            for a, b in zip(first, again):
                assert torch.equal(a, b), (schedule, blocks, fill)
    finally:
        reset_emulation(module)


def test_emulated_ops_check_arguments_like_the_library():
    emulated = ops_layer.emulated_cuda_ops()
    if emulated is None:
        pytest.skip("the emulated CUDA backend is not built (PURIFIED_OPS_CUDA_EMU=1)")
    x, z, s = torch.randn(4, 8), torch.randn(4, 2, 8), torch.tensor(1.0)
    with pytest.raises(ValueError, match="purify_forward: eps must be a normal Float number"):
        emulated.purify_forward(x, z, s, 0.0)
    with pytest.raises(ValueError, match=r"purify_forward: x must be \[..., D\] and z \[..., K, D\]"):
        emulated.purify_forward(x, torch.randn(4, 2, 9), s, 1e-6)
    ours, lib = emulated.purify_forward(x, z, s, 1e-6), OPS.purify_forward(x, z, s, 1e-6)
    assert [(t.shape, t.dtype) for t in ours] == [(t.shape, t.dtype) for t in lib]
    module = ops_layer.emulated_cuda_module()
    with pytest.raises(ValueError, match="schedule must be one of 'forward', 'reverse', 'round-robin', 'random', "
                                         "got 'sideways'"):
        module.set_schedule("sideways")
    with pytest.raises(ValueError, match=r"the fill must be a byte \(0..255\), got 256"):
        module.set_shared_memory_fill(256)


@needs_gpu
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


@needs_gpu
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


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    torch.manual_seed(7)
    x = torch.randn(64, 512, device="cuda:1")
    z = torch.randn(64, 3, 512, device="cuda:1")
    y, dx, dz, ds = check_against_reference(x, z)
    assert y.device == torch.device("cuda:1") and dz.device == torch.device("cuda:1")


@needs_gpu
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
    assert rel_err(y[idx].cpu(), ref) <= TOLERANCE[torch.bfloat16]
    del y, coeff
    torch.cuda.empty_cache()
