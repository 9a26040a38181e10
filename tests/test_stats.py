"""Tests of yt8m_qrnn.metrics.stats: weighted top-k metrics against EvaluationMetrics, the seed
interval against a hand-computed case, and the bootstrap intervals and paired test."""
from __future__ import annotations

import numpy as np
import pytest

from yt8m_qrnn.metrics.official import EvaluationMetrics
from yt8m_qrnn.metrics.stats import (
    TopK,
    bootstrap_interval,
    paired_bootstrap,
    seed_interval,
    topk_metrics,
)

METRIC_KEYS = ("gap", "map", "map_present", "hit_at_one", "perr")


def random_labels(rng, num_videos, num_classes, max_labels, share_unlabelled=0.05):
    labels = []
    for _ in range(num_videos):
        count = 0 if rng.random() < share_unlabelled else rng.integers(1, max_labels + 1)
        labels.append(rng.choice(num_classes, size=count, replace=False))
    return labels


def dense(labels, num_classes):
    matrix = np.zeros((len(labels), num_classes), dtype=np.float32)
    for row, video_labels in enumerate(labels):
        matrix[row, video_labels] = 1
    return matrix


def noisy_predictions(rng, labels, num_classes, signal):
    """float32 (stored exactly by TopK): signal * labels + uniform noise."""
    noise = rng.random((len(labels), num_classes))
    return (signal * dense(labels, num_classes) + noise).astype(np.float32)


def make_case(seed, num_videos=300, num_classes=50, max_labels=4, signal=0.5):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, num_videos, num_classes, max_labels)
    predictions = noisy_predictions(rng, labels, num_classes, signal)
    ids = np.array([f"v{i:05d}" for i in range(num_videos)])
    return ids, predictions, labels


def official(predictions, labels, num_classes, top_k):
    metrics = EvaluationMetrics(num_classes, top_k=top_k)
    metrics.accumulate(predictions, dense(labels, num_classes))
    return metrics.get()


@pytest.mark.parametrize(
    "num_classes, max_labels, top_k, quantize",
    [
        (50, 4, 20, False),
        (50, 8, 3, False),    # videos with more labels than k
        (50, 4, 60, False),   # k larger than the number of classes
        (50, 4, 20, True),    # many tied scores: arrival order must break ties as in metrics.py
        (400, 3, 20, False),  # most classes have no positives: MAP averages over all of them
    ],
)
def test_unweighted_metrics_equal_evaluation_metrics(num_classes, max_labels, top_k, quantize):
    ids, predictions, labels = make_case(1, num_classes=num_classes, max_labels=max_labels)
    if quantize:
        predictions = np.round(predictions, 1)
    topk = TopK.from_predictions(ids, predictions, labels, num_classes, top_k=top_k)
    ours = topk_metrics(topk)
    expected = official(predictions, labels, num_classes, top_k)
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), key
    if num_classes == 400:  # absent classes score 0 in map, not in map_present
        assert 0 < ours["map"] < ours["map_present"]


def test_topk_fields():
    ids, predictions, labels = make_case(2, num_videos=20, num_classes=10, max_labels=3)
    topk = TopK.from_predictions(ids, predictions, labels, 10, top_k=4)
    assert topk.classes.shape == (20, 4) and topk.classes.dtype == np.int32
    assert np.all(np.diff(topk.scores, axis=1) <= 0)
    for video in range(20):
        stored = topk.label_values[topk.label_offsets[video]:topk.label_offsets[video + 1]]
        assert sorted(stored.tolist()) == sorted(labels[video].tolist())
        assert topk.positive[video].tolist() == [c in labels[video] for c in topk.classes[video]]
    assert topk.num_labels.tolist() == [len(v) for v in labels]


def duplicated(ids, predictions, labels, extra):
    rows = np.concatenate([np.arange(len(ids)), extra])
    return ids[rows], predictions[rows], [labels[r] for r in rows]


def test_integer_weights_match_repeated_videos():
    num_classes, top_k = 50, 20
    ids, predictions, labels = make_case(3, num_classes=num_classes)
    topk = TopK.from_predictions(ids, predictions, labels, num_classes, top_k)
    extra = np.random.default_rng(0).choice(len(ids), size=60, replace=False)
    repeated = TopK.from_predictions(*duplicated(ids, predictions, labels, extra), num_classes, top_k)
    weights = np.ones(len(ids))
    weights[extra] = 2
    weighted, physical = topk_metrics(topk, weights), topk_metrics(repeated)
    official_repeated = official(*duplicated(ids, predictions, labels, extra)[1:], num_classes, top_k)
    for key in ("hit_at_one", "perr"):
        assert weighted[key] == pytest.approx(physical[key], rel=1e-12)
        assert weighted[key] == pytest.approx(official_repeated[key], abs=1e-6)
    # A duplicated positive pair is scored by the midpoint rule: 2 (P0 + 1.5) / (N0 + 1.5)
    # instead of (P0 + 1) / (N0 + 1) + (P0 + 2) / (N0 + 2); the error is largest near the
    # top of a ranking with few positives, i.e. for a single class's AP.
    # Measured: about 5e-9 for GAP and 1e-5 for MAP on these data; tolerances 200x / 10x that.
    assert weighted["gap"] == pytest.approx(physical["gap"], abs=1e-6)
    assert weighted["map"] == pytest.approx(physical["map"], abs=1e-4)
    assert weighted["gap"] != physical["gap"]  # the approximation is really in use here


def test_weights_exact_when_repeated_videos_have_no_positive_pairs():
    num_classes, top_k = 50, 20
    ids, predictions, labels = make_case(4, num_classes=num_classes)
    topk = TopK.from_predictions(ids, predictions, labels, num_classes, top_k)
    without_positive_pairs = np.flatnonzero(~topk.positive.any(axis=1))
    assert without_positive_pairs.size >= 10
    extra = np.repeat(without_positive_pairs[:10], 3)
    repeated = TopK.from_predictions(*duplicated(ids, predictions, labels, extra), num_classes, top_k)
    weights = np.ones(len(ids))
    weights[without_positive_pairs[:10]] = 4
    weighted, physical = topk_metrics(topk, weights), topk_metrics(repeated)
    for key in METRIC_KEYS:
        assert weighted[key] == pytest.approx(physical[key], rel=1e-12, abs=1e-15), key


def test_zero_weights_equal_dropping_videos():
    num_classes, top_k = 50, 20
    ids, predictions, labels = make_case(5, num_classes=num_classes)
    topk = TopK.from_predictions(ids, predictions, labels, num_classes, top_k)
    kept = np.random.default_rng(1).random(len(ids)) < 0.6
    subset = TopK.from_predictions(
        ids[kept], predictions[kept], [v for v, k in zip(labels, kept) if k], num_classes, top_k)
    weighted, expected = topk_metrics(topk, kept.astype(int)), topk_metrics(subset)
    for key in METRIC_KEYS:
        assert weighted[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key


def test_two_dimensional_weights_equal_row_by_row():
    ids, predictions, labels = make_case(6)
    topk = TopK.from_predictions(ids, predictions, labels, 50, 20)
    weights = np.random.default_rng(2).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=7)
    together = topk_metrics(topk, weights)
    for key in METRIC_KEYS:
        assert together[key].shape == (7,)
        one_by_one = [topk_metrics(topk, row)[key] for row in weights]
        np.testing.assert_allclose(together[key], one_by_one, rtol=1e-12, atol=1e-15)
    assert np.ptp(together["gap"]) > 0


@pytest.mark.parametrize("bad", [np.full(300, -1.0), np.full(300, 0.5), np.zeros(300), np.ones(299)])
def test_bad_weights_raise(bad):
    ids, predictions, labels = make_case(6)
    topk = TopK.from_predictions(ids, predictions, labels, 50, 20)
    with pytest.raises(ValueError):
        topk_metrics(topk, bad)


def test_seed_interval_hand_computed():
    mean, half_width = seed_interval([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302653, sample std = 1, so 4.302653 / sqrt(3).
    assert mean == 2.0
    assert half_width == pytest.approx(4.302653 / np.sqrt(3), abs=1e-6)
    assert half_width == pytest.approx(2.48414, abs=1e-5)
    mean, half_width = seed_interval([0.4, 0.4, 0.4, 0.4], confidence=0.9)
    assert (mean, half_width) == (pytest.approx(0.4), pytest.approx(0.0))
    mean, half_width = seed_interval([0.7])
    assert mean == 0.7 and np.isnan(half_width)


def seeds_of(seed, num_videos, num_seeds=2, signal=0.5):
    """TopKs of several 'training seeds': the same videos, predictions with fresh noise."""
    ids, _, labels = make_case(seed, num_videos=num_videos)
    rng = np.random.default_rng(seed + 100)
    return [
        TopK.from_predictions(ids, noisy_predictions(rng, labels, 50, signal), labels, 50, 20)
        for _ in range(num_seeds)
    ]


def test_bootstrap_interval_contains_estimate_and_is_deterministic():
    topks = seeds_of(7, num_videos=200)
    result = bootstrap_interval(topks, "gap", n_resamples=300, seed=3)
    assert result["estimate"] == pytest.approx(np.mean([topk_metrics(t)["gap"] for t in topks]))
    assert result["low"] < result["estimate"] < result["high"]
    assert result["distribution"].shape == (300,)
    again = bootstrap_interval(topks, "gap", n_resamples=300, seed=3)
    np.testing.assert_array_equal(again["distribution"], result["distribution"])
    other_seed = bootstrap_interval(topks, "gap", n_resamples=300, seed=4)
    assert not np.array_equal(other_seed["distribution"], result["distribution"])


@pytest.mark.parametrize("metric", ["gap", "hit_at_one"])
def test_bootstrap_width_shrinks_like_one_over_sqrt_videos(metric):
    small = bootstrap_interval(seeds_of(8, num_videos=200, num_seeds=1), metric, n_resamples=400)
    large = bootstrap_interval(seeds_of(9, num_videos=800, num_seeds=1), metric, n_resamples=400)
    ratio = (small["high"] - small["low"]) / (large["high"] - large["low"])
    assert 1.3 < ratio < 3.0  # sqrt(800 / 200) = 2


def test_bootstrap_rejects_mismatched_ids_and_unknown_metric():
    first, second = seeds_of(10, num_videos=50)
    second.ids = second.ids[::-1].copy()
    with pytest.raises(ValueError, match="same video ids"):
        bootstrap_interval([first, second], "gap", n_resamples=10)
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_interval([first], "auc", n_resamples=10)


def test_paired_bootstrap_model_against_itself():
    topks = seeds_of(11, num_videos=200)
    result = paired_bootstrap(topks, topks, "map", n_resamples=200)
    assert result["difference"] == 0.0
    assert result["low"] == result["high"] == 0.0
    assert result["p_value"] == 1.0
    assert not result["significant"]


def test_paired_bootstrap_detects_a_better_model():
    ids, _, labels = make_case(12, num_videos=200)
    rng = np.random.default_rng(5)
    # labels + small noise (10 * labels + U(0, 1), rescaled) against pure noise.
    good = [TopK.from_predictions(ids, noisy_predictions(rng, labels, 50, 10.0) / 10, labels, 50)]
    noise = [TopK.from_predictions(ids, noisy_predictions(rng, labels, 50, 0.0), labels, 50)]
    for metric in ("gap", "hit_at_one"):
        result = paired_bootstrap(good, noise, metric, n_resamples=500)
        assert result["difference"] > 0.3
        assert result["p_value"] < 0.01
        assert result["significant"] and result["low"] > 0
        reverse = paired_bootstrap(noise, good, metric, n_resamples=500)
        assert reverse["difference"] == pytest.approx(-result["difference"])
        assert reverse["significant"] and reverse["high"] < 0


def test_paired_bootstrap_rejects_mismatched_ids():
    (a,) = seeds_of(13, num_videos=50, num_seeds=1)
    (b,) = seeds_of(13, num_videos=50, num_seeds=1)
    b.ids = np.array([f"other{i}" for i in range(50)])
    with pytest.raises(ValueError, match="same video ids"):
        paired_bootstrap([a], [b], "gap", n_resamples=10)


def test_save_load_round_trip(tmp_path):
    (topk,) = seeds_of(14, num_videos=40, num_seeds=1)
    path = tmp_path / "model.topk.npz"
    topk.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    loaded = TopK.load(path)
    for name in ("ids", "classes", "scores", "positive", "num_labels", "label_offsets",
                 "label_values", "hit_at_one", "perr"):
        original, restored = getattr(topk, name), getattr(loaded, name)
        assert restored.dtype == original.dtype, name
        np.testing.assert_array_equal(restored, original, err_msg=name)
    assert loaded.num_classes == topk.num_classes
    assert topk_metrics(loaded) == topk_metrics(topk)


def test_load_missing_key_names_the_file(tmp_path):
    (topk,) = seeds_of(15, num_videos=10, num_seeds=1)
    path = tmp_path / "broken.npz"
    arrays = {name: getattr(topk, name) for name in ("ids", "classes", "scores")}
    np.savez_compressed(path, **arrays)
    with pytest.raises(ValueError, match="broken.npz.*missing.*positive") as error:
        TopK.load(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("metric", METRIC_KEYS)
def test_bootstrap_estimate_is_the_seed_mean_of_each_metric(metric):
    topks = seeds_of(16, num_videos=60, num_seeds=3)
    result = bootstrap_interval(topks, metric, n_resamples=20)
    assert result["estimate"] == pytest.approx(np.mean([topk_metrics(t)[metric] for t in topks]), rel=1e-12)
    assert result["low"] <= result["high"]


def test_concatenated_batches_equal_the_whole():
    rng = np.random.default_rng(7)
    predictions = rng.random((90, 30), dtype=np.float32)
    labels = [rng.choice(30, size=rng.integers(1, 4), replace=False) for _ in range(90)]
    ids = np.array([f"v{i}" for i in range(90)])
    whole = TopK.from_predictions(ids, predictions, labels, 30, top_k=5)
    parts = [TopK.from_predictions(ids[a:b], predictions[a:b], labels[a:b], 30, top_k=5)
             for a, b in ((0, 40), (40, 41), (41, 90))]
    joined = TopK.concatenate(parts)
    for name in ("ids", "classes", "scores", "positive", "num_labels", "label_offsets", "label_values",
                 "hit_at_one", "perr"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name), err_msg=name)
    assert topk_metrics(joined) == topk_metrics(whole)
