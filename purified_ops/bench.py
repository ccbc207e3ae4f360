"""Benchmarks of purify against the eager PyTorch formula and torch.compile of it.

Every figure is measured in one process, providers interleaved (CPU) or back to back with CUDA
events (GPU), and reported as the median with p20/p80, as achieved bandwidth over the minimal
bytes of DESIGN.md section 4, as a share of a copy bandwidth measured in the same run, and as
speedups over the two baselines. Results append to a long-format CSV (one row per measurement,
upserted by key) that benchmarks/plot.py turns into plots.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import os
import statistics
import time
from typing import Callable, Iterable

import torch

from . import __version__
from .ops import purify

PROVIDERS = ("purified_ops", "purified_ops_kernel", "eager", "compile")
# The bandwidth every figure is compared with, timed interleaved with the providers on the
# same sizes: torch.add(a, b, out=c) on the CPU (2 reads and 1 write of N x D, the traffic of a
# K = 1 forward), a device-to-device copy on CUDA (1 read, 1 write).
COPY = "copy"
MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def eager_formula(x: torch.Tensor, z: torch.Tensor, strength: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """What a user writes without this library: x [N, D], z [N, K, D], computed in x's dtype.

    K = 1 is the closed form of FP-Net; K > 1 solves the K x K system with a batched Cholesky.
    """
    if z.shape[-2] == 1:
        zr = z.squeeze(-2)
        c = (x * zr).sum(-1, keepdim=True) / ((zr * zr).sum(-1, keepdim=True) + eps)
        return x - strength * c * zr
    gram = z @ z.transpose(-1, -2)
    gram = gram + eps * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    c = torch.cholesky_solve((z @ x.unsqueeze(-1)).float(), torch.linalg.cholesky(gram.float())).to(x.dtype)
    return x - strength * (z.transpose(-1, -2) @ c).squeeze(-1)


_compiled_formula: Callable | None = None


def compiled_formula(x, z, strength=1.0, eps=1e-6):
    """torch.compile of eager_formula (inductor), compiled once per process and per input shape."""
    global _compiled_formula
    if _compiled_formula is None:
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config

        # A sweep compiles one graph per shape; past dynamo's default limit of 8 it would
        # silently run the eager code instead, and the comparison would be wrong.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 1024)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
        # The "backward" mode replays one graph (retain_graph=True), which donated buffers forbid;
        # they save memory, not time.
        functorch_config.donated_buffer = False
        _compiled_formula = torch.compile(eager_formula, dynamic=False)
    return _compiled_formula(x, z, strength, eps)


FUNCTIONS = {"purified_ops": lambda x, z: purify(x, z), "eager": eager_formula, "compile": compiled_formula}


def has_kernel_only(device: str) -> bool:
    """Whether the out variants (preallocated outputs) are built for `device`."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return hasattr(torch.ops.purified_ops, "purify_forward_out") and torch._C._dispatch_has_kernel_for_dispatch_key(
        "purified_ops::purify_forward_out", key)


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    dtype: str
    N: int
    D: int
    K: int
    mode: str

    def minimal_bytes(self) -> int:
        """DESIGN.md section 4: forward (2 + K) N D b, backward (3 + 2K) N D b, full both."""
        b = torch.finfo(DTYPES[self.dtype]).bits // 8
        fwd, bwd = (2 + self.K), (3 + 2 * self.K)
        per_row = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[self.mode]
        return per_row * self.N * self.D * b


@dataclasses.dataclass
class Measurement:
    case: Case
    provider: str
    times_ms: list[float]
    saved_mb: float
    peak_mb: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def quantile_ms(self, q: float) -> float:
        ts = sorted(self.times_ms)
        return ts[min(len(ts) - 1, max(0, round(q * (len(ts) - 1))))]


def _make_inputs(case: Case, copies: int, requires_grad: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    sets = []
    for _ in range(copies):
        x = torch.randn(case.N, case.D, generator=gen).to(case.device, dt).requires_grad_(requires_grad)
        z = torch.randn(case.N, case.K, case.D, generator=gen).to(case.device, dt).requires_grad_(requires_grad)
        g = torch.randn(case.N, case.D, generator=gen).to(case.device, dt)
        sets.append((x, z, g))
    return sets


def _saved_bytes(fn, x, z) -> int:
    """Bytes autograd saves for the backward of one call (shared storages counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, z)
    inputs = {x.untyped_storage().data_ptr(), z.untyped_storage().data_ptr()}
    return sum(n for p, n in seen.items() if p not in inputs)


def _peak_bytes(run: Callable[[], None], device: str) -> int:
    """Memory allocated by one call above what existed before it (its peak)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _step(provider: str, mode: str, x, z, g):
    """One timed unit of work: returns a callable that performs it."""
    if provider == COPY:
        a, b, c = x.detach(), g, torch.empty_like(g)
        if x.device.type == "cuda":
            return lambda: c.copy_(a)
        return lambda: torch.add(a, b, out=c)
    if provider == "purified_ops_kernel":
        return _kernel_step(mode, x.detach(), z.detach(), g)
    fn = FUNCTIONS[provider]
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(x, z)
        return run
    if mode == "full":
        def run():
            torch.autograd.grad(fn(x, z), (x, z), g)
        return run
    y = fn(x, z)  # backward alone: one graph, replayed

    def run():
        torch.autograd.grad(y, (x, z), g, retain_graph=True)
    return run


def _kernel_step(mode: str, x, z, g):
    """The registered ops alone, into preallocated outputs: no allocation, no autograd."""
    ops = torch.ops.purified_ops
    s = torch.tensor(1.0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    y, coeff, chol = ops.purify_forward(x, z, s, 1e-6)
    dx, dz, ds = ops.purify_backward(g, x, z, s, coeff, chol, True)
    forward = lambda: ops.purify_forward_out(x, z, s, 1e-6, y, coeff, chol)  # noqa: E731
    backward = lambda: ops.purify_backward_out(g, x, z, s, coeff, chol, True, dx, dz, ds)  # noqa: E731
    if mode == "forward":
        return forward
    if mode == "backward":
        return backward

    def full():
        forward()
        backward()
    return full


def _timer(device: str):
    if device == "cuda":
        def timed(run):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(run):
            t0 = time.perf_counter()
            run()
            return 1e3 * (time.perf_counter() - t0)
    return timed


def measure(cases: Iterable[Case], providers: Iterable[str] = PROVIDERS, reps: int = 30, warmup: int = 3,
            progress: bool = True) -> list[Measurement]:
    """Times every provider, and the copy reference, on every case. Providers take turns rep by
    rep (interleaved), so a change of machine load or clock hits all of them alike. On CUDA,
    inputs rotate over enough copies that L2 cannot serve a repeat."""
    cases = list(cases)
    results = []
    bar = _progress(len(cases), progress)
    for case in cases:
        names = [p for p in providers if p != "purified_ops_kernel" or has_kernel_only(case.device)] + [COPY]
        copies = 1
        if case.device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
            copies = max(1, math.ceil(3 * l2 / max(1, case.minimal_bytes())))
        sets = _make_inputs(case, copies, requires_grad=case.mode != "forward")
        runs = {p: [_step(p, case.mode, *s) for s in sets] for p in names}
        timed = _timer(case.device)
        for p in names:
            for i in range(warmup):
                runs[p][i % copies]()
        samples = {p: [] for p in names}
        for r in range(reps):
            for p in names:
                samples[p].append(timed(runs[p][r % copies]))
        x, z, _ = _make_inputs(case, 1, requires_grad=True)[0]
        for p in names:
            saved = _saved_bytes(FUNCTIONS[p], x, z) / 2**20 if p in FUNCTIONS else 0.0
            peak = _peak_bytes(runs[p][0], case.device) / 2**20
            results.append(Measurement(case, p, samples[p], saved, peak))
        del runs, sets
        bar.update(1)
    bar.close()
    return results


def copy_bytes(case: Case) -> int:
    b = torch.finfo(DTYPES[case.dtype]).bits // 8
    return (2 if case.device == "cuda" else 3) * case.N * case.D * b


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="bench", unit="case", leave=False)


CSV_KEY = ("device_name", "provider", "mode", "dtype", "N", "D", "K")
CSV_FIELDS = CSV_KEY + ("median_ms", "p20_ms", "p80_ms", "gbps", "pct_of_copy", "copy_gbps",
                        "speedup_vs_eager", "speedup_vs_compile", "saved_mb", "peak_mb", "threads", "torch", "purified_ops",
                        "timestamp")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def to_rows(results: list[Measurement]) -> list[dict]:
    by_case: dict[Case, dict[str, Measurement]] = {}
    for m in results:
        by_case.setdefault(m.case, {})[m.provider] = m
    rows = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for case, ms in by_case.items():
        copy_gbps = copy_bytes(case) / (ms[COPY].median_ms * 1e-3) / 1e9
        for p, m in ms.items():
            if p == COPY:
                continue
            gbps = case.minimal_bytes() / (m.median_ms * 1e-3) / 1e9
            row = {
                "device_name": device_name(case.device), "provider": p, "mode": case.mode, "dtype": case.dtype,
                "N": case.N, "D": case.D, "K": case.K, "median_ms": m.median_ms, "p20_ms": m.quantile_ms(0.2),
                "p80_ms": m.quantile_ms(0.8), "gbps": gbps, "copy_gbps": copy_gbps,
                "pct_of_copy": 100 * gbps / copy_gbps, "saved_mb": m.saved_mb, "peak_mb": m.peak_mb,
                "speedup_vs_eager": ms["eager"].median_ms / m.median_ms if "eager" in ms else float("nan"),
                "speedup_vs_compile": ms["compile"].median_ms / m.median_ms if "compile" in ms else float("nan"),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "purified_ops": __version__,
                "timestamp": stamp,
            }
            rows.append(row)
    return rows


def upsert_csv(path: str, rows: list[dict]) -> None:
    """Adds rows to a long-format CSV, replacing earlier rows with the same key."""
    old = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    key = lambda r: tuple(str(r[k]) for k in CSV_KEY)  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged)


def format_table(rows: list[dict]) -> str:
    head = ("shape", "dtype", "K", "mode", "provider", "median ms [p20, p80]", "GB/s", "% copy",
            "copy GB/s", "x eager", "x compile", "peak MB", "saved MB")
    lines = [head]
    for r in rows:
        lines.append((f"{r['N']}x{r['D']}", r["dtype"], str(r["K"]), r["mode"], r["provider"],
                      f"{r['median_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]", f"{r['gbps']:.1f}",
                      f"{r['pct_of_copy']:.0f}%", f"{r['copy_gbps']:.1f}", f"{r['speedup_vs_eager']:.2f}", f"{r['speedup_vs_compile']:.2f}",
                      f"{r['peak_mb']:.1f}", f"{r['saved_mb']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def cases_for(device: str, dtypes, Ns, Ds, Ks, modes) -> list[Case]:
    return [Case(device, dt, n, d, k, m) for dt, n, d, k, m in itertools.product(dtypes, Ns, Ds, Ks, modes)]
