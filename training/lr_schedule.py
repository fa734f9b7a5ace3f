"""The learning-rate schedule: linear warmup, then a cosine from `lr` down towards `min_lr`, as a torch LambdaLR.

It gives the values of ColossalAI's CosineAnnealingWarmupLR (colossalai/nn/lr_scheduler/cosine.py) under torch 2.5.1,
computed in closed form instead of through torch's CosineAnnealingLR, so that they do not depend on torch's version.
ColossalAI's WarmupScheduler (delayed.py) calls the inner CosineAnnealingLR.get_lr() outside its step(); where that
get_lr() reads `_is_initial` (torch 2.11) the cosine shifts by one step (an 8-step run peaks at 1.06 x lr).

For optimizer step s (1-based; LambdaLR's epoch is s - 1), W = warmup_steps, T = total_steps - W:
    s <= W:   lr * s / W                                                  WarmupScheduler.get_lr: (last_epoch+1)/W
    s >  W:   min_lr + (lr - min_lr) * (1 + cos(pi * (s - W - 1) / T)) / 2
The cosine starts at step W + 1 with lr itself (the inner scheduler's epoch 0 keeps the lr warmup reached), so the
first cosine step repeats lr, and the last step of a run, s = total_steps, stays one step above the floor min_lr.
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(epoch: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """lr multiplier at LambdaLR epoch `epoch` (optimizer step epoch + 1); floor = min_lr / lr."""
    step = epoch + 1
    if step <= warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps - 1) / (total_steps - warmup_steps)
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * progress)) / 2


class WarmupCosineLR(LambdaLR):
    """LambdaLR over warmup_cosine_factor. Its state_dict holds the epoch only (the factor is a closure, which
    LambdaLR does not save), so a resume takes this run's settings and the checkpoint's position."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int, min_lr: float):
        def factor_for(base_lr: float):
            floor = min_lr / base_lr if base_lr > 0 else 0.0  # min_lr is absolute in every group, as eta_min
            return lambda epoch: warmup_cosine_factor(epoch, warmup_steps, total_steps, floor)

        # The lr each group starts from: LambdaLR's base_lrs (initial_lr where a restart set it, else lr).
        super().__init__(optimizer, [factor_for(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups])

    def load_state_dict(self, state_dict: dict) -> None:
        """Also takes the state of ColossalAI's CosineAnnealingWarmupLR (checkpoints written before this module):
        its own last_epoch stops at warmup_epochs once the cosine starts, and the inner scheduler's counts on."""
        if "after_scheduler_dict" in state_dict:
            epoch = state_dict["last_epoch"]
            if state_dict.get("finished"):
                epoch = state_dict["warmup_epochs"] + state_dict["after_scheduler_dict"]["last_epoch"]
            self.last_epoch, self.base_lrs = epoch, list(state_dict["base_lrs"])
            self._last_lr = [base * fn(epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
            return
        super().load_state_dict(state_dict)
