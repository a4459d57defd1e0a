"""Device profiles shipped with AccelGen (JSON), loadable by name."""

from __future__ import annotations

from pathlib import Path

from accelgen.core.profile import DeviceProfile

PROFILE_DIR = Path(__file__).resolve().parent
DEFAULT_PROFILE = "opt-13b_a100-80g"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> DeviceProfile:
    """Load a shipped profile by name, or any profile JSON by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return DeviceProfile.load(path)
    shipped = PROFILE_DIR / f"{name_or_path}.json"
    if shipped.exists():
        return DeviceProfile.load(shipped)
    raise FileNotFoundError(
        f"no device profile {str(name_or_path)!r}: pass a JSON path or one of {', '.join(available_profiles())}"
    )
