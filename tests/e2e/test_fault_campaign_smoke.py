"""The fault campaign's pipeline, end to end on a tiny scale: real processes under the
campaign's restart loop, real kill -9 of a worker and of the scheduler under load, a fault-free
reference run, and the verdict: nothing accepted is lost and every greedy output is identical.
(``make faults`` runs the full campaign; this keeps its harness working.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults.campaign import Settings, run_campaign
from bench.faults.report import render
from bench.faults.verdict import summarize

pytestmark = pytest.mark.e2e


def test_kills_under_load_lose_nothing_and_change_no_output(tmp_path: Path) -> None:
    settings = Settings(seed=7, faults={"kill_worker": 2, "kill_scheduler": 1}, concurrency=4, gap_s=(0.3, 1.0),
                        warmup_s=1.5, time_scale=0.1, drain_timeout_s=60.0, out_dir=tmp_path)
    summary = summarize(run_campaign(settings))
    by_class = {c["class"]: c for c in summary["classes"]}
    for name, faults in settings.faults.items():
        c = by_class[name]
        assert c["status"] == "run", c
        assert c["faults"] == faults and c["not_recovered"] == 0, c
        r = c["requests"]
        assert r["accepted"] > 0 and r["no_reference"] == 0, c
        assert r["lost"] == 0, f"{name}: lost {c['lost_ids']} ({c['lost_by_status']})"
        assert r["differing"] == 0, f"{name}: outputs differ: {c['differing_ids']}"
        assert c["ready_s"]["max"] is not None and c["serving_s"]["max"] is not None, c
    assert by_class["kill_worker"]["restarts"]["worker-0"] + by_class["kill_worker"]["restarts"]["worker-1"] == 2
    assert by_class["kill_scheduler"]["exit_codes"]["scheduler-0"] == [-9]
    doc = render(summary)
    assert "| `kill_worker` |" in doc and "Fuzzing" in doc
