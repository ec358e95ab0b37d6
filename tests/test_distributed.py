"""``Ranks``: how processes split a sampling job (the collectives run in tests/test_multiprocess.py)."""

import pytest
import torch

from lightning_ddd.distributed import Ranks


def test_one_process_is_the_identity():
    ranks = Ranks()
    tokens = torch.arange(12).view(6, 2)
    assert ranks.share(7) == 7 and ranks.rows(7) == slice(0, 7) and ranks.seed(5) == 5
    assert ranks.gather(tokens) is tokens and ranks.max(3.5) == 3.5


@pytest.mark.parametrize("num, world", [(10, 3), (2, 4), (64, 2), (1, 1)])
def test_shares_cover_every_sample_once(num, world):
    every = [Ranks(rank, world) for rank in range(world)]
    assert all(r.share(num) == -(-num // world) for r in every)  # equal shares: the same forward passes
    covered = [i for r in every for i in range(num)[r.rows(num)]]
    assert covered == list(range(num))  # the scoring rows partition the gathered samples in order
    seeds = {r.seed(11) for r in every}
    assert len(seeds) == world and every[0].seed(11) == 11  # own streams; rank 0 keeps one process's


def test_a_rank_outside_the_world_is_an_error():
    with pytest.raises(ValueError, match="rank=2"):
        Ranks(2, 2)
