"""Reading the trace and length CSVs (cached: each file is read once per process).

Two formats: the Vidur / Etalon ``*_stats_*.csv`` length files (and the Alpaca / ShareGPT
first-turn files, which share their columns) and the Azure 2023 traces, in Azure's own format
or Vidur's reformatted copy. Cached arrays are read-only because every caller shares them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
from pathlib import Path

import numpy as np



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
