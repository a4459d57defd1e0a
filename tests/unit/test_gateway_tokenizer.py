"""Gateway tokenisers and incremental detokenisation."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, Tokenizer, load_tokenizer

pytestmark = pytest.mark.unit


def test_byte_tokenizer_round_trips_and_reserves_ids() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo 日本")
    assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259 and tok.eos_token_id == 2
    assert tok.decode(ids) == "héllo 日本"
    assert tok.decode([0, 1, 2] + tok.encode("ok") + [259, 5000]) == "ok"  # unmappable ids skipped
    assert isinstance(tok, Tokenizer)


def test_load_tokenizer_defaults_to_bytes() -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer) and isinstance(load_tokenizer("sim"), ByteTokenizer)


def test_plain_chat_prompt() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ByteTokenizer().apply_chat(msgs) == "system: be brief\nuser: hi\nassistant:"


def test_incremental_detokenizer_holds_split_characters() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("a日b")  # 日 is three bytes: the middle tokens complete nothing
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    deltas = [detok.add([i]) for i in ids]
    assert deltas == ["a", "", "", "日", "b"]
    assert detok.add([2]) == ""  # EOS adds no text


def test_incremental_detokenizer_never_emits_an_incomplete_tail() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    assert detok.add(tok.encode("x") + tok.encode("日")[:1]) == "x"  # the split 日 waits; vLLM drops it at the end
    assert detok.add(tok.encode("日")[1:]) == "日"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny byte-level BPE tokenizer saved twice: without and with a chat template."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "héllo wörld 日本語", "the quick brown fox"] * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    plain = tmp_path_factory.mktemp("hf_plain")
    fast.save_pretrained(plain)
    fast.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant]{% endif %}")
    chat = tmp_path_factory.mktemp("hf_chat")
    fast.save_pretrained(chat)
    return plain, chat


def test_hf_tokenizer_without_template(hf_dirs: tuple[Path, Path]) -> None:
    tok = load_tokenizer(str(hf_dirs[0]))
    assert isinstance(tok, HFTokenizer) and not tok.has_chat_template and tok.eos_token_id == 2
    ids = tok.encode("héllo 日本語")
    assert ids[0] == 0 and tok.decode(ids) == "héllo 日本語"  # BOS added, skipped when decoding
    assert tok.apply_chat([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
    detok = IncrementalDetokenizer(tok, ids[:2])
    assert "".join(detok.add([i]) for i in ids[2:]) == tok.decode(ids[2:])


def test_hf_tokenizer_with_template_adds_no_second_bos(hf_dirs: tuple[Path, Path]) -> None:
    tok = HFTokenizer(str(hf_dirs[1]))
    text = tok.apply_chat([{"role": "user", "content": "hi"}])
    assert text == "<s>[user] hi\n[assistant]"
    assert tok.encode(text).count(0) == 1


def test_hf_tokenizer_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="local files only"):
        HFTokenizer(str(tmp_path / "nope"))
