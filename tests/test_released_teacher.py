"""ReleasedTeacher through the real entry point (validate, evaluate) on a tiny local MDLM-layout release, the data
agreement checks before any work, and the teacher source a student will take (directory, hub id or .ckpt)."""

import json
import os
import sys

import pytest
import torch

from lightning_ddd.checkpoints import file_sha256 as check_sha
from lightning_ddd.cli import main
from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.modules import DiffusionTeacher
from lightning_ddd.modules import ReleasedTeacher, TeacherOptions, load_teacher_source
from lightning_ddd.modules.released_teacher import VAL_STREAM
from lightning_ddd.modules.teacher_source import check_identity
from released_layouts import random_dit, tiny_config, write_mdlm, write_word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny MDLM-layout release with its own 10-id word tokenizer, and a corpus in those words."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("release")
    folder = write_mdlm(root / "mdlm", random_dit(tiny_config()))
    words = write_word_tokenizer(folder, 10)
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[2 + int(i)] for i in torch.randint(8, (40,), generator=g)) for _ in range(12)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(docs))
    return folder, str(corpus)


def cli_args(folder, corpus, cache, *extra, tokenizer=None):
    return ["--model", "ReleasedTeacher", "--model.source", folder, "--data", "TextDataModule",
            "--data.dataset", "files", "--data.files", f"[{corpus}]", "--data.tokenizer", "HFTokenizer",
            "--data.tokenizer.name_or_path", tokenizer or folder, "--data.seq_len", "16", "--data.batch_size", "4",
            "--data.cache_dir", str(cache), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def test_validate_through_the_cli_logs_the_nll_bound(release, tmp_path):
    folder, corpus = release
    cli = main(["validate", *cli_args(folder, corpus, tmp_path / "cache"), "--model.val_num_draws", "2"])
    model, dm = cli.model, cli.datamodule
    assert isinstance(model, ReleasedTeacher) and model.vocab_size == 10 and model.seq_len == 16
    logged = cli.trainer.callback_metrics
    # the same bound computed by hand from the validation rows and the module's seeded generators
    total, tokens = 0.0, 0
    for i, x in enumerate(dm.val_dataloader()):
        bound = estimate_nll(model.denoise, x, model.process, model.val_loss, 2, model.noise_generator(VAL_STREAM, i))
        total, tokens = total + bound.sum().item(), tokens + x.numel()
    assert logged["val/nll"].item() == pytest.approx(total / tokens, rel=1e-5)
    assert logged["val/ppl"].item() == pytest.approx(torch.tensor(total / tokens).exp().item(), rel=1e-5)


def test_evaluate_through_the_cli_records_the_release(release, tmp_path):
    folder, corpus = release
    out = tmp_path / "eval"
    main(["evaluate", *cli_args(folder, corpus, tmp_path / "cache"), "--steps", "[2]", "--sampling.num_samples", "4",
          "--sampling.batch_size", "4", "--nll_max_batches", "1", "--output_dir", str(out)])
    data, row = json.loads((out / "evaluation.json").read_text())
    assert data["model_class"] == "data"
    assert row["model_class"] == "ReleasedTeacher" and row["checkpoint"].startswith(os.path.abspath(folder) + "#")
    assert row["nll"] > 0 and row["entropy"] >= 0 and row["steps"] == 2


def test_help_explains_the_release_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "--model.help", "ReleasedTeacher"])
    out = capsys.readouterr().out
    for text in ["--model.source", "trust_remote_code", "kuleshov-group/mdlm-owt", "HF_HUB_OFFLINE"]:
        assert text in out, text


def test_data_disagreements_fail_before_any_work(release, tmp_path):
    folder, corpus = release
    other = tmp_path / "other-tok"
    write_word_tokenizer(other, 10)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"w3"', '"zz"'))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="tokenizer mismatch: the data's tokenizer") as err:
        main(["validate", *cli_args(folder, corpus, cache, tokenizer=str(other))])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="vocab_size mismatch: the data has 257 tokens"):
        main(["validate", *cli_args(folder, corpus, cache)[:-8], "--data.tokenizer", "ByteTokenizer",
              "--data.seq_len", "16", "--data.cache_dir", str(cache), "--trainer.accelerator", "cpu"])
    with pytest.raises(ValueError, match="seq_len mismatch"):
        main(["validate", *cli_args(folder, corpus, cache), "--data.seq_len", "32"])
    assert not cache.exists() or not any(cache.rglob("*.pt"))  # nothing was tokenised


def test_cli_error_is_one_line_not_a_traceback(release, tmp_path, monkeypatch):
    """``python -m lightning_ddd`` (its ``run``, in process) ends a bad source in one line, unwrapped from the
    argument parser's multi-line message."""
    from huggingface_hub import constants

    from lightning_ddd.__main__ import run

    folder, corpus = release
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = cli_args("acme/not-downloaded", corpus, tmp_path / "cache", tokenizer=folder)
    monkeypatch.setattr(sys, "argv", ["lightning_ddd", "validate", *args, "--model.cache_dir", str(tmp_path / "hf")])
    with pytest.raises(SystemExit) as exit_:
        run()
    message = str(exit_.value.code)
    assert message.startswith("error: hub model 'acme/not-downloaded'") and "\n" not in message
    assert "hf download acme/not-downloaded" in message


def test_teacher_sources_for_students(release, tmp_path):
    folder, _ = release
    teacher = load_teacher_source(folder)
    assert isinstance(teacher, ReleasedTeacher) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    saved: dict = {}
    teacher.on_save_checkpoint(saved)  # recorded beside the hyperparameters, which must stay init arguments
    assert teacher.identity["sha256"] and saved["teacher_identity"] == teacher.identity
    assert "teacher_identity" not in teacher.hparams and "schedule" not in teacher.hparams
    check_identity(teacher.identity, dict(teacher.identity))
    with pytest.raises(ValueError, match="sha256 .* but the student was trained against"):
        check_identity({**teacher.identity, "sha256": "0" * 64}, teacher.identity)
    # a project checkpoint goes through the same function
    root = tmp_path / "fit"
    main(["fit", "-c", os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml"), "--trainer.default_root_dir",
          str(root), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    (path,) = [str(p) for p in root.rglob("last.ckpt")]
    loaded = load_teacher_source(path)
    assert isinstance(loaded, DiffusionTeacher) and not loaded.training and loaded.identity["sha256"]
    assert loaded.identity["sha256"] == check_sha(path)
    with pytest.raises(ValueError, match="lightning_ddd checkpoint"):
        load_teacher_source(path, TeacherOptions(revision="main"))
