"""Markdown summary of a CPU benchmark CSV: the CPU speed targets (docs/performance.md), and a table of
every full-step (forward + backward) measurement; with --step, the CPU training-step table of
`purified-ops bench --preset cpu-step` against its goals (benchmarks/README.md).

    python benchmarks/summarize.py benchmarks/results/cpu.csv
    python benchmarks/summarize.py --step benchmarks/results/cpu_step.csv
"""
import argparse
import csv
import math


def load(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pick(rows, **key):
    for r in rows:
        if all(str(r[k]) == str(v) for k, v in key.items()):
            return r
    return None


TARGETS = [  # (label, N, D, K, mode, vs eager, vs compile)
    ("N=2048, D=1024, K=1, fwd+bwd", 2048, 1024, 1, "full", 4.5, 1.25),
    ("N=8192, D=1024, K=1, fwd+bwd", 8192, 1024, 1, "full", 3.0, 1.0),
    ("N=1024, D=1024, K=4, fwd+bwd", 1024, 1024, 4, "full", 6.0, 2.5),
]


# The training step's goals (forward + backward through the public API, D 1024), per
# (dtype, N, K): each a label and a test of the public step's row against the kernels' alone.
def _copy_at_least(pct):
    return f">= {pct}% of copy", lambda pub, ker: float(pub["pct_of_copy"]) >= pct


def _kernels_within(frac):
    return (f"within {round(100 * frac)}% of the kernels alone",
            lambda pub, ker: float(pub["median_ms"]) <= (1 + frac) * float(ker["median_ms"]))


def _compile_at_least(x):
    return f">= {x}x torch.compile", lambda pub, ker: float(pub["speedup_vs_compile"]) >= x


def _compile_ahead():
    return "ahead of torch.compile", lambda pub, ker: float(pub["speedup_vs_compile"]) > 1


STEP_GOALS = {
    ("float32", 8192, 1): [_copy_at_least(85)],
    ("bfloat16", 8192, 1): [_copy_at_least(85), _compile_ahead()],
    ("float32", 8192, 4): [_copy_at_least(75)],
    ("bfloat16", 8192, 4): [_copy_at_least(75), _compile_ahead()],
    ("float32", 2048, 1): [_kernels_within(0.10), _compile_at_least(1.25)],
    ("bfloat16", 2048, 1): [_compile_ahead()],
    ("float32", 2048, 4): [],
    ("bfloat16", 2048, 4): [_compile_ahead()],
}


def newest_device(rows):
    return max(rows, key=lambda r: r["timestamp"])["device_name"]


def step_table(rows, device):
    """Markdown lines of the training-step table of one device, and the goals as (label, met)."""
    lines = [f"CPU training step (forward + backward, D 1024), {device}; torch {rows[0]['torch']}; "
             "% of copy: achieved bandwidth over the minimal bytes, against torch.add(out=) in the same run.\n",
             "| dtype | N | K | public step | kernels alone | torch.compile | public / kernels (time) | "
             "public x compile | goals | load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    goals = []
    for (dtype, n, k), wanted in STEP_GOALS.items():
        got = {p: pick(rows, device_name=device, provider=p, dtype=dtype, N=n, D=1024, K=k, mode="full")
               for p in ("purified_ops", "purified_ops_kernel", "compile")}
        pub, ker = got["purified_ops"], got["purified_ops_kernel"]
        if pub is None or ker is None:
            continue
        pct = lambda r: f"{float(r['pct_of_copy']):.0f}% ({float(r['median_ms']):.2f} ms)" if r else "-"  # noqa: E731
        met = [(f"{dtype} N {n} K {k}: {label}", test(pub, ker)) for label, test in wanted]
        goals += met
        load = f"{float(pub.get('load_before') or math.nan):.2f}-{float(pub.get('load_after') or math.nan):.2f}"
        lines.append(f"| {dtype} | {n} | {k} | {pct(pub)} | {pct(ker)} | {pct(got['compile'])} | "
                     f"{float(pub['median_ms']) / float(ker['median_ms']):.3f} | "
                     f"{float(pub['speedup_vs_compile']):.2f}x | "
                     f"{'; '.join(('met: ' if ok else 'missed: ') + g.split(': ', 1)[1] for g, ok in met) or '-'} | "
                     f"{load} |")
    return lines, goals


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    parser.add_argument("--step", action="store_true", help="the training-step table (preset cpu-step) and its goals")
    parser.add_argument("--device", help="the device_name whose rows to use (default: the newest row's)")
    args = parser.parse_args(argv)
    rows = load(args.csv)
    if args.step:
        lines, goals = step_table(rows, args.device or newest_device(rows))
        print("\n".join(lines))
        print(f"\nGoals met: {sum(ok for _, ok in goals)} of {len(goals)}.")
        return
    device = args.device or newest_device(rows)
    rows = [r for r in rows if r["device_name"] == device]  # one machine's rows: the CSV keeps every machine's
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    print(f"Machine: {device}; torch {rows[0]['torch']}; purified_ops {rows[0]['purified_ops']}.\n")
    print("| target (float32) | fused end-to-end: x eager / x compile | fused kernel only: x eager / x compile | goal |")
    print("| --- | --- | --- | --- |")
    for label, n, d, k, mode, ge, gc in TARGETS:
        e2e = pick(fp32, provider="purified_ops", N=n, D=d, K=k, mode=mode)
        ker = pick(fp32, provider="purified_ops_kernel", N=n, D=d, K=k, mode=mode)
        if e2e is None:
            continue
        fmt = lambda r: f"{float(r['speedup_vs_eager']):.2f}x / {float(r['speedup_vs_compile']):.2f}x" if r else "-"  # noqa: E731
        print(f"| {label} | {fmt(e2e)} | {fmt(ker)} | >= {ge}x / >= {gc}x |")
    print("\nForward alone, K=1, fused kernel (preallocated outputs) as % of torch.add(out=) bandwidth:\n")
    print("| dtype | N x D | fused kernel GB/s | torch.add(out=) GB/s | % |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if r["provider"] == "purified_ops_kernel" and r["mode"] == "forward" and r["K"] == "1":
            print(f"| {r['dtype']} | {r['N']} x {r['D']} | {float(r['gbps']):.1f} | {float(r['copy_gbps']):.1f} | "
                  f"{float(r['pct_of_copy']):.0f}% |")
    print("\nEvery full step (forward + backward), median ms [p20, p80]:\n")
    print("| dtype | N x D | K | fused | fused kernel | eager | compile | fused x eager | fused x compile | peak MB fused / eager / compile |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    keys = sorted({(r["dtype"], int(r["N"]), int(r["D"]), int(r["K"])) for r in rows if r["mode"] == "full"})
    for dt, n, d, k in keys:
        got = {p: pick(rows, provider=p, dtype=dt, N=n, D=d, K=k, mode="full")
               for p in ("purified_ops", "purified_ops_kernel", "eager", "compile")}
        ms = lambda r: f"{float(r['median_ms']):.2f} [{float(r['p20_ms']):.2f}, {float(r['p80_ms']):.2f}]" if r else "-"  # noqa: E731
        f = got["purified_ops"]
        peak = " / ".join(f"{float(got[p].get('peak_mb') or 'nan'):.0f}" if got[p] else "-" for p in ("purified_ops", "eager", "compile"))
        print(f"| {dt} | {n} x {d} | {k} | {ms(f)} | {ms(got['purified_ops_kernel'])} | {ms(got['eager'])} | "
              f"{ms(got['compile'])} | {float(f['speedup_vs_eager']):.2f}x | {float(f['speedup_vs_compile']):.2f}x | {peak} |")


if __name__ == "__main__":
    main()
