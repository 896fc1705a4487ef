#!/usr/bin/env python
"""Download the wheels scripts/gpu_check.sh needs on the lent GPU machine, for Python 3.12 manylinux x86-64.

That machine has Python 3.12 with its own torch (CUDA), numpy, scipy, h5py, pandas, matplotlib,
scikit-learn, transformers, peft, tokenizers, numba, opencv, PyYAML, typer and pytest, and no network.
What the tasks need beyond that travels as wheels in the working tree (git-ignored ``.whl/``),
inside the 64 MiB a device call may carry, the repository itself included:

    python scripts/gpu_wheels.py                 # -> .whl/*.whl + .whl/requirements.txt, sizes printed
    python scripts/gpu_wheels.py gl=true         # also the EGL/OpenGL loader .debs (-> .gl/), for MUJOCO_GL=egl
    python scripts/gpu_wheels.py list=true       # print the list, download nothing

Keys (key=value): dest (default .whl), gl (default false), list (default false).

Then, on the device: ``carry: [".whl", ".gl"]`` and ``bash scripts/gpu_check.sh`` (it installs them).

Every wheel is fetched with ``pip download --no-deps --only-binary=:all:`` for CPython 3.12 on
manylinux x86-64 at the version pyproject.toml pins (dependencies at the versions this repo's
.venv runs), so the set is exactly the list below: gpu_check installs it with ``--no-deps``, which
never touches the machine's torch or numpy. Two are made here rather than downloaded as they are:

- ``antlr4-python3-runtime`` 4.9.3 (Hydra's parser) exists on PyPI as a source archive only;
  ``pip wheel`` builds its pure-Python wheel.
- ``robosuite`` 1.5.2's wheel is 150 MiB, almost all of it meshes and textures of robots, grippers
  and scenes the tasks never load. The slim wheel keeps every file except the heavy assets (meshes,
  textures, pybullet data) that the Panda robot (its arm, gripper and mount) and the Lift,
  PickPlaceCan and NutAssemblySquare scenes do not reference (read from the MJCF XML robosuite builds
  for them), ~18 MiB. Other robots and scenes fail to load from it (a missing mesh file).

Not carried, as the check does not use them: wandb (gpu_check passes logger=none), datasets (the
LLM task reads a local jsonl fixture), hydra's joblib/submitit launchers (no sweeps), mink and
qpsolvers (robosuite imports them only for its GR1 whole-body IK).
"""

import base64
import csv
import fnmatch
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 2**20  # what one device call may carry: the working tree, these wheels and .gl/ together
PYTHON_VERSION = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]

# (name, version, why). Versions: pyproject.toml's pins; their dependencies at what .venv runs.
WHEELS = [
    ("hydra-core", "1.3.8", "run.py's config system"),
    ("omegaconf", "2.3.1", "Hydra's config objects"),
    ("antlr4-python3-runtime", "4.9.3", "Hydra's override parser (source only on PyPI: built here)"),
    ("gymnasium", "1.4.0", "gym tasks and robosuite's env wrappers"),
    ("farama-notifications", "0.0.6", "gymnasium's import"),
    ("minari", "0.5.3", "the gym tasks' datasets"),
    ("mujoco", "3.3.7", "the simulator (gym and robosuite); robosuite 1.5.2 breaks on mujoco >= 3.10"),
    ("glfw", "2.11.0", "mujoco's import"),
    ("pyopengl", "3.1.10", "mujoco's EGL rendering (MUJOCO_GL=egl)"),
    ("robosuite", "1.5.2", "robomimic tasks (slim: assets of the Panda and three scenes)"),
    ("termcolor", "3.3.0", "robosuite's logging"),
    ("pytorch-optimizer", "4.1.0", "signum's SignSGD (the GPU tests and bench may build it)"),
]
SDIST_ONLY = {"antlr4-python3-runtime"}

# robosuite: heavy asset files are dropped unless one of these patterns (relative to
# robosuite/models/assets/) keeps them. Found by building Lift, PickPlaceCan and NutAssemblySquare with
# the Panda and its cameras and reading every file= of the XML handed to MuJoCo.
ROBOSUITE_ASSETS = "robosuite/models/assets/"
HEAVY_SUFFIXES = (".stl", ".obj", ".msh", ".png", ".jpg", ".jpeg", ".mtl", ".dae", ".ply", ".urdf")
ROBOSUITE_KEEP = [
    "robots/panda/*", "grippers/meshes/panda_gripper/*", "grippers/obj_meshes/panda_gripper/*",
    "bases/meshes/rethink_mount/*", "bases/obj_meshes/rethink_mount/*", "objects/*",
    *(f"textures/{name}.png" for name in (
        "brass-ambra", "bread", "ceramic", "cereal", "dark-wood", "light-gray-floor-tile", "light-gray-plaster",
        "light-wood", "red-wood", "soda", "steel-brushed", "steel-scratched")),
]
ROBOSUITE_DROP_DIRS = ("bullet_data/",)

GL_DEBS = ["libegl1", "libglvnd0", "libopengl0", "libgl1", "libglx0", "libgles2"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(name: str, version: str, dest: Path) -> None:
    if name in SDIST_ONLY:
        pip("wheel", "-q", "--no-deps", "--no-binary", name, "-w", str(dest), f"{name}=={version}")
        return
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", *platforms, "-d", str(dest), f"{name}=={version}")


def _keep_robosuite_file(path: str) -> bool:
    if not path.startswith(ROBOSUITE_ASSETS):
        return True
    rel = path[len(ROBOSUITE_ASSETS):]
    if rel.startswith(ROBOSUITE_DROP_DIRS):
        return False
    if not rel.lower().endswith(HEAVY_SUFFIXES):
        return True  # XML, configs and code: small, and robosuite reads many of them at import
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in ROBOSUITE_KEEP)


def slim_robosuite(wheel: Path) -> None:
    """Rewrite ``wheel`` in place without the unused heavy assets, with a RECORD that matches."""
    with zipfile.ZipFile(wheel) as src:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = [info for info in src.infolist() if info.filename != record_name and _keep_robosuite_file(info.filename)]
        out = wheel.with_suffix(".slim")
        rows = []
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in kept:
                data = src.read(info)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.append([info.filename, f"sha256={digest}", str(len(data))])
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            rows.append([record_name, "", ""])
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            dst.writestr(record_name, text.getvalue())
    out.replace(wheel)


def tree_bytes() -> int:
    """Bytes of what a device call sends besides carried paths: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def download_gl(dest: Path) -> None:
    """The EGL/OpenGL loaders the device notes prescribe (Debian amd64 .debs, unpacked there by gpu_check)."""
    lists = Path(tempfile.gettempdir()) / "amd64"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    opts = ["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64", f"-oDir::State::Lists={lists}"]
    subprocess.run(["apt-get", *opts, "update", "-qq"], check=True)
    if dest.exists():
        shutil.rmtree(dest)  # one version of each
    dest.mkdir()
    subprocess.run(["apt-get", *opts, "download", *GL_DEBS], cwd=dest, check=True)


@dataclass
class WheelsArgs:
    dest: str = ".whl"
    gl: bool = False
    list: bool = False


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    from dopr.cli import parse_script_args

    args = parse_script_args(argv, WheelsArgs, __doc__)
    if args.list:
        for name, version, why in WHEELS:
            print(f"{name}=={version}  # {why}")
        return 0
    dest = REPO / args.dest
    if dest.exists():
        shutil.rmtree(dest)  # one version of each: two stop the install
    dest.mkdir(parents=True)
    for name, version, _ in WHEELS:
        download(name, version, dest)
        print(f"[gpu_wheels] {name}=={version}", flush=True)
    (robosuite,) = dest.glob("robosuite-*.whl")
    before = robosuite.stat().st_size
    slim_robosuite(robosuite)
    print(f"[gpu_wheels] robosuite slimmed: {before / 2**20:.1f} -> {robosuite.stat().st_size / 2**20:.1f} MiB")
    (dest / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v, _ in WHEELS))
    if args.gl:
        download_gl(REPO / ".gl")
    wheels = sorted(dest.glob("*.whl"))
    width = max(len(w.name) for w in wheels)
    for w in wheels:
        print(f"  {w.name:<{width}}  {w.stat().st_size / 2**20:7.2f} MiB")
    total = sum(w.stat().st_size for w in wheels)
    gl = sum(f.stat().st_size for f in (REPO / ".gl").glob("*.deb")) if (REPO / ".gl").is_dir() else 0
    tree = tree_bytes()
    print(f"[gpu_wheels] {len(wheels)} wheels, {total / 2**20:.1f} MiB; .gl {gl / 2**20:.2f} MiB; working tree "
          f"{tree / 2**20:.1f} MiB; together {(total + gl + tree) / 2**20:.1f} of the {CARRY_LIMIT / 2**20:.0f} MiB "
          f"a device call carries")
    if total + gl + tree > CARRY_LIMIT:
        print("[gpu_wheels] over the limit: the device call would be refused", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
