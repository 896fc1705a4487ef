#!/usr/bin/env python
"""The GPU check: everything a lent CUDA machine should run, in one command, inside 8 minutes.

    bash scripts/gpu_check.sh                            # on the GPU machine (device=cuda)
    bash scripts/gpu_check.sh device=cpu size=tiny       # the dry run (tests/test_gpu_check.py runs a part of it)

Parts, in order; each has its own time limit (and all share ``budget``), and a failing or hung part
is recorded and the next one runs:

  install  EGL loaders (.gl/*.deb, when libEGL is missing and we are root), then the carried wheels
           (``pip install --no-index --no-deps --find-links <wheels> --target <work>/site``; the
           machine's own torch and numpy are never touched), then an import check of every package.
           Make the wheels with scripts/gpu_wheels.py.
  tests    ``pytest -m gpu`` over the test files that hold GPU tests (TF32 and autocast precision).
  bench    scripts/bench_optim.py: AdamW vs DoPr-AdamW and Muon vs DoPr-Muon, default and cheap AP,
           on the residual MLP and a GPT block stack (d 768, 12 layers, seq 1024, bf16 autocast);
           step-time ratios and AP's extra memory.
  tasks    every task for ``steps`` steps with opt=adamw and opt=dopr_adamw (lds, gym_hopper,
           robomimic_lift low-dim and image (MUJOCO_GL=egl), flow_2d, flow_digits, lm_arith, llm_sft
           on the offline tiny fixture), ``jobs`` tasks at a time: median step time, val/loss and the
           task's test metric.

Writes ``<out>/gpu_check/<tag>.md`` (the report), ``.json`` (the same, raw) and ``.log`` (every
command's output), and the bench's ``<out>/bench/bench_<tag>.md`` and ``.json``; the report is
rewritten after every part, so a run cut short still leaves one. ``out`` defaults to ``$OUT/results``
when OUT is set (the device tool brings $OUT back), else the repo's results/. Runs and generated
data go to ``work`` (a temporary folder), never under ``out``. Exit status 0 when every part passed.

Keys (key=value):
    device   cuda (default) or cpu
    size     full (default: what the GPU machine runs) or tiny (a few steps, tiny models: the dry run)
    steps    training steps per task run (default 300 full, 3 tiny)
    tasks    which tasks, e.g. [lds,flow_2d] (default all: lds, gym_hopper, robomimic_lift,
             robomimic_lift_image, flow_2d, flow_digits, lm_arith, llm_sft)
    parts    which parts, e.g. [bench] (default [install,tests,bench,tasks])
    jobs     task runs side by side (default 4 on cuda, 1 on cpu); a task's two runs are in sequence
    budget   seconds for all parts together (default 440 full, 600 tiny; a part past its time gets
             SIGTERM, then SIGKILL 5 s later, so the whole check ends within budget + 20 s)
    limits   seconds a part may take, e.g. [bench:200,tasks:240] (defaults: full install 60, tests 75,
             bench 150, tasks 210; tiny 60, 120, 120, 400); a task run takes at most 150 s (tiny 240 s)
    wheels   folder of carried wheels (default .whl); gl: folder of carried .debs (default .gl)
    out, work, tag   see above (tag default: the GPU's name, e.g. h100_80gb_hbm3, or cpu)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dopr.cli import split_key_values  # noqa: E402  (dopr.cli needs nothing installed for this)

PARTS = ("install", "tests", "bench", "tasks")
# Seconds each part may take at most (the budget caps them too); a task run at most RUN_LIMIT.
PART_LIMITS = {"full": {"install": 60, "tests": 75, "bench": 150, "tasks": 210},
               "tiny": {"install": 60, "tests": 120, "bench": 120, "tasks": 400}}
RUN_LIMIT = {"full": 150, "tiny": 240}
OPTIMIZERS = ("adamw", "dopr_adamw")
WARMUP = {"robomimic_lift": 100, "robomimic_lift_image": 100, "lm_arith": 50, "llm_sft": 20}
IMPORTS = ["hydra", "omegaconf", "gymnasium", "minari", "mujoco", "robosuite", "pytorch_optimizer", "transformers",
           "peft", "h5py", "scipy", "sklearn", "numpy", "torch"]
GRACE = 5  # seconds between SIGTERM and SIGKILL for a command past its time
LOG_CAP = 150_000  # characters of one command's output kept in the log (its tail)


# ---- the tasks ---------------------------------------------------------------------------------

def task_plans(size: str, work: Path, steps: int) -> dict[str, dict]:
    """Per task: Hydra overrides for a short run, and the commands that prepare its data first."""
    tiny = size == "tiny"
    data = work / "data"
    sft = work / "sft"
    plans = {
        "lds": dict(overrides=["task=lds"] + (["task.eval_episodes=4", "task.max_episode_steps=20"] if tiny else [])),
        "gym_hopper": dict(
            prepare=[[sys.executable, "scripts/make_gym_demos.py", "env=Hopper-v5", "expert=experts/Hopper-v5.npz",
                      f"episodes={3 if tiny else 6}", f"datasets_path={data / 'minari'}", "overwrite=true"]],
            overrides=["task=gym_hopper", f"task.eval_episodes={1 if tiny else 4}",
                       f"task.max_episode_steps={20 if tiny else 500}"]
            + (["task.width=32", "task.depth=1"] if tiny else [])),
        "robomimic_lift": dict(overrides=[
            "task=robomimic_lift", f"task.gen_demos={3 if tiny else 6}", f"task.eval_episodes={1 if tiny else 4}",
            f"task.max_episode_steps={16 if tiny else 150}", f"task.val_samples={32 if tiny else 512}"]
            + (["task.unet_channels=[8,16]", "task.time_embed_dim=8", "task.integration_steps=[2,1]",
                "task.batch_size=8"] if tiny else [])),
        "robomimic_lift_image": dict(overrides=[
            "task=robomimic_lift", "task.obs=image", f"task.gen_demos={2 if tiny else 4}",
            f"task.eval_episodes={1 if tiny else 2}", f"task.max_episode_steps={16 if tiny else 100}",
            f"task.val_samples={16 if tiny else 256}"]
            + (["task.unet_channels=[8,16]", "task.time_embed_dim=8", "task.integration_steps=[2,1]",
                "task.batch_size=4", "task.image_base_width=4", "task.image_feature_dim=8"] if tiny else [])),
        "flow_2d": dict(overrides=["task=flow_2d"] + (
            ["task.train_episodes=512", "task.val_episodes=64", "task.val_repeats=1", "task.eval_episodes=64",
             "task.num_projections=8", "task.integration_steps=[1,2]", "task.headline_steps=2", "task.hidden=16"]
            if tiny else [])),
        "flow_digits": dict(overrides=["task=flow_digits"] + (
            ["task.channels=4", "task.eval_episodes_per_class=2", "task.integration_steps=[1]", "task.headline_steps=1",
             "task.val_repeats=1", "task.batch_size=16"] if tiny else [])),
        "lm_arith": dict(overrides=["task=lm_arith"] + (
            ["task.max_digits=2", "task.val_episodes=16", "task.eval_episodes_per_length=2", "task.sample_temperature=0",
             "task.eval_batch_size=16", "task.d_model=16", "task.n_layers=1", "task.n_heads=2"] if tiny else [])),
        "llm_sft": dict(
            prepare=[[sys.executable, "-m", "dopr.data.sft", f"tiny_fixture={sft}"]],
            overrides=["task=llm_sft", f"task.model={sft / 'tiny-llama'}", f"task.dataset={sft / 'tiny_gsm8k.jsonl'}",
                       "task.val_episodes=8", "task.eval_episodes=8", "task.max_seq_len=128",
                       f"task.max_new_tokens={8 if tiny else 40}", "opt.lr=1e-2"]),
    }
    for name, plan in plans.items():
        plan.setdefault("prepare", [])
        # the task configs' LR warmup (robomimic 100, lm_arith 50 steps), cut to a quarter of a short run
        warmup = min(WARMUP.get(name, 0), steps // 4)
        plan["overrides"] += [f"paths.data={data}", f"trainer.steps={steps}", f"trainer.eval_every={steps}",
                              f"trainer.warmup_steps={warmup}"]
    return plans


# ---- running commands --------------------------------------------------------------------------

class Log:
    """Every command's output, in order, in one file (thread-safe)."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, text: str) -> None:
        with self.lock, self.path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")


def run_command(cmd: list[str], timeout: float, env: dict, log: Log, title: str, cwd: Path = REPO) -> dict:
    """Run ``cmd`` in its own process group, stopped whole at ``timeout`` (SIGTERM, then SIGKILL GRACE
    seconds later). Returns status, seconds, output."""
    start = time.time()
    if timeout <= 1:
        log.write(f"===== {title}: not run (no time left)")
        return dict(status="skipped", reason="no time left in the budget", seconds=0.0, output="")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        # SIGTERM first: a training run then records how far it got (its summary and step times)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        status = "timeout"
    seconds = time.time() - start
    log.write(f"===== {title} ({status}, {seconds:.1f} s, exit {proc.returncode}): {' '.join(cmd)}\n"
              + output[-LOG_CAP:])
    result = dict(status=status, seconds=seconds, returncode=proc.returncode, output=output)
    if status == "timeout":
        result["reason"] = f"killed after {timeout:.0f} s"
    elif status == "failed":
        result["reason"] = f"exit status {proc.returncode}"
    return result


def tail(text: str, lines: int = 12) -> str:
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept)


# ---- the parts ---------------------------------------------------------------------------------

class Check:
    def __init__(self, opts: dict):
        self.command = " ".join(["bash scripts/gpu_check.sh", *(f"{k}={v}" for k, v in opts.items())])
        self.device = opts.get("device", "cuda")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise SystemExit(f"device={self.device}: cuda or cpu")
        self.size = opts.get("size", "full")
        if self.size not in PART_LIMITS:
            raise SystemExit(f"size={self.size}: full or tiny")
        self.steps = int(opts.get("steps", 300 if self.size == "full" else 3))
        self.tasks = _list(opts.get("tasks")) or list(task_plans(self.size, Path("."), 1))
        self.parts = _list(opts.get("parts")) or list(PARTS)
        known_tasks = set(task_plans(self.size, Path("."), 1))
        unknown = sorted(set(self.tasks) - known_tasks) + sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise SystemExit(f"unknown task or part: {unknown}")
        self.jobs = int(opts.get("jobs", 4 if self.device.startswith("cuda") else 1))
        self.budget = float(opts.get("budget", 440 if self.size == "full" else 600))
        self.limits = dict(PART_LIMITS[self.size])
        for item in _list(opts.get("limits")):
            part, _, seconds = item.partition(":")
            if part not in PARTS:
                raise SystemExit(f"limits: unknown part {part!r}; parts: {list(PARTS)}")
            self.limits[part] = float(seconds)
        self.wheels = REPO / opts.get("wheels", ".whl")
        self.gl = REPO / opts.get("gl", ".gl")
        out_default = Path(os.environ["OUT"]) / "results" if os.environ.get("OUT") else REPO / "results"
        self.out = Path(opts.get("out", out_default)).resolve()
        self.work = Path(opts["work"]).resolve() if "work" in opts else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.deadline = self.start + self.budget
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        if self.device.startswith("cuda"):  # robosuite and MuJoCo render headless through EGL on the GPU
            self.env.setdefault("MUJOCO_GL", "egl")
            vendor = Path("/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json")  # the device notes' fix
            if vendor.exists() and "__EGL_VENDOR_LIBRARY_FILENAMES" not in self.env \
                    and not Path("/usr/share/glvnd/egl_vendor.d/10_nvidia.json").exists():
                self.env["__EGL_VENDOR_LIBRARY_FILENAMES"] = str(vendor)
        self.machine = self._machine()
        self.tag = opts.get("tag") or self.machine.get("tag") or ("cpu" if self.device == "cpu" else "cuda")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.tag):
            raise SystemExit(f"tag={self.tag!r}: letters, digits, '.', '_' and '-' only")
        self.report_dir = self.out / "gpu_check"
        self.log = Log(self.report_dir / f"{self.tag}.log")
        self.results: dict = {"parts": {}, "tasks": {}}

    def _machine(self) -> dict:
        """torch, CUDA and the GPU, read in a child process (the driver never initializes CUDA itself)."""
        code = ("import json, platform, re, torch\n"
                "d = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,\n"
                "         cuda_available=torch.cuda.is_available())\n"
                "if torch.cuda.is_available():\n"
                "    name = torch.cuda.get_device_name()\n"
                "    d.update(gpu=name, capability=list(torch.cuda.get_device_capability()),\n"
                "             memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),\n"
                "             tag=re.sub(r'[^a-z0-9]+', '_', name.lower().removeprefix('nvidia').strip()).strip('_'))\n"
                "print(json.dumps(d))\n")
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                  env=self.env)
            info = json.loads(done.stdout.strip().splitlines()[-1])
        except Exception as error:  # noqa: BLE001 - the report says what went wrong
            info = {"error": f"{type(error).__name__}: {error}"}
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = smi.stdout.strip()
        if self.device.startswith("cuda") and not info.get("cuda_available"):
            info["warning"] = "device=cuda but torch sees no GPU"
        info["cores"] = os.cpu_count()
        return info

    def remaining(self, part: str) -> float:
        return min(self.limits[part], self.deadline - time.time())

    # -- install --
    def install(self, limit: float) -> dict:
        notes, end = [], time.time() + limit
        if self.device.startswith("cuda"):
            debs = sorted(self.gl.glob("*.deb")) if self.gl.is_dir() else []
            has_egl = "libEGL.so.1" in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
            if debs and not has_egl and hasattr(os, "geteuid") and os.geteuid() == 0:
                for deb in debs:
                    subprocess.run(["dpkg", "-x", str(deb), "/"], check=True)
                subprocess.run(["ldconfig"], check=True)
                notes.append(f"unpacked {len(debs)} EGL/OpenGL loader .debs from {self.gl.name}/")
            else:
                notes.append("libEGL present" if has_egl
                             else f"libEGL missing and no .debs to unpack in {self.gl.name}/")
            notes += [f"{k}={self.env[k]}" for k in ("MUJOCO_GL", "__EGL_VENDOR_LIBRARY_FILENAMES") if k in self.env]
        wheels = sorted(self.wheels.glob("*.whl")) if self.wheels.is_dir() else []
        status, reason, names = "ok", None, list(IMPORTS)
        if wheels:
            site = self.work / "site"
            requirements = self.wheels / "requirements.txt"
            what = ["-r", str(requirements)] if requirements.exists() else [str(w) for w in wheels]
            done = run_command([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--no-cache-dir", "--disable-pip-version-check", "--find-links", str(self.wheels),
                                "--target", str(site), *what], end - time.time(), self.env, self.log, "install wheels")
            if done["status"] != "ok":
                status, reason = "failed", f"pip: {done.get('reason')}: {tail(done['output'], 5)}"
            self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site)]
                                                     + [p for p in [os.environ.get("PYTHONPATH")] if p])
            notes.append(f"{len(wheels)} wheels from {self.wheels.name}/ into {site} ({done['seconds']:.0f} s): "
                         + ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1] for w in wheels))
            for top_level in sorted(site.glob("*.dist-info/top_level.txt")):  # every carried package must import
                names += [n for n in top_level.read_text().split() if n not in names and not n.startswith("_")]
        else:
            notes.append(f"no wheels in {self.wheels}: using the packages installed")
        code = ("import importlib, importlib.metadata as md, json, os, sys, warnings\n"
                "warnings.simplefilter('ignore')\n"
                f"names = {names!r}\n"
                "dist = {'sklearn': 'scikit-learn', 'pytorch_optimizer': 'pytorch_optimizer', 'hydra': 'hydra-core'}\n"
                "out = {}\n"
                "for n in names:\n"
                "    try:\n"
                "        m = importlib.import_module(n)\n"
                "        try: v = md.version(dist.get(n, n))\n"
                "        except Exception: v = getattr(m, '__version__', '?')\n"
                "        out[n] = v + ('' if '/site/' not in (m.__file__ or '') else ' (carried)')\n"
                "    except Exception as e:\n"
                "        out[n] = 'MISSING: ' + type(e).__name__ + ': ' + str(e)[:200]\n"
                "print(json.dumps(out))\n")
        done = run_command([sys.executable, "-c", code], max(end - time.time(), 30), self.env, self.log, "import check")
        try:
            versions = json.loads(done["output"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            versions = {"error": tail(done["output"], 5)}
        missing = [n for n, v in versions.items() if str(v).startswith("MISSING") or n == "error"]
        if missing:
            status = "failed"
            reason = (reason + "; " if reason else "") + f"cannot import {', '.join(missing)}"
        return dict(status=status, reason=reason, notes=notes, versions=versions)

    # -- tests --
    def tests(self, limit: float) -> dict:
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                       if re.search(r"pytest\.mark\.gpu\b", p.read_text(errors="replace")))
        if not files:
            return dict(status="failed", reason="no test file holds a @pytest.mark.gpu test")
        junit = self.work / "gpu_tests.xml"
        done = run_command([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
                            f"--junitxml={junit}", *files], limit, self.env, self.log, "pytest -m gpu")
        counts, failures, skips = {"passed": 0, "failed": 0, "skipped": 0}, [], []
        if junit.exists():
            for case in ET.parse(junit).getroot().iter("testcase"):
                name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                skip = case.find("skipped")
                if bad is not None:
                    counts["failed"] += 1
                    failures.append(f"{name}: {(bad.get('message') or '')[:300]}")
                elif skip is not None:
                    counts["skipped"] += 1
                    skips.append(f"{name}: {(skip.get('message') or '')[:200]}")
                else:
                    counts["passed"] += 1
        summary = next((line.strip("= ") for line in reversed(done["output"].splitlines())
                        if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)), tail(done["output"], 1))
        status = done["status"]
        reason = done.get("reason")
        if status == "failed" and done.get("returncode") == 5:
            reason = "no test selected"
        if status == "ok" and self.device.startswith("cuda") and counts["skipped"]:
            status, reason = "failed", "GPU tests skipped on a CUDA machine"
        return dict(status=status, reason=reason, files=files, counts=counts, summary=summary, failures=failures,
                    skips=skips, output_tail=tail(done["output"], 20) if status != "ok" else "")

    # -- bench --
    def bench(self, limit: float) -> dict:
        bench_dir = self.out / "bench"
        # the device minutes go to the DoPr/base ratios; the peers are timed on CPU
        cmd = [sys.executable, "scripts/bench_optim.py", f"device={self.device}", "workloads=[mlp,gpt]",
               "pairs=[adamw,muon]", "primal=false", "formed=false", "peers=[]", f"tag={self.tag}", f"out={bench_dir}"]
        if self.size == "tiny":
            cmd += ["gpt_d_model=64", "gpt_layers=2", "gpt_seq_len=16", "gpt_batch=2", "rounds=1", "steps=2",
                    "warmup=1", "threads=1"]
        else:
            cmd += ["rounds=10", "steps=5", "warmup=5"]  # 50 timed steps: five periods of the cheap settings
        started = time.time() - 1
        done = run_command(cmd, limit, self.env, self.log, "bench")
        files = [bench_dir / f"bench_{self.tag}.md", bench_dir / f"bench_{self.tag}.json"]
        result = dict(status=done["status"], reason=done.get("reason"), seconds=done["seconds"],
                      files=[str(f) for f in files if f.exists()])
        if files[0].exists() and files[1].exists() and files[1].stat().st_mtime >= started:
            # written after each workload: a bench stopped at its limit still reports what it finished
            result["results"] = json.loads(files[1].read_text())["results"]
            result["tables"] = files[0].read_text()
        if done["status"] != "ok":
            result["output_tail"] = tail(done["output"], 20)
        return result

    # -- tasks --
    def tasks_part(self, limit: float) -> dict:
        end = time.time() + limit
        plans = task_plans(self.size, self.work, self.steps)
        threads = max(1, min(4, (os.cpu_count() or 2) // max(self.jobs, 1)))
        env = dict(self.env, OMP_NUM_THREADS=str(threads))

        def one_task(name: str) -> None:
            plan = plans[name]
            entry = self.results["tasks"].setdefault(name, {})
            for cmd in plan["prepare"]:
                done = run_command(cmd, end - time.time(), env, self.log, f"{name}: prepare")
                entry["prepare"] = dict(status=done["status"], seconds=round(done["seconds"], 1))
                if done["status"] != "ok":
                    entry["prepare"]["reason"] = f"{done.get('reason')}: {tail(done['output'], 8)}"
                    for opt in OPTIMIZERS:
                        entry[opt] = dict(status="skipped", reason="data preparation failed")
                    return
            for opt in OPTIMIZERS:
                entry[opt] = self._train(name, opt, plan["overrides"], env, end, threads)
                self.write_report()

        with ThreadPoolExecutor(max_workers=max(self.jobs, 1)) as pool:
            for future in [pool.submit(one_task, name) for name in self.tasks]:
                future.result()
        runs = [r for t in self.results["tasks"].values() for k, r in t.items() if k in OPTIMIZERS]
        bad = [r for r in runs if r.get("status") != "ok"]
        return dict(status="ok" if runs and not bad else "failed",
                    reason=f"{len(bad)} of {len(runs)} runs did not finish" if bad else None)

    def _train(self, name: str, opt: str, overrides: list[str], env: dict, end: float, threads: int) -> dict:
        run_dir = self.work / "runs" / name / opt
        timing = run_dir.parent / f"{opt}_timing.json"
        cmd = [sys.executable, "scripts/gpu_check.py", "_train", f"timing={timing}", "--", *overrides, f"opt={opt}",
               f"device={self.device}", "logger=none", "trainer.progress=false", f"trainer.threads={threads}",
               "seed=0", f"hydra.run.dir={run_dir}", "overwrite=true"]
        limit = min(RUN_LIMIT[self.size], end - time.time())
        done = run_command(cmd, limit, env, self.log, f"{name}: {opt}")
        result = dict(status=done["status"], seconds=round(done["seconds"], 1))
        if timing.exists():
            result.update(json.loads(timing.read_text()))
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            last = summary.get("last") or {}
            result["metric"] = summary.get("headline_metric")
            result["metric_value"] = last.get(summary.get("headline_metric"))
            result["val_loss"] = last.get("val/loss")
            result["train_loss"] = last.get("train/loss")
            result["run_status"] = summary.get("status")
        if done["status"] != "ok":
            result["reason"] = f"{done.get('reason')}: {tail(done['output'], 10)}"
        return result

    # -- the whole check --
    def run(self) -> int:
        self.write_report()
        for part in PARTS:
            if part not in self.parts:
                continue
            limit = self.remaining(part)
            started = time.time()
            print(f"[gpu_check] {part} (at most {limit:.0f} s) ...", flush=True)
            if limit <= 1:
                result = dict(status="skipped", reason="no time left in the budget")
            else:
                try:
                    result = getattr(self, "tasks_part" if part == "tasks" else part)(limit)
                except Exception as error:  # noqa: BLE001 - recorded, and the next part runs
                    result = dict(status="failed", reason=f"{type(error).__name__}: {error}")
            result["seconds"] = round(time.time() - started, 1)
            self.results["parts"][part] = result
            print(f"[gpu_check] {part}: {result['status']} in {result['seconds']:.0f} s"
                  + (f" ({result['reason']})" if result.get("reason") else ""), flush=True)
            self.write_report()
        ok = all(r["status"] == "ok" for r in self.results["parts"].values())
        print(f"[gpu_check] {'passed' if ok else 'FAILED'} in {time.time() - self.start:.0f} s; report: "
              f"{self.report_dir / (self.tag + '.md')}", flush=True)
        return 0 if ok else 1

    # -- the report --
    def write_report(self) -> None:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        data = dict(tag=self.tag, device=self.device, size=self.size, steps=self.steps, jobs=self.jobs,
                    command=self.command, machine=self.machine,
                    elapsed_s=round(time.time() - self.start, 1), budget_s=self.budget, **self.results)
        (self.report_dir / f"{self.tag}.json").write_text(json.dumps(data, indent=2, default=str))
        (self.report_dir / f"{self.tag}.md").write_text(markdown_report(data))


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_report(data: dict) -> str:
    m = data["machine"]
    gpu = m.get("gpu") or "no GPU"
    lines = [f"# GPU check: {gpu} ({data['tag']})", "",
             f"Machine: {gpu}"
             + (f", {m.get('memory_gib')} GiB, compute capability {m.get('capability')}" if m.get("gpu") else "")
             + f"; {m.get('cores')} CPU cores; Python {m.get('python')}, torch {m.get('torch')}, CUDA {m.get('cuda')}"
             + (f"; nvidia-smi: {m['nvidia_smi']}" if m.get("nvidia_smi") else "") + ".",
             f"Command: `{data['command']}`; {data['steps']} steps a task run; {data['elapsed_s']:.0f} s of a "
             f"{data['budget_s']:.0f} s budget.", ""]
    if m.get("warning") or m.get("error"):
        lines += [f"**{m.get('warning') or m.get('error')}**", ""]
    lines += ["## Summary", "", "| part | status | seconds | note |", "|---|---|---|---|"]
    for part in PARTS:
        r = data["parts"].get(part)
        if r is None:
            lines.append(f"| {part} | not run yet | | |")
        else:
            note = (r.get("reason") or "").replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {part} | {r['status']} | {_fmt(r.get('seconds'))} | {note} |")
    lines.append("")

    inst = data["parts"].get("install")
    lines += ["## Install", ""]
    if inst:
        lines += [f"- {note}" for note in inst.get("notes", [])]
        if inst.get("versions"):
            lines += ["", "Imports: " + ", ".join(f"{k} {v}" for k, v in inst["versions"].items())]
    else:
        lines.append("not run")
    lines.append("")

    tests = data["parts"].get("tests")
    lines += ["## GPU-marked tests", ""]
    if tests:
        if tests.get("files"):
            lines.append(f"`pytest -m gpu {' '.join(tests['files'])}`: {tests.get('summary', '')}")
        if tests.get("counts"):
            lines.append(f"passed {tests['counts']['passed']}, failed {tests['counts']['failed']}, "
                         f"skipped {tests['counts']['skipped']}")
        lines += [f"- FAILED {f}" for f in tests.get("failures", [])]
        lines += [f"- skipped {s}" for s in tests.get("skips", [])]
        if tests.get("output_tail"):
            lines += ["", "```", tests["output_tail"], "```"]
    else:
        lines.append("not run")
    lines.append("")

    lines += ["## Tasks", "", f"Each task {data['steps']} steps with AdamW and DoPr-AdamW (seed 0, the optimizer "
              f"configs' lr), {data['jobs']} run(s) at a time on one {data['device']} device. ms/step: the median "
              "time between optimizer steps (data, forward, backward, step; evaluations excluded), indicative only "
              "(runs side by side share the device; the bench below is the clean measurement).", "",
              "| task | optimizer | status | ms/step (median) | val/loss | test metric | value | eval s | run s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in data["tasks"].items():
        prep = entry.get("prepare")
        if prep and prep["status"] != "ok":
            lines.append(f"| {name} | (prepare) | {prep['status']} | | | | | | {prep.get('seconds')} |")
        for opt in OPTIMIZERS:
            r = entry.get(opt)
            if r is None:
                continue
            status = r["status"] + (f" ({r['timed_steps'] + 1} steps)" if r["status"] != "ok" and r.get("timed_steps")
                                    else "")
            lines.append(f"| {name} | {opt} | {status} | {_fmt(r.get('step_ms_median'), 3)} | "
                         f"{_fmt(r.get('val_loss'))} | {r.get('metric') or '–'} | {_fmt(r.get('metric_value'))} | "
                         f"{_fmt(r.get('eval_s'), 3)} | {_fmt(r.get('seconds'))} |")
    if not data["tasks"]:
        lines.append("| (not run) | | | | | | | | |")
    lines.append("")

    bench = data["parts"].get("bench")
    lines += ["## Optimizer step cost (scripts/bench_optim.py)", ""]
    if bench and bench.get("tables"):
        if bench["status"] != "ok":
            lines += [f"**{bench['status']}: {bench.get('reason')}**; what it finished:", ""]
        lines += [f"Files: {', '.join(Path(f).name for f in bench['files'])}.", "", bench["tables"], ""]
        if bench.get("output_tail"):
            lines += ["```", bench["output_tail"], "```", ""]
        for desc, rows in (bench.get("results", {}) if data["device"].startswith("cuda") else {}).items():
            for r in rows:
                if r["dopr"] in ("dopr_adamw+cheap", "dopr_muon+cheap"):
                    goal = 1.05 if r["base"] == "adamw" else 1.03
                    verdict = "met" if r["ratio"] <= goal and r["worst_ratio"] <= 1.2 else "MISSED"
                    lines.append(f"- {desc}: {r['dopr']}/{r['base']} median {r['ratio']:.3f} (goal <= {goal}), worst "
                                 f"step {r['worst_ratio']:.2f} (goal <= 1.2): {verdict}")
    elif bench:
        lines += [f"{bench['status']}: {bench.get('reason')}", "", "```", bench.get("output_tail", ""), "```"]
    else:
        lines.append("not run")
    lines.append("")

    problems = []
    for part, r in data["parts"].items():
        if r["status"] != "ok" and r.get("output_tail") and part not in ("tests", "bench"):
            problems.append((part, r["output_tail"]))
    for name, entry in data["tasks"].items():
        for key, r in entry.items():
            if isinstance(r, dict) and r.get("status") not in ("ok", None) and r.get("reason"):
                problems.append((f"{name} {key}", r["reason"]))
    if problems:
        lines += ["## Failures", ""]
        for what, text in problems:
            lines += [f"**{what}**", "", "```", text, "```", ""]
    lines.append(f"Full output of every command: {data['tag']}.log.")
    return "\n".join(lines) + "\n"


# ---- one instrumented training run (a child process) ----------------------------------------------

def train_child(timing_path: Path, overrides: list[str]) -> None:
    """run.py with ``overrides``, timing the interval between optimizer steps (evaluations excluded)."""
    import runpy
    import types

    import torch

    import dopr.train as train_module

    def stop(signum, frame):  # the check's time limit: end like Ctrl-C, so the records say where it stopped
        raise KeyboardInterrupt(f"stopped by signal {signum} at the GPU check's time limit")

    signal.signal(signal.SIGTERM, stop)
    cuda = any(o.startswith("device=cuda") for o in overrides)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    state = {"last": None, "times": [], "eval_s": 0.0}
    patched = hasattr(train_module, "build_optimizer") and hasattr(train_module, "evaluate_model")

    def write_timing():
        times = state["times"]
        timing_path.parent.mkdir(parents=True, exist_ok=True)
        timing_path.write_text(json.dumps(dict(
            timed_steps=len(times), eval_s=round(state["eval_s"], 2),
            step_ms_median=1e3 * statistics.median(times) if times else None,
            step_ms_p90=1e3 * sorted(times)[int(0.9 * (len(times) - 1))] if times else None,
            timing="optimizer-step interval" if patched else "unavailable (dopr.train has no build_optimizer)")))
    if patched:
        build, evaluate = train_module.build_optimizer, train_module.evaluate_model

        def timed_build(model, *args, **kwargs):
            opt = build(model, *args, **kwargs)
            class_step = type(opt).step

            def step(self, *a, **k):  # a bound method, as torch's LR scheduler expects to wrap
                out = class_step(self, *a, **k)
                sync()
                now = time.perf_counter()
                if state["last"] is not None:
                    state["times"].append(now - state["last"])
                state["last"] = now
                return out

            opt.step = types.MethodType(step, opt)
            return opt

        def timed_evaluate(*args, **kwargs):
            write_timing()  # the training steps are done (or some are): recorded even if the evaluation hangs
            start = time.perf_counter()
            try:
                return evaluate(*args, **kwargs)
            finally:
                now = time.perf_counter()
                state["eval_s"] += now - start
                state["last"] = now  # the next interval starts after the evaluation

        train_module.build_optimizer, train_module.evaluate_model = timed_build, timed_evaluate
    sys.argv = [str(REPO / "run.py"), *overrides]
    code = 0
    try:
        runpy.run_path(str(REPO / "run.py"), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        code = 124
    finally:
        write_timing()
    sys.exit(code)


def _list(value: str | None) -> list[str]:
    if not value:
        return []
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


KEYS = ("device", "size", "steps", "tasks", "parts", "jobs", "budget", "limits", "wheels", "gl", "out", "work", "tag")


def main(argv: list[str]) -> None:
    if argv[:1] == ["_train"]:  # one instrumented run.py, started by the tasks part
        split = argv.index("--")
        opts = dict(a.split("=", 1) for a in argv[1:split])
        train_child(Path(opts["timing"]), argv[split + 1:])
    given, _ = split_key_values(argv, KEYS, __doc__)  # dopr.cli's rules, standard library only
    raise SystemExit(Check(given).run())


if __name__ == "__main__":
    main(sys.argv[1:])
