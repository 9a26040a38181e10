"""Corruption after the fact: one byte of a cached artifact flipped, in place.

The artifacts: a shard (resources/yt8m, hard links into the shard store
resources/store/yt8m), the index (results/index/index.parquet), a model
(results/models/<model>/seeds/seed-<n>/model.keras), a training checkpoint, and
DVC's cached copy of any of them (.dvc/cache). Each is either found and rebuilt
by DVC, or refused by the stage about to use it, in one line naming the file,
what is wrong and the fix. The stages check what their producers recorded:

- shards: every record read is checked against the CRCs the index recorded
  (reader.py; test_faults.py covers a flipped shard under the train stage);
- the index: the sha256 of its content, kept in the parquet file (index.read_index);
- a model: its sha256, recorded by train in the train_stats.json beside it
  (evaluate.check_model);
- a checkpoint: the sha256 of its weights, recorded in its state.json.

What DVC does itself (3.67, local cache, copies): a file flipped by a write that
changes its time is "modified" for `dvc status`, and `dvc repro` puts the cached
copy back; a flip that keeps size, time and inode (bit rot) goes unseen, as DVC
trusts its record of them; and DVC checks a read-only cache file out without
hashing it, records the bytes under the cached name, and a forced rerun that
makes the right bytes gets the corrupt copy back from the cache on commit. The
DVC cases are @slow (a DVC build of the tiny DAG first); the others take seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from test_faults import error_line, files_under, orchestrator_workspace, run_cli, sh, small_params, write_params
from yt8m_qrnn.pipeline import dag as stages
from yt8m_qrnn.pipeline.cli import stage_function
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.records.features import NUM_CLASSES
from yt8m_qrnn.data.index_file import REINDEX, read_index
from yt8m_qrnn.pipeline.io import CorruptArtifact, sha256_file

pytestmark = pytest.mark.faults

MODEL = "logistic"
SEED_DIR = Path(f"results/models/{MODEL}/seeds/seed-1")
MODEL_FILE = SEED_DIR / "model.keras"
RETRAIN = (f"rerun the train stage (dvc repro --force --single-item train@{MODEL}, "
           "or snakemake --forcerun train)")


# ---------------------------------------------------------------- helpers

def corruption_params() -> dict:
    params = small_params()
    params["train"]["seeds"] = [1]
    return params


def flip_byte(path: Path, offset: int, keep_time: bool = True) -> None:
    """XOR one bit of the byte at `offset`, in place (hard links see it too). keep_time: size, times and
    mode stay as they were, as with bit rot, so whatever trusts them cannot tell."""
    before = path.stat()
    os.chmod(path, stat.S_IMODE(before.st_mode) | stat.S_IWUSR)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    os.chmod(path, stat.S_IMODE(before.st_mode))
    if keep_time:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def copy_tree(source: Path, dest: Path) -> Path:
    """cp -a: times, modes and the hard links between the shard store and resources/yt8m kept."""
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
    return dest


def record_offset(subset: str, level: str = "video") -> tuple[Path, int]:
    """A shard and a byte inside the data of one of its records of `subset` (from the index)."""
    index = pd.read_parquet(stages.INDEX)
    row = index[(index["subset"] == subset) & (index["level"] == level)].iloc[0]
    return Path(row["shard"]), int(row["offset"]) + 12 + int(row["length"]) // 2


def harmful_index_offset(path: Path) -> int:
    """A byte of the index whose flip changes what a plain pandas read returns, silently: the flip
    read_index exists for."""
    good, data = pd.read_parquet(path), path.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        trial = Path(folder) / "index.parquet"
        for offset in range(4, len(data) - 8):
            flipped = bytearray(data)
            flipped[offset] ^= 0x10
            trial.write_bytes(flipped)
            try:
                if not pd.read_parquet(trial).equals(good):
                    return offset
            except Exception:  # noqa: BLE001 (this flip is loud; the one wanted is silent)
                continue
    raise AssertionError(f"no silently harmful byte in {path}")


def build_in_place(params: dict) -> None:
    """generate, fetch, index and train, in this process, in the current folder."""
    write_params(Path.cwd(), params)
    stage_function("generate")(params)
    stage_function("fetch")(params)
    stage_function("index")(params)
    stage_function("train")(params, MODEL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workspace where the stages ran up to train (one seed of the logistic model)."""
    root = tmp_path_factory.mktemp("trained") / "ws"
    root.mkdir()
    here = os.getcwd()
    os.chdir(root)
    try:
        build_in_place(corruption_params())
    finally:
        os.chdir(here)
    return root


@pytest.fixture
def ws(trained, tmp_path, monkeypatch) -> Path:
    """This test's own copy of `trained`, as the current folder."""
    root = copy_tree(trained, tmp_path / "ws")
    monkeypatch.chdir(root)
    return root


# ---------------------------------------------------------------- the index

@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_a_silently_wrong_index_is_refused_by_the_stages_that_read_it(ws, capsys, stage):
    if stage == "evaluate":
        assert run_cli(capsys, "evaluate", "--model", MODEL)[0] == 0
    index = stages.INDEX
    recorded = pq.read_schema(index).metadata[b"yt8m_qrnn.content_sha256"].decode()
    flip_byte(index, harmful_index_offset(index))
    code, err = run_cli(capsys, stage, "--model", MODEL)
    line = error_line(err)
    assert code == 1
    assert line.startswith(f"error: {stage} {MODEL}: {index} is corrupt: content sha256 ")
    assert line.endswith(f", but the file records {recorded}; {REINDEX}")
    outputs = Path("results/models" if stage == "train" else "results/eval")
    assert files_under(outputs) == []  # nothing trained or evaluated on it


def test_every_flipped_byte_of_the_index_is_refused_or_harmless(trained, tmp_path):
    """A sample of single-bit flips over the whole file: read_index gives the index as written, or refuses;
    plain pandas reads some of these flips as a different index without a word."""
    original = (trained / stages.INDEX).read_bytes()
    good = read_index(trained / stages.INDEX)
    trial = tmp_path / "index.parquet"
    outcomes = {"refused": 0, "same": 0, "silently different for pandas": 0}
    for offset in range(0, len(original), max(1, len(original) // 400)):
        flipped = bytearray(original)
        flipped[offset] ^= 0x10
        trial.write_bytes(flipped)
        try:
            back = read_index(trial)
        except CorruptArtifact as err:
            assert str(err).startswith(f"{trial} is corrupt: ") and "\n" not in str(err)
            outcomes["refused"] += 1
            try:
                outcomes["silently different for pandas"] += not pd.read_parquet(trial).equals(good)
            except Exception:  # noqa: BLE001 (pandas noticed too)
                pass
            continue
        pd.testing.assert_frame_equal(back, good)  # never a different index
        outcomes["same"] += 1
    assert outcomes["refused"] > 100 and outcomes["silently different for pandas"] > 0, outcomes


# ---------------------------------------------------------------- a model

def test_a_flipped_model_is_refused_by_evaluate(ws, capsys):
    recorded = json.loads((SEED_DIR / "train_stats.json").read_text())["model_sha256"]
    assert recorded == sha256_file(MODEL_FILE)  # what train wrote
    flip_byte(MODEL_FILE, MODEL_FILE.stat().st_size // 2)
    code, err = run_cli(capsys, "evaluate", "--model", MODEL)
    assert code == 1
    assert error_line(err) == (f"error: evaluate {MODEL}: {MODEL_FILE} is corrupt: sha256 {sha256_file(MODEL_FILE)}, "
                               f"but {SEED_DIR / 'train_stats.json'} records {recorded}; {RETRAIN}")
    assert files_under(Path("results/eval")) == []


def test_a_model_without_a_recorded_digest_is_refused(ws, capsys):
    record = SEED_DIR / "train_stats.json"
    stats = json.loads(record.read_text())
    del stats["model_sha256"]
    record.write_text(json.dumps(stats))
    code, err = run_cli(capsys, "evaluate", "--model", MODEL)
    assert code == 1
    assert error_line(err) == (f"error: evaluate {MODEL}: {record} is corrupt: it records no sha256 of model.keras "
                               f"(damaged, or written by an older version); {RETRAIN}")
    assert files_under(Path("results/eval")) == []


# ---------------------------------------------------------------- shards

def test_a_flipped_eval_record_is_refused_by_evaluate(ws, capsys):
    shard, offset = record_offset("eval")
    flip_byte(stages.DATA_ROOT / shard, offset)
    code, err = run_cli(capsys, "evaluate", "--model", MODEL)
    line = error_line(err)
    assert code == 1
    assert line.startswith(f"error: {stages.DATA_ROOT / shard}: record at byte offset ")
    assert line.endswith(f": bad data crc; the shards changed after they were indexed: delete "
                         f"{stages.SHARD_STORE / shard} and run the fetch stage again (dvc repro --force "
                         "--single-item fetch, or snakemake --forcerun fetch)")
    assert files_under(Path("results/eval")) == []


def test_a_shard_rotted_in_the_store_is_refused_then_fetched_again_as_advised(ws, capsys):
    """The store's copy is the published shard (a hard link), and fetch trusts its verification record
    (size and time): fetching again does not help until the store's copy is deleted, as the line says."""
    shard, offset = record_offset("train")
    stored, published = stages.SHARD_STORE / shard, stages.DATA_ROOT / shard
    assert stored.stat().st_ino == published.stat().st_ino
    pristine = (stages.GENERATED_MIRROR / shard).read_bytes()
    flip_byte(stored, offset)
    code, err = run_cli(capsys, "train", "--model", MODEL)
    assert code == 1 and f"delete {stored} and run the fetch stage again" in error_line(err)
    assert files_under(Path("results/models")) == []

    assert run_cli(capsys, "fetch")[0] == 0
    assert published.read_bytes() != pristine  # verified by size and time: still the rotten copy
    stored.unlink()
    assert run_cli(capsys, "fetch")[0] == 0
    assert published.read_bytes() == pristine
    code, err = run_cli(capsys, "train", "--model", MODEL)
    assert code == 0, err
    assert (SEED_DIR / "model.keras").is_file()


# ---------------------------------------------------------------- a training checkpoint

def test_a_flipped_checkpoint_is_not_resumed(ws, capsys):
    """A seed's finished checkpoint, kept while other seeds train (the train stage), is checked before it is
    loaded: a rerun refuses it rather than writing a model from corrupt weights."""
    from yt8m_qrnn.stages.train import train_model

    params = corruption_params() | {"train": corruption_params()["train"] | {"seeds": [1, 2]}}
    write_params(ws, params)
    p = stage_params(params, "train", MODEL)
    train_cfg = {k: v for k, v in p["train"].items() if k != "seeds"} | {"seed": 1}
    train_model(MODEL, p["models"][MODEL], train_cfg, version=2, num_classes=NUM_CLASSES[2],
                data_root=stages.DATA_ROOT, index_path=stages.INDEX, out_dir=stages.seed_dir(MODEL, 1),
                work_dir=stages.TRAIN_WORK / MODEL, keep_checkpoint=True)
    state_path = next((stages.TRAIN_WORK / MODEL).glob("*/checkpoint/state.json"))
    weights = state_path.parent / json.loads(state_path.read_text())["weights"]
    recorded = json.loads(state_path.read_text())["weights_sha256"]
    assert recorded == sha256_file(weights)
    flip_byte(weights, weights.stat().st_size // 2)
    code, err = run_cli(capsys, "train", "--model", MODEL)
    assert code == 1
    assert error_line(err) == (f"error: train {MODEL}: {weights} is corrupt: sha256 {sha256_file(weights)}, but "
                               f"{state_path} records {recorded}; remove {state_path.parent} to train from the start")
    assert files_under(Path("results/models")) == []


# ---------------------------------------------------------------- under DVC

@pytest.fixture(scope="module")
def dvc_built(tmp_path_factory) -> Path:
    """The tiny DAG up to evaluate@logistic, built by `dvc repro` (outputs in DVC's cache)."""
    root = orchestrator_workspace(tmp_path_factory.mktemp("dvc") / "ws", corruption_params())
    sh(["dvc", "repro", f"evaluate@{MODEL}"], root)
    return root


@pytest.fixture
def dvc_ws(dvc_built, tmp_path) -> Path:
    """A copy of `dvc_built`, its files hashed once by DVC as a workspace in use has them (DVC keeps its
    hashes per folder, file inode, size and time, outside the workspace)."""
    root = copy_tree(dvc_built, tmp_path / "ws")
    assert "Data and pipelines are up to date" in dvc_status(root)
    return root


def dvc_status(root: Path) -> str:
    return sh(["dvc", "status", f"evaluate@{MODEL}"], root).stdout


def artifact(kind: str, root: Path) -> tuple[Path, int, str]:
    """The artifact of `kind`, a byte whose flip evaluate cannot miss, and the DVC stage that owns it."""
    here = os.getcwd()
    os.chdir(root)
    try:
        if kind == "index":
            return stages.INDEX, harmful_index_offset(stages.INDEX), "index"
        if kind == "model":
            return MODEL_FILE, MODEL_FILE.stat().st_size // 2, f"train@{MODEL}"
        shard, offset = record_offset("eval")
        return stages.DATA_ROOT / shard, offset, "fetch"
    finally:
        os.chdir(here)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def dvc_cache_copy(root: Path, path: Path) -> Path:
    """Where DVC caches the bytes of the workspace file `path` (named by their md5)."""
    md5 = md5_of(root / path)
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def evaluate_forced(root: Path) -> subprocess.CompletedProcess:
    return sh(["dvc", "repro", "--force", "--single-item", f"evaluate@{MODEL}"], root, check=False)


KINDS = ["index", "model", "shard"]


def refusal_start(kind: str, path: Path) -> str:
    """How evaluate's line starts when the artifact of `kind` at `path` is corrupt."""
    return {"index": f"error: evaluate {MODEL}: {path} is corrupt: content sha256 ",
            "model": f"error: evaluate {MODEL}: {path} is corrupt: sha256 ",
            "shard": f"error: {path}: record at byte offset "}[kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_dvc_finds_a_flip_that_changes_the_file_time_and_rebuilds_the_file(dvc_ws, kind):
    """DVC runs the owning stage again (fetch, index) or restores its outputs from the run cache (train)."""
    path, offset, owner = artifact(kind, dvc_ws)
    original = (dvc_ws / path).read_bytes()
    flip_byte(dvc_ws / path, offset, keep_time=False)
    status = sh(["dvc", "status", owner], dvc_ws).stdout
    assert "changed outs" in status and "modified:" in status, status
    repro = sh(["dvc", "repro", f"evaluate@{MODEL}"], dvc_ws).stdout
    assert (f"Running stage '{owner}'" in repro
            or f"Stage '{owner}' is cached - skipping run, checking out outputs" in repro), repro
    assert (dvc_ws / path).read_bytes() == original
    assert "Data and pipelines are up to date" in dvc_status(dvc_ws)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_dvc_misses_a_flip_that_keeps_the_file_time_and_evaluate_refuses(dvc_ws, kind):
    path, offset, _ = artifact(kind, dvc_ws)
    flip_byte(dvc_ws / path, offset)
    assert "Data and pipelines are up to date" in dvc_status(dvc_ws)  # DVC cannot tell
    result = evaluate_forced(dvc_ws)
    assert result.returncode != 0
    line = error_line(result.stderr)
    assert line.startswith(refusal_start(kind, path)), line
    assert "DVC's cached copy" not in line  # the cache's copy is sound
    if kind == "shard":  # DVC's checkout made resources/yt8m copies: the store's file is not the one flipped
        assert line.endswith("; the shards changed after they were indexed: run the fetch stage again "
                             "(dvc repro --force --single-item fetch, or snakemake --forcerun fetch)"), line
    assert [f for f in files_under(dvc_ws / "results" / "eval") if not f.endswith(".gitignore")] == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_dvc_cache_copy_is_checked_out_unseen_then_refused_and_named(dvc_ws, kind):
    path, offset, owner = artifact(kind, dvc_ws)
    original = (dvc_ws / path).read_bytes()
    cached = dvc_cache_copy(dvc_ws, path)
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444  # read-only: DVC trusts it without hashing
    flip_byte(cached, offset)
    (dvc_ws / path).unlink()
    sh(["dvc", "checkout"], dvc_ws)
    assert (dvc_ws / path).read_bytes() != original  # checked out, corrupt, without a word
    assert "Data and pipelines are up to date" in dvc_status(dvc_ws)

    result = evaluate_forced(dvc_ws)
    assert result.returncode != 0
    line = error_line(result.stderr)
    assert line.startswith(refusal_start(kind, path)), line
    assert line.endswith(f"; DVC's cached copy {cached.relative_to(dvc_ws)} is corrupt too: delete it first")

    cached.unlink()  # as the line says; then the producer again, and the rest
    sh(["dvc", "repro", "--force", "--single-item", owner], dvc_ws)
    sh(["dvc", "repro", f"evaluate@{MODEL}"], dvc_ws)
    if kind != "model":  # a model is written anew (its archive has the time of saving)
        assert (dvc_ws / path).read_bytes() == original
    repaired = dvc_cache_copy(dvc_ws, path)
    assert md5_of(repaired) == repaired.parent.name + repaired.name  # the cache holds sound bytes again
    assert (dvc_ws / "results" / "eval" / MODEL / "metrics.json").is_file()
    assert "Data and pipelines are up to date" in dvc_status(dvc_ws)
