"""``--config FILE``: a command's options from a file, as axolotl / torchtune users keep their runs.

``apr-kernels train --config run.yaml --steps 50`` reads ``run.yaml`` (or ``.json`` / ``.toml``), a
mapping of option names (``lr`` or ``--lr``; ``lora_rank`` and ``lora-rank`` alike) to values, and
runs as if those options came first on the command line: the command line's own options override
them (argparse keeps the last value), and a command-line option of a mutually exclusive pair
(``--epochs``) replaces the file's other one (``steps``). Values: a number or a string, a list for
options that take several, true/false for switches (``--no-X`` for false where the option has one),
null for "not given". Every key and value is checked here against the command's own parser, so an
error names the file, the key and what was expected, before anything runs. Positional arguments stay
on the command line.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path


def load_mapping(path: Path) -> dict:
    """The file's top-level mapping (YAML needs PyYAML, TOML Python 3.11+ or tomli, JSON nothing)."""
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        parse = json.loads
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: the same parser as the tomli package
            try:
                import tomli as tomllib
            except ImportError:
                raise ValueError(f"--config {path}: reading TOML needs Python 3.11+ or the tomli package; or "
                                 f"write the options as .json") from None
        parse = tomllib.loads
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or write the "
                             f"options as .json or .toml") from None
        parse = yaml.safe_load
    else:
        raise ValueError(f"--config {path}: unknown format {suffix or '(no suffix)'}; expected .yaml, .yml, .json "
                         f"or .toml")
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except Exception as exc:  # the parsers' own errors (JSONDecodeError, YAMLError, ...): one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--config {path}: not valid {suffix[1:].upper()} ({first})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: holds a {type(data).__name__}; expected a mapping of option name to "
                         f"value")
    return data


def _split_config(argv: list[str]) -> tuple[list[str], str | None]:
    """(argv without ``--config FILE`` / ``--config=FILE``, FILE or None)."""
    out, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config: expected a file name after it")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, path


def _tokens(path: Path, command: str, sub: argparse.ArgumentParser, key: str, value) -> list[str]:
    """The command-line tokens of one ``key: value`` of the file, checked against the option."""
    options = {opt: action for action in sub._actions for opt in action.option_strings if opt.startswith("--")}
    opt = "--" + str(key).removeprefix("--").replace("_", "-")
    if opt == "--config":
        raise ValueError(f"--config {path}: a config file cannot name another (key {key!r})")
    action = options.get(opt)
    if action is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        close = difflib.get_close_matches(opt, [o for o in options if o not in ("--help", "--version")], n=1)
        hint = f"; did you mean {close[0][2:]!r}?" if close else ""
        raise ValueError(f"--config {path}: {key!r} is not an option of {command}{hint}")
    where = f"--config {path}: {key}"
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):  # --X / --no-X
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r}; expected true or false")
        positive = action.option_strings[0]
        return [positive if value == (opt == positive) else "--no-" + positive[2:]]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r}; expected true or false (a switch)")
        return [opt] if value == isinstance(action, argparse._StoreTrueAction) else []
    several = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not several:
        raise ValueError(f"{where}={value!r}; expected one value, not a list")
    if several and not values and action.nargs == "+":
        raise ValueError(f"{where}: expected at least one value")
    strings = []
    for v in values:
        if isinstance(v, (dict, list)) or isinstance(v, bool):
            raise ValueError(f"{where}={value!r}; expected a number or a string")
        s = str(v)
        try:
            converted = action.type(s) if callable(action.type) else s
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            kind = getattr(action.type, "__name__", "value")
            raise ValueError(f"{where}={v!r}; expected a valid {kind} ({exc})") from None
        if action.choices is not None and converted not in action.choices:
            raise ValueError(f"{where}={v!r}; expected one of {', '.join(map(str, action.choices))}")
        strings.append(s)
    return [opt, *strings]


def expand(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with a command's ``--config FILE`` replaced by the file's options, placed before the
    command line's own (module docstring). ``argv`` without ``--config`` comes back as it is."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    at = next((i for i, a in enumerate(argv) if a in subparsers.choices), None)
    rest, name = _split_config(argv[at + 1:]) if at is not None else (argv, None)
    if name is None:
        raise ValueError("--config FILE goes after a command: apr-kernels COMMAND --config FILE [options]")
    command, sub = argv[at], subparsers.choices[argv[at]]
    path = Path(name)
    data = load_mapping(path)
    given = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
    # an option of a mutually exclusive group given on the command line replaces the file's others
    replaced = {opt for group in sub._mutually_exclusive_groups
                for opt in (o for a in group._group_actions for o in a.option_strings)
                if given & {o for a in group._group_actions for o in a.option_strings}}
    tokens = []
    for key, value in data.items():
        part = _tokens(path, command, sub, key, value)
        if part and part[0] in replaced and part[0] not in given:
            continue
        tokens += part
    return [*argv[:at + 1], *tokens, *rest]
