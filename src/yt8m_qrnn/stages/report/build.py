"""results/report.md: the paper's tables rebuilt from this run, figures, provenance.

Six parts: (1) Table 1, PERR and Hit@1 beside the paper's values; (2) Table 2, GAP
beside the paper, the other QRNN study and the 2018 Kaggle top three; (3) a row per
model with MAP, size, throughput and data; (4) figures (PNG, relative links);
(5) provenance: code, inputs' hashes, each stage's params, data manifest, software,
hardware; (6) a banner whenever the numbers come from the generated data.

The reference numbers live only in paper_numbers.yaml. The tables are also written
to results/tables/ (CSV, and HTML for `snakemake --report`).
"""
from __future__ import annotations

import datetime
import hashlib
import html
import json
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from yt8m_qrnn.pipeline.io import atomic_path, write_text
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.pipeline.provenance import cpu_model
from yt8m_qrnn.stages.report import comparison

REFERENCE = Path(__file__).with_name("paper_numbers.yaml")
GENERATED_BANNER = (
    "> **Generated data.** These numbers come from the small generated dataset embedded in this\n"
    "> repository (YouTube-8M format, planted signal). They check that the pipeline trains and\n"
    "> evaluates correctly; they are **not comparable with the paper**. To reproduce the paper, run on\n"
    "> the real YouTube-8M data (README: \"Real data\").\n"
)
GENERATED_TAG = "generated data: not comparable with the paper"
# The report stage's inputs, as dvc.yaml declares them (tests/test_report.py checks):
# under `results`, and in the repository.
RESULT_INPUTS = ("index/label_stats.json", "data/manifest.json", "models", "eval", "bench")
CODE_INPUTS = ("workflow/scripts/report.py", "workflow/schemas/params.schema.yaml",
               *(f"src/yt8m_qrnn/{name}" for name in ("__init__.py", "cli.py", "comparison.py", "config.py", "io.py",
                                                      "machine.py", "metrics.py", "paper_numbers.yaml", "report.py",
                                                      "stages.py", "stats.py")))
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pandas", "pyarrow", "matplotlib", "snakemake", "dvc",
            "gcsfs", "jsonschema", "pyyaml", "yt8m-qrnn")
TRAIN_KEYS = ("kind", "level", "parameters", "model_size_mb", "examples_per_second", "wall_seconds", "train_videos",
              "epochs")
EVAL_KEYS = ("gap", "map", "map_present", "hit_at_one", "perr", "num_videos")
METRICS = (("gap", "GAP"), ("map", "MAP"), ("hit_at_one", "Hit@1"), ("perr", "PERR"))
NA = "n/a"
# Pipeline outputs, left out of the git "dirty" check: it is about the code and params that ran.
NOT_CODE = ("results", "dvc.lock", "report.html")
REHASH_LIMIT_BYTES = 64 * 2**20  # dvc.lock entries (files) up to this size are re-hashed for the check


class ReportError(ValueError):
    """An input of the report is missing or malformed; the message names the file."""


# ---------------------------------------------------------------- inputs

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


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: not found ({what})") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON: {err}") from None


def _read_csv(path: Path, what: str, columns: tuple[str, ...], required: bool = True) -> pd.DataFrame | None:
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


def load_model_run(results: Path, name: str) -> ModelRun:
    model_dir, eval_dir = results / "models" / name, results / "eval" / name
    paths = {"stats": model_dir / "train_stats.json", "history": model_dir / "history.csv",
             "metrics": eval_dir / "metrics.json", "per_class": eval_dir / "per_class_ap.csv",
             "pr_curve": eval_dir / "pr_curve.csv"}
    stats = _read_json(paths["stats"], f"train@{name} writes it")
    _require(stats, TRAIN_KEYS, paths["stats"])
    metrics = _read_json(paths["metrics"], f"evaluate@{name} writes it")
    _require(metrics, EVAL_KEYS, paths["metrics"])
    history = _read_csv(paths["history"], f"train@{name} writes it", ("epoch", "loss"))
    per_class = _read_csv(paths["per_class"], f"evaluate@{name} writes it",
                          ("class", "name", "eval_positives", "train_positives", "ap"))
    pr_curve = _read_csv(paths["pr_curve"], f"evaluate@{name} writes it", ("precision", "recall"), required=False)
    stamp = results / "params" / f"evaluate-{name}.json"
    if metrics.get("top_k") is None and stamp.exists():  # metrics.json written before it recorded top_k
        metrics["top_k"] = json.loads(stamp.read_text()).get("evaluate", {}).get("top_k")
    scores = comparison.load_scores(results, name, stats["kind"], stats["level"])
    return ModelRun(name, stats, metrics, history, per_class, pr_curve, scores)


def is_generated(manifest: dict) -> bool:
    return manifest.get("dataset") == "generated" or str(manifest.get("source", "")).startswith("generated")


# ---------------------------------------------------------------- formatting

def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def fmt(value, digits: int = 3) -> str:
    return NA if _missing(value) else f"{float(value):.{digits}f}"


def fmt_seconds(seconds) -> str:
    if _missing(seconds):
        return NA
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_rate(rate) -> str:
    return NA if _missing(rate) else (f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}")


def fmt_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 2**10 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 2**10
    return f"{size} B"


def _cell(value) -> str:
    text = NA if _missing(value) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _source_short(reference: dict, key: str) -> str:
    source = reference["sources"][key]
    return source["short"] if isinstance(source, dict) else key


def _source_cite(reference: dict, key: str) -> str:
    source = reference["sources"][key]
    return source.get("cite", str(source)) if isinstance(source, dict) else str(source)


def _top_k(runs: list[ModelRun]) -> str:
    values = {r.metrics.get("top_k") for r in runs} - {None}
    return "@" + "/".join(str(v) for v in sorted(values)) if values else ""


def _class_priors(runs: list[ModelRun]) -> dict[str, dict]:
    """The class-prior baseline of each level (every model of a level sees the same videos)."""
    priors = {}
    for run in runs:
        if run.metrics.get("class_prior") and run.level not in priors:
            priors[run.level] = run.metrics["class_prior"]
    return priors


# ---------------------------------------------------------------- tables

def table1(runs: list[ModelRun], reference: dict) -> pd.DataFrame:
    """Level, Model, PERR, Hit@1: each paper row, then this run's models of its kind."""
    rows, placed = [], set()

    def own(run):
        return {"Level": run.level, "Model": f"{run.name} (this run, {_seeds_text(run)})",
                "PERR": run.metric("perr"), "Hit@1": run.metric("hit_at_one"), "Source": "this run"}

    for ref in reference["table1"]:
        quoted = f", quoted as {ref['quoted']}" if ref.get("quoted") else ""
        rows.append({"Level": ref["level"], "Model": ref["model"], "PERR": fmt(ref["perr"]),
                     "Hit@1": fmt(ref["hit_at_one"]), "Source": f"{_source_short(reference, ref['source'])}{quoted}"})
        for run in runs:
            if ref.get("kind") is not None and run.kind == ref["kind"] and run.name not in placed:
                rows.append(own(run))
                placed.add(run.name)
    rows += [own(run) for run in runs if run.name not in placed]
    for level, prior in _class_priors(runs).items():
        rows.append({"Level": level, "Model": "class prior (this run)", "PERR": fmt(prior.get("perr")),
                     "Hit@1": fmt(prior.get("hit_at_one")), "Source": "this run (baseline)"})
    return pd.DataFrame(rows, columns=["Level", "Model", "PERR", "Hit@1", "Source"])


def _seeds_text(run: ModelRun) -> str:
    count = len(run.stats.get("seeds", [])) or 1
    return f"{count} seeds" if count > 1 else "1 seed"


def table2(runs: list[ModelRun], reference: dict, ensembles: list = ()) -> pd.DataFrame:
    """GAP of each model, of the ensembles (name, models, intervals), the class priors and the references."""
    at = _top_k(runs)
    gap = f"GAP{at}"
    rows = [{"Model": f"{run.name} (this run, {run.level} level, {_seeds_text(run)})", gap: run.metric("gap", 4),
             "Models": 1, "Source": "this run"} for run in runs]
    rows += [{"Model": f"{name} (this run)", gap: intervals["gap"].text(4), "Models": count,
              "Source": "this run (ensemble)"} for name, count, intervals in ensembles]
    rows += [{"Model": f"class prior (this run, {level} level)", gap: fmt(prior.get("gap"), 4), "Models": "baseline",
              "Source": "this run (baseline)"} for level, prior in _class_priors(runs).items()]
    rows += [{"Model": ref["model"], gap: f"{ref['gap']:g}", "Models": ref["models_in_ensemble"],
              "Source": _source_short(reference, ref["source"])} for ref in reference["table2"]]
    return pd.DataFrame(rows, columns=["Model", gap, "Models", "Source"])


def data_label(manifest: dict) -> str:
    shards = len(manifest.get("files", []))
    if is_generated(manifest):
        return f"generated, {shards} shards"
    return f"{manifest.get('source', '?')} (version {manifest.get('version', '?')}), {shards} shards"


def models_table(runs: list[ModelRun], reference: dict, manifest: dict) -> pd.DataFrame:
    limit = float(reference["challenge_model_size_limit_mb"])
    limit_label = reference.get("challenge_model_size_limit_label", f"{limit:g} MB")
    rows = []
    for run in runs:
        s, m = run.stats, run.metrics
        size = float(s["model_size_mb"])
        rows.append({
            "Model": run.name, "Kind": run.kind, "Level": run.level,
            "MAP (2018: all classes)": run.metric("map", 4),
            "MAP (2019: classes present)": fmt(m["map_present"], 4),
            "Parameters": _parameters(s),
            "Size (MB)": f"{size:.1f}",
            f"Of the {limit_label} limit": f"{100 * size / limit:.1f} % ({'within' if size <= limit else 'OVER'})",
            "Train examples/s": fmt_rate(s["examples_per_second"]),
            "After epoch 1": _after_first_epoch(s),
            "Train wall time": fmt_seconds(s["wall_seconds"]),
            "Trained on": _trained_on(s),
            "Epoch kept (per seed)": _epochs_kept(s),
            "Train videos": f"{int(s['train_videos']):,}",
            "Eval videos": f"{int(m['num_videos']):,}",
            "Data": data_label(manifest),
        })
    return pd.DataFrame(rows)


def _parameters(stats: dict) -> str:
    text = f"{int(stats['parameters']):,}"
    total = stats.get("total_parameters")
    return text if total in (None, stats["parameters"]) else f"{text} (total {int(total):,})"


def _after_first_epoch(stats: dict) -> str:
    rate = stats.get("examples_per_second_after_first_epoch")
    if rate:
        return fmt_rate(rate)
    return f"{NA} (one epoch)" if max(_as_list(stats["epochs"])) <= 1 else f"{NA} (not recorded)"


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def determinism_lines(runs: list[ModelRun]) -> list[str]:
    """How the training runs were made repeatable, as their train_stats.json recorded it."""
    models_by_settings: dict[str, list[str]] = {}
    for run in runs:
        models_by_settings.setdefault(json.dumps(run.stats.get("determinism"), sort_keys=True), []).append(run.name)
    if list(models_by_settings) == ["null"]:
        return ["- determinism: not recorded by these training runs"]
    lines = []
    for text, names in sorted(models_by_settings.items()):
        settings, users = json.loads(text), ", ".join(names)
        if settings is None:
            lines.append(f"- determinism ({users}): not recorded")
            continue
        lines.append(
            f"- determinism ({users}): seeds set by `{settings['seeding']}` (each of `train.seeds`), TensorFlow op "
            f"determinism {'on' if settings['tf_op_determinism'] else 'off'}, intra-op threads "
            f"{settings['intra_op_threads']}, oneDNN {settings['onednn']}: two clean runs on one machine give "
            "the same weights and predictions to the last bit (`tests/test_determinism.py`)")
    return lines


def _epochs_kept(stats: dict) -> str:
    """'12, 9, 11 of 120 (validation GAP)', or the epochs run when no validation subset chose them."""
    kept = _as_list(stats.get("best_epochs", stats["epochs"]))
    cap = stats.get("max_epochs", max(_as_list(stats["epochs"])))
    how = "validation GAP" if stats.get("validation_videos") else "no validation subset: the last"
    at_cap = " (the cap: the budget may bind)" if any(int(e) >= int(cap) for e in kept) and stats.get(
        "validation_videos") else ""
    return f"{', '.join(str(int(e)) for e in kept)} of {cap} ({how}){at_cap}"


def _trained_on(stats: dict) -> str:
    devices = stats.get("devices")
    if isinstance(devices, list):
        devices = ", ".join("default device" if str(d) == "default" else str(d) for d in devices)
    parts = [str(p) for p in (devices, stats.get("precision")) if p]
    if stats.get("replicas") and int(stats["replicas"]) > 1:
        parts.append(f"{stats['replicas']} replicas")
    return "; ".join(parts) if parts else "not recorded"


def steady_rate(stats: dict) -> float:
    """Training examples/s without the first epoch (graph tracing) when recorded, else over every epoch."""
    return float(stats.get("examples_per_second_after_first_epoch") or stats["examples_per_second"])


def per_class_table(runs: list[ModelRun], min_positives: int, top: int) -> pd.DataFrame:
    """The `top` classes with the most eval positives: name, frequencies, each model's AP."""
    frames = [r.per_class.assign(model=r.name) for r in runs if r.per_class is not None and len(r.per_class)]
    if not frames:
        return pd.DataFrame(columns=["Class", "Name", "Eval positives", "Train positives"])
    joined = pd.concat(frames, ignore_index=True)
    joined = joined[joined["eval_positives"] >= max(1, min_positives)]
    info = joined.groupby("class").agg(name=("name", "first"), eval_positives=("eval_positives", "max"),
                                       train_positives=("train_positives", "max"))
    info = info.sort_values(["eval_positives", "train_positives"], ascending=False, kind="stable").head(top)
    ap = joined.pivot_table(index="class", columns="model", values="ap", aggfunc="first")
    rows = []
    for cls, row in info.iterrows():
        entry = {"Class": int(cls), "Name": row["name"], "Eval positives": int(row["eval_positives"]),
                 "Train positives": int(row["train_positives"])}
        for run in runs:
            value = ap.at[cls, run.name] if run.name in ap.columns and cls in ap.index else None
            entry[f"AP {run.name}"] = fmt(value, 3)
        rows.append(entry)
    return pd.DataFrame(rows)


def write_tables(tables: dict[str, tuple[str, pd.DataFrame]], folder: Path, generated: bool) -> None:
    """Each table as CSV and as a small HTML page (shown inline by `snakemake --report`)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for name, (title, frame) in tables.items():
        shown = frame.map(lambda v: NA if _missing(v) else v) if len(frame) else frame
        for suffix in (".csv", ".html"):
            wanted.add(name + suffix)
        with atomic_path(folder / f"{name}.csv") as tmp:
            shown.to_csv(tmp, index=False)
        banner = f"<p><strong>{html.escape(GENERATED_TAG.capitalize())}.</strong></p>" if generated else ""
        page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
                "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
                "td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}</style></head><body>"
                f"<h3>{html.escape(title)}</h3>{banner}{shown.to_html(index=False, escape=True, na_rep=NA)}"
                "</body></html>\n")
        write_text(folder / f"{name}.html", page)
    _remove_stale(folder, wanted, ("*.csv", "*.html"))


def _remove_stale(folder: Path, wanted: set[str], patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.name not in wanted:
                path.unlink()


# ---------------------------------------------------------------- figures

@dataclass
class Figure:
    title: str
    path: str  # relative to the report
    caption: str


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(runs: list[ModelRun]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan"]
    return {run.name: palette[i % len(palette)] for i, run in enumerate(runs)}


def _finish(fig, path: Path, title: str, generated: bool) -> None:
    fig.suptitle(title + (f"\n({GENERATED_TAG})" if generated else ""), fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)


def _seed_histories(run: ModelRun):
    """(seed, that seed's rows of history.csv), in seed order; one unnamed seed for an old history."""
    h = run.history
    if "seed" not in h:
        yield None, h
        return
    for seed, rows in h.groupby("seed", sort=True):
        yield seed, rows


def plot_training_curves(runs, folder: Path, generated: bool) -> Figure:
    plt = _pyplot()
    colors = _colors(runs)
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        label = run.name if run.name == run.kind else f"{run.name} ({run.kind})"
        kept = dict(zip(run.stats.get("seeds", []), run.stats.get("best_epochs", [])))
        for number, (seed, h) in enumerate(_seed_histories(run)):
            name = label if number == 0 else None
            loss_ax.plot(h["epoch"], h["loss"], color=colors[run.name], alpha=0.8, label=name)
            if "val_gap" in h and pd.to_numeric(h["val_gap"], errors="coerce").notna().any():
                gap = pd.to_numeric(h["val_gap"], errors="coerce")
                val_ax.plot(h["epoch"], gap, color=colors[run.name], alpha=0.8, label=name)
                best = kept.get(seed)
                if best is not None and (h["epoch"] == best).any():
                    val_ax.plot([best], gap[h["epoch"] == best], marker="*", markersize=11, color=colors[run.name])
    loss_ax.set(xlabel="epoch", ylabel="training loss (starter cross-entropy, log scale)", yscale="log",
                title="Training loss per epoch (one line per seed)")
    val_ax.set(xlabel="epoch", ylabel="GAP@20 on the validation videos",
               title="Validation GAP (star: the epoch kept)")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.legend(fontsize=8)
    if val_ax.lines:
        val_ax.legend(fontsize=8)
    _finish(fig, folder / "training_curves.png", "Training and validation curves", generated)
    return Figure("Training and validation curves", "figures/training_curves.png",
                  "Left: training loss per epoch (mean over the epoch's batches). Right: the official GAP@20 on the "
                  "validation videos (training videos held out by hash of id) after every epoch; each seed keeps the "
                  "weights of its best epoch (star) and stops after `train.patience` epochs without a better one. "
                  "From each model's history.csv.")


def plot_metrics_vs_paper(runs, reference, folder: Path, generated: bool) -> Figure:
    plt = _pyplot()
    priors = _class_priors(runs)
    paper = {"perr": {}, "hit_at_one": {}, "gap": {}}
    for ref in reference["table1"]:
        if ref.get("kind") is not None:
            paper["perr"].setdefault(ref["kind"], ref["perr"])
            paper["hit_at_one"].setdefault(ref["kind"], ref["hit_at_one"])
    for ref in reference["table2"]:
        if ref.get("kind") is not None:
            paper["gap"].setdefault(ref["kind"], ref["gap"])
    context = {}  # the best GAP of each source without a model kind (other study, Kaggle)
    for ref in reference["table2"]:
        if ref.get("kind") is None and ref["gap"] > context.get(ref["source"], (None, -1))[1]:
            context[ref["source"]] = (ref["model"], ref["gap"])

    names = [r.name for r in runs] + [f"class prior\n({level})" for level in priors]
    fig, axes = plt.subplots(2, 2, figsize=(max(10, 1.5 * len(names)), 8.5))
    width = 0.4
    xs = list(range(len(names)))
    for ax, (key, label) in zip(axes.ravel(), METRICS):
        ours = [r.metrics[key] for r in runs] + [p.get(key, 0.0) for p in priors.values()]
        colors = ["tab:blue"] * len(runs) + ["tab:gray"] * len(priors)
        if key == "map":  # no paper value: MAP over every class (2018) beside MAP over classes present (2019)
            second = [r.metrics.get("map_present") for r in runs] + [p.get("map_present") for p in priors.values()]
            second_label, second_style = "MAP over classes present (2019)", {"color": colors, "hatch": "//",
                                                                             "alpha": 0.5}
            first_label = "MAP over every class (2018)"
        else:
            second = [paper.get(key, {}).get(r.kind) for r in runs] + [None] * len(priors)
            second_label, second_style = "paper (same model kind)", {"color": "tab:orange"}
            first_label = "this run"
        ax.bar([x - width / 2 for x in xs], ours, width, color=colors, label=first_label)
        pairs = [(x + width / 2, y, i) for i, (x, y) in enumerate(zip(xs, second)) if y is not None]
        if pairs:
            style = dict(second_style)
            if isinstance(style["color"], list):
                style["color"] = [style["color"][i] for _, _, i in pairs]
            ax.bar([x for x, _, _ in pairs], [y for _, y, _ in pairs], width, label=second_label, **style)
        for x, y in zip(xs, ours):
            ax.text(x - width / 2, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        for x, y, _ in pairs:
            ax.text(x, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        if key == "gap":
            styles = iter(["--", ":", "-."])
            for model, value in context.values():
                ax.axhline(value, color="black", linestyle=next(styles, "--"), linewidth=1,
                           label=f"{model} ({value:g})")
        title = {"gap": f"GAP{_top_k(runs)}", "map": "MAP (no paper value)"}.get(key, label)
        ax.set(title=title, ylim=(0, 1.32), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_xticks(xs, names, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    _finish(fig, folder / "metrics_vs_paper.png", "Each metric against the papers' numbers", generated)
    return Figure("Metrics against the paper", "figures/metrics_vs_paper.png",
                  "This run's models (blue) and class-prior baseline (gray) beside the paper's value for the same "
                  "model kind (orange); on GAP, the other QRNN study and the best Kaggle 2018 entry as lines. "
                  "The papers give no MAP: that panel shows MAP over every class (2018) and over the classes "
                  "present (2019, hatched).")


def plot_per_class(runs, folder: Path, min_positives: int, generated: bool) -> Figure:
    import numpy as np

    plt = _pyplot()
    colors = _colors(runs)
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False, sharey=True)
    for ax, run in zip(axes.ravel(), runs):
        table = run.per_class[run.per_class["eval_positives"] >= max(1, min_positives)]
        x = table["train_positives"].to_numpy(float)
        y = table["ap"].to_numpy(float)
        ax.scatter(x, y, s=10 if len(table) < 500 else 3, alpha=0.6 if len(table) < 500 else 0.3,
                   color=colors[run.name], label="one class")
        if len(table) and x.max() > 0:
            edges = np.unique(np.concatenate([[0], np.geomspace(1, x.max() + 1, 9)]))
            which = np.digitize(x, edges)
            centres, means = [], []
            for b in np.unique(which):
                mask = which == b
                centres.append(np.median(x[mask]))
                means.append(y[mask].mean())
            ax.plot(centres, means, color="black", marker="s", markersize=3, linewidth=1, label="binned mean")
        ax.set_xscale("symlog", linthresh=1)
        ax.set(title=f"{run.name}: MAP over {len(table)} classes {fmt(y.mean() if len(y) else None, 3)}",
               xlabel="training videos with the class", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("average precision")
    for ax in axes.ravel()[len(runs):]:
        ax.set_visible(False)
    _finish(fig, folder / "per_class_ap.png", "Per-class AP against class frequency", generated)
    return Figure("Per-class AP against class frequency", "figures/per_class_ap.png",
                  f"Each class with at least {max(1, min_positives)} positive(s) in the eval subset: its AP against "
                  "the number of training videos that carry it (symmetric log scale), with the mean AP per "
                  "frequency bin.")


def plot_throughput(runs, folder: Path, generated: bool) -> Figure:
    plt = _pyplot()
    colors = _colors(runs)
    chosen = [r for r in runs if r.kind in ("qrnn", "lstm")]
    note = ""
    if not chosen:
        chosen, note = runs, " (no QRNN or LSTM model in this run: every model shown)"
    elif not any(r.kind == "lstm" for r in chosen):
        note = " (no LSTM model in this run)"
    elif not any(r.kind == "qrnn" for r in chosen):
        note = " (no QRNN model in this run)"
    fig, (bar_ax, epoch_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    mean_rates = [float(r.stats["examples_per_second"]) for r in chosen]
    steady = [r.stats.get("examples_per_second_after_first_epoch") for r in chosen]
    labels = [f"{r.name}" + ("" if r.name == r.kind else f" ({r.kind})") + f"\n{int(r.stats['parameters']):,} params"
              for r in chosen]
    xs = list(range(len(chosen)))
    has_steady = any(steady)
    width = 0.4 if has_steady else 0.8
    bar_ax.bar([x - width / 2 if has_steady else x for x in xs], mean_rates, width,
               color=[colors[r.name] for r in chosen], alpha=0.5 if has_steady else 1.0, label="every epoch")
    for x, rate in zip(xs, mean_rates):
        bar_ax.text(x - width / 2 if has_steady else x, rate, fmt_rate(rate), ha="center", va="bottom", fontsize=8)
    if has_steady:
        pairs = [(x + width / 2, float(v), colors[r.name]) for x, v, r in zip(xs, steady, chosen) if v]
        bar_ax.bar([p[0] for p in pairs], [p[1] for p in pairs], width, color=[p[2] for p in pairs],
                   label="after the first epoch")
        for x, rate, _ in pairs:
            bar_ax.text(x, rate, fmt_rate(rate), ha="center", va="bottom", fontsize=8)
        from matplotlib.patches import Patch

        bar_ax.legend(handles=[Patch(color="gray", alpha=0.5, label="over every epoch"),
                               Patch(color="gray", label="after the first epoch")], fontsize=8)
    bar_ax.set_xticks(xs, labels, fontsize=8)
    bar_ax.set(ylabel="training examples per second", title="Mean throughput")
    bar_ax.grid(axis="y", alpha=0.3)
    for run in chosen:
        _, h = next(_seed_histories(run))  # the first seed
        if "seconds" in h and len(h):
            per_epoch = float(run.stats["train_videos"]) / h["seconds"].astype(float).clip(lower=1e-9)
            epoch_ax.plot(h["epoch"], per_epoch, marker="o", color=colors[run.name], label=run.name)
    epoch_ax.set(xlabel="epoch", ylabel="training examples per second",
                 title="Per epoch (the first includes graph tracing)")
    epoch_ax.grid(alpha=0.3)
    epoch_ax.xaxis.get_major_locator().set_params(integer=True)
    if epoch_ax.lines:
        epoch_ax.legend(fontsize=8)
    qrnn = [steady_rate(r.stats) for r in chosen if r.kind == "qrnn"]
    lstm = [steady_rate(r.stats) for r in chosen if r.kind == "lstm"]
    ratio = f":\nthe fastest QRNN trains {max(qrnn) / max(lstm):.2f}x as fast as the fastest LSTM" \
        if qrnn and lstm and max(lstm) > 0 else ""
    _finish(fig, folder / "throughput.png", f"QRNN vs LSTM training throughput{ratio}{note}", generated)
    return Figure("QRNN vs LSTM training throughput", "figures/throughput.png",
                  "Training examples per second of the QRNN and LSTM models (train_stats.json): over every epoch "
                  "and, where recorded, after the first (which includes graph tracing; the ratio uses it); right, "
                  "per epoch (training videos / epoch seconds, history.csv)." + note)


def plot_pr_curves(runs, folder: Path, generated: bool) -> Figure | None:
    with_curves = [r for r in runs if r.pr_curve is not None and len(r.pr_curve)]
    if not with_curves:
        return None
    plt = _pyplot()
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    for run in with_curves:
        curve = run.pr_curve.sort_values("recall", kind="stable")
        ax.plot(curve["recall"], curve["precision"], color=colors[run.name], label=run.name)
    ax.set(xlabel="recall (of all positives)", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _finish(fig, folder / "pr_curves.png", f"Precision-recall over the pooled top{_top_k(runs)[1:] or '-k'} pairs",
            generated)
    return Figure("Precision-recall curves", "figures/pr_curves.png",
                  "Global precision-recall curves over each model's pooled top-k (score, label) pairs "
                  "(pr_curve.csv); recall is out of every ground-truth label, as in GAP.")


def plot_figures(runs, reference, results: Path, report_cfg: dict, generated: bool) -> list[Figure]:
    folder = results / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    min_positives = int(report_cfg.get("per_class_min_positives", 1))
    figures = [
        plot_training_curves(runs, folder, generated),
        plot_metrics_vs_paper(runs, reference, folder, generated),
        plot_per_class(runs, folder, min_positives, generated),
        plot_throughput(runs, folder, generated),
        plot_pr_curves(runs, folder, generated),
    ]
    figures = [f for f in figures if f is not None]
    _remove_stale(folder, {Path(f.path).name for f in figures}, ("*.png",))
    return figures


# ---------------------------------------------------------------- QRNN speed (the bench stage)

BENCH_RUN_HINT = ("`snakemake --cores all results/bench/summary.json` or `dvc repro bench` (or "
                  "`python workflow/scripts/bench.py`); `bench.grid: paper` and `bench.shape: yt8m` in params.yaml "
                  "select the Figure 4 grid of the QRNN paper and the YouTube-8M shape")


def _rates(read: dict) -> dict:
    return {"Videos/s": fmt_rate(read["videos_per_s"]), "MB/s": fmt_rate(read["mb_per_s"]),
            "Frames/s": fmt_rate(read["frames_per_s"])}


def pipeline_lines(pipeline: dict) -> list[str]:
    """The input pipeline measurements (yt8m_qrnn.stages.bench's input_pipeline.json): a table per set of shards."""
    lines, target = [], pipeline["target_run"]
    for name, run in sorted(pipeline["runs"].items(), key=lambda item: item[0] != target):  # the target's first
        raw, stream = run["raw"], run["pipeline"]
        lines += [
            f"{'Where the target is checked: ' if name == target else ''}{run['videos']:,} videos "
            f"({run['frames']:,} frames, {run['mean_frames']:.0f} per video on average, {run['bytes'] / 1e6:.1f} MB) "
            f"read from {len(run['files'])} frame-level shard(s) in {run['epochs']} pass(es), {run['source']}; "
            f"batch {run['batch_size']}.",
            "",
            markdown_table(pd.DataFrame([
                {"Read": "raw `tf.data.TFRecordDataset` of the files", **_rates(raw)},
                {"Read": "the stream's batches built one after another in one thread, without tf.data "
                         "(`yt8m_qrnn.data.reader.FrameBatches`)", **_rates(run["batches_only"])},
                {"Read": "training stream (`yt8m_qrnn.data.stream`: shuffle, read at the index's offsets, check CRCs, "
                         "copy the frames, pad, batch ahead of the consumer)", **_rates(stream)},
            ])),
            "",
            f"The training stream reaches {100 * run['share_of_raw']:.0f}% of the raw read rate; a new stream gives "
            f"its first batch {1e3 * stream['first_batch_s']:.0f} ms after it is started. The stream yields uint8 "
            "frames, dequantized by the models.",
            "",
        ]
    return lines


def bench_section(results: Path) -> list[str]:
    """Part 6, "QRNN speed": results/bench/ (yt8m_qrnn.stages.bench) as tables, the targets marked met or not, the figure."""
    folder = Path(results) / "bench"
    lines = ["## 6. QRNN speed", ""]
    if not (folder / "summary.json").exists():
        return lines + [f"The bench has not been run (no `{folder / 'summary.json'}`). Run it with {BENCH_RUN_HINT}.", ""]
    summary = _read_json(folder / "summary.json", "the bench stage writes it")
    grid = _read_json(folder / "layer_grid.json", "the bench stage writes it")
    pooling = _read_json(folder / "pooling.json", "the bench stage writes it")
    pipeline = _read_json(folder / "input_pipeline.json", "the bench stage writes it")
    try:
        env, params = summary["environment"], summary["params"]

        def duration(seconds):
            return f"{1e3 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"

        load = env["load_average_start"]
        versions = env["versions"]
        lines += [
            f"Measured by the bench stage (`src/yt8m_qrnn/stages/bench.py`, files in `results/bench/`) on "
            f"**{env['device']}** ({env['cpus_usable']} usable of {env['cpu_count']} CPUs"
            + ("; no GPU visible to TensorFlow" if not env.get("gpus") else "")
            + f"), Keras {versions['keras']} on {env['backend']} {versions['tensorflow']}, numpy {versions['numpy']}, "
            f"Python {versions['python']}; started {env['started']}, {fmt_seconds(summary['seconds'])} in all. "
            f"Load average at the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
            + (f", at the end {env['load_average_end'][0]:.2f}" if env.get("load_average_end") else "")
            + f". Params: grid `{json.dumps(params['grid'])}`, shape `{json.dumps(params['shape'])}`, "
            f"{params['warmup']} warm-up step(s) after the first, median of {params['repeats']}.",
            "",
            markdown_table(pd.DataFrame(
                [{"Target": t["target"], "Measured": t["measured_text"],
                  "Status": t["status"] + (f" ({t['why_not_evaluated']})" if t.get("why_not_evaluated") else "")}
                 for t in summary["targets"]])),
            "",
        ]
        spec = grid["grid"]
        ratios = {(c["batch"], c["length"]): c["ratio"] for c in grid["cells"]}
        rows = [{"batch \\ length": str(b)} | {str(t): f"{ratios[(b, t)]:.2f}x" if (b, t) in ratios else NA
                                               for t in spec["lengths"]} for b in spec["batch_sizes"]]
        lines += [
            f"### LSTM / QRNN step time over the grid `{spec['name']}` (hidden {spec['hidden']}, inputs {spec['inputs']})",
            "",
            markdown_table(pd.DataFrame(rows)) if rows else "No grid cell was measured.",
            "",
            "Each cell: the training step (forward, then the gradient of a scalar loss with respect to the inputs and "
            "every weight, compiled as Keras trains) of one `keras.layers.LSTM` over that of one QRNN layer of the "
            "same size (fo pooling, window 2), medians; the LSTM's time is the faster of tf.function and XLA "
            "(where XLA was timed). "
            "Above 1: the QRNN is faster."
            + (" Load average (1 min) around the grid's cells: {:.2f} to {:.2f}.".format(
                min(c["load_average"]["before"][0] for c in grid["cells"]),
                max(c["load_average"]["after"][0] for c in grid["cells"]))
               if grid["cells"] and all("load_average" in c for c in grid["cells"]) else ""),
            "",
        ]
        at, shape = grid["at_shape"], grid["shape"]
        used = pooling["layer_pool_impl"]
        step_rows = [
            {"Step": "QRNN layer (fo, window 2)", "Median": duration(at["qrnn_s"]), "Of the QRNN layer step": "100%"},
            {"Step": "QRNN layer, again in the parts' round", "Median": duration(pooling["layer_s"]),
             "Of the QRNN layer step": "100% (the shares below)"},
            {"Step": "convolution alone (the matmuls of x_{t-1}, x_t with the kernel, and their gradient)",
             "Median": duration(pooling["convolution_s"]),
             "Of the QRNN layer step": f"{100 * pooling['convolution_share']:.1f}%"
             + (f" (CPU time {100 * pooling['convolution_share_cpu']:.1f}%)" if "convolution_share_cpu" in pooling
                else "")},
        ]
        for name, impl in pooling["implementations"].items():
            step_rows.append({"Step": f"pooling alone: {name}" + (" (the layer's)" if name == used else ""),
                              "Median": duration(impl["median_s"]),
                              "Of the QRNN layer step": f"{100 * impl['share_of_layer']:.1f}% "
                                                        + (f"(CPU time {100 * pooling['pooling_share_cpu']:.1f}%) "
                                                           if name == used and "pooling_share_cpu" in pooling else "")
                                                        + f"(max error vs float64 {impl['max_abs_error']:.1e})"})
        step_rows += [
            {"Step": "LSTM, tf.function", "Median": duration(at["lstm_plain_s"]),
             "Of the QRNN layer step": f"{at['lstm_plain_s'] / at['qrnn_s']:.2f}x"},
            {"Step": "LSTM, XLA (how Keras compiles a model of LSTMs)",
             "Median": "not timed here (bench.lstm_xla)" if at["lstm_xla_s"] is None else duration(at["lstm_xla_s"]),
             "Of the QRNN layer step": NA if at["lstm_xla_s"] is None else f"{at['lstm_xla_s'] / at['qrnn_s']:.2f}x"},
        ]
        shape_load = at.get("load_average")
        lines += [
            f"### At the `{shape['name']}` shape (batch {shape['batch']}, {shape['frames']} frames, "
            f"{shape['inputs']} inputs, hidden {shape['hidden']}): LSTM / QRNN {at['ratio']:.2f}x"
            + (f" (CPU time {at['ratio_cpu_time']:.2f}x)" if at.get("ratio_cpu_time") else ""),
            "",
            (f"Load average (1 min) {shape_load['before'][0]:.2f} before these steps, {shape_load['after'][0]:.2f} "
             "after; the CPU time of the process (every thread) is less sensitive to other work on the machine "
             "than the wall time." if shape_load else "Load average during these steps not recorded."),
            "",
            markdown_table(pd.DataFrame(step_rows)),
            "",
            "Each part is timed alone with its own gradient, on the layer's own gate tensors for the pooling; "
            "what the parts leave of the layer step is the gate activations and the products around the pooling.",
            "",
            "### Input pipeline",
            "",
            *pipeline_lines(pipeline),
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{folder}: malformed bench results ({type(err).__name__}: {err})") from None
    if (folder / "speedup.png").exists():
        lines += ["![QRNN vs LSTM speed](bench/speedup.png)", "",
                  "Left: LSTM / QRNN step time over the grid. Right: the step times at the shape, log scale.", ""]
    return lines


# ---------------------------------------------------------------- provenance

def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_hash(path: Path) -> dict | None:
    """md5, size and file count of a file or folder, as DVC 3 records them in dvc.lock.

    A file: the md5 of its bytes. A folder: the md5 of the JSON list of its files'
    {"md5", "relpath"} sorted by relpath, with ".dir" appended. None if absent.
    """
    path = Path(path)
    if path.is_file():
        return {"md5": md5_file(path), "size": path.stat().st_size, "nfiles": 1}
    if not path.is_dir():
        return None
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    entries = [{"md5": md5_file(p), "relpath": p.relative_to(path).as_posix()} for p in files]
    digest = hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"
    return {"md5": digest, "size": sum(p.stat().st_size for p in files), "nfiles": len(files)}


def _display(path: Path, repo: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(repo).resolve())).as_posix()
    except ValueError:
        return Path(path).as_posix()


def report_inputs(results: Path, repo: Path) -> list[Path]:
    return [results / p for p in RESULT_INPUTS] + [repo / p for p in CODE_INPUTS]


def load_dvc_lock(repo: Path) -> dict:
    path = repo / "dvc.lock"
    if not path.exists():
        return {}
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {}
    except yaml.YAMLError:
        return {}


def inputs_table(results: Path, repo: Path, lock: dict) -> tuple[pd.DataFrame, dict[str, str]]:
    """The report's own inputs, hashed now as DVC would, beside dvc.lock's record for the report stage."""
    locked = {d["path"]: d.get("md5") for d in lock.get("report", {}).get("deps", []) if "path" in d}
    rows, computed = [], {}
    for path in report_inputs(results, repo):
        name = _display(path, repo)
        info = dvc_hash(path)
        if info:
            computed[name] = info["md5"]
        recorded = locked.get(name)
        if info is None:
            check = "missing"
        elif recorded is None:
            check = "not in dvc.lock"
        else:
            check = "same" if recorded == info["md5"] else "changed since dvc.lock"
        rows.append({"Input": f"`{name}`", "md5 (computed now)": f"`{info['md5']}`" if info else "missing",
                     "Files": info["nfiles"] if info else 0, "Size": fmt_bytes(info["size"]) if info else "0 B",
                     "dvc.lock (report stage)": check})
    return pd.DataFrame(rows), computed


def dvc_lock_table(lock: dict, repo: Path, computed: dict[str, str]) -> pd.DataFrame:
    """Every dep and out recorded in dvc.lock, and whether the file still has that hash."""
    rows, cache = [], dict(computed)
    for stage, entry in lock.items():
        for role in ("deps", "outs"):
            for item in entry.get(role, []) or []:
                path, recorded = item.get("path"), item.get("md5")
                if path is None or recorded is None:
                    continue
                if path not in cache:
                    cache[path] = _rehash(repo / path)
                now = cache[path]
                status = now if now in NOT_REHASHED else ("same" if now == recorded else "changed")
                rows.append({"Stage": stage, "Role": role[:-1], "Path": f"`{path}`", "md5 (dvc.lock)": f"`{recorded}`",
                             "Now": status})
    return pd.DataFrame(rows, columns=["Stage", "Role", "Path", "md5 (dvc.lock)", "Now"])


NOT_REHASHED = ("missing now", "folder: not re-hashed", "large file: not re-hashed")


def _rehash(target: Path) -> str:
    """The md5 of a small file, or why it was not computed (folders may hold the whole dataset)."""
    if target.is_dir():
        return NOT_REHASHED[1]
    if not target.exists():
        return NOT_REHASHED[0]
    if target.stat().st_size > REHASH_LIMIT_BYTES:
        return NOT_REHASHED[2]
    return md5_file(target)


def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        items = []
        for key in value:
            items += _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
        return items
    return [(prefix, value)]


def params_table(results: Path, models: list[str]) -> pd.DataFrame:
    """Each stage's params, from the stamps every stage writes in results/params/."""
    stages = ["generate", "fetch", "index"] + [f"{s}-{m}" for m in models for s in ("train", "evaluate")] + ["report"]
    rows = []
    for stage in stages:
        path = results / "params" / f"{stage}.json"
        if path.exists():
            flat = _flatten(json.loads(path.read_text()))
            text = "; ".join(f"`{k}`={json.dumps(v)}" for k, v in flat)
        else:
            text = f"not recorded ({path} missing)"
        rows.append({"Stage": stage.replace("-", "@", 1), "Params (params.yaml keys)": text})
    return pd.DataFrame(rows)


def manifest_summary(manifest: dict) -> tuple[list[str], pd.DataFrame]:
    files = manifest.get("files", [])
    digest = hashlib.md5("\n".join(f"{f.get('name')} {f.get('md5')}" for f in
                                   sorted(files, key=lambda f: str(f.get("name")))).encode()).hexdigest()
    fetched = sorted(f["fetched_at"] for f in files if f.get("fetched_at"))
    lines = [
        f"- source: `{manifest.get('source', '?')}`" + (" (generated data)" if is_generated(manifest) else ""),
        f"- dataset version: {manifest.get('version', '?')}; {len(files)} shards, "
        f"{fmt_bytes(sum(int(f.get('bytes', 0)) for f in files))}",
        f"- digest of every shard's md5 (md5 of the sorted `name md5` lines): `{digest}`",
    ]
    if fetched:
        lines.append(f"- fetched between {fetched[0]} and {fetched[-1]}")
    groups: dict[tuple, list[dict]] = {}
    for f in files:
        groups.setdefault((f.get("level", "?"), f.get("split", "?")), []).append(f)
    rows = []
    for (level, split), group in sorted(groups.items()):
        names = sorted(str(f.get("name", "?")).rsplit("/", 1)[-1] for f in group)
        rows.append({"Level": level, "Split": split, "Shards": len(group),
                     "Bytes": fmt_bytes(sum(int(f.get("bytes", 0)) for f in group)),
                     "First .. last": f"{names[0]} .. {names[-1]}" if len(names) > 1 else names[0],
                     "First md5": f"`{sorted(group, key=lambda f: str(f.get('name')))[0].get('md5', '?')}`"})
    return lines, pd.DataFrame(rows, columns=["Level", "Split", "Shards", "Bytes", "First .. last", "First md5"])


def _git(repo: Path, *args) -> str | None:
    """git's output (not stripped: porcelain lines start with a status column), or None."""
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(repo: Path) -> str:
    commit = (_git(repo, "rev-parse", "HEAD") or "").strip()
    if not commit:
        return "- git: not a git repository (or git is missing)"
    excludes = [f":(exclude){p}" for p in NOT_CODE]
    status = _git(repo, "status", "--porcelain", "--", ".", *excludes) or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    if not changed:
        return f"- git commit: `{commit}` (clean: code and params match the commit)"
    shown = ", ".join(f"`{c}`" for c in changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
    return (f"- git commit: `{commit}` **with uncommitted changes** ({len(changed)} file(s) modified or untracked, "
            f"outside results/: {shown})")


def package_versions() -> str:
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return f"Python {platform.python_version()}; " + ", ".join(versions)


def memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return fmt_bytes(int(line.split()[1]) * 2**10)  # kB in /proc/meminfo are KiB
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def gpu_models() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "none detected (no nvidia-smi)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi failed: {err}"
    gpus = [line.split(" (UUID")[0].strip() for line in out.stdout.splitlines() if line.strip()]
    return "; ".join(gpus) if out.returncode == 0 and gpus else "none detected (nvidia-smi lists no GPU)"


def hardware() -> list[str]:
    tf_build = "CPU-only TensorFlow build (tensorflow-cpu)" if _installed("tensorflow-cpu") else "TensorFlow"
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, {memory_total()} memory",
        f"- GPU: {gpu_models()}; {tf_build}",
        f"- system: {platform.system()} {platform.release()} ({platform.machine()})",
    ]


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
        return True
    except metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------- the report

def _details(summary: str, body: str) -> list[str]:
    return ["<details>", f"<summary>{summary}</summary>", "", body, "", "</details>", ""]


def video_qrnn_notes(runs: list[ModelRun]) -> list[str]:
    """What a video-level QRNN is, exactly, for each one in the run."""
    lines = []
    for run in runs:
        if run.kind == "qrnn" and run.level == "video":
            lines += [f"**{run.name} is a video-level QRNN**: the 1152-d video vector is a sequence of one step, so "
                      "each layer computes h = o * (1 - f) * z from that step alone (window 1, fo-pooling from an "
                      "empty state, no zoneout: there is no earlier step or state), then the MoE head. It is a "
                      "gated feed-forward network; every parameter counted here trains.", ""]
    return lines


def ensemble_rows(runs: list[ModelRun], resamples: int) -> list[tuple[str, int, dict]]:
    """(name, number of models, intervals) of each model's seed ensemble and of each level's all-model ensemble."""
    rows = [(f"{run.name}, ensemble of its {len(run.scores.seeds)} seeds", len(run.scores.seeds),
             comparison.topk_intervals(run.scores.ensemble, resamples)) for run in runs if len(run.scores.seeds) > 1]
    top_k = max(int(r.metrics.get("top_k") or 20) for r in runs)
    for level, group in comparison.group_by_level([r.scores for r in runs]).items():
        ensemble = comparison.all_models_ensemble(group, top_k)
        if ensemble is not None:
            count = sum(len(m.seeds) for m in group)
            rows.append((f"ensemble of every {level}-level model ({', '.join(m.name for m in group)})", count,
                         comparison.topk_intervals(ensemble, resamples)))
    return rows


def comparisons_table(comparisons: list) -> pd.DataFrame:
    return pd.DataFrame([{"QRNN": c.qrnn, "Baseline": c.baseline, "Level": c.level,
                          "GAP difference": f"{c.difference:+.4f}", "95% interval": f"[{c.low:+.4f}, {c.high:+.4f}]",
                          "p": comparison._p_text(c.p_value).removeprefix("= "), "Outcome": c.outcome} for c in comparisons],
                        columns=["QRNN", "Baseline", "Level", "GAP difference", "95% interval", "p", "Outcome"])


def split_protocol_text(results: Path) -> str:
    stamp = results / "params" / "index.json"
    index = json.loads(stamp.read_text()).get("index", {}) if stamp.exists() else {}
    protocol = index.get("protocol")
    if protocol == "starter":
        text = (f"the starter's protocol: trained on the `train` split, evaluated on all of "
                f"{', '.join(index.get('eval_splits', []))}")
    elif protocol == "hash":
        text = (f"trained on every labelled video but {index.get('eval_fraction')} of "
                f"{', '.join(index.get('eval_splits', []))} (by hash of id), which is evaluated on")
    else:
        text = "not recorded"
    fraction = index.get("validation_fraction")
    if fraction:
        text += f"; {fraction} of the training videos (another hash of id) are held out to choose each seed's epoch"
    return text + "."


def build_report(models: list[str], report_cfg: dict, results: Path, *, repo: Path = Path("."),
                 reference_path: Path = REFERENCE) -> str:
    results, repo = Path(results), Path(repo)
    if not models:
        raise ReportError("run_models is empty: nothing to report")
    reference = load_reference(reference_path)
    manifest_path = results / "data" / "manifest.json"
    manifest = _read_json(manifest_path, "the fetch stage writes it")
    generated = is_generated(manifest)
    runs = [load_model_run(results, name) for name in models]
    min_positives = int(report_cfg.get("per_class_min_positives", 1))
    top_classes = int(report_cfg.get("per_class_top", 10))
    resamples = int(report_cfg.get("bootstrap_resamples", 1000))
    for run in runs:
        run.intervals = comparison.model_intervals(run.scores, resamples)
    ensembles = ensemble_rows(runs, resamples)
    comparisons = comparison.compare_qrnns([r.scores for r in runs], resamples)
    split = split_protocol_text(results)

    tables = {
        "table1": ("Table 1: PERR and Hit@1", table1(runs, reference)),
        "table2": (f"Table 2: GAP{_top_k(runs)}", table2(runs, reference, ensembles)),
        "comparisons": ("QRNN against each baseline (paired bootstrap)", comparisons_table(comparisons)),
        "models": ("Every model", models_table(runs, reference, manifest)),
        "per_class": ("Per-class AP of the most frequent classes", per_class_table(runs, min_positives, top_classes)),
    }
    write_tables(tables, results / "tables", generated)
    figures = plot_figures(runs, reference, results, report_cfg, generated)
    lock = load_dvc_lock(repo)
    inputs, computed = inputs_table(results, repo, lock)
    manifest_lines, manifest_table = manifest_summary(manifest)
    vocabularies = sorted({str(r.metrics.get("vocabulary", "none")) for r in runs})
    quoted_percent = [ref for ref in reference["table1"] if "%" in str(ref.get("quoted", ""))]
    percent_note = "; ".join(f"{ref['model']} {ref['quoted']}" for ref in quoted_percent)
    eval_sizes = ", ".join(sorted({f"{int(r.metrics['num_videos']):,} {r.level}-level" for r in runs}))
    built = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    parts = [
        "# Results: QRNN against the YouTube-8M baselines",
        "",
        GENERATED_BANNER if generated else
        f"Data: the real YouTube-8M dataset, `{manifest.get('source', '?')}`, version {manifest.get('version', '?')}, "
        f"{len(manifest.get('files', []))} shards (see Provenance).\n",
        f"Models in this run: {', '.join(f'{r.name} ({r.kind}, {r.level} level)' for r in runs)}. "
        f"Evaluated on the held-out `eval` subset ({eval_sizes} videos) "
        f"with the official YouTube-8M 2018 metrics (`src/yt8m_qrnn/metrics/official.py`). Built {built}.",
        "",
        f"Split: {split}",
        "",
        f"Every number of this run reads **mean ± half width [low, high]**: the mean over the training seeds, "
        f"the half width of its 95% Student-t interval over the seeds, and the 95% bootstrap interval of that "
        f"mean over the evaluation videos ({resamples} resamples, percentile; `src/yt8m_qrnn/metrics/stats.py`, "
        "scipy). Each seed's epoch is chosen on the validation videos (section 3, and the validation curves).",
        "",
        "## Verdict",
        "",
        *comparison.verdict_lines([r.scores for r in runs], comparisons,
                                  "generated data (a pipeline check, not the paper's question)" if generated
                                  else f"real YouTube-8M data ({data_label(manifest)})"),
        "",
        "## 1. Table 1: PERR and Hit@1",
        "",
        markdown_table(tables["table1"][1]),
        "",
        "Each paper row is followed by this run's models of the same kind. "
        + (f"The YouTube-8M paper's values are quoted in percent ({percent_note}); "
           "shown here as fractions. " if quoted_percent else "")
        + "The class prior predicts every class's training frequency for every video: every model should beat it.",
        "",
        f"## 2. Table 2: GAP{_top_k(runs)}",
        "",
        markdown_table(tables["table2"][1]),
        "",
        "Models: the number of models in the ensemble. This run's ensembles average the predictions of each "
        "model's seeds, and of every model of a level (the paper's future work), on the same videos.",
        "",
        "### QRNN against each baseline",
        "",
        markdown_table(tables["comparisons"][1]) if len(tables["comparisons"][1]) else
        "No QRNN and baseline were evaluated on the same videos.",
        "",
        "Paired bootstrap over the evaluation videos: the same resampled videos for both models, the statistic "
        "the difference of their seed-mean GAP@20; significant when the 95% interval excludes 0.",
        "",
        "## 3. Every model",
        "",
        markdown_table(tables["models"][1]),
        "",
        *video_qrnn_notes(runs),
        "MAP (2018) averages AP over every class, a class without positives scoring 0 (the 2018 evaluation code); "
        "it has an interval over seeds only (a resample of the videos drops rare classes, which then score 0, so "
        "its bootstrap interval would sit below the estimate); "
        "MAP (2019) averages over the classes with positives in the eval subset. Size: the saved `model.keras`. "
        "Throughput: training videos x epochs / summed epoch time.",
        "",
        f"### Per-class AP of the {top_classes} classes with the most eval positives",
        "",
        markdown_table(tables["per_class"][1]) if len(tables["per_class"][1]) else "No class has eval positives.",
        "",
        "Label names: " + ("the dataset vocabulary" if any(v not in ("none", "given") for v in vocabularies)
                           else "class indices (no vocabulary file with the data)")
        + f" ({', '.join(f'`{v}`' for v in vocabularies)}). Every class: `results/eval/<model>/per_class_ap.csv`.",
        "",
        "## 4. Figures",
        "",
    ]
    for figure in figures:
        parts += [f"### {figure.title}", "", f"![{figure.title}]({figure.path})", "", figure.caption, ""]
    parts += [
        "## 5. Provenance",
        "",
        "### Code",
        "",
        git_state(repo),
        "",
        "### Inputs of this report",
        "",
        "Hashed when the report was built, as DVC hashes them (md5 of a file; for a folder, md5 of its file list "
        "plus `.dir`), beside the report stage's record in `dvc.lock`. Under Snakemake, `dvc.lock` is refreshed "
        "by `dvc commit` only after the whole run, so it may still describe the previous run.",
        "",
        markdown_table(inputs),
        "",
    ]
    lock_table = dvc_lock_table(lock, repo, computed)
    if len(lock_table):
        parts += _details(f"Every input and output recorded in dvc.lock ({len(lock_table)} entries, as found when "
                          "the report was built; 'Now': whether the file still has that hash)",
                          markdown_table(lock_table))
    else:
        parts += ["No `dvc.lock` yet (DVC has not recorded a run).", ""]
    parts += [
        "### Params of each stage",
        "",
        "From `results/params/<stage>.json`, the params.yaml keys each stage reads (`dvc.yaml`, "
        "`yt8m_qrnn.pipeline.dag.STAGES`).",
        "",
        markdown_table(params_table(results, models)),
        "",
        "### Data",
        "",
        *manifest_lines,
        f"- every shard with its md5: `{_display(manifest_path, repo)}`",
        "",
        markdown_table(manifest_table) if len(manifest_table) else "The manifest lists no shards.",
        "",
        "### Software and hardware",
        "",
        f"- packages: {package_versions()}",
        *determinism_lines(runs),
        *hardware(),
        "- (the machine that built this report; Snakemake and `dvc repro` run every stage on it)",
        "",
        "### Reference numbers",
        "",
        f"From `src/yt8m_qrnn/stages/report/paper_numbers.yaml`; model size limit of the 2018 challenge: "
        f"{reference.get('challenge_model_size_limit_label', reference['challenge_model_size_limit_mb'])}.",
        "",
        *[f"- {_source_short(reference, key)}: {_source_cite(reference, key)}" for key in reference["sources"]],
        "",
    ]
    parts += bench_section(results)
    text = "\n".join(parts)
    write_text(results / "report.md", text)
    return text


# ---------------------------------------------------------------- the stage

def run(params: dict) -> None:
    p = stage_params(params, "report")
    build_report(p["run_models"], p["report"], Path("results"))
