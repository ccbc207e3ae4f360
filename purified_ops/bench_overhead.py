"""What a call costs beyond the kernels: ``purified-ops bench --preset overhead``.

Pairs of timed units, each pair measured interleaved rep by rep in one process on one torch
thread, and reported as a ratio against its goal (benchmarks/README.md, "Overhead"):

- ``torch.func.grad`` against ``.backward()`` on the same inputs;
- ``vmap(grad)`` per-sample gradients against one batched backward of the same rows;
- ``torch.autograd.grad(..., create_graph=True)`` against the plain first-order call;
- a tiny forward, and forward + backward, against ``F.layer_norm``'s on the same x (weight
  and bias requiring grad);
- the public training step against the kernels alone (the cpu-step preset's N 2048 case).

Hot figures repeat the unit back to back; cold ones run it once after a cache flush (a write
of more bytes than the last-level cache holds), as a call between other work meets it.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import __version__, bench
from .ops import purify

FLUSH_BYTES = 256 * 2**20


@dataclasses.dataclass
class Pair:
    name: str
    what: str              # what the ratio compares
    ours: Callable[[], None]
    baseline: Callable[[], None]
    goal: float            # ours / baseline at most this
    inner: int             # calls per hot sample (tiny units need many to be timed)


def _loss(x, z):
    return (purify(x, z, strength=0.5) ** 2).sum()


def _grad_pair(seed: int = 0) -> Pair:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 256, generator=g)
    z = torch.randn(4096, 4, 256, generator=g)
    xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()
    grad = torch.func.grad(_loss, argnums=(0, 1))

    def backward():
        xr.grad = zr.grad = None
        _loss(xr, zr).backward()

    return Pair("func_grad", "torch.func.grad / .backward(); N 4096, D 256, K 4, float32",
                lambda: grad(x, z), backward, 1.15, 1)


def _vmap_pair(seed: int = 1) -> Pair:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, 256, generator=g)
    z = torch.randn(256, 1, 4, 256, generator=g)
    per_sample = torch.func.vmap(torch.func.grad(_loss, argnums=(0, 1)))
    xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()

    def backward():
        torch.autograd.grad(_loss(xr, zr), (xr, zr))

    return Pair("vmap_grad", "vmap(grad) of 256 samples x 16 rows / one batched backward; D 256, K 4",
                lambda: per_sample(x, z), backward, 1.5, 1)


def _create_graph_pair(seed: int = 2) -> Pair:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 256, generator=g, requires_grad=True)
    z = torch.randn(4096, 4, 256, generator=g, requires_grad=True)
    return Pair("create_graph", "autograd.grad(create_graph=True) / plain; N 4096, D 256, K 4",
                lambda: torch.autograd.grad(_loss(x, z), (x, z), create_graph=True),
                lambda: torch.autograd.grad(_loss(x, z), (x, z)), 1.5, 1)


def _tiny_pairs(seed: int = 3) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 64, generator=g, requires_grad=True)
    z = torch.randn(8, 1, 64, generator=g)
    w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    gy = torch.randn(8, 64, generator=g)
    return [
        Pair("tiny_forward", "purify / F.layer_norm, x [8, 64] requiring grad, z [8, 1, 64]",
             lambda: purify(x, z), lambda: F.layer_norm(x, (64,), w, b), 2.0, 200),
        Pair("tiny_forward_backward", "the same, forward + backward (autograd.grad of x; layer_norm's w, b too)",
             lambda: torch.autograd.grad(purify(x, z), x, gy),
             lambda: torch.autograd.grad(F.layer_norm(x, (64,), w, b), (x, w, b), gy), 1.5, 50),
    ]


def _step_pair() -> Pair:
    case = bench.Case("cpu", "float32", 2048, 1024, 1, "full")
    x, z, g = bench.make_inputs(case, 1, True)[0]
    return Pair("cpu_step", "public step / kernels alone; N 2048, D 1024, K 1, float32 (cpu-step)",
                bench._step("purified_ops", "full", x, z, g), bench._kernel_step("full", x.detach(), z.detach(), g),
                1.10, 1)


def pairs() -> list[Pair]:
    return [_grad_pair(), _vmap_pair(), _create_graph_pair(), *_tiny_pairs(), _step_pair()]


def _flush(buf: torch.Tensor) -> None:
    buf.add_(1)


def _hot_us(run: Callable[[], None], inner: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(inner):
        run()
    return (time.perf_counter_ns() - t0) / inner / 1e3


def _cold_us(run: Callable[[], None], buf: torch.Tensor) -> float:
    _flush(buf)
    t0 = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - t0) / 1e3


def measure(pair: Pair, reps: int, warmup: int = 3) -> dict:
    """Hot and cold medians of both units, interleaved rep by rep, and their ratios."""
    buf = torch.zeros(FLUSH_BYTES // 4)
    for _ in range(warmup):
        pair.ours()
        pair.baseline()
    load_before = bench.load_average()
    hot = {"ours": [], "baseline": []}
    cold = {"ours": [], "baseline": []}
    for _ in range(reps):
        for name, run in (("ours", pair.ours), ("baseline", pair.baseline)):
            hot[name].append(_hot_us(run, pair.inner))
            cold[name].append(_cold_us(run, buf))
    med = {k: statistics.median(v) for k, v in hot.items()}
    cmed = {k: statistics.median(v) for k, v in cold.items()}
    # The ratio of medians and the median of the rep-by-rep ratios (robust to drift in a run).
    ratio = statistics.median(o / b for o, b in zip(hot["ours"], hot["baseline"]))
    return {
        "device_name": bench.device_name("cpu"), "case": pair.name, "what": pair.what,
        "ours_us": med["ours"], "baseline_us": med["baseline"], "ratio": ratio,
        "cold_ours_us": cmed["ours"], "cold_baseline_us": cmed["baseline"],
        "cold_ratio": cmed["ours"] / cmed["baseline"], "goal": pair.goal, "met": ratio <= pair.goal,
        "reps": reps, "threads": torch.get_num_threads(), "torch": torch.__version__, "purified_ops": __version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_before": load_before,
        "load_after": bench.load_average(),
    }


FIELDS = ("device_name", "case", "what", "ours_us", "baseline_us", "ratio", "cold_ours_us", "cold_baseline_us",
          "cold_ratio", "goal", "met", "reps", "threads", "torch", "purified_ops", "timestamp", "load_before",
          "load_after")


def format_table(rows: list[dict]) -> str:
    lines = ["| case | ours (us) | baseline (us) | ratio (goal) | cold: ours / baseline (us) | met | load |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['ours_us']:.1f} | {r['baseline_us']:.1f} | {r['ratio']:.2f} "
                     f"(<= {r['goal']:.2f}) | {r['cold_ours_us']:.1f} / {r['cold_baseline_us']:.1f} "
                     f"({r['cold_ratio']:.2f}) | {'yes' if r['met'] else '**no**'} | "
                     f"{r['load_before']:.2f}-{r['load_after']:.2f} |")
    return "\n".join(lines)


def run(reps: int = 30, csv_paths=(), log=print) -> list[dict]:
    """Every pair on one torch thread (restored after), written to each CSV (replaced)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for pair in pairs():
            rows.append(measure(pair, reps))
            r = rows[-1]
            log(f"{r['case']}: {r['ratio']:.2f} (goal <= {r['goal']:.2f}); {r['ours_us']:.1f} us vs "
                f"{r['baseline_us']:.1f} us; cold {r['cold_ratio']:.2f}")
    finally:
        torch.set_num_threads(threads)
    for path in csv_paths:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    import sys

    out = run(reps=int(os.environ.get("REPS", "30")), csv_paths=sys.argv[1:])
    print(format_table(out))
