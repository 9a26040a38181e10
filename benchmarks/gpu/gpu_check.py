"""One-shot GPU check: QRNN vs LSTM layer timings on the QRNN paper's Figure 4 grid, the pooling
implementations against float64, a fused Pallas kernel, and the real pipeline stages on JAX.

Run through benchmarks/gpu/run.sh (it installs the carried wheels and sets KERAS_BACKEND=jax):

    bash benchmarks/gpu/run.sh [--tiny] [--out DIR]

Steps, each printing progress lines (gpu_check: ...), in this order so that a late failure or
a timeout leaves the earlier results written:
1. pooling: each implementation of c_t = a_t c_{t-1} + b_t (yt8m_qrnn's LINEAR_RECURRENCES and
   the fused Pallas kernel of pallas_recurrence.py) against a float64 reference, states and
   gradients, and its forward + gradient time, at the YouTube-8M shape;
2. layers: the training step of one QRNN layer (window 2, fo pooling, return_sequences; once per
   pooling implementation, Keras on JAX under jit) and of one LSTM (cuDNN through PyTorch when it
   has CUDA; Keras on JAX: its cuDNN path on a GPU and its scan) at the YouTube-8M shape and over
   the Figure 4 grid; the ratio LSTM / best QRNN per cell, checked against the paper's figures;
3. the figure gpu_check.png (the ratio over the grid with the paper's points);
4. pipeline: generate, fetch, index, then train and evaluate each model (one epoch, one seed,
   train.backend: jax) in a temporary workspace, as subprocesses.
gpu_check.json is rewritten (atomically) after every step; "complete" is true after the last.
--tiny: the same code paths on a CPU with tiny shapes, for CI.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

import layer_timing as lt
from layer_timing import progress
from yt8m_qrnn.pipeline import provenance

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu"
TINY_GRID = {"hidden": 16, "inputs": 16, "batch_sizes": [2, 4], "lengths": [8, 16]}
TINY_SHAPE = {"batch": 2, "frames": 12, "inputs": 24, "hidden": 16}
# Figure 4 of Bradbury et al. 2016: QRNN over cuDNN LSTM training speed, hidden 320.
PAPER_FIGURE_4 = [
    {"name": "batch 8 x length 512", "batch": 8, "lengths": [512], "paper_ratio": 16.9,
     "paper_text": "16.9x at batch 8, length 512"},
    {"name": "batch 128 (median over lengths)", "batch": 128, "lengths": None, "paper_ratio": 2.0,
     "paper_text": "about 2x at batch 128"},
]
PAPER_AGREEMENT = 0.5  # pass: measured ratio >= PAPER_AGREEMENT x the paper's (same order or better)
CUDNN_LSTMS = ("torch_cudnn", "keras_jax_cudnn")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on a CPU (CI)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first (default 2; tiny 1)")
    parser.add_argument("--repeats", type=int, help="timed steps, median kept (default 5; tiny 1)")
    parser.add_argument("--layer-budget-s", type=float,
                        help="grid cells not started after this, nor when the pipeline's budget would not fit "
                             "in the total (default 240)")
    parser.add_argument("--pipeline-budget-s", type=float, help="pipeline stages time limit (default 120)")
    parser.add_argument("--total-budget-s", type=float,
                        help="no pipeline stage runs past this many seconds from the start (default 450)")
    parser.add_argument("--models", help="comma-separated models to train (default: params.yaml run_models; "
                                         "tiny: logistic,qrnn)")
    parser.add_argument("--no-pallas", action="store_true", help="leave the fused Pallas kernel out")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default: full float32)")
    parser.add_argument("--skip-pipeline", action="store_true", help="leave step 4 out")
    args = parser.parse_args(argv)
    defaults = {"warmup": 1, "repeats": 1, "layer_budget_s": 120.0, "pipeline_budget_s": 150.0,
                "total_budget_s": 400.0} if args.tiny else \
        {"warmup": 2, "repeats": 5, "layer_budget_s": 240.0, "pipeline_budget_s": 120.0, "total_budget_s": 450.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def settings(args) -> dict:
    bench = lt.bench_module()
    grid = TINY_GRID if args.tiny else dict(bench.GRIDS["paper"])
    shape = TINY_SHAPE if args.tiny else dict(bench.SHAPES["yt8m"])
    return {"mode": "tiny" if args.tiny else "gpu", "grid": grid, "shape": shape, "warmup": args.warmup,
            "repeats": args.repeats, "window": lt.WINDOW, "pooling": lt.POOLING, "tf32": args.tf32,
            "layer_budget_s": args.layer_budget_s, "pipeline_budget_s": args.pipeline_budget_s,
            "total_budget_s": args.total_budget_s,
            "loss": "mean square of the output sequence", "gradient": "inputs and every weight",
            "ratio": f"LSTM / QRNN step time: the QRNN's fastest pooling, the first LSTM of "
                     f"{', '.join(lt.LSTM_PREFERENCE)} measured (ratios: against each)"}


# ---------------------------------------------------------------- the machine

def set_float32_precision(tf32: bool) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
    try:
        import torch
    except ImportError:
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    import jax
    import keras

    versions = {"python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
                "jaxlib": package_version("jaxlib"), "keras": keras.__version__}
    versions |= {name: package_version(name) for name in ("jax-cuda13-plugin", "jax-cuda12-plugin", "matplotlib")
                 if package_version(name)}
    devices = [f"{d.platform}: {getattr(d, 'device_kind', str(d))}" for d in jax.devices()]
    env = {"jax_backend": jax.default_backend(), "jax_devices": devices, "keras_backend": keras.backend.backend(),
           "torch": torch_environment(), "versions": versions, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "wheels": carried_wheels()}
    env["versions"] |= {"torch": env["torch"].get("version"), "cuda": env["torch"].get("cuda")}
    env["device"] = env["torch"].get("device") or devices[0]
    if jax.default_backend() == "cpu":
        env["device"] = f"CPU: {provenance.cpu_model()}"
    return env


def torch_environment() -> dict:
    try:
        import torch
    except ImportError as err:
        return {"available": False, "reason": str(err)}
    info = {"available": True, "version": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info |= {"device": torch.cuda.get_device_name(0), "cudnn": torch.backends.cudnn.version()}
    return info


def carried_wheels() -> dict:
    """What run.sh installed from benchmarks/gpu/wheels (it names them in GPU_CHECK_WHEELS_*)."""
    return {key: os.environ.get(f"GPU_CHECK_WHEELS_{key.upper()}", "").split() for key in ("installed", "present")}


# ---------------------------------------------------------------- the steps

def pooling_step(report: dict, args, shape: dict) -> dict:
    implementations = lt.pooling_implementations(with_pallas=not args.no_pallas)
    check = lt.check_pooling(shape, implementations, args.warmup, args.repeats)
    report["pooling_check"] = check
    report["fused_kernel"] = fused_kernel_status(args, check)
    accurate = {name for name, result in check["implementations"].items() if result.get("ok")}
    check["left_out_of_layer_timing"] = sorted(set(implementations) - accurate)  # failed or inaccurate
    return {name: fn for name, fn in implementations.items() if name in accurate}


def fused_kernel_status(args, check: dict) -> dict:
    if args.no_pallas:
        return {"status": "left out (--no-pallas)"}
    from pallas_recurrence import lowering

    result = check["implementations"]["pallas"]
    status = "failed" if "error" in result else ("used" if result["ok"] else "inaccurate")
    return {"status": status, "name": "pallas", "lowering": lowering(),
            "what": "one kernel instance per (batch row, block of hidden units) walks time once; "
                    "the gradient is the adjoint recurrence in a second kernel"} | \
        ({"error": result["error"]} if "error" in result else {})


def layer_step(report: dict, args, config: dict, implementations, write, run_deadline: float) -> None:
    """The shape, then the grid's cells until the layer budget is spent or the pipeline's time begins."""
    shape, grid = config["shape"], config["grid"]
    layers = {"at_shape": None, "cells": [], "skipped_cells": []}
    report["layer_timing"] = layers
    layers["at_shape"] = lt.time_cell(shape["batch"], shape["frames"], shape["inputs"], shape["hidden"],
                                      implementations, args.warmup, args.repeats)
    progress(f"shape {shape}: {lt.cell_line(layers['at_shape'])}")
    write()
    started = time.monotonic()
    stop = min(started + args.layer_budget_s, run_deadline)
    cells = [(b, t) for b in grid["batch_sizes"] for t in grid["lengths"]]
    for number, (batch, length) in enumerate(cells, start=1):
        if time.monotonic() > stop:
            layers["skipped_cells"].append({"batch": batch, "length": length, "reason": "layer budget spent"})
            continue
        cell = lt.time_cell(batch, length, grid["inputs"], grid["hidden"], implementations, args.warmup,
                            args.repeats)
        layers["cells"].append(cell)
        progress(f"grid {number}/{len(cells)}: {lt.cell_line(cell)}")
    layers["grid_seconds"] = time.monotonic() - started
    report["paper_targets"] = paper_targets(layers["cells"])
    for target in report["paper_targets"]:
        progress(f"paper target {target['name']}: {target['status']} ({target['measured_text']})")


def paper_targets(cells: list[dict]) -> list[dict]:
    return [paper_target(spec, cells) for spec in PAPER_FIGURE_4]


def paper_target(spec: dict, cells: list[dict]) -> dict:
    chosen = [c for c in cells if c["batch"] == spec["batch"] and c["ratio"] is not None
              and (spec["lengths"] is None or c["length"] in spec["lengths"])]
    target = {"name": spec["name"], "paper": spec["paper_text"], "paper_ratio": spec["paper_ratio"],
              "rule": f"measured LSTM / QRNN >= {PAPER_AGREEMENT} x paper ratio"}
    if not chosen:
        return target | {"status": "not measured", "measured_ratio": None,
                         "measured_text": "no such cell timed in this grid"}
    measured = statistics.median(c["ratio"] for c in chosen)
    references = sorted({c["lstm_reference"] for c in chosen})
    passed = measured >= PAPER_AGREEMENT * spec["paper_ratio"]
    return target | {"status": "pass" if passed else "fail", "measured_ratio": measured,
                     "lstm_reference": references, "cells": [[c["batch"], c["length"]] for c in chosen],
                     "lstm_is_cudnn_as_in_paper": all(name in CUDNN_LSTMS for name in references),
                     "measured_text": f"{measured:.2f}x against {', '.join(references)}; paper {spec['paper_text']}"}


# ---------------------------------------------------------------- the pipeline stages

# The generated data (generate.splits: split -> [shards, videos per shard]); models at params.yaml's sizes.
GPU_PIPELINE = {"splits": {"train": [2, 200], "validate": [1, 200], "test": [1, 100]}}
# As tests/tiny_pipeline.py: a few short videos, models of 8 units.
TINY_PIPELINE = {"min_frames": 5, "max_frames": 9, "splits": {"train": [2, 40], "validate": [1, 40], "test": [1, 8]},
                 "model": {"batch_size": 16}, "size": 8}
SEQUENCE_MODELS_FIRST = ("qrnn", "lstm")  # trained first: the budget may not reach the last models
TRAIN_STATS_KEYS = ("backend", "devices", "parameters", "epochs", "final_loss", "train_seconds",
                    "examples_per_second", "wall_seconds")
METRIC_KEYS = ("gap", "hit_at_one", "perr", "map", "map_present", "num_videos")


def pipeline_params(tiny: bool, models: list[str]) -> dict:
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["run_models"] = models
    params["train"] |= {"seeds": [1], "backend": "jax"}
    for model in params["models"].values():
        model["epochs"] = 1
        if tiny:
            model |= TINY_PIPELINE["model"]
            model |= {key: TINY_PIPELINE["size"] for key in ("cells", "hidden") if key in model}
    sizes = TINY_PIPELINE if tiny else GPU_PIPELINE
    params["generate"] |= {key: sizes[key] for key in ("min_frames", "max_frames", "splits") if key in sizes}
    return params


def default_models(tiny: bool) -> list[str]:
    import yaml

    if tiny:
        return ["qrnn"]  # every model's stages on JAX are tests/test_jax_backend.py's
    models = yaml.safe_load((REPO / "params.yaml").read_text())["run_models"]
    return sorted(models, key=lambda model: model not in SEQUENCE_MODELS_FIRST)


def write_params(workspace: Path, params: dict) -> Path:
    """The workspace's params.yaml (train.backend: jax)."""
    import yaml

    path = workspace / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(workspace: Path, stage: str, params: Path, model: str | None, deadline: float) -> dict:
    command = [sys.executable, str(REPO / "workflow" / "scripts" / f"{stage}.py"), "--params", params.name]
    command += ["--model", model] if model else []
    record = {"stage": stage, "model": model, "command": " ".join(command[1:])}
    if time.monotonic() >= deadline:
        progress(f"pipeline {stage}{' ' + model if model else ''}: not run (pipeline budget spent)")
        return record | {"returncode": None, "seconds": 0.0, "error": "not run: pipeline budget spent"}
    started = time.monotonic()
    record |= run_until(command, workspace, deadline)
    record["seconds"] = time.monotonic() - started
    if record["returncode"] != 0:
        record["error"] = "timed out (pipeline budget spent)" if record.get("timed_out") else \
            _error_line(record["log_tail"]) or f"exit status {record['returncode']}"
    progress(f"pipeline {stage}{' ' + model if model else ''}: "
             f"{'ok' if record['returncode'] == 0 else 'FAILED: ' + record['error']} ({record['seconds']:.1f} s)")
    return record


def run_until(command: list[str], workspace: Path, deadline: float) -> dict:
    """Its exit status and the tail of its output; killed at the deadline (returncode None, timed_out)."""
    try:
        done = subprocess.run(command, cwd=workspace, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.monotonic()))
        return {"returncode": done.returncode, "log_tail": (done.stdout + done.stderr)[-2000:]}
    except subprocess.TimeoutExpired as err:
        return {"returncode": None, "timed_out": True,
                "log_tail": _text(err.stdout)[-1000:] + _text(err.stderr)[-1000:]}


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _error_line(log: str) -> str | None:
    lines = [line for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [None])[-1]


def model_results(workspace: Path, model: str) -> dict:
    """The headline numbers the train and evaluate stages wrote (results/models/M, results/eval/M)."""
    found = {}
    for key, path, keys in (("train_stats", f"results/models/{model}/train_stats.json", TRAIN_STATS_KEYS),
                            ("metrics", f"results/eval/{model}/metrics.json", METRIC_KEYS)):
        try:
            data = json.loads((workspace / path).read_text())
            found[key] = {k: data[k] for k in keys if k in data}
        except (OSError, ValueError) as err:
            found[key] = {"missing": f"{path}: {type(err).__name__}"}
    return found


def pipeline_step(args, deadline: float) -> dict:
    models = args.models.split(",") if args.models else default_models(args.tiny)
    workspace = Path(tempfile.mkdtemp(prefix="gpu_check_pipeline_"))
    result = {"models": models, "backend": "jax", "epochs": 1, "seeds": [1], "stages": [], "per_model": {}}
    try:
        full = write_params(workspace, pipeline_params(args.tiny, models))
        for stage in ("generate", "fetch", "index"):
            result["stages"].append(run_stage(workspace, stage, full, None, deadline))
            if result["stages"][-1]["returncode"] != 0:
                return finish_pipeline(result, f"{stage} failed: {result['stages'][-1]['error']}")
        for model in models:
            result["per_model"][model] = train_and_evaluate(workspace, full, model, deadline, result["stages"])
    except Exception as err:  # noqa: BLE001 - the step records its failure, the report stands
        return finish_pipeline(result, lt._error_text(err))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    failed = [m for m, r in result["per_model"].items() if r["status"] != "ok"]
    return finish_pipeline(result, f"models failed: {', '.join(failed)}" if failed else None)


def train_and_evaluate(workspace: Path, params: Path, model: str, deadline: float, log: list) -> dict:
    record = {"status": "ok"}
    for stage in ("train", "evaluate"):
        log.append(run_stage(workspace, stage, params, model, deadline))
        record[f"{stage}_seconds"] = log[-1]["seconds"]
        if log[-1]["returncode"] != 0:
            return record | {"status": f"{stage} failed", "error": log[-1]["error"]}
    return record | model_results(workspace, model)


def finish_pipeline(result: dict, failure: str | None) -> dict:
    result["status"] = "ok" if failure is None else "failed"
    if failure:
        result["error"] = failure
    progress(f"pipeline: {result['status']}{': ' + failure if failure else ''}")
    return result


# ---------------------------------------------------------------- outputs

def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot_figure(report: dict, path: Path) -> dict:
    """The ratio LSTM / QRNN over the grid (heat map, and lines per batch) with the paper's points."""
    try:
        import matplotlib
    except ImportError as err:
        return {"skipped": f"matplotlib not importable ({err})"}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, cells = report["settings"]["grid"], report["layer_timing"]["cells"]
    ratios = ratio_table(grid, cells)
    figure, (heat, lines) = plt.subplots(1, 2, figsize=(13, 5))
    draw_heat_map(heat, grid, ratios, figure)
    references = sorted({cell["lstm_reference"] for cell in cells if cell["lstm_reference"]})
    heat.set_title(f"measured: {' | '.join(references) or 'no'} LSTM / best QRNN pooling", fontsize=10)
    draw_lines(lines, grid, ratios)
    figure.suptitle(f"LSTM / QRNN training step, hidden {grid['hidden']} ({report['environment']['device']})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    os.replace(tmp, path)
    return {"path": path.name}


def ratio_table(grid: dict, cells: list[dict]) -> np.ndarray:
    ratios = np.full((len(grid["batch_sizes"]), len(grid["lengths"])), np.nan)
    for cell in cells:
        if cell["ratio"] is not None:
            ratios[grid["batch_sizes"].index(cell["batch"]), grid["lengths"].index(cell["length"])] = cell["ratio"]
    return ratios


def draw_heat_map(axes, grid: dict, ratios: np.ndarray, figure) -> None:
    image = axes.imshow(ratios, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label="LSTM / QRNN")
    axes.set_xticks(range(len(grid["lengths"])), grid["lengths"])
    axes.set_yticks(range(len(grid["batch_sizes"])), grid["batch_sizes"])
    axes.set_ylabel("batch size")
    for (row, column), value in np.ndenumerate(ratios):
        axes.text(column, row, "-" if np.isnan(value) else f"{value:.1f}", ha="center", va="center", color="w")
    outlined = [spec["paper_text"] for spec in PAPER_FIGURE_4 if outline_paper_cells(axes, grid, spec)]
    axes.set_xlabel("sequence length" + (f"\nred outline: the paper's {'; '.join(outlined)}" if outlined else ""))


def outline_paper_cells(axes, grid: dict, spec: dict) -> bool:
    """A red rectangle around the cells of the paper's figure `spec` that the grid holds; whether any."""
    from matplotlib.patches import Rectangle

    lengths = [t for t in (spec["lengths"] or grid["lengths"]) if t in grid["lengths"]]
    if spec["batch"] not in grid["batch_sizes"] or not lengths:
        return False
    row, first = grid["batch_sizes"].index(spec["batch"]), grid["lengths"].index(lengths[0])
    axes.add_patch(Rectangle((first - 0.5, row - 0.5), len(lengths), 1, fill=False, edgecolor="red", linewidth=2))
    return True


def draw_lines(axes, grid: dict, ratios: np.ndarray) -> None:
    for row, batch in enumerate(grid["batch_sizes"]):
        axes.plot(grid["lengths"], ratios[row], marker="o", label=f"batch {batch}")
    for spec in PAPER_FIGURE_4:
        lengths = spec["lengths"] or grid["lengths"]
        axes.plot(lengths, [spec["paper_ratio"]] * len(lengths), "r*" if len(lengths) == 1 else "r--",
                  markersize=12, label=f"paper: {spec['paper_text']}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("sequence length")
    axes.set_ylabel("LSTM / QRNN")
    axes.axhline(1.0, color="gray", linewidth=0.8)
    axes.legend(fontsize=7)
    axes.set_title("per batch size, with the paper's points")


def summary(report: dict) -> dict:
    at_shape = report["layer_timing"]["at_shape"]
    return {"device": report["environment"]["device"], "ratio_at_shape": at_shape["ratio"],
            "best_qrnn_at_shape": at_shape["best_qrnn"], "lstm_reference_at_shape": at_shape["lstm_reference"],
            "paper_targets": {t["name"]: t["status"] for t in report["paper_targets"]},
            "pooling_ok": {name: r.get("ok", False) for name, r in report["pooling_check"]["implementations"].items()},
            "fused_kernel": report["fused_kernel"]["status"], "pipeline": report["pipeline"]["status"]}


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    set_float32_precision(args.tf32)
    config = settings(args)
    report = {"complete": False, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": config,
              "environment": environment()}
    json_path = args.out / "gpu_check.json"

    def write():
        report["seconds"] = time.monotonic() - started
        write_json_atomic(json_path, report)

    env = report["environment"]
    progress(f"{env['device']}; JAX {env['versions']['jax']} ({env['jax_backend']}), Keras {env['versions']['keras']}, "
             f"PyTorch {env['versions']['torch']}; mode {config['mode']}; writing {args.out}")
    write()
    if not args.tiny and env["jax_backend"] != "gpu":
        report["error"] = (f"JAX sees no GPU (backend {env['jax_backend']}, devices {env['jax_devices']}): the paper's "
                           f"grid would take hours on a CPU (the Pallas kernel in interpret mode); --tiny runs there")
        write()
        progress(f"FAILED: {report['error']}")
        return 2
    implementations = pooling_step(report, args, config["shape"])
    write()
    layer_step(report, args, config, implementations, write,
               run_deadline=started + args.total_budget_s - args.pipeline_budget_s)
    report["figure"] = plot_figure(report, args.out / "gpu_check.png")
    write()
    deadline = min(time.monotonic() + args.pipeline_budget_s, started + args.total_budget_s)
    report["pipeline"] = {"status": "skipped (--skip-pipeline)"} if args.skip_pipeline else \
        pipeline_step(args, deadline)
    report["summary"] = summary(report)
    report["complete"] = True
    write()
    progress(f"done in {report['seconds']:.0f} s: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
