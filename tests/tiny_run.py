"""``python run.py`` in a subprocess on a tiny lds config, for the tests that need the real entry point
(Hydra's composition, the run-dir checks, the exit status)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
TINY = ("task=lds", "logger=none", "trainer.steps=20", "trainer.eval_every=10", "trainer.progress=false",
        "trainer.threads=1", "task.eval_episodes=4", "task.max_episode_steps=20")


def run_py(run_dir, *args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, f"hydra.run.dir={run_dir}", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
