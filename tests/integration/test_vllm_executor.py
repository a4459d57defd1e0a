"""The vLLM executor, driven one plan at a time, against ``vllm.LLM.generate``.

One engine serves every test (a session-scoped fixture: building it costs seconds on a
2-core machine), on the tiny seeded OPT from ``scripts/make_test_model.py``. The reference
outputs come from ``vllm.LLM.generate`` on the same model and prompts, computed once in a
subprocess (a second engine in this process would fight the first over vLLM's globals).

A small driver below plays the AccelGen scheduler: it owns the block pool (block 0 is
vLLM's), chooses chunk sizes, frees finished requests and preempts by recompute (free the
blocks, later resend prompt + outputs so far with ``is_new``). Greedy outputs must equal the
reference token for token whatever the batching, chunking and block placement.
"""

from __future__ import annotations

import os

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from accelgen.core.request import SamplingParams
from worker_service.plan import ChunkSpec, WorkerPlan

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

from tests.support.vllm_support import load_make_test_model, prompt_ids, vllm_reference

REPO = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 2048
KV_CACHE_GB = 0.5
GEN_TOKENS = 24  # the reference generates this many tokens per prompt; tests compare prefixes
GREEDY = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
RANDOM = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.8, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)


_prompt = prompt_ids


# Every prompt any test runs: the reference is computed once for all of them.
OMP_AT_START = os.environ.get("OMP_NUM_THREADS")  # before any executor of this module set it

PROMPTS: dict[str, list[int]] = {
    "long": _prompt(1, 300),
    "short1": _prompt(2, 20),
    "short2": _prompt(3, 45),
    "victim": _prompt(4, 150),
    "bystander": _prompt(5, 33),
    "first": _prompt(6, 140),
    "second": _prompt(7, 60),
    "after_reset": _prompt(8, 70),
    "seeded": _prompt(9, 25),
}
SEEDED = {"seeded"}  # generated with RANDOM (seeded sampling), the rest greedily



def _vllm_sampling(sp: SamplingParams) -> dict:
    return dict(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                seed=sp.seed, ignore_eos=sp.ignore_eos)


_load_make_test_model = load_make_test_model


# -- fixtures: one model, one engine, one reference run ----------------------------------------
@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("vllm")
    pytest.importorskip("transformers")
    return _load_make_test_model().make_test_model(tmp_path_factory.mktemp("vllm-model") / "tiny-opt", seed=0)


@pytest.fixture(scope="session")
def reference(vllm_model_dir: Path) -> dict[str, list[int]]:
    """``vllm.LLM.generate`` outputs for every prompt in ``PROMPTS`` (computed in a subprocess)."""
    names = sorted(PROMPTS)
    outputs = vllm_reference(vllm_model_dir, [{"prompt": PROMPTS[n], "sampling": _vllm_sampling(RANDOM if n in SEEDED else GREEDY)}
                                              for n in names], MAX_MODEL_LEN)
    assert all(len(o) == GEN_TOKENS for o in outputs)
    return dict(zip(names, outputs))


@pytest.fixture(scope="session")
def vllm_executor(vllm_model_dir: Path):
    from worker_service.executors.vllm_executor import VllmExecutor

    t0 = time.perf_counter()
    ex = VllmExecutor(str(vllm_model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN,
                      kv_cache_space_gb=KV_CACHE_GB, seed=0)
    print(f"\nvllm executor built in {time.perf_counter() - t0:.1f} s")
    yield ex
    ex.close()


@pytest.fixture
def ex(vllm_executor):
    """The shared executor, emptied after each test."""
    yield vllm_executor
    vllm_executor.reset()


# -- a minimal scheduler ------------------------------------------------------------------------
@dataclass
class _Req:
    rid: str
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    chunk: int  # prefill chunk size cap
    outputs: list[int] = field(default_factory=list)
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    on_worker: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs


class Driver:
    """Plays the AccelGen scheduler for one executor: blocks, chunks, frees, preemption."""

    def __init__(self, ex) -> None:
        self.ex = ex
        info = ex.describe()
        self.block_size = info.block_size
        self.free_blocks = list(range(info.num_blocks - 1, 0, -1))  # pop() hands out 1, 2, ...; block 0 is vLLM's
        self.reqs: dict[str, _Req] = {}
        self.to_free: list[str] = []
        self.iteration = 0
        self.timings: list[float] = []
        self.history: dict[str, list[list[int]]] = {}  # rid -> block tables it was given

    def add(self, rid: str, prompt: list[int], max_tokens: int = GEN_TOKENS, chunk: int = 10**9,
            sampling: SamplingParams = GREEDY) -> _Req:
        r = _Req(rid, list(prompt), sampling, max_tokens, chunk)
        self.reqs[rid] = r
        return r

    def _release(self, r: _Req) -> None:
        self.free_blocks.extend(reversed(r.blocks))  # LIFO: the next allocation reuses them first
        r.blocks, r.computed, r.on_worker = [], 0, False
        self.to_free.append(r.rid)

    def preempt(self, rid: str) -> None:
        """Recompute preemption: blocks back to the pool; the request is resent as is_new later."""
        self._release(self.reqs[rid])

    def step(self, only: set[str] | None = None) -> dict[str, int]:
        chunks = []
        for r in self.reqs.values():
            if only is not None and r.rid not in only:
                continue
            start = r.computed
            n = min(r.chunk, len(r.tokens) - start)
            end = start + n
            need = -(-end // self.block_size) - len(r.blocks)
            new_blocks = [self.free_blocks.pop() for _ in range(max(0, need))]
            r.blocks.extend(new_blocks)
            is_new = not r.on_worker
            if is_new:
                self.history.setdefault(r.rid, []).append(list(r.blocks))
            chunks.append(ChunkSpec(
                request_id=r.rid, num_computed_tokens=start, token_ids=r.tokens[start:end], new_block_ids=new_blocks,
                is_new=is_new, block_table=list(r.blocks) if is_new else [], sampling=r.sampling if is_new else None,
                samples=end == len(r.tokens), num_output_tokens=len(r.outputs), prompt_len=len(r.prompt)))
        plan = WorkerPlan(self.iteration, "epoch-1", chunks, freed_request_ids=self.to_free)
        self.to_free = []
        self.iteration += 1
        result = self.ex.execute(plan)
        assert result.iteration == plan.iteration
        self.timings.append(result.elapsed_s)
        assert set(result.sampled_token_ids) == {c.request_id for c in chunks if c.samples}
        for c in chunks:
            r = self.reqs[c.request_id]
            r.on_worker = True
            r.computed = c.end_position
            if c.samples:
                r.outputs.append(result.sampled_token_ids[c.request_id])
        for r in [r for r in self.reqs.values() if len(r.outputs) >= r.max_tokens]:
            self._release(r)  # the scheduler decides stops; the worker only frees
            del self.reqs[r.rid]
        return result.sampled_token_ids

    def run(self, *rids: str) -> None:
        """Step until every request in ``rids`` has finished."""
        while any(rid in self.reqs for rid in rids):
            self.step()


def _check(outputs: list[int], reference: dict[str, list[int]], name: str) -> None:
    assert outputs == reference[name][:len(outputs)], f"{name}: diverged from vllm.LLM.generate"


# -- tests ----------------------------------------------------------------------------------------
def test_describe_reports_vllm_kv_cache(ex):
    info = ex.describe()
    assert info.executor == "vllm"
    assert info.model.endswith("tiny-opt")
    assert info.block_size == 128  # vLLM's CPU block size
    # KV bytes per block: 2 layers x (K, V) x 128 tokens x 2 heads x 64 dims x 4 bytes (float32).
    per_block = 2 * 2 * 128 * 2 * 64 * 4
    assert info.num_blocks == int(KV_CACHE_GB * (1 << 30)) // per_block
    assert info.num_blocks * info.block_size >= info.max_model_len
    assert info.max_model_len == MAX_MODEL_LEN
    assert (info.eos_token_id, info.vocab_size) == (2, 3072)
    assert info.profile_json == ""
    # Torch threads as vllm serve gives its CPU worker: every allowed core but one, at least 1.
    import torch
    expected = int(OMP_AT_START) if OMP_AT_START else max(1, len(os.sched_getaffinity(0)) - 1)
    assert ex.cpu_threads == torch.get_num_threads() == expected


def test_chunked_long_prompt_while_requests_join_and_leave(ex, reference):
    d = Driver(ex)
    long = d.add("long", PROMPTS["long"], chunk=128)
    short1 = d.add("short1", PROMPTS["short1"], max_tokens=3)
    assert d.step() == {"short1": reference["short1"][0]}  # long: 0..127, nothing sampled yet
    assert long.computed == 128 and len(long.blocks) == 1
    short2 = d.add("short2", PROMPTS["short2"])  # joins mid-prefill
    assert set(d.step()) == {"short1", "short2"}  # long: 128..255
    assert set(d.step()) == {"long", "short1", "short2"}  # long: 256..299 samples; short1 done (3 tokens)
    assert "short1" not in d.reqs and d.to_free == ["short1"]  # freed in the next plan
    assert long.computed == 300 and len(long.blocks) == 3
    _check(short1.outputs, reference, "short1")
    d.run("long", "short2")
    assert len(long.outputs) == len(short2.outputs) == GEN_TOKENS
    _check(long.outputs, reference, "long")
    _check(short2.outputs, reference, "short2")
    decode = sorted(d.timings[3:])
    print(f"\nper-iteration model time: prefill chunks {[round(t * 1e3, 1) for t in d.timings[:3]]} ms, "
          f"decode (2 requests) median {decode[len(decode) // 2] * 1e3:.2f} ms")


def test_preempted_request_recomputes_to_the_same_output(ex, reference):
    d = Driver(ex)
    victim = d.add("victim", PROMPTS["victim"], chunk=64)
    bystander = d.add("bystander", PROMPTS["bystander"])
    while len(victim.outputs) < 7:
        d.step()
    d.preempt("victim")  # blocks freed; the runner is told in the next plan
    for _ in range(3):
        d.step(only={"bystander"})
    assert d.to_free == []
    # Recompute: prompt + 7 outputs = 157 tokens, resent with is_new in chunks of 64 (the last
    # chunk ends in the outputs), on blocks the bystander's growth may have shuffled.
    victim.chunk = 64
    d.step()
    assert victim.computed == 64 and len(victim.outputs) == 7
    d.run("victim", "bystander")
    assert len(d.history["victim"]) == 2  # sent with is_new twice
    _check(victim.outputs, reference, "victim")
    _check(bystander.outputs, reference, "bystander")
    assert len(victim.outputs) == GEN_TOKENS


def test_resync_of_a_held_request_replaces_it(ex, reference):
    """``is_new`` for an id the worker still holds (no free in between): the old copy is dropped."""
    d = Driver(ex)
    r = d.add("second", PROMPTS["second"])
    for _ in range(5):
        d.step()
    d.free_blocks.extend(reversed(r.blocks))
    r.blocks, r.computed, r.on_worker = [], 0, False  # resend without freeing first
    d.run("second")
    _check(r.outputs, reference, "second")
    assert len(r.outputs) == GEN_TOKENS


def test_finished_requests_blocks_are_reused(ex, reference):
    d = Driver(ex)
    first = d.add("first", PROMPTS["first"])
    d.run("first")  # 140 + 24 tokens: two blocks, freed when it finished
    _check(first.outputs, reference, "first")
    freed = d.history["first"][0]
    assert d.to_free == ["first"]
    # The same plan that frees "first" brings "second", which gets exactly its blocks.
    second = d.add("second", PROMPTS["second"])
    d.step()
    assert d.history["second"][0] == freed[:1]
    d.run("second")
    _check(second.outputs, reference, "second")


def test_reset_forgets_everything_and_serves_again(ex, reference):
    d = Driver(ex)
    r = d.add("after_reset", PROMPTS["after_reset"])
    for _ in range(4):
        d.step()
    ex.reset()
    assert ex._runner_request_ids() == []
    # The scheduler restarted: a decode chunk for the old request is now unknown to the worker.
    with pytest.raises(ValueError, match="unknown to this worker"):
        d.step()
    d2 = Driver(ex)
    again = d2.add("after_reset", PROMPTS["after_reset"])
    d2.run("after_reset")
    _check(again.outputs, reference, "after_reset")
    assert len(again.outputs) == GEN_TOKENS and r.outputs == again.outputs[:4]


def test_rejected_plans_change_nothing(ex, reference):
    d = Driver(ex)
    r = d.add("second", PROMPTS["second"])
    d.step()
    d.step()
    bad_token = (r.outputs[-1] + 1) % 3072
    wrong = ChunkSpec("second", r.computed, [bad_token], [], False, [], None, True, len(r.outputs), 0)
    with pytest.raises(ValueError, match="not the tokens this worker sampled"):
        ex.execute(WorkerPlan(99, "epoch-1", [wrong]))
    out_of_range = ChunkSpec("x", 0, [2, 5], [], True, [ex.describe().num_blocks], GREEDY, True, 0, 2)
    with pytest.raises(ValueError, match="outside"):
        ex.execute(WorkerPlan(99, "epoch-1", [out_of_range]))
    not_sampling = ChunkSpec("x", 0, [2, 5], [], True, [7], GREEDY, False, 0, 2)
    with pytest.raises(ValueError, match="samples=False"):
        ex.execute(WorkerPlan(99, "epoch-1", [not_sampling]))
    d.run("second")  # the request carries on as if nothing happened
    _check(r.outputs, reference, "second")


def test_seeded_sampling_matches_vllm(ex, reference):
    d = Driver(ex)
    r = d.add("seeded", PROMPTS["seeded"], sampling=RANDOM)
    d.add("second", PROMPTS["second"])  # a greedy neighbour in the batch
    d.run("seeded")
    assert r.outputs == reference["seeded"]
    assert r.outputs != reference["seeded"][:1] * GEN_TOKENS  # really sampled, not constant


def test_module_imports_without_vllm_and_reads_config(monkeypatch):
    code = ("import sys, worker_service.executors.vllm_executor as m; "
            "from worker_service.executors.registry import executor_class; "
            "assert executor_class('vllm') is m.VllmExecutor; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)

    from worker_service.config import WorkerConfig
    from worker_service.executors.vllm_executor import VllmExecutor

    seen = {}
    monkeypatch.setattr(VllmExecutor, "__init__", lambda self, **kw: seen.update(kw))
    cfg = WorkerConfig.from_env_and_args(
        ["--executor", "vllm", "--model", "/models/m", "--dtype", "bfloat16", "--kv-cache-space-gb", "2.5"],
        env={"ACCELGEN_WORKER_MAX_MODEL_LEN": "4096", "ACCELGEN_WORKER_SEED": "7"})
    VllmExecutor.from_config(cfg)
    assert seen == {"model": "/models/m", "dtype": "bfloat16", "max_model_len": 4096, "kv_cache_space_gb": 2.5,
                    "seed": 7, "max_num_seqs": None, "max_num_batched_tokens": None,
                    "profile_json": "", "num_blocks": None, "cpu_threads": 0}  # a shipped profile name is other hardware: not reported
    with pytest.raises(ValueError, match="--model"):
        VllmExecutor.from_config(WorkerConfig(executor="vllm"))
    with pytest.raises(ValueError, match="dtype"):
        WorkerConfig(dtype="int3")


def test_runs_on_another_thread_as_the_server_does(ex, reference):
    """The server builds the executor on one thread and runs every plan on another."""
    from concurrent.futures import ThreadPoolExecutor

    d = Driver(ex)
    r = d.add("bystander", PROMPTS["bystander"], chunk=16)
    with ThreadPoolExecutor(max_workers=1, initializer=ex.prepare_thread) as pool:
        pool.submit(d.run, "bystander").result(timeout=120)
    _check(r.outputs, reference, "bystander")
    assert len(r.outputs) == GEN_TOKENS


def test_a_failure_inside_vllm_forgets_every_request(ex, reference, monkeypatch):
    d = Driver(ex)
    held = d.add("first", PROMPTS["first"])
    d.step()
    real = ex._executor.execute_model
    failures = [RuntimeError("injected failure")]  # one failure, then vLLM works again

    def fail_after_running(scheduler_output, *args, **kwargs):
        out = real(scheduler_output, *args, **kwargs)  # the runner's state has moved on...
        if failures:
            raise failures.pop()  # ...and then the step fails, a sample_tokens() still owed
        return out

    monkeypatch.setattr(ex._executor, "execute_model", fail_after_running)
    with pytest.raises(RuntimeError, match="injected"):
        d.step()
    monkeypatch.undo()
    assert ex._runner_request_ids() == [] and len(ex.requests) == 0
    with pytest.raises(ValueError, match="unknown to this worker"):
        ex.execute(WorkerPlan(50, "epoch-1", [ChunkSpec("first", held.computed, [held.outputs[-1]], [], False, [],
                                                        None, True, len(held.outputs), 0)]))
    d2 = Driver(ex)
    again = d2.add("first", PROMPTS["first"])
    d2.run("first")
    _check(again.outputs, reference, "first")


def test_measured_profile_is_what_the_scheduler_budgets_with(ex, tmp_path):
    """`accelgen profile` on the test model: the worker reports the file, the scheduler's lane uses it."""
    import dataclasses

    from accelgen.core.budget import TokenBudget
    from accelgen.profiles import load_profile
    from scheduler_service.config import SchedulerConfig
    from scheduler_service.lane import lane_profile
    from worker_service.executors.vllm_startup import measured_profile_json
    from worker_service.profiler import Profiler

    measured = Profiler(ex, repeats=1).run("tiny-opt_cpu", grid=(16, 64, 256, 512), decode_batch=4)
    assert [s for s, _ in measured.measured_forward_ms] == [16, 64, 256, 512]
    assert all(ms > 0 for _, ms in measured.measured_forward_ms)
    assert measured.num_blocks == ex.describe().num_blocks and measured.block_size == 128
    path = tmp_path / "tiny.json"
    measured.save(path)

    configured = load_profile(SchedulerConfig(port=0).profile)
    info = dataclasses.replace(ex.describe(), profile_json=measured_profile_json(str(path)),
                               max_model_len=MAX_MODEL_LEN)
    profile = lane_profile(configured, info)
    assert profile.name == "tiny-opt_cpu"
    assert (profile.s_pf, profile.t_pf_s) == (measured.s_pf, measured.t_pf_s)
    # A tiny model on a CPU is far faster per token than OPT-13B on an A100: the 50 ms class
    # gets a bigger budget from the measured profile than from the configured one.
    assert TokenBudget(profile).for_slo(0.05) > TokenBudget(configured).for_slo(0.05)
    # Without a measured file the worker reports nothing and the configured profile stays.
    unmeasured = dataclasses.replace(info, profile_json=measured_profile_json("opt-13b_a100-80g"), max_model_len=0)
    assert lane_profile(configured, unmeasured) is configured


def test_greedy_logprobs_are_the_models_log_softmax(ex, reference, vllm_model_dir):
    """``sampling.logprobs`` = k: per sampled token its logprob, rank 1 (greedy) and the k most
    likely tokens, the row of the right request in a mixed batch (another k, none, a chunked
    prefill), kept across a recompute; the values are the model's log_softmax (HF, float32)."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    class Recording:  # the driver's executor, keeping each result
        def __init__(self) -> None:
            self.results = []

        def describe(self):
            return ex.describe()

        def execute(self, plan):
            self.results.append(ex.execute(plan))
            return self.results[-1]

    rec = Recording()
    d = Driver(rec)
    asked = d.add("short2", PROMPTS["short2"], max_tokens=8, chunk=16,
                  sampling=dataclasses.replace(GREEDY, logprobs=5))
    other_k = d.add("short1", PROMPTS["short1"], max_tokens=4, sampling=dataclasses.replace(GREEDY, logprobs=1))
    d.add("bystander", PROMPTS["bystander"], max_tokens=8)  # asks for none
    while len(asked.outputs) < 4:
        d.step()
    d.preempt("short2")
    d.step(only={"bystander"})
    d.run("short2", "short1", "bystander")
    _check(asked.outputs, reference, "short2")  # asking for logprobs changes no token

    got: dict[str, list] = {"short2": [], "short1": []}
    for result in rec.results:
        assert "bystander" not in result.logprobs
        assert set(result.logprobs) <= set(result.sampled_token_ids)
        for rid, lp in result.logprobs.items():
            got[rid].append(lp)
            assert lp.token_id == result.sampled_token_ids[rid] and lp.rank == 1
            assert lp.top[0][0] == lp.token_id and lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-6)
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert [lp.token_id for lp in got["short2"]] == asked.outputs and all(len(lp.top) == 5 for lp in got["short2"])
    assert [lp.token_id for lp in got["short1"]] == other_k.outputs and all(len(lp.top) == 1 for lp in got["short1"])

    model = AutoModelForCausalLM.from_pretrained(str(vllm_model_dir), torch_dtype=torch.float32)
    for r, lps in ((asked, got["short2"]), (other_k, got["short1"])):
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt + r.outputs])).logits[0].float()
        log_softmax = torch.log_softmax(logits, dim=-1)
        for i, lp in enumerate(lps):
            row = log_softmax[len(r.prompt) - 1 + i]
            assert int(row.argmax()) == lp.token_id
            assert lp.logprob == pytest.approx(float(row.max()), abs=1e-3)
            for token, value in lp.top:
                assert value == pytest.approx(float(row[token]), abs=1e-3)
