"""D-MMD's gradient moment ||E_gen[grad log p_LM(x)] - E_data[grad log p_LM(x)]||^2, estimated without bias.

Perplexity alone can be gamed (repetitive samples score well); the gradient moment compares the whole
distributions through an LM's score function. The plug-in ||g_gen - g_data||^2 of batch means is biased
upwards by the variance of the means (positive even when gen = data), so samples are split into two
independent halves and the estimate is the cross product (g_gen,1 - g_data,1) . (g_gen,2 - g_data,2), whose
expectation is exactly the squared norm.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_ddd.metrics.perplexity import Samples, TorchEvaluator, prepare_samples

_GROUPS = ("gen_1", "gen_2", "data_1", "data_2")


@contextmanager
def _requiring_grad(params: list[nn.Parameter]) -> Iterator[None]:
    """Evaluators are frozen; switch their parameters on for one backward pass and restore the flags."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class GradientMoment(Metric):
    """Unbiased ||E_gen[grad_theta log p_LM(x)] - E_data[grad_theta log p_LM(x)]||^2 with p_LM an evaluator.

    ``update(samples, source)`` with ``source`` ``"gen"`` or ``"data"`` adds the samples' gradients of
    log p_LM(x) (the summed log-likelihood of each sample) to one of two independent halves per source,
    alternating sample by sample. States are the four gradient sums and counts (summed across processes).
    ``compute()`` returns the scalar cross-product estimate (it can be slightly negative).

    Memory: four float32 vectors of the selected parameters' size; restrict large LMs with ``param_filter``.

    Args:
        evaluator: a torch-model evaluator (``ARModelEvaluator``, ``HFCausalLMEvaluator``, ...).
        param_filter: regular expression; only parameters whose name matches (``re.search``) count. None: all.
        decode: (N, D) ids -> texts, for text evaluators.
    """

    full_state_update = False

    def __init__(self, evaluator: TorchEvaluator, param_filter: str | None = None,
                 decode: Callable[[Tensor], list[str]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(getattr(evaluator, "model", None), nn.Module):
            raise TypeError(f"the gradient moment needs an evaluator backed by a torch model, not '{evaluator.name}'.")
        self.evaluator, self.decode, self.param_filter = evaluator, decode, param_filter
        size = sum(p.numel() for p in self._params())
        if size == 0:
            raise ValueError(f"param_filter={param_filter!r} selects no parameter of the evaluator.")
        for group in _GROUPS:
            self.add_state(group, default=torch.zeros(size), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(len(_GROUPS), dtype=torch.float64), dist_reduce_fx="sum")
        self._next_half = {"gen": 0, "data": 0}

    def _params(self) -> list[nn.Parameter]:
        named = self.evaluator.model.named_parameters()
        return [p for name, p in named if self.param_filter is None or re.search(self.param_filter, name)]

    def _grad_sum(self, samples: Samples) -> Tensor:
        """Flattened grad_theta of sum_i log p_LM(x_i): (P,) on this metric's device."""
        params = self._params()
        with _requiring_grad(params), torch.enable_grad():
            nll, _ = self.evaluator.score(samples)
            grads = torch.autograd.grad(-nll.sum(), params, allow_unused=True)
        flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
        return torch.cat(flat).float().to(self.device)

    def update(self, samples: Samples, source: Literal["gen", "data"]) -> None:
        if source not in self._next_half:
            raise ValueError(f"source={source!r} must be 'gen' or 'data'.")
        samples = prepare_samples(samples, self.evaluator, self.decode)
        start = self._next_half[source]
        halves = ([i for i in range(len(samples)) if (i + start) % 2 == h] for h in (0, 1))
        for half, index in enumerate(halves):
            if not index:
                continue
            part = samples[torch.tensor(index)] if isinstance(samples, Tensor) else [samples[i] for i in index]
            group = f"{source}_{half + 1}"
            setattr(self, group, getattr(self, group) + self._grad_sum(part))
            self.counts[_GROUPS.index(group)] += len(index)
        self._next_half[source] = (start + len(samples)) % 2

    def compute(self) -> Tensor:
        if bool((self.counts == 0).any()):
            raise ValueError(
                "GradientMoment needs at least two generated and two data samples (one per half); got counts "
                f"{dict(zip(_GROUPS, self.counts.tolist()))}."
            )
        mean = {g: getattr(self, g).double() / self.counts[i] for i, g in enumerate(_GROUPS)}
        return torch.dot(mean["gen_1"] - mean["data_1"], mean["gen_2"] - mean["data_2"])

    def reset(self) -> None:
        super().reset()
        self._next_half = {"gen": 0, "data": 0}
