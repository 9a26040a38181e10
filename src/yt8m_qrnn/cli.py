"""The command line shared by the stage scripts: params, locks, logging, one-line errors.

A stage run
1. loads and checks params.yaml; nothing is written before that;
2. takes its locks (stages.locks: the resources it reads shared, those it writes
   exclusive), so two runs at once (Snakemake and DVC on one workspace, or a rerun
   beside a job orphaned by a killed orchestrator) never write the same outputs
   together, nor read outputs while they are rewritten: the later one waits, saying
   for what and for whom (YT8M_LOCK_TIMEOUT=seconds bounds the wait);
3. runs the stage; if it fails, removes the stage's outputs before releasing its
   locks (every output is written under a temporary name and renamed, so none is
   ever partial; after a failure none is left at all), prints one line
   ``error: ...`` and exits with status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys

from . import stages as pipeline
from .config import ParamsError, benchmark_path, load_params, sync_params_stamp
from .io import resource_locks

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXPECTED_ERRORS = (ParamsError, ValueError, OSError, RuntimeError)
log = logging.getLogger("yt8m_qrnn")


def run_stage(stage, *, takes_model: bool = False, argv=None) -> None:
    parser = argparse.ArgumentParser(description=stage.__doc__)
    parser.add_argument("--params", default="params.yaml")
    if takes_model:
        parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    name = stage.__name__
    try:
        params = load_params(args.params)
        if takes_model and args.model not in params["models"]:
            raise ParamsError(f"{args.params}: models: no model named {args.model!r} (defined: {', '.join(params['models'])})")
        model = args.model if takes_model else None
        with guarded(name, model, params):
            sync_params_stamp(params, name, model)
            if "DVC_STAGE" in os.environ:
                forget_snakemake_benchmark(name, model)
            stage(params, model) if takes_model else stage(params)
    except EXPECTED_ERRORS as err:
        fail(str(err))
    except Exception as err:
        record_error = _record_error(err)
        if record_error is None:
            raise
        fail(record_error + "; the shards changed after they were indexed: run the fetch stage again "
                            "(dvc repro, or snakemake --forcerun fetch)")


@contextlib.contextmanager
def guarded(stage: str, item: str | None, params: dict):
    """The stage's locks (stages.locks) for the block; if the block fails, the stage's
    outputs are removed before the locks are released."""
    reads, writes = pipeline.locks(stage, item, params)
    owner = f"stage {stage}" + (f"@{item}" if item else "")
    with resource_locks(pipeline.LOCK_DIR, reads, writes, owner=owner):
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
        removed = pipeline.remove_outputs(stage, model)
    except OSError as err:
        log.warning("could not remove the outputs of the failed stage: %s", err)
        return
    if removed:
        log.info("removed the outputs of the failed stage: %s", ", ".join(map(str, removed)))


_READER_ERROR = re.compile(r"\b(?:CorruptRecordError|BadRecordError|RecordError): (.+? record at byte offset \d+: .+)$",
                           re.M)


def _record_error(err: BaseException) -> str | None:
    """The reader's one-line error (file, offset, what is wrong) inside a TensorFlow error: the input pipeline
    reads records in a numpy_function, whose exceptions reach the training loop wrapped by TensorFlow."""
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
