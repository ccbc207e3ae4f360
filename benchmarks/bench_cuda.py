"""CUDA benchmark of the fused purification kernels against the eager formula and torch.compile
of it, with a device-to-device copy as the bandwidth ceiling, all in one process.

Every figure is reported as achieved GB/s over the minimal bytes of DESIGN.md section 4
(forward (2 + K) D b per row, backward (3 + 2K) D b per row, z not broadcast) and as % of the
measured copy bandwidth. Timing: CUDA events around each call, warm-up first, the median of
the repeats; input sets are rotated so that L2 does not serve repeats of a small problem.

    python benchmarks/bench_cuda.py [--budget-s 300] [--out DIR]   (GPU)
    python benchmarks/bench_cuda.py --dry-run                      (CPU: tiny sizes, logic check)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import purified_ops  # noqa: E402
from purified_ops import reference  # noqa: E402

L2_BYTES = 64 << 20          # a little over an H100/H200 L2 (50/60 MB)
BUDGET_ROW_BYTES = 3 << 30   # cap on one problem's minimal backward bytes (N is reduced to fit)


def log(*a):
    print(*a, flush=True)


class Timer:
    """Median time of fn() in ms: CUDA events per call on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fns, warmup=3, reps=15, max_s=1.5):
        # fns: one callable per rotated input set
        for i in range(warmup):
            fns[i % len(fns)]()
        self.sync()
        times = []
        t_end = time.perf_counter() + max_s
        for i in range(reps):
            fn = fns[i % len(fns)]
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            if i >= 4 and time.perf_counter() > t_end:
                break
        return statistics.median(times)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def copy_bandwidth(device, timer, nbytes):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer([lambda: dst.copy_(src)], warmup=3, reps=20)
    gbs = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    return gbs, ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes; runs on the CPU when no GPU")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new measurements after this")
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="also write the results here")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()

    def over_budget():
        return time.perf_counter() - t_start > args.budget_s

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        log("no GPU: use --dry-run to check the script on the CPU")
        return 2
    timer = Timer(device)
    if args.dry_run:
        N, Ds, Ks, dtypes = 64, [256, 1000], [1, 4], [torch.bfloat16, torch.float32]
        copy_bytes = 64 << 20
    else:
        N, Ds, Ks, dtypes = 32768, [256, 1024, 4096, 16384], [1, 4, 16], [torch.bfloat16, torch.float32]
        copy_bytes = 2 << 30

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build_info": purified_ops.build_info(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dry_run": args.dry_run,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1))
    log("device:", info["device"], "| torch", info["torch"], "| CUDA", info["cuda"])

    copy_gbs, copy_ms = copy_bandwidth(device, timer, copy_bytes)
    info["copy_GBps"] = round(copy_gbs, 1)
    log(f"device-to-device copy: {copy_gbs:.0f} GB/s ({copy_bytes >> 20} MiB, {copy_ms:.3f} ms)")

    ops = torch.ops.purified_ops
    eps = 1e-6
    compiled_fwd = compiled_bwd = None
    if not args.no_compile and not args.dry_run:
        compiled_fwd = torch.compile(lambda x, z, s: reference.purify(x, z, strength=s, eps=eps), dynamic=True)
        compiled_bwd = torch.compile(lambda g, x, z, s: reference.purify_backward(g, x, z, s, eps), dynamic=True)

    rows = []
    for dtype in dtypes:
        b = torch.finfo(dtype).bits // 8
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for K in Ks:
            for D in Ds:
                if over_budget():
                    log(f"budget of {args.budget_s:.0f} s reached: skipping {dtype} K={K} D={D}")
                    rows.append(dict(dtype=str(dtype).split(".")[-1], K=K, D=D, skipped="budget"))
                    continue
                n = min(N, max(256, BUDGET_ROW_BYTES // ((3 + 2 * K) * D * b)))
                fwd_bytes = (2 + K) * D * b * n
                bwd_bytes = (3 + 2 * K) * D * b * n
                sets = max(1, min(8, math.ceil(2 * L2_BYTES / bwd_bytes)))
                row = dict(dtype=str(dtype).split(".")[-1], K=K, D=D, N=n, sets=sets,
                           fwd_min_bytes=fwd_bytes, bwd_min_bytes=bwd_bytes)
                try:
                    measure(row, device, dtype, acc, K, D, n, sets, eps, ops, timer, compiled_fwd, compiled_bwd,
                            copy_gbs, over_budget)
                except Exception as exc:  # one failing config must not stop the run
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"ERROR {row['dtype']} K={K} D={D}: {row['error']}")
                    traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                log(format_row(row))

    info["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write_results(info, rows, args.out, args.dry_run)
    return 0


def measure(row, device, dtype, acc, K, D, n, sets, eps, ops, timer, compiled_fwd, compiled_bwd, copy_gbs,
            over_budget):
    gen = torch.Generator(device=device).manual_seed(K * 100003 + D)
    data = []
    for _ in range(sets):
        x = torch.randn(n, D, device=device, dtype=dtype, generator=gen)
        z = torch.randn(n, K, D, device=device, dtype=dtype, generator=gen)
        g = torch.randn(n, D, device=device, dtype=dtype, generator=gen)
        s = torch.tensor(1.0, device=device, dtype=acc)
        y, coeff, chol = ops.purify_forward(x, z, s, eps)
        data.append((x, z, g, s, coeff, chol))
        del y
    fwd_bytes, bwd_bytes = row["fwd_min_bytes"], row["bwd_min_bytes"]

    def record(name, ms, nbytes):
        gbs = nbytes / ms / 1e6
        row[name + "_ms"] = round(ms, 4)
        row[name + "_GBps"] = round(gbs, 1)
        row[name + "_pct_copy"] = round(100 * gbs / copy_gbs, 1)

    record("fused_fwd", timer([lambda d=d: ops.purify_forward(d[0], d[1], d[3], eps) for d in data]), fwd_bytes)
    record("fused_bwd", timer([lambda d=d: ops.purify_backward(d[2], d[0], d[1], d[3], d[4], d[5], True)
                               for d in data]), bwd_bytes)
    # sanity: the fused result against the eager formula on the first set (float32 math)
    x, z, g, s, coeff, chol = data[0]
    y_f = ops.purify_forward(x, z, s, eps)[0].float()
    y_r = reference.purify(x, z, strength=s, eps=eps).float()
    row["fwd_rel_err_vs_eager"] = float((y_f - y_r).norm() / y_r.norm())
    del y_f, y_r

    try:
        record("eager_fwd", timer([lambda d=d: reference.purify(d[0], d[1], strength=d[3], eps=eps) for d in data]),
               fwd_bytes)
        record("eager_bwd", timer([lambda d=d: reference.purify_backward(d[2], d[0], d[1], d[3], eps)
                                   for d in data]), bwd_bytes)
    except torch.OutOfMemoryError:
        row["eager"] = "out of memory"
        torch.cuda.empty_cache()
    if compiled_fwd is not None and not over_budget():
        try:
            record("compile_fwd", timer([lambda d=d: compiled_fwd(d[0], d[1], d[3]) for d in data]), fwd_bytes)
            record("compile_bwd", timer([lambda d=d: compiled_bwd(d[2], d[0], d[1], d[3]) for d in data]), bwd_bytes)
        except torch.OutOfMemoryError:
            row["compile"] = "out of memory"
            torch.cuda.empty_cache()
    for kind in ("fwd", "bwd"):
        for base in ("eager", "compile"):
            if f"{base}_{kind}_ms" in row:
                row[f"speedup_{kind}_vs_{base}"] = round(row[f"{base}_{kind}_ms"] / row[f"fused_{kind}_ms"], 2)


def format_row(r):
    if "skipped" in r:
        return f"{r['dtype']:9} K={r['K']:2} D={r['D']:5}  skipped ({r['skipped']})"
    if "fused_fwd_GBps" not in r:
        return f"{r['dtype']:9} K={r['K']:2} D={r['D']:5}  {r.get('error', 'no result')}"

    def cell(name):
        return f"{r[name + '_GBps']:7.0f} {r[name + '_pct_copy']:5.1f}%" if name + "_GBps" in r else f"{'-':>13}"

    sp = " ".join(f"{r.get(k, float('nan')):5.2f}" for k in
                  ("speedup_fwd_vs_eager", "speedup_bwd_vs_eager", "speedup_fwd_vs_compile", "speedup_bwd_vs_compile"))
    return (f"{r['dtype']:9} K={r['K']:2} D={r['D']:5} N={r['N']:5} | fused fwd {cell('fused_fwd')} "
            f"bwd {cell('fused_bwd')} | eager fwd {cell('eager_fwd')} bwd {cell('eager_bwd')} | "
            f"compile fwd {cell('compile_fwd')} bwd {cell('compile_bwd')} | x eager f/b, x compile f/b: {sp}")


def write_results(info, rows, out_dir, dry_run):
    tag = "dryrun_" if dry_run else ""
    name = "".join(ch if ch.isalnum() else "_" for ch in info["device"]).strip("_").lower()
    stem = f"bench_cuda_{tag}{name}"
    text = [f"# purified_ops CUDA benchmark ({info['time']})",
            f"# device: {info['device']}  torch {info['torch']}  CUDA {info['cuda']}  python {info['python']}",
            f"# copy (device to device, read + write): {info['copy_GBps']} GB/s",
            "# GB/s = minimal bytes (DESIGN.md 4: fwd (2+K)Db, bwd (3+2K)Db per row) / median time; % = of copy",
            "# columns: fused/eager/compile GB/s and % of copy; speedups of fused over eager and compile (fwd, bwd)",
            *[format_row(r) for r in rows]]
    payload = json.dumps({"info": info, "rows": rows}, indent=1)
    dirs = [] if dry_run else [os.path.join(ROOT, "benchmarks", "results")]  # dry runs: --out only
    if out_dir:
        dirs.append(out_dir)
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, stem + ".json"), "w") as f:
            f.write(payload)
        with open(os.path.join(d, stem + ".txt"), "w") as f:
            f.write("\n".join(text) + "\n")
    log("\n".join(text))
    log("written:", ", ".join(os.path.join(d, stem + ".{json,txt}") for d in dirs))


if __name__ == "__main__":
    sys.exit(main())
