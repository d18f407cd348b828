"""The distinct 16-bit values of a weight, per LUT group (eDKM's uniquification, Cho et al. 2023).

16-bit floats take at most 65,536 values, so anything computed per weight from its value alone (attention, the
k-means histogram) can be computed once per distinct value (a bucket) and gathered. A bf16 or fp16 weight is its own
bucket key, exactly; a float32 weight is keyed by its float16 rounding (bfloat16 beyond float16's range).
"""

from __future__ import annotations

import torch

_FP16_INF = (0x7C00, 0xFC00)


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
    keys = w.detach().to(bucket_dtype).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
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
    signed = torch.where(uniq_keys >= 32768, uniq_keys - 65536, uniq_keys).to(torch.int16)
    values = signed.view(bucket_dtype).to(w.dtype)
    values = torch.where(uniq_counts > 0, values, torch.zeros((), dtype=w.dtype, device=device))
    return values, uniq_counts, inverse
