"""scripts/compare.py's seeds: a seed given twice is refused before any run, and one seed (or one seed left
after a missing value) prints its difference without an interval rather than NaN bounds."""

import math

import pytest
from script_loader import load_script

compare = load_script("compare")


def summaries(values: dict) -> dict:
    """(opt, seed) -> a summary.json as the runner returns it; ``values``: (opt, seed) -> (val/loss, cost ratio)."""
    return {key: {"status": "finished", "headline_metric": "test/cost_ratio", "higher_is_better": False,
                  "last": {"step": 30, "val/loss": val, "test/cost_ratio": cost}}
            for key, (val, cost) in values.items()}


def test_a_seed_given_twice_is_refused_before_any_run(capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.parse(["seeds=1,1"])
    assert exit_info.value.code == 2
    assert "seeds='1,1' lists seed 1 twice" in capsys.readouterr().err


def test_one_seed_prints_its_difference_and_says_there_is_no_interval(tmp_path, capsys):
    cfg = {"task": "lds", "base": "adamw", "seeds": [3], "out": tmp_path}
    compare.report(cfg, summaries({("adamw", 3): (0.2, 2.0), ("dopr_adamw", 3): (0.1, 1.0)}))
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "better on" not in out
    assert "dopr_adamw minus adamw, seed 3 (one seed: no interval):" in out
    assert f"test/cost_ratio: log ratio {math.log(0.5):+.3g} (DoPr better)" in out
    assert "val/loss: -0.1 (DoPr better)" in out


def test_a_seed_missing_on_one_side_leaves_no_nan_in_the_report(tmp_path, capsys):
    cfg = {"task": "lds", "base": "adamw", "seeds": [0, 1], "out": tmp_path}
    compare.report(cfg, summaries({("adamw", 0): (0.2, 2.0), ("dopr_adamw", 0): (0.1, 1.0),
                                   ("adamw", 1): (0.3, 3.0), ("dopr_adamw", 1): (None, 1.5)}))
    out = capsys.readouterr().out
    assert "nan" not in out.lower()
    assert "| dopr_adamw | 0.1 (1 missing) |" in out
    assert "val/loss: -0.1 (one seed: no interval), DoPr better on 1/1 seeds: inconclusive" in out
