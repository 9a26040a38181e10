"""The report's numbers with their uncertainty: intervals, ensembles and paired comparisons.

Reads what the evaluate stage keeps in results/eval/<model>/predictions/ (stats.TopK per
seed and for the seeds' ensemble, and the ensemble's full predictions when kept) and gives:

- each model's metrics as the mean over seeds, the 95% Student-t interval over the seeds,
  and the 95% bootstrap interval over the evaluation videos (of the seed mean);
- the ensembles: of each model's seeds, and of all models of a level (the mean of their
  seed ensembles' predictions on the same videos), with bootstrap intervals;
- for each QRNN against each other model on the same videos: the paired bootstrap of the
  GAP difference (interval, p-value, significant or not), and the verdict in plain words.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yt8m_qrnn.metrics.stats import (
    TopK,
    bootstrap_interval,
    paired_bootstrap,
    seed_interval,
    topk_metrics,
)

METRICS = ("gap", "map", "hit_at_one", "perr")
# MAP over every class (2018) gets no interval over the videos: a resample drops rare classes, which then score
# 0 there, which pulls its bootstrap distribution below the estimate. It keeps its interval over seeds.
NOT_BOOTSTRAPPED = ("map",)
ENSEMBLE_FILE, FULL_FILE = "ensemble.npz", "ensemble_full.npy"
COMPARED_METRIC = "gap"
BASELINE_KINDS = ("logistic", "moe", "lstm", "frame_logistic", "dbof")


@dataclass
class Interval:
    """A metric: mean over seeds, half width of its 95% t-interval (None for one seed), 95% bootstrap bounds."""

    mean: float
    seed_half_width: float | None
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} {self.spread(digits)}"

    def spread(self, digits: int = 3) -> str:
        """'± half [low, high]', without the part that was not computed."""
        parts = [] if self.seed_half_width is None else [f"± {self.seed_half_width:.{digits}f}"]
        if not np.isnan(self.low):
            parts.append(f"[{self.low:.{digits}f}, {self.high:.{digits}f}]")
        return " ".join(parts)


@dataclass
class ModelScores:
    name: str
    kind: str
    level: str
    seeds: dict[int, TopK]
    ensemble: TopK
    full_predictions: Path | None

    def same_videos(self, other: ModelScores) -> bool:
        return self.level == other.level and np.array_equal(self.ensemble.ids, other.ensemble.ids)


def load_scores(results: Path, name: str, kind: str, level: str) -> ModelScores:
    folder = Path(results) / "eval" / name / "predictions"
    seed_files = sorted(folder.glob("seed-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
    if not seed_files or not (folder / ENSEMBLE_FILE).exists():
        raise FileNotFoundError(f"{folder}: no per-seed predictions (rerun evaluate@{name})")
    seeds = {int(p.stem.split("-")[1]): TopK.load(p) for p in seed_files}
    full = folder / FULL_FILE
    return ModelScores(name, kind, level, seeds, TopK.load(folder / ENSEMBLE_FILE), full if full.exists() else None)


def model_intervals(scores: ModelScores, resamples: int, seed: int = 0) -> dict[str, Interval]:
    seeds = list(scores.seeds.values())
    out = {}
    for metric in METRICS:
        mean, half = seed_interval([topk_metrics(t)[metric] for t in seeds])
        low, high = _video_interval(seeds, metric, resamples, seed)
        out[metric] = Interval(mean, None if np.isnan(half) else half, low, high)
    return out


def topk_intervals(topk: TopK, resamples: int, seed: int = 0) -> dict[str, Interval]:
    """One set of predictions (an ensemble): its metrics and bootstrap intervals, no seed interval."""
    values = topk_metrics(topk)
    out = {}
    for metric in METRICS:
        out[metric] = Interval(values[metric], None, *_video_interval([topk], metric, resamples, seed))
    return out


def _video_interval(topks: list[TopK], metric: str, resamples: int, seed: int) -> tuple[float, float]:
    if metric in NOT_BOOTSTRAPPED:
        return float("nan"), float("nan")
    boot = bootstrap_interval(topks, metric, n_resamples=resamples, seed=seed)
    return boot["low"], boot["high"]


def all_models_ensemble(models: list[ModelScores], top_k: int) -> TopK | None:
    """The mean of the models' seed-ensemble predictions, when there are 2+ models on the same videos, all kept."""
    if len(models) < 2 or any(m.full_predictions is None or not m.same_videos(models[0]) for m in models):
        return None
    total = None
    for model in models:
        predictions = np.load(model.full_predictions).astype(np.float32)
        total = predictions if total is None else total + predictions
    reference = models[0].ensemble
    labels = np.split(reference.label_values, reference.label_offsets[1:-1])
    return TopK.from_predictions(reference.ids, total / len(models), labels, reference.num_classes, top_k)


def group_by_level(models: list[ModelScores]) -> dict[str, list[ModelScores]]:
    groups: dict[str, list[ModelScores]] = {}
    for model in models:
        groups.setdefault(model.level, []).append(model)
    return groups


@dataclass
class Comparison:
    qrnn: str
    baseline: str
    level: str
    difference: float
    low: float
    high: float
    p_value: float
    significant: bool

    @property
    def outcome(self) -> str:
        if not self.significant:
            return "no significant difference"
        return "QRNN better" if self.difference > 0 else "QRNN worse"


def compare_qrnns(models: list[ModelScores], resamples: int, seed: int = 0) -> list[Comparison]:
    """Each QRNN against each baseline on the same videos: paired bootstrap of the seed-mean GAP."""
    out = []
    for qrnn in (m for m in models if m.kind == "qrnn"):
        for other in (m for m in models if m.kind != "qrnn" and m.same_videos(qrnn)):
            test = paired_bootstrap(list(qrnn.seeds.values()), list(other.seeds.values()), COMPARED_METRIC,
                                    n_resamples=resamples, seed=seed)
            out.append(Comparison(qrnn.name, other.name, qrnn.level, test["difference"], test["low"], test["high"],
                                  test["p_value"], bool(test["significant"])))
    return out


def verdict_lines(models: list[ModelScores], comparisons: list[Comparison], data: str) -> list[str]:
    """The paper's question (does the QRNN beat logistic, MoE and the LSTM?) answered from this run."""
    kinds = {m.kind for m in models}
    if "qrnn" not in kinds:
        return ["No QRNN in this run: the paper's question is not tested."]
    lines = [f"On {data}, GAP@20 difference QRNN minus baseline (mean over seeds; 95% paired bootstrap "
             "interval over the evaluation videos):", ""]
    for c in comparisons:
        lines.append(f"- {c.qrnn} ({c.level} level) vs {c.baseline}: {c.difference:+.4f} [{c.low:+.4f}, {c.high:+.4f}], "
                     f"p {p_text(c.p_value)}: **{c.outcome}**.")
    missing = [k for k in ("logistic", "moe", "lstm") if k not in kinds]
    for kind in missing:
        lines.append(f"- against {kind}: not tested, no {kind} model in this run"
                     + (" (it needs frame-level data, which this run does not have)." if kind == "lstm" else "."))
    if not comparisons:
        lines.append("- no baseline was evaluated on the same videos as the QRNN, so no paired comparison was made.")
    return lines


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"
