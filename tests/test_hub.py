"""Hub ids in from_pretrained and the commands, against hub caches and a hub the tests build.

Nothing leaves the machine: the offline tests build huggingface_hub's cache layout by hand
(models--org--name/{blobs, refs, snapshots}), and the online ones run huggingface_hub's own client
against a small local server that answers the hub's API (model info, HEAD and GET of
/resolve/<revision>/<file>) and records every path asked for.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bitnet import BitNetConfig, BitNetForCausalLM, freeze
from bitnet.cli import main
from bitnet.hub import HubError, looks_like_repo_id, resolve

IDS = torch.tensor([[1, 5, 77, 3, 9, 120, 45, 45]])


def tiny_model(seed: int = 0, **kw) -> BitNetForCausalLM:
    torch.manual_seed(seed)
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=128, **kw)))
    return model.eval()


def folder_files(model, path, **save_kw) -> dict[str, bytes]:
    model.save_pretrained(str(path), **save_kw)
    return {f.name: f.read_bytes() for f in Path(path).iterdir() if f.is_file()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ----------------------------------------------------------------------------- a cache built by hand
def add_commit(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=("main",)) -> Path:
    """One commit of `repo_id` in huggingface_hub's layout: blobs named by content hash, the
    snapshot's files relative symlinks to them, refs/<name> holding the commit hash."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        link = snapshot / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.join("..", "..", "blobs", blob))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


C1, C2 = "1" * 40, "2" * 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """org/tiny: main = a single-file checkpoint (commit C1); branch v2 = a sharded one (C2)."""
    root = tmp_path_factory.mktemp("hub")
    m1, m2 = tiny_model(0), tiny_model(1)
    add_commit(root / "cache", "org/tiny", C1, folder_files(m1, root / "src1"))
    sharded = folder_files(m2, root / "src2", max_shard_size=20_000)
    assert "model.safetensors.index.json" in sharded and sum(n.endswith(".safetensors") for n in sharded) >= 3
    add_commit(root / "cache", "org/tiny", C2, sharded, refs=("v2",))
    return root / "cache", logits(m1), logits(m2)


def test_offline_load_from_the_cache(cache, monkeypatch):
    root, main_logits, v2_logits = cache
    model = BitNetForCausalLM.from_pretrained("org/tiny", cache_dir=root, local_files_only=True)
    assert torch.equal(logits(model), main_logits)
    # another revision, by branch and by commit hash; the sharded checkpoint
    for rev in ("v2", C2):
        model = BitNetForCausalLM.from_pretrained("org/tiny", cache_dir=root, local_files_only=True, revision=rev)
        assert torch.equal(logits(model), v2_logits)
    # HF_HUB_OFFLINE and HF_HUB_CACHE, as a user sets them: no network is tried (none is reachable here)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))
    assert torch.equal(logits(BitNetForCausalLM.from_pretrained("org/tiny")), main_logits)


def test_offline_errors_say_what_is_missing(cache, tmp_path):
    root, _, _ = cache
    kw = dict(cache_dir=root, local_files_only=True)
    with pytest.raises(HubError, match=r"offline .* org/absent is not in the hub cache"):
        resolve("org/absent", **kw)
    with pytest.raises(HubError, match=r"knows no revision 'v9' of org/tiny \(cached revisions: main, v2\)"):
        resolve("org/tiny", revision="v9", **kw)
    with pytest.raises(HubError, match=r"commit 3333.* whose snapshot is not in the hub cache"):
        resolve("org/tiny", revision="3" * 40, **kw)
    # a snapshot that lost a shard (an interrupted download), and one with only pickled weights
    files = folder_files(tiny_model(1), tmp_path / "src", max_shard_size=20_000)
    shard = sorted(n for n in files if n.startswith("model-"))[1]
    del files[shard]
    add_commit(tmp_path / "c", "org/broken", C1, files)
    with pytest.raises(HubError, match=f"lacks {shard}"):
        resolve("org/broken", cache_dir=tmp_path / "c", local_files_only=True)
    add_commit(tmp_path / "c", "org/pickled", C1, {"config.json": files["config.json"], "pytorch_model.bin": b"x"})
    with pytest.raises(HubError, match="lacks model.safetensors or model.safetensors.index.json"):
        resolve("org/pickled", cache_dir=tmp_path / "c", local_files_only=True)


def test_names_folders_and_paths(tmp_path, monkeypatch):
    assert resolve(str(tmp_path)) == str(tmp_path)  # a folder is itself, hub or not
    for path in ("runs/small/export", "./x", "/abs/path", "~/model", "../up", "a b"):
        assert not looks_like_repo_id(path)
        with pytest.raises(FileNotFoundError, match=f"checkpoint folder {path} does not exist"):
            BitNetForCausalLM.from_pretrained(path)
    for repo in ("microsoft/bitnet-b1.58-2B-4T", "HF1BitLLM/Llama3-8B-1.58-100B-tokens", "gpt2"):
        assert looks_like_repo_id(repo)


# ----------------------------------------------------------------------------- a hub served here
class FakeHub:
    """The few endpoints of the hub that huggingface_hub's download path uses; every request logged."""

    def __init__(self):
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}  # repo -> revision -> (commit, files)
        self.requests: list[tuple[str, str]] = []
        self.gated: set[str] = set()  # repos whose every request is refused as gated (403, GatedRepo)
        self.unserved: set[str] = set()  # files listed by model_info that a download does not find
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, body=False)

            def do_GET(self):
                hub.handle(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo: str, revision: str, commit: str, files: dict[str, bytes]) -> None:
        self.repos.setdefault(repo, {})[revision] = (commit, files)
        self.repos[repo][commit] = (commit, files)

    def fetched(self) -> list[str]:
        return [p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def handle(self, req, body: bool):
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(req.path).path)
        self.requests.append((req.command, path))
        if any(path.startswith(f"/api/models/{r}") or path.startswith(f"/{r}/resolve/") for r in self.gated):
            return self.error(req, 403, "GatedRepo")
        if path.startswith("/api/models/"):
            repo, _, revision = path[len("/api/models/"):].partition("/revision/")
            revision = revision or "main"
            if repo not in self.repos:
                return self.error(req, 404, "RepoNotFound")
            if revision not in self.repos[repo]:
                return self.error(req, 404, "RevisionNotFound")
            commit, files = self.repos[repo][revision]
            data = json.dumps({"id": repo, "modelId": repo, "sha": commit, "private": False,
                               "siblings": [{"rfilename": f} for f in files]}).encode()
            return self.send(req, 200, data, {"Content-Type": "application/json"}, body)
        repo, sep, rest = path.lstrip("/").partition("/resolve/")
        if not sep:
            return self.error(req, 404, "RepoNotFound")
        revision, _, fname = rest.partition("/")
        if repo not in self.repos:
            return self.error(req, 404, "RepoNotFound")
        if revision not in self.repos[repo]:
            return self.error(req, 404, "RevisionNotFound")
        commit, files = self.repos[repo][revision]
        if fname not in files or fname in self.unserved:
            return self.error(req, 404, "EntryNotFound", {"X-Repo-Commit": commit})
        data = files[fname]
        etag = hashlib.sha256(data).hexdigest()
        return self.send(req, 200, data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, body)

    def error(self, req, status, code, headers=None):
        self.send(req, status, b"{}", {"X-Error-Code": code, "X-Error-Message": code, **(headers or {})}, True)

    @staticmethod
    def send(req, status, data, headers, body):
        req.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            req.send_header(k, v)
        req.end_headers()
        if body:
            req.wfile.write(data)


@pytest.fixture
def hub(tmp_path):
    h = FakeHub()
    yield h
    h.server.shutdown()


def test_download_fetches_only_what_loading_needs(hub, tmp_path):
    model = tiny_model(2)
    model.tokenizer_files["tokenizer.json"] = b'{"fake": "tokenizer"}'
    model.tokenizer_files["chat_template.jinja"] = b"{{ messages }}"  # (where transformers saves a chat template)
    files = folder_files(model, tmp_path / "src", max_shard_size=20_000)
    shards = sorted(n for n in files if n.startswith("model-"))
    extra = {"pytorch_model.bin": b"pickle", "model.pt": b"pickle", "README.md": b"# card",
             "original/consolidated.safetensors": b"unused", "onnx/model.onnx": b"unused"}
    hub.add("org/sharded", "main", "a" * 40, {**files, **extra})
    cache = tmp_path / "cache"

    folder = _resolve_online(hub, "org/sharded", cache_dir=cache)
    assert sorted(hub.fetched()) == sorted(["config.json", "model.safetensors.index.json", *shards, "tokenizer.json",
                                            "chat_template.jinja"])
    # the real cache layout: refs/main -> the commit, the snapshot's files symlinks into blobs
    storage = cache / "models--org--sharded"
    assert (storage / "refs" / "main").read_text() == "a" * 40
    assert Path(folder) == storage / "snapshots" / ("a" * 40)
    assert all((Path(folder) / f).is_symlink() for f in ("config.json", shards[0]))
    expected = logits(model)
    assert torch.equal(logits(BitNetForCausalLM.from_pretrained(folder)), expected)
    # now offline: the same revision name resolves from the cache, no request made
    n = len(hub.requests)
    offline = BitNetForCausalLM.from_pretrained("org/sharded", cache_dir=cache, local_files_only=True)
    assert torch.equal(logits(offline), expected) and len(hub.requests) == n
    assert offline.tokenizer_files["tokenizer.json"] == b'{"fake": "tokenizer"}'
    assert offline.tokenizer_files["chat_template.jinja"] == b"{{ messages }}"  # carried, and saved again with it
    # a second online resolve asks for the commit and downloads nothing again
    _resolve_online(hub, "org/sharded", cache_dir=cache)
    assert len([r for r in hub.requests[n:] if r[0] == "GET" and "/resolve/" in r[1]]) == 0


def test_download_of_a_revision_other_than_main(hub, tmp_path):
    m_main, m_dev = tiny_model(3), tiny_model(4)
    hub.add("org/m", "main", "b" * 40, folder_files(m_main, tmp_path / "a"))
    hub.add("org/m", "dev", "c" * 40, folder_files(m_dev, tmp_path / "b"))
    cache = tmp_path / "cache"
    folder = _resolve_online(hub, "org/m", revision="dev", cache_dir=cache)
    assert torch.equal(logits(BitNetForCausalLM.from_pretrained(folder)), logits(m_dev))
    assert (cache / "models--org--m" / "refs" / "dev").read_text() == "c" * 40
    assert not (cache / "models--org--m" / "refs" / "main").exists()
    again = BitNetForCausalLM.from_pretrained("org/m", revision="dev", cache_dir=cache, local_files_only=True)
    assert torch.equal(logits(again), logits(m_dev))
    with pytest.raises(HubError, match="knows no revision 'main'"):
        resolve("org/m", cache_dir=cache, local_files_only=True)


def test_download_errors_say_what_is_wrong(hub, tmp_path):
    config = folder_files(tiny_model(5), tmp_path / "src")["config.json"]
    hub.add("org/pickled", "main", "d" * 40, {"config.json": config, "pytorch_model.bin": b"pickle"})
    hub.add("org/noconfig", "main", "e" * 40, {"model.safetensors": b"x"})
    cache = tmp_path / "cache"
    with pytest.raises(HubError, match=r"no folder org/absent here, and no model repo org/absent on the hub \(or it is private"):
        _resolve_online(hub, "org/absent", cache_dir=cache)
    with pytest.raises(HubError, match=r"the repo org/pickled has no revision 'v7'"):
        _resolve_online(hub, "org/pickled", revision="v7", cache_dir=cache)
    with pytest.raises(HubError, match=r"no safetensors weights .* it has pytorch_model.bin, but pickled weights are "
                                       r"never fetched or loaded"):
        _resolve_online(hub, "org/pickled", cache_dir=cache)
    with pytest.raises(HubError, match="the repo has no config.json"):
        _resolve_online(hub, "org/noconfig", cache_dir=cache)
    hub.add("org/gated", "main", "f" * 40, {"config.json": config})
    hub.gated.add("org/gated")
    with pytest.raises(HubError, match=r"org/gated is a gated repo: accept its terms on its hub page, then log in"):
        _resolve_online(hub, "org/gated", cache_dir=cache)
    sharded = folder_files(tiny_model(5), tmp_path / "sharded", max_shard_size=20_000)
    shards = sorted(n for n in sharded if n.startswith("model-"))
    hub.add("org/lost-shard", "main", "1" * 40, {n: b for n, b in sharded.items() if n != shards[-1]})
    with pytest.raises(HubError, match=rf"model.safetensors.index.json names {shards[-1]}, which is not in the repo"):
        _resolve_online(hub, "org/lost-shard", cache_dir=cache)
    hub.add("org/unserved", "main", "2" * 40, sharded)
    hub.unserved.add(shards[0])
    with pytest.raises(HubError, match=rf"the repo lists {shards[0]} but the hub does not serve it"):
        _resolve_online(hub, "org/unserved", cache_dir=cache)
    assert "pytorch_model.bin" not in hub.fetched() and "model.safetensors" not in hub.fetched()


def _resolve_online(hub: FakeHub, repo: str, **kw) -> str:
    """resolve() with huggingface_hub pointed at the local hub (as HF_ENDPOINT does at import)."""
    import huggingface_hub.constants as C

    saved = C.ENDPOINT, C.HUGGINGFACE_CO_URL_TEMPLATE
    C.ENDPOINT, C.HUGGINGFACE_CO_URL_TEMPLATE = hub.url, hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    try:
        return resolve(repo, **kw)
    finally:
        C.ENDPOINT, C.HUGGINGFACE_CO_URL_TEMPLATE = saved


# ----------------------------------------------------------------------------- the commands
def test_commands_take_hub_ids(hub, tmp_path):
    """bitnet convert and bitnet eval ppl from a hub id, in a fresh process with HF_ENDPOINT and
    HF_HUB_CACHE set as a user sets them; then offline with --local-files-only."""
    from bitnet.train.data import train_tokenizer

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    tok = train_tokenizer([text.read_text()], 300)
    torch.manual_seed(6)
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=tok.get_vocab_size()))).eval()
    model.tokenizer_files["tokenizer.json"] = tok.to_str().encode()
    hub.add("org/cli", "main", "f" * 40, folder_files(model, tmp_path / "src"))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)

    def run(*args, extra_env=None):
        r = subprocess.run([sys.executable, "-m", "bitnet", *args], env={**env, **(extra_env or {})},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = run("eval", "ppl", "org/cli", "--data", str(text), "--max-length", "32", "--json", "--device", "cpu")
    ppl = json.loads(out)["ppl"]
    run("convert", "org/cli", str(tmp_path / "out"), "--linear-class", "bitlinear")
    assert torch.allclose(logits(BitNetForCausalLM.from_pretrained(str(tmp_path / "out"))), logits(model), atol=1e-5)
    n = len(hub.requests)
    out = run("eval", "ppl", "org/cli", "--data", str(text), "--max-length", "32", "--json", "--device", "cpu",
              "--local-files-only")
    assert json.loads(out)["ppl"] == ppl and len(hub.requests) == n
    out = run("eval", "ppl", "org/cli", "--data", str(text), "--max-length", "32", "--json", "--device", "cpu",
              extra_env={"HF_HUB_OFFLINE": "1"})
    assert json.loads(out)["ppl"] == ppl and len(hub.requests) == n


def test_generate_command_error_for_an_unknown_hub_id(tmp_path, capsys):
    code = main(["generate", "org/never-cached", "--prompt", "x", "--local-files-only", "--cache-dir", str(tmp_path)])
    assert code == 2
    assert "offline (local_files_only or HF_HUB_OFFLINE=1), and org/never-cached is not in the hub cache" in capsys.readouterr().err


def test_train_init_from_a_hub_id(tmp_path):
    """bitnet train --init org/name: the tokenizer and the weights come from the cached snapshot."""
    from bitnet.corpus import stdlib_docstrings
    from bitnet.train.data import train_tokenizer
    from bitnet.train.trainer import TrainConfig, train

    text = stdlib_docstrings(60_000)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    tok = train_tokenizer([text], 400)
    model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=tok.get_vocab_size()))
    model.tokenizer_files["tokenizer.json"] = tok.to_str().encode()
    add_commit(tmp_path / "hub", "org/seed", C1, folder_files(model, tmp_path / "src"))
    cfg = TrainConfig(data=str(corpus), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "tokens"), init="org/seed",
                      hub_cache_dir=str(tmp_path / "hub"), local_files_only=True, max_steps=2, eval_every=2,
                      preset="tiny", seq_len=64, micro_batch=4, threads=1, progress=False, eval_windows=4, device="cpu")
    train(cfg)
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == tok.to_str().encode()
    assert BitNetForCausalLM.from_pretrained(str(tmp_path / "run")).config.vocab_size == tok.get_vocab_size()
