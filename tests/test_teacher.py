"""The teacher module outside the CLI: precision, process/loss checks, data checks, learning."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_ddd.data import MarkovChain
from lightning_ddd.diffusion import MaskedProcess, UniformProcess
from lightning_ddd.diffusion.losses import AnyOrderLoss, UniformELBO
from lightning_ddd.modules import DiffusionTeacher
from lightning_ddd.modules.base import NoiseStream
from lightning_ddd.nn import DenoisingTransformer


def tiny_backbone(time_conditioning=False):
    def build(n_in, vocab, seq_len):
        return DenoisingTransformer(n_in, vocab, seq_len, d_model=16, n_layers=1, n_heads=2, time_conditioning=time_conditioning)

    return build


def trainer(**kw):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kw})


def test_losses_are_fp32_under_bf16_autocast():
    model = DiffusionTeacher(5, 8, backbone=tiny_backbone())
    x = torch.randint(5, (4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.denoise(x, None).dtype == torch.float32
        assert model.loss(model.denoise, x, model.process).dtype == torch.float32


def test_bf16_mixed_fit_runs():
    model = DiffusionTeacher(5, 8, backbone=tiny_backbone())
    data = MarkovChain(vocab_size=5, seq_len=8, num_train=64, num_val=32, batch_size=16)
    t = trainer(max_steps=3, precision="bf16-mixed", limit_val_batches=1)
    t.fit(model, data)
    assert torch.isfinite(t.callback_metrics["train/loss"])


def test_process_and_loss_must_agree():
    with pytest.raises(ValueError, match="UniformELBO"):
        DiffusionTeacher(5, 8, process=UniformProcess, backbone=tiny_backbone(True))
    with pytest.raises(ValueError, match="time_conditioning"):
        DiffusionTeacher(5, 8, backbone=tiny_backbone(True), loss=AnyOrderLoss())


def test_vocabulary_mismatch_is_caught_before_training():
    model = DiffusionTeacher(6, 8, backbone=tiny_backbone())
    data = MarkovChain(vocab_size=5, seq_len=8, num_train=64, num_val=32, batch_size=16)
    with pytest.raises(ValueError, match="vocab_size mismatch"):
        trainer(max_steps=1).fit(model, data)


def test_out_of_range_tokens_are_caught():
    model = DiffusionTeacher(5, 8, backbone=tiny_backbone())
    with pytest.raises(ValueError, match="vocab_size is 5"):
        model.check_batch(torch.full((2, 8), 5))


@pytest.mark.parametrize("uniform", [False, True], ids=["masked", "uniform"])
def test_teacher_learns(uniform):
    torch.manual_seed(0)
    kwargs = dict(process=UniformProcess, loss=UniformELBO(100)) if uniform else {}
    model = DiffusionTeacher(5, 8, backbone=tiny_backbone(uniform), **kwargs)
    data = MarkovChain(vocab_size=5, seq_len=8, sharpness=3.0, num_train=512, num_val=256, batch_size=64)
    t = trainer(max_steps=0)
    before = t.validate(model, data, verbose=False)[0]["val/nll"]
    model.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=1e-2)
    t = trainer(max_steps=60, limit_val_batches=0)
    t.fit(model, data)
    after = trainer().validate(model, data, verbose=False)[0]["val/nll"]
    assert after < before - 0.1, (before, after)
    assert after > data.exact_entropy() / 8 - 0.05  # a bound cannot beat the true entropy (up to noise)


def test_deep_copy_shares_optimiser_factories():
    # EMA deep-copies the module; the CLI's factories reference the trainer, which holds locks.
    import copy
    import threading

    class Factory:  # like the CLI's wrapped constructors: holds something that cannot be copied
        lock = None

        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self, params):
            return torch.optim.SGD(params, 0.1)

    with pytest.raises(TypeError):
        copy.deepcopy(Factory())
    model = DiffusionTeacher(5, 8, backbone=tiny_backbone(), optimizer=Factory())
    clone = copy.deepcopy(model)
    assert clone.optimizer_factory is model.optimizer_factory
    assert clone.backbone is not model.backbone


@pytest.mark.parametrize("step", ["training_step", "validation_step"])
def test_the_base_checks_the_first_batch_of_each_stage(step):
    model = DiffusionTeacher(5, 8, backbone=tiny_backbone())
    with pytest.raises(ValueError, match="vocab_size is 5"):
        getattr(model, step)(torch.full((2, 8), 5), 0)


def test_compute_losses_is_the_logged_training_objective():
    model = DiffusionTeacher(5, 8, backbone=tiny_backbone(), loss=AnyOrderLoss(), seed=3)
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    x = torch.randint(5, (4, 8), generator=torch.Generator().manual_seed(0))
    loss = model.training_step(x, 0)
    # The same seeded draws by hand: stream TRAIN at step 0, the bound per token.
    bound = AnyOrderLoss()(model.denoise, x, model.process, model.noise_generator(NoiseStream.TRAIN, 0))
    assert torch.equal(loss, bound.float().mean() / 8) and torch.equal(logged["train/loss"], loss.detach())
