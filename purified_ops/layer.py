"""PurifyLayer: the purification op as an ``nn.Module``."""
from __future__ import annotations

import torch
from torch import nn

from ._input_checks import check_eps, check_strength, check_strength_range, check_tensor
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
        learnable_strength: make :math:`s` a parameter trained with the model, of shape ``[1]``
            (FSDP shards no 0-dim parameter; a state dict holding a 0-dim one still loads).
        eps: :math:`\varepsilon > 0`, regularizes the Gram matrix (zero or dependent directions
            stay finite).
        detach_irrelevant: stop the gradient to ``z``, so the task loss does not shape the
            task-irrelevant branch.
        dim: the feature dim of ``x``. ``-1`` for ``[..., D]`` features; ``1`` for NCHW maps.

    The state dict holds ``eps`` and a fixed strength too (float64 tensors), so a saved layer
    loads back to what was saved.

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
        strength = check_strength(strength)
        if isinstance(strength, torch.Tensor) and strength.device.type == "meta":
            raise ValueError("PurifyLayer: strength must hold a value, got a meta tensor")
        self.eps = check_eps(eps)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"PurifyLayer: dim must be an int, got {type(dim).__name__}")
        self.learnable_strength = bool(learnable_strength)
        self.detach_irrelevant = bool(detach_irrelevant)
        self.dim = dim
        if self.learnable_strength:
            if not isinstance(strength, torch.Tensor):
                check_strength_range(strength, self.STRENGTH_DTYPE)
            value = torch.as_tensor(strength, dtype=self.STRENGTH_DTYPE).detach().clone().reshape(1)
            self.strength = nn.Parameter(value)
        else:
            self.strength = float(strength)

    # A learnable strength is a float32 parameter, whatever the dtype of the features.
    STRENGTH_DTYPE = torch.float32

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # eps and a fixed strength as float64 tensors: state dicts stay all-tensor (safetensors,
        # DCP), and, not being buffers, they keep their value through model.to(dtype).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "eps"] = torch.tensor(self.eps, dtype=torch.float64)
        if not self.learnable_strength:
            destination[prefix + "strength"] = torch.tensor(self.strength, dtype=torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        eps_key, strength_key = prefix + "eps", prefix + "strength"
        if eps_key in state_dict:
            self.eps = check_eps(float(state_dict[eps_key]))
        if strength_key in state_dict and not self.learnable_strength:
            self.strength = float(check_strength(state_dict[strength_key]))
        elif self.learnable_strength and strength_key in state_dict and state_dict[strength_key].dim() == 0:
            # A learnable strength saved as a 0-dim parameter (before it became [1], for FSDP),
            # or a fixed one, loads into the [1] parameter.
            state_dict[strength_key] = state_dict[strength_key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in (eps_key, strength_key):  # read above; state dicts saved without them keep the constructor's
            if key in unexpected_keys:
                unexpected_keys.remove(key)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.detach_irrelevant and isinstance(z, torch.Tensor):
            z = z.detach()
        if self.dim == -1:  # features last: purify checks everything
            return purify(x, z, strength=self.strength, eps=self.eps)
        check_tensor("x", x)  # the layer reads the shapes first
        check_tensor("z", z)
        dim = self.dim + x.dim() if self.dim < 0 else self.dim
        if dim == x.dim() - 1:
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
        raise RuntimeError("PurifyLayer does not support torch.jit.script: its checks and the op's derivative "
                           "are Python. torch.jit.trace, torch.compile and torch.export support it.")

    def extra_repr(self) -> str:
        s = float(self.strength.detach()) if self.learnable_strength else self.strength
        return (f"strength={s}, learnable_strength={self.learnable_strength}, eps={self.eps}, "
                f"detach_irrelevant={self.detach_irrelevant}, dim={self.dim}")
