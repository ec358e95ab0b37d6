"""The base class of the networks a module's ``backbone`` argument builds."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class Backbone(nn.Module, ABC):
    """A network built as ``cls(num_input_tokens, vocab_size, seq_len, **options)`` that maps token ids to
    logits over the ``vocab_size`` real tokens.

    Modules type their ``backbone`` argument with this class, so ``--model.help`` lists the backbones of
    the project (``DenoisingTransformer``, ``CausalTransformer``) and your own subclasses, not every
    ``nn.Module`` that torch defines. A denoiser's ``forward(z, t=None, cond=None)`` takes (B, L) noisy ids,
    optional (B,) times (when ``time_conditioning`` is set) and an optional conditioning input; a causal
    network's ``forward(ids)`` takes (B, L) ids. Both return (B, L, vocab_size) logits. A new network
    subclasses this (or ``DenoisingTransformer``) and is named by ``class_path`` in a config.
    """

    @abstractmethod
    def forward(self, *inputs: Tensor) -> Tensor:
        """Token ids (and, for a denoiser, times and conditioning) -> (B, L, vocab_size) logits."""
