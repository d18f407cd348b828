"""Pack and unpack b-bit indices (1 <= b <= 8) into uint8 bytes.

Every 8 indices become exactly b bytes. Index j of a block of 8 occupies bits [j*b, (j+1)*b) of the block read as
a little-endian integer, so for b = 3:

    byte:     |        0        |        1        |        2        |
    bit:       0 1 2 3 4 5 6 7   0 1 2 3 4 5 6 7   0 1 2 3 4 5 6 7
    index:     0 0 0 1 1 1 2 2   2 3 3 3 4 4 4 5   5 5 6 6 6 7 7 7

The last block is zero-padded, so n indices take ceil(n / 8) * b bytes: the information content plus < b bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def packed_size(n: int, bits: int) -> int:
    return -(-n // 8) * bits


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer indices in [0, 2**bits) of any shape -> 1-D uint8 tensor of `packed_size(numel, bits)` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"indices must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    pad = (-flat.numel()) % 8
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, 8)
    shifts = torch.arange(8, device=flat.device) * bits
    value = (blocks << shifts).sum(1)  # < 2**64, wraps into int64's sign bit at 8 bits: masked below
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    return ((value.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).view(-1)


def pack_stream(pieces: Iterable[torch.Tensor], n: int, bits: int, device: torch.device) -> torch.Tensor:
    """`pack_indices` of the concatenation of `pieces` (n indices in all) without forming it: each piece is packed
    as it comes (the fewer than 8 indices left over at its end go with the next one) into one uint8 tensor."""
    out = torch.empty(packed_size(n, bits), dtype=torch.uint8, device=device)
    pos, carry, count = 0, None, 0
    for piece in pieces:
        piece = piece.reshape(-1)
        count += piece.numel()
        if count > n:
            raise ValueError(f"expected {n} indices to pack, got more")
        if carry is not None and carry.numel():
            piece = torch.cat([carry, piece])
        whole = piece.numel() - piece.numel() % 8
        packed = pack_indices(piece[:whole], bits)
        out[pos : pos + packed.numel()] = packed
        pos, carry = pos + packed.numel(), piece[whole:]
    if carry is not None and carry.numel():
        packed = pack_indices(carry, bits)
        out[pos : pos + packed.numel()] = packed
        pos += packed.numel()
    if count != n:
        raise ValueError(f"expected {n} indices to pack, got {count}")
    return out


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_indices`: the first n indices as int64."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed indices must be a 1-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_size(n, bits):
        raise ValueError(f"{n} indices at {bits} bits take {packed_size(n, bits)} bytes, got {packed.numel()}")
    return unpack_range(packed, bits, 0, n)


def unpack_uint8(packed: torch.Tensor, bits: int, n: int, chunk: int = 2**20) -> torch.Tensor:
    """`unpack_indices` as uint8, a byte per index rather than eight. 1, 2, 4 and 8 bits unpack in uint8 at once;
    the widths whose indices straddle bytes go through int64 `chunk` indices (a multiple of 8) at a time."""
    if packed.numel() != packed_size(n, bits):
        raise ValueError(f"{n} indices at {bits} bits take {packed_size(n, bits)} bytes, got {packed.numel()}")
    if 8 % bits == 0:
        out = unpack_bytes(packed, bits)[:n]
        return out.clone() if bits == 8 else out  # not the packed tensor itself
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = unpack_range(packed, bits, start, stop)
    return out


def unpack_range(packed: torch.Tensor, bits: int, start: int, stop: int) -> torch.Tensor:
    """Indices [start, stop) as int64, reading only their bytes; `start` must be a multiple of 8."""
    if start % 8:
        raise ValueError(f"start must be a multiple of 8, got {start}")
    return unpack_bytes(packed[start // 8 * bits : -(-stop // 8) * bits], bits)[: stop - start].long()


def unpack_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """All the indices of whole 8-index blocks (packed.shape[-1] a multiple of `bits` bytes), over the last
    dimension: (..., b * m) uint8 -> (..., 8 * m) uint8 (int32 for the generic widths).

    1, 2, 4 and 8 bits keep whole indices inside a byte: a few uint8 shifts and masks. 3, 5, 6 and 7 bits straddle
    bytes: each 8-index block is read as one integer.
    """
    if 8 % bits == 0:
        if bits == 8:
            return packed
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)
    blocks = packed.to(torch.int64).unflatten(-1, (-1, bits))
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    value = (blocks << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=packed.device) * bits
    return ((value.unsqueeze(-1) >> shifts) & (2**bits - 1)).to(torch.int32).flatten(-2)
