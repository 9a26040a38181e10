"""Resource limits while training: too little memory, a full disk.

- Out of memory: the train stage runs in a process whose address space is capped
  (RLIMIT_AS) once TensorFlow is loaded and running, so the import and the model
  fit and the first batches do not. It must stop with one line naming the model
  and the batch size to lower, leaving no output; and, as that line says, a lower
  batch size then trains under the same cap.
- Disk full while checkpointing: in the middle of training, the checkpoint's
  weights file or its state.json is written to /dev/full (the kernel's own
  ENOSPC). The stage stops with one line naming the file, no output is left, the
  checkpoint on disk is the previous, complete one, and a rerun with space again
  resumes from it and gives the uninterrupted run's history and weights.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import REPO, tool_env
from test_faults import error_line, files_under, no_temporaries, run_cli, small_params, write_params
from yt8m_qrnn.pipeline import dag as stages
from yt8m_qrnn.pipeline.cli import stage_function
from yt8m_qrnn.stages import train
from yt8m_qrnn.pipeline.io import sha256_file

pytestmark = pytest.mark.faults


def build_until_index(root: Path, params: dict) -> Path:
    """generate, fetch and index, in this process, in `root`."""
    root.mkdir(parents=True)
    here = os.getcwd()
    os.chdir(root)
    try:
        write_params(root, params)
        for stage in map(stage_function, ("generate", "fetch", "index")):
            stage(params)
    finally:
        os.chdir(here)
    return root


def copy_tree(source: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)  # hard links (store, yt8m) kept
    return dest


def model_weights(path: Path) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(w) for w in keras.saving.load_model(path, compile=False).weights]


# ---------------------------------------------------------------- out of memory

FRAME_MODEL = "frame_logistic"
# Measured here: training frame_logistic on these 259 videos of 250-300 frames takes about 0.6 GB of
# address space beyond what the running TensorFlow holds at batch size 4, 1.6 GB at batch size 256.
HEADROOM = 1000 << 20
HUGE_BATCH, SMALL_BATCH = 256, 4

LIMITED = textwrap.dedent("""
    import resource, runpy, sys
    sys.path.insert(0, {src!r})
    import tensorflow as tf
    import yt8m_qrnn.stages.train  # noqa: F401  (what the stage loads, loaded before the cap)
    tf.constant(1.0) + 1.0  # the runtime and its thread pools started before the cap too
    size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + {headroom}, resource.RLIM_INFINITY))
    sys.argv = [{script!r}, "--model", {model!r}]
    runpy.run_path({script!r}, run_name="__main__")
""")


def long_video_params(batch_size: int) -> dict:
    params = small_params()
    params["generate"].update(min_frames=250, max_frames=300, splits={"train": [1, 256], "validate": [1, 4],
                                                                      "test": [1, 2]})
    params["run_models"] = [FRAME_MODEL]
    params["models"][FRAME_MODEL].update(epochs=1, batch_size=batch_size)
    params["train"]["seeds"] = [1]
    return params


def train_with_capped_memory(root: Path) -> subprocess.CompletedProcess:
    code = LIMITED.format(src=str(REPO / "src"), headroom=HEADROOM, script=str(REPO / "workflow/scripts/train.py"),
                          model=FRAME_MODEL)
    # one malloc arena per thread would reserve 64 MB of address space each: the cap would count threads
    env = tool_env() | {"MALLOC_ARENA_MAX": "2"}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.extended
def test_out_of_memory_names_the_model_and_the_batch_size_to_lower(tmp_path):
    root = build_until_index(tmp_path / "ws", long_video_params(HUGE_BATCH))
    result = train_with_capped_memory(root)
    assert result.returncode == 1, result.stderr[-3000:]
    assert error_line(result.stderr) == (f"error: train {FRAME_MODEL}: out of memory at batch_size {HUGE_BATCH}; "
                                         f"lower models.{FRAME_MODEL}.batch_size in params.yaml")
    assert "Traceback" not in result.stderr
    assert files_under(root / "results" / "models") == [] and no_temporaries(root / "results")

    write_params(root, long_video_params(SMALL_BATCH))  # what the line says to do
    result = train_with_capped_memory(root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / stages.seed_dir(FRAME_MODEL, 1) / "model.keras").is_file()


# ---------------------------------------------------------------- disk full while checkpointing

MODEL = "logistic"
EPOCHS = 3
HISTORY_COLUMNS = ["epoch", "loss", "learning_rate", "step", "val_gap"]


def checkpoint_params() -> dict:
    params = small_params()
    params["models"][MODEL]["epochs"] = EPOCHS
    params["train"].update(seeds=[1], patience=0)
    return params


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[Path, Path]:
    """A workspace with the shards and the index, and the seed's outputs of an uninterrupted training."""
    root = build_until_index(tmp_path_factory.mktemp("checkpoints") / "ws", checkpoint_params())
    reference = root.parent / "reference"
    here = os.getcwd()
    os.chdir(root)
    try:
        stage_function("train")(checkpoint_params(), MODEL)
        os.rename(stages.seed_dir(MODEL, 1), reference)
        stages.remove_outputs("train", MODEL)
    finally:
        os.chdir(here)
    return root, reference


def fill_disk_at_second_checkpoint(monkeypatch, target: str) -> None:
    """The second checkpoint (the end of epoch 2) has its weights file or its state.json written to /dev/full:
    its temporary name (io.atomic_path's) is made a link to /dev/full just before it is written."""
    saves = []
    real_save, real_save_weights = train.Checkpoint.save, train._save_weights

    def save(self, model, state):
        saves.append(state["epoch"])
        if target == "state" and len(saves) == 2:
            os.symlink("/dev/full", self.save_folder / f".state.tmp{os.getpid()}.json")
        return real_save(self, model, state)

    def save_weights(model, final):
        if target == "weights" and final.name.startswith("state-") and len(saves) == 2:
            os.symlink("/dev/full", final.with_name(f".{final.name.removesuffix('.weights.h5')}.tmp{os.getpid()}"
                                                    ".weights.h5"))
        return real_save_weights(model, final)

    monkeypatch.setattr(train.Checkpoint, "save", save)
    monkeypatch.setattr(train, "_save_weights", save_weights)


@pytest.mark.parametrize("target", ["weights", "state"])
def test_disk_full_while_checkpointing_fails_cleanly_then_resumes_exactly(indexed, tmp_path, monkeypatch, capsys,
                                                                          caplog, target):
    root, reference = indexed
    monkeypatch.chdir(copy_tree(root, tmp_path / "ws"))
    with monkeypatch.context() as full:
        fill_disk_at_second_checkpoint(full, target)
        code, err = run_cli(capsys, "train", "--model", MODEL)
    assert code == 1
    folder = next((stages.TRAIN_WORK / MODEL).glob("*/checkpoint"))
    written = r"state-\d{10}-\d+\.weights\.h5" if target == "weights" else r"state\.json"
    assert re.fullmatch(f"error: cannot write {re.escape(str(folder))}/{written}: "
                        r"\[Errno 28\] No space left on device", error_line(err)), err[-2000:]
    assert files_under(Path("results/models")) == []  # no output of the failed run
    # the checkpoint a rerun loads: the first epoch's, complete, and nothing half-written beside it
    state = json.loads((folder / "state.json").read_text())
    assert state["epoch"] == 1 and state["batch"] == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted([train.BEST_WEIGHTS, "state.json", state["weights"]])
    assert sha256_file(folder / state["weights"]) == state["weights_sha256"]

    caplog.set_level(logging.INFO, logger="yt8m_qrnn")
    code, err = run_cli(capsys, "train", "--model", MODEL)
    assert code == 0, err[-3000:]
    assert any("resuming at epoch 2, batch 0" in r.getMessage() for r in caplog.records)
    resumed = stages.seed_dir(MODEL, 1)
    ours, theirs = (pd.read_csv(d / "history.csv")[HISTORY_COLUMNS] for d in (resumed, reference))
    assert list(ours["epoch"]) == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(ours, theirs, rtol=1e-5)
    for a, b in zip(model_weights(resumed / "model.keras"), model_weights(reference / "model.keras"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert json.loads((resumed / "train_stats.json").read_text())["best_epoch"] == \
        json.loads((reference / "train_stats.json").read_text())["best_epoch"]
