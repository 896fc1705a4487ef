"""Typed key=value command lines (dopr/script_args.py) and the scripts that use them."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dopr.script_args import parse_script_args

REPO = Path(__file__).resolve().parents[1]
USAGE = "usage: demo.py env=<name> [steps=10]"


@dataclass
class DemoArgs:
    env: str
    steps: int = 10
    rate: float = 0.5
    flag: bool = True
    names: list[str] = field(default_factory=list)
    out: Path | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_values_are_typed_like_their_fields():
    args = parse_script_args(["env=Lift", "steps=3", "rate=1e-3", "flag=false", "names=[a,b]", "out=/tmp/x"],
                             DemoArgs, USAGE)
    assert args == DemoArgs(env="Lift", steps=3, rate=1e-3, flag=False, names=["a", "b"], out=Path("/tmp/x"))
    assert parse_script_args(["env=Can"], DemoArgs, USAGE) == DemoArgs(env="Can")


@pytest.mark.parametrize("argv,message", [
    (["env=Lift", "stesp=3"], "unknown key 'stesp'; known keys: env, steps, rate, flag, names, out"),
    (["env=Lift", "steps=three"], "steps='three' is not a valid int"),
    (["env=Lift", "names=a"], "write lists as names=[a,b]"),
    (["steps=3"], "missing required key(s): env=..."),
    (["env=Lift", "steps=0"], "steps must be >= 1, got 0"),
    (["Lift"], "argument 'Lift' is not key=value"),
    (["env=Lift", "env=Can"], "key 'env' given twice"),
])
def test_bad_arguments_print_usage_and_name_the_key(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_script_args(argv, DemoArgs, USAGE)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(USAGE) and message in err


def test_help_prints_the_usage_and_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_script_args(["env=Lift", "help"], DemoArgs, USAGE)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == USAGE


def _load_script(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,known_key", [("make_demos", "num_demos"), ("bench_optim", "gpt_d_model"),
                                            ("ddp_example", "backend")])
def test_scripts_print_their_docstring_on_help_and_reject_unknown_keys(name, known_key, capsys, monkeypatch):
    script = _load_script(name, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == script.__doc__.strip()
    with pytest.raises(SystemExit) as exit_info:  # rejected before any work (no env, no process group)
        script.main(["--steps", "3"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        script.main(["bogus=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and known_key in err.split("known keys:")[1]
