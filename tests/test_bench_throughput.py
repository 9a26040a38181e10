"""benchmarks/bench_throughput.py: its FLOP count against hand counts, and its --quick run's JSON
(structure, every installed backend measured, values positive and finite). No timing is asserted."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import keras
import pytest

from conftest import REPO, tool_env
from yt8m_qrnn.models.starter import build_model

SCRIPT = REPO / "benchmarks" / "bench_throughput.py"
_spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

MODELS = ("logistic", "moe", "qrnn")
D = 1152  # the video / frame feature width


@pytest.mark.parametrize("name, cfg, frames, input_macs, inner_macs", [
    ("logistic", {"kind": "logistic", "level": "video"}, 1, D * 5, 0),
    # MoE, 2 mixtures: gates D x 5*3 (no bias) + experts D x 5*2, both on the input
    ("moe", {"kind": "moe", "level": "video", "num_mixtures": 2}, 1, D * 15 + D * 10, 0),
    # 6 frames x (window 3 * inputs) x (3 fo gates * 4 units) per layer, then the MoE head on 4 units
    ("qrnn", {"kind": "qrnn", "level": "frame", "hidden": 4, "layers": 2, "window": 3, "pooling": "fo",
              "num_mixtures": 2}, 6, 6 * (3 * D) * 12, 6 * (3 * 4) * 12 + 4 * 15 + 4 * 10),
])
def test_flop_count_equals_the_hand_count(name, cfg, frames, input_macs, inner_macs):
    """Forward, weight gradient and (inside the model only) input gradient: 2 FLOPs per multiply-add each."""
    model = build_model(name, cfg, 5)
    assert bench.training_flops_per_example(bench.matmuls(model, frames)) == 4 * input_macs + 6 * inner_macs


def test_a_layer_with_weights_that_is_not_counted_is_an_error():
    inputs = keras.Input((D,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    with pytest.raises(TypeError, match="no FLOP count"):
        bench.matmuls(model, 1)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], env=tool_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "ratio" in result.stdout  # the table
    return json.loads(out.read_text())


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_every_backend_and_model(quick_report):
    report = quick_report
    assert report["mode"] == "quick"
    assert report["machine"]["cpu_model"] and report["machine"]["cores"] >= 1
    assert report["versions"]["keras"] == keras.__version__
    assert set(report["backends"]) == set(bench.BACKENDS)
    for backend, package in bench.BACKENDS.items():
        measured = report["backends"][backend]
        if importlib.util.find_spec(package) is None:
            assert measured == {"skipped": f"{package} is not installed"}
            continue
        assert report["versions"][package], (backend, report["versions"])
        assert set(measured["models"]) == set(MODELS), backend
        for name, r in measured["models"].items():
            for key in ("flops_per_example", "examples_per_second", "matmul_flops_per_second", "ratio"):
                assert positive_finite(r[key]), (backend, name, key, r[key])
            assert len(r["step_seconds"]) == len(r["matmul_seconds"]) == bench.QUICK["repeats"]
            assert r["flops_per_example"] == bench.training_flops_per_example(r["matmuls"])
            assert r["ratio"] == pytest.approx(
                r["flops_per_example"] * r["examples_per_second"] / r["matmul_flops_per_second"])


def test_quick_run_counts_the_hand_counted_logistic_layer(quick_report):
    classes = bench.QUICK["classes"]
    for backend, measured in quick_report["backends"].items():
        if "models" in measured:
            logistic = measured["models"]["logistic"]
            assert logistic["flops_per_example"] == 4 * D * classes, backend
            assert logistic["matmul_shape"] == [bench.QUICK["batch"], D, classes], backend
