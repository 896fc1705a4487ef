"""Small helpers for the key=value command lines of scripts/ (the same style as run.py's overrides)."""

from __future__ import annotations

FLAG_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["env=Hopper-v5", "seed=0"]`` -> ``{"env": "Hopper-v5", "seed": "0"}``; anything else is an error."""
    out = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"argument {arg!r} is not key=value (e.g. env=Hopper-v5)")
        key, value = arg.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def parse_flag(value) -> bool | None:
    """True for true/1/yes, False for false/0/no (any case; YAML/Hydra may already have made it a
    bool or an int), None for anything else (e.g. a path)."""
    if isinstance(value, bool):
        return value
    return FLAG_WORDS.get(str(value).strip().lower())


def is_true(value) -> bool:
    """A key=value flag: true/1/yes switch it on, false/0/no off; anything else is an error."""
    flag = parse_flag(value)
    if flag is None:
        raise SystemExit(f"flag value {value!r} is not one of {sorted(FLAG_WORDS)}")
    return flag
