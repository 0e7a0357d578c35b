"""Launch configurations of the Triton kernels, chosen per device (no Triton import here).

Every block size, warp count and pipeline depth a kernel runs with comes from the
pure functions below, given the device's compute capability and per-block shared
memory limit (``DeviceSpec``). ``tests/ops/test_kernel_compile.py`` compiles, for
sm_80 to sm_120, every configuration these functions can return and checks that
each fits its architecture's shared memory, so what it compiles is what runs.

A fixed table, not ``triton.autotune``: no GPU has timed these kernels yet (so
there is nothing to tune on), the region backward kernel adds into dk/dv (an
autotuner's repeated trial launches would have to save and restore them), and a
table is what the compile test can prove, case by case, to fit.

Shape arguments that do not change the compiled code (group size, region size,
head dims with the same padded width, sequence lengths) are runtime arguments of
the kernels and are not specialised, so each configuration below is one binary
per dtype and architecture.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# Per-block shared memory a kernel may opt into, in bytes, by compute capability:
# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"
# (maximum amount of shared memory per thread block): 8.0 and 8.7: 163 KB,
# 8.6 and 8.9: 99 KB, 9.0 and 10.x: 227 KB, 12.x: 99 KB (KB = 1024 bytes).
# The same figure as cudaDevAttrMaxSharedMemoryPerBlockOptin, which Triton checks.
SMEM_PER_BLOCK = {
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
    (10, 0): 227 * 1024,
    (10, 3): 227 * 1024,
    (12, 0): 99 * 1024,
    (12, 1): 99 * 1024,
}
# the kernels use bf16 tensor-core dots and cp.async: Ampere and later
MIN_CAPABILITY = (8, 0)
# widest head dim the kernels take (wider heads would need smaller tiles than any
# configuration here; they run on the reference backend)
MAX_HEAD_DIM = 128
# chunks of the split-K decode (the merge kernel's tile)
MAX_SPLITS = 64
# query heads one decode program holds, the rows of its tl.dots (16, the smallest an MMA
# takes; larger groups take several programs per head)
DECODE_ROWS = 16


def interpreted() -> bool:
    """True under the Triton interpreter (``TRITON_INTERPRET=1``), read at each call."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """What a launch configuration depends on. ``capability`` None: the interpreter."""

    name: str
    capability: tuple[int, int] | None
    smem_per_block: int
    multiprocessors: int

    @property
    def interpreted(self) -> bool:
        return self.capability is None


INTERPRETER = DeviceSpec(name="interpreter", capability=None, smem_per_block=0, multiprocessors=2)


def gpu_spec(
    capability: tuple[int, int], *, multiprocessors: int = 100, name: str = ""
) -> DeviceSpec:
    """The spec of a GPU of this compute capability (from the table above)."""
    if capability not in SMEM_PER_BLOCK:
        raise ValueError(f"no shared-memory figure for compute capability {capability}")
    return DeviceSpec(
        name=name or f"sm_{capability[0]}{capability[1]}",
        capability=capability,
        smem_per_block=SMEM_PER_BLOCK[capability],
        multiprocessors=multiprocessors,
    )


def device_spec(device: torch.device) -> DeviceSpec:
    """The spec kernels on ``device`` launch with: the interpreter's, or the CUDA device's."""
    if interpreted() or device.type != "cuda":
        return INTERPRETER
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_spec(index)


@functools.cache
def _cuda_spec(index: int) -> DeviceSpec:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    smem = getattr(props, "shared_memory_per_block_optin", None) or SMEM_PER_BLOCK.get(capability)
    if smem is None:
        raise RuntimeError(
            f"{props.name} (compute capability {capability}): unknown per-block shared memory"
        )
    return DeviceSpec(
        name=props.name,
        capability=capability,
        smem_per_block=int(smem),
        multiprocessors=props.multi_processor_count,
    )


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check(dtype: torch.dtype, head_dim: int, device: DeviceSpec) -> None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernels take fp16, bf16 or fp32, got {dtype}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {head_dim} is wider than the Triton kernels' {MAX_HEAD_DIM}; "
            "use backend='reference' or 'dense'"
        )
    if not device.interpreted and device.capability < MIN_CAPABILITY:
        raise ValueError(
            f"{device.name}: compute capability {device.capability} is below the Triton "
            f"kernels' sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]}; use backend='reference' or 'dense'"
        )


def head_dim_pad(head_dim: int, dtype: torch.dtype, device: DeviceSpec) -> int:
    """Padded head dim of the kernels' tiles. On GPUs 64 or 128 for 16-bit inputs, and 128 for
    fp32 (a correctness path: one tile shape), so every head dim up to 128 is one of three
    binaries per kernel and architecture."""
    if device.interpreted:
        return max(_next_pow2(head_dim), 16)
    return 64 if head_dim <= 64 and dtype != torch.float32 else 128


@dataclass(frozen=True, kw_only=True)
class KernelOptions:
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# the interpreter ignores warps and stages
_SERIAL = KernelOptions(num_warps=4, num_stages=1)


@dataclass(frozen=True, kw_only=True)
class FusedLaunch:
    """Sizes shared by the four kernels of the fused forward and backward.

    A block is ``rows`` rows: ``rows // group_pad`` query positions times the group's
    heads padded to a power of two. ``block_n`` keys per tile; the region backward
    kernel takes a region's tokens ``block_s`` at a time.
    """

    group: int
    group_pad: int
    rows: int
    block_n: int
    block_s: int
    d_pad: int
    upcast: bool
    precision: str
    fwd: KernelOptions
    dq: KernelOptions
    dkdv: KernelOptions
    region: KernelOptions

    @property
    def block_q(self) -> int:
        return self.rows // self.group_pad


def fused_launch(
    dtype: torch.dtype, head_dim: int, group: int, region_tokens: int, device: DeviceSpec
) -> FusedLaunch:
    """The fused kernels' configuration for queries of ``dtype`` and ``head_dim`` with
    ``group`` query heads per KV head and regions of up to ``region_tokens`` tokens."""
    _check(dtype, head_dim, device)
    group_pad = _next_pow2(group)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    d_pad = head_dim_pad(head_dim, dtype, device)
    if device.interpreted:
        # the interpreter pays per program and loop step, not per FLOP: large tiles;
        # it stores bf16 as uint16 and tl.dot on it returns garbage: upcast
        return FusedLaunch(
            group=group,
            group_pad=group_pad,
            rows=max(64, group_pad),
            block_n=64,
            block_s=max(_next_pow2(region_tokens), 16),
            d_pad=d_pad,
            upcast=dtype == torch.bfloat16,
            precision=precision,
            fwd=_SERIAL,
            dq=_SERIAL,
            dkdv=_SERIAL,
            region=_SERIAL,
        )
    tile = _fused_tile(dtype, device)
    if group_pad > tile.rows:
        raise ValueError(
            f"{group} query heads per KV head is more than the fused kernels' {tile.rows}-row "
            f"blocks hold for {dtype}; use backend='reference' or 'dense'"
        )
    return FusedLaunch(
        group=group,
        group_pad=group_pad,
        rows=tile.rows,
        block_n=tile.block_n,
        block_s=tile.block_s,
        d_pad=d_pad,
        upcast=False,
        precision=precision,
        fwd=tile.fwd,
        dq=tile.dq,
        dkdv=tile.dkdv,
        region=tile.region,
    )


@dataclass(frozen=True, kw_only=True)
class _Tile:
    rows: int
    block_n: int
    block_s: int
    fwd: KernelOptions
    dq: KernelOptions
    dkdv: KernelOptions
    region: KernelOptions


def _tile(rows, block_n, block_s, *, fwd, dq, dkdv, region) -> _Tile:
    def opts(warps_stages):
        return KernelOptions(num_warps=warps_stages[0], num_stages=warps_stages[1])

    return _Tile(
        rows=rows,
        block_n=block_n,
        block_s=block_s,
        fwd=opts(fwd),
        dq=opts(dq),
        dkdv=opts(dkdv),
        region=opts(region),
    )


# 16-bit tiles by per-block shared memory, the first row a device reaches; (warps, stages)
# per kernel. Untuned (no GPU has timed them yet); the compile test prints what each needs,
# e.g. bf16 at head dim 128, fwd / dq / dkdv / region bytes: sm_80 74240 / 107008 / 81920 /
# 90112, sm_90 107008 / 139776 / 114688 / 147456; sm_86 with the second row 57856 / 57344 /
# 40960 / 53248 (bench/RESULTS.md has every architecture).
_TILES_16BIT = (
    # sm_80, sm_87, sm_90, sm_100: 163 KB and more
    (163 * 1024, _tile(128, 64, 32, fwd=(8, 2), dq=(8, 2), dkdv=(8, 2), region=(8, 1))),
    # sm_86, sm_89, sm_120 (A10G, L4, L40S, RTX 30/40/50): 99 KB
    (99 * 1024, _tile(64, 64, 32, fwd=(4, 2), dq=(4, 1), dkdv=(4, 1), region=(4, 1))),
)
# fp32 dots run on the FMA units (input_precision "ieee", exact): a correctness path (tests,
# debugging), not a fast one; small tiles keep its registers, shared memory and compile time
# low (16 x 16: a quarter of the FMA code of 32 x 32)
_TILE_FP32 = _tile(16, 16, 16, fwd=(4, 1), dq=(4, 1), dkdv=(4, 1), region=(4, 1))


def _fused_tile(dtype: torch.dtype, device: DeviceSpec) -> _Tile:
    if dtype == torch.float32:
        return _TILE_FP32
    for smem, tile in _TILES_16BIT:
        if device.smem_per_block >= smem:
            return tile
    raise ValueError(
        f"{device.name}: {device.smem_per_block} bytes of shared memory per block is less than "
        f"any fused-kernel configuration needs; use backend='reference' or 'dense'"
    )


@dataclass(frozen=True, kw_only=True)
class DecodeLaunch:
    """Split-K decode: a program takes ``rows`` of the query heads that share one selection
    (the rows of its tl.dots; larger groups take several programs) and ``block_n`` keys per
    step; the merge kernel has its own options."""

    rows: int
    block_n: int
    d_pad: int
    upcast: bool
    precision: str
    fwd: KernelOptions
    merge: KernelOptions


def decode_launch(dtype: torch.dtype, head_dim: int, device: DeviceSpec) -> DecodeLaunch:
    """The decode kernels' configuration (the same for every group size)."""
    _check(dtype, head_dim, device)
    d_pad = head_dim_pad(head_dim, dtype, device)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if device.interpreted:
        # the interpreter pays per loop step; bf16 dots are upcast (see fused_launch)
        return DecodeLaunch(
            rows=DECODE_ROWS,
            block_n=64,
            d_pad=d_pad,
            upcast=dtype == torch.bfloat16,
            precision=precision,
            fwd=_SERIAL,
            merge=_SERIAL,
        )
    return DecodeLaunch(
        rows=DECODE_ROWS,
        block_n=32,
        d_pad=d_pad,
        upcast=False,
        precision=precision,
        fwd=KernelOptions(num_warps=4, num_stages=2 if dtype == torch.float32 else 3),
        merge=KernelOptions(num_warps=4, num_stages=1),
    )


def decode_splits(programs: int, keys: int, block_n: int, device: DeviceSpec) -> int:
    """Chunks of each (sequence, head) key list in the split-K decode, given the ``programs``
    one chunk takes: enough to fill the device (two programs per multiprocessor), at least a
    block of keys each, at most MAX_SPLITS."""
    wanted = -(-2 * device.multiprocessors // max(programs, 1))
    return max(1, min(wanted, -(-keys // block_n), MAX_SPLITS))


@dataclass(frozen=True, kw_only=True)
class DescriptorLaunch:
    block_s: int
    d_pad: int
    options: KernelOptions


def descriptor_launch(
    dtype: torch.dtype, head_dim: int, region_tokens: int, device: DeviceSpec
) -> DescriptorLaunch:
    """The region-mean kernel: a region's tokens ``block_s`` at a time."""
    _check(dtype, head_dim, device)
    d_pad = head_dim_pad(head_dim, dtype, device)
    if device.interpreted:
        return DescriptorLaunch(
            block_s=max(_next_pow2(region_tokens), 16), d_pad=d_pad, options=_SERIAL
        )
    return DescriptorLaunch(
        block_s=32, d_pad=d_pad, options=KernelOptions(num_warps=4, num_stages=2)
    )
