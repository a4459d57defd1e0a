"""Device profile: how long one iteration takes, as a function of what is in it.

The paper's budget needs three numbers from a profile: the pivot forward size ``S_pf`` (the
smallest forward size at which the device is saturated), ``T_pf = T(S_pf)``, and the time of
larger forwards. We keep a cost model rich enough to predict the exact batch, because an SLO
guarantee that ignores attention over long contexts is not a guarantee:

    T(batch) = base + per_token * S_f                        (fully connected layers, launch)
             + attn * sum over prefill chunks of q * (q + 2k) (causal attention of a chunk of q
                                                              tokens over k earlier ones; a
                                                              whole prompt of l gives l^2)
             + decode_ctx * sum over decodes of context length (KV reads)

The linear part may instead come from a measured table (``measured_forward_ms``), which is
what ``accelgen profile`` writes for a real worker.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


@dataclass(frozen=True, slots=True)
class CostCoefficients:
    """Coefficients of the cost model, all in milliseconds."""

    base_ms: float
    per_token_ms: float
    attn_ms: float = 0.0
    decode_ctx_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("base_ms", "per_token_ms", "attn_ms", "decode_ctx_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost coefficient {name} must be >= 0")


@dataclass(frozen=True)
class DeviceProfile:
    """A model on a device: iteration-time model, KV capacity, and the derived pivot point."""

    name: str
    coefficients: CostCoefficients
    kv_capacity_tokens: int
    block_size: int = 128
    max_model_len: int = 2048
    knee_fraction: float = 0.95
    knee_search_max_tokens: int = 8192
    measured_forward_ms: tuple[tuple[int, float], ...] = ()
    source: str = ""
    s_pf: int = field(init=False)
    t_pf_s: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kv_capacity_tokens < self.block_size:
            raise ValueError("kv_capacity_tokens must hold at least one block")
        if not 0 < self.knee_fraction <= 1:
            raise ValueError("knee_fraction must be in (0, 1]")
        points = tuple(sorted((int(s), float(ms)) for s, ms in self.measured_forward_ms))
        if any(s < 1 or ms <= 0 for s, ms in points):
            raise ValueError("measured_forward_ms needs positive sizes and times")
        object.__setattr__(self, "measured_forward_ms", points)
        s_pf = self._find_knee()
        object.__setattr__(self, "s_pf", s_pf)
        object.__setattr__(self, "t_pf_s", self.forward_time_s(s_pf))

    # -- the cost model ----------------------------------------------------------------------
    def linear_ms(self, num_tokens: int) -> float:
        """Time of the token-proportional part for ``num_tokens`` forward tokens."""
        pts = self.measured_forward_ms
        if not pts:
            c = self.coefficients
            return c.base_ms + c.per_token_ms * num_tokens
        sizes = [s for s, _ in pts]
        i = bisect.bisect_left(sizes, num_tokens)
        if i < len(pts) and sizes[i] == num_tokens:
            return pts[i][1]
        if len(pts) == 1:
            return pts[0][1] * max(1.0, num_tokens / pts[0][0])
        # Interpolate inside the table, extrapolate linearly from its two nearest points.
        lo, hi = (i - 1, i) if 0 < i < len(pts) else ((0, 1) if i == 0 else (len(pts) - 2, len(pts) - 1))
        (s0, t0), (s1, t1) = pts[lo], pts[hi]
        return max(1e-6, t0 + (t1 - t0) * (num_tokens - s0) / (s1 - s0))

    def forward_time_s(self, num_tokens: int) -> float:
        """``T(S_f)``: one prompt chunk of ``num_tokens`` tokens with no earlier context."""
        return (self.linear_ms(num_tokens) + self.coefficients.attn_ms * num_tokens * num_tokens) / 1000.0

    def batch_cost(self) -> "BatchCost":
        return BatchCost(self)

    def batch_time_s(self, chunks: Iterable[tuple[int, int]]) -> float:
        """Time of a batch given ``(new_tokens, already_computed_tokens)`` per request."""
        cost = BatchCost(self)
        for q, k in chunks:
            cost.add(q, k)
        return cost.time_s()

    def max_tokens_within(self, time_s: float) -> int:
        """Largest forward size whose ``T(S_f)`` is at most ``time_s`` (0 if even one token is slower)."""
        if self.forward_time_s(1) > time_s:
            return 0
        lo, hi = 1, 1
        while self.forward_time_s(hi) <= time_s and hi < (1 << 22):
            lo, hi = hi, hi * 2
        while lo + 1 < hi:  # T is increasing in S_f: binary search for the last fit
            mid = (lo + hi) // 2
            if self.forward_time_s(mid) <= time_s:
                lo = mid
            else:
                hi = mid
        return lo

    def _find_knee(self, knee_fraction: float | None = None) -> int:
        """``S_pf``: the smallest forward size reaching ``knee_fraction`` of the peak tokens/s.

        Scanned on a 16-token grid up to ``knee_search_max_tokens``: beyond the knee extra
        tokens cost proportionally more time, below it they are nearly free.
        """
        fraction = self.knee_fraction if knee_fraction is None else knee_fraction
        grid = [1] + list(range(16, self.knee_search_max_tokens + 1, 16))
        rates = [s / self.forward_time_s(s) for s in grid]
        peak = max(rates)
        for s, r in zip(grid, rates):
            if r >= fraction * peak:
                return s
        return grid[-1]  # unreachable: the peak itself qualifies

    def pivot(self, knee_fraction: float | None = None) -> tuple[int, float]:
        """``(S_pf, T_pf)`` under another knee criterion than the profile's own (for policies
        that make the criterion a setting, and for its ablation)."""
        if knee_fraction is None or knee_fraction == self.knee_fraction:
            return self.s_pf, self.t_pf_s
        if not 0 < knee_fraction <= 1:
            raise ValueError("knee_fraction must be in (0, 1]")
        s_pf = self._find_knee(knee_fraction)
        return s_pf, self.forward_time_s(s_pf)

    # -- derived capacities ------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Blocks in the pool, counting vLLM's reserved null block."""
        return self.kv_capacity_tokens // self.block_size + 1

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        c = self.coefficients
        return {
            "name": self.name,
            "source": self.source,
            "block_size": self.block_size,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_model_len": self.max_model_len,
            "knee_fraction": self.knee_fraction,
            "knee_search_max_tokens": self.knee_search_max_tokens,
            "coefficients": {
                "base_ms": c.base_ms,
                "per_token_ms": c.per_token_ms,
                "attn_ms": c.attn_ms,
                "decode_ctx_ms": c.decode_ctx_ms,
            },
            "measured_forward_ms": [list(p) for p in self.measured_forward_ms],
            # Informational: recomputed on load, kept so a reader sees them without running code.
            "derived": {"s_pf": self.s_pf, "t_pf_ms": round(self.t_pf_s * 1000.0, 4)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeviceProfile":
        try:
            coeffs = CostCoefficients(**data["coefficients"])
            return cls(
                name=str(data["name"]),
                coefficients=coeffs,
                kv_capacity_tokens=int(data["kv_capacity_tokens"]),
                block_size=int(data.get("block_size", 128)),
                max_model_len=int(data.get("max_model_len", 2048)),
                knee_fraction=float(data.get("knee_fraction", 0.95)),
                knee_search_max_tokens=int(data.get("knee_search_max_tokens", 8192)),
                measured_forward_ms=tuple(tuple(p) for p in data.get("measured_forward_ms", ())),  # type: ignore[misc]
                source=str(data.get("source", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed device profile: {exc}") from exc

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "DeviceProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))


class BatchCost:
    """Running sums of the cost model, so a policy can price a batch as it builds it.

    Priced once per candidate request per iteration, so the common case (a fitted linear
    model, no measured table) is computed inline rather than through ``linear_ms``.
    """

    __slots__ = ("profile", "tokens", "attn_units", "decode_ctx", "_attn_ms", "_ctx_ms", "_base_ms",
                 "_per_token_ms", "_linear")

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile
        self.tokens = 0
        self.attn_units = 0
        self.decode_ctx = 0
        c = profile.coefficients
        self._attn_ms = c.attn_ms
        self._ctx_ms = c.decode_ctx_ms
        self._base_ms = c.base_ms
        self._per_token_ms = c.per_token_ms
        self._linear = not profile.measured_forward_ms

    @staticmethod
    def _split(q: int, k: int) -> tuple[int, int]:
        """(attention units, decode context) that a chunk of q new tokens over k computed adds."""
        if q == 1 and k > 0:
            return 0, k + 1
        return q * (q + 2 * k), 0

    def add(self, q: int, k: int) -> None:
        a, d = self._split(q, k)
        self.tokens += q
        self.attn_units += a
        self.decode_ctx += d

    def add_decode(self, k: int) -> None:
        """``add(1, k)`` for a decode over k > 0 computed tokens, without the case analysis."""
        self.tokens += 1
        self.decode_ctx += k + 1

    def remove(self, q: int, k: int) -> None:
        """Undo ``add(q, k)`` (a request taken back out of the batch by preemption)."""
        a, d = self._split(q, k)
        self.tokens -= q
        self.attn_units -= a
        self.decode_ctx -= d

    def _ms(self, tokens: int, attn_units: int, decode_ctx: int) -> float:
        linear = self._base_ms + self._per_token_ms * tokens if self._linear else self.profile.linear_ms(tokens)
        return linear + self._attn_ms * attn_units + self._ctx_ms * decode_ctx

    def time_s(self) -> float:
        if self.tokens == 0:
            return 0.0
        return self._ms(self.tokens, self.attn_units, self.decode_ctx) / 1000.0

    def time_if_added_s(self, q: int, k: int) -> float:
        if q == 1 and k > 0:
            return self._ms(self.tokens + 1, self.attn_units, self.decode_ctx + k + 1) / 1000.0
        return self._ms(self.tokens + q, self.attn_units + q * (q + 2 * k), self.decode_ctx) / 1000.0

    def max_chunk_within(self, k: int, limit_tokens: int, time_s: float) -> int:
        """Largest prefill chunk (<= limit_tokens) over k computed tokens keeping the batch within ``time_s``."""
        if limit_tokens <= 0 or self.time_if_added_s(1, k) > time_s:
            return 0
        if self.time_if_added_s(limit_tokens, k) <= time_s:
            return limit_tokens
        lo, hi = 1, limit_tokens
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if self.time_if_added_s(mid, k) <= time_s:
                lo = mid
            else:
                hi = mid
        return lo

