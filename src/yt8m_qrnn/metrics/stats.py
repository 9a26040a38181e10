"""Confidence intervals for the YouTube-8M metrics, over training seeds and over evaluation videos.

A `TopK` holds what one model (one seed, or an ensemble) predicted on a fixed list of
evaluation videos, reduced to what the metrics need: each video's top-k (class, score,
is-label) triples, its labels, and its Hit@1 and PERR. `topk_metrics` computes GAP,
MAP, Hit@1 and PERR from it with every video counted a whole number of times, which is
what a bootstrap resample of the videos amounts to. With every video counted once the
result equals `yt8m_qrnn.metrics.official.EvaluationMetrics` (same top-k and tie rules).

The statistics come from scipy: Student-t intervals over seeds (`seed_interval`), and
`scipy.stats.bootstrap` over the evaluation videos (`bootstrap_interval`, and the paired
comparison of two models on the same resampled videos, `paired_bootstrap`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import scipy.stats

from yt8m_qrnn.metrics.official import (
    hit_at_one_per_video,
    perr_per_video,
    top_k_by_row,
)
from yt8m_qrnn.pipeline.io import atomic_path

__all__ = [
    "METRICS",
    "TopK",
    "bootstrap_interval",
    "paired_bootstrap",
    "seed_interval",
    "topk_metrics",
]

METRICS = ("gap", "map", "map_present", "hit_at_one", "perr")

# Upper bound on resamples x (videos x k) pair weights that one metric evaluation in
# the bootstrap holds at once; it keeps a handful of float64 arrays of that size
# (about 100 MB in all at this bound).
_MAX_PAIR_WEIGHTS = 2_000_000


@dataclass(eq=False)
class TopK:
    """One model's top-k predictions and the labels of a fixed list of evaluation videos.

    ids: str [V]; classes: int32 [V, k], each video's top-k classes by score descending
    (ties: lower class first, as metrics.top_k_by_row); scores: float32 [V, k];
    positive: bool [V, k], whether that class is a label of the video; num_labels:
    int32 [V]; label_offsets: int64 [V + 1] and label_values: int32, the labels as CSR
    (video v's labels are label_values[label_offsets[v]:label_offsets[v + 1]]);
    hit_at_one, perr: float32 [V]; num_classes: int.
    """

    ids: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    positive: np.ndarray
    num_labels: np.ndarray
    label_offsets: np.ndarray
    label_values: np.ndarray
    hit_at_one: np.ndarray
    perr: np.ndarray
    num_classes: int

    def __post_init__(self):
        self.ids = np.asarray(self.ids).astype(str)
        self.classes = np.asarray(self.classes, dtype=np.int32)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.positive = np.asarray(self.positive, dtype=bool)
        self.num_labels = np.asarray(self.num_labels, dtype=np.int32)
        self.label_offsets = np.asarray(self.label_offsets, dtype=np.int64)
        self.label_values = np.asarray(self.label_values, dtype=np.int32)
        self.hit_at_one = np.asarray(self.hit_at_one, dtype=np.float32)
        self.perr = np.asarray(self.perr, dtype=np.float32)
        self.num_classes = int(self.num_classes)
        self._check_shapes()

    def _check_shapes(self) -> None:
        num_videos = self.ids.shape[0]
        per_video = (self.num_labels, self.hit_at_one, self.perr)
        ranked = (self.classes, self.scores, self.positive)
        if (self.ids.ndim != 1 or any(a.shape != (num_videos,) for a in per_video)
                or any(a.ndim != 2 or a.shape != self.classes.shape or a.shape[0] != num_videos
                       for a in ranked)
                or self.label_offsets.shape != (num_videos + 1,)
                or self.label_values.shape != (int(self.label_offsets[-1]),)):
            raise ValueError(f"inconsistent TopK shapes for {num_videos} videos")

    @cached_property
    def _rankings(self) -> "_Rankings":
        # Sorted once, on first use: a TopK is not meant to change after construction.
        return _rank_pairs(self)

    @property
    def num_videos(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_predictions(cls, ids, predictions, labels: Sequence, num_classes: int,
                         top_k: int = 20) -> "TopK":
        """Build from predictions float [V, num_classes] and labels, one int array of class
        indices per video (duplicates count once).

        The top k are picked from the predictions as given; their scores are then stored
        as float32, so float64 scores closer than float32 resolution become ties (ranked
        in arrival order). Holds a dense bool [V, num_classes] label matrix while it runs.
        """
        predictions = np.asarray(predictions)
        num_videos = len(ids)
        if predictions.shape != (num_videos, num_classes) or len(labels) != num_videos:
            raise ValueError(
                f"expected predictions [{num_videos}, {num_classes}] and {num_videos} label lists, "
                f"got {predictions.shape} and {len(labels)}")
        label_offsets, label_values = _labels_to_csr(labels, num_classes)
        num_labels = np.diff(label_offsets)
        dense_labels = np.zeros((num_videos, num_classes), dtype=bool)
        dense_labels[np.repeat(np.arange(num_videos), num_labels), label_values] = True
        classes = top_k_by_row(predictions, top_k)
        return cls(
            ids=np.asarray(ids), classes=classes,
            scores=np.take_along_axis(predictions, classes, axis=1),
            positive=np.take_along_axis(dense_labels, classes, axis=1),
            num_labels=num_labels, label_offsets=label_offsets, label_values=label_values,
            hit_at_one=hit_at_one_per_video(predictions, dense_labels),
            perr=perr_per_video(predictions, dense_labels), num_classes=num_classes)

    @classmethod
    def concatenate(cls, parts: Sequence["TopK"]) -> "TopK":
        """The videos of several TopKs (e.g. built batch by batch), in order."""
        if not parts or len({p.num_classes for p in parts}) != 1:
            raise ValueError("concatenate needs one or more TopKs over the same classes")
        offsets = [p.label_offsets[1:] for p in parts]
        starts = np.cumsum([0] + [int(o[-1]) if len(o) else 0 for o in offsets])[:-1]
        return cls(
            ids=np.concatenate([p.ids for p in parts]),
            classes=np.concatenate([p.classes for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            positive=np.concatenate([p.positive for p in parts]),
            num_labels=np.concatenate([p.num_labels for p in parts]),
            label_offsets=np.concatenate([[0]] + [o + start for o, start in zip(offsets, starts)]),
            label_values=np.concatenate([p.label_values for p in parts]),
            hit_at_one=np.concatenate([p.hit_at_one for p in parts]),
            perr=np.concatenate([p.perr for p in parts]),
            num_classes=parts[0].num_classes)

    def save(self, path) -> None:
        """Write one compressed .npz, atomically (a temporary beside it, then renamed)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as out:
            np.savez_compressed(out, **arrays)

    @classmethod
    def load(cls, path) -> "TopK":
        with np.load(path, allow_pickle=False) as stored:
            missing = [f.name for f in fields(cls) if f.name not in stored.files]
            if missing:
                raise ValueError(f"{path}: not a TopK file, missing {', '.join(missing)}")
            values = {f.name: stored[f.name] for f in fields(cls)}
        values["num_classes"] = int(values["num_classes"])
        return cls(**values)


def _labels_to_csr(labels: Sequence, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-video label lists to CSR (offsets, values), each video's labels sorted and unique."""
    lists = [np.asarray(video_labels).ravel() for video_labels in labels]
    # An empty list arrives as float64; it must not turn the concatenation into floats.
    lists = [a if a.size else a.astype(np.int64) for a in lists]
    values = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    if values.size and (not np.issubdtype(values.dtype, np.integer)
                        or values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"labels must be integer class indices in [0, {num_classes})")
    video = np.repeat(np.arange(len(lists)), [a.size for a in lists])
    keys = np.unique(video * num_classes + values.astype(np.int64))
    counts = np.bincount(keys // num_classes, minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return offsets, keys % num_classes


def _weight_matrix(weights, num_videos: int) -> np.ndarray:
    """Weights as float64 [B, V], checked to be non-negative whole multiplicities."""
    if weights is None:
        return np.ones((1, num_videos))
    matrix = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if matrix.ndim != 2 or matrix.shape[1] != num_videos:
        raise ValueError(f"weights must be [{num_videos}] or [B, {num_videos}], got {np.shape(weights)}")
    if not np.all(np.isfinite(matrix) & (matrix >= 0) & (matrix == np.round(matrix))):
        raise ValueError("weights must be non-negative integers")
    if np.any(matrix.sum(axis=1) == 0):
        raise ValueError("every row of weights must count at least one video")
    return matrix


def _row_bincount(values: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Sums of values [B, M] by group [M] within each row: [B, num_groups]."""
    rows = values.shape[0]
    flat_groups = (np.arange(rows)[:, None] * num_groups + groups).ravel()
    sums = np.bincount(flat_groups, weights=values.ravel(), minlength=rows * num_groups)
    return sums.reshape(rows, num_groups)


def _weighted_precision_terms(pair_weights, is_positive, segment_first=None) -> tuple:
    """For ranked pairs with weights [B, N]: each positive pair's summed precision over its
    w copies, [B, num_positive_pairs], and the positive pairs' indices.

    Copies of a pair are taken as adjacent: with P0 positives and N0 pairs (weighted)
    ranked before it, the copies' mean precision is about (P0 + (w+1)/2) / (N0 + (w+1)/2)
    (midpoint rule, exact for w == 1). segment_first: for each pair, the index of the
    first pair of its group (ranking restarts per group, as for per-class AP); None for
    a single group.
    """
    positive_weights = pair_weights * is_positive
    pairs_before = np.cumsum(pair_weights, axis=1) - pair_weights
    positives_before = np.cumsum(positive_weights, axis=1) - positive_weights
    if segment_first is not None:
        pairs_before -= pairs_before[:, segment_first]
        positives_before -= positives_before[:, segment_first]
    at = np.flatnonzero(is_positive)
    weights = pair_weights[:, at]
    middle = (weights + 1) / 2
    return weights * (positives_before[:, at] + middle) / (pairs_before[:, at] + middle), at


def _safe_divide(numerator, denominator) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (AP without positives is 0)."""
    numerator, denominator = np.broadcast_arrays(numerator, denominator)
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape), where=denominator > 0)


class _Rankings(NamedTuple):
    """The pooled top-k pairs in the two orders the metrics rank them in."""

    gap_video: np.ndarray  # video of each pair, by score descending (ties: arrival order)
    gap_positive: np.ndarray
    class_video: np.ndarray  # the same, by class, then score descending
    class_positive: np.ndarray
    class_of_pair: np.ndarray
    class_first: np.ndarray  # for each pair in class order, the index of its class's first pair
    label_video: np.ndarray  # the video of each entry of label_values


def _rank_pairs(topk: TopK) -> _Rankings:
    scores, positive = topk.scores.ravel(), topk.positive.ravel()
    classes = topk.classes.ravel().astype(np.int64)
    k = topk.classes.shape[1]
    # Stable sorts: tied scores keep arrival order (video, then rank), as EvaluationMetrics.
    by_score = np.argsort(-scores, kind="stable")
    by_class = np.lexsort((-scores, classes))
    pairs_per_class = np.bincount(classes, minlength=topk.num_classes)
    class_first = np.cumsum(pairs_per_class) - pairs_per_class
    return _Rankings(
        gap_video=by_score // k, gap_positive=positive[by_score],
        class_video=by_class // k, class_positive=positive[by_class],
        class_of_pair=classes[by_class], class_first=class_first[classes[by_class]],
        label_video=np.repeat(np.arange(topk.num_videos), topk.num_labels))


def _weighted_gap(topk: TopK, weights: np.ndarray) -> np.ndarray:
    ranked = topk._rankings
    terms, _ = _weighted_precision_terms(weights[:, ranked.gap_video], ranked.gap_positive)
    all_positives = weights @ topk.num_labels.astype(np.float64)
    return _safe_divide(terms.sum(axis=1), all_positives)


def _weighted_class_ap(topk: TopK, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP of each class [B, num_classes] (0 for a class without positives) and which
    classes have positives [B, num_classes]."""
    ranked = topk._rankings
    terms, at = _weighted_precision_terms(
        weights[:, ranked.class_video], ranked.class_positive, ranked.class_first)
    precision_sums = _row_bincount(terms, ranked.class_of_pair[at], topk.num_classes)
    class_positives = _row_bincount(
        weights[:, ranked.label_video], topk.label_values, topk.num_classes)
    return _safe_divide(precision_sums, class_positives), class_positives > 0


def _weighted_mean(per_video: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weights @ per_video.astype(np.float64) / weights.sum(axis=1)


def _weighted_metric(topk: TopK, metric: str, weights: np.ndarray) -> np.ndarray:
    """One metric of topk_metrics, [B], computing only what it needs (for the bootstrap)."""
    if metric == "gap":
        return _weighted_gap(topk, weights)
    if metric in ("map", "map_present"):
        class_ap, present = _weighted_class_ap(topk, weights)
        if metric == "map":
            return class_ap.mean(axis=1)
        return _safe_divide(class_ap.sum(axis=1), present.sum(axis=1))
    return _weighted_mean(getattr(topk, metric), weights)


def topk_metrics(topk: TopK, weights=None) -> dict:
    """GAP, MAP (mean over every class, 2018), map_present, Hit@1 and PERR.

    weights: None (every video once), whole multiplicities [V] (floats), or [B, V] for B
    resamples at once (arrays [B]). A video counted w times counts each of its pairs w
    times; see _weighted_precision_terms for how tied copies are ranked. Memory grows
    like B * V * k, so pass large B in chunks.
    """
    matrix = _weight_matrix(weights, topk.num_videos)
    class_ap, present = _weighted_class_ap(topk, matrix)
    result = {
        "gap": _weighted_gap(topk, matrix),
        "map": class_ap.mean(axis=1),
        "map_present": _safe_divide(class_ap.sum(axis=1), present.sum(axis=1)),
        "hit_at_one": _weighted_mean(topk.hit_at_one, matrix),
        "perr": _weighted_mean(topk.perr, matrix),
    }
    if weights is None or np.ndim(weights) == 1:
        return {name: float(values[0]) for name, values in result.items()}
    return result


def seed_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean over seeds and the half width of its Student-t interval (nan for one value)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("seed_interval needs at least one value")
    mean = float(values.mean())
    if values.size == 1:
        return mean, float("nan")
    quantile = scipy.stats.t.ppf((1 + confidence) / 2, df=values.size - 1)
    return mean, float(quantile * values.std(ddof=1) / np.sqrt(values.size))


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def _check_same_videos(topks: Sequence[TopK]) -> None:
    if not topks:
        raise ValueError("need at least one TopK")
    first = topks[0].ids
    if any(not np.array_equal(t.ids, first) for t in topks[1:]):
        raise ValueError("the TopKs do not cover the same video ids in the same order")


def _seed_mean(topks: Sequence[TopK], metric: str, weights=None) -> np.ndarray:
    """Mean over the TopKs of one metric, [B] (B = 1 for weights None)."""
    matrix = _weight_matrix(weights, topks[0].num_videos)
    return np.mean([_weighted_metric(t, metric, matrix) for t in topks], axis=0)


def _multiplicities(indices: np.ndarray, num_videos: int) -> np.ndarray:
    """Resampled video indices [B, V] to how often each video was drawn, [B, V]."""
    rows = indices.shape[0]
    flat = (indices + num_videos * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * num_videos).reshape(rows, num_videos)


def _bootstrap_videos(statistic_of_weights: Callable, topks: Sequence[TopK], n_resamples: int,
                      confidence: float, seed: int):
    """scipy.stats.bootstrap over the evaluation videos of a statistic of video weights [B, V]."""
    num_videos = topks[0].num_videos
    pairs = num_videos * max(t.classes.shape[1] for t in topks)

    def statistic(indices, axis=-1):
        indices = np.moveaxis(np.asarray(indices), axis, -1)
        weights = _multiplicities(indices.reshape(-1, num_videos), num_videos)
        return np.asarray(statistic_of_weights(weights)).reshape(indices.shape[:-1])

    # Percentile, not BCa: BCa adds a jackknife, one statistic per left-out video,
    # O(V^2 k) work that is out of reach for 10^5-10^6 evaluation videos.
    return scipy.stats.bootstrap(
        (np.arange(num_videos),), statistic, n_resamples=n_resamples,
        batch=max(1, min(n_resamples, _MAX_PAIR_WEIGHTS // max(pairs, 1))), vectorized=True,
        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))


def bootstrap_interval(topks: Sequence[TopK], metric: str, n_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile interval of the seed-mean metric with the evaluation videos resampled.

    Every TopK (one per seed) must cover the same videos in the same order; each
    resample weighs the videos the same way for every seed. Returns estimate (on all
    videos), low, high, standard_error and distribution [n_resamples].

    For "map" (2018: mean over every class) a class whose positives all miss a
    resample scores 0 there, so with rare classes the distribution sits below the
    estimate; "map_present" averages over the classes present in each resample.
    """
    _check_metric(metric)
    _check_same_videos(topks)
    result = _bootstrap_videos(lambda w: _seed_mean(topks, metric, w), topks,
                               n_resamples, confidence, seed)
    return {
        "estimate": float(_seed_mean(topks, metric)[0]),
        "low": float(result.confidence_interval.low),
        "high": float(result.confidence_interval.high),
        "standard_error": float(result.standard_error),
        "distribution": result.bootstrap_distribution,
    }


def paired_bootstrap(topks_a: Sequence[TopK], topks_b: Sequence[TopK], metric: str,
                     n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Seed-mean metric of A minus that of B, both on the same resampled videos.

    Returns difference (on all videos), low, high, p_value (two-sided, from the
    bootstrap distribution: 2 * min(share <= 0, share >= 0), at most 1; 0 means below
    about 1 / n_resamples), significant (the interval excludes 0) and distribution
    [n_resamples].
    """
    _check_metric(metric)
    _check_same_videos(list(topks_a) + list(topks_b))
    result = _bootstrap_videos(
        lambda w: _seed_mean(topks_a, metric, w) - _seed_mean(topks_b, metric, w),
        list(topks_a) + list(topks_b), n_resamples, confidence, seed)
    differences = result.bootstrap_distribution
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    share_at_most_zero = float(np.mean(differences <= 0))
    share_at_least_zero = float(np.mean(differences >= 0))
    return {
        "difference": float(_seed_mean(topks_a, metric)[0] - _seed_mean(topks_b, metric)[0]),
        "low": low,
        "high": high,
        "p_value": min(1.0, 2 * min(share_at_most_zero, share_at_least_zero)),
        "significant": bool(low > 0 or high < 0),
        "distribution": differences,
    }
