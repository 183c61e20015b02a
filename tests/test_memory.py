"""bitnet memory: exact weight / gradient / AdamW bytes, and the activation model against autograd."""

import pytest
import torch

from bitnet import BitNetConfig, BitNetForCausalLM
from bitnet.cli import main
from bitnet.train.memory import activation_bytes, estimate, saved_activation_bytes


@pytest.mark.parametrize("tied", [True, False])
def test_weights_gradients_optimizer_are_exact(tied):
    config = BitNetConfig.from_preset("tiny", tie_word_embeddings=tied)
    model = BitNetForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    est = estimate(config, micro_batch=2, seq_len=16, bf16=False)
    assert (est.weights, est.gradients, est.optimizer) == (weights, grads, states)


def test_fsdp_shards_every_tensor_by_rows():
    """FSDP2 gives each rank ceil(d0 / N) rows of every tensor (rank 0 holds a full chunk)."""
    config = BitNetConfig.from_preset("tiny")
    rank0 = sum(-(-p.shape[0] // 3) * (p.numel() // p.shape[0]) for p in BitNetForCausalLM(config).parameters())
    sharded = estimate(config, 1, 16, dp=3, fsdp=True)
    assert (sharded.weights, sharded.gradients) == (4 * rank0, 4 * rank0)
    assert estimate(config, 1, 16, dp=3).weights == estimate(config, 1, 16).weights  # DDP replicates


@pytest.mark.parametrize("linear", ["bitnet", "bf16"])
@pytest.mark.parametrize("model_type", ["bitnet", "llama"])
@pytest.mark.parametrize("bf16", [False, True])
def test_activation_model_within_5_percent_of_what_autograd_saves(linear, model_type, bf16):
    config = BitNetConfig.from_preset("small", linear=linear, model_type=model_type,
                                      hidden_act="relu2" if model_type == "bitnet" else "silu")
    model = BitNetForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 64))
    measured = saved_activation_bytes(model, ids, bf16)
    assert activation_bytes(config, 2, 64, bf16) == pytest.approx(measured, rel=0.05)


def test_memory_command(capsys):
    assert main(["memory", "2b4t", "--micro-batch", "1", "--seq-len", "4096", "--dp", "8", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "sharded over 8 ranks" in out and "optimizer" in out and "activations" in out
    assert "teacher" not in out
    assert main(["memory", "700m", "--micro-batch", "1", "--seq-len", "2048", "--teacher", "3b"]) == 0
    out = capsys.readouterr().out
    assert "distilling from a 3b teacher" in out and "  teacher " in out


@pytest.mark.parametrize("bf16", [False, True])
def test_a_distillation_teacher_within_5_percent_of_what_autograd_saves(bf16):
    """The teacher's weights exactly (in the dtype the trainer loads it: bf16 under autocast); what the
    KL adds to the saved activations (the student's and the teacher's logits) within 5% of the bytes
    autograd saves beyond the cross-entropy's own (the chunked KL's backward recomputes the rest).
    (The TP path's DTensor KL is modelled, not measured here.)"""
    config = BitNetConfig.from_preset("small")
    tconfig = BitNetConfig.from_preset("base", linear="bf16", vocab_size=config.vocab_size)
    model = BitNetForCausalLM(config)
    teacher = BitNetForCausalLM(tconfig).to(torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (2, 64))
    extra = saved_activation_bytes(model, ids, bf16, teacher) - saved_activation_bytes(model, ids, bf16)
    est = estimate(config, 2, 64, bf16=bf16, teacher=tconfig)
    assert est.teacher == sum(p.numel() * p.element_size() for p in teacher.parameters())
    assert est.activations - activation_bytes(config, 2, 64, bf16) == pytest.approx(extra, rel=0.05)
    assert est.total == estimate(config, 2, 64, bf16=bf16).total + est.teacher + est.activations - activation_bytes(
        config, 2, 64, bf16)
