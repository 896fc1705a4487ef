"""The ``key=value`` command lines of scripts/ and ``python -m dopr.data.sft`` (run.py's override style).

A script declares its keys once, as a dataclass (field name = key, annotation = type, default =
default; a field without a default is required), and its usage in its module docstring::

    @dataclass
    class Args:
        env: str
        gen_demos: int = 100

    args = parse_script_args(sys.argv[1:], Args, __doc__)

Values: a ``str`` or ``Path`` field takes the text exactly as written (``claim=a: b``,
``seeds=0,1,2`` and ``title=1e2`` keep their characters); other fields are parsed as OmegaConf
(Hydra's config library) parses a dotlist, YAML scalars and ``key=[a,b]`` for lists, then converted
to the field's type. ``key=null`` gives None (an error for a field that may not be None).

``help`` (or ``-h`` / ``--help``) prints the usage and exits 0. Anything wrong (an argument that is
not key=value, an unknown key, a key given twice, a value of the wrong type, a missing required
key, or a check in the dataclass's ``__post_init__`` raising ValueError) prints the usage and an
error naming the key, and exits with status 2, before the script does any work.

A script whose other keys go on to run.py (scripts/compare.py) calls
``parse_script_args_and_overrides``: every key with a dot in it (``trainer.steps=3000``) is returned
untouched as a Hydra override instead of being an unknown key.

Scripts leave out ``from __future__ import annotations``: with string annotations, ``@dataclass``
fails in a module loaded by importlib without a sys.modules entry (as the tests load scripts).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence, TypeVar


HELP_WORDS = ("help", "-h", "--help")
FLAG_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
Schema = TypeVar("Schema")


class ScriptArgsError(SystemExit):
    """Exit status 2 (a usage error, as argparse's), with the message as the exception's text."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def parse_script_args(argv: Sequence[str], schema: type[Schema], usage: str | None) -> Schema:
    """``argv`` (without the program name) as an instance of the dataclass ``schema``."""
    args, _ = _parse(argv, schema, usage, pass_dotted=False)
    return args


def parse_script_args_and_overrides(argv: Sequence[str], schema: type[Schema],
                                    usage: str | None) -> tuple[Schema, list[str]]:
    """As ``parse_script_args``, but keys with a dot are kept, in order, as Hydra overrides ``key=value``."""
    return _parse(argv, schema, usage, pass_dotted=True)


def split_key_values(argv: Sequence[str], known: Sequence[str], usage: str | None,
                     pass_dotted: bool = False) -> tuple[dict[str, str], list[str]]:
    """The key=value text of ``argv`` as ``{key: value}`` (and, with ``pass_dotted``, the dotted keys in
    order as Hydra overrides), with this module's help and error rules. Standard library only, so a
    script that runs before its packages are installed (scripts/gpu_check.py) uses the same rules."""
    usage = (usage or "").strip()

    def fail(message: str):
        sys.stderr.write(f"{usage}\n\nerror: {message}\n")
        raise ScriptArgsError(message)

    if any(arg in HELP_WORDS for arg in argv):
        print(usage)
        raise SystemExit(0)
    given: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, equals, value = arg.partition("=")
        if not equals or not key:
            fail(f"argument {arg!r} is not key=value")
        if key in given:
            fail(f"key {key!r} given twice ({key}={given[key]} and {arg})")
        if key not in known and not (pass_dotted and "." in key):
            extra = "; or any dotted key (trainer.steps=..., opt.lr=...), passed to run.py" if pass_dotted else ""
            fail(f"unknown key {key!r}; known keys: {', '.join(known)}{extra}")
        given[key] = value
        if key not in known:
            overrides.append(arg)
    return {k: v for k, v in given.items() if k in known}, overrides


def _parse(argv: Sequence[str], schema: type, usage: str | None, pass_dotted: bool) -> tuple[object, list[str]]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from omegaconf.nodes import PathNode, StringNode

    usage = (usage or "").strip()

    def fail(message: str):
        sys.stderr.write(f"{usage}\n\nerror: {message}\n")
        raise ScriptArgsError(message)

    fields = {field.name: field for field in dataclasses.fields(schema)}
    given, overrides = split_key_values(argv, list(fields), usage, pass_dotted)
    merged = OmegaConf.structured(schema)
    for key, value in given.items():  # one at a time, so a bad value is reported with its own key
        node = merged._get_node(key)
        try:
            if isinstance(node, (StringNode, PathNode)):  # text as written, not YAML (1e2 would become 100.0)
                merged[key] = None if value == "null" else value
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException:
            hint = f"; write lists as {key}=[a,b]" if "list" in str(fields[key].type) else ""
            fail(f"{key}={value!r} is not a valid {fields[key].type}{hint}")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        fail(f"missing required key(s): {', '.join(f'{key}=...' for key in missing)}")
    try:
        return OmegaConf.to_object(merged), overrides
    except ValueError as error:  # the schema's own checks (__post_init__)
        fail(str(error))


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
