"""Result files: tables of evaluation rows, and samples with the settings that drew them.

``sample`` and ``evaluate`` never overwrite a previous run's files silently: :func:`check_output_dir` runs
before any work and refuses an ``output_dir`` that already holds the files they write, unless asked to
overwrite (``--overwrite true``), as well as an ``output_dir`` that is a file or cannot be written.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict

import torch
from torch import Tensor

from lightning_ddd.evaluation.settings import SamplingSettings
from lightning_ddd.extras import require


def settings_record(model, settings: SamplingSettings, ckpt_path: str | None) -> dict:
    """The protocol fields written next to samples and result rows."""
    return {
        "checkpoint": ckpt_path if ckpt_path is not None else getattr(model, "source_label", None),
        "model_class": type(model).__name__,
        "sampler": settings.sampler,
        **asdict(settings),
    }


#: the files ``write_samples`` writes (one of the .txt/.png)
SAMPLE_FILES = ("tokens.pt", "samples.txt", "samples.png", "samples.json")

#: protocol and sampling fields: stated once above the console table when every row that has them agrees
_PROTOCOL = ("checkpoint", "model_class", "sampler", "steps", "temperature", "top_p", "top_k", "precision", "seed",
             "num_samples", "batch_size", "cache", "evaluator", "fid_extractor", "fid_reference_images",
             "fid_reference_split", "data_split", "nll_num_draws")
#: columns shown first when they vary
_FIRST = ("model", "model_class", "steps", "temperature", "top_p", "top_k", "mean_nfe")


def table_files(name: str = "evaluation") -> tuple[str, str]:
    """The files ``write_table`` writes."""
    return f"{name}.json", f"{name}.csv"


def check_output_dir(output_dir: str, files: tuple[str, ...], overwrite: bool = False) -> None:
    """Raise ``ValueError`` before any work if results cannot be written to ``output_dir``: it is a file, it
    (or the folder it would be made in) is not writable, or it already holds one of ``files`` and
    ``overwrite`` is off. Creates nothing."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir '{output_dir}' is a file, not a folder; choose another --output_dir.")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir '{output_dir}' cannot be written ('{existing}' is not a writable folder); "
                         "choose another --output_dir.")
    taken = [f for f in files if os.path.exists(os.path.join(output_dir, f))]
    if taken and not overwrite:
        raise ValueError(f"output_dir '{output_dir}' already holds {', '.join(taken)} from an earlier run; pass "
                         "--overwrite true to replace them, or choose another --output_dir.")


def markdown_table(rows: list[dict]) -> str:
    """The rows as a compact markdown table for the console: protocol fields (checkpoint, seed, precision, ...)
    that all rows share are stated once above it; numbers get 4 significant digits (the files keep all)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = [k for k in _FIRST if k in columns] + [k for k in columns if k not in _FIRST]
    shared = {}
    for k in columns:
        values = [row[k] for row in rows if k in row]
        if k in _PROTOCOL and all(v == values[0] for v in values):
            shared[k] = values[0]
    shown = [k for k in columns if k not in shared]
    head = ", ".join(f"{k}={v}" for k, v in shared.items() if v is not None)
    lines = ([head, ""] if head else []) + ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in shown) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_table(rows: list[dict], output_dir: str, name: str = "evaluation") -> tuple[str, str]:
    """Write rows as ``<name>.json`` and ``<name>.csv`` (atomically); return both paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, csv_path = (os.path.join(output_dir, f"{name}.{ext}") for ext in ("json", "csv"))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(json_path + ".tmp", "w") as f:
        json.dump(rows, f, indent=2)
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(json_path + ".tmp", json_path)
    os.replace(csv_path + ".tmp", csv_path)
    return json_path, csv_path


def check_writable_samples(datamodule) -> None:
    """Fail before sampling if the samples of this data cannot be written (image grids need torchvision)."""
    if getattr(datamodule, "modality", None) == "image":
        require("torchvision", feature="writing image samples")


def write_samples(tokens: Tensor, datamodule, output_dir: str, record: dict) -> list[str]:
    """Write ``tokens.pt``, a human view (``samples.txt`` or ``samples.png``) and ``samples.json`` (the settings)."""
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, "tokens.pt")]
    torch.save(tokens, paths[0])
    decoded = datamodule.decode(tokens) if datamodule is not None else [" ".join(map(str, r.tolist())) for r in tokens]
    if isinstance(decoded, Tensor):  # images (N, C, H, W) in [0, 1]
        from torchvision.utils import save_image

        paths.append(os.path.join(output_dir, "samples.png"))
        save_image(decoded, paths[-1], nrow=max(1, int(math.sqrt(len(decoded)))), padding=1)
    else:
        paths.append(os.path.join(output_dir, "samples.txt"))
        with open(paths[-1], "w") as f:
            f.write("\n\n".join(f"=== sample {i} ===\n{text}" for i, text in enumerate(decoded)) + "\n")
    paths.append(os.path.join(output_dir, "samples.json"))
    with open(paths[-1], "w") as f:
        json.dump(record, f, indent=2)
    return paths
