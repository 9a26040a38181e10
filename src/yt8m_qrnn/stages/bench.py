"""The bench stage: how fast one QRNN layer trains against one LSTM layer, and what feeds it.

Measured on the machine that runs the stage (its CPU, or the GPU TensorFlow sees), with
TensorFlow as the Keras backend, and written to results/bench/ (each file atomically):

- layer_grid.json: the training step of one QRNN layer (yt8m_qrnn.models.qrnn.QRNN, fo pooling,
  window 2) and of one keras.layers.LSTM of the same hidden size: forward, then the gradient
  of a scalar loss (mean square of the output sequence) with respect to the inputs and every
  weight, inside one compiled function as Keras trains. Over a grid of batch x sequence length
  (`bench.grid`; "paper": Figure 4 of Bradbury et al. 2016, hidden 320 = inputs, batch 8..256
  x length 32..512) and at one more shape (`bench.shape`; "yt8m": batch 128, 300 frames, 1152
  inputs, hidden 1024), where the targets are checked. Every time is the median of
  `bench.repeats` steps after the first (tracing, compiling) and `bench.warmup` more; the layers
  of a cell take turns step by step (in a rotating order), so a machine that gets busier slows
  them alike, and the process's CPU time is kept beside the wall time (`ratio_cpu_time`); the
  load average before and after each measurement is recorded with it. The shape where the
  targets are set is measured first (then its parts, the input pipeline, and the grid last).
  The QRNN is compiled as Keras compiles it (tf.function: the layer declines XLA on
  TensorFlow); the LSTM both ways Keras may compile it: tf.function, and XLA, which Keras picks
  for a model of LSTMs on TensorFlow (jit_compile="auto"); `bench.lstm_xla` (all | grid | none)
  says where (XLA's LSTM at the YouTube-8M shape holds ~14 GB). The ratio LSTM / QRNN of a cell
  takes the faster LSTM, so it is never flattered by a slow compilation of the LSTM.
- pooling.json: at `bench.shape`, the QRNN layer step beside its parts, timed the same way in
  one round: the convolution alone (the layer's matmuls of x_{t-1} and x_t with the kernel, plus
  the bias, and its gradient) and the pooling alone (c_t = f_t c_{t-1} + (1 - f_t) z_t with its
  gradient) on the layer's own gate tensors, for each implementation in
  qrnn.LINEAR_RECURRENCES, each checked against a float64 recurrence. Share of the layer step:
  pooling (the implementation the layer uses) / layer, convolution / layer.
- input_pipeline.json: videos/s and MB/s of yt8m_qrnn.data.stream's training stream (shuffle, read
  by the index's offsets, check, decode, pad, batch) over frame-level shards, beside a plain
  tf.data.TFRecordDataset read of the same files in the same run (the two take turns; the
  files are read once before, so both read from the page cache). Two sets of shards: generated
  ones (yt8m_qrnn.stages.generate, in a temporary folder) whose videos have YouTube-8M's lengths (150-300
  frames, at most 300 as in the dataset), where the target is checked, and the frame-level shards of resources/yt8m when there are any
  (the default run's generated videos are 20-40 frames, so the stream's cost per video weighs
  more there).
- speedup.png: the ratio over the grid as a heatmap, and the step times at the shape.
- summary.json (last): the machine (device, backend, versions, CPUs, load average at the start
  and the end), the params, the headline numbers and the targets, met or not.

Only `bench:` of params.yaml is read. Speed targets are checked here, against the measured
numbers, and shown by the report (never asserted by tests).
"""
from __future__ import annotations

import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from yt8m_qrnn.pipeline import provenance
from yt8m_qrnn.pipeline.dag import BENCH_DIR, BENCH_FILES, DATA_ROOT
from yt8m_qrnn.pipeline.io import atomic_path, write_json
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.records.features import NUM_CLASSES

OUT_DIR, FILES = BENCH_DIR, BENCH_FILES

WINDOW = 2
POOLING = "fo"
GRIDS = {
    # Figure 4 of Bradbury et al. 2016 (QRNN): one layer, hidden 320, inputs = hidden.
    "paper": {"hidden": 320, "inputs": 320, "batch_sizes": [8, 16, 32, 64, 128, 256],
              "lengths": [32, 64, 128, 256, 512]},
    "small": {"hidden": 128, "inputs": 128, "batch_sizes": [16, 64], "lengths": [32, 128]},
}
SHAPES = {
    # The YouTube-8M frame-level model: batch 128, 300 frames of 1024 rgb + 128 audio, hidden 1024.
    "yt8m": {"batch": 128, "frames": 300, "inputs": 1152, "hidden": 1024},
    "small": {"batch": 16, "frames": 150, "inputs": 1152, "hidden": 256},
}
TARGETS = {
    "qrnn_speedup": {"text": "QRNN layer step at least 1.5x faster than the LSTM (CPU, YouTube-8M shape)",
                     "op": ">=", "value": 1.5},
    "pooling_share": {"text": "pooling at most 15% of the QRNN layer step (YouTube-8M shape)",
                      "op": "<=", "value": 0.15},
    "input_pipeline_share": {"text": "input pipeline at least 60% of the raw read rate (MB/s, same files)",
                             "op": ">=", "value": 0.60},
}
TARGET_RUN = "youtube8m_lengths"  # the input pipeline measurement where its target is checked
SYNTHETIC = {"seed": 0, "num_events": 12, "min_frames": 150, "max_frames": 300, "noise": 0.6}
MB = 1e6


def progress(message: str) -> None:
    print(f"bench: {message}", flush=True)


# ---------------------------------------------------------------- the stage

def run(params: dict) -> None:
    """Stage 'bench': QRNN vs LSTM step times, the QRNN's pooling, the input pipeline (results/bench/)."""
    cfg = stage_params(params, "bench")["bench"]
    run_bench(cfg, OUT_DIR, data_root=DATA_ROOT)


def resolve_grid(grid) -> dict:
    spec = dict(GRIDS[grid]) | {"name": grid} if isinstance(grid, str) else dict(grid) | {"name": "custom"}
    spec.setdefault("inputs", spec["hidden"])
    return spec


def resolve_shape(shape) -> dict:
    if isinstance(shape, str):
        return dict(SHAPES[shape]) | {"name": shape}
    return dict(shape) | {"name": "yt8m" if dict(shape) == SHAPES["yt8m"] else "custom"}


def run_bench(cfg: dict, out_dir: Path = OUT_DIR, *, data_root: Path = DATA_ROOT) -> dict:
    """Every measurement of the module docstring; writes out_dir/*; returns the summary."""
    out_dir = Path(out_dir)
    started = time.time()
    env = environment()
    progress(f"{env['device']}; backend {env['backend']}; TensorFlow {env['versions'].get('tensorflow')}, "
             f"Keras {env['versions'].get('keras')}; {env['cpus_usable']} usable CPUs; "
             f"load average {' '.join(f'{v:.2f}' for v in env['load_average_start'])}")
    tf = _tensorflow()
    # every cell traces new functions on purpose: TensorFlow's retracing warning says nothing here
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    grid, shape = resolve_grid(cfg["grid"]), resolve_shape(cfg["shape"])
    warmup, repeats = int(cfg["warmup"]), int(cfg["repeats"])

    # The shape the targets are set at first, right after the load was read (the longer grid last).
    xla = cfg.get("lstm_xla", "all")
    at_shape = _with_load(lambda: time_layers(tf, shape["batch"], shape["frames"], shape["inputs"], shape["hidden"],
                                              warmup, repeats, xla=xla == "all"))
    progress(f"shape {shape['name']}: {_cell_line(at_shape)}")
    pooling = _with_load(lambda: time_pooling(tf, shape, warmup, repeats))
    write_json(out_dir / "pooling.json", pooling)
    pipeline = _with_load(lambda: time_input_pipeline(tf, cfg["input_pipeline"], data_root))
    write_json(out_dir / "input_pipeline.json", pipeline)

    layers = {"grid": grid, "shape": shape, "window": WINDOW, "pooling": POOLING, "warmup": warmup,
              "repeats": repeats, "lstm_xla": xla, "loss": "mean square of the output sequence",
              "gradient": "inputs and every weight", "compile": COMPILE_NOTE, "at_shape": at_shape, "cells": []}
    cells = [(b, t) for b in grid["batch_sizes"] for t in grid["lengths"]]
    for number, (batch, length) in enumerate(cells, start=1):
        cell = _with_load(lambda batch=batch, length=length: time_layers(
            tf, batch, length, grid["inputs"], grid["hidden"], warmup, repeats, xla=xla != "none"))
        layers["cells"].append(cell)
        progress(f"grid {number}/{len(cells)}: {_cell_line(cell)}")
    write_json(out_dir / "layer_grid.json", layers)

    env["load_average_end"] = list(os.getloadavg())
    summary = summarize(cfg, env, layers, pooling, pipeline, seconds=time.time() - started)
    plot_speedup(layers, pooling, summary, out_dir / "speedup.png")
    write_json(out_dir / "summary.json", summary)
    for target in summary["targets"]:
        progress(f"target {target['name']}: {target['status']} ({target['measured_text']})")
    progress(f"done in {summary['seconds']:.0f} s; load average at the end "
             f"{' '.join(f'{v:.2f}' for v in env['load_average_end'])}")
    return summary


def _with_load(measure: Callable[[], dict]) -> dict:
    """measure() with the load average (1, 5, 15 min) before and after it: other work on the
    machine slows what is timed, and shows there."""
    before = list(os.getloadavg())
    result = measure()
    return result | {"load_average": {"before": before, "after": list(os.getloadavg())}}


def _cell_line(cell: dict) -> str:
    xla = "not timed" if cell["lstm_xla_s"] is None else f"{1e3 * cell['lstm_xla_s']:.1f} ms"
    load = cell["load_average"]
    return (f"batch {cell['batch']} x length {cell['length']} (inputs {cell['inputs']}, hidden {cell['hidden']}): "
            f"QRNN {1e3 * cell['qrnn_s']:.1f} ms, LSTM {1e3 * cell['lstm_plain_s']:.1f} ms (XLA {xla}): "
            f"{cell['ratio']:.2f}x (CPU time {cell['ratio_cpu_time']:.2f}x); "
            f"load {load['before'][0]:.2f} -> {load['after'][0]:.2f}")


# ---------------------------------------------------------------- the machine

def _tensorflow():
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"the bench times TensorFlow-compiled steps; KERAS_BACKEND is {keras.backend.backend()!r}")
    import tensorflow as tf

    return tf


def environment() -> dict:
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
        except (ValueError, RuntimeError):
            names.append(gpu.name)
    versions = {"python": provenance.python_version(), "numpy": np.__version__, "tensorflow": tf.__version__,
                "keras": keras.__version__}
    installed = provenance.package_versions(("tensorflow-cpu", "tensorflow"))
    if installed:  # the first: the CPU-only build where both are installed
        package, version = next(iter(installed.items()))
        versions["tensorflow_package"] = f"{package} {version}"
    return {
        "device": f"GPU: {', '.join(names)}" if gpus else f"CPU: {provenance.cpu_model()}",
        "device_kind": "GPU" if gpus else "CPU",
        "gpus": names,
        "cpu": provenance.cpu_model(),
        "backend": keras.backend.backend(),
        "versions": versions,
        "cpu_count": os.cpu_count(),
        "cpus_usable": provenance.usable_cpus(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default (every core)",
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default (every core)",
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "load_average_start": list(os.getloadavg()),
        "platform": provenance.operating_system(),
        "python_executable": sys.executable,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ---------------------------------------------------------------- timing

def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, dict]:
    """Each step called once (tracing, compiling: `first_call_s`), `warmup` times more untimed, then
    `repeats` times timed, the steps taking turns in a rotating order. Median wall time, and the
    process's CPU time (every thread) of the same calls."""
    results = {}
    for name, step in steps.items():
        start = time.perf_counter()
        _wait(step())
        results[name] = {"first_call_s": time.perf_counter() - start}
    for _ in range(warmup):
        for step in steps.values():
            _wait(step())
    names = list(steps)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_number in range(repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            cpu_start, start = time.process_time(), time.perf_counter()
            _wait(steps[name]())
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    for name in names:
        results[name] |= {"median_s": statistics.median(wall[name]), "min_s": min(wall[name]),
                          "times_s": wall[name], "cpu_median_s": statistics.median(cpu[name])}
    return results


def _wait(result) -> None:
    """Bring the smallest output tensor to the host: the step has then run to the end."""
    import tensorflow as tf

    tensors = [t for t in tf.nest.flatten(result) if hasattr(t, "shape")]
    if tensors:
        np.asarray(min(tensors, key=lambda t: int(np.prod(t.shape)))).sum()


def training_step(tf, layer, x, jit_compile: bool) -> Callable[[], object]:
    """The layer's forward and the gradient of mean(output^2) w.r.t. x and its weights, compiled."""
    weights = layer.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def step(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_mean(tf.square(layer(inputs, training=True)))
        return tape.gradient(loss, [inputs, *weights])

    return lambda: step(x)


COMPILE_NOTE = ("qrnn: tf.function (the QRNN layer declines XLA on TensorFlow, as Keras then compiles it); "
                "lstm_plain: tf.function; lstm_xla: tf.function(jit_compile=True), what Keras picks for a model "
                "of LSTMs on TensorFlow (null where bench.lstm_xla leaves it out); ratio = lstm_s / qrnn_s with "
                "lstm_s the faster of the LSTM times")


def _inputs(tf, batch, length, inputs, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.standard_normal((batch, length, inputs), dtype=np.float32))


def make_qrnn(hidden: int, inputs: int, pool_impl: str = "auto"):
    from yt8m_qrnn.models.qrnn import QRNN

    layer = QRNN(hidden, window=WINDOW, pooling=POOLING, return_sequences=True, pool_impl=pool_impl, seed=0)
    layer.build((None, None, inputs))
    return layer


def make_lstm(hidden: int, inputs: int):
    import keras

    layer = keras.layers.LSTM(hidden, return_sequences=True, seed=0)
    layer.build((None, None, inputs))
    return layer


def time_layers(tf, batch: int, length: int, inputs: int, hidden: int, warmup: int, repeats: int,
                xla: bool = True) -> dict:
    """One cell: the QRNN and the LSTM (tf.function, and XLA when `xla`) training steps at [batch, length, inputs]."""
    import keras

    x = _inputs(tf, batch, length, inputs)
    qrnn, lstm = make_qrnn(hidden, inputs), make_lstm(hidden, inputs)
    steps = {"qrnn": training_step(tf, qrnn, x, jit_compile=False),
             "lstm_plain": training_step(tf, lstm, x, jit_compile=False)}
    if xla:
        steps["lstm_xla"] = training_step(tf, lstm, x, jit_compile=True)
    timed = time_interleaved(steps, warmup, repeats)
    del steps, qrnn, lstm, x
    keras.backend.clear_session()
    gc.collect()
    lstm_names = [name for name in ("lstm_plain", "lstm_xla") if name in timed]
    fastest = min(lstm_names, key=lambda name: timed[name]["median_s"])
    lstm_s, qrnn_s = timed[fastest]["median_s"], timed["qrnn"]["median_s"]
    xla_s = timed["lstm_xla"]["median_s"] if xla else None
    return {
        "batch": batch, "length": length, "inputs": inputs, "hidden": hidden,
        "qrnn_s": qrnn_s, "lstm_plain_s": timed["lstm_plain"]["median_s"], "lstm_xla_s": xla_s,
        "lstm_s": lstm_s, "lstm_compile": fastest.removeprefix("lstm_"),
        "ratio": lstm_s / qrnn_s,
        "ratio_keras_default": None if xla_s is None else xla_s / qrnn_s,
        "ratio_cpu_time": min(timed[name]["cpu_median_s"] for name in lstm_names) / timed["qrnn"]["cpu_median_s"],
        "timings": timed,
    }


# ---------------------------------------------------------------- the QRNN's parts

def reference_recurrence(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """c_t = a_t c_{t-1} + b_t, c_0 = 0, in float64, step by step (a, b: [B, T, H])."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    states = np.empty_like(b)
    state = np.zeros_like(b[:, 0])
    for t in range(b.shape[1]):
        state = a[:, t] * state + b[:, t]
        states[:, t] = state
    return states


def time_pooling(tf, shape: dict, warmup: int, repeats: int) -> dict:
    """The QRNN layer step and its parts at `shape`, in one interleaved round (see the module docstring)."""
    import keras

    from yt8m_qrnn.models.qrnn import LINEAR_RECURRENCES, resolve_pool_impl

    used = resolve_pool_impl("auto")
    x = _inputs(tf, shape["batch"], shape["frames"], shape["inputs"])
    layer = make_qrnn(shape["hidden"], shape["inputs"])
    gates = layer._gates(x, training=False)
    decay, new_input = layer._recurrence_terms(gates)  # the tensors the layer's pooling solves for
    expected = reference_recurrence(decay, new_input)
    scale = max(1.0, float(np.abs(expected).max()))

    @tf.function
    def convolution(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            pre_activations = layer._pre_activations(inputs)
            loss = tf.reduce_mean(tf.square(pre_activations))
        return tape.gradient(loss, [inputs, layer.kernel, layer.bias])

    def pooling_step(recurrence):
        @tf.function
        def step(a, b):
            with tf.GradientTape() as tape:
                tape.watch([a, b])
                loss = tf.reduce_mean(tf.square(recurrence(a, b)))
            return tape.gradient(loss, [a, b])

        return lambda: step(decay, new_input)

    agreement = {}
    for name, recurrence in LINEAR_RECURRENCES.items():
        states = np.asarray(tf.function(recurrence)(decay, new_input), np.float64)
        error = float(np.abs(states - expected).max())
        agreement[name] = {"max_abs_error": error, "max_abs_error_scaled": error / scale}
        progress(f"pooling {name}: max |error| against float64 {error:.2e}")
    del expected

    steps = {"layer": training_step(tf, layer, x, jit_compile=False), "convolution": lambda: convolution(x)}
    steps |= {f"pooling_{name}": pooling_step(recurrence) for name, recurrence in LINEAR_RECURRENCES.items()}
    timed = time_interleaved(steps, warmup, repeats)
    layer_s = timed["layer"]["median_s"]
    implementations = {name: {"median_s": timed[f"pooling_{name}"]["median_s"],
                              "share_of_layer": timed[f"pooling_{name}"]["median_s"] / layer_s,
                              **agreement[name], "timings": timed[f"pooling_{name}"]}
                       for name in LINEAR_RECURRENCES}
    result = {
        "shape": shape, "window": WINDOW, "pooling": POOLING, "warmup": warmup, "repeats": repeats,
        "layer_pool_impl": used,
        "layer_s": layer_s, "convolution_s": timed["convolution"]["median_s"],
        "pooling_s": implementations[used]["median_s"],
        "pooling_share": implementations[used]["median_s"] / layer_s,
        "convolution_share": timed["convolution"]["median_s"] / layer_s,
        "other_share": 1.0 - (implementations[used]["median_s"] + timed["convolution"]["median_s"]) / layer_s,
        # the same shares in process CPU time, less sensitive to other work on the machine
        "pooling_share_cpu": timed[f"pooling_{used}"]["cpu_median_s"] / timed["layer"]["cpu_median_s"],
        "convolution_share_cpu": timed["convolution"]["cpu_median_s"] / timed["layer"]["cpu_median_s"],
        "implementations": implementations,
        "timings": {"layer": timed["layer"], "convolution": timed["convolution"]},
        "note": ("each part timed alone with its own gradient (loss: mean square of its output); "
                 "other_share: gate activations, the products around the pooling, and what the parts "
                 "do not share"),
    }
    progress(f"shape {shape['name']}: QRNN layer {1e3 * layer_s:.1f} ms, convolution "
             f"{1e3 * result['convolution_s']:.1f} ms ({100 * result['convolution_share']:.0f}%), pooling "
             + ", ".join(f"{n} {1e3 * v['median_s']:.1f} ms" for n, v in implementations.items())
             + f" ({used} in the layer: {100 * result['pooling_share']:.1f}%)")
    del steps, layer, x, gates, decay, new_input
    keras.backend.clear_session()
    gc.collect()
    return result


# ---------------------------------------------------------------- the input pipeline

def frame_shards(data_root: Path, max_files: int) -> list[tuple[int, str]]:
    """(version, path relative to data_root) of up to max_files frame-level shards, train split first."""
    data_root = Path(data_root)
    found = []
    for path in sorted(data_root.glob("*/frame/*/*.tfrecord")):
        version, _, split, _ = path.relative_to(data_root).parts
        if version.isdigit() and int(version) in NUM_CLASSES:
            found.append((split != "train", int(version), path.relative_to(data_root).as_posix()))
    found.sort()
    return [(version, rel) for _, version, rel in found[:max_files]]


def generate_shards(root: Path, files: int, videos: int) -> list[tuple[int, str]]:
    from yt8m_qrnn.stages.generate import generate_mirror

    gen = dict(SYNTHETIC) | {"splits": {"train": [files, videos]}}
    generate_mirror(gen, version=2, num_classes=NUM_CLASSES[2], root=root)
    return frame_shards(root, files)


def shard_rows(data_root: Path, shards: list[tuple[int, str]], version: int):
    """Index rows (level, shard, id, num_frames, ...) of every record of the shards: the index stage's own."""
    from yt8m_qrnn.stages.index import index_shards

    return index_shards([(Path(data_root) / rel, rel, "frame", Path(rel).parent.name) for _, rel in shards], version)[0]


def time_input_pipeline(tf, cfg: dict, data_root: Path) -> dict:
    """The training stream beside a raw read, on generated shards of YouTube-8M's video lengths (where the
    target is checked) and, when there are any, on the frame-level shards of resources/yt8m."""
    max_files, videos = int(cfg["max_files"]), int(cfg.get("synthetic_videos", 64))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="yt8m-bench-") as tmp:
        root = Path(tmp) / "generated"
        progress(f"generating {max_files} x {videos} videos ({SYNTHETIC['min_frames']}-{SYNTHETIC['max_frames']} "
                 f"frames) in {root}")
        runs[TARGET_RUN] = _time_stream(tf, cfg, root, generate_shards(root, max_files, videos), (
            f"generated by yt8m_qrnn.stages.generate in a temporary folder ({max_files} shards x {videos} videos of "
            f"{SYNTHETIC['min_frames']}-{SYNTHETIC['max_frames']} frames, YouTube-8M's lengths)"))
    shards = frame_shards(data_root, max_files)
    if shards:
        runs["pipeline_shards"] = _time_stream(tf, cfg, Path(data_root), shards,
                                               f"{data_root} (the pipeline's frame-level shards)")
    return {"target_run": TARGET_RUN, "runs": runs}


def _time_stream(tf, cfg: dict, root: Path, shards: list[tuple[int, str]], source: str) -> dict:
    from yt8m_qrnn.data.reader import FrameBatches
    from yt8m_qrnn.data.stream import (
        MAX_FRAMES,
        epoch_seed,
        make_training_stream,
        row_order,
    )

    batch_size, repeats, epochs = int(cfg["batch_size"]), int(cfg["repeats"]), int(cfg.get("epochs", 1))
    versions = {version for version, _ in shards}
    if len(versions) != 1:
        raise ValueError(f"frame-level shards of several dataset versions under {root}: {sorted(versions)}")
    version = versions.pop()
    rows = shard_rows(root, shards, version)
    paths = [str(root / rel) for _, rel in shards]
    total_bytes = epochs * sum(os.path.getsize(p) for p in paths)
    counted = {}

    # built once: what is timed is the reading, not the tracing of the pipelines' functions
    datasets = {
        "raw": tf.data.TFRecordDataset(paths).repeat(epochs).batch(batch_size),
        "pipeline": make_training_stream(root, rows, "frame", version, NUM_CLASSES[version], batch_size,
                                         seed=0, start_epoch=0, end_epoch=epochs),
    }
    batches = FrameBatches(root, rows, version, NUM_CLASSES[version],
                           min(MAX_FRAMES, int(rows["num_frames"].max())))

    def reader(name: str) -> Callable[[], None]:
        def read():
            counted[name] = sum(int(tf.nest.flatten(batch)[-1].shape[0]) for batch in datasets[name])
        return read

    def batches_alone():
        """The stream's batches built one after another in this thread, without tf.data."""
        counted["batches_only"] = 0
        for epoch in range(epochs):
            order = row_order(len(rows), epoch_seed(0, epoch))
            for start in range(0, len(order), batch_size):
                counted["batches_only"] += len(batches(order[start:start + batch_size])[1])

    progress(f"input pipeline: {len(paths)} shards, {len(rows)} videos, {total_bytes / epochs / MB:.1f} MB, "
             f"{epochs} passes; batch {batch_size}, {repeats} repeats")
    timed = time_interleaved({"raw": reader("raw"), "batches_only": batches_alone,
                              "pipeline": reader("pipeline")}, warmup=0, repeats=repeats)
    start = time.perf_counter()
    next(iter(datasets["pipeline"]))
    first_batch_s = time.perf_counter() - start
    videos = epochs * len(rows)
    result = {"source": source, "files": [rel for _, rel in shards], "version": version, "videos": videos,
              "frames": epochs * int(rows["num_frames"].sum()), "max_frames": int(rows["num_frames"].max()),
              "mean_frames": float(rows["num_frames"].mean()),
              "bytes": total_bytes, "epochs": epochs, "batch_size": batch_size, "repeats": repeats,
              "note": ("each measurement reads every file `epochs` times; the first measurement of each is not "
                       "timed, so the timed ones read from the page cache; "
                       "MB/s: bytes read (1 MB = 1e6 bytes) / seconds; raw: "
                       "tf.data.TFRecordDataset(files).repeat(epochs).batch(batch_size); batches_only: the "
                       "stream's batches built by yt8m_qrnn.data.reader.FrameBatches one after another in one Python "
                       "thread, without tf.data; pipeline: yt8m_qrnn.data.stream.make_training_stream over `epochs` epochs "
                       "(each a permutation of the index rows, records read at their offsets with CRCs checked, "
                       "uint8 batches padded to the longest video, built ahead of the consumer: the models "
                       "dequantize on the device)")}
    for name in ("raw", "batches_only", "pipeline"):
        seconds = timed[name]["median_s"]
        if counted[name] != videos:
            raise RuntimeError(f"input pipeline bench: the {name} pass gave {counted[name]} videos, not {videos}")
        result[name] = {"seconds": seconds, "videos_per_s": videos / seconds,
                        "mb_per_s": total_bytes / MB / seconds, "frames_per_s": result["frames"] / seconds,
                        "timings": timed[name]}
    result["share_of_raw"] = result["pipeline"]["mb_per_s"] / result["raw"]["mb_per_s"]
    result["pipeline"]["first_batch_s"] = first_batch_s  # a fresh stream's start-up
    progress(f"input pipeline: {result['pipeline']['videos_per_s']:.0f} videos/s, "
             f"{result['pipeline']['mb_per_s']:.1f} MB/s; raw read {result['raw']['videos_per_s']:.0f} videos/s, "
             f"{result['raw']['mb_per_s']:.1f} MB/s ({100 * result['share_of_raw']:.0f}%); batches built in "
             f"one thread without tf.data {result['batches_only']['videos_per_s']:.0f} videos/s")
    return result


# ---------------------------------------------------------------- summary, targets, figure

def _check(name: str, measured: float | None, why_not: str | None, text: str) -> dict:
    target = TARGETS[name]
    if measured is None or why_not:
        status, met = "not evaluated", None
    else:
        met = measured >= target["value"] if target["op"] == ">=" else measured <= target["value"]
        status = "met" if met else "not met"
    return {"name": name, "target": target["text"], "op": target["op"], "value": target["value"],
            "measured": measured, "measured_text": text, "met": met, "status": status,
            "why_not_evaluated": why_not}


def summarize(cfg: dict, env: dict, layers: dict, pooling: dict, pipeline: dict, seconds: float) -> dict:
    shape, at_shape = layers["shape"], layers["at_shape"]
    ratios = [cell["ratio"] for cell in layers["cells"]]
    off_shape = None if shape["name"] == "yt8m" else \
        f"measured at the {shape['name']} shape {_shape_text(shape)}; the target is set at the YouTube-8M shape " \
        "(bench.shape: yt8m)"
    off_cpu = None if env["device_kind"] == "CPU" else "measured on a GPU; the target is set on a CPU"
    stream = pipeline["runs"][pipeline["target_run"]]
    targets = [
        _check("qrnn_speedup", at_shape["ratio"], off_shape or off_cpu,
               f"{at_shape['ratio']:.2f}x (QRNN {at_shape['qrnn_s']:.3f} s, LSTM {at_shape['lstm_s']:.3f} s; "
               f"CPU time {at_shape['ratio_cpu_time']:.2f}x; load average {_load_text(at_shape)})"),
        _check("pooling_share", pooling["pooling_share"], off_shape,
               f"{100 * pooling['pooling_share']:.1f}% ({pooling['layer_pool_impl']} pooling "
               f"{pooling['pooling_s']:.3f} s of the layer's {pooling['layer_s']:.3f} s; load average "
               f"{_load_text(pooling)})"),
        _check("input_pipeline_share", stream["share_of_raw"], None,
               f"{100 * stream['share_of_raw']:.0f}% ({stream['pipeline']['mb_per_s']:.1f} MB/s of "
               f"{stream['raw']['mb_per_s']:.1f} MB/s; videos of {stream['mean_frames']:.0f} frames on average)"),
    ]
    return {
        "params": cfg,
        "environment": env,
        "seconds": seconds,
        "grid": {k: layers["grid"][k] for k in ("name", "hidden", "inputs", "batch_sizes", "lengths")},
        "grid_ratio": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)} if ratios else None,
        "shape": shape,
        "at_shape": {k: at_shape.get(k) for k in ("qrnn_s", "lstm_s", "lstm_plain_s", "lstm_xla_s", "lstm_compile",
                                                  "ratio", "ratio_keras_default", "ratio_cpu_time", "load_average")},
        "pooling": {"impl": pooling["layer_pool_impl"], "share": pooling["pooling_share"],
                    "convolution_share": pooling["convolution_share"],
                    "implementations_s": {n: v["median_s"] for n, v in pooling["implementations"].items()}},
        "input_pipeline": {name: {"videos_per_s": run["pipeline"]["videos_per_s"],
                                  "mb_per_s": run["pipeline"]["mb_per_s"], "raw_videos_per_s": run["raw"]["videos_per_s"],
                                  "raw_mb_per_s": run["raw"]["mb_per_s"], "share_of_raw": run["share_of_raw"],
                                  "mean_frames": run["mean_frames"], "source": run["source"]}
                           for name, run in pipeline["runs"].items()},
        "targets": targets,
        "files": list(FILES),
    }


def _load_text(measured: dict) -> str:
    load = measured.get("load_average")
    return f"{load['before'][0]:.2f} -> {load['after'][0]:.2f}" if load else "not recorded"


def _shape_text(shape: dict) -> str:
    return f"(batch {shape['batch']}, {shape['frames']} frames, {shape['inputs']} inputs, hidden {shape['hidden']})"


def plot_speedup(layers: dict, pooling: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    grid = layers["grid"]
    batches, lengths = grid["batch_sizes"], grid["lengths"]
    ratio = np.full((len(batches), len(lengths)), np.nan)
    cpu_ratio = np.full_like(ratio, np.nan)
    for cell in layers["cells"]:
        where = batches.index(cell["batch"]), lengths.index(cell["length"])
        ratio[where], cpu_ratio[where] = cell["ratio"], cell.get("ratio_cpu_time", np.nan)
    fig, (heat_ax, bar_ax) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1.1, 1]})
    if layers["cells"]:
        low, high = np.nanmin(ratio), np.nanmax(ratio)
        norm = TwoSlopeNorm(vcenter=1.0, vmin=min(low, 0.5), vmax=max(high, 2.0))
        image = heat_ax.imshow(ratio, cmap="RdYlGn", norm=norm, aspect="auto")
        fig.colorbar(image, ax=heat_ax, label="> 1: the QRNN is faster")
    for i in range(len(batches)):
        for j in range(len(lengths)):
            if not np.isnan(ratio[i, j]):
                heat_ax.text(j, i, f"{ratio[i, j]:.2f}x" + ("" if np.isnan(cpu_ratio[i, j])
                                                             else f"\ncpu {cpu_ratio[i, j]:.2f}x"),
                             ha="center", va="center", fontsize=8)
    heat_ax.set_xticks(range(len(lengths)), [str(v) for v in lengths])
    heat_ax.set_yticks(range(len(batches)), [str(v) for v in batches])
    heat_ax.set(xlabel="sequence length", ylabel="batch size",
                title=f"LSTM / QRNN step time, grid {grid['name']}\n(hidden {grid['hidden']}, inputs {grid['inputs']}; "
                      "wall time, and process CPU time below)")

    at_shape = layers["at_shape"]
    # two rounds, each timed interleaved: the layers against each other, then the QRNN's parts
    bars = [("QRNN layer", at_shape["qrnn_s"], "tab:green"),
            ("LSTM (tf.function)", at_shape["lstm_plain_s"], "tab:red")]
    if at_shape["lstm_xla_s"] is not None:
        bars.append(("LSTM (XLA)", at_shape["lstm_xla_s"], "tab:pink"))
    bars += [("parts' round: QRNN layer", pooling["layer_s"], "tab:green"),
             ("  convolution alone", pooling["convolution_s"], "tab:olive")]
    bars += [(f"  pooling alone: {name}" + (" (the layer's)" if name == pooling["layer_pool_impl"] else ""),
              value["median_s"], "tab:cyan") for name, value in pooling["implementations"].items()]
    ys = list(range(len(bars)))[::-1]
    bar_ax.barh(ys, [b[1] for b in bars], color=[b[2] for b in bars])
    for y, (_, value, _) in zip(ys, bars):
        bar_ax.text(value, y, f" {1e3 * value:.1f} ms" if value < 1 else f" {value:.2f} s", va="center", fontsize=8)
    bar_ax.set_yticks(ys, [b[0] for b in bars], fontsize=8)
    bar_ax.set_xscale("log")
    shape = layers["shape"]
    bar_ax.set(xlabel="step time, forward + gradient (s, log scale)",
               title=f"Shape {shape['name']} {_shape_text(shape)}\nLSTM / QRNN {at_shape['ratio']:.2f}x"
                     + (f" (cpu {at_shape['ratio_cpu_time']:.2f}x)" if at_shape.get("ratio_cpu_time") else ""))
    bar_ax.grid(axis="x", alpha=0.3)
    env = summary["environment"]
    fig.suptitle(f"QRNN vs LSTM training step: {env['device']}, {env['backend']} {env['versions']['tensorflow']}, "
                 f"{env['cpus_usable']} CPUs, load average {env['load_average_start'][0]:.1f} at the start, "
                 f"{env.get('load_average_end', [float('nan')])[0]:.1f} at the end", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
