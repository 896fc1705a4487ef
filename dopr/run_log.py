"""Where library output goes during a run.

Log records of every library (robosuite's ~900 controller warnings a run, MuJoCo, Gymnasium,
Hugging Face, ...) and Python warnings go to ``<run_dir>/run.log``; only errors also reach the
terminal, which keeps the progress bar and the ``[dopr]`` lines. Spawned rollout workers append to
the same file (they find it through an environment variable, which spawned processes inherit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

RUN_LOG = "run.log"
_PATH_VARIABLE = "DOPR_RUN_LOG"
_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"


def _install(path: Path) -> list[logging.Handler]:
    """Make the root logger write to ``path`` (appended: a resumed run continues its log) and errors
    to stderr, with ``warnings.warn`` routed through it; returns the handlers it replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    replaced = list(root.handlers)
    for handler in replaced:
        root.removeHandler(handler)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    root.addHandler(file_handler)
    root.addHandler(errors)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    os.environ[_PATH_VARIABLE] = str(path.resolve())
    return replaced


@contextlib.contextmanager
def logs_to(path: Path | str) -> Iterator[None]:
    """Library logs go to ``path`` inside the block; the root logger's own handlers (Hydra's, which
    print a sweep's job lines) come back after it."""
    root = logging.getLogger()
    level = root.level
    replaced = _install(Path(path))
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in replaced:
            root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        os.environ.pop(_PATH_VARIABLE, None)


def follow_parent_log() -> None:
    """In a spawned worker process: log to the parent run's file, if it has one."""
    path = os.environ.get(_PATH_VARIABLE)
    if path:
        _install(Path(path))
