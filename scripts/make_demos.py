"""Generate scripted-expert demonstrations in the robomimic hdf5 layout.

    python scripts/make_demos.py env=Lift num_demos=100 out=data/robomimic/lift_low_dim.hdf5
    python scripts/make_demos.py env=can num_demos=50 cameras=[agentview,robot0_eye_in_hand] \\
        out=data/robomimic/can_image.hdf5

Keys (key=value, like run.py's overrides):
    env             required: Lift, PickPlaceCan, NutAssemblySquare or an alias (lift, can, square)
    out             required: output .hdf5 path (keep it under data/, which git ignores)
    num_demos       successful demonstrations to write (default 100)
    seed            seed of the expert's randomization and action noise (default 0)
    noise           std of Gaussian action noise (default 0.05)
    randomize       randomize approach heights and speeds (default true)
    cameras         cameras to record as <camera>_image, e.g. [agentview] (default [], low-dim only)
    image_size      camera image side in pixels (default 84)
    max_steps       step limit per attempt (default 400)
    valid_fraction  fraction of demos in the validation split (default 0.1)

Prints the expert's success rate (failed attempts are discarded, not written).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopr.envs.scripted import ENV_ALIASES, EXPERTS, generate_demos  # noqa: E402
from dopr.script_args import parse_script_args  # noqa: E402


@dataclass
class MakeDemosArgs:
    env: str
    out: str
    num_demos: int = 100
    seed: int = 0
    noise: float = 0.05
    randomize: bool = True
    cameras: list[str] = field(default_factory=list)
    image_size: int = 84
    max_steps: int = 400
    valid_fraction: float = 0.1

    def __post_init__(self):
        if ENV_ALIASES.get(self.env, self.env) not in EXPERTS:
            raise ValueError(f"env={self.env!r}: no scripted expert; choose one of {sorted(EXPERTS)} "
                             f"or an alias {sorted(ENV_ALIASES)}")
        if self.num_demos < 1:
            raise ValueError(f"num_demos must be >= 1, got {self.num_demos}")


def main(argv: list[str]) -> dict:
    args = parse_script_args(argv, MakeDemosArgs, __doc__)
    stats = generate_demos(
        ENV_ALIASES.get(args.env, args.env),
        args.num_demos,
        args.out,
        seed=args.seed,
        action_noise=args.noise,
        randomize=args.randomize,
        camera_names=args.cameras,
        image_size=args.image_size,
        max_steps=args.max_steps,
        valid_fraction=args.valid_fraction,
    )
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
