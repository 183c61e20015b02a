"""from_pretrained / save_pretrained over transformers' `bitnet` folder format. Safetensors only.

A folder holds config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards and
model.safetensors.index.json) and optionally tokenizer files, which travel with the model.

What the weights of a quantized layer mean depends on config.json's quantization_config:
- quantization_mode "offline": `weight` uint8 (ceil(N / 4), K), 2-bit codes in strided blocks
  (bitnet.packing), and `weight_scale` of shape (1,) whose meaning depends on linear_class:
    "autobitlinear" (microsoft/bitnet-b1.58-2B-4T): stores s = mean|W|, output is multiplied by it
    "bitlinear"     (HF1BitLLM, onebitllms):         stores 1 / s,       output is divided by it
  Both load to the same function; save_pretrained writes "autobitlinear" unless asked otherwise.
- quantization_mode "online": `weight` holds the latent float weights, quantized on the fly.
- no quantization_config: the bf16 twin, plain linear weights.
- quant_method "bitnet1" (this package only): binary weights, 1 bit a weight (8 rows a byte),
  weight_scale = mean|W|.

Loading never unpickles: a folder with only pytorch_model.bin is refused. Every tensor is checked
(name, shape, dtype) against the model that config.json describes before any is used; a mismatch
raises CheckpointError naming the file and the tensor. Saving writes every file under a temporary
name, fsyncs it, then renames it into place (bitnet.atomic; data files first, config.json last).
"""

from __future__ import annotations

import json
import os
import re
import warnings

import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_save_safetensors, atomic_write, atomic_write_bytes  # noqa: F401 (their old home; re-exported)
from .bitlinear import BitLinear
from .config import BitNetConfig, ConfigError
from .convert import bitlinears, freeze, quantization_mode
from .hub import CARRIED, INDEX, SINGLE, resolve
from .model import BitNetForCausalLM
from .packing import pack, repack, unpack

TOKENIZER_FILES = CARRIED  # (read into model.tokenizer_files, written back by save_pretrained)
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint folder whose files do not describe the model its config.json asks for."""


# ----------------------------------------------------------------------------- save
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot read shard size {size!r}; use bytes or e.g. '5GB', '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def checkpoint_state_dict(
    model: BitNetForCausalLM, linear_class: str | None = None, unpacked: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint format: packed 2-bit weights with the weight_scale convention
    of `linear_class`, or latent / plain weights; tied lm_head left out. unpacked: frozen layers
    write their quantized values W_q as float (N, K) instead of packed bytes. state_dict: the
    model's full state dict when the model itself holds only shards of it (FSDP)."""
    config = model.config
    linear_class = linear_class or config.linear_class
    sd = dict(state_dict) if state_dict is not None else model.state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    float_dtype = sd["model.embed_tokens.weight"].dtype
    for name, m in bitlinears(model):
        if not m.frozen:
            continue
        if unpacked:
            sd[f"{name}.weight"] = unpack(m.weight, m.out_features, m.packing, dtype=float_dtype)
        elif m.packing == "1.6bit":
            sd[f"{name}.weight"] = repack(m.weight, m.out_features, "1.6bit", "2bit")
        scale = m.weight_scale.float().reshape(1)
        if m.weight_bits == "ternary" and linear_class == "bitlinear":
            scale = 1.0 / scale
        sd[f"{name}.weight_scale"] = scale
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_pretrained(
    model: BitNetForCausalLM, path: str, linear_class: str | None = None, max_shard_size: int | str = "5GB",
    unpacked: bool = False, state_dict: dict[str, torch.Tensor] | None = None, step: int | None = None,
) -> None:
    """Write `model` to the folder `path` in transformers' format: config.json, model.safetensors
    (or shards of at most max_shard_size), the tokenizer files the model carries; see bitnet.checkpoint.

    unpacked=True writes frozen layers as float W_q (N, K) with `weight_scale`, under an offline
    "autobitlinear" config: transformers' AutoBitLinear reads such weights as they are and computes
    (act_quant(x) @ W_q^T) * weight_scale, the same function. This is the transformers export of
    binary (bitnet1) models, whose weights are a ternary matrix without zeros.
    state_dict: the full state dict, when the model holds only shards of it (FSDP).
    step: the training step the weights are from, recorded in every safetensors file's metadata
    ("bitnet_step") and in config.json ("bitnet_step"); default: the step config.json carried.
    """
    config = model.config
    mode = quantization_mode(model) or "offline"
    if unpacked:
        if mode != "offline":
            raise ValueError("unpacked=True saves frozen (quantized) layers; freeze the model first")
        linear_class = "autobitlinear"
    if linear_class is not None and linear_class not in ("autobitlinear", "bitlinear"):
        raise ValueError(f"linear_class must be 'autobitlinear' or 'bitlinear', got {linear_class!r}")
    if mode == "online":
        linear_class = "autobitlinear"  # transformers trains latent weights only with AutoBitLinear
    linear_class = linear_class or config.linear_class
    tensors = checkpoint_state_dict(model, linear_class, unpacked, state_dict)
    if step is None:
        step = _as_step(config.extra.get(STEP_KEY))
    meta = {STEP_KEY: str(step)} if step is not None else None

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes

    os.makedirs(path, exist_ok=True)
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_save_safetensors(shard, os.path.join(path, name), meta)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {t: f for f, shard in zip(names, shards) for t in shard}}
        atomic_write_bytes(os.path.join(path, INDEX), (json.dumps(index, indent=2) + "\n").encode())
    for fname, data in model.tokenizer_files.items():
        atomic_write_bytes(os.path.join(path, fname), data)
    float_dtype = tensors["model.embed_tokens.weight"].dtype
    saved = config.replace(linear_class=linear_class if config.linear == "bitnet" else config.linear_class)
    if unpacked:  # a ternary-format folder (binary weights are ternary weights without zeros)
        saved = saved.replace(linear="bitnet", linear_class="autobitlinear")
    cfg = saved.to_dict(mode)
    cfg["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    cfg.pop(STEP_KEY, None)
    if step is not None:
        cfg[STEP_KEY] = step
    atomic_write_bytes(os.path.join(path, "config.json"), (json.dumps(cfg, indent=2) + "\n").encode())
    # Files of an earlier save that the new one does not use (a single file now sharded, or back).
    for f in os.listdir(path):
        stale = (_SHARD.match(f) and f not in names) or (f == SINGLE and len(shards) > 1) or (f == INDEX and len(shards) == 1)
        if stale:
            os.remove(os.path.join(path, f))


# ----------------------------------------------------------------------------- the step a folder holds
STEP_KEY = "bitnet_step"
TRAINER_STATE = "trainer_state.safetensors"  # bitnet.train's resume state (its own metadata holds its step)


def _as_step(v) -> int | None:
    try:
        return int(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError):
        return None


def folder_steps(path: str) -> dict:
    """The step each part of a folder records: {"config": int|None, "weights": {file: int|None},
    "trainer_state": int|None}; parts that are missing or unreadable count as None."""
    out: dict = {"config": None, "weights": {}, "trainer_state": None}
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
        out["config"] = _as_step(d.get(STEP_KEY)) if isinstance(d, dict) else None
    except (OSError, ValueError):
        pass
    try:
        files = list(_weight_files(path))
    except CheckpointError:
        files = []
    for fname in files:
        try:
            with safe_open(os.path.join(path, fname), framework="pt") as f:
                out["weights"][fname] = _as_step((f.metadata() or {}).get(STEP_KEY))
        except (OSError, SafetensorError):
            out["weights"][fname] = None
    state = os.path.join(path, TRAINER_STATE)
    if os.path.isfile(state):
        try:
            with safe_open(state, framework="pt") as f:
                out["trainer_state"] = _as_step(json.loads((f.metadata() or {})["bitnet_trainer"])["step"])
        except (OSError, SafetensorError, ValueError, KeyError, TypeError):
            pass
    return out


def step_mismatch(path: str, steps: dict | None = None) -> str | None:
    """A sentence when the folder's model files and trainer state disagree on the step (a save that
    stopped part way), else None."""
    steps = steps or folder_steps(path)
    model = {v for v in [steps["config"], *steps["weights"].values()] if v is not None}
    parts = [f"config.json step {steps['config']}"] + [f"{f} step {v}" for f, v in steps["weights"].items()]
    if steps["trainer_state"] is not None:
        parts.append(f"{TRAINER_STATE} step {steps['trainer_state']}")
        model_steps = [steps["config"], *steps["weights"].values()]
        if any(v != steps["trainer_state"] for v in model_steps):
            return (f"{path}: the model and the trainer state disagree on the step ({', '.join(parts)}); a save "
                    f"stopped part way; `bitnet train --resume` continues from step {steps['trainer_state']}")
    if len(model) > 1:
        return f"{path}: the model files disagree on the step ({', '.join(parts)}); a save stopped part way"
    return None


# ----------------------------------------------------------------------------- load
def _weight_files(path: str) -> dict[str, list[str]]:
    """{file: [tensor names]} from the index, or {model.safetensors: []} (names read later)."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> file")
        files: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            if not isinstance(fname, str) or not fname.endswith(".safetensors") or os.path.basename(fname) != fname \
                    or fname.startswith("."):
                raise CheckpointError(f"{index}: tensor {tensor!r} maps to {fname!r}, not a .safetensors file of the folder")
            files.setdefault(fname, []).append(tensor)
        for fname in files:
            if not os.path.isfile(os.path.join(path, fname)):
                raise CheckpointError(f"{index} names {fname}, which is not in {path}")
        return files
    if os.path.isfile(os.path.join(path, SINGLE)):
        return {SINGLE: []}
    pickled = [f for f in ("pytorch_model.bin", "model.pt", "model.pth") if os.path.isfile(os.path.join(path, f))]
    hint = f" ({pickled[0]} is there, but pickled checkpoints are never loaded: convert it to safetensors)" if pickled else ""
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {path}{hint}")


def _expected(model: BitNetForCausalLM) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def load_pretrained(path: str, dtype: torch.dtype | None = None, device=None, *, revision: str | None = None,
                    cache_dir: str | None = None, local_files_only: bool = False,
                    token: str | bool | None = None) -> BitNetForCausalLM:
    """Build the model that `path`/config.json describes and fill it from the safetensors files.

    `path` is a checkpoint folder or a hub id such as "microsoft/bitnet-b1.58-2B-4T", fetched into
    (or, offline, read from) huggingface_hub's cache: revision, cache_dir, local_files_only (or
    HF_HUB_OFFLINE=1) and token as in transformers' from_pretrained (bitnet.hub). Only config.json,
    the safetensors and the tokenizer files are fetched; pickled weights never are.
    """
    path = resolve(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    config, mode = BitNetConfig.load(os.path.join(path, "config.json"))
    if STEP_KEY in config.extra or os.path.isfile(os.path.join(path, TRAINER_STATE)):
        mismatch = step_mismatch(path)
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    if mode == "offline":
        freeze(model)
    expected = _expected(model)
    scales = {f"{n}.weight_scale" for n, m in bitlinears(model) if m.frozen}
    packed = {f"{n}.weight": m for n, m in bitlinears(model) if m.frozen}

    loaded: dict[str, torch.Tensor] = {}
    lm_head = None
    for fname, _ in _weight_files(path).items():
        fpath = os.path.join(path, fname)
        try:
            with safe_open(fpath, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        lm_head = f.get_tensor(name)
                        continue
                    if name not in expected:
                        raise CheckpointError(f"{fpath}: unexpected tensor {name!r} for this config.json "
                                              f"({_describe(config, mode)})")
                    if name in loaded:
                        raise CheckpointError(f"{fpath}: tensor {name!r} appears in more than one file")
                    sl = f.get_slice(name)
                    shape, file_dtype = tuple(sl.get_shape()), sl.get_dtype()
                    unpacked = (packed[name].out_features, packed[name].in_features) if name in packed else None
                    if shape == unpacked and file_dtype in ("F32", "F16", "BF16", "F64"):
                        loaded[name] = _pack_unpacked(fpath, name, f.get_tensor(name), packed[name])
                        continue
                    _check(fpath, name, shape, file_dtype, expected[name], name in scales, name in packed, mode)
                    t = f.get_tensor(name)
                    loaded[name] = t.view(torch.uint8) if name in packed else t
        except SafetensorError as e:
            raise CheckpointError(f"{fpath}: not a valid safetensors file, truncated or corrupt ({e})") from None
    missing = [n for n in expected if n not in loaded]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{more} for this config.json ({_describe(config, mode)})")

    for name, m in packed.items():
        w = loaded[name]
        if m.packing == "2bit" and bool(((w & (w >> 1)) & 0x55).any()):
            raise CheckpointError(f"{path}: tensor {name!r} holds the 2-bit code 3, which is not a ternary value")
    for name in scales:
        s = loaded[name].float().reshape(1)
        if config.linear == "bitnet" and config.linear_class == "bitlinear":
            s = 1.0 / s  # stored as 1/mean|W|
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            raise CheckpointError(f"{path}: tensor {name!r} is {s.item()}, not a positive finite scale")
        loaded[name] = s
    for name, t in loaded.items():
        if t.is_floating_point() and name not in scales and dtype is not None:
            t = t.to(dtype)
        loaded[name] = t.to(device)
    if lm_head is not None and not torch.equal(lm_head.to(loaded["model.embed_tokens.weight"].dtype).cpu(),
                                               loaded["model.embed_tokens.weight"].cpu()):
        raise CheckpointError(f"{path}: config.json ties lm_head to embed_tokens, but lm_head.weight differs from it")

    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.reset(device)
    for fname in TOKENIZER_FILES:
        fpath = os.path.join(path, fname)
        if os.path.isfile(fpath):
            with open(fpath, "rb") as f:
                model.tokenizer_files[fname] = f.read()
    return model.eval()


def _pack_unpacked(fpath: str, name: str, w: torch.Tensor, m: BitLinear) -> torch.Tensor:
    """Offline weights stored unpacked, as W_q values (N, K) (transformers' AutoBitLinear accepts
    them): check the alphabet, pack once."""
    allowed = "{-1, 0, 1}" if m.weight_bits == "ternary" else "{-1, 1}"
    ok = (w == -1) | (w == 1) | ((w == 0) if m.weight_bits == "ternary" else torch.zeros_like(w, dtype=torch.bool))
    if not bool(ok.all()):
        raise CheckpointError(f"{fpath}: tensor {name!r} is stored unpacked but holds values outside {allowed}")
    return pack(w.to(torch.int8), m.packing)


def _describe(config: BitNetConfig, mode: str | None) -> str:
    if config.linear == "bf16":
        return "bf16 twin, no quantization_config"
    return f"linear {config.linear}, quantization_mode {mode}, linear_class {config.linear_class}"


def _check(fpath, name, shape, file_dtype, want: torch.Tensor, is_scale: bool, is_packed: bool, mode) -> None:
    floats = ("F32", "F16", "BF16", "F64")
    if is_scale:
        if shape not in ((1,), ()):
            raise CheckpointError(f"{fpath}: tensor {name!r} has shape {shape}, expected (1,) (one scale per matrix)")
        if file_dtype not in floats:
            raise CheckpointError(f"{fpath}: tensor {name!r} has dtype {file_dtype}, expected a float scale")
        return
    if is_packed and file_dtype not in ("U8", "I8"):
        raise CheckpointError(f"{fpath}: tensor {name!r} has dtype {file_dtype}, expected uint8 packed weights "
                              f"(quantization_mode is {mode!r})")
    if not is_packed and file_dtype not in floats:
        hint = " (packed weights, but config.json has no offline quantization_config)" if file_dtype == "U8" else ""
        raise CheckpointError(f"{fpath}: tensor {name!r} has dtype {file_dtype}, expected a float tensor{hint}")
    if shape != tuple(want.shape):
        kind = f"packed uint8 {tuple(want.shape)} (quantization_mode is {mode!r})" if is_packed else f"{tuple(want.shape)} from config.json"
        raise CheckpointError(f"{fpath}: tensor {name!r} has shape {shape}, expected {kind}")
