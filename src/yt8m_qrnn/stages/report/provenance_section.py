"""Part 5 of the report, "Provenance": the code's git state, the report's inputs hashed as DVC
hashes them beside dvc.lock, each stage's params, the data manifest, the software and the
machine, the papers cited."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from yt8m_qrnn.pipeline import dag, provenance
from yt8m_qrnn.stages.report import prose
from yt8m_qrnn.stages.report.formatting import code_list, fmt_bytes, markdown_table
from yt8m_qrnn.stages.report.inputs import (
    ModelRun,
    is_generated,
    manifest_path,
    source_cite,
    source_short,
    stamp_path,
)

REPORT = dag.stage("report")
# The report stage's inputs, as the DAG declares them (and dvc.yaml spells them): under `results`,
# and in the repository (its script, the params schema, its code).
RESULT_INPUTS = tuple(str(Path(path).relative_to("results")) for path in REPORT.inputs)
CODE_INPUTS = (f"workflow/scripts/{REPORT.name}.py", dag.SCHEMA, *dag.code_paths(REPORT.name))
# The stages whose params stamps are shown: those DVC runs (Snakemake's fetch_plan and fetch_shard
# are its fan-out of fetch and share its stamp).
STAMPED_STAGES = tuple(stage for stage in dag.STAGES.values() if "dvc" in stage.orchestrators)
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pandas", "pyarrow", "matplotlib", "snakemake", "dvc",
            "gcsfs", "jsonschema", "pyyaml", "yt8m-qrnn")
# Pipeline outputs, left out of the git "dirty" check: it is about the code and params that ran.
NOT_CODE = ("results", "dvc.lock", "report.html")
REHASH_LIMIT_BYTES = 64 * 2**20  # dvc.lock entries (files) up to this size are re-hashed for the check
NOT_REHASHED = ("missing now", "folder: not re-hashed", "large file: not re-hashed")


def provenance_section(runs: list[ModelRun], models: list[str], manifest: dict, reference: dict, results: Path,
                       repo: Path) -> str:
    """The section: `repo` holds the code, dvc.lock and git; `results` the stages' outputs and params stamps."""
    lock = provenance.dvc_lock_stages(repo)
    inputs, computed = inputs_table(results, repo, lock)
    manifest_table = manifest_shards_table(manifest)
    return prose.fill(
        "provenance", git_state=git_state(repo), inputs_table=markdown_table(inputs),
        dvc_lock=dvc_lock_text(lock, repo, computed), params_table=markdown_table(params_table(results, models)),
        manifest=manifest_text(manifest, _display(manifest_path(results), repo)),
        manifest_table=markdown_table(manifest_table) if len(manifest_table) else prose.fill("no_shards"),
        packages=packages_text(), determinism="\n".join(determinism_lines(runs)), **machine(),
        size_limit=reference.get("challenge_model_size_limit_label", reference["challenge_model_size_limit_mb"]),
        sources="\n".join(f"- {source_short(reference, key)}: {source_cite(reference, key)}"
                          for key in reference["sources"]))


# ---------------------------------------------------------------- code

def git_state(repo: Path) -> str:
    commit = provenance.git_commit(repo)
    if commit is None:
        return prose.fill("no_git")
    changed = provenance.git_changes(repo, excluding=NOT_CODE)
    if not changed:
        return prose.fill("git_clean", commit=commit)
    shown = code_list(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
    return prose.fill("git_changed", commit=commit, count=len(changed), files=shown)


# ---------------------------------------------------------------- inputs, as DVC hashes them

def report_inputs(results: Path, repo: Path) -> list[Path]:
    return [results / p for p in RESULT_INPUTS] + [repo / p for p in CODE_INPUTS]


def _display(path: Path, repo: Path) -> str:
    """The path relative to the repository, as dvc.lock writes it."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(repo).resolve())).as_posix()
    except ValueError:
        return Path(path).as_posix()


def inputs_table(results: Path, repo: Path, lock: dict) -> tuple[pd.DataFrame, dict[str, str]]:
    """The report's own inputs, hashed now as DVC would, beside dvc.lock's record for the report stage;
    and {path: md5} of those hashed."""
    locked = {d["path"]: d.get("md5") for d in lock.get("report", {}).get("deps", []) if "path" in d}
    rows, computed = [], {}
    for path in report_inputs(results, repo):
        name = _display(path, repo)
        info = provenance.dvc_hash(path)
        if info:
            computed[name] = info["md5"]
        rows.append({"Input": f"`{name}`", "md5 (computed now)": f"`{info['md5']}`" if info else "missing",
                     "Files": info["nfiles"] if info else 0, "Size": fmt_bytes(info["size"]) if info else "0 B",
                     "dvc.lock (report stage)": _against_lock(info, locked.get(name))})
    return pd.DataFrame(rows), computed


def _against_lock(info: dict | None, recorded: str | None) -> str:
    if info is None:
        return "missing"
    if recorded is None:
        return "not in dvc.lock"
    return "same" if recorded == info["md5"] else "changed since dvc.lock"


def dvc_lock_text(lock: dict, repo: Path, computed: dict[str, str]) -> str:
    table = dvc_lock_table(lock, repo, computed)
    if not len(table):
        return prose.fill("no_dvc_lock")
    return prose.fill("dvc_lock_entries", entries=len(table), table=markdown_table(table))


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


def _rehash(target: Path) -> str:
    """The md5 of a small file, or why it was not computed (folders may hold the whole dataset)."""
    if target.is_dir():
        return NOT_REHASHED[1]
    if not target.exists():
        return NOT_REHASHED[0]
    if target.stat().st_size > REHASH_LIMIT_BYTES:
        return NOT_REHASHED[2]
    return provenance.md5_file(target)


# ---------------------------------------------------------------- params

def params_table(results: Path, models: list[str]) -> pd.DataFrame:
    """Each stage's params, from the stamps every stage writes in results/params/."""
    rows = []
    for stage, model in stamped_runs(models):
        path = stamp_path(results, stage, model)
        if path.exists():
            text = "; ".join(f"`{k}`={json.dumps(v)}" for k, v in _flatten(json.loads(path.read_text())))
        else:
            text = f"not recorded ({path} missing)"
        rows.append({"Stage": stage if model is None else f"{stage}@{model}", "Params (params.yaml keys)": text})
    return pd.DataFrame(rows)


def stamped_runs(models: list[str]) -> list[tuple[str, str | None]]:
    """(stage, model or None) of each params stamp, in DAG order; a model's stages (train, evaluate) together."""
    runs, per_model = [], []
    for stage in STAMPED_STAGES + (None,):
        if stage is not None and stage.item == "model":
            per_model.append(stage.name)
            continue
        runs += [(name, model) for model in models for name in per_model]
        per_model = []
        if stage is not None:
            runs.append((stage.name, None))
    return runs


def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        items = []
        for key in value:
            items += _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
        return items
    return [(prefix, value)]


# ---------------------------------------------------------------- data

def manifest_text(manifest: dict, path: str) -> str:
    """The manifest in a few lines: source, version, size, a digest of every shard's md5, when fetched."""
    files = manifest.get("files", [])
    digest = hashlib.md5("\n".join(f"{f.get('name')} {f.get('md5')}" for f in
                                   sorted(files, key=lambda f: str(f.get("name")))).encode()).hexdigest()
    fetched = sorted(f["fetched_at"] for f in files if f.get("fetched_at"))
    return prose.fill(
        "manifest", source=manifest.get("source", "?"), generated=" (generated data)" if is_generated(manifest) else "",
        version=manifest.get("version", "?"), shards=len(files), size=fmt_bytes(_bytes(files)), digest=digest,
        fetched=f"- fetched between {fetched[0]} and {fetched[-1]}" if fetched else "", path=path)


def manifest_shards_table(manifest: dict) -> pd.DataFrame:
    """The shards by level and split: how many, their size, the first and last names, the first md5."""
    groups: dict[tuple, list[dict]] = {}
    for f in manifest.get("files", []):
        groups.setdefault((f.get("level", "?"), f.get("split", "?")), []).append(f)
    rows = []
    for (level, split), group in sorted(groups.items()):
        names = sorted(str(f.get("name", "?")).rsplit("/", 1)[-1] for f in group)
        rows.append({"Level": level, "Split": split, "Shards": len(group), "Bytes": fmt_bytes(_bytes(group)),
                     "First .. last": f"{names[0]} .. {names[-1]}" if len(names) > 1 else names[0],
                     "First md5": f"`{sorted(group, key=lambda f: str(f.get('name')))[0].get('md5', '?')}`"})
    return pd.DataFrame(rows, columns=["Level", "Split", "Shards", "Bytes", "First .. last", "First md5"])


def _bytes(files: list[dict]) -> int:
    return sum(int(f.get("bytes", 0)) for f in files)


# ---------------------------------------------------------------- software and machine

def packages_text() -> str:
    versions = provenance.package_versions(PACKAGES)
    return f"Python {provenance.python_version()}; " + ", ".join(f"{name} {v}" for name, v in versions.items())


def determinism_lines(runs: list[ModelRun]) -> list[str]:
    """How the training runs were made repeatable, as their train_stats.json recorded it."""
    models_by_settings: dict[str, list[str]] = {}
    for run in runs:
        models_by_settings.setdefault(json.dumps(run.stats.get("determinism"), sort_keys=True), []).append(run.name)
    if list(models_by_settings) == ["null"]:
        return [prose.fill("no_determinism")]
    lines = []
    for text, names in sorted(models_by_settings.items()):
        settings, users = json.loads(text), ", ".join(names)
        if settings is None:
            lines.append(prose.fill("determinism_not_recorded", models=users))
            continue
        lines.append(prose.fill(
            "determinism", models=users, seeding=settings["seeding"],
            op_determinism="on" if settings["tf_op_determinism"] else "off",
            intra_op_threads=settings["intra_op_threads"], onednn=settings["onednn"]))
    return lines


def machine() -> dict:
    """The machine that builds the report: CPU, memory, GPUs, TensorFlow build, system."""
    memory = provenance.memory_total_bytes()
    cpu_only = provenance.package_versions(("tensorflow-cpu",))
    return {"cpu": provenance.cpu_model(), "cores": os.cpu_count(),
            "memory": "unknown" if memory is None else fmt_bytes(memory), "gpus": provenance.gpu_models(),
            "tensorflow_build": "CPU-only TensorFlow build (tensorflow-cpu)" if cpu_only else "TensorFlow",
            "system": provenance.operating_system()}
