"""One prepared GPU run (issue #15): ``make gpu-check``, i.e. ``PYTHONPATH=. python bench/gpu_check.py``.

On a fresh GPU machine with only this repository and no network, in more than 10 minutes
(the first run, an H200 on 2026-12-04: 1.5 minutes to the model step, which had not
finished its batch 32 after 6.5 more):

1. the environment: the GPU found (whatever it is), its compute capability and per-block
   shared memory, the library versions, the launch configurations the kernels pick on it,
   and that importing gazeattn pulls in no Ray, MLflow or DeepSpeed;
2. every kernel binary compiled for this GPU in parallel, by the compile test's recorder
   (``gazeattn/ops/gaze/kernel_compile.py``): shared memory per kernel against the device's limit.
   This fills the Triton cache the next steps use; the run then counts the binaries the
   GPU compiled on its own, i.e. that the recorder did not predict;
3. the ``gpu`` tests: compiled kernels against the reference, values and gradients;
4. ``bench/attention_gpu.py``: decode at batch 1/8/32 and training forward+backward at 1, 8
   and 32 frames x 576 against FlashAttention through SDPA, with the measured copy
   bandwidth and the fraction of it the decode kernel reaches;
5. the model as it ships, at a real size: a stock Qwen2.5-VL checkpoint whose decoder has
   Qwen2.5-VL-3B's shape (36 layers, hidden 2048, 16 query / 2 KV heads of 128, MLP 11008,
   vocabulary 151936), random bf16 weights, converted by ``load_model`` (the registered
   gaze attention, keep 16%), beside its dense twin and the stock model on SDPA, all
   through the serving engine in issue #24's regime (a): users each asking their own
   question about one video of 32 frames (16 x 576 visual tokens), 128 new tokens, the
   video's prefix warm in the prefix cache and the video processed once (a media cache, as a
   server's preparing process keeps it; the first run processed it for every request, which
   takes 0.8-1.4 s on our 2-core CPU), at batch 1/8/32; then training steps
   (forward, backward, AdamW) of the gaze and the stock model;

and writes bench/results/gpu_check.json, bench/results/attention_gpu.json and
bench/results/gpu_check.md, a block ready to paste into bench/RESULTS.md.

Needs torch and triton (plus transformers for step 5 and pytest for step 3; a missing one
fails its step with a message, the others still run). Exit status 0 only when every step
passed. Without a GPU it says so and exits 2; ``--rehearse`` instead runs every step at
toy sizes on the CPU (kernels interpreted) to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("ray", "mlflow", "deepspeed")


@dataclasses.dataclass(kw_only=True)
class Sizes:
    """What each step runs; ``REHEARSAL`` is small enough for the CPU interpreter."""

    frames: tuple[int, ...] = (1, 8, 32)
    batches: tuple[int, ...] = (1, 8, 32)
    model_frames: int = 32  # Qwen2.5-VL pairs frames: 16 x 576 visual tokens
    model_batches: tuple[int, ...] = (1, 8, 32)
    decode_tokens: int = 128
    train_steps: int = 3
    layers: int = 36
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 2
    intermediate: int = 11008
    vocab: int = 151936
    grid: int = 24
    attention_shape: dict | None = None  # overrides of bench/attention_gpu.py's constants
    compile_cases: int | None = None  # None: every case of the compile test


FULL = Sizes()
REHEARSAL = Sizes(
    frames=(1,),
    batches=(1,),
    model_frames=2,
    model_batches=(1, 2),
    decode_tokens=3,
    train_steps=1,
    layers=2,
    hidden=64,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab=512,
    grid=6,
    attention_shape={"HEADS": 4, "KV_HEADS": 2, "DIM": 32, "TEXT": 16, "GRID": 6},
    compile_cases=1,
)


class Step:
    """One step's outcome: ok, failed (with why) or skipped, its seconds and its figures."""

    def __init__(self, name: str):
        self.name, self.status, self.detail, self.data = name, "ok", "", {}
        self.seconds = 0.0

    def __enter__(self):
        print(f"\n== {self.name}", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, kind, err, tb):
        self.seconds = time.perf_counter() - self.start
        if err is not None:
            self.status, self.detail = "failed", f"{kind.__name__}: {err}"
            traceback.print_exception(kind, err, tb)
        print(f"-- {self.name}: {self.status} {self.detail} ({self.seconds:.0f} s)", flush=True)
        return True  # the next steps still run

    def fail(self, detail: str) -> None:
        self.status, self.detail = "failed", detail

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "seconds": round(self.seconds, 1),
            **self.data,
        }


def environment() -> dict:
    import torch
    import triton

    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": _version("transformers"),
        "pytest": _version("pytest"),
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    return info


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    from importlib.metadata import version

    return version(name)


def check_imports(step: Step) -> None:
    """gazeattn and its kernels import without Ray, MLflow or DeepSpeed (absent there)."""
    import gazeattn  # noqa: F401
    import gazeattn.ops.gaze.decode_triton  # noqa: F401
    import gazeattn.ops.gaze.descriptors  # noqa: F401
    import gazeattn.ops.gaze.fused  # noqa: F401

    loaded = sorted(m for m in HEAVY if m in sys.modules)
    step.data["heavy_modules_loaded"] = loaded
    if loaded:
        step.fail(f"importing gazeattn loaded {loaded}")


def launch_configs(step: Step, device) -> None:
    from gazeattn.ops.gaze import launch

    spec = launch.device_spec(device)
    step.data["device_spec"] = dataclasses.asdict(spec)
    configs = {}
    import torch

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        configs[f"fused {name} d128 gqa8"] = _plain(launch.fused_launch(dtype, 128, 8, 36, spec))
        configs[f"decode {name} d128"] = _plain(launch.decode_launch(dtype, 128, spec))
    step.data["launch_configs"] = configs
    print(f"device spec: {spec}")
    for key, value in configs.items():
        print(f"  {key}: {value}")


def _plain(config) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items()}


def precompile(step: Step, spec, cache: str, sizes: Sizes) -> None:
    """Every binary the compile test predicts for this GPU, compiled in parallel."""
    from gazeattn.ops.gaze import kernel_compile

    cases = kernel_compile.cases()[: sizes.compile_cases]
    name = f"sm_{spec.capability[0]}{spec.capability[1]}" if spec.capability else "sm_80"
    capability = spec.capability or (8, 0)
    smem = spec.smem_per_block or kernel_compile.ARCHS["sm_80"][1]
    workers = min(os.cpu_count() or 1, 16)
    res = kernel_compile.compile_all(
        {name: (capability, smem)}, cases, workers=workers, cache_dir=cache
    )[name]
    largest = {}
    for key, out in res["binaries"].items():
        kernel = json.loads(key)["kernel"].split(":")[1]
        largest[kernel] = max(largest.get(kernel, 0), out["shared"])
    step.data.update(
        arch=name,
        smem_limit=smem,
        binaries=len(res["binaries"]),
        largest_shared=largest,
    )
    for kernel, shared in sorted(largest.items()):
        print(f"  {kernel:<28} largest shared {shared:>7} of {smem}")
    over = {k: v for k, v in largest.items() if v > smem}
    if over:
        step.fail(f"over the shared-memory limit: {over}")


def cached_binaries(cache: str) -> set[str]:
    return {str(p.relative_to(cache)) for p in Path(cache).rglob("*.cubin")}


def gpu_tests(step: Step, timeout: int, rehearse: bool) -> None:
    if _version("pytest") is None:
        step.fail("pytest is not installed on this machine: the gpu tests did not run")
        return
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/ops", "-q", "-p", "no:cacheprovider"]
    cmd += ["--collect-only"] if rehearse else ["-rfE"]
    # this checkout first, then what the caller put on the path (packages carried there)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", tail)}
    step.data.update(summary=tail, counts=counts)
    if proc.returncode != 0:
        step.fail(f"pytest exit {proc.returncode}: {tail}")


def attention(step: Step, sizes: Sizes, out_dir: Path) -> str:
    import torch

    from bench import attention_gpu

    for name, value in (sizes.attention_shape or {}).items():
        setattr(attention_gpu, name, value)
    if not torch.cuda.is_available():
        # rehearsal: the CPU has neither FlashAttention nor a GiB to spare for the copy
        attention_gpu.copy_bandwidth = lambda device, gib=0.01: _copy_rate(gib)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    payload = attention_gpu.run(
        list(sizes.frames), list(sizes.batches), torch.bfloat16, 0.16, device=device
    )
    (out_dir / "attention_gpu.json").write_text(json.dumps(payload, indent=2))
    step.data["attention"] = payload
    return attention_gpu.markdown(payload)


def _copy_rate(gib: float) -> float:
    import torch

    from bench.common import time_ms

    src = torch.empty(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src), repeat=5) * 1e-3)


def build_checkpoint(sizes: Sizes, root: Path, dtype) -> Path:
    """A stock Qwen2.5-VL checkpoint with random weights in ``dtype``, saved as the hub
    ships one: a decoder of the sizes' shape (Qwen2.5-VL-3B's in the full run), a small
    vision tower, and frames of ``sizes.grid`` x ``sizes.grid`` merged tokens."""
    from gazeattn.tiny import build_stock

    return build_stock(
        root / "stock",
        family="qwen2.5-vl",
        image_size=sizes.grid * 2 * 14,  # patch 14, merged 2 x 2
        patch_size=14,
        hidden=sizes.hidden,
        layers=sizes.layers,
        heads=sizes.heads,
        kv_heads=sizes.kv_heads,
        intermediate=sizes.intermediate,
        vocab=sizes.vocab,
        dtype=dtype,
    )


def _video(sizes: Sizes) -> list:
    import numpy as np

    side = sizes.grid * 2 * 14
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(sizes.model_frames)
    ]


def _dense_twin(config):
    from gazeattn.ops import GazeConfig

    return GazeConfig(
        **{**config.to_dict(), "top_k": "all", "keep_ratio": None, "backend": "dense"}
    )


def model_train(model, processor, video, steps: int) -> dict:
    """Training steps (forward, backward, AdamW) on one sample: the video, a question and
    an answer, as the model's processor encodes it."""
    import torch

    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves?"}]},
        {"role": "assistant", "content": "the red circle, from left to right"},
    ]
    # what training feeds the model (training/single.py): the processor's collated batch
    batch = processor.collate([processor.encode_sample(messages, videos=[video])])
    inputs = {k: v.to(model.device) for k, v in batch.items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    try:
        for _ in range(steps + 1):  # the first step compiles and allocates
            _sync()
            start = time.perf_counter()
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()
            times.append(time.perf_counter() - start)
    finally:
        model.eval()
        del opt
    return {
        "tokens": int(inputs["input_ids"].shape[1]),
        "step_s": sorted(times[1:])[len(times[1:]) // 2],
        "loss": loss.item(),
    }


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_step(step: Step, sizes: Sizes, device) -> str:
    """The model as it ships: a stock Qwen2.5-VL checkpoint converted by ``load_model``
    (the registered gaze attention, its KV cache and region descriptors), its dense twin
    (the same weights, dense backend) and the stock model on SDPA, each through the
    serving engine in issue #24's regime (a): users asking their own questions about one
    video, its prefix warm in the prefix cache; then training steps."""
    import torch

    from bench.decode_model import same_video_questions
    from gazeattn.model import load_model
    from gazeattn.ops import GazeConfig

    if _version("transformers") is None:
        step.fail("transformers is not installed: no model step")
        return ""
    dtype = torch.bfloat16 if torch.cuda.is_available() else None
    video = _video(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        stock_dir = build_checkpoint(sizes, Path(tmp), dtype)
        gaze, processor = load_model(
            stock_dir, gaze=GazeConfig(keep_ratio=0.16), dtype=dtype, device=device
        )
        stock, stock_processor = load_model(stock_dir, dtype=dtype, device=device)
    gaze.eval()
    stock.eval()
    params = sum(p.numel() for p in stock.parameters())
    routed = gaze.gaze_config
    modes = {
        "gaze": (gaze, processor, routed),
        "dense twin": (gaze, processor, _dense_twin(routed)),
        "stock": (stock, stock_processor, None),
    }
    rows = []
    for batch in sizes.model_batches:
        row = {"batch": batch}
        for name, (model, proc, config) in modes.items():
            if config is not None:
                model.gaze_config = config
            try:
                row[name] = same_video_questions(model, proc, video, batch, sizes.decode_tokens)
            except torch.OutOfMemoryError as err:
                row[name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            _empty_cache()
        gaze.gaze_config = routed
        rows.append(row)
        print(f"  regime (a), batch {batch}: {row}", flush=True)
    prompt = len(
        processor.encode_sample(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}],
            videos=[video],
            add_generation_prompt=True,
        )
    )
    train = {}
    for name, model, proc in (("gaze", gaze, processor), ("stock", stock, stock_processor)):
        try:
            train[name] = model_train(model, proc, video, sizes.train_steps)
        except torch.OutOfMemoryError as err:
            train[name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        _empty_cache()
    print(f"  training: {train}")
    step.data["model"] = {
        "parameters": params, "prompt_tokens": prompt, "regime_a": rows, "train": train,
    }  # fmt: skip
    errors = [r[k]["error"] for r in rows for k in modes if "error" in r[k]]
    errors += [t["error"] for t in train.values() if "error" in t]
    if errors:
        step.fail("; ".join(errors))
    return model_markdown(step.data["model"], sizes)


def _empty_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_markdown(res: dict, sizes: Sizes) -> str:
    shape = "Qwen2.5-VL-3B text shape" if sizes == FULL else "A toy decoder (rehearsal)"
    modes = ("gaze", "dense twin", "stock")
    lines = [
        f"{shape}, random weights ({res['parameters'] / 1e9:.2f} B parameters: {sizes.layers} "
        f"layers, hidden {sizes.hidden}, {sizes.heads}/{sizes.kv_heads} heads, MLP "
        f"{sizes.intermediate}, vocabulary {sizes.vocab}), converted by `load_model` (keep "
        f"16%) and run by the serving engine. Regime (a): each user asks their own question "
        f"about one video of {sizes.model_frames} frames ({res['prompt_tokens']} prompt "
        f"tokens), {sizes.decode_tokens} new tokens; the video's prefix is cached for all "
        "three (the engine caches a stock model's prefix too).",
        "",
        "| batch | " + " | ".join(f"{m} decode tok/s" for m in modes)
        + " | gaze vs twin | gaze vs stock | gaze TTFT cold / hit s |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in res["regime_a"]:
        if any("error" in r[m] for m in modes):
            lines.append(f"| {r['batch']} | " + " | ".join(r[m].get("error", "") for m in modes))
            continue
        tps = {m: r[m]["decode_tokens_per_s"] for m in modes}
        g = r["gaze"]
        lines.append(
            f"| {r['batch']} | " + " | ".join(f"{tps[m]:.1f}" for m in modes)
            + f" | {tps['gaze'] / tps['dense twin']:.2f}x | {tps['gaze'] / tps['stock']:.2f}x"
            + f" | {g['ttft_cold_s']:.2f} / {g['ttft_second_s']:.2f} |"
        )  # fmt: skip
    t = res["train"]
    lines += ["", "| training step (fwd + bwd + AdamW), batch 1 | gaze s | stock s | "
              "gaze vs stock |", "|---|---|---|---|"]  # fmt: skip
    if "error" in t["gaze"] or "error" in t["stock"]:
        lines.append(f"| training | {t['gaze']} | {t['stock']} | |")
    else:
        ratio = t["stock"]["step_s"] / t["gaze"]["step_s"]
        lines.append(
            f"| {t['gaze']['tokens']} tokens | {t['gaze']['step_s']:.3f} | "
            f"{t['stock']['step_s']:.3f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def report(env: dict, steps: list[Step], blocks: dict[str, str]) -> str:
    gpu = env.get("gpu", {})
    name = gpu.get("name", "no GPU (rehearsal on CPU)")
    lines = [
        f"### {name}, {env['date'][:10]} (`make gpu-check`)",
        "",
        f"{name}, compute capability {gpu.get('capability', '-')}, "
        f"{gpu.get('multiprocessors', '-')} SMs, {gpu.get('memory_gib', '-')} GiB; torch "
        f"{env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers "
        f"{env['transformers']}.",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for s in steps:
        detail = s.detail or s.data.get("summary", "")
        if s.name == "precompile" and "binaries" in s.data:
            detail = (
                f"{s.data['binaries']} binaries for {s.data['arch']}, largest shared "
                f"{max(s.data['largest_shared'].values())} of {s.data['smem_limit']} B; "
                f"{s.data.get('unpredicted', '?')} compiled later that the recorder did not predict"
            )
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {detail} |")
    for title, block in blocks.items():
        if block:
            lines += ["", f"#### {title}", "", block]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results")
    parser.add_argument("--skip", nargs="*", default=[], help="steps to leave out")
    parser.add_argument("--test-timeout", type=int, default=300)
    args = parser.parse_args()
    if args.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        # compiled kernels; the same environment in this process, the compile workers and
        # pytest, so all of them share the Triton cache entries they make
        os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cache = tempfile.mkdtemp(prefix="gazeattn-triton-")
    os.environ["TRITON_CACHE_DIR"] = cache
    sys.path.insert(0, str(ROOT))
    import torch

    env = environment()
    print(json.dumps(env, indent=2))
    if not torch.cuda.is_available() and not args.rehearse:
        print(
            "\nno CUDA device found: gpu-check measures the compiled kernels and needs a GPU. "
            "On this machine only `--rehearse` (toy sizes on the CPU) runs."
        )
        return 2
    sizes = REHEARSAL if args.rehearse else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = args.out or (Path(tempfile.mkdtemp()) if args.rehearse else ROOT / "bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    steps, blocks = [], {}
    total = time.perf_counter()

    with Step("environment") as s:
        steps.append(s)
        check_imports(s)
        launch_configs(s, device)
    if "precompile" not in args.skip:
        with Step("precompile") as s:
            steps.append(s)
            from gazeattn.ops.gaze import launch

            spec = launch.device_spec(device) if not args.rehearse else launch.gpu_spec((8, 0))
            precompile(s, spec, cache, sizes)
    before = cached_binaries(cache)
    if "tests" not in args.skip:
        with Step("gpu tests") as s:
            steps.append(s)
            gpu_tests(s, args.test_timeout, args.rehearse)
    if "attention" not in args.skip:
        with Step("attention benchmark") as s:
            steps.append(s)
            blocks["Attention (bench/attention_gpu.py)"] = attention(s, sizes, out_dir)
    if "model" not in args.skip:
        with Step("model") as s:
            steps.append(s)
            blocks["A Qwen2.5-VL-3B-shaped decoder end to end"] = model_step(s, sizes, device)
    for s in steps:
        if s.name == "precompile":
            # compiled by the GPU run itself after the recorder's binaries (empty: the
            # recorder predicted every binary the tests, benchmarks and model ran)
            later = sorted(cached_binaries(cache) - before)
            s.data["unpredicted"] = len(later)
            s.data["unpredicted_binaries"] = later

    md = report(env, steps, blocks)
    (out_dir / "gpu_check.md").write_text(md)
    payload = {"environment": env, "steps": [s.as_dict() for s in steps]}
    (out_dir / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
    print("\n" + md)
    failed = [s.name for s in steps if s.status != "ok"]
    print(f"wrote {out_dir}/gpu_check.md and gpu_check.json in {time.perf_counter() - total:.0f} s")
    print("FAILED: " + ", ".join(failed) if failed else "all steps passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
