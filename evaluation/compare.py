"""Dense vs gaze at several budgets on the same samples: the paper-style table and chart.

Every point is its own MLflow run in one experiment (children of a sweep run, so the
MLflow UI's compare view shows them side by side); the sweep run holds the table
(``comparison/table.json`` as an MLflow table, ``comparison/table.md``) and the
accuracy-vs-entries chart (``comparison/accuracy_vs_entries.png``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from evaluation.metrics import wilson_interval  # noqa: E402
from evaluation.pictures import draw_gaze  # noqa: E402
from evaluation.runner import EvalConfig, EvalReport, EvalSample, evaluate_samples  # noqa: E402
from evaluation.tracking import log_report, start_eval_run  # noqa: E402
from tracking.models import ResolvedModel  # noqa: E402

SWEEP_TAG = "gazeattn.sweep"
PARENT_TAG = "mlflow.parentRunId"
CHART_SIZE = (9.6, 4.0)  # inches, at 100 dpi
CHART_DPI = 100
DEFAULT_POINTS = ("dense", 0.5, 0.25, 0.125)


def sweep_points(points=DEFAULT_POINTS, **common) -> list[EvalConfig]:
    """ "dense", keep ratios (floats) and top-K (ints) -> evaluation configs."""
    out = []
    for p in points:
        if p == "dense":
            out.append(EvalConfig(attn="dense", **common))
        elif isinstance(p, float):
            out.append(EvalConfig(keep_ratio=p, **common))
        else:
            out.append(EvalConfig(top_k=int(p), **common))
    return out


@dataclass(kw_only=True)
class SweepModel:
    """One model of a comparison and the points it is evaluated at."""

    name: str  # shown in the table ("gaze model", "dense twin"); "" for a one-model sweep
    model: object
    processor: object
    points: list[EvalConfig]
    info: ResolvedModel | None = None  # its path or URI, for MLflow


@dataclass(kw_only=True)
class SweepRow:
    model: str
    label: str
    run_id: str | None
    samples: int
    entries: float  # visual KV entries per generated token
    dense_entries: float  # the same for dense attention on the same tokens, counted alike
    entries_pct: float  # of dense
    accuracy: float
    accuracy_low: float  # 95% Wilson interval
    accuracy_high: float
    hit_rate: float | None  # the last routed layer's
    hit_rate_random: float | None  # the same layer's under uniform random routing
    flops_ratio: float

    @property
    def name(self) -> str:
        return f"{self.model}: {self.label}" if self.model else self.label

    @property
    def lift(self) -> float | None:
        """(hit - random) / (1 - random): 0 is random routing, 1 always finds the target."""
        return routing_lift(self.hit_rate, self.hit_rate_random)


def routing_lift(hit: float | None, random: float | None) -> float | None:
    """How far routing is from random (0) towards always hitting the target (1)."""
    if hit is None or random is None or random >= 1.0:
        return None
    return (hit - random) / (1.0 - random)


def last_layer_hits(metrics: dict[str, float]) -> tuple[float | None, float | None]:
    """(hit rate, random hit rate) of the last routed layer of an evaluation's metrics."""
    prefix = "eval/routing_hit_rate/layer_"
    layers = [int(k.removeprefix(prefix)) for k in metrics if k.startswith(prefix)]
    if not layers:
        return None, None
    last = max(layers)
    return metrics[f"{prefix}{last}"], metrics[f"eval/routing_hit_rate_random/layer_{last}"]


@dataclass(kw_only=True)
class SweepResult:
    rows: list[SweepRow]
    markdown: str
    chart: Path
    table: Path
    run_id: str | None  # the sweep run


def row_of(report: EvalReport, run_id: str | None, model: str = "") -> SweepRow:
    """One table row; its "% of dense" divides by the dense count of the same report (the same
    samples, tokens and context tokens on both sides)."""
    m = report.metrics
    entries, dense = m["eval/visual_entries_per_token"], m["eval/dense_entries_per_token"]
    n = len(report.samples)
    low, high = wilson_interval(sum(r.correct for r in report.samples), n)
    hit, random = last_layer_hits(m)
    return SweepRow(
        model=model,
        label=report.config.label,
        run_id=run_id,
        samples=n,
        entries=entries,
        dense_entries=dense,
        entries_pct=100.0 * entries / dense if dense else 100.0,
        accuracy=m["eval/accuracy"],
        accuracy_low=low,
        accuracy_high=high,
        hit_rate=hit,
        hit_rate_random=random,
        flops_ratio=m["eval/attention_flops_ratio"],
    )


def markdown_table(rows: list[SweepRow]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    counts = sorted({r.samples for r in rows})
    heading = " / ".join(str(c) for c in counts)
    lines = [
        f"{heading} held-out samples",
        "",
        "| model | attention | visual entries / token | % of dense | accuracy (95% CI) "
        "| routing hit, last layer | random routing | lift | attention FLOPs vs dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        accuracy = f"{pct(r.accuracy)} ({100 * r.accuracy_low:.1f}-{100 * r.accuracy_high:.1f})"
        lift = "-" if r.lift is None else f"{r.lift:.2f}"
        lines.append(
            f"| {r.model or '-'} | {r.label} | {r.entries:.1f} | {r.entries_pct:.1f}% "
            f"| {accuracy} | {pct(r.hit_rate)} | {pct(r.hit_rate_random)} | {lift} "
            f"| {r.flops_ratio:.3f} |"
        )
    return "\n".join(lines) + "\n"


def chart_size(rows: int) -> tuple[float, float]:
    """The chart's (width, height) in inches: taller than ``CHART_SIZE`` for many rows."""
    return CHART_SIZE[0], max(CHART_SIZE[1], 1.2 + 0.45 * rows)


def draw_chart(rows: list[SweepRow], path: Path) -> Path:
    """Two panels, one bar per row (its name and % of the dense entries on the y axis, so no
    label meets another): accuracy with its 95% interval, and the last layer's routing hit
    rate beside random routing's."""
    fig, (acc_ax, hit_ax) = plt.subplots(1, 2, figsize=chart_size(len(rows)), dpi=CHART_DPI,
                                         sharey=True)  # fmt: skip
    models = list(dict.fromkeys(r.model for r in rows))
    colours = [f"C{models.index(r.model)}" for r in rows]
    ys = list(range(len(rows)))[::-1]  # the first row on top
    acc_ax.barh(
        ys,
        [100 * r.accuracy for r in rows],
        # the interval's ends are rounded apart from the point at 0% and 100%: never below 0
        xerr=[
            [max(0.0, 100 * (r.accuracy - r.accuracy_low)) for r in rows],
            [max(0.0, 100 * (r.accuracy_high - r.accuracy)) for r in rows],
        ],
        color=colours,
        capsize=3,
    )
    for y, r, colour in zip(ys, rows, colours, strict=True):
        acc_ax.annotate(f"{100 * r.accuracy:.1f}%", (1, y), xytext=(2, 0),
                        textcoords="offset points", va="center", fontsize=7, color="white")  # fmt: skip
        if r.hit_rate is None:
            hit_ax.annotate("dense: no routing", (1, y), va="center", fontsize=7, color="gray")
            continue
        hit_ax.barh(y + 0.18, 100 * r.hit_rate, height=0.36, color=colour)
        hit_ax.barh(y - 0.18, 100 * r.hit_rate_random, height=0.36, color="lightgray")
        hit_ax.annotate(f"{100 * r.hit_rate:.0f}% (random {100 * r.hit_rate_random:.0f}%)",
                        (100 * r.hit_rate, y + 0.18), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)  # fmt: skip
    acc_ax.set_yticks(ys, [f"{r.name} ({r.entries_pct:.0f}% of dense)" for r in rows],
                      fontsize=7)  # fmt: skip
    counts = "/".join(str(c) for c in sorted({r.samples for r in rows}))
    acc_ax.set_title(f"accuracy and 95% interval, {counts} held-out samples", fontsize=8)
    hit_ax.set_title("routing hit rate, last layer (grey: random routing)", fontsize=8)
    for ax in (acc_ax, hit_ax):
        ax.set_xlim(0, 118)
        ax.set_xlabel("%", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=CHART_DPI)
    plt.close(fig)
    return path


def run_sweep(
    model,
    processor,
    samples: list[EvalSample],
    points: list[EvalConfig],
    out_dir: str | Path,
    *,
    model_info: ResolvedModel | None = None,
    **kwargs,
) -> SweepResult:
    """One model at every point, on the same samples (``compare_models`` with one model)."""
    entry = SweepModel(name="", model=model, processor=processor, points=points, info=model_info)
    return compare_models([entry], samples, out_dir, **kwargs)


def compare_models(
    models: list[SweepModel],
    samples: list[EvalSample],
    out_dir: str | Path,
    *,
    client: MlflowClient | None = None,
    experiment: str = "gazeattn-compare",
    sweep_name: str = "compare",
    params: dict[str, object] | None = None,
    progress: bool = False,
    parent_model: ResolvedModel | None = None,
) -> SweepResult:
    """Evaluate every model at each of its points on the same samples; log each as a run (the
    children of one sweep run holding the table and chart) when ``client`` is given.

    ``parent_model``: the model the sweep run is tagged with (default: the first model's)."""
    out = Path(out_dir)
    parent = None
    if client is not None:
        if any(m.info is None for m in models):
            raise ValueError("model_info (the model's path or URI) is needed to log the sweep")
        parent = start_eval_run(client, experiment=experiment, run_name=sweep_name,
                                model=parent_model or models[0].info,
                                tags={SWEEP_TAG: sweep_name})  # fmt: skip
    rows = []
    total = sum(len(m.points) for m in models)
    for entry in models:
        for config in entry.points:
            name = f"{entry.name}: {config.label}" if entry.name else config.label
            if progress:
                print(
                    f"[eval {len(rows) + 1}/{total}] {name} on {len(samples)} samples", flush=True
                )
            report = evaluate_samples(entry.model, entry.processor, samples, config)
            folder = (
                f"{entry.name.replace(' ', '-')}-{config.label}" if entry.name else config.label
            )
            pictures = [
                draw_gaze(
                    s, r, out / "pictures" / folder / f"{s.id}.png", tokens=config.picture_tokens
                )  # fmt: skip
                for s, r in list(zip(samples, report.samples, strict=True))[: config.pictures]
                if r.routing
            ]
            run_id = None
            if client is not None:
                run_id = start_eval_run(
                    client, experiment=experiment, run_name=f"{sweep_name}/{name}",
                    model=entry.info, tags={SWEEP_TAG: sweep_name, PARENT_TAG: parent},
                )  # fmt: skip
                log_report(client, run_id, report, pictures=pictures, params=params)
                client.set_terminated(run_id)
            rows.append(row_of(report, run_id, entry.name))
    markdown = markdown_table(rows)
    table = out / "comparison" / "table.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown)
    chart = draw_chart(rows, out / "comparison" / "accuracy_vs_entries.png")
    if client is not None:
        data = {f.name: [getattr(r, f.name) for r in rows] for f in dataclasses.fields(SweepRow)}
        client.log_table(parent, data=data, artifact_file="comparison/table.json")
        client.log_artifact(parent, str(table), "comparison")
        client.log_artifact(parent, str(chart), "comparison")
        client.log_param(parent, "sweep.points", ",".join(r.name for r in rows))
        client.log_param(parent, "sweep.samples", len(samples))
        client.set_terminated(parent)
    return SweepResult(rows=rows, markdown=markdown, chart=chart, table=table, run_id=parent)
