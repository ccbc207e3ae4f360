"""Benchmarks of purify against the eager PyTorch formula and torch.compile of it.

Every figure is measured in one process, providers interleaved (CPU) or back to back with CUDA
events (GPU), and reported as the median with p20/p80, as achieved bandwidth over the minimal
bytes of docs/DESIGN.md section 4, as a share of a copy bandwidth measured in the same run, and as
speedups over the two baselines. Results append to a long-format CSV (one row per measurement,
upserted by key) that benchmarks/plot.py turns into plots.

The GPU sweep (``purified-ops bench --device cuda --preset cuda``, run by
benchmarks/gpu_check.sh) is the same code with a time budget: rows are written after every case,
so a run cut short still leaves its numbers, and a failing provider (out of memory, a compile
error) costs its own row, not the run.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import gc
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
    acc = torch.promote_types(x.dtype, torch.float32)  # cholesky has no 16-bit kernels
    c = torch.cholesky_solve((z @ x.unsqueeze(-1)).to(acc), torch.linalg.cholesky(gram.to(acc))).to(x.dtype)
    return x - strength * (z.transpose(-1, -2) @ c).squeeze(-1)


@contextlib.contextmanager
def compile_settings():
    """torch.compile settings a benchmark needs while it compiles, restored on exit (no global
    side effects): a sweep compiles one graph per shape (dynamic=False), and past dynamo's default
    recompile limit of 8 it would silently run the eager code instead; the "backward" mode replays
    one graph (retain_graph=True), which donated buffers forbid (they save memory, not time);
    and AOTAutograd's on-disk cache is not read, since its key leaves out that setting and it
    hands back a graph compiled elsewhere with donated buffers. Compiling happens in a
    provider's warm-up (prepare_runs) and measure_case's saved-tensor and peak measurements,
    so only those run under it."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    with dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, 1024),
                             accumulated_recompile_limit=max(dynamo_config.accumulated_recompile_limit, 4096)), \
            functorch_config.patch(donated_buffer=False, enable_autograd_cache=False):
        yield


@functools.lru_cache(maxsize=None)
def _compiled(dynamic: bool) -> Callable:
    return torch.compile(eager_formula, dynamic=dynamic)


def compiled_formula(x, z, strength=1.0, eps=1e-6, *, dynamic=False):
    """torch.compile of eager_formula (inductor), compiled once per process and per input shape;
    with dynamic=True once per dtype and K == 1 or not (sizes symbolic: a sweep of many shapes
    compiles in minutes less, as a user with varying shapes would run it)."""
    return _compiled(dynamic)(x, z, strength, eps)


FUNCTIONS = {"purified_ops": lambda x, z: purify(x, z), "eager": eager_formula, "compile": compiled_formula}


def provider_functions(compile_dynamic: bool = False) -> dict[str, Callable]:
    """The timed functions by provider name (the copy and the kernel-only steps aside)."""
    return {**FUNCTIONS, "compile": functools.partial(compiled_formula, dynamic=compile_dynamic)}


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
        """docs/DESIGN.md section 4: forward (2 + K) N D b, backward (3 + 2K) N D b, full both."""
        b = torch.finfo(DTYPES[self.dtype]).bits // 8
        fwd, bwd = (2 + self.K), (3 + 2 * self.K)
        per_row = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[self.mode]
        return per_row * self.N * self.D * b

    def fit(self, max_bytes: int) -> "Case":
        """This case with N lowered (to a multiple of 128, at least 128) so that the minimal bytes
        of a full step stay within max_bytes: z is N x K x D, so N = 32768 with K = 16 and
        D = 16384 in float32 would be 32 GiB for z alone, and eager's backward holds several
        tensors of that size. The N measured is the one in the results."""
        per_row = dataclasses.replace(self, N=1, mode="full").minimal_bytes()
        n = max(128, max_bytes // max(1, per_row) // 128 * 128)
        return self if n >= self.N else dataclasses.replace(self, N=n)


@dataclasses.dataclass
class Measurement:
    case: Case
    provider: str
    times_ms: list[float]
    saved_mb: float
    peak_mb: float
    load: tuple[float, float] = (math.nan, math.nan)  # the machine's load average before and after the timing

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def quantile_ms(self, q: float) -> float:
        ts = sorted(self.times_ms)
        return ts[min(len(ts) - 1, max(0, round(q * (len(ts) - 1))))]


def make_inputs(case: Case, copies: int, requires_grad: bool, seed: int = 0):
    """`copies` sets of (x [N, D], z [N, K, D], g [N, D]), drawn on the case's device."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    dt = DTYPES[case.dtype]
    new = functools.partial(torch.randn, generator=gen, device=case.device, dtype=dt)
    sets = []
    for _ in range(copies):
        x = new(case.N, case.D).requires_grad_(requires_grad)
        z = new(case.N, case.K, case.D).requires_grad_(requires_grad)
        sets.append((x, z, new(case.N, case.D)))
    return sets


def rotation_copies(case: Case, cache_bytes: int) -> int:
    """Input sets to rotate over so that a repeat finds none of its inputs in a cache of
    cache_bytes: together at least 3x the cache, and no set more than that needs."""
    return max(1, math.ceil(3 * cache_bytes / max(1, case.minimal_bytes())))


def l2_bytes(device: str) -> int:
    """The L2 size of a CUDA device (50 MiB on an H100), 0 elsewhere (no rotation on the CPU:
    providers are interleaved there and the sizes that matter exceed its caches)."""
    if device != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)


def saved_storages(fn: Callable, *inputs):
    """Runs ``fn(*inputs)``; returns its output and ``{storage pointer: bytes}`` of what autograd
    saved for the backward beyond the inputs' own storages (a shared storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    own = {t.untyped_storage().data_ptr() for t in inputs}
    return out, {p: n for p, n in seen.items() if p not in own}


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


def _step(provider: str, mode: str, x, z, g, functions: dict[str, Callable] = FUNCTIONS):
    """One timed unit of work: returns a callable that performs it."""
    if provider == COPY:
        a, b, c = x.detach(), g, torch.empty_like(g)
        if x.device.type == "cuda":
            return lambda: c.copy_(a)
        return lambda: torch.add(a, b, out=c)
    if provider == "purified_ops_kernel":
        return _kernel_step(mode, x.detach(), z.detach(), g)
    fn = functions[provider]
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


def prepare_runs(provider: str, case: Case, sets, functions: dict[str, Callable] = FUNCTIONS,
                 warmup: int = 3) -> list[Callable[[], None]]:
    """The provider's timed unit of work on each input set, warmed up (compiled, for "compile")
    and synchronized: what measure_case times and what the pytest-benchmark suite times."""
    with compile_settings():  # the "backward" step records its graph (and compiles) when made
        runs = [_step(provider, case.mode, *s, functions) for s in sets]
        for i in range(warmup):
            runs[i % len(runs)]()
    _sync(case.device)
    return runs


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
    """Milliseconds of one call: CUDA events on the current stream around it (the host waits for
    the end event, so no call queues behind another), perf_counter on the CPU."""
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release(device: str) -> None:
    """Frees what a finished (or failed) case left, so the next one starts from an empty cache."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): CPU figures from a loaded machine
    (other processes on its cores) are not comparable with a quiet one's, so every row keeps it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def measure_case(case: Case, providers: Iterable[str] = PROVIDERS, reps: int = 30, warmup: int = 3,
                 functions: dict[str, Callable] = FUNCTIONS, failures: dict[str, str] | None = None,
                 log: Callable[[str], None] = print) -> list[Measurement]:
    """Times every provider, and the copy reference, on one case. Providers take turns rep by
    rep (interleaved), so a change of load or clock hits all of them alike. On CUDA the inputs
    rotate over sets that together exceed L2 three times (rotation_copies), so no repeat is
    served from L2, and memory stays bounded by one set plus 3x L2.

    A provider that raises while it is set up or warmed up (out of memory, a torch.compile
    error) is left out of this case with a log line; its message goes to `failures`."""
    names = [p for p in providers if p != "purified_ops_kernel" or has_kernel_only(case.device)] + [COPY]
    copies = rotation_copies(case, l2_bytes(case.device))
    sets = make_inputs(case, copies, requires_grad=case.mode != "forward")
    runs: dict[str, list[Callable[[], None]]] = {}
    for p in names:
        try:
            runs[p] = prepare_runs(p, case, sets, functions, warmup)
        except Exception as exc:  # noqa: BLE001 - one provider's failure must not stop the others
            runs.pop(p, None)
            _release(case.device)
            message = _first_line(exc)
            log(f"  {p} failed on {case}: {message}")
            if failures is not None:
                failures[p] = message
    if COPY not in runs:
        raise RuntimeError(f"the copy reference failed on {case}")
    timed = _timer(case.device)
    samples: dict[str, list[float]] = {p: [] for p in runs}
    load_before = load_average()
    for r in range(reps):
        for p in runs:
            samples[p].append(timed(runs[p][r % copies]))
    load = (load_before, load_average())
    x, z = (t.detach().requires_grad_(True) for t in sets[0][:2])
    results = []
    # The saved-tensor measurement calls the compiled formula with gradients, a graph a forward
    # case has not compiled yet: past dynamo's default recompile limit, outside these settings,
    # dynamo would mark the formula eager for the rest of the process (every later case's
    # "compile" then times the eager code).
    with compile_settings():
        for p in runs:
            saved = sum(saved_storages(functions[p], x, z)[1].values()) / 2**20 if p in functions else 0.0
            peak = _peak_bytes(runs[p][0], case.device) / 2**20
            results.append(Measurement(case, p, samples[p], saved, peak, load))
    return results


def sweep(cases: Iterable[Case], providers: Iterable[str] = PROVIDERS, *, reps: int = 30, warmup: int = 3,
          csv_paths: Iterable[str] = (), budget_s: float | None = None, max_bytes: int | None = None,
          functions: dict[str, Callable] = FUNCTIONS, log: Callable[[str], None] = print) -> list[dict]:
    """measure_case over cases, for long unattended runs: each case's rows are upserted into every
    CSV in csv_paths as soon as it is measured (a run killed later keeps them); no case starts
    after budget_s seconds (the skipped ones are logged); cases are shrunk to max_bytes
    (Case.fit); a provider that fails for any reason but memory is not tried again; a case that
    fails as a whole is logged and skipped. Returns the rows of every measured case."""
    t0 = time.perf_counter()
    providers = list(providers)
    rows: list[dict] = []
    skipped = []
    for case in cases:
        if max_bytes is not None:
            case = case.fit(max_bytes)
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            skipped.append(case)
            continue
        failures: dict[str, str] = {}
        try:
            results = measure_case(case, providers, reps, warmup, functions, failures, log)
        except Exception as exc:  # noqa: BLE001 - the next case may well run
            log(f"  case failed: {case}: {_first_line(exc)}")
            results = []
        for p, message in failures.items():
            if "out of memory" not in message.lower():
                providers.remove(p)
                log(f"  {p} is left out of the remaining cases")
        _release(case.device)
        new = to_rows(results)
        for path in csv_paths:
            upsert_csv(path, new)
        rows += new
        if new:
            log(f"[{time.perf_counter() - t0:.0f} s] {case.dtype} N={case.N} D={case.D} K={case.K} {case.mode} "
                f"(load {new[0]['load_before']:.2f}-{new[0]['load_after']:.2f}): " +
                ", ".join(f"{r['provider']} {r['gbps']:.1f} GB/s ({r['pct_of_copy']:.0f}% copy, "
                          f"x{r['speedup_vs_compile']:.2f} compile)" for r in new))
    for case in skipped:
        log(f"budget of {budget_s:.0f} s spent: not measured: {case}")
    return rows


def copy_bytes(case: Case) -> int:
    b = torch.finfo(DTYPES[case.dtype]).bits // 8
    return (2 if case.device == "cuda" else 3) * case.N * case.D * b


CSV_KEY = ("device_name", "provider", "mode", "dtype", "N", "D", "K")
CSV_FIELDS = CSV_KEY + ("median_ms", "p20_ms", "p80_ms", "gbps", "pct_of_copy", "copy_gbps",
                        "speedup_vs_eager", "speedup_vs_compile", "saved_mb", "peak_mb", "threads", "torch", "cuda",
                        "purified_ops", "timestamp", "load_before", "load_after")


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
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "cuda": torch.version.cuda if case.device == "cuda" else "", "purified_ops": __version__,
                "timestamp": stamp, "load_before": m.load[0], "load_after": m.load[1],
            }
            rows.append(row)
    return rows


def upsert_csv(path: str, rows: list[dict]) -> None:
    """Adds rows to a long-format CSV, replacing earlier rows with the same key; its folder must
    exist (none is made)."""
    old = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    key = lambda r: tuple(str(r[k]) for k in CSV_KEY)  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged)


def format_table(rows: list[dict]) -> str:
    head = ("shape", "dtype", "K", "mode", "provider", "median ms [p20, p80]", "GB/s", "% copy",
            "copy GB/s", "x eager", "x compile", "peak MB", "saved MB", "load")
    lines = [head]
    for r in rows:
        lines.append((f"{r['N']}x{r['D']}", r["dtype"], str(r["K"]), r["mode"], r["provider"],
                      f"{r['median_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]", f"{r['gbps']:.1f}",
                      f"{r['pct_of_copy']:.0f}%", f"{r['copy_gbps']:.1f}", f"{r['speedup_vs_eager']:.2f}", f"{r['speedup_vs_compile']:.2f}",
                      f"{r['peak_mb']:.1f}", f"{r['saved_mb']:.1f}", f"{r['load_before']:.2f}-{r['load_after']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def cases_for(device: str, dtypes, Ns, Ds, Ks, modes) -> list[Case]:
    return [Case(device, dt, n, d, k, m) for dt, n, d, k, m in itertools.product(dtypes, Ns, Ds, Ks, modes)]


# The sweep of `purified-ops bench` where neither a preset nor a flag sets a value.
DEFAULTS = dict(dtypes=["float32"], N=[2048, 8192], D=[1024], K=[1, 4], modes=list(MODES), reps=30, max_gib=None,
                compile_dynamic=False)
# Sweeps by name (`purified-ops bench --preset NAME`). "cuda" is the GPU sweep: forward and backward,
# K in {1, 4, 16}, bfloat16 and float32, N = 32768, D from 256 to 16384, each case within
# max_gib of minimal full-step bytes (Case.fit lowers N where z alone would not fit), compile
# with dynamic shapes (8 graphs for the sweep instead of one per shape and mode).
# `--dry-run` keeps a preset's structure at sizes any CPU runs in seconds.
PRESETS = {
    "cuda": dict(dtypes=["bfloat16", "float32"], N=[32768], D=[256, 1024, 4096, 16384], K=[1, 4, 16],
                 modes=["forward", "backward"], reps=20, max_gib=8.0, compile_dynamic=True),
    # The CPU training step: the public step, the kernels alone and torch.compile of the formula
    # (benchmarks/run_cpu.sh; its goals in benchmarks/summarize.py).
    "cpu-step": dict(dtypes=["float32", "bfloat16"], N=[2048, 8192], D=[1024], K=[1, 4], modes=["full"], reps=40),
    # What a call costs beyond the kernels, as ratios (purified_ops/bench_overhead.py, its own
    # runner: the flags above do not apply).
    "overhead": dict(reps=30),
}
DRY_RUN = dict(N=[64], D=[256, 1000], reps=3)


def sweep_settings(preset: str | None = None, given: dict | None = None, dry_run: bool = False) -> dict:
    """The settings of one sweep: DEFAULTS < the preset < values given (flags) < --dry-run's sizes."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    unknown = set(given or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **PRESETS.get(preset, {}), **(given or {}), **(DRY_RUN if dry_run else {})}
