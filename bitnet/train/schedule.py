"""Learning-rate and weight-decay schedules, pure functions of the step.

"two-stage" is the BitNet recipe of Microsoft's training FAQ: linear warm-up, linear decay, and at
the midpoint the LR drops to a lower peak and decays linearly to the end; weight decay is on for
the first stage and off (0) for the second. "cosine" (warm-up, cosine decay) is the conventional
schedule of the bf16 twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("two-stage", "cosine", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    kind: str
    lr: float  # peak
    total: int  # steps
    warmup: int
    min_lr_ratio: float = 0.1  # LR at the last step, as a fraction of the peak
    stage2_ratio: float = 0.4  # two-stage: peak of the second stage, as a fraction of the first
    weight_decay: float = 0.1
    weight_decay_stage2: float = 0.0  # two-stage: weight decay of the second stage

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.total < 1 or not 0 <= self.warmup <= self.total:
            raise ValueError(f"need 0 <= warmup ({self.warmup}) <= total steps ({self.total}) and total >= 1")

    @property
    def midpoint(self) -> int:
        return self.total // 2

    def lr_at(self, step: int) -> float:
        """LR for the update made at `step` (0-based)."""
        peak, end = self.lr, self.lr * self.min_lr_ratio
        if step < self.warmup:
            return peak * (step + 1) / self.warmup
        if self.kind == "constant":
            return peak
        if self.kind == "two-stage":
            mid = self.midpoint
            if step < mid:  # stage 1: from the peak down the straight line to `end`
                frac = (step - self.warmup) / max(1, self.total - self.warmup)
                return peak + (end - peak) * frac
            low = peak * self.stage2_ratio  # stage 2: drop to the lower peak, then linear to `end`
            frac = (step - mid) / max(1, self.total - 1 - mid)
            return low + (end - low) * frac
        frac = (step - self.warmup) / max(1, self.total - 1 - self.warmup)
        if self.kind == "linear":
            return peak + (end - peak) * frac
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))  # cosine

    def wd_at(self, step: int) -> float:
        if self.kind == "two-stage" and step >= self.midpoint:
            return self.weight_decay_stage2
        return self.weight_decay
