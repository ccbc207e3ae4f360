"""The demo's data: scikit-learn's digits, their fixed splits, and the nuisances added to them
(textures and gratings), for the training, validation, test and nuisance-pool images."""
from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = [
    "textures", "add_nuisance", "grating_basis", "add_grating", "grating_span", "load_data",
    "load_validation", "load_nuisance_pool", "REGIMES", "N_TEXTURES", "DIGITS", "TEST_SIZE",
    "POOL_SIZE", "SPLIT_SEED", "TEST_NUISANCE_SEED", "NUISANCES", "GRATING_ORIENTATIONS",
    "GRATING_FREQUENCIES", "GRATING_AMPLITUDE", "GRATING_CLASSES", "PIXELS", "VALIDATION_SIZE",
    "NUISANCE_POOL_MAX", "NO_TASK_LABEL",
]

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
PIXELS = 64                  # an 8x8 image: no subspace of it has more directions



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


def _validation_draw(n_train: int, seed: int, size: int = VALIDATION_SIZE):
    """(images, digits, the validation indices, the rest of the pool, the draw's rng)."""
    images, target, _, rest, _, _ = _split(n_train, seed)
    rng = np.random.default_rng([seed, n_train, size])
    return images, target, rng.choice(rest, size=min(size, len(rest)), replace=False), rest, rng


def load_validation(n_train: int, seed: int, size: int = VALIDATION_SIZE, *, nuisance: str = "texture"):
    """(x, y, irrelevant): ``size`` pool images outside the seed's training set, nuisance uniform.

    The set used to choose the purified variant (docs/demo.md); it never touches the test images.
    """
    _check_nuisance(nuisance)
    images, target, idx, _, rng = _validation_draw(n_train, seed, size)
    return _nuisance_set(images, target, idx, rng, False, 0.0, nuisance)


NUISANCE_POOL_MAX = 10 * POOL_SIZE   # past the distinct images left, the pool repeats digits (load_nuisance_pool)
NO_TASK_LABEL = -1                   # a pool image's task label: unknown (learning.fit's stage1_data)


def load_nuisance_pool(n_train: int, seed: int, regime: str, size: int, *, rho: float = 0.9,
                       nuisance: str = "grating"):
    """(x, irrelevant): ``size`` images that carry only their nuisance labels, no digit label.

    Drawn from the images outside the seed's training set, its validation images and the test set
    (``1000 - n_train - 300`` of them), with the nuisance of the regime's own rule: in the
    correlated regime the orientation (texture) follows the digit with probability ``rho``, as in
    the training set. Where ``size`` exceeds the images left, the draw cycles through them again,
    each time with a fresh nuisance (same digit, another grating). The digits are used to draw the
    nuisance only; they are not returned.
    """
    _check_nuisance(nuisance)
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    images, target, idx, rng = _pool_draw(n_train, seed, size)
    x, _, labels = _nuisance_set(images, target, idx, rng, regime == "correlated", rho, nuisance)
    return x, labels


def _pool_draw(n_train: int, seed: int, size: int):
    """(images, digits, the nuisance pool's indices, the draw's rng)."""
    images, target, validation, rest, _ = _validation_draw(n_train, seed)
    rng = np.random.default_rng([seed, n_train, 0])     # key 0: no validation draw has size 0
    left = np.setdiff1d(rest, validation)
    if size > 0 and len(left) == 0:
        raise ValueError(f"no images left for a nuisance pool beside {n_train} training images")
    return images, target, np.resize(rng.permutation(left), size), rng
