"""Generate scripted-expert demonstrations in the robomimic hdf5 layout.

    python scripts/make_demos.py --env Lift --num-demos 100 --out data/robomimic/lift_low_dim.hdf5
    python scripts/make_demos.py --env can --num-demos 50 --cameras agentview,robot0_eye_in_hand \
        --out data/robomimic/can_image.hdf5

Prints the expert's success rate (failed attempts are discarded, not written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dopr.envs.scripted import ENV_ALIASES, EXPERTS, generate_demos  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, help=f"one of {sorted(EXPERTS)} or aliases {sorted(ENV_ALIASES)}")
    parser.add_argument("--num-demos", type=int, default=100)
    parser.add_argument("--out", required=True, help="output .hdf5 path (keep it under data/, which git ignores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.05, help="std of Gaussian action noise")
    parser.add_argument("--no-randomize", action="store_true", help="fixed approach heights and speeds")
    parser.add_argument("--cameras", default="", help="comma-separated cameras to record as <camera>_image")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    env_name = ENV_ALIASES.get(args.env, args.env)
    if env_name not in EXPERTS:
        parser.error(f"--env {args.env!r}: no scripted expert; choose one of {sorted(EXPERTS)} or {sorted(ENV_ALIASES)}")
    stats = generate_demos(
        env_name,
        args.num_demos,
        args.out,
        seed=args.seed,
        action_noise=args.noise,
        randomize=not args.no_randomize,
        camera_names=[c for c in args.cameras.split(",") if c],
        image_size=args.image_size,
        max_steps=args.max_steps,
        valid_fraction=args.valid_fraction,
    )
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
