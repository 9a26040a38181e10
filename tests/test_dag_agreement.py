"""Snakemake and DVC drive the DAG declared in yt8m_qrnn.pipeline.dag: stages, inputs, outputs,
params, code, commands."""
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, tool_env
from yt8m_qrnn.pipeline import dag
from yt8m_qrnn.pipeline.params import params_stamp_path, stage_keys

LOG_REDIRECT = re.compile(r"\s*>\s*\S+\s+2>&1\s*$")
JOB_HEADER = re.compile(r"\n(?=\[[^\]]+\]\n(?:local)?(?:rule|checkpoint) )")

# Snakemake-only helper rules, and the DVC stage they are part of. DVC runs the fetch as one
# stage: workflow/scripts/fetch.py plans, verifies or downloads every shard and publishes.
# Snakemake splits it so that a cluster downloads the shards in parallel: the checkpoint
# fetch_plan (which shards the params select) and one fetch_shard job per shard run the same
# code (src/yt8m_qrnn/stages/fetch/sources.py), and the fetch rule gathers. So their inputs must be inputs
# of DVC's fetch stage; their outputs (the plan and the per-shard records in resources/store)
# are bookkeeping that DVC's fetch writes too but does not declare, and their command is
# the fan-out's own script, which DVC never runs (an input of theirs only).
FOLDED_INTO = {"fetch_plan": "fetch", "fetch_shard": "fetch"}
FANOUT_SCRIPT = "workflow/scripts/fetch_shard.py"
TBD = "<TBD>"  # a dry run's placeholder for inputs known only after a checkpoint ran


def snakemake_jobs(args=("--forceall",), cwd=REPO) -> dict[str, dict]:
    out = subprocess.run(["snakemake", "-n", "-p", *args], cwd=cwd, env=tool_env(), capture_output=True,
                         text=True, check=True).stdout
    jobs = {}
    for block in JOB_HEADER.split(out):
        rule = re.search(r"^(?:local)?(?:rule|checkpoint) (\w+):$", block, re.M)
        if not rule or rule.group(1) == "all":
            continue
        rule = rule.group(1)
        fields = dict(re.findall(r"^\s{4}(\w+): (.*)$", block, re.M))
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        shell = shell.group(1) if shell else ""
        wildcards = dict(w.split("=") for w in fields.get("wildcards", "").split(", ") if w)
        item = wildcards.get("model") or wildcards.get("shard")
        name = rule + (f"@{item}" if item else "")
        jobs[name] = {
            "inputs": set(fields.get("input", "").split(", ")) - {"", TBD},
            "outputs": set(fields["output"].split(", ")),
            "cmd": LOG_REDIRECT.sub("", shell.strip()),
            "model": wildcards.get("model"),
            "stage": rule,
        }
    return jobs


def fold_helpers(jobs: dict[str, dict]) -> dict[str, dict]:
    """The jobs as DVC stages: each helper job's inputs (its script aside) joined to its stage's,
    less the helpers' outputs."""
    helpers = {name: job for name, job in jobs.items() if job["stage"] in FOLDED_INTO}
    folded = {name: dict(job) for name, job in jobs.items() if name not in helpers}
    made_by_helpers = set().union(*(job["outputs"] for job in helpers.values()))
    for job in helpers.values():
        target = folded[FOLDED_INTO[job["stage"]]]
        target["inputs"] = target["inputs"] | (job["inputs"] - {FANOUT_SCRIPT})
    for job in folded.values():
        job["inputs"] = job["inputs"] - made_by_helpers
    return folded


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
def fanned_out(tmp_path_factory) -> dict[str, dict]:
    """The fan-out jobs, which a dry run lists only once the checkpoint has run: a copy of the
    repository with a small generated dataset, generate and fetch_plan run for real, then a
    dry run that reruns everything from fetch_shard on."""
    from test_pipeline import copy_repo, tiny_params

    root = tmp_path_factory.mktemp("fanout")
    copy_repo(root)
    params = tiny_params()
    params["generate"]["splits"] = {"train": [2, 4], "validate": [1, 4], "test": [1, 4]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["snakemake", "--cores", "1", "resources/store/plan.json"], cwd=root, env=tool_env(),
                   capture_output=True, text=True, check=True)
    jobs = snakemake_jobs(["--forcerun", "fetch_shard"], cwd=root)
    shutil.rmtree(root, ignore_errors=True)
    return jobs


@pytest.fixture(scope="module")
def both(fanned_out):
    jobs = snakemake_jobs()
    jobs |= {name: job for name, job in fanned_out.items() if job["stage"] == "fetch_shard"}
    return fold_helpers(jobs), dvc_stages()


def test_fetch_fans_out_into_snakemake_only_helpers(fanned_out):
    """One fetch_shard job per shard (2 levels x 4 generated shards), in none of DVC's stages."""
    shards = sorted(name for name in fanned_out if name.startswith("fetch_shard@"))
    assert shards == sorted(f"fetch_shard@2/{level}/{split}/{split}{i:04d}.tfrecord" for level in ("video", "frame")
                            for split, count in (("train", 2), ("validate", 1), ("test", 1)) for i in range(count))
    for name in shards:
        assert fanned_out[name]["cmd"] == f"python {FANOUT_SCRIPT} --shard {name.split('@')[1]}"
    assert fanned_out["fetch"]["inputs"] >= {f"resources/store/records/{n.split('@')[1]}.json" for n in shards}
    dvc = dvc_stages()
    assert not set(FOLDED_INTO) & {name.split("@")[0] for name in dvc}
    assert not any("fetch_shard" in stage["cmd"] for stage in dvc.values())


def _base(name: str) -> str:
    return name.split("@")[0]


def _item(name: str) -> str | None:
    return name.split("@")[1] if "@" in name else None


def test_dvc_is_the_declared_dag():
    """dvc.yaml's stages: the declared ones DVC runs, each with the declared params, inputs,
    outputs and code (its script and the params schema besides)."""
    stages = dvc_stages()
    assert {_base(name) for name in stages} == {s.name for s in dag.STAGES.values() if "dvc" in s.orchestrators}
    for name, stage in stages.items():
        base, item = _base(name), _item(name)
        assert stage["params"] == dag.stage_keys(base, item), name
        assert stage["outs"] == {str(p) for p in dag.outputs(base, item)}, name
        code = set(dag.code_paths(base)) | {f"workflow/scripts/{base}.py", dag.SCHEMA}
        inputs = {p.replace("{item}", item or "") for p in dag.stage(base).inputs}
        assert stage["deps"] == code | inputs, name
        assert stage["cmd"] == f"python workflow/scripts/{base}.py" + (f" --model {item}" if item else ""), name


def test_snakemake_is_the_declared_dag(fanned_out):
    """Every rule but `all` is a declared stage, with the declared outputs and every file of the declared code."""
    jobs = snakemake_jobs() | {name: job for name, job in fanned_out.items() if job["stage"] == "fetch_shard"}
    assert {job["stage"] for job in jobs.values()} == set(dag.STAGES)
    for name, job in jobs.items():
        base, item = job["stage"], _item(name)
        assert job["outputs"] == {str(p) for p in dag.outputs(base, item)}, name
        assert set(dag.code_files(base)) <= job["inputs"], name


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
    rules = re.findall(r"^(?:rule|checkpoint) (\w+):\n((?:    .*\n|\n)*)", text, re.M)
    assert len(rules) >= 8
    for name, body in rules:
        for directive in ("log:", "conda:", "benchmark:", "input:", "output:"):
            assert f"    {directive}" in body, f"rule {name} lacks {directive}"


def test_snakemake_lint():
    result = subprocess.run(["snakemake", "--lint"], cwd=REPO, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_with_real_data_the_generator_is_no_input_of_the_fetch(tmp_path):
    """An edit to the generator must not make a real-data run's fetch, and all after it, stale."""
    from test_pipeline import copy_repo, tiny_params

    copy_repo(tmp_path)
    params = tiny_params()
    params["data"]["source"] = f"file://{tmp_path / 'mirror'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    jobs = snakemake_jobs(cwd=tmp_path)
    assert "generate" not in jobs
    assert "fetch" in jobs and not any("resources/generated" in job["inputs"] for job in jobs.values())
    assert "resources/generated" in snakemake_jobs()["fetch"]["inputs"]  # the default: generated data


def test_dvc_hashes_no_snakemake_time_stamp():
    """Snakemake leaves .snakemake_timestamp in its directory outputs; DVC builds them without one.
    Hashed, it would make a folder built by one orchestrator stale for the other."""
    out = subprocess.run(["dvc", "check-ignore", "-d", "results/models/qrnn/seeds/.snakemake_timestamp",
                          "resources/generated/.snakemake_timestamp"], cwd=REPO, env=tool_env(), capture_output=True,
                         text=True, check=True).stdout
    assert out.count(".dvcignore:") == 2


def test_snakemake_reads_the_default_profile_by_itself():
    """`snakemake --cores N` alone runs with workflow/profiles/default (its GPU pool and
    rerun-incomplete): Snakemake looks for it beside workflow/Snakefile."""
    out = subprocess.run(["snakemake", "-n"], cwd=REPO, env=tool_env(), capture_output=True, text=True).stderr
    assert "Using workflow specific profile workflow/profiles/default" in out
