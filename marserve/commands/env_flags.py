"""Environment fallbacks for a command's flags: MARSERVE_<FLAG> gives --<flag> its default.

A container or a Kubernetes pod configures `marserve serve` through its environment, one variable per flag,
without rewriting the command line: `--max-num-seqs` reads MARSERVE_MAX_NUM_SEQS, the positional MODEL_DIR
reads MARSERVE_MODEL_DIR. A flag given on the command line wins over its variable. An empty variable counts
as unset (compose files often write `VAR: ""` for "leave it"). Switches take 1/true/yes/on or 0/false/no/off.

The variables are read when the parser is built; a value the flag would refuse is not raised there (that
would break `marserve --help` for every command) but kept, and check() raises it as a one-line ConfigError
when the command runs.
"""

from __future__ import annotations

import argparse
import os

from marserve.errors import ConfigError

PREFIX = "MARSERVE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def env_name(action: argparse.Action) -> str:
    """--max-num-seqs -> MARSERVE_MAX_NUM_SEQS; a positional by its dest (model_dir -> MARSERVE_MODEL_DIR)."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    name = longs[0][2:] if longs else action.dest
    return PREFIX + name.replace("-", "_").upper()


def add_env_fallbacks(parser: argparse.ArgumentParser) -> None:
    """Every flag of parser (except --help) takes its default from its variable when that is set, and says so
    in its help."""
    errors = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = env_name(action)
        action.help = f"{action.help or ''} [env {name}]".lstrip()
        raw = os.environ.get(name, "")
        if raw == "":
            continue
        try:
            action.default = _parse(action, raw)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            errors.append(f"{name}={raw!r}: {e}")
    parser.set_defaults(_env_errors=errors)


def check(args: argparse.Namespace) -> None:
    """Raises the first variable that held a value its flag refuses, in one line."""
    errors = getattr(args, "_env_errors", None)
    if errors:
        raise ConfigError(f"{errors[0]} (unset it, or give the flag on the command line)")


def _parse(action: argparse.Action, raw: str):
    if isinstance(action, _SWITCHES):
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ValueError(f"expected one of {', '.join(sorted(_TRUE | _FALSE))}")
        on = word in _TRUE
        if isinstance(action, argparse.BooleanOptionalAction):
            return on
        return action.const if on else not action.const  # store_true / store_false: "on" means the flag is given
    if action.nargs in ("*", "+"):
        return [_one(action, part) for part in raw.split()]
    return _one(action, raw)


def _one(action: argparse.Action, raw: str):
    value = action.type(raw) if callable(action.type) else raw
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
    return value
