"""Train one task with one optimizer; report validation loss and the test-time metric.

    python run.py                                   # the default task and optimizer
    python run.py task=lds opt=dopr_adamw seed=1    # choose
    python run.py -m task=lds opt=adamw,dopr_adamw seed=0,1,2,3,4   # sweep (Hydra multirun)
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from dopr.launch import launch

    return launch(cfg)


if __name__ == "__main__":
    main()
