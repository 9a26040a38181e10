"""The command line shared by the stage scripts: params, locks, logging, one-line errors.

A stage run
1. loads and checks params.yaml; nothing is written before that;
2. takes its locks (dag.locks: the resources it reads shared, those it writes
   exclusive), so two runs at once (Snakemake and DVC on one workspace, or a rerun
   beside a job orphaned by a killed orchestrator) never write the same outputs
   together, nor read outputs while they are rewritten: the later one waits, saying
   for what and for whom (YT8M_LOCK_TIMEOUT=seconds bounds the wait);
3. runs the stage; if it fails, removes the stage's outputs before releasing its
   locks (every output is written under a temporary name and renamed, so none is
   ever partial; after a failure none is left at all), prints one line
   ``error: ...`` and exits with status 1.

A corrupt input (a file that is not what its producer recorded) is named with the
stage that refused it; when DVC's cache holds a corrupt copy of it too, the line says
so: DVC checks its cache out without checking it, so a rerun would get the same bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path

import yaml

from yt8m_qrnn.pipeline import dag
from yt8m_qrnn.pipeline.io import (
    CorruptArtifact,
    StageError,
    remove_stale_temporaries,
    resource_locks,
    sha256_file,
)
from yt8m_qrnn.pipeline.params import (
    ParamsError,
    benchmark_path,
    load_params,
    sync_params_stamp,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXPECTED_ERRORS = (ParamsError, ValueError, OSError, RuntimeError)
log = logging.getLogger("yt8m_qrnn")


def run_stage(name: str, argv=None) -> None:
    """The command line of stage `name` (pipeline.dag.STAGES): `--params`, and `--model` for a per-model stage."""
    spec = dag.stage(name)
    takes_model = spec.item == "model"
    parser = argparse.ArgumentParser(description=f"Stage {name!r}: {spec.entry}")
    parser.add_argument("--params", default="params.yaml")
    if takes_model:
        parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    where = f"{name} {args.model}" if takes_model else name  # what a StageError concerns
    try:
        params = load_params(args.params)
        if takes_model and args.model not in params["models"]:
            raise ParamsError(f"{args.params}: models: no model named {args.model!r} (defined: {', '.join(params['models'])})")
        model = args.model if takes_model else None
        start_keras(name, model, params)  # before the locks: a refusal touches nothing
        with guarded(name, model, params):
            sync_params_stamp(params, name, model)
            if "DVC_STAGE" in os.environ:
                forget_snakemake_benchmark(name, model)
            stage = stage_function(name)
            stage(params, model) if takes_model else stage(params)
    except BaseException as err:  # noqa: BLE001 - what is not an expected error is raised again
        line = _error_line(err, name, where)
        if line is None:
            raise
        fail(line)


def _error_line(err: BaseException, name: str, where: str) -> str | None:
    """The one line for an expected error, None for any other (a bug: its traceback is wanted)."""
    record_error = _record_error(err)
    if record_error is not None:
        indexed = str(dag.INDEX) in dag.stage(name).inputs  # the shards were checked when indexed
        return record_error + (_refetch_advice(record_error) if indexed else "")
    if isinstance(err, StageError):
        return f"{where}: {err}" + (_dvc_cache_note(err.path) if isinstance(err, CorruptArtifact) else "")
    if isinstance(err, MemoryError):  # outside the training loop, which names the batch size to lower
        return f"{where}: out of memory ({type(err).__name__}: {err})"
    if isinstance(err, EXPECTED_ERRORS):
        return str(err)
    return None


def start_keras(name: str, item: str | None, params: dict) -> None:
    """Make Keras start with the backend the stage reads (train.backend), before the stage imports it."""
    if not {"train", "train.backend"} & set(dag.stage_keys(name, item)):
        return
    wanted = params["train"]["backend"]
    if "keras" in sys.modules:  # a caller that started Keras already (a test, an interactive session)
        started = sys.modules["keras"].backend.backend()
        if started != wanted:
            raise ParamsError(f"train.backend: {wanted!r}, but Keras was started with {started!r} in this process")
        return
    os.environ["KERAS_BACKEND"] = wanted


def stage_function(name: str):
    """The function that runs stage `name` (its `entry`), imported only now: a stage's process
    imports only its own code."""
    module, _, function = dag.stage(name).entry.partition(":")
    return getattr(importlib.import_module(module), function)


@contextlib.contextmanager
def guarded(stage: str, item: str | None, params: dict):
    """The stage's locks (dag.locks) for the block; if the block fails, the stage's
    outputs are removed before the locks are released."""
    reads, writes = dag.locks(stage, item, params)
    owner = f"stage {stage}" + (f"@{item}" if item else "")
    with resource_locks(dag.LOCK_DIR, reads, writes, owner=owner):
        for output in dag.outputs(stage, item):
            for path in remove_stale_temporaries(output):
                log.info("removed %s, left by a run killed while writing it", path)
        try:
            yield
        except BaseException:
            _remove_outputs(stage, item)
            raise


def fail(message: str) -> None:
    log.debug("details", exc_info=True)
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(1)


def _remove_outputs(stage: str, model: str | None) -> None:
    try:
        removed = dag.remove_outputs(stage, model)
    except OSError as err:
        log.warning("could not remove the outputs of the failed stage: %s", err)
        return
    if removed:
        log.info("removed the outputs of the failed stage: %s", ", ".join(map(str, removed)))


_READER_ERROR = re.compile(r"\b(?:CorruptRecordError|BadRecordError|RecordError): (.+? record at byte offset \d+: .+)$",
                           re.M)


def _refetch_advice(record_error: str) -> str:
    """What to do about a shard whose record is corrupt: fetch it again. When the shard read is the store's
    file itself (published as a hard link), that must go first: fetch trusts it by its size and time."""
    shard = Path(record_error.split(": record at byte offset ")[0])
    advice = "; the shards changed after they were indexed: "
    if _same_file(shard, stored := dag.SHARD_STORE / _relative(shard, dag.DATA_ROOT)):
        advice += f"delete {stored} and "
    advice += "run the fetch stage again (dvc repro --force --single-item fetch, or snakemake --forcerun fetch)"
    return advice + _dvc_cache_note(shard)


def _relative(path: Path, folder: Path) -> Path:
    return path.relative_to(folder) if folder in path.parents else path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


DVC_CACHE = Path(".dvc/cache/files/md5")


def _dvc_cache_note(path: Path) -> str:
    copy = _corrupt_dvc_copy(Path(path))
    return f"; DVC's cached copy {copy} is corrupt too: delete it first" if copy else ""


def _corrupt_dvc_copy(path: Path) -> Path | None:
    """DVC's cache object for `path` (by its md5 in dvc.lock) when its bytes do not hash to that md5."""
    try:
        md5 = _dvc_locked_md5(path)
        copy = DVC_CACHE / md5[:2] / md5[2:] if md5 else None
        return copy if copy and copy.is_file() and sha256_file(copy, "md5") != md5 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):  # no DVC, or no record
        return None


def _dvc_locked_md5(path: Path) -> str | None:
    """The md5 dvc.lock records for `path`: an output's, or a file's in an output folder (its .dir listing)."""
    for stage in yaml.safe_load(Path("dvc.lock").read_text())["stages"].values():
        for out in stage.get("outs", []):
            folder = Path(out["path"])
            if folder == path:
                return out["md5"]
            if folder in path.parents and out["md5"].endswith(".dir"):
                listing = json.loads((DVC_CACHE / out["md5"][:2] / out["md5"][2:]).read_text())
                relpath = path.relative_to(folder).as_posix()
                return next((entry["md5"] for entry in listing if entry["relpath"] == relpath), None)
    return None


def _record_error(err: BaseException) -> str | None:
    """The reader's one-line error (file, offset, what is wrong): raised as it is (numpy batches), or
    inside a TensorFlow error (tf.data reads records in a numpy_function, whose exceptions reach the
    training loop wrapped by TensorFlow)."""
    if any(cls.__name__ == "RecordError" for cls in type(err).__mro__):
        return _one_line(str(err))
    if not type(err).__module__.startswith("tensorflow"):
        return None
    found = _READER_ERROR.search(str(err))
    return found.group(1).strip() if found else None


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


def forget_snakemake_benchmark(stage: str, model: str | None) -> None:
    """Under `dvc repro`, drop Snakemake's benchmark of an earlier run of this stage:
    Snakemake counts it among the job's outputs, so a stale one would look out of date."""
    path = benchmark_path(stage, model)
    if os.path.exists(path):
        os.remove(path)
