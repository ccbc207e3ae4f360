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
  subspace``, the default): a :class:`~purified_ops.recipe.learning.LowRankProbe` learns K = 16
  directions of pixel space from which a small MLP must predict the texture label; a
  ``PurifyLayer`` removes that subspace (one set of directions shared by all samples) from every
  image before the same main encoder and task head. Two stages: the probe learns the texture
  first, with its loss balanced against the digit (``fit(balance_irrelevant=True)``, so that it
  cannot learn digits where the texture follows the digit), then it is frozen and the network
  learns the task; ``--schedule joint --no-balance`` trains both together, unbalanced.
  ``--variant per_sample`` is the per-sample form: a task-irrelevant encoder of the main encoder's
  architecture gives each sample one direction in main-feature space, which is removed from its
  main features.

``--nuisance grating`` swaps the texture for a sinusoidal grating (8 orientations x 3 frequencies,
random phase; the labels are orientation and frequency; correlated: orientation = ``digit mod 8``),
whose subspace changes from image to image. Its arms: plain, multitask, ``shared`` (the subspace
arm above), ``per_sample`` (a :class:`~purified_ops.recipe.learning.ClassSubspaceBank`: two directions per
orientation-frequency class learned from the labels; each image is purified against its most
probable classes' subspaces), and two oracle reference rows that know the true gratings.

The variants were chosen on a validation split carved from the training pool (:func:`load_validation`,
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

from .. import _cli_types as arg
from .._extras import require_extra
from ..layer import PurifyLayer
from .learning import (ClassSubspaceBank, InputPurifiedNet, LowRankProbe, MarginalLogits, PurifiedNet,
                       SplitLogits, UnpurifiedNet, evaluate, fit)

ARMS = ("plain", "multitask", "purified")
# The grating regime's arms: "shared" is the texture's subspace arm (K directions shared by all
# samples), "per_sample" a ClassSubspaceBank (each image's own predicted grating subspace); the
# oracles are the plain network on images purified against the true subspaces (reference rows).
GRATING_ARMS = ("plain", "multitask", "shared", "per_sample", "oracle_shared", "oracle_per_sample")
PURIFIED_ARMS = ("purified", "shared", "per_sample")
ORACLE_ARMS = ("oracle_shared", "oracle_per_sample")
BANK_K = 2                   # directions per grating class of the per-sample arm
BANK_TOP = 2                 # most probable classes whose subspaces the per-sample arm removes (validation)
VARIANTS = ("subspace", "per_sample")
SUBSPACE_K = 16              # directions of pixel space removed by the subspace variant
REGIMES = ("correlated", "independent")
N_TEXTURES = 4
DIGITS = 1797                # images in scikit-learn's digits
TEST_SIZE = 797
POOL_SIZE = DIGITS - TEST_SIZE  # the training pool: the largest training set
SPLIT_SEED = 20210222        # the fixed train-pool / test split
TEST_NUISANCE_SEED = 777     # the test set's nuisance (independent of the digit)
NUISANCES = ("texture", "grating")
GRATING_ORIENTATIONS = 8                  # multiples of 22.5 degrees
GRATING_FREQUENCIES = (0.9, 1.4, 2.0)     # cycles per image
GRATING_AMPLITUDE = (0.3, 0.6)
GRATING_CLASSES = (GRATING_ORIENTATIONS, len(GRATING_FREQUENCIES))   # the two irrelevant label types


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


def grating_basis(orientation, frequency, size: int = 8, dtype=np.float32) -> np.ndarray:
    """The 2-D subspace of each grating class: ``[N, 2, size * size]``, its cosine and sine patterns.

    ``orientation`` (0-7, multiples of 22.5 degrees) and ``frequency`` (0-2, an index into
    ``GRATING_FREQUENCIES``, cycles per image) are arrays of class ids; a grating of that class at
    any phase is ``cos(phase) * cosine - sin(phase) * sine``, so it lies in their span.
    """
    orientation, frequency = np.asarray(orientation), np.asarray(frequency)
    theta = orientation * (np.pi / GRATING_ORIENTATIONS)
    omega = 2 * np.pi * np.asarray(GRATING_FREQUENCIES)[frequency] / size
    c = np.arange(size) - (size - 1) / 2                                    # centred pixel coordinates
    i, j = np.meshgrid(c, c, indexing="ij")
    arg = omega[:, None, None] * (np.cos(theta)[:, None, None] * i + np.sin(theta)[:, None, None] * j)
    return np.stack([np.cos(arg), np.sin(arg)], 1).reshape(len(arg), 2, size * size).astype(dtype)


def add_grating(images: np.ndarray, digits: np.ndarray, rng: np.random.Generator, *,
                correlated: bool, rho: float, amplitude=GRATING_AMPLITUDE):
    """Adds a sinusoidal grating to each image; returns (images [N, 64], labels [N, 2]).

    The labels are the grating's orientation (0-7) and frequency (0-2); the phase is uniform and
    the amplitude uniform in ``amplitude``. Correlated: orientation = ``digit mod 8`` with
    probability ``rho``; the frequency is always independent of the digit.
    """
    n = len(digits)
    orientation = rng.integers(0, GRATING_ORIENTATIONS, size=n)
    if correlated:
        orientation = np.where(rng.random(n) < rho, digits % GRATING_ORIENTATIONS, orientation)
    frequency = rng.integers(0, len(GRATING_FREQUENCIES), size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    amp = rng.uniform(*amplitude, size=n)
    basis = grating_basis(orientation, frequency, images.shape[-1])            # [N, 2, 64]
    coef = np.stack([np.cos(phase), -np.sin(phase)], 1) * amp[:, None]         # [N, 2]
    out = images.reshape(n, -1) + np.einsum("nk,nkd->nd", coef, basis)
    return out.astype(np.float32), np.stack([orientation, frequency], 1).astype(np.int64)


def grating_span(size: int = 8, tol: float = 0.02) -> np.ndarray:
    """An orthonormal basis ``[R, size * size]`` of the span of every grating class.

    The 48 patterns are independent but ill-conditioned on an 8x8 grid (singular values down to
    2e-6 of the largest); ``tol`` keeps the directions above that share of the largest singular
    value: R = 32 by default (every grating keeps less than 5% of its norm outside them), 48 for
    ``tol=0``.
    """
    o, f = np.meshgrid(np.arange(GRATING_ORIENTATIONS), np.arange(len(GRATING_FREQUENCIES)), indexing="ij")
    patterns = grating_basis(o.ravel(), f.ravel(), size, np.float64).reshape(-1, size * size)
    _, s, vt = np.linalg.svd(patterns, full_matrices=False)
    return vt[s > tol * s[0]].astype(np.float32)


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


def _nuisance_set(images, target, idx, rng, correlated: bool, rho: float, nuisance: str = "texture"):
    add = add_nuisance if nuisance == "texture" else add_grating
    x, labels = add(images[idx], target[idx], rng, correlated=correlated, rho=rho)
    return torch.from_numpy(x), torch.from_numpy(target[idx]), torch.from_numpy(labels)


def _check_nuisance(nuisance: str) -> None:
    if nuisance not in NUISANCES:
        raise ValueError(f"nuisance must be one of {NUISANCES}, got {nuisance!r}")


def load_data(n_train: int, seed: int, regime: str, *, rho: float = 0.9, nuisance: str = "texture"):
    """((x, y, irrelevant) train, (x, y, irrelevant) test) as torch tensors; x is [N, 64].

    ``irrelevant`` is the texture id ``[N]``, or for gratings ``[N, 2]``: (orientation, frequency).
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    _check_nuisance(nuisance)
    images, target, test_idx, _, train_idx, rng = _split(n_train, seed)
    train = _nuisance_set(images, target, train_idx, rng, regime == "correlated", rho, nuisance)
    test = _nuisance_set(images, target, test_idx, np.random.default_rng(TEST_NUISANCE_SEED), False, rho,
                         nuisance)
    return train, test


def load_validation(n_train: int, seed: int, size: int = VALIDATION_SIZE, *, nuisance: str = "texture"):
    """(x, y, irrelevant): ``size`` pool images outside the seed's training set, nuisance uniform.

    The set used to choose the purified variant (docs/demo.md); it never touches the test images.
    """
    _check_nuisance(nuisance)
    images, target, _, rest, _, _ = _split(n_train, seed)
    rng = np.random.default_rng([seed, n_train, size])
    return _nuisance_set(images, target, rng.choice(rest, size=min(size, len(rest)), replace=False),
                         rng, False, 0.0, nuisance)


# ----------------------------------------------------------------------------------------------
# Networks and arms
# ----------------------------------------------------------------------------------------------

def encoder(hidden: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, dim))


def _irrelevant_logits(dim: int, nuisance: str) -> nn.Module:
    """The last layer of an irrelevant head: the texture's 4 logits, or the grating's 8 + 3."""
    if nuisance == "texture":
        return nn.Linear(dim, N_TEXTURES)
    return nn.Sequential(nn.Linear(dim, sum(GRATING_CLASSES)), SplitLogits(GRATING_CLASSES))


def build_arm(arm: str, seed: int, *, hidden: int = 128, dim: int = 32,
              detach_irrelevant: bool = True, variant: str = "subspace", k: int = SUBSPACE_K,
              nuisance: str = "texture", bank_k: int = BANK_K, hard: bool = True,
              bank_top: int = BANK_TOP) -> UnpurifiedNet | PurifiedNet | InputPurifiedNet:
    """The arms; the main encoder and task head get the same initial weights in all of them.

    ``variant`` picks the texture's purified arm: ``"subspace"`` purifies the input pixels against
    ``k`` learned directions shared by all samples; ``"per_sample"`` purifies the main features
    against one direction per sample from a separate task-irrelevant encoder. With gratings,
    ``"shared"`` is the subspace arm and ``"per_sample"`` purifies each image against the
    ``bank_k`` directions of its predicted grating class (:class:`ClassSubspaceBank`; ``hard``:
    the top-1 class at eval). The oracle arms are the plain network (their purification is of the
    data, :func:`oracle_purified`).
    """
    _check_nuisance(nuisance)
    torch.manual_seed(seed)
    main, task_head = encoder(hidden, dim), nn.Linear(dim, 10)
    if arm in ("plain", "multitask") or arm in ORACLE_ARMS:
        # The network alone; multitask puts the irrelevant head on its features.
        return UnpurifiedNet(main, task_head, _irrelevant_logits(dim, nuisance))
    arms = ARMS if nuisance == "texture" else GRATING_ARMS
    if arm not in arms or arm not in PURIFIED_ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {arms}")
    if arm == "per_sample":
        # input -> PurifyLayer(input, z) -> main encoder -> task head; z [B, bank_k, 64] is the
        # predicted class's subspace, the bank learned only from orientation and frequency labels.
        bank = ClassSubspaceBank(64, math.prod(GRATING_CLASSES), bank_k, hard=hard, top=bank_top)
        return InputPurifiedNet(main, bank, task_head, MarginalLogits(GRATING_CLASSES),
                                detach_irrelevant=detach_irrelevant)
    if arm == "shared" or variant == "subspace":
        # input -> PurifyLayer(input, P) -> main encoder -> task head; P [k, 64] is shared by all
        # samples and learned (with the probe MLP) only from the irrelevant labels.
        probe = LowRankProbe(64, k)
        irrelevant_head = nn.Sequential(nn.Linear(k, dim), nn.ReLU(), _irrelevant_logits(dim, nuisance))
        return InputPurifiedNet(main, probe, task_head, irrelevant_head, detach_irrelevant=detach_irrelevant)
    if variant == "per_sample":
        irrelevant_head = nn.Linear(dim, N_TEXTURES)
        irrelevant = encoder(hidden, dim)
        return PurifiedNet(main, irrelevant, task_head, irrelevant_head, detach_irrelevant=detach_irrelevant)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def oracle_purified(data, arm: str):
    """``data`` (x, y, grating labels) with x purified against the true grating subspaces.

    ``"oracle_per_sample"``: each image against its own 2-D grating subspace (it knows the true
    orientation and frequency); ``"oracle_shared"``: every image against the span of all gratings.
    """
    x, y, labels = data
    if arm == "oracle_per_sample":
        z = torch.from_numpy(grating_basis(labels[:, 0].numpy(), labels[:, 1].numpy()))   # [N, 2, 64]
    elif arm == "oracle_shared":
        z = torch.from_numpy(grating_span())[None]                                       # [1, R, 64]
    else:
        raise ValueError(f"unknown oracle {arm!r}; expected one of {ORACLE_ARMS}")
    with torch.no_grad():
        return PurifyLayer()(x, z), y, labels


def run_one(arm: str, regime: str, n_train: int, seed: int, *, steps: int, batch_size: int,
            lr: float, irrelevant_weight: float, rho: float, device=None, schedule: str = "joint",
            detach_irrelevant: bool = True, variant: str = "subspace", k: int = SUBSPACE_K,
            balance_irrelevant: bool = False, evaluate_on: str = "test", nuisance: str = "texture",
            bank_k: int = BANK_K, hard: bool = True, bank_init: str = "moments",
            stage1_steps: int | None = None, bank_top: int = BANK_TOP) -> float:
    """Trains one arm and returns its task accuracy on the test set (or ``"validation"``)."""
    train, test = load_data(n_train, seed, regime, rho=rho, nuisance=nuisance)
    if evaluate_on == "validation":
        test = load_validation(n_train, seed, nuisance=nuisance)
    elif evaluate_on != "test":
        raise ValueError(f"evaluate_on must be 'test' or 'validation', got {evaluate_on!r}")
    if arm in ORACLE_ARMS:
        if nuisance != "grating":
            raise ValueError("the oracle arms are for the grating nuisance")
        train, test = oracle_purified(train, arm), oracle_purified(test, arm)
    model = build_arm(arm, seed, detach_irrelevant=detach_irrelevant, variant=variant, k=k,
                      nuisance=nuisance, bank_k=bank_k, hard=hard, bank_top=bank_top)
    if arm == "per_sample" and bank_init == "moments":
        model.irrelevant_encoder.init_from_moments(train[0], model.irrelevant_head.joint(train[2]),
                                                   train[1] if balance_irrelevant else None)
    learns_irrelevant = arm == "multitask" or arm in PURIFIED_ARMS
    epochs = max(1, math.ceil(steps / math.ceil(n_train / batch_size)))  # >= steps optimizer steps
    fit(model, train, epochs=epochs, lr=lr, batch_size=batch_size,
        irrelevant_weight=irrelevant_weight if learns_irrelevant else 0.0, seed=seed, device=device,
        schedule=schedule if arm in PURIFIED_ARMS else "joint", progress=False,
        balance_irrelevant=balance_irrelevant and learns_irrelevant,
        stage1_epochs=None if stage1_steps is None else math.ceil(stage1_steps / math.ceil(n_train / batch_size)))
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


def format_table(results: dict, sizes, arms=ARMS, comparisons=(("purified", "plain"),)) -> str:
    """One block per regime: each arm's mean +- std, then each ``(arm, baseline)`` difference."""
    lines = []
    for regime, by_size in results.items():
        lines.append(f"regime: {regime}  (test accuracy, mean +- std over seeds)")
        header = (f"{'n_train':>8} " + " ".join(f"{a:>17}" for a in arms)
                  + "".join(f" {a + '-' + b:>22}" for a, b in comparisons))
        lines.append(header)
        for n in sizes:
            row = by_size[n]
            cells = " ".join(f"{np.mean(row[a]):>9.4f} +- {_std(row[a]):.4f}" for a in arms)
            diffs = "".join(f" {c['diff']:>+10.4f} (SE {c['se']:.4f})"
                            for c in (compare(row[b], row[a]) for a, b in comparisons))
            lines.append(f"{n:>8} {cells}{diffs}")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, sizes, path: str, *, default_size=None, arms=ARMS, nuisance: str = "texture") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, (regime, by_size) in zip(axes[0], results.items()):
        for arm, marker in zip(arms, "osD^vx"):
            means = np.array([np.mean(by_size[n][arm]) for n in sizes])
            stds = np.array([_std(by_size[n][arm]) for n in sizes])
            oracle = arm in ORACLE_ARMS          # reference rows: they know the true nuisance
            ax.plot(sizes, means, marker=marker, ls="--" if oracle else "-",
                    label=arm.removeprefix("oracle_").replace("_", " ") + (" (oracle)" if oracle else ""))
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
        ax.set_title(f"digits + {nuisance} nuisance: {regime}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nuisance", choices=NUISANCES, default="texture",
                   help="texture: one of 4 background textures (default); grating: a sinusoidal "
                        "grating, 8 orientations x 3 frequencies, per-sample purification's regime")
    p.add_argument("--regime", choices=(*REGIMES, "both"), default="both",
                   help="nuisance independent of the digit, correlated in training only, or both "
                        "(default; the JSON's headline lists are for the first: correlated)")
    size = arg.integer(1, POOL_SIZE)
    p.add_argument("--sizes", type=size, nargs="+", default=[50, 100, 200, 400],
                   help=f"training-set sizes of the learning curve, 1 to {POOL_SIZE} (default: 50 100 200 400)")
    p.add_argument("--default-size", type=size, default=100,
                   help="the size the verdict and the JSON's accuracy lists are for (default 100)")
    p.add_argument("--seeds", type=arg.integer(1), default=5, help="seeds per arm and size (default 5)")
    p.add_argument("--steps", type=arg.integer(1), default=500, help="optimizer steps per run (default 500)")
    p.add_argument("--batch-size", type=arg.integer(1), default=32)
    p.add_argument("--lr", type=arg.real(0, open_lo=True), default=1e-3)
    p.add_argument("--irrelevant-weight", type=arg.real(0), default=1.0)
    p.add_argument("--variant", choices=VARIANTS, default="subspace",
                   help="texture's purified arm: subspace purification of the input against K learned "
                        "directions shared by all samples (default), or one direction per sample in "
                        "feature space")
    p.add_argument("--k", type=arg.integer(1), default=SUBSPACE_K,
                   help=f"directions of the subspace variant and of the grating's shared arm (default {SUBSPACE_K})")
    p.add_argument("--bank-k", type=arg.integer(1), default=BANK_K,
                   help=f"grating's per-sample arm: directions per grating class (default {BANK_K})")
    p.add_argument("--bank-top", type=arg.integer(1, math.prod(GRATING_CLASSES)), default=BANK_TOP,
                   help=f"grating's per-sample arm: z stacks the subspaces of this many most probable "
                        f"classes (default {BANK_TOP})")
    p.add_argument("--bank-init", choices=("moments", "random"), default="moments",
                   help="grating's per-sample arm: class subspaces start from each class's excess second "
                        "moment (default) or at random, then learn the labels")
    p.add_argument("--soft", action="store_true",
                   help="grating's per-sample arm: z mixes the class subspaces by their predicted "
                        "probabilities at test time too (default: the top-1 class's)")
    p.add_argument("--schedule", choices=("joint", "two_stage"), default="two_stage",
                   help="purified arm: the irrelevant branch first, then frozen (default), or joint training")
    p.add_argument("--no-balance", action="store_true",
                   help="do not balance the irrelevant loss against the digit (by default each sample's "
                        "irrelevant loss is weighted so that texture and digit are independent in the "
                        "weighted training set; learning.balancing_tables)")
    p.add_argument("--no-detach", action="store_true",
                   help="purified arm: let the task loss reach the irrelevant encoder through z")
    p.add_argument("--rho", type=arg.real(0, 1), default=0.9,
                   help="correlated regime: share of training images whose texture is digit mod 4")
    p.add_argument("--plot", type=_plot_file, default="purified_demo.png",
                   help="PNG of the learning curves (default purified_demo.png; '' for none; its folder must exist)")
    p.add_argument("--table", type=arg.output_file, default=None,
                   help="also write the table to this text file (its folder must exist)")
    p.add_argument("--threads", type=arg.integer(1), default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--jobs", type=arg.integer(1), default=None,
                   help="runs in parallel, each in its own process (default: on the CPU, the available "
                        "CPUs divided by --threads; else 1); the results do not depend on it")
    p.add_argument("--device", type=arg.device("cpu", "cuda", "cuda:N", "auto"), default="cpu",
                   help="cpu (default), cuda (or cuda:N), or auto")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _plot_file(text: str) -> str:
    return text if text == "" else arg.output_file(text)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs, options: dict, *, workers: int = 1, threads: int = 1, on_done=None) -> list:
    """``run_one(arm, regime, n, seed, **options)`` for each ``(regime, n, seed, arm)`` of ``jobs``.

    Returns the accuracies in the order of ``jobs``. Every run seeds itself, so a run's result
    does not depend on which process runs it or when: ``workers > 1`` runs them in that many
    spawned processes (each with ``threads`` torch threads) and gives the same list as one
    process. ``on_done(job)`` is called as each run finishes, in the order they finish.
    """
    jobs = list(jobs)
    accs = [None] * len(jobs)
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for i, (regime, n, seed, arm) in enumerate(jobs):
                accs[i] = run_one(arm, regime, n, seed, **options)
                if on_done is not None:
                    on_done(jobs[i])
        finally:
            torch.set_num_threads(previous)
        return accs
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child of a process whose OpenMP pool has started can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        index = {pool.submit(run_one, arm, regime, n, seed, **options): i
                 for i, (regime, n, seed, arm) in enumerate(jobs)}
        for future in as_completed(index):
            i = index[future]
            accs[i] = future.result()
            if on_done is not None:
                on_done(jobs[i])
    return accs


def run(args) -> dict:
    """The runs of the command line's arguments (checked by add_arguments' types)."""
    threads = args.threads
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    sizes = sorted(set(args.sizes) | {args.default_size})
    workers = args.jobs if args.jobs is not None else default_jobs(args.device, threads)
    arms = demo_arms(args.nuisance)
    jobs = [(r, n, s, a) for r in regimes for n in sizes for s in range(args.seeds) for a in arms]
    options = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   irrelevant_weight=args.irrelevant_weight, rho=args.rho, device=args.device,
                   schedule=args.schedule, detach_irrelevant=not args.no_detach,
                   variant=args.variant, k=args.k, balance_irrelevant=not args.no_balance,
                   nuisance=args.nuisance, bank_k=args.bank_k, hard=not args.soft,
                   bank_init=args.bank_init, bank_top=args.bank_top)
    start = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc=f"demo runs ({args.nuisance})", unit="run", file=sys.stderr)

    def advance(job):
        bar.set_postfix(regime=job[0], n=job[1])
        bar.update()

    accs = run_jobs(jobs, options, workers=workers, threads=threads, on_done=None if bar is None else advance)
    if bar is not None:
        bar.close()
        sys.stderr.flush()
    wall = time.perf_counter() - start
    results = {r: {n: {a: [] for a in arms} for n in sizes} for r in regimes}
    for (regime, n, _, arm), acc in zip(jobs, accs):      # job order: seeds in order in each list
        results[regime][n][arm].append(acc)
    return {"regimes": regimes, "sizes": sizes, "results": results, "wall_s": wall, "jobs": workers}


def default_jobs(device: str, threads: int = 1) -> int:
    """Worker processes by default: one per available CPU (``threads`` each) on the CPU, else one."""
    if device != "cpu":
        return 1
    return max(1, available_cpus() // max(1, threads))


def demo_arms(nuisance: str):
    return ARMS if nuisance == "texture" else GRATING_ARMS


GRATING_GOAL = 0.10     # the per-sample arm's target margin over plain at the default size


def grating_verdict(row: dict) -> dict:
    """The per-sample arm against plain (by >= GRATING_GOAL and > 2 SE) and against the shared arm."""
    vs_plain, vs_shared = compare(row["plain"], row["per_sample"]), compare(row["shared"], row["per_sample"])
    return {"vs_plain": vs_plain, "vs_shared": vs_shared,
            "goal_met": bool(vs_plain["diff"] >= GRATING_GOAL and vs_plain["beats_by_2se"]
                             and vs_shared["beats_by_2se"])}


def report(args, out: dict) -> str:
    regimes, sizes, results = out["regimes"], out["sizes"], out["results"]
    if args.nuisance == "grating":
        text = [format_table(results, sizes, GRATING_ARMS,
                             (("per_sample", "plain"), ("per_sample", "shared"))),
                "(oracle_*: reference rows that know each image's true grating; not learned)"]
        for regime in regimes:
            v = grating_verdict(results[regime][args.default_size])
            p, s = v["vs_plain"], v["vs_shared"]
            text.append(f"[{regime}] n={args.default_size}: per_sample - plain = {p['diff']:+.4f} (SE {p['se']:.4f}), "
                        f"per_sample - shared = {s['diff']:+.4f} (SE {s['se']:.4f}); the goal (>= "
                        f"{GRATING_GOAL:.2f} and > 2 SE over plain, > 2 SE over shared, {args.seeds} seeds) is "
                        f"{'MET' if v['goal_met'] else 'NOT met'}")
        text.append(f"wall time: {out['wall_s']:.1f} s (--jobs {out['jobs']})")
        return "\n".join(text)
    text = [format_table(results, sizes)]
    for regime in regimes:
        row = results[regime][args.default_size]
        c = compare(row["plain"], row["purified"])
        verdict = "BEATS" if c["beats_by_2se"] else "does NOT beat"
        text.append(f"[{regime}] n={args.default_size}: purified - plain = {c['diff']:+.4f} "
                    f"(SE {c['se']:.4f}, paired SE {c['se_paired']:.4f}); PurifiedLearning {verdict} "
                    f"the plain network by more than 2 SE over {args.seeds} seeds")
    text.append(f"wall time: {out['wall_s']:.1f} s (--jobs {out['jobs']})")
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
        plot(out["results"], out["sizes"], args.plot, default_size=args.default_size,
             arms=demo_arms(args.nuisance), nuisance=args.nuisance)
        print(f"plot: {args.plot}", flush=True)
    if args.json and args.nuisance == "grating":
        head = out["regimes"][0]
        row = out["results"][head][args.default_size]
        v = grating_verdict(row)
        obj = {
            "nuisance": "grating", "regime": head, "default_size": args.default_size, "seeds": args.seeds,
            "k_shared": args.k, "bank_k": args.bank_k, "bank_top": args.bank_top, "bank_init": args.bank_init,
            "hard": not args.soft,
            "schedule": args.schedule, "balanced": not args.no_balance,
            "baseline_acc": row["plain"], "purified_acc": row["per_sample"],
            **{f"{a}_acc": row[a] for a in GRATING_ARMS if a not in ("plain", "per_sample")},
            **v["vs_plain"], "vs_shared": v["vs_shared"], "goal_met": v["goal_met"],
            "goal_met_by_regime": {r: grating_verdict(out["results"][r][args.default_size])["goal_met"]
                                   for r in out["regimes"]},
            "by_regime": {r: {str(n): out["results"][r][n] for n in out["sizes"]} for r in out["regimes"]},
            "wall_s": out["wall_s"], "jobs": out["jobs"], "plot": args.plot or None,
        }
        print(json.dumps(obj), flush=True)
    elif args.json:
        head = out["regimes"][0]
        row = out["results"][head][args.default_size]
        obj = {
            "regime": head, "default_size": args.default_size, "seeds": args.seeds,
            "variant": args.variant, "k": args.k if args.variant == "subspace" else None,
            "schedule": args.schedule, "balanced": not args.no_balance,
            "baseline_acc": row["plain"], "purified_acc": row["purified"],
            "multitask_acc": row["multitask"], **compare(row["plain"], row["purified"]),
            "by_regime": {r: {str(n): out["results"][r][n] for n in out["sizes"]} for r in out["regimes"]},
            "wall_s": out["wall_s"], "jobs": out["jobs"], "plot": args.plot or None,
        }
        print(json.dumps(obj), flush=True)
    return 0
