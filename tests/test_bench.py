"""The bench stage (yt8m_qrnn.stages.bench) and its part of the report.

The stage's command line runs on a tiny grid (its params from a temporary params file) and
writes well-formed JSON whose ratios are the LSTM time over the QRNN time; the pooling
implementations agree with a float64 recurrence; the targets are judged from the numbers;
the report's "QRNN speed" section renders from fixture JSON, or says how to run the bench.
No test asserts a speed: the targets are checked by the bench's figures, not here.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import REPO, tool_env
from yt8m_qrnn.stages import bench
from yt8m_qrnn.pipeline.params import ParamsError, stage_params, validate_params
from yt8m_qrnn.models.qrnn import LINEAR_RECURRENCES
from yt8m_qrnn.stages.report.build import ReportError, bench_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())
TINY = {"grid": {"hidden": 6, "batch_sizes": [2, 3], "lengths": [4, 7]},
        "shape": {"batch": 2, "frames": 9, "inputs": 5, "hidden": 4},
        "warmup": 0, "repeats": 2,
        "input_pipeline": {"batch_size": 4, "max_files": 1, "repeats": 1, "synthetic_videos": 6}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The stage's command line in an empty folder (no shards: it generates some), tiny params."""
    root = tmp_path_factory.mktemp("bench")
    params = copy.deepcopy(DEFAULT) | {"bench": TINY}
    (root / "tiny.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, str(REPO / "workflow" / "scripts" / "bench.py"), "--params", "tiny.yaml"],
                            cwd=root, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, result.stdout


def load(root, name):
    return json.loads((root / "results" / "bench" / name).read_text())


def test_cli_writes_every_file(tiny_run):
    root, out = tiny_run
    for name in bench.FILES:
        assert (root / "results" / "bench" / name).is_file(), name
    assert (root / "results" / "bench" / "speedup.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in (root / "results" / "bench").iterdir() if p.name.startswith(".")]  # no temporary left
    assert json.loads((root / "results" / "params" / "bench.json").read_text()) == {"bench": TINY}
    for line in ("bench: grid 1/4:", "bench: grid 4/4:", "bench: pooling sequential:", "bench: input pipeline:",
                 "bench: target qrnn_speedup:", "bench: done in"):
        assert line in out, line  # progress while it runs


def test_grid_json_ratios_are_lstm_over_qrnn(tiny_run):
    root, _ = tiny_run
    grid = load(root, "layer_grid.json")
    assert grid["grid"] | {"name": "custom", "inputs": 6} == grid["grid"]
    assert grid["window"] == 2 and grid["pooling"] == "fo" and grid["repeats"] == 2
    cells = grid["cells"]
    assert sorted((c["batch"], c["length"]) for c in cells) == [(2, 4), (2, 7), (3, 4), (3, 7)]
    for cell in cells + [grid["at_shape"]]:
        for key in ("qrnn_s", "lstm_plain_s", "lstm_xla_s"):
            assert np.isfinite(cell[key]) and cell[key] > 0, key
        assert cell["lstm_s"] == min(cell["lstm_plain_s"], cell["lstm_xla_s"])
        assert cell["ratio"] == pytest.approx(cell["lstm_s"] / cell["qrnn_s"], rel=1e-12)
        assert cell["ratio_keras_default"] == pytest.approx(cell["lstm_xla_s"] / cell["qrnn_s"], rel=1e-12)
        for name, timed in cell["timings"].items():
            assert len(timed["times_s"]) == 2 and timed["median_s"] == pytest.approx(np.median(timed["times_s"]))
            assert timed["median_s"] == cell[f"{name}_s"]
    at = grid["at_shape"]
    assert (at["batch"], at["length"], at["inputs"], at["hidden"]) == (2, 9, 5, 4)
    for cell in cells + [at]:
        assert len(cell["load_average"]["before"]) == len(cell["load_average"]["after"]) == 3


def test_pooling_json_parts_and_agreement(tiny_run):
    root, _ = tiny_run
    pooling = load(root, "pooling.json")
    assert set(pooling["implementations"]) == set(LINEAR_RECURRENCES)
    used = pooling["implementations"][pooling["layer_pool_impl"]]
    assert pooling["pooling_s"] == used["median_s"]
    assert pooling["pooling_share"] == pytest.approx(used["median_s"] / pooling["layer_s"])
    assert pooling["convolution_share"] == pytest.approx(pooling["convolution_s"] / pooling["layer_s"])
    assert pooling["pooling_share_cpu"] == pytest.approx(
        used["timings"]["cpu_median_s"] / pooling["timings"]["layer"]["cpu_median_s"])
    for name, impl in pooling["implementations"].items():
        assert impl["max_abs_error"] < 1e-5, name  # every implementation solves the same recurrence
        assert impl["share_of_layer"] == pytest.approx(impl["median_s"] / pooling["layer_s"])


def test_input_pipeline_json(tiny_run):
    root, _ = tiny_run
    pipeline = load(root, "input_pipeline.json")
    assert list(pipeline["runs"]) == [pipeline["target_run"]]  # no resources/yt8m in the folder: generated only
    run = pipeline["runs"][pipeline["target_run"]]
    assert run["source"].startswith("generated")
    assert run["videos"] == 6 and len(run["files"]) == 1 and run["bytes"] > 0
    assert bench.SYNTHETIC["min_frames"] <= run["mean_frames"] <= bench.SYNTHETIC["max_frames"]
    for name in ("raw", "batches_only", "pipeline"):
        part = run[name]
        assert part["videos_per_s"] == pytest.approx(6 / part["seconds"])
        assert part["mb_per_s"] == pytest.approx(run["bytes"] / 1e6 / part["seconds"])
    assert run["share_of_raw"] == pytest.approx(run["pipeline"]["mb_per_s"] / run["raw"]["mb_per_s"])


def test_summary_json(tiny_run):
    root, _ = tiny_run
    summary = load(root, "summary.json")
    env = summary["environment"]
    for key in ("device", "backend", "cpu_count", "load_average_start", "load_average_end"):
        assert env[key] not in (None, ""), key
    assert set(env["versions"]) >= {"python", "numpy", "tensorflow", "keras"}
    assert env["backend"] == "tensorflow" and len(env["load_average_start"]) == 3
    assert summary["params"] == TINY
    assert [t["name"] for t in summary["targets"]] == list(bench.TARGETS)
    statuses = {t["name"]: t["status"] for t in summary["targets"]}
    assert statuses["qrnn_speedup"] == statuses["pooling_share"] == "not evaluated"  # not the YouTube-8M shape
    assert statuses["input_pipeline_share"] in ("met", "not met")


def test_report_section_renders_from_the_run(tiny_run):
    root, _ = tiny_run
    text = "\n".join(bench_section(root / "results"))
    assert "## 6. QRNN speed" in text and "![QRNN vs LSTM speed](bench/speedup.png)" in text
    assert "| batch \\ length | 4 | 7 |" in text
    assert "| the stream's batches built one after another" in text and "| training stream" in text


@pytest.mark.parametrize("recurrence", list(LINEAR_RECURRENCES))
def test_pooling_implementations_agree_with_float64(recurrence):
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=(3, 37, 5)), rng.normal(size=(3, 37, 5))
    expected = bench.reference_recurrence(a, b)
    states = np.asarray(LINEAR_RECURRENCES[recurrence](a.astype("float32"), b.astype("float32")))
    np.testing.assert_allclose(states, expected, atol=1e-5)


@pytest.mark.parametrize("recurrence", list(LINEAR_RECURRENCES))
def test_pooling_gradients_agree_with_float64(recurrence):
    """The bench times forward + gradient: each implementation's gradient (the sequential scan's
    is its adjoint scan, the others automatic) against the float64 adjoint."""
    import tensorflow as tf

    rng = np.random.default_rng(5)
    a, b, w = rng.uniform(size=(2, 23, 3)), rng.normal(size=(2, 23, 3)), rng.normal(size=(2, 23, 3))
    states = bench.reference_recurrence(a, b)
    adjoint = np.zeros_like(b)
    carried = np.zeros_like(b[:, 0])
    for t in reversed(range(b.shape[1])):
        carried = w[:, t] + (a[:, t + 1] * carried if t + 1 < b.shape[1] else 0.0)
        adjoint[:, t] = carried
    previous = np.concatenate([np.zeros_like(states[:, :1]), states[:, :-1]], axis=1)
    a32, b32 = tf.constant(a, tf.float32), tf.constant(b, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([a32, b32])
        loss = tf.reduce_sum(w.astype("float32") * LINEAR_RECURRENCES[recurrence](a32, b32))
    grad_a, grad_b = tape.gradient(loss, [a32, b32])
    np.testing.assert_allclose(grad_b, adjoint, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(grad_a, adjoint * previous, atol=1e-4, rtol=1e-3)  # logcumsum: float32 logs


# ---------------------------------------------------------------- targets and the report, from fixtures

def fixture_results(ratio=1.6, pooling_share=0.1, pipeline_share=0.7, shape="yt8m", device="CPU") -> dict:
    """What the bench writes, with chosen headline numbers (times in seconds)."""
    shape_spec = bench.resolve_shape(shape)
    grid_spec = bench.resolve_grid("paper")
    timings = {"median_s": 1.0, "min_s": 1.0, "times_s": [1.0], "cpu_median_s": 2.0, "first_call_s": 3.0}

    def cell(batch, length, inputs, hidden, qrnn_s, cell_ratio):
        lstm = qrnn_s * cell_ratio
        return {"batch": batch, "length": length, "inputs": inputs, "hidden": hidden, "qrnn_s": qrnn_s,
                "lstm_plain_s": lstm, "lstm_xla_s": 2 * lstm, "lstm_s": lstm, "lstm_compile": "plain",
                "ratio": cell_ratio, "ratio_keras_default": 2 * cell_ratio, "ratio_cpu_time": cell_ratio,
                "timings": {"qrnn": timings, "lstm_plain": timings, "lstm_xla": timings}}

    layers = {"grid": grid_spec, "shape": shape_spec, "window": 2, "pooling": "fo", "warmup": 1, "repeats": 5,
              "cells": [cell(b, t, 320, 320, 1e-3 * b * t / 256, 1.0 + b / 100 + t / 1000)
                        for b in grid_spec["batch_sizes"] for t in grid_spec["lengths"]],
              "at_shape": cell(shape_spec["batch"], shape_spec["frames"], shape_spec["inputs"], shape_spec["hidden"],
                               5.0, ratio)}
    layer_s = 5.0
    implementations = {name: {"median_s": layer_s * share, "share_of_layer": share, "max_abs_error": 1e-7,
                              "max_abs_error_scaled": 1e-7, "timings": timings}
                       for name, share in (("sequential", pooling_share), ("associative", 0.6), ("logcumsum", 2.4))}
    pooling = {"shape": shape_spec, "layer_pool_impl": "sequential", "layer_s": layer_s, "convolution_s": 4.0,
               "pooling_s": layer_s * pooling_share, "pooling_share": pooling_share, "convolution_share": 0.8,
               "other_share": 0.2 - pooling_share, "implementations": implementations}
    raw_rate = 100.0
    def run(share, source, mean_frames):
        rates = {"seconds": 2.65, "videos_per_s": 377.4, "mb_per_s": raw_rate, "frames_per_s": 86_792.5}
        return {"source": source, "files": ["2/frame/train/a.tfrecord"], "version": 2, "videos": 1000,
                "frames": 1000 * mean_frames, "max_frames": 300, "mean_frames": mean_frames, "bytes": 265_000_000,
                "epochs": 5, "batch_size": 128, "repeats": 3, "raw": rates,
                "batches_only": {k: v * 1.2 for k, v in rates.items()},
                "pipeline": {"seconds": 2.65 / share, "videos_per_s": 377.4 * share, "mb_per_s": raw_rate * share,
                             "frames_per_s": 86_792.5 * share, "first_batch_s": 0.02},
                "share_of_raw": share}

    pipeline = {"target_run": "youtube8m_lengths",  # as written: keys sorted
                "runs": {"pipeline_shards": run(0.33, "resources/yt8m (the pipeline's frame-level shards)", 30),
                         "youtube8m_lengths": run(pipeline_share, "generated (YouTube-8M's lengths)", 225)}}
    env = {"device": "CPU: Test CPU" if device == "CPU" else "GPU: Test GPU", "device_kind": device,
           "gpus": [] if device == "CPU" else ["Test GPU"], "cpu": "Test CPU", "backend": "tensorflow",
           "versions": {"python": "3.11.0", "numpy": "2.0", "tensorflow": "2.21.0", "keras": "3.15.0"},
           "cpu_count": 2, "cpus_usable": 2, "load_average_start": [0.5, 0.6, 0.7], "load_average_end": [1.0, 0.8, 0.7],
           "started": "2026-01-01 00:00:00 UTC"}
    cfg = {"grid": "paper", "shape": shape, "warmup": 1, "repeats": 5,
           "input_pipeline": {"batch_size": 128, "max_files": 2, "repeats": 3}}
    summary = bench.summarize(cfg, env, layers, pooling, pipeline, seconds=754.0)
    return {"layer_grid.json": layers, "pooling.json": pooling, "input_pipeline.json": pipeline,
            "summary.json": summary}


def write_fixture(results, **numbers):
    folder = results / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in fixture_results(**numbers).items():
        (folder / name).write_text(json.dumps(payload, indent=1))
    return folder


def statuses(summary):
    return {t["name"]: t["status"] for t in summary["targets"]}


def test_targets_are_judged_from_the_measured_numbers():
    met = fixture_results(ratio=1.6, pooling_share=0.1, pipeline_share=0.7)["summary.json"]
    assert statuses(met) == {"qrnn_speedup": "met", "pooling_share": "met", "input_pipeline_share": "met"}
    missed = fixture_results(ratio=1.4, pooling_share=0.2, pipeline_share=0.5)["summary.json"]
    assert statuses(missed) == {"qrnn_speedup": "not met", "pooling_share": "not met",
                                "input_pipeline_share": "not met"}
    edge = fixture_results(ratio=1.5, pooling_share=0.15, pipeline_share=0.6)["summary.json"]
    assert set(statuses(edge).values()) == {"met"}
    small = fixture_results(shape="small")["summary.json"]
    assert statuses(small) == {"qrnn_speedup": "not evaluated", "pooling_share": "not evaluated",
                               "input_pipeline_share": "met"}
    gpu = fixture_results(device="GPU")["summary.json"]
    assert statuses(gpu)["qrnn_speedup"] == "not evaluated" and statuses(gpu)["pooling_share"] == "met"


def test_report_section_from_fixture_json(tmp_path):
    results = tmp_path / "results"
    write_fixture(results, ratio=1.62, pooling_share=0.094, pipeline_share=0.45)
    (results / "bench" / "speedup.png").write_bytes(PNG_MAGIC)
    text = "\n".join(bench_section(results))
    assert text.startswith("## 6. QRNN speed")
    assert "**CPU: Test CPU**" in text and "no GPU visible to TensorFlow" in text
    assert "at the start 0.50 / 0.60 / 0.70" in text
    targets = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| QRNN layer step")
               or line.startswith("| pooling at most") or line.startswith("| input pipeline at least")}
    assert len(targets) == 3
    assert "1.62x" in targets[bench.TARGETS["qrnn_speedup"]["text"]] and \
        targets[bench.TARGETS["qrnn_speedup"]["text"]].rstrip().endswith("| met |")
    assert "9.4%" in targets[bench.TARGETS["pooling_share"]["text"]] and \
        targets[bench.TARGETS["pooling_share"]["text"]].rstrip().endswith("| met |")
    assert "45%" in targets[bench.TARGETS["input_pipeline_share"]["text"]] and \
        targets[bench.TARGETS["input_pipeline_share"]["text"]].rstrip().endswith("| not met |")
    # the input pipeline: one table per set of shards, the target's first
    assert text.index("Where the target is checked: 1,000 videos (225,000 frames, 225 per video") < \
        text.index("The training stream reaches 45% of the raw read rate") < \
        text.index("1,000 videos (30,000 frames, 30 per video") < text.index("The training stream reaches 33%")
    # the grid: a row per batch size, a column per length, each cell the ratio
    assert "| batch \\ length | 32 | 64 | 128 | 256 | 512 |" in text
    assert "| 8 | 1.11x | 1.14x | 1.21x | 1.34x | 1.59x |" in text
    assert "| 256 | 3.59x | 3.62x | 3.69x | 3.82x | 4.07x |" in text
    assert "LSTM / QRNN 1.62x" in text and "pooling alone: sequential (the layer's) | 470.0 ms | 9.4%" in text
    assert "| training stream" in text and "| 45.0 |" in text  # MB/s of the training stream
    assert "![QRNN vs LSTM speed](bench/speedup.png)" in text


def test_report_section_without_xla_at_the_shape(tmp_path):
    """bench.lstm_xla: grid leaves XLA out at the shape: the ratio is against the tf.function LSTM."""
    folder = write_fixture(tmp_path / "results", ratio=1.55)
    grid = json.loads((folder / "layer_grid.json").read_text())
    grid["at_shape"] |= {"lstm_xla_s": None, "ratio_keras_default": None}
    (folder / "layer_grid.json").write_text(json.dumps(grid))
    text = "\n".join(bench_section(tmp_path / "results"))
    assert "| LSTM, XLA (how Keras compiles a model of LSTMs) | not timed here (bench.lstm_xla) | n/a |" in text
    assert "LSTM / QRNN 1.55x" in text


def test_report_section_without_the_bench(tmp_path):
    text = "\n".join(bench_section(tmp_path / "results"))
    assert "## 6. QRNN speed" in text and "The bench has not been run" in text
    assert "dvc repro bench" in text and "bench.grid: paper" in text


def test_report_section_names_a_malformed_file(tmp_path):
    folder = write_fixture(tmp_path / "results")
    grid = json.loads((folder / "layer_grid.json").read_text())
    del grid["at_shape"]
    (folder / "layer_grid.json").write_text(json.dumps(grid))
    with pytest.raises(ReportError, match="malformed bench results"):
        bench_section(tmp_path / "results")
    (folder / "pooling.json").unlink()
    with pytest.raises(ReportError, match="pooling.json: not found"):
        bench_section(tmp_path / "results")


def test_the_whole_report_has_the_section(tmp_path):
    from test_report import DEFAULT_MODELS, make_report, write_fake_results

    from yt8m_qrnn.stages.report.build import build_report

    assert "The bench has not been run" in make_report(tmp_path / "without")
    results = write_fake_results(tmp_path / "with")
    write_fixture(results, ratio=1.7)
    text = build_report(list(DEFAULT_MODELS), {"per_class_min_positives": 1}, results, repo=tmp_path / "with")
    assert "## 5. Provenance" in text and text.index("## 5. Provenance") < text.index("## 6. QRNN speed")
    assert "LSTM / QRNN 1.70x" in text
    assert "| `results/bench` |" in text  # among the report's hashed inputs


# ---------------------------------------------------------------- params

def test_the_stage_reads_only_its_section():
    assert stage_params(DEFAULT, "bench") == {"bench": DEFAULT["bench"]}
    assert bench.resolve_grid(DEFAULT["bench"]["grid"])["name"] == DEFAULT["bench"]["grid"]


def test_paper_params_select_the_full_bench():
    paper = yaml.safe_load((REPO / "config" / "params.paper.yaml").read_text())
    validate_params(paper)
    assert paper["bench"]["grid"] == "paper" and paper["bench"]["shape"] == "yt8m"
    assert bench.resolve_grid("paper") | {"name": "paper"} == {
        "name": "paper", "hidden": 320, "inputs": 320, "batch_sizes": [8, 16, 32, 64, 128, 256],
        "lengths": [32, 64, 128, 256, 512]}
    assert bench.resolve_shape("yt8m") == {"name": "yt8m", "batch": 128, "frames": 300, "inputs": 1152, "hidden": 1024}


@pytest.mark.parametrize("key, value, expected", [
    ("grid", "huge", "bench.grid: 'huge' is not paper, small, or a mapping"),
    ("shape", {"batch": 2}, "bench.shape: {'batch': 2} is not yt8m, small, or a mapping"),
    ("repeats", 0, "bench.repeats: 0 is less than the minimum of 1"),
    ("colour", 1, "unknown key 'bench.colour'"),
])
def test_bad_bench_params_are_named(key, value, expected):
    params = copy.deepcopy(DEFAULT)
    params["bench"][key] = value
    with pytest.raises(ParamsError) as err:
        validate_params(params)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_index_benchmark_writes_its_figures(tmp_path):
    """benchmarks/bench_index.py on generated frame-level shards, one repeat: well-formed figures."""
    out = tmp_path / "index.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_index.py"), "--generated", "--level", "frame",
                    "--repeat", "1", "--out", str(out)], check=True, env=tool_env(), capture_output=True)
    result = json.loads(out.read_text())
    assert result["files"] == 4 and result["records"] == 400 and result["bytes"] > 0
    for key in ("raw_read", "index", "index_serial"):
        assert result[key]["best_mb_s"] > 0 and len(result[key]["seconds"]) == 1
    assert result["index_over_raw_best"] == result["index"]["best_mb_s"] / result["raw_read"]["best_mb_s"]
    assert result["first_call_seconds"] > 0
