"""Where ``bench/`` and ``scripts/`` come from: the source checkout, never an installed package.

They are the top of the layering (docs/architecture.md) with the CLI: research tools that read
``../shared/traces`` and write ``docs/``. The commands that use them find the checkout next to
this package (an editable install, as ``make install`` does) and fail with a clear message
when there is none; the service commands never import them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def require_checkout() -> Path:
    """Make ``bench`` and ``scripts`` importable from the checkout this package lives in."""
    if not (ROOT / "bench" / "__init__.py").is_file():
        raise SystemExit(f"accelgen: this command needs the AccelGen source checkout (bench/ and scripts/ are "
                         f"not installed, and {ROOT} has none): run it from a clone after `make install`")
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    return ROOT
