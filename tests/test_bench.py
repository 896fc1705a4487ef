"""The benchmark script runs end to end, including the GPT workload that the GPU table uses (tiny, on CPU)."""

import json
import math
import subprocess
import sys
from pathlib import Path

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
