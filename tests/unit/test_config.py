"""The one config loader (accelgen.common.config) as each service uses it: precedence, the same
error for the same mistake everywhere, and the scheduler's [policy.accelgen] reaching the policy."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from accelgen.common.config import ConfigError, ConfigLoader
from accelgen.core.policies.accelgen import AccelGenPolicy
from accelgen.core.policies.accelgen_config import AccelGenConfig
from accelgen.core.policies.registry import make_policy
from accelgen.core.policies.vllm_fcfs import VLLMPolicy
from accelgen.core.slo import DEFAULT_CLASSES, SLOCatalog
from accelgen.profiles import load_profile
from gateway.config import LOADER as GATEWAY
from scheduler_service.config import LOADER as SCHEDULER
from scheduler_service.config import SchedulerConfig
from worker_service.config import LOADER as WORKER

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LOADERS = {"scheduler": SCHEDULER, "worker": WORKER, "gateway": GATEWAY}
# Per service: three number settings (file / env / flag) and one whose default must survive.
FIELDS = {"scheduler": ("port", "max_queue", "max_num_seqs", "finished_ttl_s"),
          "worker": ("port", "vocab_size", "eos_token_id", "seed"),
          "gateway": ("submit_timeout_s", "rpc_timeout_s", "server_info_ttl_s", "grace_s")}
PORT = {"scheduler": "port", "worker": "port", "gateway": "grpc_port"}


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(capsys: pytest.CaptureFixture[str], loader: ConfigLoader, argv: list[str], env: dict[str, str]) -> str:
    """What the service's command line prints for a mistake (and that it exits 2)."""
    with pytest.raises(SystemExit) as exit_:
        loader.main_config(argv, env)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# -- precedence ----------------------------------------------------------------------------------
@pytest.mark.parametrize("service", list(LOADERS))
def test_defaults_then_file_then_env_then_flags(service: str, tmp_path: Path) -> None:
    loader = LOADERS[service]
    in_file, in_env, on_flag, untouched = FIELDS[service]
    a, b, c = (next(s for s in loader.settings if s.name == n) for n in (in_file, in_env, on_flag))
    path = _write(tmp_path, f"{a.name} = 1101\n{b.name} = 1102\n{c.name} = 1103\n")
    env = {b.env: "2202", c.env: "2203", loader.config_env: str(path)}
    cfg = loader.parse([c.flag, "3303"], env)
    assert (getattr(cfg, in_file), getattr(cfg, in_env), getattr(cfg, on_flag)) == (1101, 2202, 3303)
    assert getattr(cfg, untouched) == getattr(loader.cls(), untouched)
    # The file named by ACCELGEN_<SERVICE>_CONFIG, or by --config, which wins over it.
    assert getattr(loader.parse([], {loader.config_env: str(path)}), in_file) == 1101
    other = _write(tmp_path, f"{a.name} = 1201\n", "other.toml")
    assert getattr(loader.parse(["--config", str(other)], {loader.config_env: str(path)}), in_file) == 1201
    assert getattr(loader.parse([], {}), in_file) == getattr(loader.cls(), in_file)


def test_env_and_flag_names_are_the_field_names() -> None:
    for service, loader in LOADERS.items():
        for s in loader.settings:
            assert s.env == f"ACCELGEN_{service.upper()}_{s.name.upper()}"
            assert s.flag == "--" + s.name.replace("_", "-")
        help_text = " ".join(loader.parser().format_help().split())
        port = loader.setting(PORT[service])
        assert f"(env {port.env}; default {port.default})" in help_text
    # The ones deploy/, launcher/stack.py and the tests pass keep working.
    assert WORKER.parse(["--scheduler", "s:1", "--worker-id", "w", "--time-scale", "0", "--insecure",
                         "--host", "0.0.0.0"], {}).worker_id == "w"
    assert GATEWAY.parse(["--scheduler-address", "s:2", "--insecure"], {"ACCELGEN_GATEWAY_HTTP_PORT": "-1"}).http_port == -1
    assert SCHEDULER.parse(["--redis-url", "redis://r/1", "--policy", "vllm@512"], {}).policy == "vllm@512"


def test_types_parse_the_same_way_from_env_and_flags() -> None:
    for raw, want in (("yes", True), ("off", False), ("1", True), ("False", False)):
        assert SCHEDULER.parse([], {"ACCELGEN_SCHEDULER_ADMISSION": raw}).admission is want
        assert SCHEDULER.parse(["--admission", raw], {}).admission is want
    assert GATEWAY.parse([], {"ACCELGEN_GATEWAY_MODEL": "none"}).model is None
    assert GATEWAY.parse(["--model", "/m"], {"ACCELGEN_GATEWAY_MODEL": "none"}).model == "/m"
    assert GATEWAY.parse(["--model", ""], {}).model is None
    knee = SCHEDULER.parse(["--policy-accelgen-budget-knee-fraction", "0.8"], {})
    assert knee.policy_accelgen.budget.knee_fraction == 0.8
    classes = {"chat": {"ttft_ms": 500, "tbt_ms": 40}}
    from_env = SCHEDULER.parse([], {"ACCELGEN_SCHEDULER_CLASSES": json.dumps(classes)})
    from_flag = SCHEDULER.parse(["--classes", json.dumps(classes)], {})
    assert from_env.classes == from_flag.classes == classes
    assert from_env.catalog().get("chat").slo.tbt_s == 0.04


# -- the same mistake, the same error ----------------------------------------------------------
@pytest.mark.parametrize("service", list(LOADERS))
def test_same_mistake_same_message(service: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loader, port = LOADERS[service], LOADERS[service].setting(PORT[service])
    prefix = f"accelgen {service}: config error: "
    assert _error(capsys, loader, [], {port.env: "x"}) == f"{prefix}{port.env}='x' is not a valid int"
    assert _error(capsys, loader, [], {port.env: "1.5"}) == f"{prefix}{port.env}='1.5' is not a valid int"
    # A bad flag value: argparse's own error (same exit status).
    assert _error(capsys, loader, [port.flag, "x"], {}) == \
        f"accelgen {service}: error: argument {port.flag}: invalid int value: 'x'"
    path = _write(tmp_path, "bogus = 1\n")
    message = _error(capsys, loader, ["--config", str(path)], {})
    known = ", ".join(sorted({s.files[0].split(".")[0] for s in loader.settings}))
    assert message == f"{prefix}{path}: unknown field 'bogus'; known: {known}"
    path = _write(tmp_path, f'{port.name} = "x"\n')
    assert _error(capsys, loader, ["--config", str(path)], {}) == f"{prefix}{path}: {port.name}='x' is not a valid int"
    path = _write(tmp_path, f"{port.name} = true\n")
    assert _error(capsys, loader, ["--config", str(path)], {}) == f"{prefix}{path}: {port.name}=True is not a valid int"
    path = _write(tmp_path, f"{port.name} = ")
    assert _error(capsys, loader, ["--config", str(path)], {}).startswith(f"{prefix}{path}: not valid TOML: ")
    missing = tmp_path / "missing.toml"
    assert _error(capsys, loader, [], {loader.config_env: str(missing)}) == \
        f"{prefix}{missing}: cannot read the config file: No such file or directory"
    # The dataclass's own validation, one line, naming where the value came from.
    assert _error(capsys, loader, [port.flag, "70000"], {}) == \
        f"{prefix}{port.name} must be in [0, 65535], got 70000 ({port.name} from {port.flag})"
    assert _error(capsys, loader, [], {port.env: "-5"}) == \
        f"{prefix}{port.name} must be in [0, 65535], got -5 ({port.name} from {port.env})"


def test_main_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.main import main as gateway_main
    from worker_service.main import main as worker_main

    monkeypatch.setenv("ACCELGEN_WORKER_PORT", "x")
    with pytest.raises(SystemExit) as exit_:
        worker_main([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "accelgen worker: config error: ACCELGEN_WORKER_PORT='x' is not a valid int\n"
    with pytest.raises(SystemExit) as exit_:
        gateway_main(["--slo-tbt-ms-min", "100", "--slo-tbt-ms-max", "10"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("accelgen gateway: config error: slo_tbt_ms_min (100.0) must not exceed")


def test_scheduler_main_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    from scheduler_service.main import main as scheduler_main

    with pytest.raises(SystemExit) as exit_:
        scheduler_main(["--heartbeat-ttl-s", "0.5"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("accelgen scheduler: config error: heartbeat_ttl_s must exceed "
                                       "heartbeat_interval_s (heartbeat_ttl_s from --heartbeat-ttl-s)\n")


# -- the scheduler's file: classes and the policy ---------------------------------------------
def test_classes_table_and_policy_name_forms(tmp_path: Path) -> None:
    path = _write(tmp_path, 'policy = "vllm"\n[classes.chat]\nttft_ms = 800\ntbt_ms = 40\n[classes.batch]\njct_ms = 5000\n')
    cfg = SCHEDULER.load(path, env={})
    assert cfg.policy == "vllm" and [c.name for c in cfg.catalog().classes] == ["chat", "batch"]
    assert cfg.catalog().get("batch").slo.jct_s == 5.0
    assert SCHEDULER.load(_write(tmp_path, '[policy]\nname = "sarathi@256"\n'), env={}).policy == "sarathi@256"
    as_json = _write(tmp_path, json.dumps({"policy": {"name": "accelgen", "accelgen": {"era_cap": 2}},
                                           "classes": {"chat": {"ttft_ms": 300, "tbt_ms": 20}}}), "c.json")
    cfg = SCHEDULER.load(as_json, env={})
    assert cfg.policy_accelgen.era_cap == 2 and cfg.catalog().get("chat").slo.tbt_s == 0.02
    with pytest.raises(ConfigError, match=r"class 'chat': expected a table of jct_ms, tbt_ms, ttft_ms, got unknown key"):
        SCHEDULER.load(_write(tmp_path, "[classes.chat]\ntbt = 40\n"), env={})


def _policy_file(tmp_path: Path, body: str) -> Path:
    return _write(tmp_path, '[policy]\nname = "accelgen"\n' + body)


def test_policy_settings_reach_the_policy(tmp_path: Path) -> None:
    path = _policy_file(tmp_path, "[policy.accelgen]\ncandidate_window = 7\nvictim = \"slo\"\nera_cap = 2\n"
                                  "[policy.accelgen.budget]\nsafety_margin = 0.1\n"
                                  "[policy.accelgen.admission_config]\nslack = 1.5\n")
    env = {"ACCELGEN_SCHEDULER_POLICY_ACCELGEN_ERA_CAP": "3", "ACCELGEN_SCHEDULER_POLICY_ACCELGEN_TRIAGE": "false"}
    cfg = SCHEDULER.parse(["--config", str(path), "--policy-accelgen-era-cap", "4",
                           "--policy-accelgen-length-config-window", "64"], env)
    profile, catalog = load_profile(), SLOCatalog(DEFAULT_CLASSES)
    policy = cfg.make_policy(profile, catalog)
    assert isinstance(policy, AccelGenPolicy)
    pc = policy.config
    assert (pc.candidate_window, pc.victim, pc.era_cap, pc.triage) == (7, "slo", 4, False)
    assert (pc.budget.safety_margin, pc.length_config.window) == (0.1, 64)
    assert policy.admission is not None and policy.admission.config.slack == 1.5
    # Built as the simulator builds it (bench/compare.py: registry.make_policy(..., config=AccelGenConfig)).
    want = dataclasses.replace(AccelGenConfig(), candidate_window=7, victim="slo", era_cap=4, triage=False,
                               budget=dataclasses.replace(AccelGenConfig().budget, safety_margin=0.1),
                               admission_config=dataclasses.replace(AccelGenConfig().admission_config, slack=1.5),
                               length_config=dataclasses.replace(AccelGenConfig().length_config, window=64))
    assert pc == want == make_policy("accelgen", profile, catalog, config=want).config
    # accelgen+admission keeps the settings; the scheduler's own switch still turns admission off.
    plus = dataclasses.replace(cfg, policy="accelgen+admission").make_policy(profile, catalog)
    assert plus.config.candidate_window == 7 and plus.config.admission
    assert dataclasses.replace(cfg, admission=False).make_policy(profile, catalog).admission is None
    # Another policy ignores them (it has its own NAME@BUDGET).
    assert isinstance(dataclasses.replace(cfg, policy="vllm@512").make_policy(profile, catalog), VLLMPolicy)


@pytest.mark.parametrize("body, message", [
    ("[policy.accelgen]\ncandidate_windw = 3\n",
     r"unknown field 'policy\.accelgen\.candidate_windw' in \[policy\.accelgen\]; known: adaptive_margin, admission, "
     r"admission_config, budget, candidate_window, .*, victim$"),
    ("[policy.accelgen.budget]\nmargin = 0.1\n",
     r"unknown field 'policy\.accelgen\.budget\.margin' in \[policy\.accelgen\.budget\]; known: guard_with_profile, "
     r"knee_fraction, max_forward_tokens, safety_margin$"),
    ('[policy.accelgen]\ncandidate_window = "many"\n', r"policy\.accelgen\.candidate_window='many' is not a valid int$"),
    ("[policy.accelgen]\ntriage = 1\n", r"policy\.accelgen\.triage=1 is not a valid bool$"),
    ("[policy.accelgen]\nbudget = 3\n", r"policy\.accelgen\.budget is a table \(\[policy\.accelgen\.budget\]\), not a value$"),
    ("[policy.accelgen]\ncandidate_window = 0\n", r"\[policy\.accelgen\] candidate_window must be a whole number >= 1, "
                                                  r"got 0 \(candidate_window from .*c\.toml\)$"),
    ("[policy.accelgen]\nkv_headroom_tokens = -1\n", r"kv_headroom_tokens must be a whole number >= 0, got -1"),
    ("[policy.accelgen]\njct_expected_output_tokens = 0\n", r"jct_expected_output_tokens must be a whole number >= 1"),
    ('[policy.accelgen]\nvictim = "oldest"\n', r"victim must be one of vllm, slo, got 'oldest'"),
    ("[policy.accelgen.budget]\nsafety_margin = 1.5\n", r"\[policy\.accelgen\.budget\] safety_margin must be in \[0, 1\)"),
    ("[policy.accelgen.admission_config]\nslack = 0\n", r"\[policy\.accelgen\.admission_config\] admission slack must be > 0"),
    ("[policy.vllm]\nmax_num_batched_tokens = 512\n",
     r"\[policy\.vllm\]: the vllm policy has no settings \(only \[policy\.accelgen\] can be set\)$"),
    ("[policy.sarathi]\n", r"\[policy\.sarathi\]: the sarathi policy has no settings"),
    ("[policy.fastest]\nx = 1\n", r"\[policy\.fastest\]: unknown policy 'fastest'"),
])
def test_bad_policy_settings_are_refused_at_start_up(tmp_path: Path, body: str, message: str) -> None:
    path = _policy_file(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as err:
        SCHEDULER.load(path, env={})
    assert "\n" not in str(err.value)


def test_bad_policy_values_from_env_and_flags() -> None:
    with pytest.raises(ConfigError, match=r"^ACCELGEN_SCHEDULER_POLICY_ACCELGEN_CANDIDATE_WINDOW='x' is not a valid int$"):
        SCHEDULER.parse([], {"ACCELGEN_SCHEDULER_POLICY_ACCELGEN_CANDIDATE_WINDOW": "x"})
    with pytest.raises(ConfigError, match=r"^\[policy\.accelgen\.budget\] knee_fraction must be in \(0, 1\] "
                                          r"\(knee_fraction from --policy-accelgen-budget-knee-fraction\)$"):
        SCHEDULER.parse(["--policy-accelgen-budget-knee-fraction", "2"], {})
    with pytest.raises(SystemExit):
        SCHEDULER.parse(["--policy-accelgen-triage", "maybe"], {})


def test_deploy_scheduler_toml_is_the_defaults() -> None:
    toml = REPO / "deploy" / "scheduler.toml"
    cfg = SCHEDULER.load(toml, env={})
    default = SchedulerConfig()
    assert cfg.policy == default.policy and cfg.admission == default.admission
    assert cfg.policy_accelgen == AccelGenConfig() == default.policy_accelgen
    assert cfg.catalog() == default.catalog() == SLOCatalog(DEFAULT_CLASSES)
    profile = load_profile(cfg.profile)
    built, from_defaults = cfg.make_policy(profile, cfg.catalog()), default.make_policy(profile, default.catalog())
    assert type(built) is type(from_defaults) is AccelGenPolicy and built.config == from_defaults.config
    # Every accelgen setting is written out (knee_fraction only in a comment: TOML has no "unset").
    data = tomllib.loads(toml.read_text())
    written = {f for s in SCHEDULER.settings for f in s.files} & {".".join(["policy", "accelgen", *path]) for path in _leaves(data["policy"]["accelgen"])}
    wanted = {s.files[0] for s in SCHEDULER.settings if s.table.startswith("policy.accelgen")}
    assert wanted - written == {"policy.accelgen.budget.knee_fraction"}
    assert "# knee_fraction = 0.95" in toml.read_text()


def _leaves(table: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in table.items():
        out.extend(_leaves(value, prefix + (key,)) if isinstance(value, dict) else [prefix + (key,)])
    return out


def test_loader_rejects_what_it_cannot_read() -> None:
    @dataclasses.dataclass
    class Odd:
        items: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="unsupported config type"):
        ConfigLoader(Odd, "odd")
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        WORKER.load(env={}, flags={"nope": 1})
