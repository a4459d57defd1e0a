"""Request workloads for the AccelGen benchmarks and the trace-driven simulator.

Two kinds of workload exist, and both end up as the same flat list of
:class:`WorkloadRequest` so that the simulator, the load generator and the
schedulers never care where a request came from:

* ``paper-mix`` - the evaluation mix of the AccelGen paper: Poisson arrivals,
  a fraction of requests with long prompts (BWB long-document translation and
  arXiv summarization rows) and the rest short chat prompts (ShareGPT rows).
  The length datasets carry no timestamps, so arrivals are synthetic.
* Azure LLM inference traces (Splitwise, 2023) - real arrival timestamps and
  token counts, which keep the burstiness a Poisson process hides.

Neither source says which SLO class (chat / code / summarization ...) a request
belongs to, so the class is drawn from a weighted mix, independently of length:
the experiments want to vary the SLO mix and the length mix separately.

Every random choice comes from one generator seeded by ``seed`` so that the
same arguments always give the identical list - benchmark comparisons between
schedulers are only fair if they replay the very same requests.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_SLO_MIX", "WORKLOAD_NAMES", "WorkloadRequest", "azure_trace",
    "load_workload", "paper_mix", "parse_slo_mix", "traces_dir",
]  # fmt: skip

DEFAULT_SLO_MIX: dict[str, float] = {"chat": 1.0, "code": 1.0, "summarization": 1.0}

WORKLOAD_NAMES: tuple[str, ...] = ("paper-mix", "azure-conv", "azure-code", "trace")

# File names as they appear in ../shared/traces and in tests/data/traces_sample.
SHAREGPT_FILE = "vidur_etalon_sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
BWB_FILE = "vidur_etalon_bwb_stats_llama2_tokenizer_filtered_v2.csv"
ARXIV_FILE = "vidur_arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
AZURE_FILES: dict[str, str] = {
    "azure-conv": "azure_llm_2023_conv__AzurePublicDataset.csv",
    "azure-code": "azure_llm_2023_code__AzurePublicDataset.csv",
}

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
# CSV loading (cached: the files are read once per process, not per workload)
# ---------------------------------------------------------------------------


def _key(path: Path) -> str:
    """Cache key: one entry per file however the caller spelled its path."""
    return str(Path(path).expanduser().resolve())


def _frozen(values: list[float] | list[int] | np.ndarray, dtype: type) -> np.ndarray:
    """Array that cannot be mutated, because cached arrays are shared by all callers."""
    arr = np.asarray(values, dtype=dtype)
    arr.setflags(write=False)
    return arr


def _columns(reader: csv.DictReader, path: str, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")


@functools.lru_cache(maxsize=32)
def _read_lengths(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) token counts of a Vidur/Etalon ``*_stats_*.csv`` file."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        _columns(reader, path, ("num_prefill_tokens", "num_decode_tokens"))
        prompts: list[int] = []
        outputs: list[int] = []
        for row in reader:
            prompts.append(int(float(row["num_prefill_tokens"])))
            outputs.append(int(float(row["num_decode_tokens"])))
    if not prompts:
        raise ValueError(f"{path}: no data rows")
    return _frozen(prompts, np.int64), _frozen(outputs, np.int64)


def _parse_timestamp(text: str) -> tuple[int, float]:
    """``YYYY-MM-DD HH:MM:SS.fffffff`` -> (day ordinal, seconds of day).

    Parsed by hand: the Azure files have 7 fractional digits, and keeping the
    day apart from the seconds avoids losing sub-millisecond precision to a
    huge epoch offset in a float.
    """
    date_s, _, time_s = text.strip().replace("T", " ").partition(" ")
    hh, mm, ss = time_s.split(":")
    return _dt.date.fromisoformat(date_s).toordinal(), int(hh) * 3600 + int(mm) * 60 + float(ss)


@functools.lru_cache(maxsize=32)
def _read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival seconds from the first row, prompt, output), sorted by arrival.

    Reads the Azure format (TIMESTAMP, ContextTokens, GeneratedTokens) and also
    Vidur's reformatted copy of it (arrived_at, num_prefill_tokens,
    num_decode_tokens), which holds the same rows with relative seconds.
    """
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        vidur = "arrived_at" in (reader.fieldnames or [])
        cols = ("arrived_at", "num_prefill_tokens", "num_decode_tokens") if vidur else (
            "TIMESTAMP", "ContextTokens", "GeneratedTokens")  # fmt: skip
        _columns(reader, path, cols)
        days: list[int] = []
        secs: list[float] = []
        prompts: list[int] = []
        outputs: list[int] = []
        for row in reader:
            day, sec = (0, float(row[cols[0]])) if vidur else _parse_timestamp(row[cols[0]])
            days.append(day)
            secs.append(sec)
            prompts.append(int(float(row[cols[1]])))
            outputs.append(int(float(row[cols[2]])))
    if not days:
        raise ValueError(f"{path}: no data rows")
    t = (np.asarray(days, np.int64) - days[0]) * 86400.0 + (np.asarray(secs) - secs[0])
    # The published files are sorted; sort anyway (stable) so a hand-made trace
    # cannot produce decreasing arrivals, which the simulator's clock forbids.
    order = np.argsort(t, kind="stable")
    # Round to the files' 100 ns resolution so that float noise from the
    # subtraction (e.g. 0.0519999999) does not show up in logs and outputs.
    t = np.round(t[order] - t[order[0]], 7)
    p, o = np.asarray(prompts, np.int64)[order], np.asarray(outputs, np.int64)[order]
    return _frozen(t, np.float64), _frozen(p, np.int64), _frozen(o, np.int64)


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


def _draw_classes(rng: np.random.Generator, n: int, slo_mix: Mapping[str, float] | None) -> list[str]:
    """Draw ``n`` app classes. One uniform per request, in request order, so
    request i's class does not depend on how many requests follow it (cutting a
    trace shorter keeps the classes of the rows that remain)."""
    names, cdf = _class_table(slo_mix)
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return [names[i] for i in idx.tolist()]


def _truncate(prompt: np.ndarray, output: np.ndarray, max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit each request into the model context, as a serving front end would.

    The prompt keeps at most ``max_model_len - 1`` tokens so that at least one
    token can be generated; the output is cut where the context is full. Hence
    ``prompt + output <= max_model_len`` and both are >= 1.
    """
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    p = np.clip(prompt, 1, max_model_len - 1)
    o = np.maximum(1, np.minimum(output, max_model_len - p))
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
    max_model_len: int = 2048,
    data_dir: Path | None = None,
) -> list[WorkloadRequest]:
    """The AccelGen evaluation mix: Poisson(``rate``) arrivals in ``[0, duration_s)``.

    Each request is long with probability ``long_fraction``: its (prompt,
    output) pair is one row drawn uniformly from BWB + arXiv together;
    otherwise it is a ShareGPT row. Prompt and output come from the same row
    so their correlation in the data is kept.

    Draw order from ``PCG64(seed)``: inter-arrival gaps, long/short flags,
    long-row indices, short-row indices, app classes.
    """
    _check_positive("rate", rate)
    _check_positive("duration_s", duration_s)
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction!r}")
    _class_table(slo_mix)  # fail before the (possibly slow) first file read
    base = Path(data_dir) if data_dir is not None else traces_dir()
    sg_p, sg_o = _read_lengths(_key(base / SHAREGPT_FILE))
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
    short_idx = rng.integers(0, len(sg_p), size=n)
    classes = _draw_classes(rng, n, slo_mix)

    prompt = np.where(is_long, long_p[long_idx], sg_p[short_idx])
    output = np.where(is_long, long_o[long_idx], sg_o[short_idx])
    prompt, output = _truncate(prompt, output, max_model_len)
    sources = [
        ("bwb" if j < len(bwb_p) else "arxiv") if lg else "sharegpt"
        for lg, j in zip(is_long.tolist(), long_idx.tolist())
    ]
    return _build(arrivals, prompt, output, classes, sources, is_long)


def azure_trace(
    path: Path,
    *,
    time_scale: float = 1.0,
    duration_s: float | None = None,
    seed: int = 0,
    slo_mix: Mapping[str, float] | None = None,
    max_model_len: int = 2048,
    source: str = "trace",
    long_threshold: int = 1024,
) -> list[WorkloadRequest]:
    """Replay an Azure-format trace with its real inter-arrival times.

    Arrivals are relative to the first row and divided by ``time_scale``
    (``time_scale=10`` replays 10x faster, i.e. 10x the load, with the same
    burst shape). With ``duration_s`` only rows arriving before it are kept.
    ``is_long`` means the (truncated) prompt exceeds ``long_threshold``, so it
    always agrees with the ``prompt_len`` the scheduler sees.
    """
    _check_positive("time_scale", time_scale)
    if duration_s is not None:
        _check_positive("duration_s", duration_s)
    _class_table(slo_mix)
    t, p, o = _read_trace(_key(Path(path)))
    arrivals = t / time_scale
    if duration_s is not None:
        keep = arrivals < duration_s
        arrivals, p, o = arrivals[keep], p[keep], o[keep]
    n = len(arrivals)
    rng = np.random.Generator(np.random.PCG64(seed))
    classes = _draw_classes(rng, n, slo_mix)
    prompt, output = _truncate(p, o, max_model_len)
    return _build(arrivals, prompt, output, classes, [source] * n, prompt > long_threshold)


def load_workload(
    name: str,
    *,
    rate: float | None = None,
    duration_s: float = 300.0,
    seed: int = 0,
    time_scale: float = 1.0,
    trace: Path | None = None,
    slo_mix: Mapping[str, float] | None = None,
    max_model_len: int = 2048,
    long_fraction: float = 0.35,
) -> list[WorkloadRequest]:
    """Build a workload by name (the CLI / benchmark entry point).

    ``paper-mix`` needs ``rate``; ``azure-conv`` / ``azure-code`` read the
    Azure files in :func:`traces_dir`; ``trace`` needs ``trace=PATH``. For the
    traces ``duration_s`` cuts the (time-scaled) replay. An argument that does
    not apply to the chosen workload is an error rather than silently ignored,
    so a mistyped benchmark config cannot run a different experiment.
    """
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
    if name == "paper-mix":
        if rate is None:
            raise ValueError("workload 'paper-mix' needs rate=<requests per second> (CLI: --rate)")
        if trace is not None:
            raise ValueError("trace=PATH applies only to workload 'trace', not 'paper-mix'")
        return paper_mix(rate=rate, duration_s=duration_s, seed=seed, long_fraction=long_fraction,
                         slo_mix=slo_mix, max_model_len=max_model_len)  # fmt: skip
    if rate is not None:
        raise ValueError(
            f"rate applies only to 'paper-mix'; workload {name!r} keeps the trace's own arrivals "
            "(pass time_scale=K to replay it K times faster)"
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
                       max_model_len=max_model_len, source=source)  # fmt: skip
