"""Where the time of a CPU training step goes: the kernels, the outputs' allocation, autograd
and Python; and within the bfloat16 kernels, the 16-bit conversions, the stores and the per-row
solve. Every figure is a median of interleaved repetitions in this process, printed as Markdown
with the machine and the load average before and after (benchmarks/README.md has a run).

    python benchmarks/profile_cpu.py [--reps 40]
"""
import argparse
import os
import statistics
import time

import torch

import purified_ops
from purified_ops import _settings, bench
from purified_ops import ops as _ops

OPS = torch.ops.purified_ops
CPU = _ops._CPU  # the CPU kernels' module: the output cache, streaming stores, bfloat16 conversion


def inputs(dtype, N, K, D=1024, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, z, gy = (torch.randn(*s, generator=g).to(dtype) for s in ((N, D), (N, K, D), (N, D)))
    return x.requires_grad_(requires_grad), z.requires_grad_(requires_grad), gy


def interleaved(cases, reps, clock=time.perf_counter_ns, before=None):
    """Median microseconds of each callable, the cases taking turns rep by rep; `before(name)`
    runs untimed before each timed call."""
    for fn in cases.values():
        fn()
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            if before is not None:
                before(k)
            t0 = clock()
            fn()
            times[k].append((clock() - t0) / 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def step_breakdown(dtype, N, K, reps):
    """The public step against the kernels alone, and what lies between."""
    x, z, gy = inputs(dtype, N, K, requires_grad=True)
    xd, zd = x.detach(), z.detach()
    s = torch.tensor(1.0)
    y0, c0, l0 = OPS.purify_forward(xd, zd, s, 1e-6)
    dx0, dz0, ds0 = OPS.purify_backward(gy, xd, zd, s, c0, l0, True)

    def kernels():
        OPS.purify_forward_out(xd, zd, s, 1e-6, y0, c0, l0)
        OPS.purify_backward_out(gy, xd, zd, s, c0, l0, True, dx0, dz0, ds0)

    def ops_alloc():
        _, c, l = OPS.purify_forward(xd, zd, s, 1e-6)
        OPS.purify_backward(gy, xd, zd, s, c, l, True)

    def public():
        torch.autograd.grad(purified_ops.purify(x, z), (x, z), gy)

    cache_mb = _settings.cpu_cache_mb(os.environ)

    def uncached():  # the outputs from torch's allocator: fresh pages, faulted in by the kernels
        CPU.set_output_cache_limit(0)
        try:
            ops_alloc()
        finally:
            CPU.set_output_cache_limit((512 if cache_mb is None else cache_mb) << 20)

    before = load()
    m = interleaved({"kernels": kernels, "ops": ops_alloc, "uncached": uncached, "public": public}, reps)
    return m, before


def cold_overhead(reps):
    """A tiny step (8 rows) hot, and right after a 96 MiB copy has flushed the caches (as the
    code around the kernels runs after a large step's kernel): the cost of that code alone."""
    a = torch.randn(24 << 20)
    b = torch.empty_like(a)
    x, z, gy = inputs(torch.float32, 8, 1, requires_grad=True)
    xd, zd = x.detach(), z.detach()
    s = torch.tensor(1.0)
    y0, c0, l0 = OPS.purify_forward(xd, zd, s, 1e-6)
    dx0, dz0, ds0 = OPS.purify_backward(gy, xd, zd, s, c0, l0, True)
    def ops_alloc():
        _, c, l = OPS.purify_forward(xd, zd, s, 1e-6)
        OPS.purify_backward(gy, xd, zd, s, c, l, True)

    cases = {
        "kernels": lambda: (OPS.purify_forward_out(xd, zd, s, 1e-6, y0, c0, l0),
                            OPS.purify_backward_out(gy, xd, zd, s, c0, l0, True, dx0, dz0, ds0)),
        "ops (outputs allocated)": ops_alloc,
        "public forward, no autograd": lambda: _no_grad(purified_ops.purify, x, z),
        "public": lambda: torch.autograd.grad(purified_ops.purify(x, z), (x, z), gy),
        "x * 2 (torch)": lambda: torch.autograd.grad(x * 2.0, (x,), gy),
    }
    hot = interleaved(cases, reps)
    cold = interleaved(cases, reps, before=lambda _: b.copy_(a))
    return hot, cold


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def kernel_cpu_ns_per_row(dtype, N, K, D=1024, reps=7, inner=20):
    """Thread CPU time per row of the forward and the backward kernel alone (one thread)."""
    x, z, gy = inputs(dtype, N, K, D)
    s = torch.tensor(1.0)
    y, c, l = OPS.purify_forward(x, z, s, 1e-6)
    dx, dz, ds = OPS.purify_backward(gy, x, z, s, c, l, True)
    runs = {"fwd": lambda: OPS.purify_forward_out(x, z, s, 1e-6, y, c, l),
            "bwd": lambda: OPS.purify_backward_out(gy, x, z, s, c, l, True, dx, dz, ds)}
    out = {}
    for name, fn in runs.items():
        fn()
        t = []
        for _ in range(reps):
            t0 = time.thread_time_ns()
            for _ in range(inner):
                fn()
            t.append((time.thread_time_ns() - t0) / inner / N)
        out[name] = statistics.median(t)
    return out


def with_setting(setter, value, default, fn):
    setter(value)
    try:
        return fn()
    finally:
        setter(default)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args(argv)
    info = purified_ops.build_info()
    threads = torch.get_num_threads()
    print(f"Machine: {bench.device_name('cpu')}; {info['cpu_capability']} kernels, bfloat16 rounding: "
          f"{info['cpu_bf16_conversion']}; torch {torch.__version__}; load average {load()} at the start.\n")

    print("### The training step beyond the kernels (forward + backward, D 1024, K 1, "
          f"{threads} threads; median us)\n")
    print("| dtype | N | kernels alone | + outputs from the output cache | + outputs without it (fresh pages) "
          "| public step (+ autograd, Python) | public / kernels | load before, after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.bfloat16):
        for N in (2048, 8192):
            m, before = step_breakdown(dtype, N, 1, args.reps)
            print(f"| {str(dtype)[6:]} | {N} | {m['kernels']:.0f} | {m['ops']:.0f} | {m['uncached']:.0f} | "
                  f"{m['public']:.0f} | {m['public'] / m['kernels']:.3f} | {before}, {load()} |")
    before = load()
    hot, cold = cold_overhead(args.reps)
    print(f"\nA tiny step (8 rows, float32, K 1), hot and right after a 96 MiB copy flushed the caches "
          f"(median us; load {before}, {load()}):\n")
    print("| step | hot | after the flush |")
    print("| --- | --- | --- |")
    for k in hot:
        print(f"| {k} | {hot[k]:.0f} | {cold[k]:.0f} |")

    torch.set_num_threads(1)  # thread CPU time is then all the work
    print("\n### The kernels alone, one thread: thread CPU ns per row (D 1024)\n")
    print("| case | K | forward | backward | load |")
    print("| --- | --- | --- | --- | --- |")
    variants = [("float32, in cache (N 64)", torch.float32, 64, 1024, None),
                ("bfloat16, in cache (N 64)", torch.bfloat16, 64, 1024, None)]
    if info["cpu_bf16_conversion"] == "avx512_bf16":
        variants.append(("bfloat16, in cache, software rounding", torch.bfloat16, 64, 1024,
                         (CPU.set_bf16_hardware_conversion, False, True)))
    variants += [("bfloat16, N 8192, non-temporal stores", torch.bfloat16, 8192, 1024, (CPU.set_streaming_stores, True, None)),
                 ("bfloat16, N 8192, plain stores", torch.bfloat16, 8192, 1024, (CPU.set_streaming_stores, False, None)),
                 ("bfloat16, D 16 (per-row work: factor, solve)", torch.bfloat16, 4096, 16, None)]
    for label, dtype, N, D, setting in variants:
        for K in (1, 4):
            reps, inner = (7, 20) if N <= 64 or D <= 16 else (5, 2)
            run = lambda: kernel_cpu_ns_per_row(dtype, N, K, D, reps, inner)  # noqa: E731
            r = run() if setting is None else with_setting(*setting, run)
            print(f"| {label} | {K} | {r['fwd']:.0f} | {r['bwd']:.0f} | {load()} |")
    torch.set_num_threads(threads)
    print()


if __name__ == "__main__":
    main()
