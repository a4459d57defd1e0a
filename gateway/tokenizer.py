"""Tokenisers the gateway uses, behind one small protocol, and incremental detokenisation.

The gateway tokenises so the scheduler and workers only ever see token ids. Two kinds:

* ``ByteTokenizer``: UTF-8 bytes shifted by 3 (ids 0..2 reserved, 2 = EOS). The sim executor
  runs no model, so any reversible text <-> ids mapping serves; this one needs no files.
* ``HFTokenizer``: the served model's own tokenizer (``transformers``), loaded from local files
  only — a gateway must never stall on a download at startup.

``IncrementalDetokenizer`` turns a growing list of output ids into text deltas. Decoding each
token alone is wrong: byte-level BPE splits a multi-byte character across tokens, and
SentencePiece drops a token's leading space when it has no left context. So, as vLLM does, we
decode a small window and emit only the text that a new token added, holding back output that
ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

Message = Mapping[str, str]


@runtime_checkable
class Tokenizer(Protocol):
    """What the gateway needs from a tokenizer."""

    eos_token_id: int | None
    vocab_size: int
    #: Whether token ids a client sends must lie below ``vocab_size``. False for the byte
    #: tokenizer: the sim executor samples from its own vocabulary, so larger ids are legal there.
    checks_vocab: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat(self, messages: Sequence[Message]) -> str: ...


def plain_chat_prompt(messages: Sequence[Message]) -> str:
    """A template-free chat prompt: one ``role: content`` line per message, then ``assistant:``."""
    lines = [f"{m['role']}: {m['content']}\n" for m in messages]
    return "".join(lines) + "assistant:"


class ByteTokenizer:
    """UTF-8 bytes as ids ``byte + 3``; 0, 1, 2 reserved (2 = EOS). Vocabulary of 259."""

    OFFSET = 3
    eos_token_id: int | None = 2
    vocab_size = 256 + OFFSET
    checks_vocab = False

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        # Ids that are no byte (reserved, or sampled by a sim executor with a larger vocabulary)
        # are skipped, so decoding never fails on what a worker produced.
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def apply_chat(self, messages: Sequence[Message]) -> str:
        return plain_chat_prompt(messages)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from local files (``local_files_only=True``)."""

    checks_vocab = True

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer  # heavy import: only when a real model is served

        try:
            self._tok: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the tokenizer from {path!r} (local files only): {exc}") from exc
        self.path = path
        self.eos_token_id = self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        self._bos_text: str | None = self._tok.bos_token

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        # A chat template already writes the BOS token into the text; adding another one would
        # shift the model off the distribution it was trained on (vLLM skips it for chat too).
        add_special = not (self._bos_text and text.startswith(self._bos_text))
        return list(self._tok.encode(text, add_special_tokens=add_special))

    def decode(self, ids: Sequence[int]) -> str:
        known = [i for i in ids if 0 <= i < self.vocab_size]
        return str(self._tok.decode(known, skip_special_tokens=True))

    def apply_chat(self, messages: Sequence[Message]) -> str:
        if not self.has_chat_template:
            return plain_chat_prompt(messages)
        text = self._tok.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=True)
        return str(text)


def load_tokenizer(model: str | None) -> Tokenizer:
    """The byte tokenizer for the sim executor (``None`` or ``"sim"``), else the model's own."""
    if model is None or model == "sim":
        return ByteTokenizer()
    return HFTokenizer(model)


class IncrementalDetokenizer:
    """Text deltas for a growing output, correct across multi-byte characters and spaces.

    ``context`` (the prompt's last few ids) gives the first output token its left context, so a
    SentencePiece word-start token keeps its space. The offsets follow vLLM's
    ``detokenize_incrementally``: ``[prefix, read)`` is text already emitted, used only as context.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(context[-self.CONTEXT_TOKENS:]) if context else []
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ``new_ids``; return the text they complete (may be empty while a char is split).

        A character still incomplete when the output ends is never emitted: vLLM's detokenizers
        drop it too, so an output cut mid-character reads the same from both servers. Token by
        token, as vLLM does: a batch whose last character is incomplete still gives the text
        before it (decoded whole, it would end in U+FFFD and give nothing)."""
        return "".join(self._add_one(token) for token in new_ids)

    def _add_one(self, token: int) -> str:
        self._ids.append(token)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        full_text = self._tok.decode(self._ids[self._prefix:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text):]
        return ""

