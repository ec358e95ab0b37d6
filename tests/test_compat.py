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
