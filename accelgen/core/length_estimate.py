"""Online output-length estimates: what the oracle knows, learned from finished requests.

The oracle policy knows every output length and uses it for the KV reserve, for ``T_e`` and to
avoid preempting a request about to finish. A real scheduler cannot know it (the paper's first
open question), but it can learn the distribution per application class from the requests that
finished, refined by a coarse prompt-length bin (a document to summarise and a chat question of
the same class answer at different lengths). The estimate for a request that has already
produced ``g`` tokens is the mean length of the finished requests that ran longer than ``g``: a
request still running past the typical length is expected to run on, not to stop next token.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

PROMPT_BINS: tuple[int, ...] = (128, 512, 1024)
"""Upper bounds of the prompt-length bins (the last bin is open)."""


@dataclass(frozen=True, slots=True)
class LengthEstimateConfig:
    window: int = 512
    """Most recent finished requests remembered per (class, bin)."""
    min_samples: int = 16
    """Below this many samples a bin falls back to its class, and a class to ``prior_tokens``."""
    prior_tokens: int = 128
    """Expected output length before anything has finished."""
    bucket_tokens: int = 8
    """Generated-length granularity of the cache (the estimate changes slowly with it)."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_samples < 1 or self.prior_tokens < 1 or self.bucket_tokens < 1:
            raise ValueError("length-estimate settings must all be >= 1")


class _Samples:
    """A bounded window of lengths with the sorted view and suffix sums built on demand."""

    __slots__ = ("window", "_sorted", "_suffix")

    def __init__(self, size: int) -> None:
        self.window: deque[int] = deque(maxlen=size)
        self._sorted: list[int] | None = None
        self._suffix: list[int] = []

    def add(self, length: int) -> None:
        self.window.append(length)
        self._sorted = None

    def mean_above(self, generated: int) -> float | None:
        """Mean of the lengths greater than ``generated`` (None if none is)."""
        if self._sorted is None:
            self._sorted = sorted(self.window)
            suffix = [0] * (len(self._sorted) + 1)
            for i in range(len(self._sorted) - 1, -1, -1):
                suffix[i] = suffix[i + 1] + self._sorted[i]
            self._suffix = suffix
        i = bisect.bisect_right(self._sorted, generated)
        n = len(self._sorted) - i
        return self._suffix[i] / n if n else None


class OutputLengthEstimator:
    """Expected final output length of a request, from finished requests of its class."""

    def __init__(self, config: LengthEstimateConfig | None = None) -> None:
        self.config = config or LengthEstimateConfig()
        self._by_bin: dict[tuple[str, int], _Samples] = {}
        self._by_class: dict[str, _Samples] = {}
        self._cache: dict[tuple[str, int, int], int] = {}

    @staticmethod
    def prompt_bin(prompt_len: int) -> int:
        return bisect.bisect_left(PROMPT_BINS, prompt_len)

    def observe(self, app_class: str, prompt_len: int, output_len: int) -> None:
        size = self.config.window
        key = (app_class, self.prompt_bin(prompt_len))
        self._by_bin.setdefault(key, _Samples(size)).add(output_len)
        self._by_class.setdefault(app_class, _Samples(size)).add(output_len)
        self._cache.clear()

    def expected_output(self, app_class: str, prompt_len: int, generated: int) -> int:
        """Expected final number of output tokens (always more than ``generated``)."""
        bucket = generated // self.config.bucket_tokens
        pbin = self.prompt_bin(prompt_len)
        key = (app_class, pbin, bucket)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._estimate(app_class, pbin, bucket * self.config.bucket_tokens)
            self._cache[key] = cached
        return max(cached, generated + 1)

    def _estimate(self, app_class: str, pbin: int, generated: int) -> int:
        cfg = self.config
        for samples in (self._by_bin.get((app_class, pbin)), self._by_class.get(app_class)):
            if samples is not None and len(samples.window) >= cfg.min_samples:
                mean = samples.mean_above(generated)
                # Past every length seen: expect it to go on as long again as the bucket step.
                return int(round(mean)) if mean is not None else generated + cfg.bucket_tokens
        return max(cfg.prior_tokens, generated + 1)
