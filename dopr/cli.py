"""Small helpers for the key=value command lines of scripts/ (the same style as run.py's overrides)."""

from __future__ import annotations


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["env=Hopper-v5", "seed=0"]`` -> ``{"env": "Hopper-v5", "seed": "0"}``; anything else is an error."""
    out = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"argument {arg!r} is not key=value (e.g. env=Hopper-v5)")
        key, value = arg.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def is_true(value: str) -> bool:
    """A key=value flag: "1", "true" or "yes" (any case) switch it on."""
    return str(value).lower() in ("1", "true", "yes")
