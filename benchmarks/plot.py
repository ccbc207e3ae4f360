"""Plots of a benchmark CSV written by `purified-ops bench --csv`.

    python benchmarks/plot.py benchmarks/results/cpu.csv --out benchmarks/results

writes, per device and dtype, `<stem>_bandwidth.png` (achieved GB/s against D, one line per
provider and mode, the copy bandwidth dashed) and `<stem>_speedup.png` (speedup of the fused op
over the eager formula and over torch.compile, one bar group per size, K and mode). With --step
(the CSV of `purified-ops bench --preset cpu-step`), `<stem>.png` instead: the training step's
% of copy bandwidth for the public step, the kernels alone and torch.compile, per dtype, N and
K, for the device of the newest row.
"""
import argparse
import csv
import os
from collections import defaultdict

try:
    import matplotlib
except ModuleNotFoundError:  # a standalone script: it does not import purified_ops for its check
    raise SystemExit("benchmarks/plot.py needs matplotlib, not installed here: "
                     "pip install 'purified-ops[bench]'") from None

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("N", "D", "K"):
            r[k] = int(r[k])
        for k in ("median_ms", "gbps", "copy_gbps", "speedup_vs_eager", "speedup_vs_compile", "pct_of_copy"):
            r[k] = float(r[k])
    return rows


COLORS = {"purified_ops": "tab:blue", "purified_ops_kernel": "tab:cyan", "eager": "tab:red", "compile": "tab:orange"}


def plot_bandwidth(rows, title, path):
    """GB/s against D at the N swept over most D values: one panel per K and mode, one line
    per provider, the copy bandwidth dashed."""
    n_counts = defaultdict(set)
    for r in rows:
        n_counts[r["N"]].add(r["D"])
    N = max(n_counts, key=lambda n: (len(n_counts[n]), n))
    rows = [r for r in rows if r["N"] == N]
    modes = sorted({r["mode"] for r in rows})
    ks = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(len(ks), len(modes), figsize=(4.5 * len(modes), 3.2 * len(ks)), squeeze=False)
    for i, K in enumerate(ks):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["K"] == K and r["mode"] == mode]
            for provider in sorted({r["provider"] for r in sel}):
                pts = sorted((r["D"], r["gbps"]) for r in sel if r["provider"] == provider)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS.get(provider),
                        label=provider)
            copy = sorted({(r["D"], r["copy_gbps"]) for r in sel})
            ax.plot([c[0] for c in copy], [c[1] for c in copy], "k--", alpha=0.6, label="copy (same run)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, K={K}, N={N}", fontsize=9)
            ax.set_xlabel("D")
            ax.set_ylabel("GB/s (minimal bytes)")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(rows, title, path):
    """Speedup bars of the fused op over eager and compile, for the full step (forward +
    backward) where measured, else every mode."""
    if any(r["mode"] == "full" for r in rows):
        rows = [r for r in rows if r["mode"] == "full"]
    fused = [r for r in rows if r["provider"] in ("purified_ops", "purified_ops_kernel")]
    groups = sorted({(r["N"], r["D"], r["K"], r["mode"]) for r in fused})
    providers = sorted({r["provider"] for r in fused})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups)), 4))
    width = 0.8 / (2 * len(providers))
    i = 0
    for provider in providers:
        for base in ("eager", "compile"):
            vals = []
            for g in groups:
                match = [r for r in fused if r["provider"] == provider and (r["N"], r["D"], r["K"], r["mode"]) == g]
                vals.append(match[0][f"speedup_vs_{base}"] if match else 0)
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=f"{provider} vs {base}",
                   color={("purified_ops", "eager"): "tab:red", ("purified_ops", "compile"): "tab:orange",
                          ("purified_ops_kernel", "eager"): "salmon",
                          ("purified_ops_kernel", "compile"): "navajowhite"}.get((provider, base)))
            i += 1
    ax.axhline(1, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{N}x{D}\nK={K} {m}" for N, D, K, m in groups], fontsize=7)
    ax.set_ylabel("speedup (x)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


STEP_PROVIDERS = (("purified_ops", "public step"), ("purified_ops_kernel", "kernels alone"), ("compile", "torch.compile"))


def plot_step(rows, path):
    """% of copy bandwidth of full steps, one panel per dtype, a bar group per (N, K)."""
    device = max(rows, key=lambda r: r["timestamp"])["device_name"]
    rows = [r for r in rows if r["device_name"] == device and r["mode"] == "full"]
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32")
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 3.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        sel = [r for r in rows if r["dtype"] == dtype]
        groups = sorted({(r["N"], r["K"], r["D"]) for r in sel})
        width = 0.8 / len(STEP_PROVIDERS)
        for i, (provider, label) in enumerate(STEP_PROVIDERS):
            vals = []
            for g in groups:
                match = [r for r in sel if r["provider"] == provider and (r["N"], r["K"], r["D"]) == g]
                vals.append(match[0]["pct_of_copy"] if match else 0)
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=label,
                   color=COLORS.get(provider))
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"N={n}\nK={k}" + (f"\nD={d}" if d != 1024 else "") for n, k, d in groups], fontsize=8)
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(f"{dtype}, forward + backward" + (", D=1024" if {g[2] for g in groups} == {1024} else ""),
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{device}, torch {rows[0]['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's)")
    parser.add_argument("--step", action="store_true", help="the training-step plot (preset cpu-step)")
    args = parser.parse_args(argv)
    rows = load(args.csv)
    out = args.out or os.path.dirname(os.path.abspath(args.csv))
    stem = os.path.splitext(os.path.basename(args.csv))[0]
    if args.step:
        path = os.path.join(out, f"{stem}.png")
        plot_step(rows, path)
        print(path)
        return
    written = []
    for (device, dtype) in sorted({(r["device_name"], r["dtype"]) for r in rows}):
        sel = [r for r in rows if r["device_name"] == device and r["dtype"] == dtype]
        tag = f"{stem}_{dtype}"
        title = f"{device}, {dtype}, torch {sel[0]['torch']}"
        for kind, fn in (("bandwidth", plot_bandwidth), ("speedup", plot_speedup)):
            path = os.path.join(out, f"{tag}_{kind}.png")
            fn(sel, title, path)
            written.append(path)
    print("\n".join(written))


if __name__ == "__main__":
    main()
