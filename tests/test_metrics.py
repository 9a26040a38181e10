"""Tests of yt8m_qrnn.metrics.official against hand-computed cases and a naive loop implementation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from yt8m_qrnn.metrics.official import (
    EvaluationMetrics,
    average_precision_from_pairs,
    class_prior_predictions,
    hit_at_one,
    per_class_average_precision,
    perr,
    perr_per_video,
    top_k_by_row,
)

SCALAR_KEYS = ("gap", "map", "map_present", "hit_at_one", "perr")


def evaluate(predictions, labels, top_k=20, batch_sizes=None) -> dict:
    metrics = EvaluationMetrics(np.asarray(predictions).shape[1], top_k=top_k)
    start = 0
    for size in batch_sizes or [len(predictions)]:
        metrics.accumulate(predictions[start:start + size], labels[start:start + size])
        start += size
    assert start == len(predictions)
    return metrics.get()


# A small case used by several tests: 3 videos, 4 classes, top_k = 2.
#   video 0: scores [.9, .8, .1, .05], labels {0, 2}  -> top 2: (.9, +, c0), (.8, -, c1); c2 never reached
#   video 1: scores [.2, .7, .6, .3],  labels {1}     -> top 2: (.7, +, c1), (.6, -, c2)
#   video 2: scores [.4, .1, .2, .85], no labels      -> top 2: (.85, -, c3), (.4, -, c0)
SMALL_PREDICTIONS = np.array(
    [[0.9, 0.8, 0.1, 0.05], [0.2, 0.7, 0.6, 0.3], [0.4, 0.1, 0.2, 0.85]]
)
SMALL_LABELS = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])


def test_small_case_by_hand():
    result = evaluate(SMALL_PREDICTIONS, SMALL_LABELS, top_k=2)
    # Pooled ranking: .9+ .85- .8- .7+ .6- .4-; P = 3 positives in the ground truth.
    # GAP = (1/1 + 2/4) / 3 = 0.5 (the unreached positive of video 0 still counts in P).
    assert result["gap"] == pytest.approx(0.5, abs=1e-12)
    # Per class: c0 [.9+, .4-], P=1 -> 1; c1 [.8-, .7+], P=1 -> 1/2;
    # c2 [.6-], P=1 (its positive never reached the top 2) -> 0; c3 [.85-], P=0 -> 0.
    np.testing.assert_allclose(result["per_class_ap"], [1.0, 0.5, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(result["class_positives"], [1, 1, 1, 0])
    assert result["map"] == pytest.approx((1 + 0.5 + 0 + 0) / 4, abs=1e-12)
    assert result["map_present"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-12)
    # Hit@1: argmax c0 (label), c1 (label), c3 (no label) -> 2/3.
    assert result["hit_at_one"] == pytest.approx(2 / 3, abs=1e-12)
    # PERR: video 0 top 2 = {c0, c1} -> 1/2; video 1 top 1 = {c1} -> 1; video 2 no labels -> 0 but counted.
    assert result["perr"] == pytest.approx((0.5 + 1 + 0) / 3, abs=1e-12)
    assert result["num_videos"] == 3
    assert result["per_class_ap"].dtype == np.float64
    assert result["class_positives"].dtype == np.int64


def test_small_case_precision_recall_curve():
    metrics = EvaluationMetrics(4, top_k=2)
    metrics.accumulate(SMALL_PREDICTIONS, SMALL_LABELS)
    curve = metrics.precision_recall_curve(num_points=3)
    # Thresholds evenly over score from .4 to .9: [.4, .65, .9].
    # >= .4: 6 pairs, 2 positives; >= .65: 4 pairs, 2 positives; >= .9: 1 pair, 1 positive. P = 3.
    np.testing.assert_allclose(curve["threshold"], [0.4, 0.65, 0.9], atol=1e-12)
    np.testing.assert_allclose(curve["precision"], [2 / 6, 2 / 4, 1.0], atol=1e-12)
    np.testing.assert_allclose(curve["recall"], [2 / 3, 2 / 3, 1 / 3], atol=1e-12)
    assert all(isinstance(curve[key], list) for key in ("threshold", "precision", "recall"))
    assert len(metrics.precision_recall_curve()["threshold"]) == 101


def test_top_k_larger_than_num_classes():
    predictions = np.array([[0.3, 0.6], [0.8, 0.1]])
    labels = np.array([[1, 0], [1, 1]])
    result = evaluate(predictions, labels, top_k=20)
    # All 4 pairs kept: .8+ .6- .3+ .1+, P = 3 -> GAP = (1/1 + 2/3 + 3/4) / 3 = 29/36.
    assert result["gap"] == pytest.approx(29 / 36, abs=1e-12)
    # c0 [.8+, .3+] -> (1 + 2/2) / 2 = 1; c1 [.6-, .1+] -> 1/2.
    np.testing.assert_allclose(result["per_class_ap"], [1.0, 0.5], atol=1e-12)
    assert result["map"] == pytest.approx(0.75, abs=1e-12)
    # Hit@1: argmax c1 (no label), c0 (label) -> 1/2. PERR: video 0 top 1 = {c1} -> 0; video 1 -> 1.
    assert result["hit_at_one"] == pytest.approx(0.5, abs=1e-12)
    assert result["perr"] == pytest.approx(0.5, abs=1e-12)


def test_hit_at_one_takes_first_index_on_ties():
    predictions = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    # np.argmax picks class 0 in both rows: the first video's label is on class 1 (miss),
    # the second's on class 0 (hit).
    labels = np.array([[0, 1, 0], [1, 0, 0]])
    assert hit_at_one(predictions, labels) == 0.5
    assert evaluate(predictions, labels)["hit_at_one"] == 0.5


def test_perr_video_without_labels_scores_zero_and_counts():
    predictions = np.array([[0.9, 0.1, 0.8], [0.9, 0.1, 0.8]])
    labels = np.array([[1, 0, 0], [0, 0, 0]])
    # Video 0: 1 label, top 1 = c0 -> 1. Video 1: no labels -> 0. Mean over 2 videos = 0.5.
    np.testing.assert_array_equal(perr_per_video(predictions, labels), [1.0, 0.0])
    assert perr(predictions, labels) == 0.5
    assert evaluate(predictions, labels)["perr"] == 0.5


def test_perr_ignores_non_positive_scores():
    # The top class is a label but its score is 0, not > 0: PERR 0, Hit@1 still 1.
    predictions = np.array([[0.0, -1.0, -2.0]])
    labels = np.array([[1, 0, 0]])
    assert perr(predictions, labels) == 0.0
    assert hit_at_one(predictions, labels) == 1.0


def test_perr_with_more_labels_than_top_k():
    predictions = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    labels = np.array([[1, 1, 0, 1, 1]])
    # 4 labels; top 4 = c0..c3 of which c0, c1, c3 are labels -> 3/4, even with top_k = 2.
    assert evaluate(predictions, labels, top_k=2)["perr"] == pytest.approx(0.75, abs=1e-12)


def test_no_positives_at_all():
    predictions = np.array([[0.2, 0.7], [0.6, 0.1]])
    labels = np.zeros((2, 2))
    result = evaluate(predictions, labels)
    # P = 0: GAP 0, every class AP 0, no class present.
    assert result["gap"] == 0.0
    assert result["map"] == 0.0
    assert result["map_present"] == 0.0
    assert result["perr"] == 0.0
    metrics = EvaluationMetrics(2)
    metrics.accumulate(predictions, labels)
    assert metrics.precision_recall_curve(2)["recall"] == [0.0, 0.0]


def test_top_k_boundary_ties_keep_lowest_class_index():
    predictions = np.array([[0.5, 0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    np.testing.assert_array_equal(top_k_by_row(predictions, 2), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(top_k_by_row(predictions, 3), [[1, 0, 2], [0, 1, 2]])
    np.testing.assert_array_equal(top_k_by_row(predictions, 9), [[1, 0, 2, 3, 4], [0, 1, 2, 3, 4]])


def test_global_ties_follow_arrival_order():
    # Our defined rule (the official code shuffles tied pairs): equal scores rank in the
    # order the videos arrived. One class, two videos with score .5: negative first, then positive.
    predictions = np.array([[0.5], [0.5]])
    labels = np.array([[0], [1]])
    # Ranking -, +: AP = (1/2) / 1.
    assert evaluate(predictions, labels)["gap"] == 0.5
    # Arrival order is kept across batches too.
    assert evaluate(predictions, labels, batch_sizes=[1, 1])["gap"] == 0.5
    assert evaluate(predictions[::-1], labels[::-1])["gap"] == 1.0


def test_average_precision_from_pairs_by_hand():
    # Ranked .9+ .5- .3+ with 4 positives overall: (1/1 + 2/3) / 4 = 5/12.
    ap = average_precision_from_pairs([0.3, 0.9, 0.5], [1, 1, 0], num_positives=4)
    assert ap == pytest.approx(5 / 12, abs=1e-12)
    assert average_precision_from_pairs([0.3], [0], num_positives=0) == 0.0
    with pytest.raises(ValueError):
        average_precision_from_pairs([0.3, 0.9], [1, 1], num_positives=1)


def test_per_class_average_precision_by_hand():
    # Class 0: .9+ .2+ with 3 positives -> (1 + 1) / 3; class 1: .8- .4+ -> 1/2; class 2 empty.
    aps = per_class_average_precision(
        scores=[0.2, 0.8, 0.9, 0.4], is_positive=[1, 0, 1, 1], classes=[0, 1, 0, 1],
        class_positives=[3, 1, 0],
    )
    np.testing.assert_allclose(aps, [2 / 3, 0.5, 0.0], atol=1e-12)


def test_class_prior_predictions():
    prior = class_prior_predictions([10, 0, 5], num_train_videos=20, batch_size=4)
    assert prior.shape == (4, 3)
    assert prior.dtype == np.float64
    np.testing.assert_allclose(prior, np.tile([0.5, 0.0, 0.25], (4, 1)))
    with pytest.raises(ValueError):
        class_prior_predictions([10, 0], num_train_videos=0, batch_size=1)
    with pytest.raises(ValueError):
        class_prior_predictions([30], num_train_videos=20, batch_size=1)


def test_accepts_label_and_prediction_dtypes():
    predictions = SMALL_PREDICTIONS
    expected = evaluate(predictions, SMALL_LABELS, top_k=2)
    for labels in (SMALL_LABELS.astype(bool), SMALL_LABELS.astype(np.float32), SMALL_LABELS.astype(np.uint8)):
        result = evaluate(predictions.astype(np.float32), labels, top_k=2)
        for key in SCALAR_KEYS:
            assert result[key] == pytest.approx(expected[key], abs=1e-7)


@pytest.mark.parametrize(
    "predictions, labels",
    [
        (np.zeros((2, 4)), np.zeros((2, 3))),
        (np.zeros((2, 3)), np.zeros((2, 3))),  # 3 classes for a 4-class accumulator
        (np.zeros(4), np.zeros(4)),
        (np.full((1, 4), np.nan), np.zeros((1, 4))),
    ],
)
def test_accumulate_rejects_bad_input(predictions, labels):
    metrics = EvaluationMetrics(4)
    with pytest.raises(ValueError) as error:
        metrics.accumulate(predictions, labels)
    assert "\n" not in str(error.value)


def test_get_without_videos_raises_and_empty_batch_is_ignored():
    metrics = EvaluationMetrics(3)
    metrics.accumulate(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError):
        metrics.get()
    with pytest.raises(ValueError):
        metrics.precision_recall_curve()


def test_get_can_be_called_repeatedly_while_streaming():
    metrics = EvaluationMetrics(4, top_k=2)
    metrics.accumulate(SMALL_PREDICTIONS[:2], SMALL_LABELS[:2])
    metrics.get()
    metrics.accumulate(SMALL_PREDICTIONS[2:], SMALL_LABELS[2:])
    assert metrics.get()["gap"] == pytest.approx(0.5, abs=1e-12)
    assert metrics.get()["num_videos"] == 3


def random_batch_sizes(rng: np.random.Generator, total: int) -> list[int]:
    sizes = []
    while total > 0:
        sizes.append(int(rng.integers(1, min(total, 40) + 1)))
        total -= sizes[-1]
    return sizes


@pytest.mark.parametrize("seed", range(3))
def test_invariant_to_batch_splitting_even_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Scores rounded to 1 decimal: many ties, which our arrival-order rule makes deterministic.
    predictions = np.round(rng.random((300, 30)), 1)
    labels = rng.random((300, 30)) < 0.1
    whole = evaluate(predictions, labels, top_k=5)
    split = evaluate(predictions, labels, top_k=5, batch_sizes=random_batch_sizes(rng, 300))
    for key in SCALAR_KEYS:
        assert split[key] == pytest.approx(whole[key], abs=1e-12)
    np.testing.assert_allclose(split["per_class_ap"], whole["per_class_ap"], atol=1e-12)
    np.testing.assert_array_equal(split["class_positives"], whole["class_positives"])


# ---- property tests against a naive loop implementation of the official code ----


def naive_average_precision(pairs: list[tuple[float, bool]], num_positives: int) -> float:
    if num_positives == 0:
        return 0.0
    ranked = sorted(pairs, key=lambda pair: pair[0], reverse=True)
    positives_seen, total = 0, 0.0
    for rank, (_, is_positive) in enumerate(ranked, start=1):
        if is_positive:
            positives_seen += 1
            total += positives_seen / rank
    return total / num_positives


def naive_metrics(predictions: np.ndarray, labels: np.ndarray, top_k: int) -> dict:
    num_videos, num_classes = predictions.shape
    hits, perrs, pairs = [], [], []
    for video in range(num_videos):
        scores = [float(s) for s in predictions[video]]
        truth = [bool(t) for t in labels[video]]
        ranked = sorted(range(num_classes), key=lambda c: scores[c], reverse=True)
        hits.append(1.0 if truth[ranked[0]] else 0.0)
        num_labels = sum(truth)
        if num_labels == 0:
            perrs.append(0.0)
        else:
            correct = sum(1 for c in ranked[:num_labels] if truth[c] and scores[c] > 0)
            perrs.append(correct / num_labels)
        for c in ranked[:top_k]:
            pairs.append((scores[c], truth[c], c))
    class_positives = [sum(bool(labels[v][c]) for v in range(num_videos)) for c in range(num_classes)]
    per_class_ap = [
        naive_average_precision([(s, t) for s, t, c in pairs if c == cls], class_positives[cls])
        for cls in range(num_classes)
    ]
    present = [ap for ap, count in zip(per_class_ap, class_positives) if count > 0]
    return {
        "gap": naive_average_precision([(s, t) for s, t, _ in pairs], sum(class_positives)),
        "map": sum(per_class_ap) / num_classes,
        "map_present": sum(present) / len(present) if present else 0.0,
        "hit_at_one": sum(hits) / num_videos,
        "perr": sum(perrs) / num_videos,
        "per_class_ap": per_class_ap,
        "class_positives": class_positives,
    }


@st.composite
def distinct_score_problems(draw):
    num_videos = draw(st.integers(1, 12))
    num_classes = draw(st.integers(1, 8))
    shape = (num_videos, num_classes)
    # Distinct scores everywhere, so no tie order is involved; negatives exercise PERR's score > 0.
    predictions = draw(
        hnp.arrays(np.float64, shape, elements=st.floats(-1, 1, allow_nan=False, width=32), unique=True)
    )
    labels = draw(hnp.arrays(np.bool_, shape))
    top_k = draw(st.integers(1, 10))
    cuts = draw(st.lists(st.integers(1, num_videos - 1), max_size=4)) if num_videos > 1 else []
    edges = [0, *sorted(set(cuts)), num_videos]
    batch_sizes = [end - start for start, end in zip(edges, edges[1:])]
    return predictions, labels, top_k, batch_sizes


@settings(max_examples=200, deadline=None)
@given(distinct_score_problems())
def test_matches_naive_implementation(problem):
    predictions, labels, top_k, batch_sizes = problem
    expected = naive_metrics(predictions, labels, top_k)
    result = evaluate(predictions, labels, top_k=top_k, batch_sizes=batch_sizes)
    for key in SCALAR_KEYS:
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    np.testing.assert_allclose(result["per_class_ap"], expected["per_class_ap"], atol=1e-9)
    np.testing.assert_array_equal(result["class_positives"], expected["class_positives"])
    assert result["num_videos"] == len(predictions)


@st.composite
def tied_score_problems(draw):
    num_videos = draw(st.integers(1, 12))
    num_classes = draw(st.integers(1, 8))
    shape = (num_videos, num_classes)
    predictions = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([-0.5, 0.0, 0.25, 0.5, 1.0])))
    labels = draw(hnp.arrays(np.bool_, shape))
    return predictions, labels, draw(st.integers(1, 10))


@settings(max_examples=100, deadline=None)
@given(tied_score_problems())
def test_matches_naive_implementation_under_our_tie_rule(problem):
    # The naive code's stable sorts implement our rule: lower class index first within a
    # video, arrival order in the global ranking. The official code leaves both to chance.
    predictions, labels, top_k = problem
    expected = naive_metrics(predictions, labels, top_k)
    result = evaluate(predictions, labels, top_k=top_k)
    for key in SCALAR_KEYS:
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    np.testing.assert_allclose(result["per_class_ap"], expected["per_class_ap"], atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(distinct_score_problems())
def test_pure_functions_match_naive_implementation(problem):
    predictions, labels, top_k, _ = problem
    expected = naive_metrics(predictions, labels, top_k)
    assert hit_at_one(predictions, labels) == pytest.approx(expected["hit_at_one"], abs=1e-9)
    assert perr(predictions, labels) == pytest.approx(expected["perr"], abs=1e-9)
    ranked = top_k_by_row(predictions, top_k)
    assert ranked.shape == (len(predictions), min(top_k, predictions.shape[1]))
    for row, classes in zip(predictions, ranked):
        assert list(classes) == sorted(range(len(row)), key=lambda c: -row[c])[: len(classes)]
