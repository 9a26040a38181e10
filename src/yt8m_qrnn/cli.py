"""The command line shared by the stage scripts: params, logging, one-line errors."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ParamsError, benchmark_path, load_params, sync_params_stamp

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXPECTED_ERRORS = (ParamsError, ValueError, OSError, RuntimeError)


def run_stage(stage, *, takes_model: bool = False, argv=None) -> None:
    parser = argparse.ArgumentParser(description=stage.__doc__)
    parser.add_argument("--params", default="params.yaml")
    if takes_model:
        parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        params = load_params(args.params)
        if takes_model and args.model not in params["models"]:
            raise ParamsError(f"{args.params}: models: no model named {args.model!r} (defined: {', '.join(params['models'])})")
        model = args.model if takes_model else None
        sync_params_stamp(params, stage.__name__, model)
        if "DVC_STAGE" in os.environ:
            forget_snakemake_benchmark(stage.__name__, model)
        stage(params, model) if takes_model else stage(params)
    except EXPECTED_ERRORS as err:
        logging.getLogger("yt8m_qrnn").debug("details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def forget_snakemake_benchmark(stage: str, model: str | None) -> None:
    """Under `dvc repro`, drop Snakemake's benchmark of an earlier run of this stage:
    Snakemake counts it among the job's outputs, so a stale one would look out of date."""
    path = benchmark_path(stage, model)
    if os.path.exists(path):
        os.remove(path)
