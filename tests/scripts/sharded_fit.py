import sys
import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_ddd.callbacks import EMA, SampleLogger, TemperatureSweep, Throughput
from lightning_ddd.data import MarkovChain
from lightning_ddd.diffusion.losses import AnyOrderLoss
from lightning_ddd.evaluation import MetricOptions, SamplingSettings
from lightning_ddd.modules import DiffusionTeacher
from lightning_ddd.nn import DenoisingTransformer

strategy_name, root, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
resume = sys.argv[4] if len(sys.argv) > 4 else None
pl.seed_everything(0)
model = DiffusionTeacher(
    5, 8, backbone=lambda n, v, d: DenoisingTransformer(n, v, d, d_model=16, n_layers=2, n_heads=2),
    loss=AnyOrderLoss(), optimizer=lambda params: torch.optim.AdamW(params, lr=0.01))
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False) \
    if strategy_name == "fsdp2" else "ddp"
callbacks = [
    EMA(decay=0.8),
    ModelCheckpoint(dirpath=root + "/ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"),
    TemperatureSweep(every_n_steps=2, temperatures=[1.0], steps=[2], sampling=SamplingSettings(num_samples=6, batch_size=2),
                     metrics=MetricOptions(evaluator="oracle")),
    SampleLogger(sampling=SamplingSettings(num_samples=4, steps=2)),
    Throughput(window_size=2),
]
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, log_every_n_steps=1,
                     val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2, gradient_clip_val=0.05,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     logger=TensorBoardLogger(root, name="logs"))
trainer.fit(model, datamodule=MarkovChain(vocab_size=5, seq_len=8, num_train=32, num_val=32, batch_size=8),
            ckpt_path=resume, weights_only=False)
print(f"rank {trainer.global_rank} finished at step {trainer.global_step}", flush=True)
