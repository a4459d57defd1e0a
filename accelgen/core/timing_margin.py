"""The safety margin an SLO-guaranteed batch needs, learned from how far real iterations stray
from the cost model.

The time guard prices each batch with the profile and keeps it within ``SLO_min`` less a
margin. A fixed 5% is right only if the device never runs more than 5% slower than predicted;
on a real device (and in the simulator with timing noise) individual iterations do, and a
request with 20 tokens fails its SLO on a single late gap. So the margin follows the spread of
measured / predicted time over recent iterations: the configured margin, or the one that
``quantile`` of recent iterations would have needed, whichever is larger. The mean error is
corrected elsewhere (``Policy.time_correction``); this covers the scatter around it.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class AdaptiveMargin:
    def __init__(self, floor: float, quantile: float = 0.99, window: int = 512, every: int = 64,
                 ceiling: float = 0.5, min_samples: int = 32) -> None:
        if not 0 <= floor < 1 or not 0 < quantile < 1 or not floor <= ceiling < 1:
            raise ValueError("need 0 <= floor <= ceiling < 1 and 0 < quantile < 1")
        self.floor = floor
        self.quantile = quantile
        self.ceiling = ceiling
        self.min_samples = min_samples
        self.every = every
        self.margin = floor
        self._ratios: deque[float] = deque(maxlen=window)
        self._since = 0

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """One iteration's predicted (already corrected) and measured model time."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        self._ratios.append(measured_s / predicted_s)
        self._since += 1
        if self._since >= self.every and len(self._ratios) >= self.min_samples:
            self._since = 0
            q = float(np.quantile(np.fromiter(self._ratios, float), self.quantile))
            # A batch priced at (1 - m) x SLO lands within the SLO when the ratio is <= 1/(1 - m).
            needed = 1.0 - 1.0 / q if q > 1 else 0.0
            self.margin = min(self.ceiling, max(self.floor, needed))
