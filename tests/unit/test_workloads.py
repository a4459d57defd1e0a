"""Tests of bench.workloads on the small in-repo trace sample (tests/data/traces_sample).

The sample holds the first 1500 rows of each real file, so these tests do not
depend on ../shared being present.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import workloads as W
from bench.workloads import (
    DEFAULT_SLO_MIX,
    WORKLOAD_NAMES,
    WorkloadRequest,
    azure_trace,
    load_workload,
    paper_mix,
    parse_slo_mix,
    traces_dir,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "traces_sample"
CONV = SAMPLE / W.AZURE_FILES["azure-conv"]
CODE = SAMPLE / W.AZURE_FILES["azure-code"]


@pytest.fixture(autouse=True)
def _sample_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELGEN_TRACES_DIR", str(SAMPLE))


def _rows(path: Path, a: str, b: str) -> set[tuple[int, int]]:
    with open(path, newline="") as fh:
        return {(int(r[a]), int(r[b])) for r in csv.DictReader(fh)}


def _check_wellformed(reqs: list[WorkloadRequest], max_model_len: int) -> None:
    assert [r.request_id for r in reqs] == [f"r{i:06d}" for i in range(len(reqs))]
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0.0
    for r in reqs:
        assert r.prompt_len >= 1 and r.output_len >= 1
        assert r.prompt_len + r.output_len <= max_model_len
        assert type(r.prompt_len) is int and type(r.output_len) is int and type(r.arrival_s) is float


@pytest.mark.unit
def test_sample_files_present_and_small() -> None:
    names = {p.name for p in SAMPLE.glob("*.csv")}
    assert names == {W.SHAREGPT_FILE, W.BWB_FILE, W.ARXIV_FILE, *W.AZURE_FILES.values()}
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
    _check_wellformed(reqs, 2048)
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
        assert r.is_long or r.source == "sharegpt"
    # Long rows are uniform over BWB + arXiv rows; the sample has 1500 of each.
    long_sources = Counter(r.source for r in reqs if r.is_long)
    assert abs(long_sources["bwb"] / sum(long_sources.values()) - 0.5) < 0.05
    assert not any(r.is_long for r in paper_mix(rate=50, duration_s=10, long_fraction=0.0, data_dir=SAMPLE))
    assert all(r.is_long for r in paper_mix(rate=50, duration_s=10, long_fraction=1.0, data_dir=SAMPLE))


@pytest.mark.unit
def test_paper_mix_pairs_prompt_and_output_from_same_row() -> None:
    # With a huge context nothing is truncated, so each pair must be a real row.
    reqs = paper_mix(rate=50, duration_s=20, seed=3, max_model_len=10**6, data_dir=SAMPLE)
    cols = ("num_prefill_tokens", "num_decode_tokens")
    rows = {
        "sharegpt": _rows(SAMPLE / W.SHAREGPT_FILE, *cols),
        "bwb": _rows(SAMPLE / W.BWB_FILE, *cols),
        "arxiv": _rows(SAMPLE / W.ARXIV_FILE, *cols),
    }
    for r in reqs:
        assert (r.prompt_len, r.output_len) in rows[r.source]


@pytest.mark.unit
@pytest.mark.parametrize("max_model_len", [2, 512, 2048, 4096])
def test_truncation_bound_holds(max_model_len: int) -> None:
    reqs = paper_mix(rate=50, duration_s=20, seed=4, max_model_len=max_model_len, data_dir=SAMPLE)
    _check_wellformed(reqs, max_model_len)
    trace = azure_trace(CODE, max_model_len=max_model_len)
    _check_wellformed(trace, max_model_len)
    assert max(r.prompt_len for r in trace) == max_model_len - 1  # code prompts are long: some are cut


@pytest.mark.unit
def test_truncation_examples() -> None:
    p, o = W._truncate(np.array([5000, 1000, 10, 2047, 0]), np.array([10, 2000, 10, 5, 0]), 2048)
    assert p.tolist() == [2047, 1000, 10, 2047, 1]
    assert o.tolist() == [1, 1048, 10, 1, 1]
    with pytest.raises(ValueError, match="max_model_len"):
        W._truncate(np.array([1]), np.array([1]), 1)


@pytest.mark.unit
@settings(deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 20_000)), min_size=1, max_size=50),
    st.integers(2, 8192),
)
def test_truncation_property(pairs: list[tuple[int, int]], max_model_len: int) -> None:
    prompt, output = (np.array(x) for x in zip(*pairs))
    p, o = W._truncate(prompt, output, max_model_len)
    assert (p >= 1).all() and (o >= 1).all() and (p + o <= max_model_len).all()
    # Nothing that already fits is changed.
    fits = (prompt >= 1) & (output >= 1) & (prompt + output <= max_model_len)
    assert (p[fits] == prompt[fits]).all() and (o[fits] == output[fits]).all()


@pytest.mark.unit
def test_azure_trace_relative_times_and_time_scale() -> None:
    base = azure_trace(CONV)
    assert len(base) == 1500
    _check_wellformed(base, 2048)
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
    raw = _rows(CODE, "ContextTokens", "GeneratedTokens")
    assert all((r.prompt_len, r.output_len) in raw for r in reqs if r.prompt_len < 1024)


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
    assert [r.prompt_len for r in reqs] == [2047, 100, 300]
    assert [r.output_len for r in reqs] == [1, 10, 30]
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
