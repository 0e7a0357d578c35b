"""Triton region descriptors: the mean key of every region, for a gaze KV cache.

When visual tokens enter the cache, each region's descriptor (the mean of its
keys, fp32) is computed once; decode steps then route with a GEMV over these
instead of reading every visual key. One program per (region, sequence, KV head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gazeattn.ops.layout import GazeLayout


@triton.jit
def _region_mean_fwd_kernel(
    K,
    TOKENS,
    OUT,
    stride_kb,
    stride_kh,
    stride_kt,
    R,
    HKV: tl.constexpr,
    S: tl.constexpr,
    S_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    r = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    s = tl.arange(0, S_PAD)
    pos = tl.load(TOKENS + (b * R + r) * S + s, mask=s < S, other=-1)
    ok = pos >= 0
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    ptr = (
        K + b * stride_kb + kvh * stride_kh + tl.where(ok, pos, 0)[:, None] * stride_kt + d[None, :]
    )
    keys = tl.load(ptr, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    count = tl.sum(ok.to(tl.float32), 0)
    mean = tl.sum(keys, 0) / tl.maximum(count, 1.0)
    tl.store(OUT + (bh * R + r) * D + d, mean, mask=d_ok)


def region_descriptors_triton(k: torch.Tensor, layout: GazeLayout) -> torch.Tensor:
    """Mean key of every region: k [B, Hkv, Tk, D] -> [B, Hkv, R, D] fp32 (0 for padding regions).

    The same values as ``gazeattn.ops.routing.region_descriptors`` up to float summation order.
    """
    batch, hkv, _, dim = k.shape
    tokens = layout.regions.tokens.to(device=k.device, dtype=torch.int32).contiguous()
    num_r, width = tokens.shape[1], tokens.shape[2]
    out = torch.empty(batch, hkv, num_r, dim, device=k.device, dtype=torch.float32)
    if num_r == 0:
        return out
    k = k if k.stride(-1) == 1 else k.contiguous()
    _region_mean_fwd_kernel[(num_r, batch * hkv)](
        k,
        tokens,
        out,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        num_r,
        HKV=hkv,
        S=width,
        S_PAD=triton.next_power_of_2(width),
        D=dim,
        D_PAD=triton.next_power_of_2(dim),
    )
    return out
