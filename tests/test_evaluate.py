"""The evaluate stage: Kaggle submission format, per-class CSV, class-prior baseline,
vocabulary loading, and evaluate_model end to end on a tiny Keras model."""
from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_YT8M
from yt8m_qrnn.stages import evaluate as ev
from yt8m_qrnn.metrics.official import EvaluationMetrics, class_prior_predictions

NUM_CLASSES = 30
TOP_K = 20


def parse_pairs(text: str) -> list[tuple[int, float]]:
    tokens = text.split()
    assert len(tokens) % 2 == 0
    return [(int(c), float(s)) for c, s in zip(tokens[::2], tokens[1::2])]


def read_submission(path) -> list[tuple[str, list[tuple[int, float]]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["VideoId", "LabelConfidencePairs"]
    return [(video, parse_pairs(pairs)) for video, pairs in rows[1:]]


# ---------------------------------------------------------------- Kaggle format

def test_top_pairs_are_the_top_k_by_score_ties_to_the_lower_class():
    rng = np.random.default_rng(0)
    predictions = rng.random((5, NUM_CLASSES)).astype(np.float32)
    predictions[0, :] = 0.5  # all tied: classes 0..19 in order
    for row, text in zip(predictions, ev.top_pairs(predictions, TOP_K)):
        pairs = parse_pairs(text)
        assert len(pairs) == TOP_K
        classes = [c for c, _ in pairs]
        assert len(set(classes)) == TOP_K
        expected = sorted(range(NUM_CLASSES), key=lambda c: (-row[c], c))[:TOP_K]
        assert classes == expected
        assert all(abs(s - row[c]) < 1e-6 for c, s in pairs)
    assert [c for c, _ in parse_pairs(ev.top_pairs(predictions, TOP_K)[0])] == list(range(TOP_K))
    assert len(parse_pairs(ev.top_pairs(predictions[:, :7], TOP_K)[0])) == 7  # fewer classes than k


def test_submission_csv_format(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "submission.csv"
    ids = [f"v{i:03d}" for i in range(37)]
    with ev.PairsWriter(path, TOP_K) as out:
        for start in range(0, len(ids), 16):
            out.write(ids[start:start + 16], rng.random((len(ids[start:start + 16]), NUM_CLASSES)))
        out.write([], np.zeros((0, NUM_CLASSES)))
    assert out.rows == len(ids)
    assert path.read_text().splitlines()[0] == "VideoId,LabelConfidencePairs"
    rows = read_submission(path)
    assert [video for video, _ in rows] == ids
    for _, pairs in rows:
        assert len(pairs) == TOP_K
        scores = [s for _, s in pairs]
        assert scores == sorted(scores, reverse=True)
        assert all(0 <= c < NUM_CLASSES for c, _ in pairs)
    assert not list(tmp_path.glob(".*tmp*"))


def test_submission_left_untouched_on_failure(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with ev.PairsWriter(path, TOP_K) as out:
            out.write(["a"], np.ones((1, NUM_CLASSES)))
            raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


# ---------------------------------------------------------------- per-class table and baseline

def random_rows(rng, n, subset, level="video", num_classes=NUM_CLASSES):
    labels = [np.unique(rng.choice(num_classes, size=rng.integers(0, 4), p=class_frequencies(num_classes)))
              for _ in range(n)]
    return pd.DataFrame({"id": [f"{subset}{i}" for i in range(n)], "subset": subset, "level": level,
                         "labels": labels, "shard": "s", "num_frames": 1})


def class_frequencies(num_classes):
    weights = 1.0 / np.arange(1, num_classes + 1)
    return weights / weights.sum()


def test_per_class_csv_columns_and_rows():
    rng = np.random.default_rng(2)
    train, evaluation = random_rows(rng, 200, "train"), random_rows(rng, 80, "eval")
    metrics = EvaluationMetrics(NUM_CLASSES, TOP_K)
    metrics.accumulate(rng.random((80, NUM_CLASSES)), ev._label_matrix(evaluation, NUM_CLASSES))
    result = metrics.get()
    counts = ev.label_counts(train, NUM_CLASSES)
    names = {0: "Game", 1: "Video game"}
    table = ev.per_class_table(result, counts, names)
    assert tuple(table.columns) == ev.PER_CLASS_COLUMNS
    seen = (result["class_positives"] > 0) | (counts > 0)
    assert list(table["class"]) == list(np.flatnonzero(seen))
    assert table.loc[table["class"] == 0, "name"].item() == "Game"
    other = table[table["class"] > 1]
    assert (other["name"] == [f"class {c}" for c in other["class"]]).all()
    np.testing.assert_array_equal(table["eval_positives"], result["class_positives"][seen])
    np.testing.assert_array_equal(table["train_positives"], counts[seen])
    np.testing.assert_allclose(table["ap"], result["per_class_ap"][seen])
    assert counts.sum() == sum(len(labels) for labels in train["labels"])


def test_class_prior_metrics_are_sane():
    rng = np.random.default_rng(3)
    train, evaluation = random_rows(rng, 400, "train"), random_rows(rng, 150, "eval")
    prior = ev.class_prior_metrics(train, evaluation, NUM_CLASSES, TOP_K, batch_size=32)
    assert set(prior) == set(ev.METRIC_KEYS)
    assert all(0.0 <= v <= 1.0 for v in prior.values())
    # every video gets the same scores: Hit@1 is the share of eval videos carrying the most frequent train class
    counts = ev.label_counts(train, NUM_CLASSES)
    top = int(np.argmax(counts))
    assert prior["hit_at_one"] == pytest.approx(np.mean([top in labels for labels in evaluation["labels"]]))
    # independent of the batch size, and the same as scoring the tiled prior in one go
    assert ev.class_prior_metrics(train, evaluation, NUM_CLASSES, TOP_K, batch_size=1000) == pytest.approx(prior)
    whole = EvaluationMetrics(NUM_CLASSES, TOP_K)
    whole.accumulate(class_prior_predictions(counts, len(train), len(evaluation)),
                     ev._label_matrix(evaluation, NUM_CLASSES))
    assert {k: v for k, v in whole.get().items() if k in ev.METRIC_KEYS} == pytest.approx(prior)
    # the prior is non-trivial on Zipf-like labels, and a model that knows the labels beats it
    assert prior["gap"] > 0.1
    oracle = EvaluationMetrics(NUM_CLASSES, TOP_K)
    oracle.accumulate(ev._label_matrix(evaluation, NUM_CLASSES) + 0.01 * rng.random((150, NUM_CLASSES)),
                      ev._label_matrix(evaluation, NUM_CLASSES))
    assert oracle.get()["gap"] > prior["gap"]


# ---------------------------------------------------------------- vocabulary

VOCAB = (
    "Index,TrainVideoCount,KnowledgeGraphId,Name,WikiUrl,Vertical1,Vertical2,Vertical3,WikiDescription\n"
    "2,415890,/m/07yv9,Vehicle,https://en.wikipedia.org/wiki/Vehicle,Autos & Vehicles,,,\"A vehicle, \"\"mobile\"\"\"\n"
    "0,788288,/m/03bt1gh,Game,https://en.wikipedia.org/wiki/Game,Games,,,\"A game,\nover two lines\"\n"
    "1,539945,/m/01mw1,,,,,,\n"
)


def test_load_vocabulary_unsorted_rows_and_empty_names(tmp_path):
    path = tmp_path / "vocabulary.csv"
    path.write_text(VOCAB)
    assert ev.load_vocabulary(path, 3862) == {0: "Game", 1: "/m/01mw1", 2: "Vehicle"}


def test_load_label_names_format(tmp_path):
    path = tmp_path / "label_names.csv"
    path.write_text("label_id,label_name\n0,Games\n1,Beauty, Fitness\n")
    assert ev.load_vocabulary(path) == {0: "Games", 1: "Beauty, Fitness"}


@pytest.mark.parametrize("text, message", [
    ("Index,Name\n0,a\n0,b\n", "listed twice"),
    ("Index,Name\nx,a\n", "not an integer"),
    ("Index,Name\n5,a\n", "out of range"),
    ("foo,bar\n1,2\n", "not a vocabulary file"),
    ("Index,Name\n", "no classes"),
])
def test_load_vocabulary_errors(tmp_path, text, message):
    path = tmp_path / "vocabulary.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        ev.load_vocabulary(path, num_classes=5)


def test_find_vocabulary(tmp_path):
    root = tmp_path / "yt8m"
    assert ev.find_vocabulary({}, root, 2) is None
    (root / "2").mkdir(parents=True)
    (root / "vocabulary.csv").write_text(VOCAB)
    assert ev.find_vocabulary({}, root, 2) == root / "vocabulary.csv"
    (root / "2" / "vocabulary.csv").write_text(VOCAB)
    assert ev.find_vocabulary({}, root, 2) == root / "2" / "vocabulary.csv"
    assert ev.find_vocabulary({"vocabulary": str(root / "vocabulary.csv")}, root, 2) == root / "vocabulary.csv"
    with pytest.raises(ValueError, match="evaluate.vocabulary"):
        ev.find_vocabulary({"vocabulary": str(tmp_path / "absent.csv")}, root, 2)


def test_real_2018_vocabulary():
    path = SHARED_YT8M / "2018" / "vocabulary.csv"
    if not path.exists():
        pytest.skip(f"real YouTube-8M vocabulary not found at {path}")
    names = ev.load_vocabulary(path, 3862)
    assert sorted(names) == list(range(3862))
    assert names[0] == "Game" and names[1] == "Video game"
    raw = pd.read_csv(path)
    empty = raw[raw["Name"].isna()]
    assert len(empty) == 56
    for _, row in empty.iterrows():
        assert names[int(row["Index"])] == row["KnowledgeGraphId"]
    reference = SHARED_YT8M / "2018" / "label_names_2018.csv"
    if reference.exists():
        assert ev.load_vocabulary(reference, 3862) == names
    with pytest.raises(ValueError, match="out of range"):
        ev.load_vocabulary(path, 1000)


# ---------------------------------------------------------------- the stage, end to end

FEATURES = 6


@pytest.fixture
def tiny_model(tmp_path):
    """Two seeds' models: the same network, different initial weights."""
    import keras

    paths = {}
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(shape=(FEATURES,), name="features")
        outputs = keras.layers.Dense(NUM_CLASSES, activation="sigmoid", name="logistic")(inputs)
        paths[seed] = tmp_path / f"seed-{seed}.keras"
        keras.Model({"features": inputs}, outputs).save(paths[seed])
    return paths


def test_evaluate_model_writes_every_output(tmp_path, tiny_model, monkeypatch):
    from yt8m_qrnn.data import batches as data_lib

    rng = np.random.default_rng(4)
    index = pd.concat([random_rows(rng, 60, "train"), random_rows(rng, 45, "eval"), random_rows(rng, 13, "test"),
                       random_rows(rng, 10, "eval", level="frame")], ignore_index=True)
    index["id"] = [f"id{i:03d}" for i in range(len(index))]
    index.to_parquet(tmp_path / "index.parquet")
    features = {vid: rng.normal(size=FEATURES).astype(np.float32) for vid in index["id"]}

    def fake_batches(data_root, rows, level, version, num_classes, batch_size, **_):
        assert level == "video" and set(rows["level"]) == {"video"}
        for start in range(0, len(rows), batch_size):
            batch = rows.iloc[start:start + batch_size]
            yield (batch["id"].to_numpy(str), {"features": np.stack([features[v] for v in batch["id"]])},
                   data_lib.label_matrix(batch, num_classes))

    monkeypatch.setattr(data_lib, "one_pass", fake_batches)
    data_root = tmp_path / "yt8m"
    (data_root / "2").mkdir(parents=True)
    (data_root / "2" / "vocabulary.csv").write_text(VOCAB)
    out = tmp_path / "eval"
    eval_cfg = {"top_k": TOP_K, "batch_size": 16, "pr_curve_points": 11}
    summary = ev.evaluate_model("tiny", {"kind": "logistic", "level": "video"}, eval_cfg, version=2,
                                num_classes=NUM_CLASSES, data_root=data_root, index_path=tmp_path / "index.parquet",
                                model_paths=tiny_model, out_dir=out)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == summary
    assert metrics["num_videos"] == 45 and metrics["num_test_videos"] == 13 and metrics["level"] == "video"
    assert metrics["top_k"] == TOP_K and metrics["num_classes"] == NUM_CLASSES
    assert metrics["vocabulary"] == str(data_root / "2" / "vocabulary.csv")
    for key in ev.METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0 and 0.0 <= metrics["class_prior"][key] <= 1.0
    eval_ids = list(index[(index["subset"] == "eval") & (index["level"] == "video")]["id"])
    test_ids = list(index[index["subset"] == "test"]["id"])
    assert [v for v, _ in read_submission(out / "eval_predictions.csv")] == eval_ids
    submission = read_submission(out / "submission.csv")
    assert [v for v, _ in submission] == test_ids
    assert all(len(pairs) == TOP_K for _, pairs in submission)
    per_class = pd.read_csv(out / "per_class_ap.csv")
    assert tuple(per_class.columns) == ev.PER_CLASS_COLUMNS
    assert per_class.loc[per_class["class"] == 0, "name"].item() == "Game"
    assert per_class.loc[per_class["class"] == 1, "name"].item() == "/m/01mw1"
    pr = pd.read_csv(out / "pr_curve.csv")
    assert list(pr.columns) == ["threshold", "precision", "recall"] and len(pr) == 11
    assert pr["recall"].between(0, 1).all() and pr["precision"].between(0, 1).all()


def test_evaluate_model_scores_each_seed_and_their_ensemble(tmp_path, tiny_model, monkeypatch):
    from yt8m_qrnn.metrics.stats import TopK, seed_interval, topk_metrics

    test_evaluate_model_writes_every_output(tmp_path, tiny_model, monkeypatch)
    out = tmp_path / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["seeds"]) == ["1", "2"]
    assert metrics["seeds"]["1"]["gap"] != metrics["seeds"]["2"]["gap"]  # different models
    for key in ev.METRIC_KEYS:
        mean, half = seed_interval([metrics["seeds"][s][key] for s in ("1", "2")])
        assert metrics[key] == pytest.approx(mean) and metrics["seed_interval"][key] == pytest.approx(half)
    kept = sorted(p.name for p in (out / "predictions").iterdir())
    assert kept == ["ensemble.npz", "ensemble_full.npy", "seed-1.npz", "seed-2.npz"]
    for name, expected in (("seed-1", metrics["seeds"]["1"]), ("seed-2", metrics["seeds"]["2"]),
                           ("ensemble", metrics["ensemble"])):
        topk = TopK.load(out / "predictions" / f"{name}.npz")
        assert topk.num_videos == 45
        for key in ("gap", "map", "hit_at_one", "perr"):
            assert topk_metrics(topk)[key] == pytest.approx(expected[key], abs=1e-6), (name, key)
    full = np.load(out / "predictions" / "ensemble_full.npy")
    assert full.shape == (45, NUM_CLASSES) and full.dtype == np.float16
