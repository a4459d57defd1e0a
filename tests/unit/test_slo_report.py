"""The demo's per-class report (bench/slo_report.py) on records made up here, with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from accelgen.core.metrics import MetricsCollector, RequestRecord
from accelgen.core.slo import SLO
from bench.slo_report import (COLUMNS, class_latencies, format_class_table, plot_class_latencies, table_rows,
                              write_class_report)

CHAT = SLO(ttft_s=1.0, tbt_s=0.05)
SUMM = SLO(ttft_s=10.0, tbt_s=0.5)
BATCH = SLO(jct_s=600.0)


def record(rid: str, app_class: str, slo: SLO, ttft_s: float, gap_s: float, tokens: int,
           reason: str = "length") -> RequestRecord:
    times = [ttft_s + i * gap_s for i in range(tokens)]
    return RequestRecord(rid, app_class, slo, arrival_s=0.0, prompt_len=8, token_times=times,
                         finish_s=times[-1] if times else 0.0, finish_reason=reason)


def records() -> list[RequestRecord]:
    return [
        record("c1", "chat", CHAT, ttft_s=0.2, gap_s=0.02, tokens=5),    # met
        record("c2", "chat", CHAT, ttft_s=2.0, gap_s=0.02, tokens=5),    # first token late: missed
        record("c3", "chat", CHAT, ttft_s=0.1, gap_s=0.10, tokens=3),    # every gap late: missed
        record("s1", "summarization", SUMM, ttft_s=3.0, gap_s=0.2, tokens=4),
        record("b1", "batch", BATCH, ttft_s=1.0, gap_s=1.0, tokens=3),
    ]


def test_one_row_per_class_with_its_bounds_percentiles_and_attainment() -> None:
    classes = {c.app_class: c for c in class_latencies(records())}
    assert list(classes) == ["batch", "chat", "summarization"]
    chat = classes["chat"]
    assert (chat.requests, chat.attained) == (3, 1)
    assert (chat.slo_ttft_ms, chat.slo_tbt_ms, chat.slo_jct_s) == (1000.0, 50.0, None)
    assert chat.ttft_ms == pytest.approx((200.0, 2000.0, 100.0))
    assert sorted(chat.tbt_ms) == pytest.approx([20.0] * 8 + [100.0] * 2)
    assert chat.percentile("ttft", 50) == pytest.approx(200.0)
    assert chat.percentile("tbt", 99) == pytest.approx(float(np.percentile([20.0] * 8 + [100.0] * 2, 99)))
    assert classes["summarization"].attainment == 1.0
    batch = classes["batch"]
    assert (batch.slo_ttft_ms, batch.slo_tbt_ms, batch.slo_jct_s) == (None, None, 600.0)


def test_the_numbers_agree_with_the_metrics_collector() -> None:
    """The same records through MetricsCollector.summary: the same per-class p99s and attainment."""
    collector = MetricsCollector(s_pf=512)
    for r in records():
        collector.on_arrival(r.request_id, r.app_class, r.slo, r.arrival_s, r.prompt_len)
        for t in r.token_times:
            collector.on_token(r.request_id, t)
        collector.on_finish(r.request_id, r.finish_s, r.finish_reason)
    summary = collector.summary()
    for c in class_latencies(collector.requests.values(), collector.tbt_tolerance):
        assert c.attainment == pytest.approx(summary["slo_attainment_by_class"][c.app_class])
        assert c.percentile("ttft", 99) == pytest.approx(summary["p99_ttft_ms_by_class"][c.app_class])
        assert c.percentile("tbt", 99) == pytest.approx(summary["p99_tbt_ms_by_class"][c.app_class])


def test_the_table_has_a_row_per_class_and_dashes_where_nothing_was_measured() -> None:
    unserved = RequestRecord("x", "code", SLO(ttft_s=3.75, tbt_s=0.1875), 0.0, 8, finish_reason="refused", finish_s=0.0)
    classes = class_latencies([*records(), unserved])
    rows = {r[0]: r for r in table_rows(classes)}
    # p99 TTFT of 100, 200, 2000 ms (linear): 200 + 0.98 * 1800; the TBT gaps: eight 20s, two 100s.
    assert rows["chat"] == ["chat", "3", "1000", "50.0", "200", "1964", "20.0", "100", "33.3%"]
    assert rows["code"][1:] == ["1", "3750", "188", "-", "-", "-", "-", "0.0%"]
    assert rows["batch"][2:4] == ["JCT 600 s", "-"]
    text = format_class_table(classes).splitlines()
    assert text[0].split()[:2] == ["class", "requests"] and all(h in text[0] for h in COLUMNS)
    assert set(text[1]) == {"-"}
    assert [line.split()[0] for line in text[2:]] == ["batch", "chat", "code", "summarization"]


def test_the_figure_is_a_png_with_every_class(tmp_path: Path) -> None:
    unserved = RequestRecord("x", "code", SLO(ttft_s=3.75, tbt_s=0.1875), 0.0, 8, finish_reason="refused", finish_s=0.0)
    out = plot_class_latencies(class_latencies([*records(), unserved]), tmp_path / "demo" / "slo.png", "a run")
    assert out == tmp_path / "demo" / "slo.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_the_demo_report_prints_the_table_and_where_the_figure_is(tmp_path: Path) -> None:
    text = write_class_report(records(), tmp_path / "out", "demo")
    lines = text.splitlines()
    assert lines[-1] == f"figure: {tmp_path / 'out' / 'slo_by_class.png'}"
    assert (tmp_path / "out" / "slo_by_class.png").read_bytes()[:4] == b"\x89PNG"
    assert [line.split()[0] for line in lines[3:6]] == ["batch", "chat", "summarization"]
