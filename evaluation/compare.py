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

from evaluation.pictures import draw_gaze  # noqa: E402
from evaluation.runner import EvalConfig, EvalReport, EvalSample, evaluate_samples  # noqa: E402
from evaluation.tracking import log_report, start_eval_run  # noqa: E402
from tracking.models import ResolvedModel  # noqa: E402

SWEEP_TAG = "gazeattn.sweep"
PARENT_TAG = "mlflow.parentRunId"
CHART_SIZE = (6.4, 4.0)  # inches, at 100 dpi
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
class SweepRow:
    label: str
    run_id: str | None
    entries: float  # visual KV entries per generated token
    entries_pct: float  # of dense
    accuracy: float
    hit_rate: float | None
    hit_rate_random: float | None
    flops_ratio: float


@dataclass(kw_only=True)
class SweepResult:
    rows: list[SweepRow]
    markdown: str
    chart: Path
    table: Path
    run_id: str | None  # the sweep run


def row_of(report: EvalReport, run_id: str | None, dense_entries: float) -> SweepRow:
    m = report.metrics
    entries = m["eval/visual_entries_per_token"]
    return SweepRow(
        label=report.config.label,
        run_id=run_id,
        entries=entries,
        entries_pct=100.0 * entries / dense_entries if dense_entries else 100.0,
        accuracy=m["eval/accuracy"],
        hit_rate=m.get("eval/routing_hit_rate"),
        hit_rate_random=m.get("eval/routing_hit_rate_random"),
        flops_ratio=m["eval/attention_flops_ratio"],
    )


def markdown_table(rows: list[SweepRow]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [
        "| attention | visual entries / token | % of dense | accuracy | routing hit rate "
        "| random routing | attention FLOPs vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.entries:.1f} | {r.entries_pct:.1f}% | {pct(r.accuracy)} "
            f"| {pct(r.hit_rate)} | {pct(r.hit_rate_random)} | {r.flops_ratio:.3f} |"
        )
    return "\n".join(lines) + "\n"


def draw_chart(rows: list[SweepRow], path: Path) -> Path:
    """Accuracy (and routing hit rate) against visual entries per token, one point per run."""
    fig, ax = plt.subplots(figsize=CHART_SIZE, dpi=CHART_DPI)
    gaze = [r for r in rows if r.label != "dense"]
    gaze.sort(key=lambda r: r.entries)
    ax.plot(
        [r.entries for r in gaze], [100 * r.accuracy for r in gaze], "o-", label="gaze accuracy"
    )
    hits = [r for r in gaze if r.hit_rate is not None]
    if hits:
        ax.plot([r.entries for r in hits], [100 * r.hit_rate for r in hits], "s--",
                label="gaze routing hit rate")  # fmt: skip
        ax.plot([r.entries for r in hits], [100 * r.hit_rate_random for r in hits], "x:",
                color="gray", label="random routing hit rate")  # fmt: skip
    for r in rows:
        if r.label == "dense":
            ax.axhline(100 * r.accuracy, color="black", linestyle="-.", label="dense accuracy")
            ax.plot([r.entries], [100 * r.accuracy], "k*", markersize=10)
    for r in gaze:
        ax.annotate(r.label, (r.entries, 100 * r.accuracy), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("visual KV entries per generated token")
    ax.set_ylabel("%")
    ax.set_ylim(-5, 105)
    ax.set_title("Accuracy vs visual entries attended")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
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
    client: MlflowClient | None = None,
    experiment: str = "gazeattn-compare",
    model_info: ResolvedModel | None = None,
    sweep_name: str = "compare",
    params: dict[str, object] | None = None,
) -> SweepResult:
    """Evaluate every point on the same samples; log each as a run when ``client`` is given."""
    out = Path(out_dir)
    parent = None
    if client is not None:
        if model_info is None:
            raise ValueError("model_info (the model's path or URI) is needed to log the sweep")
        parent = start_eval_run(client, experiment=experiment, run_name=sweep_name,
                                model=model_info, tags={SWEEP_TAG: sweep_name})  # fmt: skip
    reports = []
    for config in points:
        report = evaluate_samples(model, processor, samples, config)
        pictures = [
            draw_gaze(
                s, r, out / "pictures" / config.label / f"{s.id}.png", tokens=config.picture_tokens
            )  # fmt: skip
            for s, r in list(zip(samples, report.samples, strict=True))[: config.pictures]
            if r.routing
        ]
        run_id = None
        if client is not None:
            run_id = start_eval_run(
                client, experiment=experiment, run_name=f"{sweep_name}/{config.label}",
                model=model_info, tags={SWEEP_TAG: sweep_name, PARENT_TAG: parent},
            )  # fmt: skip
            log_report(client, run_id, report, pictures=pictures, params=params)
            client.set_terminated(run_id)
        reports.append((report, run_id))
    dense = next((r for r, _ in reports if r.config.attn == "dense"), None)
    dense_entries = (dense or reports[0][0]).metrics["eval/dense_entries_per_token"]
    rows = [row_of(r, run_id, dense_entries) for r, run_id in reports]
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
        client.log_param(parent, "sweep.points", ",".join(c.label for c in points))
        client.log_param(parent, "sweep.samples", len(samples))
        client.set_terminated(parent)
    return SweepResult(rows=rows, markdown=markdown, chart=chart, table=table, run_id=parent)
