"""The zero-initialised conditioning input of released backbones, added to the token embeddings.

Distilled students feed an extra input (Di4C's lambda, D-MMD's noise) to a copy of their teacher. The
project's own ``DenoisingTransformer`` has ``add_cond_input``; released networks get the same hook here,
with the same interface and initialisation, so a student treats both alike: ``backbone.add_cond_input(C)``,
``backbone.cond_proj`` (``Linear -> SiLU -> Linear`` whose last layer starts at zero) and
``backbone(z, t, cond)`` with ``cond`` of shape (B, C) or (B, L, C).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ddd.nn.transformer import _cond_proj


class EmbeddingConditioning:
    """Mixin for an ``nn.Module`` with ``d_model`` (embedding width) and ``embedding_weight`` (a parameter whose
    device and dtype the hook copies). Sets ``cond_proj`` and ``cond_dim``."""

    cond_proj: nn.Sequential | None
    cond_dim: int
    d_model: int

    @property
    def embedding_weight(self) -> Tensor:
        raise NotImplementedError

    def add_cond_input(self, cond_dim: int) -> None:
        """Add the hook ``cond_proj`` in place; its last layer is zero, so the outputs do not change.

        Raises:
            ValueError: if ``cond_dim`` is not positive or the model already has a hook.
        """
        if cond_dim <= 0:
            raise ValueError(f"add_cond_input: cond_dim={cond_dim} must be positive.")
        if self.cond_proj is not None:
            raise ValueError(f"add_cond_input: the model already has a conditioning input (cond_dim={self.cond_dim}).")
        ref = self.embedding_weight
        self.cond_proj = _cond_proj(cond_dim, self.d_model).to(device=ref.device, dtype=ref.dtype)
        self.cond_dim = cond_dim

    def cond_term(self, cond: Tensor, B: int, L: int) -> Tensor:
        """Project ``cond`` to the embedding width: (B, C) -> (B, 1, D), (B, L, C) -> (B, L, D)."""
        name = type(self).__name__
        if self.cond_proj is None:
            raise ValueError(f"{name}: got cond but the model has no conditioning input; call add_cond_input first.")
        shape = tuple(cond.shape)
        if cond.dim() == 2:
            cond = cond[:, None, :]  # (B, 1, C)
        ok = cond.dim() == 3 and cond.shape[0] == B and cond.shape[1] in (1, L) and cond.shape[2] == self.cond_dim
        if not ok:
            raise ValueError(f"{name}: cond must have shape ({B}, {self.cond_dim}) or ({B}, {L}, {self.cond_dim}), got {shape}.")
        return self.cond_proj(cond.to(self.cond_proj[0].weight.dtype))
