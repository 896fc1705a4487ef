"""The benchmark script runs end to end, including the GPT workload that the GPU table uses (tiny, on CPU)."""

import json
import math
import subprocess
import sys
from pathlib import Path

from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpt_workload_reports_every_pair(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_optim.py"), "workloads=[gpt]", "gpt_d_model=64",
                    "gpt_layers=2", "gpt_seq_len=16", "gpt_batch=2", "rounds=1", "steps=2", "warmup=1", "threads=1",
                    f"out={tmp_path}"],
                   check=True, cwd=REPO, capture_output=True, text=True)
    report = json.loads((tmp_path / "bench_cpu.json").read_text())
    (desc, rows), = report["results"].items()
    assert "GPT blocks d=64 x2" in desc
    assert {r["dopr"] for r in rows} >= {"dopr_adamw", "dopr_muon", "dopr_adamw+cheap", "dopr_muon+cheap"}
    for row in rows:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["ap_extra_mb"] > 0  # AP state exists for every DoPr variant
    assert "| dopr_adamw | adamw |" in (tmp_path / "bench_cpu.md").read_text()


def test_bench_pairs_primal_and_tag_choose_what_runs(tmp_path):
    """What gpu_check asks of it: AdamW and Muon only, no primal variant, files named by tag."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_optim.py"), "pairs=[adamw,muon]", "primal=false",
                    "workloads=[gpt]", "gpt_d_model=64", "gpt_layers=1", "gpt_seq_len=8", "gpt_batch=2",
                    "tag=tiny-gpu", "rounds=1", "steps=1", "warmup=1", "threads=1", f"out={tmp_path}"],
                   check=True, cwd=REPO, capture_output=True, text=True)
    report = json.loads((tmp_path / "bench_tiny-gpu.json").read_text())
    (rows,) = report["results"].values()
    assert [(r["base"], r["dopr"]) for r in rows] == [("adamw", "dopr_adamw"), ("muon", "dopr_muon"),
                                                     ("adamw", "dopr_adamw+cheap"), ("muon", "dopr_muon+cheap")]
    assert report["args"]["pairs"] == ["adamw", "muon"] and report["cheap"]["ap"]["stat_interval"] == 10
    assert all(r["base_peak_mb"] is None for r in rows)  # peak memory is measured on CUDA only
    assert "peak" not in (tmp_path / "bench_tiny-gpu.md").read_text()
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_optim.py"), "pairs=[sgd]"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "pairs=['sgd']: choose a non-empty list from" in bad.stderr


def test_cuda_tables_show_peak_memory_and_gpu_names_make_file_names():
    bench = load_script("bench_optim")
    row = dict(base="adamw", dopr="dopr_adamw", base_ms=10.0, dopr_ms=10.4, ratio=1.04, worst_ratio=1.1,
               base_state_mb=650.0, ap_extra_mb=75.0, base_peak_mb=9000.0, dopr_peak_mb=9400.0, ap_extra_peak_mb=400.0)
    text = bench.markdown([row], "GPT")
    assert "AP extra peak MB |" in text and text.splitlines()[-1].endswith("| 9000 | 9400 | 400 |")
    assert bench.device_tag("cpu") == "cpu"
