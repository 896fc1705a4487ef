"""The benchmark script runs end to end, including the GPT workload that the GPU table uses (tiny, on CPU)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
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
    """What gpu_check asks of it: AdamW and Muon only, no primal or P-formed variant, files named by tag."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_optim.py"), "pairs=[adamw,muon]", "primal=false",
                    "formed=false",
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


def test_flop_floor_counts_the_layers_ap_covers_by_hand():
    """Two layers, one with an augmented bias, on a (batch 2, sequence 7) input: n = 14 rows each."""
    import torch
    from torch import nn

    from dopr.optim import build_optimizer

    bench = load_script("bench_optim")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    inputs = torch.randn(2, 7, 3)
    loss = lambda m: m(inputs).pow(2).mean()
    layers = bench.ap_layers(model, loss, build_optimizer(model, "dopr_adamw"))
    assert [(x["n"], x["d_in"], x["d"], x["d_out"]) for x in layers] == [(14, 3, 4, 4), (14, 4, 4, 2)]
    floor = bench.flop_floor(layers, stat_interval=10, inverse_interval=10)
    # model 3·n·d_in·d_out with the true in_features; AP's terms with d = d_in + 1 for the augmented bias
    model_macs = 3 * 14 * 3 * 4 + 3 * 14 * 4 * 2  # 504 + 336 = 840
    stats, cubes, gp = 14 * 4**2 + 14 * 4**2, 4**3 + 4**3, 4 * 4**2 + 2 * 4**2  # 448, 128, 96
    assert (floor["model"], floor["stats"], floor["gp"]) == (model_macs, stats, gp)
    assert math.isclose(floor["factor"], cubes / 3) and math.isclose(floor["inverse"], 2 * cubes / 3)
    # exact AP solves with the factor every step; amortized AP forms P (factor + inverse) once in 10
    assert math.isclose(floor["exact"], (840 + 448 + 128 / 3 + 96) / 840)
    assert math.isclose(floor["amortized"], (840 + 96 + (448 + 128) / 10) / 840)
    # ap.bias=gp: the bias stays with the GP, so AP's d is the layer's own
    plain = bench.ap_layers(model, loss, build_optimizer(model, "dopr_adamw", ap=dict(bias="gp")))
    assert [x["d"] for x in plain] == [3, 4]
    # max_rows sub-sampling: the floor's row count is the one AP records (14 rows, stride 3 -> 5)
    cheap = bench.ap_layers(model, loss, build_optimizer(model, "dopr_adamw", ap=dict(max_rows=5, stat_interval=10)))
    assert [x["n"] for x in cheap] == [bench.sampled_rows(14, 5)] * 2 == [5, 5]
    sampled = bench.flop_floor(layers, 10, 10, max_rows=5)
    assert math.isclose(sampled["amortized"], (840 + 96 + (5 * 16 * 2) / 10 + 128 / 10) / 840)


def test_peer_table_on_the_wide_workload(tmp_path):
    """pairs=[adamw] peers=[soap]: AdamW, DoPr-AdamW (default, cheap, P formed) and SOAP in one table, with the floor."""
    pytest.importorskip("pytorch_optimizer")
    bench = load_script("bench_optim")
    bench.main(["workloads=[wide]", "wide_width=8", "wide_batch=16", "pairs=[adamw]", "primal=false", "peers=[soap]",
                "rounds=1", "steps=1", "warmup=1", f"out={tmp_path}", "tag=peers"])
    report = json.loads((tmp_path / "bench_peers.json").read_text())
    (desc,) = report["optimizers"]
    assert desc == "wide MLP 3 x Linear(8, 8), batch 16"
    rows = {r["optimizer"]: r for r in report["optimizers"][desc]}
    assert list(rows) == ["adamw", "dopr_adamw", "dopr_adamw+cheap", "dopr_adamw+formed", "soap"]
    assert rows["adamw"]["ratio"] == 1.0 and rows["soap"]["state_mb"] > rows["adamw"]["state_mb"]
    floor = report["floors"][desc]
    assert floor["model"] == 3 * (3 * 16 * 8 * 8) and floor["gp"] == 3 * 8 * 9**2  # d = 8 + 1 (bias)
    assert rows["dopr_adamw"]["floor"] == floor["exact"] and rows["dopr_adamw+cheap"]["floor"] == floor["amortized"]
    assert rows["dopr_adamw+formed"]["floor"] == floor["formed"] > floor["exact"]  # P formed: 2d^3/3 more
    for label in ("dopr_adamw", "dopr_adamw+cheap", "dopr_adamw+formed"):
        assert math.isclose(rows[label]["x_floor"], rows[label]["ratio_to_base"] / rows[label]["floor"])
    assert rows["soap"]["floor"] is None and math.isfinite(rows["soap"]["ratio"])
    md = (tmp_path / "bench_peers.md").read_text()
    assert "ATen CPU capability" in md.splitlines()[0]
    # exact AP's kernels alone, over the same multiply-adds as the floor
    kernels = floor["kernels"]
    assert kernels["macs"] == dict(model=floor["model"], statistics=floor["stats"], factor=floor["factor"],
                                   solve=floor["gp"])
    assert all(ms > 0 for ms in kernels["ms"].values())
    assert math.isclose(kernels["ap_ms"], kernels["ms"]["statistics"] + kernels["ms"]["factor"] + kernels["ms"]["solve"])
    assert "Exact AP's kernels alone" in md and "the rest of AP's step" in md
    assert "| floor, exact AP | floor, amortized AP |" in md and "| AP floor | x floor |" in md
    assert "| soap | " in md and "(amortized) |" in md
    assert [(r["base"], r["dopr"]) for r in report["results"][desc]] == [
        ("adamw", "dopr_adamw"), ("adamw", "dopr_adamw+cheap"), ("adamw", "dopr_adamw+formed")]


def test_unknown_peers_and_workloads_are_refused_before_any_work(capsys, monkeypatch):
    bench = load_script("bench_optim")
    for arg, message in [
            ("peers=[shampoo]", "peers=['shampoo']: choose from ['soap', 'kron'], each once, or []"),
            ("workloads=[wid]", "workloads=['wid']: choose a non-empty list from ['mlp', 'wide', 'lm', 'gpt']")]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main([arg])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # Kron without opt_einsum would run through its factors' outer product: refused before any work, here and
    # by build_optimizer itself
    pytest.importorskip("pytorch_optimizer")
    monkeypatch.setattr(bench.torch.backends.opt_einsum, "is_available", lambda: False)
    with pytest.raises(ValueError, match="kron needs the opt_einsum package"):
        bench.BenchArgs(peers=["kron"])
    assert bench.BenchArgs(peers=["soap"]).peers == ["soap"] and bench.BenchArgs(peers=[]).peers == []
    from dopr.optim import build_optimizer

    with pytest.raises(ImportError, match=r"kron and dopr_kron need the opt_einsum package.*dopr\[optimizers\]"):
        build_optimizer(bench.torch.nn.Linear(2, 2), "kron", lr=1e-3)
