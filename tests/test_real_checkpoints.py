"""Slow tier: real downloaded checkpoints (microsoft/bitnet-b1.58-2B-4T, HF1BitLLM, Falcon-E, ...).

Nothing here downloads. Point BITNET_CHECKPOINT_DIRS at local folders (comma-separated) and run
`python -m pytest -m slow tests/test_real_checkpoints.py`; without it these tests are skipped.
Each folder is loaded here and by transformers, in float32, and their logits compared on a
prompt, following transformers' branch at int8 rounding ties (tests/reference.py).
"""

import os

import pytest
import torch
from reference import logits_on_transformers_branch, no_compile, rel_err

from bitnet import BitNetForCausalLM

DIRS = [d for d in os.environ.get("BITNET_CHECKPOINT_DIRS", "").split(",") if d]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DIRS, reason="set BITNET_CHECKPOINT_DIRS to local checkpoints")]


@pytest.mark.parametrize("path", DIRS)
def test_real_checkpoint_matches_transformers(path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(
        "The capital of France is Paris. The capital of Italy is").ids])
    ours = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32)
    with no_compile():
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out, ref, ties = logits_on_transformers_branch(ours, theirs, ids)
    assert rel_err(out, ref) < 1e-4, f"{ties} ties followed"
    assert out[0, -1].argmax() == ref[0, -1].argmax()
