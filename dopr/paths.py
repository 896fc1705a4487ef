"""Where the repo and its data live: the one place that knows the repo root and the default data root.

Runs take the data root from the ``paths`` config (``paths.data``, default ``data``); task configs
derive their locations from it (``${paths.data}/minari``, ``${paths.data}/robomimic``,
``${paths.data}/cache``). Library callers without Hydra get the same defaults from here.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "data"


def resolve(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded; a relative path is taken against the repo root, not the cwd
    (a run started from another directory, or by a launcher that changes it, reads the same files)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path
