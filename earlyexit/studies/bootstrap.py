"""Bootstrap confidence intervals over items (questions, statements)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def bootstrap_ci(values, statistic: Callable[[np.ndarray], float] = np.mean, *, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap CI of ``statistic`` over the first axis of ``values`` (items resampled)."""
    arr = np.asarray(values, dtype=float)
    if arr.shape[0] == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    stats = np.array([statistic(arr[i]) for i in idx])
    a = (1 - level) / 2
    return Interval(float(statistic(arr)), float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a)))
