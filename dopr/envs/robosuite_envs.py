"""robosuite 1.5 environments built from robomimic-style ``env_args``, headless.

robomimic stores how a dataset's environment was made as JSON in the hdf5 file
(``data.attrs["env_args"] = {"env_name", "type", "env_kwargs"}``). This module turns that
metadata back into a live robosuite env, so a dataset (or a checkpoint holding its env_args)
is enough to roll out a policy. We depend on robosuite directly: robomimic 0.3.0 (the version
on PyPI) imports mujoco_py in its env wrapper and cannot be used with robosuite 1.5.

Observations are returned under robomimic's key names: ``object`` (robosuite's
``object-state``), ``robot0_eef_pos``, ``robot0_eef_quat``, ``robot0_gripper_qpos``, ...,
and ``<camera>_image`` (uint8 HWC) for cameras.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import subprocess
import sys
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

ROBOSUITE_ENV_TYPE = 1  # robomimic's EB.EnvType.ROBOSUITE_TYPE

# Which robosuite observation becomes which robomimic key (only renames; other keys pass through).
_RENAMES = {"object-state": "object"}

_GL_PROBE = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"
_selected_backend: str | None = None


def _gl_backend_works(backend: str) -> bool:
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        result = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def select_gl_backend() -> str:
    """Pick a headless OpenGL backend for MuJoCo rendering: EGL if it works, else OSMesa.

    A backend already named in ``MUJOCO_GL`` is respected. Each candidate is probed in a
    subprocess, because a failed GL initialisation can leave the current process unusable.
    Must run before robosuite renders anything; we also patch robosuite's cached choice,
    which it reads from the environment at import time.
    """
    global _selected_backend
    if _selected_backend is not None:
        return _selected_backend
    requested = os.environ.get("MUJOCO_GL", "").strip().lower()
    if requested:
        backend = requested
    elif _gl_backend_works("egl"):
        backend = "egl"
    elif _gl_backend_works("osmesa"):
        backend = "osmesa"
    else:
        raise RuntimeError(
            "No headless OpenGL backend works for MuJoCo rendering (tried EGL and OSMesa). "
            "Install OSMesa with `apt-get install -y libosmesa6`, or use a GPU with EGL drivers, "
            "or train with task.obs=low_dim (no rendering needed)."
        )
    os.environ["MUJOCO_GL"] = backend
    os.environ["PYOPENGL_PLATFORM"] = backend
    if "robosuite.utils.binding_utils" in sys.modules:
        sys.modules["robosuite.utils.binding_utils"]._MUJOCO_GL = backend
    log.info("MuJoCo rendering backend: %s", backend)
    _selected_backend = backend
    return backend


def import_robosuite():
    """``import robosuite``, with its log records sent to the root logger (the run's log file).

    robosuite prints every record through a console handler of its own, set up while it is
    imported: warnings about its private macro file, optional packages, and one per missing robot
    part each time an env is made (~900 lines a run). That handler goes; the records propagate.
    """
    if "robosuite" not in sys.modules:
        with contextlib.redirect_stderr(io.StringIO()):  # what it prints while importing
            import robosuite  # noqa: F401
    logger = logging.getLogger("robosuite_logs")
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)
    if not logger.handlers:  # with no root handler either, drop the records (not Python's last-resort print)
        logger.addHandler(logging.NullHandler())
    return sys.modules["robosuite"]


def default_controller_config(robot: str = "Panda") -> dict:
    """The OSC_POSE delta controller (robosuite's BASIC composite) that robomimic's PH demos use."""
    import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    return load_composite_controller_config(controller="BASIC", robot=robot)


def make_env_args(
    env_name: str,
    robots: Sequence[str] = ("Panda",),
    camera_names: Sequence[str] = (),
    image_size: int = 84,
    **extra_env_kwargs: Any,
) -> dict:
    """robomimic-style env_args for a robosuite task (what make_demos writes into the hdf5)."""
    env_kwargs = {
        "robots": list(robots),
        "controller_configs": default_controller_config(robots[0]),
        "has_renderer": False,
        "has_offscreen_renderer": bool(camera_names),
        "use_camera_obs": bool(camera_names),
        "use_object_obs": True,
        "ignore_done": True,
        "reward_shaping": False,
        "control_freq": 20,
        "camera_names": list(camera_names) or ["agentview"],
        "camera_heights": image_size,
        "camera_widths": image_size,
        "camera_depths": False,
    }
    env_kwargs.update(extra_env_kwargs)
    return {"env_name": env_name, "type": ROBOSUITE_ENV_TYPE, "env_kwargs": env_kwargs}


def convert_controller_configs(env_kwargs: dict) -> dict:
    """Return env_kwargs whose controller config robosuite 1.5 accepts.

    Datasets made with robosuite <= 1.4 (all of robomimic v0.1) store a single arm "part"
    controller config ({"type": "OSC_POSE", ...}); robosuite 1.5 wants a composite config.
    robosuite's own refactor_composite_controller_config does the conversion.
    """
    import_robosuite()
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    env_kwargs = copy.deepcopy(env_kwargs)
    robots = env_kwargs.get("robots", ["Panda"])
    robots = [robots] if isinstance(robots, str) else list(robots)
    config = env_kwargs.get("controller_configs")
    if config is None:
        env_kwargs["controller_configs"] = default_controller_config(robots[0])
    elif isinstance(config, dict):
        env_kwargs["controller_configs"] = refactor_composite_controller_config(config, robots[0], ["right"])
    else:  # one config per robot
        env_kwargs["controller_configs"] = [
            refactor_composite_controller_config(c, r, ["right"]) for c, r in zip(config, robots)
        ]
    return env_kwargs


def _reseed(env: Any, seed: int) -> None:
    """Make the next reset's object placement a function of ``seed`` alone."""
    rng = np.random.default_rng(seed)
    env.rng = rng
    stack = [getattr(env, "placement_initializer", None)]
    while stack:
        sampler = stack.pop()
        if sampler is None:
            continue
        sampler.rng = rng
        stack.extend(getattr(sampler, "samplers", {}).values())


class RobosuiteEnv:
    """A robosuite env with robomimic observation keys, seeded resets and a success flag.

    Args:
        env_args: robomimic-style {"env_name", "env_kwargs"} (as stored in datasets).
        camera_names: cameras to render (empty: no rendering at all, the fast path).
        image_size: rendered image height and width.
        fast_render: switch off shadows and reflections (about 2-3x faster on CPU rendering).
        render_camera: a camera ``render()`` draws from (an offscreen renderer, no camera observations).
    """

    def __init__(
        self,
        env_args: dict,
        camera_names: Sequence[str] = (),
        image_size: int | None = None,
        fast_render: bool = True,
        render_camera: str | None = None,
    ):
        if "env_name" not in env_args:
            raise ValueError(f"env_args must name the robosuite task under 'env_name'; got keys {sorted(env_args)}")
        camera_names = list(camera_names)
        if camera_names or render_camera:
            select_gl_backend()
        robosuite = import_robosuite()

        kwargs = convert_controller_configs(env_args.get("env_kwargs", {}))
        kwargs.update(
            has_renderer=False,
            has_offscreen_renderer=bool(camera_names or render_camera),
            use_camera_obs=bool(camera_names),
            hard_reset=False,  # re-building the model on every reset costs ~0.3 s and changes nothing
            # The scene's own draws (Lift's cube side, 0.020-0.022 m) come from env.rng at construction,
            # which robosuite seeds from fresh entropy unless given a seed: every process (demo
            # generation, each clone's evaluation) got its own cube. Resets reseed env.rng per episode.
            seed=0,
            ignore_done=True,  # episode length is the rollout's business
        )
        if camera_names:
            kwargs["camera_names"] = camera_names
            size = image_size or kwargs.get("camera_heights", 84)
            kwargs["camera_heights"] = kwargs["camera_widths"] = int(size)
            kwargs["camera_depths"] = False
        self.env_name = env_args["env_name"]
        self.camera_names = camera_names
        self.render_camera = render_camera
        self.fast_render = fast_render
        self.env = robosuite.make(self.env_name, **kwargs)
        self._apply_render_options()
        self.action_dim = int(self.env.action_dim)
        self.raw_obs: dict | None = None

    def _apply_render_options(self) -> None:
        if (self.camera_names or self.render_camera) and self.fast_render:
            model = self.env.sim.model
            model.light_castshadow[:] = 0
            model.mat_reflectance[:] = 0

    def _convert(self, raw: dict) -> dict[str, np.ndarray]:
        self.raw_obs = raw
        return {_RENAMES.get(k, k): np.asarray(v) for k, v in raw.items()}

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:
            _reseed(self.env, seed)
        obs = self._convert(self.env.reset())
        self._apply_render_options()
        return obs

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool]:
        """One control step. Returns (obs, reward, success)."""
        raw, reward, _, _ = self.env.step(np.asarray(action, dtype=np.float64))
        return self._convert(raw), float(reward), self.is_success()

    def render(self, size: int | None = None) -> np.ndarray:
        """The ``render_camera`` view of the current state, (size, size, 3) uint8, upright."""
        from dopr.envs.video import VIDEO_SIZE

        if self.render_camera is None:
            raise RuntimeError("RobosuiteEnv.render() needs an env built with render_camera=<camera name>")
        size = size or VIDEO_SIZE
        return self.env.sim.render(width=size, height=size, camera_name=self.render_camera)[::-1].copy()

    @property
    def cameras(self) -> tuple[str, ...]:
        """The cameras the scene defines (what ``<camera>_image`` observations can render)."""
        return tuple(self.env.sim.model.camera_names)

    def is_success(self) -> bool:
        return bool(self.env._check_success())

    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state (time, qpos, qvel), as robomimic stores under ``states``."""
        return np.asarray(self.env.sim.get_state().flatten())

    def model_xml(self) -> str:
        return self.env.sim.model.get_xml()

    def close(self) -> None:
        self.env.close()
