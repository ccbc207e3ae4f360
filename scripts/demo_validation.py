"""Chooses the demo's purified variant on a validation split, never on the test set.

For each seed (default 100-107, disjoint from the demo's 0-4) and training-set size, every variant
below and the plain network are trained exactly as in the demo and scored on
``purified_ops.recipe.demo.load_validation``: 300 pool images outside that training set, with the
nuisance drawn uniformly (the target distribution). Prints, per regime, each variant minus plain
paired over seeds with its standard error; docs/demo.md keeps the tables.

    python scripts/demo_validation.py --variants base balanced --seeds 8
    python scripts/demo_validation.py --nuisance grating --seeds 5 --regimes correlated
    python scripts/demo_validation.py --nuisance grating --seeds 8 --variants bank_top2 bank_pool400_pseudo

The grating's ``*pool400*`` variants give the nuisance branch 400 more images with nuisance labels
only (``run_one(nuisance_pool=...)``); the main network still sees only the training set.
"""
import argparse

import numpy as np
import torch

from purified_ops.recipe import demo

# name -> keyword arguments of purified_ops.recipe.demo.run_one for the purified arm
VARIANTS = {
    "base": {},                                              # subspace, K = 16, joint (the earlier choice)
    "balanced": {"balance_irrelevant": True},                # + irrelevant loss balanced against the digit
    "balanced_k8": {"balance_irrelevant": True, "k": 8},
    "balanced_k12": {"balance_irrelevant": True, "k": 12},
    "balanced_k24": {"balance_irrelevant": True, "k": 24},
    "balanced_two_stage": {"balance_irrelevant": True, "schedule": "two_stage"},
    "balanced_w3": {"balance_irrelevant": True, "irrelevant_weight": 3.0},
}

# grating nuisance: name -> (arm, keyword arguments of run_one); all two-stage and balanced unless
# said; the bank variants are top-1 (the sweep's starting point) unless said
GRATING_VARIANTS = {
    "shared_k16": ("shared", {}),                                   # the texture's arm, as it is
    "shared_k32": ("shared", {"k": 32}),
    "bank_moments_ft": ("per_sample", {"bank_top": 1}),                          # moments init, then the labels' CE
    "bank_moments_only": ("per_sample", {"stage1_steps": 0, "bank_top": 1}),       # moments init, no CE
    "bank_ft1000": ("per_sample", {"stage1_steps": 1000, "bank_top": 1}),          # twice the CE steps
    "bank_random_ft": ("per_sample", {"bank_init": "random", "bank_top": 1}),      # CE from a random bank
    "bank_soft": ("per_sample", {"hard": False}),                   # probability-weighted z at test
    "bank_k3": ("per_sample", {"bank_k": 3, "bank_top": 1}),
    "bank_top2": ("per_sample", {"bank_top": 2}),                   # the chosen arm: top-2 classes' subspaces
    "bank_not_balanced": ("per_sample", {"balance_irrelevant": False, "bank_top": 1}),
    # the bank's moments centred by each image's nuisance-class mean (no digit label needed)
    "bank_centre_nuisance_class": ("per_sample", {"bank_centring": "nuisance_class"}),
    "bank_cross_fit5": ("per_sample", {"cross_fit": 5}),            # stage 2 on out-of-fold purified images
    # a pool of 400 images with nuisance labels only: unknown digits (weight 1, nuisance-class
    # centring), or the plain network's predicted digits (balanced, digit centring)
    "bank_pool400": ("per_sample", {"nuisance_pool": 400, "pool_labels": "none"}),
    "bank_pool400_pseudo": ("per_sample", {"nuisance_pool": 400, "pool_labels": "pseudo"}),   # chosen
    "bank_pool400_pseudo_centre_class": ("per_sample", {"nuisance_pool": 400, "pool_labels": "pseudo",
                                                        "bank_centring": "nuisance_class"}),
    "bank_pool400_s1000": ("per_sample", {"nuisance_pool": 400, "pool_labels": "none", "stage1_steps": 1000}),
    "shared_pool400": ("shared", {"nuisance_pool": 400, "pool_labels": "none"}),
    "shared_pool400_pseudo": ("shared", {"nuisance_pool": 400, "pool_labels": "pseudo"}),
    "oracle_per_sample": ("oracle_per_sample", {}),                 # references
    "oracle_shared": ("oracle_shared", {}),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nuisance", choices=demo.NUISANCES, default="texture")
    p.add_argument("--variants", nargs="+", default=None, choices=[*VARIANTS, *GRATING_VARIANTS],
                   help="default: all of the nuisance's variants")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=100)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--regimes", nargs="+", default=list(demo.REGIMES), choices=demo.REGIMES)
    args = p.parse_args()
    table = VARIANTS if args.nuisance == "texture" else GRATING_VARIANTS
    names = args.variants or list(table)
    if any(name not in table for name in names):
        p.error(f"variants of the {args.nuisance} nuisance: {', '.join(table)}")
    torch.set_num_threads(1)
    # the demo's own training settings (its command-line defaults), scored on validation
    demo_parser = argparse.ArgumentParser()
    demo.add_arguments(demo_parser)
    d = demo_parser.parse_args([])
    common = dict(steps=d.steps, batch_size=d.batch_size, lr=d.lr, irrelevant_weight=d.irrelevant_weight,
                  rho=d.rho, evaluate_on="validation", nuisance=args.nuisance)
    if args.nuisance == "grating":
        common.update(schedule=d.schedule, balance_irrelevant=not d.no_balance)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for regime in args.regimes:
        plain = np.array([demo.run_one("plain", regime, args.size, s, **common) for s in seeds])
        print(f"[{regime}] n={args.size} plain {plain.mean():.4f} over {args.seeds} seeds "
              f"(per seed {' '.join(f'{x:.3f}' for x in plain)})", flush=True)
        for name in names:
            arm, kw = ("purified", VARIANTS[name]) if args.nuisance == "texture" else GRATING_VARIANTS[name]
            kw = {**common, **kw}
            acc = np.array([demo.run_one(arm, regime, args.size, s, **kw) for s in seeds])
            c = demo.compare(plain, acc)
            print(f"[{regime}] {name:>20}: {arm} - plain {c['diff']:+.4f} +- {c['se_paired']:.4f}  "
                  f"({arm} {acc.mean():.4f}; per seed {' '.join(f'{x:+.3f}' for x in acc - plain)})",
                  flush=True)


if __name__ == "__main__":
    main()
