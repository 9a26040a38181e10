"""The video-level baselines and the video-level QRNN on real YouTube-8M 2018 data.

Train on ../shared/yt8m/2018/video/validate0000-0039 (11,790 videos; the first 80 shards
doubled this test's time for no change in what it checks), evaluate on validate0080-0099 (5,701 videos): logistic, MoE and QRNN must each beat the class-prior
baseline by a wide margin, and MoE must beat logistic on GAP, as in the YouTube-8M
paper. Skipped when the shards are absent. The figures are written to
$YT8M_REALDATA_FIGURES (a JSON file) when that is set.

Sizes: logistic and MoE are the starter's (MoE: 2 mixtures, L2 1e-8); the QRNN is the paper's
2-layer fo-pooling network at video level (one step: window 1, no zoneout) at 256 hidden units
(the paper's 1024 triples the run time on 2 CPU cores). All use the starter's optimiser (Adam,
learning rate 0.01, clipping 1.0) for 3 epochs of batch 128, far fewer examples than
the paper, so the absolute figures are lower than its table.
"""
from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
import pytest

from yt8m_qrnn.data import stream as data_lib
from yt8m_qrnn.stages.index import index_shards
from yt8m_qrnn.metrics.official import EvaluationMetrics, class_prior_predictions
from yt8m_qrnn.stages.train import train_model

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

C = 3862
TRAIN_SHARDS = [f"validate{i:04d}.tfrecord" for i in range(40)]
EVAL_SHARDS = [f"validate{i:04d}.tfrecord" for i in range(80, 100)]
TRAIN = {"seed": 1, "learning_rate_decay": 0.95, "learning_rate_decay_examples": 4_000_000,
         "clip_gradient_norm": 1.0, "log_every_steps": 50}
COMMON = {"level": "video", "learning_rate": 0.01, "batch_size": 128, "epochs": 3}
MODELS = {
    "logistic": COMMON | {"kind": "logistic", "l2_penalty": 1e-8},
    "moe": COMMON | {"kind": "moe", "num_mixtures": 2, "l2_penalty": 1e-8},
    "qrnn": COMMON | {"kind": "qrnn", "hidden": 256, "layers": 2, "window": 1, "pooling": "fo", "zoneout": 0.0,
                      "num_mixtures": 2, "l2_penalty": 1e-8},
}
METRICS = ("gap", "map", "hit_at_one", "perr")


@pytest.fixture(scope="module")
def real_index(shared_yt8m, tmp_path_factory):
    folder = shared_yt8m / "2018" / "video"
    missing = [name for name in TRAIN_SHARDS + EVAL_SHARDS if not (folder / name).exists()]
    if missing:
        pytest.skip(f"{folder}: {len(missing)} of the validate shards used are missing (first: {missing[0]})")
    table, bad = index_shards([(folder / name, name, "video", "validate") for name in TRAIN_SHARDS + EVAL_SHARDS], 2)
    assert not bad and len(table) == 17_491
    table["subset"] = np.where(table["shard"].isin(TRAIN_SHARDS), "train", "eval")
    path = tmp_path_factory.mktemp("real") / "index.parquet"
    table.to_parquet(path)
    return {"folder": folder, "index": table, "path": path}


def score(predict, eval_rows, folder) -> dict:
    metrics = EvaluationMetrics(C, 20)
    for inputs, labels in data_lib.make_dataset(folder, eval_rows, "video", 2, C, 1024):
        metrics.accumulate(predict(inputs), labels.numpy())
    result = metrics.get()
    assert result["num_videos"] == len(eval_rows)
    return {k: float(result[k]) for k in METRICS}


@pytest.mark.extended
def test_baselines_and_qrnn_beat_the_class_prior_and_moe_beats_logistic(real_index, tmp_path):
    table, folder = real_index["index"], real_index["folder"]
    train_rows = data_lib.subset_rows(table, "train", "video")
    eval_rows = data_lib.subset_rows(table, "eval", "video")
    assert (len(train_rows), len(eval_rows)) == (11_790, 5_701)
    counts = np.zeros(C)
    for labels in train_rows["labels"]:
        counts[np.asarray(labels, int)] += 1
    figures = {"class_prior": score(lambda x: class_prior_predictions(counts, len(train_rows), len(x["features"])),
                                    eval_rows, folder)}
    for name, cfg in MODELS.items():
        start = time.perf_counter()
        stats = train_model(name, cfg, TRAIN, version=2, num_classes=C, data_root=folder,
                            index_path=real_index["path"], out_dir=tmp_path / name, work_dir=tmp_path / "work")
        model = keras.saving.load_model(tmp_path / name / "model.keras", compile=False)
        figures[name] = score(lambda x: keras.ops.convert_to_numpy(model(x, training=False)), eval_rows, folder) | {
            "parameters": stats["parameters"], "examples_per_second": stats["examples_per_second"],
            "train_seconds": stats["train_seconds"], "seconds": time.perf_counter() - start}
    print(json.dumps(figures, indent=1))
    if os.environ.get("YT8M_REALDATA_FIGURES"):
        with open(os.environ["YT8M_REALDATA_FIGURES"], "w") as f:
            json.dump(figures | {"config": MODELS}, f, indent=1)
    prior = figures["class_prior"]
    for name in MODELS:
        ours = figures[name]
        assert ours["gap"] > 5 * prior["gap"] and ours["gap"] > prior["gap"] + 0.4, (name, ours, prior)
        assert ours["hit_at_one"] > prior["hit_at_one"] + 0.3 and ours["perr"] > prior["perr"] + 0.3, (name, ours)
        assert ours["map"] > 20 * prior["map"], (name, ours, prior)
    assert figures["moe"]["gap"] > figures["logistic"]["gap"], figures
