"""The pipeline's stages. Each reads only its own params sections (config.STAGE_PARAMS)
and the paths below; workflow/scripts/*.py are thin command lines over these.

Besides the stages: what each one writes (`outputs`, the same paths as dvc.yaml and
the Snakemake rules declare) and which named resources it reads and writes (`locks`),
used by cli.run_stage to lock them and to remove a failed stage's outputs.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

from .config import NUM_CLASSES, stage_params
from .io import config_digest, write_json

log = logging.getLogger("yt8m_qrnn")

GENERATED_MIRROR = Path("resources/generated")
DATA_ROOT = Path("resources/yt8m")
MANIFEST = Path("results/data/manifest.json")
INDEX = Path("results/index/index.parquet")
LABEL_STATS = Path("results/index/label_stats.json")
TRAIN_WORK = Path("resources/work/train")
# Verified shards live here, outside every declared output: Snakemake and DVC delete a
# stage's outputs before running it again, and the shards (1.5 TB of them) must survive
# that. The fetch stage publishes the selected ones into DATA_ROOT as hard links.
SHARD_STORE = Path("resources/store/yt8m")
STORE_MANIFEST = Path("resources/store/manifest.json")
# Snakemake fans the fetch out (workflow/rules/data.smk): the checkpoint fetch_plan writes
# the shard selection (SHARD_PLAN), one fetch_shard job per shard verifies or downloads
# it into the store and writes its record (its manifest entry); the fetch rule gathers.
# DVC's single fetch stage writes the same files, so Snakemake finds them up to date.
SHARD_PLAN = Path("resources/store/plan.json")
SHARD_RECORDS = Path("resources/store/records")
_SHARD_NAME = re.compile(r"\d+/[a-z_]+/[a-z_]+/[a-z_]+\d{4}\.tfrecord")
LOCK_DIR = Path("resources/locks")
REPORT = Path("results/report.md")
FIGURES = Path("results/figures")
TABLES = Path("results/tables")
TRAIN_FILES = ("seeds", "train_stats.json", "history.csv")
EVAL_FILES = ("predictions", "eval_predictions.csv", "submission.csv", "metrics.json", "pr_curve.csv",
              "per_class_ap.csv")


def model_dir(model: str) -> Path:
    return Path("results/models") / model


def seed_dir(model: str, seed: int) -> Path:
    """One seed's model.keras, history.csv and train_stats.json."""
    return model_dir(model) / "seeds" / f"seed-{seed}"


def eval_dir(model: str) -> Path:
    return Path("results/eval") / model


def generate(params: dict) -> None:
    from .synth import generate_mirror

    gen = stage_params(params, "generate")["generate"]
    # The generated data always has the 2018 format; its mirror mimics version 2.
    summary = generate_mirror(gen, version=2, num_classes=NUM_CLASSES[2], root=GENERATED_MIRROR)
    log.info("generated %s videos under %s", summary["videos"], GENERATED_MIRROR)


def fetch(params: dict) -> None:
    """Plan, verify or download every selected shard, record each, publish: everything, in one process.

    The plan and the records are rewritten (or, unchanged, touched) before the outputs, so
    Snakemake's fetch_plan and fetch_shard jobs are up to date after a run of this stage.
    """
    from .fetch import fetch_planned

    data, generated = _fetch_data(params)
    plan = _plan(params, data, generated)
    _refresh_json(SHARD_PLAN, plan)
    manifest = fetch_planned(data, plan, SHARD_STORE, STORE_MANIFEST)
    for entry in manifest["files"]:
        _refresh_json(shard_record(entry["name"]), entry)
    if generated:  # the report shows a banner: not comparable with the paper
        manifest = manifest | {"dataset": "generated", "source": f"generated ({GENERATED_MIRROR})"}
    publish_shards(manifest, SHARD_STORE, DATA_ROOT)
    write_json(MANIFEST, manifest)  # last: a manifest means its shards are in place
    log.info("fetched %d shards into %s", len(manifest["files"]), DATA_ROOT)


def fetch_plan(params: dict) -> None:
    """Snakemake's checkpoint: which shards the params select (SHARD_PLAN); nothing is downloaded."""
    data, generated = _fetch_data(params)
    plan = _plan(params, data, generated)
    _refresh_json(SHARD_PLAN, plan)
    log.info("planned %d shards in %s", len(plan["shards"]), SHARD_PLAN)


def fetch_shard(params: dict, name: str) -> None:
    """Snakemake's fan-out: verify or download the planned shard `name` into the store; write its record."""
    from .fetch import FetchError, fetch_one_shard

    record_path = shard_record(name)
    data, _ = _fetch_data(params)
    try:
        plan = json.loads(SHARD_PLAN.read_text())
    except FileNotFoundError:
        raise FetchError(f"{SHARD_PLAN}: not found: plan the shards first (snakemake fetch_plan)") from None
    except ValueError as err:
        raise FetchError(f"{SHARD_PLAN}: not valid JSON ({err}): plan the shards again") from None
    if plan.get("params_digest") != data_params_digest(params):
        raise FetchError(f"{SHARD_PLAN} was made from other data params: plan the shards again")
    entry = next((e for e in plan.get("shards", []) if e.get("name") == name), None)
    if entry is None:
        raise FetchError(f"{name} is not among the {len(plan.get('shards', []))} shards of {SHARD_PLAN}")
    write_json(record_path, fetch_one_shard(data, entry, SHARD_STORE))
    log.info("%s verified in %s", name, SHARD_STORE)


def shard_record(name: str) -> Path:
    """Where fetch_shard records shard `name` ("2/frame/train/train0000.tfrecord")."""
    if not _SHARD_NAME.fullmatch(name):
        raise ValueError(f"invalid shard name {name!r} (expected VERSION/LEVEL/SPLIT/SPLITNNNN.tfrecord)")
    return SHARD_RECORDS / f"{name}.json"


def _fetch_data(params: dict) -> tuple[dict, bool]:
    """The data params with ``generated`` as the file:// URL of the generated mirror; whether it was."""
    data = stage_params(params, "fetch")["data"]
    generated = data["source"] == "generated"
    if generated:
        data = data | {"source": "file://" + str(GENERATED_MIRROR.resolve())}
    return data, generated


def _plan(params: dict, data: dict, generated: bool) -> dict:
    """plan_dataset's plan, stamped with the digest of the data params it was made from."""
    from .fetch import plan_dataset

    plan = plan_dataset(data) | {"params_digest": data_params_digest(params)}
    return plan | {"source": f"generated ({GENERATED_MIRROR})"} if generated else plan


def data_params_digest(params: dict) -> str:
    """A digest of the fetch stage's params (no URL in the clear: a source may carry a password)."""
    return config_digest(stage_params(params, "fetch"))


def forget_stale_plan(params: dict) -> bool:
    """Remove SHARD_PLAN when it was made from other data params, or is unreadable; whether it was.

    For Snakemake, when it starts: the checkpoint fetch_plan takes its inputs as ancient
    (times alone, e.g. after restore_mtimes.py, must not rerun the fetch), so a plan
    that no longer fits the params is removed, and the checkpoint makes it again.
    """
    try:
        plan = json.loads(SHARD_PLAN.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        plan = {}
    if isinstance(plan, dict) and plan.get("params_digest") == data_params_digest(params):
        return False
    SHARD_PLAN.unlink(missing_ok=True)
    return True


def _refresh_json(path: Path, payload: dict) -> None:
    """Write `payload` to `path`, or only touch it when it already holds exactly that: its
    time then says it is newer than the stage's inputs, for Snakemake."""
    try:
        same = json.loads(path.read_text()) == payload
    except (OSError, ValueError):
        same = False
    if same:
        os.utime(path)
    else:
        write_json(path, payload)


def publish_shards(manifest: dict, store: Path, dest: Path) -> None:
    """Make `dest` hold exactly the manifest's shards, as hard links into `store`.

    Built beside `dest` under a temporary name and swapped in, so `dest` is never
    half-published. Where a hard link is impossible (another file system) the shard
    is copied.
    """
    store, dest = Path(store), Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        copied = 0
        for entry in manifest["files"]:
            source, target = store / entry["name"], tmp / entry["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copy2(source, target)
                copied += 1
        if copied:
            log.warning("%d shards copied into %s (hard links to %s not possible)", copied, dest, store)
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def index(params: dict) -> None:
    import json

    from .index import run_index

    p = stage_params(params, "index")
    manifest = json.loads(MANIFEST.read_text())
    table = run_index(DATA_ROOT, manifest, p["index"], p["data"]["version"], INDEX, LABEL_STATS)
    log.info("indexed %d records; subsets %s", len(table), table.groupby("subset").size().to_dict())


def train(params: dict, model: str) -> None:
    """Trains the model once per seed (train.seeds), then writes the seeds' summary and joint history.

    A finished seed keeps its checkpoint until every seed is done, so a rerun after a kill
    trains only the seeds not yet finished (the declared outputs are deleted before a rerun).
    The seeds are written under the work folder and renamed into place once all are done:
    the final name never holds some seeds of a run.
    """
    from .train import train_model, write_seed_summary

    p = stage_params(params, "train", model)
    version = p["data"]["version"]
    train_cfg = {k: v for k, v in p["train"].items() if k != "seeds"}
    runs, staged = [], TRAIN_WORK / model / "seeds"
    for number, seed in enumerate(p["train"]["seeds"], start=1):
        log.info("%s: seed %d (%d of %d)", model, seed, number, len(p["train"]["seeds"]))
        stats = train_model(model, p["models"][model], train_cfg | {"seed": seed}, version=version,
                            num_classes=NUM_CLASSES[version], data_root=DATA_ROOT, index_path=INDEX,
                            out_dir=staged / f"seed-{seed}", work_dir=TRAIN_WORK / model, keep_checkpoint=True)
        log.info("trained %s seed %d: %d parameters, epoch %d of %d kept, %.1f examples/s", model, seed,
                 stats["parameters"], stats["best_epoch"], stats["epochs"], stats["examples_per_second"])
        runs.append((seed, stats))
    shutil.rmtree(model_dir(model) / "seeds", ignore_errors=True)  # a stale one, when the orchestrator left it
    model_dir(model).mkdir(parents=True, exist_ok=True)
    os.replace(staged, model_dir(model) / "seeds")
    write_seed_summary(model, runs, model_dir(model))
    shutil.rmtree(TRAIN_WORK / model, ignore_errors=True)  # every seed is done; the outputs are the record


def evaluate(params: dict, model: str) -> None:
    from .evaluate import evaluate_model

    p = stage_params(params, "evaluate", model)
    version = p["data"]["version"]
    seeds = sorted(int(path.name.split("-")[1]) for path in (model_dir(model) / "seeds").glob("seed-*"))
    if not seeds:
        raise FileNotFoundError(f"{model_dir(model) / 'seeds'}: no trained seeds; run the train stage first")
    evaluate_model(model, p["models"][model], p["evaluate"], version=version, num_classes=NUM_CLASSES[version],
                   data_root=DATA_ROOT, index_path=INDEX,
                   model_paths={seed: seed_dir(model, seed) / "model.keras" for seed in seeds},
                   out_dir=eval_dir(model))


def report(params: dict) -> None:
    from .report import build_report

    p = stage_params(params, "report")
    build_report(p["run_models"], p["report"], Path("results"))



# ---------------------------------------------------------------- what each stage writes and reads

def outputs(stage: str, model: str | None = None) -> list[Path]:
    """The stage's declared outputs (dvc.yaml `outs`, the Snakemake rule's `output`)."""
    if stage == "generate":
        return [GENERATED_MIRROR]
    if stage == "fetch":
        return [DATA_ROOT, MANIFEST]
    if stage == "fetch_plan":
        return [SHARD_PLAN]
    if stage == "fetch_shard":  # `model` is the shard's name
        return [shard_record(model)]
    if stage == "index":
        return [INDEX, LABEL_STATS]
    if stage == "train":
        return [model_dir(model) / name for name in TRAIN_FILES]
    if stage == "evaluate":
        return [eval_dir(model) / name for name in EVAL_FILES]
    if stage == "bench":
        from .bench import FILES, OUT_DIR

        return [OUT_DIR / name for name in FILES]
    if stage == "report":
        return [REPORT, FIGURES, TABLES]
    raise ValueError(f"unknown stage {stage!r}")


def locks(stage: str, model: str | None, params: dict) -> tuple[list[str], list[str]]:
    """(resources read, resources written) by the stage, as lock names.

    generated: resources/generated; data: the shard store, resources/yt8m and the
    manifest; shard-VERSION-LEVEL-SPLIT-NAME: one shard in the store and its record
    (fetch_shard, holding data shared: shards are fetched side by side, never beside the
    fetch stage); index: results/index; model-M: results/models/M and its checkpoints;
    eval-M: results/eval/M; report: the report, its figures and tables.
    """
    if stage == "generate":
        return [], ["generated"]
    if stage == "fetch":
        return ["generated"], ["data"]
    if stage == "fetch_plan":
        return ["generated"], ["data"]
    if stage == "fetch_shard":  # `model` is the shard's name
        shard_record(model)  # a valid name
        return ["generated", "data"], [f"shard-{model.replace('/', '-')}"]
    if stage == "index":
        return ["data"], ["index"]
    if stage == "train":
        return ["data", "index"], [f"model-{model}"]
    if stage == "evaluate":
        return ["data", "index", f"model-{model}"], [f"eval-{model}"]
    if stage == "bench":  # bench: results/bench
        return ["data"], ["bench"]
    if stage == "report":
        models = params.get("run_models", [])
        return ["data", "index", "bench"] + [f"{kind}-{m}" for m in models for kind in ("model", "eval")], ["report"]
    raise ValueError(f"unknown stage {stage!r}")


def remove_outputs(stage: str, model: str | None = None) -> list[Path]:
    """Delete the stage's outputs (after it failed: none may be mistaken for a good one)."""
    removed = []
    for path in outputs(stage, model):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    return removed
