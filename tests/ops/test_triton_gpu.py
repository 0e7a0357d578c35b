"""The compiled Triton kernels on a CUDA GPU against the fp32 reference (values and gradients).

These run only where a GPU is (marker ``gpu``; tests/conftest.py then leaves the interpreter
off). Their shapes reach what the interpreter never runs: bf16 and fp16 straight into
``tl.dot``, 128-row blocks with 8 warps (64 rows on 99 KB GPUs), pipelined loads, sequences
long enough for many query blocks and whole unmasked key tiles, the decode's 32-key tiles
with as many chunks as the GPU's size asks for (and the 64-chunk maximum), groups of more
than 16 query heads. Tolerances are the CPU tests' (same dicts).
"""

from __future__ import annotations

import pytest
import torch

from gazeattn.ops import GazeConfig, Image, Video, build_layout, region_descriptors
from gazeattn.ops.gaze import launch
from gazeattn.ops.gaze.descriptors import region_descriptors_triton
from tests.ops.test_triton_decode import check_decode
from tests.ops.test_triton_gaze import check_against_reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# two sequences, left padded: an image, a 4-frame video and a ragged 6-frame one (T = 3022)
LONG = [[40, Image(24, 24), 17, Video(4, 24, 24), 65], [7, Video(6, 13, 17), 120]]
REGIONS = {"6x6": (1, 6, 6), "3x3": (1, 3, 3), "5x7": (1, 5, 7)}


def _ids(x):
    return str(x).removeprefix("torch.") if isinstance(x, torch.dtype) else None


def test_device_spec_matches_the_table():
    """The shared-memory table the launch configurations are chosen by is this GPU's."""
    spec = launch.device_spec(torch.device("cuda"))
    props = torch.cuda.get_device_properties(0)
    print(f"{spec.name}: sm_{spec.capability[0]}{spec.capability[1]}, {spec.smem_per_block} B")
    assert spec.capability == (props.major, props.minor)
    if spec.capability in launch.SMEM_PER_BLOCK:
        assert spec.smem_per_block == launch.SMEM_PER_BLOCK[spec.capability]
    lc = launch.fused_launch(torch.bfloat16, 128, 8, 36, spec)
    assert not lc.upcast and lc.rows in (64, 128)


@pytest.mark.parametrize("routing", ["kv_head", "query_head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_fused_long_sequences(dtype, routing):
    """Qwen3-4B-like heads (32 / 8, dim 128) over 3022 positions."""
    layout = build_layout(LONG, num_context_tokens=4, padding_side="left")
    config = GazeConfig(keep_ratio=0.16, routing=routing)
    check_against_reference(layout, config, 32, 8, dim=128, dtype=dtype, seed=1, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_ids)
@pytest.mark.parametrize(
    "dim,heads,region,routing",
    [
        (64, (16, 2), "3x3", "kv_head"),
        (80, (7, 1), "5x7", "query_head"),
        (96, (4, 2), "6x6", "query_head"),
        (128, (2, 2), "5x7", "kv_head"),
        (64, (8, 8), "6x6", "kv_head"),
        (128, (16, 2), "3x3", "query_head"),
    ],
    ids=[
        "d64-gqa8-3x3",
        "d80-gqa7-5x7",
        "d96-gqa2-6x6",
        "d128-gqa1-5x7",
        "d64-mha-6x6",
        "d128-gqa8-3x3",
    ],
)
def test_fused_head_dims_groups_regions(dim, heads, region, routing, dtype):
    """Head dims 64 to 128 (80 and 96 padded to 128), GQA groups 1 to 8, ragged regions."""
    seqs = [[33, Image(24, 24), 9, Video(2, 18, 20), 21], [5, Image(17, 23), 60]]
    size = REGIONS[region]
    layout = build_layout(seqs, region_size=size, num_context_tokens=4, padding_side="right")
    config = GazeConfig(region_size=size, keep_ratio=0.25, routing=routing)
    hq, hkv = heads
    check_against_reference(layout, config, hq, hkv, dim=dim, dtype=dtype, seed=dim, device="cuda")


@pytest.mark.parametrize("routing", ["kv_head", "query_head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_decode_batch(dtype, routing):
    """Three sequences of different lengths, chunks chosen from the GPU's size."""
    seqs = [[40, Video(8, 24, 24), 17], [5, Image(24, 24), 60], [3, Video(2, 13, 17), 9]]
    layout = build_layout(seqs, padding_side="left")
    config = GazeConfig(keep_ratio=0.16, routing=routing)
    check_decode(layout, config, 32, 8, dim=128, dtype=dtype, seed=2, device="cuda")


@pytest.mark.parametrize(
    "dim,heads,splits",
    [(64, (16, 2), 64), (80, (40, 2), None), (128, (7, 1), 5), (96, (4, 4), 1)],
    ids=["d64-gqa8-64chunks", "d80-gqa20", "d128-gqa7-5chunks", "d96-gqa1-1chunk"],
)
def test_decode_shapes(dim, heads, splits):
    layout = build_layout([[9, Video(4, 24, 24), 5], [2, Image(13, 19), 30]], padding_side="left")
    config = GazeConfig(keep_ratio=0.2)
    hq, hkv = heads
    kw = {} if splits is None else {"num_splits": splits}
    check_decode(layout, config, hq, hkv, dim=dim, dtype=torch.bfloat16, device="cuda", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("region", list(REGIONS))
def test_region_descriptors(region, dtype):
    size = REGIONS[region]
    layout = build_layout([[3, Video(3, 24, 24), 2, Image(13, 5), 1]], region_size=size)
    layout = layout.to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1, 4, layout.length, 128, generator=gen, device="cuda").to(dtype)
    got = region_descriptors_triton(k, layout)
    torch.testing.assert_close(got, region_descriptors(k, layout), atol=1e-6, rtol=1e-6)
