"""The original BitNet (binary weights, Wang et al. 2023) as the third system: linear="bitnet1"."""

import json

import pytest
import torch
from reference import PROJECTIONS, logits_on_transformers_branch, no_compile, rel_err

from bitnet import BitLinear, BitNetConfig, BitNetForCausalLM, freeze, weight_bytes
from bitnet.cli import main
from bitnet.quant import quantize_activation, quantize_binary

IDS = torch.tensor([[1, 7, 300, 45, 45, 2, 99, 511, 0, 64]])


def test_binary_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # mean 0.5, mean|W| 1.5
    w_b, beta = quantize_binary(w)
    assert w_b.tolist() == [[1, -1], [1, -1]] and beta.item() == 1.5


def test_binary_zero_mean_matrix():
    w = torch.tensor([[0.5, -0.5], [-0.25, 0.25]])  # already zero-mean
    w_b, beta = quantize_binary(w)
    assert w_b.tolist() == [[1, -1], [-1, 1]] and beta.item() == pytest.approx(0.375)


def test_binary_constant_and_zero_matrices_map_sign0_to_minus_one():
    w_b, beta = quantize_binary(torch.full((3, 4), 0.7))
    assert torch.equal(w_b, torch.full((3, 4), -1, dtype=torch.int8)) and beta.item() == pytest.approx(0.7)
    w_b, beta = quantize_binary(torch.zeros(2, 3))
    assert torch.equal(w_b, torch.full((2, 3), -1, dtype=torch.int8)) and beta.item() == pytest.approx(1e-5)
    assert torch.isfinite(BitLinear(3, 2, bias=False, weight_bits="binary").freeze()(torch.zeros(1, 3))).all()


def test_binary_all_equal_rows():
    # every row constant but rows differ: centered by the matrix mean (0), signs follow the rows
    w = torch.tensor([[2.0, 2.0, 2.0], [-2.0, -2.0, -2.0]])
    w_b, beta = quantize_binary(w)
    assert w_b.tolist() == [[1, 1, 1], [-1, -1, -1]] and beta.item() == 2.0


def test_binary_layer_is_the_formula_and_frozen_agrees():
    torch.manual_seed(0)
    m = BitLinear(40, 24, bias=False, weight_bits="binary")
    x = torch.randn(5, 40)
    w64 = m.weight.double()
    w_b = torch.where(w64 - w64.mean() > 0, 1.0, -1.0).double()
    x_q, a = quantize_activation(x)
    ref = (x_q.double() @ w_b.t()) * w64.abs().mean() / a.double()
    with torch.no_grad():
        y_train = m(x)
        y_frozen = m.freeze()(x)
    torch.testing.assert_close(y_train.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_frozen, y_train, rtol=1e-5, atol=1e-6)
    assert m.packing == "1bit" and m.weight.shape == (3, 40)


def test_binary_model_bytes_are_an_eighth_of_int8():
    torch.manual_seed(0)
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny", linear="bitnet1")))
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 14
    packed = sum(m.weight.numel() for m in layers)
    int8_bytes = sum(m.out_features * m.in_features for m in layers)
    assert all(m.weight.dtype == torch.uint8 for m in layers)
    assert packed * 8 == int8_bytes
    assert weight_bytes(model)["linear"] == packed + 4 * len(layers)  # + one float32 scale each


def test_b158_path_untouched_by_bitnet1():
    a = BitNetConfig.from_preset("tiny")
    assert a.weight_bits == "ternary" and BitNetConfig.from_preset("tiny", linear="bitnet1").weight_bits == "binary"


@pytest.mark.parametrize("frozen", [True, False])
def test_save_load_round_trip_is_exact(tmp_path, frozen):
    torch.manual_seed(0)
    model = BitNetForCausalLM(BitNetConfig.from_preset("tiny", linear="bitnet1")).eval()
    if frozen:
        freeze(model)
    model.save_pretrained(tmp_path)
    q = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert (q["quant_method"], q["weight_bits"], q["quantization_mode"]) == ("bitnet1", 1, "offline" if frozen else "online")
    loaded = BitNetForCausalLM.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_unpacked_export_loads_in_transformers_with_the_same_function(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny", linear="bitnet1")).eval())
    model.save_pretrained(tmp_path / "packed")
    assert main(["convert", str(tmp_path / "packed"), str(tmp_path / "hf"), "--to", "unpacked"]) == 0
    q = json.load(open(tmp_path / "hf" / "config.json"))["quantization_config"]
    assert (q["quant_method"], q["linear_class"], q["quantization_mode"]) == ("bitnet", "autobitlinear", "offline")
    with no_compile():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert set(theirs.model.layers[0].self_attn.q_proj.weight.unique().tolist()) == {-1.0, 1.0}
    ours, ref, _ = logits_on_transformers_branch(model, theirs, IDS)
    assert rel_err(ours, ref) < 1e-4
    # and it loads back here (as a ternary-format folder whose weights have no zeros)
    back = BitNetForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert rel_err(back(IDS).logits, model(IDS).logits) < 1e-6


def test_unpacked_weights_outside_the_alphabet_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from bitnet import CheckpointError

    model = freeze(BitNetForCausalLM(BitNetConfig.from_preset("tiny")))
    model.save_pretrained(tmp_path, unpacked=True)
    t = load_file(tmp_path / "model.safetensors")
    name = f"model.layers.1.mlp.{PROJECTIONS[4]}.weight"
    t[name][0, 0] = 0.5
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{name}' is stored unpacked but holds values outside"):
        BitNetForCausalLM.from_pretrained(tmp_path)
