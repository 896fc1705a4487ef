"""Generate scripted-expert demonstrations in the robomimic hdf5 layout.

    python scripts/make_demos.py env=Lift gen_demos=60      # data/robomimic/Lift_low_dim_60demos_seed0.hdf5
    python scripts/make_demos.py env=can gen_demos=50 cameras=[agentview,robot0_eye_in_hand] \\
        out=data/robomimic/can_image.hdf5

Keys (key=value, like run.py's overrides):
    env             required: Lift, PickPlaceCan, NutAssemblySquare or an alias (lift, can, square)
    out             output .hdf5 path (a relative one is taken against the repo root); default: the file
                    task=robomimic_* with dataset=null reads, <demos_dir>/<env>_<obs>_<gen_demos>demos_seed<seed>.hdf5
    demos_dir       where the default out goes, as task.demos_dir (default <repo>/data/robomimic, the
                    default ${paths.data}/robomimic; data/ is git-ignored)
    gen_demos       successful demonstrations to write (default 100)
    seed            seed of the expert's randomization and action noise (default 0)
    noise           std of Gaussian action noise (default 0.05)
    randomize       randomize approach heights and speeds (default true)
    cameras         cameras to record as <camera>_image, e.g. [agentview] (default [], low-dim only)
    image_size      camera image side in pixels (default 84)
    max_steps       step limit per attempt (default 400)
    valid_fraction  fraction of demos in the validation split (default 0.1)

Prints the expert's success rate (failed attempts are discarded, not written).
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopr.envs.scripted import ENV_ALIASES, EXPERTS, generate_demos, generated_demos_path  # noqa: E402
from dopr.paths import resolve  # noqa: E402
from dopr.cli import parse_script_args  # noqa: E402
from dopr.tasks.robomimic import DEFAULT_DEMOS_DIR  # noqa: E402


@dataclass
class MakeDemosArgs:
    env: str
    out: str | None = None
    demos_dir: str | None = None
    gen_demos: int = 100
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
        if self.gen_demos < 1:
            raise ValueError(f"gen_demos must be >= 1, got {self.gen_demos}")


def main(argv: list[str]) -> dict:
    args = parse_script_args(argv, MakeDemosArgs, __doc__)
    env_name = ENV_ALIASES.get(args.env, args.env)
    obs = "image" if args.cameras else "low_dim"
    out = resolve(args.out) if args.out else generated_demos_path(
        args.demos_dir or DEFAULT_DEMOS_DIR, env_name, obs, args.gen_demos, args.seed)
    stats = generate_demos(
        env_name,
        args.gen_demos,
        str(out),
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
