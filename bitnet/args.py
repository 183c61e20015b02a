"""Arguments as dataclasses: `arg` declares a field with its command-line description, `command`
registers a function taking such a dataclass as a subcommand of `bitnet` (bitnet.cli builds the
parser and runs it), and `add_dataclass_arguments` turns the fields into argparse arguments;
`device` reads the commands' --device, `lm_head_arg` declares their --lm-head.

A ground-floor module: the modules that define subcommands (bitnet.generation, bitnet.commands,
...) and the benchmarks import it, and it imports nothing of the package.
"""

from __future__ import annotations

import argparse
import dataclasses
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


LM_HEADS = {"float": None, "int8": 8, "int4": 4}  # --lm-head: the bits of model.quantize_lm_head, None for none


def lm_head_arg():
    """The --lm-head field of the commands that run a model (generate, serve, eval ppl)."""
    return arg("float", help="the lm_head as loaded (float), or quantized as the model loads: int8 rows (half a bf16 "
               "head's bytes; test perplexity +0.02%% measured) or 4-bit groups of 32 against int8 activations (under a "
               "third; +0.39%%): a decode step reads the whole head, so a smaller one is a faster step",
               choices=list(LM_HEADS))


def device(name: str | None):
    """The torch.device a --device argument names (None: CUDA where torch sees a GPU, else the CPU),
    checked before anything is loaded: a name torch does not know, CUDA where torch sees no GPU and
    cuda:N past the last GPU are a ValueError saying so (the commands print it, exit 2), not a CUDA
    error in the middle of loading a model."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cuda, cuda:1, cpu, ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
            raise ValueError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, {build}); use "
                             "--device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return dev


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
