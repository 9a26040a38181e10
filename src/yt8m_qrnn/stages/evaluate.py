"""Evaluate one trained model on the held-out subset; predict the unlabelled test subset.

Outputs, in the model's results/eval/{model}/ folder:

- metrics.json: GAP@top_k, MAP (2018: every class), map_present (2019: classes with
  positives), Hit@1, PERR, the class-prior baseline on the same videos, and counts
  (a DVC metrics file);
- per_class_ap.csv: class, name, eval_positives, train_positives, ap, one row per class
  seen in the train or eval subset (a DVC plot: AP against class frequency);
- pr_curve.csv: threshold, precision, recall over the pooled top-k pairs (a DVC plot);
- eval_predictions.csv and submission.csv: Kaggle format ``VideoId,LabelConfidencePairs``,
  each video's top_k ``class score`` pairs, for the eval videos and the test videos.

Before they are used, each seed's model.keras is checked against the sha256 the train
stage recorded beside it (check_model), and the index against its own (index.read_index).

Label names come from the dataset vocabulary (``vocabulary.csv``: Index, TrainVideoCount,
KnowledgeGraphId, Name, ...) when one is found; see find_vocabulary.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from yt8m_qrnn.data.index_file import read_index
from yt8m_qrnn.metrics.official import (
    EvaluationMetrics,
    class_prior_predictions,
    top_k_by_row,
)
from yt8m_qrnn.pipeline.dag import DATA_ROOT, INDEX, eval_dir, model_dir, seed_dir
from yt8m_qrnn.pipeline.io import (
    CorruptArtifact,
    atomic_folder,
    atomic_path,
    check_sha256,
    write_json,
)
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.records.features import NUM_CLASSES

log = logging.getLogger("yt8m_qrnn.stages.evaluate")
METRIC_KEYS = ("gap", "map", "map_present", "hit_at_one", "perr")
SUBMISSION_HEADER = ("VideoId", "LabelConfidencePairs")
PER_CLASS_COLUMNS = ("class", "name", "eval_positives", "train_positives", "ap")
VOCABULARY_NAME = "vocabulary.csv"


# ---------------------------------------------------------------- label names

def load_vocabulary(path: str | Path, num_classes: int | None = None) -> dict[int, str]:
    """Class index -> display name from a YouTube-8M vocabulary file.

    Reads the dataset's ``vocabulary.csv`` (Index, TrainVideoCount, KnowledgeGraphId, Name, ...;
    rows in any order; an empty Name falls back to the KnowledgeGraphId) or a two-column
    ``label_id,label_name`` file (names may contain unquoted commas).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader([f.readline()]), [])
        if "Index" in header and "Name" in header:
            names = _vocabulary_rows(csv.DictReader(f, fieldnames=header), path)
        elif header[:2] == ["label_id", "label_name"]:
            names = {}
            for line_number, line in enumerate(f, start=2):
                if line.strip():
                    index, _, name = line.rstrip("\r\n").partition(",")
                    _add_name(names, index, name.strip() or f"class {index}", path, line_number)
        else:
            raise ValueError(f"{path}: not a vocabulary file (header {header[:4]})")
    if not names:
        raise ValueError(f"{path}: no classes")
    if num_classes is not None and max(names) >= num_classes:
        raise ValueError(f"{path}: class index {max(names)} out of range for {num_classes} classes "
                         "(a vocabulary of another dataset version?)")
    return names


def _vocabulary_rows(rows, path: Path) -> dict[int, str]:
    names: dict[int, str] = {}
    for line_number, row in enumerate(rows, start=2):
        name = (row.get("Name") or "").strip() or (row.get("KnowledgeGraphId") or "").strip()
        _add_name(names, row.get("Index"), name or f"class {row.get('Index')}", path, line_number)
    return names


def _add_name(names: dict[int, str], index, name: str, path: Path, line_number: int) -> None:
    try:
        index = int(index)
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{line_number}: class index {index!r} is not an integer") from None
    if index < 0:
        raise ValueError(f"{path}:{line_number}: negative class index {index}")
    if index in names:
        raise ValueError(f"{path}:{line_number}: class {index} listed twice")
    names[index] = name


def find_vocabulary(eval_cfg: dict, data_root: Path, version: int) -> Path | None:
    """The vocabulary file to name classes with, or None.

    ``evaluate.vocabulary`` in params.yaml when set (it must exist); otherwise
    ``{data_root}/{version}/vocabulary.csv`` or ``{data_root}/vocabulary.csv``, inside the
    fetched data folder that the stage already depends on. The generated data has none.
    """
    explicit = eval_cfg.get("vocabulary")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ValueError(f"evaluate.vocabulary: {path} not found")
        return path
    for candidate in (Path(data_root) / str(version) / VOCABULARY_NAME, Path(data_root) / VOCABULARY_NAME):
        if candidate.is_file():
            return candidate
    return None


def class_name(names: dict[int, str], index: int) -> str:
    return names.get(index) or f"class {index}"


# ---------------------------------------------------------------- Kaggle format

def top_pairs(predictions: np.ndarray, k: int) -> list[str]:
    """Each row's top k ``class score`` pairs, score descending (ties: lower class first)."""
    predictions = np.asarray(predictions)
    top = top_k_by_row(predictions, k)
    scores = np.take_along_axis(predictions, top, axis=1)
    return [" ".join(f"{c} {s:.6f}" for c, s in zip(row, row_scores)) for row, row_scores in zip(top, scores)]


class PairsWriter:
    """Streams rows of a Kaggle-format CSV (VideoId,LabelConfidencePairs) to an atomic file."""

    def __init__(self, path: Path, top_k: int):
        self.path, self.top_k, self.rows = Path(path), top_k, 0

    def __enter__(self):
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._file = open(tmp, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(SUBMISSION_HEADER)
        return self

    def write(self, ids: list[str], predictions: np.ndarray) -> None:
        if len(ids):
            self._writer.writerows(zip(ids, top_pairs(predictions, self.top_k)))
            self.rows += len(ids)

    def __exit__(self, *exc):
        self._file.close()
        return self._atomic.__exit__(*exc)


def write_pairs_csv(path: Path, ids: list[str], pairs: list[str]) -> None:
    """Kaggle format: VideoId,LabelConfidencePairs, from ready-made pair strings."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUBMISSION_HEADER)
        writer.writerows(zip(ids, pairs))


# ---------------------------------------------------------------- counts and baselines

def label_counts(rows: pd.DataFrame, num_classes: int) -> np.ndarray:
    """Number of videos in `rows` carrying each class, int64 [num_classes]."""
    counts = np.zeros(num_classes, np.int64)
    if len(rows):
        flat = np.concatenate([np.asarray(labels, np.int64).ravel() for labels in rows["labels"]])
        np.add.at(counts, flat, 1)
    return counts


def _label_matrix(rows: pd.DataFrame, num_classes: int) -> np.ndarray:
    out = np.zeros((len(rows), num_classes), np.float32)
    for i, labels in enumerate(rows["labels"]):
        out[i, np.asarray(labels, int)] = 1.0
    return out


def class_prior_metrics(train_rows: pd.DataFrame, eval_rows: pd.DataFrame, num_classes: int, top_k: int,
                        batch_size: int) -> dict:
    """The baseline every model must beat: predict each class's training frequency."""
    if len(train_rows) == 0:
        raise ValueError("no training videos for the class-prior baseline")
    counts = label_counts(train_rows, num_classes)
    metrics = EvaluationMetrics(num_classes, top_k)
    for start in range(0, len(eval_rows), batch_size):
        batch = eval_rows.iloc[start:start + batch_size]
        prior = class_prior_predictions(counts, len(train_rows), len(batch))
        metrics.accumulate(prior, _label_matrix(batch, num_classes))
    return {k: float(v) for k, v in metrics.get().items() if k in METRIC_KEYS}


def per_class_table(result: dict, train_counts: np.ndarray, label_names: dict[int, str]) -> pd.DataFrame:
    """Per-class AP with frequency and name, for every class seen in the train or eval subset."""
    num_classes = len(train_counts)
    table = pd.DataFrame({
        "class": np.arange(num_classes),
        "name": [class_name(label_names, c) for c in range(num_classes)],
        "eval_positives": np.asarray(result["class_positives"], np.int64),
        "train_positives": np.asarray(train_counts, np.int64),
        "ap": np.asarray(result["per_class_ap"], np.float64),
    })
    return table[(table["eval_positives"] > 0) | (table["train_positives"] > 0)].reset_index(drop=True)


# ---------------------------------------------------------------- the stage

# Each model's seed ensemble is also kept in full (float16) for the ensemble of all models, when it is
# at most this many scores (the 2018 validate split would be 1.1M videos x 3862 classes: 8.5 GB).
FULL_PREDICTIONS_LIMIT = 1 << 28
ENSEMBLE = "ensemble"


RETRAIN = "rerun the train stage (dvc repro --force --single-item train@{model}, or snakemake --forcerun train)"


def check_model(path: Path, name: str) -> None:
    """CorruptArtifact unless model `name`'s file is the one the train stage wrote: the sha256 it recorded in
    the train_stats.json beside it. A model without that file (not written by the train stage) is not checked."""
    path = Path(path)
    record = path.parent / "train_stats.json"
    if not record.exists():
        return
    fix = RETRAIN.format(model=name)
    try:
        recorded = json.loads(record.read_text())["model_sha256"]
    except (ValueError, KeyError, TypeError):
        raise CorruptArtifact(record, f"it records no sha256 of {path.name} (damaged, or written by an older "
                                      "version)", fix) from None
    check_sha256(path, recorded, record, fix)


def predict(models: dict, batches):
    """Per batch of (ids, inputs, labels): ids, {seed: predictions}, their mean (the seeds' ensemble), dense labels."""
    import keras

    for ids, inputs, labels in batches:
        outputs = {seed: keras.ops.convert_to_numpy(model(inputs, training=False)) for seed, model in models.items()}
        mean = np.mean(np.stack(list(outputs.values())), axis=0, dtype=np.float32)
        yield [str(i) for i in ids], outputs, mean, labels


def evaluate_model(name: str, model_cfg: dict, eval_cfg: dict, *, version: int, num_classes: int, data_root: Path,
                   index_path: Path, model_paths: dict[int, Path], out_dir: Path,
                   label_names: dict[int, str] | None = None) -> dict:
    """Scores every seed's model and their ensemble (the mean of their predictions) on the eval subset.

    metrics.json's top-level metrics are the means over the seeds, with the 95% interval over seeds;
    the seeds' ensemble and each seed are listed too. predictions/ keeps, per seed and for the
    ensemble, each video's top-k pairs (stats.TopK), for bootstrap intervals and paired comparisons.
    eval_predictions.csv, submission.csv, per_class_ap.csv and pr_curve.csv are the ensemble's.
    """
    import keras

    from yt8m_qrnn.data import batches as data_lib
    from yt8m_qrnn.metrics.stats import TopK, seed_interval
    from yt8m_qrnn.models import qrnn  # noqa: F401
    from yt8m_qrnn.models import starter as models  # noqa: F401  (registers the custom layers for loading)

    index = read_index(index_path)
    level = model_cfg["level"]
    top_k = eval_cfg["top_k"]
    vocabulary = None
    if label_names is None:
        vocabulary = find_vocabulary(eval_cfg, data_root, version)
        label_names = load_vocabulary(vocabulary, num_classes) if vocabulary else {}
        log.info("label names: %s", vocabulary or "none found (class indices)")
    for path in model_paths.values():
        check_model(path, name)
    loaded = {seed: keras.saving.load_model(path, compile=False) for seed, path in sorted(model_paths.items())}
    eval_rows = data_lib.subset_rows(index, "eval", level)
    if eval_rows.empty:
        raise ValueError(f"{index_path}: no {level}-level videos in the eval subset")
    train_rows = data_lib.subset_rows(index, "train", level)
    out_dir.mkdir(parents=True, exist_ok=True)

    dataset = data_lib.one_pass(data_root, eval_rows, level, version, num_classes, eval_cfg["batch_size"])
    keys = [*loaded, ENSEMBLE]
    metrics = {key: EvaluationMetrics(num_classes, top_k) for key in keys}
    parts: dict = {key: [] for key in keys}
    keep_full = len(eval_rows) * num_classes <= FULL_PREDICTIONS_LIMIT
    full = []
    with PairsWriter(out_dir / "eval_predictions.csv", top_k) as eval_out:
        for ids, outputs, mean, labels in predict(loaded, dataset):
            label_lists = [np.flatnonzero(row) for row in labels]
            for key, predictions in (outputs | {ENSEMBLE: mean}).items():
                metrics[key].accumulate(predictions, labels)
                parts[key].append(TopK.from_predictions(np.asarray(ids), predictions, label_lists, num_classes,
                                                        top_k))
            eval_out.write(ids, mean)
            if keep_full:
                full.append(mean.astype(np.float16))
    results = {key: m.get() for key, m in metrics.items()}
    _write_predictions(out_dir / "predictions", {key: TopK.concatenate(p) for key, p in parts.items()},
                       np.concatenate(full) if keep_full else None)
    test_videos = _write_submission(out_dir / "submission.csv", loaded, index, level, version, num_classes, data_root,
                                    eval_cfg)
    train_counts = label_counts(train_rows, num_classes)
    per_seed = {str(seed): {k: float(results[seed][k]) for k in METRIC_KEYS} for seed in loaded}
    intervals = {k: seed_interval([m[k] for m in per_seed.values()]) for k in METRIC_KEYS}
    summary = {k: float(intervals[k][0]) for k in METRIC_KEYS} | {
        "seed_interval": {k: _finite(intervals[k][1]) for k in METRIC_KEYS},
        "seeds": per_seed,
        "ensemble": {k: float(results[ENSEMBLE][k]) for k in METRIC_KEYS},
        "num_videos": int(results[ENSEMBLE]["num_videos"]),
        "num_test_videos": int(test_videos),
        "num_classes": int(num_classes),
        "classes_present": int(np.count_nonzero(results[ENSEMBLE]["class_positives"])),
        "top_k": int(top_k),
        "level": level,
        "vocabulary": str(vocabulary) if vocabulary else ("given" if label_names else "none"),
        "class_prior": class_prior_metrics(train_rows, eval_rows, num_classes, top_k, eval_cfg["batch_size"])
        if len(train_rows) else {k: 0.0 for k in METRIC_KEYS},
    }
    with atomic_path(out_dir / "per_class_ap.csv") as tmp:
        per_class_table(results[ENSEMBLE], train_counts, label_names).to_csv(tmp, index=False)
    with atomic_path(out_dir / "pr_curve.csv") as tmp:
        pd.DataFrame(metrics[ENSEMBLE].precision_recall_curve(eval_cfg["pr_curve_points"])).to_csv(tmp, index=False)
    write_json(out_dir / "metrics.json", summary)
    log.info("%s: GAP %.4f +- %.4f over %d seeds (ensemble %.4f), MAP %.4f, Hit@1 %.4f, PERR %.4f on %d videos; "
             "%d test videos predicted", name, summary["gap"], intervals["gap"][1], len(loaded),
             summary["ensemble"]["gap"], summary["map"], summary["hit_at_one"], summary["perr"],
             summary["num_videos"], test_videos)
    return summary


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _write_predictions(folder: Path, topks: dict, full: np.ndarray | None) -> None:
    """predictions/: seed-<s>.npz and ensemble.npz (stats.TopK), ensemble_full.npy when kept; written whole."""
    with atomic_folder(folder) as tmp:
        for key, topk in topks.items():
            topk.save(tmp / (f"{key}.npz" if key == ENSEMBLE else f"seed-{key}.npz"))
        if full is not None:
            np.save(tmp / "ensemble_full.npy", full)


def _write_submission(path, models, index, level, version, num_classes, data_root, eval_cfg) -> int:
    """The seeds' ensemble's top-k predictions for the unlabelled test videos, in the Kaggle format."""
    from yt8m_qrnn.data import batches as data_lib

    test_rows = data_lib.subset_rows(index, "test", level)
    with PairsWriter(path, eval_cfg["top_k"]) as out:
        if not test_rows.empty:
            dataset = data_lib.one_pass(data_root, test_rows, level, version, num_classes, eval_cfg["batch_size"])
            for ids, _, mean, _ in predict(models, dataset):
                out.write(ids, mean)
    return out.rows


# ---------------------------------------------------------------- the stage

def run(params: dict, model: str) -> None:
    p = stage_params(params, "evaluate", model)
    version = p["data"]["version"]
    seeds = sorted(int(path.name.split("-")[1]) for path in (model_dir(model) / "seeds").glob("seed-*"))
    if not seeds:
        raise FileNotFoundError(f"{model_dir(model) / 'seeds'}: no trained seeds; run the train stage first")
    evaluate_model(model, p["models"][model], p["evaluate"], version=version, num_classes=NUM_CLASSES[version],
                   data_root=DATA_ROOT, index_path=INDEX,
                   model_paths={seed: seed_dir(model, seed) / "model.keras" for seed in seeds},
                   out_dir=eval_dir(model))
