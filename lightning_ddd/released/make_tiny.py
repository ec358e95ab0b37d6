"""A tiny release in MDLM's hub layout and the corpus it was trained on, for the CPU quickstart (no download).

    python -m lightning_ddd.released.make_tiny runs/quickstart/tiny_mdlm [--train_steps 300] [--seed 0]

writes

- ``<dir>/release/``: ``config.json`` (MDLM's hub layout: ``model_type: mdlm``, weights under ``backbone.``),
  ``model.safetensors`` (``pytorch_model.bin`` without safetensors) and a word-level tokenizer
  (``tokenizer.json``; id 0 is ``<eos>``);
- ``<dir>/corpus.jsonl``: one document per line, sentences of a random sparse Markov chain over the words.

The network is MDLM's DiT at toy size (2 blocks of width 64, context 32, 32 tokens + the mask, dropout 0.1 as
MDLM's) trained for ``train_steps`` steps on MDLM's objective (the t-DCE bound with log-linear noise) over
rows of the corpus, so its samples carry some of the chain's structure; ``--train_steps 0`` leaves it random.
It loads through exactly the code path of ``kuleshov-group/mdlm-owt``. Needs the ``text`` extra (tokenizers).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from lightning_ddd.diffusion.losses import TimeDCE
from lightning_ddd.diffusion.processes import MaskedProcess
from lightning_ddd.diffusion.schedules import LogLinearSchedule
from lightning_ddd.extras import require
from lightning_ddd.released.dit import DiT, DiTConfig, release_state_dict

#: the tokenizer's special words: id 0 separates documents, id 1 stands for unknown words
SPECIALS = ("<eos>", "<unk>")


def mdlm_hub_config(config: DiTConfig) -> dict[str, Any]:
    """The config.json of MDLM's hub layout for a DiT (``time_conditioning`` from its time input)."""
    return {
        "architectures": ["MDLM"], "model_type": "mdlm", "vocab_size": config.num_embeddings,
        "model_length": config.length, "hidden_dim": config.hidden_size, "cond_dim": config.cond_dim,
        "n_blocks": config.n_blocks, "n_heads": config.n_heads, "dropout": config.dropout,
        "time_conditioning": config.time_input != "none",
    }


def write_mdlm_release(folder: str, model: DiT, weights: str = "safetensors") -> str:
    """Write ``model`` to ``folder`` in MDLM's hub layout: config.json + ``model.safetensors`` or ``pytorch_model.bin``."""
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights='{weights}' must be 'safetensors' or 'bin'.")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(mdlm_hub_config(model.config), f, indent=2)
    state = release_state_dict(model, "backbone.")
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    else:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    return folder


def word_list(num_tokens: int, mask: bool = False) -> list[str]:
    """``num_tokens`` words: the specials (and ``<mask>``), then ``w0``, ``w1``, ..."""
    specials = [*SPECIALS, *(["<mask>"] if mask else [])]
    return specials + [f"w{i}" for i in range(num_tokens - len(specials))]


def write_word_tokenizer(folder: str, num_tokens: int, mask: bool = False) -> list[str]:
    """A word-level tokenizer with ``num_tokens`` ids (see :func:`word_list`), saved with ``save_pretrained``."""
    require("transformers", feature="writing a tokenizer")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = word_list(num_tokens, mask)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"mask_token": "<mask>"} if mask else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", **extra).save_pretrained(folder)
    return words


def markov_documents(num_words: int, num_docs: int, generator: torch.Generator,
                     min_len: int = 24, max_len: int = 96, branching: int = 3) -> list[list[int]]:
    """Documents of word indices in [0, num_words): a chain where each word is followed by one of ``branching``
    successors (probabilities from a Dirichlet(1)), the first word uniform, lengths uniform in [min_len, max_len]."""
    succ = torch.stack([torch.randperm(num_words, generator=generator)[:branching] for _ in range(num_words)])
    probs = -torch.log(torch.rand(num_words, branching, generator=generator))  # (W, branching): Dirichlet(1)
    probs = probs / probs.sum(-1, keepdim=True)
    docs = []
    for _ in range(num_docs):
        length = int(torch.randint(min_len, max_len + 1, (), generator=generator))
        word = int(torch.randint(num_words, (), generator=generator))
        doc = [word]
        for _ in range(length - 1):
            word = int(succ[word, torch.multinomial(probs[word], 1, generator=generator)])
            doc.append(word)
        docs.append(doc)
    return docs


def pack(docs: list[list[int]], offset: int, eos_id: int, seq_len: int) -> torch.Tensor:
    """Token rows (N, seq_len): documents (word index + ``offset``) each followed by ``eos_id``, cut into rows."""
    stream = torch.tensor([i for doc in docs for i in [*(w + offset for w in doc), eos_id]])
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def train_dit(model: DiT, rows: torch.Tensor, steps: int, generator: torch.Generator, batch_size: int = 32,
              lr: float = 3e-3, eps: float = 1e-3) -> list[float]:
    """``steps`` AdamW steps of the t-DCE bound (MDLM's objective, log-linear noise) on ``rows``; losses per token."""
    process = MaskedProcess(model.vocab_size, LogLinearSchedule(eps))
    loss_fn = TimeDCE()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        x = rows[torch.randint(rows.shape[0], (batch_size,), generator=generator)]  # (B, L)
        loss = loss_fn(lambda z, t: process.x0_log_probs(model(z, t), z), x, process, generator).mean() / x.shape[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def make_tiny(out_dir: str, train_steps: int = 300, seed: int = 0, num_docs: int = 400, vocab_size: int = 32,
              seq_len: int = 32, weights: str | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/release`` and ``<out_dir>/corpus.jsonl`` (see the module docstring); returns their paths,
    the vocabulary size and the training losses (nats per token, first and last)."""
    require("transformers", feature="the tiny release's tokenizer")
    if weights is None:
        import importlib.util

        weights = "safetensors" if importlib.util.find_spec("safetensors") else "bin"
    release = os.path.join(out_dir, "release")
    if os.path.exists(os.path.join(release, "config.json")):
        raise FileExistsError(f"'{release}' already holds a release; remove it or choose another directory.")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the network's initialisation
    words = word_list(vocab_size)
    num_words = vocab_size - len(SPECIALS)
    docs = markov_documents(num_words, num_docs, g)
    model = DiT(DiTConfig(num_embeddings=vocab_size + 1, hidden_size=64, cond_dim=32, n_blocks=2, n_heads=4,
                          dropout=0.1, length=seq_len))
    losses = train_dit(model, pack(docs, len(SPECIALS), 0, seq_len), train_steps, g) if train_steps > 0 else []
    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": " ".join(words[len(SPECIALS) + w] for w in doc)}) + "\n")
    write_mdlm_release(release, model.eval(), weights)
    write_word_tokenizer(release, vocab_size)
    return {"release": release, "corpus": corpus, "vocab_size": vocab_size, "seq_len": seq_len,
            "losses": losses[:1] + losses[-1:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_ddd.released.make_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where to write release/ and corpus.jsonl")
    parser.add_argument("--train_steps", type=int, default=300, help="training steps of the tiny DiT (0: random)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny(args.out_dir, args.train_steps, args.seed)
    trained = f"; t-DCE {out['losses'][0]:.3f} -> {out['losses'][-1]:.3f} nats/token" if out["losses"] else ""
    print(f"wrote {out['release']} (tiny MDLM-layout release, {out['vocab_size']} tokens + mask, context "
          f"{out['seq_len']}{trained}) and {out['corpus']}")


if __name__ == "__main__":
    main()
