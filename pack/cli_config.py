"""Config files for the command lines (``pack-build --config``, ``train-run --config``).

A config file is a YAML mapping of option names (the long flag without ``--``; dashes or
underscores) to values. :func:`expand_config` turns it into command-line tokens placed *before*
the real arguments, so flags given on the command line win and every check a flag gets runs
unchanged on the file's values:

* ``true`` / ``false``: ``--flag`` / ``--no-flag`` (a plain ``--flag`` switch set to ``false``
  is left out); ``null``: left out (the default);
* lists: the flag once per item for repeatable options, the items after the flag for options
  that take several values, the values themselves for positional arguments;
* anything else: ``--flag=VALUE``.

Positional arguments (pack-build's ``INPUT... OUT``) may come from the file; any positional on
the command line replaces all of the file's. :func:`effective_config` is the reverse: the
parsed options as a mapping that ``--config`` reads back.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import PacktrainError
from .files import write_atomic

CONFIG_FLAG = "--config"
_NOT_OPTIONS = {"help", "version", "config"}


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` (read by :func:`expand_config` before parsing; shown in --help)."""
    parser.add_argument(CONFIG_FLAG, metavar="FILE.yaml",
                        help="read options from a YAML file (keys: the long option names); "
                             "options given on the command line win")


def load_config(path: str | Path) -> dict:
    """The YAML mapping in ``path`` (an empty file is an empty mapping), or a one-line error."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PacktrainError(f"{CONFIG_FLAG} {p}: cannot read it "
                             f"({getattr(e, 'strerror', None) or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PacktrainError(f"{p}{where}: not valid YAML ({what})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PacktrainError(f"{p}: a config file must be a mapping of option names to values, "
                             f"not a {type(data).__name__}")
    return data


def split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the ``--config`` path or None, argv without it)."""
    path, rest, i = None, [], 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest.extend(argv[i:])
            break
        if tok == CONFIG_FLAG or tok.startswith(CONFIG_FLAG + "="):
            if path is not None:
                raise PacktrainError(f"{CONFIG_FLAG} given twice; give one file")
            if tok == CONFIG_FLAG:
                if i + 1 >= len(argv):
                    raise PacktrainError(f"{CONFIG_FLAG}: expected a file name after it")
                path, i = argv[i + 1], i + 2
            else:
                path, i = tok.split("=", 1)[1], i + 1
            if not path.strip():
                raise PacktrainError(f"{CONFIG_FLAG}: empty; give a YAML file")
            continue
        rest.append(tok)
        i += 1
    return path, rest


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_OPTIONS
            and a.dest != argparse.SUPPRESS}


def _long_flag(action: argparse.Action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


def _scalar(value: Any, key: str, source: str) -> str:
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        kind = "true/false" if isinstance(value, bool) else type(value).__name__
        raise PacktrainError(f"{source}: {key}: expected a single value, not {kind} (quote it "
                             f"if it is text)")
    return str(value)


def _tokens(action: argparse.Action, value: Any, key: str, source: str) -> list[str]:
    """The command-line tokens that give ``action`` the ``value`` (an option's; not positional)."""
    flag = _long_flag(action)
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise PacktrainError(f"{source}: {key}: expected true or false, not {value!r}")
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true / store_false / store_const / count-like switches
        if not isinstance(value, bool):
            raise PacktrainError(f"{source}: {key}: expected true or false, not {value!r}")
        return [flag] if value == bool(action.const) else []
    items = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._AppendAction):
        return [f"{flag}={_scalar(v, key, source)}" for v in items]
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        return [flag, *(_scalar(v, key, source) for v in items)]
    return [f"{flag}={_scalar(value, key, source)}"]


def config_tokens(parser: argparse.ArgumentParser, config: dict,
                  source: str) -> tuple[list[str], list[str]]:
    """(option tokens, positional tokens) for the mapping ``config`` read from ``source``."""
    actions = _actions(parser)
    options: list[str] = []
    positionals: list[str] = []
    for key, value in config.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise PacktrainError(f"{source}: unknown key {key!r} (not a {parser.prog} option; see "
                                 f"{parser.prog} --help)")
        if value is None:
            continue
        if action.option_strings:
            options.extend(_tokens(action, value, str(key), source))
        else:
            items = value if isinstance(value, list) and action.nargs is not None else [value]
            positionals.extend(_scalar(v, str(key), source) for v in items)
    return options, positionals


class _Stop(Exception):
    """The relaxed parse met --help, --version or an error: the real parse will deal with it."""


def _stop(*_args: Any, **_kwargs: Any) -> None:
    raise _Stop


def _has_positionals(make_parser: Callable[[], argparse.ArgumentParser],
                     argv: list[str]) -> bool:
    """Whether ``argv`` gives any positional argument: parsed, silently, with every argument
    made optional. A call it cannot parse counts as giving them: the file's are then left out
    and the real parse reports the problem with the true usage line."""
    relaxed = make_parser()
    relaxed.error = relaxed.exit = relaxed._print_message = _stop  # type: ignore[method-assign]
    positional = [a for a in relaxed._actions if not a.option_strings]
    for a in relaxed._actions:
        a.required = False
        if not a.option_strings:
            a.nargs = {"+": "*", None: "?"}.get(a.nargs, a.nargs)
            a.default = None
    try:
        ns = relaxed.parse_known_args(argv)[0]  # the real parse names unknown flags
    except _Stop:
        return True
    return any(getattr(ns, a.dest, None) not in (None, []) for a in positional)


def expand_config(make_parser: Callable[[], argparse.ArgumentParser],
                  argv: Sequence[str]) -> list[str]:
    """``argv`` with its ``--config FILE`` replaced by the file's options (before the rest, so
    the command line wins) and, when the command line gives none, the file's positionals."""
    path, rest = split_config_flag(argv)
    if path is None:
        return rest
    parser = make_parser()
    options, positionals = config_tokens(parser, load_config(path), path)
    options = _overridden_lists_dropped(parser, options, rest)
    if positionals and not _has_positionals(make_parser, rest):
        return options + rest + ["--"] + positionals
    return options + rest


def _overridden_lists_dropped(parser: argparse.ArgumentParser, options: list[str],
                              rest: list[str]) -> list[str]:
    """The file's values of a repeatable option (``--shards``) that the command line also gives
    are left out: appended, they would add to the command line's instead of yielding to it."""
    given = {tok.split("=", 1)[0] for tok in rest if tok.startswith("--")}
    repeatable = {flag for a in parser._actions if isinstance(a, argparse._AppendAction)
                  for flag in a.option_strings}
    return [tok for tok in options
            if not (tok.split("=", 1)[0] in repeatable and tok.split("=", 1)[0] in given)]


def effective_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     exclude: Iterable[str] = ()) -> dict:
    """Every option of ``parser`` (defaults included) with its value in ``args``, keyed by its
    long name, in a form :func:`expand_config` reads back."""
    skip = set(exclude)
    out = {}
    for dest, action in _actions(parser).items():
        if dest in skip or not hasattr(args, dest):
            continue
        key = _long_flag(action)[2:] if action.option_strings else dest
        value = getattr(args, dest)
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def dump_config(config: dict, header: str = "") -> str:
    """YAML text of ``config`` (option order kept), after ``header`` comment lines."""
    import yaml

    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def write_config(path: str | Path, config: dict, header: str = "") -> None:
    write_atomic(Path(path), dump_config(config, header).encode())


def manifest_config(manifest: dict) -> dict:
    """The pack-build arguments a manifest records, as a config for ``pack-build --config``
    (workers left to the default when it was automatic: it does not change a byte)."""
    args = dict(manifest.get("arguments") or {})
    if args.get("workers") == "auto":
        args.pop("workers")
    return {k.replace("_", "-"): v for k, v in args.items() if v is not None}
