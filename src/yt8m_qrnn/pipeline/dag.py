"""The DAG, declared once: each stage's params, inputs, outputs, locks and code.

    generate -> fetch -> index -> train@model -> evaluate@model -> report;  bench -> report

dvc.yaml and the Snakemake rules (workflow/rules/*.smk) spell the same stages for their
orchestrators; tests/test_dag_agreement.py checks both against this declaration, and the
rules take their code inputs from it (`code_files`). The stage scripts
(workflow/scripts/<stage>.py) run `entry` through pipeline.cli, which takes the locks and
removes the outputs of a failed run. Paths hold `{item}` for the model (train, evaluate)
or the shard (fetch_shard), and `{run_models}` for one entry per model run.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]  # src/yt8m_qrnn
REPO_ROOT = SRC.parents[1]
SCHEMA = "workflow/schemas/params.schema.yaml"

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
BENCH_DIR = Path("results/bench")
BENCH_FILES = ("layer_grid.json", "pooling.json", "input_pipeline.json", "speedup.png", "summary.json")

# Code every stage runs: the command line, params loading and validation (which reads the
# model registry and the dataset's class counts), atomic I/O and locks.
PIPELINE_CODE = ("__init__.py", "pipeline", "models/__init__.py", "models/registry.py", "records/__init__.py",
                 "records/features.py")


@dataclass(frozen=True)
class Stage:
    """One stage. Args:
        name: the stage, its script (workflow/scripts/<name>.py) and its params stamp.
        entry: "module:function", called as function(params) or function(params, item).
        params: the params.yaml keys it reads ("models.{item}": its model's section).
        inputs: what it reads of other stages' outputs (as DVC declares them).
        outputs: what it writes.
        reads, writes: the named resources it locks shared and exclusive (pipeline.io.resource_locks).
        code: beyond PIPELINE_CODE, the package folders and files (under src/yt8m_qrnn) it runs.
        item: what `{item}` is: "model", "shard", or None.
        orchestrators: who runs it; fetch_plan and fetch_shard are Snakemake's fan-out of fetch.
    """
    name: str
    entry: str
    params: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    code: tuple[str, ...]
    item: str | None = None
    orchestrators: tuple[str, ...] = ("dvc", "snakemake")


_FETCH = dict(entry="yt8m_qrnn.stages.fetch.store:run", params=("data",), inputs=(str(GENERATED_MIRROR),),
              reads=("generated",), writes=("data",), code=("stages/__init__.py", "stages/fetch"))
_MODEL_CODE = ("data", "records", "models", "metrics/__init__.py", "metrics/official.py", "stages/__init__.py")

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("generate", "yt8m_qrnn.stages.generate:run", params=("generate",), inputs=(),
          outputs=(str(GENERATED_MIRROR),), reads=(), writes=("generated",),
          code=("records", "stages/__init__.py", "stages/generate.py", "stages/yt8m_label_shape.json")),
    Stage("fetch", outputs=(str(DATA_ROOT), str(MANIFEST)), **_FETCH),
    Stage("fetch_plan", **_FETCH | {"entry": "yt8m_qrnn.stages.fetch.store:plan"}, outputs=(str(SHARD_PLAN),),
          orchestrators=("snakemake",)),
    Stage("fetch_shard", **_FETCH | {"entry": "yt8m_qrnn.stages.fetch.store:shard", "reads": ("generated", "data"),
                                     "writes": ("shard-{item}",)},
          outputs=(str(SHARD_RECORDS / "{item}.json"),), item="shard", orchestrators=("snakemake",)),
    Stage("index", "yt8m_qrnn.stages.index:run", params=("data.version", "index"),
          inputs=(str(DATA_ROOT), str(MANIFEST)), outputs=(str(INDEX), str(LABEL_STATS)),
          reads=("data",), writes=("index",),
          code=("records", "data/__init__.py", "data/index_file.py", "stages/__init__.py", "stages/index.py")),
    Stage("train", "yt8m_qrnn.stages.train:run", params=("data.version", "models.{item}", "train"),
          inputs=(str(DATA_ROOT), str(INDEX)),
          outputs=("results/models/{item}/seeds", "results/models/{item}/train_stats.json",
                   "results/models/{item}/history.csv"),
          reads=("data", "index"), writes=("model-{item}",), code=_MODEL_CODE + ("stages/train.py",), item="model"),
    Stage("evaluate", "yt8m_qrnn.stages.evaluate:run",
          params=("data.version", "models.{item}", "train.backend", "evaluate"),
          inputs=(str(DATA_ROOT), str(INDEX), "results/models/{item}/seeds"),
          outputs=tuple(f"results/eval/{{item}}/{name}" for name in (
              "predictions", "eval_predictions.csv", "submission.csv", "metrics.json", "pr_curve.csv",
              "per_class_ap.csv")),
          reads=("data", "index", "model-{item}"), writes=("eval-{item}",),
          code=_MODEL_CODE + ("metrics/stats.py", "stages/evaluate.py"), item="model"),
    Stage("bench", "yt8m_qrnn.stages.bench:run", params=("bench",), inputs=(str(DATA_ROOT),),
          outputs=tuple(str(BENCH_DIR / name) for name in BENCH_FILES), reads=("data",), writes=("bench",),
          code=("records", "data", "models/qrnn.py", "stages/__init__.py", "stages/bench.py", "stages/generate.py",
                "stages/index.py", "stages/yt8m_label_shape.json")),
    Stage("report", "yt8m_qrnn.stages.report.build:run", params=("run_models", "report"),
          inputs=(str(LABEL_STATS), str(MANIFEST), "results/models", "results/eval", str(BENCH_DIR)),
          outputs=("results/report.md", "results/figures", "results/tables"),
          reads=("data", "index", "bench", "model-{run_models}", "eval-{run_models}"), writes=("report",),
          code=("metrics/__init__.py", "metrics/stats.py", "metrics/official.py", "stages/__init__.py",
                "stages/report")),
)}


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})") from None


def _expand(templates: tuple[str, ...], item: str | None, params: dict | None = None) -> list[str]:
    out = []
    for template in templates:
        if "{run_models}" in template:
            out += [template.replace("{run_models}", model) for model in (params or {}).get("run_models", [])]
        else:
            out.append(template.replace("{item}", item) if item is not None else template)
    return out


def stage_keys(name: str, item: str | None = None) -> list[str]:
    """The params.yaml keys the stage reads."""
    return _expand(stage(name).params, item)


def outputs(name: str, item: str | None = None) -> list[Path]:
    """The stage's declared outputs (dvc.yaml `outs`, the Snakemake rule's `output`)."""
    if name == "fetch_shard":
        shard_record(item)  # a valid name
    return [Path(path) for path in _expand(stage(name).outputs, item)]


def locks(name: str, item: str | None, params: dict) -> tuple[list[str], list[str]]:
    """(resources read, resources written) by the stage, as lock names.

    generated: resources/generated; data: the shard store, resources/yt8m and the
    manifest; shard-VERSION-LEVEL-SPLIT-NAME: one shard in the store and its record
    (fetch_shard, holding data shared: shards are fetched side by side, never beside the
    fetch stage); index: results/index; model-M: results/models/M and its checkpoints;
    eval-M: results/eval/M; bench: results/bench; report: the report, its figures and tables.
    """
    spec = stage(name)
    if name == "fetch_shard":
        shard_record(item)
        item = item.replace("/", "-")
    return _expand(spec.reads, item, params), _expand(spec.writes, item, params)


def code_paths(name: str) -> list[str]:
    """The stage's code, as declared (folders and files), relative to the repository."""
    declared = PIPELINE_CODE + stage(name).code
    folders = [path for path in declared if (SRC / path).is_dir()]
    inside_a_folder = {path for path in declared for folder in folders if path.startswith(folder + "/")}
    prefix = SRC.relative_to(REPO_ROOT)
    return [str(prefix / path) for path in declared if path not in inside_a_folder]


def code_files(name: str) -> list[str]:
    """The stage's code as files (folders expanded, caches left out), for Snakemake, whose
    inputs are files: a folder's time does not change when a file in it is edited."""
    files = []
    for path in code_paths(name):
        full = REPO_ROOT / path
        if full.is_dir():
            files += sorted(str(f.relative_to(REPO_ROOT)) for f in full.rglob("*")
                            if f.is_file() and "__pycache__" not in f.parts)
        else:
            files.append(path)
    return files


def shard_record(name: str) -> Path:
    """Where fetch_shard records shard `name` ("2/frame/train/train0000.tfrecord")."""
    if not name or not _SHARD_NAME.fullmatch(name):
        raise ValueError(f"invalid shard name {name!r} (expected VERSION/LEVEL/SPLIT/SPLITNNNN.tfrecord)")
    return SHARD_RECORDS / f"{name}.json"


def model_dir(model: str) -> Path:
    return Path("results/models") / model


def seed_dir(model: str, seed: int) -> Path:
    """One seed's model.keras, history.csv and train_stats.json."""
    return model_dir(model) / "seeds" / f"seed-{seed}"


def eval_dir(model: str) -> Path:
    return Path("results/eval") / model


def remove_outputs(name: str, item: str | None = None) -> list[Path]:
    """Delete the stage's outputs (after it failed: none may be mistaken for a good one)."""
    removed = []
    for path in outputs(name, item):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    return removed
