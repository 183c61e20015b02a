"""Bad checkpoints give errors that name the file and the tensor; saving is atomic; no pickle."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitnet.atomic as atomic
from bitnet import BitNetConfig, BitNetForCausalLM, CheckpointError, ConfigError, freeze

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny")))
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def never_unpickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was called: checkpoints must never be unpickled")

    monkeypatch.setattr(torch, "load", refuse)


def rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def edit_config(path, fn):
    cfg = json.load(open(path / "config.json"))
    fn(cfg)
    json.dump(cfg, open(path / "config.json", "w"))


def test_loads(saved):
    m = BitNetForCausalLM.from_pretrained(saved)
    assert m.model.layers[0].self_attn.q_proj.frozen


def test_missing_tensor(saved):
    rewrite(saved, lambda t: t.pop(f"{Q}.weight_scale"))
    with pytest.raises(CheckpointError, match=rf"missing tensors \['{Q}.weight_scale'\]"):
        BitNetForCausalLM.from_pretrained(saved)


def test_unexpected_tensor(saved):
    rewrite(saved, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        BitNetForCausalLM.from_pretrained(saved)


def test_wrong_shape(saved):
    rewrite(saved, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(65,\), expected \(64,\)"):
        BitNetForCausalLM.from_pretrained(saved)


def test_float_weight_where_packed_expected(saved):
    rewrite(saved, lambda t: t.__setitem__(f"{Q}.weight", torch.zeros(32, 64)))
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight' has dtype F32, expected uint8 packed weights \(quantization_mode is 'offline'\)"):
        BitNetForCausalLM.from_pretrained(saved)
    # (N, K) floats are read as unpacked W_q values (transformers' AutoBitLinear accepts them) ...
    rewrite(saved, lambda t: t.__setitem__(f"{Q}.weight", torch.randn(64, 64)))
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight' is stored unpacked but holds values outside"):
        BitNetForCausalLM.from_pretrained(saved)


def test_wrong_dtype(saved):
    rewrite(saved, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype I32, expected a float tensor"):
        BitNetForCausalLM.from_pretrained(saved)
    rewrite(saved, lambda t: t.__setitem__(f"{Q}.weight", torch.zeros(15, 64, dtype=torch.uint8)))
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight' has shape \(15, 64\), expected packed uint8 \(16, 64\)"):
        BitNetForCausalLM.from_pretrained(saved)


def test_invalid_ternary_code_and_scale(saved):
    rewrite(saved, lambda t: t[f"{Q}.weight"].__setitem__((0, 0), 0b11))
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight' holds the 2-bit code 3"):
        BitNetForCausalLM.from_pretrained(saved)


def test_negative_scale(saved):
    rewrite(saved, lambda t: t.__setitem__(f"{Q}.weight_scale", torch.tensor([-1.0])))
    with pytest.raises(CheckpointError, match=rf"'{Q}\.weight_scale' is -1.0, not a positive finite scale"):
        BitNetForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("cut", ["truncate", "header"])
def test_corrupt_file(saved, cut):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if cut == "truncate" else b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        BitNetForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("key,value,match", [
    ("quant_method", "gptq", "quant_method 'gptq' is unknown"),
    ("linear_class", "fastlinear", "linear_class 'fastlinear' is unknown"),
    ("quantization_mode", "sometimes", "quantization_mode 'sometimes' is unknown"),
])
def test_unknown_quantization_config(saved, key, value, match):
    edit_config(saved, lambda c: c["quantization_config"].__setitem__(key, value))
    with pytest.raises(ConfigError, match=rf"config\.json: quantization_config\.{match}"):
        BitNetForCausalLM.from_pretrained(saved)


def test_unknown_model_type(saved):
    edit_config(saved, lambda c: c.__setitem__("model_type", "gpt2"))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        BitNetForCausalLM.from_pretrained(saved)


def test_config_contradicts_weights(saved):
    edit_config(saved, lambda c: c.__setitem__("num_hidden_layers", 1))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\."):
        BitNetForCausalLM.from_pretrained(saved)
    edit_config(saved, lambda c: c.update(num_hidden_layers=2, tie_word_embeddings=False))
    with pytest.raises(CheckpointError, match=r"missing tensors \['lm_head\.weight'\]"):
        BitNetForCausalLM.from_pretrained(saved)
    edit_config(saved, lambda c: c.update(tie_word_embeddings=True, intermediate_size=180))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape"):
        BitNetForCausalLM.from_pretrained(saved)
    edit_config(saved, lambda c: c.update(intermediate_size=176, quantization_config=None))
    with pytest.raises(CheckpointError, match=r"dtype U8, expected a float tensor \(packed weights, but config\.json has no"):
        BitNetForCausalLM.from_pretrained(saved)


def test_pickle_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BitNetConfig.from_preset("tiny").to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is there, but pickled checkpoints are never loaded"):
        BitNetForCausalLM.from_pretrained(tmp_path)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BitNetForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BitNetForCausalLM.from_pretrained(tmp_path)


def test_crash_while_saving_leaves_the_old_checkpoint(saved, monkeypatch):
    before = {f: (saved / f).read_bytes() for f in os.listdir(saved)}
    torch.manual_seed(1)
    other = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny")))

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(atomic, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(saved)
    assert {f: (saved / f).read_bytes() for f in os.listdir(saved)} == before  # nothing changed, no temp left
    BitNetForCausalLM.from_pretrained(saved)


def test_a_model_packed_in_1_6_bits_saves_the_2_bit_format(tmp_path):
    """The checkpoint format is 2 bits a weight; a model frozen at 1.6 bits (5 trits a byte) is
    written as 2-bit bytes of the same codes: what transformers reads. Loaded back: 2-bit layers
    with every ternary value and scale equal, and the same logits (the same integer sums)."""
    from bitnet.packing import pack, unpack

    torch.manual_seed(0)
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny")), packing="1.6bit").eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    back = BitNetForCausalLM.from_pretrained(tmp_path).eval()
    layers = dict(model.named_modules())
    checked = 0
    for name, m in back.named_modules():
        if getattr(m, "packing", None) is None:
            continue
        ours = layers[name]
        assert ours.packing == "1.6bit" and m.packing == "2bit"
        w_q = unpack(ours.weight, ours.out_features, "1.6bit")
        assert torch.equal(tensors[f"{name}.weight"], pack(w_q, "2bit"))  # the file: the 2-bit layout
        assert torch.equal(unpack(m.weight, m.out_features, "2bit"), w_q) and torch.equal(m.weight_scale, ours.weight_scale)
        checked += 1
    assert checked == 7 * model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_a_tied_checkpoint_that_also_stores_lm_head(saved):
    """Some exports write lm_head.weight although config.json ties it to embed_tokens: equal, it is
    read as the tie it is; different, the checkpoint contradicts itself and is refused."""
    rewrite(saved, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    m = BitNetForCausalLM.from_pretrained(saved)
    assert m.config.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
    rewrite(saved, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"] + 1))
    with pytest.raises(CheckpointError, match="ties lm_head to embed_tokens, but lm_head.weight differs from it"):
        BitNetForCausalLM.from_pretrained(saved)
