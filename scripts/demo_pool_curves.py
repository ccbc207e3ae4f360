"""Learning curves of the grating demo's per-sample arm over task labels n and nuisance pool M.

For each regime, training-set size n and seed (the demo's seeds 0, 1, ...), trains the plain
network, the per-sample oracle (the headroom) and the per-sample arm with each pool size M, all
scored on the test set, exactly as ``purified-ops demo --nuisance grating --nuisance-pool M``
does. Each run's accuracy is appended to a JSON-lines file as it finishes (a rerun skips the runs
already there); ``--plot`` draws per-sample minus plain against n, one line per M, with the
oracle's gain as the headroom.

    python scripts/demo_pool_curves.py --out curves.jsonl --seeds 3 --plot docs/demo_pool_curves.png
"""
import argparse
import json
import os

import numpy as np
import torch

from purified_ops.recipe import demo


def runs(args):
    for regime in args.regimes:
        for n in args.sizes:
            for seed in range(args.seeds):
                yield regime, n, seed, "plain", 0
                yield regime, n, seed, "oracle_per_sample", 0
                for m in args.pools:
                    yield regime, n, seed, "per_sample", m


def key(regime, n, seed, arm, m):
    return f"{regime}/{n}/{seed}/{arm}/{m}"


def load(path):
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done[key(r["regime"], r["n"], r["seed"], r["arm"], r["pool"])] = r["acc"]
    return done


def plot(done, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.regimes), figsize=(5.4 * len(args.regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], args.regimes):
        def gain(arm, m, n):
            pairs = [(done.get(key(regime, n, s, arm, m)), done.get(key(regime, n, s, "plain", 0)))
                     for s in range(args.seeds)]
            d = np.array([a - b for a, b in pairs if a is not None and b is not None])
            return (d.mean(), d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else (np.nan, np.nan)

        for arm, m, style in [("oracle_per_sample", 0, "k--")] + [("per_sample", m, "-o") for m in args.pools]:
            g = np.array([gain(arm, m, n) for n in args.sizes])
            label = "per-sample oracle (headroom)" if arm != "per_sample" else f"per-sample, pool M = {m}"
            ax.errorbar(args.sizes, g[:, 0], yerr=2 * g[:, 1], fmt=style, capsize=3, label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(args.sizes)
        ax.minorticks_off()
        ax.set_xticklabels([str(n) for n in args.sizes])
        ax.set_xlabel("task-labelled training images n")
        ax.set_ylabel("test accuracy minus plain (+- 2 SE, paired)")
        ax.set_title(f"digits + grating: {regime}, {args.seeds} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON-lines file of the runs (appended to)")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400])
    p.add_argument("--pools", type=int, nargs="+", default=[0, 200, 400, 1000])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--regimes", nargs="+", default=list(demo.REGIMES), choices=demo.REGIMES)
    p.add_argument("--plot", default=None)
    p.add_argument("--pool-labels", choices=demo.POOL_LABELS, default="none")
    args = p.parse_args()
    torch.set_num_threads(1)
    demo_parser = argparse.ArgumentParser()
    demo.add_arguments(demo_parser)
    d = demo_parser.parse_args(["--nuisance", "grating", "--plot", ""])
    common = dict(steps=d.steps, batch_size=d.batch_size, lr=d.lr, irrelevant_weight=d.irrelevant_weight,
                  rho=d.rho, nuisance="grating", schedule=d.schedule, balance_irrelevant=not d.no_balance,
                  bank_k=d.bank_k, bank_top=d.bank_top, pool_labels=args.pool_labels)
    done = load(args.out)
    with open(args.out, "a") as f:
        for regime, n, seed, arm, m in runs(args):
            if key(regime, n, seed, arm, m) in done:
                continue
            acc = demo.run_one(arm, regime, n, seed, nuisance_pool=m, **common)
            done[key(regime, n, seed, arm, m)] = acc
            f.write(json.dumps({"regime": regime, "n": n, "seed": seed, "arm": arm, "pool": m, "acc": acc}) + "\n")
            f.flush()
            print(regime, n, seed, arm, m, f"{acc:.4f}", flush=True)
    if args.plot:
        plot(done, args, args.plot)
        for regime in args.regimes:
            for n in args.sizes:
                plain = np.array([done[key(regime, n, s, "plain", 0)] for s in range(args.seeds)])
                cells = []
                for arm, m in [("per_sample", m) for m in args.pools] + [("oracle_per_sample", 0)]:
                    c = demo.compare(plain, [done[key(regime, n, s, arm, m)] for s in range(args.seeds)])
                    cells.append(f"{c['diff']:+.3f} ({c['se_paired']:.3f})")
                print(f"| {regime} | {n} | {plain.mean():.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
