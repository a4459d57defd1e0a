"""The `accelgen` command line: output shapes a user scripts against, and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main
from bench import overhead

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "traces_sample"
HEADLINE = {"throughput_tok_s", "goodput_tok_s", "slo_attainment", "p99_tbt_ms", "mean_jct_s",
            "compute_util", "kv_util", "sched_ms_p99"}


@pytest.fixture(autouse=True)
def sample_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELGEN_TRACES_DIR", str(SAMPLE))


@pytest.mark.unit
def test_sim_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    rc = main(["sim", "--workload", "paper-mix", "--rate", "1", "--duration", "20",
               "--policies", "accelgen,vllm", "--json", str(out), "--plot", str(png), "--jobs", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["rate"] == 1.0 and data["config"]["workload"] == "paper-mix"
    assert set(data["policies"]) == {"accelgen", "vllm"}
    for row in data["policies"].values():
        assert HEADLINE <= set(row)
        assert row["throughput_tok_s"] > 0 and 0 <= row["slo_attainment"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "accelgen" in printed and "vllm" in printed


@pytest.mark.unit
def test_sweep_reports_one_row_per_rate(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    rc = main(["sim", "--rate", "1", "--duration", "15", "--policies", "sarathi", "--sweep-rate", "0.5,1.5",
               "--json", str(out), "--jobs", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["sweep"]["rates"] == [0.5, 1.5]
    rows = data["sweep"]["policies"]["sarathi"]
    assert len(rows) == 2
    # More load, more requests simulated.
    assert rows[1]["num_requests"] > rows[0]["num_requests"]


@pytest.mark.unit
def test_sim_json_has_request_goodput_and_per_class_keys(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    rc = main(["sim", "--rate", "2", "--duration", "15", "--policies", "vllm@512,vllm-priority",
               "--classes", "by-app", "--json", str(out), "--jobs", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["classes"] == "by-app" and data["config"]["time_noise"] == 0.05
    for row in data["policies"].values():
        assert row["request_goodput_rps"] >= 0
        assert set(row["slo_attainment_by_class"]) <= {"chat", "code", "summarization"}
        assert set(row["p99_tbt_ms_by_class"]) == set(row["slo_attainment_by_class"])


@pytest.mark.unit
def test_capacity_writes_a_rate_per_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cap.json"
    rc = main(["capacity", "--workload", "paper-mix", "--duration", "20", "--policies", "accelgen,vllm",
               "--target", "0.9", "--tolerance", "0.25", "--json", str(out), "--jobs", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["target"] == 0.9 and set(data["capacity_rps"]) == {"accelgen", "vllm"}
    for name, rate in data["capacity_rps"].items():
        probes = data["search"][name]["probes"]
        assert rate > 0 and any(p["load"] == rate and p["attainment"] >= 0.9 for p in probes)
        # and the search saw a failing load above it (bracketed)
        assert any(p["load"] > rate and p["attainment"] < 0.9 for p in probes)
    assert "capacity (req/s)" in capsys.readouterr().out


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["sim", "--policies", "fifo"], "unknown policy"),
    (["sim", "--policies", "accelgen@512"], "static budget"),
    (["capacity", "--policies", "vllm+eager"], "+admission"),
    (["sim", "--sweep-rate", "1,x"], "comma-separated numbers"),
    (["sim", "--slo-mix", "chat=-1"], "chat"),
])
def test_bad_arguments_exit_with_a_message(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.unit
def test_overhead_benchmark_times_every_policy() -> None:
    results = overhead.run([10], repeats=5, with_vllm=False)
    assert set(results["policies"]) == {"accelgen", "vllm", "vllm-priority", "sarathi", "edf", "oracle"}
    for per_size in results["policies"].values():
        assert per_size["10"]["p50_ms"] > 0
        assert per_size["10"]["p99_ms"] >= per_size["10"]["p50_ms"]
    assert "p50 ms" in overhead.format_results(results)


def test_unmeasured_metrics_print_as_a_dash_not_zero() -> None:
    from bench.compare import format_table

    row = {"throughput_tok_s": 10.0, "goodput_tok_s": 9.0, "slo_attainment": 0.5, "p99_tbt_ms": 40.0,
           "p50_ttft_ms": 100.0, "mean_jct_s": 2.0, "compute_util": None, "kv_util": None, "preemptions": None,
           "sched_ms_p99": None}
    line = format_table({"service": row}).splitlines()[-1]
    assert line.split()[-4:] == ["-", "-", "-", "-"] and "0.00" not in line


@pytest.mark.unit
def test_profile_reads_the_worker_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`accelgen profile` builds its executor from the worker's settings, read as the worker reads them."""
    import worker_service.executors.registry as registry

    class Built(Exception):
        pass

    seen = []

    def capture(config):
        seen.append(config)
        raise Built

    monkeypatch.setattr(registry, "executor_from_config", capture)
    monkeypatch.setenv("ACCELGEN_WORKER_SEED", "5")
    monkeypatch.setenv("ACCELGEN_WORKER_VOCAB_SIZE", "500")
    with pytest.raises(Built):  # --debug: the error itself, traceback and all
        main(["--debug", "profile", "--out", str(tmp_path / "p.json"), "--executor", "sim", "--vocab-size", "999"])
    assert (seen[0].executor, seen[0].vocab_size, seen[0].seed) == ("sim", 999, 5)
    capsys.readouterr()
    # Without it, an unexpected error is one line that says how to see the traceback.
    assert main(["profile", "--out", str(tmp_path / "p.json"), "--executor", "sim"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("accelgen profile: error: Built") and "--debug" in err
    monkeypatch.setenv("ACCELGEN_WORKER_PORT", "x")
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--out", str(tmp_path / "p.json")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "accelgen worker: config error: ACCELGEN_WORKER_PORT='x' is not a valid int\n"


# -- errors are one line -------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("args, fragment", [
    (["sim", "--trace", str(SAMPLE / "azure_llm_2023_code__AzurePublicDataset.csv")], "add --workload trace"),
    (["sim", "--workload", "trace"], "--workload trace needs --trace FILE"),
    (["capacity", "--workload", "trace", "--trace", "nope.csv"], "--trace nope.csv: no such file"),
    (["sim", "--profile", "nope", "--duration", "5", "--policies", "accelgen", "--jobs", "1"], "no device profile"),
    (["sim", "--rate", "0"], "--rate must be > 0"),
    (["up", "--config", "/nonexistent/up.toml"], "cannot read the config file"),
    (["up", "--worker-max-num-seqs", "x"], "--worker-max-num-seqs 'x' is not a valid int"),
    (["drain", "w1", "--scheduler", "127.0.0.1:1"], "no scheduler answers at 127.0.0.1:1"),
])
def test_errors_are_one_line_without_a_traceback(args: list[str], fragment: str) -> None:
    """As a user runs it: a process, its stderr. Every mistake says what to change in one line."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(repo), "ACCELGEN_TRACES_DIR": str(SAMPLE)})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"accelgen {args[0]}: error: ") and fragment in done.stderr, done.stderr


# -- accelgen up: every service setting --------------------------------------------------------
def _up_args(*argv: str):
    from launcher.cli import build_parser

    return build_parser().parse_args(["up", *argv])


@pytest.mark.unit
def test_up_passes_every_service_setting_and_config_tables(tmp_path: Path) -> None:
    from gateway.config import LOADER as GATEWAY
    from launcher.up_options import service_args
    from scheduler_service.config import LOADER as SCHEDULER
    from worker_service.config import LOADER as WORKER

    up_toml = tmp_path / "up.toml"
    up_toml.write_text('[worker]\nkv_cache_space_gb = 2.5\ndtype = "bfloat16"\n\n[scheduler]\nmax_queue = 77\n\n'
                       '[gateway]\nkey_burst = 9\n')
    args = _up_args("--config", str(up_toml), "--worker-dtype", "float32", "--worker-max-num-seqs", "8",
                    "--worker-drain-grace-s", "45", "--scheduler-pipeline", "false", "--gateway-api-key", "k1" * 16,
                    "--gateway-api-key", "k2" * 16)
    extra = service_args(args, tmp_path)
    # Each service reads its part as it reads its own flags and file: the flag beats the file.
    worker = WORKER.parse([*extra.worker, "--scheduler", "127.0.0.1:1"], env={})
    assert (worker.dtype, worker.max_num_seqs, worker.kv_cache_space_gb, worker.drain_grace_s) == ("float32", 8, 2.5, 45)
    scheduler = SCHEDULER.parse(extra.scheduler, env={})
    assert (scheduler.max_queue, scheduler.pipeline) == (77, False)
    gateway = GATEWAY.parse(extra.gateway, env={})
    assert (gateway.key_burst, gateway.api_key) == (9, ["k1" * 16, "k2" * 16])


@pytest.mark.unit
def test_up_has_a_flag_for_every_worker_setting_the_stack_does_not_set() -> None:
    from launcher.up_options import STACK_SET
    from worker_service.config import LOADER as WORKER

    dests = vars(_up_args())
    for setting in WORKER.settings:
        assert (f"worker__{setting.name}" in dests) != (setting.name in STACK_SET["worker"]), setting.name


@pytest.mark.unit
@pytest.mark.parametrize("toml, flags, fragment", [
    ("[worker]\nbogus = 1\n", [], "[worker]: unknown field 'bogus'"),
    ("[workers]\ndtype = 'auto'\n", [], "unknown table(s) workers"),
    ("[worker]\ndtype = 'auto'\n", ["--worker-config", "w.toml"], "in one place"),
    ("[scheduler]\nmax_queue = 'many'\n", [], "max_queue='many' is not a valid int"),
])
def test_up_config_mistakes_stop_it_before_anything_starts(tmp_path: Path, toml: str, flags: list[str],
                                                           fragment: str) -> None:
    from accelgen.common.config import ConfigError
    from launcher.up_options import service_args

    (tmp_path / "up.toml").write_text(toml)
    (tmp_path / "w.toml").write_text("")
    flags = [str(tmp_path / f) if f.endswith(".toml") else f for f in flags]
    with pytest.raises(ConfigError) as exc:
        service_args(_up_args("--config", str(tmp_path / "up.toml"), *flags), tmp_path)
    assert fragment in str(exc.value)

