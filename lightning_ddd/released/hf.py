"""Any masked language model that ``transformers`` can load, as a project backbone.

The project's masked process gives the mask the id V (one past the real tokens); a release has its own mask
id somewhere in its vocabulary. The wrapper translates: input id V becomes the release's mask id, the output
keeps the V real-token columns, and when the release's mask id is one of them (BERT's ``[MASK]``, LLaDA's
``<|mdm_mask|>``) that column gets a logit of ``SUPPRESSED_LOGIT``, i.e. probability zero after the softmax.
A student's extra input is added to the output of the release's input embeddings (through ``inputs_embeds``,
or a forward hook on the embedding module when the forward does not take them).
V is the length of the release's tokenizer (the data's vocabulary), or the embedding rows without a trailing
mask when there is no tokenizer. A time input, when the release's forward takes one (MDLM's hub code takes
``timesteps``, the total noise sigma), is filled from t.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_ddd.extras import require
from lightning_ddd.released.conditioning import EmbeddingConditioning
from lightning_ddd.released.dit import loglinear_sigma
from lightning_ddd.released.sources import ReleasedModelError

#: logit of an output column the project never predicts (finite, so KL terms stay 0 * finite, not NaN)
SUPPRESSED_LOGIT = -1e9
TimeInput = Literal["auto", "none", "sigma", "t"]


class HFMaskedLM(EmbeddingConditioning, nn.Module):
    """A ``transformers`` masked LM behind the project's backbone interface.

    ``forward(z, t=None, cond=None)``: (B, L) ids in [0, V] with V the project's mask -> (B, L, V) logits.

    Args:
        model: the loaded ``transformers`` model (its output has ``logits`` of shape (B, L, >= V)).
        mask_id: the release's own mask token id.
        vocab_size: V, real tokens the project sees (ids 0..V-1 are the release's ids 0..V-1).
        seq_len: longest input the release takes (None: no limit known).
        time_input: "none" (the release takes no time), "sigma" (forward's ``timesteps`` gets the log-linear
            total noise), "t" (``timesteps`` gets t itself).
        time_conditioning: whether the release uses its time input (False: it gets zeros and t is ignored).
        noise_eps: eps of the log-linear noise for ``time_input="sigma"``.
    """

    def __init__(self, model: nn.Module, mask_id: int, vocab_size: int, seq_len: int | None,
                 time_input: Literal["none", "sigma", "t"] = "none", time_conditioning: bool = False,
                 noise_eps: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.num_input_tokens = vocab_size + 1
        self.seq_len = seq_len
        self.time_input = time_input
        self.time_conditioning = time_conditioning and time_input != "none"
        self.noise_eps = noise_eps
        embeddings = input_embeddings(model)
        self.d_model = int(embeddings.weight.shape[1]) if embeddings is not None else 0
        self.cond_proj: nn.Sequential | None = None
        self.cond_dim = 0

    @property
    def embedding_weight(self) -> Tensor:
        return input_embeddings(self.model).weight

    def add_cond_input(self, cond_dim: int) -> None:
        """Add the zero-initialised extra input at the release's token embeddings (see ``forward``)."""
        if not self.d_model:
            raise ReleasedModelError(
                f"{type(self.model).__name__} exposes no input embeddings (get_input_embeddings), so a conditioning "
                "input cannot be added at its embeddings; use a release the project rebuilds natively (MDLM, SEDD)."
            )
        super().add_cond_input(cond_dim)

    def _time_kwargs(self, t: Tensor | None, B: int, device: torch.device) -> dict[str, Tensor]:
        if self.time_input == "none":
            return {}
        if not self.time_conditioning:
            return {"timesteps": torch.zeros(B, device=device)}  # the release zeroes its time input anyway
        if t is None:
            raise ReleasedModelError("this release is time-conditioned; its forward needs t.")
        t = t.reshape(-1).to(device).float().expand(B) if t.numel() == 1 else t.reshape(-1).to(device).float()
        return {"timesteps": loglinear_sigma(t, self.noise_eps) if self.time_input == "sigma" else t}

    def forward(self, z: Tensor, t: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        if z.dim() != 2:
            raise ReleasedModelError(f"HFMaskedLM: expected token ids of shape (B, L), got {tuple(z.shape)}.")
        B, L = z.shape
        if self.seq_len is not None and L > self.seq_len:
            raise ReleasedModelError(f"HFMaskedLM: input has {L} positions but the release takes at most {self.seq_len}.")
        ids = torch.where(z == self.vocab_size, torch.full_like(z, self.mask_id), z)  # project mask -> release mask
        kwargs: dict[str, Any] = self._time_kwargs(t, B, z.device)
        if cond is None:
            out = self.model(input_ids=ids, **kwargs)
        elif "inputs_embeds" in inspect.signature(self.model.forward).parameters:
            embeds = input_embeddings(self.model)(ids) + self.cond_term(cond, B, L)  # (B, L, d)
            out = self.model(inputs_embeds=embeds, **kwargs)
        else:  # a forward hook adds the term to the embedding module's output
            term = self.cond_term(cond, B, L)  # (B, 1 or L, d)
            handle = input_embeddings(self.model).register_forward_hook(lambda module, args, output: output + term)
            try:
                out = self.model(input_ids=ids, **kwargs)
            finally:
                handle.remove()
        logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
        if logits.dim() != 3 or logits.shape[-1] < self.vocab_size:
            raise ReleasedModelError(f"{type(self.model).__name__} returned logits of shape {tuple(logits.shape)}; "
                                     f"expected (B, L, >= {self.vocab_size}).")
        logits = logits[..., : self.vocab_size]  # (B, L, V)
        if self.mask_id < self.vocab_size:  # the release's mask is a real-vocabulary id: never predict it
            logits = logits.index_fill(-1, torch.tensor([self.mask_id], device=z.device), SUPPRESSED_LOGIT)
        return logits


# ---------------------------------------------------------------------------------------------------
# Loading


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The release's token embedding module, or None when its code does not expose one (MDLM's hub code)."""
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    return embeddings if isinstance(getattr(embeddings, "weight", None), Tensor) else None


def auto_class(config: dict[str, Any], where: str, trust_remote_code: bool):
    """(transformers Auto class, whether it runs the release's code) for this config; refuses remote code
    unless ``trust_remote_code``. Reads only config.json."""
    require("transformers", feature=f"loading '{where}' through transformers")
    import transformers

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type, auto_map = config.get("model_type"), config.get("auto_map") or {}
    if model_type in CONFIG_MAPPING_NAMES and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return transformers.AutoModelForMaskedLM, False
    # Releases outside transformers bring their own code; LLaDA maps AutoModel only.
    name = next((n for n in ("AutoModelForMaskedLM", "AutoModel") if n in auto_map), None)
    if name is None:
        raise ReleasedModelError(
            f"'{where}' (model_type {model_type!r}) is not a masked language model transformers can load: it has no "
            "masked-LM class in transformers and no auto_map to its own code."
        )
    if not trust_remote_code:
        raise ReleasedModelError(
            f"'{where}' runs its own Python code ({name} -> {auto_map[name]}); read it, then set "
            "trust_remote_code: true to allow it (or use a release the project rebuilds natively: MDLM, SEDD)."
        )
    return getattr(transformers, name), True


def load_hf_model(folder: str, config: dict[str, Any], where: str, trust_remote_code: bool) -> nn.Module:
    """Load the model in ``folder`` through transformers (no network: ``folder`` is local)."""
    auto, remote = auto_class(config, where, trust_remote_code)
    try:
        return auto.from_pretrained(folder, trust_remote_code=remote)
    except Exception as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ReleasedModelError(f"transformers could not load '{where}' ({type(err).__name__}: {reason}).") from None


def resolve_time_input(model: nn.Module, time_input: TimeInput) -> Literal["none", "sigma", "t"]:
    """"auto": the total noise sigma when the release's forward takes ``timesteps`` (MDLM's hub code), else none."""
    takes_time = "timesteps" in inspect.signature(model.forward).parameters
    if time_input == "auto":
        return "sigma" if takes_time else "none"
    if time_input != "none" and not takes_time:
        raise ReleasedModelError(f"time_input={time_input!r} but {type(model).__name__}.forward takes no 'timesteps'; use 'none'.")
    return time_input


def model_max_length(config: dict[str, Any]) -> int | None:
    """The longest input the release takes, from the usual config fields (None: not stated)."""
    for key in ("max_position_embeddings", "model_length", "max_sequence_length", "n_positions"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None
