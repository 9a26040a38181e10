"""The models: the YouTube-8M starter baselines (2018 starter code) and the QRNN, in portable Keras 3.

Only keras.layers / keras.ops / keras.random here (no tf.*), so every model runs on
the TensorFlow, JAX and PyTorch backends.

What each model is, faithful to the starter (video_level_models.py, frame_level_models.py,
losses.py, train.py of google/youtube-8m, 2018) and its flag defaults:

- inputs: tf.nn.l2_normalize over the feature axis: per video (video level) or per
  frame (frame level: the stored uint8 frames, dequantized in the model; padding
  frames are zeros and stay zeros);
- logistic (LogisticModel): one dense layer to num_classes sigmoid outputs;
- moe (MoeModel, --moe_num_mixtures=2): gates dense without bias -> softmax over
  num_mixtures + 1 per class (the last one a dummy expert that always says 0);
  experts dense -> sigmoid; prediction = sum of gate * expert over the real experts;
- frame_logistic (FrameLevelLogisticModel): mean over the real frames -> logistic,
  L2 1e-8 fixed as in the starter;
- lstm (LstmModel, --lstm_cells=1024 --lstm_layers=2): a stack of BasicLSTMCell(forget_bias=1.0)
  run by dynamic_rnn over the real frames only; the final h of the last layer -> MoE;
- dbof (DbofModel): `iterations` (30) frames sampled at random among the real ones
  (also at inference, as the starter), batch norm, projection to `cluster_size` (8192),
  batch norm, relu6, max pooling over the samples, projection to `hidden_size` (1024),
  batch norm, relu6 -> MoE;
- qrnn: a QRNNStack (yt8m_qrnn.models.qrnn) whose last layer's final state feeds an MoE head,
  like the LSTM; at level "video" the 1152-d video vector is a sequence of one step, so
  window 1 and no zoneout: each layer is h = o * (1 - f) * z, a gated feed-forward layer
  (fo-pooling from an empty state), and every parameter trains.

Weight penalties: the starter's slim.l2_regularizer(scale) adds scale * sum(w**2) / 2
(tf.nn.l2_loss), so a starter l2_penalty p is keras.regularizers.L2(p / 2) here.
Biases are never penalised (slim penalises weights only). Initialisers are the starter's:
Glorot uniform for slim.fully_connected and tf.get_variable, zero biases, and the
DBoF projections N(0, 1/sqrt(fan_in)).

Loss: the starter's CrossEntropyLoss, epsilon 1e-5 (written 10e-6 there), summed over
classes and averaged over the batch (Keras' default reduction).

Mixed precision: the heads turn their logits to float32 before the sigmoid / softmax,
so predictions and the loss are float32 under any dtype policy.
"""
from __future__ import annotations

import math

import keras
from keras import layers, ops

from yt8m_qrnn.models.qrnn import QRNNStack
from yt8m_qrnn.models.registry import KIND_LEVELS
from yt8m_qrnn.records.features import BIAS, FEATURE_DIM, SCALE

LOSS_EPSILON = 1e-5
STARTER_FORGET_BIAS = 1.0


def starter_l2(penalty: float):
    """slim.l2_regularizer(penalty): penalty * sum(w**2) / 2."""
    return keras.regularizers.L2(penalty / 2.0) if penalty else None


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class L2Normalize(layers.Layer):
    """tf.nn.l2_normalize(x, axis=-1): x / sqrt(max(sum(x**2), 1e-12))."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x):
        return x * ops.rsqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class FrameMask(layers.Layer):
    """Boolean [B, T] mask of the real frames from num_frames [B]."""

    def call(self, features, num_frames):
        steps = ops.arange(ops.shape(features)[1], dtype="int32")
        return ops.expand_dims(steps, 0) < ops.expand_dims(ops.cast(num_frames, "int32"), 1)


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class Dequantize(layers.Layer):
    """Stored uint8 frames [B, T, D] -> q * 4/255 + 4/512 - 2 (the starter's Dequantize), zero where mask is False.

    Done here rather than in the input pipeline: uint8 batches are a quarter of the
    bytes to build, copy and send to the device.
    """

    def call(self, frames, mask):
        values = ops.cast(frames, "float32") * SCALE + BIAS
        return ops.cast(values * ops.expand_dims(ops.cast(mask, "float32"), -1), self.compute_dtype)


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class MaskedMean(layers.Layer):
    """Mean over the real frames only (the starter: sum over the zero-padded frames / num_frames)."""

    def call(self, features, mask):
        weights = ops.expand_dims(ops.cast(mask, features.dtype), -1)
        total = ops.sum(features * weights, axis=1)
        return total / ops.maximum(ops.sum(weights, axis=1), 1.0)


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class MixtureOfExperts(layers.Layer):
    """The starter's MoeModel: per class, a softmax gate over num_mixtures experts plus a
    dummy expert that always predicts 0; each expert is a logistic regression.

    gates: dense, no bias, num_classes * (num_mixtures + 1) outputs, laid out class-major
    (reshaped to [-1, num_mixtures + 1] as the starter does); experts: dense with bias,
    num_classes * num_mixtures outputs. l2_penalty is the starter's (see starter_l2).
    """

    def __init__(self, num_classes, num_mixtures=2, l2_penalty=1e-8, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.num_mixtures, self.l2_penalty = num_classes, num_mixtures, l2_penalty
        reg = starter_l2(l2_penalty)
        self.gates = layers.Dense(num_classes * (num_mixtures + 1), use_bias=False, kernel_regularizer=reg,
                                  dtype=self.dtype_policy, name="gates")
        self.experts = layers.Dense(num_classes * num_mixtures, kernel_regularizer=reg, dtype=self.dtype_policy,
                                    name="experts")

    def build(self, input_shape):
        self.gates.build(input_shape)
        self.experts.build(input_shape)

    def call(self, x):
        gate_logits = ops.cast(self.gates(x), "float32")
        expert_logits = ops.cast(self.experts(x), "float32")
        gates = ops.softmax(ops.reshape(gate_logits, (-1, self.num_classes, self.num_mixtures + 1)), axis=-1)
        experts = ops.sigmoid(ops.reshape(expert_logits, (-1, self.num_classes, self.num_mixtures)))
        return ops.sum(gates[:, :, : self.num_mixtures] * experts, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return super().get_config() | {
            "num_classes": self.num_classes, "num_mixtures": self.num_mixtures, "l2_penalty": self.l2_penalty}


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class StarterLSTMRecurrence(layers.Layer):
    """The recurrent half of tf.contrib.rnn.BasicLSTMCell, as a keras.layers.RNN cell.

    Its input is the input projection x_t @ W_x + b computed for all steps at once by
    StarterLSTM; it adds h_{t-1} @ W_h. Gate order i, j, f, o as BasicLSTMCell:
        c_t = c_{t-1} * sigmoid(f + forget_bias) + sigmoid(i) * tanh(j)
        h_t = tanh(c_t) * sigmoid(o)
    """

    def __init__(self, units, forget_bias=STARTER_FORGET_BIAS, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.forget_bias = float(forget_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.state_size = [self.units, self.units]  # h, c
        self.output_size = self.units

    def build(self, input_shape):
        self.recurrent_kernel = self.add_weight(name="recurrent_kernel", shape=(self.units, 4 * self.units),
                                                initializer=self.kernel_initializer)

    def call(self, projected_inputs, states, training=None):
        h, c = states
        pre_activations = projected_inputs + ops.matmul(h, self.recurrent_kernel)
        i, j, f, o = ops.split(pre_activations, 4, axis=-1)
        c = c * ops.sigmoid(f + self.forget_bias) + ops.sigmoid(i) * ops.tanh(j)
        h = ops.tanh(c) * ops.sigmoid(o)
        return h, [h, c]

    def get_config(self):
        return super().get_config() | {
            "units": self.units, "forget_bias": self.forget_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class StarterLSTM(layers.Layer):
    """One layer of the starter's LSTM: BasicLSTMCell(units, forget_bias=1.0) under dynamic_rnn.

    BasicLSTMCell has one kernel [input_dim + units, 4 * units] applied to [x_t, h_{t-1}]
    and a bias [4 * units] initialised to zeros; the forget bias 1.0 is a constant added
    inside the cell, not an initial value. Here the kernel is kept as its two row blocks,
    W_x [input_dim, 4u] (applied to every step in one matmul) and W_h [u, 4u] (in the
    recurrence); [x, h] @ W == x @ W_x + h @ W_h, and both blocks are drawn from the
    Glorot-uniform distribution of the whole kernel (limit sqrt(6 / (input_dim + 5u))),
    so parameters, initial distribution and function are the starter's.
    dynamic_rnn(sequence_length=num_frames): at padding steps (mask False) the state is
    carried over unchanged, so the final state is the state after the last real frame.
    """

    def __init__(self, units, forget_bias=STARTER_FORGET_BIAS, return_sequences=False, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.forget_bias = float(forget_bias)
        self.return_sequences = bool(return_sequences)
        self.supports_masking = True
        self.recurrence = None

    def build(self, input_shape):
        input_dim = input_shape[-1]
        limit = math.sqrt(6.0 / (input_dim + self.units + 4 * self.units))
        init = keras.initializers.RandomUniform(-limit, limit)
        self.input_kernel = self.add_weight(name="input_kernel", shape=(input_dim, 4 * self.units), initializer=init)
        self.bias = self.add_weight(name="bias", shape=(4 * self.units,), initializer="zeros")
        cell = StarterLSTMRecurrence(self.units, self.forget_bias, kernel_initializer=init, dtype=self.dtype_policy,
                                     name="cell")
        self.recurrence = layers.RNN(cell, return_sequences=self.return_sequences, dtype=self.dtype_policy,
                                     name="rnn")
        self.recurrence.build((*input_shape[:-1], 4 * self.units))

    def call(self, inputs, mask=None, training=None):
        projected = ops.matmul(inputs, self.input_kernel) + self.bias
        return self.recurrence(projected, mask=mask, training=training)

    def compute_output_shape(self, input_shape):
        if self.return_sequences:
            return (*input_shape[:-1], self.units)
        return (input_shape[0], self.units)

    def compute_mask(self, inputs, mask=None):
        return mask if self.return_sequences else None

    def get_config(self):
        return super().get_config() | {
            "units": self.units, "forget_bias": self.forget_bias, "return_sequences": self.return_sequences}


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class SampleFrames(layers.Layer):
    """The starter's SampleRandomFrames / SampleRandomSequence: `num_samples` frames per video.

    random_frames=True: frame index floor(u * num_frames), u ~ U[0, 1), independently per
    sample; False: a random contiguous run starting at floor(u * (max(num_frames -
    num_samples, 0) + 1)), indices capped at num_frames - 1. Sampling happens in training
    and at inference alike, as in the starter.
    """

    def __init__(self, num_samples, random_frames=True, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_samples = int(num_samples)
        self.random_frames = bool(random_frames)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, features, num_frames):
        batch = ops.shape(features)[0]
        frames = ops.cast(ops.expand_dims(num_frames, 1), "float32")
        if self.random_frames:
            u = keras.random.uniform((batch, self.num_samples), seed=self.seed_generator)
            index = ops.cast(u * frames, "int32")
        else:
            u = keras.random.uniform((batch, 1), seed=self.seed_generator)
            start = ops.cast(u * (ops.maximum(frames - self.num_samples, 0.0) + 1.0), "int32")
            offsets = ops.expand_dims(ops.arange(self.num_samples, dtype="int32"), 0)
            index = ops.minimum(start + offsets, ops.cast(frames, "int32") - 1)
        index = ops.clip(index, 0, ops.shape(features)[1] - 1)
        return ops.take_along_axis(features, ops.expand_dims(index, -1), axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_samples, input_shape[-1])

    def get_config(self):
        return super().get_config() | {
            "num_samples": self.num_samples, "random_frames": self.random_frames, "seed": self.seed}


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class FramePooling(layers.Layer):
    """The starter's utils.FramePooling over axis 1: 'max' or 'average'."""

    def __init__(self, method="max", **kwargs):
        super().__init__(**kwargs)
        if method not in ("max", "average"):
            raise ValueError(f"pooling method must be 'max' or 'average', got {method!r}")
        self.method = method

    def call(self, x):
        return ops.max(x, axis=1) if self.method == "max" else ops.mean(x, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return super().get_config() | {"method": self.method}


def starter_cross_entropy(y_true, y_pred):
    """The starter's CrossEntropyLoss, per video: summed over classes (Keras averages over the batch)."""
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, y_pred.dtype)
    loss = y_true * ops.log(y_pred + LOSS_EPSILON) + (1.0 - y_true) * ops.log(1.0 - y_pred + LOSS_EPSILON)
    return -ops.sum(loss, axis=-1)


def _logistic_head(x, num_classes, l2_penalty, name="logistic"):
    logits = layers.Dense(num_classes, kernel_regularizer=starter_l2(l2_penalty), name=name)(x)
    return layers.Activation("sigmoid", dtype="float32", name=f"{name}_sigmoid")(logits)


def _moe_head(x, cfg, num_classes):
    return MixtureOfExperts(num_classes, cfg.get("num_mixtures", 2), cfg.get("l2_penalty", 1e-8), name="moe")(x)


def _video_input():
    features = keras.Input((FEATURE_DIM,), name="features")
    return {"features": features}, L2Normalize(name="l2_normalize")(features)


def _frame_input():
    """Inputs as the pipeline gives them: quantized frames (uint8, zero bytes after each video) and num_frames."""
    features = keras.Input((None, FEATURE_DIM), dtype="uint8", name="features")
    num_frames = keras.Input((), dtype="int32", name="num_frames")
    mask = FrameMask(name="frame_mask")(features, num_frames)
    frames = Dequantize(name="dequantize")(features, mask)
    return {"features": features, "num_frames": num_frames}, L2Normalize(name="l2_normalize")(frames), mask


def build_logistic(cfg, num_classes):
    inputs, x = _video_input()
    return inputs, _logistic_head(x, num_classes, cfg.get("l2_penalty", 1e-8))


def build_moe(cfg, num_classes):
    inputs, x = _video_input()
    return inputs, _moe_head(x, cfg, num_classes)


def build_frame_logistic(cfg, num_classes):
    inputs, x, mask = _frame_input()
    pooled = MaskedMean(name="frame_mean")(x, mask)
    return inputs, _logistic_head(pooled, num_classes, 1e-8)  # the starter fixes 1e-8 here


def build_lstm(cfg, num_classes):
    inputs, x, mask = _frame_input()
    num_layers = cfg.get("layers", 2)
    for i in range(num_layers):
        x = StarterLSTM(cfg.get("cells", 1024), forget_bias=cfg.get("forget_bias", STARTER_FORGET_BIAS),
                        return_sequences=i < num_layers - 1, name=f"lstm_{i}")(x, mask=mask)
    return inputs, _moe_head(x, cfg, num_classes)


def build_dbof(cfg, num_classes):
    inputs, x, _ = _frame_input()
    cluster_size, hidden_size = cfg.get("cluster_size", 8192), cfg.get("hidden_size", 1024)
    batch_norm = cfg.get("batch_norm", True)
    x = SampleFrames(cfg.get("iterations", 30), cfg.get("sample_random_frames", True), name="sample_frames")(
        x, inputs["num_frames"])

    def bn(name):  # slim.batch_norm(center=True, scale=True): decay 0.999, epsilon 0.001
        return layers.BatchNormalization(momentum=0.999, epsilon=1e-3, name=name)

    def projection(width, fan_in, name):
        init = keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(fan_in))
        bias_init = keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(fan_in) if name == "cluster" else 0.01)
        return layers.Dense(width, use_bias=not batch_norm, kernel_initializer=init, bias_initializer=bias_init,
                            name=name)

    if batch_norm:
        x = bn("input_bn")(x)
    x = projection(cluster_size, FEATURE_DIM, "cluster")(x)
    if batch_norm:
        x = bn("cluster_bn")(x)
    x = layers.Activation("relu6", name="cluster_relu6")(x)
    x = FramePooling(cfg.get("pooling_method", "max"), name="frame_pooling")(x)
    x = projection(hidden_size, cluster_size, "hidden1")(x)
    if batch_norm:
        x = bn("hidden1_bn")(x)
    x = layers.Activation("relu6", name="hidden1_relu6")(x)
    return inputs, _moe_head(x, cfg, num_classes)


def build_qrnn(cfg, num_classes):
    if cfg["level"] == "video":
        inputs, x = _video_input()
        x, mask = layers.Reshape((1, FEATURE_DIM), name="as_sequence")(x), None
        window, zoneout = cfg.get("window", 1), cfg.get("zoneout", 0.0)
        if window != 1 or zoneout:
            # one step: a wider window would only ever see padding, zoneout would zero the output
            raise ValueError(f"a video-level QRNN runs over one step: window must be 1 and zoneout 0 "
                             f"(got window {window}, zoneout {zoneout})")
    else:
        inputs, x, mask = _frame_input()
        window, zoneout = cfg.get("window", 2), cfg.get("zoneout", 0.0)
    stack = QRNNStack(
        cfg.get("hidden", 1024), cfg.get("layers", 2), window=window, pooling=cfg.get("pooling", "fo"),
        zoneout=zoneout, dense=cfg.get("dense", False), bidirectional=cfg.get("bidirectional", False),
        pool_impl=cfg.get("pool_impl", "auto"), name="qrnn")
    state = stack(x, mask=mask)
    return inputs, _moe_head(state, cfg, num_classes)


BUILDERS = {
    "logistic": build_logistic,
    "moe": build_moe,
    "frame_logistic": build_frame_logistic,
    "lstm": build_lstm,
    "dbof": build_dbof,
    "qrnn": build_qrnn,
}


def build_model(name: str, cfg: dict, num_classes: int) -> keras.Model:
    kind = cfg["kind"]
    if kind not in BUILDERS:
        raise ValueError(f"models.{name}.kind: {kind!r} is not implemented (available: {', '.join(BUILDERS)})")
    needed = KIND_LEVELS[kind]
    if needed is not None and cfg["level"] != needed:
        raise ValueError(f"models.{name}.level: kind {kind} needs level {needed!r}")
    inputs, predictions = BUILDERS[kind](cfg, num_classes)
    return keras.Model(inputs, predictions, name=name)


def trainable_parameter_count(model: keras.Model) -> int:
    return int(sum(math.prod(v.shape) for v in model.trainable_weights))
