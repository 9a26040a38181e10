"""QRNN layers against an independent step-by-step float64 numpy reference."""
from __future__ import annotations

import numpy as np
import pytest

import keras
from yt8m_qrnn.models.qrnn import (
    QRNN,
    QRNNStack,
    linear_recurrence_associative,
    linear_recurrence_logcumsum,
    linear_recurrence_sequential,
    resolve_pool_impl,
)

POOLINGS = ["f", "fo", "ifo"]
IMPLS = ["sequential", "associative", "logcumsum"]
RECURRENCES = [linear_recurrence_sequential, linear_recurrence_associative, linear_recurrence_logcumsum]
GATE_COUNT = {"f": 2, "fo": 3, "ifo": 4}
ATOL = 1e-5


# ---------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_qrnn(frames, kernel, bias, window, pooling, go_backwards=False, real=None):
    """h [T, units] for one sequence [T, D], in input order.

    `real` [T] marks the real frames; the others read as zeros, leave the state
    alone and output zeros.
    """
    real = np.ones(len(frames), bool) if real is None else real
    frames = frames * real[:, None]
    if go_backwards:
        frames, real = frames[::-1], real[::-1]
    steps, dim = frames.shape
    units = kernel.shape[1] // GATE_COUNT[pooling]
    state = np.zeros(units)
    outputs = np.zeros((steps, units))
    for t in range(steps):
        if not real[t]:
            continue
        seen = [frames[s] if s >= 0 else np.zeros(dim) for s in range(t - window + 1, t + 1)]
        pre_activation = np.concatenate(seen) @ kernel + bias
        z = np.tanh(pre_activation[:units])
        f = sigmoid(pre_activation[units: 2 * units])
        if pooling == "ifo":
            state = f * state + sigmoid(pre_activation[3 * units:]) * z
        else:
            state = f * state + (1.0 - f) * z
        outputs[t] = state if pooling == "f" else sigmoid(pre_activation[2 * units: 3 * units]) * state
    return outputs[::-1] if go_backwards else outputs


def reference_batch(x, lengths, kernel, bias, window, pooling, go_backwards=False):
    """(sequences [B, T, units] with zeros at padding, final states [B, units])."""
    units = kernel.shape[1] // GATE_COUNT[pooling]
    sequences = np.zeros(x.shape[:2] + (units,))
    finals = np.zeros((x.shape[0], units))
    for row, length in enumerate(lengths):
        outputs = reference_qrnn(x[row, :length], kernel, bias, window, pooling, go_backwards)
        sequences[row, :length] = outputs
        finals[row] = outputs[0] if go_backwards else outputs[-1]
    return sequences, finals


def reference_recurrence(a, b):
    state = np.zeros(a.shape[::2])
    states = []
    for t in range(a.shape[1]):
        state = a[:, t] * state + b[:, t]
        states.append(state)
    return np.stack(states, axis=1)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def randomize_weights(layer, rng):
    kernel, bias = layer.get_weights()
    layer.set_weights([rng.normal(0.0, 0.6, kernel.shape).astype("float32"),
                       rng.normal(0.0, 1.0, bias.shape).astype("float32")])


def as_float64(layer):
    return [np.asarray(w, dtype=np.float64) for w in layer.get_weights()]


def prefix_mask(lengths, steps):
    return np.arange(steps)[None, :] < np.asarray(lengths)[:, None]


def make_pair(pooling, window, impl, go_backwards, rng, dim):
    """Two layers with the same weights: final state and full sequences."""
    common = dict(window=window, pooling=pooling, go_backwards=go_backwards, pool_impl=impl)
    final_layer = QRNN(4, **common)
    sequence_layer = QRNN(4, return_sequences=True, **common)
    final_layer.build((None, None, dim))
    sequence_layer.build((None, None, dim))
    randomize_weights(final_layer, rng)
    sequence_layer.set_weights(final_layer.get_weights())
    return final_layer, sequence_layer


# ---------------------------------------------------------------------------
# the layer against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_qrnn_matches_reference(pooling, window, impl):
    rng = np.random.default_rng([POOLINGS.index(pooling), window, IMPLS.index(impl)])
    steps, dim = 7, 3
    x = rng.normal(size=(5, steps, dim)).astype("float32")
    for go_backwards in (False, True):
        final_layer, sequence_layer = make_pair(pooling, window, impl, go_backwards, rng, dim)
        kernel, bias = as_float64(final_layer)
        for lengths in ([steps] * 5, [steps, 1, 3, 5, steps]):
            mask = None if min(lengths) == steps else prefix_mask(lengths, steps)
            expected_sequences, expected_finals = reference_batch(
                x.astype(np.float64), lengths, kernel, bias, window, pooling, go_backwards)
            np.testing.assert_allclose(final_layer(x, mask=mask), expected_finals, atol=ATOL)
            np.testing.assert_allclose(sequence_layer(x, mask=mask), expected_sequences, atol=ATOL)


def test_single_step_sequences():
    rng = np.random.default_rng(1)
    layer = QRNN(6, window=2, pooling="fo")
    x = rng.normal(size=(3, 1, 11)).astype("float32")
    layer.build(x.shape)
    randomize_weights(layer, rng)
    _, expected = reference_batch(x.astype(np.float64), [1, 1, 1], *as_float64(layer), 2, "fo")
    np.testing.assert_allclose(layer(x), expected, atol=ATOL)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_forward_masks_with_holes(pooling):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, 9, 3)).astype("float32")
    real = np.array([[1, 0, 1, 1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 1, 1, 1, 1, 1]], bool)
    final_layer, sequence_layer = make_pair(pooling, 2, "auto", False, rng, 3)
    weights = as_float64(final_layer)
    expected = np.stack([reference_qrnn(x[row].astype(np.float64), *weights, 2, pooling, real=real[row])
                         for row in range(2)])
    np.testing.assert_allclose(sequence_layer(x, mask=real), expected, atol=ATOL)
    last_real = [7, 8]
    np.testing.assert_allclose(final_layer(x, mask=real), expected[[0, 1], last_real], atol=ATOL)


def test_rows_without_real_frames_give_zero_state():
    layer = QRNN(4, window=2)
    x = np.random.default_rng(2).normal(size=(2, 5, 3)).astype("float32")
    final = np.asarray(layer(x, mask=prefix_mask([0, 5], 5)))
    np.testing.assert_array_equal(final[0], 0.0)
    assert np.abs(final[1]).max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_time_length_in_a_functional_model(impl):
    rng = np.random.default_rng(3)
    layer = QRNN(4, window=3, pooling="ifo", pool_impl=impl, return_sequences=True)
    inputs = keras.Input((None, 3))
    model = keras.Model(inputs, layer(inputs))
    randomize_weights(layer, rng)
    x = rng.normal(size=(2, 37, 3)).astype("float32")
    expected, _ = reference_batch(x.astype(np.float64), [37, 37], *as_float64(layer), 3, "ifo")
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=ATOL)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="unknown static lengths exist only in TF graphs")
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_in_a_graph_with_unknown_length(impl):
    import tensorflow as tf

    rng = np.random.default_rng(14)
    final_layer, _ = make_pair("fo", 3, impl, True, rng, 3)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3]), tf.TensorSpec([None, None], tf.bool)])
    def final_states(x, mask):
        return final_layer(x, mask=mask, training=True)

    x = rng.normal(size=(3, 8, 3)).astype("float32")
    lengths = [8, 2, 5]
    _, expected = reference_batch(x.astype(np.float64), lengths, *as_float64(final_layer), 3, "fo", True)
    np.testing.assert_allclose(final_states(x, prefix_mask(lengths, 8)), expected, atol=ATOL)


# ---------------------------------------------------------------------------
# the three solutions of c_t = a_t c_{t-1} + b_t
# ---------------------------------------------------------------------------


def recurrence_cases():
    rng = np.random.default_rng(4)
    shape = (2, 300, 16)
    near_zero = rng.uniform(0.0, 0.01, shape)
    near_zero[:, ::7] = 0.0
    near_one = 1.0 - rng.uniform(0.0, 1e-3, shape)
    near_one[:, ::5] = 1.0
    mixed = np.where(rng.uniform(size=shape) < 0.5, near_one, near_zero)
    signed = rng.normal(size=shape)
    signed[:, ::3] = 0.0
    return {
        "a~0, signed b": (near_zero, signed),
        "a~1, signed b": (near_one, signed),
        "a~1, positive b": (near_one, np.abs(signed)),
        "a~1, negative b": (near_one, -np.abs(signed)),
        "a mixed, signed b": (mixed, signed),
        "a uniform, signed b": (rng.uniform(size=shape), signed),
    }


@pytest.mark.parametrize("recurrence", RECURRENCES, ids=IMPLS)
def test_linear_recurrences_match_reference(recurrence):
    for name, (a, b) in recurrence_cases().items():
        expected = reference_recurrence(a, b)
        result = np.asarray(recurrence(a.astype("float32"), b.astype("float32")))
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(result, expected, atol=ATOL * scale, err_msg=name)


@pytest.mark.parametrize("recurrence", RECURRENCES, ids=IMPLS)
def test_linear_recurrences_short_sequences(recurrence):
    rng = np.random.default_rng(5)
    for steps in (1, 2, 5, 17):
        a, b = rng.uniform(size=(3, steps, 2)), rng.normal(size=(3, steps, 2))
        result = np.asarray(recurrence(a.astype("float32"), b.astype("float32")))
        np.testing.assert_allclose(result, reference_recurrence(a, b), atol=ATOL)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="unknown static lengths exist only in TF graphs")
@pytest.mark.parametrize("recurrence", RECURRENCES, ids=IMPLS)
def test_linear_recurrences_with_unknown_length_in_a_graph(recurrence):
    import tensorflow as tf

    spec = tf.TensorSpec([None, None, 3])

    @tf.function(input_signature=[spec, spec])
    def states_and_gradient(a, b):
        with tf.GradientTape() as tape:
            tape.watch(b)
            states = recurrence(a, b)
            total = tf.reduce_sum(states)
        return states, tape.gradient(total, b)

    rng = np.random.default_rng(13)
    a, b = rng.uniform(size=(2, 9, 3)), rng.normal(size=(2, 9, 3))
    states, gradient = states_and_gradient(a.astype("float32"), b.astype("float32"))
    np.testing.assert_allclose(states, reference_recurrence(a, b), atol=ATOL)
    assert np.all(np.isfinite(gradient))


def test_auto_resolves_to_an_implementation():
    assert resolve_pool_impl("auto") in IMPLS
    with pytest.raises(ValueError):
        resolve_pool_impl("cuda")


# ---------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("go_backwards", [False, True])
def test_masked_garbage_frames_change_nothing(go_backwards):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 6, 5)).astype("float32")
    lengths = [6, 2, 1, 4]
    garbage = 100.0 * rng.normal(size=(4, 3, 5)).astype("float32")
    padded = np.concatenate([x, garbage], axis=1)
    for pooling in POOLINGS:
        final_layer, sequence_layer = make_pair(pooling, 3, "auto", go_backwards, rng, 5)
        for layer in (final_layer, sequence_layer):
            short = np.asarray(layer(x, mask=prefix_mask(lengths, 6)))
            long = np.asarray(layer(padded, mask=prefix_mask(lengths, 9)))
            np.testing.assert_allclose(long[:, :6] if layer.return_sequences else long, short, atol=1e-6)
            if layer.return_sequences:
                np.testing.assert_array_equal(long[:, 6:], 0.0)


def test_output_mask_follows_return_sequences():
    mask = prefix_mask([2, 3], 3)
    x = np.ones((2, 3, 2), "float32")
    assert QRNN(2).compute_mask(x, mask) is None
    assert QRNN(2, return_sequences=True).compute_mask(x, mask) is mask
    assert QRNN(2, return_sequences=True).compute_output_shape((None, 3, 2)) == (None, 3, 2)
    assert QRNN(5).compute_output_shape((None, 3, 2)) == (None, 5)


# ---------------------------------------------------------------------------
# zoneout
# ---------------------------------------------------------------------------


def test_zoneout_is_identity_at_inference():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 8, 4)).astype("float32")
    plain, zoned = QRNN(5, return_sequences=True), QRNN(5, zoneout=0.5, return_sequences=True)
    plain.build(x.shape)
    zoned.build(x.shape)
    randomize_weights(plain, rng)
    zoned.set_weights(plain.get_weights())
    np.testing.assert_array_equal(zoned(x, training=False), plain(x))
    np.testing.assert_array_equal(zoned(x), plain(x))
    assert np.abs(np.asarray(zoned(x, training=True)) - np.asarray(plain(x))).max() > 1e-3


def test_zoneout_forces_forget_gates_to_one_without_rescaling():
    # One step, f = sigmoid(0) = 0.5, z = tanh(1): h = (1 - f) z = tanh(1) / 2, or 0
    # where f was zoned out to 1. Rescaling by 1/(1-p) would change the nonzero value.
    p, units = 0.3, 256
    layer = QRNN(units, window=1, pooling="f", zoneout=p, seed=11)
    layer.build((None, 1, 1))
    bias = np.concatenate([np.ones(units), np.zeros(units)]).astype("float32")
    layer.set_weights([np.zeros((1, 2 * units), "float32"), bias])
    h = np.asarray(layer(np.zeros((128, 1, 1), "float32"), training=True))
    zoned_out = h == 0.0
    assert abs(zoned_out.mean() - p) < 0.015
    np.testing.assert_allclose(h[~zoned_out], np.tanh(1.0) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------
# QRNNStack
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_stack_shapes(dense, bidirectional):
    directions = 2 if bidirectional else 1
    stack = QRNNStack(6, num_layers=3, window=2, dense=dense, bidirectional=bidirectional)
    x = np.random.default_rng(8).normal(size=(2, 5, 4)).astype("float32")
    mask = prefix_mask([5, 3], 5)
    assert stack(x, mask=mask).shape == (2, 6 * directions)
    assert stack.compute_output_shape((None, 5, 4)) == (None, 6 * directions)
    kernel_rows = [layer.kernel.shape[0] // 2 for layer in stack.qrnn_layers]
    if dense:
        expected_rows = [4 + i * 6 * directions for i in range(3)]
    else:
        expected_rows = [4] + [6 * directions] * 2
    assert kernel_rows == [rows for rows in expected_rows for _ in range(directions)]
    sequences = QRNNStack(6, 2, dense=dense, bidirectional=bidirectional, return_sequences=True)
    assert sequences(x, mask=mask).shape == (2, 5, 6 * directions)
    assert sequences.compute_mask(x, mask) is mask


def test_stack_layers_start_from_different_weights():
    stack = QRNNStack(4, num_layers=2, window=1, bidirectional=True)
    stack.build((None, 5, 8))
    kernels = [np.asarray(layer.kernel) for layer in stack.qrnn_layers]
    assert not np.array_equal(kernels[0], kernels[1])
    assert not np.array_equal(kernels[2], kernels[3])


def test_stack_on_video_level_input():
    stack = QRNNStack(8, num_layers=2, window=2, pooling="fo")
    assert stack(np.ones((3, 1, 1152), "float32")).shape == (3, 8)


def test_bidirectional_dense_stack_matches_reference():
    rng = np.random.default_rng(9)
    steps, dim, units = 6, 3, 4
    x = rng.normal(size=(3, steps, dim)).astype("float32")
    lengths = [6, 1, 4]
    stack = QRNNStack(units, num_layers=2, window=2, pooling="ifo", dense=True, bidirectional=True)
    stack.build((None, steps, dim))
    for layer in stack.qrnn_layers:
        randomize_weights(layer, rng)
    first_forward, first_backward, second_forward, second_backward = stack.qrnn_layers

    def both_directions(inputs, forward, backward):
        results = [reference_batch(inputs, lengths, *as_float64(layer), 2, "ifo", layer.go_backwards)
                   for layer in (forward, backward)]
        return (np.concatenate([r[0] for r in results], -1), np.concatenate([r[1] for r in results], -1))

    first_sequences, _ = both_directions(x.astype(np.float64), first_forward, first_backward)
    _, expected = both_directions(np.concatenate([x, first_sequences], -1), second_forward, second_backward)
    np.testing.assert_allclose(stack(x, mask=prefix_mask(lengths, steps)), expected, atol=ATOL)


# ---------------------------------------------------------------------------
# serialisation
# ---------------------------------------------------------------------------


def test_config_round_trip():
    layer = QRNN(7, window=3, pooling="ifo", zoneout=0.2, return_sequences=True, go_backwards=True,
                 pool_impl="logcumsum", kernel_regularizer=keras.regularizers.L2(1e-4), seed=3)
    assert QRNN.from_config(layer.get_config()).get_config() == layer.get_config()
    stack = QRNNStack(5, num_layers=2, window=1, pooling="f", zoneout=0.1, dense=True, bidirectional=True)
    assert QRNNStack.from_config(stack.get_config()).get_config() == stack.get_config()


def test_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(10)
    inputs = keras.Input((None, 4))
    masked = keras.layers.Masking(0.0)(inputs)
    state = QRNNStack(5, num_layers=2, window=2, pooling="fo", zoneout=0.1, dense=True, bidirectional=True)(masked)
    model = keras.Model(inputs, keras.layers.Dense(3)(state))
    x = rng.normal(size=(3, 6, 4)).astype("float32")
    x[1, 2:] = 0.0
    path = tmp_path / "qrnn.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_learns_a_toy_sequence_task(impl):
    # Label: was the first feature's sum over the real frames positive?
    rng = np.random.default_rng(11)
    x = rng.normal(size=(64, 10, 3)).astype("float32")
    lengths = rng.integers(1, 11, size=64)
    mask = prefix_mask(lengths, 10)
    x[~mask] = 0.0
    y = ((x[:, :, 0]).sum(axis=1) > 0).astype("float32")[:, None]
    inputs = keras.Input((10, 3))
    state = QRNN(16, window=2, pooling="fo", zoneout=0.1, pool_impl=impl, seed=1)(
        keras.layers.Masking(0.0)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(state))
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="binary_crossentropy")
    history = model.fit(x, y, batch_size=64, epochs=25, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert history[-1] < 0.7 * history[0]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="XLA fallback concerns the TensorFlow backend")
def test_tensorflow_models_fall_back_from_xla():
    inputs = keras.Input((None, 3))
    model = keras.Model(inputs, QRNN(4)(inputs))
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(optimizer="adam", loss="mse", jit_compile=True)
    assert not model.jit_compile
