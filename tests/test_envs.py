"""One lock: exact pins, and the conda env of every rule pinned to the same versions."""
import re
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from lockfile import lock_pins, render_conda_env  # noqa: E402  (a Makefile tool, not part of the package)

REQUIRED = ["snakemake", "dvc", "dvc-gs", "tensorflow-cpu", "keras", "pandas", "matplotlib", "gcsfs", "pytest", "scipy"]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_exact_versions():
    pins = lock_pins(REPO / "requirements.lock")
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", pin) for pin in pins), pins
    names = {normalise(pin.split("==")[0]) for pin in pins}
    assert set(map(normalise, REQUIRED)) <= names


def test_conda_env_matches_lock():
    env = (REPO / "workflow" / "envs" / "pipeline.yaml").read_text()
    assert env == render_conda_env(REPO / "requirements.lock"), "run: make lock (or python tools/lockfile.py ...)"


def test_every_rule_uses_the_locked_env():
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        for env in re.findall(r"^\s+conda:\n\s+(.+)$", rules.read_text(), re.M):
            assert env.strip() == "CONDA_ENV", f"{rules.name}: conda env {env}"
    assert 'CONDA_ENV = "../envs/pipeline.yaml"' in (REPO / "workflow/rules/common.smk").read_text()
