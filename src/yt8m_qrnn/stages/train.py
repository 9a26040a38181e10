"""Train one model from the index: distributed, checkpointed, resumable, logged.

The loop is Keras' model.fit, on the Keras backend train.backend names (pipeline.cli starts
Keras with it): over a tf.data stream (yt8m_qrnn.data.stream) on TensorFlow, over one epoch's
keras.utils.PyDataset at a time (yt8m_qrnn.data.batches: the same batches) on JAX and PyTorch,
which run without TensorFlow. With:

- Devices (train.distribute), on TensorFlow (JAX: see KerasDistribution): "auto" mirrors the model over every visible GPU with
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
  Several machines: "multi_worker" (tf.distribute.MultiWorkerMirroredStrategy), one
  process per machine, each with TF_CONFIG naming all of them and itself; the strategy
  is made before anything starts TensorFlow's runtime (collective ops are configured
  at startup). The replicas are those of every worker, so the global batch and the steps
  are as above: each worker reads the same stream and keeps its replicas' parts of
  every global batch (tf.data auto-sharding by DATA; by file it needs as many files as
  workers and changes the batches), so a run gives the weights of one process with the
  same global batch. Worker 0 (the chief) writes the outputs, checkpoints and logs; the
  others write theirs to a temporary folder, removed at the end. On resume every worker
  reads the chief's checkpoint folder (same path: one machine, or a shared file system;
  checked), and a stop signal on any worker stops all at the same step (one small
  collective per step). Each worker reads every record (the data is not split by file),
  which suits workers that each have a copy of the data.
- Precision (train.precision): "float32", or "mixed_float16" / "mixed_bfloat16"
  (Keras mixed precision; with float16 Keras adds dynamic loss scaling). Variables
  stay float32, the heads output float32, and the saved model is float32.
- The optimizer and loss of the starter: Adam (epsilon 1e-8 as TF1's AdamOptimizer),
  base learning rate x decay ** floor(examples / decay_examples), per-variable
  gradient-norm clipping (utils.clip_gradient_norms), cross-entropy with epsilon 1e-5.
- Checkpoints: at every epoch end, every train.checkpoint_every_steps steps (0: never)
  and on SIGTERM / SIGINT (saved after the running step, then the process stops with
  TrainingInterrupted). A checkpoint is the weights and optimizer state (Keras
  .weights.h5) plus a JSON naming it, with its sha256, the position (epoch, batch
  within it), the partial epoch's loss sums and the history so far; the JSON is
  renamed into place last, so a kill or a full disk at any moment leaves the previous
  complete checkpoint, and weights that no longer match their sha256 are never resumed.
  A rerun with the same configuration and data resumes at that position: the data
  stream of each epoch depends only on the seed and the epoch, so the resumed run
  sees the batches the uninterrupted one would have (same total steps, no epoch lost
  or repeated).
- Logs: a line every train.log_every_steps steps in the starter's style
  ("training step N | Loss: L Examples/sec: R", L the mean loss over those steps),
  a line per epoch, TensorBoard scalars per epoch, history.csv (one row per epoch).
- The epoch: when the index has a validation subset ("valid", index.validation_fraction of
  the training videos by hash of id), it is scored with the official GAP after every epoch;
  the best epoch's weights are kept (best.weights.h5 beside the checkpoint) and are the ones
  written out, and training stops after train.patience epochs without a better GAP
  (0: never early; models.<name>.epochs is the cap). Without one, the last epoch is kept.
- Outputs: model.keras (float32, no optimizer state, the chosen epoch's weights), history.csv
  (with val_gap) and train_stats.json (trainable parameters, model size, examples/sec, wall
  time, steps, devices, the chosen epoch, the model's sha256 that evaluate checks, ...).
- Out of memory in a training step (MemoryError on the host, ResourceExhaustedError on a
  device): OutOfMemory, naming the batch size to lower.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from yt8m_qrnn.data import batches as data_lib
from yt8m_qrnn.data.index_file import read_index
from yt8m_qrnn.metrics.official import EvaluationMetrics
from yt8m_qrnn.models.starter import (
    build_model,
    starter_cross_entropy,
    trainable_parameter_count,
)
from yt8m_qrnn.pipeline.dag import DATA_ROOT, INDEX, TRAIN_WORK, model_dir
from yt8m_qrnn.pipeline.io import (
    StageError,
    atomic_path,
    check_sha256,
    config_digest,
    sha256_file,
    write_json,
)
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.records.features import NUM_CLASSES

log = logging.getLogger("yt8m_qrnn.stages.train")

ADAM_EPSILON = 1e-8  # tf.train.AdamOptimizer's default
TRAIN_DEFAULTS = {"distribute": "auto", "precision": "float32", "checkpoint_every_steps": 0, "patience": 0,
                  "backend": "tensorflow"}
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTE = ("auto", "mirrored", "multi_worker", "none")
STATE_FILE = "state.json"
BEST_WEIGHTS = "best.weights.h5"
VALIDATION_TOP_K = 20  # GAP@20, the official metric


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; rerun to resume."""


class OutOfMemory(StageError):
    """A training step did not fit in memory (host or device) at the configured batch size."""


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
        context = _tf().distribute.get_replica_context() if _on_tensorflow() else None
        if context is not None and context.num_replicas_in_sync > 1:
            present = [g for g in grads if g is not None]
            reduced = iter(context.all_reduce(_tf().distribute.ReduceOp.SUM, present))
            grads = [None if g is None else next(reduced) for g in grads]
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        context = _tf().distribute.get_replica_context() if _on_tensorflow() else None
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


def _on_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def _tf():
    """TensorFlow, imported only on its backend: the JAX and PyTorch backends run without it."""
    import tensorflow as tf

    return tf


def make_strategy(kind: str = "auto"):
    """tf.distribute's strategy on TensorFlow; KerasDistribution on the other backends."""
    if kind not in DISTRIBUTE:
        raise ValueError(f"train.distribute: {kind!r} is not one of {', '.join(DISTRIBUTE)}")
    if not _on_tensorflow():
        return KerasDistribution(kind)
    tf = _tf()
    if kind == "multi_worker":
        # first: it configures collective ops in the TensorFlow runtime, which is only possible
        # before the runtime starts (listing devices, making a tensor or a dataset all start it)
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "auto":
        return tf.distribute.MirroredStrategy([d.name for d in gpus]) if len(gpus) > 1 else tf.distribute.get_strategy()
    if kind == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()  # "none"


class KerasDistribution:
    """Devices on JAX (and PyTorch), with the few members of a tf.distribute strategy the loop uses.

    "auto": keras.distribution.DataParallel over the GPUs when there are several, else one
    device; "mirrored": DataParallel over every device of the first kind found (GPUs, or the
    CPU's host devices: XLA_FLAGS=--xla_force_host_platform_device_count=N makes N, as the
    tests do); "none": one device. Each step's global batch is split evenly over the devices
    and the gradient is their mean, as under MirroredStrategy. Several machines
    ("multi_worker") run on TensorFlow.
    """

    def __init__(self, kind: str):
        if kind == "multi_worker":
            raise ValueError("train.distribute: multi_worker runs on the TensorFlow backend (train.backend)")
        gpus = _gpus()
        devices = (gpus if kind == "auto" else gpus or keras.distribution.list_devices("cpu")) if kind != "none" else []
        if len(devices) > 1 and keras.backend.backend() != "jax":
            raise ValueError(f"train.distribute: {kind} over {len(devices)} devices runs on JAX or TensorFlow, "
                             f"not {keras.backend.backend()}")
        self.devices = devices if len(devices) > 1 else []
        self.distribution = keras.distribution.DataParallel(devices=self.devices) if self.devices else None
        self.num_replicas_in_sync = max(1, len(self.devices))
        self.extended = _Extended(self.devices or ["default"])

    @contextlib.contextmanager
    def scope(self):
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(self.distribution)
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)


class _Extended:
    should_checkpoint = True  # one process

    def __init__(self, devices: list[str]):
        self.worker_devices = devices


def _gpus() -> list[str]:
    try:
        return keras.distribution.list_devices("gpu")
    except (RuntimeError, ValueError):  # no GPU platform at all
        return []


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
    """Weights + optimizer state and the training position, in one folder, replaced atomically.

    save_folder: where save() writes when not `folder` (a worker other than the chief of a
    multi-worker run saves as the chief does, into a temporary folder of its own).
    """

    def __init__(self, folder: Path, save_folder: Path | None = None):
        self.folder = Path(folder)
        self.state_path = self.folder / STATE_FILE
        self.save_folder = Path(save_folder) if save_folder is not None else self.folder

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
        self._load_checked(model, state["weights"], state.get("weights_sha256"))
        generators = _seed_generator_states(model)
        if len(generators) != len(state.get("rng", [])):
            raise RuntimeError(f"{self.state_path}: {len(state.get('rng', []))} random generator states saved, "
                               f"the model has {len(generators)}")
        for variable, value in zip(generators, state.get("rng", [])):
            variable.assign(np.asarray(value, dtype=variable.dtype))

    def save(self, model: keras.Model, state: dict) -> None:
        folder = self.save_folder
        folder.mkdir(parents=True, exist_ok=True)
        name = f"state-{state['step']:010d}-{time.time_ns()}.weights.h5"
        digest = _save_weights(model, folder / name)
        # Keras weight files leave out the random generators' states (zoneout, DBoF frame sampling)
        rng = [keras.ops.convert_to_numpy(v).tolist() for v in _seed_generator_states(model)]
        try:
            with atomic_path(folder / STATE_FILE) as tmp_state:
                tmp_state.write_text(json.dumps(state | {"weights": name, "weights_sha256": digest, "rng": rng},
                                                indent=1))
                _fsync(tmp_state)
        except BaseException:
            (folder / name).unlink(missing_ok=True)  # the previous state and its weights stay the checkpoint
            raise
        for old in folder.glob("state-*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def save_best(self, model: keras.Model) -> str:
        """The chosen epoch's weights so far, replacing the previous best atomically; their sha256."""
        self.save_folder.mkdir(parents=True, exist_ok=True)
        return _save_weights(model, self.save_folder / BEST_WEIGHTS)

    def restore_best(self, model: keras.Model, digest: str | None) -> None:
        if not (self.save_folder / BEST_WEIGHTS).exists():
            raise RuntimeError(f"{self.save_folder / BEST_WEIGHTS}: the best epoch's weights are missing; "
                               f"remove {self.folder} and rerun")
        self._load_checked(model, BEST_WEIGHTS, digest, self.save_folder)

    def _load_checked(self, model: keras.Model, name: str, digest: str | None, folder: Path | None = None) -> None:
        """Weights loaded after checking them against the sha256 the state recorded (older states have none)."""
        path = (folder or self.folder) / name
        if digest is not None:
            check_sha256(path, digest, self.state_path, f"remove {self.folder} to train from the start")
        model.load_weights(path)


class Validator:
    """Scores a model on the validation videos with the official GAP@20. batches: a function giving
    the (ids, inputs, labels) of one pass (data.batches.one_pass)."""

    def __init__(self, batches, num_classes: int, count: int):
        self.batches, self.num_classes, self.count = batches, num_classes, count

    def gap(self, model: keras.Model) -> float:
        metrics = EvaluationMetrics(self.num_classes, VALIDATION_TOP_K)
        for _, inputs, labels in self.batches():
            metrics.accumulate(keras.ops.convert_to_numpy(model(inputs, training=False)), labels)
        return float(metrics.gap())


def _save_weights(model: keras.Model, final: Path) -> str:
    """Keras weights (and optimizer state) written beside `final`, synced, then renamed into place; their
    sha256. A failed write (disk full: OutputWriteError naming `final`) leaves `final` as it was."""
    with atomic_path(final, suffix=".weights.h5") as tmp:
        try:
            model.save_weights(tmp, overwrite=True)
        except OSError as err:  # h5py's message is HDF5's whole account of the failed write
            raise (OSError(err.errno, os.strerror(err.errno)) if err.errno else err) from err
        _fsync(tmp)
        return sha256_file(tmp)


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


class EpochScalars:
    """TensorBoard scalars per epoch on TensorFlow (tf.summary); elsewhere history.csv holds the same."""

    def __init__(self, folder: Path):
        self.writer = _tf().summary.create_file_writer(str(folder)) if _on_tensorflow() else None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        tf = _tf()
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        self.writer.flush()


class Progress(keras.callbacks.Callback):
    """Tracks the position in the run; checkpoints at epoch ends, every N steps and on a stop signal.

    One instance serves several fit() calls (a resumed partial epoch is its own call):
    `offset` is the number of batches of the current epoch done before this call, and
    the partial epoch's loss and time carry over through the checkpoint state.
    """

    def __init__(self, checkpoint: Checkpoint, state: dict, steps_per_epoch: int, global_batch: int,
                 num_videos: int, total_epochs: int, every_steps: int, stop: StopFlag, tensorboard_dir: Path,
                 any_worker=bool, validator: Validator | None = None, patience: int = 0):
        super().__init__()
        self.checkpoint, self.state = checkpoint, state
        self.steps_per_epoch, self.global_batch, self.num_videos = steps_per_epoch, global_batch, num_videos
        self.total_epochs, self.every_steps, self.stop = total_epochs, every_steps, stop
        self.any_worker = any_worker  # several workers: whether any of them has the flag (a collective)
        self.validator, self.patience = validator, patience
        self.scalars = EpochScalars(tensorboard_dir)
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
        stop = self.any_worker(self.stop.signal is not None)  # every worker stops at the same step
        periodic = self.every_steps and step % self.every_steps == 0
        if (stop or periodic) and self.offset + batch + 1 < self.steps_per_epoch:
            self.state = self._partial_state(batch, logs)
            self.checkpoint.save(self.model, self.state)
            if stop:
                self.interrupted = True
                self.model.stop_training = True
                log.warning("signal %s: checkpoint saved at epoch %d, batch %d (step %d); rerun to resume",
                            self.stop.signal or "on another worker", self.state["epoch"] + 1, self.state["batch"],
                            step)

    def on_epoch_end(self, epoch, logs=None):
        if self.interrupted:
            return
        examples_this_call = self.num_videos - self._examples_before(self.offset)
        loss = (self.prior_loss_sum + float(logs["loss"]) * examples_this_call) / self.num_videos
        seconds = self.prior_seconds + time.perf_counter() - self.epoch_start
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"epoch": epoch + 1, "loss": loss, "learning_rate": learning_rate, "seconds": seconds,
               "examples_per_second": self.num_videos / seconds if seconds else 0.0,
               "step": self.state["step_at_epoch_start"] + self.steps_per_epoch, "val_gap": None}
        choice = self._choose_epoch(row)
        self.state = {"epoch": epoch + 1, "batch": 0, "step_at_epoch_start": row["step"], "step": row["step"],
                      "loss_sum": 0.0, "seconds": 0.0, "history": self.state["history"] + [row]} | choice
        if choice["finished"]:
            self.model.stop_training = True
        self.checkpoint.save(self.model, self.state)
        self.prior_loss_sum, self.prior_seconds, self.offset = 0.0, 0.0, 0
        self.scalars.write(epoch + 1, {"epoch_loss": loss, "learning_rate": learning_rate,
                                       "examples_per_second": row["examples_per_second"]})
        log.info("epoch %d/%d: loss %.4f, %.1f s, %.1f examples/sec%s", epoch + 1, self.total_epochs, loss, seconds,
                 row["examples_per_second"],
                 "" if row["val_gap"] is None else f", validation GAP {row['val_gap']:.4f} (best: epoch "
                                                   f"{self.state['best_epoch']})")
        if self.state["finished"] and epoch + 1 < self.total_epochs:
            log.info("early stop: no better validation GAP in %d epochs; keeping epoch %d", self.patience,
                     self.state["best_epoch"])

    def _choose_epoch(self, row: dict) -> dict:
        """Scores the epoch on the validation videos (into row), keeps the best weights; the state's new choice."""
        epoch = row["epoch"]
        best_epoch, best_gap = self.state.get("best_epoch", 0), self.state.get("best_gap")
        best_sha256 = self.state.get("best_sha256")
        if self.validator is None:
            return {"best_epoch": epoch, "best_gap": None, "finished": epoch >= self.total_epochs}
        row["val_gap"] = self.validator.gap(self.model)
        if best_gap is None or row["val_gap"] > best_gap:
            best_sha256 = self.checkpoint.save_best(self.model)
            best_epoch, best_gap = epoch, row["val_gap"]
        patience_out = self.patience > 0 and epoch - best_epoch >= self.patience
        return {"best_epoch": best_epoch, "best_gap": best_gap, "best_sha256": best_sha256,
                "finished": epoch >= self.total_epochs or patience_out}


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
                data_root: Path, index_path: Path, out_dir: Path, work_dir: Path, keep_checkpoint: bool = False) -> dict:
    """Trains one model with train_cfg["seed"]; keep_checkpoint: leave the finished run's checkpoint (a
    rerun then writes the outputs again without training), for a caller that trains several seeds."""
    train_cfg = TRAIN_DEFAULTS | train_cfg
    # before anything else starts TensorFlow's runtime in this process (MultiWorkerMirroredStrategy needs that)
    strategy = make_strategy(train_cfg["distribute"])
    index = read_index(index_path)
    rows = data_lib.subset_rows(index, "train", model_cfg["level"])
    if rows.empty:
        raise ValueError(f"{index_path}: no {model_cfg['level']}-level videos in the train subset")
    valid_rows = data_lib.subset_rows(index, "valid", model_cfg["level"])
    # never resume another configuration's or another dataset's run
    run_key = {k: v for k, v in train_cfg.items() if k != "log_every_steps"}
    rows_digest = _rows_digest(rows) + _rows_digest(valid_rows)
    work_dir = Path(work_dir) / config_digest(name, model_cfg, run_key, strategy.num_replicas_in_sync, rows_digest)
    if strategy.extended.should_checkpoint:  # the chief of several workers, or the only process
        return _train(name, model_cfg, train_cfg, strategy, (rows, valid_rows), rows_digest, version, num_classes,
                      data_root, Checkpoint(work_dir / "checkpoint"), work_dir / "tensorboard", out_dir, keep_checkpoint)
    # Another worker of a multi-worker run: it does all the chief does (saving included, as
    # saving may take part in collectives), but writes to a temporary folder of its own, removed
    # at the end; it resumes from the chief's checkpoint folder (the same path on every worker).
    scratch = Path(tempfile.mkdtemp(prefix=f"yt8m-train-{name}-worker{strategy.cluster_resolver.task_id}-"))
    try:
        return _train(name, model_cfg, train_cfg, strategy, (rows, valid_rows), rows_digest, version, num_classes,
                      data_root, Checkpoint(work_dir / "checkpoint", save_folder=scratch / "checkpoint"),
                      scratch / "tensorboard", scratch / "out", keep_checkpoint)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(name, model_cfg, train_cfg, strategy, subsets, rows_digest, version, num_classes, data_root,
           checkpoint: Checkpoint, tensorboard_dir: Path, out_dir: Path, keep_checkpoint: bool) -> dict:
    rows, valid_rows = subsets
    replicas = strategy.num_replicas_in_sync
    global_batch = model_cfg["batch_size"] * replicas
    steps = data_lib.steps_per_epoch(len(rows), global_batch)
    epochs = model_cfg["epochs"]
    stop = StopFlag()

    with dtype_policy(train_cfg["precision"]), strategy.scope():
        determinism = make_deterministic(train_cfg["seed"])
        model = build_model(name, model_cfg, num_classes)
        model.compile(optimizer=make_optimizer(model_cfg, train_cfg, global_batch), loss=starter_cross_entropy)
        state = checkpoint.load()
        if _multi_worker(strategy):  # before restoring, which makes variables (collectives) on resume only
            _check_workers_agree(name, strategy, state["step"] if state else 0, steps, rows_digest,
                                 checkpoint.folder)
        if state is not None:
            checkpoint.restore(model, state)
            if state.get("finished"):
                log.info("%s: finished before (%d epochs, epoch %d kept); its outputs come from %s", name,
                         state["epoch"], state["best_epoch"], checkpoint.folder)
            else:
                log.info("%s: resuming at epoch %d, batch %d (step %d) from %s", name, state["epoch"] + 1,
                         state["batch"], state["step"], checkpoint.folder)
        else:
            state = {"epoch": 0, "batch": 0, "step": 0, "step_at_epoch_start": 0, "loss_sum": 0.0, "seconds": 0.0,
                     "history": [], "best_epoch": 0, "best_gap": None, "finished": False}
        validator = _validator(data_root, valid_rows, model_cfg, version, num_classes)
        parameters = trainable_parameter_count(model)
        log.info("%s: %d trainable parameters, %d training videos, %d epochs of %d steps, global batch %d "
                 "(%d x %d replicas), %s, precision %s", name, parameters, len(rows), epochs, steps, global_batch,
                 model_cfg["batch_size"], replicas, type(strategy).__name__, train_cfg["precision"])
        progress = Progress(checkpoint, state, steps, global_batch, len(rows), epochs,
                            train_cfg["checkpoint_every_steps"], stop, tensorboard_dir,
                            any_worker=_any_worker(strategy) if _multi_worker(strategy) else bool,
                            validator=validator, patience=train_cfg["patience"])
        callbacks = [progress, StepLogger(train_cfg["log_every_steps"], global_batch)]
        start = time.perf_counter()
        with stop.installed(), _out_of_memory_named(name, model_cfg["batch_size"]):
            while not progress.state.get("finished") and progress.state["epoch"] < epochs and not progress.interrupted:
                epoch, batch = progress.state["epoch"], progress.state["batch"]
                # a partially done epoch is finished by a call of its own, with fewer steps; off TensorFlow
                # every epoch is a call of its own (a PyDataset is one epoch)
                end = epoch + 1 if batch or not _on_tensorflow() else epochs
                stream = training_batches(data_root, rows, model_cfg["level"], version, num_classes, global_batch,
                                          seed=train_cfg["seed"], epochs=(epoch, end), skip=batch, strategy=strategy,
                                          model=model)
                model.fit(stream, initial_epoch=epoch, epochs=end, steps_per_epoch=steps - batch,
                          callbacks=callbacks, shuffle=False, verbose=0)
                if not progress.interrupted and not progress.state["finished"] and progress.state["epoch"] != end:
                    raise RuntimeError(f"{name}: the data stream ended early (at epoch {progress.state['epoch']}, "
                                       f"batch {progress.state['batch']}; expected {steps} batches per epoch)")
        wall = time.perf_counter() - start
        if progress.interrupted:
            raise TrainingInterrupted(f"{name}: training interrupted (signal {stop.signal or 'on another worker'}); "
                                      f"checkpoint in {checkpoint.folder}, rerun to resume")
        step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        epochs_run = progress.state["epoch"]
        if step != epochs_run * steps:
            raise RuntimeError(f"{name}: {step} optimizer steps after training, expected {epochs_run} x {steps}")
        if validator is not None:
            checkpoint.restore_best(model, progress.state.get("best_sha256"))
    inference_model = _inference_copy(name, model_cfg, num_classes, model)
    choice = {"best_epoch": progress.state["best_epoch"], "best_val_gap": progress.state["best_gap"],
              "validation_videos": validator.count if validator else 0, "max_epochs": epochs,
              "patience": train_cfg["patience"], "seed": train_cfg["seed"], "determinism": determinism}
    return _write_outputs(name, inference_model, model_cfg, train_cfg, progress.state["history"], len(rows), wall,
                          step, global_batch, replicas, strategy, out_dir,
                          None if keep_checkpoint else checkpoint.save_folder, choice)


def training_batches(data_root, rows, level, version, num_classes, global_batch, *, seed: int,
                     epochs: tuple[int, int], skip: int, strategy, model):
    """The batches of epochs [start, end) but the first `skip`: a tf.data stream on TensorFlow
    (several workers: each keeps its replicas' parts), one epoch's PyDataset elsewhere."""
    start, end = epochs
    if not _on_tensorflow():
        reader = data_lib.BatchReader(data_root, rows, level, version, num_classes)
        return data_lib.EpochBatches(reader, global_batch, seed=seed, epoch=start, skip=skip,
                                     multiple_of=strategy.num_replicas_in_sync)
    from yt8m_qrnn.data import stream

    dataset = stream.make_training_stream(data_root, rows, level, version, num_classes, global_batch, seed=seed,
                                          start_epoch=start, end_epoch=end, skip_batches=skip)
    dataset = dataset.with_options(_shard_by_data())
    if _multi_worker(strategy):
        _work_around_keras_multi_worker(model, strategy, dataset.element_spec)
    return dataset


@contextlib.contextmanager
def _out_of_memory_named(name: str, batch_size: int):
    """An allocation failing while training (MemoryError on the host, a device's RESOURCE_EXHAUSTED:
    TensorFlow's ResourceExhaustedError, XLA's runtime error on JAX) becomes OutOfMemory, whose one
    line says what to lower."""
    try:
        yield
    except Exception as err:
        if not (isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)
                or type(err).__name__ == "ResourceExhaustedError"):
            raise
        raise OutOfMemory(f"out of memory at batch_size {batch_size}; lower models.{name}.batch_size in "
                          "params.yaml") from err


def make_deterministic(seed: int) -> dict:
    """Seed every generator (Python, numpy, the backend's, Keras') and, on TensorFlow, turn on its op
    determinism, so that two clean runs on one machine agree to the last bit; the settings, for
    the record. (Reductions split over threads are reproducible on the same thread count.)"""
    keras.utils.set_random_seed(seed)
    if not _on_tensorflow():
        return {"seeding": "keras.utils.set_random_seed", "backend": keras.backend.backend(),
                "xla_flags": os.environ.get("XLA_FLAGS", "default")}
    tf = _tf()
    tf.config.experimental.enable_op_determinism()
    return {"seeding": "keras.utils.set_random_seed", "tf_op_determinism": True,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default (every core)",
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")}


def _validator(data_root, valid_rows, model_cfg, version, num_classes) -> Validator | None:
    if valid_rows.empty:
        return None
    def batches():
        return data_lib.one_pass(data_root, valid_rows, model_cfg["level"], version, num_classes,
                                 model_cfg["batch_size"])

    return Validator(batches, num_classes, len(valid_rows))


def _shard_by_data():
    """Several workers: each splits every global batch as all do and keeps its own replicas' parts.

    tf.distribute splits each global batch into one part per replica (in replica order over
    the workers) and, with the DATA policy, each worker keeps the parts of its replicas; so
    the global batch, its content and the step count are those of one worker. (The default,
    sharding by file, needs at least as many files as workers and gives each worker
    different videos, changing the batches.) No effect with one worker.
    """
    tf = _tf()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _multi_worker(strategy) -> bool:
    return _on_tensorflow() and isinstance(strategy, _tf().distribute.MultiWorkerMirroredStrategy)


def _across_workers(strategy):
    """A function of `values` (floats) giving every worker's values, one row each.

    A collective: every worker calls it at the same point. In a tf.function: ~3 ms a call
    between two local workers, ~90 ms eagerly.
    """
    tf = _tf()

    @tf.function
    def gather(local):
        per_replica = strategy.experimental_distribute_values_from_function(lambda context: local)
        return strategy.gather(per_replica, axis=0)

    return lambda values: gather(tf.constant([values], tf.float64)).numpy()


def _any_worker(strategy):
    across = _across_workers(strategy)

    def any_worker(flag: bool) -> bool:
        return bool(across([float(flag)]).any())
    return any_worker


def _check_workers_agree(name, strategy, step: int, steps: int, rows_digest: str, folder: Path) -> None:
    """The workers of a multi-worker run must start at the same step and have the same batches."""
    rows = _across_workers(strategy)([float(step), float(steps), float(int(rows_digest[:8], 16))])
    if (rows == rows[0]).all():
        return
    if (rows[:, 1:] != rows[0, 1:]).any():
        raise RuntimeError(f"{name}: the workers do not have the same training videos (the same index and data); "
                           "each needs the same copy of the workspace")
    raise RuntimeError(f"{name}: the workers would resume at different steps "
                       f"({', '.join(str(int(r)) for r in rows[:, 0])}, by worker): all read the chief's checkpoint "
                       f"folder, here {folder}, which must be on a file system they share (or copied to the same "
                       "path on the others before the rerun)")


def _work_around_keras_multi_worker(model: keras.Model, strategy, element_spec) -> None:
    """Two Keras 3 (3.15, TensorFlow backend) bugs of fit under MultiWorkerMirroredStrategy.

    - fit builds the model's state from one batch of the distributed stream, averaged over
      the replicas with strategy.reduce, which fails on a structure ("Attempt to convert a
      value ({'features': PerReplica...}) ... to a Tensor"; keras-team/keras#20329, #20585).
      The batch only gives shapes and dtypes, which the stream's element_spec has too.
    - each step's logs (each replica's metric results, scalars) are reduced with
      strategy.reduce("MEAN", value, axis=0), which fails on a scalar ("Invalid reduction
      dimension 0 for input with 0 dimensions"). With a length-1 axis that reduction is the
      mean over the replicas, what fit reports under MirroredStrategy.
    """
    def build(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=element_spec)

    train_step = type(model).train_step.__get__(model)

    def train_step_with_axis(data):
        return {key: _tf().reshape(value, [1]) for key, value in train_step(data).items()}

    model._maybe_symbolic_build = build
    model.train_step = train_step_with_axis


def _inference_copy(name, model_cfg, num_classes, model):
    """The same network with float32 variables, outside any strategy, without optimizer state."""
    with dtype_policy("float32"):
        copy = build_model(name, model_cfg, num_classes)
    copy.set_weights([keras.ops.convert_to_numpy(w) for w in model.weights])
    return copy


def _write_outputs(name, model, model_cfg, train_cfg, history, num_videos, wall, step, global_batch, replicas,
                   strategy, out_dir: Path, checkpoint_folder: Path | None, choice: dict) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.keras"
    with atomic_path(model_path) as tmp:
        model.save(tmp)
        model_sha256 = sha256_file(tmp)  # evaluate checks the model against it before loading it
    trained_seconds = sum(r["seconds"] for r in history)
    later = history[1:]  # the first epoch includes tracing and warm-up
    stats = {
        "model": name,
        "kind": model_cfg["kind"],
        "level": model_cfg["level"],
        "parameters": trainable_parameter_count(model),
        "total_parameters": int(model.count_params()),
        "model_size_mb": model_path.stat().st_size / 2**20,
        "model_sha256": model_sha256,
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
    } | choice
    _write_history(out_dir / "history.csv", history)
    write_json(out_dir / "train_stats.json", stats)
    if checkpoint_folder is not None:
        shutil.rmtree(checkpoint_folder, ignore_errors=True)  # the run is complete; outputs are the record
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


# Fields that are the same for every seed of a model (its network and data), and fields averaged over seeds.
SEED_INVARIANT = ("model", "kind", "level", "parameters", "total_parameters", "model_size_mb", "train_videos",
                  "validation_videos", "batch_size_per_replica", "global_batch_size", "replicas", "strategy",
                  "devices", "precision", "backend", "max_epochs", "patience", "determinism")
SEED_AVERAGED = ("examples_per_second", "examples_per_second_after_first_epoch", "final_loss", "best_epoch")
SEED_SUMMED = ("train_seconds", "wall_seconds", "steps")


def write_seed_summary(name: str, runs: list[tuple[int, dict]], out_dir: Path) -> dict:
    """train_stats.json over the seeds (shared fields, means, sums, and each seed's stats) and history.csv
    with every seed's epochs (a `seed` column first)."""
    out_dir = Path(out_dir)
    per_seed = [stats for _, stats in runs]
    summary = {key: per_seed[0][key] for key in SEED_INVARIANT}
    for key in SEED_AVERAGED:
        values = [s[key] for s in per_seed if s.get(key) is not None]
        summary[key] = float(np.mean(values)) if values else None
    summary |= {key: float(sum(s[key] for s in per_seed)) for key in SEED_SUMMED}
    summary |= {"seeds": [seed for seed, _ in runs], "epochs": [s["epochs"] for s in per_seed],
                "best_epochs": [s["best_epoch"] for s in per_seed], "per_seed": per_seed}
    history = []
    for seed, _ in runs:
        with open(out_dir / "seeds" / f"seed-{seed}" / "history.csv", newline="") as f:
            history += [{"seed": seed} | row for row in csv.DictReader(f)]
    _write_history(out_dir / "history.csv", history)
    write_json(out_dir / "train_stats.json", summary)
    log.info("%s: %d seeds, epochs kept %s", name, len(runs), summary["best_epochs"])
    return summary


# ---------------------------------------------------------------- the stage

def run(params: dict, model: str) -> None:
    """Trains the model once per seed (train.seeds), then writes the seeds' summary and joint history.

    A finished seed keeps its checkpoint until every seed is done, so a rerun after a kill
    trains only the seeds not yet finished (the declared outputs are deleted before a rerun).
    The seeds are written under the work folder and renamed into place once all are done:
    the final name never holds some seeds of a run.
    """
    p = stage_params(params, "train", model)
    version = p["data"]["version"]
    train_cfg = {k: v for k, v in p["train"].items() if k != "seeds"}
    runs, staged = [], TRAIN_WORK / model / "seeds"
    for number, seed in enumerate(p["train"]["seeds"], start=1):
        log.info("%s: seed %d (%d of %d)", model, seed, number, len(p["train"]["seeds"]))
        stats = train_model(model, p["models"][model], train_cfg | {"seed": seed}, version=version,
                            num_classes=NUM_CLASSES[version], data_root=DATA_ROOT, index_path=INDEX,
                            out_dir=staged / f"seed-{seed}", work_dir=TRAIN_WORK / model, keep_checkpoint=True)
        log.info("trained %s seed %d: %d parameters, epoch %d of %d kept, %.1f examples/s", model, seed,
                 stats["parameters"], stats["best_epoch"], stats["epochs"], stats["examples_per_second"])
        runs.append((seed, stats))
    shutil.rmtree(model_dir(model) / "seeds", ignore_errors=True)  # a stale one, when the orchestrator left it
    model_dir(model).mkdir(parents=True, exist_ok=True)
    os.replace(staged, model_dir(model) / "seeds")
    write_seed_summary(model, runs, model_dir(model))
    shutil.rmtree(TRAIN_WORK / model, ignore_errors=True)  # every seed is done; the outputs are the record
