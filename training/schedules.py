"""The schedules of a training run: the learning rate and the progressive Top-K.

Both count optimizer steps. The progressive Top-K shrinks each query's budget from every
region it sees (dense) to the configured one over ``top_k_schedule.warmup_steps``, starting
either at step 0 (``start: step``, the paper's schedule) or once the model shows that it
attends (``start: loss``): the first step at which the training loss, averaged over the
ranks and the last ``loss_window`` steps, is at most ``start_loss``. The loss is a signal
every dataset has (no boxes, no labels beyond the answers), and a model whose loss is still
on its plateau has not learned where to look: routing it to a few regions then would only
pick regions at random.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from training.config import FinetuneConfig, TopKSchedule


def lr_lambda(cfg: FinetuneConfig):
    """LR scale per optimizer step (DeepSpeed steps the scheduler once per optimizer step):
    linear warm-up over ``optim.warmup_steps``, then constant or cosine down to 0.1x at
    ``train.max_steps``."""
    warm, total = cfg.optim.warmup_steps, max(cfg.train.max_steps, 1)

    def scale(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return scale


@dataclass(kw_only=True)
class TopKClock:
    """Where the progressive Top-K is: ``started_at`` is the step its warm-up began (None:
    still dense, waiting for the loss)."""

    settings: TopKSchedule
    started_at: int | None = None
    _losses: deque = field(default_factory=deque)

    @classmethod
    def start(cls, settings: TopKSchedule, started_at: int | None = None) -> TopKClock:
        """A clock for a run; ``started_at`` is a resumed run's (None: a new run's default)."""
        if started_at is None and settings.start == "step":
            started_at = 0
        return cls(settings=settings, started_at=started_at)

    def progress(self, step: int) -> float:
        """0 (dense) to 1 (the target budget) at optimizer step ``step``."""
        from gazeattn.ops import schedule_progress

        if self.started_at is None:
            return 0.0
        s = self.settings
        return schedule_progress(step - self.started_at, warmup_steps=s.warmup_steps, kind=s.kind)

    def observe(self, step: int, loss: float) -> bool:
        """The mean loss over the ranks after optimizer step ``step``; True when this step
        starts the warm-up."""
        if self.started_at is not None:
            return False
        self._losses.append(loss)
        while len(self._losses) > self.settings.loss_window:
            self._losses.popleft()
        full = len(self._losses) == self.settings.loss_window
        if full and sum(self._losses) / len(self._losses) <= self.settings.start_loss:
            self.started_at = step
            return True
        return False


def apply_top_k(cfg: FinetuneConfig, model, progress: float):
    """Set the budget for this ``progress`` of the progressive Top-K; returns it (a
    Progressive Top-K, the keep ratio, or None when nothing is routed)."""
    from gazeattn.model import set_gaze_budget, set_gaze_top_k
    from gazeattn.ops import Progressive, keep_ratio_at

    target = cfg.model.gaze_config()
    if cfg.model.attn == "dense":
        return None
    if target.keep_ratio is not None:
        ratio = keep_ratio_at(progress, target.keep_ratio)
        set_gaze_budget(model, keep_ratio=ratio)
        return ratio
    if target.top_k == "all":
        return None
    budget = Progressive(target.top_k, progress)
    set_gaze_top_k(model, budget)
    return budget


def budget_metric(budget, batch: dict) -> float | None:
    """The logged budget: a keep ratio as is; a progressive Top-K as the regions kept by the
    batch's query that sees the most."""
    from gazeattn.ops import GazeConfig, Progressive, budgets

    if not isinstance(budget, Progressive):
        return budget
    most = batch["gaze_layout"].regions.count.max().reshape(1)
    return float(budgets(GazeConfig(top_k=budget.target), most, budget)[0])
