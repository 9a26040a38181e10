"""Training-step timings of one QRNN layer and one LSTM layer, and the pooling check (Keras 3 on JAX, PyTorch).

A training step is the layer's forward pass and the gradient of mean(output^2) with respect to
the inputs and every weight. The JAX steps run under jax.jit (Keras' stateless_call inside
jax.grad) and are waited for with block_until_ready; the PyTorch step (torch.nn.LSTM, cuDNN) is
bracketed by torch.cuda.synchronize. Each variant is called once (compilation: first_call_s),
`warmup` times more untimed, then `repeats` times timed, the variants of a cell taking turns in a
rotating order; the median is kept. A variant that fails records its error, the others go on.
"""
from __future__ import annotations

import gc
import importlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

WINDOW = 2
POOLING = "fo"
# "ok": max |error| against float64, relative to max(1, max |c|) (gradients: to max(1, max |dL/db|)), at most
# this. float32 scans stay near 1e-6; the log-space closed form reached 1.2e-5 in its gradient at batch 8 x
# length 512 x hidden 320 on a CPU; a wrong kernel is off by O(0.1).
POOLING_TOLERANCE = 1e-3
# The LSTM a cell's ratio is taken against: the first one measured (the paper timed cuDNN's LSTM).
LSTM_PREFERENCE = ("torch_cudnn", "keras_jax_cudnn", "keras_jax_scan")


def qrnn_module():
    return importlib.import_module("yt8m_qrnn.models.qrnn")


def bench_module():
    return importlib.import_module("yt8m_qrnn.stages.bench")


def progress(message: str) -> None:
    print(f"gpu_check: {message}", flush=True)


# ---------------------------------------------------------------- the recurrences

def pooling_implementations(with_pallas: bool) -> dict[str, Callable]:
    """qrnn.LINEAR_RECURRENCES, plus the fused Pallas kernel (registered there as "pallas",
    in this process only, so that QRNN(pool_impl="pallas") uses it)."""
    recurrences = qrnn_module().LINEAR_RECURRENCES
    if with_pallas:
        from pallas_recurrence import linear_recurrence_pallas

        recurrences["pallas"] = linear_recurrence_pallas
    return dict(recurrences)


def gate_like_inputs(batch: int, steps: int, hidden: int, seed: int = 0):
    """a = f (sigmoid), b = (1 - f) z (tanh) as fo-pooling gives them, and an upstream gradient g."""
    rng = np.random.default_rng(seed)
    shape = (batch, steps, hidden)
    decay = 1.0 / (1.0 + np.exp(-rng.standard_normal(shape)))
    new_input = (1.0 - decay) * np.tanh(rng.standard_normal(shape))
    return decay.astype(np.float32), new_input.astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def reference_gradients(a, states, upstream):
    """d sum(g * c) / d(a, b) in float64: lam_t = a_{t+1} lam_{t+1} + g_t, db = lam, da = lam * c_{t-1}."""
    reference_recurrence = bench_module().reference_recurrence
    a = np.asarray(a, np.float64)
    decay_after = np.concatenate([a[:, 1:], np.zeros_like(a[:, :1])], axis=1)
    adjoint = reference_recurrence(decay_after[:, ::-1], np.asarray(upstream, np.float64)[:, ::-1])[:, ::-1]
    previous = np.concatenate([np.zeros_like(states[:, :1]), states[:, :-1]], axis=1)
    return adjoint * previous, adjoint


def check_pooling(shape: dict, implementations: dict[str, Callable], warmup: int, repeats: int) -> dict:
    """Each implementation's states and gradients against float64, and its forward + gradient time."""
    import jax
    import jax.numpy as jnp

    a, b, g = gate_like_inputs(shape["batch"], shape["frames"], shape["hidden"])
    expected = bench_module().reference_recurrence(a, b)
    expected_da, expected_db = reference_gradients(a, expected, g)
    scale = max(1.0, float(np.abs(expected).max()))
    a_dev, b_dev, g_dev = map(jnp.asarray, (a, b, g))
    results, steps = {}, {}
    for name, recurrence in implementations.items():
        try:
            states = np.asarray(jax.jit(recurrence)(a_dev, b_dev), np.float64)
            gradient = jax.jit(jax.grad(lambda a_, b_, f=recurrence: jnp.sum(f(a_, b_) * g_dev), argnums=(0, 1)))
            da, db = (np.asarray(x, np.float64) for x in gradient(a_dev, b_dev))
        except Exception as err:  # noqa: BLE001 - recorded, the others go on
            results[name] = {"error": _error_text(err)}
            progress(f"pooling {name}: FAILED: {results[name]['error']}")
            continue
        error = float(np.abs(states - expected).max())
        grad_error = max(float(np.abs(da - expected_da).max()), float(np.abs(db - expected_db).max()))
        grad_scale = max(1.0, float(np.abs(expected_db).max()))
        results[name] = {"max_abs_error": error, "max_abs_error_scaled": error / scale,
                         "max_abs_grad_error": grad_error, "max_abs_grad_error_scaled": grad_error / grad_scale,
                         "ok": error / scale <= POOLING_TOLERANCE and grad_error / grad_scale <= POOLING_TOLERANCE}
        steps[name] = jax_step(lambda gradient=gradient: gradient(a_dev, b_dev))
        progress(f"pooling {name}: max |error| {error:.2e}, gradient {grad_error:.2e} against float64")
    for name, timing in time_interleaved(steps, warmup, repeats).items():
        results[name]["timing"] = timing
    return {"shape": shape, "tolerance_scaled": POOLING_TOLERANCE, "inputs": "a = sigmoid(N(0,1)), "
            "b = (1 - a) tanh(N(0,1)); gradient of sum(g * c), g ~ N(0,1); timing: forward + gradient",
            "implementations": results}


# ---------------------------------------------------------------- timing

@dataclass
class Step:
    run: Callable[[], object]
    wait: Callable[[object], None]


def jax_step(run: Callable[[], object]) -> Step:
    import jax

    return Step(run, jax.block_until_ready)


def time_interleaved(steps: dict[str, Step], warmup: int, repeats: int) -> dict[str, dict]:
    """{name: timing or {"error"}}: first call, warmup, then `repeats` timed rounds in rotating order.
    A step that raises (at any call) records its error and leaves the rounds; the others go on."""
    results = {name: {} for name in steps}
    alive = dict(steps)

    def timed_call(name: str) -> float | None:
        start = time.perf_counter()
        try:
            alive[name].wait(alive[name].run())
        except Exception as err:  # noqa: BLE001 - recorded, the others go on
            results[name] = {"error": _error_text(err)}
            del alive[name]
            return None
        return time.perf_counter() - start

    for name in list(alive):
        seconds = timed_call(name)  # tracing and compiling
        if seconds is not None:
            results[name]["first_call_s"] = seconds
    for _ in range(warmup):
        for name in list(alive):
            timed_call(name)
    times = {name: [] for name in alive}
    for round_number in range(repeats):
        names = list(alive)
        shift = round_number % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            seconds = timed_call(name)
            if seconds is not None:
                times[name].append(seconds)
    for name in alive:
        results[name] |= {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                          "times_s": times[name]}
    return results


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:600]}"


# ---------------------------------------------------------------- the layers on JAX

def make_qrnn(hidden: int, inputs: int, pool_impl: str):
    layer = qrnn_module().QRNN(hidden, window=WINDOW, pooling=POOLING, return_sequences=True,
                               pool_impl=pool_impl, seed=0)
    layer.build((None, None, inputs))
    return layer


def make_keras_lstm(hidden: int, inputs: int, use_cudnn: bool):
    import keras

    layer = keras.layers.LSTM(hidden, return_sequences=True, use_cudnn=use_cudnn, seed=0)
    layer.build((None, None, inputs))
    return layer


def keras_training_step(layer, x) -> Step:
    """jit(grad) of mean(layer(x)^2) w.r.t. x and the layer's trainable weights (Keras' stateless_call)."""
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(weights, inputs, frozen):
        outputs, _ = layer.stateless_call(weights, frozen, inputs, training=True)
        return jnp.mean(jnp.square(outputs))

    gradient = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return jax_step(lambda: gradient(trainable, x, non_trainable))


def gpu_present() -> bool:
    import jax

    return jax.default_backend() == "gpu"


# ---------------------------------------------------------------- the LSTM on PyTorch

def torch_unavailable_reason() -> str | None:
    """Why the cuDNN LSTM through PyTorch cannot be timed here, or None when it can."""
    try:
        import torch
    except ImportError as err:
        return f"PyTorch not importable ({err})"
    if not torch.cuda.is_available():
        return "PyTorch has no CUDA device"
    if not torch.backends.cudnn.is_available():
        return "PyTorch has no cuDNN"
    return None


def torch_lstm_step(x: np.ndarray, hidden: int) -> Step:
    """torch.nn.LSTM (batch_first, float32, cuDNN): forward, mean(h^2).backward() w.r.t. x and the weights."""
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda")
    lstm = torch.nn.LSTM(x.shape[-1], hidden, batch_first=True).to(device)
    inputs = torch.from_numpy(x).to(device).requires_grad_(True)

    def run():
        lstm.zero_grad(set_to_none=True)
        inputs.grad = None
        outputs, _ = lstm(inputs)
        outputs.square().mean().backward()

    return Step(run, lambda _: torch.cuda.synchronize())


def torch_release() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- one cell

def cell_steps(x: np.ndarray, hidden: int, implementations) -> tuple[dict[str, Step], dict[str, dict]]:
    """The steps to time at input x, and the variants skipped (with the reason)."""
    import jax.numpy as jnp

    inputs, x_dev = x.shape[-1], jnp.asarray(x)
    steps, skipped = {}, {}
    for name in implementations:
        steps[f"qrnn_{name}"] = keras_training_step(make_qrnn(hidden, inputs, name), x_dev)
    steps["keras_jax_scan"] = keras_training_step(make_keras_lstm(hidden, inputs, use_cudnn=False), x_dev)
    if gpu_present():
        steps["keras_jax_cudnn"] = keras_training_step(make_keras_lstm(hidden, inputs, use_cudnn=True), x_dev)
    else:
        skipped["keras_jax_cudnn"] = {"skipped": "no GPU (Keras' cuDNN path, jax.experimental.rnn, needs one)"}
    reason = torch_unavailable_reason()
    if reason is None:
        steps["torch_cudnn"] = torch_lstm_step(x, hidden)
    else:
        skipped["torch_cudnn"] = {"skipped": reason}
    return steps, skipped


def time_cell(batch: int, length: int, inputs: int, hidden: int, implementations, warmup: int,
              repeats: int) -> dict:
    """One grid cell: every QRNN pooling and every LSTM available, and the ratio LSTM / best QRNN."""
    import keras

    x = np.random.default_rng(0).standard_normal((batch, length, inputs), dtype=np.float32)
    try:
        steps, skipped = cell_steps(x, hidden, implementations)
        timed = time_interleaved(steps, warmup, repeats) | skipped
    except Exception as err:  # noqa: BLE001 - building the layers failed: the cell records it
        timed = {"error": {"error": _error_text(err)}}
    finally:
        keras.backend.clear_session()
        gc.collect()
        torch_release()
    return {"batch": batch, "length": length, "inputs": inputs, "hidden": hidden,
            "variants": timed} | summarize_cell(timed)


def summarize_cell(timed: dict) -> dict:
    qrnn = {name: t["median_s"] for name, t in timed.items() if name.startswith("qrnn_") and "median_s" in t}
    lstm = {name: timed[name]["median_s"] for name in LSTM_PREFERENCE if "median_s" in timed.get(name, {})}
    if not qrnn or not lstm:
        return {"best_qrnn": None, "qrnn_s": None, "lstm_reference": None, "lstm_s": None, "ratio": None,
                "ratios": {}}
    best = min(qrnn, key=qrnn.get)
    reference = next(name for name in LSTM_PREFERENCE if name in lstm)
    return {"best_qrnn": best.removeprefix("qrnn_"), "qrnn_s": qrnn[best], "lstm_reference": reference,
            "lstm_s": lstm[reference], "ratio": lstm[reference] / qrnn[best],
            "ratios": {name: seconds / qrnn[best] for name, seconds in lstm.items()}}


def cell_line(cell: dict) -> str:
    parts = []
    for name, timing in cell["variants"].items():
        if "median_s" in timing:
            parts.append(f"{name} {1e3 * timing['median_s']:.2f} ms")
        else:
            parts.append(f"{name} {'skipped' if 'skipped' in timing else 'FAILED'}")
    ratio = "no ratio" if cell["ratio"] is None else \
        f"{cell['lstm_reference']} / qrnn_{cell['best_qrnn']} = {cell['ratio']:.2f}x"
    return f"batch {cell['batch']} x length {cell['length']}: {', '.join(parts)}; {ratio}"
