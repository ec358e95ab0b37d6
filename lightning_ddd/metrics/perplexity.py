"""Generative perplexity: how likely an evaluator model finds the samples, token-weighted exp(mean NLL).

An ``Evaluator`` scores samples: ``nll(samples) -> (summed NLL in nats (N,), scored tokens (N,))``. Three
kinds: ``HFCausalLMEvaluator`` (any Hugging Face causal LM, GPT-2 large by convention; it reads decoded
text, retokenizes it and skips each text's first token), ``ARModelEvaluator`` (an ``ARLanguageModel``
this project trained on the same data; reads token ids) and ``OracleEvaluator`` (the exact density of
synthetic data). Evaluators are plain objects, not modules: a metric or callback that holds one never
puts its weights in a checkpoint, and deep copies (EMA, ``Metric.clone``) share it. Metrics never load
models: ``lightning_ddd.evaluation.load_evaluator`` builds each evaluator once per process and hands it over.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_ddd.extras import require

Samples = Tensor | Sequence[str]


class Evaluator(ABC):
    """Scores samples. ``wants_text``: True if ``score`` takes decoded strings, False for (N, D) token ids."""

    wants_text: bool = False
    name: str = "evaluator"

    @abstractmethod
    def score(self, samples: Samples) -> tuple[Tensor, Tensor]:
        """Summed NLL in nats (N,) and number of scored tokens (N,); differentiable for torch models."""

    def nll(self, samples: Samples) -> tuple[Tensor, Tensor]:
        """``score`` without gradients."""
        with torch.no_grad():
            return self.score(samples)

    def __deepcopy__(self, memo: dict) -> "Evaluator":
        return self  # frozen and shared: copies of the module holding it must not copy the weights


class TorchEvaluator(Evaluator):
    """An evaluator backed by a torch model (``self.model``): usable as p_LM for the gradient moment."""

    model: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "TorchEvaluator":
        self.model.to(device)
        return self


class OracleEvaluator(Evaluator):
    """The exact log-likelihood of data with a known density (``MarkovChain``): every token is scored.

    Args:
        datamodule: a DataModule whose ``oracle_log_likelihood`` is not None.
    """

    name = "oracle"

    def __init__(self, datamodule) -> None:
        probe = torch.zeros(1, datamodule.seq_len, dtype=torch.long)
        if datamodule.oracle_log_likelihood(probe) is None:
            raise ValueError(f"{type(datamodule).__name__} has no known density; the oracle evaluator needs one.")
        self.datamodule = datamodule

    def score(self, samples: Samples) -> tuple[Tensor, Tensor]:
        tokens = _as_tokens(samples, self)
        nll = -self.datamodule.oracle_log_likelihood(tokens).double()  # (N,)
        return nll, torch.full_like(nll, tokens.shape[1])


class ARModelEvaluator(TorchEvaluator):
    """A left-to-right model trained on the same data (an ``ARLanguageModel``); every token is scored (it
    models the first token after BOS). Build one from a checkpoint with
    ``lightning_ddd.evaluation.load_ar_evaluator``.

    Args:
        model: a module with ``sequence_log_prob((N, D) ids) -> (N,)`` and ``vocab_size``; frozen here.
        name: what results record as the evaluator (e.g. the checkpoint path).
        batch_size: sequences per forward pass.
    """

    def __init__(self, model: nn.Module, name: str = "ar-model", batch_size: int = 64) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.name = name
        self.batch_size = batch_size

    def score(self, samples: Samples) -> tuple[Tensor, Tensor]:
        tokens = _as_tokens(samples, self)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.model.vocab_size):
            raise ValueError(
                f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but the evaluator was trained with "
                f"vocab_size={self.model.vocab_size}; use an evaluator trained on this data."
            )
        chunks = tokens.split(self.batch_size)
        nll = torch.cat([-self.model.sequence_log_prob(chunk.to(self.device)) for chunk in chunks])
        return nll, torch.full_like(nll, tokens.shape[1])


class HFCausalLMEvaluator(TorchEvaluator):
    """A Hugging Face causal LM (GPT-2 large by convention) scoring decoded text.

    Each text is retokenized with the LM's tokenizer and cut into windows of at most ``max_length`` tokens;
    each window's first token is not scored (it has no context), as in the field's generative perplexity.

    Args:
        name_or_path: hub name or local folder of the model and tokenizer (needs the ``text`` extra).
        device: where to run it.
        batch_size: windows per forward pass.
        max_length: window length (default: the model's context size).
        torch_dtype: weights dtype, e.g. ``"bfloat16"`` (default: the checkpoint's).
        model: an already loaded causal LM (then ``tokenizer`` too); skips loading, e.g. in tests.
        tokenizer: its tokenizer: ``tokenizer(texts)["input_ids"]`` gives lists of ids.
    """

    wants_text = True

    def __init__(self, name_or_path: str = "gpt2-large", device: str | torch.device = "cpu", batch_size: int = 8,
                 max_length: int | None = None, torch_dtype: str | None = None, model: nn.Module | None = None,
                 tokenizer: Callable | None = None) -> None:
        if model is None or tokenizer is None:
            require("transformers", feature=f"the evaluator '{name_or_path}' (a Hugging Face model; offline, use an "
                    "ARLanguageModel checkpoint or 'oracle')")
            import transformers
            tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
            dtype = getattr(torch, torch_dtype) if torch_dtype else None
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=dtype)
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name_or_path
        self.batch_size = batch_size
        config = getattr(model, "config", None)
        context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.max_length = max_length or context or 1024

    def score(self, samples: Samples) -> tuple[Tensor, Tensor]:
        if isinstance(samples, Tensor):
            raise TypeError(f"the evaluator '{self.name}' reads text; decode the samples first.")
        ids = self.tokenizer(list(samples))["input_ids"]
        # Windows of max_length tokens; window w of text i adds to row i.
        windows = [(i, seq[start : start + self.max_length]) for i, seq in enumerate(ids)
                   for start in range(0, len(seq), self.max_length)]
        nll = torch.zeros(len(ids), dtype=torch.float64, device=self.device)
        count = torch.zeros(len(ids), dtype=torch.float64, device=self.device)
        for first in range(0, len(windows), self.batch_size):
            rows, seqs = zip(*windows[first : first + self.batch_size])
            lengths = torch.tensor([len(s) for s in seqs], device=self.device)
            batch = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long, device=self.device)  # (B, L)
            for b, s in enumerate(seqs):
                batch[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask = torch.arange(batch.shape[1], device=self.device)[None] < lengths[:, None]  # (B, L)
            logits = self.model(input_ids=batch, attention_mask=mask.long()).logits  # (B, L, V')
            log_probs = logits[:, :-1].float().log_softmax(-1).gather(-1, batch[:, 1:, None]).squeeze(-1)  # (B, L-1)
            scored = mask[:, 1:]  # the first token of each window is context only
            index = torch.tensor(rows, device=self.device)
            nll = nll.index_add(0, index, -(log_probs * scored).sum(-1).double())
            count = count.index_add(0, index, scored.sum(-1).double())
        return nll, count


def _as_tokens(samples: Samples, evaluator: Evaluator) -> Tensor:
    if not isinstance(samples, Tensor):
        raise TypeError(f"the evaluator '{evaluator.name}' reads token ids, not text; pass the (N, D) tokens.")
    return samples.long()


class GenerativePerplexity(Metric):
    """Token-weighted generative perplexity: summed NLL and token counts are all-reduced, then divided.

    ``update(samples)`` takes (N, D) token ids (decoded with ``decode`` first when the evaluator reads text) or
    a list of texts. ``compute()`` returns ``{"gen_nll": nats per token, "gen_ppl": exp(gen_nll)}``.

    Args:
        evaluator: the scoring model (``lightning_ddd.evaluation.load_evaluator``); held by reference, never
            in ``state_dict``.
        decode: (N, D) ids -> N texts, for text evaluators (e.g. ``datamodule.decode``).
    """

    full_state_update = False

    def __init__(self, evaluator: Evaluator, decode: Callable[[Tensor], list[str]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.evaluator = evaluator
        self.decode = decode
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, samples: Samples) -> None:
        nll, count = self.evaluator.nll(prepare_samples(samples, self.evaluator, self.decode))
        self.nll_sum += nll.double().sum().to(self.device)
        self.num_tokens += count.double().sum().to(self.device)

    def compute(self) -> dict[str, Tensor]:
        if self.num_tokens <= 0:
            raise ValueError("GenerativePerplexity scored no tokens; samples were empty.")
        nll = self.nll_sum / self.num_tokens
        return {"gen_nll": nll, "gen_ppl": torch.exp(nll)}


def prepare_samples(samples: Samples, evaluator: Evaluator, decode: Callable | None) -> Samples:
    """What ``evaluator.score`` takes: decode token ids to text for text evaluators."""
    if evaluator.wants_text and isinstance(samples, Tensor):
        if decode is None:
            raise ValueError(f"the evaluator '{evaluator.name}' reads text: pass decode (e.g. datamodule.decode).")
        samples = decode(samples)
        if isinstance(samples, Tensor):
            raise ValueError(f"the evaluator '{evaluator.name}' reads text but this data decodes to images.")
    return samples
