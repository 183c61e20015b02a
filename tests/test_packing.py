"""bitnet.packing: bit-identical with transformers' pack_weights / unpack_weights."""

import pytest
import torch
from reference import no_compile

from bitnet.packing import pack, packed_rows, repack, unpack


def ternary(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("n,k", [(4, 1), (8, 3), (64, 48), (176, 64), (256, 17)])
def test_pack_is_bit_identical_with_transformers(n, k):
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    w = ternary(n, k)
    ours = pack(w)
    theirs = pack_weights(w.clone())  # (it adds 1 in place)
    assert ours.dtype == torch.uint8 and ours.shape == (n // 4, k)
    assert torch.equal(ours, theirs)
    with no_compile():
        assert torch.equal(unpack_weights(ours, torch.float32), w.float())
    assert torch.equal(unpack(ours, n), w)


def test_layout_by_hand():
    # rows r, r+R, r+2R, r+3R of column j in bits 0-1, 2-3, 4-5, 6-7 (code = w + 1)
    w = torch.tensor([[1], [0], [-1], [1], [0], [0], [-1], [1]], dtype=torch.int8)  # N=8, R=2
    packed = pack(w)
    # byte 0: rows 0, 2, 4, 6 = 1, -1, 0, -1 -> codes 2, 0, 1, 0; byte 1: rows 1, 3, 5, 7 = 0, 1, 0, 1
    assert packed.tolist() == [[2 | 0 << 2 | 1 << 4 | 0 << 6], [1 | 2 << 2 | 1 << 4 | 2 << 6]]


@pytest.mark.parametrize("fmt", ["2bit", "1.6bit"])
@pytest.mark.parametrize("n", [1, 5, 6, 7, 13, 64])
def test_round_trip_any_rows(fmt, n):
    w = ternary(n, 9, seed=n)
    packed = pack(w, fmt)
    assert packed.shape == (packed_rows(n, fmt), 9)
    assert torch.equal(unpack(packed, n, fmt), w)


def test_padding_rows_hold_zero_weights():
    w = ternary(6, 5)
    full = unpack(pack(w), 8)  # the two padding rows
    assert torch.equal(full[:6], w) and torch.equal(full[6:], torch.zeros(2, 5, dtype=torch.int8))


def test_1_6bit_is_base3_and_denser():
    w = ternary(10, 4)
    packed = pack(w, "1.6bit")
    assert packed.shape == (2, 4) and int(packed.max()) < 243
    assert torch.equal(repack(pack(w), 10, "2bit", "1.6bit"), packed)


def test_1bit_round_trip_and_layout():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 2, (20, 7), generator=g, dtype=torch.int8) * 2 - 1
    packed = pack(w, "1bit")
    assert packed.shape == (3, 7)
    assert torch.equal(unpack(packed, 20, "1bit"), w)
    w8 = torch.tensor([[1], [-1], [1], [1], [-1], [-1], [-1], [1]], dtype=torch.int8)
    assert pack(w8, "1bit").item() == 0b10001101


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="ternary"):
        pack(torch.tensor([[2, 0, 0, 0]], dtype=torch.int8).t())
    with pytest.raises(ValueError, match="binary"):
        pack(torch.zeros(8, 2, dtype=torch.int8), "1bit")
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="unknown packed format"):
        pack(ternary(4, 4), "3bit")
