"""Property tests (random shapes, K, dtypes, strides, broadcasting, strength, eps) and fuzzed bad
input for every public entry point."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from purified_ops import PurifyFunction, PurifyLayer, purify, reference

from purified_ops.testing import TOLERANCE, conditioned_row_bound, gram_condition, row_err

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = tuple(TOLERANCE)  # float64, float32, float16, bfloat16


@st.composite
def problems(draw, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    D = draw(st.integers(1, 40))
    K = draw(st.integers(1, 6))
    zlead = [n if draw(st.booleans()) else 1 for n in lead]  # broadcast some leading dims
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=g).to(dtype)
    single = K == 1 and draw(st.booleans())
    z = torch.randn(*zlead, *(() if single else (K,)), D, generator=g).to(dtype)
    if draw(st.booleans()) and x.dim() >= 2:  # a non-contiguous x with the same values
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    if draw(st.booleans()):  # a storage offset and a row stride
        x = torch.cat([x, x], dim=-1)[..., D:]
    strength = draw(st.sampled_from([1.0, 0.0, 0.5, -0.7, 2.0]))
    eps = draw(st.sampled_from([1e-6, 1e-3, 1.0]))
    return x, z, strength, eps


@SETTINGS
@given(problems())
def test_equals_reference(problem):
    x, z, strength, eps = problem
    y = purify(x, z, strength=strength, eps=eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = reference.purify(x.double(), z.double(), strength=strength, eps=eps)
    if x.numel():
        # Error relative to each row's |x| (the computation's scale; y itself can be tiny when
        # K >= D), with a bound that grows with the condition number of G.
        err = row_err(y, ref, x)
        kappa = gram_condition(x, z, eps)
        bound = conditioned_row_bound(x.dtype, kappa, strength)
        assert (err <= bound).all(), (err.max().item(), kappa.max().item())


def _well_posed(draw, D_min=4):
    D = draw(st.integers(D_min, 48))
    K = draw(st.integers(1, D // 2))
    N = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, K, D, generator=g, dtype=torch.float64)


@SETTINGS
@given(st.data())
def test_full_strength_output_is_orthogonal_and_idempotent(data):
    x, z = _well_posed(data.draw)
    y = purify(x, z, eps=1e-12)
    assert (z @ y.unsqueeze(-1)).abs().max() <= 1e-8 * (z.norm() * x.norm()).item()
    torch.testing.assert_close(purify(y, z, eps=1e-12), y, rtol=1e-8, atol=1e-9)


@SETTINGS
@given(st.data(), st.floats(0.01, 100.0))
def test_scaling_z_does_not_change_the_result(data, scale):
    x, z = _well_posed(data.draw)
    torch.testing.assert_close(purify(x, z * scale, eps=1e-14), purify(x, z, eps=1e-14), rtol=1e-7, atol=1e-8)


@SETTINGS
@given(st.data(), st.floats(-3, 3), st.floats(-3, 3))
def test_linear_in_x(data, a, b):
    x, z = _well_posed(data.draw)
    x2 = torch.randn_like(x)
    torch.testing.assert_close(purify(a * x + b * x2, z, strength=0.8), a * purify(x, z, strength=0.8) + b * purify(x2, z, strength=0.8),
                               rtol=1e-9, atol=1e-9)


# ---- fuzzed bad input -------------------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3), st.just([1.0, 2.0]), st.just(np.ones((2, 3))),
)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                  torch.bool, torch.complex64, torch.uint8]))
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=4))
    device = draw(st.sampled_from(["cpu", "cpu", "cpu", "meta"]))
    return torch.zeros(shape, dtype=dtype, device=device)


ARGS = st.one_of(tensors(), ANY_VALUE)
STRENGTHS = st.one_of(st.floats(allow_nan=True), tensors(), ANY_VALUE)
EPS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), ANY_VALUE)
BACKENDS = st.sampled_from(["auto", "cpu", "reference", "cuda", "gpu", None, 3])


def _entry(name, x, z, strength, eps, backend):
    if name == "purify":
        return purify(x, z, strength=strength, eps=eps, backend=backend)
    if name == "function":
        return PurifyFunction.apply(x, z, strength, eps)[0]
    return PurifyLayer(strength, eps=eps)(x, z)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["purify", "function", "layer"]), ARGS, ARGS, STRENGTHS, EPS, BACKENDS)
def test_fuzzed_input_raises_only_documented_errors(entry, x, z, strength, eps, backend):
    try:
        out = _entry(entry, x, z, strength, eps, backend)
    except (ValueError, TypeError) as exc:
        assert str(exc).startswith(("purify", "PurifyLayer")), f"{type(exc).__name__}: {exc}"
        return
    except RuntimeError as exc:  # an unavailable backend, named as such
        assert "is not available here" in str(exc), str(exc)
        return
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
