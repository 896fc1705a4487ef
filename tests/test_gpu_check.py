"""scripts/gpu_check.sh cannot rot: its dry run (device=cpu, size=tiny) runs every part here.

The GPU machine runs the same script with device=cuda and full sizes (scripts/gpu_check.py), so
what is checked here is everything but CUDA and EGL: carried-wheel install and import check, the
GPU-marked tests (skipped here), the bench with a tiny GPT, two tasks end to end with both
optimizers, the report with every section, a failing part that does not stop the next, and a part
stopped at its time limit. ``bash scripts/gpu_check.sh device=cpu size=tiny`` runs all eight tasks
(~3 min on a 2-core CPU).
"""

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~45 s on a 2-core CPU


def write_wheel(folder: Path, name: str = "gpucheck_probe", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel, as pip download would leave one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", f"__version__ = '{version}'\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/top_level.txt", f"{name}\n")
        wheel.writestr(f"{info}/RECORD", "")
    (folder / "requirements.txt").write_text(f"{name}=={version}\n")
    return path


def gpu_check(*args: str, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "device=cpu", "size=tiny", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_writes_every_section(tmp_path):
    write_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    done = gpu_check("tasks=[lds,flow_2d]", f"wheels={tmp_path / 'wheels'}", f"out={out}", f"work={tmp_path / 'work'}",
                     out=out)
    assert done.returncode == 0, done.stdout + done.stderr

    report = (out / "gpu_check" / "cpu.md").read_text()
    for heading in ("# GPU check:", "## Summary", "## Install", "## GPU-marked tests", "## Tasks",
                    "## Optimizer step cost"):
        assert heading in report, heading
    for part in ("install", "tests", "bench", "tasks"):
        assert f"| {part} | ok |" in report, part
    data = json.loads((out / "gpu_check" / "cpu.json").read_text())
    assert (out / "gpu_check" / "cpu.log").stat().st_size > 0

    install = data["parts"]["install"]
    assert install["versions"]["gpucheck_probe"] == "0.1 (carried)"  # installed by pip, imported through PYTHONPATH
    assert install["versions"]["torch"] and "MISSING" not in json.dumps(install["versions"])

    tests = data["parts"]["tests"]
    assert "tests/optim/test_precision.py" in tests["files"]
    assert tests["counts"]["skipped"] >= 2 and tests["counts"]["failed"] == 0  # needs CUDA: skipped here

    for task, metric in (("lds", "test/cost_ratio"), ("flow_2d", "test/swd")):
        for opt in ("adamw", "dopr_adamw"):
            run = data["tasks"][task][opt]
            assert run["status"] == "ok" and run["metric"] == metric, (task, opt, run)
            assert math.isfinite(run["val_loss"]) and math.isfinite(run["metric_value"])
            assert run["step_ms_median"] > 0 and run["timed_steps"] == 2  # 3 steps: 2 intervals
            assert f"| {task} | {opt} | ok |" in report

    bench = json.loads((out / "bench" / "bench_cpu.json").read_text())
    gpt = next(rows for desc, rows in bench["results"].items() if desc.startswith("GPT blocks d=64 x2"))
    assert {r["dopr"] for r in gpt} == {"dopr_adamw", "dopr_muon", "dopr_adamw+cheap", "dopr_muon+cheap"}
    assert "| dopr_muon+cheap | muon |" in report and (out / "bench" / "bench_cpu.md").exists()


def test_a_failing_part_is_recorded_and_the_next_part_runs(tmp_path):
    out = tmp_path / "out"
    done = gpu_check("parts=[tests,bench]", f"out={out}", f"work={tmp_path / 'work'}", out=out,
                     env={"PYTEST_ADDOPTS": "--no-such-option"})  # pytest refuses to start: exit status 4
    assert done.returncode == 1
    data = json.loads((out / "gpu_check" / "cpu.json").read_text())
    assert data["parts"]["tests"]["status"] == "failed" and data["parts"]["tests"]["reason"] == "exit status 4"
    assert data["parts"]["bench"]["status"] == "ok"
    report = (out / "gpu_check" / "cpu.md").read_text()
    assert "| tests | failed |" in report and "| bench | ok |" in report and "| install | not run yet |" in report
    assert "--no-such-option" in report  # pytest's own words, in the report


def test_a_part_past_its_time_is_killed_and_recorded(tmp_path):
    out = tmp_path / "out"
    done = gpu_check("parts=[tasks]", "tasks=[lds]", "steps=1000000", "limits=[tasks:8]", f"out={out}",
                     f"work={tmp_path / 'work'}", out=out)
    assert done.returncode == 1
    data = json.loads((out / "gpu_check" / "cpu.json").read_text())
    assert data["parts"]["tasks"]["status"] == "failed" and data["parts"]["tasks"]["seconds"] < 25
    adamw, dopr = data["tasks"]["lds"]["adamw"], data["tasks"]["lds"]["dopr_adamw"]
    assert adamw["status"] == "timeout" and adamw["reason"].startswith("killed after 8 s"), adamw
    # stopped with SIGTERM: the run recorded how far it got before it ended
    assert adamw["timed_steps"] > 0 and adamw["run_status"] == "failed", adamw
    assert dopr["status"] == "skipped"  # nothing left of the part's time
    assert "| lds | adamw | timeout" in (out / "gpu_check" / "cpu.md").read_text()


def test_results_go_under_OUT_when_it_is_set(tmp_path, monkeypatch):
    gpu_check_module = load_script("gpu_check")
    monkeypatch.setenv("OUT", str(tmp_path))
    check = gpu_check_module.Check({"device": "cpu", "size": "tiny", "work": str(tmp_path / "work")})
    assert check.out == tmp_path / "results" and check.tag == "cpu"
    assert check.report_dir == tmp_path / "results" / "gpu_check"
    with pytest.raises(SystemExit, match="unknown task or part"):
        gpu_check_module.Check({"device": "cpu", "tasks": "[lds,nope]", "work": str(tmp_path / "work")})
