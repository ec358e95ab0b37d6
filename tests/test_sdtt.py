"""SDTT maths: the teacher's k-step target against exact enumeration, and the divergences by hand."""

import itertools
import math

import pytest
import torch

from lightning_ddd.diffusion import LogLinearSchedule, MaskedProcess, UniformProcess
from lightning_ddd.diffusion.sdtt import divergence_loss, draw_times, teacher_targets

V, D = 2, 3
MASK = V


class TableTeacher:
    """log p(x | z) looked up per whole state z, so a target depends on which step unmasked a position."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(2.0 * torch.randn((V + 1) ** D, D, V, generator=g, dtype=torch.float64), -1)

    def state(self, z: torch.Tensor) -> torch.Tensor:
        return (z * (V + 1) ** torch.arange(D - 1, -1, -1)).sum(-1)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        process = MaskedProcess(V)
        return process.x0_log_probs(self.table[self.state(z)].float(), z)


def expected_target(teacher: TableTeacher, process: MaskedProcess, z_t, t: float, dt: float, k: int) -> torch.Tensor:
    """E[target] (D, V) by enumerating every unmasking outcome of the k teacher steps, in float64."""
    alpha = lambda u: float(process.schedule.alpha(torch.tensor(u, dtype=torch.float64)))  # noqa: E731
    out = torch.zeros(D, V, dtype=torch.float64)

    def walk(z: tuple, time: float, steps_left: int, pending: tuple, target: torch.Tensor, prob: float) -> None:
        nonlocal out
        if steps_left == 0:
            out += prob * target
            return
        z_tensor = torch.tensor([z])
        pred = teacher.table[teacher.state(z_tensor)][0]  # (D, V) log-probs at the masked positions
        target = target.clone()
        for d in pending:
            target[d] = pred[d]
        s = max(time - dt, 0.0)
        p_unmask = min(max((alpha(s) - alpha(time)) / (1.0 - alpha(time)), 0.0), 1.0)
        # Each pending position: stays masked, or unmasks to token v with p_unmask * p(v | z).
        choices = [[None] + list(range(V)) for _ in pending]
        for outcome in itertools.product(*choices):
            p, new_z, still = prob, list(z), []
            for d, v in zip(pending, outcome):
                if v is None:
                    p *= 1.0 - p_unmask
                    still.append(d)
                else:
                    p *= p_unmask * math.exp(float(pred[d, v]))
                    new_z[d] = v
            if p > 0:
                walk(tuple(new_z), s, steps_left - 1, tuple(still), target, p)

    pending = tuple(d for d in range(D) if z_t[d] == MASK)
    walk(tuple(z_t), t, k, pending, torch.zeros(D, V, dtype=torch.float64), 1.0)
    return out


@pytest.mark.parametrize("t, dt, k", [(0.9, 0.3, 3), (0.5, 0.2, 2), (0.25, 0.2, 2)])
def test_target_matches_enumeration(t, dt, k):
    process, teacher = MaskedProcess(V, LogLinearSchedule()), TableTeacher()
    z_t = [MASK, 1, MASK]  # two masked positions and one visible
    exact = expected_target(teacher, process, z_t, t, dt, k)
    N = 40_000
    z = torch.tensor([z_t]).expand(N, D).clone()
    target = teacher_targets(teacher, process, z, torch.full((N,), t), dt, k, torch.Generator().manual_seed(0))
    estimate = target.double().mean(0)  # (D, V)
    spread = target.double().std(0) / math.sqrt(N)
    masked = torch.tensor([d for d in range(D) if z_t[d] == MASK])
    assert torch.all((estimate[masked] - exact[masked]).abs() <= 5 * spread[masked] + 1e-9)
    # The enumeration is not trivial: the target differs from the prediction at z_t.
    direct = teacher.table[teacher.state(torch.tensor([z_t]))][0]
    assert (exact[masked] - direct[masked]).abs().max() > 0.05


def test_a_step_reaching_zero_unmasks_everything_with_the_first_prediction():
    process, teacher = MaskedProcess(V), TableTeacher(1)
    z = torch.tensor([[MASK, MASK, 0], [MASK, 1, MASK]])
    target = teacher_targets(teacher, process, z, torch.tensor([0.1, 0.05]), dt=0.25, num_steps=2)
    first = teacher(z, torch.tensor([0.1, 0.05]))
    torch.testing.assert_close(target[z == MASK], first[z == MASK])


def test_teacher_targets_refuses_other_processes_and_bad_steps():
    with pytest.raises(ValueError, match="masked diffusion"):
        teacher_targets(TableTeacher(), UniformProcess(V), torch.zeros(1, D, dtype=torch.long), torch.ones(1), 0.1)
    with pytest.raises(ValueError, match="num_steps"):
        teacher_targets(TableTeacher(), MaskedProcess(V), torch.zeros(1, D, dtype=torch.long), torch.ones(1), 0.0)


def test_divergences_by_hand():
    # One sequence, two positions; position 1 is visible (carried: 0 / -inf) and excluded.
    log_s = torch.log(torch.tensor([[[0.7, 0.3], [1.0, 0.0]]]))
    log_t = torch.log(torch.tensor([[[0.4, 0.6], [1.0, 0.0]]]))
    positions = torch.tensor([[True, False]])
    reverse = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    forward = 0.4 * math.log(0.4 / 0.7) + 0.6 * math.log(0.6 / 0.3)
    mse = math.log(0.7 / 0.4) ** 2 + math.log(0.3 / 0.6) ** 2
    tv = 0.5 * (0.3 + 0.3)
    for name, expected in [("kl_reverse", reverse), ("kl_forward", forward), ("mse", mse), ("tv", tv)]:
        got = divergence_loss(log_s, log_t, positions, name)
        assert got.shape == (1,)
        assert got.item() == pytest.approx(expected, rel=1e-6), name
    with pytest.raises(ValueError, match="divergence"):
        divergence_loss(log_s, log_t, positions, "js")


def test_reverse_kl_gradient_is_finite_and_zero_at_the_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g, requires_grad=True)
    target = torch.log_softmax(torch.randn(2, 4, 5, generator=g), -1)
    positions = torch.tensor([[True, False, True, True], [False, False, True, False]])
    loss = divergence_loss(torch.log_softmax(logits, -1), target, positions).sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[~positions].abs().max() == 0
    # At the fixed point (student logits = target) the loss and its gradient w.r.t. the logits vanish.
    at_target = target.clone().requires_grad_(True)
    loss = divergence_loss(torch.log_softmax(at_target, -1), target, positions).sum()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert at_target.grad.abs().max() < 1e-6


def test_one_step_target_is_the_teacher_itself():
    """With k = 1 every masked position takes the teacher's prediction at z_t: a student equal to the teacher
    has zero loss, whatever the draws."""
    process, teacher = MaskedProcess(V), TableTeacher(2)
    z = torch.tensor([[MASK, MASK, MASK], [0, MASK, 1]])
    t = torch.tensor([0.8, 0.4])
    target = teacher_targets(teacher, process, z, t, dt=0.1, num_steps=1, generator=torch.Generator().manual_seed(3))
    loss = divergence_loss(teacher(z, t), target, z == MASK)
    torch.testing.assert_close(loss, torch.zeros(2))


def test_draw_times_are_stratified_in_the_unit_interval():
    t = draw_times(8, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and (t > 0).all() and (t <= 1).all()
    assert sorted((t * 8).ceil().long().tolist()) == list(range(1, 9))  # one draw per stratum
