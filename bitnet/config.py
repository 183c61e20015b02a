"""BitNetConfig: one dataclass with transformers' field names, presets by name, config.json I/O.

`linear` picks the linear layers of the model, everything else being identical:
    "bitnet"  BitNet b1.58: ternary weights, int8 activations (the default)
    "bitnet1" the original BitNet: binary weights, int8 activations
    "bf16"    the vanilla twin: plain nn.Linear, the baseline of every comparison

`model_type` picks the block: "bitnet" (microsoft/bitnet-b1.58-2B-4T: relu² MLP, sub-norms before
o_proj and down_proj) or "llama" (the HF1BitLLM / onebitllms checkpoints: a Llama block, no
sub-norms, silu MLP).

In config.json the linear kind is not a key of its own: it is what `quantization_config` says
(none for the twin, quant_method "bitnet" for b1.58, "bitnet1" for binary), so that a folder
cannot contradict itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .atomic import atomic_write_bytes

LINEARS = ("bitnet", "bitnet1", "bf16")
MODEL_TYPES = ("bitnet", "llama")
LINEAR_CLASSES = ("autobitlinear", "bitlinear")
ACTIVATIONS = ("relu2", "silu", "gelu", "relu")


class ConfigError(ValueError):
    """A config.json (or a preset) that this package cannot build a model from."""


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """`name` is one of `patterns`, ends with ".pattern", or lies under "pattern." (how
    modules_to_not_convert and convert's `skip` name modules)."""
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)


# Upper bounds no real model reaches: a config.json beyond them is refused before any memory is
# spent on it (the largest open models: vocab ~256k, hidden ~16-25k, ~128 layers, ~1M positions).
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19, "num_hidden_layers": 1 << 12,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "max_position_embeddings": 1 << 24}


@dataclass
class BitNetConfig:
    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "relu2"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # None (default RoPE) or {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = None
    model_type: str = "bitnet"
    linear: str = "bitnet"
    # Quantization settings, as transformers' BitNetQuantConfig names them.
    linear_class: str = "autobitlinear"  # the weight_scale convention written by save_pretrained
    use_rms_norm: bool = False  # an RMSNorm inside every BitLinear, before quantization
    quant_rms_norm_eps: float = 1e-6
    modules_to_not_convert: list[str] | None = None  # module names kept in high precision
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # other config.json keys, kept

    def __post_init__(self):
        self.validate()

    # ----- derived -----
    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def sub_norms(self) -> bool:
        return self.model_type == "bitnet"

    @property
    def weight_bits(self) -> str | None:
        return {"bitnet": "ternary", "bitnet1": "binary", "bf16": None}[self.linear]

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.linear in LINEARS, f"linear must be one of {LINEARS}, got {self.linear!r}")
        need(self.model_type in MODEL_TYPES, f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        need(self.linear_class in LINEAR_CLASSES, f"linear_class must be one of {LINEAR_CLASSES}, got {self.linear_class!r}")
        need(self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} is not supported; expected one of {ACTIVATIONS}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
            need(value <= LIMITS[name], f"{name} {value} is beyond any real model (at most {LIMITS[name]:,})")
        need(self.head_dim is None or (isinstance(self.head_dim, int) and not isinstance(self.head_dim, bool)
                                       and 0 < self.head_dim <= 65536), f"head_dim must be a positive integer, got {self.head_dim!r}")
        for name in ("initializer_range", "rms_norm_eps", "rope_theta", "quant_rms_norm_eps"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
                 f"{name} must be a positive finite number, got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_rms_norm"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            need(all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in ids),
                 f"{name} must be an integer or null, got {value!r}")
        m = self.modules_to_not_convert
        need(m is None or (isinstance(m, list) and all(isinstance(x, str) for x in m)),
             f"modules_to_not_convert must be a list of module names, got {m!r}")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, dict),
             f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads ({self.num_attention_heads}) and head_dim is not set")
        need(self.dim_head % 2 == 0, f"head dimension {self.dim_head} must be even for RoPE")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(kind in ("default", "llama3"), f"rope scaling {kind!r} is not supported (default and llama3 are)")
            if kind == "llama3":
                for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    v = self.rope_scaling.get(key)
                    need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                         f"rope_scaling.{key} must be a positive finite number, got {v!r}")
                need(self.rope_scaling["high_freq_factor"] != self.rope_scaling["low_freq_factor"],
                     "rope_scaling: high_freq_factor must differ from low_freq_factor")

    # ----- presets -----
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BitNetConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> "BitNetConfig":
        return dataclasses.replace(self, **changes)

    # ----- config.json -----
    def quantization_config(self, mode: str = "offline") -> dict | None:
        """The `quantization_config` block of config.json; None for the bf16 twin."""
        if self.linear == "bf16":
            return None
        q = {
            "quant_method": "bitnet" if self.linear == "bitnet" else "bitnet1",
            "linear_class": self.linear_class,
            "quantization_mode": mode,
            "use_rms_norm": self.use_rms_norm,
            "rms_norm_eps": self.quant_rms_norm_eps,
            "modules_to_not_convert": self.modules_to_not_convert,
        }
        if self.linear == "bitnet1":
            # Not a transformers format: say exactly what the folder holds.
            q.update(weight_bits=1, activation_bits=8, linear_class="bitnet1",
                     packing="1 bit a weight, 8 rows a byte, strided blocks along dim 0; weight_scale = mean|W|")
        return q

    def to_dict(self, mode: str = "offline") -> dict:
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**{k: v for k, v in self.rope_scaling.items() if k != "type"}, "rope_theta": self.rope_theta}
        d = {
            **self.extra,
            "architectures": ["BitNetForCausalLM" if self.model_type == "bitnet" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.dim_head,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling:
            d["rope_scaling"] = dict(rope)
        q = self.quantization_config(mode)
        if q is not None:
            d["quantization_config"] = q
        else:
            d.pop("quantization_config", None)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> tuple["BitNetConfig", str | None]:
        """config.json dict -> (config, quantization_mode or None). Errors name `source`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        try:
            return cls._from_dict(d, source)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as e:  # a value of the wrong kind
            raise ConfigError(f"{source}: malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dict(cls, d: dict, source: str) -> tuple["BitNetConfig", str | None]:
        d = dict(d)
        model_type = d.pop("model_type", None)
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "linear", "model_type", "linear_class",
                                                              "use_rms_norm", "quant_rms_norm_eps", "modules_to_not_convert"}
        kwargs: dict[str, Any] = {"model_type": model_type}
        rope = d.pop("rope_parameters", None)
        legacy_scaling = d.pop("rope_scaling", None)
        if rope:
            kwargs["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
            kind = rope.get("rope_type", rope.get("type", "default"))
            kwargs["rope_scaling"] = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
            d.pop("rope_theta", None)
        elif legacy_scaling:
            kwargs["rope_scaling"] = dict(legacy_scaling)
        if d.get("hidden_act") is None and model_type == "llama":
            d["hidden_act"] = "silu"
        if model_type == "llama":
            # transformers' LlamaConfig defaults, which real llama config.json files rely on
            kwargs.update(tie_word_embeddings=False, rope_theta=kwargs.get("rope_theta", 10000.0))
        for name in known:
            if name in d and (name != "head_dim" or d[name] is not None):
                kwargs[name] = d.pop(name)
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        q = d.pop("quantization_config", None)
        mode = None
        if q is None:
            kwargs["linear"] = "bf16"
        else:
            method = q.get("quant_method")
            if method == "bitnet":
                kwargs["linear"] = "bitnet"
                lc = q.get("linear_class", "bitlinear")
                if lc not in LINEAR_CLASSES:
                    raise ConfigError(f"{source}: quantization_config.linear_class {lc!r} is unknown; expected one of {LINEAR_CLASSES}")
                kwargs["linear_class"] = lc
            elif method == "bitnet1":
                kwargs["linear"] = "bitnet1"
            else:
                raise ConfigError(f"{source}: quantization_config.quant_method {method!r} is unknown; expected 'bitnet' or 'bitnet1'")
            mode = q.get("quantization_mode", "offline")
            if mode not in ("offline", "online"):
                raise ConfigError(f"{source}: quantization_config.quantization_mode {mode!r} is unknown; expected 'offline' or 'online'")
            kwargs["use_rms_norm"] = bool(q.get("use_rms_norm", False))
            kwargs["quant_rms_norm_eps"] = float(q.get("rms_norm_eps") or 1e-6)
            kwargs["modules_to_not_convert"] = q.get("modules_to_not_convert")
        for drop in ("architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
                     "attention_dropout", "_name_or_path", "rope_theta"):
            d.pop(drop, None)
        try:
            config = cls(**kwargs, extra=d)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None
        return config, mode

    def save(self, path: str, mode: str = "offline") -> None:
        atomic_write_bytes(path, (json.dumps(self.to_dict(mode), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str) -> tuple["BitNetConfig", str | None]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=path)


# Shapes. 2b4t is microsoft/bitnet-b1.58-2B-4T; 700m/1.3b/3b are the paper's Table 5 shapes
# (LLaMA tokenizer, 32000 tokens); tiny/small/base are for CPU tests and experiments.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2),
    "base": dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2),
    "700m": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=24,
                 num_key_value_heads=24, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "1.3b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5460, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "3b": dict(vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "2b4t": dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30, num_attention_heads=20,
                 num_key_value_heads=5, max_position_embeddings=4096, tie_word_embeddings=True,
                 bos_token_id=128000, eos_token_id=128001),
}
