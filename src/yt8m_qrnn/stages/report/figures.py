"""The report's figures (results/figures/*.png): training curves, each metric against the papers,
per-class AP against class frequency, QRNN vs LSTM throughput, precision-recall curves."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from yt8m_qrnn.pipeline.io import atomic_path
from yt8m_qrnn.stages.report import prose
from yt8m_qrnn.stages.report.formatting import GENERATED_TAG, fmt, fmt_rate
from yt8m_qrnn.stages.report.inputs import ModelRun, class_priors, top_k_suffix
from yt8m_qrnn.stages.report.tables import remove_stale

METRICS = (("gap", "GAP"), ("map", "MAP"), ("hit_at_one", "Hit@1"), ("perr", "PERR"))


@dataclass
class Figure:
    title: str
    path: str  # relative to the report
    caption: str

    def markdown(self) -> str:
        return prose.fill("figure", title=self.title, path=self.path, caption=self.caption)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(runs: list[ModelRun]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan"]
    return {run.name: palette[i % len(palette)] for i, run in enumerate(runs)}


def _finish(fig, path: Path, title: str, generated: bool) -> None:
    fig.suptitle(title + (f"\n({GENERATED_TAG})" if generated else ""), fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)


def _seed_histories(run: ModelRun):
    """(seed, that seed's rows of history.csv), in seed order; one unnamed seed for an old history."""
    h = run.history
    if "seed" not in h:
        yield None, h
        return
    for seed, rows in h.groupby("seed", sort=True):
        yield seed, rows


def steady_rate(stats: dict) -> float:
    """Training examples/s without the first epoch (graph tracing) when recorded, else over every epoch."""
    return float(stats.get("examples_per_second_after_first_epoch") or stats["examples_per_second"])


def plot_training_curves(runs, folder: Path, generated: bool) -> Figure:
    plt = _pyplot()
    colors = _colors(runs)
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        _plot_run_curves(loss_ax, val_ax, run, colors[run.name])
    loss_ax.set(xlabel="epoch", ylabel="training loss (starter cross-entropy, log scale)", yscale="log",
                title="Training loss per epoch (one line per seed)")
    val_ax.set(xlabel="epoch", ylabel="GAP@20 on the validation videos",
               title="Validation GAP (star: the epoch kept)")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.legend(fontsize=8)
    if val_ax.lines:
        val_ax.legend(fontsize=8)
    _finish(fig, folder / "training_curves.png", "Training and validation curves", generated)
    return Figure("Training and validation curves", "figures/training_curves.png",
                  prose.fill("caption_training_curves"))


def _plot_run_curves(loss_ax, val_ax, run: ModelRun, color: str) -> None:
    """One line per seed: its training loss, and its validation GAP with a star at the epoch it kept."""
    label = run.name if run.name == run.kind else f"{run.name} ({run.kind})"
    kept = dict(zip(run.stats.get("seeds", []), run.stats.get("best_epochs", [])))
    for number, (seed, h) in enumerate(_seed_histories(run)):
        name = label if number == 0 else None
        loss_ax.plot(h["epoch"], h["loss"], color=color, alpha=0.8, label=name)
        if "val_gap" in h and pd.to_numeric(h["val_gap"], errors="coerce").notna().any():
            gap = pd.to_numeric(h["val_gap"], errors="coerce")
            val_ax.plot(h["epoch"], gap, color=color, alpha=0.8, label=name)
            best = kept.get(seed)
            if best is not None and (h["epoch"] == best).any():
                val_ax.plot([best], gap[h["epoch"] == best], marker="*", markersize=11, color=color)


def plot_metrics_vs_paper(runs, reference, folder: Path, generated: bool) -> Figure:
    plt = _pyplot()
    priors = class_priors(runs)
    names = [r.name for r in runs] + [f"class prior\n({level})" for level in priors]
    fig, axes = plt.subplots(2, 2, figsize=(max(10, 1.5 * len(names)), 8.5))
    paper, context = _paper_values(reference), _other_studies(reference)
    for ax, (key, label) in zip(axes.ravel(), METRICS):
        ours = [r.metrics[key] for r in runs] + [p.get(key, 0.0) for p in priors.values()]
        colors = ["tab:blue"] * len(runs) + ["tab:gray"] * len(priors)
        if key == "map":  # no paper value: MAP over every class (2018) beside MAP over classes present (2019)
            second = [r.metrics.get("map_present") for r in runs] + [p.get("map_present") for p in priors.values()]
            labels = ("MAP over every class (2018)", "MAP over classes present (2019)")
            second_style = {"color": colors, "hatch": "//", "alpha": 0.5}
        else:
            second = [paper.get(key, {}).get(r.kind) for r in runs] + [None] * len(priors)
            labels, second_style = ("this run", "paper (same model kind)"), {"color": "tab:orange"}
        _paired_bars(ax, ours, colors, second, labels, second_style)
        if key == "gap":
            styles = iter(["--", ":", "-."])
            for model, value in context.values():
                ax.axhline(value, color="black", linestyle=next(styles, "--"), linewidth=1,
                           label=f"{model} ({value:g})")
        title = {"gap": f"GAP{top_k_suffix(runs)}", "map": "MAP (no paper value)"}.get(key, label)
        ax.set(title=title, ylim=(0, 1.32), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    _finish(fig, folder / "metrics_vs_paper.png", "Each metric against the papers' numbers", generated)
    return Figure("Metrics against the paper", "figures/metrics_vs_paper.png",
                  prose.fill("caption_metrics_vs_paper"))


def _paper_values(reference: dict) -> dict[str, dict[str, float]]:
    """metric -> {model kind: the paper's value} (the first row of each kind)."""
    paper = {"perr": {}, "hit_at_one": {}, "gap": {}}
    for ref in reference["table1"]:
        if ref.get("kind") is not None:
            paper["perr"].setdefault(ref["kind"], ref["perr"])
            paper["hit_at_one"].setdefault(ref["kind"], ref["hit_at_one"])
    for ref in reference["table2"]:
        if ref.get("kind") is not None:
            paper["gap"].setdefault(ref["kind"], ref["gap"])
    return paper


def _other_studies(reference: dict) -> dict[str, tuple[str, float]]:
    """source -> (model, GAP): the best GAP of each source without a model kind (other study, Kaggle)."""
    best = {}
    for ref in reference["table2"]:
        if ref.get("kind") is None and ref["gap"] > best.get(ref["source"], (None, -1))[1]:
            best[ref["source"]] = (ref["model"], ref["gap"])
    return best


def _paired_bars(ax, ours: list, colors: list[str], second: list, labels: tuple[str, str], second_style: dict,
                 width: float = 0.4) -> None:
    """This run's bars, and beside each the second value where there is one, both labelled with their value."""
    xs = list(range(len(ours)))
    ax.bar([x - width / 2 for x in xs], ours, width, color=colors, label=labels[0])
    pairs = [(x + width / 2, y, i) for i, (x, y) in enumerate(zip(xs, second)) if y is not None]
    if pairs:
        style = dict(second_style)
        if isinstance(style["color"], list):
            style["color"] = [style["color"][i] for _, _, i in pairs]
        ax.bar([x for x, _, _ in pairs], [y for _, y, _ in pairs], width, label=labels[1], **style)
    for x, y in zip(xs, ours):
        ax.text(x - width / 2, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    for x, y, _ in pairs:
        ax.text(x, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)


def plot_per_class(runs, folder: Path, min_positives: int, generated: bool) -> Figure:
    plt = _pyplot()
    colors = _colors(runs)
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False, sharey=True)
    for ax, run in zip(axes.ravel(), runs):
        _plot_class_aps(ax, run, colors[run.name], min_positives)
    for ax in axes[:, 0]:
        ax.set_ylabel("average precision")
    for ax in axes.ravel()[len(runs):]:
        ax.set_visible(False)
    _finish(fig, folder / "per_class_ap.png", "Per-class AP against class frequency", generated)
    return Figure("Per-class AP against class frequency", "figures/per_class_ap.png",
                  prose.fill("caption_per_class", min_positives=max(1, min_positives)))


def _plot_class_aps(ax, run: ModelRun, color: str, min_positives: int) -> None:
    """A point per class (training videos with it, AP), and the mean AP per frequency bin."""
    table = run.per_class[run.per_class["eval_positives"] >= max(1, min_positives)]
    x = table["train_positives"].to_numpy(float)
    y = table["ap"].to_numpy(float)
    ax.scatter(x, y, s=10 if len(table) < 500 else 3, alpha=0.6 if len(table) < 500 else 0.3, color=color,
               label="one class")
    if len(table) and x.max() > 0:
        ax.plot(*_binned_means(x, y), color="black", marker="s", markersize=3, linewidth=1, label="binned mean")
    ax.set_xscale("symlog", linthresh=1)
    ax.set(title=f"{run.name}: MAP over {len(table)} classes {fmt(y.mean() if len(y) else None, 3)}",
           xlabel="training videos with the class", ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _binned_means(x, y) -> tuple[list, list]:
    """(median x, mean y) of each bin of x: 0, then 8 bins spaced geometrically up to the largest x."""
    import numpy as np

    edges = np.unique(np.concatenate([[0], np.geomspace(1, x.max() + 1, 9)]))
    which = np.digitize(x, edges)
    centres, means = [], []
    for b in np.unique(which):
        mask = which == b
        centres.append(np.median(x[mask]))
        means.append(y[mask].mean())
    return centres, means


def plot_throughput(runs, folder: Path, generated: bool) -> Figure:
    plt = _pyplot()
    colors = _colors(runs)
    chosen, note = _qrnn_and_lstm(runs)
    fig, (bar_ax, epoch_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    _plot_mean_rates(bar_ax, chosen, colors)
    _plot_epoch_rates(epoch_ax, chosen, colors)
    qrnn = [steady_rate(r.stats) for r in chosen if r.kind == "qrnn"]
    lstm = [steady_rate(r.stats) for r in chosen if r.kind == "lstm"]
    ratio = f":\nthe fastest QRNN trains {max(qrnn) / max(lstm):.2f}x as fast as the fastest LSTM" \
        if qrnn and lstm and max(lstm) > 0 else ""
    _finish(fig, folder / "throughput.png", f"QRNN vs LSTM training throughput{ratio}{note}", generated)
    return Figure("QRNN vs LSTM training throughput", "figures/throughput.png",
                  prose.fill("caption_throughput", note=note))


def _qrnn_and_lstm(runs: list[ModelRun]) -> tuple[list[ModelRun], str]:
    """The QRNN and LSTM runs (every run when there is neither), and a note on what is missing."""
    chosen = [r for r in runs if r.kind in ("qrnn", "lstm")]
    if not chosen:
        return runs, " (no QRNN or LSTM model in this run: every model shown)"
    for kind, name in (("lstm", "LSTM"), ("qrnn", "QRNN")):
        if not any(r.kind == kind for r in chosen):
            return chosen, f" (no {name} model in this run)"
    return chosen, ""


def _plot_mean_rates(ax, chosen: list[ModelRun], colors: dict[str, str]) -> None:
    """Bars of examples/s over every epoch and, where recorded, after the first."""
    mean_rates = [float(r.stats["examples_per_second"]) for r in chosen]
    steady = [r.stats.get("examples_per_second_after_first_epoch") for r in chosen]
    labels = [f"{r.name}" + ("" if r.name == r.kind else f" ({r.kind})") + f"\n{int(r.stats['parameters']):,} params"
              for r in chosen]
    xs = list(range(len(chosen)))
    has_steady = any(steady)
    width = 0.4 if has_steady else 0.8
    ax.bar([x - width / 2 if has_steady else x for x in xs], mean_rates, width,
           color=[colors[r.name] for r in chosen], alpha=0.5 if has_steady else 1.0, label="every epoch")
    for x, rate in zip(xs, mean_rates):
        ax.text(x - width / 2 if has_steady else x, rate, fmt_rate(rate), ha="center", va="bottom", fontsize=8)
    if has_steady:
        pairs = [(x + width / 2, float(v), colors[r.name]) for x, v, r in zip(xs, steady, chosen) if v]
        ax.bar([p[0] for p in pairs], [p[1] for p in pairs], width, color=[p[2] for p in pairs],
               label="after the first epoch")
        for x, rate, _ in pairs:
            ax.text(x, rate, fmt_rate(rate), ha="center", va="bottom", fontsize=8)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="gray", alpha=0.5, label="over every epoch"),
                           Patch(color="gray", label="after the first epoch")], fontsize=8)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set(ylabel="training examples per second", title="Mean throughput")
    ax.grid(axis="y", alpha=0.3)


def _plot_epoch_rates(ax, chosen: list[ModelRun], colors: dict[str, str]) -> None:
    """Examples/s of each epoch of the first seed (training videos / the epoch's seconds)."""
    for run in chosen:
        _, h = next(_seed_histories(run))
        if "seconds" in h and len(h):
            per_epoch = float(run.stats["train_videos"]) / h["seconds"].astype(float).clip(lower=1e-9)
            ax.plot(h["epoch"], per_epoch, marker="o", color=colors[run.name], label=run.name)
    ax.set(xlabel="epoch", ylabel="training examples per second", title="Per epoch (the first includes graph tracing)")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.lines:
        ax.legend(fontsize=8)


def plot_pr_curves(runs, folder: Path, generated: bool) -> Figure | None:
    with_curves = [r for r in runs if r.pr_curve is not None and len(r.pr_curve)]
    if not with_curves:
        return None
    plt = _pyplot()
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    for run in with_curves:
        curve = run.pr_curve.sort_values("recall", kind="stable")
        ax.plot(curve["recall"], curve["precision"], color=colors[run.name], label=run.name)
    ax.set(xlabel="recall (of all positives)", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    k = top_k_suffix(runs)[1:] or "-k"
    _finish(fig, folder / "pr_curves.png", f"Precision-recall over the pooled top{k} pairs", generated)
    return Figure("Precision-recall curves", "figures/pr_curves.png",
                  prose.fill("caption_pr_curves"))


def plot_figures(runs, reference, results: Path, report_cfg: dict, generated: bool) -> list[Figure]:
    folder = results / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    min_positives = int(report_cfg.get("per_class_min_positives", 1))
    figures = [
        plot_training_curves(runs, folder, generated),
        plot_metrics_vs_paper(runs, reference, folder, generated),
        plot_per_class(runs, folder, min_positives, generated),
        plot_throughput(runs, folder, generated),
        plot_pr_curves(runs, folder, generated),
    ]
    figures = [f for f in figures if f is not None]
    remove_stale(folder, {Path(f.path).name for f in figures}, ("*.png",))
    return figures
