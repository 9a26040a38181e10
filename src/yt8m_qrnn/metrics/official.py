"""The official YouTube-8M 2018 evaluation metrics, vectorised and streaming.

Computes what the 2018 starter code (eval_util.py, average_precision_calculator.py,
mean_average_precision_calculator.py) computes:

- Hit@1: mean over videos of label[argmax(predictions)].
- PERR: for a video with k labels, the share of its top-k predicted classes that
  are labels *and* have a score > 0; a video without labels scores 0 and counts.
- GAP@top_k: each video's top_k (score, label) pairs are pooled and ranked by score;
  AP = (1/P) * sum over positive pairs at rank i of (positives up to rank i) / i,
  where P counts ALL ground-truth positives, also those outside every top-k list.
- MAP: the same AP per class, over that class's pairs from the same top-k lists,
  divided by all positives of the class. ``map`` averages over every class (a class
  without positives scores 0, 2018 behaviour); ``map_present`` averages over the
  classes with positives (2019 behaviour).

Labels count as positive when > 0, as in the official code.

Ties
----
The official code leaves ties to chance, so we fix a rule of our own:

- Picking each video's top k: the official code uses ``np.argpartition``, which
  chooses arbitrarily among scores tied at the k-th place. We keep the lowest class
  indices, and sort each video's list by score descending, lower class index first
  on ties. Hit@1 uses ``np.argmax`` (first index on ties), as the official code does,
  and that is always the head of our list.
- The global ranking (GAP, MAP, PR curve): before a stable descending sort, the
  official code shuffles the pooled pairs with ``random.seed(0)``, so tied pairs
  land in a pseudo-random order that depends on how many pairs there are in total.
  We sort stably in arrival order: the order the videos were accumulated in, then
  each video's own top-k order. The result does not depend on how the videos are
  split into batches. Without ties the two orders agree exactly. With ties (for
  example, the class-prior baseline gives every video the same scores) the two
  agree in distribution only when the video order is unrelated to the labels.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "EvaluationMetrics",
    "average_precision_from_pairs",
    "class_prior_predictions",
    "hit_at_one",
    "hit_at_one_per_video",
    "per_class_average_precision",
    "perr",
    "perr_from_ranked",
    "perr_per_video",
    "top_k_by_row",
]


def _score_matrix(predictions) -> np.ndarray:
    scores = np.asarray(predictions)
    if scores.ndim != 2:
        raise ValueError(f"predictions must be 2-D [batch, num_classes], got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("predictions contain NaN")
    return scores


def _positive_matrix(labels, expected_shape: tuple[int, ...]) -> np.ndarray:
    label_array = np.asarray(labels)
    if label_array.shape != expected_shape:
        raise ValueError(
            f"labels shape {label_array.shape} does not match predictions shape {expected_shape}"
        )
    return label_array > 0


def _scores_and_positives(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = _score_matrix(predictions)
    return scores, _positive_matrix(labels, scores.shape)


def _top_k_unordered(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k largest scores in ascending class order (lowest indices win ties)."""
    num_classes = scores.shape[1]
    chosen = np.argpartition(scores, num_classes - k, axis=1)[:, num_classes - k:]
    kth_largest = np.take_along_axis(scores, chosen, axis=1).min(axis=1, keepdims=True)
    chosen.sort(axis=1)
    # argpartition picks arbitrarily among scores tied at the k-th place; redo those rows.
    ambiguous = np.flatnonzero(np.count_nonzero(scores >= kth_largest, axis=1) > k)
    if ambiguous.size:
        chosen[ambiguous] = _lowest_indices_on_ties(scores[ambiguous], kth_largest[ambiguous], k)
    return chosen


def _lowest_indices_on_ties(scores: np.ndarray, kth_largest: np.ndarray, k: int) -> np.ndarray:
    above = scores > kth_largest
    tied = scores == kth_largest
    slots_for_ties = k - np.count_nonzero(above, axis=1)[:, None]
    keep = above | (tied & (np.cumsum(tied, axis=1) <= slots_for_ties))
    return np.nonzero(keep)[1].reshape(-1, k)


def top_k_by_row(predictions, k: int) -> np.ndarray:
    """Class indices of each row's min(k, num_classes) highest scores, int64 [batch, min(k, C)].

    Ordered by score descending; ties go to the lower class index, both at the k-th
    place and within the list.
    """
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    scores = _score_matrix(predictions)
    num_rows, num_classes = scores.shape
    k = min(k, num_classes)
    if k == num_classes or num_rows == 0:
        chosen = np.broadcast_to(np.arange(num_classes, dtype=np.int64), (num_rows, num_classes))
        chosen = chosen[:, :k].copy()
    else:
        chosen = _top_k_unordered(scores, k).astype(np.int64, copy=False)
    chosen_scores = np.take_along_axis(scores, chosen, axis=1)
    # A stable sort keeps the ascending class order among equal scores.
    by_score = np.argsort(-chosen_scores, axis=1, kind="stable")
    return np.take_along_axis(chosen, by_score, axis=1)


def hit_at_one_per_video(predictions, labels) -> np.ndarray:
    """1.0 where the top-scoring class (np.argmax, first index on ties) is a label, float64 [batch]."""
    scores, positives = _scores_and_positives(predictions, labels)
    if scores.shape[1] == 0:
        return np.zeros(scores.shape[0])
    top_class = np.argmax(scores, axis=1)
    return positives[np.arange(scores.shape[0]), top_class].astype(np.float64)


def hit_at_one(predictions, labels) -> float:
    """Mean Hit@1 over the batch (0.0 for an empty batch)."""
    per_video = hit_at_one_per_video(predictions, labels)
    return float(per_video.mean()) if per_video.size else 0.0


def perr_from_ranked(ranked_scores, ranked_positives, num_labels) -> np.ndarray:
    """PERR per video from each video's classes ranked by score descending.

    ranked_scores / ranked_positives: [batch, width], at least as wide as the
    largest label count; num_labels: [batch] number of labels of each video.
    """
    ranked_scores = np.asarray(ranked_scores)
    ranked_positives = np.asarray(ranked_positives, dtype=bool)
    num_labels = np.asarray(num_labels, dtype=np.int64)
    if num_labels.size and num_labels.max() > ranked_scores.shape[1]:
        raise ValueError("ranked lists are shorter than the largest label count")
    within_k = np.arange(ranked_scores.shape[1]) < num_labels[:, None]
    hits = np.count_nonzero(ranked_positives & (ranked_scores > 0) & within_k, axis=1)
    return np.divide(hits, num_labels, out=np.zeros(num_labels.shape), where=num_labels > 0)


def _ranked_pairs(scores: np.ndarray, positives: np.ndarray, width: int):
    ranked_classes = top_k_by_row(scores, width)
    ranked_scores = np.take_along_axis(scores, ranked_classes, axis=1)
    ranked_positives = np.take_along_axis(positives, ranked_classes, axis=1)
    return ranked_classes, ranked_scores, ranked_positives


def perr_per_video(predictions, labels) -> np.ndarray:
    """Precision at equal recall rate per video, float64 [batch] (0 for a video without labels)."""
    scores, positives = _scores_and_positives(predictions, labels)
    num_labels = np.count_nonzero(positives, axis=1)
    if scores.shape[0] == 0 or num_labels.max() == 0:
        return np.zeros(scores.shape[0])
    _, ranked_scores, ranked_positives = _ranked_pairs(scores, positives, int(num_labels.max()))
    return perr_from_ranked(ranked_scores, ranked_positives, num_labels)


def perr(predictions, labels) -> float:
    """Mean PERR over the batch (0.0 for an empty batch)."""
    per_video = perr_per_video(predictions, labels)
    return float(per_video.mean()) if per_video.size else 0.0


def _ap_from_ranked_positives(ranked_positives: np.ndarray, num_positives: int) -> float:
    if num_positives == 0:
        return 0.0
    # The j-th positive (1-based) at rank r contributes precision j / r.
    ranks = np.flatnonzero(ranked_positives) + 1.0
    hits_so_far = np.arange(1, ranks.size + 1, dtype=np.float64)
    return float(np.sum(hits_so_far / ranks) / num_positives)


def _check_positive_total(pairs_positives: int | np.ndarray, num_positives) -> None:
    if np.any(np.asarray(num_positives) < pairs_positives):
        raise ValueError("num_positives is smaller than the number of positive pairs")


def average_precision_from_pairs(scores, is_positive, num_positives: int) -> float:
    """Non-interpolated AP of pairs ranked by score descending (ties: input order).

    num_positives: all positives in the ground truth, also those absent from the
    pairs; 0 gives 0.0, as in the official code.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_positive = np.asarray(is_positive).ravel() > 0
    if scores.shape != is_positive.shape:
        raise ValueError(f"scores {scores.shape} and is_positive {is_positive.shape} differ in length")
    _check_positive_total(np.count_nonzero(is_positive), num_positives)
    order = np.argsort(-scores, kind="stable")
    return _ap_from_ranked_positives(is_positive[order], int(num_positives))


def per_class_average_precision(scores, is_positive, classes, class_positives) -> np.ndarray:
    """AP of each class over its own pairs, float64 [num_classes], without a loop over classes.

    scores, is_positive, classes: one entry per (score, label, class) pair.
    class_positives: [num_classes] all positives of each class; a class with none scores 0.
    Within a class, pairs are ranked by score descending, ties in input order.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_positive = np.asarray(is_positive).ravel() > 0
    classes = np.asarray(classes).ravel().astype(np.int64, copy=False)
    class_positives = np.asarray(class_positives)
    num_classes = class_positives.shape[0]
    if not scores.shape == is_positive.shape == classes.shape:
        raise ValueError("scores, is_positive and classes differ in length")
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes})")
    # One global sort: by class, then score descending; lexsort is stable.
    order = np.lexsort((-scores, classes))
    sorted_classes = classes[order]
    sorted_positive = is_positive[order]
    pairs_per_class = np.bincount(sorted_classes, minlength=num_classes)
    class_start = np.cumsum(pairs_per_class) - pairs_per_class
    positive_at = np.flatnonzero(sorted_positive)
    positive_class = sorted_classes[positive_at]
    positive_pairs_per_class = np.bincount(positive_class, minlength=num_classes)
    _check_positive_total(positive_pairs_per_class, class_positives)
    positive_start = np.cumsum(positive_pairs_per_class) - positive_pairs_per_class
    # Segmented ranks: position within the class segment, and positives so far in it.
    rank_in_class = positive_at - class_start[positive_class] + 1.0
    hits_so_far = np.arange(positive_at.size) - positive_start[positive_class] + 1.0
    precision_sums = np.bincount(positive_class, weights=hits_so_far / rank_in_class, minlength=num_classes)
    return np.divide(
        precision_sums, class_positives, out=np.zeros(num_classes), where=class_positives > 0
    )


def class_prior_predictions(train_label_counts, num_train_videos: int, batch_size: int) -> np.ndarray:
    """The class-prior baseline: every row holds each class's training frequency, float64 [batch, C]."""
    counts = np.asarray(train_label_counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"train_label_counts must be 1-D, got shape {counts.shape}")
    if num_train_videos <= 0:
        raise ValueError(f"num_train_videos must be positive, got {num_train_videos}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be non-negative, got {batch_size}")
    if np.any(counts < 0) or np.any(counts > num_train_videos):
        raise ValueError("train_label_counts must lie in [0, num_train_videos]")
    return np.tile(counts / num_train_videos, (batch_size, 1))


def _smallest_class_dtype(num_classes: int) -> type:
    return np.uint16 if num_classes <= np.iinfo(np.uint16).max + 1 else np.int32


class EvaluationMetrics:
    """Streaming Hit@1, PERR, GAP@top_k and MAP over batches of videos.

    Keeps only each video's top_k (score, label, class) triples, the per-class
    positive counts and running sums, so memory grows by about 11 bytes per
    video and top-k slot. See the module docstring for the tie rules.
    """

    def __init__(self, num_classes: int, top_k: int = 20):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        self.num_classes = int(num_classes)
        self.top_k = int(top_k)
        self._class_dtype = _smallest_class_dtype(self.num_classes)
        self.clear()

    def clear(self) -> None:
        self.num_videos = 0
        self._sum_hit_at_one = 0.0
        self._sum_perr = 0.0
        self._class_positives = np.zeros(self.num_classes, dtype=np.int64)
        self._scores: list[np.ndarray] = []
        self._positives: list[np.ndarray] = []
        self._classes: list[np.ndarray] = []

    def accumulate(self, predictions: np.ndarray, labels: np.ndarray) -> None:
        """predictions: float [batch, num_classes]; labels: dense {0,1} [batch, num_classes]."""
        scores, positives = _scores_and_positives(predictions, labels)
        if scores.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got {scores.shape[1]}")
        if scores.shape[0] == 0:
            return
        num_labels = np.count_nonzero(positives, axis=1)
        # One ranking serves PERR (needs each video's label count) and the top-k pairs.
        width = max(self.top_k, int(num_labels.max()))
        ranked_classes, ranked_scores, ranked_positives = _ranked_pairs(scores, positives, width)
        self._sum_hit_at_one += float(hit_at_one_per_video(scores, positives).sum())
        self._sum_perr += float(perr_from_ranked(ranked_scores, ranked_positives, num_labels).sum())
        self._class_positives += np.count_nonzero(positives, axis=0)
        self.num_videos += scores.shape[0]
        kept = min(self.top_k, self.num_classes)
        self._scores.append(ranked_scores[:, :kept].astype(np.float64).ravel())
        self._positives.append(ranked_positives[:, :kept].ravel())
        self._classes.append(ranked_classes[:, :kept].astype(self._class_dtype).ravel())

    def _pooled_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.num_videos <= 0:
            raise ValueError("no videos accumulated")
        # Merge the chunks once, so repeated calls do not copy them again.
        for chunks in (self._scores, self._positives, self._classes):
            if len(chunks) > 1:
                chunks[:] = [np.concatenate(chunks)]
        return self._scores[0], self._positives[0], self._classes[0]

    def gap(self) -> float:
        """GAP@top_k alone (what choosing an epoch needs); ValueError if there are no videos."""
        scores, positives, _ = self._pooled_pairs()
        return average_precision_from_pairs(scores, positives, int(self._class_positives.sum()))

    def get(self) -> dict:
        """All metrics over every accumulated video; ValueError if there are none."""
        scores, positives, classes = self._pooled_pairs()
        per_class_ap = per_class_average_precision(scores, positives, classes, self._class_positives)
        present = self._class_positives > 0
        return {
            "gap": average_precision_from_pairs(scores, positives, int(self._class_positives.sum())),
            "map": float(per_class_ap.mean()),
            "map_present": float(per_class_ap[present].mean()) if present.any() else 0.0,
            "hit_at_one": self._sum_hit_at_one / self.num_videos,
            "perr": self._sum_perr / self.num_videos,
            "num_videos": int(self.num_videos),
            "per_class_ap": per_class_ap,
            "class_positives": self._class_positives.copy(),
        }

    def precision_recall_curve(self, num_points: int = 101) -> dict:
        """Global PR curve over the pooled top-k pairs.

        Thresholds are spaced evenly over *score*, from the lowest to the highest
        pooled score, ascending. At threshold t every pair with score >= t is
        selected (so tie order does not matter): precision = positives / selected,
        recall = positives / ALL ground-truth positives (as GAP; 0 when there are none).
        """
        if num_points < 1:
            raise ValueError(f"num_points must be positive, got {num_points}")
        scores, positives, _ = self._pooled_pairs()
        order = np.argsort(-scores, kind="stable")
        descending_scores = scores[order]
        positives_so_far = np.cumsum(positives[order])
        thresholds = np.linspace(descending_scores[-1], descending_scores[0], num_points)
        # Pairs with score >= t form a prefix of the descending list.
        selected = np.searchsorted(-descending_scores, -thresholds, side="right")
        true_positives = positives_so_far[selected - 1]
        total_positives = int(self._class_positives.sum())
        recall = true_positives / total_positives if total_positives else np.zeros(num_points)
        return {
            "threshold": thresholds.tolist(),
            "precision": (true_positives / selected).tolist(),
            "recall": np.asarray(recall, dtype=np.float64).tolist(),
        }
