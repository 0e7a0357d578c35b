"""Triton region descriptors: the mean key of every region, for a gaze KV cache.

When visual tokens enter the cache, each region's descriptor (the mean of its
keys, fp32) is computed once; decode steps then route with a GEMV over these
instead of reading every visual key. One program per (region, sequence, KV head),
taking the region's tokens ``BLOCK_S`` at a time (region and head sizes are
runtime arguments: one binary per dtype and padded head dim).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gazeattn.ops.gaze.launch import descriptor_launch, device_spec
from gazeattn.ops.layout import GazeLayout


# sizes change per call but not the compiled code: not specialised
@triton.jit(do_not_specialize=["R", "HKV", "S"])
def _region_mean_fwd_kernel(
    K,
    TOKENS,
    OUT,
    stride_kb,
    stride_kh,
    stride_kt,
    R,
    HKV,
    S,
    D,
    BLOCK_S: tl.constexpr,
    D_PAD: tl.constexpr,
):
    r = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    k_base = K + b * stride_kb + kvh * stride_kh
    total = tl.zeros([D_PAD], tl.float32)
    count = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        pos = tl.load(TOKENS + (b * R + r) * S + s, mask=s < S, other=-1)
        ok = pos >= 0
        ptr = k_base + tl.where(ok, pos, 0)[:, None] * stride_kt + d[None, :]
        keys = tl.load(ptr, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum(keys, 0)
        count += ok.to(tl.float32)
    mean = total / tl.maximum(tl.sum(count, 0), 1.0)
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
    lc = descriptor_launch(k.dtype, dim, width, device_spec(k.device))
    _region_mean_fwd_kernel[(num_r, batch * hkv)](
        k,
        tokens,
        out,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        num_r,
        hkv,
        width,
        dim,
        BLOCK_S=lc.block_s,
        D_PAD=lc.d_pad,
        **lc.options.kwargs(),
    )
    return out
