"""Tests of fitting requests into the model context (bench.workloads) and of the length
summary the results page prints, on the in-repo trace sample. Split from test_workloads.py;
both take the sample and its helpers from tests/support/workload_data.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import workloads as W
from bench.workload_stats import length_summary
from bench.workloads import (MAX_OUTPUT_TOKENS, SHORT_DATA, WorkloadRequest, azure_trace,
                             max_output_tokens, paper_mix)
from tests.support.workload_data import (CODE, CONV, LENGTH_COLS, LENGTH_FILES, SAMPLE, check_wellformed, fit_rule,
                                         length_pair_list, length_pairs, use_sample_traces)


@pytest.fixture(autouse=True)
def _sample_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_sample_traces(monkeypatch)


@pytest.mark.unit
@pytest.mark.parametrize("max_model_len", [2, 512, 2048, 4096])
def test_fitting_bound_holds(max_model_len: int) -> None:
    for short in SHORT_DATA:
        reqs = paper_mix(rate=50, duration_s=20, seed=4, max_model_len=max_model_len, data_dir=SAMPLE,
                         short_data=short)  # fmt: skip
        check_wellformed(reqs, max_model_len)
        assert max(r.output_len for r in reqs) <= max_model_len // 2
    trace = azure_trace(CODE, max_model_len=max_model_len)
    check_wellformed(trace, max_model_len)
    raw = length_pair_list(CODE, "ContextTokens", "GeneratedTokens")
    assert [(r.prompt_len, r.output_len) for r in trace] == [fit_rule(p, o, max_model_len) for p, o in raw]
    # Code prompts are long: some are clipped, and then they fill the context exactly.
    assert any(p + min(o, max_model_len // 2) > max_model_len for p, o in raw)
    assert max(r.prompt_len + r.output_len for r in trace) == max_model_len


@pytest.mark.unit
def test_max_output_tokens_is_half_the_context() -> None:
    assert MAX_OUTPUT_TOKENS == 1024 == max_output_tokens(2048)
    assert [max_output_tokens(n) for n in (2, 3, 512, 4097)] == [1, 1, 256, 2048]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("prompt", "output", "max_model_len", "expected"),
    [
        (3000, 1500, 2048, (1024, 1024)),  # output capped at 1024 first, then the prompt keeps its head
        (100, 50, 2048, (100, 50)),  # fits: unchanged
        (2047, 1, 2048, (2047, 1)),  # fits exactly, the 1-token output is the data's
        (2047, 5, 2048, (2043, 5)),  # old rule: (2047, 1); now the output is kept and the prompt clipped
        (5000, 10, 2048, (2038, 10)),  # old rule: (2047, 1)
        (1000, 2000, 2048, (1000, 1024)),  # output cap alone makes it fit: the prompt is untouched
        (1500, 1000, 2048, (1048, 1000)),  # output under the cap; the prompt gives way
        (1024, 1024, 2048, (1024, 1024)),  # exactly full, at the cap
        (0, 0, 2048, (1, 1)),  # zeros in the data become 1
        (600, 400, 512, (256, 256)),  # cap scales with the context: 512 // 2
        (10, 10, 2, (1, 1)),  # smallest context
        (10, 10, 3, (2, 1)),
    ],
)
def test_fit_context_examples(prompt: int, output: int, max_model_len: int, expected: tuple[int, int]) -> None:
    p, o = W._fit_context(np.array([prompt]), np.array([output]), max_model_len)
    assert (int(p[0]), int(o[0])) == expected
    assert fit_rule(prompt, output, max_model_len) == expected  # the test's own statement of the rule agrees


@pytest.mark.unit
def test_fit_context_vectorised_and_bad_context() -> None:
    p, o = W._fit_context(np.array([3000, 100, 2047, 5000]), np.array([1500, 50, 1, 10]), 2048)
    assert p.tolist() == [1024, 100, 2047, 2038]
    assert o.tolist() == [1024, 50, 1, 10]
    for bad in (1, 0, -5, 2048.0, True):
        with pytest.raises(ValueError, match="max_model_len"):
            W._fit_context(np.array([1]), np.array([1]), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_model_len"):
        paper_mix(rate=1, duration_s=10, max_model_len=1, data_dir=SAMPLE)


@pytest.mark.unit
@settings(deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 20_000)), min_size=1, max_size=50),
    st.integers(2, 8192),
)
def test_fit_context_property(pairs: list[tuple[int, int]], max_model_len: int) -> None:
    prompt, output = (np.array(x) for x in zip(*pairs))
    p, o = W._fit_context(prompt, output, max_model_len)
    cap = max_model_len // 2
    assert (p >= 1).all() and (o >= 1).all() and (p + o <= max_model_len).all()
    # The output loses only what exceeds the client's cap; the prompt only what does not fit next to it.
    assert (o == np.clip(output, 1, cap)).all()
    assert (p == np.clip(prompt, 1, max_model_len - o)).all()
    # A 1-token output comes from the data (or from a context so small that the cap is 1).
    assert ((o > 1) | (output <= 1) | (cap == 1)).all()
    # Nothing that already fits within the cap is changed.
    fits = (prompt >= 1) & (output >= 1) & (output <= cap) & (prompt + output <= max_model_len)
    assert (p[fits] == prompt[fits]).all() and (o[fits] == output[fits]).all()


@pytest.mark.unit
@pytest.mark.parametrize("short", ["alpaca", "sharegpt"])
def test_no_one_token_output_the_data_did_not_have(short: str) -> None:
    reqs = paper_mix(rate=100, duration_s=60, seed=11, data_dir=SAMPLE, short_data=short)
    fitted = {src: {fit_rule(p, o) for p, o in length_pairs(SAMPLE / name, *LENGTH_COLS)}
              for src, name in LENGTH_FILES.items()}  # fmt: skip
    one = {src: {fit_rule(p, o) for p, o in length_pairs(SAMPLE / name, *LENGTH_COLS) if o <= 1}
           for src, name in LENGTH_FILES.items()}  # fmt: skip
    for r in reqs:
        assert (r.prompt_len, r.output_len) in fitted[r.source]
        if r.output_len == 1:
            assert (r.prompt_len, 1) in one[r.source]
    # The old rule made every long request that did not fit a (2047, 1) request; none is left.
    assert sum(r.is_long for r in reqs) > 1000
    assert not any(r.output_len == 1 for r in reqs if r.is_long)
    for tr in (CONV, CODE):
        raw = length_pair_list(tr, "ContextTokens", "GeneratedTokens")
        for r, (_, o) in zip(azure_trace(tr), raw, strict=True):
            assert r.output_len > 1 or o <= 1


@pytest.mark.unit
def test_length_summary_hand_computed() -> None:
    def req(i: int, p: int, o: int, src: str) -> WorkloadRequest:
        return WorkloadRequest(f"r{i}", float(i), p, o, "chat", src, src == "bwb")

    reqs = [req(0, 10, 1, "alpaca"), req(1, 20, 2, "bwb"), req(2, 30, 3, "alpaca"), req(3, 40, 4, "alpaca"),
            req(4, 100, 10, "alpaca")]  # fmt: skip
    out = length_summary(reqs)
    assert list(out) == ["alpaca", "bwb"]  # sorted by source
    # alpaca prompts [10, 30, 40, 100]: mean 45; linear-interpolated percentiles at positions 0.5*3, 0.9*3, 0.99*3:
    # p50 = 30 + 0.5 * 10 = 35, p90 = 40 + 0.7 * 60 = 82, p99 = 40 + 0.97 * 60 = 98.2.
    a = out["alpaca"]
    assert a["count"] == 4
    assert a["prompt"] == pytest.approx({"mean": 45.0, "p50": 35.0, "p90": 82.0, "p99": 98.2, "max": 100})
    # alpaca outputs [1, 3, 4, 10]: mean 4.5, p50 3.5, p90 4 + 0.7 * 6 = 8.2, p99 4 + 0.97 * 6 = 9.82.
    assert a["output"] == pytest.approx({"mean": 4.5, "p50": 3.5, "p90": 8.2, "p99": 9.82, "max": 10})
    assert out["bwb"] == {"count": 1, "prompt": {"mean": 20.0, "p50": 20.0, "p90": 20.0, "p99": 20.0, "max": 20},
                          "output": {"mean": 2.0, "p50": 2.0, "p90": 2.0, "p99": 2.0, "max": 2}}  # fmt: skip
    assert type(a["count"]) is int and type(a["prompt"]["max"]) is int and type(a["prompt"]["p50"]) is float
    assert length_summary([]) == {}


@pytest.mark.unit
def test_length_summary_of_a_built_workload_uses_fitted_lengths() -> None:
    reqs = paper_mix(rate=50, duration_s=40, seed=12, data_dir=SAMPLE, short_data="sharegpt")
    out = length_summary(reqs)
    assert set(out) == {"sharegpt", "bwb", "arxiv"}
    assert sum(v["count"] for v in out.values()) == len(reqs)
    for src, v in out.items():
        rs = [r for r in reqs if r.source == src]
        assert v["count"] == len(rs)
        assert v["prompt"]["max"] == max(r.prompt_len for r in rs)
        assert v["output"]["mean"] == pytest.approx(np.mean([r.output_len for r in rs]))
        assert v["output"]["max"] <= MAX_OUTPUT_TOKENS  # as used, after fitting
        assert v["prompt"]["p50"] <= v["prompt"]["p90"] <= v["prompt"]["p99"] <= v["prompt"]["max"]
