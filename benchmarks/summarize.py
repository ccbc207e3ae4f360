"""Markdown summary of a CPU benchmark CSV: the CPU speed targets (README, Performance), and a table of
every full-step (forward + backward) measurement.

    python benchmarks/summarize.py benchmarks/results/cpu.csv
"""
import argparse
import csv


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


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    rows = load(parser.parse_args(argv).csv)
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    device = fp32[0]["device_name"] if fp32 else rows[0]["device_name"]
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
