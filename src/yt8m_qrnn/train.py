"""Train one model from the index: checkpointed every epoch, resumable, logged."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from pathlib import Path

import keras
import pandas as pd

from . import data as data_lib
from .io import atomic_path, config_digest, write_json
from .models import build_model, starter_cross_entropy

log = logging.getLogger("yt8m_qrnn.train")


class StepLogger(keras.callbacks.Callback):
    """A line every N steps in the starter's style: step, loss, examples/sec."""

    def __init__(self, every: int, batch_size: int):
        super().__init__()
        self.every, self.batch_size = every, batch_size
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.step % self.every == 0:
            self.window_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            rate = self.every * self.batch_size / max(time.perf_counter() - self.window_start, 1e-9)
            log.info("training step %d | Loss: %.2f Examples/sec: %.1f", self.step, logs["loss"], rate)


class EpochHistory(keras.callbacks.Callback):
    """Per-epoch history kept beside the checkpoint, so a resumed run keeps earlier epochs."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return list(csv.DictReader(f))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        rows = [r for r in self.rows() if int(r["epoch"]) < epoch + 1]
        rows.append({"epoch": epoch + 1, "loss": float(logs["loss"]),
                     "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
                     "seconds": time.perf_counter() - self.epoch_start})
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def make_optimizer(model_cfg: dict, train_cfg: dict) -> keras.optimizers.Optimizer:
    """Adam with the starter's staircase decay, every decay_examples examples."""
    decay_steps = max(1, train_cfg["learning_rate_decay_examples"] // model_cfg["batch_size"])
    schedule = keras.optimizers.schedules.ExponentialDecay(
        model_cfg["learning_rate"], decay_steps, train_cfg["learning_rate_decay"], staircase=True)
    return keras.optimizers.Adam(schedule, clipnorm=train_cfg["clip_gradient_norm"])


def train_model(name: str, model_cfg: dict, train_cfg: dict, *, version: int, num_classes: int,
                data_root: Path, index_path: Path, out_dir: Path, work_dir: Path) -> dict:
    keras.utils.set_random_seed(train_cfg["seed"])
    index = pd.read_parquet(index_path)
    rows = data_lib.subset_rows(index, "train", model_cfg["level"])
    if rows.empty:
        raise ValueError(f"{index_path}: no {model_cfg['level']}-level videos in the train subset")
    dataset = data_lib.make_dataset(data_root, rows, model_cfg["level"], version, num_classes,
                                    model_cfg["batch_size"], shuffle=True, seed=train_cfg["seed"])
    model = build_model(name, model_cfg, num_classes)
    model.compile(optimizer=make_optimizer(model_cfg, train_cfg), loss=starter_cross_entropy)
    work_dir = work_dir / config_digest(name, model_cfg, train_cfg)  # never resume another config's run
    work_dir.mkdir(parents=True, exist_ok=True)
    if not (work_dir / "backup").exists():
        (work_dir / "history.csv").unlink(missing_ok=True)
    history = EpochHistory(work_dir / "history.csv")
    callbacks = [
        keras.callbacks.BackupAndRestore(str(work_dir / "backup"), save_freq="epoch", delete_checkpoint=False),
        history,
        StepLogger(train_cfg["log_every_steps"], model_cfg["batch_size"]),
        keras.callbacks.TensorBoard(str(work_dir / "tensorboard")),
    ]
    log.info("%s: %d parameters, %d training videos, %d epochs", name, model.count_params(), len(rows),
             model_cfg["epochs"])
    start = time.perf_counter()
    model.fit(dataset, epochs=model_cfg["epochs"], callbacks=callbacks, verbose=0)
    wall = time.perf_counter() - start
    return _write_outputs(name, model, model_cfg, history, rows, wall, out_dir, work_dir)


def _write_outputs(name, model, model_cfg, history, rows, wall, out_dir: Path, work_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.keras"
    with atomic_path(model_path) as tmp:
        model.save(tmp)
    epochs = history.rows()
    trained_seconds = sum(float(r["seconds"]) for r in epochs)
    examples = len(rows) * len(epochs)
    stats = {
        "model": name,
        "kind": model_cfg["kind"],
        "level": model_cfg["level"],
        "parameters": int(model.count_params()),
        "model_size_mb": model_path.stat().st_size / 2**20,
        "train_videos": int(len(rows)),
        "epochs": len(epochs),
        "steps": int(model.optimizer.iterations.numpy()) if hasattr(model.optimizer.iterations, "numpy")
        else int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "examples_per_second": examples / trained_seconds if trained_seconds else 0.0,
        "wall_seconds": wall,
        "final_loss": float(epochs[-1]["loss"]),
    }
    shutil.copyfile(work_dir / "history.csv", out_dir / "history.csv.tmp")
    os.replace(out_dir / "history.csv.tmp", out_dir / "history.csv")
    write_json(out_dir / "train_stats.json", stats)
    shutil.rmtree(work_dir / "backup", ignore_errors=True)
    return stats
