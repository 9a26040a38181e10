"""The models: the YouTube-8M starter baselines and the QRNN, in portable Keras 3.

Only keras.layers / keras.ops here (no tf.*), so every model runs on the
TensorFlow, JAX and PyTorch backends. Inputs are L2-normalised per video (video
level) or per frame (frame level), as the starter code does.
"""
from __future__ import annotations

import keras
from keras import layers, ops

from .qrnn import QRNNStack

FEATURE_DIM = 1152
LOSS_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class L2Normalize(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x):
        return x / ops.sqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class FrameMask(layers.Layer):
    """Boolean [B, T] mask of the real frames from num_frames [B]."""

    def call(self, features, num_frames):
        steps = ops.arange(ops.shape(features)[1])
        return ops.expand_dims(steps, 0) < ops.expand_dims(ops.cast(num_frames, "int32"), 1)


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class MaskedMean(layers.Layer):
    """Mean over the real frames only."""

    def call(self, features, mask):
        weights = ops.expand_dims(ops.cast(mask, features.dtype), -1)
        total = ops.sum(features * weights, axis=1)
        return total / ops.maximum(ops.sum(weights, axis=1), 1.0)


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class MixtureOfExperts(layers.Layer):
    """The starter's MoeModel: per class, a softmax gate over num_mixtures experts plus a
    dummy expert that always predicts 0; each expert is a logistic regression."""

    def __init__(self, num_classes, num_mixtures=2, l2_penalty=1e-8, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.num_mixtures, self.l2_penalty = num_classes, num_mixtures, l2_penalty
        reg = keras.regularizers.L2(l2_penalty)
        self.gates = layers.Dense(num_classes * (num_mixtures + 1), use_bias=False, kernel_regularizer=reg, name="gates")
        self.experts = layers.Dense(num_classes * num_mixtures, kernel_regularizer=reg, name="experts")

    def build(self, input_shape):
        self.gates.build(input_shape)
        self.experts.build(input_shape)

    def call(self, x):
        gates = ops.softmax(ops.reshape(self.gates(x), (-1, self.num_classes, self.num_mixtures + 1)), axis=-1)
        experts = ops.sigmoid(ops.reshape(self.experts(x), (-1, self.num_classes, self.num_mixtures)))
        return ops.sum(gates[:, :, : self.num_mixtures] * experts, axis=-1)

    def get_config(self):
        return super().get_config() | {
            "num_classes": self.num_classes, "num_mixtures": self.num_mixtures, "l2_penalty": self.l2_penalty}


def starter_cross_entropy(y_true, y_pred):
    """The starter's CrossEntropyLoss: summed over classes (Keras averages over the batch)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    loss = y_true * ops.log(y_pred + LOSS_EPSILON) + (1.0 - y_true) * ops.log(1.0 - y_pred + LOSS_EPSILON)
    return -ops.sum(loss, axis=-1)


def _logistic_head(x, num_classes, l2_penalty):
    return layers.Dense(num_classes, activation="sigmoid", kernel_regularizer=keras.regularizers.L2(l2_penalty),
                        name="logistic")(x)


def _video_input():
    features = keras.Input((FEATURE_DIM,), name="features")
    return {"features": features}, L2Normalize(name="l2_normalize")(features)


def _frame_input():
    features = keras.Input((None, FEATURE_DIM), name="features")
    num_frames = keras.Input((), dtype="int32", name="num_frames")
    mask = FrameMask(name="frame_mask")(features, num_frames)
    return {"features": features, "num_frames": num_frames}, L2Normalize(name="l2_normalize")(features), mask


def build_logistic(cfg, num_classes):
    inputs, x = _video_input()
    return inputs, _logistic_head(x, num_classes, cfg.get("l2_penalty", 1e-8))


def build_moe(cfg, num_classes):
    inputs, x = _video_input()
    return inputs, MixtureOfExperts(num_classes, cfg.get("num_mixtures", 2), cfg.get("l2_penalty", 1e-8), name="moe")(x)


def build_frame_logistic(cfg, num_classes):
    inputs, x, mask = _frame_input()
    pooled = MaskedMean(name="frame_mean")(x, mask)
    return inputs, _logistic_head(pooled, num_classes, cfg.get("l2_penalty", 1e-8))


def build_lstm(cfg, num_classes):
    inputs, x, mask = _frame_input()
    for i in range(cfg.get("layers", 2)):
        last = i == cfg.get("layers", 2) - 1
        x = layers.LSTM(cfg.get("cells", 1024), unit_forget_bias=True, return_sequences=not last,
                        name=f"lstm_{i}")(x, mask=mask)
    return inputs, MixtureOfExperts(num_classes, cfg.get("num_mixtures", 2), cfg.get("l2_penalty", 1e-8), name="moe")(x)


def build_qrnn(cfg, num_classes):
    if cfg["level"] == "video":
        inputs, x = _video_input()
        x, mask = layers.Reshape((1, FEATURE_DIM), name="as_sequence")(x), None
    else:
        inputs, x, mask = _frame_input()
    stack = QRNNStack(
        cfg.get("hidden", 1024), cfg.get("layers", 2), window=cfg.get("window", 2), pooling=cfg.get("pooling", "fo"),
        zoneout=cfg.get("zoneout", 0.0), dense=cfg.get("dense", False), bidirectional=cfg.get("bidirectional", False),
        name="qrnn")
    state = stack(x, mask=mask)
    return inputs, MixtureOfExperts(num_classes, cfg.get("num_mixtures", 2), cfg.get("l2_penalty", 1e-8), name="moe")(state)


BUILDERS = {
    "logistic": build_logistic,
    "moe": build_moe,
    "frame_logistic": build_frame_logistic,
    "lstm": build_lstm,
    "qrnn": build_qrnn,
}


def build_model(name: str, cfg: dict, num_classes: int) -> keras.Model:
    kind = cfg["kind"]
    if kind not in BUILDERS:
        raise ValueError(f"models.{name}.kind: {kind!r} is not implemented (available: {', '.join(BUILDERS)})")
    inputs, predictions = BUILDERS[kind](cfg, num_classes)
    return keras.Model(inputs, predictions, name=name)
