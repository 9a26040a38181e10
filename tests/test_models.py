"""The models against the YouTube-8M starter code: parameter counts from the starter's
architectures, and each building block against an independent numpy version of the
starter's TensorFlow 1 code (float64)."""
from __future__ import annotations

import ast
import math

import numpy as np
import pytest
import yaml

import keras
from conftest import REPO
from yt8m_qrnn.models.starter import (
    FEATURE_DIM,
    LOSS_EPSILON,
    MixtureOfExperts,
    SampleFrames,
    StarterLSTM,
    build_model,
    starter_cross_entropy,
    trainable_parameter_count,
)
from yt8m_qrnn.records.features import dequantize

C = 3862  # YouTube-8M 2018
D = FEATURE_DIM


# ---------------------------------------------------------------------------
# Parameter counts of the starter's architectures (youtube-8m, 2018), written out
# from its code, not from ours.
# ---------------------------------------------------------------------------


def fully_connected(fan_in, width, bias=True):  # slim.fully_connected
    return fan_in * width + (width if bias else 0)


def starter_moe(fan_in, mixtures):
    # gates: fully_connected(vocab * (M + 1), biases_initializer=None); experts: fully_connected(vocab * M)
    return fully_connected(fan_in, C * (mixtures + 1), bias=False) + fully_connected(fan_in, C * mixtures)


def basic_lstm_cell(fan_in, units):  # kernel [fan_in + units, 4 units], bias [4 units]
    return (fan_in + units) * 4 * units + 4 * units


def batch_norm(width):  # slim.batch_norm(center=True, scale=True): beta and gamma trainable
    return 2 * width


def qrnn_layer(fan_in, units, window, pooling):  # Bradbury et al.: one masked conv giving all gates
    gates = {"f": 2, "fo": 3, "ifo": 4}[pooling]
    return window * fan_in * gates * units + gates * units


def expected_parameters(cfg) -> int:
    kind, mixtures = cfg["kind"], cfg.get("num_mixtures", 2)
    if kind in ("logistic", "frame_logistic"):
        return fully_connected(D, C)
    if kind == "moe":
        return starter_moe(D, mixtures)
    if kind == "lstm":
        units, layers = cfg.get("cells", 1024), cfg.get("layers", 2)
        return sum(basic_lstm_cell(D if i == 0 else units, units) for i in range(layers)) + starter_moe(units, mixtures)
    if kind == "dbof":
        clusters, hidden = cfg.get("cluster_size", 8192), cfg.get("hidden_size", 1024)
        if cfg.get("batch_norm", True):  # no cluster / hidden biases with batch norm
            body = batch_norm(D) + D * clusters + batch_norm(clusters) + clusters * hidden + batch_norm(hidden)
        else:
            body = D * clusters + clusters + clusters * hidden + hidden
        return body + starter_moe(hidden, mixtures)
    if kind == "qrnn":
        units, layers, window = cfg.get("hidden", 1024), cfg.get("layers", 2), cfg.get("window", 2)
        pooling, directions = cfg.get("pooling", "fo"), 2 if cfg.get("bidirectional") else 1
        total, width = 0, units * directions
        for i in range(layers):
            fan_in = D + i * width if cfg.get("dense") else (D if i == 0 else width)
            total += directions * qrnn_layer(fan_in, units, window, pooling)
        return total + starter_moe(width, mixtures)
    raise AssertionError(kind)


STARTER_DEFAULTS = {  # the starter's flag defaults: the paper's baselines
    "logistic": {"kind": "logistic", "level": "video"},
    "moe": {"kind": "moe", "level": "video", "num_mixtures": 2},
    "frame_logistic": {"kind": "frame_logistic", "level": "frame"},
    "lstm": {"kind": "lstm", "level": "frame", "cells": 1024, "layers": 2, "num_mixtures": 2},
    "dbof": {"kind": "dbof", "level": "frame", "cluster_size": 8192, "hidden_size": 1024, "iterations": 30,
             "num_mixtures": 2},
}
def test_hand_worked_counts():
    assert expected_parameters(STARTER_DEFAULTS["logistic"]) == 1152 * 3862 + 3862 == 4_452_886
    assert expected_parameters(STARTER_DEFAULTS["moe"]) == 1152 * 3862 * 3 + 1152 * 3862 * 2 + 3862 * 2
    lstm = (1152 + 1024) * 4096 + 4096 + (1024 + 1024) * 4096 + 4096 + 1024 * 3862 * 5 + 3862 * 2
    assert expected_parameters(STARTER_DEFAULTS["lstm"]) == lstm


@pytest.mark.parametrize("name", sorted(STARTER_DEFAULTS))
def test_starter_default_sizes(name):
    cfg = STARTER_DEFAULTS[name]
    model = build_model(name, cfg, C)
    assert trainable_parameter_count(model) == expected_parameters(cfg)


def paper_and_default_models():
    out = []
    for path in ("params.yaml", "config/params.paper.yaml"):
        for name, cfg in yaml.safe_load((REPO / path).read_text())["models"].items():
            out.append(pytest.param(cfg, id=f"{path.split('/')[-1]}:{name}"))
    return out


@pytest.mark.parametrize("cfg", paper_and_default_models())
def test_configured_models(cfg):
    assert trainable_parameter_count(build_model("m", cfg, C)) == expected_parameters(cfg)


SMALL_VARIANTS = [
    {"kind": "lstm", "level": "frame", "cells": 8, "layers": 3, "num_mixtures": 1},
    {"kind": "dbof", "level": "frame", "cluster_size": 16, "hidden_size": 8, "iterations": 4, "batch_norm": False},
    {"kind": "dbof", "level": "frame", "cluster_size": 16, "hidden_size": 8, "iterations": 4, "num_mixtures": 4},
    *[{"kind": "qrnn", "level": level, "hidden": 8, "layers": layers, "window": window, "pooling": pooling,
       "dense": dense, "bidirectional": bidirectional, "num_mixtures": 3}
      for level in ("video", "frame") for layers in (1, 3) for window in (1, 2, 4) for pooling in ("f", "fo", "ifo")
      for dense in (False, True) for bidirectional in (False, True)
      if not (level == "video" and (window != 1 or bidirectional)) and (layers == 3 or not dense)],
]


@pytest.mark.parametrize("cfg", SMALL_VARIANTS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_variant_counts(cfg):
    assert trainable_parameter_count(build_model("m", cfg, C)) == expected_parameters(cfg)


# ---------------------------------------------------------------------------
# Blocks against numpy versions of the starter's code
# ---------------------------------------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def starter_l2_normalize(x):  # tf.nn.l2_normalize(x, axis=-1), epsilon 1e-12
    return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def numpy_moe(x, gate_kernel, expert_kernel, expert_bias, mixtures):
    # the starter: reshape to [-1, M + 1] / [-1, M], softmax / sigmoid, sum of the first M products
    gates = (x @ gate_kernel).reshape(-1, mixtures + 1)
    gates = np.exp(gates - gates.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    experts = sigmoid((x @ expert_kernel + expert_bias).reshape(-1, mixtures))
    return (gates[:, :mixtures] * experts).sum(-1).reshape(x.shape[0], -1)


def numpy_lstm(x, lengths, kernel, bias, forget_bias=1.0):
    """tf.nn.dynamic_rnn(BasicLSTMCell(forget_bias), x, sequence_length): final h, all h (zeros past length)."""
    batch, steps, _ = x.shape
    units = bias.shape[0] // 4
    h, c = np.zeros((batch, units)), np.zeros((batch, units))
    outputs = np.zeros((batch, steps, units))
    for t in range(steps):
        i, j, f, o = np.split(np.concatenate([x[:, t], h], axis=1) @ kernel + bias, 4, axis=1)
        new_c = c * sigmoid(f + forget_bias) + sigmoid(i) * np.tanh(j)
        new_h = np.tanh(new_c) * sigmoid(o)
        real = (t < lengths)[:, None]
        c, h = np.where(real, new_c, c), np.where(real, new_h, h)
        outputs[:, t] = np.where(real, new_h, 0.0)
    return h, outputs


def test_l2_normalize_per_video_and_per_frame():
    rng = np.random.default_rng(0)
    video = rng.normal(size=(3, D)).astype("float32")
    model = build_model("m", {"kind": "logistic", "level": "video"}, C)
    np.testing.assert_allclose(model.get_layer("l2_normalize")(video), starter_l2_normalize(video), atol=1e-6)
    frames = rng.normal(size=(2, 5, D)).astype("float32")
    frames[1, 3:] = 0.0  # padding frames stay zero
    got = keras.ops.convert_to_numpy(model.get_layer("l2_normalize")(frames))
    np.testing.assert_allclose(got, starter_l2_normalize(frames), atol=1e-6)
    assert not got[1, 3:].any()


@pytest.mark.parametrize("mixtures", [1, 2, 4])
def test_moe_matches_starter(mixtures):
    rng = np.random.default_rng(mixtures)
    classes, width = 7, 5
    layer = MixtureOfExperts(classes, mixtures)
    layer.build((None, width))
    weights = [rng.normal(size=w.shape) for w in layer.get_weights()]
    layer.set_weights(weights)
    gate_kernel, expert_kernel, expert_bias = weights
    x = rng.normal(size=(4, width))
    expected = numpy_moe(x, gate_kernel, expert_kernel, expert_bias, mixtures)
    np.testing.assert_allclose(layer(x.astype("float32")), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("forget_bias", [1.0, 0.0])
def test_lstm_matches_basic_lstm_cell_with_sequence_length(forget_bias):
    rng = np.random.default_rng(1)
    batch, steps, dim, units = 4, 6, 5, 3
    x = rng.normal(size=(batch, steps, dim))
    lengths = np.array([6, 1, 3, 4])
    padding = np.arange(steps)[None, :] >= lengths[:, None]
    x[padding] = 9.0 * rng.normal(size=(padding.sum(), dim))  # garbage: must be ignored
    kernel = rng.normal(scale=0.5, size=(dim + units, 4 * units))
    bias = rng.normal(scale=0.5, size=4 * units)
    mask = np.arange(steps)[None, :] < lengths[:, None]
    final_layer = StarterLSTM(units, forget_bias=forget_bias)
    sequence_layer = StarterLSTM(units, forget_bias=forget_bias, return_sequences=True)
    for layer in (final_layer, sequence_layer):
        layer.build((None, None, dim))
        # the starter's single kernel: rows for x first, then for h
        layer.input_kernel.assign(kernel[:dim].astype("float32"))
        layer.recurrence.cell.recurrent_kernel.assign(kernel[dim:].astype("float32"))
        layer.bias.assign(bias.astype("float32"))
    final, sequences = numpy_lstm(x, lengths, kernel, bias, forget_bias)
    np.testing.assert_allclose(final_layer(x.astype("float32"), mask=mask), final, atol=2e-5)
    got = keras.ops.convert_to_numpy(sequence_layer(x.astype("float32"), mask=mask))
    np.testing.assert_allclose(got[mask], sequences[mask], atol=2e-5)


def test_lstm_initialisation_is_glorot_of_the_whole_starter_kernel():
    layer = StarterLSTM(64)
    layer.build((None, None, 200))
    limit = math.sqrt(6.0 / (200 + 64 + 4 * 64))
    for w in (layer.input_kernel, layer.recurrence.cell.recurrent_kernel):
        values = keras.ops.convert_to_numpy(w)
        assert np.abs(values).max() <= limit and np.abs(values).max() > 0.9 * limit
    assert not keras.ops.convert_to_numpy(layer.bias).any()  # forget bias is added in the cell, not stored


def test_cross_entropy_is_the_starters():
    rng = np.random.default_rng(2)
    predictions = rng.uniform(0, 1, size=(5, 9))
    predictions[0, 0], predictions[1, 1] = 0.0, 1.0
    labels = rng.uniform(size=(5, 9)) < 0.3
    epsilon = 10e-6
    expected = -(labels * np.log(predictions + epsilon) + (1 - labels) * np.log(1 - predictions + epsilon)).sum(1)
    assert LOSS_EPSILON == epsilon
    got = starter_cross_entropy(labels.astype("float32"), predictions.astype("float32"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_weight_penalty_is_slim_l2_regularizer():
    model = build_model("m", {"kind": "moe", "level": "video", "l2_penalty": 0.5}, 3)
    # slim.l2_regularizer(0.5)(w) = 0.5 * tf.nn.l2_loss(w) = 0.5 * sum(w**2) / 2, weights only
    expected = sum(0.5 * (keras.ops.convert_to_numpy(w).astype("float64") ** 2).sum() / 2
                   for w in model.trainable_weights if w.name == "kernel")
    model(np.ones((1, D), "float32"))
    np.testing.assert_allclose(float(sum(model.losses)), expected, rtol=1e-5)


def quantized(rng, shape) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def test_frame_models_dequantize_the_stored_bytes_and_zero_the_padding():
    model = build_model("m", {"kind": "frame_logistic", "level": "frame"}, 11)
    q = quantized(np.random.default_rng(8), (2, 4, D))
    lengths = np.array([4, 1], "int32")
    mask = model.get_layer("frame_mask")(q, lengths)
    got = keras.ops.convert_to_numpy(model.get_layer("dequantize")(q, mask))
    np.testing.assert_allclose(got[0], q[0] * 4.0 / 255.0 + 4.0 / 512.0 - 2.0, atol=1e-6)  # the starter's Dequantize
    np.testing.assert_allclose(got[1, :1], dequantize(q[1, :1]), atol=0)
    assert not got[1, 1:].any()


def test_frame_logistic_averages_the_real_frames_only():
    rng = np.random.default_rng(3)
    model = build_model("m", {"kind": "frame_logistic", "level": "frame"}, 11)
    q = quantized(rng, (2, 6, D))
    frames = dequantize(q)
    lengths = np.array([6, 2], "int32")
    dense = model.get_layer("logistic")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in dense.weights)
    normalized = starter_l2_normalize(frames.astype("float64"))
    normalized[1, 2:] = 0.0
    mean = normalized.sum(1) / lengths[:, None]  # the starter: sum over zero-padded frames / num_frames
    expected = sigmoid(mean @ kernel + bias)
    got = model({"features": q, "num_frames": lengths})
    np.testing.assert_allclose(got, expected, atol=1e-5)


FRAME_MODELS = [
    {"kind": "frame_logistic", "level": "frame"},
    {"kind": "lstm", "level": "frame", "cells": 6, "layers": 2},
    {"kind": "qrnn", "level": "frame", "hidden": 6, "layers": 2, "window": 3},
    {"kind": "qrnn", "level": "frame", "hidden": 6, "layers": 2, "bidirectional": True, "dense": True},
]


@pytest.mark.parametrize("cfg", FRAME_MODELS, ids=lambda c: c["kind"] + ("-bi" if c.get("bidirectional") else ""))
def test_padding_frames_change_nothing(cfg):
    rng = np.random.default_rng(4)
    model = build_model("m", cfg, 13)
    frames = quantized(rng, (3, 7, D))
    lengths = np.array([5, 3, 1], "int32")
    garbage = frames.copy()
    garbage[np.arange(7)[None, :] >= lengths[:, None]] = 200
    clean = frames.copy()
    clean[np.arange(7)[None, :] >= lengths[:, None]] = 0
    a = model({"features": garbage, "num_frames": lengths})
    b = model({"features": clean, "num_frames": lengths})
    c = model({"features": clean[:, :5], "num_frames": lengths})  # less padding, same videos
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)


@pytest.mark.parametrize("random_frames", [True, False])
def test_dbof_samples_only_real_frames(random_frames):
    layer = SampleFrames(50, random_frames=random_frames, seed=3)
    lengths = np.array([1, 2, 7, 20], "int32")
    frames = np.broadcast_to(np.arange(20, dtype="float32")[None, :, None], (4, 20, 2)).copy()
    picked = keras.ops.convert_to_numpy(layer(frames, lengths))[..., 0].astype(int)
    assert picked.shape == (4, 50)
    assert (picked < lengths[:, None]).all() and (picked >= 0).all()
    if random_frames:  # independent draws over all the real frames
        assert len(set(picked[3])) > 10 and (picked[0] == 0).all()
    else:  # a contiguous run from a random start, capped at the last real frame
        assert (np.diff(picked) >= 0).all() and (picked[:, -1] == lengths - 1).all()
        assert (np.diff(picked[3]) == 1).sum() == 19


def test_dbof_structure_is_the_starters():
    model = build_model("m", {"kind": "dbof", "level": "frame", "cluster_size": 16, "hidden_size": 8,
                              "iterations": 5}, 13)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer.name for layer in bns] == ["input_bn", "cluster_bn", "hidden1_bn"]
    assert all(layer.momentum == 0.999 and layer.epsilon == 1e-3 and layer.center and layer.scale for layer in bns)
    assert not model.get_layer("cluster").use_bias and not model.get_layer("hidden1").use_bias
    assert model.get_layer("cluster_relu6").activation.__name__ == "relu6"
    frames = np.full((2, 9, D), 170, "uint8")  # identical frames: sampling cannot matter
    a = model({"features": frames, "num_frames": np.array([9, 4], "int32")})
    b = model({"features": frames, "num_frames": np.array([2, 1], "int32")})
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_level_and_kind_checks():
    with pytest.raises(ValueError, match="kind lstm needs level 'frame'"):
        build_model("m", {"kind": "lstm", "level": "video"}, C)
    with pytest.raises(ValueError, match="is not implemented"):
        build_model("m", {"kind": "gru", "level": "frame"}, C)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_heads_output_float32(policy):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        for cfg in ({"kind": "logistic", "level": "video"}, {"kind": "moe", "level": "video"}):
            model = build_model("m", cfg, 13)
            assert keras.backend.standardize_dtype(model(np.ones((2, D), "float32")).dtype) == "float32"
    finally:
        keras.config.set_dtype_policy(previous)


ALL_SMALL = [
    {"kind": "logistic", "level": "video"},
    {"kind": "moe", "level": "video", "num_mixtures": 3},
    {"kind": "frame_logistic", "level": "frame"},
    {"kind": "lstm", "level": "frame", "cells": 6, "layers": 2},
    {"kind": "dbof", "level": "frame", "cluster_size": 16, "hidden_size": 8, "iterations": 4},
    {"kind": "qrnn", "level": "video", "hidden": 6, "layers": 2},
    {"kind": "qrnn", "level": "frame", "hidden": 6, "layers": 2, "pooling": "ifo", "dense": True,
     "bidirectional": True, "zoneout": 0.2},
]


@pytest.mark.parametrize("cfg", ALL_SMALL, ids=lambda c: f"{c['kind']}-{c['level']}")
def test_keras_file_round_trip(cfg, tmp_path):
    model = build_model("m", cfg, 13)
    rng = np.random.default_rng(5)
    if cfg["level"] == "video":
        inputs = {"features": rng.normal(size=(3, D)).astype("float32")}
    else:  # identical frames keep the DBoF sampling out of the comparison
        frames = np.repeat(quantized(rng, (3, 1, D)), 5, axis=1) if cfg["kind"] == "dbof" \
            else quantized(rng, (3, 5, D))
        inputs = {"features": frames, "num_frames": np.array([5, 2, 4], "int32")}
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(loaded(inputs, training=False), model(inputs, training=False), atol=1e-6)
    assert trainable_parameter_count(loaded) == trainable_parameter_count(model)


def test_model_code_uses_keras_only():
    """Portable model code: no TensorFlow inside models.py."""
    tree = ast.parse((REPO / "src/yt8m_qrnn/models/starter.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] in ("tensorflow", "tf", "jax", "torch") for name in imported), imported
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "tf" not in names
