"""BitLinear: drop-in for nn.Linear, training (STE) and frozen (packed) states."""

from pathlib import Path

import pytest
import torch
from torch import nn

from bitnet import BitLinear
from bitnet.quant import quantize_activation


def layer(n=48, k=80, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    return BitLinear(k, n, bias=bias, **kw)


def test_drop_in_for_linear():
    torch.manual_seed(0)
    ref = nn.Linear(80, 48)
    torch.manual_seed(0)
    m = BitLinear(80, 48)
    assert (m.in_features, m.out_features) == (80, 48)
    assert torch.equal(m.weight, ref.weight) and torch.equal(m.bias, ref.bias)  # nn.Linear's init
    for shape in [(80,), (3, 80), (2, 5, 80)]:
        assert m(torch.randn(shape)).shape == (*shape[:-1], 48)
    assert BitLinear(8, 4, bias=False).bias is None


def test_training_forward_is_the_formula():
    m = layer()
    x = torch.randn(4, 80)
    w64 = m.weight.double()
    s = w64.abs().mean()
    w_q = (w64 / s).round().clamp(-1, 1)
    x_q, a = quantize_activation(x)
    ref = (x_q.double() @ w_q.t()) * s / a.double() + m.bias.double()
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-6)


def test_straight_through_gradient():
    m = layer(bias=False)
    x = torch.randn(6, 80)
    gy = torch.randn(6, 48)
    (m(x) * gy).sum().backward()
    x_q, a = quantize_activation(x)
    x_dq = x_q.double() / a.double()
    torch.testing.assert_close(m.weight.grad.double(), gy.double().t() @ x_dq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [48, 50])
@pytest.mark.parametrize("packing", ["2bit", "1.6bit"])
def test_frozen_agrees_with_training_state(n, packing):
    m = layer(n=n)
    x = torch.randn(2, 7, 80)
    with torch.no_grad():
        y_train = m(x)
        m.freeze(packing)
        y_frozen = m(x)
    torch.testing.assert_close(y_frozen, y_train, rtol=1e-5, atol=1e-5)


def test_frozen_holds_only_packed_weights_and_the_scale():
    m = layer(bias=False).freeze()
    assert list(m.parameters()) == []
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scale"}
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (12, 80)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (1,)
    assert sd["weight"].numel() * 8 == 48 * 80 * 2  # 2 bits a weight
    assert "frozen=2bit" in repr(m)


def test_frozen_bf16():
    m = layer().to(torch.bfloat16)
    x = torch.randn(3, 80, dtype=torch.bfloat16)
    with torch.no_grad():
        y_train = m(x)
        y = m.freeze()(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_train.float(), rtol=2e-2, atol=2e-2)


def test_unfreeze_keeps_the_ternary_weights():
    m = layer()
    w_q, s = m.quantized_weight()
    m.freeze().unfreeze()
    assert isinstance(m.weight, nn.Parameter) and m.weight.dtype == torch.float32
    assert torch.equal(m.quantized_weight()[0], w_q)


def test_zero_weights_and_zero_inputs_give_no_nan():
    m = layer(bias=False)
    with torch.no_grad():
        m.weight.zero_()
    x = torch.zeros(2, 80)
    assert torch.equal(m(x), torch.zeros(2, 48))
    assert torch.equal(m.freeze()(x), torch.zeros(2, 48))


def test_bad_arguments():
    with pytest.raises(ValueError, match="weight_bits"):
        BitLinear(4, 4, weight_bits="int4")
    with pytest.raises(ValueError, match="pack as"):
        layer().freeze("1bit")
    m = layer().freeze("2bit")
    with pytest.raises(ValueError, match="already frozen"):
        m.freeze("1.6bit")


def test_learns():
    torch.manual_seed(0)
    target = torch.randn(16, 32)
    m = BitLinear(32, 16, bias=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randn(256, 32)
    first = None
    for _ in range(200):
        loss = (m(x) - x @ target.t()).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_a_gpu_below_the_triton_floor_takes_the_torch_path(monkeypatch):
    """Triton compiles no int8 tensor-core dot for an NVIDIA GPU below compute capability 8.0 (a
    V100, a T4): a packed layer there defaults to the exact torch path, and kernel='triton' says why
    it cannot be; from 8.0 (A100, A10, L4, H100, RTX 30xx) the default is Triton. torch.cuda's
    answers are monkeypatched (no GPU here); the layer's tensors stand in as their device."""
    from types import SimpleNamespace

    from bitnet import ops

    monkeypatch.delenv("BITNET_KERNEL", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda:0"))
    for capability, expected in (((7, 0), "torch"), ((7, 5), "torch"), ((8, 0), "triton"), ((8, 9), "triton"),
                                 ((9, 0), "triton"), ((12, 0), "triton")):
        monkeypatch.setattr(ops, "_TRITON_GPUS", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        assert ops.default_kernel("cuda:0") == expected == ops.choose_kernel(x), capability
        assert ops.triton_applies(x) == (expected == "triton")
        assert ops.choose_kernel(x, "torch") == "torch"
        if expected == "torch":
            with pytest.raises(RuntimeError, match=rf"capability 8\.0 or later \(int8 tensor-core dots\); Tesla T4 is "
                                                   rf"{capability[0]}\.{capability[1]}: kernel='torch'"):
                ops.choose_kernel(x, "triton")
        else:
            assert ops.choose_kernel(x, "triton") == "triton"


def test_a_triton_older_than_the_floor_takes_the_torch_path_on_a_gpu(monkeypatch, caplog):
    """A Triton older than TRITON_MIN_VERSION (pyproject.toml's floor, what CI compiles the kernels
    with), installed anyway (torch 2.9's 3.5 under pip --no-deps, a conda environment): the launch
    path reads Triton internals it lacks, so packed layers on a GPU default to the exact torch path,
    saying why once, and kernel='triton' says why it cannot be; the CPU's choice is unchanged.
    torch.cuda's answers and Triton's version are stood in for."""
    import re
    from types import SimpleNamespace

    import triton

    from bitnet import ops

    floor = re.search(r'"triton>=([0-9.]+)', (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[1]
    assert ".".join(map(str, ops.TRITON_MIN_VERSION)) == floor  # (the floor the compile guard checks)
    monkeypatch.delenv("BITNET_KERNEL", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(ops, "_TRITON_GPUS", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132))
    on_cpu = ops.default_kernel("cpu")
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda:0"))
    for version, expected in (("3.5.0", "torch"), ("3.4.1", "torch"), ("2.3.0", "torch"), (floor + ".0", "triton"),
                              ("3.9.0+git1234", "triton"), ("4.0.0", "triton")):
        monkeypatch.setattr(triton, "__version__", version)
        monkeypatch.setattr(ops, "_TRITON_VERSION", [])
        caplog.clear()
        with caplog.at_level("WARNING", logger="bitnet.ops"):
            assert ops.default_kernel("cuda:0") == expected == ops.choose_kernel(x), version
            assert ops.triton_applies(x) == (expected == "triton")
            ops.default_kernel("cuda:0")
        said = [r.getMessage() for r in caplog.records]
        if expected == "torch":
            assert said == [f"the Triton kernels need Triton {floor} or later, which torch 2.10 and later install; "
                            f"this environment has Triton {version} with torch {torch.__version__}; until then packed "
                            f"layers on a GPU run the exact torch path"], said  # once
            with pytest.raises(RuntimeError, match=rf"has Triton {re.escape(version)} .*kernel='torch'"):
                ops.choose_kernel(x, "triton")
            assert ops.describe_gpu_backend("cuda:0") == (
                f"cuda:0 NVIDIA H100 80GB HBM3 (compute capability 9.0, 132 SMs): torch path (the Triton kernels need "
                f"Triton {floor} or later, which torch 2.10 and later install; this environment has Triton {version} "
                f"with torch {torch.__version__})")
        else:
            assert not said and ops.choose_kernel(x, "triton") == "triton"
        assert ops.choose_kernel(x, "torch") == "torch" and ops.default_kernel("cpu") == on_cpu
