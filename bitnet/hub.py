"""Hub ids as well as folders: `resolve("microsoft/bitnet-b1.58-2B-4T")` -> a local folder.

A name that is an existing folder is returned as it is. Anything else is read as a Hugging Face
hub id (`org/name`) and resolved through huggingface_hub's cache, in its own layout
(`<cache>/models--org--name/{blobs, refs/<revision>, snapshots/<commit>/<file>}`), so that the
files are shared with transformers and every other tool of that ecosystem:

- only what loading needs is fetched: config.json, the safetensors (model.safetensors, or the index
  and exactly the shards it names), the tokenizer files and generation_config.json; never pickled
  weights (pytorch_model.bin, *.pt, *.pth, *.ckpt), which are neither fetched nor loaded;
- `revision` (branch, tag or commit hash; default main), `cache_dir` (default: huggingface_hub's,
  i.e. $HF_HUB_CACHE or $HF_HOME/hub), `local_files_only` or HF_HUB_OFFLINE=1 (the cache only, no
  network), `token` (default: huggingface_hub's usual places, $HF_TOKEN or `hf auth login`);
- huggingface_hub's progress bars (HF_HUB_DISABLE_PROGRESS_BARS=1 turns them off);
- errors say what is wrong: no such repo (or private), no such revision, gated, offline and not in
  the cache, no safetensors in the repo.

A ground-floor module: it imports nothing of the package (huggingface_hub is imported on first use).
"""

from __future__ import annotations

import json
import os
import re

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files that travel with a model: bitnet.checkpoint keeps CARRIED with the model it loads and
# save_pretrained writes them back; a download also fetches what transformers' slow tokenizers read
# when a repo has no tokenizer.json.
CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")
TOKENIZER_FILES = CARRIED + ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
PICKLED = re.compile(r".*\.(bin|pt|pth|ckpt|pkl)$")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def chat_template(files: dict[str, bytes]) -> str | list | None:
    """The chat template among a model's files (its tokenizer_files): chat_template.jinja, where
    transformers writes it when it saves a tokenizer, else tokenizer_config.json's "chat_template" (a
    string, or a list of named templates); None where neither holds one."""
    if files.get("chat_template.jinja") is not None:
        return files["chat_template.jinja"].decode("utf-8")
    raw = files.get("tokenizer_config.json")
    template = json.loads(raw).get("chat_template") if raw else None
    return template if isinstance(template, (str, list)) else None


class HubError(FileNotFoundError):
    """A hub id that cannot be resolved to a folder: no such repo or revision, gated, offline and
    not cached, or no safetensors weights."""


def is_offline(local_files_only: bool = False) -> bool:
    """local_files_only, or HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now or when huggingface_hub
    was imported."""
    if local_files_only:
        return True
    if any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def looks_like_repo_id(name: str) -> bool:
    """`org/name` or `name` in the hub's alphabet; paths such as ./x, /abs, a/b/c or ~/x are not."""
    return bool(re.fullmatch(r"(?:[A-Za-z0-9][\w.-]*/)?[\w][\w.-]*", name)) and ".." not in name and not name.endswith(".")


def resolve(
    name: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> str:
    """The local folder of `name`: the folder itself, or the hub cache's snapshot of the hub id
    `name` at `revision`, fetching what is missing (unless offline). See the module's docstring."""
    name = os.fspath(name)
    if os.path.isdir(name):
        return name
    if not looks_like_repo_id(name):
        raise FileNotFoundError(f"checkpoint folder {name} does not exist")
    if os.path.exists(name):
        raise FileNotFoundError(f"{name} is a file, not a checkpoint folder or a hub id")
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    where = f"{name}" + (f" at revision {revision!r}" if revision else "")
    if is_offline(local_files_only):
        return _from_cache(name, revision, cache_dir, where)
    return _download(name, revision, cache_dir, token, where)


# ----------------------------------------------------------------------------- online
def _errors():
    """huggingface_hub's error classes under their names of 0.x and 1.x."""
    import huggingface_hub.errors as E

    def get(*names):
        return tuple(getattr(E, n) for n in names if hasattr(E, n))

    return dict(repo=get("RepositoryNotFoundError"), revision=get("RevisionNotFoundError"), gated=get("GatedRepoError"),
                entry=get("RemoteEntryNotFoundError", "EntryNotFoundError"), local=get("LocalEntryNotFoundError"),
                offline=get("OfflineModeIsEnabled"), http=get("HfHubHTTPError"))


def _cache_hint(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return cache_dir or constants.HF_HUB_CACHE


def _download(repo_id: str, revision: str | None, cache_dir: str | None, token, where: str) -> str:
    from huggingface_hub import HfApi, hf_hub_download

    E = _errors()
    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
    except E["gated"] as e:  # before repo: GatedRepoError is a RepositoryNotFoundError
        raise HubError(f"{repo_id} is a gated repo: accept its terms on its hub page, then log in "
                       f"(`hf auth login`) or set HF_TOKEN ({_first_line(e)})") from None
    except E["repo"] as e:
        raise HubError(f"no folder {repo_id} here, and no model repo {repo_id} on the hub (or it is private and no "
                       f"valid token was sent: log in with `hf auth login` or set HF_TOKEN) ({_first_line(e)})") from None
    except E["revision"]:
        raise HubError(f"the repo {repo_id} has no revision {revision or 'main'!r} (a branch, tag or commit hash)") from None
    except Exception as e:  # noqa: BLE001 (httpx / requests errors by version: no network, the hub down, ...)
        # What is cached still loads, as transformers does it.
        return _from_cache(repo_id, revision, cache_dir, where, f"cannot reach the hub ({type(e).__name__}: {_first_line(e)})")

    files = [s.rfilename for s in (info.siblings or [])]
    if CONFIG not in files:
        raise HubError(f"{where}: the repo has no {CONFIG}, so it is not a transformers model repo (files: {_listing(files)})")
    if INDEX in files:
        weights = [INDEX]
    elif SINGLE in files:
        weights = [SINGLE]
    else:
        pickled = [f for f in files if PICKLED.match(f)]
        why = (f"; it has {', '.join(pickled[:3])}, but pickled weights are never fetched or loaded: "
               "convert them to safetensors") if pickled else ""
        raise HubError(f"{where}: no safetensors weights ({SINGLE} or {INDEX}) in the repo{why}")

    def fetch(fname: str) -> str:
        try:  # the commit from model_info: every file of one load comes from one commit
            path = hf_hub_download(repo_id, fname, revision=info.sha, cache_dir=cache_dir, token=token)
        except E["entry"]:
            raise HubError(f"{where}: the repo lists {fname} but the hub does not serve it") from None
        return path

    config_path = fetch(CONFIG)
    folder = os.path.dirname(config_path)
    _write_ref(folder, revision or "main", info.sha)
    for fname in weights:
        fetch(fname)
    if weights == [INDEX]:
        for shard in _shards(os.path.join(folder, INDEX), where):
            if shard not in files:
                raise HubError(f"{where}: {INDEX} names {shard}, which is not in the repo")
            fetch(shard)
    for fname in TOKENIZER_FILES:
        if fname in files:
            fetch(fname)
    return folder


def _write_ref(snapshot: str, revision: str, commit: str) -> None:
    """refs/<revision> -> commit, as huggingface_hub writes it, so that an offline load of the same
    revision finds this snapshot (the downloads above were asked by commit, which writes no ref)."""
    if revision == commit:
        return
    ref = os.path.join(os.path.dirname(os.path.dirname(snapshot)), "refs", revision)
    try:
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        current = None
        if os.path.isfile(ref):
            with open(ref) as f:
                current = f.read()
        if current != commit:
            tmp = f"{ref}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(commit)
            os.replace(tmp, ref)
    except OSError:
        pass  # a read-only cache still loads by commit


# ----------------------------------------------------------------------------- offline
OFFLINE = "offline (local_files_only or HF_HUB_OFFLINE=1)"


def _from_cache(repo_id: str, revision: str | None, cache_dir: str | None, where: str, why: str = OFFLINE) -> str:
    """The cached snapshot, complete for loading, or HubError saying `why` the network was not asked."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = cache_dir or constants.HF_HUB_CACHE
    storage = os.path.join(root, repo_folder_name(repo_id=repo_id, repo_type="model"))
    offline = f"{why}, and {where} is not in the hub cache at {root}"
    if not os.path.isdir(storage):
        raise HubError(offline)
    rev = revision or "main"
    commit = rev if _COMMIT.fullmatch(rev) else None
    if commit is None:
        ref = os.path.join(storage, "refs", rev)
        if not os.path.isfile(ref):
            known = sorted(os.listdir(os.path.join(storage, "refs"))) if os.path.isdir(os.path.join(storage, "refs")) else []
            raise HubError(f"{why}, and the hub cache at {root} knows no revision {rev!r} of {repo_id} "
                           f"(cached revisions: {', '.join(known) or 'none'})")
        with open(ref) as f:
            commit = f.read().strip()
    folder = os.path.join(storage, "snapshots", commit)
    if not os.path.isdir(folder):
        raise HubError(f"{why}, and revision {rev!r} of {repo_id} is commit {commit}, whose snapshot is not in the "
                       f"hub cache at {root}")
    missing = []
    if not os.path.isfile(os.path.join(folder, CONFIG)):
        missing.append(CONFIG)
    if os.path.isfile(os.path.join(folder, INDEX)):
        missing += [s for s in _shards(os.path.join(folder, INDEX), where) if not os.path.isfile(os.path.join(folder, s))]
    elif not os.path.isfile(os.path.join(folder, SINGLE)):
        no_exist = os.path.join(storage, ".no_exist", commit)
        known_absent = all(os.path.exists(os.path.join(no_exist, f)) for f in (SINGLE, INDEX))
        missing.append(f"{SINGLE} (the repo has none)" if known_absent else f"{SINGLE} or {INDEX}")
    if missing:
        raise HubError(f"{why}, and the cached snapshot of {where} ({folder}) lacks {', '.join(missing)}; "
                       "load it once online to fetch them")
    return folder


def _shards(index: str, where: str) -> list[str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise HubError(f"{where}: {INDEX} is not a valid safetensors index ({e!r})") from None
    bad = [s for s in shards if not isinstance(s, str) or "/" in s or "\\" in s or s.startswith(".") or PICKLED.match(s)]
    if bad:
        raise HubError(f"{where}: {INDEX} names files that are not safetensors shards of the repo's top folder: {bad[:3]}")
    return shards


def _first_line(e: BaseException) -> str:
    """huggingface_hub's messages run over lines ("404 Client Error." / "Repository Not Found for url: ...")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(e).__name__


def _listing(files: list[str]) -> str:
    return ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "") if files else "none"
