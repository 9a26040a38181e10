"""The pipeline's stages. Each reads only its own params sections (config.STAGE_PARAMS)
and the paths below; workflow/scripts/*.py are thin command lines over these."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import NUM_CLASSES, stage_params
from .io import write_json

log = logging.getLogger("yt8m_qrnn")

GENERATED_MIRROR = Path("resources/generated")
DATA_ROOT = Path("resources/yt8m")
MANIFEST = Path("results/data/manifest.json")
INDEX = Path("results/index/index.parquet")
LABEL_STATS = Path("results/index/label_stats.json")
TRAIN_WORK = Path("resources/work/train")


def model_dir(model: str) -> Path:
    return Path("results/models") / model


def eval_dir(model: str) -> Path:
    return Path("results/eval") / model


def generate(params: dict) -> None:
    from .synth import generate_mirror

    gen = stage_params(params, "generate")["generate"]
    # The generated data always has the 2018 format; its mirror mimics version 2.
    summary = generate_mirror(gen, version=2, num_classes=NUM_CLASSES[2], root=GENERATED_MIRROR)
    log.info("generated %s videos under %s", summary["videos"], GENERATED_MIRROR)


def fetch(params: dict) -> None:
    from .fetch import fetch_dataset

    data = stage_params(params, "fetch")["data"]
    generated = data["source"] == "generated"
    if generated:
        data = data | {"source": "file://" + str(GENERATED_MIRROR.resolve())}
    manifest = fetch_dataset(data, DATA_ROOT, MANIFEST)
    if generated:  # the report shows a banner: not comparable with the paper
        manifest = manifest | {"dataset": "generated", "source": f"generated ({GENERATED_MIRROR})"}
        write_json(MANIFEST, manifest)
    log.info("fetched %d shards into %s", len(manifest["files"]), DATA_ROOT)


def index(params: dict) -> None:
    import json

    from .index import run_index

    p = stage_params(params, "index")
    manifest = json.loads(MANIFEST.read_text())
    table = run_index(DATA_ROOT, manifest, p["index"], p["data"]["version"], INDEX, LABEL_STATS)
    log.info("indexed %d records; subsets %s", len(table), table.groupby("subset").size().to_dict())


def train(params: dict, model: str) -> None:
    from .train import train_model

    p = stage_params(params, "train", model)
    version = p["data"]["version"]
    stats = train_model(model, p["models"][model], p["train"], version=version, num_classes=NUM_CLASSES[version],
                        data_root=DATA_ROOT, index_path=INDEX, out_dir=model_dir(model), work_dir=TRAIN_WORK / model)
    log.info("trained %s: %d parameters, %.1f examples/s", model, stats["parameters"], stats["examples_per_second"])


def evaluate(params: dict, model: str) -> None:
    from .evaluate import evaluate_model

    p = stage_params(params, "evaluate", model)
    version = p["data"]["version"]
    evaluate_model(model, p["models"][model], p["evaluate"], version=version, num_classes=NUM_CLASSES[version],
                   data_root=DATA_ROOT, index_path=INDEX, model_path=model_dir(model) / "model.keras",
                   out_dir=eval_dir(model))


def report(params: dict) -> None:
    from .report import build_report

    p = stage_params(params, "report")
    build_report(p["run_models"], p["report"], Path("results"))

