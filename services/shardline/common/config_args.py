"""Command-line flags from a config dataclass, so that every default is written once.

Each field declared with `option(...)` becomes one flag:

    port: int = option(50061, help="gRPC port")
    -> --port PORT   gRPC port (default: 50061)

name `--kebab-case` of the field (or metadata "flag"), dest the field name, type from the
annotation (Optional[X] -> X; metadata "parse" overrides it), default the field's default,
choices from metadata, bool fields as --x / --no-x (argparse.BooleanOptionalAction), list
fields as a repeatable flag, metadata "aliases" more names of the same flag (`--tp`). A field
without a default is a required flag. Metadata "env"
names an environment variable read by `config_from_args` (not at import) when the flag is
absent. Fields declared with plain `field()` or `option(cli=False)` get no flag.

    add_config_args(WorkerConfig, parser, names=None)   # flags of all (or the named) fields
    config_from_args(WorkerConfig, namespace, **kw)     # the dataclass back
    config_argv(WorkerConfig, namespace, names)         # flags that re-create those values
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Callable, Iterable, Optional, Sequence

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL")   # logging's names


def option(default: Any = dataclasses.MISSING, *, help: str, flag: Optional[str] = None,
           choices: Optional[Sequence] = None, parse: Optional[Callable[[str], Any]] = None,
           env: Optional[str] = None, metavar: Optional[str] = None,
           default_factory: Any = dataclasses.MISSING, cli: bool = True,
           aliases: Sequence[str] = ()) -> Any:
    """dataclasses.field() with the metadata of its flag (see the module docstring)."""
    metadata = dict(help=help, flag=flag, choices=choices, parse=parse, env=env,
                    metavar=metavar, cli=cli, aliases=tuple(aliases) or None)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={k: v for k, v in metadata.items() if v is not None})


def log_level_option(default: str = "INFO") -> Any:
    """The --log-level field every service has."""
    return option(default, help="log level", choices=LOG_LEVELS, parse=str.upper)


DEFAULT_DRAIN_TIMEOUT_S = 30.0


def drain_timeout_option(default: float = DEFAULT_DRAIN_TIMEOUT_S) -> Any:
    """The --drain-timeout-s field every service has (common/server.py's drain)."""
    return option(default, help="after SIGTERM: seconds calls in flight may go on (new ones "
                                "are refused) before they are cancelled")


def _cli_fields(cls, names: Optional[Iterable[str]] = None) -> list[dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(cls)
              if "help" in f.metadata and f.metadata.get("cli", True)}
    if names is None:
        return list(fields.values())
    missing = [n for n in names if n not in fields]
    if missing:
        raise KeyError(f"{cls.__name__} has no flag for field(s) {missing}")
    return [fields[n] for n in names]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(cls, f: dataclasses.Field) -> tuple[Any, bool]:
    """(scalar type, is_list) of a field's annotation; Optional[X] -> X."""
    t = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        (t,) = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) is list:
        (elem,) = typing.get_args(t)
        return elem, True
    return t, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config_args(cls, parser: argparse.ArgumentParser,
                    names: Optional[Iterable[str]] = None) -> None:
    """Add a flag for every option() field of dataclass cls (or only the named ones)."""
    for f in _cli_fields(cls, names):
        t, is_list = _value_type(cls, f)
        help_text = f.metadata["help"].replace("%", "%%")
        default = _default(f)
        kw: dict[str, Any] = dict(dest=f.name, help=help_text)
        if f.metadata.get("choices") is not None:
            kw["choices"] = f.metadata["choices"]
        elif t is not bool:
            kw["metavar"] = (f.metadata.get("metavar")
                             or flag_name(f)[2:].replace("-", "_").upper())
        if default is dataclasses.MISSING:
            kw["required"] = True
        if t is bool and not is_list:
            kw.update(action=argparse.BooleanOptionalAction,
                      default=False if default is dataclasses.MISSING else default)
            kw.pop("required", None)
        else:
            kw["type"] = f.metadata.get("parse") or t
            if is_list:
                kw.update(action="append", default=None)
            elif default is not dataclasses.MISSING:
                kw["default"] = default
        action = parser.add_argument(flag_name(f), *f.metadata.get("aliases", ()), **kw)
        if default not in (None, "", dataclasses.MISSING) and not is_list \
                and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"


def config_from_args(cls, ns: Any, **overrides) -> Any:
    """cls(...) from the attributes of ns (a parsed namespace) named like its option() fields;
    fields ns lacks keep their defaults; keyword arguments win."""
    kw = {}
    for f in _cli_fields(cls):
        if not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        if value is None and f.metadata.get("env"):
            value = os.environ.get(f.metadata["env"])
        if value is None and _value_type(cls, f)[1]:
            continue                                  # an unused repeatable flag: the default
        kw[f.name] = value
    kw.update(overrides)
    return cls(**kw)


def config_argv(cls, ns: Any, names: Iterable[str]) -> list[str]:
    """The flags that give the named fields of cls the values in ns (a namespace or a config)
    on another process's command line; values equal to the field's default are left out."""
    argv: list[str] = []
    for f in _cli_fields(cls, names):
        t, is_list = _value_type(cls, f)
        if is_list:
            raise TypeError(f"config_argv: {f.name} is a list field")
        value = getattr(ns, f.name)
        if value is None or value == _default(f):
            continue
        name = flag_name(f)
        if t is bool:
            argv.append(name if value else "--no-" + name[2:])
        else:
            argv += [name, str(value)]
    return argv
