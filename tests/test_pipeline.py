"""The whole DAG, end to end, under both orchestrators, on a tiny generated dataset.

Checks that each orchestrator builds every output from scratch, that afterwards the
other has nothing to redo, and that editing one model's hyperparameter reruns exactly
that model's train and evaluate and the report, under either.
"""
import json
import re

import pytest
import yaml

from tiny_pipeline import copy_repo  # noqa: F401 (test_dag_agreement and test_faults import it from here)
from tiny_pipeline import copy_workspace, run, tiny_params, tiny_workspace

pytestmark = pytest.mark.slow


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


@pytest.fixture
def built(tiny_build, tmp_path):
    """This test's own copy of the session's tiny build: every output built, both orchestrators up to date."""
    return copy_workspace(tiny_build.root, tmp_path / "built")


def test_snakemake_builds_everything_then_dvc_has_nothing_to_do(tiny_build):
    workspace, out = tiny_build.root, tiny_build.log  # the session's build from scratch; only read here
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


def test_dvc_builds_everything_then_snakemake_has_nothing_to_do(tmp_path):
    workspace = tiny_workspace(tmp_path)
    params = tiny_params()
    params["train"]["seeds"] = [1]  # one seed: the build is what is tested here (tiny_build has two)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "--force"], workspace)
    models = tiny_params()["run_models"]
    assert dvc_ran(out) == sorted(["generate", "fetch", "index", "bench", "report"]
                                  + [f"{s}@{m}" for s in ("train", "evaluate") for m in models])
    assert (workspace / "results" / "report.md").exists()
    assert snakemake_pending(workspace) == {}
