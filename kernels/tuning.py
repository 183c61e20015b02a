"""Autotuning choices kept across processes, in a table per GPU model.

With BITNET_AUTOTUNE=full a kernel's first launch with a new tuning key (its shapes, flags and
dtypes) compiles every config that fits and times each for ~30 ms: seconds at a model's first
forward, more at a server's start (every decode bucket, every prefill bucket), and all of it
again in the next process, which would choose the same. Each choice is now kept in a JSON table
per GPU model (torch.cuda.get_device_name: an H100 and an H200 are both sm_90 but not alike):

- this machine's, in BITNET_TUNING_DIR (default ~/.cache/bitnet/tuning; `off`: none), written
  atomically after every key tuned; an entry is used only by the kernel source that timed it (a
  kernel edited since is tuned again);
- the package's, kernels/tuned/<GPU model>.json: tables made on a GPU by the device script
  (benchmarks/gpu_check.sh writes this machine's table with its results) and committed; read
  only, used whatever kernel source made them: a choice among the kernel's current configs.
An entry whose config is not among the configs that fit now is ignored (a config list edited
since). A key found in either table (this machine's first) is launched with its config: nothing
timed, one config compiled. Policy (BITNET_AUTOTUNE, common.py): `full` reads and writes the
tables, `retune` times every key afresh and writes this machine's table (after a driver or
Triton update, or to time what the package's table chose), `first` and `compile` read and write neither.

The hook is Triton's own (`Autotuner.check_disk_cache`, which Triton's TRITON_CACHE_AUTOTUNING
uses): Triton keys its file by its own and the compiler's build (no table could ship) and not by
the GPU model, and would still compile every config first (precompile.py runs only on a miss
here). A table that cannot be read or written is warned about once and left alone: tuning never
fails a launch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
from pathlib import Path

import torch
import triton

TUNING_DIR_ENV = "BITNET_TUNING_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent / "tuned"
FORMAT = 1
_LOG = logging.getLogger(__name__)
_LOCK = threading.Lock()
_TABLES: dict[Path, tuple[tuple, dict]] = {}  # path -> ((mtime_ns, size), entries): reread when the file changes
_WARNED: set[str] = set()
STATS = {"from_table": 0, "recorded": 0}  # keys this process took from a table, and tuned and kept
UNTIMED_POLICIES = ("first", "compile")  # the BITNET_AUTOTUNE policies that time nothing and use no table


def user_dir() -> Path | None:
    """This machine's tables (BITNET_TUNING_DIR; `off` or empty: none)."""
    value = os.environ.get(TUNING_DIR_ENV)
    if value is None:
        return Path.home() / ".cache" / "bitnet" / "tuning"
    value = value.strip()
    return None if value.lower() in ("", "off", "0", "none") else Path(value).expanduser()


def table_name(device: str) -> str:
    """The file of a GPU model's table: its name with every run of other characters an underscore."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device).strip("_") + ".json"


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(nargs: dict) -> str | None:
    """The GPU model a launch runs on (its first CUDA tensor's), or the active driver's `device_name`
    (precompile's stand-in driver), or None (no table)."""
    for v in nargs.values():
        if isinstance(v, torch.Tensor) and v.is_cuda:
            return _cuda_name(v.device.index if v.device.index is not None else torch.cuda.current_device())
    return getattr(triton.runtime.driver.active, "device_name", None)


def config_dict(config: triton.Config) -> dict:
    """A config as JSON holds it (its constexprs and launch options)."""
    return json.loads(json.dumps(config.all_kwargs()))


def _warn_once(what: str, message: str) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        _LOG.warning(message)


def _read(path: Path, mine: bool = True) -> dict:
    """The entries of the table at path ({} if there is none, or it cannot be read: warned once)."""
    try:
        st = path.stat()
    except OSError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _TABLES.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"expected a JSON object with \"format\": {FORMAT} and \"entries\"")
        entries = data["entries"]
    except (OSError, ValueError) as e:
        _warn_once(str(path), f"the autotuning table {path} cannot be read ({type(e).__name__}: {e}); it is ignored"
                              + ("; the next key tuned here writes it anew" if mine else ""))
        entries = {}
    _TABLES[path] = (stamp, entries)
    return entries


def _match(entry, configs: list[triton.Config]) -> triton.Config | None:
    if not isinstance(entry, dict):
        return None
    return next((c for c in configs if config_dict(c) == entry.get("config")), None)


def lookup(device: str, key: str, source: str, configs: list[triton.Config]) -> triton.Config | None:
    """The config chosen before for `key` on this GPU model: this machine's table (same kernel
    source), then the package's; None if neither has one among `configs`."""
    with _LOCK:
        mine = user_dir()
        if mine is not None:
            entry = _read(mine / table_name(device)).get(key)
            if isinstance(entry, dict) and entry.get("source") == source and (config := _match(entry, configs)):
                return config
        return _match(_read(SHIPPED_DIR / table_name(device), mine=False).get(key), configs)


def record(device: str, key: str, source: str, chosen: triton.Config, timings: dict) -> None:
    """Keep `chosen` for `key` in this machine's table, with every config's median time (ms;
    None: it did not compile or run), merged into the table as it is now on disk."""
    from bitnet.atomic import atomic_write_bytes

    mine = user_dir()
    if mine is None:
        return
    path = mine / table_name(device)
    timed = [[config_dict(c), t[0] if isinstance(t, (list, tuple)) else t] for c, t in timings.items()]
    entry = {"config": config_dict(chosen), "source": source, "triton": triton.__version__,
             "ms": [[c, round(t, 6) if isinstance(t, float) and math.isfinite(t) else None] for c, t in timed]}
    with _LOCK:
        entries = dict(_read(path))
        entries[key] = entry
        data = {"format": FORMAT, "device": device, "entries": dict(sorted(entries.items()))}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(str(path), (json.dumps(data, indent=1) + "\n").encode())
        except Exception as e:  # noqa: BLE001: a table that cannot be written costs a retune, never a launch
            _warn_once(f"write {path}", f"the autotuning table {path} cannot be written ({e}); choices are kept "
                                        f"for this process only")
            return
        _TABLES.pop(path, None)
    STATS["recorded"] += 1


class PerGPU(dict):
    """Triton's in-memory choices (an Autotuner's `cache`), kept per GPU model. Triton keys them by
    the launch's shapes, flags and dtypes only: on a machine with two GPU models (an H100 beside an
    L4) the second would launch the first's choice untimed, a config that may not be its fastest or
    not fit it at all (227 KB of shared memory a program against 99). Each key here is (the GPU
    model of the launch being tuned, Triton's key); read while Triton runs the autotuner, which
    holds the launch's arguments (`nargs`) then: `in`, `[]` and `[] =` are all Triton's run uses."""

    __slots__ = ("_tuner",)

    def __init__(self, tuner):
        super().__init__()
        self._tuner = tuner

    def _key(self, key):
        return device_name(self._tuner.nargs or {}), key

    def __contains__(self, key):
        return dict.__contains__(self, self._key(key))

    def __getitem__(self, key):
        return dict.__getitem__(self, self._key(key))

    def __setitem__(self, key, value):
        dict.__setitem__(self, self._key(key), value)


def attach(autotuner, policy, before_choice) -> None:
    """Route `autotuner`'s choice of a config for a new key through the tables: Triton calls
    check_disk_cache(key, configs, bench_fn) with the configs that fit; `policy()` is the
    BITNET_AUTOTUNE policy; `before_choice(configs, timed)` runs first, timed True where the
    configs are about to be timed (precompile). Its choices in memory are kept per GPU model (PerGPU)."""
    jit = autotuner.fn
    while not isinstance(jit, triton.runtime.jit.JITFunction) and hasattr(jit, "fn"):
        jit = jit.fn  # (decorators over the kernel; under the interpreter, down to the Python function)
    autotuner.cache = PerGPU(autotuner)
    autotuner.cache_results = True
    autotuner.check_disk_cache = functools.partial(_choose, autotuner, jit, policy, before_choice)


def _choose(autotuner, jit, policy, before_choice, tuning_key, configs, bench_fn) -> bool:
    """Triton's check_disk_cache: True if the config came from a table (nothing timed)."""
    mode = policy()
    device = device_name(autotuner.nargs) if mode not in UNTIMED_POLICIES else None
    if device is None:
        before_choice(configs, True)
        bench_fn()
        return False
    key, source = f"{jit.__name__} {tuning_key!r}", getattr(jit, "cache_key", None)
    if mode == "full":
        config = lookup(device, key, source, configs)
        if config is not None:
            autotuner.cache[tuning_key] = config
            autotuner.configs_timings = {}  # (nothing was timed)
            STATS["from_table"] += 1
            before_choice(configs, False)
            return True
    before_choice(configs, True)
    bench_fn()
    record(device, key, source, autotuner.cache[tuning_key], autotuner.configs_timings)
    return False
