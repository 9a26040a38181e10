"""Train one model from the index: distributed, checkpointed, resumable, logged.

The loop is Keras' model.fit over a tf.data stream (yt8m_qrnn.data), with:

- Devices (train.distribute): "auto" mirrors the model over every visible GPU with
  tf.distribute.MirroredStrategy when there are several and uses the default device
  otherwise; "mirrored" always uses MirroredStrategy (over the GPUs, or over the CPU's
  logical devices when there is no GPU: that is how the tests run it); "none" the
  default device. models.<name>.batch_size is the batch per replica, as the starter's
  per-tower batch; the global batch is batch_size x replicas, and the data stream is
  batched globally. The learning rate is not scaled with the replicas (Adam, as the
  starter which keeps base_learning_rate whatever the number of towers); its staircase
  decay counts examples (global step x global batch), so it follows the same schedule
  in examples whatever the replicas. Gradients are summed over replicas *before* the
  per-variable norm clipping (Keras clips each replica's share, see ClippedAdam), so a
  mirrored run computes the single-device update of the same global batch.
  Several machines: set TF_CONFIG on each and use "multi_worker"
  (tf.distribute.MultiWorkerMirroredStrategy); each worker then reads the whole
  stream, so for real scale shard the files per worker first (not done here).
- Precision (train.precision): "float32", or "mixed_float16" / "mixed_bfloat16"
  (Keras mixed precision; with float16 Keras adds dynamic loss scaling). Variables
  stay float32, the heads output float32, and the saved model is float32.
- The optimizer and loss of the starter: Adam (epsilon 1e-8 as TF1's AdamOptimizer),
  base learning rate x decay ** floor(examples / decay_examples), per-variable
  gradient-norm clipping (utils.clip_gradient_norms), cross-entropy with epsilon 1e-5.
- Checkpoints: at every epoch end, every train.checkpoint_every_steps steps (0: never)
  and on SIGTERM / SIGINT (saved after the running step, then the process stops with
  TrainingInterrupted). A checkpoint is the weights and optimizer state (Keras
  .weights.h5) plus a JSON naming it with the position (epoch, batch within it),
  the partial epoch's loss sums and the history so far; the JSON is renamed into
  place last, so a kill at any moment leaves the previous complete checkpoint.
  A rerun with the same configuration and data resumes at that position: the data
  stream of each epoch depends only on the seed and the epoch, so the resumed run
  sees the batches the uninterrupted one would have (same total steps, no epoch lost
  or repeated).
- Logs: a line every train.log_every_steps steps in the starter's style
  ("training step N | Loss: L Examples/sec: R", L the mean loss over those steps),
  a line per epoch, TensorBoard scalars per epoch, history.csv (one row per epoch).
- Outputs: model.keras (float32, no optimizer state), history.csv and train_stats.json
  (trainable parameters, model size, examples/sec, wall time, steps, devices, ...).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from . import data as data_lib
from .io import atomic_path, config_digest, write_json
from .models import build_model, starter_cross_entropy, trainable_parameter_count

log = logging.getLogger("yt8m_qrnn.train")

ADAM_EPSILON = 1e-8  # tf.train.AdamOptimizer's default
TRAIN_DEFAULTS = {"distribute": "auto", "precision": "float32", "checkpoint_every_steps": 0}
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STATE_FILE = "state.json"


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; rerun to resume."""


# ----------------------------------------------------------------- optimizer


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class ClippedAdam(keras.optimizers.Adam):
    """Adam with per-variable gradient-norm clipping applied to the replica-summed gradient.

    keras.optimizers.Adam(clipnorm=...) under tf.distribute clips each replica's partial
    gradient before the all-reduce; the starter (and a single device) clips the combined
    gradient. Here the all-reduce happens first, then clipping, then the update (which
    then must not all-reduce again). Without a strategy the two are the same.
    """

    def _clip_gradients(self, grads):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            present = [g for g in grads if g is not None]
            reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
            grads = [None if g is None else next(reduced) for g in grads]
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return list(grads_and_vars)  # summed in _clip_gradients already
        return super()._all_reduce_sum_gradients(grads_and_vars)


def learning_rate_schedule(model_cfg: dict, train_cfg: dict, global_batch: int):
    """The starter's exponential_decay(base, global_step * batch * towers, decay_examples, decay, staircase)."""
    return keras.optimizers.schedules.ExponentialDecay(
        model_cfg["learning_rate"], train_cfg["learning_rate_decay_examples"] / global_batch,
        train_cfg["learning_rate_decay"], staircase=True)


def make_optimizer(model_cfg: dict, train_cfg: dict, global_batch: int | None = None) -> keras.optimizers.Optimizer:
    schedule = learning_rate_schedule(model_cfg, train_cfg, global_batch or model_cfg["batch_size"])
    return ClippedAdam(schedule, epsilon=ADAM_EPSILON, clipnorm=train_cfg["clip_gradient_norm"])


# ----------------------------------------------------------------- devices and precision


def make_strategy(kind: str = "auto") -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "auto":
        return tf.distribute.MirroredStrategy([d.name for d in gpus]) if len(gpus) > 1 else tf.distribute.get_strategy()
    if kind == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "none":
        return tf.distribute.get_strategy()
    raise ValueError(f"train.distribute: {kind!r} is not one of auto, mirrored, multi_worker, none")


@contextlib.contextmanager
def dtype_policy(name: str):
    if name not in PRECISIONS:
        raise ValueError(f"train.precision: {name!r} is not one of {', '.join(PRECISIONS)}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# ----------------------------------------------------------------- checkpoints


class Checkpoint:
    """Weights + optimizer state and the training position, in one folder, replaced atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.state_path = self.folder / STATE_FILE

    def load(self) -> dict | None:
        if not self.state_path.exists():
            return None
        state = json.loads(self.state_path.read_text())
        if not (self.folder / state["weights"]).exists():
            raise RuntimeError(f"{self.state_path}: names {state['weights']}, which is missing")
        return state

    def restore(self, model: keras.Model, state: dict) -> None:
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.folder / state["weights"])
        generators = _seed_generator_states(model)
        if len(generators) != len(state.get("rng", [])):
            raise RuntimeError(f"{self.state_path}: {len(state.get('rng', []))} random generator states saved, "
                               f"the model has {len(generators)}")
        for variable, value in zip(generators, state.get("rng", [])):
            variable.assign(np.asarray(value, dtype=variable.dtype))

    def save(self, model: keras.Model, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"state-{state['step']:010d}-{time.time_ns()}.weights.h5"
        tmp = self.folder / f".tmp-{os.getpid()}.weights.h5"
        model.save_weights(tmp, overwrite=True)
        _fsync(tmp)
        os.replace(tmp, self.folder / name)
        # Keras weight files leave out the random generators' states (zoneout, DBoF frame sampling)
        rng = [keras.ops.convert_to_numpy(v).tolist() for v in _seed_generator_states(model)]
        with atomic_path(self.state_path) as tmp_state:
            tmp_state.write_text(json.dumps(state | {"weights": name, "rng": rng}, indent=1))
            _fsync(tmp_state)
        for old in self.folder.glob("state-*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)


def _seed_generator_states(model: keras.Model) -> list:
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StopFlag:
    """Set by SIGTERM / SIGINT while training; the checkpoint callback acts on it."""

    def __init__(self):
        self.signal = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            self.signal = signum

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class Progress(keras.callbacks.Callback):
    """Tracks the position in the run; checkpoints at epoch ends, every N steps and on a stop signal.

    One instance serves several fit() calls (a resumed partial epoch is its own call):
    `offset` is the number of batches of the current epoch done before this call, and
    the partial epoch's loss and time carry over through the checkpoint state.
    """

    def __init__(self, checkpoint: Checkpoint, state: dict, steps_per_epoch: int, global_batch: int,
                 num_videos: int, total_epochs: int, every_steps: int, stop: StopFlag, tensorboard_dir: Path):
        super().__init__()
        self.checkpoint, self.state = checkpoint, state
        self.steps_per_epoch, self.global_batch, self.num_videos = steps_per_epoch, global_batch, num_videos
        self.total_epochs, self.every_steps, self.stop = total_epochs, every_steps, stop
        self.writer = tf.summary.create_file_writer(str(tensorboard_dir))
        self.interrupted = False

    # position helpers
    def _examples_before(self, batches: int) -> int:
        return min(batches * self.global_batch, self.num_videos)

    def on_train_begin(self, logs=None):
        self.offset = self.state["batch"]
        self.prior_loss_sum, self.prior_seconds = self.state["loss_sum"], self.state["seconds"]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.last_logs = None

    def _partial_state(self, batch_in_call: int, logs) -> dict:
        done = self.offset + batch_in_call + 1
        examples_this_call = self._examples_before(done) - self._examples_before(self.offset)
        return self.state | {
            "batch": done,
            "step": self.state["step_at_epoch_start"] + done,
            "loss_sum": self.prior_loss_sum + float(logs["loss"]) * examples_this_call,
            "seconds": self.prior_seconds + time.perf_counter() - self.epoch_start,
        }

    def on_train_batch_end(self, batch, logs=None):
        self.last_logs = logs
        step = self.state["step_at_epoch_start"] + self.offset + batch + 1
        stop = self.stop.signal is not None
        periodic = self.every_steps and step % self.every_steps == 0
        if (stop or periodic) and self.offset + batch + 1 < self.steps_per_epoch:
            self.state = self._partial_state(batch, logs)
            self.checkpoint.save(self.model, self.state)
            if stop:
                self.interrupted = True
                self.model.stop_training = True
                log.warning("signal %d: checkpoint saved at epoch %d, batch %d (step %d); rerun to resume",
                            self.stop.signal, self.state["epoch"] + 1, self.state["batch"], step)

    def on_epoch_end(self, epoch, logs=None):
        if self.interrupted:
            return
        examples_this_call = self.num_videos - self._examples_before(self.offset)
        loss = (self.prior_loss_sum + float(logs["loss"]) * examples_this_call) / self.num_videos
        seconds = self.prior_seconds + time.perf_counter() - self.epoch_start
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"epoch": epoch + 1, "loss": loss, "learning_rate": learning_rate, "seconds": seconds,
               "examples_per_second": self.num_videos / seconds if seconds else 0.0,
               "step": self.state["step_at_epoch_start"] + self.steps_per_epoch}
        self.state = {"epoch": epoch + 1, "batch": 0, "step_at_epoch_start": row["step"], "step": row["step"],
                      "loss_sum": 0.0, "seconds": 0.0, "history": self.state["history"] + [row]}
        self.checkpoint.save(self.model, self.state)
        self.prior_loss_sum, self.prior_seconds, self.offset = 0.0, 0.0, 0
        with self.writer.as_default(step=epoch + 1):
            tf.summary.scalar("epoch_loss", loss)
            tf.summary.scalar("learning_rate", learning_rate)
            tf.summary.scalar("examples_per_second", row["examples_per_second"])
        self.writer.flush()
        log.info("epoch %d/%d: loss %.4f, %.1f s, %.1f examples/sec", epoch + 1, self.total_epochs, loss, seconds,
                 row["examples_per_second"])


class StepLogger(keras.callbacks.Callback):
    """A line every N steps in the starter's style: step, loss (mean over the N steps), examples/sec."""

    def __init__(self, every: int, global_batch: int):
        super().__init__()
        self.every, self.global_batch = every, global_batch

    def on_train_begin(self, logs=None):
        self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.window_start, self.window_steps = time.perf_counter(), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.batches, self.loss_sum_at_window, self.batches_at_window = 0, 0.0, 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self.batches += 1
        self.window_steps += 1
        if self.step % self.every == 0:
            running_sum = float(logs["loss"]) * self.batches  # Keras' loss is the epoch's running mean
            loss = (running_sum - self.loss_sum_at_window) / max(self.batches - self.batches_at_window, 1)
            rate = self.window_steps * self.global_batch / max(time.perf_counter() - self.window_start, 1e-9)
            log.info("training step %d | Loss: %.2f Examples/sec: %.2f", self.step, loss, rate)
            self.loss_sum_at_window, self.batches_at_window = running_sum, self.batches
            self.window_start, self.window_steps = time.perf_counter(), 0


# ----------------------------------------------------------------- the stage


def _rows_digest(rows: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(sorted(rows["id"].astype(str))).encode()).hexdigest()[:12]


def train_model(name: str, model_cfg: dict, train_cfg: dict, *, version: int, num_classes: int,
                data_root: Path, index_path: Path, out_dir: Path, work_dir: Path) -> dict:
    train_cfg = TRAIN_DEFAULTS | train_cfg
    index = pd.read_parquet(index_path)
    rows = data_lib.subset_rows(index, "train", model_cfg["level"])
    if rows.empty:
        raise ValueError(f"{index_path}: no {model_cfg['level']}-level videos in the train subset")
    strategy = make_strategy(train_cfg["distribute"])
    replicas = strategy.num_replicas_in_sync
    global_batch = model_cfg["batch_size"] * replicas
    steps = data_lib.steps_per_epoch(len(rows), global_batch)
    epochs = model_cfg["epochs"]
    # never resume another configuration's or another dataset's run
    run_key = {k: v for k, v in train_cfg.items() if k != "log_every_steps"}
    work_dir = Path(work_dir) / config_digest(name, model_cfg, run_key, replicas, _rows_digest(rows))
    checkpoint = Checkpoint(work_dir / "checkpoint")
    stop = StopFlag()

    with dtype_policy(train_cfg["precision"]), strategy.scope():
        keras.utils.set_random_seed(train_cfg["seed"])
        model = build_model(name, model_cfg, num_classes)
        model.compile(optimizer=make_optimizer(model_cfg, train_cfg, global_batch), loss=starter_cross_entropy)
        state = checkpoint.load()
        if state is not None:
            checkpoint.restore(model, state)
            log.info("%s: resuming at epoch %d, batch %d (step %d) from %s", name, state["epoch"] + 1,
                     state["batch"], state["step"], checkpoint.folder)
        else:
            state = {"epoch": 0, "batch": 0, "step": 0, "step_at_epoch_start": 0, "loss_sum": 0.0, "seconds": 0.0,
                     "history": []}
        parameters = trainable_parameter_count(model)
        log.info("%s: %d trainable parameters, %d training videos, %d epochs of %d steps, global batch %d "
                 "(%d x %d replicas), %s, precision %s", name, parameters, len(rows), epochs, steps, global_batch,
                 model_cfg["batch_size"], replicas, type(strategy).__name__, train_cfg["precision"])
        progress = Progress(checkpoint, state, steps, global_batch, len(rows), epochs,
                            train_cfg["checkpoint_every_steps"], stop, work_dir / "tensorboard")
        callbacks = [progress, StepLogger(train_cfg["log_every_steps"], global_batch)]
        start = time.perf_counter()
        with stop.installed():
            while progress.state["epoch"] < epochs and not progress.interrupted:
                epoch, batch = progress.state["epoch"], progress.state["batch"]
                # a partially done epoch is finished by a call of its own, with fewer steps
                end = epoch + 1 if batch else epochs
                stream = data_lib.make_training_stream(
                    data_root, rows, model_cfg["level"], version, num_classes, global_batch,
                    seed=train_cfg["seed"], start_epoch=epoch, end_epoch=end, skip_batches=batch)
                model.fit(stream, initial_epoch=epoch, epochs=end, steps_per_epoch=steps - batch,
                          callbacks=callbacks, shuffle=False, verbose=0)
                if not progress.interrupted and progress.state["epoch"] != end:
                    raise RuntimeError(f"{name}: the data stream ended early (at epoch {progress.state['epoch']}, "
                                       f"batch {progress.state['batch']}; expected {steps} batches per epoch)")
        wall = time.perf_counter() - start
        if progress.interrupted:
            raise TrainingInterrupted(f"{name}: training interrupted (signal {stop.signal}); "
                                      f"checkpoint in {checkpoint.folder}, rerun to resume")
        step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        if step != epochs * steps:
            raise RuntimeError(f"{name}: {step} optimizer steps after training, expected {epochs} x {steps}")
    inference_model = _inference_copy(name, model_cfg, num_classes, model)
    return _write_outputs(name, inference_model, model_cfg, train_cfg, progress.state["history"], len(rows), wall,
                          step, global_batch, replicas, strategy, out_dir, work_dir)


def _inference_copy(name, model_cfg, num_classes, model):
    """The same network with float32 variables, outside any strategy, without optimizer state."""
    with dtype_policy("float32"):
        copy = build_model(name, model_cfg, num_classes)
    copy.set_weights([keras.ops.convert_to_numpy(w) for w in model.weights])
    return copy


def _write_outputs(name, model, model_cfg, train_cfg, history, num_videos, wall, step, global_batch, replicas,
                   strategy, out_dir: Path, work_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.keras"
    with atomic_path(model_path) as tmp:
        model.save(tmp)
    trained_seconds = sum(r["seconds"] for r in history)
    later = history[1:]  # the first epoch includes tracing and warm-up
    stats = {
        "model": name,
        "kind": model_cfg["kind"],
        "level": model_cfg["level"],
        "parameters": trainable_parameter_count(model),
        "total_parameters": int(model.count_params()),
        "model_size_mb": model_path.stat().st_size / 2**20,
        "train_videos": int(num_videos),
        "epochs": len(history),
        "steps": step,
        "batch_size_per_replica": model_cfg["batch_size"],
        "global_batch_size": global_batch,
        "replicas": replicas,
        "strategy": type(strategy).__name__,
        "devices": _devices(strategy),
        "precision": train_cfg["precision"],
        "examples_per_second": num_videos * len(history) / trained_seconds if trained_seconds else 0.0,
        "examples_per_second_after_first_epoch":
            num_videos * len(later) / sum(r["seconds"] for r in later) if later else None,
        "train_seconds": trained_seconds,
        "wall_seconds": wall,
        "final_loss": history[-1]["loss"],
        "backend": keras.backend.backend(),
    }
    _write_history(out_dir / "history.csv", history)
    write_json(out_dir / "train_stats.json", stats)
    shutil.rmtree(work_dir / "checkpoint", ignore_errors=True)  # the run is complete; outputs are the record
    return stats


def _devices(strategy) -> list[str]:
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one device, TensorFlow's placement
        return ["default"]


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
