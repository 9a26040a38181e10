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
