"""Stop strings cut the text exactly as vLLM cuts it: ``gateway.stop_strings`` against vLLM's own
detokenizer logic (``vllm/v1/engine/detokenizer.py``) on the same token batches."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.stop_strings import OutputText, check_stop_strings
from gateway.tokenizer import ByteTokenizer, IncrementalDetokenizer

TOK = ByteTokenizer()


def ids(text: str) -> list[int]:
    return TOK.encode(text)


def run(stop: list[str], batches: list[list[int]], include: bool = False,
        stop_terminated_last: bool = False) -> tuple[list[str], int, str | None, str]:
    """Our pipeline: (text handed out per batch, tokens kept, stop string, final text)."""
    out = OutputText(IncrementalDetokenizer(TOK), stop, include)
    texts, kept, found = [], 0, None
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        update = out.update(batch, stop_terminated_last and last)
        kept += update.kept
        found = update.stop_string
        finished = found is not None or last
        texts.append(out.next_text(finished))
        if found is not None:
            break
    return texts, kept, found, out.text


def test_cut_before_the_stop_string_and_count_the_token_that_completed_it() -> None:
    texts, kept, found, text = run(["\n\n"], [ids("Hi"), ids(" there\n"), ids("\nmore"), ids("x")])
    assert (found, text, "".join(texts)) == ("\n\n", "Hi there", "Hi there")
    assert kept == 2 + 7 + 1  # the "\n" that completed it is the last token; "more" is dropped


def test_include_stop_str_keeps_it_and_cuts_after_it() -> None:
    texts, kept, found, text = run(["lo"], [ids("hel"), ids("lo world")], include=True)
    assert (found, text, "".join(texts), kept) == ("lo", "hello", "hello", 5)


def test_stream_holds_back_what_could_start_a_stop_string() -> None:
    texts, *_ = run(["STOP"], [ids("abcdef"), ids("gh"), ids("ST"), ids("OP")])
    assert texts == ["abc", "de", "fg", "h"]  # 3 characters (len - 1) held back until the end


def test_earliest_completing_stop_string_wins_then_list_order() -> None:
    assert check_stop_strings("xxabcd", 4, ["cd", "ab"], False) == ("ab", 2)
    assert check_stop_strings("xxab", 2, ["ab", "b"], False) == ("ab", 2)  # both end at 4: list order
    assert check_stop_strings("xxab", 2, ["b", "ab"], False) == ("b", 3)
    assert check_stop_strings("xxab", 2, ["xab", "ab"], False) == ("xab", 1)
    assert check_stop_strings("abc", 1, ["ab"], False) is None  # found only in old text


def test_a_stop_token_adds_no_text_unless_stop_strings_are_kept() -> None:
    eos = TOK.eos_token_id
    assert run([], [ids("ab"), ids("c") + [eos]], stop_terminated_last=True)[3] == "abc"
    assert run([], [ids("ab") + ids("!")], stop_terminated_last=True)[3] == "ab"  # "!" as a stop token id
    assert run([], [ids("ab") + ids("!")], include=True, stop_terminated_last=True)[3] == "ab!"


# ---- the same batches through vLLM's own detokenizer logic -----------------------------------

def _vllm_detokenizer(stop: list[str], include: bool) -> Any:
    detok_mod = pytest.importorskip("vllm.v1.engine.detokenizer")

    class SameDecoding(detok_mod.BaseIncrementalDetokenizer):  # vLLM's stop logic, our decoding
        def __init__(self) -> None:
            params = SimpleNamespace(stop=stop, min_tokens=0, include_stop_str_in_output=include)
            super().__init__(SimpleNamespace(sampling_params=params))
            self._ours = IncrementalDetokenizer(TOK)

        def decode_next(self, next_token_id: int) -> str:
            return self._ours.add([next_token_id])

    return SameDecoding()


@pytest.mark.vllm
@pytest.mark.parametrize("include", [False, True])
def test_matches_vllm_on_random_batches(include: bool) -> None:
    rng = random.Random(13)
    alphabet = ids("ab \n") + ids("é")  # é is two bytes: a character split across tokens
    for _ in range(300):
        stop = rng.sample(["ab", "\n\n", "b a", "aaa", "é", "a\n", "bé b"], rng.randint(1, 3))
        tokens = [rng.choice(alphabet) for _ in range(rng.randint(1, 30))]
        batches, i = [], 0
        while i < len(tokens):
            size = rng.randint(1, 4)
            batches.append(tokens[i:i + size])
            i += size
        terminated = rng.random() < 0.3
        ours = run(stop, batches, include, terminated)

        vllm = _vllm_detokenizer(stop, include)
        texts, kept, found = [], 0, None
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            before = vllm.num_output_tokens()
            found = vllm.update(batch, terminated and last)
            kept += vllm.num_output_tokens() - before
            texts.append(vllm.get_next_output_text(found is not None or last, True))
            if found is not None:
                break
        assert ours == (texts, kept, found, vllm.output_text), (stop, batches, terminated)
