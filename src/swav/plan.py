"""The step plan of a run: how many steps, the learning rate of each, how long prototypes stay
frozen, and fitting all of it to a time budget once the speed of a step is known."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from swav.config import Config
from swav.optim import cosine_schedule

__all__ = ["StepPlan", "CALIBRATION_STEPS", "CALIBRATION_FRACTION"]

CALIBRATION_STEPS = 8  # steps timed (after 2 warm-up steps) before a time budget is first fitted
# ... and the fraction of those first-fitted steps over which the speed is timed again for the final
# fit: 8 steps (under a second) misjudged a 10-minute budget by up to 25 % between seeds.
CALIBRATION_FRACTION = 0.05


@dataclass
class StepPlan:
    """Steps of a run. ``total_steps`` may end inside an epoch (a time budget cuts the last one
    short); ``epochs`` counts that cut-short epoch."""

    cfg: Config
    steps_per_epoch: int
    total_steps: int
    budget_fitted: bool
    schedule: np.ndarray = field(init=False, repr=False)
    freeze_steps: int = field(init=False)

    def __post_init__(self):
        self._derive()

    @classmethod
    def start(cls, cfg: Config, steps_per_epoch: int) -> "StepPlan":
        """A new run: ``train.epochs`` whole epochs, to be fitted when there is a time budget."""
        return cls(cfg, steps_per_epoch, cfg.train.epochs * steps_per_epoch,
                   budget_fitted=cfg.train.time_budget_minutes <= 0)

    @property
    def epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)  # the last one may be cut short

    def lr(self, step: int) -> float:
        return float(self.schedule[step])

    def freezes_prototypes(self, step: int) -> bool:
        return step < self.freeze_steps

    def steps_for_budget(self, seconds_per_step: float) -> int:
        """Optimisation steps that fit ``train.time_budget_minutes`` at the measured speed: at least
        one whole epoch, at most ``train.epochs``; the last epoch may be cut short, so a recipe whose
        epoch takes a third of the budget still trains for the whole budget (not two thirds of it)."""
        budget = self.cfg.train.time_budget_minutes * 60.0
        fitted = int(budget // max(seconds_per_step, 1e-9))
        spe = self.steps_per_epoch
        return max(spe, min(self.cfg.train.epochs * spe, fitted))

    def fit(self, seconds_per_step: float, agree: Callable[[int], int] = lambda n: n, final: bool = True) -> None:
        """Fit the plan to the time budget; ``agree`` makes every rank take rank 0's count. A first,
        provisional fit (``final=False``) leaves ``budget_fitted`` False: the speed is timed again over
        ``refit_window()`` steps and fitted for good."""
        self.total_steps = agree(self.steps_for_budget(seconds_per_step))
        self.budget_fitted = final
        self._derive()

    def refit_window(self) -> int:
        """Timed steps for the final fit: ``CALIBRATION_FRACTION`` of the provisionally fitted run
        (30 s of a 10-minute budget), at least ``CALIBRATION_STEPS + 1``."""
        return max(CALIBRATION_STEPS + 1, int(np.ceil(CALIBRATION_FRACTION * self.total_steps)))

    # ---- derived -----------------------------------------------------------------------
    def _stretch(self) -> float:
        """Fraction of the configured length that is trained: 1 without a time budget. When a budget
        fits fewer steps, warmup and prototype freezing shrink in proportion (the recipe's shape is
        kept; a 1-epoch warmup in a 2-epoch run would leave no time to learn)."""
        return min(1.0, self.total_steps / (self.cfg.train.epochs * self.steps_per_epoch))

    def _derive(self) -> None:
        o, spe = self.cfg.optim, self.steps_per_epoch
        epochs = self.total_steps / spe  # fractional when a budget cuts the last epoch short
        warmup = min(o.warmup_epochs * self._stretch(), epochs)
        self.schedule = cosine_schedule(o.lr, o.final_lr, epochs, spe, warmup, o.start_warmup)
        self.freeze_steps = int(round(self.cfg.swav.freeze_prototypes_epochs * self._stretch() * spe))
