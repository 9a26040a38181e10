"""The report stage: results/report.md built from small fake results written in tmp_path.

Checks the six parts, a row per model with no empty cell, the generated-data banner
(present iff the data is generated), reference numbers read only from
paper_numbers.yaml, figures written as PNG and linked relatively, the tables written
for `snakemake --report`, and the provenance (git, hashes as DVC computes them,
dvc.lock, params, manifest, software, hardware).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from yt8m_qrnn.metrics.stats import TopK
from yt8m_qrnn.pipeline import dag
from yt8m_qrnn.pipeline.provenance import dvc_hash
from yt8m_qrnn.stages.report import inputs, provenance_section, tables
from yt8m_qrnn.stages.report.build import ReportError, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_MODELS = {"logistic": ("logistic", "video"), "moe": ("moe", "video"), "lstm": ("lstm", "frame"),
                  "qrnn": ("qrnn", "frame")}
REQUIRED_FIGURES = ("training_curves.png", "metrics_vs_paper.png", "per_class_ap.png", "throughput.png")
FEW_RESAMPLES = 100  # the schema's least: enough to check the intervals are there, quick
NAMES = ["Game", "Video game", "Vehicle", "Concert", "Car | Truck", "/m/0abc12"]


# ---------------------------------------------------------------- fake results

def write_fake_results(root, models: dict[str, tuple[str, str]] = DEFAULT_MODELS, generated: bool = True,
                       num_classes: int = 40, seed: int = 0):
    """A results/ folder as the upstream stages write it, for `models` {name: (kind, level)}."""
    rng = np.random.default_rng(seed)
    results = root / "results"
    files = []
    for level in ("video", "frame"):
        for split, count in (("train", 3), ("validate", 2), ("test", 1)):
            for i in range(count):
                files.append({"name": f"2/{level}/{split}/{split}{i:04d}.tfrecord",
                              "md5": f"{rng.integers(1 << 60):032x}",
                              "bytes": int(rng.integers(1000, 5000)), "level": level, "split": split,
                              "fetched_at": f"2026-01-0{i + 1}T00:00:00+00:00", "remote": "x"})
    manifest = {"source": "gs://us.data.yt8m.org", "version": 2, "files": files}
    if generated:
        manifest |= {"dataset": "generated", "source": "generated (resources/generated)"}
    _write_json(results / "data" / "manifest.json", manifest)
    _write_json(results / "index" / "label_stats.json", {"num_classes": num_classes})
    stamps = {"generate": {"generate": {"seed": 8}}, "fetch": {"data": {"source": "generated", "version": 2}},
              "index": {"data": {"version": 2}, "index": {"eval_fraction": 0.5}},
              "report": {"report": {"per_class_min_positives": 1}, "run_models": list(models)}}
    for name, (kind, level) in models.items():
        model_cfg = {"kind": kind, "level": level, "epochs": 3, "batch_size": 16}
        stamps[f"train-{name}"] = {"data": {"version": 2}, "models": {name: model_cfg}, "train": {"seed": 1}}
        stamps[f"evaluate-{name}"] = {"data": {"version": 2}, "models": {name: model_cfg},
                                      "evaluate": {"top_k": 20, "batch_size": 256, "pr_curve_points": 11}}
        _write_model(results, name, kind, level, rng, num_classes)
    for stage, params in stamps.items():
        _write_json(results / "params" / f"{stage}.json", params)
    return results


def _write_model(results, name, kind, level, rng, num_classes):
    model_dir, eval_dir = results / "models" / name, results / "eval" / name
    model_dir.mkdir(parents=True)
    eval_dir.mkdir(parents=True)
    for seed in (1, 2):
        (model_dir / "seeds" / f"seed-{seed}").mkdir(parents=True)
        (model_dir / "seeds" / f"seed-{seed}" / "model.keras").write_bytes(rng.bytes(2048))
    _write_predictions(eval_dir / "predictions", level, rng, num_classes)
    _write_json(model_dir / "train_stats.json", {
        "model": name, "kind": kind, "level": level, "parameters": int(rng.integers(10_000, 5_000_000)),
        "model_size_mb": float(rng.uniform(1, 300)), "train_videos": 1500, "epochs": [3, 3], "steps": 90,
        "seeds": [1, 2], "best_epochs": [2, 3], "max_epochs": 3, "validation_videos": 150,
        "examples_per_second": float(rng.uniform(50, 5000)), "wall_seconds": float(rng.uniform(5, 500)),
        "final_loss": 10.0}
        | ({"total_parameters": 123, "examples_per_second_after_first_epoch": 4321.0, "devices": ["GPU:0"],
            "precision": "mixed_float16", "replicas": 1} if kind == "qrnn" else {}))
    pd.DataFrame({"seed": [1, 1, 1, 2, 2, 2], "epoch": [1, 2, 3] * 2, "loss": [300.0, 150.0, 90.0] * 2,
                  "learning_rate": [0.01, 0.01, 0.0095] * 2, "seconds": [9.0, 2.0, 2.1] * 2,
                  "val_gap": [0.3, 0.5, 0.45, 0.3, 0.4, 0.5]}).to_csv(model_dir / "history.csv", index=False)

    def metrics():
        return {k: float(rng.uniform(0.2, 0.9)) for k in ("gap", "map", "map_present", "hit_at_one", "perr")}

    _write_json(eval_dir / "metrics.json", metrics() | {
        "num_videos": 500, "num_test_videos": 200, "num_classes": num_classes, "classes_present": 30, "top_k": 20,
        "level": level, "vocabulary": "resources/yt8m/2/vocabulary.csv", "class_prior": metrics()})
    classes = np.arange(num_classes)
    pd.DataFrame({"class": classes, "name": [NAMES[c % len(NAMES)] + f" {c}" for c in classes],
                  "eval_positives": rng.integers(0, 30, num_classes),
                  "train_positives": rng.integers(0, 300, num_classes),
                  "ap": rng.uniform(0, 1, num_classes)}).to_csv(eval_dir / "per_class_ap.csv", index=False)
    recall = np.linspace(0.9, 0.0, 11)
    pd.DataFrame({"threshold": np.linspace(0, 1, 11), "precision": 1 - 0.5 * recall, "recall": recall}).to_csv(
        eval_dir / "pr_curve.csv", index=False)


def _write_predictions(folder, level, rng, num_classes, videos=60):
    """evaluate's predictions/: each seed's and the ensemble's top-k, the ensemble in full; the same videos and
    labels for every model of a level, a noisy copy of the labels as predictions."""
    labels_rng = np.random.default_rng(1 if level == "video" else 2)
    labels = [labels_rng.choice(num_classes, size=labels_rng.integers(1, 4), replace=False) for _ in range(videos)]
    dense = np.zeros((videos, num_classes), np.float32)
    for row, classes in enumerate(labels):
        dense[row, classes] = 1.0
    ids = np.array([f"{level}{i:03d}" for i in range(videos)])
    folder.mkdir(parents=True)
    seeds = [np.clip(dense * 0.4 + rng.uniform(0, 0.8, dense.shape), 0, 1).astype(np.float32) for _ in range(2)]
    for seed, predictions in enumerate(seeds, start=1):
        TopK.from_predictions(ids, predictions, labels, num_classes, 20).save(folder / f"seed-{seed}.npz")
    ensemble = np.mean(seeds, axis=0)
    TopK.from_predictions(ids, ensemble, labels, num_classes, 20).save(folder / "ensemble.npz")
    np.save(folder / "ensemble_full.npy", ensemble.astype(np.float16))


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def make_report(tmp_path, models=DEFAULT_MODELS, generated=True, report_cfg=None, **kwargs) -> str:
    results = write_fake_results(tmp_path, models, generated)
    report_cfg = report_cfg or {"per_class_min_positives": 1, "bootstrap_resamples": FEW_RESAMPLES}
    return build_report(list(models), report_cfg, results, repo=tmp_path, **kwargs)


# ---------------------------------------------------------------- reading the markdown

def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """Every table, keyed by the heading above it (header row first)."""
    tables, heading, current = {}, None, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, current = line.lstrip("# ").strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = tables.setdefault(heading, [])
            if not all(set(c) <= {"-", " "} and c for c in cells):
                current.append(cells)
        else:
            current = None
    return tables


def section(tables: dict, prefix: str) -> list[list[str]]:
    matches = [rows for heading, rows in tables.items() if heading.startswith(prefix)]
    assert matches, f"no table under a heading starting with {prefix!r}"
    return matches[0]


def assert_no_empty_cells(rows: list[list[str]], where: str):
    width = len(rows[0])
    for row in rows:
        assert len(row) == width, f"{where}: ragged row {row}"
        for cell in row:
            assert cell and cell.lower() not in ("nan", "none", "null"), f"{where}: empty cell in {row}"


@pytest.fixture(scope="module")
def generated_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    text = make_report(root)
    return root, text


# ---------------------------------------------------------------- the six parts

def test_all_six_parts_present(generated_report):
    _, text = generated_report
    for heading in ("## 1. Table 1: PERR and Hit@1", "## 2. Table 2: GAP@20", "## 3. Every model", "## 4. Figures",
                    "## 5. Provenance"):
        assert heading in text
    assert "**Generated data.**" in text and "not comparable with the paper" in text
    for part in ("### Code", "### Inputs of this report", "### Params of each stage", "### Data",
                 "### Software and hardware", "### Reference numbers"):
        assert part in text


def test_tables_have_a_row_per_model_and_no_empty_cell(generated_report):
    _, text = generated_report
    tables = markdown_tables(text)
    table1, table2, every = section(tables, "1. Table 1"), section(tables, "2. Table 2"), section(tables, "3. Every")
    assert table1[0][:4] == ["Level", "Model", "PERR", "Hit@1"]
    for model, (kind, level) in DEFAULT_MODELS.items():
        assert sum(row[1] == f"{model} (this run, 2 seeds)" and row[0] == level for row in table1) == 1
        assert sum(row[0] == f"{model} (this run, {level} level, 2 seeds)" for row in table2) == 1
        assert sum(row[0] == model and row[1] == kind and row[2] == level for row in every) == 1
    assert len(every) == 1 + len(DEFAULT_MODELS)
    for heading, rows in tables.items():
        assert_no_empty_cells(rows, heading)


def test_table1_puts_the_paper_beside_each_model_of_that_kind(generated_report):
    _, text = generated_report
    rows = section(markdown_tables(text), "1. Table 1")
    models = [row[1] for row in rows[1:]]
    reference = yaml.safe_load(inputs.REFERENCE.read_text())
    for ref in reference["table1"]:
        mine = [name for name, (kind, _) in DEFAULT_MODELS.items() if kind == ref["kind"]]
        at = models.index(ref["model"])
        assert models[at + 1:at + 1 + len(mine)] == [f"{m} (this run, 2 seeds)" for m in mine]
        row = rows[1 + at]
        assert row[2] == f"{ref['perr']:.3f}" and row[3] == f"{ref['hit_at_one']:.3f}"


def test_every_model_values_come_from_the_run(generated_report):
    root, text = generated_report
    every = section(markdown_tables(text), "3. Every")
    header = every[0]
    for row in every[1:]:
        cells = dict(zip(header, row))
        stats = json.loads((root / "results" / "models" / cells["Model"] / "train_stats.json").read_text())
        metrics = json.loads((root / "results" / "eval" / cells["Model"] / "metrics.json").read_text())
        assert cells["MAP (2018: all classes)"].startswith(f"{metrics['map']:.4f} ± ")
        assert cells["MAP (2019: classes present)"] == f"{metrics['map_present']:.4f}"
        if cells["Kind"] == "qrnn":  # train_stats.json with the optional fields
            assert cells["Parameters"] == f"{stats['parameters']:,} (total 123)"
            assert cells["After epoch 1"] == "4,321" and cells["Trained on"] == "GPU:0; mixed_float16"
        else:
            assert cells["Parameters"] == f"{stats['parameters']:,}"
            assert cells["After epoch 1"] == "n/a (not recorded)" and cells["Trained on"] == "not recorded"
        assert cells["Size (MB)"] == f"{stats['model_size_mb']:.1f}"
        assert "within" in cells["Of the 1 GB limit"]
        assert cells["Eval videos"] == "500" and cells["Train videos"] == "1,500"
        assert cells["Data"].startswith("generated")


def test_banner_only_for_generated_data(tmp_path):
    text = make_report(tmp_path, generated=False)
    assert "Generated data" not in text and "generated data" not in text.lower().split("## 5.")[0]
    assert "the real YouTube-8M dataset, `gs://us.data.yt8m.org`" in text
    every = section(markdown_tables(text), "3. Every")
    assert all(row[-1].startswith("gs://us.data.yt8m.org (version 2)") for row in every[1:])


def test_label_names_and_pipes_are_kept_in_the_per_class_table(generated_report):
    _, text = generated_report
    rows = section(markdown_tables(text), "Per-class AP")
    assert rows[0][:4] == ["Class", "Name", "Eval positives", "Train positives"]
    assert [f"AP {m}" for m in DEFAULT_MODELS] == rows[0][4:]
    assert len(rows) == 11
    eval_positives = [int(r[2]) for r in rows[1:]]
    assert eval_positives == sorted(eval_positives, reverse=True)
    assert "Label names: the dataset vocabulary" in text
    assert "Car \\| Truck" in text or all("Car" not in r[1] for r in rows[1:])


# ---------------------------------------------------------------- reference numbers

def reference_numbers() -> list[str]:
    reference = yaml.safe_load(inputs.REFERENCE.read_text())
    numbers = []
    for row in reference["table1"]:
        numbers += [str(row["perr"]), str(row["hit_at_one"]), f"{row['perr']:.3f}", f"{100 * row['hit_at_one']:.1f}"]
    for row in reference["table2"]:
        numbers.append(str(row["gap"]))
        if row["models_in_ensemble"] >= 10:
            numbers.append(str(row["models_in_ensemble"]))
    numbers.append(str(reference["challenge_model_size_limit_mb"]))
    return numbers


def test_no_reference_number_is_hard_coded_in_the_report_code():
    sources = sorted(p for p in inputs.REFERENCE.parent.iterdir() if p.suffix in (".py", ".md"))
    assert {"build.py", "tables.py", "figures.py", "template.md"} <= {p.name for p in sources}
    for source in sources:
        text = source.read_text()
        for number in reference_numbers():
            assert not re.search(rf"(?<![\w.]){re.escape(number)}(?![\w])", text), f"{number} is hard-coded in {source}"


def test_reference_numbers_come_from_the_yaml(tmp_path):
    reference = yaml.safe_load(inputs.REFERENCE.read_text())
    reference["table1"][0]["perr"] = 0.123
    reference["table1"][0]["hit_at_one"] = 0.456
    reference["table2"][2]["gap"] = 0.97531
    reference["challenge_model_size_limit_mb"] = 10
    reference["challenge_model_size_limit_label"] = "10 MB"
    changed = tmp_path / "paper_numbers.yaml"
    changed.write_text(yaml.safe_dump(reference))
    text = make_report(tmp_path, reference_path=changed)
    table1 = section(markdown_tables(text), "1. Table 1")
    qrnn_row = next(row for row in table1 if row[1] == reference["table1"][0]["model"])
    assert qrnn_row[2:4] == ["0.123", "0.456"]
    assert "0.97531" in text and "0.88987" not in text
    every = section(markdown_tables(text), "3. Every")
    assert "Of the 10 MB limit" in every[0] and any("OVER" in cell for row in every for cell in row)


def test_reference_file_is_complete_and_sourced():
    reference = inputs.load_reference()
    kinds = {row.get("kind") for row in reference["table1"]}
    assert {"qrnn", "logistic", "moe", "lstm"} <= kinds
    assert [row["gap"] for row in reference["table2"]] == [0.718, 0.808, 0.88987, 0.88729, 0.88722]
    assert [row["models_in_ensemble"] for row in reference["table2"]][2:] == [15, 115, 3]


# ---------------------------------------------------------------- figures and tables

def test_figures_are_png_and_linked_relatively(generated_report):
    root, text = generated_report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {link.rsplit("/", 1)[-1] for link in links} >= set(REQUIRED_FIGURES)
    for link in links:
        assert not link.startswith(("/", "http")) and ".." not in link, link
        target = root / "results" / link
        assert target.read_bytes()[:8] == PNG_MAGIC, link
    assert sorted(p.name for p in (root / "results" / "figures").glob("*.png")) == sorted(
        link.rsplit("/", 1)[-1] for link in links)


def test_stale_figures_and_tables_are_removed(tmp_path):
    results = write_fake_results(tmp_path)
    (results / "figures").mkdir()
    (results / "figures" / "old.png").write_bytes(PNG_MAGIC)
    (results / "tables").mkdir()
    (results / "tables" / "old.html").write_text("x")
    build_report(list(DEFAULT_MODELS), {}, results, repo=tmp_path)
    assert not (results / "figures" / "old.png").exists()
    assert not (results / "tables" / "old.html").exists()


def test_tables_are_written_as_csv_and_html(generated_report):
    root, _ = generated_report
    tables = root / "results" / "tables"
    for name in ("table1", "table2", "models", "per_class"):
        frame = pd.read_csv(tables / f"{name}.csv", keep_default_na=False)
        assert len(frame) and not (frame.astype(str) == "").any().any(), name
        page = (tables / f"{name}.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and "<table" in page and "Generated data" in page


@pytest.mark.parametrize("models", [
    {"logistic": ("logistic", "video"), "qrnn": ("qrnn", "frame")},
    {"qrnn": ("qrnn", "frame"), "qrnn_frame": ("qrnn", "frame"), "lstm": ("lstm", "frame"),
     "flog": ("frame_logistic", "frame")},
    {"moe": ("moe", "video")},
])
def test_any_set_of_models(tmp_path, models):
    text = make_report(tmp_path, models=models)
    tables = markdown_tables(text)
    for prefix in ("1. Table 1", "2. Table 2", "3. Every"):
        rows = section(tables, prefix)
        assert_no_empty_cells(rows, prefix)
        for model in models:
            assert any(row[0].startswith(model + " (this run") or row[1] == f"{model} (this run, 2 seeds)" or row[0] == model
                       for row in rows), (prefix, model)
    figures = tmp_path / "results" / "figures"
    assert {p.name for p in figures.glob("*.png")} >= set(REQUIRED_FIGURES)
    if "qrnn_frame" in models:  # two QRNNs follow the paper's QRNN row
        table1 = [row[1] for row in section(tables, "1. Table 1")]
        at = table1.index("QRNN")
        assert table1[at + 1:at + 3] == ["qrnn (this run, 2 seeds)", "qrnn_frame (this run, 2 seeds)"]


def test_a_missing_input_is_named(tmp_path):
    results = write_fake_results(tmp_path)
    (results / "eval" / "moe" / "metrics.json").unlink()
    with pytest.raises(ReportError, match=r"eval/moe/metrics\.json: not found"):
        build_report(list(DEFAULT_MODELS), {}, results, repo=tmp_path)
    results = write_fake_results(tmp_path / "again")
    stats = json.loads((results / "models" / "qrnn" / "train_stats.json").read_text())
    del stats["parameters"]
    _write_json(results / "models" / "qrnn" / "train_stats.json", stats)
    with pytest.raises(ReportError, match="train_stats.json: missing parameters"):
        build_report(list(DEFAULT_MODELS), {}, results, repo=tmp_path / "again")


# ---------------------------------------------------------------- provenance

def test_the_inputs_table_lists_the_dvc_stage_deps(tmp_path):
    """The report hashes what DVC records for its stage, by the names dvc.lock gives them (so each row finds its
    dvc.lock entry); RESULT_INPUTS and CODE_INPUTS come from the DAG, which dvc.yaml spells."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    declared = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    table, _ = provenance_section.inputs_table(tmp_path / "results", tmp_path, {})
    assert sorted(name.strip("`") for name in table["Input"]) == sorted(declared)
    assert f"src/yt8m_qrnn/{dag.STAGES['report'].code[-1]}" in declared  # the report's own package


def test_hashes_are_computed_as_dvc_computes_them(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (folder / ".gitignore").write_text("/x\n")
    ours = {"d": dvc_hash(folder), "f": dvc_hash(folder / "a.txt")}
    assert ours["d"]["md5"].endswith(".dir") and ours["d"]["nfiles"] == 3
    assert dvc_hash(tmp_path / "absent") is None
    try:
        from dvc_data.hashfile.build import build
        from dvc_data.hashfile.db import HashFileDB
        from dvc_objects.fs.local import LocalFileSystem
    except ImportError:
        pytest.skip("dvc_data is not installed")
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "odb"))
    for key, path in (("d", folder), ("f", folder / "a.txt")):
        _, meta, obj = build(odb, str(path), fs, "md5")
        assert obj.hash_info.value == ours[key]["md5"], key


def test_provenance_git_dvc_lock_params_manifest(tmp_path):
    results = write_fake_results(tmp_path)
    for rel in provenance_section.CODE_INPUTS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / rel, tmp_path / rel)
    manifest_md5 = dvc_hash(results / "data" / "manifest.json")["md5"]
    lock = {"schema": "2.0", "stages": {
        "report": {"cmd": "python workflow/scripts/report.py", "deps": [
            {"path": "results/data/manifest.json", "hash": "md5", "md5": manifest_md5, "size": 1},
            {"path": "src/yt8m_qrnn/stages/report", "hash": "md5", "md5": "0" * 32 + ".dir", "size": 1}]},
        "fetch": {"cmd": "python workflow/scripts/fetch.py", "outs": [
            {"path": "resources/yt8m", "hash": "md5", "md5": "1" * 32 + ".dir", "size": 1, "nfiles": 1}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "resources" / "yt8m").mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "src", "workflow"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    text = build_report(list(DEFAULT_MODELS), {}, results, repo=tmp_path)
    assert f"git commit: `{commit}` (clean" in text  # results/ and dvc.lock are outputs, not code
    tables = markdown_tables(text)
    inputs = {row[0]: row for row in section(tables, "Inputs of this report")[1:]}
    assert inputs["`results/data/manifest.json`"][1] == f"`{manifest_md5}`"
    assert inputs["`results/data/manifest.json`"][4] == "same"
    assert inputs["`src/yt8m_qrnn/stages/report`"][4] == "changed since dvc.lock"
    assert inputs["`results/eval`"][1].endswith(".dir`") and inputs["`results/eval`"][4] == "not in dvc.lock"
    assert "Every input and output recorded in dvc.lock (3 entries" in text
    assert "folder: not re-hashed" in text
    params = {row[0]: row[1] for row in section(tables, "Params of each stage")[1:]}
    assert list(params) == ["generate", "fetch", "index"] + [
        f"{s}@{m}" for m in DEFAULT_MODELS for s in ("train", "evaluate")] + ["bench", "report"]
    assert params["bench"] == "not recorded (" + str(results / "params" / "bench.json") + " missing)"
    assert "`evaluate.top_k`=20" in params["evaluate@qrnn"] and "`models.qrnn.kind`=\"qrnn\"" in params["train@qrnn"]
    data = section(tables, "Data")
    assert data[0][:3] == ["Level", "Split", "Shards"] and len(data) == 1 + 6
    assert "12 shards" in text and "digest of every shard's md5" in text
    assert re.search(r"- CPU: .+, \d+ logical cores", text) and "- GPU: " in text
    assert re.search(r"packages: Python 3\.\d+\.\d+; .*numpy \d", text)

    (tmp_path / "src" / "yt8m_qrnn" / "stages" / "report" / "build.py").write_text("# edited\n")
    text = build_report(list(DEFAULT_MODELS), {}, results, repo=tmp_path)
    code = text.split("### Inputs")[0]
    assert "**with uncommitted changes**" in code and "`src/yt8m_qrnn/stages/report/build.py`" in code


def test_no_git_no_dvc_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    text = make_report(tmp_path)
    assert "not a git repository" in text
    assert "No `dvc.lock` yet" in text
    inputs = section(markdown_tables(text), "Inputs of this report")
    assert any(row[1] == "missing" for row in inputs[1:])  # the code files are not in tmp_path
    assert_no_empty_cells(inputs, "inputs")


# ---------------------------------------------------------------- the real stage, under both orchestrators

@pytest.mark.slow
def test_pipeline_report_html_metrics_and_plots(tiny_build, tmp_path):
    """A tiny run of two models: report.md, `snakemake --report`, `dvc metrics show/diff`, `dvc plots show`.
    On a copy of the session's tiny build (every model built) with run_models cut to two: the report is
    made again, of those two only."""
    from tiny_pipeline import copy_workspace, run

    workspace = copy_workspace(tiny_build.root, tmp_path / "built")
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["run_models"] = ["logistic", "qrnn"]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["snakemake", "--cores", "2"], workspace)
    text = (workspace / "results" / "report.md").read_text()
    tables = markdown_tables(text)
    for prefix in ("1. Table 1", "2. Table 2", "3. Every"):
        assert_no_empty_cells(section(tables, prefix), prefix)
    assert "**Generated data.**" in text and "moe (this run" not in text
    for figure in REQUIRED_FIGURES:
        assert (workspace / "results" / "figures" / figure).read_bytes()[:8] == PNG_MAGIC

    run(["snakemake", "--report", "report.html"], workspace)
    page = (workspace / "report.html").read_text()
    for name in [f.rsplit(".", 1)[0] for f in REQUIRED_FIGURES] + ["table1", "table2", "models", "report.md"]:
        assert name in page, name

    shown = run(["dvc", "metrics", "show"], workspace)
    for model in ("logistic", "qrnn"):
        assert f"results/eval/{model}/metrics.json" in shown and f"results/models/{model}/train_stats.json" in shown
    plots = run(["dvc", "plots", "show", "--json"], workspace)
    for path in ("history.csv", "pr_curve.csv", "per_class_ap.csv"):
        assert path in plots

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "add", "-A"], workspace)
    run([*git, "commit", "-qm", "first run"], workspace)
    params["models"]["qrnn"]["hidden"] = 5
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], workspace)
    diff = run(["dvc", "metrics", "diff"], workspace)  # against the commit: only what changed, per model
    assert "results/eval/qrnn/metrics.json" in diff
    assert re.search(r"results/models/qrnn/train_stats\.json\s+parameters\s", diff)
    assert "results/eval/logistic/metrics.json" not in diff and "results/models/logistic" not in diff


@pytest.mark.parametrize("best_epochs, flagged", [([12, 30, 9], True), ([12, 29, 9], False)])
def test_epoch_column_flags_a_seed_kept_at_the_cap(best_epochs, flagged):
    stats = {"epochs": [17, 30, 14], "best_epochs": best_epochs, "max_epochs": 30, "validation_videos": 250}
    text = tables.epochs_kept(stats)
    assert text.startswith(f"{best_epochs[0]}, {best_epochs[1]}, {best_epochs[2]} of 30 (validation GAP)")
    assert ("the cap: the budget may bind" in text) == flagged


def test_epoch_column_without_validation_names_the_last_epoch_and_no_cap():
    text = tables.epochs_kept({"epochs": 6, "max_epochs": 6})
    assert text == "6 of 6 (no validation subset: the last)"


def test_provenance_states_the_determinism_settings():
    settings = {"seeding": "keras.utils.set_random_seed", "tf_op_determinism": True,
                "intra_op_threads": "default (every core)", "onednn": "default"}
    runs = [inputs.ModelRun(name, {"determinism": settings}, {}, pd.DataFrame()) for name in ("lstm", "qrnn")]
    [line] = provenance_section.determinism_lines(runs)
    assert line.startswith("- determinism (lstm, qrnn): seeds set by `keras.utils.set_random_seed`")
    assert "TensorFlow op determinism on" in line
    old = [inputs.ModelRun("moe", {}, {}, pd.DataFrame())]
    assert provenance_section.determinism_lines(old) == ["- determinism: not recorded by these training runs"]
    assert len(provenance_section.determinism_lines(runs + old)) == 2
