"""Snakemake and DVC drive the same DAG: stages, inputs, outputs, params, commands."""
import re
import subprocess

import pytest
import yaml

from conftest import REPO, tool_env
from yt8m_qrnn.config import params_stamp_path, stage_keys

LOG_REDIRECT = re.compile(r"\s*>\s*\S+\s+2>&1\s*$")


def snakemake_jobs() -> dict[str, dict]:
    out = subprocess.run(["snakemake", "-n", "--forceall", "-p"], cwd=REPO, env=tool_env(), capture_output=True,
                         text=True, check=True).stdout
    jobs = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", out):
        rule = re.search(r"^(?:local)?rule (\w+):$", block, re.M)
        if not rule or rule.group(1) == "all":
            continue
        rule = rule.group(1)
        fields = dict(re.findall(r"^\s{4}(\w+): (.*)$", block, re.M))
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        shell = shell.group(1) if shell else ""
        wildcards = dict(w.split("=") for w in fields.get("wildcards", "").split(", ") if w)
        name = rule + (f"@{wildcards['model']}" if "model" in wildcards else "")
        jobs[name] = {
            "inputs": set(fields.get("input", "").split(", ")) - {""},
            "outputs": set(fields["output"].split(", ")),
            "cmd": LOG_REDIRECT.sub("", shell.strip()),
            "model": wildcards.get("model"),
            "stage": rule,
        }
    return jobs


def dvc_stages() -> dict[str, dict]:
    from dvc.repo import Repo

    stages = {}
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            params = [key for dep in stage.deps if hasattr(dep, "params") for key in dep.params]
            stages[stage.addressing] = {
                "deps": {dep.def_path for dep in stage.deps if not hasattr(dep, "params")},
                "outs": {out.def_path for out in stage.outs},
                "params": params,
                "cmd": stage.cmd,
            }
    return stages


@pytest.fixture(scope="module")
def both():
    return snakemake_jobs(), dvc_stages()


def test_same_stages(both):
    snake, dvc = both
    assert set(snake) == set(dvc)
    models = yaml.safe_load((REPO / "params.yaml").read_text())["run_models"]
    assert {f"train@{m}" for m in models} <= set(dvc)


def test_same_outputs(both):
    snake, dvc = both
    for name, job in snake.items():
        assert job["outputs"] == dvc[name]["outs"], name


def test_same_inputs(both):
    snake, dvc = both
    for name, job in snake.items():
        stamp = str(params_stamp_path(job["stage"], job["model"]))
        assert stamp in job["inputs"], f"{name}: the params stamp is not an input"
        # DVC names a folder where Snakemake lists the files of several jobs inside it
        folders = [d for d in dvc[name]["deps"] if d not in job["inputs"]]
        folded = {next((d for d in folders if p.startswith(d + "/")), p) for p in job["inputs"] - {stamp}}
        assert folded == dvc[name]["deps"], name


def test_same_params_keys(both):
    snake, dvc = both
    for name, job in snake.items():
        assert dvc[name]["params"] == stage_keys(job["stage"], job["model"]), name


def test_same_commands(both):
    snake, dvc = both
    for name, job in snake.items():
        assert job["cmd"] == dvc[name]["cmd"], name


def test_every_rule_has_log_conda_benchmark():
    text = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    rules = re.findall(r"^rule (\w+):\n((?:    .*\n|\n)*)", text, re.M)
    assert len(rules) >= 6
    for name, body in rules:
        for directive in ("log:", "conda:", "benchmark:", "input:", "output:"):
            assert f"    {directive}" in body, f"rule {name} lacks {directive}"


def test_snakemake_lint():
    result = subprocess.run(["snakemake", "--lint"], cwd=REPO, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
