"""Scripted experts for robosuite Lift, PickPlaceCan and NutAssemblySquare.

Each expert is a small waypoint state machine in Cartesian space that emits OSC_POSE *delta*
actions ``[dx, dy, dz, drx, dry, drz, gripper]`` in [-1, 1] (robosuite scales them to at most
5 cm and 0.5 rad per control step; gripper -1 opens, +1 closes). It reads privileged simulator
state (object poses), which a learned policy does not need to match: the demonstrations are
what the policy learns from.

Per-episode randomization (approach height, speed) and Gaussian action noise make the data
less uniform than a fixed script, like human demonstrations are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from dopr.envs.robosuite_envs import RobosuiteEnv
from dopr.paths import resolve

_MAX_POS_STEP = 0.05  # metres per unit action (robosuite's OSC_POSE output_max)
_MAX_ROT_STEP = 0.5  # radians per unit action


@dataclass
class Waypoint:
    """Drive the end effector to ``pos`` (and yaw ``yaw`` if given) with gripper command ``grip``.

    ``pos`` may be a callable(env) -> position, re-evaluated every step (closed-loop targets).

    Done after ``hold`` steps once within ``tol`` metres (or after ``hold`` steps if ``tol`` is None).
    """

    pos: np.ndarray | Callable[[RobosuiteEnv], np.ndarray]
    grip: float
    tol: float | None = 0.01
    hold: int = 0
    yaw: float | None = None
    max_steps: int = 120


@dataclass
class ScriptedExpert:
    """Base class: a list of waypoints, planned at reset from the initial scene.

    Args:
        action_noise: std of Gaussian noise added to the arm part of every action.
        randomize: per-episode random approach heights and speeds.
        seed: seeds the expert's own randomness (noise, randomization).
    """

    action_noise: float = 0.0
    randomize: bool = True
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self._plan: list = []
        self._index = 0
        self._steps_in_waypoint = 0
        self._steps_within_tol = 0
        self._gain = 10.0
        self._integral = np.zeros(3)
        self._home_rotation = Rotation.identity()

    # ----- helpers for subclasses -----
    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high)) if self.randomize else 0.5 * (low + high)

    @staticmethod
    def eef_pos(env: RobosuiteEnv) -> np.ndarray:
        return np.asarray(env.raw_obs["robot0_eef_pos"], dtype=np.float64)

    @staticmethod
    def eef_rotation(env: RobosuiteEnv) -> Rotation:
        return Rotation.from_quat(env.raw_obs["robot0_eef_quat"])  # robosuite quats are xyzw, like scipy

    # ----- the loop -----
    def reset(self, env: RobosuiteEnv) -> None:
        self._index = 0
        self._steps_in_waypoint = 0
        self._steps_within_tol = 0
        self._integral = np.zeros(3)
        self._gain = self.uniform(7.0, 12.0)
        self._home_rotation = self.eef_rotation(env)
        self._plan = self.plan(env)

    def plan(self, env: RobosuiteEnv) -> list:
        """Return waypoints; an entry may be a callable(env) -> Waypoint, evaluated when reached."""
        raise NotImplementedError

    def _current(self, env: RobosuiteEnv) -> Waypoint:
        entry = self._plan[min(self._index, len(self._plan) - 1)]
        if callable(entry):
            entry = entry(env)
            self._plan[min(self._index, len(self._plan) - 1)] = entry
        return entry

    def act(self, env: RobosuiteEnv) -> np.ndarray:
        waypoint = self._current(env)
        eef = self.eef_pos(env)
        target = waypoint.pos(env) if callable(waypoint.pos) else waypoint.pos
        error = target - eef
        # integral term: a loaded arm otherwise settles a centimetre or two short of its goal
        self._integral = np.clip(self._integral + 0.1 * error, -0.05, 0.05)
        action = np.zeros(7)
        action[:3] = np.clip(self._gain * (error + self._integral) / (_MAX_POS_STEP * 10.0), -1.0, 1.0)
        target_rotation = self._home_rotation
        if waypoint.yaw is not None:
            target_rotation = Rotation.from_euler("z", waypoint.yaw) * self._home_rotation
        rot_error = (target_rotation * self.eef_rotation(env).inv()).as_rotvec()
        action[3:6] = np.clip(2.0 * rot_error / _MAX_ROT_STEP, -1.0, 1.0)
        action[6] = waypoint.grip
        if self.action_noise > 0:
            action[:6] += self.rng.normal(0.0, self.action_noise, size=6)
        action = np.clip(action, -1.0, 1.0)

        # advance the plan
        self._steps_in_waypoint += 1
        within = waypoint.tol is None or np.linalg.norm(error) < waypoint.tol
        if waypoint.yaw is not None:
            within = within and np.linalg.norm(rot_error) < 0.05
        self._steps_within_tol = self._steps_within_tol + 1 if within else 0
        if self._steps_within_tol > waypoint.hold or self._steps_in_waypoint >= waypoint.max_steps:
            self._index += 1
            self._integral = np.zeros(3)
            self._steps_in_waypoint = 0
            self._steps_within_tol = 0
        return action


OPEN, CLOSED = -1.0, 1.0


class LiftExpert(ScriptedExpert):
    """Above the cube, down, close, lift."""

    def plan(self, env):
        cube = np.asarray(env.raw_obs["cube_pos"], dtype=np.float64)
        above = cube + [0.0, 0.0, self.uniform(0.06, 0.12)]
        grasp = cube + [0.0, 0.0, self.uniform(-0.01, 0.0)]
        lifted = cube + [0.0, 0.0, self.uniform(0.15, 0.25)]
        return [
            Waypoint(above, OPEN, tol=0.015),
            Waypoint(grasp, OPEN, tol=0.008),
            Waypoint(grasp, CLOSED, tol=None, hold=8),
            Waypoint(lifted, CLOSED, tol=0.02, max_steps=200),
        ]


class CanExpert(ScriptedExpert):
    """Grasp the can, carry it over its bin at a safe height, lower, release, retreat."""

    def plan(self, env):
        sim_env = env.env
        can = np.asarray(env.raw_obs["Can_pos"], dtype=np.float64)
        target = np.asarray(sim_env.target_bin_placements[sim_env.object_to_id["can"]], dtype=np.float64)
        # the quadrant's centre is at the edge of the Panda's reach, where the arm sags; any point
        # in the quadrant counts, so aim a few centimetres nearer the robot
        target = target + [-0.03, -0.06, 0.0]
        carry_z = sim_env.bin2_pos[2] + self.uniform(0.16, 0.2)  # higher is out of reach over the far bin
        above = can + [0.0, 0.0, self.uniform(0.08, 0.12)]
        grasp = can + [0.0, 0.0, self.uniform(-0.005, 0.01)]
        lower_z = sim_env.bin2_pos[2] + 0.12
        return [
            Waypoint(above, OPEN, tol=0.015),
            Waypoint(grasp, OPEN, tol=0.02, hold=2, max_steps=60),
            Waypoint(grasp, CLOSED, tol=None, hold=10),
            Waypoint(np.array([can[0], can[1], carry_z]), CLOSED, tol=0.025),
            Waypoint(np.array([target[0], target[1], carry_z]), CLOSED, tol=0.025),
            Waypoint(np.array([target[0], target[1], lower_z]), CLOSED, tol=0.025),
            Waypoint(np.array([target[0], target[1], lower_z]), OPEN, tol=None, hold=8),
            Waypoint(np.array([target[0], target[1], carry_z + 0.05]), OPEN, tol=0.02, max_steps=200),
        ]


class SquareExpert(ScriptedExpert):
    """Grasp the square nut's handle with the gripper across it, turn the nut square to the peg,
    carry it above the peg and lower it on."""

    def plan(self, env):
        sim_env = env.env
        sim = sim_env.sim
        nut = sim_env.nuts[0]
        handle = np.array(sim.data.site_xpos[sim.model.site_name2id(nut.important_sites["handle"])])
        nut_center = np.array(sim.data.body_xpos[sim_env.obj_body_id[nut.name]])
        handle_dir = handle[:2] - nut_center[:2]
        handle_yaw = float(np.arctan2(handle_dir[1], handle_dir[0]))
        # close the fingers across the handle: gripper yaw perpendicular to the handle, the
        # smallest turn from the home orientation (fingers close along the gripper's y axis)
        grasp_yaw = _wrap_half_pi(handle_yaw + np.pi / 2 - self._home_finger_axis_yaw(env))
        nut_yaw = Rotation.from_quat(sim.data.body_xquat[sim_env.obj_body_id[nut.name]][[1, 2, 3, 0]]).as_euler("xyz")[2]
        turn = _wrap_quarter_pi(-nut_yaw)  # the square hole fits the peg at any multiple of 90 degrees
        peg = np.array(sim.data.body_xpos[sim_env.peg1_body_id])
        above = handle + [0.0, 0.0, self.uniform(0.04, 0.08)]
        grasp_dz = self.uniform(-0.005, 0.0)
        carry_z = peg[2] + self.uniform(0.2, 0.25)

        def handle_now(env_now):
            # the nut is spawned a few centimetres up and falls while we approach: read its height late
            return np.array(sim.data.site_xpos[sim.model.site_name2id(nut.important_sites["handle"])])

        def nut_over_peg(height_above_peg):
            # closed loop on the nut itself: move the grasp so the nut centre is over the peg
            def target(env_now):
                nut_now = np.array(sim.data.body_xpos[sim_env.obj_body_id[nut.name]])
                eef = self.eef_pos(env_now)
                return eef + np.array([peg[0], peg[1], peg[2] + height_above_peg]) - nut_now

            return target

        square_yaw = grasp_yaw + turn  # the nut is square to the peg at this gripper yaw
        return [
            Waypoint(above, OPEN, tol=0.015, yaw=grasp_yaw),
            lambda e: Waypoint(handle_now(e) + [0.0, 0.0, grasp_dz], OPEN, tol=0.008, yaw=grasp_yaw),
            lambda e: Waypoint(handle_now(e) + [0.0, 0.0, grasp_dz], CLOSED, tol=None, hold=10, yaw=grasp_yaw),
            Waypoint(np.array([handle[0], handle[1], carry_z]), CLOSED, tol=0.03, yaw=grasp_yaw),
            Waypoint(nut_over_peg(carry_z - peg[2]), CLOSED, tol=0.02, yaw=square_yaw, max_steps=150),
            Waypoint(nut_over_peg(0.15), CLOSED, tol=0.006, hold=3, yaw=square_yaw, max_steps=60),
            Waypoint(nut_over_peg(0.0), CLOSED, tol=0.03, yaw=square_yaw, max_steps=80),
            lambda e: Waypoint(self.eef_pos(e), OPEN, tol=None, hold=8),
            lambda e: Waypoint(self.eef_pos(e) + [0.0, 0.0, 0.1], OPEN, tol=0.02),
        ]

    def _home_finger_axis_yaw(self, env) -> float:
        axis = self._home_rotation.apply([0.0, 1.0, 0.0])
        return float(np.arctan2(axis[1], axis[0]))


def _wrap_quarter_pi(angle: float) -> float:
    """Wrap to (-pi/4, pi/4]: a square is the same turned by pi/2."""
    return float((angle + np.pi / 4) % (np.pi / 2) - np.pi / 4)


def _wrap_half_pi(angle: float) -> float:
    """Wrap to (-pi/2, pi/2]: a parallel gripper is the same turned by pi."""
    return float((angle + np.pi / 2) % np.pi - np.pi / 2)


EXPERTS = {"Lift": LiftExpert, "PickPlaceCan": CanExpert, "NutAssemblySquare": SquareExpert}


def make_expert(env_name: str, **kwargs) -> ScriptedExpert:
    if env_name not in EXPERTS:
        raise ValueError(f"No scripted expert for env {env_name!r}; experts exist for {sorted(EXPERTS)}.")
    return EXPERTS[env_name](**kwargs)


def run_expert_episode(
    env: RobosuiteEnv, expert: ScriptedExpert, seed: int, max_steps: int, record=None
) -> tuple[bool, int]:
    """Roll the expert out from ``env.reset(seed)``. ``record(obs, action, reward, success, state)``
    is called for every step (obs is the observation the action was taken from).
    Stops at success (a few steps after, so the success state is in the data) or max_steps."""
    obs = env.reset(seed=seed)
    expert.reset(env)
    for step in range(max_steps):
        state = env.get_state()
        action = expert.act(env)
        next_obs, reward, success = env.step(action)
        if record is not None:
            record(obs, action, reward, success, state, next_obs)
        obs = next_obs
        if success:
            return True, step + 1
    return False, max_steps


ENV_ALIASES = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}


def _stack(steps: list[dict], keys: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: np.stack([s[k] for s in steps]) for k in keys}


def _recorded_keys(obs: dict) -> list[str]:
    # robosuite's concatenations (robot0_proprio-state) duplicate the per-part keys; robomimic drops them
    return sorted(k for k in obs if not k.endswith("-state"))


def generate_demos(
    env_name: str,
    num_demos: int,
    out_path: str,
    seed: int = 0,
    action_noise: float = 0.05,
    randomize: bool = True,
    camera_names: Sequence[str] = (),
    image_size: int = 84,
    max_steps: int = 400,
    valid_fraction: float = 0.1,
    keep_failures: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Roll out the scripted expert and write successful episodes to a robomimic-layout hdf5.

    Episode i starts from env seed ``seed * 100_000 + attempt``; failed attempts are discarded
    (unless ``keep_failures``) and counted in the returned expert success rate.
    """
    from dopr.data.robomimic_hdf5 import DemoWriter
    from dopr.envs.robosuite_envs import make_env_args

    env_name = ENV_ALIASES.get(env_name, env_name)
    env_args = make_env_args(env_name, camera_names=camera_names, image_size=image_size)
    env = RobosuiteEnv(env_args, camera_names=camera_names, image_size=image_size)
    expert = make_expert(env_name, action_noise=action_noise, randomize=randomize, seed=seed)
    attempts = successes = 0
    lengths = []
    with DemoWriter(out_path, env_args, valid_fraction=valid_fraction) as writer:
        while len(writer.names) < num_demos:
            if attempts >= 3 * num_demos + 10:
                raise RuntimeError(
                    f"The {env_name} expert succeeded only {successes}/{attempts} times; "
                    "lower action_noise or check the environment."
                )
            steps: list[dict] = []

            def record(obs, action, reward, success, state, next_obs):
                steps.append(dict(obs=obs, action=action, reward=reward, done=success, state=state, next_obs=next_obs))

            ok, length = run_expert_episode(env, expert, seed=seed * 100_000 + attempts, max_steps=max_steps, record=record)
            attempts += 1
            successes += ok
            if not ok and not keep_failures:
                continue
            lengths.append(length)
            keys = _recorded_keys(steps[0]["obs"])
            writer.add_demo(
                obs=_stack([s["obs"] for s in steps], keys),
                next_obs=_stack([s["next_obs"] for s in steps], keys),
                actions=np.stack([s["action"] for s in steps]),
                rewards=np.array([s["reward"] for s in steps]),
                dones=np.array([s["done"] for s in steps]),
                states=np.stack([s["state"] for s in steps]),
                model_file=env.model_xml(),
            )
            if log is not None and len(writer.names) % 10 == 0:
                log(f"{env_name}: {len(writer.names)}/{num_demos} demos, expert success {successes}/{attempts}")
        writer.data.attrs["expert_success_rate"] = successes / attempts
        writer.data.attrs["expert_attempts"] = attempts
        # how the file was made: a task that reuses a generated file by name checks these against its settings
        writer.data.attrs["expert_action_noise"] = float(action_noise)
        writer.data.attrs["expert_seed"] = int(seed)
        writer.data.attrs["expert_randomize"] = bool(randomize)
    env.close()
    stats = {
        "env_name": env_name,
        "demos": num_demos,
        "attempts": attempts,
        "expert_success_rate": successes / attempts,
        "mean_length": float(np.mean(lengths)),
    }
    if log is not None:
        log(f"wrote {out_path}: {stats}")
    return stats


def generated_demos_path(demos_dir: str | os.PathLike, env_name: str, obs: str, num_demos: int, seed: int) -> Path:
    """Where generated demos of these settings live (scripts/make_demos.py writes the same name)."""
    return resolve(demos_dir) / f"{env_name}_{obs}_{num_demos}demos_seed{seed}.hdf5"


def scripted_demos(demos_dir: str | os.PathLike, env_name: str, obs: str, num_demos: int, seed: int,
                   action_noise: float, camera_names: Sequence[str] = ()) -> Path:
    """The generated demos file of these settings, written by the scripted expert on first use.

    The name does not carry the noise, so a file made with another noise is refused, not reused silently.
    """
    path = generated_demos_path(demos_dir, env_name, obs, num_demos, seed)
    if not path.exists():
        print(f"[robomimic] {path} not found: generating {num_demos} scripted {env_name} demos (once)")
        generate_demos(env_name, num_demos, str(path), seed=seed, action_noise=action_noise, camera_names=camera_names)
        return path
    import h5py

    with h5py.File(path, "r") as f:
        made_with = f["data"].attrs.get("expert_action_noise")
    if made_with is not None and float(made_with) != float(action_noise):
        raise ValueError(f"{path} was generated with action noise {float(made_with):g}, not task.gen_noise="
                         f"{float(action_noise):g}; delete it to regenerate it, or give the new demos their "
                         f"own task.demos_dir=<dir>")
    return path
