import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(workflow.basedir).parent  # the Snakefile is workflow/Snakefile
sys.path.insert(0, str(REPO / "src"))

from yt8m_qrnn.pipeline.params import ParamsError, benchmark_path, sync_params_stamp, validate_params  # noqa: E402
from yt8m_qrnn.pipeline.dag import SHARD_PLAN, SHARD_RECORDS, code_files, shard_record  # noqa: E402
from yt8m_qrnn.stages.fetch.store import data_params_digest, forget_stale_plan  # noqa: E402

try:
    validate_params(config, source="params.yaml")
except ParamsError as err:
    raise WorkflowError(str(err)) from None

MODELS = config["run_models"]
CONDA_ENV = "../envs/pipeline.yaml"
SCRIPTS = "workflow/scripts"

# Each rule's code inputs: its stage's code in the DAG's declaration (yt8m_qrnn.pipeline.dag),
# as files, with the params schema; tests/test_code_deps.py traces what each stage imports.
def code_deps(stage):
    return ["workflow/schemas/params.schema.yaml"] + code_files(stage)


wildcard_constraints:
    model="|".join(MODELS),


# Each stage's params.yaml keys (yt8m_qrnn.pipeline.dag.STAGES) in a stamp file that
# is rewritten only when they change; the rules take it as input, and the default
# profile reruns on mtime, so a params change reruns exactly the stages that read it.
for stage in ("generate", "fetch", "index", "report"):
    sync_params_stamp(config, stage)
for model in MODELS:
    for stage in ("train", "evaluate"):
        sync_params_stamp(config, stage, model)
# The shard plan of other data params is dropped, so the checkpoint fetch_plan makes it again.
forget_stale_plan(config)


# The fetch's fan-out (workflow/rules/data.smk): the shards in the checkpoint fetch_plan's plan.
_PLANS = {}


def read_shard_plan():
    """The names of the planned shards, from the checkpoint fetch_plan's output (parsed once per content)."""
    plan = checkpoints.fetch_plan.get().output.plan
    with plan.open() as handle:  # from the storage provider too, when there is one
        text = handle.read()
    if text not in _PLANS:
        _PLANS.clear()
        _PLANS[text] = [entry["name"] for entry in json.loads(text)["shards"]]
    return _PLANS[text]


def shard_records(wildcards):
    """What the gathering fetch job takes: one fetch_shard record per planned shard."""
    return [str(shard_record(name)) for name in read_shard_plan()]


def commit_dvc_lock():
    """Record what Snakemake built in dvc.lock, so `dvc repro` has nothing left to do.

    `dvc commit` may rewrite cached outputs from its cache (new mtimes), which would
    make Snakemake see them as updated; their times are put back afterwards.
    """
    if not Path(".dvc").is_dir():  # a run in another folder (make sample): DVC tracks the repository's run only
        return
    times = {p: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in output_files()}
    result = subprocess.run(["dvc", "commit", "--force", "--quiet"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"warning: dvc commit failed; dvc.lock not updated: {result.stderr.strip()}", file=sys.stderr)
    for path, (atime, mtime) in sorted(times.items(), reverse=True):  # files before their folders
        if path.exists() and path.stat().st_mtime_ns != mtime:
            os.utime(path, ns=(atime, mtime))


def output_files():
    for folder in ("results", "resources"):
        for root, dirs, files in os.walk(folder):
            yield Path(root)
            yield from (Path(root) / name for name in files)
