"""Worker pieces without a network: plan conversion, the request table, the sim executor,
the epoch guard, config and the executor registry."""

from __future__ import annotations

import json

import pytest

from accelgen.v1 import common_pb2, worker_pb2
from accelgen.core.request import SamplingParams
from accelgen.profiles import load_profile
from worker_service.config import LOADER, WorkerConfig
from accelgen.wire.worker_info import worker_info_from_proto, worker_info_to_proto
from worker_service.convert import plan_from_proto, plan_to_proto
from worker_service.executors import executor_class, make_executor, register_executor
from worker_service.executors import registry as registry_module
from worker_service.executors.sim import SimExecutor, sim_token
from worker_service.plan import ChunkSpec, WorkerPlan
from worker_service.server import PlanRunner

pytestmark = pytest.mark.unit

PROFILE = load_profile()
GREEDY = SamplingParams(max_tokens=16)


def new_chunk(rid: str, prompt: list[int], blocks: list[int], samples: bool = True, computed: int = 0,
              outputs: int = 0, prompt_len: int | None = None) -> ChunkSpec:
    return ChunkSpec(rid, computed, prompt, list(blocks), True, list(blocks), GREEDY, samples, outputs,
                     len(prompt) if prompt_len is None else prompt_len)


def next_chunk(rid: str, computed: int, tokens: list[int], new_blocks: list[int] = (), samples: bool = True) -> ChunkSpec:
    return ChunkSpec(rid, computed, tokens, list(new_blocks), False, [], None, samples, 0, 0)


def plan(*chunks: ChunkSpec, iteration: int = 1, epoch: str = "e1", freed: list[str] = ()) -> WorkerPlan:
    return WorkerPlan(iteration, epoch, list(chunks), list(freed), 0.0)


def sim(**kw) -> SimExecutor:
    return SimExecutor(PROFILE, **{"time_scale": 0.0, **kw})


# -- the sim executor ------------------------------------------------------------------------
def test_sim_samples_exactly_the_sampling_chunks_with_the_hash_token():
    ex = sim()
    out = ex.execute(plan(new_chunk("a", [5, 6, 7], [1]), new_chunk("b", [8] * 200, [2, 3], samples=False, prompt_len=256)))
    assert out.sampled_token_ids == {"a": sim_token("a", 0)}
    assert out.iteration == 1 and out.elapsed_s == 0.0
    assert 10 <= out.sampled_token_ids["a"] < 50272
    out2 = ex.execute(plan(next_chunk("a", 3, [out.sampled_token_ids["a"]]), next_chunk("b", 200, [8] * 56),
                           iteration=2))
    assert out2.sampled_token_ids == {"a": sim_token("a", 1), "b": sim_token("b", 0)}


def test_sim_tokens_are_deterministic_and_survive_recompute():
    first = [sim().execute(plan(new_chunk("r", [1, 2, 3, 4], [7]))).sampled_token_ids for _ in range(2)]
    assert first[0] == first[1]
    ex = sim()
    t0 = ex.execute(plan(new_chunk("r", [1, 2, 3, 4], [7]))).sampled_token_ids["r"]
    t1 = ex.execute(plan(next_chunk("r", 4, [t0]), iteration=2)).sampled_token_ids["r"]
    # Preempted by recompute: freed, then resent with prompt + output so far from position 0.
    again = ex.execute(plan(new_chunk("r", [1, 2, 3, 4, t0, t1], [9], outputs=2, prompt_len=4),
                            freed=["r"], iteration=3))
    assert again.sampled_token_ids["r"] == sim_token("r", 2)
    assert sim_token("r", 1) == t1


def test_sim_rejects_unknown_request_and_new_with_computed_tokens():
    ex = sim()
    with pytest.raises(ValueError, match=r"chunks\[0\] \(request 'ghost'\).*unknown to this worker"):
        ex.execute(plan(next_chunk("ghost", 4, [1])))
    with pytest.raises(ValueError, match="'late'.*is_new with num_computed_tokens=3"):
        ex.execute(plan(new_chunk("late", [1, 2], [1], computed=3, prompt_len=2, outputs=3)))


def test_sim_freed_requests_are_forgotten_and_rejected_plans_change_nothing():
    ex = sim()
    ex.execute(plan(new_chunk("a", [1, 2], [1]), new_chunk("b", [3], [2]), new_chunk("d", [3], [3])))
    assert "a" in ex.requests and "b" in ex.requests
    ex.execute(plan(next_chunk("b", 1, [sim_token("b", 0)]), freed=["a", "never-seen"], iteration=2))
    assert "a" not in ex.requests
    with pytest.raises(ValueError, match="'a'.*unknown"):
        ex.execute(plan(next_chunk("a", 2, [5]), iteration=3))
    # Atomic: the good chunk before the bad one did not advance, the freed id was not freed.
    with pytest.raises(ValueError, match="block id 9999"):
        ex.execute(plan(next_chunk("b", 2, [sim_token("b", 1)]), new_chunk("c", [1], [9999]), freed=["d"], iteration=4))
    assert ex.requests.get("b").num_computed_tokens == 2 and "c" not in ex.requests and "d" in ex.requests


def test_sim_checks_blocks_context_and_vocab():
    ex = sim()
    with pytest.raises(ValueError, match="block id 0 .*null block"):
        ex.execute(plan(new_chunk("z", [1], [0])))
    with pytest.raises(ValueError, match="129 tokens need 2 blocks of 128, its block table has 1"):
        ex.execute(plan(new_chunk("big", [1] * 129, [1])))
    with pytest.raises(ValueError, match="not below vocab_size"):
        ex.execute(plan(new_chunk("v", [60000], [1])))
    with pytest.raises(ValueError, match="beyond max_model_len=2048"):
        ex.execute(plan(new_chunk("long", [1] * 2049, list(range(1, 18)))))
    ex.execute(plan(new_chunk("g", [1] * 128, [1], samples=False, prompt_len=300)))
    with pytest.raises(ValueError, match="needs|need 2 blocks"):
        ex.execute(plan(next_chunk("g", 128, [1], samples=False), iteration=2))
    ex.execute(plan(next_chunk("g", 128, [1], new_blocks=[2], samples=False), iteration=2))
    with pytest.raises(ValueError, match="num_computed_tokens=200 but only 129 KV entries"):
        ex.execute(plan(next_chunk("g", 200, [1], samples=False), iteration=3))


def test_sim_samples_exactly_where_vllm_would():
    ex = sim()
    with pytest.raises(ValueError, match="samples=False but the chunk reaches"):
        ex.execute(plan(new_chunk("a", [1] * 8, [1], samples=False)))
    with pytest.raises(ValueError, match="samples=True but the chunk stops short"):
        ex.execute(plan(new_chunk("a", [1] * 8, [1], prompt_len=20)))
    with pytest.raises(ValueError, match="runs past prompt_len"):
        ex.execute(plan(new_chunk("a", [1] * 8, [1], prompt_len=4)))
    ex.execute(plan(new_chunk("a", [1] * 8, [1], samples=False, prompt_len=10)))
    with pytest.raises(ValueError, match="straddle"):
        ex.execute(plan(next_chunk("a", 8, [1, 1, 1]), iteration=2))
    ex.execute(plan(next_chunk("a", 8, [1, 1]), iteration=2))  # reaches the prompt's end: samples
    with pytest.raises(ValueError, match="not the tokens this worker sampled"):
        ex.execute(plan(next_chunk("a", 10, [sim_token("a", 0) + 1]), iteration=3))
    ex.execute(plan(next_chunk("a", 10, [sim_token("a", 0)]), iteration=3))


def test_sim_elapsed_follows_the_profile():
    chunks = [new_chunk("p", [1] * 64, [1]), new_chunk("q", [1] * 32, [2])]
    predicted = PROFILE.batch_time_s([(64, 0), (32, 0)])
    elapsed = SimExecutor(PROFILE, time_scale=1.0).execute(plan(*chunks)).elapsed_s
    assert 0.9 * predicted <= elapsed <= predicted + 0.25
    half = SimExecutor(PROFILE, time_scale=0.5).execute(plan(*chunks)).elapsed_s
    assert 0.45 * predicted <= half <= 0.5 * predicted + 0.25
    assert sim().execute(plan(*chunks)).elapsed_s == 0.0


def test_sim_describe_comes_from_the_profile():
    info = sim(vocab_size=1000, eos_token_id=7).describe()
    assert (info.executor, info.block_size, info.num_blocks, info.max_model_len) == ("sim", 128, PROFILE.num_blocks, 2048)
    assert (info.vocab_size, info.eos_token_id, info.model) == (1000, 7, PROFILE.name)
    assert json.loads(info.profile_json)["coefficients"] == PROFILE.to_dict()["coefficients"]
    assert worker_info_from_proto(worker_info_to_proto(info)) == info


def test_plan_runner_resets_on_epoch_change_only():
    runner = PlanRunner(sim())
    runner.run(plan(new_chunk("a", [1], [1]), epoch="one"))
    runner.run(plan(next_chunk("a", 1, [sim_token("a", 0)]), epoch="one", iteration=2))
    with pytest.raises(ValueError, match="unknown"):
        runner.run(plan(next_chunk("a", 2, [3]), epoch="two", iteration=1))
    assert runner.epoch == "two" and len(runner.executor.requests) == 0


# -- conversion ------------------------------------------------------------------------------
def proto_plan(**chunk_fields) -> worker_pb2.BatchPlan:
    fields = dict(request_id="r1", token_ids=[1, 2], is_new=True, block_table=[1], prompt_len=2, samples=True,
                  sampling_params=common_pb2.SamplingParams(temperature=0.5))
    fields.update(chunk_fields)
    return worker_pb2.BatchPlan(iteration=3, epoch="e", chunks=[worker_pb2.ScheduledChunk(**fields)])


def test_plan_round_trip_and_sampling_defaults():
    msg = proto_plan()
    p = plan_from_proto(msg, default_max_tokens=2048)
    c = p.chunks[0]
    assert c.sampling == SamplingParams(max_tokens=2048, temperature=0.5, top_p=1.0)
    assert (c.token_ids, c.block_table, c.prompt_len, c.samples, c.is_new) == ([1, 2], [1], 2, True, True)
    assert plan_from_proto(plan_to_proto(p), default_max_tokens=2048) == p


@pytest.mark.parametrize("change, message", [
    (dict(token_ids=[]), r"chunks\[0\] \(request 'r1'\)\.token_ids is empty"),
    (dict(sampling_params=None), r"'r1'\)\.sampling_params is missing"),
    (dict(prompt_len=0), r"prompt_len must be > 0"),
    (dict(block_table=[]), r"block_table is empty"),
    (dict(num_computed_tokens=5), r"exceeds prompt_len \+ num_output_tokens = 2"),
    (dict(sampling_params=common_pb2.SamplingParams(temperature=-1)), r"sampling_params: temperature must be >= 0"),
    (dict(request_id=""), r"chunks\[0\]\.request_id is empty"),
])
def test_plan_validation_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        plan_from_proto(proto_plan(**change))


def test_plan_validation_of_plan_level_fields():
    msg = proto_plan()
    msg.chunks.append(msg.chunks[0])
    with pytest.raises(ValueError, match=r"chunks\[1\]: request 'r1' appears twice"):
        plan_from_proto(msg)
    with pytest.raises(ValueError, match="epoch is empty"):
        plan_from_proto(worker_pb2.BatchPlan(iteration=1))
    with pytest.raises(ValueError, match="predicted_time_s"):
        plan_from_proto(worker_pb2.BatchPlan(iteration=1, epoch="e", predicted_time_s=-1))
    with pytest.raises(ValueError, match=r"freed_request_ids\[0\] is empty"):
        plan_from_proto(worker_pb2.BatchPlan(iteration=1, epoch="e", freed_request_ids=[""]))


# -- config and registry ---------------------------------------------------------------------
def test_config_precedence_defaults_env_flags(tmp_path):
    env = {"ACCELGEN_WORKER_PORT": "7001", "ACCELGEN_WORKER_TIME_SCALE": "0.5", "ACCELGEN_WORKER_WORKER_ID": "w-env"}
    cfg = LOADER.parse(["--port", "7002", "--scheduler", "sched:1", "--host", "0.0.0.0", "--insecure"], env=env)
    assert (cfg.port, cfg.time_scale, cfg.worker_id, cfg.scheduler, cfg.executor) == (7002, 0.5, "w-env", "sched:1", "sim")
    assert LOADER.parse([], env={}).worker_id  # hostname-pid
    with pytest.raises(ValueError, match="ACCELGEN_WORKER_PORT='x' is not a valid int"):
        LOADER.parse([], env={"ACCELGEN_WORKER_PORT": "x"})
    with pytest.raises(ValueError, match="time_scale must be >= 0"):
        WorkerConfig(time_scale=-1)
    # A config file (new for the worker), below the environment and the flags.
    path = tmp_path / "worker.toml"
    path.write_text('executor = "sim"\nport = 7000\nvocab_size = 1000\ntime_scale = 2\n')
    cfg = LOADER.parse(["--port", "7002"], env={**env, "ACCELGEN_WORKER_CONFIG": str(path)})
    assert (cfg.port, cfg.time_scale, cfg.vocab_size) == (7002, 0.5, 1000)
    path.write_text("time_scale = -1\n")  # an int where a float goes is fine; the range check speaks
    with pytest.raises(ValueError, match=r"^time_scale must be >= 0, got -1.0 \(time_scale from .*worker\.toml\)$"):
        LOADER.parse([], env={"ACCELGEN_WORKER_CONFIG": str(path)})
    # The old entry point (kept for its callers) is the same loader.
    assert WorkerConfig.from_env_and_args(["--seed", "3"], env={}).seed == 3


def test_config_advertised_address():
    assert WorkerConfig(host="127.0.0.1").advertised_address(5) == "127.0.0.1:5"
    assert WorkerConfig(host="0.0.0.0", advertise_host="gpu3", insecure=True).advertised_address(5) == "gpu3:5"
    assert WorkerConfig(host="::1").advertised_address(5) == "[::1]:5"
    # A wildcard bind advertises the local address on the route to the scheduler.
    assert WorkerConfig(host="0.0.0.0", scheduler="127.0.0.1:9", insecure=True).advertised_address(5) == "127.0.0.1:5"


def test_registry_by_name():
    ex = make_executor("sim", profile=PROFILE, time_scale=0.0)
    assert isinstance(ex, SimExecutor) and executor_class("sim") is SimExecutor
    with pytest.raises(ValueError, match="unknown executor 'nope'; choose from .*sim"):
        make_executor("nope")
    register_executor("broken", "no_such_module_here:Thing")
    try:
        with pytest.raises(ValueError, match="executor 'broken' is not available here"):
            executor_class("broken")
    finally:
        registry_module._EXECUTORS.pop("broken")
