"""Tiny released models written in the real on-disk layouts, for the released-teacher tests (no network).

- MDLM's hub layout: config.json (model_type mdlm, hidden_dim, ...) + weights named ``backbone.*``.
- SEDD's hub layout: the training config (tokens, graph, noise, model) + weights without prefix.
- a hub cache: ``models--owner--name/refs/main`` and ``snapshots/<commit>/`` as huggingface_hub writes it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import torch

from lightning_ddd.released.dit import DiT, DiTConfig, release_state_dict
from lightning_ddd.released.make_tiny import write_mdlm_release, write_word_tokenizer  # noqa: F401 (re-exported)

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "remote_mdlm")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_dit(config: DiTConfig, seed: int = 0) -> DiT:
    """A DiT whose every parameter is random (a zero adaLN would hide mistakes in the modulation map)."""
    g = torch.Generator().manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_config(**overrides) -> DiTConfig:
    fields = dict(num_embeddings=11, hidden_size=16, cond_dim=8, n_blocks=2, n_heads=2, dropout=0.0, length=16)
    fields.update(overrides)
    return DiTConfig(**fields)


def save_weights(state: dict, folder: str, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    else:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))


def write_mdlm(folder, model: DiT, fmt: str = "bin", remote_code: bool = False) -> str:
    """MDLM's hub layout for ``model`` (time_conditioning from its config), written by the package's own writer."""
    folder = str(folder)
    write_mdlm_release(folder, model, "safetensors" if fmt == "safetensors" else "bin")
    if remote_code:  # as on the hub, where config.json maps the Auto classes to the repository's own code
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["auto_map"] = {"AutoConfig": "configuration_refmdlm.RefMDLMConfig",
                              "AutoModelForMaskedLM": "modeling_refmdlm.RefMDLM"}
        with open(path, "w") as f:
            json.dump(config, f)
        for name in ("configuration_refmdlm.py", "modeling_refmdlm.py", "reference_dit.py"):
            shutil.copy(os.path.join(ASSETS, name), folder)
    return folder


def write_sedd(folder, model: DiT, graph: str = "absorb", noise: str = "loglinear", fmt: str = "bin",
               nested: bool = False) -> str:
    """SEDD's hub layout (``PyTorchModelHubMixin``: the training config as config.json) for ``model``."""
    os.makedirs(folder, exist_ok=True)
    c = model.config
    config = {
        "ngpus": 8, "tokens": c.num_embeddings - 1,
        "training": {"batch_size": 512, "ema": 0.9999}, "graph": {"type": graph, "file": "data", "report_all": False},
        "noise": {"type": noise, "sigma_min": 1e-4, "sigma_max": 20},
        "model": {"name": "small", "type": "ddit", "hidden_size": c.hidden_size, "cond_dim": c.cond_dim,
                  "length": c.length, "n_blocks": c.n_blocks, "n_heads": c.n_heads, "scale_by_sigma": True,
                  "dropout": c.dropout},
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"config": config} if nested else config, f)  # newer hub mixins nest the init argument
    save_weights(release_state_dict(model, ""), str(folder), fmt)
    return str(folder)


def write_bert(folder, mask_token: bool = True):
    """A tiny BertForMaskedLM (hidden dropout 0.1) and its word-level tokenizer (20 ids; <mask> is id 2 when
    present), saved with save_pretrained: the layout of any transformers masked LM on the hub."""
    import transformers

    words = write_word_tokenizer(folder, 20, mask=mask_token)
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=12)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).eval().save_pretrained(folder)
    return str(folder), words


def write_hub_cache(cache_dir, hub_id: str, source_folder: str, commit: str = COMMIT) -> str:
    """Put ``source_folder``'s files into a Hugging Face cache as snapshot ``commit`` of ``hub_id`` (ref main)."""
    repo = os.path.join(cache_dir, "models--" + hub_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    shutil.copytree(source_folder, snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def reference_forward(*args, **kwargs):
    """The independent float64 forward of the test asset (torch only): raw logits (B, L, rows)."""
    spec = importlib.util.spec_from_file_location("reference_dit", os.path.join(ASSETS, "reference_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_forward(*args, **kwargs)
