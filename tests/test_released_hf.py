"""Releases loaded through transformers: a tiny BERT saved with save_pretrained, and an MDLM-style repository with
its own code (trust_remote_code), compared with the native loader. No network."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_ddd.modules import ReleasedTeacher  # noqa: E402
from lightning_ddd.released import HFMaskedLM, ReleasedModelError  # noqa: E402
from lightning_ddd.released.hf import SUPPRESSED_LOGIT  # noqa: E402
from released_layouts import random_dit, tiny_config, write_bert, write_mdlm, write_word_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def modules_cache(monkeypatch, tmp_path_factory):
    """transformers copies remote code into its modules cache: keep that inside the test's temporary files."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.getbasetemp() / "hf-modules"))


def test_bert_masked_lm_as_teacher(tmp_path):
    folder, words = write_bert(tmp_path / "bert")
    teacher = ReleasedTeacher(folder)
    assert teacher.release_kind == "transformers" and isinstance(teacher.backbone, HFMaskedLM)
    assert teacher.vocab_size == 20 and teacher.release_mask_id == 2 and teacher.seq_len == 12
    assert teacher.tokenizer_name == folder
    V = teacher.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, V, (3, 12), generator=g)
    z = torch.where(torch.rand(3, 12, generator=g) < 0.5, torch.full_like(x, V), x)  # project mask id V
    out = teacher.denoise(z)
    # by hand: BERT with its own [MASK] id at the masked positions, the mask's column removed, renormalised
    bert = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    logits = bert(input_ids=torch.where(z == V, torch.full_like(z, 2), z)).logits.double()
    logits[..., 2] = -torch.inf
    expected = torch.log_softmax(logits, -1)
    masked = z == V
    keep = torch.arange(V) != 2
    torch.testing.assert_close(out[masked][:, keep].double(), expected[masked][:, keep], atol=1e-5, rtol=1e-5)
    assert (out[masked][:, 2].exp() == 0).all()  # the release's mask is never predicted
    torch.testing.assert_close(out.logsumexp(-1)[masked], torch.zeros(int(masked.sum())))
    assert (out[~masked].exp().gather(-1, z[~masked][:, None]) == 1).all()
    assert torch.isfinite(teacher.backbone(z)).all() and teacher.backbone(z)[..., 2].max() == SUPPRESSED_LOGIT
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert teacher.denoise(z).dtype == torch.float32
    tokens = teacher.generate(4, 6, generator=torch.Generator().manual_seed(0)).tokens
    assert tokens.shape == (4, 12) and tokens.max() < V and not (tokens == 2).any()
    with pytest.raises(ValueError, match="mask token id 2 as a real token"):
        teacher.check_batch(torch.full((1, 12), 2))


def test_bert_conditioning_input_at_the_embeddings(tmp_path):
    import copy

    teacher = ReleasedTeacher(write_bert(tmp_path / "bert")[0])
    student = copy.deepcopy(teacher.backbone)
    student.add_cond_input(4)
    z, cond = torch.full((2, 12), 20), torch.randn(2, 4)
    torch.testing.assert_close(student(z, None, cond), teacher.backbone(z))
    with torch.no_grad():
        student.cond_proj[2].bias.fill_(0.5)
    assert not torch.allclose(student(z, None, cond), teacher.backbone(z))


def test_model_without_mask_token_is_refused(tmp_path):
    folder, _ = write_bert(tmp_path / "nomask", mask_token=False)
    with pytest.raises(ReleasedModelError, match="has no mask token") as err:
        ReleasedTeacher(folder)
    assert "\n" not in str(err.value)
    assert ReleasedTeacher(folder, mask_id=1).release_mask_id == 1  # or name it explicitly


def test_remote_code_needs_trust_and_then_matches_the_native_loader(tmp_path):
    folder = write_mdlm(tmp_path / "mdlm", random_dit(tiny_config()), remote_code=True)
    write_word_tokenizer(folder, 10)
    with pytest.raises(ReleasedModelError, match="trust_remote_code: true") as err:
        ReleasedTeacher(folder, loader="transformers")
    assert "\n" not in str(err.value) and "modeling_refmdlm.RefMDLM" in str(err.value)
    native = ReleasedTeacher(folder)  # auto: the native loader, no remote code
    remote = ReleasedTeacher(folder, loader="transformers", trust_remote_code=True)
    assert native.release_kind == "mdlm" and remote.release_kind == "transformers"
    assert remote.vocab_size == native.vocab_size == 10 and remote.release_mask_id == 10
    assert remote.backbone.time_input == "sigma" and not remote.backbone.time_conditioning
    g = torch.Generator().manual_seed(3)
    z = torch.where(torch.rand(4, 16, generator=g) < 0.6, 10, torch.randint(10, (4, 16), generator=g))
    masked = z == 10
    torch.testing.assert_close(remote.denoise(z)[masked], native.denoise(z)[masked], atol=2e-5, rtol=1e-5)


def test_native_loader_refuses_other_layouts(tmp_path):
    folder, _ = write_bert(tmp_path / "bert")
    with pytest.raises(ReleasedModelError, match="use loader: transformers"):
        ReleasedTeacher(folder, loader="native")
