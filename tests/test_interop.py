"""Parity with transformers, both ways, on checkpoints built with transformers' own code."""

import json
import os

import pytest
import torch
from reference import hf_config, hf_logits, hf_model, logits_on_transformers_branch, no_compile, rel_err, write_checkpoint

from bitnet import BitNetConfig, BitNetForCausalLM, freeze

TOL = 1e-4
IDS = torch.tensor([[1, 5, 77, 3, 9, 120, 45, 45, 0, 17, 2, 64], [1, 99, 12, 8, 8, 33, 101, 7, 6, 5, 4, 3]])


def our_logits(path, **kw):
    model = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    with torch.no_grad():
        return model(IDS).logits


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    with no_compile():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_same_function(ours, path):
    """Our model vs transformers' load of `path`: logits within TOL, on one rounding branch."""
    out, ref, ties = logits_on_transformers_branch(ours, transformers_model(path), IDS)
    assert rel_err(out, ref) < TOL, f"logits differ by {rel_err(out, ref):.2e} ({ties} rounding ties followed)"


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
@pytest.mark.parametrize("model_type,tied", [("bitnet", True), ("bitnet", False), ("llama", False)])
def test_offline_checkpoint_from_transformers(tmp_path, linear_class, model_type, tied):
    """Packed checkpoints in both weight_scale conventions load here with transformers' logits."""
    write_checkpoint(hf_model(hf_config(model_type, tied)), tmp_path, "offline", linear_class)
    assert_same_function(BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), tmp_path)


def test_both_conventions_give_the_same_function(tmp_path):
    model = hf_model(hf_config())
    write_checkpoint(model, tmp_path / "auto", "offline", "autobitlinear")
    write_checkpoint(model, tmp_path / "bit", "offline", "bitlinear")
    a = BitNetForCausalLM.from_pretrained(tmp_path / "auto").state_dict()
    b = BitNetForCausalLM.from_pretrained(tmp_path / "bit").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("weight_scale"):  # s, and 1 / (1 / s) rounded twice in float32
            torch.testing.assert_close(a[name], b[name], rtol=2.5e-7, atol=0)
        else:
            assert torch.equal(a[name], b[name]), name


def test_bf16_scale_as_in_the_2b4t_checkpoint(tmp_path):
    write_checkpoint(hf_model(hf_config()), tmp_path, "offline", "autobitlinear", scale_dtype=torch.bfloat16)
    assert_same_function(BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), tmp_path)


@pytest.mark.parametrize("model_type", ["bitnet", "llama"])
def test_online_checkpoint_from_transformers(tmp_path, model_type):
    """Latent-weight (online) checkpoints quantize on the fly, here as in transformers."""
    write_checkpoint(hf_model(hf_config(model_type, tied=model_type == "bitnet")), tmp_path, "online")
    model = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not any(m.frozen for m in model.modules() if hasattr(m, "frozen"))
    assert_same_function(model, tmp_path)


@pytest.mark.parametrize("model_type", ["bitnet", "llama"])
def test_twin_from_transformers(tmp_path, model_type):
    """The bf16 twin: a transformers model without quantization_config."""
    write_checkpoint(hf_model(hf_config(model_type)), tmp_path, None)
    model = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.linear == "bf16"
    with torch.no_grad():
        ours = model(IDS).logits
    assert rel_err(ours, hf_logits(tmp_path, IDS)) < TOL


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
@pytest.mark.parametrize("tied", [True, False])
def test_saved_here_loads_in_transformers(tmp_path, linear_class, tied):
    torch.manual_seed(1)
    model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=128, tie_word_embeddings=tied)).eval()
    freeze(model)
    with torch.no_grad():
        ours = model(IDS).logits
    model.save_pretrained(tmp_path, linear_class=linear_class)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"]["linear_class"] == linear_class
    assert cfg["quantization_config"]["quantization_mode"] == "offline"
    assert_same_function(model, tmp_path)
    # and back here, the same function
    assert rel_err(our_logits(tmp_path), ours) < 1e-6


@pytest.mark.parametrize("linear", ["bitnet", "bf16"])
def test_saved_training_state_loads_in_transformers(tmp_path, linear):
    """Latent weights (online mode) and the twin, saved here, read by transformers."""
    torch.manual_seed(2)
    model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=128, linear=linear)).eval()
    with torch.no_grad():
        ours = model(IDS).logits
    model.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    assert ("quantization_config" in cfg) == (linear == "bitnet")
    if linear == "bf16":  # no quantizer: plain end-to-end comparison
        assert rel_err(hf_logits(tmp_path, IDS), ours) < TOL
    else:
        assert_same_function(model, tmp_path)


def test_sharded_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=128)).eval())
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    shards = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))
    assert len(shards) > 2 and "model.safetensors" not in os.listdir(tmp_path)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    with torch.no_grad():
        ref = model(IDS).logits
    assert rel_err(our_logits(tmp_path), ref) < 1e-6
    assert_same_function(model, tmp_path)
    # saving again unsharded removes the stale shards and index
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_tokenizer_travels_and_loads_with_autotokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world, a tiny corpus for a tiny tokenizer"] * 20,
                            trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"]))
    model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", vocab_size=128))
    model.tokenizer_files["tokenizer.json"] = tok.to_str().encode()
    model.save_pretrained(tmp_path / "a")
    loaded = BitNetForCausalLM.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # travels on
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert hf_tok("hello world")["input_ids"] == tok.encode("hello world").ids


def test_llama3_scaled_rope_in_either_config_form(tmp_path):
    """A Llama 3.1-style model (llama3 RoPE scaling, theta 500000) from transformers: config.json as
    transformers 5 writes it ("rope_parameters") and as 4.x wrote it ("rope_scaling" beside
    "rope_theta", no hidden_act: silu by default) load to transformers' function; saved here, it
    reads back to the same function, in transformers too. Positions run past the original context
    (32 of 128 here), where the scaling changes the low frequencies."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf = hf_model(hf_config("llama", tied=False, rope_parameters={**scaling, "rope_theta": 500000.0}))
    write_checkpoint(hf, tmp_path / "v5", None)
    cfg = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    ids = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        plain = BitNetForCausalLM.from_pretrained(tmp_path / "v5", dtype=torch.float32)
        assert plain.config.rope_scaling["rope_type"] == "llama3" and plain.config.rope_theta == 500000.0
        assert rel_err(plain(ids).logits, ref) < TOL
        legacy = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "hidden_act")}
        legacy.update(rope_theta=500000.0, rope_scaling=dict(scaling))
        os.makedirs(tmp_path / "v4")
        (tmp_path / "v4" / "config.json").write_text(json.dumps(legacy))
        os.link(tmp_path / "v5" / "model.safetensors", tmp_path / "v4" / "model.safetensors")
        old = BitNetForCausalLM.from_pretrained(tmp_path / "v4", dtype=torch.float32)
        assert old.config.hidden_act == "silu" and rel_err(old(ids).logits, ref) < TOL
        old.save_pretrained(tmp_path / "again")
        back = BitNetForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
        assert back.config.rope_scaling == plain.config.rope_scaling and torch.equal(back(ids).logits, old(ids).logits)
    assert rel_err(hf_logits(tmp_path / "again", ids), ref) < TOL
