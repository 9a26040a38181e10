"""benchmarks/gpu: the one-shot GPU check, in its --tiny CPU mode (every path that needs no GPU),
and its fused Pallas kernel in interpret mode against float64."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tool_env

GPU_DIR = REPO / "benchmarks" / "gpu"
LSTM_VARIANTS = ("keras_jax_scan", "keras_jax_cudnn", "torch_cudnn")


@pytest.fixture(scope="module")
def gpu_check_modules():
    sys.path.insert(0, str(GPU_DIR))
    try:
        import layer_timing
        import pallas_recurrence

        yield layer_timing, pallas_recurrence
    finally:
        sys.path.remove(str(GPU_DIR))


def test_pallas_recurrence_matches_float64(gpu_check_modules):
    import jax
    import jax.numpy as jnp

    layer_timing, pallas_recurrence = gpu_check_modules
    a, b, g = layer_timing.gate_like_inputs(batch=3, steps=13, hidden=48, seed=1)
    expected = layer_timing.bench_module().reference_recurrence(a, b)
    expected_da, expected_db = layer_timing.reference_gradients(a, expected, g)

    states = jax.jit(pallas_recurrence.linear_recurrence_pallas)(a, b)
    gradient = jax.grad(lambda a_, b_: jnp.sum(pallas_recurrence.linear_recurrence_pallas(a_, b_) * g),
                        argnums=(0, 1))
    da, db = jax.jit(gradient)(a, b)

    np.testing.assert_allclose(np.asarray(states), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(da), expected_da, atol=1e-5)
    np.testing.assert_allclose(np.asarray(db), expected_db, atol=1e-5)


def test_hidden_block_divides_hidden(gpu_check_modules):
    _, pallas_recurrence = gpu_check_modules
    for hidden, block in ((16, 16), (320, 64), (1024, 64), (48, 16), (7, 1)):
        assert pallas_recurrence.hidden_block(hidden) == block


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = tool_env() | {"KERAS_BACKEND": "jax", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(GPU_DIR / "run.sh"), "--tiny", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"run.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads((out / "gpu_check.json").read_text()), out, done.stdout


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_report_structure(tiny_run):
    report, _, stdout = tiny_run
    assert report["complete"] is True
    for key in ("settings", "environment", "pooling_check", "fused_kernel", "layer_timing", "paper_targets",
                "figure", "pipeline", "summary"):
        assert key in report, key
    assert report["settings"]["mode"] == "tiny"
    env = report["environment"]
    for package in ("python", "jax", "jaxlib", "keras"):
        assert env["versions"][package], package
    assert env["keras_backend"] == "jax"
    assert env["device"] and env["jax_devices"]
    if not env["torch"]["available"]:
        assert env["torch"]["reason"]
    assert "gpu_check: pooling" in stdout and "gpu_check: grid" in stdout and "gpu_check: done" in stdout


@pytest.mark.slow
def test_layer_timings_finite_and_positive(tiny_run):
    report, _, _ = tiny_run
    layers = report["layer_timing"]
    grid = report["settings"]["grid"]
    cells = [layers["at_shape"], *layers["cells"]]
    assert len(layers["cells"]) + len(layers["skipped_cells"]) == len(grid["batch_sizes"]) * len(grid["lengths"])
    assert layers["cells"], "no grid cell timed"
    for cell in cells:
        variants = cell["variants"]
        qrnn = [name for name in variants if name.startswith("qrnn_")]
        assert {f"qrnn_{name}" for name in report["pooling_check"]["implementations"]} == set(qrnn)
        assert set(LSTM_VARIANTS) <= set(variants)
        for name, timing in variants.items():
            if "skipped" in timing:
                assert name != "keras_jax_scan" and timing["skipped"], name
                continue
            assert "error" not in timing, (name, timing)
            assert all(_finite_positive(t) for t in (timing["median_s"], timing["min_s"], timing["first_call_s"]))
            assert len(timing["times_s"]) == report["settings"]["repeats"]
        assert _finite_positive(cell["ratio"]) and _finite_positive(cell["qrnn_s"]) and _finite_positive(cell["lstm_s"])
        assert cell["lstm_reference"] in LSTM_VARIANTS
    if not report["environment"]["torch"]["available"]:
        assert "skipped" in layers["at_shape"]["variants"]["torch_cudnn"]


@pytest.mark.slow
def test_every_pooling_matches_float64(tiny_run):
    report, _, _ = tiny_run
    check = report["pooling_check"]
    assert {"sequential", "associative", "logcumsum"} <= set(check["implementations"])
    assert report["fused_kernel"]["status"] == "used"
    assert "pallas" in check["implementations"]
    for name, result in check["implementations"].items():
        assert "error" not in result, (name, result)
        assert result["ok"], (name, result)
        assert result["max_abs_error_scaled"] <= min(1e-5, check["tolerance_scaled"])
        assert result["max_abs_grad_error_scaled"] <= min(1e-4, check["tolerance_scaled"])
        assert _finite_positive(result["timing"]["median_s"])


@pytest.mark.slow
def test_paper_targets_recorded(tiny_run):
    report, _, _ = tiny_run
    targets = {t["name"]: t for t in report["paper_targets"]}
    assert len(targets) == 2
    for target in targets.values():
        assert target["status"] in ("pass", "fail", "not measured")
        assert target["paper_ratio"] > 0 and target["rule"]
    # the tiny grid holds neither of the paper's cells
    assert all(t["status"] == "not measured" for t in targets.values())


@pytest.mark.slow
def test_figure_written(tiny_run):
    report, out, _ = tiny_run
    assert report["figure"] == {"path": "gpu_check.png"}
    assert (out / "gpu_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary file left"


@pytest.mark.slow
def test_pipeline_outcome_recorded(tiny_run):
    report, _, _ = tiny_run
    pipeline = report["pipeline"]
    assert pipeline["status"] in ("ok", "failed")
    assert pipeline["status"] == "ok" or pipeline["error"]
    stages = {(s["stage"], s["model"]): s for s in pipeline["stages"]}
    for stage in ("generate", "fetch", "index"):  # TF-free already
        assert stages[(stage, None)]["returncode"] == 0, stages[(stage, None)]
    for model in pipeline["models"]:
        train = stages[("train", model)]
        assert "returncode" in train and train["seconds"] >= 0
        assert model in pipeline["per_model"]


@pytest.mark.slow
def test_pipeline_trains_every_model_on_jax(tiny_run):
    report, _, _ = tiny_run
    pipeline = report["pipeline"]
    assert pipeline["status"] == "ok", pipeline.get("error")
    for model in pipeline["models"]:
        result = pipeline["per_model"][model]
        assert result["status"] == "ok"
        assert result["train_stats"].get("backend") == "jax"
        assert 0 <= result["metrics"]["gap"] <= 1
