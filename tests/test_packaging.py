"""What `pip install dopr` gives a user who only wants the optimizer (issue 24): torch, and nothing else.

The wheel is built from a copy of the sources (nothing is written into the repository), then:
- its core requirements (Requires-Dist without an extra) are torch alone, as a range that admits the
  torch tested here, on Python 3.11 to 3.13;
- it ships ``dopr/py.typed``, the LICENSE and the version that ``dopr.__version__`` says;
- ``dopr.optim`` is imported from the wheel and every optimizer takes a step in a subprocess where only
  the standard library and the distributions that the core requirements bring are importable (a
  sys.meta_path blocker: Hydra, gymnasium, transformers, pandas, wandb, pytorch-optimizer... are not
  there), which is what a fresh venv's ``pip install .`` has; Signum, SOAP and PSGD-Kron, which are
  pytorch-optimizer's (the ``optimizers`` extra), say so and name the extra;
- (slow) a real fresh venv: ``pip install <wheel> torch==<this torch>`` installs nothing but torch's own
  requirements, and the optimizer works there. 34 s alone, 110 s inside a
  busy make test, on 2 cores with the torch wheel on local disk; it needs the package index (or pip's
  cache) for the rest, as make install does, and writes about 1 GB under tmp_path, removed at the end.
"""

from __future__ import annotations

import ast
import email.parser
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# What the core may require.
CORE_ALLOWED = {"torch"}
PYTHONS = ("3.11", "3.12", "3.13")
TESTED_TORCH = "2.13.0"  # the research extra's pin: the core's torch range must admit it
# Modules of the research stack that must not be needed by dopr.optim (the first one installed here
# checks that the blocker really blocks).
RESEARCH_MODULES = ("hydra", "omegaconf", "gymnasium", "mujoco", "robosuite", "minari", "transformers", "peft",
                    "datasets", "pandas", "wandb", "matplotlib", "scipy", "sklearn", "h5py", "tqdm")
TIMEOUT = 300


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheel(src_root: Path, work: Path) -> Path:
    """Build dopr's wheel from a copy of ``src_root``'s packaging inputs; return the wheel's path."""
    src = work / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (src_root / name).exists():
            shutil.copy2(src_root / name, src / name)
    shutil.copytree(src_root / "dopr", src / "dopr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(work / "dist")]
    try:  # build offline with this environment's setuptools when it is recent enough (PEP 639 license)
        if Version(importlib.metadata.version("setuptools")) >= Version("77"):
            cmd.append("--no-build-isolation")
    except importlib.metadata.PackageNotFoundError:
        pass
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"building the wheel failed:\n{done.stdout}\n{done.stderr}"
    (wheel,) = (work / "dist").glob("dopr-*.whl")
    return wheel


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(z.read(name).decode())


def core_requirements(meta) -> list[Requirement]:
    """Requires-Dist entries that apply without any extra (on this interpreter)."""
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or ()]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def installed_closure(reqs, requires=None) -> set[str]:
    """The distributions (normalized names) that ``reqs`` bring, following installed metadata.

    ``requires`` maps a normalized name to that distribution's Requires-Dist (default: this environment's).
    """
    if requires is None:
        requires = {_norm(d.metadata["Name"]): d.requires or () for d in importlib.metadata.distributions()}
    seen: set[str] = set()
    stack = list(reqs)
    while stack:
        req = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = _norm(req.name)
        if key in seen:
            continue
        if key not in requires:
            pytest.fail(f"requirement {req} is not installed here; run make install")
        seen.add(key)
        stack.extend(Requirement(r) for r in requires[key])
    return seen


# Run in a subprocess: python -I CHECK '<json args>'. Imports dopr from the given directory (the wheel's
# contents, or the installed package when it is null), with only the allowed top-level modules
# importable when an allow list is given; builds every optimizer and takes one step with each.
CHECK = r'''
import importlib.machinery, importlib.util, json, os, site as site_module, sys, sysconfig
args = json.loads(sys.argv[1])
allowed, site, canary = args["allowed"], args["site"], args["canary"]
if allowed is not None:
    allowed = set(allowed) | {"dopr"}
    installed_dirs = tuple(os.path.join(os.path.realpath(d), "") for d in {*site_module.getsitepackages(),
                           sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})

    class CorePathFinder(importlib.machinery.PathFinder):
        # sys.path's finder, except that an installed top-level module (one under site-packages) that no
        # allowed distribution brings is not found, as in a venv without it: importing it raises
        # ModuleNotFoundError and importlib.util.find_spec returns None. The standard library and the
        # allowed distributions are found as usual.
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            spec = super().find_spec(name, path, target)
            if spec is None or path is not None or name in allowed:
                return spec
            origin = spec.origin if spec.has_location else next(iter(spec.submodule_search_locations or ()), None)
            if origin and os.path.realpath(origin).startswith(installed_dirs):
                return None
            return spec

    sys.meta_path[:] = [CorePathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    assert CorePathFinder in sys.meta_path
if site is not None:
    sys.path.insert(0, site)

import torch
from torch import nn

import dopr
import dopr.optim
from dopr.optim import KNOWN_OPTIMIZERS, build_optimizer
from dopr.optim.build import PYTORCH_OPTIMIZER_GPS
from dopr.optim.config import AP_PRESETS

assert site is None or dopr.__file__.startswith(site), dopr.__file__
stepped, need_extra = [], []
for name in KNOWN_OPTIMIZERS:
    gp = name.removeprefix("dopr_")
    for preset in AP_PRESETS:  # dopr_<gp>_<preset>
        gp = gp.removesuffix("_" + preset)
    if gp in PYTORCH_OPTIMIZER_GPS and importlib.util.find_spec("pytorch_optimizer") is None:
        try:
            build_optimizer(nn.Linear(2, 2), name)
        except ImportError as error:
            assert "dopr[optimizers]" in str(error), str(error)
            need_extra.append(name)
            continue
        raise AssertionError(f"{name} was built without pytorch-optimizer")
    stepped.append(name)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, name, lr=1e-2, weight_decay=0.0)
    opt.zero_grad()
    model(torch.randn(16, 4)).square().mean().backward()
    opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after), name
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), f"{name}: no parameter moved"
blocked = None
if canary is not None:
    try:
        __import__(canary)
        blocked = False
    except ModuleNotFoundError:
        blocked = importlib.util.find_spec(canary) is None
loaded = sorted({m.partition(".")[0] for m in sys.modules} - set(sys.stdlib_module_names))
print(json.dumps({"version": getattr(dopr, "__version__", None), "file": dopr.__file__,
                  "optimizers": stepped, "need_extra": need_extra, "canary_blocked": blocked,
                  "loaded": loaded}))
'''


def run_check(python: str, cwd: Path, allowed, site, canary) -> dict:
    args = json.dumps({"allowed": None if allowed is None else sorted(allowed), "site": site, "canary": canary})
    done = subprocess.run([python, "-I", "-c", CHECK, args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, f"dopr.optim check failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def core_import_check(wheel: Path, work: Path) -> dict:
    """Import dopr.optim from ``wheel`` with only the core requirements' modules importable."""
    site = work / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    closure = installed_closure(core_requirements(wheel_metadata(wheel)))
    allowed = {module for module, dists in importlib.metadata.packages_distributions().items()
               if any(_norm(d) in closure for d in dists)}
    canary = next((m for m in RESEARCH_MODULES if m not in allowed and importlib.util.find_spec(m)), None)
    result = run_check(sys.executable, work, allowed, str(site), canary)
    result["closure"] = sorted(closure)
    result["canary"] = canary
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def test_core_requires_torch_only(wheel):
    meta = wheel_metadata(wheel)
    core = core_requirements(meta)
    names = {_norm(r.name) for r in core}
    assert "torch" in names
    assert names <= CORE_ALLOWED, (f"pip install dopr would also bring {sorted(names - CORE_ALLOWED)}: the research "
                                   f"stack belongs in an extra")
    pinned = [str(r) for r in core if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins in the core force a user's environment: {pinned}"
    (torch_req,) = [r for r in core if _norm(r.name) == "torch"]
    assert torch_req.specifier.contains(TESTED_TORCH), f"{torch_req} excludes the torch the tests run on"
    requires_python = SpecifierSet(meta["Requires-Python"] or "")
    refused = [v for v in PYTHONS if not requires_python.contains(v)]
    assert not refused, f"Requires-Python {requires_python} refuses Python {refused}"
    # The research extra keeps its exact torch pin: make install must not resolve a (CUDA) torch of its own.
    research = [Requirement(r) for r in meta.get_all("Requires-Dist") or ()
                if Requirement(r).marker is not None and Requirement(r).marker.evaluate({"extra": "research"})]
    assert f"torch=={TESTED_TORCH}" in {str(r).split(";")[0].strip() for r in research}
    assert {"hydra-core", "omegaconf"} <= {_norm(r.name) for r in research}


def test_wheel_ships_version_license_and_typing_marker(wheel):
    meta = wheel_metadata(wheel)
    tree = ast.parse((ROOT / "dopr" / "__init__.py").read_text())
    versions = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in node.targets)]
    assert versions == [meta["Version"]], f"dopr.__version__ {versions} is not the wheel's version {meta['Version']}"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "dopr/py.typed" in names, "no PEP 561 marker in the wheel"
        licenses = [n for n in names if re.search(r"\.dist-info/(licenses/)?LICENSE$", n)]
        assert licenses, "no LICENSE in the wheel"
        text = z.read(licenses[0]).decode()
    assert meta["License-Expression"] == "MIT" and text.startswith("MIT License") and "the DoPr authors" in text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {meta['Version']}" in changelog, f"CHANGELOG.md has no section for {meta['Version']}"


def test_optimizer_runs_with_only_core_requirements(wheel, tmp_path):
    result = core_import_check(wheel, tmp_path)
    assert result["version"] == wheel_metadata(wheel)["Version"]
    assert {"dopr_adamw", "dopr_muon", "dopr_adamuon"} <= set(result["optimizers"])
    # each refused, naming dopr[optimizers]
    assert set(result["need_extra"]) == {f"{prefix}{gp}{suffix}" for gp in ("signum", "soap", "kron")
                                         for prefix, suffix in (("", ""), ("dopr_", ""), ("dopr_", "_cheap"))}
    if result["canary"] is not None:  # the research stack is installed here; the blocker must hide it
        assert result["canary_blocked"], f"{result['canary']} was importable: the blocker does not block"
    assert not set(result["loaded"]) & set(RESEARCH_MODULES), result["loaded"]


@pytest.mark.slow
def test_fresh_venv_install(wheel, tmp_path):
    """pip install <wheel> in a new venv (torch pinned to this build, so no other build is downloaded)."""
    import torch

    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=TIMEOUT)
        python = str(venv / "bin" / "python")
        done = subprocess.run([python, "-m", "pip", "install", "-q", str(wheel), f"torch=={torch.__version__}"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr[-4000:]}"
        listing = subprocess.run(
            [python, "-I", "-c", "import importlib.metadata as m, json; print(json.dumps("
             "{d.metadata['Name']: d.requires or [] for d in m.distributions()}))"],
            capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
        assert listing.returncode == 0, listing.stderr[-4000:]
        requires = {_norm(name): reqs for name, reqs in json.loads(listing.stdout).items()}
        torch_own = installed_closure([Requirement("torch")], requires)
        installed = set(requires)
        extra = installed - torch_own - {"dopr", "pip", "setuptools", "wheel"}
        assert extra <= CORE_ALLOWED, f"pip install dopr also installed {sorted(extra - CORE_ALLOWED)}"
        result = run_check(python, tmp_path, None, None, None)
        assert result["file"].startswith(str(venv)) and result["version"] == wheel_metadata(wheel)["Version"]
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 1 GB
