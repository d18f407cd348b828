"""The distinct 16-bit values of a weight, per LUT group (eDKM's uniquification, Cho et al. 2023).

16-bit floats take at most 65,536 values, so anything computed per weight from its value alone (attention, the
k-means histogram) can be computed once per distinct value (a bucket) and gathered. A bf16 or fp16 weight is its own
bucket key, exactly; a float32 weight is keyed by its float16 rounding (bfloat16 beyond float16's range).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import fused

_FP16_INF = (0x7C00, 0xFC00)
# Several LUT groups are keyed one group at a time, each with 65,536-entry tables: from this many weights per group
# (stacked experts); smaller groups keep unique_buckets' inverse, whose cost is not per group (16,384 groups of 1,024
# weights took 3x as long in backward keyed, on one thread).
KEYED_GROUP = 1 << 16


def bucket_dtype_for(w: torch.Tensor) -> torch.dtype:
    """16-bit dtype whose bit pattern indexes a bucket: the weight's own if 16-bit, else float16 (`unique_buckets`
    falls back to bfloat16 for weights beyond float16's range)."""
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16


def unique_buckets(w: torch.Tensor, bucket_dtype: torch.dtype):
    """Distinct 16-bit values per group of w (G, n).

    Returns values (G, U), counts (G, U) and `inverse` (G * n,): the index of each weight's bucket in the flattened
    (G * U) rows. Groups with fewer than U distinct values are padded with value 0 and count 0.
    """
    G, n = w.shape
    device = w.device
    keys = w.detach().contiguous().to(bucket_dtype).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
    rounded = bucket_dtype == torch.float16 and w.dtype != torch.float16
    if G == 1:
        counts = torch.bincount(keys.view(-1), minlength=65536)
        if rounded and counts[list(_FP16_INF)].any():
            return unique_buckets(w, torch.bfloat16)  # beyond float16's range
        present = counts.nonzero().squeeze(1)
        table = torch.empty(65536, dtype=torch.int32, device=device)
        table[present] = torch.arange(present.numel(), dtype=torch.int32, device=device)
        inverse = table.index_select(0, keys.view(-1))
        uniq_keys, uniq_counts = present.unsqueeze(0), counts[present].unsqueeze(0)
    else:
        if rounded and torch.isin(keys, torch.tensor(_FP16_INF, dtype=keys.dtype, device=device)).any():
            return unique_buckets(w, torch.bfloat16)
        flat = keys.to(torch.int64) + torch.arange(G, device=device).unsqueeze(1) * 65536
        uk, inv, cnt = torch.unique(flat.view(-1), return_inverse=True, return_counts=True)
        group = uk // 65536
        per_group = torch.bincount(group, minlength=G)
        first = torch.cumsum(per_group, 0) - per_group
        pos = torch.arange(uk.numel(), device=device) - first[group]
        umax = int(per_group.max())
        uniq_keys = torch.zeros(G, umax, dtype=torch.int64, device=device)
        uniq_counts = torch.zeros(G, umax, dtype=torch.int64, device=device)
        uniq_keys[group, pos] = uk % 65536
        uniq_counts[group, pos] = cnt
        inverse = (group * umax + pos).to(torch.int32)[inv]
    return _key_values(uniq_keys, uniq_counts, bucket_dtype, w.dtype), uniq_counts, inverse


def _key_values(keys: torch.Tensor, counts: torch.Tensor, bucket_dtype: torch.dtype, dtype: torch.dtype):
    """The values (in `dtype`) of 16-bit keys (int64 in [0, 65536)); 0 where the count is 0 (padding)."""
    signed = torch.where(keys >= 32768, keys - 65536, keys).to(torch.int16)
    values = signed.view(bucket_dtype).to(dtype)
    return torch.where(counts > 0, values, torch.zeros((), dtype=dtype, device=keys.device))


class Buckets(NamedTuple):
    """The buckets of a weight w (G, n) and the map between weights and buckets.

    values (G, U) and counts (G, U) as `unique_buckets` gives them. `index` is either its inverse (G * n,) int32 into
    the flattened (G * U) buckets (`present` None), or, where the CPU kernels of dkm_buckets.cpp serve, the weights'
    16-bit keys (G * n,) int16 with `present` (G, U) the key of each bucket (0 where the count is 0): the per-weight
    loops then read 2 bytes per weight and index a 65,536-entry table per group directly (several times faster than
    torch's gathers and scatters, and no 4-byte inverse nor 8-byte sort keys per weight).
    """

    values: torch.Tensor
    counts: torch.Tensor
    index: torch.Tensor
    present: torch.Tensor | None

    def gather(self, per_bucket: torch.Tensor) -> torch.Tensor:
        """Each weight's entry of per_bucket (G * U,): (G * n,)."""
        if self.present is None:
            return per_bucket.index_select(0, self.index)
        kernels, groups = fused.cpu_kernels(), self._groups()
        per_bucket = per_bucket.view(self.counts.shape)
        tables = (self._table(present, per_bucket[g], per_bucket.dtype) for g, (_, present) in enumerate(groups))
        if len(groups) == 1:
            return kernels.bucket_gather(next(tables), groups[0][0])
        out = torch.empty(self.index.numel(), dtype=per_bucket.dtype).view(len(groups), -1)
        for row, table, (keys, _) in zip(out, tables, groups):
            row.copy_(kernels.bucket_gather(table, keys))
        return out.view(-1)

    def sums(self, g: torch.Tensor) -> torch.Tensor:
        """The sum of g (G * n,) over each bucket's weights: (G * U,) in g's dtype."""
        if self.present is None:
            return torch.zeros(self.values.numel(), dtype=g.dtype, device=g.device).index_add_(0, self.index, g)
        kernels, groups = fused.cpu_kernels(), self._groups()
        out = torch.zeros(self.counts.shape, dtype=g.dtype)
        for row, part, (keys, present) in zip(out, g.contiguous().view(len(groups), -1), groups):
            row[: present.numel()] = kernels.bucket_sums(keys, part).index_select(0, present)
        return out.view(-1)

    def grad(self, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """a[bucket] * g + b[bucket] for every weight, from per-bucket a and b (G * U,) and g (G * n,)."""
        if self.present is None:
            # two gathers from small tables (one gather of (a, b) pairs is ~5x slower on CPU than both)
            return a.index_select(0, self.index).mul_(g).add_(b.index_select(0, self.index))
        kernels, groups = fused.cpu_kernels(), self._groups()
        a, b, g = a.view(self.counts.shape), b.view(self.counts.shape), g.contiguous().view(len(groups), -1)
        parts = []
        for i, (keys, present) in enumerate(groups):
            tables = (self._table(present, x[i], torch.float32) for x in (a, b))
            parts.append(kernels.bucket_grad(*tables, keys, g[i]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _groups(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group: its weights' keys (n,) and the keys of its buckets (U_g,)."""
        G = self.counts.shape[0]
        used = (self.counts > 0).sum(1).tolist()
        return [(keys, self.present[g, : used[g]]) for g, keys in enumerate(self.index.view(G, -1))]

    @staticmethod
    def _table(present: torch.Tensor, per_bucket: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A group's 65,536-entry table: per_bucket's (first) entries at their buckets' keys."""
        table = torch.zeros(65536, dtype=dtype, device=per_bucket.device)
        return table.index_copy_(0, present, per_bucket[: present.numel()].to(dtype))


def bucket_index(w: torch.Tensor, bucket_dtype: torch.dtype) -> Buckets:
    """`Buckets` of w (G, n): keyed by the 16-bit patterns themselves where the CPU kernels serve (a CPU weight of at
    most 32 bits: their tables are float32; one LUT group, or groups of at least KEYED_GROUP weights, a loop over
    them), else by `unique_buckets`' inverse."""
    served = w.device.type == "cpu" and w.element_size() <= 4 and (w.shape[0] == 1 or w.shape[1] >= KEYED_GROUP)
    kernels = fused.cpu_kernels() if served else None  # dkm_buckets.cpp
    if kernels is None:
        return Buckets(*unique_buckets(w, bucket_dtype), None)
    keys = w.detach().contiguous().to(bucket_dtype).view(torch.int16)  # no copy of a contiguous weight in bucket_dtype
    rounded = bucket_dtype == torch.float16 and w.dtype != torch.float16
    present, counts = [], []
    for row in keys:  # a group at a time: one 65,536-entry histogram alive
        histogram = kernels.bucket_counts(row)
        if rounded and bool(histogram[list(_FP16_INF)].any()):
            return bucket_index(w, torch.bfloat16)  # beyond float16's range
        present.append(histogram.nonzero().squeeze(1))
        counts.append(histogram.index_select(0, present[-1]))
    shape = (len(present), max(p.numel() for p in present))
    bucket_keys, bucket_counts = torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int64)
    for g, (p, c) in enumerate(zip(present, counts)):
        bucket_keys[g, : p.numel()], bucket_counts[g, : p.numel()] = p, c
    values = _key_values(bucket_keys, bucket_counts, bucket_dtype, w.dtype)
    return Buckets(values, bucket_counts, keys.view(-1), bucket_keys)
