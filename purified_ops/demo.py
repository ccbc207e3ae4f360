"""The PurifiedLearning demo: handwritten digits with a background-texture nuisance.

Data: scikit-learn's bundled digits (1797 grey 8x8 images, 10 classes, no download). A fixed
split keeps 797 images for test; each seed draws its small training set from the other 1000.

Task-irrelevant labels: every image gets one of four background textures (horizontal stripes,
vertical stripes, a checkerboard, diagonal stripes) at a random phase and a random contrast,
added to the digit; the texture's id is the task-irrelevant label. It is made up by us and says
nothing about the digit:

- regime ``independent``: the texture is drawn uniformly, independently of the digit, for the
  training and the test images;
- regime ``correlated``: in the small training set the texture is ``digit mod 4`` with probability
  ``rho`` (default 0.9) and uniform otherwise, a shortcut a plain network can latch onto; at test
  it is uniform and independent of the digit, so the shortcut does not pay.

Arms, everything else equal (same main encoder and task head, same initialization per seed, same
training set, same batches, optimizer, learning rate and number of steps):

- ``plain``: main encoder -> task head, task loss only;
- ``multitask``: the same network with an irrelevant head on its features, trained on task loss
  plus irrelevant loss, no purification;
- ``purified``: PurifiedLearning with subspace purification of the input (``--variant
  subspace``, the default): a :class:`~purified_ops.learning.LowRankProbe` learns K = 16
  directions of pixel space from which a small MLP must predict the texture label; a
  ``PurifyLayer`` removes that subspace (one set of directions shared by all samples) from every
  image before the same main encoder and task head. Two stages: the probe learns the texture
  first, with its loss balanced against the digit (``fit(balance_irrelevant=True)``, so that it
  cannot learn digits where the texture follows the digit), then it is frozen and the network
  learns the task; ``--schedule joint --no-balance`` is the previous default. ``--variant
  per_sample`` is the per-sample form: a task-irrelevant encoder of the main encoder's
  architecture gives each sample one direction in main-feature space, which is removed from its
  main features.

The variant was chosen on a validation split carved from the training pool (:func:`load_validation`,
``scripts/demo_validation.py``), never on the test set; docs/demo.md reports every variant tried.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from ._extras import require_extra
from .learning import LowRankProbe, PurifiedNet, evaluate, fit, seed_everything

ARMS = ("plain", "multitask", "purified")
VARIANTS = ("subspace", "per_sample")
SUBSPACE_K = 16              # directions of pixel space removed by the subspace variant
REGIMES = ("correlated", "independent")
N_TEXTURES = 4
TEST_SIZE = 797
SPLIT_SEED = 20210222        # the fixed train-pool / test split
TEST_NUISANCE_SEED = 777     # the test set's textures (independent of the digit)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def textures(ids: np.ndarray, rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """One 0/1 texture per id (0 horizontal, 1 vertical, 2 checkerboard, 3 diagonal), random phase."""
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    phase = rng.integers(0, 4, size=len(ids))[:, None, None]
    i, j = i[None], j[None]
    patterns = np.stack([((i + phase) // 2) % 2, ((j + phase) // 2) % 2, (i + j + phase) % 2,
                         ((i + j + phase) // 2) % 2])                     # [4, N, size, size]
    return patterns[ids, np.arange(len(ids))].astype(np.float32)


def add_nuisance(images: np.ndarray, digits: np.ndarray, rng: np.random.Generator, *,
                 correlated: bool, rho: float, contrast=(0.4, 0.8)):
    """Adds a texture to each image; returns (images [N, 64], texture ids [N])."""
    ids = rng.integers(0, N_TEXTURES, size=len(digits))
    if correlated:
        ids = np.where(rng.random(len(digits)) < rho, digits % N_TEXTURES, ids)
    amp = rng.uniform(*contrast, size=len(digits)).astype(np.float32)[:, None, None]
    out = images + amp * (textures(ids, rng, images.shape[-1]) - 0.5)
    return out.reshape(len(digits), -1).astype(np.float32), ids


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


VALIDATION_SIZE = 300         # pool images held out to choose the purified variant


def _split(n_train: int, seed: int):
    """(images, digits, test indices, the rest of the pool, training indices, the seed's rng)."""
    images, target = _digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(target))
    test_idx, pool = order[:TEST_SIZE], order[TEST_SIZE:]
    if not 1 <= n_train <= len(pool):
        raise ValueError(f"training-set size must be in [1, {len(pool)}], got {n_train}")
    rng = np.random.default_rng([seed, n_train])
    train_idx = rng.choice(pool, size=n_train, replace=False)
    return images, target, test_idx, np.setdiff1d(pool, train_idx), train_idx, rng


def _nuisance_set(images, target, idx, rng, correlated: bool, rho: float):
    x, tex = add_nuisance(images[idx], target[idx], rng, correlated=correlated, rho=rho)
    return torch.from_numpy(x), torch.from_numpy(target[idx]), torch.from_numpy(tex)


def load_data(n_train: int, seed: int, regime: str, *, rho: float = 0.9):
    """((x, y, texture) train, (x, y, texture) test) as torch tensors; x is [N, 64]."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    images, target, test_idx, _, train_idx, rng = _split(n_train, seed)
    train = _nuisance_set(images, target, train_idx, rng, regime == "correlated", rho)
    test = _nuisance_set(images, target, test_idx, np.random.default_rng(TEST_NUISANCE_SEED), False, rho)
    return train, test


def load_validation(n_train: int, seed: int, size: int = VALIDATION_SIZE):
    """(x, y, texture): ``size`` pool images outside the seed's training set, textures uniform.

    The set used to choose the purified variant (docs/demo.md); it never touches the test images.
    """
    images, target, _, rest, _, _ = _split(n_train, seed)
    rng = np.random.default_rng([seed, n_train, size])
    return _nuisance_set(images, target, rng.choice(rest, size=min(size, len(rest)), replace=False),
                         rng, False, 0.0)


# ----------------------------------------------------------------------------------------------
# Networks and arms
# ----------------------------------------------------------------------------------------------

def encoder(hidden: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, dim))


def build_arm(arm: str, seed: int, *, hidden: int = 128, dim: int = 32,
              detach_irrelevant: bool = True, variant: str = "subspace", k: int = SUBSPACE_K) -> PurifiedNet:
    """The three arms; the main encoder and task head get the same initial weights in all of them.

    ``variant`` picks the purified arm: ``"subspace"`` purifies the input pixels against ``k``
    learned directions shared by all samples; ``"per_sample"`` purifies the main features against
    one direction per sample from a separate task-irrelevant encoder.
    """
    torch.manual_seed(seed)
    main, task_head = encoder(hidden, dim), nn.Linear(dim, 10)
    if arm in ("plain", "multitask"):
        # The network alone; multitask puts the irrelevant head on its features.
        irrelevant_head = nn.Linear(dim, N_TEXTURES)
        return PurifiedNet(nn.Identity(), nn.Identity(), task_head, irrelevant_head, backbone=main,
                           purify=False)
    if arm != "purified":
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    if variant == "subspace":
        # input -> PurifyLayer(input, P) -> main encoder -> task head; P [k, 64] is shared by all
        # samples and learned (with the probe MLP) only from the texture labels.
        probe = LowRankProbe(64, k)
        irrelevant_head = nn.Sequential(nn.Linear(k, dim), nn.ReLU(), nn.Linear(dim, N_TEXTURES))
        return PurifiedNet(nn.Identity(), probe, nn.Sequential(main, task_head), irrelevant_head,
                           purify=True, detach_irrelevant=detach_irrelevant)
    if variant == "per_sample":
        irrelevant_head = nn.Linear(dim, N_TEXTURES)
        irrelevant = encoder(hidden, dim)
        return PurifiedNet(main, irrelevant, task_head, irrelevant_head, purify=True,
                           detach_irrelevant=detach_irrelevant)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def run_one(arm: str, regime: str, n_train: int, seed: int, *, steps: int, batch_size: int,
            lr: float, irrelevant_weight: float, rho: float, device=None, schedule: str = "joint",
            detach_irrelevant: bool = True, variant: str = "subspace", k: int = SUBSPACE_K,
            balance_irrelevant: bool = False, evaluate_on: str = "test") -> float:
    """Trains one arm and returns its task accuracy on the test set (or ``"validation"``)."""
    train, test = load_data(n_train, seed, regime, rho=rho)
    if evaluate_on == "validation":
        test = load_validation(n_train, seed)
    elif evaluate_on != "test":
        raise ValueError(f"evaluate_on must be 'test' or 'validation', got {evaluate_on!r}")
    model = build_arm(arm, seed, detach_irrelevant=detach_irrelevant, variant=variant, k=k)
    epochs = max(1, math.ceil(steps / math.ceil(n_train / batch_size)))  # >= steps optimizer steps
    fit(model, train, epochs=epochs, lr=lr, batch_size=batch_size,
        irrelevant_weight=0.0 if arm == "plain" else irrelevant_weight, seed=seed, device=device,
        schedule=schedule if arm == "purified" else "joint", progress=False,
        balance_irrelevant=balance_irrelevant and arm != "plain")
    return evaluate(model, test, device=device)["task_acc"]


# ----------------------------------------------------------------------------------------------
# Statistics, table, plot
# ----------------------------------------------------------------------------------------------

def _std(v):
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def compare(baseline, purified) -> dict:
    """Purified minus baseline: mean difference, its standard error (unpaired and paired)."""
    b, p = np.asarray(baseline, float), np.asarray(purified, float)
    n = len(b)
    diff = float(p.mean() - b.mean())
    se = math.sqrt(_std(b) ** 2 / n + _std(p) ** 2 / n) if n > 1 else float("nan")
    se_paired = _std(p - b) / math.sqrt(n) if n > 1 else float("nan")
    return {"diff": diff, "se": se, "se_paired": se_paired,
            "beats_by_2se": bool(n > 1 and diff > 2 * se),
            "beats_by_2se_paired": bool(n > 1 and diff > 2 * se_paired)}


def format_table(results: dict, sizes, arms=ARMS) -> str:
    lines = []
    for regime, by_size in results.items():
        lines.append(f"regime: {regime}  (test accuracy, mean +- std over seeds)")
        header = f"{'n_train':>8} " + " ".join(f"{a:>17}" for a in arms) + f" {'purified-plain':>22}"
        lines.append(header)
        for n in sizes:
            row = by_size[n]
            cells = " ".join(f"{np.mean(row[a]):>9.4f} +- {_std(row[a]):.4f}" for a in arms)
            c = compare(row["plain"], row["purified"])
            lines.append(f"{n:>8} {cells} {c['diff']:>+10.4f} (SE {c['se']:.4f})")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, sizes, path: str, *, default_size=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, (regime, by_size) in zip(axes[0], results.items()):
        for arm, marker in zip(ARMS, "osD"):
            means = np.array([np.mean(by_size[n][arm]) for n in sizes])
            stds = np.array([_std(by_size[n][arm]) for n in sizes])
            ax.plot(sizes, means, marker=marker, label=arm)
            ax.fill_between(sizes, means - stds, means + stds, alpha=0.15)
        if default_size in sizes:
            ax.axvline(default_size, color="grey", lw=0.8, ls=":")
        if len(sizes) > 1:
            ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.minorticks_off()
        ax.set_xticklabels([str(n) for n in sizes])
        ax.set_xlabel("training-set size")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"digits + texture nuisance: {regime}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regime", choices=(*REGIMES, "both"), default="both",
                   help="texture independent of the digit, correlated in training only, or both "
                        "(default; the JSON's headline lists are for the first: correlated)")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400],
                   help="training-set sizes of the learning curve (default: 50 100 200 400)")
    p.add_argument("--default-size", type=int, default=100,
                   help="the size the verdict and the JSON's accuracy lists are for (default 100)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per arm and size (default 5)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per run (default 500)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--irrelevant-weight", type=float, default=1.0)
    p.add_argument("--variant", choices=VARIANTS, default="subspace",
                   help="purified arm: subspace purification of the input against K learned directions "
                        "shared by all samples (default), or one direction per sample in feature space")
    p.add_argument("--k", type=int, default=SUBSPACE_K,
                   help=f"directions of the subspace variant (default {SUBSPACE_K})")
    p.add_argument("--schedule", choices=("joint", "two_stage"), default="two_stage",
                   help="purified arm: the irrelevant branch first, then frozen (default), or joint training")
    p.add_argument("--no-balance", action="store_true",
                   help="do not balance the irrelevant loss against the digit (by default each sample's "
                        "irrelevant loss is weighted so that texture and digit are independent in the "
                        "weighted training set; learning.balancing_tables)")
    p.add_argument("--no-detach", action="store_true",
                   help="purified arm: let the task loss reach the irrelevant encoder through z")
    p.add_argument("--rho", type=float, default=0.9,
                   help="correlated regime: share of training images whose texture is digit mod 4")
    p.add_argument("--plot", default="purified_demo.png",
                   help="PNG of the learning curves (default purified_demo.png; '' for none)")
    p.add_argument("--table", default=None, help="also write the table to this text file")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> dict:
    torch.set_num_threads(max(1, args.threads))
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    sizes = sorted(set(args.sizes) | {args.default_size})
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if args.k < 1:
        raise SystemExit("--k must be >= 1")
    jobs = [(r, n, s, a) for r in regimes for n in sizes for s in range(args.seeds) for a in ARMS]
    results = {r: {n: {a: [] for a in ARMS} for n in sizes} for r in regimes}
    start = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="demo runs", unit="run", file=sys.stderr)
    for regime, n, seed, arm in jobs:
        acc = run_one(arm, regime, n, seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      irrelevant_weight=args.irrelevant_weight, rho=args.rho, device=args.device,
                      schedule=args.schedule, detach_irrelevant=not args.no_detach,
                      variant=args.variant, k=args.k, balance_irrelevant=not args.no_balance)
        results[regime][n][arm].append(acc)
        if bar is not None:
            bar.set_postfix(regime=regime, n=n)
            bar.update()
    if bar is not None:
        bar.close()
        sys.stderr.flush()
    wall = time.perf_counter() - start
    return {"regimes": regimes, "sizes": sizes, "results": results, "wall_s": wall}


def report(args, out: dict) -> str:
    regimes, sizes, results = out["regimes"], out["sizes"], out["results"]
    text = [format_table(results, sizes)]
    for regime in regimes:
        row = results[regime][args.default_size]
        c = compare(row["plain"], row["purified"])
        verdict = "BEATS" if c["beats_by_2se"] else "does NOT beat"
        text.append(f"[{regime}] n={args.default_size}: purified - plain = {c['diff']:+.4f} "
                    f"(SE {c['se']:.4f}, paired SE {c['se_paired']:.4f}); PurifiedLearning {verdict} "
                    f"the plain network by more than 2 SE over {args.seeds} seeds")
    text.append(f"wall time: {out['wall_s']:.1f} s")
    return "\n".join(text)


def main(args) -> int:
    # all of them up front: a missing plotting package must not end a run of minutes at its end
    require_extra("demo", "sklearn", "tqdm", "matplotlib", purpose="purified-ops demo")
    out = run(args)
    text = report(args, out)
    print(text, flush=True)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(out["results"], out["sizes"], args.plot, default_size=args.default_size)
        print(f"plot: {args.plot}", flush=True)
    if args.json:
        head = out["regimes"][0]
        row = out["results"][head][args.default_size]
        obj = {
            "regime": head, "default_size": args.default_size, "seeds": args.seeds,
            "variant": args.variant, "k": args.k if args.variant == "subspace" else None,
            "schedule": args.schedule, "balanced": not args.no_balance,
            "baseline_acc": row["plain"], "purified_acc": row["purified"],
            "multitask_acc": row["multitask"], **compare(row["plain"], row["purified"]),
            "by_regime": {r: {str(n): out["results"][r][n] for n in out["sizes"]} for r in out["regimes"]},
            "wall_s": out["wall_s"], "plot": args.plot or None,
        }
        print(json.dumps(obj), flush=True)
    return 0
