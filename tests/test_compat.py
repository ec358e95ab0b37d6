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


def test_the_callbacks_scorer_builds_its_metrics_without_sync():
    from lightning_ddd.data import MarkovChain
    from lightning_ddd.evaluation import MetricOptions, SampleScorer

    data = MarkovChain(vocab_size=3, seq_len=4, num_train=8, num_val=8)
    for sync in (True, False):
        scorer = SampleScorer(MetricOptions(evaluator="oracle"), data, 3, sync_on_compute=sync)
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
