"""Result files: tables of evaluation rows, and samples with the settings that drew them."""

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
