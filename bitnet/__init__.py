"""bitnet: BitNet b1.58 language models — ternary weights, int8 activations, packed kernels.

    import bitnet
    config = bitnet.BitNetConfig.from_preset("tiny")                # linear="bitnet" | "bitnet1" | "bf16"
    model = bitnet.BitNetForCausalLM(config)                        # trains with fake quantization (STE)
    bitnet.freeze(model)                                            # packs every BitLinear, 2 bits a weight
    model.save_pretrained("out")                                    # transformers' bitnet format
    model = bitnet.BitNetForCausalLM.from_pretrained("out")

The package is used from source through its editable install (`pip install -e ".[dev]"`), which
also maps the repository's kernels/ to bitnet.kernels. Its modules import only downwards, floor
by floor (README: Layout; tests/test_layering.py holds them to it).
"""

from . import checkpoint as _checkpoint
from . import generation as _generation
from .bitlinear import BitLinear, Int4Linear, Int8Linear, RMSNorm, StreamedLinear
from .checkpoint import CheckpointError
from .config import PRESETS, BitNetConfig, ConfigError
from .convert import convert, count_parameters, freeze, unfreeze, weight_bytes
from .hf import patch
from .model import BitNetForCausalLM, CausalLMOutput

__version__ = "0.1.0"
__all__ = [
    "BitLinear",
    "BitNetConfig",
    "BitNetForCausalLM",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "Int4Linear",
    "Int8Linear",
    "StreamedLinear",
    "PRESETS",
    "RMSNorm",
    "convert",
    "count_parameters",
    "freeze",
    "patch",
    "unfreeze",
    "weight_bytes",
]


# The model's convenience methods are defined where their work is, on the floors above the model,
# and attached to it here, in the one module that runs before any bitnet.* module: model.py imports
# none of those floors, and every BitNetForCausalLM has the methods.
def _from_pretrained(cls, path: str, dtype=None, device=None, *, revision=None, cache_dir=None, local_files_only=False,
                     token=None) -> BitNetForCausalLM:
    return _checkpoint.load_pretrained(path, dtype=dtype, device=device, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token)


_from_pretrained.__doc__ = _checkpoint.load_pretrained.__doc__
_from_pretrained.__name__ = "from_pretrained"
_from_pretrained.__qualname__ = "BitNetForCausalLM.from_pretrained"
BitNetForCausalLM.from_pretrained = classmethod(_from_pretrained)
BitNetForCausalLM.save_pretrained = _checkpoint.save_pretrained
BitNetForCausalLM.generate = _generation.generate
BitNetForCausalLM.freeze = freeze
BitNetForCausalLM.num_parameters = count_parameters
