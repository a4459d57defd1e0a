"""Request workloads for the AccelGen benchmarks and the trace-driven simulator.

Two kinds of workload exist, and both end up as the same flat list of
:class:`WorkloadRequest` so that the simulator, the load generator and the
schedulers never care where a request came from:

* ``paper-mix`` - the evaluation mix of the AccelGen paper: Poisson arrivals,
  35% of requests (``long_fraction``) with long prompts (rows of BWB
  long-document translation and arXiv summarization, Llama-2 token counts)
  and 65% short prompts (rows of Stanford Alpaca by default, or of the first
  turns of ShareGPT conversations with ``short_data="sharegpt"``; both OPT
  token counts, see
  ``../shared/traces/SOURCES.md`` section 5). The length datasets carry no
  timestamps, so arrivals are synthetic. Each request's ``source`` names the
  dataset its row came from: ``"alpaca"``, ``"sharegpt"``, ``"bwb"`` or
  ``"arxiv"``.
* Azure LLM inference traces (Splitwise, 2023) - real arrival timestamps and
  token counts, which keep the burstiness a Poisson process hides.

Fitting a request into the model context
----------------------------------------
Rows longer than the context are fitted the way a real client does it, not by
cutting the output at whatever room the prompt leaves (which turned long rows
into ``max_model_len - 1``-token prompts that generate a single token):

1. The output is capped at :func:`max_output_tokens`, ``max_model_len // 2``
   (:data:`MAX_OUTPUT_TOKENS` = 1024 at the 2,048-token context of OPT-13B).
   A client asking for a completion must set ``max_tokens`` so that prompt
   plus completion fit; half the context is a common default, and it leaves
   the prompt at least as much room as the answer.
2. The prompt is then clipped, keeping its head, to
   ``max_model_len - output``, so ``prompt + output <= max_model_len``.

Both stay >= 1 (a 0 in the data becomes 1). A request that already fits is
unchanged, and an output of 1 token appears only where the data row had one
(or where ``max_model_len < 4`` leaves a cap of 1).
The same rule applies to paper-mix and to the Azure traces.

SLO classes
-----------
Neither source says which SLO class (chat / code / summarization ...) a
request belongs to. ``classes`` selects how it is assigned:

* ``"uniform"`` (default) - each request draws its class from ``slo_mix``,
  independently of its length: the experiments can then vary the SLO mix and
  the length mix separately.
* ``"by-app"`` - the class follows the kind of request: a long request is
  ``summarization``; a short one is ``chat`` or ``code``, drawn with the
  relative weights ``slo_mix`` gives those two classes (default: equal). In
  paper-mix "long" means a BWB/arXiv row; in an Azure trace it means the
  (fitted) prompt exceeds ``long_threshold``, i.e. exactly ``is_long``.
  ``slo_mix`` may then name only chat, code and summarization, and the weight
  of summarization is not used (the long share is set by ``long_fraction`` or
  by the trace).

Every random choice comes from one generator seeded by ``seed`` so that the
same arguments always give the identical list - benchmark comparisons between
schedulers are only fair if they replay the very same requests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.trace_files import _key, _read_lengths, _read_trace  # noqa: F401 (re-exported for tests)

__all__ = [
    "CLASS_MODES", "DEFAULT_SLO_MIX", "MAX_OUTPUT_TOKENS", "SHORT_DATA", "WORKLOAD_NAMES", "WorkloadRequest",
    "azure_trace", "load_workload", "max_output_tokens", "paper_mix", "parse_slo_mix",
    "traces_dir",
]  # fmt: skip

DEFAULT_SLO_MIX: dict[str, float] = {"chat": 1.0, "code": 1.0, "summarization": 1.0}

WORKLOAD_NAMES: tuple[str, ...] = ("paper-mix", "azure-conv", "azure-code", "trace")

# File names as they appear in ../shared/traces and in tests/data/traces_sample.
# Short prompts (OPT token counts; SOURCES.md section 5):
ALPACA_FILE = "alpaca_token_lengths.csv"
SHAREGPT_FIRST_TURN_FILE = "sharegpt_first_turn_token_lengths.csv"
# Multi-turn ShareGPT (median prompt ~1,700 tokens, so not a short class): no
# workload reads it any more; the name (and its sample) stay for ad-hoc analysis.
SHAREGPT_FILE = "vidur_etalon_sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
# Long prompts (Llama-2 token counts):
BWB_FILE = "vidur_etalon_bwb_stats_llama2_tokenizer_filtered_v2.csv"
ARXIV_FILE = "vidur_arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
AZURE_FILES: dict[str, str] = {
    "azure-conv": "azure_llm_2023_conv__AzurePublicDataset.csv",
    "azure-code": "azure_llm_2023_code__AzurePublicDataset.csv",
}

#: ``short_data`` choices of paper-mix -> the file its short rows come from.
SHORT_DATA: dict[str, str] = {"alpaca": ALPACA_FILE, "sharegpt": SHAREGPT_FIRST_TURN_FILE}

#: ``classes`` choices: how a request gets its SLO class (see the module docstring).
CLASS_MODES: tuple[str, ...] = ("uniform", "by-app")

#: The SLO classes of ``classes="by-app"``: short requests are chat or code, long ones summarization.
_BY_APP_SHORT: tuple[str, ...] = ("chat", "code")
_BY_APP_LONG = "summarization"

#: Context of the paper's OPT-13B, the default ``max_model_len`` everywhere.
_DEFAULT_MAX_MODEL_LEN = 2048


def max_output_tokens(max_model_len: int) -> int:
    """Output cap (the client's ``max_tokens``) for a model context of ``max_model_len``.

    Half the context: a client asking for a completion must set ``max_tokens``
    so that prompt plus completion fit, half the context is a common default,
    and it leaves the prompt at least as much room as the answer.
    """
    return max_model_len // 2


#: The output cap at the paper's 2,048-token context (OPT-13B): ``max_output_tokens(2048)``.
MAX_OUTPUT_TOKENS: int = max_output_tokens(_DEFAULT_MAX_MODEL_LEN)

_REPO_ROOT = Path(__file__).resolve().parents[1]
_SAMPLE_DIR = _REPO_ROOT / "tests" / "data" / "traces_sample"


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request of a workload, as the load generator will submit it.

    ``output_len`` is the *true* generation length. Schedulers must not read
    it (real systems do not know it in advance); the simulator uses it to emit
    EOS at the right step, and the analysis uses it to compute goodput.
    """

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    app_class: str
    source: str
    is_long: bool

    def __post_init__(self) -> None:
        # Cheap guard: a malformed request would otherwise surface much later
        # as a confusing simulator failure (zero-length prefill, negative time).
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"{self.request_id}: prompt_len and output_len must be >= 1")
        if not self.arrival_s >= 0.0:
            raise ValueError(f"{self.request_id}: arrival_s must be >= 0, got {self.arrival_s}")


def traces_dir() -> Path:
    """Directory holding the trace CSVs.

    Order: ``$ACCELGEN_TRACES_DIR``; the shared full traces next to the repo
    (``<repo>/../shared/traces``); the small in-repo sample, so that tests and
    a fresh checkout still work without the shared data.
    """
    env = os.environ.get("ACCELGEN_TRACES_DIR")
    if env:
        return Path(env)
    shared = _REPO_ROOT.parent / "shared" / "traces"
    if shared.is_dir():
        return shared
    return _SAMPLE_DIR


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def parse_slo_mix(text: str) -> dict[str, float]:
    """Parse a CLI SLO mix such as ``"chat=1,code=2,summarization=1"``.

    Weights are relative (they need not sum to 1). A zero weight is allowed
    (that class never appears) but the total must be positive.
    """
    mix: dict[str, float] = {}
    if not text or not text.strip():
        raise ValueError("empty SLO mix; expected e.g. 'chat=1,code=1,summarization=1'")
    for part in text.split(","):
        name, sep, weight_s = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"bad SLO mix entry {part.strip()!r}; expected CLASS=WEIGHT, e.g. 'chat=1'")
        if name in mix:
            raise ValueError(f"SLO class {name!r} given twice in {text!r}")
        try:
            weight = float(weight_s)
        except ValueError:
            raise ValueError(f"bad weight {weight_s.strip()!r} for SLO class {name!r}; expected a number") from None
        mix[name] = weight
    _class_table(mix)  # same checks as for a Mapping passed in code
    return mix


def _class_table(slo_mix: Mapping[str, float] | None) -> tuple[list[str], np.ndarray]:
    """Validated (class names, cumulative probabilities) of an SLO mix.

    Zero-weight classes are dropped so they can never be drawn, and the last
    cumulative value is pinned to exactly 1.0 so a uniform draw in [0, 1)
    always lands on a class despite float rounding.
    """
    mix = DEFAULT_SLO_MIX if slo_mix is None else slo_mix
    names: list[str] = []
    weights: list[float] = []
    for name, weight in mix.items():
        w = float(weight)
        if not isinstance(name, str) or not name:
            raise ValueError(f"SLO class names must be non-empty strings, got {name!r}")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"SLO weight for {name!r} must be a finite number >= 0, got {weight!r}")
        if w > 0:
            names.append(name)
            weights.append(w)
    if not names:
        raise ValueError(f"SLO mix {dict(mix)!r} has no positive weight; give at least one class a weight > 0")
    cdf = np.cumsum(np.asarray(weights)) / sum(weights)
    cdf[-1] = 1.0
    return names, cdf


def _class_plan(classes: str, slo_mix: Mapping[str, float] | None) -> tuple[list[str], np.ndarray]:
    """Validated (class names, cumulative probabilities) that :func:`_draw_classes` draws from.

    For ``"uniform"`` the whole SLO mix; for ``"by-app"`` only its chat/code
    part (the classes of short requests). Called before any file is read so
    that a bad argument fails fast.
    """
    if classes not in CLASS_MODES:
        raise ValueError(f"unknown classes={classes!r}; choose one of {', '.join(CLASS_MODES)}")
    if classes == "uniform":
        return _class_table(slo_mix)
    mix = DEFAULT_SLO_MIX if slo_mix is None else slo_mix
    _class_table(mix)  # the usual checks on names and weights
    allowed = (*_BY_APP_SHORT, _BY_APP_LONG)
    extra = [name for name, weight in mix.items() if name not in allowed and float(weight) > 0]
    if extra:
        raise ValueError(
            f"classes='by-app' assigns only {', '.join(allowed)}; slo_mix class(es) {extra} would never be drawn"
        )
    short = {name: mix.get(name, 0.0) for name in _BY_APP_SHORT}
    if not any(float(w) > 0 for w in short.values()):
        raise ValueError(
            f"classes='by-app' draws short requests' class from the chat and code weights of slo_mix; "
            f"give chat or code a weight > 0 (got {dict(mix)!r})"
        )
    return _class_table(short)


def _draw_classes(
    rng: np.random.Generator, plan: tuple[list[str], np.ndarray], is_long: np.ndarray, classes: str
) -> list[str]:
    """Draw an app class per request.

    One uniform per request, in request order, whatever ``classes`` is, so
    request i's class does not depend on how many requests follow it (cutting a
    trace shorter keeps the classes of the rows that remain) and the two modes
    consume the random stream alike. With ``"by-app"`` a long request's uniform
    is drawn but not used: it is always summarization.
    """
    names, cdf = plan
    idx = np.searchsorted(cdf, rng.random(len(is_long)), side="right")
    drawn = [names[i] for i in idx.tolist()]
    if classes == "by-app":
        return [_BY_APP_LONG if lg else c for c, lg in zip(drawn, is_long.tolist())]
    return drawn


def _fit_context(prompt: np.ndarray, output: np.ndarray, max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit each request into the model context as a client does (module docstring).

    The output is capped at ``max_output_tokens(max_model_len)``, then the
    prompt keeps its first ``max_model_len - output`` tokens. Hence
    ``prompt + output <= max_model_len``, both are >= 1, a request that fits
    is unchanged, and a 1-token output means the data had <= 1.
    """
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, (int, np.integer)) or max_model_len < 2:
        raise ValueError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")
    o = np.clip(output, 1, max_output_tokens(int(max_model_len)))
    p = np.clip(prompt, 1, max_model_len - o)
    return p, o


def _build(
    arrivals: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    classes: list[str],
    sources: list[str],
    is_long: np.ndarray,
) -> list[WorkloadRequest]:
    """Assemble plain-Python requests (no numpy scalars leak out: they break
    JSON encoding and protobuf fields downstream)."""
    return [
        WorkloadRequest(f"r{i:06d}", a, p, o, c, s, lg)
        for i, (a, p, o, c, s, lg) in enumerate(
            zip(arrivals.tolist(), prompt.tolist(), output.tolist(), classes, sources, is_long.tolist())
        )
    ]


def _check_positive(name: str, value: float) -> None:
    try:
        ok = not isinstance(value, bool) and math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------


def paper_mix(
    *,
    rate: float,
    duration_s: float,
    seed: int = 0,
    long_fraction: float = 0.35,
    slo_mix: Mapping[str, float] | None = None,
    max_model_len: int = _DEFAULT_MAX_MODEL_LEN,
    data_dir: Path | None = None,
    short_data: str = "alpaca",
    classes: str = "uniform",
) -> list[WorkloadRequest]:
    """The AccelGen evaluation mix: Poisson(``rate``) arrivals in ``[0, duration_s)``.

    Each request is long with probability ``long_fraction`` (the paper: 0.35):
    its (prompt, output) pair is one row drawn uniformly from BWB + arXiv
    together; otherwise it is a row of the ``short_data`` set (a key of
    :data:`SHORT_DATA`: ``"alpaca"`` or ``"sharegpt"`` first turns). Prompt and
    output come from the same row so their correlation in the data is kept;
    then the pair is fitted into ``max_model_len`` (module docstring).
    ``classes`` is ``"uniform"`` or ``"by-app"`` (module docstring).

    Draw order from ``PCG64(seed)``: inter-arrival gaps, long/short flags,
    long-row indices, short-row indices, app classes.
    """
    _check_positive("rate", rate)
    _check_positive("duration_s", duration_s)
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction!r}")
    if short_data not in SHORT_DATA:
        raise ValueError(f"unknown short_data={short_data!r}; choose one of {', '.join(SHORT_DATA)}")
    plan = _class_plan(classes, slo_mix)  # fail before the (possibly slow) first file read
    base = Path(data_dir) if data_dir is not None else traces_dir()
    sh_p, sh_o = _read_lengths(_key(base / SHORT_DATA[short_data]))
    bwb_p, bwb_o = _read_lengths(_key(base / BWB_FILE))
    ax_p, ax_o = _read_lengths(_key(base / ARXIV_FILE))
    long_p, long_o = np.concatenate([bwb_p, ax_p]), np.concatenate([bwb_o, ax_o])

    rng = np.random.Generator(np.random.PCG64(seed))
    # Gaps are drawn in chunks sized a few sigma above the expected count, so
    # one chunk nearly always suffices and the stream stays deterministic.
    expected = rate * duration_s
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    arrivals = np.empty(0)
    last = 0.0
    while last < duration_s:
        block = last + np.cumsum(rng.exponential(1.0 / rate, size=chunk))
        arrivals = np.concatenate([arrivals, block])
        last = float(block[-1])
    arrivals = arrivals[arrivals < duration_s]
    n = len(arrivals)

    is_long = rng.random(n) < long_fraction
    long_idx = rng.integers(0, len(long_p), size=n)
    short_idx = rng.integers(0, len(sh_p), size=n)
    app_classes = _draw_classes(rng, plan, is_long, classes)

    prompt = np.where(is_long, long_p[long_idx], sh_p[short_idx])
    output = np.where(is_long, long_o[long_idx], sh_o[short_idx])
    prompt, output = _fit_context(prompt, output, max_model_len)
    sources = [
        ("bwb" if j < len(bwb_p) else "arxiv") if lg else short_data
        for lg, j in zip(is_long.tolist(), long_idx.tolist())
    ]
    return _build(arrivals, prompt, output, app_classes, sources, is_long)


def azure_trace(
    path: Path,
    *,
    time_scale: float = 1.0,
    duration_s: float | None = None,
    seed: int = 0,
    slo_mix: Mapping[str, float] | None = None,
    max_model_len: int = _DEFAULT_MAX_MODEL_LEN,
    source: str = "trace",
    long_threshold: int = 1024,
    classes: str = "uniform",
) -> list[WorkloadRequest]:
    """Replay an Azure-format trace with its real inter-arrival times.

    Arrivals are relative to the first row and divided by ``time_scale``
    (``time_scale=10`` replays 10x faster, i.e. 10x the load, with the same
    burst shape). With ``duration_s`` only rows arriving before it are kept.
    Lengths are fitted into ``max_model_len`` like paper-mix's (module
    docstring). ``is_long`` means the fitted prompt exceeds ``long_threshold``,
    so it always agrees with the ``prompt_len`` the scheduler sees; with
    ``classes="by-app"`` those requests are summarization and the others chat
    or code.
    """
    _check_positive("time_scale", time_scale)
    if duration_s is not None:
        _check_positive("duration_s", duration_s)
    plan = _class_plan(classes, slo_mix)
    t, p, o = _read_trace(_key(Path(path)))
    arrivals = t / time_scale
    if duration_s is not None:
        keep = arrivals < duration_s
        arrivals, p, o = arrivals[keep], p[keep], o[keep]
    n = len(arrivals)
    prompt, output = _fit_context(p, o, max_model_len)
    is_long = prompt > long_threshold
    rng = np.random.Generator(np.random.PCG64(seed))
    app_classes = _draw_classes(rng, plan, is_long, classes)
    return _build(arrivals, prompt, output, app_classes, [source] * n, is_long)


def load_workload(
    name: str,
    *,
    rate: float | None = None,
    duration_s: float = 300.0,
    seed: int = 0,
    time_scale: float = 1.0,
    trace: Path | None = None,
    slo_mix: Mapping[str, float] | None = None,
    max_model_len: int = _DEFAULT_MAX_MODEL_LEN,
    long_fraction: float = 0.35,
    short_data: str | None = None,
    classes: str = "uniform",
) -> list[WorkloadRequest]:
    """Build a workload by name (the CLI / benchmark entry point).

    ``paper-mix`` needs ``rate`` and takes ``short_data`` (default
    ``"alpaca"``); ``azure-conv`` / ``azure-code`` read the Azure files in
    :func:`traces_dir`; ``trace`` needs ``trace=PATH``. For the traces
    ``duration_s`` cuts the (time-scaled) replay. ``classes`` applies to every
    workload. An argument that does not apply to the chosen workload is an
    error rather than silently ignored, so a mistyped benchmark config cannot
    run a different experiment.
    """
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
    _class_plan(classes, slo_mix)  # a bad classes / slo_mix fails here for every workload, before any file read
    if name == "paper-mix":
        if rate is None:
            raise ValueError("workload 'paper-mix' needs rate=<requests per second> (CLI: --rate)")
        if trace is not None:
            raise ValueError("trace=PATH applies only to workload 'trace', not 'paper-mix'")
        return paper_mix(rate=rate, duration_s=duration_s, seed=seed, long_fraction=long_fraction,
                         slo_mix=slo_mix, max_model_len=max_model_len,
                         short_data="alpaca" if short_data is None else short_data, classes=classes)  # fmt: skip
    if rate is not None:
        raise ValueError(
            f"rate applies only to 'paper-mix'; workload {name!r} keeps the trace's own arrivals "
            "(pass time_scale=K to replay it K times faster)"
        )
    if short_data is not None:
        raise ValueError(
            f"short_data applies only to 'paper-mix'; workload {name!r} takes its lengths from the trace"
        )
    if name == "trace":
        if trace is None:
            raise ValueError("workload 'trace' needs trace=PATH to an Azure-format CSV (CLI: --trace PATH)")
        path, source = Path(trace), "trace"
    else:
        if trace is not None:
            raise ValueError(f"trace=PATH applies only to workload 'trace'; {name!r} reads {AZURE_FILES[name]}")
        path, source = traces_dir() / AZURE_FILES[name], name
    if not path.is_file():
        hint = "check the path given as trace=" if name == "trace" else (
            f"set ACCELGEN_TRACES_DIR to the folder holding it (the in-repo sample is {_SAMPLE_DIR})")  # fmt: skip
        raise FileNotFoundError(f"trace file {path} not found; {hint}")
    return azure_trace(path, time_scale=time_scale, duration_s=duration_s, seed=seed, slo_mix=slo_mix,
                       max_model_len=max_model_len, source=source, classes=classes)  # fmt: skip
