"""b-bit index packing: every bit width 1-8, lengths that are and are not multiples of 8, the documented layout."""

from __future__ import annotations

import pytest
import torch

from dkm_hf.ops import attention
from dkm_hf.ops.attention import gather_centroids, hard_assign, hard_assign_slices, snap
from dkm_hf.ops.packing import pack_indices, pack_stream, packed_size, unpack_indices, unpack_range, unpack_uint8


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 64, 1001])
def test_round_trip_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    indices = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == -(-n // 8) * bits
    assert torch.equal(unpack_indices(packed, bits, n), indices)
    if n % 8:  # the padding after the last index is zero
        assert not unpack_indices(packed[-bits:], bits, 8)[n % 8 :].any()


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_values(bits):
    indices = torch.tensor([0, 2**bits - 1] * 9)
    assert torch.equal(unpack_indices(pack_indices(indices, bits), bits, 18), indices)


def test_bit_layout_of_the_docstring():
    """For b = 3, index j of a block of 8 occupies bits [3j, 3j + 3) of the block read little-endian."""
    packed = pack_indices(torch.tensor([1, 0, 0, 0, 0, 0, 0, 7]), 3)
    assert packed.tolist() == [0b00000001, 0, 0b11100000]


@pytest.mark.parametrize("bits", [3, 8])
def test_unpack_range_reads_a_slice(bits):
    indices = torch.randint(0, 2**bits, (100,), generator=torch.Generator().manual_seed(0))
    packed = pack_indices(indices, bits)
    assert torch.equal(unpack_range(packed, bits, 16, 45), indices[16:45])
    with pytest.raises(ValueError, match="multiple of 8"):
        unpack_range(packed, bits, 3, 10)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_indices(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="bits must be in"):
        pack_indices(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="take 3 bytes"):
        unpack_indices(torch.zeros(2, dtype=torch.uint8), 3, 8)
    with pytest.raises(ValueError, match="uint8"):
        unpack_indices(torch.zeros(3, dtype=torch.int8), 3, 8)


@pytest.mark.parametrize("bits", [1, 3, 4, 7])
def test_pack_stream_packs_pieces_as_one(bits):
    """Pieces of any sizes (not multiples of 8, empty ones) give the bytes of packing their concatenation."""
    g = torch.Generator().manual_seed(bits)
    pieces = [torch.randint(0, 2**bits, (n,), generator=g) for n in (5, 0, 13, 8, 1, 30, 3)]
    whole = torch.cat(pieces)
    assert torch.equal(pack_stream(pieces, whole.numel(), bits, whole.device), pack_indices(whole, bits))
    shaped = [pieces[5].view(3, 10), pieces[0]]  # any shape, as pack_indices takes
    assert torch.equal(
        pack_stream(shaped, 35, bits, whole.device), pack_indices(torch.cat([pieces[5], pieces[0]]), bits)
    )
    with pytest.raises(ValueError, match="expected 61 indices to pack, got 60"):
        pack_stream(pieces, 61, bits, whole.device)
    with pytest.raises(ValueError, match="expected 59 indices to pack, got more"):
        pack_stream(pieces, 59, bits, whole.device)


@pytest.mark.parametrize("shape", [(7, 5, 1), (3, 50, 1), (4, 9, 2)])
def test_hard_assign_slices_are_hard_assign_in_order(shape):
    """Whole groups a slice at a time, or parts of a group larger than a slice: hard_assign's indices, in its order."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    c = torch.randn(shape[0], 8, shape[2], generator=torch.Generator().manual_seed(1))
    for size in (4, 16, 1000):
        pieces = list(hard_assign_slices(w, c, size))
        assert max(p.numel() for p in pieces) <= max(size, shape[1] if shape[1] <= size else size)
        assert torch.equal(torch.cat(pieces), hard_assign(w, c).reshape(-1))
    # a group's broken centroids (NaN, inf) decide hard_assign's method for all: assigned whole, as it would be
    w, c = w.clone(), c.clone()
    w[1:] = float("inf")
    c[0, 0] = float("nan")
    assert torch.equal(torch.cat(list(hard_assign_slices(w, c, 4))), hard_assign(w, c).reshape(-1))


@pytest.mark.parametrize("shape", [(7, 5, 1), (3, 50, 1), (4, 9, 2)])
def test_snap_gathers_the_nearest_centroids_a_slice_at_a_time(monkeypatch, shape):
    """The hard weight's vectors (a DKM layer's `hard_weight`) assigned a slice at a time: the whole weight's int64
    indices, 8 bytes a weight (4 GB for a 525M-weight embedding at each evaluation of the hard model), never exist."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    c = torch.randn(shape[0], 8, shape[2], generator=torch.Generator().manual_seed(1))
    lut = c.half().float()
    expected = gather_centroids(hard_assign(w, c), lut)
    for size in (4, 16, 1000):
        monkeypatch.setattr(attention, "ASSIGN_SLICE", size)
        assert torch.equal(snap(w, c, lut), expected)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("chunk", [8, 24, 2**22])
def test_unpack_uint8_is_unpack_indices_in_bytes(bits, chunk):
    """What the Core ML export reads: the same indices, a byte each, unpacked a chunk at a time."""
    indices = torch.randint(0, 2**bits, (101,), generator=torch.Generator().manual_seed(bits))
    packed = pack_indices(indices, bits)
    out = unpack_uint8(packed, bits, 101, chunk)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), unpack_indices(packed, bits, 101))
    assert out.data_ptr() != packed.data_ptr()
    with pytest.raises(ValueError, match="take"):
        unpack_uint8(packed[:-1], bits, 101)
