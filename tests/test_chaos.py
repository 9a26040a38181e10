"""Chaos: the whole tiny DAG, SIGKILLed again and again at seeded random moments, comes back
to exactly the results of an uninterrupted run, and leaves a clean state behind.

Under each orchestrator (`snakemake --cores 2`, then `dvc repro`) the run is killed at least
KILLS times: each time a job of a stage still owed a kill is seen running, the seeded
generator draws a delay, and when it has passed (or right when the stage's job ends, if
that comes first) the orchestrator and all its jobs get SIGKILL at once, as a preempted
machine would. The same command is then run again. Under
Snakemake a kill leaves Snakemake's own directory lock, which `snakemake --unlock` clears
first, as its error message says. At the end the results equal an uninterrupted run's, no
temporary, partial or lock file is left, `dvc status` is clean and `snakemake -n` has
nothing to do. The kill points and what each rerun redid are printed.

Run it alone with `make chaos` (CHAOS_SEED=n picks other moments); `make test` leaves it out.
"""
import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from conftest import tool_env
from test_pipeline import dvc_ran, snakemake_ran
from tiny_pipeline import run, tiny_workspace

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

CHAOS_SEED = int(os.environ.get("CHAOS_SEED", "19"))
KILLS = 10
KILLED_STAGES = ("fetch", "index", "train", "evaluate", "bench", "report")  # each killed at least once
MAX_DELAY_S = 4.0  # after a job is seen: most jobs of the tiny DAG run 5-30 s, so most kills land in one
RUN_TIMEOUT_S = 900
STAGE_OF_SCRIPT = {"generate.py": "generate", "fetch_shard.py": "fetch", "fetch.py": "fetch", "index.py": "index",
                   "train.py": "train", "evaluate.py": "evaluate", "bench.py": "bench", "report.py": "report"}
COMMANDS = {"snakemake": ["snakemake", "--cores", "2"], "dvc": ["dvc", "repro"]}
# What each orchestrator keeps of its own, and may keep: logs of every run, DVC's state database
OWN_RECORDS = (".git", "logs", ".snakemake/log", ".snakemake/metadata", ".dvc/tmp", ".dvc/cache")


# ---------------------------------------------------------------- workspace and processes

def chaos_env(root: Path) -> dict:
    """The tools' environment with a temporary folder of the workspace's own, so that what a
    killed job leaves in it is seen."""
    tmp = root.parent / f"{root.name}-tmp"
    tmp.mkdir(exist_ok=True)
    return {**tool_env(), "TMPDIR": str(tmp)}


def running_stages(pid: int) -> set[str]:
    """The stages whose scripts run among the descendants of `pid`."""
    stages = set()
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return stages
    for child in children:
        try:
            args = child.cmdline()
        except psutil.Error:
            continue
        for arg in args:
            if arg.startswith("workflow/scripts/") or "/workflow/scripts/" in arg:
                stages.add(STAGE_OF_SCRIPT.get(Path(arg).name, Path(arg).stem))
    return stages


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the orchestrator and every job it started, all at once."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(process.pid, signal.SIGKILL)
    for child in tree:  # a job that left the process group dies too
        try:
            child.kill()
        except psutil.Error:
            pass
    process.wait()


# ---------------------------------------------------------------- the chaos loop

def kill_plan(rng: random.Random) -> dict[str, int]:
    """How many kills each stage is owed: one each, and the rest drawn at random."""
    owed = dict.fromkeys(KILLED_STAGES, 1)
    for stage in rng.choices(KILLED_STAGES, k=KILLS - len(KILLED_STAGES)):
        owed[stage] += 1
    return owed


def run_until_killed(cmd, root, env, log: Path, owed: dict[str, int], rng: random.Random):
    """Start `cmd`. When a job of a stage still owed a kill is seen, draw a delay; SIGKILL
    everything once it has passed, or as soon as no job of that stage runs any more (the
    moment right after a stage, when the orchestrator records it, is a kill point too).
    Returns (exit code, or None when killed; seconds into the run; the stage killed, and when;
    the stages running at the kill)."""
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    started, target, kill_at = time.monotonic(), None, 0.0
    while process.poll() is None:
        now, running = time.monotonic(), running_stages(process.pid)
        if now - started > RUN_TIMEOUT_S:
            kill_tree(process)
            raise AssertionError(f"{' '.join(cmd)} ran over {RUN_TIMEOUT_S} s; see {log}")
        if target is None:
            candidates = [stage for stage in sorted(running) if owed.get(stage)]
            if candidates:
                target = rng.choice(candidates)
                kill_at = now + rng.uniform(0.0, MAX_DELAY_S)
        elif target not in running or now >= kill_at:
            when = "during" if target in running else "just after"
            kill_tree(process)
            return None, now - started, (target, when), running
        time.sleep(0.05)
    return process.returncode, time.monotonic() - started, None, set()


def jobs_started(orchestrator: str, log: Path) -> list[str]:
    text = log.read_text()
    return snakemake_ran(text) if orchestrator == "snakemake" else dvc_ran(text)


def chaos_run(orchestrator: str, root: Path, seed: int) -> list[str]:
    """Kill the run KILLS times at least, rerunning the same command after each kill, then let
    it finish. Returns the transcript lines."""
    rng, env, cmd = random.Random(seed), chaos_env(root), COMMANDS[orchestrator]
    owed = kill_plan(rng)
    lines = [f"{orchestrator}: seed {seed}, kills owed {owed}"]
    for attempt in range(1, 4 * KILLS):
        if orchestrator == "snakemake" and attempt > 1:
            run(["snakemake", "--unlock"], root, env=env)
        log = root.parent / f"{root.name}-run{attempt:02d}.log"
        code, seconds, target, running = run_until_killed(cmd, root, env, log, owed, rng)
        redid = ", ".join(jobs_started(orchestrator, log)) or "nothing"
        if code is None:
            (stage, when), owed[target[0]] = target, owed[target[0]] - 1
            lines.append(f"run {attempt:2d}: SIGKILL at {seconds:6.1f} s {when} {stage} (running: "
                         f"{', '.join(sorted(running)) or 'no job'}); this run had started: {redid}")
            continue
        if code != 0:
            raise AssertionError(f"run {attempt} of {' '.join(cmd)} failed (exit {code}):\n{log.read_text()[-4000:]}")
        lines.append(f"run {attempt:2d}: finished in {seconds:.1f} s; it ran: {redid}")
        if not any(owed.values()):
            return lines
        lines.append(f"kills still owed {owed}, but those stages are done")
        raise AssertionError("\n".join(lines))
    raise AssertionError("\n".join(lines + ["too many attempts"]))


# ---------------------------------------------------------------- what must agree at the end

def results_digest(root: Path) -> dict[str, str]:
    """What two runs must agree on to the last bit: the index, every prediction and metric, and
    the training histories without their clock columns."""
    digests = {}
    for path in sorted([*(root / "results/index").rglob("*"), *(root / "results/eval").rglob("*")]):
        if path.is_file() and path.name != ".snakemake_timestamp":
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in sorted((root / "results/models").glob("*/history.csv")):
        history = pd.read_csv(path)
        history = history[[c for c in history.columns if "second" not in c and "time" not in c]]
        digests[str(path.relative_to(root))] = hashlib.sha256(history.to_csv(index=False).encode()).hexdigest()
    return digests


def file_set(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not str(p.relative_to(root)).startswith(OWN_RECORDS)}


def held(lock: Path) -> bool:
    """Whether some process holds the pipeline's flock on `lock` (the file itself stays: it is the
    lock's name, and the kernel drops a killed holder's lock)."""
    with open(lock, "rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def leftovers(root: Path) -> list[str]:
    """Temporary and partial files, in the workspace, DVC's cache or $TMPDIR, and locks still held:
    the pipeline's, Snakemake's and DVC's."""
    left = []
    for path in root.rglob("*"):
        rel = str(path.relative_to(root))
        if rel.startswith((".git/", ".venv/")) or not path.is_file():
            continue
        if ".tmp" in path.name or "partial" in path.name:
            left.append(rel)
        elif rel.startswith((".snakemake/locks/", ".snakemake/incomplete/")):
            left.append(f"{rel} (Snakemake)")
        elif rel.startswith("resources/locks/") and held(path):
            left.append(f"{rel} (held)")
    left += [f".dvc/tmp/rwlock: {path} held by live process {pid}" for path, pid in dvc_lock_entries(root)
             if psutil.pid_exists(pid)]
    left += [f"$TMPDIR/{path.name}" for path in temporary_files(root) if "yt8m" in path.name]
    return sorted(left)


def dvc_lock_entries(root: Path) -> list[tuple[str, int]]:
    """(path, pid) of every entry in DVC's .dvc/tmp/rwlock. A killed `dvc repro` leaves its entries;
    DVC drops an entry whose process is gone when a later run would wait on it."""
    rwlock = root / ".dvc/tmp/rwlock"
    locks = json.loads(rwlock.read_text() or "{}") if rwlock.exists() else {}
    return [(path, info["pid"]) for mode in locks.values() for path, infos in mode.items()
            for info in (infos if isinstance(infos, list) else [infos])]


def temporary_files(root: Path) -> list[Path]:
    """What the run's jobs left in its $TMPDIR. Killed Snakemake jobs leave their job scripts and
    TensorFlow its autograph sources; those are theirs (the machine's /tmp cleaning takes them),
    and only the pipeline's own count as leftovers."""
    tmpdir = root.parent / f"{root.name}-tmp"
    return sorted(tmpdir.iterdir()) if tmpdir.is_dir() else []


@pytest.fixture(scope="module")
def reference(tiny_build):
    """An uninterrupted `snakemake --cores 2` of the tiny DAG (the session's shared build): its
    results and its files."""
    assert leftovers(tiny_build.root) == []
    return results_digest(tiny_build.root), file_set(tiny_build.root)


@pytest.mark.parametrize("orchestrator", ["snakemake", "dvc"])
def test_killed_anywhere_the_dag_comes_back_to_the_same_results(reference, orchestrator, tmp_path):
    digests, files = reference
    root = tmp_path / orchestrator
    root.mkdir()
    tiny_workspace(root)
    lines = chaos_run(orchestrator, root, CHAOS_SEED + (orchestrator == "dvc"))
    print("\n" + "\n".join(lines), flush=True)

    assert sum(line.startswith("run") and "SIGKILL" in line for line in lines) >= KILLS
    env = chaos_env(root)
    final = results_digest(root)
    assert final.keys() == digests.keys()
    assert [name for name in digests if final[name] != digests[name]] == []
    assert leftovers(root) == []
    assert sorted(file_set(root) - files) == []  # nothing the uninterrupted run does not have
    assert "up to date" in run(["dvc", "status"], root, env=env)
    assert "Nothing to be done" in run(["snakemake", "-n"], root, env=env)
    stale = dvc_lock_entries(root)
    print(f"{orchestrator}: DVC's rwlock keeps {len(stale)} entries of killed runs (none of a live process)")
    others = temporary_files(root)
    print(f"{orchestrator}: left in $TMPDIR by Snakemake and TensorFlow: {len(others)} "
          f"({', '.join(path.name for path in others[:4])}{', ...' if len(others) > 4 else ''})")
    print(f"{orchestrator}: {len(final)} result files identical to the uninterrupted run; no temporary, partial "
          f"or lock file; dvc status clean; snakemake -n has nothing to do", flush=True)
