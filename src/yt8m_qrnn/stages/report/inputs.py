"""What the report reads: each model's results, the data manifest, the papers' numbers.

Every reader raises ReportError naming the file when an input is missing or malformed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from yt8m_qrnn.pipeline.params import params_stamp_path
from yt8m_qrnn.stages.report import comparison
from yt8m_qrnn.stages.report.formatting import fmt

REFERENCE = Path(__file__).with_name("paper_numbers.yaml")
TRAIN_KEYS = ("kind", "level", "parameters", "model_size_mb", "examples_per_second", "wall_seconds", "train_videos",
              "epochs")
EVAL_KEYS = ("gap", "map", "map_present", "hit_at_one", "perr", "num_videos")


class ReportError(ValueError):
    """An input of the report is missing or malformed; the message names the file."""


@dataclass
class ModelRun:
    name: str
    stats: dict
    metrics: dict
    history: pd.DataFrame
    per_class: pd.DataFrame | None = None
    pr_curve: pd.DataFrame | None = None
    scores: comparison.ModelScores | None = None
    intervals: dict | None = None  # metric -> comparison.Interval

    def metric(self, key: str, digits: int = 3) -> str:
        """The metric with its intervals (mean ± seeds [videos]), or the plain value when none were computed."""
        value = fmt(self.metrics[key], digits)  # the mean over seeds, as evaluate wrote it
        if self.intervals and key in self.intervals:
            return f"{value} {self.intervals[key].spread(digits)}"
        return value

    @property
    def kind(self) -> str:
        return self.stats["kind"]

    @property
    def level(self) -> str:
        return self.stats["level"]


# ---------------------------------------------------------------- the papers' numbers

def load_reference(path: Path = REFERENCE) -> dict:
    reference = yaml.safe_load(Path(path).read_text())
    for key in ("sources", "table1", "table2", "challenge_model_size_limit_mb"):
        if key not in reference:
            raise ReportError(f"{path}: missing '{key}'")
    for table, keys in (("table1", ("model", "level", "perr", "hit_at_one", "source")),
                        ("table2", ("model", "gap", "models_in_ensemble", "source"))):
        for row in reference[table]:
            missing = [k for k in keys if k not in row]
            if missing:
                raise ReportError(f"{path}: {table} row {row.get('model', row)!r} lacks {', '.join(missing)}")
            if row["source"] not in reference["sources"]:
                raise ReportError(f"{path}: {table} row {row['model']!r}: unknown source {row['source']!r}")
    return reference


def source_short(reference: dict, key: str) -> str:
    source = reference["sources"][key]
    return source["short"] if isinstance(source, dict) else key


def source_cite(reference: dict, key: str) -> str:
    source = reference["sources"][key]
    return source.get("cite", str(source)) if isinstance(source, dict) else str(source)


# ---------------------------------------------------------------- files

def read_json(path: Path, what: str) -> dict:
    """The JSON file; `what` says who writes it, for the error."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: not found ({what})") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON: {err}") from None


def read_csv(path: Path, what: str, columns: tuple[str, ...], required: bool = True) -> pd.DataFrame | None:
    if not path.exists():
        if required:
            raise ReportError(f"{path}: not found ({what})")
        return None
    frame = pd.read_csv(path, dtype={"name": str}, keep_default_na=False)  # a label may be named "NA"
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def _require(record: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise ReportError(f"{path}: missing {', '.join(missing)}")


# ---------------------------------------------------------------- the upstream stages' results

def load_model_run(results: Path, name: str) -> ModelRun:
    model_dir, eval_dir = results / "models" / name, results / "eval" / name
    paths = {"stats": model_dir / "train_stats.json", "history": model_dir / "history.csv",
             "metrics": eval_dir / "metrics.json", "per_class": eval_dir / "per_class_ap.csv",
             "pr_curve": eval_dir / "pr_curve.csv"}
    stats = read_json(paths["stats"], f"train@{name} writes it")
    _require(stats, TRAIN_KEYS, paths["stats"])
    metrics = read_json(paths["metrics"], f"evaluate@{name} writes it")
    _require(metrics, EVAL_KEYS, paths["metrics"])
    history = read_csv(paths["history"], f"train@{name} writes it", ("epoch", "loss"))
    per_class = read_csv(paths["per_class"], f"evaluate@{name} writes it",
                         ("class", "name", "eval_positives", "train_positives", "ap"))
    pr_curve = read_csv(paths["pr_curve"], f"evaluate@{name} writes it", ("precision", "recall"), required=False)
    stamp = stamp_path(results, "evaluate", name)
    if metrics.get("top_k") is None and stamp.exists():  # metrics.json written before it recorded top_k
        metrics["top_k"] = json.loads(stamp.read_text()).get("evaluate", {}).get("top_k")
    scores = comparison.load_scores(results, name, stats["kind"], stats["level"])
    return ModelRun(name, stats, metrics, history, per_class, pr_curve, scores)


def load_manifest(results: Path) -> dict:
    return read_json(manifest_path(results), "the fetch stage writes it")


def manifest_path(results: Path) -> Path:
    return results / "data" / "manifest.json"


def stamp_path(results: Path, stage: str, model: str | None = None) -> Path:
    """The params stamp the stage wrote under `results`."""
    return results / "params" / params_stamp_path(stage, model).name


def is_generated(manifest: dict) -> bool:
    return manifest.get("dataset") == "generated" or str(manifest.get("source", "")).startswith("generated")


def index_params(results: Path) -> dict:
    """The index stage's `index:` params, from its stamp; empty when it is missing."""
    stamp = stamp_path(results, "index")
    return json.loads(stamp.read_text()).get("index", {}) if stamp.exists() else {}


# ---------------------------------------------------------------- across the runs

def top_k_suffix(runs: list[ModelRun]) -> str:
    """The k of GAP@k as "@20", "@10/20" when the runs differ, "" when none recorded it."""
    values = {r.metrics.get("top_k") for r in runs} - {None}
    return "@" + "/".join(str(v) for v in sorted(values)) if values else ""


def class_priors(runs: list[ModelRun]) -> dict[str, dict]:
    """The class-prior baseline of each level (every model of a level sees the same videos)."""
    priors = {}
    for run in runs:
        if run.metrics.get("class_prior") and run.level not in priors:
            priors[run.level] = run.metrics["class_prior"]
    return priors
