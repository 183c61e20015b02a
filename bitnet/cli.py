"""The `bitnet` command: one subcommand per job, each a dataclass of arguments and a function.

A subcommand is registered with `command(name, Args)` on a function taking `Args`; argparse is
built from the dataclass fields (the field's metadata gives help, choices and positional-ness), so
the arguments are declared once and the function is callable from Python with the same dataclass.
`arg`, `command` and the registry live in bitnet.args, below every module that registers a
subcommand; they are importable from here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .args import COMMANDS, add_dataclass_arguments, arg, command  # noqa: F401 (arg, command: re-exported)


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="bitnet", description="BitNet b1.58: ternary language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Listed in the order of COMMAND_MODULES, then of registration, whichever module was imported first.
    order = {module: i for i, module in enumerate(COMMAND_MODULES)}
    for name, (cls, _, help) in sorted(COMMANDS.items(), key=lambda c: order.get(c[1][1].__module__, len(order))):
        p = sub.add_parser(name, help=help, description=help)
        add_dataclass_arguments(p, cls)
    return parser


# Modules whose import registers subcommands with @command.
COMMAND_MODULES = ["bitnet.commands", "bitnet.generation", "bitnet.serve.server"]


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
