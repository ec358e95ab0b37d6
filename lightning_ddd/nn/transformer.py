"""Bidirectional pre-norm transformer: the denoising backbone shared by teachers and students.

The network maps a (partly noised) sequence of token ids to per-position logits over the real
vocabulary. There is no causal mask: every position attends to every other, as a denoiser must.

Pieces, smallest first:

- ``rope_angles`` / ``apply_rope`` / ``RotaryTables``: rotary position embeddings on queries and keys,
  so attention scores depend on relative position; the cos/sin tables are computed once per length.
  The denoiser adds a learned absolute position embedding as well (``learned_positions``).
- ``SelfAttention``: multi-head attention through ``scaled_dot_product_attention`` (flash attention
  on a GPU).
- ``MLP``: two linear layers with a GELU between.
- ``Block``: LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual, optionally modulated
  by a time embedding (adaLN: scale, shift and gate per sub-layer).
- ``TimestepEmbedding``: sinusoid of ``1000 t`` followed by an MLP.
- ``DenoisingTransformer``: embedding, blocks, final LayerNorm, linear head; plus an optional zero-initialised
  conditioning hook (``cond_proj``) that distilled students use for extra inputs.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ddd.nn.backbone import Backbone

# ----------------------------------------------------------------------------------------------
# Rotary position embeddings


def sinusoids(values: Tensor, dim: int) -> Tensor:
    """``[cos(v w_k), sin(v w_k)]`` with w_k = 10000^(-k / (dim/2)): (N,) → (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None, :]  # (N, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=-1)  # (N, dim)


def rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """Rotation angles ``position * base^(-2i / head_dim)`` for each position and frequency.

    Args:
        positions: integer or float positions, shape (L,).
        head_dim: size of each attention head; must be even (dimensions are rotated in pairs).
        base: wavelength base of the lowest frequency.

    Returns:
        Angles in float32, shape (L, head_dim // 2).
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    return positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, head_dim/2)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate pairs of dimensions of ``x`` by ``angles`` (the "rotate half" RoPE convention).

    Dimension i is paired with dimension i + head_dim/2. Because each pair is rotated by an angle
    linear in the position, ``<apply_rope(q, m), apply_rope(k, n)>`` depends on m - n only.

    Args:
        x: queries or keys, shape (..., L, head_dim).
        angles: output of ``rope_angles``, shape (L, head_dim // 2).

    Returns:
        Rotated tensor with the shape and dtype of ``x``.
    """
    return rotate(x, angles.cos(), angles.sin())


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``apply_rope`` with the cos/sin tables precomputed, each (L, head_dim // 2) float32."""
    # The rotation is done in float32: bf16 angles lose the low bits that encode position.
    x1, x2 = x.float().chunk(2, dim=-1)  # (..., L, head_dim/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., L, head_dim)
    return out.to(x.dtype)


class RotaryTables:
    """cos/sin tables of the rotary angles for positions 0..L-1, computed once per (device, L).

    A plain attribute rather than a buffer: ``module.to(torch.bfloat16)`` would cast a buffer, and bf16
    angles lose the low bits that encode position. Deep copies (EMA, students) start with an empty cache.
    """

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim
        self._tables: dict[tuple[torch.device, int], tuple[Tensor, Tensor]] = {}

    def __call__(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (device, length)
        if key not in self._tables:
            # Normal tensors even when first asked under inference mode (validation), so training can reuse them.
            with torch.inference_mode(False):
                angles = rope_angles(torch.arange(length, device=device), self.head_dim)  # (L, head_dim/2)
                self._tables[key] = (angles.cos(), angles.sin())
        return self._tables[key]

    def __deepcopy__(self, memo: dict) -> "RotaryTables":
        return RotaryTables(self.head_dim)


# ----------------------------------------------------------------------------------------------
# Layers


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys; bidirectional unless ``causal``.

    Args:
        d_model: width of the residual stream.
        n_heads: number of attention heads; must divide ``d_model``.
        dropout: dropout on attention weights and on the output projection.
        causal: mask future positions (the autoregressive evaluator); the denoiser is bidirectional.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """(B, L, D) -> (B, L, D); ``rope`` is the (cos, sin) pair of ``RotaryTables``, each (L, head_dim/2)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # (B, L, D) each
        # (B, L, D) -> (B, H, L, head_dim)
        q, k, v = (y.view(B, L, self.n_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal
        )  # (B, H, L, head_dim)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear.

    Args:
        d_model: width of the residual stream.
        hidden: width of the hidden layer.
        dropout: dropout on the output.
    """

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block, optionally modulated by a time embedding (adaLN).

    With modulation each sub-layer computes ``x + (1 + gate) * f(LN(x) * (1 + scale) + shift)``.
    The modulation layer is zero-initialised, so a fresh time-conditioned block is exactly the plain
    block (and ignores t) until training moves it. We use ``1 + gate`` rather than DiT's bare
    ``gate`` so that the attention and MLP weights get gradients from the first step.

    Args:
        d_model: width of the residual stream.
        n_heads: number of attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        dropout: dropout probability in attention and MLP.
        time_conditioning: whether ``forward`` takes a time embedding ``c``.
    """

    def __init__(
        self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float, time_conditioning: bool
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, int(mlp_ratio * d_model), dropout)
        # Six modulation vectors: (shift, scale, gate) for attention, then for the MLP.
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model)) if time_conditioning else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], c: Tensor | None = None) -> Tensor:
        if self.ada is None:
            x = x + self.attn(self.ln_1(x), rope)
            return x + self.mlp(self.ln_2(x))
        # c: (B, D) -> six (B, 1, D) vectors that broadcast over positions
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None, :].chunk(6, dim=-1)
        x = x + (1 + gate1) * self.attn(self.ln_1(x) * (1 + scale1) + shift1, rope)
        return x + (1 + gate2) * self.mlp(self.ln_2(x) * (1 + scale2) + shift2)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of ``1000 t`` followed by a two-layer MLP.

    t lives in [0, 1]; scaling by 1000 spreads it over the range the sinusoid frequencies were
    designed for (integer diffusion steps), as in DiT and SEDD.

    Args:
        d_model: output width.
        freq_dim: number of sinusoidal features.
    """

    def __init__(self, d_model: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoids(1000.0 * t.float(), self.freq_dim))  # (B, d_model)


def _cond_proj(cond_dim: int, d_model: int) -> nn.Sequential:
    """The conditioning hook ``Linear -> SiLU -> Linear`` with its last layer at zero (a no-op)."""
    proj = nn.Sequential(nn.Linear(cond_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
    nn.init.normal_(proj[0].weight, mean=0.0, std=0.02)
    nn.init.zeros_(proj[0].bias)
    nn.init.zeros_(proj[2].weight)
    nn.init.zeros_(proj[2].bias)
    return proj


# ----------------------------------------------------------------------------------------------
# The model


class DenoisingTransformer(Backbone):
    """Bidirectional pre-norm transformer with RoPE: token ids in, logits over the vocabulary out.

    The denoising network of the discrete diffusion models. By default it ignores the diffusion
    time (RADD-style: for masked diffusion the clean-data posterior does not depend on t); set
    ``time_conditioning`` to modulate every block with an embedding of t instead.

    Args:
        num_input_tokens: number of distinct input ids, including any mask token (so usually the
            vocabulary size plus one for masked diffusion). Filled in by the framework.
        vocab_size: number of real tokens; the model outputs one logit per real token. Filled in
            by the framework.
        seq_len: maximum sequence length the model accepts. Filled in by the framework.
        d_model: width of the residual stream (embedding size).
        n_layers: number of transformer blocks.
        n_heads: number of attention heads; must divide d_model, and d_model / n_heads must be
            even for the rotary position embeddings.
        mlp_ratio: hidden width of each block's MLP as a multiple of d_model.
        dropout: dropout probability in attention and MLP layers (0 disables it).
        time_conditioning: condition every block on the diffusion time t through adaptive
            LayerNorm (scale, shift, gate). If false, t is ignored (time-independent network).
        cond_dim: size of an extra conditioning vector (e.g. a distilled student's latent or
            noise input), projected and added to the token embeddings. 0 disables it; it can be
            added to a trained model later with ``add_cond_input``.
        learned_positions: add a learned absolute position embedding (one vector per position) to
            the token embeddings, alongside RoPE. RoPE alone only sees relative positions, so on an
            all-mask input every position looks the same and the first unmasking steps cannot
            follow position-dependent marginals (ink on an image's border, the first token of a
            Markov chain). On by default; turn it off for data without fixed positions.
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
        time_conditioning: bool = False,
        cond_dim: int = 0,
        learned_positions: bool = True,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0 or (d_model // n_heads) % 2 != 0:
            raise ValueError(
                f"DenoisingTransformer: d_model={d_model} must be divisible by n_heads={n_heads} with an even "
                "head size (d_model / n_heads) for rotary position embeddings."
            )
        if cond_dim < 0:
            raise ValueError(f"DenoisingTransformer: cond_dim={cond_dim} must be >= 0.")
        self.num_input_tokens = num_input_tokens
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.d_model = d_model
        self.head_dim = d_model // n_heads
        self.time_conditioning = time_conditioning
        self.cond_dim = 0  # set by add_cond_input below

        self.tok_emb = nn.Embedding(num_input_tokens, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model) if learned_positions else None
        self.rope = RotaryTables(self.head_dim)
        self.drop = nn.Dropout(dropout)
        self.time_emb = TimestepEmbedding(d_model) if time_conditioning else None
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, dropout, time_conditioning) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.cond_proj: nn.Sequential | None = None

        self.apply(self._init_weights)
        # Zero modulation: a fresh time-conditioned block behaves as the plain block.
        for block in self.blocks:
            if block.ada is not None:
                nn.init.zeros_(block.ada[1].weight)
                nn.init.zeros_(block.ada[1].bias)
        if cond_dim > 0:
            self.add_cond_input(cond_dim)
        self.register_load_state_dict_pre_hook(DenoisingTransformer._fill_missing_positions)  # hook(module, ...)

    def _fill_missing_positions(self, state_dict: dict, prefix: str, *args) -> None:
        """Checkpoints written before absolute positions existed load with a zero table: the same model."""
        key = prefix + "pos_emb.weight"
        if self.pos_emb is not None and key not in state_dict and prefix + "tok_emb.weight" in state_dict:
            warnings.warn(
                "DenoisingTransformer: the checkpoint has no absolute position table (it predates "
                "learned_positions); it is loaded as zeros, which leaves the model's outputs unchanged.",
                stacklevel=2,
            )
            state_dict[key] = torch.zeros_like(self.pos_emb.weight)

    @property
    def learned_positions(self) -> bool:
        return self.pos_emb is not None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def add_cond_input(self, cond_dim: int) -> None:
        """Add the conditioning hook ``cond_proj`` in place, without changing the model's outputs.

        The hook's last Linear is zero-initialised, so until it is trained the added term is zero.
        This is how a distilled student starts from a trained teacher and learns to use an extra
        input (a latent or Gaussian noise).

        Args:
            cond_dim: size of the conditioning vector passed as ``cond`` to ``forward``.

        Raises:
            ValueError: if ``cond_dim`` is not positive or the model already has a hook.
        """
        if cond_dim <= 0:
            raise ValueError(f"add_cond_input: cond_dim={cond_dim} must be positive.")
        if self.cond_proj is not None:
            raise ValueError(
                f"add_cond_input: the model already has a conditioning input (cond_dim={self.cond_dim})."
            )
        ref = self.tok_emb.weight
        self.cond_proj = _cond_proj(cond_dim, self.d_model).to(device=ref.device, dtype=ref.dtype)
        self.cond_dim = cond_dim

    def forward(
        self, z: Tensor, t: Tensor | None = None, cond: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """Logits over the real vocabulary at every position, or at the given positions only.

        Args:
            z: token ids in [0, num_input_tokens), shape (B, L) with L <= seq_len.
            t: diffusion times, shape (B,) (a scalar is broadcast). Required if the model was built
                with ``time_conditioning``; ignored otherwise.
            cond: extra conditioning, shape (B, cond_dim) (shared by all positions) or
                (B, L, cond_dim) (per position). Only for models with ``cond_dim > 0``; None
                means no extra term (the same as zeros through an untrained hook).
            positions: optional (B, L) bool; the head then runs on those N positions only (row-major
                order), which is all a loss over masked positions needs: at V = 50k the logits of the
                other positions cost gigabytes. The values equal the full output at those positions.

        Returns:
            Logits of shape (B, L, vocab_size), or (N, vocab_size) with ``positions``, in the compute
            dtype (e.g. bf16 under autocast).
        """
        if z.dim() != 2:
            raise ValueError(f"DenoisingTransformer: expected token ids of shape (B, L), got {tuple(z.shape)}.")
        B, L = z.shape
        if L > self.seq_len:
            raise ValueError(
                f"DenoisingTransformer: input has {L} positions but the model was built with seq_len={self.seq_len}; "
                f"use data with seq_len <= {self.seq_len} or train a model with a larger seq_len."
            )
        # On the CPU an out-of-range id is an opaque IndexError, so check it (no device sync there). On an
        # accelerator the check would sync the host every call; the modules' first-batch check covers it.
        if z.device.type == "cpu" and bool(((z < 0) | (z >= self.num_input_tokens)).any()):
            raise ValueError(
                f"DenoisingTransformer: token ids must lie in [0, {self.num_input_tokens}) but range over "
                f"[{int(z.min())}, {int(z.max())}]; check the data's vocab_size and mask token."
            )

        x = self.tok_emb(z)  # (B, L, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:L]  # (L, D) broadcasts over the batch
        if cond is not None:
            x = x + self._cond_term(cond, B, L)  # (B, 1 or L, D) broadcasts over positions
        x = self.drop(x)

        c = None
        if self.time_conditioning:
            if t is None:
                raise ValueError("DenoisingTransformer: built with time_conditioning=True, so forward needs t.")
            t = t.reshape(-1)
            if t.numel() == 1:
                t = t.expand(B)
            if t.shape != (B,):
                raise ValueError(f"DenoisingTransformer: t must have shape ({B},), got {tuple(t.shape)}.")
            c = self.time_emb(t)  # (B, D)

        if positions is not None and tuple(positions.shape) != (B, L):
            raise ValueError(f"DenoisingTransformer: positions must be a ({B}, {L}) bool mask, got {tuple(positions.shape)}.")

        rope = self.rope(L, z.device)  # (cos, sin), each (L, head_dim/2)
        for block in self.blocks:
            x = block(x, rope, c)  # (B, L, D)
        if positions is not None:
            x = x[positions]  # (N, D): the final norm and the head act per position
        return self.head(self.ln_f(x))  # (B, L, vocab_size) or (N, vocab_size)

    def _cond_term(self, cond: Tensor, B: int, L: int) -> Tensor:
        """Project ``cond`` to the embedding width: (B, C) -> (B, 1, D), (B, L, C) -> (B, L, D)."""
        if self.cond_proj is None:
            raise ValueError(
                "DenoisingTransformer: got cond but the model has no conditioning input (cond_dim=0); "
                "build it with cond_dim > 0 or call add_cond_input first."
            )
        shape = tuple(cond.shape)
        if cond.dim() == 2:
            cond = cond[:, None, :]  # (B, 1, C)
        ok = cond.dim() == 3 and cond.shape[0] == B and cond.shape[1] in (1, L) and cond.shape[2] == self.cond_dim
        if not ok:
            raise ValueError(
                f"DenoisingTransformer: cond must have shape ({B}, {self.cond_dim}) or ({B}, {L}, {self.cond_dim}), "
                f"got {shape}."
            )
        # Match the parameters' dtype (e.g. float64 noise into a float32 model); autocast still applies.
        return self.cond_proj(cond.to(self.cond_proj[0].weight.dtype))
