"""Quasi-Recurrent Neural Network (Bradbury et al. 2016) as portable Keras 3 layers.

Only keras.layers / keras.ops / keras.random are used (no tf.*), so the layers run
on the TensorFlow, JAX and PyTorch backends.

A QRNN layer is a masked (causal) convolution over time producing the gates,
followed by an element-wise linear recurrence ("pooling"):

    z_t = tanh(W_z * x_{t-k+1..t}),  f_t, o_t, i_t = sigmoid(W_{f,o,i} * x_{t-k+1..t})
    f-pooling:   h_t = f_t * h_{t-1} + (1 - f_t) * z_t
    fo-pooling:  c_t = f_t * c_{t-1} + (1 - f_t) * z_t,   h_t = o_t * c_t
    ifo-pooling: c_t = f_t * c_{t-1} + i_t * z_t,         h_t = o_t * c_t

The pooling is the recurrence c_t = a_t * c_{t-1} + b_t with c_0 = 0, solved by one
of three interchangeable functions below (sequential scan, associative scan, or
closed form in log space).
"""
from __future__ import annotations

import math

import keras
from keras import layers, ops

GATES_PER_POOLING = {"f": ("z", "f"), "fo": ("z", "f", "o"), "ifo": ("z", "f", "o", "i")}

# In the log-space closed form a decay factor (or a chunk's product of them)
# below exp(-20) ~ 2e-9 is treated as exp(-20): the state it multiplies then
# contributes at most 2e-9 of itself, below float32 resolution, and |log A|
# within a chunk stays <= 4 * 20, where float32 still resolves ~1e-5.
_LOG_DECAY_FLOOR = -20.0
_LOG_SPACE_CHUNK = 4
_TINY_MAGNITUDE = 1e-30


# ---------------------------------------------------------------------------
# The linear recurrence c_t = a_t * c_{t-1} + b_t, c_0 = 0; a, b, c: [B, T, H].
# ---------------------------------------------------------------------------


def _time_length_unknown(x):
    # Only in TensorFlow graphs. Keras' TensorFlow associative_scan then nests 48
    # levels of tf.cond, whose gradient graph exhausts memory, so the parallel
    # forms hand such inputs to the sequential scan (same result).
    return x.shape[1] is None


def _scan_step(state, decay_and_input):
    state = decay_and_input[0] * state + decay_and_input[1]
    return state, state


def linear_recurrence_sequential(a, b):
    """Step-by-step scan over time; its gradient is the same scan run backwards (see _sequential_scan)."""
    if _time_length_unknown(b):
        # Keras' TensorFlow scan fails on several inputs of unknown length; one stacked
        # input works (its gradient is about 2x slower, hence only here).
        time_major = ops.transpose(ops.stack([a, b]), (2, 0, 1, 3))
        _, states = ops.scan(_scan_step, ops.zeros_like(b[:, 0]), time_major)
        return ops.transpose(states, (1, 0, 2))
    return _sequential_scan(a, b)


def _time_major_scan(a, b, reverse=False):
    """c_t = a_t * c_{t-1} + b_t over axis 0 (from the end when reverse), from a zero state."""
    _, states = ops.scan(_scan_step, ops.zeros_like(b[0]), (a, b), reverse=reverse)
    return states


@ops.custom_gradient
def _sequential_scan(a, b):
    """The sequential scan with its adjoint as gradient.

    With g_t = dL/dc_t, the gradient lam_t = dL/db_t solves the same recurrence
    backwards, lam_t = a_{t+1} * lam_{t+1} + g_t (lam_T = g_T), and dL/da_t =
    lam_t * c_{t-1}: one more scan instead of differentiating the loop step by step
    (which stores every step's inputs and runs several ops per step). The same
    values as automatic differentiation (bit for bit on TensorFlow), faster: see
    the measurements above AUTO_POOL_IMPL.
    """
    a_time_major, b_time_major = ops.transpose(a, (1, 0, 2)), ops.transpose(b, (1, 0, 2))
    states = _time_major_scan(a_time_major, b_time_major)

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        next_decay = ops.concatenate([a_time_major[1:], ops.zeros_like(a_time_major[:1])], axis=0)
        adjoint = _time_major_scan(next_decay, ops.transpose(upstream, (1, 0, 2)), reverse=True)
        previous_states = ops.concatenate([ops.zeros_like(states[:1]), states[:-1]], axis=0)
        return ops.transpose(adjoint * previous_states, (1, 0, 2)), ops.transpose(adjoint, (1, 0, 2))

    return ops.transpose(states, (1, 0, 2)), grad


def _compose_affine_maps(earlier, later):
    # Applying c -> a1*c + b1 and then c -> a2*c + b2 gives c -> a1*a2*c + (a2*b1 + b2).
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def linear_recurrence_associative(a, b):
    """Parallel prefix scan (O(log T) depth) of the affine maps c -> a_t * c + b_t."""
    if _time_length_unknown(b):
        return linear_recurrence_sequential(a, b)
    _, states = ops.associative_scan(_compose_affine_maps, (a, b), axis=1)
    # The TensorFlow associative_scan can lose the static rank in graph mode.
    return ops.reshape(states, ops.shape(b))


def linear_recurrence_logcumsum(a, b):
    """Closed form c_t = A_t * sum_{s<=t} b_s / A_s, A_t = prod_{r<=t} a_r, in log space.

    Positive and negative parts of b are summed separately (log needs positive
    terms). To keep float32 accurate the time axis is cut into chunks of
    _LOG_SPACE_CHUNK steps: each chunk is solved in closed form from a zero
    state, and the states entering the chunks are a recurrence of the same kind
    over the chunks, solved recursively. So log A never grows beyond a chunk's
    worth of terms, whatever T and however close a is to 0.
    """
    if _time_length_unknown(b):
        return linear_recurrence_sequential(a, b)
    log_decay = ops.log(ops.maximum(a, math.exp(_LOG_DECAY_FLOOR)))
    return _solve_log_space(log_decay, b, _levels_needed(b.shape[1]))


def _levels_needed(steps):
    levels = 0
    while steps > _LOG_SPACE_CHUNK:
        steps = -(-steps // _LOG_SPACE_CHUNK)
        levels += 1
    return levels


def _solve_log_space(log_decay, b, levels):
    if levels == 0:
        return _closed_form(ops.cumsum(log_decay, axis=1), b, axis=1)
    _, steps, hidden = ops.shape(b)
    padding = (-steps) % _LOG_SPACE_CHUNK
    # Padding steps (decay 1, input 0) sit after the real ones and change nothing before them.
    log_decay = ops.pad(log_decay, [[0, 0], [0, padding], [0, 0]])
    b = ops.pad(b, [[0, 0], [0, padding], [0, 0]])
    # The batch goes in as -1 so that a static time length keeps the chunk count static.
    chunked_shape = (-1, (steps + padding) // _LOG_SPACE_CHUNK, _LOG_SPACE_CHUNK, hidden)
    log_decay_in_chunk = ops.cumsum(ops.reshape(log_decay, chunked_shape), axis=2)
    from_zero_state = _closed_form(log_decay_in_chunk, ops.reshape(b, chunked_shape), axis=2)

    chunk_log_decay = ops.maximum(log_decay_in_chunk[:, :, -1], _LOG_DECAY_FLOOR)
    chunk_end_states = _solve_log_space(chunk_log_decay, from_zero_state[:, :, -1], levels - 1)
    entering_states = ops.pad(chunk_end_states[:, :-1], [[0, 0], [1, 0], [0, 0]])

    states = from_zero_state + ops.exp(log_decay_in_chunk) * ops.expand_dims(entering_states, 2)
    return ops.reshape(states, (-1, steps + padding, hidden))[:, :steps]


def _closed_form(log_decay_cumsum, b, axis):
    positive = _decayed_cumsum(log_decay_cumsum, ops.relu(b), axis)
    negative = _decayed_cumsum(log_decay_cumsum, ops.relu(-b), axis)
    return positive - negative


def _decayed_cumsum(log_decay_cumsum, magnitudes, axis):
    # sum_{s<=t} m_s * exp(L_t - L_s); zero magnitudes become a negligible tiny value
    # so that their log is finite and gradients stay finite.
    log_terms = ops.log(ops.maximum(magnitudes, _TINY_MAGNITUDE)) - log_decay_cumsum
    return ops.exp(log_decay_cumsum + _logcumsumexp(log_terms, axis))


def _logcumsumexp(x, axis):
    # keras.ops has no logcumsumexp; a prefix scan of logaddexp is the stable form
    # (no overflow or underflow, whatever the spread of x).
    return ops.reshape(ops.associative_scan(ops.logaddexp, x, axis=axis), ops.shape(x))


LINEAR_RECURRENCES = {
    "sequential": linear_recurrence_sequential,
    "associative": linear_recurrence_associative,
    "logcumsum": linear_recurrence_logcumsum,
}

# pool_impl="auto": the fastest on this project's 2-core CPU. Measured with
# TensorFlow 2.21 (float32, a ~ uniform(0, 1), b ~ normal, inside tf.function
# without XLA as Keras runs on a CPU; after tracing), forward / forward + gradient
# of sum(c). The machine was shared, so two runs (median of 3 on a quieter
# machine; min of 4-10 at load average 5-8):
#   B=128, T=300, H=1024: sequential   226 / 340 ms     369 / 590 ms
#                         associative  752 / 3599 ms   2599 / 4655 ms
#                         logcumsum   2956 / 13196 ms  5144 / 7380 ms
#   B=32,  T=50,  H=256:  sequential   2.7 / 5.6 ms     3.7 / 6.7 ms
#                         associative 15.5 / 40.9 ms    9.7 / 45.8 ms
#                         logcumsum   40.0 / 92.3 ms   37.4 / 69.2 ms
# JAX and PyTorch are not installed here, so their entries are not measured: they
# follow the TensorFlow result (on a CPU one pass over the data beats the
# log-depth passes of the parallel scans). On a GPU the associative scan is the
# usual winner for long sequences; pass pool_impl="associative" there.
#
# Since then the sequential scan's gradient is its adjoint scan (_sequential_scan) and
# the convolution is one matmul per window offset (QRNN._pre_activations). Measured
# on the same 2-core CPU (TensorFlow 2.21, the layer's training step as
# yt8m_qrnn.stages.bench times it: forward + gradient w.r.t. inputs and weights of
# mean(h^2); old and new layers with the same weights, interleaved in one process,
# median of 5-9 steps; the machine was shared, so also the process CPU time):
#   B=128, T=300, D=1152, H=1024:  layer  5.41-6.66 -> 5.21-5.45 s wall, 10.62 -> 10.28 s CPU
#                                  sequential pooling alone  488 -> 388 ms, 785 -> 652 ms CPU
#   B=32,  T=128, D=H=320:         layer  89.3 -> 79.6 ms wall, 163 -> 143 ms CPU
#                                  sequential pooling alone 22.5 -> 15.5 ms
# At the YouTube-8M shape the convolution's matmuls are ~90% of the step (near the
# CPU's float32 peak); results/bench/pooling.json has the current split.
AUTO_POOL_IMPL = {"tensorflow": "sequential", "jax": "sequential", "torch": "sequential"}


def resolve_pool_impl(pool_impl):
    if pool_impl == "auto":
        pool_impl = AUTO_POOL_IMPL.get(keras.backend.backend(), "sequential")
    if pool_impl not in LINEAR_RECURRENCES:
        raise ValueError(f"pool_impl must be 'auto' or one of {sorted(LINEAR_RECURRENCES)}, got {pool_impl!r}")
    return pool_impl


# ---------------------------------------------------------------------------
# Masks and per-sequence reversal
# ---------------------------------------------------------------------------


def _reverse_within_lengths(x, lengths):
    """Reverses each row's first `lengths[b]` steps, leaving the padding after them in place.

    Its own inverse, so it also maps outputs back to input order.
    """
    steps = ops.arange(ops.shape(x)[1], dtype="int32")[None, :]
    lengths = ops.expand_dims(lengths, 1)
    source = ops.where(steps < lengths, lengths - 1 - steps, steps)
    return ops.take_along_axis(x, ops.expand_dims(source, -1), axis=1)


def _last_real_step_values(sequence, mask):
    """sequence[b, t_b] where t_b is the last step with mask True (zeros when there is none)."""
    steps = ops.arange(ops.shape(sequence)[1], dtype="int32")[None, :]
    last_step = ops.max(ops.where(mask, steps, -1), axis=1, keepdims=True)
    selector = ops.cast(ops.equal(steps, last_step), sequence.dtype)
    return ops.sum(sequence * ops.expand_dims(selector, -1), axis=1)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class QRNN(layers.Layer):
    """One QRNN layer: masked convolution of width `window` + f / fo / ifo pooling.

    Gate convention: f is the weight of the previous state (f = 1 keeps the state,
    f = 0 replaces it by the new candidate): c_t = f_t * c_{t-1} + (1 - f_t) * z_t
    (fo, f) or c_t = f_t * c_{t-1} + i_t * z_t (ifo); h_t = o_t * c_t (fo, ifo),
    h_t = c_t (f). The recurrence runs on c, the initial state is zero.

    Convolution: step t sees x_{t-window+1..t} (zeros before the start). One
    kernel [window*D, G*units] (+ bias), as if applied to the `window` shifted
    copies concatenated along features [B, T, window*D] (it is applied as one
    matmul per shift), gives all gates, in column blocks z | f | o | i (as many
    as the pooling uses).

    Zoneout (training only): each f_t element is set to 1 with probability
    `zoneout`, i.e. F = 1 - dropout(1 - f) without the 1/(1-p) rescaling.

    Masking: at steps where the boolean mask [B, T] is False the state is left
    untouched (f = 1, no input), and the output sequence is zero there. The
    final state is h after the last real step. With go_backwards=True each
    sequence is read from its last real step back to its first (padding is
    assumed to come after the real steps, as with right-padded batches); the
    returned sequence is put back in input order, so output t always belongs to
    input t (for go_backwards it summarises frames t..end).

    Args:
        units: state size.
        window: convolution width k >= 1.
        pooling: "f", "fo" or "ifo".
        zoneout: probability of zoning out each forget-gate element in training.
        return_sequences: return [B, T, units] instead of the final [B, units].
        go_backwards: process each sequence in reverse.
        pool_impl: "sequential", "associative", "logcumsum" or "auto".
        seed: seed for the zoneout noise.
    """

    def __init__(self, units, window=2, pooling="fo", zoneout=0.0, return_sequences=False, go_backwards=False,
                 pool_impl="auto", kernel_initializer="glorot_uniform", kernel_regularizer=None,
                 bias_initializer="zeros", seed=None, **kwargs):
        super().__init__(**kwargs)
        if pooling not in GATES_PER_POOLING:
            raise ValueError(f"pooling must be one of {sorted(GATES_PER_POOLING)}, got {pooling!r}")
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 <= zoneout < 1.0:
            raise ValueError(f"zoneout must be in [0, 1), got {zoneout}")
        self.units = int(units)
        self.window = int(window)
        self.pooling = pooling
        self.zoneout = float(zoneout)
        self.return_sequences = bool(return_sequences)
        self.go_backwards = bool(go_backwards)
        self.pool_impl = pool_impl
        self._recurrence = LINEAR_RECURRENCES[resolve_pool_impl(pool_impl)]
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True
        # Keras' TensorFlow scan (its gradient: a while loop without maximum_iterations)
        # and associative_scan (tf.cond branches of mismatched shapes) failed to compile
        # with XLA; this makes Keras fall back to plain tf.function.
        self.supports_jit = keras.backend.backend() != "tensorflow"

    @property
    def gate_names(self):
        return GATES_PER_POOLING[self.pooling]

    def build(self, input_shape):
        gate_width = len(self.gate_names) * self.units
        self.kernel = self.add_weight(
            name="kernel", shape=(self.window * input_shape[-1], gate_width),
            initializer=self.kernel_initializer, regularizer=self.kernel_regularizer)
        self.bias = self.add_weight(name="bias", shape=(gate_width,), initializer=self.bias_initializer)

    def call(self, inputs, mask=None, training=None):
        x = inputs
        if mask is not None:
            mask = ops.cast(mask, "bool")
            x = x * ops.expand_dims(ops.cast(mask, x.dtype), -1)
        if self.go_backwards:
            x = self._reverse(x, mask)

        gates = self._gates(x, training)
        decay, new_input = self._recurrence_terms(gates)
        if mask is not None:
            real = ops.expand_dims(ops.cast(mask, decay.dtype), -1)
            decay = real * decay + (1.0 - real)
            new_input = real * new_input
        states = self._recurrence(decay, new_input)
        outputs = states * gates["o"] if "o" in gates else states

        if not self.return_sequences:
            return outputs[:, -1] if mask is None else _last_real_step_values(outputs, mask)
        if mask is not None:
            outputs = outputs * ops.expand_dims(ops.cast(mask, outputs.dtype), -1)
        return self._reverse(outputs, mask) if self.go_backwards else outputs

    def _reverse(self, x, mask):
        if mask is None:
            return ops.flip(x, axis=1)
        return _reverse_within_lengths(x, ops.sum(ops.cast(mask, "int32"), axis=1))

    def _pre_activations(self, x):
        """The convolution: [x_{t-window+1}, ..., x_t] @ kernel + bias, [B, T, G*units].

        Computed as sum_j x_{t-window+1+j} @ kernel_j over the kernel's row blocks
        kernel_j = kernel[j*D:(j+1)*D] (zeros before the first step): the same product
        as one matmul of the concatenation [B, T, window*D] with the whole kernel,
        without building the concatenation and splitting its gradient (see the
        measurements above AUTO_POOL_IMPL).
        """
        if self.window == 1:
            return ops.matmul(x, self.kernel) + self.bias
        dim = self.kernel.shape[0] // self.window
        last = self.window - 1
        padded = ops.pad(x, [[0, 0], [last, 0], [0, 0]])
        total = self.bias
        for offset in range(self.window):
            shifted = x if offset == last else padded[:, offset: offset - last]
            total = ops.matmul(shifted, self.kernel[offset * dim: (offset + 1) * dim]) + total
        return total

    def _gates(self, x, training):
        pre_activations = self._pre_activations(x)
        blocks = ops.split(pre_activations, len(self.gate_names), axis=-1)
        gates = {name: (ops.tanh if name == "z" else ops.sigmoid)(block)
                 for name, block in zip(self.gate_names, blocks)}
        if training and self.zoneout > 0.0:
            gates["f"] = self._zone_out(gates["f"])
        return gates

    def _zone_out(self, forget):
        zoned_out = keras.random.uniform(ops.shape(forget), seed=self.seed_generator, dtype=forget.dtype) < self.zoneout
        return ops.where(zoned_out, ops.ones_like(forget), forget)

    def _recurrence_terms(self, gates):
        forget, candidate = gates["f"], gates["z"]
        if self.pooling == "ifo":
            return forget, gates["i"] * candidate
        return forget, (1.0 - forget) * candidate

    def compute_output_shape(self, input_shape):
        if self.return_sequences:
            return (input_shape[0], input_shape[1], self.units)
        return (input_shape[0], self.units)

    def compute_mask(self, inputs, mask=None):
        return mask if self.return_sequences else None

    def get_config(self):
        return super().get_config() | {
            "units": self.units,
            "window": self.window,
            "pooling": self.pooling,
            "zoneout": self.zoneout,
            "return_sequences": self.return_sequences,
            "go_backwards": self.go_backwards,
            "pool_impl": self.pool_impl,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="yt8m_qrnn")
class QRNNStack(layers.Layer):
    """`num_layers` QRNN layers; the output is the last layer's final state.

    dense=True: each layer reads the concatenation of the stack input and the
    output sequences of all earlier layers (DenseNet-style, as in the QRNN
    paper's densely connected variant).
    bidirectional=True: each layer is a forward and a go_backwards QRNN; their
    sequences are concatenated for the next layer and the final states of the
    last layer are concatenated, giving [B, 2*units].
    return_sequences=True returns the last layer's sequence instead (with the mask).
    """

    def __init__(self, units, num_layers=1, window=2, pooling="fo", zoneout=0.0, dense=False, bidirectional=False,
                 return_sequences=False, pool_impl="auto", kernel_initializer="glorot_uniform",
                 kernel_regularizer=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.units = int(units)
        self.num_layers = int(num_layers)
        self.window = int(window)
        self.pooling = pooling
        self.zoneout = float(zoneout)
        self.dense = bool(dense)
        self.bidirectional = bool(bidirectional)
        self.return_sequences = bool(return_sequences)
        self.pool_impl = pool_impl
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.seed = seed
        self.supports_masking = True
        # Flat list (forward before backward within a depth) so Keras tracks every layer.
        self.qrnn_layers = [self._make_layer(index, backwards)
                            for index in range(self.num_layers) for backwards in self._directions]

    @property
    def _directions(self):
        return (False, True) if self.bidirectional else (False,)

    def _layers_at_depth(self, index):
        count = len(self._directions)
        return self.qrnn_layers[index * count: (index + 1) * count]

    def _make_layer(self, index, backwards):
        last = index == self.num_layers - 1
        return QRNN(
            self.units, window=self.window, pooling=self.pooling, zoneout=self.zoneout,
            return_sequences=self.return_sequences or not last, go_backwards=backwards,
            # A fresh initializer per layer: an unseeded Keras initializer instance
            # draws the same values on every call.
            pool_impl=self.pool_impl, kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=self.kernel_regularizer,
            seed=None if self.seed is None else self.seed + 2 * index + int(backwards),
            name=f"qrnn_{index}{'_backward' if backwards else ''}")

    @property
    def _layer_output_width(self):
        return self.units * (2 if self.bidirectional else 1)

    def _input_width(self, index, stack_input_width):
        if self.dense:
            return stack_input_width + index * self._layer_output_width
        return stack_input_width if index == 0 else self._layer_output_width

    def build(self, input_shape):
        for index in range(self.num_layers):
            layer_input_shape = (*input_shape[:-1], self._input_width(index, input_shape[-1]))
            for layer in self._layers_at_depth(index):
                layer.build(layer_input_shape)

    def call(self, inputs, mask=None, training=None):
        sequences = [inputs]
        for index in range(self.num_layers):
            layer_input = ops.concatenate(sequences, axis=-1) if self.dense else sequences[-1]
            outputs = [layer(layer_input, mask=mask, training=training) for layer in self._layers_at_depth(index)]
            sequences.append(outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=-1))
        return sequences[-1]

    def compute_output_shape(self, input_shape):
        if self.return_sequences:
            return (*input_shape[:-1], self._layer_output_width)
        return (input_shape[0], self._layer_output_width)

    def compute_mask(self, inputs, mask=None):
        return mask if self.return_sequences else None

    def get_config(self):
        return super().get_config() | {
            "units": self.units,
            "num_layers": self.num_layers,
            "window": self.window,
            "pooling": self.pooling,
            "zoneout": self.zoneout,
            "dense": self.dense,
            "bidirectional": self.bidirectional,
            "return_sequences": self.return_sequences,
            "pool_impl": self.pool_impl,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "seed": self.seed,
        }
