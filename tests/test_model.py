"""BitNetForCausalLM on its own: loss, masks, checkpointing, twin and BitNet built alike."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitnet import BitLinear, BitNetConfig, BitNetForCausalLM, ConfigError


def tiny(**kw):
    torch.manual_seed(0)
    return BitNetForCausalLM(BitNetConfig.from_preset("tiny", **kw))


def test_loss_is_next_token_cross_entropy():
    m = tiny()
    ids = torch.randint(0, 512, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    out = m(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512).double(), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert m(ids).loss is None


def test_twin_and_bitnet_share_names_shapes_and_init():
    a, b = tiny(linear="bitnet"), tiny(linear="bf16")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert sum(isinstance(m, BitLinear) for m in a.modules()) == 14
    assert not any(isinstance(m, BitLinear) for m in b.modules())
    assert sum(type(m) is nn.Linear for m in b.modules()) == 15  # 14 + lm_head


def test_tied_embeddings():
    m = tiny()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert tiny(tie_word_embeddings=False).lm_head.weight is not None


def test_padding_mask_and_right_padding():
    m = tiny().eval()
    ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        full = m(ids).logits
        ones = m(ids, attention_mask=torch.ones(2, 8, dtype=torch.long)).logits
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        padded = m(ids, attention_mask=mask).logits
    torch.testing.assert_close(ones, full, rtol=1e-5, atol=1e-5)
    # right padding does not change the logits of the real tokens
    torch.testing.assert_close(padded[1, :5], full[1, :5], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 512, (2, 16))
    grads = []
    for ckpt in (False, True):
        m = tiny()
        m.gradient_checkpointing = ckpt
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_relu2_and_sub_norms_present_for_bitnet_and_absent_for_llama():
    b, l = tiny(), tiny(model_type="llama", hidden_act="silu")
    assert b.model.layers[0].mlp.ffn_sub_norm is not None and b.model.layers[0].self_attn.attn_sub_norm is not None
    assert l.model.layers[0].mlp.ffn_sub_norm is None
    assert "attn_sub_norm" not in "".join(l.state_dict())


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="linear must be one of"):
        BitNetConfig.from_preset("tiny", linear="int4")
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        BitNetConfig.from_preset("tiny", num_key_value_heads=3)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        BitNetConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="hidden_act"):
        BitNetConfig.from_preset("tiny", hidden_act="swishy")


def test_2b4t_preset_is_the_real_shape():
    c = BitNetConfig.from_preset("2b4t")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        2560, 6912, 30, 20, 5)
    assert (c.dim_head, c.vocab_size, c.tie_word_embeddings, c.rope_theta, c.hidden_act) == (
        128, 128256, True, 500000.0, "relu2")
    with torch.device("meta"):
        m = BitNetForCausalLM(c)
    assert m.num_parameters() == 2_412_820_480
