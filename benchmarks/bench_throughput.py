"""Training throughput against the limit on this CPU: model FLOP/s over plain-matmul FLOP/s, per Keras backend.

    .venv/bin/python benchmarks/bench_throughput.py            # full: YouTube-8M shapes (a few minutes)
    .venv/bin/python benchmarks/bench_throughput.py --quick    # tiny shapes (seconds; for the test)

Models: `logistic` and `moe` (video level, batch 1024 as in config/params.paper.yaml) and
the frame-level `qrnn` of params.yaml's `models:` section (its hidden/layers/window/pooling/
zoneout and batch size; `--frames` padded frames per video, default 300, YouTube-8M's
maximum, all frames real). config/params.paper.yaml's `qrnn` is the video-level one; its
frame-level `qrnn_frame` (hidden 1024, batch 128) is ~25 GFLOP per example, too slow here.

For each backend (its own subprocess: Keras picks the backend at import; a backend whose
package is not installed is recorded as skipped) and model:

- flops_per_example: training FLOPs per example, counted analytically from the layer
  shapes (see `matmuls` and `training_flops_per_example`);
- examples_per_second: batch / median wall time of `train_on_batch` on synthetic numpy inputs
  (Adam with clipnorm 1.0, like the pipeline's ClippedAdam without its learning-rate
  schedule; Keras' default jit_compile, recorded per model); the first `warmup` steps
  (tracing/compiling) are not timed;
- matmul_flops_per_second: 2*M*K*N / median time of keras.ops.matmul on [M, K] @ [K, N],
  the shapes of the model's dominant matmul (M = batch * rows per example), jit-compiled
  on JAX, eager (one oneDNN/Eigen kernel) on TensorFlow; its calls take turns with the
  training steps (after both warm up), so both see the same load on a shared machine;
- ratio: flops_per_example * examples_per_second / matmul_flops_per_second.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "throughput_cpu.json"
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}  # Keras backend -> package
VIDEO_BATCH = 1024
FULL = {"classes": 3862, "frames": 300, "warmup": 2, "repeats": 7}
QUICK = {"classes": 7, "frames": 5, "warmup": 1, "repeats": 2, "batch": 8, "hidden": 4}
RESULT_PREFIX = "RESULT "


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ FLOP count


def matmuls(model, frames: int) -> list[dict]:
    """The weight matmuls of one example's forward pass: per layer, rows x [in, out].

    A Dense layer (also the MoE head's gates and experts) multiplies one row per
    example by its kernel [in, out]. A QRNN layer's gate convolution is a matmul of
    each of the `frames` steps' window [window*D] by its kernel [window*D, G*units]
    (it runs as `window` matmuls of D rows each: the same multiply-adds), padding
    steps included. Everything else (normalisation, activations, softmax, the pooling
    recurrence, the loss, the optimizer update) is element-wise and not counted.
    A layer with weights of another kind raises, so a new layer cannot be missed.
    """
    import keras

    from yt8m_qrnn.models.starter import MixtureOfExperts
    from yt8m_qrnn.models.qrnn import QRNNStack

    found = []

    def add(layer, rows, reads_input):
        fan_in, fan_out = (int(n) for n in layer.kernel.shape)
        found.append({"layer": layer.path, "rows": rows, "in": fan_in, "out": fan_out, "reads_input": reads_input})

    for layer in model.layers:
        first = not found  # the first weighted layer reads the model's input: no gradient flows past it
        if isinstance(layer, QRNNStack):
            for number, qrnn in enumerate(layer.qrnn_layers):
                add(qrnn, frames, first and number == 0)
        elif isinstance(layer, MixtureOfExperts):
            add(layer.gates, 1, first)
            add(layer.experts, 1, first)
        elif isinstance(layer, keras.layers.Dense):
            add(layer, 1, first)
        elif layer.weights:
            raise TypeError(f"no FLOP count for layer {layer.name!r} ({type(layer).__name__})")
    return found


def training_flops_per_example(products: list[dict]) -> int:
    """2 FLOPs per multiply-add, for the forward matmul, the weight gradient's and, except in the
    layers that read the model's input (whose input gradient no backend computes), the input
    gradient's: 6x the forward multiply-adds inside the model, 4x at its input."""
    return sum((4 if m["reads_input"] else 6) * m["rows"] * m["in"] * m["out"] for m in products)


# ------------------------------------------------------------------ one backend (child process)


def model_configs(quick: bool, params: Path) -> dict:
    """name -> (model config, batch size, frames per example) for the three models."""
    import yaml

    qrnn = dict(yaml.safe_load(params.read_text())["models"]["qrnn"])
    assert qrnn["kind"] == "qrnn" and qrnn["level"] == "frame", qrnn
    configs = {"logistic": {"kind": "logistic", "level": "video"},
               "moe": {"kind": "moe", "level": "video", "num_mixtures": 2},
               "qrnn": qrnn}
    if quick:
        configs["qrnn"] = qrnn | {"hidden": QUICK["hidden"]}
        return {name: (cfg, QUICK["batch"]) for name, cfg in configs.items()}
    return {"logistic": (configs["logistic"], VIDEO_BATCH), "moe": (configs["moe"], VIDEO_BATCH),
            "qrnn": (qrnn, int(qrnn["batch_size"]))}


def interleaved_seconds(steps: dict, warmup: int, repeats: int) -> dict:
    """name -> wall seconds of each of `repeats` calls of steps[name], after `warmup` untimed calls.

    The steps take turns, so on a shared machine each sees the same contention.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def synthetic_batch(cfg: dict, batch: int, frames: int, classes: int, rng):
    """Inputs as the pipeline gives them (video: float32 [B, 1152]; frame: uint8 [B, T, 1152], all T real)."""
    import numpy as np

    from yt8m_qrnn.records.features import FEATURE_DIM

    if cfg["level"] == "video":
        x = {"features": rng.normal(size=(batch, FEATURE_DIM)).astype("float32")}
    else:
        x = {"features": rng.integers(0, 256, size=(batch, frames, FEATURE_DIM), dtype=np.uint8),
             "num_frames": np.full((batch,), frames, "int32")}
    return x, (rng.uniform(size=(batch, classes)) < 0.01).astype("float32")


def matmul_step(m: int, k: int, n: int):
    """A function running [m, k] @ [k, n] once and waiting for the result (jit-compiled on JAX)."""
    import keras
    import numpy as np

    rng = np.random.default_rng(1)
    a = keras.ops.convert_to_tensor(rng.normal(size=(m, k)).astype("float32"))
    b = keras.ops.convert_to_tensor(rng.normal(size=(k, n)).astype("float32"))
    if keras.backend.backend() == "jax":
        import jax

        product = jax.jit(keras.ops.matmul)
        return lambda: product(a, b).block_until_ready()
    return lambda: keras.ops.convert_to_numpy(keras.ops.matmul(a, b)[:1, :1])


def run_backend(quick: bool, params: Path, frames: int) -> dict:
    """Measures every model on the backend Keras was imported with (KERAS_BACKEND)."""
    import keras
    import numpy as np

    from yt8m_qrnn.models.starter import build_model, starter_cross_entropy

    settings = QUICK if quick else FULL
    backend, classes = keras.backend.backend(), settings["classes"]
    rng = np.random.default_rng(0)
    results = {}
    for name, (cfg, batch) in model_configs(quick, params).items():
        steps = frames if cfg["level"] == "frame" else 1
        keras.utils.set_random_seed(0)
        model = build_model(name, cfg, classes)
        model.compile(optimizer=keras.optimizers.Adam(0.01, clipnorm=1.0), loss=starter_cross_entropy)
        products = matmuls(model, steps)
        flops = training_flops_per_example(products)
        x, y = synthetic_batch(cfg, batch, frames, classes, rng)
        dominant = max(products, key=lambda p: p["rows"] * p["in"] * p["out"])
        shape = [batch * dominant["rows"], dominant["in"], dominant["out"]]
        progress(f"{backend} {name}: batch {batch}, {flops / 1e6:.1f} MFLOP/example; "
                 f"training steps and matmul {shape}, taking turns...")
        times = interleaved_seconds({"step": lambda: model.train_on_batch(x, y), "matmul": matmul_step(*shape)},
                                    settings["warmup"], settings["repeats"])
        step_times, matmul_times = times["step"], times["matmul"]
        examples_per_second = batch / statistics.median(step_times)
        matmul_flops_per_second = 2 * math.prod(shape) / statistics.median(matmul_times)
        results[name] = {
            "config": cfg, "batch": batch, "frames": steps, "classes": classes,
            "jit_compile": bool(model.jit_compile), "matmuls": products,
            "flops_per_example": flops, "step_seconds": step_times, "examples_per_second": examples_per_second,
            "matmul_shape": shape, "matmul_seconds": matmul_times, "matmul_flops_per_second": matmul_flops_per_second,
            "ratio": flops * examples_per_second / matmul_flops_per_second,
        }
        progress(f"{backend} {name}: {examples_per_second:.1f} examples/s, "
                 f"matmul {matmul_flops_per_second / 1e9:.1f} GFLOP/s, ratio {results[name]['ratio']:.2f}")
    return results


# ------------------------------------------------------------------ driver (parent process)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """Installed versions, without importing the packages (None: not installed)."""
    distributions = {"keras": ("keras",), "numpy": ("numpy",),
                     "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"), "jax": ("jax",),
                     "jaxlib": ("jaxlib",), "torch": ("torch",)}
    found = {"python": platform.python_version()}
    for package, names in distributions.items():
        for name in names:
            try:
                found[package] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                found[package] = None
    return found


def measure_in_subprocess(backend: str, args) -> dict:
    """Runs this script's --child mode under KERAS_BACKEND=backend; its progress goes to our stderr."""
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, __file__, "--child", "--params", str(args.params), "--frames", str(args.frames)]
    result = subprocess.run(command + (["--quick"] if args.quick else []), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{backend}: the measurement failed (exit {result.returncode}); see its stderr above")
    line = next(line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line.removeprefix(RESULT_PREFIX))


def table(report: dict) -> str:
    rows = [f"{'backend':<11}{'model':<10}{'MFLOP/ex':>10}{'ex/s':>10}{'model GFLOP/s':>15}"
            f"{'matmul GFLOP/s':>16}{'ratio':>7}"]
    for backend, measured in report["backends"].items():
        if "skipped" in measured:
            rows.append(f"{backend:<11}skipped: {measured['skipped']}")
            continue
        for name, r in measured["models"].items():
            rows.append(f"{backend:<11}{name:<10}{r['flops_per_example'] / 1e6:>10.1f}{r['examples_per_second']:>10.1f}"
                        f"{r['flops_per_example'] * r['examples_per_second'] / 1e9:>15.1f}"
                        f"{r['matmul_flops_per_second'] / 1e9:>16.1f}{r['ratio']:>7.2f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one warm-up, two repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="models.qrnn is read from here")
    parser.add_argument("--frames", type=int, default=None, help="frames per video for the qrnn (default 300)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. the machine was shared)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.frames = args.frames or (QUICK if args.quick else FULL)["frames"]

    if args.child:
        print(RESULT_PREFIX + json.dumps(run_backend(args.quick, args.params, args.frames)), flush=True)
        return 0

    report = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_start": list(os.getloadavg())},
        "versions": versions(),
        "settings": (QUICK if args.quick else FULL) | {"frames": args.frames, "params": str(args.params)},
        "note": args.note,
        "backends": {},
    }
    for backend, package in BACKENDS.items():
        if importlib.util.find_spec(package) is None:
            progress(f"{backend}: skipped ({package} is not installed)")
            report["backends"][backend] = {"skipped": f"{package} is not installed"}
            continue
        progress(f"{backend}: starting")
        report["backends"][backend] = {"models": measure_in_subprocess(backend, args)}
    report["machine"]["load_average_at_end"] = list(os.getloadavg())

    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
