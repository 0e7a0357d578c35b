"""The claim benchmark: what the demo cannot hold in its 10 minutes, each row with its 95%
interval, from one command (at most about an hour on 2 cores).

Every run is a recipe (``--base``) over configs/demo.yaml with one thing changed, trained and
scored in one process by ``bench/recipe.py`` (the job's model construction and schedules, the
evaluation's code), on the same generated data and held-out samples. Two recipes:

- ``demo`` (the default): configs/demo.yaml as it is, the question asked before the image,
  keep 20% without context tokens, from checkpoints/tiny-grid3q;
- ``colour-after``: the recipe of the first rows in bench/RESULTS.md (the colour question
  after the image, keep 10%, 4 context tokens, from checkpoints/tiny-grid3).

The runs, each over the recipe (one equal to the recipe itself is not run again):

- the paper's ablations at our scale: context tokens 0 / 1 / 4 / 16, region size (one token
  vs the demo's 2 x 2 = one cell), routing per KV head vs per query head;
- the progressive Top-K: sparse from the first step, a cosine warm-up of 150 steps, and one
  that waits for the loss (``top_k_schedule.start: loss``);
- a video whose answer is in one of 8 frames (every sample a video);
- a 4 x 4 grid (16 regions, keep 25%) and its dense twin, from checkpoints/tiny-grid4q (the
  demo's checkpoint at 64 px, pretrained densely on the 4 x 4 grid:
  configs/pretrain-tiny-grid4.yaml);
- from random weights instead of the pretrained checkpoint (the tiny model as the demo was
  before), with the step-started and the loss-started schedule.

Every run is trained once per seed (``--seeds``, default 0 1 2): seed s sets ``train.seed``,
``data.seed`` and ``data.synthetic.seed`` (new generated data, the checkpoint the same), as
the demo's seeds do. Each run's row: accuracy at its own budget per seed and pooled over
the seeds (95% Wilson interval of the pooled count), % of the dense entries, the last
layer's routing hit rate against random routing and its lift, and accuracy when the same
model routes to random regions at the same budget (means over the seeds); a second table
holds each seed's row with its own interval. Writes ``bench/results/claim-<base>.jsonl``
(``claim.jsonl`` for colour-after; one line per run and seed, as ``bench/recipe.py`` logs)
and the tables beside it (``.md``).

    python bench/claim.py [--base demo|colour-after] [--seeds 0 1 2] [--jobs 2] [--eval 500]
                          [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path("bench/results")
DATA = "/tmp/gazeattn-claim-data"
# the recipes the runs change one thing of (overrides of configs/demo.yaml), and what each is
BASES: dict[str, tuple[list[str], str]] = {
    "demo": ([], "the demo's recipe (asked first, keep 20%, no context tokens)"),
    # configs/demo.yaml before 2026-12-03 15:40: the first rows in bench/RESULTS.md
    "colour-after": (
        [
            "model.name_or_path=checkpoints/tiny-grid3",
            "model.gaze.keep_ratio=0.1",
            "model.gaze.num_context_tokens=4",
            "data.synthetic.question_first=false",
            "data.synthetic.train_questions=4",
            "data.synthetic.spaced_answers=false",
            "top_k_schedule.warmup_steps=150",
            "train.max_steps=400",
        ],
        "the earlier recipe (colour after the image, keep 10%, 4 context tokens)",
    ),
}
# (name, what it shows, overrides of configs/demo.yaml after the recipe's)
SCRATCH = [
    "model.name_or_path=tiny",
    'model.tiny_options={"image_size":48,"init_range":0.1}',
    "train.max_steps=3000",
    "optim.lr=2e-3",
    "top_k_schedule.warmup_steps=1200",
]
VIDEO = [
    "data.synthetic.video_fraction=1.0",
    "data.synthetic.frames=8",
    "model.visual_budget.frames_per_video=8",
    "data.synthetic.n_train=1500",
]
GRID4 = [
    "model.name_or_path=checkpoints/tiny-grid4q",
    "data.synthetic.grid=4",
    "data.synthetic.image_size=64",
    "data.synthetic.train_questions=1",
    "data.synthetic.question_first=true",
    "model.gaze.keep_ratio=0.25",
]
RUNS: list[tuple[str, str, list[str]]] = [
    ("recipe", "the recipe itself", []),
    ("dense-twin", "its dense twin", ["model.attn=dense"]),
    ("context-0", "no context tokens", ["model.gaze.num_context_tokens=0"]),
    ("context-1", "1 context token", ["model.gaze.num_context_tokens=1"]),
    ("context-4", "4 context tokens", ["model.gaze.num_context_tokens=4"]),
    ("context-16", "16 context tokens", ["model.gaze.num_context_tokens=16"]),
    ("regions-1x1", "regions of one token (36 per image)", ["model.gaze.region_size=[1,1,1]"]),
    ("query-head", "one selection per query head", ["model.gaze.routing=query_head"]),
    ("warmup-0", "sparse from the first step", ["top_k_schedule.warmup_steps=0"]),
    ("warmup-150", "a cosine warm-up of 150 steps", ["top_k_schedule.warmup_steps=150"]),
    ("warmup-loss", "the 150-step warm-up starts when the loss is at most 0.1",
     ["top_k_schedule.warmup_steps=150", "top_k_schedule.start=loss",
      "top_k_schedule.start_loss=0.1"]),
    ("video-8-frames", "videos only: the answer in one of 8 frames", VIDEO),
    ("grid-4x4", "a 4 x 4 grid at 64 px (16 regions), keep 25%", GRID4),
    ("grid-4x4-twin", "the 4 x 4 grid's dense twin", [*GRID4, "model.attn=dense"]),
    ("scratch-step", "from random weights, the step-started warm-up", SCRATCH),
    ("scratch-loss", "from random weights, the warm-up waits for loss <= 0.3",
     [*SCRATCH, "top_k_schedule.start=loss", "top_k_schedule.start_loss=0.3",
      "top_k_schedule.warmup_steps=600"]),
]  # fmt: skip


def seeded(sets: list[str], seed: int) -> list[str]:
    """A run's overrides for one seed: the training's, the data order's and the generated
    data's (the checkpoint stays)."""
    return [*sets, f"train.seed={seed}", f"data.seed={seed}", f"data.synthetic.seed={seed}"]


def _one(args: tuple[str, list[str], int, str]) -> dict:
    name, sets, eval_n, log = args
    import torch

    from bench.recipe import run

    torch.set_num_threads(1)
    return run(name, sets, eval_n=eval_n, log=log, data_root=DATA)


def plan(base: str, only: list[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(name, what, overrides) of each run over the recipe ``base``, its own settings last;
    a run whose configuration is the recipe's (e.g. no context tokens over the demo's) is
    left out: the recipe's own row is it."""
    from gazeattn.typed_config import to_dict
    from training.config import load_config

    recipe, what = BASES[base]

    def config(sets: list[str]) -> dict:
        return to_dict(load_config("configs/demo.yaml", [*recipe, *sets]))

    own = config([])
    return [
        (name, what if name == "recipe" else text, [*recipe, *sets])
        for name, text, sets in RUNS
        if (not only or name in only) and (name == "recipe" or config(sets) != own)
    ]


def summary_row(results: list[dict], what: str) -> str:
    """One table row of a run over its seeds: accuracy per seed, pooled (with the pooled
    count's interval), and the means of the routing columns."""
    from evaluation.compare import routing_lift
    from evaluation.metrics import wilson_interval

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    owns = [r["own"] for r in results]
    correct = sum(int(o["correct"]) for o in owns)
    n = sum(int(o["samples"]) for o in owns)
    low, high = wilson_interval(correct, n)
    hit, random = (
        mean([o.get("last_hit") for o in owns]),
        mean([o.get("last_random") for o in owns]),
    )
    lifts = [routing_lift(o.get("last_hit"), o.get("last_random")) for o in owns]
    lift = mean(lifts)
    shuffled = mean([r["random"]["accuracy"] if r.get("random") else None for r in results])
    cells = [
        results[0]["name"].split("/")[0],
        what,
        percent(mean([o["entries_ratio"] for o in owns])),
        " / ".join(f"{100 * o['accuracy']:.1f}" for o in owns),
        f"{100 * correct / n:.1f}% ({100 * low:.1f}-{100 * high:.1f})",
        percent(hit),
        percent(random),
        "-" if lift is None else f"{lift:.2f}",
        percent(shuffled),
        f"{mean([r['train_s'] for r in results]):.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


SUMMARY_HEADER = (
    "| run | what | % of dense entries | accuracy per seed | pooled (95% CI) "
    "| routing hit, last layer | random routing | lift | accuracy, routed at random "
    "| train s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def row(result: dict, what: str) -> str:
    """One table row of a run's result (one seed)."""
    from evaluation.compare import routing_lift
    from evaluation.metrics import wilson_interval

    own = result["own"]
    n = int(own["samples"])
    low, high = wilson_interval(int(own["correct"]), n)
    accuracy = f"{100 * own['accuracy']:.1f}% ({100 * low:.1f}-{100 * high:.1f})"
    hit, random = own.get("last_hit"), own.get("last_random")
    lift = routing_lift(hit, random)
    shuffled = result.get("random")
    cells = [
        result["name"],
        what,
        f"{100 * own['entries_ratio']:.1f}%",
        accuracy,
        "-" if hit is None else f"{100 * hit:.1f}%",
        "-" if random is None else f"{100 * random:.1f}%",
        "-" if lift is None else f"{lift:.2f}",
        "-" if shuffled is None else f"{100 * shuffled['accuracy']:.1f}%",
        f"{result['train_s']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| run | what | % of dense entries | accuracy (95% CI) | routing hit, last layer "
    "| random routing | lift | accuracy, routed at random | train s |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", choices=sorted(BASES), default="demo", help="the recipe")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--eval", type=int, default=500, help="held-out samples per run")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="each run once per seed"
    )
    parser.add_argument("--only", nargs="*", help="these runs (default: all)")
    parser.add_argument("--list", action="store_true", help="name the runs and stop")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    runs = plan(args.base, args.only)
    if args.list or not runs:
        for name, what, sets in plan(args.base):
            print(f"{name}: {what} {sets}")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "claim" if args.base == "colour-after" else f"claim-{args.base}"
    log = out / f"{stem}.jsonl"
    started = time.perf_counter()
    os.environ.setdefault("RECIPE_THREADS", "1")
    from bench.recipe import data_for
    from training.config import load_config

    jobs = [
        (f"{name}/seed{seed}", seeded(sets, seed), args.eval, str(log))
        for seed in args.seeds
        for name, _, sets in runs
    ]
    for _, sets, _, _ in jobs:  # each setting's data once, before runs share it
        data_for(load_config("configs/demo.yaml", sets), DATA)
    print(f"[claim] {len(jobs)} runs ({len(runs)} x seeds {args.seeds}), {args.jobs} at once")
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_one, jobs, chunksize=1)
    else:
        results = [_one(job) for job in jobs]
    what = {name: text for name, text, _ in runs}
    by_run = {name: [r for r in results if r["name"].split("/")[0] == name] for name in what}
    summary = [summary_row(rs, what[name]) for name, rs in by_run.items()]
    seeds = [row(r, what[r["name"].split("/")[0]]) for rs in by_run.values() for r in rs]
    table = "\n".join([SUMMARY_HEADER, *summary, "", HEADER, *seeds])
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"[claim] {len(results)} runs in {time.perf_counter() - started:.0f} s: {out}")


if __name__ == "__main__":
    main()
