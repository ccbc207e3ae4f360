"""pytest-benchmark suite: `pytest benchmarks --benchmark-only` (add `--benchmark-json F` to keep it).

The same providers and timed steps as `purified-ops bench` (purified_ops.bench), on CPU always
and on CUDA when present. The runner is the tool for the published numbers (interleaved
providers, copy bandwidth in the same run, CSV); this suite is for pytest-benchmark's own
comparisons between runs and commits.
"""
import pytest
import torch

from purified_ops import bench

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [(2048, 1024), (8192, 1024)]


def _providers(device):
    return [p for p in bench.PROVIDERS if p != "purified_ops_kernel" or bench.has_kernel_only(device)] + [bench.COPY]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", bench.PROVIDERS + (bench.COPY,))
def test_purify(benchmark, provider, size, K, mode, device):
    if provider not in _providers(device):
        pytest.skip(f"{provider} is not built for {device}")
    case = bench.Case(device, "float32", size[0], size[1], K, mode)
    x, z, g = bench._make_inputs(case, 1, requires_grad=mode != "forward")[0]
    run = bench._step(provider, mode, x, z, g)
    if device == "cuda":
        inner = run

        def run():
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info.update(minimal_bytes=case.minimal_bytes(), copy_bytes=bench.copy_bytes(case))
    benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=1)
