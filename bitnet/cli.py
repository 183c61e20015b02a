"""The `bitnet` command: one subcommand per job, each a dataclass of arguments and a function.

A subcommand is registered with `command(name, Args)` on a function taking `Args`; argparse is
built from the dataclass fields (the field's metadata gives help, choices and positional-ness), so
the arguments are declared once and the function is callable from Python with the same dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable

COMMANDS: dict[str, tuple[type, Callable, str]] = {}


def arg(default=dataclasses.MISSING, help: str = "", positional: bool = False, choices=None, **kw):
    """A dataclass field with its command-line description."""
    meta = {"help": help, "positional": positional, "choices": choices}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta, **kw)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def command(name: str, args_cls: type, help: str = ""):
    def register(fn):
        COMMANDS[name] = (args_cls, fn, help or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return register


def _base_type(tp):
    """int for `int | None`, etc."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        return _base_type(inner[0])
    if origin in (list, tuple):
        return _base_type(typing.get_args(tp)[0]), "+"
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        base = _base_type(hints[f.name])
        nargs = None
        if isinstance(base, tuple):
            base, nargs = base
        kwargs = {"help": meta.get("help", "")}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if meta.get("positional"):
            parser.add_argument(f.name, type=base, nargs=nargs if nargs else ("?" if not required else None),
                                default=None if required else f.default, **kwargs)
            continue
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **kwargs)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default is not None and kwargs["help"]:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, type=base, nargs=nargs, default=default, required=required, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="bitnet", description="BitNet b1.58: ternary language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_dataclass_arguments(p, cls)
    return parser


# Modules whose import registers subcommands with @command.
COMMAND_MODULES = ["bitnet.commands", "bitnet.generation"]


def _load_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cls, fn, _ = COMMANDS[ns.command]
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    try:
        result = fn(cls(**values))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("BITNET_DEBUG"):
            raise
        print(f"bitnet {ns.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
