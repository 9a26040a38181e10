"""Keep workflow/envs/pipeline.yaml (conda, for --use-conda) in step with requirements.lock."""
from __future__ import annotations

import sys
from pathlib import Path

HEADER = """# Conda environment of every rule (snakemake --use-conda). The pip pins are
# requirements.lock, line for line (make lock rewrites both; a test checks it).
name: yt8m-qrnn
channels:
  - conda-forge
  - nodefaults
dependencies:
  - python=3.11
  - pip
  - pip:
"""


def lock_pins(lock: Path) -> list[str]:
    return [line.strip() for line in lock.read_text().splitlines() if line.strip() and not line.startswith("#")]


def render_conda_env(lock: Path) -> str:
    return HEADER + "".join(f"      - {pin}\n" for pin in lock_pins(lock))


if __name__ == "__main__":
    lock_path, env_path = map(Path, sys.argv[1:3])
    env_path.write_text(render_conda_env(lock_path))
