"""What the project relies on from third-party APIs that are private or easy to get wrong.

``lightning_ddd.compat`` is the one module that calls Lightning's private ``WeightAveraging`` members; these
tests pin their behaviour, so an upgrade that changes it fails here and not in a sampling callback. The
scorers' metrics turn cross-process syncing off through the public ``sync_on_compute`` argument; the last
test pins that ``compute`` then never syncs.
"""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_ddd.compat import swap_weights, weight_averages
from lightning_ddd.metrics import NLLMetric


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 3)
        self.register_buffer("count", torch.zeros(2))


def state(module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*module.parameters(), *module.buffers())]


def test_weight_averages_are_found_only_while_they_hold_an_average():
    module, averaging = Tiny(), EMAWeightAveraging(decay=0.5)
    trainer = SimpleNamespace(callbacks=[pl.callbacks.LearningRateMonitor(), averaging])
    assert weight_averages(trainer) == []  # before setup (and outside fit) there is no average
    averaging.setup(trainer, module, "fit")
    assert weight_averages(trainer) == [averaging]
    averaging.setup(SimpleNamespace(callbacks=[]), Tiny(), "validate")  # only fit builds one
    assert weight_averages(trainer) == [averaging]


def test_swap_exchanges_parameters_and_buffers_and_is_its_own_inverse():
    module, averaging = Tiny(), EMAWeightAveraging(decay=0.5)
    averaging.setup(SimpleNamespace(callbacks=[averaging]), module, "fit")
    with torch.no_grad():  # make the average differ from the module in every parameter and buffer
        for t in (*averaging._average_model.module.parameters(), *averaging._average_model.module.buffers()):
            t.add_(1.0)
    current, average = state(module), state(averaging._average_model.module)
    swap_weights(averaging, module)
    assert all(torch.equal(a, b) for a, b in zip(state(module), average))
    assert all(torch.equal(a, b) for a, b in zip(state(averaging._average_model.module), current))
    swap_weights(averaging, module)
    assert all(torch.equal(a, b) for a, b in zip(state(module), current))
    assert all(torch.equal(a, b) for a, b in zip(state(averaging._average_model.module), average))


@pytest.mark.parametrize("sync_on_compute", [True, False])
def test_metrics_built_without_sync_never_sync_in_compute(sync_on_compute):
    calls = []

    def gather(tensor, group=None):  # what an all-gather over two identical processes would return
        calls.append(tensor)
        return [tensor, tensor]

    metric = NLLMetric(sync_on_compute=sync_on_compute, dist_sync_fn=gather, distributed_available_fn=lambda: True)
    for _ in range(2):  # also after a reset
        metric.reset()
        metric.update(torch.tensor([2.0, 4.0]), 3)
        assert metric.compute()["nll"].item() == pytest.approx(1.0)  # summed states: the ratio is unchanged
    assert bool(calls) == sync_on_compute  # the True case shows the test would see a sync


def test_a_scorer_syncs_its_metrics_only_when_several_ranks_score():
    """The callbacks' scorer (rank 0 alone) must not sync; a data-parallel evaluation's must."""
    from lightning_ddd.data import MarkovChain
    from lightning_ddd.distributed import Ranks
    from lightning_ddd.evaluation import MetricOptions, SampleScorer

    data = MarkovChain(vocab_size=3, seq_len=4, num_train=8, num_val=8, batch_size=4)
    for ranks, sync in ((Ranks(), False), (Ranks(0, 2), True)):
        scorer = SampleScorer(MetricOptions(evaluator="oracle"), data, 3, ranks=ranks)
        assert scorer.metrics and all(metric.sync_on_compute is sync for metric in scorer.metrics)


def test_lightning_cli_merges_checkpoint_hyperparameters_in_parse_ckpt_path():
    """``lightning_ddd.cli`` overrides ``_parse_ckpt_path`` to check a checkpoint's hyperparameters against the
    command line: LightningCLI must still call it between parsing and instantiating."""
    import inspect

    from lightning.pytorch.cli import LightningCLI

    source = inspect.getsource(LightningCLI.__init__)
    parse, merge, build = (source.find(s) for s in ("self.parse_arguments(", "self._parse_ckpt_path()",
                                                     "self.instantiate_classes()"))
    assert -1 < parse < merge < build


@pytest.mark.parametrize("turned_off", [False, True])
def test_default_hp_metric_can_be_turned_off_after_construction(tmp_path, turned_off):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_ddd.compat import turn_off_default_hp_metric

    logger = TensorBoardLogger(str(tmp_path), name="run")  # default_hp_metric=True, as Lightning's default
    if turned_off:
        turn_off_default_hp_metric(logger)
    logger.log_hyperparams({"lr": 0.1})
    logger.finalize("success")
    (events,) = tmp_path.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert ("hp_metric" in acc.Tags()["scalars"]) is not turned_off


def test_fused_lerp_is_the_ema_formula():
    from lightning_ddd.compat import foreach_lerp_

    targets, sources = [torch.ones(3), torch.zeros(2, 2)], [torch.full((3,), 5.0), torch.full((2, 2), -2.0)]
    foreach_lerp_(targets, sources, 0.25)
    assert torch.allclose(targets[0], torch.full((3,), 0.75 * 1 + 0.25 * 5)) and torch.allclose(targets[1], torch.full((2, 2), -0.5))


def test_throughput_monitor_start_times_and_compute_dtype():
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.plugins import MixedPrecision, Precision
    from lightning.pytorch.trainer.states import RunningStage

    from lightning_ddd.compat import compute_dtype, exclude_time

    monitor = ThroughputMonitor(batch_size_fn=len)
    exclude_time(monitor, RunningStage.TRAINING, 2.5)  # not started: nothing to shift
    monitor._t0s[RunningStage.TRAINING] = 10.0
    exclude_time(monitor, RunningStage.TRAINING, 2.5)
    assert monitor._t0s[RunningStage.TRAINING] == 12.5
    assert compute_dtype(MixedPrecision("bf16-mixed", "cpu")) == torch.bfloat16
    assert compute_dtype(Precision()) == torch.float32


def test_compiled_modules_are_recognised_and_full_state_dicts_load():
    from lightning_ddd.compat import is_compiled, load_full_state_dict

    module = torch.nn.Linear(2, 2)
    assert not is_compiled(module)
    module.compile(backend="eager")  # lazy: nothing is traced until the first call
    assert is_compiled(module)
    plain, source = Tiny(), Tiny()
    load_full_state_dict(SimpleNamespace(world_size=1, model=plain), plain, source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(state(plain), state(source)))
