"""Training throughput (examples/sec) of each model: Keras fit on random in-memory batches.

    python benchmarks/bench_train_models.py                      # the paper's sizes, video level + short frames
    python benchmarks/bench_train_models.py --frames 300 --only lstm,qrnn_frame --batch 32

Measures the training step alone (forward, backward, clipping, Adam), after one
warm-up epoch that includes tracing; the data pipeline is not included (see
yt8m_qrnn.data.stream for that). Prints one JSON line per model.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from yt8m_qrnn.models.starter import build_model, starter_cross_entropy, trainable_parameter_count  # noqa: E402
from yt8m_qrnn.stages.train import make_optimizer  # noqa: E402

TRAIN = {"learning_rate_decay": 0.95, "learning_rate_decay_examples": 4_000_000, "clip_gradient_norm": 1.0}
PAPER = {
    "logistic": {"kind": "logistic", "level": "video"},
    "moe": {"kind": "moe", "level": "video", "num_mixtures": 2},
    "qrnn_video": {"kind": "qrnn", "level": "video", "hidden": 1024, "layers": 2, "window": 2, "zoneout": 0.1},
    "frame_logistic": {"kind": "frame_logistic", "level": "frame"},
    "lstm": {"kind": "lstm", "level": "frame", "cells": 1024, "layers": 2},
    "qrnn_frame": {"kind": "qrnn", "level": "frame", "hidden": 1024, "layers": 2, "window": 2, "zoneout": 0.1},
    "dbof": {"kind": "dbof", "level": "frame", "cluster_size": 8192, "hidden_size": 1024, "iterations": 30},
}


def batches(cfg, batch, frames, classes, rng):
    if cfg["level"] == "video":
        x = {"features": rng.normal(size=(batch, 1152)).astype("float32")}
    else:
        x = {"features": rng.normal(size=(batch, frames, 1152)).astype("float32"),
             "num_frames": rng.integers(frames // 2, frames + 1, size=batch).astype("int32")}
    y = (rng.uniform(size=(batch, classes)) < 3 / classes).astype("float32")
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def measure(name, cfg, batch, frames, steps, classes=3862, precision="float32"):
    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    cfg = cfg | {"learning_rate": 0.01, "batch_size": batch}
    model = build_model(name, cfg, classes)
    model.compile(optimizer=make_optimizer(cfg, TRAIN), loss=starter_cross_entropy)
    data = batches(cfg, batch, frames, classes, np.random.default_rng(0))
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # tracing, warm-up
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    return {"model": name, "kind": cfg["kind"], "level": cfg["level"], "batch": batch,
            "frames": frames if cfg["level"] == "frame" else 1, "parameters": trainable_parameter_count(model),
            "precision": precision, "seconds_per_step": seconds / steps, "examples_per_second": steps * batch / seconds,
            "device": "GPU" if tf.config.list_physical_devices("GPU") else f"CPU x{os.cpu_count()}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PAPER))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    args = parser.parse_args()
    for name in args.only.split(","):
        print(json.dumps(measure(name, PAPER[name], args.batch, args.frames, args.steps, precision=args.precision)), flush=True)


if __name__ == "__main__":
    main()
