"""One prepared GPU run (issue #15): ``make gpu-check``, i.e. ``PYTHONPATH=. python bench/gpu_check.py``.

On a fresh GPU machine with only this repository and no network, in about 8 minutes:

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
5. a realistically shaped model, Qwen2.5-VL-3B's text decoder (36 layers, hidden 2048, 16
   query / 2 KV heads of 128, MLP 11008, vocabulary 151936) with random bf16 weights, over
   an 8-frame video prompt: prefill + greedy decode at batch 1/8/32, and training steps
   (forward, backward, AdamW), gaze against the same model on SDPA;

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
import warnings
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("ray", "mlflow", "deepspeed")


@dataclasses.dataclass(kw_only=True)
class Sizes:
    """What each step runs; ``REHEARSAL`` is small enough for the CPU interpreter."""

    frames: tuple[int, ...] = (1, 8, 32)
    batches: tuple[int, ...] = (1, 8, 32)
    model_frames: int = 8
    model_batches: tuple[int, ...] = (1, 8, 32)
    decode_tokens: int = 32
    train_steps: int = 3
    layers: int = 36
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 2
    intermediate: int = 11008
    vocab: int = 151936
    grid: int = 24
    text: int = 256
    attention_shape: dict | None = None  # overrides of bench/attention_gpu.py's constants
    compile_cases: int | None = None  # None: every case of the compile test


FULL = Sizes()
REHEARSAL = Sizes(
    frames=(1,),
    batches=(1,),
    model_frames=1,
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
    text=8,
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
    env = dict(os.environ, PYTHONPATH=str(ROOT))
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


# the gaze attention function the model step registers with transformers: a text decoder
# (Qwen2) calls it with q [B, Hq, T, D] and k/v [B, Hkv, T, D]; the layout and the cached
# region descriptors (computed at prefill, as the gaze KV cache does) live here
_MODEL_STATE: dict = {}


def _gaze_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    import torch

    from gazeattn.ops import gaze_attention
    from gazeattn.ops.gaze.descriptors import region_descriptors_triton

    layout, config = _MODEL_STATE["layout"], _MODEL_STATE["config"]
    cached = _MODEL_STATE["descriptors"]
    if query.shape[2] == key.shape[2]:
        # prefill or training: descriptors from this call's visual keys
        descriptors = region_descriptors_triton(key[:, :, : layout.length].detach(), layout)
        if not torch.is_grad_enabled():
            cached[module.layer_idx] = descriptors
    else:
        descriptors = cached[module.layer_idx]
    out, _ = gaze_attention(
        query, key, value, layout, config, scale=scaling, descriptors=descriptors
    )
    return out.transpose(1, 2).contiguous(), None


def build_model(sizes: Sizes, device):
    import torch
    from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM

    AttentionInterface.register("gaze_check", _gaze_attention)
    config = Qwen2Config(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    # random weights made in bf16 on the device: no fp32 copy of 3B parameters
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _set_attention(model, name: str) -> None:
    # every layer reads the shared config's implementation at each call
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):
        model.config._attn_implementation = name
    assert model.config._attn_implementation == name


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# transformers 5.24 renames the forward's past_key_values to cache and warns; the GPU
# machine's 5.17 may predate the new name, so the old one (kept until 5.40) is used
warnings.filterwarnings(
    "ignore", message=".*past_key_values. is deprecated", category=FutureWarning
)


def model_decode(model, layout, batch: int, tokens: int, attn: str) -> dict:
    import torch
    from transformers import DynamicCache

    from gazeattn.ops import GazeConfig

    _set_attention(model, attn)
    _MODEL_STATE.update(layout=layout, config=GazeConfig(keep_ratio=0.16), descriptors={})
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, layout.length), generator=gen)
    ids = ids.to(model.device)
    cache = DynamicCache()
    with torch.no_grad():
        _sync()
        start = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync()
        prefill = time.perf_counter() - start
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        # the first step warms up the decode kernels; time the rest
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync()
        start = time.perf_counter()
        for _ in range(tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync()
        rate = batch * tokens / (time.perf_counter() - start)
    return {"prefill_s": prefill, "decode_tokens_per_s": rate}


def model_train(model, layout, steps: int, attn: str) -> dict:
    import torch

    from gazeattn.ops import GazeConfig

    _set_attention(model, attn)
    _MODEL_STATE.update(layout=layout, config=GazeConfig(keep_ratio=0.16), descriptors={})
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, layout.length), generator=gen)
    ids = ids.to(model.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    try:
        for _ in range(steps + 1):  # the first step compiles and allocates
            _sync()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()
            times.append(time.perf_counter() - start)
    finally:
        model.eval()
        del opt
    return {"step_s": sorted(times[1:])[len(times[1:]) // 2], "loss": loss.item()}


def model_step(step: Step, sizes: Sizes, device) -> str:
    import torch

    from gazeattn.ops import Video, build_layout

    if _version("transformers") is None:
        step.fail("transformers is not installed: no model step")
        return ""
    model = build_model(sizes, device)
    params = sum(p.numel() for p in model.parameters())
    seq = [sizes.text // 2, Video(sizes.model_frames, sizes.grid, sizes.grid), sizes.text // 2]
    rows = []
    for batch in sizes.model_batches:
        layout = build_layout([seq] * batch, num_context_tokens=4).to(device)
        row = {"batch": batch, "tokens": layout.length}
        for name, attn in (("gaze", "gaze_check"), ("dense", "sdpa")):
            try:
                row[name] = model_decode(model, layout, batch, sizes.decode_tokens, attn)
            except torch.OutOfMemoryError as err:
                row[name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            _empty_cache()
        rows.append(row)
        print(f"  decode batch {batch}: {row}")
    layout = build_layout([seq], num_context_tokens=4).to(device)
    train = {"tokens": layout.length}
    for name, attn in (("gaze", "gaze_check"), ("dense", "sdpa")):
        try:
            train[name] = model_train(model, layout, sizes.train_steps, attn)
        except torch.OutOfMemoryError as err:
            train[name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        _empty_cache()
    print(f"  training: {train}")
    step.data["model"] = {"parameters": params, "decode": rows, "train": train}
    errors = [r[k]["error"] for r in rows for k in ("gaze", "dense") if "error" in r[k]]
    errors += [train[k]["error"] for k in ("gaze", "dense") if "error" in train[k]]
    if errors:
        step.fail("; ".join(errors))
    return model_markdown(step.data["model"], sizes)


def _empty_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_markdown(res: dict, sizes: Sizes) -> str:
    shape = "Qwen2.5-VL-3B text shape" if sizes == FULL else "A toy decoder (rehearsal)"
    lines = [
        f"{shape}, random bf16 weights ({res['parameters'] / 1e9:.2f} B "
        f"parameters: {sizes.layers} layers, hidden {sizes.hidden}, {sizes.heads}/{sizes.kv_heads} "
        f"heads), prompt of {sizes.text} text tokens and {sizes.model_frames} frames x "
        f"{sizes.grid * sizes.grid} (+4 context tokens each), keep 16%; dense = the same model "
        "on SDPA.",
        "",
        "| batch | prompt tokens | gaze prefill s | dense prefill s | gaze decode tok/s | "
        "dense decode tok/s | gaze vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["decode"]:
        g, d = r["gaze"], r["dense"]
        if "error" in g or "error" in d:
            lines.append(
                f"| {r['batch']} | {r['tokens']} | {g.get('error', '')} {d.get('error', '')} |"
            )
            continue
        lines.append(
            f"| {r['batch']} | {r['tokens']} | {g['prefill_s']:.2f} | {d['prefill_s']:.2f} | "
            f"{g['decode_tokens_per_s']:.1f} | {d['decode_tokens_per_s']:.1f} | "
            f"{g['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x |"
        )
    t = res["train"]
    lines += [
        "",
        "| training step (fwd + bwd + AdamW), batch 1 | gaze s | dense s | gaze vs dense |",
    ]
    lines.append("|---|---|---|---|")
    if "error" in t["gaze"] or "error" in t["dense"]:
        lines.append(f"| {t['tokens']} tokens | {t['gaze']} | {t['dense']} | |")
    else:
        ratio = t["dense"]["step_s"] / t["gaze"]["step_s"]
        lines.append(
            f"| {t['tokens']} tokens | {t['gaze']['step_s']:.3f} | {t['dense']['step_s']:.3f} | "
            f"{ratio:.2f}x |"
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
