"""MetricsCollector on hand-made events: on-time flags, goodput in 1 s windows, attainment with
a TBT tolerance, request goodput, refusals, per-class latency percentiles, JCT, percentiles and
duration-weighted utilisation."""

from __future__ import annotations

import numpy as np
import pytest

from accelgen.core.metrics import IterationSample, MetricsCollector, RequestRecord
from accelgen.core.slo import SLO

pytestmark = pytest.mark.unit

CHAT = SLO(ttft_s=1.0, tbt_s=0.1)
STRICT_TTFT = SLO(ttft_s=0.2, tbt_s=0.1)


def rec(slo: SLO, arrival: float, times: list[float], finish: float | None = None, reason: str = "stop") -> RequestRecord:
    r = RequestRecord("x", "c", slo, arrival, 10)
    r.token_times = list(times)
    r.finish_s = finish
    r.finish_reason = reason if finish is not None else None
    return r


# -- on-time flags and attainment --------------------------------------------------------------


@pytest.mark.unit
def test_on_time_flags_ttft_then_tbt() -> None:
    # TTFT 0.5 <= 1.0; gaps 0.05, 0.25, 0.05 against TBT 0.1.
    r = rec(CHAT, 0.0, [0.5, 0.55, 0.8, 0.85], finish=0.85)
    assert r.on_time_flags() == [True, True, False, True]
    # First token 0.5 s after arrival misses a 0.2 s TTFT: the stream started late, so none of
    # its tokens is on time for goodput, although each later gap alone meets the TBT.
    r = rec(STRICT_TTFT, 1.0, [1.5, 1.55, 1.6], finish=1.6)
    assert r.own_bound_flags() == [False, True, True]
    assert r.on_time_flags() == [False, False, False]
    assert rec(CHAT, 0.0, []).on_time_flags() == []
    # Exactly on the bound counts as on time (TTFT 1.0 after arrival 0.0).
    assert rec(CHAT, 0.0, [1.0]).on_time_flags() == [True]


@pytest.mark.unit
def test_on_time_flags_jct() -> None:
    jct = SLO(jct_s=2.0)
    assert rec(jct, 0.0, [0.3, 0.6, 1.9], finish=1.9).on_time_flags() == [True] * 3
    assert rec(jct, 0.5, [0.7, 2.6], finish=2.6).on_time_flags() == [False, False]  # 2.1 s > 2 s
    assert rec(jct, 0.0, [0.3], finish=None).on_time_flags() == [False]  # not finished: not yet on time


@pytest.mark.unit
def test_attainment_with_tbt_tolerance() -> None:
    r = rec(CHAT, 0.0, [0.5, 0.55, 0.8, 0.85], finish=0.85)  # 1 late gap of 3
    assert not r.attained(0.05)  # 1 > 0.05 * 3
    assert not r.attained(0.3)  # 1 > 0.9
    assert r.attained(0.34)  # 1 <= 1.02
    # A late first token fails the request whatever the tolerance.
    assert not rec(STRICT_TTFT, 1.0, [1.5, 1.55, 1.6], finish=1.6).attained(1.0)
    # Perfect request.
    assert rec(CHAT, 0.0, [0.1, 0.2, 0.3], finish=0.3).attained(0.0)
    # One token only: no gaps, attained if on time.
    assert rec(CHAT, 0.0, [0.1], finish=0.1).attained(0.0)
    # Unfinished, cancelled or tokenless requests never attain.
    assert not rec(CHAT, 0.0, [0.1, 0.2], finish=None).attained(1.0)
    assert not rec(CHAT, 0.0, [0.1, 0.2], finish=0.2, reason="abort").attained(1.0)
    assert not rec(CHAT, 0.0, [], finish=0.2).attained(1.0)


@pytest.mark.unit
def test_attainment_tolerance_counts_gaps_not_tokens() -> None:
    # 21 tokens = 20 gaps, one late: 1 <= 0.05 * 20 = 1.0 -> attained at 5%.
    times = [0.1 * (i + 1) for i in range(10)] + [1.3] + [1.3 + 0.1 * (i + 1) for i in range(10)]
    r = rec(SLO(ttft_s=1.0, tbt_s=0.15), 0.0, times, finish=times[-1])
    assert sum(not f for f in r.on_time_flags()) == 1
    assert r.attained(0.05)
    assert not r.attained(0.04)


# -- summary -----------------------------------------------------------------------------------


def _collector(tol: float = 0.05) -> MetricsCollector:
    """Five requests, worked by hand (window 1 s).

    a chat  arrival 0.0  tokens 0.5 0.55 0.8 0.85  flags T T F T   finished 0.85
    b chat  arrival 1.0  tokens 1.5 1.55 1.6       flags F F F     finished 1.6 (late start: TTFT 0.2)
    c batch arrival 0.0  tokens 0.3 0.6 1.9        JCT 2.0, done at 1.9: all on time
    d batch arrival 0.5  tokens 0.7 1.8            JCT 1.0, done at 1.8 (1.3 s): all late
    e chat  arrival 1.0  tokens 1.2                on time, never finished
    """
    m = MetricsCollector(s_pf=768, tbt_tolerance=tol)
    events = [
        ("a", "chat", CHAT, 0.0, [0.5, 0.55, 0.8, 0.85], 0.85),
        ("b", "chat", STRICT_TTFT, 1.0, [1.5, 1.55, 1.6], 1.6),
        ("c", "batch", SLO(jct_s=2.0), 0.0, [0.3, 0.6, 1.9], 1.9),
        ("d", "batch", SLO(jct_s=1.0), 0.5, [0.7, 1.8], 1.8),
        ("e", "chat", CHAT, 1.0, [1.2], None),
    ]
    for rid, cls, slo, arrival, times, finish in events:
        m.on_arrival(rid, cls, slo, arrival, prompt_len=10)
        for t in times:
            m.on_token(rid, t)
        if finish is not None:
            m.on_finish(rid, finish, "stop", num_preemptions=1 if rid == "a" else 0)
    return m


@pytest.mark.unit
def test_summary_counts_goodput_and_throughput() -> None:
    s = _collector().summary()
    assert s["num_requests"] == 5 and s["num_finished"] == 4
    assert s["duration_s"] == pytest.approx(1.9)  # last token
    assert s["output_tokens"] == 13
    assert s["throughput_tok_s"] == pytest.approx(13 / 1.9)
    # On-time tokens: window [0,1): a 0.5 0.55 0.85, c 0.3 0.6 -> 5;
    #                 window [1,2): c 1.9, e 1.2 (b started late) -> 2.   Mean 3.5 tokens/s.
    assert s["goodput_tok_s"] == pytest.approx(3.5)
    assert s["preemptions"] == 1


@pytest.mark.unit
def test_summary_attainment() -> None:
    s = _collector(tol=0.05).summary()
    # Attained: only c (a has 1 late gap of 3, b a late first token, d late, e unfinished).
    assert s["slo_attainment"] == pytest.approx(1 / 5)
    assert s["slo_attainment_by_class"] == {"batch": pytest.approx(0.5), "chat": pytest.approx(0.0)}
    assert s["request_goodput_tok_s"] == pytest.approx(3 / 1.9)  # c's three tokens
    s = _collector(tol=0.34).summary()
    # a now attains too (1 <= 0.34 * 3).
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["slo_attainment_by_class"] == {"batch": pytest.approx(0.5), "chat": pytest.approx(1 / 3)}
    assert s["request_goodput_tok_s"] == pytest.approx(7 / 1.9)


@pytest.mark.unit
def test_summary_latency_percentiles() -> None:
    s = _collector().summary()
    # JCT of finished requests: a 0.85, b 0.6, c 1.9, d 1.3 (e has none).
    assert s["mean_jct_s"] == pytest.approx((0.85 + 0.6 + 1.9 + 1.3) / 4)
    # Sorted 0.6 0.85 1.3 1.9: median halfway between 0.85 and 1.3.
    assert s["p50_jct_s"] == pytest.approx(1.075)
    # TTFT: 0.5 0.5 0.3 0.2 0.2 -> sorted 0.2 0.2 0.3 0.5 0.5; median 0.3 s.
    assert s["p50_ttft_ms"] == pytest.approx(300.0)
    assert s["p99_ttft_ms"] == pytest.approx(500.0)
    # TBT gaps: a 0.05 0.25 0.05, b 0.05 0.05, c 0.3 1.3, d 1.1
    # sorted 0.05 0.05 0.05 0.05 0.25 0.3 1.1 1.3: median (0.05 + 0.25) / 2 = 0.15 s;
    # p90 at rank 0.9 * 7 = 6.3: 1.1 + 0.3 * (1.3 - 1.1) = 1.16 s.
    assert s["p50_tbt_ms"] == pytest.approx(150.0)
    assert s["p90_tbt_ms"] == pytest.approx(1160.0)


@pytest.mark.unit
def test_summary_with_horizon_counts_goodput_up_to_it() -> None:
    s = _collector().summary(horizon_s=1.0)
    # One window [0, 1]: on-time tokens at or before 1.0: a 0.5 0.55 0.85, c 0.3 0.6 -> 5.
    assert s["duration_s"] == 1.0
    assert s["goodput_tok_s"] == pytest.approx(5.0)
    s = _collector().summary(horizon_s=3.0)
    # Three windows: 5, 2, 0 on-time tokens -> 7/3 tokens/s.
    assert s["goodput_tok_s"] == pytest.approx(7 / 3)


@pytest.mark.unit
def test_summary_throughput_respects_the_horizon() -> None:
    s = _collector().summary(horizon_s=1.0)
    # Tokens at or before 1.0 s: a 4, c 2, d 1 (0.7) -> 7 in 1 s.
    assert s["throughput_tok_s"] == pytest.approx(7.0)
    assert s["throughput_tok_s"] >= s["goodput_tok_s"]


@pytest.mark.unit
def test_goodput_windows_use_the_window_length() -> None:
    m = MetricsCollector(s_pf=768, window_s=0.5)
    m.on_arrival("a", "chat", CHAT, 0.0, 10)
    for t in (0.1, 0.2, 0.3, 0.6):  # gaps 0.1 0.1 0.3: the 0.6 token is late
        m.on_token("a", t)
    m.on_finish("a", 0.6, "stop")
    s = m.summary(horizon_s=1.0)
    # Windows [0, .5): 3 on-time tokens, [.5, 1]: 0 -> mean 1.5 tokens per 0.5 s = 3 tokens/s.
    assert s["goodput_tok_s"] == pytest.approx(3.0)


@pytest.mark.unit
def test_empty_collector() -> None:
    s = MetricsCollector(s_pf=768).summary()
    assert s["num_requests"] == 0 and s["output_tokens"] == 0
    assert s["slo_attainment"] == 0.0 and s["goodput_tok_s"] == 0.0
    assert s["iterations"] == 0 and s["compute_util"] == 0.0 and s["kv_unallocated"] == 1.0
    assert s["p50_ttft_ms"] == 0.0 and s["mean_jct_s"] == 0.0


# -- the late-start rule, request goodput, refusals, per-class percentiles ----------------------


@pytest.mark.unit
def test_a_late_start_earns_no_token_goodput() -> None:
    # The flaw: first token 48 s late, then 100 tokens evenly 0.05 s apart (each gap
    # within the 0.1 s TBT). None of them is on time, so goodput is 0 while throughput is not.
    m = MetricsCollector(s_pf=768)
    m.on_arrival("late", "chat", CHAT, 0.0, 10)
    times = [48.0 + 0.05 * i for i in range(100)]
    for t in times:
        m.on_token("late", t)
    m.on_finish("late", times[-1], "stop")
    assert m.requests["late"].own_bound_flags()[1:] == [True] * 99
    assert m.requests["late"].on_time_flags() == [False] * 100
    s = m.summary(horizon_s=60.0)
    assert s["goodput_tok_s"] == 0.0 and s["output_tokens"] == 100
    assert s["throughput_tok_s"] == pytest.approx(100 / 60)
    assert s["slo_attainment"] == 0.0 and s["request_goodput_rps"] == 0.0


@pytest.mark.unit
def test_on_time_start_keeps_per_gap_flags() -> None:
    # First token on time: later tokens are judged gap by gap as before (the 0.8 token is late).
    r = rec(CHAT, 0.0, [0.5, 0.55, 0.8, 0.85], finish=0.85)
    assert r.on_time_flags() == r.own_bound_flags() == [True, True, False, True]
    # JCT requests are unchanged: all on time iff the job finished within its JCT.
    assert rec(SLO(jct_s=2.0), 0.0, [0.3, 1.9], finish=1.9).on_time_flags() == [True, True]


@pytest.mark.unit
def test_request_goodput_rps_counts_attained_requests_per_second() -> None:
    # Two requests over a 10 s horizon, one attained -> 1 / 10 = 0.1 requests/s.
    m = MetricsCollector(s_pf=768)
    m.on_arrival("ok", "chat", CHAT, 0.0, 10)
    m.on_arrival("slow", "chat", STRICT_TTFT, 0.0, 10)
    for t in (0.1, 0.2):
        m.on_token("ok", t)
    for t in (0.5, 0.6):  # TTFT 0.5 s > 0.2 s
        m.on_token("slow", t)
    m.on_finish("ok", 0.2, "stop")
    m.on_finish("slow", 0.6, "stop")
    s = m.summary(horizon_s=10.0)
    assert s["request_goodput_rps"] == pytest.approx(0.1)
    assert s["request_goodput_rps_by_class"] == {"chat": pytest.approx(0.1)}
    assert s["slo_attainment"] == pytest.approx(0.5)


@pytest.mark.unit
def test_request_goodput_rps_on_the_shared_collector() -> None:
    s = _collector(tol=0.34).summary()
    # Attained: a (chat) and c (batch), over the 1.9 s until the last token.
    assert s["request_goodput_rps"] == pytest.approx(2 / 1.9)
    assert s["request_goodput_rps_by_class"] == {"batch": pytest.approx(1 / 1.9), "chat": pytest.approx(1 / 1.9)}
    # Horizon 1.0 s: a's last token (0.85) is in, c's (1.9) is not -> 1 request in 1 s.
    s = _collector(tol=0.34).summary(horizon_s=1.0)
    assert s["request_goodput_rps"] == pytest.approx(1.0)
    assert s["request_goodput_rps_by_class"] == {"batch": 0.0, "chat": pytest.approx(1.0)}


@pytest.mark.unit
def test_per_class_latency_percentiles() -> None:
    s = _collector().summary()
    assert s["num_requests_by_class"] == {"batch": 2, "chat": 3}
    # TBT gaps, chat: a 0.05 0.25 0.05, b 0.05 0.05 (e has one token) -> sorted 0.05 x4, 0.25;
    #   p99 at rank 0.99 * 4 = 3.96: 0.05 + 0.96 * 0.20 = 0.242 s.
    # batch: c 0.3 1.3, d 1.1 -> sorted 0.3 1.1 1.3; rank 1.98: 1.1 + 0.98 * 0.2 = 1.296 s.
    assert s["p99_tbt_ms_by_class"] == {"batch": pytest.approx(1296.0), "chat": pytest.approx(242.0)}
    # Pooled, the eight gaps give rank 6.93: 1.1 + 0.93 * 0.2 = 1.286 s -- neither class's p99.
    assert s["p99_tbt_ms"] == pytest.approx(1286.0)
    # TTFT, chat: a 0.5, b 0.5, e 0.2 -> p50 0.5, p99 (rank 1.98) 0.5.
    # batch: c 0.3, d 0.2 -> p50 0.25; p99 at rank 0.99: 0.2 + 0.99 * 0.1 = 0.299 s.
    assert s["p50_ttft_ms_by_class"] == {"batch": pytest.approx(250.0), "chat": pytest.approx(500.0)}
    assert s["p99_ttft_ms_by_class"] == {"batch": pytest.approx(299.0), "chat": pytest.approx(500.0)}
    # Keys come sorted by class name.
    for key in ("slo_attainment_by_class", "num_requests_by_class", "refused_by_class",
                "request_goodput_rps_by_class", "p50_ttft_ms_by_class", "p99_ttft_ms_by_class",
                "p99_tbt_ms_by_class"):
        assert list(s[key]) == ["batch", "chat"], key


@pytest.mark.unit
def test_per_class_percentiles_match_numpy_default() -> None:
    m = MetricsCollector(s_pf=768)
    gaps = {"b-strict": [0.01, 0.02, 0.04, 0.03, 0.2], "a-lax": [0.3, 0.1, 0.5]}
    for cls, gs in gaps.items():
        m.on_arrival(cls, cls, SLO(ttft_s=1.0, tbt_s=0.5), 0.0, 10)
        t = 0.1
        m.on_token(cls, t)
        for g in gs:
            t += g
            m.on_token(cls, t)
        m.on_finish(cls, t, "stop")
    s = m.summary()
    assert list(s["p99_tbt_ms_by_class"]) == ["a-lax", "b-strict"]
    for cls, gs in gaps.items():
        assert s["p99_tbt_ms_by_class"][cls] == pytest.approx(float(np.percentile(gs, 99)) * 1000.0)
    assert s["p99_tbt_ms_by_class"]["b-strict"] == pytest.approx(193.6)  # 0.04 + 0.96 * 0.16 s


@pytest.mark.unit
def test_a_class_without_gaps_reports_zero_percentiles() -> None:
    m = MetricsCollector(s_pf=768)
    m.on_arrival("one", "single", CHAT, 0.0, 10)
    m.on_token("one", 0.3)
    m.on_finish("one", 0.3, "stop")
    m.on_arrival("no", "refused-only", CHAT, 0.0, 10)
    m.on_refused("no", 0.0)
    s = m.summary()
    assert s["p99_tbt_ms_by_class"] == {"refused-only": 0.0, "single": 0.0}
    assert s["p50_ttft_ms_by_class"] == {"refused-only": 0.0, "single": pytest.approx(300.0)}
    assert s["p99_ttft_ms_by_class"] == {"refused-only": 0.0, "single": pytest.approx(300.0)}


@pytest.mark.unit
def test_a_refused_request_is_a_miss() -> None:
    m = _collector(tol=0.34)
    m.on_arrival("r", "chat", CHAT, 1.5, prompt_len=10)
    m.on_refused("r", 1.5)
    record = m.requests["r"]
    assert record.finish_reason == "refused" and record.finish_s == 1.5 and record.token_times == []
    assert record.refused and not record.attained(1.0)
    s = m.summary()
    # Six requests now, still two attained (a, c): attainment falls from 2/5 to 2/6.
    assert s["num_requests"] == 6 and s["num_refused"] == 1
    assert s["num_finished"] == 5  # the refusal ended the request
    assert s["slo_attainment"] == pytest.approx(2 / 6)
    assert s["slo_attainment_by_class"] == {"batch": pytest.approx(0.5), "chat": pytest.approx(1 / 4)}
    assert s["refused_by_class"] == {"batch": 0, "chat": 1}
    assert s["num_requests_by_class"] == {"batch": 2, "chat": 4}
    # No tokens and no job: output, goodput and JCT are those of the five others.
    assert s["output_tokens"] == 13 and s["duration_s"] == pytest.approx(1.9)
    assert s["mean_jct_s"] == pytest.approx((0.85 + 0.6 + 1.9 + 1.3) / 4)
    assert s["request_goodput_rps"] == pytest.approx(2 / 1.9)


@pytest.mark.unit
def test_refusal_after_tokens_is_rejected() -> None:
    m = MetricsCollector(s_pf=768)
    m.on_arrival("x", "chat", CHAT, 0.0, 10)
    m.on_token("x", 0.1)
    with pytest.raises(ValueError, match="before any token"):
        m.on_refused("x", 0.2)


@pytest.mark.unit
def test_summary_keeps_its_keys_and_adds_the_new_ones() -> None:
    s = _collector().summary()
    existing = {"num_requests", "num_finished", "duration_s", "output_tokens", "throughput_tok_s",
                "goodput_tok_s", "request_goodput_tok_s", "slo_attainment", "slo_attainment_by_class",
                "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "p50_tbt_ms", "p90_tbt_ms", "p99_tbt_ms",
                "p50_jct_s", "p90_jct_s", "p99_jct_s", "mean_jct_s", "preemptions", "iterations",
                "compute_util", "kv_util", "kv_unallocated", "sched_ms_p50", "sched_ms_p99",
                "mean_forward_tokens"}
    added = {"request_goodput_rps", "request_goodput_rps_by_class", "num_requests_by_class",
             "p99_tbt_ms_by_class", "p50_ttft_ms_by_class", "p99_ttft_ms_by_class", "num_refused",
             "refused_by_class"}
    assert existing | added <= set(s)
    empty = MetricsCollector(s_pf=768).summary()
    assert existing | added <= set(empty)
    assert empty["request_goodput_rps"] == 0.0 and empty["num_refused"] == 0
    assert empty["p99_tbt_ms_by_class"] == {} and empty["refused_by_class"] == {}


# -- iteration metrics -------------------------------------------------------------------------


def _it(duration: float, tokens: int, used: int, decision: float) -> IterationSample:
    return IterationSample(start_s=0.0, duration_s=duration, forward_tokens=tokens, num_requests=1,
                           kv_used_blocks=used, kv_total_blocks=200, decision_s=decision)  # fmt: skip


@pytest.mark.unit
def test_compute_and_kv_utilisation_are_duration_weighted() -> None:
    m = MetricsCollector(s_pf=768)
    m.on_iteration(_it(1.0, 384, 100, 0.001))  # compute 384/768 = 0.5, KV 0.5
    m.on_iteration(_it(3.0, 1000, 50, 0.003))  # compute min(1, 1000/768) = 1, KV 0.25
    s = m.summary()
    assert s["iterations"] == 2
    assert s["compute_util"] == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)  # 0.875
    assert s["kv_util"] == pytest.approx((0.5 * 1 + 0.25 * 3) / 4)  # 0.3125
    assert s["kv_unallocated"] == pytest.approx(0.6875)
    assert s["mean_forward_tokens"] == pytest.approx(692.0)
    assert s["sched_ms_p50"] == pytest.approx(2.0)
    assert s["sched_ms_p99"] == pytest.approx(2.98)  # 1 + 0.99 * (3 - 1) ms


@pytest.mark.unit
def test_compute_util_caps_each_iteration_at_the_pivot() -> None:
    m = MetricsCollector(s_pf=100)
    m.on_iteration(_it(1.0, 100, 0, 0.0))
    m.on_iteration(_it(1.0, 5000, 0, 0.0))
    assert m.summary()["compute_util"] == pytest.approx(1.0)


@pytest.mark.unit
def test_zero_duration_iterations_weigh_equally() -> None:
    m = MetricsCollector(s_pf=100)
    m.on_iteration(_it(0.0, 25, 0, 0.0))
    m.on_iteration(_it(0.0, 75, 0, 0.0))
    assert m.summary()["compute_util"] == pytest.approx(0.5)
