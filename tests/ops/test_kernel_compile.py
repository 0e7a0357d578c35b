"""Every Triton kernel, at every launch configuration the compiled path picks, compiles for
sm_80 to sm_120 and fits the architecture's per-block shared memory (no GPU needed).

The launches are recorded from the public entry points with the target GPU's device spec
(``gazeattn/ops/gaze/kernel_compile.py``): the same launch-config functions, block tables and
arguments a GPU run would use. Cases: bf16, fp16 and fp32; head dims 64, 80, 96 and 128;
GQA groups 1, 2, 4, 7 and 8; regions of 6x6, 3x3 and 5x7 with smaller edge regions; both
routing modes. Group, region and head sizes and lengths are runtime arguments, not
specialised: they do not change the binary, so the launches of one configuration are one
binary (``test_shapes_do_not_change_the_binary`` checks it) and are compiled once per
architecture. Head dims above 128 are a clear error (``test_wide_heads_are_an_error``).

Triton ships ptxas 12.9, which assembles sm_100 and sm_120 too, so both are covered. A fresh
Triton cache per run: nothing compiled before can hide a failure.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from gazeattn.ops import GazeConfig, Image, build_layout
from gazeattn.ops.gaze import launch
from gazeattn.ops.gaze.fused import gaze_attention_triton
from gazeattn.ops.gaze.kernel_compile import ARCHS, HEAD_DIMS, binary_key, cases, compile_all

# the fused kernels and the FusedLaunch options each runs with
FUSED = {
    "_gaze_fwd_kernel": "fwd",
    "_gaze_bwd_dq_kernel": "dq",
    "_gaze_bwd_dkdv_kernel": "dkdv",
    "_gaze_bwd_region_kernel": "region",
}
KERNELS = {
    *FUSED,
    "_gaze_decode_fwd_kernel",
    "_gaze_decode_merge_kernel",
    "_region_mean_fwd_kernel",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_all(list(ARCHS), cases(), cache_dir=str(tmp_path_factory.mktemp("triton")))


def _name(request: dict) -> str:
    return request["kernel"].split(":")[1]


def test_smem_table_matches_the_launch_table():
    """The test's figures (with their source) and the ones the configs are picked by agree."""
    for arch, (capability, smem) in ARCHS.items():
        assert launch.SMEM_PER_BLOCK[capability] == smem, arch
        assert launch.gpu_spec(capability).smem_per_block == smem


def test_every_kernel_compiles_and_fits(compiled):
    table = []
    for arch, (_, limit) in ARCHS.items():
        res = compiled[arch]
        launched = {_name(r) for r in res["launches"]}
        assert launched == KERNELS, f"{arch}: kernels not launched: {KERNELS - launched}"
        for key, out in res["binaries"].items():
            request = json.loads(key)
            assert out["ptx"] and out["cubin"], f"{arch} {_name(request)}: no PTX or cubin"
            table.append((arch, _name(request), request["constexprs"], out["shared"], limit))
    over = [row for row in table if row[3] > row[4]]
    print("\n".join(f"{a} {n} {c} shared {s} / {lim}" for a, n, c, s, lim in table))
    assert not over, "shared memory over the per-block limit:\n" + "\n".join(map(str, over))


def test_compiled_path_settings(compiled):
    """Each launch ran with what the launch-config functions give its device: on GPUs bf16
    goes into tl.dot as is (no upcast), 16-bit tiles of 128 rows and 8 warps where 163 KB+
    of shared memory allow, 64 rows and 4 warps on 99 KB GPUs, decode tiles of 32 keys."""
    for arch, (capability, smem) in ARCHS.items():
        spec = launch.gpu_spec(capability)
        for request in compiled[arch]["launches"]:
            name, named, case = _name(request), request["named"], request["case"]
            dtype = getattr(torch, case["dtype"])
            group = case["heads"][0] // case["heads"][1]
            if name in FUSED:
                lc = launch.fused_launch(dtype, case["head_dim"], group, 36, spec)
                assert named["UPCAST"] is False and named["ROWS"] == lc.rows
                narrow = case["head_dim"] == 64 and dtype != torch.float32
                assert named["D_PAD"] == lc.d_pad == (64 if narrow else 128)
                assert request["options"] == getattr(lc, FUSED[name]).kwargs()
                if dtype != torch.float32:
                    assert (lc.rows, lc.fwd.num_warps) == ((128, 8) if smem > 2**17 else (64, 4))
                else:
                    assert (lc.rows, lc.block_n, lc.fwd.num_warps) == (16, 16, 4)
            elif name == "_gaze_decode_fwd_kernel":
                lc = launch.decode_launch(dtype, case["head_dim"], spec)
                assert named["UPCAST"] is False and named["D_PAD"] == lc.d_pad
                assert (named["ROWS"], named["BLOCK_N"]) == (lc.rows, lc.block_n) == (16, 32)
                assert request["options"] == lc.fwd.kwargs()


def test_shapes_do_not_change_the_binary(compiled):
    """Launches of one configuration (kernel, pointer types, constexprs, options) are one
    binary, reached from several head dims, groups and region sizes."""
    for arch in ARCHS:
        binaries = defaultdict(set)
        shapes = defaultdict(set)
        for request in compiled[arch]["launches"]:
            pointers = tuple(v for v in request["signature"].values() if v.startswith("*"))
            config = (_name(request), pointers, json.dumps(request["named"]))
            config += (json.dumps(request["options"]),)
            binaries[config].add(binary_key(request))
            case = request["case"]
            shapes[config].add((case["head_dim"], tuple(case["heads"]), case["region"]))
        for config, keys in binaries.items():
            assert len(keys) == 1, f"{arch} {config}: {len(keys)} binaries for one configuration"
        # e.g. the forward at head dim 80, 96 and 128, every group and region size: one binary
        wide = [c for c in binaries if c[0] == "_gaze_fwd_kernel" and '"D_PAD": 128' in c[2]]
        assert wide and all(len(shapes[c]) >= 3 * 5 for c in wide)
        assert len(compiled[arch]["binaries"]) == len(binaries)


def test_medium_gpus_train_at_head_dim_128(compiled):
    """sm_86 / sm_89 (A10G, L4, L40S): the backward kernels at head dim 128 fit 99 KB."""
    for arch in ("sm_86", "sm_89"):
        fits = {
            _name(json.loads(key))
            for key, out in compiled[arch]["binaries"].items()
            if '"*bf16"' in key and out["shared"] <= ARCHS[arch][1]
        }
        assert {"_gaze_bwd_dq_kernel", "_gaze_bwd_dkdv_kernel", "_gaze_bwd_region_kernel"} <= fits


@pytest.mark.parametrize("dim", [160, 256])
def test_wide_heads_are_an_error(dim):
    spec = launch.gpu_spec((9, 0))
    with pytest.raises(ValueError, match=f"head dim {dim} is wider"):
        launch.fused_launch(torch.bfloat16, dim, 4, 36, spec)
    with pytest.raises(ValueError, match=f"head dim {dim} is wider"):
        launch.decode_launch(torch.bfloat16, dim, spec)
    with pytest.raises(ValueError, match=f"head dim {dim} is wider"):
        launch.descriptor_launch(torch.bfloat16, dim, 36, spec)
    layout = build_layout([[3, Image(6, 6), 4]])
    q = torch.randn(1, 2, layout.length, dim)
    with pytest.raises(ValueError, match="backend='reference'"):
        gaze_attention_triton(q, q, q, layout, GazeConfig(top_k=1))
    assert max(HEAD_DIMS) == launch.MAX_HEAD_DIM


def test_unsupported_devices_are_an_error():
    old = launch.DeviceSpec(name="T4", capability=(7, 5), smem_per_block=65536, multiprocessors=40)
    with pytest.raises(ValueError, match="below the Triton kernels' sm_80"):
        launch.fused_launch(torch.float16, 64, 2, 36, old)
    small = launch.DeviceSpec(name="x", capability=(8, 0), smem_per_block=65536, multiprocessors=1)
    with pytest.raises(ValueError, match="less than any fused-kernel configuration"):
        launch.fused_launch(torch.float16, 64, 2, 36, small)
    with pytest.raises(ValueError, match="32 query heads per KV head"):
        launch.fused_launch(torch.float32, 64, 32, 36, launch.gpu_spec((9, 0)))
