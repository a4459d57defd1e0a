"""The in-repo trace sample (tests/data/traces_sample) and helpers that read it independently of
bench.workloads, shared by tests/unit/test_workloads.py and tests/unit/test_workload_fitting.py.

The sample holds the first 1500 rows of each real file, so tests on it do not depend on
../shared being present. A test module points bench.workloads at it with an autouse fixture
that calls ``use_sample_traces``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench import workloads as W
from bench.workloads import WorkloadRequest

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "traces_sample"
CONV = SAMPLE / W.AZURE_FILES["azure-conv"]
CODE = SAMPLE / W.AZURE_FILES["azure-code"]
LENGTH_COLS = ("num_prefill_tokens", "num_decode_tokens")
LENGTH_FILES = {"alpaca": W.ALPACA_FILE, "sharegpt": W.SHAREGPT_FIRST_TURN_FILE, "bwb": W.BWB_FILE,
                "arxiv": W.ARXIV_FILE}  # fmt: skip


def use_sample_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default data dir of bench.workloads (``ACCELGEN_TRACES_DIR``) becomes the sample."""
    monkeypatch.setenv("ACCELGEN_TRACES_DIR", str(SAMPLE))


def length_pairs(path: Path, a: str, b: str) -> set[tuple[int, int]]:
    """The distinct ``(row[a], row[b])`` pairs of a CSV file."""
    with open(path, newline="") as fh:
        return {(int(r[a]), int(r[b])) for r in csv.DictReader(fh)}


def length_pair_list(path: Path, a: str, b: str) -> list[tuple[int, int]]:
    """The ``(row[a], row[b])`` pairs of a CSV file, in file order."""
    with open(path, newline="") as fh:
        return [(int(r[a]), int(r[b])) for r in csv.DictReader(fh)]


def fit_rule(prompt: int, output: int, max_model_len: int = 2048) -> tuple[int, int]:
    """The fitting rule written out for one request, independently of the vectorised code."""
    out = min(max(output, 1), max_model_len // 2)
    return min(max(prompt, 1), max_model_len - out), out


def check_wellformed(reqs: list[WorkloadRequest], max_model_len: int) -> None:
    assert [r.request_id for r in reqs] == [f"r{i:06d}" for i in range(len(reqs))]
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0.0
    for r in reqs:
        assert r.prompt_len >= 1 and r.output_len >= 1
        assert r.prompt_len + r.output_len <= max_model_len
        assert type(r.prompt_len) is int and type(r.output_len) is int and type(r.arrival_s) is float
