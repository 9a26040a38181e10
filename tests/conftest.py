import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_YT8M = REPO.parent / "shared" / "yt8m"
BIN = Path(sys.executable).parent

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tool_env() -> dict:
    """Environment for running the pipeline's command-line tools from tests."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.fixture(scope="session")
def shared_yt8m() -> Path:
    if not (SHARED_YT8M / "2018" / "video").is_dir():
        pytest.skip(f"real YouTube-8M shards not found at {SHARED_YT8M}")
    return SHARED_YT8M


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """The tiny pipeline (tiny_pipeline.tiny_workspace) built once per session from scratch by
    `snakemake --cores 2`: every output built, both orchestrators up to date. Shared: never
    change it; copy it (tiny_pipeline.copy_workspace) to change anything."""
    from tiny_pipeline import TinyBuild, run, tiny_workspace

    root = tiny_workspace(tmp_path_factory.mktemp("tiny-build"))
    return TinyBuild(root, run(["snakemake", "--cores", "2"], root))
