"""``crosstower compare DIR... [--out REPORT] [--seeds]``: finished runs side by side.

The report folder holds ``report.md`` (one row per run: test metrics exhaustive and served, the
index that served them, training time with the teacher's, epochs, bytes stored per item and
multiply-adds per scored pair), ``accuracy_vs_cost.png`` (served Recall@50 against the cost of
scoring one pair as served: none through a sparse code index) and ``validation.png`` (each run's validation metric per epoch, from its
history), and ``runs.json``, what the report read of each run. An earlier report folder given in
place of a run brings in its runs from that file: runs trained on different days or machines,
whose folders are not all at hand, go into one table and plot. With ``--seeds``, runs whose
configs differ only in ``train.seed`` share one row: mean ± sample standard deviation over the
seeds.

Everything is read from the runs' ``metrics.json``; only a run written before the serving cost
was recorded there is opened (with its data set) to measure it (:mod:`crosstower.cost`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosstower.errors import CrosstowerError
from crosstower.files import replace_dir
from crosstower.run_dir import RunFolder, open_run

RANKING = (("test", "recall@20"), ("test", "recall@50"), ("test", "ndcg@50"), ("test_served", "recall@50"))
POINTWISE = (("test", "auc"), ("test", "gauc"), ("test", "logloss"))
REPORT, COST_PLOT, CURVE_PLOT, RUNS = "report.md", "accuracy_vs_cost.png", "validation.png", "runs.json"


@dataclass
class RunSummary:
    """What the report shows of one run."""

    path: Path
    name: str
    model: str
    method: str
    dataset: str
    protocol: str
    metrics: dict[str, dict[str, float]]
    served_by: str
    train_seconds: float  # the run's own training (with what a distillation computed once)
    teacher_seconds: float
    epochs: int
    cost: dict[str, float | None]
    seed: int
    group_key: str  # the config without its seed and runtime settings
    curve: list[float] = field(default_factory=list)  # the early-stopping metric per epoch
    curve_metric: str = ""


def summarize(run_dir: Path, data_dir: Path | None = None) -> RunSummary:
    """Read one finished run (and measure its serving cost if its metrics.json predates it)."""
    folder = RunFolder(run_dir)
    saved = folder.read_metrics()
    config, timing = saved["config"], saved["timing"]
    cost = saved.get("cost")
    if cost is None and saved["protocol"] != "p4":
        from crosstower.cost import serving_cost

        run = open_run(run_dir, data_dir)
        cost = serving_cost(run.model, saved["model"], saved["index"], run.split.test, run.config.train.history_length)
    distill = config.get("distill") or {}
    metric = config.get("evaluate", {}).get("early_stopping_metric", "recall@50")
    curve_key = f"val_{metric}" if saved["protocol"] != "p4" else "val_auc"
    return RunSummary(
        path=Path(run_dir), name=Path(run_dir).name, model=saved["model"],
        method=distill.get("method", "-"), dataset=saved["dataset"], protocol=saved["protocol"],
        metrics=saved["metrics"], served_by=saved.get("index", {}).get("kind", "exhaustive"),
        train_seconds=timing.get("train_seconds", 0.0) + timing.get("distill_setup_seconds", 0.0),
        teacher_seconds=timing.get("teacher_train_seconds", 0.0), epochs=int(timing.get("epochs", 0)),
        cost=cost or {"macs_per_pair": None, "bytes_per_item": None}, seed=int(config["train"].get("seed", 0)),
        group_key=group_key(saved),
        curve=[h[curve_key] for h in saved.get("training_history", []) if curve_key in h],
        curve_metric=curve_key.removeprefix("val_"),
    )


def read_inputs(paths: list[Path], data_dir: Path | None = None) -> list[RunSummary]:
    """The summaries of ``paths`` in order: a run folder's own, or every run an earlier report
    folder (its ``runs.json``) read."""
    summaries = []
    for path in map(Path, paths):
        if (path / RUNS).is_file() and (path / REPORT).is_file():
            summaries += read_runs(path / RUNS)
        else:
            summaries.append(summarize(path, data_dir))
    return summaries


def read_runs(path: Path) -> list[RunSummary]:
    """The summaries a report saved in ``runs.json``."""
    try:
        runs = json.loads(path.read_text())["runs"]
        return [RunSummary(**{**run, "path": Path(run["path"])}) for run in runs]
    except (ValueError, KeyError, TypeError) as exc:
        raise CrosstowerError(f"{path}: not a crosstower report's runs.json ({exc})") from exc


def group_key(saved: dict) -> str:
    """A run's config (from its ``metrics.json``) without what seeds may differ in: the seed,
    the threads and device, and a teacher the run named but never read (every teacher term off)."""
    config = saved["config"]
    key = {**config, "train": {k: v for k, v in config["train"].items() if k not in ("seed", "threads", "device")}}
    distill = config.get("distill") or {}
    if distill and "teacher_train_seconds" not in saved["timing"]:
        key["distill"] = {k: v for k, v in distill.items() if k != "teacher"}
    return json.dumps(key, sort_keys=True)


def group(summaries: list[RunSummary], by_seed: bool) -> list[list[RunSummary]]:
    """One group per run, or (``by_seed``) per config up to its seed, in the order given."""
    if not by_seed:
        return [[s] for s in summaries]
    groups: dict[str, list[RunSummary]] = defaultdict(list)
    for summary in summaries:
        groups[summary.group_key].append(summary)
    return list(groups.values())


def markdown_table(groups: list[list[RunSummary]]) -> str:
    """The report's table: metric columns for the protocols present, then cost columns."""
    columns = []
    if any(s.protocol != "p4" for g in groups for s in g):
        columns += RANKING
    if any(s.protocol == "p4" for g in groups for s in g):
        columns += POINTWISE
    header = ["run", "model", "method", "dataset", "protocol",
              *(f"{'served ' if part == 'test_served' else ''}{metric}" for part, metric in columns),
              "served by", "train s", "teacher train s", "epochs", "bytes / item", "MACs / pair", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for runs in groups:
        first = runs[0]
        cells = [first.name if len(runs) == 1 else f"{first.name} (+{len(runs) - 1})", first.model, first.method,
                 first.dataset, first.protocol.upper(),
                 *(mean_std([s.metrics.get(part, {}).get(metric) for s in runs]) for part, metric in columns),
                 first.served_by, f"{statistics.mean(s.train_seconds for s in runs):.0f}",
                 f"{first.teacher_seconds:.0f}", "/".join(str(s.epochs) for s in runs),
                 _number(first.cost.get("bytes_per_item")), _number(first.cost.get("macs_per_pair")),
                 ", ".join(str(s.seed) for s in runs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path, by_seed: bool = False, data_dir: Path | None = None) -> Path:
    """Write the report folder ``out`` atomically (see the module docstring)."""
    if not run_dirs:
        raise CrosstowerError("compare: name at least one run folder")
    out = Path(out)
    if out.exists() and not (out / REPORT).exists():
        raise CrosstowerError(f"--out {out}: exists and is not a crosstower report; choose another --out")
    summaries = read_inputs(run_dirs, data_dir)
    groups = group(summaries, by_seed)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        plotted = [name for name, written in ((COST_PLOT, _plot_cost(groups, partial / COST_PLOT)),
                                              (CURVE_PLOT, _plot_curves(groups, partial / CURVE_PLOT))) if written]
        text = ["# Runs compared", "", markdown_table(groups), ""]
        text += [f"![{name}]({name})" for name in plotted]
        (partial / REPORT).write_text("\n".join(text) + "\n")
        runs = [{**dataclasses.asdict(s), "path": str(s.path)} for s in summaries]
        (partial / RUNS).write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_dir(partial, out)
    return out


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _accuracy(summary: RunSummary) -> float | None:
    """Served Recall@50 where the run was served through an index, else exhaustive."""
    return summary.metrics.get("test_served", summary.metrics.get("test", {})).get("recall@50")


# Marker and legend of a point by what serves the run: nearest-neighbour search over inner
# products, another index, or scoring every item.
MARKERS = {"exact_inner_product": ("o", "inner product"), "faiss_inner_product": ("o", "inner product"),
           "sparse_code": ("s", "sparse code index"), "late_interaction": ("^", "token index"),
           "two_rankers": ("^", "token index"), "exhaustive": ("x", "every item scored")}


def served_macs(summary: RunSummary) -> float | None:
    """Multiply-adds per (user, item) pair where the run is served: none through a sparse code
    index (a pair's score is the sum of its posting-list entries), the model's own scorer's
    otherwise (``cost.macs_per_pair``; 0 for popularity)."""
    return 0.0 if summary.served_by == "sparse_code" else summary.cost.get("macs_per_pair")


def _plot_cost(groups: list[list[RunSummary]], path: Path) -> bool:
    """Recall@50 against the multiply-adds per pair of what serves each run (log scale, 0
    included), one point per group (its mean), its marker by what serves it."""
    points = []
    for runs in groups:
        values = [_accuracy(s) for s in runs]
        macs = served_macs(runs[0])
        if macs is not None and all(v is not None for v in values):
            points.append((runs[0].name, runs[0].served_by, macs, statistics.mean(values)))
    if not points:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    shown = {}
    for name, served_by, macs, accuracy in points:
        marker, label = MARKERS.get(served_by, ("o", served_by))
        axes.scatter(macs, accuracy, marker=marker)
        axes.annotate(name, (macs, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
        shown[label] = marker
    from matplotlib.lines import Line2D

    axes.legend(handles=[Line2D([], [], marker=m, linestyle="", color="gray", label=label) for label, m in shown.items()],
                title="served by", fontsize=7, title_fontsize=7, loc="lower right")
    axes.set_xscale("symlog", linthresh=1.0)  # logarithmic above 1, linear to 0
    axes.set_xlim(left=-0.5)
    axes.set_xlabel("multiply-adds per scored (user, item) pair, as served")
    axes.set_ylabel("test Recall@50 (served where indexed)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _plot_curves(groups: list[list[RunSummary]], path: Path) -> bool:
    """Each run's validation metric per epoch."""
    runs = [s for g in groups for s in g if s.curve]
    if not runs:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for summary in runs:
        axes.plot(range(len(summary.curve)), summary.curve, marker=".", label=f"{summary.name} (seed {summary.seed})")
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"validation {runs[0].curve_metric}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt
