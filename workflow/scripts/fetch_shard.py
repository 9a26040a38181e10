"""Snakemake's fan-out of the fetch stage: see yt8m_qrnn.stages.fetch.store.plan and shard.

    python workflow/scripts/fetch_shard.py --plan          # -> resources/store/plan.json
    python workflow/scripts/fetch_shard.py --shard 2/frame/train/train0000.tfrecord
                                                           # -> resources/store/records/<shard>.json

DVC runs the fetch as one stage (workflow/scripts/fetch.py does the plan, every shard and
the publishing); these two are only for a cluster that downloads shards in parallel.
Like every stage: params checked first, locks (dag.locks), one-line errors, and a
failed run leaves none of its outputs.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from yt8m_qrnn.pipeline.cli import EXPECTED_ERRORS, fail, guarded  # noqa: E402
from yt8m_qrnn.pipeline.params import load_params  # noqa: E402
from yt8m_qrnn.stages.fetch import store  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--plan", action="store_true", help="write the shard plan")
    what.add_argument("--shard", metavar="NAME", help="verify or download one planned shard, e.g. 2/frame/train/train0000.tfrecord")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    stage, shard = ("fetch_plan", None) if args.plan else ("fetch_shard", args.shard)
    try:
        params = load_params(args.params)
        with guarded(stage, shard, params):  # dag.locks also checks the shard's name
            store.plan(params) if args.plan else store.shard(params, shard)
    except EXPECTED_ERRORS as err:
        fail(str(err))


if __name__ == "__main__":
    main()
