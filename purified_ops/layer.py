"""PurifyLayer: the purification op as an ``nn.Module``."""
from __future__ import annotations

import torch
from torch import nn

from ._validate import check_eps, check_strength, check_tensor
from .ops import purify

__all__ = ["PurifyLayer"]


class PurifyLayer(nn.Module):
    r"""Purifies features by removing their projection onto task-irrelevant directions.

    For each feature vector :math:`x \in \mathbb{R}^D` and that sample's task-irrelevant
    directions :math:`Z \in \mathbb{R}^{K \times D}` (PurifiedLearning, arXiv 2102.10955):

    .. math::
        y = x - s\, Z^\top (Z Z^\top + \varepsilon I)^{-1} Z x

    With :math:`s = 1` the output is orthogonal to every direction of :math:`Z`; with
    :math:`K = 1` this is FP-Net's orthogonal projection
    :math:`y = x - s\,\frac{x \cdot z}{z \cdot z + \varepsilon} z`.

    Args:
        strength: :math:`s`, the share of the projection removed (default 1).
        learnable_strength: make :math:`s` a parameter trained with the model.
        eps: :math:`\varepsilon > 0`, regularizes the Gram matrix (zero or dependent directions
            stay finite).
        detach_irrelevant: stop the gradient to ``z``, so the task loss does not shape the
            task-irrelevant branch.
        dim: the feature dim of ``x``. ``-1`` for ``[..., D]`` features; ``1`` for NCHW maps.

    Shape:
        - x: :math:`(*, D)` for ``dim=-1``; for another ``dim``, any shape with the features
          at ``dim``, e.g. :math:`(B, C, H, W)` for ``dim=1``.
        - z: for ``dim=-1``, :math:`(*, D)` (one direction) or :math:`(*, K, D)`, each leading
          dim equal to x's or 1. For another ``dim``, one set per position of x's dims before
          ``dim``: :math:`(B, C)` or :math:`(B, K, C)` for NCHW, shared by all pixels.
        - Output: x's shape, in the promoted dtype of x and z.

    Example::

        >>> layer = PurifyLayer()
        >>> x = torch.randn(8, 16, 64)            # 8 samples, 16 tokens, 64 features
        >>> z = torch.randn(8, 1, 64)             # one irrelevant direction per sample
        >>> y = layer(x, z)
        >>> torch.allclose((y * z).sum(-1), torch.zeros(8, 16), atol=1e-4)
        True
        >>> maps = PurifyLayer(dim=1)(torch.randn(8, 32, 7, 7), torch.randn(8, 3, 32))
    """

    def __init__(self, strength: float = 1.0, *, learnable_strength: bool = False, eps: float = 1e-6,
                 detach_irrelevant: bool = False, dim: int = -1):
        super().__init__()
        check_strength(strength)
        if isinstance(strength, torch.Tensor) and strength.device.type == "meta":
            raise ValueError("PurifyLayer: strength must hold a value, got a meta tensor")
        self.eps = check_eps(eps)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"PurifyLayer: dim must be an int, got {type(dim).__name__}")
        self.learnable_strength = bool(learnable_strength)
        self.detach_irrelevant = bool(detach_irrelevant)
        self.dim = dim
        if self.learnable_strength:
            self.strength = nn.Parameter(torch.as_tensor(strength, dtype=torch.float32).detach().clone())
        else:
            self.strength = float(strength)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x)
        check_tensor("z", z)
        if self.detach_irrelevant:
            z = z.detach()
        dim = self.dim + x.dim() if self.dim < 0 else self.dim
        if dim == x.dim() - 1:  # features last: purify's checks cover the rest
            return purify(x, z, strength=self.strength, eps=self.eps)
        if not 0 <= dim < x.dim():
            raise ValueError(f"PurifyLayer: dim={self.dim} is out of range for x of shape {tuple(x.shape)}")
        # Features at `dim`: z holds x's dims before `dim`, then optionally K, then the features.
        if z.dim() not in (dim + 1, dim + 2):
            raise ValueError(
                f"PurifyLayer(dim={self.dim}): z must be x's dims before dim, optionally K, then the "
                f"{x.shape[dim]} features (e.g. [B, C] or [B, K, C] for NCHW); got x {tuple(x.shape)} "
                f"and z {tuple(z.shape)}")
        trailing = x.dim() - dim - 1
        z_rows = z.reshape(*z.shape[:dim], *([1] * trailing), *z.shape[dim:])
        y = purify(x.movedim(dim, -1), z_rows, strength=self.strength, eps=self.eps)
        return y.movedim(-1, dim)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: say what works instead of a compiler error deep in
        # the checks.
        raise RuntimeError("PurifyLayer does not support torch.jit.script: its checks and its autograd.Function "
                           "are Python. torch.jit.trace, torch.compile and torch.export support it.")

    def extra_repr(self) -> str:
        s = float(self.strength.detach()) if self.learnable_strength else self.strength
        return (f"strength={s}, learnable_strength={self.learnable_strength}, eps={self.eps}, "
                f"detach_irrelevant={self.detach_irrelevant}, dim={self.dim}")
