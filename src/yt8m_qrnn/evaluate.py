"""Evaluate one trained model on the held-out subset; predict the unlabelled test subset."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from . import data as data_lib
from . import models  # noqa: F401  (registers the custom layers for loading)
from . import qrnn  # noqa: F401
from .io import atomic_path, write_json
from .metrics import EvaluationMetrics, class_prior_predictions

log = logging.getLogger("yt8m_qrnn.evaluate")
METRIC_KEYS = ("gap", "map", "map_present", "hit_at_one", "perr")


def class_prior_metrics(train_rows: pd.DataFrame, eval_rows: pd.DataFrame, num_classes: int, top_k: int,
                        batch_size: int) -> dict:
    """The baseline every model must beat: predict each class's training frequency."""
    counts = np.zeros(num_classes, np.int64)
    for labels in train_rows["labels"]:
        counts[np.asarray(labels, int)] += 1
    metrics = EvaluationMetrics(num_classes, top_k)
    for start in range(0, len(eval_rows), batch_size):
        batch = eval_rows.iloc[start:start + batch_size]
        prior = class_prior_predictions(counts, len(train_rows), len(batch))
        metrics.accumulate(prior, data_lib.label_matrix(batch, num_classes))
    return {k: float(v) for k, v in metrics.get().items() if k in METRIC_KEYS}


def top_pairs(predictions: np.ndarray, k: int) -> list[str]:
    top = np.argsort(-predictions, axis=1, kind="stable")[:, :k]
    return [" ".join(f"{c} {p[c]:.6f}" for c in row) for row, p in zip(top, predictions)]


def write_pairs_csv(path: Path, ids: list[str], pairs: list[str]) -> None:
    """Kaggle format: VideoId,LabelConfidencePairs."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["VideoId", "LabelConfidencePairs"])
        writer.writerows(zip(ids, pairs))


def predict(model, dataset):
    for ids, inputs, labels in dataset:
        predictions = keras.ops.convert_to_numpy(model(inputs, training=False))
        yield [i.decode() for i in ids.numpy()], predictions, labels.numpy()


def evaluate_model(name: str, model_cfg: dict, eval_cfg: dict, *, version: int, num_classes: int, data_root: Path,
                   index_path: Path, model_path: Path, out_dir: Path, label_names: dict[int, str] | None = None) -> dict:
    index = pd.read_parquet(index_path)
    level = model_cfg["level"]
    model = keras.saving.load_model(model_path, compile=False)
    eval_rows = data_lib.subset_rows(index, "eval", level)
    if eval_rows.empty:
        raise ValueError(f"{index_path}: no {level}-level videos in the eval subset")
    dataset = data_lib.make_dataset(data_root, eval_rows, level, version, num_classes, eval_cfg["batch_size"],
                                    with_ids=True)
    metrics = EvaluationMetrics(num_classes, eval_cfg["top_k"])
    eval_ids, eval_pairs = [], []
    for ids, predictions, labels in predict(model, dataset):
        metrics.accumulate(predictions, labels)
        eval_ids += ids
        eval_pairs += top_pairs(predictions, eval_cfg["top_k"])
    result = metrics.get()
    train_rows = data_lib.subset_rows(index, "train", level)
    summary = {k: float(result[k]) for k in METRIC_KEYS} | {
        "num_videos": int(result["num_videos"]),
        "level": level,
        "class_prior": class_prior_metrics(train_rows, eval_rows, num_classes, eval_cfg["top_k"], eval_cfg["batch_size"]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", summary)
    write_pairs_csv(out_dir / "eval_predictions.csv", eval_ids, eval_pairs)
    _write_per_class(out_dir / "per_class_ap.csv", result, train_rows, num_classes, label_names or {})
    _write_pr_curve(out_dir / "pr_curve.csv", metrics.precision_recall_curve(eval_cfg["pr_curve_points"]))
    _write_submission(out_dir / "submission.csv", model, index, level, version, num_classes, data_root, eval_cfg)
    log.info("%s: GAP %.4f MAP %.4f Hit@1 %.4f PERR %.4f on %d videos", name, summary["gap"], summary["map"],
             summary["hit_at_one"], summary["perr"], summary["num_videos"])
    return summary


def _write_per_class(path, result, train_rows, num_classes, label_names):
    train_counts = np.zeros(num_classes, np.int64)
    for labels in train_rows["labels"]:
        train_counts[np.asarray(labels, int)] += 1
    table = pd.DataFrame({
        "class": np.arange(num_classes),
        "name": [label_names.get(c, str(c)) for c in range(num_classes)],
        "eval_positives": result["class_positives"],
        "train_positives": train_counts,
        "ap": result["per_class_ap"],
    })
    table = table[(table["eval_positives"] > 0) | (table["train_positives"] > 0)]
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def _write_pr_curve(path, curve):
    with atomic_path(path) as tmp:
        pd.DataFrame(curve).to_csv(tmp, index=False)


def _write_submission(path, model, index, level, version, num_classes, data_root, eval_cfg):
    test_rows = data_lib.subset_rows(index, "test", level)
    ids, pairs = [], []
    if not test_rows.empty:
        dataset = data_lib.make_dataset(data_root, test_rows, level, version, num_classes, eval_cfg["batch_size"],
                                        with_ids=True)
        for batch_ids, predictions, _ in predict(model, dataset):
            ids += batch_ids
            pairs += top_pairs(predictions, eval_cfg["top_k"])
    write_pairs_csv(path, ids, pairs)
