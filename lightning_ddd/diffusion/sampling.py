"""Ancestral k-step samplers of discrete diffusion, with temperature / top-k / top-p filtering and RADD caching.

One step from t to s < t on the uniform grid t_k = k / n draws a clean guess x_hat ~ p_theta(. | z_t) per
dimension and then z_s ~ q(z_s | z_t, x_hat) from the forward process's exact posterior; the last step
(s = 0) returns x_hat at every free position. Every categorical draw runs in ``precision`` (float64 by
default; see ``categorical.py`` for why low-precision noise biases the draws).

For the masked process the posterior draw is split into "does this masked dimension unmask?" (a uniform
draw against (alpha_s - alpha_t) / (1 - alpha_t)) and "to which token?" (x_hat). The split is exact, and
because the unmasking decision comes first, x_hat is drawn only at the positions that unmask in the step,
and the RADD caching sampler (Ou et al., 2025) can skip the network in every step where a sequence unmasks
nothing, while consuming the same random numbers as the uncached sampler: both return identical tokens for
the same seed. For the uniform process x_hat is drawn at every free position and z_s ~ q(z_s | z_t, x_hat)
by one mixture-component draw per position (``UniformProcess.posterior_sample``).

Memory: beyond the network's own (B, D, V) output a step allocates O(B D) plus O(chunk V) for the rows it
draws (``draws.sample_positions``); nothing else of size (B, D, V). The caching sampler keeps one (B, D, V)
cache, which is the network output itself whenever every row is evaluated.

Shapes: token ids (B, D) long; log-probabilities (B, D, V).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ddd.diffusion.categorical import resolve_precision
from lightning_ddd.diffusion.draws import TOP_P_TOL, sample_positions
from lightning_ddd.diffusion.processes import DiscreteProcess, MaskedProcess, owns_its_memory

__all__ = [
    "SampleOutput", "StepCondition", "filter_logits", "sample", "takes_step_times", "validate_sampling_args",
]

#: ``cond = step_condition(num_samples, generator)``: a fresh per-step input for a distilled student; a hook
#: that also takes keyword arguments ``t`` and ``s`` (or ``**kwargs``) is told the step's times (floats).
StepCondition = Callable[..., Any]


def takes_step_times(step_condition: Callable[..., Any]) -> bool:
    """Whether ``step_condition`` accepts the keyword arguments ``t`` and ``s`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(step_condition).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature: the two-argument form
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(name in params and params[name].kind is not inspect.Parameter.POSITIONAL_ONLY for name in ("t", "s"))


@dataclass(frozen=True)
class SampleOutput:
    """What ``sample`` returns.

    Attributes:
        tokens: (B, D) long sampled ids, never the mask id.
        nfe: (B,) long number of network evaluations each sequence took part in.
    """

    tokens: Tensor
    nfe: Tensor


def _check_int(name: str, value: Any, minimum: int, note: str = "") -> None:
    """Raise a one-line ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {minimum}{note}.")


def validate_sampling_args(
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    precision: str | torch.dtype = "float64",
    num_steps: int = 1,
    num_samples: int = 1,
    seq_len: int = 1,
) -> None:
    """Check sampler arguments before any work starts; each error is one line naming the value and range.

    Args:
        temperature: must be finite and > 0.
        top_p: must lie in (0, 1].
        top_k: must be an integer >= 0 (0 = off).
        precision: "float64" or "float32".
        num_steps, num_samples, seq_len: must be integers >= 1.

    Raises:
        ValueError: on the first invalid argument.
    """
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(
            f"temperature={temperature!r} is invalid: it must be a finite number > 0 (1.0 leaves p_theta unchanged)."
        )
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} is invalid: it must lie in (0, 1] (1.0 disables nucleus filtering).")
    _check_int("top_k", top_k, 0, " (0 disables top-k filtering)")
    resolve_precision(precision)
    _check_int("num_steps", num_steps, 1)
    _check_int("num_samples", num_samples, 1)
    _check_int("seq_len", seq_len, 1)


def filter_logits(log_probs: Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p, Holtzman et al., 2020) filtering of categorical log-probs.

    Args:
        log_probs: (..., V) log-probabilities (or logits); ``-inf`` marks impossible classes.
        temperature: divides the log-probabilities (< 1 sharpens, > 1 flattens).
        top_k: keep the k most likely classes (exactly k, ties broken arbitrarily); 0 = off.
        top_p: keep the smallest set of most likely classes whose mass is >= top_p (up to 1e-9 of
            round-off), always at least the argmax; 1.0 = off.

    Returns:
        (..., V) float64 log-probabilities renormalised over the kept classes; ``-inf`` elsewhere.
    """
    validate_sampling_args(temperature=temperature, top_p=top_p, top_k=top_k)
    # float64 throughout: the nucleus cut compares cumulative masses, where float32 round-off moves the cut.
    out = torch.log_softmax(log_probs.to(torch.float64) / temperature, dim=-1)  # (..., V)
    V = out.shape[-1]
    if 0 < top_k < V:
        keep = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, out.topk(top_k, dim=-1).indices, True)
        out = torch.log_softmax(out.masked_fill(~keep, -math.inf), dim=-1)
    if top_p < 1.0:
        sorted_lp, order = out.sort(dim=-1, descending=True, stable=True)  # (..., V)
        probs = sorted_lp.exp()
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely classes
        drop_sorted = mass_before >= top_p - TOP_P_TOL
        drop_sorted[..., 0] = False  # the argmax always survives
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = torch.log_softmax(out.masked_fill(drop, -math.inf), dim=-1)
    return out


def _check_fixed(fixed: Tensor | None, num_samples: int, seq_len: int, vocab_size: int) -> None:
    """Raise a one-line ValueError unless ``fixed`` is None or (B, D) ids in [0, V) with -1 at free positions."""
    if fixed is None:
        return
    shape = f"({num_samples}, {seq_len})"
    if not isinstance(fixed, Tensor) or fixed.dtype.is_floating_point or fixed.dtype.is_complex:
        raise ValueError(f"fixed must be an integer tensor of shape {shape} with -1 at free positions.")
    if tuple(fixed.shape) != (num_samples, seq_len):
        raise ValueError(f"fixed has shape {tuple(fixed.shape)} but must be (num_samples, seq_len) = {shape}.")
    if fixed.numel() and (int(fixed.min()) < -1 or int(fixed.max()) >= vocab_size):
        raise ValueError(
            f"fixed ids range over [{int(fixed.min())}, {int(fixed.max())}] but must be -1 (free) "
            f"or a token id in [0, {vocab_size})."
        )


def _unmask_prob(process: MaskedProcess, s: float, t: float) -> float:
    """Masked posterior: P(a dimension masked at t is unmasked at s) = (alpha_s - alpha_t) / (1 - alpha_t)."""
    alpha_s, alpha_t = process.schedule.alpha(torch.tensor([s, t], dtype=torch.float64)).tolist()
    return min(max((alpha_s - alpha_t) / (1.0 - alpha_t), 0.0), 1.0)


def sample(
    denoiser: Callable[..., Tensor],
    process: DiscreteProcess,
    num_samples: int,
    seq_len: int,
    num_steps: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    precision: str | torch.dtype = "float64",
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    cache: bool = False,
    step_condition: StepCondition | None = None,
    fixed: Tensor | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Ancestral k-step sampling of masked or uniform diffusion, optionally with RADD caching (Ou et al., 2025).

    Steps run on t_k = k / num_steps for k = num_steps .. 1. At each step x_hat ~ filtered p_theta(. | z_t)
    per dimension, then z_s ~ q(z_s | z_t, x_hat); the last step returns x_hat at every still-masked (masked)
    or free (uniform) position.

    Args:
        denoiser: ``(z_t (B, D) long, t (B,) float32) -> log p_theta(x | z_t)`` (B, D, V) fp32, or
            ``(z_t, t, cond) -> ...`` when ``step_condition`` is given. For the masked process, unmasked
            positions must carry their own token with probability 1 (as ``process.x0_log_probs`` does).
        process: the forward process (``MaskedProcess`` or ``UniformProcess``).
        num_samples: B, the number of sequences.
        seq_len: D, the sequence length.
        num_steps: n, the number of denoising steps (>= 1).
        temperature, top_p, top_k: filtering of p_theta, see ``filter_logits``.
        precision: dtype of every categorical / uniform draw ("float64" or "float32").
        generator: torch.Generator on ``device`` for reproducible samples (None = global RNG).
        device: where the sequences live.
        cache: RADD caching sampler, masked process with a time-independent denoiser only. The network
            runs on a sequence only in steps where it unmasks at least one position and its z_t changed
            since its last evaluation (otherwise the cached log-probs are reused), so its NFE is the number
            of distinct steps in which it unmasks something: n (1 - (1 - 1/n)^D) in expectation under the
            log-linear schedule. Tokens are identical to ``cache=False`` for the same seed. The sampler
            keeps (and writes into) the tensor the denoiser returns, unless it is a view: return a fresh one.
        step_condition: called once per step as ``cond = step_condition(num_samples, generator)``; the
            denoiser then gets ``cond`` as a third argument (distilled students' fresh lambda or noise). A
            hook that accepts keyword arguments ``t`` and ``s`` is called as ``step_condition(num_samples,
            generator, t=t, s=s)`` with the step's times (floats, s < t), for students that see their step.
        fixed: (B, D) long, -1 at free positions, else the token to keep there (prefix or infilling).
            Masked: these positions start unmasked; uniform: they are written into z_t at every step.
        progress: show a progress bar over steps.

    Returns:
        ``SampleOutput(tokens (B, D) long, nfe (B,) long)``; without caching nfe = num_steps everywhere.

    Raises:
        ValueError: on invalid arguments, ``cache=True`` with a non-masked process or with a
            ``step_condition`` (a per-step input changes the output, so it cannot be cached), or a
            denoiser output of the wrong shape. Arguments are checked before the denoiser is called.
    """
    validate_sampling_args(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        precision=precision,
        num_steps=num_steps,
        num_samples=num_samples,
        seq_len=seq_len,
    )
    masked = isinstance(process, MaskedProcess)
    if cache and not masked:
        raise ValueError(
            f"cache=True is the RADD caching sampler for a masked process; got {type(process).__name__}, "
            "whose z_t changes every step."
        )
    if cache and step_condition is not None:
        raise ValueError("cache=True cannot be combined with step_condition: a fresh per-step input breaks the cache.")
    _check_fixed(fixed, num_samples, seq_len, process.vocab_size)
    dtype = resolve_precision(precision)
    B, D, V, n = num_samples, seq_len, process.vocab_size, num_steps
    with_times = step_condition is not None and takes_step_times(step_condition)

    with torch.no_grad():
        z = process.prior_sample(B, D, generator, device)  # (B, D)
        is_fixed = None
        if fixed is not None:
            fixed = fixed.to(device=device, dtype=torch.long)
            is_fixed = fixed >= 0  # (B, D)
            z = torch.where(is_fixed, fixed, z)
        # Uniform: x_hat is drawn at every free position, every step.
        free = None if masked else (torch.arange(B * D, device=device) if is_fixed is None else _flat(~is_fixed))
        nfe = torch.zeros(B, dtype=torch.long, device=device)
        # changed[b]: z_t[b] differs from the input its cached log-probs were computed on (or there are none).
        changed = torch.ones(B, dtype=torch.bool, device=device)
        cached: Tensor | None = None  # (B, D, V): the latest network output of every row (cache=True)

        for k in tqdm(range(n, 0, -1), total=n, desc="sampling", disable=not progress, leave=False):
            t, s, last = k / n, (k - 1) / n, k == 1
            t_batch = torch.full((B,), t, dtype=torch.float32, device=device)  # (B,)
            if step_condition is None:
                cond = None
            else:
                cond = step_condition(B, generator, t=t, s=s) if with_times else step_condition(B, generator)

            update = None  # (B, D) masked dimensions that take x_hat in this step (masked process)
            if masked:
                # Which masked dimensions unmask is drawn before (and independently of) the network call,
                # so the cached and uncached samplers consume the random stream identically, and x_hat is
                # drawn only where it is used.
                still_masked = z == process.mask_id  # (B, D)
                if last:
                    update = still_masked  # s = 0: every remaining mask takes x_hat
                else:
                    u = torch.rand((B, D), generator=generator, device=device, dtype=dtype)
                    update = still_masked & (u < _unmask_prob(process, s, t))  # (B, D)

            if not cache:
                log_probs = _call(denoiser, z, t_batch, step_condition is not None, cond, (B, D, V))
                nfe += 1
            else:
                rows = update.any(dim=-1) & changed  # (B,) rows that need a fresh network output
                if bool(rows.all()):
                    cached = None  # every row is recomputed: free the old cache before the network call
                cached = _cached_call(denoiser, z, t_batch, rows, cached, nfe, changed, V)
                log_probs = cached
            positions = _flat(update) if masked else free  # (N,) flat indices of the rows drawn now
            x_hat = (  # (N,)
                sample_positions(log_probs, positions, generator, dtype, temperature, top_k, top_p)
                if positions.numel()
                else positions
            )
            del log_probs  # without the cache, the network output is dropped before the next call

            if masked:
                z_next = z.clone()
                z_next.view(-1)[positions] = x_hat
            else:
                x_full = z.clone()  # (B, D), x_hat at free positions (fixed ones are rewritten below)
                x_full.view(-1)[positions] = x_hat
                z_next = x_full if last else process.posterior_sample(z, x_full, s, t, generator, dtype)
                if is_fixed is not None:
                    z_next = torch.where(is_fixed, fixed, z_next)
            changed |= (z_next != z).any(dim=-1)
            z = z_next

    return SampleOutput(tokens=z, nfe=nfe)


def _flat(mask: Tensor) -> Tensor:
    """(B, D) bool -> (N,) long flat indices ``b * D + d`` of its True entries, in row-major order."""
    return mask.reshape(-1).nonzero().squeeze(-1)


def _cached_call(
    denoiser: Callable[..., Tensor],
    z: Tensor,
    t: Tensor,
    rows: Tensor,
    cached: Tensor | None,
    nfe: Tensor,
    changed: Tensor,
    V: int,
) -> Tensor | None:
    """RADD: evaluate only ``rows`` (B,) and write their output into the (B, D, V) cache; returns the cache.

    With no cache yet and every row evaluated, the output itself becomes the cache (no second (B, D, V)
    buffer). ``nfe`` and ``changed`` are updated in place.
    """
    B, D = z.shape
    if not bool(rows.any()):
        return cached
    if cached is None and bool(rows.all()):
        out = _call(denoiser, z, t, False, None, (B, D, V))  # (B, D, V)
        # Later steps write into the cache: a view could share memory with the denoiser's own state.
        cached = out if owns_its_memory(out) else out.clone(memory_format=torch.contiguous_format)
        nfe += 1
    else:
        idx = rows.nonzero().squeeze(-1)  # (R,)
        out = _call(denoiser, z[idx], t[idx], False, None, (idx.numel(), D, V))  # (R, D, V)
        if cached is None:
            cached = out.new_empty(B, D, V)  # rows never evaluated are never read: they have nothing to draw
        cached[idx] = out
        nfe[idx] += 1
    changed &= ~rows
    return cached


def _call(
    denoiser: Callable[..., Tensor], z: Tensor, t: Tensor, with_cond: bool, cond: Any, shape: tuple[int, int, int]
) -> Tensor:
    """Run the denoiser (passing ``cond`` when a step condition is in use) and check its (R, D, V) output."""
    out = denoiser(z, t, cond) if with_cond else denoiser(z, t)
    if tuple(out.shape) != shape:
        raise ValueError(
            f"the denoiser returned shape {tuple(out.shape)} but the sampler needs {shape} = (batch, seq_len, "
            "vocab_size) log-probabilities; wrap backbone logits with process.x0_log_probs(logits, z_t)."
        )
    return out
