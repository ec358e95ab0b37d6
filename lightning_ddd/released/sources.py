"""Where a released model comes from: a hub id or a local directory in the hub's layout, and its identity.

A hub id is looked up in the local Hugging Face cache first (no network), then downloaded when the network
is allowed; with ``HF_HUB_OFFLINE=1`` or ``local_files_only`` a missing model is a one-line error that says
how to pre-download it. Only the files a teacher needs are fetched: ``config.json``, one weights format
(safetensors when the release has it), the tokenizer files, and the Python files only when remote code is
allowed. The identity recorded for students is the hub id with the resolved commit, or for a directory the
SHA-256 of its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_ddd.extras import MissingExtraError, install_hint, require

CONFIG = "config.json"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PYTORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


class ReleasedModelError(ValueError):
    """A released model that cannot be found, read or used, with a one-line reason and fix."""


@dataclass(frozen=True)
class ResolvedSource:
    """A released model's local folder and its identity.

    Attributes:
        folder: local directory with config.json and the weights.
        identity: ``{"source", "revision", "sha256"}``: the hub id with its resolved commit (sha256 None), or
            the directory with the SHA-256 of its files (revision None).
    """

    folder: str
    identity: dict[str, Any]

    @property
    def label(self) -> str:
        """One short string for result tables: ``hub-id@commit`` or ``directory#sha256[:16]``."""
        if self.identity.get("revision"):
            return f"{self.identity['source']}@{self.identity['revision']}"
        return f"{self.identity['source']}#{str(self.identity.get('sha256'))[:16]}"


def pre_download_hint(hub_id: str) -> str:
    return (f"pre-download it on a machine with network (`hf download {hub_id}`, or `huggingface-cli download {hub_id}` "
            "with older huggingface_hub) and run with HF_HUB_OFFLINE=1, or pass a local directory")


def resolve_source(
    source: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
    allow_code: bool = False,
) -> ResolvedSource:
    """Turn a hub id or a local directory into a local folder and an identity.

    Args:
        source: a local directory (config.json + weights, as on the hub) or a hub id such as
            ``kuleshov-group/mdlm-owt``; an existing directory wins over a hub id of the same name.
        revision: branch, tag or commit of a hub id (a commit pins it); None: ``main``.
        cache_dir: Hugging Face cache directory (default: ``HF_HUB_CACHE``).
        local_files_only: never contact the hub; None: the ``HF_HUB_OFFLINE`` setting.
        allow_code: also fetch the release's Python files (only with ``trust_remote_code``).

    Raises:
        ReleasedModelError: the directory does not exist, the id is malformed, or the model is neither cached nor
            downloadable; one line naming the source and the fix.
    """
    if not source:
        raise ReleasedModelError("the teacher source is empty; give a hub id (e.g. kuleshov-group/mdlm-owt) or a directory.")
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if revision is not None:
            raise ReleasedModelError(f"revision='{revision}' applies to hub ids, but '{source}' is a local directory; drop it.")
        folder = os.path.abspath(path)
        return ResolvedSource(folder, {"source": folder, "revision": None, "sha256": directory_sha256(folder)})
    if os.path.exists(path):
        raise ReleasedModelError(
            f"'{source}' is a file; a released model is a directory with config.json and weights (or a hub id), "
            "and a lightning_ddd .ckpt teacher is loaded with DiffusionTeacher's --ckpt_path."
        )
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not _HUB_ID.match(source):
        raise ReleasedModelError(f"directory '{source}' does not exist (and it is not a hub id like owner/name); check the path.")
    return _snapshot(source, revision, cache_dir, local_files_only, allow_code)


def _patterns(weights: tuple[str, ...], allow_code: bool) -> list[str]:
    shards = [name.replace(".safetensors", "-*.safetensors").replace(".bin", "-*.bin")
              for name in weights if not name.endswith(".json")]
    return [CONFIG, "generation_config.json", *weights, *shards, *TOKENIZER_FILES] + (["*.py"] if allow_code else [])


def _snapshot(hub_id: str, revision: str | None, cache_dir: str | None, local_files_only: bool | None,
              allow_code: bool) -> ResolvedSource:
    require("huggingface_hub", feature=f"loading the hub model '{hub_id}' (or pass a local directory)")
    import huggingface_hub
    from huggingface_hub import constants

    rev = f" (revision {revision})" if revision else ""
    for weights in (SAFETENSORS, PYTORCH_BIN):  # the cache first: a downloaded model loads without the network
        try:
            folder = huggingface_hub.snapshot_download(hub_id, revision=revision, cache_dir=cache_dir,
                                                       local_files_only=True, allow_patterns=_patterns(weights, allow_code))
        except Exception:  # not cached, or only partly: try the other format, then the download
            continue
        if os.path.isfile(os.path.join(folder, CONFIG)) and any(os.path.isfile(os.path.join(folder, w)) for w in weights):
            return _hub_identity(hub_id, folder)
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    if offline:
        raise ReleasedModelError(
            f"hub model '{hub_id}'{rev} is not in the local Hugging Face cache and downloads are off; "
            f"{pre_download_hint(hub_id)}."
        )
    try:
        files = set(huggingface_hub.list_repo_files(hub_id, revision=revision))
        weights = SAFETENSORS if any(f.endswith(".safetensors") for f in files) else PYTORCH_BIN
        folder = huggingface_hub.snapshot_download(hub_id, revision=revision, cache_dir=cache_dir,
                                                   allow_patterns=_patterns(weights, allow_code))
    except Exception as err:  # no network, unknown or gated repository, unknown revision
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise ReleasedModelError(
            f"could not download hub model '{hub_id}'{rev} ({type(err).__name__}: {reason}); check the id, the "
            f"revision and the network, or {pre_download_hint(hub_id)}."
        ) from None
    return _hub_identity(hub_id, folder)


def _hub_identity(hub_id: str, folder: str) -> ResolvedSource:
    # The cache keeps each revision in snapshots/<commit hash>/, so the folder name is the resolved commit.
    parent, commit = os.path.split(os.path.normpath(folder))
    revision = commit if os.path.basename(parent) == "snapshots" else None
    sha = None if revision else directory_sha256(folder)
    return ResolvedSource(folder, {"source": hub_id, "revision": revision, "sha256": sha})


def directory_sha256(folder: str) -> str:
    """SHA-256 over the relative paths and contents of every file under ``folder`` (hidden ones excluded)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode("utf-8") + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Reading the folder


def read_config(folder: str) -> dict[str, Any]:
    """The release's config.json as a dict, or a one-line error."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise ReleasedModelError(
            f"'{folder}' is not a supported released-model layout: it has no config.json (expected config.json "
            "and model.safetensors or pytorch_model.bin, as in a Hugging Face model repository)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ReleasedModelError(f"'{path}' is not valid JSON ({err}); re-download the model.") from None
    if not isinstance(config, dict):
        raise ReleasedModelError(f"'{path}' does not hold a JSON object; re-download the model.")
    return config


def weight_files(folder: str) -> list[str]:
    """The weight files of ``folder``: one safetensors or PyTorch file, or the shards an index lists."""
    for single, index in (SAFETENSORS, PYTORCH_BIN):
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            paths = [os.path.join(folder, shard) for shard in shards]
            missing = [p for p in paths if not os.path.isfile(p)]
            if not shards or missing:
                raise ReleasedModelError(f"'{index_path}' lists missing weight files {missing[:2]}; re-download the model.")
            return paths
    raise ReleasedModelError(
        f"'{folder}' has config.json but no weights (model.safetensors or pytorch_model.bin, or a sharded index); "
        "re-download the model or point at the right directory."
    )


def read_weights(folder: str) -> dict[str, Tensor]:
    """All tensors of the release's weight files, on the CPU (safetensors, or PyTorch files loaded weights-only)."""
    state: dict[str, Tensor] = {}
    for path in weight_files(folder):
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except ImportError:
            raise MissingExtraError(install_hint("safetensors", "reading .safetensors weights")) from None
        except Exception as err:
            raise ReleasedModelError(f"weights '{path}' could not be read ({type(err).__name__}); the file is corrupt: re-download it.") from None
    return state


def has_tokenizer(folder: str) -> bool:
    """Whether ``folder`` holds tokenizer files (then it is the release's own tokenizer)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("tokenizer.json", "tokenizer_config.json",
                                                                          "vocab.json", "vocab.txt", "tokenizer.model"))
