"""The report's tables of results: the paper's Tables 1 and 2 beside this run, the QRNN's
comparisons, a row per model, the per-class AP; and results/tables/ (CSV and HTML)."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from yt8m_qrnn.pipeline.io import atomic_path, write_text
from yt8m_qrnn.stages.report import comparison
from yt8m_qrnn.stages.report.formatting import GENERATED_TAG, NA, fmt, fmt_rate, fmt_seconds, is_missing
from yt8m_qrnn.stages.report.inputs import ModelRun, class_priors, is_generated, source_short, top_k_suffix

# ---------------------------------------------------------------- the paper's tables


def table1(runs: list[ModelRun], reference: dict) -> pd.DataFrame:
    """Level, Model, PERR, Hit@1: each paper row, then this run's models of its kind."""
    rows, placed = [], set()
    for ref in reference["table1"]:
        quoted = f", quoted as {ref['quoted']}" if ref.get("quoted") else ""
        rows.append({"Level": ref["level"], "Model": ref["model"], "PERR": fmt(ref["perr"]),
                     "Hit@1": fmt(ref["hit_at_one"]), "Source": f"{source_short(reference, ref['source'])}{quoted}"})
        for run in runs:
            if ref.get("kind") is not None and run.kind == ref["kind"] and run.name not in placed:
                rows.append(_table1_row(run))
                placed.add(run.name)
    rows += [_table1_row(run) for run in runs if run.name not in placed]
    for level, prior in class_priors(runs).items():
        rows.append({"Level": level, "Model": "class prior (this run)", "PERR": fmt(prior.get("perr")),
                     "Hit@1": fmt(prior.get("hit_at_one")), "Source": "this run (baseline)"})
    return pd.DataFrame(rows, columns=["Level", "Model", "PERR", "Hit@1", "Source"])


def _table1_row(run: ModelRun) -> dict:
    return {"Level": run.level, "Model": f"{run.name} (this run, {_seeds_text(run)})",
            "PERR": run.metric("perr"), "Hit@1": run.metric("hit_at_one"), "Source": "this run"}


def _seeds_text(run: ModelRun) -> str:
    count = len(run.stats.get("seeds", [])) or 1
    return f"{count} seeds" if count > 1 else "1 seed"


def table2(runs: list[ModelRun], reference: dict, ensembles: list = ()) -> pd.DataFrame:
    """GAP of each model, of the ensembles (name, models, intervals), the class priors and the references."""
    gap = f"GAP{top_k_suffix(runs)}"
    rows = [{"Model": f"{run.name} (this run, {run.level} level, {_seeds_text(run)})", gap: run.metric("gap", 4),
             "Models": 1, "Source": "this run"} for run in runs]
    rows += [{"Model": f"{name} (this run)", gap: intervals["gap"].text(4), "Models": count,
              "Source": "this run (ensemble)"} for name, count, intervals in ensembles]
    rows += [{"Model": f"class prior (this run, {level} level)", gap: fmt(prior.get("gap"), 4), "Models": "baseline",
              "Source": "this run (baseline)"} for level, prior in class_priors(runs).items()]
    rows += [{"Model": ref["model"], gap: f"{ref['gap']:g}", "Models": ref["models_in_ensemble"],
              "Source": source_short(reference, ref["source"])} for ref in reference["table2"]]
    return pd.DataFrame(rows, columns=["Model", gap, "Models", "Source"])


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


def comparisons_table(comparisons: list[comparison.Comparison]) -> pd.DataFrame:
    return pd.DataFrame([{"QRNN": c.qrnn, "Baseline": c.baseline, "Level": c.level,
                          "GAP difference": f"{c.difference:+.4f}", "95% interval": f"[{c.low:+.4f}, {c.high:+.4f}]",
                          "p": comparison.p_text(c.p_value).removeprefix("= "), "Outcome": c.outcome}
                         for c in comparisons],
                        columns=["QRNN", "Baseline", "Level", "GAP difference", "95% interval", "p", "Outcome"])


# ---------------------------------------------------------------- a row per model

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
            "Epoch kept (per seed)": epochs_kept(s),
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


def epochs_kept(stats: dict) -> str:
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
    backend = f"Keras on {stats['backend']}" if stats.get("backend") else None
    parts = [str(p) for p in (backend, devices, stats.get("precision")) if p]
    if stats.get("replicas") and int(stats["replicas"]) > 1:
        parts.append(f"{stats['replicas']} replicas")
    return "; ".join(parts) if parts else "not recorded"


# ---------------------------------------------------------------- per class

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


# ---------------------------------------------------------------- results/tables/

def write_tables(tables: dict[str, tuple[str, pd.DataFrame]], folder: Path, generated: bool) -> None:
    """Each table as CSV and as a small HTML page (shown inline by `snakemake --report`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (title, frame) in tables.items():
        shown = frame.map(lambda v: NA if is_missing(v) else v) if len(frame) else frame
        with atomic_path(folder / f"{name}.csv") as tmp:
            shown.to_csv(tmp, index=False)
        write_text(folder / f"{name}.html", _html_page(title, shown, generated))
    remove_stale(folder, {name + suffix for name in tables for suffix in (".csv", ".html")}, ("*.csv", "*.html"))


def _html_page(title: str, frame: pd.DataFrame, generated: bool) -> str:
    banner = f"<p><strong>{html.escape(GENERATED_TAG.capitalize())}.</strong></p>" if generated else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}</style></head><body>"
            f"<h3>{html.escape(title)}</h3>{banner}{frame.to_html(index=False, escape=True, na_rep=NA)}"
            "</body></html>\n")


def remove_stale(folder: Path, wanted: set[str], patterns: tuple[str, ...]) -> None:
    """Delete the files of `folder` matching `patterns` that this build did not write."""
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.name not in wanted:
                path.unlink()
