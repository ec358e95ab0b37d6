"""MDLM and SEDD rebuilt natively: the name map, round trips through the released layouts against an independent
forward, the denoise contract, bf16, the conditioning input, and the sampler (no network, no transformers)."""

import copy
import math

import pytest
import torch

from lightning_ddd.diffusion.sampling import sample
from lightning_ddd.modules import ReleasedTeacher
from lightning_ddd.released import ReleasedModelError, release_name_map
from lightning_ddd.released.dit import DiT, loglinear_sigma, release_state_dict
from released_layouts import random_dit, reference_forward, tiny_config, write_mdlm, write_sedd

V = 10  # real tokens of the tiny releases; the mask is id 10


def masked_ids(B=3, L=16, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(V, (B, L), generator=g)
    return torch.where(torch.rand(B, L, generator=g) < p, torch.full_like(x, V), x)


def subs_reference(raw, z):
    """MDLM's SUBS output from raw logits (B, L, V + 1), float64: -1e6 at the mask, normalise, carry over."""
    logits = raw.clone()
    logits[..., V] += -1e6
    logits = logits - torch.logsumexp(logits, -1, keepdim=True)
    visible = z != V
    logits[visible] = -1e6
    logits[visible, z[visible]] = 0.0
    return logits[..., :V]


def test_name_map_is_a_bijection_onto_the_native_parameters():
    model = DiT(tiny_config())
    names = release_name_map(2, "backbone.")
    assert sorted(names.values()) == sorted(model.state_dict())
    assert len(set(names)) == len(names) and all(k.startswith("backbone.") for k in names)
    assert names["backbone.blocks.1.adaLN_modulation.weight"] == "blocks.1.ada.weight"
    # the released shapes: embedding and head have V + 1 rows, qkv is (3d, d) without bias, adaLN (6d, cond)
    state = release_state_dict(model, "")
    assert state["vocab_embed.embedding"].shape == (11, 16) and state["output_layer.linear.weight"].shape == (11, 16)
    assert state["blocks.0.attn_qkv.weight"].shape == (48, 16) and "blocks.0.attn_qkv.bias" not in state
    assert state["blocks.0.adaLN_modulation.weight"].shape == (96, 8)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_mdlm_layout_round_trip_matches_the_module_and_an_independent_forward(tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    original = random_dit(tiny_config())
    folder = write_mdlm(tmp_path / "mdlm", original, fmt)
    teacher = ReleasedTeacher(folder)
    assert teacher.release_kind == "mdlm" and teacher.vocab_size == V and teacher.seq_len == 16
    assert teacher.process.mask_id == V and not teacher.backbone.time_conditioning
    z = masked_ids()
    out = teacher.denoise(z)
    torch.testing.assert_close(out, teacher.process.x0_log_probs(original(z), z))  # the module before saving
    state = release_state_dict(original, "backbone.")
    raw = reference_forward(state, 2, 2, z, torch.zeros(z.shape[0]))  # MDLM: sigma = 0 always
    ref = subs_reference(raw, z)
    masked = z == V
    torch.testing.assert_close(out[masked].double(), ref[masked], atol=2e-5, rtol=1e-5)
    # time-independent: t is ignored
    torch.testing.assert_close(teacher.denoise(z, torch.full((3,), 0.9)), out)


def test_sedd_layout_is_time_conditioned_and_its_scores_normalise_to_the_denoiser(tmp_path):
    original = random_dit(tiny_config(time_input="loglinear"), seed=1)
    teacher = ReleasedTeacher(write_sedd(tmp_path / "sedd", original))
    assert teacher.release_kind == "sedd" and teacher.backbone.time_conditioning
    z, t = masked_ids(seed=2), torch.tensor([0.1, 0.5, 0.97])
    out = teacher.denoise(z, t)
    sigma = loglinear_sigma(t, 1e-3)
    torch.testing.assert_close(torch.exp(-sigma), 1 - (1 - 1e-3) * t)  # SEDD's noise is this project's log-linear
    raw = reference_forward(release_state_dict(original, ""), 2, 2, z, sigma, prefix="")
    # SEDD's own output: log-scores raw - log(e^sigma - 1) - log(N - 1), zero at the input token. RADD: at a masked
    # position the score of token y is p(y | visible) / (e^sigma - 1), so the conditional is the normalised score.
    log_score = raw - torch.log(torch.expm1(sigma.double()))[:, None, None] - math.log(V)
    log_score = log_score.scatter(-1, z[..., None], 0.0)
    ref = torch.log_softmax(log_score[..., :V], -1)
    masked = z == V
    torch.testing.assert_close(out[masked].double(), ref[masked], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(teacher.denoise(z, torch.full((3,), 0.2)), teacher.denoise(z, torch.full((3,), 0.8)))
    nested = ReleasedTeacher(write_sedd(tmp_path / "nested", original, nested=True))
    torch.testing.assert_close(nested.denoise(z, t), out)
    with pytest.raises(ValueError, match="needs t"):
        teacher.backbone(z)


def test_denoise_contract_and_bf16(tmp_path):
    teacher = ReleasedTeacher(write_mdlm(tmp_path / "m", random_dit(tiny_config())))
    z = masked_ids(B=4)
    out = teacher.denoise(z)
    assert out.shape == (4, 16, V) and out.dtype == torch.float32
    masked = z == V
    torch.testing.assert_close(out.logsumexp(-1)[masked], torch.zeros(int(masked.sum())))  # normalised over V
    visible = ~masked
    assert (out[visible].exp().gather(-1, z[visible][:, None]) == 1).all()  # carry-over
    assert (out[visible].exp().sum(-1) == 1).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = teacher.denoise(z)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low[masked].exp(), out[masked].exp(), atol=0.05, rtol=0)
    half = ReleasedTeacher(write_mdlm(tmp_path / "m16", random_dit(tiny_config()))).to(torch.bfloat16)  # bf16 weights
    assert half.denoise(z).dtype == torch.float32
    torch.testing.assert_close(half.denoise(z)[masked].exp(), out[masked].exp(), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="token ids must lie"):
        teacher.backbone(torch.full((1, 4), V + 1))
    with pytest.raises(ValueError, match="trained on 16"):
        teacher.backbone(torch.zeros(1, 17, dtype=torch.long))


def test_conditioning_input_starts_at_zero_and_copies(tmp_path):
    teacher = ReleasedTeacher(write_mdlm(tmp_path / "m", random_dit(tiny_config())))
    student = copy.deepcopy(teacher.backbone)
    student.add_cond_input(5)
    z, cond = masked_ids(), torch.randn(3, 16, 5)
    torch.testing.assert_close(student(z, None, cond), teacher.backbone(z))  # the student starts as the teacher
    with torch.no_grad():
        student.cond_proj[2].weight.normal_()
    assert not torch.allclose(student(z, None, cond), teacher.backbone(z))
    assert teacher.backbone.cond_proj is None  # the teacher is untouched
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="already has"):
        student.add_cond_input(5)
    with pytest.raises(ValueError, match="cond must have shape"):
        student(z, None, torch.randn(3, 4))


@pytest.mark.parametrize("cache", [False, True])
def test_sampler_runs_on_the_released_teacher(tmp_path, cache):
    teacher = ReleasedTeacher(write_mdlm(tmp_path / "m", random_dit(tiny_config())))
    out = sample(teacher.denoise, teacher.process, 5, 16, 8, generator=torch.Generator().manual_seed(0), cache=cache)
    assert out.tokens.shape == (5, 16) and out.tokens.min() >= 0 and out.tokens.max() < V
    if cache:  # the caching sampler consumes the same random numbers: identical tokens
        again = sample(teacher.denoise, teacher.process, 5, 16, 8, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens, again.tokens) and (out.nfe <= 8).all()
    sedd = ReleasedTeacher(write_sedd(tmp_path / "s", random_dit(tiny_config(time_input="loglinear"))))
    drawn = sedd.generate(4, 6, generator=torch.Generator().manual_seed(1)).tokens
    assert drawn.shape == (4, 16) and drawn.max() < V


def test_layout_errors_are_one_line(tmp_path):
    model = random_dit(tiny_config())
    state = release_state_dict(model, "backbone.")

    def check(mutate, match):
        folder = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        write_mdlm(folder, model)
        bad = dict(state)
        mutate(bad)
        torch.save(bad, folder / "pytorch_model.bin")
        with pytest.raises(ReleasedModelError, match=match) as err:
            ReleasedTeacher(str(folder))
        assert "\n" not in str(err.value)

    check(lambda s: s.update({"backbone.blocks.0.attn_out.weight": torch.zeros(16, 8)}), r"attn_out.weight' has shape \(16, 8\)")
    check(lambda s: s.pop("backbone.output_layer.linear.bias"), "missing")
    check(lambda s: s.update({"backbone.extra.weight": torch.zeros(1)}), "unexpected")
    check(lambda s: s.update({"backbone.rotary_emb.inv_freq": torch.ones(4)}), "rotary table")
    with pytest.raises(ReleasedModelError, match="graph 'uniform'"):
        ReleasedTeacher(write_sedd(tmp_path / "uniform", model, graph="uniform"))
    with pytest.raises(ReleasedModelError, match="noise 'geometric'"):
        ReleasedTeacher(write_sedd(tmp_path / "geometric", model, noise="geometric"))
    with pytest.raises(ReleasedModelError, match="mask at 10"):
        ReleasedTeacher(write_mdlm(tmp_path / "ok", model), mask_id=3)
