"""The whole DAG, end to end, under both orchestrators, on a tiny generated dataset.

Checks that each orchestrator builds every output from scratch, that afterwards the
other has nothing to redo, and that editing one model's hyperparameter reruns exactly
that model's train and evaluate and the report, under either.
"""
import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, tool_env

pytestmark = pytest.mark.slow

TINY_FRAME = {"learning_rate": 0.01, "batch_size": 16, "epochs": 2}
TINY_VIDEO = {"learning_rate": 0.01, "batch_size": 16, "epochs": 2}
TINY_BENCH = {"grid": {"hidden": 8, "batch_sizes": [4], "lengths": [8]},
              "shape": {"batch": 4, "frames": 9, "inputs": 16, "hidden": 8}, "warmup": 0, "repeats": 1,
              "input_pipeline": {"batch_size": 16, "max_files": 1, "repeats": 1}}


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(min_frames=5, max_frames=9, splits={"train": [2, 40], "validate": [1, 40], "test": [1, 8]})
    for name, model in params["models"].items():
        model.update(TINY_FRAME if model["level"] == "frame" else TINY_VIDEO)
        for size_key in ("cells", "hidden"):
            if size_key in model:
                model[size_key] = 8
    params["bench"] = TINY_BENCH
    params["train"]["seeds"] = [1, 2]  # two: the seed intervals and ensembles run, at two thirds of the cost
    params["report"]["bootstrap_resamples"] = 100  # the schema's least: the intervals are computed, quickly
    return params


def copy_repo(dest):
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file() and not rel.startswith(("results/", "resources/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)


def run(cmd, cwd, check=True):
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def snakemake_pending(cwd) -> dict[str, int]:
    out = run(["snakemake", "-n"], cwd)
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.M) if name != "all"}


def snakemake_ran(out: str) -> list[str]:
    names = []
    for block in re.split(r"^(?=(?:local)?(?:rule|checkpoint) \w+:)", out, flags=re.M)[1:]:
        rule = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block).group(1)
        wildcards = re.search(r"^\s+wildcards: model=(\w+)", block, re.M)
        if rule != "all":
            names.append(f"{rule}@{wildcards.group(1)}" if wildcards else rule)
    return sorted(names)


def dvc_ran(out: str) -> list[str]:
    return sorted(re.findall(r"Running stage '([^']+)'", out))


def hidden(cwd) -> int:
    return yaml.safe_load((cwd / "params.yaml").read_text())["models"]["qrnn"]["hidden"]


def set_hidden(cwd, size: int):
    params = yaml.safe_load((cwd / "params.yaml").read_text())
    params["models"]["qrnn"]["hidden"] = size
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    copy_repo(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        run(cmd, root)
    return root


def clean(workspace):
    """Every output, download and record of both orchestrators removed (the committed dvc.lock kept)."""
    for folder in ("results", "resources", ".snakemake", "logs"):
        shutil.rmtree(workspace / folder, ignore_errors=True)


@pytest.fixture
def built(workspace):
    """The workspace with every output built and both orchestrators up to date: built here when
    no test before built it (a test run alone, or in another order)."""
    if not (workspace / "results" / "report.md").exists() or snakemake_pending(workspace):
        run(["snakemake", "--cores", "2"], workspace)
    return workspace


def test_snakemake_builds_everything_then_dvc_has_nothing_to_do(workspace):
    clean(workspace)
    out = run(["snakemake", "--cores", "2"], workspace)
    models = tiny_params()["run_models"]
    ran = snakemake_ran(out)
    shard_jobs = ran.count("fetch_shard")  # Snakemake fans the fetch out, one job per shard
    assert [name for name in ran if name != "fetch_shard"] == sorted(
        ["generate", "fetch_plan", "fetch", "index", "bench", "report"]
        + [f"{s}@{m}" for s in ("train", "evaluate") for m in models])
    manifest = json.loads((workspace / "results" / "data" / "manifest.json").read_text())
    assert shard_jobs == len(manifest["files"]) > 1
    report = (workspace / "results" / "report.md").read_text()
    assert "Table 1" in report and "Table 2" in report and "Generated data" in report
    for model in models:
        assert f"{model} (this run" in report
        metrics = json.loads((workspace / "results" / "eval" / model / "metrics.json").read_text())
        assert 0.0 <= metrics["gap"] <= 1.0 and metrics["num_videos"] > 0
    assert "up to date" in run(["dvc", "status"], workspace)
    assert snakemake_pending(workspace) == {}


def test_dvc_reruns_only_the_edited_model_then_snakemake_agrees(built):
    workspace = built
    set_hidden(workspace, hidden(workspace) + 1)
    out = run(["dvc", "repro"], workspace)
    assert dvc_ran(out) == ["evaluate@qrnn", "report", "train@qrnn"]
    assert snakemake_pending(workspace) == {}
    assert "up to date" in run(["dvc", "status"], workspace)


def test_snakemake_reruns_only_the_edited_model_then_dvc_agrees(built):
    workspace = built
    set_hidden(workspace, hidden(workspace) + 1)
    assert snakemake_pending(workspace) == {"train": 1, "evaluate": 1, "report": 1}
    out = run(["snakemake", "--cores", "2"], workspace)
    assert snakemake_ran(out) == ["evaluate@qrnn", "report", "train@qrnn"]
    assert "up to date" in run(["dvc", "status"], workspace)
    assert "Data and pipelines are up to date" in run(["dvc", "repro", "--dry"], workspace) or \
        dvc_ran(run(["dvc", "repro", "--dry"], workspace)) == []


def test_dvc_builds_everything_then_snakemake_has_nothing_to_do(workspace):
    clean(workspace)
    out = run(["dvc", "repro", "--force"], workspace)
    models = tiny_params()["run_models"]
    assert dvc_ran(out) == sorted(["generate", "fetch", "index", "bench", "report"]
                                  + [f"{s}@{m}" for s in ("train", "evaluate") for m in models])
    assert (workspace / "results" / "report.md").exists()
    assert snakemake_pending(workspace) == {}
