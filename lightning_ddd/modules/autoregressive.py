"""An autoregressive LM trained on the same data as the diffusion models: an offline evaluator for
generative perplexity and the gradient moment, and a left-to-right baseline.

It subclasses ``DiffusionModule`` to share the CLI's links (vocab_size, seq_len), the optimiser set-up,
the training/validation steps and the checkpoint checks; it has no forward process. Its one extra input id, ``vocab_size``, is
BOS, so the first token is modelled too and ``sequence_log_prob`` is an exact, normalised log p(x).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ddd.diffusion.categorical import sample_categorical
from lightning_ddd.diffusion.sampling import SampleOutput, filter_logits, validate_sampling_args
from lightning_ddd.metrics import NLLMetric
from lightning_ddd.modules.base import BackboneFactory, DiffusionModule
from lightning_ddd.nn.causal import CausalTransformer


class BOSInput:
    """Stands in for the forward process of ``DiffusionModule``: the AR model's inputs are the V real ids
    plus BOS (id V). Anything that expects a real diffusion process fails loudly on it."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bos_id = vocab_size
        self.num_input_tokens = vocab_size + 1

    def __repr__(self) -> str:
        return f"BOSInput(vocab_size={self.vocab_size})"


class ARLanguageModel(DiffusionModule):
    """Left-to-right LM: log p(x) = sum_i log p(x_i | BOS, x_<i), trained by maximum likelihood.

    Logs ``train/loss`` (nats/token) and ``val/nll``, ``val/ppl``, ``val/bpd`` (exact, not
    bounds). ``generate`` samples left to right, so ``sample``/``evaluate`` work on it as a baseline
    (``steps`` is ignored: every sample takes seq_len network evaluations).

    Args:
        vocab_size: real token ids V (linked from the data).
        seq_len: sequence length D (linked from the data).
        backbone: a causal network, built as ``backbone(vocab_size + 1, vocab_size, seq_len)``.
        optimizer: optimiser, built as ``optimizer(parameters)``.
        lr_scheduler: optional LR schedule, stepped every optimiser step.
        seed: seed of the (unused by the loss) noise generators, kept for the shared base.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        backbone: BackboneFactory = CausalTransformer,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(vocab_size, seq_len, BOSInput, backbone, optimizer, lr_scheduler, seed)
        self.val_nll = NLLMetric()

    @property
    def bos_id(self) -> int:
        return self.vocab_size

    def denoise(self, z_t: Tensor, t: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        raise TypeError("ARLanguageModel is not a denoiser; use sequence_log_prob or generate.")

    def next_token_log_probs(self, tokens: Tensor) -> Tensor:
        """log p(x_i | x_<i) for every position: (B, D) ids -> (B, D, V) fp32 log-probs."""
        bos = torch.full_like(tokens[:, :1], self.bos_id)
        logits = self.backbone(torch.cat([bos, tokens[:, :-1]], dim=1))  # (B, D, V): input shifted right
        return logits.float().log_softmax(-1)

    def sequence_log_prob(self, tokens: Tensor) -> Tensor:
        """Exact log p(x) in nats of (B, D) ids; (B,) fp32, differentiable."""
        log_probs = self.next_token_log_probs(tokens)  # (B, D, V)
        return log_probs.gather(-1, tokens[..., None]).squeeze(-1).sum(-1)  # (B,)

    def compute_losses(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return {"loss": -self.sequence_log_prob(x).mean() / x.shape[1]}  # nats per token; no noise drawn

    def validation_losses(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        nll = -self.sequence_log_prob(x)  # (B,)
        self.val_nll.update(nll, x.shape[1])
        return {}  # val/nll is this NLL per token: a val/loss would log the same number twice

    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        num_steps: int | None = None,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        precision: str = "float64",
        generator: torch.Generator | None = None,
        progress: bool = False,
        **ignored: Any,
    ) -> SampleOutput:
        """Ancestral left-to-right sampling of (num_samples, seq_len) tokens with temperature/top-k/top-p.

        ``num_steps`` and diffusion-only options (``cache``, ``fixed``) are ignored.
        """
        validate_sampling_args(temperature=temperature, top_p=top_p, top_k=top_k, precision=precision,
                               num_samples=num_samples, seq_len=self.seq_len)
        ids = torch.full((num_samples, 1), self.bos_id, dtype=torch.long, device=self.device)  # (B, 1)
        for _ in range(self.seq_len):
            # Full recompute per step (no KV cache): evaluator models are small and this keeps one code path.
            last = self.backbone(ids)[:, -1].float().log_softmax(-1)  # (B, V)
            filtered = filter_logits(last, temperature, top_p, top_k)
            ids = torch.cat([ids, sample_categorical(filtered, generator, precision)[:, None]], dim=1)
        nfe = torch.full((num_samples,), self.seq_len, dtype=torch.long, device=self.device)
        return SampleOutput(tokens=ids[:, 1:], nfe=nfe)
