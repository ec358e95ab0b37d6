"""The EMA callback: Lightning's ``EMAWeightAveraging`` numbers on one device, checkpoints that move between the
two and resume exactly, the export, and (2 processes on the CPU) DDP and FSDP2-sharded weights."""

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from lightning_ddd.callbacks import EMA, export_weights
from lightning_ddd.callbacks.ema import ShardedAverage
from lightning_ddd.checkpoints import validate_checkpoint
from lightning_ddd.data import MarkovChain
from lightning_ddd.diffusion.losses import AnyOrderLoss
from lightning_ddd.modules import DiffusionTeacher
from lightning_ddd.nn import DenoisingTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_teacher() -> DiffusionTeacher:
    torch.manual_seed(0)
    return DiffusionTeacher(5, 8, backbone=lambda n, v, d: DenoisingTransformer(n, v, d, d_model=16, n_layers=1, n_heads=2),
                            loss=AnyOrderLoss(), optimizer=lambda params: torch.optim.AdamW(params, lr=0.01))


def fit(root, averaging, max_steps=4, ckpt_path=None, every=None):
    callbacks = [averaging, ModelCheckpoint(dirpath=str(root), save_last=True, save_top_k=-1,
                                            every_n_train_steps=every, filename="{step}")]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         val_check_interval=2, check_val_every_n_epoch=None)
    model = tiny_teacher()
    trainer.fit(model, datamodule=MarkovChain(vocab_size=5, seq_len=8, num_train=16, num_val=16, batch_size=8),
                ckpt_path=ckpt_path, weights_only=False)
    return model, trainer


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_ema_equals_lightnings_ema_weight_averaging(tmp_path):
    """Same arguments, same numbers (a fused lerp against torch's per-parameter EMA) and the same layout."""
    for decay in (0.5, 0.9):
        ours, _ = fit(tmp_path / f"ours{decay}", EMA(decay=decay, update_starting_at_step=1))
        theirs, _ = fit(tmp_path / f"theirs{decay}", EMAWeightAveraging(decay=decay, update_starting_at_step=1))
        a, b = load(tmp_path / f"ours{decay}" / "last.ckpt"), load(tmp_path / f"theirs{decay}" / "last.ckpt")
        for key in ("state_dict", "current_model_state"):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
        assert int(a["averaging_state"]["n_averaged"]) == int(b["averaging_state"]["n_averaged"]) == 3
        assert not torch.equal(a["state_dict"]["backbone.head.weight"], a["current_model_state"]["backbone.head.weight"])
        for (name, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):  # after fit: the average
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_equals_an_uninterrupted_run_and_checkpoints_move_between_callbacks(tmp_path):
    _, _ = fit(tmp_path / "full", EMA(decay=0.8), max_steps=6, every=2)
    full = load(tmp_path / "full" / "step=6.ckpt")
    for first, second in ((EMA, EMA), (EMAWeightAveraging, EMA), (EMA, EMAWeightAveraging)):
        run = tmp_path / f"{first.__name__}-{second.__name__}"
        fit(run, first(decay=0.8), max_steps=2, every=2)
        fit(run, second(decay=0.8), max_steps=6, every=2, ckpt_path=str(run / "step=2.ckpt"))
        resumed = load(run / "step=6.ckpt")
        for key in ("state_dict", "current_model_state"):
            for name, value in full[key].items():
                torch.testing.assert_close(resumed[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


def test_export_writes_the_average_alone_and_loaders_read_it(tmp_path):
    fit(tmp_path, EMA(decay=0.5))
    out = export_weights(str(tmp_path / "last.ckpt"), str(tmp_path / "ema.ckpt"))
    exported, checkpoint = load(out), load(tmp_path / "last.ckpt")
    assert not {"current_model_state", "optimizer_states", "averaging_state"} & exported.keys()
    validate_checkpoint(out, DiffusionTeacher)  # what evaluate --ckpt_path and teacher_ckpt read first
    model = tiny_teacher()
    model.load_state_dict(exported["state_dict"])
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[name], value), name
    assert os.path.getsize(out) < os.path.getsize(tmp_path / "last.ckpt") / 2  # no raw weights, no Adam moments
    with pytest.raises(ValueError, match="no EMA average"):
        export_weights(out, str(tmp_path / "again.ckpt"))


def test_the_average_follows_the_module_and_swaps_back():
    module = torch.nn.Linear(3, 2)
    average = ShardedAverage(module, decay=0.75)
    snapshots = []
    for _ in range(3):
        with torch.no_grad():
            module.weight.add_(torch.randn_like(module.weight))
        snapshots.append(module.weight.detach().clone())
        average.update_parameters(module)
    expected = snapshots[0]
    for w in snapshots[1:]:
        expected = 0.75 * expected + 0.25 * w
    torch.testing.assert_close(average.tensors[0], expected)
    current = module.weight.detach().clone()
    average.swap(module)
    torch.testing.assert_close(module.weight.detach(), expected)
    average.swap(module)
    assert torch.equal(module.weight.detach(), current)


def test_sharded_checkpoints_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_ddd.callbacks.ema import check_strategy

    with pytest.raises(ValueError, match="state_dict_type='full'"):
        check_strategy(FSDPStrategy(state_dict_type="sharded"))
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False"):
        check_strategy(ModelParallelStrategy())
    check_strategy(FSDPStrategy())  # Lightning's default: full checkpoints
    check_strategy(ModelParallelStrategy(save_distributed_checkpoint=False))


def run_script(tmp_path, script: str, *args: str, timeout: int = 600) -> str:
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(path), *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


FSDP2_AVERAGE = '''
import os, socket, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from lightning_ddd.callbacks.ema import ShardedAverage
from lightning_ddd.checkpoints import validate_checkpoint
from lightning_ddd.distributed import clip_grad_norm_

def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 5))

def steps(model, average, rank, world):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    norms = []
    for step in range(4):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))[rank::world]  # this rank's rows
        loss = model(x).pow(2).sum() / 8
        loss.backward()
        if world > 1:  # FSDP averages gradients over ranks; the rows are split, so undo the mean
            for p in model.parameters():
                p.grad.mul_(world)
        norms.append(float(clip_grad_norm_(model.parameters(), 0.05)))
        opt.step(); opt.zero_grad()
        average.update_parameters(model)
    return norms

def worker(rank, world, out, port):
    reference = net()  # one process, unsharded, before the process group exists
    ref_average = ShardedAverage(reference, decay=0.6)
    ref_norms = steps(reference, ref_average, 0, 1)
    ref_average.swap(reference)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = net()
    fully_shard(model[0]); fully_shard(model[2]); fully_shard(model)
    average = ShardedAverage(model, decay=0.6)
    local = [t.numel() for t in average.tensors]
    norms = steps(model, average, rank, world)
    average.swap(model)  # the sharded module now holds the average: gather it whole
    gathered = {k: v.full_tensor() for k, v in model.state_dict().items()}
    # FSDP1's layout: plain tensors, each rank a slice of every flattened gradient
    full = [torch.randn(7, generator=torch.Generator().manual_seed(1)), torch.randn(3, 2, generator=torch.Generator().manual_seed(2))]
    pieces = [torch.nn.Parameter(t.flatten().chunk(world)[rank].clone()) for t in full]
    for piece in pieces:
        piece.grad = piece.detach().clone()
    flat_norm = float(clip_grad_norm_(pieces, 1.0))
    clipped = [t / (torch.cat([f.flatten() for f in full]).norm() + 1e-6) for t in full]
    flat_ok = all(torch.allclose(p.grad, c.flatten().chunk(world)[rank]) for p, c in zip(pieces, clipped))
    if rank == 0:
        print("flat", flat_norm, float(torch.cat([f.flatten() for f in full]).norm()), flat_ok)
        worst = max((gathered[k] - v).abs().max().item() for k, v in reference.state_dict().items())
        print("local sizes", local, "of", [t.numel() for t in ref_average.tensors])
        print("max difference", worst)
        print("norms", norms, ref_norms)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still hold work objects there, and freeing
    # them then aborts the process (pytorch/pytorch#179291), a crash of torch's teardown, not of this test.
    sys.stdout.flush()
    os._exit(0)

if __name__ == "__main__":
    with socket.socket() as probe:  # a free port, so that two runs of the suite at once cannot collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    mp.spawn(worker, args=(2, sys.argv[1], port), nprocs=2)
'''


def test_fsdp2_sharded_average_equals_the_unsharded_one(tmp_path):
    """Two gloo processes shard a module with torch's ``fully_shard`` (FSDP2, which runs on the CPU): each
    averages only its shard, and the gathered average equals one process's unsharded average; the
    sharded gradient clipping sees the global norm, for DTensor shards (FSDP2) and for plain slices of the
    flattened gradients (FSDP1's layout, which needs a GPU to run for real)."""
    out = run_script(tmp_path, FSDP2_AVERAGE, str(tmp_path), timeout=300)
    sizes = out.split("local sizes ")[1].splitlines()[0]
    local, full = (eval(part) for part in sizes.split(" of "))
    assert full == [60, 10, 50, 5] and local == [30, 5, 30, 3]  # rank 0's rows: ceil(rows / 2) of each tensor
    assert float(out.split("max difference ")[1].splitlines()[0]) < 1e-6
    norms, ref_norms = out.split("norms ")[1].splitlines()[0].split("] [")
    norms, ref_norms = eval(norms + "]"), eval("[" + ref_norms)
    assert norms == pytest.approx(ref_norms, rel=1e-5) and min(ref_norms) > 0.05  # every step was clipped
    flat_norm, true_norm, flat_ok = out.split("flat ")[1].splitlines()[0].split()
    assert float(flat_norm) == pytest.approx(float(true_norm), rel=1e-6) and flat_ok == "True"  # FSDP1's slices
