"""results/report.md: the paper's tables rebuilt from this run, figures, provenance.

Six parts: (1) Table 1, PERR and Hit@1 beside the paper's values; (2) Table 2, GAP
beside the paper, the other QRNN study and the 2018 Kaggle top three; (3) a row per
model with MAP, size, throughput and data; (4) figures (PNG, relative links);
(5) provenance: code, inputs' hashes, each stage's params, data manifest, software,
hardware; (6) the QRNN's speed (the bench stage); and a banner whenever the numbers
come from the generated data.

Assembled here from inputs, tables, figures, provenance_section and speed; the prose is
template.md's (prose.fill). The reference numbers live only in paper_numbers.yaml. The
tables are also written to results/tables/ (CSV, and HTML for `snakemake --report`).
"""
from __future__ import annotations

import datetime
from pathlib import Path

import pandas as pd

from yt8m_qrnn.pipeline.io import write_text
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.stages.report import comparison, prose
from yt8m_qrnn.stages.report.figures import plot_figures
from yt8m_qrnn.stages.report.formatting import code_list, markdown_table
from yt8m_qrnn.stages.report.inputs import (
    REFERENCE,
    ModelRun,
    ReportError,
    index_params,
    is_generated,
    load_manifest,
    load_model_run,
    load_reference,
    top_k_suffix,
)
from yt8m_qrnn.stages.report.provenance_section import provenance_section
from yt8m_qrnn.stages.report.speed import bench_section, speed_section
from yt8m_qrnn.stages.report.tables import (
    comparisons_table,
    data_label,
    ensemble_rows,
    models_table,
    per_class_table,
    table1,
    table2,
    write_tables,
)

# run: the stage's entry (pipeline.dag); tests import build_report, ReportError and bench_section from here
__all__ = ["ReportError", "bench_section", "build_report", "run"]


def build_report(models: list[str], report_cfg: dict, results: Path, *, repo: Path = Path("."),
                 reference_path: Path = REFERENCE) -> str:
    """Write results/report.md (and its tables and figures) for the runs of `models`; return its text."""
    results, repo = Path(results), Path(repo)
    if not models:
        raise ReportError("run_models is empty: nothing to report")
    reference = load_reference(reference_path)
    manifest = load_manifest(results)
    generated = is_generated(manifest)
    resamples = int(report_cfg.get("bootstrap_resamples", 1000))
    runs = load_runs(results, models, resamples)
    comparisons = comparison.compare_qrnns([r.scores for r in runs], resamples)
    tables = result_tables(runs, reference, manifest, comparisons, report_cfg, resamples)
    write_tables(tables, results / "tables", generated)
    figures = plot_figures(runs, reference, results, report_cfg, generated)
    text = prose.fill(
        "report", data_note=data_note(manifest), **runs_overview(runs), split=split_protocol_text(results),
        resamples=resamples, verdict=verdict(runs, comparisons, manifest), **tables_markdown(tables),
        percent_note=percent_note(reference), top_k=top_k_suffix(runs), top_classes=per_class_top(report_cfg),
        video_qrnn_notes="\n\n".join(video_qrnn_notes(runs)), **label_names(runs),
        figures="\n\n".join(figure.markdown() for figure in figures),
        provenance=provenance_section(runs, models, manifest, reference, results, repo),
        speed=speed_section(results))
    text += "\n"
    write_text(results / "report.md", text)
    return text


def load_runs(results: Path, models: list[str], resamples: int) -> list[ModelRun]:
    """Each model's results, with the intervals of its metrics."""
    runs = [load_model_run(results, name) for name in models]
    for run in runs:
        run.intervals = comparison.model_intervals(run.scores, resamples)
    return runs


def per_class_top(report_cfg: dict) -> int:
    return int(report_cfg.get("per_class_top", 10))


def result_tables(runs: list[ModelRun], reference: dict, manifest: dict, comparisons: list, report_cfg: dict,
                  resamples: int) -> dict[str, tuple[str, pd.DataFrame]]:
    """name -> (title, table) of every table of results (written to results/tables/ too)."""
    min_positives = int(report_cfg.get("per_class_min_positives", 1))
    return {
        "table1": ("Table 1: PERR and Hit@1", table1(runs, reference)),
        "table2": (f"Table 2: GAP{top_k_suffix(runs)}", table2(runs, reference, ensemble_rows(runs, resamples))),
        "comparisons": ("QRNN against each baseline (paired bootstrap)", comparisons_table(comparisons)),
        "models": ("Every model", models_table(runs, reference, manifest)),
        "per_class": ("Per-class AP of the most frequent classes",
                      per_class_table(runs, min_positives, per_class_top(report_cfg))),
    }


def tables_markdown(tables: dict[str, tuple[str, pd.DataFrame]]) -> dict[str, str]:
    """The tables in markdown, or a sentence in place of an empty one."""
    frames = {name: frame for name, (_, frame) in tables.items()}
    comparisons, per_class = frames["comparisons"], frames["per_class"]
    return {"table1": markdown_table(frames["table1"]), "table2": markdown_table(frames["table2"]),
            "comparisons": markdown_table(comparisons) if len(comparisons) else prose.fill("no_comparisons"),
            "models_table": markdown_table(frames["models"]),
            "per_class": markdown_table(per_class) if len(per_class) else prose.fill("no_class_positives")}


def verdict(runs: list[ModelRun], comparisons: list, manifest: dict) -> str:
    data = ("generated data (a pipeline check, not the paper's question)" if is_generated(manifest)
            else f"real YouTube-8M data ({data_label(manifest)})")
    return "\n".join(comparison.verdict_lines([r.scores for r in runs], comparisons, data))


def data_note(manifest: dict) -> str:
    """The generated-data banner, or where the real data came from."""
    if is_generated(manifest):
        return prose.fill("generated_data")
    return prose.fill("real_data", source=manifest.get("source", "?"), version=manifest.get("version", "?"),
                      shards=len(manifest.get("files", [])))


def runs_overview(runs: list[ModelRun]) -> dict:
    return {"models": ", ".join(f"{r.name} ({r.kind}, {r.level} level)" for r in runs),
            "eval_sizes": ", ".join(sorted({f"{int(r.metrics['num_videos']):,} {r.level}-level" for r in runs})),
            "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def split_protocol_text(results: Path) -> str:
    """How the index stage split the videos (its stamp's `index:`), as a sentence."""
    index = index_params(results)
    splits = ", ".join(index.get("eval_splits", []))
    protocol = index.get("protocol")
    if protocol == "starter":
        text = prose.fill("split_starter", eval_splits=splits)
    elif protocol == "hash":
        text = prose.fill("split_hash", eval_fraction=index.get("eval_fraction"), eval_splits=splits)
    else:
        text = "not recorded"
    if index.get("validation_fraction"):
        text += "; " + prose.fill("split_validation", validation_fraction=index["validation_fraction"])
    return text + "."


def percent_note(reference: dict) -> str:
    """Which of the paper's Table 1 values were quoted in percent (the report shows fractions)."""
    quoted = [ref for ref in reference["table1"] if "%" in str(ref.get("quoted", ""))]
    if not quoted:
        return ""
    return prose.fill("percent_note", quoted="; ".join(f"{ref['model']} {ref['quoted']}" for ref in quoted)) + " "


def video_qrnn_notes(runs: list[ModelRun]) -> list[str]:
    """What a video-level QRNN is, exactly, for each one in the run."""
    return [prose.fill("video_qrnn_note", model=run.name) for run in runs
            if run.kind == "qrnn" and run.level == "video"]


def label_names(runs: list[ModelRun]) -> dict:
    vocabularies = sorted({str(r.metrics.get("vocabulary", "none")) for r in runs})
    named = any(v not in ("none", "given") for v in vocabularies)
    return {"label_source": "the dataset vocabulary" if named else "class indices (no vocabulary file with the data)",
            "vocabularies": code_list(vocabularies)}


def run(params: dict) -> None:
    """Stage 'report'."""
    p = stage_params(params, "report")
    build_report(p["run_models"], p["report"], Path("results"))
