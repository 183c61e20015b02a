"""Fuzz tier: hypothesis throws malformed inputs at the loaders and the command line.

Targets: config.json (mutated values, types, keys, raw bytes), safetensors files (header length,
JSON header: offsets, dtypes, shapes; truncation; flipped bytes), sharded index files, tokenizer.json,
and `bitnet` with hostile arguments. Every input must end in success or one of the package's own
error types (CheckpointError, ConfigError, DataError, HubError; the CLI: exit status 2 with a one-line
message): never another exception (a dependency's traceback), a hang (each input has a time limit)
or an unbounded allocation (the process' peak RSS is checked). The default tier tries a few dozen
inputs per target (seconds); `-m slow` tries thousands. The count of inputs tried is printed.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import struct
import time

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bitnet import BitNetForCausalLM  # noqa: E402
from bitnet.checkpoint import CheckpointError  # noqa: E402
from bitnet.config import BitNetConfig, ConfigError  # noqa: E402
from bitnet.hub import HubError  # noqa: E402
from bitnet.train.data import DataError, load_tokenizer  # noqa: E402

OURS = (CheckpointError, ConfigError, DataError, HubError)
TRIED: dict[str, int] = {}
LIMIT_S = 20  # one input: longer is a hang
RSS_LIMIT_KB = 6 * 1024 * 1024


def tiers(n_fast: int, n_slow: int):
    return pytest.mark.parametrize("examples", [pytest.param(n_fast, id="fast"),
                                                pytest.param(n_slow, id="long", marks=pytest.mark.slow)])


@pytest.fixture(scope="module", autouse=True)
def report(request):
    t0 = time.time()
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    line = (f"fuzz: {sum(TRIED.values())} inputs in {time.time() - t0:.1f} s ("
            + ", ".join(f"{k} {v}" for k, v in TRIED.items()) + "), peak RSS "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    with capture.global_and_fixture_disabled():
        print("\n" + line, flush=True)


class Hang(Exception):
    pass


def bounded(target: str, fn, *args):
    """fn(*args): success or one of OURS; anything else fails the example (hypothesis shrinks it)."""
    TRIED[target] = TRIED.get(target, 0) + 1

    def alarm(*_):
        raise Hang(f"{target}: more than {LIMIT_S} s on one input")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(LIMIT_S)
    try:
        fn(*args)
    except OURS as e:
        assert str(e) and "\n" not in str(e).strip() or len(str(e)) < 2000, str(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < RSS_LIMIT_KB, "unbounded allocation"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid tiny checkpoint folder (packed, offline) and its files' bytes."""
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    cfg = BitNetConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=1)
    model = BitNetForCausalLM(cfg)
    from bitnet.convert import freeze

    freeze(model)
    model.save_pretrained(str(d / "packed"))
    model.save_pretrained(str(d / "sharded"), max_shard_size=20_000)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2, "<unk>": 3}, [("a", "b")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    (d / "tokenizer.json").write_text(tok.to_str())
    return d


def folder_with(tmp_path_factory, src, files: dict[str, bytes]):
    d = tmp_path_factory.mktemp("case", numbered=True)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), d / f)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 2**31, 2**63, 10**9])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["bitnet", "llama", "offline", "online", "autobitlinear", "bitlinear", "bitnet1", "F32", "U8"]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8)


def mutate_json(data, obj, n=3):
    """Replace, delete or add up to n values anywhere in obj (a parsed JSON document)."""
    for _ in range(data.draw(st.integers(1, n))):
        node, path = obj, []
        while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node))))
            path.append((node, key))
            node = node[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if isinstance(obj, dict) and action == "add":
                obj[data.draw(st.text(max_size=10) | st.sampled_from(list(obj) or ["x"]))] = data.draw(JSON)
            continue
        parent, key = path[-1]
        if action == "delete":
            del parent[key]
        else:
            parent[key] = data.draw(JSON)
    return obj


SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False, database=None)


# ----------------------------------------------------------------------------- config.json
@tiers(60, 3000)
def test_config_json(base, tmp_path_factory, examples):
    good = json.loads((base / "packed" / "config.json").read_text())

    @settings(max_examples=examples, **SETTINGS)
    @given(st.data())
    def run(data):
        if data.draw(st.integers(0, 9)) == 0:
            raw = data.draw(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
        else:
            raw = json.dumps(mutate_json(data, json.loads(json.dumps(good)), 4)).encode()
        d = folder_with(tmp_path_factory, base / "packed", {"config.json": raw})
        bounded("config.json", BitNetForCausalLM.from_pretrained, str(d))
        shutil.rmtree(d)

    run()


# ----------------------------------------------------------------------------- safetensors
DTYPES = ["F32", "F16", "BF16", "F64", "U8", "I8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "U64", "XX", ""]


def mutate_safetensors(data, blob: bytes) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    header, body = json.loads(blob[8:8 + n]), blob[8 + n:]
    kind = data.draw(st.sampled_from(["length", "entry", "entry", "json", "truncate", "flip", "header_bytes"]))
    if kind == "length":
        n2 = data.draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 16), n + 16) | st.sampled_from([0, 1, 2**63, 2**64 - 1]))
        return struct.pack("<Q", n2) + blob[8:]
    if kind == "truncate":
        return blob[:data.draw(st.integers(0, len(blob)))]
    if kind == "flip":
        b = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
        return bytes(b)
    if kind == "header_bytes":
        return struct.pack("<Q", n) + data.draw(st.binary(min_size=n, max_size=n)) + body
    names = [k for k in header if k != "__metadata__"]
    name = data.draw(st.sampled_from(names))
    if kind == "entry":
        e = header[name]
        what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop"]))
        if what == "dtype":
            e["dtype"] = data.draw(st.sampled_from(DTYPES))
        elif what == "shape":
            e["shape"] = data.draw(st.lists(st.integers(-2, 2**40) | st.integers(0, 300), max_size=4))
        elif what == "offsets":
            e["data_offsets"] = data.draw(st.lists(st.integers(-1, 2**63) | st.integers(0, len(body) + 8), min_size=0, max_size=3))
        elif what == "rename":
            header[data.draw(st.text(max_size=30))] = header.pop(name)
        else:
            header.pop(name)
    else:
        header = mutate_json(data, header, 3)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


@tiers(80, 4000)
def test_safetensors_headers(base, tmp_path_factory, examples):
    blob = (base / "packed" / "model.safetensors").read_bytes()

    @settings(max_examples=examples, **SETTINGS)
    @given(st.data())
    def run(data):
        d = folder_with(tmp_path_factory, base / "packed", {"model.safetensors": mutate_safetensors(data, blob)})
        bounded("safetensors", BitNetForCausalLM.from_pretrained, str(d))
        shutil.rmtree(d)

    run()


# ----------------------------------------------------------------------------- sharded index
@tiers(50, 2000)
def test_sharded_index(base, tmp_path_factory, examples):
    good = json.loads((base / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in os.listdir(base / "sharded") if f.startswith("model-"))

    @settings(max_examples=examples, **SETTINGS)
    @given(st.data())
    def run(data):
        kind = data.draw(st.sampled_from(["json", "json", "paths", "raw", "shard"]))
        files = {}
        if kind == "raw":
            files["model.safetensors.index.json"] = data.draw(st.binary(max_size=100))
        elif kind == "paths":
            idx = json.loads(json.dumps(good))
            key = data.draw(st.sampled_from(sorted(idx["weight_map"])))
            idx["weight_map"][key] = data.draw(st.sampled_from(["../config.json", "/etc/passwd", "", ".", "config.json",
                                                                "tokenizer.json", shards[0], "nope.safetensors"]) | st.text(max_size=20))
            files["model.safetensors.index.json"] = json.dumps(idx).encode()
        elif kind == "shard":
            name = data.draw(st.sampled_from(shards))
            files[name] = mutate_safetensors(data, (base / "sharded" / name).read_bytes())
        else:
            files["model.safetensors.index.json"] = json.dumps(mutate_json(data, json.loads(json.dumps(good)), 3)).encode()
        d = folder_with(tmp_path_factory, base / "sharded", files)
        bounded("index", BitNetForCausalLM.from_pretrained, str(d))
        shutil.rmtree(d)

    run()


# ----------------------------------------------------------------------------- tokenizer.json
@tiers(60, 3000)
def test_tokenizer_json(base, tmp_path_factory, examples):
    good = json.loads((base / "tokenizer.json").read_text())

    @settings(max_examples=examples, **SETTINGS)
    @given(st.data())
    def run(data):
        if data.draw(st.integers(0, 9)) == 0:
            raw = data.draw(st.binary(max_size=200))
        else:
            raw = json.dumps(mutate_json(data, json.loads(json.dumps(good)), 4)).encode()
        d = tmp_path_factory.mktemp("tok", numbered=True)
        (d / "tokenizer.json").write_bytes(raw)
        bounded("tokenizer.json", load_tokenizer, str(d))
        shutil.rmtree(d)

    run()


# ----------------------------------------------------------------------------- the command line
HOSTILE = (st.text(max_size=40) | st.sampled_from(["", "-", "--", "-1", "nan", "inf", "1e400", "..", "/", "/dev/null",
                                                   "/proc/self/mem", "a/b", "org/name", "x" * 5000, "--help-not",
                                                   "tiny", "\x00", "config.json", "--to", "gguf", "--max-steps"]))


@tiers(40, 1500)
def test_cli_hostile_arguments(base, tmp_path, monkeypatch, examples):
    from bitnet.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("BITNET_DEBUG", raising=False)
    folder = str(base / "packed")

    def cli(argv):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage error
            assert e.code in (0, 2, None), e.code
            return
        assert rc in (0, 2), rc

    @settings(max_examples=examples, **SETTINGS)
    @given(st.sampled_from(["info", "convert", "eval", "memory"]), st.lists(HOSTILE | st.just(folder), max_size=5))
    def run(cmd, rest):
        if cmd == "convert" and rest[1:2] and not rest[1].startswith("-"):
            rest = [rest[0], str(tmp_path / "out" / str(random.random())), *rest[2:]]  # never write outside tmp
        bounded("cli", cli, [cmd, *rest])

    run()
