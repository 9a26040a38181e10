import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from yt8m_qrnn.config import ParamsError, sync_params_stamp, validate_params  # noqa: E402

try:
    validate_params(config, source="params.yaml")
except ParamsError as err:
    raise WorkflowError(str(err)) from None

MODELS = config["run_models"]
CONDA_ENV = "../envs/pipeline.yaml"
SCRIPTS = "workflow/scripts"
PY = "src/yt8m_qrnn"


wildcard_constraints:
    model="|".join(MODELS),


# Each stage's params.yaml keys (yt8m_qrnn.config.STAGE_PARAMS) in a stamp file that
# is rewritten only when they change; the rules take it as input, and the default
# profile reruns on mtime, so a params change reruns exactly the stages that read it.
for stage in ("generate", "fetch", "index", "report"):
    sync_params_stamp(config, stage)
for model in MODELS:
    for stage in ("train", "evaluate"):
        sync_params_stamp(config, stage, model)


def commit_dvc_lock():
    """Record what Snakemake built in dvc.lock, so `dvc repro` has nothing left to do."""
    result = subprocess.run(["dvc", "commit", "--force", "--quiet"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"warning: dvc commit failed; dvc.lock not updated: {result.stderr.strip()}", file=sys.stderr)
