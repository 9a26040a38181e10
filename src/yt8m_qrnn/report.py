"""results/report.md: the paper's tables rebuilt from this run, figures, provenance."""
from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from .io import write_text

REFERENCE = Path(__file__).with_name("paper_numbers.yaml")
GENERATED_BANNER = (
    "> **Generated data.** These numbers come from the small generated dataset embedded in this\n"
    "> repository (YouTube-8M format, planted signal). They check that the pipeline trains and\n"
    "> evaluates correctly; they are **not comparable with the paper**. To reproduce the paper, run on\n"
    "> the real YouTube-8M data (README: \"Real data\").\n"
)
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pandas", "snakemake", "dvc", "gcsfs")


def load_reference() -> dict:
    return yaml.safe_load(REFERENCE.read_text())


def load_run(results: Path, models: list[str]) -> pd.DataFrame:
    rows = []
    for model in models:
        stats = json.loads((results / "models" / model / "train_stats.json").read_text())
        metrics = json.loads((results / "eval" / model / "metrics.json").read_text())
        rows.append({"model": model, **stats, **{k: v for k, v in metrics.items() if k != "class_prior"},
                     "prior_gap": metrics["class_prior"]["gap"], "prior_hit_at_one": metrics["class_prior"]["hit_at_one"],
                     "prior_perr": metrics["class_prior"]["perr"]})
    return pd.DataFrame(rows).set_index("model")


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def table1(run: pd.DataFrame, reference: dict) -> str:
    rows = [{"Level": r.level, "Model": f"{name} (this run)", "PERR": f"{r.perr:.3f}", "Hit@1": f"{r.hit_at_one:.3f}"}
            for name, r in run.iterrows()]
    first = run.iloc[0]
    rows.append({"Level": "-", "Model": "class prior (this run)", "PERR": f"{first.prior_perr:.3f}",
                 "Hit@1": f"{first.prior_hit_at_one:.3f}"})
    rows += [{"Level": p["level"], "Model": f"{p['model']} (paper: {p['source']})", "PERR": f"{p['perr']:.3f}",
              "Hit@1": f"{p['hit_at_one']:.3f}"} for p in reference["table1"]]
    return markdown_table(pd.DataFrame(rows))


def table2(run: pd.DataFrame, reference: dict) -> str:
    rows = [{"Model": f"{name} (this run, {r.level} level)", "GAP@20": f"{r.gap:.4f}", "Models": 1}
            for name, r in run.iterrows()]
    rows.append({"Model": "class prior (this run)", "GAP@20": f"{run.iloc[0].prior_gap:.4f}", "Models": "-"})
    rows += [{"Model": f"{p['model']} ({p['source']})", "GAP@20": f"{p['gap']:.5g}", "Models": p["models_in_ensemble"]}
             for p in reference["table2"]]
    return markdown_table(pd.DataFrame(rows))


def models_table(run: pd.DataFrame, reference: dict, source: str) -> str:
    limit = reference["challenge_model_size_limit_mb"]
    rows = [{
        "Model": name, "Kind": r.kind, "Level": r.level, "MAP": f"{r.map:.4f}", "MAP (classes present)": f"{r.map_present:.4f}",
        "Parameters": f"{r.parameters:,}", "Size MB": f"{r.model_size_mb:.1f}",
        "Under 1 GB limit": "yes" if r.model_size_mb <= limit else "no",
        "Train examples/s": f"{r.examples_per_second:.0f}", "Train wall s": f"{r.wall_seconds:.0f}",
        "Train videos": r.train_videos, "Eval videos": r.num_videos, "Data": source,
    } for name, r in run.iterrows()]
    return markdown_table(pd.DataFrame(rows))


def plot_figures(run: pd.DataFrame, results: Path, reference: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = results / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    made = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in run.index:
        history = pd.read_csv(results / "models" / name / "history.csv")
        ax.plot(history["epoch"], history["loss"], marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="training loss (starter cross-entropy)", title="Training curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "training_curves.png", dpi=100)
    plt.close(fig)
    made.append(("Training curves", "figures/training_curves.png"))

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    paper = {p["model"]: p for p in reference["table1"]}
    for ax, metric, label in zip(axes, ["gap", "hit_at_one", "perr"], ["GAP@20", "Hit@1", "PERR"]):
        names = list(run.index) + ["class prior"]
        values = list(run[metric]) + [run.iloc[0][f"prior_{metric}"]]
        ax.bar(names, values, color="tab:blue", label="this run")
        if metric != "gap":
            refs = [paper.get(reference["kind_to_row"].get(run.loc[n, "kind"], ""), {}).get(metric) if n in run.index
                    else None for n in names]
            xs = [i for i, r in enumerate(refs) if r is not None]
            ax.scatter(xs, [refs[i] for i in xs], color="tab:red", marker="_", s=400, label="paper")
        ax.set(title=label, ylim=(0, 1))
        ax.tick_params(axis="x", rotation=45)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(figures / "metrics_vs_paper.png", dpi=100)
    plt.close(fig)
    made.append(("Metrics against the paper", "figures/metrics_vs_paper.png"))
    return made


def provenance(manifest: dict) -> str:
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    shards = len(manifest.get("files", []))
    return "\n".join([
        f"- git commit: `{commit}`{' (uncommitted changes)' if dirty else ''}",
        f"- data source: `{manifest.get('source', '?')}`, version {manifest.get('version', '?')}, {shards} shards",
        f"- packages: {', '.join(versions)}",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
    ])


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def build_report(models: list[str], report_cfg: dict, results: Path) -> str:
    reference = load_reference()
    manifest = json.loads((results / "data" / "manifest.json").read_text())
    generated = manifest.get("dataset") == "generated"
    run = load_run(results, models)
    figures = plot_figures(run, results, reference)
    source = "generated" if generated else manifest.get("source", "?")
    parts = [
        "# Results: QRNN against the YouTube-8M baselines",
        "",
        GENERATED_BANNER if generated else "Data: the real YouTube-8M dataset.",
        "## Table 1: PERR and Hit@1",
        "",
        table1(run, reference),
        "",
        "## Table 2: GAP@20",
        "",
        table2(run, reference),
        "",
        "## Every model",
        "",
        models_table(run, reference, source),
        "",
        "## Figures",
        "",
        *[f"![{title}]({path})\n" for title, path in figures],
        "## Provenance",
        "",
        provenance(manifest),
        "",
        "Reference numbers: " + "; ".join(f"{k}: {v}" for k, v in reference["sources"].items()),
        "",
    ]
    text = "\n".join(parts)
    write_text(results / "report.md", text)
    return text
