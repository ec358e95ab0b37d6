"""The DiT of MDLM and SEDD, rebuilt natively from the released parameter layout (no remote code).

MDLM (Sahoo et al., 2024; kuleshov-group/mdlm ``models/dit.py``, hub kuleshov-group/mdlm-owt) reuses SEDD's
network (Lou et al., 2024; louaaron/Score-Entropy-Discrete-Diffusion ``model/transformer.py``, hub
louaaron/sedd-small). Both are a pre-norm transformer whose every sub-layer is modulated by a conditioning
vector ``c = SiLU(MLP(sinusoids(sigma)))`` (adaLN: shift, scale and a bare gate), with:

- token embedding ``vocab_embed.embedding`` of shape (V + 1, d): GPT-2's 50,257 tokens plus the mask, id V;
- LayerNorms without bias, computed in fp32; attention without biases; rotary embeddings (rotate-half,
  base 10000) on queries and keys; an MLP ``d -> 4d -> d`` with tanh-GELU;
- a final adaLN-modulated LayerNorm and a linear head to V + 1 outputs (the mask's own logit included).

``sigma`` is the total noise of the release's schedule. MDLM's released OpenWebText model was trained with
``time_conditioning=False``: its network always sees sigma = 0, so it is time-independent (RADD's network).
SEDD's network sees ``sigma(t) = -log(1 - (1 - eps) t)`` (log-linear noise, eps = 1e-3).

This module runs with SDPA and under bf16 autocast, returns logits over the V real tokens only (the mask
column is dropped, which is exactly MDLM's SUBS "-inf at the mask" after normalisation), and takes the
project's zero-initialised conditioning input at the embeddings. ``load_release_state_dict`` maps the
released names onto it key by key with shape checks; ``release_state_dict`` is the inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ddd.nn.transformer import RotaryTables, rotate, sinusoids
from lightning_ddd.released.conditioning import EmbeddingConditioning
from lightning_ddd.released.sources import ReleasedModelError

#: sinusoidal features of sigma (the release's ``frequency_embedding_size``)
SIGMA_FEATURES = 256
ROPE_BASE = 10_000


@dataclass
class DiTConfig:
    """Shape and time input of a released DiT.

    Attributes:
        num_embeddings: rows of the embedding and outputs of the head: V real tokens plus the mask (id V).
        hidden_size: width d of the residual stream.
        cond_dim: width of the conditioning vector c.
        n_blocks: transformer blocks.
        n_heads: attention heads (d / n_heads must be even for the rotary embedding).
        mlp_ratio: MLP hidden width as a multiple of d.
        dropout: residual dropout (the releases trained with 0.1; a frozen teacher runs in eval mode).
        length: sequence length the release was trained on; longer inputs are refused.
        time_input: what the network's sigma is. "none": always 0 (MDLM with time_conditioning=False; the
            network ignores t). "loglinear": the total noise ``-log(1 - (1 - eps) t)`` at time t (SEDD).
        noise_eps: eps of the log-linear noise.
    """

    num_embeddings: int
    hidden_size: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    mlp_ratio: int = 4
    dropout: float = 0.1
    length: int = 1024
    time_input: Literal["none", "loglinear"] = "none"
    noise_eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.num_embeddings < 3:
            raise ValueError(f"DiTConfig: num_embeddings={self.num_embeddings} must be >= 3 (two tokens and the mask).")
        if self.hidden_size % self.n_heads or (self.hidden_size // self.n_heads) % 2:
            raise ValueError(
                f"DiTConfig: hidden_size={self.hidden_size} must split into n_heads={self.n_heads} heads of even size."
            )
        if self.time_input not in ("none", "loglinear"):
            raise ValueError(f"DiTConfig: time_input={self.time_input!r} must be 'none' or 'loglinear'.")


def loglinear_sigma(t: Tensor, eps: float) -> Tensor:
    """Total noise of the log-linear schedule, ``-log(1 - (1 - eps) t)``: alpha_t = exp(-sigma) = 1 - (1 - eps) t."""
    return -torch.log1p(-(1.0 - eps) * t.float())


class FP32LayerNorm(nn.Module):
    """LayerNorm without bias, normalised in fp32 (as the releases do, also under autocast)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics; the result keeps the residual stream's dtype (fp32 under autocast, bf16 for bf16 weights)
        return (F.layer_norm(x.float(), (x.shape[-1],)) * self.weight.float()).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x (1 + scale) + shift`` with (B, 1, d) shift and scale."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Bidirectional multi-head attention without biases, rotary queries and keys, through SDPA."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        B, L, d = x.shape
        # The released layout is (three, heads, head_dim) along the last axis.
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, L, hd) each
        q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))


class MLP(nn.Module):
    """``d -> ratio d -> d`` with tanh-GELU."""

    def __init__(self, d: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, ratio * d)
        self.proj = nn.Linear(ratio * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """``x + gate * drop(f(modulate(LN(x), shift, scale)))`` for attention, then for the MLP (DiT's bare gate)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.ln_1 = FP32LayerNorm(d)
        self.attn = Attention(d, config.n_heads)
        self.ln_2 = FP32LayerNorm(d)
        self.mlp = MLP(d, config.mlp_ratio)
        self.ada = nn.Linear(config.cond_dim, 6 * d)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None, :].chunk(6, dim=-1)  # (B, 1, d) each
        x = x + gate1 * self.drop(self.attn(modulate(self.ln_1(x), shift1, scale1), rope))
        return x + gate2 * self.drop(self.mlp(modulate(self.ln_2(x), shift2, scale2)))


class DiT(EmbeddingConditioning, nn.Module):
    """The released MDLM/SEDD network: (B, L) ids in [0, V] (V = mask) -> (B, L, V) logits over real tokens.

    Args:
        config: the release's shape and time input (see :class:`DiTConfig`).
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.num_input_tokens = config.num_embeddings
        self.vocab_size = config.num_embeddings - 1  # the mask is the last id
        self.seq_len = config.length
        self.d_model = d
        self.time_conditioning = config.time_input != "none"
        self.tok_emb = nn.Embedding(config.num_embeddings, d)
        self.time_mlp = nn.Sequential(nn.Linear(SIGMA_FEATURES, config.cond_dim), nn.SiLU(),
                                      nn.Linear(config.cond_dim, config.cond_dim))
        self.rope = RotaryTables(d // config.n_heads)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        self.ln_f = FP32LayerNorm(d)
        self.ada_f = nn.Linear(config.cond_dim, 2 * d)
        self.head = nn.Linear(d, config.num_embeddings)
        self.cond_proj: nn.Sequential | None = None
        self.cond_dim = 0

    @property
    def embedding_weight(self) -> Tensor:
        return self.tok_emb.weight

    def sigma(self, t: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        """The network's sigma input, (B,) fp32: zeros for a time-independent release, else sigma(t)."""
        if not self.time_conditioning:
            return torch.zeros(batch_size, device=device)
        if t is None:
            raise ValueError("this released network is time-conditioned (SEDD); its forward needs t.")
        t = t.reshape(-1).to(device)
        if t.numel() == 1:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"DiT: t must have shape ({batch_size},), got {tuple(t.shape)}.")
        return loglinear_sigma(t, self.config.noise_eps)

    def forward(self, z: Tensor, t: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) over the real tokens, in the compute dtype (bf16 under autocast).

        Args:
            z: (B, L) ids in [0, V], with V the mask; L <= the release's length.
            t: (B,) times in [0, 1]; only a time-conditioned release (SEDD) uses them.
            cond: (B, C) or (B, L, C) extra input after ``add_cond_input``; None: none.
        """
        if z.dim() != 2:
            raise ValueError(f"DiT: expected token ids of shape (B, L), got {tuple(z.shape)}.")
        B, L = z.shape
        if L > self.seq_len:
            raise ValueError(f"DiT: input has {L} positions but the release was trained on {self.seq_len}; use shorter rows.")
        if z.device.type == "cpu" and bool(((z < 0) | (z >= self.num_input_tokens)).any()):
            raise ValueError(f"DiT: token ids must lie in [0, {self.num_input_tokens}) but range over "
                             f"[{int(z.min())}, {int(z.max())}]; check the data's vocab_size.")
        x = self.tok_emb(z)  # (B, L, d)
        if cond is not None:
            x = x + self.cond_term(cond, B, L)  # (B, 1 or L, d)
        features = sinusoids(self.sigma(t, B, z.device), SIGMA_FEATURES).to(self.time_mlp[0].weight.dtype)
        c = F.silu(self.time_mlp(features))  # (B, cond_dim)
        rope = self.rope(L, z.device)  # (cos, sin), each (L, head_dim/2)
        for block in self.blocks:
            x = block(x, rope, c)
        shift, scale = self.ada_f(c)[:, None, :].chunk(2, dim=-1)  # (B, 1, d) each
        x = modulate(self.ln_f(x), shift, scale)
        V = self.vocab_size  # the mask's logit is never needed: SUBS gives it probability zero
        return F.linear(x, self.head.weight[:V], self.head.bias[:V])  # (B, L, V)


# ---------------------------------------------------------------------------------------------------
# The released parameter names


def release_name_map(n_blocks: int, prefix: str = "") -> dict[str, str]:
    """Released parameter name -> native name, key by key (``prefix``: "backbone." for MDLM's hub layout,
    "" for SEDD's). The rotary buffer ``rotary_emb.inv_freq`` is checked separately, not loaded."""
    names = {
        "vocab_embed.embedding": "tok_emb.weight",
        "sigma_map.mlp.0.weight": "time_mlp.0.weight",
        "sigma_map.mlp.0.bias": "time_mlp.0.bias",
        "sigma_map.mlp.2.weight": "time_mlp.2.weight",
        "sigma_map.mlp.2.bias": "time_mlp.2.bias",
        "output_layer.norm_final.weight": "ln_f.weight",
        "output_layer.adaLN_modulation.weight": "ada_f.weight",
        "output_layer.adaLN_modulation.bias": "ada_f.bias",
        "output_layer.linear.weight": "head.weight",
        "output_layer.linear.bias": "head.bias",
    }
    per_block = {
        "norm1.weight": "ln_1.weight",
        "attn_qkv.weight": "attn.qkv.weight",
        "attn_out.weight": "attn.proj.weight",
        "norm2.weight": "ln_2.weight",
        "mlp.0.weight": "mlp.fc.weight",
        "mlp.0.bias": "mlp.fc.bias",
        "mlp.2.weight": "mlp.proj.weight",
        "mlp.2.bias": "mlp.proj.bias",
        "adaLN_modulation.weight": "ada.weight",
        "adaLN_modulation.bias": "ada.bias",
    }
    for i in range(n_blocks):
        names.update({f"blocks.{i}.{ours}": f"blocks.{i}.{native}" for ours, native in per_block.items()})
    return {prefix + key: value for key, value in names.items()}


def rotary_inv_freq(head_dim: int) -> Tensor:
    """The releases' rotary buffer: ``1 / 10000^(2i / head_dim)``."""
    return 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))


def load_release_state_dict(model: DiT, state: dict[str, Tensor], prefix: str, where: str) -> None:
    """Copy a released state dict into ``model`` through :func:`release_name_map`, checking every name and shape.

    Raises:
        ReleasedModelError: one line naming the first missing, unexpected or mis-shaped parameter and ``where`` it came from.
    """
    names = release_name_map(model.config.n_blocks, prefix)
    rotary = prefix + "rotary_emb.inv_freq"
    missing = [key for key in names if key not in state]
    unexpected = [key for key in state if key not in names and key != rotary]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ReleasedModelError(
            f"{where}: the weights do not match the released {model.config.n_blocks}-block DiT layout ({detail}, "
            f"{len(missing)} missing and {len(unexpected)} unexpected in all); is config.json from the same release?"
        )
    native = model.state_dict()
    for key, target in names.items():
        if tuple(state[key].shape) != tuple(native[target].shape):
            raise ReleasedModelError(
                f"{where}: parameter '{key}' has shape {tuple(state[key].shape)} but config.json implies "
                f"{tuple(native[target].shape)}; the config and the weights disagree."
            )
    if rotary in state:
        expected = rotary_inv_freq(model.config.hidden_size // model.config.n_heads)
        if state[rotary].shape != expected.shape or not torch.allclose(state[rotary].float(), expected):
            raise ReleasedModelError(f"{where}: '{rotary}' is not the base-10000 rotary table this module computes.")
    model.load_state_dict({names[key]: state[key] for key in names}, strict=True)


def release_state_dict(model: DiT, prefix: str) -> dict[str, Tensor]:
    """The inverse of :func:`load_release_state_dict`: ``model``'s weights under the released names."""
    native = model.state_dict()
    out = {key: native[target].detach().clone() for key, target in release_name_map(model.config.n_blocks, prefix).items()}
    out[prefix + "rotary_emb.inv_freq"] = rotary_inv_freq(model.config.hidden_size // model.config.n_heads)
    return out
