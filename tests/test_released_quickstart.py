"""The CPU quickstart of "Distil a released model", end to end and shortened: write the tiny MDLM-layout release
(``python -m lightning_ddd.released.make_tiny``), distil it with the shipped configs, train the AR evaluator on the
same corpus, and ``evaluate`` the student with oracle-free metrics (generative perplexity and entropy)."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")  # the release's tokenizer

from lightning_ddd.cli import main  # noqa: E402
from lightning_ddd.data.tokenizers import HFTokenizer  # noqa: E402
from lightning_ddd.diffusion.losses import TimeDCE  # noqa: E402
from lightning_ddd.modules import ReleasedTeacher  # noqa: E402
from lightning_ddd.released import make_tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_make_tiny_writes_a_release_that_reads_its_own_corpus(tmp_path, capsys):
    out = tmp_path / "tiny"
    make_tiny.main([str(out), "--train_steps", "80"])
    assert "tiny MDLM-layout release" in capsys.readouterr().out
    release = str(out / "release")
    teacher = ReleasedTeacher(release)  # MDLM's layout, loaded as kuleshov-group/mdlm-owt is
    assert teacher.release_kind == "mdlm" and teacher.vocab_size == 32 and teacher.seq_len == 32
    assert teacher.tokenizer_name == release and teacher.release_mask_id == 32
    # the corpus's words map to the ids the network was trained on: word wK is id K + 2 (after <eos>, <unk>)
    docs = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert len(docs) == 400
    tok = HFTokenizer(release)
    assert tok.vocab_size == 32 and tok.eos_id == 0
    assert tok.encode(docs[0]) == [int(w[1:]) + 2 for w in docs[0].split()]
    # trained: the t-DCE bound on the corpus falls well below the uniform log V nats per token
    rows = make_tiny.pack([[int(w[1:]) for w in d.split()] for d in docs[:40]], 2, 0, 32)
    bound = TimeDCE()(teacher.denoise, rows, teacher.process, torch.Generator().manual_seed(0))
    assert bound.mean().item() / 32 < 0.8 * torch.log(torch.tensor(32.0)).item()
    with pytest.raises(FileExistsError, match="already holds a release"):
        make_tiny.make_tiny(str(out), train_steps=0)


def test_quickstart_distils_the_tiny_release_and_evaluates_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (runs/quickstart/...) land here
    make_tiny.make_tiny("runs/quickstart/tiny_mdlm", train_steps=5)
    dmmd, di4c = (os.path.join(QUICKSTART, f"{k}_from_tiny_mdlm.yaml") for k in ("dmmd", "di4c"))
    cli = main(["fit", "-c", dmmd, "--trainer.max_steps", "4", *QUIET])
    assert cli.model.teacher.release_kind == "mdlm" and cli.trainer.global_step == 4
    student = "runs/quickstart/dmmd_from_tiny_mdlm/checkpoints/last.ckpt"
    assert os.path.isfile(student)
    main(["fit", "-c", os.path.join(QUICKSTART, "ar_evaluator_tiny_mdlm.yaml"), "--trainer.max_steps", "4", *QUIET])
    evaluator = "runs/quickstart/ar_evaluator_tiny_mdlm/checkpoints/last.ckpt"
    main(["evaluate", "-c", dmmd, "--ckpt_path", student, "--steps", "[2, 4]", "--sampling.num_samples", "8",
          "--metrics.evaluator", evaluator, "--output_dir", "evaluation"])
    data, *rows = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert data["model_class"] == "data" and [r["steps"] for r in rows] == [2, 4]
    for row in (data, *rows):
        assert row["evaluator"] == evaluator and 1.0 < row["gen_ppl"] < 1e4 and 0.0 < row["entropy"]
    assert all(r["model_class"] == "DMMDStudent" and r["checkpoint"] == student for r in rows)
    # the Di4C quickstart on the same release
    cli = main(["fit", "-c", di4c, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", *QUIET])
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
