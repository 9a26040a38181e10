"""Portable model code: every model builds, trains one step and predicts on every installed
Keras backend (TensorFlow, JAX, PyTorch). Each backend runs in its own process, since
Keras picks the backend at import; a backend that is not installed is skipped."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, tool_env

BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

CHILD = r"""
import json, os, sys
import numpy as np
import keras
assert keras.backend.backend() == os.environ["KERAS_BACKEND"], keras.backend.backend()
from yt8m_qrnn.models.starter import build_model, starter_cross_entropy, trainable_parameter_count
assert "tensorflow" not in sys.modules or os.environ["KERAS_BACKEND"] == "tensorflow", "models imported tensorflow"
CONFIGS = json.loads(sys.argv[1])
CLASSES, BATCH, FRAMES = 11, 4, 6
rng = np.random.default_rng(0)
results = {}
for name, cfg in CONFIGS.items():
    keras.utils.set_random_seed(0)
    model = build_model(name, cfg, CLASSES)
    model.compile(optimizer=keras.optimizers.Adam(0.01, clipnorm=1.0), loss=starter_cross_entropy)
    if cfg["level"] == "video":
        x = {"features": rng.normal(size=(BATCH, 1152)).astype("float32")}
    else:
        x = {"features": rng.integers(0, 256, size=(BATCH, FRAMES, 1152), dtype=np.uint8),
             "num_frames": np.array([6, 1, 3, 5], "int32")}
    y = (rng.uniform(size=(BATCH, CLASSES)) < 0.3).astype("float32")
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    loss = float(np.asarray(model.train_on_batch(x, y)))
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    predictions = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    results[name] = {
        "loss": loss,
        "changed": sum(int(not np.array_equal(a, b)) for a, b in zip(before, after)),
        "weights": len(after),
        "shape": list(predictions.shape),
        "finite": bool(np.isfinite(predictions).all()),
        "in_range": bool(((predictions >= 0) & (predictions <= 1)).all()),
        "parameters": trainable_parameter_count(model),
    }
print("RESULTS " + json.dumps(results))
"""

MODELS = {
    "logistic": {"kind": "logistic", "level": "video"},
    "moe": {"kind": "moe", "level": "video", "num_mixtures": 2},
    "frame_logistic": {"kind": "frame_logistic", "level": "frame"},
    "lstm": {"kind": "lstm", "level": "frame", "cells": 8, "layers": 2},
    "dbof": {"kind": "dbof", "level": "frame", "cluster_size": 16, "hidden_size": 8, "iterations": 5},
    "qrnn_video": {"kind": "qrnn", "level": "video", "hidden": 8, "layers": 2, "window": 1},
    "qrnn_frame": {"kind": "qrnn", "level": "frame", "hidden": 8, "layers": 2, "window": 3, "zoneout": 0.1,
                   "pooling": "ifo", "dense": True, "bidirectional": True},
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_model_trains_a_step_on_the_backend(backend):
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.skip(f"Keras backend {backend!r} is not installed ({BACKENDS[backend]} not importable)")
    env = tool_env() | {"KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(MODELS)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert set(results) == set(MODELS)
    from yt8m_qrnn.models.starter import build_model, trainable_parameter_count  # this process: the default backend
    for name, r in results.items():
        assert r["shape"] == [4, 11] and r["finite"] and r["in_range"], (name, r)
        assert r["loss"] > 0 and r["loss"] == r["loss"], (name, r)
        # one Adam step moves every trainable variable
        assert r["changed"] == r["weights"], (name, r)
        assert r["parameters"] == trainable_parameter_count(build_model(name, MODELS[name], 11)), (name, r)
