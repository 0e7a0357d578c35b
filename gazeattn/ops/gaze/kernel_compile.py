"""Compile the Triton kernels for real GPUs on a machine without one.

Used by ``test_kernel_compile.py``; also a script that prints the shared memory of
every binary: ``python -m gazeattn.ops.gaze.kernel_compile [sm_80 sm_90 ...]``.

The launches are the real ones: in a worker process (without the interpreter)
``JITFunction.run`` is replaced by a recorder, the device spec the launch
configurations are picked from is the target GPU's, and the public entry points
(the fused forward and backward through autograd, the split-K decode, the region
descriptors) run on CPU tensors. Each recorded launch is specialised as Triton's
launcher specialises it (its own binder: argument types, divisibility and
alignment of the actual arguments, constexprs, options) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32), options)``,
which gives PTX, a cubin (Triton ships ptxas) and ``metadata.shared``.
Launches with the same specialisation are one binary and are compiled once.

This relies on two Triton internals, ``create_function_from_signature`` and
``JITFunction._pack_args`` (present from Triton 3.6 to 3.9): they are how the
launcher turns arguments into a compilation, so using them is what makes the
compiled binaries the ones a GPU would run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

# Per-block shared memory a kernel may use (opt-in), bytes: CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability", maximum amount of shared memory per
# thread block: 8.0: 163 KB, 8.6: 99 KB, 8.9: 99 KB, 9.0: 227 KB, 10.0: 227 KB, 12.0: 99 KB
# (KB = 1024 bytes; A100 166912, A10G/L4/L40S 101376, H100/H200 232448, B200 232448,
# RTX 50xx 101376).
ARCHS = {
    "sm_80": ((8, 0), 166912),
    "sm_86": ((8, 6), 101376),
    "sm_89": ((8, 9), 101376),
    "sm_90": ((9, 0), 232448),
    "sm_100": ((10, 0), 232448),
    "sm_120": ((12, 0), 101376),
}

DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIMS = (64, 80, 96, 128)
# (query heads, KV heads): GQA groups 1, 2, 4, 7 and 8
HEADS = ((2, 2), (4, 2), (8, 2), (7, 1), (16, 2))
ROUTINGS = ("kv_head", "query_head")
# regions of 6x6, 3x3 and 5x7 over grids that leave smaller edge regions
REGIONS = {"6x6": ((1, 6, 6), (13, 17)), "3x3": ((1, 3, 3), (7, 8)), "5x7": ((1, 5, 7), (11, 16))}


@dataclass(frozen=True)
class Case:
    """One call shape: every case runs the fused forward+backward, the decode and the
    descriptors. ``text`` varies the sequence length so lengths of every residue occur."""

    dtype: str
    head_dim: int
    heads: tuple[int, int]
    routing: str
    region: str
    text: int


def cases() -> list[Case]:
    """Every dtype x head dim x group (the arguments the launch configurations are chosen
    by); region sizes and routing modes (runtime arguments of the kernels) take turns, so
    each dtype and head dim meets all of them."""
    out = []
    for dtype in DTYPES:
        for dim in HEAD_DIMS:
            for hq, hkv in HEADS:
                i = len(out)
                region = list(REGIONS)[i % len(REGIONS)]
                # one head per KV head: both routing modes are the same selection
                routing = ROUTINGS[i % 2] if hq != hkv else "kv_head"
                out.append(Case(dtype, dim, (hq, hkv), routing, region, 3 + i % 17))
    return out


@contextmanager
def _worker_env(cache_dir: str):
    """The environment the spawned workers start with (they import Triton and this package
    before any initializer could run, and Triton decides interpreter or compiler as its own
    kernels are defined): compile for real targets, into a fresh cache so that nothing
    compiled earlier can hide a failure."""
    values = {"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache_dir}
    values.setdefault("TRITON_DEFAULT_FP_FUSION", os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _record(arch: tuple, batch: list[Case]) -> list[dict]:
    """Run ``batch`` with the launch configurations of ``arch`` (name, capability, shared
    memory per block); return each launch's compilation request (kernel, signature,
    constexprs, attrs, options) and the case it came from."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from gazeattn.ops.gaze import launch

    arch, capability, smem = arch
    spec = launch.DeviceSpec(
        name=arch, capability=capability, smem_per_block=smem, multiprocessors=132
    )
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    backend = make_backend(target)
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound, specialization, options
        )
        launches.append(
            {
                "kernel": f"{self.fn.__module__}:{self.fn.__name__}",
                "signature": signature,
                "constexprs": {str(list(k)): _plain(v) for k, v in constexprs.items()},
                "named": {self.arg_names[k[0]]: _plain(v) for k, v in constexprs.items()},
                "attrs": {str(list(k)): v for k, v in attrs.items()},
                "options": {
                    "num_warps": options.num_warps,
                    "num_stages": options.num_stages,
                },
            }
        )

    original = JITFunction.run
    JITFunction.run = record
    patched = _use_spec(spec)
    try:
        for case in batch:
            start = len(launches)
            _run_case(case, torch)
            for item in launches[start:]:
                item["case"] = case.__dict__ | {"heads": list(case.heads)}
    finally:
        JITFunction.run = original
        for module, fn in patched:
            module.device_spec = fn
    return launches


def _plain(value):
    return value.value if hasattr(value, "value") else value


def _use_spec(spec):
    """Make every kernel module pick its launch configuration for ``spec``."""
    from gazeattn.ops.gaze import decode_triton, descriptors, fused, launch

    patched = []
    for module in (fused, decode_triton, descriptors, launch):
        patched.append((module, module.device_spec))
        module.device_spec = lambda device, spec=spec: spec
    return patched


def _run_case(case: Case, torch) -> None:
    from gazeattn.ops import GazeConfig, Image, build_layout
    from gazeattn.ops.gaze.decode_triton import gaze_decode_triton
    from gazeattn.ops.gaze.descriptors import region_descriptors_triton
    from gazeattn.ops.gaze.fused import gaze_attention_triton

    region, (h, w) = REGIONS[case.region]
    layout = build_layout(
        [[case.text, Image(h, w), 5, Image(h - 2, w + 1), 4]],
        region_size=region,
        num_context_tokens=2,
    )
    config = GazeConfig(region_size=region, keep_ratio=0.3, routing=case.routing)
    dtype = getattr(torch, case.dtype)
    hq, hkv = case.heads
    t = layout.length
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, t, case.head_dim, generator=gen).to(dtype) for heads in (hq, hkv, hkv)
    )
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, _ = gaze_attention_triton(*leaves, layout, config)
    out.backward(torch.ones_like(out))
    with torch.no_grad():
        gaze_decode_triton(q[:, :, -1:], k, v, layout, config)
        region_descriptors_triton(k, layout)


def _compile(capability: tuple[int, int], request: dict) -> dict:
    """Compile one recorded launch for ``capability``: its shared memory and compile time."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = request["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)

    def path(key):
        return tuple(json.loads(key))

    source = ASTSource(
        kernel,
        request["signature"],
        {path(k): v for k, v in request["constexprs"].items()},
        {path(k): v for k, v in request["attrs"].items()},
    )
    start, cpu = time.perf_counter(), _cpu_seconds()
    compiled = triton.compile(source, target=target, options=dict(request["options"]))
    return {
        "shared": compiled.metadata.shared,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu_seconds() - cpu,
        "ptx": bool(compiled.asm.get("ptx")),
        "cubin": bool(compiled.asm.get("cubin")),
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as one)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def binary_key(request: dict) -> str:
    """What decides a binary: kernel, specialised signature, constexprs, attrs, options."""
    return json.dumps(
        {k: request[k] for k in ("kernel", "signature", "constexprs", "attrs", "options")},
        sort_keys=True,
    )


def compile_all(archs, case_list, *, workers: int | None = None, cache_dir: str) -> dict:
    """Record every case on every arch, compile each distinct binary once per arch.

    archs: names of ARCHS, or a dict {name: (capability, shared memory per block)}.
    Returns {arch: {"launches": [...], "binaries": {key: result}}}.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    archs = archs if isinstance(archs, dict) else {name: ARCHS[name] for name in archs}
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    results = {arch: {"launches": [], "binaries": {}} for arch in archs}
    with _worker_env(cache_dir), ProcessPoolExecutor(workers, mp_context=context) as pool:
        chunks = [case_list[i::workers] for i in range(workers)]
        recorded = {
            (arch, i): pool.submit(_record, (arch, *archs[arch]), chunk)
            for arch in archs
            for i, chunk in enumerate(chunks)
            if chunk
        }
        for (arch, _), future in recorded.items():
            results[arch]["launches"].extend(future.result())
        jobs = {}
        for arch, (capability, _) in archs.items():
            unique = {binary_key(r): r for r in results[arch]["launches"]}
            # the largest kernels first, so the pool's tail is short
            for key, request in sorted(unique.items(), key=lambda kv: _cost(kv[1])):
                jobs[(arch, key)] = pool.submit(_compile, capability, request)
        for (arch, key), future in jobs.items():
            results[arch]["binaries"][key] = future.result()
    return results


def _cost(request: dict) -> int:
    order = ["_gaze_bwd_dq_kernel", "_gaze_fwd_kernel", "_gaze_bwd_dkdv_kernel"]
    name = request["kernel"].split(":")[1]
    return order.index(name) if name in order else len(order)


def main(argv: list[str]) -> int:
    import tempfile

    archs = argv or list(ARCHS)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        results = compile_all(archs, cases(), cache_dir=cache)
    print(
        f"{'arch':<7} {'kernel':<14} {'dtype':<5} {'configuration':<58} {'shared':>7} {'limit':>7}"
    )
    for arch, res in results.items():
        rows = []
        requests = {binary_key(r): r for r in res["launches"]}
        for key, out in res["binaries"].items():
            req = requests[key]
            name = req["kernel"].split(":")[1].removeprefix("_gaze_").removesuffix("_kernel")
            sig = req["signature"]
            dtype = (sig.get("Q") or sig.get("K") or sig.get("OUT"))[1:]
            named = {k: v for k, v in req["named"].items() if k.isupper()}
            config = " ".join(f"{k}={v}" for k, v in named.items() if not isinstance(v, bool))
            opts = req["options"]
            config += f" warps={opts['num_warps']} stages={opts['num_stages']}"
            rows.append((name.lstrip("_"), dtype, config, out["shared"]))
        for name, dtype, config, shared in sorted(rows):
            print(f"{arch:<7} {name:<14} {dtype:<5} {config:<58} {shared:>7} {ARCHS[arch][1]:>7}")
    per_kernel = {}
    for res in results.values():
        for key, out in res["binaries"].items():
            name = json.loads(key)["kernel"].split(":")[1]
            n, secs, cpu = per_kernel.get(name, (0, 0.0, 0.0))
            per_kernel[name] = (n + 1, secs + out["seconds"], cpu + out["cpu_seconds"])
    for name, (n, secs, cpu) in per_kernel.items():
        print(f"{name}: {n} binaries, {secs:.0f} s compiling, {cpu:.0f} CPU s")
    print(f"workers: {_cpu_seconds():.0f} CPU s")
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
