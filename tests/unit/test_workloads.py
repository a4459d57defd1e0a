"""Tests of bench.workloads on the small in-repo trace sample (tests/data/traces_sample).

The sample holds the first 1500 rows of each real file, so these tests do not
depend on ../shared being present.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench import workloads as W
from bench.workloads import (
    CLASS_MODES,
    DEFAULT_SLO_MIX,
    SHORT_DATA,
    WORKLOAD_NAMES,
    azure_trace,
    load_workload,
    paper_mix,
    parse_slo_mix,
    traces_dir,
)
from tests.support.workload_data import (CODE, CONV, LENGTH_COLS, LENGTH_FILES, SAMPLE, check_wellformed, fit_rule,
                                         length_pair_list, length_pairs, use_sample_traces)


@pytest.fixture(autouse=True)
def _sample_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_sample_traces(monkeypatch)


@pytest.mark.unit
def test_sample_files_present_and_small() -> None:
    names = {p.name for p in SAMPLE.glob("*.csv")}
    assert names == {W.ALPACA_FILE, W.SHAREGPT_FIRST_TURN_FILE, W.SHAREGPT_FILE, W.BWB_FILE, W.ARXIV_FILE,
                     *W.AZURE_FILES.values()}  # fmt: skip
    assert set(SHORT_DATA.values()) <= names
    assert sum(p.stat().st_size for p in SAMPLE.iterdir()) < 1_000_000
    for p in SAMPLE.glob("*.csv"):
        assert sum(1 for _ in p.open()) == 1501


@pytest.mark.unit
def test_paper_mix_reproducible_and_seed_dependent() -> None:
    a = paper_mix(rate=20, duration_s=30, seed=7, data_dir=SAMPLE)
    b = paper_mix(rate=20, duration_s=30, seed=7, data_dir=SAMPLE)
    c = paper_mix(rate=20, duration_s=30, seed=8, data_dir=SAMPLE)
    assert a == b
    assert a != c
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c][: len(a)]
    # The default data dir (ACCELGEN_TRACES_DIR -> sample) gives the same list.
    assert paper_mix(rate=20, duration_s=30, seed=7) == a


@pytest.mark.unit
def test_paper_mix_poisson_rate_and_wellformed() -> None:
    rate, duration = 20.0, 100.0  # ~2000 requests
    reqs = paper_mix(rate=rate, duration_s=duration, seed=1, data_dir=SAMPLE)
    check_wellformed(reqs, 2048)
    assert abs(len(reqs) / duration - rate) / rate < 0.15
    assert all(r.arrival_s < duration for r in reqs)
    gaps = np.diff([0.0] + [r.arrival_s for r in reqs])
    assert abs(gaps.mean() - 1 / rate) * rate < 0.15
    # Exponential gaps: coefficient of variation ~1 (a fixed-interval bug would give 0).
    assert 0.85 < gaps.std() / gaps.mean() < 1.15


@pytest.mark.unit
def test_paper_mix_long_fraction_and_sources() -> None:
    reqs = paper_mix(rate=100, duration_s=100, seed=2, data_dir=SAMPLE)  # ~10k requests
    frac = np.mean([r.is_long for r in reqs])
    assert abs(frac - 0.35) < 0.02
    for r in reqs:
        assert r.is_long == (r.source in ("bwb", "arxiv"))
        assert r.is_long or r.source == "alpaca"  # the default short data
    # Long rows are uniform over BWB + arXiv rows; the sample has 1500 of each.
    long_sources = Counter(r.source for r in reqs if r.is_long)
    assert abs(long_sources["bwb"] / sum(long_sources.values()) - 0.5) < 0.05
    assert not any(r.is_long for r in paper_mix(rate=50, duration_s=10, long_fraction=0.0, data_dir=SAMPLE))
    assert all(r.is_long for r in paper_mix(rate=50, duration_s=10, long_fraction=1.0, data_dir=SAMPLE))


@pytest.mark.unit
def test_paper_mix_pairs_prompt_and_output_from_same_row() -> None:
    # With a huge context nothing is fitted, so each pair must be a real row of the file its source names.
    rows = {src: length_pairs(SAMPLE / name, *LENGTH_COLS) for src, name in LENGTH_FILES.items()}
    for short in ("alpaca", "sharegpt"):
        reqs = paper_mix(rate=50, duration_s=20, seed=3, max_model_len=10**6, data_dir=SAMPLE, short_data=short)
        assert {r.source for r in reqs} == {short, "bwb", "arxiv"}
        for r in reqs:
            assert (r.prompt_len, r.output_len) in rows[r.source]


@pytest.mark.unit
def test_azure_trace_relative_times_and_time_scale() -> None:
    base = azure_trace(CONV)
    assert len(base) == 1500
    check_wellformed(base, 2048)
    assert base[0].arrival_s == 0.0
    # Rows 1-2 of the file: 18:15:46.6805900 and 18:15:50.9951690.
    assert base[1].arrival_s == pytest.approx(4.314579, abs=1e-9)
    fast = azure_trace(CONV, time_scale=2.0)
    assert fast[-1].arrival_s == pytest.approx(base[-1].arrival_s / 2)
    assert [r.arrival_s for r in fast] == pytest.approx([r.arrival_s / 2 for r in base])
    # Lengths and classes do not depend on the time scale.
    assert [(r.prompt_len, r.output_len, r.app_class) for r in fast] == [
        (r.prompt_len, r.output_len, r.app_class) for r in base
    ]


@pytest.mark.unit
def test_azure_trace_duration_cut_keeps_prefix() -> None:
    full = azure_trace(CONV, seed=5)
    cut = azure_trace(CONV, seed=5, duration_s=60.0)
    assert 0 < len(cut) < len(full)
    assert all(r.arrival_s < 60.0 for r in cut)
    assert full[len(cut)].arrival_s >= 60.0
    assert cut == full[: len(cut)]  # classes stay with their rows when the trace is cut


@pytest.mark.unit
def test_azure_trace_is_long_and_source() -> None:
    reqs = azure_trace(CODE, source="azure-code", long_threshold=1024)
    assert {r.source for r in reqs} == {"azure-code"}
    assert all(r.is_long == (r.prompt_len > 1024) for r in reqs)
    assert 0 < sum(r.is_long for r in reqs) < len(reqs)
    raw = length_pair_list(CODE, "ContextTokens", "GeneratedTokens")
    assert [(r.prompt_len, r.output_len) for r in reqs] == [fit_rule(p, o) for p, o in raw]
    # Requests that fit are the rows themselves.
    assert all((r.prompt_len, r.output_len) == row for r, row in zip(reqs, raw) if row[0] + row[1] <= 2048
               and row[1] <= 1024)  # fmt: skip


@pytest.mark.unit
def test_trace_csv_unsorted_and_across_midnight(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.5000000,100,10\n"
        "2023-11-17 00:00:01.0000000,300,30\n"
        "2023-11-16 23:59:59.0000000,5000,20\n"
    )
    reqs = load_workload("trace", trace=path, duration_s=10.0)
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.5, 2.0])
    assert [r.prompt_len for r in reqs] == [2028, 100, 300]  # 5000 + 20 does not fit: the prompt gives way
    assert [r.output_len for r in reqs] == [20, 10, 30]
    assert [r.is_long for r in reqs] == [True, False, False]
    assert {r.source for r in reqs} == {"trace"}
    vidur = tmp_path / "v.csv"
    vidur.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n1.5,20,6\n")
    assert [(r.arrival_s, r.prompt_len) for r in azure_trace(vidur)] == [(0.0, 10), (1.5, 20)]


@pytest.mark.unit
def test_slo_mix_weights_respected() -> None:
    reqs = paper_mix(rate=100, duration_s=100, seed=6, slo_mix={"chat": 3, "code": 1, "off": 0}, data_dir=SAMPLE)
    counts = Counter(r.app_class for r in reqs)
    assert set(counts) == {"chat", "code"}
    assert abs(counts["chat"] / len(reqs) - 0.75) < 0.02
    # Classes are independent of length: the chat share is the same among long and short.
    for flag in (True, False):
        sub = [r for r in reqs if r.is_long == flag]
        assert abs(sum(r.app_class == "chat" for r in sub) / len(sub) - 0.75) < 0.04
    default = Counter(r.app_class for r in paper_mix(rate=100, duration_s=60, data_dir=SAMPLE))
    assert set(default) == set(DEFAULT_SLO_MIX)
    assert max(default.values()) / min(default.values()) < 1.15
    trace = Counter(r.app_class for r in azure_trace(CONV, slo_mix={"a": 1, "b": 1}))
    assert set(trace) == {"a", "b"} and abs(trace["a"] - 750) < 100


@pytest.mark.unit
def test_short_data_switch_reads_the_named_file(tmp_path: Path) -> None:
    # A data dir holding only the long files and one short file: reading any other file would fail.
    for short, name in SHORT_DATA.items():
        d = tmp_path / short
        d.mkdir()
        for f in (name, W.BWB_FILE, W.ARXIV_FILE):
            (d / f).write_bytes((SAMPLE / f).read_bytes())
        reqs = paper_mix(rate=100, duration_s=100, seed=2, data_dir=d, short_data=short)
        assert {r.source for r in reqs if not r.is_long} == {short}
        assert reqs == paper_mix(rate=100, duration_s=100, seed=2, data_dir=SAMPLE, short_data=short)
        # The paper's split: 35% long, 65% short (n ~ 10,000: sd of the share ~0.005).
        assert abs(np.mean([r.is_long for r in reqs]) - 0.35) < 0.02
    assert SHORT_DATA == {"alpaca": "alpaca_token_lengths.csv", "sharegpt": "sharegpt_first_turn_token_lengths.csv"}
    # Same seed, different short data: the arrivals and long requests are identical, the short ones differ.
    a = paper_mix(rate=50, duration_s=20, seed=9, data_dir=SAMPLE)
    s = paper_mix(rate=50, duration_s=20, seed=9, data_dir=SAMPLE, short_data="sharegpt")
    assert [r.arrival_s for r in a] == [r.arrival_s for r in s]
    assert [r for r in a if r.is_long] == [r for r in s if r.is_long]
    # The two short sets differ: ShareGPT first turns answer at length (full-file output medians 271 vs 43).
    assert np.median([r.output_len for r in s if not r.is_long]) > 2 * np.median([r.output_len for r in a
                                                                                   if not r.is_long])  # fmt: skip
    with pytest.raises(ValueError, match="short_data='vidur'.*alpaca, sharegpt"):
        paper_mix(rate=1, duration_s=10, data_dir=SAMPLE, short_data="vidur")


@pytest.mark.unit
def test_paper_mix_reproducible_with_new_options() -> None:
    kw = {"rate": 30, "duration_s": 30, "data_dir": SAMPLE, "short_data": "sharegpt", "classes": "by-app"}
    assert paper_mix(seed=4, **kw) == paper_mix(seed=4, **kw)
    assert paper_mix(seed=4, **kw) != paper_mix(seed=5, **kw)


@pytest.mark.unit
def test_classes_by_app_paper_mix() -> None:
    uniform = paper_mix(rate=100, duration_s=100, seed=6, data_dir=SAMPLE)
    by_app = paper_mix(rate=100, duration_s=100, seed=6, data_dir=SAMPLE, classes="by-app")
    # Only the classes change: arrivals, lengths and sources are the same requests.
    strip = [(r.arrival_s, r.prompt_len, r.output_len, r.source, r.is_long) for r in by_app]
    assert strip == [(r.arrival_s, r.prompt_len, r.output_len, r.source, r.is_long) for r in uniform]
    for r in by_app:
        if r.is_long:
            assert r.app_class == "summarization"
        else:
            assert r.app_class in ("chat", "code")
    short = [r for r in by_app if not r.is_long]
    assert abs(sum(r.app_class == "chat" for r in short) / len(short) - 0.5) < 0.03  # default: equal
    # The chat:code ratio comes from slo_mix; the summarization weight does not matter.
    mixed = paper_mix(rate=100, duration_s=100, seed=6, data_dir=SAMPLE, classes="by-app",
                      slo_mix={"chat": 3, "code": 1, "summarization": 0})  # fmt: skip
    short = [r for r in mixed if not r.is_long]
    assert abs(sum(r.app_class == "chat" for r in short) / len(short) - 0.75) < 0.03
    assert all(r.app_class == "summarization" for r in mixed if r.is_long)
    only_chat = paper_mix(rate=20, duration_s=20, data_dir=SAMPLE, classes="by-app", slo_mix={"chat": 1})
    assert {r.app_class for r in only_chat} == {"chat", "summarization"}


@pytest.mark.unit
def test_classes_by_app_azure_trace() -> None:
    reqs = azure_trace(CODE, classes="by-app", long_threshold=1024)
    assert 0 < sum(r.is_long for r in reqs) < len(reqs)
    for r in reqs:
        assert r.is_long == (r.prompt_len > 1024)
        assert (r.app_class == "summarization") == (r.prompt_len > 1024)
        assert r.app_class in ("chat", "code", "summarization")
    assert {r.app_class for r in reqs if not r.is_long} == {"chat", "code"}
    low = azure_trace(CODE, classes="by-app", long_threshold=100)
    assert all((r.app_class == "summarization") == (r.prompt_len > 100) for r in low)
    # Cutting the trace keeps each row's class, as in uniform mode.
    cut = azure_trace(CONV, classes="by-app", duration_s=60.0)
    assert cut == azure_trace(CONV, classes="by-app")[: len(cut)]


@pytest.mark.unit
def test_classes_errors() -> None:
    with pytest.raises(ValueError, match="classes='bogus'.*uniform, by-app"):
        paper_mix(rate=1, duration_s=10, data_dir=SAMPLE, classes="bogus")
    with pytest.raises(ValueError, match="classes='length'.*uniform, by-app"):
        azure_trace(CONV, classes="length")
    with pytest.raises(ValueError, match="chat or code a weight > 0"):
        paper_mix(rate=1, duration_s=10, data_dir=SAMPLE, classes="by-app", slo_mix={"summarization": 1})
    with pytest.raises(ValueError, match=r"\['batch'\] would never be drawn"):
        azure_trace(CONV, classes="by-app", slo_mix={"chat": 1, "batch": 2})
    # The usual slo_mix checks still apply.
    with pytest.raises(ValueError, match=">= 0"):
        paper_mix(rate=1, duration_s=10, data_dir=SAMPLE, classes="by-app", slo_mix={"chat": -1})
    assert CLASS_MODES == ("uniform", "by-app")


@pytest.mark.unit
def test_parse_slo_mix_valid() -> None:
    assert parse_slo_mix("chat=1,code=2,summarization=1") == {"chat": 1.0, "code": 2.0, "summarization": 1.0}
    assert parse_slo_mix(" chat = 0.5 , code=0 ") == {"chat": 0.5, "code": 0.0}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("chat", "CLASS=WEIGHT"),
        ("=1", "CLASS=WEIGHT"),
        ("chat=1,", "CLASS=WEIGHT"),
        ("chat=x", "bad weight"),
        ("chat=-1,code=2", ">= 0"),
        ("chat=nan", "finite"),
        ("chat=inf", "finite"),
        ("chat=0,code=0", "no positive weight"),
        ("chat=1,chat=2", "twice"),
    ],
)
def test_parse_slo_mix_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_slo_mix(text)


@pytest.mark.unit
def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="rate"):
        paper_mix(rate=0, duration_s=10, data_dir=SAMPLE)
    with pytest.raises(ValueError, match="duration_s"):
        paper_mix(rate=1, duration_s=-1, data_dir=SAMPLE)
    with pytest.raises(ValueError, match="long_fraction"):
        paper_mix(rate=1, duration_s=10, long_fraction=1.5, data_dir=SAMPLE)
    with pytest.raises(ValueError, match="no positive weight"):
        paper_mix(rate=1, duration_s=10, slo_mix={"chat": 0}, data_dir=SAMPLE)
    with pytest.raises(ValueError, match="time_scale"):
        azure_trace(CONV, time_scale=0)
    with pytest.raises(ValueError, match="ContextTokens"):
        azure_trace(SAMPLE / W.BWB_FILE)  # a length file is not an arrival trace


@pytest.mark.unit
def test_load_workload_dispatch() -> None:
    assert WORKLOAD_NAMES == ("paper-mix", "azure-conv", "azure-code", "trace")
    pm = load_workload("paper-mix", rate=10, duration_s=20, seed=3, long_fraction=0.5, max_model_len=1024)
    assert pm == paper_mix(rate=10, duration_s=20, seed=3, long_fraction=0.5, max_model_len=1024)
    conv = load_workload("azure-conv", duration_s=30, time_scale=2.0)
    assert conv and {r.source for r in conv} == {"azure-conv"}
    assert conv == azure_trace(CONV, duration_s=30, time_scale=2.0, source="azure-conv")
    code = load_workload("azure-code", duration_s=1e6)
    assert len(code) == 1500 and {r.source for r in code} == {"azure-code"}
    assert load_workload("trace", trace=CODE, duration_s=1e6) == azure_trace(CODE, source="trace")
    # short_data (paper-mix only) and classes (every workload) are passed through.
    assert load_workload("paper-mix", rate=10, duration_s=20, short_data="sharegpt", classes="by-app") == paper_mix(
        rate=10, duration_s=20, short_data="sharegpt", classes="by-app")  # fmt: skip
    assert load_workload("paper-mix", rate=10, duration_s=20) == paper_mix(rate=10, duration_s=20, short_data="alpaca")
    assert load_workload("azure-code", duration_s=1e6, classes="by-app") == azure_trace(
        CODE, source="azure-code", classes="by-app")  # fmt: skip
    assert load_workload("trace", trace=CODE, duration_s=1e6, classes="by-app") == azure_trace(CODE, classes="by-app")


@pytest.mark.unit
def test_load_workload_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown workload 'bogus'.*paper-mix, azure-conv, azure-code, trace"):
        load_workload("bogus")
    with pytest.raises(ValueError, match="needs rate="):
        load_workload("paper-mix")
    with pytest.raises(ValueError, match="needs trace=PATH"):
        load_workload("trace")
    with pytest.raises(ValueError, match="rate applies only to 'paper-mix'.*time_scale"):
        load_workload("azure-conv", rate=5.0)
    with pytest.raises(ValueError, match="trace=PATH applies only"):
        load_workload("paper-mix", rate=1.0, trace=CONV)
    with pytest.raises(FileNotFoundError, match="trace="):
        load_workload("trace", trace=tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="short_data applies only to 'paper-mix'"):
        load_workload("azure-conv", short_data="alpaca")
    with pytest.raises(ValueError, match="short_data applies only to 'paper-mix'"):
        load_workload("trace", trace=CODE, short_data="sharegpt")
    with pytest.raises(ValueError, match="short_data='bogus'.*alpaca, sharegpt"):
        load_workload("paper-mix", rate=1.0, short_data="bogus")
    with pytest.raises(ValueError, match="classes='bogus'.*uniform, by-app"):
        load_workload("azure-code", classes="bogus")
    # A bad classes value fails before the file lookup.
    with pytest.raises(ValueError, match="classes="):
        load_workload("trace", trace=tmp_path / "missing.csv", classes="bogus")
    monkeypatch.setenv("ACCELGEN_TRACES_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ACCELGEN_TRACES_DIR"):
        load_workload("azure-code")


@pytest.mark.unit
def test_traces_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert traces_dir() == SAMPLE  # from the env var
    monkeypatch.delenv("ACCELGEN_TRACES_DIR")
    monkeypatch.setattr(W, "_REPO_ROOT", tmp_path / "repo")
    assert traces_dir() == W._SAMPLE_DIR == SAMPLE  # no ../shared/traces: the in-repo sample
    shared = tmp_path / "shared" / "traces"
    shared.mkdir(parents=True)
    assert traces_dir() == shared


@pytest.mark.unit
def test_csv_columns_cached_and_read_only() -> None:
    W._read_trace.cache_clear()
    azure_trace(CONV)
    azure_trace(Path(str(CONV.parent) + "/./" + CONV.name), time_scale=3.0)
    info = W._read_trace.cache_info()
    assert info.misses == 1 and info.hits == 1
    t, _, _ = W._read_trace(W._key(CONV))
    with pytest.raises(ValueError):
        t[0] = 1.0


@pytest.mark.unit
def test_workload_spec_and_cli_flags() -> None:
    import argparse

    from launcher.research import add_workload_args
    from bench.compare import WorkloadSpec

    ap = argparse.ArgumentParser()
    add_workload_args(ap)
    args = ap.parse_args([])
    assert (args.short_data, args.classes) == ("alpaca", "uniform")
    args = ap.parse_args(["--short-data", "sharegpt", "--classes", "by-app"])
    assert (args.short_data, args.classes) == ("sharegpt", "by-app")
    for bad in (["--short-data", "vidur"], ["--classes", "random"]):
        with pytest.raises(SystemExit):
            ap.parse_args(bad)

    spec = WorkloadSpec(rate=10, duration_s=20, short_data="sharegpt", classes="by-app")
    assert spec.build(2048) == paper_mix(rate=10, duration_s=20, short_data="sharegpt", classes="by-app")
    assert WorkloadSpec(rate=10, duration_s=20).build(2048) == paper_mix(rate=10, duration_s=20)
    # short_data (default "alpaca") is not passed to a trace workload, so the default spec still builds one.
    conv = WorkloadSpec(name="azure-conv", duration_s=30, classes="by-app").build(2048)
    assert conv == azure_trace(CONV, duration_s=30, source="azure-conv", classes="by-app")
