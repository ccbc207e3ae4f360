"""pytest-benchmark front end: `pytest benchmarks --benchmark-only` (add `--benchmark-json F` to keep it).

A thin layer over the runner behind `purified-ops bench` (purified_ops.bench): the same cases,
providers and prepared steps (prepare_runs), timed by pytest-benchmark, on CPU always and on
CUDA when present. The runner is the tool for the published numbers (interleaved providers,
copy bandwidth in the same run, CSV); this suite is for pytest-benchmark's own comparisons
between runs and commits.
"""
import pytest
import torch

from purified_ops import bench

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [(2048, 1024), (8192, 1024)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", bench.PROVIDERS + (bench.COPY,))
def test_purify(benchmark, provider, size, K, mode, device):
    if provider == "purified_ops_kernel" and not bench.has_kernel_only(device):
        pytest.skip(f"{provider} is not built for {device}")
    case = bench.Case(device, "float32", size[0], size[1], K, mode)
    run = bench.prepare_runs(provider, case, bench.make_inputs(case, 1, requires_grad=mode != "forward"))[0]
    if device == "cuda":
        inner = run

        def run():
            inner()
            torch.cuda.synchronize()
    benchmark.extra_info.update(minimal_bytes=case.minimal_bytes(), copy_bytes=bench.copy_bytes(case))
    benchmark.pedantic(run, rounds=20, iterations=1)
