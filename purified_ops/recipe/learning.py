"""The PurifiedLearning recipe (arXiv 2102.10955) around your own networks.

A main encoder gives task features ``x``; a task-irrelevant encoder, trained on task-irrelevant
labels through an irrelevant head, gives irrelevant features ``z`` (one direction per sample, or K
of them). A :class:`~purified_ops.PurifyLayer` removes from ``x`` its projection onto ``z`` and the
task head sees only the rest::

    input ──► [backbone] ──► main_encoder ──► x ──► PurifyLayer(x, z) ──► task_head ──► task logits
                        └──► irrelevant_encoder ──► z ──┘
                                                    └──► irrelevant_head ──► irrelevant logits

    loss = CE(task logits, y) + irrelevant_weight * CE(irrelevant logits, y_irrelevant)

That is :class:`PurifiedNet`. Its optional ``backbone`` is shared by both branches
(``h = backbone(input)``); without it both encoders read the input. With
``backbone=my_encoder``, ``main_encoder=nn.Identity()`` and a small ``irrelevant_encoder`` the
irrelevant branch is a head on the main features. :class:`InputPurifiedNet` purifies the input
instead, before the whole network (``input -> PurifyLayer(input, z) -> network -> task_head``),
and :class:`UnpurifiedNet` is the baseline: a network with a task head and an irrelevant head on
its features, nothing purified.

Training is joint (one loss, all parameters) or two-stage (:func:`fit` with
``schedule="two_stage"``: the irrelevant branch, plus the backbone if any, first learns the
irrelevant labels alone; then the irrelevant branch is frozen and the rest learns the task
through the purification).

Only the public API of :mod:`purified_ops` is used here.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layer import PurifyLayer

__all__ = [
    "PurifiedNet", "InputPurifiedNet", "UnpurifiedNet", "PurifiedOutput",
    "PerDirectionHeads", "LowRankProbe", "ClassSubspaceBank", "SplitLogits", "MarginalLogits", "purified_loss",
    "freeze_irrelevant", "balancing_tables", "balancing_weights",
    "fit", "evaluate", "seed_everything", "choose_device",
]


@dataclass
class PurifiedOutput:
    """What the recipe's networks (:class:`PurifiedNet`, :class:`InputPurifiedNet`,
    :class:`UnpurifiedNet`) return."""

    task_logits: torch.Tensor          # [B, num_classes]
    irrelevant_logits: object          # a tensor, or a list of tensors (one per irrelevant label type)
    features: torch.Tensor             # x, what the purify layer takes: main features, or the input
    irrelevant_features: torch.Tensor  # z, [B, D] or [B, K, D]; unpurified: the features the irrelevant head read
    purified: torch.Tensor             # x purified (unpurified: x itself)


class PerDirectionHeads(nn.Module):
    """K irrelevant label types, one direction each: head ``k`` classifies ``z[:, k]``.

    For an irrelevant encoder that emits ``[B, K, D]``; returns a list of K logits tensors.
    """

    def __init__(self, dim: int, num_classes: Sequence[int]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, int(c)) for c in num_classes)

    def forward(self, z: torch.Tensor):
        if z.dim() != 3 or z.shape[1] != len(self.heads):
            raise ValueError(f"PerDirectionHeads: expected z of shape [B, {len(self.heads)}, D], "
                             f"got {tuple(z.shape)}")
        return [head(z[:, k]) for k, head in enumerate(self.heads)]


class LowRankProbe(nn.Module):
    """K learned directions shared by all samples: subspace purification (INLP/LEACE-like).

    Holds ``P`` (``[K, D]``). ``forward(h)`` returns ``(P[None], h @ P.T)``: the directions the
    network purifies against (one set, broadcast to every sample, never materialized
    per sample) and the sample's K coordinates along them, which the irrelevant head reads.
    Trained on the irrelevant labels, ``P`` must span a subspace from which the irrelevant label
    can be predicted; purification then removes that whole subspace from the features.

    Args:
        dim: D, the dimension of the features that are purified.
        k: K, the number of directions.
        detach_input: the irrelevant loss does not reach what produced ``h`` (with a shared
            ``backbone``, the probe observes the features without shaping them).
    """

    def __init__(self, dim: int, k: int, *, detach_input: bool = False):
        super().__init__()
        self.directions = nn.Parameter(torch.empty(int(k), int(dim)))
        nn.init.orthogonal_(self.directions)
        self.detach_input = bool(detach_input)

    def forward(self, h: torch.Tensor):
        coords = (h.detach() if self.detach_input else h) @ self.directions.t()
        return self.directions.unsqueeze(0), coords


class ClassSubspaceBank(nn.Module):
    """K learned directions per class of an irrelevant label: per-sample purification.

    Holds a bank ``[C, K, D]``, one K-dimensional subspace per class, and scores each class by
    the energy of the sample in its subspace, ``logit_c(h) = ||bank_c h||^2 + bias_c``. Trained
    with cross-entropy on the irrelevant labels, each class's subspace must take up the energy
    that tells that class apart: for an additive nuisance whose classes live in their own
    subspaces (a grating of given orientation and frequency at any phase spans two dimensions),
    the bank learns them from labels alone. ``forward(h)`` returns ``(z, logits)``: ``z``
    (``[B, K, D]``) is the predicted class's subspace, the one the network purifies each
    sample against, and ``logits`` (``[B, C]``) go to the irrelevant head.

    Args:
        dim: D, the dimension of the features that are purified.
        num_classes: C; for several label types, their product (the joint class), with
            :class:`MarginalLogits` as the irrelevant head.
        k: K, directions per class.
        hard: in eval mode (also when frozen by :func:`freeze_irrelevant`) ``z`` is the subspace
            of the top-1 class; in training, and always when False, it is the class subspaces
            weighted by the predicted probabilities.
        top: with ``hard``, ``z`` stacks the subspaces of the ``top`` most probable classes
            (``[B, top * K, D]``), which covers a nuisance whose class is mistaken for a neighbour.
    """

    def __init__(self, dim: int, num_classes: int, k: int = 2, *, hard: bool = True, top: int = 1):
        super().__init__()
        if not 1 <= int(top) <= int(num_classes):
            raise ValueError(f"ClassSubspaceBank: top must be in [1, {num_classes}], got {top}")
        self.top = int(top)
        self.bank = nn.Parameter(torch.empty(int(num_classes), int(k), int(dim)))
        with torch.no_grad():      # orthonormal rows (as far as C * K <= D allows): distinct starts
            self.bank.copy_(nn.init.orthogonal_(torch.empty(int(num_classes) * int(k), int(dim)))
                            .reshape(self.bank.shape))
        self.bias = nn.Parameter(torch.zeros(int(num_classes)))
        self.hard = bool(hard)

    @torch.no_grad()
    def init_from_moments(self, h: torch.Tensor, labels: torch.Tensor, task_labels=None) -> None:
        """Sets each class's directions to the top-K eigenvectors of its excess second moment.

        ``E[h h^T | class c] - E[h h^T]``: the directions where class c's samples carry more
        energy than the rest, which for an additive nuisance is where it lies. A class without
        samples keeps its directions. ``labels`` are class ids ``[N]`` (the joint class for
        several label types, :meth:`MarginalLogits.joint`). With ``task_labels``, each sample
        first loses its task class's mean, so that where the irrelevant label follows the task
        label the task's mean patterns do not pass for the nuisance. Any grouping serves: without
        task labels, ``labels`` themselves (each sample loses its own class's mean, which holds the
        task's mean patterns and, given enough samples per class, little of a zero-mean nuisance).
        """
        h, labels = h.reshape(len(h), -1).double(), labels.reshape(-1).long()
        if len(h) != len(labels) or h.shape[1] != self.bank.shape[2]:
            raise ValueError(f"init_from_moments: h {tuple(h.shape)} and labels {tuple(labels.shape)} "
                             f"do not match the bank {tuple(self.bank.shape)}")
        if task_labels is not None:
            task_labels = task_labels.reshape(-1).long()
            if len(task_labels) != len(h):
                raise ValueError(f"init_from_moments: {len(task_labels)} task labels for {len(h)} samples")
            means = torch.zeros(int(task_labels.max()) + 1, h.shape[1], dtype=h.dtype).index_add_(0, task_labels, h)
            means /= torch.bincount(task_labels, minlength=len(means)).clamp_min(1)[:, None].to(h.dtype)
            h = h - means[task_labels]
        pooled = h.T @ h / len(h)
        k = self.bank.shape[1]
        for c in labels.unique().tolist():
            if not 0 <= c < self.bank.shape[0]:
                raise ValueError(f"init_from_moments: class {c} outside [0, {self.bank.shape[0]})")
            hc = h[labels == c]
            _, vecs = torch.linalg.eigh(hc.T @ hc / len(hc) - pooled)
            self.bank[c] = vecs[:, -k:].T.flip(0).to(self.bank.dtype)

    def energies(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, C]``: the energy of each sample in each class's subspace, plus the class bias."""
        return torch.einsum("bd,ckd->bck", h, self.bank).square().sum(-1) + self.bias

    def forward(self, h: torch.Tensor):
        if h.dim() != 2 or h.shape[1] != self.bank.shape[2]:
            raise ValueError(f"ClassSubspaceBank: expected h of shape [B, {self.bank.shape[2]}], "
                             f"got {tuple(h.shape)}")
        logits = self.energies(h)
        if self.hard and not self.training:
            z = self.bank[logits.topk(self.top, -1).indices].flatten(1, 2)
        else:
            z = torch.einsum("bc,ckd->bkd", logits.softmax(-1), self.bank)
        return z, logits


class SplitLogits(nn.Module):
    """One logits tensor ``[B, sum(sizes)]`` -> a list, one ``[B, size]`` per irrelevant label type."""

    def __init__(self, sizes: Sequence[int]):
        super().__init__()
        self.sizes = tuple(int(c) for c in sizes)

    def forward(self, logits: torch.Tensor):
        if logits.shape[-1] != sum(self.sizes):
            raise ValueError(f"SplitLogits: expected {sum(self.sizes)} logits, got {logits.shape[-1]}")
        return list(logits.split(self.sizes, -1))


class MarginalLogits(nn.Module):
    """Joint logits over several label types ``[B, prod(shape)]`` -> one log-marginal per type.

    The joint class of labels ``(a, b, ...)`` is their row-major index in ``shape``; each type's
    log-marginal is the logsumexp over the other types, so softmax of it is the marginal of the
    joint softmax and cross-entropy against each label trains the joint classifier.
    """

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(c) for c in shape)

    def joint(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels ``[N, T]`` (one column per type) -> joint class ids ``[N]``."""
        if labels.dim() != 2 or labels.shape[1] != len(self.shape):
            raise ValueError(f"MarginalLogits.joint: expected labels [N, {len(self.shape)}], got {tuple(labels.shape)}")
        out = torch.zeros_like(labels[:, 0])
        for t, size in enumerate(self.shape):
            out = out * size + labels[:, t]
        return out

    def forward(self, joint: torch.Tensor):
        if joint.shape[-1] != math.prod(self.shape):
            raise ValueError(f"MarginalLogits: expected {math.prod(self.shape)} joint logits, "
                             f"got {joint.shape[-1]}")
        j = joint.reshape(*joint.shape[:-1], *self.shape)
        lead = joint.dim() - 1
        return [j.logsumexp([lead + a for a in range(len(self.shape)) if a != t]) if len(self.shape) > 1 else j
                for t in range(len(self.shape))]


class _RecipeNet(nn.Module):
    """What :func:`fit`, :func:`evaluate` and :func:`freeze_irrelevant` use of the recipe's networks.

    ``forward(inputs)`` returns a :class:`PurifiedOutput`; ``irrelevant_modules()`` is the
    irrelevant branch (frozen in the second stage); ``backbone`` is what both branches share
    (None when nothing is), which the first stage trains with the irrelevant branch.
    """

    def irrelevant_parameters(self):
        """The irrelevant branch's parameters (:meth:`irrelevant_modules`)."""
        for module in self.irrelevant_modules():
            yield from module.parameters()


def _irrelevant_features(encoded, x: torch.Tensor, owner: str):
    """``(z, r)`` from what an irrelevant encoder returned (``z``, or the pair), ``z`` checked
    against the features ``x`` it purifies: ``[..., D]`` or ``[..., K, D]`` with x's D."""
    z, r = encoded if isinstance(encoded, tuple) else (encoded, encoded)
    if z.dim() not in (x.dim(), x.dim() + 1) or z.shape[-1] != x.shape[-1]:
        raise ValueError(f"{owner}: irrelevant features z {tuple(z.shape)} must be [..., D] or "
                         f"[..., K, D] with the purified features' D; they are {tuple(x.shape)}")
    return z, r


class UnpurifiedNet(_RecipeNet):
    """A network with a task head and an irrelevant head on its features; nothing is purified.

    The baselines: trained on the task loss alone it is the plain network; with the irrelevant
    loss too, multitask learning. ``network`` is shared by both heads (it is the ``backbone``
    :func:`fit`'s first stage trains with the irrelevant head).

    Args:
        network: ``input -> x``, the features both heads read.
        task_head: ``x`` -> task logits.
        irrelevant_head: ``x`` -> irrelevant logits (a tensor, or a list for several label types).
    """

    def __init__(self, network: nn.Module, task_head: nn.Module, irrelevant_head: nn.Module):
        super().__init__()
        self.network = network
        self.task_head = task_head
        self.irrelevant_head = irrelevant_head

    @property
    def backbone(self) -> nn.Module:
        return self.network

    def irrelevant_modules(self):
        return (self.irrelevant_head,)

    def forward(self, inputs: torch.Tensor) -> PurifiedOutput:
        x = self.network(inputs)
        return PurifiedOutput(self.task_head(x), self.irrelevant_head(x), x, x, x)


class _PurifyingNet(_RecipeNet):
    """What :class:`PurifiedNet` and :class:`InputPurifiedNet` share: the irrelevant branch
    (encoder and head), the task head, and the :class:`PurifyLayer` between them."""

    def __init__(self, irrelevant_encoder: nn.Module, task_head: nn.Module, irrelevant_head: nn.Module, *,
                 strength: float, learnable_strength: bool, eps: float, detach_irrelevant: bool):
        super().__init__()
        self.irrelevant_encoder = irrelevant_encoder
        self.task_head = task_head
        self.irrelevant_head = irrelevant_head
        self.purifier = PurifyLayer(strength, learnable_strength=learnable_strength, eps=eps,
                                    detach_irrelevant=detach_irrelevant)

    def irrelevant_modules(self):
        return (self.irrelevant_encoder, self.irrelevant_head)


class PurifiedNet(_PurifyingNet):
    """Purification of features: main encoder, task-irrelevant encoder and heads, with a
    :class:`PurifyLayer` between the main encoder and the task head.

    Args:
        main_encoder: ``h -> x``, features ``[B, D]`` (or any ``[B, ..., D]`` the task head takes).
        irrelevant_encoder: ``h -> z``, ``[B, D]`` (one direction per sample) or ``[B, K, D]``
            (``[1, K, D]``: K directions shared by all samples). It may also return a pair
            ``(z, r)``: ``z`` is purified against and ``r`` goes to the irrelevant head (e.g.
            :class:`LowRankProbe`).
        task_head: purified features -> task logits.
        irrelevant_head: ``z`` (or ``r``) -> irrelevant logits (a tensor, or a list for several label types,
            e.g. :class:`PerDirectionHeads`).
        backbone: optional module shared by both branches; ``h = backbone(input)``, else the input.
        strength, learnable_strength, eps, detach_irrelevant: passed to :class:`PurifyLayer`.
            ``detach_irrelevant=True`` keeps the task loss out of the irrelevant branch.
    """

    def __init__(self, main_encoder: nn.Module, irrelevant_encoder: nn.Module, task_head: nn.Module,
                 irrelevant_head: nn.Module, *, backbone: nn.Module | None = None,
                 strength: float = 1.0, learnable_strength: bool = False, eps: float = 1e-6,
                 detach_irrelevant: bool = False):
        super().__init__(irrelevant_encoder, task_head, irrelevant_head, strength=strength,
                         learnable_strength=learnable_strength, eps=eps, detach_irrelevant=detach_irrelevant)
        self.backbone = backbone
        self.main_encoder = main_encoder

    def forward(self, inputs: torch.Tensor) -> PurifiedOutput:
        h = self.backbone(inputs) if self.backbone is not None else inputs
        x = self.main_encoder(h)
        z, r = _irrelevant_features(self.irrelevant_encoder(h), x, "PurifiedNet")
        purified = self.purifier(x, z)
        return PurifiedOutput(self.task_head(purified), self.irrelevant_head(r), x, z, purified)


class InputPurifiedNet(_PurifyingNet):
    """Purification of the input: a :class:`PurifyLayer` before the whole network.

    ``input -> PurifyLayer(input, z) -> network -> task_head``, with ``z`` from the
    task-irrelevant encoder on the input (e.g. :class:`LowRankProbe` or
    :class:`ClassSubspaceBank`, whose second output goes to the irrelevant head). The output's
    ``features`` are the input, ``purified`` the purified input.

    Args:
        network: purified input -> features ``x``.
        irrelevant_encoder: ``input -> z`` or ``(z, r)``, as in :class:`PurifiedNet`, with the
            input's D.
        task_head: ``x`` -> task logits.
        irrelevant_head: ``z`` (or ``r``) -> irrelevant logits.
        strength, learnable_strength, eps, detach_irrelevant: passed to :class:`PurifyLayer`.
    """

    def __init__(self, network: nn.Module, irrelevant_encoder: nn.Module, task_head: nn.Module,
                 irrelevant_head: nn.Module, *, strength: float = 1.0, learnable_strength: bool = False,
                 eps: float = 1e-6, detach_irrelevant: bool = False):
        super().__init__(irrelevant_encoder, task_head, irrelevant_head, strength=strength,
                         learnable_strength=learnable_strength, eps=eps, detach_irrelevant=detach_irrelevant)
        self.network = network

    @property
    def backbone(self) -> None:
        return None                 # the irrelevant encoder reads the input itself

    def forward(self, inputs: torch.Tensor) -> PurifiedOutput:
        z, r = _irrelevant_features(self.irrelevant_encoder(inputs), inputs, "InputPurifiedNet")
        purified = self.purifier(inputs, z)
        return PurifiedOutput(self.task_head(self.network(purified)), self.irrelevant_head(r), inputs, z, purified)


# The networks fit, evaluate and freeze_irrelevant take.
RecipeNet = PurifiedNet | InputPurifiedNet | UnpurifiedNet


def _irrelevant_label_list(irrelevant_labels):
    """One label tensor per type: [B] is one type, [B, T] is T types, a list is as given."""
    if isinstance(irrelevant_labels, torch.Tensor):
        return [irrelevant_labels] if irrelevant_labels.dim() == 1 else list(irrelevant_labels.unbind(-1))
    return list(irrelevant_labels)


def _as_list(logits, labels):
    if isinstance(logits, torch.Tensor):
        logits = [logits]
    logits, labels = list(logits), _irrelevant_label_list(labels)
    if len(logits) != len(labels):
        raise ValueError(f"purified_loss: {len(logits)} irrelevant logits for {len(labels)} label types")
    return logits, labels


def purified_loss(out: PurifiedOutput, target: torch.Tensor, irrelevant_target=None, *,
                  irrelevant_weight: float = 1.0, task_weight: float = 1.0,
                  irrelevant_sample_weight=None):
    """``task_weight * CE(task) + irrelevant_weight * mean over label types of CE(irrelevant)``.

    ``irrelevant_target``: ``[B]`` for one label type, ``[B, T]`` or a list of T tensors for T
    types (matching the irrelevant head's list of logits). ``irrelevant_sample_weight``: optional
    per-sample weights of the irrelevant CE, ``[B]`` or ``[B, T]`` (e.g. from
    :func:`balancing_weights`); each type's CE is then ``sum(w * ce) / sum(w)``. With
    ``task_weight=0`` the task labels are not read (a sample without one may carry -1). Returns
    ``(loss, parts)`` with the two terms, detached, in ``parts``.
    """
    # task_weight 0 (a first stage): no task term, so samples without a task label (-1) may take part
    task = F.cross_entropy(out.task_logits, target) if task_weight != 0 else out.task_logits.new_zeros(())
    irr = task.new_zeros(())
    if irrelevant_target is not None and irrelevant_weight != 0:
        logits, labels = _as_list(out.irrelevant_logits, irrelevant_target)
        if irrelevant_sample_weight is None:
            irr = sum(F.cross_entropy(l, t) for l, t in zip(logits, labels)) / len(logits)
        else:
            _, weights = _as_list(logits, irrelevant_sample_weight)
            irr = sum((w * F.cross_entropy(l, t, reduction="none")).sum() / w.sum().clamp_min(1e-12)
                      for l, t, w in zip(logits, labels, weights)) / len(logits)
    loss = task_weight * task + irrelevant_weight * irr
    return loss, {"task": float(task.detach()), "irrelevant": float(irr.detach())}


def freeze_irrelevant(model: RecipeNet, frozen: bool = True) -> None:
    """Freezes (or unfreezes) the irrelevant branch (encoder and head): no grads, eval mode."""
    for p in model.irrelevant_parameters():
        p.requires_grad_(not frozen)
        if frozen:
            p.grad = None
    for m in model.irrelevant_modules():
        m.train(not frozen)


def balancing_tables(task_labels: torch.Tensor, irrelevant_labels) -> list:
    """Weight tables ``w[y, t] = n_y * n_t / (N * n_yt)``, one per irrelevant label type.

    Weighted by them, the training set's joint counts become ``n_y * n_t / N``: each irrelevant
    label is independent of the task label, so an irrelevant branch cannot lower its loss by
    learning the task (a shortcut where the two labels correlate in a small training set). That
    holds exactly where every (task, irrelevant) cell has a sample; a cell with none stays empty
    (weight 0 in the table).
    """
    task_labels = task_labels.reshape(-1).long()
    tables = []
    for t in _irrelevant_label_list(irrelevant_labels):
        t = t.reshape(-1).long()
        if t.shape != task_labels.shape:
            raise ValueError(f"balancing_tables: {t.numel()} irrelevant labels for {task_labels.numel()} task labels")
        ny, nt = int(task_labels.max()) + 1, int(t.max()) + 1
        joint = torch.zeros(ny, nt, dtype=torch.float64)
        joint.index_put_((task_labels.cpu(), t.cpu()), torch.ones(t.numel(), dtype=torch.float64), accumulate=True)
        expected = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True) / task_labels.numel()
        tables.append(torch.where(joint > 0, expected / joint.clamp_min(1), 0.0).float())
    return tables


def balancing_weights(task_labels: torch.Tensor, irrelevant_labels, tables=None) -> torch.Tensor:
    """Per-sample weights ``[N]`` (one label type) or ``[N, T]`` from :func:`balancing_tables`.

    A sample without a task label (-1: only its irrelevant labels are known) cannot be balanced and
    gets weight 1."""
    labels = _irrelevant_label_list(irrelevant_labels)
    tables = balancing_tables(task_labels, labels) if tables is None else tables
    y = task_labels.long()
    cols = []
    for tab, t in zip(tables, labels):
        tab, t = tab.to(t.device), t.long()                     # a no-op when fit has moved them
        inside = (y < tab.shape[0]) & (t < tab.shape[1])        # labels unseen when counting: weight 0
        looked_up = tab[y.clamp(0, tab.shape[0] - 1), t.clamp_max(tab.shape[1] - 1)]
        cols.append(torch.where(y < 0, 1.0, torch.where(inside, looked_up, 0.0)))
    return cols[0] if isinstance(irrelevant_labels, torch.Tensor) and irrelevant_labels.dim() == 1 else torch.stack(cols, -1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def choose_device(device=None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batches(data, batch_size: int, shuffle: bool, generator: torch.Generator | None, sample_weight=None):
    """Quadruples (inputs, task labels, irrelevant labels or None, the batch's rows of
    ``sample_weight`` or None) from tensors or an iterable (``sample_weight`` only for tensors)."""
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and isinstance(data[0], torch.Tensor):
        inputs, target = data[0], data[1]
        irr = data[2] if len(data) == 3 else None
        n = inputs.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield (inputs[idx], target[idx], (irr[idx] if irr is not None else None),
                   (sample_weight[idx] if sample_weight is not None else None))
    else:
        if sample_weight is not None:
            raise ValueError("_batches: per-sample weights need the data as tensors")
        for batch in data:
            yield batch[0], batch[1], (batch[2] if len(batch) > 2 else None), None


def _to(t, device):
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return t.to(device)
    return [x.to(device) for x in t]


def _train_epochs(model, data, params, epochs, *, lr, weight_decay, batch_size, device, generator,
                  task_weight, irrelevant_weight, progress, desc, balance_tables=None, balance_weights=None):
    # balance_weights: the per-sample weights of tensor data, looked up once; balance_tables
    # serve an iterable's batches. Without an irrelevant loss there is nothing to weight.
    weighted = balance_tables is not None and irrelevant_weight != 0
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
    history = []
    bar = _progress(range(epochs), progress, desc)
    for _ in bar:
        total, parts_sum, n = 0.0, {"task": 0.0, "irrelevant": 0.0}, 0
        for inputs, target, irr, sample_weight in _batches(data, batch_size, True, generator,
                                                           balance_weights if weighted else None):
            inputs, target, irr = inputs.to(device), target.to(device), _to(irr, device)
            out = model(inputs)
            if not weighted or irr is None:
                sample_weight = None
            elif sample_weight is not None:
                sample_weight = sample_weight.to(device)
            else:
                sample_weight = balancing_weights(target, irr, balance_tables)
            loss, parts = purified_loss(out, target, irr, irrelevant_weight=irrelevant_weight,
                                        task_weight=task_weight, irrelevant_sample_weight=sample_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = inputs.shape[0]
            total += float(loss.detach()) * b
            parts_sum = {k: parts_sum[k] + parts[k] * b for k in parts_sum}
            n += b
        record = {"loss": total / max(n, 1), **{k: v / max(n, 1) for k, v in parts_sum.items()}}
        history.append(record)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{record['loss']:.3f}")
    return history


def _progress(iterable, progress, desc):
    if not progress:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False)


def _is_labelled_tensors(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 3 and isinstance(data[0], torch.Tensor)


def fit(model: RecipeNet, data, *, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 0.0,
        batch_size: int = 64, irrelevant_weight: float = 1.0, schedule: str = "joint",
        stage1_epochs: int | None = None, device=None, seed: int | None = None,
        progress: bool = True, balance_irrelevant: bool = False, stage1_data=None) -> dict:
    """Trains ``model`` with Adam on ``data`` and returns the per-epoch losses.

    Args:
        data: ``(inputs, task_labels, irrelevant_labels)`` tensors (shuffled into batches of
            ``batch_size``), or an iterable of such triples (e.g. a ``DataLoader``).
        irrelevant_weight: the irrelevant loss's weight; 0 trains the task alone.
        schedule: ``"joint"``, or ``"two_stage"``: ``stage1_epochs`` (default ``epochs``) on the
            irrelevant loss alone, then the irrelevant branch frozen and ``epochs`` on the task loss.
        device: ``"auto"``/``None`` (CUDA if available), or any torch device.
        seed: seeds Python, NumPy and torch (init is the caller's; this seeds batch order).
        balance_irrelevant: weight the irrelevant loss per sample (:func:`balancing_tables`,
            counted over ``data`` once) so that the irrelevant labels are independent of the task
            labels: where they correlate in the training set, the irrelevant branch would
            otherwise learn task directions, and purification would remove them.
        stage1_data: with ``"two_stage"``, what the first stage trains on instead of ``data``:
            tensors ``(inputs, task_labels, irrelevant_labels)`` in which a sample known only by
            its irrelevant labels has task label -1 (e.g. a pool of images that carry only
            nuisance labels, plus the task-labelled ones); the second stage trains on ``data``.
            Balancing counts the samples with a task label; the others weigh 1.
    Returns:
        ``{"stage1": [...], "stage2": [...]}`` for two stages, ``{"joint": [...]}`` otherwise.
    """
    if schedule not in ("joint", "two_stage"):
        raise ValueError(f"fit: schedule must be 'joint' or 'two_stage', got {schedule!r}")
    if seed is not None:
        seed_everything(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
    device = choose_device(device)
    model.to(device).train()
    if stage1_data is not None and (schedule != "two_stage" or not _is_labelled_tensors(stage1_data)):
        raise ValueError("fit: stage1_data needs schedule='two_stage' and tensors (inputs, task labels, "
                         "irrelevant labels)")
    # the data the irrelevant loss is weighted on: the first stage's (the second has none)
    irrelevant_data = data if stage1_data is None else stage1_data
    tables = weights = None
    if balance_irrelevant:
        labelled = [(b[1], b[2]) for b in _batches(irrelevant_data, 1 << 30, False, None) if b[2] is not None]
        if not labelled:
            raise ValueError("fit: balance_irrelevant=True needs irrelevant labels in the data")
        y = torch.cat([y for y, _ in labelled])
        irr = [torch.cat(ts)[y >= 0] for ts in zip(*(_irrelevant_label_list(t) for _, t in labelled))]
        tables = balancing_tables(y[y >= 0], irr)
        if _is_labelled_tensors(irrelevant_data):
            # tensors: every sample's weight looked up once; the batches take their rows
            weights = balancing_weights(irrelevant_data[1], irrelevant_data[2], tables)
        # counted once, moved to the device once: the training loop only looks weights up
        tables = [t.to(device) for t in tables]
    common = dict(lr=lr, weight_decay=weight_decay, batch_size=batch_size, device=device,
                  generator=generator, progress=progress, balance_tables=tables, balance_weights=weights)
    if schedule == "joint":
        return {"joint": _train_epochs(model, data, model.parameters(), epochs, task_weight=1.0,
                                       irrelevant_weight=irrelevant_weight, desc="train", **common)}
    # Stage 1: the irrelevant branch (and a shared backbone) on the irrelevant labels alone.
    stage1_params = list(model.irrelevant_parameters())
    if model.backbone is not None:
        stage1_params += list(model.backbone.parameters())
    h1 = _train_epochs(model, irrelevant_data, stage1_params, stage1_epochs if stage1_epochs is not None else epochs,
                       task_weight=0.0, irrelevant_weight=1.0, desc="stage 1", **common)
    # Stage 2: irrelevant branch frozen; the rest learns the task through the purification.
    freeze_irrelevant(model)
    h2 = _train_epochs(model, data, model.parameters(), epochs, task_weight=1.0, irrelevant_weight=0.0,
                       desc="stage 2", **common)
    return {"stage1": h1, "stage2": h2}


@torch.no_grad()
def evaluate(model: RecipeNet, data, *, batch_size: int = 1024, device=None) -> dict:
    """Task accuracy (and irrelevant accuracy per label type, when labels are given) on ``data``."""
    device = choose_device(device)
    was_training = model.training
    model.to(device).eval()
    correct, irr_correct, n = 0, None, 0
    for inputs, target, irr, _ in _batches(data, batch_size, False, None):
        inputs, target = inputs.to(device), target.to(device)
        out = model(inputs)
        correct += int((out.task_logits.argmax(-1) == target).sum())
        if irr is not None:
            logits, labels = _as_list(out.irrelevant_logits, _to(irr, device))
            hits = [int((l.argmax(-1) == t).sum()) for l, t in zip(logits, labels)]
            irr_correct = hits if irr_correct is None else [a + b for a, b in zip(irr_correct, hits)]
        n += inputs.shape[0]
    model.train(was_training)
    result = {"task_acc": correct / max(n, 1)}
    if irr_correct is not None:
        result["irrelevant_acc"] = [c / max(n, 1) for c in irr_correct]
    return result
