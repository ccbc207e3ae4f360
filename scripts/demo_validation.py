"""Chooses the demo's purified variant on a validation split, never on the test set.

For each seed (default 100-107, disjoint from the demo's 0-4) and training-set size, every variant
below and the plain network are trained exactly as in the demo and scored on
``purified_ops.demo.load_validation``: 300 pool images outside that training set, with textures
drawn uniformly (the target distribution). Prints, per regime, purified minus plain paired over
seeds with its standard error; docs/demo.md keeps the table.

    python scripts/demo_validation.py --variants base balanced --seeds 8
"""
import argparse

import numpy as np
import torch

from purified_ops import demo

# name -> keyword arguments of purified_ops.demo.run_one for the purified arm
VARIANTS = {
    "base": {},                                              # subspace, K = 16, joint (the earlier choice)
    "balanced": {"balance_irrelevant": True},                # + irrelevant loss balanced against the digit
    "balanced_k8": {"balance_irrelevant": True, "k": 8},
    "balanced_k12": {"balance_irrelevant": True, "k": 12},
    "balanced_k24": {"balance_irrelevant": True, "k": 24},
    "balanced_two_stage": {"balance_irrelevant": True, "schedule": "two_stage"},
    "balanced_w3": {"balance_irrelevant": True, "irrelevant_weight": 3.0},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=100)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--regimes", nargs="+", default=list(demo.REGIMES), choices=demo.REGIMES)
    args = p.parse_args()
    torch.set_num_threads(1)
    # the demo's own training settings (its command-line defaults), scored on validation
    demo_parser = argparse.ArgumentParser()
    demo.add_arguments(demo_parser)
    d = demo_parser.parse_args([])
    common = dict(steps=d.steps, batch_size=d.batch_size, lr=d.lr, irrelevant_weight=d.irrelevant_weight,
                  rho=d.rho, evaluate_on="validation")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for regime in args.regimes:
        plain = np.array([demo.run_one("plain", regime, args.size, s, **common) for s in seeds])
        print(f"[{regime}] n={args.size} plain {plain.mean():.4f} over {args.seeds} seeds", flush=True)
        for name in args.variants:
            kw = {**common, **VARIANTS[name]}
            acc = np.array([demo.run_one("purified", regime, args.size, s, **kw) for s in seeds])
            c = demo.compare(plain, acc)
            print(f"[{regime}] {name:>20}: purified - plain {c['diff']:+.4f} +- {c['se_paired']:.4f}  "
                  f"(purified {acc.mean():.4f}; per seed {' '.join(f'{x:+.3f}' for x in acc - plain)})",
                  flush=True)


if __name__ == "__main__":
    main()
