"""Rollout videos: the frames of one evaluation episode, written as a file W&B can show.

MP4 needs imageio's ffmpeg plugin (``pip install imageio-ffmpeg``); without it the video is an
animated GIF, which imageio writes through Pillow alone.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_CAMERA = "agentview"  # robosuite's front view, what diffusion_policy's robomimic videos show
VIDEO_SIZE = 128  # frame height and width (robosuite renders at any size; gym MuJoCo at its own)


def video_suffix() -> str:
    """``.mp4`` when imageio can write it here, else ``.gif``."""
    return ".mp4" if importlib.util.find_spec("imageio_ffmpeg") is not None else ".gif"


@dataclass
class RolloutVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8: the state after reset, then one per env step
    fps: int

    def __post_init__(self):
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"video frames must be (T, H, W, 3) uint8, got {self.frames.shape} {self.frames.dtype}")

    def write(self, stem: Path | str) -> Path:
        """Write ``<stem>.mp4`` (or ``.gif``, see ``video_suffix``); returns the path."""
        import imageio

        path = Path(stem).with_suffix(video_suffix())
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".mp4":
            imageio.mimwrite(path, self.frames, fps=self.fps)
        else:  # Pillow takes the frame time in ms; loop=0 repeats forever
            imageio.v3.imwrite(path, self.frames, duration=1000 / self.fps, loop=0, plugin="pillow")
        return path
