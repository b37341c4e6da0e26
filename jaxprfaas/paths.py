"""Where the project's data files live (configs/ sits at the repo top, beside the packages)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def config_path(kind: str, name_or_path: str) -> Path:
    """Resolve `name_or_path` to a YAML file: an existing path, or a preset in configs/<kind>/."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / kind / f"{name_or_path}.yaml"
