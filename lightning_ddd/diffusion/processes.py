"""Forward processes of discrete diffusion: corruption q(z_t | x), exact posteriors q(z_s | z_t, x), priors.

Shapes: x, z_t: (B, D) LongTensors; times s, t: floats or (B,) tensors (one time per sequence);
probabilities over clean tokens: (B, D, V); over noisy tokens: (B, D, V_in) with V_in = ``num_input_tokens``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ddd.diffusion.categorical import resolve_precision, sample_categorical
from lightning_ddd.diffusion.schedules import LogLinearSchedule, NoiseSchedule


def _per_row(value: float | Tensor, ref: Tensor) -> Tensor:
    """A time given as a float or (B,) tensor, as a (B, 1) float64 tensor on ``ref``'s device."""
    value = torch.as_tensor(value, device=ref.device).to(torch.float64)
    if value.dim() == 0:
        value = value.expand(ref.shape[0])
    return value.reshape(-1, 1)


class DiscreteProcess(ABC):
    """A factorised forward process: each of the D dimensions is noised independently.

    Args:
        vocab_size: number of real token ids V (filled in from the data).
        schedule: the noise schedule alpha_t (default: log-linear, eps = 1e-3).
    """

    def __init__(self, vocab_size: int, schedule: NoiseSchedule | None = None) -> None:
        if vocab_size < 2:
            raise ValueError(f"{type(self).__name__}: vocab_size={vocab_size} must be >= 2.")
        self.vocab_size = vocab_size
        self.schedule = schedule if schedule is not None else LogLinearSchedule()

    @property
    @abstractmethod
    def num_input_tokens(self) -> int:
        """Ids the denoiser must accept: V for uniform, V + 1 (the mask) for masked."""

    @abstractmethod
    def marginal_probs(self, x: Tensor, t: float | Tensor) -> Tensor:
        """q(z_t | x) per dimension: (B, D) ids → (B, D, V_in) probabilities."""

    @abstractmethod
    def posterior_probs(self, z_t: Tensor, x0_probs: Tensor, s: float | Tensor, t: float | Tensor) -> Tensor:
        """``sum_x p(x) q(z_s | z_t, x)`` per dimension for a distribution p over clean tokens.

        Args:
            z_t: (B, D) noisy ids at time t.
            x0_probs: (B, D, V) distribution over the clean token (one-hot for the exact posterior).
            s, t: times with s < t.

        Returns:
            (B, D, V_in) probabilities of z_s.
        """

    @abstractmethod
    def prior_sample(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
    ) -> Tensor:
        """Draw (B, D) ids from the prior p(z_1)."""

    @abstractmethod
    def x0_log_probs(self, logits: Tensor, z_t: Tensor) -> Tensor:
        """Turn backbone logits (B, D, V) into fp32 log p_theta(x | z_t) (B, D, V).

        With autograd off (``torch.no_grad``, inference mode) an fp32 ``logits`` tensor that is not a view is
        overwritten and returned, in row chunks: at V = 50k and D = 1024 a second (B, D, V) tensor costs
        gigabytes. Pass a copy if the raw logits are needed afterwards.
        """

    def corrupt(self, x: Tensor, t: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw z_t ~ q(z_t | x) for (B, D) clean ids."""
        return sample_categorical(self.marginal_probs(x, t).log(), generator)

    def posterior_sample(
        self,
        z_t: Tensor,
        x0: Tensor,
        s: float | Tensor,
        t: float | Tensor,
        generator: torch.Generator | None = None,
        precision: str = "float64",
    ) -> Tensor:
        """Draw z_s ~ q(z_s | z_t, x0) for (B, D) clean ids ``x0``, in ``precision``.

        This generic version draws from ``posterior_probs`` with a (B, D, V_in) tensor; the processes below
        override it with O(B D) draws.
        """
        onehot = F.one_hot(x0, self.vocab_size).to(torch.float64)
        return sample_categorical(self.posterior_probs(z_t, onehot, s, t).log(), generator, precision)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, schedule={self.schedule!r})"


class MaskedProcess(DiscreteProcess):
    """Absorbing ("masked") diffusion: a dimension keeps its value w.p. alpha_t, else becomes the mask id V.

    A masked z_t dimension at time t becomes clean token x at s < t w.p. (alpha_s - alpha_t)/(1 - alpha_t),
    and stays masked w.p. (1 - alpha_s)/(1 - alpha_t); an unmasked dimension is copied.
    """

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def num_input_tokens(self) -> int:
        return self.vocab_size + 1

    def marginal_probs(self, x: Tensor, t: float | Tensor) -> Tensor:
        alpha = self.schedule.alpha(_per_row(t, x)).unsqueeze(-1)  # (B, 1, 1)
        keep = F.one_hot(x, self.num_input_tokens).to(alpha.dtype) * alpha
        keep[..., self.mask_id] += 1.0 - alpha[..., 0]
        return keep

    def corrupt(self, x: Tensor, t: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
        alpha = self.schedule.alpha(_per_row(t, x))  # (B, 1)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        return torch.where(u < 1.0 - alpha, torch.full_like(x, self.mask_id), x)

    def mask_exactly(self, x: Tensor, num_masked: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mask exactly ``num_masked[b]`` uniformly chosen dimensions of each row (any-order AR losses)."""
        scores = torch.rand(x.shape, generator=generator, device=x.device)
        ranks = scores.argsort(dim=-1).argsort(dim=-1)  # a uniform random permutation of 0..D-1 per row
        return torch.where(ranks < num_masked.reshape(-1, 1), torch.full_like(x, self.mask_id), x)

    def posterior_probs(self, z_t: Tensor, x0_probs: Tensor, s: float | Tensor, t: float | Tensor) -> Tensor:
        dtype = x0_probs.dtype
        alpha_s = self.schedule.alpha(_per_row(s, z_t)).to(dtype).unsqueeze(-1)  # (B, 1, 1)
        alpha_t = self.schedule.alpha(_per_row(t, z_t)).to(dtype).unsqueeze(-1)
        unmask = (alpha_s - alpha_t) / (1.0 - alpha_t)
        out = torch.cat([unmask * x0_probs, (1.0 - unmask).expand(*x0_probs.shape[:-1], 1)], dim=-1)
        carried = F.one_hot(z_t, self.num_input_tokens).to(dtype)
        is_masked = (z_t == self.mask_id).unsqueeze(-1)
        return torch.where(is_masked, out, carried)

    def prior_sample(self, batch_size, seq_len, generator=None, device="cpu") -> Tensor:
        return torch.full((batch_size, seq_len), self.mask_id, dtype=torch.long, device=device)

    def posterior_sample(
        self,
        z_t: Tensor,
        x0: Tensor,
        s: float | Tensor,
        t: float | Tensor,
        generator: torch.Generator | None = None,
        precision: str = "float64",
    ) -> Tensor:
        """One Bernoulli per position: a masked z_t dimension becomes x0 w.p. (alpha_s - alpha_t)/(1 - alpha_t)."""
        dtype = resolve_precision(precision)
        alpha_s = self.schedule.alpha(_per_row(s, z_t))  # (B, 1) float64
        alpha_t = self.schedule.alpha(_per_row(t, z_t))
        unmask = ((alpha_s - alpha_t) / (1.0 - alpha_t)).to(dtype)  # (B, 1)
        u = torch.rand(z_t.shape, generator=generator, device=z_t.device, dtype=dtype)  # (B, D)
        return torch.where((z_t == self.mask_id) & (u < unmask), x0, z_t)

    def x0_log_probs(self, logits: Tensor, z_t: Tensor) -> Tensor:
        carried = (z_t != self.mask_id).unsqueeze(-1)  # (B, D, 1)
        index = z_t.clamp_max(self.vocab_size - 1).unsqueeze(-1)  # (B, D, 1)
        if not torch.is_grad_enabled():
            return _log_softmax_in_place(_writable_fp32(logits), carried, index)
        # The mask is never predicted: V outputs only. Unmasked positions carry their token with probability
        # one; one autograd node keeps only its output for backward (at V = 50k and D = 1024 every extra
        # full-size tensor costs gigabytes).
        return _CarriedLogSoftmax.apply(logits.float(), carried, index)


class UniformProcess(DiscreteProcess):
    """Uniform diffusion: q(z_t | x) = alpha_t onehot(x) + (1 - alpha_t) / V; the prior is uniform."""

    @property
    def num_input_tokens(self) -> int:
        return self.vocab_size

    def marginal_probs(self, x: Tensor, t: float | Tensor) -> Tensor:
        alpha = self.schedule.alpha(_per_row(t, x)).unsqueeze(-1)  # (B, 1, 1)
        return alpha * F.one_hot(x, self.vocab_size).to(alpha.dtype) + (1.0 - alpha) / self.vocab_size

    def corrupt(self, x: Tensor, t: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
        # Resample w.p. 1 - alpha_t (the new token may equal the old): no (B, D, V) tensor for large V.
        alpha = self.schedule.alpha(_per_row(t, x))  # (B, 1)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        noise = torch.randint(self.vocab_size, x.shape, generator=generator, device=x.device)
        return torch.where(u < 1.0 - alpha, noise, x)

    def posterior_probs(self, z_t: Tensor, x0_probs: Tensor, s: float | Tensor, t: float | Tensor) -> Tensor:
        # q(z_s | z_t, x) = q(z_t | z_s) q(z_s | x) / q(z_t | x). Mixing over p(x) in closed form:
        #   sum_x p(x) q(z_s | z_t, x) = A[z_s] * (alpha_s p(z_s) / c(z_s) + (1 - alpha_s)/V * sum_x p(x)/c(x))
        # with A[z_s] = q(z_t | z_s) and c(x) = q(z_t | x).
        dtype, V = x0_probs.dtype, self.vocab_size
        alpha_s = self.schedule.alpha(_per_row(s, z_t)).to(dtype).unsqueeze(-1)  # (B, 1, 1)
        alpha_t = self.schedule.alpha(_per_row(t, z_t)).to(dtype).unsqueeze(-1)
        alpha_ts = alpha_t / alpha_s
        onehot_zt = F.one_hot(z_t, V).to(dtype)  # (B, D, V)
        a = alpha_ts * onehot_zt + (1.0 - alpha_ts) / V
        c = alpha_t * onehot_zt + (1.0 - alpha_t) / V
        ratio = x0_probs / c
        return a * (alpha_s * ratio + (1.0 - alpha_s) / V * ratio.sum(-1, keepdim=True))

    def posterior_sample(
        self,
        z_t: Tensor,
        x0: Tensor,
        s: float | Tensor,
        t: float | Tensor,
        generator: torch.Generator | None = None,
        precision: str = "float64",
    ) -> Tensor:
        """Draw z_s ~ q(z_s | z_t, x0) by one mixture-component draw per position (no (B, D, V) tensor).

        Expanding q(z_s | z_t, x) ∝ [a_ts 1(z_s = z_t) + (1 - a_ts)/V] [a_s 1(z_s = x) + (1 - a_s)/V] with
        a_ts = alpha_t / alpha_s gives a mixture of a point mass at z_t with weight
        a_ts (1 - a_s)/V + a_ts a_s 1(z_t = x), a point mass at x with weight (1 - a_ts) a_s / V and the uniform
        distribution with weight (1 - a_ts)(1 - a_s)/V; the weights sum to q(z_t | x). One uniform picks the
        component, one random id serves the uniform one.
        """
        dtype, V = resolve_precision(precision), self.vocab_size
        alpha_s = self.schedule.alpha(_per_row(s, z_t))  # (B, 1) float64
        alpha_t = self.schedule.alpha(_per_row(t, z_t))
        alpha_ts = alpha_t / alpha_s
        same = (z_t == x0).to(torch.float64)  # (B, D)
        w_stay = alpha_ts * (1.0 - alpha_s) / V + alpha_ts * alpha_s * same  # (B, D)
        w_clean = (1.0 - alpha_ts) * alpha_s / V  # (B, 1)
        w_uniform = (1.0 - alpha_ts) * (1.0 - alpha_s) / V  # (B, 1)
        total = w_stay + w_clean + w_uniform  # (B, D) = q(z_t | x0)
        u = torch.rand(z_t.shape, generator=generator, device=z_t.device, dtype=dtype) * total.to(dtype)
        noise = torch.randint(V, z_t.shape, generator=generator, device=z_t.device)  # (B, D)
        w_stay = w_stay.to(dtype)
        return torch.where(u < w_stay, z_t, torch.where(u < w_stay + w_clean.to(dtype), x0, noise))

    def prior_sample(self, batch_size, seq_len, generator=None, device="cpu") -> Tensor:
        return torch.randint(self.vocab_size, (batch_size, seq_len), generator=generator, device=device)

    def prior_kl(self, x: Tensor) -> Tensor:
        """KL(q(z_1 | x) || uniform), summed over dimensions: (B, D) → (B,) float64.

        q(z_1 | x) puts alpha_1 + (1 - alpha_1)/V on x and (1 - alpha_1)/V on each other id, whatever x is, so
        every dimension has the same KL (no (B, D, V) tensor).
        """
        V = self.vocab_size
        alpha = self.schedule.alpha(torch.ones((), dtype=torch.float64, device=x.device))
        on, off = alpha + (1.0 - alpha) / V, (1.0 - alpha) / V
        per_dim = torch.xlogy(on, on * V) + (V - 1) * torch.xlogy(off, off * V)
        return per_dim.expand(x.shape[0]) * x.shape[1]

    def x0_log_probs(self, logits: Tensor, z_t: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return _log_softmax_in_place(_writable_fp32(logits))
        return torch.log_softmax(logits.float(), dim=-1)


# ----------------------------------------------------------------------------------------------
# Inference-mode x0_log_probs: one (B, D, V) buffer, normalised a chunk of rows at a time

#: Elements per chunk of the in-place log-softmax (2**21 fp32: 8 MB of temporaries).
_CHUNK_ELEMENTS = 1 << 21


def owns_its_memory(t: Tensor) -> bool:
    """Whether overwriting ``t`` changes no tensor but ``t``: contiguous, and no view, or a view of its whole
    base (``nn.Linear`` on a (B, D, H) input returns its (B*D, V) product reshaped, a view of it since
    torch 2.14; overwriting that view overwrites nothing else). A slice, an expand or a transpose does not."""
    if not t.is_contiguous():
        return False
    base = t._base
    return base is None or (base.data_ptr() == t.data_ptr() and base.numel() == t.numel())


def _writable_fp32(logits: Tensor) -> Tensor:
    """``logits`` as fp32 we may overwrite: the tensor itself when it is fp32 and ``owns_its_memory``, else a copy."""
    out = logits.float()
    if out is logits and not owns_its_memory(out):
        out = out.clone(memory_format=torch.contiguous_format)  # a view may share memory with other state
    return out


class _CarriedLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits)`` with the ``carried`` rows (B, D, 1) made one-hot at ``index`` (B, D, 1): log-prob
    0 there, -inf elsewhere. Differentiable in ``logits``; the gradient at carried rows is zero.

    The same values and gradients as ``log_softmax`` followed by ``masked_fill`` and ``scatter``, but the only
    (B, D, V) tensor kept for backward is the output: the chain of ops kept two.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, carried: Tensor, index: Tensor) -> Tensor:
        out = torch.log_softmax(logits, dim=-1)
        out.masked_fill_(carried, float("-inf")).scatter_(-1, index, torch.where(carried, 0.0, out.gather(-1, index)))
        ctx.save_for_backward(out, carried)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        out, carried = ctx.saved_tensors
        # At the other rows out is log_softmax's own output; carried rows get no gradient (constant rows).
        grad_in = torch.ops.aten._log_softmax_backward_data(grad.contiguous(), out, -1, out.dtype)
        return grad_in.masked_fill_(carried, 0.0), None, None


def _log_softmax_in_place(out: Tensor, carried: Tensor | None = None, index: Tensor | None = None) -> Tensor:
    """Log-softmax ``out`` (B, D, V) in place, chunk by chunk; rows with ``carried`` (B, D, 1) become one-hot at
    ``index`` (B, D, 1): log-prob 0 there, -inf elsewhere."""
    V = out.shape[-1]
    flat = out.view(-1, V)  # (B*D, V)
    step = max(1, _CHUNK_ELEMENTS // V)
    for start in range(0, flat.shape[0], step):
        rows = flat[start : start + step]  # (n, V) view
        rows.copy_(torch.log_softmax(rows, dim=-1))  # the same values as one log_softmax over all rows
        if carried is not None:
            keep = carried.view(-1, 1)[start : start + step]  # (n, 1)
            idx = index.view(-1, 1)[start : start + step]  # (n, 1)
            rows.masked_fill_(keep, float("-inf"))
            rows.scatter_(-1, idx, torch.where(keep, 0.0, rows.gather(-1, idx)))
    return out
