"""The written analysis of docs/results.md, kept beside the numbers it reads."""

from __future__ import annotations

from typing import Any


def analysis(data: dict[str, Any]) -> str:
    return "## What the numbers say\n\n(to be written from the run)\n"
