"""The ``Throughput`` callback on Lightning's ``ThroughputMonitor``: its FLOP count is Lightning's
``measure_flops`` of the training step, its rates agree with each other, and MFU is FLOP/s over the peak."""

import glob

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ddd.callbacks import Throughput
from lightning_ddd.data import MarkovChain
from lightning_ddd.diffusion.losses import TimeDCE
from lightning_ddd.modules import DiffusionTeacher
from lightning_ddd.nn import DenoisingTransformer


def backbone(n, v, d):
    return DenoisingTransformer(n, v, d, d_model=32, n_layers=2, n_heads=2)


def test_flops_are_measure_flops_of_the_step_and_mfu_uses_the_peak(tmp_path):
    torch.manual_seed(0)
    model = DiffusionTeacher(5, 8, backbone=backbone, loss=TimeDCE())
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                         callbacks=[Throughput(window_size=2, peak_flops=1e12)],
                         logger=TensorBoardLogger(str(tmp_path), name="t"))
    trainer.fit(model, datamodule=MarkovChain(vocab_size=5, seq_len=8, num_train=160, num_val=16, batch_size=16))
    # A teacher step is one backbone forward and backward on the (16, 8) batch, with the head on the masked
    # positions only: Lightning's count of the full pass less the head's 6 d V FLOPs (forward, and backward
    # to input and weight) at each position that is not masked.
    net = backbone(6, 5, 8)
    z = torch.randint(0, 6, (16, 8))
    full = measure_flops(net, lambda: net(z), loss_fn=lambda out: out.float().logsumexp(-1).sum())
    head_per_position = 6 * 32 * 5
    assert full > 0 and full - head_per_position * 16 * 8 <= model.flops_per_batch < full
    scalars = {}
    for path in glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    flops, mfu = scalars["train/device/flops_per_sec"], scalars["train/device/mfu"]
    batches = scalars["train/device/batches_per_sec"]
    assert flops.keys() == mfu.keys() and len(flops) >= 2
    for step in flops:
        assert mfu[step] == pytest.approx(flops[step] / 1e12, rel=1e-5)
        assert flops[step] == pytest.approx(batches[step] * model.flops_per_batch, rel=1e-5)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="window_size"):
        Throughput(window_size=1)
    with pytest.raises(ValueError, match="flop_count_batches"):
        Throughput(flop_count_batches=-1)
