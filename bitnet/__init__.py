"""bitnet: BitNet b1.58 language models — ternary weights, int8 activations, packed kernels.

    import bitnet
    config = bitnet.BitNetConfig.from_preset("tiny")                # linear="bitnet" | "bitnet1" | "bf16"
    model = bitnet.BitNetForCausalLM(config)                        # trains with fake quantization (STE)
    bitnet.freeze(model)                                            # packs every BitLinear, 2 bits a weight
    model.save_pretrained("out")                                    # transformers' bitnet format
    model = bitnet.BitNetForCausalLM.from_pretrained("out")
"""

import os as _os

# From a source checkout (PYTHONPATH=.), kernels/ sits beside bitnet/ rather than inside it, as an
# install places it; let `bitnet.kernels` resolve to it there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)

from .bitlinear import BitLinear, RMSNorm  # noqa: E402
from .checkpoint import CheckpointError  # noqa: E402
from .config import PRESETS, BitNetConfig, ConfigError  # noqa: E402
from .convert import convert, count_parameters, freeze, unfreeze, weight_bytes  # noqa: E402
from .model import BitNetForCausalLM, CausalLMOutput  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BitLinear",
    "BitNetConfig",
    "BitNetForCausalLM",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "PRESETS",
    "RMSNorm",
    "convert",
    "count_parameters",
    "freeze",
    "unfreeze",
    "weight_bytes",
]
