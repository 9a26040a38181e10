"""What produced a result: the machine, the software, the code's git state, the files' hashes.

Shared by the report (its provenance section) and the bench stage (its summary.json), so
both describe the machine the same way. Every function returns plain values; the callers
format them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

# ---------------------------------------------------------------- hardware and system


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int | None:
    """The CPUs this process may run on (its affinity), which may be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count()


def memory_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 2**10  # kB in /proc/meminfo are KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_models() -> str:
    """The GPUs nvidia-smi lists ("GPU 0: NVIDIA H100 ..."; several joined by "; "), or why none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "none detected (no nvidia-smi)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi failed: {err}"
    gpus = [line.split(" (UUID")[0].strip() for line in out.stdout.splitlines() if line.strip()]
    return "; ".join(gpus) if out.returncode == 0 and gpus else "none detected (nvidia-smi lists no GPU)"


def operating_system() -> str:
    """The system, its release and the machine's architecture: Linux 6.8.0 (x86_64)."""
    return f"{platform.system()} {platform.release()} ({platform.machine()})"


# ---------------------------------------------------------------- software


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """{package: version} of those of `packages` that are installed, in their order."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def python_version() -> str:
    return platform.python_version()


# ---------------------------------------------------------------- code


def _git(repo: Path, *args) -> str | None:
    """git's output (not stripped: porcelain lines start with a status column), or None."""
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(repo: Path) -> str | None:
    """The commit checked out in `repo`, or None outside a git repository (or without git)."""
    return (_git(repo, "rev-parse", "HEAD") or "").strip() or None


def git_changes(repo: Path, excluding: tuple[str, ...] = ()) -> list[str]:
    """The files modified or untracked in `repo`, but those under `excluding`."""
    status = _git(repo, "status", "--porcelain", "--", ".", *(f":(exclude){path}" for path in excluding)) or ""
    return [line[3:] for line in status.splitlines() if line.strip()]


# ---------------------------------------------------------------- files, as DVC records them


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_hash(path: Path) -> dict | None:
    """md5, size and file count of a file or folder, as DVC 3 records them in dvc.lock.

    A file: the md5 of its bytes. A folder: the md5 of the JSON list of its files'
    {"md5", "relpath"} sorted by relpath, with ".dir" appended. None if absent.
    """
    path = Path(path)
    if path.is_file():
        return {"md5": md5_file(path), "size": path.stat().st_size, "nfiles": 1}
    if not path.is_dir():
        return None
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    entries = [{"md5": md5_file(p), "relpath": p.relative_to(path).as_posix()} for p in files]
    digest = hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"
    return {"md5": digest, "size": sum(p.stat().st_size for p in files), "nfiles": len(files)}


def dvc_lock_stages(repo: Path) -> dict:
    """The `stages` of repo/dvc.lock; empty when there is none or it cannot be read."""
    path = Path(repo) / "dvc.lock"
    if not path.exists():
        return {}
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {}
    except yaml.YAMLError:
        return {}
