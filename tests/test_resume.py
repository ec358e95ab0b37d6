"""Exact resume: the resumable training loader, and fit runs stopped at an epoch's end, by Ctrl-C and by max_steps
that continue bit for bit like an uninterrupted run, for the teacher and both students."""

import glob
import os
import signal

import pytest
import torch
from torch.utils.data import Dataset

from lightning_ddd.cli import main
from lightning_ddd.data import TokenTensorDataset
from lightning_ddd.data.resumable import EpochSeededSampler, ResumableDataLoader
from lightning_ddd.resume import settle_epoch_boundary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {name: os.path.join(ROOT, "tests", "configs", f"tiny_{name}.yaml") for name in ("teacher", "dmmd", "di4c")}


# ---- the loader ----------------------------------------------------------------------------------------------


class CountingDataset(Dataset):
    """Rows 0..n-1 as (1,) tensors; counts the rows read in this process."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return torch.tensor([i])


def loader(dataset, seed=3, **kwargs):
    return ResumableDataLoader(dataset, batch_size=3, sampler=EpochSeededSampler(len(dataset), seed), drop_last=True,
                               **kwargs)


def epoch_batches(dl, epoch):
    dl.sampler.set_epoch(epoch)
    return [b.flatten().tolist() for b in dl]


def test_sampler_order_depends_on_seed_and_epoch_and_skips_from_start():
    s = EpochSeededSampler(70_000, seed=5)  # more than one chunk of indices
    s.set_epoch(2)
    expected = torch.randperm(70_000, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2)).tolist()
    assert list(s) == expected
    s.start = 65_540
    assert list(s) == expected[65_540:] and len(s) == 70_000  # len stays the whole epoch


def test_loader_resumes_mid_epoch_without_reading_the_skipped_rows():
    data = CountingDataset(11)  # 3 batches of 3 per epoch, 2 rows dropped
    straight = epoch_batches(loader(data), 1)
    first = loader(data)
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it).flatten().tolist() for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 2} and seen == straight[:2]

    data.reads = 0
    resumed = loader(data)
    resumed.load_state_dict(state)
    assert epoch_batches(resumed, 1) == straight[2:]
    assert data.reads == 3  # only the batch it hands out is read
    assert resumed.state_dict() == {"epoch": 1, "batches": 3}
    assert epoch_batches(resumed, 2) == epoch_batches(loader(data), 2)  # the next epoch starts at its beginning


@pytest.mark.parametrize("state", [{"epoch": 1, "batches": 3}, {"epoch": 0, "batches": 1}, {"epoch": 1, "batches": 0}])
def test_a_finished_or_other_epoch_starts_at_the_beginning(state):
    data = CountingDataset(11)
    resumed = loader(data)
    resumed.load_state_dict(state)  # the saved epoch had ended, or it is not the epoch being run
    assert epoch_batches(resumed, 1) == epoch_batches(loader(data), 1)


def test_position_counts_batches_handed_out_not_prefetched_by_workers():
    data = TokenTensorDataset(torch.arange(24).view(12, 2))
    dl = ResumableDataLoader(data, batch_size=2, sampler=EpochSeededSampler(12, 0), drop_last=True, num_workers=2,
                             prefetch_factor=2)
    it = iter(dl)
    next(it)  # the workers have fetched several batches ahead by now
    assert dl.state_dict() == {"epoch": 0, "batches": 1}
    rest = [b for b in it]
    resumed = ResumableDataLoader(data, batch_size=2, sampler=EpochSeededSampler(12, 0), drop_last=True)
    resumed.load_state_dict({"epoch": 0, "batches": 1})
    assert all(torch.equal(a, b) for a, b in zip(rest, resumed, strict=True))


def test_loop_state_without_loops_is_left_alone():
    assert settle_epoch_boundary({"state_dict": {}}) is None
    inside_a_batch = {"loops": {"fit_loop": {
        "epoch_progress": {"total": dict(ready=1, started=1, processed=0, completed=0),
                           "current": dict(ready=1, started=1, processed=0, completed=0)},
        "epoch_loop.batch_progress": {"total": dict(ready=2, started=2, processed=2, completed=1),
                                      "current": dict(ready=2, started=2, processed=2, completed=1),
                                      "is_last_batch": False}}}}
    assert settle_epoch_boundary(inside_a_batch) is None  # on_train_batch_end: Lightning restores it itself


# ---- fit, stopped and resumed ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    main(["fit", "-c", CONFIGS["teacher"], "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"])
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


def last_ckpt(root):
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


@pytest.mark.parametrize("name", ["teacher", "dmmd", "di4c"])
def test_stopped_runs_continue_exactly(name, teacher_ckpt, tmp_path, monkeypatch):
    """7 steps straight, against: 3 steps (an epoch's end, by max_steps), Ctrl-C during step 4 (saved after it,
    mid-epoch), then on to 7 (max_steps mid-epoch, between two validations: the final state is saved)."""
    # 3 training batches per epoch (the teacher's data has 4: num_train 48 makes them equal)
    teacher = [] if name == "teacher" else ["--model.init_args.teacher_ckpt", teacher_ckpt]

    def fit(root, max_steps, *extra):
        return main(["fit", "-c", CONFIGS[name], "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "-1",
                     "--trainer.max_steps", str(max_steps), "--data.init_args.num_train", "48", *teacher, *extra])

    straight = fit(tmp_path / "straight", 7)
    fit(tmp_path / "a", 3)
    assert torch.load(last_ckpt(tmp_path / "a"), weights_only=False)["global_step"] == 3

    cls = type(straight.model)
    step = cls.training_step

    def interrupted_step(self, *args, **kwargs):
        if self.global_step == 4:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives in the middle of step 4
        return step(self, *args, **kwargs)

    monkeypatch.setattr(cls, "training_step", interrupted_step)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):
        fit(tmp_path / "b", 7, "--ckpt_path", last_ckpt(tmp_path / "a"))
    monkeypatch.setattr(cls, "training_step", step)
    state = torch.load(last_ckpt(tmp_path / "b"), weights_only=False)
    assert state["global_step"] == 5  # step 4 finished, then saved
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C behaves as before outside fit

    resumed = fit(tmp_path / "c", 7, "--ckpt_path", last_ckpt(tmp_path / "b"))
    assert torch.load(last_ckpt(tmp_path / "c"), weights_only=False)["global_step"] == 7  # the final state
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for opt_a, opt_b in zip(straight.trainer.optimizers, resumed.trainer.optimizers, strict=True):
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
