"""Typed ``key=value`` command lines for scripts/, in the style of run.py's Hydra overrides.

A script declares its arguments as a dataclass (field name = key, annotation = type, default =
default; a field without a default is required) and its usage in its module docstring::

    @dataclass
    class Args:
        env: str
        num_demos: int = 100

    args = parse_script_args(sys.argv[1:], Args, __doc__)

Values are parsed as OmegaConf (Hydra's own config library) parses a dotlist: YAML scalars,
``key=[a,b]`` for lists, ``key=null`` for None, then converted to the field's type.
``help`` (or ``-h`` / ``--help``) prints the usage and exits 0. Anything wrong (an argument that is
not key=value, an unknown key, a key given twice, a value of the wrong type, a missing required
key, or a check in the dataclass's ``__post_init__`` raising ValueError) prints the usage and an
error naming the key, and exits with status 2, before the script does any work.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

HELP_WORDS = ("help", "-h", "--help")
Schema = TypeVar("Schema")


def parse_script_args(argv: Sequence[str], schema: type[Schema], usage: str | None) -> Schema:
    """``argv`` (without the program name) as an instance of the dataclass ``schema``."""
    usage = (usage or "").strip()

    def fail(message: str):
        sys.stderr.write(f"{usage}\n\nerror: {message}\n")
        raise SystemExit(2)

    fields = {field.name: field for field in dataclasses.fields(schema)}
    given: dict[str, str] = {}
    for arg in argv:
        if arg in HELP_WORDS:
            print(usage)
            raise SystemExit(0)
        key, equals, value = arg.partition("=")
        if not equals or not key:
            fail(f"argument {arg!r} is not key=value")
        if key not in fields:
            fail(f"unknown key {key!r}; known keys: {', '.join(fields)}")
        if key in given:
            fail(f"key {key!r} given twice ({key}={given[key]} and {arg})")
        given[key] = value
    merged = OmegaConf.structured(schema)
    for key, value in given.items():  # one at a time, so a bad value is reported with its own key
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException:
            hint = f"; write lists as {key}=[a,b]" if "list" in str(fields[key].type) else ""
            fail(f"{key}={value!r} is not a valid {fields[key].type}{hint}")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        fail(f"missing required key(s): {', '.join(f'{key}=...' for key in missing)}")
    try:
        return OmegaConf.to_object(merged)
    except ValueError as error:  # the schema's own checks (__post_init__)
        fail(str(error))
