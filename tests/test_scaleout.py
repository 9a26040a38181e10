"""Scaling out: the Snakemake profiles, the DVC remote round trip, `dvc exp run -S`.

Profiles (workflow/profiles/*): each dry-runs the whole DAG, and the resources Snakemake
would hand to the executor are read from the dry run's job listing. For the cluster
executors the request itself is also checked: the executor plugin runs for real, with
the cluster replaced by a recorder (fake `sbatch`/`sacct` on PATH for SLURM; the
Kubernetes and Google Batch API clients patched), and the recorded sbatch command line,
Kubernetes Job and Batch CreateJobRequest are asserted. Kubernetes and Google Batch have
no shared file system: their profiles keep inputs and outputs in a GCS bucket, here the
gcp-storage-emulator. A test skips, saying why, when a plugin is not installed.

DVC (slow): the tiny pipeline is built once; its outputs are pushed to a local remote,
the cache and the cached outputs are deleted, `dvc pull` brings them back byte for
byte, and after workflow/scripts/restore_mtimes.py Snakemake has nothing to rerun.
Then `dvc exp run -S models.qrnn.hidden=...` runs one experiment that `dvc exp show` lists.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tool_env
from tiny_pipeline import copy_repo, copy_workspace, tiny_params

PROFILES = REPO / "workflow" / "profiles"
STAGES = ["generate", "fetch", "index", "train", "evaluate", "bench", "report"]
MODELS = yaml.safe_load((REPO / "params.yaml").read_text())["run_models"]
BUCKET = "yt8m-scaleout-test"
PREFIX = f"gs://{BUCKET}/qrnn"
PLUGINS = {
    "slurm": ["snakemake_executor_plugin_slurm"],
    "kubernetes": ["snakemake_executor_plugin_kubernetes", "snakemake_storage_plugin_gcs"],
    "googlebatch": ["snakemake_executor_plugin_googlebatch", "snakemake_storage_plugin_gcs"],
}


def need_plugins(profile: str) -> None:
    for module in PLUGINS.get(profile, []):
        if importlib.util.find_spec(module) is None:
            package = module.replace("_", "-")
            pytest.skip(f"{package} is not installed (pip install {package}); profile {profile} not tested")


def run(cmd, cwd, env=None, check=True, timeout=600) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout + result.stderr


def git_commit(cwd, message: str) -> None:
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message]):
        run(cmd, cwd)


# ------------------------------------------------------------------ dry runs


def parse_resources(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(", ") if "=" in item)


def dry_run_jobs(out: str) -> dict[str, dict[str, str]]:
    """rule[@model or @shard] -> the resources Snakemake lists for that job in `snakemake -n`."""
    jobs = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?(?:rule|checkpoint) )", out):
        rule = re.search(r"^(?:local)?(?:rule|checkpoint) (\w+):$", block, re.M)
        if not rule or rule.group(1) == "all":
            continue
        wildcards = re.search(r"^\s+wildcards: (?:model|shard)=(\S+)$", block, re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        name = rule.group(1) + (f"@{wildcards.group(1)}" if wildcards else "")
        jobs[name] = parse_resources(resources.group(1) if resources else "")
    return jobs


def expected_jobs() -> set[str]:
    """The whole DAG (dvc.yaml's stages) before the shards are planned: the fan-out is known
    once the checkpoint fetch_plan ran."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(STAGES) <= set(stages)
    return {"fetch_plan"} | {f"{name}@{m}" if "foreach" in stage else name
                             for name, stage in stages.items() for m in (MODELS if "foreach" in stage else [None])}


def dry_run(cwd, profile: str, *extra, env=None) -> dict[str, dict[str, str]]:
    out = run(["snakemake", "-n", "--forceall", "--workflow-profile", f"workflow/profiles/{profile}", *extra], cwd, env)
    assert f"workflow specific profile workflow/profiles/{profile}" in out
    jobs = dry_run_jobs(out)
    assert set(jobs) == expected_jobs(), sorted(jobs)
    return jobs


# The planned workspace selects train shard 1 of the 2 generated, and all of validate and test.
SELECTED_SHARDS = [f"2/{level}/{name}" for level in ("video", "frame")
                   for name in ("train/train0001.tfrecord", "validate/validate0000.tfrecord", "test/test0000.tfrecord")]


def fanout_dry_run(cwd, profile: str, env=None) -> dict[str, dict[str, str]]:
    """The dry run once the shards are planned: every job from the fan-out on (forced), one
    fetch_shard job per selected shard, then the gathering fetch and the rest of the DAG."""
    out = run(["snakemake", "-n", "--workflow-profile", f"workflow/profiles/{profile}", "--forcerun", "fetch_shard"],
              cwd, env)
    assert f"workflow specific profile workflow/profiles/{profile}" in out
    jobs = dry_run_jobs(out)
    shards = {f"fetch_shard@{name}" for name in SELECTED_SHARDS}
    assert set(jobs) == (expected_jobs() - {"generate", "fetch_plan"}) | shards, sorted(jobs)
    assert set(re.findall(r"^fetch_shard\s+(\d+)$", out, re.M)) == {str(len(SELECTED_SHARDS))}  # job stats
    return jobs


def profile_args(profile: str) -> dict:
    """The command line Snakemake makes of a profile, read by Snakemake's own parser."""
    from snakemake.profiles import ProfileConfigFileParser

    with open(PROFILES / profile / "config.yaml") as stream:
        return dict(ProfileConfigFileParser().parse(stream))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the repository (default params.yaml), under git, its params stamps written."""
    root = tmp_path_factory.mktemp("scaleout")
    copy_repo(root)
    run(["git", "init", "-q"], root)
    git_commit(root, "copy")
    run(["snakemake", "-n", "--workflow-profile", "workflow/profiles/default"], root)  # writes results/params/*.json
    return root


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A copy of the repository with a small generated dataset whose shards are planned
    (generate and the checkpoint fetch_plan run for real), selecting SELECTED_SHARDS."""
    root = tmp_path_factory.mktemp("planned")
    copy_repo(root)
    params = tiny_params()
    params["generate"]["splits"] = {"train": [2, 4], "validate": [1, 4], "test": [1, 4]}
    params["data"]["shards"] = {"train": [1], "validate": "all", "test": "all"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    git_commit(root, "planned")
    run(["snakemake", "--cores", "1", "--workflow-profile", "workflow/profiles/default", "resources/store/plan.json"],
        root)
    plan = json.loads((root / "resources/store/plan.json").read_text())
    assert [entry["name"] for entry in plan["shards"]] == SELECTED_SHARDS
    return root


@contextlib.contextmanager
def planned_bucket(planned: Path):
    """gcs_bucket for the planned workspace, holding also the mirror's time stamp and the
    plan, uploaded after the inputs they were made from (the bucket's times are upload times)."""
    with gcs_bucket(planned) as (env, bucket):
        for name in ("resources/generated/.snakemake_timestamp", "resources/store/plan.json"):
            time.sleep(1.1)
            bucket.blob(f"qrnn/{name}").upload_from_filename(str(planned / name))
        yield env, bucket


def check_fanout_resources(jobs: dict[str, dict[str, str]], expected: dict[str, str]) -> None:
    for name in SELECTED_SHARDS:
        resources = jobs[f"fetch_shard@{name}"]
        for key, value in expected.items():
            assert resources.get(key) == value, (name, key, resources)


@contextlib.contextmanager
def gcs_bucket(workspace: Path):
    """The GCS emulator, with the bucket holding the inputs the workflow does not make
    (as a user uploads them, README "Scaling out"); yields the environment to use it."""
    from conftest_servers import gcs_emulator
    from google.cloud import storage

    with gcs_emulator() as url:
        env = tool_env() | {"STORAGE_EMULATOR_HOST": url, "YT8M_STORAGE_PREFIX": PREFIX,
                            "SNAKEMAKE_STORAGE_GCS_PROJECT": "test-project",
                            "SNAKEMAKE_GOOGLEBATCH_PROJECT": "test-project",
                            "SNAKEMAKE_GOOGLEBATCH_REGION": "us-central1"}
        os.environ["STORAGE_EMULATOR_HOST"] = url
        try:
            client = storage.Client(project="test-project")
            bucket = client.create_bucket(BUCKET)
            for folder in ("src", "workflow/scripts", "workflow/schemas", "results/params"):
                for path in sorted((workspace / folder).rglob("*")):
                    if path.is_file() and "__pycache__" not in path.parts:
                        bucket.blob(f"qrnn/{path.relative_to(workspace)}").upload_from_filename(str(path))
            yield env, bucket
        finally:
            del os.environ["STORAGE_EMULATOR_HOST"]


def test_default_profile_is_what_snakemake_reads():
    args = profile_args("default")
    assert args["cores"] == "all"
    assert any(entry.startswith("gpu=") for entry in args["resources"]), "no GPU pool"
    assert any(entry.startswith("train:gpu=") for entry in args["set-resources"])


@pytest.mark.parametrize("visible, gpus", [("", 0), ("-1", 0), ("0", 1), ("0,1", 2), ("2,3,5,7", 4)])
def test_default_profile_gives_training_the_gpus_present(workspace, visible, gpus):
    env = tool_env() | {"CUDA_VISIBLE_DEVICES": visible}
    jobs = dry_run(workspace, "default", env=env)
    for name, resources in jobs.items():
        expected = str(gpus) if name.startswith("train@") else None
        assert resources.get("gpu") == expected, (name, resources)


def test_default_profile_counts_gpus_with_nvidia_smi(workspace, tmp_path, monkeypatch):
    """Without CUDA_VISIBLE_DEVICES the profile asks nvidia-smi; the pool and each
    training job get that many GPUs (one training at a time: it uses them all)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf 'GPU 0: NVIDIA H100 (UUID: GPU-a)\\nGPU 1: NVIDIA H100 (UUID: GPU-b)\\n"
                    "GPU 2: NVIDIA H100 (UUID: GPU-c)\\n'\n")
    fake.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{tool_env()['PATH']}")
    args = profile_args("default")
    assert args["resources"] == ["gpu=3"] and args["set-resources"] == ["train:gpu=3"]
    jobs = dry_run(workspace, "default", env=dict(os.environ))
    assert {jobs[f"train@{m}"]["gpu"] for m in MODELS} == {"3"}


GPU_KEYS = {"gpu", "gpu_model", "gpu_manufacturer", "nvidia_gpu"}


def check_cluster_resources(jobs: dict[str, dict[str, str]], train: dict[str, str]) -> None:
    """Every job has memory and a run time; the training jobs, and only they, the GPUs."""
    for name, resources in jobs.items():
        assert int(resources["mem_mb"]) > 0 and int(resources["runtime"]) > 0, (name, resources)
        if name.startswith("train@"):
            for key, value in train.items():
                assert resources.get(key) == value, (name, key, resources)
        else:
            assert not GPU_KEYS & set(resources), (name, resources)
            assert all(resources.get(key) != value for key, value in train.items() if "machine_type" in key), name


def test_default_profile_dry_run_fans_out_the_fetch(planned):
    jobs = fanout_dry_run(planned, "default", env=tool_env() | {"CUDA_VISIBLE_DEVICES": ""})
    assert all("gpu" not in jobs[f"fetch_shard@{name}"] for name in SELECTED_SHARDS)


def test_slurm_profile_dry_run(workspace, planned):
    need_plugins("slurm")
    jobs = dry_run(workspace, "slurm")
    check_cluster_resources(jobs, {"gpu": "1", "gpu_model": "a100"})
    assert jobs["train@qrnn"]["runtime"] == "2880" and jobs["fetch"]["runtime"] == "1440"
    assert jobs["fetch_plan"]["runtime"] == "30"
    jobs = fanout_dry_run(planned, "slurm")
    check_cluster_resources(jobs, {"gpu": "1", "gpu_model": "a100"})
    check_fanout_resources(jobs, {"mem_mb": "1000", "runtime": "60"})


def test_kubernetes_profile_dry_run(workspace, planned):
    need_plugins("kubernetes")
    with gcs_bucket(workspace) as (env, _):
        jobs = dry_run(workspace, "kubernetes", env=env)
    check_cluster_resources(jobs, {"gpu": "1", "gpu_manufacturer": "nvidia", "machine_type": "a2-highgpu-1g"})
    with planned_bucket(planned) as (env, _):
        jobs = fanout_dry_run(planned, "kubernetes", env=env)
    check_cluster_resources(jobs, {"gpu": "1", "gpu_manufacturer": "nvidia", "machine_type": "a2-highgpu-1g"})
    check_fanout_resources(jobs, {"mem_mb": "1000", "runtime": "60", "disk_mb": "4000"})


def test_googlebatch_profile_dry_run(workspace, planned):
    need_plugins("googlebatch")
    with gcs_bucket(workspace) as (env, _):
        jobs = dry_run(workspace, "googlebatch", env=env)
    check_cluster_resources(jobs, {"gpu": "1", "nvidia_gpu": "nvidia-tesla-a100",
                                   "googlebatch_machine_type": "a2-highgpu-1g"})
    assert jobs["train@qrnn"]["googlebatch_max_run_duration"] == "172800s"
    with planned_bucket(planned) as (env, _):
        jobs = fanout_dry_run(planned, "googlebatch", env=env)
    check_cluster_resources(jobs, {"gpu": "1", "nvidia_gpu": "nvidia-tesla-a100",
                                   "googlebatch_machine_type": "a2-highgpu-1g"})
    check_fanout_resources(jobs, {"mem_mb": "1000", "runtime": "60", "googlebatch_machine_type": "e2-standard-2",
                                  "googlebatch_memory": "1000", "googlebatch_max_run_duration": "3600s"})


@pytest.mark.parametrize("profile", ["slurm", "kubernetes", "googlebatch"])
def test_cluster_profiles_give_fetch_shard_its_own_retries(profile, monkeypatch):
    """Snakemake's own reading of the profile: fetch_shard, and only it, is retried 5 times."""
    need_plugins(profile)
    monkeypatch.setenv("YT8M_STORAGE_PREFIX", PREFIX)
    args = profile_args(profile)
    assert args["preemptible-rules"] == ["fetch_shard"] and str(args["preemptible-retries"]) == "5"
    assert str(args["retries"]) == "2"  # every other rule


def test_storage_profiles_name_the_missing_bucket(workspace):
    for profile in ("kubernetes", "googlebatch"):
        need_plugins(profile)
        env = {k: v for k, v in tool_env().items() if k != "YT8M_STORAGE_PREFIX"}
        out = run(["snakemake", "-n", "--workflow-profile", f"workflow/profiles/{profile}"], workspace, env, check=False)
        assert "set YT8M_STORAGE_PREFIX to use this profile" in out


# ------------------------------------------------------------------ what the executors would send


@pytest.fixture
def upstream_done(workspace):
    """generate, fetch (its plan, one shard's record) and index outputs in place (empty but
    the plan, times in pipeline order), so the four train jobs are the ones to submit;
    removed afterwards."""
    from yt8m_qrnn.pipeline.params import load_params
    from yt8m_qrnn.stages.fetch.store import data_params_digest

    made = []
    shard = "2/video/train/train0000.tfrecord"
    digest = data_params_digest(load_params(workspace / "params.yaml"))  # a plan of these params: not stale
    plan = {"version": 2, "source": "generated (resources/generated)", "params_digest": digest, "shards": [
        {"name": shard, "level": "video", "split": "train", "remote": "train0000.tfrecord",
         "expected": {"md5": "0" * 32, "crc32c": None, "size": None, "generation": None}}]}
    groups = [["resources/generated/.snakemake_timestamp"], ["resources/store/plan.json"],
              [f"resources/store/records/{shard}.json"],
              ["resources/yt8m/.snakemake_timestamp", "results/data/manifest.json"],
              ["results/index/index.parquet", "results/index/label_stats.json"]]
    when = time.time() + 5
    for step, group in enumerate(groups):
        for name in group:
            path = workspace / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(plan) if name.endswith("plan.json") else "")
            for p in (path, path.parent):
                os.utime(p, (when + step, when + step))
            made.append(path)
    yield [name for group in groups for name in group]
    for path in made:
        path.unlink(missing_ok=True)
    shutil.rmtree(workspace / "resources", ignore_errors=True)
    shutil.rmtree(workspace / ".snakemake", ignore_errors=True)


FAKE_SLURM = """#!/usr/bin/env bash
# Records each call (one file per call) and answers like a cluster whose jobs all fail.
name=$(basename "$0")
record="$FAKE_SLURM_DIR/$(date +%s%N)-$$-$name"
printf '%s\\n' "$@" > "$record"
case "$name $1" in
  "sbatch "*) cat > "$record.stdin"; echo 4242 ;;
  "sacct -X") echo "4242|FAILED" ;;
  "sacctmgr "*) echo testaccount ;;
esac
exit 0
"""


@pytest.mark.extended
def test_slurm_sbatch_requests_the_gpus(workspace, upstream_done, tmp_path):
    """The slurm plugin's own sbatch command lines: GPUs, memory (growing with the
    attempt), time and CPUs, for each training job."""
    need_plugins("slurm")
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    (bin_dir / "fake").write_text(FAKE_SLURM)
    (bin_dir / "fake").chmod(0o755)
    for command in ("sbatch", "sacct", "squeue", "scontrol", "sinfo", "sacctmgr", "sshare", "scancel", "srun"):
        (bin_dir / command).symlink_to("fake")
    env = tool_env() | {"FAKE_SLURM_DIR": str(calls)}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    targets = [f"results/models/{m}/train_stats.json" for m in MODELS]
    out = run(["snakemake", "--workflow-profile", "workflow/profiles/slurm", "--retries", "1",
               "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1", *targets],
              workspace, env, check=False, timeout=300)
    assert "SLURM-job '4242' failed" in out, out[-3000:]
    submissions = [p.read_text().splitlines() for p in sorted(calls.glob("*-sbatch"))]
    by_model: dict[str, list[list[str]]] = {}
    for argv in submissions:
        comment = argv[argv.index("--comment") + 1]
        by_model.setdefault(comment.removeprefix("rule_train_wildcards_"), []).append(argv)
    assert sorted(by_model) == sorted(MODELS), [a[:12] for a in submissions]
    for model, attempts in by_model.items():
        assert len(attempts) == 2, model  # the first try and one retry
        for attempt, argv in enumerate(attempts, start=1):
            assert "--gpus=a100:1" in argv and "-t" in argv and argv[argv.index("-t") + 1] == "2880", argv[:30]
            assert argv[argv.index("--mem") + 1] == str(64000 * attempt)
            assert "--cpus-per-task=8" in argv


K8S_RECORDER = """
import json, sys
import kubernetes
from kubernetes.client.rest import ApiException

record = sys.argv[1]
kubernetes.config.load_kube_config = lambda *a, **k: None
kubernetes.client.CoreV1Api.create_namespaced_secret = lambda self, *a, **k: None
kubernetes.client.CoreV1Api.delete_namespaced_secret = lambda self, *a, **k: None

def create_namespaced_job(self, namespace, body, **kwargs):
    with open(record, "a") as f:
        f.write(json.dumps(kubernetes.client.ApiClient().sanitize_for_serialization(body)) + "\\n")
    raise ApiException(status=403, reason="recorded by the test, not submitted")

kubernetes.client.BatchV1Api.create_namespaced_job = create_namespaced_job
from snakemake.cli import main
sys.argv = ["snakemake"] + sys.argv[2:]
main()
"""

BATCH_RECORDER = """
import sys
from google.cloud import batch_v1

record = sys.argv[1]

class RecordingBatchClient:
    def __init__(self, *args, **kwargs):
        pass

    def create_job(self, request):
        with open(record, "a") as f:
            f.write(batch_v1.CreateJobRequest.to_json(request, indent=None) + "\\n")
        raise RuntimeError("recorded by the test, not submitted")

batch_v1.BatchServiceClient = RecordingBatchClient
from snakemake.cli import main
sys.argv = ["snakemake"] + sys.argv[2:]
main()
"""


def record_requests(workspace, tmp_path, profile: str, recorder: str, upstream: list[str]) -> list[dict]:
    """Run the profile with the API client replaced by `recorder`, upstream outputs in the
    bucket; the submission fails (the run stops) after the first request is recorded."""
    script, record = tmp_path / "recorder.py", tmp_path / "requests.jsonl"
    script.write_text(textwrap.dedent(recorder))
    with gcs_bucket(workspace) as (env, bucket):
        for name in upstream:  # in pipeline order; the bucket's times follow the uploads
            time.sleep(1.1)
            bucket.blob(f"qrnn/{name}").upload_from_filename(str(workspace / name))
        # the bench job (ready as early as the train jobs) is left out: the first job submitted is a train job
        out = run([sys.executable, str(script), str(record), "--workflow-profile", f"workflow/profiles/{profile}",
                   "--omit-from", "bench"], workspace, env, check=False, timeout=300)
    assert "recorded by the test, not submitted" in out, out[-3000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_kubernetes_job_requests_the_gpus(workspace, upstream_done, tmp_path):
    need_plugins("kubernetes")
    requests = record_requests(workspace, tmp_path, "kubernetes", K8S_RECORDER, upstream_done)
    # only the training jobs ask for GPUs (a fetch_plan/fetch_shard job may be submitted too)
    trains = [job for job in requests
              if "--target-jobs 'train:model=" in job["spec"]["template"]["spec"]["containers"][0]["args"][-1]]
    assert trains, [job["spec"]["template"]["spec"]["containers"][0]["args"][-1][-300:] for job in requests]
    for job in trains:
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"]["memory"] == "64000M"
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "a2-highgpu-1g"}
        assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in pod["tolerations"]


def test_googlebatch_job_requests_the_gpus(workspace, upstream_done, tmp_path):
    need_plugins("googlebatch")
    requests = record_requests(workspace, tmp_path, "googlebatch", BATCH_RECORDER, upstream_done)
    assert requests
    for request in requests:
        assert request["parent"] == "projects/test-project/locations/us-central1"
        instance = request["job"]["allocationPolicy"]["instances"][0]
        policy = instance["policy"]
        assert policy["machineType"] == "a2-highgpu-1g"
        assert [(a["type"], a["count"]) for a in policy["accelerators"]] == [("nvidia-tesla-a100", "1")]
        assert instance["installGpuDrivers"] is True
        task = request["job"]["taskGroups"][0]["taskSpec"]
        assert task["computeResource"]["memoryMib"] == "64000" and task["computeResource"]["cpuMilli"] == "8000"
        assert task["maxRunDuration"] == "172800s"
        assert "--target-jobs 'train:model=" in task["runnables"][-1]["script"]["text"]


# ------------------------------------------------------------------ DVC


def test_gcs_remote_is_documented_and_inactive(workspace):
    from dvc.config import Config

    config = Config(dvc_dir=str(workspace / ".dvc"))
    remotes = {name: section["url"] for name, section in config["remote"].items()}
    assert any(url.startswith("gs://") for url in remotes.values()), remotes
    assert config["core"].get("remote") not in {name for name, url in remotes.items() if url.startswith("gs://")}
    comments = [line for line in (REPO / ".dvc" / "config").read_text().splitlines() if line.lstrip().startswith("#")]
    assert any("gs://" in line or "dvc push" in line for line in comments), "the remote is not documented"


def cached_outputs(cwd) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(cwd)) as repo:
        return sorted(out.def_path for stage in repo.index.stages for out in stage.outs if out.use_cache)


def digests(cwd, paths) -> dict[str, str]:
    """Each output file's md5; not Snakemake's time stamps in its folders, which DVC ignores (.dvcignore)."""
    found = {}
    for rel in paths:
        root = cwd / rel
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file() and path.name != ".snakemake_timestamp":
                found[str(path.relative_to(cwd))] = hashlib.md5(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def built(tiny_build, tmp_path_factory):
    """The tiny pipeline, built by Snakemake and committed: this module's own copy of the session's build."""
    root = copy_workspace(tiny_build.root, tmp_path_factory.mktemp("remote") / "built")
    assert "up to date" in run(["dvc", "status"], root)
    git_commit(root, "built")
    return root


@pytest.mark.slow
def test_dvc_remote_round_trip(built, tmp_path):
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], built)
    outputs = cached_outputs(built)
    assert "resources/yt8m" in outputs and "results/index/index.parquet" in outputs
    every_output = ["resources", "results"]
    before = digests(built, every_output)

    assert "pushed" in run(["dvc", "push"], built)
    shutil.rmtree(built / ".dvc" / "cache")
    for rel in outputs:
        path = built / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out = run([sys.executable, "workflow/scripts/restore_mtimes.py"], built, check=False)
    assert "dvc status is not clean" in out  # nothing to put in order before the pull

    run(["dvc", "pull"], built)
    assert digests(built, every_output) == before
    assert "up to date" in run(["dvc", "status"], built)
    assert "in sync" in run(["dvc", "status", "--cloud"], built)
    pending = run(["snakemake", "-n"], built)
    assert "Nothing to be done" not in pending  # pulled files carry the time of the pull

    run([sys.executable, "workflow/scripts/restore_mtimes.py"], built)
    assert "Nothing to be done" in run(["snakemake", "-n"], built)
    assert "up to date" in run(["dvc", "status"], built)
    assert digests(built, every_output) == before
    run(["dvc", "remote", "remove", "local"], built)


@pytest.mark.slow
@pytest.mark.extended
def test_dvc_exp_run_sweep(built):
    if run(["git", "status", "--porcelain"], built).strip():
        git_commit(built, "after the round trip")
    out = run(["dvc", "exp", "run", "-S", "models.qrnn.hidden=6", "-n", "qrnn-hidden-6"], built)
    assert sorted(re.findall(r"Running stage '([^']+)'", out)) == ["evaluate@qrnn", "report", "train@qrnn"]
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=built, env=tool_env(), capture_output=True,
                                      text=True, check=True).stdout)
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    assert baseline["data"]["params"]["params.yaml"]["data"]["models"]["qrnn"]["hidden"] == 8
    runs = {rev["name"]: rev for exp in baseline["experiments"] or [] for rev in exp["revs"]}
    assert "qrnn-hidden-6" in runs, list(runs)
    data = runs["qrnn-hidden-6"]["data"]
    assert data["params"]["params.yaml"]["data"]["models"]["qrnn"]["hidden"] == 6
    metrics = data["metrics"]["results/eval/qrnn/metrics.json"]["data"]
    assert 0.0 <= metrics["gap"] <= 1.0
    assert data["metrics"]["results/models/qrnn/train_stats.json"]["data"]["parameters"] != \
        baseline["data"]["metrics"]["results/models/qrnn/train_stats.json"]["data"]["parameters"]
    # `dvc exp run` checks outputs out of the cache with fresh times; put them in pipeline order
    run([sys.executable, "workflow/scripts/restore_mtimes.py"], built)
    assert "Nothing to be done" in run(["snakemake", "-n"], built)  # Snakemake agrees with the experiment
