"""Students distilled from released teachers, with no network: for every kind of release (MDLM and SEDD rebuilt
natively, a transformers masked LM taking the extra input at its embeddings) the student is a copy that equals
the teacher at step 0; its checkpoint holds no teacher and records the teacher's identity, checked when it is
rebuilt; bad input fails in one line through the students' path before any work."""

import glob
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the releases' tokenizers, and the BERT release

from lightning_ddd.cli import main  # noqa: E402
from lightning_ddd.modules import DMMDStudent, MixtureStudent, TeacherOptions  # noqa: E402
from lightning_ddd.modules.dmmd_student import DMMDSettings  # noqa: E402
from lightning_ddd.modules.mixture_student import MixtureSettings  # noqa: E402
from lightning_ddd.released import DiT, HFMaskedLM, ReleasedModelError  # noqa: E402
from lightning_ddd.released.sources import directory_sha256  # noqa: E402
from released_layouts import (  # noqa: E402
    COMMIT,
    random_dit,
    tiny_config,
    write_bert,
    write_hub_cache,
    write_mdlm,
    write_sedd,
    write_word_tokenizer,
)

OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Tiny releases with dropout 0.1 (as MDLM's): MDLM's layout (time-independent), SEDD's (time-conditioned),
    a BERT saved with save_pretrained; each with its own word tokenizer; and a corpus in the MDLM one's words."""
    root = tmp_path_factory.mktemp("releases")
    mdlm = write_mdlm(root / "mdlm", random_dit(tiny_config(dropout=0.1)))
    words = write_word_tokenizer(mdlm, 10)
    sedd = write_sedd(root / "sedd", random_dit(tiny_config(dropout=0.1, time_input="loglinear"), seed=1))
    write_word_tokenizer(sedd, 10)
    bert, _ = write_bert(root / "bert")
    g = torch.Generator().manual_seed(0)
    corpus = root / "corpus.jsonl"
    docs = [" ".join(words[2 + int(i)] for i in torch.randint(8, (40,), generator=g)) for _ in range(24)]
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return {"mdlm": mdlm, "sedd": sedd, "bert": bert, "corpus": str(corpus)}


def make_student(kind: str, source: str, **kw):
    if kind == "dmmd":
        return DMMDStudent(source, dmmd=DMMDSettings(noise_dim=4), **kw)
    return MixtureStudent(source, mixture=MixtureSettings(num_lambda=2, lambda_dim=8, position_dim=4), **kw)


def noisy_batch(V: int, D: int, g: torch.Generator, low: int = 0):
    x = torch.randint(low, V, (3, D), generator=g)
    z = torch.where(torch.rand(3, D, generator=g) < 0.6, torch.full_like(x, V), x)  # the project's mask id is V
    return z, 0.05 + 0.9 * torch.rand(3, generator=g)


@pytest.mark.parametrize("release", ["mdlm", "sedd", "bert"])
@pytest.mark.parametrize("kind", ["dmmd", "di4c"])
def test_student_starts_as_the_released_teacher(releases, kind, release):
    s = make_student(kind, releases[release])
    teacher = s.teacher
    assert isinstance(s.backbone, HFMaskedLM if release == "bert" else DiT) and s.backbone.cond_proj is not None
    assert not any("teacher" in key for key in s.state_dict()) and not teacher.training
    g = torch.Generator().manual_seed(0)
    z, t = noisy_batch(s.vocab_size, s.seq_len, g, low=3 if release == "bert" else 0)  # BERT's <mask> is id 2
    cond = s.step_condition(3, g)  # the student's extra input: noise (3, D, 4) or lambda (3, D, 12)
    expected = teacher.denoise(z, t)
    s.eval()
    assert torch.equal(s.denoise(z, t, cond), expected)  # the zero-initialised input changes nothing
    if kind == "dmmd":  # the auxiliary starts as the teacher too
        for name, value in teacher.backbone.state_dict().items():
            assert torch.equal(s.aux_backbone.state_dict()[name], value), name
    # In training mode the copy keeps the release's dropout (0.1) unless teacher_options.dropout says otherwise.
    s.train()
    assert not torch.equal(s.denoise(z, t, cond), expected)
    quiet = make_student(kind, releases[release], teacher_options=TeacherOptions(dropout=0.0)).train()
    assert torch.equal(quiet.denoise(z, t, cond), expected)
    assert {m.p for m in quiet.backbone.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    with torch.no_grad():  # and the input is live: a non-zero projection moves the outputs
        last = quiet.backbone.cond_proj[2].weight
        last.copy_(0.5 * torch.randn(last.shape, generator=g))
    assert not torch.allclose(quiet.denoise(z, t, cond), expected)


@pytest.mark.parametrize("kind", ["dmmd", "di4c"])
def test_losses_train_the_extra_input_of_a_released_student(releases, kind):
    s = make_student(kind, releases["mdlm"], teacher_options=TeacherOptions(dropout=0.0))
    x = torch.randint(10, (4, 16), generator=torch.Generator().manual_seed(1))
    extra = {"trains": "student"} if kind == "dmmd" else {}
    out = s.compute_losses(x, torch.Generator().manual_seed(2), **extra)
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert s.backbone.cond_proj[2].weight.grad is not None  # the gradient reaches the new input's last layer
    assert all(p.grad is None for p in s.teacher.parameters())


# ---- through the command line: checkpoints, identity, resume and evaluate ----------------------------


def student_args(teacher, corpus, tokenizer, root, *extra, model="DMMDStudent"):
    tiny = ["--model.dmmd.noise_dim", "4"] if model == "DMMDStudent" else [
        "--model.mixture.num_lambda", "2", "--model.mixture.lambda_dim", "8"]
    return ["--model", model, "--model.teacher_ckpt", teacher, *tiny, "--data", "TextDataModule",
            "--data.dataset", "files", "--data.files", f"[{corpus}]", "--data.tokenizer", "HFTokenizer",
            "--data.tokenizer.name_or_path", tokenizer, "--data.seq_len", "16", "--data.batch_size", "4",
            "--data.cache_dir", str(root / "cache"), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root / "run"), *extra]


def test_checkpoint_records_the_release_directory_and_rejects_a_changed_one(releases, tmp_path, monkeypatch):
    folder = write_mdlm(tmp_path / "mdlm", random_dit(tiny_config(dropout=0.1)))
    write_word_tokenizer(folder, 10)
    cli = main(["fit", *student_args(folder, releases["corpus"], folder, tmp_path, "--trainer.max_steps", "2")])
    (ckpt,) = glob.glob(str(tmp_path / "run" / "**" / "*.ckpt"), recursive=True)
    state = torch.load(ckpt, weights_only=False)
    teacher_keys = cli.model.teacher.backbone.state_dict()
    # student (with its 4-tensor noise input) + auxiliary, and nothing of the teacher
    assert all(k.startswith(("backbone.", "aux_backbone.")) for k in state["state_dict"])
    assert len(state["state_dict"]) == 2 * len(teacher_keys) + 4
    sha = directory_sha256(folder)
    assert state["teacher_identity"] == {"source": os.path.abspath(folder), "revision": None, "sha256": sha}
    assert state["hyper_parameters"]["teacher_sha256"] == state["teacher_sha256"] == sha
    assert state["hyper_parameters"]["teacher_options"]["revision"] is None
    # evaluate rebuilds the student from the checkpoint's hyperparameters: the same teacher loads
    out = tmp_path / "eval"
    args = student_args(folder, releases["corpus"], folder, tmp_path, "--ckpt_path", ckpt, "--steps", "[2]",
                        "--sampling.num_samples", "4", "--output_dir", str(out))
    main(["evaluate", *args])
    row = json.loads((out / "evaluation.json").read_text())[-1]
    assert row["model_class"] == "DMMDStudent" and row["checkpoint"] == ckpt and row["entropy"] > 0
    # a release that changed since: one line from `python -m lightning_ddd` before any work, nothing written
    write_mdlm(folder, random_dit(tiny_config(dropout=0.1), seed=5))
    changed = tmp_path / "eval-changed"
    message = run_main(monkeypatch, "evaluate", *student_args(folder, releases["corpus"], folder, tmp_path, "--ckpt_path",
                                                             ckpt, "--output_dir", str(changed)))
    assert f"has sha256 {directory_sha256(folder)} but this student was trained against {sha}" in message
    assert not changed.exists()


def run_main(monkeypatch, *args) -> str:
    """``python -m lightning_ddd *args`` in process; the one-line message it exits with."""
    from lightning_ddd.__main__ import run

    monkeypatch.setattr(sys, "argv", ["lightning_ddd", *args])
    with pytest.raises(SystemExit) as exit_:
        run()
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_hub_teacher_is_pinned_to_its_commit(releases, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = str(tmp_path / "hf")
    src = write_mdlm(tmp_path / "src", random_dit(tiny_config(dropout=0.1)))
    write_word_tokenizer(src, 10)
    write_hub_cache(cache, "acme/tiny-mdlm", src)
    hub = ["--model.teacher_options.cache_dir", cache]
    cli = main(["fit", *student_args("acme/tiny-mdlm", releases["corpus"], src, tmp_path, "--trainer.max_steps", "2",
                                     "--trainer.limit_val_batches", "1", *hub, model="MixtureStudent")])
    (ckpt,) = glob.glob(str(tmp_path / "run" / "**" / "*.ckpt"), recursive=True)
    state = torch.load(ckpt, weights_only=False)
    assert state["teacher_identity"] == {"source": "acme/tiny-mdlm", "revision": COMMIT, "sha256": None}
    assert state["hyper_parameters"]["teacher_options"]["revision"] == COMMIT  # resolved from `main`
    # The hub's main moves to other weights: the student still rebuilds against the commit it was trained with.
    write_hub_cache(cache, "acme/tiny-mdlm", write_mdlm(tmp_path / "src2", random_dit(tiny_config(), seed=7)),
                    commit=OTHER_COMMIT)
    z = torch.full((2, 16), 10)
    cond = cli.model.draw_lambda(2, torch.Generator().manual_seed(0))
    reloaded = MixtureStudent.load_from_checkpoint(ckpt).eval()
    assert reloaded.teacher_identity["revision"] == COMMIT
    assert torch.equal(reloaded.denoise(z, None, cond), cli.model.eval().denoise(z, None, cond))
    assert torch.equal(reloaded.teacher.denoise(z), cli.model.teacher.denoise(z))
    # asking for another commit explicitly is a changed teacher: one line
    with pytest.raises(ValueError, match=f"now has revision {OTHER_COMMIT} but the student was trained against {COMMIT}"):
        MixtureStudent.load_from_checkpoint(ckpt, teacher_options={"cache_dir": cache, "revision": OTHER_COMMIT})


# ---- bad input: one line, through the students' path, before any work ---------------------------------


def not_a_layout(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"hello": 1}')
    return str(tmp_path / "odd"), {}


def bert_without_mask(tmp_path):
    return write_bert(tmp_path / "nomask", mask_token=False)[0], {}


def remote_code(tmp_path):
    folder = write_mdlm(tmp_path / "remote", random_dit(tiny_config()), remote_code=True)
    write_word_tokenizer(folder, 10)
    return folder, {"teacher_options": TeacherOptions(loader="transformers")}


@pytest.mark.parametrize("case, message", [
    (lambda tmp, rel: ("acme/not-downloaded", {"teacher_options": TeacherOptions(cache_dir=str(tmp / "hf"))}),
     "hub model 'acme/not-downloaded' is not in the local Hugging Face cache"),
    (lambda tmp, rel: not_a_layout(tmp), "is not a supported released-model layout"),
    (lambda tmp, rel: (str(tmp), {}), "has no config.json"),
    (lambda tmp, rel: bert_without_mask(tmp), "has no mask token"),
    (lambda tmp, rel: (rel["mdlm"], {"vocab_size": 9}), "vocab_size mismatch: the data has 9 tokens"),
    (lambda tmp, rel: (rel["mdlm"], {"seq_len": 32}), "seq_len mismatch: the data has rows of 32 tokens"),
    (lambda tmp, rel: remote_code(tmp), "set trust_remote_code: true"),
    (lambda tmp, rel: ("teacher.ckpt", {"teacher_options": TeacherOptions(revision="main")}),
     r"'teacher.ckpt' is a lightning_ddd checkpoint; teacher_options \['revision'\] apply to hub ids"),
], ids=["hub-id-offline", "not-a-layout", "no-config", "no-mask-token", "vocab", "seq-len", "remote-code",
        "ckpt-with-release-options"])
@pytest.mark.parametrize("kind", ["dmmd", "di4c"])
def test_bad_teacher_is_one_line_through_the_students(releases, tmp_path, monkeypatch, kind, case, message):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source, kwargs = case(tmp_path, releases)
    with pytest.raises(ValueError, match=message) as err:
        make_student(kind, source, **kwargs)
    assert "\n" not in str(err.value)


def test_data_that_disagrees_with_the_release_fails_before_any_data_is_read(releases, tmp_path):
    folder = releases["mdlm"]
    other = tmp_path / "other-tok"  # ten ids too, but another vocabulary
    write_word_tokenizer(other, 10)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"w3"', '"zz"'))
    with pytest.raises(ValueError, match="tokenizer mismatch: the data's tokenizer") as err:
        main(["fit", *student_args(folder, releases["corpus"], str(other), tmp_path)])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="vocab_size mismatch: the data has 257 tokens"):
        main(["fit", *student_args(folder, releases["corpus"], folder, tmp_path, "--data.tokenizer", "ByteTokenizer")])
    assert not (tmp_path / "run").exists()  # no run folder, checkpoint or log
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_unknown_hub_teacher_from_the_command_line_is_one_line(releases, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = run_main(monkeypatch, "fit", *student_args("acme/not-downloaded", releases["corpus"], releases["mdlm"],
                                                         tmp_path, "--model.teacher_options.cache_dir", str(tmp_path / "hf")))
    assert message.startswith("error: hub model 'acme/not-downloaded'") and "hf download acme/not-downloaded" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("student", ["DMMDStudent", "MixtureStudent"])
def test_help_explains_released_teachers(student, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", student])
    out = capsys.readouterr().out
    for text in ["kuleshov-group/mdlm-owt", "--model.teacher_options.revision", "--model.teacher_options.trust_remote_code",
                 "--model.teacher_options.dropout", "resolved commit"]:
        assert text in out, text


def test_extra_input_reaches_a_model_without_inputs_embeds_through_a_hook(releases):
    """A masked LM whose forward takes ids only gets the same extra input through a hook on its embeddings."""
    bert = transformers.AutoModelForMaskedLM.from_pretrained(releases["bert"]).eval()

    class IdsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids)

    direct, hooked = HFMaskedLM(bert, 2, 20, 12), HFMaskedLM(IdsOnly(bert), 2, 20, 12)
    for wrapper in (direct, hooked):
        wrapper.add_cond_input(4)
    g = torch.Generator().manual_seed(0)
    z, _ = noisy_batch(20, 12, g, low=3)
    cond = torch.randn(3, 12, 4, generator=g)
    torch.testing.assert_close(hooked(z, None, cond), direct(z))  # zero-initialised: no change
    with torch.no_grad():  # the same non-zero projection in both
        direct.cond_proj[2].weight.copy_(0.5 * torch.randn(direct.cond_proj[2].weight.shape, generator=g))
    hooked.cond_proj.load_state_dict(direct.cond_proj.state_dict())
    torch.testing.assert_close(hooked(z, None, cond), direct(z, None, cond))
    assert not torch.allclose(hooked(z, None, cond), direct(z))
    assert not bert.get_input_embeddings()._forward_hooks  # the hook is removed after each call
