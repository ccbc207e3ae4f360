"""The demo's arms: the networks of each arm (:func:`build_arm`) and how one run trains and
scores one of them (:func:`run_one`), with the nuisance pool and the cross-fitted bank."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...layer import PurifyLayer
from ..learning import (ClassSubspaceBank, InputPurifiedNet, LowRankProbe, MarginalLogits, PurifiedNet,
                        SplitLogits, UnpurifiedNet, choose_device, evaluate, fit)
from .data import (GRATING_CLASSES, N_TEXTURES, NO_TASK_LABEL, _check_nuisance, grating_basis, grating_span,
                   load_data, load_nuisance_pool, load_validation)

__all__ = [
    "encoder", "build_arm", "oracle_purified", "run_one", "demo_arms", "ARMS", "GRATING_ARMS",
    "PURIFIED_ARMS", "ORACLE_ARMS", "BANK_K", "BANK_TOP", "VARIANTS", "SUBSPACE_K", "POOL_LABELS",
    "BANK_CENTRINGS",
]

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


POOL_LABELS = ("none", "pseudo")      # the pool's digits: unknown, or the plain network's predictions
BANK_CENTRINGS = ("digit", "nuisance_class")


def _stage1_data(train, pool, pool_digits):
    """The nuisance branch's training set: the training images, then the pool's (task label -1
    where unknown)."""
    x, labels = pool
    return (torch.cat([train[0], x]), torch.cat([train[1], pool_digits]), torch.cat([train[2], labels]))


@torch.no_grad()
def _predict(model, x, device=None) -> torch.Tensor:
    device = choose_device(device)
    model.to(device).eval()
    return model(x.to(device)).task_logits.argmax(-1).cpu()


def _fit_irrelevant_branch(model, data, *, steps, batch_size, lr, irrelevant_weight, seed, device,
                           balance_irrelevant, bank_init, bank_centring, stage1_data=None, stage1_steps=None,
                           fit_stage2=True):
    """Stage 1 (the bank's moment init, then the nuisance labels' loss) and, with ``fit_stage2``,
    stage 2 on ``data``; the first stage reads ``stage1_data`` where given."""
    nuisance_data = data if stage1_data is None else stage1_data
    if isinstance(model.irrelevant_encoder, ClassSubspaceBank) and bank_init == "moments":
        joint = model.irrelevant_head.joint(nuisance_data[2])
        centre = None
        if balance_irrelevant:       # the task's (or the nuisance class's) mean patterns are not the nuisance
            centre = nuisance_data[1] if bank_centring == "digit" else joint
            if bool((centre < 0).any()):
                raise ValueError("digit centring needs a digit label (or a pseudo-label) on every image")
        model.irrelevant_encoder.init_from_moments(nuisance_data[0], joint, centre)
    # >= steps optimizer steps in each stage, whatever the size of its data
    epochs = max(1, math.ceil(steps / math.ceil(len(data[0]) / batch_size)))
    stage1_epochs = math.ceil((steps if stage1_steps is None else stage1_steps)
                              / math.ceil(len(nuisance_data[0]) / batch_size))
    fit(model, data, epochs=epochs if fit_stage2 else 0, lr=lr, batch_size=batch_size,
        irrelevant_weight=irrelevant_weight, seed=seed, device=device, schedule="two_stage", progress=False,
        balance_irrelevant=balance_irrelevant, stage1_epochs=stage1_epochs, stage1_data=stage1_data)


@torch.no_grad()
def _bank_purified(model, x, device=None) -> torch.Tensor:
    """``x`` purified as ``model`` (frozen) purifies its input: against its predicted subspaces."""
    device = choose_device(device)
    model.to(device).eval()
    x = x.to(device)
    return model.purifier(x, model.irrelevant_encoder(x)[0]).cpu()   # the encoder returns (z, logits)


def run_one(arm: str, regime: str, n_train: int, seed: int, *, steps: int, batch_size: int,
            lr: float, irrelevant_weight: float, rho: float, device=None, schedule: str = "joint",
            detach_irrelevant: bool = True, variant: str = "subspace", k: int = SUBSPACE_K,
            balance_irrelevant: bool = False, evaluate_on: str = "test", nuisance: str = "texture",
            bank_k: int = BANK_K, hard: bool = True, bank_init: str = "moments",
            stage1_steps: int | None = None, bank_top: int = BANK_TOP, nuisance_pool: int = 0,
            pool_labels: str = "pseudo", bank_centring: str | None = None, cross_fit: int = 0) -> float:
    """Trains one arm and returns its task accuracy on the test set (or ``"validation"``).

    ``nuisance_pool``: the purified arms' nuisance branch (two-stage) also learns from that many
    images that carry only nuisance labels (:func:`load_nuisance_pool`); the main network sees
    only the ``n_train`` task-labelled images. ``pool_labels``: the pool's digits are the plain
    network's predictions (``"pseudo"``, chosen on validation) or unknown (``"none"``: its images
    weigh 1 in the balanced loss). ``bank_centring``: what the bank's moments are centred by, the digit's mean
    (``"digit"``, the default without a pool or with pseudo-labels) or the nuisance class's mean
    (``"nuisance_class"``, needs no digit label; the default with an unlabelled pool).
    ``cross_fit``: the per-sample arm's k folds (0: none; other arms ignore it): each training
    image is purified by a bank fitted without its fold, and the main network trains on those
    images (a variant of ``scripts/demo_validation.py``; validation did not choose it).
    """
    if pool_labels not in POOL_LABELS:
        raise ValueError(f"pool_labels must be one of {POOL_LABELS}, got {pool_labels!r}")
    if bank_centring is None:
        bank_centring = "nuisance_class" if nuisance_pool and pool_labels == "none" else "digit"
    if bank_centring not in BANK_CENTRINGS:
        raise ValueError(f"bank_centring must be one of {BANK_CENTRINGS}, got {bank_centring!r}")
    if cross_fit == 1 or cross_fit < 0:
        raise ValueError(f"cross_fit: 0 or >= 2 folds, got {cross_fit}")
    train, test = load_data(n_train, seed, regime, rho=rho, nuisance=nuisance)
    if evaluate_on == "validation":
        test = load_validation(n_train, seed, nuisance=nuisance)
    elif evaluate_on != "test":
        raise ValueError(f"evaluate_on must be 'test' or 'validation', got {evaluate_on!r}")
    if arm in ORACLE_ARMS:
        if nuisance != "grating":
            raise ValueError("the oracle arms are for the grating nuisance")
        train, test = oracle_purified(train, arm), oracle_purified(test, arm)
    common = dict(steps=steps, batch_size=batch_size, lr=lr, irrelevant_weight=irrelevant_weight, rho=rho,
                  device=device, detach_irrelevant=detach_irrelevant, variant=variant, k=k, nuisance=nuisance,
                  bank_k=bank_k, hard=hard, bank_top=bank_top)
    purified = arm in PURIFIED_ARMS
    stage1 = None
    if purified and nuisance_pool:
        if schedule != "two_stage":
            raise ValueError("a nuisance pool trains the nuisance branch first: schedule must be 'two_stage'")
        pool = load_nuisance_pool(n_train, seed, regime, nuisance_pool, rho=rho, nuisance=nuisance)
        if pool_labels == "pseudo":
            plain = build_arm("plain", seed, **_arm_options(common))
            _fit_plain(plain, train, common, seed)
            digits = _predict(plain, pool[0], device)
        else:
            digits = torch.full((nuisance_pool,), NO_TASK_LABEL, dtype=torch.long)
        stage1 = _stage1_data(train, pool, digits)
    model = build_arm(arm, seed, **_arm_options(common))
    if purified and schedule == "two_stage":
        branch = dict(steps=steps, batch_size=batch_size, lr=lr, irrelevant_weight=irrelevant_weight, seed=seed,
                      device=device, balance_irrelevant=balance_irrelevant, bank_init=bank_init, bank_centring=bank_centring,
                      stage1_data=stage1, stage1_steps=stage1_steps)
        if cross_fit and arm == "per_sample":
            return _cross_fitted(model, train, test, seed, cross_fit, branch, common)
        _fit_irrelevant_branch(model, train, **branch)
        return evaluate(model, test, device=device)["task_acc"]
    if arm == "per_sample" and bank_init == "moments":
        model.irrelevant_encoder.init_from_moments(train[0], model.irrelevant_head.joint(train[2]),
                                                   train[1] if balance_irrelevant else None)
    learns_irrelevant = arm == "multitask" or purified
    epochs = max(1, math.ceil(steps / math.ceil(n_train / batch_size)))  # >= steps optimizer steps
    fit(model, train, epochs=epochs, lr=lr, batch_size=batch_size,
        irrelevant_weight=irrelevant_weight if learns_irrelevant else 0.0, seed=seed, device=device,
        schedule=schedule if purified else "joint", progress=False,
        balance_irrelevant=balance_irrelevant and learns_irrelevant,
        stage1_epochs=None if stage1_steps is None else math.ceil(stage1_steps / math.ceil(n_train / batch_size)))
    return evaluate(model, test, device=device)["task_acc"]


def _arm_options(common: dict) -> dict:
    return {key: common[key] for key in ("detach_irrelevant", "variant", "k", "nuisance", "bank_k", "hard",
                                         "bank_top")}


def _fit_plain(model, train, common: dict, seed: int) -> None:
    """The plain arm's training: task loss only, the demo's steps."""
    epochs = max(1, math.ceil(common["steps"] / math.ceil(len(train[0]) / common["batch_size"])))
    fit(model, train, epochs=epochs, lr=common["lr"], batch_size=common["batch_size"], irrelevant_weight=0.0,
        seed=seed, device=common["device"], schedule="joint", progress=False)


def _cross_fitted(model, train, test, seed: int, folds: int, branch: dict, common: dict) -> float:
    """The per-sample arm with its bank cross-fitted: each training image purified by a bank fitted
    on the other folds, the main network (the plain arm's, same initial weights) trained on them,
    and the test images purified by the bank fitted on all training images."""
    x, y, labels = train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    purified_x = torch.empty_like(x)
    stage1 = branch["stage1_data"]
    for fold in order.tensor_split(folds):
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[fold] = False
        fold_train = (x[keep], y[keep], labels[keep])
        fold_stage1 = None if stage1 is None else tuple(
            torch.cat([t[:len(x)][keep], t[len(x):]]) for t in stage1)         # the pool stays in every fold
        fold_bank = build_arm("per_sample", seed, **_arm_options(common))
        _fit_irrelevant_branch(fold_bank, fold_train, **{**branch, "stage1_data": fold_stage1}, fit_stage2=False)
        purified_x[fold] = _bank_purified(fold_bank, x[fold], common["device"])
    _fit_irrelevant_branch(model, train, **branch, fit_stage2=False)
    main = build_arm("plain", seed, **_arm_options(common))
    _fit_plain(main, (purified_x, y, labels), common, seed)
    return evaluate(main, (_bank_purified(model, test[0], common["device"]), test[1], test[2]),
                    device=common["device"])["task_acc"]


def demo_arms(nuisance: str):
    return ARMS if nuisance == "texture" else GRATING_ARMS
