"""training/lr_schedule.py: the repo's warmup + cosine schedule gives ColossalAI's CosineAnnealingWarmupLR values under
the pinned torch (2.5.1) at every step of whole schedules, and resumes from either scheduler's saved state."""
import json
import math
import warnings

import pytest
import torch

from training.engine import import_colossalai
from training.lr_schedule import WarmupCosineLR, warmup_cosine_factor


def lrs(make, lr, steps):
    """The lr of each optimizer step under the scheduler make(optimizer), as training.engine steps it, and the
    scheduler after them."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make(optimizer)
    out = []
    with warnings.catch_warnings():  # ColossalAI's get_lr outside step() warns on every step
        warnings.simplefilter("ignore")
        for step in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return out, scheduler


def colossalai_schedule(total, warmup, min_lr):
    cai = import_colossalai()
    return lambda opt: cai.CosineAnnealingWarmupLR(opt, total_steps=total, warmup_steps=warmup, eta_min=min_lr)


def ours(total, warmup, min_lr):
    return lambda opt: WarmupCosineLR(opt, total_steps=total, warmup_steps=warmup, min_lr=min_lr)


# (total, warmup, lr, min_lr, largest relative difference): ColossalAI's cosine is torch's recursive form
# (each lr from the last), which gathers about one rounding per step; ours is the closed form. Short schedules
# agree to the last bit or one ulp; the recipe's 100,000 steps drift to ~3e-12.
CASES = [(8, 2, 5e-4, 5e-5, 4e-16), (10, 0, 1e-3, 0.0, 4e-16), (7, 3, 2e-3, 2e-4, 4e-16),
         (100_000, 2_000, 3e-5, 3e-6, 1e-11)]


@pytest.mark.parametrize("total, warmup, lr, min_lr, rtol", CASES)
def test_values_equal_colossalai_cosine_annealing_warmup_at_every_step(total, warmup, lr, min_lr, rtol):
    theirs, _ = lrs(colossalai_schedule(total, warmup, min_lr), lr, total)
    mine, _ = lrs(ours(total, warmup, min_lr), lr, total)
    worst = max(abs(a - b) / a for a, b in zip(theirs, mine) if a)
    assert worst <= rtol, worst
    # Warmup reaches lr at step W, the cosine repeats it at W + 1 and ends one step above the floor.
    assert mine[warmup] == lr and (warmup == 0 or mine[warmup - 1] == lr) and min_lr < mine[-1] < mine[-2]


def test_the_formula_by_hand():
    # 8 steps, 2 of warmup: lr/2, lr, lr, then the cosine over T = 6 at t = 1..5
    got = [warmup_cosine_factor(epoch, 2, 8, 0.1) for epoch in range(8)]
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(1, 6)]
    assert got == [0.5, 1.0, 1.0, *cosine]


@pytest.mark.parametrize("epoch", [1, 2, 3, 6])  # during warmup, the step it ends, on the cosine
def test_resume_from_either_schedulers_state_continues_the_same_values(epoch):
    total, warmup, lr, min_lr = 10, 3, 1e-3, 1e-4
    straight, _ = lrs(ours(total, warmup, min_lr), lr, total)
    for make in (colossalai_schedule(total, warmup, min_lr), ours(total, warmup, min_lr)):
        _, saved = lrs(make, lr, epoch)
        state = json.loads(json.dumps(saved.state_dict()))  # as checkpoint.py writes scheduler.json
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        resumed = WarmupCosineLR(optimizer, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
        resumed.load_state_dict(state)
        optimizer.param_groups[0]["lr"] = resumed.get_last_lr()[0]  # as checkpoint._load_checkpoint
        after = []
        for _ in range(total - epoch):
            after.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            resumed.step()
        assert after == pytest.approx(straight[epoch:], rel=1e-15), type(saved).__name__


@pytest.mark.parametrize("total, warmup", [(4, 1), (20_000, 2_000), (100_000, 2_000)])
def test_the_last_step_stays_one_cosine_step_above_min_lr(total, warmup):
    # What the docs say: the floor would be reached one step after max_steps; the last step trains at
    # min_lr + (lr - min_lr) (1 - cos(pi / T)) / 2, T = max_steps - warmup_steps.
    lr, min_lr = 3e-5, 3e-6
    last, _ = lrs(ours(total, warmup, min_lr), lr, total)
    cosine_steps = total - warmup
    assert math.isclose(last[-1], min_lr + (lr - min_lr) * (1 - math.cos(math.pi / cosine_steps)) / 2, rel_tol=1e-9)
    assert last[-1] > min_lr
    if total == 100_000:  # the recipe's stage 1: the floor to 3e-9 of it
        assert (last[-1] - min_lr) / min_lr < 3e-9
