"""Causal (left-to-right) pre-norm transformer: the backbone of the autoregressive evaluator LM.

It reuses the bidirectional backbone's pieces (RoPE, MLP, initialisation) and differs only in the
attention mask, so position i sees positions <= i. Kept apart from ``DenoisingTransformer`` because a
denoiser must never be causal and the AR model needs no time or conditioning inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ddd.nn.backbone import Backbone
from lightning_ddd.nn.transformer import MLP, DenoisingTransformer, RotaryTables, SelfAttention


class CausalSelfAttention(SelfAttention):
    """:class:`SelfAttention` with a causal mask: position i attends to positions <= i."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, dropout, causal=True)


class CausalBlock(nn.Module):
    """Pre-norm block: LayerNorm -> causal attention -> residual, LayerNorm -> MLP -> residual.

    Args:
        d_model: width of the residual stream.
        n_heads: number of attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        dropout: dropout probability in attention and MLP.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, int(mlp_ratio * d_model), dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class CausalTransformer(Backbone):
    """Causal pre-norm transformer with RoPE: the logits at position i depend on ids 0..i only.

    Same factory signature as ``DenoisingTransformer`` (``backbone(num_input_tokens, vocab_size, seq_len)``),
    so the modules' ``backbone`` argument takes either.

    Args:
        num_input_tokens: distinct input ids (the AR model uses ``vocab_size + 1``: one BOS id). Filled in
            by the framework.
        vocab_size: real tokens; one output logit each. Filled in by the framework.
        seq_len: maximum input length. Filled in by the framework.
        d_model: width of the residual stream.
        n_layers: number of blocks.
        n_heads: attention heads; must divide d_model with an even head size (RoPE).
        mlp_ratio: MLP hidden width as a multiple of d_model.
        dropout: dropout probability (0 disables it).
    """

    def __init__(
        self,
        num_input_tokens: int,
        vocab_size: int,
        seq_len: int,
        *,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0 or (d_model // n_heads) % 2 != 0:
            raise ValueError(
                f"CausalTransformer: d_model={d_model} must be divisible by n_heads={n_heads} with an even "
                "head size (d_model / n_heads) for rotary position embeddings."
            )
        self.num_input_tokens = num_input_tokens
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.head_dim = d_model // n_heads
        self.rope = RotaryTables(self.head_dim)
        self.tok_emb = nn.Embedding(num_input_tokens, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CausalBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(DenoisingTransformer._init_weights)

    def forward(self, ids: Tensor) -> Tensor:
        """(B, L) ids in [0, num_input_tokens), L <= seq_len -> (B, L, vocab_size) logits."""
        if ids.dim() != 2 or ids.shape[1] > self.seq_len:
            raise ValueError(
                f"CausalTransformer: expected ids of shape (B, L<={self.seq_len}), got {tuple(ids.shape)}."
            )
        if bool(((ids < 0) | (ids >= self.num_input_tokens)).any()):
            raise ValueError(
                f"CausalTransformer: ids must lie in [0, {self.num_input_tokens}) but range over "
                f"[{int(ids.min())}, {int(ids.max())}]; check the data's vocab_size."
            )
        x = self.drop(self.tok_emb(ids))  # (B, L, D)
        rope = self.rope(ids.shape[1], ids.device)  # (cos, sin), each (L, hd/2)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.ln_f(x))  # (B, L, V)
