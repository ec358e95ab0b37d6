"""From a released model's folder to a project backbone: recognise the layout, build the network, load weights.

Layouts, recognised from config.json:

- ``mdlm``: MDLM's hub layout (kuleshov-group/mdlm-owt): ``model_type: mdlm`` with ``hidden_dim``, ``cond_dim``,
  ``n_blocks``, ``n_heads``, ``vocab_size`` (mask included, last), ``model_length``, ``time_conditioning``;
  weights under ``backbone.``. Rebuilt natively (:mod:`lightning_ddd.released.dit`).
- ``sedd``: SEDD's hub layout (louaaron/sedd-small, written by ``PyTorchModelHubMixin``): the training config
  (``tokens``, ``graph.type``, ``noise.type``, ``model.*``); weights without prefix. Rebuilt natively; only the
  absorbing graph with log-linear noise is a masked model the project can use.
- ``transformers``: anything else with a ``model_type``: loaded by :mod:`lightning_ddd.released.hf`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lightning_ddd.extras import require
from lightning_ddd.released.dit import DiT, DiTConfig, load_release_state_dict
from lightning_ddd.released.hf import (
    HFMaskedLM,
    TimeInput,
    auto_class,
    input_embeddings,
    load_hf_model,
    model_max_length,
    resolve_time_input,
)
from lightning_ddd.released.sources import (
    ReleasedModelError,
    ResolvedSource,
    has_tokenizer,
    pre_download_hint,
    read_config,
    read_weights,
    resolve_source,
)

Loader = Literal["auto", "native", "transformers"]
MDLM_KEYS = ("vocab_size", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
#: both MDLM and SEDD trained on GPT-2's tokenizer and do not ship one
GPT2 = "gpt2"


@dataclass
class Release:
    """A loaded release.

    Attributes:
        backbone: the network behind the project's backbone interface (``DiT`` or ``HFMaskedLM``).
        kind: "mdlm", "sedd" or "transformers".
        tokenizer: name or directory of the release's tokenizer (None: unknown).
        mask_id: the release's own mask id (the project's mask is always ``backbone.vocab_size``).
        max_len: longest sequence the release takes (None: not stated).
        source: where it came from and its identity.
    """

    backbone: nn.Module
    kind: str
    tokenizer: str | None
    mask_id: int
    max_len: int | None
    source: ResolvedSource


def release_kind(config: dict[str, Any]) -> str | None:
    """"mdlm", "sedd", "transformers", or None for a config.json that is none of them."""
    if config.get("model_type") == "mdlm" and all(key in config for key in MDLM_KEYS):
        return "mdlm"
    if isinstance(config.get("model"), dict) and isinstance(config.get("graph"), dict) and "tokens" in config:
        return "sedd"
    if isinstance(config.get("model_type"), str):
        return "transformers"
    return None


def mdlm_config(config: dict[str, Any]) -> DiTConfig:
    """MDLM's hub config.json -> DiTConfig. ``time_conditioning=False`` (the released OWT model): sigma is always 0."""
    return DiTConfig(
        num_embeddings=config["vocab_size"], hidden_size=config["hidden_dim"], cond_dim=config["cond_dim"],
        n_blocks=config["n_blocks"], n_heads=config["n_heads"], dropout=float(config.get("dropout", 0.1)),
        length=int(config.get("model_length", 1024)),
        time_input="loglinear" if config.get("time_conditioning", False) else "none",
    )


def sedd_config(config: dict[str, Any], where: str) -> DiTConfig:
    """SEDD's training config -> DiTConfig, refusing graphs and noises that are not masked log-linear diffusion."""
    graph, noise, model = config.get("graph", {}), config.get("noise", {}), config["model"]
    if graph.get("type") != "absorb":
        raise ReleasedModelError(
            f"'{where}' is a SEDD model with graph '{graph.get('type')}'; only absorbing ('absorb') SEDD models are "
            "masked diffusion models this project can use as teachers."
        )
    if noise.get("type") != "loglinear":
        raise ReleasedModelError(
            f"'{where}' uses SEDD noise '{noise.get('type')}'; only log-linear noise (alpha_t = 1 - (1 - eps) t) "
            "maps onto the project's schedules."
        )
    return DiTConfig(
        num_embeddings=int(config["tokens"]) + 1, hidden_size=model["hidden_size"], cond_dim=model["cond_dim"],
        n_blocks=model["n_blocks"], n_heads=model["n_heads"], dropout=float(model.get("dropout", 0.1)),
        length=int(model.get("length", 1024)), time_input="loglinear",
    )


def load_release(
    source: str,
    revision: str | None = None,
    *,
    loader: Loader = "auto",
    trust_remote_code: bool = False,
    mask_id: int | None = None,
    tokenizer: str | None = None,
    time_input: TimeInput = "auto",
    noise_eps: float = 1e-3,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
) -> Release:
    """Load a released masked diffusion LM (see :class:`lightning_ddd.released.ReleasedTeacher` for the arguments).

    Every check that needs only config.json runs before the weights are read.
    """
    if loader not in ("auto", "native", "transformers"):
        raise ReleasedModelError(f"loader={loader!r} must be 'auto', 'native' or 'transformers'.")
    resolved = resolve_source(source, revision, cache_dir, local_files_only, allow_code=trust_remote_code)
    config = read_config(resolved.folder)
    if isinstance(config.get("config"), dict) and "graph" in config["config"]:
        config = config["config"]  # newer PyTorchModelHubMixin versions nest the init argument ``config``
    kind = release_kind(config)
    if kind is None:
        raise ReleasedModelError(
            f"'{source}' is not a supported released-model layout: its config.json is neither MDLM's, SEDD's nor a "
            "transformers model's (no model_type)."
        )
    own_tokenizer = resolved.folder if has_tokenizer(resolved.folder) else None
    if loader == "native" and kind == "transformers":
        raise ReleasedModelError(
            f"'{source}' (model_type {config.get('model_type')!r}) is not a layout the project rebuilds natively "
            "(MDLM, SEDD); use loader: transformers."
        )
    if kind in ("mdlm", "sedd") and loader != "transformers":
        dit_config = mdlm_config(config) if kind == "mdlm" else sedd_config(config, source)
        dit_config.noise_eps = noise_eps
        if mask_id is not None and mask_id != dit_config.num_embeddings - 1:
            raise ReleasedModelError(f"mask_id={mask_id} but the {kind.upper()} layout puts the mask at "
                                     f"{dit_config.num_embeddings - 1} (the last id); drop mask_id.")
        backbone = DiT(dit_config)
        load_release_state_dict(backbone, read_weights(resolved.folder), _dit_prefix(kind), source)
        return Release(backbone, kind, tokenizer or own_tokenizer or GPT2, dit_config.num_embeddings - 1,
                       dit_config.length, resolved)
    return _load_transformers(resolved, config, source, trust_remote_code, mask_id, tokenizer or own_tokenizer,
                              time_input, noise_eps)


def _dit_prefix(kind: str) -> str:
    return "backbone." if kind == "mdlm" else ""


def _load_transformers(resolved: ResolvedSource, config: dict[str, Any], where: str, trust_remote_code: bool,
                       mask_id: int | None, tokenizer: str | None, time_input: TimeInput, noise_eps: float) -> Release:
    auto_class(config, where, trust_remote_code)  # the remote-code refusal comes before anything is loaded
    if tokenizer is None and config.get("model_type") == "mdlm":
        tokenizer = GPT2  # MDLM's hub code ships without a tokenizer; its README loads GPT-2's
    tok = load_tokenizer(tokenizer, trust_remote_code) if tokenizer is not None else None
    if mask_id is None:
        mask_id = config.get("mask_token_id")
    if mask_id is None and tok is not None:
        mask_id = tok.mask_token_id
    if mask_id is None and config.get("model_type") == "mdlm":
        mask_id = config["vocab_size"] - 1  # MDLM appends the mask after GPT-2's vocabulary
    if mask_id is None:
        raise ReleasedModelError(
            f"'{where}' has no mask token (none in its config.json or tokenizer); it is not a masked language model, "
            "or pass its mask id as mask_id."
        )
    model = load_hf_model(resolved.folder, config, where, trust_remote_code)
    embeddings = input_embeddings(model)
    rows = int(embeddings.weight.shape[0]) if embeddings is not None else config.get("vocab_size")
    if not isinstance(rows, int):
        raise ReleasedModelError(f"'{where}' states no vocab_size and exposes no input embeddings; cannot size its vocabulary.")
    if not 0 <= mask_id < rows:
        raise ReleasedModelError(f"mask_id={mask_id} lies outside the release's {rows} embedding rows; fix mask_id.")
    if tok is not None:
        vocab_size = len(tok)
        if vocab_size > rows:
            raise ReleasedModelError(f"the tokenizer '{tokenizer}' has {vocab_size} ids but '{where}' embeds only {rows}; "
                                     "give the release's own tokenizer.")
    else:
        vocab_size = rows - 1 if mask_id == rows - 1 else rows
    mode = resolve_time_input(model, time_input)
    conditioned = bool(config.get("time_conditioning", mode != "none"))
    backbone = HFMaskedLM(model, int(mask_id), vocab_size, model_max_length(config), mode, conditioned, noise_eps)
    return Release(backbone, "transformers", tokenizer, int(mask_id), model_max_length(config), resolved)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The ``transformers`` tokenizer ``name_or_path`` (a directory, or a hub name from the cache or the network)."""
    require("transformers", feature=f"the release's tokenizer '{name_or_path}'")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ReleasedModelError(
            f"tokenizer '{name_or_path}' could not be loaded ({type(err).__name__}); {pre_download_hint(name_or_path)}."
        ) from None
