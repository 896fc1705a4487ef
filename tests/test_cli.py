"""The one key=value command-line parser (dopr/cli.py) and every script that uses it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dopr.cli import parse_script_args, parse_script_args_and_overrides
from script_loader import load_script

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


@dataclass
class TextArgs:
    claim: str = ""
    seeds: str = "0"
    title: str | None = "default"
    out: Path | None = None


def test_text_fields_keep_the_characters_as_written():
    """YAML would turn 1e2 into 100.0 and 'a: b' into a mapping; a str key keeps what was typed."""
    args = parse_script_args(["claim=DoPr: lower loss", "seeds=1e2", "title=null", "out=2026-01-01"], TextArgs, USAGE)
    assert args == TextArgs(claim="DoPr: lower loss", seeds="1e2", title=None, out=Path("2026-01-01"))
    assert parse_script_args(["seeds=0,1,2", "claim=[x] y"], TextArgs, USAGE) == TextArgs(claim="[x] y", seeds="0,1,2")


def test_dotted_keys_are_passed_on_as_hydra_overrides_in_order(capsys):
    argv = ["env=Lift", "trainer.steps=3000", "steps=3", "opt.ap.damping=1e-4", "+task.extra=x"]
    args, overrides = parse_script_args_and_overrides(argv, DemoArgs, USAGE)
    assert args == DemoArgs(env="Lift", steps=3) and overrides == ["trainer.steps=3000", "opt.ap.damping=1e-4",
                                                                   "+task.extra=x"]
    with pytest.raises(SystemExit, match="unknown key 'seed'; known keys: env, steps") as exit_info:
        parse_script_args_and_overrides(["env=Lift", "seed=1"], DemoArgs, USAGE)
    assert exit_info.value.code == 2 and "or any dotted key" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="given twice"):
        parse_script_args_and_overrides(["env=Lift", "opt.lr=1", "opt.lr=2"], DemoArgs, USAGE)


def test_help_prints_the_usage_and_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_script_args(["env=Lift", "help"], DemoArgs, USAGE)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == USAGE


# every script under scripts/, with one of its keys
SCRIPT_KEYS = {"aggregate": "metrics", "ap_accuracy": "d_out", "bench_optim": "gpt_d_model", "compare": "seeds",
               "ddp_example": "backend", "gpu_check": "steps", "gpu_wheels": "dest", "make_demos": "gen_demos",
               "make_gym_demos": "action_noise",
               "results_table": "check", "run_study": "stage",
               "study": "verdict_where", "train_expert": "max_env_steps"}


def test_every_script_is_covered():
    assert set(SCRIPT_KEYS) == {path.stem for path in (REPO / "scripts").glob("*.py")}


@pytest.mark.parametrize("name", SCRIPT_KEYS)
def test_scripts_print_their_docstring_on_help_and_reject_bad_keys_alike(name, capsys):
    module = load_script(name)
    main, known_key = module.main, SCRIPT_KEYS[name]
    with pytest.raises(SystemExit) as exit_info:
        main(["help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == module.__doc__.strip()
    with pytest.raises(SystemExit) as exit_info:  # rejected before any work (no env, no run, no process group)
        main(["--steps", "3"])
    assert exit_info.value.code == 2 and "argument '--steps' is not key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(module.__doc__.strip()) and "error: unknown key 'bogus'; known keys: " in err
    assert known_key in err.split("known keys:")[1]


def test_sft_fixture_command_line_uses_the_same_parser():
    import dopr.data.sft

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "dopr.data.sft", *argv], cwd=REPO, capture_output=True, text=True)

    help_run, bad_run = run("help"), run("tiny_fixture=/tmp/x", "bogus=1")
    assert help_run.returncode == 0 and help_run.stdout.strip() == dopr.data.sft.__doc__.strip()
    assert bad_run.returncode == 2 and "error: unknown key 'bogus'; known keys: tiny_fixture" in bad_run.stderr
