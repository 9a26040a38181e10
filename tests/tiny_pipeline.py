"""The tiny pipeline the slow end-to-end tests run: the repository copied with tiny params,
under git, and the orchestrators' command lines run in it.

A full build costs minutes, so the session builds it once (fixture `tiny_build` in
conftest.py); a test that needs it built copies that workspace (`copy_workspace`).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from conftest import REPO, tool_env

TINY_FRAME = {"learning_rate": 0.01, "batch_size": 16, "epochs": 2}
TINY_VIDEO = {"learning_rate": 0.01, "batch_size": 16, "epochs": 2}
TINY_BENCH = {"grid": {"hidden": 8, "batch_sizes": [4], "lengths": [8]},
              "shape": {"batch": 4, "frames": 9, "inputs": 16, "hidden": 8}, "warmup": 0, "repeats": 1,
              "input_pipeline": {"batch_size": 16, "max_files": 1, "repeats": 1}}


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(min_frames=5, max_frames=9, splits={"train": [2, 40], "validate": [1, 40], "test": [1, 8]})
    for name, model in params["models"].items():
        model.update(TINY_FRAME if model["level"] == "frame" else TINY_VIDEO)
        for size_key in ("cells", "hidden"):
            if size_key in model:
                model[size_key] = 8
    params["bench"] = TINY_BENCH
    params["train"]["seeds"] = [1, 2]  # two: the seed intervals and ensembles run, at two thirds of the cost
    params["report"]["bootstrap_resamples"] = 100  # the schema's least: the intervals are computed, quickly
    return params


def copy_repo(dest):
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file() and not rel.startswith(("results/", "resources/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)


def run(cmd, cwd, check=True, env=None):
    """The command's output (stdout then stderr); AssertionError with its tail when it fails and `check`.
    `env`: the environment, tool_env() when not given."""
    result = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def tiny_workspace(root: Path) -> Path:
    """`root` made a copy of the repository with tiny_params(), committed to a new git repository:
    nothing built, no record of either orchestrator."""
    copy_repo(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        run(cmd, root)
    return root


@dataclass(frozen=True)
class TinyBuild:
    root: Path  # the workspace, every output built: read it, or copy it to change it
    log: str  # what `snakemake --cores 2` printed, building it from scratch


def copy_workspace(source: Path, dest: Path) -> Path:
    """A copy of the workspace `source` at `dest` (which must not exist): outputs, caches, git and
    the orchestrators' records, file times kept, so both orchestrators see it as they see `source`."""
    shutil.copytree(source, dest, symlinks=True)
    return dest
