"""The tiny test model (scripts/make_test_model.py) and the vLLM scheduler benchmark.

No vLLM engine is started here: the benchmark builds vLLM's V1 ``Scheduler`` directly,
so an upgrade that changes its constructor or ``update_from_output`` fails loudly.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def _load_make_test_model():
    path = REPO / "scripts" / "make_test_model.py"
    spec = importlib.util.spec_from_file_location("accelgen_make_test_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mtm():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("torch")
    return _load_make_test_model()


@pytest.fixture(scope="module")
def model_dir(mtm, tmp_path_factory) -> Path:
    return mtm.make_test_model(tmp_path_factory.mktemp("models") / "tiny-opt", seed=0)


def test_model_files_and_config(model_dir: Path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.model_type == "opt"
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM CPU attention needs 32/64/...
    assert cfg.max_position_embeddings >= 2048
    assert cfg.eos_token_id == cfg.bos_token_id
    assert cfg.pad_token_id != cfg.eos_token_id
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["architectures"] == ["OPTForCausalLM"]


def test_tokenizer_round_trip(model_dir: Path):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    assert 2000 <= len(tok) <= 4096
    assert len(tok) <= cfg.vocab_size
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    for text in ("The scheduler meets 42 deadlines, quickly!",
                 "  leading spaces and Ünïcödé — ok?\nnew line"):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id  # OPT-style: </s> prepended
        assert max(ids) < cfg.vocab_size
        assert tok.decode(ids, skip_special_tokens=True) == text
    # English-like text compresses: well under one token per character.
    text = "The company said the new system would work for people in the city."
    assert len(tok(text).input_ids) < len(text) / 2


def test_make_test_model_is_idempotent(mtm, model_dir: Path):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert mtm.make_test_model(model_dir, seed=0) == model_dir
    assert time.perf_counter() - t0 < 1.0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_directory_of_another_shape_is_refused(mtm, model_dir: Path, tmp_path: Path):
    """--shape opt-125m (the GPU check's model) never overwrites the tiny model, nor the reverse;
    the tiny model's marker is what it always was (no shape key)."""
    assert "shape" not in json.loads((model_dir / mtm.MARKER).read_text())
    with pytest.raises(mtm.ShapeMismatch, match="'tiny'"):
        mtm.make_test_model(model_dir, seed=0, shape="opt-125m")
    other = tmp_path / "gpu-model"
    other.mkdir()
    (other / mtm.MARKER).write_text(json.dumps({"seed": 0, "version": mtm.GENERATOR_VERSION, "shape": "opt-125m"}))
    with pytest.raises(mtm.ShapeMismatch, match="'opt-125m'"):
        mtm.make_test_model(other, seed=0)
    assert mtm.main(["--out", str(other)]) == 2
    with pytest.raises(ValueError, match="unknown shape"):
        mtm.make_test_model(tmp_path / "x", shape="opt-13b")


def test_vllm_scheduler_timing(model_dir: Path):
    pytest.importorskip("vllm")
    from bench.vllm_sched_overhead import time_vllm_schedule

    res = time_vllm_schedule(model_dir, queue_sizes=(10,), repeats=3)
    assert set(res) == {10}
    r = res[10]
    for key in ("p50_ms", "p99_ms", "mean_ms", "first_ms"):
        assert r[key] > 0, (key, r)
    assert r["p50_ms"] <= r["p99_ms"]
    assert r["mean_sched_reqs"] > 0  # the steady-state loop really schedules requests
    assert r["mean_waiting"] == pytest.approx(10)
