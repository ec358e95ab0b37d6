"""``sample`` and ``evaluate`` through the real entry point, on a tiny trained teacher."""

import csv
import glob
import json
import os

import pytest
import torch

from lightning_ddd.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    main(["fit", "-c", TINY, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"])
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


def test_sample_writes_tokens_text_and_settings(ckpt, tmp_path):
    out = tmp_path / "s"
    main(["sample", "-c", TINY, "--ckpt_path", ckpt, "--sampling.num_samples", "6", "--sampling.steps", "4",
          "--sampling.seed", "3", "--sampling.top_p", "0.9", "--output_dir", str(out)])
    tokens = torch.load(out / "tokens.pt")
    assert tokens.shape == (6, 8) and tokens.max() < 5  # no mask id left
    record = json.loads((out / "samples.json").read_text())
    for key, value in {"steps": 4, "seed": 3, "top_p": 0.9, "precision": "float64", "num_samples": 6,
                       "model_class": "DiffusionTeacher", "checkpoint": ckpt, "sampler": "ancestral"}.items():
        assert record[key] == value, key
    assert "oracle_nll" in record and "entropy" in record
    assert len((out / "samples.txt").read_text().split("=== sample")) == 7
    # the same seed reproduces the same samples
    main(["sample", "-c", TINY, "--ckpt_path", ckpt, "--sampling.num_samples", "6", "--sampling.steps", "4",
          "--sampling.seed", "3", "--sampling.top_p", "0.9", "--output_dir", str(tmp_path / "again")])
    assert torch.equal(torch.load(tmp_path / "again" / "tokens.pt"), tokens)


def test_evaluate_writes_one_row_per_setting(ckpt, tmp_path):
    main(["evaluate", "-c", TINY, "--ckpt_path", ckpt, "--steps", "[1, 4]", "--temperatures", "[1.0, 0.5]",
          "--sampling.num_samples", "32", "--sampling.cache", "true", "--output_dir", str(tmp_path)])
    data, *rows = json.loads((tmp_path / "evaluation.json").read_text())
    with open(tmp_path / "evaluation.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    # first the floor: the same metrics on as many held-out sequences as each setting has samples
    assert (data["model_class"], data["data_split"], data["num_samples"]) == ("data", "val", 32)
    assert {"entropy", "oracle_nll", "first_token_kl", "marginal_kl", "transition_kl"} <= set(data)
    assert [(r["steps"], r["temperature"]) for r in rows] == [(1, 1.0), (1, 0.5), (4, 1.0), (4, 0.5)]
    required = ["checkpoint", "model_class", "steps", "sampler", "temperature", "top_p", "precision", "seed",
                "num_samples", "mean_nfe", "seconds_per_sample", "nll", "ppl", "bpd", "entropy", "oracle_nll",
                "first_token_kl", "marginal_kl", "transition_kl"]
    for row in rows:
        assert all(key in row for key in required), set(required) - set(row)
        assert row["sampler"] == "caching" and 1 <= row["mean_nfe"] <= row["steps"]
    # lower temperature: the samples are more likely under the true chain
    assert rows[1]["oracle_nll"] < rows[0]["oracle_nll"]


@pytest.mark.parametrize("args, message", [
    (["--sampling.steps", "0"], "num_steps=0"),
    (["--sampling.top_p", "1.5"], "top_p=1.5"),
    (["--sampling.precision", "float16"], "precision"),
])
def test_bad_sampling_arguments_fail_before_work(ckpt, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        main(["sample", "-c", TINY, "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "x"), *args])
    assert not (tmp_path / "x").exists()


def test_checkpoint_for_another_vocabulary_is_rejected(ckpt, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=5"):
        main(["sample", "-c", TINY, "--ckpt_path", ckpt, "--data.init_args.vocab_size", "7",
              "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
